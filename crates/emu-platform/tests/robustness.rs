//! Arbitrary guest accesses must never panic (deterministic pseudo-random
//! stress over every decoded port, both MMIO windows and the APIC MSRs).

use emu_platform::{Platform, PlatformConfig};

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

#[test]
fn random_guest_accesses_do_not_panic() {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c13);
    let ports: Vec<u16> = vec![
        0x20, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1, 0x40, 0x41, 0x42, 0x43, 0x61,
    ];
    let mut p = Platform::new(PlatformConfig {
        num_vcpus: 3,
        ..PlatformConfig::default()
    });
    let mut now = 0u64;
    for i in 0..200_000u32 {
        let r = rng.next();
        now = now.wrapping_add(r % 50_000);
        if r.is_multiple_of(997) {
            // Extreme and non-monotonic times must not overflow either.
            now = now.wrapping_add(rng.next());
        }
        let len = [1usize, 2, 4, 8][(r >> 8) as usize % 4];
        let mut buf = [0u8; 8];
        let data = (rng.next()).to_le_bytes();
        let vcpu = (r >> 16) as usize % 4; // includes an invalid index
        match r % 7 {
            0 => {
                let port = ports[(r >> 20) as usize % ports.len()];
                p.pio_write(port, &data[..len], now);
            }
            1 => {
                let port = ports[(r >> 20) as usize % ports.len()];
                p.pio_read(port, &mut buf[..len], now);
            }
            2 => {
                let off = (r >> 24) % 0x1010;
                p.mmio_write(vcpu, 0xfee0_0000 + off, &data[..len], now);
                p.mmio_read(vcpu, 0xfee0_0000 + off, &mut buf[..len], now);
            }
            3 => {
                let off = (r >> 24) % 0x48;
                p.mmio_write(vcpu, 0xfec0_0000 + off, &data[..len], now);
                p.mmio_read(vcpu, 0xfec0_0000 + off, &mut buf[..len], now);
            }
            4 => {
                let msr = [0x1b, 0x6e0, 0x800 + (r >> 32) as u32 % 0x100][(r >> 28) as usize % 3];
                let _ = p.wrmsr(vcpu, msr, rng.next(), now, now);
                let _ = p.rdmsr(vcpu, msr, now);
            }
            5 => {
                p.set_gsi_level((r >> 20) as u32 % 30, r & (1 << 40) != 0);
            }
            _ => {
                p.tick(now);
                for v in 0..3 {
                    if let Some(vec) = p.pending_vector(v) {
                        p.ack(v, vec);
                    }
                    p.take_nmi(v);
                    p.take_init(v);
                    p.take_startup(v);
                }
            }
        }
        if i.is_multiple_of(50_000) {
            // Periodically re-enable things so the stress reaches deeper
            // states than "everything disabled".
            for v in 0..3 {
                let _ = p.wrmsr(v, 0x1b, 0xfee0_0000 | (1 << 11), now, now);
                p.mmio_write(v, 0xfee0_00f0, &0x1ffu32.to_le_bytes(), now);
            }
        }
        let _ = p.next_deadline_ns();
    }
}
