//! The compact cached form of a decoded instruction.
//!
//! At decode time each instruction gets a handler chosen by its mnemonic and
//! operand forms, with operands pre-resolved (register indices, memory
//! operand fields, immediates, branch targets). The hottest forms (MOV, the
//! ALU group, INC/DEC, LEA, Jcc, near JMP/CALL/RET, PUSH/POP, MOVZX/MOVSX)
//! run from these fields directly; everything else goes through the generic
//! interpreter on the kept `iced_x86::Instruction`.

use iced_x86::{ConditionCode, Instruction, Mnemonic, OpKind, Register};

use crate::core::{Core, R};
use crate::cpu::{mask, sext};
use crate::exec;
use crate::exec::alu::Bin;
use crate::flags::{FlagOp, Flags};

pub type Handler = fn(&mut Core, &Uop) -> R;

/// A pre-resolved operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opnd {
    None,
    /// GPR index 0-15; `hi` selects AH/CH/DH/BH.
    Reg {
        idx: u8,
        hi: bool,
    },
    /// The instruction's memory operand (`Uop::mem`).
    Mem,
    /// Immediate, sign-extended to 64 bits as the encoding says.
    Imm(u64),
}

/// A pre-resolved memory operand.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemOp {
    /// GPR index of base/index, or 0xff for none (RIP-relative is folded
    /// into `disp`).
    pub base: u8,
    pub index: u8,
    pub scale: u8,
    pub seg: u8,
    pub disp: u64,
    pub amask: u64,
}

pub struct Uop {
    pub handler: Handler,
    pub size: u8,
    pub ops: [Opnd; 3],
    pub mem: MemOp,
    pub lock: bool,
    pub cc: ConditionCode,
    pub next_ip: u64,
    pub target: u64,
    pub insn: Instruction,
}

/// A general-purpose register operand as (index into `ArchRegs::gpr`,
/// AH..BH), from iced's register information (decode time only).
pub(crate) fn gpr(r: Register) -> Option<(u8, bool)> {
    if !r.is_gpr() {
        return None;
    }
    let hi = matches!(r, Register::AH | Register::CH | Register::DH | Register::BH);
    Some((r.full_register().number() as u8, hi))
}

fn opnd(insn: &Instruction, n: u32) -> Option<Opnd> {
    if n >= insn.op_count() {
        return Some(Opnd::None);
    }
    match insn.op_kind(n) {
        OpKind::Register => gpr(insn.op_register(n)).map(|(idx, hi)| Opnd::Reg { idx, hi }),
        OpKind::Memory => Some(Opnd::Mem),
        OpKind::Immediate8
        | OpKind::Immediate16
        | OpKind::Immediate32
        | OpKind::Immediate64
        | OpKind::Immediate8to16
        | OpKind::Immediate8to32
        | OpKind::Immediate8to64
        | OpKind::Immediate32to64 => Some(Opnd::Imm(insn.immediate(n))),
        _ => None,
    }
}

pub(crate) fn memop(insn: &Instruction) -> MemOp {
    let idx = |r: Register| match r {
        Register::None | Register::RIP | Register::EIP => 0xff,
        r => gpr(r).map(|(i, _)| i).unwrap_or(0xff),
    };
    MemOp {
        base: idx(insn.memory_base()),
        index: idx(insn.memory_index()),
        scale: insn.memory_index_scale() as u8,
        seg: exec::operand::mem_seg(insn) as u8,
        disp: insn.memory_displacement64(),
        amask: mask(exec::operand::addr_size(insn)),
    }
}

