//! A 16550A UART (the PC's COM ports) on top of vm-superio's `Serial`.
//!
//! vm-superio does the register model; this wrapper adds the bus plumbing
//! (any access width), an interrupt adapter over [`IrqLine`], and a serde
//! state for snapshots.

use std::convert::Infallible;
use std::io::{self, Write};
use std::sync::Arc;

use hypervisor::IrqLine;
use serde::{Deserialize, Serialize};
use vm_superio::serial::{Error as SerialError, NoEvents};
use vm_superio::Trigger;

use crate::{BusDevice, Persist, PersistError};

/// Number of registers a UART decodes (offsets 0-7).
const REGISTER_COUNT: u64 = 8;

/// Adapts an [`IrqLine`] to vm-superio's `Trigger`.
///
/// A failed injection is logged rather than returned: the UART cannot do
/// anything about it, and returning it would make vm-superio drop the byte
/// the guest just wrote.
#[derive(Clone)]
struct IrqTrigger(Arc<dyn IrqLine>);

impl Trigger for IrqTrigger {
    type E = Infallible;

    fn trigger(&self) -> Result<(), Infallible> {
        if let Err(e) = self.0.trigger() {
            tracing::warn!("serial: cannot raise interrupt: {e}");
        }
        Ok(())
    }
}

type Output = Box<dyn Write + Send>;
type Uart = vm_superio::Serial<IrqTrigger, NoEvents, Output>;

/// The UART registers and receive FIFO, as saved in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// Bytes received from the host and not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

impl From<vm_superio::SerialState> for SerialState {
    fn from(s: vm_superio::SerialState) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialState> for vm_superio::SerialState {
    fn from(s: &SerialState) -> Self {
        vm_superio::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// A 16550A UART whose transmitted bytes go to `out` and whose interrupt is
/// an edge on `irq`.
pub struct Serial {
    uart: Uart,
    trigger: IrqTrigger,
}

impl Serial {
    pub fn new(irq: Arc<dyn IrqLine>, out: Box<dyn Write + Send>) -> Self {
        let trigger = IrqTrigger(irq);
        Serial {
            uart: Uart::new(trigger.clone(), out),
            trigger,
        }
    }

    /// Queue bytes from the host for the guest to read. Returns how many
    /// were accepted: the receive FIFO holds 64 bytes, and the caller keeps
    /// the rest and retries once the guest has drained some.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(SerialError::FullFifo) => 0,
            Err(e) => {
                tracing::debug!("serial: input dropped: {e}");
                0
            }
        }
    }

    /// How many more bytes the receive FIFO can take right now.
    pub fn fifo_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }
}

impl Persist for Serial {
    type State = SerialState;

    fn save(&self) -> Result<SerialState, PersistError> {
        Ok(self.uart.state().into())
    }

    /// Load a saved state. The output stream and interrupt line stay those
    /// given to [`Serial::new`]; an interrupt pending in the saved state is
    /// raised again.
    fn restore(&mut self, state: &SerialState) -> Result<(), PersistError> {
        // The FIFO size is private to vm-superio: an empty FIFO's capacity is it.
        let fifo_size = self.uart.fifo_capacity() + self.uart.state().in_buffer.len();
        if state.in_buffer.len() > fifo_size {
            return Err(PersistError::Invalid {
                device: "serial",
                reason: format!(
                    "{} bytes in the receive FIFO, it holds {fifo_size}",
                    state.in_buffer.len()
                ),
            });
        }
        // vm-superio only restores by building a new UART, which needs the
        // output stream by value: swap a placeholder in while we do that.
        let placeholder: Output = Box::new(io::sink());
        let old = std::mem::replace(&mut self.uart, Uart::new(self.trigger.clone(), placeholder));
        let out = old.into_writer();
        match Uart::from_state(&state.into(), self.trigger.clone(), NoEvents, out) {
            Ok(uart) => {
                self.uart = uart;
                Ok(())
            }
            // Unreachable after the size check above (the trigger cannot
            // fail), but the stream would be lost with the error: say so.
            Err(e) => Err(PersistError::Invalid {
                device: "serial",
                reason: format!("{e}; console output is lost"),
            }),
        }
    }
}

