//! Basic-block decode cache.
//!
//! A block is decoded once and kept keyed by the physical address of its
//! first byte. It remembers the RIP and code size it was decoded for (branch
//! targets are absolute) and the code generation of the physical pages it
//! covers: a write to one of those pages bumps the generation and the block
//! is decoded again on its next use.

use std::cell::Cell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, Mnemonic};

use crate::core::{Core, Exc, R};
use crate::frontend::uop::{build, Uop};
use crate::memory::mem::load;
use std::sync::atomic::{AtomicU32, Ordering};

/// Longest block, in instructions.
const MAX_INSNS: usize = 64;
/// Cached blocks before the cache is dropped wholesale.
const MAX_BLOCKS: usize = 1 << 17;

pub struct Block {
    pub rip: u64,
    pub bits: u32,
    /// Physical address of the first byte.
    pub phys: u64,
    pub uops: Vec<Uop>,
    /// Generation counters (and the values seen at decode) of the one or two
    /// physical pages covered.
    gens: [(*const AtomicU32, u32); 2],
    npages: usize,
    /// The block that last followed this one: (its RIP, the block, the link
    /// key, TLB epoch | user bit, at link time).
    succ: Cell<(u64, *const Block, u64)>,
    /// Execution count / compiled code (see [`crate::jit`]).
    pub jit: Cell<crate::jit::JitState>,
    /// Direct links of the compiled code to its successors' code (branch
    /// target, fall-through), read by the generated code.
    pub links: [crate::jit::LinkCell; 2],
}

// SAFETY: the generation pointers point into RAM regions kept alive by the
// owning vCPU's memory snapshot; the cache is flushed whenever the snapshot
// changes, and the counters are atomics.
unsafe impl Send for Block {}
// SAFETY: needed because the cache keeps blocks in `Arc`s and moves with its
// vCPU to the vCPU's thread; the `Cell`s are only touched by the vCPU that
// owns the cache, never by two threads at once.
unsafe impl Sync for Block {}

/// Direct-mapped cache from RIP to block, in front of the hash map.
const JMP_CACHE: usize = 4096;

/// Multiplicative hash for physical addresses (std's SipHash is slow here).
#[derive(Default)]
pub struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ *b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

pub struct BlockCache {
    map: HashMap<u64, Arc<Block>, BuildHasherDefault<AddrHasher>>,
    jmp: Vec<Option<Arc<Block>>>,
    /// Every block decoded since the last clear, so a block is never freed
    /// while another block's successor link may point at it.
    arena: Vec<Arc<Block>>,
    pub decoded: u64,
    /// Bumped by every clear (blocks freed).
    pub generation: u64,
}

impl Default for BlockCache {
    fn default() -> Self {
        BlockCache {
            map: HashMap::default(),
            jmp: vec![None; JMP_CACHE],
            arena: Vec::new(),
            decoded: 0,
            generation: 0,
        }
    }
}

