//! The management API: HTTP/1.1 with JSON bodies over a Unix socket
//! (`vireo run --api-socket PATH`), described by docs/openapi.json.
//!
//! This module holds what the server and the client share: the request and
//! reply bodies as types, one [`Endpoint`] per operation (its method, path
//! and summary; [`ROUTES`] lists them for the document's test), and one
//! [`ApiAction`] per request with its body already parsed. The VMM side
//! answers actions through the [`RequestHandler`] trait (see [`ApiShared`]);
//! [`http`] turns HTTP requests into actions and replies into responses;
//! [`client`] does the reverse for `vireo pause` and friends.
//!
//! Invariants: a body is parsed once, into its action, before anything is
//! done; the server learns what happened from the typed reply, never from
//! the body again; a request that fails changes nothing.
//!
//! A new operation is a variant in [`Endpoint`] (its route) and in
//! [`ApiAction`] (its body, parsed and written), a [`RequestHandler`]
//! method, and its paths and schemas in docs/openapi.json: the tests here
//! and in vireo/tests/api.rs hold the document to the routes and types.

pub mod client;
mod handler;
pub mod http;
pub mod tcp;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::control::{ControlError, RunState};
pub use crate::counters::VmCounters;
use crate::migration::MigrationReport;
use crate::{Accel, SerialMode, VmConfig, VmmError};

pub use handler::{ApiContext, ApiShared};
pub use http::ApiServer;
pub use tcp::MetricsServer;

/// One operation of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    VmmPing,
    VmInfo,
    VmPause,
    VmResume,
    VmPowerButton,
    VmStop,
    VmSnapshot,
    VmMigrateSend,
    VmMigrateCancel,
    VmBalloon,
    VmRateLimit,
    VmCgroup,
    VmCreate,
    VmDelete,
    VmBoot,
    VmRestore,
    VmMigrateReceive,
    VmmShutdown,
    VmCounters,
    Metrics,
}

impl Endpoint {
    /// Every endpoint, in the order docs/openapi.json lists them.
    pub const ALL: [Endpoint; 20] = [
        Endpoint::VmmPing,
        Endpoint::VmInfo,
        Endpoint::VmPause,
        Endpoint::VmResume,
        Endpoint::VmPowerButton,
        Endpoint::VmStop,
        Endpoint::VmSnapshot,
        Endpoint::VmMigrateSend,
        Endpoint::VmMigrateCancel,
        Endpoint::VmBalloon,
        Endpoint::VmRateLimit,
        Endpoint::VmCgroup,
        Endpoint::VmCreate,
        Endpoint::VmDelete,
        Endpoint::VmBoot,
        Endpoint::VmRestore,
        Endpoint::VmMigrateReceive,
        Endpoint::VmmShutdown,
        Endpoint::VmCounters,
        Endpoint::Metrics,
    ];

