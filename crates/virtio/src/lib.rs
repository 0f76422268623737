//! Virtio 1.x devices for Vireo over the modern PCI transport.
//!
//! - [`transport::VirtioPciDevice`]: a [`pci::PciDevice`] exposing the
//!   virtio vendor capabilities (common, notify, ISR, device config) and
//!   MSI-X in BAR 0, the device status state machine and feature
//!   negotiation.
//! - [`queue`]: split virtqueues with strict descriptor-chain validation.
//! - [`VirtioDevice`] / [`QueueWorker`]: what a device implements. Queue
//!   processing runs on a worker thread per device, woken through one
//!   eventfd per queue, so vCPU threads only flip an eventfd on a notify.
//! - [`rng::Rng`]: virtio-entropy fed from the host's `getrandom`.
//! - [`balloon::Balloon`]: the memory balloon (inflate/deflate, statistics).
//! - [`console::Console`]: virtio-console with one port (the guest's hvc0).
//! - [`vsock::Vsock`]: virtio-vsock with the host side as Unix sockets.
//! - [`fs::VhostUserFs`]: virtio-fs whose queues a vhost-user backend
//!   (virtiofsd) serves in its own process ([`VirtioDevice::external_queues`]);
//!   [`fs::Virtiofsd`] starts one for a host directory.
//! - Snapshots: [`VirtioPciDevice`] and every device model implement
//!   [`Persist`] (`devices::Persist`); through `dyn VirtioDevice` a model's
//!   state travels as its [`DeviceState`] variant ([`save_as`],
//!   [`restore_from`]). A restore checks the whole saved function before it
//!   changes anything.

pub mod balloon;
pub mod block;
pub mod console;
pub mod fs;
#[doc(hidden)]
pub mod fuzzing;
pub mod net;
pub mod net_csum;
pub mod queue;
pub mod rate_limit;
pub mod rng;
pub mod stats;
pub mod transport;
pub mod vsock;

use std::os::fd::RawFd;
use std::sync::Arc;

use hypervisor::GuestRam;
use vmm_sys_util::eventfd::EventFd;

pub use pci::{Persist, PersistError};
pub use queue::{DescChain, Descriptor, QueueConfig, QueueError, VirtQueue};
pub use transport::{QueueSnapshot, VirtioPciDevice, VirtioPciError, VirtioPciState, BAR_INDEX};

/// A device model's own part of a snapshot (the transport keeps the
/// queues, features and interrupts).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum DeviceState {
    Block(block::BlockState),
    Net(net::NetState),
    Rng,
    Console(console::ConsoleState),
    Balloon(balloon::BalloonSnapshot),
    Vsock(vsock::VsockState),
}

/// Save a device model through its [`Persist`] impl as its [`DeviceState`]
/// variant (`wrap`): what [`VirtioDevice::save_state`] does for each model.
pub fn save_as<D: Persist>(
    dev: &D,
    wrap: fn(D::State) -> DeviceState,
) -> Result<DeviceState, PersistError> {
    dev.save().map(wrap)
}

/// Restore a device model through its [`Persist`] impl from the variant
/// `pick` finds in `state`; any other variant is refused as a mismatch
/// naming both kinds.
pub fn restore_from<D: Persist>(
    dev: &mut D,
    device: &'static str,
    state: &DeviceState,
    pick: fn(&DeviceState) -> Option<&D::State>,
) -> Result<(), PersistError> {
    match pick(state) {
        Some(s) => dev.restore(s),
        None => Err(PersistError::mismatch(
            device,
            format!("a {} state for a {device} device", state.name()),
        )),
    }
}

impl DeviceState {
    pub fn name(&self) -> &'static str {
        match self {
            DeviceState::Block(_) => "virtio-blk",
            DeviceState::Net(_) => "virtio-net",
            DeviceState::Rng => "virtio-rng",
            DeviceState::Console(_) => "virtio-console",
            DeviceState::Balloon(_) => "virtio-balloon",
            DeviceState::Vsock(_) => "virtio-vsock",
        }
    }
}

/// Device status bits (virtio 1.x 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u8 = 1;
    pub const DRIVER: u8 = 2;
    pub const DRIVER_OK: u8 = 4;
    pub const FEATURES_OK: u8 = 8;
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    pub const FAILED: u8 = 0x80;
}

/// Transport feature bits.
pub mod features {
    pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
    pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
    pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
}

/// Device type IDs.
pub mod device_type {
    pub const NET: u32 = 1;
    pub const BLOCK: u32 = 2;
    pub const CONSOLE: u32 = 3;
    pub const RNG: u32 = 4;
    pub const BALLOON: u32 = 5;
    pub const VSOCK: u32 = 19;
    pub const FS: u32 = 26;
}

/// Serve a driver's read of `data.len()` bytes at `offset` from a device's
/// configuration image; bytes past its end read as zero.
pub fn read_config_image(image: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| image.get(o))
            .copied()
            .unwrap_or(0);
    }
}

/// How a device (or its worker) interrupts the driver.
pub trait VirtioInterrupt: Send + Sync {
    /// Used buffers were added to queue `queue`.
    fn signal_queue(&self, queue: u16);
    /// The device status changed (NEEDS_RESET): a configuration interrupt
    /// without a new configuration generation.
    fn signal_config(&self);
    /// The device-specific configuration changed: bump config_generation
    /// (so the driver rereads consistently) and interrupt.
    fn config_changed(&self);
}

