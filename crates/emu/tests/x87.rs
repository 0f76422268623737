//! x87 behaviour the differential suite (diff_host.rs, ring 3 on the host)
//! cannot show: #MF and CR0.NE, the instruction/data pointers and FOP, and
//! the 16-bit environment layouts. An exception lands in the harness's IDT
//! stub for its vector (`mov eax, vector; hlt`), so RAX names it.

mod common;

use common::*;
use hypervisor::Vcpu;
use iced_x86::code_asm::*;

/// Marker a guest leaves in RBX when it got through without an exception.
const DONE: u64 = 0xd0e;

/// Run `f` at CODE to HLT with CR0.NE as given; (RAX, RBX).
fn run(ne: bool, f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> (Guest, u64, u64) {
    let mut g = Guest::new(16 << 20);
    g.long_mode();
    let mut a = CodeAssembler::new(64).unwrap();
    (|| -> Result<(), IcedError> {
        a.mov(rax, cr0)?;
        if ne {
            a.or(rax, 0x20)?;
        } else {
            a.and(rax, !0x20)?;
        }
        a.mov(cr0, rax)?;
        a.mov(eax, 0xffff_ffffu32)?;
        a.mov(rbx, DATA)?;
        f(&mut a)?;
        a.mov(ebx, DONE as u32)?;
        a.hlt()
    })()
    .unwrap();
    let code = a.assemble(CODE).unwrap();
    g.load_code(&code);
    g.run_to_halt();
    let r = g.regs();
    (g, r.rax, r.rbx)
}

fn r16(g: &Guest, at: u64) -> u16 {
    g.r32(at) as u16
}

/// 1/0 with the zero-divide exception unmasked: the division only records
/// it (ZE, ES and B in the status word, which FNSTSW reads without
/// faulting); the next waiting x87 instruction raises #MF (vector 16).
#[test]
fn unmasked_exception_raises_mf_at_the_next_waiting_instruction() {
    let (g, vector, done) = run(true, |a| {
        a.mov(word_ptr(rbx), 0x37bu32)?; // ZM clear
        a.fninit()?;
        a.fldcw(word_ptr(rbx))?;
        a.fld1()?;
        a.fldz()?;
        a.fdivp(st1, st0)?;
        a.fnstsw(word_ptr(rbx + 8))?;
        a.mov(dword_ptr(rbx + 16), 1)?;
        a.wait()?;
        a.mov(dword_ptr(rbx + 16), 2)
    });
    assert_ne!(done, DONE);
    assert_eq!(vector, 16, "vector");
    assert_eq!(g.r32(DATA + 16), 1, "the FNSTSW ran, the FWAIT faulted");
    let fsw = r16(&g, DATA + 8);
    assert_eq!(fsw & 0x80ff, 0x8084, "B, ES and ZE: fsw {fsw:#x}");
    // FNCLEX clears it: no #MF afterwards.
    let (_, vector, done) = run(true, |a| {
        a.mov(word_ptr(rbx), 0x37bu32)?;
        a.fninit()?;
        a.fldcw(word_ptr(rbx))?;
        a.fld1()?;
        a.fldz()?;
        a.fdivp(st1, st0)?;
        a.fnclex()?;
        a.fld1()?;
        a.wait()
    });
    assert_eq!((vector, done), (0xffff_ffff, DONE));
}

/// MMX instructions (and EMMS) wait like x87 ones: #MF for a pending
/// unmasked exception.
#[test]
fn mmx_instructions_raise_pending_mf() {
    for emms in [false, true] {
        let (_, vector, done) = run(true, |a| {
            a.mov(word_ptr(rbx), 0x37bu32)?;
            a.fninit()?;
            a.fldcw(word_ptr(rbx))?;
            a.fld1()?;
            a.fldz()?;
            a.fdivp(st1, st0)?;
            if emms {
                a.emms()
            } else {
                a.paddb(mm0, mm1)
            }
        });
        assert_ne!(done, DONE, "emms {emms}");
        assert_eq!(vector, 16, "emms {emms}");
    }
}

/// With CR0.NE = 0 the engine reports nothing and lets the next waiting
/// instruction proceed (as with IGNNE# asserted); the flags stay pending.
#[test]
fn without_cr0_ne_pending_exceptions_do_not_fault() {
    let (g, vector, done) = run(false, |a| {
        a.mov(word_ptr(rbx), 0x37bu32)?;
        a.fninit()?;
        a.fldcw(word_ptr(rbx))?;
        a.fld1()?;
        a.fldz()?;
        a.fdivp(st1, st0)?;
        a.fld1()?;
        a.wait()?;
        a.fnstsw(word_ptr(rbx + 8))
    });
    assert_eq!((vector, done), (0xffff_ffff, DONE));
    assert_eq!(r16(&g, DATA + 8) & 0x80ff, 0x8084);
}

/// FNSTENV stores the last non-control instruction's address (FIP), its
/// opcode (FOP: the low 3 bits of the escape byte and the ModRM byte of
/// the guest's own encoding) and its memory operand's address (FDP), and
/// control instructions leave them alone.
#[test]
fn x87_pointers_and_opcode() {
    let (g, _, done) = run(true, |a| {
        let mut l = a.create_label();
        a.fninit()?;
        a.lea(rcx, ptr(l))?;
        a.mov(qword_ptr(rbx + 0x60), rcx)?;
        a.set_label(&mut l)?;
        a.fld(qword_ptr(rbx + 0x28))?; // dd 43 28
        a.fnstcw(word_ptr(rbx + 0x30))?;
        a.fnstenv(ptr(rbx + 0x40))
    });
    let fld_at = g.r64(DATA + 0x60);
    assert_eq!(done, DONE);
    assert_eq!(g.r32(DATA + 0x40 + 12) as u64, fld_at, "FIP");
    assert_eq!(g.r32(DATA + 0x40 + 16) >> 16, 0x543, "FOP");
    assert_eq!(g.r32(DATA + 0x40 + 20) as u64, DATA + 0x28, "FDP");
    // FSTENV masks all exceptions afterwards.
    assert_eq!(r16(&g, DATA + 0x30), 0x37f);
}

/// The 16-bit (operand-size prefix) FNSTENV/FNSAVE layouts: 14 bytes of
/// environment, then for FNSAVE the eight registers from ST(0); FRSTOR
/// of the same layout brings the state back.
#[test]
fn sixteen_bit_environment_layouts() {
    let (g, _, done) = run(true, |a| {
        a.fninit()?;
        a.fld1()?;
        a.fldpi()?;
        // o16 fnstenv [rbx+0x40]; o16 fnsave [rbx+0x80]
        a.db(&[0x66, 0xd9, 0x73, 0x40])?;
        a.db(&[0x66, 0xdd, 0xb3, 0x80, 0, 0, 0])?;
        a.fnstsw(word_ptr(rbx + 0x10))?;
        // o16 frstor [rbx+0x80]; then the top of stack is π again.
        a.db(&[0x66, 0xdd, 0xa3, 0x80, 0, 0, 0])?;
        a.fstp(tword_ptr(rbx + 0x20))
    });
    assert_eq!(done, DONE);
    let env = DATA + 0x40;
    assert_eq!(r16(&g, env), 0x37f, "FCW");
    assert_eq!(r16(&g, env + 2) >> 11 & 7, 6, "TOP");
    // Tags: physical 7 (1.0) valid, physical 6 (π) valid, the rest empty.
    assert_eq!(r16(&g, env + 4), 0x0fff, "FTW");
    assert_eq!(r16(&g, DATA + 0x80 + 4), 0x0fff, "FNSAVE FTW");
    assert_eq!(g.r64(DATA + 0x80 + 14), 0xc90f_daa2_2168_c235, "ST(0) = π");
    assert_eq!(g.r64(DATA + 0x80 + 24), 1 << 63, "ST(1) = 1");
    // FNSAVE re-initialised: the status word read afterwards is clear.
    assert_eq!(r16(&g, DATA + 0x10), 0);
    assert_eq!(g.r64(DATA + 0x20), 0xc90f_daa2_2168_c235, "restored π");
}

/// A snapshot carries the whole x87 state: registers (80 bits), TOP, tags,
/// control word, pending exception flags, FOP/FIP/FDP. A vCPU restored
/// from it (through JSON, as the manifest stores it) stores the same
/// FNSAVE image as the original.
#[test]
fn snapshot_carries_the_x87_state() {
    let mut g = Guest::new(16 << 20);
    g.long_mode();
    let code = {
        let mut a = CodeAssembler::new(64).unwrap();
        (|| -> Result<(), IcedError> {
            a.mov(rax, cr0)?;
            a.or(rax, 0x20)?;
            a.mov(cr0, rax)?;
            a.mov(rbx, DATA)?;
            a.mov(word_ptr(rbx), 0x27bu32)?; // 53-bit precision, ZE unmasked
            a.fninit()?;
            a.fldcw(word_ptr(rbx))?;
            a.mov(qword_ptr(rbx + 8), -3)?;
            a.fild(qword_ptr(rbx + 8))?;
            a.fldpi()?;
            a.fld1()?;
            a.fldz()?;
            a.fdivp(st1, st0)?; // ZE pending: the next waiting one would #MF
            a.out(0x99, al)?; // The snapshot is taken here.
            a.fnsave(ptr(rbx + 0x100))?; // No-wait: no #MF.
            a.mov(ebx, DONE as u32)?;
            a.hlt()
        })()
        .unwrap();
        a.assemble(CODE).unwrap()
    };
    g.load_code(&code);
    assert!(matches!(g.run(), Ex::IoOut(0x99, _)));
    let snap = g.vcpu.save_state().unwrap();
    let snap: hypervisor::VcpuSnapshot =
        serde_json::from_str(&serde_json::to_string(&snap).unwrap()).unwrap();
    let mut h = Guest::new(16 << 20);
    h.ram.copy_from_slice(&g.ram);
    h.vcpu.restore_state(&snap).unwrap();
    g.run_to_halt();
    h.run_to_halt();
    assert_eq!(g.regs().rbx, DONE);
    assert_eq!(h.regs().rbx, DONE);
    let img = |x: &Guest| x.ram[(DATA + 0x100) as usize..(DATA + 0x100 + 108) as usize].to_vec();
    assert_eq!(img(&g), img(&h), "FNSAVE image after restore");
    let fsw = u16::from_le_bytes([
        g.ram[(DATA + 0x104) as usize],
        g.ram[(DATA + 0x105) as usize],
    ]);
    assert_eq!(fsw & 0x80ff, 0x8084, "ZE pending with ES and B: {fsw:#x}");
    assert_eq!(
        u16::from_le_bytes([
            g.ram[(DATA + 0x100) as usize],
            g.ram[(DATA + 0x101) as usize]
        ]),
        0x27b,
        "FCW"
    );
}
