//! Snapshots: a paused VM's vCPUs, backend state, devices and memory in a
//! directory with a versioned, checksummed manifest; and restoring one in a
//! new process, with guest memory mapped copy-on-write from the snapshot's
//! file (so restore time does not grow with memory size, and clones share
//! pages).
//!
//! `memory.bin` is sparse: pages that are zero (or that the guest never
//! touched) are holes, so a large, mostly idle guest writes little.
//!
//! `manifest.json` is `{"version": N, "checksum": "fnv1a64:...",
//! "manifest": {...}}`; the checksum covers the bytes of the inner object
//! exactly as stored, so a damaged or hand-edited manifest is refused (it
//! detects accidents, it is not a signature). Disks are not copied: a
//! snapshot names its disk files and only resumes over the same files,
//! unchanged since (see `virtio::block::BlockState`).
//!
//! A snapshot directory is data, not authority: anyone can write one that
//! names any host file as a disk. So a manifest also carries `"mac":
//! "hmac-sha256:..."` under the snapshot key of the VMM that wrote it (the
//! user's, `--snapshot-key-file`, by default made once at
//! `~/.config/vireo/snapshot.key`), and a restore opens the disks a
//! manifest names only if the manifest verifies under the restoring VMM's
//! key, or if the person restoring names those same disks themselves
//! (`vireo restore --disk PATH`, `disks` in `vm.restore`). A snapshot made
//! by another user, under another key, or edited, thus restores only over
//! disks its restorer chose ([`check_disks_named`]).
//!
//! Devices are saved by walking a [`DeviceList`]: every device with state,
//! in the order the VM builds them, each through `devices::Persist` (one
//! state type per device). The manifest keeps them as one ordered list of
//! kind-tagged states ([`DeviceState`]); a restore walks the new VM's list
//! against it, so a device added to the list is saved and restored with no
//! further code, and a snapshot of a VM with other devices is refused
//! naming the kind that differs.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use std::sync::{Arc, Mutex};

use devices::{Persist, PersistError};
use hypervisor::GuestRam;
use serde::{Deserialize, Serialize};
use vm_memory::bitmap::NewBitmap;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap, MmapRegion,
};

use crate::VmmError;

/// Bumped whenever the manifest's meaning changes; restore refuses others.
/// 2: checksummed envelope, the engine's state, virtio devices, sparse memory.
/// 3: devices saved as one list walked in order, each tagged with its kind.
pub const SNAPSHOT_VERSION: u32 = 3;
pub const MANIFEST: &str = "manifest.json";
pub const MEMORY_FILE: &str = "memory.bin";

/// One guest RAM range and where its bytes are in the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRange {
    pub gpa: u64,
    pub len: u64,
    pub file_offset: u64,
}

/// Every device's saved state, in the order the VM walks its devices
/// ([`DeviceList`]): legacy devices first, then the PCI functions.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DeviceStates(pub Vec<SavedDevice>);

impl DeviceStates {
    /// The virtio functions' states, in the order the VM adds them.
    pub fn virtio(&self) -> impl Iterator<Item = &virtio::VirtioPciState> {
        self.0.iter().filter_map(|d| match &d.state {
            DeviceState::Virtio(v) => Some(v),
            _ => None,
        })
    }
}

/// One device in a snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedDevice {
    /// What the VM called it (informational, and named in errors).
    pub name: String,
    pub state: DeviceState,
}

/// Declares [`DeviceState`], one variant per kind of device the VMM
/// saves, and ties each device type to its variant through [`Kind`].
macro_rules! device_kinds {
    ($($variant:ident($ty:ty) = $kind:literal),* $(,)?) => {
        /// A device's [`Persist`] state, tagged with its kind.
        // Built once per device per snapshot and serialized at once: boxing
        // the large virtio variant would save nothing that matters.
        #[allow(clippy::large_enum_variant)]
        #[derive(Debug, Clone, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum DeviceState {
            $($variant(<$ty as Persist>::State),)*
        }

        impl DeviceState {
            /// The kind of device this state is for.
            pub fn kind(&self) -> &'static str {
                match self {
                    $(DeviceState::$variant(_) => $kind,)*
                }
            }
        }

        $(impl Kind for $ty {
            const KIND: &'static str = $kind;
            fn wrap(state: Self::State) -> DeviceState {
                DeviceState::$variant(state)
            }
            fn pick(state: &DeviceState) -> Option<&Self::State> {
                match state {
                    DeviceState::$variant(s) => Some(s),
                    #[allow(unreachable_patterns)]
                    _ => None,
                }
            }
        })*
    };
}

