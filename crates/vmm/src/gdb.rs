//! The gdb remote stub (`vireo run --gdb tcp:HOST:PORT|unix:PATH`), on the
//! `gdbstub` crate, for both accelerators.
//!
//! Model (gdb's all-stop mode): one gdb thread per vCPU (thread id = vCPU
//! index + 1). While gdb looks at the guest, the whole VM is paused through
//! [`VmControl`] (every vCPU thread parked between instructions, its lock
//! free), so the stub reads and writes vCPU state and guest memory with the
//! vCPUs still. Resuming hands every vCPU the debugger's settings
//! ([`hypervisor::GuestDebug`]: breakpoints, watchpoints, single-step) and
//! lifts the pause; a vCPU that hits one returns `VcpuExit::Debug`, its
//! thread records the stop in `VmControl` and pauses the VM, and the stub
//! reports it.
//!
//! Invariants:
//! - Nothing a gdb client sends makes the VMM panic: packets are parsed by
//!   `gdbstub`, addresses go through [`translate`] (a software page walk
//!   that answers `None` for anything unmapped or outside RAM), and every
//!   backend error becomes an error reply.
//! - Memory is read and written by *virtual* address through the page
//!   tables of the vCPU gdb has selected (CR0/CR3/CR4/EFER), in pieces that
//!   never cross a page, so a read stops cleanly at the first unmapped page.
//! - Breakpoints never change guest memory: the engine checks a breakpoint
//!   set at block boundaries, KVM uses the debug registers (four in all).
//!   Hardware watchpoints: KVM's are debug registers (1, 2, 4 or 8 aligned
//!   bytes, sharing the four); the engine's watch any range, checked by
//!   its interpreter on every data access while one is set.
//!   With no breakpoint, watchpoint or step set, the guest runs exactly as
//!   without a debugger.
//! - When gdb detaches (or the connection drops), every vCPU's debug state
//!   is cleared and the VM runs on; another gdb may attach later.

use std::io;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use gdbstub::common::{Signal, Tid};
use gdbstub::conn::ConnectionExt;
use gdbstub::stub::run_blocking::{BlockingEventLoop, Event, WaitForStopReasonError};
use gdbstub::stub::{DisconnectReason, GdbStub, MultiThreadStopReason};
use gdbstub::target::ext::base::multithread::{
    MultiThreadBase, MultiThreadResume, MultiThreadResumeOps, MultiThreadSchedulerLocking,
    MultiThreadSchedulerLockingOps, MultiThreadSingleStep, MultiThreadSingleStepOps,
};
use gdbstub::target::ext::base::BaseOps;
use gdbstub::target::ext::breakpoints::{
    Breakpoints, BreakpointsOps, HwBreakpoint, HwBreakpointOps, HwWatchpoint, HwWatchpointOps,
    SwBreakpoint, SwBreakpointOps, WatchKind,
};
use gdbstub::target::ext::monitor_cmd::{ConsoleOutput, MonitorCmd, MonitorCmdOps};
use gdbstub::target::{Target, TargetError, TargetResult};
use gdbstub_arch::x86::reg::X86_64CoreRegs;
use gdbstub_arch::x86::X86_64_SSE;
use hypervisor::{AccelKind, DebugStop, GuestDebug, GuestRam, SpecialRegs, Watchpoint};
use vm_memory::{Bytes, GuestAddress};

use crate::control::ControlError;
use crate::vm::{lock, VmHandle};
use crate::VmExit;
use std::sync::mpsc::Sender;

/// Where the stub listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GdbAddr {
    Tcp(String),
    Unix(PathBuf),
}

impl std::str::FromStr for GdbAddr {
    type Err = String;

    /// `tcp:HOST:PORT`, `unix:PATH`, or a bare PATH (a Unix socket).
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(a) = s.strip_prefix("tcp:") {
            if a.rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
            {
                return Err(format!("--gdb tcp:{a}: expected tcp:HOST:PORT"));
            }
            return Ok(GdbAddr::Tcp(a.to_string()));
        }
        let path = s.strip_prefix("unix:").unwrap_or(s);
        if path.is_empty() {
            return Err("--gdb: expected tcp:HOST:PORT or unix:PATH".into());
        }
        Ok(GdbAddr::Unix(PathBuf::from(path)))
    }
}

