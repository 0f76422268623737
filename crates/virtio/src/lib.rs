//! virtio (work in progress)
