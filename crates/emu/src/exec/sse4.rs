//! SSE3, SSSE3, SSE4.1 and SSE4.2 (legacy encodings), and CRC32.
//!
//! Each instruction here first checks that CPUID advertises every feature
//! it needs (#UD otherwise, as on a CPU without it: `--cpu-model portable`
//! and a VM restored from KVM can hide them). The SSSE3 forms exist for MM
//! and XMM registers; [`super::sse`] reads both zero-extended to 128 bits
//! and passes the width. 128-bit memory operands must be 16-byte aligned
//! except where the architecture says otherwise (the SSE4.2 string
//! instructions, the narrow loads of PMOVSX/PMOVZX, MOVDDUP).

use iced_x86::{Instruction, Mnemonic as M};

use super::mxcsr::{self, Fp, Op};
use super::operand::reg_write;
use super::sse::{
    dst, f32s, f64s, lane, map2, sat_s, sat_u, set_x, src, sx, width, with_lane, xreg,
};
use crate::core::{Core, R};
use crate::cpu::*;

/// The instructions of this module; `None` for any other mnemonic.
pub(super) fn execute(core: &mut Core, insn: &Instruction, mn: M) -> Option<R> {
    if !handled(mn) {
        return None;
    }
    // Every extension here is advertised unless the configuration hides
    // a bit: only then is the (slower) feature lookup needed.
    if core.cpuid.hidden != crate::cpuid::Hidden::default()
        && insn
            .cpuid_features()
            .iter()
            .any(|f| !crate::cpuid::has_feature(&core.cpuid, *f))
    {
        return Some(Err(crate::core::ud()));
    }
    Some(run(core, insn, mn))
}

fn handled(mn: M) -> bool {
    matches!(
        mn,
        M::Addsubps
            | M::Addsubpd
            | M::Haddps
            | M::Haddpd
            | M::Hsubps
            | M::Hsubpd
            | M::Movddup
            | M::Movshdup
            | M::Movsldup
            | M::Pshufb
            | M::Phaddw
            | M::Phaddd
            | M::Phaddsw
            | M::Phsubw
            | M::Phsubd
            | M::Phsubsw
            | M::Pmaddubsw
            | M::Pmulhrsw
            | M::Psignb
            | M::Psignw
            | M::Psignd
            | M::Pabsb
            | M::Pabsw
            | M::Pabsd
            | M::Palignr
            | M::Blendps
            | M::Blendpd
            | M::Pblendw
            | M::Blendvps
            | M::Blendvpd
            | M::Pblendvb
            | M::Pminsb
            | M::Pmaxsb
            | M::Pminuw
            | M::Pmaxuw
            | M::Pminsd
            | M::Pmaxsd
            | M::Pminud
            | M::Pmaxud
            | M::Pmovsxbw
            | M::Pmovsxbd
            | M::Pmovsxbq
            | M::Pmovsxwd
            | M::Pmovsxwq
            | M::Pmovsxdq
            | M::Pmovzxbw
            | M::Pmovzxbd
            | M::Pmovzxbq
            | M::Pmovzxwd
            | M::Pmovzxwq
            | M::Pmovzxdq
            | M::Ptest
            | M::Pextrb
            | M::Pextrd
            | M::Pextrq
            | M::Pinsrb
            | M::Pinsrd
            | M::Pinsrq
            | M::Extractps
            | M::Insertps
            | M::Roundps
            | M::Roundpd
            | M::Roundss
            | M::Roundsd
            | M::Dpps
            | M::Dppd
            | M::Mpsadbw
            | M::Packusdw
            | M::Pcmpeqq
            | M::Pmulld
            | M::Pmuldq
            | M::Phminposuw
            | M::Movntdqa
            | M::Pcmpgtq
            | M::Pcmpestri
            | M::Pcmpestri64
            | M::Pcmpestrm
            | M::Pcmpestrm64
            | M::Pcmpistri
            | M::Pcmpistrm
    )
}

