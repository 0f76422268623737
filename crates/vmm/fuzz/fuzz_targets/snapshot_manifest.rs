//! Arbitrary bytes as a snapshot's manifest.json: read as a restore reads
//! it (version, checksum, MAC, every device state, the consistency
//! checks), and as a bare manifest checked the same way, so inputs that
//! get past the checksum are explored too. Errors only, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = serde_json::from_slice::<vmm::snapshot::Manifest>(data) {
        if m.check().is_ok() {
            let _ = vmm::snapshot::disk_files(&m);
        }
    }
    let dir = std::env::temp_dir().join(format!("vireo-fuzz-manifest-{}", std::process::id()));
    if std::fs::create_dir_all(&dir).is_ok()
        && std::fs::write(dir.join(vmm::snapshot::MANIFEST), data).is_ok()
    {
        if let Ok((m, signed)) = vmm::snapshot::read_signed_manifest(&dir) {
            let _ = vmm::snapshot::check_disks_named(&dir, &m, signed, &[]);
        }
    }
});
