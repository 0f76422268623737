//! User-mode networking through passt (Debian's `passt` package): no root,
//! no tap, no NAT or TCP stack in Vireo.
//!
//! Vireo starts one passt per NIC on one end of a connected Unix stream
//! socket pair (`passt --foreground --fd N`) and keeps the other end. Frames
//! cross that socket in the framing QEMU's `-netdev stream` uses: a 4-byte
//! big-endian length, then the Ethernet frame. passt carries no virtio-net
//! header and does no offloads, so [`Passt`] adds a zeroed header to each
//! received frame and drops the header of each sent one; the device offers
//! the guest no offload that would need the header to mean something.
//!
//! The MTU ([`PasstOptions::mtu`]) is what passt gives the guest by DHCP and
//! NDP and the largest frame it sends: its own default, 65520, needs a guest
//! that can take frames that big (merged receive buffers); 1500 suits any.
//!
//! Invariants:
//! - the socket end Vireo keeps is non-blocking; neither receive nor send
//!   blocks the device thread: a send goes straight into the socket when
//!   nothing waits before it, and otherwise (or for what the socket did not
//!   take) queues the frame (at most [`TX_BACKLOG`] bytes, then frames are
//!   dropped) for a writer thread, which waits for a
//!   full socket at most [`SEND_STALL`] without progress before the link is
//!   declared broken (a half-written frame would desynchronise the stream,
//!   so the stream is written whole or abandoned);
//! - passt is considered started only once it has written its pid file,
//!   which it does after binding the forwarded ports, so a port that cannot
//!   be bound is an error at VM start, not a silent missing forward;
//! - once passt exits (killed, or crashed) or the stream breaks, the link is
//!   down for good: [`Passt::link_up`] turns false, the change callback
//!   runs once, and receive and send fail with a typed I/O error instead of
//!   blocking. Dropping a [`Passt`] closes the socket (passt exits on its
//!   own when its one client goes) and terminates the process.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, BufRead, BufReader};
use std::net::IpAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::VNET_HDR_LEN;

/// Longest frame passt sends or takes: its 65520-byte MTU plus the Ethernet
/// header, rounded up. A longer length prefix means the stream is corrupt.
pub const MAX_PASST_FRAME: usize = 65_536 + 14;
/// How long the writer waits for passt to take any data before the link
/// is declared broken.
pub const SEND_STALL: Duration = Duration::from_secs(5);
/// Bytes queued for passt at most; beyond that frames are dropped.
pub const TX_BACKLOG: usize = 1 << 20;
/// passt's own default MTU and the largest it takes: a frame of up to
/// 65534 bytes, which a guest receives in page-sized merged buffers.
pub const DEFAULT_MTU: u16 = 65_520;
/// The smallest MTU [`PasstOptions::mtu`] takes: IPv4's minimum.
pub const MIN_MTU: u16 = 68;
/// How long passt may take to start (bind its ports, write its pid file).
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// The descriptor number passt finds its end of the socket pair at.
const CHILD_FD: RawFd = 3;
/// How many of passt's last stderr lines an error quotes.
const LOG_LINES: usize = 8;

/// A transport protocol of a port forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FwdProto {
    Tcp,
    Udp,
}

/// One port forward from the host to the guest, written as QEMU writes it:
/// `tcp:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT` (`udp:` likewise).
/// passt forwards to the guest's one address, so GUESTADDR must be empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFwd {
    pub proto: FwdProto,
    /// The host address to bind; all addresses when absent.
    pub host_addr: Option<IpAddr>,
    pub host_port: u16,
    pub guest_port: u16,
}

impl HostFwd {
    /// The passt option and value that set this forward up
    /// (`-t 127.0.0.1/2222:22`).
    pub fn passt_args(&self) -> [String; 2] {
        let flag = match self.proto {
            FwdProto::Tcp => "-t",
            FwdProto::Udp => "-u",
        };
        let spec = match self.host_addr {
            Some(a) => format!("{a}/{}:{}", self.host_port, self.guest_port),
            None => format!("{}:{}", self.host_port, self.guest_port),
        };
        [flag.to_string(), spec]
    }
}

