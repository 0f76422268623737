//! Arbitrary bytes as a `--config` file, TOML and JSON, read the way
//! `vireo run --config` reads it and validated. Errors only, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Memory-backed /dev/shm where there is one: two file writes per
    // execution on a disk-backed /tmp were most of the target's time.
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let pid = std::process::id();
    for ext in ["toml", "json"] {
        let path = dir.join(format!("vireo-fuzz-config-{pid}.{ext}"));
        if std::fs::write(&path, data).is_ok() {
            if let Ok(c) = vmm::VmConfig::from_file(&path) {
                let _ = c.validate();
            }
        }
    }
});
