//! The page bitmap of guest RAM as the VMM's own threads (devices) write it.
//!
//! Every write through vm-memory ([`crate::GuestRam`]: used rings, net RX,
//! fw_cfg DMA, ...) and every write a device makes through a raw pointer
//! into guest RAM (zero-copy block reads, which then call `mark_dirty`
//! themselves) ends in [`RamBitmap::mark_dirty`], after the bytes are
//! written. It does two things:
//!
//! - it sets the written pages' bits, which live migration reads and resets
//!   ([`RamBitmap::get_and_reset`]) beside the backend's own dirty log (which
//!   only sees vCPU writes);
//! - it tells the backend, when the backend asked for it
//!   ([`crate::Vm::device_write_watch`]), which bytes changed. Hardware
//!   keeps DMA coherent with instruction fetch, so a software CPU must
//!   drop translated code of a page a device overwrote, or run the old
//!   code: the engine's watch bumps the page's code generation.
//!
//! Invariants: a page written before `mark_dirty` returns has its bit set
//! until the next `get_and_reset` takes it (a bit already set is only
//! read, not written again, so repeated DMA into the same buffers costs no
//! locked instruction; the fence before that read keeps a concurrent
//! `get_and_reset` from taking the bit before the data is visible). The
//! watch is installed at most once per region, when the backend maps it.

use std::fmt;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use vm_memory::bitmap::{Bitmap, NewBitmap, RefSlice, WithBitmapSlice};

/// Pages the bitmap counts in (the host's and the dirty logs' page size).
const PAGE_SHIFT: u32 = 12;

/// A backend that must learn which guest bytes a device wrote.
pub trait DeviceWriteWatch: Send + Sync {
    /// `[offset, offset + len)` of the region (offsets from its start) was
    /// written by a VMM thread; called after the bytes are in guest RAM.
    /// Offsets past the region's end are ignored.
    fn device_wrote(&self, offset: usize, len: usize);
}

/// One bit per 4 KiB page of a guest RAM region, and the backend's watch.
#[derive(Default)]
pub struct RamBitmap {
    words: Box<[AtomicU64]>,
    pages: usize,
    watch: OnceLock<Arc<dyn DeviceWriteWatch>>,
}

impl RamBitmap {
    /// Have `watch` told of every later device write to this region.
    /// False if a watch was installed already (it stays).
    pub fn set_watch(&self, watch: Arc<dyn DeviceWriteWatch>) -> bool {
        self.watch.set(watch).is_ok()
    }

    /// Take and clear the bits: bit `i % 64` of word `i / 64` is page `i`.
    pub fn get_and_reset(&self) -> Vec<u64> {
        self.words
            .iter()
            .map(|w| w.swap(0, Ordering::SeqCst))
            .collect()
    }
}

impl fmt::Debug for RamBitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RamBitmap")
            .field("pages", &self.pages)
            .field("watched", &self.watch.get().is_some())
            .finish()
    }
}

impl<'a> WithBitmapSlice<'a> for RamBitmap {
    type S = RefSlice<'a, Self>;
}

impl Bitmap for RamBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if len == 0 || self.pages == 0 {
            return;
        }
        let first = offset >> PAGE_SHIFT;
        let last = (offset.saturating_add(len - 1) >> PAGE_SHIFT).min(self.pages - 1);
        // The caller's writes before our reads of the bits and of the
        // watch's flags (see the module doc).
        fence(Ordering::SeqCst);
        let mut p = first;
        while p <= last {
            let w = p / 64;
            let hi = last.min(w * 64 + 63);
            let n = hi - p + 1;
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << (p % 64)
            };
            let word = &self.words[w];
            if word.load(Ordering::Relaxed) & mask != mask {
                word.fetch_or(mask, Ordering::SeqCst);
            }
            p = hi + 1;
        }
        if let Some(watch) = self.watch.get() {
            watch.device_wrote(offset, len);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        let p = offset >> PAGE_SHIFT;
        p < self.pages && self.words[p / 64].load(Ordering::SeqCst) & (1 << (p % 64)) != 0
    }

    fn slice_at(&self, offset: usize) -> RefSlice<'_, Self> {
        RefSlice::new(self, offset)
    }
}

impl NewBitmap for RamBitmap {
    fn with_len(len: usize) -> Self {
        let pages = len.div_ceil(1 << PAGE_SHIFT);
        RamBitmap {
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            pages,
            watch: OnceLock::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ops::Deref;
    use std::sync::Mutex;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

    #[derive(Default)]
    struct Log(Mutex<Vec<(usize, usize)>>);

    impl DeviceWriteWatch for Log {
        fn device_wrote(&self, offset: usize, len: usize) {
            self.0.lock().unwrap().push((offset, len));
        }
    }

    #[test]
    fn marks_pages_across_words_and_ignores_the_outside() {
        let b = RamBitmap::with_len(130 * 4096 + 1);
        assert_eq!(b.pages, 131);
        b.mark_dirty(63 * 4096 + 4095, 2); // pages 63 and 64: two words
        b.mark_dirty(66 * 4096, 64 * 4096); // pages 66..=129
        b.mark_dirty(130 * 4096, 1 << 40); // the last page, and beyond
        b.mark_dirty(200 * 4096, 8); // outside: ignored
        b.mark_dirty(5 * 4096, 0); // nothing
        let w = b.get_and_reset();
        assert_eq!(w[0], 1 << 63);
        assert_eq!(w[1], 1 | (u64::MAX << 2));
        assert_eq!(w[2], 0b111);
        assert_eq!(w.len(), 3);
        assert_eq!(b.get_and_reset(), vec![0, 0, 0]);
        assert!(!b.dirty_at(64 * 4096));
    }

    #[test]
    fn writes_through_guest_ram_reach_the_bits_and_the_watch() {
        let mem = crate::GuestRam::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x100000), 0x10000),
        ])
        .unwrap();
        let log = Arc::new(Log::default());
        let r1 = mem.iter().nth(1).unwrap();
        assert!(r1.deref().bitmap().set_watch(log.clone()));
        assert!(
            !r1.deref().bitmap().set_watch(log.clone()),
            "a second watch"
        );
        // A write into the unwatched region: bits only.
        mem.write_slice(&[1; 8], GuestAddress(0x3000)).unwrap();
        // Into the watched one, by region offset, straddling two pages.
        mem.write_slice(&[2; 16], GuestAddress(0x101ff8)).unwrap();
        // A raw write marked through a slice, as zero-copy reads do.
        let s = mem.get_slice(GuestAddress(0x104000), 4096).unwrap();
        s.bitmap().mark_dirty(0, 4096);
        assert_eq!(*log.0.lock().unwrap(), vec![(0x1ff8, 16), (0x4000, 4096)]);
        let bits: Vec<Vec<u64>> = mem
            .iter()
            .map(|r| r.deref().bitmap().get_and_reset())
            .collect();
        assert_eq!(bits, vec![vec![1 << 3], vec![0b10110]]);
    }
}
