//! 64-bit integer core: programs run on the engine, results checked.

mod common;

use common::*;
use hypervisor::Vcpu;
use iced_x86::code_asm::*;

fn guest() -> Guest {
    let mut g = Guest::new(16 << 20);
    g.long_mode();
    g
}

/// 512 distinct words at `DATA` (word `i` is a multiple of `i + salt`).
fn fill_data(g: &mut Guest, salt: u64) {
    for i in 0..512u64 {
        g.w64(
            DATA + i * 8,
            0x9e37_79b9_7f4a_7c15u64.wrapping_mul(i + salt),
        );
    }
}

/// [`guest`] with the translator's threshold `jit` (None: interpret only,
/// `Some(0)`: translate every block), for the differential tests.
fn guest_at(jit: Option<u32>) -> Guest {
    let mut g = guest();
    g.vcpu.core_mut().jit.threshold = jit;
    g
}

#[test]
fn sum_loop_and_call() {
    let mut g = guest();
    let code = asm64!(|a| {
        let mut lp = a.create_label();
        let mut f = a.create_label();
        a.xor(eax, eax)?;
        a.mov(ecx, 100)?;
        a.set_label(&mut lp)?;
        a.add(rax, rcx)?;
        a.dec(ecx)?;
        a.jnz(lp)?;
        a.call(f)?;
        a.hlt()?;
        a.set_label(&mut f)?;
        a.mov(rbx, 0x1122_3344_5566_7788u64)?;
        a.ret()?;
    });
    g.load_code(&code);
    g.run_to_halt();
    let r = g.regs();
    assert_eq!(r.rax, 5050);
    assert_eq!(r.rcx, 0);
    assert_eq!(r.rbx, 0x1122_3344_5566_7788);
    assert_eq!(r.rsp, STACK_TOP);
}

#[test]
fn partial_register_writes() {
    let mut g = guest();
    let code = asm64!(|a| {
        a.mov(rax, -1i64)?;
        a.mov(al, 0x12)?;
        a.mov(ah, 0x34)?;
        a.mov(rbx, -1i64)?;
        a.mov(bx, 0x5678)?;
        a.mov(rcx, -1i64)?;
        a.mov(ecx, 0x9abc)?;
        a.mov(rsi, -1i64)?;
        a.mov(sil, 0)?;
        a.hlt()?;
    });
    g.load_code(&code);
    g.run_to_halt();
    let r = g.regs();
    assert_eq!(r.rax, 0xffff_ffff_ffff_3412);
    assert_eq!(r.rbx, 0xffff_ffff_ffff_5678);
    assert_eq!(r.rcx, 0x9abc);
    assert_eq!(r.rsi, 0xffff_ffff_ffff_ff00);
}

#[test]
fn memory_and_string_ops() {
    let mut g = guest();
    for i in 0..64u8 {
        g.write(DATA + i as u64, &[i]);
    }
    let code = asm64!(|a| {
        a.cld()?;
        a.mov(rsi, DATA)?;
        a.mov(rdi, DATA + 0x1000)?;
        a.mov(ecx, 64)?;
        a.rep().movsb()?;
        a.mov(rdi, DATA + 0x2000)?;
        a.mov(rax, 0x0101_0101_0101_0101u64)?;
        a.mov(ecx, 4)?;
        a.rep().stosq()?;
        // Find byte 0x20 in the copy.
        a.mov(rdi, DATA + 0x1000)?;
        a.mov(al, 0x20)?;
        a.mov(ecx, 64)?;
        a.repne().scasb()?;
        a.mov(rdx, rdi)?;
        a.hlt()?;
    });
    g.load_code(&code);
    g.run_to_halt();
    for i in 0..64u8 {
        assert_eq!(g.r8(DATA + 0x1000 + i as u64), i);
    }
    for i in 0..4 {
        assert_eq!(g.r64(DATA + 0x2000 + i * 8), 0x0101_0101_0101_0101);
    }
    assert_eq!(g.r64(DATA + 0x2020), 0);
    let r = g.regs();
    assert_eq!(r.rdx, DATA + 0x1000 + 0x21);
    assert_eq!(r.rcx, 64 - 0x21);
}

#[test]
fn mul_div_and_divide_error() {
    let mut g = guest();
    let code = asm64!(|a| {
        a.mov(rax, 0xffff_ffff_ffff_ffffu64)?;
        a.mov(rbx, 2u64)?;
        a.mul(rbx)?;
        a.mov(r8, rax)?;
        a.mov(r9, rdx)?;
        a.mov(rax, 100u64)?;
        a.xor(edx, edx)?;
        a.mov(rcx, 7u64)?;
        a.div(rcx)?;
        a.mov(r10, rax)?;
        a.mov(r11, rdx)?;
        a.xor(ecx, ecx)?;
        a.div(rcx)?;
        a.hlt()?;
    });
    g.load_code(&code);
    g.run_to_halt();
    let r = g.regs();
    assert_eq!(r.r8, 0xffff_ffff_ffff_fffe);
    assert_eq!(r.r9, 1);
    assert_eq!(r.r10, 14);
    assert_eq!(r.r11, 2);
    // #DE went to the vector-0 stub; the frame's RIP is the DIV.
    assert_eq!(r.rax, 0);
    assert_eq!(r.rip, STUBS + 6);
    let frame_rip = g.r64(r.rsp);
    assert_eq!(g.r8(frame_rip), 0x48, "points at the faulting div");
}

#[test]
fn ud2_and_gp_go_through_idt() {
    let mut g = guest();
    g.load_code(&asm64!(|a| {
        a.ud2()?;
    }));
    g.run_to_halt();
    assert_eq!(g.regs().rax, 6);
    assert_eq!(g.r64(g.regs().rsp), CODE);

    let mut g = guest();
    // Non-canonical access: #GP(0) with an error code on the stack.
    g.load_code(&asm64!(|a| {
        a.mov(rbx, 0x8000_0000_0000_0000u64)?;
        a.mov(rax, qword_ptr(rbx))?;
    }));
    g.run_to_halt();
    let r = g.regs();
    assert_eq!(r.rax, 13);
    assert_eq!(g.r64(r.rsp), 0, "error code");
    assert_eq!(g.r64(r.rsp + 8), CODE + 10, "RIP of the faulting mov");
    assert_eq!(g.r64(r.rsp + 16), SEL_CODE64 as u64);
}

#[test]
fn port_io_exits() {
    let mut g = guest();
    g.load_code(&asm64!(|a| {
        a.mov(al, 0x41)?;
        a.out(0xe9, al)?;
        a.mov(dx, 0x3f8)?;
        a.mov(eax, 0x1234_5678)?;
        a.out(dx, eax)?;
        a.in_(al, dx)?;
        a.mov(ebx, eax)?;
        a.hlt()?;
    }));
    assert_eq!(g.run(), Ex::IoOut(0xe9, vec![0x41]));
    assert_eq!(g.run(), Ex::IoOut(0x3f8, vec![0x78, 0x56, 0x34, 0x12]));
    assert_eq!(g.run_io(0x99), Ex::IoIn(0x3f8, 1));
    assert_eq!(g.run(), Ex::Halt);
    assert_eq!(g.regs().rbx, 0x1234_5699);
}

#[test]
fn mmio_exits_for_unmapped_physical_memory() {
    let mut g = guest();
    // 0xd0000000 is outside RAM; map it through the 1 GiB region? Use a
    // 4 KiB PTE pointing at a physical address beyond RAM instead.
    g.w64(PT + 8 * 5, 0xfee0_0000 | 3);
    g.load_code(&asm64!(|a| {
        a.mov(rbx, 0x405000u64)?;
        a.mov(dword_ptr(rbx + 0x30), 0xabcd)?;
        a.mov(eax, dword_ptr(rbx + 0x20))?;
        a.add(dword_ptr(rbx + 0x40), 1)?;
        a.hlt()?;
    }));
    assert_eq!(g.run(), Ex::MmioWrite(0xfee0_0030, vec![0xcd, 0xab, 0, 0]));
    assert_eq!(g.run_io(0x55), Ex::MmioRead(0xfee0_0020, 4));
    // Read-modify-write: a read exit, then the write of the result.
    assert_eq!(g.run_io(41), Ex::MmioRead(0xfee0_0040, 4));
    assert_eq!(g.run(), Ex::MmioWrite(0xfee0_0040, vec![42, 0, 0, 0]));
    assert_eq!(g.run(), Ex::Halt);
    assert_eq!(g.regs().rax, 0x55);
}