    /// (method, path, summary).
    pub const fn route(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Endpoint::VmmPing => (
                "GET",
                "/api/v1/vmm.ping",
                "Vireo's version; checks the API is up",
            ),
            Endpoint::VmInfo => (
                "GET",
                "/api/v1/vm.info",
                "The VM's state, configuration, vCPUs and devices",
            ),
            Endpoint::VmPause => (
                "PUT",
                "/api/v1/vm.pause",
                "Stop every vCPU outside the guest",
            ),
            Endpoint::VmResume => ("PUT", "/api/v1/vm.resume", "Let paused vCPUs run again"),
            Endpoint::VmPowerButton => (
                "PUT",
                "/api/v1/vm.power-button",
                "Press the ACPI power button (the guest shuts down)",
            ),
            Endpoint::VmStop => (
                "PUT",
                "/api/v1/vm.stop",
                "Stop the VM at once (the VMM exits 0)",
            ),
            Endpoint::VmSnapshot => (
                "PUT",
                "/api/v1/vm.snapshot",
                "Write a paused VM to a new directory",
            ),
            Endpoint::VmMigrateSend => (
                "PUT",
                "/api/v1/vm.migrate-send",
                "Live-migrate the VM to a `vireo migrate-receive` over TCP (this VMM then exits 0)",
            ),
            Endpoint::VmMigrateCancel => (
                "PUT",
                "/api/v1/vm.migrate-cancel",
                "Give up the live migration in progress (the VM runs on here)",
            ),
            Endpoint::VmBalloon => (
                "PUT",
                "/api/v1/vm.balloon",
                "Set the balloon's target size: memory the guest is asked to give back",
            ),
            Endpoint::VmRateLimit => (
                "PUT",
                "/api/v1/vm.rate-limit",
                "Change a disk's, a NIC's or a rate group's I/O limits (token buckets)",
            ),
            Endpoint::VmCgroup => (
                "PUT",
                "/api/v1/vm.cgroup",
                "Change the CPU and memory limits of the VMM's cgroup (cpu.max, cpu.weight, memory.max, memory.high)",
            ),
            Endpoint::VmCreate => (
                "PUT",
                "/api/v1/vm.create",
                "Store a VM configuration in an empty VMM (boot it with vm.boot)",
            ),
            Endpoint::VmDelete => (
                "PUT",
                "/api/v1/vm.delete",
                "Drop the configuration vm.create stored (before vm.boot)",
            ),
            Endpoint::VmBoot => ("PUT", "/api/v1/vm.boot", "Build and start the created VM"),
            Endpoint::VmRestore => (
                "PUT",
                "/api/v1/vm.restore",
                "Start a VM in an empty VMM from a snapshot directory",
            ),
            Endpoint::VmMigrateReceive => (
                "PUT",
                "/api/v1/vm.migrate-receive",
                "Wait on a TCP address for a live migration and run the VM it brings",
            ),
            Endpoint::VmmShutdown => (
                "PUT",
                "/api/v1/vmm.shutdown",
                "Stop the VMM process (and its VM, if one runs)",
            ),
            Endpoint::VmCounters => (
                "GET",
                "/api/v1/vm.counters",
                "The VM's counters: vCPU exits and time, engine, disks, NICs, virtio, memory",
            ),
            Endpoint::Metrics => (
                "GET",
                "/metrics",
                "The same counters in the Prometheus text exposition format",
            ),
        }
    }

    pub const fn method(self) -> &'static str {
        self.route().0
    }

    pub const fn path(self) -> &'static str {
        self.route().1
    }

    /// The operation's name (`vm.pause`, `metrics`) for messages.
    pub fn name(self) -> &'static str {
        self.path()
            .trim_start_matches("/api/v1/")
            .trim_start_matches('/')
    }

    /// Reads only: safe to serve where the API's control is not offered
    /// (the `--metrics` TCP listener).
    pub fn is_monitoring(self) -> bool {
        matches!(self, Endpoint::VmCounters | Endpoint::Metrics)
    }

    /// The endpoint served at `path` (without a query string).
    pub fn from_path(path: &str) -> Option<Endpoint> {
        Endpoint::ALL.into_iter().find(|e| e.path() == path)
    }
}

/// Every operation the server answers: (method, path, summary).
pub const ROUTES: [(&str, &str, &str); Endpoint::ALL.len()] = {
    let mut routes = [("", "", ""); Endpoint::ALL.len()];
    let mut i = 0;
    while i < routes.len() {
        routes[i] = Endpoint::ALL[i].route();
        i += 1;
    }
    routes
};

/// `vm.snapshot`: where to write the paused VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// A directory that does not exist yet.
    pub destination: PathBuf,
}

/// `vm.migrate-send`: where to and how fast.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// HOST:PORT of the receiving Vireo.
    pub destination: String,
    /// Pre-copy bandwidth cap in MiB/s (the paused final round is not capped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bandwidth_mib: Option<u64>,
}

/// `vm.rate-limit`: new token buckets for one device or rate group. A
/// limiter left out stays as it is; `{}` (no bucket) lifts a limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitRequest {
    /// A device id as `vm.counters` names it (`disk0`, `net1`) or a rate
    /// group's name. A device in a group changes the whole group.
    pub target: String,
    /// A disk's limiter.
    #[serde(default)]
    pub rate_limiter: Option<crate::config::RateLimiterConfig>,
    /// A NIC's limiter for frames the guest receives.
    #[serde(default)]
    pub rx_rate_limiter: Option<crate::config::RateLimiterConfig>,
    /// A NIC's limiter for frames the guest sends.
    #[serde(default)]
    pub tx_rate_limiter: Option<crate::config::RateLimiterConfig>,
}

/// `vm.balloon`: the balloon's new target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonRequest {
    pub target_mib: u64,
}

/// `vm.restore`: the snapshot to start and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// The snapshot directory.
    pub source: PathBuf,
    /// The accelerator to restore under [default: the snapshot's].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<Accel>,
    /// Under the other accelerator, accept a TSC at another rate.
    #[serde(default)]
    pub allow_tsc_change: bool,
    /// New qcow2 overlays, one per disk (makes the VM a clone).
    #[serde(default)]
    pub overlays: Vec<PathBuf>,
    /// Taps for the snapshot's NICs, in order.
    #[serde(default)]
    pub taps: Vec<String>,
    /// The snapshot's disk files, in order: required when the snapshot is
    /// not signed with this VMM's snapshot key.
    #[serde(default)]
    pub disks: Vec<PathBuf>,
    /// Where the console goes [default: stdio of the VMM].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<SerialMode>,
}

