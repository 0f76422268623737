//! The translator runtime: per-core translation state, the executable
//! arena, hot-block counting, link cells and the dispatcher's linking, and
//! the helper generated code calls to interpret one instruction.
//!
//! Invariants: a block's code is only run while its arena generation is
//! current ([`JitState::Code`] carries it); a link cell is only followed
//! under the TLB epoch it was made in (every arena recycle and block-cache
//! clear flushes the TLB, which bumps the epoch); the arena is written only
//! while no translated code of this vCPU runs.

use std::cell::Cell;

use crate::core::{Core, Exc};
use crate::frontend::decode::Block;
use crate::frontend::uop::Uop;
use crate::memory::mmu::{PERM_DIRTY, PERM_USER, PERM_WRITE};

use super::{JitConfig, JitFn, JitState};

/// Values the generated code reads at run time.
#[derive(Default)]
#[repr(C)]
pub struct JitCtx {
    /// `Core::tlb.entries` base.
    pub tlb: usize,
    /// Permission bits a TLB entry needs for the inline read/write path.
    pub rmask: u64,
    pub wmask: u64,
    /// Saved host RFLAGS (guest arithmetic flags).
    pub fl: u64,
    /// `Core::kick` and `Core::attention` (AtomicBool addresses).
    pub kick: usize,
    pub attention: usize,
    /// The block whose code runs (chained code updates it).
    pub cur_block: usize,
    /// The link cell of the exit taken when following it was not possible,
    /// for the dispatcher to link.
    pub last_cell: usize,
    /// `Jit::ret_links` base.
    pub ret_links: usize,
}

/// Entries of the return-address link table.
pub(super) const RET_LINKS: usize = 1024;

/// Size of the executable arena; when full it is reset and every block
/// translated before is translated again when hot.
const ARENA_SIZE: usize = 32 << 20;

/// Executable memory for translations: one mapping, read+execute except
/// for the pages a new translation is being written to (W^X), bump
/// allocated.
struct Arena {
    base: *mut u8,
    used: usize,
    gen: u64,
}

impl Default for Arena {
    fn default() -> Self {
        Arena {
            base: std::ptr::null_mut(),
            used: 0,
            gen: 0,
        }
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        if !self.base.is_null() {
            // SAFETY: our own mapping; no code from it runs any more (the
            // owning core is being dropped).
            unsafe { libc::munmap(self.base as *mut libc::c_void, ARENA_SIZE) };
        }
    }
}

impl Arena {
    /// Copy `code` into executable memory; None if that failed.
    fn put(&mut self, code: &[u8]) -> Option<*const u8> {
        if code.len() > ARENA_SIZE {
            return None;
        }
        if self.base.is_null() {
            // SAFETY: a fresh private anonymous mapping.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    ARENA_SIZE,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return None;
            }
            self.base = p as *mut u8;
        }
        if self.used + code.len() > ARENA_SIZE {
            // Every older translation becomes stale (blocks check `gen`).
            self.gen += 1;
            self.used = 0;
        }
        let at = self.used;
        let first = at & !4095;
        let end = (at + code.len() + 4095) & !4095;
        // SAFETY: [first, end) is inside the mapping; no translated code
        // runs while this vCPU compiles, and only this vCPU uses the arena.
        unsafe {
            let page = self.base.add(first) as *mut libc::c_void;
            if libc::mprotect(page, end - first, libc::PROT_READ | libc::PROT_WRITE) != 0 {
                return None;
            }
            std::ptr::copy_nonoverlapping(code.as_ptr(), self.base.add(at), code.len());
            if libc::mprotect(page, end - first, libc::PROT_READ | libc::PROT_EXEC) != 0 {
                return None;
            }
        }
        // Keep entry points 16-byte aligned.
        self.used = (at + code.len() + 15) & !15;
        Some(self.base.wrapping_add(at) as *const u8)
    }
}