fn ones(c: bool) -> u64 {
    if c {
        u64::MAX
    } else {
        0
    }
}

fn run(core: &mut Core, insn: &Instruction, mn: M) -> R {
    let w = width(insn);
    match mn {
        // ------------------------------------------------------------ SSE3
        M::Addsubps | M::Haddps | M::Hsubps => {
            let d = xreg(core, insn, 0);
            let s = src(core, insn, 1, false)?;
            let mut fp = Fp::new(core);
            let r = (0..4u32).fold(0u128, |r, i| {
                let v = match mn {
                    M::Addsubps if i & 1 == 0 => fp.op(Op::Sub, f32s(d, i), f32s(s, i)),
                    M::Addsubps => fp.op(Op::Add, f32s(d, i), f32s(s, i)),
                    _ => {
                        let v = if i < 2 { d } else { s };
                        let (a, b) = (f32s(v, (i & 1) * 2), f32s(v, (i & 1) * 2 + 1));
                        let op = if mn == M::Haddps { Op::Add } else { Op::Sub };
                        fp.op(op, a, b)
                    }
                };
                with_lane(r, 32, i, v.to_bits() as u64)
            });
            fp.finish(core)?;
            set_x(core, insn, 0, r);
        }
        M::Addsubpd | M::Haddpd | M::Hsubpd => {
            let d = xreg(core, insn, 0);
            let s = src(core, insn, 1, false)?;
            let mut fp = Fp::new(core);
            let r = (0..2u32).fold(0u128, |r, i| {
                let v = match mn {
                    M::Addsubpd if i == 0 => fp.op(Op::Sub, f64s(d, 0), f64s(s, 0)),
                    M::Addsubpd => fp.op(Op::Add, f64s(d, 1), f64s(s, 1)),
                    _ => {
                        let v = if i == 0 { d } else { s };
                        let op = if mn == M::Haddpd { Op::Add } else { Op::Sub };
                        fp.op(op, f64s(v, 0), f64s(v, 1))
                    }
                };
                with_lane(r, 64, i, v.to_bits())
            });
            fp.finish(core)?;
            set_x(core, insn, 0, r);
        }
        M::Movddup => {
            let s = src(core, insn, 1, true)? as u64 as u128;
            set_x(core, insn, 0, s | s << 64);
        }
        M::Movshdup | M::Movsldup => {
            let s = src(core, insn, 1, false)?;
            let k = (mn == M::Movshdup) as u32;
            let r = (0..4u32).fold(0u128, |r, i| with_lane(r, 32, i, lane(s, 32, (i & !1) | k)));
            set_x(core, insn, 0, r);
        }
        // ----------------------------------------------------------- SSSE3
        M::Pshufb => {
            let d = xreg(core, insn, 0);
            let s = src(core, insn, 1, false)?;
            let n = w / 8;
            let r = (0..n).fold(0u128, |r, i| {
                let c = lane(s, 8, i);
                let v = if c & 0x80 != 0 {
                    0
                } else {
                    lane(d, 8, (c as u32) & (n - 1))
                };
                with_lane(r, 8, i, v)
            });
            set_x(core, insn, 0, r);
        }
        M::Phaddw | M::Phaddd | M::Phaddsw | M::Phsubw | M::Phsubd | M::Phsubsw => {
            let d = xreg(core, insn, 0);
            let s = src(core, insn, 1, false)?;
            let bits = if matches!(mn, M::Phaddd | M::Phsubd) {
                32
            } else {
                16
            };
            let half = w / bits / 2;
            let r = (0..2 * half).fold(0u128, |r, i| {
                let (v, k) = if i < half { (d, i) } else { (s, i - half) };
                let (a, b) = (
                    sx(lane(v, bits, 2 * k), bits),
                    sx(lane(v, bits, 2 * k + 1), bits),
                );
                let x = match mn {
                    M::Phaddw | M::Phaddd => a.wrapping_add(b) as u64,
                    M::Phsubw | M::Phsubd => a.wrapping_sub(b) as u64,
                    M::Phaddsw => sat_s(a + b, 16),
                    _ => sat_s(a - b, 16),
                };
                with_lane(r, bits, i, x)
            });
            set_x(core, insn, 0, r);
        }
        M::Pmaddubsw
        | M::Pmulhrsw
        | M::Psignb
        | M::Psignw
        | M::Psignd
        | M::Pabsb
        | M::Pabsw
        | M::Pabsd => {
            let d = xreg(core, insn, 0);
            let s = src(core, insn, 1, false)?;
            let r = match mn {
                M::Pmaddubsw => map2(d, s, 16, |a, b| {
                    let lo = (a & 0xff) as i64 * sx(b & 0xff, 8);
                    let hi = (a >> 8) as i64 * sx(b >> 8, 8);
                    sat_s(lo + hi, 16)
                }),
                M::Pmulhrsw => map2(d, s, 16, |a, b| {
                    ((((sx(a, 16) * sx(b, 16)) >> 14) + 1) >> 1) as u64
                }),
                M::Psignb | M::Psignw | M::Psignd => {
                    let bits = match mn {
                        M::Psignb => 8,
                        M::Psignw => 16,
                        _ => 32,
                    };
                    map2(d, s, bits, |a, b| match sx(b, bits) {
                        0 => 0,
                        x if x < 0 => (sx(a, bits)).wrapping_neg() as u64,
                        _ => a,
                    })
                }
                _ => {
                    let bits = match mn {
                        M::Pabsb => 8,
                        M::Pabsw => 16,
                        _ => 32,
                    };
                    map2(s, 0, bits, |a, _| sx(a, bits).unsigned_abs())
                }
            };
            set_x(core, insn, 0, r);
        }
        M::Palignr => {
            let d = xreg(core, insn, 0);
            let s = src(core, insn, 1, false)?;
            let sh = insn.immediate(2) as u32 * 8;
            // The concatenation d:s (d in the high half) shifted right.
            let r = if w == 64 {
                let cat = (d << 64) | s;
                if sh >= 128 {
                    0
                } else {
                    (cat >> sh) as u64 as u128
                }
            } else if sh >= 256 {
                0
            } else if sh >= 128 {
                d >> (sh - 128)
            } else if sh == 0 {
                s
            } else {
                (s >> sh) | (d << (128 - sh))
            };
            set_x(core, insn, 0, r);
        }
        // ---------------------------------------------------------- SSE4.1
        M::Blendps | M::Blendpd | M::Pblendw | M::Blendvps | M::Blendvpd | M::Pblendvb => {
            let d = xreg(core, insn, 0);
            let s = src(core, insn, 1, false)?;
            let bits = match mn {
                M::Blendps | M::Blendvps => 32,
                M::Blendpd | M::Blendvpd => 64,
                M::Pblendw => 16,
                _ => 8,
            };
            let variable = matches!(mn, M::Blendvps | M::Blendvpd | M::Pblendvb);
            let imm = if variable {
                0
            } else {
                insn.immediate(2) as u32
            };
            let x0 = core.st.xmm[0];
            let r = (0..128 / bits).fold(0u128, |r, i| {
                let pick = match mn {
                    M::Blendps | M::Blendpd | M::Pblendw => imm >> i & 1 != 0,
                    // The variable blends read the top bit of each lane of
                    // the implicit XMM0.
                    _ => lane(x0, bits, i) >> (bits - 1) != 0,
                };
                with_lane(r, bits, i, lane(if pick { s } else { d }, bits, i))
            });
            set_x(core, insn, 0, r);
        }
        M::Pminsb
        | M::Pmaxsb
        | M::Pminuw
        | M::Pmaxuw
        | M::Pminsd
        | M::Pmaxsd
        | M::Pminud
        | M::Pmaxud
        | M::Packusdw
        | M::Pcmpeqq
        | M::Pcmpgtq
        | M::Pmulld
        | M::Pmuldq => {
            let d = xreg(core, insn, 0);
            let s = src(core, insn, 1, false)?;
            let r = match mn {
                M::Pminsb => map2(d, s, 8, |a, b| if sx(a, 8) < sx(b, 8) { a } else { b }),
                M::Pmaxsb => map2(d, s, 8, |a, b| if sx(a, 8) > sx(b, 8) { a } else { b }),
                M::Pminuw => map2(d, s, 16, |a, b| a.min(b)),
                M::Pmaxuw => map2(d, s, 16, |a, b| a.max(b)),
                M::Pminsd => map2(d, s, 32, |a, b| if sx(a, 32) < sx(b, 32) { a } else { b }),
                M::Pmaxsd => map2(d, s, 32, |a, b| if sx(a, 32) > sx(b, 32) { a } else { b }),
                M::Pminud => map2(d, s, 32, |a, b| a.min(b)),
                M::Pmaxud => map2(d, s, 32, |a, b| a.max(b)),
                M::Pcmpeqq => map2(d, s, 64, |a, b| ones(a == b)),
                M::Pcmpgtq => map2(d, s, 64, |a, b| ones((a as i64) > (b as i64))),
                M::Pmulld => map2(d, s, 32, |a, b| a.wrapping_mul(b)),
                M::Pmuldq => map2(d, s, 64, |a, b| (sx(a, 32) * sx(b, 32)) as u64),
                // PACKUSDW
                _ => [d, s].iter().enumerate().fold(0u128, |r, (k, v)| {
                    (0..4).fold(r, |r, i| {
                        with_lane(r, 16, k as u32 * 4 + i, sat_u(sx(lane(*v, 32, i), 32), 16))
                    })
                }),
            };
            set_x(core, insn, 0, r);
        }
        M::Pmovsxbw
        | M::Pmovsxbd
        | M::Pmovsxbq
        | M::Pmovsxwd
        | M::Pmovsxwq
        | M::Pmovsxdq
        | M::Pmovzxbw
        | M::Pmovzxbd
        | M::Pmovzxbq
        | M::Pmovzxwd
        | M::Pmovzxwq
        | M::Pmovzxdq => {
            let s = src(core, insn, 1, true)?;
            let (from, to) = match mn {
                M::Pmovsxbw | M::Pmovzxbw => (8, 16),
                M::Pmovsxbd | M::Pmovzxbd => (8, 32),
                M::Pmovsxbq | M::Pmovzxbq => (8, 64),
                M::Pmovsxwd | M::Pmovzxwd => (16, 32),
                M::Pmovsxwq | M::Pmovzxwq => (16, 64),
                _ => (32, 64),
            };
            let signed = matches!(
                mn,
                M::Pmovsxbw | M::Pmovsxbd | M::Pmovsxbq | M::Pmovsxwd | M::Pmovsxwq | M::Pmovsxdq
            );
            let r = (0..128 / to).fold(0u128, |r, i| {
                let v = lane(s, from, i);
                let v = if signed { sx(v, from) as u64 } else { v };
                with_lane(r, to, i, v)
            });
            set_x(core, insn, 0, r);
        }
        M::Ptest => {
            let d = xreg(core, insn, 0);
            let s = src(core, insn, 1, false)?;
            core.st.settle_flags();
            let f = &mut core.st.rflags;
            *f &= !(FLAG_ZF | FLAG_PF | FLAG_CF | FLAG_OF | FLAG_SF | FLAG_AF);
            if d & s == 0 {
                *f |= FLAG_ZF;
            }
            if !d & s == 0 {
                *f |= FLAG_CF;
            }
        }
        M::Pextrb | M::Pextrd | M::Pextrq | M::Extractps => {
            let v = xreg(core, insn, 1);
            let bits = match mn {
                M::Pextrb => 8,
                M::Pextrq => 64,
                _ => 32,
            };
            let i = (insn.immediate(2) as u32) & (128 / bits - 1);
            dst(core, insn, 0, lane(v, bits, i) as u128, true)?;
        }
        M::Pinsrb | M::Pinsrd | M::Pinsrq => {
            let d = xreg(core, insn, 0);
            let s = src(core, insn, 1, true)? as u64;
            let bits = match mn {
                M::Pinsrb => 8,
                M::Pinsrd => 32,
                _ => 64,
            };
            let i = (insn.immediate(2) as u32) & (128 / bits - 1);
            set_x(core, insn, 0, with_lane(d, bits, i, s));
        }
        M::Insertps => {
            let d = xreg(core, insn, 0);
            let imm = insn.immediate(2) as u32;
            let v = if super::sse::is_xmm(insn, 1) {
                lane(xreg(core, insn, 1), 32, imm >> 6)
            } else {
                src(core, insn, 1, true)? as u64
            };
            let r = with_lane(d, 32, (imm >> 4) & 3, v);
            let r = (0..4).fold(r, |r, i| {
                if imm >> i & 1 != 0 {
                    with_lane(r, 32, i, 0)
                } else {
                    r
                }
            });
            set_x(core, insn, 0, r);
        }
        M::Roundps | M::Roundpd | M::Roundss | M::Roundsd => {
            let d = xreg(core, insn, 0);
            let scalar = matches!(mn, M::Roundss | M::Roundsd);
            let s = src(core, insn, 1, scalar)?;
            let imm = insn.immediate(2) as u32;
            let mode = if imm & 4 != 0 {
                (core.st.mxcsr >> 13) & 3
            } else {
                imm & 3
            };
            // imm8[3] suppresses the precision exception.
            let quiet = imm & 8 != 0;
            let flags = std::cell::Cell::new(0u32);
            let r64 = |v: f64| -> f64 {
                if v.is_nan() {
                    if v.to_bits() & (1 << 51) == 0 {
                        flags.set(flags.get() | mxcsr::IE);
                    }
                    // A signalling NaN comes back quiet.
                    return f64::from_bits(v.to_bits() | 1 << 51);
                }
                let r = match mode {
                    0 => v.round_ties_even(),
                    1 => v.floor(),
                    2 => v.ceil(),
                    _ => v.trunc(),
                };
                if r != v && !quiet {
                    flags.set(flags.get() | mxcsr::PE);
                }
                r
            };
            // Rounding an f32 through f64 is exact (integral results).
            let r32 = |v: f32| -> f32 {
                if v.is_nan() {
                    if v.to_bits() & (1 << 22) == 0 {
                        flags.set(flags.get() | mxcsr::IE);
                    }
                    return f32::from_bits(v.to_bits() | 1 << 22);
                }
                r64(v as f64) as f32
            };
            let r = match mn {
                M::Roundps => map2(s, 0, 32, |a, _| {
                    r32(f32::from_bits(a as u32)).to_bits() as u64
                }),
                M::Roundpd => map2(s, 0, 64, |a, _| r64(f64::from_bits(a)).to_bits()),
                M::Roundss => with_lane(d, 32, 0, r32(f32s(s, 0)).to_bits() as u64),
                _ => with_lane(d, 64, 0, r64(f64s(s, 0)).to_bits()),
            };
            let mut fp = Fp::new(core);
            fp.flags = flags.get();
            fp.finish(core)?;
            set_x(core, insn, 0, r);
        }
        M::Dpps => {
            let d = xreg(core, insn, 0);
            let s = src(core, insn, 1, false)?;
            let imm = insn.immediate(2) as u32;
            let mut fp = Fp::new(core);
            let p: Vec<f32> = (0..4)
                .map(|i| {
                    if imm >> (4 + i) & 1 != 0 {
                        fp.op(Op::Mul, f32s(d, i), f32s(s, i))
                    } else {
                        0.0
                    }
                })
                .collect();
            let lo = fp.op(Op::Add, p[0], p[1]);
            let hi = fp.op(Op::Add, p[2], p[3]);
            let sum = fp.op(Op::Add, lo, hi);
            fp.finish(core)?;
            let r = (0..4).fold(0u128, |r, i| {
                let v = if imm >> i & 1 != 0 { sum.to_bits() } else { 0 };
                with_lane(r, 32, i, v as u64)
            });
            set_x(core, insn, 0, r);
        }
        M::Dppd => {
            let d = xreg(core, insn, 0);
            let s = src(core, insn, 1, false)?;
            let imm = insn.immediate(2) as u32;
            let mut fp = Fp::new(core);
            let mut p = |i: u32| {
                if imm >> (4 + i) & 1 != 0 {
                    fp.op(Op::Mul, f64s(d, i), f64s(s, i))
                } else {
                    0.0
                }
            };
            let (p0, p1) = (p(0), p(1));
            let sum = fp.op(Op::Add, p0, p1);
            fp.finish(core)?;
            let r = (0..2).fold(0u128, |r, i| {
                let v = if imm >> i & 1 != 0 { sum.to_bits() } else { 0 };
                with_lane(r, 64, i, v)
            });
            set_x(core, insn, 0, r);
        }
        M::Mpsadbw => {
            let d = xreg(core, insn, 0);
            let s = src(core, insn, 1, false)?;
            let imm = insn.immediate(2) as u32;
            let (bd, bs) = ((imm >> 2 & 1) * 4, (imm & 3) * 4);
            let r = (0..8).fold(0u128, |r, i| {
                let sum: u64 = (0..4)
                    .map(|j| {
                        (lane(d, 8, bd + i + j) as u8).abs_diff(lane(s, 8, bs + j) as u8) as u64
                    })
                    .sum();
                with_lane(r, 16, i, sum)
            });
            set_x(core, insn, 0, r);
        }
        M::Phminposuw => {
            let s = src(core, insn, 1, false)?;
            let (idx, min) = (0..8)
                .map(|i| (i, lane(s, 16, i)))
                .min_by_key(|&(i, v)| (v, i))
                .unwrap_or((0, 0));
            set_x(core, insn, 0, min as u128 | (idx as u128) << 16);
        }
        M::Movntdqa => {
            let v = src(core, insn, 1, false)?;
            set_x(core, insn, 0, v);
        }
        // ---------------------------------------------------------- SSE4.2
        _ => return pcmpstr(core, insn, mn),
    }
    Ok(())
}

