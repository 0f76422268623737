//! One vCPU's engine: state + TLB + block cache, memory access through
//! segments and paging, and the run loop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::cpu::{CpuState, CR0_WP, CS, FLAG_IF, SS};
use crate::decode::BlockCache;
use crate::irq::InterruptController;
use crate::mem::{cas, load, store, MemView};
use crate::mmu::{tlb_allows, walk, Access, Tlb, TlbEntry};

/// Why an instruction did not complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exc {
    /// An architectural exception, delivered through the IDT.
    Fault { vector: u8, error: Option<u32> },
    /// A page fault at `addr` (CR2) with its error code.
    PageFault { addr: u64, error: u32 },
    /// The instruction needs data from the VMM (IN, MMIO read): it is
    /// restarted once the data is there. The request is in `Core::io`.
    Exit,
    /// Something the engine does not implement. Boxed so `Result<(), Exc>`
    /// stays two registers wide on the hot path.
    Unimplemented(Box<String>),
    /// Triple fault.
    Shutdown,
}

pub type R<T = ()> = Result<T, Exc>;

impl Exc {
    pub fn unimplemented(reason: impl Into<String>) -> Exc {
        Exc::Unimplemented(Box::new(reason.into()))
    }
}

#[inline]
pub fn gp(error: u32) -> Exc {
    Exc::Fault {
        vector: 13,
        error: Some(error),
    }
}

#[inline]
pub fn ud() -> Exc {
    Exc::Fault {
        vector: 6,
        error: None,
    }
}

#[inline]
pub fn fault(vector: u8, error: Option<u32>) -> Exc {
    Exc::Fault { vector, error }
}

/// A request for the VMM, produced while executing an instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReq {
    IoIn { port: u16, size: u8 },
    IoOut { port: u16, size: u8, data: u64 },
    MmioRead { addr: u64, size: u8 },
    MmioWrite { addr: u64, size: u8, data: u64 },
}

/// Data the VMM supplied for a read exit, consumed when the instruction reruns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadResponse {
    pub is_io: bool,
    pub addr: u64,
    pub size: u8,
    pub data: u64,
}

#[derive(Debug, Default)]
pub struct IoExchange {
    pub request: Option<ExitReq>,
    pub response: Option<ReadResponse>,
}

/// What the run loop hands back to the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunExit {
    Io(ExitReq),
    Halt,
    Shutdown,
    Interrupted,
    Internal { reason: String, rip: u64 },
}

/// The block that just ended normally (no exception, no mode or privilege
/// change), for chaining; only ever dereferenced by the owning vCPU while
/// its block cache holds the block.
#[derive(Clone, Copy)]
pub struct BlockPtr(pub *const crate::decode::Block);

impl BlockPtr {
    pub const NONE: BlockPtr = BlockPtr(std::ptr::null());
}

// SAFETY: the pointer is only dereferenced on the thread running the vCPU,
// into that vCPU's own block cache.
unsafe impl Send for BlockPtr {}

/// Blocks run between interrupt-controller polls when nothing asked for one
/// (a timer interrupt can be this late by a few microseconds).
pub const POLL_INTERVAL: u32 = 64;

