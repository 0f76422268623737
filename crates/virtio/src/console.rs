//! virtio-console (type 3) with a single port and no optional features:
//! Linux makes it `hvc0`. Queue 0 (receiveq) carries host input to the
//! guest, queue 1 (transmitq) guest output to the host.
//!
//! Output goes to a callback on the device's worker thread. Input is pushed
//! through a [`ConsoleInput`] handle from any thread; it is buffered (up to
//! [`INPUT_BUFFER_MAX`] bytes) until the guest posts receive buffers.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use hypervisor::GuestRam;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{
    device_type, ActivateError, Persist, PersistError, Processed, QueueError, QueueWorker,
    VirtQueue, VirtioDevice, VirtioInterrupt,
};

pub const QUEUE_SIZE: u16 = 256;
pub const RECEIVEQ: usize = 0;
pub const TRANSMITQ: usize = 1;
/// Host input held while the guest has no receive buffers; beyond this the
/// oldest bytes are dropped (a stalled guest must not grow the VMM).
pub const INPUT_BUFFER_MAX: usize = 64 * 1024;

/// Where guest output goes.
pub type ConsoleOutput = Arc<dyn Fn(&[u8]) + Send + Sync>;

struct InputState {
    buf: Mutex<VecDeque<u8>>,
    wake: EventFd,
}

impl InputState {
    fn buf(&self) -> MutexGuard<'_, VecDeque<u8>> {
        self.buf.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A handle for feeding host input (keyboard, socket) to the guest.
#[derive(Clone)]
pub struct ConsoleInput {
    state: Arc<InputState>,
}

impl ConsoleInput {
    /// Queue `data` for the guest and wake the device's worker.
    pub fn push(&self, data: &[u8]) {
        {
            let mut b = self.state.buf();
            b.extend(data);
            let excess = b.len().saturating_sub(INPUT_BUFFER_MAX);
            b.drain(..excess);
        }
        let _ = self.state.wake.write(1);
    }

    /// Bytes waiting for guest receive buffers.
    pub fn pending(&self) -> usize {
        self.state.buf().len()
    }
}

/// What a snapshot keeps of the console: host input the guest has not
/// taken yet.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConsoleState {
    pub pending_input: Vec<u8>,
}

/// The console device.
pub struct Console {
    output: ConsoleOutput,
    input: Arc<InputState>,
}

impl Console {
    pub fn new(output: ConsoleOutput) -> std::io::Result<Self> {
        Ok(Console {
            output,
            input: Arc::new(InputState {
                buf: Mutex::new(VecDeque::new()),
                wake: EventFd::new(EFD_NONBLOCK)?,
            }),
        })
    }

    pub fn input(&self) -> ConsoleInput {
        ConsoleInput {
            state: self.input.clone(),
        }
    }
}

impl Persist for Console {
    type State = ConsoleState;

    fn save(&self) -> Result<ConsoleState, PersistError> {
        Ok(ConsoleState {
            pending_input: self.input.buf().iter().copied().collect(),
        })
    }

    fn restore(&mut self, s: &ConsoleState) -> Result<(), PersistError> {
        if s.pending_input.len() > INPUT_BUFFER_MAX {
            return Err(PersistError::invalid(
                "virtio-console",
                format!(
                    "{} bytes of pending input, the device holds at most {INPUT_BUFFER_MAX}",
                    s.pending_input.len()
                ),
            ));
        }
        let mut b = self.input.buf();
        b.clear();
        b.extend(&s.pending_input);
        Ok(())
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        device_type::CONSOLE
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        0
    }

    fn pci_class(&self) -> u32 {
        // Simple communication controller, other.
        0x07_80_00
    }

