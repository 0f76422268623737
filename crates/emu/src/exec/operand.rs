//! Operand access: registers, effective addresses, immediates.

use iced_x86::{Instruction, OpKind, Register};

use crate::core::{Core, R};
use crate::cpu::{mask, ArchRegs};

// iced-x86 numbers its registers in runs (AL..BL, AH..BH, SPL..R15L,
// AX..R15W, EAX..R15D, RAX..R15, EIP, RIP, ES..GS), each run in the
// architectural order of `ArchRegs::gpr`. The hot accessors below index
// those runs by iced's own discriminants: constants, so each arm is one
// subtraction, as fast as hand-written numbers.
const AL: usize = Register::AL as usize;
const BL: usize = Register::BL as usize;
const AH: usize = Register::AH as usize;
const BH: usize = Register::BH as usize;
const SPL: usize = Register::SPL as usize;
const R15L: usize = Register::R15L as usize;
const AX: usize = Register::AX as usize;
const R15W: usize = Register::R15W as usize;
const EAX: usize = Register::EAX as usize;
const R15D: usize = Register::R15D as usize;
const RAX: usize = Register::RAX as usize;
const R15: usize = Register::R15 as usize;
const EIP: usize = Register::EIP as usize;
const RIP: usize = Register::RIP as usize;
const ES: usize = Register::ES as usize;
const GS: usize = Register::GS as usize;
/// SPL is GPR 4: the byte registers after AH..BH continue at RSP.
const SPL_GPR: usize = 4;

/// Read a general-purpose register (any width, incl. AH..BH).
#[inline(always)]
pub fn reg_read(st: &ArchRegs, r: Register) -> u64 {
    let n = r as usize;
    match n {
        AL..=BL => st.gpr[n - AL] & 0xff,
        AH..=BH => (st.gpr[n - AH] >> 8) & 0xff,
        SPL..=R15L => st.gpr[n - SPL + SPL_GPR] & 0xff,
        AX..=R15W => st.gpr[n - AX] & 0xffff,
        EAX..=R15D => st.gpr[n - EAX] & 0xffff_ffff,
        RAX..=R15 => st.gpr[n - RAX],
        EIP => st.rip & 0xffff_ffff,
        RIP => st.rip,
        ES..=GS => st.seg[n - ES].selector as u64,
        _ => 0,
    }
}

/// Write a general-purpose register with x86 width rules: 8/16-bit writes
/// merge, 32-bit writes zero-extend.
#[inline(always)]
pub fn reg_write(st: &mut ArchRegs, r: Register, v: u64) {
    let n = r as usize;
    match n {
        AL..=BL => st.gpr[n - AL] = (st.gpr[n - AL] & !0xff) | (v & 0xff),
        AH..=BH => st.gpr[n - AH] = (st.gpr[n - AH] & !0xff00) | ((v & 0xff) << 8),
        SPL..=R15L => {
            let i = n - SPL + SPL_GPR;
            st.gpr[i] = (st.gpr[i] & !0xff) | (v & 0xff)
        }
        AX..=R15W => st.gpr[n - AX] = (st.gpr[n - AX] & !0xffff) | (v & 0xffff),
        EAX..=R15D => st.gpr[n - EAX] = v & 0xffff_ffff,
        RAX..=R15 => st.gpr[n - RAX] = v,
        _ => {}
    }
}

/// Segment register index (ES=0 .. GS=5) of a segment `Register`.
#[inline(always)]
pub fn sreg_index(r: Register) -> usize {
    (r as usize).wrapping_sub(Register::ES as usize)
}

/// Address size in bytes of the instruction's explicit memory operand.
#[inline]
pub fn addr_size(insn: &Instruction) -> u8 {
    let b = insn.memory_base();
    if b != Register::None {
        return match b {
            Register::RIP => 8,
            Register::EIP => 4,
            _ => b.size() as u8,
        };
    }
    let i = insn.memory_index();
    if i != Register::None {
        return i.size() as u8;
    }
    match insn.memory_displ_size() {
        2 => 2,
        4 => 4,
        _ => 8,
    }
}