impl FromStr for HostFwd {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let shape = "expected tcp|udp:[HOSTADDR]:HOSTPORT-:GUESTPORT";
        let (proto, rest) = match s.split_once(':') {
            Some(("tcp", r)) => (FwdProto::Tcp, r),
            Some(("udp", r)) => (FwdProto::Udp, r),
            // QEMU takes an empty protocol as tcp.
            Some(("", r)) => (FwdProto::Tcp, r),
            _ => return Err(format!("'{s}': {shape}")),
        };
        let (host, guest) = rest
            .split_once('-')
            .ok_or_else(|| format!("'{s}': {shape}"))?;
        let (haddr, hport) = host
            .rsplit_once(':')
            .ok_or_else(|| format!("'{s}': {shape}"))?;
        let (gaddr, gport) = guest
            .rsplit_once(':')
            .ok_or_else(|| format!("'{s}': {shape}"))?;
        if !gaddr.is_empty() {
            return Err(format!(
                "'{s}': passt forwards to the guest's own address; leave the guest address empty (-:{gport})"
            ));
        }
        let port = |p: &str, what: &str| -> Result<u16, String> {
            match p.parse::<u16>() {
                Ok(n) if n != 0 => Ok(n),
                _ => Err(format!("'{s}': bad {what} port '{p}'")),
            }
        };
        let host_addr = if haddr.is_empty() {
            None
        } else {
            let a = haddr.trim_start_matches('[').trim_end_matches(']');
            Some(
                a.parse()
                    .map_err(|_| format!("'{s}': bad host address '{haddr}'"))?,
            )
        };
        Ok(HostFwd {
            proto,
            host_addr,
            host_port: port(hport, "host")?,
            guest_port: port(gport, "guest")?,
        })
    }
}

impl fmt::Display for HostFwd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = match self.proto {
            FwdProto::Tcp => "tcp",
            FwdProto::Udp => "udp",
        };
        match self.host_addr {
            Some(IpAddr::V6(a)) => write!(f, "{p}:[{a}]:{}-:{}", self.host_port, self.guest_port),
            Some(a) => write!(f, "{p}:{a}:{}-:{}", self.host_port, self.guest_port),
            None => write!(f, "{p}::{}-:{}", self.host_port, self.guest_port),
        }
    }
}

impl serde::Serialize for HostFwd {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for HostFwd {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PasstError {
    #[error("user networking needs passt, which is not installed (`{0}` not found; Debian's package is `passt`, scripts/install-deps.sh installs it)")]
    NotFound(String),
    #[error("cannot start passt: {0}")]
    Spawn(io::Error),
    #[error("cannot make the socket pair for passt: {0}")]
    Socket(io::Error),
    #[error("passt exited while starting ({status}): {log}")]
    Exited { status: String, log: String },
    #[error("passt did not start within {secs} s: {log}")]
    Timeout { secs: u64, log: String },
    #[error("an MTU of {0} for passt: it takes 68 to 65520")]
    Mtu(u16),
}

/// What starts passt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasstOptions {
    /// The passt program; looked up on PATH when it has no slash.
    pub program: PathBuf,
    pub hostfwd: Vec<HostFwd>,
    /// The MTU passt gives the guest (DHCP, NDP) and sends frames up to:
    /// [`MIN_MTU`] to [`DEFAULT_MTU`].
    pub mtu: u16,
}

impl Default for PasstOptions {
    fn default() -> Self {
        PasstOptions {
            program: PathBuf::from("passt"),
            hostfwd: Vec::new(),
            mtu: DEFAULT_MTU,
        }
    }
}

/// Called once when the link goes down.
pub type LinkChange = Box<dyn Fn() + Send + Sync>;

/// What the process monitor and the data path share.
struct Shared {
    up: AtomicBool,
    on_change: Mutex<Option<LinkChange>>,
    /// passt's last stderr lines, for error messages.
    log: Mutex<VecDeque<String>>,
    /// Set (under the lock) once passt has been reaped: its pid may then
    /// belong to someone else, and must not be signalled.
    reaped: Mutex<bool>,
    pid: AtomicU32,
}

impl Shared {
    fn log_text(&self) -> String {
        let l = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if l.is_empty() {
            "(passt printed nothing)".into()
        } else {
            l.iter().cloned().collect::<Vec<_>>().join(" | ")
        }
    }

