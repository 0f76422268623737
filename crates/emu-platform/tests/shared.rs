//! SharedPlatform: locking wrapper with a clock.

use std::sync::Arc;

use emu_platform::lapic::*;
use emu_platform::{ManualClock, Platform, PlatformConfig, SharedPlatform};

const APIC: u64 = 0xfee0_0000;

fn setup(n: usize) -> (Arc<ManualClock>, SharedPlatform) {
    let clock = Arc::new(ManualClock::new(2_000_000_000));
    let p = Platform::new(PlatformConfig {
        num_vcpus: n,
        tsc_hz: 2_000_000_000,
        ..PlatformConfig::default()
    });
    let s = SharedPlatform::new(p, clock.clone());
    (clock, s)
}

fn wr(s: &SharedPlatform, vcpu: u32, reg: u32, val: u32) {
    assert!(s.mmio_write(vcpu, APIC + reg as u64, &val.to_le_bytes()));
}

#[test]
fn timer_fires_when_the_clock_passes_the_deadline() {
    let (clock, s) = setup(1);
    wr(&s, 0, APIC_SVR, 0x1ff);
    wr(&s, 0, APIC_TDCR, 0xb);
    wr(&s, 0, APIC_LVT_TIMER, 0xec);
    clock.set_ns(1000);
    wr(&s, 0, APIC_TMICT, 5000);
    assert_eq!(s.next_deadline_ns(), Some(6000));
    clock.set_ns(5999);
    assert_eq!(s.pending_vector(0), None);
    assert!(!s.has_pending(0));
    clock.set_ns(6000);
    assert!(s.has_pending(0));
    assert_eq!(s.pending_vector(0), Some(0xec));
    assert_eq!(s.ack_pending(0), Some(0xec));
    assert_eq!(s.pending_vector(0), None);
    assert_eq!(s.next_deadline_ns(), None);
}

#[test]
fn tsc_deadline_uses_the_clock_tsc() {
    let (clock, s) = setup(1);
    wr(&s, 0, APIC_SVR, 0x1ff);
    wr(&s, 0, APIC_LVT_TIMER, 0x40000 | 0xed);
    clock.set_ns(1000); // TSC 2000
    assert_eq!(s.wrmsr(0, MSR_IA32_TSC_DEADLINE, 6000), Some(Ok(())));
    assert_eq!(s.next_deadline_ns(), Some(3000));
    clock.set_ns(3000);
    assert_eq!(s.ack_pending(0), Some(0xed));
}

#[test]
fn ipis_between_threads_and_tpr() {
    let (_clock, s) = setup(2);
    let s = Arc::new(s);
    wr(&s, 0, APIC_SVR, 0x1ff);
    wr(&s, 1, APIC_SVR, 0x1ff);
    let kicked = Arc::new(std::sync::Mutex::new(Vec::new()));
    {
        let kicked = kicked.clone();
        s.set_kick(Arc::new(move |v| kicked.lock().unwrap().push(v)));
    }
    let t = {
        let s = s.clone();
        std::thread::spawn(move || {
            wr(&s, 0, APIC_ICR_HI, 1 << 24);
            wr(&s, 0, APIC_ICR_LO, 0x4055);
        })
    };
    t.join().unwrap();
    assert_eq!(*kicked.lock().unwrap(), vec![1]);
    assert!(s.has_pending(1));
    // TPR above the vector's class blocks it.
    s.set_tpr(1, 6);
    assert_eq!(s.tpr(1), 6);
    assert_eq!(s.pending_vector(1), None);
    s.set_tpr(1, 0);
    assert_eq!(s.pending_vector(1), Some(0x55));
    s.ack(1, 0x55);
    assert_eq!(s.pending_vector(1), None);
    // INIT/SIPI and NMI through the wrapper.
    wr(&s, 0, APIC_ICR_LO, 0xc500);
    assert!(s.take_init(1));
    wr(&s, 0, APIC_ICR_LO, 0x0610);
    assert_eq!(s.take_startup(1), Some(0x10));
    wr(&s, 1, APIC_ICR_HI, 0);
    wr(&s, 1, APIC_ICR_LO, 0x4400);
    assert!(s.take_nmi(0));
    assert!(!s.take_nmi(0));
}

#[test]
fn devices_trigger_gsis() {
    let (clock, s) = setup(1);
    wr(&s, 0, APIC_SVR, 0x1ff);
    // I/O APIC pin 4 -> vector 0x24.
    s.mmio_write(0, 0xfec0_0000, &0x18u32.to_le_bytes());
    s.mmio_write(0, 0xfec0_0010, &0x24u32.to_le_bytes());
    s.trigger_gsi(4);
    assert_eq!(s.ack_pending(0), Some(0x24));
    // PIT through port I/O and the clock.
    let mut b = [0u8];
    assert!(s.pio_read(0x61, &mut b));
    s.pio_write(0x61, &[1]);
    s.pio_write(0x43, &[0xb0]);
    s.pio_write(0x42, &[100]);
    s.pio_write(0x42, &[0]);
    s.pio_read(0x61, &mut b);
    assert_eq!(b[0] & 0x20, 0);
    clock.advance_ns(100_000);
    s.pio_read(0x61, &mut b);
    assert_eq!(b[0] & 0x20, 0x20);
    let snap = s.snapshot();
    assert!(snap.lapic(0).is_some());
}

