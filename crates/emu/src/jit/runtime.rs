//! The translator runtime: per-core translation state, the executable
//! arena, hot-block counting, link cells and the dispatcher's linking, and
//! the helper generated code calls to interpret one instruction.
//!
//! Invariants: a block's code is only run while its arena generation is
//! current ([`JitState::Code`] carries it); the arena is written only while
//! no translated code of this vCPU runs.
//!
//! # When a link may be followed
//!
//! A [`LinkCell`] leads from an exit of one block to the compiled code of
//! the block at the exit's target RIP. Blocks are keyed by the physical
//! address of their code (and the RIP and code size), so a link stays
//! right as long as (a) the successor block and its code are alive, (b) the
//! target's virtual page still maps to the physical page the successor was
//! decoded from, with execute permission at the current CPL, and (c) the
//! successor's code pages are unchanged. A cell records the *link key*
//! (TLB epoch | user bit of the CPL) it was made or last checked under, the
//! arena generation, and the physical page of the target:
//!
//! - key equal: no TLB flush and no CPL change since the mapping was
//!   checked, so (b) holds (stale TLB contents are what the architecture
//!   allows until the guest invalidates them); the cache was not cleared
//!   (a clear flushes the TLB), so (a) holds;
//! - key different (a CR3 write, INVLPG or a CPL change since): followed
//!   only if the arena generation is the current one (a) and the TLB entry
//!   of the target's page is present, maps to the recorded physical page
//!   and allows execution at the current CPL (b); then the cell takes the
//!   current key. A missing entry sends the exit to the dispatcher, whose
//!   fetch walks the page tables and links the cell again.
//!
//! Outside 64-bit mode the target's linear address is CS base + RIP
//! (EIP/IP): a change of the CS base or of the code size moves the link
//! key as a flush does (`Core::note_code_mode`), and there a cell made
//! under another key is not revalidated against the TLB but goes to the
//! dispatcher (the cell does not record the CS base).
//!
//! (c) is checked at every chained entry (the code-page generations), so
//! self-modifying code invalidates links whatever the key says. A CR3
//! switch therefore no longer unlinks every block: kernel pages (global,
//! kept across the switch) revalidate in a few instructions, and a user
//! page's links come back after one dispatcher trip per page.
//!
//! # Patched jumps (TCG's goto_tb)
//!
//! An exit with a constant target does not jump through the cell: its
//! code has a `jmp rel32` that [`link`] patches to lead straight into the
//! successor's chained entry, written through the arena (`Arena::patch`).
//! The *keyed* site sits after the link-key check and always leads where
//! the cell's `code` does (both are only changed together by [`link`]; if
//! the site cannot be written the cell is left unlinked, and unpatched it
//! jumps on to `jmp [cell.code]`). An exit whose target lies in the
//! block's own virtual page (and whose block runs no instruction through
//! the interpreter inline, so nothing in it can flush the TLB or change
//! the CPL) also has a *direct* site before the key check, patched only
//! to a successor whose code lies in the same physical page as the
//! block's: whenever the block runs, its virtual page maps to its own
//! physical page, so the target RIP maps to the successor's, under any
//! key. Such a link needs no key check at all; the successor's entry still
//! checks its code pages (the block may have written them).
//!
//! Nothing has to be unpatched: a successor whose code was written exits
//! from its entry check and is linked again (patched to its new
//! translation); a block-cache clear or an arena recycle makes every
//! translation of the older generation unreachable, sites included, and a
//! block compiled again starts with unpatched sites (a cell's sites are
//! only patched while its own code is from the current generation).

use std::cell::Cell;

use crate::core::{Core, Exc};
use crate::frontend::decode::Block;
use crate::frontend::uop::Uop;
use crate::memory::mmu::{PERM_NX, PERM_USER};

use super::{JitConfig, JitFn, JitState};

