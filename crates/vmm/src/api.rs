//! The management API: HTTP/1.1 with JSON bodies over a Unix socket
//! (`vireo run --api-socket PATH`). Described by docs/openapi.json, which
//! the tests hold against [`ROUTES`].

use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, RwLock};

use serde::Serialize;
use tiny_http::{Header, Method, Request, Response, Server};

use crate::control::{ControlError, VmControl};
use crate::{VmExit, VmInfo};

/// Every operation the server answers: (method, path, summary).
pub const ROUTES: &[(&str, &str, &str)] = &[
    (
        "GET",
        "/api/v1/vmm.ping",
        "Vireo's version; checks the API is up",
    ),
    (
        "GET",
        "/api/v1/vm.info",
        "The VM's state, configuration, vCPUs and devices",
    ),
    (
        "PUT",
        "/api/v1/vm.pause",
        "Stop every vCPU outside the guest",
    ),
    ("PUT", "/api/v1/vm.resume", "Let paused vCPUs run again"),
    (
        "PUT",
        "/api/v1/vm.power-button",
        "Press the ACPI power button (the guest shuts down)",
    ),
    (
        "PUT",
        "/api/v1/vm.stop",
        "Stop the VM at once (the VMM exits 0)",
    ),
    (
        "PUT",
        "/api/v1/vm.snapshot",
        "Write a paused VM to a new directory",
    ),
    (
        "PUT",
        "/api/v1/vm.migrate-send",
        "Live-migrate the VM to a `vireo migrate-receive` over TCP (this VMM then exits 0)",
    ),
    (
        "PUT",
        "/api/v1/vm.migrate-cancel",
        "Give up the live migration in progress (the VM runs on here)",
    ),
    (
        "PUT",
        "/api/v1/vm.balloon",
        "Set the balloon's target size: memory the guest is asked to give back",
    ),
    (
        "PUT",
        "/api/v1/vm.create",
        "Store a VM configuration in an empty VMM (boot it with vm.boot)",
    ),
    (
        "PUT",
        "/api/v1/vm.delete",
        "Drop the configuration vm.create stored (before vm.boot)",
    ),
    ("PUT", "/api/v1/vm.boot", "Build and start the created VM"),
    (
        "PUT",
        "/api/v1/vm.restore",
        "Start a VM in an empty VMM from a snapshot directory",
    ),
    (
        "PUT",
        "/api/v1/vm.migrate-receive",
        "Wait on a TCP address for a live migration and run the VM it brings",
    ),
    (
        "PUT",
        "/api/v1/vmm.shutdown",
        "Stop the VMM process (and its VM, if one runs)",
    ),
];

/// What the API needs from a VM, gathered before the VM starts running.
#[derive(Clone)]
pub struct ApiContext {
    pub control: Arc<VmControl>,
    pub info: VmInfo,
    pub config: Option<crate::VmConfig>,
    pub exits: Sender<VmExit>,
    pub vm: Arc<crate::VmHandle>,
}

/// What the server answers for: the running VM once there is one; before
/// that (a VMM started with only `--api-socket`) the configuration
/// `vm.create` stored and the way to ask the VMM's main thread for a VM.
pub struct ApiShared {
    vm: RwLock<Option<ApiContext>>,
    created: Mutex<Option<crate::VmConfig>>,
    /// None when the VMM was started with its VM (`vireo run --kernel`).
    launcher: Option<Mutex<Sender<crate::LaunchRequest>>>,
    /// The cancel flag of the migration in progress, if one is.
    migrating: Mutex<Option<crate::migration::Cancel>>,
}

impl ApiShared {
    /// A server for a VMM that already runs its VM.
    pub fn with_vm(ctx: ApiContext) -> Arc<Self> {
        Arc::new(ApiShared {
            vm: RwLock::new(Some(ctx)),
            created: Mutex::new(None),
            launcher: None,
            migrating: Mutex::new(None),
        })
    }

    /// A server for an empty VMM whose main thread takes launches on `tx`.
    pub(crate) fn empty(tx: Sender<crate::LaunchRequest>) -> Arc<Self> {
        Arc::new(ApiShared {
            vm: RwLock::new(None),
            created: Mutex::new(None),
            launcher: Some(Mutex::new(tx)),
            migrating: Mutex::new(None),
        })
    }

