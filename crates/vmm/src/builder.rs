//! Putting a VM together. One routine, `build`, makes every VM from a
//! `VmSpec`: the backend VM, guest memory (new, mapped from a snapshot
//! file, or already filled by a migration), the devices, the vCPUs, and
//! then either the boot image or the restored state. Launch, restore,
//! migration-receive and clone differ only in the spec they hand it
//! (`for_config`, `for_snapshot`, `for_migration`).
//!
//! Invariants: guest memory is mapped into the backend before any device
//! or vCPU exists; a VM is either booted (boot vCPU state from the image)
//! or restored (every vCPU and device from the saved state), never both;
//! nothing runs until `Vm::run`.

use std::fs::File;
use std::io::{Read, Write};
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};

use devices::{EventSink, VmEvent};
use hypervisor::{CpuState, GuestRam, Hypervisor};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::config::{Accel, BootProtocol, ConsoleKind, SerialMode, VmConfig};
use crate::control::VmControl;
use crate::device_manager::{DeviceManager, DeviceOutputs};
use crate::persist::{accel_of, prepare_accel, restore_spec};
use crate::vm::{Vm, VmHandle, VmInfo};
use crate::{CloneOptions, RestoreOptions, VmExit, VmmError};

/// How a raw test image is entered (tiny hand-assembled guests).
#[derive(Debug, Clone, Copy)]
pub enum RawMode {
    /// Real mode at CS:IP.
    Real { cs: u16, ip: u16 },
    /// Flat 32-bit protected mode, paging off.
    Protected { entry: u64 },
    /// 64-bit long mode with the low 4 GiB identity-mapped.
    Long { entry: u64 },
}

#[derive(Debug, Clone)]
pub struct RawBoot {
    pub load_addr: u64,
    pub image: Vec<u8>,
    pub mode: RawMode,
}

/// What the VM boots.
#[derive(Debug, Clone)]
pub enum Boot {
    Linux {
        kernel: std::path::PathBuf,
        initrd: Option<std::path::PathBuf>,
        cmdline: String,
        protocol: BootProtocol,
    },
    Raw(RawBoot),
    /// Boot through a BIOS image (SeaBIOS), which boots the first disk,
    /// or the kernel it is handed through fw_cfg.
    Firmware {
        image: std::path::PathBuf,
        kernel: Option<crate::firmware::FirmwareKernel>,
        /// What the SMBIOS tables name the machine.
        smbios: crate::firmware::SmbiosIds,
    },
    /// Resume a snapshot: memory from its file, state from its manifest.
    Snapshot(Box<SnapshotSource>),
}

#[derive(Debug, Clone)]
pub struct SnapshotSource {
    pub dir: std::path::PathBuf,
    pub manifest: crate::snapshot::Manifest,
    /// Guest memory already filled (a live migration's destination);
    /// `None` maps the snapshot directory's memory file.
    pub memory: Option<GuestRam>,
    /// Set when the state was converted from the other accelerator's.
    pub cross: Option<CrossRestore>,
    /// A backend VM already made with `memory` mapped into it (a live
    /// migration's destination makes it while pages stream in, so that
    /// the downtime does not include creating it).
    pub prepared: Option<PreparedVm>,
}

/// A backend VM created ahead of the rest, with guest memory mapped.
#[derive(Clone)]
pub struct PreparedVm {
    pub hv: Arc<dyn Hypervisor>,
    pub vm: Arc<dyn hypervisor::Vm>,
}

impl std::fmt::Debug for PreparedVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PreparedVm({})", self.hv.kind())
    }
}

impl PreparedVm {
    /// Create a VM under `accel` and map `memory` into it.
    pub fn new(accel: Accel, memory: &GuestRam) -> Result<Self, VmmError> {
        let hv = open_hypervisor(accel)?;
        let vm = hv.create_vm()?;
        map_guest_memory(vm.as_ref(), memory)?;
        Ok(PreparedVm { hv, vm })
    }
}

