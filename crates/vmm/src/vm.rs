//! One running VM: memory, buses, devices, vCPU threads.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::{Bus, BusDevice, EventSink, VmEvent};
use hypervisor::GuestRam;
use hypervisor::{CpuState, Hypervisor, Vcpu, VcpuExit, VcpuKicker};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::config::{Accel, BootProtocol, ConsoleKind, VmConfig};
use crate::control::VmControl;
use crate::{VmExit, VmmError};

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
    for (slot, region) in memory.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| VmmError::Io(format!("guest memory region: {e}")))?;
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
    /// Which device gets the console output (and input).
    pub console: ConsoleKind,
}

impl VmSpec {
    pub fn from_config(c: &VmConfig) -> Result<Self, VmmError> {
        c.validate()?;
        Ok(VmSpec {
            accel: c.accel,
            cpu_model: c.cpu_model,
            memory: c.memory.0,
            cpus: c.cpus,
            rng: c.rng,
            disks: c.disks.clone(),
            nets: c.nets.clone(),
            balloon: c.balloon,
            console: c.console,
            boot: Boot::Linux {
                kernel: c.kernel.clone(),
                initrd: c.initrd.clone(),
                cmdline: c.effective_cmdline(),
                protocol: c.boot,
            },
        })
    }
}

/// The CPUID of `cpu_model = "portable"`: the software engine's, less
/// what this host's KVM (if it has a usable one) cannot offer.
pub fn portable_cpuid() -> Result<Vec<hypervisor::CpuidEntry>, VmmError> {
    let engine = emu::EmuHypervisor::new().supported_cpuid()?;
    let Some(kvm) = hypervisor::kvm::KvmHypervisor::new()
        .ok()
        .and_then(|k| k.supported_cpuid().ok())
    else {
        return Ok(engine);
    };
    Ok(hypervisor::cpuid::restrict(&engine, &kvm).0)
}

/// Pick and open the backend the user asked for.
pub fn open_hypervisor(accel: Accel) -> Result<Arc<dyn Hypervisor>, VmmError> {
    match accel {
        Accel::Kvm => Ok(Arc::new(hypervisor::kvm::KvmHypervisor::new()?)),
        // KVM when it is usable and fast: on a nested PVM host it runs guest
        // kernels in an instruction emulator (shared/HOST.md), slower than
        // Vireo's engine, so auto takes the engine there.
        Accel::Auto
            if hypervisor::kvm::kvm_available()
                && hypervisor::kvm::KvmFlavor::detect() == hypervisor::kvm::KvmFlavor::Hardware =>
        {
            Ok(Arc::new(hypervisor::kvm::KvmHypervisor::new()?))
        }
        Accel::Auto if hypervisor::kvm::kvm_available() => {
            tracing::info!(
                "this host's KVM is nested (kvm_pvm) and slow for guest kernels: using Vireo's CPU engine; --accel kvm forces KVM"
            );
            Ok(Arc::new(emu::EmuHypervisor::with_jit(
                crate::config::engine_jit_from_env(),
            )))
        }
        Accel::Emu | Accel::Auto => Ok(Arc::new(emu::EmuHypervisor::with_jit(
            crate::config::engine_jit_from_env(),
        ))),
    }
}

struct VcpuHandle {
    kicker: Arc<dyn VcpuKicker>,
    thread: std::thread::JoinHandle<()>,
}

/// What a running VM reports about itself (the API's `vm.info`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct VmInfo {
    pub state: crate::control::RunState,
    pub accel: hypervisor::AccelKind,
    pub memory_bytes: u64,
    pub vcpus: u32,
    pub devices: Vec<DeviceInfo>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceInfo {
    pub name: &'static str,
    /// "pio" or "mmio".
    pub bus: &'static str,
    pub base: u64,
    pub len: u64,
}

/// A vCPU shared between its thread (which holds the lock while the guest
/// runs) and whoever reads its state while the VM is paused.
pub type SharedVcpu = Arc<Mutex<Box<dyn Vcpu>>>;

