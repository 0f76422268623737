//! Platform wiring: IPI and I/O APIC routing, PIC virtual wire, timers.

use emu_platform::lapic::*;
use emu_platform::pit::{ticks_to_ns, PIT_HZ};
use emu_platform::{Platform, PlatformConfig};

const APIC: u64 = 0xfee0_0000;
const IOAPIC: u64 = 0xfec0_0000;

fn platform(n: usize) -> Platform {
    Platform::new(PlatformConfig {
        num_vcpus: n,
        ..PlatformConfig::default()
    })
}

fn apic_wr(p: &mut Platform, vcpu: usize, reg: u32, val: u32, now: u64) {
    assert!(p.mmio_write(vcpu, APIC + reg as u64, &val.to_le_bytes(), now));
}

fn apic_rd(p: &mut Platform, vcpu: usize, reg: u32, now: u64) -> u32 {
    let mut b = [0u8; 4];
    assert!(p.mmio_read(vcpu, APIC + reg as u64, &mut b, now));
    u32::from_le_bytes(b)
}

fn ioapic_wr(p: &mut Platform, reg: u32, val: u32) {
    assert!(p.mmio_write(0, IOAPIC, &reg.to_le_bytes(), 0));
    assert!(p.mmio_write(0, IOAPIC + 0x10, &val.to_le_bytes(), 0));
}

fn ioapic_rd(p: &mut Platform, reg: u32) -> u32 {
    assert!(p.mmio_write(0, IOAPIC, &reg.to_le_bytes(), 0));
    let mut b = [0u8; 4];
    assert!(p.mmio_read(0, IOAPIC + 0x10, &mut b, 0));
    u32::from_le_bytes(b)
}

fn enable_all(p: &mut Platform) {
    for v in 0..p.num_vcpus() {
        apic_wr(p, v, APIC_SVR, 0x1ff, 0);
    }
}

fn send_ipi(p: &mut Platform, from: usize, dest: u8, lo: u32) {
    apic_wr(p, from, APIC_ICR_HI, (dest as u32) << 24, 0);
    apic_wr(p, from, APIC_ICR_LO, lo, 0);
}

fn take(p: &mut Platform, vcpu: usize) -> Option<u8> {
    let v = p.pending_vector(vcpu)?;
    p.ack(vcpu, v)
}

#[test]
fn fixed_ipi_physical_destination() {
    let mut p = platform(4);
    enable_all(&mut p);
    p.take_kicks();
    send_ipi(&mut p, 0, 2, 0x4040);
    assert_eq!(p.take_kicks(), 1 << 2);
    assert_eq!(p.pending_vector(1), None);
    assert_eq!(p.pending_vector(2), Some(0x40));
    assert_eq!(take(&mut p, 2), Some(0x40));
    assert_eq!(apic_rd(&mut p, 2, APIC_ISR + 0x20, 0), 1);
    apic_wr(&mut p, 2, APIC_EOI, 0, 0);
    assert_eq!(apic_rd(&mut p, 2, APIC_ISR + 0x20, 0), 0);
    // Broadcast physical ID 0xff reaches everyone including the sender.
    send_ipi(&mut p, 1, 0xff, 0x4041);
    for v in 0..4 {
        assert_eq!(p.pending_vector(v), Some(0x41), "vcpu {v}");
    }
}

#[test]
fn shorthands() {
    let mut p = platform(3);
    enable_all(&mut p);
    send_ipi(&mut p, 1, 0, 0x000c_4050); // all excluding self
    assert_eq!(p.pending_vector(0), Some(0x50));
    assert_eq!(p.pending_vector(1), None);
    assert_eq!(p.pending_vector(2), Some(0x50));
    send_ipi(&mut p, 1, 0, 0x0004_4060); // self
    assert_eq!(p.pending_vector(1), Some(0x60));
    assert_eq!(p.pending_vector(0), Some(0x50));
    send_ipi(&mut p, 1, 0, 0x0008_4070); // all including self
    for v in 0..3 {
        assert_eq!(p.pending_vector(v), Some(0x70));
    }
}

