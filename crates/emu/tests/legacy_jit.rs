//! Translated 32- and 16-bit code (protected mode, real mode) against the
//! interpreter.
//!
//! Every case runs twice from the same state: interpreted only, and with
//! the translator at threshold 0 (every block compiled on its first run).
//! Registers, flags, the segment state and the guest memory the code uses
//! must be equal, and each case also checks the values it computes, so
//! that the interpreter (which `diff_host.rs` checks against the host CPU
//! for the same instruction semantics in 64-bit mode) is not trusted
//! blindly. Segment bases are non-zero and not page aligned wherever a
//! case allows it.
//!
//! An access whose translated address were wrong (a segment base left
//! out, a stack offset wrapped at the wrong size) would find no TLB entry
//! for the wrong page and run through the interpreter, which gets it
//! right: so the cases first write those wrong pages through a segment
//! based at 0 (an OR of 0: a TLB entry good for writes), and their inline
//! path then finds an entry there.

mod common;

use common::*;
use hypervisor::{DescriptorTable, Segment, SpecialRegs, StandardRegs, Vcpu};
use iced_x86::code_asm::*;

const MEM: usize = 8 << 20;
/// The cases' own GDT (not `common`'s).
const GDT32: u64 = 0x6000;
const IDT32: u64 = 0x6800;

const CF: u64 = 1;
const PF: u64 = 4;
const AF: u64 = 0x10;
const ZF: u64 = 0x40;
const SF: u64 = 0x80;
const OF: u64 = 0x800;

/// A GDT descriptor: `base`, 4 GiB limit (page granular), access byte
/// `access`, D/B from `big`.
fn desc(base: u64, access: u64, big: bool) -> u64 {
    0xffff
        | ((base & 0xff_ffff) << 16)
        | (access << 40)
        | (0xf << 48)
        | ((big as u64) << 54)
        | (1 << 55)
        | (((base >> 24) & 0xff) << 56)
}

/// Ring-0 code (0x9b: execute/read, accessed) and data (0x93: read/write,
/// accessed) descriptors.
const ACC_CODE: u64 = 0x9b;
const ACC_DATA: u64 = 0x93;

/// The state a case starts from.
struct Start {
    /// GDT entries from selector 8 on.
    gdt: Vec<u64>,
    /// Selectors of CS, DS, ES, SS (protected mode) or real-mode segments.
    cs: u16,
    ds: u16,
    es: u16,
    ss: u16,
    /// FS (GS is DS).
    fs: u16,
    protected: bool,
    cr0: u64,
    cr3: u64,
    rip: u64,
    rsp: u64,
    rflags: u64,
    gpr: [u64; 8],
    /// Code (and data) to load: (physical address, bytes).
    load: Vec<(u64, Vec<u8>)>,
}

impl Default for Start {
    fn default() -> Self {
        Start {
            gdt: Vec::new(),
            cs: 0,
            ds: 0,
            es: 0,
            ss: 0,
            fs: 0,
            protected: true,
            cr0: 0x11,
            cr3: 0,
            rip: 0,
            rsp: 0,
            rflags: 2,
            gpr: [0; 8],
            load: Vec::new(),
        }
    }
}

/// What a run ends with.
#[derive(Debug, PartialEq, Eq)]
struct End {
    exit: Ex,
    regs: StandardRegs,
    segs: Vec<(u16, u64, bool)>,
    cr2: u64,
    icount: u64,
}

fn guest(s: &Start, jit: Option<u32>) -> Guest {
    let mut g = Guest::new(MEM);
    g.vcpu.core_mut().jit.threshold = jit;
    for (i, d) in s.gdt.iter().enumerate() {
        g.w64(GDT32 + 8 + 8 * i as u64, *d);
    }
    for (at, bytes) in &s.load {
        g.write(*at, bytes);
    }
    let seg = |sel: u16, code: bool| {
        if s.protected {
            let d = s.gdt[(sel as usize >> 3) - 1];
            Segment::from_gdt_entry(sel, d)
        } else {
            Segment::real_mode(sel, code)
        }
    };
    let sr = SpecialRegs {
        cs: seg(s.cs, true),
        ds: seg(s.ds, false),
        es: seg(s.es, false),
        fs: seg(if s.protected && s.fs == 0 { s.ds } else { s.fs }, false),
        gs: seg(s.ds, false),
        ss: seg(s.ss, false),
        tr: Segment {
            type_: 0xb,
            present: true,
            limit: 0xffff,
            ..Default::default()
        },
        ldt: Segment {
            type_: 2,
            present: true,
            limit: 0xffff,
            ..Default::default()
        },
        gdt: DescriptorTable {
            base: GDT32,
            limit: 8 * (s.gdt.len() as u16 + 1) - 1,
        },
        idt: DescriptorTable {
            base: if s.protected { IDT32 } else { 0 },
            limit: if s.protected { 0x7ff } else { 0x3ff },
        },
        cr0: s.cr0,
        cr3: s.cr3,
        ..Default::default()
    };
    g.vcpu.set_sregs(&sr).unwrap();
    let v = s.gpr;
    g.vcpu
        .set_regs(&StandardRegs {
            rax: v[0],
            rcx: v[1],
            rdx: v[2],
            rbx: v[3],
            rbp: v[4],
            rsi: v[5],
            rdi: v[6],
            r8: v[7],
            rip: s.rip,
            rsp: s.rsp,
            rflags: s.rflags,
            ..Default::default()
        })
        .unwrap();
    g
}