    /// The link is down for good; tell the device once.
    fn link_down(&self, why: &str) {
        if self.up.swap(false, Ordering::SeqCst) {
            tracing::error!(
                "passt (pid {}): {why}; the guest's link is down. passt said: {}",
                self.pid.load(Ordering::Relaxed),
                self.log_text()
            );
            if let Some(f) = self
                .on_change
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
            {
                f();
            }
        }
    }
}

/// Received bytes not yet handed out as frames.
struct Rx {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

/// A running passt and Vireo's end of its socket.
pub struct Passt {
    sock: UnixStream,
    rx: Mutex<Rx>,
    tx: Arc<Tx>,
    writer: Option<threads::Handle<()>>,
    shared: Arc<Shared>,
    monitor: Option<threads::Handle<()>>,
}

/// The connected pair a passt is started on (one end for passt as its
/// `--fd`, one for the VMM), with room in both sockets for bursts each way
/// (best effort, up to the host's wmem_max): passt gives up on a guest
/// connection whose frames it cannot hand over for a while, and an engine
/// guest takes frames slower than passt makes them. Public so that a
/// benchmark can give QEMU the same pair.
pub fn socket_pair() -> io::Result<(UnixStream, UnixStream)> {
    let (ours, theirs) = UnixStream::pair()?;
    for fd in [ours.as_raw_fd(), theirs.as_raw_fd()] {
        let size: libc::c_int = 4 << 20;
        // SAFETY: setsockopt with a valid int on our own socket.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    }
    Ok((ours, theirs))
}

fn broken(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, format!("passt: {what}"))
}

impl Passt {
    /// Start passt and wait until it runs (its ports bound).
    pub fn start(opts: &PasstOptions) -> Result<Self, PasstError> {
        if !(MIN_MTU..=DEFAULT_MTU).contains(&opts.mtu) {
            return Err(PasstError::Mtu(opts.mtu));
        }
        let (ours, theirs) = socket_pair().map_err(PasstError::Socket)?;
        ours.set_nonblocking(true).map_err(PasstError::Socket)?;
        let pidfile = pidfile_path();
        let _ = std::fs::remove_file(&pidfile);
        let mut cmd = Command::new(&opts.program);
        // The MTU is the caller's choice: above 1500 only for a guest that
        // takes merged receive buffers (`vmm`'s `NetConfig::user_mtu`).
        cmd.args(["--foreground", "--stderr", "--mtu", &opts.mtu.to_string()])
            .args(["--fd", &CHILD_FD.to_string()])
            .arg("--pid")
            .arg(&pidfile);
        for f in &opts.hostfwd {
            cmd.args(f.passt_args());
        }
        let their_fd = theirs.as_raw_fd();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: between fork and exec only async-signal-safe calls
        // (dup2, fcntl) on descriptors that exist in the child.
        unsafe {
            cmd.pre_exec(move || {
                if their_fd == CHILD_FD {
                    // dup2 onto itself keeps close-on-exec: clear it.
                    if libc::fcntl(CHILD_FD, libc::F_SETFD, 0) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                } else if libc::dup2(their_fd, CHILD_FD) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                PasstError::NotFound(opts.program.display().to_string())
            } else {
                PasstError::Spawn(e)
            }
        })?;
        drop(theirs);
        let shared = Arc::new(Shared {
            up: AtomicBool::new(true),
            on_change: Mutex::new(None),
            log: Mutex::new(VecDeque::new()),
            reaped: Mutex::new(false),
            pid: AtomicU32::new(child.id()),
        });
        if let Some(err) = child.stderr.take() {
            let s = shared.clone();
            let _ = threads::spawn(threads::Role::Helper("passt-log".into()), move || {
                for line in BufReader::new(err).lines() {
                    let Ok(line) = line else { break };
                    // This passt tries syslog before stderr; where
                    // there is none it says so for every line.
                    if line.starts_with("Failed to send") && line.ends_with("to syslog") {
                        continue;
                    }
                    tracing::debug!("passt: {line}");
                    let mut l = s.log.lock().unwrap_or_else(|e| e.into_inner());
                    if l.len() == LOG_LINES {
                        l.pop_front();
                    }
                    l.push_back(line);
                }
            });
        }
        // Wait for the pid file (written once passt is set up), or its exit.
        let start = Instant::now();
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                // Let the log thread read what passt said last.
                std::thread::sleep(Duration::from_millis(50));
                let _ = std::fs::remove_file(&pidfile);
                return Err(PasstError::Exited {
                    status: st.to_string(),
                    log: shared.log_text(),
                });
            }
            if std::fs::metadata(&pidfile).is_ok_and(|m| m.len() > 0) {
                break;
            }
            if start.elapsed() > START_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                let _ = std::fs::remove_file(&pidfile);
                return Err(PasstError::Timeout {
                    secs: START_TIMEOUT.as_secs(),
                    log: shared.log_text(),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = std::fs::remove_file(&pidfile);
        tracing::info!(
            "passt (pid {}) started{}",
            child.id(),
            if opts.hostfwd.is_empty() {
                String::new()
            } else {
                let f: Vec<String> = opts.hostfwd.iter().map(|f| f.to_string()).collect();
                format!(", forwarding {}", f.join(", "))
            }
        );
        let s = shared.clone();
        let monitor = threads::spawn(threads::Role::Helper("passt-wait".into()), move || {
            let pid = child.id() as libc::pid_t;
            // Wait without reaping, so the pid stays ours until the
            // flag says it is gone (Drop signals it otherwise).
            // SAFETY: siginfo_t is plain data; waitid fills it.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            loop {
                // SAFETY: waitid on our own child with a valid siginfo_t.
                let rc = unsafe {
                    libc::waitid(
                        libc::P_PID,
                        pid as libc::id_t,
                        &mut info,
                        libc::WEXITED | libc::WNOWAIT,
                    )
                };
                if rc == 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                    break;
                }
            }
            let status = {
                let mut reaped = s.reaped.lock().unwrap_or_else(|e| e.into_inner());
                let st = child.wait();
                *reaped = true;
                st
            };
            let why = match status {
                Ok(st) => format!("exited ({st})"),
                Err(e) => format!("cannot be waited for ({e})"),
            };
            // Let the log thread catch passt's last words.
            std::thread::sleep(Duration::from_millis(50));
            s.link_down(&why);
        })
        .map_err(PasstError::Spawn)?;
        let tx = Arc::new(Tx {
            q: Mutex::new(TxQueue {
                bytes: VecDeque::new(),
                closed: false,
                busy: false,
            }),
            cv: Condvar::new(),
        });
        let (t, s, fd) = (tx.clone(), shared.clone(), ours.as_raw_fd());
        let writer = threads::spawn(threads::Role::Helper("passt-tx".into()), move || {
            writer(fd, &t, &s)
        })
        .map_err(PasstError::Spawn)?;
        Ok(Passt {
            sock: ours,
            rx: Mutex::new(Rx {
                buf: vec![0; 4 * MAX_PASST_FRAME],
                start: 0,
                end: 0,
            }),
            tx,
            writer: Some(writer),
            shared,
            monitor: Some(monitor),
        })
    }

