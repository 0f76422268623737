//! Control transfer and stack instructions.

use iced_x86::{Code, Instruction, Mnemonic, OpKind};

use super::operand::{ea, is_mem, mem_seg, op_size, read_op, reg_read, write_op};
use super::{pop, push, set_sp, stack_op_size};
use crate::core::{gp, ud, Core, Exc, R};
use crate::cpu::*;
use crate::exception::{deliver, Kind};
use crate::seg;

/// Mask a branch target to the operand size outside 64-bit mode.
fn target(core: &Core, t: u64, size: u8) -> u64 {
    if core.st.mode64() {
        t
    } else {
        t & mask(size.min(4))
    }
}

/// Far pointer operand (memory m16:16/32/64 or immediate ptr16:16/32).
fn far_ptr(core: &mut Core, insn: &Instruction) -> R<(u16, u64, u8)> {
    match insn.op0_kind() {
        OpKind::FarBranch16 => Ok((insn.far_branch_selector(), insn.far_branch16() as u64, 2)),
        OpKind::FarBranch32 => Ok((insn.far_branch_selector(), insn.far_branch32() as u64, 4)),
        _ => {
            let osz = (insn.memory_size().size() - 2) as u8;
            let off = ea(&core.st, insn);
            let s = mem_seg(insn);
            let o = core.read_mem(s, off, osz)?;
            let sel = core.read_mem(s, off.wrapping_add(osz as u64), 2)? as u16;
            Ok((sel, o, osz))
        }
    }
}

pub fn jmp(core: &mut Core, insn: &Instruction) -> R {
    match insn.op0_kind() {
        OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
            core.next_rip = insn.near_branch_target();
            Ok(())
        }
        OpKind::FarBranch16 | OpKind::FarBranch32 => far_jump(core, insn),
        OpKind::Memory if super::operand::is_far_mem(insn) => far_jump(core, insn),
        _ => {
            let size = op_size(insn, 0);
            let t = read_op(core, insn, 0, size)?;
            core.next_rip = target(core, t, size);
            Ok(())
        }
    }
}

fn far_jump(core: &mut Core, insn: &Instruction) -> R {
    let (sel, off, _) = far_ptr(core, insn)?;
    seg::far_transfer_cs(core, sel, off)?;
    core.end_block = true;
    Ok(())
}

pub fn call(core: &mut Core, insn: &Instruction) -> R {
    let far = matches!(insn.op0_kind(), OpKind::FarBranch16 | OpKind::FarBranch32)
        || (is_mem(insn, 0) && super::operand::is_far_mem(insn));
    if far {
        let (sel, off, osz) = far_ptr(core, insn)?;
        let old_cs = core.st.seg[CS].selector as u64;
        let ret = core.next_rip;
        // Push the return address first on the old stack; undo RSP if the
        // transfer faults.
        let sp = core.st.gpr[RSP];
        push(core, osz, old_cs)?;
        push(core, osz, ret)?;
        if let Err(e) = seg::far_transfer_cs(core, sel, off) {
            core.st.gpr[RSP] = sp;
            return Err(e);
        }
        core.end_block = true;
        return Ok(());
    }
    let size = stack_op_size(insn);
    let t = match insn.op0_kind() {
        OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
            insn.near_branch_target()
        }
        _ => {
            let v = read_op(core, insn, 0, size)?;
            target(core, v, size)
        }
    };
    push(core, size, core.next_rip)?;
    core.next_rip = t;
    Ok(())
}

pub fn ret(core: &mut Core, insn: &Instruction) -> R {
    let size = match insn.code() {
        Code::Retnw | Code::Retnw_imm16 => 2,
        Code::Retnd | Code::Retnd_imm16 => 4,
        _ => 8,
    };
    let ss = core.st.stack_size();
    let sp = core.st.gpr[RSP] & mask(ss);
    let t = core.read_mem(SS, sp, size)?;
    let imm = if insn.op_count() > 0 {
        insn.immediate16() as u64
    } else {
        0
    };
    set_sp(core, sp.wrapping_add(size as u64 + imm));
    core.next_rip = target(core, t, size);
    Ok(())
}

