//! The fixed ACPI hardware a FADT points at, and the PCI-style reset port.
//!
//! Register block at [`PM_BASE`] (the FADT must describe the same layout):
//!
//! | offset | register | width |
//! | --- | --- | --- |
//! | +0 | PM1a_STS (write 1 to clear) | 16 |
//! | +2 | PM1a_EN | 16 |
//! | +4 | PM1a_CNT | 16 |
//! | +8 | PM_TMR (24-bit, 3.579545 MHz) | 32 |
//!
//! Sleep type 5 with SLP_EN is S5 (soft off): the DSDT's `\_S5` package
//! must say 5 as well.

use std::sync::Arc;
use std::time::Instant;

use hypervisor::IrqLine;
use serde::{Deserialize, Serialize};

use crate::{BusDevice, EventSink, Persist, PersistError, VmEvent};

/// Where the PM registers live in port space, and how many ports they take.
pub const PM_BASE: u16 = 0x600;
pub const PM_LEN: u64 = 12;
/// Offsets inside the block, for the FADT.
pub const PM1A_EVT_OFFSET: u64 = 0;
pub const PM1A_CNT_OFFSET: u64 = 4;
pub const PM_TMR_OFFSET: u64 = 8;
/// The reset register the FADT's RESET_REG can point at (value 0x06).
pub const RESET_PORT: u16 = 0xcf9;
/// The sleep type that means S5.
pub const SLP_TYP_S5: u16 = 5;
/// ACPI's PM timer frequency.
pub const PM_TIMER_HZ: u64 = 3_579_545;

const STS_TMR: u16 = 1 << 0;
const STS_PWRBTN: u16 = 1 << 8;
const STS_WAK: u16 = 1 << 15;
const EN_PWRBTN: u16 = 1 << 8;
const CNT_SCI_EN: u16 = 1 << 0;
const CNT_SLP_TYP_SHIFT: u16 = 10;
const CNT_SLP_TYP_MASK: u16 = 0x7 << CNT_SLP_TYP_SHIFT;
const CNT_SLP_EN: u16 = 1 << 13;
const TMR_MASK: u32 = 0x00ff_ffff;

/// PM1 registers and the timer position, as saved in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcpiPmState {
    pub pm1_status: u16,
    pub pm1_enable: u16,
    pub pm1_control: u16,
    /// The PM timer's value when the state was taken (24 bits).
    pub timer: u32,
}

/// PM1a event/control blocks and the PM timer.
pub struct AcpiPm {
    status: u16,
    enable: u16,
    /// SLP_TYP and the other read/write bits. SCI_EN always reads 1: the
    /// machine is always in ACPI mode, so the guest never needs an SMI_CMD
    /// handshake to switch it (the FADT leaves SMI_CMD at 0).
    control: u16,
    /// The timer counts from `timer_start`, beginning at `timer_base`.
    timer_start: Instant,
    timer_base: u32,
    /// Timer bit 23 when PM1_STS was last looked at, to set TMR_STS on a carry.
    timer_msb_seen: u64,
    events: EventSink,
    sci: Option<Arc<dyn IrqLine>>,
}

impl AcpiPm {
    /// `sci` is the SCI interrupt line, used only by [`AcpiPm::press_power_button`].
    pub fn new(events: EventSink, sci: Option<Arc<dyn IrqLine>>) -> Self {
        AcpiPm {
            status: 0,
            enable: 0,
            control: CNT_SCI_EN,
            timer_start: Instant::now(),
            timer_base: 0,
            timer_msb_seen: 0,
            events,
            sci,
        }
    }

    /// Ticks since the timer started counting (not masked).
    fn ticks(&self) -> u64 {
        let ns = self.timer_start.elapsed().as_nanos();
        let ticks = ns * PM_TIMER_HZ as u128 / 1_000_000_000;
        (ticks as u64).wrapping_add(self.timer_base as u64)
    }

    /// The 24-bit PM timer value now.
    pub fn timer(&self) -> u32 {
        (self.ticks() as u32) & TMR_MASK
    }

    /// PM1_STS with TMR_STS brought up to date: it is set whenever bit 23
    /// of the timer has toggled since the guest last looked.
    fn status_now(&mut self) -> u16 {
        let msb = self.ticks() >> 23;
        if msb != self.timer_msb_seen {
            self.timer_msb_seen = msb;
            self.status |= STS_TMR;
        }
        self.status
    }

