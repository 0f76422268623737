//! The i8042 PS/2 controller, as much of it as Linux's i8042 driver and
//! `reboot=k` need.
//!
//! Ports 0x60 (data) and 0x64 (status/command): insert the device at 0x60
//! with length [`I8042_LEN`] (offsets 0 and 4 are decoded).
//!
//! What is modelled:
//! - the controller: status register, the 32 bytes of controller RAM with
//!   the command byte (CTR) at 0 (commands 0x20-0x3f / 0x60-0x7f), self
//!   test (0xaa -> 0x55), keyboard interface test (0xab -> 0x00), port
//!   enable/disable (0xa7/0xa8/0xad/0xae), input/output port (0xc0, 0xd0,
//!   0xd1), writes into the output buffer (0xd2), and the reset line: 0xfe
//!   (or any pulse 0xf0-0xff with bit 0 clear, or 0xd1 with bit 0 clear)
//!   sends [`VmEvent::Reset`].
//! - no mouse: the AUX loopback (0xd3) answers from the keyboard side and
//!   the AUX interface test reports a stuck clock line, so Linux's AUX probe
//!   fails at once instead of waiting for timeouts.
//! - no keyboard: every byte sent to the keyboard is answered the way an
//!   AT controller answers for an absent keyboard, 0xfe with the timeout
//!   status bit, raised on IRQ 1. Linux's atkbd then gives up at once.
//!   Without a keyboard interrupt line the answer is still there to poll,
//!   but atkbd waits for its timeouts: pass `i8042.nokbd` in that case.
//!
//! Interrupts: IRQ 1 is an edge raised when a byte lands in the output
//! buffer while the CTR's keyboard interrupt bit is set (including when the
//! guest sets that bit with a byte already waiting), as QEMU does.

use std::collections::VecDeque;
use std::sync::Arc;

use hypervisor::IrqLine;
use serde::{Deserialize, Serialize};

use crate::{BusDevice, EventSink, Persist, PersistError, VmEvent};

/// The controller's bus range starting at port 0x60: 0x60 data, 0x64 command.
pub const I8042_BASE: u16 = 0x60;
pub const I8042_LEN: u64 = 5;
const DATA_OFFSET: u64 = 0;
const COMMAND_OFFSET: u64 = 4;

// Status register.
const STS_OBF: u8 = 1 << 0;
const STS_SYS: u8 = 1 << 2;
const STS_CMD: u8 = 1 << 3;
const STS_UNLOCKED: u8 = 1 << 4;
const STS_AUXDATA: u8 = 1 << 5;
const STS_TIMEOUT: u8 = 1 << 6;

// Controller command byte (CTR), RAM byte 0.
const CTR_KBDINT: u8 = 1 << 0;
const CTR_SYS: u8 = 1 << 2;
const CTR_KBDDIS: u8 = 1 << 4;
const CTR_AUXDIS: u8 = 1 << 5;
const CTR_XLATE: u8 = 1 << 6;
/// What a BIOS leaves behind: keyboard interrupt on, POST passed, scancode
/// translation on, AUX off (there is no mouse).
const CTR_DEFAULT: u8 = CTR_KBDINT | CTR_SYS | CTR_AUXDIS | CTR_XLATE;

// Output port: bit 0 is the CPU reset line (active low), bit 1 the A20 gate.
const OUTPORT_RESET_N: u8 = 1 << 0;
const OUTPORT_DEFAULT: u8 = 0x03;

/// Answer of an absent device, and the AUX interface test's "clock line
/// stuck high".
const KBD_ABSENT_REPLY: u8 = 0xfe;
const AUX_TEST_CLOCK_STUCK: u8 = 0x02;

/// Bytes the keyboard side may hold while the output buffer is full; more is
/// dropped (a real keyboard's buffer is 16 bytes).
const KBD_QUEUE_MAX: usize = 16;

const RAM_SIZE: usize = 32;

