//! virtio-net (type 1): a receive and a transmit queue over a host backend
//! (a tap or passt, see the `net` crate). Frames cross the backend trait in
//! both directions with the 12-byte virtio-net header in front. A tap takes
//! the header, so checksum and segmentation offloads negotiated by the
//! guest pass through to it untouched; a backend that cannot honour them
//! (passt has no header) says so in [`NetBackend::offload_features`], and
//! the device then offers the guest none of them: the header it sees on
//! receive is all zero and the one it writes on transmit asks for nothing.
//!
//! Link state: a backend that can go away (passt exits) reports it through
//! [`NetBackend::link_up`] and a change callback; the device then clears
//! VIRTIO_NET_S_LINK_UP and raises a configuration interrupt, so the guest
//! sees its carrier drop instead of the VMM hanging on a dead peer.
//!
//! Receive flow: the device worker thread polls the backend itself (no
//! relay thread, so a frame costs no extra thread wake-ups); it moves
//! frames into the guest's receive buffers until the backend is empty (then
//! it polls the backend again) or the guest has no buffers left (then it
//! stops polling the backend, which stays readable, and waits for the
//! guest's next receive notify, keeping the frame it already read).
//!
//! Merged receive buffers (VIRTIO_NET_F_MRG_RXBUF, which Linux takes),
//! offered by default only where the backend has no receive segmentation
//! offloads (passt; a tap when asked, `Net::set_merged_rx`: its 64 KiB
//! frames are cheaper for the guest in one big-packet chain, see
//! `features`): the guest posts small (about page-sized) buffers and a
//! frame spreads over as many as it needs; num_buffers in its header says
//! how many, and the used entries of one frame are published together (a
//! driver that sees only the first drops the frame). A frame read before
//! the guest posted enough buffers waits in the worker, the chains it took
//! put back with the guest asked to notify past them (not past the chains
//! put back, which it has already posted: it would never notify again).
//! Without it, a frame goes into one chain and one too big for the chain
//! is dropped, never truncated.
//!
//! Frame sizes: a frame up to [`MAX_FRAME`] crosses either way. passt at
//! its MTU of 65520 (the guest takes it by DHCP) sends frames of up to
//! 65534 bytes, which reach the guest in merged buffers: ~45x fewer frames
//! per byte than at 1500 for a stream without segmentation offloads.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use block::IoBuf;
use hypervisor::GuestRam;
use vm_memory::bitmap::Bitmap;

use crate::queue::GuestSlice;
use crate::rate_limit::{RateLimitError, RateLimiterConfig, SharedLimiter, Throttle, Waker};

use crate::{
    device_type, ActivateError, Persist, PersistError, Processed, QueueError, QueueWorker,
    VirtQueue, VirtioDevice, VirtioInterrupt,
};

pub const QUEUE_SIZE: u16 = 256;
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
/// `struct virtio_net_hdr_v1`, in front of every frame (VERSION_1 always has num_buffers).
pub const HDR_LEN: usize = 12;
/// Largest frame with header the device moves: a 64 KiB GSO frame plus header.
pub const MAX_FRAME: usize = 65_536 + HDR_LEN + 14;

pub const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
pub const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
pub const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
pub const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
pub const VIRTIO_NET_F_GUEST_ECN: u64 = 1 << 9;
pub const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
pub const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
pub const VIRTIO_NET_F_HOST_ECN: u64 = 1 << 13;
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;

const VIRTIO_NET_S_LINK_UP: u16 = 1;

/// The offload features a tap honours (it takes the virtio-net header).
pub const TAP_OFFLOADS: u64 = VIRTIO_NET_F_CSUM
    | VIRTIO_NET_F_GUEST_CSUM
    | VIRTIO_NET_F_HOST_TSO4
    | VIRTIO_NET_F_HOST_TSO6
    | VIRTIO_NET_F_HOST_ECN
    | VIRTIO_NET_F_GUEST_TSO4
    | VIRTIO_NET_F_GUEST_TSO6
    | VIRTIO_NET_F_GUEST_ECN;

/// Where frames go and come from on the host.
pub trait NetBackend: Send + Sync {
    /// A descriptor that polls readable when a frame waits.
    fn poll_fd(&self) -> RawFd;
    /// One frame, virtio-net header first; `WouldBlock` when none waits.
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// One frame, virtio-net header first.
    fn send(&self, frame: &[u8]) -> io::Result<usize>;
    /// One frame from pieces of guest memory, header first, in one call.
    /// The default gathers them into `scratch` and calls `send`.
    fn send_parts(&self, parts: &[IoBuf], scratch: &mut Vec<u8>) -> io::Result<usize> {
        scratch.clear();
        for p in parts {
            let at = scratch.len();
            scratch.resize(at + p.len(), 0);
            p.copy_to(&mut scratch[at..]);
        }
        self.send(scratch)
    }
    /// One frame into pieces of guest memory (at least [`MAX_FRAME`] bytes
    /// in all, so any frame fits), header first; `WouldBlock` when none
    /// waits. The default reads into `scratch` and copies.
    fn recv_parts(&self, parts: &[IoBuf], scratch: &mut [u8]) -> io::Result<usize> {
        let n = self.recv(scratch)?;
        let mut at = 0;
        for p in parts {
            if at >= n {
                break;
            }
            let k = p.len().min(n - at);
            p.copy_from(&scratch[at..at + k]);
            at += k;
        }
        Ok(at)
    }
    /// The offloads the guest accepts on received frames.
    fn set_offloads(&self, _offloads: net::Offloads) -> io::Result<()> {
        Ok(())
    }
    /// The offload feature bits (of [`TAP_OFFLOADS`]) this backend can
    /// honour; the device offers the guest no others.
    fn offload_features(&self) -> u64 {
        TAP_OFFLOADS
    }
    /// The backend carries no virtio-net header (passt): the device then
    /// offers the guest checksum offload both ways and does the summing
    /// itself in native code (`net_csum`), which is cheaper than the guest
    /// summing every byte in translated code.
    fn soft_checksums(&self) -> bool {
        false
    }
    /// False once the backend is gone for good (the guest sees no carrier).
    fn link_up(&self) -> bool {
        true
    }
    /// Run `f` when [`NetBackend::link_up`] changes; a backend whose link
    /// never changes ignores it.
    fn on_link_change(&self, _f: Box<dyn Fn() + Send + Sync>) {}
}