#[test]
fn page_fault_error_codes_and_cr2() {
    // Not present, read.
    let mut g = guest();
    g.w64(PT + 8 * 7, 0);
    g.load_code(&asm64!(|a| {
        a.mov(rbx, 0x407008u64)?;
        a.mov(rax, qword_ptr(rbx))?;
    }));
    g.run_to_halt();
    assert_eq!(g.regs().rax, 14);
    assert_eq!(g.sregs().cr2, 0x407008);
    assert_eq!(g.r64(g.regs().rsp), 0);

    // Present, read-only, write with CR0.WP=1: P|W.
    let mut g = guest();
    g.w64(PT + 8 * 7, 0x407000 | 5);
    g.load_code(&asm64!(|a| {
        a.mov(rbx, 0x407010u64)?;
        a.mov(qword_ptr(rbx), rax)?;
    }));
    g.run_to_halt();
    assert_eq!(g.regs().rax, 14);
    assert_eq!(g.sregs().cr2, 0x407010);
    assert_eq!(g.r64(g.regs().rsp), 3);

    // NX: fetch from a no-execute page: P|I.
    let mut g = guest();
    g.w64(PT + 8 * 8, 0x408000 | 3 | (1 << 63));
    g.write(0x408000, &[0x90]);
    g.load_code(&asm64!(|a| {
        a.mov(rax, 0x408000u64)?;
        a.jmp(rax)?;
    }));
    g.run_to_halt();
    assert_eq!(g.regs().rax, 14);
    assert_eq!(g.sregs().cr2, 0x408000);
    assert_eq!(g.r64(g.regs().rsp), 0x11);
    assert_eq!(g.r64(g.regs().rsp + 8), 0x408000);
}

#[test]
fn accessed_and_dirty_bits() {
    let mut g = guest();
    g.w64(PT + 8 * 9, 0x409000 | 3);
    g.w64(PT + 8 * 10, 0x40a000 | 3);
    g.load_code(&asm64!(|a| {
        a.mov(rbx, 0x409000u64)?;
        a.mov(rax, qword_ptr(rbx))?;
        a.mov(rbx, 0x40a000u64)?;
        a.mov(qword_ptr(rbx), rax)?;
        a.hlt()?;
    }));
    g.run_to_halt();
    let a = 1 << 5;
    let d = 1 << 6;
    assert_eq!(g.r64(PT + 8 * 9) & (a | d), a);
    assert_eq!(g.r64(PT + 8 * 10) & (a | d), a | d);
    assert_ne!(g.r64(PD + 16) & a, 0);
    assert_ne!(g.r64(PML4) & a, 0);
}

#[test]
fn tlb_honours_invlpg_and_cr3() {
    let mut g = guest();
    g.w64(PT + 8 * 11, 0x40b000 | 3);
    g.w64(0x40b000, 111);
    g.w64(0x40c000, 222);
    g.load_code(&asm64!(|a| {
        a.mov(rbx, 0x40b000u64)?;
        a.mov(rax, qword_ptr(rbx))?;
        // Remap the page to 0x40c000 in the page table.
        a.mov(rcx, PT + 8 * 11)?;
        a.mov(rdx, 0x40c003u64)?;
        a.mov(qword_ptr(rcx), rdx)?;
        // Stale TLB entry still used (as on hardware without a flush).
        a.mov(rsi, qword_ptr(rbx))?;
        a.invlpg(byte_ptr(rbx))?;
        a.mov(rdi, qword_ptr(rbx))?;
        a.hlt()?;
    }));
    g.run_to_halt();
    let r = g.regs();
    assert_eq!(r.rax, 111);
    assert_eq!(r.rsi, 111);
    assert_eq!(r.rdi, 222);
}

#[test]
fn user_mode_syscall_round_trip() {
    let mut g = guest();
    // Kernel entry at CODE+0x800: record RCX/R11 and SYSRET back.
    let entry = CODE + 0x800;
    let kcode = {
        use iced_x86::code_asm::*;
        let mut a = CodeAssembler::new(64).unwrap();
        a.mov(r12, rcx).unwrap();
        a.mov(r13, r11).unwrap();
        a.add(r14, 1).unwrap();
        a.sysretq().unwrap();
        a.assemble(entry).unwrap()
    };
    g.write(entry, &kcode);
    // User code page (U=1 via the 2 MiB mappings which have U set).
    let user = 0x300000u64;
    let ucode = {
        let mut a = CodeAssembler::new(64).unwrap();
        a.mov(eax, 60).unwrap();
        a.syscall().unwrap();
        a.mov(r15, 0x77u64).unwrap();
        // A privileged instruction in ring 3 faults (#GP -> stub 13).
        a.hlt().unwrap();
        a.assemble(user).unwrap()
    };
    g.write(user, &ucode);
    g.load_code(&asm64!(|a| {
        enter_ring3(&mut a, entry, user)?;
    }));
    // GDT: STAR user base 0x18: CS = 0x18+16 = 0x28|3, SS = 0x18+8 = 0x20|3.
    g.run_to_halt();
    let r = g.regs();
    assert_eq!(r.r14, 1);
    assert_eq!(r.r12, user + 7, "RCX = return RIP");
    assert_eq!(r.r13 & 0x200, 0x200, "R11 = user RFLAGS");
    assert_eq!(r.r15, 0x77);
    assert_eq!(r.rax, 13, "HLT in ring 3 raised #GP");
    // The #GP frame came from ring 3: SS:RSP pushed, RSP from TSS.RSP0.
    assert_eq!(g.r64(r.rsp + 8), user + 7 + 10, "RIP of the HLT");
    assert_eq!(g.r64(r.rsp + 16), SEL_UCODE64 as u64);
    assert_eq!(g.r64(r.rsp + 32), 0x50000);
    assert_eq!(g.r64(r.rsp + 40), SEL_UDATA as u64);
    assert_eq!(r.rsp, 0x70000 - 48);
}

#[test]
fn triple_fault_shuts_down() {
    let mut g = guest();
    let mut s = g.sregs();
    s.idt.limit = 0;
    g.vcpu.set_sregs(&s).unwrap();
    g.load_code(&asm64!(|a| {
        a.ud2()?;
    }));
    assert_eq!(g.run(), Ex::Shutdown);
}

#[test]
fn double_fault_on_fault_during_pf_delivery() {
    let mut g = guest();
    // Vector 14's gate is not present: #PF -> #NP while delivering -> #DF.
    g.w64(IDT + 14 * 16, 0);
    g.w64(PT + 8 * 3, 0);
    g.load_code(&asm64!(|a| {
        a.mov(rbx, 0x403000u64)?;
        a.mov(rax, qword_ptr(rbx))?;
    }));
    g.run_to_halt();
    assert_eq!(g.regs().rax, 8);
    assert_eq!(g.r64(g.regs().rsp), 0, "#DF error code is 0");
}

#[test]
fn unimplemented_instruction_is_an_internal_error() {
    let mut g = guest();
    // DAA (in a 32-bit code segment) is not implemented, and the advertised
    // CPU has it, so it is an internal error naming its bytes; one the CPU
    // lacks (AESENC) raises #UD instead (tests/conformance.rs).
    const C32: u64 = CODE + 0x100;
    g.write(C32, &[0x27, 0xf4]);
    g.load_code(&asm64!(|a| {
        // Far return into the 32-bit code segment.
        a.push(SEL_CODE32 as i32)?;
        a.push(C32 as i32)?;
        a.db(&[0x48, 0xcb])?;
    }));
    match g.run() {
        Ex::Internal(s) => {
            assert!(s.contains("27 f4"), "{s}");
        }
        e => panic!("{e:?}"),
    }
}

#[test]
fn external_interrupt_respects_if_and_sti_shadow() {
    let mut g = guest();
    let intc = g.vm.interrupt_controller();
    g.load_code(&asm64!(|a| {
        a.mov(ebx, 1)?;
        a.sti()?;
        a.mov(ebx, 2)?;
        a.mov(ebx, 3)?;
        a.hlt()?;
    }));
    intc.trigger_gsi(0);
    // IF=0: the interrupt waits; after STI one more instruction runs.
    g.run_to_halt();
    let r = g.regs();
    assert_eq!(r.rax, 0x20, "vector 0x20 delivered");
    assert_eq!(r.rbx, 2, "the instruction after STI ran first");
    assert_eq!(g.r64(r.rsp), CODE + 5 + 1 + 5);
}

