//! Segment register loads and descriptor tables.
//!
//! The hidden part of a segment register is kept as a `hypervisor::Segment`.
//! For CS the `dpl` field always holds the CPL (a conforming code segment
//! keeps the caller's privilege).

use hypervisor::Segment;

use crate::core::{fault, gp, Core, Exc, R};
use crate::cpu::*;

pub fn flat_code64(selector: u16, dpl: u8) -> Segment {
    Segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: 0xb,
        present: true,
        dpl,
        db: false,
        s: true,
        l: true,
        g: true,
        avl: false,
        unusable: false,
    }
}

pub fn flat_code32(selector: u16, dpl: u8) -> Segment {
    Segment {
        db: true,
        l: false,
        ..flat_code64(selector, dpl)
    }
}

pub fn flat_data(selector: u16, dpl: u8) -> Segment {
    Segment {
        type_: 0x3,
        db: true,
        l: false,
        ..flat_code64(selector, dpl)
    }
}

fn null_segment(selector: u16, dpl: u8) -> Segment {
    Segment {
        selector,
        dpl,
        unusable: true,
        ..Default::default()
    }
}

/// Linear address of the descriptor for `sel`; #GP(sel) beyond the table limit.
pub fn desc_addr(core: &Core, sel: u16) -> R<u64> {
    let idx = (sel & !7) as u64;
    let (base, limit) = if sel & 4 != 0 {
        if core.st.ldt.unusable || !core.st.ldt.present {
            return Err(gp(sel as u32 & !3));
        }
        (core.st.ldt.base, core.st.ldt.limit as u64)
    } else {
        (core.st.gdt.base, core.st.gdt.limit as u64)
    };
    if idx + 7 > limit {
        return Err(gp(sel as u32 & !3));
    }
    Ok(base.wrapping_add(idx))
}

pub fn read_desc(core: &mut Core, sel: u16) -> R<u64> {
    let a = desc_addr(core, sel)?;
    core.read_sys(a, 8)
}

/// Set the descriptor's accessed bit in memory, as the CPU does on a load.
fn set_accessed(core: &mut Core, sel: u16, desc: u64) -> R {
    if desc & (1 << 40) == 0 {
        let a = desc_addr(core, sel)? + 5;
        let b = core.read_sys(a, 1)?;
        core.write_sys(a, 1, b | 1)?;
    }
    Ok(())
}

fn is_code(desc: u64) -> bool {
    desc & (1 << 44) != 0 && desc & (1 << 43) != 0
}

fn dpl_of(desc: u64) -> u8 {
    ((desc >> 45) & 3) as u8
}

fn present(desc: u64) -> bool {
    desc & (1 << 47) != 0
}

/// MOV/POP/LxS to a data segment register (or SS).
pub fn load_sreg(core: &mut Core, idx: usize, sel: u16) -> R {
    if idx == CS || idx > GS {
        return Err(crate::core::ud());
    }
    if !core.st.protected() || core.st.v86() {
        let v86 = core.st.v86();
        let s = &mut core.st.seg[idx];
        s.selector = sel;
        s.base = (sel as u64) << 4;
        if v86 {
            *s = Segment::real_mode(sel, false);
            s.dpl = 3;
        }
        return Ok(());
    }
    let cpl = core.st.cpl();
    let rpl = (sel & 3) as u8;
    if sel & !3 == 0 {
        if idx == SS && !(core.st.mode64() && cpl != 3 && rpl == cpl) {
            return Err(gp(0));
        }
        let keep_base = core.st.mode64() && idx >= FS;
        let base = core.st.seg[idx].base;
        core.st.seg[idx] = null_segment(sel, if idx == SS { cpl } else { 0 });
        if keep_base {
            // 64-bit FS/GS bases are owned by the MSRs; AMD keeps them on a
            // null load and Linux copes with both behaviours.
            core.st.seg[idx].base = base;
        }
        return Ok(());
    }
    let desc = read_desc(core, sel)?;
    let dpl = dpl_of(desc);
    let ecode = sel as u32 & !3;
    if idx == SS {
        let writable_data = desc & (1 << 44) != 0 && desc & (1 << 43) == 0 && desc & (1 << 41) != 0;
        if rpl != cpl || !writable_data || dpl != cpl {
            return Err(gp(ecode));
        }
        if !present(desc) {
            return Err(fault(12, Some(ecode)));
        }
    } else {
        let s = desc & (1 << 44) != 0;
        let code = is_code(desc);
        let readable = !code || desc & (1 << 41) != 0;
        let conforming = code && desc & (1 << 42) != 0;
        if !s || !readable || (!conforming && dpl < cpl.max(rpl)) {
            return Err(gp(ecode));
        }
        if !present(desc) {
            return Err(fault(11, Some(ecode)));
        }
    }
    set_accessed(core, sel, desc)?;
    let mut seg = Segment::from_gdt_entry(sel, desc | (1 << 40));
    if core.st.mode64() && idx >= FS {
        // The 64-bit base stays whatever the MSR said only until a load; a
        // selector load sets the low 32 bits from the descriptor.
        seg.base &= 0xffff_ffff;
    }
    core.st.seg[idx] = seg;
    if idx == SS {
        core.end_block = true;
    }
    Ok(())
}