    /// passt's process id.
    pub fn pid(&self) -> u32 {
        self.shared.pid.load(Ordering::Relaxed)
    }

    /// False once passt has exited or the stream broke (for good).
    pub fn link_up(&self) -> bool {
        self.shared.up.load(Ordering::SeqCst)
    }

    /// Run `f` once when the link goes down (replaces an earlier callback).
    pub fn on_link_change(&self, f: LinkChange) {
        *self
            .shared
            .on_change
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(f);
    }

    /// One received frame into `buf` behind a zeroed virtio-net header;
    /// `WouldBlock` when no whole frame waits.
    pub fn recv_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.link_up() {
            return Err(broken("the link is down"));
        }
        let mut rx = self.rx.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let have = rx.end - rx.start;
            if have >= 4 {
                let s = rx.start;
                let len =
                    u32::from_be_bytes([rx.buf[s], rx.buf[s + 1], rx.buf[s + 2], rx.buf[s + 3]])
                        as usize;
                if len > MAX_PASST_FRAME {
                    drop(rx);
                    self.shared
                        .link_down(&format!("sent a {len}-byte frame length (stream corrupt)"));
                    return Err(broken("corrupt stream"));
                }
                if have >= 4 + len {
                    if buf.len() < VNET_HDR_LEN + len {
                        // Skip it: the caller's buffer is the limit.
                        rx.start += 4 + len;
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("passt: a {len}-byte frame does not fit"),
                        ));
                    }
                    buf[..VNET_HDR_LEN].fill(0);
                    buf[VNET_HDR_LEN..VNET_HDR_LEN + len]
                        .copy_from_slice(&rx.buf[s + 4..s + 4 + len]);
                    rx.start += 4 + len;
                    if rx.start == rx.end {
                        rx.start = 0;
                        rx.end = 0;
                    }
                    return Ok(VNET_HDR_LEN + len);
                }
            }
            // Not a whole frame: make room at the end and read more.
            if rx.start > 0 && rx.buf.len() - rx.end < 4 + MAX_PASST_FRAME {
                let (s, e) = (rx.start, rx.end);
                rx.buf.copy_within(s..e, 0);
                rx.start = 0;
                rx.end = e - s;
            }
            let end = rx.end;
            // SAFETY: reading into the free tail of our own buffer.
            let n = unsafe {
                libc::recv(
                    self.sock.as_raw_fd(),
                    rx.buf[end..].as_mut_ptr().cast(),
                    rx.buf.len() - end,
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                if e.kind() != io::ErrorKind::WouldBlock {
                    drop(rx);
                    self.shared.link_down(&format!("receive failed: {e}"));
                }
                return Err(e);
            }
            if n == 0 {
                drop(rx);
                self.shared.link_down("closed its socket");
                return Err(broken("closed its socket"));
            }
            rx.end += n as usize;
        }
    }

    /// Send one frame given with its virtio-net header (which passt does
    /// not take: it is dropped), at once or through the writer thread (see
    /// [`Passt::send_iovecs`]). `WouldBlock` when
    /// [`TX_BACKLOG`] bytes wait already: the frame is lost, as on a busy
    /// wire (the device thread must never wait for passt, which may itself
    /// be waiting for that thread to take the frames it sends).
    pub fn send_frame(&self, frame: &[u8]) -> io::Result<usize> {
        let eth = frame.get(VNET_HDR_LEN..).unwrap_or(&[]);
        if eth.is_empty() || eth.len() > MAX_PASST_FRAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a {}-byte frame for passt", eth.len()),
            ));
        }
        if !self.link_up() {
            return Err(broken("the link is down"));
        }
        let iov = [libc::iovec {
            iov_base: eth.as_ptr() as *mut libc::c_void,
            iov_len: eth.len(),
        }];
        // SAFETY: the iovec describes `eth`, a live slice.
        unsafe { self.send_iovecs(&iov, eth.len()) }?;
        Ok(frame.len())
    }

    /// Send one Ethernet frame (no virtio-net header) given as `iov`,
    /// `len` bytes in all. When nothing is queued for the writer thread and
    /// it holds no chunk, the frame goes out at once from the caller's
    /// thread (one `sendmsg`, no copy, no thread wake-up); whatever the
    /// socket does not take is queued whole for the writer, so the stream
    /// stays in order and a frame is never cut. `WouldBlock` when
    /// [`TX_BACKLOG`] bytes wait already: the frame is lost.
    ///
    /// # Safety
    /// Each iovec must describe memory readable for the whole call, and the
    /// lengths must add up to `len`.
    pub unsafe fn send_iovecs(&self, iov: &[libc::iovec], len: usize) -> io::Result<()> {
        if len == 0 || len > MAX_PASST_FRAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a {len}-byte frame for passt"),
            ));
        }
        if !self.link_up() {
            return Err(broken("the link is down"));
        }
        let prefix = (len as u32).to_be_bytes();
        let mut q = self.tx.q.lock().unwrap_or_else(|e| e.into_inner());
        let mut sent = 0usize;
        if q.bytes.is_empty() && !q.busy {
            // Under the lock, so no other sender and no writer chunk can
            // come between this frame's bytes.
            let mut all = Vec::with_capacity(iov.len() + 1);
            all.push(libc::iovec {
                iov_base: prefix.as_ptr() as *mut libc::c_void,
                iov_len: 4,
            });
            all.extend_from_slice(&iov[..iov.len().min(1023)]);
            // SAFETY: a zeroed msghdr with only the iovec array set.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = all.as_mut_ptr();
            msg.msg_iovlen = all.len() as _;
            loop {
                // SAFETY: the iovecs are valid for reads (this function's
                // contract, and `prefix` lives on this stack frame).
                let n = unsafe {
                    libc::sendmsg(
                        self.sock.as_raw_fd(),
                        &msg,
                        libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                    )
                };
                if n >= 0 {
                    sent = n as usize;
                    break;
                }
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => break,
                    _ => {
                        drop(q);
                        self.shared.link_down(&format!("send failed: {e}"));
                        return Err(e);
                    }
                }
            }
            if sent == 4 + len {
                return Ok(());
            }
        } else if q.bytes.len() + 4 + len > TX_BACKLOG {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        // The rest of the frame (all of it if nothing was sent) for the
        // writer thread.
        let mut skip = sent;
        if skip < 4 {
            q.bytes.extend(&prefix[skip..]);
            skip = 0;
        } else {
            skip -= 4;
        }
        for v in iov {
            if skip >= v.iov_len {
                skip -= v.iov_len;
                continue;
            }
            // SAFETY: readable for `iov_len` bytes (this function's contract).
            let b = unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) };
            q.bytes.extend(&b[skip..]);
            skip = 0;
        }
        drop(q);
        self.tx.cv.notify_one();
        Ok(())
    }
}