impl std::fmt::Display for GdbAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GdbAddr::Tcp(a) => write!(f, "tcp:{a}"),
            GdbAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// `--gdb ADDR [--gdb-wait]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GdbOptions {
    pub addr: GdbAddr,
    /// Hold the guest before its first instruction until gdb attaches
    /// (QEMU's `-S`).
    pub wait: bool,
}

enum Listener {
    Tcp(std::net::TcpListener),
    Unix(UnixListener, PathBuf),
}

type Conn = Box<dyn ConnectionExt<Error = io::Error>>;

impl Listener {
    fn bind(addr: &GdbAddr) -> io::Result<Self> {
        let l = match addr {
            GdbAddr::Tcp(a) => Listener::Tcp(std::net::TcpListener::bind(a)?),
            GdbAddr::Unix(p) => {
                // A socket file left by an earlier run would refuse the bind.
                if std::fs::symlink_metadata(p)
                    .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                {
                    let _ = std::fs::remove_file(p);
                }
                Listener::Unix(UnixListener::bind(p)?, p.clone())
            }
        };
        match &l {
            Listener::Tcp(t) => t.set_nonblocking(true)?,
            Listener::Unix(u, _) => u.set_nonblocking(true)?,
        }
        Ok(l)
    }

    /// A connection, or None if nobody is waiting.
    fn accept(&self) -> io::Result<Option<Conn>> {
        let r: io::Result<Conn> = match self {
            Listener::Tcp(t) => t.accept().and_then(|(s, _)| {
                s.set_nonblocking(false)?;
                Ok(Box::new(s) as Conn)
            }),
            Listener::Unix(u, _) => u.accept().and_then(|(s, _)| {
                s.set_nonblocking(false)?;
                Ok(Box::new(s) as Conn)
            }),
        };
        match r {
            Ok(c) => Ok(Some(c)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The stub's listening thread; it ends with the VM.
pub(crate) struct GdbServer {
    _thread: threads::Handle<()>,
}

impl GdbServer {
    /// Listen on `opts.addr`; with `opts.wait`, pause the VM (before its
    /// vCPU threads start) until gdb attaches.
    pub(crate) fn start(
        opts: &GdbOptions,
        vm: Arc<VmHandle>,
        exits: Sender<VmExit>,
    ) -> Result<Self, String> {
        let listener =
            Listener::bind(&opts.addr).map_err(|e| format!("--gdb {}: {e}", opts.addr))?;
        if opts.wait {
            vm.control
                .debug_pause()
                .map_err(|e| format!("--gdb-wait: cannot hold the VM: {e}"))?;
        }
        // On stderr as well as in the log: whoever starts gdb waits for it.
        eprintln!(
            "vireo: gdb stub listening on {}{}",
            opts.addr,
            if opts.wait {
                " (guest held until gdb attaches)"
            } else {
                ""
            }
        );
        let thread = threads::spawn(threads::Role::Gdb, move || serve(listener, vm, exits))
            .map_err(|e| format!("cannot start the gdb thread: {e}"))?;
        Ok(GdbServer { _thread: thread })
    }
}

fn serve(listener: Listener, vm: Arc<VmHandle>, exits: Sender<VmExit>) {
    while !vm.control.stopping() {
        let conn = match listener.accept() {
            Ok(Some(c)) => c,
            Ok(None) => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => {
                tracing::warn!("gdb: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        match vm.control.debug_pause() {
            Ok(()) => {}
            Err(ControlError::Stopping) => return,
            Err(e) => {
                tracing::warn!("gdb: cannot stop the VM for the debugger: {e}");
                continue;
            }
        }
        tracing::info!("gdb attached");
        let mut target = GdbTarget::new(vm.clone());
        let result = GdbStub::new(conn).run_blocking::<EventLoop>(&mut target);
        match result {
            Ok(DisconnectReason::Kill) => {
                tracing::info!("gdb: kill: the VM stops");
                target.detach();
                let _ = exits.send(VmExit::KilledByDebugger);
                return;
            }
            Ok(r) => tracing::info!("gdb detached ({r:?})"),
            Err(e) => tracing::warn!("gdb session ended: {e}"),
        }
        target.detach();
    }
}

/// What gdb asked each vCPU to do on the next resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Continue,
    Step,
}

struct GdbTarget {
    vm: Arc<VmHandle>,
    actions: Vec<Option<Action>>,
    /// gdb's scheduler locking: vCPUs without an action stay stopped
    /// (otherwise they continue).
    locked: bool,
    sw_breakpoints: Vec<u64>,
    hw_breakpoints: Vec<u64>,
    watchpoints: Vec<Watchpoint>,
}

fn tid(vcpu: u32) -> Tid {
    Tid::new(vcpu as usize + 1).unwrap_or(Tid::MIN)
}

impl GdbTarget {
    fn new(vm: Arc<VmHandle>) -> Self {
        let n = vm.vcpus.len();
        GdbTarget {
            vm,
            actions: vec![None; n],
            locked: false,
            sw_breakpoints: Vec::new(),
            hw_breakpoints: Vec::new(),
            watchpoints: Vec::new(),
        }
    }

    fn vcpu_index(&self, tid: Tid) -> TargetResult<usize, Self> {
        let i = tid.get() - 1;
        if i < self.vm.vcpus.len() {
            Ok(i)
        } else {
            Err(TargetError::NonFatal)
        }
    }

    /// KVM debugs through the four debug registers.
    fn slots_left(&self) -> bool {
        self.vm.accel != AccelKind::Kvm
            || self.sw_breakpoints.len() + self.hw_breakpoints.len() + self.watchpoints.len() < 4
    }

    fn sregs(&self, vcpu: usize) -> TargetResult<SpecialRegs, Self> {
        lock(&self.vm.vcpus[vcpu])
            .get_sregs()
            .map_err(|_| TargetError::NonFatal)
    }

    /// Hand every vCPU the debugger's settings (`step`: which vCPU steps).
    fn arm(&mut self) -> Result<(), String> {
        let mut breakpoints = self.sw_breakpoints.clone();
        breakpoints.extend_from_slice(&self.hw_breakpoints);
        for (i, v) in self.vm.vcpus.iter().enumerate() {
            let dbg = GuestDebug {
                single_step: self.actions[i] == Some(Action::Step),
                breakpoints: breakpoints.clone(),
                watchpoints: self.watchpoints.clone(),
            };
            lock(v)
                .set_guest_debug(&dbg)
                .map_err(|e| format!("vCPU {i}: {e}"))?;
        }
        Ok(())
    }

    /// gdb is gone: clear every vCPU's debug state and let the VM run.
    fn detach(&mut self) {
        self.sw_breakpoints.clear();
        self.hw_breakpoints.clear();
        self.watchpoints.clear();
        self.actions.iter_mut().for_each(|a| *a = None);
        self.locked = false;
        self.vm.control.set_frozen(Vec::new());
        if let Err(e) = self.arm() {
            tracing::warn!("gdb: clearing the debug state: {e}");
        }
        self.vm.control.clear_debug_stops();
        let _ = self.vm.control.resume();
    }

    fn stop_reason(&self, vcpu: u32, stop: DebugStop) -> MultiThreadStopReason<u64> {
        let tid = tid(vcpu);
        match stop {
            DebugStop::Breakpoint(addr) if self.hw_breakpoints.contains(&addr) => {
                MultiThreadStopReason::HwBreak(tid)
            }
            DebugStop::Breakpoint(_) => MultiThreadStopReason::SwBreak(tid),
            DebugStop::Watchpoint(addr) => {
                let kind = self.watchpoints.iter().find(|w| w.addr == addr).map_or(
                    WatchKind::Write,
                    |w| match w.kind {
                        hypervisor::WatchKind::Write => WatchKind::Write,
                        hypervisor::WatchKind::Read => WatchKind::Read,
                        hypervisor::WatchKind::ReadWrite => WatchKind::ReadWrite,
                    },
                );
                MultiThreadStopReason::Watch { tid, kind, addr }
            }
            DebugStop::Step => MultiThreadStopReason::SignalWithThread {
                tid,
                signal: Signal::SIGTRAP,
            },
        }
    }

    /// Copy between guest virtual memory (`vcpu`'s page tables) and `buf`,
    /// a page at a time; how many bytes were copied before the first
    /// address that is unmapped or not RAM.
    fn access(
        &self,
        vcpu: usize,
        addr: u64,
        buf: &mut [u8],
        write: bool,
    ) -> TargetResult<usize, Self> {
        let sregs = self.sregs(vcpu)?;
        let mem = &self.vm.memory;
        let mut done = 0;
        while done < buf.len() {
            let va = addr.wrapping_add(done as u64);
            let in_page = (0x1000 - (va & 0xfff)) as usize;
            let n = in_page.min(buf.len() - done);
            let Some(pa) = translate(mem, &sregs, va) else {
                break;
            };
            let piece = &mut buf[done..done + n];
            let ok = if write {
                mem.write_slice(piece, GuestAddress(pa)).is_ok()
            } else {
                mem.read_slice(piece, GuestAddress(pa)).is_ok()
            };
            if !ok {
                break;
            }
            done += n;
        }
        Ok(done)
    }
}

const PTE_P: u64 = 1;
const PTE_PS: u64 = 1 << 7;
const CR4_PSE: u64 = 1 << 4;
const CR4_LA57: u64 = 1 << 12;
/// Bits 51:12 of a 64-bit paging entry: the next table or the page.
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

fn read_u64(mem: &GuestRam, pa: u64) -> Option<u64> {
    mem.read_obj::<u64>(GuestAddress(pa)).ok()
}

/// Guest virtual address → guest physical, through the page tables that
/// `sregs` names (no paging, 32-bit, PAE, 4- and 5-level), as the CPU would
/// walk them for a supervisor read; None when unmapped or the tables are
/// not in RAM. Access rights are not checked: a debugger may look at
/// anything mapped.
pub fn translate(mem: &GuestRam, sregs: &SpecialRegs, va: u64) -> Option<u64> {
    if sregs.cr0 & hypervisor::CR0_PG == 0 {
        return Some(va & 0xffff_ffff);
    }
    if sregs.efer & hypervisor::EFER_LMA != 0 {
        let levels = if sregs.cr4 & CR4_LA57 != 0 { 5 } else { 4 };
        let mut table = sregs.cr3 & ADDR_MASK;
        for level in (1..=levels).rev() {
            let shift = 12 + 9 * (level - 1);
            let e = read_u64(mem, table + ((va >> shift) & 0x1ff) * 8)?;
            if e & PTE_P == 0 {
                return None;
            }
            if level == 1 || (level <= 3 && e & PTE_PS != 0) {
                let size_mask = (1u64 << shift) - 1;
                return Some((e & ADDR_MASK & !size_mask) | (va & size_mask));
            }
            table = e & ADDR_MASK;
        }
        return None;
    }
    let va = va & 0xffff_ffff;
    if sregs.cr4 & hypervisor::CR4_PAE != 0 {
        let pdpte = read_u64(mem, (sregs.cr3 & 0xffff_ffe0) + (va >> 30) * 8)?;
        if pdpte & PTE_P == 0 {
            return None;
        }
        let pde = read_u64(mem, (pdpte & ADDR_MASK) + ((va >> 21) & 0x1ff) * 8)?;
        if pde & PTE_P == 0 {
            return None;
        }
        if pde & PTE_PS != 0 {
            return Some((pde & ADDR_MASK & !0x1f_ffff) | (va & 0x1f_ffff));
        }
        let pte = read_u64(mem, (pde & ADDR_MASK) + ((va >> 12) & 0x1ff) * 8)?;
        if pte & PTE_P == 0 {
            return None;
        }
        return Some((pte & ADDR_MASK) | (va & 0xfff));
    }
    let read_u32 = |pa: u64| mem.read_obj::<u32>(GuestAddress(pa)).ok().map(u64::from);
    let pde = read_u32((sregs.cr3 & 0xffff_f000) + (va >> 22) * 4)?;
    if pde & PTE_P == 0 {
        return None;
    }
    if pde & PTE_PS != 0 && sregs.cr4 & CR4_PSE != 0 {
        // PSE-36: bits 20:13 are physical address bits 39:32.
        let high = ((pde >> 13) & 0xff) << 32;
        return Some(high | (pde & 0xffc0_0000) | (va & 0x3f_ffff));
    }
    let pte = read_u32((pde & 0xffff_f000) + ((va >> 12) & 0x3ff) * 4)?;
    if pte & PTE_P == 0 {
        return None;
    }
    Some((pte & 0xffff_f000) | (va & 0xfff))
}

impl Target for GdbTarget {
    type Arch = X86_64_SSE;
    type Error = String;

    fn base_ops(&mut self) -> BaseOps<'_, Self::Arch, Self::Error> {
        BaseOps::MultiThread(self)
    }

    fn support_breakpoints(&mut self) -> Option<BreakpointsOps<'_, Self>> {
        Some(self)
    }

    fn support_monitor_cmd(&mut self) -> Option<MonitorCmdOps<'_, Self>> {
        Some(self)
    }
}

impl MultiThreadBase for GdbTarget {
    fn read_registers(&mut self, regs: &mut X86_64CoreRegs, tid: Tid) -> TargetResult<(), Self> {
        let i = self.vcpu_index(tid)?;
        let v = lock(&self.vm.vcpus[i]);
        let r = v.get_regs().map_err(|_| TargetError::NonFatal)?;
        let s = v.get_sregs().map_err(|_| TargetError::NonFatal)?;
        // gdb's order: rax rbx rcx rdx rsi rdi rbp rsp r8-r15.
        regs.regs = [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ];
        regs.rip = r.rip;
        regs.eflags = r.rflags as u32;
        regs.segments.cs = s.cs.selector as u32;
        regs.segments.ss = s.ss.selector as u32;
        regs.segments.ds = s.ds.selector as u32;
        regs.segments.es = s.es.selector as u32;
        regs.segments.fs = s.fs.selector as u32;
        regs.segments.gs = s.gs.selector as u32;
        Ok(())
    }

    fn write_registers(&mut self, regs: &X86_64CoreRegs, tid: Tid) -> TargetResult<(), Self> {
        let i = self.vcpu_index(tid)?;
        let mut v = lock(&self.vm.vcpus[i]);
        let mut r = v.get_regs().map_err(|_| TargetError::NonFatal)?;
        let g = &regs.regs;
        (r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.rsp) =
            (g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]);
        (r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15) =
            (g[8], g[9], g[10], g[11], g[12], g[13], g[14], g[15]);
        r.rip = regs.rip;
        // The upper half of RFLAGS is reserved (zero); bit 1 always reads 1.
        r.rflags = (regs.eflags as u64) | 2;
        // Segment selectors are not written: loading one means loading its
        // descriptor, which the guest does, not the debugger.
        v.set_regs(&r).map_err(|_| TargetError::NonFatal)
    }

    fn read_addrs(&mut self, start: u64, data: &mut [u8], tid: Tid) -> TargetResult<usize, Self> {
        let i = self.vcpu_index(tid)?;
        match self.access(i, start, data, false)? {
            0 if !data.is_empty() => Err(TargetError::Errno(14)),
            n => Ok(n),
        }
    }

    fn write_addrs(&mut self, start: u64, data: &[u8], tid: Tid) -> TargetResult<(), Self> {
        let i = self.vcpu_index(tid)?;
        let mut buf = data.to_vec();
        if self.access(i, start, &mut buf, true)? == data.len() {
            Ok(())
        } else {
            Err(TargetError::Errno(14))
        }
    }

    fn list_active_threads(
        &mut self,
        thread_is_active: &mut dyn FnMut(Tid),
    ) -> Result<(), Self::Error> {
        for i in 0..self.vm.vcpus.len() {
            thread_is_active(tid(i as u32));
        }
        Ok(())
    }

    fn support_resume(&mut self) -> Option<MultiThreadResumeOps<'_, Self>> {
        Some(self)
    }
}

