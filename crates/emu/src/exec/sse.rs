//! SSE/SSE2 (legacy encodings) and MMX: moves, logic, packed integer
//! arithmetic, shifts, shuffles and unpacks, conversions, and the
//! scalar/packed float operations. SSE3 and later live in [`super::sse4`].
//! MXCSR exception flags are not accumulated yet; rounding of
//! float-to-integer conversions honours MXCSR.RC.
//!
//! MMX registers alias the x87 registers as on hardware: MMi is the
//! mantissa of physical register Ri. Every MMX instruction (any form with
//! an MM operand, EMMS aside) sets TOP to 0 and tags all eight registers
//! valid; a write to MMi also sets Ri's sign and exponent bits (79:64) to
//! ones; EMMS empties the tags. FXSAVE/FXRSTOR and snapshots carry the MMX
//! state through the x87 registers. The packed-integer operations are
//! shared between the 64-bit (MM) and 128-bit (XMM) forms: operands are
//! read zero-extended to 128 bits, lane-wise results are truncated by the
//! 64-bit register write, and the few width-dependent operations (pack,
//! unpack, PMOVMSKB, PEXTRW/PINSRW, PSHUFB, PALIGNR, ...) take the width.

use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};

use super::operand::{ea, mem_seg, reg_read, reg_write};
use crate::core::{gp, Core, R};
use crate::cpu::*;

pub(super) fn xmm_idx(r: Register) -> Option<usize> {
    let n = (r as usize).wrapping_sub(Register::XMM0 as usize);
    if n < 16 {
        Some(n)
    } else {
        None
    }
}

pub(super) fn mm_idx(r: Register) -> Option<usize> {
    let n = (r as usize).wrapping_sub(Register::MM0 as usize);
    if n < 8 {
        Some(n)
    } else {
        None
    }
}

pub(super) fn is_xmm(insn: &Instruction, n: u32) -> bool {
    insn.op_kind(n) == OpKind::Register && xmm_idx(insn.op_register(n)).is_some()
}

pub(super) fn is_mm(insn: &Instruction, n: u32) -> bool {
    insn.op_kind(n) == OpKind::Register && mm_idx(insn.op_register(n)).is_some()
}

/// MMi: the mantissa of physical x87 register Ri. The only two places that
/// know the aliasing's storage (with [`mmx_transition`]).
pub(super) fn mm_get(core: &Core, i: usize) -> u64 {
    core.st.fpu.st[i & 7] as u64
}

/// Write MMi: the mantissa, with sign and exponent (bits 79:64) all ones.
pub(super) fn mm_set(core: &mut Core, i: usize, v: u64) {
    core.st.fpu.st[i & 7] = (0xffffu128 << 64) | v as u128;
}

/// What every MMX instruction but EMMS does to the x87 state: TOP = 0 and
/// all registers tagged valid.
fn mmx_transition(core: &mut Core) {
    core.st.fpu.top = 0;
    core.st.fpu.tag = 0xff;
}

/// The faults an MMX instruction (and an SSE instruction on MM registers)
/// checks first: CR0.EM #UD, CR0.TS #NM. CR4.OSFXSR does not matter.
fn mmx_check(core: &Core) -> R {
    if core.st.cr0 & CR0_EM != 0 {
        return Err(crate::core::ud());
    }
    if core.st.cr0 & CR0_TS != 0 {
        return Err(crate::core::fault(7, None));
    }
    // MMX instructions are x87 instructions too: #MF for a pending one.
    super::fpu::wait_check(core)
}

/// Width in bits of the packed operation: 64 for the MM forms.
pub(super) fn width(insn: &Instruction) -> u32 {
    if is_mm(insn, 0) || (insn.op_count() > 1 && is_mm(insn, 1)) {
        64
    } else {
        128
    }
}

/// Read an XMM register or a memory operand (zero-extended to 128 bits).
/// 16-byte memory operands must be aligned unless `unaligned`.
pub(super) fn src(core: &mut Core, insn: &Instruction, n: u32, unaligned: bool) -> R<u128> {
    match insn.op_kind(n) {
        OpKind::Register => {
            let r = insn.op_register(n);
            match (xmm_idx(r), mm_idx(r)) {
                (Some(i), _) => Ok(core.st.xmm[i]),
                (_, Some(i)) => Ok(mm_get(core, i) as u128),
                _ => Ok(reg_read(&core.st, r) as u128),
            }
        }
        OpKind::Memory => {
            let size = insn.memory_size().size() as u8;
            let s = mem_seg(insn);
            let off = ea(&core.st, insn);
            if size == 16 {
                if !unaligned && core.lin(s, off)? & 15 != 0 {
                    return Err(gp(0));
                }
                let lo = core.read_mem(s, off, 8)? as u128;
                let hi = core.read_mem(s, off.wrapping_add(8), 8)? as u128;
                Ok(lo | hi << 64)
            } else {
                Ok(core.read_mem(s, off, size)? as u128)
            }
        }
        _ => Ok(insn.immediate(n) as u128),
    }
}

