//! The PC platform inside the engine: tiny guests program the PIC, PIT,
//! IOAPIC, LAPIC timer, kvmclock and INIT/SIPI themselves, count their
//! interrupts and report through memory. No port or MMIO access of theirs
//! may reach the VMM (any such exit fails the test).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use emu::state::{EmuVcpuState, EmuVmState};
use emu::{EmuVcpu, EmuVm};
use hypervisor::{Vcpu, VcpuExit, Vm};
use iced_x86::code_asm::*;

const RAM: usize = 8 << 20;
const APIC: u64 = 0xfee0_0000;
const IOAPIC: u64 = 0xfec0_0000;
/// Page directory for 3..4 GiB (the APIC pages).
const PD_HIGH: u64 = 0x14000;
/// Interrupt handlers, 0x80 bytes each.
const HANDLERS: u64 = 0x18_0000;
/// Counters, one qword per handler slot.
const COUNTS: u64 = DATA;
/// Values the guests report.
const OUT: u64 = DATA + 0x100;

fn pc_guest(cpus: u32) -> Guest {
    let mut ram = vec![0u8; RAM].into_boxed_slice();
    let vm = EmuVm::new_pc();
    // SAFETY: `ram` is moved into the Guest, which drops it last; the heap
    // buffer does not move.
    unsafe {
        vm.map_memory(0, 0, RAM as u64, ram.as_mut_ptr() as u64)
            .unwrap()
    };
    let vcpu = vm.create_pc_vcpu(0, cpus).unwrap();
    let mut g = Guest { vcpu, vm, ram };
    g.long_mode();
    // Identity-map 3..4 GiB (LAPIC, IOAPIC) with uncached 2 MiB pages.
    g.w64(PDPT + 3 * 8, PD_HIGH | 7);
    for i in 0..512u64 {
        g.w64(PD_HIGH + i * 8, ((3u64 << 30) + (i << 21)) | 0x9f);
    }
    g
}

fn asm_at(addr: u64, f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    assemble(64, addr, f)
}

fn asm16_at(addr: u64, f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    assemble(16, addr, f)
}

#[derive(Clone, Copy)]
enum Eoi {
    Pic,
    Lapic,
}

/// Vector `vector` increments counter `slot`, sends its EOI and returns.
fn install_counter(g: &mut Guest, vector: u8, slot: u64, eoi: Eoi) {
    let addr = HANDLERS + vector as u64 * 0x80;
    let code = asm_at(addr, |a| {
        a.push(rax)?;
        a.mov(rax, COUNTS + slot * 8)?;
        a.lock().inc(qword_ptr(rax))?;
        match eoi {
            Eoi::Pic => {
                a.mov(al, 0x20)?;
                a.out(0x20, al)?;
            }
            Eoi::Lapic => {
                a.mov(rax, APIC + 0xb0)?;
                a.mov(dword_ptr(rax), 0)?;
            }
        }
        a.pop(rax)?;
        a.iretq()
    });
    assert!(code.len() <= 0x80);
    g.write(addr, &code);
    let lo = (addr & 0xffff)
        | ((SEL_CODE64 as u64) << 16)
        | (0x8eu64 << 40)
        | (((addr >> 16) & 0xffff) << 48);
    g.w64(IDT + vector as u64 * 16, lo);
    g.w64(IDT + vector as u64 * 16 + 8, addr >> 32);
}

/// Run to the guest's final `cli; hlt`; any other exit fails.
fn run_to_halt(g: &mut Guest) {
    let e = g.run();
    assert_eq!(e, Ex::Halt, "regs {:x?}", g.regs());
    assert_eq!(g.regs().rflags & 0x200, 0, "stopped by HLT with IF=0");
}

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `hlt` until counter `slot` differs from `edx` (one interrupt taken),
/// then reload `edx`. Uses rsi = COUNTS.
fn wait_for_count(a: &mut CodeAssembler, slot: u64) -> Result<(), IcedError> {
    let mut w = a.create_label();
    a.set_label(&mut w)?;
    a.hlt()?;
    a.cmp(dword_ptr(rsi + (slot * 8) as i32), edx)?;
    a.je(w)?;
    a.mov(edx, dword_ptr(rsi + (slot * 8) as i32))
}

/// PIT channel 0, mode 2 (rate generator), period `count` ticks of 1.193 MHz.
fn program_pit(a: &mut CodeAssembler, count: u16) -> Result<(), IcedError> {
    a.mov(al, 0x34)?;
    a.out(0x43, al)?;
    a.mov(al, count as u32 & 0xff)?;
    a.out(0x40, al)?;
    a.mov(al, (count as u32) >> 8)?;
    a.out(0x40, al)
}

/// The common tail: count to `n` interrupts on `slot` with HLT, then stop.
fn hlt_until_count(a: &mut CodeAssembler, slot: u64, n: u32) -> Result<(), IcedError> {
    let mut lp = a.create_label();
    a.mov(rbx, COUNTS + slot * 8)?;
    a.sti()?;
    a.set_label(&mut lp)?;
    a.hlt()?;
    a.cmp(qword_ptr(rbx), n as i32)?;
    a.jb(lp)?;
    a.cli()?;
    a.hlt()
}

#[test]
fn pit_periodic_irq0_through_the_pic() {
    let mut g = pc_guest(1);
    install_counter(&mut g, 0x20, 0, Eoi::Pic);
    g.load_code(&asm_at(CODE, |a| {
        // ICW1-4: edge, cascade, vectors 0x20/0x28, 8086 mode.
        a.mov(al, 0x11)?;
        a.out(0x20, al)?;
        a.out(0xa0, al)?;
        a.mov(al, 0x20)?;
        a.out(0x21, al)?;
        a.mov(al, 0x28)?;
        a.out(0xa1, al)?;
        a.mov(al, 4)?;
        a.out(0x21, al)?;
        a.mov(al, 2)?;
        a.out(0xa1, al)?;
        a.mov(al, 1)?;
        a.out(0x21, al)?;
        a.out(0xa1, al)?;
        // Only IRQ0.
        a.mov(al, 0xfe)?;
        a.out(0x21, al)?;
        a.mov(al, 0xff)?;
        a.out(0xa1, al)?;
        // ELCR and port 0x61 are the platform's too.
        a.mov(dx, 0x4d0)?;
        a.in_(al, dx)?;
        a.mov(byte_ptr(OUT as i32), al)?;
        a.in_(al, 0x61)?;
        a.mov(byte_ptr(OUT as i32 + 1), al)?;
        program_pit(a, 1193)?; // 1 ms
        hlt_until_count(a, 0, 10)?;
        Ok(())
    }));
    let t = Instant::now();
    let cpu = thread_cpu_ns();
    run_to_halt(&mut g);
    let wall = t.elapsed();
    let cpu = thread_cpu_ns() - cpu;
    let n = g.r64(COUNTS);
    assert!(n >= 10, "{n} interrupts");
    // Ten 1 ms periods: the first edge comes a period after programming.
    assert!(wall >= Duration::from_millis(5), "{wall:?}");
    // HLT slept: a few instructions per interrupt, not a spin.
    let icount = g.vcpu.core().icount;
    assert!(icount < 2_000, "{icount} instructions retired");
    assert!(
        cpu < wall.as_nanos() as u64 / 2 + 2_000_000,
        "cpu {cpu} ns over {wall:?}"
    );
    let sleeps = g.vcpu.core().platform.sleeps();
    assert!(sleeps < 100, "{sleeps} sleeps for 10 timer periods");
    assert_eq!(g.r8(OUT), 0, "ELCR reads back edge-triggered");
}

