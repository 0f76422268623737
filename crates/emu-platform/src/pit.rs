//! Intel 8254 programmable interval timer (ports 0x40-0x43) and the
//! system control port B at 0x61 (channel 2 gate, speaker enable, OUT2
//! status).
//!
//! The counters run at 1.193182 MHz of guest time. Nothing is stored per
//! tick: a counter remembers the tick at which its count was loaded and
//! computes its value and OUT level from the explicit `now_ns`, so reads are
//! exact and deterministic. Channel 0 drives IRQ0: the platform asks
//! [`Pit::next_event_ns`] when the next rising edge of OUT0 is due and
//! [`Pit::irq0_edges`] how many edges happened up to now.
//!
//! What Linux uses: channel 0 in mode 2 (periodic tick) and mode 4 (one-shot
//! clockevent), counter latch reads (i8253 clocksource), channel 2 in mode 0
//! gated through port 0x61 with OUT2 polled through bit 5 (PIT TSC
//! calibration), and MSB reads of a free-running mode 0 count (quick PIT
//! calibration).

use serde::{Deserialize, Serialize};

use crate::{mul_div_ceil, mul_div_floor, NS_PER_SEC};

/// The 8254's input clock.
pub const PIT_HZ: u64 = 1_193_182;

pub const PIT_CHANNEL0: u16 = 0x40;
pub const PIT_CHANNEL1: u16 = 0x41;
pub const PIT_CHANNEL2: u16 = 0x42;
pub const PIT_MODE: u16 = 0x43;
/// System control port B (NMI status and control).
pub const PORT_B: u16 = 0x61;

/// DRAM refresh request toggles every 15.085 us on PC/AT compatibles; some
/// delay loops poll port 0x61 bit 4 for it.
const REFRESH_TOGGLE_NS: u64 = 15_085;

/// Converts guest time to 8254 input ticks.
pub fn ns_to_ticks(ns: u64) -> u64 {
    mul_div_floor(ns, PIT_HZ, NS_PER_SEC)
}

/// Guest time at which input tick `tick` has occurred (the inverse of
/// [`ns_to_ticks`], rounded up so that `ns_to_ticks(ticks_to_ns(t)) >= t`).
pub fn ticks_to_ns(tick: u64) -> u64 {
    mul_div_ceil(tick, NS_PER_SEC, PIT_HZ)
}

/// Read/write access mode selected by the control word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Access {
    Lsb,
    Msb,
    LsbMsb,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Channel {
    /// Counter mode 0-5 (6 and 7 are aliases of 2 and 3).
    mode: u8,
    access: Access,
    bcd: bool,
    /// Count register as written (0 means the maximum count).
    reload: u16,
    /// A full count has been written since the last control word.
    loaded: bool,
    /// Tick at which counting (re)started; shifted forward across gate-low
    /// pauses in modes 0 and 4.
    start_tick: u64,
    gate: bool,
    /// Tick at which the gate went low (counting suspended), if it is low.
    gate_low_since: Option<u64>,
    /// Modes 1 and 5: a gate trigger started the count.
    triggered: bool,
    /// LSB written, MSB expected next (access LsbMsb).
    write_msb_next: bool,
    write_lsb: u8,
    /// Next live read returns the MSB (access LsbMsb).
    read_msb_next: bool,
    latched_count: Option<u16>,
    latched_msb_next: bool,
    latched_status: Option<u8>,
    /// Elapsed count (relative to start_tick) up to which OUT edges have
    /// been reported.
    edges_seen_until: u64,
}

impl Channel {
    fn new(gate: bool) -> Self {
        Channel {
            gate_low_since: if gate { None } else { Some(0) },
            mode: 0,
            access: Access::LsbMsb,
            bcd: false,
            reload: 0,
            loaded: false,
            start_tick: 0,
            gate,
            triggered: false,
            write_msb_next: false,
            write_lsb: 0,
            read_msb_next: false,
            latched_count: None,
            latched_msb_next: false,
            latched_status: None,
            edges_seen_until: 0,
        }
    }

    /// The initial count N as a number of input clocks.
    fn period(&self) -> u64 {
        if self.bcd {
            let r = self.reload;
            let v = (r >> 12 & 0xf) as u64 * 1000
                + (r >> 8 & 0xf) as u64 * 100
                + (r >> 4 & 0xf) as u64 * 10
                + (r & 0xf) as u64;
            if v == 0 {
                10_000
            } else {
                v
            }
        } else if self.reload == 0 {
            0x1_0000
        } else {
            self.reload as u64
        }
    }

    fn modulus(&self) -> u64 {
        if self.bcd {
            10_000
        } else {
            0x1_0000
        }
    }