pub fn retf(core: &mut Core, insn: &Instruction) -> R {
    let osz: u8 = match insn.code() {
        Code::Retfw | Code::Retfw_imm16 => 2,
        Code::Retfd | Code::Retfd_imm16 => 4,
        _ => 8,
    };
    let imm = if insn.op_count() > 0 {
        insn.immediate16() as u64
    } else {
        0
    };
    let ss = core.st.stack_size();
    let sp = core.st.gpr[RSP] & mask(ss);
    let off = core.read_mem(SS, sp, osz)?;
    let sel = core.read_mem(SS, sp.wrapping_add(osz as u64), osz)? as u16;
    if !core.st.protected() || core.st.v86() {
        seg::far_transfer_cs(core, sel, off & 0xffff)?;
        set_sp(core, sp.wrapping_add(2 * osz as u64 + imm));
        core.end_block = true;
        return Ok(());
    }
    let rpl = (sel & 3) as u8;
    let cpl = core.st.cpl();
    if rpl < cpl {
        return Err(gp(sel as u32 & !3));
    }
    if rpl == cpl {
        seg::far_transfer_cs(core, sel, off)?;
        set_sp(core, sp.wrapping_add(2 * osz as u64 + imm));
    } else {
        // Return to an outer privilege level: SS:RSP come from the stack too.
        let nsp_off = sp.wrapping_add(2 * osz as u64 + imm);
        let new_sp = core.read_mem(SS, nsp_off, osz)?;
        let new_ss = core.read_mem(SS, nsp_off.wrapping_add(osz as u64), osz)? as u16;
        seg::return_to_outer(core, sel, off, new_ss, new_sp.wrapping_add(imm), osz)?;
    }
    core.end_block = true;
    Ok(())
}

pub fn loop_op(core: &mut Core, insn: &Instruction) -> R {
    use Code as C;
    let csize: u8 = match insn.code() {
        C::Jcxz_rel8_16 | C::Jcxz_rel8_32 => 2,
        C::Loopne_rel8_16_CX | C::Loopne_rel8_32_CX => 2,
        C::Loope_rel8_16_CX | C::Loope_rel8_32_CX => 2,
        C::Loop_rel8_16_CX | C::Loop_rel8_32_CX => 2,
        C::Jecxz_rel8_16 | C::Jecxz_rel8_32 | C::Jecxz_rel8_64 => 4,
        C::Loopne_rel8_16_ECX | C::Loopne_rel8_32_ECX | C::Loopne_rel8_64_ECX => 4,
        C::Loope_rel8_16_ECX | C::Loope_rel8_32_ECX | C::Loope_rel8_64_ECX => 4,
        C::Loop_rel8_16_ECX | C::Loop_rel8_32_ECX | C::Loop_rel8_64_ECX => 4,
        _ => 8,
    };
    let m = mask(csize);
    let mn = insn.mnemonic();
    let take = match mn {
        Mnemonic::Jcxz | Mnemonic::Jecxz | Mnemonic::Jrcxz => core.st.gpr[RCX] & m == 0,
        _ => {
            let c = core.st.gpr[RCX].wrapping_sub(1) & m;
            // A 32-bit count is written as any 32-bit register is (zero-
            // extended: the host CPU does so in 64-bit mode), CX keeps the
            // bits above it.
            core.st.gpr[RCX] = if csize == 4 {
                c
            } else {
                (core.st.gpr[RCX] & !m) | c
            };
            let zf = core.st.flags.zf(core.st.rflags);
            c != 0
                && match mn {
                    Mnemonic::Loope => zf,
                    Mnemonic::Loopne => !zf,
                    _ => true,
                }
        }
    };
    if take {
        core.next_rip = insn.near_branch_target();
    }
    Ok(())
}

pub fn push_op(core: &mut Core, insn: &Instruction) -> R {
    let size = stack_op_size(insn);
    let v = match insn.op0_kind() {
        OpKind::Register => reg_read(&core.st, insn.op0_register()),
        OpKind::Memory => read_op(core, insn, 0, size)?,
        _ => insn.immediate(0),
    };
    push(core, size, v & mask(size))
}

pub fn pop_op(core: &mut Core, insn: &Instruction) -> R {
    let size = stack_op_size(insn);
    let old_sp = core.st.gpr[RSP];
    let v = pop(core, size)?;
    let r = if insn.op0_kind() == OpKind::Register && insn.op0_register().is_segment_register() {
        let idx = super::operand::sreg_index(insn.op0_register());
        let r = seg::load_sreg(core, idx, v as u16);
        if r.is_ok() && idx == SS {
            core.int_shadow = true;
            core.debug.ss_load = true;
            core.end_block = true;
        }
        r
    } else {
        // POP [rsp+x] addresses memory with the incremented RSP.
        write_op(core, insn, 0, size, v)
    };
    if r.is_err() {
        core.st.gpr[RSP] = old_sp;
    }
    r
}

