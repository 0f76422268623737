//! Arbitrary bytes parsed as a VMDK image, from memory: open, read, block
//! status must return errors for bad input, never panic, hang or allocate
//! wildly.
#![no_main]

use block::{open_in_memory, ImageFormat, MemFile};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(mut d) = open_in_memory(MemFile::new(data.to_vec()), ImageFormat::Vmdk, "fuzz.vmdk") {
        block_fuzz::exercise(d.as_mut());
    }
});