/// Write operand `n`: a whole XMM register, a GPR, or memory of the
/// operand's size.
pub(super) fn dst(core: &mut Core, insn: &Instruction, n: u32, v: u128, unaligned: bool) -> R {
    match insn.op_kind(n) {
        OpKind::Register => {
            let r = insn.op_register(n);
            match (xmm_idx(r), mm_idx(r)) {
                (Some(i), _) => core.st.xmm[i] = v,
                (_, Some(i)) => mm_set(core, i, v as u64),
                _ => reg_write(&mut core.st, r, v as u64),
            }
            Ok(())
        }
        OpKind::Memory => {
            let size = insn.memory_size().size() as u8;
            let s = mem_seg(insn);
            let off = ea(&core.st, insn);
            if size == 16 {
                if !unaligned && core.lin(s, off)? & 15 != 0 {
                    return Err(gp(0));
                }
                core.write_mem(s, off.wrapping_add(8), 8, (v >> 64) as u64)?;
                core.write_mem(s, off, 8, v as u64)
            } else {
                core.write_mem(s, off, size, v as u64)
            }
        }
        _ => Err(crate::core::ud()),
    }
}

/// Register operand `n` (XMM, or MM zero-extended).
pub(super) fn xreg(core: &Core, insn: &Instruction, n: u32) -> u128 {
    let r = insn.op_register(n);
    match (xmm_idx(r), mm_idx(r)) {
        (Some(i), _) => core.st.xmm[i],
        (_, Some(i)) => mm_get(core, i) as u128,
        _ => 0,
    }
}

/// Write register operand `n` (an MM register takes the low 64 bits).
pub(super) fn set_x(core: &mut Core, insn: &Instruction, n: u32, v: u128) {
    let r = insn.op_register(n);
    match (xmm_idx(r), mm_idx(r)) {
        (Some(i), _) => core.st.xmm[i] = v,
        (_, Some(i)) => mm_set(core, i, v as u64),
        _ => {}
    }
}

/// Apply `f` lane-wise to `bits`-wide lanes of a and b.
pub(super) fn map2(a: u128, b: u128, bits: u32, f: impl Fn(u64, u64) -> u64) -> u128 {
    let m: u128 = if bits == 64 {
        u64::MAX as u128
    } else {
        (1u128 << bits) - 1
    };
    let mut r = 0u128;
    for i in 0..128 / bits {
        let sh = i * bits;
        let x = ((a >> sh) & m) as u64;
        let y = ((b >> sh) & m) as u64;
        r |= ((f(x, y) as u128) & m) << sh;
    }
    r
}

pub(super) fn lane(v: u128, bits: u32, i: u32) -> u64 {
    let m: u128 = if bits == 64 {
        u64::MAX as u128
    } else {
        (1u128 << bits) - 1
    };
    ((v >> (i * bits)) & m) as u64
}

pub(super) fn sx(v: u64, bits: u32) -> i64 {
    let sh = 64 - bits;
    ((v << sh) as i64) >> sh
}

pub(super) fn sat_s(v: i64, bits: u32) -> u64 {
    let max = (1i64 << (bits - 1)) - 1;
    let min = -(1i64 << (bits - 1));
    v.clamp(min, max) as u64
}

pub(super) fn sat_u(v: i64, bits: u32) -> u64 {
    v.clamp(0, (1i64 << bits) - 1) as u64
}

/// Interleave the low (or high) halves of a and b in `bits`-wide lanes of
/// a `width`-bit register.
fn unpack(a: u128, b: u128, bits: u32, high: bool, width: u32) -> u128 {
    let n = width / 2 / bits;
    let base = if high { n } else { 0 };
    let mut r = 0u128;
    for i in 0..n {
        r |= (lane(a, bits, base + i) as u128) << (2 * i * bits);
        r |= (lane(b, bits, base + i) as u128) << ((2 * i + 1) * bits);
    }
    r
}

pub(super) fn f32s(v: u128, i: u32) -> f32 {
    f32::from_bits(lane(v, 32, i) as u32)
}

pub(super) fn f64s(v: u128, i: u32) -> f64 {
    f64::from_bits(lane(v, 64, i))
}

pub(super) fn with_lane(v: u128, bits: u32, i: u32, x: u64) -> u128 {
    let m: u128 = if bits == 64 {
        u64::MAX as u128
    } else {
        (1u128 << bits) - 1
    };
    (v & !(m << (i * bits))) | (((x as u128) & m) << (i * bits))
}

pub(super) fn round_mxcsr(core: &Core, v: f64, truncate: bool) -> f64 {
    if truncate {
        return v.trunc();
    }
    match (core.st.mxcsr >> 13) & 3 {
        0 => v.round_ties_even(),
        1 => v.floor(),
        2 => v.ceil(),
        _ => v.trunc(),
    }
}

