//! Integer arithmetic, logic, shifts, bit operations, data movement.

use iced_x86::{Instruction, Mnemonic, OpKind, Register};

use super::operand::{
    ea, is_mem, mem_seg, op_size, read_op, reg_read, reg_write, rmw_op, write_op,
};
use super::{carry, cond, set_cf};
use crate::core::{fault, gp, Core, R};
use crate::cpu::{
    mask, sext, FLAGS_ARITH, FLAG_AF, FLAG_CF, FLAG_DF, FLAG_OF, FLAG_PF, FLAG_SF, FLAG_ZF,
};
use crate::flags::{FlagOp, Flags};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Bin {
    Add,
    Or,
    Adc,
    Sbb,
    And,
    Sub,
    Xor,
    Cmp,
    Test,
}

fn de() -> crate::core::Exc {
    fault(0, None)
}

pub fn binop(core: &mut Core, insn: &Instruction, op: Bin) -> R {
    let size = op_size(insn, 0);
    let src = read_op(core, insn, 1, size)?;
    let cin = if matches!(op, Bin::Adc | Bin::Sbb) {
        carry(core) as u64
    } else {
        0
    };
    let m = mask(size);
    let (dst, res) = match op {
        Bin::Cmp | Bin::Test => {
            let d = read_op(core, insn, 0, size)?;
            let r = if op == Bin::Cmp {
                d.wrapping_sub(src)
            } else {
                d & src
            };
            (d, r)
        }
        _ => {
            let locked = insn.has_lock_prefix();
            let f = move |d: u64| match op {
                Bin::Add => d.wrapping_add(src),
                Bin::Adc => d.wrapping_add(src).wrapping_add(cin),
                Bin::Sub => d.wrapping_sub(src),
                Bin::Sbb => d.wrapping_sub(src).wrapping_sub(cin),
                Bin::And => d & src,
                Bin::Or => d | src,
                _ => d ^ src,
            };
            let d = rmw_op(core, insn, 0, size, locked, &mut { f })?;
            (d, f(d) & m)
        }
    };
    let fop = match op {
        Bin::Add => FlagOp::Add,
        Bin::Adc => FlagOp::Adc,
        Bin::Sub | Bin::Cmp => FlagOp::Sub,
        Bin::Sbb => FlagOp::Sbb,
        _ => FlagOp::Logic,
    };
    let mut fl = Flags::set(fop, size, dst, src, res);
    fl.aux = cin;
    core.st.flags = fl;
    Ok(())
}

pub fn incdec(core: &mut Core, insn: &Instruction, inc: bool) -> R {
    let size = op_size(insn, 0);
    let cf = carry(core) as u64;
    let d = rmw_op(core, insn, 0, size, insn.has_lock_prefix(), &mut |d| {
        if inc {
            d.wrapping_add(1)
        } else {
            d.wrapping_sub(1)
        }
    })?;
    let res = if inc {
        d.wrapping_add(1)
    } else {
        d.wrapping_sub(1)
    };
    let mut fl = Flags::set(if inc { FlagOp::Inc } else { FlagOp::Dec }, size, d, 1, res);
    fl.aux = cf;
    core.st.flags = fl;
    Ok(())
}

pub fn neg(core: &mut Core, insn: &Instruction) -> R {
    let size = op_size(insn, 0);
    let d = rmw_op(core, insn, 0, size, insn.has_lock_prefix(), &mut |d| {
        0u64.wrapping_sub(d)
    })?;
    core.st.flags = Flags::set(FlagOp::Sub, size, 0, d, 0u64.wrapping_sub(d));
    Ok(())
}

pub fn not(core: &mut Core, insn: &Instruction) -> R {
    let size = op_size(insn, 0);
    rmw_op(core, insn, 0, size, insn.has_lock_prefix(), &mut |d| !d)?;
    Ok(())
}

pub fn lea(core: &mut Core, insn: &Instruction) -> R {
    let size = op_size(insn, 0);
    let a = ea(&core.st, insn);
    reg_write(&mut core.st, insn.op0_register(), a & mask(size));
    Ok(())
}