pub struct Jit {
    pub ctx: JitCtx,
    /// Executions before a block is compiled; None disables the tier.
    pub threshold: Option<u32>,
    /// Write /tmp/perf-PID.map entries for new translations.
    pub perf_map: bool,
    /// An exception from an instruction run through the interpreter.
    pub exc: Option<Exc>,
    arena: Arena,
    /// Blocks compiled (statistics).
    pub compiled: u64,
    /// Links for RET, indexed by a hash of the return address.
    ret_links: Box<[LinkCell]>,
}

impl Default for Jit {
    fn default() -> Self {
        Jit::new(JitConfig::default())
    }
}

impl Jit {
    pub fn new(cfg: JitConfig) -> Self {
        Jit {
            ctx: JitCtx::default(),
            threshold: cfg.threshold,
            perf_map: cfg.perf_map,
            exc: None,
            arena: Arena::default(),
            compiled: 0,
            ret_links: (0..RET_LINKS)
                .map(|_| {
                    let c = LinkCell::default();
                    c.dynamic.set(true);
                    c
                })
                .collect(),
        }
    }
}

// SAFETY: the arena is only used by the vCPU that owns it.
unsafe impl Send for Jit {}

impl Jit {
    /// Apply the embedder's settings (before the vCPU first runs).
    pub fn configure(&mut self, cfg: JitConfig) {
        self.threshold = cfg.threshold;
        self.perf_map = cfg.perf_map;
    }

    /// Bytes of host code in the arena now (statistics).
    pub fn code_bytes(&self) -> usize {
        self.arena.used
    }

    /// Forget all translations (the block cache was cleared).
    pub fn reset(&mut self) {
        self.arena.gen += 1;
        self.arena.used = 0;
    }
}

/// The compiled code for `block`, compiling it once it is hot.
#[inline]
pub fn code_for(core: &mut Core, block: &Block) -> Option<JitFn> {
    let threshold = core.jit.threshold?;
    match block.jit.get() {
        JitState::Code(f, g, _) if g == core.jit.arena.gen => Some(f),
        JitState::Failed => None,
        JitState::Counting(n) if n + 1 < threshold => {
            block.jit.set(JitState::Counting(n + 1));
            None
        }
        JitState::Cold if threshold > 1 => {
            block.jit.set(JitState::Counting(1));
            None
        }
        _ => {
            let r = compile(core, block);
            block.jit.set(match r {
                Some((f, chain)) => JitState::Code(f, core.jit.arena.gen, chain),
                None => JitState::Failed,
            });
            r.map(|(f, _)| f)
        }
    }
}

fn compile(core: &mut Core, block: &Block) -> Option<(JitFn, usize)> {
    if block.bits != 64 {
        return None;
    }
    for l in &block.links {
        l.epoch.set(u64::MAX);
    }
    let (code, chain) = super::codegen::gen_block(block)?;
    let gen = core.jit.arena.gen;
    let p = core.jit.arena.put(&code)?;
    if core.jit.arena.gen != gen {
        // The arena was recycled: links into it must not be followed.
        core.tlb.flush_all();
    }
    core.jit.compiled += 1;
    if core.jit.perf_map {
        // perf's JIT symbol map: `perf report` names samples by guest RIP.
        use std::io::Write;
        let path = format!("/tmp/perf-{}.map", std::process::id());
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{:x} {:x} guest_{:x}", p as usize, code.len(), block.rip);
        }
    }
    // SAFETY: `p` is the start of the function just written.
    let f = unsafe { std::mem::transmute::<*const u8, JitFn>(p) };
    Some((f, p as usize + chain))
}

/// A direct link from compiled code to the compiled code of a successor
/// block, followed while the TLB epoch it was made under holds.
#[repr(C)]
pub struct LinkCell {
    pub epoch: Cell<u64>,
    /// The successor's chained entry point.
    pub code: Cell<usize>,
    /// The successor's RIP (fixed at compile time unless `dynamic`).
    pub target: Cell<u64>,
    /// The exit's target is computed (RET): linking sets `target`.
    pub dynamic: Cell<bool>,
    /// The successor block (for the dispatcher).
    pub block: Cell<*const Block>,
}