pub fn pushf(core: &mut Core, insn: &Instruction) -> R {
    if core.st.v86() && core.st.iopl() < 3 {
        return Err(gp(0));
    }
    let size = stack_op_size(insn);
    let f = core.st.get_rflags() & !(FLAG_VM | FLAG_RF);
    push(core, size, f & mask(size))
}

/// Write RFLAGS from POPF/IRET according to the privilege rules.
pub fn write_flags(core: &mut Core, v: u64, size: u8) {
    let cpl = core.st.cpl();
    let mut changeable = FLAGS_ARITH | FLAG_TF | FLAG_DF | FLAG_NT | FLAG_AC | FLAG_ID;
    if !core.st.protected() || cpl == 0 {
        changeable |= FLAG_IOPL | FLAG_IF;
    } else if cpl <= core.st.iopl() {
        changeable |= FLAG_IF;
    }
    changeable &= mask(size);
    let cur = core.st.get_rflags();
    let new = (cur & !changeable) | (v & changeable);
    core.st.set_rflags(new & !FLAG_RF);
}

pub fn popf(core: &mut Core, insn: &Instruction) -> R {
    if core.st.v86() && core.st.iopl() < 3 {
        return Err(gp(0));
    }
    let size = stack_op_size(insn);
    let v = pop(core, size)?;
    write_flags(core, v, size);
    // IF may have changed: let the run loop look at interrupts.
    core.request_poll();
    core.end_block = true;
    Ok(())
}

pub fn pusha(core: &mut Core, insn: &Instruction) -> R {
    let size: u8 = if insn.mnemonic() == Mnemonic::Pushad {
        4
    } else {
        2
    };
    let sp0 = core.st.gpr[RSP];
    let regs = core.st.gpr;
    for (i, r) in regs.iter().enumerate().take(8) {
        let v = if i == RSP { sp0 } else { *r };
        if let Err(e) = push(core, size, v & mask(size)) {
            core.st.gpr[RSP] = sp0;
            return Err(e);
        }
    }
    Ok(())
}

pub fn popa(core: &mut Core, insn: &Instruction) -> R {
    let size: u8 = if insn.mnemonic() == Mnemonic::Popad {
        4
    } else {
        2
    };
    let sp0 = core.st.gpr[RSP];
    let mut vals = [0u64; 8];
    for i in (0..8).rev() {
        match pop(core, size) {
            Ok(v) => vals[i] = v,
            Err(e) => {
                core.st.gpr[RSP] = sp0;
                return Err(e);
            }
        }
    }
    let m = mask(size);
    for (i, v) in vals.iter().enumerate() {
        if i != RSP {
            let g = &mut core.st.gpr[i];
            *g = if size == 4 {
                *v & m
            } else {
                (*g & !m) | (*v & m)
            };
        }
    }
    Ok(())
}

pub fn leave(core: &mut Core, insn: &Instruction) -> R {
    let size: u8 = match insn.code() {
        Code::Leavew => 2,
        Code::Leaved => 4,
        _ => 8,
    };
    let old_sp = core.st.gpr[RSP];
    let ss = core.st.stack_size();
    set_sp(core, core.st.gpr[RBP] & mask(ss));
    match pop(core, size) {
        Ok(v) => {
            let m = mask(size);
            core.st.gpr[RBP] = if size == 4 {
                v & m
            } else {
                (core.st.gpr[RBP] & !m) | (v & m)
            };
            Ok(())
        }
        Err(e) => {
            core.st.gpr[RSP] = old_sp;
            Err(e)
        }
    }
}