/// Check a code segment descriptor as a far JMP/CALL/RET/IRET target and
/// build the CS value with CPL `new_cpl`.
fn code_target(core: &mut Core, sel: u16, new_cpl: u8, for_return: bool) -> R<Segment> {
    let ecode = sel as u32 & !3;
    if sel & !3 == 0 {
        return Err(gp(0));
    }
    let desc = read_desc(core, sel)?;
    if desc & (1 << 44) == 0 {
        let ty = (desc >> 40) & 0xf;
        if ty == 0x4 || ty == 0xc || ty == 0x5 || ty == 0x9 || ty == 0x1 {
            return Err(Exc::unimplemented(format!(
                "far transfer through system descriptor type {ty:#x}"
            )));
        }
        return Err(gp(ecode));
    }
    if !is_code(desc) {
        return Err(gp(ecode));
    }
    let dpl = dpl_of(desc);
    let conforming = desc & (1 << 42) != 0;
    let rpl = (sel & 3) as u8;
    let ok = if for_return {
        if conforming {
            dpl <= rpl
        } else {
            dpl == rpl
        }
    } else if conforming {
        dpl <= new_cpl
    } else {
        rpl <= new_cpl && dpl == new_cpl
    };
    if !ok {
        return Err(gp(ecode));
    }
    if !present(desc) {
        return Err(fault(11, Some(ecode)));
    }
    let l = desc & (1 << 53) != 0;
    let d = desc & (1 << 54) != 0;
    if core.st.long_mode() && l && d {
        return Err(gp(ecode));
    }
    set_accessed(core, sel, desc)?;
    let mut s = Segment::from_gdt_entry((sel & !3) | new_cpl as u16, desc | (1 << 40));
    s.dpl = new_cpl;
    if !core.st.long_mode() {
        s.l = false;
    }
    Ok(s)
}

fn mask_ip(s: &Segment, long_mode: bool, off: u64) -> u64 {
    if long_mode && s.l {
        off
    } else if s.db {
        off & 0xffff_ffff
    } else {
        off & 0xffff
    }
}

/// Far JMP/CALL/RET to the same privilege level (or any real-mode far
/// transfer): load CS and set `next_rip`.
pub fn far_transfer_cs(core: &mut Core, sel: u16, off: u64) -> R {
    if !core.st.protected() || core.st.v86() {
        let v86 = core.st.v86();
        let cs = &mut core.st.seg[CS];
        cs.selector = sel;
        cs.base = (sel as u64) << 4;
        if v86 {
            *cs = Segment::real_mode(sel, true);
            cs.dpl = 3;
        }
        core.next_rip = off & 0xffff;
        core.st.rip = core.next_rip;
        return Ok(());
    }
    let cpl = core.st.cpl();
    let s = code_target(core, sel, cpl, false)?;
    let lm = core.st.long_mode();
    core.next_rip = mask_ip(&s, lm, off);
    core.st.seg[CS] = s;
    core.st.rip = core.next_rip;
    Ok(())
}

/// SS for a return to privilege `cpl` (IRET/RETF).
fn ss_target(core: &mut Core, sel: u16, cpl: u8, cs64: bool) -> R<Segment> {
    let ecode = sel as u32 & !3;
    if sel & !3 == 0 {
        if core.st.long_mode() && cs64 && cpl != 3 {
            return Ok(null_segment(sel, cpl));
        }
        return Err(gp(0));
    }
    let desc = read_desc(core, sel)?;
    let writable_data = desc & (1 << 44) != 0 && desc & (1 << 43) == 0 && desc & (1 << 41) != 0;
    if (sel & 3) as u8 != cpl || !writable_data || dpl_of(desc) != cpl {
        return Err(gp(ecode));
    }
    if !present(desc) {
        return Err(fault(12, Some(ecode)));
    }
    set_accessed(core, sel, desc)?;
    Ok(Segment::from_gdt_entry(sel, desc | (1 << 40)))
}