device_kinds! {
    Serial(devices::serial::Serial) = "serial",
    I8042(devices::i8042::I8042) = "i8042",
    Rtc(devices::rtc::CmosRtc) = "rtc",
    AcpiPm(devices::acpi::AcpiPm) = "acpi-pm",
    ResetControl(devices::acpi::ResetControl) = "reset-control",
    PciConfigIo(pci::PciConfigIo) = "pci-config-io",
    Virtio(virtio::VirtioPciDevice) = "virtio",
    FwCfg(devices::fw_cfg::FwCfg) = "fw-cfg",
    PvPanic(pci::pvpanic::PvPanic) = "pvpanic",
}

/// A device type the VMM can save: its [`Persist`] state is one
/// [`DeviceState`] variant.
pub trait Kind: Persist {
    /// What errors and [`DeviceState::kind`] call this kind of device.
    const KIND: &'static str;
    fn wrap(state: Self::State) -> DeviceState;
    fn pick(state: &DeviceState) -> Option<&Self::State>;
}

/// The object-safe face of a shared [`Persist`] device, so that devices of
/// every type sit in one [`DeviceList`].
trait SharedDevice: Send + Sync {
    fn save(&self) -> Result<DeviceState, PersistError>;
    /// `None` when `state` is another kind's.
    fn restore(&self, state: &DeviceState) -> Option<Result<(), PersistError>>;
}

impl<T: Kind + Send> SharedDevice for Mutex<T> {
    fn save(&self) -> Result<DeviceState, PersistError> {
        lock(self).save().map(T::wrap)
    }

    fn restore(&self, state: &DeviceState) -> Option<Result<(), PersistError>> {
        T::pick(state).map(|s| lock(self).restore(s))
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Every device a VM saves, in a fixed order: saving and restoring walk it
/// rather than naming devices one by one, so a device added to the list is
/// in every snapshot and migration.
#[derive(Default)]
pub struct DeviceList {
    devices: Vec<ListedDevice>,
}

struct ListedDevice {
    name: String,
    kind: &'static str,
    dev: Arc<dyn SharedDevice>,
}

impl DeviceList {
    pub fn push<T: Kind + Send + 'static>(&mut self, name: impl Into<String>, dev: Arc<Mutex<T>>) {
        self.devices.push(ListedDevice {
            name: name.into(),
            kind: T::KIND,
            dev,
        });
    }

    /// Every device's state; devices must be quiesced (virtio queue
    /// processing stopped), or their save refuses.
    pub fn save(&self) -> Result<DeviceStates, VmmError> {
        self.devices
            .iter()
            .map(|ListedDevice { name, dev, .. }| {
                let state = dev.save().map_err(|source| VmmError::DeviceSave {
                    device: name.clone(),
                    source,
                })?;
                Ok(SavedDevice {
                    name: name.clone(),
                    state,
                })
            })
            .collect::<Result<_, _>>()
            .map(DeviceStates)
    }

    /// Load `saved` into this VM's devices. The snapshot must hold the
    /// same devices, of the same kinds in the same order, as this VM's
    /// configuration makes; each device validates its own state. A refusal
    /// leaves the devices before it restored: the caller discards the VM.
    pub fn restore(&self, saved: &DeviceStates) -> Result<(), VmmError> {
        // Kinds are counted first, so that a snapshot of a VM configured
        // otherwise says which kind of device differs.
        let mut kinds: Vec<&'static str> = Vec::new();
        let all = saved
            .0
            .iter()
            .map(|d| d.state.kind())
            .chain(self.devices.iter().map(|e| e.kind));
        for kind in all {
            if !kinds.contains(&kind) {
                kinds.push(kind);
            }
        }
        for kind in kinds {
            let has = saved.0.iter().filter(|d| d.state.kind() == kind).count();
            let makes = self.devices.iter().filter(|e| e.kind == kind).count();
            if has != makes {
                return Err(VmmError::Snapshot(format!(
                    "the snapshot has {has} {kind} devices, its configuration makes {makes}"
                )));
            }
        }
        for (i, (s, e)) in saved.0.iter().zip(&self.devices).enumerate() {
            match e.dev.restore(&s.state) {
                Some(Ok(())) => {}
                Some(Err(source)) => {
                    return Err(VmmError::DeviceRestore {
                        device: e.name.clone(),
                        source,
                    })
                }
                None => {
                    return Err(VmmError::Snapshot(format!(
                        "snapshot device {i} is a {} ({}), this VM has a {} ({}) there",
                        s.state.kind(),
                        s.name,
                        e.kind,
                        e.name
                    )))
                }
            }
        }
        Ok(())
    }
}

/// The manifest proper (inside the checksummed envelope).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// The Vireo that wrote it (informational).
    pub vireo: String,
    /// The accelerator that made the snapshot. Another restores it if the
    /// CPU features (`cpuid`) and TSC rate (`tsc_khz`) allow.
    pub accel: hypervisor::AccelKind,
    pub memory_bytes: u64,
    pub vcpus: u32,
    /// The settings the VM was started with, when known.
    pub config: Option<crate::VmConfig>,
    pub memory: Vec<MemoryRange>,
    /// Exact size of `memory.bin`.
    pub memory_file_bytes: u64,
    pub vcpu_states: Vec<hypervisor::VcpuSnapshot>,
    pub vm_state: hypervisor::VmSnapshot,
    pub devices: DeviceStates,
    /// The CPUID leaves the guest saw (vCPU 0; absent in snapshots of
    /// older Vireos, which then restore only under their own accelerator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpuid: Option<Vec<hypervisor::CpuidEntry>>,
    /// The rate the guest's TSC ran at, in kHz.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tsc_khz: Option<u32>,
}