pub struct Core {
    pub st: CpuState,
    pub mem: MemView,
    pub tlb: Tlb,
    pub blocks: BlockCache,
    pub index: u32,
    pub intc: Arc<dyn InterruptController>,
    pub kick: Arc<AtomicBool>,
    pub io: IoExchange,
    /// RIP after the current instruction; branches overwrite it.
    pub next_rip: u64,
    /// Stop the current block after this instruction (mode change, SMC, ...).
    pub end_block: bool,
    /// Interrupts are inhibited for one instruction (after STI, MOV SS).
    pub int_shadow: bool,
    pub halted: bool,
    /// Instructions retired, for tests and statistics.
    pub icount: u64,
    /// Exception currently being delivered (for #DF / triple-fault rules).
    pub delivering: Option<u8>,
    /// An NMI handler is running: further NMIs wait for its IRET.
    pub nmi_blocked: bool,
    /// In wait-for-SIPI state (an AP before start-up, or after INIT).
    pub wait_for_sipi: bool,
    /// Chaining: the previous block, if it ended normally.
    pub prev_block: BlockPtr,
    /// Recent events for post-mortem debugging (block starts and
    /// exceptions), oldest overwritten first.
    pub history: History,
    /// Debugging: print every block start to stderr (set by the embedder).
    pub trace: bool,
    /// What CPUID advertises beyond the fixed base set.
    pub cpuid: crate::cpuid::CpuidConfig,
    /// Set (from any thread) after making an interrupt pending for this
    /// vCPU: it polls the controller at its next block boundary.
    pub attention: Arc<AtomicBool>,
    /// Poll the controller before the next block (IF may have become 1,
    /// the TPR or an EOI may have changed what is deliverable).
    pub poll_now: bool,
    pub(crate) poll_countdown: u32,
    /// The PC platform (LAPIC, IOAPIC, PIC, PIT, kvmclock) this vCPU is
    /// wired to; `None` for a bare CPU whose devices are all in the VMM.
    pub pc: Option<Box<crate::pc::PcVcpu>>,
    /// The translating tier (hot 64-bit blocks compiled to host code).
    pub jit: crate::jit::Jit,
}

/// A small ring of recent block start RIPs and exceptions.
#[derive(Debug, Clone)]
pub struct History {
    pub entries: [(u64, u32); 64],
    pub next: usize,
}

impl Default for History {
    fn default() -> Self {
        History {
            entries: [(0, 0); 64],
            next: 0,
        }
    }
}

/// History tag for a block start (other values: 0x100 + exception vector).
pub const HIST_BLOCK: u32 = 0;

impl History {
    #[inline(always)]
    pub fn push(&mut self, rip: u64, tag: u32) {
        self.entries[self.next & 63] = (rip, tag);
        self.next = self.next.wrapping_add(1);
    }

    /// Entries oldest first.
    pub fn recent(&self) -> Vec<(u64, u32)> {
        (0..64)
            .map(|i| self.entries[(self.next + i) & 63])
            .filter(|e| *e != (0, 0))
            .collect()
    }
}

impl Core {
    pub fn new(index: u32, mem: MemView, intc: Arc<dyn InterruptController>) -> Core {
        Self::with_cpuid(index, mem, intc, crate::cpuid::CpuidConfig::default())
    }

    pub fn with_cpuid(
        index: u32,
        mem: MemView,
        intc: Arc<dyn InterruptController>,
        cpuid: crate::cpuid::CpuidConfig,
    ) -> Core {
        Core {
            st: CpuState::reset(),
            mem,
            tlb: Tlb::default(),
            blocks: BlockCache::default(),
            index,
            intc,
            kick: Arc::new(AtomicBool::new(false)),
            io: IoExchange::default(),
            next_rip: 0,
            end_block: false,
            int_shadow: false,
            halted: false,
            icount: 0,
            delivering: None,
            nmi_blocked: false,
            wait_for_sipi: false,
            prev_block: BlockPtr::NONE,
            history: History::default(),
            trace: false,
            cpuid,
            attention: Arc::new(AtomicBool::new(false)),
            poll_now: true,
            poll_countdown: 0,
            pc: None,
            jit: crate::jit::Jit::default(),
        }
    }

    // ---------------------------------------------------------------- paging

    #[inline(always)]
    pub fn user(&self) -> bool {
        self.st.cpl() == 3
    }

    #[inline(always)]
    fn tlb_entry(&mut self, lin: u64, acc: Access, user: bool) -> R<TlbEntry> {
        if let Some(e) = self.tlb.lookup(lin) {
            if tlb_allows(e.perm, acc, user, self.st.cr0 & CR0_WP != 0) {
                return Ok(*e);
            }
        }
        self.tlb_fill(lin, acc, user)
    }

