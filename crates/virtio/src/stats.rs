//! What the virtio devices count for monitoring: every function's
//! notifications and interrupts (kept by the transport), a block device's
//! requests, bytes, errors and latency, a network device's packets, bytes,
//! drops and errors (kept by their workers).
//!
//! Invariants: the worker or transport thread that does the work counts
//! it, with relaxed atomics only (see the `metrics` crate); readers take a
//! snapshot (`*Stats`) whenever they like. Bytes are payload bytes: disk
//! data for a block request, the Ethernet frame without the virtio-net
//! header for a packet (what the guest's own interface counters show).

use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Histogram, HistogramSnapshot};
use serde::{Deserialize, Serialize};

use crate::rate_limit::ThrottleCounters;

use crate::block::{
    SECTOR_SIZE, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};

/// Kept by the transport of every virtio function.
#[derive(Debug, Default)]
pub struct TransportCounters {
    /// Queue notifications the driver sent (each write to a notify
    /// address, whether it arrived through an ioeventfd, the engine's
    /// doorbell or an MMIO exit).
    pub notifications: Counter,
    /// Interrupts raised toward the driver (MSI-X messages or INTx edges).
    pub interrupts: Counter,
}

/// [`TransportCounters`] at one time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportStats {
    pub notifications: u64,
    pub interrupts: u64,
}

impl TransportCounters {
    pub fn snapshot(&self) -> TransportStats {
        TransportStats {
            notifications: self.notifications.get(),
            interrupts: self.interrupts.get(),
        }
    }
}

/// Requests and bytes of one kind of block request.
#[derive(Debug, Default)]
pub struct OpCounters {
    pub requests: Counter,
    pub bytes: Counter,
}

/// [`OpCounters`] at one time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpStats {
    pub requests: u64,
    pub bytes: u64,
}

impl OpCounters {
    fn snapshot(&self) -> OpStats {
        OpStats {
            requests: self.requests.get(),
            bytes: self.bytes.get(),
        }
    }
}

/// Kept by a virtio-blk worker.
#[derive(Debug)]
pub struct BlockCounters {
    pub read: OpCounters,
    pub write: OpCounters,
    pub flush: OpCounters,
    /// Discard and write-zeroes requests (both give space back or zero it).
    pub discard: OpCounters,
    /// Requests that completed with an error status (I/O error or unsupported).
    pub errors: Counter,
    /// Time from taking a request off the queue to its status, in µs.
    pub latency_us: Histogram,
    /// Requests delayed by the disk's rate limit, and the time they waited.
    pub throttle: Arc<ThrottleCounters>,
}

impl Default for BlockCounters {
    fn default() -> Self {
        BlockCounters {
            read: OpCounters::default(),
            write: OpCounters::default(),
            flush: OpCounters::default(),
            discard: OpCounters::default(),
            errors: Counter::new(),
            latency_us: Histogram::latency_us(),
            throttle: Arc::default(),
        }
    }
}

/// [`BlockCounters`] at one time.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockStats {
    pub read: OpStats,
    pub write: OpStats,
    pub flush: OpStats,
    pub discard: OpStats,
    pub errors: u64,
    /// Request latency in microseconds (cumulative buckets).
    pub latency_us: HistogramSnapshot,
    /// Requests that waited for the rate limit's tokens.
    #[serde(default)]
    pub throttled_requests: u64,
    /// Microseconds requests spent waiting for tokens.
    #[serde(default)]
    pub throttled_us: u64,
}

impl BlockCounters {
    /// Count one served request: its type, its header-less payload (the
    /// data of a write, the segment of a discard), the bytes a read asked
    /// for, its status and how long it took.
    pub fn record(&self, kind: u32, payload: &[u8], read_len: u64, status: u8, took: Duration) {
        self.record_sized(kind, payload.len() as u64, payload, read_len, status, took);
    }