    /// The VM is built: from now on requests go to it.
    pub(crate) fn set_vm(&self, ctx: ApiContext) {
        // `created` is not touched here: vm.boot holds its lock meanwhile.
        *self.vm.write().unwrap_or_else(|e| e.into_inner()) = Some(ctx);
    }

    fn vm(&self) -> Option<ApiContext> {
        self.vm.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Hand a launch to the main thread and wait for its outcome.
    fn launch(&self, launch: crate::Launch) -> Result<(), crate::VmmError> {
        let Some(tx) = &self.launcher else {
            return Err(crate::VmmError::Conflict(
                "this VMM was started with its VM; it runs one VM only".into(),
            ));
        };
        let (reply, outcome) = std::sync::mpsc::channel();
        lock(tx)
            .send(crate::LaunchRequest { launch, reply })
            .map_err(|_| crate::VmmError::VmmStopped("the VMM is shutting down"))?;
        outcome
            .recv()
            .map_err(|_| crate::VmmError::VmmStopped("the VMM stopped before answering"))?
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RestoreRequest {
    /// The snapshot directory.
    source: PathBuf,
    /// The accelerator to restore under [default: the snapshot's].
    #[serde(default)]
    accel: Option<crate::Accel>,
    /// Under the other accelerator, accept a TSC at another rate.
    #[serde(default)]
    allow_tsc_change: bool,
    /// New qcow2 overlays, one per disk (makes the VM a clone).
    #[serde(default)]
    overlays: Vec<PathBuf>,
    /// Taps for the snapshot's NICs, in order.
    #[serde(default)]
    taps: Vec<String>,
    /// Where the console goes [default: stdio of the VMM].
    #[serde(default)]
    serial: Option<crate::SerialMode>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MigrateReceiveRequest {
    /// ADDR:PORT to wait on.
    listen: String,
    /// The accelerator to run it under [default: the source's].
    #[serde(default)]
    accel: Option<crate::Accel>,
    #[serde(default)]
    allow_tsc_change: bool,
    #[serde(default)]
    serial: Option<crate::SerialMode>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotRequest {
    destination: PathBuf,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MigrateRequest {
    /// HOST:PORT of the receiving Vireo.
    destination: String,
    /// Pre-copy bandwidth cap in MiB/s (the paused final round is not capped).
    #[serde(default)]
    max_bandwidth_mib: Option<u64>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BalloonRequest {
    target_mib: u64,
}

/// The balloon as `vm.info` shows it.
#[derive(Serialize)]
struct BalloonInfo {
    /// The target: memory the guest is asked to give back.
    target_mib: u64,
    /// What the guest says the balloon holds.
    actual_mib: u64,
    options: virtio::balloon::BalloonOptions,
    #[serde(flatten)]
    state: virtio::balloon::BalloonState,
    /// How old `stats` are (each `vm.info` asks the guest for new ones).
    stats_age_ms: Option<u64>,
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

#[derive(Serialize)]
struct InfoBody<'a> {
    #[serde(flatten)]
    info: VmInfo,
    config: &'a Option<crate::VmConfig>,
    /// Null without a balloon device.
    balloon: Option<BalloonInfo>,
}

#[derive(Serialize)]
struct ErrorBody {
    error: String,
}

/// A listening API server; the socket file is removed on drop.
pub struct ApiServer {
    path: PathBuf,
    server: Arc<Server>,
}

impl ApiServer {
    /// Bind the socket and serve requests on a thread of its own.
    pub fn start(path: &Path, shared: Arc<ApiShared>) -> Result<Self, String> {
        if path.exists() {
            // A stale socket from a VMM that died: refuse if someone listens.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(format!(
                    "API socket {} is in use by another process",
                    path.display()
                ));
            }
            let _ = std::fs::remove_file(path);
        }
        let server = Server::http_unix(path)
            .map_err(|e| format!("cannot listen on API socket {}: {e}", path.display()))?;
        let server = Arc::new(server);
        let s = server.clone();
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                // A thread per request: a migration or a restore takes a
                // while, and info or migrate-cancel must answer meanwhile.
                for req in s.incoming_requests() {
                    let shared = shared.clone();
                    let spawned = std::thread::Builder::new()
                        .name("api-request".into())
                        .spawn(move || handle(&shared, req));
                    if let Err(e) = spawned {
                        tracing::warn!("API: cannot start a request thread: {e}");
                    }
                }
            })
            .map_err(|e| format!("cannot start the API thread: {e}"))?;
        Ok(ApiServer {
            path: path.to_path_buf(),
            server,
        })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.server.unblock();
        let _ = std::fs::remove_file(&self.path);
    }
}

fn json<T: Serialize>(status: u16, body: &T) -> Response<std::io::Cursor<Vec<u8>>> {
    let text = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let ct = Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..])
        .expect("static header is valid");
    Response::from_data(text)
        .with_status_code(status)
        .with_header(ct)
}