/// Run to the first exit that is not a port write (those are noted in
/// the trace), at most `max` of them.
fn run(g: &mut Guest, trace: &mut Vec<(u16, Vec<u8>)>) -> Ex {
    for _ in 0..1000 {
        match g.run() {
            Ex::IoOut(p, d) => trace.push((p, d)),
            e => return e,
        }
    }
    Ex::Other("too many exits".into())
}

fn end(g: &mut Guest, exit: Ex) -> End {
    let sr = g.sregs();
    End {
        exit,
        regs: g.regs(),
        segs: [sr.cs, sr.ds, sr.es, sr.ss]
            .iter()
            .map(|s| (s.selector, s.base, s.db))
            .collect(),
        cr2: sr.cr2,
        icount: g.vcpu.core().icount,
    }
}

/// Run `s` interpreted and translated; both must end alike, with equal
/// memory, and RFLAGS but for the `undefined` bits. Returns the translated
/// run's end and guest.
fn both(s: &Start, undefined: u64) -> (End, Guest) {
    let mut i = guest(s, None);
    let mut j = guest(s, Some(0));
    let (mut ti, mut tj) = (Vec::new(), Vec::new());
    let ei = run(&mut i, &mut ti);
    let ej = run(&mut j, &mut tj);
    let (mut ei, mut ej) = (end(&mut i, ei), end(&mut j, ej));
    ei.regs.rflags &= !undefined;
    ej.regs.rflags &= !undefined;
    assert_eq!(ei, ej, "interpreted vs translated");
    assert_eq!(ti, tj, "port writes");
    if let Some(at) = i.ram.iter().zip(j.ram.iter()).position(|(a, b)| a != b) {
        panic!(
            "memory differs at {at:#x}: interpreted {:#x}, translated {:#x}",
            i.ram[at], j.ram[at]
        );
    }
    assert!(
        j.vcpu.core().jit.compiled > 0,
        "no block went through the translator"
    );
    (ej, j)
}

