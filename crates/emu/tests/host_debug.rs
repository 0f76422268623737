//! The host debugger's hooks (`Vcpu::set_guest_debug`, used by the gdb
//! stub): breakpoints stop before their instruction, also in the middle of
//! a block and in code the translator has compiled; continuing from a
//! breakpoint runs its instruction; a single step runs one instruction;
//! disarmed, the guest runs to its end as without a debugger. The guest
//! sees none of it (no #DB, no #BP: no exception stub runs).

mod common;

use common::*;
use hypervisor::{DebugStop, GuestDebug, Vcpu, VcpuExit};
use iced_x86::code_asm::*;

fn guest() -> Guest {
    let mut g = Guest::new(16 << 20);
    g.long_mode();
    g
}

/// A loop of `n` rounds: `inc rsi` at CODE+5, `inc rdi` at CODE+8, then
/// NOP at CODE+0xf and HLT at CODE+0x10.
fn load_loop(g: &mut Guest, n: u32) {
    let mut a = CodeAssembler::new(64).unwrap();
    let mut top = a.create_label();
    a.mov(ecx, n).unwrap(); // 5 bytes
    a.set_label(&mut top).unwrap();
    a.inc(rsi).unwrap(); // CODE+5, 3 bytes
    a.inc(rdi).unwrap(); // CODE+8, 3 bytes
    a.dec(ecx).unwrap(); // 2 bytes
    a.jnz(top).unwrap(); // 2 bytes
    a.nop().unwrap(); // CODE+0xf (a block of its own after the loop)
    a.hlt().unwrap();
    let code = a.assemble(CODE).unwrap();
    g.load_code(&code);
    let mut r = g.regs();
    (r.rsi, r.rdi) = (0, 0);
    g.set_regs(&r);
}

fn debug_exit(g: &mut Guest) -> DebugStop {
    let stop = match g.vcpu.run().unwrap() {
        VcpuExit::Debug(stop) => Ok(stop),
        other => Err(format!("{other:?}")),
    };
    stop.unwrap_or_else(|e| panic!("expected a debug stop, got {e} at {:#x}", g.regs().rip))
}

#[test]
fn breakpoint_mid_block_continue_step_and_disarm() {
    let mut g = guest();
    load_loop(&mut g, 100);
    let at = CODE + 8;
    let dbg = GuestDebug {
        breakpoints: vec![at],
        ..Default::default()
    };
    g.vcpu.set_guest_debug(&dbg).unwrap();
    assert_eq!(debug_exit(&mut g), DebugStop::Breakpoint(at));
    let r = g.regs();
    assert_eq!((r.rip, r.rsi, r.rdi), (at, 1, 0), "stopped before inc rdi");
    // Continue: the instruction at the breakpoint runs, the next round
    // stops there again.
    assert_eq!(debug_exit(&mut g), DebugStop::Breakpoint(at));
    let r = g.regs();
    assert_eq!((r.rip, r.rsi, r.rdi), (at, 2, 1));
    // One step from the breakpoint: inc rdi, nothing more.
    g.vcpu
        .set_guest_debug(&GuestDebug {
            single_step: true,
            ..dbg.clone()
        })
        .unwrap();
    assert_eq!(debug_exit(&mut g), DebugStop::Step);
    let r = g.regs();
    assert_eq!((r.rip, r.rsi, r.rdi), (at + 3, 2, 2));
    // Disarmed: the loop runs to its end untouched.
    g.vcpu.set_guest_debug(&GuestDebug::default()).unwrap();
    g.run_to_halt();
    let r = g.regs();
    assert_eq!((r.rsi, r.rdi), (100, 100));
}

#[test]
fn breakpoint_after_a_compiled_hot_loop_still_stops() {
    let mut g = guest();
    // Warm: the loop block runs compiled (and linked to itself) once hot.
    load_loop(&mut g, 1000);
    g.run_to_halt();
    load_loop(&mut g, 1000);
    let after = CODE + 0xf;
    g.vcpu
        .set_guest_debug(&GuestDebug {
            breakpoints: vec![after],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(debug_exit(&mut g), DebugStop::Breakpoint(after));
    let r = g.regs();
    assert_eq!((r.rip, r.rsi, r.rdi), (after, 1000, 1000));
    g.vcpu.set_guest_debug(&GuestDebug::default()).unwrap();
    g.run_to_halt();
    assert_eq!(g.regs().rip, after + 2, "after the HLT");
}

#[test]
fn engine_refuses_host_watchpoints_by_name() {
    let mut g = guest();
    let err = g
        .vcpu
        .set_guest_debug(&GuestDebug {
            watchpoints: vec![hypervisor::Watchpoint {
                addr: DATA,
                len: 8,
                kind: hypervisor::WatchKind::Write,
            }],
            ..Default::default()
        })
        .unwrap_err();
    assert!(err.to_string().contains("watchpoints"), "{err}");
}
