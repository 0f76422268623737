//! The MC146818-style CMOS RTC at ports 0x70 (index) and 0x71 (data).
//!
//! Time and date follow the host's UTC clock; a guest that sets the clock
//! moves an offset from it, so the guest's time keeps ticking with the
//! host's. Values are BCD or binary and 12 or 24 hour as register B says
//! (default 0x02: BCD, 24 hour). The century is at 0x32 (the FADT's CENTURY
//! field must say so). Register A's UIP bit is set for the last 244 µs of
//! every second, as on real parts, so code that waits for it to clear never
//! waits long. Register D always reports valid RAM and time.
//!
//! Interrupts (IRQ 8): register C's flags -- PF (periodic, at register A's
//! rate), AF (the alarm registers 0x01/0x03/0x05 match, 0xc0-0xff in one
//! meaning "any"), UF (each second's update) -- are raised whatever
//! register B says, and reading C returns and clears them. When a flag
//! whose enable bit in B is on (PIE, AIE, UIE) is raised, IRQF is set and
//! one edge goes out on IRQ 8; no further edge until the guest has read C,
//! as on the chip, whose IRQ output stays asserted until then. The flags
//! are computed from the clock when they are looked at (a read of C, a
//! write of A or B, the timer), so nothing runs while no interrupt is
//! enabled; with one enabled, a helper thread ([`CmosRtc::connect_irq`])
//! sleeps until the next event and raises it. SeaBIOS waits with the
//! periodic interrupt (`int 15h, AH=86h`), Linux's rtc-cmos uses all three.
//! Periodic flags need the divider in its normal 32.768 kHz setting
//! (register A's DV bits 010), as on the chip.
//!
//! Day of week is derived from the date (a guest write to it alone is not
//! kept).

use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hypervisor::IrqLine;
use serde::{Deserialize, Serialize};

use crate::{BusDevice, Persist, PersistError};

pub const RTC_BASE: u16 = 0x70;
pub const RTC_LEN: u64 = 2;
/// CMOS index of the century byte (for the FADT's CENTURY field).
pub const CENTURY_INDEX: u8 = 0x32;

const CMOS_SIZE: usize = 128;

const REG_SECONDS: u8 = 0x00;
const REG_SECONDS_ALARM: u8 = 0x01;
const REG_MINUTES: u8 = 0x02;
const REG_MINUTES_ALARM: u8 = 0x03;
const REG_HOURS: u8 = 0x04;
const REG_HOURS_ALARM: u8 = 0x05;
const REG_DAY_OF_WEEK: u8 = 0x06;
const REG_DAY_OF_MONTH: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;

const TIME_REGS: [u8; 8] = [
    REG_SECONDS,
    REG_MINUTES,
    REG_HOURS,
    REG_DAY_OF_WEEK,
    REG_DAY_OF_MONTH,
    REG_MONTH,
    REG_YEAR,
    CENTURY_INDEX,
];

const A_UIP: u8 = 1 << 7;
/// The divider bits (DV2-0) and their normal setting (32.768 kHz base).
const A_DV_MASK: u8 = 0x70;
const A_DV_NORMAL: u8 = 0x20;
const A_RATE_MASK: u8 = 0x0f;
/// 32.768 kHz time base, 1024 Hz periodic rate: what a BIOS programs.
const A_DEFAULT: u8 = 0x26;
const B_SET: u8 = 1 << 7;
const B_PIE: u8 = 1 << 6;
const B_AIE: u8 = 1 << 5;
const B_UIE: u8 = 1 << 4;
const B_BINARY: u8 = 1 << 2;
const B_24H: u8 = 1 << 1;
const B_DEFAULT: u8 = B_24H;
const C_IRQF: u8 = 1 << 7;
const C_PF: u8 = 1 << 6;
const C_AF: u8 = 1 << 5;
const C_UF: u8 = 1 << 4;
/// The three event flags; each sits at the same bit as its enable in B.
const C_EVENTS: u8 = C_PF | C_AF | C_UF;
const D_VRT: u8 = 1 << 7;
const HOUR_PM: u8 = 1 << 7;

/// How long before each second's update UIP is raised (t_BUC on MC146818).
const UIP_WINDOW_NS: u32 = 244_000;

const SECS_PER_DAY: i64 = 86_400;
const NS_PER_SEC: i64 = 1_000_000_000;
/// The time base the divider counts: 32.768 kHz.
const BASE_HZ: i128 = 32_768;

/// The guest's RAM size, for the BIOS memory-size bytes some guests and
/// firmware read (QEMU's layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CmosMemory {
    /// Bytes of RAM below 4 GiB (including the first MiB).
    pub below_4g: u64,
    /// Bytes of RAM above 4 GiB.
    pub above_4g: u64,
}

/// CMOS contents and the guest's clock offset, as saved in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CmosState {
    pub index: u8,
    /// 128 bytes of CMOS. The time registers hold meaningful values only
    /// while the guest has the SET bit of register B on.
    pub ram: Vec<u8>,
    /// Guest time minus host UTC time, in seconds.
    pub offset_secs: i64,
    /// Guest second when register C's flags were last brought up to date.
    pub last_update_seen: i64,
    /// Register C as it stands (flags raised and not yet read; IRQF when
    /// the interrupt is asserted). Older snapshots have none.
    #[serde(default)]
    pub flags: u8,
    /// Guest time (ns since the epoch) the flags are up to date for;
    /// older snapshots only have `last_update_seen`.
    #[serde(default)]
    pub checked_ns: Option<i64>,
}

/// Where the RTC gets "now" from: time since the Unix epoch.
pub type Clock = Arc<dyn Fn() -> Duration + Send + Sync>;