/// 32-bit protected-mode code with a non-zero, unaligned base on every
/// segment: ALU forms and flags, memory operands through DS, ES and SS
/// (EBP- and ESP-based), a 16-bit address (0x67) that wraps, PUSH/POP/CALL
/// /RET on a 32-bit stack, a self-loop, chained and indirect jumps.
#[test]
fn protected_mode_32bit_code_with_segment_bases() {
    // Pages whose TLB entries (512, indexed by the low bits of the page
    // number) are not those of the low pages the warm-up writes.
    const CSB: u64 = 0x10_0400;
    const DSB: u64 = 0x21_0230;
    const ESB: u64 = 0x32_0010;
    const SSB: u64 = 0x43_0ff0;
    const EIP: u64 = 0x1000;
    const FAR: u64 = 0x1800;
    const BACK: u64 = 0x1900;
    const TABLE: u64 = 0x1a00;
    let code = assemble(32, EIP, |a| {
        let mut sub = a.create_label();
        let mut l = a.create_label();
        let mut next = a.create_label();
        // The pages the offsets alone would address (data, stack, code).
        a.or(dword_ptr(0x104).fs(), 0)?;
        a.or(dword_ptr(0x7ff0).fs(), 0)?;
        a.or(dword_ptr(TABLE).fs(), 0)?;
        // REP MOVSD from DS to ES, REP STOSB to ES (their pages warm: the
        // translated copy runs, not the interpreter's from a TLB miss).
        a.or(dword_ptr(0x300), 0)?;
        a.or(dword_ptr(0x400).es(), 0)?;
        a.mov(esi, 0x300)?;
        a.mov(edi, 0x400)?;
        a.mov(ecx, 8)?;
        a.rep().movsd()?;
        a.mov(edi, 0x500)?;
        a.mov(eax, 0x5a5a_5a5a)?;
        a.mov(ecx, 5)?;
        a.rep().stosb()?;
        a.mov(dword_ptr(ebx + 0x600).es(), edi)?;
        a.mov(dword_ptr(ebx + 0x604).es(), esi)?;
        // MOVSB in a LOOP, LODSW and STOSW, MOVSD (no REP).
        let mut l3 = a.create_label();
        a.mov(esi, 0x300)?;
        a.mov(edi, 0x800)?;
        a.mov(ecx, 8)?;
        a.jmp(l3)?;
        a.set_label(&mut l3)?;
        a.movsb()?;
        a.loop_(l3)?;
        a.lodsw()?;
        a.stosw()?;
        a.movsd()?;
        a.mov(dword_ptr(ebx + 0x610).es(), edi)?;
        a.mov(dword_ptr(ebx + 0x614).es(), esi)?;
        a.mov(dword_ptr(ebx + 0x618).es(), eax)?;
        // A REP MOVSD over several pages (the interpreter's, page by page).
        a.mov(esi, 0x1000)?;
        a.mov(edi, 0x3000)?;
        a.mov(ecx, 0x900)?;
        a.rep().movsd()?;
        a.mov(eax, 0x1234_5678)?;
        a.mov(ebx, 0x100)?;
        a.mov(dword_ptr(ebx + 4), eax)?;
        a.mov(ecx, dword_ptr(ebx + 4))?;
        a.add(ecx, 0x7111_1111)?; // OF set
        a.mov(dword_ptr(ebx * 2 + 8).es(), ecx)?;
        a.mov(edx, dword_ptr(0x208).es())?;
        a.adc(edx, ecx)?;
        a.sbb(edx, 3)?;
        a.xor(dl, 0x5a)?;
        a.shl(edx, 3)?;
        a.inc(dword_ptr(ebx + 4))?;
        a.sub(word_ptr(ebx + 6), 0x77)?;
        a.movzx(esi, byte_ptr(ebx + 5))?;
        a.movsx(edi, word_ptr(ebx + 6))?;
        a.cmp(esi, edi)?;
        a.setl(byte_ptr(ebx + 0x20))?;
        a.cmovg(edi, esi)?;
        a.lea(ebp, dword_ptr(ebx + esi * 4 + 0x10))?;
        // 16-bit addressing in 32-bit code: 0xfff0 + 0x30 wraps to 0x20.
        a.mov(esi, 0x3_fff0)?;
        a.mov(word_ptr(si + 0x30), 0x4321)?;
        a.mov(ax, word_ptr(0x20))?;
        // The stack: SS-relative through ESP and EBP.
        a.push(eax)?;
        a.push(0x55)?;
        a.push(-2)?;
        a.mov(ebp, esp)?;
        a.mov(dword_ptr(ebp + 4), 0x66)?;
        a.pop(esi)?;
        a.pop(edi)?;
        a.pop(dword_ptr(ebx + 0x40))?;
        a.call(sub)?;
        a.mov(ecx, 10)?;
        a.set_label(&mut l)?;
        a.add(eax, ecx)?;
        a.dec(ecx)?;
        a.jne(l)?;
        a.jmp(next)?;
        a.set_label(&mut sub)?;
        a.mov(edx, dword_ptr(esp))?;
        a.add(eax, 1)?;
        a.ret()?;
        a.set_label(&mut next)?;
        // LOOP with CX (0x67) as its own block, the upper half of ECX
        // kept; JECXZ not taken.
        let mut l2 = a.create_label();
        let mut ok = a.create_label();
        a.mov(ecx, 0x3_0004)?;
        a.jmp(l2)?;
        a.set_label(&mut l2)?;
        a.inc(eax)?;
        a.db(&[0x67, 0xe2, 0xfc])?;
        a.jecxz(ok)?;
        a.add(eax, 0x100)?;
        a.set_label(&mut ok)?;
        a.mov(dword_ptr(0x700).es(), ecx)?;
        // Through a table in the code segment to FAR, which calls BACK.
        a.mov(edx, TABLE as u32)?;
        a.jmp(dword_ptr(edx).cs())
    });
    let far = assemble(32, FAR, |a| {
        a.mov(edx, BACK as u32)?;
        a.call(edx)
    });
    let back = assemble(32, BACK, |a| {
        a.xor(eax, 0xff)?;
        a.hlt()
    });
    let s = Start {
        gdt: vec![
            desc(CSB, ACC_CODE, true),
            desc(DSB, ACC_DATA, true),
            desc(ESB, ACC_DATA, true),
            desc(SSB, ACC_DATA, true),
            desc(0, ACC_DATA, true),
        ],
        cs: 8,
        ds: 16,
        es: 24,
        ss: 32,
        fs: 40,
        rip: EIP,
        rsp: 0x8000,
        load: vec![
            (CSB + EIP, code),
            (CSB + FAR, far),
            (CSB + BACK, back),
            (CSB + TABLE, (FAR as u32).to_le_bytes().to_vec()),
            (DSB + 0x300, (1..=32).collect()),
            (
                DSB + 0x1000,
                (0..0x2400u32).map(|i| (i * 7 + i / 256) as u8).collect(),
            ),
        ],
        ..Default::default()
    };
    let (e, g) = both(&s, 0);
    assert_eq!(e.exit, Ex::Halt);
    let r = &e.regs;
    assert_eq!(g.r32(DSB + 0x104), 0x11bd_5679);
    assert_eq!(g.r32(ESB + 0x208), 0x8345_6789);
    let copied: Vec<u8> = (1..=32).collect();
    assert_eq!(
        &g.ram[ESB as usize + 0x400..][..32],
        &copied[..],
        "REP MOVSD"
    );
    assert_eq!(
        &g.ram[ESB as usize + 0x500..][..6],
        &[0x5a, 0x5a, 0x5a, 0x5a, 0x5a, 0],
        "REP STOSB"
    );
    assert_eq!(g.r32(ESB + 0x600), 0x505, "EDI after the REP STOSB");
    assert_eq!(
        &g.ram[ESB as usize + 0x800..][..14],
        &copied[..14],
        "MOVSB, STOSW, MOVSD"
    );
    assert_eq!(g.r32(ESB + 0x610), 0x80e, "EDI after them");
    assert_eq!(g.r32(ESB + 0x614), 0x30e, "ESI after them");
    assert_eq!(g.r32(ESB + 0x618) & 0xffff, 0x0a09, "LODSW");
    assert_eq!(
        g.ram[ESB as usize + 0x3000..][..0x2400],
        g.ram[DSB as usize + 0x1000..][..0x2400],
        "the long REP MOVSD"
    );
    assert_eq!(g.r32(ESB + 0x604), 0x320, "ESI after the REP MOVSD");
    assert_eq!(g.r32(DSB + 0x120) & 0xff, 1, "SETL");
    assert_eq!(
        g.r32(DSB + 0x20) & 0xffff,
        0x4321,
        "the 16-bit address wrapped"
    );
    assert_eq!(g.r32(DSB + 0x140), 0x1234_4321);
    assert_eq!(r.rsi, 0xffff_fffe);
    assert_eq!(r.rdi, 0x66);
    assert_eq!(r.rbp, 0x7ff4);
    assert_eq!(r.rdx, BACK);
    // The indirect CALL's return address is still on the stack.
    assert_eq!(r.rsp, 0x7ffc);
    assert_eq!(g.r32(SSB + 0x7ffc) as u64, FAR + 7);
    assert_eq!(g.r32(ESB + 0x700), 0x3_0000, "LOOP kept ECX's upper half");
    assert_eq!(r.rax, (0x1234_4321 + 1 + 55 + 4 + 0x100) ^ 0xff);
}

