//! Placing BARs in the host bridge's windows, as firmware would before the
//! OS runs. A bump allocator per window: devices are added once at VM
//! creation and never removed, so there is no freeing.

use crate::bus::PciError;
use crate::{BarKind, BarRegion};

/// A half-open address range `[start, end)` handed out front to back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressWindow {
    pub start: u64,
    pub end: u64,
    next: u64,
}

impl AddressWindow {
    pub fn new(start: u64, end: u64) -> Self {
        AddressWindow {
            start,
            end,
            next: start,
        }
    }

    /// `size` bytes aligned to `size` (BARs are naturally aligned).
    fn take(&mut self, size: u64) -> Option<u64> {
        if !size.is_power_of_two() {
            return None;
        }
        let base = self.next.checked_add(size - 1)? & !(size - 1);
        let end = base.checked_add(size)?;
        if end > self.end {
            return None;
        }
        self.next = end;
        Some(base)
    }
}

/// Windows for memory BARs below 4 GiB, optionally above 4 GiB, and I/O.
#[derive(Debug, Clone)]
pub struct BarAllocator {
    pub mmio32: AddressWindow,
    pub mmio64: Option<AddressWindow>,
    pub io: AddressWindow,
}

impl Default for BarAllocator {
    /// The windows this crate proposes (see the crate-level constants).
    fn default() -> Self {
        BarAllocator {
            mmio32: AddressWindow::new(crate::MMIO32_WINDOW_START, crate::MMIO32_WINDOW_END),
            mmio64: None,
            io: AddressWindow::new(crate::IO_WINDOW_START, crate::IO_WINDOW_END),
        }
    }
}

impl BarAllocator {
    pub fn new(mmio32: AddressWindow, mmio64: Option<AddressWindow>, io: AddressWindow) -> Self {
        BarAllocator { mmio32, mmio64, io }
    }

    /// An address for `bar`. 64-bit BARs go above 4 GiB when a 64-bit
    /// window exists (the DSDT must then declare it), else below.
    pub fn allocate(&mut self, bar: BarRegion) -> Result<u64, PciError> {
        let got = match bar.kind {
            BarKind::Io => self.io.take(bar.size),
            BarKind::Memory32 { .. } => self.mmio32.take(bar.size),
            BarKind::Memory64 { .. } => self
                .mmio64
                .as_mut()
                .and_then(|w| w.take(bar.size))
                .or_else(|| self.mmio32.take(bar.size)),
        };
        got.ok_or(PciError::NoSpace(bar.size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bar(size: u64, kind: BarKind) -> BarRegion {
        BarRegion {
            index: 0,
            size,
            kind,
        }
    }

    #[test]
    fn allocations_are_aligned_disjoint_and_bounded() {
        let mut a = BarAllocator::new(
            AddressWindow::new(0xc000_0000, 0xc001_0000),
            None,
            AddressWindow::new(0xc000, 0xc100),
        );
        let m32 = BarKind::Memory32 {
            prefetchable: false,
        };
        assert_eq!(a.allocate(bar(0x100, m32)), Ok(0xc000_0000));
        assert_eq!(a.allocate(bar(0x4000, m32)), Ok(0xc000_4000));
        assert_eq!(
            a.allocate(bar(
                0x8000,
                BarKind::Memory64 {
                    prefetchable: false
                }
            )),
            Ok(0xc000_8000)
        );
        assert_eq!(a.allocate(bar(0x10, m32)), Err(PciError::NoSpace(0x10)));
        assert_eq!(a.allocate(bar(0x20, BarKind::Io)), Ok(0xc000));
        assert_eq!(
            a.allocate(bar(0x100, BarKind::Io)),
            Err(PciError::NoSpace(0x100))
        );
    }

    #[test]
    fn sixty_four_bit_bars_prefer_the_high_window() {
        let mut a = BarAllocator::new(
            AddressWindow::new(0xc000_0000, 0xe000_0000),
            Some(AddressWindow::new(1 << 40, (1 << 40) + (1 << 30))),
            AddressWindow::new(0xc000, 0x10000),
        );
        assert_eq!(
            a.allocate(bar(1 << 20, BarKind::Memory64 { prefetchable: true })),
            Ok(1 << 40)
        );
        assert_eq!(a.allocate(bar(3, BarKind::Io)), Err(PciError::NoSpace(3)));
        let mut w = AddressWindow::new(u64::MAX - 0xfff, u64::MAX);
        assert_eq!(w.take(0x1000), None);
    }
}