pub fn enter(core: &mut Core, insn: &Instruction) -> R {
    let size: u8 = match insn.code() {
        Code::Enterw_imm16_imm8 => 2,
        Code::Enterd_imm16_imm8 => 4,
        _ => 8,
    };
    let alloc = insn.immediate16() as u64;
    let level = (insn.immediate8_2nd() & 31) as u64;
    let old_sp = core.st.gpr[RSP];
    let old_bp = core.st.gpr[RBP];
    let r = (|| -> R {
        push(core, size, old_bp & mask(size))?;
        let frame = core.st.gpr[RSP];
        let ss = core.st.stack_size();
        let mut bp = old_bp;
        for _ in 1..level {
            bp = bp.wrapping_sub(size as u64) & mask(ss);
            let v = core.read_mem(SS, bp, size)?;
            push(core, size, v)?;
        }
        if level > 0 {
            push(core, size, frame & mask(size))?;
        }
        let m = mask(size);
        core.st.gpr[RBP] = if size == 4 {
            frame & m
        } else {
            (old_bp & !m) | (frame & m)
        };
        let sp = core.st.gpr[RSP].wrapping_sub(alloc);
        // Touch the new stack top so a bad allocation faults here.
        core.read_mem(SS, sp & mask(ss), 1)?;
        set_sp(core, sp);
        Ok(())
    })();
    if r.is_err() {
        core.st.gpr[RSP] = old_sp;
        core.st.gpr[RBP] = old_bp;
    }
    r
}

pub fn int(core: &mut Core, insn: &Instruction) -> R {
    let (vector, kind) = match insn.mnemonic() {
        Mnemonic::Int3 => (3, Kind::Software),
        Mnemonic::Int1 => (1, Kind::Icebp),
        Mnemonic::Into => {
            if !core.st.flags.of(core.st.rflags) {
                return Ok(());
            }
            if core.st.mode64() {
                return Err(ud());
            }
            (4, Kind::Software)
        }
        _ => (insn.immediate8(), Kind::Software),
    };
    if core.st.v86() && kind == Kind::Software && core.st.iopl() < 3 {
        return Err(gp(0));
    }
    deliver(core, vector, None, kind)?;
    // The gate cleared TF: no single-step trap after a software interrupt.
    core.debug.no_step = true;
    core.next_rip = core.st.rip;
    core.end_block = true;
    Ok(())
}

pub fn iret(core: &mut Core, insn: &Instruction) -> R {
    // IRET ends NMI blocking (even if it then faults, like hardware).
    core.nmi_blocked = false;
    let osz: u8 = match insn.code() {
        Code::Iretw => 2,
        Code::Iretd => 4,
        _ => 8,
    };
    let ss = core.st.stack_size();
    let sp = core.st.gpr[RSP] & mask(ss);
    let o = osz as u64;
    let rip = core.read_mem(SS, sp, osz)?;
    let cs = core.read_mem(SS, sp.wrapping_add(o), osz)? as u16;
    let fl = core.read_mem(SS, sp.wrapping_add(2 * o), osz)?;
    if !core.st.protected() {
        seg::far_transfer_cs(core, cs, rip)?;
        set_sp(core, sp.wrapping_add(3 * o));
        write_flags(core, fl, osz);
        core.request_poll();
        core.end_block = true;
        core.next_rip = core.st.rip;
        return Ok(());
    }
    if core.st.v86() {
        return Err(Exc::unimplemented("IRET in virtual-8086 mode"));
    }
    if core.st.rflags & FLAG_NT != 0 && !core.st.long_mode() {
        return Err(Exc::unimplemented("IRET with NT set (task return)"));
    }
    if !core.st.long_mode() && fl & FLAG_VM != 0 && core.st.cpl() == 0 && osz == 4 {
        return Err(Exc::unimplemented("IRET to virtual-8086 mode"));
    }
    let cpl = core.st.cpl();
    let rpl = (cs & 3) as u8;
    if rpl < cpl {
        return Err(gp(cs as u32 & !3));
    }
    if core.st.mode64() || rpl > cpl {
        let new_sp = core.read_mem(SS, sp.wrapping_add(3 * o), osz)?;
        let new_ss = core.read_mem(SS, sp.wrapping_add(4 * o), osz)? as u16;
        if rpl == cpl {
            // 64-bit IRET to the same privilege still reloads SS:RSP.
            seg::far_transfer_cs(core, cs, rip)?;
            seg::load_ss_for_return(core, new_ss, rpl)?;
            core.st.gpr[RSP] = if osz == 8 { new_sp } else { new_sp & mask(osz) };
        } else {
            seg::return_to_outer(core, cs, rip, new_ss, new_sp, osz)?;
        }
    } else {
        seg::far_transfer_cs(core, cs, rip)?;
        set_sp(core, sp.wrapping_add(3 * o));
    }
    // Flags are written with the privilege of the IRET itself (CPL before).
    write_flags_with_cpl(core, fl, osz, cpl);
    core.next_rip = core.st.rip;
    core.request_poll();
    core.end_block = true;
    Ok(())
}