impl NetBackend for net::Tap {
    fn poll_fd(&self) -> RawFd {
        self.as_raw_fd()
    }
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_frame(buf)
    }
    fn send(&self, frame: &[u8]) -> io::Result<usize> {
        self.write_frame(&[frame])
    }
    /// One `writev` straight from guest memory.
    fn send_parts(&self, parts: &[IoBuf], _scratch: &mut Vec<u8>) -> io::Result<usize> {
        let iov = iovecs(parts);
        // SAFETY: the iovecs describe IoBufs, valid for reads (their invariant).
        let n = unsafe { libc::writev(self.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
    /// One `readv` straight into guest memory.
    fn recv_parts(&self, parts: &[IoBuf], _scratch: &mut [u8]) -> io::Result<usize> {
        let iov = iovecs(parts);
        // SAFETY: the iovecs describe IoBufs, valid for writes (their invariant).
        let n = unsafe { libc::readv(self.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
    fn set_offloads(&self, o: net::Offloads) -> io::Result<()> {
        net::Tap::set_offloads(self, o).map_err(io::Error::other)
    }
}

/// `parts` as iovecs for one system call, at most IOV_MAX of them (only a
/// chain of over a thousand tiny buffers, which no driver makes, has more:
/// its frame is cut short, the guest's own loss).
fn iovecs(parts: &[IoBuf]) -> Vec<libc::iovec> {
    parts
        .iter()
        .take(1024)
        .map(|p| libc::iovec {
            iov_base: p.as_ptr().cast(),
            iov_len: p.len(),
        })
        .collect()
}

/// Whether the virtio-net header at the start of `parts` asks for a
/// checksum (its flags byte, the frame's first).
fn needs_csum(parts: &[IoBuf]) -> bool {
    let Some(p) = parts.iter().find(|p| !p.is_empty()) else {
        return false;
    };
    let mut b = [0u8; 1];
    // SAFETY: one byte inside a non-empty IoBuf.
    unsafe { IoBuf::new(p.as_ptr(), 1) }.copy_to(&mut b);
    b[0] & crate::net_csum::VIRTIO_NET_HDR_F_NEEDS_CSUM != 0
}

/// `parts` into `out`, which is as long as all of them.
fn gather(parts: &[IoBuf], out: &mut [u8]) {
    let mut at = 0;
    for p in parts {
        p.copy_to(&mut out[at..at + p.len()]);
        at += p.len();
    }
}

/// `s` as an [`IoBuf`].
fn iobuf(s: &GuestSlice<'_>) -> IoBuf {
    // SAFETY: `s` lies inside one region of guest RAM, mapped for as long
    // as the `GuestRam` it borrows from, which outlives the frame's transfer.
    unsafe { IoBuf::new(s.ptr_guard_mut().as_ptr(), s.len()) }
}

/// Write `data` at byte `at` of the stream `slices` form.
fn write_stream(slices: &[GuestSlice<'_>], mut at: usize, mut data: &[u8]) {
    for s in slices {
        if data.is_empty() {
            return;
        }
        if at >= s.len() {
            at -= s.len();
            continue;
        }
        let n = (s.len() - at).min(data.len());
        let b = iobuf(s);
        // SAFETY: `at + n` is within the slice (guest RAM, see `iobuf`).
        let piece = unsafe { IoBuf::new(b.as_ptr().add(at), n) };
        piece.copy_from(&data[..n]);
        data = &data[n..];
        at = 0;
    }
}

/// passt: no virtio-net header on its stream (the backend adds and drops
/// it) and no offloads; its link goes down when the process exits.
impl NetBackend for net::Passt {
    fn poll_fd(&self) -> RawFd {
        self.as_raw_fd()
    }
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.recv_frame(buf)
    }
    fn send(&self, frame: &[u8]) -> io::Result<usize> {
        self.send_frame(frame)
    }
    /// Straight from guest memory, without the virtio-net header passt
    /// does not take (one `sendmsg` when the stream is idle).
    fn send_parts(&self, parts: &[IoBuf], _scratch: &mut Vec<u8>) -> io::Result<usize> {
        let mut iov = iovecs(parts);
        let total: usize = iov.iter().map(|v| v.iov_len).sum();
        if total <= HDR_LEN {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a {total}-byte frame for passt"),
            ));
        }
        // Drop the header's bytes from the front of the list.
        let mut skip = HDR_LEN;
        let mut first = 0;
        while skip > 0 {
            let v = &mut iov[first];
            if v.iov_len <= skip {
                skip -= v.iov_len;
                first += 1;
            } else {
                // SAFETY: stays inside the same IoBuf.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(skip) }.cast();
                v.iov_len -= skip;
                skip = 0;
            }
        }
        // SAFETY: the iovecs describe IoBufs, valid for reads (their
        // invariant), and add up to `total - HDR_LEN`.
        unsafe { self.send_iovecs(&iov[first..], total - HDR_LEN) }?;
        Ok(total)
    }
    fn offload_features(&self) -> u64 {
        0
    }
    fn soft_checksums(&self) -> bool {
        true
    }
    fn link_up(&self) -> bool {
        net::Passt::link_up(self)
    }
    fn on_link_change(&self, f: Box<dyn Fn() + Send + Sync>) {
        net::Passt::on_link_change(self, f)
    }
}

/// What a snapshot keeps of a NIC beyond its queues: the MAC the guest
/// knows (a random one must stay the same). A received frame still waiting
/// for a guest buffer is not kept: the network lost it, as networks do.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetState {
    pub mac: net::MacAddr,
    /// The receive and transmit rate limits in force (perhaps set through
    /// the API since the start); absent in older snapshots and for NICs
    /// without limiters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// A NIC's limiters, one per direction (each its own or its group's), and
/// the one timer that wakes its queues.
struct NetLimits {
    rx: Arc<SharedLimiter>,
    tx: Arc<SharedLimiter>,
    waker: Arc<Waker>,
}

/// The network device: a backend and the guest's MAC address.
pub struct Net {
    backend: Arc<dyn NetBackend>,
    mac: net::MacAddr,
    counters: Arc<crate::stats::NetCounters>,
    limits: Option<NetLimits>,
    /// Offer VIRTIO_NET_F_MRG_RXBUF (`Some`), or the backend's default.
    merged_rx: Option<bool>,
}

impl Net {
    pub fn new(backend: Arc<dyn NetBackend>, mac: net::MacAddr) -> Self {
        Net {
            backend,
            mac,
            counters: Arc::default(),
            limits: None,
            merged_rx: None,
        }
    }

    /// Offer merged receive buffers (VIRTIO_NET_F_MRG_RXBUF) or not,
    /// instead of the default (on where the backend has no receive
    /// offloads, off for a tap). Set before the guest reads the features.
    pub fn set_merged_rx(&mut self, on: bool) {
        self.merged_rx = Some(on);
    }

    /// Draw received frames from `rx` and sent ones from `tx` (each the
    /// NIC's own limiter or its group's); their configuration may change live.
    pub fn set_rate_limiters(
        &mut self,
        rx: Arc<SharedLimiter>,
        tx: Arc<SharedLimiter>,
    ) -> Result<(), RateLimitError> {
        let waker = match self.limits.take() {
            Some(l) => l.waker,
            None => Arc::new(Waker::new()?),
        };
        self.limits = Some(NetLimits { rx, tx, waker });
        Ok(())
    }

    /// What this device counts (it outlives resets and snapshots).
    pub fn counters(&self) -> Arc<crate::stats::NetCounters> {
        self.counters.clone()
    }

    fn config_bytes(&self) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[0..6].copy_from_slice(&self.mac.0);
        let status = if self.backend.link_up() {
            VIRTIO_NET_S_LINK_UP
        } else {
            0
        };
        c[6..8].copy_from_slice(&status.to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes()); // max_virtqueue_pairs
        c
    }
}

impl Persist for Net {
    type State = NetState;

    fn save(&self) -> Result<NetState, PersistError> {
        Ok(NetState {
            mac: self.mac,
            rx_rate_limiter: self.limits.as_ref().map(|l| l.rx.config()),
            tx_rate_limiter: self.limits.as_ref().map(|l| l.tx.config()),
        })
    }

    /// The MAC is the guest's: it moves with it (a clone may be given a new
    /// tap, never a new address under a running driver).
    fn restore(&mut self, s: &NetState) -> Result<(), PersistError> {
        for c in [&s.rx_rate_limiter, &s.tx_rate_limiter]
            .into_iter()
            .flatten()
        {
            c.validate()
                .map_err(|e| PersistError::mismatch("virtio-net", e.to_string()))?;
        }
        self.mac = s.mac;
        if let Some(l) = &self.limits {
            for (lim, c) in [(&l.rx, &s.rx_rate_limiter), (&l.tx, &s.tx_rate_limiter)] {
                if let Some(c) = c {
                    lim.update(*c)
                        .map_err(|e| PersistError::mismatch("virtio-net", e.to_string()))?;
                }
            }
        }
        Ok(())
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let soft = if self.backend.soft_checksums() {
            VIRTIO_NET_F_CSUM | VIRTIO_NET_F_GUEST_CSUM
        } else {
            0
        };
        let offloads = self.backend.offload_features() & TAP_OFFLOADS;
        // Merged receive buffers by default only where frames stay small
        // (no receive segmentation offloads, as with passt). Through a tap
        // they work (a frame waiting for buffers gets the guest's next
        // notify: `VirtQueue::undo_pops`) but a 64 KiB frame over ~17
        // page-sized buffers costs the guest more than one big-packet
        // chain: host -> guest TCP ran at 0.65 of the big-packet path
        // (docs/engine-profile.md), so a tap has them only when asked.
        let merge = match self.merged_rx {
            Some(true) => VIRTIO_NET_F_MRG_RXBUF,
            Some(false) => 0,
            None if offloads == 0 => VIRTIO_NET_F_MRG_RXBUF,
            None => 0,
        };
        VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | merge | offloads | soft
    }

    fn pci_class(&self) -> u32 {
        0x02_00_00 // network controller, ethernet
    }

    fn config_len(&self) -> usize {
        10
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::read_config_image(&self.config_bytes(), offset, data);
    }

    fn save_state(&self) -> Result<crate::DeviceState, PersistError> {
        crate::save_as(self, crate::DeviceState::Net)
    }

    fn restore_state(&mut self, state: &crate::DeviceState) -> Result<(), PersistError> {
        crate::restore_from(self, "virtio-net", state, |s| match s {
            crate::DeviceState::Net(s) => Some(s),
            _ => None,
        })
    }

    fn activate(
        &mut self,
        features: u64,
        _mem: GuestRam,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<Box<dyn QueueWorker>, ActivateError> {
        // The status field is device configuration: a change bumps the
        // generation and interrupts, and the driver rereads the carrier.
        self.backend
            .on_link_change(Box::new(move || interrupt.config_changed()));
        let offloads = net::Offloads {
            csum: features & VIRTIO_NET_F_GUEST_CSUM != 0,
            tso4: features & VIRTIO_NET_F_GUEST_TSO4 != 0,
            tso6: features & VIRTIO_NET_F_GUEST_TSO6 != 0,
            tso_ecn: features & VIRTIO_NET_F_GUEST_ECN != 0,
            ufo: false,
        };
        self.backend
            .set_offloads(offloads)
            .map_err(|e| ActivateError::Failed(format!("virtio-net offloads: {e}")))?;
        let mut worker = NetWorker::new(self.backend.clone())
            .map_err(|e| ActivateError::Failed(format!("virtio-net: {e}")))?;
        worker.counters = self.counters.clone();
        let soft = self.backend.soft_checksums();
        worker.soft_tx_csum = soft;
        worker.soft_rx_csum = soft && features & VIRTIO_NET_F_GUEST_CSUM != 0;
        worker.merge = features & VIRTIO_NET_F_MRG_RXBUF != 0;
        if let Some(l) = &self.limits {
            let c = &self.counters;
            worker.rx_throttle = Some(Throttle::new(
                l.rx.clone(),
                l.waker.clone(),
                c.rx_throttle.clone(),
            ));
            worker.tx_throttle = Some(Throttle::new(
                l.tx.clone(),
                l.waker.clone(),
                c.tx_throttle.clone(),
            ));
        }
        Ok(Box::new(worker))
    }
}

/// What one merged-buffer receive did.
enum Merged {
    /// A frame went into the guest's buffers.
    Delivered,
    /// A runt from the backend was skipped; the buffers stay available.
    Skipped,
    /// The worker must wait: nothing to read, not enough buffers (the
    /// chains are put back, the frame kept), or the backend failed.
    Wait,
}

pub(crate) struct NetWorker {
    backend: Arc<dyn NetBackend>,
    /// Poll the backend for frames (false while the guest has no receive
    /// buffer for the frame in hand, or after the backend failed).
    armed: bool,
    /// Receive buffer: a frame stays here until it is copied to the guest
    /// (no allocation per frame).
    buf: Vec<u8>,
    /// Transmit buffer, kept between chains for the same reason.
    tx: Vec<u8>,
    dropped: u64,
    counters: Arc<crate::stats::NetCounters>,
    rx_throttle: Option<Throttle>,
    tx_throttle: Option<Throttle>,
    /// Complete transmit checksums the guest asks for (`net_csum`).
    soft_tx_csum: bool,
    /// Verify receive checksums and tell the guest (`net_csum`).
    soft_rx_csum: bool,
    /// VIRTIO_NET_F_MRG_RXBUF: a frame may span several receive chains
    /// (the guest posts page-sized buffers instead of 64 KiB chains).
    merge: bool,
    /// With `merge`: the length of a frame read into `buf` that waits for
    /// the guest to post enough buffers.
    pending: Option<usize>,
    /// A frame was dropped for a too small receive buffer (warned once).
    warned_small: bool,
}

impl NetWorker {
    pub(crate) fn new(backend: Arc<dyn NetBackend>) -> io::Result<Self> {
        Ok(NetWorker {
            backend,
            armed: true,
            buf: vec![0; MAX_FRAME],
            tx: Vec::with_capacity(MAX_FRAME),
            dropped: 0,
            counters: Arc::default(),
            rx_throttle: None,
            tx_throttle: None,
            soft_tx_csum: false,
            soft_rx_csum: false,
            merge: false,
            pending: None,
            warned_small: false,
        })
    }

    /// Move received frames into receive buffers. A chain is taken
    /// before the backend is read (and put back if nothing waits), so a
    /// frame leaves the backend only when the guest has room for it:
    /// straight into a chain of at least [`MAX_FRAME`] bytes (the guest's
    /// big-packet buffers), through `buf` into a smaller one (which a
    /// frame may not fit: it is dropped then, never truncated).
    fn receive(&mut self, q: &mut VirtQueue, mem: &GuestRam) -> Result<Processed, QueueError> {
        let mut done = Processed::default();
        let mut slices = Vec::new();
        let mut iov = Vec::new();
        loop {
            if let Some(t) = &mut self.rx_throttle {
                if !t.ready() {
                    // Frames wait in the backend (the tap's queue) until
                    // the timer says the limit affords the next one.
                    self.armed = false;
                    done.stalled = true;
                    return Ok(done);
                }
            }
            let Some(chain) = q.pop(mem)? else {
                // Ask for the guest's notify; buffers it made available
                // before seeing that request come with no notify (with
                // EVENT_IDX it asked only past an older index), so look
                // again, or the frames would wait for the next refill,
                // which may never come.
                if q.enable_notification(mem)? {
                    continue;
                }
                // No room in the guest: leave frames in the backend and
                // wait for the guest's notify, not for the backend.
                self.armed = false;
                done.stalled = true;
                return Ok(done);
            };
            let room = chain.writable_len() as usize;
            let direct = room >= MAX_FRAME;
            if self.merge && !direct {
                match self.receive_merged(q, mem, chain)? {
                    Merged::Delivered => done.used = true,
                    Merged::Skipped => {}
                    Merged::Wait => {
                        done.stalled = true;
                        return Ok(done);
                    }
                }
                continue;
            }
            let got = if direct {
                slices.clear();
                chain.guest_slices(mem, true, 0, room as u64, &mut slices)?;
                iov.clear();
                iov.extend(slices.iter().map(iobuf));
                self.backend.recv_parts(&iov, &mut self.buf)
            } else {
                self.backend.recv(&mut self.buf)
            };
            let len = match got {
                Ok(n) if n >= HDR_LEN => n,
                Ok(_) => {
                    // Runt from the backend: skip it, keep the chain.
                    q.undo_pop();
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Buffers stay available with nothing to put in them:
                    // stalled, or the worker would spin on them and never
                    // get to the transmit queue. Wait for the backend.
                    q.undo_pop();
                    self.armed = true;
                    done.stalled = true;
                    return Ok(done);
                }
                Err(e) => {
                    // Not re-armed: a backend that keeps failing (the tap
                    // went away) must not spin this thread.
                    q.undo_pop();
                    tracing::warn!("virtio-net: backend read failed, receive stops: {e}");
                    self.counters.errors.inc();
                    self.armed = false;
                    return Ok(done);
                }
            };
            if let Some(t) = &mut self.rx_throttle {
                t.charge((len - HDR_LEN) as u64);
            }
            // num_buffers = 1: the frame is in this one chain.
            let one = 1u16.to_le_bytes();
            if direct {
                write_stream(&slices, 10, &one);
                // Written behind the guest's back: tell dirty logging, after.
                for s in &slices {
                    s.bitmap().mark_dirty(0, s.len());
                }
                q.add_used(mem, chain.head, len as u32)?;
                self.counters.rx_packets.inc();
                self.counters.rx_bytes.add((len - HDR_LEN) as u64);
            } else if room >= len {
                let frame = &mut self.buf[..len];
                frame[10..12].copy_from_slice(&one);
                if self.soft_rx_csum && crate::net_csum::valid(&frame[HDR_LEN..]) {
                    frame[0] |= crate::net_csum::VIRTIO_NET_HDR_F_DATA_VALID;
                }
                let n = chain.write_all(mem, frame)?;
                q.add_used(mem, chain.head, n)?;
                self.counters.rx_packets.inc();
                self.counters.rx_bytes.add((len - HDR_LEN) as u64);
            } else {
                // A frame bigger than the guest's buffers (offloads it did
                // not negotiate, or passt's MTU above 1500 for a driver
                // that took no merged buffers): drop it, give the buffer
                // back empty. Said once at warn level: a link whose big
                // frames all vanish is otherwise a silent stall.
                self.dropped += 1;
                self.counters.rx_dropped.inc();
                if std::mem::replace(&mut self.warned_small, true) {
                    tracing::debug!(
                        "virtio-net: dropped a {len}-byte frame for a {room}-byte buffer"
                    );
                } else {
                    // passt's frames follow its MTU: only that can shrink them.
                    let hint = if self.soft_tx_csum {
                        "; a driver without merged receive buffers needs --net user,mtu=1500"
                    } else {
                        ""
                    };
                    tracing::warn!(
                        "virtio-net: dropped a {}-byte frame for the guest's {room}-byte receive \
                         buffer (further drops are counted in rx_dropped){hint}",
                        len - HDR_LEN
                    );
                }
                q.add_used(mem, chain.head, 0)?;
            }
            done.used = true;
        }
    }

    /// One frame into as many receive chains as it needs, `first` and the
    /// next ones (VIRTIO_NET_F_MRG_RXBUF): num_buffers says how many, and
    /// the driver sees them all at once. A frame read before the guest has
    /// posted room for it stays in `buf` until it has.
    fn receive_merged(
        &mut self,
        q: &mut VirtQueue,
        mem: &GuestRam,
        first: crate::queue::DescChain,
    ) -> Result<Merged, QueueError> {
        let len = match self.pending.take() {
            Some(len) => len,
            None => match self.backend.recv(&mut self.buf) {
                Ok(n) if n >= HDR_LEN => {
                    if let Some(t) = &mut self.rx_throttle {
                        t.charge((n - HDR_LEN) as u64);
                    }
                    n
                }
                Ok(_) => {
                    // A runt: nothing to deliver; try the next frame.
                    q.undo_pop();
                    return Ok(Merged::Skipped);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    q.undo_pop();
                    self.armed = true;
                    return Ok(Merged::Wait);
                }
                Err(e) => {
                    q.undo_pop();
                    tracing::warn!("virtio-net: backend read failed, receive stops: {e}");
                    self.counters.errors.inc();
                    self.armed = false;
                    return Ok(Merged::Wait);
                }
            },
        };
        let mut room = first.writable_len() as usize;
        let mut chains = vec![first];
        while room < len {
            match q.pop(mem)? {
                Some(c) => {
                    room += c.writable_len() as usize;
                    chains.push(c);
                }
                // More may have come without a notify (see `receive`).
                None if q.enable_notification(mem)? => {}
                None => {
                    // Wait for the guest's next buffers with the frame in hand.
                    q.undo_pops(chains.len() as u16);
                    self.pending = Some(len);
                    self.armed = false;
                    return Ok(Merged::Wait);
                }
            }
        }
        let frame = &mut self.buf[..len];
        // At most the queue's size of chains: fits num_buffers.
        frame[10..12].copy_from_slice(&(chains.len() as u16).to_le_bytes());
        if self.soft_rx_csum && crate::net_csum::valid(&frame[HDR_LEN..]) {
            frame[0] |= crate::net_csum::VIRTIO_NET_HDR_F_DATA_VALID;
        }
        let mut used = Vec::with_capacity(chains.len());
        let mut at = 0;
        for c in &chains {
            let n = c.write_all(mem, &frame[at..])?;
            at += n as usize;
            used.push((c.head, n));
        }
        q.add_used_many(mem, &used)?;
        self.counters.rx_packets.inc();
        self.counters.rx_bytes.add((len - HDR_LEN) as u64);
        Ok(Merged::Delivered)
    }

    /// Send what the guest queued for transmission.
    fn transmit(&mut self, q: &mut VirtQueue, mem: &GuestRam) -> Result<Processed, QueueError> {
        let mut done = Processed::default();
        while let Some(chain) = q.pop(mem)? {
            if let Some(t) = &mut self.tx_throttle {
                let bytes = (chain.readable_len() as usize).saturating_sub(HDR_LEN);
                if !t.admit(bytes as u64) {
                    // Back in its place; the timer serves it again.
                    q.undo_pop();
                    done.stalled = true;
                    return Ok(done);
                }
            }
            if chain.readable_len() as usize > MAX_FRAME {
                // Not copied at all: the guest cannot make the buffer grow.
                self.dropped += 1;
                self.counters.tx_dropped.inc();
                tracing::debug!(
                    "virtio-net: dropped a {}-byte transmit chain",
                    chain.readable_len()
                );
                q.add_used(mem, chain.head, 0)?;
                done.used = true;
                continue;
            }
            let len = chain.readable_len() as usize;
            let mut slices = Vec::new();
            chain.guest_slices(mem, false, 0, len as u64, &mut slices)?;
            let parts: Vec<IoBuf> = slices.iter().map(iobuf).collect();
            // Ok(true): the frame, its checksum completed, is in `self.tx`.
            let copied = if len < HDR_LEN {
                Err(format!("a {len}-byte transmit chain"))
            } else if self.soft_tx_csum && needs_csum(&parts) {
                // The sum goes into the frame: send a copy, the guest's
                // buffers are the device's to read only.
                self.tx.resize(len, 0);
                gather(&parts, &mut self.tx);
                let start = u16::from_le_bytes([self.tx[6], self.tx[7]]) as usize;
                let offset = u16::from_le_bytes([self.tx[8], self.tx[9]]) as usize;
                if self.tx[1] != 0 {
                    Err(format!(
                        "a transmit frame with GSO type {} (not offered)",
                        self.tx[1]
                    ))
                } else {
                    crate::net_csum::complete(&mut self.tx[HDR_LEN..], start, offset)
                        .map_err(|e| e.to_string())
                        .map(|()| {
                            self.tx[0] &= !crate::net_csum::VIRTIO_NET_HDR_F_NEEDS_CSUM;
                            true
                        })
                }
            } else {
                Ok(false)
            };
            if let Err(why) = copied {
                self.dropped += 1;
                self.counters.tx_dropped.inc();
                tracing::debug!("virtio-net: dropped {why}");
            } else if copied == Ok(true) {
                if let Err(e) = self.backend.send(&self.tx) {
                    self.dropped += 1;
                    self.counters.errors.inc();
                    tracing::debug!("virtio-net: backend write failed: {e}");
                } else {
                    self.counters.tx_packets.inc();
                    self.counters.tx_bytes.add((len - HDR_LEN) as u64);
                }
            } else if let Err(e) = self.backend.send_parts(&parts, &mut self.tx) {
                self.dropped += 1;
                self.counters.errors.inc();
                tracing::debug!("virtio-net: backend write failed: {e}");
            } else {
                self.counters.tx_packets.inc();
                self.counters.tx_bytes.add((len - HDR_LEN) as u64);
            }
            q.add_used(mem, chain.head, 0)?;
            done.used = true;
        }
        Ok(done)
    }
}

impl QueueWorker for NetWorker {
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut VirtQueue,
        mem: &GuestRam,
    ) -> Result<Processed, QueueError> {
        match index {
            RX_QUEUE => self.receive(queue, mem),
            TX_QUEUE => self.transmit(queue, mem),
            _ => Ok(Processed::default()),
        }
    }

    fn host_fd(&self) -> Option<RawFd> {
        Some(self.backend.poll_fd())
    }

    fn host_fd_armed(&self) -> bool {
        self.armed
    }

    fn host_event_queues(&self) -> Vec<usize> {
        vec![RX_QUEUE]
    }

    fn timer_fd(&self) -> Option<RawFd> {
        self.rx_throttle.as_ref().map(Throttle::timer_fd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::QueueConfig;
    use std::os::unix::net::UnixDatagram;
    use std::time::Duration;
    use vm_memory::{Bytes, GuestAddress};

    /// Whether `fd` polls readable within `limit`.
    fn readable(fd: RawFd, limit: Duration) -> bool {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, limit.as_millis() as i32) };
        n == 1 && p.revents & libc::POLLIN != 0
    }

    /// A datagram socket pair: one end is "the host network". As a tap,
    /// or (`soft`) header-less as passt: the device then sums for the
    /// guest.
    struct SockBackend {
        sock: UnixDatagram,
        soft: bool,
    }

    impl NetBackend for SockBackend {
        fn poll_fd(&self) -> RawFd {
            self.sock.as_raw_fd()
        }
        fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
            self.sock.recv(buf)
        }
        fn send(&self, frame: &[u8]) -> io::Result<usize> {
            self.sock.send(frame)
        }
        fn offload_features(&self) -> u64 {
            if self.soft {
                0
            } else {
                TAP_OFFLOADS
            }
        }
        fn soft_checksums(&self) -> bool {
            self.soft
        }
    }

    fn tap_like(sock: UnixDatagram) -> SockBackend {
        SockBackend { sock, soft: false }
    }

    /// A split ring the test writes as a driver would.
    struct Ring {
        base: u64,
        size: u16,
        next_desc: u16,
        avail_idx: u16,
    }

    impl Ring {
        fn new(base: u64) -> Self {
            Ring {
                base,
                size: 8,
                next_desc: 0,
                avail_idx: 0,
            }
        }
        fn cfg(&self) -> QueueConfig {
            QueueConfig {
                size: self.size,
                desc_table: self.base,
                avail_ring: self.base + 0x100,
                used_ring: self.base + 0x200,
            }
        }
        /// One-descriptor chain at `addr`.
        fn add(&mut self, m: &GuestRam, addr: u64, len: u32, writable: bool) {
            let i = self.next_desc;
            self.next_desc = (i + 1) % self.size;
            let d = self.base + 16 * i as u64;
            m.write_obj(addr, GuestAddress(d)).unwrap();
            m.write_obj(len, GuestAddress(d + 8)).unwrap();
            m.write_obj(if writable { 2u16 } else { 0 }, GuestAddress(d + 12))
                .unwrap();
            let slot = self.base + 0x100 + 4 + 2 * (self.avail_idx % self.size) as u64;
            m.write_obj(i, GuestAddress(slot)).unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            m.write_obj(self.avail_idx, GuestAddress(self.base + 0x102))
                .unwrap();
        }
        /// One chain of several buffers.
        fn add_chain(&mut self, m: &GuestRam, bufs: &[(u64, u32)], writable: bool) {
            let head = self.next_desc;
            for (k, &(addr, len)) in bufs.iter().enumerate() {
                let i = self.next_desc;
                self.next_desc = (i + 1) % self.size;
                let d = self.base + 16 * i as u64;
                let last = k + 1 == bufs.len();
                let flags = if writable { 2u16 } else { 0 } | if last { 0 } else { 1 };
                m.write_obj(addr, GuestAddress(d)).unwrap();
                m.write_obj(len, GuestAddress(d + 8)).unwrap();
                m.write_obj(flags, GuestAddress(d + 12)).unwrap();
                m.write_obj(self.next_desc, GuestAddress(d + 14)).unwrap();
            }
            let slot = self.base + 0x100 + 4 + 2 * (self.avail_idx % self.size) as u64;
            m.write_obj(head, GuestAddress(slot)).unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            m.write_obj(self.avail_idx, GuestAddress(self.base + 0x102))
                .unwrap();
        }
        /// (id, len) of used entry `n`.
        fn used(&self, m: &GuestRam, n: u16) -> (u32, u32) {
            let e = self.base + 0x200 + 4 + 8 * n as u64;
            (
                m.read_obj(GuestAddress(e)).unwrap(),
                m.read_obj(GuestAddress(e + 4)).unwrap(),
            )
        }
    }

    fn setup() -> (NetWorker, UnixDatagram, GuestRam) {
        let (dev_end, host_end) = UnixDatagram::pair().unwrap();
        dev_end.set_nonblocking(true).unwrap();
        host_end
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let w = NetWorker::new(Arc::new(tap_like(dev_end))).unwrap();
        let m = GuestRam::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        (w, host_end, m)
    }

    fn frame(tag: u8, len: usize) -> Vec<u8> {
        let mut f = vec![0u8; HDR_LEN];
        f.extend((0..len).map(|i| tag.wrapping_add(i as u8)));
        f
    }

    #[test]
    fn transmit_sends_each_chain_as_one_frame() {
        let (mut w, host, m) = setup();
        let mut ring = Ring::new(0x1000);
        let mut q = VirtQueue::new(&m, QUEUE_SIZE, ring.cfg(), false, false).unwrap();
        let f = frame(7, 60);
        m.write_slice(&f, GuestAddress(0x8000)).unwrap();
        ring.add(&m, 0x8000, f.len() as u32, false);
        let done = w.process_queue(TX_QUEUE, &mut q, &m).unwrap();
        assert!(done.used);
        let mut got = vec![0u8; 256];
        let n = host.recv(&mut got).unwrap();
        assert_eq!(&got[..n], &f[..]);
        assert_eq!(ring.used(&m, 0), (0, 0));
    }

    /// Receive buffers posted and nothing to receive: the worker must not
    /// spin on the queue (it did, starving the transmit queue and never
    /// seeing a reset: guest TX never reached the tap and the VMM hung at
    /// the guest's poweroff).
    #[test]
    fn idle_receive_with_buffers_posted_stalls() {
        let (mut w, _host, m) = setup();
        let mut ring = Ring::new(0x1000);
        let mut q = VirtQueue::new(&m, QUEUE_SIZE, ring.cfg(), false, false).unwrap();
        ring.add(&m, 0x8000, 2048, true);
        let done = w.process_queue(RX_QUEUE, &mut q, &m).unwrap();
        assert!(done.stalled && !done.used);
    }

    #[test]
    fn receive_waits_for_buffers_and_keeps_the_frame() {
        let (mut w, host, m) = setup();
        let mut ring = Ring::new(0x1000);
        let mut q = VirtQueue::new(&m, QUEUE_SIZE, ring.cfg(), false, false).unwrap();
        let f = frame(3, 100);
        host.send(&f).unwrap();
        // The worker thread polls the backend while armed: readable now.
        assert!(w.host_fd_armed());
        assert!(
            readable(w.host_fd().unwrap(), Duration::from_secs(5)),
            "no wake-up"
        );
        // No receive buffer yet: the frame is kept, the queue stalls, and
        // the backend is not polled until the guest gives buffers.
        let done = w.process_queue(RX_QUEUE, &mut q, &m).unwrap();
        assert!(done.stalled && !done.used);
        assert!(!w.host_fd_armed());
        // A buffer arrives: the kept frame goes in, with num_buffers = 1.
        ring.add(&m, 0x8000, 2048, true);
        let done = w.process_queue(RX_QUEUE, &mut q, &m).unwrap();
        // Used, and stalled again: no buffer left, so the worker waits for
        // the guest (not the backend) rather than loop on the queue.
        assert!(done.used && done.stalled);
        assert!(!w.host_fd_armed());
        assert_eq!(ring.used(&m, 0), (0, f.len() as u32));
        let mut got = vec![0u8; f.len()];
        m.read_slice(&mut got, GuestAddress(0x8000)).unwrap();
        assert_eq!(&got[HDR_LEN..], &f[HDR_LEN..]);
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
        // Another buffer and an empty backend: stalled, the buffer stays
        // available, and now the worker polls the backend.
        ring.add(&m, 0x9000, 2048, true);
        let done = w.process_queue(RX_QUEUE, &mut q, &m).unwrap();
        assert!(done.stalled && !done.used);
        assert!(w.host_fd_armed());
        // The next frame lands in that same buffer.
        let g = frame(4, 60);
        host.send(&g).unwrap();
        let done = w.process_queue(RX_QUEUE, &mut q, &m).unwrap();
        assert!(done.used);
        assert_eq!(ring.used(&m, 1), (1, g.len() as u32));
    }

    #[test]
    fn big_buffers_receive_frames_in_place_across_descriptors() {
        let (mut w, host, m) = setup();
        let mut ring = Ring::new(0x1000);
        let mut q = VirtQueue::new(&m, QUEUE_SIZE, ring.cfg(), false, false).unwrap();
        // One chain of MAX_FRAME bytes in two pieces (the guest's
        // big-packet buffers): the header and data split at byte 8.
        ring.add_chain(&m, &[(0x10000, 8), (0x20000, MAX_FRAME as u32 - 8)], true);
        let f = frame(9, 40_000);
        host.send(&f).unwrap();
        let done = w.process_queue(RX_QUEUE, &mut q, &m).unwrap();
        assert!(done.used);
        assert_eq!(ring.used(&m, 0), (0, f.len() as u32));
        let mut got = vec![0u8; f.len()];
        m.read_slice(&mut got[..8], GuestAddress(0x10000)).unwrap();
        m.read_slice(&mut got[8..], GuestAddress(0x20000)).unwrap();
        assert_eq!(&got[HDR_LEN..], &f[HDR_LEN..]);
        assert_eq!(&got[..10], &f[..10]);
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
    }

    #[test]
    fn frames_larger_than_the_buffer_are_dropped_not_truncated() {
        let (mut w, host, m) = setup();
        let mut ring = Ring::new(0x1000);
        let mut q = VirtQueue::new(&m, QUEUE_SIZE, ring.cfg(), false, false).unwrap();
        host.send(&frame(1, 3000)).unwrap();
        host.send(&frame(2, 50)).unwrap();
        ring.add(&m, 0x8000, 1526, true);
        ring.add(&m, 0x9000, 1526, true);
        w.process_queue(RX_QUEUE, &mut q, &m).unwrap();
        assert_eq!(ring.used(&m, 0), (0, 0), "the big frame is dropped");
        assert_eq!(ring.used(&m, 1), (1, (HDR_LEN + 50) as u32));
        assert_eq!(w.dropped, 1);
    }

    #[test]
    fn runt_transmit_chains_are_dropped() {
        let (mut w, host, m) = setup();
        host.set_nonblocking(true).unwrap();
        let mut ring = Ring::new(0x1000);
        let mut q = VirtQueue::new(&m, QUEUE_SIZE, ring.cfg(), false, false).unwrap();
        ring.add(&m, 0x8000, 4, false);
        w.process_queue(TX_QUEUE, &mut q, &m).unwrap();
        assert_eq!(w.dropped, 1);
        let mut b = [0u8; 16];
        assert!(host.recv(&mut b).is_err(), "nothing reached the network");
    }

    #[test]
    fn config_space_has_the_mac_and_link_up() {
        let (dev_end, _host) = UnixDatagram::pair().unwrap();
        let mac: net::MacAddr = "52:54:00:01:02:03".parse().unwrap();
        let n = Net::new(Arc::new(tap_like(dev_end)), mac);
        let mut c = [0u8; 8];
        n.read_config(0, &mut c);
        assert_eq!(&c[..6], &mac.0);
        assert_eq!(u16::from_le_bytes([c[6], c[7]]), VIRTIO_NET_S_LINK_UP);
        assert_ne!(n.features() & VIRTIO_NET_F_MAC, 0);
    }

    /// The used ring's index (what the driver polls).
    fn used_idx(m: &GuestRam, ring: &Ring) -> u16 {
        m.read_obj(GuestAddress(ring.base + 0x202)).unwrap()
    }

    #[test]
    fn merged_buffers_take_a_frame_across_chains_and_wait_for_enough() {
        let (mut w, host, m) = setup();
        w.merge = true;
        let mut ring = Ring::new(0x1000);
        let mut q = VirtQueue::new(&m, QUEUE_SIZE, ring.cfg(), false, false).unwrap();
        let f = frame(5, 2500 - HDR_LEN);
        host.send(&f).unwrap();
        ring.add(&m, 0x8000, 1000, true);
        // One 1000-byte buffer for a 2500-byte frame: the frame is read and
        // kept, the chain put back, the worker waits for the guest.
        let done = w.process_queue(RX_QUEUE, &mut q, &m).unwrap();
        assert!(done.stalled && !done.used);
        assert_eq!(used_idx(&m, &ring), 0, "nothing half-delivered");
        assert!(
            !w.host_fd_armed(),
            "the guest's notify, not the backend, wakes it"
        );
        ring.add(&m, 0x9000, 1000, true);
        ring.add(&m, 0xa000, 1000, true);
        let done = w.process_queue(RX_QUEUE, &mut q, &m).unwrap();
        assert!(done.used);
        assert_eq!(used_idx(&m, &ring), 3);
        assert_eq!(ring.used(&m, 0), (0, 1000));
        assert_eq!(ring.used(&m, 1), (1, 1000));
        assert_eq!(ring.used(&m, 2), (2, 500));
        let mut got = vec![0u8; 3000];
        m.read_slice(&mut got[..1000], GuestAddress(0x8000))
            .unwrap();
        m.read_slice(&mut got[1000..2000], GuestAddress(0x9000))
            .unwrap();
        m.read_slice(&mut got[2000..], GuestAddress(0xa000))
            .unwrap();
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
        assert_eq!(&got[HDR_LEN..2500], &f[HDR_LEN..]);
        // A small frame takes one buffer and says so.
        let g = frame(6, 60);
        ring.add(&m, 0xb000, 1000, true);
        host.send(&g).unwrap();
        assert!(readable(w.host_fd().unwrap(), Duration::from_secs(5)));
        w.process_queue(RX_QUEUE, &mut q, &m).unwrap();
        assert_eq!(ring.used(&m, 3), (3, g.len() as u32));
        let mut h = [0u8; HDR_LEN];
        m.read_slice(&mut h, GuestAddress(0xb000)).unwrap();
        assert_eq!(u16::from_le_bytes([h[10], h[11]]), 1);
    }

    /// What the transport's worker does with a notify (`transport.rs`,
    /// `service`): process, interrupt if asked, ask for the next notify.
    fn service(w: &mut NetWorker, q: &mut VirtQueue, m: &GuestRam) {
        loop {
            q.disable_notification(m).unwrap();
            let done = w.process_queue(RX_QUEUE, q, m).unwrap();
            if done.used {
                q.needs_notification(m).unwrap();
            }
            if !q.enable_notification(m).unwrap() || done.stalled {
                return;
            }
        }
    }

    /// Whether a driver that moved its avail index from `old` to `new`
    /// notifies, by the device's avail_event (the spec's vring_need_event).
    fn driver_kicks(m: &GuestRam, ring: &Ring, old: u16, new: u16) -> bool {
        let at = ring.base + 0x200 + 4 + 8 * ring.size as u64;
        let event: u16 = m.read_obj(GuestAddress(at)).unwrap();
        new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
    }

    /// With EVENT_IDX, a frame waiting for more merged buffers must get the
    /// driver's notify when it posts them: the chains the worker put back
    /// must not move avail_event behind what the driver already posted (it
    /// would never notify again: the tap's host -> guest stall).
    #[test]
    fn a_frame_waiting_for_merged_buffers_gets_the_next_notify() {
        let (mut w, host, m) = setup();
        w.merge = true;
        let mut ring = Ring::new(0x1000);
        let mut q = VirtQueue::new(&m, QUEUE_SIZE, ring.cfg(), true, false).unwrap();
        let f = frame(9, 2500 - HDR_LEN);
        host.send(&f).unwrap();
        ring.add(&m, 0x8000, 1000, true);
        ring.add(&m, 0x9000, 1000, true);
        service(&mut w, &mut q, &m);
        assert_eq!(used_idx(&m, &ring), 0, "two buffers are not enough");
        assert!(!w.host_fd_armed(), "waiting for the guest");
        ring.add(&m, 0xa000, 1000, true);
        assert!(
            driver_kicks(&m, &ring, 2, 3),
            "the driver's next buffer must bring a notify"
        );
        service(&mut w, &mut q, &m);
        assert_eq!(used_idx(&m, &ring), 3, "the frame went out on the notify");
        let mut h = [0u8; HDR_LEN];
        m.read_slice(&mut h, GuestAddress(0x8000)).unwrap();
        assert_eq!(u16::from_le_bytes([h[10], h[11]]), 3, "num_buffers");
        // Delivered, the ring empty: the next buffer brings a notify too.
        ring.add(&m, 0xb000, 1000, true);
        assert!(driver_kicks(&m, &ring, 3, 4));
    }

    /// At passt's MTU of 65520: a 65534-byte frame the guest sends with its
    /// checksum left to the device leaves whole with the right sum, and
    /// the same frame received spreads over eight merged buffers (the
    /// ring holds no more), flagged DATA_VALID, every byte in place.
    #[test]
    fn mtu_sized_frames_cross_whole_both_ways_on_a_headerless_backend() {
        let (dev_end, host) = UnixDatagram::pair().unwrap();
        dev_end.set_nonblocking(true).unwrap();
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut w = NetWorker::new(Arc::new(SockBackend {
            sock: dev_end,
            soft: true,
        }))
        .unwrap();
        w.soft_tx_csum = true;
        w.soft_rx_csum = true;
        w.merge = true;
        let m = GuestRam::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let payload: Vec<u8> = (0..65_520 - 40).map(|i| (i * 7 + i / 251) as u8).collect();
        let frame = tcp_frame_needing_csum(&payload);
        assert_eq!(
            frame.len(),
            HDR_LEN + 65_534,
            "the largest frame passt takes"
        );
        m.write_slice(&frame[..HDR_LEN], GuestAddress(0x8000))
            .unwrap();
        m.write_slice(&frame[HDR_LEN..], GuestAddress(0x10000))
            .unwrap();
        let mut ring = Ring::new(0x1000);
        let mut q = VirtQueue::new(&m, QUEUE_SIZE, ring.cfg(), false, false).unwrap();
        ring.add_chain(
            &m,
            &[
                (0x8000, HDR_LEN as u32),
                (0x10000, (frame.len() - HDR_LEN) as u32),
            ],
            false,
        );
        w.process_queue(TX_QUEUE, &mut q, &m).unwrap();
        assert_eq!(w.dropped, 0);
        let mut got = vec![0u8; MAX_FRAME + 16];
        let len = host.recv(&mut got).unwrap();
        assert_eq!(len, frame.len());
        assert_eq!(&got[HDR_LEN..62], &frame[HDR_LEN..62]);
        assert_eq!(&got[64..len], &frame[64..]);
        assert!(crate::net_csum::valid(&got[HDR_LEN..len]), "the sum");

        let mut back = got[..len].to_vec();
        back[0] = 0;
        host.send(&back).unwrap();
        let mut rring = Ring::new(0x2000);
        let mut rq = VirtQueue::new(&m, QUEUE_SIZE, rring.cfg(), false, false).unwrap();
        let piece = 8200u64;
        for k in 0..8 {
            rring.add(&m, 0x40000 + k * piece, piece as u32, true);
        }
        assert!(readable(w.host_fd().unwrap(), Duration::from_secs(5)));
        let done = w.process_queue(RX_QUEUE, &mut rq, &m).unwrap();
        assert!(done.used);
        assert_eq!(used_idx(&m, &rring), 8, "one frame, eight buffers");
        let mut recv = vec![0u8; 8 * piece as usize];
        m.read_slice(&mut recv, GuestAddress(0x40000)).unwrap();
        assert_eq!(u16::from_le_bytes([recv[10], recv[11]]), 8, "num_buffers");
        assert_ne!(recv[0] & crate::net_csum::VIRTIO_NET_HDR_F_DATA_VALID, 0);
        assert_eq!(&recv[HDR_LEN..len], &back[HDR_LEN..]);
        assert_eq!(rring.used(&m, 7), (7, (len - 7 * piece as usize) as u32));
    }

    /// virtio-net header + Ethernet + IPv4 + TCP with `payload`; the TCP
    /// checksum field holds the pseudo-header sum and the header asks
    /// the device to complete it (what Linux sends with CSUM offered).
    fn tcp_frame_needing_csum(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; HDR_LEN];
        f[0] = crate::net_csum::VIRTIO_NET_HDR_F_NEEDS_CSUM;
        f[6..8].copy_from_slice(&34u16.to_le_bytes());
        f[8..10].copy_from_slice(&16u16.to_le_bytes());
        f.extend([0u8; 12]);
        f.extend(0x0800u16.to_be_bytes());
        let l4 = 20 + payload.len();
        f.extend([0x45, 0]);
        f.extend(((20 + l4) as u16).to_be_bytes());
        f.extend([0, 1, 0x40, 0, 64, 6, 0, 0, 10, 0, 2, 15, 10, 0, 2, 2]);
        // Pseudo-header: the addresses, protocol and length, folded.
        let mut p: u32 = 0x0a00 + 0x020f + 0x0a00 + 0x0202 + 6 + l4 as u32;
        p = (p & 0xffff) + (p >> 16);
        let mut tcp = [0u8; 20];
        tcp[12] = 5 << 4;
        tcp[16..18].copy_from_slice(&(p as u16).to_be_bytes());
        f.extend(tcp);
        f.extend(payload);
        f
    }

    #[test]
    fn a_headerless_backend_gets_checksums_completed_by_the_device() {
        let (dev_end, host) = UnixDatagram::pair().unwrap();
        dev_end.set_nonblocking(true).unwrap();
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = Net::new(
            Arc::new(SockBackend {
                sock: dev_end,
                soft: true,
            }),
            "52:54:00:01:02:03".parse().unwrap(),
        );
        let f = n.features();
        assert_ne!(f & VIRTIO_NET_F_CSUM, 0, "checksum offload offered");
        assert_ne!(f & VIRTIO_NET_F_GUEST_CSUM, 0);
        assert_eq!(f & (VIRTIO_NET_F_HOST_TSO4 | VIRTIO_NET_F_GUEST_TSO4), 0);
        let mut w = NetWorker::new(n.backend.clone()).unwrap();
        w.soft_tx_csum = true;
        w.soft_rx_csum = true;
        let m = GuestRam::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut ring = Ring::new(0x1000);
        let mut q = VirtQueue::new(&m, QUEUE_SIZE, ring.cfg(), false, false).unwrap();
        let frame = tcp_frame_needing_csum(b"payload across a header split");
        // Header and frame in two buffers, as Linux queues them.
        m.write_slice(&frame[..HDR_LEN], GuestAddress(0x8000))
            .unwrap();
        m.write_slice(&frame[HDR_LEN..], GuestAddress(0x9000))
            .unwrap();
        ring.add_chain(
            &m,
            &[
                (0x8000, HDR_LEN as u32),
                (0x9000, (frame.len() - HDR_LEN) as u32),
            ],
            false,
        );
        // A request pointing past the frame: dropped, not sent, no panic.
        let mut bad = frame.clone();
        bad[8..10].copy_from_slice(&4000u16.to_le_bytes());
        m.write_slice(&bad, GuestAddress(0xa000)).unwrap();
        ring.add(&m, 0xa000, bad.len() as u32, false);
        w.process_queue(TX_QUEUE, &mut q, &m).unwrap();
        assert_eq!(w.dropped, 1);
        let mut got = vec![0u8; 256];
        let len = host.recv(&mut got).unwrap();
        assert_eq!(len, frame.len());
        assert_eq!(got[0], 0, "the request is done: flags cleared");
        // The sum is at 12 (header) + 14 (Ethernet) + 20 (IPv4) + 16.
        assert_eq!(
            &got[HDR_LEN..62],
            &frame[HDR_LEN..62],
            "all but the sum unchanged"
        );
        assert_eq!(&got[64..len], &frame[64..]);
        assert!(
            crate::net_csum::valid(&got[HDR_LEN..len]),
            "the sum is right"
        );
        // Only one frame reached the network.
        host.set_nonblocking(true).unwrap();
        assert!(host.recv(&mut got).is_err());
        host.set_nonblocking(false).unwrap();

        // Receive: the same (now valid) frame comes back flagged DATA_VALID,
        // and a corrupted one comes unflagged for the guest to judge.
        let mut rring = Ring::new(0x4000);
        let mut rq = VirtQueue::new(&m, QUEUE_SIZE, rring.cfg(), false, false).unwrap();
        let mut good = got[..len].to_vec();
        good[0] = 0;
        let mut corrupt = good.clone();
        *corrupt.last_mut().unwrap() ^= 1;
        host.send(&good).unwrap();
        host.send(&corrupt).unwrap();
        rring.add(&m, 0x20000, 2048, true);
        rring.add(&m, 0x21000, 2048, true);
        assert!(readable(w.host_fd().unwrap(), Duration::from_secs(5)));
        w.process_queue(RX_QUEUE, &mut rq, &m).unwrap();
        let mut b = [0u8; 1];
        m.read_slice(&mut b, GuestAddress(0x20000)).unwrap();
        assert_eq!(b[0], crate::net_csum::VIRTIO_NET_HDR_F_DATA_VALID);
        m.read_slice(&mut b, GuestAddress(0x21000)).unwrap();
        assert_eq!(b[0], 0, "a wrong sum is not vouched for");
        // Without GUEST_CSUM negotiated, nothing is flagged.
        w.soft_rx_csum = false;
        host.send(&good).unwrap();
        rring.add(&m, 0x22000, 2048, true);
        assert!(readable(w.host_fd().unwrap(), Duration::from_secs(5)));
        w.process_queue(RX_QUEUE, &mut rq, &m).unwrap();
        m.read_slice(&mut b, GuestAddress(0x22000)).unwrap();
        assert_eq!(b[0], 0);
    }

    /// A backend without the header's offloads whose link can drop.
    struct Headerless {
        sock: UnixDatagram,
        up: std::sync::atomic::AtomicBool,
    }

    impl NetBackend for Headerless {
        fn poll_fd(&self) -> RawFd {
            self.sock.as_raw_fd()
        }
        fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
            self.sock.recv(buf)
        }
        fn send(&self, frame: &[u8]) -> io::Result<usize> {
            self.sock.send(frame)
        }
        fn offload_features(&self) -> u64 {
            0
        }
        fn link_up(&self) -> bool {
            self.up.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    #[test]
    fn a_backend_without_offloads_is_offered_none_and_reports_its_link() {
        let (sock, _host) = UnixDatagram::pair().unwrap();
        let b = Arc::new(Headerless {
            sock,
            up: true.into(),
        });
        let n = Net::new(b.clone(), "52:54:00:01:02:03".parse().unwrap());
        // No offload (merged receive buffers are not one: the device does them).
        assert_eq!(
            n.features(),
            VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | VIRTIO_NET_F_MRG_RXBUF
        );
        let status = |n: &Net| {
            let mut c = [0u8; 2];
            n.read_config(6, &mut c);
            u16::from_le_bytes(c)
        };
        assert_eq!(status(&n), VIRTIO_NET_S_LINK_UP);
        b.up.store(false, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(status(&n), 0, "the guest sees the carrier drop");
    }
}