    /// Signal a power-button press (a graceful shutdown request): the guest's
    /// ACPI button driver sees PWRBTN_STS through an SCI.
    pub fn press_power_button(&mut self) {
        self.status |= STS_PWRBTN;
        if self.enable & EN_PWRBTN != 0 {
            if let Some(sci) = &self.sci {
                if let Err(e) = sci.trigger() {
                    tracing::warn!("acpi: cannot raise SCI: {e}");
                }
            }
        }
    }

    fn write_control(&mut self, value: u16) {
        // SLP_EN is write-only: act on it, never store it.
        self.control = (value & !CNT_SLP_EN) | CNT_SCI_EN;
        if value & CNT_SLP_EN == 0 {
            return;
        }
        let slp_typ = (value & CNT_SLP_TYP_MASK) >> CNT_SLP_TYP_SHIFT;
        if slp_typ == SLP_TYP_S5 {
            tracing::info!("acpi: guest entered S5, powering off");
            (self.events)(VmEvent::PowerOff);
        } else {
            // Sleep states other than S5 are not offered; wake at once so
            // that a guest polling WAK_STS after SLP_EN never spins forever.
            tracing::debug!("acpi: sleep type {slp_typ} requested; waking at once");
            self.status |= STS_WAK;
        }
    }

    /// Register bytes as the guest sees them, offsets 0..12.
    fn register_bytes(&mut self) -> [u8; PM_LEN as usize] {
        let mut regs = [0u8; PM_LEN as usize];
        regs[0..2].copy_from_slice(&self.status_now().to_le_bytes());
        regs[2..4].copy_from_slice(&self.enable.to_le_bytes());
        regs[4..6].copy_from_slice(&(self.control | CNT_SCI_EN).to_le_bytes());
        regs[8..12].copy_from_slice(&self.timer().to_le_bytes());
        regs
    }
}

impl Persist for AcpiPm {
    type State = AcpiPmState;

    fn save(&self) -> Result<AcpiPmState, PersistError> {
        Ok(AcpiPmState {
            pm1_status: self.status,
            pm1_enable: self.enable,
            pm1_control: self.control,
            timer: self.timer(),
        })
    }

    /// Load a saved state; the timer resumes counting from the saved value.
    /// Every value is acceptable: bits the guest cannot set (SLP_EN, timer
    /// bits above 23) are dropped, SCI_EN forced on, as a guest write would.
    fn restore(&mut self, state: &AcpiPmState) -> Result<(), PersistError> {
        self.status = state.pm1_status;
        self.enable = state.pm1_enable;
        self.control = (state.pm1_control & !CNT_SLP_EN) | CNT_SCI_EN;
        self.timer_start = Instant::now();
        self.timer_base = state.timer & TMR_MASK;
        self.timer_msb_seen = (self.timer_base >> 23) as u64;
        Ok(())
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let regs = self.register_bytes();
        for (i, byte) in data.iter_mut().enumerate() {
            let at = offset.saturating_add(i as u64);
            *byte = match usize::try_from(at).ok().and_then(|at| regs.get(at)) {
                Some(&b) => b,
                None => {
                    tracing::debug!("acpi: read of undecoded offset {at:#x}");
                    0xff
                }
            };
        }
    }

    /// Writes are merged byte by byte into the registers they cover, then
    /// each touched register acts once, so both 16-bit writes and byte
    /// writes to either half behave.
    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut clear_status = 0u16;
        let mut enable = self.enable;
        let mut control = self.control;
        let mut control_written = false;
        for (i, &byte) in data.iter().enumerate() {
            let at = offset.saturating_add(i as u64);
            let shift = 8 * (at % 2) as u16;
            match at {
                0 | 1 => clear_status |= (byte as u16) << shift,
                2 | 3 => enable = (enable & !(0xff << shift)) | ((byte as u16) << shift),
                4 | 5 => {
                    control = (control & !(0xff << shift)) | ((byte as u16) << shift);
                    control_written = true;
                }
                _ => tracing::debug!("acpi: write {byte:#x} to read-only/undecoded offset {at:#x}"),
            }
        }
        // Bring TMR_STS up to date first, so a clear applies to a carry that
        // happened before the write.
        self.status_now();
        self.status &= !clear_status;
        self.enable = enable;
        if control_written {
            self.write_control(control);
        }
    }
}

/// The reset control register at port 0xcf9: writing RST_CPU (bit 2) resets
/// the machine. SYS_RST/FULL_RST (bits 1 and 3) are kept so that the
/// read-modify-write Linux's `reboot=pci` does sees them.
pub struct ResetControl {
    value: u8,
    events: EventSink,
}

/// The reset register, as saved in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetControlState {
    pub value: u8,
}