impl Manifest {
    /// Refuse a manifest whose parts contradict each other (or the
    /// configuration it carries) before anything is built from it.
    pub fn check(&self) -> Result<(), VmmError> {
        let bad = |what: String| Err(VmmError::Snapshot(format!("snapshot manifest: {what}")));
        // The limits `vm.create` holds a new VM to hold a restored or
        // received one too (a sparse 8 TiB memory file costs nothing to
        // forge).
        crate::config::check_size(self.memory_bytes, self.vcpus)
            .map_err(|e| VmmError::Snapshot(format!("snapshot manifest: {e}")))?;
        if let Some(c) = &self.config {
            c.validate()
                .map_err(|e| VmmError::Snapshot(format!("snapshot manifest: {e}")))?;
        }
        if self.vcpu_states.len() != self.vcpus as usize || self.vcpus == 0 {
            return bad(format!(
                "{} vCPU states for {} vCPUs",
                self.vcpu_states.len(),
                self.vcpus
            ));
        }
        if let Some(s) = self.vcpu_states.iter().find(|s| s.accel() != self.accel) {
            return bad(format!(
                "a vCPU state from --accel {} in a --accel {} snapshot",
                s.accel(),
                self.accel
            ));
        }
        if self.vm_state.accel() != self.accel {
            return bad(format!(
                "VM state from --accel {} in a --accel {} snapshot",
                self.vm_state.accel(),
                self.accel
            ));
        }
        let mut offset = 0u64;
        let mut want = arch::ram_regions(self.memory_bytes);
        // A firmware-booted VM's memory also holds the BIOS image's region
        // below 4 GiB, after the RAM (crate::firmware).
        if self.config.as_ref().is_some_and(|c| c.firmware.is_some()) {
            if let Some(r) = self.memory.get(want.len()) {
                if crate::firmware::is_image_region(r.gpa, r.len) {
                    want.push((vm_memory::GuestAddress(r.gpa), r.len as usize));
                }
            }
        }
        let same_layout = want.len() == self.memory.len()
            && want.iter().zip(&self.memory).all(|((gpa, len), r)| {
                let ok = r.gpa == gpa.0 && r.len == *len as u64 && r.file_offset == offset;
                offset = offset.saturating_add(r.len);
                ok
            });
        if !same_layout || offset != self.memory_file_bytes {
            return bad(format!(
                "its memory ranges do not lay out {} MiB of RAM in a {}-byte file",
                self.memory_bytes >> 20,
                self.memory_file_bytes
            ));
        }
        if let Some(c) = &self.config {
            if c.memory.0 != self.memory_bytes || c.cpus != self.vcpus {
                return bad(format!(
                    "its configuration says {} MiB and {} vCPUs, its state {} MiB and {} vCPUs",
                    c.memory.0 >> 20,
                    c.cpus,
                    self.memory_bytes >> 20,
                    self.vcpus
                ));
            }
        }
        Ok(())
    }
}

/// What `manifest.json` holds: the version, a checksum of the manifest's
/// bytes, their MAC under the writer's snapshot key (if it had one), and
/// the manifest.
#[derive(Serialize, Deserialize)]
struct Envelope<'a> {
    version: u32,
    checksum: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mac: Option<String>,
    #[serde(borrow)]
    manifest: &'a serde_json::value::RawValue,
}

/// 64-bit FNV-1a: enough to catch accidental damage and edits.
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn checksum(bytes: &[u8]) -> String {
    format!("fnv1a64:{:016x}", fnv1a64(bytes))
}

fn io_err(op: &'static str, path: &Path, source: std::io::Error) -> VmmError {
    VmmError::File {
        op,
        path: path.to_path_buf(),
        source,
    }
}

const PAGE: usize = 4096;

/// Which pages of `[host, host + len)` were ever touched: per page, false
/// only if /proc/self/pagemap says neither present nor swapped (an
/// anonymous page never written reads as zero). `None` if pagemap cannot
/// be read.
pub(crate) fn touched_pages(host: usize, len: usize) -> Option<Vec<bool>> {
    let f = File::open("/proc/self/pagemap").ok()?;
    let pages = len / PAGE;
    let mut touched = Vec::with_capacity(pages);
    let mut buf = vec![0u8; 8 * 65536];
    let mut done = 0;
    while done < pages {
        let n = (pages - done).min(65536);
        let at = ((host / PAGE + done) * 8) as u64;
        f.read_exact_at(&mut buf[..n * 8], at).ok()?;
        touched.extend(buf[..n * 8].chunks_exact(8).map(|e| {
            let v = u64::from_le_bytes(e.try_into().unwrap_or([0xff; 8]));
            // Bit 63: present, bit 62: swapped.
            v & (3 << 62) != 0
        }));
        done += n;
    }
    Some(touched)
}

