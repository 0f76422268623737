//! virtio-vsock (type 19): stream sockets between the guest and host
//! programs, with the host side as Unix sockets in the convention
//! Firecracker and Cloud Hypervisor share:
//!
//! - host to guest: a host program connects to the VM's socket (`PATH`) and
//!   writes `CONNECT <port>\n`; once the guest accepts, it reads
//!   `OK <host port>\n`, and the socket is then the stream;
//! - guest to host: a guest connection to CID 2, port P reaches the Unix
//!   socket `PATH_P` that a host program listens on.
//!
//! Queues: 0 receive (device to guest), 1 transmit, 2 events. A host I/O
//! thread ("vsock-host") polls the listener and every connection's socket;
//! the device worker moves packets. They share one [`Mux`] under a lock and
//! wake each other through two eventfds.
//!
//! Invariants (the spec's credit flow control, and isolation):
//! - each connection buffers at most [`BUF_ALLOC`] bytes from the guest for
//!   its host socket (the credit the device advertises; `fwd_cnt` counts
//!   only bytes the host socket took), and at most [`FROM_HOST_CAP`] bytes
//!   from the host for the guest; data goes to the guest only within the
//!   guest's advertised credit. A connection whose peer floods or stalls
//!   fills its own buffers, then stops being read or credited: it never
//!   blocks another connection, the worker or the host thread;
//! - a guest packet that breaks the protocol (more than its credit, an
//!   unknown connection, a bad address) gets a reset for that connection
//!   only; malformed chains are dropped, never a panic;
//! - once the guest has closed a connection (SHUTDOWN both ways), it is
//!   answered with RST at once and the connection leaves the table; guest
//!   data still buffered for the host moves to a draining list the host
//!   thread finishes writing before it closes the host socket. Holding the
//!   guest's close until a slow host reader took everything instead lets
//!   the guest's close timeout (8 s in Linux) fire first: its RST would
//!   then drop the undelivered tail, and the host would see a clean EOF
//!   on a truncated stream;
//! - guest data the device accepted (and credited) is written to the host
//!   even when the VMM stops right after: the host thread lingers up to
//!   [`LINGER`] on stop to finish it, so a guest that sends its last bytes
//!   and powers off does not truncate the stream;
//! - connections do not survive a snapshot: on restore the guest gets the
//!   spec's transport reset event, and its sockets see the reset.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use hypervisor::GuestRam;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{
    device_type, ActivateError, Persist, PersistError, Processed, QueueError, QueueWorker,
    VirtQueue, VirtioDevice, VirtioInterrupt,
};

pub const QUEUE_SIZE: u16 = 256;
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVENT_QUEUE: usize = 2;
/// The host's context id, as guests address it.
pub const HOST_CID: u64 = 2;
/// `struct virtio_vsock_hdr`.
pub const HDR_LEN: usize = 44;
/// Credit each connection gives the guest: bytes buffered for the host.
pub const BUF_ALLOC: u32 = 256 * 1024;
/// Bytes read from a host socket and not yet given to the guest.
pub const FROM_HOST_CAP: usize = 64 * 1024;
/// Largest payload of one packet either way.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Connections at once (both directions), so the host thread's poll set and
/// the VMM's descriptors stay bounded.
pub const MAX_CONNECTIONS: usize = 1024;
/// `CONNECT <port>\n` longer than this is not one.
const MAX_CONNECT_LINE: usize = 64;

const TYPE_STREAM: u16 = 1;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
const SHUTDOWN_RCV: u32 = 1;
const SHUTDOWN_SEND: u32 = 2;
const EVENT_TRANSPORT_RESET: u32 = 0;

/// `struct virtio_vsock_hdr`, little-endian on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Hdr {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    ty: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

impl Hdr {
    fn parse(b: &[u8]) -> Option<Hdr> {
        let b = b.get(..HDR_LEN)?;
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]));
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Some(Hdr {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            ty: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        })
    }

    fn write(&self, b: &mut [u8]) {
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.ty.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
    }
}

/// (guest port, host port).
type Key = (u32, u32);

/// One stream between a guest socket and a host Unix socket.
struct Conn {
    stream: UnixStream,
    /// False for a host-initiated one until the guest answers.
    established: bool,
    // Guest to host.
    to_host: VecDeque<u8>,
    /// Bytes at the front of `to_host` that are not guest data (the
    /// `OK <port>\n` line): they do not count for `fwd_cnt`.
    uncounted: usize,
    fwd_cnt: u32,
    /// The `fwd_cnt` the guest last heard.
    fwd_sent: u32,
    guest_shut_send: bool,
    guest_closed: bool,
    // Host to guest.
    from_host: VecDeque<u8>,
    rx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    host_eof: bool,
    eof_sent: bool,
    /// Totals for the connection's end-of-life log line: bytes read from
    /// the host socket, and guest bytes the device accepted.
    host_read: u64,
    guest_sent: u64,
}

impl Conn {
    fn new(stream: UnixStream, established: bool) -> Self {
        Conn {
            stream,
            established,
            to_host: VecDeque::new(),
            uncounted: 0,
            fwd_cnt: 0,
            fwd_sent: 0,
            guest_shut_send: false,
            guest_closed: false,
            from_host: VecDeque::new(),
            rx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            host_eof: false,
            eof_sent: false,
            host_read: 0,
            guest_sent: 0,
        }
    }

