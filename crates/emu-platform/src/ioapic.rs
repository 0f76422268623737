//! I/O APIC model (82093AA programming model, version 0x11, 24 pins).
//!
//! The guest selects a register through IOREGSEL (offset 0x00) and accesses
//! it through IOWIN (offset 0x10). Pin inputs come from `set_irq`; an
//! unmasked pin produces a [`Delivery`] message that the platform routes to
//! local APICs. Level-triggered pins set remote IRR when delivered and are
//! not delivered again until the local APIC's EOI comes back through
//! [`IoApic::eoi`]; if the line is still asserted then, the interrupt is
//! delivered again. Edge-triggered pins deliver on each inactive->active
//! transition while unmasked; edges on masked pins are lost, as on hardware.

use serde::{Deserialize, Serialize};

use crate::{get_le, put_le, DeliveryMode, DestMode, Trigger};

/// Default physical base of the I/O APIC.
pub const IOAPIC_DEFAULT_BASE: u64 = 0xfec0_0000;
/// Size of the decoded MMIO window.
pub const IOAPIC_MMIO_SIZE: u64 = 0x1000;
/// Number of redirection entries.
pub const IOAPIC_NUM_PINS: usize = 24;
/// Version register: version 0x11, maximum redirection entry 23. Version
/// 0x11 has no EOI register, so Linux clears remote IRR of level pins by
/// briefly switching them to edge mode, which this model supports.
pub const IOAPIC_VERSION_VALUE: u32 = 0x11 | (((IOAPIC_NUM_PINS as u32) - 1) << 16);

const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;

const RTE_DELIVERY_STATUS: u64 = 1 << 12;
const RTE_REMOTE_IRR: u64 = 1 << 14;
const RTE_TRIGGER_LEVEL: u64 = 1 << 15;
const RTE_MASKED: u64 = 1 << 16;
/// Bits the guest may write: vector, delivery mode, destination mode,
/// polarity, trigger mode, mask and the destination field (56-63). Delivery
/// status and remote IRR are read-only.
const RTE_WRITABLE: u64 = 0xff00_0000_0001_afff;

/// An interrupt message from the I/O APIC to the local APICs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// Destination field (APIC ID or logical destination, 8 bits).
    pub dest: u32,
    pub dest_mode: DestMode,
    pub vector: u8,
    pub delivery_mode: DeliveryMode,
    pub trigger: Trigger,
}

/// The I/O APIC.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IoApic {
    id: u32,
    ioregsel: u32,
    redirection: [u64; IOAPIC_NUM_PINS],
    /// Logical (asserted) level of each input as last set by `set_irq`.
    pin_level: u32,
}

impl Default for IoApic {
    fn default() -> Self {
        Self::new(0)
    }
}

impl IoApic {
    /// An I/O APIC in its reset state: all pins masked.
    pub fn new(id: u32) -> Self {
        IoApic {
            id: id & 0xf,
            ioregsel: 0,
            redirection: [RTE_MASKED; IOAPIC_NUM_PINS],
            pin_level: 0,
        }
    }

    /// The registers in the form another accelerator keeps them.
    pub fn export(&self) -> crate::IoApicRegs {
        crate::IoApicRegs {
            id: self.id,
            ioregsel: self.ioregsel,
            irr: self.pin_level,
            redirection: self.redirection,
        }
    }

    /// Load [`IoApic::export`]'s form.
    pub fn import(&mut self, r: &crate::IoApicRegs) {
        self.id = r.id & 0xf;
        self.ioregsel = r.ioregsel & 0xff;
        self.pin_level = r.irr & ((1 << IOAPIC_NUM_PINS) - 1);
        self.redirection = r.redirection;
    }

    /// The redirection entry of `pin` (for tests and debugging).
    pub fn redirection_entry(&self, pin: usize) -> Option<u64> {
        self.redirection.get(pin).copied()
    }

    /// Input `level`s are logical (true = the device asserts its
    /// interrupt), as with KVM's and QEMU's I/O APICs: the polarity bit is
    /// kept for the guest to read back but not applied, because the device
    /// models signal assertion, not the electrical level. Applying it would
    /// turn every idle line the guest programs active-low (PCI INTx, per the
    /// ACPI tables) into an asserted one.
    fn asserted(&self, pin: usize) -> bool {
        self.pin_level & (1 << pin) != 0
    }

    fn message(&self, pin: usize) -> Delivery {
        let e = self.redirection[pin];
        Delivery {
            dest: (e >> 56) as u32,
            dest_mode: if e & (1 << 11) != 0 {
                DestMode::Logical
            } else {
                DestMode::Physical
            },
            vector: e as u8,
            delivery_mode: DeliveryMode::from_bits((e >> 8) as u32),
            trigger: if e & RTE_TRIGGER_LEVEL != 0 {
                Trigger::Level
            } else {
                Trigger::Edge
            },
        }
    }

