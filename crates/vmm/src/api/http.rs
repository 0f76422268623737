//! The API over HTTP: a small, bounded HTTP/1.1 server that turns each
//! request into an [`ApiAction`], has a [`RequestHandler`] carry it out and
//! writes the reply (or the error, as `{"error": "..."}` with its status).
//!
//! The server is written here rather than taken from a crate because every
//! resource a client can make it spend must have a bound, and the listener
//! must outlive any client:
//!
//! - one request per connection (`Connection: close`); the request line and
//!   headers at most [`Limits::max_head`] bytes (else 431), the body at most
//!   [`Limits::max_body`] (else 413, and it is never read); a body needs a
//!   `Content-Length` (chunked bodies are refused with 501);
//! - the whole request must arrive within [`Limits::request_deadline`] of
//!   the connection's accept (an overall deadline, not a per-read one, so a
//!   client sending a byte now and then is cut off too; 408 when a partial
//!   request was sent); the answer must be taken within
//!   [`Limits::write_timeout`];
//! - at most [`Limits::max_connections`] connections are served at once,
//!   each on a thread of its own (a migration or a restore takes a while,
//!   and `vm.info` or `vm.migrate-cancel` must answer meanwhile); one more
//!   gets 503 at once and is closed;
//! - a failing `accept` (out of file descriptors, out of memory) is logged
//!   and retried after a pause: the accept loop ends only when the server
//!   is dropped.
//!
//! Statuses: 404 for an unknown path, 405 for the wrong method, the rest of
//! a refused action's status from [`status_of`]; 400, 408, 413, 431, 501
//! and 503 for requests the server itself refuses.
//!
//! [`serve`] runs the server on any [`Listener`] (the API's Unix socket,
//! or a TCP listener); [`ApiServer::start`] makes the API socket (mode
//! 0600, refusing to replace anything but a stale socket of our own) and
//! serves it. [`parse_head`], [`read_request`] and [`route`] are public for
//! the fuzz targets.

use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{ApiAction, ApiError, ApiReply, Endpoint, ErrorBody, RequestHandler};
use crate::control::ControlError;

/// Request bodies are small JSON documents; refuse anything bigger.
pub const MAX_BODY: u64 = 64 * 1024;

/// What one client may make the server spend.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Request line and headers, with the blank line that ends them.
    pub max_head: usize,
    pub max_body: u64,
    /// Connections served at once (each holds a thread).
    pub max_connections: usize,
    /// From accept to the last byte of the request.
    pub request_deadline: Duration,
    /// For the answer to be taken by the client.
    pub write_timeout: Duration,
    /// Serve only the endpoints that read ([`Endpoint::is_monitoring`]):
    /// set for a TCP listener, which has no file permissions to say who may
    /// control the VM.
    pub monitoring_only: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_head: 16 * 1024,
            max_body: MAX_BODY,
            max_connections: 32,
            request_deadline: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            monitoring_only: false,
        }
    }
}

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
            ControlError::AlreadyPaused
            | ControlError::NotPaused
            | ControlError::Stopping
            | ControlError::Held(_) => 409,
            ControlError::Timeout(_) => 500,
        },
        // Each VMM error's variant says its status.
        ApiError::Vmm(v) => v.http_status(),
    }
}

/// One response: its status, the type of its body and the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn json(status: u16, body: Vec<u8>) -> Self {
        Answer {
            status,
            content_type: "application/json",
            body,
        }
    }

    /// `{"error": msg}` with `status`.
    pub fn error(status: u16, msg: String) -> Self {
        let body = serde_json::to_vec(&ErrorBody { error: msg }).unwrap_or_else(|_| b"{}".to_vec());
        Answer::json(status, body)
    }

    fn no_content() -> Self {
        Answer {
            status: 204,
            content_type: "application/json",
            body: Vec::new(),
        }
    }

    /// The whole response as it goes on the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        if self.status != 204 {
            out.push_str(&format!(
                "Content-Type: {}\r\nContent-Length: {}\r\n",
                self.content_type,
                self.body.len()
            ));
        }
        out.push_str("Connection: close\r\n\r\n");
        let mut out = out.into_bytes();
        out.extend_from_slice(&self.body);
        out
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

