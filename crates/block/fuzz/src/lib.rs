//! What the block fuzz targets share: how an opened image is exercised,
//! and (for qcow2, which also writes) a scratch file in memory-backed
//! /dev/shm. The read-only formats (VMDK, VHDX) are parsed straight from
//! memory (`block::open_in_memory`): no file per execution.

use std::path::PathBuf;

use block::{DiskImage, ImageFormat, OpenOptions};

/// Read the start, two probes and (bounded: hostile sizes are huge) the
/// allocation map of an image that opened. Errors are the expected
/// outcome; only panics, hangs and wild allocations are findings.
pub fn exercise(d: &mut dyn DiskImage) {
    // One 1 MiB buffer per thread, not one per execution: a fresh one was
    // mapped, faulted in and unmapped every time, which was most of an
    // execution's time (what a read leaves in it does not matter).
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; 1 << 20]);
    }
    let size = d.size();
    BUF.with(|b| {
        let mut b = b.borrow_mut();
        let _ = d.read_at(&mut b[..size.min(1 << 20) as usize], 0);
    });
    let mut small = [0u8; 4096];
    for off in [size / 3, size.saturating_sub(4096)] {
        if off.saturating_add(4096) <= size {
            let _ = d.read_at(&mut small, off);
        }
    }
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

/// Options for opening `format` read-only without following a backing
/// file (a hostile image could name any host file).
pub fn read_only(format: ImageFormat) -> OpenOptions {
    OpenOptions {
        format: Some(format),
        read_only: true,
        follow_backing: false,
        detach_backing: true,
    }
}

/// A scratch file for this process, in /dev/shm where there is one.
pub fn scratch(ext: &str) -> PathBuf {
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    dir.join(format!("vireo-block-fuzz-{}.{ext}", std::process::id()))
}
