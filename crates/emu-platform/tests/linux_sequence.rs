//! The register sequences a Linux x86-64 guest performs at boot, replayed
//! against the platform, checking what the guest would observe at each step.

use emu_platform::lapic::*;
use emu_platform::pit::ticks_to_ns;
use emu_platform::pvclock::{PvClock, PvClockVcpuTimeInfo};
use emu_platform::{Platform, PlatformConfig};

const APIC: u64 = 0xfee0_0000;
const IOAPIC: u64 = 0xfec0_0000;

struct Guest {
    p: Platform,
    now: u64,
}

impl Guest {
    fn outb(&mut self, port: u16, v: u8) {
        assert!(self.p.pio_write(port, &[v], self.now), "port {port:#x}");
    }
    fn inb(&mut self, port: u16) -> u8 {
        let mut b = [0u8];
        assert!(self.p.pio_read(port, &mut b, self.now));
        b[0]
    }
    fn apic_write(&mut self, cpu: usize, reg: u32, v: u32) {
        assert!(self
            .p
            .mmio_write(cpu, APIC + reg as u64, &v.to_le_bytes(), self.now));
    }
    fn apic_read(&mut self, cpu: usize, reg: u32) -> u32 {
        let mut b = [0u8; 4];
        assert!(self.p.mmio_read(cpu, APIC + reg as u64, &mut b, self.now));
        u32::from_le_bytes(b)
    }
    fn io_apic_write(&mut self, reg: u32, v: u32) {
        assert!(self.p.mmio_write(0, IOAPIC, &reg.to_le_bytes(), self.now));
        assert!(self
            .p
            .mmio_write(0, IOAPIC + 0x10, &v.to_le_bytes(), self.now));
    }
    fn io_apic_read(&mut self, reg: u32) -> u32 {
        assert!(self.p.mmio_write(0, IOAPIC, &reg.to_le_bytes(), self.now));
        let mut b = [0u8; 4];
        assert!(self.p.mmio_read(0, IOAPIC + 0x10, &mut b, self.now));
        u32::from_le_bytes(b)
    }
    fn advance(&mut self, ns: u64) {
        self.now += ns;
        self.p.tick(self.now);
    }
    /// The CPU takes an interrupt if one is pending (IF=1).
    fn take(&mut self, cpu: usize) -> Option<u8> {
        let v = self.p.pending_vector(cpu)?;
        self.p.ack(cpu, v)
    }
}