/// LAPIC on with LINT0 masked, PIC masked: IRQ0 reaches the CPU only
/// through IOAPIC pin 2 (the ISA override) as vector 0x30.
fn lapic_and_ioapic_setup(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(rdi, APIC)?;
    a.mov(dword_ptr(rdi + 0xf0), 0x1ff)?;
    a.mov(dword_ptr(rdi + 0x350), 0x1_0000)?;
    a.mov(al, 0xff)?;
    a.out(0x21, al)?;
    a.out(0xa1, al)?;
    a.mov(rcx, IOAPIC)?;
    a.mov(dword_ptr(rcx), 0x14)?;
    a.mov(dword_ptr(rcx + 0x10), 0x30)?;
    a.mov(dword_ptr(rcx), 0x15)?;
    a.mov(dword_ptr(rcx + 0x10), 0)
}

#[test]
fn pit_periodic_through_ioapic_and_lapic() {
    let mut g = pc_guest(1);
    install_counter(&mut g, 0x30, 0, Eoi::Lapic);
    g.load_code(&asm_at(CODE, |a| {
        lapic_and_ioapic_setup(a)?;
        // The IOAPIC version register: 24 pins.
        a.mov(dword_ptr(rcx), 1)?;
        a.mov(eax, dword_ptr(rcx + 0x10))?;
        a.mov(dword_ptr(OUT as i32), eax)?;
        program_pit(a, 1193)?;
        hlt_until_count(a, 0, 10)?;
        Ok(())
    }));
    let t = Instant::now();
    run_to_halt(&mut g);
    assert!(g.r64(COUNTS) >= 10);
    assert!(t.elapsed() >= Duration::from_millis(5));
    assert_eq!(g.r32(OUT) >> 16 & 0xff, 23, "IOAPIC max redirection entry");
    assert!(g.vcpu.core().icount < 2_000);
}

#[test]
fn lapic_timer_one_shot_and_tsc_deadline() {
    let mut g = pc_guest(1);
    install_counter(&mut g, 0x40, 0, Eoi::Lapic);
    install_counter(&mut g, 0x41, 1, Eoi::Lapic);
    g.load_code(&asm_at(CODE, |a| {
        a.mov(rdi, APIC)?;
        a.mov(rsi, COUNTS)?;
        a.xor(edx, edx)?;
        a.mov(dword_ptr(rdi + 0xf0), 0x1ff)?;
        a.mov(dword_ptr(rdi + 0x3e0), 0xb)?; // divide by 1
        a.mov(dword_ptr(rdi + 0x320), 0x40)?; // one-shot, vector 0x40
        a.sti()?;
        for _ in 0..3 {
            a.mov(dword_ptr(rdi + 0x380), 500_000)?; // 0.5 ms at 1 GHz
            wait_for_count(a, 0)?;
        }
        // An expired one-shot timer reads 0.
        a.mov(eax, dword_ptr(rdi + 0x390))?;
        a.mov(dword_ptr(OUT as i32), eax)?;
        // TSC-deadline mode, vector 0x41.
        a.mov(dword_ptr(rdi + 0x320), 0x41 | (2 << 17))?;
        a.xor(edx, edx)?;
        for _ in 0..3 {
            a.rdtsc()?;
            a.shl(rdx, 32)?;
            a.or(rax, rdx)?;
            a.add(rax, 500_000)?;
            a.mov(rdx, rax)?;
            a.shr(rdx, 32)?;
            a.mov(ecx, 0x6e0)?;
            a.wrmsr()?;
            a.mov(edx, dword_ptr(rsi + 8))?;
            wait_for_count(a, 1)?;
        }
        // A fired deadline reads 0.
        a.mov(ecx, 0x6e0)?;
        a.rdmsr()?;
        a.mov(dword_ptr(OUT as i32 + 4), eax)?;
        a.cli()?;
        a.hlt()?;
        Ok(())
    }));
    let t = Instant::now();
    run_to_halt(&mut g);
    assert_eq!(g.r64(COUNTS), 3, "one-shot fired once per arming");
    assert_eq!(g.r64(COUNTS + 8), 3);
    assert_eq!(g.r32(OUT), 0);
    assert_eq!(g.r32(OUT + 4), 0);
    // Six 0.5 ms timers, each armed after the previous one fired.
    assert!(t.elapsed() >= Duration::from_millis(2), "{:?}", t.elapsed());
}

#[test]
fn hlt_sleeps_until_the_timer_without_burning_cpu() {
    let mut g = pc_guest(1);
    install_counter(&mut g, 0x40, 0, Eoi::Lapic);
    g.load_code(&asm_at(CODE, |a| {
        a.mov(rdi, APIC)?;
        a.mov(dword_ptr(rdi + 0xf0), 0x1ff)?;
        a.mov(dword_ptr(rdi + 0x3e0), 0xb)?;
        a.mov(dword_ptr(rdi + 0x320), 0x40)?;
        a.mov(dword_ptr(rdi + 0x380), 100_000_000)?; // 100 ms
        hlt_until_count(a, 0, 1)?;
        Ok(())
    }));
    let t = Instant::now();
    let cpu = thread_cpu_ns();
    run_to_halt(&mut g);
    let wall = t.elapsed();
    let cpu = thread_cpu_ns() - cpu;
    assert_eq!(g.r64(COUNTS), 1);
    assert!(wall >= Duration::from_millis(50), "woke early: {wall:?}");
    assert!(
        cpu < wall.as_nanos() as u64 / 2,
        "HLT burnt {cpu} ns of CPU in {wall:?}"
    );
    assert!(g.vcpu.core().icount < 100);
    // One sleep to the deadline (plus at most a few early wake-ups).
    let sleeps = g.vcpu.core().platform.sleeps();
    assert!((1..10).contains(&sleeps), "{sleeps} sleeps");
}

#[test]
fn device_interrupt_msi_and_kick_wake_a_halted_vcpu() {
    let mut g = pc_guest(1);
    install_counter(&mut g, 0x34, 0, Eoi::Lapic);
    install_counter(&mut g, 0x51, 1, Eoi::Lapic);
    g.load_code(&asm_at(CODE, |a| {
        lapic_and_ioapic_setup(a)?;
        // IOAPIC pin 4 (COM1) -> vector 0x34 on APIC 0.
        a.mov(dword_ptr(rcx), 0x18)?;
        a.mov(dword_ptr(rcx + 0x10), 0x34)?;
        a.mov(dword_ptr(rcx), 0x19)?;
        a.mov(dword_ptr(rcx + 0x10), 0)?;
        a.mov(rsi, COUNTS)?;
        a.xor(edx, edx)?;
        a.sti()?;
        wait_for_count(a, 0)?;
        a.xor(edx, edx)?;
        wait_for_count(a, 1)?;
        a.cli()?;
        a.hlt()?;
        Ok(())
    }));
    let line = g.vm.irq_line(4).unwrap();
    let kicker = g.vcpu.kicker();
    let vm = &g.vm;
    let vcpu = &mut g.vcpu;
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            std::thread::sleep(Duration::from_millis(20));
            kicker.kick();
            std::thread::sleep(Duration::from_millis(20));
            line.trigger().unwrap();
            std::thread::sleep(Duration::from_millis(20));
            vm.signal_msi(APIC, 0x51).unwrap();
        });
        // The kick ends the sleep with Interrupted; running again resumes
        // the HLT.
        let e = vcpu.run().map(|e| format!("{e:?}")).unwrap();
        assert_eq!(e, "Interrupted");
        let e = vcpu.run().map(|e| format!("{e:?}")).unwrap();
        assert_eq!(e, "Halt");
        h.join().unwrap();
    });
    assert_eq!(g.r64(COUNTS), 1);
    assert_eq!(g.r64(COUNTS + 8), 1);
}

