//! Guest-visible behaviour of the local APIC model.

use emu_platform::lapic::*;
use emu_platform::{DeliveryMode, DestMode, Trigger};

fn rd(l: &Lapic, off: u32, now: u64) -> u32 {
    let mut b = [0u8; 4];
    l.read(off as u64, &mut b, now);
    u32::from_le_bytes(b)
}

fn wr(l: &mut Lapic, off: u32, val: u32, now: u64) -> Option<LapicEvent> {
    l.write(off as u64, &val.to_le_bytes(), now)
}

/// An AP-style APIC, software-enabled, spurious vector 0xff.
fn enabled() -> Lapic {
    let mut l = Lapic::new(1, false, DEFAULT_BUS_HZ);
    wr(&mut l, APIC_SVR, 0x1ff, 0);
    l
}

#[test]
fn reset_state_matches_sdm() {
    let l = Lapic::new(0, true, DEFAULT_BUS_HZ);
    assert_eq!(rd(&l, APIC_VERSION, 0), 0x0005_0014);
    assert_eq!(rd(&l, APIC_DFR, 0), 0xffff_ffff);
    assert_eq!(rd(&l, APIC_SVR, 0), 0xff);
    assert_eq!(rd(&l, APIC_ID, 0), 0);
    assert_eq!(rd(&l, APIC_LVT_TIMER, 0), LVT_MASKED);
    // BSP is left in virtual-wire mode: LINT0 ExtINT unmasked, LINT1 NMI.
    assert_eq!(rd(&l, APIC_LVT_LINT0, 0), 0x700);
    assert_eq!(rd(&l, APIC_LVT_LINT1, 0), 0x400);
    assert!(l.accepts_pic_interrupts());
    assert_eq!(
        l.apic_base(),
        0xfee0_0000 | APIC_BASE_BSP | APIC_BASE_ENABLE
    );
    let ap = Lapic::new(3, false, DEFAULT_BUS_HZ);
    assert_eq!(rd(&ap, APIC_ID, 0), 3 << 24);
    assert_eq!(rd(&ap, APIC_LVT_LINT0, 0), LVT_MASKED);
    assert!(!ap.accepts_pic_interrupts());
}

#[test]
fn sub_register_reads_and_bad_writes() {
    let mut l = enabled();
    wr(&mut l, APIC_TPR, 0x12345678, 0);
    assert_eq!(rd(&l, APIC_TPR, 0), 0x78);
    let mut b = [0u8; 1];
    l.read(APIC_VERSION as u64 + 2, &mut b, 0);
    assert_eq!(b[0], 5);
    // Bytes 4..16 of a register slot read as zero.
    let mut b4 = [0xaau8; 4];
    l.read(APIC_VERSION as u64 + 4, &mut b4, 0);
    assert_eq!(b4, [0; 4]);
    // Non-32-bit writes are dropped, as with KVM.
    l.write(APIC_TPR as u64, &[0x20], 0);
    assert_eq!(rd(&l, APIC_TPR, 0), 0x78);
    // Out-of-page offsets are harmless.
    l.read(0x5000, &mut b4, 0);
    assert_eq!(l.write(0x5000, &[1, 2, 3, 4], 0), None);
}

#[test]
fn software_disabled_apic_drops_fixed_interrupts_and_masks_lvts() {
    let mut l = Lapic::new(1, false, DEFAULT_BUS_HZ);
    assert!(!l.accept_interrupt(0x40, Trigger::Edge));
    assert_eq!(l.pending_vector(), None);
    wr(&mut l, APIC_SVR, 0x1ff, 0);
    wr(&mut l, APIC_LVT_TIMER, 0x30, 0);
    assert_eq!(rd(&l, APIC_LVT_TIMER, 0), 0x30);
    assert!(l.accept_interrupt(0x40, Trigger::Edge));
    // Clearing the software enable sets every LVT mask bit, and LVT writes
    // keep the mask while disabled.
    wr(&mut l, APIC_SVR, 0xff, 0);
    assert_eq!(rd(&l, APIC_LVT_TIMER, 0), 0x30 | LVT_MASKED);
    wr(&mut l, APIC_LVT_ERROR, 0x33, 0);
    assert_eq!(rd(&l, APIC_LVT_ERROR, 0), 0x33 | LVT_MASKED);
    // NMI still gets through.
    assert!(l.deliver(DeliveryMode::Nmi, 0, Trigger::Edge));
    assert!(l.take_nmi());
    assert!(!l.take_nmi());
}