fn error(status: u16, msg: impl Into<String>) -> Response<std::io::Cursor<Vec<u8>>> {
    json(status, &ErrorBody { error: msg.into() })
}

fn no_content() -> Response<std::io::Cursor<Vec<u8>>> {
    Response::from_data(Vec::new()).with_status_code(204)
}

fn control_error(e: ControlError) -> Response<std::io::Cursor<Vec<u8>>> {
    let status = match e {
        ControlError::AlreadyPaused | ControlError::NotPaused | ControlError::Stopping => 409,
        ControlError::Timeout(_) => 500,
    };
    error(status, e.to_string())
}

type Answer = Response<std::io::Cursor<Vec<u8>>>;

/// A VMM error as an answer, with the status its variant maps to.
fn vmm_error(e: crate::VmmError) -> Answer {
    error(e.http_status(), e.to_string())
}

fn parse<'a, T: serde::Deserialize<'a>>(what: &str, body: &'a str) -> Result<T, Answer> {
    serde_json::from_str(body).map_err(|e| error(400, format!("bad {what} request: {e}")))
}

const NO_VM: &str =
    "no VM runs in this VMM: create one (vm.create, then vm.boot), or use vm.restore or vm.migrate-receive";

/// Answer one request. A request that fails changes nothing.
pub fn route(shared: &ApiShared, method: &str, path: &str, body: &str) -> Answer {
    let path = path.split('?').next().unwrap_or(path);
    let Some(&(want, _, _)) = ROUTES.iter().find(|(_, p, _)| *p == path) else {
        return error(404, format!("no such endpoint: {path}"));
    };
    if method != want {
        return error(
            405,
            format!("{method} is not allowed on {path} (use {want})"),
        );
    }
    let vm = shared.vm();
    match (path, vm) {
        ("/api/v1/vmm.ping", _) => json(
            200,
            &serde_json::json!({ "version": env!("CARGO_PKG_VERSION") }),
        ),
        // The VMM stops once the answer is out (see `handle`).
        ("/api/v1/vmm.shutdown", _) => no_content(),
        (
            "/api/v1/vm.create"
            | "/api/v1/vm.delete"
            | "/api/v1/vm.boot"
            | "/api/v1/vm.restore"
            | "/api/v1/vm.migrate-receive",
            Some(_),
        ) => error(
            409,
            "a VM already runs in this VMM (one VM per VMM process)",
        ),
        ("/api/v1/vm.info", None) => {
            let created = lock(&shared.created).clone();
            let state = if created.is_some() {
                "created"
            } else {
                "not-created"
            };
            json(
                200,
                &serde_json::json!({ "state": state, "config": created }),
            )
        }
        ("/api/v1/vm.create", None) => {
            let config: crate::VmConfig = match parse("create", body) {
                Ok(c) => c,
                Err(e) => return e,
            };
            if shared.launcher.is_none() {
                return error(409, "this VMM was started with its VM");
            }
            let mut created = lock(&shared.created);
            if created.is_some() {
                return error(
                    409,
                    "a VM is already created: boot it (vm.boot) or delete it (vm.delete) first",
                );
            }
            if let Err(e) = config
                .validate()
                .and_then(|_| config.check_files())
                .and_then(|_| crate::VmSpec::from_config(&config).map(|_| ()))
            {
                return error(400, format!("bad VM configuration: {e}"));
            }
            *created = Some(config);
            no_content()
        }
        ("/api/v1/vm.delete", None) => match lock(&shared.created).take() {
            Some(_) => no_content(),
            None => error(409, "no VM is created"),
        },
        ("/api/v1/vm.boot", None) => {
            // Held across the launch: a concurrent create or delete waits.
            let mut created = lock(&shared.created);
            let Some(config) = created.clone() else {
                return error(409, "no VM is created: PUT /api/v1/vm.create first");
            };
            match shared.launch(crate::Launch::Boot(config)) {
                Ok(()) => {
                    *created = None;
                    no_content()
                }
                Err(e) => vmm_error(e),
            }
        }
        ("/api/v1/vm.restore", None) => {
            let req: RestoreRequest = match parse("restore", body) {
                Ok(r) => r,
                Err(e) => return e,
            };
            if lock(&shared.created).is_some() {
                return error(
                    409,
                    "a VM is created: delete it (vm.delete) to restore instead",
                );
            }
            shared
                .launch(crate::Launch::Restore {
                    dir: req.source,
                    opts: crate::RestoreOptions {
                        accel: req.accel,
                        allow_tsc_change: req.allow_tsc_change,
                    },
                    clone: crate::CloneOptions {
                        overlays: req.overlays,
                        taps: req.taps,
                    },
                    serial: req.serial.unwrap_or(crate::SerialMode::Stdio),
                })
                .map_or_else(vmm_error, |_| no_content())
        }
        ("/api/v1/vm.migrate-receive", None) => {
            let req: MigrateReceiveRequest = match parse("migrate-receive", body) {
                Ok(r) => r,
                Err(e) => return e,
            };
            if lock(&shared.created).is_some() {
                return error(
                    409,
                    "a VM is created: delete it (vm.delete) to receive one instead",
                );
            }
            shared
                .launch(crate::Launch::MigrateReceive {
                    listen: req.listen,
                    opts: crate::RestoreOptions {
                        accel: req.accel,
                        allow_tsc_change: req.allow_tsc_change,
                    },
                    serial: req.serial.unwrap_or(crate::SerialMode::Stdio),
                })
                .map_or_else(vmm_error, |_| no_content())
        }
        (_, None) => error(409, NO_VM),
        (path, Some(ctx)) => vm_route(shared, &ctx, path, body),
    }
}