/// The guest spins in a loop that only its timer interrupt ends. The loop
/// runs as translated code that jumps to itself, which tests only the
/// vCPU's attention word: the VM's timer thread must tick the platform at
/// the deadline and the tick must set that word (the vCPU never reads the
/// clock there). A kick after 20 s turns a hang into a failure.
#[test]
fn a_timer_interrupts_a_loop_in_translated_code() {
    let mut g = pc_guest(1);
    install_counter(&mut g, 0x40, 0, Eoi::Lapic);
    g.load_code(&asm_at(CODE, |a| {
        let mut spin = a.create_label();
        a.mov(rdi, APIC)?;
        a.mov(rsi, COUNTS)?;
        a.mov(dword_ptr(rdi + 0xf0), 0x1ff)?;
        a.mov(dword_ptr(rdi + 0x3e0), 0xb)?; // divide by 1
        a.mov(dword_ptr(rdi + 0x320), 0x40)?; // one-shot, vector 0x40
        a.xor(eax, eax)?;
        a.sti()?;
        a.mov(dword_ptr(rdi + 0x380), 5_000_000)?; // 5 ms at 1 GHz
        a.set_label(&mut spin)?;
        a.add(rax, 1)?;
        a.cmp(qword_ptr(rsi), 0)?;
        a.je(spin)?;
        a.cli()?;
        a.hlt()?;
        Ok(())
    }));
    let kicker = g.vcpu.kicker();
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    let watchdog = std::thread::spawn(move || {
        let t = Instant::now();
        while !d.load(Ordering::SeqCst) && t.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(10));
        }
        if !d.load(Ordering::SeqCst) {
            kicker.kick();
        }
    });
    let e = g.run();
    done.store(true, Ordering::SeqCst);
    watchdog.join().unwrap();
    assert_eq!(
        e,
        Ex::Halt,
        "the timer never ended the loop: {:x?}",
        g.regs()
    );
    assert_eq!(g.r64(COUNTS), 1);
    // Thousands of iterations: the loop ran long enough to be translated.
    assert!(g.regs().rax > 10_000, "{:x?}", g.regs());
}

/// Blocks that loop to themselves, at threshold 0 against the interpreter
/// (registers, memory, the exception frame, instructions retired): a body
/// that writes every flag before it reads any (its back edge keeps the
/// flags in the host and captures them only on the way out) with five
/// other registers cached (r10, rdi and spilled fixed ones) and MOV/ALU/
/// IMUL/shift/MOVZX/MOVSX/LEA forms run on them directly, ALU forms on
/// memory from them, moves into registers the block leaves in `Core::st`,
/// and two loops that run into a
/// not-present page: one whose first instruction is the faulting load (the
/// flags at the fault are the previous iteration's DEC's, with CF from
/// before the loop), one whose body writes the flags first (the flags at
/// the fault are that iteration's ADD's). On the PC platform, which kicks
/// on every event: no poll countdown, so a back edge may keep the flags in
/// the host.
#[test]
fn self_loop_back_edges_and_direct_forms_match_the_interpreter() {
    // 0x406000..0x408000 is 4 KiB-mapped; 0x407000 is made not present.
    const P: u64 = 0x406000;
    let programs: Vec<(&str, Vec<u8>)> = vec![
        (
            "flags dead at the loop start, five cached locals",
            asm_at(CODE, |a| {
                let mut lp = a.create_label();
                a.mov(rbp, DATA)?;
                a.mov(ecx, 300)?;
                a.mov(ebx, 3)?;
                a.mov(r9, 7u64)?;
                a.mov(r11, 11u64)?;
                a.mov(r12, 13u64)?;
                a.set_label(&mut lp)?;
                a.add(rbx, r9)?;
                a.xor(r11, rbx)?;
                a.imul_2(r9, r11)?;
                a.shl(rbx, 3)?;
                a.mov(qword_ptr(rbp), r9)?;
                a.mov(r8, qword_ptr(rbp + 8))?;
                a.add(r9, r8)?;
                a.lea(rbx, qword_ptr(r9 + rbx + 1))?;
                a.sub(r12d, r11d)?;
                a.mov(r8b, r12b)?;
                a.adc(r11b, r8b)?;
                a.imul_3(r12, r9, 0x1234)?;
                // Extensions into cached registers, memory destinations.
                a.movsx(r11d, byte_ptr(rbp + 3))?;
                a.movsx(r8, word_ptr(rbp + 5))?;
                a.movzx(r12d, byte_ptr(rbp + 7))?;
                a.movsxd(r9, dword_ptr(rbp + 9))?;
                a.add(qword_ptr(rbp + 24), r9)?;
                a.sub(dword_ptr(rbp + 32), 5)?;
                a.inc(word_ptr(rbp + 40))?;
                a.cmp(qword_ptr(rbp), r12)?;
                a.sbb(byte_ptr(rbp + 44), r8b)?;
                a.mov(qword_ptr(rbp + 48), -2i32)?;
                a.lea(rbp, qword_ptr(rbp + 16))?;
                a.dec(ecx)?;
                a.jnz(lp)?;
                a.pushfq()?;
                a.pop(r10)?;
                a.hlt()?;
                Ok(())
            }),
        ),
        (
            "moves into registers left in Core::st",
            asm_at(CODE, |a| {
                for r in [rbx, rcx, rdx, rbp, r8, r11] {
                    a.mov(r, -1i64)?;
                }
                a.mov(r9, 0x1122_3344_5566_7788u64)?;
                a.mov(r8, r9)?;
                a.mov(ebx, r9d)?;
                a.mov(cx, r9w)?;
                a.mov(dl, r9b)?;
                a.mov(ebp, 0x8765_4321u32)?;
                a.mov(r11, -5i64)?;
                a.add(r9, 1)?;
                a.add(r9, 1)?;
                a.hlt()?;
                Ok(())
            }),
        ),
        (
            "a loop that starts with the faulting load",
            asm_at(CODE, |a| {
                let mut lp = a.create_label();
                a.mov(rsi, P + 0xf08)?;
                a.mov(ecx, 100)?;
                a.xor(eax, eax)?;
                // CF=1 SF=1 before the loop; DEC keeps CF.
                a.cmp(ecx, 200)?;
                a.set_label(&mut lp)?;
                a.mov(rdx, qword_ptr(rsi))?;
                a.lea(rsi, qword_ptr(rsi + 8))?;
                a.lea(rax, qword_ptr(rax + rdx))?;
                a.dec(ecx)?;
                a.jnz(lp)?;
                a.hlt()?;
                Ok(())
            }),
        ),
        (
            "a loop that writes the flags before the faulting load",
            asm_at(CODE, |a| {
                let mut lp = a.create_label();
                a.mov(rsi, P + 0xf08)?;
                a.mov(ecx, 100)?;
                a.xor(eax, eax)?;
                a.cmp(ecx, 200)?;
                a.set_label(&mut lp)?;
                a.add(rax, rcx)?;
                a.mov(rdx, qword_ptr(rsi))?;
                a.lea(rsi, qword_ptr(rsi + 8))?;
                a.sub(rax, rdx)?;
                a.dec(ecx)?;
                a.jnz(lp)?;
                a.hlt()?;
                Ok(())
            }),
        ),
    ];
    for (name, code) in &programs {
        let run = |jit: Option<u32>| {
            let mut g = pc_guest(1);
            g.vcpu.core_mut().jit.threshold = jit;
            for i in 0..512u64 {
                g.w64(DATA + i * 8, 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(i + 3));
            }
            for i in 0..0x2000u64 {
                g.ram[(P + i) as usize] = (i * 5 + (i >> 7)) as u8;
            }
            g.w64(PT + 8 * 7, 0);
            g.load_code(code);
            g.run_to_halt();
            let r = g.regs();
            let frame: Vec<u64> = (0..6).map(|i| g.r64(r.rsp + 8 * i)).collect();
            let mem = g.ram[DATA as usize..(DATA + 0x2000) as usize].to_vec();
            (
                r,
                frame,
                mem,
                g.vcpu.core().icount,
                g.vcpu.core().jit.compiled,
            )
        };
        let (ri, fi, mi, ni, _) = run(None);
        let (rj, fj, mj, nj, compiled) = run(Some(0));
        assert!(compiled > 0, "{name}: nothing translated");
        assert_eq!(format!("{ri:x?}"), format!("{rj:x?}"), "{name}: registers");
        assert_eq!(format!("{fi:x?}"), format!("{fj:x?}"), "{name}: stack");
        assert!(mi == mj, "{name}: memory at DATA");
        assert_eq!(ni, nj, "{name}: instructions retired");
    }
}

