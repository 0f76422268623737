//! A Vireo virtual machine: guest memory, the device buses, vCPU threads and
//! the loop that answers their exits. Backend-neutral: it talks to KVM and to
//! the software engine only through the `hypervisor` traits.

pub mod api;
pub mod config;
pub mod console;
pub mod control;
pub mod migration;
pub mod snapshot;
mod vm;

pub use config::{Accel, BootProtocol, ConsoleKind, MemSize, SerialMode, VmConfig};
pub use control::{ControlError, RunState, VmControl};
pub use vm::{
    Boot, CrossRestore, DeviceInfo, RawBoot, RawMode, SnapshotSource, Vm, VmHandle, VmInfo, VmSpec,
};

/// Why a VM stopped. Each reason has a documented process exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (keyboard controller, ACPI reset register).
    Reset,
    /// A vCPU triple-faulted: the CPU would reset.
    TripleFault { vcpu: u32, detail: String },
    /// A vCPU met an instruction or state its backend cannot run.
    InternalError { vcpu: u32, detail: String },
    /// The user quit from the console (Ctrl-A X).
    UserQuit,
    /// Stopped through the management API.
    Stopped,
    /// The VMM itself failed while the guest ran.
    Error(String),
    /// The VM was handed over to another Vireo (live migration).
    Migrated(String),
}

/// Process exit codes, for scripts. Documented in the README and `vireo --help`.
pub mod exit_code {
    pub const POWER_OFF: i32 = 0;
    pub const VMM_ERROR: i32 = 1;
    /// clap's own code for a bad command line.
    pub const USAGE: i32 = 2;
    pub const GUEST_RESET: i32 = 3;
    pub const TRIPLE_FAULT: i32 = 4;
    pub const INTERNAL_ERROR: i32 = 5;
    pub const USER_QUIT: i32 = 0;
    pub const STOPPED: i32 = 0;
}

impl VmExit {
    pub fn code(&self) -> i32 {
        match self {
            VmExit::PowerOff => exit_code::POWER_OFF,
            VmExit::Reset => exit_code::GUEST_RESET,
            VmExit::TripleFault { .. } => exit_code::TRIPLE_FAULT,
            VmExit::InternalError { .. } => exit_code::INTERNAL_ERROR,
            VmExit::UserQuit => exit_code::USER_QUIT,
            VmExit::Stopped => exit_code::STOPPED,
            VmExit::Error(_) => exit_code::VMM_ERROR,
            VmExit::Migrated(_) => exit_code::STOPPED,
        }
    }
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::PowerOff => write!(f, "guest powered off"),
            VmExit::Reset => write!(f, "guest rebooted"),
            VmExit::TripleFault { vcpu, detail } => {
                write!(
                    f,
                    "vCPU {vcpu} triple-faulted (the CPU would reset): {detail}"
                )
            }
            VmExit::InternalError { vcpu, detail } => write!(f, "vCPU {vcpu} stopped: {detail}"),
            VmExit::UserQuit => write!(f, "stopped by the user (Ctrl-A X)"),
            VmExit::Stopped => write!(f, "stopped through the API"),
            VmExit::Error(e) => write!(f, "VMM error: {e}"),
            VmExit::Migrated(to) => write!(f, "the VM migrated to {to}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Hypervisor(#[from] hypervisor::HypervisorError),
    #[error(transparent)]
    Arch(#[from] arch::ArchError),
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    Device(String),
    /// The request does not fit the VM's current state (HTTP 409).
    #[error("{0}")]
    Conflict(String),
}

/// Where the console (serial or virtio) goes and whether the terminal feeds it.
fn serial_output(mode: &SerialMode) -> Result<(Box<dyn std::io::Write + Send>, bool), VmmError> {
    Ok(match mode {
        SerialMode::Stdio => (Box::new(console::RawStdout), true),
        SerialMode::File(p) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| {
                    VmmError::Io(format!("cannot open serial file {}: {e}", p.display()))
                })?;
            (Box::new(f), false)
        }
        SerialMode::None => (Box::new(std::io::sink()), false),
    })
}

/// Run a built VM with its console and (optionally) the API, to the end.
fn run_vm(
    vm: Vm,
    input: bool,
    config: Option<VmConfig>,
    api_socket: Option<&std::path::Path>,
) -> Result<VmExit, VmmError> {
    let _api = match api_socket {
        Some(path) => Some(
            api::ApiServer::start(path, api::ApiShared::with_vm(vm.api_context(config)))
                .map_err(VmmError::Io)?,
        ),
        None => None,
    };
    Ok(run_with_console(vm, input))
}

