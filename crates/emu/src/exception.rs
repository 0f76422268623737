//! Exception and interrupt delivery: real-mode IVT, protected-mode and
//! long-mode IDT gates with privilege changes, IST, and the #DF / triple
//! fault rules.

use crate::core::{fault, gp, Core, Exc, R};
use crate::cpu::*;
use crate::seg;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A fault raised by an instruction: returns to the faulting instruction.
    Fault,
    /// An external interrupt or NMI: returns to the current RIP.
    External,
    /// INT n / INT3 / INTO: gate DPL checked, returns after the instruction.
    Software,
    /// INT1 (ICEBP): like a software interrupt without the DPL check.
    Icebp,
}

fn contributory(v: u8) -> bool {
    matches!(v, 0 | 10 | 11 | 12 | 13)
}

/// Deliver `vector`. A fault during delivery of a fault turns into #DF when
/// the architecture says so, and a fault while delivering #DF into a triple
/// fault (`Exc::Shutdown`).
pub fn deliver(core: &mut Core, vector: u8, error: Option<u32>, kind: Kind) -> R {
    let mut vector = vector;
    let mut error = error;
    let mut kind = kind;
    // Bounded: each round either succeeds, escalates towards #DF/shutdown,
    // or switches to a benign follow-up exception.
    for _ in 0..8 {
        let first_fault = kind == Kind::Fault || kind == Kind::External;
        match deliver_once(core, vector, error, kind) {
            Ok(()) => {
                core.halted = false;
                return Ok(());
            }
            Err(e) => {
                let (v2, e2) = match e {
                    Exc::Fault { vector, error } => (vector, error),
                    Exc::PageFault { addr, error } => {
                        core.st.cr2 = addr;
                        (14, Some(error))
                    }
                    other => return Err(other),
                };
                if vector == 8 {
                    return Err(Exc::Shutdown);
                }
                let df = first_fault
                    && ((contributory(vector) && contributory(v2))
                        || (vector == 14 && (v2 == 14 || contributory(v2))));
                if df {
                    vector = 8;
                    error = Some(0);
                } else {
                    vector = v2;
                    error = e2;
                }
                kind = Kind::Fault;
            }
        }
    }
    Err(Exc::Shutdown)
}

/// Does this exception push an error code?
pub fn has_error_code(vector: u8) -> bool {
    matches!(vector, 8 | 10 | 11 | 12 | 13 | 14 | 17 | 21 | 29 | 30)
}

fn deliver_once(core: &mut Core, vector: u8, error: Option<u32>, kind: Kind) -> R {
    // Return address: the faulting instruction, or the next one for INT n.
    let ret = match kind {
        Kind::Software | Kind::Icebp => core.next_rip,
        _ => core.st.rip,
    };
    // A fault saves RFLAGS with RF set, so that returning to the faulting
    // instruction does not hit its instruction breakpoint again.
    let rf = if kind == Kind::Fault { FLAG_RF } else { 0 };
    let ext = if matches!(kind, Kind::External | Kind::Fault) {
        1
    } else {
        0
    };
    if !core.st.protected() {
        return deliver_real(core, vector, ret);
    }
    if core.st.v86() {
        return Err(Exc::unimplemented("interrupt in virtual-8086 mode"));
    }
    let error = if kind == Kind::Fault && has_error_code(vector) {
        Some(error.unwrap_or(0))
    } else {
        None
    };
    if core.st.long_mode() {
        deliver_long(core, vector, error, kind, ret, ext, rf)
    } else {
        deliver_prot(core, vector, error, kind, ret, ext, rf)
    }
}

fn deliver_real(core: &mut Core, vector: u8, ret: u64) -> R {
    let entry = vector as u64 * 4;
    if entry + 3 > core.st.idt.limit as u64 {
        return Err(gp(0));
    }
    let ivt = core.read_sys(core.st.idt.base + entry, 4)?;
    let flags = core.st.get_rflags();
    let cs = core.st.seg[CS].selector as u64;
    let sp0 = core.st.gpr[RSP];
    let r = (|| {
        crate::exec::push(core, 2, flags & 0xffff)?;
        crate::exec::push(core, 2, cs)?;
        crate::exec::push(core, 2, ret & 0xffff)
    })();
    if let Err(e) = r {
        core.st.gpr[RSP] = sp0;
        return Err(e);
    }
    core.st
        .set_rflags(flags & !(FLAG_IF | FLAG_TF | FLAG_AC | FLAG_RF));
    let sel = (ivt >> 16) as u16;
    core.st.seg[CS].selector = sel;
    core.st.seg[CS].base = (sel as u64) << 4;
    core.st.rip = ivt & 0xffff;
    core.next_rip = core.st.rip;
    Ok(())
}

fn gate_check(core: &Core, vector: u8, gate_dpl: u8, present: bool, kind: Kind, ext: u32) -> R {
    let idt_err = vector as u32 * 8 + 2 + ext;
    if kind == Kind::Software && gate_dpl < core.st.cpl() {
        return Err(gp(vector as u32 * 8 + 2));
    }
    if !present {
        return Err(fault(11, Some(idt_err)));
    }
    Ok(())
}

