//! Arbitrary bytes opened as a qcow2 image: open, read, write, flush must
//! return errors for bad input, never panic, hang or allocate wildly.
#![no_main]

use block::{open_with, ImageFormat};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = block_fuzz::scratch("qcow2");
    let _ = std::fs::remove_file(&path);
    if std::fs::write(&path, data).is_err() {
        return;
    }
    // Backing files are disabled: a hostile image could name any host file.
    let mut opts = block_fuzz::read_only(ImageFormat::Qcow2);
    opts.detach_backing = false;
    if let Ok(mut d) = open_with(&path, &opts) {
        block_fuzz::exercise(d.as_mut());
    }
    opts.read_only = false;
    if let Ok(mut d) = open_with(&path, &opts) {
        let size = d.size();
        let buf = [0x5au8; 3000];
        for off in [0, size / 2] {
            if off.saturating_add(3000) <= size {
                let _ = d.write_at(&buf, off);
            }
        }
        let _ = d.discard(0, size.min(1 << 20));
        let _ = d.write_zeroes(size / 4, size.min(70000) / 2);
        let _ = d.flush();
    }
    let _ = std::fs::remove_file(&path);
});