/// Values the generated code reads at run time.
#[derive(Default)]
#[repr(C)]
pub struct JitCtx {
    /// The fast TLB entries of the current CPL's privilege class
    /// (`Tlb::fast`): what the inline memory path reads. Set with
    /// `link_key`, whenever the CPL may have changed.
    pub tlb: usize,
    /// The full TLB entries (`Tlb::entries`): what a link revalidation reads.
    pub tlb_full: usize,
    /// Saved host RFLAGS (guest arithmetic flags).
    pub fl: u64,
    /// `Core::attention` (an AtomicBool's address).
    pub attention: usize,
    /// The block whose code returned to the dispatcher (each block's
    /// epilogue sets it; chained code may have run several before).
    pub cur_block: usize,
    /// The link cell of the exit taken when following it was not possible,
    /// for the dispatcher to link.
    pub last_cell: usize,
    /// Why the code returned (`super::why`), in a `jit-trips` build.
    pub trip: u64,
    /// `Jit::ret_links` base.
    pub ret_links: usize,
    /// The link key now (TLB epoch | 1 at CPL 3), what an exit compares
    /// its cell's key with: set at every entry from the dispatcher and
    /// after every instruction the interpreter ran for the generated code
    /// (the only code that runs inside a translation and can flush the TLB
    /// or change the CPL), so an exit reads one word.
    pub link_key: u64,
    /// The arena generation (links made in an older one are dead).
    pub gen: u64,
    /// Permission bits a TLB entry is masked with for execution, and the
    /// value the masked bits must have (no NX; user at CPL 3).
    pub xmask: u64,
    pub xwant: u64,
}

/// Entries of the return-address link table, indexed by `(rip >> 12 ^
/// rip) & (RET_LINKS - 1)`. 4096 covers every byte offset of a page, so
/// two targets in one page never share a cell; with 1024, targets in one
/// page whose offsets differ by a multiple of 1 KiB evicted each other,
/// and those misses were 97% of the shell loop's dispatcher trips.
pub(super) const RET_LINKS: usize = 4096;

/// Size of the executable arena; when full it is reset and every block
/// translated before is translated again when hot.
const ARENA_SIZE: usize = 32 << 20;

/// Bytes of the writable window onto the arena (see [`Arena`]).
const WINDOW: usize = 1 << 20;

/// Executable memory for translations, bump allocated.
///
/// Normally a memfd seen through two mappings: `base` maps all of it
/// read+execute and is what runs; `win` maps a [`WINDOW`]-sized stretch of
/// it read+write at arena offset `win_off`, and new translations are copied
/// through it. Compiling a block therefore makes no system call (the
/// window moves, one munmap and one mmap, once per `WINDOW` bytes of code),
/// and no address is ever both writable and executable. The window is kept
/// small because a page mapped twice counts twice in the process's RSS.
/// Where a memfd cannot be made or mapped executable (an old kernel,
/// `vm.memfd_noexec`), and while perf's JIT map is written (`anon_only`:
/// perf reads that map only for anonymous executable memory, so samples
/// in a memfd view would stay unnamed), the arena is one anonymous mapping
/// kept read+execute except while a translation is written (`fd` < 0, two
/// `mprotect`s per block).
///
/// Invariant: `used` and the start of every translation are 16-byte
/// aligned and at most `ARENA_SIZE`; `win`, when not null, maps arena bytes
/// `[win_off, win_off + win_len)` of the same memfd `base` maps.
struct Arena {
    base: *mut u8,
    fd: libc::c_int,
    win: *mut u8,
    win_off: usize,
    win_len: usize,
    used: usize,
    gen: u64,
    /// Map the arena anonymously (set before its first use).
    anon_only: bool,
}

impl Default for Arena {
    fn default() -> Self {
        Arena {
            anon_only: false,
            base: std::ptr::null_mut(),
            fd: -1,
            win: std::ptr::null_mut(),
            win_off: 0,
            win_len: 0,
            used: 0,
            gen: 0,
        }
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: our own mappings and descriptor; no code from them runs
        // any more (the owning core is being dropped).
        unsafe {
            if !self.base.is_null() {
                libc::munmap(self.base as *mut libc::c_void, ARENA_SIZE);
            }
            if !self.win.is_null() {
                libc::munmap(self.win as *mut libc::c_void, self.win_len);
            }
            if self.fd >= 0 {
                libc::close(self.fd);
            }
        }
    }
}