/// Run a VM to the end, with the terminal feeding its console if `input`.
fn run_with_console(vm: Vm, input: bool) -> VmExit {
    let _console = if input {
        Some(console::StdinForwarder::start(
            vm.console_input(),
            vm.exit_sender(),
        ))
    } else {
        None
    };
    vm.run()
}

/// A VM built and ready to run: the VM, whether the terminal feeds its
/// console, and the configuration it reports.
struct Built {
    vm: Vm,
    input: bool,
    config: Option<VmConfig>,
}

fn build_from_config(config: &VmConfig) -> Result<Built, VmmError> {
    config.validate()?;
    let (out, input) = serial_output(&config.serial)?;
    let vm = Vm::new(VmSpec::from_config(config)?, out)?;
    Ok(Built {
        vm,
        input,
        config: Some(config.clone()),
    })
}

/// Build the VM a configuration describes, run it to the end, and say why
/// it stopped. With `api_socket`, serve the management API there meanwhile.
pub fn run(config: &VmConfig, api_socket: Option<&std::path::Path>) -> Result<VmExit, VmmError> {
    let b = build_from_config(config)?;
    run_vm(b.vm, b.input, b.config, api_socket)
}

/// What an empty VMM (`vireo run --api-socket PATH` without a kernel) is
/// asked to start through its API.
#[derive(Debug, Clone)]
pub enum Launch {
    /// `vm.boot` of the configuration `vm.create` stored.
    Boot(VmConfig),
    /// `vm.restore` from a snapshot directory.
    Restore {
        dir: std::path::PathBuf,
        opts: RestoreOptions,
        clone: CloneOptions,
        serial: SerialMode,
    },
    /// `vm.migrate-receive`: wait on ADDR:PORT for a live migration.
    MigrateReceive {
        listen: String,
        opts: RestoreOptions,
        serial: SerialMode,
    },
    /// `vmm.shutdown` before any VM ran: the VMM exits.
    Shutdown,
}

/// A launch and where its outcome goes (the API thread waits on it).
pub(crate) struct LaunchRequest {
    pub launch: Launch,
    pub reply: std::sync::mpsc::Sender<Result<(), VmmError>>,
}

/// Serve the management API on `api_socket` with no VM yet: wait for
/// `vm.create` + `vm.boot`, `vm.restore` or `vm.migrate-receive`, then run
/// that VM to the end (one VM per VMM process, as with `vireo run`). A
/// launch that fails is answered with its error and the VMM stays empty.
pub fn serve(api_socket: &std::path::Path) -> Result<VmExit, VmmError> {
    let (tx, rx) = std::sync::mpsc::channel::<LaunchRequest>();
    let shared = api::ApiShared::empty(tx);
    let _api = api::ApiServer::start(api_socket, shared.clone()).map_err(VmmError::Io)?;
    tracing::info!("API on {}: no VM yet", api_socket.display());
    loop {
        let Ok(req) = rx.recv() else {
            return Err(VmmError::Io("the API server stopped".into()));
        };
        let built = match req.launch {
            Launch::Shutdown => {
                let _ = req.reply.send(Ok(()));
                return Ok(VmExit::Stopped);
            }
            Launch::Boot(config) => build_from_config(&config),
            Launch::Restore {
                dir,
                opts,
                clone,
                serial,
            } => build_restore(&dir, opts, &clone, &serial),
            Launch::MigrateReceive {
                listen,
                opts,
                serial,
            } => build_migrate_receive(&listen, opts, &serial),
        };
        match built {
            Ok(b) => {
                shared.set_vm(b.vm.api_context(b.config));
                let _ = req.reply.send(Ok(()));
                return Ok(run_with_console(b.vm, b.input));
            }
            Err(e) => {
                tracing::warn!("launch through the API failed: {e}");
                let _ = req.reply.send(Err(e));
            }
        }
    }
}

/// What makes a restored VM a clone: its own disk overlays and taps.
#[derive(Debug, Clone, Default)]
pub struct CloneOptions {
    /// One new qcow2 overlay per disk, in the snapshot's disk order, over
    /// the snapshot's disk (which then stays unchanged and shareable).
    pub overlays: Vec<std::path::PathBuf>,
    /// Taps for the snapshot's NICs, in order (missing ones keep theirs).
    pub taps: Vec<String>,
}