#[test]
fn irr_isr_priority_ppr_and_eoi() {
    let mut l = enabled();
    for v in [0x31, 0x51, 0x41] {
        assert!(l.accept_interrupt(v, Trigger::Edge));
    }
    assert_eq!(rd(&l, APIC_IRR + 0x10, 0), 1 << (0x31 - 32));
    assert_eq!(
        rd(&l, APIC_IRR + 0x20, 0),
        (1 << (0x51 - 64)) | (1 << (0x41 - 64))
    );
    assert_eq!(l.pending_vector(), Some(0x51));
    l.ack(0x51);
    assert_eq!(rd(&l, APIC_ISR + 0x20, 0), 1 << (0x51 - 64));
    assert_eq!(rd(&l, APIC_PPR, 0), 0x50);
    // 0x41 is in a lower priority class than the in-service 0x51.
    assert_eq!(l.pending_vector(), None);
    // A higher class nests.
    l.accept_interrupt(0x61, Trigger::Edge);
    assert_eq!(l.pending_vector(), Some(0x61));
    l.ack(0x61);
    assert_eq!(rd(&l, APIC_PPR, 0), 0x60);
    // EOI retires the highest in-service vector first.
    assert_eq!(wr(&mut l, APIC_EOI, 0, 0), None);
    assert_eq!(rd(&l, APIC_ISR + 0x30, 0), 0);
    assert_eq!(rd(&l, APIC_PPR, 0), 0x50);
    wr(&mut l, APIC_EOI, 0, 0);
    assert_eq!(rd(&l, APIC_PPR, 0), 0);
    assert_eq!(l.pending_vector(), Some(0x41));
    // TPR blocks its own class and below.
    wr(&mut l, APIC_TPR, 0x40, 0);
    assert_eq!(rd(&l, APIC_PPR, 0), 0x40);
    assert_eq!(l.pending_vector(), None);
    l.set_cr8(3);
    assert_eq!(rd(&l, APIC_TPR, 0), 0x30);
    assert_eq!(l.cr8(), 3);
    assert_eq!(l.pending_vector(), Some(0x41));
    // Same-class vectors are not blocked by TPR's low nibble.
    wr(&mut l, APIC_TPR, 0x3f, 0);
    assert_eq!(l.pending_vector(), Some(0x41));
}

#[test]
fn level_triggered_eoi_is_broadcast_edge_is_not() {
    let mut l = enabled();
    l.accept_interrupt(0x70, Trigger::Level);
    assert_eq!(rd(&l, APIC_TMR + 0x30, 0), 1 << (0x70 - 96));
    l.ack(0x70);
    assert_eq!(
        wr(&mut l, APIC_EOI, 0, 0),
        Some(LapicEvent::EoiBroadcast(0x70))
    );
    assert_eq!(rd(&l, APIC_TMR + 0x30, 0), 0);
    l.accept_interrupt(0x70, Trigger::Edge);
    l.ack(0x70);
    assert_eq!(wr(&mut l, APIC_EOI, 0, 0), None);
    // EOI with nothing in service is harmless.
    assert_eq!(wr(&mut l, APIC_EOI, 0, 0), None);
}