    /// Bytes the guest can take now.
    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.rx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    /// Guest data buffered for the host.
    fn buffered(&self) -> usize {
        self.to_host.len() - self.uncounted
    }

    /// Write what the host socket takes without blocking. Err: the host
    /// side is gone.
    fn flush(&mut self) -> io::Result<()> {
        write_out(&mut self.stream, &mut self.to_host, |n| {
            // Only guest data counts for the credit the guest hears.
            let skip = n.min(self.uncounted);
            self.uncounted -= skip;
            self.fwd_cnt = self.fwd_cnt.wrapping_add((n - skip) as u32);
        })
    }
}

/// Write the front of `buf` to `stream` until `buf` is empty or the socket
/// would block, calling `taken` with the size of each write before those
/// bytes leave `buf`. Err: the host side is gone (a write of zero bytes
/// counts as gone: the socket will not take more).
fn write_out(
    stream: &mut UnixStream,
    buf: &mut VecDeque<u8>,
    mut taken: impl FnMut(usize),
) -> io::Result<()> {
    while !buf.is_empty() {
        let (a, _) = buf.as_slices();
        match stream.write(a) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                taken(n);
                buf.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A host connection that has not sent its `CONNECT <port>\n` yet.
struct Pending {
    stream: UnixStream,
    line: Vec<u8>,
}

/// Guest data for a host socket whose connection the guest has closed:
/// written out by the host thread, then the socket is closed.
struct Draining {
    stream: UnixStream,
    to_host: VecDeque<u8>,
}

impl Draining {
    /// Write what the host socket takes; true once done (all written, or
    /// the host side is gone).
    fn flush(&mut self) -> bool {
        match write_out(&mut self.stream, &mut self.to_host, |_| {}) {
            Ok(()) => self.to_host.is_empty(),
            Err(_) => true,
        }
    }
}

/// Everything the worker and the host thread share.
struct Mux {
    cid: u64,
    path: PathBuf,
    conns: HashMap<Key, Conn>,
    /// Closed by the guest, data still on its way to the host (counted
    /// against [`MAX_CONNECTIONS`] too).
    draining: Vec<Draining>,
    pending: Vec<Pending>,
    /// Packets without payload waiting for a receive buffer.
    ctrl: VecDeque<Hdr>,
    next_host_port: u32,
    /// Where the last data packet came from: data is sent round-robin.
    rr: usize,
}

impl Mux {
    fn hdr(&self, key: Key, op: u16) -> Hdr {
        Hdr {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: key.1,
            dst_port: key.0,
            len: 0,
            ty: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.conns.get(&key).map_or(0, |c| c.fwd_cnt),
        }
    }

    fn ctrl(&mut self, key: Key, op: u16, flags: u32) {
        let mut h = self.hdr(key, op);
        h.flags = flags;
        if let Some(c) = self.conns.get_mut(&key) {
            c.fwd_sent = c.fwd_cnt;
        }
        self.ctrl.push_back(h);
    }

    /// Drop a connection and tell the guest.
    fn reset(&mut self, key: Key) {
        self.conns.remove(&key);
        self.ctrl.push_back(self.hdr(key, OP_RST));
    }

    /// After the host socket took data: credit the guest when it has used
    /// a good part of its window, and finish a shutdown once drained.
    fn after_flush(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let drained = c.to_host.is_empty();
        if c.guest_closed {
            // The guest is done: answer its close now, and let the host
            // thread finish the host side (see the module's invariants).
            if let Some(c) = self.conns.remove(&key) {
                tracing::debug!(
                    "vsock {key:?}: guest closed; host to guest: {} read, {} sent{}; guest to host: {} taken, {} left",
                    c.host_read,
                    c.rx_cnt,
                    if c.host_eof { ", host EOF" } else { "" },
                    c.guest_sent,
                    c.buffered()
                );
                if c.to_host.is_empty() {
                    tracing::debug!("vsock {key:?}: host socket closed");
                    let _ = c.stream.shutdown(std::net::Shutdown::Both);
                } else {
                    self.draining.push(Draining {
                        stream: c.stream,
                        to_host: c.to_host,
                    });
                }
            }
            self.ctrl.push_back(self.hdr(key, OP_RST));
            return;
        }
        if drained && c.guest_shut_send {
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
        }
        if c.fwd_cnt.wrapping_sub(c.fwd_sent) >= BUF_ALLOC / 4 {
            self.ctrl(key, OP_CREDIT_UPDATE, 0);
        }
    }

    fn flush(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        match c.flush() {
            Ok(()) => self.after_flush(key),
            Err(e) => {
                tracing::debug!("vsock {key:?}: host socket failed: {e}");
                self.reset(key);
            }
        }
    }

    /// One packet from the guest.
    fn guest_packet(&mut self, h: &Hdr, payload: &[u8]) {
        let key = (h.src_port, h.dst_port);
        let answer_rst = |m: &mut Mux| {
            if h.op != OP_RST {
                let mut r = m.hdr(key, OP_RST);
                r.dst_cid = h.src_cid;
                m.ctrl.push_back(r);
            }
        };
        if h.ty != TYPE_STREAM || h.src_cid != self.cid || h.dst_cid != HOST_CID {
            return answer_rst(self);
        }
        if let Some(c) = self.conns.get_mut(&key) {
            c.peer_buf_alloc = h.buf_alloc;
            c.peer_fwd_cnt = h.fwd_cnt;
        }
        match h.op {
            OP_REQUEST => {
                if self.conns.contains_key(&key) || self.open() >= MAX_CONNECTIONS {
                    return answer_rst(self);
                }
                let path = format!("{}_{}", self.path.display(), h.dst_port);
                match UnixStream::connect(&path).and_then(|s| s.set_nonblocking(true).map(|()| s)) {
                    Ok(s) => {
                        let mut c = Conn::new(s, true);
                        c.peer_buf_alloc = h.buf_alloc;
                        c.peer_fwd_cnt = h.fwd_cnt;
                        self.conns.insert(key, c);
                        self.ctrl(key, OP_RESPONSE, 0);
                    }
                    Err(e) => {
                        tracing::debug!("vsock: guest port {} to {path}: {e}", h.src_port);
                        answer_rst(self);
                    }
                }
            }
            OP_RESPONSE => match self.conns.get_mut(&key) {
                Some(c) if !c.established => {
                    c.established = true;
                    let ok = format!("OK {}\n", key.1);
                    c.uncounted += ok.len();
                    for (i, b) in ok.bytes().enumerate() {
                        c.to_host.insert(i, b);
                    }
                    self.flush(key);
                }
                _ => self.reset(key),
            },
            OP_RW => {
                let Some(c) = self.conns.get_mut(&key).filter(|c| c.established) else {
                    return self.reset(key);
                };
                if c.buffered() + payload.len() > BUF_ALLOC as usize || c.guest_shut_send {
                    tracing::debug!("vsock {key:?}: the guest sent beyond its credit");
                    return self.reset(key);
                }
                c.to_host.extend(payload);
                c.guest_sent += payload.len() as u64;
                self.flush(key);
            }
            OP_CREDIT_UPDATE => {
                if !self.conns.contains_key(&key) {
                    answer_rst(self);
                }
            }
            OP_CREDIT_REQUEST => {
                if self.conns.contains_key(&key) {
                    self.ctrl(key, OP_CREDIT_UPDATE, 0);
                } else {
                    answer_rst(self);
                }
            }
            OP_SHUTDOWN => {
                let Some(c) = self.conns.get_mut(&key) else {
                    return answer_rst(self);
                };
                if h.flags & SHUTDOWN_SEND != 0 {
                    c.guest_shut_send = true;
                }
                if h.flags & (SHUTDOWN_SEND | SHUTDOWN_RCV) == SHUTDOWN_SEND | SHUTDOWN_RCV {
                    c.guest_closed = true;
                }
                self.flush(key);
            }
            OP_RST => {
                if let Some(c) = self.conns.remove(&key) {
                    tracing::debug!(
                        "vsock {key:?}: reset by the guest; host to guest: {} read, {} sent; guest to host: {} taken, {} dropped",
                        c.host_read,
                        c.rx_cnt,
                        c.guest_sent,
                        c.buffered()
                    );
                }
            }
            _ => answer_rst(self),
        }
    }

    /// End every connection; the guest data they hold for the host moves
    /// to the draining list.
    fn stop_connections(&mut self) {
        let Mux {
            conns, draining, ..
        } = self;
        draining.extend(conns.drain().filter_map(|(_, c)| {
            (!c.to_host.is_empty()).then_some(Draining {
                stream: c.stream,
                to_host: c.to_host,
            })
        }));
    }

    /// Connections holding host sockets (open and draining).
    fn open(&self) -> usize {
        self.conns.len() + self.draining.len()
    }

    /// Something to put in a receive buffer now?
    fn has_output(&self) -> bool {
        !self.ctrl.is_empty()
            || self.conns.values().any(|c| {
                c.established
                    && ((!c.from_host.is_empty() && c.peer_credit() > 0)
                        || (c.host_eof && c.from_host.is_empty() && !c.eof_sent))
            })
    }

    /// The next packet for the guest into `out` (header then payload, at
    /// most `room` bytes); its length, or None.
    fn next_packet(&mut self, out: &mut Vec<u8>, room: usize) -> Option<usize> {
        out.clear();
        if let Some(h) = self.ctrl.pop_front() {
            out.resize(HDR_LEN, 0);
            h.write(out);
            return Some(HDR_LEN);
        }
        let mut keys: Vec<Key> = self.conns.keys().copied().collect();
        keys.sort_unstable();
        let n = keys.len();
        for i in 0..n {
            let key = keys[(self.rr + 1 + i) % n];
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            if !c.established {
                continue;
            }
            let take = c
                .from_host
                .len()
                .min(c.peer_credit() as usize)
                .min(room.saturating_sub(HDR_LEN))
                .min(MAX_PAYLOAD);
            if take > 0 {
                self.rr = (self.rr + 1 + i) % n;
                c.rx_cnt = c.rx_cnt.wrapping_add(take as u32);
                c.fwd_sent = c.fwd_cnt;
                let h = Hdr {
                    src_cid: HOST_CID,
                    dst_cid: self.cid,
                    src_port: key.1,
                    dst_port: key.0,
                    len: take as u32,
                    ty: TYPE_STREAM,
                    op: OP_RW,
                    flags: 0,
                    buf_alloc: BUF_ALLOC,
                    fwd_cnt: c.fwd_cnt,
                };
                out.resize(HDR_LEN, 0);
                h.write(out);
                out.extend(c.from_host.drain(..take));
                return Some(out.len());
            }
            if c.host_eof && c.from_host.is_empty() && !c.eof_sent {
                c.eof_sent = true;
                // The host will send no more; the guest may still send.
                let mut h = self.hdr(key, OP_SHUTDOWN);
                h.flags = SHUTDOWN_SEND;
                out.resize(HDR_LEN, 0);
                h.write(out);
                return Some(HDR_LEN);
            }
        }
        None
    }
}

struct Shared {
    mux: Mutex<Mux>,
    /// Host to worker: packets wait for the receive queue.
    rx_wake: EventFd,
    /// Worker to host thread: the poll set or its interests changed.
    io_wake: EventFd,
    kill: EventFd,
    listener: UnixListener,
}

impl Shared {
    fn mux(&self) -> MutexGuard<'_, Mux> {
        self.mux.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What a snapshot keeps: the guest's CID. Connections are not kept (their
/// host sockets are not in a snapshot); a restore resets the transport.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VsockState {
    pub cid: u64,
}

/// The vsock device.
pub struct Vsock {
    shared: Arc<Shared>,
    host: Option<threads::Handle<()>>,
    /// Set by a restore: the next activation tells the guest its transport
    /// was reset.
    reset_pending: bool,
}

impl Vsock {
    /// Listen on `path` (a stale socket file there is replaced) for host
    /// connections to a guest with context id `cid`.
    pub fn new(cid: u64, path: &Path) -> io::Result<Self> {
        if std::fs::symlink_metadata(path).is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_socket()
        }) {
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path).map_err(|e| {
            io::Error::new(e.kind(), format!("vsock socket {}: {e}", path.display()))
        })?;
        listener.set_nonblocking(true)?;
        let shared = Arc::new(Shared {
            mux: Mutex::new(Mux {
                cid,
                path: path.to_path_buf(),
                conns: HashMap::new(),
                draining: Vec::new(),
                pending: Vec::new(),
                ctrl: VecDeque::new(),
                next_host_port: 1 << 30,
                rr: 0,
            }),
            rx_wake: EventFd::new(EFD_NONBLOCK)?,
            io_wake: EventFd::new(EFD_NONBLOCK)?,
            kill: EventFd::new(EFD_NONBLOCK)?,
            listener,
        });
        let s = shared.clone();
        let host = threads::spawn(threads::Role::Helper("vsock-host".into()), move || {
            host_thread(&s)
        })?;
        Ok(Vsock {
            shared,
            host: Some(host),
            reset_pending: false,
        })
    }

    pub fn cid(&self) -> u64 {
        self.shared.mux().cid
    }

    /// Connections open now (both directions).
    pub fn connections(&self) -> usize {
        self.shared.mux().conns.len()
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        let _ = self.shared.kill.write(1);
        if let Some(t) = self.host.take() {
            let _ = t.join();
        }
        let path = self.shared.mux().path.clone();
        let _ = std::fs::remove_file(path);
    }
}