/// How a snapshot or migrated VM is to be restored.
#[derive(Debug, Clone, Copy, Default)]
pub struct RestoreOptions {
    /// The accelerator to run it under (`None`/auto: the one that made it).
    pub accel: Option<Accel>,
    /// Under another accelerator, accept a TSC that runs at another rate.
    pub allow_tsc_change: bool,
}

impl RestoreOptions {
    /// The accelerator to run a VM that `made_with` made.
    fn target(&self, made_with: hypervisor::AccelKind) -> hypervisor::AccelKind {
        match self.accel {
            Some(Accel::Kvm) => hypervisor::AccelKind::Kvm,
            Some(Accel::Emu) => hypervisor::AccelKind::Emu,
            _ => made_with,
        }
    }
}

/// Start a VM from a snapshot directory in this process and run it,
/// under the accelerator that made it or (`opts.accel`) the other one.
pub fn restore(
    dir: &std::path::Path,
    opts: RestoreOptions,
    clone: &CloneOptions,
    serial: &SerialMode,
    api_socket: Option<&std::path::Path>,
) -> Result<VmExit, VmmError> {
    let b = build_restore(dir, opts, clone, serial)?;
    run_vm(b.vm, b.input, b.config, api_socket)
}

fn build_restore(
    dir: &std::path::Path,
    opts: RestoreOptions,
    clone: &CloneOptions,
    serial: &SerialMode,
) -> Result<Built, VmmError> {
    let mut manifest = snapshot::read_manifest(dir)?;
    let what = format!("snapshot {}", dir.display());
    let (accel, cross) = prepare_accel(&what, &mut manifest, opts)?;
    let mut spec = restore_spec(dir, &manifest, accel)?;
    if let Boot::Snapshot(s) = &mut spec.boot {
        s.cross = cross;
    }
    make_clone(&mut spec, clone)?;
    let (out, input) = serial_output(serial)?;
    let vm = Vm::new(spec, out)?;
    Ok(Built {
        vm,
        input,
        config: manifest.config,
    })
}

fn accel_of(k: hypervisor::AccelKind) -> Accel {
    match k {
        hypervisor::AccelKind::Kvm => Accel::Kvm,
        hypervisor::AccelKind::Emu => Accel::Emu,
    }
}

/// The accelerator a snapshot (or migration) `what` restores under; under
/// the other one than made it, check that the guest's CPU features are all
/// offered there and convert its state (in `manifest`).
fn prepare_accel(
    what: &str,
    manifest: &mut snapshot::Manifest,
    opts: RestoreOptions,
) -> Result<(Accel, Option<vm::CrossRestore>), VmmError> {
    let made_with = manifest.accel;
    let to = opts.target(made_with);
    if to == made_with {
        return Ok((accel_of(made_with), None));
    }
    let Some(seen) = manifest.cpuid.clone() else {
        return Err(VmmError::Config(format!(
            "{what} was made under --accel {made_with} by a Vireo that did not record the CPU \
             features its guest saw; it restores only under --accel {made_with}"
        )));
    };
    let hv = vm::open_hypervisor(accel_of(to))?;
    let offered = hv.supported_cpuid()?;
    let missing = hypervisor::cpuid::missing_features(&seen, &offered);
    if !missing.is_empty() {
        let hint = if made_with == hypervisor::AccelKind::Kvm {
            " (start KVM guests with --cpu-model portable to move them to the engine)"
        } else {
            ""
        };
        return Err(VmmError::Config(format!(
            "{what} cannot be restored under --accel {to}: its guest saw CPU features \
             --accel {to} does not offer: {}{hint}",
            missing.join(" ")
        )));
    }
    let (vcpus, vm_state) =
        hypervisor::convert::convert(&manifest.vcpu_states, &manifest.vm_state, to)
            .map_err(|e| VmmError::Config(format!("{what} under --accel {to}: {e}")))?;
    tracing::info!("{what}: made under --accel {made_with}, restored under --accel {to}");
    manifest.vcpu_states = vcpus;
    manifest.vm_state = vm_state;
    manifest.accel = to;
    if let Some(c) = &mut manifest.config {
        c.accel = accel_of(to);
    }
    Ok((
        accel_of(to),
        Some(vm::CrossRestore {
            tsc_khz: manifest.tsc_khz,
            allow_tsc_change: opts.allow_tsc_change,
        }),
    ))
}