#[test]
fn illegal_vectors_set_esr_and_error_lvt() {
    let mut l = enabled();
    wr(&mut l, APIC_LVT_ERROR, 0xfe, 0);
    assert!(!l.accept_interrupt(5, Trigger::Edge));
    // ESR shows errors only after a write latches them.
    assert_eq!(rd(&l, APIC_ESR, 0), 0);
    wr(&mut l, APIC_ESR, 0, 0);
    assert_eq!(rd(&l, APIC_ESR, 0), 1 << 6);
    assert_eq!(l.pending_vector(), Some(0xfe));
    // Sending a fixed IPI with vector < 16 is an error too, and not sent.
    assert_eq!(wr(&mut l, APIC_ICR_LO, 0x0000_0003, 0), None);
    wr(&mut l, APIC_ESR, 0, 0);
    assert_eq!(rd(&l, APIC_ESR, 0), 1 << 5);
    wr(&mut l, APIC_ESR, 0, 0);
    assert_eq!(rd(&l, APIC_ESR, 0), 0);
}

fn arm_timer(l: &mut Lapic, lvt: u32, tdcr: u32, count: u32, now: u64) {
    wr(l, APIC_TDCR, tdcr, now);
    wr(l, APIC_LVT_TIMER, lvt, now);
    wr(l, APIC_TMICT, count, now);
}

#[test]
fn one_shot_timer_fires_at_count_times_divisor_for_every_divide_setting() {
    // (TDCR value, divisor)
    let settings = [
        (0x0, 2),
        (0x1, 4),
        (0x2, 8),
        (0x3, 16),
        (0x8, 32),
        (0x9, 64),
        (0xa, 128),
        (0xb, 1),
    ];
    for (tdcr, div) in settings {
        let mut l = enabled();
        let t0 = 1_000_000;
        arm_timer(&mut l, 0xec, tdcr, 1000, t0);
        assert_eq!(l.timer_divisor(), div);
        let deadline = t0 + 1000 * div;
        assert_eq!(l.next_timer_deadline(), Some(deadline), "div {div}");
        assert_eq!(rd(&l, APIC_TMCCT, t0), 1000);
        assert_eq!(rd(&l, APIC_TMCCT, t0 + 250 * div), 750);
        assert!(!l.tick(deadline - 1));
        assert_eq!(l.pending_vector(), None);
        assert!(l.tick(deadline));
        assert_eq!(l.pending_vector(), Some(0xec));
        assert_eq!(rd(&l, APIC_TMCCT, deadline), 0);
        assert_eq!(l.next_timer_deadline(), None);
        assert!(!l.tick(deadline * 3));
        assert_eq!(rd(&l, APIC_TMICT, deadline), 1000);
    }
}

#[test]
fn timer_uses_the_configured_bus_frequency() {
    // 100 MHz bus: 10 ns per count.
    let mut l = Lapic::new(0, true, 100_000_000);
    wr(&mut l, APIC_SVR, 0x1ff, 0);
    arm_timer(&mut l, 0x40, 0xb, 25, 0);
    assert_eq!(l.next_timer_deadline(), Some(250));
    assert_eq!(rd(&l, APIC_TMCCT, 100), 15);
}

#[test]
fn periodic_timer_reloads_without_drift_and_coalesces_missed_periods() {
    let mut l = enabled();
    arm_timer(&mut l, 0x20040, 0x0, 1000, 0); // periodic, vector 0x40, div 2
    assert_eq!(l.timer_mode(), TimerMode::Periodic);
    let mut fired = Vec::new();
    for t in (0..=6000).step_by(100) {
        if l.tick(t) {
            fired.push(t);
            l.ack(0x40);
            wr(&mut l, APIC_EOI, 0, t);
        }
    }
    assert_eq!(fired, vec![2000, 4000, 6000]);
    assert_eq!(rd(&l, APIC_TMCCT, 6500), 750);
    // Skip several periods: one interrupt, next deadline on the grid.
    assert!(l.tick(10_500));
    assert_eq!(l.next_timer_deadline(), Some(12_000));
    assert!(!l.tick(11_999));
    // Writing TMICT = 0 stops the timer.
    wr(&mut l, APIC_TMICT, 0, 11_999);
    assert_eq!(l.next_timer_deadline(), None);
    assert!(!l.tick(20_000));
}

