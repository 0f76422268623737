//! A client for the same API, used by `vireo pause` and friends: an
//! [`ApiClient`] sends [`ApiAction`]s and reads typed [`ApiReply`]s;
//! [`request`] and [`request_with_body`] send raw requests (for tests and
//! tools that check statuses and bodies themselves).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use super::{
    ApiAction, ApiReply, BalloonRequest, Endpoint, ErrorBody, MigrateRequest, PingReply,
    SnapshotRequest, VmInfoReply,
};
use crate::migration::MigrationReport;

/// Why a request got no successful answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to API socket {}: {source}", socket.display())]
    Connect {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("API request failed: {0}")]
    Send(std::io::Error),
    #[error("API response failed: {0}")]
    Receive(std::io::Error),
    #[error("bad API response: {0}")]
    BadResponse(String),
    #[error("cannot encode the {endpoint} request: {source}")]
    Encode {
        endpoint: &'static str,
        source: serde_json::Error,
    },
    /// The VMM refused the request; `message` is its `error`.
    #[error("{message} (HTTP {status})")]
    Refused { status: u16, message: String },
}

/// The HTTP status and body of a response.
pub fn request(socket: &Path, method: &str, path: &str) -> Result<(u16, String), ClientError> {
    request_with_body(socket, method, path, "")
}

/// The same with a JSON body.
pub fn request_with_body(
    socket: &Path,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(u16, String), ClientError> {
    let mut s = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        socket: socket.to_path_buf(),
        source,
    })?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).map_err(ClientError::Send)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(ClientError::Receive)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ClientError::BadResponse(head.lines().next().unwrap_or("").into()))?;
    Ok((status, body.to_string()))
}

/// A typed client for one VMM's API socket.
#[derive(Debug, Clone)]
pub struct ApiClient {
    socket: PathBuf,
}

impl ApiClient {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        ApiClient {
            socket: socket.into(),
        }
    }

    /// Send one action and read its answer.
    pub fn call(&self, action: &ApiAction) -> Result<ApiReply, ClientError> {
        let endpoint = action.endpoint();
        let body = action.body().map_err(|source| ClientError::Encode {
            endpoint: endpoint.name(),
            source,
        })?;
        let (status, text) =
            request_with_body(&self.socket, endpoint.method(), endpoint.path(), &body)?;
        if !(200..300).contains(&status) {
            // The error's message, else whatever the body says.
            let message = serde_json::from_str::<ErrorBody>(&text)
                .map(|e| e.error)
                .unwrap_or(text);
            return Err(ClientError::Refused { status, message });
        }
        ApiReply::from_json(endpoint, &text)
            .map_err(|e| ClientError::BadResponse(format!("{}: {e}", endpoint.name())))
    }

    fn unexpected(endpoint: Endpoint, r: ApiReply) -> ClientError {
        ClientError::BadResponse(format!("{}: unexpected answer {r:?}", endpoint.name()))
    }

    pub fn ping(&self) -> Result<PingReply, ClientError> {
        match self.call(&ApiAction::VmmPing)? {
            ApiReply::Ping(p) => Ok(p),
            r => Err(Self::unexpected(Endpoint::VmmPing, r)),
        }
    }

    pub fn info(&self) -> Result<VmInfoReply, ClientError> {
        match self.call(&ApiAction::VmInfo)? {
            ApiReply::Info(i) => Ok(*i),
            r => Err(Self::unexpected(Endpoint::VmInfo, r)),
        }
    }

    pub fn pause(&self) -> Result<(), ClientError> {
        self.call(&ApiAction::VmPause).map(drop)
    }

    pub fn resume(&self) -> Result<(), ClientError> {
        self.call(&ApiAction::VmResume).map(drop)
    }

    pub fn snapshot(&self, req: SnapshotRequest) -> Result<(), ClientError> {
        self.call(&ApiAction::VmSnapshot(req)).map(drop)
    }

    pub fn balloon(&self, req: BalloonRequest) -> Result<(), ClientError> {
        self.call(&ApiAction::VmBalloon(req)).map(drop)
    }

    /// Change the VMM's cgroup limits.
    pub fn cgroup(&self, req: crate::cgroup::CgroupLimits) -> Result<(), ClientError> {
        self.call(&ApiAction::VmCgroup(req)).map(drop)
    }

    /// Change a device's or a rate group's I/O limits.
    pub fn rate_limit(&self, req: super::RateLimitRequest) -> Result<(), ClientError> {
        self.call(&ApiAction::VmRateLimit(req)).map(drop)
    }

    pub fn counters(&self) -> Result<super::VmCounters, ClientError> {
        match self.call(&ApiAction::VmCounters)? {
            ApiReply::Counters(c) => Ok(*c),
            r => Err(Self::unexpected(Endpoint::VmCounters, r)),
        }
    }

    /// The Prometheus text of `GET /metrics`.
    pub fn metrics(&self) -> Result<String, ClientError> {
        match self.call(&ApiAction::Metrics)? {
            ApiReply::Metrics(t) => Ok(t),
            r => Err(Self::unexpected(Endpoint::Metrics, r)),
        }
    }

    pub fn migrate_send(&self, req: MigrateRequest) -> Result<MigrationReport, ClientError> {
        match self.call(&ApiAction::VmMigrateSend(req))? {
            ApiReply::Migrated(m) => Ok(m),
            r => Err(Self::unexpected(Endpoint::VmMigrateSend, r)),
        }
    }
}