fn host_utc() -> Duration {
    // A host clock before 1970 is broken; 1970 is as good an answer as any.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

pub struct CmosRtc {
    index: u8,
    ram: [u8; CMOS_SIZE],
    offset_secs: i64,
    /// Register C's event flags raised and not yet read.
    flags: u8,
    /// IRQF: an edge went out on IRQ 8 and C has not been read since.
    asserted: bool,
    /// Guest time (ns since the epoch) up to which events are in `flags`.
    checked_ns: i64,
    clock: Clock,
    irq: Option<Arc<dyn IrqLine>>,
    timer: Option<Arc<Timer>>,
}

/// What the RTC tells its timer thread: when to call it next.
#[derive(Default)]
struct Timer {
    state: Mutex<TimerState>,
    wake: Condvar,
}

#[derive(Default)]
struct TimerState {
    /// On the RTC's clock (time since the epoch); none: nothing to raise.
    deadline: Option<Duration>,
    stop: bool,
}

impl Timer {
    fn lock(&self) -> std::sync::MutexGuard<'_, TimerState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, deadline: Option<Duration>) {
        let mut s = self.lock();
        if s.deadline != deadline {
            s.deadline = deadline;
            self.wake.notify_one();
        }
    }

    fn stop(&self) {
        self.lock().stop = true;
        self.wake.notify_one();
    }
}

/// The timer thread: sleep until the deadline the RTC set, then let it
/// raise what is due. Ends when the RTC is dropped.
fn timer_loop(rtc: Weak<Mutex<CmosRtc>>, timer: Arc<Timer>, clock: Clock) {
    loop {
        {
            let mut s = timer.lock();
            loop {
                if s.stop {
                    return;
                }
                match s.deadline {
                    None => s = timer.wake.wait(s).unwrap_or_else(|e| e.into_inner()),
                    Some(d) => {
                        let now = clock();
                        if now >= d {
                            s.deadline = None;
                            break;
                        }
                        s = timer
                            .wake
                            .wait_timeout(s, d - now)
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                    }
                }
            }
        }
        let Some(rtc) = rtc.upgrade() else { return };
        rtc.lock().unwrap_or_else(|e| e.into_inner()).poll();
    }
}

impl Drop for CmosRtc {
    fn drop(&mut self) {
        if let Some(t) = &self.timer {
            t.stop();
        }
    }
}

impl CmosRtc {
    /// An RTC on the host's UTC clock; `mem` fills in the memory-size bytes.
    pub fn new(mem: Option<CmosMemory>) -> Self {
        Self::with_clock(mem, Arc::new(host_utc))
    }

    /// An RTC on another clock (tests, or a guest started at a fixed date).
    pub fn with_clock(mem: Option<CmosMemory>, clock: Clock) -> Self {
        let mut ram = [0u8; CMOS_SIZE];
        ram[REG_A as usize] = A_DEFAULT;
        ram[REG_B as usize] = B_DEFAULT;
        ram[REG_D as usize] = D_VRT;
        if let Some(mem) = mem {
            fill_memory_bytes(&mut ram, mem);
        }
        let mut rtc = CmosRtc {
            index: 0,
            ram,
            offset_secs: 0,
            flags: 0,
            asserted: false,
            checked_ns: 0,
            clock,
            irq: None,
            timer: None,
        };
        rtc.checked_ns = rtc.now_ns();
        rtc
    }

    /// Raise the RTC's interrupts on `irq` (IRQ 8), timed by a helper
    /// thread that ends when the device is dropped.
    pub fn connect_irq(dev: &Arc<Mutex<CmosRtc>>, irq: Arc<dyn IrqLine>) -> std::io::Result<()> {
        let timer = Arc::new(Timer::default());
        let clock = {
            let mut rtc = dev.lock().unwrap_or_else(|e| e.into_inner());
            rtc.irq = Some(irq);
            rtc.timer = Some(timer.clone());
            rtc.clock.clone()
        };
        let weak = Arc::downgrade(dev);
        let t = timer.clone();
        threads::spawn(threads::Role::Helper("rtc".into()), move || {
            timer_loop(weak, t, clock)
        })?;
        dev.lock().unwrap_or_else(|e| e.into_inner()).poll();
        Ok(())
    }

    /// Guest time now in nanoseconds since the epoch (saturating).
    fn now_ns(&self) -> i64 {
        let (secs, ns) = self.now();
        secs.saturating_mul(NS_PER_SEC).saturating_add(ns as i64)
    }

    /// The periodic rate of register A as a power of two of 32.768 kHz
    /// ticks; none when the rate is 0 or the divider is not running
    /// normally. Rates 1 and 2 are 256 and 128 Hz, as rates 8 and 9.
    fn periodic_shift(&self) -> Option<u32> {
        let a = self.ram[REG_A as usize];
        if a & A_DV_MASK != A_DV_NORMAL {
            return None;
        }
        match a & A_RATE_MASK {
            0 => None,
            r @ 1..=2 => Some(u32::from(r) + 6),
            r => Some(u32::from(r) - 1),
        }
    }

    /// Whether the alarm registers match the time at guest second `secs`.
    fn alarm_matches(&self, secs: i64) -> bool {
        let regs = render_time(secs, self.ram[REG_B as usize]);
        [
            (REG_SECONDS_ALARM, REG_SECONDS),
            (REG_MINUTES_ALARM, REG_MINUTES),
            (REG_HOURS_ALARM, REG_HOURS),
        ]
        .iter()
        .all(|&(alarm, reg)| {
            let want = self.ram[alarm as usize];
            want & 0xc0 == 0xc0 || want == regs[time_slot(reg)]
        })
    }