/// Float to integer with the x86 "integer indefinite" result on overflow.
pub(super) fn f2i(v: f64, size: u8) -> u64 {
    let bits = size as i32 * 8;
    let lim = 2f64.powi(bits - 1);
    if v.is_nan() || v >= lim || v < -lim {
        if size == 8 {
            1u64 << 63
        } else {
            1u64 << 31
        }
    } else if size == 8 {
        v as i64 as u64
    } else {
        v as i64 as u32 as u64
    }
}

fn fcmp_flags(core: &mut Core, a: f64, b: f64) {
    core.st.settle_flags();
    let f = &mut core.st.rflags;
    *f &= !(FLAG_ZF | FLAG_PF | FLAG_CF | FLAG_OF | FLAG_SF | FLAG_AF);
    if a.is_nan() || b.is_nan() {
        *f |= FLAG_ZF | FLAG_PF | FLAG_CF;
    } else if a < b {
        *f |= FLAG_CF;
    } else if a == b {
        *f |= FLAG_ZF;
    }
}

fn fop(mn: M, a: f64, b: f64) -> f64 {
    match mn {
        M::Addss | M::Addsd | M::Addps | M::Addpd => a + b,
        M::Subss | M::Subsd | M::Subps | M::Subpd => a - b,
        M::Mulss | M::Mulsd | M::Mulps | M::Mulpd => a * b,
        M::Divss | M::Divsd | M::Divps | M::Divpd => a / b,
        // x86 MIN/MAX return the second operand when unordered or equal.
        M::Minss | M::Minsd | M::Minps | M::Minpd => {
            if a < b {
                a
            } else {
                b
            }
        }
        M::Maxss | M::Maxsd | M::Maxps | M::Maxpd => {
            if a > b {
                a
            } else {
                b
            }
        }
        _ => b.sqrt(),
    }
}

pub fn execute(core: &mut Core, insn: &Instruction) -> R {
    let mn = insn.mnemonic();
    if mn == M::Crc32 {
        return super::sse4::crc32(core, insn);
    }
    // The SSE forms without an XMM operand: a GPR and memory.
    let sse = (0..insn.op_count()).any(|n| is_xmm(insn, n))
        || matches!(
            mn,
            M::Movnti | M::Cvttsd2si | M::Cvtsd2si | M::Cvttss2si | M::Cvtss2si
        );
    let mmx = (0..insn.op_count()).any(|n| is_mm(insn, n));
    if !sse && !mmx {
        if mn == M::Emms {
            mmx_check(core)?;
            super::require(core, iced_x86::CpuidFeature::MMX)?;
            core.st.fpu.tag = 0;
            return Ok(());
        }
        return super::fpu::execute(core, insn);
    }
    if sse {
        super::fpu::sse_check(core)?;
    } else {
        mmx_check(core)?;
    }
    if mmx {
        super::require(core, iced_x86::CpuidFeature::MMX)?;
    }
    vector(core, insn, mn)?;
    if mmx {
        mmx_transition(core);
    }
    Ok(())
}