/// Frames on their way to passt, and the writer thread's stop flag.
struct TxQueue {
    bytes: VecDeque<u8>,
    closed: bool,
    /// The writer holds a chunk it took from `bytes` and has not sent
    /// whole yet: a direct send now would overtake it.
    busy: bool,
}

struct Tx {
    q: Mutex<TxQueue>,
    cv: Condvar,
}

/// The writer thread: moves queued bytes into the socket, waiting for it
/// to drain as long as passt takes something every [`SEND_STALL`].
fn writer(fd: RawFd, tx: &Tx, shared: &Shared) {
    let mut chunk: Vec<u8> = Vec::with_capacity(256 * 1024);
    loop {
        {
            let mut q = tx.q.lock().unwrap_or_else(|e| e.into_inner());
            q.busy = false;
            while q.bytes.is_empty() && !q.closed {
                q = tx.cv.wait(q).unwrap_or_else(|e| e.into_inner());
            }
            if q.closed {
                return;
            }
            let n = q.bytes.len().min(chunk.capacity());
            chunk.clear();
            chunk.extend(q.bytes.drain(..n));
            q.busy = true;
        }
        let mut sent = 0;
        let mut last_progress = Instant::now();
        while sent < chunk.len() {
            // SAFETY: sending from a live buffer on our own socket.
            let n = unsafe {
                libc::send(
                    fd,
                    chunk[sent..].as_ptr().cast(),
                    chunk.len() - sent,
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n >= 0 {
                sent += n as usize;
                last_progress = Instant::now();
                continue;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::WouldBlock => {
                    if last_progress.elapsed() > SEND_STALL {
                        shared.link_down(&format!("took no data for {} s", SEND_STALL.as_secs()));
                        return;
                    }
                    if tx.q.lock().unwrap_or_else(|e| e.into_inner()).closed {
                        return;
                    }
                    wait_writable(fd, 100);
                }
                _ => {
                    shared.link_down(&format!("send failed: {e}"));
                    return;
                }
            }
        }
    }
}

/// Wait up to `ms` milliseconds for `fd` to take data.
fn wait_writable(fd: RawFd, ms: i32) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut p, 1, ms) };
}