    /// cols, rows, max_nr_ports, emerg_wr: only meaningful with features we
    /// do not offer, but present as the spec lays them out.
    fn config_len(&self) -> usize {
        12
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; 12];
        cfg[4..8].copy_from_slice(&1u32.to_le_bytes());
        for (i, d) in data.iter_mut().enumerate() {
            *d = cfg.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn save_state(&self) -> Result<crate::DeviceState, PersistError> {
        crate::save_as(self, crate::DeviceState::Console)
    }

    fn restore_state(&mut self, state: &crate::DeviceState) -> Result<(), PersistError> {
        crate::restore_from(self, "virtio-console", state, |s| match s {
            crate::DeviceState::Console(s) => Some(s),
            _ => None,
        })
    }

    fn activate(
        &mut self,
        _features: u64,
        _mem: GuestRam,
        _interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<Box<dyn QueueWorker>, ActivateError> {
        let wake = self
            .input
            .wake
            .try_clone()
            .map_err(|e| ActivateError::Failed(e.to_string()))?;
        Ok(Box::new(ConsoleWorker {
            output: self.output.clone(),
            input: self.input.clone(),
            wake,
        }))
    }
}

struct ConsoleWorker {
    output: ConsoleOutput,
    input: Arc<InputState>,
    wake: EventFd,
}

impl ConsoleWorker {
    fn receive(&mut self, queue: &mut VirtQueue, mem: &GuestRam) -> Result<Processed, QueueError> {
        let mut done = Processed::default();
        loop {
            // Leave buffers available while there is nothing to put in them.
            if self.input.buf().is_empty() {
                done.stalled = true;
                return Ok(done);
            }
            let Some(chain) = queue.pop(mem)? else {
                return Ok(done);
            };
            let room = chain.writable_len() as usize;
            let data: Vec<u8> = {
                let mut b = self.input.buf();
                let n = room.min(b.len());
                b.drain(..n).collect()
            };
            let written = chain.write_all(mem, &data)?;
            queue.add_used(mem, chain.head, written)?;
            done.used = true;
        }
    }

    fn transmit(&mut self, queue: &mut VirtQueue, mem: &GuestRam) -> Result<Processed, QueueError> {
        let mut done = Processed::default();
        while let Some(chain) = queue.pop(mem)? {
            let data = chain.read_all(mem)?;
            if !data.is_empty() {
                (self.output)(&data);
            }
            queue.add_used(mem, chain.head, 0)?;
            done.used = true;
        }
        Ok(done)
    }
}

impl QueueWorker for ConsoleWorker {
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut VirtQueue,
        mem: &GuestRam,
    ) -> Result<Processed, QueueError> {
        match index {
            RECEIVEQ => self.receive(queue, mem),
            TRANSMITQ => self.transmit(queue, mem),
            _ => Ok(Processed::default()),
        }
    }

    fn host_event(&self) -> Option<&EventFd> {
        Some(&self.wake)
    }

    fn host_event_queues(&self) -> Vec<usize> {
        vec![RECEIVEQ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_is_bounded_keeping_the_newest_bytes() {
        let c = Console::new(Arc::new(|_| {})).unwrap();
        let input = c.input();
        input.push(&vec![1u8; INPUT_BUFFER_MAX]);
        input.push(&[2, 3]);
        assert_eq!(input.pending(), INPUT_BUFFER_MAX);
        let b = c.input.buf();
        assert_eq!(b.back(), Some(&3));
        assert_eq!(b.front(), Some(&1));
    }

    #[test]
    fn pending_input_survives_a_snapshot() {
        let c = Console::new(Arc::new(|_| {})).unwrap();
        c.input().push(b"typed ahead");
        let st = c.save_state().unwrap();
        let mut d = Console::new(Arc::new(|_| {})).unwrap();
        d.restore_state(&st).unwrap();
        assert_eq!(d.input().pending(), 11);
        assert!(d.restore_state(&crate::DeviceState::Rng).is_err());
        // More input than the device ever holds is refused, and the input
        // already there stays.
        let big = ConsoleState {
            pending_input: vec![0; INPUT_BUFFER_MAX + 1],
        };
        assert!(matches!(d.restore(&big), Err(PersistError::Invalid { .. })));
        assert_eq!(d.input().pending(), 11);
    }
}
