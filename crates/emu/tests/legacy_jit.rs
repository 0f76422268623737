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
//! The random 32-bit programs also run on the host CPU, in compatibility
//! mode (`host32`, `random_32bit_sequences_match_host`): flat, all forms
//! but 16-bit addresses, which would address below the host's
//! `vm.mmap_min_addr`; and as 16-bit code with 16-bit addresses in 16-bit
//! segments based at 64 KiB and above (`random_16bit_sequences_match_host`,
//! the host's segments from its LDT). Real mode, segment loads and
//! unaligned segment bases are checked against the interpreter only.
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
    /// Guest memory size.
    mem: usize,
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
            mem: MEM,
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
    let mut g = Guest::new(s.mem);
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

/// A seeded random program of 32-bit code at `at`, ending in HLT: the
/// forms of `diff_host.rs`'s `random_sequences_match_host` that exist
/// outside 64-bit mode, plus PUSH/POP and jumps between blocks. Memory
/// operands address off EBX (displacements 0..120), which the program
/// never changes; with `bx16`, two of the forms use 16-bit addresses
/// (`[bx+disp]`, `[bx+di+disp]`, with DI below 0x8000), otherwise those
/// two use 32-bit addresses off EBX. Returns the code and the flags the
/// architecture leaves undefined at its end.
fn random_32bit_program(
    rand: &mut impl FnMut() -> u64,
    bits: u32,
    at: u64,
    bx16: bool,
) -> (Vec<u8>, u64) {
    let d = [eax, ecx, edx, esi, edi, ebp];
    let w = [ax, cx, dx, si, di, bp];
    let b = [al, cl, dl, ah, ch, dh];
    // Flags the architecture leaves undefined at the end (as in
    // `diff_host.rs`; instructions that read flags only run while all
    // are defined).
    let mut undef = 0u64;
    let code = assemble(bits, at, |a| {
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
                25 if defined && bx16 => a.adc(w[i], word_ptr(bx + disp))?,
                25 if defined => a.adc(w[i], word_ptr(ebx + disp + 1))?,
                26 if bx16 => a.mov(word_ptr(bx + di + disp), w[j])?,
                26 => a.mov(word_ptr(ebx + disp + 3), w[j])?,
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
    (code, undef)
}

/// Seeded random sequences of 32-bit code (flat segments except DS, whose
/// base is unaligned) against the interpreter, 16-bit addresses included
/// (`random_32bit_program`).
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
    let mut compiled = 0;
    for case in 0..300 {
        let (code, undef) = random_32bit_program(&mut rand, 32, 0x4000, true);
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

/// The host CPU running 32- and 16-bit code: a 64-bit process switches to
/// compatibility mode (Linux's flat user code selector 0x23, data 0x2b)
/// with a far return and back with a 32-bit far return to 0x33. One
/// fixed mapping below 4 GiB holds everything, at the same addresses the
/// engine's flat guest uses:
///
/// - `ENTRY`: 64-bit entry (saves the callee-saved registers, RSP and
///   DS/ES/SS in `IO`, loads DS/ES with 0x2b, far-returns to the loader
///   named in `IO`, `LOAD32` or `LOAD16`);
/// - `LOAD32`: loads EFLAGS (on a scratch stack in `IO`), EAX..EDI from
///   `IO`, ESP = `STACK_TOP`, jumps to `CODE`;
/// - `CODE`: the program without its HLT, then an exit that stores
///   EAX..EDI, ESP and EFLAGS (again on the scratch stack, so that the
///   program's stack is left as it left it) and far-returns to `BACK64`;
/// - `BACK64`: restores RSP, DS/ES/SS and the callee-saved registers.
///
/// 16-bit code runs in the process's LDT (`modify_ldt`): a 16-bit code
/// segment based at `R`, 16-bit data segments based at `DATA` (DS, SS) and
/// at `R` (ES, which only the exit uses). `LOAD16` (32-bit code) loads
/// EFLAGS and EAX..EDI, then the segments and SP, and far-jumps to the
/// program; its exit stores through ES and loads SS:ESP for the far return
/// with LSS (neither touches the flags).
mod host32 {
    use super::*;
    use std::sync::{Mutex, OnceLock};

    pub const R: u64 = 0x1_0000;
    const SIZE: usize = 0x2_0000;
    const ENTRY: u64 = R;
    const LOAD32: u64 = R + 0x400;
    const BACK64: u64 = R + 0x800;
    const LOAD16: u64 = R + 0xc00;
    /// LDT selectors (TI = 1, RPL = 3): 16-bit code at R, 16-bit data at
    /// `DATA`, 16-bit data at R.
    const SEL_CODE16: u16 = 7;
    const SEL_DATA: u16 = 0xf;
    const SEL_R: u16 = 0x17;
    /// The 16-bit programs' initial SP (SS based at `DATA`).
    pub const SP16: u64 = 0x8000;
    /// Inputs (EAX..EDI as 0..7 with ESP's slot unused, EFLAGS at 0x20),
    /// outputs (the same at `OUT`), the saved RSP (0x80), DS/ES/SS
    /// (0x88), the loader's address (0x90), the 16-bit exit's SS:ESP
    /// (0x98), the scratch stack's top (0x200).
    const IO: u64 = R + 0x1000;
    const OUT: u64 = IO + 0x40;
    const SCRATCH: u64 = IO + 0x200;
    pub const CODE: u64 = R + 0x2000;
    pub const STACK_TOP: u64 = R + 0x8000;
    pub const DATA: u64 = R + 0x8000;
    pub const DATA_LEN: usize = 0x1_0000;
    /// What is compared of memory: the stack, the data and the bytes after
    /// it that a 16-bit access at offset 0xffff reaches.
    pub const CHECKED: std::ops::Range<usize> = (R as usize + 0x4000)..(R as usize + 0x1_8010);
    /// The engine guest's memory size.
    pub const MEM: usize = R as usize + SIZE;

    fn region() -> &'static Mutex<()> {
        static REGION: OnceLock<Mutex<()>> = OnceLock::new();
        REGION.get_or_init(|| {
            // SAFETY: a new anonymous mapping at a fixed address that must
            // not replace anything (checked).
            let p = unsafe {
                libc::mmap(
                    R as *mut libc::c_void,
                    SIZE,
                    libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                    -1,
                    0,
                )
            };
            assert_eq!(p as u64, R, "mmap at {R:#x} failed");
            let entry = assemble(64, ENTRY, |a| {
                for r in [rbx, rbp, r12, r13, r14, r15] {
                    a.push(r)?;
                }
                a.mov(rcx, IO)?;
                a.mov(qword_ptr(rcx + 0x80), rsp)?;
                a.mov(ax, ds)?;
                a.mov(word_ptr(rcx + 0x88), ax)?;
                a.mov(ax, es)?;
                a.mov(word_ptr(rcx + 0x8a), ax)?;
                a.mov(ax, ss)?;
                a.mov(word_ptr(rcx + 0x8c), ax)?;
                a.mov(eax, 0x2b)?;
                a.mov(ds, ax)?;
                a.mov(es, ax)?;
                a.push(0x23)?;
                a.push(qword_ptr(rcx + 0x90))?;
                // RETFQ.
                a.db(&[0x48, 0xcb])
            });
            let load32 = assemble(32, LOAD32, |a| {
                a.mov(esp, SCRATCH as u32)?;
                a.push(dword_ptr(IO + 0x20))?;
                a.popfd()?;
                a.mov(esp, STACK_TOP as u32)?;
                for (n, r) in [eax, ecx, edx, ebx, esp, ebp, esi, edi].iter().enumerate() {
                    if *r != esp {
                        a.mov(*r, dword_ptr(IO + 4 * n as u64))?;
                    }
                }
                a.jmp(CODE)
            });
            let back64 = assemble(64, BACK64, |a| {
                a.mov(rcx, IO)?;
                a.mov(rsp, qword_ptr(rcx + 0x80))?;
                a.mov(ax, word_ptr(rcx + 0x88))?;
                a.mov(ds, ax)?;
                a.mov(ax, word_ptr(rcx + 0x8a))?;
                a.mov(es, ax)?;
                a.mov(ax, word_ptr(rcx + 0x8c))?;
                a.mov(ss, ax)?;
                for r in [r15, r14, r13, r12, rbp, rbx] {
                    a.pop(r)?;
                }
                a.ret()
            });
            // 16-bit code: EAX..EDI, then DS = SS = the data segment,
            // ES = the segment at R (for the exit), SP, a far jump.
            let load16 = assemble(32, LOAD16, |a| {
                a.mov(esp, SCRATCH as u32)?;
                a.push(dword_ptr(IO + 0x20))?;
                a.popfd()?;
                for (n, r) in [eax, ecx, edx, ebx, esp, ebp, esi, edi].iter().enumerate() {
                    if *r != esp {
                        a.mov(*r, dword_ptr(IO + 4 * n as u64))?;
                    }
                }
                a.push(SEL_R as i32)?;
                a.pop(es)?;
                a.push(SEL_DATA as i32)?;
                a.pop(ds)?;
                a.push(SEL_DATA as i32)?;
                a.pop(ss)?;
                a.mov(esp, SP16 as u32)?;
                // JMP FAR SEL_CODE16:CODE-R.
                a.db(&[0xea])?;
                a.db(&((CODE - R) as u32).to_le_bytes())?;
                a.db(&SEL_CODE16.to_le_bytes())
            });
            // The LDT: a 16-bit code segment at R, 16-bit data segments at
            // DATA and at R (user_desc: entry, base, limit, flags with
            // `contents` in bits 1-2, `limit_in_pages` in bit 4 and
            // `useable` in bit 6). The data segments' limit is 4 GiB, as
            // the engine's: a word at offset 0xffff reads past 64 KiB.
            for (entry, base, code) in [(0u32, R, true), (1, DATA, false), (2, R, false)] {
                let flags = if code { 0x44 } else { 0x50 };
                let limit = if code { 0xffff } else { 0xf_ffff };
                let desc: [u32; 4] = [entry, base as u32, limit, flags];
                // SAFETY: modify_ldt(1, desc, 16) reads the 16 bytes.
                let r = unsafe { libc::syscall(libc::SYS_modify_ldt, 1, desc.as_ptr(), 16) };
                assert_eq!(r, 0, "modify_ldt: {}", std::io::Error::last_os_error());
            }
            // SS:ESP for the 16-bit exit's LSS: the scratch stack.
            // SAFETY: inside the mapping made above.
            unsafe {
                std::ptr::write_unaligned((IO + 0x98) as *mut u32, SCRATCH as u32);
                std::ptr::write_unaligned((IO + 0x9c) as *mut u16, 0x2b);
            }
            for (at, bytes) in [
                (ENTRY, entry),
                (LOAD32, load32),
                (LOAD16, load16),
                (BACK64, back64),
            ] {
                assert!(bytes.len() < 0x400);
                // SAFETY: inside the mapping made above.
                unsafe {
                    std::ptr::copy_nonoverlapping(bytes.as_ptr(), at as *mut u8, bytes.len())
                };
            }
            Mutex::new(())
        })
    }

    /// The host's end of a program: EAX..EDI and ESP (in the order of
    /// their encodings), EFLAGS, and the `CHECKED` memory.
    pub struct HostEnd {
        pub regs: [u32; 8],
        pub eflags: u32,
        pub mem: Vec<u8>,
    }

    /// Run `code` (ending in HLT) on the host in compatibility mode from
    /// `regs` (EAX..EDI in encoding order, ESP's slot ignored), `eflags`
    /// and `data` at `DATA`; the stack starts zeroed. For
    /// 32-bit code (`bits` 32: flat, ESP = `STACK_TOP`) or
    /// 16-bit code (`bits` 16, assembled at offset `CODE - R` of a code
    /// segment based at R: DS = SS based at `DATA`, SP = `SP16`; ES is
    /// the exit's and based at R).
    pub fn run_in(bits: u32, code: &[u8], regs: &[u32; 8], eflags: u32, data: &[u8]) -> HostEnd {
        let _region = region().lock().unwrap_or_else(|e| e.into_inner());
        let body = code.strip_suffix(&[0xf4]).expect("the program ends in HLT");
        let exit = if bits == 32 {
            assemble(32, CODE + body.len() as u64, |a| {
                for (n, r) in [eax, ecx, edx, ebx, esp, ebp, esi, edi].iter().enumerate() {
                    a.mov(dword_ptr(OUT + 4 * n as u64), *r)?;
                }
                a.mov(esp, SCRATCH as u32)?;
                a.pushfd()?;
                a.pop(dword_ptr(OUT + 0x20))?;
                a.push(0x33)?;
                a.push(BACK64 as i32)?;
                // RETF (32-bit).
                a.db(&[0xcb])
            })
        } else {
            assemble(16, CODE - R + body.len() as u64, |a| {
                for (n, r) in [eax, ecx, edx, ebx, esp, ebp, esi, edi].iter().enumerate() {
                    a.mov(dword_ptr(OUT - R + 4 * n as u64).es(), *r)?;
                }
                a.lss(esp, fword_ptr(IO - R + 0x98).es())?;
                a.pushfd()?;
                a.pop(dword_ptr(OUT - R + 0x20).es())?;
                // O32 PUSH 0x33, O32 PUSH BACK64, O32 RETF.
                a.db(&[0x66, 0x6a, 0x33, 0x66, 0x68])?;
                a.db(&(BACK64 as u32).to_le_bytes())?;
                a.db(&[0x66, 0xcb])
            })
        };
        assert!(code.len() + exit.len() < (STACK_TOP - 0x4000 - CODE) as usize);
        assert!(data.len() <= DATA_LEN);
        // SAFETY: all inside the mapping, which only this thread uses
        // while it holds the lock; ENTRY saves and restores everything the
        // C ABI asks a callee to preserve (and DS/ES/SS), and returns.
        unsafe {
            let w = |at: u64, b: &[u8]| {
                std::ptr::copy_nonoverlapping(b.as_ptr(), at as *mut u8, b.len())
            };
            w(CODE, body);
            w(CODE + body.len() as u64, &exit);
            std::ptr::write_bytes((R + 0x4000) as *mut u8, 0, 0x4000);
            w(DATA, data);
            std::ptr::write_bytes((DATA + DATA_LEN as u64) as *mut u8, 0, 0x10);
            for (n, v) in regs.iter().enumerate() {
                w(IO + 4 * n as u64, &v.to_le_bytes());
            }
            w(IO + 0x20, &eflags.to_le_bytes());
            let loader = if bits == 32 { LOAD32 } else { LOAD16 };
            w(IO + 0x90, &loader.to_le_bytes());
            let f: extern "C" fn() = std::mem::transmute(ENTRY as usize);
            f();
            let r = |at: u64| u32::from_le_bytes(*(at as *const [u8; 4]));
            HostEnd {
                regs: std::array::from_fn(|n| r(OUT + 4 * n as u64)),
                eflags: r(OUT + 0x20),
                mem: std::slice::from_raw_parts(CHECKED.start as *const u8, CHECKED.len()).to_vec(),
            }
        }
    }
}

/// `cases` seeded random 32-bit programs (`random_32bit_program`, no
/// 16-bit addresses: they would address below the host's
/// `vm.mmap_min_addr`) on the host CPU in compatibility mode, the
/// interpreter and the translator at threshold 0, flat segments and the
/// same memory at the same addresses: registers, the defined flags and
/// the stack and data must be equal. Returns the programs and guest
/// instructions checked.
fn random_32bit_vs_host(cases: usize, seed: u64) -> (usize, u64) {
    random_vs_host(32, cases, seed)
}

/// `random_32bit_vs_host` for `bits` 32, or 16: the same programs as
/// 16-bit code, 16-bit addresses included, in 16-bit segments with
/// non-zero bases (the host's from its LDT), 32-bit forms through
/// 0x66/0x67.
fn random_vs_host(bits: u32, cases: usize, seed: u64) -> (usize, u64) {
    // xorshift must not start from zero.
    let mut rng = if seed == 0 { DEFAULT_SEED } else { seed };
    let mut rand = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut instructions = 0;
    for case in 0..cases {
        let b16 = bits == 16;
        let at = if b16 {
            host32::CODE - host32::R
        } else {
            host32::CODE
        };
        let (code, undef) = random_32bit_program(&mut rand, bits, at, b16);
        let mut data = vec![0u8; host32::DATA_LEN];
        for x in data.chunks_mut(8) {
            x.copy_from_slice(&rand().to_le_bytes());
        }
        let mut regs = [0u32; 8];
        for (n, v) in regs.iter_mut().enumerate() {
            *v = match n {
                3 if b16 => 0x8000,
                3 => host32::DATA as u32,
                4 if b16 => host32::SP16 as u32,
                4 => host32::STACK_TOP as u32,
                _ => rand() as u32,
            };
        }
        let flags = CF | PF | AF | ZF | SF | OF;
        let eflags = 2 | (rand() & flags);
        let host = host32::run_in(bits, &code, &regs, eflags as u32, &data);
        // `Start::gpr` is EAX, ECX, EDX, EBX, EBP, ESI, EDI.
        let mut gpr = [0u64; 8];
        for (n, at) in [0, 1, 2, 3, 5, 6, 7].into_iter().enumerate() {
            gpr[n] = regs[at] as u64;
        }
        let (r0, d0) = (host32::R, host32::DATA);
        let s = Start {
            gdt: if b16 {
                vec![
                    desc(r0, ACC_CODE, false),
                    desc(d0, ACC_DATA, false),
                    desc(r0, ACC_DATA, false),
                ]
            } else {
                vec![desc(0, ACC_CODE, true), desc(0, ACC_DATA, true)]
            },
            cs: 8,
            ds: 16,
            es: if b16 { 24 } else { 16 },
            ss: 16,
            rip: at,
            rsp: regs[4] as u64,
            rflags: eflags,
            gpr,
            load: vec![(host32::CODE, code.clone()), (host32::DATA, data)],
            mem: host32::MEM,
            ..Default::default()
        };
        let (e, g) = both(&s, undef);
        let r = &e.regs;
        let mut engine = [r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi].map(|v| v as u32);
        let mut host = host;
        if b16 {
            // An interrupt in code with a 16-bit stack returns with bits
            // 31:16 of ESP the kernel's (espfix): compare SP.
            engine[4] &= 0xffff;
            host.regs[4] &= 0xffff;
        }
        let what = || {
            format!(
                "case {case} (seed {seed:#x}), code {code:02x?}, start {regs:08x?} eflags \
                 {eflags:#x}: host {:08x?} eflags {:#x}, engine {engine:08x?} eflags {:#x}, \
                 undefined {undef:#x}",
                host.regs, host.eflags, r.rflags
            )
        };
        assert_eq!(e.exit, Ex::Halt, "{}", what());
        assert_eq!(host.regs, engine, "registers: {}", what());
        assert_eq!(
            (host.eflags as u64 ^ r.rflags) & flags & !undef,
            0,
            "flags: {}",
            what()
        );
        if let Some(at) = host
            .mem
            .iter()
            .zip(&g.ram[host32::CHECKED])
            .position(|(a, b)| a != b)
        {
            panic!(
                "memory differs at {:#x}: host {:#x}, engine {:#x}: {}",
                host32::CHECKED.start + at,
                host.mem[at],
                g.ram[host32::CHECKED.start + at],
                what()
            );
        }
        instructions += e.icount;
    }
    (cases, instructions)
}

/// The same random 32-bit programs (without 16-bit addresses) on the host
/// CPU too.
#[test]
fn random_32bit_sequences_match_host() {
    let (_, instructions) = random_32bit_vs_host(300, DEFAULT_SEED);
    assert!(instructions >= 300 * 4);
}

/// The same random programs as 16-bit code (16-bit addresses included)
/// in 16-bit segments with non-zero bases, on the host CPU too.
#[test]
fn random_16bit_sequences_match_host() {
    let (_, instructions) = random_vs_host(16, 300, DEFAULT_SEED);
    assert!(instructions >= 300 * 4);
}

/// The same at scale, opt-in (`scripts/diff-random.sh`): the number of
/// programs and the seed come from `VIREO_DIFF_CASES` (default one
/// million) and `VIREO_DIFF_SEED`; a failure names the case and the seed.
#[test]
#[ignore = "long: run by scripts/diff-random.sh"]
fn random_32bit_sequences_at_scale() {
    at_scale_bits(32);
}

/// The 16-bit programs at scale, opt-in, as `random_32bit_sequences_at_scale`.
#[test]
#[ignore = "long: run by scripts/diff-random.sh"]
fn random_16bit_sequences_at_scale() {
    at_scale_bits(16);
}

fn at_scale_bits(bits: u32) {
    at_scale(&format!("{bits}-bit code"), |cases, seed| {
        random_vs_host(bits, cases, seed)
    });
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