impl MultiThreadResume for GdbTarget {
    fn resume(&mut self) -> Result<(), Self::Error> {
        // A stop another vCPU reported meanwhile is reported next, before
        // anything runs again (all-stop: gdb hears of every hit).
        if self.vm.control.has_debug_stop() {
            return Ok(());
        }
        self.arm()?;
        let frozen = if self.locked {
            self.actions.iter().map(Option::is_none).collect()
        } else {
            Vec::new()
        };
        self.vm.control.set_frozen(frozen);
        match self.vm.control.resume() {
            Ok(()) | Err(ControlError::NotPaused) => Ok(()),
            Err(e) => Err(format!("cannot resume the VM: {e}")),
        }
    }

    fn clear_resume_actions(&mut self) -> Result<(), Self::Error> {
        self.actions.iter_mut().for_each(|a| *a = None);
        self.locked = false;
        Ok(())
    }

    fn support_scheduler_locking(&mut self) -> Option<MultiThreadSchedulerLockingOps<'_, Self>> {
        Some(self)
    }

    fn set_resume_action_continue(
        &mut self,
        tid: Tid,
        _signal: Option<Signal>,
    ) -> Result<(), Self::Error> {
        // Signals have no meaning for a whole machine: not injected.
        if let Some(a) = self.actions.get_mut(tid.get() - 1) {
            *a = Some(Action::Continue);
        }
        Ok(())
    }

    fn support_single_step(&mut self) -> Option<MultiThreadSingleStepOps<'_, Self>> {
        Some(self)
    }
}

