//! The ways a VMM process starts its VM, each a small caller of the
//! builder: `run` (boot a configuration), `restore` (a snapshot, also as a
//! clone), `migrate_receive` (a live migration's destination), and `serve`
//! (an empty VMM that waits for one of those through its API). One VM per
//! VMM process: each runs its VM to the end and says why it stopped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::builder::{self, Built};
use crate::config::{Accel, SerialMode, VmConfig};
use crate::vm::Vm;
use std::sync::Arc;

use crate::{api, console, VmExit, VmmError};

/// What a VMM serves besides its VM.
#[derive(Debug, Clone, Default)]
pub struct Servers {
    /// The management API on this Unix socket.
    pub api_socket: Option<PathBuf>,
    /// `GET /metrics` and `vm.counters` on this TCP address.
    pub metrics: Option<SocketAddr>,
    /// The gdb stub (`--gdb`, see `gdb.rs`).
    pub gdb: Option<crate::gdb::GdbOptions>,
}

impl Servers {
    /// Start what is asked for, answering for `shared`.
    fn start(&self, shared: &Arc<api::ApiShared>) -> Result<Running, VmmError> {
        let api = match &self.api_socket {
            Some(path) => {
                Some(api::ApiServer::start(path, shared.clone()).map_err(VmmError::ApiServer)?)
            }
            None => None,
        };
        let metrics = match self.metrics {
            Some(addr) => {
                Some(api::MetricsServer::start(addr, shared.clone()).map_err(VmmError::ApiServer)?)
            }
            None => None,
        };
        Ok(Running {
            _api: api,
            _metrics: metrics,
        })
    }
}

/// The servers of a running VMM; dropping it stops them.
struct Running {
    _api: Option<api::ApiServer>,
    _metrics: Option<api::MetricsServer>,
}

/// Build the VM a configuration describes, run it to the end, and say why
/// it stopped, serving the API and metrics meanwhile as `servers` asks.
pub fn run(config: &VmConfig, servers: &Servers) -> Result<VmExit, VmmError> {
    run_built(builder::for_config(config)?, servers, "boot")
}

/// Start a VM from a snapshot directory in this process and run it,
/// under the accelerator that made it or (`opts.accel`) the other one.
pub fn restore(
    dir: &Path,
    opts: RestoreOptions,
    clone: &CloneOptions,
    serial: &SerialMode,
    servers: &Servers,
) -> Result<VmExit, VmmError> {
    run_built(
        builder::for_snapshot(dir, opts, clone, serial)?,
        servers,
        "restore",
    )
}

/// Wait on `listen` (ADDR:PORT) for a live migration from another Vireo
/// (`vm.migrate-send`), build the VM it carries the way `restore` does and
/// run it to the end. A stream that is cut or is not a migration is an
/// error, and nothing runs.
pub fn migrate_receive(
    listen: &str,
    opts: RestoreOptions,
    serial: &SerialMode,
    servers: &Servers,
) -> Result<VmExit, VmmError> {
    run_built(
        builder::for_migration(listen, opts, serial)?,
        servers,
        "migration",
    )
}

/// What an empty VMM (`vireo run --api-socket PATH` without a kernel) is
/// asked to start through its API.
#[derive(Debug, Clone)]
pub enum Launch {
    /// `vm.boot` of the configuration `vm.create` stored.
    Boot(Box<VmConfig>),
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
/// With `metrics`, the monitoring endpoints are on TCP too (they answer
/// 409 until a VM runs).
pub fn serve(api_socket: &Path, metrics: Option<SocketAddr>) -> Result<VmExit, VmmError> {
    let (tx, rx) = std::sync::mpsc::channel::<LaunchRequest>();
    let shared = api::ApiShared::empty(tx);
    let servers = Servers {
        api_socket: Some(api_socket.to_path_buf()),
        metrics,
        gdb: None,
    };
    let _running = servers.start(&shared)?;
    tracing::info!("API on {}: no VM yet", api_socket.display());
    loop {
        let Ok(req) = rx.recv() else {
            return Err(VmmError::ApiServer("the API server stopped".into()));
        };
        let (built, how) = match req.launch {
            Launch::Shutdown => {
                let _ = req.reply.send(Ok(()));
                return Ok(VmExit::Stopped);
            }
            Launch::Boot(config) => (builder::for_config(&config), "boot"),
            Launch::Restore {
                dir,
                opts,
                clone,
                serial,
            } => (
                builder::for_snapshot(&dir, opts, &clone, &serial),
                "restore",
            ),
            Launch::MigrateReceive {
                listen,
                opts,
                serial,
            } => (builder::for_migration(&listen, opts, &serial), "migration"),
        };
        match built {
            Ok(b) => {
                shared.set_vm(b.vm.api_context(b.config));
                let _ = req.reply.send(Ok(()));
                return Ok(run_with_console(b.vm, b.input, how));
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
    /// The snapshot's disks as the person restoring names them: needed
    /// when the snapshot is not signed with this VMM's snapshot key
    /// (`snapshot::check_disks_named`).
    pub disks: Vec<std::path::PathBuf>,
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
    pub(crate) fn target(&self, made_with: hypervisor::AccelKind) -> hypervisor::AccelKind {
        match self.accel {
            Some(Accel::Kvm) => hypervisor::AccelKind::Kvm,
            Some(Accel::Emu) => hypervisor::AccelKind::Emu,
            _ => made_with,
        }
    }
}

/// Run a built VM with its console and (optionally) the API, to the end.
fn run_built(b: Built, servers: &Servers, how: &str) -> Result<VmExit, VmmError> {
    let shared = api::ApiShared::with_vm(b.vm.api_context(b.config));
    let _running = servers.start(&shared)?;
    let _gdb = match &servers.gdb {
        Some(opts) => Some(
            crate::gdb::GdbServer::start(opts, b.vm.handle(), b.vm.exit_sender())
                .map_err(VmmError::Gdb)?,
        ),
        None => None,
    };
    Ok(run_with_console(b.vm, b.input, how))
}

/// Run a VM to the end, with the terminal feeding its console if `input`.
/// `how` says where the VM came from (boot, restore, migration) for its
/// start event.
fn run_with_console(vm: Vm, input: bool, how: &str) -> VmExit {
    // The VM is built: from here the main thread only waits and tears
    // down, so it takes its own filter before any vCPU runs.
    if let Err(e) = crate::seccomp::confine_main() {
        return VmExit::Error(e.to_string());
    }
    let info = vm.info();
    crate::events::started(how, info.accel, info.vcpus, info.memory_bytes);
    let _console = if input {
        Some(console::StdinForwarder::start(
            vm.console_input(),
            vm.exit_sender(),
        ))
    } else {
        None
    };
    let exit = vm.run();
    crate::events::exited(&exit);
    exit
}