fn reply(r: &ApiReply) -> Answer {
    match r.to_json() {
        None => Answer::no_content(),
        Some(Ok(body)) => match r.text() {
            Some(content_type) => Answer {
                status: 200,
                content_type,
                body,
            },
            None => Answer::json(200, body),
        },
        Some(Err(e)) => Answer::error(500, format!("cannot encode the answer: {e}")),
    }
}

fn is_monitoring(url: &str) -> bool {
    let path = url.split('?').next().unwrap_or(url);
    Endpoint::from_path(path).is_some_and(Endpoint::is_monitoring)
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
        return (
            Answer::error(404, format!("no such endpoint: {path}")),
            None,
        );
    };
    if method != endpoint.method() {
        let want = endpoint.method();
        let msg = format!("{method} is not allowed on {path} (use {want})");
        return (Answer::error(405, msg), None);
    }
    let done = ApiAction::parse(endpoint, body)
        .and_then(|action| action.dispatch(handler).map(|r| (action, r)));
    match done {
        Ok((action, r)) => (reply(&r), Some((action, r))),
        Err(e) => (Answer::error(status_of(&e), e.to_string()), None),
    }
}

/// Why a request could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("request line and headers exceed {0} bytes")]
    HeadTooLarge(usize),
    #[error("request body of {len} bytes exceeds {max} bytes")]
    BodyTooLarge { len: u64, max: u64 },
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    #[error("{0}")]
    Unsupported(&'static str),
    #[error("the request did not arrive within {0:?}")]
    Timeout(Duration),
    /// The client closed the connection before a whole request.
    #[error("the client closed the connection")]
    Closed,
    #[error("reading the request: {0}")]
    Io(io::Error),
}

impl HttpError {
    /// The status to answer with; None when nobody is left to answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            HttpError::HeadTooLarge(_) => Some(431),
            HttpError::BodyTooLarge { .. } => Some(413),
            HttpError::Malformed(_) => Some(400),
            HttpError::Unsupported(_) => Some(501),
            HttpError::Timeout(_) => Some(408),
            HttpError::Closed | HttpError::Io(_) => None,
        }
    }
}

/// A request's line and headers, as far as the API needs them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    pub target: String,
    pub content_length: u64,
    /// The client waits for `100 Continue` before it sends the body.
    pub expect_continue: bool,
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Parse a request's line and headers (without the blank line that ends
/// them). Strict: anything ambiguous is refused rather than guessed.
pub fn parse_head(head: &[u8]) -> Result<Head, HttpError> {
    let text = std::str::from_utf8(head).map_err(|_| HttpError::Malformed("head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let line = lines.next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::Malformed(
            "the request line is not METHOD TARGET VERSION",
        ));
    };
    if !is_token(method) {
        return Err(HttpError::Malformed("bad method"));
    }
    if !target.starts_with('/') || target.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(HttpError::Malformed("bad request target"));
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(HttpError::Unsupported(
            "only HTTP/1.0 and HTTP/1.1 are served",
        ));
    }
    let mut content_length: Option<u64> = None;
    let mut expect_continue = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(HttpError::Malformed("a header line without a colon"));
        };
        // No space before the colon and no folded lines (RFC 9112 5.1, 5.2).
        if !is_token(name) {
            return Err(HttpError::Malformed("bad header name"));
        }
        let value = value.trim_matches(|c| c == ' ' || c == '\t');
        if name.eq_ignore_ascii_case("content-length") {
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Err(HttpError::Malformed("bad Content-Length"));
            }
            // Too many digits is too large, whatever its value.
            let n = value.parse::<u64>().unwrap_or(u64::MAX);
            if content_length.is_some_and(|c| c != n) {
                return Err(HttpError::Malformed("two different Content-Lengths"));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::Unsupported(
                "Transfer-Encoding is not supported: send the body with a Content-Length",
            ));
        } else if name.eq_ignore_ascii_case("expect") {
            if !value.eq_ignore_ascii_case("100-continue") {
                return Err(HttpError::Unsupported(
                    "only Expect: 100-continue is served",
                ));
            }
            expect_continue = true;
        }
    }
    Ok(Head {
        method: method.to_string(),
        target: target.to_string(),
        content_length: content_length.unwrap_or(0),
        expect_continue,
    })
}