/// Wait on `listen` (ADDR:PORT) for a live migration from another Vireo
/// (`vm.migrate-send`), build the VM it carries the way `restore` does and
/// run it to the end. A stream that is cut or is not a migration is an
/// error, and nothing runs.
pub fn migrate_receive(
    listen: &str,
    opts: RestoreOptions,
    serial: &SerialMode,
    api_socket: Option<&std::path::Path>,
) -> Result<VmExit, VmmError> {
    let b = build_migrate_receive(listen, opts, serial)?;
    run_vm(b.vm, b.input, b.config, api_socket)
}

fn build_migrate_receive(
    listen: &str,
    opts: RestoreOptions,
    serial: &SerialMode,
) -> Result<Built, VmmError> {
    let (out, input) = serial_output(serial)?;
    // Make the backend VM and map its memory while the pages stream in:
    // on a nested KVM host that alone takes several milliseconds, which
    // would otherwise fall into the downtime. A failure here is not final:
    // the VM is then made the usual way once the state is in.
    let mut prepared: Option<(hypervisor::AccelKind, vm::PreparedVm)> = None;
    let mut on_hello = |made_with: hypervisor::AccelKind, memory: &hypervisor::GuestRam| {
        let to = opts.target(made_with);
        match vm::PreparedVm::new(accel_of(to), memory) {
            Ok(p) => prepared = Some((to, p)),
            Err(e) => tracing::info!("migration: cannot prepare the VM early: {e}"),
        }
    };
    let mut got = migration::receive(listen, &mut on_hello)?;
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
        .and_then(|spec| Vm::new(spec, out));
    let vm = match built {
        Ok(vm) => {
            tracing::info!("{from}: the VM is built");
            migration::answer(&mut got.stream, &Ok(()))?;
            vm
        }
        Err(e) => {
            let _ = migration::answer(&mut got.stream, &Err(VmmError::Config(e.to_string())));
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
        block::qcow2::create_qcow2_overlay(overlay, &d.path).map_err(|e| {
            VmmError::Config(format!(
                "overlay {} over {}: {e}",
                overlay.display(),
                d.path.display()
            ))
        })?;
        d.path = overlay.clone();
        d.format = Some("qcow2".into());
    }
    for (n, tap) in spec.nets.iter_mut().zip(&clone.taps) {
        n.tap = tap.clone();
    }
    Ok(())
}

/// The VM a snapshot needs: its memory and vCPUs, and the devices its
/// configuration makes (disks at the files the snapshot names).
fn restore_spec(
    dir: &std::path::Path,
    manifest: &snapshot::Manifest,
    accel: Accel,
) -> Result<VmSpec, VmmError> {
    let (rng, mut disks, nets, balloon, console) = match &manifest.config {
        Some(c) => (c.rng, c.disks.clone(), c.nets.clone(), c.balloon, c.console),
        None => (false, Vec::new(), Vec::new(), None, ConsoleKind::Serial),
    };
    // The files the snapshot's disks were taken with, absolute (the
    // configuration may hold paths relative to another directory).
    let files: Vec<&std::path::Path> = manifest
        .devices
        .virtio()
        .filter_map(|v| match &v.device {
            virtio::DeviceState::Block(b) => Some(b.path.as_path()),
            _ => None,
        })
        .collect();
    if files.len() != disks.len() {
        return Err(VmmError::Config(format!(
            "snapshot {}: {} disk states for {} configured disks",
            dir.display(),
            files.len(),
            disks.len()
        )));
    }
    for (d, f) in disks.iter_mut().zip(files) {
        d.path = f.to_path_buf();
    }
    Ok(VmSpec {
        accel,
        cpu_model: manifest
            .config
            .as_ref()
            .map(|c| c.cpu_model)
            .unwrap_or_default(),
        memory: manifest.memory_bytes,
        cpus: manifest.vcpus,
        boot: Boot::Snapshot(Box::new(SnapshotSource {
            dir: dir.to_path_buf(),
            manifest: manifest.clone(),
            memory: None,
            cross: None,
            prepared: None,
        })),
        rng,
        disks,
        nets,
        balloon,
        console,
    })
}