/// Build the cached form of one decoded instruction.
pub fn build(insn: &Instruction) -> Uop {
    let mut u = Uop {
        handler: h_generic,
        size: 0,
        ops: [Opnd::None; 3],
        mem: MemOp::default(),
        lock: insn.has_lock_prefix(),
        cc: insn.condition_code(),
        next_ip: insn.next_ip(),
        target: 0,
        insn: *insn,
    };
    let ops = (opnd(insn, 0), opnd(insn, 1), opnd(insn, 2));
    let (Some(o0), Some(o1), Some(o2)) = ops else {
        return u;
    };
    if o0 == Opnd::Mem || o1 == Opnd::Mem {
        u.mem = memop(insn);
    }
    u.ops = [o0, o1, o2];
    if insn.op_count() > 0 {
        u.size = exec::operand::op_size(insn, 0);
    }
    let m = insn.mnemonic();
    let two = insn.op_count() == 2;
    u.handler = match m {
        Mnemonic::Mov if two => h_mov,
        Mnemonic::Add if two => h_add,
        Mnemonic::Sub if two => h_sub,
        Mnemonic::And if two => h_and,
        Mnemonic::Or if two => h_or,
        Mnemonic::Xor if two => h_xor,
        Mnemonic::Cmp if two => h_cmp,
        Mnemonic::Adc if two => h_adc,
        Mnemonic::Sbb if two => h_sbb,
        Mnemonic::Mul if o0 != Opnd::None && u.size == 8 => h_mul64,
        Mnemonic::Imul if insn.op_count() >= 2 => h_imul,
        Mnemonic::Shl | Mnemonic::Sal if two => h_shl,
        Mnemonic::Shr if two => h_shr,
        Mnemonic::Sar if two => h_sar,
        Mnemonic::Test if two => h_test,
        Mnemonic::Inc => h_inc,
        Mnemonic::Dec => h_dec,
        Mnemonic::Lea if o0 != Opnd::Mem => h_lea,
        Mnemonic::Movzx | Mnemonic::Movsx | Mnemonic::Movsxd => {
            u.target = exec::operand::op_size(insn, 1) as u64;
            if m == Mnemonic::Movzx {
                h_movzx
            } else {
                h_movsx
            }
        }
        _ if insn.op_count() == 1
            && matches!(
                insn.op0_kind(),
                OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
            ) =>
        {
            u.target = insn.near_branch_target();
            if insn.condition_code() != ConditionCode::None && m != Mnemonic::Jmp && is_jcc(m) {
                h_jcc
            } else if m == Mnemonic::Jmp {
                h_jmp
            } else if m == Mnemonic::Call {
                u.size = exec::stack_op_size(insn);
                h_call
            } else {
                h_generic
            }
        }
        Mnemonic::Ret if insn.op_count() == 0 && insn.code() == iced_x86::Code::Retnq => h_ret64,
        Mnemonic::Push if insn.code() == iced_x86::Code::Push_r64 => h_push64,
        Mnemonic::Pop if insn.code() == iced_x86::Code::Pop_r64 => h_pop64,
        Mnemonic::Nop => h_nop,
        _ => h_generic,
    };
    u
}

pub(crate) fn is_jcc(m: Mnemonic) -> bool {
    use Mnemonic as M;
    matches!(
        m,
        M::Ja
            | M::Jae
            | M::Jb
            | M::Jbe
            | M::Je
            | M::Jg
            | M::Jge
            | M::Jl
            | M::Jle
            | M::Jne
            | M::Jno
            | M::Jnp
            | M::Jns
            | M::Jo
            | M::Jp
            | M::Js
    )
}

// ------------------------------------------------------------ operand access

#[inline(always)]
fn ea(core: &Core, m: &MemOp) -> u64 {
    let mut a = m.disp;
    if m.base != 0xff {
        a = a.wrapping_add(core.st.gpr[m.base as usize]);
    }
    if m.index != 0xff {
        a = a.wrapping_add(core.st.gpr[m.index as usize].wrapping_mul(m.scale as u64));
    }
    a & m.amask
}

#[inline(always)]
fn get_reg(core: &Core, idx: u8, hi: bool, size: u8) -> u64 {
    let v = core.st.gpr[idx as usize];
    if hi {
        (v >> 8) & 0xff
    } else {
        v & mask(size)
    }
}

#[inline(always)]
fn set_reg(core: &mut Core, idx: u8, hi: bool, size: u8, v: u64) {
    let g = &mut core.st.gpr[idx as usize];
    *g = match (size, hi) {
        (1, true) => (*g & !0xff00) | ((v & 0xff) << 8),
        (1, false) => (*g & !0xff) | (v & 0xff),
        (2, _) => (*g & !0xffff) | (v & 0xffff),
        (4, _) => v & 0xffff_ffff,
        _ => v,
    };
}

#[inline(always)]
fn read(core: &mut Core, u: &Uop, o: Opnd, size: u8) -> R<u64> {
    match o {
        Opnd::Reg { idx, hi } => Ok(get_reg(core, idx, hi, size)),
        Opnd::Imm(v) => Ok(v & mask(size)),
        Opnd::Mem => {
            let off = ea(core, &u.mem);
            core.read_mem(u.mem.seg as usize, off, size)
        }
        Opnd::None => Ok(0),
    }
}