pub fn movx(core: &mut Core, insn: &Instruction, signed: bool) -> R {
    let dsize = op_size(insn, 0);
    let ssize = op_size(insn, 1);
    let v = read_op(core, insn, 1, ssize)?;
    let v = if signed { sext(v, ssize) } else { v };
    reg_write(&mut core.st, insn.op0_register(), v & mask(dsize));
    Ok(())
}

pub fn xchg(core: &mut Core, insn: &Instruction) -> R {
    let size = op_size(insn, 0);
    if is_mem(insn, 0) || is_mem(insn, 1) {
        let (mn, rn) = if is_mem(insn, 0) { (0, 1) } else { (1, 0) };
        let r = insn.op_register(rn);
        let rv = reg_read(&core.st, r) & mask(size);
        // XCHG with memory is always locked.
        let old = rmw_op(core, insn, mn, size, true, &mut |_| rv)?;
        reg_write(&mut core.st, r, old);
    } else {
        let (a, b) = (insn.op0_register(), insn.op1_register());
        let va = reg_read(&core.st, a);
        let vb = reg_read(&core.st, b);
        reg_write(&mut core.st, a, vb);
        reg_write(&mut core.st, b, va);
    }
    Ok(())
}

pub fn xadd(core: &mut Core, insn: &Instruction) -> R {
    let size = op_size(insn, 0);
    let r = insn.op1_register();
    let src = reg_read(&core.st, r) & mask(size);
    let old = rmw_op(core, insn, 0, size, insn.has_lock_prefix(), &mut |d| {
        d.wrapping_add(src)
    })?;
    // The register receives the old destination (after the destination write
    // when both are the same register, as the CPU does).
    reg_write(&mut core.st, r, old);
    core.st.flags = Flags::set(FlagOp::Add, size, old, src, old.wrapping_add(src));
    Ok(())
}

pub fn cmpxchg(core: &mut Core, insn: &Instruction) -> R {
    let size = op_size(insn, 0);
    let m = mask(size);
    let acc = core.st.gpr[0] & m;
    let src = reg_read(&core.st, insn.op1_register()) & m;
    let old = if is_mem(insn, 0) {
        rmw_op(core, insn, 0, size, insn.has_lock_prefix(), &mut |d| {
            if d == acc {
                src
            } else {
                d
            }
        })?
    } else {
        let r = insn.op0_register();
        let d = reg_read(&core.st, r) & m;
        if d == acc {
            reg_write(&mut core.st, r, src);
        }
        d
    };
    core.st.flags = Flags::set(FlagOp::Sub, size, acc, old, acc.wrapping_sub(old));
    if old != acc {
        reg_write(&mut core.st, acc_reg(size), old);
    }
    Ok(())
}

fn acc_reg(size: u8) -> Register {
    match size {
        1 => Register::AL,
        2 => Register::AX,
        4 => Register::EAX,
        _ => Register::RAX,
    }
}

/// CMPXCHG8B / CMPXCHG16B.
pub fn cmpxchg_double(core: &mut Core, insn: &Instruction) -> R {
    let wide = insn.mnemonic() == Mnemonic::Cmpxchg16b;
    let half = if wide { 8 } else { 4 };
    let m = mask(half);
    let off = ea(&core.st, insn);
    let lin = core.lin(mem_seg(insn), off)?;
    if wide && lin & 15 != 0 {
        return Err(gp(0));
    }
    let (eax, edx) = (core.st.gpr[0] & m, core.st.gpr[2] & m);
    let (ebx, ecx) = (core.st.gpr[3] & m, core.st.gpr[1] & m);
    let user = core.user();
    let (lo, hi, equal);
    if wide {
        let p = core.translate(lin, crate::memory::mmu::Access::Write, user)?;
        match core.mem.ram_ptr(p, 16) {
            Some(host) if lin & 0xfff <= 0xff0 => {
                // SAFETY: 16 aligned bytes of mapped RAM inside one page.
                let (l, h, ok) = unsafe { cas128(host, eax, edx, ebx, ecx) };
                core.mem.note_write_gpa(p, 16);
                lo = l;
                hi = h;
                equal = ok;
            }
            _ => return Err(crate::core::Exc::unimplemented("CMPXCHG16B on MMIO")),
        }
    } else {
        let expected = eax | (edx << 32);
        let new = ebx | (ecx << 32);
        let old = core.rmw_lin(lin, 8, true, user, &mut |d| {
            if d == expected {
                new
            } else {
                d
            }
        })?;
        lo = old & m;
        hi = old >> 32;
        equal = old == expected;
    }
    core.st.settle_flags();
    if equal {
        core.st.rflags |= FLAG_ZF;
    } else {
        core.st.rflags &= !FLAG_ZF;
        // EDX:EAX / RDX:RAX get the value found (32-bit halves zero-extend).
        core.st.gpr[0] = lo;
        core.st.gpr[2] = hi;
    }
    Ok(())
}