/// The byte in the output buffer and where it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputByte {
    pub value: u8,
    /// Reported with the AUXDATA status bit.
    pub aux: bool,
    /// Reported with the timeout status bit.
    pub timeout: bool,
    /// Came from the keyboard side (kept if a controller reply overwrites it).
    pub from_kbd: bool,
}

/// The whole controller, as saved in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    /// Controller RAM; byte 0 is the command byte (CTR).
    pub ram: [u8; RAM_SIZE],
    pub output_port: u8,
    /// The output buffer (port 0x60), if full.
    pub output: Option<OutputByte>,
    /// Keyboard-side bytes waiting for the output buffer to empty.
    pub kbd_queue: VecDeque<OutputByte>,
    /// A command that takes a data byte and has not had it yet.
    pub pending_command: Option<u8>,
    /// The last write went to the command port (status bit 3).
    pub last_was_command: bool,
}

impl Default for I8042State {
    fn default() -> Self {
        let mut ram = [0u8; RAM_SIZE];
        ram[0] = CTR_DEFAULT;
        I8042State {
            ram,
            output_port: OUTPORT_DEFAULT,
            output: None,
            kbd_queue: VecDeque::new(),
            pending_command: None,
            last_was_command: false,
        }
    }
}

pub struct I8042 {
    state: I8042State,
    events: EventSink,
    kbd_irq: Option<Arc<dyn IrqLine>>,
}

impl I8042 {
    /// `kbd_irq` is IRQ 1; see the module documentation for what happens
    /// without it.
    pub fn new(events: EventSink, kbd_irq: Option<Arc<dyn IrqLine>>) -> Self {
        I8042 {
            state: I8042State::default(),
            events,
            kbd_irq,
        }
    }

    /// Bytes from the keyboard (scancodes), e.g. for injecting key presses.
    /// Returns how many were accepted.
    pub fn queue_keyboard_bytes(&mut self, bytes: &[u8]) -> usize {
        let room = KBD_QUEUE_MAX.saturating_sub(self.state.kbd_queue.len());
        let n = room.min(bytes.len());
        for &value in &bytes[..n] {
            self.state.kbd_queue.push_back(OutputByte {
                value,
                aux: false,
                timeout: false,
                from_kbd: true,
            });
        }
        self.refill_output();
        n
    }

    fn ctr(&self) -> u8 {
        self.state.ram[0]
    }

    fn status(&self) -> u8 {
        let mut s = STS_UNLOCKED;
        if self.ctr() & CTR_SYS != 0 {
            s |= STS_SYS;
        }
        if self.state.last_was_command {
            s |= STS_CMD;
        }
        if let Some(out) = self.state.output {
            s |= STS_OBF;
            if out.aux {
                s |= STS_AUXDATA;
            }
            if out.timeout {
                s |= STS_TIMEOUT;
            }
        }
        s
    }

    fn raise_irq_if_enabled(&self) {
        let Some(out) = self.state.output else { return };
        // AUX bytes would go to IRQ 12; there is no mouse to send any.
        if out.aux || self.ctr() & CTR_KBDINT == 0 {
            return;
        }
        if let Some(irq) = &self.kbd_irq {
            if let Err(e) = irq.trigger() {
                tracing::warn!("i8042: cannot raise IRQ 1: {e}");
            }
        }
    }

    /// Put a byte in the output buffer and interrupt if enabled.
    fn set_output(&mut self, byte: OutputByte) {
        self.state.output = Some(byte);
        self.raise_irq_if_enabled();
    }

    /// A controller reply replaces whatever is in the output buffer: Linux
    /// reads replies right after each command, so a stale byte (say from a
    /// failed probe) must not be taken for the next reply. A keyboard byte
    /// that was waiting goes back to the front of the keyboard queue.
    fn reply(&mut self, value: u8) {
        if let Some(old) = self.state.output.take() {
            if old.from_kbd {
                self.state.kbd_queue.push_front(old);
                self.state.kbd_queue.truncate(KBD_QUEUE_MAX);
            }
        }
        self.set_output(OutputByte {
            value,
            aux: false,
            timeout: false,
            from_kbd: false,
        });
    }

