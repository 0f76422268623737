//! Debug exceptions (#DB): the single-step trap (RFLAGS.TF), the four
//! hardware breakpoints DR0-DR3 as DR7 enables them (instruction
//! breakpoints as faults, data watchpoints as traps), DR7.GD (general
//! detect, a fault raised by `exec::system`), DR6 status and RFLAGS.RF.
//!
//! Invariants:
//! - Debugging is *armed* while TF is set or DR7 enables a breakpoint
//!   (any L0-L3/G0-G3 bit). Only then does the run loop go one
//!   interpreted instruction at a time ([`Core::debug_armed`]); the
//!   translator never runs armed code, so its inline memory paths need no
//!   watchpoint checks. Unarmed, the cost is one test per block.
//! - Watchpoint hits are collected by the interpreter's linear accesses
//!   ([`Core::watch`]) into `DebugState::hits` and turned into one #DB
//!   trap after the instruction completes, together with a single-step
//!   trap if TF was set when it started.
//! - I/O breakpoints (DR7 R/W = 10, honoured while CR4.DE is set) are
//!   matched by IN, OUT, INS and OUTS ([`Core::watch_io`]) against the
//!   port range they access, and reported like data watchpoints.
//! - After MOV SS and POP SS the traps of that instruction (single step,
//!   data and I/O watchpoints) wait for the end of the next instruction
//!   and are reported together with its own (`DebugState::delayed`), so a
//!   stack switch (`mov ss; mov rsp`) is never interrupted by #DB.
//! - An instruction breakpoint is checked before the instruction runs and
//!   is suppressed by RF; RF is cleared once an instruction that started
//!   with it completes.
//!   Faults save RFLAGS with RF set (see [`crate::exception`]) so that
//!   returning to the faulting instruction does not hit its breakpoint again.
//!
//! The host debugger (the gdb stub, through `Vcpu::set_guest_debug`) is
//! separate from all of the above and invisible to the guest
//! ([`HostDebug`]):
//! - While it has breakpoints or steps, the run loop looks at RIP before
//!   every block ([`Core::host_debug_check`]), and a block that holds a
//!   breakpoint past its first instruction is cut short before it (run by
//!   the interpreter, which can stop mid-block). Compiled blocks are not
//!   linked to each other meanwhile, and arming flushes the caches, so no
//!   compiled code runs past a breakpoint without coming back to the loop.
//! - A breakpoint reports [`DebugStop::Breakpoint`] before its instruction
//!   runs; the next run starts by executing that instruction (the host's
//!   RF), so continuing from a breakpoint does not stop on it again.
//! - Watchpoints ([`HostDebug::watchpoints`]) make the run loop go one
//!   interpreted instruction at a time, as guest watchpoints do
//!   ([`Core::debug_armed`]); the interpreter's linear accesses note a hit
//!   ([`Core::watch`]) and the instruction, once completed, stops with
//!   [`DebugStop::Watchpoint`] (after the access, as on hardware). A guest
//!   #DB the same instruction raises is delivered first.
//! - Unarmed (no debugger, or one with nothing set) the cost is one test
//!   of a flag per block.

use crate::core::{Core, RunExit};
use crate::cpu::{FLAG_RF, FLAG_TF};
use crate::exception::Kind;
use hypervisor::{DebugStop, GuestDebug, WatchKind, Watchpoint};

/// The host debugger's state in one vCPU (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct HostDebug {
    /// Single-step or breakpoints are set: the run loop looks.
    pub armed: bool,
    pub step: bool,
    /// Sorted RIPs.
    pub breakpoints: Vec<u64>,
    /// The breakpoint at this RIP was reported: the next instruction
    /// there runs without stopping again.
    pub resume_at: Option<u64>,
    /// Linear ranges watched for the debugger.
    pub watchpoints: Vec<Watchpoint>,
    /// The watchpoint (its address) the current instruction hit.
    pub watch_hit: Option<u64>,
}

impl HostDebug {
    fn hit(&self, rip: u64) -> bool {
        self.breakpoints.binary_search(&rip).is_ok()
    }
}

/// DR6 bits.
pub const DR6_BS: u64 = 1 << 14;
/// DR6.BD: the #DB came from DR7.GD (general detect).
pub const DR6_BD: u64 = 1 << 13;
/// DR7.GD: MOV to or from a debug register raises #DB.
pub const DR7_GD: u64 = 1 << 13;
/// DR6 bits that always read as one (the reserved ones).
pub const DR6_FIXED1: u64 = 0xffff_0ff0;