#[test]
fn periodic_timer_with_fractional_period_stays_on_grid() {
    // 3 counts at 1.5 GHz bus = 2 ns exactly; 1 count = 0.666 ns.
    let mut l = Lapic::new(0, true, 1_500_000_000);
    wr(&mut l, APIC_SVR, 0x1ff, 0);
    arm_timer(&mut l, 0x20040, 0xb, 1, 0);
    // Expiry k at ceil(k * 2/3 ns).
    assert_eq!(l.next_timer_deadline(), Some(1));
    assert!(l.tick(1));
    assert_eq!(l.next_timer_deadline(), Some(2));
    assert!(l.tick(1_000_000));
    // 1 ms = 1.5 million periods; next at ceil(1500001 * 2/3).
    assert_eq!(l.next_timer_deadline(), Some(1_000_001));
}

#[test]
fn masked_timer_counts_but_does_not_interrupt() {
    let mut l = enabled();
    arm_timer(&mut l, 0x10040, 0xb, 100, 0);
    assert_eq!(l.next_timer_deadline(), None);
    assert_eq!(rd(&l, APIC_TMCCT, 40), 60);
    assert!(!l.tick(100));
    assert_eq!(l.pending_vector(), None);
    assert_eq!(rd(&l, APIC_TMCCT, 100), 0);
}

#[test]
fn divide_change_mid_count_keeps_the_current_count() {
    let mut l = enabled();
    arm_timer(&mut l, 0x40, 0xb, 1000, 0); // div 1
    assert_eq!(rd(&l, APIC_TMCCT, 400), 600);
    wr(&mut l, APIC_TDCR, 0x0, 400); // div 2
    assert_eq!(rd(&l, APIC_TMCCT, 400), 600);
    assert_eq!(l.next_timer_deadline(), Some(400 + 600 * 2));
}

#[test]
fn tsc_deadline_mode() {
    let mut l = enabled();
    let tsc_hz = 2_000_000_000;
    // Not in TSC-deadline mode: the MSR is ignored and reads 0.
    l.set_tsc_deadline(5000, 0, 0, tsc_hz);
    assert_eq!(l.tsc_deadline(), 0);
    wr(&mut l, APIC_LVT_TIMER, 0x40040, 0);
    assert_eq!(l.timer_mode(), TimerMode::TscDeadline);
    // TMICT is ignored in this mode.
    wr(&mut l, APIC_TMICT, 10, 0);
    assert_eq!(rd(&l, APIC_TMICT, 0), 0);
    // now = 1000 ns, TSC = 2000; deadline TSC 6000 = 2000 ns later.
    l.set_tsc_deadline(6000, 1000, 2000, tsc_hz);
    assert_eq!(l.tsc_deadline(), 6000);
    assert_eq!(l.next_timer_deadline(), Some(3000));
    assert!(!l.tick(2999));
    assert!(l.tick(3000));
    assert_eq!(l.pending_vector(), Some(0x40));
    assert_eq!(l.tsc_deadline(), 0);
    assert_eq!(l.next_timer_deadline(), None);
    // A deadline in the past fires at the next tick.
    l.set_tsc_deadline(100, 4000, 8000, tsc_hz);
    assert_eq!(l.next_timer_deadline(), Some(4000));
    // Writing 0 disarms.
    l.set_tsc_deadline(0, 4000, 8000, tsc_hz);
    assert_eq!(l.next_timer_deadline(), None);
    // Leaving TSC-deadline mode disarms an armed deadline.
    l.set_tsc_deadline(100_000, 4000, 8000, tsc_hz);
    wr(&mut l, APIC_LVT_TIMER, 0x40, 4000);
    assert_eq!(l.next_timer_deadline(), None);
}