/// Real-mode (16-bit) code with segment bases from the selectors:
/// `[bx+si+disp]` wrapping at 64 KiB, a 16-bit stack whose SP wraps below
/// 0, PUSH/POP/CALL/RET of 16 bits and a 32-bit operand (0x66), a 32-bit
/// address (0x67), a self-loop and chained blocks.
#[test]
fn real_mode_16bit_code_with_wrapping() {
    const CS: u16 = 0x0712;
    const IP: u64 = 0x0100;
    let code = assemble(16, IP, |a| {
        let mut sub = a.create_label();
        let mut l = a.create_label();
        let mut next = a.create_label();
        // The pages the offsets alone would address.
        a.or(word_ptr(0).fs(), 0)?;
        a.or(word_ptr(0xfff0).fs(), 0)?;
        a.mov(ax, 0x1234)?;
        a.mov(bx, 0xfff0)?;
        a.mov(si, 0x20)?;
        a.mov(word_ptr(bx + si + 0x10), ax)?;
        a.mov(cx, word_ptr(0x20))?;
        a.add(cx, word_ptr(bx + si + 0x10))?;
        a.mov(dword_ptr(edx + 0x100), 0x0102_0304)?;
        a.add(dword_ptr(edx + 0x100), 0xffff)?;
        a.mov(word_ptr(di + 2).es(), 0x7788)?;
        a.push(ax)?;
        a.push(cx)?;
        a.push(0x77)?;
        a.push(eax)?;
        a.pop(edx)?;
        a.pop(dx)?;
        a.pop(di)?;
        a.call(sub)?;
        a.mov(cx, 5)?;
        a.set_label(&mut l)?;
        a.add(ax, cx)?;
        a.dec(cx)?;
        a.jnz(l)?;
        a.jmp(next)?;
        a.set_label(&mut sub)?;
        a.mov(bp, sp)?;
        a.mov(bp, word_ptr(bp))?;
        a.inc(ax)?;
        a.ret()?;
        a.set_label(&mut next)?;
        a.lea(si, word_ptr(bx + si + 0x44))?;
        // REP MOVSW whose destination offset wraps at 64 KiB.
        a.push(si)?;
        a.mov(si, 0x100)?;
        a.mov(di, 0xfff8)?;
        a.mov(cx, 8)?;
        a.rep().movsw()?;
        a.mov(word_ptr(0x200), di)?;
        a.pop(si)?;
        a.hlt()?;
        Ok(())
    });
    let ret_at = after_call(&code, IP);
    let s = Start {
        protected: false,
        cr0: 0x10,
        cs: CS,
        ds: 0x1001,
        es: 0x2003,
        ss: 0x3005,
        rip: IP,
        rsp: 0xdead_0004,
        gpr: [0, 0, 0x400, 0, 0, 0, 0x10, 0],
        load: vec![
            (((CS as u64) << 4) + IP, code),
            (0x10010 + 0x100, (0x41..=0x50).collect()),
        ],
        ..Default::default()
    };
    let (e, g) = both(&s, 0);
    assert_eq!(e.exit, Ex::Halt);
    let r = &e.regs;
    let (dsb, esb, ssb) = (0x10010u64, 0x20030u64, 0x30050u64);
    assert_eq!(g.r32(dsb + 0x20) & 0xffff, 0x1234);
    assert_eq!(r.rcx & 0xffff, 0);
    assert_eq!(g.r32(dsb + 0x500), 0x0103_0303);
    assert_eq!(g.r32(esb + 0x12) & 0xffff, 0x7788);
    // SP went 4, 2, 0, 0xfffe, 0xfffa and back to 2; the bits above kept.
    assert_eq!(g.r32(ssb + 0xfffe) & 0xffff, 0x77);
    assert_eq!(r.rdx & 0xffff, 0x77);
    assert_eq!(r.rdi & 0xffff, 8, "DI after the REP MOVSW wrapped");
    assert_eq!(r.rsp, 0xdead_0002);
    assert_eq!(r.rax & 0xffff, 0x1234 + 1 + 15);
    // The CALL's return address, read through BP.
    assert_eq!(r.rbp, ret_at);
    assert_eq!(r.rsi & 0xffff, (0xfff0 + 0x20 + 0x44) & 0xffff);
    let src: Vec<u8> = (0x41..=0x50).collect();
    assert_eq!(g.ram[esb as usize + 0xfff8..][..8], src[..8], "REP MOVSW");
    assert_eq!(
        g.ram[esb as usize..][..8],
        src[8..],
        "REP MOVSW after DI wrapped"
    );
    assert_eq!(g.r32(dsb + 0x200) & 0xffff, 8, "DI after the REP MOVSW");
}