/// IRETQ at the same privilege reloads SS too.
pub fn load_ss_for_return(core: &mut Core, sel: u16, cpl: u8) -> R {
    let cs64 = core.st.seg[CS].l;
    let s = ss_target(core, sel, cpl, cs64)?;
    core.st.seg[SS] = s;
    Ok(())
}

/// RETF/IRET to an outer (less privileged) level: load CS, SS, RSP and
/// invalidate data segments the new level may not use.
pub fn return_to_outer(core: &mut Core, cs_sel: u16, off: u64, ss_sel: u16, sp: u64, osz: u8) -> R {
    let new_cpl = (cs_sel & 3) as u8;
    let cs = code_target(core, cs_sel, new_cpl, true)?;
    let ss = ss_target(core, ss_sel, new_cpl, cs.l)?;
    let lm = core.st.long_mode();
    core.next_rip = mask_ip(&cs, lm, off);
    core.st.seg[CS] = cs;
    core.st.seg[SS] = ss;
    core.st.rip = core.next_rip;
    core.st.gpr[RSP] = if osz == 8 {
        sp
    } else if ss.db || osz == 4 {
        sp & 0xffff_ffff
    } else {
        (core.st.gpr[RSP] & !0xffff) | (sp & 0xffff)
    };
    for idx in [ES, DS, FS, GS] {
        let s = core.st.seg[idx];
        let conforming_code = s.s && s.type_ & 0xc == 0xc;
        if !s.unusable && !conforming_code && s.dpl < new_cpl {
            let base = s.base;
            core.st.seg[idx] = null_segment(0, 0);
            if lm && idx >= FS {
                core.st.seg[idx].base = base;
            }
        }
    }
    Ok(())
}

/// Read a system descriptor (TSS/LDT), 16 bytes in long mode.
fn system_desc(core: &mut Core, sel: u16) -> R<Segment> {
    if sel & 4 != 0 {
        return Err(gp(sel as u32 & !3));
    }
    let a = desc_addr(core, sel)?;
    let lo = core.read_sys(a, 8)?;
    let mut s = Segment::from_gdt_entry(sel, lo);
    if core.st.long_mode() {
        if (sel & !7) as u64 + 15 > core.st.gdt.limit as u64 {
            return Err(gp(sel as u32 & !3));
        }
        let hi = core.read_sys(a + 8, 8)?;
        // The upper half's type field must be zero (it is not a
        // descriptor of its own).
        if (hi >> 40) & 0x1f != 0 {
            return Err(gp(sel as u32 & !3));
        }
        s.base |= (hi & 0xffff_ffff) << 32;
    }
    Ok(s)
}

/// A 64-bit system descriptor's base must be canonical (#GP(selector)),
/// checked once the descriptor is otherwise valid and present.
fn check_system_base(core: &Core, sel: u16, s: &Segment) -> R {
    if core.st.long_mode() && !crate::msr::canonical(s.base) {
        return Err(gp(sel as u32 & !3));
    }
    Ok(())
}

pub fn ltr(core: &mut Core, sel: u16) -> R {
    if sel & !3 == 0 {
        return Err(gp(0));
    }
    let s = system_desc(core, sel)?;
    let ok_type = if core.st.long_mode() {
        s.type_ == 9
    } else {
        s.type_ == 9 || s.type_ == 1
    };
    if s.s || !ok_type {
        return Err(gp(sel as u32 & !3));
    }
    if !s.present {
        return Err(fault(11, Some(sel as u32 & !3)));
    }
    check_system_base(core, sel, &s)?;
    // Mark the TSS busy in the GDT.
    let a = desc_addr(core, sel)? + 5;
    let b = core.read_sys(a, 1)?;
    core.write_sys(a, 1, b | 2)?;
    let mut s = s;
    s.type_ |= 2;
    core.st.tr = s;
    Ok(())
}

pub fn lldt(core: &mut Core, sel: u16) -> R {
    if sel & !3 == 0 {
        core.st.ldt = null_segment(sel, 0);
        return Ok(());
    }
    let s = system_desc(core, sel)?;
    if s.s || s.type_ != 2 {
        return Err(gp(sel as u32 & !3));
    }
    if !s.present {
        return Err(fault(11, Some(sel as u32 & !3)));
    }
    check_system_base(core, sel, &s)?;
    core.st.ldt = s;
    Ok(())
}