impl Persist for Vsock {
    type State = VsockState;

    fn save(&self) -> Result<VsockState, PersistError> {
        Ok(VsockState { cid: self.cid() })
    }

    fn restore(&mut self, s: &VsockState) -> Result<(), PersistError> {
        if s.cid != self.cid() {
            return Err(PersistError::mismatch(
                "virtio-vsock",
                format!(
                    "the snapshot's guest CID is {}, this VM's {}",
                    s.cid,
                    self.cid()
                ),
            ));
        }
        let mut m = self.shared.mux();
        m.conns.clear();
        m.draining.clear();
        m.pending.clear();
        m.ctrl.clear();
        self.reset_pending = true;
        Ok(())
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        0
    }

    fn config_len(&self) -> usize {
        8
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::read_config_image(&self.cid().to_le_bytes(), offset, data);
    }

    fn save_state(&self) -> Result<crate::DeviceState, PersistError> {
        crate::save_as(self, crate::DeviceState::Vsock)
    }

    fn restore_state(&mut self, state: &crate::DeviceState) -> Result<(), PersistError> {
        crate::restore_from(self, "virtio-vsock", state, |s| match s {
            crate::DeviceState::Vsock(s) => Some(s),
            _ => None,
        })
    }

    fn activate(
        &mut self,
        _features: u64,
        _mem: GuestRam,
        _interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<Box<dyn QueueWorker>, ActivateError> {
        let reset_pending = std::mem::take(&mut self.reset_pending);
        if reset_pending {
            // The event queue is serviced as the worker starts.
            let _ = self.shared.rx_wake.write(1);
        }
        Ok(Box::new(VsockWorker {
            shared: self.shared.clone(),
            reset_pending,
            pkt: Vec::with_capacity(HDR_LEN + MAX_PAYLOAD),
            dropped: 0,
        }))
    }

    /// The driver reset the device (a guest does at power-off): its
    /// connections are gone, but guest data the device already accepted
    /// still goes to the host sockets before they close, as after a guest
    /// close (see the module's invariants).
    fn reset(&mut self) {
        let mut m = self.shared.mux();
        m.stop_connections();
        m.pending.clear();
        m.ctrl.clear();
        drop(m);
        let _ = self.shared.io_wake.write(1);
    }
}

struct VsockWorker {
    shared: Arc<Shared>,
    reset_pending: bool,
    pkt: Vec<u8>,
    dropped: u64,
}

impl VsockWorker {
    fn transmit(&mut self, q: &mut VirtQueue, mem: &GuestRam) -> Result<Processed, QueueError> {
        let mut done = Processed::default();
        while let Some(chain) = q.pop(mem)? {
            let len = chain.readable_len() as usize;
            if (HDR_LEN..=HDR_LEN + MAX_PAYLOAD).contains(&len) {
                chain.read_all_into(mem, &mut self.pkt)?;
                if let Some(h) = Hdr::parse(&self.pkt) {
                    let end = (HDR_LEN + h.len as usize).min(self.pkt.len());
                    self.shared.mux().guest_packet(&h, &self.pkt[HDR_LEN..end]);
                }
            } else {
                self.dropped += 1;
                tracing::debug!("virtio-vsock: dropped a {len}-byte transmit chain");
            }
            q.add_used(mem, chain.head, 0)?;
            done.used = true;
        }
        // Answers wait for the receive queue; new sockets and buffered
        // data need the host thread's attention.
        let _ = self.shared.rx_wake.write(1);
        let _ = self.shared.io_wake.write(1);
        Ok(done)
    }

