//! x87 (a working subset), FXSAVE/FXRSTOR and MXCSR.
//!
//! Linux needs FNINIT, the control/status word instructions, FXSAVE and
//! FXRSTOR for context switches, and on AMD the `fnclex; emms; fild`
//! sequence before FXRSTOR. The x87 arithmetic here computes in f64 and
//! converts to and from the 80-bit register format: exact for loads, stores
//! and integer conversions, less precise than hardware for arithmetic.

use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};

use super::operand::{ea, mem_seg, reg_write};
use crate::core::{fault, gp, ud, Core, Exc, R};
use crate::cpu::*;

/// MXCSR bits the engine accepts (no DAZ).
pub const MXCSR_MASK: u32 = 0xffbf;

fn nm() -> Exc {
    fault(7, None)
}

/// #NM/#UD checks for x87 instructions.
fn x87_check(core: &Core) -> R {
    if core.st.cr0 & (CR0_EM | CR0_TS) != 0 {
        return Err(nm());
    }
    Ok(())
}

/// Checks for SSE and FXSAVE-family instructions.
pub fn sse_check(core: &Core) -> R {
    if core.st.cr0 & CR0_EM != 0 || core.st.cr4 & CR4_OSFXSR == 0 {
        return Err(ud());
    }
    if core.st.cr0 & CR0_TS != 0 {
        return Err(nm());
    }
    Ok(())
}

// ------------------------------------------------------- 80-bit conversion

pub fn f64_to_f80(v: f64) -> u128 {
    let b = v.to_bits();
    let sign = (b >> 63) as u128;
    let exp = ((b >> 52) & 0x7ff) as i32;
    let frac = b & ((1 << 52) - 1);
    let (e, m): (u128, u64) = if exp == 0 {
        if frac == 0 {
            (0, 0)
        } else {
            // Denormal double: normalise into the wider exponent range.
            let lz = frac.leading_zeros() as i32 - 11;
            let m = frac << (11 + lz);
            ((16383 - 1022 - lz) as u128, m)
        }
    } else if exp == 0x7ff {
        (0x7fff, (1 << 63) | (frac << 11))
    } else {
        ((exp - 1023 + 16383) as u128, (1 << 63) | (frac << 11))
    };
    (sign << 79) | (e << 64) | m as u128
}

pub fn f80_to_f64(v: u128) -> f64 {
    let sign = ((v >> 79) & 1) as u64;
    let e = ((v >> 64) & 0x7fff) as i32;
    let m = v as u64;
    if e == 0 && m == 0 {
        return f64::from_bits(sign << 63);
    }
    if e == 0x7fff {
        let frac = (m << 1) >> 12;
        let frac = if m << 1 != 0 && frac == 0 {
            1 << 51
        } else {
            frac
        };
        return f64::from_bits((sign << 63) | (0x7ff << 52) | frac);
    }
    // Scale in steps: a single power of two for a denormal result would
    // itself underflow to zero.
    let mut mag = m as f64;
    let mut k = e - 16383 - 63;
    while k < -1000 {
        mag *= 2f64.powi(-1000);
        k += 1000;
    }
    while k > 1000 {
        mag *= 2f64.powi(1000);
        k -= 1000;
    }
    let mag = mag * 2f64.powi(k);
    if sign != 0 {
        -mag
    } else {
        mag
    }
}

// ------------------------------------------------------------- the stack

fn st_index(r: Register) -> u8 {
    ((r as usize).wrapping_sub(Register::ST0 as usize) & 7) as u8
}

fn st_get(core: &Core, i: u8) -> u128 {
    let f = &core.st.fpu;
    f.st[((f.top + i) & 7) as usize]
}

fn st_set(core: &mut Core, i: u8, v: u128) {
    let f = &mut core.st.fpu;
    let p = ((f.top + i) & 7) as usize;
    f.st[p] = v;
    f.tag |= 1 << p;
}

fn push(core: &mut Core, v: u128) {
    let f = &mut core.st.fpu;
    f.top = (f.top + 7) & 7;
    let p = f.top as usize;
    f.st[p] = v;
    f.tag |= 1 << p;
}

fn pop(core: &mut Core) {
    let f = &mut core.st.fpu;
    f.tag &= !(1 << f.top);
    f.top = (f.top + 1) & 7;
}

fn mem_read(core: &mut Core, insn: &Instruction, size: u8) -> R<u128> {
    let s = mem_seg(insn);
    let off = ea(&core.st, insn);
    let lo = core.read_mem(s, off, size.min(8))? as u128;
    let hi = if size > 8 {
        core.read_mem(s, off.wrapping_add(8), size - 8)? as u128
    } else {
        0
    };
    Ok(lo | (hi << 64))
}