#[test]
fn linux_boot_interrupt_setup() {
    let mut g = Guest {
        p: Platform::new(PlatformConfig {
            num_vcpus: 2,
            ..PlatformConfig::default()
        }),
        now: 0,
    };

    // probe_8259A + init_8259A(0): everything masked afterwards except the
    // cascade.
    g.outb(0xa1, 0xff);
    g.outb(0x21, 0xfb);
    assert_eq!(g.inb(0x21), 0xfb);
    for (port, v) in [
        (0x21, 0xff),
        (0xa1, 0xff),
        (0x20, 0x11),
        (0x21, 0x30),
        (0x21, 0x04),
        (0x21, 0x01),
    ] {
        g.outb(port, v);
    }
    for (port, v) in [(0xa0, 0x11), (0xa1, 0x38), (0xa1, 0x02), (0xa1, 0x01)] {
        g.outb(port, v);
    }
    g.outb(0x21, 0xfb);
    g.outb(0xa1, 0xff);

    // Early TSC calibration through PIT channel 2 (pit_calibrate_tsc).
    let v = g.inb(0x61);
    g.outb(0x61, (v & !0x02) | 0x01);
    g.outb(0x43, 0xb0);
    let latch: u16 = 11931; // CAL_LATCH for 10 ms
    g.outb(0x42, latch as u8);
    g.outb(0x42, (latch >> 8) as u8);
    let mut polls = 0;
    while g.inb(0x61) & 0x20 == 0 {
        g.now += 5_000; // 5 us per poll loop iteration
        polls += 1;
        assert!(polls < 10_000);
    }
    // 10 ms / 5 us, give or take a poll.
    assert!((1999..=2001).contains(&polls), "{polls}");

    // setup_local_APIC on the BSP: soft-disable (masks the LVTs), TPR,
    // software enable with the spurious vector, LINT0 decision, LINT1 NMI.
    let svr = g.apic_read(0, APIC_SVR);
    g.apic_write(0, APIC_SVR, svr & !SVR_ENABLE);
    g.apic_write(0, APIC_LDR, 1 << 24);
    g.apic_write(0, APIC_TPR, 0x10);
    g.apic_write(0, APIC_SVR, SVR_ENABLE | 0xff);
    let lvt0_masked = g.apic_read(0, APIC_LVT_LINT0) & LVT_MASKED;
    assert_ne!(lvt0_masked, 0, "soft disable must have masked LINT0");
    g.apic_write(0, APIC_LVT_LINT0, 0x700 | LVT_MASKED);
    g.apic_write(0, APIC_LVT_LINT1, 0x400);
    // ESR dance (lapic_setup_esr).
    g.apic_write(0, APIC_ESR, 0);
    g.apic_write(0, APIC_ESR, 0);
    assert_eq!(g.apic_read(0, APIC_ESR), 0);
    g.apic_write(0, APIC_LVT_ERROR, 0xfe);

    // I/O APIC: timer on pin 2 (vector 0x30, fixed, physical to APIC 0),
    // edge; a PCI device on pin 16, level, active low, masked for now.
    assert_eq!(g.io_apic_read(1) & 0xff, 0x11);
    g.io_apic_write(0x15, 0);
    g.io_apic_write(0x14, 0x30);
    g.io_apic_write(0x31, 0);
    g.io_apic_write(0x30, 0x41 | (1 << 15) | (1 << 13) | (1 << 16));

    // PIT channel 0 periodic at HZ=250 (check_timer / timer_irq_works).
    g.outb(0x43, 0x34);
    let latch0: u16 = 4773;
    g.outb(0x40, latch0 as u8);
    g.outb(0x40, (latch0 >> 8) as u8);
    let mut ticks = 0;
    for _ in 0..41 {
        g.advance(1_000_000);
        assert!(!g.p.pic().interrupt_output());
        if let Some(v) = g.take(0) {
            assert_eq!(v, 0x30);
            ticks += 1;
            g.apic_write(0, APIC_EOI, 0);
        }
    }
    // 41 ms at 250 Hz (a period is 4.0002 ms): 10 ticks through the I/O
    // APIC, none through the (masked) PIC.
    assert_eq!(ticks, 10);

    // Switch to the LAPIC timer in TSC-deadline mode and stop the PIT
    // (mode 0 with count 0, as pit_shutdown does).
    g.outb(0x43, 0x30);
    g.outb(0x40, 0);
    g.outb(0x40, 0);
    g.apic_write(0, APIC_LVT_TIMER, 0x40000 | 0xec);
    let tsc_hz = g.p.config().tsc_hz;
    let now = g.now;
    assert_eq!(
        g.p.wrmsr(0, MSR_IA32_TSC_DEADLINE, now + 4_000_000, now, now),
        Some(Ok(()))
    );
    assert_eq!(tsc_hz, 1_000_000_000);
    // The PIT's last one-shot (65536 ticks) and the deadline race; the
    // engine's sleep target is the earlier of the two.
    assert_eq!(g.p.next_deadline_ns(), Some(now + 4_000_000));
    g.advance(4_000_000);
    assert_eq!(g.take(0), Some(0xec));
    g.apic_write(0, APIC_EOI, 0);

    // Bring up CPU 1: INIT, INIT de-assert, SIPI x2 to the trampoline.
    g.apic_write(0, APIC_ICR_HI, 1 << 24);
    g.apic_write(0, APIC_ICR_LO, 0xc500);
    g.apic_write(0, APIC_ICR_LO, 0x8500);
    assert!(g.p.take_init(1));
    g.apic_write(0, APIC_ICR_LO, 0x0600 | 0x9a);
    g.apic_write(0, APIC_ICR_LO, 0x0600 | 0x9a);
    assert_eq!(g.p.take_startup(1), Some(0x9a));
    // The AP sets up its own APIC.
    g.apic_write(1, APIC_LDR, 2 << 24);
    g.apic_write(1, APIC_SVR, SVR_ENABLE | 0xff);
    assert_eq!(g.apic_read(1, APIC_ID) >> 24, 1);

    // Reschedule IPI to CPU 1 (vector 0xfd), call-function to all but
    // self (0xfb).
    g.apic_write(0, APIC_ICR_HI, 1 << 24);
    g.apic_write(0, APIC_ICR_LO, 0x4000 | 0xfd);
    assert_eq!(g.take(1), Some(0xfd));
    g.apic_write(1, APIC_EOI, 0);
    g.apic_write(1, APIC_ICR_LO, 0x000c_4000 | 0xfb);
    assert_eq!(g.take(0), Some(0xfb));
    assert_eq!(g.take(1), None);
    g.apic_write(0, APIC_EOI, 0);

    // The PCI device asserts its line while masked, then the driver unmasks
    // the pin: delivered with remote IRR until EOI.
    g.p.set_gsi(16, true);
    assert_eq!(g.take(0), None);
    g.io_apic_write(0x30, 0x41 | (1 << 15) | (1 << 13));
    assert_eq!(g.take(0), Some(0x41));
    g.p.set_gsi(16, false);
    g.apic_write(0, APIC_EOI, 0);
    assert_eq!(g.io_apic_read(0x30) & (1 << 14), 0);

    // kvmclock: the guest converts TSC to ns with the published scale.
    let pv = PvClock::new(tsc_hz).unwrap();
    let info = pv.time_info(2, g.now, g.now);
    let bytes = info.to_bytes();
    let seen = PvClockVcpuTimeInfo::from_bytes(&bytes);
    assert_eq!(seen.guest_time_ns(g.now + 123_456), g.now + 123_456);

    // The PIT shutdown count eventually fires once on pin 2 (real hardware
    // and KVM do the same); nothing after that.
    let pit_last = ticks_to_ns(emu_platform::pit::ns_to_ticks(now) + 65_536);
    g.advance(pit_last.saturating_sub(g.now) + 1);
    assert_eq!(g.take(0), Some(0x30));
    g.apic_write(0, APIC_EOI, 0);
    g.advance(1_000_000_000);
    assert_eq!(g.take(0), None);
}