    fn receive(&mut self, q: &mut VirtQueue, mem: &GuestRam) -> Result<Processed, QueueError> {
        let mut done = Processed::default();
        let mut took_host_data = false;
        loop {
            let mut m = self.shared.mux();
            if !m.has_output() {
                done.stalled = true;
                break;
            }
            let Some(chain) = q.pop(mem)? else {
                done.stalled = true;
                break;
            };
            let room = chain.writable_len() as usize;
            if room < HDR_LEN {
                drop(m);
                self.dropped += 1;
                q.add_used(mem, chain.head, 0)?;
                done.used = true;
                continue;
            }
            let Some(n) = m.next_packet(&mut self.pkt, room) else {
                // has_output said yes, so this is only a race with a
                // reset: give the buffer back empty.
                drop(m);
                q.add_used(mem, chain.head, 0)?;
                done.used = true;
                continue;
            };
            drop(m);
            took_host_data |= n > HDR_LEN;
            let w = chain.write_all(mem, &self.pkt[..n])?;
            q.add_used(mem, chain.head, w)?;
            done.used = true;
        }
        if took_host_data {
            let _ = self.shared.io_wake.write(1);
        }
        Ok(done)
    }

    fn event(&mut self, q: &mut VirtQueue, mem: &GuestRam) -> Result<Processed, QueueError> {
        let mut done = Processed {
            stalled: true,
            ..Default::default()
        };
        if self.reset_pending {
            if let Some(chain) = q.pop(mem)? {
                let w = chain.write_all(mem, &EVENT_TRANSPORT_RESET.to_le_bytes())?;
                q.add_used(mem, chain.head, w)?;
                self.reset_pending = false;
                done.used = true;
                tracing::info!("virtio-vsock: told the guest its transport was reset");
            }
        }
        Ok(done)
    }
}

impl QueueWorker for VsockWorker {
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut VirtQueue,
        mem: &GuestRam,
    ) -> Result<Processed, QueueError> {
        match index {
            RX_QUEUE => self.receive(queue, mem),
            TX_QUEUE => self.transmit(queue, mem),
            EVENT_QUEUE => self.event(queue, mem),
            _ => Ok(Processed::default()),
        }
    }