fn write_flags_with_cpl(core: &mut Core, v: u64, size: u8, cpl: u8) {
    let mut changeable = FLAGS_ARITH | FLAG_TF | FLAG_DF | FLAG_NT | FLAG_AC | FLAG_ID | FLAG_RF;
    if cpl == 0 {
        changeable |= FLAG_IOPL | FLAG_IF | FLAG_VIF | FLAG_VIP;
    } else if cpl <= core.st.iopl() {
        changeable |= FLAG_IF;
    }
    changeable &= mask(size);
    let cur = core.st.get_rflags();
    core.st.set_rflags((cur & !changeable) | (v & changeable));
}

pub fn syscall(core: &mut Core) -> R {
    if core.st.efer & EFER_SCE == 0 {
        return Err(ud());
    }
    let f = core.st.get_rflags();
    let star_cs = ((core.st.msr.star >> 32) & 0xfffc) as u16;
    if !core.st.long_mode() {
        // Legacy-mode SYSCALL (AMD): ECX = return EIP, EIP from STAR[31:0],
        // a flat 32-bit ring-0 CS; IF, VM and RF cleared, R11 untouched.
        core.st.gpr[RCX] = core.next_rip & 0xffff_ffff;
        core.st.seg[CS] = seg::flat_code32(star_cs, 0);
        core.st.seg[SS] = seg::flat_data(star_cs.wrapping_add(8), 0);
        core.st.set_rflags(f & !(FLAG_IF | FLAG_VM | FLAG_RF));
        core.next_rip = core.st.msr.star & 0xffff_ffff;
        core.end_block = true;
        return Ok(());
    }
    // Which entry point is decided by the caller's mode, before CS changes:
    // 64-bit callers enter through LSTAR, compatibility-mode ones
    // through CSTAR.
    let from64 = core.st.mode64();
    core.st.gpr[RCX] = core.next_rip;
    core.st.gpr[11] = f & !FLAG_RF;
    core.st.seg[CS] = seg::flat_code64(star_cs, 0);
    core.st.seg[SS] = seg::flat_data(star_cs.wrapping_add(8), 0);
    core.st.set_rflags(f & !core.st.msr.sfmask & !FLAG_RF);
    core.next_rip = if from64 {
        core.st.msr.lstar
    } else {
        core.st.msr.cstar
    };
    core.end_block = true;
    Ok(())
}

pub fn sysret(core: &mut Core, insn: &Instruction) -> R {
    if core.st.efer & EFER_SCE == 0 {
        return Err(ud());
    }
    if !core.st.protected() || core.st.cpl() != 0 {
        return Err(gp(0));
    }
    let base = ((core.st.msr.star >> 48) & 0xffff) as u16;
    if !core.st.long_mode() {
        // Legacy-mode SYSRET (AMD): flat 32-bit ring 3 at ECX, IF set.
        core.st.seg[CS] = seg::flat_code32(base | 3, 3);
        core.st.seg[SS] = seg::flat_data(base.wrapping_add(8) | 3, 3);
        core.next_rip = core.st.gpr[RCX] & 0xffff_ffff;
        let f = core.st.get_rflags();
        core.st.set_rflags(f | FLAG_IF);
        core.request_poll();
        core.end_block = true;
        return Ok(());
    }
    let to64 = insn.mnemonic() == Mnemonic::Sysretq;
    let rcx = core.st.gpr[RCX];
    if to64 {
        if ((rcx << 16) as i64 >> 16) as u64 != rcx {
            return Err(gp(0));
        }
        core.st.seg[CS] = seg::flat_code64(base.wrapping_add(16) | 3, 3);
        core.next_rip = rcx;
    } else {
        core.st.seg[CS] = seg::flat_code32(base | 3, 3);
        core.next_rip = rcx & 0xffff_ffff;
    }
    core.st.seg[SS] = seg::flat_data(base.wrapping_add(8) | 3, 3);
    let r11 = core.st.gpr[11];
    core.st
        .set_rflags((r11 & !(FLAG_RF | FLAG_VM)) | FLAG_FIXED1);
    core.end_block = true;
    Ok(())
}
