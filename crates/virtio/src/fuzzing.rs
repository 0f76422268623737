//! The harnesses shared by the cargo-fuzz targets (`crates/virtio/fuzz`)
//! and the randomized tests, so CI exercises the same code the fuzzer
//! does: the split-queue parser ([`fuzz_queue`]) and virtio-net's transmit
//! and receive paths, headers and frames included ([`fuzz_net`]).

use hypervisor::GuestRam;
use vm_memory::{Bytes, GuestAddress};

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::net::{NetBackend, NetWorker, RX_QUEUE, TX_QUEUE};
use crate::queue::{walk_chain, QueueConfig, VirtQueue};
use crate::QueueWorker;

/// xorshift64 (shifts 13, 7, 17): the fixed-seed generator the harnesses'
/// randomized tests draw their inputs from, so a failure reproduces.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Guest memory the harness builds: small, so random addresses often hit
/// it and often miss.
pub const FUZZ_MEM_SIZE: usize = 0x1_0000;

/// Lay `data` over guest memory and drive a queue over it as a device
/// would: configure it from the first bytes, pop chains until empty or
/// refused, complete each one, and walk arbitrary heads directly. Must
/// never panic, hang, or touch memory outside the guest's.
pub fn fuzz_queue(data: &[u8]) {
    let Ok(mem) = GuestRam::from_ranges(&[(GuestAddress(0), FUZZ_MEM_SIZE)]) else {
        return;
    };
    let n = data.len().min(FUZZ_MEM_SIZE);
    if mem.write_slice(&data[..n], GuestAddress(0)).is_err() {
        return;
    }
    let byte = |i: usize| data.get(i).copied().unwrap_or(0);
    let word = |i: usize| u16::from_le_bytes([byte(i), byte(i + 1)]);
    // Header: queue size exponent, flags, ring offsets (16-byte units).
    let size = 1u16 << (byte(0) % 9);
    let flags = byte(1);
    let cfg = QueueConfig {
        size,
        desc_table: (word(2) as u64 * 16) % FUZZ_MEM_SIZE as u64,
        avail_ring: (word(4) as u64 * 16) % FUZZ_MEM_SIZE as u64,
        used_ring: (word(6) as u64 * 16) % FUZZ_MEM_SIZE as u64,
    };
    let event_idx = flags & 1 != 0;
    let indirect = flags & 2 != 0;
    if let Ok(mut q) = VirtQueue::new(&mem, 256, cfg, event_idx, indirect) {
        // More pops than the ring can hold: the avail index check must stop
        // a driver that keeps claiming new chains.
        for _ in 0..(2 * size as usize + 2) {
            match q.pop(&mem) {
                Ok(Some(chain)) => {
                    assert!(chain.descs.len() <= u16::MAX as usize + size as usize);
                    let _ = chain.read_all(&mem);
                    let _ = chain.write_all(&mem, &[0x5a; 64]);
                    if q.add_used(&mem, chain.head, chain.writable_len()).is_err() {
                        break;
                    }
                    let _ = q.needs_notification(&mem);
                }
                Ok(None) => {
                    let _ = q.enable_notification(&mem);
                    break;
                }
                Err(_) => break,
            }
        }
    }
    for i in 0..4 {
        let table = GuestAddress(word(8 + 2 * i) as u64 * 16);
        let _ = walk_chain(&mem, table, size, word(16 + 2 * i), indirect);
    }
}

/// Guest memory of the virtio-net harness: more than a maximum frame, so
/// chains long enough for the direct receive path can be valid.
pub const FUZZ_NET_MEM_SIZE: usize = 0x2_0000;

/// What a [`fuzz_net`] run moved.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetFuzzOutcome {
    /// Host frames read by the device (into the guest or dropped there).
    pub delivered: usize,
    /// Guest frames the device handed to the host side.
    pub sent: usize,
}

/// A host side that hands over the frames it was given (a first byte of
/// 0xff stands for a failed read) and swallows what is sent.
struct FuzzBackend {
    frames: Mutex<VecDeque<Vec<u8>>>,
    delivered: AtomicUsize,
    sent: AtomicUsize,
}