#[test]
fn self_modifying_code_is_seen() {
    let mut g = guest();
    g.load_code(&asm64!(|a| {
        let mut patch = a.create_label();
        a.mov(ecx, 2)?;
        let mut lp = a.create_label();
        a.set_label(&mut lp)?;
        a.lea(rbx, ptr(patch))?;
        a.set_label(&mut patch)?;
        a.mov(eax, 1)?;
        // Patch the immediate of the MOV above to 7, then run it again.
        a.mov(dword_ptr(rbx + 1), 7)?;
        a.dec(ecx)?;
        a.jnz(lp)?;
        a.hlt()?;
    }));
    g.run_to_halt();
    assert_eq!(g.regs().rax, 7);
}

#[test]
fn lock_xadd_is_atomic_across_vcpu_threads() {
    let mut g = guest();
    let code = asm64!(|a| {
        let mut lp = a.create_label();
        a.mov(rbx, DATA)?;
        a.mov(ecx, 20000)?;
        a.set_label(&mut lp)?;
        a.mov(eax, 1)?;
        a.lock().xadd(dword_ptr(rbx), eax)?;
        a.lock().inc(qword_ptr(rbx + 8))?;
        a.dec(ecx)?;
        a.jnz(lp)?;
        a.hlt()?;
    });
    g.load_code(&code);
    let mut second = g.vm.create_emu_vcpu(1);

    second.set_sregs(&g.sregs()).unwrap();
    let mut r = g.regs();
    r.rsp = 0x40000;
    second.set_regs(&r).unwrap();
    std::thread::scope(|s| {
        let h = s.spawn(move || {
            let e = second.run().map(|e| format!("{e:?}")).unwrap();
            assert_eq!(e, "Halt");
        });
        g.run_to_halt();
        h.join().unwrap();
    });
    assert_eq!(g.r32(DATA), 40000);
    assert_eq!(g.r64(DATA + 8), 40000);
}

#[test]
fn lar_lsl_verr() {
    let mut g = guest();
    g.load_code(&asm64!(|a| {
        a.mov(ecx, SEL_DATA as u32)?;
        a.lsl(eax, ecx)?;
        a.setz(r8b)?;
        a.mov(ecx, SEL_CODE64 as u32)?;
        a.lar(ebx, ecx)?;
        a.setz(r9b)?;
        a.xor(ecx, ecx)?;
        a.mov(edx, 0x5555)?;
        a.lsl(edx, ecx)?;
        a.setz(r10b)?;
        a.mov(ecx, SEL_CODE64 as u32)?;
        a.verw(cx)?;
        a.setz(r11b)?;
        a.hlt()?;
    }));
    g.run_to_halt();
    let r = g.regs();
    assert_eq!(r.rax, 0xffff_ffff);
    assert_eq!(r.r8 & 0xff, 1);
    assert_eq!(r.rbx, 0x00af_9b00);
    assert_eq!(r.r9 & 0xff, 1);
    assert_eq!(r.rdx, 0x5555, "null selector: destination unchanged");
    assert_eq!(r.r10 & 0xff, 0);
    assert_eq!(r.r11 & 0xff, 0, "code segments are not writable");
}

#[test]
fn fxsave_fxrstor_round_trip() {
    let mut g = guest();
    g.load_code(&asm64!(|a| {
        a.mov(rax, 0x1111_2222_3333_4444u64)?;
        a.movq(xmm3, rax)?;
        a.mov(rax, 0x5555u64)?;
        a.movq(xmm15, rax)?;
        a.fninit()?;
        a.fld1()?;
        a.mov(rbx, DATA)?;
        a.fxsave64(ptr(rbx))?;
        a.pxor(xmm3, xmm3)?;
        a.pxor(xmm15, xmm15)?;
        a.fninit()?;
        a.fxrstor64(ptr(rbx))?;
        a.movq(rcx, xmm3)?;
        a.movq(rdx, xmm15)?;
        a.fnstsw(ax)?;
        // Misaligned FXSAVE raises #GP.
        a.fxsave64(ptr(rbx + 8))?;
    }));
    g.run_to_halt();
    let r = g.regs();
    assert_eq!(r.rcx, 0x1111_2222_3333_4444);
    assert_eq!(r.rdx, 0x5555);
    assert_eq!(r.rax, 13, "#GP from the misaligned FXSAVE");
    assert_eq!(g.r32(DATA) & 0xffff, 0x37f, "FCW");
    assert_eq!(
        (g.r32(DATA) >> 16) & 0x3800,
        7 << 11,
        "TOP = 7 after one push"
    );
    assert_eq!(g.r8(DATA + 4), 0x80, "abridged tag: register 7 valid");
    assert_eq!(g.r32(DATA + 24), 0x1f80, "MXCSR");
    assert_eq!(g.r64(DATA + 32), 1 << 63, "ST0 = 1.0 (mantissa)");
    assert_eq!(g.r32(DATA + 40) & 0xffff, 0x3fff, "ST0 = 1.0 (exponent)");
    assert_eq!(g.r64(DATA + 160 + 3 * 16), 0x1111_2222_3333_4444);
}

#[test]
fn sse_requires_osfxsr_and_ts_raises_nm() {
    let mut g = guest();
    let mut s = g.sregs();
    s.cr4 &= !(1 << 9);
    g.vcpu.set_sregs(&s).unwrap();
    g.load_code(&asm64!(|a| {
        a.pxor(xmm0, xmm0)?;
    }));
    g.run_to_halt();
    assert_eq!(g.regs().rax, 6, "#UD without CR4.OSFXSR");

    let mut g = guest();
    let mut s = g.sregs();
    s.cr0 |= 1 << 3;
    g.vcpu.set_sregs(&s).unwrap();
    g.load_code(&asm64!(|a| {
        a.fninit()?;
    }));
    g.run_to_halt();
    assert_eq!(g.regs().rax, 7, "#NM with CR0.TS");
}

/// The same SSE faults from translated code (threshold 0: the translator
/// runs PXOR/MOVDQA inline behind a once-per-block CR0/CR4 guard and an
/// alignment check, reached with the TLB entry already filled): #UD without CR4.OSFXSR, #NM with CR0.TS, #GP for a
/// misaligned MOVDQA, and the aligned one completes.
#[test]
fn translated_sse_raises_ud_nm_and_gp() {
    for jit in [None, Some(0)] {
        let run = |cr0_or: u64, cr4_clear: u64, addr: u64| {
            let mut g = guest_at(jit);
            let mut s = g.sregs();
            s.cr0 |= cr0_or;
            s.cr4 &= !cr4_clear;
            g.vcpu.set_sregs(&s).unwrap();
            g.load_code(&asm64!(|a| {
                a.mov(rax, 0x55u64)?;
                a.mov(rsi, addr)?;
                // Fill the TLB entry so that MOVDQA takes the inline path.
                a.mov(rcx, qword_ptr(rsi))?;
                a.pxor(xmm1, xmm1)?;
                a.movdqa(xmm1, xmmword_ptr(rsi))?;
                a.mov(eax, 0x99)?;
                a.hlt()?;
            }));
            g.run_to_halt();
            g.regs().rax
        };
        assert_eq!(run(0, 1 << 9, DATA), 6, "#UD without CR4.OSFXSR ({jit:?})");
        assert_eq!(run(1 << 3, 0, DATA), 7, "#NM with CR0.TS ({jit:?})");
        assert_eq!(run(0, 0, DATA + 8), 13, "#GP misaligned ({jit:?})");
        assert_eq!(run(0, 0, DATA + 16), 0x99, "aligned completes ({jit:?})");
    }
}

#[test]
fn enter_and_leave_frames() {
    let mut g = guest();
    g.load_code(&asm64!(|a| {
        a.mov(rbp, 0x1234u64)?;
        a.push(rbp)?;
        a.mov(rbp, rsp)?;
        a.sub(rsp, 0x20)?;
        a.leave()?;
        a.mov(r8, rsp)?;
        a.mov(r9, rbp)?;
        a.enter(0x10, 0)?;
        a.mov(r10, rsp)?;
        a.leave()?;
        a.mov(r11, rsp)?;
        a.hlt()?;
    }));
    g.run_to_halt();
    let r = g.regs();
    assert_eq!(r.r8, STACK_TOP);
    assert_eq!(r.r9, 0x1234);
    assert_eq!(r.r10, STACK_TOP - 8 - 0x10);
    assert_eq!(r.r11, STACK_TOP);
    assert_eq!(r.rbp, 0x1234);
}

