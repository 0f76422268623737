//! virtio-net through the simulated driver and the PCI transport, over a
//! datagram socket pair standing in for the tap: a frame the guest queues
//! on the transmit queue reaches the host, a frame from the host fills a
//! receive buffer.

mod harness;

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::time::Duration;

use harness::*;
use virtio::features::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};
use virtio::net::{Net, NetBackend, HDR_LEN, RX_QUEUE, TX_QUEUE, VIRTIO_NET_F_MAC};
use vm_memory::{Bytes, GuestAddress};

struct Sock(UnixDatagram);

impl NetBackend for Sock {
    fn poll_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
    fn recv(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.recv(buf)
    }
    fn send(&self, frame: &[u8]) -> std::io::Result<usize> {
        self.0.send(frame)
    }
}

fn run(features: u64) {
    let (dev, host) = UnixDatagram::pair().unwrap();
    dev.set_nonblocking(true).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mac = "52:54:00:12:34:56".parse().unwrap();
    let m = machine_with(Box::new(Net::new(Arc::new(Sock(dev)), mac)));
    let d = Driver::probe(&m);
    assert_eq!(d.num_queues(), 2);
    d.enable_msix();
    d.init(features);
    let (rx, tx) = (RX_QUEUE as u16, TX_QUEUE as u16);
    let (rx_desc, _, _) = ring(rx);
    let (tx_desc, _, _) = ring(tx);

    // Receive buffers first, as Linux posts them at probe: with nothing
    // from the host yet they stay available, and the device must still
    // serve the transmit queue (it once spun on them instead).
    d.desc(rx_desc, 0, BUF + 0x1000, 2048, 2, 0);
    d.submit_q(rx, 0);

    // Transmit: header and frame in two descriptors, as Linux may send them.
    let mut frame = vec![0u8; HDR_LEN];
    frame.extend_from_slice(b"an ethernet frame from the guest........");
    m.mem.write_slice(&frame, GuestAddress(BUF)).unwrap();
    d.desc(tx_desc, 0, BUF, HDR_LEN as u32, 1, 1);
    d.desc(
        tx_desc,
        1,
        BUF + HDR_LEN as u64,
        (frame.len() - HDR_LEN) as u32,
        0,
        0,
    );
    d.submit_q(tx, 0);
    d.wait_used_q(tx, 1);
    let mut got = vec![0u8; 256];
    let n = host.recv(&mut got).expect("the frame reached the host");
    assert_eq!(&got[..n], &frame[..]);

    // Receive: a frame from the host lands in the buffer posted earlier.
    let mut reply = vec![0u8; HDR_LEN];
    reply.extend_from_slice(b"a frame from the host");
    host.send(&reply).unwrap();
    d.wait_used_q(rx, 1);
    assert_eq!(d.used_elem_q(rx, 0), (0, reply.len() as u32));
}

#[test]
fn frames_cross_both_ways() {
    run(VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC);
}

#[test]
fn frames_cross_both_ways_with_event_idx() {
    run(VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_RING_F_EVENT_IDX);
}