    fn is_running(&self) -> bool {
        self.loaded && (!matches!(self.mode, 1 | 5) || self.triggered)
    }

    /// Input clocks counted since the count was loaded or triggered, or
    /// `None` if the counter is not counting at all.
    fn elapsed(&self, now_tick: u64) -> Option<u64> {
        if !self.is_running() {
            return None;
        }
        let end = match self.gate_low_since {
            // In modes 0, 2, 3 and 4 a low gate suspends counting.
            Some(t) if !matches!(self.mode, 1 | 5) => t,
            _ => now_tick,
        };
        Some(end.saturating_sub(self.start_tick))
    }

    /// Counting element value at `now_tick`, in binary.
    fn count(&self, now_tick: u64) -> u64 {
        let Some(e) = self.elapsed(now_tick) else {
            // Before a count is loaded (or triggered) the register holds the
            // value last written.
            return self.period() % self.modulus();
        };
        let n = self.period();
        let m = self.modulus();
        match self.mode {
            2 => (n - e % n) % m,
            3 => {
                // Square wave: the counter decrements by two and reloads at
                // each half period.
                let half_high = n.div_ceil(2);
                let p = e % n;
                let q = if p < half_high { p } else { p - half_high };
                (n & !1)
                    .saturating_sub(2 * q)
                    .max(if n & !1 == 0 { 0 } else { 2 })
                    % m
            }
            // 0, 1, 4, 5: count down once, then wrap and keep counting.
            _ => (n + m - e % m) % m,
        }
    }

    /// OUT level at `now_tick`.
    fn out(&self, now_tick: u64) -> bool {
        let e = match self.elapsed(now_tick) {
            Some(e) => e,
            // Mode 0 drives OUT low from the control word until terminal
            // count; the other modes idle high.
            None => return self.mode != 0,
        };
        let n = self.period();
        let gate_low = self.gate_low_since.is_some();
        match self.mode {
            0 | 1 => e >= n,
            2 => gate_low || e % n != n - 1,
            3 => gate_low || e % n < n.div_ceil(2),
            // 4, 5: a one-clock low strobe at terminal count.
            _ => e != n,
        }
    }

    /// Rising edges of OUT in the elapsed range (a, b].
    fn rising_edges(&self, a: u64, b: u64) -> u64 {
        if b <= a {
            return 0;
        }
        let n = self.period();
        match self.mode {
            0 | 1 => u64::from(a < n && n <= b),
            2 | 3 => b / n - a / n,
            _ => u64::from(a <= n && n < b),
        }
    }

    /// Elapsed count of the first rising edge after `a`.
    fn next_rising_edge(&self, a: u64) -> Option<u64> {
        let n = self.period();
        match self.mode {
            0 | 1 => (a < n).then_some(n),
            2 | 3 => Some((a / n + 1) * n),
            _ => (a < n + 1).then_some(n + 1),
        }
    }

    fn status(&self, now_tick: u64) -> u8 {
        let rw = match self.access {
            Access::Lsb => 1,
            Access::Msb => 2,
            Access::LsbMsb => 3,
        };
        let mut s = (rw << 4) | (self.mode << 1) | self.bcd as u8;
        if self.out(now_tick) {
            s |= 0x80;
        }
        // Null count: a count was written but not yet loaded. Loading is
        // immediate here except in the gate-triggered modes.
        if !self.is_running() && self.loaded {
            s |= 0x40;
        }
        s
    }

    fn count_for_read(&self, now_tick: u64) -> u16 {
        let c = self.count(now_tick);
        if self.bcd {
            let c = c % 10_000;
            ((c / 1000) << 12 | (c / 100 % 10) << 8 | (c / 10 % 10) << 4 | (c % 10)) as u16
        } else {
            c as u16
        }
    }

    fn latch_count(&mut self, now_tick: u64) {
        // A second latch before the first is read is ignored.
        if self.latched_count.is_none() {
            self.latched_count = Some(self.count_for_read(now_tick));
            self.latched_msb_next = false;
        }
    }

    fn control(&mut self, val: u8, now_tick: u64) {
        let rw = (val >> 4) & 3;
        if rw == 0 {
            self.latch_count(now_tick);
            return;
        }
        self.access = match rw {
            1 => Access::Lsb,
            2 => Access::Msb,
            _ => Access::LsbMsb,
        };
        let mode = (val >> 1) & 7;
        self.mode = if mode >= 6 { mode - 4 } else { mode };
        self.bcd = val & 1 != 0;
        self.loaded = false;
        self.triggered = false;
        self.write_msb_next = false;
        self.read_msb_next = false;
        self.latched_count = None;
        self.latched_status = None;
        self.edges_seen_until = 0;
    }