/// A controller that owns an APIC-like MSR, a fixed guest TSC and kvmclock.
struct MockPlatform;

impl emu::InterruptController for MockPlatform {
    fn trigger_gsi(&self, _gsi: u32) {}
    fn pending_vector(&self, _vcpu: u32) -> Option<u8> {
        None
    }
    fn ack(&self, _vcpu: u32, _vector: u8) -> Option<u8> {
        None
    }
    fn rdmsr(&self, _vcpu: u32, msr: u32) -> Option<Result<u64, emu::platform::irq::MsrFault>> {
        match msr {
            0x6e0 => Some(Ok(0x6e06e0)),
            0x8ff => Some(Err(emu::platform::irq::MsrFault)),
            _ => None,
        }
    }
    fn guest_tsc(&self) -> Option<u64> {
        Some(0x1234_5678_9abc)
    }
    fn pvclock_time_info(&self, _vcpu: u32) -> Option<[u8; 32]> {
        let mut b = [0u8; 32];
        for (i, x) in b.iter_mut().enumerate() {
            *x = i as u8 + 1;
        }
        Some(b)
    }
}

#[test]
fn platform_msrs_tsc_and_kvmclock() {
    let cfg = emu::cpuid::CpuidConfig {
        apic: true,
        kvm_clock: true,
        tsc_khz: 1_000_000,
        ..Default::default()
    };
    let mut g = Guest::with_platform(16 << 20, Some(std::sync::Arc::new(MockPlatform)), cfg);
    g.long_mode();
    g.load_code(&asm64!(|a| {
        a.mov(ecx, 0x6e0)?;
        a.rdmsr()?;
        a.mov(r8, rax)?;
        a.rdtsc()?;
        a.shl(rdx, 32)?;
        a.or(rax, rdx)?;
        a.mov(r9, rax)?;
        // Enable kvmclock at DATA.
        a.mov(ecx, 0x4b56_4d01)?;
        a.mov(eax, (DATA | 1) as u32)?;
        a.xor(edx, edx)?;
        a.wrmsr()?;
        a.mov(eax, 0x4000_0000)?;
        a.cpuid()?;
        a.mov(r10, rbx)?;
        // An MSR the platform refuses: #GP.
        a.mov(ecx, 0x8ff)?;
        a.rdmsr()?;
    }));
    g.run_to_halt();
    let r = g.regs();
    assert_eq!(r.r8, 0x6e06e0);
    assert_eq!(r.r9, 0x1234_5678_9abc);
    assert_eq!(
        r.r10,
        u32::from_le_bytes(*b"KVMK") as u64,
        "CPUID 0x40000000 EBX"
    );
    assert_eq!(g.r8(DATA), 1);
    assert_eq!(g.r8(DATA + 31), 32);
    assert_eq!(r.rax, 13);
}

/// A program with the shapes the translating tier compiles (a multi-limb
/// multiply-subtract loop with carries through memory, calls and returns,
/// PUSH/POP, SETcc/CMOVcc, shifts, a store into code that is hot) gives the same registers and memory
/// with every block translated on its first run as interpreted.
#[test]
fn translated_code_matches_the_interpreter() {
    const N: u64 = 48;
    let code = asm64!(|a| {
        let mut lp = a.create_label();
        let mut f = a.create_label();
        let mut calls = a.create_label();
        let mut smc = a.create_label();
        let mut skip = a.create_label();
        // rdi -= rsi * r8 over N limbs (mpihelp_submul_1's shape).
        a.mov(rsi, DATA)?;
        a.mov(rdi, DATA + 0x1000)?;
        a.mov(r8, 0x9e37_79b9_7f4a_7c15u64)?;
        a.xor(r9d, r9d)?;
        a.mov(rcx, -(N as i64))?;
        a.lea(rsi, qword_ptr(rsi + N * 8))?;
        a.lea(rdi, qword_ptr(rdi + N * 8))?;
        a.set_label(&mut lp)?;
        a.mov(rax, qword_ptr(rsi + rcx * 8))?;
        a.mul(r8)?;
        a.add(rax, r9)?;
        a.adc(rdx, 0)?;
        a.mov(r10, qword_ptr(rdi + rcx * 8))?;
        a.sub(r10, rax)?;
        a.adc(rdx, 0)?;
        a.mov(qword_ptr(rdi + rcx * 8), r10)?;
        a.mov(r9, rdx)?;
        a.inc(rcx)?;
        a.jnz(lp)?;
        // 200 calls: flags across PUSH/POP, SETcc, CMOVcc, shifts.
        a.mov(ebx, 200)?;
        a.xor(r11d, r11d)?;
        a.set_label(&mut calls)?;
        a.call(f)?;
        a.dec(ebx)?;
        a.jnz(calls)?;
        // A hot loop whose own immediate is patched halfway.
        a.mov(ecx, 100)?;
        a.xor(r12d, r12d)?;
        a.set_label(&mut smc)?;
        a.mov(eax, 1)?;
        a.add(r12, rax)?;
        a.cmp(ecx, 50)?;
        a.jne(skip)?;
        a.lea(rdx, ptr(smc))?;
        a.mov(dword_ptr(rdx + 1), 1000)?;
        a.set_label(&mut skip)?;
        a.dec(ecx)?;
        a.jnz(smc)?;
        a.hlt()?;
        a.set_label(&mut f)?;
        a.push(rbx)?;
        a.mov(rax, rbx)?;
        a.imul_3(rax, rax, 0x1234_5679)?;
        a.shl(rax, 7)?;
        a.sar(rax, 3)?;
        a.xor(rax, r11)?;
        a.test(al, 0x10)?;
        a.setnz(dl)?;
        a.movzx(edx, dl)?;
        a.cmovs(r11, rax)?;
        a.add(r11, rdx)?;
        a.sub(r11d, ebx)?;
        a.sbb(r11, 3)?;
        a.neg(r11)?;
        a.pop(rbx)?;
        a.ret()?;
    });
    let run = |jit: Option<u32>| {
        let mut g = guest_at(jit);
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for i in 0..2 * N {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let base = if i < N { DATA } else { DATA + 0x1000 - N * 8 };
            g.w64(base + i * 8, x);
        }
        g.load_code(&code);
        g.run_to_halt();
        let mem: Vec<u64> = (0..N).map(|i| g.r64(DATA + 0x1000 + i * 8)).collect();
        (g.regs(), mem, g.vcpu.core().jit.compiled)
    };
    let (ri, mi, _) = run(None);
    let (rj, mj, compiled) = run(Some(0));
    assert!(compiled > 5, "{compiled} blocks translated");
    assert_eq!(mi, mj, "limbs");
    assert_eq!(format!("{ri:x?}"), format!("{rj:x?}"), "registers");
    assert_eq!(ri.r12, 51 + 49 * 1000, "the patched loop ran the new code");
}

/// REP MOVSB whose destination starts inside its source replicates the
/// first bytes (element order), and REP STOSQ across a page boundary fills
/// both pages, with the page-at-a-time copy as with single elements.
#[test]
fn rep_movs_and_stos_keep_element_semantics_across_pages() {
    let mut g = guest();
    for i in 0..0x2000u64 {
        g.ram[(DATA + i) as usize] = (i * 7) as u8;
    }
    g.load_code(&asm64!(|a| {
        a.mov(rsi, DATA)?;
        a.lea(rdi, qword_ptr(rsi + 3))?;
        a.mov(ecx, 0x1800)?;
        a.rep().movsb()?;
        a.mov(rdi, DATA + 0x3f04)?;
        a.mov(rax, 0x1122_3344_5566_7788u64)?;
        a.mov(ecx, 0x40)?;
        a.rep().stosq()?;
        a.hlt()?;
    }));
    g.run_to_halt();
    let r = g.regs();
    for i in 0..0x1803u64 {
        assert_eq!(g.r8(DATA + i), ((i % 3) * 7) as u8, "byte {i:#x}");
    }
    assert_eq!(g.r8(DATA + 0x1803), (0x1803u64 * 7) as u8);
    for i in 0..0x40u64 {
        assert_eq!(g.r64(DATA + 0x3f04 + i * 8), 0x1122_3344_5566_7788);
    }
    assert_eq!(r.rsi, DATA + 0x1800);
    assert_eq!(r.rdi, DATA + 0x3f04 + 0x200);
    assert_eq!(r.rcx, 0);
}