    /// Move the next keyboard byte into an empty output buffer, unless the
    /// keyboard interface is disabled.
    fn refill_output(&mut self) {
        if self.state.output.is_some() || self.ctr() & CTR_KBDDIS != 0 {
            return;
        }
        if let Some(byte) = self.state.kbd_queue.pop_front() {
            self.set_output(byte);
        }
    }

    fn send_to_keyboard(&mut self, value: u8) {
        tracing::debug!("i8042: byte {value:#x} for the absent keyboard");
        if self.state.kbd_queue.len() >= KBD_QUEUE_MAX {
            return;
        }
        self.state.kbd_queue.push_back(OutputByte {
            value: KBD_ABSENT_REPLY,
            aux: false,
            timeout: true,
            from_kbd: true,
        });
        self.refill_output();
    }

    fn reset_machine(&self, why: &str) {
        tracing::info!("i8042: {why}: resetting the machine");
        (self.events)(VmEvent::Reset);
    }

    fn write_ctr(&mut self, value: u8) {
        let was_enabled = self.ctr() & CTR_KBDINT != 0;
        self.state.ram[0] = value;
        if !was_enabled && value & CTR_KBDINT != 0 {
            // An interrupt condition already pending becomes visible.
            self.raise_irq_if_enabled();
        }
        self.refill_output();
    }

    fn command(&mut self, cmd: u8) {
        // A new command cancels one still waiting for its data byte.
        self.state.pending_command = None;
        match cmd {
            0x20..=0x3f => self.reply(self.state.ram[(cmd & 0x1f) as usize]),
            0x60..=0x7f | 0xd1..=0xd4 => self.state.pending_command = Some(cmd),
            0xa7 => self.state.ram[0] |= CTR_AUXDIS,
            0xa8 => self.state.ram[0] &= !CTR_AUXDIS,
            0xa9 => self.reply(AUX_TEST_CLOCK_STUCK),
            0xaa => {
                // A self test leaves the controller with the keyboard
                // interface disabled on some chips; Linux restores the CTR
                // itself, so keep ours as it is and just pass.
                self.reply(0x55)
            }
            0xab => self.reply(0x00),
            0xad => self.state.ram[0] |= CTR_KBDDIS,
            0xae => {
                self.state.ram[0] &= !CTR_KBDDIS;
                self.refill_output();
            }
            // Input port: bit 7 set = keyboard not inhibited.
            0xc0 => self.reply(0x80),
            0xd0 => self.reply(self.state.output_port),
            // A20 gate on/off: the A20 line is always on.
            0xdd | 0xdf => {}
            0xe0 => self.reply(0x00),
            0xf0..=0xff => {
                if cmd & 1 == 0 {
                    self.reset_machine(&format!("command {cmd:#x} pulsed the reset line"));
                }
            }
            _ => tracing::debug!("i8042: unhandled controller command {cmd:#x}"),
        }
    }

    fn data(&mut self, value: u8) {
        match self.state.pending_command.take() {
            Some(cmd @ 0x60..=0x7f) => {
                let index = (cmd & 0x1f) as usize;
                if index == 0 {
                    self.write_ctr(value);
                } else {
                    self.state.ram[index] = value;
                }
            }
            Some(0xd1) => {
                self.state.output_port = value;
                if value & OUTPORT_RESET_N == 0 {
                    self.reset_machine("output port write cleared the reset line");
                }
            }
            // Write the keyboard output buffer: looks like it came from the keyboard.
            Some(0xd2) => {
                if let Some(old) = self.state.output.take() {
                    if old.from_kbd {
                        self.state.kbd_queue.push_front(old);
                        self.state.kbd_queue.truncate(KBD_QUEUE_MAX);
                    }
                }
                self.set_output(OutputByte {
                    value,
                    aux: false,
                    timeout: false,
                    from_kbd: false,
                });
            }
            // AUX loopback: with no AUX port, the byte comes back on the
            // keyboard side, which Linux reads as "no AUX port".
            Some(0xd3) => self.reply(value),
            Some(0xd4) => tracing::debug!("i8042: byte {value:#x} for the absent mouse dropped"),
            Some(other) => tracing::debug!("i8042: data {value:#x} for command {other:#x}"),
            None => self.send_to_keyboard(value),
        }
    }

