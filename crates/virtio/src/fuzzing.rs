//! The queue-parsing harness shared by the cargo-fuzz target
//! (`crates/virtio/fuzz`) and the randomized test, so CI exercises the same
//! code the fuzzer does.

use hypervisor::GuestRam;
use vm_memory::{Bytes, GuestAddress};

use crate::queue::{walk_chain, QueueConfig, VirtQueue};

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
