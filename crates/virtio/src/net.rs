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
//! Receive flow: a relay thread waits until the backend is readable and
//! wakes the device worker; the worker moves frames into the guest's receive
//! buffers until the backend is empty (then re-arms the relay) or the guest
//! has no buffers left (then it waits for the guest's next receive notify,
//! keeping the frame it already read).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use hypervisor::GuestRam;
use vmm_sys_util::eventfd::EventFd;

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
    /// The offloads the guest accepts on received frames.
    fn set_offloads(&self, _offloads: net::Offloads) -> io::Result<()> {
        Ok(())
    }
    /// The offload feature bits (of [`TAP_OFFLOADS`]) this backend can
    /// honour; the device offers the guest no others.
    fn offload_features(&self) -> u64 {
        TAP_OFFLOADS
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
    fn set_offloads(&self, o: net::Offloads) -> io::Result<()> {
        net::Tap::set_offloads(self, o).map_err(io::Error::other)
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
    fn offload_features(&self) -> u64 {
        0
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
}

/// The network device: a backend and the guest's MAC address.
pub struct Net {
    backend: Arc<dyn NetBackend>,
    mac: net::MacAddr,
    counters: Arc<crate::stats::NetCounters>,
}

impl Net {
    pub fn new(backend: Arc<dyn NetBackend>, mac: net::MacAddr) -> Self {
        Net {
            backend,
            mac,
            counters: Arc::default(),
        }
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
        Ok(NetState { mac: self.mac })
    }

    /// The MAC is the guest's: it moves with it (a clone may be given a new
    /// tap, never a new address under a running driver).
    fn restore(&mut self, s: &NetState) -> Result<(), PersistError> {
        self.mac = s.mac;
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
        VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | (self.backend.offload_features() & TAP_OFFLOADS)
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
        Ok(Box::new(worker))
    }
}

/// Wakes the worker when the backend is readable; waits to be re-armed.
struct Relay {
    kill: Arc<EventFd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.kill.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Wait until one of `fds` is readable; the index of the first, or None on error.
fn wait_readable(fds: &[RawFd]) -> Option<usize> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `p` is a valid pollfd array for its length.
        let n = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, -1) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return None;
        }
        return p.iter().position(|x| x.revents != 0);
    }
}

fn spawn_relay(
    backend: Arc<dyn NetBackend>,
    wake: Arc<EventFd>,
    rearm: Arc<EventFd>,
) -> io::Result<Relay> {
    let kill = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
    let k = kill.clone();
    let thread = std::thread::Builder::new()
        .name("virtio-net-rx".into())
        .spawn(move || loop {
            // 0: kill, 1: a frame waits.
            match wait_readable(&[k.as_raw_fd(), backend.poll_fd()]) {
                Some(1) => {}
                _ => return,
            }
            let _ = wake.write(1);
            // The worker re-arms once it has emptied the backend.
            match wait_readable(&[k.as_raw_fd(), rearm.as_raw_fd()]) {
                Some(1) => {
                    let _ = rearm.read();
                }
                _ => return,
            }
        })?;
    Ok(Relay {
        kill,
        thread: Some(thread),
    })
}

struct NetWorker {
    backend: Arc<dyn NetBackend>,
    wake: Arc<EventFd>,
    rearm: Arc<EventFd>,
    /// The length of a received frame waiting in `buf` for a guest buffer.
    pending: Option<usize>,
    /// Receive buffer: a frame stays here until it is copied to the guest
    /// (no allocation per frame).
    buf: Vec<u8>,
    /// Transmit buffer, kept between chains for the same reason.
    tx: Vec<u8>,
    dropped: u64,
    counters: Arc<crate::stats::NetCounters>,
    _relay: Relay,
}

impl NetWorker {
    fn new(backend: Arc<dyn NetBackend>) -> io::Result<Self> {
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let rearm = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let relay = spawn_relay(backend.clone(), wake.clone(), rearm.clone())?;
        Ok(NetWorker {
            backend,
            wake,
            rearm,
            pending: None,
            buf: vec![0; MAX_FRAME],
            tx: Vec::with_capacity(MAX_FRAME),
            dropped: 0,
            counters: Arc::default(),
            _relay: relay,
        })
    }

