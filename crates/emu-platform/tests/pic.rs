//! Guest-visible behaviour of the 8259A pair.

use emu_platform::Pic;

/// The ICW sequence Linux's init_8259A() uses (vectors 0x30/0x38, slave on
/// IR2, 8086 mode), with `icw4` selecting auto-EOI.
fn linux_init(pic: &mut Pic, icw4: u8) {
    pic.write_port(0x21, 0xff);
    pic.write_port(0xa1, 0xff);
    pic.write_port(0x20, 0x11);
    pic.write_port(0x21, 0x30);
    pic.write_port(0x21, 0x04);
    pic.write_port(0x21, icw4);
    pic.write_port(0xa0, 0x11);
    pic.write_port(0xa1, 0x38);
    pic.write_port(0xa1, 0x02);
    pic.write_port(0xa1, 0x01);
    // Everything unmasked except nothing.
    pic.write_port(0x21, 0x00);
    pic.write_port(0xa1, 0x00);
}

#[test]
fn linux_mask_probe_reads_back_what_was_written() {
    let mut pic = Pic::new();
    pic.write_port(0xa1, 0xff);
    pic.write_port(0x21, 0xfb);
    assert_eq!(pic.read_port(0x21), 0xfb);
    assert_eq!(pic.read_port(0xa1), 0xff);
    assert_eq!(pic.masks(), (0xfb, 0xff));
}

#[test]
fn uninitialised_pic_raises_nothing() {
    let mut pic = Pic::new();
    pic.set_irq(4, true);
    assert_eq!(pic.pending(), None);
    assert!(!pic.interrupt_output());
    linux_init(&mut pic, 0x01);
    // ICW1 cleared the old request; a new edge is needed.
    assert_eq!(pic.pending(), None);
    pic.set_irq(4, false);
    pic.set_irq(4, true);
    assert_eq!(pic.pending(), Some(0x34));
}

#[test]
fn init_sequence_sets_vector_bases_and_routes_irqs() {
    let mut pic = Pic::new();
    linux_init(&mut pic, 0x01);
    assert_eq!(pic.pending(), None);
    pic.set_irq(1, true);
    assert_eq!(pic.pending(), Some(0x31));
    assert!(pic.interrupt_output());
    assert_eq!(pic.ack(), 0x31);
    assert_eq!(pic.pending(), None);
    // OCW3 selects ISR/IRR for command port reads.
    pic.write_port(0x20, 0x0b);
    assert_eq!(pic.read_port(0x20), 0x02);
    pic.write_port(0x20, 0x0a);
    assert_eq!(pic.read_port(0x20), 0x00);
    // Specific EOI for IRQ1 (what Linux's mask_and_ack does).
    pic.write_port(0x20, 0x61);
    pic.write_port(0x20, 0x0b);
    assert_eq!(pic.read_port(0x20), 0x00);
}

#[test]
fn priorities_nesting_and_non_specific_eoi() {
    let mut pic = Pic::new();
    linux_init(&mut pic, 0x01);
    pic.set_irq(3, true);
    pic.set_irq(1, true);
    assert_eq!(pic.ack(), 0x31);
    // IRQ3 has lower priority than the in-service IRQ1.
    assert_eq!(pic.pending(), None);
    // IRQ0 has higher priority and nests.
    pic.set_irq(0, true);
    assert_eq!(pic.ack(), 0x30);
    // Non-specific EOI retires IRQ0 first, then IRQ1.
    pic.write_port(0x20, 0x20);
    assert_eq!(pic.pending(), None);
    pic.write_port(0x20, 0x20);
    assert_eq!(pic.pending(), Some(0x33));
}

#[test]
fn masked_edges_are_latched_and_seen_after_unmask() {
    let mut pic = Pic::new();
    linux_init(&mut pic, 0x01);
    pic.write_port(0x21, 0x10);
    pic.set_irq(4, true);
    pic.set_irq(4, false);
    assert_eq!(pic.pending(), None);
    pic.write_port(0x20, 0x0a);
    assert_eq!(pic.read_port(0x20), 0x10);
    pic.write_port(0x21, 0x00);
    assert_eq!(pic.pending(), Some(0x34));
    // A held edge line does not re-trigger after the ack.
    pic.set_irq(4, true);
    assert_eq!(pic.ack(), 0x34);
    pic.write_port(0x20, 0x20);
    pic.set_irq(4, true);
    assert_eq!(pic.pending(), None);
}

#[test]
fn slave_interrupts_cascade_through_irq2() {
    let mut pic = Pic::new();
    linux_init(&mut pic, 0x01);
    pic.set_irq(12, true);
    assert_eq!(pic.pending(), Some(0x3c));
    assert_eq!(pic.ack(), 0x3c);
    pic.write_port(0x20, 0x0b);
    assert_eq!(pic.read_port(0x20), 0x04);
    pic.write_port(0xa0, 0x0b);
    assert_eq!(pic.read_port(0xa0), 0x10);
    // A second slave interrupt queued behind the first is seen once both
    // chips got their EOI.
    pic.set_irq(14, true);
    assert_eq!(pic.pending(), None);
    pic.write_port(0xa0, 0x64);
    pic.write_port(0x20, 0x62);
    assert_eq!(pic.pending(), Some(0x3e));
    // Masking the cascade input on the master hides slave interrupts.
    pic.write_port(0x21, 0x04);
    assert_eq!(pic.pending(), None);
    pic.write_port(0x21, 0x00);
    assert_eq!(pic.ack(), 0x3e);
}