impl Default for LinkCell {
    fn default() -> Self {
        LinkCell {
            epoch: Cell::new(u64::MAX),
            code: Cell::new(0),
            target: Cell::new(u64::MAX),
            dynamic: Cell::new(false),
            block: Cell::new(std::ptr::null()),
        }
    }
}

/// The block an exit's link cell leads to, if the link holds for `rip`
/// under TLB epoch `epoch` and the block's pages are unchanged.
///
/// # Safety
/// `cell` must be 0 or point to a [`LinkCell`] of a live block or of the
/// core's return-address table.
pub unsafe fn linked_block(cell: usize, rip: u64, epoch: u64) -> Option<*const Block> {
    if cell == 0 {
        return None;
    }
    // SAFETY: per the contract.
    let cell = unsafe { &*(cell as *const LinkCell) };
    let b = cell.block.get();
    if cell.epoch.get() == epoch
        && cell.target.get() == rip
        && !b.is_null()
        // SAFETY: a linked cell's block is alive while its epoch holds (a
        // cache clear flushes the TLB).
        && unsafe { crate::frontend::decode::is_valid(&*b) }
    {
        Some(b)
    } else {
        None
    }
}

/// Link the exit whose cell is `cell` to `block`'s compiled code, valid
/// under TLB epoch `epoch`.
///
/// # Safety
/// `cell` must point to a [`LinkCell`] of a live block or of the core's
/// return-address table.
pub unsafe fn link(cell: usize, block: &Block, epoch: u64) {
    // SAFETY: per the contract.
    let cell = unsafe { &*(cell as *const LinkCell) };
    if let JitState::Code(_, _, chain) = block.jit.get() {
        if cell.dynamic.get() {
            // Not followed until complete: epoch first invalidates it.
            cell.epoch.set(u64::MAX);
            cell.target.set(block.rip);
        }
        if cell.target.get() == block.rip {
            cell.block.set(block);
            cell.code.set(chain);
            cell.epoch.set(epoch);
        }
    }
}

/// Run one instruction through the interpreter for the generated code.
/// Returns 0 to continue with the next instruction, else the exit value
/// (completed count | 1 << 32).
pub(super) unsafe extern "sysv64" fn jit_interp(core: *mut Core, u: *const Uop, index: u64) -> u64 {
    // SAFETY: called from a block's code with the core that runs it and a
    // uop of that block, which outlives the call.
    let (core, u) = unsafe { (&mut *core, &*u) };
    let next = u.next_ip;
    core.next_rip = next;
    match (u.handler)(core, u) {
        Ok(()) => {
            core.st.rip = core.next_rip;
            if core.st.flags.op != crate::flags::FlagOp::None {
                core.st.settle_flags();
            }
            if core.io.request.is_some() || core.next_rip != next || core.end_block {
                (index + 1) | 1 << 32
            } else {
                0
            }
        }
        Err(e) => {
            core.jit.exc = Some(e);
            index | 1 << 32
        }
    }
}

/// Set the masks the inline TLB path compares against, before entry.
pub fn prepare(core: &mut Core) {
    let user = core.user();
    core.jit.ctx.tlb = core.tlb.entries.as_ptr() as usize;
    let u = if user { PERM_USER as u64 } else { 0 };
    core.jit.ctx.rmask = u;
    core.jit.ctx.wmask = u | (PERM_WRITE | PERM_DIRTY) as u64;
    core.jit.ctx.ret_links = core.jit.ret_links.as_ptr() as usize;
    core.jit.ctx.kick = std::sync::Arc::as_ptr(&core.kick) as usize;
    core.jit.ctx.attention = std::sync::Arc::as_ptr(&core.attention) as usize;
}