    /// Move received frames into receive buffers.
    fn receive(&mut self, q: &mut VirtQueue, mem: &GuestRam) -> Result<Processed, QueueError> {
        let mut done = Processed::default();
        loop {
            let len = match self.pending.take() {
                Some(n) => n,
                None => match self.backend.recv(&mut self.buf) {
                    Ok(n) if n >= HDR_LEN => n,
                    Ok(_) => continue, // runt from the backend: skip it
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // Buffers stay available with nothing to put in
                        // them: stalled, or the worker would spin on them
                        // and never get to the transmit queue.
                        let _ = self.rearm.write(1);
                        done.stalled = true;
                        return Ok(done);
                    }
                    Err(e) => {
                        // Not re-armed: a backend that keeps failing (the
                        // tap went away) must not spin this thread.
                        tracing::warn!("virtio-net: backend read failed, receive stops: {e}");
                        self.counters.errors.inc();
                        return Ok(done);
                    }
                },
            };
            let Some(chain) = q.pop(mem)? else {
                // No room in the guest: keep the frame, wait for buffers.
                self.pending = Some(len);
                done.stalled = true;
                return Ok(done);
            };
            let frame = &mut self.buf[..len];
            if chain.writable_len() as usize >= frame.len() {
                // num_buffers = 1: the frame fits in this one chain.
                frame[10..12].copy_from_slice(&1u16.to_le_bytes());
                let n = chain.write_all(mem, frame)?;
                q.add_used(mem, chain.head, n)?;
                self.counters.rx_packets.inc();
                self.counters.rx_bytes.add((len - HDR_LEN) as u64);
            } else {
                // A frame bigger than the guest's buffers (offloads it did
                // not negotiate): drop it, give the buffer back empty.
                self.dropped += 1;
                self.counters.rx_dropped.inc();
                tracing::debug!(
                    "virtio-net: dropped a {}-byte frame for a {}-byte buffer",
                    frame.len(),
                    chain.writable_len()
                );
                q.add_used(mem, chain.head, 0)?;
            }
            done.used = true;
        }
    }

    /// Send what the guest queued for transmission.
    fn transmit(&mut self, q: &mut VirtQueue, mem: &GuestRam) -> Result<Processed, QueueError> {
        let mut done = Processed::default();
        while let Some(chain) = q.pop(mem)? {
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
            chain.read_all_into(mem, &mut self.tx)?;
            let frame = &self.tx;
            if frame.len() < HDR_LEN || frame.len() > MAX_FRAME {
                self.dropped += 1;
                self.counters.tx_dropped.inc();
                tracing::debug!("virtio-net: dropped a {}-byte transmit chain", frame.len());
            } else if let Err(e) = self.backend.send(frame) {
                self.dropped += 1;
                self.counters.errors.inc();
                tracing::debug!("virtio-net: backend write failed: {e}");
            } else {
                self.counters.tx_packets.inc();
                self.counters.tx_bytes.add((frame.len() - HDR_LEN) as u64);
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

    fn host_event(&self) -> Option<&EventFd> {
        Some(&self.wake)
    }

    fn host_event_queues(&self) -> Vec<usize> {
        vec![RX_QUEUE]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::QueueConfig;
    use std::os::unix::net::UnixDatagram;
    use std::time::{Duration, Instant};
    use vm_memory::{Bytes, GuestAddress};

    /// A datagram socket pair: one end is "the host network".
    struct SockBackend(UnixDatagram);

    impl NetBackend for SockBackend {
        fn poll_fd(&self) -> RawFd {
            self.0.as_raw_fd()
        }
        fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
            self.0.recv(buf)
        }
        fn send(&self, frame: &[u8]) -> io::Result<usize> {
            self.0.send(frame)
        }
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
        let w = NetWorker::new(Arc::new(SockBackend(dev_end))).unwrap();
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
        // The relay wakes the worker once the frame is there.
        let start = Instant::now();
        while w.wake.read().is_err() {
            assert!(start.elapsed() < Duration::from_secs(5), "no wake-up");
            std::thread::sleep(Duration::from_millis(2));
        }
        // No receive buffer yet: the frame is kept, the queue stalls.
        let done = w.process_queue(RX_QUEUE, &mut q, &m).unwrap();
        assert!(done.stalled && !done.used);
        // A buffer arrives: the kept frame goes in, with num_buffers = 1.
        ring.add(&m, 0x8000, 2048, true);
        let done = w.process_queue(RX_QUEUE, &mut q, &m).unwrap();
        // Used, and stalled again: the backend is empty, so the worker must
        // wait for the relay rather than loop on the queue.
        assert!(done.used && done.stalled);
        assert_eq!(ring.used(&m, 0), (0, f.len() as u32));
        let mut got = vec![0u8; f.len()];
        m.read_slice(&mut got, GuestAddress(0x8000)).unwrap();
        assert_eq!(&got[HDR_LEN..], &f[HDR_LEN..]);
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
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
        let n = Net::new(Arc::new(SockBackend(dev_end)), mac);
        let mut c = [0u8; 8];
        n.read_config(0, &mut c);
        assert_eq!(&c[..6], &mac.0);
        assert_eq!(u16::from_le_bytes([c[6], c[7]]), VIRTIO_NET_S_LINK_UP);
        assert_ne!(n.features() & VIRTIO_NET_F_MAC, 0);
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
        assert_eq!(n.features(), VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS);
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