/// A memfd of `ARENA_SIZE` bytes and its executable view, or None if the
/// host refuses any step.
fn memfd_arena() -> Option<(libc::c_int, *mut u8)> {
    // SAFETY: plain system calls on a descriptor this function owns until
    // it hands it to the caller with the new mapping.
    unsafe {
        let fd = libc::memfd_create(c"vireo-jit".as_ptr(), libc::MFD_CLOEXEC);
        if fd < 0 {
            return None;
        }
        if libc::ftruncate(fd, ARENA_SIZE as libc::off_t) == 0 {
            let x = libc::mmap(
                std::ptr::null_mut(),
                ARENA_SIZE,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd,
                0,
            );
            if x != libc::MAP_FAILED {
                return Some((fd, x as *mut u8));
            }
        }
        libc::close(fd);
        None
    }
}

impl Arena {
    /// Map the arena on first use; false if no mapping could be made.
    fn map(&mut self) -> bool {
        if !self.anon_only {
            if let Some((fd, x)) = memfd_arena() {
                self.fd = fd;
                self.base = x;
                return true;
            }
        }
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
            return false;
        }
        self.base = p as *mut u8;
        true
    }

    /// Whether translations are written through a second view (no
    /// protection change per block).
    fn dual(&self) -> bool {
        self.fd >= 0
    }

    /// A writable address for arena bytes `[at, end)`, moving the window
    /// there if it does not cover them; None if it could not be mapped.
    fn window(&mut self, at: usize, end: usize) -> Option<*mut u8> {
        if self.win.is_null() || at < self.win_off || end > self.win_off + self.win_len {
            let off = at & !4095;
            let len = WINDOW.max((end - off + 4095) & !4095).min(ARENA_SIZE - off);
            // SAFETY: our own window mapping (dropped with its PTEs, which
            // is the point) and a fresh shared mapping of our memfd inside
            // its size (`end` <= ARENA_SIZE, both page aligned).
            unsafe {
                if !self.win.is_null() {
                    libc::munmap(self.win as *mut libc::c_void, self.win_len);
                    self.win = std::ptr::null_mut();
                }
                let w = libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    self.fd,
                    off as libc::off_t,
                );
                if w == libc::MAP_FAILED {
                    return None;
                }
                self.win = w as *mut u8;
            }
            self.win_off = off;
            self.win_len = len;
        }
        Some(self.win.wrapping_add(at - self.win_off))
    }

    /// Make the `jmp rel32` whose displacement is at address `site` (in
    /// this generation's code) jump to `to`; false if that failed.
    fn patch_jump(&self, site: usize, to: usize) -> bool {
        let rel = to as i64 - (site as i64 + 4);
        match i32::try_from(rel) {
            Ok(rel) => self.patch(site, &rel.to_le_bytes()),
            Err(_) => false,
        }
    }

    /// Overwrite `bytes` of code already in the arena at address `at`:
    /// through the window when it covers them, else with `pwrite` on the
    /// memfd (one system call; the executable view shares its pages), else
    /// (the anonymous arena) between two protection flips. False if `at`
    /// is not in this generation's code or the write failed.
    fn patch(&self, at: usize, bytes: &[u8]) -> bool {
        let base = self.base as usize;
        if self.base.is_null() || at < base || at + bytes.len() > base + self.used {
            return false;
        }
        let off = at - base;
        if self.dual() {
            if !self.win.is_null()
                && off >= self.win_off
                && off + bytes.len() <= self.win_off + self.win_len
            {
                // SAFETY: the window maps arena bytes [win_off, win_off +
                // win_len) writable; no translated code of this vCPU runs
                // while it links, and only this vCPU uses the arena.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        bytes.as_ptr(),
                        self.win.add(off - self.win_off),
                        bytes.len(),
                    )
                };
                return true;
            }
            // SAFETY: a write of our own buffer into our own memfd, inside
            // its size.
            let n = unsafe {
                libc::pwrite(
                    self.fd,
                    bytes.as_ptr() as *const libc::c_void,
                    bytes.len(),
                    off as libc::off_t,
                )
            };
            return n == bytes.len() as isize;
        }
        self.write_flipped(off, bytes)
    }

    /// Write `bytes` at arena offset `off` of the anonymous (not dual)
    /// arena between two protection flips of the pages it covers; false if
    /// a flip failed. The caller checked that `[off, off + len)` is inside
    /// the mapping; no translated code runs while this vCPU compiles or
    /// links, and only this vCPU uses the arena.
    fn write_flipped(&self, off: usize, bytes: &[u8]) -> bool {
        let first = off & !4095;
        let end = (off + bytes.len() + 4095) & !4095;
        // SAFETY: [first, end) is inside the mapping (the caller's check),
        // and nothing else reads or runs these bytes meanwhile (above).
        unsafe {
            let page = self.base.add(first) as *mut libc::c_void;
            if libc::mprotect(page, end - first, libc::PROT_READ | libc::PROT_WRITE) != 0 {
                return false;
            }
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.add(off), bytes.len());
            libc::mprotect(page, end - first, libc::PROT_READ | libc::PROT_EXEC) == 0
        }
    }

    /// Copy `code` into executable memory; None if that failed.
    fn put(&mut self, code: &[u8]) -> Option<*const u8> {
        if code.len() > ARENA_SIZE {
            return None;
        }
        if self.base.is_null() && !self.map() {
            return None;
        }
        if self.used + code.len() > ARENA_SIZE {
            // Every older translation becomes stale (blocks check `gen`).
            self.gen += 1;
            self.used = 0;
        }
        let at = self.used;
        if self.dual() {
            let dst = self.window(at, at + code.len())?;
            // SAFETY: `dst` maps arena bytes [at, at + len); no translated
            // code runs while this vCPU compiles, only this vCPU uses the
            // arena, and the bytes are not reachable as code until a
            // block's state names them (after this returns).
            unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), dst, code.len()) };
        } else if !self.write_flipped(at, code) {
            return None;
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
    /// The perf map, once a translation was recorded in it.
    perf_file: Option<std::fs::File>,
    arena: Arena,
    /// Blocks compiled (statistics).
    pub compiled: u64,
    /// Links for RET, indexed by a hash of the return address.
    ret_links: Box<[LinkCell]>,
    /// Dispatcher trips by cause.
    #[cfg(feature = "jit-trips")]
    pub trips: super::trips::Trips,
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
            perf_file: None,
            arena: Arena::default(),
            compiled: 0,
            #[cfg(feature = "jit-trips")]
            trips: Default::default(),
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
        self.arena.anon_only = cfg.perf_map;
        if cfg.perf_map && self.perf_file.is_none() {
            // Opened here, where the embedder makes the vCPU, so that a
            // vCPU thread whose system calls are filtered need not open it.
            self.perf_file = open_perf_map();
        }
    }

    /// The arena generation: code and links of older ones are dead.
    pub fn gen(&self) -> u64 {
        self.arena.gen
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

    /// Point the patch sites of `cell` (an exit of a block whose code is
    /// from the current generation) at `chain`, the chained entry of
    /// `block`, its new successor. False if the keyed site could not be
    /// written (the caller leaves the cell unlinked). A direct site is
    /// pointed at the successor only if that lies in the exiting block's
    /// physical page, else back at the key check; one that cannot be
    /// written still leads to a block of that page at the same RIP, or to
    /// the key check, either of which is right (see the module notes).
    fn patch_sites(&self, cell: &LinkCell, block: &Block, chain: usize) -> bool {
        if cell.patched.get() == chain {
            return true;
        }
        let d = cell.direct.get();
        if d != 0 {
            let to = if block.phys & !0xfff == cell.page.get() {
                chain
            } else {
                d + 4
            };
            self.arena.patch_jump(d, to);
        }
        let k = cell.keyed.get();
        if k != 0 && !self.arena.patch_jump(k, chain) {
            cell.patched.set(0);
            return false;
        }
        cell.patched.set(chain);
        true
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

/// The host runs LAHF/SAHF in 64-bit mode (CPUID 8000_0001h ECX bit 0),
/// which generated code uses to hand the guest flags on between blocks.
/// Every x86-64 CPU since 2006 has it; without it nothing is translated.
fn host_has_lahf() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        let max = std::arch::x86_64::__cpuid(0x8000_0000).eax;
        max >= 0x8000_0001 && std::arch::x86_64::__cpuid(0x8000_0001).ecx & 1 != 0
    })
}