/// The operations on a running VM.
fn vm_route(shared: &ApiShared, ctx: &ApiContext, path: &str, body: &str) -> Answer {
    let migrating = lock(&shared.migrating).clone();
    if migrating.is_some()
        && matches!(
            path,
            "/api/v1/vm.pause"
                | "/api/v1/vm.resume"
                | "/api/v1/vm.snapshot"
                | "/api/v1/vm.migrate-send"
        )
    {
        return error(
            409,
            "a migration is in progress (vm.migrate-cancel gives it up)",
        );
    }
    match path {
        "/api/v1/vm.migrate-cancel" => match migrating {
            Some(cancel) => {
                cancel.cancel();
                no_content()
            }
            None => error(409, "no migration is in progress"),
        },
        "/api/v1/vm.info" => {
            let info = VmInfo {
                state: ctx.control.state(),
                ..ctx.info.clone()
            };
            let balloon = ctx.vm.balloon();
            let body = InfoBody {
                info,
                config: &ctx.config,
                balloon: balloon.map(BalloonInfo::of),
            };
            // Fresh statistics for the next look.
            if let Some(b) = balloon {
                b.request_stats();
            }
            json(200, &body)
        }
        "/api/v1/vm.balloon" => {
            let req: BalloonRequest = match parse("balloon", body) {
                Ok(r) => r,
                Err(e) => return e,
            };
            let Some(b) = ctx.vm.balloon() else {
                return error(
                    409,
                    "this VM has no balloon device (start it with --balloon)",
                );
            };
            let ram_mib = ctx.info.memory_bytes >> 20;
            if req.target_mib > ram_mib {
                return error(
                    400,
                    format!(
                        "balloon target {} MiB is more than the guest's {ram_mib} MiB of RAM",
                        req.target_mib
                    ),
                );
            }
            // At most 1 TiB of RAM: 2^28 pages fit the 32-bit num_pages.
            let pages = req.target_mib << (20 - virtio::balloon::PFN_SHIFT);
            match u32::try_from(pages) {
                Ok(p) => b.set_target_pages(p),
                Err(_) => return error(400, "balloon target too large"),
            }
            no_content()
        }
        "/api/v1/vm.pause" => ctx
            .control
            .pause()
            .map_or_else(control_error, |_| no_content()),
        "/api/v1/vm.resume" => ctx
            .control
            .resume()
            .map_or_else(control_error, |_| no_content()),
        "/api/v1/vm.power-button" => {
            if ctx.control.state() == crate::RunState::Paused {
                return error(409, "the VM is paused: resume it first");
            }
            ctx.vm.press_power_button();
            no_content()
        }
        "/api/v1/vm.snapshot" => {
            let req: SnapshotRequest = match parse("snapshot", body) {
                Ok(r) => r,
                Err(e) => return e,
            };
            ctx.vm
                .snapshot(&req.destination, ctx.config.clone())
                .map_or_else(vmm_error, |_| no_content())
        }
        "/api/v1/vm.migrate-send" => {
            let req: MigrateRequest = match parse("migration", body) {
                Ok(r) => r,
                Err(e) => return e,
            };
            let opts = crate::migration::SendOptions {
                max_bandwidth: req.max_bandwidth_mib.map(|m| m.saturating_mul(1 << 20)),
                cancel: crate::migration::Cancel::default(),
            };
            {
                let mut m = lock(&shared.migrating);
                if m.is_some() {
                    return error(409, "a migration is in progress");
                }
                *m = Some(opts.cancel.clone());
            }
            let result =
                crate::migration::send(&ctx.vm, &req.destination, ctx.config.clone(), &opts);
            *lock(&shared.migrating) = None;
            result.map_or_else(vmm_error, |report| json(200, &report))
        }
        "/api/v1/vm.stop" => {
            let _ = ctx.exits.send(VmExit::Stopped);
            no_content()
        }
        _ => error(404, format!("no such endpoint: {path}")),
    }
}