pub(crate) fn is_zero(page: &[u8]) -> bool {
    // SAFETY: any byte pattern is a valid u64.
    let (pre, mid, post) = unsafe { page.align_to::<u64>() };
    pre.iter().all(|&b| b == 0)
        && post.iter().all(|&b| b == 0)
        && mid.iter().fold(0u64, |a, &w| a | w) == 0
}

/// What [`write_memory`] did.
pub struct MemoryWritten {
    pub ranges: Vec<MemoryRange>,
    /// Size of the file (all of guest RAM).
    pub file_bytes: u64,
    /// Bytes of data actually written (the rest are holes).
    pub data_bytes: u64,
}

/// Write guest memory to `dir/memory.bin`, sparsely: zero pages, and pages
/// of anonymous memory the guest never touched, are left as holes.
pub fn write_memory(mem: &GuestRam, dir: &SnapshotDir) -> Result<MemoryWritten, VmmError> {
    write_memory_with(mem, dir, &mut |_, _| {})
}

/// [`write_memory`], telling `progress` (memory covered, bytes written)
/// every 16 MiB of guest memory.
pub fn write_memory_with(
    mem: &GuestRam,
    dir: &SnapshotDir,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<MemoryWritten, VmmError> {
    let path = dir.path().join(MEMORY_FILE);
    let f = dir.new_file(MEMORY_FILE)?;
    let mut ranges = Vec::new();
    let mut offset = 0u64;
    // A cell: the flush closure adds to it while the loop reads it.
    let data_bytes = std::cell::Cell::new(0u64);
    for region in mem.iter() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| VmmError::GuestMemory {
                what: "guest memory".into(),
                source: Box::new(e),
            })?;
        let len = region.len() as usize;
        // SAFETY: the region maps `len` bytes at `host` for the VM's
        // lifetime; the vCPUs are paused and the device workers stopped,
        // so nothing writes it meanwhile.
        let bytes = unsafe { std::slice::from_raw_parts(host as *const u8, len) };
        // A region mapped from an earlier snapshot's file has data in pages
        // this process never touched: only anonymous memory can skip them.
        let touched = if region.file_offset().is_none() && (host as usize).is_multiple_of(PAGE) {
            touched_pages(host as usize, len)
        } else {
            None
        };
        let mut run: Option<usize> = None;
        let flush = |start: usize, end: usize| -> Result<(), VmmError> {
            f.write_all_at(&bytes[start..end], offset + start as u64)
                .map_err(|e| io_err("cannot write", &path, e))?;
            data_bytes.set(data_bytes.get() + (end - start) as u64);
            Ok(())
        };
        for (i, page) in bytes.chunks(PAGE).enumerate() {
            if i % 4096 == 4095 {
                progress(4096 * PAGE as u64, data_bytes.get());
            }
            let skip = touched
                .as_ref()
                .is_some_and(|t| !t.get(i).copied().unwrap_or(true))
                || is_zero(page);
            match (skip, run) {
                (false, None) => run = Some(i * PAGE),
                (true, Some(start)) => {
                    flush(start, i * PAGE)?;
                    run = None;
                }
                _ => {}
            }
        }
        if let Some(start) = run {
            flush(start, len)?;
        }
        ranges.push(MemoryRange {
            gpa: region.start_addr().0,
            len: region.len(),
            file_offset: offset,
        });
        offset += region.len();
    }
    f.set_len(offset)
        .map_err(|e| io_err("cannot size", &path, e))?;
    f.sync_all().map_err(|e| io_err("cannot sync", &path, e))?;
    Ok(MemoryWritten {
        ranges,
        file_bytes: offset,
        data_bytes: data_bytes.get(),
    })
}