/// Map every region of `memory` into the backend VM, slot by slot.
fn map_guest_memory(vm: &dyn hypervisor::Vm, memory: &GuestRam) -> Result<(), VmmError> {
    use std::ops::Deref;
    for (slot, region) in memory.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| VmmError::GuestMemory {
                what: "guest memory region".into(),
                source: Box::new(e),
            })?;
        // SAFETY: the mapping is owned by `memory`, which the Vm keeps
        // for as long as the backend VM exists.
        unsafe {
            vm.map_memory(
                slot as u32,
                region.start_addr().0,
                region.len(),
                host as u64,
            )?;
        }
        // Devices' writes into the slot reach the backend from now on (a
        // software CPU drops code they overwrite); KVM answers None.
        if let Some(watch) = vm.device_write_watch(slot as u32) {
            region.deref().bitmap().set_watch(watch);
        }
    }
    Ok(())
}

/// What a restore under another accelerator than the snapshot's needs
/// (the guest is shown the CPUID the manifest records).
#[derive(Debug, Clone)]
pub struct CrossRestore {
    /// The rate the guest's TSC ran at (kHz), if recorded.
    pub tsc_khz: Option<u32>,
    /// Restore even if the destination runs the TSC at another rate.
    pub allow_tsc_change: bool,
}

/// Everything needed to build a VM, after the user's input has been checked.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub accel: Accel,
    /// The CPU a KVM guest is shown (the engine always shows its own).
    pub cpu_model: hypervisor::CpuModel,
    pub memory: u64,
    pub cpus: u32,
    pub boot: Boot,
    /// A virtio-rng device on PCI.
    pub rng: bool,
    /// virtio-blk disks on PCI.
    pub disks: Vec<crate::config::DiskConfig>,
    /// virtio-net NICs on PCI.
    pub nets: Vec<crate::config::NetConfig>,
    /// A virtio-balloon on PCI.
    pub balloon: Option<crate::config::BalloonConfig>,
    /// A virtio-vsock on PCI.
    pub vsock: Option<crate::config::VsockConfig>,
    /// virtio-fs devices (vhost-user) on PCI; guest memory is then a memfd
    /// the backends map.
    pub fs: Vec<crate::config::FsConfig>,
    /// The virtiofsd binary for `fs` entries with a directory.
    pub virtiofsd: Option<std::path::PathBuf>,
    /// Which device gets the console output (and input).
    pub console: ConsoleKind,
    /// The exit device for test kernels, if asked for.
    pub exit_device: Option<crate::config::ExitDeviceConfig>,
    /// The cloud-init seed file, the last of `disks`: kept until the
    /// devices have opened it, then removed (the open disk keeps its data).
    pub seed: Option<Arc<crate::cloud_init::SeedFile>>,
    /// The platform firmware expects (`crate::firmware`): an i440FX host
    /// bridge, fw_cfg, the BIOS image below 4 GiB. Set for a firmware boot
    /// and for the restore of one.
    pub firmware: bool,
    /// A pvpanic PCI device, if asked for.
    pub pvpanic: bool,
}

impl VmSpec {
    pub fn from_config(c: &VmConfig) -> Result<Self, VmmError> {
        c.validate()?;
        let mut disks = c.disks.clone();
        let seed = match &c.cloud_init {
            Some(ci) => {
                let file = crate::cloud_init::Seed::load(ci)
                    .and_then(|s| s.to_image())
                    .and_then(|img| {
                        crate::cloud_init::SeedFile::write_in(&std::env::temp_dir(), &img)
                    })
                    .map_err(|e| VmmError::Config(e.to_string()))?;
                disks.push(crate::config::DiskConfig {
                    path: file.path().to_path_buf(),
                    format: Some(block::ImageFormat::Raw),
                    readonly: true,
                    serial: Some("cidata".into()),
                    rate_limiter: None,
                    rate_group: None,
                    bootindex: None,
                });
                Some(Arc::new(file))
            }
            None => None,
        };
        Ok(VmSpec {
            accel: c.accel,
            cpu_model: c.cpu_model,
            memory: c.memory.0,
            cpus: c.cpus,
            rng: c.rng,
            disks,
            seed,
            nets: c.nets.clone(),
            balloon: c.balloon,
            vsock: c.vsock.clone(),
            fs: c.fs.clone(),
            virtiofsd: c.virtiofsd.clone(),
            console: c.console,
            exit_device: c.exit_device,
            pvpanic: c.pvpanic,
            firmware: c.firmware.is_some(),
            boot: match &c.firmware {
                Some(image) => Boot::Firmware {
                    image: image.clone(),
                    kernel: (!c.kernel.as_os_str().is_empty()).then(|| {
                        crate::firmware::FirmwareKernel {
                            kernel: c.kernel.clone(),
                            initrd: c.initrd.clone(),
                            cmdline: c.effective_cmdline(),
                        }
                    }),
                    smbios: crate::firmware::SmbiosIds::for_config(c)?,
                },
                None => Boot::Linux {
                    kernel: c.kernel.clone(),
                    initrd: c.initrd.clone(),
                    cmdline: c.effective_cmdline(),
                    protocol: c.boot,
                },
            },
        })
    }
}

