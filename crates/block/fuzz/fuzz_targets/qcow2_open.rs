//! Arbitrary bytes opened as a qcow2 image: open, read, write, flush must
//! return errors for bad input, never panic, hang or allocate wildly.
#![no_main]

use std::path::PathBuf;

use block::{open_with, ImageFormat, OpenOptions};
use libfuzzer_sys::fuzz_target;

fn scratch() -> PathBuf {
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    dir.join(format!("vireo-block-fuzz-{}.qcow2", std::process::id()))
}

fuzz_target!(|data: &[u8]| {
    let path = scratch();
    let _ = std::fs::remove_file(&path);
    if std::fs::write(&path, data).is_err() {
        return;
    }
    // Backing files are disabled: a hostile image could name any host file.
    let mut opts = OpenOptions {
        format: Some(ImageFormat::Qcow2),
        read_only: true,
        follow_backing: false,
        detach_backing: false,
    };
    if let Ok(mut d) = open_with(&path, &opts) {
        let size = d.size();
        let mut buf = vec![0u8; size.min(1 << 20) as usize];
        let _ = d.read_at(&mut buf, 0);
        let mut small = [0u8; 4096];
        for off in [size / 3, size.saturating_sub(4096)] {
            if off.saturating_add(4096) <= size {
                let _ = d.read_at(&mut small, off);
            }
        }
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
