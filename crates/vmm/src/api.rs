//! The management API: HTTP/1.1 with JSON bodies over a Unix socket
//! (`vireo run --api-socket PATH`). Described by docs/openapi.json, which
//! the tests hold against [`ROUTES`].

use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

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
];

/// What the API needs from a VM, gathered before the VM starts running.
#[derive(Clone)]
pub struct ApiContext {
    pub control: Arc<VmControl>,
    pub info: VmInfo,
    pub config: Option<crate::VmConfig>,
    pub exits: Sender<VmExit>,
    pub power_button: Arc<Mutex<devices::acpi::AcpiPm>>,
}

#[derive(Serialize)]
struct InfoBody<'a> {
    #[serde(flatten)]
    info: VmInfo,
    config: &'a Option<crate::VmConfig>,
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
    pub fn start(path: &Path, ctx: ApiContext) -> Result<Self, String> {
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
                for req in s.incoming_requests() {
                    handle(&ctx, req);
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

/// Answer one request. A request that fails changes nothing.
pub fn route(ctx: &ApiContext, method: &str, path: &str) -> Response<std::io::Cursor<Vec<u8>>> {
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
    match path {
        "/api/v1/vmm.ping" => json(
            200,
            &serde_json::json!({ "version": env!("CARGO_PKG_VERSION") }),
        ),
        "/api/v1/vm.info" => {
            let info = VmInfo {
                state: ctx.control.state(),
                ..ctx.info.clone()
            };
            json(
                200,
                &InfoBody {
                    info,
                    config: &ctx.config,
                },
            )
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
            match ctx.power_button.lock() {
                Ok(mut pm) => {
                    pm.press_power_button();
                    no_content()
                }
                Err(_) => error(500, "the ACPI device is unusable"),
            }
        }
        "/api/v1/vm.stop" => {
            let _ = ctx.exits.send(VmExit::Stopped);
            no_content()
        }
        _ => error(404, format!("no such endpoint: {path}")),
    }
}

fn handle(ctx: &ApiContext, req: Request) {
    let method = match req.method() {
        Method::Get => "GET",
        Method::Put => "PUT",
        Method::Post => "POST",
        Method::Delete => "DELETE",
        Method::Patch => "PATCH",
        Method::Head => "HEAD",
        _ => "OTHER",
    };
    let resp = route(ctx, method, req.url());
    if let Err(e) = req.respond(resp) {
        tracing::debug!("API client went away: {e}");
    }
}

/// A minimal client for the same API, used by `vireo pause` and friends.
pub mod client {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::path::Path;

    /// The HTTP status and body of a response.
    pub fn request(socket: &Path, method: &str, path: &str) -> Result<(u16, String), String> {
        let mut s = UnixStream::connect(socket)
            .map_err(|e| format!("cannot connect to API socket {}: {e}", socket.display()))?;
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
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