/// The CPUID of `cpu_model = "portable"`: the software engine's, less
/// what this host's KVM (if it has a usable one) cannot offer.
pub fn portable_cpuid() -> Result<Vec<hypervisor::CpuidEntry>, VmmError> {
    let engine = emu::EmuHypervisor::new().supported_cpuid()?;
    let Some(kvm) = open_kvm().ok().and_then(|k| k.supported_cpuid().ok()) else {
        return Ok(engine);
    };
    Ok(hypervisor::cpuid::restrict(&engine, &kvm).0)
}

/// The KVM device node set by [`set_kvm_device`].
static KVM_DEVICE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Have every VM of this process open `path` instead of
/// [`hypervisor::kvm::DEFAULT_KVM_DEVICE`]: the embedder's choice (the
/// `vireo` binary's `VIREO_KVM_DEVICE`), made once before any VM exists.
/// False if a device was already set (the first one stays).
pub fn set_kvm_device(path: String) -> bool {
    KVM_DEVICE.set(path).is_ok()
}

/// The KVM device node this process uses.
pub fn kvm_device() -> &'static str {
    KVM_DEVICE
        .get()
        .map_or(hypervisor::kvm::DEFAULT_KVM_DEVICE, String::as_str)
}

/// The engine's translator settings set by [`set_engine_jit`].
static ENGINE_JIT: std::sync::OnceLock<emu::jit::JitConfig> = std::sync::OnceLock::new();

/// Have every engine VM of this process translate with `cfg` instead of
/// the default: the embedder's choice (the `vireo` binary's `VIREO_JIT` and
/// `VIREO_JIT_PERFMAP`), made once before any VM exists. False if settings
/// were already given (the first stay).
pub fn set_engine_jit(cfg: emu::jit::JitConfig) -> bool {
    ENGINE_JIT.set(cfg).is_ok()
}

/// The translator settings this process's engine VMs use.
fn engine_jit() -> emu::jit::JitConfig {
    ENGINE_JIT.get().copied().unwrap_or_default()
}

fn open_kvm() -> Result<hypervisor::kvm::KvmHypervisor, hypervisor::HypervisorError> {
    hypervisor::kvm::KvmHypervisor::open(kvm_device())
}

/// Pick and open the backend the user asked for.
pub fn open_hypervisor(accel: Accel) -> Result<Arc<dyn Hypervisor>, VmmError> {
    match resolve_accel(accel) {
        Accel::Kvm => Ok(Arc::new(open_kvm()?)),
        _ => Ok(Arc::new(emu::EmuHypervisor::with_jit(engine_jit()))),
    }
}

/// The accelerator `accel` means on this host: `auto` becomes KVM when it
/// is usable and fast, else the engine. (The jail resolves it before it
/// hides /dev and /sys.)
pub(crate) fn resolve_accel(accel: Accel) -> Accel {
    let kvm_available = || hypervisor::kvm::kvm_available_at(kvm_device());
    match accel {
        // KVM when it is usable and fast: on a nested PVM host it runs guest
        // kernels in an instruction emulator (README.md, "This machine's
        // KVM"), slower than Vireo's engine, so auto takes the engine there.
        Accel::Auto
            if kvm_available()
                && hypervisor::kvm::KvmFlavor::detect() == hypervisor::kvm::KvmFlavor::Hardware =>
        {
            Accel::Kvm
        }
        Accel::Auto if kvm_available() => {
            tracing::info!(
                "this host's KVM is nested (kvm_pvm) and slow for guest kernels: using Vireo's CPU engine; --accel kvm forces KVM"
            );
            Accel::Emu
        }
        Accel::Auto => Accel::Emu,
        other => other,
    }
}