/// Stack for an inner privilege level from the TSS: (SS selector, RSP).
pub fn tss_stack(core: &mut Core, dpl: u8) -> R<(u16, u64)> {
    let tr = core.st.tr;
    if core.st.long_mode() {
        let off = 4 + dpl as u64 * 8;
        if off + 7 > tr.limit as u64 {
            return Err(fault(10, Some(tr.selector as u32 & !3)));
        }
        let rsp = core.read_sys(tr.base + off, 8)?;
        Ok((dpl as u16, rsp))
    } else if tr.type_ & 8 != 0 {
        let off = 4 + dpl as u64 * 8;
        if off + 5 > tr.limit as u64 {
            return Err(fault(10, Some(tr.selector as u32 & !3)));
        }
        let esp = core.read_sys(tr.base + off, 4)?;
        let ss = core.read_sys(tr.base + off + 4, 2)? as u16;
        Ok((ss, esp))
    } else {
        let off = 2 + dpl as u64 * 4;
        let sp = core.read_sys(tr.base + off, 2)?;
        let ss = core.read_sys(tr.base + off + 2, 2)? as u16;
        Ok((ss, sp))
    }
}

/// Interrupt stack table entry `ist` (1-7) of the 64-bit TSS.
pub fn tss_ist(core: &mut Core, ist: u8) -> R<u64> {
    let tr = core.st.tr;
    let off = 0x24 + (ist as u64 - 1) * 8;
    if off + 7 > tr.limit as u64 {
        return Err(fault(10, Some(tr.selector as u32 & !3)));
    }
    core.read_sys(tr.base + off, 8)
}

/// Load SS for an inner-level stack switch (from the TSS), checked.
pub fn inner_ss(core: &mut Core, sel: u16, dpl: u8) -> R<Segment> {
    let ecode = sel as u32 & !3;
    if sel & !3 == 0 {
        return Err(fault(10, Some(ecode)));
    }
    let desc = read_desc(core, sel).map_err(|_| fault(10, Some(ecode)))?;
    let writable_data = desc & (1 << 44) != 0 && desc & (1 << 43) == 0 && desc & (1 << 41) != 0;
    if (sel & 3) as u8 != dpl || dpl_of(desc) != dpl || !writable_data {
        return Err(fault(10, Some(ecode)));
    }
    if !present(desc) {
        return Err(fault(12, Some(ecode)));
    }
    set_accessed(core, sel, desc)?;
    Ok(Segment::from_gdt_entry(sel, desc | (1 << 40)))
}

/// Interrupt-gate target code segment: returns (CS, new CPL).
pub fn gate_target(core: &mut Core, sel: u16, ext: u32) -> R<Segment> {
    let ecode = (sel as u32 & !3) | ext;
    if sel & !3 == 0 {
        return Err(gp(ext));
    }
    let desc = read_desc(core, sel).map_err(|_| gp(ecode))?;
    if !is_code(desc) || dpl_of(desc) > core.st.cpl() {
        return Err(gp(ecode));
    }
    if !present(desc) {
        return Err(fault(11, Some(ecode)));
    }
    let conforming = desc & (1 << 42) != 0;
    let new_cpl = if conforming {
        core.st.cpl()
    } else {
        dpl_of(desc)
    };
    if core.st.long_mode() && (desc & (1 << 53) == 0 || desc & (1 << 54) != 0) {
        return Err(gp(ecode));
    }
    set_accessed(core, sel, desc)?;
    let mut s = Segment::from_gdt_entry((sel & !3) | new_cpl as u16, desc | (1 << 40));
    s.dpl = new_cpl;
    if !core.st.long_mode() {
        s.l = false;
    }
    Ok(s)
}

/// What LAR/LSL/VERR/VERW ask about a selector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    Lar,
    Lsl,
    Verr,
    Verw,
}

/// The descriptor for `sel` if the probe instruction may see it (ZF=1), or
/// None (ZF=0). Faults reading the descriptor table still propagate.
pub fn probe(core: &mut Core, sel: u16, kind: Probe) -> R<Option<u64>> {
    if sel & !3 == 0 {
        return Ok(None);
    }
    let desc = match read_desc(core, sel) {
        Ok(d) => d,
        Err(Exc::Fault { vector: 13, .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let s = desc & (1 << 44) != 0;
    let ty = ((desc >> 40) & 0xf) as u8;
    let code = s && ty & 8 != 0;
    let conforming = code && ty & 4 != 0;
    let dpl = dpl_of(desc);
    let rpl = (sel & 3) as u8;
    let privileged_ok = conforming || dpl >= core.st.cpl().max(rpl);
    let type_ok = match kind {
        Probe::Lsl => s || matches!(ty, 1 | 2 | 3 | 9 | 11),
        Probe::Lar => s || matches!(ty, 1 | 2 | 3 | 4 | 5 | 9 | 11 | 12),
        Probe::Verr => s && (!code || ty & 2 != 0),
        Probe::Verw => s && !code && ty & 2 != 0,
    };
    if !type_ok || !privileged_ok {
        return Ok(None);
    }
    Ok(Some(desc))
}