fn vector(core: &mut Core, insn: &Instruction, mn: M) -> R {
    if let Some(r) = super::sse4::execute(core, insn, mn) {
        return r;
    }
    let xd = is_xmm(insn, 0);
    let w = width(insn);
    match mn {
        // ---------------------------------------------------------- moves
        M::Movaps | M::Movapd | M::Movdqa | M::Movntdq | M::Movntps | M::Movntpd => {
            let v = src(core, insn, 1, false)?;
            dst(core, insn, 0, v, false)
        }
        M::Movups | M::Movupd | M::Movdqu | M::Lddqu => {
            if mn == M::Lddqu {
                super::require(core, iced_x86::CpuidFeature::SSE3)?;
            }
            let v = src(core, insn, 1, true)?;
            dst(core, insn, 0, v, true)
        }
        M::Movnti | M::Movntq => {
            let v = src(core, insn, 1, true)?;
            dst(core, insn, 0, v, true)
        }
        M::Movd | M::Movq | M::Movq2dq | M::Movdq2q => {
            let v = src(core, insn, 1, true)?;
            if xd {
                // To XMM: zero-extend (movq xmm, xmm takes the low quadword).
                let w = if mn == M::Movd {
                    v & 0xffff_ffff
                } else {
                    v & u64::MAX as u128
                };
                set_x(core, insn, 0, w);
                Ok(())
            } else {
                let w = if mn == M::Movd {
                    v & 0xffff_ffff
                } else {
                    v & u64::MAX as u128
                };
                dst(core, insn, 0, w, true)
            }
        }
        M::Movss | M::Movsd => {
            let (bits, m) = if mn == M::Movss {
                (32, 0xffff_ffffu128)
            } else {
                (64, u64::MAX as u128)
            };
            let _ = bits;
            let v = src(core, insn, 1, true)?;
            if xd && is_xmm(insn, 1) {
                let d = xreg(core, insn, 0);
                set_x(core, insn, 0, (d & !m) | (v & m));
                Ok(())
            } else if xd {
                set_x(core, insn, 0, v & m);
                Ok(())
            } else {
                dst(core, insn, 0, v & m, true)
            }
        }
        M::Movlps | M::Movlpd | M::Movhps | M::Movhpd | M::Movhlps | M::Movlhps => {
            let high = matches!(mn, M::Movhps | M::Movhpd);
            if xd {
                let d = xreg(core, insn, 0);
                let s = src(core, insn, 1, true)?;
                let lo64 = u64::MAX as u128;
                let r = match mn {
                    M::Movhlps => (d & !lo64) | (s >> 64),
                    M::Movlhps => (d & lo64) | (s << 64),
                    _ if high => (d & lo64) | ((s & lo64) << 64),
                    _ => (d & !lo64) | (s & lo64),
                };
                set_x(core, insn, 0, r);
                Ok(())
            } else {
                let s = xreg(core, insn, 1);
                let v = if high { s >> 64 } else { s & u64::MAX as u128 };
                dst(core, insn, 0, v, true)
            }
        }
        M::Pmovmskb | M::Movmskps | M::Movmskpd => {
            let v = xreg(core, insn, 1);
            let bits = match mn {
                M::Pmovmskb => 8,
                M::Movmskps => 32,
                _ => 64,
            };
            let mut r = 0u64;
            for i in 0..w / bits {
                r |= (lane(v, bits, i) >> (bits - 1)) << i;
            }
            reg_write(&mut core.st, insn.op0_register(), r);
            Ok(())
        }
        M::Pextrw => {
            let v = xreg(core, insn, 1);
            let i = (insn.immediate(2) as u32) & (w / 16 - 1);
            // A GPR, or m16 for the SSE4.1 form (66 0F 3A 15).
            dst(core, insn, 0, lane(v, 16, i) as u128, true)
        }
        M::Pinsrw => {
            let d = xreg(core, insn, 0);
            let s = src(core, insn, 1, true)? as u64;
            let i = (insn.immediate(2) as u32) & (w / 16 - 1);
            set_x(core, insn, 0, with_lane(d, 16, i, s));
            Ok(())
        }
        // ---------------------------------------------------- float scalar
        M::Addss | M::Subss | M::Mulss | M::Divss | M::Minss | M::Maxss | M::Sqrtss => {
            let d = xreg(core, insn, 0);
            let s = src(core, insn, 1, true)?;
            let r = fop(mn, f32s(d, 0) as f64, f32s(s, 0) as f64) as f32;
            let r = if mn == M::Sqrtss {
                f32s(s, 0).sqrt()
            } else {
                r
            };
            set_x(core, insn, 0, with_lane(d, 32, 0, r.to_bits() as u64));
            Ok(())
        }
        M::Addsd | M::Subsd | M::Mulsd | M::Divsd | M::Minsd | M::Maxsd | M::Sqrtsd => {
            let d = xreg(core, insn, 0);
            let s = src(core, insn, 1, true)?;
            let r = fop(mn, f64s(d, 0), f64s(s, 0));
            set_x(core, insn, 0, with_lane(d, 64, 0, r.to_bits()));
            Ok(())
        }
        M::Addps | M::Subps | M::Mulps | M::Divps | M::Minps | M::Maxps | M::Sqrtps => {
            let d = xreg(core, insn, 0);
            let s = src(core, insn, 1, false)?;
            let r = map2(d, s, 32, |a, b| {
                let (a, b) = (f32::from_bits(a as u32), f32::from_bits(b as u32));
                let v = if mn == M::Sqrtps {
                    b.sqrt()
                } else {
                    fop(mn, a as f64, b as f64) as f32
                };
                v.to_bits() as u64
            });
            set_x(core, insn, 0, r);
            Ok(())
        }
        M::Addpd | M::Subpd | M::Mulpd | M::Divpd | M::Minpd | M::Maxpd | M::Sqrtpd => {
            let d = xreg(core, insn, 0);
            let s = src(core, insn, 1, false)?;
            let r = map2(d, s, 64, |a, b| {
                fop(mn, f64::from_bits(a), f64::from_bits(b)).to_bits()
            });
            set_x(core, insn, 0, r);
            Ok(())
        }
        // CMPccSS/SD/PS/PD: each lane becomes all ones where predicate
        // imm8[2:0] holds, zeros where it does not (NaNs are unordered).
        M::Cmpss | M::Cmpsd | M::Cmpps | M::Cmppd => {
            let d = xreg(core, insn, 0);
            let packed = matches!(mn, M::Cmpps | M::Cmppd);
            let s = src(core, insn, 1, !packed)?;
            let pred = insn.immediate(2) & 7;
            let test = |a: f64, b: f64| -> bool {
                match pred {
                    0 => a == b,
                    1 => a < b,
                    2 => a <= b,
                    3 => a.is_nan() || b.is_nan(),
                    4 => a != b,
                    // NLT, NLE: true when unordered too.
                    5 => a.partial_cmp(&b) != Some(std::cmp::Ordering::Less),
                    6 => !matches!(
                        a.partial_cmp(&b),
                        Some(std::cmp::Ordering::Less | std::cmp::Ordering::Equal)
                    ),
                    _ => !(a.is_nan() || b.is_nan()),
                }
            };
            let (bits, lanes) = match mn {
                M::Cmpss => (32, 1),
                M::Cmpsd => (64, 1),
                M::Cmpps => (32, 4),
                _ => (64, 2),
            };
            let mut r = d;
            for i in 0..lanes {
                let (a, b) = if bits == 32 {
                    (f32s(d, i) as f64, f32s(s, i) as f64)
                } else {
                    (f64s(d, i), f64s(s, i))
                };
                let ones = if bits == 32 {
                    u32::MAX as u64
                } else {
                    u64::MAX
                };
                r = with_lane(r, bits, i, if test(a, b) { ones } else { 0 });
            }
            set_x(core, insn, 0, r);
            Ok(())
        }
        M::Comiss | M::Ucomiss => {
            let a = f32s(xreg(core, insn, 0), 0) as f64;
            let b = f32s(src(core, insn, 1, true)?, 0) as f64;
            fcmp_flags(core, a, b);
            Ok(())
        }
        M::Comisd | M::Ucomisd => {
            let a = f64s(xreg(core, insn, 0), 0);
            let b = f64s(src(core, insn, 1, true)?, 0);
            fcmp_flags(core, a, b);
            Ok(())
        }
        M::Cvtsi2sd | M::Cvtsi2ss => {
            let size = super::operand::op_size(insn, 1);
            let v = sext(src(core, insn, 1, true)? as u64, size) as i64;
            let d = xreg(core, insn, 0);
            let r = if mn == M::Cvtsi2sd {
                with_lane(d, 64, 0, (v as f64).to_bits())
            } else {
                with_lane(d, 32, 0, (v as f32).to_bits() as u64)
            };
            set_x(core, insn, 0, r);
            Ok(())
        }
        M::Cvttsd2si | M::Cvtsd2si | M::Cvttss2si | M::Cvtss2si => {
            let s = src(core, insn, 1, true)?;
            let v = if matches!(mn, M::Cvttsd2si | M::Cvtsd2si) {
                f64s(s, 0)
            } else {
                f32s(s, 0) as f64
            };
            let v = round_mxcsr(core, v, matches!(mn, M::Cvttsd2si | M::Cvttss2si));
            let size = insn.op0_register().size() as u8;
            reg_write(&mut core.st, insn.op0_register(), f2i(v, size));
            Ok(())
        }
        M::Cvtsd2ss => {
            let d = xreg(core, insn, 0);
            let s = f64s(src(core, insn, 1, true)?, 0) as f32;
            set_x(core, insn, 0, with_lane(d, 32, 0, s.to_bits() as u64));
            Ok(())
        }
        M::Cvtss2sd => {
            let d = xreg(core, insn, 0);
            let s = f32s(src(core, insn, 1, true)?, 0) as f64;
            set_x(core, insn, 0, with_lane(d, 64, 0, s.to_bits()));
            Ok(())
        }
        M::Pshufw => {
            let s = src(core, insn, 1, true)?;
            let imm = insn.immediate(2) as u32;
            let r = (0..4).fold(0u128, |r, i| {
                r | (lane(s, 16, (imm >> (2 * i)) & 3) as u128) << (16 * i)
            });
            set_x(core, insn, 0, r);
            Ok(())
        }
        M::Maskmovq | M::Maskmovdqu => maskmov(core, insn, w),
        M::Cvtdq2pd
        | M::Cvtdq2ps
        | M::Cvtpd2dq
        | M::Cvtpd2ps
        | M::Cvtps2dq
        | M::Cvtps2pd
        | M::Cvttpd2dq
        | M::Cvttps2dq
        | M::Cvtpi2ps
        | M::Cvtps2pi
        | M::Cvttps2pi
        | M::Cvtpi2pd
        | M::Cvtpd2pi
        | M::Cvttpd2pi => convert(core, insn, mn),
        M::Rcpps | M::Rcpss | M::Rsqrtps | M::Rsqrtss => {
            let d = xreg(core, insn, 0);
            let packed = matches!(mn, M::Rcpps | M::Rsqrtps);
            let s = src(core, insn, 1, !packed)?;
            let f = |x: f32| -> u64 {
                // Denormal inputs count as zero, as on hardware.
                let x = if x.is_subnormal() {
                    0.0f32.copysign(x)
                } else {
                    x
                };
                let r = if matches!(mn, M::Rcpps | M::Rcpss) {
                    1.0 / x
                } else {
                    1.0 / x.sqrt()
                };
                approx(r).to_bits() as u64
            };
            let r = if packed {
                map2(s, 0, 32, |a, _| f(f32::from_bits(a as u32)))
            } else {
                with_lane(d, 32, 0, f(f32s(s, 0)))
            };
            set_x(core, insn, 0, r);
            Ok(())
        }
        // --------------------------------------------- shifts by immediate
        M::Psllw | M::Pslld | M::Psllq | M::Psrlw | M::Psrld | M::Psrlq | M::Psraw | M::Psrad
            if insn.op1_kind() != OpKind::Register && insn.op1_kind() != OpKind::Memory =>
        {
            let d = xreg(core, insn, 0);
            let c = insn.immediate(1);
            set_x(core, insn, 0, shift(mn, d, c));
            Ok(())
        }
        M::Psllw | M::Pslld | M::Psllq | M::Psrlw | M::Psrld | M::Psrlq | M::Psraw | M::Psrad => {
            let d = xreg(core, insn, 0);
            let c = src(core, insn, 1, false)? as u64;
            set_x(core, insn, 0, shift(mn, d, c));
            Ok(())
        }
        M::Pslldq | M::Psrldq => {
            let d = xreg(core, insn, 0);
            let c = insn.immediate(1).min(16) as u32 * 8;
            let r = if c >= 128 {
                0
            } else if mn == M::Pslldq {
                d << c
            } else {
                d >> c
            };
            set_x(core, insn, 0, r);
            Ok(())
        }
        // ---------------------------------------------- shuffles, unpacks
        M::Pshufd | M::Pshuflw | M::Pshufhw => {
            let s = src(core, insn, 1, false)?;
            let imm = insn.immediate(2) as u32;
            let r = match mn {
                M::Pshufd => (0..4).fold(0u128, |r, i| {
                    r | (lane(s, 32, (imm >> (2 * i)) & 3) as u128) << (32 * i)
                }),
                M::Pshuflw => {
                    let lo = (0..4).fold(0u128, |r, i| {
                        r | (lane(s, 16, (imm >> (2 * i)) & 3) as u128) << (16 * i)
                    });
                    lo | (s & !(u64::MAX as u128))
                }
                _ => {
                    let hi = (0..4).fold(0u128, |r, i| {
                        r | (lane(s, 16, 4 + ((imm >> (2 * i)) & 3)) as u128) << (16 * i)
                    });
                    (s & u64::MAX as u128) | (hi << 64)
                }
            };
            set_x(core, insn, 0, r);
            Ok(())
        }
        M::Shufps => {
            let d = xreg(core, insn, 0);
            let s = src(core, insn, 1, false)?;
            let imm = insn.immediate(2) as u32;
            let r = lane(d, 32, imm & 3) as u128
                | (lane(d, 32, (imm >> 2) & 3) as u128) << 32
                | (lane(s, 32, (imm >> 4) & 3) as u128) << 64
                | (lane(s, 32, (imm >> 6) & 3) as u128) << 96;
            set_x(core, insn, 0, r);
            Ok(())
        }
        M::Shufpd => {
            let d = xreg(core, insn, 0);
            let s = src(core, insn, 1, false)?;
            let imm = insn.immediate(2) as u32;
            let r = lane(d, 64, imm & 1) as u128 | (lane(s, 64, (imm >> 1) & 1) as u128) << 64;
            set_x(core, insn, 0, r);
            Ok(())
        }
        M::Punpcklbw
        | M::Punpcklwd
        | M::Punpckldq
        | M::Punpcklqdq
        | M::Unpcklps
        | M::Unpcklpd
        | M::Punpckhbw
        | M::Punpckhwd
        | M::Punpckhdq
        | M::Punpckhqdq
        | M::Unpckhps
        | M::Unpckhpd => {
            let d = xreg(core, insn, 0);
            let s = src(core, insn, 1, false)?;
            let (bits, high) = match mn {
                M::Punpcklbw => (8, false),
                M::Punpcklwd => (16, false),
                M::Punpckldq | M::Unpcklps => (32, false),
                M::Punpcklqdq | M::Unpcklpd => (64, false),
                M::Punpckhbw => (8, true),
                M::Punpckhwd => (16, true),
                M::Punpckhdq | M::Unpckhps => (32, true),
                _ => (64, true),
            };
            set_x(core, insn, 0, unpack(d, s, bits, high, w));
            Ok(())
        }
        M::Packsswb | M::Packssdw | M::Packuswb => {
            let d = xreg(core, insn, 0);
            let s = src(core, insn, 1, false)?;
            let (from, to) = if mn == M::Packssdw { (32, 16) } else { (16, 8) };
            let n = w / from;
            let mut r = 0u128;
            for (k, v) in [d, s].iter().enumerate() {
                for i in 0..n {
                    let x = sx(lane(*v, from, i), from);
                    let y = if mn == M::Packuswb {
                        sat_u(x, to)
                    } else {
                        sat_s(x, to)
                    };
                    r = with_lane(r, to, k as u32 * n + i, y);
                }
            }
            set_x(core, insn, 0, r);
            Ok(())
        }
        // ----------------------------------------- logic and integer math
        _ => {
            let d = xreg(core, insn, 0);
            let s = src(core, insn, 1, false)?;
            let r = match mn {
                M::Pxor | M::Xorps | M::Xorpd => d ^ s,
                M::Por | M::Orps | M::Orpd => d | s,
                M::Pand | M::Andps | M::Andpd => d & s,
                M::Pandn | M::Andnps | M::Andnpd => !d & s,
                M::Paddb => map2(d, s, 8, |a, b| a.wrapping_add(b)),
                M::Paddw => map2(d, s, 16, |a, b| a.wrapping_add(b)),
                M::Paddd => map2(d, s, 32, |a, b| a.wrapping_add(b)),
                M::Paddq => map2(d, s, 64, |a, b| a.wrapping_add(b)),
                M::Psubb => map2(d, s, 8, |a, b| a.wrapping_sub(b)),
                M::Psubw => map2(d, s, 16, |a, b| a.wrapping_sub(b)),
                M::Psubd => map2(d, s, 32, |a, b| a.wrapping_sub(b)),
                M::Psubq => map2(d, s, 64, |a, b| a.wrapping_sub(b)),
                M::Paddusb => map2(d, s, 8, |a, b| sat_u(a as i64 + b as i64, 8)),
                M::Paddusw => map2(d, s, 16, |a, b| sat_u(a as i64 + b as i64, 16)),
                M::Psubusb => map2(d, s, 8, |a, b| sat_u(a as i64 - b as i64, 8)),
                M::Psubusw => map2(d, s, 16, |a, b| sat_u(a as i64 - b as i64, 16)),
                M::Paddsb => map2(d, s, 8, |a, b| sat_s(sx(a, 8) + sx(b, 8), 8)),
                M::Paddsw => map2(d, s, 16, |a, b| sat_s(sx(a, 16) + sx(b, 16), 16)),
                M::Psubsb => map2(d, s, 8, |a, b| sat_s(sx(a, 8) - sx(b, 8), 8)),
                M::Psubsw => map2(d, s, 16, |a, b| sat_s(sx(a, 16) - sx(b, 16), 16)),
                M::Pcmpeqb => map2(d, s, 8, |a, b| if a == b { u64::MAX } else { 0 }),
                M::Pcmpeqw => map2(d, s, 16, |a, b| if a == b { u64::MAX } else { 0 }),
                M::Pcmpeqd => map2(d, s, 32, |a, b| if a == b { u64::MAX } else { 0 }),
                M::Pcmpgtb => map2(
                    d,
                    s,
                    8,
                    |a, b| if sx(a, 8) > sx(b, 8) { u64::MAX } else { 0 },
                ),
                M::Pcmpgtw => map2(
                    d,
                    s,
                    16,
                    |a, b| if sx(a, 16) > sx(b, 16) { u64::MAX } else { 0 },
                ),
                M::Pcmpgtd => map2(
                    d,
                    s,
                    32,
                    |a, b| if sx(a, 32) > sx(b, 32) { u64::MAX } else { 0 },
                ),
                M::Pminub => map2(d, s, 8, |a, b| a.min(b)),
                M::Pmaxub => map2(d, s, 8, |a, b| a.max(b)),
                M::Pminsw => map2(d, s, 16, |a, b| if sx(a, 16) < sx(b, 16) { a } else { b }),
                M::Pmaxsw => map2(d, s, 16, |a, b| if sx(a, 16) > sx(b, 16) { a } else { b }),
                M::Pavgb => map2(d, s, 8, |a, b| (a + b + 1) >> 1),
                M::Pavgw => map2(d, s, 16, |a, b| (a + b + 1) >> 1),
                M::Pmullw => map2(d, s, 16, |a, b| (sx(a, 16) * sx(b, 16)) as u64),
                M::Pmulhw => map2(d, s, 16, |a, b| ((sx(a, 16) * sx(b, 16)) >> 16) as u64),
                M::Pmulhuw => map2(d, s, 16, |a, b| (a * b) >> 16),
                M::Pmuludq => map2(d, s, 64, |a, b| (a & 0xffff_ffff) * (b & 0xffff_ffff)),
                M::Pmaddwd => map2(d, s, 32, |a, b| {
                    let lo = sx(a & 0xffff, 16) * sx(b & 0xffff, 16);
                    let hi = sx(a >> 16, 16) * sx(b >> 16, 16);
                    lo.wrapping_add(hi) as u64
                }),
                M::Psadbw => map2(d, s, 64, |a, b| {
                    (0..8)
                        .map(|i| ((a >> (8 * i)) as u8).abs_diff((b >> (8 * i)) as u8) as u64)
                        .sum()
                }),
                _ => return Err(super::not_executed(core, insn)),
            };
            set_x(core, insn, 0, r);
            Ok(())
        }
    }
}