/// PCMPESTRI/PCMPESTRM/PCMPISTRI/PCMPISTRM: the SSE4.2 string compares.
/// imm8[1:0] element format (unsigned bytes, unsigned words, signed bytes,
/// signed words), [3:2] aggregation (equal any, ranges, equal each, equal
/// ordered), [5:4] polarity, [6] output (index: lowest or highest set bit;
/// mask: bits or expanded elements). Operand 1 (a register) is the set or
/// needle, operand 2 (register or unaligned memory) the text.
fn pcmpstr(core: &mut Core, insn: &Instruction, mn: M) -> R {
    let a = xreg(core, insn, 0);
    let b = src(core, insn, 1, true)?;
    let imm = insn.immediate(2) as u32;
    let words = imm & 1 != 0;
    let signed = imm & 2 != 0;
    let (bits, n) = if words { (16u32, 8usize) } else { (8, 16) };
    let elem = |v: u128, i: usize| -> i64 {
        let x = lane(v, bits, i as u32);
        if signed {
            sx(x, bits)
        } else {
            x as i64
        }
    };
    let explicit = matches!(
        mn,
        M::Pcmpestri | M::Pcmpestri64 | M::Pcmpestrm | M::Pcmpestrm64
    );
    let len = |core: &Core, v: u128, reg: usize| -> usize {
        if explicit {
            let r = core.st.gpr[reg];
            let l = if matches!(mn, M::Pcmpestri64 | M::Pcmpestrm64) {
                (r as i64).unsigned_abs()
            } else {
                (r as u32 as i32).unsigned_abs() as u64
            };
            l.min(n as u64) as usize
        } else {
            (0..n).find(|&i| lane(v, bits, i as u32) == 0).unwrap_or(n)
        }
    };
    let (la, lb) = (len(core, a, 0), len(core, b, 2));
    let agg = (imm >> 2) & 3;
    // BoolRes[j][i]: element j of a against element i of b, with the
    // architecture's override for invalid (past the length) elements.
    let boolres = |j: usize, i: usize| -> bool {
        let (va, vb) = (j < la, i < lb);
        match (va, vb) {
            (true, true) => match agg {
                1 if j & 1 == 0 => elem(b, i) >= elem(a, j),
                1 => elem(b, i) <= elem(a, j),
                _ => elem(a, j) == elem(b, i),
            },
            (false, false) => agg >= 2,
            (false, true) => agg == 3,
            (true, false) => false,
        }
    };
    let mut res1 = 0u32;
    for i in 0..n {
        let bit = match agg {
            0 => (0..n).any(|j| boolres(j, i)),
            1 => (0..n / 2).any(|k| boolres(2 * k, i) && boolres(2 * k + 1, i)),
            2 => boolres(i, i),
            _ => (0..n - i).all(|k| boolres(k, i + k)),
        };
        res1 |= (bit as u32) << i;
    }
    let all = (1u32 << n) - 1;
    let res2 = match (imm >> 4) & 3 {
        1 => !res1 & all,
        3 => res1 ^ (((1u32 << lb) - 1) & all),
        _ => res1,
    };
    if matches!(mn, M::Pcmpestri | M::Pcmpestri64 | M::Pcmpistri) {
        let idx = if res2 == 0 {
            n as u32
        } else if imm & 0x40 != 0 {
            31 - res2.leading_zeros()
        } else {
            res2.trailing_zeros()
        };
        reg_write(&mut core.st, iced_x86::Register::ECX, idx as u64);
    } else {
        let m = if imm & 0x40 != 0 {
            (0..n as u32).fold(0u128, |r, i| {
                with_lane(r, bits, i, ones(res2 >> i & 1 != 0))
            })
        } else {
            res2 as u128
        };
        core.st.xmm[0] = m;
    }
    core.st.settle_flags();
    let f = &mut core.st.rflags;
    *f &= !(FLAG_ZF | FLAG_PF | FLAG_CF | FLAG_OF | FLAG_SF | FLAG_AF);
    if res2 != 0 {
        *f |= FLAG_CF;
    }
    if lb < n {
        *f |= FLAG_ZF;
    }
    if la < n {
        *f |= FLAG_SF;
    }
    if res2 & 1 != 0 {
        *f |= FLAG_OF;
    }
    Ok(())
}

/// CRC32 r32/r64, r/m8/16/32/64: CRC-32C of the source bytes, least
/// significant first, accumulated into the destination's low 32 bits (a
/// 64-bit destination's high half is cleared). A GPR instruction: no SSE
/// state checks. Linux's crc32c driver runs it for every ext4 metadata
/// checksum. The instruction accumulates without the checksum's pre- and
/// post-inversion, which `crc32c_append` applies: hence the two NOTs.
pub(super) fn crc32(core: &mut Core, insn: &Instruction) -> R {
    super::require(core, iced_x86::CpuidFeature::SSE4_2)?;
    let size = super::operand::op_size(insn, 1);
    let v = super::operand::read_op(core, insn, 1, size)?;
    let crc = super::operand::reg_read(&core.st, insn.op0_register()) as u32;
    let bytes = v.to_le_bytes();
    let crc = !crc32c::crc32c_append(!crc, &bytes[..(size as usize).min(8)]);
    reg_write(&mut core.st, insn.op0_register(), crc as u64);
    Ok(())
}