#[test]
fn icr_writes_produce_ipis() {
    let mut l = enabled();
    wr(&mut l, APIC_ICR_HI, 3 << 24, 0);
    let ev = wr(&mut l, APIC_ICR_LO, 0x0000_4041, 0);
    assert_eq!(
        ev,
        Some(LapicEvent::Ipi(IpiRequest {
            source: 1,
            vector: 0x41,
            delivery_mode: DeliveryMode::Fixed,
            dest_mode: DestMode::Physical,
            trigger: Trigger::Edge,
            level: true,
            shorthand: Shorthand::None,
            dest: 3,
        }))
    );
    // Delivery status reads idle.
    assert_eq!(rd(&l, APIC_ICR_LO, 0) & (1 << 12), 0);
    // INIT assert (level-triggered, as Linux sends it).
    let Some(LapicEvent::Ipi(init)) = wr(&mut l, APIC_ICR_LO, 0x0000_c500, 0) else {
        panic!("INIT not sent");
    };
    assert_eq!(init.delivery_mode, DeliveryMode::Init);
    // INIT de-assert is not delivered.
    assert_eq!(wr(&mut l, APIC_ICR_LO, 0x0000_8500, 0), None);
    let Some(LapicEvent::Ipi(sipi)) = wr(&mut l, APIC_ICR_LO, 0x0000_069a, 0) else {
        panic!("SIPI not sent");
    };
    assert_eq!(
        (sipi.delivery_mode, sipi.vector),
        (DeliveryMode::StartUp, 0x9a)
    );
    // NMI, logical destination, all-excluding-self shorthand.
    wr(&mut l, APIC_ICR_HI, 0x0f << 24, 0);
    let Some(LapicEvent::Ipi(nmi)) = wr(&mut l, APIC_ICR_LO, 0x000c_0c00, 0) else {
        panic!("NMI not sent");
    };
    assert_eq!(nmi.delivery_mode, DeliveryMode::Nmi);
    assert_eq!(nmi.dest_mode, DestMode::Logical);
    assert_eq!(nmi.shorthand, Shorthand::AllExcludingSelf);
    assert_eq!(nmi.dest, 0x0f);
    let Some(LapicEvent::Ipi(me)) = wr(&mut l, APIC_ICR_LO, 0x0004_0151, 0) else {
        panic!("self IPI not sent");
    };
    assert_eq!(me.shorthand, Shorthand::SelfOnly);
    assert_eq!(me.delivery_mode, DeliveryMode::LowestPriority);
}

#[test]
fn init_then_sipi_starts_an_ap() {
    let mut l = Lapic::new(2, false, DEFAULT_BUS_HZ);
    // SIPI before INIT is ignored.
    assert!(!l.deliver(DeliveryMode::StartUp, 0x9a, Trigger::Edge));
    assert_eq!(l.take_startup(), None);
    wr(&mut l, APIC_SVR, 0x1ff, 0);
    wr(&mut l, APIC_TPR, 0x20, 0);
    assert!(l.deliver(DeliveryMode::Init, 0, Trigger::Level));
    assert!(l.take_init());
    assert!(!l.take_init());
    // INIT resets the registers except the ID.
    assert_eq!(rd(&l, APIC_SVR, 0), 0xff);
    assert_eq!(rd(&l, APIC_TPR, 0), 0);
    assert_eq!(rd(&l, APIC_ID, 0), 2 << 24);
    assert!(l.waiting_for_sipi());
    assert!(l.deliver(DeliveryMode::StartUp, 0x9a, Trigger::Edge));
    // The second SIPI of the INIT-SIPI-SIPI sequence is ignored.
    assert!(!l.deliver(DeliveryMode::StartUp, 0x9b, Trigger::Edge));
    assert_eq!(l.take_startup(), Some(0x9a));
    assert_eq!(l.take_startup(), None);
}

