//! Real mode, 32-bit protected mode and the switch into long mode.

mod common;

use common::*;
use hypervisor::{DescriptorTable, Segment, SpecialRegs, StandardRegs, Vcpu};
use iced_x86::code_asm::*;

const REAL: u64 = 0x7c00;
const PM32: u64 = 0x8000;
const LM64: u64 = 0x9000;
const REAL_ISR: u64 = 0x7e00;
const GDTR: u64 = 0x7f00;

/// A vCPU in the RESET-like real-mode state at 0:REAL, with the GDT and
/// page tables of `Guest::long_mode` in memory.
fn real_mode_guest() -> Guest {
    let mut g = Guest::new(16 << 20);
    g.long_mode();
    let rs = |sel, code| Segment::real_mode(sel, code);
    let s = SpecialRegs {
        cs: rs(0, true),
        ds: rs(0, false),
        es: rs(0, false),
        fs: rs(0, false),
        gs: rs(0, false),
        ss: rs(0, false),
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
            base: 0,
            limit: 0xffff,
        },
        idt: DescriptorTable {
            base: 0,
            limit: 0x3ff,
        },
        cr0: 0x10,
        ..Default::default()
    };
    g.vcpu.set_sregs(&s).unwrap();
    g.vcpu
        .set_regs(&StandardRegs {
            rip: REAL,
            rflags: 2,
            ..Default::default()
        })
        .unwrap();
    g
}

#[test]
fn real_to_protected_to_long_mode() {
    let mut g = real_mode_guest();
    // GDTR image for LGDT.
    g.write(GDTR, &0x3fu16.to_le_bytes());
    g.w32(GDTR + 2, GDT as u32);
    // IVT[0x10] -> 0000:REAL_ISR
    g.w32(0x10 * 4, REAL_ISR as u32);
    let isr = assemble(16, REAL_ISR, |a| {
        a.mov(bl, 0x42)?;
        a.iret()
    });
    g.write(REAL_ISR, &isr);
    let real = assemble(16, REAL, |a| {
        a.cli()?;
        a.xor(ax, ax)?;
        a.mov(ds, ax)?;
        a.mov(ss, ax)?;
        a.mov(sp, 0x7000)?;
        a.mov(al, b'R' as u32)?;
        a.out(0xe9, al)?;
        a.int(0x10)?;
        a.lgdt(ptr(GDTR as u32))?;
        a.mov(eax, cr0)?;
        a.or(al, 1)?;
        a.mov(cr0, eax)?;
        a.jmp_far(SEL_CODE32, PM32 as u32)
    });
    g.write(REAL, &real);
    let pm = assemble(32, PM32, |a| {
        a.mov(ax, SEL_DATA as u32)?;
        a.mov(ds, ax)?;
        a.mov(es, ax)?;
        a.mov(ss, ax)?;
        a.mov(esp, 0x7000)?;
        a.mov(al, b'P' as u32)?;
        a.out(0xe9, al)?;
        // 32-bit arithmetic and a memory round trip in protected mode.
        a.mov(dword_ptr(0x20000), 0x1234_5678)?;
        a.mov(ecx, dword_ptr(0x20000))?;
        a.push(ecx)?;
        a.pop(edi)?;
        a.mov(eax, cr4)?;
        a.or(eax, 0x20)?;
        a.mov(cr4, eax)?;
        a.mov(eax, PML4 as u32)?;
        a.mov(cr3, eax)?;
        a.mov(ecx, 0xc000_0080u32)?;
        a.rdmsr()?;
        a.or(eax, 0x100)?;
        a.wrmsr()?;
        a.mov(eax, cr0)?;
        a.or(eax, 0x8000_0000u32)?;
        a.mov(cr0, eax)?;
        a.jmp_far(SEL_CODE64, LM64 as u32)
    });
    g.write(PM32, &pm);
    let lm = assemble(64, LM64, |a| {
        a.mov(al, b'L' as u32)?;
        a.out(0xe9, al)?;
        a.mov(rax, 0x1_2345_6789u64)?;
        a.hlt()
    });
    g.write(LM64, &lm);

    assert_eq!(g.run(), Ex::IoOut(0xe9, b"R".to_vec()));
    assert_eq!(g.run(), Ex::IoOut(0xe9, b"P".to_vec()));
    let s = g.sregs();
    assert_eq!(s.cr0 & 1, 1);
    assert!(s.cs.db && !s.cs.l);
    assert_eq!(s.cs.selector, SEL_CODE32);
    assert_eq!(g.regs().rbx & 0xff, 0x42, "real-mode INT 10h ran its ISR");
    assert_eq!(g.run(), Ex::IoOut(0xe9, b"L".to_vec()));
    let s = g.sregs();
    assert_ne!(s.efer & (1 << 10), 0, "EFER.LMA set by enabling paging");
    assert!(s.cs.l);
    assert_eq!(g.run(), Ex::Halt);
    let r = g.regs();
    assert_eq!(r.rax, 0x1_2345_6789);
    assert_eq!(r.rdi, 0x1234_5678);
    assert_eq!(r.rsp, 0x7000);
}