/// Guest memory mapped privately (copy-on-write) from a snapshot's file.
pub fn map_memory(
    dir: &Path,
    ranges: &[MemoryRange],
    file_bytes: u64,
) -> Result<GuestRam, VmmError> {
    let path = dir.join(MEMORY_FILE);
    let file = File::open(&path).map_err(|e| io_err("cannot open", &path, e))?;
    let file_len = file
        .metadata()
        .map_err(|e| io_err("cannot stat", &path, e))?
        .len();
    if file_len != file_bytes {
        return Err(VmmError::Snapshot(format!(
            "snapshot memory file {} is {file_len} bytes, its manifest says {file_bytes}",
            path.display()
        )));
    }
    let mut regions = Vec::new();
    for r in ranges {
        if r.file_offset
            .checked_add(r.len)
            .is_none_or(|end| end > file_len)
        {
            return Err(VmmError::Snapshot(format!(
                "snapshot memory file {} is shorter than its manifest says",
                path.display()
            )));
        }
        let fo = FileOffset::new(
            file.try_clone()
                .map_err(|e| io_err("cannot open", &path, e))?,
            r.file_offset,
        );
        // The bitmap sized to the region: device writes mark it (see
        // `hypervisor::GuestRam`); a default bitmap would track nothing.
        let mmap = vm_memory::mmap::MmapRegionBuilder::new_with_bitmap(
            r.len as usize,
            hypervisor::RamBitmap::with_len(r.len as usize),
        )
        .with_file_offset(fo)
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
        .build()
        .map_err(|e| VmmError::GuestMemory {
            what: format!("cannot map {}", path.display()),
            source: Box::new(e),
        })?;
        let region: MmapRegion<hypervisor::RamBitmap> = mmap;
        let region = GuestRegionMmap::new(region, GuestAddress(r.gpa))
            .ok_or_else(|| VmmError::Snapshot(format!("bad memory range {:#x}", r.gpa)))?;
        regions.push(region);
    }
    GuestRam::from_regions(regions)
        .map_err(|e| VmmError::Snapshot(format!("snapshot memory ranges: {e}")))
}

/// Write the manifest into a new snapshot directory.
pub fn write_manifest(dir: &SnapshotDir, m: &Manifest) -> Result<(), VmmError> {
    let text = manifest_bytes(m)?;
    let path = dir.path().join(MANIFEST);
    let mut f = dir.new_file(MANIFEST)?;
    f.write_all(&text)
        .and_then(|_| f.sync_all())
        .map_err(|e| io_err("cannot write", &path, e))
}

/// Write a manifest at `dir/manifest.json` where there is none, the same
/// way (exclusive, no links, 0600) but without the directory's checks: for
/// tools and tests that edit a snapshot.
pub fn rewrite_manifest(dir: &Path, m: &Manifest) -> Result<(), VmmError> {
    use std::os::unix::fs::OpenOptionsExt;
    let text = manifest_bytes(m)?;
    let path = dir.join(MANIFEST);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| io_err("cannot create", &path, e))?;
    f.write_all(&text)
        .and_then(|_| f.sync_all())
        .map_err(|e| io_err("cannot write", &path, e))
}

/// What a manifest's MAC is computed over, with its bytes.
const MAC_CONTEXT: &[u8] = b"vireo snapshot manifest v3";

static SNAPSHOT_KEY: std::sync::RwLock<Option<crate::auth::Key>> = std::sync::RwLock::new(None);

/// The key this process signs the snapshots it writes with, and verifies
/// the ones it restores under (set once by the binary).
pub fn set_snapshot_key(key: Option<crate::auth::Key>) {
    *SNAPSHOT_KEY.write().unwrap_or_else(|e| e.into_inner()) = key;
}

fn snapshot_key() -> Option<crate::auth::Key> {
    SNAPSHOT_KEY
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

fn mac_of(key: &crate::auth::Key, raw: &str) -> String {
    format!(
        "hmac-sha256:{}",
        crate::auth::hex(&key.tag(&[MAC_CONTEXT, raw.as_bytes()]))
    )
}

fn manifest_bytes(m: &Manifest) -> Result<Vec<u8>, VmmError> {
    let unwritable = |source| VmmError::Serialize {
        what: "manifest".into(),
        source,
    };
    let body = serde_json::to_string(m).map_err(unwritable)?;
    let raw = serde_json::value::RawValue::from_string(body).map_err(unwritable)?;
    serde_json::to_vec(&Envelope {
        version: SNAPSHOT_VERSION,
        checksum: checksum(raw.get().as_bytes()),
        mac: snapshot_key().map(|k| mac_of(&k, raw.get())),
        manifest: &raw,
    })
    .map_err(unwritable)
}

pub fn read_manifest(dir: &Path) -> Result<Manifest, VmmError> {
    read_signed_manifest(dir).map(|(m, _)| m)
}

/// The manifest, and whether it verifies under this process's snapshot
/// key (it was written by a VMM holding that key, and not edited since).
pub fn read_signed_manifest(dir: &Path) -> Result<(Manifest, bool), VmmError> {
    let path = dir.join(MANIFEST);
    // A missing or unreadable manifest means DIR is not a snapshot: the
    // caller's input, not a host failure.
    let text = std::fs::read(&path).map_err(|source| VmmError::NotASnapshot {
        dir: dir.to_path_buf(),
        manifest: path.clone(),
        source,
    })?;
    // Look at the version first, so an old or new snapshot gets a clear
    // message rather than a field-level parse error.
    let version = serde_json::from_slice::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("version").and_then(|v| v.as_u64()));
    match version {
        Some(v) if v == SNAPSHOT_VERSION as u64 => {}
        Some(v) => {
            return Err(VmmError::Snapshot(format!(
                "snapshot {} has version {v}; this Vireo reads version {SNAPSHOT_VERSION}",
                dir.display()
            )))
        }
        None => {
            return Err(VmmError::Snapshot(format!(
                "{} is not a Vireo snapshot manifest",
                path.display()
            )))
        }
    }
    let env: Envelope = serde_json::from_slice(&text).map_err(|source| VmmError::BadState {
        what: format!("bad snapshot manifest {}", path.display()),
        source,
    })?;
    let sum = checksum(env.manifest.get().as_bytes());
    if env.checksum != sum {
        return Err(VmmError::Snapshot(format!(
            "snapshot manifest {} is damaged or was edited: checksum {} recorded, {sum} computed",
            path.display(),
            env.checksum
        )));
    }
    let m: Manifest =
        serde_json::from_str(env.manifest.get()).map_err(|source| VmmError::BadState {
            what: format!("bad snapshot manifest {}", path.display()),
            source,
        })?;
    m.check()?;
    let signed = match (snapshot_key(), &env.mac) {
        (Some(k), Some(mac)) => {
            let tag = mac
                .strip_prefix("hmac-sha256:")
                .and_then(crate::auth::unhex)
                .unwrap_or_default();
            k.verify(&[MAC_CONTEXT, env.manifest.get().as_bytes()], &tag)
        }
        _ => false,
    };
    Ok((m, signed))
}