    #[cold]
    fn tlb_fill(&mut self, lin: u64, acc: Access, user: bool) -> R<TlbEntry> {
        match walk(&self.st, &self.mem, lin, acc, user) {
            Ok(t) if self.st.long_mode() && ((lin << 16) as i64 >> 16) as u64 != lin => {
                // Not cached: the translated code's inline TLB lookup relies
                // on never finding a non-canonical address there.
                Ok(TlbEntry {
                    tag: 0,
                    phys: t.page,
                    host: self
                        .mem
                        .ram_ptr(t.page, 4096)
                        .unwrap_or(std::ptr::null_mut()),
                    code: self.mem.code_flag(t.page),
                    perm: t.perm,
                })
            }
            Ok(t) => {
                let e = TlbEntry {
                    tag: (lin & !0xfff) | 1,
                    phys: t.page,
                    host: self
                        .mem
                        .ram_ptr(t.page, 4096)
                        .unwrap_or(std::ptr::null_mut()),
                    code: self.mem.code_flag(t.page),
                    perm: t.perm,
                };
                self.tlb.entries[Tlb::index(lin)] = e;
                Ok(e)
            }
            Err(error) => Err(Exc::PageFault { addr: lin, error }),
        }
    }

    /// Host address of `lin` if it is in RAM and the access is allowed,
    /// with whether writes there must go through code/dirty tracking;
    /// None on a fault or MMIO (the caller takes its slow path, which
    /// raises the fault).
    pub(crate) fn ram_ptr_lin(
        &mut self,
        lin: u64,
        acc: Access,
        user: bool,
    ) -> Option<(*mut u8, bool)> {
        let e = self.tlb_entry(lin, acc, user).ok()?;
        if e.host.is_null() {
            return None;
        }
        // SAFETY: RAM entries have their page's flag (see `tlb_fill`).
        let tracked = unsafe { (*e.code).load(Ordering::Relaxed) } != 0;
        // SAFETY: inside the entry's 4 KiB page.
        Some((unsafe { e.host.add((lin & 0xfff) as usize) }, tracked))
    }

    /// Translate a linear address to physical without side effects on the TLB.
    pub fn translate(&mut self, lin: u64, acc: Access, user: bool) -> R<u64> {
        Ok(self.tlb_entry(lin, acc, user)?.phys | (lin & 0xfff))
    }

    /// Host pointer to the page of `lin` for code fetch, or the physical page.
    pub fn fetch_entry(&mut self, lin: u64) -> R<TlbEntry> {
        let user = self.user();
        self.tlb_entry(lin, Access::Exec, user)
    }

    // ---------------------------------------------------------- linear access

    pub fn read_lin(&mut self, lin: u64, size: u8, user: bool) -> R<u64> {
        if (lin & 0xfff) + size as u64 > 0x1000 {
            return self.read_split(lin, size, user);
        }
        let e = self.tlb_entry(lin, Access::Read, user)?;
        if !e.host.is_null() {
            // SAFETY: the entry's host page is 4 KiB of mapped RAM and the
            // access does not cross it.
            Ok(unsafe { load(e.host.add((lin & 0xfff) as usize), size) })
        } else {
            self.mmio_read(e.phys | (lin & 0xfff), size)
        }
    }

    #[cold]
    fn read_split(&mut self, lin: u64, size: u8, user: bool) -> R<u64> {
        let mut v = 0u64;
        for i in 0..size as u64 {
            v |= self.read_lin(lin.wrapping_add(i), 1, user)? << (8 * i);
        }
        Ok(v)
    }

    pub fn write_lin(&mut self, lin: u64, size: u8, val: u64, user: bool) -> R {
        if (lin & 0xfff) + size as u64 > 0x1000 {
            return self.write_split(lin, size, val, user);
        }
        let e = self.tlb_entry(lin, Access::Write, user)?;
        if !e.host.is_null() {
            // SAFETY: as in `read_lin`.
            unsafe {
                store(e.host.add((lin & 0xfff) as usize), size, val);
                if (*e.code).load(Ordering::Relaxed) != 0 {
                    self.code_written(e.phys | (lin & 0xfff), size as u64);
                }
            }
            Ok(())
        } else {
            self.mmio_write(e.phys | (lin & 0xfff), size, val)
        }
    }

    #[cold]
    fn write_split(&mut self, lin: u64, size: u8, val: u64, user: bool) -> R {
        // Check both pages before writing anything: no partial writes on #PF.
        let last = lin.wrapping_add(size as u64 - 1);
        self.tlb_entry(lin, Access::Write, user)?;
        self.tlb_entry(last, Access::Write, user)?;
        for i in 0..size as u64 {
            self.write_lin(lin.wrapping_add(i), 1, val >> (8 * i), user)?;
        }
        Ok(())
    }