    /// Bring register C's flags up to the present.
    fn accumulate(&mut self) {
        let now = self.now_ns();
        let from = self.checked_ns;
        self.checked_ns = now;
        if now <= from {
            // The guest moved its clock back: nothing happened in between.
            return;
        }
        if let Some(shift) = self.periodic_shift() {
            if period_index(from, shift) != period_index(now, shift) {
                self.flags |= C_PF;
            }
        }
        if self.frozen() {
            return;
        }
        let (s0, s1) = (from.div_euclid(NS_PER_SEC), now.div_euclid(NS_PER_SEC));
        if s0 == s1 {
            return;
        }
        self.flags |= C_UF;
        // The alarm matches at most once a second and repeats daily at
        // most: the last day is enough to look at. Only worth it when the
        // guest wants the interrupt or polls often.
        if self.ram[REG_B as usize] & B_AIE != 0 || s1 - s0 <= 2 {
            let first = (s0 + 1).max(s1 - SECS_PER_DAY + 1);
            if (first..=s1).any(|s| self.alarm_matches(s)) {
                self.flags |= C_AF;
            }
        }
    }

    /// Bring the flags up to date, raise IRQ 8 when an enabled one is set
    /// and it is not raised yet, and tell the timer the next event.
    fn poll(&mut self) {
        self.accumulate();
        let enabled = self.flags & self.ram[REG_B as usize] & C_EVENTS;
        if enabled != 0 && !self.asserted {
            self.asserted = true;
            if let Some(irq) = &self.irq {
                if let Err(e) = irq.trigger() {
                    tracing::warn!("rtc: cannot raise IRQ 8: {e}");
                }
            }
        }
        self.rearm();
    }

    /// The guest time (ns) of the next event that would raise the
    /// interrupt; none while it is raised or nothing is enabled.
    fn next_event_ns(&self) -> Option<i64> {
        if self.asserted || self.irq.is_none() {
            return None;
        }
        let b = self.ram[REG_B as usize];
        let now = self.checked_ns;
        let mut next: Option<i64> = None;
        let mut consider = |t: i64| next = Some(next.map_or(t, |n| n.min(t)));
        if b & B_PIE != 0 {
            if let Some(shift) = self.periodic_shift() {
                consider(period_start(period_index(now, shift) + 1, shift));
            }
        }
        if !self.frozen() {
            let next_sec = now.div_euclid(NS_PER_SEC) + 1;
            if b & B_UIE != 0 {
                consider(next_sec.saturating_mul(NS_PER_SEC));
            }
            if b & B_AIE != 0 {
                if let Some(s) =
                    (next_sec..next_sec + SECS_PER_DAY).find(|&s| self.alarm_matches(s))
                {
                    consider(s.saturating_mul(NS_PER_SEC));
                }
            }
        }
        next
    }

    /// Tell the timer thread when to call [`CmosRtc::poll`] next.
    fn rearm(&self) {
        let Some(timer) = &self.timer else { return };
        let deadline = self.next_event_ns().map(|guest| {
            // On the host's clock: the guest's offset taken back out.
            let host = guest.saturating_sub(self.offset_secs.saturating_mul(NS_PER_SEC));
            Duration::from_nanos(host.max(0) as u64)
        });
        timer.set(deadline);
    }

    /// Guest time now: whole seconds since the epoch and the nanoseconds
    /// into the current second.
    fn now(&self) -> (i64, u32) {
        let host = (self.clock)();
        let secs = i64::try_from(host.as_secs()).unwrap_or(i64::MAX);
        (secs.saturating_add(self.offset_secs), host.subsec_nanos())
    }

    fn frozen(&self) -> bool {
        self.ram[REG_B as usize] & B_SET != 0
    }

    /// Make the guest's clock read `guest_secs` now.
    fn set_time(&mut self, guest_secs: i64) {
        let host = i64::try_from((self.clock)().as_secs()).unwrap_or(i64::MAX);
        self.offset_secs = guest_secs.saturating_sub(host);
        tracing::debug!("rtc: guest set the clock; offset now {}s", self.offset_secs);
    }

    fn read_register(&mut self, index: u8) -> u8 {
        let b = self.ram[REG_B as usize];
        match index {
            _ if TIME_REGS.contains(&index) && !self.frozen() => {
                render_time(self.now().0, b)[time_slot(index)]
            }
            REG_A => {
                let mut a = self.ram[REG_A as usize] & !A_UIP;
                if !self.frozen() && self.now().1 >= 1_000_000_000 - UIP_WINDOW_NS {
                    a |= A_UIP;
                }
                a
            }
            REG_C => {
                // Reading returns the flags and clears them, IRQF with them.
                self.accumulate();
                let mut c = self.flags;
                if self.asserted || c & b & C_EVENTS != 0 {
                    c |= C_IRQF;
                }
                self.flags = 0;
                self.asserted = false;
                self.rearm();
                c
            }
            REG_D => D_VRT,
            _ => self.ram[index as usize],
        }
    }