    fn read_data(&mut self) -> u8 {
        match self.state.output.take() {
            Some(byte) => {
                self.refill_output();
                byte.value
            }
            // Reading an empty buffer returns the last value on real chips;
            // nothing relies on it.
            None => 0x00,
        }
    }
}

impl Persist for I8042 {
    type State = I8042State;

    fn save(&self) -> Result<I8042State, PersistError> {
        Ok(self.state.clone())
    }

    fn restore(&mut self, state: &I8042State) -> Result<(), PersistError> {
        if state.kbd_queue.len() > KBD_QUEUE_MAX {
            return Err(PersistError::Invalid {
                device: "i8042",
                reason: format!(
                    "{} bytes queued on the keyboard side, at most {KBD_QUEUE_MAX}",
                    state.kbd_queue.len()
                ),
            });
        }
        self.state = state.clone();
        // An edge lost in the snapshot would leave the guest waiting for it.
        if self.state.output.is_some() {
            self.raise_irq_if_enabled();
        }
        Ok(())
    }
}

impl BusDevice for I8042 {
    /// Only the first byte of an access is decoded: the controller's
    /// registers are 8 bits wide and 0x61 between them is not ours.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 {
            tracing::debug!("i8042: {}-byte read at offset {offset}", data.len());
        }
        data.fill(0xff);
        let Some(first) = data.first_mut() else {
            return;
        };
        *first = match offset {
            DATA_OFFSET => self.read_data(),
            COMMAND_OFFSET => self.status(),
            _ => {
                tracing::debug!("i8042: read of undecoded offset {offset:#x}");
                0xff
            }
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 {
            tracing::debug!("i8042: {}-byte write at offset {offset}", data.len());
        }
        let Some(&value) = data.first() else { return };
        match offset {
            DATA_OFFSET => {
                self.state.last_was_command = false;
                self.data(value);
            }
            COMMAND_OFFSET => {
                self.state.last_was_command = true;
                self.command(value);
            }
            _ => tracing::debug!("i8042: write {value:#x} to undecoded offset {offset:#x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{recording_sink, CountingIrq, Recorded};
    use crate::Bus;
    use std::sync::Mutex;

    const DATA: u64 = 0x60;
    const CMD: u64 = 0x64;

    struct Rig {
        bus: Bus,
        dev: Arc<Mutex<I8042>>,
        irq: Arc<CountingIrq>,
        events: Recorded,
    }

    fn rig() -> Rig {
        let (sink, events) = recording_sink();
        let irq = Arc::new(CountingIrq::default());
        let dev = Arc::new(Mutex::new(I8042::new(sink, Some(irq.clone()))));
        let bus = Bus::new();
        bus.insert(I8042_BASE as u64, I8042_LEN, dev.clone())
            .unwrap();
        Rig {
            bus,
            dev,
            irq,
            events,
        }
    }

    impl Rig {
        fn inb(&self, port: u64) -> u8 {
            let mut d = [0u8];
            assert!(self.bus.read(port, &mut d));
            d[0]
        }
        fn outb(&self, port: u64, v: u8) {
            assert!(self.bus.write(port, &[v]));
        }
        /// Linux's i8042_command: wait for IBF clear, write, poll OBF, read.
        fn command(&self, cmd: u8, param: Option<u8>) -> Option<u8> {
            assert_eq!(self.inb(CMD) & 0x02, 0, "IBF never set");
            self.outb(CMD, cmd);
            if let Some(p) = param {
                self.outb(DATA, p);
            }
            if self.inb(CMD) & STS_OBF != 0 {
                Some(self.inb(DATA))
            } else {
                None
            }
        }
    }

    #[test]
    fn reset_command_raises_reset() {
        let r = rig();
        // reboot=k: wait for IBF clear, then 0xfe to the command port.
        assert_eq!(r.inb(CMD) & 0x02, 0);
        r.outb(CMD, 0xfe);
        assert_eq!(*r.events.lock().unwrap(), vec![VmEvent::Reset]);
        // Other pulses without bit 0 clear do nothing.
        r.outb(CMD, 0xff);
        r.outb(CMD, 0xf1);
        assert_eq!(r.events.lock().unwrap().len(), 1);
        // Clearing bit 0 of the output port resets too.
        r.command(0xd1, Some(0xfe));
        assert_eq!(r.events.lock().unwrap().len(), 2);
        r.command(0xd1, Some(0xdf));
        assert_eq!(r.events.lock().unwrap().len(), 2);
    }

    #[test]
    fn controller_tests_answer() {
        let r = rig();
        assert_eq!(r.inb(CMD) & STS_OBF, 0, "flush finds nothing");
        assert_eq!(r.command(0xaa, None), Some(0x55));
        assert_eq!(r.command(0xab, None), Some(0x00));
        assert_eq!(r.inb(CMD) & STS_OBF, 0);
        assert_ne!(r.inb(CMD) & STS_UNLOCKED, 0, "no keylock");
    }

    #[test]
    fn command_byte_read_write() {
        let r = rig();
        assert_eq!(r.command(0x20, None), Some(CTR_DEFAULT));
        assert_eq!(r.command(0x20, None), Some(CTR_DEFAULT), "stable CTR reads");
        r.command(0x60, Some(0x30 | CTR_SYS));
        assert_eq!(r.command(0x20, None), Some(0x34));
        // Other RAM bytes.
        r.command(0x65, Some(0xab));
        assert_eq!(r.command(0x25, None), Some(0xab));
        // Port enable/disable commands update the CTR bits.
        r.command(0xae, None);
        r.command(0xa8, None);
        assert_eq!(r.command(0x20, None), Some(CTR_SYS));
        r.command(0xad, None);
        r.command(0xa7, None);
        assert_eq!(
            r.command(0x20, None),
            Some(CTR_SYS | CTR_KBDDIS | CTR_AUXDIS)
        );
    }

    #[test]
    fn aux_probe_fails_fast() {
        let r = rig();
        // Loopback answers at once but without AUXDATA...
        r.outb(CMD, 0xd3);
        r.outb(DATA, 0x5a);
        let st = r.inb(CMD);
        assert_ne!(st & STS_OBF, 0);
        assert_eq!(st & STS_AUXDATA, 0);
        // ...and the interface test that follows, with the loopback byte
        // left unread, gets its own answer: an error.
        assert_eq!(r.command(0xa9, None), Some(AUX_TEST_CLOCK_STUCK));
        assert_eq!(r.inb(CMD) & STS_OBF, 0);
    }

    #[test]
    fn absent_keyboard_answers_with_timeout_on_irq1() {
        let r = rig();
        // Linux enables the keyboard port: KBDINT on, KBDDIS off.
        r.command(0x60, Some(CTR_KBDINT | CTR_SYS | CTR_XLATE | CTR_AUXDIS));
        let before = r.irq.count();
        r.outb(DATA, 0xf2); // GET ID
        assert_eq!(r.irq.count(), before + 1);
        let st = r.inb(CMD);
        assert_ne!(st & STS_OBF, 0);
        assert_ne!(st & STS_TIMEOUT, 0);
        assert_eq!(r.inb(DATA), KBD_ABSENT_REPLY);
        assert_eq!(r.inb(CMD) & (STS_OBF | STS_TIMEOUT), 0);
    }

    #[test]
    fn no_interrupt_when_kbdint_is_off_until_enabled() {
        let r = rig();
        r.command(0x60, Some(CTR_SYS));
        r.outb(DATA, 0xff);
        assert_eq!(r.irq.count(), 0);
        r.outb(CMD, 0x60);
        r.outb(DATA, CTR_SYS | CTR_KBDINT);
        assert_eq!(r.irq.count(), 1, "enabling with a byte waiting interrupts");
    }

    #[test]
    fn keyboard_bytes_wait_while_disabled_and_survive_replies() {
        let r = rig();
        r.command(0xad, None);
        assert_eq!(r.dev.lock().unwrap().queue_keyboard_bytes(&[0x1c, 0x9c]), 2);
        assert_eq!(r.inb(CMD) & STS_OBF, 0, "held while the port is disabled");
        r.outb(CMD, 0xae);
        assert_eq!(r.inb(CMD) & STS_OBF, STS_OBF);
        // A controller reply takes the buffer; the key byte is not lost.
        assert_eq!(r.command(0x20, None), Some(CTR_DEFAULT));
        assert_eq!(r.inb(DATA), 0x1c);
        assert_eq!(r.inb(DATA), 0x9c);
        assert_eq!(r.inb(CMD) & STS_OBF, 0);
        let too_many = [0u8; 40];
        assert_eq!(
            r.dev.lock().unwrap().queue_keyboard_bytes(&too_many),
            KBD_QUEUE_MAX
        );
    }

    #[test]
    fn odd_accesses_do_not_panic() {
        let r = rig();
        let mut d = [0u8; 8];
        for offset in 0..I8042_LEN {
            assert!(r.bus.read(I8042_BASE as u64 + offset, &mut d));
            assert!(r
                .bus
                .write(I8042_BASE as u64 + offset, &[0x00, 0x01, 0x02, 0x03]));
        }
        r.dev.lock().unwrap().read(u64::MAX, &mut d);
        r.dev.lock().unwrap().write(u64::MAX, &d);
        r.dev.lock().unwrap().write(0, &[]);
        r.dev.lock().unwrap().read(4, &mut []);
        // Every controller command and data byte, in every order that a
        // simple sweep produces, is survivable.
        for cmd in 0..=0xffu8 {
            r.outb(CMD, cmd);
            r.outb(DATA, cmd.wrapping_mul(7) | 1);
            r.inb(DATA);
        }
    }

    #[test]
    fn state_round_trips_through_json() {
        let r = rig();
        r.command(0x60, Some(0x47));
        r.command(0x6a, Some(0x12));
        r.command(0xad, None);
        r.dev.lock().unwrap().queue_keyboard_bytes(&[1, 2, 3]);
        r.outb(CMD, 0xae);
        r.outb(CMD, 0xd1); // pending data byte
        let state = r.dev.lock().unwrap().save().unwrap();
        let json = serde_json::to_string(&state).unwrap();
        let back: I8042State = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);

        let r2 = rig();
        r2.dev.lock().unwrap().restore(&back).unwrap();
        assert_eq!(r2.dev.lock().unwrap().save().unwrap(), state);
        assert_eq!(r2.irq.count(), 1, "the waiting byte is signalled again");
        r2.outb(DATA, 0x03); // completes the 0xd1 without reset
        assert!(r2.events.lock().unwrap().is_empty());
        assert_eq!(r2.inb(DATA), 1);
        assert_eq!(r2.command(0x2a, None), Some(0x12));

        let mut bad = state;
        bad.kbd_queue = (0..100)
            .map(|v| OutputByte {
                value: v,
                aux: false,
                timeout: false,
                from_kbd: true,
            })
            .collect();
        assert!(r2.dev.lock().unwrap().restore(&bad).is_err());
    }
}