    /// Delivers a level-triggered pin if it is asserted, unmasked and not
    /// already waiting for an EOI.
    fn try_deliver_level(&mut self, pin: usize) -> Option<Delivery> {
        let e = self.redirection[pin];
        if e & RTE_TRIGGER_LEVEL == 0 || e & RTE_MASKED != 0 || e & RTE_REMOTE_IRR != 0 {
            return None;
        }
        if !self.asserted(pin) {
            return None;
        }
        let msg = self.message(pin);
        // Remote IRR tracks fixed/lowest-priority level interrupts that will
        // be EOI'd; other modes (NMI, ExtINT, ...) never get a local EOI.
        if matches!(
            msg.delivery_mode,
            DeliveryMode::Fixed | DeliveryMode::LowestPriority
        ) {
            self.redirection[pin] |= RTE_REMOTE_IRR;
        }
        Some(msg)
    }

    /// Sets the logical level of input `gsi` (true = asserted). Returns the message to
    /// deliver, if any. Out-of-range pins are ignored.
    pub fn set_irq(&mut self, gsi: u32, level: bool) -> Option<Delivery> {
        let pin = gsi as usize;
        if pin >= IOAPIC_NUM_PINS {
            return None;
        }
        let was = self.asserted(pin);
        if level {
            self.pin_level |= 1 << pin;
        } else {
            self.pin_level &= !(1 << pin);
        }
        let now = self.asserted(pin);
        let e = self.redirection[pin];
        if e & RTE_TRIGGER_LEVEL != 0 {
            self.try_deliver_level(pin)
        } else if now && !was && e & RTE_MASKED == 0 {
            Some(self.message(pin))
        } else {
            None
        }
    }

    /// A local APIC EOI'd a level-triggered `vector`: clears remote IRR of
    /// the pins using it and re-delivers those whose line is still asserted.
    pub fn eoi(&mut self, vector: u8) -> Vec<Delivery> {
        let mut out = Vec::new();
        for pin in 0..IOAPIC_NUM_PINS {
            let e = self.redirection[pin];
            if e as u8 == vector && e & RTE_REMOTE_IRR != 0 {
                self.redirection[pin] &= !RTE_REMOTE_IRR;
                if let Some(d) = self.try_deliver_level(pin) {
                    out.push(d);
                }
            }
        }
        out
    }

    fn read_register(&self) -> u32 {
        match self.ioregsel {
            0 => self.id << 24,
            1 => IOAPIC_VERSION_VALUE,
            // Arbitration ID: mirrors the ID on the 82093AA.
            2 => self.id << 24,
            r @ 0x10..=0x3f => {
                let pin = ((r - 0x10) / 2) as usize;
                let e = self.redirection[pin] & !RTE_DELIVERY_STATUS;
                if r & 1 == 0 {
                    e as u32
                } else {
                    (e >> 32) as u32
                }
            }
            _ => 0,
        }
    }

    fn write_register(&mut self, val: u32) -> Option<Delivery> {
        match self.ioregsel {
            0 => self.id = (val >> 24) & 0xf,
            r @ 0x10..=0x3f => {
                let pin = ((r - 0x10) / 2) as usize;
                let old = self.redirection[pin];
                let new = if r & 1 == 0 {
                    (old & 0xffff_ffff_0000_0000) | val as u64
                } else {
                    (old & 0xffff_ffff) | ((val as u64) << 32)
                };
                let mut e = (new & RTE_WRITABLE) | (old & RTE_REMOTE_IRR);
                // Switching a pin to edge mode clears remote IRR: Linux relies
                // on this to acknowledge level interrupts on I/O APICs
                // without an EOI register.
                if e & RTE_TRIGGER_LEVEL == 0 {
                    e &= !RTE_REMOTE_IRR;
                }
                self.redirection[pin] = e;
                // Unmasking (or switching to level mode) an asserted
                // level-triggered pin delivers it.
                return self.try_deliver_level(pin);
            }
            _ => {}
        }
        None
    }

    /// MMIO read at `offset` from the I/O APIC base.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let reg = offset & !0xf;
        let within = (offset & 0xf) as usize;
        if within >= 4 {
            return;
        }
        let v = match reg {
            IOREGSEL => self.ioregsel,
            IOWIN => self.read_register(),
            _ => 0,
        };
        put_le(v as u64, within, data);
    }

    /// MMIO write at `offset`. IOREGSEL accepts byte writes (some guests use
    /// them); IOWIN needs a 32-bit write. Returns a message to deliver when
    /// the write unmasked an asserted level-triggered pin.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Option<Delivery> {
        match offset {
            IOREGSEL if !data.is_empty() => {
                self.ioregsel = (get_le(data) as u32) & 0xff;
                None
            }
            IOWIN if data.len() == 4 => self.write_register(get_le(data) as u32),
            _ => None,
        }
    }
}