fn pidfile_path() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    std::env::temp_dir().join(format!(
        "vireo-passt-{}-{}.pid",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

impl AsRawFd for Passt {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

impl Drop for Passt {
    fn drop(&mut self) {
        // Nobody to tell any more: the device is going away with us.
        *self
            .shared
            .on_change
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
        // The link is going away on purpose: no error for it.
        self.shared.up.store(false, Ordering::SeqCst);
        self.tx.q.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        self.tx.cv.notify_all();
        if let Some(t) = self.writer.take() {
            let _ = t.join();
        }
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        {
            let reaped = self.shared.reaped.lock().unwrap_or_else(|e| e.into_inner());
            if !*reaped {
                // SAFETY: the pid is our unreaped child (the flag says so).
                unsafe { libc::kill(self.pid() as libc::pid_t, libc::SIGTERM) };
            }
        }
        if let Some(t) = self.monitor.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostfwd_parses_qemu_syntax_and_gives_passt_args() {
        let f: HostFwd = "tcp:127.0.0.1:2222-:22".parse().unwrap();
        assert_eq!(
            f.passt_args(),
            ["-t".to_string(), "127.0.0.1/2222:22".into()]
        );
        assert_eq!(f.to_string(), "tcp:127.0.0.1:2222-:22");
        let u: HostFwd = "udp::5353-:53".parse().unwrap();
        assert_eq!(u.passt_args(), ["-u".to_string(), "5353:53".into()]);
        assert_eq!(u.to_string().parse::<HostFwd>().unwrap(), u);
        let v6: HostFwd = "tcp:[::1]:80-:8080".parse().unwrap();
        assert_eq!(v6.to_string().parse::<HostFwd>().unwrap(), v6);
    }

    #[test]
    fn hostfwd_errors_say_what_is_wrong() {
        for bad in [
            "sctp::1-:2",
            "tcp:1-2",
            "tcp::0-:22",
            "tcp::22-:x",
            "tcp:host:1-:2",
        ] {
            assert!(bad.parse::<HostFwd>().is_err(), "{bad}");
        }
        let e = "tcp::2222-10.0.2.15:22".parse::<HostFwd>().unwrap_err();
        assert!(e.contains("leave the guest address empty"), "{e}");
    }

    #[test]
    fn a_missing_passt_is_a_clear_error() {
        let o = PasstOptions {
            program: "/nonexistent/passt".into(),
            ..Default::default()
        };
        let e = Passt::start(&o).err().expect("no passt there");
        assert!(matches!(e, PasstError::NotFound(_)), "{e}");
        assert!(e.to_string().contains("install"), "{e}");
        for mtu in [0, MIN_MTU - 1, DEFAULT_MTU + 1] {
            let e = Passt::start(&PasstOptions { mtu, ..o.clone() })
                .err()
                .expect("refused before passt is looked for");
            assert!(matches!(e, PasstError::Mtu(m) if m == mtu), "{e}");
            assert!(e.to_string().contains("68 to 65520"), "{e}");
        }
    }

    /// A fake passt (a shell) that echoes the stream back: the framing is
    /// checked both ways, and its exit takes the link down once.
    #[test]
    fn frames_cross_with_the_length_prefix_and_exit_takes_the_link_down() {
        let dir = std::env::temp_dir().join(format!("vireo-fakepasst-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fake = dir.join("passt");
        // Writes its pid file (the argument after --pid), then copies its
        // socket (fd 3) back to itself until told to stop.
        std::fs::write(
            &fake,
            "#!/bin/sh\nwhile [ \"$1\" != --pid ]; do shift; done\necho $$ > \"$2\"\nexec cat <&3 >&3\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let p = Passt::start(&PasstOptions {
            program: fake,
            ..Default::default()
        })
        .unwrap();
        let downs = Arc::new(AtomicU32::new(0));
        let d = downs.clone();
        p.on_link_change(Box::new(move || {
            d.fetch_add(1, Ordering::SeqCst);
        }));
        let mut frame = vec![0xAAu8; VNET_HDR_LEN];
        frame.extend((0..1500u32).map(|i| i as u8));
        for _ in 0..3 {
            assert_eq!(p.send_frame(&frame).unwrap(), frame.len());
        }
        let mut buf = vec![0u8; MAX_PASST_FRAME + VNET_HDR_LEN];
        for _ in 0..3 {
            let start = Instant::now();
            let n = loop {
                match p.recv_frame(&mut buf) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        assert!(start.elapsed() < Duration::from_secs(5));
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => panic!("{e}"),
                }
            };
            assert_eq!(n, frame.len());
            assert_eq!(&buf[..VNET_HDR_LEN], &[0u8; VNET_HDR_LEN], "header zeroed");
            assert_eq!(&buf[VNET_HDR_LEN..n], &frame[VNET_HDR_LEN..]);
        }
        assert!(p.link_up());
        // SAFETY: signalling the fake passt we started.
        unsafe { libc::kill(p.pid() as libc::pid_t, libc::SIGKILL) };
        let start = Instant::now();
        while p.link_up() {
            assert!(start.elapsed() < Duration::from_secs(5), "link stays up");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(downs.load(Ordering::SeqCst), 1);
        assert!(p.send_frame(&frame).is_err());
        assert!(p.recv_frame(&mut buf).is_err());
        drop(p);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
