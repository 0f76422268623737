//! One vCPU's engine: the [`Core`] that holds its architectural state, TLB,
//! block cache, platform link and translator, with the types the parts
//! share (exceptions, exits). Its methods live with the part they belong to:
//! memory access in [`crate::memory::access`], the run loop in
//! [`crate::cpu_exec`], instructions in [`crate::exec`].

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::cpu::{ArchRegs, CS};
use crate::frontend::decode::BlockCache;
use crate::memory::mem::MemView;
use crate::memory::mmu::Tlb;
use crate::platform::irq::InterruptController;
use crate::platform::{ControllerLink, VcpuPlatform};

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
    Internal {
        reason: String,
        rip: u64,
    },
    /// The host debugger's stop ([`crate::debug::HostDebug`]).
    Debug(hypervisor::DebugStop),
}

/// The block that just ended normally (no exception, no mode or privilege
/// change), for chaining; only ever dereferenced by the owning vCPU while
/// its block cache holds the block.
#[derive(Clone, Copy)]
pub struct BlockPtr(pub *const crate::frontend::decode::Block);

impl BlockPtr {
    pub const NONE: BlockPtr = BlockPtr(std::ptr::null());
}

// SAFETY: the pointer is only dereferenced on the thread running the vCPU,
// into that vCPU's own block cache.
unsafe impl Send for BlockPtr {}

/// Blocks run between interrupt-controller polls when nothing asked for one,
/// on a platform that does not kick on every event
/// ([`crate::platform::VcpuPlatform::kicks_on_events`]; a timer interrupt
/// can be this late by a few microseconds).
pub const POLL_INTERVAL: u32 = 64;

pub struct Core {
    pub st: ArchRegs,
    pub mem: MemView,
    pub tlb: Tlb,
    pub blocks: BlockCache,
    pub index: u32,
    /// The machine around the CPU: interrupts, the devices it serves
    /// without an exit, HLT sleep, CR8/MSRs it owns, time.
    pub platform: Box<dyn VcpuPlatform>,
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
    /// The code mode links were last made under: the code size and, outside
    /// 64-bit mode, the CS base (see [`Core::note_code_mode`]).
    pub code_mode: (u32, u64),
    /// Recent events for post-mortem debugging (block starts and
    /// exceptions), oldest overwritten first.
    pub history: History,
    /// Debugging: print every block start to stderr (set by the embedder).
    pub trace: bool,
    /// What CPUID advertises beyond the fixed base set.
    pub cpuid: crate::cpuid::CpuidConfig,
    /// The one "work pending" word: set (from any thread) after making an
    /// interrupt pending for this vCPU, after a kick (`kick` first), and by
    /// the core itself when an instruction asks for a poll
    /// ([`Core::request_poll`]). The run loop polls at its next block
    /// boundary and chained translated code leaves for the run loop when
    /// it is set; nothing else is tested between chained blocks.
    pub attention: Arc<AtomicBool>,
    /// Poll the controller before the next block (IF may have become 1,
    /// the TPR or an EOI may have changed what is deliverable).
    pub poll_now: bool,
    pub(crate) poll_countdown: u32,
    /// Poll every [`POLL_INTERVAL`] blocks too: the platform does not set
    /// `attention` for every event (see `VcpuPlatform::kicks_on_events`).
    pub(crate) timed_polls: bool,
    /// The translating tier (hot 64-bit blocks compiled to host code).
    pub jit: crate::jit::Jit,
    /// Debug-exception bookkeeping of the current instruction.
    pub debug: crate::debug::DebugState,
    /// The host debugger's (gdb stub's) breakpoints and stepping.
    pub host_debug: crate::debug::HostDebug,
    /// External interrupts and NMIs delivered (statistics).
    pub interrupts: u64,
    /// `KVM_HC_KICK_CPU` hypercalls answered (statistics).
    pub pv_kicks: u64,
    /// Where the statistics above are published for monitoring, at the
    /// interrupt poll and on every return to the VMM ([`Core::publish_stats`]).
    pub stats: Arc<hypervisor::stats::EngineCounters>,
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
    /// A CPU wired to an embedder's interrupt controller (see
    /// [`ControllerLink`]).
    pub fn new(index: u32, mem: MemView, intc: Arc<dyn InterruptController>) -> Core {
        Self::with_platform(
            index,
            mem,
            Box::new(ControllerLink::new(intc)),
            crate::cpuid::CpuidConfig::default(),
        )
    }

    pub fn with_platform(
        index: u32,
        mem: MemView,
        platform: Box<dyn VcpuPlatform>,
        cpuid: crate::cpuid::CpuidConfig,
    ) -> Core {
        let timed_polls = !platform.kicks_on_events();
        Core {
            st: ArchRegs::reset(),
            mem,
            tlb: Tlb::default(),
            blocks: BlockCache::default(),
            index,
            platform,
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
            code_mode: (64, 0),
            history: History::default(),
            trace: false,
            cpuid,
            attention: Arc::new(AtomicBool::new(false)),
            poll_now: true,
            poll_countdown: 0,
            timed_polls,
            jit: crate::jit::Jit::default(),
            debug: Default::default(),
            host_debug: Default::default(),
            interrupts: 0,
            pv_kicks: 0,
            stats: Arc::default(),
        }
    }

    /// Copy this vCPU's private counts to its shared counters: plain
    /// relaxed stores, done where the run loop already stops to poll.
    pub fn publish_stats(&self) {
        let s = &self.stats;
        s.instructions.publish(self.icount);
        s.blocks_translated.publish(self.jit.compiled);
        s.code_cache_bytes.publish(self.jit.code_bytes() as u64);
        s.cache_flushes.publish(self.blocks.generation);
        s.tlb_flushes.publish(self.tlb.flushes);
        s.interrupts.publish(self.interrupts);
        s.pv_kicks.publish(self.pv_kicks);
    }

    /// An instruction changed what may be deliverable (IF, TPR, an EOI, a
    /// platform register): poll before the next block, and make chained
    /// code leave for the run loop (it tests only `attention`).
    #[inline]
    pub fn request_poll(&mut self) {
        self.poll_now = true;
        self.attention
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Flush everything derived from memory contents or mappings.
    pub fn flush_all_caches(&mut self) {
        self.tlb.flush_all();
        self.blocks.clear();
        self.jit.reset();
        self.prev_block = BlockPtr::NONE;
    }

    /// The VMM loaded IA32_APIC_BASE (special registers): the platform
    /// takes it, and the core's copy (the LAPIC page it decodes) follows.
    pub(crate) fn load_apic_base(&mut self, v: u64) {
        if let Some(base) = self.platform.load_apic_base(self.index, v) {
            self.st.msr.apic_base = base;
        }
    }

    /// Links between blocks (and a block's successor note) lead from one
    /// RIP to the block decoded for the linear address and code size that
    /// RIP had when they were made. Outside 64-bit mode the linear address
    /// is CS base + EIP, so a change of the CS base (or of the code size)
    /// changes the link key as a TLB flush does (the epoch moves on, no
    /// entry is dropped): links made before are checked again (outside
    /// 64-bit mode by the dispatcher's fetch). Every instruction that
    /// loads CS ends its block, so the dispatcher sees each change before
    /// any exit compares a key.
    #[inline]
    pub fn note_code_mode(&mut self) {
        let bits = self.st.code_bits();
        let base = if bits == 64 { 0 } else { self.st.seg[CS].base };
        if self.code_mode != (bits, base) {
            self.code_mode = (bits, base);
            self.tlb.epoch += 2;
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