fn deliver_long(
    core: &mut Core,
    vector: u8,
    error: Option<u32>,
    kind: Kind,
    ret: u64,
    ext: u32,
    rf: u64,
) -> R {
    let idt_err = vector as u32 * 8 + 2 + ext;
    let off = vector as u64 * 16;
    if off + 15 > core.st.idt.limit as u64 {
        return Err(gp(idt_err));
    }
    let base = core.st.idt.base + off;
    let lo = core.read_sys(base, 8)?;
    let hi = core.read_sys(base + 8, 8)?;
    let ty = (lo >> 40) & 0xf;
    if ty != 0xe && ty != 0xf {
        return Err(gp(idt_err));
    }
    gate_check(
        core,
        vector,
        ((lo >> 45) & 3) as u8,
        lo & (1 << 47) != 0,
        kind,
        ext,
    )?;
    let sel = ((lo >> 16) & 0xffff) as u16;
    let target = (lo & 0xffff) | ((lo >> 32) & 0xffff_0000) | ((hi & 0xffff_ffff) << 32);
    let ist = ((lo >> 32) & 7) as u8;
    let cs = seg::gate_target(core, sel, ext)?;
    let old_cpl = core.st.cpl();
    let new_cpl = cs.dpl;
    let old_ss = core.st.seg[SS].selector as u64;
    let old_rsp = core.st.gpr[RSP];
    let mut rsp = if ist != 0 {
        seg::tss_ist(core, ist)?
    } else if new_cpl < old_cpl {
        seg::tss_stack(core, new_cpl)?.1
    } else {
        old_rsp
    };
    rsp &= !0xf;
    let flags = core.st.get_rflags();
    let mut frame = vec![
        old_ss,
        old_rsp,
        flags | rf,
        core.st.seg[CS].selector as u64,
        ret,
    ];
    if let Some(e) = error {
        frame.push(e as u64);
    }
    // Write the frame as the new privilege level would (supervisor).
    for v in frame {
        rsp = rsp.wrapping_sub(8);
        if ((rsp << 16) as i64 >> 16) as u64 != rsp {
            return Err(fault(12, Some(0)));
        }
        core.write_lin(rsp, 8, v, new_cpl == 3)?;
    }
    if new_cpl < old_cpl {
        core.st.seg[SS] = hypervisor::Segment {
            selector: new_cpl as u16,
            dpl: new_cpl,
            unusable: true,
            ..Default::default()
        };
    }
    core.st.seg[CS] = cs;
    core.st.gpr[RSP] = rsp;
    let mut nf = flags & !(FLAG_TF | FLAG_NT | FLAG_RF | FLAG_VM);
    if ty == 0xe {
        nf &= !FLAG_IF;
    }
    core.st.set_rflags(nf);
    core.st.rip = target;
    core.next_rip = target;
    core.end_block = true;
    Ok(())
}

fn deliver_prot(
    core: &mut Core,
    vector: u8,
    error: Option<u32>,
    kind: Kind,
    ret: u64,
    ext: u32,
    rf: u64,
) -> R {
    let idt_err = vector as u32 * 8 + 2 + ext;
    let off = vector as u64 * 8;
    if off + 7 > core.st.idt.limit as u64 {
        return Err(gp(idt_err));
    }
    let g = core.read_sys(core.st.idt.base + off, 8)?;
    let ty = (g >> 40) & 0x1f;
    let (gate32, trap) = match ty {
        0x0e => (true, false),
        0x0f => (true, true),
        0x06 => (false, false),
        0x07 => (false, true),
        0x05 => return Err(Exc::unimplemented("task gate in the IDT")),
        _ => return Err(gp(idt_err)),
    };
    gate_check(
        core,
        vector,
        ((g >> 45) & 3) as u8,
        g & (1 << 47) != 0,
        kind,
        ext,
    )?;
    let sel = ((g >> 16) & 0xffff) as u16;
    let target = (g & 0xffff) | ((g >> 32) & 0xffff_0000);
    let target = if gate32 { target } else { target & 0xffff };
    let cs = seg::gate_target(core, sel, ext)?;
    let old_cpl = core.st.cpl();
    let new_cpl = cs.dpl;
    let flags = core.st.get_rflags();
    let size: u8 = if gate32 { 4 } else { 2 };
    let old_ss = core.st.seg[SS];
    let old_sp = core.st.gpr[RSP];
    let mut frame = Vec::with_capacity(6);
    let (ss, mut sp) = if new_cpl < old_cpl {
        let (ss_sel, sp) = seg::tss_stack(core, new_cpl)?;
        let ss = seg::inner_ss(core, ss_sel, new_cpl)?;
        frame.push(old_ss.selector as u64);
        frame.push(old_sp);
        (ss, sp)
    } else {
        (old_ss, old_sp)
    };
    frame.extend([flags | rf, core.st.seg[CS].selector as u64, ret]);
    if let Some(e) = error {
        frame.push(e as u64);
    }
    let spmask = if ss.db { 0xffff_ffff } else { 0xffff };
    for v in frame {
        sp = sp.wrapping_sub(size as u64);
        let lin = ss.base.wrapping_add(sp & spmask) & 0xffff_ffff;
        core.write_lin(lin, size, v & mask(size), new_cpl == 3)?;
    }
    core.st.seg[SS] = ss;
    core.st.gpr[RSP] = if ss.db {
        sp & 0xffff_ffff
    } else {
        (old_sp & !0xffff) | (sp & 0xffff)
    };
    core.st.seg[CS] = cs;
    let mut nf = flags & !(FLAG_TF | FLAG_NT | FLAG_RF | FLAG_VM);
    if !trap {
        nf &= !FLAG_IF;
    }
    core.st.set_rflags(nf);
    core.st.rip = target;
    core.next_rip = target;
    core.end_block = true;
    Ok(())
}