impl MultiThreadSingleStep for GdbTarget {
    fn set_resume_action_step(
        &mut self,
        tid: Tid,
        _signal: Option<Signal>,
    ) -> Result<(), Self::Error> {
        if let Some(a) = self.actions.get_mut(tid.get() - 1) {
            *a = Some(Action::Step);
        }
        Ok(())
    }
}

impl MultiThreadSchedulerLocking for GdbTarget {
    fn set_resume_action_scheduler_lock(&mut self) -> Result<(), Self::Error> {
        self.locked = true;
        Ok(())
    }
}

impl Breakpoints for GdbTarget {
    fn support_sw_breakpoint(&mut self) -> Option<SwBreakpointOps<'_, Self>> {
        Some(self)
    }

    fn support_hw_breakpoint(&mut self) -> Option<HwBreakpointOps<'_, Self>> {
        Some(self)
    }

    fn support_hw_watchpoint(&mut self) -> Option<HwWatchpointOps<'_, Self>> {
        Some(self)
    }
}

impl SwBreakpoint for GdbTarget {
    fn add_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        // Software breakpoints are kept by the VMM, never written into guest
        // memory (an INT3 there would be handed to the guest under KVM).
        let slots = self.slots_left();
        add_breakpoint(&mut self.sw_breakpoints, addr, slots)
    }

    fn remove_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        Ok(remove_breakpoint(&mut self.sw_breakpoints, addr))
    }
}