impl NetBackend for FuzzBackend {
    fn poll_fd(&self) -> RawFd {
        -1
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        let frame = self
            .frames
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?
            .pop_front();
        match frame {
            None => Err(io::ErrorKind::WouldBlock.into()),
            Some(f) if f.first() == Some(&0xff) => Err(io::Error::other("fuzzed read error")),
            Some(f) => {
                let n = f.len().min(buf.len());
                buf[..n].copy_from_slice(&f[..n]);
                self.delivered.fetch_add(1, Ordering::Relaxed);
                Ok(n)
            }
        }
    }

    fn send(&self, frame: &[u8]) -> io::Result<usize> {
        self.sent.fetch_add(1, Ordering::Relaxed);
        Ok(frame.len())
    }
}

/// Bytes of a [`fuzz_net`] input before the frames: the receive queue's
/// header (size exponent, flags, ring offsets in 16-byte units), the
/// transmit queue's, then the length of the frames section.
pub const FUZZ_NET_HEADER: usize = 18;

/// Drive virtio-net's worker as a guest and a host would, from `data`:
/// [`FUZZ_NET_HEADER`] bytes of queue set-up, a section of host frames
/// (each a 2-byte length, then that many bytes; the last may be cut short),
/// then guest memory from address 0 (headers, frames and the rings that
/// point at them). The worker runs over both queues until neither makes
/// progress. Must never panic, hang, or touch memory outside the guest's.
/// Returns how many frames the host side handed over and was sent (for
/// tests of well-formed rings).
pub fn fuzz_net(data: &[u8]) -> NetFuzzOutcome {
    let none = NetFuzzOutcome::default();
    let byte = |i: usize| data.get(i).copied().unwrap_or(0);
    let word = |i: usize| u16::from_le_bytes([byte(i), byte(i + 1)]);
    let frames_len = word(16) as usize;
    let frames_end = (FUZZ_NET_HEADER + frames_len).min(data.len());
    let mut rest = data.get(FUZZ_NET_HEADER..frames_end).unwrap_or(&[]);
    let image = data.get(frames_end..).unwrap_or(&[]);
    let Ok(mem) = GuestRam::from_ranges(&[(GuestAddress(0), FUZZ_NET_MEM_SIZE)]) else {
        return none;
    };
    let n = image.len().min(FUZZ_NET_MEM_SIZE);
    if mem.write_slice(&image[..n], GuestAddress(0)).is_err() {
        return none;
    }
    let flags = byte(1);
    let queue = |at: usize| {
        let cfg = QueueConfig {
            size: 1u16 << (byte(at) % 9),
            desc_table: (word(at + 2) as u64 * 16) % FUZZ_NET_MEM_SIZE as u64,
            avail_ring: (word(at + 4) as u64 * 16) % FUZZ_NET_MEM_SIZE as u64,
            used_ring: (word(at + 6) as u64 * 16) % FUZZ_NET_MEM_SIZE as u64,
        };
        VirtQueue::new(&mem, 256, cfg, flags & 1 != 0, flags & 2 != 0).ok()
    };
    let (Some(mut rx), Some(mut tx)) = (queue(0), queue(8)) else {
        return none;
    };
    let mut frames = VecDeque::new();
    while rest.len() >= 2 && frames.len() < 64 {
        let len = u16::from_le_bytes([rest[0], rest[1]]) as usize;
        let end = (2 + len).min(rest.len());
        frames.push_back(rest[2..end].to_vec());
        rest = &rest[end..];
    }
    let backend = Arc::new(FuzzBackend {
        frames: Mutex::new(frames),
        delivered: AtomicUsize::new(0),
        sent: AtomicUsize::new(0),
    });
    let Ok(mut worker) = NetWorker::new(backend.clone()) else {
        return none;
    };
    // Each round either uses a chain or stops; the rings are finite, so a
    // bounded number of rounds covers every outcome.
    for _ in 0..8 {
        let r = worker.process_queue(RX_QUEUE, &mut rx, &mem);
        let t = worker.process_queue(TX_QUEUE, &mut tx, &mem);
        match (r, t) {
            (Ok(a), Ok(b)) if a.used || b.used => {}
            _ => break,
        }
    }
    NetFuzzOutcome {
        delivered: backend.delivered.load(Ordering::Relaxed),
        sent: backend.sent.load(Ordering::Relaxed),
    }
}