/// A kick from another thread stops a vCPU spinning (IF=0, so nothing else
/// could) in translated code that jumps to itself: `run` returns
/// Interrupted, and running again resumes the loop where it was.
#[test]
fn a_kick_stops_a_vcpu_spinning_in_translated_code() {
    let mut g = pc_guest(1);
    g.load_code(&asm_at(CODE, |a| {
        let mut spin = a.create_label();
        a.xor(eax, eax)?;
        a.set_label(&mut spin)?;
        a.add(rax, 1)?;
        a.cmp(rax, 0)?;
        a.jne(spin)?;
        a.hlt()?;
        Ok(())
    }));
    for _ in 0..2 {
        let (e, before) = run_until_kicked(&mut g, Duration::from_millis(50));
        assert_eq!(e, Ex::Interrupted, "{:x?}", g.regs());
        let r = g.regs();
        assert!(r.rax > before + 10_000, "{:x?}", r);
        assert!(r.rip >= CODE && r.rip < CODE + 0x20, "{:x?}", r);
    }
}

/// A kick stops a translated loop whose body writes every flag before it
/// reads any (its back edge keeps the flags in the host and tests the
/// attention word without touching them): at the block start where it
/// stops, RFLAGS are those of the last iteration's SUB.
#[test]
fn a_kick_stops_a_self_loop_with_its_flags() {
    let mut g = pc_guest(1);
    let code = asm_at(CODE, |a| {
        let mut spin = a.create_label();
        a.xor(eax, eax)?;
        a.set_label(&mut spin)?;
        a.add(rax, 1)?;
        a.mov(rbx, rax)?;
        a.and(ebx, 0xff)?;
        // Never overflows: the loop runs until kicked, with CF, PF, AF,
        // ZF and SF changing from one iteration to the next.
        a.sub(rbx, 0x80)?;
        a.jno(spin)?;
        a.hlt()?;
        Ok(())
    });
    // The loop's block starts after the XOR.
    let mut d = iced_x86::Decoder::with_ip(64, &code, CODE, 0);
    let start = d.decode().next_ip();
    g.load_code(&code);
    for _ in 0..3 {
        let (e, before) = run_until_kicked(&mut g, Duration::from_millis(30));
        assert_eq!(e, Ex::Interrupted, "{:x?}", g.regs());
        let r = g.regs();
        assert!(r.rax > before + 1000, "{:x?}", r);
        assert_eq!(r.rip, start, "{:x?}", r);
        let b = r.rax & 0xff;
        let res = b.wrapping_sub(0x80);
        let mut want = 0u64;
        want |= (b < 0x80) as u64; // CF
        want |= (res as u8).count_ones().is_multiple_of(2) as u64 * 0x4; // PF
        want |= ((b ^ 0x80 ^ res) & 0x10 != 0) as u64 * 0x10; // AF
        want |= (res == 0) as u64 * 0x40; // ZF
        want |= (res >> 63) * 0x80; // SF
        assert_eq!(r.rflags & 0x8d5, want, "{:x?}", r);
        assert_eq!(r.rbx, res, "{:x?}", r);
    }
}

/// A kick from another thread stops a vCPU whose loop is three chained
/// translated blocks that hand RAX, RDI, RSI and RSP on in host registers
/// (the attention word is tested at each link): whichever link it stops
/// at, the registers `run` returns are the guest's at that block start,
/// and running again goes on from there.
#[test]
fn a_kick_between_chained_blocks_sees_their_registers() {
    const STACK: u64 = 0x80000;
    let mut g = pc_guest(1);
    let (mut l1, mut l2, mut l3) = (0, 0, 0);
    let code = asm_at(CODE, |a| {
        let mut b1 = a.create_label();
        let mut b2 = a.create_label();
        let mut b3 = a.create_label();
        a.mov(rsp, STACK)?;
        a.xor(eax, eax)?;
        a.xor(edi, edi)?;
        a.xor(esi, esi)?;
        a.set_label(&mut b1)?;
        a.add(rax, 1)?;
        a.push(rax)?;
        a.jmp(b2)?;
        a.set_label(&mut b2)?;
        a.pop(rdx)?;
        a.lea(rdi, qword_ptr(rdi + rdx * 2))?;
        a.jmp(b3)?;
        a.set_label(&mut b3)?;
        a.add(rsi, rax)?;
        a.cmp(rax, 0)?;
        a.jne(b1)?;
        a.hlt()?;
        Ok(())
    });
    // The block starts, by decoding the code: B1 after the 4 set-up
    // instructions, B2 after `add; push; jmp`, B3 after `pop; lea; jmp`.
    let mut d = iced_x86::Decoder::with_ip(64, &code, CODE, 0);
    let ips: Vec<u64> = (0..14).map(|_| d.decode().ip()).collect();
    if let [_, _, _, _, a1, _, _, a2, _, _, a3, ..] = ips[..] {
        (l1, l2, l3) = (a1, a2, a3);
    }
    g.load_code(&code);
    let mut stops = [0u32; 3];
    for _ in 0..6 {
        let (e, before) = run_until_kicked(&mut g, Duration::from_millis(30));
        assert_eq!(e, Ex::Interrupted, "{:x?}", g.regs());
        let r = g.regs();
        assert!(r.rax > before + 1000, "{:x?}", r);
        // After n whole iterations RAX = n, RDI = n(n+1), RSI = n(n+1)/2;
        // at B2 and B3 of iteration n+1 RAX is n+1 already.
        let n = if r.rip == l1 { r.rax } else { r.rax - 1 };
        let want_rdi = if r.rip == l3 {
            (n + 1) * (n + 2)
        } else {
            n * (n + 1)
        };
        assert_eq!(r.rdi, want_rdi, "{:x?}", r);
        assert_eq!(r.rsi, n * (n + 1) / 2, "{:x?}", r);
        let want_rsp = if r.rip == l2 { STACK - 8 } else { STACK };
        assert_eq!(r.rsp, want_rsp, "{:x?}", r);
        match r.rip {
            x if x == l1 => stops[0] += 1,
            x if x == l2 => stops[1] += 1,
            x if x == l3 => stops[2] += 1,
            _ => panic!("stopped outside a block start: {r:x?}"),
        }
    }
    eprintln!("stops at B1/B2/B3: {stops:?}");
}

