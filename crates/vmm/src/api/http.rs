//! The API over HTTP: a tiny_http server on a Unix socket that turns each
//! request into an [`ApiAction`], has a [`RequestHandler`] carry it out and
//! writes the reply (or the error, as `{"error": "..."}` with its status).
//!
//! Statuses: 404 for an unknown path, 405 for the wrong method, 413 for a
//! body over [`MAX_BODY`], the rest from [`status_of`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tiny_http::{Header, Method, Request, Response, Server};

use super::{ApiAction, ApiError, ApiReply, Endpoint, ErrorBody, RequestHandler};
use crate::control::ControlError;

/// Request bodies are small JSON documents; refuse anything bigger.
pub const MAX_BODY: u64 = 64 * 1024;

/// The HTTP status of a refused request: the one place that decides it.
pub fn status_of(e: &ApiError) -> u16 {
    match e {
        ApiError::BadBody { .. } | ApiError::BadConfig(_) | ApiError::BalloonTooLarge { .. } => 400,
        ApiError::NoVm
        | ApiError::VmRuns
        | ApiError::StartedWithVm
        | ApiError::AlreadyCreated
        | ApiError::NotCreated
        | ApiError::CreatedInstead { .. }
        | ApiError::Migrating
        | ApiError::NotMigrating
        | ApiError::NoBalloon
        | ApiError::Paused => 409,
        ApiError::Control(c) => match c {
            ControlError::AlreadyPaused | ControlError::NotPaused | ControlError::Stopping => 409,
            ControlError::Timeout(_) => 500,
        },
        // Each VMM error's variant says its status.
        ApiError::Vmm(v) => v.http_status(),
    }
}

/// A listening API server; the socket file is removed on drop.
pub struct ApiServer {
    path: PathBuf,
    server: Arc<Server>,
}

impl ApiServer {
    /// Bind the socket and serve requests on a thread of its own.
    pub fn start(path: &Path, handler: Arc<dyn RequestHandler>) -> Result<Self, String> {
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
                    let handler = handler.clone();
                    let spawned = std::thread::Builder::new()
                        .name("api-request".into())
                        .spawn(move || handle(handler.as_ref(), req));
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

type Answer = Response<std::io::Cursor<Vec<u8>>>;

fn json_answer(status: u16, body: Vec<u8>) -> Answer {
    let ct = Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..])
        .expect("static header is valid");
    Response::from_data(body)
        .with_status_code(status)
        .with_header(ct)
}

fn error(status: u16, msg: String) -> Answer {
    let body = serde_json::to_vec(&ErrorBody { error: msg }).unwrap_or_else(|_| b"{}".to_vec());
    json_answer(status, body)
}

fn reply(r: &ApiReply) -> Answer {
    match r.to_json() {
        None => Response::from_data(Vec::new()).with_status_code(204),
        Some(Ok(body)) if r.text().is_some() => {
            let ct = r.text().unwrap_or_default();
            let ct = Header::from_bytes(&b"Content-Type"[..], ct.as_bytes())
                .expect("static header is valid");
            Response::from_data(body).with_header(ct)
        }
        Some(Ok(body)) => json_answer(200, body),
        Some(Err(e)) => error(500, format!("cannot encode the answer: {e}")),
    }
}

/// Answer one request; with the action and its reply when it succeeded.
pub fn route(
    handler: &dyn RequestHandler,
    method: &str,
    url: &str,
    body: &str,
) -> (Answer, Option<(ApiAction, ApiReply)>) {
    let path = url.split('?').next().unwrap_or(url);
    let Some(endpoint) = Endpoint::from_path(path) else {
        return (error(404, format!("no such endpoint: {path}")), None);
    };
    if method != endpoint.method() {
        let want = endpoint.method();
        let msg = format!("{method} is not allowed on {path} (use {want})");
        return (error(405, msg), None);
    }
    let done = ApiAction::parse(endpoint, body)
        .and_then(|action| action.dispatch(handler).map(|r| (action, r)));
    match done {
        Ok((action, r)) => (reply(&r), Some((action, r))),
        Err(e) => (error(status_of(&e), e.to_string()), None),
    }
}

