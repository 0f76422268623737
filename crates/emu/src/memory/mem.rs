//! Guest-physical memory as the engine sees it.
//!
//! RAM is a set of host-mapped regions (from `Vm::map_memory`); everything else
//! is MMIO and turns into an exit. Each RAM page has a code generation counter:
//! decoding a block marks its pages as code, and a write to a marked page bumps
//! the counter so every vCPU's cached blocks for that page become stale. That
//! holds for a device's writes too (DMA is coherent with instruction fetch):
//! the VMM's RAM bitmap calls [`Region::device_wrote`] after each one.
//!
//! Dirty logging (live migration) rides on the same per-page flag the write
//! fast path already checks: while logging, every page carries
//! [`FLAG_TRACK`]; the first write to it takes the slow path, which sets the
//! page's dirty bit and clears the flag, so later writes to it are fast
//! again until the log is collected (which re-arms every page). No TLB flush
//! is needed: TLB entries point at the flag, they do not copy it.

use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, RwLock};

pub const PAGE_SIZE: u64 = 4096;
pub const PAGE_SHIFT: u32 = 12;

/// One host-mapped RAM region.
pub struct Region {
    pub gpa: u64,
    pub size: u64,
    host: *mut u8,
    /// Per 4 KiB page: bumped whenever a page marked as code is written.
    code_gen: Box<[AtomicU32]>,
    /// Per page: [`FLAG_CODE`] while some decoded block depends on the
    /// page, [`FLAG_TRACK`] while dirty logging waits for its first write.
    has_code: Box<[AtomicU8]>,
    /// Dirty log: one bit per page.
    dirty: Box<[AtomicU64]>,
}

/// A decoded block depends on the page.
pub const FLAG_CODE: u8 = 1;
/// Dirty logging is on and the page has not been written since the log
/// was last collected.
pub const FLAG_TRACK: u8 = 2;

// SAFETY: the host range is guaranteed valid for the VM's lifetime by the
// `Vm::map_memory` contract; concurrent guest access is the guest's business
// and goes through atomics or plain loads/stores of at most 8 bytes.
unsafe impl Send for Region {}
// SAFETY: as for Send: the range stays valid, and threads sharing a region
// only read its bounds, update its flags, generations and dirty bits
// atomically, and reach guest RAM through atomics or plain accesses of at
// most 8 bytes.
unsafe impl Sync for Region {}