/// Request bodies are small JSON documents; refuse anything bigger.
const MAX_BODY: u64 = 64 * 1024;

fn handle(shared: &ApiShared, mut req: Request) {
    let method = match req.method() {
        Method::Get => "GET",
        Method::Put => "PUT",
        Method::Post => "POST",
        Method::Delete => "DELETE",
        Method::Patch => "PATCH",
        Method::Head => "HEAD",
        _ => "OTHER",
    };
    let mut body = String::new();
    let too_big = req.body_length().is_some_and(|n| n as u64 > MAX_BODY);
    let read = std::io::Read::read_to_string(
        &mut std::io::Read::take(req.as_reader(), MAX_BODY),
        &mut body,
    );
    let resp = if too_big {
        error(413, "request body too large")
    } else if read.is_err() {
        error(400, "request body is not UTF-8 text")
    } else {
        route(shared, method, req.url(), &body)
    };
    // A VM that migrated ends here, after its answer is out.
    let migrated = resp.status_code().0 == 200
        && req.url().split('?').next() == Some("/api/v1/vm.migrate-send");
    let to = serde_json::from_str::<MigrateRequest>(&body).map(|r| r.destination);
    let shutdown =
        resp.status_code().0 == 204 && req.url().split('?').next() == Some("/api/v1/vmm.shutdown");
    if let Err(e) = req.respond(resp) {
        tracing::debug!("API client went away: {e}");
    }
    if let (true, Some(ctx)) = (migrated, shared.vm()) {
        let _ = ctx.exits.send(VmExit::Migrated(
            to.unwrap_or_else(|_| "another Vireo".into()),
        ));
    }
    if shutdown {
        match shared.vm() {
            Some(ctx) => {
                let _ = ctx.exits.send(VmExit::Stopped);
            }
            None => {
                let _ = shared.launch(crate::Launch::Shutdown);
            }
        }
    }
}

/// A minimal client for the same API, used by `vireo pause` and friends.
pub mod client {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::path::Path;

    /// The HTTP status and body of a response.
    pub fn request(socket: &Path, method: &str, path: &str) -> Result<(u16, String), String> {
        request_with_body(socket, method, path, "")
    }

    /// The same with a JSON body.
    pub fn request_with_body(
        socket: &Path,
        method: &str,
        path: &str,
        body: &str,
    ) -> Result<(u16, String), String> {
        let mut s = UnixStream::connect(socket)
            .map_err(|e| format!("cannot connect to API socket {}: {e}", socket.display()))?;
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes())
            .map_err(|e| format!("API request failed: {e}"))?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)
            .map_err(|e| format!("API response failed: {e}"))?;
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad API response: {}", head.lines().next().unwrap_or("")))?;
        Ok((status, body.to_string()))
    }
}