/// Build the VM `spec` describes (not yet running); the console (COM1 or
/// the virtio console) writes to `console_out`.
pub(crate) fn build(spec: VmSpec, console_out: Box<dyn Write + Send>) -> Result<Vm, VmmError> {
    if spec.cpus == 0 {
        return Err(VmmError::Config("--cpus must be at least 1".into()));
    }
    let prepared = match &spec.boot {
        Boot::Snapshot(s) => s.prepared.clone(),
        _ => None,
    };
    let hv = match &prepared {
        Some(p) => p.hv.clone(),
        None => open_hypervisor(spec.accel)?,
    };
    let mut boot = spec.boot.clone();
    if let Boot::Linux { cmdline, .. } = &mut boot {
        add_guest_workarounds(hv.as_ref(), cmdline);
    }
    let vm = match &prepared {
        Some(p) => p.vm.clone(),
        None => hv.create_vm()?,
    };
    // The CPUID the guest is shown, unless the accelerator's own: a
    // guest restored under another accelerator, or a portable VM
    // restored, sees what it saw before; a new portable VM sees what
    // both accelerators offer.
    let portable = spec.cpu_model == hypervisor::CpuModel::Portable;
    let shown = match &boot {
        Boot::Snapshot(s) if s.cross.is_some() || portable => s.manifest.cpuid.clone(),
        Boot::Snapshot(_) => None,
        _ if portable => Some(portable_cpuid()?),
        _ => None,
    };
    if let Some(c) = shown {
        vm.set_guest_cpuid(&c)?;
    }

    // A firmware boot reads its image first: its size shapes guest memory.
    let firmware = match &boot {
        Boot::Firmware { image, kernel, .. } => Some(crate::firmware::read_image(
            image,
            &spec.disks,
            kernel.is_some(),
        )?),
        _ => None,
    };
    let memory = guest_memory(&boot, spec.memory, !spec.fs.is_empty(), firmware.as_ref())?;
    if prepared.is_none() {
        map_guest_memory(vm.as_ref(), &memory)?;
    }

    let (exit_tx, exit_rx) = channel();
    let events: EventSink = {
        let tx = Mutex::new(exit_tx.clone());
        Arc::new(move |e: VmEvent| {
            let exit = match e {
                VmEvent::PowerOff => VmExit::PowerOff,
                VmEvent::Reset => VmExit::Reset,
                VmEvent::GuestExit(value) => VmExit::GuestExit { value },
                VmEvent::GuestPanic { crash_loaded } => {
                    crate::events::guest_panic(crash_loaded);
                    if crash_loaded {
                        // kdump runs next in the guest: leave it running.
                        return;
                    }
                    VmExit::GuestPanic
                }
            };
            if let Ok(tx) = tx.lock() {
                let _ = tx.send(exit);
            }
        })
    };
    // A virtio console takes the host side; COM1 is then disconnected.
    let out = match spec.console {
        ConsoleKind::Serial => DeviceOutputs {
            serial: console_out,
            virtio_console: None,
            events,
        },
        ConsoleKind::Virtio => DeviceOutputs {
            serial: Box::new(std::io::sink()),
            virtio_console: Some(console_out),
            events,
        },
    };
    let mut devices = DeviceManager::new(&vm, &memory, &spec, out)?;
    // The seed disk is open: its file is no longer needed on the host.
    drop(spec.seed);

    // A restored VM's memory already holds everything: no boot image.
    let bsp_state = match &boot {
        Boot::Snapshot(_) => None,
        _ => match &firmware {
            Some(f) => Some(f.load(&memory)?),
            None => Some(load_boot(&memory, &boot, spec.cpus)?),
        },
    };
    let vcpus = crate::vcpu::create_vcpus(vm.as_ref(), spec.cpus, bsp_state.as_ref())?;
    let vcpu_counters = vcpus
        .iter()
        .map(|v| {
            let engine = crate::vm::lock(v).engine_counters();
            Arc::new(crate::counters::VcpuCounters::new(engine))
        })
        .collect();
    let info = VmInfo {
        state: crate::control::RunState::Running,
        accel: hv.kind(),
        memory_bytes: spec.memory,
        vcpus: spec.cpus,
        devices: devices.info().to_vec(),
    };
    let handle = Arc::new(VmHandle {
        vm,
        accel: hv.kind(),
        memory,
        memory_bytes: spec.memory,
        vcpus,
        control: VmControl::new(),
        monitor: crate::counters::VmMonitor {
            started: std::time::Instant::now(),
            vcpus: vcpu_counters,
            devices: devices.take_monitored(),
            progress: Default::default(),
        },
        devices,
    });
    if let Boot::Snapshot(snap) = &boot {
        handle.restore(&snap.manifest, snap.cross.as_ref())?;
    }
    Ok(Vm {
        info,
        handle,
        exit_tx,
        exit_rx,
        affinity: Default::default(),
    })
}