impl BlockCache {
    pub fn clear(&mut self) {
        self.generation += 1;
        self.map.clear();
        self.arena.clear();
        self.jmp.iter_mut().for_each(|e| *e = None);
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Instructions after which decoding stops even though control falls
/// through: they change how the following bytes must be decoded or run.
fn ends_block(insn: &Instruction) -> bool {
    if insn.flow_control() != FlowControl::Next {
        return true;
    }
    matches!(
        insn.mnemonic(),
        Mnemonic::Mov
            if insn.op0_register().is_cr() || insn.op0_register().is_segment_register()
    ) || matches!(
        insn.mnemonic(),
        Mnemonic::Wrmsr
            | Mnemonic::Sti
            | Mnemonic::Cli
            | Mnemonic::Popf
            | Mnemonic::Popfd
            | Mnemonic::Popfq
            | Mnemonic::Hlt
            | Mnemonic::Lmsw
            | Mnemonic::Invlpg
            | Mnemonic::In
            | Mnemonic::Out
    )
}

/// The block starting at the current RIP, decoding it if needed.
///
/// The pointer stays valid until the block cache is next modified, which
/// only happens in `fetch_block` itself and in `Core::flush_all_caches`,
/// never while a block executes; handing out a pointer instead of an `Arc`
/// clone saves two atomic operations per block.
pub fn fetch_block(core: &mut Core) -> R<*const Block> {
    let rip = core.st.rip;
    let bits = core.st.code_bits();
    let lin = core.rip_lin();
    let entry = core.fetch_entry(lin)?;
    let phys = entry.phys | (lin & 0xfff);
    let slot = ((rip ^ (rip >> 12)) as usize) & (JMP_CACHE - 1);
    if let Some(b) = &core.blocks.jmp[slot] {
        if b.rip == rip && b.phys == phys && b.bits == bits && valid(b) {
            return Ok(Arc::as_ptr(b));
        }
    }
    if let Some(b) = core.blocks.map.get(&phys) {
        if b.rip == rip && b.bits == bits && valid(b) {
            let b = b.clone();
            let p = Arc::as_ptr(&b);
            core.blocks.jmp[slot] = Some(b);
            return Ok(p);
        }
    }
    let b = Arc::new(decode_block(core, lin, rip, bits, entry.phys, entry.host)?);
    if core.blocks.arena.len() >= MAX_BLOCKS {
        core.blocks.clear();
        core.jit.reset();
        core.tlb.flush_all();
        core.prev_block = crate::core::BlockPtr::NONE;
    }
    core.blocks.arena.push(b.clone());
    core.blocks.decoded += 1;
    core.blocks.map.insert(phys, b.clone());
    let p = Arc::as_ptr(&b);
    core.blocks.jmp[slot] = Some(b);
    Ok(p)
}

/// The block linked as `prev`'s successor at `rip`, if the link is still
/// good: same link key (no TLB flush and no CPL change since) and the code
/// pages unchanged.
/// Callers only ask when `prev` ended without a mode, privilege or
/// control-register change, so the fetch translation and permission check
/// done at link time still hold.
#[inline]
pub fn chained(prev: &Block, rip: u64, key: u64) -> Option<*const Block> {
    let (r, b, e) = prev.succ.get();
    // SAFETY: `b` is kept alive by the arena until the cache is cleared,
    // which also drops `prev` and resets the caller's link.
    if r == rip && e == key && !b.is_null() && valid(unsafe { &*b }) {
        Some(b)
    } else {
        None
    }
}

/// Remember `next` as the block that followed `prev` at `rip`.
pub fn link(prev: &Block, rip: u64, next: *const Block, key: u64) {
    prev.succ.set((rip, next, key));
}

impl Block {
    /// The code generation counters of the pages the block covers and the
    /// values they had when it was decoded.
    pub fn page_gens(&self) -> &[(*const AtomicU32, u32)] {
        &self.gens[..self.npages]
    }
}

/// The block's code pages are unchanged since it was decoded.
#[inline]
pub fn is_valid(b: &Block) -> bool {
    valid(b)
}

#[inline]
fn valid(b: &Block) -> bool {
    b.gens[..b.npages].iter().all(|&(p, g)| {
        // SAFETY: see `Block`'s Send/Sync note.
        !p.is_null() && unsafe { (*p).load(Ordering::Acquire) } == g
    })
}

fn decode_block(
    core: &mut Core,
    lin: u64,
    rip: u64,
    bits: u32,
    page: u64,
    host: *mut u8,
) -> R<Block> {
    if host.is_null() {
        return Err(Exc::unimplemented(format!(
            "executing from MMIO at physical {:#x}",
            page | (lin & 0xfff)
        )));
    }
    let Some(gen) = core.mem.mark_code(page) else {
        return Err(Exc::unimplemented("code page vanished"));
    };
    let off = (lin & 0xfff) as usize;
    let in_page = 4096 - off;
    // MAX_INSNS instructions never need more than 15 bytes each: copy only
    // that much (the rest of the page when the block may reach its end).
    let take = in_page.min(MAX_INSNS * 15);
    let mut bytes = Vec::with_capacity(take + 15);
    // SAFETY: `host` is a whole mapped RAM page and off + take <= 4096.
    // Another vCPU may write the page meanwhile: it marks it dirty after
    // writing (see `mark_code`), so the block is then decoded again.
    unsafe {
        std::ptr::copy_nonoverlapping(host.add(off), bytes.as_mut_ptr(), take);
        bytes.set_len(take);
    }
    let in_page_full = take == in_page;
    let mut gens = [(core.mem.code_gen_ptr(page), gen), (std::ptr::null(), 0)];
    let mut have_next = false;
    let mut npages = 1;
    // Bytes of the next page, for an instruction that straddles the boundary.
    let mut next_fault = None;
    let next_lin = (lin & !0xfff).wrapping_add(0x1000);
    let next_lin = if bits == 64 {
        next_lin
    } else {
        next_lin & 0xffff_ffff
    };
    match core.fetch_entry(next_lin) {
        _ if !in_page_full => {}
        Ok(e) if !e.host.is_null() => {
            if let Some(g2) = core.mem.mark_code(e.phys) {
                for i in 0..15 {
                    // SAFETY: as above.
                    bytes.push(unsafe { load(e.host.add(i), 1) } as u8);
                }
                gens[1] = (core.mem.code_gen_ptr(e.phys), g2);
                have_next = true;
            }
        }
        Ok(_) => {}
        Err(e) => next_fault = Some(e),
    }
    let mut dec = Decoder::with_ip(bits, &bytes, rip, DecoderOptions::NONE);
    let mut uops = Vec::with_capacity(16);
    let mut insn = Instruction::default();
    while uops.len() < MAX_INSNS && (dec.position() < in_page) {
        dec.decode_out(&mut insn);
        let end = dec.position();
        if insn.is_invalid() && dec.last_error() == iced_x86::DecoderError::NoMoreBytes {
            // Truncated at the page end: the next page is not executable.
            if uops.is_empty() {
                return Err(next_fault.unwrap_or(Exc::unimplemented("instruction fetch failed")));
            }
            break;
        }
        if end > in_page {
            npages = 2;
        }
        let stop = insn.is_invalid() || ends_block(&insn);
        uops.push(build(&insn));
        if stop {
            break;
        }
    }
    if !have_next {
        npages = 1;
    }
    // Blocks live until the cache is cleared: most are a few instructions,
    // and the spare capacity of 16 (~2 KiB a block) was most of the
    // engine's memory.
    uops.shrink_to_fit();
    Ok(Block {
        rip,
        bits,
        phys: page | (lin & 0xfff),
        uops,
        gens,
        npages,
        succ: Cell::new((0, std::ptr::null(), 0)),
        jit: Cell::new(crate::jit::JitState::Cold),
        links: Default::default(),
    })
}