/// `vm.migrate-receive`: where to wait for a migration and how to run it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateReceiveRequest {
    /// ADDR:PORT to wait on.
    pub listen: String,
    /// The accelerator to run it under [default: the source's].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<Accel>,
    #[serde(default)]
    pub allow_tsc_change: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<SerialMode>,
}

/// `vmm.ping`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PingReply {
    pub version: String,
}

/// Where a VMM is with its VM, as `vm.info` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    /// An empty VMM: nothing created yet.
    NotCreated,
    /// `vm.create` stored a configuration; `vm.boot` has not run it yet.
    Created,
    Running,
    Paused,
}

impl From<RunState> for VmState {
    fn from(s: RunState) -> Self {
        match s {
            RunState::Running => VmState::Running,
            RunState::Paused => VmState::Paused,
        }
    }
}

/// `vm.info`'s answer. An empty VMM has only `state` and `config`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmInfoReply {
    pub state: VmState,
    /// The settings the VM was created or started with (none for a VM
    /// restored from a snapshot that did not record them).
    pub config: Option<VmConfig>,
    /// Present once a VM runs.
    #[serde(flatten)]
    pub vm: Option<RunningVmInfo>,
}

/// What a running VM is made of.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunningVmInfo {
    pub accel: hypervisor::AccelKind,
    pub memory_bytes: u64,
    pub vcpus: u32,
    pub devices: Vec<Device>,
    /// Null without a balloon device.
    pub balloon: Option<BalloonInfo>,
    /// Every thread of the VMM: host TID and role (main, vcpu, api,
    /// api-request, worker, console, helper, spawner), for tools that
    /// place threads (taskset, cgroups).
    #[serde(default)]
    pub threads: Vec<threads::ThreadInfo>,
}

/// A device on the port I/O or MMIO bus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub name: String,
    /// "pio" or "mmio".
    pub bus: String,
    pub base: u64,
    pub len: u64,
}

impl From<&crate::DeviceInfo> for Device {
    fn from(d: &crate::DeviceInfo) -> Self {
        Device {
            name: d.name.into(),
            bus: d.bus.into(),
            base: d.base,
            len: d.len,
        }
    }
}

/// The balloon as `vm.info` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonInfo {
    /// The target: memory the guest is asked to give back.
    pub target_mib: u64,
    /// What the guest says the balloon holds.
    pub actual_mib: u64,
    pub options: virtio::balloon::BalloonOptions,
    #[serde(flatten)]
    pub state: virtio::balloon::BalloonState,
    /// How old `stats` are (each `vm.info` asks the guest for new ones).
    pub stats_age_ms: Option<u64>,
}

impl BalloonInfo {
    fn of(b: &virtio::balloon::BalloonHandle) -> Self {
        let state = b.state();
        BalloonInfo {
            target_mib: pages_to_mib(state.num_pages),
            actual_mib: pages_to_mib(state.actual),
            options: b.options(),
            stats_age_ms: b.stats_age().map(|d| d.as_millis() as u64),
            state,
        }
    }
}