/// The disk files a manifest names, in order.
pub fn disk_files(m: &Manifest) -> Vec<PathBuf> {
    m.devices
        .virtio()
        .filter_map(|v| match &v.device {
            virtio::DeviceState::Block(b) => Some(b.path.clone()),
            _ => None,
        })
        .collect()
}

/// A restore may open the host files a snapshot names as disks only if the
/// snapshot is `signed` under the restorer's key, or if the restorer
/// `named` the same files, in order. Refused otherwise, naming them.
pub fn check_disks_named(
    dir: &Path,
    m: &Manifest,
    signed: bool,
    named: &[PathBuf],
) -> Result<(), VmmError> {
    let disks = disk_files(m);
    if signed && named.is_empty() {
        return Ok(());
    }
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if named.len() == disks.len() && disks.iter().zip(named).all(|(d, n)| same(d, n)) {
        return Ok(());
    }
    let list = disks
        .iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    if !named.is_empty() {
        return Err(VmmError::Snapshot(format!(
            "snapshot {}: the disks named to restore it are not the ones it was taken with ({list}), in order",
            dir.display()
        )));
    }
    if disks.is_empty() {
        return Ok(());
    }
    Err(VmmError::Snapshot(format!(
        "snapshot {} is not signed with this VMM's snapshot key (another user's or key's snapshot, or edited) \
         and names host files as its disks: {list}. If you trust it, name them to restore it: --disk PATH for each, in order",
        dir.display()
    )))
}

/// A directory a snapshot is being written into: new (made 0700 by us) or
/// empty, owned by this user and writable by nobody else. Files are made
/// through the directory's descriptor, exclusively (O_EXCL), without
/// following links (O_NOFOLLOW) and 0600 (guest RAM is secret), so a link
/// or file planted in the directory makes the snapshot fail rather than
/// write through it, and a directory renamed away meanwhile is not
/// followed either.
pub struct SnapshotDir {
    path: PathBuf,
    dir: File,
}

/// open(2) flags for a snapshot file made inside a [`SnapshotDir`].
const NEW_FILE_FLAGS: libc::c_int =
    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;