/// Two address spaces that map the same virtual code page to different
/// physical code, switched by CR3 at every iteration, with a page shared by
/// both (global, so its TLB entry survives the switch) and a hot block
/// patched through an alias while the other space runs: translated at
/// threshold 0 the results equal the interpreter's, so no link (static,
/// CALL/RET, or across pages) leads into the other space's code or into
/// code that was overwritten.
#[test]
fn links_follow_cr3_switches_and_code_writes() {
    // Space A is the harness's; space B is a copy whose page table maps
    // V to X2 instead of X1 and has an alias of X1 at ALIAS.
    const PML4_B: u64 = 0x14000;
    const PDPT_B: u64 = 0x15000;
    const PD_B: u64 = 0x16000;
    const PT_B: u64 = 0x17000;
    const V: u64 = 0x405000;
    const X2: u64 = 0x406000;
    const SHARED: u64 = 0x407000;
    const ALIAS: u64 = 0x408000;
    const IMM_A: u32 = 0x1_0001;
    const IMM_A2: u32 = 0x7_0007;
    const IMM_B: u32 = 0x30_0003;
    // `add r12, imm32` then `jmp SHARED`, assembled at V.
    let at_v = |imm: u32| {
        let mut a = CodeAssembler::new(64).unwrap();
        a.add(r12, imm as i32).unwrap();
        a.jmp(SHARED).unwrap();
        let b = a.assemble(V).unwrap();
        assert_eq!(&b[..3], &[0x49, 0x81, 0xc4], "add r12, imm32");
        b
    };
    let shared = {
        let mut a = CodeAssembler::new(64).unwrap();
        a.add(r13, r12).unwrap();
        a.ret().unwrap();
        a.assemble(SHARED).unwrap()
    };
    let code = asm64!(|a| {
        let mut lp = a.create_label();
        let mut no_patch = a.create_label();
        a.mov(ecx, 64)?;
        a.set_label(&mut lp)?;
        // Odd iterations in space B, even ones in A.
        a.mov(rax, PML4)?;
        a.mov(rdx, PML4_B)?;
        a.test(ecx, 1)?;
        a.cmovnz(rax, rdx)?;
        a.mov(cr3, rax)?;
        // A data read of V fills its TLB entry for this space first.
        a.mov(rdx, qword_ptr(V))?;
        a.add(r14, rdx)?;
        a.cmp(ecx, 41)?;
        a.jne(no_patch)?;
        // In space B: patch space A's code at V through the alias.
        a.mov(dword_ptr(ALIAS + 3), IMM_A2)?;
        a.set_label(&mut no_patch)?;
        a.call(V)?;
        a.dec(ecx)?;
        a.jnz(lp)?;
        a.hlt()?;
    });
    let run = |jit: Option<u32>| {
        let mut g = guest_at(jit);
        // The first 2 MiB (code, stack, tables) global in both spaces.
        g.w64(PD, g.r64(PD) | 0x100);
        for i in 0..512u64 {
            g.w64(PD_B + i * 8, g.r64(PD + i * 8));
            g.w64(PT_B + i * 8, g.r64(PT + i * 8));
        }
        g.w64(PML4_B, PDPT_B | 7);
        g.w64(PDPT_B, PD_B | 7);
        g.w64(PD_B + 2 * 8, PT_B | 7);
        g.w64(PT_B + 8 * ((V - 0x400000) >> 12), X2 | 7);
        g.w64(PT_B + 8 * ((ALIAS - 0x400000) >> 12), V | 7);
        g.write(V, &at_v(IMM_A));
        g.write(X2, &at_v(IMM_B));
        g.write(SHARED, &shared);
        let mut s = g.sregs();
        s.cr4 |= 1 << 7; // PGE
        g.vcpu.set_sregs(&s).unwrap();
        g.load_code(&code);
        g.run_to_halt();
        (g.regs(), g.vcpu.core().jit.compiled)
    };
    let (ri, _) = run(None);
    let (rj, compiled) = run(Some(0));
    assert!(compiled >= 4, "{compiled} blocks translated");
    assert_eq!(format!("{ri:x?}"), format!("{rj:x?}"), "registers");
    // A runs at even counts: 64..42 with the old immediate, 40..2 with the
    // patched one; B at the 32 odd counts.
    let want = 12 * IMM_A as u64 + 20 * IMM_A2 as u64 + 32 * IMM_B as u64;
    assert_eq!(
        ri.r12, want,
        "each space ran its own code, the patch was seen"
    );
}

/// INVLPG of the page a hot loop calls into, after remapping it to other
/// code, takes effect at the next call in translated code as in the
/// interpreter (a link made before the INVLPG is not followed into the
/// old page's code).
#[test]
fn links_follow_invlpg_remaps() {
    const V: u64 = 0x405000;
    const X2: u64 = 0x406000;
    let at = |base: u64, imm: i32| {
        let mut a = CodeAssembler::new(64).unwrap();
        a.add(r12, imm).unwrap();
        a.ret().unwrap();
        a.assemble(base).unwrap()
    };
    let pte = PT + 8 * ((V - 0x400000) >> 12);
    let code = asm64!(|a| {
        let mut lp = a.create_label();
        let mut same = a.create_label();
        a.mov(ecx, 40)?;
        a.set_label(&mut lp)?;
        a.cmp(ecx, 20)?;
        a.jne(same)?;
        a.mov(rax, X2 | 3)?;
        a.mov(qword_ptr(pte), rax)?;
        a.invlpg(byte_ptr(V))?;
        a.set_label(&mut same)?;
        a.call(V)?;
        a.dec(ecx)?;
        a.jnz(lp)?;
        a.hlt()?;
    });
    let run = |jit: Option<u32>| {
        let mut g = guest_at(jit);
        g.write(V, &at(V, 0x100));
        g.write(X2, &at(V, 0x10000));
        g.load_code(&code);
        g.run_to_halt();
        g.regs()
    };
    let ri = run(None);
    let rj = run(Some(0));
    assert_eq!(format!("{ri:x?}"), format!("{rj:x?}"), "registers");
    assert_eq!(ri.r12, 20 * 0x100 + 20 * 0x10000);
}

/// Patched jumps between translations (see `emu::jit::runtime`): a CALL
/// into another page (a keyed site) and a JMP inside that page (a direct
/// one, no key check) are followed straight into the successors' code.
/// When the guest rewrites the called page while the caller's code stays
/// valid, the caller's patched jump leads into code that was overwritten:
/// its entry check sends it back to the dispatcher, which links (patches)
/// the jump again to the new translation. After a cache flush (as a
/// snapshot restore or a memory-map change does) nothing patched before
/// is followed: the code the host wrote meanwhile runs. At threshold 0
/// registers and instruction counts equal the interpreter's.
#[test]
fn patched_links_follow_code_writes_and_cache_flushes() {
    const L: u64 = 0x406000;
    const B: u64 = L + 0x80;
    // At L: `add r12, 1; jmp B`; at B: `mov eax, imm32; add r13, rax; ret`.
    let callee = |imm: u32| {
        let mut a = CodeAssembler::new(64).unwrap();
        a.add(r12, 1).unwrap();
        a.jmp(B).unwrap();
        let mut code = a.assemble(L).unwrap();
        code.resize((B - L) as usize, 0xcc);
        let mut a = CodeAssembler::new(64).unwrap();
        a.mov(eax, imm).unwrap();
        a.add(r13, rax).unwrap();
        a.ret().unwrap();
        code.extend(a.assemble(B).unwrap());
        assert_eq!(code[0x80], 0xb8, "mov eax, imm32 at B");
        code
    };
    let code = asm64!(|a| {
        let mut lp = a.create_label();
        let mut skip = a.create_label();
        a.mov(ecx, 100)?;
        a.set_label(&mut lp)?;
        a.call(L)?;
        a.cmp(ecx, 50)?;
        a.jne(skip)?;
        a.mov(dword_ptr(B + 1), 1000)?;
        a.set_label(&mut skip)?;
        a.dec(ecx)?;
        a.jnz(lp)?;
        a.hlt()?;
    });
    let run = |jit: Option<u32>| {
        let mut g = guest_at(jit);
        g.write(L, &callee(1));
        g.load_code(&code);
        g.run_to_halt();
        let first = (g.regs(), g.vcpu.core().icount);
        // The host rewrites the callee behind the engine's back, then
        // flushes its caches, and the program runs again.
        g.write(L, &callee(7));
        g.vcpu.core_mut().flush_all_caches();
        let mut r = g.regs();
        r.rip = CODE;
        r.r12 = 0;
        r.r13 = 0;
        g.set_regs(&r);
        g.run_to_halt();
        (
            first,
            (g.regs(), g.vcpu.core().icount),
            g.vcpu.core().jit.compiled,
        )
    };
    let (i1, i2, _) = run(None);
    let (j1, j2, compiled) = run(Some(0));
    assert!(compiled >= 6, "{compiled} blocks translated");
    for ((ri, ni), (rj, nj)) in [(i1, j1), (i2, j2)] {
        assert_eq!(format!("{ri:x?}"), format!("{rj:x?}"), "registers");
        assert_eq!(ni, nj, "instructions retired");
    }
    assert_eq!(i1.0.r12, 100);
    // Iterations 100..=50 ran the first immediate, 49..=1 the written one.
    assert_eq!(i1.0.r13, 51 + 49 * 1000);
    assert_eq!(i2.0.r13, 51 * 7 + 49 * 1000);
}