#[test]
fn flat_logical_and_lowest_priority() {
    let mut p = platform(4);
    enable_all(&mut p);
    for v in 0..4 {
        apic_wr(&mut p, v, APIC_DFR, 0xffff_ffff, 0);
        apic_wr(&mut p, v, APIC_LDR, (1 << v) << 24, 0);
    }
    // Fixed logical to mask 0b0110: vCPUs 1 and 2.
    send_ipi(&mut p, 0, 0x06, 0x4830);
    let got: Vec<_> = (0..4).map(|v| p.pending_vector(v)).collect();
    assert_eq!(got, vec![None, Some(0x30), Some(0x30), None]);
    // Lowest priority among 0b1110: the lowest TPR wins ...
    apic_wr(&mut p, 1, APIC_TPR, 0x20, 0);
    apic_wr(&mut p, 2, APIC_TPR, 0x10, 0);
    apic_wr(&mut p, 3, APIC_TPR, 0x10, 0);
    send_ipi(&mut p, 0, 0x0e, 0x4940);
    assert_eq!(p.lapic(2).unwrap().irr()[2], 1);
    assert_eq!(p.lapic(3).unwrap().irr()[2], 0);
    assert_eq!(p.lapic(1).unwrap().irr()[2], 0);
    // ... and ties go to the lowest-numbered vCPU.
    apic_wr(&mut p, 1, APIC_TPR, 0, 0);
    apic_wr(&mut p, 2, APIC_TPR, 0, 0);
    apic_wr(&mut p, 3, APIC_TPR, 0, 0);
    send_ipi(&mut p, 0, 0x0e, 0x4950);
    assert_eq!(p.lapic(1).unwrap().irr()[2] >> 16, 1);
    assert_eq!(p.lapic(2).unwrap().irr()[2] >> 16, 0);
}

#[test]
fn init_sipi_sipi_starts_an_ap() {
    let mut p = platform(2);
    apic_wr(&mut p, 0, APIC_SVR, 0x1ff, 0);
    // Linux's wakeup_secondary_cpu_via_init: INIT assert, INIT de-assert,
    // then two SIPIs.
    send_ipi(&mut p, 0, 1, 0x0000_c500);
    send_ipi(&mut p, 0, 1, 0x0000_8500);
    assert!(p.has_event(1));
    assert!(p.take_init(1));
    // Waiting for SIPI is a state, not an event to wake up for.
    assert!(!p.has_event(1));
    send_ipi(&mut p, 0, 1, 0x0000_0698);
    assert!(p.has_event(1));
    send_ipi(&mut p, 0, 1, 0x0000_0698);
    assert_eq!(p.take_startup(1), Some(0x98));
    assert_eq!(p.take_startup(1), None);
    assert!(!p.take_init(0));
    // NMI IPI.
    send_ipi(&mut p, 1, 0, 0x0000_4400);
    assert!(p.take_nmi(0));
}

#[test]
fn ioapic_edge_interrupt_reaches_the_destination_lapic() {
    let mut p = platform(2);
    enable_all(&mut p);
    // ISA IRQ4 (serial) -> vector 0x24 on APIC 1.
    ioapic_wr(&mut p, 0x19, 1 << 24);
    ioapic_wr(&mut p, 0x18, 0x24);
    p.set_isa_irq(4, true);
    p.set_isa_irq(4, false);
    assert_eq!(p.pending_vector(1), Some(0x24));
    // vCPU 0 is still in virtual-wire mode, but the 8259 was never
    // initialised, so it raises nothing.
    assert_eq!(p.pending_vector(0), None);
}

#[test]
fn ioapic_level_interrupt_eoi_round_trip() {
    let mut p = platform(1);
    enable_all(&mut p);
    // GSI 20, level, vector 0x61, APIC 0.
    ioapic_wr(&mut p, 0x10 + 40 + 1, 0);
    ioapic_wr(&mut p, 0x10 + 40, 0x61 | (1 << 15));
    p.set_gsi(20, true);
    assert_eq!(take(&mut p, 0), Some(0x61));
    assert_ne!(ioapic_rd(&mut p, 0x10 + 40) & (1 << 14), 0);
    // The device is still asserting: EOI re-delivers.
    apic_wr(&mut p, 0, APIC_EOI, 0, 0);
    assert_eq!(take(&mut p, 0), Some(0x61));
    // The device deasserts; the EOI clears remote IRR and nothing is left.
    p.set_gsi(20, false);
    apic_wr(&mut p, 0, APIC_EOI, 0, 0);
    assert_eq!(ioapic_rd(&mut p, 0x10 + 40) & (1 << 14), 0);
    assert_eq!(p.pending_vector(0), None);
}

/// Linux's 8259 setup with vectors 0x30/0x38.
fn init_pic(p: &mut Platform) {
    for (port, val) in [
        (0x21u16, 0xffu8),
        (0xa1, 0xff),
        (0x20, 0x11),
        (0x21, 0x30),
        (0x21, 0x04),
        (0x21, 0x01),
        (0xa0, 0x11),
        (0xa1, 0x38),
        (0xa1, 0x02),
        (0xa1, 0x01),
        (0x21, 0xfa),
        (0xa1, 0xff),
    ] {
        assert!(p.pio_write(port, &[val], 0));
    }
}

