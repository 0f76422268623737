//! Guest-visible behaviour of the 8254 and port 0x61.

use emu_platform::pit::*;
use emu_platform::Pit;

/// Guest time of input tick `t`.
fn at(t: u64) -> u64 {
    ticks_to_ns(t)
}

fn load(pit: &mut Pit, ch: u16, control: u8, count: u16, now: u64) {
    pit.write_port(PIT_MODE, control, now);
    pit.write_port(PIT_CHANNEL0 + ch, count as u8, now);
    pit.write_port(PIT_CHANNEL0 + ch, (count >> 8) as u8, now);
}

fn latch_read(pit: &mut Pit, ch: u16, now: u64) -> u16 {
    pit.write_port(PIT_MODE, (ch as u8) << 6, now);
    let lo = pit.read_port(PIT_CHANNEL0 + ch, now) as u16;
    let hi = pit.read_port(PIT_CHANNEL0 + ch, now) as u16;
    (hi << 8) | lo
}

#[test]
fn tick_conversion_is_consistent() {
    assert_eq!(ns_to_ticks(1_000_000_000), PIT_HZ);
    for t in [0u64, 1, 2, 1193, 65536, 1_193_182, 10_000_000_007] {
        let ns = ticks_to_ns(t);
        assert_eq!(ns_to_ticks(ns), t);
        assert!(ns == 0 || ns_to_ticks(ns - 1) < t);
    }
}

#[test]
fn mode2_rate_generator_periodic_irq0() {
    let mut pit = Pit::new();
    let t0 = at(5000);
    // Linux periodic: channel 0, lobyte/hibyte, mode 2, LATCH = 1193 (1 kHz).
    load(&mut pit, 0, 0x34, 1193, t0);
    assert_eq!(pit.next_event_ns(), Some(at(5000 + 1193)));
    assert_eq!(pit.irq0_edges(at(5000 + 1192)), 0);
    assert_eq!(pit.irq0_edges(at(5000 + 1193)), 1);
    assert_eq!(pit.next_event_ns(), Some(at(5000 + 2 * 1193)));
    // Eleven more periods at once: all edges are reported, not lost.
    assert_eq!(pit.irq0_edges(at(5000 + 12 * 1193)), 11);
    assert_eq!(pit.irq0_edges(at(5000 + 12 * 1193)), 0);
    // The count runs N..1 and reloads.
    assert_eq!(latch_read(&mut pit, 0, at(5000)), 1193);
    assert_eq!(latch_read(&mut pit, 0, at(5000 + 100)), 1093);
    assert_eq!(latch_read(&mut pit, 0, at(5000 + 1192)), 1);
    assert_eq!(latch_read(&mut pit, 0, at(5000 + 1193)), 1193);
    // OUT is low for exactly the clock at count 1.
    assert!(pit.out(0, at(5000 + 1191)));
    assert!(!pit.out(0, at(5000 + 1192)));
    assert!(pit.out(0, at(5000 + 1193)));
}

#[test]
fn mode0_interrupt_on_terminal_count() {
    let mut pit = Pit::new();
    pit.write_port(PIT_MODE, 0x30, 0);
    // OUT goes low on the control word and stays low until terminal count.
    assert!(!pit.out(0, 0));
    pit.write_port(PIT_CHANNEL0, 100, 0);
    assert!(!pit.out(0, at(1000)));
    // Counting only starts when the full count is written.
    pit.write_port(PIT_CHANNEL0, 0, at(1000));
    assert_eq!(pit.next_event_ns(), Some(at(1100)));
    assert_eq!(latch_read(&mut pit, 0, at(1040)), 60);
    assert!(!pit.out(0, at(1099)));
    assert!(pit.out(0, at(1100)));
    assert_eq!(pit.irq0_edges(at(1100)), 1);
    // One shot: no further edges, the count wraps and keeps going.
    assert_eq!(pit.next_event_ns(), None);
    assert_eq!(pit.irq0_edges(at(200_000)), 0);
    assert_eq!(latch_read(&mut pit, 0, at(1101)), 0xffff);
    assert!(pit.out(0, at(200_000)));
}

#[test]
fn mode3_square_wave() {
    let mut pit = Pit::new();
    load(&mut pit, 0, 0x36, 100, 0);
    // High for the first half, low for the second.
    assert!(pit.out(0, at(0)));
    assert!(pit.out(0, at(49)));
    assert!(!pit.out(0, at(50)));
    assert!(!pit.out(0, at(99)));
    assert!(pit.out(0, at(100)));
    // The count decrements by two in each half.
    assert_eq!(latch_read(&mut pit, 0, at(10)), 80);
    assert_eq!(latch_read(&mut pit, 0, at(60)), 80);
    // One rising edge per period.
    assert_eq!(pit.irq0_edges(at(99)), 0);
    assert_eq!(pit.irq0_edges(at(100)), 1);
    assert_eq!(pit.irq0_edges(at(450)), 3);
    assert_eq!(pit.next_event_ns(), Some(at(500)));
}