fn handle(handler: &dyn RequestHandler, mut req: Request) {
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
    let (answer, done) = if too_big {
        (error(413, "request body too large".into()), None)
    } else if read.is_err() {
        (error(400, "request body is not UTF-8 text".into()), None)
    } else {
        route(handler, method, req.url(), &body)
    };
    if let Err(e) = req.respond(answer) {
        tracing::debug!("API client went away: {e}");
    }
    if let Some((action, r)) = done {
        handler.after_reply(&action, &r);
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use super::*;
    use crate::VmmError;

    /// A VMM whose VM is always paused and whose migrations always work.
    struct Paused;

    impl RequestHandler for Paused {
        fn vm_info(&self) -> Result<VmInfoReply, ApiError> {
            Err(ApiError::NoVm)
        }
        fn vm_pause(&self) -> Result<(), ApiError> {
            Err(ControlError::AlreadyPaused.into())
        }
        fn vm_resume(&self) -> Result<(), ApiError> {
            Ok(())
        }
        fn vm_power_button(&self) -> Result<(), ApiError> {
            Err(ApiError::Paused)
        }
        fn vm_stop(&self) -> Result<(), ApiError> {
            Ok(())
        }
        fn vm_snapshot(&self, _: &SnapshotRequest) -> Result<(), ApiError> {
            Err(VmmError::VmmStopped("the VMM is shutting down").into())
        }
        fn vm_migrate_send(&self, r: &MigrateRequest) -> Result<MigrationReport, ApiError> {
            Ok(MigrationReport {
                destination: r.destination.clone(),
                total_ms: 1,
                downtime_ms: 0,
                downtime_us: 2,
                bytes: 3,
                iterations: 1,
                pages: 4,
                final_pages: 0,
                final_bytes: 5,
            })
        }
        fn vm_migrate_cancel(&self) -> Result<(), ApiError> {
            Err(ApiError::NotMigrating)
        }
        fn vm_balloon(&self, r: &BalloonRequest) -> Result<(), ApiError> {
            Err(ApiError::BalloonTooLarge {
                target_mib: r.target_mib,
                ram_mib: 1,
            })
        }
        fn vm_create(&self, _: &VmConfig) -> Result<(), ApiError> {
            Err(ApiError::VmRuns)
        }
        fn vm_delete(&self) -> Result<(), ApiError> {
            Err(ApiError::VmRuns)
        }
        fn vm_boot(&self) -> Result<(), ApiError> {
            Err(ApiError::VmRuns)
        }
        fn vm_restore(&self, _: &RestoreRequest) -> Result<(), ApiError> {
            Err(ApiError::VmRuns)
        }
        fn vm_migrate_receive(&self, _: &MigrateReceiveRequest) -> Result<(), ApiError> {
            Err(ApiError::VmRuns)
        }
        fn vmm_shutdown(&self) -> Result<(), ApiError> {
            Ok(())
        }
        fn vm_counters(&self) -> Result<VmCounters, ApiError> {
            Err(ApiError::NoVm)
        }
        fn after_reply(&self, _: &ApiAction, _: &ApiReply) {}
    }

    fn status(method: &str, url: &str, body: &str) -> (u16, bool) {
        let (answer, done) = route(&Paused, method, url, body);
        (answer.status_code().0, done.is_some())
    }

    #[test]
    fn routing_gives_each_outcome_its_status() {
        assert_eq!(status("GET", "/api/v1/nope", ""), (404, false));
        assert_eq!(status("GET", "/api/v1/vm.pause", ""), (405, false));
        assert_eq!(status("GET", "/api/v1/vmm.ping?x=1", ""), (200, true));
        assert_eq!(status("PUT", "/api/v1/vm.resume", ""), (204, true));
        assert_eq!(status("PUT", "/api/v1/vm.pause", ""), (409, false));
        assert_eq!(
            status("PUT", "/api/v1/vm.balloon", "nonsense"),
            (400, false)
        );
        assert_eq!(
            status("PUT", "/api/v1/vm.balloon", r#"{"target_mib":9}"#),
            (400, false)
        );
        assert_eq!(
            status("PUT", "/api/v1/vm.snapshot", r#"{"destination":"/s"}"#),
            (500, false)
        );
        let (answer, done) = route(
            &Paused,
            "PUT",
            "/api/v1/vm.migrate-send",
            r#"{"destination":"h:7"}"#,
        );
        assert_eq!(answer.status_code().0, 200);
        let Some((ApiAction::VmMigrateSend(req), ApiReply::Migrated(report))) = done else {
            panic!("the migration's action and report");
        };
        assert_eq!((req.destination.as_str(), report.bytes), ("h:7", 3));
    }
}