/// Per-vCPU debug bookkeeping between two instructions.
#[derive(Debug, Clone, Copy, Default)]
pub struct DebugState {
    /// DR6.B0-B3 bits of data watchpoints hit by the current instruction.
    pub hits: u64,
    /// The current instruction delivered a software interrupt (INT n,
    /// INT3, INTO, INT1): no single-step trap after it, since the gate
    /// cleared TF on the way in.
    pub no_step: bool,
    /// RF was set when the instruction started: it is cleared once the
    /// instruction completes (an IRET or POPF that loads RF keeps it).
    pub rf: bool,
    /// The current instruction loaded SS (MOV SS, POP SS): its traps wait.
    pub ss_load: bool,
    /// DR6 status of traps held back by a MOV SS / POP SS, reported after
    /// the instruction that follows it.
    pub delayed: u64,
}

/// DR7 R/W field of breakpoint `i`: 0 instruction, 1 write, 2 I/O, 3
/// read or write.
fn rw(dr7: u64, i: usize) -> u64 {
    (dr7 >> (16 + 4 * i)) & 3
}

/// Length in bytes of breakpoint `i` (DR7 LEN: 1, 2, 8, 4).
fn len(dr7: u64, i: usize) -> u64 {
    match (dr7 >> (18 + 4 * i)) & 3 {
        0 => 1,
        1 => 2,
        2 => 8,
        _ => 4,
    }
}

fn enabled(dr7: u64, i: usize) -> bool {
    dr7 & (3 << (2 * i)) != 0
}

impl Core {
    /// Is anything armed that the run loop must look at per instruction?
    #[inline(always)]
    pub fn debug_armed(&self) -> bool {
        self.st.rflags & FLAG_TF != 0 || self.watching()
    }

    /// Must linear data accesses be checked against watchpoints (the
    /// guest's DR7 or the host debugger's)?
    #[inline(always)]
    pub fn watching(&self) -> bool {
        self.st.dr[7] & 0xff != 0 || !self.host_debug.watchpoints.is_empty()
    }

    /// A data access of `size` bytes at linear `lin` (`write`: a store):
    /// note the watchpoints it hits. Called by the interpreter's memory
    /// path only while DR7 enables a breakpoint.
    #[cold]
    pub fn watch(&mut self, lin: u64, size: u8, write: bool) {
        let a_end = lin.wrapping_add(size as u64);
        for w in &self.host_debug.watchpoints {
            let kind_hit = match w.kind {
                WatchKind::Write => write,
                WatchKind::Read => !write,
                WatchKind::ReadWrite => true,
            };
            if kind_hit && lin < w.addr.wrapping_add(w.len) && w.addr < a_end {
                self.host_debug.watch_hit.get_or_insert(w.addr);
            }
        }
        let dr7 = self.st.dr[7];
        for i in 0..4 {
            if !enabled(dr7, i) {
                continue;
            }
            let kind = rw(dr7, i);
            if kind == 0 || kind == 2 || (kind == 1 && !write) {
                continue;
            }
            let l = len(dr7, i);
            // The breakpoint covers its length-aligned range.
            let start = self.st.dr[i] & !(l - 1);
            let end = start.wrapping_add(l);
            if lin < end && start < a_end {
                self.debug.hits |= 1 << i;
            }
        }
    }

    /// An IN, OUT, INS or OUTS of `size` bytes at `port` (DR7 enables a
    /// breakpoint): note the I/O breakpoints it hits. They exist only
    /// while CR4.DE is set (without it R/W = 10 is undefined and ignored).
    #[cold]
    pub fn watch_io(&mut self, port: u16, size: u8) {
        let dr7 = self.st.dr[7];
        if self.st.cr4 & crate::cpu::CR4_DE == 0 {
            return;
        }
        let (lo, hi) = (port as u64, port as u64 + size as u64);
        for i in 0..4 {
            if !enabled(dr7, i) || rw(dr7, i) != 2 {
                continue;
            }
            let l = len(dr7, i);
            let start = (self.st.dr[i] & 0xffff) & !(l - 1);
            if lo < start + l && start < hi {
                self.debug.hits |= 1 << i;
            }
        }
    }