fn compile(core: &mut Core, block: &Block) -> Option<(JitFn, usize)> {
    if !host_has_lahf() {
        return None;
    }
    for l in &block.links {
        l.key.set(u64::MAX);
        l.gen.set(u64::MAX);
        l.src_gen.set(u64::MAX);
    }
    let (code, chain, sites) = super::codegen::gen_block(
        block,
        core.st.stack_size(),
        core.timed_polls,
        // A self-loop would run past a host breakpoint at its start
        // without coming back to the run loop (arming flushes the cache).
        !core.trace && !core.host_debug.armed,
    )?;
    let gen = core.jit.arena.gen;
    let p = core.jit.arena.put(&code)?;
    if core.jit.arena.gen != gen {
        // The arena was recycled: links into it must not be followed.
        core.tlb.flush_all();
    }
    // The exits' patch sites, unpatched (each jumps to the instruction
    // after it) until `link` patches them.
    for (l, (keyed, direct)) in block.links.iter().zip(sites) {
        let at = |off: usize| if off == 0 { 0 } else { p as usize + off };
        l.keyed.set(at(keyed));
        l.direct.set(at(direct));
        l.page.set(block.phys & !0xfff);
        l.src_gen.set(core.jit.arena.gen);
        l.patched.set(0);
    }
    core.jit.compiled += 1;
    if core.jit.perf_map {
        // perf's JIT symbol map: `perf report` names samples by guest RIP.
        // Opened once per core (appends from several vCPUs interleave
        // whole lines: each is one write of an O_APPEND file).
        use std::io::Write;
        if core.jit.perf_file.is_none() {
            core.jit.perf_file = open_perf_map();
        }
        if let Some(f) = core.jit.perf_file.as_mut() {
            let line = format!("{:x} {:x} guest_{:x}\n", p as usize, code.len(), block.rip);
            let _ = f.write_all(line.as_bytes());
        }
    }
    // SAFETY: `p` is the start of the function just written.
    let f = unsafe { std::mem::transmute::<*const u8, JitFn>(p) };
    Some((f, p as usize + chain))
}