impl SnapshotDir {
    /// Make `dir` ready for a snapshot, or say why it cannot hold one.
    pub fn create(dir: &Path) -> Result<Self, VmmError> {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt};
        let refuse =
            |why: String| VmmError::Config(format!("snapshot directory {}: {why}", dir.display()));
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| io_err("cannot create", parent, e))?;
        }
        match std::fs::DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("cannot create", dir, e)),
        }
        let c = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(dir.as_os_str()))
            .map_err(|_| refuse("the path holds a NUL byte".into()))?;
        // SAFETY: c is a valid NUL-terminated path; the result is checked.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ELOOP) || e.raw_os_error() == Some(libc::ENOTDIR) {
                return Err(refuse("is not a directory (a symbolic link?)".into()));
            }
            return Err(io_err("cannot open", dir, e));
        }
        // SAFETY: fd is a new descriptor nobody else owns.
        let file = unsafe { <File as std::os::unix::io::FromRawFd>::from_raw_fd(fd) };
        let m = file.metadata().map_err(|e| io_err("cannot stat", dir, e))?;
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if m.uid() != me {
            return Err(refuse(format!(
                "is owned by user {}, not by the user writing the snapshot ({me})",
                m.uid()
            )));
        }
        if m.mode() & 0o022 != 0 {
            return Err(refuse(format!(
                "is writable by other users (mode {:o})",
                m.mode() & 0o777
            )));
        }
        let mut entries = std::fs::read_dir(dir).map_err(|e| io_err("cannot read", dir, e))?;
        if dir
            .join(MANIFEST)
            .symlink_metadata()
            .is_ok_and(|m| m.is_file())
        {
            return Err(VmmError::Config(format!(
                "{} already holds a snapshot",
                dir.display()
            )));
        }
        if let Some(entry) = entries.next() {
            let name = entry
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .unwrap_or_default();
            return Err(refuse(format!("is not empty (it holds {name})")));
        }
        Ok(SnapshotDir {
            path: dir.to_path_buf(),
            dir: file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A new file `name` in the directory: exclusive, no links, 0600.
    pub fn new_file(&self, name: &str) -> Result<File, VmmError> {
        use std::os::unix::io::{AsRawFd, FromRawFd};
        let path = self.path.join(name);
        let c = std::ffi::CString::new(name)
            .map_err(|_| VmmError::Config(format!("bad snapshot file name {name:?}")))?;
        // SAFETY: the directory descriptor is open for self's lifetime and
        // c is a valid NUL-terminated name; the result is checked.
        let fd = unsafe { libc::openat(self.dir.as_raw_fd(), c.as_ptr(), NEW_FILE_FLAGS, 0o600) };
        if fd < 0 {
            return Err(io_err(
                "cannot create",
                &path,
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: fd is a new descriptor nobody else owns.
        Ok(unsafe { File::from_raw_fd(fd) })
    }
}

/// A new snapshot directory (see [`SnapshotDir`]).
pub fn prepare_dir(dir: &Path) -> Result<SnapshotDir, VmmError> {
    SnapshotDir::create(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use vm_memory::Bytes;

    /// Two devices that need no host resources, as a VM lists them.
    fn legacy_list() -> (
        DeviceList,
        Arc<Mutex<devices::i8042::I8042>>,
        Arc<Mutex<devices::acpi::ResetControl>>,
    ) {
        let events: devices::EventSink = Arc::new(|_| {});
        let kbd = Arc::new(Mutex::new(devices::i8042::I8042::new(events.clone(), None)));
        let reset = Arc::new(Mutex::new(devices::acpi::ResetControl::new(events)));
        let mut list = DeviceList::default();
        list.push("i8042", kbd.clone());
        list.push("reset-control", reset.clone());
        (list, kbd, reset)
    }

    #[test]
    fn device_list_round_trips_through_json_in_order() {
        let (list, kbd, reset) = legacy_list();
        devices::BusDevice::write(&mut *kbd.lock().unwrap(), 0, &[0xf4]);
        devices::BusDevice::write(&mut *reset.lock().unwrap(), 0, &[0x02]);
        let saved = list.save().unwrap();
        let kinds: Vec<_> = saved.0.iter().map(|d| d.state.kind()).collect();
        assert_eq!(kinds, ["i8042", "reset-control"]);
        let json = serde_json::to_string(&saved).unwrap();
        let back: DeviceStates = serde_json::from_str(&json).unwrap();
        let (other, kbd2, reset2) = legacy_list();
        other.restore(&back).unwrap();
        assert_eq!(
            kbd2.lock().unwrap().save().unwrap(),
            kbd.lock().unwrap().save().unwrap()
        );
        assert_eq!(reset2.lock().unwrap().save().unwrap().value, 0x02);
    }

    #[test]
    fn device_list_refuses_other_devices_and_bad_states() {
        let (list, _, _) = legacy_list();
        let saved = list.save().unwrap();
        // One device fewer: the kind that differs is named.
        let fewer = DeviceStates(saved.0[..1].to_vec());
        let e = list.restore(&fewer).unwrap_err().to_string();
        assert!(
            e.contains("the snapshot has 0 reset-control devices, its configuration makes 1"),
            "{e}"
        );
        // The same kinds in another order.
        let swapped = DeviceStates(vec![saved.0[1].clone(), saved.0[0].clone()]);
        let e = list.restore(&swapped).unwrap_err().to_string();
        assert!(
            e.contains("snapshot device 0 is a reset-control (reset-control), this VM has a i8042 (i8042) there"),
            "{e}"
        );
        // A state the device refuses: the device and the reason are named.
        let mut bad = saved.clone();
        if let DeviceState::I8042(s) = &mut bad.0[0].state {
            s.kbd_queue = (0..10_000)
                .map(|_| devices::i8042::OutputByte {
                    value: 0,
                    aux: false,
                    timeout: false,
                    from_kbd: true,
                })
                .collect();
        }
        let e = list.restore(&bad).unwrap_err().to_string();
        assert!(e.contains("snapshot i8042: invalid i8042 state"), "{e}");
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vireo-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn memory_is_written_sparsely_and_maps_back_the_same_twice_over() {
        let dir = scratch("sparse");
        let size = 64usize << 20;
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), size)]).unwrap();
        // A few pages with data, one written with zeros, the rest untouched.
        mem.write_slice(b"first page", GuestAddress(0)).unwrap();
        mem.write_slice(&[0xaa; 8192], GuestAddress(0x10_0ffc))
            .unwrap();
        mem.write_slice(&[0u8; 4096], GuestAddress(0x20_0000))
            .unwrap();
        mem.write_slice(b"last", GuestAddress(size as u64 - 4))
            .unwrap();
        let w = write_memory(&mem, &SnapshotDir::create(&dir).unwrap()).unwrap();
        assert_eq!(w.file_bytes, size as u64);
        // Data pages only: page 0, the 3 pages the 0xaa run touches, the last.
        assert_eq!(w.data_bytes, 5 * 4096);
        let meta = std::fs::metadata(dir.join(MEMORY_FILE)).unwrap();
        assert_eq!(meta.len(), size as u64);
        assert!(meta.blocks() * 512 < 1 << 20, "{} blocks", meta.blocks());

        let check = |m: &GuestRam| {
            let mut all = vec![0u8; size];
            m.read_slice(&mut all, GuestAddress(0)).unwrap();
            let mut want = vec![0u8; size];
            want[..10].copy_from_slice(b"first page");
            want[0x10_0ffc..0x10_2ffc].fill(0xaa);
            want[size - 4..].copy_from_slice(b"last");
            assert!(all == want, "memory differs after the round trip");
        };
        let back = map_memory(&dir, &w.ranges, w.file_bytes).unwrap();
        check(&back);
        // A restored VM's memory (mapped from the file) written again: pages
        // this process never touched still carry the file's data.
        let dir2 = scratch("sparse2");
        let w2 = write_memory(&back, &SnapshotDir::create(&dir2).unwrap()).unwrap();
        assert_eq!(w2.data_bytes, 5 * 4096);
        check(&map_memory(&dir2, &w2.ranges, w2.file_bytes).unwrap());
        let e = map_memory(&dir2, &w2.ranges, w2.file_bytes + 4096).unwrap_err();
        assert!(e.to_string().contains("its manifest says"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&dir2);
    }

    #[test]
    fn fnv1a64_matches_the_reference_values() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    /// Snapshot files are made 0600 in a directory we made 0700 or that
    /// is empty and ours; planted links, leftovers, a directory of another
    /// user or one others may write are refused and nothing is written
    /// through them.
    #[test]
    fn snapshot_files_are_private_and_never_follow_planted_links() {
        use std::os::unix::fs::PermissionsExt;
        let base = scratch("snapdir");
        let new = base.join("new");
        let d = SnapshotDir::create(&new).unwrap();
        let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&new), 0o700);
        drop(d.new_file(MEMORY_FILE).unwrap());
        assert_eq!(mode(&new.join(MEMORY_FILE)), 0o600);
        // A second snapshot into the same directory is refused.
        let e = SnapshotDir::create(&new).err().unwrap();
        assert!(e.to_string().contains("not empty"), "{e}");
        drop(d.new_file(MANIFEST).unwrap());
        let e = SnapshotDir::create(&new).err().unwrap();
        assert!(e.to_string().contains("already holds a snapshot"), "{e}");

        // Links planted before: the directory is not empty.
        let victim = base.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let planted = base.join("planted");
        std::fs::create_dir(&planted).unwrap();
        std::os::unix::fs::symlink(&victim, planted.join(MEMORY_FILE)).unwrap();
        let e = SnapshotDir::create(&planted).err().unwrap();
        assert!(e.to_string().contains("not empty"), "{e}");
        // Planted after the checks: the file is not made through the link.
        let empty = base.join("empty");
        std::fs::create_dir(&empty).unwrap();
        let d = SnapshotDir::create(&empty).unwrap();
        std::os::unix::fs::symlink(&victim, empty.join(MEMORY_FILE)).unwrap();
        let e = d.new_file(MEMORY_FILE).unwrap_err();
        assert!(e.to_string().contains("cannot create"), "{e}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");

        // The directory itself a link: refused.
        let link = base.join("link");
        std::os::unix::fs::symlink(&new, &link).unwrap();
        let e = SnapshotDir::create(&link).err().unwrap();
        assert!(e.to_string().contains("not a directory"), "{e}");

        // Writable by others (a shared /tmp-like directory): refused.
        let open = base.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = SnapshotDir::create(&open).err().unwrap();
        assert!(e.to_string().contains("writable by other users"), "{e}");

        // Another user's empty directory: refused (only root can make one
        // for this test).
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            let theirs = base.join("theirs");
            std::fs::create_dir(&theirs).unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
            let e = SnapshotDir::create(&theirs).err().unwrap();
            assert!(e.to_string().contains("is owned by user 65534"), "{e}");
        } else {
            eprintln!("SKIPPED: the other-user case needs root to chown a directory");
        }
        let _ = std::fs::remove_dir_all(&base);
    }
}
