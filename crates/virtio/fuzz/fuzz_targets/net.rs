//! Arbitrary guest memory (virtio-net headers, frames and the rings that
//! point at them) and arbitrary host frames fed to virtio-net's transmit
//! and receive paths: `cargo +nightly fuzz run net` from crates/virtio.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    virtio::fuzzing::fuzz_net(data);
});