/// Append the guest arguments this host's backend needs (see
/// `Hypervisor::guest_workarounds`) unless the command line sets them.
fn add_guest_workarounds(hv: &dyn Hypervisor, cmdline: &mut String) {
    for arg in hv.guest_workarounds() {
        let key = arg.split('=').next().unwrap_or(&arg);
        if !cmdline
            .split_whitespace()
            .any(|a| a.split('=').next() == Some(key))
        {
            tracing::info!("this host's KVM needs the guest argument '{arg}'");
            cmdline.push(' ');
            cmdline.push_str(&arg);
        }
    }
}

/// The guest memory a VM starts with: a migration's (already filled), a
/// snapshot's memory file mapped, or new zeroed RAM in the PC layout (with
/// the firmware image's region for a firmware boot): anonymous, or with
/// `shared` one memfd mapped shared, so that another process (a vhost-user
/// backend) can map the same pages. Both accelerators take either: KVM and
/// the engine only see host addresses.
fn guest_memory(
    boot: &Boot,
    bytes: u64,
    shared: bool,
    firmware: Option<&crate::firmware::FirmwareImage>,
) -> Result<GuestRam, VmmError> {
    match boot {
        Boot::Snapshot(snap) => match &snap.memory {
            Some(m) => Ok(m.clone()),
            None => crate::snapshot::map_memory(
                &snap.dir,
                &snap.manifest.memory,
                snap.manifest.memory_file_bytes,
            ),
        },
        _ => {
            let mut regions = arch::ram_regions(bytes);
            if let Some(f) = firmware {
                regions.push(f.region());
            }
            if shared {
                return shared_memory(&regions, bytes);
            }
            GuestRam::from_ranges(&regions).map_err(|e| VmmError::GuestMemory {
                what: format!("cannot allocate {} MiB of guest memory", bytes >> 20),
                source: Box::new(e),
            })
        }
    }
}