    fn write_register(&mut self, index: u8, value: u8) {
        let b = self.ram[REG_B as usize];
        match index {
            _ if TIME_REGS.contains(&index) => {
                if self.frozen() {
                    // Collected until SET is cleared.
                    self.ram[index as usize] = value;
                } else {
                    let mut regs = render_time(self.now().0, b);
                    regs[time_slot(index)] = value;
                    self.accumulate();
                    self.set_time(parse_time(&regs, b));
                    self.checked_ns = self.now_ns();
                    self.rearm();
                }
            }
            REG_A => {
                // Events up to now at the old rate, the next at the new.
                self.accumulate();
                self.ram[REG_A as usize] = value & !A_UIP;
                self.poll();
            }
            REG_B => {
                let mut value = value;
                if value & B_SET != 0 {
                    // Setting SET clears UIE (MC146818 datasheet).
                    value &= !B_UIE;
                    if b & B_SET == 0 {
                        // Freeze: the registers show the time at this moment
                        // until the guest is done writing.
                        let regs = render_time(self.now().0, value);
                        for (slot, &reg) in TIME_REGS.iter().enumerate() {
                            self.ram[reg as usize] = regs[slot];
                        }
                    }
                } else if b & B_SET != 0 {
                    // Unfreeze: what the guest wrote, in the format it wrote
                    // it in, becomes the time.
                    let mut regs = [0u8; TIME_REGS.len()];
                    for (slot, &reg) in TIME_REGS.iter().enumerate() {
                        regs[slot] = self.ram[reg as usize];
                    }
                    self.accumulate();
                    self.set_time(parse_time(&regs, b));
                    self.checked_ns = self.now_ns();
                }
                self.accumulate();
                self.ram[REG_B as usize] = value;
                // A flag already set raises the interrupt as soon as it is
                // enabled.
                self.poll();
            }
            REG_SECONDS_ALARM | REG_MINUTES_ALARM | REG_HOURS_ALARM => {
                self.accumulate();
                self.ram[index as usize] = value;
                self.rearm();
            }
            REG_C | REG_D => {
                tracing::debug!("rtc: write {value:#x} to read-only register {index:#x}")
            }
            _ => self.ram[index as usize] = value,
        }
    }
}

impl Persist for CmosRtc {
    type State = CmosState;

    fn save(&self) -> Result<CmosState, PersistError> {
        Ok(CmosState {
            index: self.index,
            ram: self.ram.to_vec(),
            offset_secs: self.offset_secs,
            last_update_seen: self.checked_ns.div_euclid(NS_PER_SEC),
            flags: self.flags | if self.asserted { C_IRQF } else { 0 },
            checked_ns: Some(self.checked_ns),
        })
    }

    fn restore(&mut self, state: &CmosState) -> Result<(), PersistError> {
        let ram: [u8; CMOS_SIZE] =
            state
                .ram
                .as_slice()
                .try_into()
                .map_err(|_| PersistError::Invalid {
                    device: "cmos rtc",
                    reason: format!("{} bytes of CMOS, expected {CMOS_SIZE}", state.ram.len()),
                })?;
        self.ram = ram;
        self.index = state.index & 0x7f;
        self.offset_secs = state.offset_secs;
        self.checked_ns = state
            .checked_ns
            .unwrap_or_else(|| state.last_update_seen.saturating_mul(NS_PER_SEC));
        self.flags = state.flags & C_EVENTS;
        self.asserted = state.flags & C_IRQF != 0;
        self.rearm();
        Ok(())
    }
}

impl BusDevice for CmosRtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 {
            tracing::debug!("rtc: {}-byte read at offset {offset}", data.len());
        }
        data.fill(0xff);
        let Some(first) = data.first_mut() else {
            return;
        };
        match offset {
            // The index port is write-only.
            0 => {}
            1 => *first = self.read_register(self.index),
            _ => tracing::debug!("rtc: read of undecoded offset {offset:#x}"),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 {
            tracing::debug!("rtc: {}-byte write at offset {offset}", data.len());
        }
        let Some(&value) = data.first() else { return };
        match offset {
            // Bit 7 of the index port is the NMI mask, not part of the index.
            0 => self.index = value & 0x7f,
            1 => self.write_register(self.index, value),
            _ => tracing::debug!("rtc: write {value:#x} to undecoded offset {offset:#x}"),
        }
    }
}

/// Which period of 2^`shift` ticks of the 32.768 kHz base the guest time
/// `ns` falls in.
fn period_index(ns: i64, shift: u32) -> i128 {
    (i128::from(ns) * BASE_HZ).div_euclid(i128::from(NS_PER_SEC)) >> shift
}

/// The guest time (ns, rounded up) period `index` starts at.
fn period_start(index: i128, shift: u32) -> i64 {
    let ticks = index << shift;
    let ns = (ticks * i128::from(NS_PER_SEC) + BASE_HZ - 1).div_euclid(BASE_HZ);
    i64::try_from(ns).unwrap_or(i64::MAX)
}

/// Position of a time register in [`TIME_REGS`]. Only called with indices
/// from that list.
fn time_slot(index: u8) -> usize {
    TIME_REGS.iter().position(|&r| r == index).unwrap_or(0)
}

fn to_bcd(v: u8) -> u8 {
    ((v / 10) << 4) | (v % 10)
}

/// Garbage BCD (digits above 9) decodes to a number anyway; callers clamp.
fn from_bcd(v: u8) -> u8 {
    (v >> 4) * 10 + (v & 0x0f)
}

/// The time registers (in [`TIME_REGS`] order) for `secs` since the epoch,
/// in the format register B asks for.
fn render_time(secs: i64, b: u8) -> [u8; TIME_REGS.len()] {
    let encode = |v: u8| if b & B_BINARY != 0 { v } else { to_bcd(v) };
    let days = secs.div_euclid(SECS_PER_DAY);
    let sod = secs.rem_euclid(SECS_PER_DAY);
    let (year, month, day) = civil_from_days(days);
    let hour = (sod / 3600) as u8;
    let hour_reg = if b & B_24H != 0 {
        encode(hour)
    } else {
        let h12 = match hour % 12 {
            0 => 12,
            h => h,
        };
        encode(h12) | if hour >= 12 { HOUR_PM } else { 0 }
    };
    // 1970-01-01 was a Thursday; the RTC counts Sunday as 1.
    let dow = (days + 4).rem_euclid(7) as u8 + 1;
    let year = year.clamp(0, 9999);
    [
        encode((sod % 60) as u8),
        encode((sod / 60 % 60) as u8),
        hour_reg,
        encode(dow),
        encode(day as u8),
        encode(month as u8),
        encode((year % 100) as u8),
        encode((year / 100) as u8),
    ]
}