/// Why activation failed (the transport then sets DEVICE_NEEDS_RESET).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActivateError {
    #[error("device activation failed: {0}")]
    Failed(String),
}

/// What [`QueueWorker::process_queue`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Processed {
    /// Something was added to the used ring (an interrupt may be due).
    pub used: bool,
    /// Chains remain available that the device cannot consume yet (e.g.
    /// receive buffers with no input): do not spin on them.
    pub stalled: bool,
}

/// The part of a device that runs on its worker thread after DRIVER_OK.
pub trait QueueWorker: Send {
    /// Consume what queue `index` has available. An error marks the device
    /// DEVICE_NEEDS_RESET and stops all processing until reset.
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut VirtQueue,
        mem: &GuestRam,
    ) -> Result<Processed, QueueError>;

    /// An eventfd the worker thread also waits on, for work that arrives
    /// from the host side (console input). `None` for most devices.
    fn host_event(&self) -> Option<&EventFd> {
        None
    }

    /// The queues to service when [`QueueWorker::host_event`] fires or
    /// [`QueueWorker::host_fd`] polls readable.
    fn host_event_queues(&self) -> Vec<usize> {
        Vec::new()
    }

    /// A host descriptor the worker thread polls itself (a tap: readable
    /// while a frame waits), whenever [`QueueWorker::host_fd_armed`] says
    /// so. Level-triggered, so a device disarms it while it cannot take
    /// input (no guest buffers), or the thread would spin.
    fn host_fd(&self) -> Option<RawFd> {
        None
    }

    /// Whether [`QueueWorker::host_fd`] is to be polled now (asked before
    /// every wait).
    fn host_fd_armed(&self) -> bool {
        false
    }

    /// A rate limit's timer (a non-blocking timerfd) the worker thread
    /// always polls: when it fires, every queue is served again (a
    /// throttled queue has tokens again, or its limit changed).
    fn timer_fd(&self) -> Option<RawFd> {
        None
    }
}

/// A live queue handed to a device that serves its queues elsewhere
/// ([`VirtioDevice::activate_external`]): the registers the driver wrote
/// (guest-physical addresses, checked to lie in guest RAM) and the eventfd
/// the driver's notify writes signal.
pub struct ExternalQueue {
    pub index: usize,
    pub cfg: QueueConfig,
    pub kick: EventFd,
}

/// A virtio device model, independent of the transport.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// One entry per queue: its maximum size (a power of two).
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Device feature bits offered; the transport adds VERSION_1,
    /// INDIRECT_DESC and EVENT_IDX.
    fn features(&self) -> u64;
    /// PCI class code (0xCCSSPP).
    fn pci_class(&self) -> u32 {
        0xff_00_00
    }
    /// Bytes of device-specific configuration space.
    fn config_len(&self) -> usize {
        0
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0)
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// DRIVER_OK: `features` are the negotiated ones. Returns the worker
    /// that processes the queues; it gets each live queue and guest memory
    /// on every call, and `interrupt` is for events outside queue
    /// processing (the transport raises queue interrupts itself).
    fn activate(
        &mut self,
        features: u64,
        mem: GuestRam,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<Box<dyn QueueWorker>, ActivateError>;
    /// True when another process serves this device's queues (vhost-user):
    /// the transport then runs no worker and calls
    /// [`VirtioDevice::activate_external`] at DRIVER_OK instead of
    /// [`VirtioDevice::activate`]. Its interrupts reach the driver through
    /// the [`VirtioInterrupt`] it is given.
    fn external_queues(&self) -> bool {
        false
    }
    /// DRIVER_OK for a device whose queues are served elsewhere: hand over
    /// the negotiated `features` and the enabled `queues`.
    fn activate_external(
        &mut self,
        _features: u64,
        _queues: &[ExternalQueue],
        _interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        Err(ActivateError::Failed(format!(
            "virtio device type {} serves its own queues",
            self.device_type()
        )))
    }
    /// Device reset (status 0): forget everything the driver set up.
    fn reset(&mut self) {}
    /// This device's own state for a snapshot, taken while its queues are
    /// not being processed: its [`Persist`] state as a [`DeviceState`]
    /// (see [`save_as`]). Devices without one cannot be snapshotted.
    fn save_state(&self) -> Result<DeviceState, PersistError> {
        Err(PersistError::Unsupported {
            device: format!("virtio device type {}", self.device_type()),
        })
    }
    /// Give up (`false`) or take back (`true`) host resources another
    /// process needs to take this device over (a disk's file lock).
    fn set_host_locks(&mut self, _held: bool) -> Result<(), String> {
        Ok(())
    }
    /// Load what [`VirtioDevice::save_state`] returned, before the driver
    /// runs again; refuse state that does not fit this device (see
    /// [`restore_from`]), changing nothing then.
    fn restore_state(&mut self, _state: &DeviceState) -> Result<(), PersistError> {
        Err(PersistError::Unsupported {
            device: format!("virtio device type {}", self.device_type()),
        })
    }
}