fn pages_to_mib(pages: u32) -> u64 {
    (pages as u64 * virtio::balloon::PAGE_SIZE) >> 20
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// One request to a VMM, its body parsed: one variant per [`Endpoint`].
#[derive(Debug, Clone, PartialEq)]
pub enum ApiAction {
    VmmPing,
    VmInfo,
    VmPause,
    VmResume,
    VmPowerButton,
    VmStop,
    VmSnapshot(SnapshotRequest),
    VmMigrateSend(MigrateRequest),
    VmMigrateCancel,
    VmBalloon(BalloonRequest),
    VmRateLimit(RateLimitRequest),
    VmCgroup(crate::cgroup::CgroupLimits),
    VmCreate(Box<VmConfig>),
    VmDelete,
    VmBoot,
    VmRestore(RestoreRequest),
    VmMigrateReceive(MigrateReceiveRequest),
    VmmShutdown,
    VmCounters,
    Metrics,
}

impl ApiAction {
    pub fn endpoint(&self) -> Endpoint {
        match self {
            ApiAction::VmmPing => Endpoint::VmmPing,
            ApiAction::VmInfo => Endpoint::VmInfo,
            ApiAction::VmPause => Endpoint::VmPause,
            ApiAction::VmResume => Endpoint::VmResume,
            ApiAction::VmPowerButton => Endpoint::VmPowerButton,
            ApiAction::VmStop => Endpoint::VmStop,
            ApiAction::VmSnapshot(_) => Endpoint::VmSnapshot,
            ApiAction::VmMigrateSend(_) => Endpoint::VmMigrateSend,
            ApiAction::VmMigrateCancel => Endpoint::VmMigrateCancel,
            ApiAction::VmBalloon(_) => Endpoint::VmBalloon,
            ApiAction::VmRateLimit(_) => Endpoint::VmRateLimit,
            ApiAction::VmCgroup(_) => Endpoint::VmCgroup,
            ApiAction::VmCreate(_) => Endpoint::VmCreate,
            ApiAction::VmDelete => Endpoint::VmDelete,
            ApiAction::VmBoot => Endpoint::VmBoot,
            ApiAction::VmRestore(_) => Endpoint::VmRestore,
            ApiAction::VmMigrateReceive(_) => Endpoint::VmMigrateReceive,
            ApiAction::VmmShutdown => Endpoint::VmmShutdown,
            ApiAction::VmCounters => Endpoint::VmCounters,
            ApiAction::Metrics => Endpoint::Metrics,
        }
    }

    /// The action a request to `endpoint` with `body` asks for. Endpoints
    /// that take no body ignore one.
    pub fn parse(endpoint: Endpoint, body: &str) -> Result<Self, ApiError> {
        fn de<'a, T: Deserialize<'a>>(e: Endpoint, body: &'a str) -> Result<T, ApiError> {
            serde_json::from_str(body).map_err(|err| ApiError::BadBody {
                endpoint: e.name(),
                reason: err.to_string(),
            })
        }
        let e = endpoint;
        Ok(match e {
            Endpoint::VmmPing => ApiAction::VmmPing,
            Endpoint::VmInfo => ApiAction::VmInfo,
            Endpoint::VmPause => ApiAction::VmPause,
            Endpoint::VmResume => ApiAction::VmResume,
            Endpoint::VmPowerButton => ApiAction::VmPowerButton,
            Endpoint::VmStop => ApiAction::VmStop,
            Endpoint::VmSnapshot => ApiAction::VmSnapshot(de(e, body)?),
            Endpoint::VmMigrateSend => ApiAction::VmMigrateSend(de(e, body)?),
            Endpoint::VmMigrateCancel => ApiAction::VmMigrateCancel,
            Endpoint::VmBalloon => ApiAction::VmBalloon(de(e, body)?),
            Endpoint::VmRateLimit => ApiAction::VmRateLimit(de(e, body)?),
            Endpoint::VmCgroup => ApiAction::VmCgroup(de(e, body)?),
            Endpoint::VmCreate => ApiAction::VmCreate(Box::new(de(e, body)?)),
            Endpoint::VmDelete => ApiAction::VmDelete,
            Endpoint::VmBoot => ApiAction::VmBoot,
            Endpoint::VmRestore => ApiAction::VmRestore(de(e, body)?),
            Endpoint::VmMigrateReceive => ApiAction::VmMigrateReceive(de(e, body)?),
            Endpoint::VmmShutdown => ApiAction::VmmShutdown,
            Endpoint::VmCounters => ApiAction::VmCounters,
            Endpoint::Metrics => ApiAction::Metrics,
        })
    }

    /// The request body that carries this action (empty for none).
    pub fn body(&self) -> Result<String, serde_json::Error> {
        match self {
            ApiAction::VmSnapshot(r) => serde_json::to_string(r),
            ApiAction::VmMigrateSend(r) => serde_json::to_string(r),
            ApiAction::VmBalloon(r) => serde_json::to_string(r),
            ApiAction::VmRateLimit(r) => serde_json::to_string(r),
            ApiAction::VmCgroup(r) => serde_json::to_string(r),
            ApiAction::VmCreate(c) => serde_json::to_string(c),
            ApiAction::VmRestore(r) => serde_json::to_string(r),
            ApiAction::VmMigrateReceive(r) => serde_json::to_string(r),
            _ => Ok(String::new()),
        }
    }

    /// Have `handler` carry the action out.
    pub fn dispatch(&self, handler: &dyn RequestHandler) -> Result<ApiReply, ApiError> {
        let done = |r: Result<(), ApiError>| r.map(|()| ApiReply::Empty);
        match self {
            ApiAction::VmmPing => Ok(ApiReply::Ping(handler.vmm_ping())),
            ApiAction::VmInfo => handler.vm_info().map(|i| ApiReply::Info(Box::new(i))),
            ApiAction::VmPause => done(handler.vm_pause()),
            ApiAction::VmResume => done(handler.vm_resume()),
            ApiAction::VmPowerButton => done(handler.vm_power_button()),
            ApiAction::VmStop => done(handler.vm_stop()),
            ApiAction::VmSnapshot(r) => done(handler.vm_snapshot(r)),
            ApiAction::VmMigrateSend(r) => handler.vm_migrate_send(r).map(ApiReply::Migrated),
            ApiAction::VmMigrateCancel => done(handler.vm_migrate_cancel()),
            ApiAction::VmBalloon(r) => done(handler.vm_balloon(r)),
            ApiAction::VmRateLimit(r) => done(handler.vm_rate_limit(r)),
            ApiAction::VmCgroup(r) => done(handler.vm_cgroup(r)),
            ApiAction::VmCreate(c) => done(handler.vm_create(c)),
            ApiAction::VmDelete => done(handler.vm_delete()),
            ApiAction::VmBoot => done(handler.vm_boot()),
            ApiAction::VmRestore(r) => done(handler.vm_restore(r)),
            ApiAction::VmMigrateReceive(r) => done(handler.vm_migrate_receive(r)),
            ApiAction::VmmShutdown => done(handler.vmm_shutdown()),
            ApiAction::VmCounters => handler
                .vm_counters()
                .map(|c| ApiReply::Counters(Box::new(c))),
            ApiAction::Metrics => handler.metrics().map(ApiReply::Metrics),
        }
    }
}

/// A successful answer.
#[derive(Debug, Clone)]
pub enum ApiReply {
    /// Done; nothing to say (HTTP 204).
    Empty,
    Ping(PingReply),
    Info(Box<VmInfoReply>),
    /// The VM is on the destination now.
    Migrated(MigrationReport),
    Counters(Box<VmCounters>),
    /// Prometheus text (not JSON: see [`ApiReply::text`]).
    Metrics(String),
}

impl ApiReply {
    /// The JSON body of the answer (none for [`ApiReply::Empty`]).
    pub fn to_json(&self) -> Option<Result<Vec<u8>, serde_json::Error>> {
        match self {
            ApiReply::Empty => None,
            ApiReply::Ping(p) => Some(serde_json::to_vec(p)),
            ApiReply::Info(i) => Some(serde_json::to_vec(i)),
            ApiReply::Migrated(m) => Some(serde_json::to_vec(m)),
            ApiReply::Counters(c) => Some(serde_json::to_vec(c)),
            ApiReply::Metrics(t) => Some(Ok(t.clone().into_bytes())),
        }
    }

    /// The content type of a reply that is not JSON.
    pub fn text(&self) -> Option<&'static str> {
        match self {
            ApiReply::Metrics(_) => Some(metrics::CONTENT_TYPE),
            _ => None,
        }
    }

    /// Read the successful answer to a request to `endpoint`.
    pub fn from_json(endpoint: Endpoint, body: &str) -> Result<Self, serde_json::Error> {
        Ok(match endpoint {
            Endpoint::VmmPing => ApiReply::Ping(serde_json::from_str(body)?),
            Endpoint::VmInfo => ApiReply::Info(serde_json::from_str(body)?),
            Endpoint::VmMigrateSend => ApiReply::Migrated(serde_json::from_str(body)?),
            Endpoint::VmCounters => ApiReply::Counters(serde_json::from_str(body)?),
            Endpoint::Metrics => ApiReply::Metrics(body.to_string()),
            _ => ApiReply::Empty,
        })
    }
}