/// Seconds since the epoch for time registers (in [`TIME_REGS`] order)
/// written by the guest in the format of register B. Out-of-range fields are
/// clamped, never trusted.
fn parse_time(regs: &[u8; TIME_REGS.len()], b: u8) -> i64 {
    let decode = |v: u8| i64::from(if b & B_BINARY != 0 { v } else { from_bcd(v) });
    let sec = decode(regs[0]).min(59);
    let min = decode(regs[1]).min(59);
    let hour = if b & B_24H != 0 {
        decode(regs[2]).min(23)
    } else {
        let pm = regs[2] & HOUR_PM != 0;
        (decode(regs[2] & !HOUR_PM) % 12) + if pm { 12 } else { 0 }
    };
    let day = decode(regs[4]).clamp(1, 31);
    let month = decode(regs[5]).clamp(1, 12);
    let year = decode(regs[7]).min(99) * 100 + decode(regs[6]).min(99);
    days_from_civil(year, month, day) * SECS_PER_DAY + hour * 3600 + min * 60 + sec
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// well-known algorithm, eras of 400 years starting in March).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12; // March = 0
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day counted from 1970-01-01: (year, month 1-12, day 1-31).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days.saturating_add(719_468);
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + if month <= 2 { 1 } else { 0 };
    (year, month, day)
}