/// perf's map of JIT symbols for this process, for appending.
fn open_perf_map() -> Option<std::fs::File> {
    let path = format!("/tmp/perf-{}.map", std::process::id());
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .ok()
}

/// A direct link from compiled code to the compiled code of a successor
/// block (see the module notes for when it is followed).
#[repr(C)]
pub struct LinkCell {
    /// The link key (TLB epoch | user bit) the link was made or last
    /// checked under; u64::MAX: not linked.
    pub key: Cell<u64>,
    /// The arena generation of `code`.
    pub gen: Cell<u64>,
    /// The physical page the target's virtual page mapped to.
    pub phys: Cell<u64>,
    /// The successor's chained entry point.
    pub code: Cell<usize>,
    /// The successor's RIP (fixed at compile time unless `dynamic`).
    pub target: Cell<u64>,
    /// The exit's target is computed (RET): linking sets `target`.
    pub dynamic: Cell<bool>,
    /// The successor block (for the dispatcher).
    pub block: Cell<*const Block>,
    /// The keyed patch site: address of the displacement of the exit's
    /// `jmp rel32` after the link-key check (0: none, a computed target).
    pub keyed: Cell<usize>,
    /// The direct patch site before the key check (0: none, see the module
    /// notes).
    pub direct: Cell<usize>,
    /// The physical page of the block the cell belongs to.
    pub page: Cell<u64>,
    /// The arena generation of that block's code (and of its sites).
    pub src_gen: Cell<u64>,
    /// The chained entry the sites were last patched to (0: unpatched), so
    /// that linking again to the same code (after a key change) writes
    /// nothing.
    pub patched: Cell<usize>,
}

impl Default for LinkCell {
    fn default() -> Self {
        LinkCell {
            key: Cell::new(u64::MAX),
            gen: Cell::new(u64::MAX),
            phys: Cell::new(0),
            code: Cell::new(0),
            target: Cell::new(u64::MAX),
            dynamic: Cell::new(false),
            block: Cell::new(std::ptr::null()),
            keyed: Cell::new(0),
            direct: Cell::new(0),
            page: Cell::new(0),
            src_gen: Cell::new(u64::MAX),
            patched: Cell::new(0),
        }
    }
}