/// Effective address (segment offset) of the memory operand.
#[inline]
pub fn ea(st: &ArchRegs, insn: &Instruction) -> u64 {
    let mut a = insn.memory_displacement64();
    let b = insn.memory_base();
    if b != Register::None && b != Register::RIP && b != Register::EIP {
        a = a.wrapping_add(reg_read(st, b));
    }
    let i = insn.memory_index();
    if i != Register::None {
        a = a.wrapping_add(reg_read(st, i).wrapping_mul(insn.memory_index_scale() as u64));
    }
    a & mask(addr_size(insn))
}

/// Segment of the memory operand (with overrides applied).
#[inline(always)]
pub fn mem_seg(insn: &Instruction) -> usize {
    sreg_index(insn.memory_segment())
}

/// Operand size in bytes of operand `n`.
#[inline]
pub fn op_size(insn: &Instruction, n: u32) -> u8 {
    match insn.op_kind(n) {
        OpKind::Register => insn.op_register(n).size() as u8,
        OpKind::Immediate8 | OpKind::Immediate8_2nd => 1,
        OpKind::Immediate16 | OpKind::Immediate8to16 => 2,
        OpKind::Immediate32 | OpKind::Immediate8to32 => 4,
        OpKind::Immediate64 | OpKind::Immediate8to64 | OpKind::Immediate32to64 => 8,
        _ => insn.memory_size().size() as u8,
    }
}

#[inline]
pub fn is_mem(insn: &Instruction, n: u32) -> bool {
    insn.op_kind(n) == OpKind::Memory
}

/// Read operand `n` (masked to `size` for registers and memory; immediates
/// come sign-extended to 64 bits and are masked too).
#[inline]
pub fn read_op(core: &mut Core, insn: &Instruction, n: u32, size: u8) -> R<u64> {
    match insn.op_kind(n) {
        OpKind::Register => Ok(reg_read(&core.st, insn.op_register(n)) & mask(size)),
        OpKind::Memory => {
            let off = ea(&core.st, insn);
            core.read_mem(mem_seg(insn), off, size)
        }
        _ => Ok(insn.immediate(n) & mask(size)),
    }
}

#[inline]
pub fn write_op(core: &mut Core, insn: &Instruction, n: u32, size: u8, v: u64) -> R {
    match insn.op_kind(n) {
        OpKind::Register => {
            reg_write(&mut core.st, insn.op_register(n), v & mask(size));
            Ok(())
        }
        OpKind::Memory => {
            let off = ea(&core.st, insn);
            core.write_mem(mem_seg(insn), off, size, v & mask(size))
        }
        _ => Err(crate::core::ud()),
    }
}

/// Read-modify-write of operand `n`, atomically when LOCK-prefixed (or for
/// XCHG, which always locks). Returns the old value.
pub fn rmw_op(
    core: &mut Core,
    insn: &Instruction,
    n: u32,
    size: u8,
    locked: bool,
    f: &mut dyn FnMut(u64) -> u64,
) -> R<u64> {
    let m = mask(size);
    match insn.op_kind(n) {
        OpKind::Register => {
            let r = insn.op_register(n);
            let old = reg_read(&core.st, r) & m;
            reg_write(&mut core.st, r, f(old) & m);
            Ok(old)
        }
        OpKind::Memory => {
            let off = ea(&core.st, insn);
            let lin = core.lin(mem_seg(insn), off)?;
            let user = core.user();
            core.rmw_lin(lin, size, locked, user, &mut |v| f(v) & m)
        }
        _ => Err(crate::core::ud()),
    }
}

/// A far-pointer memory operand (m16:16, m16:32, m16:64).
pub fn is_far_mem(insn: &Instruction) -> bool {
    use iced_x86::MemorySize as S;
    matches!(insn.memory_size(), S::SegPtr16 | S::SegPtr32 | S::SegPtr64)
}
