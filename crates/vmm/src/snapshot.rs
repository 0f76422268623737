//! Snapshots: a paused VM's vCPUs, backend state, devices and memory in a
//! directory with a versioned manifest; and restoring one in a new process,
//! with guest memory mapped copy-on-write from the snapshot's file (so
//! restore time does not grow with memory size, and clones share pages).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MmapRegion,
};

use crate::VmmError;

/// Bumped whenever the manifest's meaning changes; restore refuses others.
pub const SNAPSHOT_VERSION: u32 = 1;
pub const MANIFEST: &str = "manifest.json";
pub const MEMORY_FILE: &str = "memory.bin";

/// One guest RAM range and where its bytes are in the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRange {
    pub gpa: u64,
    pub len: u64,
    pub file_offset: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceStates {
    pub serial: devices::serial::SerialState,
    pub i8042: devices::i8042::I8042State,
    pub rtc: devices::rtc::CmosState,
    pub acpi_pm: devices::acpi::AcpiPmState,
}

/// What `manifest.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    /// The Vireo that wrote it (informational).
    pub vireo: String,
    pub accel: hypervisor::AccelKind,
    pub memory_bytes: u64,
    pub vcpus: u32,
    /// The settings the VM was started with, when known.
    pub config: Option<crate::VmConfig>,
    pub memory: Vec<MemoryRange>,
    pub vcpu_states: Vec<hypervisor::VcpuSnapshot>,
    pub vm_state: hypervisor::VmSnapshot,
    pub devices: DeviceStates,
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> VmmError {
    VmmError::Io(format!("{what} {}: {e}", path.display()))
}

/// Write guest memory to `dir/memory.bin`; the ranges it wrote.
pub fn write_memory(mem: &GuestMemoryMmap, dir: &Path) -> Result<Vec<MemoryRange>, VmmError> {
    let path = dir.join(MEMORY_FILE);
    let mut f = File::create(&path).map_err(|e| io_err("cannot create", &path, e))?;
    let mut ranges = Vec::new();
    let mut offset = 0u64;
    for region in mem.iter() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| VmmError::Io(format!("guest memory: {e}")))?;
        // SAFETY: the region maps `len` bytes at `host` for the VM's
        // lifetime; the vCPUs are paused, so nothing writes it meanwhile
        // (device workers may, which a paused guest does not ask for).
        let bytes = unsafe { std::slice::from_raw_parts(host as *const u8, region.len() as usize) };
        f.write_all(bytes)
            .map_err(|e| io_err("cannot write", &path, e))?;
        ranges.push(MemoryRange {
            gpa: region.start_addr().0,
            len: region.len(),
            file_offset: offset,
        });
        offset += region.len();
    }
    f.sync_all().map_err(|e| io_err("cannot sync", &path, e))?;
    Ok(ranges)
}

/// Guest memory mapped privately (copy-on-write) from a snapshot's file.
pub fn map_memory(dir: &Path, ranges: &[MemoryRange]) -> Result<GuestMemoryMmap, VmmError> {
    let path = dir.join(MEMORY_FILE);
    let file = File::open(&path).map_err(|e| io_err("cannot open", &path, e))?;
    let file_len = file
        .metadata()
        .map_err(|e| io_err("cannot stat", &path, e))?
        .len();
    let mut regions = Vec::new();
    for r in ranges {
        if r.file_offset
            .checked_add(r.len)
            .is_none_or(|end| end > file_len)
        {
            return Err(VmmError::Config(format!(
                "snapshot memory file {} is shorter than its manifest says",
                path.display()
            )));
        }
        let fo = FileOffset::new(
            file.try_clone()
                .map_err(|e| io_err("cannot open", &path, e))?,
            r.file_offset,
        );
        let mmap = vm_memory::mmap::MmapRegionBuilder::new(r.len as usize)
            .with_file_offset(fo)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| VmmError::Io(format!("cannot map {}: {e}", path.display())))?;
        let region: MmapRegion = mmap;
        let region = GuestRegionMmap::new(region, GuestAddress(r.gpa))
            .ok_or_else(|| VmmError::Config(format!("bad memory range {:#x}", r.gpa)))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions)
        .map_err(|e| VmmError::Config(format!("snapshot memory ranges: {e}")))
}

pub fn write_manifest(dir: &Path, m: &Manifest) -> Result<(), VmmError> {
    let path = dir.join(MANIFEST);
    let text = serde_json::to_vec(m).map_err(|e| VmmError::Io(format!("manifest: {e}")))?;
    let mut f = File::create(&path).map_err(|e| io_err("cannot create", &path, e))?;
    f.write_all(&text)
        .and_then(|_| f.sync_all())
        .map_err(|e| io_err("cannot write", &path, e))
}

pub fn read_manifest(dir: &Path) -> Result<Manifest, VmmError> {
    let path = dir.join(MANIFEST);
    let text = std::fs::read(&path).map_err(|e| io_err("cannot read snapshot", &path, e))?;
    // Look at the version first, so an old or new snapshot gets a clear
    // message rather than a field-level parse error.
    let version = serde_json::from_slice::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("version").and_then(|v| v.as_u64()));
    match version {
        Some(v) if v == SNAPSHOT_VERSION as u64 => {}
        Some(v) => {
            return Err(VmmError::Config(format!(
                "snapshot {} has version {v}; this Vireo reads version {SNAPSHOT_VERSION}",
                dir.display()
            )))
        }
        None => {
            return Err(VmmError::Config(format!(
                "{} is not a Vireo snapshot manifest",
                path.display()
            )))
        }
    }
    serde_json::from_slice(&text)
        .map_err(|e| VmmError::Config(format!("bad snapshot manifest {}: {e}", path.display())))
}

/// A new, empty snapshot directory (refuses to overwrite one).
pub fn prepare_dir(dir: &Path) -> Result<PathBuf, VmmError> {
    if dir.join(MANIFEST).exists() {
        return Err(VmmError::Config(format!(
            "{} already holds a snapshot",
            dir.display()
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| io_err("cannot create", dir, e))?;
    Ok(dir.to_path_buf())
}