/// The offset after the first CALL in 16-bit `code` assembled at `ip`.
fn after_call(code: &[u8], ip: u64) -> u64 {
    let mut d = iced_x86::Decoder::with_ip(16, code, ip, iced_x86::DecoderOptions::NONE);
    d.iter()
        .find(|i| i.mnemonic() == iced_x86::Mnemonic::Call)
        .map(|i| i.next_ip())
        .unwrap()
}

/// A block compiled for a 32-bit stack (SS.B set) runs again after SS was
/// loaded with a 16-bit one (same base): its stack accesses must wrap SP
/// at 64 KiB and keep ESP's upper half, as the interpreter does.
#[test]
fn a_block_compiled_for_one_stack_size_runs_with_the_other() {
    const SSB: u64 = 0x5_0010;
    let code = assemble(32, 0x2000, |a| {
        let mut again = a.create_label();
        let mut sub = a.create_label();
        let mut done = a.create_label();
        // The page a 32-bit stack offset would address in the second pass.
        a.or(dword_ptr(SSB as u32 + 0x7_0000).es(), 0)?;
        a.mov(esi, 2)?;
        a.set_label(&mut again)?;
        a.push(eax)?;
        a.push(0x1111)?;
        a.call(sub)?;
        a.pop(ecx)?;
        a.pop(edx)?;
        a.dec(esi)?;
        a.jz(done)?;
        a.mov(ax, 24)?;
        a.mov(ss, ax)?;
        a.mov(esp, 0x7_0006)?;
        a.mov(eax, 0xcafe)?;
        a.jmp(again)?;
        // Only stack instructions: an [ESP] operand would use all of ESP.
        a.set_label(&mut sub)?;
        a.pop(edi)?;
        a.pop(ecx)?;
        a.add(ecx, 0x22)?;
        a.push(ecx)?;
        a.push(edi)?;
        a.ret()?;
        a.set_label(&mut done)?;
        a.hlt()?;
        Ok(())
    });
    let s = Start {
        gdt: vec![
            desc(0, ACC_CODE, true),
            desc(SSB, ACC_DATA, true),
            desc(SSB, ACC_DATA, false),
            desc(0, ACC_DATA, true),
        ],
        cs: 8,
        ds: 16,
        es: 32,
        ss: 16,
        rip: 0x2000,
        rsp: 0x9000,
        gpr: [0xbeef, 0, 0, 0, 0, 0, 0, 0],
        load: vec![(0x2000, code)],
        ..Default::default()
    };
    let (e, g) = both(&s, 0);
    assert_eq!(e.exit, Ex::Halt);
    let r = &e.regs;
    assert_eq!(r.rsp, 0x7_0006);
    assert_eq!(r.rcx, 0x1133);
    assert_eq!(r.rdx, 0xcafe);
    // The second pass's slots: SP 6 -> 2 -> 0xfffe -> 0xfffa (the CALL).
    assert_eq!(g.r32(SSB + 2), 0xcafe);
    assert_eq!(g.r32(SSB + 0xfffe), 0x1133);
    assert_eq!(g.r32(SSB + 0xfffa), r.rdi as u32);
}