/// 128-bit compare-exchange on host memory; returns (old lo, old hi, success).
///
/// # Safety
/// `p` must be 16-byte aligned and valid for reads and writes.
unsafe fn cas128(p: *mut u8, elo: u64, ehi: u64, nlo: u64, nhi: u64) -> (u64, u64, bool) {
    let (lo, hi): (u64, u64);
    // RBX is reserved by LLVM, so the new low half goes through a scratch
    // register swapped in and out around the instruction.
    core::arch::asm!(
        "xchg {tmp}, rbx",
        "lock cmpxchg16b [{p}]",
        "xchg {tmp}, rbx",
        p = in(reg) p,
        tmp = inout(reg) nlo => _,
        inout("rax") elo => lo,
        inout("rdx") ehi => hi,
        in("rcx") nhi,
        options(nostack)
    );
    (lo, hi, lo == elo && hi == ehi)
}

/// Set the six arithmetic flags explicitly.
fn set_arith(core: &mut Core, bits: u64) {
    core.st.settle_flags();
    core.st.rflags = (core.st.rflags & !FLAGS_ARITH) | (bits & FLAGS_ARITH);
}

fn szp(res: u64, size: u8) -> u64 {
    let mut f = 0;
    if res & mask(size) == 0 {
        f |= FLAG_ZF;
    }
    if (res >> (size as u32 * 8 - 1)) & 1 != 0 {
        f |= FLAG_SF;
    }
    if (res as u8).count_ones() & 1 == 0 {
        f |= FLAG_PF;
    }
    f
}

pub fn mul(core: &mut Core, insn: &Instruction) -> R {
    let size = op_size(insn, 0);
    let src = read_op(core, insn, 0, size)? as u128;
    let m = mask(size);
    let a = (core.st.gpr[0] & m) as u128;
    let p = a * src;
    let bits = size as u32 * 8;
    let lo = (p as u64) & m;
    let hi = ((p >> bits) as u64) & m;
    if size == 1 {
        reg_write(&mut core.st, Register::AX, p as u64 & 0xffff);
    } else {
        reg_write(&mut core.st, acc_reg(size), lo);
        reg_write(&mut core.st, dx_reg(size), hi);
    }
    let mut f = szp(lo, size);
    if hi != 0 {
        f |= FLAG_CF | FLAG_OF;
    }
    set_arith(core, f);
    Ok(())
}

fn dx_reg(size: u8) -> Register {
    match size {
        2 => Register::DX,
        4 => Register::EDX,
        _ => Register::RDX,
    }
}