/// New zeroed `regions` (of a VM of `bytes` of RAM) backed by one memfd,
/// each region at its own offset in it, mapped shared (vm-memory maps
/// file-backed regions MAP_SHARED).
fn shared_memory(regions: &[(GuestAddress, usize)], bytes: u64) -> Result<GuestRam, VmmError> {
    use std::os::fd::FromRawFd;
    let total: u64 = regions.iter().map(|r| r.1 as u64).sum();
    let err = |what: &str, e: std::io::Error| VmmError::GuestMemory {
        what: format!("{what} for {} MiB of shareable guest memory", bytes >> 20),
        source: Box::new(e),
    };
    // SAFETY: the name is a NUL-terminated string; the flags are valid.
    let fd = unsafe { libc::memfd_create(c"vireo-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(err("memfd_create", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(total)
        .map_err(|e| err("sizing the memfd", e))?;
    let file = Arc::new(file);
    let mut offset = 0u64;
    let ranges: Vec<_> = regions
        .iter()
        .map(|&(addr, len)| {
            let r = (
                addr,
                len,
                Some(vm_memory::FileOffset::from_arc(file.clone(), offset)),
            );
            offset += len as u64;
            r
        })
        .collect();
    GuestRam::from_ranges_with_files(&ranges).map_err(|e| VmmError::GuestMemory {
        what: format!("cannot map {} MiB of shareable guest memory", bytes >> 20),
        source: Box::new(e),
    })
}

/// Put the boot image into guest memory and return the boot vCPU's state.
fn load_boot(mem: &GuestRam, boot: &Boot, cpus: u32) -> Result<CpuState, VmmError> {
    match boot {
        Boot::Linux {
            kernel,
            initrd,
            cmdline,
            protocol,
        } => {
            let mut kf = File::open(kernel).map_err(|source| VmmError::File {
                op: "cannot open kernel",
                path: kernel.clone(),
                source,
            })?;
            let initrd_data = match initrd {
                Some(p) => Some(std::fs::read(p).map_err(|source| VmmError::File {
                    op: "cannot read initramfs",
                    path: p.clone(),
                    source,
                })?),
                None => None,
            };
            // A multiboot (v1) kernel boots as QEMU's -kernel boots it,
            // the initramfs becoming its one module.
            let mut head = Vec::with_capacity(8192);
            (&mut kf)
                .take(8192)
                .read_to_end(&mut head)
                .map_err(|source| VmmError::File {
                    op: "cannot read kernel",
                    path: kernel.clone(),
                    source,
                })?;
            if let Some(h) = arch::multiboot::find_header(&head) {
                let file = std::fs::read(kernel).map_err(|source| VmmError::File {
                    op: "cannot read kernel",
                    path: kernel.clone(),
                    source,
                })?;
                let name = initrd
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                let modules: Vec<_> = initrd_data
                    .as_deref()
                    .map(|data| arch::multiboot::Module {
                        data,
                        cmdline: &name,
                    })
                    .into_iter()
                    .collect();
                return Ok(arch::multiboot::load(
                    mem, &file, &h, cmdline, &modules, cpus,
                )?);
            }
            let image = arch::load_kernel(mem, &mut kf)?;
            let protocol = match protocol {
                BootProtocol::Linux => arch::EntryProtocol::Linux64,
                BootProtocol::Pvh => {
                    if image.pvh_entry.is_none() {
                        return Err(VmmError::Config(format!(
                            "--boot pvh: kernel {} has no PVH entry note",
                            kernel.display()
                        )));
                    }
                    arch::EntryProtocol::Pvh
                }
            };
            let cfg = arch::BootConfig {
                cmdline,
                initrd: initrd_data.as_deref(),
                num_cpus: cpus,
                protocol,
            };
            Ok(arch::configure_system(mem, &image, &cfg)?)
        }
        Boot::Snapshot(_) => Err(VmmError::Config(
            "a snapshot has no boot image to load".into(),
        )),
        Boot::Firmware { .. } => Err(VmmError::Config(
            "a firmware boot is loaded by crate::firmware".into(),
        )),
        Boot::Raw(raw) => {
            mem.write_slice(&raw.image, GuestAddress(raw.load_addr))
                .map_err(|e| {
                    VmmError::Config(format!("raw image does not fit in guest memory: {e}"))
                })?;
            Ok(match raw.mode {
                RawMode::Real { cs, ip } => arch::real_mode_state(cs, ip),
                RawMode::Protected { entry } => arch::protected_mode_state(mem, entry)?,
                RawMode::Long { entry } => arch::long_mode_state(mem, entry)?,
            })
        }
    }
}

/// A VM built and ready to run: the VM, whether the terminal feeds its
/// console, and the configuration it reports.
pub(crate) struct Built {
    pub vm: Vm,
    pub input: bool,
    pub config: Option<VmConfig>,
}

/// Where the console (serial or virtio) goes and whether the terminal feeds it.
fn console_output(mode: &SerialMode) -> Result<(Box<dyn Write + Send>, bool), VmmError> {
    Ok(match mode {
        SerialMode::Stdio => (Box::new(crate::console::RawStdout), true),
        SerialMode::File(p) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|source| VmmError::File {
                    op: "cannot open serial file",
                    path: p.clone(),
                    source,
                })?;
            (Box::new(f), false)
        }
        SerialMode::None => (Box::new(std::io::sink()), false),
    })
}

/// A new VM booting what `config` names.
pub(crate) fn for_config(config: &VmConfig) -> Result<Built, VmmError> {
    config.validate()?;
    let (out, input) = console_output(&config.serial)?;
    let mut vm = build(VmSpec::from_config(config)?, out)?;
    vm.set_cpu_affinity(config.cpu_affinity.clone());
    Ok(Built {
        vm,
        input,
        config: Some(config.clone()),
    })
}