/// 32-bit paging: a translated access through a non-zero DS base to a
/// page that is not present faults with CR2 = the linear address, the
/// faulting EIP pushed; so does a POP from a stack page that is not (the
/// exception frame goes to the page below).
#[test]
fn page_faults_in_translated_32bit_code() {
    const PD: u64 = 0x50000;
    const PT: u64 = 0x51000;
    const HANDLER: u64 = 0xa000;
    for (fault_on_pop, want_cr2) in [(false, 0x61010u64), (true, 0x61000)] {
        let mut load = Vec::new();
        let mut pd = vec![0u8; 4096];
        pd[..4].copy_from_slice(&(PT as u32 | 3).to_le_bytes());
        load.push((PD, pd));
        let mut pt = Vec::new();
        for i in 0..1024u32 {
            let present = i != 0x61;
            pt.extend_from_slice(&((i << 12) | if present { 3 } else { 0 }).to_le_bytes());
        }
        load.push((PT, pt));
        let gate = (HANDLER & 0xffff) | (8u64 << 16) | (0x8eu64 << 40) | ((HANDLER >> 16) << 48);
        load.push((IDT32 + 14 * 8, gate.to_le_bytes().to_vec()));
        let h = assemble(32, HANDLER, |a| {
            a.mov(eax, cr2)?;
            a.mov(ebx, dword_ptr(esp))?;
            a.mov(ecx, dword_ptr(esp + 4))?;
            a.hlt()
        });
        load.push((HANDLER, h));
        let code = assemble(32, 0x3000, |a| {
            a.mov(edx, 5)?;
            a.add(edx, dword_ptr(0x100))?;
            a.mov(ebx, 0x5_1000)?;
            if fault_on_pop {
                a.mov(esp, 0x6_1000)?;
                a.pop(edx)?;
            } else {
                a.mov(dword_ptr(ebx + 0x10), edx)?;
            }
            a.hlt()
        });
        load.push((0x3000, code));
        let s = Start {
            gdt: vec![
                desc(0, ACC_CODE, true),
                desc(0x1_0000, ACC_DATA, true),
                desc(0, ACC_DATA, true),
            ],
            cs: 8,
            ds: 16,
            es: 16,
            ss: 24,
            cr0: 0x8000_0011,
            cr3: PD,
            rip: 0x3000,
            rsp: 0x9000,
            load,
            ..Default::default()
        };
        let (e, _) = both(&s, 0);
        assert_eq!(e.exit, Ex::Halt, "{e:x?}");
        assert_eq!(e.cr2, want_cr2);
        assert_eq!(e.regs.rax, want_cr2);
        let write = if fault_on_pop { 0 } else { 2 };
        assert_eq!(e.regs.rbx, write, "not present, ring 0");
        let at = if fault_on_pop { 0x3015 } else { 0x3010 };
        assert_eq!(e.regs.rcx, at, "the faulting instruction's EIP");
    }
}