    fn load(&mut self, value: u16, now_tick: u64) {
        self.reload = value;
        self.loaded = true;
        self.start_tick = now_tick;
        self.edges_seen_until = 0;
        if self.gate_low_since.is_some() {
            self.gate_low_since = Some(now_tick);
        }
    }

    fn write(&mut self, val: u8, now_tick: u64) {
        match self.access {
            Access::Lsb => self.load(val as u16, now_tick),
            Access::Msb => self.load((val as u16) << 8, now_tick),
            Access::LsbMsb => {
                if self.write_msb_next {
                    self.write_msb_next = false;
                    self.load(((val as u16) << 8) | self.write_lsb as u16, now_tick);
                } else {
                    self.write_lsb = val;
                    self.write_msb_next = true;
                    // Mode 0: writing the first byte stops the count.
                    if self.mode == 0 {
                        self.loaded = false;
                    }
                }
            }
        }
    }

    fn read(&mut self, now_tick: u64) -> u8 {
        if let Some(s) = self.latched_status.take() {
            return s;
        }
        if let Some(c) = self.latched_count {
            let (byte, done) = match self.access {
                Access::Lsb => (c as u8, true),
                Access::Msb => ((c >> 8) as u8, true),
                Access::LsbMsb => {
                    if self.latched_msb_next {
                        ((c >> 8) as u8, true)
                    } else {
                        self.latched_msb_next = true;
                        (c as u8, false)
                    }
                }
            };
            if done {
                self.latched_count = None;
                self.latched_msb_next = false;
            }
            return byte;
        }
        let c = self.count_for_read(now_tick);
        match self.access {
            Access::Lsb => c as u8,
            Access::Msb => (c >> 8) as u8,
            Access::LsbMsb => {
                let msb = self.read_msb_next;
                self.read_msb_next = !msb;
                if msb {
                    (c >> 8) as u8
                } else {
                    c as u8
                }
            }
        }
    }

    fn set_gate(&mut self, gate: bool, now_tick: u64) {
        if gate == self.gate {
            return;
        }
        self.gate = gate;
        if !gate {
            self.gate_low_since = Some(now_tick);
            return;
        }
        let paused_since = self.gate_low_since.take();
        match self.mode {
            // Resume where it stopped.
            0 | 4 => {
                if let Some(t) = paused_since {
                    self.start_tick = self.start_tick.saturating_add(now_tick.saturating_sub(t));
                }
            }
            // A rising gate (re)starts the count.
            _ => {
                if self.loaded {
                    self.start_tick = now_tick;
                    self.edges_seen_until = 0;
                    self.triggered = true;
                }
            }
        }
    }
}

/// The 8254 with its three channels and port 0x61.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pit {
    channels: [Channel; 3],
    /// Port 0x61 bits 0-3 as written (gate 2, speaker data, parity and
    /// channel check disables).
    port_b: u8,
}

impl Default for Pit {
    fn default() -> Self {
        Self::new()
    }
}

impl Pit {
    /// The channels in the form another accelerator keeps them; counts
    /// restart from their initial value when loaded back.
    pub fn export(&self) -> crate::PitRegs {
        let ch = |c: &Channel| {
            let rw = match c.access {
                Access::Lsb => 1,
                Access::Msb => 2,
                Access::LsbMsb => 3,
            };
            let word_state = |msb_next: bool| {
                if rw != 3 {
                    rw
                } else if msb_next {
                    4
                } else {
                    3
                }
            };
            crate::PitChannelRegs {
                count: if c.reload == 0 {
                    0x1_0000
                } else {
                    c.reload as u32
                },
                latched_count: c.latched_count.unwrap_or(0),
                count_latched: if c.latched_count.is_some() {
                    word_state(c.latched_msb_next)
                } else {
                    0
                },
                status_latched: c.latched_status.is_some(),
                status: c.latched_status.unwrap_or(0),
                read_state: word_state(c.read_msb_next),
                write_state: word_state(c.write_msb_next),
                write_latch: c.write_lsb,
                rw_mode: rw,
                mode: if c.loaded { c.mode } else { 0xff },
                bcd: c.bcd,
                gate: c.gate,
            }
        };
        crate::PitRegs {
            channels: [
                ch(&self.channels[0]),
                ch(&self.channels[1]),
                ch(&self.channels[2]),
            ],
            port_b: self.port_b,
        }
    }

