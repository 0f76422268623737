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

/// The debugger's watchpoints (gdb's `watch` through the stub): a write
/// inside the watched range stops after the instruction, with the
/// watchpoint's address; a read does not stop a write watchpoint, a read
/// watchpoint stops on a read; the guest sees nothing (no #DB) and runs on
/// to its end once the watchpoint is removed.
#[test]
fn watchpoints_stop_after_the_access() {
    use hypervisor::{WatchKind, Watchpoint};
    let mut g = guest();
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(rbx, DATA).unwrap(); // CODE, 10 bytes
    a.mov(rcx, qword_ptr(rbx + 0x10)).unwrap(); // CODE+10, 4 bytes: a read
    a.mov(dword_ptr(rbx + 0x14), 7).unwrap(); // CODE+14, 7 bytes: a write
    a.mov(rdx, qword_ptr(rbx + 0x40)).unwrap(); // CODE+21, 4 bytes: a read
    a.mov(eax, 0xffff_ffffu32).unwrap();
    a.hlt().unwrap();
    let code = a.assemble(CODE).unwrap();
    g.load_code(&code);
    let watch = |addr, len, kind| GuestDebug {
        watchpoints: vec![Watchpoint { addr, len, kind }],
        ..Default::default()
    };
    g.vcpu
        .set_guest_debug(&watch(DATA + 0x12, 4, WatchKind::Write))
        .unwrap();
    assert_eq!(debug_exit(&mut g), DebugStop::Watchpoint(DATA + 0x12));
    assert_eq!(g.regs().rip, CODE + 21, "after the write");
    assert_eq!(g.r32(DATA + 0x14), 7);
    g.vcpu
        .set_guest_debug(&watch(DATA + 0x44, 1, WatchKind::Read))
        .unwrap();
    assert_eq!(debug_exit(&mut g), DebugStop::Watchpoint(DATA + 0x44));
    assert_eq!(g.regs().rip, CODE + 25, "after the read");
    g.vcpu.set_guest_debug(&GuestDebug::default()).unwrap();
    g.run_to_halt();
    assert_eq!(g.regs().rax, 0xffff_ffff, "no exception reached the guest");
}