    /// [`BlockCounters::record`] for a device that does not hold the
    /// payload (zero-copy writes): its length, and its first bytes
    /// (`segment`: at least the 16 of a discard segment, when there is one).
    pub fn record_sized(
        &self,
        kind: u32,
        payload_len: u64,
        segment: &[u8],
        read_len: u64,
        status: u8,
        took: Duration,
    ) {
        let (op, bytes) = match kind {
            VIRTIO_BLK_T_IN => (&self.read, read_len),
            VIRTIO_BLK_T_OUT => (&self.write, payload_len),
            VIRTIO_BLK_T_FLUSH => (&self.flush, 0),
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                let sectors = segment
                    .get(8..12)
                    .and_then(|b| b.try_into().ok())
                    .map_or(0, u32::from_le_bytes);
                (&self.discard, sectors as u64 * SECTOR_SIZE)
            }
            // GET_ID and unknown types: only their errors and latency.
            _ => {
                if status != VIRTIO_BLK_S_OK {
                    self.errors.inc();
                }
                self.latency_us.observe(took.as_micros() as u64);
                return;
            }
        };
        op.requests.inc();
        if status == VIRTIO_BLK_S_OK {
            op.bytes.add(bytes);
        } else {
            self.errors.inc();
        }
        self.latency_us.observe(took.as_micros() as u64);
    }

    pub fn snapshot(&self) -> BlockStats {
        BlockStats {
            read: self.read.snapshot(),
            write: self.write.snapshot(),
            flush: self.flush.snapshot(),
            discard: self.discard.snapshot(),
            errors: self.errors.get(),
            latency_us: self.latency_us.snapshot(),
            throttled_requests: self.throttle.requests.get(),
            throttled_us: self.throttle.nanos.get() / 1000,
        }
    }
}

/// Kept by a virtio-net worker.
#[derive(Debug, Default)]
pub struct NetCounters {
    /// Frames handed to the guest, and their bytes.
    pub rx_packets: Counter,
    pub rx_bytes: Counter,
    /// Frames the guest sent out through the backend, and their bytes.
    pub tx_packets: Counter,
    pub tx_bytes: Counter,
    /// Frames too big for the guest's receive buffers.
    pub rx_dropped: Counter,
    /// Transmit chains too short or too long to be a frame.
    pub tx_dropped: Counter,
    /// Backend reads or writes that failed.
    pub errors: Counter,
    /// Frames delayed by the receive and transmit rate limits, and the
    /// time each direction waited.
    pub rx_throttle: Arc<ThrottleCounters>,
    pub tx_throttle: Arc<ThrottleCounters>,
}

/// [`NetCounters`] at one time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetStats {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_dropped: u64,
    pub tx_dropped: u64,
    pub errors: u64,
    /// Times receive waited for the rate limit's tokens, and for how long (µs).
    #[serde(default)]
    pub rx_throttled: u64,
    #[serde(default)]
    pub rx_throttled_us: u64,
    /// Frames the guest sent that waited for tokens, and for how long (µs).
    #[serde(default)]
    pub tx_throttled: u64,
    #[serde(default)]
    pub tx_throttled_us: u64,
}

impl NetCounters {
    pub fn snapshot(&self) -> NetStats {
        NetStats {
            rx_packets: self.rx_packets.get(),
            rx_bytes: self.rx_bytes.get(),
            tx_packets: self.tx_packets.get(),
            tx_bytes: self.tx_bytes.get(),
            rx_dropped: self.rx_dropped.get(),
            tx_dropped: self.tx_dropped.get(),
            errors: self.errors.get(),
            rx_throttled: self.rx_throttle.requests.get(),
            rx_throttled_us: self.rx_throttle.nanos.get() / 1000,
            tx_throttled: self.tx_throttle.requests.get(),
            tx_throttled_us: self.tx_throttle.nanos.get() / 1000,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::VIRTIO_BLK_S_IOERR;

    #[test]
    fn block_requests_count_by_kind_and_status() {
        let c = BlockCounters::default();
        let us = Duration::from_micros(30);
        c.record(VIRTIO_BLK_T_IN, &[], 4096, VIRTIO_BLK_S_OK, us);
        c.record(VIRTIO_BLK_T_OUT, &[0; 512], 0, VIRTIO_BLK_S_OK, us);
        c.record(VIRTIO_BLK_T_OUT, &[0; 512], 0, VIRTIO_BLK_S_IOERR, us);
        let mut seg = [0u8; 16];
        seg[8..12].copy_from_slice(&8u32.to_le_bytes());
        c.record(VIRTIO_BLK_T_DISCARD, &seg, 0, VIRTIO_BLK_S_OK, us);
        c.record(VIRTIO_BLK_T_FLUSH, &[], 0, VIRTIO_BLK_S_OK, us);
        let s = c.snapshot();
        assert_eq!(
            s.read,
            OpStats {
                requests: 1,
                bytes: 4096
            }
        );
        assert_eq!(
            s.write,
            OpStats {
                requests: 2,
                bytes: 512
            }
        );
        assert_eq!(
            s.discard,
            OpStats {
                requests: 1,
                bytes: 4096
            }
        );
        assert_eq!(s.flush.requests, 1);
        assert_eq!(s.errors, 1);
        assert_eq!(s.latency_us.count, 5);
        assert_eq!(s.latency_us.sum, 150);
    }
}