/// The VM a snapshot directory holds, possibly under the other accelerator
/// and, with `clone`, with its own disk overlays and taps.
pub(crate) fn for_snapshot(
    dir: &std::path::Path,
    opts: RestoreOptions,
    clone: &CloneOptions,
    serial: &SerialMode,
) -> Result<Built, VmmError> {
    let (mut manifest, signed) = crate::snapshot::read_signed_manifest(dir)?;
    // Before any host file the manifest names is opened.
    crate::snapshot::check_disks_named(dir, &manifest, signed, &clone.disks)?;
    let what = format!("snapshot {}", dir.display());
    let (accel, cross) = prepare_accel(&what, &mut manifest, opts)?;
    let mut spec = restore_spec(dir, &manifest, accel)?;
    if let Boot::Snapshot(s) = &mut spec.boot {
        s.cross = cross;
    }
    make_clone(&mut spec, clone)?;
    let (out, input) = console_output(serial)?;
    let vm = build(spec, out)?;
    Ok(Built {
        vm,
        input,
        config: manifest.config,
    })
}

/// Wait on `listen` for a live migration and build the VM it carries; the
/// source is told whether that worked (it resumes its VM if not).
pub(crate) fn for_migration(
    listen: &str,
    opts: RestoreOptions,
    serial: &SerialMode,
) -> Result<Built, VmmError> {
    let (out, input) = console_output(serial)?;
    // Make the backend VM and map its memory while the pages stream in:
    // on a nested KVM host that alone takes several milliseconds, which
    // would otherwise fall into the downtime. A failure here is not final:
    // the VM is then made the usual way once the state is in.
    let mut prepared: Option<(hypervisor::AccelKind, PreparedVm)> = None;
    let mut on_hello = |made_with: hypervisor::AccelKind, memory: &GuestRam| {
        let to = opts.target(made_with);
        match PreparedVm::new(accel_of(to), memory) {
            Ok(p) => prepared = Some((to, p)),
            Err(e) => tracing::info!("migration: cannot prepare the VM early: {e}"),
        }
    };
    let mut got = crate::migration::receive(listen, &mut on_hello)?;
    let mut manifest = got.manifest;
    let from = format!("migration from {}", got.peer);
    let built = prepare_accel(&from, &mut manifest, opts)
        .and_then(|(accel, cross)| {
            let mut spec = restore_spec(std::path::Path::new(&from), &manifest, accel)?;
            if let Boot::Snapshot(s) = &mut spec.boot {
                s.memory = Some(got.memory);
                s.cross = cross;
                s.prepared = prepared
                    .take()
                    .filter(|(to, _)| accel_of(*to) == accel)
                    .map(|(_, p)| p);
            }
            Ok(spec)
        })
        .and_then(|spec| build(spec, out));
    let vm = match built {
        Ok(vm) => {
            tracing::info!("{from}: the VM is built");
            crate::migration::answer(&mut got.stream, &Ok(()))?;
            vm
        }
        Err(e) => {
            let _ =
                crate::migration::answer(&mut got.stream, &Err(VmmError::Config(e.to_string())));
            return Err(e);
        }
    };
    tracing::info!("{from}: running");
    Ok(Built {
        vm,
        input,
        config: manifest.config,
    })
}

/// Point a restored VM's disks at new overlays and its NICs at other taps.
fn make_clone(spec: &mut VmSpec, clone: &CloneOptions) -> Result<(), VmmError> {
    if !clone.overlays.is_empty() && clone.overlays.len() != spec.disks.len() {
        return Err(VmmError::Config(format!(
            "{} overlays for a snapshot with {} disks: give one per disk, in order",
            clone.overlays.len(),
            spec.disks.len()
        )));
    }
    if clone.taps.len() > spec.nets.len() {
        return Err(VmmError::Config(format!(
            "{} taps for a snapshot with {} NICs",
            clone.taps.len(),
            spec.nets.len()
        )));
    }
    for (d, overlay) in spec.disks.iter_mut().zip(&clone.overlays) {
        if overlay.exists() {
            return Err(VmmError::Config(format!(
                "overlay {} already exists: a clone starts from a new one",
                overlay.display()
            )));
        }
        block::qcow2::create_qcow2_overlay(overlay, &d.path).map_err(|source| {
            VmmError::Overlay {
                overlay: overlay.clone(),
                backing: d.path.clone(),
                source,
            }
        })?;
        d.path = overlay.clone();
        d.format = Some(block::ImageFormat::Qcow2);
    }
    for (n, tap) in spec.nets.iter_mut().zip(&clone.taps) {
        n.tap = tap.clone();
    }
    Ok(())
}