/// Why a request was refused. [`http`] gives each its HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not the JSON the endpoint takes.
    #[error("bad {endpoint} request: {reason}")]
    BadBody {
        endpoint: &'static str,
        reason: String,
    },
    /// `vm.create` with settings that cannot make a VM.
    #[error("bad VM configuration: {0}")]
    BadConfig(VmmError),
    #[error("balloon target {target_mib} MiB is more than the guest's {ram_mib} MiB of RAM")]
    BalloonTooLarge { target_mib: u64, ram_mib: u64 },
    #[error(
        "no VM runs in this VMM: create one (vm.create, then vm.boot), or use vm.restore or vm.migrate-receive"
    )]
    NoVm,
    #[error("a VM already runs in this VMM (one VM per VMM process)")]
    VmRuns,
    #[error("this VMM was started with its VM; it runs one VM only")]
    StartedWithVm,
    #[error("a VM is already created: boot it (vm.boot) or delete it (vm.delete) first")]
    AlreadyCreated,
    #[error("no VM is created: PUT /api/v1/vm.create first")]
    NotCreated,
    /// A restore or a migration into a VMM that holds a created VM.
    #[error("a VM is created: delete it (vm.delete) to {instead} instead")]
    CreatedInstead { instead: &'static str },
    #[error("a migration is in progress (vm.migrate-cancel gives it up)")]
    Migrating,
    #[error("no migration is in progress")]
    NotMigrating,
    #[error("this VM has no balloon device (start it with --balloon)")]
    NoBalloon,
    #[error(
        "no disk, NIC or rate group is named '{0}' (disks are disk0, disk1, ...; NICs net0, ...)"
    )]
    NoRateLimitTarget(String),
    #[error("bad rate limit for '{target}': {reason}")]
    BadRateLimit { target: String, reason: String },
    #[error("the VM is paused: resume it first")]
    Paused,
    /// Pause or resume did not fit the VM's run state, or timed out.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The VMM could not do it.
    #[error(transparent)]
    Vmm(#[from] VmmError),
}