fn mem_write(core: &mut Core, insn: &Instruction, size: u8, v: u128) -> R {
    let s = mem_seg(insn);
    let off = ea(&core.st, insn);
    if size > 8 {
        core.write_mem(s, off.wrapping_add(8), size - 8, (v >> 64) as u64)?;
    }
    core.write_mem(s, off, size.min(8), v as u64)
}

/// Load operand 0/1 of a memory-form x87 instruction as f64.
fn load_mem_value(core: &mut Core, insn: &Instruction, integer: bool) -> R<f64> {
    let size = insn.memory_size().size() as u8;
    let raw = mem_read(core, insn, size)?;
    Ok(if integer {
        sext_f(raw as u64, size)
    } else {
        match size {
            4 => f32::from_bits(raw as u32) as f64,
            8 => f64::from_bits(raw as u64),
            _ => f80_to_f64(raw),
        }
    })
}

fn sext_f(v: u64, size: u8) -> f64 {
    sext(v, size) as i64 as f64
}

fn round_int(core: &Core, v: f64, truncate: bool) -> f64 {
    if truncate {
        return v.trunc();
    }
    match (core.st.fpu.fcw >> 10) & 3 {
        0 => {
            let r = v.round();
            // Round half to even.
            if (v - v.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
                r - v.signum()
            } else {
                r
            }
        }
        1 => v.floor(),
        2 => v.ceil(),
        _ => v.trunc(),
    }
}