#[test]
fn kvmclock_writes_an_advancing_pvclock_structure() {
    use emu_platform::pvclock::PvClockVcpuTimeInfo;
    const INFO: u64 = DATA + 0x400;
    const COPY: u64 = DATA + 0x440;
    const WALL: u64 = DATA + 0x480;
    let mut g = pc_guest(1);
    g.load_code(&asm_at(CODE, |a| {
        a.mov(ecx, 0x4b56_4d01)?;
        a.mov(eax, (INFO | 1) as u32)?;
        a.xor(edx, edx)?;
        a.wrmsr()?;
        // Keep a copy of the first structure.
        a.mov(rsi, INFO)?;
        a.mov(rdi, COPY)?;
        a.mov(ecx, 32)?;
        a.rep().movsb()?;
        a.rdtsc()?;
        a.mov(dword_ptr(OUT as i32), eax)?;
        a.mov(dword_ptr(OUT as i32 + 4), edx)?;
        a.mov(ecx, 0x4b56_4d00)?;
        a.mov(eax, WALL as u32)?;
        a.xor(edx, edx)?;
        a.wrmsr()?;
        let mut lp = a.create_label();
        a.mov(ecx, 200_000)?;
        a.set_label(&mut lp)?;
        a.dec(ecx)?;
        a.jnz(lp)?;
        a.rdtsc()?;
        a.mov(dword_ptr(OUT as i32 + 8), eax)?;
        a.mov(dword_ptr(OUT as i32 + 12), edx)?;
        // Re-register: the structure is rewritten with a later time.
        a.mov(ecx, 0x4b56_4d01)?;
        a.mov(eax, (INFO | 1) as u32)?;
        a.xor(edx, edx)?;
        a.wrmsr()?;
        a.rdmsr()?;
        a.mov(dword_ptr(OUT as i32 + 16), eax)?;
        a.hlt()?;
        Ok(())
    }));
    run_to_halt(&mut g);
    let read = |g: &Guest, at: u64| {
        let mut b = [0u8; 32];
        b.copy_from_slice(&g.ram[at as usize..at as usize + 32]);
        PvClockVcpuTimeInfo::from_bytes(&b)
    };
    let first = read(&g, COPY);
    let second = read(&g, INFO);
    let tsc1 = g.r64(OUT);
    let tsc2 = g.r64(OUT + 8);
    assert_eq!(g.r32(OUT + 16) as u64, INFO | 1, "MSR reads back");
    for i in [first, second] {
        assert!(i.version != 0 && i.version.is_multiple_of(2), "{i:?}");
        assert_eq!(i.flags & 1, 1, "TSC stable");
        // 1 GHz TSC: the scale is the identity.
        assert_eq!(
            i.guest_time_ns(i.tsc_timestamp + 1_000_000_000),
            i.system_time + 1_000_000_000
        );
    }
    assert!(second.version > first.version);
    assert!(second.system_time > first.system_time);
    assert!(second.tsc_timestamp > first.tsc_timestamp);
    let t1 = first.guest_time_ns(tsc1);
    let t2 = first.guest_time_ns(tsc2);
    assert!(t1 >= first.system_time && t2 > t1, "{t1} {t2}");
    // Both structures describe the same clock.
    let later = second.tsc_timestamp + 12_345;
    assert!(
        second
            .guest_time_ns(later)
            .abs_diff(first.guest_time_ns(later))
            < 1_000
    );
    // The platform's clock agrees with what the guest computes.
    let now = g.vm.platform().unwrap().now_ns();
    assert!(now >= t2);
    // Wall clock: boot time in Unix seconds, close to the host's view.
    let version = g.r32(WALL);
    let sec = g.r32(WALL + 4) as u64;
    let nsec = g.r32(WALL + 8) as u64;
    assert!(version != 0 && version.is_multiple_of(2));
    assert!(nsec < 1_000_000_000);
    let host_boot = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        - now;
    let guest_boot = sec * 1_000_000_000 + nsec;
    assert!(
        host_boot.abs_diff(guest_boot) < 2_000_000_000,
        "{host_boot} vs {guest_boot}"
    );
}

#[test]
fn cpuid_advertises_the_platform() {
    // What the guest sees: leaves 1, 0x40000000/1/10 and 0x80000007.
    const R: u64 = OUT;
    let mut g = pc_guest(1);
    g.load_code(&asm_at(CODE, |a| {
        a.mov(rdi, R)?;
        for leaf in [1u32, 0x4000_0000, 0x4000_0001, 0x4000_0010, 0x8000_0007] {
            a.mov(eax, leaf)?;
            a.xor(ecx, ecx)?;
            a.cpuid()?;
            a.mov(dword_ptr(rdi), eax)?;
            a.mov(dword_ptr(rdi + 4), ebx)?;
            a.mov(dword_ptr(rdi + 8), ecx)?;
            a.mov(dword_ptr(rdi + 12), edx)?;
            a.add(rdi, 16)?;
        }
        a.hlt()?;
        Ok(())
    }));
    run_to_halt(&mut g);
    let leaf = |i: u64| [0, 4, 8, 12].map(|o| g.r32(R + i * 16 + o));
    let l1 = leaf(0);
    assert_ne!(l1[3] & (1 << 9), 0, "APIC");
    assert_ne!(l1[2] & (1 << 24), 0, "TSC-deadline");
    let h = leaf(1);
    let mut sig = Vec::new();
    for r in &h[1..] {
        sig.extend_from_slice(&r.to_le_bytes());
    }
    assert_eq!(&sig, b"KVMKVMKVM\0\0\0");
    assert!(h[0] >= 0x4000_0001);
    let f = leaf(2);
    assert_ne!(f[0] & (1 << 3), 0, "CLOCKSOURCE2");
    assert_ne!(f[0] & (1 << 24), 0, "CLOCKSOURCE_STABLE_BIT");
    assert_eq!(leaf(3)[0], 1_000_000, "TSC kHz: 1 GHz");
    assert_ne!(leaf(4)[3] & (1 << 8), 0, "invariant TSC");
}

/// Run `g` until another thread kicks it `after` from now; returns the
/// exit and guest RAX from before the run.
fn run_until_kicked(g: &mut Guest, after: Duration) -> (Ex, u64) {
    let kicker = g.vcpu.kicker();
    let before = g.regs().rax;
    let h = std::thread::spawn(move || {
        std::thread::sleep(after);
        kicker.kick();
    });
    let e = g.run();
    h.join().unwrap();
    (e, before)
}

