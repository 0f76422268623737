//! The exit device (`--exit-device`): QEMU's `isa-debug-exit` for test
//! kernels. A write of value V to its port ends the VM; the VMM's process
//! exits with status `(V << 1) | 1` (modulo 256), as QEMU's does, so test
//! harnesses written for QEMU read the same codes. Those statuses are odd
//! and can equal Vireo's own 1, 3 and 5: the VMM's final line on stderr
//! names the exit device and the value, so a collision is never silent.
//!
//! The device is opt-in: a guest that does not ask for it has nothing at
//! its port. Reads float high; it keeps no state.

use crate::{BusDevice, EventSink, VmEvent};

pub struct DebugExit {
    events: EventSink,
}

impl DebugExit {
    pub fn new(events: EventSink) -> Self {
        DebugExit { events }
    }
}

/// The process exit status for a value written to the exit device.
pub fn exit_status(value: u32) -> i32 {
    ((value << 1) | 1) as i32 & 0xff
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        // The value as written, zero-extended (byte, word or dword).
        let mut v = [0u8; 4];
        let n = data.len().min(4);
        v[..n].copy_from_slice(&data[..n]);
        (self.events)(VmEvent::GuestExit(u32::from_le_bytes(v)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn a_write_ends_the_vm_with_qemus_status() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let mut d = DebugExit::new(Arc::new(move |e| s.lock().unwrap().push(e)));
        let mut b = [0u8; 2];
        d.read(0, &mut b);
        assert_eq!(b, [0xff, 0xff]);
        d.write(0, &[0x10]);
        d.write(0, &[0x34, 0x12, 0, 0]);
        assert_eq!(
            *seen.lock().unwrap(),
            vec![VmEvent::GuestExit(0x10), VmEvent::GuestExit(0x1234)]
        );
        assert_eq!(exit_status(0), 1);
        assert_eq!(exit_status(0x10), 0x21);
        assert_eq!(exit_status(0x80), 1, "8-bit process status");
    }
}