/// Real mode: the same RET target offset under two CS bases. The RET's
/// dynamic link cell is keyed by the target IP alone; after the far jump
/// to the other code segment it must not lead to the block of the first.
#[test]
fn a_return_link_does_not_outlive_a_cs_base_change() {
    let first = assemble(16, 0, |a| {
        a.push(0x100)?;
        a.ret()
    });
    let first_target = assemble(16, 0x100, |a| {
        let mut stop = a.create_label();
        a.mov(ax, 1)?;
        a.inc(cx)?;
        a.cmp(cx, 2)?;
        a.jae(stop)?;
        a.jmp_far(0x0900, 0)?;
        a.set_label(&mut stop)?;
        a.hlt()
    });
    let second = assemble(16, 0, |a| {
        a.push(0x100)?;
        a.ret()
    });
    let second_target = assemble(16, 0x100, |a| {
        a.mov(bx, 2)?;
        a.hlt()
    });
    let s = Start {
        protected: false,
        cr0: 0x10,
        cs: 0x0800,
        ds: 0,
        es: 0,
        ss: 0,
        rip: 0,
        rsp: 0x7000,
        load: vec![
            (0x8000, first),
            (0x8100, first_target),
            (0x9000, second),
            (0x9100, second_target),
        ],
        ..Default::default()
    };
    let (e, _) = both(&s, 0);
    assert_eq!(e.exit, Ex::Halt);
    assert_eq!(e.regs.rbx, 2);
    assert_eq!(e.regs.rcx, 1);
    assert_eq!(e.segs[0].1, 0x9000);
}

/// Seeded random sequences of 32-bit code (flat segments except DS, whose
/// base is unaligned) against the interpreter: the forms of
/// `diff_host.rs`'s `random_sequences_match_host` that exist outside
/// 64-bit mode, plus 16-bit addresses, PUSH/POP and jumps between blocks.
#[test]
fn random_32bit_sequences_match_the_interpreter() {
    const DSB: u64 = 0x20_0100;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut rand = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let d = [eax, ecx, edx, esi, edi, ebp];
    let w = [ax, cx, dx, si, di, bp];
    let b = [al, cl, dl, ah, ch, dh];
    let mut compiled = 0;
    for case in 0..300 {
        // Flags the architecture leaves undefined at the end (as in
        // `diff_host.rs`; instructions that read flags only run while all
        // are defined).
        let mut undef = 0u64;
        let code = assemble(32, 0x4000, |a| {
            let len = 4 + rand() % 24;
            let mut pushed = 0;
            for _ in 0..len {
                let r = rand();
                let (i, j) = ((r >> 8) as usize % 6, (r >> 16) as usize % 6);
                let disp = ((r >> 24) % 31) as i32 * 4;
                let imm = (r >> 32) as i32;
                let k = (r >> 40) as u32 % 31 + 1;
                let defined = undef == 0;
                match r % 30 {
                    0 => a.add(d[i], d[j]).map(|_| undef = 0)?,
                    1 => a.sub(d[i], d[j]).map(|_| undef = 0)?,
                    2 => a.xor(w[i], w[j]).map(|_| undef = AF)?,
                    3 => a.and(b[i], b[j]).map(|_| undef = AF)?,
                    4 => a.or(d[i], imm).map(|_| undef = AF)?,
                    5 => a.cmp(d[i], imm).map(|_| undef = 0)?,
                    6 => a.add(d[i], dword_ptr(ebx + disp)).map(|_| undef = 0)?,
                    7 => a.sub(dword_ptr(ebx + disp), d[j]).map(|_| undef = 0)?,
                    8 => a.mov(d[i], dword_ptr(ebx + disp))?,
                    9 => a.mov(dword_ptr(ebx + disp), d[j])?,
                    10 => a.mov(d[i], imm)?,
                    11 => a.lea(d[i], dword_ptr(d[j] + d[i] * 4 + imm))?,
                    12 => a.inc(d[i]).map(|_| undef &= CF)?,
                    13 => a.dec(w[i]).map(|_| undef &= CF)?,
                    14 => a.neg(w[i]).map(|_| undef = 0)?,
                    15 => a.not(d[i])?,
                    16 => a
                        .shl(d[i], k)
                        .map(|_| undef = AF | if k > 1 { OF } else { 0 })?,
                    // A 16-bit SAR by 16 or more: CF is undefined too.
                    17 => a.sar(w[i], k).map(|_| {
                        undef = AF | if k > 1 { OF } else { 0 } | if k >= 16 { CF } else { 0 }
                    })?,
                    18 => a
                        .rol(d[i], k)
                        .map(|_| undef = (undef & !(CF | OF)) | if k > 1 { OF } else { 0 })?,
                    19 => a.imul_2(d[i], d[j]).map(|_| undef = SF | ZF | AF | PF)?,
                    20 => a.movzx(d[i], b[j])?,
                    21 => a.movsx(d[i], w[j])?,
                    22 => a.xchg(d[i], d[j])?,
                    23 => {
                        pushed += 1;
                        a.push(d[j])?
                    }
                    24 if pushed > 0 => {
                        pushed -= 1;
                        a.pop(d[i])?
                    }
                    25 if defined => a.adc(w[i], word_ptr(bx + disp))?,
                    26 => a.mov(word_ptr(bx + di + disp), w[j])?,
                    27 if defined => a.cmovl(d[i], d[j])?,
                    28 if defined => a.setbe(b[i])?,
                    29 if defined => {
                        let mut skip = a.create_label();
                        a.jne(skip)?;
                        a.add(d[i], 1)?;
                        a.set_label(&mut skip)?;
                        undef = 0;
                        a.nop()?
                    }
                    _ => a.nop()?,
                }
            }
            for _ in 0..pushed {
                a.pop(ebx)?;
            }
            a.hlt()
        });
        let mut data = vec![0u8; 0x1_0000];
        for x in data.iter_mut() {
            *x = rand() as u8;
        }
        let mut gpr = [0u64; 8];
        for (n, v) in gpr.iter_mut().enumerate() {
            *v = rand() & 0xffff_ffff;
            // EBX: the data pointer; EDI: 16-bit index into the data.
            if n == 3 {
                *v = 0x8000;
            }
            if n == 6 {
                *v &= 0x7fff;
            }
        }
        let s = Start {
            gdt: vec![
                desc(0, ACC_CODE, true),
                desc(DSB, ACC_DATA, true),
                desc(0, ACC_DATA, true),
            ],
            cs: 8,
            ds: 16,
            es: 24,
            ss: 24,
            rip: 0x4000,
            rsp: 0x9000,
            rflags: 2 | (rand() & (CF | PF | AF | ZF | SF | OF)),
            gpr,
            load: vec![(0x4000, code), (DSB, data)],
            ..Default::default()
        };
        let (e, g) = both(&s, undef);
        assert_eq!(e.exit, Ex::Halt, "case {case}");
        compiled += g.vcpu.core().jit.compiled;
    }
    assert!(compiled >= 300);
}