/// The block an exit's link cell leads to, if the link holds for `rip`
/// under link key `key` and the block's pages are unchanged (the
/// dispatcher's check; a cell from an older key is fetched again).
///
/// # Safety
/// `cell` must be 0 or point to a [`LinkCell`] of a live block or of the
/// core's return-address table.
pub unsafe fn linked_block(cell: usize, rip: u64, key: u64) -> Option<*const Block> {
    if cell == 0 {
        return None;
    }
    // SAFETY: per the contract.
    let cell = unsafe { &*(cell as *const LinkCell) };
    let b = cell.block.get();
    if cell.key.get() == key
        && cell.target.get() == rip
        && !b.is_null()
        // SAFETY: a linked cell's block is alive while its key holds (a
        // cache clear flushes the TLB).
        && unsafe { crate::frontend::decode::is_valid(&*b) }
    {
        Some(b)
    } else {
        None
    }
}

/// Link the exit whose cell is `cell` to `block`'s compiled code, just
/// fetched under link key `key` (its page's translation checked), and
/// patch the exit's jumps to lead there (see the module notes).
///
/// # Safety
/// `cell` must point to a [`LinkCell`] of a live block or of the core's
/// return-address table.
pub unsafe fn link(jit: &Jit, cell: usize, block: &Block, key: u64) {
    let gen = jit.arena.gen;
    // SAFETY: per the contract.
    let cell = unsafe { &*(cell as *const LinkCell) };
    if let JitState::Code(_, g, chain) = block.jit.get() {
        if g != gen {
            return;
        }
        if cell.dynamic.get() {
            // Not followed until complete: the key first invalidates it.
            cell.key.set(u64::MAX);
            cell.target.set(block.rip);
        }
        if cell.target.get() == block.rip {
            // Unlinked while the sites change: a keyed site that could not
            // be written must not be reached through a key that holds.
            cell.key.set(u64::MAX);
            cell.block.set(block);
            cell.code.set(chain);
            cell.phys.set(block.phys & !0xfff);
            cell.gen.set(gen);
            if cell.src_gen.get() == gen && !jit.patch_sites(cell, block, chain) {
                cell.gen.set(u64::MAX);
                return;
            }
            cell.key.set(key);
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
            // MOV CR3, INVLPG, WRMSR may have flushed the TLB, and a block
            // goes on after some of them: its exits compare this key.
            let user = core.user();
            core.jit.ctx.link_key = core.tlb.epoch | user as u64;
            core.jit.ctx.tlb = core.tlb.fast(user).as_ptr() as usize;
            core.st.rip = core.next_rip;
            if core.st.flags.op != crate::flags::FlagOp::None {
                core.st.settle_flags();
            }
            if core.io.request.is_some() || core.next_rip != next || core.end_block {
                core.jit.ctx.trip = super::why::INTERP as u64;
                (index + 1) | 1 << 32
            } else {
                0
            }
        }
        Err(e) => {
            core.jit.exc = Some(e);
            core.jit.ctx.trip = super::why::INTERP as u64;
            index | 1 << 32
        }
    }
}