#[test]
fn pit_through_pic_virtual_wire_to_vcpu0() {
    let mut p = platform(2);
    init_pic(&mut p);
    // PIT channel 0, mode 2, 1 kHz.
    p.pio_write(0x43, &[0x34], 0);
    p.pio_write(0x40, &[0xa9], 0);
    p.pio_write(0x40, &[0x04], 0);
    let first = ticks_to_ns(1193);
    assert_eq!(p.next_deadline_ns(), Some(first));
    p.tick(first - 1);
    assert_eq!(p.pending_vector(0), None);
    p.tick(first);
    assert_eq!(p.pending_vector(0), Some(0x30));
    assert_eq!(p.pending_vector(1), None);
    assert_eq!(p.ack(0, 0x30), Some(0x30));
    // Specific EOI, then the next tick.
    p.pio_write(0x20, &[0x60], first);
    let second = ticks_to_ns(2 * 1193);
    assert_eq!(p.next_deadline_ns(), Some(second));
    p.tick(second);
    assert_eq!(take(&mut p, 0), Some(0x30));
    // Once the OS masks LINT0 (switching to the I/O APIC), the PIC no
    // longer reaches the CPU.
    p.pio_write(0x20, &[0x60], second);
    apic_wr(&mut p, 0, APIC_SVR, 0x1ff, second);
    apic_wr(&mut p, 0, APIC_LVT_LINT0, LVT_MASKED | 0x700, second);
    p.tick(ticks_to_ns(3 * 1193));
    assert_eq!(p.pending_vector(0), None);
}

#[test]
fn pit_irq0_goes_to_ioapic_pin2() {
    let mut p = platform(1);
    enable_all(&mut p);
    apic_wr(&mut p, 0, APIC_LVT_LINT0, LVT_MASKED, 0);
    ioapic_wr(&mut p, 0x15, 0);
    ioapic_wr(&mut p, 0x14, 0x30);
    p.pio_write(0x43, &[0x34], 0);
    p.pio_write(0x40, &[0x9c, 0x2e], 0); // 16-bit write hits 0x40 and 0x41
                                         // Only the low byte reached channel 0; write the high byte too.
    p.pio_write(0x40, &[0x2e], 0);
    let period = ticks_to_ns(0x2e9c);
    p.tick(period);
    assert_eq!(take(&mut p, 0), Some(0x30));
}

#[test]
fn lapic_timer_through_platform_and_next_deadline() {
    let mut p = platform(2);
    enable_all(&mut p);
    apic_wr(&mut p, 1, APIC_TDCR, 0xb, 0);
    apic_wr(&mut p, 1, APIC_LVT_TIMER, 0xef, 0);
    apic_wr(&mut p, 1, APIC_TMICT, 50_000, 1000);
    assert_eq!(p.next_deadline_ns(), Some(51_000));
    assert_eq!(p.next_lapic_deadline_ns(1), Some(51_000));
    assert_eq!(p.next_lapic_deadline_ns(0), None);
    assert_eq!(apic_rd(&mut p, 1, APIC_TMCCT, 26_000), 25_000);
    p.take_kicks();
    p.tick(51_000);
    assert_eq!(p.take_kicks(), 1 << 1);
    assert_eq!(p.pending_vector(1), Some(0xef));
    assert_eq!(p.next_deadline_ns(), None);
    // TSC-deadline through WRMSR (TSC = 1 GHz here).
    apic_wr(&mut p, 0, APIC_LVT_TIMER, 0x40000 | 0xee, 60_000);
    assert_eq!(
        p.wrmsr(0, MSR_IA32_TSC_DEADLINE, 90_000, 60_000, 60_000),
        Some(Ok(()))
    );
    assert_eq!(p.rdmsr(0, MSR_IA32_TSC_DEADLINE, 60_000), Some(Ok(90_000)));
    assert_eq!(p.next_deadline_ns(), Some(90_000));
    p.tick(90_000);
    assert_eq!(p.pending_vector(0), Some(0xee));
}