/// vCPU 1 of a 2-vCPU `g`, started directly in long mode at `rip` with
/// the BSP's segments and paging (INIT/SIPI has its own test).
fn long_mode_ap(g: &Guest, rip: u64) -> EmuVcpu {
    let mut ap = g.vm.create_pc_vcpu(1, 2).unwrap();
    let mut s = g.sregs();
    s.apic_base = 0xfee0_0800;
    ap.set_sregs(&s).unwrap();
    let mut r = g.regs();
    r.rip = rip;
    r.rsp = 0x40000;
    ap.set_regs(&r).unwrap();
    ap.set_wait_for_sipi(false);
    ap
}

/// Run the AP until it halts (`rerun_halts`: until `stop` is set, running
/// it again after each HLT as the VMM does) or exits otherwise; what ended
/// it, as text.
fn run_ap_until_halt(ap: &mut EmuVcpu, stop: &AtomicBool, rerun_halts: bool) -> String {
    loop {
        match ap.run() {
            Ok(VcpuExit::Halt) if rerun_halts && !stop.load(Ordering::SeqCst) => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(VcpuExit::Halt) => return "Halt".into(),
            Ok(VcpuExit::Interrupted) if !stop.load(Ordering::SeqCst) => continue,
            Ok(e) => return format!("{e:?}"),
            Err(e) => return format!("error {e}"),
        }
    }
}

/// Run `ap` on a thread of its own ([`run_ap_until_halt`]) while `g`'s
/// BSP runs to its halt; then give the AP up to `grace` to end by itself
/// (so an AP that never started does not hang the test), stop it, and
/// return what ended it and what `after` reads from it.
fn run_bsp_and_ap<T: Send + 'static>(
    g: &mut Guest,
    mut ap: EmuVcpu,
    rerun_halts: bool,
    grace: Duration,
    after: impl FnOnce(&EmuVcpu) -> T + Send + 'static,
) -> (String, T) {
    let kicker = ap.kicker();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let h = std::thread::spawn(move || {
        let e = run_ap_until_halt(&mut ap, &stop2, rerun_halts);
        (e, after(&ap))
    });
    run_to_halt(g);
    let deadline = Instant::now() + grace;
    while !h.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::SeqCst);
    kicker.kick();
    h.join().unwrap()
}

#[test]
fn application_processor_waits_for_sipi() {
    let g = pc_guest(2);
    let mut ap = g.vm.create_pc_vcpu(1, 2).unwrap();
    let kicker = ap.kicker();
    let h = std::thread::spawn(move || {
        let e = ap.run().map(|e| format!("{e:?}")).unwrap();
        assert_eq!(ap.get_sregs().unwrap().apic_base, 0xfee0_0800, "AP");
        (e, ap.core().icount)
    });
    std::thread::sleep(Duration::from_millis(50));
    kicker.kick();
    let (e, icount) = h.join().unwrap();
    assert_eq!(e, "Interrupted");
    assert_eq!(icount, 0, "the AP ran before any SIPI");
    assert_eq!(g.sregs().apic_base, 0xfee0_0900, "BSP");
    // There is no third APIC.
    assert!(g.vm.create_pc_vcpu(2, 2).is_err());
}

#[test]
fn init_sipi_sipi_starts_the_ap_in_real_mode() {
    const TRAMPOLINE: u64 = 0x8000;
    const MARKER: u64 = 0x7000;
    let mut g = pc_guest(2);
    let tramp = asm16_at(0, |a| {
        a.mov(word_ptr(MARKER as u32), 0x5a5a)?;
        a.mov(ax, cs)?;
        a.mov(word_ptr(MARKER as u32 + 2), ax)?;
        a.cli()?;
        a.hlt()
    });
    g.write(TRAMPOLINE, &tramp);
    let icr = |a: &mut CodeAssembler, lo: u32| -> Result<(), IcedError> {
        a.mov(dword_ptr(rdi + 0x310), 1u32 << 24)?;
        a.mov(dword_ptr(rdi + 0x300), lo)
    };
    g.load_code(&asm_at(CODE, |a| {
        a.mov(rdi, APIC)?;
        a.mov(dword_ptr(rdi + 0xf0), 0x1ff)?;
        icr(a, 0xc500)?; // INIT, level, assert
        icr(a, 0x8500)?; // INIT de-assert
        let sipi = 0x4600 | (TRAMPOLINE >> 12) as u32;
        icr(a, sipi)?;
        icr(a, sipi)?;
        // Wait (bounded) for the AP's marker.
        let mut lp = a.create_label();
        let mut done = a.create_label();
        a.mov(ecx, 100_000_000)?;
        a.set_label(&mut lp)?;
        a.cmp(word_ptr(MARKER as i32), 0x5a5a)?;
        a.je(done)?;
        a.pause()?;
        a.dec(ecx)?;
        a.jnz(lp)?;
        a.set_label(&mut done)?;
        a.hlt()?;
        Ok(())
    }));
    let ap = g.vm.create_pc_vcpu(1, 2).unwrap();
    let (e, ap_cs) = run_bsp_and_ap(&mut g, ap, false, Duration::from_secs(10), |ap| {
        ap.get_sregs().unwrap().cs.selector
    });
    assert_eq!(e, "Halt");
    assert_eq!(g.r32(MARKER) & 0xffff, 0x5a5a, "AP marker");
    assert_eq!(g.r32(MARKER) >> 16, 0x0800, "AP CS = vector << 8");
    assert_eq!(ap_cs, 0x0800);
}

#[test]
fn fixed_ipi_wakes_a_halted_vcpu_on_another_thread() {
    const AP_CODE: u64 = CODE + 0x1000;
    const READY: u64 = OUT + 0x40;
    let mut g = pc_guest(2);
    install_counter(&mut g, 0x50, 0, Eoi::Lapic);
    // Bounded wait until dword [addr] == value; falls through on timeout.
    let wait_for = |a: &mut CodeAssembler, addr: u64, value: i32| -> Result<(), IcedError> {
        let mut lp = a.create_label();
        let mut done = a.create_label();
        a.mov(ecx, 200_000_000)?;
        a.set_label(&mut lp)?;
        a.cmp(dword_ptr(addr as i32), value)?;
        a.je(done)?;
        a.pause()?;
        a.dec(ecx)?;
        a.jnz(lp)?;
        a.set_label(&mut done)?;
        Ok(())
    };
    g.load_code(&asm_at(CODE, |a| {
        a.mov(rdi, APIC)?;
        a.mov(dword_ptr(rdi + 0xf0), 0x1ff)?;
        wait_for(a, READY, 1)?;
        // Give the AP time to fall asleep in HLT.
        let mut spin = a.create_label();
        a.mov(ecx, 200_000)?;
        a.set_label(&mut spin)?;
        a.dec(ecx)?;
        a.jnz(spin)?;
        a.mov(dword_ptr(rdi + 0x310), 1u32 << 24)?;
        a.mov(dword_ptr(rdi + 0x300), 0x4050)?; // fixed, vector 0x50
        wait_for(a, COUNTS, 1)?;
        a.hlt()?;
        Ok(())
    }));
    g.write(
        AP_CODE,
        &asm_at(AP_CODE, |a| {
            a.mov(rdi, APIC)?;
            a.mov(dword_ptr(rdi + 0xf0), 0x1ff)?;
            a.mov(rsi, COUNTS)?;
            a.xor(edx, edx)?;
            a.mov(dword_ptr(READY as i32), 1)?;
            a.sti()?;
            wait_for_count(a, 0)?;
            a.cli()?;
            a.hlt()
        }),
    );
    let ap = long_mode_ap(&g, AP_CODE);
    let (e, sleeps) = run_bsp_and_ap(&mut g, ap, false, Duration::from_secs(10), |ap| {
        ap.core().platform.sleeps()
    });
    assert_eq!(e, "Halt");
    assert_eq!(g.r64(COUNTS), 1, "the AP took the IPI");
    // It slept (in 100 ms slices at most, with no timer armed) and did not
    // spin: a spinning vCPU would count millions.
    assert!((1..200).contains(&sleeps), "{sleeps} sleeps");
}

