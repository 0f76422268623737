//! Arbitrary bytes parsed as a VHDX image, from memory (laid out by
//! block::vhdx::layout_for_fuzzing, so mutations land on metadata): open,
//! read, block status must return errors for bad input, never panic, hang
//! or allocate wildly.
#![no_main]

use block::{open_in_memory, ImageFormat, MemFile};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let file = MemFile::sparse(block::vhdx::layout_for_fuzzing(data));
    if let Ok(mut d) = open_in_memory(file, ImageFormat::Vhdx, "fuzz.vhdx") {
        block_fuzz::exercise(d.as_mut());
    }
});