fn msi(dest: u32, logical: bool, vector: u8, level: bool) -> emu_platform::Delivery {
    emu_platform::Delivery {
        dest,
        dest_mode: if logical {
            emu_platform::DestMode::Logical
        } else {
            emu_platform::DestMode::Physical
        },
        vector,
        delivery_mode: emu_platform::DeliveryMode::Fixed,
        trigger: if level {
            emu_platform::Trigger::Level
        } else {
            emu_platform::Trigger::Edge
        },
    }
}

fn rd(s: &SharedPlatform, vcpu: u32, reg: u32) -> u32 {
    let mut b = [0u8; 4];
    assert!(s.mmio_read(vcpu, APIC + reg as u64, &mut b));
    u32::from_le_bytes(b)
}

#[test]
fn msis_posted_without_the_lock_arrive_as_locked_ones_would() {
    let (_clock, s) = setup(2);
    wr(&s, 0, APIC_SVR, 0x1ff);
    wr(&s, 1, APIC_SVR, 0x1ff);
    let kicked = Arc::new(std::sync::Mutex::new(Vec::new()));
    {
        let kicked = kicked.clone();
        s.set_kick(Arc::new(move |v| kicked.lock().unwrap().push(v)));
    }
    // Physical, edge, one target: posted, the target kicked, the other not.
    s.signal_msi(msi(1, false, 0x41, false));
    assert_eq!(*kicked.lock().unwrap(), vec![1]);
    assert!(!s.has_pending(0));
    assert!(s.has_pending(1));
    // The IRR shows it to a register read too (the read drains first).
    assert_eq!(rd(&s, 1, APIC_IRR + 0x20), 1 << 1);
    assert_eq!(s.ack_pending(1), Some(0x41));
    assert_eq!(s.pending_vector(1), None);
    wr(&s, 1, APIC_EOI, 0);
    // Two posts of one vector before the CPU looks: one interrupt (edge
    // messages coalesce in the IRR, as on hardware); two vectors: both.
    s.signal_msi(msi(0, false, 0x51, false));
    s.signal_msi(msi(0, false, 0x51, false));
    s.signal_msi(msi(0, false, 0x62, false));
    assert_eq!(s.ack_pending(0), Some(0x62));
    wr(&s, 0, APIC_EOI, 0);
    assert_eq!(s.ack_pending(0), Some(0x51));
    wr(&s, 0, APIC_EOI, 0);
    assert_eq!(s.ack_pending(0), None);
    // A software-disabled APIC drops it, as under the lock; an illegal
    // vector sets the error register.
    wr(&s, 1, APIC_SVR, 0xff);
    s.signal_msi(msi(1, false, 0x41, false));
    assert_eq!(s.pending_vector(1), None);
    wr(&s, 1, APIC_SVR, 0x1ff);
    s.signal_msi(msi(1, false, 0x05, false));
    wr(&s, 1, APIC_ESR, 0);
    assert_ne!(rd(&s, 1, APIC_ESR), 0);
    // Logical, broadcast and level messages take the locked path.
    wr(&s, 0, APIC_DFR, 0xffff_ffff);
    wr(&s, 0, APIC_LDR, 1 << 24);
    s.signal_msi(msi(1, true, 0x71, false));
    assert_eq!(s.ack_pending(0), Some(0x71));
    wr(&s, 0, APIC_EOI, 0);
    s.signal_msi(msi(0xff, false, 0x72, false));
    assert_eq!(s.ack_pending(0), Some(0x72));
    assert_eq!(s.ack_pending(1), Some(0x72));
    s.signal_msi(msi(1, false, 0x73, true));
    assert_eq!(rd(&s, 1, APIC_TMR + 0x30), 1 << (0x73 - 0x60));
    // A snapshot includes what was posted.
    s.signal_msi(msi(0, false, 0x81, false));
    let snap = s.snapshot();
    assert_eq!(snap.lapic(0).unwrap().irr()[4], 1 << 1);
}

/// A device thread posts 2000 MSIs, each after the previous one was
/// taken, while the vCPU thread polls, acknowledges and EOIs: every one
/// arrives exactly once (none lost: the poster would wait forever; none
/// doubled: the count would run ahead).
#[test]
fn posted_msis_are_neither_lost_nor_doubled_across_threads() {
    let (_clock, s) = setup(2);
    let s = Arc::new(s);
    wr(&s, 0, APIC_SVR, 0x1ff);
    wr(&s, 1, APIC_SVR, 0x1ff);
    const N: u32 = 2_000;
    let taken = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cpu = {
        let (s, taken, done) = (s.clone(), taken.clone(), done.clone());
        std::thread::spawn(move || {
            use std::sync::atomic::Ordering::SeqCst;
            let mut seen = 0u32;
            while !done.load(SeqCst) {
                if !s.has_pending(1) {
                    std::thread::yield_now();
                    continue;
                }
                if let Some(v) = s.ack_pending(1) {
                    assert_eq!(v, 0x40 + (seen % 64) as u8, "out of order");
                    seen += 1;
                    wr(&s, 1, APIC_EOI, 0);
                    taken.store(seen, SeqCst);
                }
            }
            seen
        })
    };
    for k in 0..N {
        s.signal_msi(msi(1, false, 0x40 + (k % 64) as u8, false));
        let t0 = std::time::Instant::now();
        while taken.load(std::sync::atomic::Ordering::SeqCst) != k + 1 {
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(20),
                "MSI {k} lost"
            );
            std::thread::yield_now();
        }
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(cpu.join().unwrap(), N);
    assert_eq!(s.pending_vector(1), None);
}
