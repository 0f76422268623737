//! Vireo's device models for the legacy PC platform.
//!
//! Devices never know which vCPU backend runs the guest: they only see port
//! or MMIO accesses dispatched through a [`Bus`], raise interrupts through a
//! [`hypervisor::IrqLine`], and report machine-wide requests (power off,
//! reset) through an [`EventSink`].
//!
//! Every device keeps its guest-visible state in a plain serde struct and
//! implements [`persist::Persist`] (the one persistence trait every device
//! crate uses), so that snapshots are a matter of saving and loading those
//! structs.

pub mod acpi;
pub mod debug_exit;
pub mod i8042;
pub mod persist;
pub mod rtc;
pub mod serial;
pub mod sink;

pub use persist::{Persist, PersistError};

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

/// A device reachable through a [`Bus`]. `offset` is relative to the base the
/// device was inserted at; `data.len()` is the access width (any width the
/// guest uses: devices must clamp or ignore what they do not decode).
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Why a device could not be placed on a bus.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    #[error("device range at {base:#x} has zero length")]
    ZeroLength { base: u64 },
    #[error("device range {base:#x}+{len:#x} runs past the end of the address space")]
    Overflow { base: u64, len: u64 },
    #[error(
        "device range {base:#x}+{len:#x} overlaps the device at {other_base:#x}+{other_len:#x}"
    )]
    Overlap {
        base: u64,
        len: u64,
        other_base: u64,
        other_len: u64,
    },
}

/// A machine-wide request a device makes on behalf of the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum VmEvent {
    PowerOff,
    Reset,
    /// The guest wrote this value to the exit device ([`debug_exit`]).
    GuestExit(u32),
    /// The guest kernel reported a panic through pvpanic (`--pvpanic`);
    /// `crash_loaded`: a crash kernel (kdump) is loaded and will take over.
    GuestPanic {
        crash_loaded: bool,
    },
}

/// Where devices send [`VmEvent`]s; the VMM decides what to do with them.
pub type EventSink = Arc<dyn Fn(VmEvent) + Send + Sync>;

#[derive(Clone)]
struct BusEntry {
    len: u64,
    dev: Arc<Mutex<dyn BusDevice>>,
}

/// A map from address ranges to devices, used both for the port I/O space
/// and for MMIO. Shared by all vCPU threads: lookups take a read lock only
/// long enough to clone the device's `Arc`, so accesses to different devices
/// never serialize on the bus.
#[derive(Default)]
pub struct Bus {
    devices: RwLock<BTreeMap<u64, BusEntry>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let map = self.devices.read().unwrap_or_else(|e| e.into_inner());
        f.debug_list()
            .entries(map.iter().map(|(b, e)| (*b, e.len)))
            .finish()
    }
}