impl BusDevice for Serial {
    /// Wider accesses are split into byte accesses to consecutive registers,
    /// as an ISA bus does with an 8-bit device.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let reg = offset.saturating_add(i as u64);
            *byte = if reg < REGISTER_COUNT {
                self.uart.read(reg as u8)
            } else {
                tracing::debug!("serial: read of undecoded offset {reg:#x}");
                0xff
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &byte) in data.iter().enumerate() {
            let reg = offset.saturating_add(i as u64);
            if reg >= REGISTER_COUNT {
                tracing::debug!("serial: write {byte:#x} to undecoded offset {reg:#x} ignored");
                continue;
            }
            if let Err(e) = self.uart.write(reg as u8, byte) {
                // The host side of the console went away or is full; the
                // guest must not stall on it (the THR stays empty).
                tracing::debug!("serial: output byte lost: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::CountingIrq;
    use crate::Bus;
    use std::sync::Mutex;

    const COM1: u64 = 0x3f8;
    const THR: u64 = 0;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LCR: u64 = 3;
    const MCR: u64 = 4;
    const LSR: u64 = 5;
    const SCR: u64 = 7;

    /// A cloneable output capturing what the guest transmits.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct Rig {
        bus: Bus,
        serial: Arc<Mutex<Serial>>,
        irq: Arc<CountingIrq>,
        out: Captured,
    }

    fn rig() -> Rig {
        let irq = Arc::new(CountingIrq::default());
        let out = Captured::default();
        let serial = Arc::new(Mutex::new(Serial::new(irq.clone(), Box::new(out.clone()))));
        let bus = Bus::new();
        bus.insert(COM1, 8, serial.clone()).unwrap();
        Rig {
            bus,
            serial,
            irq,
            out,
        }
    }

    fn inb(bus: &Bus, port: u64) -> u8 {
        let mut d = [0u8];
        assert!(bus.read(port, &mut d));
        d[0]
    }

    fn outb(bus: &Bus, port: u64, v: u8) {
        assert!(bus.write(port, &[v]));
    }

    #[test]
    fn transmitted_bytes_reach_the_output() {
        let r = rig();
        for &b in b"hello\n" {
            outb(&r.bus, COM1 + THR, b);
        }
        assert_eq!(r.out.0.lock().unwrap().as_slice(), b"hello\n");
        // The transmitter is always ready: THRE and TEMT set.
        assert_eq!(inb(&r.bus, COM1 + LSR) & 0x60, 0x60);
        // No interrupt was enabled, none raised.
        assert_eq!(r.irq.count(), 0);
    }

    #[test]
    fn thr_empty_interrupt_when_enabled() {
        let r = rig();
        assert_eq!(inb(&r.bus, COM1 + IIR) & 0x0f, 0x01, "no interrupt pending");
        outb(&r.bus, COM1 + IER, 0x02);
        assert_eq!(
            r.irq.count(),
            1,
            "enabling THRE with an empty THR interrupts"
        );
        // IIR reports THR empty (0x02) with the 16550A FIFO bits.
        assert_eq!(inb(&r.bus, COM1 + IIR), 0xc2);
        // Reading IIR acknowledged it; the next byte raises it again.
        outb(&r.bus, COM1 + THR, b'x');
        assert_eq!(r.irq.count(), 2);
        assert_eq!(inb(&r.bus, COM1 + IIR) & 0x0f, 0x02);
    }

    #[test]
    fn received_data_sets_lsr_and_interrupts() {
        let r = rig();
        outb(&r.bus, COM1 + IER, 0x01);
        assert_eq!(r.irq.count(), 0, "no data yet");
        assert_eq!(inb(&r.bus, COM1 + LSR) & 0x01, 0);
        assert_eq!(r.serial.lock().unwrap().enqueue_input(b"ab"), 2);
        assert_eq!(r.irq.count(), 1);
        assert_eq!(inb(&r.bus, COM1 + LSR) & 0x01, 0x01, "data ready");
        assert_eq!(inb(&r.bus, COM1 + IIR) & 0x0f, 0x04, "RX data available");
        assert_eq!(inb(&r.bus, COM1 + THR), b'a');
        assert_eq!(inb(&r.bus, COM1 + THR), b'b');
        assert_eq!(inb(&r.bus, COM1 + LSR) & 0x01, 0, "drained");
    }

    #[test]
    fn full_fifo_accepts_part_of_the_input() {
        let r = rig();
        let mut serial = r.serial.lock().unwrap();
        let input = vec![b'z'; 100];
        let first = serial.enqueue_input(&input);
        assert!(first > 0 && first < input.len(), "accepted {first}");
        assert_eq!(serial.fifo_capacity(), 0);
        assert_eq!(serial.enqueue_input(&input[first..]), 0);
        drop(serial);
        // The guest drains one byte: room for exactly one more.
        assert_eq!(inb(&r.bus, COM1 + THR), b'z');
        assert_eq!(r.serial.lock().unwrap().enqueue_input(b"12"), 1);
    }

    #[test]
    fn divisor_latch_and_scratch() {
        let r = rig();
        outb(&r.bus, COM1 + LCR, 0x83);
        outb(&r.bus, COM1, 0x01);
        outb(&r.bus, COM1 + 1, 0x00);
        assert_eq!(inb(&r.bus, COM1), 0x01);
        outb(&r.bus, COM1 + LCR, 0x03);
        assert!(
            r.out.0.lock().unwrap().is_empty(),
            "DLL write is no THR write"
        );
        outb(&r.bus, COM1 + SCR, 0x5a);
        assert_eq!(inb(&r.bus, COM1 + SCR), 0x5a);
    }

    #[test]
    fn odd_widths_and_offsets_do_not_panic() {
        let r = rig();
        // A 16-bit write to THR is two byte writes: THR then IER.
        assert!(r.bus.write(COM1, &[b'q', 0x00]));
        assert_eq!(r.out.0.lock().unwrap().as_slice(), b"q");
        let mut wide = [0u8; 8];
        assert!(r.bus.read(COM1 + 4, &mut wide));
        assert_eq!(&wide[4..], &[0xff; 4], "past register 7 reads float");
        assert!(r.bus.write(COM1 + 7, &[1, 2, 3, 4, 5, 6, 7, 8]));
        let dev = r.serial.clone();
        let mut data = [0u8; 4];
        dev.lock().unwrap().read(u64::MAX, &mut data);
        dev.lock().unwrap().write(u64::MAX - 1, &data);
        assert_eq!(data, [0xff; 4]);
    }

    #[test]
    fn state_round_trips_through_json() {
        let r = rig();
        outb(&r.bus, COM1 + LCR, 0x83);
        outb(&r.bus, COM1, 0x03);
        outb(&r.bus, COM1 + LCR, 0x03);
        outb(&r.bus, COM1 + MCR, 0x0b);
        outb(&r.bus, COM1 + SCR, 0x42);
        outb(&r.bus, COM1 + IER, 0x01);
        r.serial.lock().unwrap().enqueue_input(b"pending");
        let state = r.serial.lock().unwrap().save().unwrap();
        let json = serde_json::to_string(&state).unwrap();
        let back: SerialState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);

        let r2 = rig();
        r2.serial.lock().unwrap().restore(&back).unwrap();
        assert_eq!(r2.serial.lock().unwrap().save().unwrap(), state);
        assert_eq!(r2.irq.count(), 1, "pending RX interrupt raised again");
        assert_eq!(inb(&r2.bus, COM1 + SCR), 0x42);
        assert_eq!(inb(&r2.bus, COM1 + THR), b'p');
        // The restored UART still writes to its own output.
        outb(&r2.bus, COM1 + THR, b'!');
        assert_eq!(r2.out.0.lock().unwrap().as_slice(), b"!");
    }

    #[test]
    fn oversized_fifo_in_a_snapshot_is_refused() {
        let r = rig();
        outb(&r.bus, COM1 + SCR, 0x11);
        let mut state = r.serial.lock().unwrap().save().unwrap();
        state.in_buffer = vec![0; 1000];
        state.scratch = 0x22;
        assert!(r.serial.lock().unwrap().restore(&state).is_err());
        assert_eq!(inb(&r.bus, COM1 + SCR), 0x11, "old state kept");
        outb(&r.bus, COM1 + THR, b'k');
        assert_eq!(r.out.0.lock().unwrap().as_slice(), b"k");
    }
}