    #[cold]
    fn code_written(&mut self, gpa: u64, len: u64) {
        if self.mem.note_write_gpa(gpa, len) {
            // The running block may be the one just modified.
            self.end_block = true;
        }
    }

    /// Read-modify-write; with `locked` the update is one atomic operation
    /// on guest RAM, so other vCPU threads see LOCK semantics. `f` may run
    /// more than once. Returns the old value.
    pub fn rmw_lin(
        &mut self,
        lin: u64,
        size: u8,
        locked: bool,
        user: bool,
        f: &mut dyn FnMut(u64) -> u64,
    ) -> R<u64> {
        let aligned = lin & (size as u64 - 1) == 0;
        if (lin & 0xfff) + size as u64 <= 0x1000 {
            let e = self.tlb_entry(lin, Access::Write, user)?;
            if !e.host.is_null() {
                // SAFETY: inside one mapped RAM page; CAS only when aligned.
                let p = unsafe { e.host.add((lin & 0xfff) as usize) };
                // SAFETY: `p` is in that page with `size` bytes after it; the
                // CAS only when aligned.
                let old = unsafe {
                    if locked && aligned {
                        let mut old = load(p, size);
                        loop {
                            let found = cas(p, size, old, f(old));
                            if found == old {
                                break old;
                            }
                            old = found;
                        }
                    } else {
                        let old = load(p, size);
                        store(p, size, f(old));
                        old
                    }
                };
                // SAFETY: the code flag pointer comes from the same region.
                if unsafe { (*e.code).load(Ordering::Relaxed) } != 0 {
                    self.code_written(e.phys | (lin & 0xfff), size as u64);
                }
                return Ok(old);
            }
        }
        // Split or MMIO: not atomic (a split-locked access is rare and slow on
        // real hardware too).
        self.tlb_entry(lin, Access::Write, user)?;
        let old = self.read_lin(lin, size, user)?;
        self.write_lin(lin, size, f(old), user)?;
        Ok(old)
    }

    // --------------------------------------------------------- segmented access

    /// Linear address of `seg:off`; #GP/#SS on a non-canonical 64-bit address.
    #[inline(always)]
    pub fn lin(&self, seg: usize, off: u64) -> R<u64> {
        if self.st.mode64() {
            let a = if seg >= 4 {
                off.wrapping_add(self.st.seg[seg].base)
            } else {
                off
            };
            if ((a << 16) as i64 >> 16) as u64 != a {
                return Err(if seg == SS { fault(12, Some(0)) } else { gp(0) });
            }
            Ok(a)
        } else {
            Ok(self.st.seg[seg].base.wrapping_add(off) & 0xffff_ffff)
        }
    }

    #[inline]
    pub fn read_mem(&mut self, seg: usize, off: u64, size: u8) -> R<u64> {
        let lin = self.lin(seg, off)?;
        let user = self.user();
        self.read_lin(lin, size, user)
    }

    #[inline]
    pub fn write_mem(&mut self, seg: usize, off: u64, size: u8, val: u64) -> R {
        let lin = self.lin(seg, off)?;
        let user = self.user();
        self.write_lin(lin, size, val, user)
    }

    /// Implicit supervisor-mode read (descriptor tables, TSS, IDT).
    pub fn read_sys(&mut self, lin: u64, size: u8) -> R<u64> {
        self.read_lin(lin, size, false)
    }

    pub fn write_sys(&mut self, lin: u64, size: u8, val: u64) -> R {
        self.write_lin(lin, size, val, false)
    }

    // ------------------------------------------------------------- MMIO / IO

    fn take_response(&mut self, is_io: bool, addr: u64, size: u8) -> Option<u64> {
        match self.io.response {
            Some(r) if r.is_io == is_io && r.addr == addr && r.size == size => {
                self.io.response = None;
                Some(r.data)
            }
            _ => None,
        }
    }