/// A jump whose target lies in the block's own EIP page but, with a CS
/// base that is not page aligned, in the next linear page: its link must
/// be checked under a new key, not followed straight (a direct link holds
/// only inside the block's own linear page). Paging maps that next
/// linear page onto the block's physical page, so the first successor
/// shares the block's physical page; then the guest maps it elsewhere
/// (INVLPG) and the jump must reach the new code.
#[test]
fn a_link_into_the_next_linear_page_is_checked_after_a_remap() {
    const PD: u64 = 0x50000;
    const PT: u64 = 0x51000;
    const CSB: u64 = 0x1_0800;
    let mut load = Vec::new();
    let mut pd = vec![0u8; 4096];
    pd[..4].copy_from_slice(&(PT as u32 | 3).to_le_bytes());
    load.push((PD, pd));
    let mut pt = Vec::new();
    for i in 0..1024u32 {
        // Linear page 0x12 is an alias of physical page 0x11.
        let phys = if i == 0x12 { 0x11 } else { i };
        pt.extend_from_slice(&((phys << 12) | 3).to_le_bytes());
    }
    load.push((PT, pt));
    // X at EIP 0x1700 (linear 0x11f00) jumps to EIP 0x1900 (linear
    // 0x12100): physical 0x11100 (A) first, 0x13100 (B) after the remap.
    let x = assemble(32, 0x1700, |a| {
        a.inc(eax)?;
        a.jmp(0x1900u64)
    });
    let a_code = assemble(32, 0x1900, |a| {
        a.add(ebx, 1)?;
        a.ret()
    });
    let b_code = assemble(32, 0x1900, |a| {
        a.add(ebx, 0x100)?;
        a.ret()
    });
    let driver = assemble(32, 0, |a| {
        a.call(0x1700u64)?;
        a.call(0x1700u64)?;
        a.mov(dword_ptr(PT as u32 + 0x12 * 4), 0x13003)?;
        a.invlpg(ptr(0x12000))?;
        a.call(0x1700u64)?;
        a.call(0x1700u64)?;
        a.hlt()
    });
    load.push((CSB, driver));
    load.push((CSB + 0x1700, x));
    load.push((0x11100, a_code));
    load.push((0x13100, b_code));
    let s = Start {
        gdt: vec![desc(CSB, ACC_CODE, true), desc(0, ACC_DATA, true)],
        cs: 8,
        ds: 16,
        es: 16,
        ss: 16,
        cr0: 0x8000_0011,
        cr3: PD,
        rip: 0,
        rsp: 0x9000,
        load,
        ..Default::default()
    };
    let (e, _) = both(&s, 0);
    assert_eq!(e.exit, Ex::Halt);
    assert_eq!(e.regs.rax, 4);
    assert_eq!(e.regs.rbx, 0x202, "twice A, then twice B");
}