#[test]
fn dispatch_boundaries_and_msrs() {
    let mut p = platform(1);
    let mut b = [0u8; 4];
    assert!(!p.mmio_read(0, APIC - 4, &mut b, 0));
    assert!(!p.mmio_read(0, APIC + 0x1000, &mut b, 0));
    assert!(!p.mmio_read(7, APIC + 0x1000, &mut b, 0));
    assert!(!p.pio_read(0x60, &mut b[..1], 0));
    assert!(p.pio_read(0x61, &mut b[..1], 0));
    assert_eq!(p.rdmsr(0, 0x10, 0), None);
    assert_eq!(
        p.rdmsr(0, MSR_IA32_APIC_BASE, 0),
        Some(Ok(APIC | APIC_BASE_BSP | APIC_BASE_ENABLE))
    );
    assert_eq!(p.rdmsr(0, 0x802, 0), Some(Err(GpFault)));
    assert_eq!(p.rdmsr(3, MSR_IA32_APIC_BASE, 0), None);
    // Relocating the APIC page moves the MMIO decode.
    assert_eq!(
        p.wrmsr(0, MSR_IA32_APIC_BASE, 0xfed0_0000 | APIC_BASE_ENABLE, 0, 0),
        Some(Ok(()))
    );
    assert!(p.mmio_read(0, 0xfed0_0030, &mut b, 0));
    assert_eq!(u32::from_le_bytes(b), APIC_VERSION_VALUE);
    // x2APIC mode: ICR via MSR routes IPIs.
    let base = 0xfee0_0000 | APIC_BASE_ENABLE;
    assert_eq!(p.wrmsr(0, MSR_IA32_APIC_BASE, base, 0, 0), Some(Ok(())));
    assert_eq!(
        p.wrmsr(0, MSR_IA32_APIC_BASE, base | APIC_BASE_EXTD, 0, 0),
        Some(Ok(()))
    );
    assert_eq!(p.wrmsr(0, 0x80f, 0x1ff, 0, 0), Some(Ok(())));
    assert_eq!(p.wrmsr(0, 0x830, 0x4077, 0, 0), Some(Ok(())));
    assert_eq!(p.pending_vector(0), Some(0x77));
    assert!(!p.mmio_read(0, APIC + 0x30, &mut b, 0));
}

#[test]
fn halted_vcpu_wakeup_uses_the_earliest_timer() {
    let mut p = platform(1);
    enable_all(&mut p);
    p.pio_write(0x43, &[0x38], 0);
    p.pio_write(0x40, &[0xff, 0xff], 0);
    p.pio_write(0x40, &[0x00], 0);
    // PIT one-shot of 255 ticks vs. APIC timer of 1 ms.
    apic_wr(&mut p, 0, APIC_LVT_TIMER, 0xec, 0);
    apic_wr(&mut p, 0, APIC_TDCR, 0xb, 0);
    apic_wr(&mut p, 0, APIC_TMICT, 1_000_000, 0);
    let pit_due = ticks_to_ns(256);
    assert!(pit_due < 1_000_000);
    assert_eq!(p.next_deadline_ns(), Some(pit_due));
    p.tick(pit_due);
    assert_eq!(p.next_deadline_ns(), Some(1_000_000));
    assert_eq!(PIT_HZ, 1_193_182);
}

#[test]
fn platform_state_round_trips_through_serde() {
    let mut p = platform(2);
    enable_all(&mut p);
    init_pic(&mut p);
    apic_wr(&mut p, 1, APIC_LVT_TIMER, 0x20040, 0);
    apic_wr(&mut p, 1, APIC_TMICT, 1000, 0);
    let json = serde_json::to_string(&p).unwrap();
    let mut back: Platform = serde_json::from_str(&json).unwrap();
    assert_eq!(back.next_deadline_ns(), p.next_deadline_ns());
    back.tick(2000);
    assert_eq!(back.pending_vector(1), Some(0x40));
}

#[test]
fn gsi_helpers_map_isa_lines() {
    let mut p = platform(1);
    enable_all(&mut p);
    init_pic(&mut p);
    // Unmask IRQ4 on the PIC as well; LINT0 still in virtual wire.
    p.pio_write(0x21, &[0xea], 0);
    // GSI 4 -> PIC IRQ4 and I/O APIC pin 4 (masked there).
    p.pulse_gsi(4);
    assert_eq!(take(&mut p, 0), Some(0x34));
    p.pio_write(0x20, &[0x20], 0);
    // GSI 2 is ISA IRQ0 with the override.
    p.pulse_gsi(2);
    assert_eq!(take(&mut p, 0), Some(0x30));
    p.pio_write(0x20, &[0x20], 0);
    // GSI 17 only reaches the I/O APIC.
    apic_wr(&mut p, 0, APIC_LVT_LINT0, LVT_MASKED, 0);
    ioapic_wr(&mut p, 0x10 + 34 + 1, 0);
    ioapic_wr(&mut p, 0x10 + 34, 0x71 | (1 << 15));
    p.set_gsi_level(17, true);
    assert_eq!(take(&mut p, 0), Some(0x71));
}

#[test]
fn reset_returns_to_power_on_state() {
    let mut p = platform(2);
    enable_all(&mut p);
    init_pic(&mut p);
    send_ipi(&mut p, 0, 1, 0x4040);
    p.reset();
    assert_eq!(p.pending_vector(1), None);
    assert_eq!(apic_rd(&mut p, 1, APIC_SVR, 0), 0xff);
    assert_eq!(p.pic().masks(), (0, 0));
    assert_eq!(p.num_vcpus(), 2);
}