#[test]
fn mode4_software_strobe() {
    let mut pit = Pit::new();
    // Linux one-shot clockevent: 0x38 = channel 0, lobyte/hibyte, mode 4.
    load(&mut pit, 0, 0x38, 50, at(10));
    assert!(pit.out(0, at(59)));
    assert!(!pit.out(0, at(60)));
    assert!(pit.out(0, at(61)));
    assert_eq!(pit.next_event_ns(), Some(at(61)));
    assert_eq!(pit.irq0_edges(at(60)), 0);
    assert_eq!(pit.irq0_edges(at(61)), 1);
    assert_eq!(pit.next_event_ns(), None);
    assert_eq!(pit.irq0_edges(at(100_000)), 0);
    // Re-arming with a new count fires again.
    load(&mut pit, 0, 0x38, 50, at(100_000));
    assert_eq!(pit.irq0_edges(at(100_051)), 1);
}

#[test]
fn count_of_zero_means_65536() {
    let mut pit = Pit::new();
    load(&mut pit, 0, 0x34, 0, 0);
    assert_eq!(pit.next_event_ns(), Some(at(65536)));
    assert_eq!(latch_read(&mut pit, 0, at(1)), 65535);
    assert_eq!(latch_read(&mut pit, 0, at(0)), 0);
}

#[test]
fn latch_freezes_the_value_until_read() {
    let mut pit = Pit::new();
    load(&mut pit, 0, 0x34, 1000, 0);
    pit.write_port(PIT_MODE, 0x00, at(100));
    // A second latch before reading is ignored.
    pit.write_port(PIT_MODE, 0x00, at(200));
    assert_eq!(pit.read_port(PIT_CHANNEL0, at(500)), (900 & 0xff) as u8);
    assert_eq!(pit.read_port(PIT_CHANNEL0, at(600)), (900 >> 8) as u8);
    // After the latched value is consumed, reads are live again.
    assert_eq!(pit.read_port(PIT_CHANNEL0, at(700)), (300 & 0xff) as u8);
    assert_eq!(pit.read_port(PIT_CHANNEL0, at(700)), (300 >> 8) as u8);
}

#[test]
fn lobyte_and_hibyte_only_access() {
    let mut pit = Pit::new();
    // Channel 1, LSB only, mode 2.
    pit.write_port(PIT_MODE, 0x54, 0);
    pit.write_port(PIT_CHANNEL1, 200, 0);
    assert_eq!(pit.read_port(PIT_CHANNEL1, at(50)), 150);
    assert_eq!(pit.read_port(PIT_CHANNEL1, at(60)), 140);
    // Channel 1, MSB only: count 0x0200.
    pit.write_port(PIT_MODE, 0x64, at(100));
    pit.write_port(PIT_CHANNEL1, 0x02, at(100));
    assert_eq!(pit.read_port(PIT_CHANNEL1, at(100 + 0x100)), 0x01);
}

#[test]
fn read_back_command_latches_status_and_count() {
    let mut pit = Pit::new();
    load(&mut pit, 0, 0x34, 1000, 0);
    // Read-back: latch count and status of channel 0.
    pit.write_port(PIT_MODE, 0xc2, at(250));
    let status = pit.read_port(PIT_CHANNEL0, at(900));
    // OUT high, count loaded, lobyte/hibyte, mode 2, binary.
    assert_eq!(status, 0x80 | 0x30 | (2 << 1));
    assert_eq!(pit.read_port(PIT_CHANNEL0, at(900)), (750 & 0xff) as u8);
    assert_eq!(pit.read_port(PIT_CHANNEL0, at(900)), (750 >> 8) as u8);
    // Status only, for channel 2 which was never programmed (mode 0, OUT low).
    pit.write_port(PIT_MODE, 0xe8, at(900));
    let s2 = pit.read_port(PIT_CHANNEL2, at(900));
    assert_eq!(s2 & 0x0e, 0);
    assert_eq!(s2 & 0x80, 0);
}