fn set_compare_flags(core: &mut Core, a: f64, b: f64) {
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

/// x87 arithmetic: returns ST(0) op src for the plain forms.
fn arith(mn: M, a: f64, b: f64) -> f64 {
    match mn {
        M::Fadd | M::Faddp | M::Fiadd => a + b,
        M::Fsub | M::Fsubp | M::Fisub => a - b,
        M::Fsubr | M::Fsubrp | M::Fisubr => b - a,
        M::Fmul | M::Fmulp | M::Fimul => a * b,
        M::Fdiv | M::Fdivp | M::Fidiv => a / b,
        _ => b / a,
    }
}

pub fn execute(core: &mut Core, insn: &Instruction) -> R {
    let mn = insn.mnemonic();
    match mn {
        M::Wait => {
            if core.st.cr0 & CR0_TS != 0 && core.st.cr0 & CR0_MP != 0 {
                return Err(nm());
            }
            Ok(())
        }
        M::Fxsave | M::Fxsave64 => {
            fx_check(core)?;
            fxsave(core, insn, mn == M::Fxsave64)
        }
        M::Fxrstor | M::Fxrstor64 => {
            fx_check(core)?;
            fxrstor(core, insn, mn == M::Fxrstor64)
        }
        M::Ldmxcsr => {
            sse_check(core)?;
            let v = mem_read(core, insn, 4)? as u32;
            if v & !MXCSR_MASK != 0 {
                return Err(gp(0));
            }
            core.st.mxcsr = v;
            Ok(())
        }
        M::Stmxcsr => {
            sse_check(core)?;
            let v = core.st.mxcsr as u128;
            mem_write(core, insn, 4, v)
        }
        _ => x87(core, insn),
    }
}

fn fx_check(core: &Core) -> R {
    if core.st.cr0 & CR0_EM != 0 {
        return Err(ud());
    }
    if core.st.cr0 & CR0_TS != 0 {
        return Err(nm());
    }
    Ok(())
}

fn x87(core: &mut Core, insn: &Instruction) -> R {
    let mn = insn.mnemonic();
    x87_check(core)?;
    let is_mem =
        insn.op_count() > 0 && (0..insn.op_count()).any(|n| insn.op_kind(n) == OpKind::Memory);
    match mn {
        M::Fninit | M::Finit => {
            core.st.fpu = Fpu::default();
        }
        M::Fnclex | M::Fclex => core.st.fpu.fsw &= !0x80ff,
        M::Emms => core.st.fpu.tag = 0,
        M::Fnstsw | M::Fstsw => {
            let v = core.st.fpu.status();
            if insn.op0_kind() == OpKind::Register {
                reg_write(&mut core.st, Register::AX, v as u64);
            } else {
                mem_write(core, insn, 2, v as u128)?;
            }
        }
        M::Fnstcw | M::Fstcw => {
            let v = core.st.fpu.fcw as u128;
            mem_write(core, insn, 2, v)?;
        }
        M::Fldcw => {
            let v = mem_read(core, insn, 2)? as u16;
            core.st.fpu.fcw = v | 0x40;
        }
        M::Ffree | M::Ffreep => {
            let i = st_index(insn.op0_register());
            let p = (core.st.fpu.top + i) & 7;
            core.st.fpu.tag &= !(1 << p);
            if mn == M::Ffreep {
                pop(core);
            }
        }
        M::Fincstp => core.st.fpu.top = (core.st.fpu.top + 1) & 7,
        M::Fdecstp => core.st.fpu.top = (core.st.fpu.top + 7) & 7,
        M::Fld1 => push(core, f64_to_f80(1.0)),
        M::Fldz => push(core, f64_to_f80(0.0)),
        M::Fild => {
            let v = load_mem_value(core, insn, true)?;
            push(core, f64_to_f80(v));
        }
        M::Fld => {
            if is_mem {
                let size = insn.memory_size().size() as u8;
                let v = if size == 10 {
                    mem_read(core, insn, 10)? & ((1u128 << 80) - 1)
                } else {
                    f64_to_f80(load_mem_value(core, insn, false)?)
                };
                push(core, v);
            } else {
                let v = st_get(core, st_index(insn.op0_register()));
                push(core, v);
            }
        }
        M::Fst | M::Fstp => {
            let v = st_get(core, 0);
            if is_mem {
                let size = insn.memory_size().size() as u8;
                let raw = match size {
                    4 => (f80_to_f64(v) as f32).to_bits() as u128,
                    8 => f80_to_f64(v).to_bits() as u128,
                    _ => v,
                };
                mem_write(core, insn, size, raw)?;
            } else {
                st_set(core, st_index(insn.op0_register()), v);
            }
            if mn == M::Fstp {
                pop(core);
            }
        }
        M::Fist | M::Fistp | M::Fisttp => {
            if mn == M::Fisttp {
                super::require(core, iced_x86::CpuidFeature::SSE3)?;
            }
            let size = insn.memory_size().size() as u8;
            let v = round_int(core, f80_to_f64(st_get(core, 0)), mn == M::Fisttp);
            let bits = size as u32 * 8;
            let min = -(2f64.powi(bits as i32 - 1));
            // Out of range: the "integer indefinite" value (sign bit only).
            let iv = if v.is_nan() || v < min || v >= -min {
                1u64 << (bits - 1)
            } else {
                v as i64 as u64
            };
            mem_write(core, insn, size, iv as u128)?;
            if mn != M::Fist {
                pop(core);
            }
        }
        M::Fxch => {
            // FXCH ST(0), ST(i): the register operand is the last one.
            let i = st_index(insn.op_register(insn.op_count().saturating_sub(1)));
            let a = st_get(core, 0);
            let b = st_get(core, i);
            st_set(core, 0, b);
            st_set(core, i, a);
        }
        M::Fchs => {
            let v = st_get(core, 0) ^ (1u128 << 79);
            st_set(core, 0, v);
        }
        M::Fabs => {
            let v = st_get(core, 0) & !(1u128 << 79);
            st_set(core, 0, v);
        }
        M::Fadd
        | M::Fsub
        | M::Fsubr
        | M::Fmul
        | M::Fdiv
        | M::Fdivr
        | M::Fiadd
        | M::Fisub
        | M::Fisubr
        | M::Fimul
        | M::Fidiv
        | M::Fidivr
        | M::Faddp
        | M::Fsubp
        | M::Fsubrp
        | M::Fmulp
        | M::Fdivp
        | M::Fdivrp => {
            if is_mem {
                let integer = matches!(
                    mn,
                    M::Fiadd | M::Fisub | M::Fisubr | M::Fimul | M::Fidiv | M::Fidivr
                );
                let b = load_mem_value(core, insn, integer)?;
                let a = f80_to_f64(st_get(core, 0));
                st_set(core, 0, f64_to_f80(arith(mn, a, b)));
            } else {
                // Register forms: op0 is the destination, op1 the source.
                let d = st_index(insn.op0_register());
                let s = if insn.op_count() > 1 {
                    st_index(insn.op1_register())
                } else {
                    0
                };
                let a = f80_to_f64(st_get(core, d));
                let b = f80_to_f64(st_get(core, s));
                st_set(core, d, f64_to_f80(arith(mn, a, b)));
                if matches!(
                    mn,
                    M::Faddp | M::Fsubp | M::Fsubrp | M::Fmulp | M::Fdivp | M::Fdivrp
                ) {
                    pop(core);
                }
            }
        }
        M::Fcomi | M::Fcomip | M::Fucomi | M::Fucomip => {
            let a = f80_to_f64(st_get(core, 0));
            let b = f80_to_f64(st_get(core, st_index(insn.op1_register())));
            set_compare_flags(core, a, b);
            if matches!(mn, M::Fcomip | M::Fucomip) {
                pop(core);
            }
        }
        _ => return Err(super::not_executed(core, insn)),
    }
    Ok(())
}

fn fxsave(core: &mut Core, insn: &Instruction, wide: bool) -> R {
    let s = mem_seg(insn);
    let base = ea(&core.st, insn);
    if core.lin(s, base)? & 15 != 0 {
        return Err(gp(0));
    }
    let f = core.st.fpu;
    let mut img = [0u64; 64];
    img[0] = f.fcw as u64 | (f.status() as u64) << 16 | (f.tag as u64) << 32 | (f.fop as u64) << 48;
    if wide {
        img[1] = f.fip;
        img[2] = f.fdp;
    } else {
        img[1] = f.fip & 0xffff_ffff;
        img[2] = f.fdp & 0xffff_ffff;
    }
    img[3] = core.st.mxcsr as u64 | (MXCSR_MASK as u64) << 32;
    for i in 0..8 {
        let v = f.st[((f.top as usize) + i) & 7];
        img[4 + 2 * i] = v as u64;
        img[5 + 2 * i] = ((v >> 64) as u64) & 0xffff;
    }
    let nxmm = if core.st.mode64() { 16 } else { 8 };
    for i in 0..nxmm {
        img[20 + 2 * i] = core.st.xmm[i] as u64;
        img[21 + 2 * i] = (core.st.xmm[i] >> 64) as u64;
    }
    // Probe the last byte first so a fault leaves memory untouched.
    let last = core.read_mem(s, base.wrapping_add(504), 8)?;
    core.write_mem(s, base.wrapping_add(504), 8, last)?;
    for (i, v) in img.iter().enumerate().take(20 + 2 * nxmm) {
        core.write_mem(s, base.wrapping_add(i as u64 * 8), 8, *v)?;
    }
    Ok(())
}

fn fxrstor(core: &mut Core, insn: &Instruction, wide: bool) -> R {
    let s = mem_seg(insn);
    let base = ea(&core.st, insn);
    if core.lin(s, base)? & 15 != 0 {
        return Err(gp(0));
    }
    let mut img = [0u64; 52];
    for (i, v) in img.iter_mut().enumerate() {
        *v = core.read_mem(s, base.wrapping_add(i as u64 * 8), 8)?;
    }
    let mxcsr = img[3] as u32;
    if mxcsr & !MXCSR_MASK != 0 {
        return Err(gp(0));
    }
    let fsw = (img[0] >> 16) as u16;
    let mut f = Fpu {
        fcw: img[0] as u16,
        fsw: fsw & !0x3800,
        top: ((fsw >> 11) & 7) as u8,
        tag: (img[0] >> 32) as u8,
        st: [0; 8],
        fop: (img[0] >> 48) as u16 & 0x7ff,
        fip: if wide { img[1] } else { img[1] & 0xffff_ffff },
        fdp: if wide { img[2] } else { img[2] & 0xffff_ffff },
    };
    for i in 0..8 {
        let v = img[4 + 2 * i] as u128 | ((img[5 + 2 * i] & 0xffff) as u128) << 64;
        f.st[(f.top as usize + i) & 7] = v;
    }
    core.st.fpu = f;
    core.st.mxcsr = mxcsr;
    let nxmm = if core.st.mode64() { 16 } else { 8 };
    for i in 0..nxmm {
        core.st.xmm[i] = img[20 + 2 * i] as u128 | (img[21 + 2 * i] as u128) << 64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f80_round_trips_doubles() {
        for v in [
            0.0,
            -0.0,
            1.0,
            -2.5,
            1e300,
            1e-310,
            f64::INFINITY,
            f64::MIN_POSITIVE,
            12345.678,
        ] {
            assert_eq!(f80_to_f64(f64_to_f80(v)).to_bits(), v.to_bits(), "{v}");
        }
        // 1.0 is exponent 16383 with the explicit integer bit.
        assert_eq!(f64_to_f80(1.0), (16383u128 << 64) | (1u128 << 63));
        assert!(f80_to_f64(f64_to_f80(f64::NAN)).is_nan());
    }
}