#[test]
fn real_mode_segments_and_16bit_addressing() {
    let mut g = real_mode_guest();
    let code = assemble(16, REAL, |a| {
        a.mov(ax, 0x1000)?;
        a.mov(ds, ax)?;
        a.mov(bx, 0x10)?;
        a.mov(si, 0x4)?;
        a.mov(word_ptr(bx + si + 2), 0xbeef)?;
        // 16-bit wrap-around of the effective address: 0xfff0 + 0x20 = 0x10.
        a.mov(bx, 0xfff0)?;
        a.mov(word_ptr(bx + 0x20), 0x1234)?;
        a.mov(cx, word_ptr(0x16))?;
        a.hlt()
    });
    g.write(REAL, &code);
    g.run_to_halt();
    assert_eq!(g.r32(0x10016) & 0xffff, 0xbeef);
    assert_eq!(g.r32(0x10010) & 0xffff, 0x1234);
    assert_eq!(g.regs().rcx & 0xffff, 0xbeef);
}

#[test]
fn protected_mode_interrupt_with_privilege_change() {
    // 32-bit protected mode, flat segments, ring 3 code calls INT 0x80 through
    // a DPL-3 interrupt gate; the handler runs on the TSS ring-0 stack.
    let mut g = Guest::new(16 << 20);
    g.long_mode();
    // GDT additions: 0x40 ring-3 code32, 0x48 ring-3 data, 0x50 32-bit TSS.
    g.w64(GDT + 0x40, 0x00cf_fb00_0000_ffff);
    g.w64(GDT + 0x48, 0x00cf_f300_0000_ffff);
    let tss = 0x3800u64;
    let tss_desc = 0x67u64 | ((tss & 0xff_ffff) << 16) | (0x89u64 << 40);
    g.w64(GDT + 0x50, tss_desc);
    g.w32(tss + 4, 0x6000); // ESP0
    g.w32(tss + 8, SEL_DATA as u32); // SS0
    let idt32 = 0x4000u64;
    let handler = 0xa000u64;
    let gate = (handler & 0xffff)
        | ((SEL_CODE32 as u64) << 16)
        | (0xeeu64 << 40)
        | ((handler >> 16) << 48);
    g.w64(idt32 + 0x80 * 8, gate);
    let h = assemble(32, handler, |a| {
        a.mov(ebx, dword_ptr(esp))?; // return EIP
        a.mov(esi, dword_ptr(esp + 12))?; // old ESP
        a.mov(edi, dword_ptr(esp + 16))?; // old SS
        a.add(eax, 1)?;
        a.iretd()
    });
    g.write(handler, &h);
    let user = 0xb000u64;
    let u = assemble(32, user, |a| {
        a.mov(eax, 41)?;
        a.int(0x80)?;
        a.mov(ecx, 7)?;
        // CLI at CPL 3 with IOPL 0 raises #GP; no gate 13 -> #DF -> no gate
        // -> triple fault.
        a.cli()
    });
    g.write(user, &u);
    let flat = |sel: u16, e: u64| Segment::from_gdt_entry(sel, e);
    let mut tr = flat(0x50, tss_desc);
    tr.type_ = 0xb;
    let s = SpecialRegs {
        cs: flat(0x43, 0x00cf_fb00_0000_ffff),
        ds: flat(0x4b, 0x00cf_f300_0000_ffff),
        es: flat(0x4b, 0x00cf_f300_0000_ffff),
        fs: flat(0x4b, 0x00cf_f300_0000_ffff),
        gs: flat(0x4b, 0x00cf_f300_0000_ffff),
        ss: flat(0x4b, 0x00cf_f300_0000_ffff),
        tr,
        ldt: Segment {
            unusable: true,
            ..Default::default()
        },
        gdt: DescriptorTable {
            base: GDT,
            limit: 0x57,
        },
        idt: DescriptorTable {
            base: idt32,
            limit: 0x80 * 8 + 7,
        },
        cr0: 0x11,
        ..Default::default()
    };
    g.vcpu.set_sregs(&s).unwrap();
    g.vcpu
        .set_regs(&StandardRegs {
            rip: user,
            rsp: 0x9000,
            rflags: 0x202,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(g.run(), Ex::Shutdown);
    let r = g.regs();
    assert_eq!(r.rax, 42);
    assert_eq!(r.rbx, user + 7, "return EIP after INT 0x80");
    assert_eq!(r.rsi, 0x9000);
    assert_eq!(r.rdi, 0x4b);
    assert_eq!(r.rcx, 7);
    assert_eq!(g.sregs().cs.selector, 0x43, "back in ring 3");
}

#[test]
fn pae_paging_without_long_mode() {
    let mut g = Guest::new(16 << 20);
    g.long_mode();
    // PAE: PDPT at 0x14000 (4 entries), PD at 0x15000 with a 2 MiB page
    // mapping linear 0x00000000 -> phys 0, and linear 0x00200000 -> phys
    // 0x600000.
    let pdpt = 0x14000u64;
    let pd = 0x15000u64;
    g.w64(pdpt, pd | 1);
    g.w64(pd, 0x83);
    g.w64(pd + 8, 0x600000 | 0x83);
    g.w32(0x600010, 0xfeed_f00d);
    let code = assemble(32, 0x9000, |a| {
        a.mov(eax, cr4)?;
        a.or(eax, 0x20)?;
        a.mov(cr4, eax)?;
        a.mov(eax, pdpt as u32)?;
        a.mov(cr3, eax)?;
        a.mov(eax, cr0)?;
        a.or(eax, 0x8000_0000u32)?;
        a.mov(cr0, eax)?;
        a.mov(ebx, dword_ptr(0x200010))?;
        a.hlt()
    });
    g.write(0x9000, &code);
    let flat = |sel: u16, e: u64| Segment::from_gdt_entry(sel, e);
    let mut s = g.sregs();
    s.cs = flat(SEL_CODE32, 0x00cf_9b00_0000_ffff);
    s.cr0 = 0x11;
    s.cr4 = 0;
    s.efer = 0;
    g.vcpu.set_sregs(&s).unwrap();
    let mut r = g.regs();
    r.rip = 0x9000;
    g.set_regs(&r);
    g.run_to_halt();
    assert_eq!(g.regs().rbx, 0xfeed_f00d);
}

/// A controller that holds one INIT and one SIPI for vCPU 1 once armed.
struct SipiController {
    armed: std::sync::atomic::AtomicBool,
    init_taken: std::sync::atomic::AtomicBool,
}

impl emu::InterruptController for SipiController {
    fn trigger_gsi(&self, _gsi: u32) {}
    fn pending_vector(&self, _vcpu: u32) -> Option<u8> {
        None
    }
    fn ack(&self, _vcpu: u32, _vector: u8) -> Option<u8> {
        None
    }
    fn take_init(&self, vcpu: u32) -> bool {
        use std::sync::atomic::Ordering::SeqCst;
        vcpu == 1 && self.armed.load(SeqCst) && !self.init_taken.swap(true, SeqCst)
    }
    fn take_startup(&self, vcpu: u32) -> Option<u8> {
        use std::sync::atomic::Ordering::SeqCst;
        (vcpu == 1 && self.init_taken.load(SeqCst) && self.armed.swap(false, SeqCst))
            .then_some(0x10)
    }
}

#[test]
fn application_processor_waits_for_init_and_sipi() {
    let intc = std::sync::Arc::new(SipiController {
        armed: false.into(),
        init_taken: false.into(),
    });
    let mut g = Guest::with_platform(16 << 20, Some(intc.clone()), Default::default());
    let mut ap = g.vm.create_emu_vcpu(1);
    ap.set_wait_for_sipi(true);
    // The AP's trampoline at 0x10000 (SIPI vector 0x10).
    let code = assemble(16, 0, |a| {
        a.mov(ax, 0x1234)?;
        a.mov(bx, cs)?;
        a.hlt()
    });
    g.write(0x10000, &code);
    assert_eq!(
        format!("{:?}", ap.run().unwrap()),
        "Halt",
        "parked before SIPI"
    );
    intc.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(format!("{:?}", ap.run().unwrap()), "Halt");
    let r = ap.get_regs().unwrap();
    assert_eq!(r.rax & 0xffff, 0x1234, "trampoline ran");
    assert_eq!(r.rbx & 0xffff, 0x1000, "CS = vector << 8");
    assert_eq!(r.rip, code.len() as u64);
}