/// Blocks whose last branch goes back to their own start loop inside their
/// translation (cached registers and flags kept). At threshold 0 the
/// results, flags and instruction counts equal the interpreter's: a loop
/// over memory with a flag carried across iterations (ADC), a loop whose
/// taken side is the fall-through of another, and a loop that rewrites its
/// own immediate every iteration (each write ends the block, so every
/// iteration runs the newly written code).
#[test]
fn self_loops_match_the_interpreter() {
    const L: u64 = 0x406000;
    const N: u32 = 50;
    const IMM0: u32 = 0x1000;
    // At L: `add r13, imm32; mov [L+3], ecx; dec ecx; jnz L; ret`.
    let patcher = {
        let mut a = CodeAssembler::new(64).unwrap();
        let mut lp = a.create_label();
        a.set_label(&mut lp).unwrap();
        a.add(r13, IMM0 as i32).unwrap();
        a.mov(dword_ptr(L + 3), ecx).unwrap();
        a.dec(ecx).unwrap();
        a.jnz(lp).unwrap();
        a.ret().unwrap();
        let b = a.assemble(L).unwrap();
        assert_eq!(&b[..3], &[0x49, 0x81, 0xc5], "add r13, imm32");
        b
    };
    let code = asm64!(|a| {
        let mut sum = a.create_label();
        let mut count = a.create_label();
        // ADC chain over 512 qwords: CF carried from one iteration to the
        // next through the block's own flag image.
        a.mov(rsi, DATA)?;
        a.mov(ecx, 512)?;
        a.xor(eax, eax)?;
        a.xor(edx, edx)?;
        a.clc()?;
        a.set_label(&mut sum)?;
        a.adc(rax, qword_ptr(rsi))?;
        a.lea(rsi, qword_ptr(rsi + 8))?;
        a.adc(rdx, 0)?;
        a.dec(ecx)?;
        a.jnz(sum)?;
        a.mov(r8, rax)?;
        a.mov(r9, rdx)?;
        // A countdown with the flags of its last compare left behind.
        a.mov(ecx, 1000)?;
        a.xor(ebx, ebx)?;
        a.set_label(&mut count)?;
        a.add(rbx, rcx)?;
        a.sub(ecx, 1)?;
        a.cmp(ecx, 0)?;
        a.jg(count)?;
        a.pushfq()?;
        a.pop(r10)?;
        a.mov(ecx, N)?;
        a.xor(r13d, r13d)?;
        a.call(L)?;
        a.hlt()?;
    });
    let run = |jit: Option<u32>| {
        let mut g = guest_at(jit);
        fill_data(&mut g, 1);
        g.write(L, &patcher);
        g.load_code(&code);
        g.run_to_halt();
        (g.regs(), g.vcpu.core_mut().icount)
    };
    let (ri, ni) = run(None);
    let (rj, nj) = run(Some(0));
    assert_eq!(format!("{ri:x?}"), format!("{rj:x?}"), "registers");
    assert_eq!(ni, nj, "instructions retired");
    assert_eq!(ri.rbx, 1000 * 1001 / 2);
    // The first iteration adds IMM0, each later one what the one before
    // wrote (its ECX: N down to 2).
    assert_eq!(ri.r13, IMM0 as u64 + (2..=N as u64).sum::<u64>());
}

/// The forms the translator runs as host instructions on host addresses
/// (REP MOVS/STOS, LOCK read-modify-writes, BT with a register offset,
/// DIV), where their operands leave the inline path: page crossings, DF=1,
/// a count beyond the page, faults in the middle of a REP, a divide error.
/// Translated at threshold 0, every run ends as the interpreter's does
/// (registers, CR2, memory).
#[test]
fn translated_rmw_string_and_div_edges_match_the_interpreter() {
    // 0x406000..0x408000 is 4 KiB-mapped; 0x407000 is made not present
    // for the fault cases.
    const P: u64 = 0x406000;
    let programs: Vec<(&str, Vec<u8>, bool)> = vec![
        (
            "rep movs/stos within and across pages, DF=1",
            asm64!(|a| {
                a.cld()?;
                // clear_page and copy_page shapes.
                a.mov(rdi, DATA + 0x1000)?;
                a.mov(rax, 0x0102_0304_0506_0708u64)?;
                a.mov(ecx, 512)?;
                a.rep().stosq()?;
                a.mov(rsi, DATA)?;
                a.mov(rdi, DATA + 0x2000)?;
                a.mov(ecx, 512)?;
                a.rep().movsq()?;
                // Source and destination across page ends.
                a.mov(rsi, DATA + 0xff0)?;
                a.mov(rdi, DATA + 0x3008)?;
                a.mov(ecx, 0x40)?;
                a.rep().movsb()?;
                a.mov(rsi, DATA + 0x100)?;
                a.mov(rdi, DATA + 0x3ffc)?;
                a.mov(ecx, 3)?;
                a.rep().movsd()?;
                // More than a page.
                a.mov(rdi, DATA + 0x4010)?;
                a.mov(ecx, 0x1234)?;
                a.mov(al, 0x5a)?;
                a.rep().stosb()?;
                // Backwards.
                a.std()?;
                a.mov(rsi, DATA + 0x2ff8)?;
                a.mov(rdi, DATA + 0x6ff8)?;
                a.mov(ecx, 9)?;
                a.rep().movsq()?;
                a.cld()?;
                // A count of zero touches nothing.
                a.mov(rdi, 0x407000u64)?;
                a.xor(ecx, ecx)?;
                a.rep().stosb()?;
                a.hlt()?;
            }),
            false,
        ),
        (
            "rep stosb faults in the middle (destination page not present)",
            asm64!(|a| {
                a.mov(rdi, P + 0xff0)?;
                a.mov(ecx, 0x40)?;
                a.mov(al, 0x77)?;
                a.rep().stosb()?;
                a.hlt()?;
            }),
            true,
        ),
        (
            "rep movsq faults in the middle (source page not present)",
            asm64!(|a| {
                a.mov(rsi, P + 0xfe0)?;
                a.mov(rdi, DATA + 0x5000)?;
                a.mov(ecx, 0x10)?;
                a.rep().movsq()?;
                a.hlt()?;
            }),
            true,
        ),
        (
            "lock rmw and bt across page ends",
            asm64!(|a| {
                let mut lp = a.create_label();
                a.mov(rbx, DATA + 0xffc)?;
                a.mov(ecx, 40)?;
                a.set_label(&mut lp)?;
                a.mov(rax, rcx)?;
                a.lock().add(qword_ptr(rbx), rax)?;
                a.lock().xadd(dword_ptr(rbx + 2), eax)?;
                a.mov(rdx, qword_ptr(rbx))?;
                a.lock().cmpxchg(qword_ptr(rbx - 4), rdx)?;
                a.lock().inc(word_ptr(rbx + 3))?;
                a.xchg(qword_ptr(rbx + 1), rdx)?;
                a.mov(r8, 100u64)?;
                a.lock().bts(qword_ptr(rbx - 8), r8)?;
                a.bt(qword_ptr(rbx - 8), r8)?;
                a.setc(r9b)?;
                a.add(r10, r9)?;
                a.mov(r8, -70i64)?;
                a.lock().btc(dword_ptr(rbx + 0x20), r8d)?;
                a.dec(ecx)?;
                a.jnz(lp)?;
                a.hlt()?;
            }),
            false,
        ),
        (
            "lock add faults on the second page",
            asm64!(|a| {
                a.mov(rbx, P + 0xffc)?;
                a.mov(eax, 5)?;
                a.lock().add(qword_ptr(rbx), rax)?;
                a.hlt()?;
            }),
            true,
        ),
        (
            "div: fits, then a quotient overflow (#DE)",
            asm64!(|a| {
                a.mov(rax, 1000u64)?;
                a.xor(edx, edx)?;
                a.mov(ecx, 7)?;
                a.div(rcx)?;
                a.mov(r8, rax)?;
                a.mov(r9, rdx)?;
                a.mov(edx, 8)?;
                a.div(ecx)?;
                a.hlt()?;
            }),
            false,
        ),
        (
            "div by zero (#DE)",
            asm64!(|a| {
                a.mov(rax, 1000u64)?;
                a.xor(edx, edx)?;
                a.xor(ecx, ecx)?;
                a.div(rcx)?;
                a.hlt()?;
            }),
            false,
        ),
    ];
    for (name, code, unmap) in &programs {
        let run = |jit: Option<u32>| {
            let mut g = guest_at(jit);
            for i in 0..0x8000u64 {
                g.ram[(DATA + i) as usize] = (i * 13 + (i >> 8)) as u8;
            }
            for i in 0..0x2000u64 {
                g.ram[(P + i) as usize] = (i * 5) as u8;
            }
            if *unmap {
                g.w64(PT + 8 * 7, 0);
            }
            g.load_code(code);
            g.run_to_halt();
            let mem = g.ram[DATA as usize..(DATA + 0x8000) as usize].to_vec();
            let page = g.ram[P as usize..(P + 0x2000) as usize].to_vec();
            let stack = g.r64(g.regs().rsp);
            (
                g.regs(),
                g.sregs().cr2,
                stack,
                mem,
                page,
                g.vcpu.core().jit.compiled,
            )
        };
        let (ri, ci, top_i, mi, pi, _) = run(None);
        let (rj, cj, top_j, mj, pj, compiled) = run(Some(0));
        assert!(compiled > 0, "{name}: nothing translated");
        assert_eq!(format!("{ri:x?}"), format!("{rj:x?}"), "{name}: registers");
        assert_eq!(ci, cj, "{name}: cr2");
        assert_eq!(top_i, top_j, "{name}: top of stack");
        assert!(mi == mj, "{name}: memory at DATA");
        assert!(pi == pj, "{name}: memory at {P:#x}");
    }
}