    fn host_event(&self) -> Option<&EventFd> {
        Some(&self.shared.rx_wake)
    }

    fn host_event_queues(&self) -> Vec<usize> {
        vec![EVENT_QUEUE, RX_QUEUE]
    }
}

/// What a poll slot is for.
#[derive(Clone, Copy)]
enum Slot {
    Kill,
    Wake,
    Listener,
    Pending(usize),
    Conn(Key),
    Drain(usize),
}

/// The host side: accept connections, read `CONNECT` lines, move bytes
/// between host sockets and the connection buffers.
fn host_thread(s: &Shared) {
    let mut fds: Vec<libc::pollfd> = Vec::new();
    let mut slots: Vec<Slot> = Vec::new();
    let mut buf = vec![0u8; FROM_HOST_CAP];
    loop {
        fds.clear();
        slots.clear();
        let mut add = |fd: RawFd, events: i16, slot: Slot| {
            fds.push(libc::pollfd {
                fd,
                events,
                revents: 0,
            });
            slots.push(slot);
        };
        add(s.kill.as_raw_fd(), libc::POLLIN, Slot::Kill);
        add(s.io_wake.as_raw_fd(), libc::POLLIN, Slot::Wake);
        add(s.listener.as_raw_fd(), libc::POLLIN, Slot::Listener);
        {
            let m = s.mux();
            for (i, p) in m.pending.iter().enumerate() {
                add(p.stream.as_raw_fd(), libc::POLLIN, Slot::Pending(i));
            }
            for (k, c) in &m.conns {
                let mut ev = 0;
                if !c.host_eof && c.from_host.len() < FROM_HOST_CAP {
                    ev |= libc::POLLIN;
                }
                if !c.to_host.is_empty() {
                    ev |= libc::POLLOUT;
                }
                // A socket with no interest is left out: a closed one
                // would report POLLHUP forever.
                if ev != 0 {
                    add(c.stream.as_raw_fd(), ev, Slot::Conn(*k));
                }
            }
            for (i, d) in m.draining.iter().enumerate() {
                add(d.stream.as_raw_fd(), libc::POLLOUT, Slot::Drain(i));
            }
        }
        // SAFETY: `fds` is a valid pollfd array for its length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!("vsock-host: poll failed: {}", io::Error::last_os_error());
            return;
        }
        let mut m = s.mux();
        let mut wake_rx = false;
        let mut done_pending: Vec<usize> = Vec::new();
        let mut done_draining: Vec<usize> = Vec::new();
        for (pfd, slot) in fds.iter().zip(&slots) {
            if pfd.revents == 0 {
                continue;
            }
            match *slot {
                Slot::Kill => {
                    drop(m);
                    return linger(s);
                }
                Slot::Wake => {
                    let _ = s.io_wake.read();
                }
                Slot::Listener => {
                    while let Ok((st, _)) = s.listener.accept() {
                        if m.open() + m.pending.len() >= MAX_CONNECTIONS
                            || st.set_nonblocking(true).is_err()
                        {
                            continue; // dropped: closes it
                        }
                        m.pending.push(Pending {
                            stream: st,
                            line: Vec::new(),
                        });
                    }
                }
                Slot::Pending(i) => {
                    if let Some(key) = read_connect(&mut m, i, &mut buf) {
                        done_pending.push(i);
                        if let Some(key) = key {
                            let h = m.hdr(key, OP_REQUEST);
                            m.ctrl.push_back(h);
                            wake_rx = true;
                        }
                    }
                }
                Slot::Drain(i) => {
                    // Only the host thread removes entries (a device reset
                    // clears them all): `i` is still the one polled,
                    // unless the list was cleared meanwhile.
                    if m.draining.get_mut(i).is_some_and(|d| d.flush()) {
                        done_draining.push(i);
                    }
                }
                Slot::Conn(key) => {
                    if pfd.revents & libc::POLLOUT != 0 {
                        m.flush(key);
                        wake_rx = true;
                    }
                    let Some(c) = m.conns.get_mut(&key) else {
                        continue;
                    };
                    if pfd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
                        && !c.host_eof
                    {
                        let room = FROM_HOST_CAP.saturating_sub(c.from_host.len());
                        if room == 0 {
                            // POLLHUP/POLLERR come unasked: a read into no
                            // room returns 0, which is not the host's EOF.
                            continue;
                        }
                        match c.stream.read(&mut buf[..room]) {
                            Ok(0) => c.host_eof = true,
                            Ok(n) => {
                                c.from_host.extend(&buf[..n]);
                                c.host_read += n as u64;
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                            Err(_) => {
                                m.reset(key);
                            }
                        }
                        wake_rx = true;
                    }
                }
            }
        }
        // Remove answered or failed pending connections, highest first.
        done_pending.sort_unstable();
        for i in done_pending.into_iter().rev() {
            m.pending.swap_remove(i);
        }
        done_draining.sort_unstable();
        for i in done_draining.into_iter().rev() {
            let d = m.draining.swap_remove(i);
            tracing::debug!(
                "vsock: a closed connection's host socket took its last bytes ({} left)",
                d.to_host.len()
            );
            let _ = d.stream.shutdown(std::net::Shutdown::Both);
        }
        drop(m);
        if wake_rx {
            let _ = s.rx_wake.write(1);
        }
    }
}