/// What the VMM side does for each action. Every method either does all
/// of its work or returns an error having changed nothing.
pub trait RequestHandler: Send + Sync {
    fn vmm_ping(&self) -> PingReply {
        PingReply {
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }
    fn vm_info(&self) -> Result<VmInfoReply, ApiError>;
    fn vm_pause(&self) -> Result<(), ApiError>;
    fn vm_resume(&self) -> Result<(), ApiError>;
    fn vm_power_button(&self) -> Result<(), ApiError>;
    /// The VM stops once the answer is out ([`RequestHandler::after_reply`]).
    fn vm_stop(&self) -> Result<(), ApiError>;
    fn vm_snapshot(&self, req: &SnapshotRequest) -> Result<(), ApiError>;
    /// Returns once the destination has the VM; this VMM then ends (in
    /// [`RequestHandler::after_reply`]).
    fn vm_migrate_send(&self, req: &MigrateRequest) -> Result<MigrationReport, ApiError>;
    fn vm_migrate_cancel(&self) -> Result<(), ApiError>;
    fn vm_balloon(&self, req: &BalloonRequest) -> Result<(), ApiError>;
    fn vm_rate_limit(&self, req: &RateLimitRequest) -> Result<(), ApiError>;
    /// Change the VMM's cgroup limits (it has one only with `--cgroup`).
    fn vm_cgroup(&self, req: &crate::cgroup::CgroupLimits) -> Result<(), ApiError> {
        let cg = crate::cgroup::current().ok_or(ApiError::Vmm(
            crate::cgroup::CgroupError::NotInCgroup.into(),
        ))?;
        cg.update(req).map_err(|e| ApiError::Vmm(e.into()))?;
        crate::events::cgroup_changed(cg.path());
        Ok(())
    }
    fn vm_create(&self, config: &VmConfig) -> Result<(), ApiError>;
    fn vm_delete(&self) -> Result<(), ApiError>;
    fn vm_boot(&self) -> Result<(), ApiError>;
    fn vm_restore(&self, req: &RestoreRequest) -> Result<(), ApiError>;
    fn vm_migrate_receive(&self, req: &MigrateReceiveRequest) -> Result<(), ApiError>;
    /// The VMM stops once the answer is out ([`RequestHandler::after_reply`]).
    fn vmm_shutdown(&self) -> Result<(), ApiError>;
    /// The running VM's counters.
    fn vm_counters(&self) -> Result<VmCounters, ApiError>;
    /// The same counters as Prometheus text.
    fn metrics(&self) -> Result<String, ApiError> {
        self.vm_counters()
            .map(|c| crate::counters::render_prometheus(&c))
    }
    /// Called once the successful answer to `action` has been sent: what
    /// must not happen before the client has its answer (the VMM ending
    /// after a migration, a stop or a shutdown) happens here.
    fn after_reply(&self, action: &ApiAction, reply: &ApiReply);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ImageFormat;

    #[test]
    fn every_endpoint_has_its_own_path_and_action() {
        for (i, e) in Endpoint::ALL.into_iter().enumerate() {
            assert_eq!(Endpoint::from_path(e.path()), Some(e));
            assert_eq!(ROUTES[i].1, e.path());
            assert!(matches!(e.method(), "GET" | "PUT"));
            // Endpoints with a body refuse an empty one; the others parse.
            if let Ok(a) = ApiAction::parse(e, "") {
                assert_eq!(a.endpoint(), e);
                assert_eq!(a.body().unwrap(), "");
            }
        }
        let paths: std::collections::BTreeSet<_> = ROUTES.iter().map(|r| r.1).collect();
        assert_eq!(paths.len(), ROUTES.len());
        assert_eq!(Endpoint::from_path("/api/v1/nope"), None);
        assert_eq!(Endpoint::VmMigrateSend.name(), "vm.migrate-send");
    }

    #[test]
    fn actions_round_trip_through_their_bodies() {
        let actions = [
            ApiAction::VmSnapshot(SnapshotRequest {
                destination: "/s".into(),
            }),
            ApiAction::VmMigrateSend(MigrateRequest {
                destination: "h:1".into(),
                max_bandwidth_mib: Some(5),
            }),
            ApiAction::VmBalloon(BalloonRequest { target_mib: 3 }),
            ApiAction::VmCreate(Box::new(VmConfig::new("/k".into()))),
            ApiAction::VmRestore(RestoreRequest {
                source: "/s".into(),
                accel: Some(Accel::Emu),
                allow_tsc_change: true,
                overlays: vec!["/o".into()],
                taps: vec!["t0".into()],
                disks: vec!["/d".into()],
                serial: Some(SerialMode::None),
            }),
            ApiAction::VmMigrateReceive(MigrateReceiveRequest {
                listen: "0.0.0.0:7".into(),
                accel: None,
                allow_tsc_change: false,
                serial: None,
            }),
        ];
        for a in actions {
            let body = a.body().unwrap();
            assert_eq!(ApiAction::parse(a.endpoint(), &body).unwrap(), a, "{body}");
        }
        let e = ApiAction::parse(Endpoint::VmBalloon, r#"{"target":1}"#).unwrap_err();
        assert!(e.to_string().starts_with("bad vm.balloon request: "), "{e}");
    }

    #[test]
    fn info_replies_read_back() {
        let empty = VmInfoReply {
            state: VmState::NotCreated,
            config: None,
            vm: None,
        };
        let text = serde_json::to_string(&empty).unwrap();
        assert_eq!(text, r#"{"state":"not-created","config":null}"#);
        let running = VmInfoReply {
            state: VmState::Paused,
            config: Some(VmConfig::new("/k".into())),
            vm: Some(RunningVmInfo {
                accel: hypervisor::AccelKind::Emu,
                memory_bytes: 64 << 20,
                vcpus: 1,
                devices: vec![Device {
                    name: "serial (COM1)".into(),
                    bus: "pio".into(),
                    base: 0x3f8,
                    len: 8,
                }],
                balloon: Some(BalloonInfo {
                    target_mib: 1,
                    actual_mib: 0,
                    options: Default::default(),
                    state: Default::default(),
                    stats_age_ms: None,
                }),
                threads: Vec::new(),
            }),
        };
        let text = serde_json::to_string(&running).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["state"], "paused");
        assert_eq!(v["accel"], "emu");
        assert_eq!(v["balloon"]["num_pages"], 0);
        let back = match ApiReply::from_json(Endpoint::VmInfo, &text).unwrap() {
            ApiReply::Info(i) => i,
            other => panic!("{other:?}"),
        };
        assert_eq!(serde_json::to_string(&back).unwrap(), text);
        let back: VmInfoReply =
            serde_json::from_str(r#"{"state":"created","config":null}"#).unwrap();
        assert!(back.vm.is_none());
    }

    /// The property names of `schema` in docs/openapi.json.
    fn documented(doc: &serde_json::Value, schema: &str) -> Vec<String> {
        let props = doc["components"]["schemas"][schema]["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("docs/openapi.json has no schema {schema}"));
        let mut keys: Vec<String> = props.keys().cloned().collect();
        keys.sort();
        keys
    }

    /// The field names a value serializes with (every field set).
    fn fields<T: Serialize>(v: &T) -> Vec<String> {
        let v = serde_json::to_value(v).unwrap();
        let mut keys: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        keys
    }

    /// docs/openapi.json describes the bodies as the types (de)serialize them.
    #[test]
    fn openapi_schemas_match_the_types() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json");
        let doc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let balloon = BalloonInfo {
            target_mib: 1,
            actual_mib: 0,
            options: Default::default(),
            state: Default::default(),
            stats_age_ms: Some(3),
        };
        let device = Device {
            name: "serial (COM1)".into(),
            bus: "pio".into(),
            base: 0x3f8,
            len: 8,
        };
        let mut config = VmConfig::new("/k".into());
        config
            .disks
            .push("path=/d,format=raw,serial=s".parse().unwrap());
        config
            .nets
            .push("tap=t0,mac=52:54:00:12:34:56,mrg_rxbuf=on".parse().unwrap());
        // A user NIC's field, set here so that every documented field shows.
        config.nets[0].mtu = Some(65520);
        config.balloon = Some(Default::default());
        config.exit_device = Some(Default::default());
        config.pvpanic = true;
        config.cpu_affinity = "0=0".parse().unwrap();
        config.fs.push("tag=t,socket=/s".parse().unwrap());
        config.virtiofsd = Some("/v".into());
        let info = VmInfoReply {
            state: VmState::Running,
            config: Some(config.clone()),
            vm: Some(RunningVmInfo {
                accel: hypervisor::AccelKind::Kvm,
                memory_bytes: 1,
                vcpus: 1,
                devices: vec![device.clone()],
                balloon: Some(balloon.clone()),
                threads: vec![threads::ThreadInfo {
                    tid: 7,
                    role: "vcpu".into(),
                    name: "vcpu 0".into(),
                    vcpu: Some(0),
                }],
            }),
        };
        let report = MigrationReport {
            destination: "h:1".into(),
            total_ms: 1,
            downtime_ms: 1,
            downtime_us: 1,
            bytes: 1,
            iterations: 1,
            pages: 1,
            final_pages: 1,
            final_bytes: 1,
        };
        let restore = RestoreRequest {
            source: "/s".into(),
            accel: Some(Accel::Kvm),
            allow_tsc_change: true,
            overlays: vec![],
            taps: vec![],
            disks: vec![],
            serial: Some(SerialMode::Stdio),
        };
        let receive = MigrateReceiveRequest {
            listen: "0.0.0.0:1".into(),
            accel: Some(Accel::Emu),
            allow_tsc_change: true,
            serial: Some(SerialMode::None),
        };
        let migrate = MigrateRequest {
            destination: "h:1".into(),
            max_bandwidth_mib: Some(1),
        };
        let counters = crate::counters::tests::full_counters();
        let limiter = crate::config::RateLimiterConfig {
            bandwidth: Some(crate::config::bucket_for_rate(1 << 20)),
            ops: Some(crate::config::bucket_for_rate(100)),
        };
        let cgroup = crate::cgroup::CgroupLimits {
            cpu_max: Some("150%".parse().unwrap()),
            cpu_weight: Some(100),
            memory_max: Some(crate::cgroup::MemoryLimit::Bytes(1 << 30)),
            memory_high: Some(crate::cgroup::MemoryLimit::Max),
        };
        let rate_limit = RateLimitRequest {
            target: "disk0".into(),
            rate_limiter: Some(limiter),
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        };
        let pairs = [
            (
                "Ping",
                fields(&PingReply {
                    version: "0".into(),
                }),
            ),
            ("Error", fields(&ErrorBody { error: "e".into() })),
            ("Device", fields(&device)),
            ("Balloon", fields(&balloon)),
            ("VmInfo", fields(&info)),
            ("Thread", fields(&info.vm.as_ref().unwrap().threads[0])),
            ("MigrationReport", fields(&report)),
            (
                "SnapshotRequest",
                fields(&SnapshotRequest {
                    destination: "/s".into(),
                }),
            ),
            ("BalloonRequest", fields(&BalloonRequest { target_mib: 1 })),
            ("RateLimitRequest", fields(&rate_limit)),
            ("CgroupLimits", fields(&cgroup)),
            ("CpuMax", fields(&cgroup.cpu_max)),
            ("RateLimiter", fields(&limiter)),
            ("TokenBucket", fields(&limiter.bandwidth)),
            ("MigrateRequest", fields(&migrate)),
            ("RestoreRequest", fields(&restore)),
            ("MigrateReceiveRequest", fields(&receive)),
            ("VmConfig", fields(&config)),
            ("DiskConfig", fields(&config.disks[0])),
            ("NetConfig", fields(&config.nets[0])),
            ("BalloonConfig", fields(&config.balloon)),
            ("ExitDeviceConfig", fields(&config.exit_device)),
            ("FsConfig", fields(&config.fs[0])),
            ("VmCounters", fields(&counters)),
            ("MemoryCounters", fields(&counters.memory)),
            ("VcpuCounters", fields(&counters.vcpus[0])),
            ("EngineCounters", fields(&counters.vcpus[0].engine)),
            ("DiskCounters", fields(&counters.disks[0])),
            ("OpCounters", fields(&counters.disks[0].stats.read)),
            ("Histogram", fields(&counters.disks[0].stats.latency_us)),
            ("NetCounters", fields(&counters.nets[0])),
            ("VirtioCounters", fields(&counters.virtio[0])),
            ("OperationProgress", fields(&counters.operation)),
        ];
        for (schema, fields) in pairs {
            assert_eq!(documented(&doc, schema), fields, "schema {schema}");
        }
        let states: Vec<_> = [
            VmState::NotCreated,
            VmState::Created,
            VmState::Running,
            VmState::Paused,
        ]
        .iter()
        .map(|s| serde_json::to_value(s).unwrap())
        .collect();
        let schema = &doc["components"]["schemas"]["VmInfo"]["properties"];
        assert_eq!(schema["state"]["enum"].as_array().unwrap(), &states);
        let formats: Vec<_> = [
            ImageFormat::Raw,
            ImageFormat::Qcow2,
            ImageFormat::Vmdk,
            ImageFormat::Vhdx,
        ]
        .iter()
        .map(|f| serde_json::to_value(f).unwrap())
        .collect();
        let schema = &doc["components"]["schemas"]["DiskConfig"]["properties"];
        assert_eq!(schema["format"]["enum"].as_array().unwrap(), &formats);
    }
}