    fn mmio_read(&mut self, addr: u64, size: u8) -> R<u64> {
        if self.pc.is_some() {
            if let Some(v) = crate::pc::mmio_read(self, addr, size) {
                return Ok(v);
            }
        }
        if let Some(v) = self.take_response(false, addr, size) {
            return Ok(v);
        }
        self.io.request = Some(ExitReq::MmioRead { addr, size });
        Err(Exc::Exit)
    }

    fn mmio_write(&mut self, addr: u64, size: u8, data: u64) -> R {
        if self.pc.is_some() && crate::pc::mmio_write(self, addr, size, data) {
            return Ok(());
        }
        if self.io.request.is_some() {
            return Err(Exc::unimplemented(
                "more than one MMIO access in one instruction",
            ));
        }
        self.io.request = Some(ExitReq::MmioWrite { addr, size, data });
        Ok(())
    }

    pub fn io_in(&mut self, port: u16, size: u8) -> R<u64> {
        if self.pc.is_some() {
            if let Some(v) = crate::pc::pio_in(self, port, size) {
                return Ok(v);
            }
        }
        if let Some(v) = self.take_response(true, port as u64, size) {
            return Ok(v);
        }
        self.io.request = Some(ExitReq::IoIn { port, size });
        Err(Exc::Exit)
    }

    pub fn io_out(&mut self, port: u16, size: u8, data: u64) -> R {
        if self.pc.is_some() && crate::pc::pio_out(self, port, size, data) {
            return Ok(());
        }
        if self.io.request.is_some() {
            return Err(Exc::unimplemented(
                "more than one port access in one instruction",
            ));
        }
        self.io.request = Some(ExitReq::IoOut { port, size, data });
        Ok(())
    }

    // ------------------------------------------------------------------ run

    /// Flush everything derived from memory contents or mappings.
    pub fn flush_all_caches(&mut self) {
        self.tlb.flush_all();
        self.blocks.clear();
        self.jit.reset();
        self.prev_block = BlockPtr::NONE;
    }

    /// Run until something needs the VMM.
    pub fn run(&mut self) -> RunExit {
        if self.mem.refresh() {
            self.flush_all_caches();
        }
        // Whatever the VMM did while we were out may have raised an interrupt
        // or changed registers: poll, and do not chain across it.
        self.poll_now = true;
        self.prev_block = BlockPtr::NONE;
        loop {
            if self.kick.load(Ordering::Relaxed) && self.kick.swap(false, Ordering::AcqRel) {
                return RunExit::Interrupted;
            }
            if !self.int_shadow {
                // Asking the controller costs (a platform reads its clock):
                // poll when something asked for it, else every few blocks.
                let asked = self.attention.load(Ordering::Relaxed);
                if self.poll_now || asked || self.poll_countdown == 0 {
                    if asked {
                        self.attention.store(false, Ordering::SeqCst);
                    }
                    self.poll_now = false;
                    self.poll_countdown = POLL_INTERVAL;
                    if let Some(exit) = self.check_interrupts() {
                        return exit;
                    }
                } else {
                    self.poll_countdown -= 1;
                }
            }
            if self.pc.is_some() {
                // Halted or waiting for SIPI: sleep until the platform has
                // something for this vCPU (then poll), or leave.
                if self.halted || self.wait_for_sipi {
                    if let Some(exit) = crate::pc::idle(self) {
                        return exit;
                    }
                    self.poll_now = true;
                    continue;
                }
            } else if self.halted {
                return RunExit::Halt;
            }
            let limit = if self.int_shadow { 1 } else { usize::MAX };
            self.int_shadow = false;
            if let Some(exit) = self.run_block(limit) {
                return exit;
            }
        }
    }

    /// Run exactly one instruction, without looking for interrupts: how a
    /// read the VMM answered is finished before the vCPU is paused. What it
    /// exits with, if anything.
    pub fn step(&mut self) -> Option<RunExit> {
        if self.mem.refresh() {
            self.flush_all_caches();
        }
        self.prev_block = BlockPtr::NONE;
        let exit = self.run_block(1);
        self.prev_block = BlockPtr::NONE;
        exit
    }