fn end_of(base: u64, len: u64) -> u128 {
    base as u128 + len as u128
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Place `dev` at `base..base+len`. Refuses empty ranges, ranges past
    /// the end of the 64-bit space and any overlap with a device already
    /// there.
    pub fn insert(
        &self,
        base: u64,
        len: u64,
        dev: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength { base });
        }
        let end = end_of(base, len);
        if end > u64::MAX as u128 + 1 {
            return Err(BusError::Overflow { base, len });
        }
        let mut map = self.devices.write().unwrap_or_else(|e| e.into_inner());
        // Ranges in the map never overlap each other, so the only candidate
        // for an overlap is the last range starting below our end.
        let last_below_end = if end > u64::MAX as u128 {
            map.range(..).next_back()
        } else {
            map.range(..end as u64).next_back()
        };
        if let Some((&other_base, other)) = last_below_end {
            if end_of(other_base, other.len) > base as u128 {
                return Err(BusError::Overlap {
                    base,
                    len,
                    other_base,
                    other_len: other.len,
                });
            }
        }
        map.insert(base, BusEntry { len, dev });
        Ok(())
    }

    /// Take the device inserted at exactly `base` off the bus.
    pub fn remove(&self, base: u64) -> Option<Arc<Mutex<dyn BusDevice>>> {
        let mut map = self.devices.write().unwrap_or_else(|e| e.into_inner());
        map.remove(&base).map(|e| e.dev)
    }

    /// The device covering `addr` and the offset of `addr` inside it.
    fn resolve(&self, addr: u64) -> Option<(u64, Arc<Mutex<dyn BusDevice>>)> {
        let map = self.devices.read().unwrap_or_else(|e| e.into_inner());
        let (&base, entry) = map.range(..=addr).next_back()?;
        let offset = addr - base;
        if offset < entry.len {
            Some((offset, entry.dev.clone()))
        } else {
            None
        }
    }

    /// Read from the device covering `addr`. Returns false when there is no
    /// device there (the caller then gives the guest all-ones). An access
    /// that starts inside a device goes to that device whole, even if it runs
    /// past the device's end: the device clamps it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, dev)) => {
                lock_device(&dev).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Write to the device covering `addr`; false when there is none.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((offset, dev)) => {
                lock_device(&dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// A device whose lock was poisoned by a panic in another thread still has
/// consistent register state (every handler updates plain fields), so keep
/// serving the guest rather than propagating the panic to every vCPU.
fn lock_device(dev: &Arc<Mutex<dyn BusDevice>>) -> MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
pub(crate) mod test_util {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use super::{EventSink, VmEvent};

    /// An interrupt line that counts its edges.
    #[derive(Default)]
    pub struct CountingIrq {
        count: AtomicUsize,
    }

    impl CountingIrq {
        pub fn count(&self) -> usize {
            self.count.load(Ordering::SeqCst)
        }
    }

    impl hypervisor::IrqLine for CountingIrq {
        fn trigger(&self) -> hypervisor::Result<()> {
            self.count.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    /// What a [`recording_sink`] has been sent.
    pub type Recorded = Arc<Mutex<Vec<VmEvent>>>;

    /// An event sink that records what it was sent.
    pub fn recording_sink() -> (EventSink, Recorded) {
        let events = Arc::new(Mutex::new(Vec::new()));
        let seen = events.clone();
        let sink: EventSink = Arc::new(move |e| seen.lock().unwrap().push(e));
        (sink, events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Remembers the last access it saw.
    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
        fill: u8,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.fill.wrapping_add(offset as u8).wrapping_add(i as u8);
            }
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    fn recorder(fill: u8) -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder {
            fill,
            ..Default::default()
        }))
    }

    #[test]
    fn bus_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Bus>();
    }

    #[test]
    fn dispatch_uses_offsets_relative_to_base() {
        let bus = Bus::new();
        let a = recorder(0x10);
        let b = recorder(0x80);
        bus.insert(0x3f8, 8, a.clone()).unwrap();
        bus.insert(0x400, 4, b.clone()).unwrap();

        let mut data = [0u8; 2];
        assert!(bus.read(0x3fa, &mut data));
        assert_eq!(data, [0x12, 0x13]);
        assert!(bus.read(0x403, &mut data));
        assert_eq!(data, [0x83, 0x84]);

        assert!(bus.write(0x3ff, &[7, 8, 9, 10]));
        assert_eq!(a.lock().unwrap().last_write, Some((7, vec![7, 8, 9, 10])));
        assert!(b.lock().unwrap().last_write.is_none());
    }

    #[test]
    fn unclaimed_addresses_report_no_device() {
        let bus = Bus::new();
        bus.insert(0x100, 0x10, recorder(0)).unwrap();
        let mut data = [0u8; 1];
        assert!(!bus.read(0xff, &mut data));
        assert!(!bus.read(0x110, &mut data));
        assert!(!bus.write(0x110, &[1]));
        assert!(!bus.write(0, &[1]));
        assert!(bus.read(0x10f, &mut data));
    }

    #[test]
    fn overlapping_and_empty_ranges_are_refused() {
        let bus = Bus::new();
        bus.insert(0x100, 0x10, recorder(0)).unwrap();
        assert_eq!(
            bus.insert(0x100, 0, recorder(0)),
            Err(BusError::ZeroLength { base: 0x100 })
        );
        for (base, len) in [
            (0x100, 1),
            (0x10f, 1),
            (0xf0, 0x11),
            (0x0, 0x1000),
            (0x108, 0x100),
        ] {
            assert!(
                matches!(
                    bus.insert(base, len, recorder(0)),
                    Err(BusError::Overlap {
                        other_base: 0x100,
                        other_len: 0x10,
                        ..
                    })
                ),
                "{base:#x}+{len:#x} should overlap"
            );
        }
        // Touching ranges are fine on both sides.
        bus.insert(0xf0, 0x10, recorder(0)).unwrap();
        bus.insert(0x110, 0x10, recorder(0)).unwrap();
    }

    #[test]
    fn ranges_at_the_top_of_the_address_space() {
        let bus = Bus::new();
        bus.insert(u64::MAX - 0xfff, 0x1000, recorder(0)).unwrap();
        assert!(matches!(
            bus.insert(u64::MAX, 2, recorder(0)),
            Err(BusError::Overflow { .. })
        ));
        assert!(matches!(
            bus.insert(u64::MAX - 0x1fff, 0x1001, recorder(0)),
            Err(BusError::Overlap { .. })
        ));
        let mut data = [0u8; 8];
        assert!(bus.read(u64::MAX, &mut data));
    }

    #[test]
    fn shared_between_threads() {
        let bus = Arc::new(Bus::new());
        let counter = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x1000, 0x100, counter.clone()).unwrap();
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let bus = bus.clone();
                std::thread::spawn(move || {
                    for i in 0..1000u64 {
                        assert!(bus.write(0x1000 + (t * 16 + i) % 0x100, &[t as u8]));
                        // Devices come and go elsewhere on the bus meanwhile.
                        let base = 0x10_0000 * (t + 1) + i * 0x10;
                        bus.insert(base, 0x10, recorder(0)).unwrap();
                        assert!(bus.remove(base).is_some());
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(counter.lock().unwrap().last_write.is_some());
        assert_eq!(format!("{bus:?}"), "[(4096, 256)]");
    }

    #[test]
    fn removed_devices_stop_answering() {
        let bus = Bus::new();
        bus.insert(0x60, 5, recorder(0)).unwrap();
        assert!(bus.remove(0x60).is_some());
        assert!(bus.remove(0x60).is_none());
        assert!(!bus.write(0x60, &[0]));
        bus.insert(0x60, 5, recorder(0)).unwrap();
    }
}