fn shift(mn: M, d: u128, c: u64) -> u128 {
    let (bits, kind) = match mn {
        M::Psllw => (16, 0),
        M::Pslld => (32, 0),
        M::Psllq => (64, 0),
        M::Psrlw => (16, 1),
        M::Psrld => (32, 1),
        M::Psrlq => (64, 1),
        M::Psraw => (16, 2),
        _ => (32, 2),
    };
    map2(d, 0, bits, |a, _| {
        if kind == 2 {
            let c = c.min(bits as u64 - 1);
            (sx(a, bits) >> c) as u64
        } else if c >= bits as u64 {
            0
        } else if kind == 0 {
            a << c
        } else {
            a >> c
        }
    })
}

/// RCP/RSQRT results: the hardware approximates (relative error at most
/// 1.5 * 2^-12, the exact bits differ between vendors); the engine returns
/// the correctly rounded value, which is within that bound, and flushes
/// denormal results to zero as the hardware does.
fn approx(r: f32) -> f32 {
    if r.is_subnormal() {
        0.0f32.copysign(r)
    } else {
        r
    }
}

/// MASKMOVQ/MASKMOVDQU: store the bytes of operand 1 whose mask byte in
/// operand 2 has its top bit set, at DS:rDI (segment override allowed).
fn maskmov(core: &mut Core, insn: &Instruction, w: u32) -> R {
    let asz = match insn.op0_kind() {
        OpKind::MemorySegDI => 2,
        OpKind::MemorySegEDI => 4,
        _ => 8,
    };
    let data = xreg(core, insn, 1);
    let m = xreg(core, insn, 2);
    let seg = mem_seg(insn);
    let base = core.st.gpr[7] & mask(asz);
    for i in 0..w / 8 {
        if lane(m, 8, i) & 0x80 != 0 {
            let off = base.wrapping_add(i as u64) & mask(asz);
            core.write_mem(seg, off, 1, lane(data, 8, i))?;
        }
    }
    Ok(())
}

