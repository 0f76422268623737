//! Arbitrary ring and descriptor memory fed to the split-queue parser:
//! `cargo +nightly fuzz run queue` from crates/virtio.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    virtio::fuzzing::fuzz_queue(data);
});