    /// Before the instruction at RIP runs (armed): an enabled instruction
    /// breakpoint on its linear address raises #DB as a fault, unless RF
    /// is set. What delivery exits with, if anything, in `Some`.
    pub(crate) fn debug_before(&mut self) -> Option<Option<RunExit>> {
        let dr7 = self.st.dr[7];
        self.debug = DebugState {
            rf: self.st.rflags & FLAG_RF != 0,
            delayed: self.debug.delayed,
            ..Default::default()
        };
        if dr7 & 0xff == 0 || self.debug.rf {
            return None;
        }
        let lin = self.rip_lin();
        let mut hit = 0;
        for i in 0..4 {
            if enabled(dr7, i) && rw(dr7, i) == 0 && self.st.dr[i] == lin {
                hit |= 1 << i;
            }
        }
        if hit == 0 {
            return None;
        }
        self.st.dr[6] = (self.st.dr[6] & !0xf) | hit | DR6_FIXED1;
        // Delivered like an external event: the frame returns to this
        // instruction, and RF is not set in it (the handler sets RF to
        // continue).
        Some(self.deliver_and_check(1, None, Kind::External))
    }

    /// After one instruction ran (armed): `completed` if it retired.
    /// Raises the #DB trap for a single step (TF set when it started)
    /// and data watchpoints hit, and clears RF.
    pub(crate) fn debug_after(&mut self, tf_before: bool, completed: bool) -> Option<RunExit> {
        let host_hit = self.host_debug.watch_hit.take();
        let delayed = self.debug.delayed;
        if !completed {
            // Traps held back by MOV SS wait for an instruction that
            // completes (the rerun of one that left for the VMM).
            self.debug = DebugState {
                delayed,
                ..Default::default()
            };
            return None;
        }
        if self.debug.rf {
            self.st.rflags &= !FLAG_RF;
        }
        let mut status = self.debug.hits;
        if tf_before && !self.debug.no_step {
            status |= DR6_BS;
        }
        let host_stop = host_hit.map(|a| RunExit::Debug(DebugStop::Watchpoint(a)));
        if self.debug.ss_load {
            self.debug = DebugState {
                delayed: delayed | status,
                ..Default::default()
            };
            return host_stop;
        }
        status |= delayed;
        self.debug = DebugState::default();
        if status == 0 {
            return host_stop;
        }
        self.st.dr[6] = (self.st.dr[6] & !0xf) | status | DR6_FIXED1;
        self.deliver_and_check(1, None, Kind::External)
            .or(host_stop)
    }

    /// Take the host debugger's settings (from the VMM, vCPU stopped).
    pub fn set_host_debug(&mut self, dbg: &GuestDebug) {
        let mut breakpoints = dbg.breakpoints.clone();
        breakpoints.sort_unstable();
        breakpoints.dedup();
        let resume_at = self.host_debug.resume_at.filter(|&r| r == self.st.rip);
        self.host_debug = HostDebug {
            armed: dbg.single_step || !breakpoints.is_empty(),
            step: dbg.single_step,
            breakpoints,
            resume_at,
            watchpoints: dbg.watchpoints.clone(),
            watch_hit: None,
        };
        // Compiled code may be linked past a new breakpoint, and the
        // debugger may have written code: start from a clean cache.
        self.flush_all_caches();
    }

    /// Before a block (host debugging armed): a breakpoint at RIP stops
    /// here, unless it was just reported or the debugger steps.
    pub(crate) fn host_debug_check(&mut self) -> Option<RunExit> {
        let rip = self.st.rip;
        let resumed = self.host_debug.resume_at.take() == Some(rip);
        if !resumed && !self.host_debug.step && self.host_debug.hit(rip) {
            self.host_debug.resume_at = Some(rip);
            return Some(RunExit::Debug(DebugStop::Breakpoint(rip)));
        }
        None
    }

    /// How many instructions of a block starting at `rip` run before a
    /// host breakpoint (past its first instruction); `usize::MAX` if none.
    pub(crate) fn host_debug_limit(&self, rip: u64, uops: &[crate::frontend::uop::Uop]) -> usize {
        if self.host_debug.step {
            return 1;
        }
        let mut ip = rip;
        for (n, u) in uops.iter().enumerate() {
            if n > 0 && self.host_debug.hit(ip) {
                return n;
            }
            ip = u.next_ip;
        }
        usize::MAX
    }
}