impl HwBreakpoint for GdbTarget {
    fn add_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        let slots = self.slots_left();
        add_breakpoint(&mut self.hw_breakpoints, addr, slots)
    }

    fn remove_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        Ok(remove_breakpoint(&mut self.hw_breakpoints, addr))
    }
}

/// Add `addr` to a breakpoint list. With no slot left the answer is an
/// error (ENOSPC), not "unsupported": gdb would otherwise fall back to
/// writing INT3 into guest memory.
fn add_breakpoint(
    list: &mut Vec<u64>,
    addr: u64,
    slots_left: bool,
) -> TargetResult<bool, GdbTarget> {
    if list.contains(&addr) {
        return Ok(true);
    }
    if !slots_left {
        return Err(TargetError::Errno(28));
    }
    list.push(addr);
    Ok(true)
}

/// Remove `addr` from a breakpoint list: whether it was there.
fn remove_breakpoint(list: &mut Vec<u64>, addr: u64) -> bool {
    let before = list.len();
    list.retain(|&a| a != addr);
    list.len() != before
}

fn watch_kind(kind: WatchKind) -> hypervisor::WatchKind {
    match kind {
        WatchKind::Write => hypervisor::WatchKind::Write,
        WatchKind::Read => hypervisor::WatchKind::Read,
        WatchKind::ReadWrite => hypervisor::WatchKind::ReadWrite,
    }
}

