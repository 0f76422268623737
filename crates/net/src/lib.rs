//! Host network backends for virtio-net.
//!
//! [`Tap`] opens (or creates) a Linux tap interface in the mode virtio-net
//! wants: no packet-information prefix, a virtio-net header in front of each
//! frame (so checksum and segmentation offloads can pass through), and the
//! offloads the guest negotiated. [`MacAddr`] parses and generates
//! addresses. Written here rather than taken from a crate: the rust-vmm
//! family has no published tap crate, and the ioctls are few.

mod mac;
mod tap;

pub use mac::MacAddr;
pub use tap::{Offloads, Tap, TapError, VNET_HDR_LEN};