/// How long a stopping VMM keeps writing guest data its host readers have
/// not taken yet.
const LINGER: std::time::Duration = std::time::Duration::from_secs(10);

/// The VMM is stopping (the guest powered off, or the VM is being torn
/// down): guest data already accepted for host sockets (credited to the
/// guest, so the guest counts it as sent) is still written out, as a host
/// kernel keeps sending a closed TCP socket's data, for at most [`LINGER`].
/// A guest that writes its last bytes and powers off at once must not lose
/// them to a host reader that is a little behind.
fn linger(s: &Shared) {
    let deadline = std::time::Instant::now() + LINGER;
    let mut m = s.mux();
    m.stop_connections();
    let mut pending = std::mem::take(&mut m.draining);
    drop(m);
    let mut fds: Vec<libc::pollfd> = Vec::new();
    loop {
        pending.retain_mut(|d| {
            let done = d.flush();
            if done {
                let _ = d.stream.shutdown(std::net::Shutdown::Both);
            }
            !done
        });
        let now = std::time::Instant::now();
        if pending.is_empty() || now >= deadline {
            break;
        }
        fds.clear();
        fds.extend(pending.iter().map(|d| libc::pollfd {
            fd: d.stream.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        }));
        let ms = (deadline - now).as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: `fds` is a valid pollfd array for its length.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    }
    if !pending.is_empty() {
        let bytes: usize = pending.iter().map(|d| d.to_host.len()).sum();
        tracing::warn!(
            "virtio-vsock: {bytes} bytes of guest data for {} host sockets not taken within {LINGER:?} of stopping; dropped",
            pending.len()
        );
    }
}