    /// INIT: architectural state as after RESET (real mode at F000:FFF0),
    /// then wait for a start-up IPI. Caches that depend on the old paging
    /// state are dropped.
    pub fn init_reset(&mut self) {
        let keep_apic_base = self.st.msr.apic_base;
        self.st = CpuState::reset();
        self.st.msr.apic_base = keep_apic_base;
        self.tlb.flush_all();
        self.halted = false;
        self.int_shadow = false;
        self.nmi_blocked = false;
        self.io = IoExchange::default();
        self.wait_for_sipi = true;
    }

    /// SIPI with vector `v`: start in real mode at `v`00:0000.
    pub fn start_up(&mut self, v: u8) {
        let sel = (v as u16) << 8;
        self.st.seg[CS].selector = sel;
        self.st.seg[CS].base = (sel as u64) << 4;
        self.st.rip = 0;
        self.wait_for_sipi = false;
        self.halted = false;
    }

    /// Accept a pending NMI or external interrupt if the CPU can take it.
    fn check_interrupts(&mut self) -> Option<RunExit> {
        if self.pc.is_some() {
            // INIT/SIPI, NMI and interrupts in one platform look.
            return crate::pc::poll(self);
        }
        if self.intc.take_init(self.index) {
            self.init_reset();
        }
        if self.wait_for_sipi {
            match self.intc.take_startup(self.index) {
                Some(v) => self.start_up(v),
                None => return Some(RunExit::Halt),
            }
        }
        if !self.nmi_blocked && self.intc.take_nmi(self.index) {
            self.halted = false;
            self.nmi_blocked = true;
            return self.deliver_and_check(2, None, crate::exception::Kind::External);
        }
        if self.st.rflags & FLAG_IF == 0 {
            return None;
        }
        let v = self.intc.pending_vector(self.index)?;
        let v = self.intc.ack(self.index, v)?;
        self.halted = false;
        self.deliver_and_check(v, None, crate::exception::Kind::External)
    }

    pub(crate) fn deliver_and_check(
        &mut self,
        vector: u8,
        error: Option<u32>,
        kind: crate::exception::Kind,
    ) -> Option<RunExit> {
        self.history.push(
            self.st.rip,
            0x100 + vector as u32 + ((error.unwrap_or(0) & 0xffff) << 16),
        );
        // Delivery changes RIP, maybe CPL and stack: never chain across it.
        self.prev_block = BlockPtr::NONE;
        match crate::exception::deliver(self, vector, error, kind) {
            Ok(()) => None,
            Err(Exc::Shutdown) => Some(RunExit::Shutdown),
            Err(Exc::Unimplemented(reason)) => Some(RunExit::Internal {
                reason: *reason,
                rip: self.st.rip,
            }),
            Err(e) => Some(RunExit::Internal {
                reason: format!("unexpected {e:?} while delivering vector {vector}"),
                rip: self.st.rip,
            }),
        }
    }