const RST_CPU: u8 = 1 << 2;

impl ResetControl {
    pub fn new(events: EventSink) -> Self {
        ResetControl { value: 0, events }
    }
}

impl Persist for ResetControl {
    type State = ResetControlState;

    fn save(&self) -> Result<ResetControlState, PersistError> {
        Ok(ResetControlState { value: self.value })
    }

    /// RST_CPU is an action, not a stored bit: a saved one never resets
    /// the restored machine.
    fn restore(&mut self, state: &ResetControlState) -> Result<(), PersistError> {
        self.value = state.value & !RST_CPU;
        Ok(())
    }
}

impl BusDevice for ResetControl {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if offset == 0 {
            if let Some(b) = data.first_mut() {
                *b = self.value;
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        if offset != 0 || data.len() != 1 {
            tracing::debug!(
                "reset control: {}-byte write at offset {offset} (only byte 0 decoded)",
                data.len()
            );
        }
        if offset != 0 {
            return;
        }
        self.value = value & !RST_CPU;
        if value & RST_CPU != 0 {
            tracing::info!("reset control: guest asked for a reset");
            (self.events)(VmEvent::Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{recording_sink, CountingIrq, Recorded};
    use crate::Bus;
    use std::sync::Mutex;
    use std::time::Duration;

    const BASE: u64 = PM_BASE as u64;

    fn rig() -> (Bus, Arc<Mutex<AcpiPm>>, Recorded) {
        let (sink, events) = recording_sink();
        let pm = Arc::new(Mutex::new(AcpiPm::new(sink, None)));
        let bus = Bus::new();
        bus.insert(BASE, PM_LEN, pm.clone()).unwrap();
        (bus, pm, events)
    }

    fn inw(bus: &Bus, port: u64) -> u16 {
        let mut d = [0u8; 2];
        assert!(bus.read(port, &mut d));
        u16::from_le_bytes(d)
    }

    fn inl(bus: &Bus, port: u64) -> u32 {
        let mut d = [0u8; 4];
        assert!(bus.read(port, &mut d));
        u32::from_le_bytes(d)
    }

    fn outw(bus: &Bus, port: u64, v: u16) {
        assert!(bus.write(port, &v.to_le_bytes()));
    }

    #[test]
    fn s5_powers_off() {
        let (bus, _, events) = rig();
        // Linux writes SLP_TYP first, then SLP_TYP | SLP_EN.
        outw(&bus, BASE + 4, 5 << 10 | 1);
        assert!(events.lock().unwrap().is_empty());
        outw(&bus, BASE + 4, 5 << 10 | 1 << 13 | 1);
        assert_eq!(*events.lock().unwrap(), vec![VmEvent::PowerOff]);
    }

    #[test]
    fn s5_through_a_byte_write_of_the_high_half() {
        let (bus, _, events) = rig();
        assert!(bus.write(BASE + 5, &[((5 << 10 | 1 << 13) >> 8) as u8]));
        assert_eq!(*events.lock().unwrap(), vec![VmEvent::PowerOff]);
    }

    #[test]
    fn other_sleep_types_do_not_power_off_and_wake() {
        let (bus, _, events) = rig();
        for typ in [0u16, 1, 2, 3, 4, 6, 7] {
            outw(&bus, BASE + 4, typ << 10 | 1 << 13);
        }
        // SLP_TYP without SLP_EN does nothing either.
        outw(&bus, BASE + 4, 5 << 10);
        assert!(events.lock().unwrap().is_empty());
        assert_ne!(inw(&bus, BASE) & STS_WAK, 0, "woke at once");
        outw(&bus, BASE, STS_WAK);
        assert_eq!(inw(&bus, BASE) & STS_WAK, 0, "write 1 to clear");
    }

    #[test]
    fn sci_en_always_reads_one_and_slp_en_reads_zero() {
        let (bus, _, _) = rig();
        assert_eq!(inw(&bus, BASE + 4) & 1, 1);
        outw(&bus, BASE + 4, 0);
        assert_eq!(inw(&bus, BASE + 4), 1);
        outw(&bus, BASE + 4, 3 << 10 | 1 << 13);
        assert_eq!(inw(&bus, BASE + 4), 3 << 10 | 1);
    }

    #[test]
    fn enable_register_reads_back() {
        let (bus, _, _) = rig();
        outw(&bus, BASE + 2, 0x0120);
        assert_eq!(inw(&bus, BASE + 2), 0x0120);
        // A 32-bit read at +0 covers status and enable.
        assert_eq!(inl(&bus, BASE) >> 16, 0x0120);
    }

    #[test]
    fn pm_timer_advances_at_the_right_rate() {
        let (bus, _, _) = rig();
        let t0 = inl(&bus, BASE + 8);
        std::thread::sleep(Duration::from_millis(20));
        let t1 = inl(&bus, BASE + 8);
        let delta = t1.wrapping_sub(t0) & TMR_MASK;
        // 20 ms is 71591 ticks; allow for a slow test machine.
        assert!((70_000..3_600_000).contains(&delta), "delta {delta}");
        assert_eq!(t1 & !TMR_MASK, 0, "only 24 bits");
    }

    #[test]
    fn pm_timer_wraps_at_24_bits_and_sets_tmr_sts() {
        let (bus, pm, _) = rig();
        let mut state = pm.lock().unwrap().save().unwrap();
        state.timer = TMR_MASK - 1000; // 1000 ticks is ~0.28 ms before the wrap
        pm.lock().unwrap().restore(&state).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let t = inl(&bus, BASE + 8);
        assert!(t < 1_000_000, "wrapped to {t:#x}");
        assert_ne!(inw(&bus, BASE) & STS_TMR, 0, "carry out of bit 23");
        outw(&bus, BASE, STS_TMR);
        assert_eq!(inw(&bus, BASE) & STS_TMR, 0);
    }

    #[test]
    fn power_button_raises_sci_when_enabled() {
        let (sink, _) = recording_sink();
        let sci = Arc::new(CountingIrq::default());
        let mut pm = AcpiPm::new(sink, Some(sci.clone()));
        pm.press_power_button();
        assert_eq!(sci.count(), 0, "PWRBTN_EN clear");
        pm.write(2, &EN_PWRBTN.to_le_bytes());
        pm.press_power_button();
        assert_eq!(sci.count(), 1);
        let mut d = [0u8; 2];
        pm.read(0, &mut d);
        assert_ne!(u16::from_le_bytes(d) & STS_PWRBTN, 0);
    }

    #[test]
    fn odd_accesses_do_not_panic() {
        let (bus, pm, events) = rig();
        let mut d = [0u8; 8];
        assert!(bus.read(BASE + 10, &mut d));
        assert_eq!(&d[2..], &[0xff; 6]);
        assert!(bus.write(BASE + 6, &[0xff; 8]));
        pm.lock().unwrap().write(u64::MAX, &[0xff; 8]);
        pm.lock().unwrap().read(u64::MAX - 2, &mut d);
        assert!(events.lock().unwrap().is_empty());
    }

    #[test]
    fn state_round_trips_through_json() {
        let (bus, pm, _) = rig();
        outw(&bus, BASE + 2, 0x0100);
        outw(&bus, BASE + 4, 2 << 10);
        let state = pm.lock().unwrap().save().unwrap();
        let json = serde_json::to_string(&state).unwrap();
        let back: AcpiPmState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);
        let (bus2, pm2, _) = rig();
        pm2.lock().unwrap().restore(&back).unwrap();
        assert_eq!(inw(&bus2, BASE + 2), 0x0100);
        assert_eq!(inw(&bus2, BASE + 4), 2 << 10 | 1);
        let t = inl(&bus2, BASE + 8);
        assert!(
            t.wrapping_sub(state.timer) & TMR_MASK < PM_TIMER_HZ as u32,
            "timer resumed"
        );
    }

    #[test]
    fn reset_port() {
        let (sink, events) = recording_sink();
        let bus = Bus::new();
        let rc = Arc::new(Mutex::new(ResetControl::new(sink)));
        bus.insert(RESET_PORT as u64, 1, rc.clone()).unwrap();
        // Linux reboot=pci: read, set SYS_RST, then SYS_RST | RST_CPU.
        assert!(bus.write(RESET_PORT as u64, &[0x02]));
        assert!(events.lock().unwrap().is_empty());
        let mut d = [0u8];
        assert!(bus.read(RESET_PORT as u64, &mut d));
        assert_eq!(d[0], 0x02);
        assert!(bus.write(RESET_PORT as u64, &[0x06]));
        assert_eq!(*events.lock().unwrap(), vec![VmEvent::Reset]);
        let json = serde_json::to_string(&rc.lock().unwrap().save().unwrap()).unwrap();
        let back: ResetControlState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, ResetControlState { value: 0x02 });
        // A wide write still decodes byte 0.
        assert!(bus.write(RESET_PORT as u64, &[0x04, 0, 0, 0]));
        assert_eq!(events.lock().unwrap().len(), 2);
    }
}