/// The parts of a VM that outlive `Vm::run` and are shared with the API:
/// what a snapshot reads and the power button.
pub struct VmHandle {
    vm: Arc<dyn hypervisor::Vm>,
    accel: hypervisor::AccelKind,
    memory: GuestRam,
    memory_bytes: u64,
    vcpus: Vec<SharedVcpu>,
    serial: Arc<Mutex<devices::serial::Serial>>,
    acpi_pm: Arc<Mutex<devices::acpi::AcpiPm>>,
    /// Every device with state, walked by snapshots and migrations.
    devices: crate::snapshot::DeviceList,
    control: Arc<VmControl>,
    pci: PciSetup,
}

/// A virtio function on PCI, named for messages.
type VirtioFunction = (String, Arc<Mutex<virtio::VirtioPciDevice>>);

/// What a snapshot and the VMM need of the PCI side.
struct PciSetup {
    bus: Arc<pci::PciBus>,
    config_io: Arc<Mutex<pci::PciConfigIo>>,
    /// Every virtio function, in the order they were added.
    virtio: Vec<VirtioFunction>,
    console_input: Option<virtio::console::ConsoleInput>,
    balloon: Option<virtio::balloon::BalloonHandle>,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl VmHandle {
    pub fn press_power_button(&self) {
        lock(&self.acpi_pm).press_power_button();
    }

    /// The virtio-balloon's host side, if the VM has one.
    pub fn balloon(&self) -> Option<&virtio::balloon::BalloonHandle> {
        self.pci.balloon.as_ref()
    }

    /// Write a paused VM to `dir` (a new directory).
    pub fn snapshot(
        &self,
        dir: &std::path::Path,
        config: Option<VmConfig>,
    ) -> Result<(), VmmError> {
        if self.control.state() != crate::RunState::Paused {
            return Err(VmmError::Conflict(
                "pause the VM before taking a snapshot".into(),
            ));
        }
        // Device queue workers finish what they are doing and stop, so
        // neither guest memory nor device state moves until they restart.
        for (_, d) in &self.pci.virtio {
            lock(d).quiesce();
        }
        let result = self.write_snapshot(dir, config);
        for (_, d) in &self.pci.virtio {
            lock(d).resume();
        }
        result
    }

    fn write_snapshot(
        &self,
        dir: &std::path::Path,
        config: Option<VmConfig>,
    ) -> Result<(), VmmError> {
        use crate::snapshot::*;
        // Read everything before writing anything, so a backend or device
        // that cannot snapshot leaves no half-written directory behind.
        let (vcpu_states, vm_state, devices) = self.save_states()?;
        let (cpuid, tsc_khz) = self.cpu_record();
        let dir = prepare_dir(dir)?;
        let memory = write_memory(&self.memory, &dir)?;
        tracing::info!(
            "snapshot: {} MiB of guest memory, {} MiB of it written",
            memory.file_bytes >> 20,
            memory.data_bytes >> 20
        );
        write_manifest(
            &dir,
            &Manifest {
                vireo: env!("CARGO_PKG_VERSION").into(),
                accel: self.accel,
                memory_bytes: self.memory_bytes,
                vcpus: self.vcpus.len() as u32,
                config,
                memory: memory.ranges,
                memory_file_bytes: memory.file_bytes,
                vcpu_states,
                vm_state,
                devices,
                cpuid,
                tsc_khz,
            },
        )
    }

    /// The CPUID the guest sees and its TSC rate (vCPU 0's), for the
    /// manifest: what a restore under the other accelerator checks.
    pub(crate) fn cpu_record(&self) -> (Option<Vec<hypervisor::CpuidEntry>>, Option<u32>) {
        match self.vcpus.first() {
            Some(v) => {
                let v = lock(v);
                (v.guest_cpuid().ok(), v.tsc_khz())
            }
            None => (None, None),
        }
    }

    /// The paused VM's vCPU, backend and device state (devices quiesced).
    #[allow(clippy::type_complexity)]
    pub(crate) fn save_states(
        &self,
    ) -> Result<
        (
            Vec<hypervisor::VcpuSnapshot>,
            hypervisor::VmSnapshot,
            crate::snapshot::DeviceStates,
        ),
        VmmError,
    > {
        let vcpu_states = self
            .vcpus
            .iter()
            .map(|v| lock(v).save_state())
            .collect::<Result<Vec<_>, _>>()?;
        let vm_state = self.vm.save_state()?;
        let devices = self.devices.save()?;
        Ok((vcpu_states, vm_state, devices))
    }

    /// What a live migration needs of the VM (see `migration.rs`).
    pub(crate) fn backend(&self) -> &Arc<dyn hypervisor::Vm> {
        &self.vm
    }

    pub(crate) fn guest_memory(&self) -> &GuestRam {
        &self.memory
    }

    pub(crate) fn control(&self) -> &Arc<VmControl> {
        &self.control
    }

    pub(crate) fn accel(&self) -> hypervisor::AccelKind {
        self.accel
    }

    pub(crate) fn memory_bytes(&self) -> u64 {
        self.memory_bytes
    }

    pub(crate) fn vcpu_count(&self) -> u32 {
        self.vcpus.len() as u32
    }

    /// Let another process on this host open the disks (`false`), or take
    /// them back (`true`).
    pub(crate) fn set_disk_locks(&self, held: bool) -> Result<(), VmmError> {
        for (name, d) in &self.pci.virtio {
            lock(d)
                .set_host_locks(held)
                .map_err(|e| VmmError::Device(format!("{name}: {e}")))?;
        }
        Ok(())
    }

    /// Stop (or restart) the virtio queue workers.
    pub(crate) fn quiesce_devices(&self, stop: bool) {
        for (_, d) in &self.pci.virtio {
            if stop {
                lock(d).quiesce();
            } else {
                lock(d).resume();
            }
        }
    }

    /// Load a snapshot's vCPU, backend and device state into this new VM.
    fn restore(
        &self,
        m: &crate::snapshot::Manifest,
        cross: Option<&CrossRestore>,
    ) -> Result<(), VmmError> {
        if m.vcpu_states.len() != self.vcpus.len() {
            return Err(VmmError::Config(
                "snapshot vCPU count does not match".into(),
            ));
        }
        if let Some(c) = cross {
            for v in &self.vcpus {
                check_tsc_rate(lock(v).as_mut(), c)?;
            }
        }
        for (v, st) in self.vcpus.iter().zip(&m.vcpu_states) {
            lock(v).restore_state(st)?;
        }
        self.vm.restore_state(&m.vm_state)?;
        self.devices.restore(&m.devices)?;
        // The restored configuration spaces decode BARs the bus must map.
        self.pci.bus.refresh_routing();
        for (_, d) in &self.pci.virtio {
            lock(d).resume();
        }
        Ok(())
    }
}

/// Two TSC rates closer than this (parts per million) are the same: KVM
/// itself tolerates 250 ppm before it scales.
const TSC_TOLERANCE_PPM: u64 = 250;

/// The guest's TSC must keep the rate it ran at (the guest may keep time
/// by it, at the rate it calibrated or was told): run the destination vCPU
/// at that rate, or refuse unless the user allowed the change.
fn check_tsc_rate(vcpu: &mut dyn Vcpu, c: &CrossRestore) -> Result<(), VmmError> {
    let Some(want) = c.tsc_khz else {
        return Ok(());
    };
    let have = vcpu.tsc_khz();
    let close =
        |h: u32| (h as u64).abs_diff(want as u64) * 1_000_000 <= want as u64 * TSC_TOLERANCE_PPM;
    if have.is_some_and(close) {
        return Ok(());
    }
    let why = match vcpu.set_tsc_khz(want) {
        Ok(()) => return Ok(()),
        Err(e) => e.to_string(),
    };
    let have = have.map_or("an unknown rate".to_string(), |h| format!("{h} kHz"));
    if c.allow_tsc_change {
        tracing::warn!(
            "the guest's TSC ran at {want} kHz and now runs at {have} ({why}); its value goes on from where it was"
        );
        return Ok(());
    }
    Err(VmmError::Config(format!(
        "the guest's TSC ran at {want} kHz; this accelerator runs it at {have} and cannot change that ({why}). \
         A guest that keeps time by the TSC would see its clock run at the wrong speed; \
         --allow-tsc-change restores anyway (the TSC value stays continuous)"
    )))
}

pub struct Vm {
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    handle: Arc<VmHandle>,
    exit_tx: Sender<VmExit>,
    exit_rx: Receiver<VmExit>,
    info: VmInfo,
    console_input: Option<virtio::console::ConsoleInput>,
}

const COM1_BASE: u64 = 0x3f8;
const COM1_IRQ: u32 = 4;

impl Vm {
    /// Build the VM: backend, memory, devices, boot image, vCPUs (not yet running).
    pub fn new(spec: VmSpec, serial_out: Box<dyn Write + Send>) -> Result<Self, VmmError> {
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
        // A virtio console takes the host side; COM1 is then disconnected.
        let (serial_out, console_out) = match spec.console {
            ConsoleKind::Serial => (serial_out, None),
            ConsoleKind::Virtio => (
                Box::new(std::io::sink()) as Box<dyn Write + Send>,
                Some(serial_out),
            ),
        };

        let memory = match &boot {
            Boot::Snapshot(snap) if snap.memory.is_some() => {
                snap.memory.clone().unwrap_or_default()
            }
            Boot::Snapshot(snap) => crate::snapshot::map_memory(
                &snap.dir,
                &snap.manifest.memory,
                snap.manifest.memory_file_bytes,
            )?,
            _ => {
                let regions = arch::ram_regions(spec.memory);
                GuestRam::from_ranges(&regions).map_err(|e| {
                    VmmError::Io(format!(
                        "cannot allocate {} MiB of guest memory: {e}",
                        spec.memory >> 20
                    ))
                })?
            }
        };
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
                };
                if let Ok(tx) = tx.lock() {
                    let _ = tx.send(exit);
                }
            })
        };

        let mut map = DeviceMap {
            pio: Arc::new(Bus::new()),
            mmio: Arc::new(Bus::new()),
            list: Vec::new(),
        };
        let mut add = |name: &'static str, base: u64, len: u64, dev: Arc<Mutex<dyn BusDevice>>| {
            map.add(BusKind::Pio, name, base, len, dev)
        };
        let serial = Arc::new(Mutex::new(devices::serial::Serial::new(
            vm.irq_line(COM1_IRQ)?,
            serial_out,
        )));
        add("serial (COM1)", COM1_BASE, 8, serial.clone())?;
        let i8042 = Arc::new(Mutex::new(devices::i8042::I8042::new(
            events.clone(),
            Some(vm.irq_line(1)?),
        )));
        add("i8042", 0x60, 5, i8042.clone())?;
        let below_4g = spec.memory.min(arch::layout::MMIO_HOLE_START);
        let cmos = devices::rtc::CmosMemory {
            below_4g,
            above_4g: spec.memory - below_4g,
        };
        let rtc = Arc::new(Mutex::new(devices::rtc::CmosRtc::new(Some(cmos))));
        add("cmos-rtc", 0x70, 2, rtc.clone())?;
        let sci = vm.irq_line(arch::layout::ACPI_SCI_IRQ as u32)?;
        let pm = Arc::new(Mutex::new(devices::acpi::AcpiPm::new(
            events.clone(),
            Some(sci),
        )));
        add("acpi-pm", arch::layout::ACPI_PM_BASE as u64, 12, pm.clone())?;
        let reset = Arc::new(Mutex::new(devices::acpi::ResetControl::new(events.clone())));
        add(
            "reset-control",
            arch::layout::RESET_PORT as u64,
            1,
            reset.clone(),
        )?;
        // Ports Linux pokes with nothing behind them: the POST/delay ports,
        // DMA page registers and the other COM ports.
        let sink: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(devices::sink::Ignored::new()));
        for (base, len) in [(0x80, 0x10), (0xed, 1), (0x2f8, 8), (0x3e8, 8), (0x2e8, 8)] {
            add("ignored", base, len, sink.clone())?;
        }
        let mut pci = setup_pci(&mut map, vm.clone(), &memory, &spec, console_out)?;
        let console_input = pci.console_input.take();

        // A restored VM's memory already holds everything: no boot image.
        let bsp_state = match &boot {
            Boot::Snapshot(_) => None,
            _ => Some(load_boot(&memory, &boot, spec.cpus)?),
        };
        let mut vcpus = Vec::with_capacity(spec.cpus as usize);
        for i in 0..spec.cpus {
            let mut vcpu = vm.create_vcpu(i, spec.cpus)?;
            if let (0, Some(state)) = (i, &bsp_state) {
                vcpu.set_boot_state(state)?;
            }
            vcpus.push(Arc::new(Mutex::new(vcpu)));
        }
        // The order is the snapshot format's: devices are restored in it.
        let mut saved = crate::snapshot::DeviceList::default();
        saved.push("serial (COM1)", serial.clone());
        saved.push("i8042", i8042);
        saved.push("cmos-rtc", rtc);
        saved.push("acpi-pm", pm.clone());
        saved.push("reset-control", reset);
        saved.push("pci config-io", pci.config_io.clone());
        for (name, d) in &pci.virtio {
            saved.push(name.clone(), d.clone());
        }
        let handle = Arc::new(VmHandle {
            vm: vm.clone(),
            accel: hv.kind(),
            memory,
            memory_bytes: spec.memory,
            vcpus,
            serial,
            acpi_pm: pm,
            devices: saved,
            control: VmControl::new(),
            pci,
        });
        if let Boot::Snapshot(snap) = &boot {
            handle.restore(&snap.manifest, snap.cross.as_ref())?;
        }

        let info = VmInfo {
            state: crate::control::RunState::Running,
            accel: hv.kind(),
            memory_bytes: spec.memory,
            vcpus: spec.cpus,
            devices: map.list,
        };
        Ok(Vm {
            info,
            handle,
            pio: map.pio,
            mmio: map.mmio,
            exit_tx,
            exit_rx,
            console_input,
        })
    }

    /// Pause/resume/stop for this VM, usable from any thread.
    pub fn control(&self) -> Arc<VmControl> {
        self.handle.control.clone()
    }

    /// What outlives `run` and is shared with the API.
    pub fn handle(&self) -> Arc<VmHandle> {
        self.handle.clone()
    }

    /// What the management API needs to serve this VM.
    pub fn api_context(&self, config: Option<VmConfig>) -> crate::api::ApiContext {
        crate::api::ApiContext {
            control: self.handle.control.clone(),
            info: self.info.clone(),
            config,
            exits: self.exit_tx.clone(),
            vm: self.handle.clone(),
        }
    }

    /// A snapshot of the VM's state and make-up.
    pub fn info(&self) -> VmInfo {
        VmInfo {
            state: self.handle.control.state(),
            ..self.info.clone()
        }
    }

    pub fn serial(&self) -> Arc<Mutex<devices::serial::Serial>> {
        self.handle.serial.clone()
    }

    /// Where console input goes: the virtio console when it is the
    /// console, else COM1.
    pub fn console_input(&self) -> crate::console::ConsoleTarget {
        match &self.console_input {
            Some(i) => crate::console::ConsoleTarget::Virtio(i.clone()),
            None => crate::console::ConsoleTarget::Serial(self.serial()),
        }
    }

    pub fn exit_sender(&self) -> Sender<VmExit> {
        self.exit_tx.clone()
    }

    /// The port I/O bus, for adding devices before `run`.
    pub fn pio_bus(&self) -> &Bus {
        &self.pio
    }

    /// The MMIO bus, for adding devices before `run`.
    pub fn mmio_bus(&self) -> &Bus {
        &self.mmio
    }

    pub fn memory(&self) -> &GuestRam {
        &self.handle.memory
    }

    /// Run every vCPU on a thread of its own until the first reason to stop.
    pub fn run(self) -> VmExit {
        let control = self.handle.control.clone();
        let mut handles = Vec::new();
        for vcpu in self.handle.vcpus.iter().cloned() {
            let (kicker, index) = {
                let v = lock(&vcpu);
                (v.kicker(), v.index())
            };
            control.add_vcpu(kicker.clone());
            let ctx = VcpuContext {
                pio: self.pio.clone(),
                mmio: self.mmio.clone(),
                exits: self.exit_tx.clone(),
                control: control.clone(),
            };
            match std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    ctx.run(vcpu);
                    ctx.control.vcpu_exited();
                }) {
                Ok(thread) => handles.push(VcpuHandle { kicker, thread }),
                Err(e) => {
                    control.vcpu_exited();
                    let _ = self.exit_tx.send(VmExit::Error(format!(
                        "cannot start vCPU {index} thread: {e}"
                    )));
                    break;
                }
            }
        }
        let exit = self
            .exit_rx
            .recv()
            .unwrap_or_else(|_| VmExit::Error("every vCPU thread ended".into()));
        control.request_stop();
        // Give the threads a moment to leave the guest; a vCPU stuck in a
        // host call is left behind rather than hanging the VMM.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        for h in handles {
            while !h.thread.is_finished() && std::time::Instant::now() < deadline {
                h.kicker.kick();
                std::thread::sleep(Duration::from_millis(5));
            }
            if h.thread.is_finished() {
                let _ = h.thread.join();
            }
        }
        exit
    }
}