#[test]
fn other_ports_and_mmio_still_exit_to_the_vmm() {
    let mut g = pc_guest(1);
    g.load_code(&asm_at(CODE, |a| {
        a.mov(al, 0x41)?;
        a.mov(dx, 0x3f8)?;
        a.out(dx, al)?;
        a.in_(al, 0x60)?;
        a.mov(rbx, 0xfed0_0000u64)?;
        a.mov(eax, dword_ptr(rbx))?;
        // The LAPIC page of this vCPU is the platform's: no exit.
        a.mov(rbx, APIC)?;
        a.mov(eax, dword_ptr(rbx + 0x30))?;
        a.mov(dword_ptr(OUT as i32), eax)?;
        a.hlt()?;
        Ok(())
    }));
    assert_eq!(g.run(), Ex::IoOut(0x3f8, vec![0x41]));
    assert_eq!(g.run(), Ex::IoIn(0x60, 1));
    assert_eq!(g.run(), Ex::MmioRead(0xfed0_0000, 4));
    run_to_halt(&mut g);
    assert_eq!(g.r32(OUT) & 0xff, 0x14, "LAPIC version register");
}

#[test]
fn msi_messages_decode_like_the_apic_bus() {
    use emu::platform::pc::msi_delivery;
    use emu_platform::{DeliveryMode, DestMode, Trigger};
    let d = msi_delivery(0xfee0_300c, 0x8000 | (4 << 8) | 0x61).unwrap();
    assert_eq!(d.dest, 3);
    assert_eq!(d.dest_mode, DestMode::Logical);
    assert_eq!(d.vector, 0x61);
    assert_eq!(d.delivery_mode, DeliveryMode::Nmi);
    assert_eq!(d.trigger, Trigger::Level);
    let d = msi_delivery(0xfee0_1000, 0x41).unwrap();
    assert_eq!(
        (d.dest, d.dest_mode, d.trigger),
        (1, DestMode::Physical, Trigger::Edge)
    );
    // Not the interrupt window: a plain memory write, no interrupt.
    assert!(msi_delivery(0xfed0_0000, 0x41).is_none());
    assert!(msi_delivery(0, 0).is_none());
}

/// `rdtsc` into rax (64 bits), clobbering rdx.
fn rdtsc64(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)
}

#[test]
fn snapshot_of_a_sleeping_vcpu_resumes_its_timer_and_clock_in_a_new_vm() {
    let mut g = pc_guest(1);
    install_counter(&mut g, 0x40, 0, Eoi::Lapic);
    g.load_code(&asm_at(CODE, |a| {
        a.mov(rax, 0x1234_5678_9abc_def0u64)?;
        a.movq(xmm3, rax)?;
        a.mov(rdi, APIC)?;
        a.mov(dword_ptr(rdi + 0xf0), 0x1ff)?;
        a.mov(dword_ptr(rdi + 0x3e0), 0xb)?; // divide by 1
        a.mov(dword_ptr(rdi + 0x320), 0x40)?; // one-shot, vector 0x40
        rdtsc64(a)?;
        a.mov(qword_ptr(OUT as i32), rax)?;
        a.mov(dword_ptr(rdi + 0x380), 200_000_000)?; // 200 ms at 1 GHz
        let mut lp = a.create_label();
        a.mov(rbx, COUNTS)?;
        a.sti()?;
        a.set_label(&mut lp)?;
        a.hlt()?;
        a.cmp(qword_ptr(rbx), 1)?;
        a.jb(lp)?;
        a.cli()?;
        rdtsc64(a)?;
        a.mov(qword_ptr(OUT as i32 + 8), rax)?;
        a.movq(rax, xmm3)?;
        a.mov(qword_ptr(OUT as i32 + 16), rax)?;
        a.hlt()
    }));
    // Stop the vCPU while it sleeps in HLT, 50 ms into the timer.
    let kicker = g.vcpu.kicker();
    let k = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        kicker.kick();
    });
    assert_eq!(g.run(), Ex::Interrupted);
    k.join().unwrap();
    assert_eq!(g.r64(COUNTS), 0, "the timer fired before the snapshot");
    let vcpu = g.vcpu.save_state().unwrap();
    let vm = g.vm.save_state().unwrap();
    // Through JSON, as the manifest stores them.
    let vcpu: hypervisor::VcpuSnapshot =
        serde_json::from_str(&serde_json::to_string(&vcpu).unwrap()).unwrap();
    let vm: hypervisor::VmSnapshot =
        serde_json::from_str(&serde_json::to_string(&vm).unwrap()).unwrap();
    let saved = EmuVcpuState::try_from(&vcpu).expect("an engine snapshot");
    assert!(saved.halted);
    let saved_vm = EmuVmState::try_from(&vm).expect("an engine snapshot");
    assert!(saved_vm.guest_ns >= 50_000_000);

    // A new VM (its own clock started at zero), some host time later.
    std::thread::sleep(Duration::from_millis(100));
    let mut h = pc_guest(1);
    h.ram.copy_from_slice(&g.ram);
    drop(g);
    h.vcpu.restore_state(&vcpu).unwrap();
    h.vm.restore_state(&vm).unwrap();
    let again = EmuVcpuState::try_from(&h.vcpu.save_state().unwrap()).unwrap();
    assert_eq!(saved, again);
    let restored = Instant::now();
    run_to_halt(&mut h);
    let ran = restored.elapsed();
    assert_eq!(h.r64(COUNTS), 1);
    let (t0, t1) = (h.r64(OUT), h.r64(OUT + 8));
    assert!(t1 > t0, "the TSC went back: {t0} then {t1}");
    // The guest saw its 200 ms (1 GHz TSC), not the 100 ms of downtime.
    let guest_ms = (t1 - t0) / 1_000_000;
    assert!(
        (200..200 + 100 + ran.as_millis() as u64).contains(&guest_ms),
        "guest waited {guest_ms} ms"
    );
    assert!(ran >= Duration::from_millis(100), "timer early: {ran:?}");
    assert_eq!(h.r64(OUT + 16), 0x1234_5678_9abc_def0, "xmm3 lost");
}

#[test]
fn a_platform_saved_for_one_vcpu_does_not_restore_into_two() {
    let g = pc_guest(1);
    let vm = g.vm.save_state().unwrap();
    // A platform saved with one vCPU does not fit a VM with two.
    let two = pc_guest(2);
    let e = two.vm.restore_state(&vm).unwrap_err().to_string();
    assert!(e.contains("local APICs"), "{e}");
}

