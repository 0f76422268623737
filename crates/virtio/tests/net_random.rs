//! The virtio-net fuzz harness (`virtio::fuzzing::fuzz_net`) over
//! well-formed receive and transmit rings, then the same rings with random
//! damage and random host frames (fixed seeds, so a failure reproduces).

use virtio::fuzzing::{fuzz_net, NetFuzzOutcome, XorShift, FUZZ_NET_HEADER, FUZZ_NET_MEM_SIZE};

/// Where each queue's rings are: descriptors at the base, the avail ring
/// 0x200 above, the used ring 0x400 above.
const RX_RINGS: usize = 0x1000;
const TX_RINGS: usize = 0x2000;

fn put(m: &mut [u8], at: usize, v: &[u8]) {
    m[at..at + v.len()].copy_from_slice(v);
}

/// One queue of a test input: its header at `header_at` in the set-up
/// bytes, size 16 with rings at `rings` in guest memory, and `chains`
/// one-descriptor chains of `len` bytes each at `bufs` (0x800 apart),
/// device-writable for receive.
struct Queue {
    header_at: usize,
    rings: usize,
    bufs: u64,
    len: u32,
    chains: u16,
    writable: bool,
}

fn ring(head: &mut [u8], m: &mut [u8], q: Queue) {
    let (desc, avail, used) = (q.rings, q.rings + 0x200, q.rings + 0x400);
    head[q.header_at] = 4;
    put(head, q.header_at + 2, &((desc / 16) as u16).to_le_bytes());
    put(head, q.header_at + 4, &((avail / 16) as u16).to_le_bytes());
    put(head, q.header_at + 6, &((used / 16) as u16).to_le_bytes());
    for i in 0..q.chains {
        let d = desc + 16 * i as usize;
        put(m, d, &(q.bufs + 0x800 * i as u64).to_le_bytes());
        put(m, d + 8, &q.len.to_le_bytes());
        put(
            m,
            d + 12,
            &(if q.writable { 2u16 } else { 0 }).to_le_bytes(),
        );
        put(m, avail + 4 + 2 * i as usize, &i.to_le_bytes());
    }
    put(m, avail + 2, &q.chains.to_le_bytes());
}

/// An input with 4 receive buffers of 0x800 bytes and 3 transmit frames of
/// 0x100 bytes (12-byte header and payload) in guest memory, and `frames`
/// on the host side; `flags` is the queues' EVENT_IDX/INDIRECT byte.
fn input(frames: &[Vec<u8>], flags: u8) -> (Vec<u8>, usize) {
    let mut head = vec![0u8; FUZZ_NET_HEADER];
    let mut m = vec![0u8; 0xa000];
    let rx = Queue {
        header_at: 0,
        rings: RX_RINGS,
        bufs: 0x4000,
        len: 0x800,
        chains: 4,
        writable: true,
    };
    let tx = Queue {
        header_at: 8,
        rings: TX_RINGS,
        bufs: 0x8000,
        len: 0x100,
        chains: 3,
        writable: false,
    };
    ring(&mut head, &mut m, rx);
    ring(&mut head, &mut m, tx);
    head[1] = flags;
    let mut section = Vec::new();
    for f in frames {
        section.extend_from_slice(&(f.len() as u16).to_le_bytes());
        section.extend_from_slice(f);
    }
    put(&mut head, 16, &(section.len() as u16).to_le_bytes());
    head.extend_from_slice(&section);
    let at = head.len();
    head.extend_from_slice(&m);
    (head, at)
}

#[test]
fn well_formed_rings_move_every_frame_both_ways() {
    let frames: Vec<Vec<u8>> = (0..3).map(|i| vec![i as u8; 12 + 60]).collect();
    let out = fuzz_net(&input(&frames, 0).0);
    assert_eq!(
        out,
        NetFuzzOutcome {
            delivered: 3,
            sent: 3
        }
    );
    // A frame bigger than the guest's 0x800-byte buffers is read and
    // dropped, never written past the buffer; the others still arrive.
    let frames = vec![vec![1u8; 72], vec![2u8; 0x1000], vec![3u8; 72]];
    let out = fuzz_net(&input(&frames, 0).0);
    assert_eq!(
        out,
        NetFuzzOutcome {
            delivered: 3,
            sent: 3
        }
    );
}

#[test]
fn damaged_rings_and_random_frames_never_panic() {
    let mut rng = XorShift(0x5eed_f7e7_u64);
    for round in 0..300 {
        let frames: Vec<Vec<u8>> = (0..(rng.next_u64() % 5))
            .map(|_| {
                let len = [0usize, 5, 12, 80, 0x900, 0xffff][rng.next_u64() as usize % 6];
                (0..len).map(|_| rng.next_u64() as u8).collect()
            })
            .collect();
        let (mut m, mem_at) = input(&frames, (round % 4) as u8);
        for _ in 0..(rng.next_u64() % 8) {
            // Damage the rings (in guest memory) or the queue set-up.
            let at = if rng.next_u64().is_multiple_of(4) {
                rng.next_u64() as usize % FUZZ_NET_HEADER
            } else {
                mem_at + 0x1000 + (rng.next_u64() as usize % 0x1500)
            };
            m[at] = rng.next_u64() as u8;
        }
        fuzz_net(&m);
    }
    let mut rng = XorShift(0x0dd_ba11);
    for len in [0usize, 1, 16, 4096, FUZZ_NET_MEM_SIZE + 300] {
        for _ in 0..10 {
            let data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            fuzz_net(&data);
        }
    }
}