#[derive(Clone, Copy)]
enum BusKind {
    Pio,
    Mmio,
}

/// The VM's two buses and what was put on them (for `vm.info`).
struct DeviceMap {
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    list: Vec<DeviceInfo>,
}

impl DeviceMap {
    fn add(
        &mut self,
        kind: BusKind,
        name: &'static str,
        base: u64,
        len: u64,
        dev: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), VmmError> {
        let (bus, label) = match kind {
            BusKind::Pio => (&self.pio, "pio"),
            BusKind::Mmio => (&self.mmio, "mmio"),
        };
        bus.insert(base, len, dev)
            .map_err(|e| VmmError::Device(format!("{name} at {label} {base:#x}: {e}")))?;
        self.list.push(DeviceInfo {
            name,
            bus: label,
            base,
            len,
        });
        Ok(())
    }
}

/// PCI bus 0 (host bridge, configuration through 0xcf8/0xcfc and ECAM) and
/// the virtio devices the VM asked for, with MSI-X through the backend.
/// `console_out` is the console output when the console is virtio.
fn setup_pci(
    map: &mut DeviceMap,
    vm: Arc<dyn hypervisor::Vm>,
    memory: &GuestRam,
    spec: &VmSpec,
    console_out: Option<Box<dyn Write + Send>>,
) -> Result<PciSetup, VmmError> {
    use arch::layout::{PCI_ECAM_BASE, PCI_ECAM_SIZE, PCI_MMIO32_END, PCI_MMIO32_START};
    let bus = Arc::new(pci::PciBus::new(map.mmio.clone(), map.pio.clone()));
    let cfg = pci::PciConfigIo::new(bus.clone());
    // 0xcf9 is the reset register: the address port is 0xcf8 alone.
    let address = Arc::new(Mutex::new(cfg.address_port()));
    map.add(
        BusKind::Pio,
        "pci-config-address",
        pci::CONFIG_ADDRESS_PORT,
        1,
        address,
    )?;
    let data = Arc::new(Mutex::new(cfg.data_port()));
    let (port, len) = (pci::CONFIG_DATA_PORT, pci::CONFIG_DATA_LEN);
    map.add(BusKind::Pio, "pci-config-data", port, len, data)?;
    let ecam = Arc::new(Mutex::new(pci::PciConfigMmio::new(bus.clone())));
    map.add(
        BusKind::Mmio,
        "pci-ecam",
        PCI_ECAM_BASE,
        PCI_ECAM_SIZE,
        ecam,
    )?;

    let mut bars = pci::BarAllocator::new(
        pci::AddressWindow::new(PCI_MMIO32_START, PCI_MMIO32_END),
        None,
        pci::AddressWindow::new(pci::IO_WINDOW_START, pci::IO_WINDOW_END),
    );
    let notifiers = queue_notifiers(&bus, vm.clone());
    let msi: pci::MsiSink = Arc::new(move |addr, data| {
        if let Err(e) = vm.signal_msi(addr, data) {
            tracing::warn!("MSI {addr:#x}/{data:#x} not delivered: {e}");
        }
    });
    let mut functions: Vec<VirtioFunction> = Vec::new();
    let mut add_virtio = |name: String, dev: Box<dyn virtio::VirtioDevice>| {
        let dev = virtio::VirtioPciDevice::new(dev, memory.clone(), msi.clone())
            .map_err(|e| VmmError::Device(format!("{name}: {e}")))?;
        let events = dev
            .notify_eventfds()
            .into_iter()
            .map(|(off, e)| e.try_clone().map(|e| (off, e)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| VmmError::Device(format!("{name}: {e}")))?;
        let dev = Arc::new(Mutex::new(dev));
        let slot = bus
            .add_device(dev.clone(), &mut bars)
            .map_err(|e| VmmError::Device(format!("{name} on PCI: {e}")))?;
        lock(&notifiers).insert(slot, events);
        tracing::info!("{name} at PCI 00:{slot:02x}.0");
        functions.push((name, dev));
        Ok::<(), VmmError>(())
    };
    for (i, d) in spec.disks.iter().enumerate() {
        let format = match &d.format {
            Some(f) => Some(f.parse::<block::ImageFormat>().map_err(VmmError::Config)?),
            None => None,
        };
        let image = block::open(&d.path, format, d.readonly)
            .map_err(|e| VmmError::Config(format!("disk {}: {e}", d.path.display())))?;
        let serial = d.serial.clone().unwrap_or_else(|| format!("vireo-disk{i}"));
        let blk = virtio::block::Block::new(image, &serial);
        add_virtio(format!("virtio-blk {}", d.path.display()), Box::new(blk))?;
    }
    for n in &spec.nets {
        let tap = net::Tap::open(&n.tap).map_err(|e| VmmError::Config(e.to_string()))?;
        tap.set_up().map_err(|e| VmmError::Config(e.to_string()))?;
        let mac = n.mac.unwrap_or_else(net::MacAddr::random);
        let name = format!("virtio-net {} ({mac})", tap.name());
        let dev = virtio::net::Net::new(Arc::new(tap), mac);
        add_virtio(name, Box::new(dev))?;
    }
    if spec.rng {
        add_virtio("virtio-rng".into(), Box::new(virtio::rng::Rng::new()))?;
    }
    let (mut console_input, mut balloon) = (None, None);
    if let Some(out) = console_out {
        let out = Mutex::new(out);
        let output: virtio::console::ConsoleOutput = Arc::new(move |b: &[u8]| {
            let mut o = lock(&out);
            let _ = o.write_all(b).and_then(|()| o.flush());
        });
        let dev = virtio::console::Console::new(output)
            .map_err(|e| VmmError::Device(format!("virtio-console: {e}")))?;
        console_input = Some(dev.input());
        add_virtio("virtio-console".into(), Box::new(dev))?;
    }
    if let Some(b) = &spec.balloon {
        let dev = virtio::balloon::Balloon::new(virtio::balloon::BalloonOptions {
            deflate_on_oom: b.deflate_on_oom,
            stats: b.stats,
        })
        .map_err(|e| VmmError::Device(format!("virtio-balloon: {e}")))?;
        balloon = Some(dev.handle());
        add_virtio("virtio-balloon".into(), Box::new(dev))?;
    }
    Ok(PciSetup {
        bus,
        config_io: Arc::new(Mutex::new(cfg)),
        virtio: functions,
        console_input,
        balloon,
    })
}

/// Queue notification eventfds per PCI slot (offsets inside BAR 0), moved
/// along with the BAR: where the backend can (KVM's ioeventfd), a guest's
/// notify write signals the device's worker without a vCPU exit.
type SlotNotifiers = Arc<Mutex<HashMap<u8, Vec<(u64, EventFd)>>>>;

fn queue_notifiers(bus: &pci::PciBus, vm: Arc<dyn hypervisor::Vm>) -> SlotNotifiers {
    let notifiers: SlotNotifiers = Arc::default();
    let n = notifiers.clone();
    bus.set_bar_hook(Arc::new(move |slot, bar, addr, mapped| {
        if bar != virtio::BAR_INDEX {
            return;
        }
        let n = lock(&n);
        let Some(events) = n.get(&slot) else {
            return;
        };
        for (off, e) in events {
            let r = if mapped {
                vm.register_mmio_notify(addr + off, e).map(|_| ())
            } else {
                vm.unregister_mmio_notify(addr + off, e)
            };
            if let Err(e) = r {
                // The write still reaches the device as MMIO: slower, not wrong.
                tracing::warn!("PCI 00:{slot:02x}.0 notify at {:#x}: {e}", addr + off);
            }
        }
    }));
    notifiers
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
            let mut kf = File::open(kernel).map_err(|e| {
                VmmError::Io(format!("cannot open kernel {}: {e}", kernel.display()))
            })?;
            let image = arch::load_kernel(mem, &mut kf)?;
            let initrd_data = match initrd {
                Some(p) => Some(std::fs::read(p).map_err(|e| {
                    VmmError::Io(format!("cannot read initramfs {}: {e}", p.display()))
                })?),
                None => None,
            };
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

/// What a vCPU thread needs to answer exits.
struct VcpuContext {
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exits: Sender<VmExit>,
    control: Arc<VmControl>,
}

impl VcpuContext {
    fn run(&self, shared: SharedVcpu) {
        let index = lock(&shared).index();
        let settle = || {
            if let Err(e) = lock(&shared).complete_pending_io() {
                tracing::warn!("vCPU {index}: cannot complete pending I/O before pausing: {e}");
            }
        };
        while self.control.checkpoint(settle) {
            // Held while the guest runs; released while paused (checkpoint).
            let mut vcpu = lock(&shared);
            let exit = match vcpu.run() {
                Ok(e) => e,
                Err(e) => {
                    let _ = self.exits.send(VmExit::Error(format!("vCPU {index}: {e}")));
                    return;
                }
            };
            match exit {
                VcpuExit::IoIn { port, data } => {
                    if !self.pio.read(port as u64, data) {
                        tracing::trace!("vCPU {index}: read from unclaimed port {port:#x}");
                        data.fill(0xff);
                    }
                }
                VcpuExit::IoOut { port, data } => {
                    if !self.pio.write(port as u64, data) {
                        tracing::trace!("vCPU {index}: write to unclaimed port {port:#x}");
                    }
                }
                VcpuExit::MmioRead { addr, data } => {
                    if !self.mmio.read(addr, data) {
                        tracing::debug!("vCPU {index}: read from unclaimed MMIO {addr:#x}");
                        data.fill(0xff);
                    }
                }
                VcpuExit::MmioWrite { addr, data } => {
                    if !self.mmio.write(addr, data) {
                        tracing::debug!("vCPU {index}: write to unclaimed MMIO {addr:#x}");
                    }
                }
                VcpuExit::Interrupted => {}
                VcpuExit::Halt => {
                    // The backend leaves the wait to us: nothing can wake a
                    // halted vCPU but an interrupt, which the backend checks
                    // on its next run.
                    std::thread::sleep(Duration::from_millis(1));
                }
                VcpuExit::SystemPowerOff => {
                    let _ = self.exits.send(VmExit::PowerOff);
                    return;
                }
                VcpuExit::SystemReset => {
                    let _ = self.exits.send(VmExit::Reset);
                    return;
                }
                VcpuExit::Shutdown => {
                    let detail = describe_cpu(vcpu.as_ref());
                    let _ = self.exits.send(VmExit::TripleFault {
                        vcpu: index,
                        detail,
                    });
                    return;
                }
                VcpuExit::InternalError(e) => {
                    let _ = self.exits.send(VmExit::InternalError {
                        vcpu: index,
                        detail: e.to_string(),
                    });
                    return;
                }
                VcpuExit::Unknown(what) => {
                    let _ = self.exits.send(VmExit::Error(format!(
                        "vCPU {index}: unexpected exit from the backend: {what}"
                    )));
                    return;
                }
            }
        }
    }
}

fn describe_cpu(vcpu: &dyn Vcpu) -> String {
    match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(r), Ok(s)) => format!(
            "RIP {:#x} RSP {:#x} RFLAGS {:#x} CS {:#x} CR0 {:#x} CR3 {:#x} CR4 {:#x} EFER {:#x} IDT {:#x}/{:#x}",
            r.rip, r.rsp, r.rflags, s.cs.selector, s.cr0, s.cr3, s.cr4, s.efer, s.idt.base, s.idt.limit
        ),
        _ => "registers unavailable".into(),
    }
}
