//! Guest-controlled input must never panic the engine: random code and
//! random register state run until an exit, and every exit is a value.

mod common;

use std::time::Duration;

use common::*;
use hypervisor::Vcpu;

fn rng(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

#[test]
fn random_code_never_panics() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut exits = std::collections::BTreeMap::<&'static str, u32>::new();
    for case in 0..300 {
        let mut g = Guest::new(4 << 20);
        g.long_mode();
        let mut code = vec![0u8; 4096];
        for b in code.iter_mut() {
            *b = rng(&mut seed) as u8;
        }
        // Bias towards common one-byte opcodes and prefixes now and then.
        if case % 3 == 0 {
            for b in code.iter_mut().step_by(3) {
                *b = [0x48, 0x66, 0xf3, 0x0f, 0x8b, 0x89, 0x01, 0xff][(*b & 7) as usize];
            }
        }
        g.write(CODE, &code);
        let mut r = g.regs();
        r.rax = rng(&mut seed);
        r.rbx = rng(&mut seed) & 0x3f_ffff;
        r.rcx = rng(&mut seed) & 0xff;
        r.rdx = rng(&mut seed);
        r.rsi = rng(&mut seed) & 0x3f_ffff;
        r.rdi = rng(&mut seed) & 0x3f_ffff;
        r.rflags = 2 | (rng(&mut seed) & 0xcd5);
        g.set_regs(&r);
        // Random code may spin forever: kick it after a while.
        let kicker = g.vcpu.kicker();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            kicker.kick();
        });
        for _ in 0..64 {
            let e = g.run_io(rng(&mut seed));
            let name = match e {
                Ex::Halt => "halt",
                Ex::Shutdown => "shutdown",
                Ex::Internal(ref s) => {
                    if std::env::var_os("EMU_SHOW_INTERNAL").is_some() {
                        eprintln!("{s}");
                    }
                    "internal"
                }
                Ex::Interrupted => "interrupted",
                Ex::IoIn(..) | Ex::IoOut(..) => "io",
                Ex::MmioRead(..) | Ex::MmioWrite(..) => "mmio",
                Ex::Other(_) => "other",
            };
            *exits.entry(name).or_default() += 1;
            if matches!(
                e,
                Ex::Halt | Ex::Shutdown | Ex::Internal(_) | Ex::Interrupted | Ex::Other(_)
            ) {
                break;
            }
        }
        t.join().unwrap();
    }
    eprintln!("random code exits: {exits:?}");
    // The stubs HLT after any exception, so most runs end there.
    assert!(exits.get("halt").copied().unwrap_or(0) > 100, "{exits:?}");
}