pub fn imul(core: &mut Core, insn: &Instruction) -> R {
    let size = op_size(insn, 0);
    let bits = size as u32 * 8;
    let m = mask(size);
    if insn.op_count() == 1 {
        let src = sext(read_op(core, insn, 0, size)?, size) as i64 as i128;
        let a = sext(core.st.gpr[0] & m, size) as i64 as i128;
        let p = a * src;
        let lo = (p as u64) & m;
        let hi = ((p >> bits) as u64) & m;
        if size == 1 {
            reg_write(&mut core.st, Register::AX, p as u64 & 0xffff);
        } else {
            reg_write(&mut core.st, acc_reg(size), lo);
            reg_write(&mut core.st, dx_reg(size), hi);
        }
        let mut f = szp(lo, size);
        if sext(lo, size) as i64 as i128 != p {
            f |= FLAG_CF | FLAG_OF;
        }
        set_arith(core, f);
        return Ok(());
    }
    let (a, b) = if insn.op_count() == 2 {
        (read_op(core, insn, 0, size)?, read_op(core, insn, 1, size)?)
    } else {
        (read_op(core, insn, 1, size)?, read_op(core, insn, 2, size)?)
    };
    let p = (sext(a, size) as i64 as i128) * (sext(b, size) as i64 as i128);
    let lo = (p as u64) & m;
    reg_write(&mut core.st, insn.op0_register(), lo);
    let mut f = szp(lo, size);
    if sext(lo, size) as i64 as i128 != p {
        f |= FLAG_CF | FLAG_OF;
    }
    set_arith(core, f);
    Ok(())
}

pub fn div(core: &mut Core, insn: &Instruction, signed: bool) -> R {
    let size = op_size(insn, 0);
    let m = mask(size);
    let bits = size as u32 * 8;
    let divisor = read_op(core, insn, 0, size)?;
    if divisor == 0 {
        return Err(de());
    }
    let (lo, hi) = if size == 1 {
        (core.st.gpr[0] & 0xff, (core.st.gpr[0] >> 8) & 0xff)
    } else {
        (core.st.gpr[0] & m, core.st.gpr[2] & m)
    };
    let dividend = (hi as u128) << bits | lo as u128;
    let (q, r) = if signed {
        // Sign-extend the double-width dividend.
        let sh = 128 - 2 * bits;
        let n = ((dividend << sh) as i128) >> sh;
        let d = sext(divisor, size) as i64 as i128;
        let q = n.wrapping_div(d);
        let r = n.wrapping_rem(d);
        let min = -(1i128 << (bits - 1));
        let max = (1i128 << (bits - 1)) - 1;
        if q < min || q > max {
            return Err(de());
        }
        (q as u64 & m, r as u64 & m)
    } else {
        let q = dividend / divisor as u128;
        let r = dividend % divisor as u128;
        if q > m as u128 {
            return Err(de());
        }
        (q as u64, r as u64)
    };
    if size == 1 {
        reg_write(&mut core.st, Register::AX, q | (r << 8));
    } else {
        reg_write(&mut core.st, acc_reg(size), q);
        reg_write(&mut core.st, dx_reg(size), r);
    }
    Ok(())
}