/// A connection the server reads one request from and answers.
pub trait Conn: Read + Write + Send + 'static {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()>;
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()>;
}

impl Conn for UnixStream {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        UnixStream::set_write_timeout(self, t)
    }
}

impl Conn for std::net::TcpStream {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        std::net::TcpStream::set_read_timeout(self, t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        std::net::TcpStream::set_write_timeout(self, t)
    }
}

/// A request as read: its head and its body.
#[derive(Debug)]
pub struct Request {
    pub head: Head,
    pub body: Vec<u8>,
}

/// Read into `buf` before `deadline`; Ok(0) at the end of the stream.
fn read_some<C: Conn>(
    conn: &mut C,
    buf: &mut [u8],
    start: Instant,
    limit: Duration,
) -> Result<usize, HttpError> {
    loop {
        let left = limit.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Err(HttpError::Timeout(limit));
        }
        conn.set_read_timeout(Some(left)).map_err(HttpError::Io)?;
        match conn.read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut =>
            {
                return Err(HttpError::Timeout(limit))
            }
            Err(e) => return Err(HttpError::Io(e)),
        }
    }
}

/// Read one request from `conn`, all of it within `limits.request_deadline`
/// of `start`, never holding more than the head and body limits allow.
pub fn read_request<C: Conn>(
    conn: &mut C,
    limits: &Limits,
    start: Instant,
) -> Result<Request, HttpError> {
    let limit = limits.request_deadline;
    let mut buf = vec![0u8; limits.max_head];
    let mut have = 0;
    let end = loop {
        if let Some(i) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if have == buf.len() {
            return Err(HttpError::HeadTooLarge(limits.max_head));
        }
        let n = read_some(conn, &mut buf[have..], start, limit)?;
        if n == 0 {
            return Err(if have == 0 {
                HttpError::Closed
            } else {
                HttpError::Malformed("the connection ended inside the headers")
            });
        }
        have += n;
    };
    let head = parse_head(&buf[..end])?;
    if head.content_length > limits.max_body {
        return Err(HttpError::BodyTooLarge {
            len: head.content_length,
            max: limits.max_body,
        });
    }
    // Bounded by max_body just above.
    let len = head.content_length as usize;
    let mut body = buf[end + 4..have].to_vec();
    if body.len() > len {
        return Err(HttpError::Malformed(
            "more bytes than the Content-Length (one request per connection)",
        ));
    }
    if head.expect_continue && body.len() < len {
        conn.set_write_timeout(Some(limits.write_timeout))
            .map_err(HttpError::Io)?;
        conn.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
            .map_err(HttpError::Io)?;
    }
    let got = body.len();
    body.resize(len, 0);
    let mut got = got;
    while got < len {
        let n = read_some(conn, &mut body[got..], start, limit)?;
        if n == 0 {
            return Err(HttpError::Malformed("the connection ended inside the body"));
        }
        got += n;
    }
    Ok(Request { head, body })
}