#[test]
fn linux_pit_calibration_polls_out2_through_port_61() {
    let mut pit = Pit::new();
    // Gate high, speaker off.
    let v = pit.read_port(PORT_B, 0);
    pit.write_port(PORT_B, (v & !0x02) | 0x01, 0);
    assert_eq!(pit.read_port(PORT_B, 0) & 0x03, 0x01);
    // Channel 2, lobyte/hibyte, mode 0; 50 ms worth of ticks.
    let latch = (PIT_HZ / 20) as u16;
    let t0 = at(1000);
    load(&mut pit, 2, 0xb0, latch, t0);
    assert_eq!(pit.read_port(PORT_B, t0) & 0x20, 0);
    assert_eq!(pit.read_port(PORT_B, at(1000 + latch as u64 - 1)) & 0x20, 0);
    assert_eq!(pit.read_port(PORT_B, at(1000 + latch as u64)) & 0x20, 0x20);
    // Channel 2 does not drive IRQ0.
    assert_eq!(pit.irq0_edges(at(1_000_000)), 0);
}

#[test]
fn quick_pit_calibration_reads_a_falling_msb() {
    let mut pit = Pit::new();
    pit.write_port(PORT_B, 0x01, 0);
    load(&mut pit, 2, 0xb0, 0xffff, 0);
    // Linux reads LSB then MSB (lobyte/hibyte, unlatched) and watches the
    // MSB step down once every 256 ticks.
    let mut last = 0x100u16;
    for k in 0..20u64 {
        let now = at(k * 256 + 10);
        let _lsb = pit.read_port(PIT_CHANNEL2, now);
        let msb = pit.read_port(PIT_CHANNEL2, now) as u16;
        assert!(msb < last, "msb {msb} after {last}");
        last = msb;
    }
}

#[test]
fn gate_low_suspends_mode0_counting() {
    let mut pit = Pit::new();
    // Gate 2 is low at power-on: the count is loaded but does not run.
    load(&mut pit, 2, 0xb0, 100, 0);
    assert_eq!(latch_read(&mut pit, 2, at(500)), 100);
    pit.write_port(PORT_B, 0x01, at(500));
    assert_eq!(latch_read(&mut pit, 2, at(540)), 60);
    pit.write_port(PORT_B, 0x00, at(540));
    assert_eq!(latch_read(&mut pit, 2, at(900)), 60);
    assert!(!pit.out(2, at(10_000)));
    pit.write_port(PORT_B, 0x01, at(1000));
    assert!(!pit.out(2, at(1059)));
    assert!(pit.out(2, at(1060)));
}

#[test]
fn gate_rising_edge_restarts_mode2() {
    let mut pit = Pit::new();
    pit.write_port(PORT_B, 0x01, 0);
    load(&mut pit, 2, 0xb4, 100, 0);
    assert_eq!(latch_read(&mut pit, 2, at(30)), 70);
    pit.write_port(PORT_B, 0x00, at(30));
    // Gate low forces OUT high and holds the count.
    assert!(pit.out(2, at(99)));
    pit.write_port(PORT_B, 0x01, at(200));
    assert_eq!(latch_read(&mut pit, 2, at(210)), 90);
}

#[test]
fn mode1_hardware_one_shot_needs_a_gate_trigger() {
    let mut pit = Pit::new();
    load(&mut pit, 2, 0xb2, 40, 0);
    assert!(pit.out(2, at(100)));
    pit.write_port(PORT_B, 0x01, at(100));
    assert!(!pit.out(2, at(100)));
    assert!(!pit.out(2, at(139)));
    assert!(pit.out(2, at(140)));
}

#[test]
fn bcd_counting() {
    let mut pit = Pit::new();
    // Channel 0, lobyte/hibyte, mode 2, BCD: count 0x1000 = 1000 decimal.
    load(&mut pit, 0, 0x35, 0x1000, 0);
    assert_eq!(pit.next_event_ns(), Some(at(1000)));
    assert_eq!(latch_read(&mut pit, 0, at(1)), 0x0999);
}

#[test]
fn port_61_refresh_bit_toggles_with_time() {
    let mut pit = Pit::new();
    let a = pit.read_port(PORT_B, 0) & 0x10;
    let b = pit.read_port(PORT_B, 15_085) & 0x10;
    assert_ne!(a, b);
    // The control word register is write-only.
    assert_eq!(pit.read_port(PIT_MODE, 0), 0xff);
}

#[test]
fn serde_round_trip() {
    let mut pit = Pit::new();
    load(&mut pit, 0, 0x34, 1193, 0);
    pit.irq0_edges(at(2000));
    let back: Pit = serde_json::from_str(&serde_json::to_string(&pit).unwrap()).unwrap();
    assert_eq!(back.next_event_ns(), pit.next_event_ns());
}