impl HwWatchpoint for GdbTarget {
    fn add_hw_watchpoint(
        &mut self,
        addr: u64,
        len: u64,
        kind: WatchKind,
    ) -> TargetResult<bool, Self> {
        // Debug registers watch 1, 2, 4 or 8 aligned bytes; the engine any
        // range.
        let dr_shape = matches!(len, 1 | 2 | 4 | 8) && addr.is_multiple_of(len);
        if len == 0 || (self.vm.accel == AccelKind::Kvm && !dr_shape) || !self.slots_left() {
            return Ok(false);
        }
        self.watchpoints.push(Watchpoint {
            addr,
            len,
            kind: watch_kind(kind),
        });
        Ok(true)
    }

    fn remove_hw_watchpoint(
        &mut self,
        addr: u64,
        len: u64,
        kind: WatchKind,
    ) -> TargetResult<bool, Self> {
        let w = Watchpoint {
            addr,
            len,
            kind: watch_kind(kind),
        };
        let before = self.watchpoints.len();
        self.watchpoints.retain(|x| *x != w);
        Ok(self.watchpoints.len() != before)
    }
}

impl MonitorCmd for GdbTarget {
    /// `monitor regs`: the system registers gdb's x86-64 description has
    /// no place for (control registers, EFER, segment bases, descriptor
    /// tables), per vCPU.
    fn handle_monitor_cmd(
        &mut self,
        cmd: &[u8],
        mut out: ConsoleOutput<'_>,
    ) -> Result<(), Self::Error> {
        use std::fmt::Write;
        match cmd {
            b"regs" | b"sregs" => {
                for (i, v) in self.vm.vcpus.iter().enumerate() {
                    match lock(v).get_sregs() {
                        Ok(s) => {
                            let _ = writeln!(
                                out,
                                "vCPU {i}: cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} cr8 {:#x} efer {:#x}\n  \
                                 cs {:#x} base {:#x}  ss {:#x}  fs base {:#x}  gs base {:#x}\n  \
                                 gdt {:#x}/{:#x}  idt {:#x}/{:#x}  tr {:#x}  ldt {:#x}  apic base {:#x}",
                                s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer, s.cs.selector, s.cs.base,
                                s.ss.selector, s.fs.base, s.gs.base, s.gdt.base, s.gdt.limit,
                                s.idt.base, s.idt.limit, s.tr.selector, s.ldt.selector, s.apic_base
                            );
                        }
                        Err(e) => {
                            let _ = writeln!(out, "vCPU {i}: {e}");
                        }
                    }
                }
            }
            _ => {
                let _ = writeln!(
                    out,
                    "Vireo's gdb stub; monitor commands:\n  regs  control registers, EFER, segment bases, GDT/IDT of every vCPU"
                );
            }
        }
        Ok(())
    }
}