/// Read, answer and close one connection.
fn serve_connection<C: Conn>(
    mut conn: C,
    handler: &dyn RequestHandler,
    limits: &Limits,
    start: Instant,
) {
    let (answer, done) = match read_request(&mut conn, limits, start) {
        Ok(req) => match std::str::from_utf8(&req.body) {
            Ok(_) if limits.monitoring_only && !is_monitoring(&req.head.target) => {
                let msg = format!("no such endpoint here: {} (try /metrics)", req.head.target);
                (Answer::error(404, msg), None)
            }
            Ok(body) => route(handler, &req.head.method, &req.head.target, body),
            Err(_) => (
                Answer::error(400, "request body is not UTF-8 text".into()),
                None,
            ),
        },
        Err(e) => match e.status() {
            Some(status) => {
                tracing::debug!("API: refused a request: {e}");
                (Answer::error(status, e.to_string()), None)
            }
            None => {
                tracing::debug!("API: {e}");
                return;
            }
        },
    };
    let sent = conn
        .set_write_timeout(Some(limits.write_timeout))
        .and_then(|_| conn.write_all(&answer.to_bytes()))
        .and_then(|_| conn.flush());
    if let Err(e) = sent {
        tracing::debug!("API client went away: {e}");
    }
    drop(conn);
    if let Some((action, r)) = done {
        handler.after_reply(&action, &r);
    }
}

/// A listening socket the server accepts connections from.
pub trait Listener: AsRawFd + Send + 'static {
    type Conn: Conn;
    fn accept_conn(&self) -> io::Result<Self::Conn>;
}

impl Listener for UnixListener {
    type Conn = UnixStream;
    fn accept_conn(&self) -> io::Result<UnixStream> {
        self.accept().map(|(s, _)| s)
    }
}

impl Listener for std::net::TcpListener {
    type Conn = std::net::TcpStream;
    fn accept_conn(&self) -> io::Result<std::net::TcpStream> {
        self.accept().map(|(s, _)| s)
    }
}