    /// Load [`Pit::export`]'s form at guest time `now_ns`: programmed
    /// channels count from their initial value from now.
    pub fn import(&mut self, r: &crate::PitRegs, now_ns: u64) {
        let t = ns_to_ticks(now_ns);
        for (c, r) in self.channels.iter_mut().zip(&r.channels) {
            let loaded = r.mode <= 7;
            *c = Channel {
                mode: if loaded { r.mode } else { 0 },
                access: match r.rw_mode {
                    1 => Access::Lsb,
                    2 => Access::Msb,
                    _ => Access::LsbMsb,
                },
                bcd: r.bcd,
                reload: r.count as u16,
                loaded,
                start_tick: t,
                gate: r.gate,
                gate_low_since: if r.gate { None } else { Some(t) },
                triggered: loaded,
                write_msb_next: r.write_state == 4,
                write_lsb: r.write_latch,
                read_msb_next: r.read_state == 4,
                latched_count: (r.count_latched != 0).then_some(r.latched_count),
                latched_msb_next: r.count_latched == 4,
                latched_status: r.status_latched.then_some(r.status),
                edges_seen_until: 0,
            };
        }
        self.port_b = (r.port_b & 0x0e) | r.channels[2].gate as u8;
    }

    /// Power-on state: channel 0 and 1 gates tied high, channel 2 gate low.
    pub fn new() -> Self {
        Pit {
            channels: [Channel::new(true), Channel::new(true), Channel::new(false)],
            port_b: 0,
        }
    }

    /// Whether `port` belongs to the PIT or port B.
    pub fn handles_port(port: u16) -> bool {
        matches!(port, PIT_CHANNEL0..=PIT_MODE | PORT_B)
    }

    /// Byte read from a PIT port at guest time `now_ns`.
    pub fn read_port(&mut self, port: u16, now_ns: u64) -> u8 {
        let t = ns_to_ticks(now_ns);
        match port {
            PIT_CHANNEL0..=PIT_CHANNEL2 => self.channels[(port - PIT_CHANNEL0) as usize].read(t),
            // The control word register is write-only.
            PIT_MODE => 0xff,
            PORT_B => {
                let refresh = (now_ns / REFRESH_TOGGLE_NS) & 1 == 1;
                let mut v = self.port_b & 0x0f;
                if refresh {
                    v |= 0x10;
                }
                if self.channels[2].out(t) {
                    v |= 0x20;
                }
                v
            }
            _ => 0xff,
        }
    }

    /// Byte write to a PIT port at guest time `now_ns`.
    pub fn write_port(&mut self, port: u16, val: u8, now_ns: u64) {
        let t = ns_to_ticks(now_ns);
        match port {
            PIT_CHANNEL0..=PIT_CHANNEL2 => {
                self.channels[(port - PIT_CHANNEL0) as usize].write(val, t)
            }
            PIT_MODE => {
                let sc = (val >> 6) as usize;
                if sc == 3 {
                    // Read-back command: bit 5 clear latches counts, bit 4
                    // clear latches status, bits 1-3 select the channels.
                    for (i, ch) in self.channels.iter_mut().enumerate() {
                        if val & (2 << i) == 0 {
                            continue;
                        }
                        if val & 0x10 == 0 && ch.latched_status.is_none() {
                            ch.latched_status = Some(ch.status(t));
                        }
                        if val & 0x20 == 0 {
                            ch.latch_count(t);
                        }
                    }
                } else {
                    self.channels[sc].control(val, t);
                }
            }
            PORT_B => {
                self.port_b = val & 0x0f;
                self.channels[2].set_gate(val & 1 != 0, t);
            }
            _ => {}
        }
    }

    /// OUT level of `channel` (0-2) at `now_ns`; false for other indices.
    pub fn out(&self, channel: usize, now_ns: u64) -> bool {
        self.channels
            .get(channel)
            .is_some_and(|c| c.out(ns_to_ticks(now_ns)))
    }

    /// Number of rising edges of OUT0 (IRQ0) since the previous call, up to
    /// `now_ns`. The platform pulses IRQ0 when this is non-zero.
    pub fn irq0_edges(&mut self, now_ns: u64) -> u32 {
        let ch = &mut self.channels[0];
        let Some(e) = ch.elapsed(ns_to_ticks(now_ns)) else {
            return 0;
        };
        let edges = ch.rising_edges(ch.edges_seen_until, e);
        ch.edges_seen_until = ch.edges_seen_until.max(e);
        u32::try_from(edges).unwrap_or(u32::MAX)
    }

    /// Guest time of the next rising edge of OUT0 not yet reported by
    /// [`Pit::irq0_edges`], if one is scheduled.
    pub fn next_event_ns(&self) -> Option<u64> {
        let ch = &self.channels[0];
        if !ch.is_running() || (ch.gate_low_since.is_some() && !matches!(ch.mode, 1 | 5)) {
            return None;
        }
        let e = ch.next_rising_edge(ch.edges_seen_until)?;
        Some(ticks_to_ns(ch.start_tick.saturating_add(e)))
    }
}