pub fn shift(core: &mut Core, insn: &Instruction) -> R {
    let size = op_size(insn, 0);
    let bits = size as u32 * 8;
    let cmask = if size == 8 { 0x3f } else { 0x1f };
    let count = (read_op(core, insn, 1, 1)? & cmask) as u32;
    if count == 0 {
        return zero_count(core, insn, size);
    }
    let m = mask(size);
    let mn = insn.mnemonic();
    let cin = carry(core) as u64;
    let f = move |d: u64| -> u64 {
        match mn {
            Mnemonic::Shl | Mnemonic::Sal => ((d as u128) << count) as u64,
            Mnemonic::Shr => ((d as u128) >> count) as u64,
            Mnemonic::Sar => ((sext(d, size) as i64) >> count.min(63)) as u64,
            Mnemonic::Rol => {
                let c = count % bits;
                if c == 0 {
                    d
                } else {
                    (d << c) | (d >> (bits - c))
                }
            }
            Mnemonic::Ror => {
                let c = count % bits;
                if c == 0 {
                    d
                } else {
                    (d >> c) | (d << (bits - c))
                }
            }
            Mnemonic::Rcl => rotate_carry(d, cin, count, bits, true).0,
            _ => rotate_carry(d, cin, count, bits, false).0,
        }
    };
    let d = rmw_op(core, insn, 0, size, insn.has_lock_prefix(), &mut { f })?;
    let res = f(d) & m;
    let msb = |v: u64| (v >> (bits - 1)) & 1 != 0;
    match mn {
        Mnemonic::Shl | Mnemonic::Sal => {
            core.st.flags = Flags::set(FlagOp::Shl, size, d, count as u64, res)
        }
        Mnemonic::Shr => core.st.flags = Flags::set(FlagOp::Shr, size, d, count as u64, res),
        Mnemonic::Sar => core.st.flags = Flags::set(FlagOp::Sar, size, d, count as u64, res),
        _ => {
            let (cf, of) = match mn {
                Mnemonic::Rol => (res & 1 != 0, msb(res) != (res & 1 != 0)),
                Mnemonic::Ror => (msb(res), msb(res) != ((res >> (bits - 2)) & 1 != 0)),
                Mnemonic::Rcl => {
                    let cf = rotate_carry(d, cin, count, bits, true).1;
                    (cf, msb(res) != cf)
                }
                _ => {
                    let cf = rotate_carry(d, cin, count, bits, false).1;
                    (cf, msb(res) != ((res >> (bits - 2)) & 1 != 0))
                }
            };
            core.st.settle_flags();
            let r = &mut core.st.rflags;
            *r &= !(FLAG_CF | FLAG_OF);
            if cf {
                *r |= FLAG_CF;
            }
            if of {
                *r |= FLAG_OF;
            }
        }
    }
    Ok(())
}

/// RCL/RCR: rotate the (bits+1)-wide value CF:d; returns (result, new CF).
fn rotate_carry(d: u64, cin: u64, count: u32, bits: u32, left: bool) -> (u64, bool) {
    let c = count % (bits + 1);
    let t = (d as u128 & ((1u128 << bits) - 1)) | ((cin as u128 & 1) << bits);
    let tm = (1u128 << (bits + 1)) - 1;
    let r = if c == 0 {
        t
    } else if left {
        ((t << c) | (t >> (bits + 1 - c))) & tm
    } else {
        ((t >> c) | (t << (bits + 1 - c))) & tm
    };
    (r as u64, (r >> bits) & 1 != 0)
}

/// A shift by zero changes no flags and no value, but a 32-bit register
/// destination is still written (and so zero-extended), and a memory
/// destination is still read (and may fault).
fn zero_count(core: &mut Core, insn: &Instruction, size: u8) -> R {
    let v = read_op(core, insn, 0, size)?;
    if size == 4 && insn.op0_kind() == OpKind::Register {
        reg_write(&mut core.st, insn.op0_register(), v);
    }
    Ok(())
}

pub fn shiftd(core: &mut Core, insn: &Instruction) -> R {
    let size = op_size(insn, 0);
    let bits = size as u32 * 8;
    let cmask = if size == 8 { 0x3f } else { 0x1f };
    let count = (read_op(core, insn, 2, 1)? & cmask) as u32;
    let src = reg_read(&core.st, insn.op1_register()) & mask(size);
    if count == 0 {
        return zero_count(core, insn, size);
    }
    let left = insn.mnemonic() == Mnemonic::Shld;
    let f = move |d: u64| -> u64 {
        if left {
            let t = ((d as u128) << bits) | src as u128;
            // 16-bit counts above 16 shift in bits of the destination again,
            // as Intel CPUs do.
            let t = if count > bits {
                (t << bits) | d as u128
            } else {
                t
            };
            let c = if count > bits { count - bits } else { count };
            ((t << c) >> bits) as u64
        } else {
            let t = ((src as u128) << bits) | d as u128;
            let t = if count > bits {
                t | ((d as u128) << (2 * bits))
            } else {
                t
            };
            (t >> count) as u64
        }
    };
    let d = rmw_op(core, insn, 0, size, false, &mut { f })?;
    let res = f(d) & mask(size);
    if left {
        core.st.flags = Flags::set(FlagOp::Shl, size, d, count as u64, res);
        let of = ((res ^ d) >> (bits - 1)) & 1 != 0;
        core.st.settle_flags();
        core.st.rflags = (core.st.rflags & !FLAG_OF) | if of { FLAG_OF } else { 0 };
    } else {
        core.st.flags = Flags::set(FlagOp::Shr, size, d, count as u64, res);
        let of = ((res ^ d) >> (bits - 1)) & 1 != 0;
        core.st.settle_flags();
        core.st.rflags = (core.st.rflags & !FLAG_OF) | if of { FLAG_OF } else { 0 };
    }
    Ok(())
}