/// The BIOS memory-size bytes as QEMU lays them out.
fn fill_memory_bytes(ram: &mut [u8; CMOS_SIZE], mem: CmosMemory) {
    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;
    let mut put16 = |at: usize, v: u64| {
        let v = v.min(0xffff) as u16;
        ram[at..at + 2].copy_from_slice(&v.to_le_bytes());
    };
    // Conventional memory: 640 KiB.
    put16(0x15, 640);
    // Extended memory above 1 MiB in KiB (two copies), capped at 64 MiB-ish.
    let ext_kib = mem.below_4g.saturating_sub(MIB) / KIB;
    put16(0x17, ext_kib);
    put16(0x30, ext_kib);
    // Memory above 16 MiB in 64 KiB units.
    put16(0x34, mem.below_4g.saturating_sub(16 * MIB) / (64 * KIB));
    // Memory above 4 GiB in 64 KiB units, 24 bits.
    let high = (mem.above_4g / (64 * KIB)).min(0xff_ffff);
    ram[0x5b..0x5e].copy_from_slice(&high.to_le_bytes()[..3]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::CountingIrq;
    use crate::Bus;
    use std::sync::atomic::{AtomicU64, Ordering};

    const INDEX: u64 = 0x70;
    const DATA: u64 = 0x71;

    fn on_bus(rtc: CmosRtc) -> (Bus, Arc<Mutex<CmosRtc>>) {
        let dev = Arc::new(Mutex::new(rtc));
        let bus = Bus::new();
        bus.insert(RTC_BASE as u64, RTC_LEN, dev.clone()).unwrap();
        (bus, dev)
    }

    fn cmos_read(bus: &Bus, index: u8) -> u8 {
        assert!(bus.write(INDEX, &[index]));
        let mut d = [0u8];
        assert!(bus.read(DATA, &mut d));
        d[0]
    }

    fn cmos_write(bus: &Bus, index: u8, v: u8) {
        assert!(bus.write(INDEX, &[index]));
        assert!(bus.write(DATA, &[v]));
    }

    /// A clock the test moves by hand, in nanoseconds since the epoch.
    fn manual_clock(start_ns: u64) -> (Clock, Arc<AtomicU64>) {
        let ns = Arc::new(AtomicU64::new(start_ns));
        let n = ns.clone();
        let clock: Clock = Arc::new(move || Duration::from_nanos(n.load(Ordering::SeqCst)));
        (clock, ns)
    }

    /// 2024-02-29 13:05:09 UTC, a Thursday.
    const LEAP_DAY: u64 = 1_709_211_909;

    /// Read the time like Linux's mc146818_get_time: wait for UIP clear,
    /// read, check the seconds did not move.
    fn guest_reads_time(bus: &Bus) -> [u8; 8] {
        for _ in 0..1_000_000 {
            if cmos_read(bus, REG_A) & A_UIP != 0 {
                continue;
            }
            let regs = TIME_REGS.map(|r| cmos_read(bus, r));
            if cmos_read(bus, REG_SECONDS) == regs[0] && cmos_read(bus, REG_A) & A_UIP == 0 {
                return regs;
            }
        }
        panic!("UIP stuck");
    }

    #[test]
    fn calendar_conversions_agree() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2024, 2, 29), 19_782);
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        for days in (-800_000..800_000).step_by(97) {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn bcd_time_on_a_fixed_clock() {
        let (clock, _) = manual_clock(LEAP_DAY * 1_000_000_000);
        let (bus, _) = on_bus(CmosRtc::with_clock(None, clock));
        assert_eq!(cmos_read(&bus, REG_B), 0x02, "BCD, 24 hour");
        let regs = guest_reads_time(&bus);
        assert_eq!(regs, [0x09, 0x05, 0x13, 0x05, 0x29, 0x02, 0x24, 0x20]);
    }

    #[test]
    fn binary_and_12_hour_modes() {
        let (clock, ns) = manual_clock(LEAP_DAY * 1_000_000_000);
        let (bus, _) = on_bus(CmosRtc::with_clock(None, clock));
        cmos_write(&bus, REG_B, B_BINARY | B_24H);
        assert_eq!(
            guest_reads_time(&bus),
            [9, 5, 13, 5, 29, 2, 24, 20],
            "binary"
        );
        cmos_write(&bus, REG_B, B_BINARY);
        assert_eq!(cmos_read(&bus, REG_HOURS), 1 | HOUR_PM, "1 PM binary");
        cmos_write(&bus, REG_B, 0);
        assert_eq!(cmos_read(&bus, REG_HOURS), 0x81, "1 PM BCD");
        // Midnight is 12 AM, noon is 12 PM.
        let midnight = (LEAP_DAY - 13 * 3600 - 5 * 60 - 9) * 1_000_000_000;
        ns.store(midnight, Ordering::SeqCst);
        assert_eq!(cmos_read(&bus, REG_HOURS), 0x12);
        ns.store(midnight + 12 * 3600 * 1_000_000_000, Ordering::SeqCst);
        assert_eq!(cmos_read(&bus, REG_HOURS), 0x92);
    }

    #[test]
    fn matches_the_host_clock() {
        let (bus, _) = on_bus(CmosRtc::new(None));
        let regs = guest_reads_time(&bus);
        let guest = parse_time(&regs, B_DEFAULT);
        let host = host_utc().as_secs() as i64;
        assert!((guest - host).abs() <= 2, "guest {guest} host {host}");
    }

    #[test]
    fn uip_is_set_only_just_before_the_second_ticks() {
        let (clock, ns) = manual_clock(LEAP_DAY * 1_000_000_000);
        let (bus, _) = on_bus(CmosRtc::with_clock(None, clock));
        assert_eq!(cmos_read(&bus, REG_A), A_DEFAULT);
        ns.store((LEAP_DAY + 1) * 1_000_000_000 - 100_000, Ordering::SeqCst);
        assert_eq!(cmos_read(&bus, REG_A), A_DEFAULT | A_UIP);
        ns.store((LEAP_DAY + 1) * 1_000_000_000, Ordering::SeqCst);
        assert_eq!(cmos_read(&bus, REG_A), A_DEFAULT);
        assert_eq!(cmos_read(&bus, REG_SECONDS), 0x10);
        // With SET on, the clock is stopped and never updating.
        ns.store((LEAP_DAY + 2) * 1_000_000_000 - 1, Ordering::SeqCst);
        cmos_write(&bus, REG_B, B_SET | B_24H);
        assert_eq!(cmos_read(&bus, REG_A) & A_UIP, 0);
        // The guest cannot set UIP itself.
        cmos_write(&bus, REG_A, 0xff);
        assert_eq!(cmos_read(&bus, REG_A), 0x7f);
    }

    #[test]
    fn uip_clears_quickly_on_the_host_clock() {
        let (bus, _) = on_bus(CmosRtc::new(None));
        let start = std::time::Instant::now();
        let mut clear = 0;
        while start.elapsed() < Duration::from_millis(1100) {
            if cmos_read(&bus, REG_A) & A_UIP == 0 {
                clear += 1;
            } else {
                // Set: it must be clear again well within a millisecond or so.
                let set_at = std::time::Instant::now();
                while cmos_read(&bus, REG_A) & A_UIP != 0 {
                    assert!(set_at.elapsed() < Duration::from_millis(50), "UIP stuck");
                }
            }
        }
        assert!(clear > 0);
    }

    #[test]
    fn guest_sets_the_time_linux_style() {
        let (clock, ns) = manual_clock(LEAP_DAY * 1_000_000_000);
        let (bus, dev) = on_bus(CmosRtc::with_clock(None, clock));
        // mc146818_set_time: SET on, write fields, SET off.
        cmos_write(&bus, REG_B, B_SET | B_24H);
        for (reg, v) in [
            (REG_YEAR, 0x99),
            (REG_MONTH, 0x12),
            (REG_DAY_OF_MONTH, 0x31),
            (REG_HOURS, 0x23),
            (REG_MINUTES, 0x59),
            (REG_SECONDS, 0x58),
            (CENTURY_INDEX, 0x19),
        ] {
            cmos_write(&bus, reg, v);
        }
        // Frozen while SET is on.
        ns.fetch_add(5_000_000_000, Ordering::SeqCst);
        assert_eq!(cmos_read(&bus, REG_SECONDS), 0x58);
        cmos_write(&bus, REG_B, B_24H);
        ns.fetch_add(3_000_000_000, Ordering::SeqCst);
        // 1999-12-31 23:59:58 + 3 s = 2000-01-01 00:00:01, a Saturday.
        assert_eq!(
            guest_reads_time(&bus),
            [0x01, 0x00, 0x00, 0x07, 0x01, 0x01, 0x00, 0x20]
        );
        // The offset survives a snapshot.
        let json = serde_json::to_string(&dev.lock().unwrap().save().unwrap()).unwrap();
        let state: CmosState = serde_json::from_str(&json).unwrap();
        let (clock2, _) = manual_clock(ns.load(Ordering::SeqCst));
        let (bus2, dev2) = on_bus(CmosRtc::with_clock(None, clock2));
        dev2.lock().unwrap().restore(&state).unwrap();
        assert_eq!(dev2.lock().unwrap().save().unwrap(), state);
        assert_eq!(guest_reads_time(&bus2)[6], 0x00);
        assert_eq!(cmos_read(&bus2, CENTURY_INDEX), 0x20);
    }

    #[test]
    fn single_field_write_while_running() {
        let (clock, _) = manual_clock(LEAP_DAY * 1_000_000_000);
        let (bus, _) = on_bus(CmosRtc::with_clock(None, clock));
        cmos_write(&bus, REG_MINUTES, 0x45);
        assert_eq!(
            guest_reads_time(&bus),
            [0x09, 0x45, 0x13, 0x05, 0x29, 0x02, 0x24, 0x20]
        );
    }

    #[test]
    fn index_masks_nmi_bit_and_registers_c_d() {
        let (clock, ns) = manual_clock(LEAP_DAY * 1_000_000_000);
        let (bus, _) = on_bus(CmosRtc::with_clock(None, clock));
        assert_eq!(cmos_read(&bus, 0x80 | REG_A), A_DEFAULT);
        assert_eq!(cmos_read(&bus, REG_D), D_VRT);
        cmos_write(&bus, REG_D, 0);
        assert_eq!(cmos_read(&bus, REG_D), D_VRT);
        cmos_read(&bus, REG_C);
        assert_eq!(cmos_read(&bus, REG_C), 0, "read clears");
        ns.fetch_add(1_000_000_000, Ordering::SeqCst);
        // A second's update, and periods of the default 1024 Hz rate.
        assert_eq!(cmos_read(&bus, REG_C), C_UF | C_PF);
        assert_eq!(cmos_read(&bus, REG_C), 0);
        // Plain CMOS RAM.
        cmos_write(&bus, 0x7f, 0xa5);
        assert_eq!(cmos_read(&bus, 0xff), 0xa5);
        let mut d = [0u8];
        assert!(bus.read(INDEX, &mut d));
        assert_eq!(d[0], 0xff, "index port is write-only");
    }

    #[test]
    fn memory_size_bytes() {
        const GIB: u64 = 1 << 30;
        let mem = CmosMemory {
            below_4g: 2 * GIB,
            above_4g: GIB,
        };
        let (bus, _) = on_bus(CmosRtc::new(Some(mem)));
        let word = |lo| cmos_read(&bus, lo) as u32 | (cmos_read(&bus, lo + 1) as u32) << 8;
        assert_eq!(word(0x15), 640);
        assert_eq!(word(0x30), 0xffff, "capped");
        assert_eq!(word(0x34), ((2 * GIB - (16 << 20)) >> 16) as u32);
        let high = cmos_read(&bus, 0x5b) as u32
            | (cmos_read(&bus, 0x5c) as u32) << 8
            | (cmos_read(&bus, 0x5d) as u32) << 16;
        assert_eq!(high, (GIB >> 16) as u32);

        let small = CmosMemory {
            below_4g: 32 << 20,
            above_4g: 0,
        };
        let (bus, _) = on_bus(CmosRtc::new(Some(small)));
        let word = |lo| cmos_read(&bus, lo) as u32 | (cmos_read(&bus, lo + 1) as u32) << 8;
        assert_eq!(word(0x30), 31 * 1024);
        assert_eq!(word(0x34), 256);
    }

    #[test]
    fn garbage_never_panics() {
        let (bus, dev) = on_bus(CmosRtc::new(None));
        for b in [0x00, 0x02, 0x04, 0x06, 0x80, 0x82, 0x86] {
            cmos_write(&bus, REG_B, b);
            for reg in TIME_REGS {
                cmos_write(&bus, reg, 0xff);
                cmos_write(&bus, reg, 0x00);
            }
            cmos_write(&bus, REG_B, b & !B_SET);
            guest_reads_time(&bus);
        }
        let mut d = [0u8; 8];
        assert!(bus.read(INDEX, &mut d));
        assert!(bus.write(DATA, &d));
        dev.lock().unwrap().read(u64::MAX, &mut d);
        dev.lock().unwrap().write(7, &d);
        dev.lock().unwrap().write(0, &[]);
        // A snapshot with an absurd offset still reads as some date.
        let mut state = dev.lock().unwrap().save().unwrap();
        state.offset_secs = i64::MAX;
        dev.lock().unwrap().restore(&state).unwrap();
        guest_reads_time(&bus);
        state.offset_secs = i64::MIN;
        dev.lock().unwrap().restore(&state).unwrap();
        guest_reads_time(&bus);
        state.ram.truncate(10);
        assert!(dev.lock().unwrap().restore(&state).is_err());
    }

    /// An RTC on a manual clock whose IRQ 8 edges are counted (the test
    /// calls `poll` where the timer thread would).
    fn with_irq() -> (Bus, Arc<Mutex<CmosRtc>>, Arc<AtomicU64>, Arc<CountingIrq>) {
        let (clock, ns) = manual_clock(LEAP_DAY * 1_000_000_000);
        let irq = Arc::new(CountingIrq::default());
        let mut rtc = CmosRtc::with_clock(None, clock);
        rtc.irq = Some(irq.clone());
        let (bus, dev) = on_bus(rtc);
        (bus, dev, ns, irq)
    }

    #[test]
    fn periodic_flag_at_register_a_rate_and_read_to_clear() {
        let (clock, ns) = manual_clock(LEAP_DAY * 1_000_000_000);
        let (bus, _) = on_bus(CmosRtc::with_clock(None, clock));
        // Rate 6: 1024 Hz, a period of 976.5625 us, periods aligned to the
        // second.
        assert_eq!(cmos_read(&bus, REG_C), 0);
        ns.fetch_add(500_000, Ordering::SeqCst);
        assert_eq!(cmos_read(&bus, REG_C), 0, "half a period");
        ns.fetch_add(500_000, Ordering::SeqCst);
        assert_eq!(cmos_read(&bus, REG_C), C_PF, "PF without PIE: no IRQF");
        assert_eq!(cmos_read(&bus, REG_C), 0, "read clears");
        // Rate 15: 2 Hz.
        cmos_write(&bus, REG_A, 0x2f);
        ns.fetch_add(400_000_000, Ordering::SeqCst);
        assert_eq!(cmos_read(&bus, REG_C), 0);
        ns.fetch_add(200_000_000, Ordering::SeqCst);
        assert_eq!(cmos_read(&bus, REG_C), C_PF);
        // Rate 0, or the divider held in reset: no periodic flag.
        cmos_write(&bus, REG_A, 0x20);
        ns.fetch_add(1_000_000, Ordering::SeqCst);
        assert_eq!(cmos_read(&bus, REG_C), 0);
        cmos_write(&bus, REG_A, 0x76);
        ns.fetch_add(1_000_000, Ordering::SeqCst);
        assert_eq!(cmos_read(&bus, REG_C), 0);
    }

    #[test]
    fn periodic_interrupt_one_edge_until_c_is_read() {
        let (bus, dev, ns, irq) = with_irq();
        let poll = || dev.lock().unwrap().poll();
        cmos_read(&bus, REG_C);
        cmos_write(&bus, REG_B, B_PIE | B_24H);
        assert_eq!(irq.count(), 0, "no period has passed yet");
        // The next event is the next period's start.
        let next = dev.lock().unwrap().next_event_ns().unwrap();
        let now = LEAP_DAY as i64 * NS_PER_SEC;
        assert_eq!(next, now + 976_563);
        ns.fetch_add(1_000_000, Ordering::SeqCst);
        poll();
        assert_eq!(irq.count(), 1);
        assert_eq!(
            dev.lock().unwrap().next_event_ns(),
            None,
            "held until C is read"
        );
        ns.fetch_add(10_000_000, Ordering::SeqCst);
        poll();
        assert_eq!(irq.count(), 1, "the line stays asserted: no new edge");
        assert_eq!(cmos_read(&bus, REG_C), C_IRQF | C_PF);
        poll();
        assert_eq!(irq.count(), 1);
        ns.fetch_add(1_000_000, Ordering::SeqCst);
        poll();
        assert_eq!(irq.count(), 2);
        // Turning PIE off with the flag pending still reports it, without
        // IRQF once no enabled flag is set and C was read.
        cmos_read(&bus, REG_C);
        cmos_write(&bus, REG_B, B_24H);
        ns.fetch_add(1_000_000, Ordering::SeqCst);
        poll();
        assert_eq!(irq.count(), 2);
        assert_eq!(cmos_read(&bus, REG_C), C_PF);
        // Enabling PIE with PF already set raises at once.
        ns.fetch_add(1_000_000, Ordering::SeqCst);
        cmos_write(&bus, REG_B, B_PIE | B_24H);
        assert_eq!(irq.count(), 3);
        // A snapshot carries the pending flags and the asserted line.
        let state = dev.lock().unwrap().save().unwrap();
        assert_eq!(state.flags, C_IRQF | C_PF);
        let (clock2, _) = manual_clock(ns.load(Ordering::SeqCst));
        let (bus2, dev2) = on_bus(CmosRtc::with_clock(None, clock2));
        dev2.lock().unwrap().restore(&state).unwrap();
        assert_eq!(cmos_read(&bus2, REG_C), C_IRQF | C_PF);
    }

    #[test]
    fn alarm_and_update_interrupts() {
        let (bus, dev, ns, irq) = with_irq();
        let poll = || dev.lock().unwrap().poll();
        // 13:05:09 now; the alarm at 13:05:11, any hour.
        cmos_write(&bus, REG_SECONDS_ALARM, 0x11);
        cmos_write(&bus, REG_MINUTES_ALARM, 0x05);
        cmos_write(&bus, REG_HOURS_ALARM, 0xff);
        cmos_read(&bus, REG_C);
        cmos_write(&bus, REG_B, B_AIE | B_24H);
        assert_eq!(
            dev.lock().unwrap().next_event_ns(),
            Some((LEAP_DAY as i64 + 2) * NS_PER_SEC)
        );
        ns.fetch_add(1_000_000_000, Ordering::SeqCst);
        poll();
        assert_eq!(irq.count(), 0);
        assert_eq!(
            cmos_read(&bus, REG_C),
            C_UF | C_PF,
            "UF, PF set, not enabled"
        );
        ns.fetch_add(1_000_000_000, Ordering::SeqCst);
        poll();
        assert_eq!(irq.count(), 1, "the alarm");
        assert_eq!(cmos_read(&bus, REG_C), C_IRQF | C_AF | C_UF | C_PF);
        // Any hour: the next match is an hour later, 14:05:11.
        assert_eq!(
            dev.lock().unwrap().next_event_ns(),
            Some((LEAP_DAY as i64 + 2 + 3600) * NS_PER_SEC)
        );
        // Update-ended interrupt: once a second.
        cmos_write(&bus, REG_B, B_UIE | B_24H);
        ns.fetch_add(1_500_000_000, Ordering::SeqCst);
        poll();
        assert_eq!(irq.count(), 2);
        assert_eq!(cmos_read(&bus, REG_C) & (C_IRQF | C_UF), C_IRQF | C_UF);
    }

    #[test]
    fn the_timer_thread_raises_periodic_interrupts_on_the_host_clock() {
        let irq = Arc::new(CountingIrq::default());
        let (bus, dev) = on_bus(CmosRtc::new(None));
        CmosRtc::connect_irq(&dev, irq.clone()).unwrap();
        cmos_read(&bus, REG_C);
        // 1024 Hz, as SeaBIOS programs it: a guest handler that reads C on
        // each interrupt sees 20 of them well within a second.
        cmos_write(&bus, REG_B, B_PIE | B_24H);
        let start = std::time::Instant::now();
        for n in 1..=20 {
            while irq.count() < n {
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "interrupt {n} did not come"
                );
                std::thread::sleep(Duration::from_micros(200));
            }
            assert_eq!(cmos_read(&bus, REG_C) & (C_IRQF | C_PF), C_IRQF | C_PF);
        }
        // Without reading C, no further edge.
        std::thread::sleep(Duration::from_millis(20));
        let held = irq.count();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(irq.count(), held);
        // The thread ends with the device.
        drop(bus);
        drop(dev);
    }
}