#[test]
fn auto_eoi_leaves_isr_clear() {
    let mut pic = Pic::new();
    linux_init(&mut pic, 0x03);
    pic.set_irq(5, true);
    assert_eq!(pic.ack(), 0x35);
    pic.write_port(0x20, 0x0b);
    assert_eq!(pic.read_port(0x20), 0);
    pic.set_irq(3, true);
    assert_eq!(pic.pending(), Some(0x33));
}

#[test]
fn elcr_level_triggered_inputs_follow_the_line() {
    let mut pic = Pic::new();
    linux_init(&mut pic, 0x01);
    // IRQ 0-2 (master) and 8, 13 (slave) cannot be level triggered.
    pic.write_port(0x4d0, 0xff);
    pic.write_port(0x4d1, 0xff);
    assert_eq!(pic.read_port(0x4d0), 0xf8);
    assert_eq!(pic.read_port(0x4d1), 0xde);
    pic.write_port(0x4d0, 0x00);
    pic.write_port(0x4d1, 0x04); // IRQ10 level
    pic.set_irq(10, true);
    assert_eq!(pic.ack(), 0x3a);
    pic.write_port(0xa0, 0x20);
    pic.write_port(0x20, 0x20);
    // Still asserted: requested again.
    assert_eq!(pic.pending(), Some(0x3a));
    pic.set_irq(10, false);
    assert_eq!(pic.pending(), None);
}

#[test]
fn spurious_interrupt_when_request_vanished() {
    let mut pic = Pic::new();
    linux_init(&mut pic, 0x01);
    assert_eq!(pic.ack(), 0x37);
    // The spurious ack does not put IRQ7 in service.
    pic.write_port(0x20, 0x0b);
    assert_eq!(pic.read_port(0x20), 0);
}

#[test]
fn poll_mode() {
    let mut pic = Pic::new();
    linux_init(&mut pic, 0x01);
    pic.write_port(0x20, 0x0c);
    assert_eq!(pic.read_port(0x20), 0x00);
    pic.set_irq(6, true);
    pic.write_port(0x20, 0x0c);
    assert_eq!(pic.read_port(0x20), 0x86);
    // The poll acknowledged IRQ6: it is in service, no longer requested.
    assert_eq!(pic.pending(), None);
    pic.write_port(0x20, 0x0b);
    assert_eq!(pic.read_port(0x20), 0x40);
    // Reads after the poll are normal again.
    assert_eq!(pic.read_port(0x21), 0x00);
}

#[test]
fn special_mask_mode_lets_lower_priorities_through() {
    let mut pic = Pic::new();
    linux_init(&mut pic, 0x01);
    pic.set_irq(1, true);
    assert_eq!(pic.ack(), 0x31);
    pic.set_irq(5, true);
    assert_eq!(pic.pending(), None);
    // Mask the in-service IRQ1 and enter special mask mode.
    pic.write_port(0x21, 0x02);
    pic.write_port(0x20, 0x68);
    assert_eq!(pic.pending(), Some(0x35));
    pic.write_port(0x20, 0x48);
    assert_eq!(pic.pending(), None);
}

#[test]
fn rotation_on_specific_eoi() {
    let mut pic = Pic::new();
    linux_init(&mut pic, 0x01);
    pic.set_irq(3, true);
    assert_eq!(pic.ack(), 0x33);
    // Rotate on specific EOI for IRQ3: IRQ4 becomes highest priority.
    pic.write_port(0x20, 0xe3);
    pic.set_irq(1, true);
    pic.set_irq(5, true);
    assert_eq!(pic.pending(), Some(0x35));
    // Set priority command: IRQ0 lowest -> IRQ1 highest.
    pic.write_port(0x20, 0xc0);
    assert_eq!(pic.pending(), Some(0x31));
}

#[test]
fn icw1_resets_state() {
    let mut pic = Pic::new();
    linux_init(&mut pic, 0x01);
    pic.set_irq(3, true);
    pic.write_port(0x21, 0x55);
    pic.write_port(0x20, 0x11);
    // Mask and pending requests are cleared by ICW1.
    assert_eq!(pic.read_port(0x21), 0);
    assert_eq!(pic.pending(), None);
    pic.write_port(0x21, 0x20);
    pic.write_port(0x21, 0x04);
    pic.write_port(0x21, 0x01);
    pic.set_irq(3, false);
    pic.set_irq(3, true);
    assert_eq!(pic.pending(), Some(0x23));
}

#[test]
fn serde_round_trip() {
    let mut pic = Pic::new();
    linux_init(&mut pic, 0x01);
    pic.set_irq(12, true);
    let back: Pic = serde_json::from_str(&serde_json::to_string(&pic).unwrap()).unwrap();
    assert_eq!(back.pending(), Some(0x3c));
}