#[test]
fn an_answered_read_is_finished_before_a_snapshot() {
    let mut g = pc_guest(1);
    g.load_code(&asm_at(CODE, |a| {
        a.mov(dx, 0x3fd)?;
        a.in_(al, dx)?;
        a.mov(byte_ptr(OUT as i32), al)?;
        // A read-modify-write of device memory: its write must still reach
        // the VMM, so it is not finished early.
        a.mov(rbx, 0xfed0_0000u64)?;
        a.add(dword_ptr(rbx), 1)?;
        a.hlt()?;
        Ok(())
    }));
    assert_eq!(g.run_io(0x60), Ex::IoIn(0x3fd, 1));
    let rip = g.regs().rip;
    g.vcpu.complete_pending_io().unwrap();
    let after = g.regs();
    assert!(after.rip > rip, "the IN finished");
    assert_eq!(after.rax & 0xff, 0x60);
    let s = EmuVcpuState::try_from(&g.vcpu.save_state().unwrap()).unwrap();
    assert_eq!(s.pending_read, None);
    assert_eq!(g.run_io(41), Ex::MmioRead(0xfed0_0000, 4));
    let rip = g.regs().rip;
    g.vcpu.complete_pending_io().unwrap();
    assert_eq!(g.regs().rip, rip, "left for run, with its write");
    let s = EmuVcpuState::try_from(&g.vcpu.save_state().unwrap()).unwrap();
    assert!(s.pending_read.is_some());
    assert_eq!(
        g.run(),
        Ex::MmioWrite(0xfed0_0000, 42u32.to_le_bytes().to_vec())
    );
    run_to_halt(&mut g);
    assert_eq!(g.ram[OUT as usize], 0x60);
}

/// `KVM_HC_KICK_CPU` (RAX 5, RBX flags, RCX the target's APIC ID).
fn pv_kick(a: &mut CodeAssembler, apic_id: u32) -> Result<(), IcedError> {
    a.mov(eax, 5)?;
    a.xor(ebx, ebx)?;
    a.mov(ecx, apic_id)?;
    a.vmcall()
}

#[test]
fn a_pv_kick_before_the_hlt_ends_it_once() {
    let mut g = pc_guest(2);
    g.load_code(&asm_at(CODE, |a| {
        // The kick comes first (here from the vCPU itself): the HLT after
        // it, with interrupts off, completes at once and uses it up.
        pv_kick(a, 0)?;
        a.mov(qword_ptr(OUT as i32), rax)?;
        a.cli()?;
        a.hlt()?;
        a.mov(dword_ptr(OUT as i32 + 8), 1)?;
        // No kick left: this one stays halted.
        a.hlt()?;
        a.mov(dword_ptr(OUT as i32 + 8), 2)
    }));
    run_to_halt(&mut g);
    assert_eq!(g.r64(OUT), 0, "KVM_HC_KICK_CPU answers 0");
    assert_eq!(
        g.r32(OUT + 8),
        1,
        "the first HLT completed, the second did not"
    );
    let s = EmuVcpuState::try_from(&g.vcpu.save_state().unwrap()).unwrap();
    assert!(s.halted && !s.pv_unhalted, "{s:?}");
}

#[test]
fn pv_kicks_wake_a_vcpu_halted_with_interrupts_off() {
    const AP_CODE: u64 = CODE + 0x1000;
    const ROUNDS: u32 = 300;
    // AP: count, HLT with IF=0, until the count passes ROUNDS. Only a
    // paravirtual kick ends those HLTs; one lost leaves it halted for
    // good and the BSP's bounded wait falls through with the count short.
    let mut g = pc_guest(2);
    // Wait (bounded) until the count reaches `value`; on time-out go to
    // `out` (the end).
    let wait_for =
        |a: &mut CodeAssembler, value: AsmRegister32, out: CodeLabel| -> Result<(), IcedError> {
            let mut lp = a.create_label();
            let mut done = a.create_label();
            a.mov(ecx, 2_000_000_000)?;
            a.set_label(&mut lp)?;
            a.cmp(dword_ptr(COUNTS as i32), value)?;
            a.jae(done)?;
            a.pause()?;
            a.dec(ecx)?;
            a.jnz(lp)?;
            a.jmp(out)?;
            a.set_label(&mut done)?;
            Ok(())
        };
    g.load_code(&asm_at(CODE, |a| {
        let mut round = a.create_label();
        let mut out = a.create_label();
        a.mov(r8d, 1)?;
        a.set_label(&mut round)?;
        wait_for(a, r8d, out)?;
        // Mostly let the AP fall asleep first; a kick before its HLT must
        // work as well.
        let mut spin = a.create_label();
        a.mov(ecx, 20_000)?;
        a.set_label(&mut spin)?;
        a.dec(ecx)?;
        a.jnz(spin)?;
        pv_kick(a, 1)?;
        a.inc(r8d)?;
        a.cmp(r8d, ROUNDS + 1)?;
        a.jbe(round)?;
        wait_for(a, r8d, out)?;
        a.nop()?;
        a.set_label(&mut out)?;
        a.hlt()
    }));
    g.write(
        AP_CODE,
        &asm_at(AP_CODE, |a| {
            let mut lp = a.create_label();
            a.cli()?;
            a.set_label(&mut lp)?;
            a.lock().inc(dword_ptr(COUNTS as i32))?;
            a.hlt()?;
            a.cmp(dword_ptr(COUNTS as i32), ROUNDS)?;
            a.jbe(lp)?;
            a.lock().inc(dword_ptr(COUNTS as i32))?;
            a.hlt()
        }),
    );
    // A HLT with IF=0 goes to the VMM after a while without a kick (a
    // loaded host may delay one): the AP runs again, as the VMM does,
    // until the BSP is done. The BSP waits (bounded) for the AP's last
    // count, so no grace is needed after it.
    let ap = long_mode_ap(&g, AP_CODE);
    let (e, sleeps) = run_bsp_and_ap(&mut g, ap, true, Duration::ZERO, |ap| {
        ap.core().platform.sleeps()
    });
    assert!(e == "Halt" || e == "Interrupted", "AP: {e}");
    // One count per round, plus the AP's last: no kick was lost.
    assert_eq!(g.r32(COUNTS), ROUNDS + 2, "AP halts ended by kicks");
    // It slept in those HLTs (a vCPU that spun would not count sleeps).
    assert!(sleeps > 0, "{sleeps} sleeps");
}

#[test]
fn a_pending_pv_kick_survives_a_snapshot() {
    let mut g = pc_guest(1);
    g.load_code(&asm_at(CODE, |a| {
        pv_kick(a, 0)?;
        // Stop here with the kick pending (an exit to the VMM).
        a.out(0x80, al)?;
        a.cli()?;
        a.hlt()?;
        a.mov(dword_ptr(OUT as i32), 1)?;
        a.hlt()
    }));
    assert_eq!(g.run(), Ex::IoOut(0x80, vec![0]));
    let vcpu = g.vcpu.save_state().unwrap();
    let vm = g.vm.save_state().unwrap();
    let vcpu: hypervisor::VcpuSnapshot =
        serde_json::from_str(&serde_json::to_string(&vcpu).unwrap()).unwrap();
    assert!(EmuVcpuState::try_from(&vcpu).unwrap().pv_unhalted);
    let mut h = pc_guest(1);
    h.ram.copy_from_slice(&g.ram);
    drop(g);
    h.vcpu.restore_state(&vcpu).unwrap();
    h.vm.restore_state(&vm).unwrap();
    run_to_halt(&mut h);
    assert_eq!(h.r32(OUT), 1, "the restored kick ended the first HLT");
    let s = EmuVcpuState::try_from(&h.vcpu.save_state().unwrap()).unwrap();
    assert!(s.halted && !s.pv_unhalted);
}
