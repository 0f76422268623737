//! virtio-rng (entropy device, type 4): one request queue; each chain's
//! device-writable buffers are filled from the host's `getrandom(2)`.

use std::sync::Arc;

use hypervisor::GuestRam;

use crate::{
    device_type, ActivateError, Persist, PersistError, Processed, QueueError, QueueWorker,
    VirtQueue, VirtioDevice, VirtioInterrupt,
};

/// Queue size offered.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes returned for one chain: bounds the work a single request can
/// ask of the host (Linux asks for at most a page or so anyway).
pub const MAX_BYTES_PER_REQUEST: usize = 64 * 1024;

/// The entropy device.
#[derive(Debug, Default)]
pub struct Rng;

impl Rng {
    pub fn new() -> Self {
        Rng
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        0
    }

    fn activate(
        &mut self,
        _features: u64,
        _mem: GuestRam,
        _interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<Box<dyn QueueWorker>, ActivateError> {
        Ok(Box::new(RngWorker))
    }

    fn save_state(&self) -> Result<crate::DeviceState, PersistError> {
        crate::save_as(self, |()| crate::DeviceState::Rng)
    }

    fn restore_state(&mut self, state: &crate::DeviceState) -> Result<(), PersistError> {
        crate::restore_from(self, "virtio-rng", state, |s| {
            matches!(s, crate::DeviceState::Rng).then_some(&())
        })
    }
}

/// The entropy device keeps nothing between requests.
impl Persist for Rng {
    type State = ();

    fn save(&self) -> Result<(), PersistError> {
        Ok(())
    }

    fn restore(&mut self, _state: &()) -> Result<(), PersistError> {
        Ok(())
    }
}

struct RngWorker;

impl QueueWorker for RngWorker {
    fn process_queue(
        &mut self,
        _index: usize,
        queue: &mut VirtQueue,
        mem: &GuestRam,
    ) -> Result<Processed, QueueError> {
        let mut done = Processed::default();
        while let Some(chain) = queue.pop(mem)? {
            let want = (chain.writable_len() as usize).min(MAX_BYTES_PER_REQUEST);
            let mut buf = vec![0u8; want];
            let got = match getrandom(&mut buf) {
                Ok(()) => chain.write_all(mem, &buf)?,
                Err(e) => {
                    // No entropy to give: complete the request empty rather
                    // than hand out anything predictable.
                    tracing::error!("virtio-rng: getrandom failed: {e}");
                    0
                }
            };
            queue.add_used(mem, chain.head, got)?;
            done.used = true;
        }
        Ok(done)
    }
}

/// Fill `buf` from the kernel's CSPRNG.
pub fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: the pointer and length describe the writable slice `rest`.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn getrandom_fills_buffers() {
        let mut a = [0u8; 64];
        let mut b = [0u8; 64];
        super::getrandom(&mut a).unwrap();
        super::getrandom(&mut b).unwrap();
        assert_ne!(a, b);
        assert_ne!(a, [0; 64]);
    }
}