/// How the stub waits while the guest runs: for a vCPU's debug stop, for
/// gdb's interrupt (Ctrl-C) or other data, or for the VM's end.
enum EventLoop {}

impl BlockingEventLoop for EventLoop {
    type Target = GdbTarget;
    type Connection = Conn;
    type StopReason = MultiThreadStopReason<u64>;

    fn wait_for_stop_reason(
        target: &mut GdbTarget,
        conn: &mut Conn,
    ) -> Result<Event<Self::StopReason>, WaitForStopReasonError<String, io::Error>> {
        loop {
            if let Some((vcpu, stop)) = target.vm.control.take_debug_stop() {
                // Every vCPU parks before gdb looks.
                if let Err(e) = target.vm.control.debug_pause() {
                    if e == ControlError::Stopping {
                        return Ok(Event::TargetStopped(MultiThreadStopReason::Exited(0)));
                    }
                    return Err(WaitForStopReasonError::Target(format!(
                        "cannot stop the VM: {e}"
                    )));
                }
                return Ok(Event::TargetStopped(target.stop_reason(vcpu, stop)));
            }
            if target.vm.control.stopping() {
                return Ok(Event::TargetStopped(MultiThreadStopReason::Exited(0)));
            }
            match conn.peek() {
                Ok(Some(_)) => {
                    let byte = conn.read().map_err(WaitForStopReasonError::Connection)?;
                    return Ok(Event::IncomingData(byte));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(2)),
                Err(e) => return Err(WaitForStopReasonError::Connection(e)),
            }
        }
    }