/// The translator keeps RSP, RAX, RDI and RSI in the same host registers in
/// every block, and a chained link hands them on without writing them back.
/// At threshold 0 every way their values leave translated code gives the
/// interpreter's registers, memory and instruction count: chained blocks
/// that change them in turn (JMP, CALL/RET, a self-loop), a block that
/// addresses AH (it keeps RAX in `Core::st` between chained neighbours
/// that keep it in the host), a chained successor whose code page the
/// program rewrites (its entry check leaves for the dispatcher), an
/// instruction run by the interpreter inline between them (CPUID), and a
/// #GP in the middle of a chained run, delivered through the IDT (the
/// handler's frame and the registers it sees).
#[test]
fn fixed_register_map_holds_across_chained_blocks() {
    const F: u64 = 0x407000;
    const N: u32 = 40;
    // At F, in a page of its own: `add rdi, imm32; lea rsi, [rsi + rax];
    // ret`; the program rewrites the immediate halfway.
    let callee = {
        let mut a = CodeAssembler::new(64).unwrap();
        a.add(rdi, 0x100).unwrap();
        a.lea(rsi, qword_ptr(rsi + rax)).unwrap();
        a.ret().unwrap();
        let b = a.assemble(F).unwrap();
        assert_eq!(&b[..3], &[0x48, 0x81, 0xc7], "add rdi, imm32");
        b
    };
    let code = asm64!(|a| {
        let mut lp = a.create_label();
        let mut b2 = a.create_label();
        let mut b3 = a.create_label();
        let mut b4 = a.create_label();
        let mut b5 = a.create_label();
        let mut inner = a.create_label();
        let mut skip = a.create_label();
        a.mov(rsi, DATA)?;
        a.mov(rdi, DATA + 0x800)?;
        a.mov(ecx, N)?;
        a.xor(eax, eax)?;
        a.set_label(&mut lp)?;
        a.mov(rdx, qword_ptr(rsi))?;
        a.add(rax, rdx)?;
        a.jmp(b2)?;
        a.set_label(&mut b2)?;
        a.mov(qword_ptr(rdi), rax)?;
        a.lea(rsi, qword_ptr(rsi + 8))?;
        a.push(rsi)?;
        a.jmp(b3)?;
        a.set_label(&mut b3)?;
        a.mov(ah, cl)?;
        a.add(rdi, 8)?;
        a.pop(rdx)?;
        a.sub(rdx, rsi)?;
        a.add(rax, rdx)?;
        a.call(F)?;
        a.mov(r8d, 3)?;
        a.set_label(&mut inner)?;
        a.add(rax, rdi)?;
        a.xor(rsi, rax)?;
        a.dec(r8d)?;
        a.jnz(inner)?;
        a.cmp(ecx, N / 2)?;
        a.jne(skip)?;
        a.mov(dword_ptr(F + 3), 0x300)?;
        a.set_label(&mut skip)?;
        a.mov(r9, rax)?;
        a.mov(r10d, ecx)?;
        a.mov(eax, 0)?;
        a.cpuid()?;
        a.mov(ecx, r10d)?;
        a.mov(rax, r9)?;
        a.and(rsi, 0xff8)?;
        a.add(rsi, DATA as i32)?;
        a.dec(ecx)?;
        a.jnz(lp)?;
        // A fault two links into a chained run: RDI, RSI and RSP were
        // changed by the blocks before it.
        a.push(rdi)?;
        a.jmp(b4)?;
        a.set_label(&mut b4)?;
        a.mov(rsi, 0x8000_0000_0000_0000u64)?;
        a.add(rdi, 3)?;
        a.jmp(b5)?;
        a.set_label(&mut b5)?;
        a.lea(rax, qword_ptr(rdi + 1))?;
        a.mov(rax, qword_ptr(rsi))?;
        a.hlt()?;
    });
    let run = |jit: Option<u32>| {
        let mut g = guest_at(jit);
        fill_data(&mut g, 3);
        g.write(F, &callee);
        g.load_code(&code);
        g.run_to_halt();
        let r = g.regs();
        let mut frame: Vec<u64> = (0..6).map(|i| g.r64(r.rsp + 8 * i)).collect();
        // What the program pushed last, at the RSP the frame saved.
        frame.push(g.r64(frame[4]));
        let mem: Vec<u64> = (0..N as u64)
            .map(|i| g.r64(DATA + 0x800 + 0x108 * i))
            .collect();
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
    assert!(compiled >= 8, "{compiled} blocks translated");
    assert_eq!(format!("{ri:x?}"), format!("{rj:x?}"), "registers");
    assert_eq!(fi, fj, "the #GP frame and the pushed RDI");
    assert_eq!(mi, mj, "stores through RDI");
    assert_eq!(ni, nj, "instructions retired");
    // The handler ran for #GP (vector 13) with error code 0, from the
    // faulting MOV, and the RDI pushed before the chained run is 3 below
    // the one the handler sees.
    assert_eq!(ri.rax, 13);
    assert_eq!(fi[0], 0, "error code");
    assert_eq!(fi[6] + 3, ri.rdi, "pushed RDI");
    // Iterations before the rewrite added 0x100 to RDI in the callee, the
    // later ones 0x300 (each also adds 8 in the loop).
    let (before, after) = (N as u64 / 2 + 1, N as u64 / 2 - 1);
    assert_eq!(
        ri.rdi,
        DATA + 0x800 + before * 0x108 + after * 0x308 + 3,
        "the rewritten callee ran"
    );
}

/// A page only the supervisor may access (P, R/W).
const SUP_PAGE: u64 = 0x410000;
/// A read-only page user code may read (P, U; dirty, as a copy-on-write
/// page written before it was write-protected).
const RO_PAGE: u64 = 0x411000;
/// Ring-3 code of [`run_priv`] (a 2 MiB page with U set).
const USER_CODE: u64 = 0x300000;
/// The SYSCALL entry of [`run_priv`].
const SYSCALL_ENTRY: u64 = CODE + 0x800;

/// SYSCALL set up (STAR: kernel CS 0x08, SS 0x10; user base 0x18, so CS
/// 0x2b and SS 0x23; LSTAR: `entry`), then IRETQ to ring 3 at `user` with
/// RSP 0x50000 and IF set.
fn enter_ring3(a: &mut CodeAssembler, entry: u64, user: u64) -> Result<(), IcedError> {
    a.mov(ecx, 0xc000_0081u32)?;
    a.mov(edx, 0x0018_0008u32)?;
    a.xor(eax, eax)?;
    a.wrmsr()?;
    a.mov(ecx, 0xc000_0082u32)?;
    a.mov(eax, entry as u32)?;
    a.xor(edx, edx)?;
    a.wrmsr()?;
    a.push(SEL_UDATA as i32)?;
    a.push(0x50000)?;
    a.push(0x202)?;
    a.push(SEL_UCODE64 as i32)?;
    a.push(user as i32)?;
    a.iretq()
}

type Asm = fn(&mut CodeAssembler) -> Result<(), IcedError>;

/// Ring 0 runs `ring0` at CODE, then IRETQ to `ring3` at [`USER_CODE`] in
/// ring 3, whose SYSCALL enters `entry` (ring 0) at [`SYSCALL_ENTRY`]; each part
/// ends in HLT or a fault (the IDT stub's `mov eax, vector; hlt`). Data
/// pages: [`SUP_PAGE`] (not dirty) and [`RO_PAGE`]. With translator
/// threshold `jit`; returns what the run left for the comparison with the
/// interpreter: registers, CR0 and CR2, the top of the stack (a fault's
/// error code and frame), both pages' first words and their PTEs.
fn run_priv(jit: Option<u32>, ring0: Asm, ring3: Asm, entry: Asm) -> String {
    let mut g = guest_at(jit);
    g.w64(PT + 8 * 0x10, SUP_PAGE | 3);
    g.w64(PT + 8 * 0x11, RO_PAGE | 0x45);
    g.w64(SUP_PAGE, 0x5151);
    g.w64(RO_PAGE, 0x7070);
    g.write(USER_CODE, &assemble(64, USER_CODE, ring3));
    g.write(SYSCALL_ENTRY, &assemble(64, SYSCALL_ENTRY, entry));
    let mut code = assemble(64, CODE, ring0);
    let tail = asm64!(|a| {
        enter_ring3(&mut a, SYSCALL_ENTRY, USER_CODE)?;
    });
    // `ring0` then the tail (`ring0` is position independent: no labels).
    code.extend_from_slice(&tail);
    g.load_code(&code);
    g.run_to_halt();
    let r = g.regs();
    let s = g.sregs();
    let stack: Vec<u64> = (0..6).map(|i| g.r64(r.rsp + 8 * i)).collect();
    let pages = [
        g.r64(SUP_PAGE),
        g.r64(RO_PAGE),
        g.r64(PT + 8 * 0x10),
        g.r64(PT + 8 * 0x11),
    ];
    if jit.is_some() {
        assert!(
            g.vcpu.core().jit.compiled >= 2,
            "user and kernel blocks translated"
        );
    }
    format!(
        "{r:x?} cr0 {:x} cr2 {:x} stack {stack:x?} pages {pages:x?}",
        s.cr0, s.cr2
    )
}

/// `run_priv` through the interpreter and with every block translated on
/// its first run (threshold 0): the same end state, which is returned.
fn priv_both(ring0: Asm, ring3: Asm, entry: Asm) -> String {
    let i = run_priv(None, ring0, ring3, entry);
    let j = run_priv(Some(0), ring0, ring3, entry);
    assert_eq!(i, j, "interpreter vs translated code");
    j
}

fn nothing(_: &mut CodeAssembler) -> Result<(), IcedError> {
    Ok(())
}

/// The inline TLB path of translated code keeps one table per privilege
/// class: an entry the kernel filled by reading and writing a supervisor
/// page does not let ring-3 code read or write it (#PF, error code U|P,
/// and U|W|P), and an entry ring-3 code filled by reading a read-only user
/// page does not let it write there (U|W|P). At threshold 0 each run
/// faults exactly as the interpreter does.
#[test]
fn translated_user_accesses_fault_after_the_kernel_filled_the_entry() {
    let k_fills: Asm = |a| {
        a.mov(rbx, SUP_PAGE)?;
        a.mov(r8, qword_ptr(rbx))?;
        a.add(r8, 1)?;
        a.mov(qword_ptr(rbx), r8)?;
        a.mov(r9, qword_ptr(rbx))?;
        Ok(())
    };
    // A user read of the supervisor page.
    let end = priv_both(
        k_fills,
        |a| {
            a.mov(rdx, 0x1234u64)?;
            a.mov(rdx, qword_ptr(rbx))?;
            a.hlt()
        },
        nothing,
    );
    assert!(end.contains("rax: e,"), "{end}");
    assert!(end.contains("rdx: 1234,"), "{end}");
    assert!(end.contains("r9: 5152,"), "{end}");
    assert!(
        end.contains(&format!("cr2 {SUP_PAGE:x} stack [5, ")),
        "{end}"
    );
    // A user write to it.
    let end = priv_both(
        k_fills,
        |a| {
            a.mov(qword_ptr(rbx + 8), rbx)?;
            a.hlt()
        },
        nothing,
    );
    assert!(
        end.contains(&format!("cr2 {:x} stack [7, ", SUP_PAGE + 8)),
        "{end}"
    );
    assert!(end.contains("pages [5152, 7070,"), "{end}");
    // A user write to a read-only page after a user read filled the entry.
    let end = priv_both(
        nothing,
        |a| {
            a.mov(rbx, RO_PAGE)?;
            a.mov(r10, qword_ptr(rbx))?;
            a.add(r10, 1)?;
            a.mov(qword_ptr(rbx), r10)?;
            a.hlt()
        },
        nothing,
    );
    assert!(end.contains("r10: 7071,"), "{end}");
    assert!(
        end.contains(&format!("cr2 {RO_PAGE:x} stack [7, ")),
        "{end}"
    );
    assert!(end.contains("pages [5151, 7070,"), "{end}");
}

/// The kernel's side: an entry ring-3 code filled by reading a read-only
/// page does not let the kernel write there with CR0.WP set (#PF, W|P);
/// nor does one the kernel filled itself by reading. With CR0.WP clear
/// the same write lands (the slow path: the write tags stay off for
/// read-only pages), and after the kernel sets WP again it faults. At
/// threshold 0 each run ends as the interpreter's.
#[test]
fn translated_kernel_writes_to_read_only_pages_follow_cr0_wp() {
    let user_reads: Asm = |a| {
        a.mov(rbx, RO_PAGE)?;
        a.mov(r10, qword_ptr(rbx))?;
        a.syscall()
    };
    // After a user read: a kernel write with WP set.
    let end = priv_both(nothing, user_reads, |a| {
        a.mov(r11, qword_ptr(rbx))?;
        a.mov(qword_ptr(rbx), rbx)?;
        a.hlt()
    });
    assert!(end.contains("r10: 7070,"), "{end}");
    assert!(
        end.contains(&format!("cr2 {RO_PAGE:x} stack [3, ")),
        "{end}"
    );
    assert!(end.contains("pages [5151, 7070,"), "{end}");
    // After a kernel read: a kernel write with WP set.
    let end = priv_both(
        |a| {
            a.mov(rbx, RO_PAGE)?;
            a.mov(r10, qword_ptr(rbx))?;
            a.mov(qword_ptr(rbx), r10)?;
            a.hlt()
        },
        nothing,
        nothing,
    );
    assert!(
        end.contains(&format!("cr2 {RO_PAGE:x} stack [3, ")),
        "{end}"
    );
    // WP clear: the kernel's writes land; WP set again: the next write
    // faults.
    let end = priv_both(nothing, user_reads, |a| {
        a.mov(rax, cr0)?;
        a.mov(r12, rax)?;
        a.and(rax, !(1i32 << 16))?;
        a.mov(cr0, rax)?;
        a.mov(qword_ptr(rbx), rbx)?;
        a.add(qword_ptr(rbx), 1)?;
        a.mov(r11, qword_ptr(rbx))?;
        a.mov(cr0, r12)?;
        a.mov(qword_ptr(rbx + 8), rbx)?;
        a.hlt()
    });
    assert!(end.contains(&format!("r11: {:x},", RO_PAGE + 1)), "{end}");
    assert!(
        end.contains(&format!("cr2 {:x} stack [3, ", RO_PAGE + 8)),
        "{end}"
    );
    assert!(
        end.contains(&format!("pages [5151, {:x},", RO_PAGE + 1)),
        "{end}"
    );
    assert!(end.contains(&format!("{:x}]", RO_PAGE | 0x65)), "{end}");
}