pub fn bittest(core: &mut Core, insn: &Instruction) -> R {
    let size = op_size(insn, 0);
    let bits = size as u64 * 8;
    let mn = insn.mnemonic();
    let (bit, cf);
    if insn.op1_kind() == OpKind::Register && is_mem(insn, 0) {
        // A register bit offset addresses memory beyond the operand (signed).
        let off = sext(reg_read(&core.st, insn.op1_register()), size) as i64;
        let word = off.div_euclid(bits as i64);
        bit = off.rem_euclid(bits as i64) as u32;
        let addr = ea(&core.st, insn).wrapping_add((word * size as i64) as u64)
            & mask(super::operand::addr_size(insn));
        let lin = core.lin(mem_seg(insn), addr)?;
        let user = core.user();
        let old = if mn == Mnemonic::Bt {
            core.read_lin(lin, size, user)?
        } else {
            core.rmw_lin(lin, size, insn.has_lock_prefix(), user, &mut |d| {
                bitop(mn, d, bit)
            })?
        };
        cf = (old >> bit) & 1 != 0;
    } else {
        bit = (read_op(core, insn, 1, size)? % bits) as u32;
        let old = if mn == Mnemonic::Bt {
            read_op(core, insn, 0, size)?
        } else {
            rmw_op(core, insn, 0, size, insn.has_lock_prefix(), &mut |d| {
                bitop(mn, d, bit)
            })?
        };
        cf = (old >> bit) & 1 != 0;
    }
    set_cf(core, cf);
    Ok(())
}

fn bitop(mn: Mnemonic, d: u64, bit: u32) -> u64 {
    match mn {
        Mnemonic::Bts => d | (1 << bit),
        Mnemonic::Btr => d & !(1 << bit),
        Mnemonic::Btc => d ^ (1 << bit),
        _ => d,
    }
}

pub fn bitscan(core: &mut Core, insn: &Instruction, reverse: bool) -> R {
    let size = op_size(insn, 0);
    let src = read_op(core, insn, 1, size)?;
    core.st.settle_flags();
    if src == 0 {
        // Destination unchanged (as on AMD and, in practice, Intel).
        core.st.rflags |= FLAG_ZF;
        return Ok(());
    }
    let idx = if reverse {
        63 - src.leading_zeros() as u64
    } else {
        src.trailing_zeros() as u64
    };
    reg_write(&mut core.st, insn.op0_register(), idx);
    core.st.rflags &= !FLAG_ZF;
    Ok(())
}

/// LZCNT (AMD's ABM, advertised in CPUID 0x80000001 ECX.LZCNT): the count
/// of leading zero bits, the operand size for zero; CF = source was zero,
/// ZF = result is zero (OF, SF, AF, PF are undefined: cleared here). Where
/// the bit is not advertised the F3 0F BD encoding executes as BSR, as on
/// a CPU without it.
pub fn lzcnt(core: &mut Core, insn: &Instruction) -> R {
    if !crate::cpuid::has_feature(&core.cpuid, iced_x86::CpuidFeature::LZCNT) {
        return bitscan(core, insn, true);
    }
    let size = op_size(insn, 0);
    let src = read_op(core, insn, 1, size)?;
    let n = src.leading_zeros() as u64 - (64 - 8 * size as u64);
    reg_write(&mut core.st, insn.op0_register(), n);
    let cf = if src == 0 { FLAG_CF } else { 0 };
    let zf = if n == 0 { FLAG_ZF } else { 0 };
    set_arith(core, cf | zf);
    Ok(())
}