/// Read a pending connection's `CONNECT <port>\n`. None: not complete yet;
/// Some(None): it failed (dropped); Some(Some(key)): a connection was made
/// (the pending entry's stream moved into it).
fn read_connect(m: &mut Mux, i: usize, buf: &mut [u8]) -> Option<Option<Key>> {
    let p = m.pending.get_mut(i)?;
    // Byte by byte up to the newline: what follows it is the stream's.
    loop {
        match p.stream.read(&mut buf[..1]) {
            Ok(0) => return Some(None),
            Ok(_) => {
                if buf[0] == b'\n' {
                    break;
                }
                p.line.push(buf[0]);
                if p.line.len() > MAX_CONNECT_LINE {
                    return Some(None);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Some(None),
        }
    }
    let line = String::from_utf8_lossy(&p.line).into_owned();
    let port = line
        .strip_prefix("CONNECT ")
        .and_then(|p| p.trim().parse::<u32>().ok());
    let Some(port) = port else {
        tracing::debug!("vsock: a host connection sent {line:?}, not CONNECT <port>");
        return Some(None);
    };
    if m.open() >= MAX_CONNECTIONS {
        return Some(None);
    }
    // A host port no open connection to this guest port uses.
    let mut host_port = m.next_host_port;
    while m.conns.contains_key(&(port, host_port)) {
        host_port = host_port.wrapping_add(1).max(1 << 30);
    }
    m.next_host_port = host_port.wrapping_add(1).max(1 << 30);
    let stream = match m.pending[i].stream.try_clone() {
        Ok(s) => s,
        Err(_) => return Some(None),
    };
    let key = (port, host_port);
    m.conns.insert(key, Conn::new(stream, false));
    Some(Some(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mux(path: &Path) -> Mux {
        Mux {
            cid: 3,
            path: path.to_path_buf(),
            conns: HashMap::new(),
            draining: Vec::new(),
            pending: Vec::new(),
            ctrl: VecDeque::new(),
            next_host_port: 1 << 30,
            rr: 0,
        }
    }

    fn guest_hdr(op: u16, gport: u32, hport: u32, len: u32) -> Hdr {
        Hdr {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: gport,
            dst_port: hport,
            len,
            ty: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 64 * 1024,
            fwd_cnt: 0,
        }
    }

    #[test]
    fn header_round_trips() {
        let h = guest_hdr(OP_RW, 1234, 5678, 99);
        let mut b = [0u8; HDR_LEN];
        h.write(&mut b);
        assert_eq!(Hdr::parse(&b), Some(h));
        assert_eq!(Hdr::parse(&b[..10]), None);
    }

    #[test]
    fn guest_connects_to_a_host_listener_and_data_and_credit_flow() {
        let dir = std::env::temp_dir().join(format!("vireo-vsock-ut-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let base = dir.join("v.sock");
        let host = UnixListener::bind(format!("{}_5000", base.display())).unwrap();
        let mut m = mux(&base);
        // To a port nobody listens on: reset.
        m.guest_packet(&guest_hdr(OP_REQUEST, 1, 4999, 0), &[]);
        assert_eq!(m.ctrl.pop_front().unwrap().op, OP_RST);
        // To the listener: a response, and the host accepts.
        m.guest_packet(&guest_hdr(OP_REQUEST, 1, 5000, 0), &[]);
        assert_eq!(m.ctrl.pop_front().unwrap().op, OP_RESPONSE);
        let (mut hs, _) = host.accept().unwrap();
        m.guest_packet(&guest_hdr(OP_RW, 1, 5000, 5), b"hello");
        let mut got = [0u8; 5];
        hs.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        // Beyond the credit: the connection is reset, nothing else.
        let big = vec![0u8; BUF_ALLOC as usize + 1];
        m.guest_packet(&guest_hdr(OP_RW, 1, 5000, big.len() as u32), &big);
        assert_eq!(m.ctrl.pop_front().unwrap().op, OP_RST);
        assert!(m.conns.is_empty());
        // A packet for no connection: reset; a reset for none: nothing.
        m.guest_packet(&guest_hdr(OP_RW, 9, 5000, 1), b"x");
        assert_eq!(m.ctrl.pop_front().unwrap().op, OP_RST);
        m.guest_packet(&guest_hdr(OP_RST, 9, 5000, 0), &[]);
        assert!(m.ctrl.is_empty());
        // A wrong source CID is refused.
        let mut h = guest_hdr(OP_REQUEST, 2, 5000, 0);
        h.src_cid = 7;
        m.guest_packet(&h, &[]);
        assert_eq!(m.ctrl.pop_front().unwrap().op, OP_RST);
        assert!(m.conns.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn host_data_goes_out_within_the_guest_credit_only() {
        let dir = std::env::temp_dir().join(format!("vireo-vsock-ut2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, _b) = UnixStream::pair().unwrap();
        let mut m = mux(&dir.join("v.sock"));
        let mut c = Conn::new(a, true);
        c.peer_buf_alloc = 100;
        c.from_host.extend(std::iter::repeat_n(7u8, 300));
        m.conns.insert((1, 2), c);
        let mut out = Vec::new();
        assert_eq!(m.next_packet(&mut out, 4096), Some(HDR_LEN + 100));
        let h = Hdr::parse(&out).unwrap();
        assert_eq!((h.op, h.len, h.dst_port, h.src_port), (OP_RW, 100, 1, 2));
        assert!(!m.has_output(), "no credit left");
        // The guest reports it consumed 100: 100 more may go.
        m.guest_packet(
            &Hdr {
                fwd_cnt: 100,
                buf_alloc: 100,
                ..guest_hdr(OP_CREDIT_UPDATE, 1, 2, 0)
            },
            &[],
        );
        assert!(m.ctrl.is_empty());
        assert_eq!(
            m.next_packet(&mut out, 60),
            Some(60),
            "limited by the buffer"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A guest driver's reset (Linux resets the device as it powers off)
    /// ends the connections but not the delivery of what they hold.
    #[test]
    fn a_device_reset_still_delivers_accepted_guest_data() {
        let dir = std::env::temp_dir().join(format!("vireo-vsock-ut5-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut dev = Vsock::new(3, &dir.join("v.sock")).unwrap();
        let data: Vec<u8> = (0..2 * BUF_ALLOC).map(|i| (i % 241) as u8).collect();
        let (a, mut host) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut c = Conn::new(a, true);
        c.to_host = data.iter().copied().collect();
        dev.shared.mux().conns.insert((1, 2), c);
        VirtioDevice::reset(&mut dev);
        assert_eq!(dev.connections(), 0, "the reset ended the connection");
        // The device lives on (the guest may start it again); its host
        // thread finishes the old connection's data meanwhile.
        let mut got = Vec::new();
        host.set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        host.read_to_end(&mut got).unwrap();
        assert!(
            got == data,
            "the host got {} bytes, changed or cut",
            got.len()
        );
        drop(dev);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Guest data still buffered when the VMM stops (a closed connection's
    /// and an open one's) reaches host readers that are behind.
    #[test]
    fn stopping_the_device_still_delivers_buffered_guest_data() {
        let dir = std::env::temp_dir().join(format!("vireo-vsock-ut4-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let dev = Vsock::new(3, &dir.join("v.sock")).unwrap();
        let data: Vec<u8> = (0..4 * BUF_ALLOC).map(|i| (i % 253) as u8).collect();
        let mut readers = Vec::new();
        {
            let mut m = dev.shared.mux();
            for k in 0..2u32 {
                let (a, mut host) = UnixStream::pair().unwrap();
                a.set_nonblocking(true).unwrap();
                let to_host: VecDeque<u8> = data.iter().copied().collect();
                if k == 0 {
                    m.draining.push(Draining { stream: a, to_host });
                } else {
                    let mut c = Conn::new(a, true);
                    c.to_host = to_host;
                    m.conns.insert((1, 2), c);
                }
                readers.push(std::thread::spawn(move || {
                    // Behind the guest: nothing read until the VMM stops.
                    std::thread::sleep(std::time::Duration::from_millis(300));
                    let mut got = Vec::new();
                    host.read_to_end(&mut got).unwrap();
                    got
                }));
            }
        }
        drop(dev);
        for r in readers {
            let got = r.join().unwrap();
            assert_eq!(got.len(), data.len(), "bytes the host got");
            assert!(got == data, "the host got a changed stream");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The guest closes a connection whose host reader is slow: it gets
    /// its RST at once (so its close timeout never fires and resets the
    /// stream), and the host still receives every byte, then EOF.
    #[test]
    fn a_guest_close_is_answered_at_once_and_the_host_still_gets_everything() {
        let dir = std::env::temp_dir().join(format!("vireo-vsock-ut3-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, mut host) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut m = mux(&dir.join("v.sock"));
        m.conns.insert((1, 2), Conn::new(a, true));
        // More than a Unix socket buffer holds: part stays in to_host.
        let data: Vec<u8> = (0..BUF_ALLOC).map(|i| (i % 251) as u8).collect();
        for (k, chunk) in data.chunks(MAX_PAYLOAD).enumerate() {
            let h = Hdr {
                fwd_cnt: 0,
                ..guest_hdr(OP_RW, 1, 2, chunk.len() as u32)
            };
            m.guest_packet(&h, chunk);
            assert!(
                m.conns.contains_key(&(1, 2)),
                "chunk {k} reset the connection"
            );
        }
        assert!(
            m.conns[&(1, 2)].buffered() > 0,
            "the host socket took it all"
        );
        m.ctrl.clear();
        let shut = Hdr {
            flags: SHUTDOWN_RCV | SHUTDOWN_SEND,
            ..guest_hdr(OP_SHUTDOWN, 1, 2, 0)
        };
        m.guest_packet(&shut, &[]);
        assert_eq!(m.ctrl.pop_front().map(|h| h.op), Some(OP_RST));
        assert!(m.conns.is_empty());
        assert_eq!(m.draining.len(), 1);
        // The port may be used again at once.
        m.guest_packet(&guest_hdr(OP_RST, 1, 2, 0), &[]);
        assert_eq!(m.draining.len(), 1, "a late guest RST drops nothing");
        // What the host thread does on POLLOUT, while the host reads.
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            host.read_to_end(&mut got).unwrap();
            got
        });
        let mut d = m.draining.pop().unwrap();
        while !d.flush() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        d.stream.shutdown(std::net::Shutdown::Both).unwrap();
        drop(d);
        assert!(
            reader.join().unwrap() == data,
            "the host got a changed stream"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