/// Set what the generated code reads at run time (the TLB of the current
/// privilege class, the link key, ...), before entry.
pub fn prepare(core: &mut Core) {
    let user = core.user();
    core.jit.ctx.tlb = core.tlb.fast(user).as_ptr() as usize;
    core.jit.ctx.tlb_full = core.tlb.entries().as_ptr() as usize;
    let u = if user { PERM_USER as u64 } else { 0 };
    core.jit.ctx.ret_links = core.jit.ret_links.as_ptr() as usize;
    core.jit.ctx.link_key = core.tlb.epoch | user as u64;
    core.jit.ctx.gen = core.jit.arena.gen;
    core.jit.ctx.xmask = (PERM_NX | u as u8) as u64;
    core.jit.ctx.xwant = u;
    core.jit.ctx.attention = std::sync::Arc::as_ptr(&core.attention) as usize;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `mov eax, imm32; ret`, padded with NOPs to `len` bytes.
    fn ret_imm(v: u32, len: usize) -> Vec<u8> {
        let mut c = vec![0xb8];
        c.extend_from_slice(&v.to_le_bytes());
        c.push(0xc3);
        c.resize(len.max(6), 0x90);
        c
    }

    fn call(p: *const u8) -> u32 {
        // SAFETY: `p` is a function written by `Arena::put` just before.
        let f = unsafe { std::mem::transmute::<*const u8, extern "sysv64" fn() -> u32>(p) };
        f()
    }

    fn perms(p: *mut u8) -> String {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let start = format!("{:x}-", p as usize);
        let line = maps.lines().find(|l| l.starts_with(&start)).unwrap();
        line.split_whitespace().nth(1).unwrap().to_string()
    }

    #[test]
    fn the_arena_runs_what_it_was_given_through_the_window() {
        let mut a = Arena::default();
        let p1 = a.put(&ret_imm(0x1234_5678, 6)).expect("arena");
        let p2 = a.put(&ret_imm(42, 6)).expect("arena");
        // Both in one page: writing the second must not disturb the first.
        assert_eq!(p2 as usize - p1 as usize, 16);
        assert_eq!(call(p1), 0x1234_5678);
        assert_eq!(call(p2), 42);
        // Linux with memfd: the two-view arena, no protection flips; W^X
        // per view.
        assert!(a.dual(), "the arena fell back to mprotect on this host");
        assert_eq!(perms(a.base), "r-xs");
        assert_eq!(perms(a.win), "rw-s");
        // Fill past the first window (the window moves, one straddles its
        // end), then past the arena's end (a new generation).
        let mut all = vec![(p1, 0x1234_5678)];
        for i in 0..(WINDOW / 4000 + 2) as u32 {
            all.push((a.put(&ret_imm(i, 4000)).expect("arena"), i));
        }
        assert!(a.win_off > 0);
        for &(p, v) in &all {
            assert_eq!(call(p), v);
        }
        let gen = a.gen;
        while a.gen == gen {
            a.put(&ret_imm(0, 1 << 16)).expect("arena");
        }
        let p = a.put(&ret_imm(99, 6)).expect("arena");
        assert_eq!(p as usize - a.base as usize, 1 << 16);
        assert_eq!(call(p), 99);
        assert!(a.win_len <= WINDOW);
    }

    /// `jmp rel32` (to the next instruction), `mov eax, 1; ret`, `mov eax,
    /// 2; ret`: returns 1 until the jump is patched to the second return.
    fn two_ways() -> Vec<u8> {
        vec![
            0xe9, 0, 0, 0, 0, 0xb8, 1, 0, 0, 0, 0xc3, 0xb8, 2, 0, 0, 0, 0xc3,
        ]
    }

    #[test]
    fn patches_reach_code_inside_and_outside_the_window() {
        let mut a = Arena::default();
        let old = a.put(&two_ways()).expect("arena");
        assert_eq!(call(old), 1);
        // Move the window past `old`: its patch goes through pwrite.
        for i in 0..(WINDOW / 4000 + 2) as u32 {
            a.put(&ret_imm(i, 4000)).expect("arena");
        }
        assert!(a.win_off > old as usize - a.base as usize);
        let new = a.put(&two_ways()).expect("arena");
        for p in [old, new] {
            assert!(a.patch_jump(p as usize + 1, p as usize + 11));
            assert_eq!(call(p), 2);
            assert!(a.patch_jump(p as usize + 1, p as usize + 5));
            assert_eq!(call(p), 1);
        }
        assert!(a.dual());
        assert_eq!(perms(a.base), "r-xs");
        // Nothing outside this generation's code is written.
        assert!(!a.patch(a.base as usize + a.used, &[0]));
        assert!(!a.patch(a.base as usize - 1, &[0]));
    }

    #[test]
    fn the_fallback_arena_flips_protections() {
        let mut a = Arena::default();
        // SAFETY: a fresh private anonymous mapping, owned by `a`.
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
        assert_ne!(p, libc::MAP_FAILED);
        a.base = p as *mut u8;
        assert!(!a.dual());
        let q = a.put(&ret_imm(7, 6)).expect("fallback arena");
        assert_eq!(call(q), 7);
        assert_eq!(perms(a.base), "r-xp");
        let j = a.put(&two_ways()).expect("fallback arena");
        assert!(a.patch_jump(j as usize + 1, j as usize + 11));
        assert_eq!(call(j), 2);
        assert_eq!(perms(a.base), "r-xp");
    }
}