#[test]
fn destination_matching() {
    let mut l = enabled(); // APIC ID 1
    assert!(l.matches_dest(1, DestMode::Physical));
    assert!(l.matches_dest(0xff, DestMode::Physical));
    assert!(!l.matches_dest(2, DestMode::Physical));
    // Flat logical: LDR bit set in the destination mask.
    wr(&mut l, APIC_LDR, 0x0400_0000, 0);
    assert!(l.matches_dest(0x04, DestMode::Logical));
    assert!(l.matches_dest(0x0c, DestMode::Logical));
    assert!(!l.matches_dest(0x03, DestMode::Logical));
    assert!(l.matches_dest(0xff, DestMode::Logical));
    // Cluster model: high nibble selects the cluster.
    wr(&mut l, APIC_DFR, 0x0fff_ffff, 0);
    assert_eq!(rd(&l, APIC_DFR, 0), 0x0fff_ffff);
    wr(&mut l, APIC_LDR, 0x2100_0000, 0);
    assert!(l.matches_dest(0x23, DestMode::Logical));
    assert!(!l.matches_dest(0x13, DestMode::Logical));
    assert!(!l.matches_dest(0x22, DestMode::Logical));
    // A rewritten xAPIC ID is used for physical matching.
    wr(&mut l, APIC_ID, 7 << 24, 0);
    assert!(l.matches_dest(7, DestMode::Physical));
    assert!(!l.matches_dest(1, DestMode::Physical));
}

#[test]
fn x2apic_msr_interface() {
    let mut l = Lapic::new(5, false, DEFAULT_BUS_HZ);
    assert_eq!(l.read_msr(0x802, 0), Err(GpFault));
    // Disabled -> x2APIC directly is illegal; xAPIC -> x2APIC is fine.
    assert_eq!(
        l.write_apic_base(0xfee0_0000 | APIC_BASE_EXTD),
        Err(GpFault)
    );
    l.write_apic_base(0xfee0_0000 | APIC_BASE_ENABLE | APIC_BASE_EXTD)
        .unwrap();
    assert!(l.x2apic_mode());
    assert_eq!(l.mmio_base(), None);
    assert_eq!(l.read_msr(0x802, 0), Ok(5));
    assert_eq!(l.read_msr(0x80d, 0), Ok(1 << 5)); // LDR: cluster 0, bit 5
    l.write_msr(0x80f, 0x1ff, 0).unwrap();
    let ev = l.write_msr(0x830, (9u64 << 32) | 0x4042, 0).unwrap();
    let Some(LapicEvent::Ipi(ipi)) = ev else {
        panic!("no IPI");
    };
    assert_eq!((ipi.dest, ipi.vector), (9, 0x42));
    // Self IPI MSR.
    let Some(LapicEvent::Ipi(me)) = l.write_msr(0x83f, 0x55, 0).unwrap() else {
        panic!("no self IPI");
    };
    assert_eq!(me.shorthand, Shorthand::SelfOnly);
    // Read-only registers and non-zero EOI fault.
    assert_eq!(l.write_msr(0x802, 1, 0), Err(GpFault));
    assert_eq!(l.write_msr(0x80b, 1, 0), Err(GpFault));
    assert!(l.write_msr(0x80b, 0, 0).is_ok());
    // x2APIC -> xAPIC without disabling first is illegal.
    assert_eq!(
        l.write_apic_base(0xfee0_0000 | APIC_BASE_ENABLE),
        Err(GpFault)
    );
    assert!(l.matches_dest(5, DestMode::Physical));
    assert!(l.matches_dest(1 << 5, DestMode::Logical));
    assert!(!l.matches_dest((1 << 16) | (1 << 5), DestMode::Logical));
}

#[test]
fn global_disable_resets_and_hides_the_apic() {
    let mut l = enabled();
    l.accept_interrupt(0x50, Trigger::Edge);
    l.write_apic_base(0xfee0_0000).unwrap();
    assert_eq!(l.mmio_base(), None);
    assert_eq!(l.pending_vector(), None);
    assert!(l.accepts_pic_interrupts());
    l.write_apic_base(0xfee0_0000 | APIC_BASE_ENABLE).unwrap();
    assert_eq!(l.irr(), [0; 8]);
    assert_eq!(rd(&l, APIC_SVR, 0), 0xff);
    // Reserved bits fault.
    assert_eq!(l.write_apic_base(1 << 63), Err(GpFault));
}

