//! Arbitrary bytes opened as a VHDX image (laid out by block::vhdx::layout_for_fuzzing): open, read, block status must
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
    dir.join(format!("vireo-block-fuzz-{}.vhdx", std::process::id()))
}

fuzz_target!(|data: &[u8]| {
    let path = scratch();
    let _ = std::fs::remove_file(&path);
    if !write_layout(&path, data) {
        return;
    }
    let opts = OpenOptions {
        format: Some(ImageFormat::Vhdx),
        read_only: true,
        follow_backing: false,
        detach_backing: true,
    };
    if let Ok(mut d) = open_with(&path, &opts) {
        exercise(d.as_mut());
    }
    let _ = std::fs::remove_file(&path);
});

fn write_layout(path: &std::path::Path, data: &[u8]) -> bool {
    use std::os::unix::fs::FileExt;
    let Ok(f) = std::fs::File::create(path) else {
        return false;
    };
    block::vhdx::layout_for_fuzzing(data)
        .iter()
        .all(|(off, bytes)| f.write_all_at(bytes, *off).is_ok())
}

fn exercise(d: &mut dyn block::DiskImage) {
    let size = d.size();
    let mut buf = vec![0u8; size.min(1 << 20) as usize];
    let _ = d.read_at(&mut buf, 0);
    let mut small = [0u8; 4096];
    for off in [size / 3, size.saturating_sub(4096)] {
        if off.saturating_add(4096) <= size {
            let _ = d.read_at(&mut small, off);
        }
    }
    // Walk the allocation map (bounded: hostile sizes are huge).
    let mut off = 0;
    for _ in 0..4096 {
        if off >= size {
            break;
        }
        match d.block_status(off, size - off) {
            Ok((_, n)) => off += n,
            Err(_) => break,
        }
    }
}