    fn on_interrupt(target: &mut GdbTarget) -> Result<Option<Self::StopReason>, String> {
        match target.vm.control.debug_pause() {
            Ok(()) => Ok(Some(MultiThreadStopReason::SignalWithThread {
                tid: tid(0),
                signal: Signal::SIGINT,
            })),
            Err(ControlError::Stopping) => Ok(Some(MultiThreadStopReason::Exited(0))),
            Err(e) => Err(format!("cannot stop the VM: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse() {
        assert_eq!(
            "tcp:127.0.0.1:1234".parse::<GdbAddr>(),
            Ok(GdbAddr::Tcp("127.0.0.1:1234".into()))
        );
        assert_eq!(
            "unix:/tmp/g.sock".parse::<GdbAddr>(),
            Ok(GdbAddr::Unix("/tmp/g.sock".into()))
        );
        assert_eq!(
            "/tmp/g.sock".parse::<GdbAddr>(),
            Ok(GdbAddr::Unix("/tmp/g.sock".into()))
        );
        assert!("tcp:1234".parse::<GdbAddr>().is_err());
        assert!("tcp:host:notaport".parse::<GdbAddr>().is_err());
        assert!("unix:".parse::<GdbAddr>().is_err());
    }

    fn ram() -> GuestRam {
        GuestRam::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn four_level_walk_finds_4k_and_2m_pages_and_refuses_holes() {
        let mem = ram();
        // PML4 at 0x1000 -> PDPT at 0x2000 -> PD at 0x3000 -> PT at 0x4000.
        let va: u64 = 0xffff_8000_0040_1234;
        let pml4i = (va >> 39) & 0x1ff;
        let pdpti = (va >> 30) & 0x1ff;
        let pdi = (va >> 21) & 0x1ff;
        let pti = (va >> 12) & 0x1ff;
        mem.write_obj(0x2003u64, GuestAddress(0x1000 + pml4i * 8))
            .unwrap();
        mem.write_obj(0x3003u64, GuestAddress(0x2000 + pdpti * 8))
            .unwrap();
        mem.write_obj(0x4003u64, GuestAddress(0x3000 + pdi * 8))
            .unwrap();
        mem.write_obj(0x7_8003u64, GuestAddress(0x4000 + pti * 8))
            .unwrap();
        // The next 2 MiB: a large page at 0x20_0000 (outside this RAM).
        mem.write_obj(0x20_0083u64, GuestAddress(0x3000 + (pdi + 1) * 8))
            .unwrap();
        let sregs = SpecialRegs {
            cr0: hypervisor::CR0_PG | hypervisor::CR0_PE,
            cr3: 0x1000,
            cr4: hypervisor::CR4_PAE,
            efer: hypervisor::EFER_LMA | hypervisor::EFER_LME,
            ..Default::default()
        };
        assert_eq!(translate(&mem, &sregs, va), Some(0x7_8234));
        // va's offset in its 2 MiB region is 0x1234.
        assert_eq!(
            translate(&mem, &sregs, va + 0x20_0000),
            Some(0x20_0000 + 0x1234)
        );
        // Not present, and a table pointer outside RAM.
        assert_eq!(translate(&mem, &sregs, va + 0x1000), None);
        mem.write_obj(0x4000_0003u64, GuestAddress(0x1000)).unwrap();
        assert_eq!(translate(&mem, &sregs, 0x1000), None);
        // Paging off: physical = linear.
        let flat = SpecialRegs::default();
        assert_eq!(translate(&mem, &flat, 0x1234), Some(0x1234));
    }
}
