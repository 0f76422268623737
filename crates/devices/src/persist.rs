//! One way for every device to save and restore its guest-visible state.
//!
//! A device implements [`Persist`]: [`Persist::save`] gives a plain serde
//! value (`Persist::State`, one type per device) and [`Persist::restore`]
//! loads one into a device the VMM has already built with the same
//! configuration (its host-side resources: output streams, interrupt lines,
//! disk files, stay the ones it was built with).
//!
//! Invariants every implementation keeps:
//!
//! - A saved state is untrusted data (it comes from a snapshot file or a
//!   migration stream). `restore` validates all of it first, and only then
//!   changes the device: on error the device is exactly as it was, and the
//!   error says which device refused what. It never panics.
//! - `save` never changes what the guest sees. It may fail when the device
//!   cannot be saved right now (a virtio function whose queues are still
//!   being processed) or when a host resource cannot be read.
//!
//! Container devices (a virtio PCI function) save their parts (configuration
//! space, MSI-X table, the device model) through the same trait.

/// A device whose state a snapshot or a migration carries.
pub trait Persist {
    /// The device's saved state: plain data, no host handles.
    type State: Clone + std::fmt::Debug + serde::Serialize + serde::de::DeserializeOwned;

    /// The state the guest sees now.
    fn save(&self) -> Result<Self::State, PersistError>;

    /// Load `state` (validated here) into this device; all or nothing.
    fn restore(&mut self, state: &Self::State) -> Result<(), PersistError>;
}

/// Why a device state could not be saved or restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PersistError {
    /// The saved state is not one this device can ever hold (a field out of
    /// range, a buffer larger than the device's).
    #[error("invalid {device} state: {reason}")]
    Invalid {
        device: &'static str,
        reason: String,
    },
    /// The saved state is valid, but for a device built differently from
    /// this one (another kind of device, other features, other sizes).
    #[error("{device}: {reason}")]
    Mismatch {
        device: &'static str,
        reason: String,
    },
    /// The device cannot be saved or restored in the state it is in now.
    #[error("{device}: {reason}")]
    Busy {
        device: &'static str,
        reason: String,
    },
    /// The device keeps no state a snapshot can carry.
    #[error("{device} does not support snapshots")]
    Unsupported { device: String },
    /// A host resource the state describes could not be read or does not
    /// match (a disk file changed since the snapshot).
    #[error("{device}: {reason}")]
    Host {
        device: &'static str,
        reason: String,
    },
}

impl PersistError {
    /// The device the error is about.
    pub fn device(&self) -> &str {
        match self {
            PersistError::Invalid { device, .. }
            | PersistError::Mismatch { device, .. }
            | PersistError::Busy { device, .. }
            | PersistError::Host { device, .. } => device,
            PersistError::Unsupported { device } => device,
        }
    }

    pub fn invalid(device: &'static str, reason: impl Into<String>) -> Self {
        PersistError::Invalid {
            device,
            reason: reason.into(),
        }
    }

    pub fn mismatch(device: &'static str, reason: impl Into<String>) -> Self {
        PersistError::Mismatch {
            device,
            reason: reason.into(),
        }
    }

    pub fn busy(device: &'static str, reason: impl Into<String>) -> Self {
        PersistError::Busy {
            device,
            reason: reason.into(),
        }
    }

    pub fn host(device: &'static str, reason: impl Into<String>) -> Self {
        PersistError::Host {
            device,
            reason: reason.into(),
        }
    }
}