#[inline(always)]
fn write(core: &mut Core, u: &Uop, o: Opnd, size: u8, v: u64) -> R {
    match o {
        Opnd::Reg { idx, hi } => {
            set_reg(core, idx, hi, size, v);
            Ok(())
        }
        Opnd::Mem => {
            let off = ea(core, &u.mem);
            core.write_mem(u.mem.seg as usize, off, size, v & mask(size))
        }
        _ => Err(crate::core::ud()),
    }
}

// ------------------------------------------------------------------ handlers

fn h_generic(core: &mut Core, u: &Uop) -> R {
    exec::execute(core, &u.insn)
}

fn h_nop(_: &mut Core, _: &Uop) -> R {
    Ok(())
}

fn h_mov(core: &mut Core, u: &Uop) -> R {
    let v = read(core, u, u.ops[1], u.size)?;
    write(core, u, u.ops[0], u.size, v)
}

#[inline(always)]
fn alu(core: &mut Core, u: &Uop, op: Bin) -> R {
    if u.lock {
        return exec::alu::binop(core, &u.insn, op);
    }
    let size = u.size;
    let src = read(core, u, u.ops[1], size)?;
    let dst = read(core, u, u.ops[0], size)?;
    let cin = if matches!(op, Bin::Adc | Bin::Sbb) {
        exec::carry(core) as u64
    } else {
        0
    };
    let (res, fop) = match op {
        Bin::Add => (dst.wrapping_add(src), FlagOp::Add),
        Bin::Adc => (dst.wrapping_add(src).wrapping_add(cin), FlagOp::Adc),
        Bin::Sbb => (dst.wrapping_sub(src).wrapping_sub(cin), FlagOp::Sbb),
        Bin::Sub | Bin::Cmp => (dst.wrapping_sub(src), FlagOp::Sub),
        Bin::And | Bin::Test => (dst & src, FlagOp::Logic),
        Bin::Or => (dst | src, FlagOp::Logic),
        _ => (dst ^ src, FlagOp::Logic),
    };
    if op != Bin::Cmp && op != Bin::Test {
        write(core, u, u.ops[0], size, res)?;
    }
    let mut fl = Flags::set(fop, size, dst, src, res);
    fl.aux = cin;
    core.st.flags = fl;
    Ok(())
}

fn h_adc(core: &mut Core, u: &Uop) -> R {
    alu(core, u, Bin::Adc)
}
fn h_sbb(core: &mut Core, u: &Uop) -> R {
    alu(core, u, Bin::Sbb)
}

/// 64-bit MUL (the inner loop of multi-precision arithmetic).
fn h_mul64(core: &mut Core, u: &Uop) -> R {
    let src = read(core, u, u.ops[0], 8)?;
    let p = (core.st.gpr[0] as u128) * (src as u128);
    let lo = p as u64;
    let hi = (p >> 64) as u64;
    core.st.gpr[0] = lo;
    core.st.gpr[2] = hi;
    // CF=OF=(high half non-zero); SF/ZF/PF follow the low half like the
    // generic path, AF is cleared.
    let mut f = Flags::set(FlagOp::Logic, 8, lo, 0, lo).materialize(core.st.rflags);
    f &= !(crate::cpu::FLAG_CF | crate::cpu::FLAG_OF);
    if hi != 0 {
        f |= crate::cpu::FLAG_CF | crate::cpu::FLAG_OF;
    }
    core.st.set_rflags(f);
    Ok(())
}

fn h_add(core: &mut Core, u: &Uop) -> R {
    alu(core, u, Bin::Add)
}
fn h_sub(core: &mut Core, u: &Uop) -> R {
    alu(core, u, Bin::Sub)
}
fn h_and(core: &mut Core, u: &Uop) -> R {
    alu(core, u, Bin::And)
}
fn h_or(core: &mut Core, u: &Uop) -> R {
    alu(core, u, Bin::Or)
}
fn h_xor(core: &mut Core, u: &Uop) -> R {
    alu(core, u, Bin::Xor)
}
fn h_cmp(core: &mut Core, u: &Uop) -> R {
    alu(core, u, Bin::Cmp)
}
fn h_test(core: &mut Core, u: &Uop) -> R {
    alu(core, u, Bin::Test)
}

#[inline(always)]
fn incdec(core: &mut Core, u: &Uop, inc: bool) -> R {
    if u.lock {
        return exec::alu::incdec(core, &u.insn, inc);
    }
    let size = u.size;
    let cf = exec::carry(core) as u64;
    let d = read(core, u, u.ops[0], size)?;
    let res = if inc {
        d.wrapping_add(1)
    } else {
        d.wrapping_sub(1)
    };
    write(core, u, u.ops[0], size, res)?;
    let mut fl = Flags::set(if inc { FlagOp::Inc } else { FlagOp::Dec }, size, d, 1, res);
    fl.aux = cf;
    core.st.flags = fl;
    Ok(())
}

