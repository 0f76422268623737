//! Conformance: the engine behaves as a CPU of its advertised model where
//! Linux does not look (found by running a standard x86 test suite).
//! Each test runs a tiny guest; an exception lands in the harness's IDT
//! stub for its vector (`mov eax, vector; hlt`), so RAX names it.

mod common;

use common::*;
use emu::cpuid::CpuidConfig;
use iced_x86::code_asm::*;

/// Marker a guest leaves in RBX when it got through without an exception.
const DONE: u64 = 0xd0e;

fn guest() -> Guest {
    let mut g = Guest::new(16 << 20);
    g.long_mode();
    g
}

fn kvm_guest() -> Guest {
    let mut g = Guest::with_platform(
        16 << 20,
        None,
        CpuidConfig {
            kvm_clock: true,
            ..Default::default()
        },
    );
    g.long_mode();
    g
}

/// Run `f` at CODE to HLT; RAX is 0xffff_ffff unless an exception
/// stub ran (then it is the vector).
fn run(g: &mut Guest, f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> (u64, u64) {
    let code = assemble(64, CODE, |a| {
        a.mov(eax, 0xffff_ffffu32)?;
        f(a)?;
        a.mov(ebx, DONE as u32)?;
        a.hlt()
    });
    g.load_code(&code);
    g.run_to_halt();
    let r = g.regs();
    (r.rax, r.rbx)
}

fn vector_of(g: &mut Guest, f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> u64 {
    let (vector, done) = run(g, f);
    assert_ne!(done, DONE, "no exception; rax {vector:#x}");
    vector
}

#[test]
fn amd_legacy_pmu_and_family_msrs_exist() {
    let mut g = guest();
    let (_, done) = run(&mut g, |a| {
        // PerfEvtSel0-3 and PerfCtr0-3: writes accepted, reads succeed.
        for msr in 0xc001_0000u32..=0xc001_0007 {
            a.mov(ecx, msr)?;
            a.xor(eax, eax)?;
            a.xor(edx, edx)?;
            a.wrmsr()?;
            a.rdmsr()?;
        }
        // HWCR, SYSCFG, TOP_MEM, TOP_MEM2, patch level, MCG_CAP/STATUS.
        for msr in [
            0xc001_0015u32,
            0xc001_0010,
            0xc001_001a,
            0xc001_001d,
            0x8b,
            0x179,
            0x17a,
        ] {
            a.mov(ecx, msr)?;
            a.rdmsr()?;
        }
        // RDPMC reads the (idle) legacy counters.
        a.mov(ecx, 3)?;
        a.rdpmc()?;
        a.mov(eax, 0xffff_ffffu32)?;
        Ok(())
    });
    assert_eq!(done, DONE);
    // RDPMC beyond the four counters, and MCG_CAP writes, still #GP.
    let mut g = guest();
    assert_eq!(
        vector_of(&mut g, |a| {
            a.mov(ecx, 4)?;
            a.rdpmc()
        }),
        13
    );
    let mut g = guest();
    assert_eq!(
        vector_of(&mut g, |a| {
            a.mov(ecx, 0x179)?;
            a.xor(eax, eax)?;
            a.xor(edx, edx)?;
            a.wrmsr()
        }),
        13
    );
}

#[test]
fn syscall_from_compatibility_mode_enters_through_cstar() {
    const C32: u64 = CODE + 0x1000;
    const LSTAR_AT: u64 = CODE + 0x2000;
    const CSTAR_AT: u64 = CODE + 0x3000;
    let mut g = guest();
    g.write(
        LSTAR_AT,
        &assemble(64, LSTAR_AT, |a| {
            a.mov(ebx, 64)?;
            a.hlt()
        }),
    );
    g.write(
        CSTAR_AT,
        &assemble(64, CSTAR_AT, |a| {
            a.mov(ebx, 32)?;
            a.hlt()
        }),
    );
    // In compatibility mode: SYSCALL.
    g.write(
        C32,
        &assemble(32, C32, |a| {
            a.mov(esp, STACK_TOP as u32)?;
            a.syscall()?;
            a.hlt()
        }),
    );
    let code = assemble(64, CODE, |a| {
        let wr = |a: &mut CodeAssembler, msr: u32, v: u64| -> Result<(), IcedError> {
            a.mov(ecx, msr)?;
            a.mov(eax, v as u32)?;
            a.mov(edx, (v >> 32) as u32)?;
            a.wrmsr()
        };
        wr(a, 0xc000_0081, (SEL_CODE64 as u64) << 32)?;
        wr(a, 0xc000_0082, LSTAR_AT)?;
        wr(a, 0xc000_0083, CSTAR_AT)?;
        // Far return into the 32-bit code segment.
        a.push(SEL_CODE32 as i32)?;
        a.push(C32 as i32)?;
        a.db(&[0x48, 0xcb])
    });
    g.load_code(&code);
    g.run_to_halt();
    let r = g.regs();
    assert_eq!(
        r.rbx, 32,
        "compatibility-mode SYSCALL took the 64-bit entry"
    );
    assert!(r.rcx > C32 && r.rcx < C32 + 16, "RCX {:#x}", r.rcx);
    assert_eq!(g.sregs().cs.selector, SEL_CODE64);
    assert!(g.sregs().cs.l);
}

#[test]
fn instructions_the_advertised_cpu_lacks_raise_ud() {
    // Without a KVM signature: VMCALL, VMMCALL; never advertised: INVPCID,
    // RDPRU, and the instructions of other extensions (AES, BMI, MOVBE).
    type Emit = Box<dyn Fn(&mut CodeAssembler) -> Result<(), IcedError>>;
    let cases: Vec<(&str, Emit)> = vec![
        ("aesenc", Box::new(|a| a.aesenc(xmm0, xmm1))),
        ("vmcall", Box::new(|a| a.vmcall())),
        ("vmmcall", Box::new(|a| a.vmmcall())),
        (
            "invpcid",
            Box::new(|a| a.invpcid(rax, xmmword_ptr(DATA as i32))),
        ),
        ("rdpru", Box::new(|a| a.rdpru())),
        // Implemented but beyond the advertised CPU (no RDTSCP).
        ("rdtscp", Box::new(|a| a.rdtscp())),
        ("andn", Box::new(|a| a.andn(eax, ebx, ecx))),
        ("movbe", Box::new(|a| a.movbe(eax, dword_ptr(DATA as i32)))),
        // AMD's SSE4A is not part of the advertised model.
        ("extrq", Box::new(|a| a.extrq_3(xmm0, 4, 8))),
    ];
    for (name, f) in cases {
        let mut g = guest();
        assert_eq!(vector_of(&mut g, |a| f(a)), 6, "{name}");
    }
}

/// A guest whose CPUID hides MMX, SSE3, SSSE3, SSE4.1, SSE4.2 and LZCNT
/// (as `--cpu-model portable` or a VM restored from KVM may).
fn guest_without_v2() -> Guest {
    use emu::cpuid::*;
    let mut g = Guest::with_platform(
        16 << 20,
        None,
        CpuidConfig {
            hidden: Hidden {
                leaf1_ecx: FEAT_SSE3 | FEAT_SSSE3 | FEAT_SSE41 | FEAT_SSE42,
                leaf1_edx: FEAT_MMX,
                ext1_ecx: EXT_ABM,
                ext1_edx: FEAT_MMX,
                ..Default::default()
            },
            ..Default::default()
        },
    );
    g.long_mode();
    g
}

#[test]
fn x86_64_v2_extensions_are_advertised_and_raise_ud_when_hidden() {
    use emu::cpuid::*;
    let f = cpuid(&CpuidConfig::default(), 0, 1, 0);
    for bit in [
        FEAT_SSE3,
        FEAT_SSSE3,
        FEAT_CX16,
        FEAT_SSE41,
        FEAT_SSE42,
        FEAT_POPCNT,
    ] {
        assert_ne!(f[2] & bit, 0, "leaf 1 ECX bit {bit:#x}");
    }
    assert_ne!(f[3] & FEAT_MMX, 0);
    let e = cpuid(&CpuidConfig::default(), 0, 0x8000_0001, 0);
    assert_ne!(e[2] & EXT_LAHF_LM, 0);
    assert_ne!(e[2] & EXT_ABM, 0);
    // Each family executes on the default model...
    type Emit = Box<dyn Fn(&mut CodeAssembler) -> Result<(), IcedError>>;
    let cases: Vec<(&str, Emit)> = vec![
        ("paddb mm", Box::new(|a| a.paddb(mm0, mm1))),
        ("emms", Box::new(|a| a.emms())),
        ("fisttp", Box::new(|a| a.fisttp(dword_ptr(DATA as i32)))),
        (
            "lddqu",
            Box::new(|a| a.lddqu(xmm0, xmmword_ptr(DATA as i32))),
        ),
        ("haddps", Box::new(|a| a.haddps(xmm0, xmm1))),
        ("pshufb", Box::new(|a| a.pshufb(xmm0, xmm1))),
        ("pabsw mm", Box::new(|a| a.pabsw(mm0, mm1))),
        ("ptest", Box::new(|a| a.ptest(xmm0, xmm1))),
        ("roundsd", Box::new(|a| a.roundsd(xmm0, xmm1, 4))),
        ("pcmpgtq", Box::new(|a| a.pcmpgtq(xmm0, xmm1))),
        ("pcmpistri", Box::new(|a| a.pcmpistri(xmm0, xmm1, 0x0c))),
        ("crc32", Box::new(|a| a.crc32(eax, cl))),
    ];
    for (name, f) in &cases {
        let mut g = guest();
        let (v, done) = run(&mut g, |a| {
            a.fninit()?;
            f(a)?;
            a.emms()
        });
        assert_eq!(done, DONE, "{name}: exception {v:#x}");
        // ... and raises #UD where CPUID hides it.
        let mut g = guest_without_v2();
        assert_eq!(vector_of(&mut g, |a| f(a)), 6, "{name} hidden");
    }
}

#[test]
fn lzcnt_follows_abm_and_tzcnt_executes_as_bsf_without_bmi1() {
    // Source 0x10: LZCNT counts 27 leading zeros where ABM is advertised,
    // BSR finds bit 4 where it is not. Source 0: TZCNT (no BMI1
    // advertised) is BSF, leaving the destination and setting ZF.
    for (hidden, want) in [(false, 27u64), (true, 4)] {
        let mut g = if hidden { guest_without_v2() } else { guest() };
        let (_, done) = run(&mut g, |a| {
            a.mov(ecx, 0x10u32)?;
            a.lzcnt(esi, ecx)?;
            a.xor(ecx, ecx)?;
            a.mov(edi, 0x1234u32)?;
            a.tzcnt(edi, ecx)?;
            a.setz(dl)?;
            a.movzx(edx, dl)
        });
        assert_eq!(done, DONE);
        let r = g.regs();
        assert_eq!(r.rsi, want, "lzcnt, hidden={hidden}");
        assert_eq!(r.rdi, 0x1234, "tzcnt as bsf leaves the destination");
        assert_eq!(r.rdx, 1, "tzcnt as bsf sets ZF for a zero source");
    }
}

#[test]
fn mmx_faults_follow_cr0_em_and_ts() {
    // CR0.TS: #NM; CR0.EM: #UD (even with CR4.OSFXSR set).
    for (bit, want) in [(8u32, 7u64), (4, 6)] {
        let mut g = guest();
        let v = vector_of(&mut g, |a| {
            a.mov(rax, cr0)?;
            a.or(eax, bit)?;
            a.mov(cr0, rax)?;
            a.mov(eax, 0xffff_ffffu32)?;
            a.paddb(mm0, mm1)
        });
        assert_eq!(v, want, "cr0 bit {bit:#x}");
    }
}

#[test]
fn vmcall_and_vmmcall_follow_the_kvm_hypercall_abi_when_advertised() {
    let mut g = kvm_guest();
    let (_, done) = run(&mut g, |a| {
        a.mov(eax, 1)?; // KVM_HC_VAPIC_POLL_IRQ: a no-op returning 0.
        a.vmmcall()?;
        a.mov(rsi, rax)?;
        a.mov(eax, 99)?; // Unknown: -KVM_ENOSYS.
        a.vmcall()?;
        a.mov(rdi, rax)?;
        a.mov(eax, 0xffff_ffffu32)
    });
    assert_eq!(done, DONE);
    let r = g.regs();
    assert_eq!(r.rsi, 0);
    assert_eq!(r.rdi, (-1000i64) as u64);
}

#[test]
fn descriptor_table_bases_must_be_canonical() {
    const NONCANON: u64 = 0x0000_8000_0000_0000;
    // LGDT and LIDT with a non-canonical base: #GP.
    for lidt in [false, true] {
        let mut g = guest();
        g.write(DATA, &0xfffu16.to_le_bytes());
        g.w64(DATA + 2, NONCANON);
        let v = vector_of(&mut g, |a| {
            if lidt {
                a.lidt(ptr(DATA as i32))
            } else {
                a.lgdt(ptr(DATA as i32))
            }
        });
        assert_eq!(v, 13, "lidt={lidt}");
        let s = g.sregs();
        assert_eq!(s.gdt.base, GDT, "GDTR unchanged");
        assert_eq!(s.idt.base, IDT, "IDTR unchanged");
    }
    // LTR with a TSS descriptor whose 64-bit base is not canonical.
    let mut g = guest();
    let lo = g.r64(GDT + 0x30);
    g.w64(GDT + 0x30, lo & !(0xf << 40) | (0x9 << 40));
    g.w64(GDT + 0x38, NONCANON >> 32);
    assert_eq!(
        vector_of(&mut g, |a| {
            a.mov(ax, SEL_TSS as u32)?;
            a.ltr(ax)
        }),
        13
    );
    // MSRs that hold addresses: SYSENTER_ESP/EIP refuse non-canonical ones.
    for msr in [0x175u32, 0x176] {
        let mut g = guest();
        let v = vector_of(&mut g, |a| {
            a.mov(ecx, msr)?;
            a.xor(eax, eax)?;
            a.mov(edx, (NONCANON >> 32) as u32)?;
            a.wrmsr()
        });
        assert_eq!(v, 13, "msr {msr:#x}");
    }
}

// ------------------------------------------------------------------ debug

/// Counters and values the #DB / #UD handlers record.
const DBG_COUNT: u64 = DATA + 0x100;
const DBG_RIP: u64 = DATA + 0x108;
const DBG_DR6: u64 = DATA + 0x110;
const DBG_FLAGS: u64 = DATA + 0x118;
const HANDLER_AT: u64 = CODE + 0x4000;

/// Point vector `v`'s interrupt gate at code assembled at `at`.
fn install(g: &mut Guest, v: u64, at: u64, code: &[u8]) {
    g.write(at, code);
    let lo = (at & 0xffff)
        | ((SEL_CODE64 as u64) << 16)
        | (0x8eu64 << 40)
        | (((at >> 16) & 0xffff) << 48);
    g.w64(IDT + v * 16, lo);
    g.w64(IDT + v * 16 + 8, at >> 32);
}

/// #DB handler: count, record the return RIP, DR6 (then clear it) and the
/// saved RFLAGS; set RF in the frame (to step over an instruction
/// breakpoint) and return.
fn install_db_handler(g: &mut Guest) {
    let code = assemble(64, HANDLER_AT, |a| {
        a.push(rax)?;
        a.inc(qword_ptr(DBG_COUNT as i32))?;
        a.mov(rax, qword_ptr(rsp + 8))?;
        a.mov(qword_ptr(DBG_RIP as i32), rax)?;
        a.mov(rax, dr6)?;
        a.mov(qword_ptr(DBG_DR6 as i32), rax)?;
        a.xor(eax, eax)?;
        a.mov(dr6, rax)?;
        a.mov(rax, qword_ptr(rsp + 24))?;
        a.mov(qword_ptr(DBG_FLAGS as i32), rax)?;
        a.or(qword_ptr(rsp + 24), 0x10000)?;
        a.pop(rax)?;
        a.iretq()
    });
    install(g, 1, HANDLER_AT, &code);
}

#[test]
fn tf_single_steps_each_instruction() {
    let mut g = guest();
    install_db_handler(&mut g);
    let (_, done) = run(&mut g, |a| {
        a.pushfq()?;
        a.or(qword_ptr(rsp), 0x100)?;
        a.popfq()?;
        // Traps after each of these six (the POPF clearing TF included).
        a.nop()?;
        a.nop()?;
        a.inc(rsi)?;
        a.pushfq()?;
        a.and(qword_ptr(rsp), !0x100i32)?;
        a.popfq()?;
        a.inc(rsi)
    });
    assert_eq!(done, DONE);
    assert_eq!(g.r64(DBG_COUNT), 6);
    assert_ne!(g.r64(DBG_DR6) & (1 << 14), 0, "DR6.BS");
    assert_eq!(g.regs().rsi, 2);
    assert_eq!(g.regs().rflags & 0x100, 0);
}

#[test]
fn hardware_instruction_breakpoint_faults_once_and_rf_resumes() {
    let mut g = guest();
    install_db_handler(&mut g);
    // The breakpoint is on the second INC; the guest notes its address.
    let code = assemble(64, CODE, |a| {
        let mut brk = a.create_label();
        a.mov(eax, 0xffff_ffffu32)?;
        a.lea(rax, ptr(brk))?;
        a.mov(qword_ptr(DATA as i32 + 0x120), rax)?;
        a.mov(dr0, rax)?;
        a.mov(eax, 1)?; // L0, execute, length 1.
        a.mov(dr7, rax)?;
        a.inc(rsi)?;
        a.set_label(&mut brk)?;
        a.inc(rsi)?;
        a.inc(rsi)?;
        a.xor(eax, eax)?;
        a.mov(dr7, rax)?;
        a.mov(ebx, DONE as u32)?;
        a.hlt()
    });
    g.load_code(&code);
    g.run_to_halt();
    assert_eq!(g.regs().rbx, DONE);
    assert_eq!(g.regs().rsi, 3, "the instruction ran exactly once");
    assert_eq!(g.r64(DBG_COUNT), 1);
    assert_eq!(
        g.r64(DBG_RIP),
        g.r64(DATA + 0x120),
        "#DB is a fault on the instruction"
    );
    assert_eq!(g.r64(DBG_DR6) & 0xf, 1, "DR6.B0");
    assert_eq!(g.r64(DBG_FLAGS) & 0x10000, 0, "no RF in a breakpoint frame");
}

#[test]
fn data_watchpoint_traps_after_the_write() {
    let mut g = guest();
    install_db_handler(&mut g);
    let (_, done) = run(&mut g, |a| {
        a.mov(rax, DATA + 8)?;
        a.mov(dr1, rax)?;
        // L1, R/W1 = write, LEN1 = 4 bytes.
        a.mov(eax, (1 << 2) | (1 << 20) | (3 << 22))?;
        a.mov(dr7, rax)?;
        a.mov(ecx, dword_ptr(DATA as i32 + 8))?; // A read: no hit.
        a.mov(word_ptr(DATA as i32 + 10), 7)?; // A write inside: hit.
        a.nop()?;
        a.xor(eax, eax)?;
        a.mov(dr7, rax)?;
        a.mov(eax, 0xffff_ffffu32)
    });
    assert_eq!(done, DONE);
    assert_eq!(g.r64(DBG_COUNT), 1);
    assert_eq!(g.r64(DBG_DR6) & 0xf, 2, "DR6.B1");
    // The trap returns after the store: to the NOP.
    let nop_at = g.r64(DBG_RIP);
    assert_eq!(g.r8(nop_at), 0x90);
}

/// Run to HLT, answering the port exits of ports no device claims.
fn run_with_ports(g: &mut Guest) {
    loop {
        match g.run() {
            Ex::Halt => return,
            Ex::IoOut(..) | Ex::IoIn(..) => continue,
            e => panic!("{e:?} regs {:x?}", g.regs()),
        }
    }
}

/// I/O breakpoints: with CR4.DE, DR7 R/W = 10 traps after an IN or OUT
/// whose port range overlaps the breakpoint's; without CR4.DE nothing.
#[test]
fn io_breakpoint_traps_after_in_and_out_with_cr4_de() {
    for de in [true, false] {
        let mut g = guest();
        install_db_handler(&mut g);
        let code = assemble(64, CODE, |a| {
            let mut after = a.create_label();
            a.mov(rax, cr4)?;
            if de {
                a.or(eax, 8)?;
            } else {
                a.and(eax, !8)?;
            }
            a.mov(cr4, rax)?;
            a.mov(eax, 0x70)?;
            a.mov(dr2, rax)?;
            // L2, R/W2 = I/O, LEN2 = 2 bytes: ports 0x70-0x71.
            a.mov(eax, (1 << 4) | (2 << 24) | (1 << 26))?;
            a.mov(dr7, rax)?;
            a.out(0x80, al)?; // Not in the range.
            a.out(0x71, al)?; // Hit.
            a.nop()?;
            a.mov(edx, 0x6e)?;
            a.in_(eax, dx)?; // Ports 0x6e-0x71: hit.
            a.set_label(&mut after)?;
            a.nop()?;
            a.lea(rax, ptr(after))?;
            a.mov(qword_ptr(DATA as i32 + 0x120), rax)?;
            a.xor(eax, eax)?;
            a.mov(dr7, rax)?;
            a.mov(ebx, DONE as u32)?;
            a.hlt()
        });
        g.load_code(&code);
        run_with_ports(&mut g);
        assert_eq!(g.regs().rbx, DONE);
        if de {
            assert_eq!(g.r64(DBG_COUNT), 2);
            assert_eq!(g.r64(DBG_DR6) & 0xf, 4, "DR6.B2");
            assert_eq!(g.r64(DBG_RIP), g.r64(DATA + 0x120), "a trap after the IN");
        } else {
            assert_eq!(g.r64(DBG_COUNT), 0, "no I/O breakpoints without CR4.DE");
        }
    }
}

/// The single-step trap of a MOV SS waits for the next instruction: the
/// first #DB after TF is set and SS loaded returns past the instruction
/// that follows the MOV SS, with DR6.BS.
#[test]
fn mov_ss_delays_the_single_step_trap_by_one_instruction() {
    let mut g = guest();
    // #DB handler: count, note the first return RIP, clear TF in the frame.
    let handler = assemble(64, HANDLER_AT, |a| {
        let mut later = a.create_label();
        a.push(rax)?;
        a.inc(qword_ptr(DBG_COUNT as i32))?;
        a.cmp(qword_ptr(DBG_COUNT as i32), 1)?;
        a.jne(later)?;
        a.mov(rax, qword_ptr(rsp + 8))?;
        a.mov(qword_ptr(DBG_RIP as i32), rax)?;
        a.mov(rax, dr6)?;
        a.mov(qword_ptr(DBG_DR6 as i32), rax)?;
        a.set_label(&mut later)?;
        a.and(qword_ptr(rsp + 24), !0x100i32)?;
        a.pop(rax)?;
        a.iretq()
    });
    install(&mut g, 1, HANDLER_AT, &handler);
    let (_, done) = run(&mut g, |a| {
        let mut after = a.create_label();
        a.mov(eax, SEL_DATA as u32)?;
        a.pushfq()?;
        a.or(qword_ptr(rsp), 0x100)?;
        a.popfq()?;
        a.mov(ss, ax)?;
        a.inc(rsi)?;
        a.set_label(&mut after)?;
        a.nop()?;
        a.lea(rax, ptr(after))?;
        a.mov(qword_ptr(DATA as i32 + 0x120), rax)?;
        a.mov(eax, 0xffff_ffffu32)
    });
    assert_eq!(done, DONE);
    assert_eq!(g.r64(DBG_COUNT), 1);
    assert_eq!(
        g.r64(DBG_RIP),
        g.r64(DATA + 0x120),
        "after the INC, not the MOV SS"
    );
    assert_ne!(g.r64(DBG_DR6) & (1 << 14), 0, "DR6.BS");
    assert_eq!(g.regs().rsi, 1);
}

#[test]
fn icebp_raises_db_after_the_instruction() {
    let mut g = guest();
    install_db_handler(&mut g);
    let (_, done) = run(&mut g, |a| {
        a.int1()?;
        a.nop()
    });
    assert_eq!(done, DONE);
    assert_eq!(g.r64(DBG_COUNT), 1);
    assert_eq!(g.r8(g.r64(DBG_RIP)), 0x90, "returns past ICEBP");
}

#[test]
fn faults_save_rflags_with_rf_set() {
    let mut g = guest();
    // #UD handler: record the saved RFLAGS, skip the 2-byte UD2.
    let code = assemble(64, HANDLER_AT, |a| {
        a.push(rax)?;
        a.mov(rax, qword_ptr(rsp + 24))?;
        a.mov(qword_ptr(DBG_FLAGS as i32), rax)?;
        a.add(qword_ptr(rsp + 8), 2)?;
        a.pop(rax)?;
        a.iretq()
    });
    install(&mut g, 6, HANDLER_AT, &code);
    let (_, done) = run(&mut g, |a| {
        a.ud2()?;
        // RF is gone once an instruction completed.
        a.pushfq()?;
        a.pop(rdi)
    });
    assert_eq!(done, DONE);
    assert_ne!(g.r64(DBG_FLAGS) & 0x10000, 0, "RF in the #UD frame");
    assert_eq!(g.regs().rdi & 0x10000, 0);
}

#[test]
fn dr7_general_detect_faults_on_debug_register_access() {
    let mut g = guest();
    // GD set, then a read of DR0: #DB (a fault: RIP at the MOV), DR6.BD
    // set and GD cleared for the handler.
    let vector = vector_of(&mut g, |a| {
        a.mov(rax, 0x2000u64)?;
        a.mov(dr7, rax)?;
        a.mov(rbx, dr0)
    });
    assert_eq!(vector, 1, "#DB");
    let st = &g.vcpu.core().st;
    assert_ne!(st.dr[6] & (1 << 13), 0, "DR6.BD");
    assert_eq!(st.dr[7] & (1 << 13), 0, "GD cleared on delivery");
    // Without GD the same access runs.
    let mut g = guest();
    let (_, done) = run(&mut g, |a| a.mov(rbx, dr0));
    assert_eq!(done, DONE);
}

// ------------------------------------------------------------------- APIC

fn pc_guest() -> Guest {
    let mut ram = vec![0u8; 16 << 20].into_boxed_slice();
    let vm = emu::EmuVm::new_pc();
    // SAFETY: `ram` moves into the Guest, which drops it last; the heap
    // buffer does not move.
    unsafe {
        hypervisor::Vm::map_memory(&vm, 0, 0, ram.len() as u64, ram.as_mut_ptr() as u64).unwrap()
    };
    let vcpu = vm.create_pc_vcpu(0, 1).unwrap();
    let mut g = Guest { vcpu, vm, ram };
    g.long_mode();
    g
}

#[test]
fn cpuid_apic_bit_follows_the_apic_global_enable() {
    let mut g = pc_guest();
    let (_, done) = run(&mut g, |a| {
        a.mov(eax, 1)?;
        a.cpuid()?;
        a.mov(esi, edx)?;
        a.mov(ecx, 0x1b)?;
        a.rdmsr()?;
        a.mov(r8d, eax)?;
        a.and(eax, !(1i32 << 11))?;
        a.wrmsr()?;
        a.mov(eax, 1)?;
        a.cpuid()?;
        a.mov(edi, edx)?;
        a.mov(ecx, 0x1b)?;
        a.mov(eax, r8d)?;
        a.xor(edx, edx)?;
        a.wrmsr()?;
        a.mov(eax, 1)?;
        a.cpuid()?;
        a.mov(r9d, edx)?;
        a.mov(eax, 0xffff_ffffu32)
    });
    assert_eq!(done, DONE);
    let r = g.regs();
    assert_ne!(r.rsi & (1 << 9), 0, "APIC advertised while enabled");
    assert_eq!(r.rdi & (1 << 9), 0, "and not while globally disabled");
    assert_ne!(r.r9 & (1 << 9), 0, "and again once re-enabled");
    // A base with a bit at or above MAXPHYADDR (40) is reserved: #GP.
    let mut g = pc_guest();
    let v = vector_of(&mut g, |a| {
        a.mov(ecx, 0x1b)?;
        a.mov(eax, 0xfee0_0900u32)?;
        a.mov(edx, 1 << 8)?;
        a.wrmsr()
    });
    assert_eq!(v, 13);
}

#[test]
fn legacy_mode_syscall_and_sysret() {
    // Flat 32-bit protected mode, paging off, EFER.SCE: SYSCALL enters at
    // STAR[31:0] with STAR[47:32] as CS, SYSRET returns to ring 3 at ECX
    // with STAR[63:48] | 3; the user code comes back once more.
    const ENTRY: u64 = CODE + 0x1000;
    const USER: u64 = CODE + 0x2000;
    const COUNT: u64 = DATA;
    const MARK: u64 = DATA + 8;
    let mut g = guest();
    let mut s = g.sregs();
    let code32 = hypervisor::Segment::from_gdt_entry(SEL_CODE32, 0x00cf_9b00_0000_ffff);
    let data = hypervisor::Segment::from_gdt_entry(SEL_DATA, 0x00cf_9300_0000_ffff);
    s.cs = code32;
    s.ds = data;
    s.es = data;
    s.ss = data;
    s.cr0 = 0x11;
    s.cr3 = 0;
    s.cr4 = 0;
    s.efer = 1;
    hypervisor::Vcpu::set_sregs(&mut g.vcpu, &s).unwrap();
    g.write(
        ENTRY,
        &assemble(32, ENTRY, |a| {
            let mut done = a.create_label();
            a.inc(dword_ptr(COUNT as u32))?;
            a.cmp(dword_ptr(COUNT as u32), 2)?;
            a.je(done)?;
            a.mov(edi, ecx)?; // the return address of the first SYSCALL
            a.mov(ecx, USER as u32)?;
            a.sysret()?;
            a.set_label(&mut done)?;
            a.hlt()
        }),
    );
    g.write(
        USER,
        &assemble(32, USER, |a| {
            a.mov(dword_ptr(MARK as u32), 0x55)?;
            a.syscall()
        }),
    );
    let code = assemble(32, CODE, |a| {
        a.mov(ecx, 0xc000_0081u32)?;
        a.mov(eax, ENTRY as u32)?;
        // SYSCALL CS 0x18 (SS 0x20); SYSRET CS 0x20 | 3 (SS 0x28 | 3).
        a.mov(edx, (0x20u32 << 16) | SEL_CODE32 as u32)?;
        a.wrmsr()?;
        a.sti()?;
        a.syscall()
    });
    g.load_code(&code);
    let mut r = g.regs();
    r.rsp = STACK_TOP;
    g.set_regs(&r);
    g.run_to_halt();
    let r = g.regs();
    assert_eq!(g.r32(COUNT), 2, "entered twice");
    assert_eq!(g.r32(MARK), 0x55, "ring-3 code ran after SYSRET");
    assert!(r.rdi > CODE && r.rdi < CODE + 0x40, "ECX = return EIP");
    assert!(r.rcx > USER && r.rcx < USER + 0x20);
    let s = g.sregs();
    assert_eq!(s.cs.selector, SEL_CODE32);
    assert!(s.cs.db && !s.cs.l);
    assert_eq!(r.rflags & 0x200, 0, "IF cleared on entry");
}

#[test]
fn mmx_state_is_the_x87_state_in_fxsave_and_fxrstor() {
    let mut g = guest();
    g.w64(DATA, 0x1122_3344_5566_7788);
    let img = DATA + 0x200;
    let (_, done) = run(&mut g, |a| {
        a.fninit()?;
        a.fld1()?; // TOP = 7, one register tagged
        a.movq(mm3, qword_ptr(DATA as i32))?;
        a.fxsave(ptr(img as i32))?;
        // Restore an image whose R5 mantissa is changed: MM5 reads it.
        a.mov(rax, 0x0102_0304_0506_0708u64)?;
        a.mov(qword_ptr(img as i32 + 32 + 5 * 16), rax)?;
        a.fxrstor(ptr(img as i32))?;
        a.movq(rsi, mm5)?;
        a.emms()?;
        a.fnstsw(ax)?;
        a.movzx(edi, ax)?;
        a.fxsave(ptr(img as i32 + 0x200))
    });
    assert_eq!(done, DONE);
    // After MOVQ: TOP = 0 (FSW bits 13:11), all eight tagged (abridged
    // FTW 0xff), MM3 = R3 = ST(3): mantissa the value, bits 79:64 ones.
    let fsw = g.r64(img) >> 16 & 0xffff;
    assert_eq!(fsw >> 11 & 7, 0, "TOP after an MMX instruction");
    assert_eq!(g.r64(img) >> 32 & 0xff, 0xff, "all tags valid");
    assert_eq!(g.r64(img + 32 + 3 * 16), 0x1122_3344_5566_7788);
    assert_eq!(g.r64(img + 40 + 3 * 16) & 0xffff, 0xffff);
    let r = g.regs();
    assert_eq!(r.rsi, 0x0102_0304_0506_0708, "MM5 from the restored image");
    assert_eq!(r.rdi >> 11 & 7, 0);
    // EMMS empties the tags.
    assert_eq!(g.r64(img + 0x200) >> 32 & 0xff, 0, "EMMS");
}

#[test]
fn every_advertised_vector_instruction_executes() {
    // Every legacy encoding (no prefix, 66, F2, F3, 66 F2, each with and
    // without REX.W; maps 0F, 0F 38, 0F 3A; register and memory forms with
    // each ModRM.reg) that decodes to an instruction
    // of MMX, SSE to SSE4.2, POPCNT or LZCNT runs without an exception and
    // without an internal error: nothing CPUID advertises is missing.
    use emu::cpuid::has_feature;
    use iced_x86::{CpuidFeature as F, Decoder, DecoderOptions};
    let cfg = CpuidConfig::default();
    let families = [
        F::MMX,
        F::SSE,
        F::SSE2,
        F::SSE3,
        F::SSSE3,
        F::SSE4_1,
        F::SSE4_2,
        F::POPCNT,
        F::LZCNT,
    ];
    let mut g = guest();
    let mut r0 = g.regs();
    r0.rip = CODE;
    r0.rbx = DATA;
    r0.rdi = DATA;
    let mut mnemonics = std::collections::BTreeSet::new();
    let prefixes: [&[u8]; 10] = [
        &[],
        &[0x66],
        &[0xf2],
        &[0xf3],
        &[0x66, 0xf2],
        &[0x48],
        &[0x66, 0x48],
        &[0xf2, 0x48],
        &[0xf3, 0x48],
        &[0x66, 0xf2, 0x48],
    ];
    let modrms: Vec<u8> = (0..8u8)
        .flat_map(|r| [0xc1 | r << 3, 0x03 | r << 3])
        .collect();
    let maps: [&[u8]; 3] = [&[0x0f], &[0x0f, 0x38], &[0x0f, 0x3a]];
    for prefix in prefixes {
        for map in maps {
            for op in 0..=255u8 {
                for &modrm in &modrms {
                    let mut b = prefix.to_vec();
                    b.extend_from_slice(map);
                    b.extend_from_slice(&[op, modrm, 0x01]);
                    let mut d = Decoder::with_ip(64, &b, CODE, DecoderOptions::NONE);
                    let insn = d.decode();
                    let f = insn.cpuid_features();
                    if insn.is_invalid()
                        || !f.iter().any(|x| families.contains(x))
                        || !f.iter().all(|x| has_feature(&cfg, *x))
                    {
                        continue;
                    }
                    let mut code = b[..insn.len()].to_vec();
                    code.extend_from_slice(&[0xbb, 0x0e, 0x0d, 0, 0, 0xf4]); // mov ebx, DONE; hlt
                    g.write(CODE, &code);
                    g.write(DATA, &[0u8; 64]);
                    g.vcpu.core_mut().flush_all_caches();
                    // LDMXCSR [rbx] loads 0 (every exception unmasked).
                    g.vcpu.core_mut().st.mxcsr = 0x1f80;
                    g.set_regs(&r0);
                    let e = g.run();
                    assert_eq!(e, Ex::Halt, "{b:02x?} ({insn}): exit");
                    let r = g.regs();
                    assert_eq!(r.rbx, DONE, "{b:02x?} ({insn}): exception {:#x}", r.rax);
                    mnemonics.insert(format!("{:?}", insn.mnemonic()));
                }
            }
        }
    }
    eprintln!("{} mnemonics executed", mnemonics.len());
    assert!(mnemonics.len() > 260, "{mnemonics:?}");
}

#[test]
fn unmasked_simd_float_exceptions_raise_xm_and_masked_ones_set_flags() {
    // 1.0 / 0.0 with ZM cleared: #XM (CR4.OSXMMEXCPT is set), ZE in MXCSR,
    // the destination unchanged. Masked: the flag alone, and infinity.
    for masked in [false, true] {
        let mut g = guest();
        let mxcsr: u32 = if masked { 0x1f80 } else { 0x1f80 & !(1 << 9) };
        g.write(DATA, &mxcsr.to_le_bytes());
        g.write(DATA + 4, &1.0f32.to_le_bytes());
        let (v, done) = run(&mut g, |a| {
            a.ldmxcsr(dword_ptr(DATA as i32))?;
            a.movss(xmm0, dword_ptr(DATA as i32 + 4))?;
            a.xorps(xmm1, xmm1)?;
            a.divss(xmm0, xmm1)?;
            a.mov(eax, 0xffff_ffffu32)?;
            a.stmxcsr(dword_ptr(DATA as i32 + 8))
        });
        let st = g.vcpu.core().st.mxcsr;
        assert_ne!(st & 4, 0, "ZE set (masked={masked})");
        let x0 = g.vcpu.core().st.xmm[0] as u32;
        if masked {
            assert_eq!(done, DONE);
            assert_eq!(f32::from_bits(x0), f32::INFINITY);
        } else {
            assert_ne!(done, DONE);
            assert_eq!(v, 19, "#XM");
            assert_eq!(f32::from_bits(x0), 1.0, "destination unchanged");
        }
    }
}