    /// Execute (part of) one basic block. Returns an exit if one is due.
    fn run_block(&mut self, limit: usize) -> Option<RunExit> {
        self.history.push(self.st.rip, HIST_BLOCK);
        if self.trace {
            eprintln!(
                "emu: block {:#x} rax={:#x} rsp={:#x}",
                self.st.rip, self.st.gpr[0], self.st.gpr[4]
            );
        }
        let prev = std::mem::replace(&mut self.prev_block, BlockPtr::NONE).0;
        let rip = self.st.rip;
        let epoch = self.tlb.epoch;
        let cache_gen = self.blocks.generation;
        let cell = std::mem::take(&mut self.jit.ctx.last_cell);
        let chained = if prev.is_null() {
            None
        } else {
            // SAFETY: a non-null `prev` is in this vCPU's block arena (links are
            // reset whenever the cache is cleared).
            crate::decode::chained(unsafe { &*prev }, rip, epoch)
                // SAFETY: a cell noted by the code of `prev` (a live block).
                .or_else(|| unsafe { crate::jit::linked_block(cell, rip, epoch) })
        };
        // The previous block may be linked to this one (same TLB epoch,
        // cache not cleared since).
        let mut linkable = !prev.is_null();
        let block = match chained {
            Some(b) => b,
            None => match crate::decode::fetch_block(self) {
                Ok(b) => {
                    // Link only if fetching neither flushed the TLB nor
                    // cleared the cache (which would have freed `prev`).
                    if !prev.is_null()
                        && self.tlb.epoch == epoch
                        && self.blocks.generation == cache_gen
                    {
                        // SAFETY: `prev` is still in the arena (no clear).
                        crate::decode::link(unsafe { &*prev }, rip, b, epoch);
                    } else {
                        linkable = false;
                    }
                    b
                }
                Err(e) => return self.handle_exc(e),
            },
        };
        // SAFETY: see `fetch_block`: the cache is not modified while the
        // block runs (handlers never fetch blocks or flush the cache).
        let block = unsafe { &*block };
        self.end_block = false;
        if limit == usize::MAX && block.bits == 64 {
            let epoch = self.tlb.epoch;
            if let Some(f) = crate::jit::code_for(self, block) {
                if cell != 0 && linkable && self.tlb.epoch == epoch && !self.trace {
                    // SAFETY: the cell is in `prev`, still in the arena.
                    unsafe { crate::jit::link(cell, block, epoch) };
                }
                return self.run_jit(block, f);
            }
        }
        for u in block.uops.iter().take(limit) {
            let next = u.next_ip;
            self.next_rip = next;
            match (u.handler)(self, u) {
                Ok(()) => {
                    self.icount += 1;
                    self.st.rip = self.next_rip;
                    if let Some(req) = self.io.request.take() {
                        return Some(RunExit::Io(req));
                    }
                    if self.next_rip != next || self.end_block {
                        break;
                    }
                }
                Err(e) => return self.handle_exc(e),
            }
        }
        if !self.end_block {
            self.prev_block = BlockPtr(block);
        }
        None
    }

    /// Run a block's compiled code (see [`crate::jit`]).
    fn run_jit(&mut self, block: &crate::decode::Block, f: crate::jit::JitFn) -> Option<RunExit> {
        if self.st.flags.op != crate::flags::FlagOp::None {
            self.st.settle_flags();
        }
        crate::jit::prepare(self);
        self.jit.ctx.cur_block = block as *const crate::decode::Block as usize;
        // SAFETY: `f` was compiled for `block`, which is alive (it is in the
        // cache's arena), from the arena generation still current; the
        // code only touches this core through the pointer.
        let r = unsafe { f(self as *mut Core) };
        self.icount += r as u32 as u64;
        if let Some(e) = self.jit.exc.take() {
            return self.handle_exc(e);
        }
        if let Some(req) = self.io.request.take() {
            return Some(RunExit::Io(req));
        }
        if !self.end_block {
            // The block that ran last (chained code may have gone on).
            self.prev_block = BlockPtr(self.jit.ctx.cur_block as *const crate::decode::Block);
        }
        None
    }

    fn handle_exc(&mut self, e: Exc) -> Option<RunExit> {
        use crate::exception::Kind;
        match e {
            Exc::Fault { vector, error } => {
                self.io.request = None;
                self.deliver_and_check(vector, error, Kind::Fault)
            }
            Exc::PageFault { addr, error } => {
                self.io.request = None;
                self.st.cr2 = addr;
                self.deliver_and_check(14, Some(error), Kind::Fault)
            }
            Exc::Exit => match self.io.request.take() {
                Some(req) => Some(RunExit::Io(req)),
                None => Some(RunExit::Internal {
                    reason: "exit requested without a request".into(),
                    rip: self.st.rip,
                }),
            },
            Exc::Unimplemented(reason) => {
                self.io.request = None;
                Some(RunExit::Internal {
                    reason: *reason,
                    rip: self.st.rip,
                })
            }
            Exc::Shutdown => Some(RunExit::Shutdown),
        }
    }

    /// Linear address of the current instruction.
    pub fn rip_lin(&self) -> u64 {
        if self.st.mode64() {
            self.st.rip
        } else {
            self.st.seg[CS].base.wrapping_add(self.st.rip) & 0xffff_ffff
        }
    }
}

#[cfg(test)]
mod tests {
    /// The interpreter returns `R` from every handler: keep it in registers.
    #[test]
    fn result_fits_two_registers() {
        assert!(std::mem::size_of::<super::R>() <= 16);
    }
}