#[test]
fn state_round_trips_through_serde() {
    let mut l = enabled();
    arm_timer(&mut l, 0x20040, 0x3, 5000, 10);
    l.accept_interrupt(0x66, Trigger::Level);
    let json = serde_json::to_string(&l).unwrap();
    let back: Lapic = serde_json::from_str(&json).unwrap();
    assert_eq!(back.next_timer_deadline(), l.next_timer_deadline());
    assert_eq!(back.irr(), l.irr());
    assert_eq!(back.tmr(), l.tmr());
    assert_eq!(rd(&back, APIC_TMCCT, 20_000), rd(&l, APIC_TMCCT, 20_000));
}

#[test]
fn timer_mode_change_keeps_the_current_count() {
    // Periodic, divide by 1 (one count per ns), 1000 counts; 2.6 periods in.
    let mut l = enabled();
    arm_timer(&mut l, 0x20040, 0xb, 1000, 0);
    assert_eq!(rd(&l, APIC_TMCCT, 2600), 400);
    // To one-shot: the count goes on from 400, then stays at zero.
    wr(&mut l, APIC_LVT_TIMER, 0x40, 2600);
    assert_eq!(rd(&l, APIC_TMCCT, 2600), 400);
    assert_eq!(rd(&l, APIC_TMCCT, 2900), 100);
    assert_eq!(l.next_timer_deadline(), Some(3000));
    assert!(l.tick(3000));
    assert_eq!(rd(&l, APIC_TMCCT, 3500), 0);
    // Expired one-shot to periodic: it stays at zero.
    wr(&mut l, APIC_LVT_TIMER, 0x20040, 3500);
    assert_eq!(rd(&l, APIC_TMCCT, 3600), 0);
    // One-shot mid-count to periodic: goes on, then reloads TMICT.
    wr(&mut l, APIC_LVT_TIMER, 0x40, 4000);
    wr(&mut l, APIC_TMICT, 1000, 4000);
    wr(&mut l, APIC_LVT_TIMER, 0x20040, 4700);
    assert_eq!(rd(&l, APIC_TMCCT, 4700), 300);
    assert_eq!(rd(&l, APIC_TMCCT, 5100), 900);
}

#[test]
fn two_nmis_at_once_are_both_delivered() {
    let mut l = enabled();
    assert!(l.deliver(DeliveryMode::Nmi, 0, Trigger::Edge));
    assert!(l.deliver(DeliveryMode::Nmi, 0, Trigger::Edge));
    assert!(l.deliver(DeliveryMode::Nmi, 0, Trigger::Edge));
    // One in service and one pending behind it; more collapse.
    assert!(l.take_nmi());
    assert!(l.nmi_pending());
    assert!(l.take_nmi());
    assert!(!l.take_nmi());
}

#[test]
fn xapic_id_returns_to_the_hardware_id_when_reenabled() {
    let mut l = enabled();
    wr(&mut l, APIC_ID, 7 << 24, 0);
    assert_eq!(rd(&l, APIC_ID, 0), 7 << 24);
    // Disable and enable again (what a test kernel's reset_apic does).
    let base = l.apic_base();
    l.write_apic_base(base & !APIC_BASE_ENABLE).unwrap();
    l.write_apic_base(base).unwrap();
    assert_eq!(rd(&l, APIC_ID, 0), 1 << 24);
    // x2APIC mode reports the hardware ID, whatever the xAPIC ID was.
    wr(&mut l, APIC_ID, 9 << 24, 0);
    l.write_apic_base(base | APIC_BASE_EXTD).unwrap();
    assert_eq!(l.read_msr(0x802, 0), Ok(1));
    // Reserved low bits of IA32_APIC_BASE (bit 9, bits 0-7) raise #GP.
    assert_eq!(
        l.write_apic_base(base | APIC_BASE_EXTD | (1 << 9)),
        Err(GpFault)
    );
    assert_eq!(l.write_apic_base(base | APIC_BASE_EXTD | 1), Err(GpFault));
}