pub fn popcnt(core: &mut Core, insn: &Instruction) -> R {
    let size = op_size(insn, 0);
    let src = read_op(core, insn, 1, size)?;
    reg_write(&mut core.st, insn.op0_register(), src.count_ones() as u64);
    set_arith(core, if src == 0 { FLAG_ZF } else { 0 });
    Ok(())
}

pub fn bswap(core: &mut Core, insn: &Instruction) -> R {
    let r = insn.op0_register();
    let v = reg_read(&core.st, r);
    let out = match r.size() {
        8 => v.swap_bytes(),
        4 => (v as u32).swap_bytes() as u64,
        // BSWAP r16 is undefined; CPUs zero the register.
        _ => 0,
    };
    reg_write(&mut core.st, r, out);
    Ok(())
}

pub fn extend_acc(core: &mut Core, insn: &Instruction) -> R {
    let a = core.st.gpr[0];
    match insn.mnemonic() {
        Mnemonic::Cbw => reg_write(&mut core.st, Register::AX, sext(a, 1)),
        Mnemonic::Cwde => reg_write(&mut core.st, Register::EAX, sext(a, 2)),
        _ => core.st.gpr[0] = sext(a, 4),
    }
    Ok(())
}

pub fn extend_to_dx(core: &mut Core, insn: &Instruction) -> R {
    let a = core.st.gpr[0];
    let (size, r) = match insn.mnemonic() {
        Mnemonic::Cwd => (2, Register::DX),
        Mnemonic::Cdq => (4, Register::EDX),
        _ => (8, Register::RDX),
    };
    let neg = (a >> (size * 8 - 1)) & 1 != 0;
    reg_write(&mut core.st, r, if neg { u64::MAX } else { 0 });
    Ok(())
}

pub fn lahf(core: &mut Core) -> R {
    let f = core.st.get_rflags() & 0xff;
    reg_write(&mut core.st, Register::AH, f | 2);
    Ok(())
}

pub fn sahf(core: &mut Core) -> R {
    let ah = (core.st.gpr[0] >> 8) & 0xff;
    let keep = FLAG_CF | FLAG_PF | FLAG_AF | FLAG_ZF | FLAG_SF;
    core.st.settle_flags();
    core.st.rflags = (core.st.rflags & !keep) | (ah & keep);
    Ok(())
}

pub fn flag_op(core: &mut Core, mn: Mnemonic) -> R {
    match mn {
        Mnemonic::Clc => set_cf(core, false),
        Mnemonic::Stc => set_cf(core, true),
        Mnemonic::Cmc => {
            let c = carry(core);
            set_cf(core, !c)
        }
        Mnemonic::Cld => core.st.rflags &= !FLAG_DF,
        _ => core.st.rflags |= FLAG_DF,
    }
    Ok(())
}

pub fn xlat(core: &mut Core, insn: &Instruction) -> R {
    let asz = super::operand::addr_size(insn);
    let off = (core.st.gpr[3].wrapping_add(core.st.gpr[0] & 0xff)) & mask(asz);
    let v = core.read_mem(mem_seg(insn), off, 1)?;
    reg_write(&mut core.st, Register::AL, v);
    Ok(())
}

pub fn cmov(core: &mut Core, insn: &Instruction) -> R {
    let size = op_size(insn, 0);
    // The source is read (and may fault) whether or not the move happens.
    let v = read_op(core, insn, 1, size)?;
    let r = insn.op0_register();
    if cond(core, insn.condition_code()) {
        reg_write(&mut core.st, r, v);
    } else if size == 4 {
        // A 32-bit CMOV zero-extends its destination even when not taken.
        let cur = reg_read(&core.st, r);
        reg_write(&mut core.st, r, cur);
    }
    Ok(())
}

/// Used by MOV with a plain destination.
pub fn mov_plain(core: &mut Core, insn: &Instruction) -> R {
    let size = op_size(insn, 0);
    let v = read_op(core, insn, 1, size)?;
    write_op(core, insn, 0, size, v)
}