fn h_inc(core: &mut Core, u: &Uop) -> R {
    incdec(core, u, true)
}
fn h_dec(core: &mut Core, u: &Uop) -> R {
    incdec(core, u, false)
}

fn h_lea(core: &mut Core, u: &Uop) -> R {
    let a = ea(core, &u.mem);
    write(core, u, u.ops[0], u.size, a)
}

fn h_movzx(core: &mut Core, u: &Uop) -> R {
    let v = read(core, u, u.ops[1], u.target as u8)?;
    write(core, u, u.ops[0], u.size, v)
}

fn h_movsx(core: &mut Core, u: &Uop) -> R {
    let v = read(core, u, u.ops[1], u.target as u8)?;
    write(core, u, u.ops[0], u.size, sext(v, u.target as u8))
}

fn h_jcc(core: &mut Core, u: &Uop) -> R {
    if exec::cond(core, u.cc) {
        core.next_rip = u.target;
    }
    Ok(())
}

fn h_jmp(core: &mut Core, u: &Uop) -> R {
    core.next_rip = u.target;
    Ok(())
}

fn h_call(core: &mut Core, u: &Uop) -> R {
    exec::push(core, u.size, u.next_ip)?;
    core.next_rip = u.target;
    Ok(())
}

fn h_ret64(core: &mut Core, _u: &Uop) -> R {
    let t = exec::pop(core, 8)?;
    core.next_rip = t;
    Ok(())
}

fn h_push64(core: &mut Core, u: &Uop) -> R {
    let v = read(core, u, u.ops[0], 8)?;
    exec::push(core, 8, v)
}

fn h_pop64(core: &mut Core, u: &Uop) -> R {
    let v = exec::pop(core, 8)?;
    write(core, u, u.ops[0], 8, v)
}

/// IMUL r, r/m and IMUL r, r/m, imm.
fn h_imul(core: &mut Core, u: &Uop) -> R {
    let size = u.size;
    let (a, b) = if u.ops[2] == Opnd::None {
        (
            read(core, u, u.ops[0], size)?,
            read(core, u, u.ops[1], size)?,
        )
    } else {
        (
            read(core, u, u.ops[1], size)?,
            read(core, u, u.ops[2], size)?,
        )
    };
    let p = (sext(a, size) as i64 as i128) * (sext(b, size) as i64 as i128);
    let lo = (p as u64) & mask(size);
    write(core, u, u.ops[0], size, lo)?;
    let mut f = Flags::set(FlagOp::Logic, size, lo, 0, lo).materialize(core.st.rflags);
    f &= !(crate::cpu::FLAG_CF | crate::cpu::FLAG_OF);
    if sext(lo, size) as i64 as i128 != p {
        f |= crate::cpu::FLAG_CF | crate::cpu::FLAG_OF;
    }
    core.st.set_rflags(f);
    Ok(())
}

#[inline(always)]
fn shift_fast(core: &mut Core, u: &Uop, op: FlagOp) -> R {
    let size = u.size;
    let cmask = if size == 8 { 63 } else { 31 };
    let count = (read(core, u, u.ops[1], 1)? & cmask) as u32;
    let d = read(core, u, u.ops[0], size)?;
    if count == 0 {
        // No flag change; a 32-bit register destination is still written.
        if size == 4 && matches!(u.ops[0], Opnd::Reg { .. }) {
            write(core, u, u.ops[0], size, d)?;
        }
        return Ok(());
    }
    let res = match op {
        FlagOp::Shl => ((d as u128) << count) as u64,
        FlagOp::Shr => d >> count,
        _ => ((sext(d, size) as i64) >> count) as u64,
    };
    write(core, u, u.ops[0], size, res)?;
    core.st.flags = Flags::set(op, size, d, count as u64, res);
    Ok(())
}

fn h_shl(core: &mut Core, u: &Uop) -> R {
    shift_fast(core, u, FlagOp::Shl)
}
fn h_shr(core: &mut Core, u: &Uop) -> R {
    shift_fast(core, u, FlagOp::Shr)
}
fn h_sar(core: &mut Core, u: &Uop) -> R {
    shift_fast(core, u, FlagOp::Sar)
}