/// The packed conversions between integers (i32 lanes, in XMM or MM
/// registers) and floats. Float-to-integer rounds as MXCSR.RC says (the
/// CVTT forms truncate) and gives the integer indefinite on overflow.
fn convert(core: &mut Core, insn: &Instruction, mn: M) -> R {
    // 128-bit memory operands must be aligned; 64-bit ones need not be.
    let s = src(core, insn, 1, false)?;
    let d = xreg(core, insn, 0);
    let trunc = matches!(
        mn,
        M::Cvttpd2dq | M::Cvttps2dq | M::Cvttps2pi | M::Cvttpd2pi
    );
    let to_i = |core: &Core, v: f64| f2i(round_mxcsr(core, v, trunc), 4);
    let i32s = |v: u128, i: u32| lane(v, 32, i) as u32 as i32;
    let r = match mn {
        M::Cvtdq2ps => map2(s, 0, 32, |a, _| (a as u32 as i32 as f32).to_bits() as u64),
        M::Cvtdq2pd | M::Cvtpi2pd => (0..2).fold(0u128, |r, i| {
            with_lane(r, 64, i, (i32s(s, i) as f64).to_bits())
        }),
        M::Cvtpi2ps => (0..2).fold(d, |r, i| {
            with_lane(r, 32, i, (i32s(s, i) as f32).to_bits() as u64)
        }),
        M::Cvtps2dq | M::Cvttps2dq => (0..4).fold(0u128, |r, i| {
            with_lane(r, 32, i, to_i(core, f32s(s, i) as f64))
        }),
        M::Cvtps2pi | M::Cvttps2pi => (0..2).fold(0u128, |r, i| {
            with_lane(r, 32, i, to_i(core, f32s(s, i) as f64))
        }),
        M::Cvtpd2dq | M::Cvttpd2dq | M::Cvtpd2pi | M::Cvttpd2pi => {
            (0..2).fold(0u128, |r, i| with_lane(r, 32, i, to_i(core, f64s(s, i))))
        }
        M::Cvtpd2ps => (0..2).fold(0u128, |r, i| {
            with_lane(r, 32, i, (f64s(s, i) as f32).to_bits() as u64)
        }),
        // CVTPS2PD
        _ => (0..2).fold(0u128, |r, i| {
            with_lane(r, 64, i, (f32s(s, i) as f64).to_bits())
        }),
    };
    set_x(core, insn, 0, r);
    Ok(())
}