/// Counts a connection as served until dropped.
struct Active(Arc<AtomicUsize>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A server running on its own thread; stopped (its accept loop ended, the
/// listener closed) on drop. Requests being answered finish on their own.
pub struct Serving {
    fd: RawFd,
    stop: Arc<AtomicBool>,
    thread: Option<threads::Handle<()>>,
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // SAFETY: the accept thread owns the listener and keeps it open
        // until it sees `stop` (set above), which it does only after this
        // call wakes it; shutdown takes no memory.
        unsafe {
            libc::shutdown(self.fd, libc::SHUT_RDWR);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serve the API on `listener` with `limits`, on a thread named `name`.
pub fn serve<L: Listener>(
    listener: L,
    handler: Arc<dyn RequestHandler>,
    limits: Limits,
    name: &str,
) -> io::Result<Serving> {
    let fd = listener.as_raw_fd();
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = stop.clone();
    let thread = threads::spawn(threads::Role::Api(name.into()), move || {
        accept_loop(listener, handler, limits, &stopping)
    })?;
    Ok(Serving {
        fd,
        stop,
        thread: Some(thread),
    })
}

fn accept_loop<L: Listener>(
    listener: L,
    handler: Arc<dyn RequestHandler>,
    limits: Limits,
    stop: &AtomicBool,
) {
    let active = Arc::new(AtomicUsize::new(0));
    // Said once per run of failures, not ten times a second.
    let mut failing = false;
    loop {
        let accepted = listener.accept_conn();
        if stop.load(Ordering::Acquire) {
            return;
        }
        let conn = match accepted {
            Ok(c) => c,
            Err(e) => {
                match e.raw_os_error() {
                    Some(libc::EINTR) | Some(libc::ECONNABORTED) => {}
                    // Out of descriptors or memory: wait for some to be
                    // freed (connections end by their deadline) and go on.
                    _ => {
                        if !failing {
                            tracing::warn!("API: accept failed ({e}); retrying until it works");
                        }
                        failing = true;
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
                continue;
            }
        };
        failing = false;
        let start = Instant::now();
        if active.fetch_add(1, Ordering::AcqRel) >= limits.max_connections {
            active.fetch_sub(1, Ordering::AcqRel);
            refuse_busy(conn, limits.max_connections);
            continue;
        }
        let guard = Active(active.clone());
        let handler = handler.clone();
        let spawned = threads::spawn(threads::Role::ApiRequest, move || {
            let _guard = guard;
            serve_connection(conn, handler.as_ref(), &limits, start);
        });
        if let Err(e) = spawned {
            // The closure (with the connection and its guard) is dropped.
            tracing::warn!("API: cannot start a request thread: {e}");
        }
    }
}

/// 503 to one connection too many, without waiting on the client.
fn refuse_busy<C: Conn>(mut conn: C, max: usize) {
    let answer = Answer::error(
        503,
        format!("the API serves {max} connections at once; try again"),
    );
    // A fresh connection's send buffer takes this small answer at once;
    // a client that does not read it only loses the answer.
    let _ = conn.set_write_timeout(Some(Duration::from_millis(100)));
    let _ = conn.write_all(&answer.to_bytes());
}

/// The API's Unix socket, served; removed on drop (if it is still ours).
pub struct ApiServer {
    path: PathBuf,
    /// The socket file's (device, inode), to remove only our own.
    id: (u64, u64),
    serving: Option<Serving>,
}

impl ApiServer {
    /// Make the socket at `path` (mode 0600) and serve requests on it.
    pub fn start(path: &Path, handler: Arc<dyn RequestHandler>) -> Result<Self, String> {
        Self::start_with(path, handler, Limits::default())
    }

    pub fn start_with(
        path: &Path,
        handler: Arc<dyn RequestHandler>,
        limits: Limits,
    ) -> Result<Self, String> {
        let (listener, id) = bind_private_socket(path)?;
        let serving = serve(listener, handler, limits, "api")
            .map_err(|e| format!("cannot start the API thread: {e}"))?;
        Ok(ApiServer {
            path: path.to_path_buf(),
            id,
            serving: Some(serving),
        })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        drop(self.serving.take());
        // Someone may have replaced the file meanwhile: leave theirs alone.
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == self.id {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Make the way clear for a socket at `path`: nothing there, or a stale
/// socket of this user's that nobody listens on (removed). Anything else
/// is refused: the path may name a file someone else needs.
fn clear_socket_path(path: &Path) -> Result<(), String> {
    let m = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("API socket {}: {e}", path.display())),
    };
    if !m.file_type().is_socket() {
        return Err(format!(
            "API socket {} exists and is not a socket; refusing to replace it",
            path.display()
        ));
    }
    if UnixStream::connect(path).is_ok() {
        return Err(format!(
            "API socket {} is in use by another process",
            path.display()
        ));
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if m.uid() != me {
        return Err(format!(
            "API socket {} is a stale socket of user {}, not ours; remove it first",
            path.display(),
            m.uid()
        ));
    }
    std::fs::remove_file(path)
        .map_err(|e| format!("cannot remove the stale API socket {}: {e}", path.display()))
}

/// A listening Unix socket at `path` that only this user can connect to,
/// whatever the umask: the socket's mode is set before `bind` creates the
/// file (Linux gives the file the socket's mode less the umask), and
/// checked after.
fn bind_private_socket(path: &Path) -> Result<(UnixListener, (u64, u64)), String> {
    use std::os::unix::ffi::OsStrExt;
    clear_socket_path(path)?;
    let fail = |what: &str, e: io::Error| format!("API socket {}: {what}: {e}", path.display());
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: an all-zero sockaddr_un is a valid (empty) address.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(format!(
            "API socket path {} is longer than {} bytes or holds a NUL",
            path.display(),
            addr.sun_path.len() - 1
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket takes no memory; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(fail("socket", io::Error::last_os_error()));
    }
    // SAFETY: fd is a new socket nobody else owns; the listener closes it.
    let listener = unsafe { UnixListener::from_raw_fd(fd) };
    // SAFETY: fchmod on our own descriptor; no memory is passed.
    if unsafe { libc::fchmod(fd, 0o600) } != 0 {
        return Err(fail("fchmod", io::Error::last_os_error()));
    }
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: addr is a valid sockaddr_un of `len` bytes that outlives the call.
    let r = unsafe { libc::bind(fd, &addr as *const _ as *const libc::sockaddr, len) };
    if r != 0 {
        return Err(fail("bind", io::Error::last_os_error()));
    }
    // From here on the file is ours: remove it if anything else fails.
    let undo = |msg: String| {
        let _ = std::fs::remove_file(path);
        msg
    };
    // SAFETY: listen on our own bound socket; no memory is passed.
    if unsafe { libc::listen(fd, 128) } != 0 {
        return Err(undo(fail("listen", io::Error::last_os_error())));
    }
    let m = std::fs::symlink_metadata(path).map_err(|e| undo(fail("stat", e)))?;
    if m.mode() & 0o077 != 0 {
        return Err(undo(format!(
            "API socket {} was created with mode {:o}, not 0600",
            path.display(),
            m.mode() & 0o777
        )));
    }
    Ok((listener, (m.dev(), m.ino())))
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
        (answer.status, done.is_some())
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
        assert_eq!(answer.status, 200);
        let Some((ApiAction::VmMigrateSend(req), ApiReply::Migrated(report))) = done else {
            panic!("the migration's action and report");
        };
        assert_eq!((req.destination.as_str(), report.bytes), ("h:7", 3));
    }

    #[test]
    fn heads_are_parsed_strictly() {
        let h =
            parse_head(b"PUT /api/v1/vm.pause HTTP/1.1\r\nHost: x\r\nContent-Length: 12").unwrap();
        assert_eq!(
            (h.method.as_str(), h.target.as_str(), h.content_length),
            ("PUT", "/api/v1/vm.pause", 12)
        );
        let bad: [&[u8]; 9] = [
            b"",
            b"GET /",
            b"GET / HTTP/1.1 extra",
            b"GET nopath HTTP/1.1",
            b"GET / HTTP/1.1\r\nContent-Length: -1",
            b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2",
            b"GET / HTTP/1.1\r\nBad Name: 1",
            b"GET / HTTP/1.1\r\n folded",
            b"GET / HTTP/1.1\r\n\xff: 1",
        ];
        for b in bad {
            let e = parse_head(b).unwrap_err();
            assert_eq!(
                e.status(),
                Some(400),
                "{:?}: {e}",
                String::from_utf8_lossy(b)
            );
        }
        let e = parse_head(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked").unwrap_err();
        assert_eq!(e.status(), Some(501));
        let h = parse_head(b"PUT / HTTP/1.1\r\nContent-Length: 99999999999999999999999").unwrap();
        assert_eq!(h.content_length, u64::MAX, "too many digits is too large");
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vireo-http-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Send `raw` on a new connection and read the answer's status.
    fn status_of_raw(sock: &Path, raw: &[u8]) -> Option<u16> {
        let mut c = UnixStream::connect(sock).ok()?;
        c.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let _ = c.write_all(raw);
        let mut text = Vec::new();
        let _ = c.read_to_end(&mut text);
        let text = String::from_utf8_lossy(&text);
        text.split_whitespace().nth(1)?.parse().ok()
    }

    /// [`status_of_raw`], sent again while the answer is 503: a refused
    /// connection of the step before may still hold its slot for a moment
    /// (the server lingers on it), which a loaded machine makes longer.
    fn status_when_free(sock: &Path, raw: &[u8]) -> Option<u16> {
        let start = Instant::now();
        loop {
            let s = status_of_raw(sock, raw);
            if s != Some(503) || start.elapsed() > Duration::from_secs(10) {
                return s;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn ping(sock: &Path) -> Option<u16> {
        status_of_raw(sock, b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\n\r\n")
    }

    /// Oversized heads and bodies, slow and idle clients and a flood of
    /// connections are each refused within their bound, and the server
    /// answers normally afterwards.
    #[test]
    fn the_server_bounds_what_a_client_can_hold() {
        let dir = scratch("bounds");
        let sock = dir.join("api.sock");
        let limits = Limits {
            max_head: 1024,
            max_body: 100,
            max_connections: 4,
            request_deadline: Duration::from_millis(400),
            write_timeout: Duration::from_millis(400),
            monitoring_only: false,
        };
        let server = ApiServer::start_with(&sock, Arc::new(Paused), limits).unwrap();
        assert_eq!(ping(&sock), Some(200));

        // A head that never ends: refused once it passes the limit, without
        // reading the rest.
        let mut huge = b"GET /api/v1/vmm.ping HTTP/1.1\r\nX: ".to_vec();
        huge.resize(64 * 1024, b'a');
        assert_eq!(status_when_free(&sock, &huge), Some(431));
        // A body over the limit is refused before it is read.
        let big = b"PUT /api/v1/vm.balloon HTTP/1.1\r\nContent-Length: 1000000000\r\n\r\n{";
        assert_eq!(status_when_free(&sock, big), Some(413));
        let chunked = b"PUT /api/v1/vm.balloon HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(status_when_free(&sock, chunked), Some(501));
        assert_eq!(
            status_when_free(&sock, b"\x00\x01garbage\r\n\r\n"),
            Some(400)
        );

        // A client that trickles a byte now and then is cut off by the
        // overall deadline, not kept alive by each byte.
        let start = Instant::now();
        let mut slow = UnixStream::connect(&sock).unwrap();
        let mut cut = false;
        for b in b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\n" {
            if slow.write_all(&[*b]).is_err() {
                cut = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut answer = String::new();
        let _ = slow.read_to_string(&mut answer);
        assert!(
            cut || answer.starts_with("HTTP/1.1 408"),
            "the slow client got: {answer}"
        );
        assert!(start.elapsed() < Duration::from_secs(5));

        // Idle connections up to the limit; one more is told to come back.
        let idle: Vec<UnixStream> = (0..4)
            .map(|_| UnixStream::connect(&sock).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(ping(&sock), Some(503));
        // They time out by themselves and the server answers again.
        assert!(wait(|| ping(&sock) == Some(200)), "the server stayed busy");
        drop(idle);

        // Many connections opened and dropped at once: nothing is lost.
        let flood: Vec<UnixStream> = (0..200)
            .filter_map(|_| UnixStream::connect(&sock).ok())
            .collect();
        drop(flood);
        assert!(
            wait(|| ping(&sock) == Some(200)),
            "the server did not recover"
        );

        drop(server);
        assert!(!sock.exists(), "the socket is removed with the server");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn wait(mut f: impl FnMut() -> bool) -> bool {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// The socket is 0600 whatever the umask; a path that holds anything
    /// but a stale socket of ours is refused and left as it was.
    #[test]
    fn the_socket_is_private_and_replaces_only_a_stale_socket() {
        let dir = scratch("sockpath");
        let sock = dir.join("api.sock");
        let server = ApiServer::start(&sock, Arc::new(Paused)).unwrap();
        let mode = std::fs::symlink_metadata(&sock).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A second server on a socket in use is refused.
        let e = ApiServer::start(&sock, Arc::new(Paused)).err().unwrap();
        assert!(e.contains("in use"), "{e}");
        drop(server);

        // A regular file at the path is not ours to delete.
        std::fs::write(&sock, b"precious").unwrap();
        let e = ApiServer::start(&sock, Arc::new(Paused)).err().unwrap();
        assert!(e.contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&sock).unwrap(), b"precious");
        std::fs::remove_file(&sock).unwrap();

        // A symlink to a socket is not a socket either.
        let real = dir.join("real.sock");
        let stale = UnixListener::bind(&real).unwrap();
        drop(stale);
        std::os::unix::fs::symlink(&real, &sock).unwrap();
        let e = ApiServer::start(&sock, Arc::new(Paused)).err().unwrap();
        assert!(e.contains("not a socket"), "{e}");
        std::fs::remove_file(&sock).unwrap();

        // A stale socket of ours (nobody listens) is replaced.
        std::fs::rename(&real, &sock).unwrap();
        let server = ApiServer::start(&sock, Arc::new(Paused)).unwrap();
        assert_eq!(ping(&sock), Some(200));
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