impl Region {
    /// # Safety
    /// `host..host+size` must stay mapped and writable while the region lives.
    pub unsafe fn new(gpa: u64, size: u64, host: *mut u8) -> Region {
        let pages = size.div_ceil(PAGE_SIZE) as usize;
        Region {
            gpa,
            size,
            host,
            code_gen: (0..pages).map(|_| AtomicU32::new(0)).collect(),
            has_code: (0..pages).map(|_| AtomicU8::new(0)).collect(),
            dirty: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Take (and clear) the dirty bits, then re-arm tracking on every page.
    /// A write's slow path clears the flag and, only if it was the one to
    /// clear it, sets the bit afterwards; so a page written since the last
    /// collection always ends with its flag armed or its bit set (never
    /// neither): a racing write lands in the bits taken now or the next.
    pub fn collect_dirty(&self) -> Vec<u64> {
        let taken = self
            .dirty
            .iter()
            .map(|w| w.swap(0, Ordering::SeqCst))
            .collect();
        for f in self.has_code.iter() {
            f.fetch_or(FLAG_TRACK, Ordering::SeqCst);
        }
        taken
    }

    /// Stop tracking: clear every page's track flag and dirty bit.
    pub fn stop_tracking(&self) {
        for f in self.has_code.iter() {
            f.fetch_and(!FLAG_TRACK, Ordering::SeqCst);
        }
        for w in self.dirty.iter() {
            w.store(0, Ordering::SeqCst);
        }
    }

    /// A device (a VMM thread, not a vCPU) wrote `[offset, offset + len)`
    /// of the region, offsets from its start; called after the write.
    /// Decoded code of those pages becomes stale, as a vCPU's write would
    /// make it. Pages without decoded code cost one flag load each. The
    /// dirty log is not touched: device writes are in the VMM's own bitmap
    /// (`hypervisor::RamBitmap`), which migration reads beside this one.
    pub fn device_wrote(&self, offset: usize, len: usize) {
        if len == 0 {
            return;
        }
        let pages = self.has_code.len();
        let first = offset >> PAGE_SHIFT;
        let last = (offset.saturating_add(len - 1) >> PAGE_SHIFT).min(pages.saturating_sub(1));
        // The device's stores before the flag loads: with `mark_code`'s
        // mark-then-read, either the decoder reads the new bytes or this
        // sees the mark and bumps the generation.
        std::sync::atomic::fence(Ordering::SeqCst);
        for p in first..=last {
            if p >= pages {
                break;
            }
            if self.has_code[p].load(Ordering::Relaxed) & FLAG_CODE != 0 {
                self.drop_code(p);
            }
        }
    }

    /// Page `p` was written while it held decoded code: it is no longer a
    /// code page, and its generation moves on so every block and link over
    /// it fails its check (for vCPU and device writes alike).
    #[inline]
    fn drop_code(&self, p: usize) {
        self.has_code[p].fetch_and(!FLAG_CODE, Ordering::SeqCst);
        self.code_gen[p].fetch_add(1, Ordering::SeqCst);
    }

    #[inline]
    pub fn contains(&self, gpa: u64) -> bool {
        gpa.wrapping_sub(self.gpa) < self.size
    }

    /// Host pointer of `gpa`, which must be inside the region.
    #[inline]
    pub fn host_ptr(&self, gpa: u64) -> *mut u8 {
        // SAFETY (of later dereferences): offset < size, checked by callers via `contains`.
        self.host.wrapping_add((gpa - self.gpa) as usize)
    }

    #[inline]
    fn page_index(&self, gpa: u64) -> usize {
        ((gpa - self.gpa) >> PAGE_SHIFT) as usize
    }
}

/// The VM's physical address space, shared by all its vCPUs.
#[derive(Default)]
pub struct PhysMem {
    regions: RwLock<Arc<Vec<Arc<Region>>>>,
    /// Bumped on every map change, so vCPUs refresh their snapshot.
    pub generation: AtomicU64,
}

impl PhysMem {
    pub fn new() -> Arc<PhysMem> {
        Arc::new(PhysMem::default())
    }

    /// # Safety
    /// See [`Region::new`].
    pub unsafe fn map(&self, gpa: u64, size: u64, host: *mut u8) {
        let region = Arc::new(Region::new(gpa, size, host));
        let mut g = self.regions.write().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<Arc<Region>> = g.iter().filter(|r| r.gpa != gpa).cloned().collect();
        v.push(region);
        v.sort_by_key(|r| r.gpa);
        *g = Arc::new(v);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    pub fn snapshot(&self) -> Arc<Vec<Arc<Region>>> {
        self.regions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// A vCPU's view of physical memory: a snapshot of the region list.
#[derive(Clone)]
pub struct MemView {
    pub phys: Arc<PhysMem>,
    regions: Arc<Vec<Arc<Region>>>,
    seen_gen: u64,
}

/// Where a physical address lives.
pub enum Loc<'a> {
    Ram(&'a Region),
    Mmio,
}

impl MemView {
    pub fn new(phys: Arc<PhysMem>) -> MemView {
        let seen_gen = phys.generation.load(Ordering::SeqCst);
        let regions = phys.snapshot();
        MemView {
            phys,
            regions,
            seen_gen,
        }
    }

    /// Pick up map changes; returns true if something changed.
    pub fn refresh(&mut self) -> bool {
        let g = self.phys.generation.load(Ordering::SeqCst);
        if g != self.seen_gen {
            self.regions = self.phys.snapshot();
            self.seen_gen = g;
            true
        } else {
            false
        }
    }

    #[inline]
    pub fn region(&self, gpa: u64) -> Option<&Region> {
        self.regions.iter().find(|r| r.contains(gpa)).map(|r| &**r)
    }

    /// Host pointer to RAM at `gpa` valid for `len` bytes, or None for MMIO.
    #[inline]
    pub fn ram_ptr(&self, gpa: u64, len: u64) -> Option<*mut u8> {
        let r = self.region(gpa)?;
        if gpa - r.gpa + len <= r.size {
            Some(r.host_ptr(gpa))
        } else {
            None
        }
    }

    /// Read up to 8 bytes of RAM. None if any part is not RAM.
    pub fn read_phys(&self, gpa: u64, size: u8) -> Option<u64> {
        let p = self.ram_ptr(gpa, size as u64)?;
        // SAFETY: p..p+size is inside a mapped region.
        Some(unsafe { load(p, size) })
    }

    /// Write up to 8 bytes of RAM, with code-page tracking. False if not RAM.
    pub fn write_phys(&self, gpa: u64, size: u8, val: u64) -> bool {
        let Some(r) = self.region(gpa) else {
            return false;
        };
        if gpa - r.gpa + size as u64 > r.size {
            return false;
        }
        // SAFETY: inside the region.
        unsafe { store(r.host_ptr(gpa), size, val) };
        self.note_write(r, gpa, size as u64);
        true
    }

    /// Atomically OR bits into an aligned 8-byte RAM word (page-table A/D bits).
    pub fn fetch_or_phys_u64(&self, gpa: u64, bits: u64) -> bool {
        let Some(r) = self.region(gpa) else {
            return false;
        };
        if gpa & 7 != 0 || gpa - r.gpa + 8 > r.size {
            return false;
        }
        // SAFETY: aligned and inside the region.
        unsafe { (*(r.host_ptr(gpa) as *const AtomicU64)).fetch_or(bits, Ordering::SeqCst) };
        self.note_write(r, gpa, 8);
        true
    }

    /// Same for a 4-byte word (32-bit paging).
    pub fn fetch_or_phys_u32(&self, gpa: u64, bits: u32) -> bool {
        let Some(r) = self.region(gpa) else {
            return false;
        };
        if gpa & 3 != 0 || gpa - r.gpa + 4 > r.size {
            return false;
        }
        // SAFETY: aligned and inside the region.
        unsafe { (*(r.host_ptr(gpa) as *const AtomicU32)).fetch_or(bits, Ordering::SeqCst) };
        self.note_write(r, gpa, 4);
        true
    }

    /// Invalidate decoded code on the pages `[gpa, gpa+len)` touch.
    #[inline]
    pub fn note_write(&self, r: &Region, gpa: u64, len: u64) {
        let first = r.page_index(gpa);
        let last = r.page_index(gpa + len.max(1) - 1);
        for p in first..=last.min(r.has_code.len() - 1) {
            let flags = r.has_code[p].load(Ordering::Relaxed);
            if flags & FLAG_TRACK != 0
                && r.has_code[p].fetch_and(!FLAG_TRACK, Ordering::SeqCst) & FLAG_TRACK != 0
            {
                // See `Region::collect_dirty` for the order.
                r.dirty[p / 64].fetch_or(1 << (p % 64), Ordering::SeqCst);
            }
            if flags & FLAG_CODE != 0 {
                r.drop_code(p);
            }
        }
    }

    /// True if a write to this physical page must go through `note_write`.
    #[inline]
    pub fn page_has_code(&self, gpa: u64) -> bool {
        match self.region(gpa) {
            Some(r) => r.has_code[r.page_index(gpa)].load(Ordering::Relaxed) & FLAG_CODE != 0,
            None => false,
        }
    }

    /// Mark a page as holding decoded code and return its current generation.
    /// The mark comes before the caller reads the bytes, so a racing write
    /// either lands before the read or bumps the generation after it.
    pub fn mark_code(&self, gpa: u64) -> Option<u32> {
        let r = self.region(gpa)?;
        let p = r.page_index(gpa);
        r.has_code[p].fetch_or(FLAG_CODE, Ordering::SeqCst);
        Some(r.code_gen[p].load(Ordering::SeqCst))
    }

    /// The page's code flag, for the TLB to check on the write fast path.
    pub fn code_flag(&self, gpa: u64) -> *const AtomicU8 {
        match self.region(gpa) {
            Some(r) => &r.has_code[r.page_index(gpa)] as *const AtomicU8,
            None => std::ptr::null(),
        }
    }

    /// `note_write` by physical address; true if decoded code was invalidated.
    pub fn note_write_gpa(&self, gpa: u64, len: u64) -> bool {
        match self.region(gpa) {
            Some(r) => {
                let had = self.page_has_code(gpa) || self.page_has_code(gpa + len.max(1) - 1);
                self.note_write(r, gpa, len);
                had
            }
            None => false,
        }
    }

    /// The page's generation counter, for blocks to check cheaply. Valid
    /// while this view's region snapshot lives.
    pub fn code_gen_ptr(&self, gpa: u64) -> *const AtomicU32 {
        match self.region(gpa) {
            Some(r) => &r.code_gen[r.page_index(gpa)] as *const AtomicU32,
            None => std::ptr::null(),
        }
    }

    pub fn code_gen(&self, gpa: u64) -> Option<u32> {
        let r = self.region(gpa)?;
        Some(r.code_gen[r.page_index(gpa)].load(Ordering::SeqCst))
    }
}

/// Load `size` bytes little-endian from a host pointer.
///
/// # Safety
/// `p..p+size` must be valid for reads.
#[inline(always)]
pub unsafe fn load(p: *const u8, size: u8) -> u64 {
    match size {
        1 => *p as u64,
        2 => (p as *const u16).read_unaligned() as u64,
        4 => (p as *const u32).read_unaligned() as u64,
        _ => (p as *const u64).read_unaligned(),
    }
}

/// Store `size` bytes little-endian to a host pointer.
///
/// # Safety
/// `p..p+size` must be valid for writes.
#[inline(always)]
pub unsafe fn store(p: *mut u8, size: u8, v: u64) {
    match size {
        1 => *p = v as u8,
        2 => (p as *mut u16).write_unaligned(v as u16),
        4 => (p as *mut u32).write_unaligned(v as u32),
        _ => (p as *mut u64).write_unaligned(v),
    }
}

/// Atomic compare-and-swap of `size` bytes at an aligned host pointer.
/// Returns the value found (equal to `old` on success).
///
/// # Safety
/// `p` must be valid and aligned to `size`.
pub unsafe fn cas(p: *mut u8, size: u8, old: u64, new: u64) -> u64 {
    let r = match size {
        1 => (*(p as *const AtomicU8))
            .compare_exchange(old as u8, new as u8, Ordering::SeqCst, Ordering::SeqCst)
            .map(|v| v as u64)
            .map_err(|v| v as u64),
        2 => (*(p as *const AtomicU16))
            .compare_exchange(old as u16, new as u16, Ordering::SeqCst, Ordering::SeqCst)
            .map(|v| v as u64)
            .map_err(|v| v as u64),
        4 => (*(p as *const AtomicU32))
            .compare_exchange(old as u32, new as u32, Ordering::SeqCst, Ordering::SeqCst)
            .map(|v| v as u64)
            .map_err(|v| v as u64),
        _ => (*(p as *const AtomicU64)).compare_exchange(
            old,
            new,
            Ordering::SeqCst,
            Ordering::SeqCst,
        ),
    };
    match r {
        Ok(v) | Err(v) => v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the vCPU write fast path does: store, then the slow path only
    /// if the page's flag says so.
    fn fast_write(view: &MemView, gpa: u64, val: u8) {
        let p = view.ram_ptr(gpa, 1).unwrap();
        // SAFETY: inside the test's RAM.
        unsafe { store(p, 1, val as u64) };
        let flag = view.code_flag(gpa);
        // SAFETY: the flag lives as long as the view's regions.
        if unsafe { (*flag).load(Ordering::Relaxed) } != 0 {
            view.note_write_gpa(gpa, 1);
        }
    }

    fn ram(pages: usize) -> (Vec<u8>, Arc<PhysMem>, MemView, Arc<Region>) {
        let mut ram = vec![0u8; pages * PAGE_SIZE as usize];
        let phys = PhysMem::new();
        // SAFETY: the Vec outlives every use in the test (returned with it).
        unsafe { phys.map(0, ram.len() as u64, ram.as_mut_ptr()) };
        let view = MemView::new(phys.clone());
        let r = phys.snapshot()[0].clone();
        (ram, phys, view, r)
    }

    #[test]
    fn the_dirty_log_names_the_pages_written_since_the_last_collection() {
        let (_ram, _phys, view, r) = ram(16);
        r.collect_dirty(); // logging starts
        fast_write(&view, 3 * 4096 + 8, 1);
        fast_write(&view, 3 * 4096 + 9, 2);
        assert!(view.write_phys(9 * 4096, 1, 1));
        assert_eq!(r.collect_dirty(), vec![(1 << 3) | (1 << 9)]);
        assert_eq!(r.collect_dirty(), vec![0]);
        fast_write(&view, 3 * 4096, 3);
        assert_eq!(r.collect_dirty(), vec![1 << 3]);
        // A code page stays a code page: a write is both logged and
        // invalidates its decoded blocks.
        let gen = view.mark_code(5 * 4096).unwrap();
        fast_write(&view, 5 * 4096, 1);
        assert_eq!(view.code_gen(5 * 4096), Some(gen + 1));
        assert_eq!(r.collect_dirty(), vec![1 << 5]);
        assert!(!view.page_has_code(5 * 4096));
        // Stopped: writes are fast and unlogged again.
        r.stop_tracking();
        fast_write(&view, 7 * 4096, 1);
        assert!(!view.code_flag(7 * 4096).is_null());
        assert_eq!(
            // SAFETY: the flag lives as long as the view's regions.
            unsafe { (*view.code_flag(7 * 4096)).load(Ordering::SeqCst) },
            0
        );
        assert_eq!(r.collect_dirty(), vec![0]);
    }

    #[test]
    fn a_device_write_makes_decoded_code_of_its_pages_stale() {
        let (_ram, _phys, view, r) = ram(8);
        let g2 = view.mark_code(2 * 4096).unwrap();
        let g3 = view.mark_code(3 * 4096).unwrap();
        let g6 = view.mark_code(6 * 4096).unwrap();
        r.collect_dirty(); // logging on: a device write must not clear its flag
                           // The last byte of page 2 through the first of page 3.
        r.device_wrote(2 * 4096 + 4095, 2);
        assert_eq!(view.code_gen(2 * 4096), Some(g2 + 1));
        assert_eq!(view.code_gen(3 * 4096), Some(g3 + 1));
        assert!(!view.page_has_code(2 * 4096) && !view.page_has_code(3 * 4096));
        // Not a code page any more: a second write bumps nothing.
        r.device_wrote(2 * 4096, 8);
        assert_eq!(view.code_gen(2 * 4096), Some(g2 + 1));
        // Other pages keep their code; past the end and empty are ignored.
        r.device_wrote(7 * 4096, 1 << 20);
        r.device_wrote(6 * 4096, 0);
        r.device_wrote(100 * 4096, 8);
        assert_eq!(view.code_gen(6 * 4096), Some(g6));
        assert!(view.page_has_code(6 * 4096));
        // The engine's own log is the vCPUs' (see `device_wrote`).
        assert_eq!(r.collect_dirty(), vec![0]);
    }

    #[test]
    fn a_write_racing_with_a_collection_is_never_lost() {
        let (_ram, _phys, view, r) = ram(1);
        r.collect_dirty();
        for i in 0..2000u32 {
            let barrier = Arc::new(std::sync::Barrier::new(2));
            let (b, v) = (barrier.clone(), view.clone());
            let writer = std::thread::spawn(move || {
                b.wait();
                fast_write(&v, 64, i as u8);
            });
            barrier.wait();
            let during = r.collect_dirty()[0];
            writer.join().unwrap();
            let after = r.collect_dirty()[0];
            assert_eq!(during | after, 1, "round {i}: the write was lost");
        }
    }
}
