//! Host network backends for virtio-net.
//!
//! [`Tap`] opens (or creates) a Linux tap interface in the mode virtio-net
//! wants: no packet-information prefix, a virtio-net header in front of each
//! frame (so checksum and segmentation offloads can pass through), and the
//! offloads the guest negotiated. [`MacAddr`] parses and generates
//! addresses. [`Passt`] is user-mode networking without privileges: a
//! passt process on a socket pair, framed as QEMU's `-netdev stream`.
//! Written here rather than taken from a crate: the rust-vmm
//! family has no published tap crate, and the ioctls are few.

mod mac;
pub mod passt;
mod tap;

pub use mac::MacAddr;
pub use passt::{HostFwd, Passt, PasstError, PasstOptions};
pub use tap::{Offloads, Tap, TapError, VNET_HDR_LEN};
