//! kvmclock structure layout and scaling math.

use emu_platform::pvclock::*;

#[test]
fn mul_shift_converts_within_one_ppm() {
    let freqs = [
        1_000_000u64,
        1_193_182,
        100_000_000,
        999_999_999,
        1_000_000_000,
        1_000_000_001,
        2_100_000_000,
        2_399_999_000,
        3_000_000_000,
        3_700_123_456,
        5_000_000_000,
        10_000_000_000,
    ];
    for hz in freqs {
        let pv = PvClock::new(hz).expect("representable");
        // Multiplier normalised to keep precision.
        assert!(
            pv.tsc_to_system_mul >= 1 << 31,
            "{hz}: mul {:#x}",
            pv.tsc_to_system_mul
        );
        for seconds in [1u64, 7, 60, 3600] {
            let delta = hz * seconds;
            let ns = pv.tsc_delta_to_ns(delta) as f64;
            let want = (seconds * 1_000_000_000) as f64;
            let err = (ns - want).abs() / want;
            assert!(err < 1e-6, "{hz} Hz, {seconds} s: {ns} vs {want} ({err})");
        }
        // Small deltas too (absolute error under 1 ns + 1 ppm).
        let delta = hz / 1000 + 17;
        let want = (delta as u128 * 1_000_000_000 / hz as u128) as f64;
        let got = pv.tsc_delta_to_ns(delta) as f64;
        assert!(
            (got - want).abs() <= 1.0 + want * 1e-6,
            "{hz}: {got} vs {want}"
        );
    }
}

#[test]
fn unrepresentable_frequencies_are_rejected() {
    assert_eq!(PvClock::new(0), None);
}

#[test]
fn known_values_for_common_frequencies() {
    // 1 GHz: 1 cycle = 1 ns exactly: mul 2^31 with shift +1.
    let pv = PvClock::new(1_000_000_000).unwrap();
    assert_eq!((pv.tsc_to_system_mul, pv.tsc_shift), (1 << 31, 1));
    assert_eq!(pv.tsc_delta_to_ns(123_456_789), 123_456_789);
    // 2 GHz: shift 0, mul 2^31 (half a ns per cycle).
    let pv = PvClock::new(2_000_000_000).unwrap();
    assert_eq!((pv.tsc_to_system_mul, pv.tsc_shift), (1 << 31, 0));
    assert_eq!(pv.tsc_delta_to_ns(1000), 500);
    // 4 GHz: negative shift.
    let pv = PvClock::new(4_000_000_000).unwrap();
    assert_eq!((pv.tsc_to_system_mul, pv.tsc_shift), (1 << 31, -1));
}

#[test]
fn vcpu_time_info_layout_and_guest_math() {
    let pv = PvClock::new(2_500_000_000).unwrap();
    let info = pv.time_info(4, 1_000_000, 5_000_000_000);
    let b = info.to_bytes();
    assert_eq!(b.len(), 32);
    assert_eq!(&b[0..4], &4u32.to_le_bytes());
    assert_eq!(&b[4..8], &[0; 4]);
    assert_eq!(&b[8..16], &1_000_000u64.to_le_bytes());
    assert_eq!(&b[16..24], &5_000_000_000u64.to_le_bytes());
    assert_eq!(&b[24..28], &pv.tsc_to_system_mul.to_le_bytes());
    assert_eq!(b[28] as i8, pv.tsc_shift);
    assert_eq!(b[29], PVCLOCK_TSC_STABLE_BIT);
    assert_eq!(&b[30..32], &[0; 2]);
    assert_eq!(PvClockVcpuTimeInfo::from_bytes(&b), info);
    // 2.5e9 cycles after the timestamp the guest reads one more second.
    let t = info.guest_time_ns(1_000_000 + 2_500_000_000);
    assert!((t as i64 - 6_000_000_000i64).abs() <= 6);
}

#[test]
fn update_protocol_uses_odd_then_even_versions() {
    let pv = PvClock::new(3_000_000_000).unwrap();
    let info = pv.time_info(0, 10, 20);
    let (odd, done) = info.to_bytes_for_update(2);
    assert_eq!(u32::from_le_bytes(odd), 3);
    assert_eq!(PvClockVcpuTimeInfo::from_bytes(&done).version, 4);
    let (odd, done) = info.to_bytes_for_update(0);
    assert_eq!(u32::from_le_bytes(odd), 1);
    assert_eq!(PvClockVcpuTimeInfo::from_bytes(&done).version, 2);
    // An odd leftover (interrupted update) still moves forward to even.
    let (odd, done) = info.to_bytes_for_update(5);
    assert_eq!(u32::from_le_bytes(odd), 7);
    assert_eq!(PvClockVcpuTimeInfo::from_bytes(&done).version, 8);
}

#[test]
fn wall_clock_is_the_boot_time() {
    // Host wall clock 1_700_000_000.25 s, guest kvmclock at 3.5 s.
    let wc = PvClockWallClock::new(2, 1_700_000_000_250_000_000, 3_500_000_000);
    assert_eq!(wc.sec, 1_699_999_996);
    assert_eq!(wc.nsec, 750_000_000);
    let b = wc.to_bytes();
    assert_eq!(b.len(), 12);
    assert_eq!(&b[0..4], &2u32.to_le_bytes());
    assert_eq!(&b[4..8], &1_699_999_996u32.to_le_bytes());
    assert_eq!(&b[8..12], &750_000_000u32.to_le_bytes());
}

#[test]
fn system_time_msr_decoding() {
    assert_eq!(system_time_msr_gpa(0x1234_5000 | 1), Some(0x1234_5000));
    assert_eq!(system_time_msr_gpa(0x1234_5000), None);
    assert_eq!(MSR_KVM_SYSTEM_TIME_NEW, 0x4b56_4d01);
    assert_eq!(MSR_KVM_WALL_CLOCK_NEW, 0x4b56_4d00);
}
