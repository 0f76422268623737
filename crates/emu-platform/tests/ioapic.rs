//! Guest-visible behaviour of the I/O APIC model.

use emu_platform::ioapic::*;
use emu_platform::{Delivery, DeliveryMode, DestMode, Trigger};

fn read_reg(io: &IoApic, reg: u32) -> u32 {
    let mut io = io.clone();
    io.write(0x00, &reg.to_le_bytes());
    let mut b = [0u8; 4];
    io.read(0x10, &mut b);
    u32::from_le_bytes(b)
}

fn write_reg(io: &mut IoApic, reg: u32, val: u32) -> Option<Delivery> {
    io.write(0x00, &reg.to_le_bytes());
    io.write(0x10, &val.to_le_bytes())
}

fn program(io: &mut IoApic, pin: u32, low: u32, dest: u8) -> Option<Delivery> {
    write_reg(io, 0x11 + 2 * pin, (dest as u32) << 24);
    write_reg(io, 0x10 + 2 * pin, low)
}

const LEVEL: u32 = 1 << 15;
const MASKED: u32 = 1 << 16;
const REMOTE_IRR: u32 = 1 << 14;

#[test]
fn id_version_and_reset_masks() {
    let mut io = IoApic::new(2);
    assert_eq!(read_reg(&io, 0), 2 << 24);
    assert_eq!(read_reg(&io, 1), 0x0017_0011);
    for pin in 0..24 {
        assert_eq!(read_reg(&io, 0x10 + 2 * pin) & MASKED, MASKED);
    }
    write_reg(&mut io, 0, 0x0500_0000);
    assert_eq!(read_reg(&io, 0), 5 << 24);
    // IOREGSEL reads back.
    io.write(0, &[0x13]);
    let mut b = [0u8; 4];
    io.read(0, &mut b);
    assert_eq!(b[0], 0x13);
    // Unknown registers read 0, writes are ignored.
    assert_eq!(read_reg(&io, 0x50), 0);
    assert_eq!(write_reg(&mut io, 0x50, 1), None);
    // Out-of-range pins are ignored.
    assert_eq!(io.set_irq(24, true), None);
    assert_eq!(io.set_irq(u32::MAX, true), None);
}

#[test]
fn edge_triggered_pin_delivers_on_rising_edges_only() {
    let mut io = IoApic::new(0);
    assert_eq!(program(&mut io, 1, 0x31, 3), None);
    let d = io.set_irq(1, true).expect("delivery");
    assert_eq!(
        d,
        Delivery {
            dest: 3,
            dest_mode: DestMode::Physical,
            vector: 0x31,
            delivery_mode: DeliveryMode::Fixed,
            trigger: Trigger::Edge
        }
    );
    assert_eq!(io.set_irq(1, true), None);
    assert_eq!(io.set_irq(1, false), None);
    assert!(io.set_irq(1, true).is_some());
    io.set_irq(1, false);
    // Edges on a masked pin are lost, and unmasking does not replay them.
    program(&mut io, 1, 0x31 | MASKED, 3);
    assert_eq!(io.set_irq(1, true), None);
    io.set_irq(1, false);
    assert_eq!(program(&mut io, 1, 0x31, 3), None);
    // Edge entries never set remote IRR.
    io.set_irq(1, true);
    assert_eq!(read_reg(&io, 0x12) & REMOTE_IRR, 0);
}

#[test]
fn level_triggered_pin_uses_remote_irr_and_eoi() {
    let mut io = IoApic::new(0);
    program(&mut io, 10, 0x3a | LEVEL | (1 << 11) | (1 << 8), 0x0f);
    let d = io.set_irq(10, true).expect("delivery");
    assert_eq!(d.trigger, Trigger::Level);
    assert_eq!(d.dest_mode, DestMode::Logical);
    assert_eq!(d.delivery_mode, DeliveryMode::LowestPriority);
    assert_eq!(read_reg(&io, 0x24) & REMOTE_IRR, REMOTE_IRR);
    // Still asserted, waiting for EOI: nothing new.
    assert_eq!(io.set_irq(10, true), None);
    // EOI for another vector does nothing.
    assert!(io.eoi(0x3b).is_empty());
    // EOI while the line is still high: delivered again.
    let again = io.eoi(0x3a);
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].vector, 0x3a);
    assert_eq!(read_reg(&io, 0x24) & REMOTE_IRR, REMOTE_IRR);
    // The device deasserts, then the EOI arrives: nothing more.
    io.set_irq(10, false);
    assert!(io.eoi(0x3a).is_empty());
    assert_eq!(read_reg(&io, 0x24) & REMOTE_IRR, 0);
    // Remote IRR is read-only for the guest.
    write_reg(&mut io, 0x24, 0x3a | LEVEL | REMOTE_IRR);
    assert_eq!(read_reg(&io, 0x24) & REMOTE_IRR, 0);
}

#[test]
fn unmasking_an_asserted_level_pin_delivers() {
    let mut io = IoApic::new(0);
    program(&mut io, 16, 0x51 | LEVEL | MASKED, 0);
    assert_eq!(io.set_irq(16, true), None);
    let d = program(&mut io, 16, 0x51 | LEVEL, 0).expect("delivery on unmask");
    assert_eq!(d.vector, 0x51);
}

#[test]
fn switching_to_edge_clears_remote_irr() {
    // Linux's way of acking a level interrupt on an I/O APIC without an EOI
    // register: mask, set edge, then restore level.
    let mut io = IoApic::new(0);
    program(&mut io, 5, 0x45 | LEVEL, 0);
    io.set_irq(5, true);
    io.set_irq(5, false);
    assert_eq!(read_reg(&io, 0x1a) & REMOTE_IRR, REMOTE_IRR);
    write_reg(&mut io, 0x1a, 0x45 | MASKED);
    assert_eq!(read_reg(&io, 0x1a) & REMOTE_IRR, 0);
    assert_eq!(write_reg(&mut io, 0x1a, 0x45 | LEVEL), None);
    assert!(io.set_irq(5, true).is_some());
}

#[test]
fn polarity_is_stored_but_inputs_are_logical() {
    let mut io = IoApic::new(0);
    // The guest programs the pin active-low (as ACPI says for PCI INTx); an
    // idle line (not asserted) must not interrupt.
    assert_eq!(program(&mut io, 9, 0x39 | LEVEL | (1 << 13), 0), None);
    assert_eq!(read_reg(&io, 0x22) & (1 << 13), 1 << 13);
    assert!(io.set_irq(9, true).is_some());
    io.set_irq(9, false);
    assert!(io.eoi(0x39).is_empty());
}

#[test]
fn serde_round_trip() {
    let mut io = IoApic::new(1);
    program(&mut io, 10, 0x3a | LEVEL, 0);
    io.set_irq(10, true);
    let back: IoApic = serde_json::from_str(&serde_json::to_string(&io).unwrap()).unwrap();
    assert_eq!(back.redirection_entry(10), io.redirection_entry(10));
}
