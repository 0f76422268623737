//! The fuzz harness over pseudo-random ring memory (fixed seeds, so a
//! failure reproduces), plus mostly well-formed rings with random damage,
//! which reach deeper than pure noise.

use virtio::fuzzing::{fuzz_queue, XorShift, FUZZ_MEM_SIZE};

#[test]
fn random_ring_memory_never_panics() {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    for len in [0usize, 1, 7, 64, 4096] {
        for _ in 0..50 {
            let data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            fuzz_queue(&data);
        }
    }
}

/// A valid layout (queue of 16 at 0x1000/0x2000/0x3000, chains through
/// buffers in the first 64 KiB) with a few random bytes flipped.
#[test]
fn damaged_valid_rings_never_panic() {
    let mut rng = XorShift(0x1234_5678_9abc_def1);
    for round in 0..300 {
        let mut m = vec![0u8; FUZZ_MEM_SIZE];
        m[0] = 4; // size 16
        m[1] = (round % 4) as u8; // EVENT_IDX / INDIRECT
        m[2..4].copy_from_slice(&(0x1000u16 / 16).to_le_bytes());
        m[4..6].copy_from_slice(&(0x2000u16 / 16).to_le_bytes());
        m[6..8].copy_from_slice(&(0x3000u16 / 16).to_le_bytes());
        for i in 0..16u16 {
            let d = 0x1000 + 16 * i as usize;
            let addr = 0x8000u64 + 0x100 * i as u64;
            m[d..d + 8].copy_from_slice(&addr.to_le_bytes());
            m[d + 8..d + 12].copy_from_slice(&0x40u32.to_le_bytes());
            let flags: u16 = if i % 3 == 2 { 2 } else { 1 | 2 };
            m[d + 12..d + 14].copy_from_slice(&flags.to_le_bytes());
            m[d + 14..d + 16].copy_from_slice(&((i + 1) % 16).to_le_bytes());
        }
        // avail: idx 6, heads 0, 3, 6, 9, 12, 15.
        m[0x2002..0x2004].copy_from_slice(&6u16.to_le_bytes());
        for (k, h) in [0u16, 3, 6, 9, 12, 15].iter().enumerate() {
            m[0x2004 + 2 * k..0x2006 + 2 * k].copy_from_slice(&h.to_le_bytes());
        }
        for _ in 0..(rng.next_u64() % 6) {
            let at = 0x1000 + (rng.next_u64() as usize % 0x2100);
            m[at] = rng.next_u64() as u8;
        }
        fuzz_queue(&m);
    }
}
