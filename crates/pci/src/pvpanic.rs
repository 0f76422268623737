//! pvpanic (`--pvpanic`): the PCI device QEMU calls `pvpanic-pci` (vendor
//! 1b36, device 0011), through which a guest kernel reports that it
//! panicked. Linux's `pvpanic-pci` driver reads the byte at BAR 0 offset 0
//! for the events the device supports and, when it panics, writes the event
//! there: bit 0 "panicked", bit 1 "crash kernel loaded" (kdump will take
//! over, so the VM should be left running).
//!
//! The device keeps no state beyond its configuration space; each write is
//! handed to the VMM's [`PanicSink`] as it is (the VMM logs the event and
//! decides what to do). Writes of bits the device does not offer are passed
//! on masked, never acted on unchecked.

use devices::{Persist, PersistError};

use crate::{BarKind, ConfigSpaceState, PciConfig, PciDevice, PciIds};

pub const VENDOR_ID: u16 = 0x1b36;
pub const DEVICE_ID: u16 = 0x0011;
/// Event bits of the pvpanic protocol.
pub const PANICKED: u8 = 1 << 0;
pub const CRASH_LOADED: u8 = 1 << 1;
/// What this device offers (read back by the guest driver).
pub const SUPPORTED: u8 = PANICKED | CRASH_LOADED;
/// BAR 0: a page, though only its first byte means anything, so that the
/// BAR never shares a page with another device's.
const BAR_SIZE: u64 = 0x1000;

/// Where the device reports a guest's event (only the supported bits, never
/// zero).
pub type PanicSink = std::sync::Arc<dyn Fn(u8) + Send + Sync>;

pub struct PvPanic {
    config: PciConfig,
    sink: PanicSink,
}

impl PvPanic {
    pub fn new(sink: PanicSink) -> Self {
        let mut config = PciConfig::new(PciIds {
            vendor: VENDOR_ID,
            device: DEVICE_ID,
            revision: 1,
            // Base class 08 (system peripheral), subclass 80 (other).
            class: 0x08_80_00,
            subsystem_vendor: VENDOR_ID,
            subsystem: 0x1100,
        });
        config
            .add_bar(
                0,
                BAR_SIZE,
                BarKind::Memory32 {
                    prefetchable: false,
                },
            )
            .expect("BAR 0 of a fresh configuration space is free");
        PvPanic { config, sink }
    }
}

impl PciDevice for PvPanic {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar == 0 && offset == 0 {
            if let Some(b) = data.first_mut() {
                *b = SUPPORTED;
            }
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        let event = match data.first() {
            Some(&b) if bar == 0 && offset == 0 => b & SUPPORTED,
            _ => return,
        };
        if event != 0 {
            (self.sink)(event);
        }
    }
}

impl Persist for PvPanic {
    type State = ConfigSpaceState;

    fn save(&self) -> Result<ConfigSpaceState, PersistError> {
        self.config.save()
    }

    fn restore(&mut self, saved: &ConfigSpaceState) -> Result<(), PersistError> {
        self.config.restore(saved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn device() -> (PvPanic, Arc<Mutex<Vec<u8>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        (
            PvPanic::new(Arc::new(move |e| s.lock().unwrap().push(e))),
            seen,
        )
    }

    #[test]
    fn the_guest_reads_the_supported_events_and_its_panic_reaches_the_vmm() {
        let (mut d, seen) = device();
        let mut ids = [0u8; 4];
        d.read_config(0, &mut ids);
        assert_eq!(ids, [0x36, 0x1b, 0x11, 0x00]);
        let mut b = [0xffu8; 4];
        d.read_bar(0, 0, &mut b);
        assert_eq!(b, [SUPPORTED, 0, 0, 0]);
        d.write_bar(0, 0, &[PANICKED]);
        d.write_bar(0, 0, &[CRASH_LOADED]);
        assert_eq!(*seen.lock().unwrap(), vec![PANICKED, CRASH_LOADED]);
    }

    #[test]
    fn unknown_bits_other_offsets_and_zero_are_not_events() {
        let (mut d, seen) = device();
        d.write_bar(0, 0, &[0xfc]);
        d.write_bar(0, 0, &[0]);
        d.write_bar(0, 1, &[PANICKED]);
        d.write_bar(1, 0, &[PANICKED]);
        d.write_bar(0, 0, &[]);
        assert!(seen.lock().unwrap().is_empty());
        d.write_bar(0, 0, &[0xfd]);
        assert_eq!(*seen.lock().unwrap(), vec![PANICKED]);
    }

    #[test]
    fn its_configuration_space_survives_a_snapshot() {
        let (mut d, _) = device();
        d.write_config(0x10, &0xfebf_0000u32.to_le_bytes());
        let saved = d.save().unwrap();
        let (mut e, _) = device();
        e.restore(&saved).unwrap();
        assert_eq!(e.config().bar_address(0), Some(0xfebf_0000));
    }
}
