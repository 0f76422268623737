//! SSE floating point as MXCSR says: rounding control (RC), flush to zero
//! (FTZ) and the six exception flags, for the arithmetic the host's own
//! SSE unit computes in round-to-nearest.
//!
//! Each operation is computed in round-to-nearest (the host default) with
//! the sign of its rounding error, found exactly with error-free
//! transformations (two-sum for addition, a fused multiply-add for the
//! product, the division remainder and the square root remainder). The
//! error decides inexactness (PE) and moves the result one unit in the
//! last place where RC rounds down, up or toward zero. Single-precision
//! operations are computed exactly enough in double precision first (the
//! double rounding of +, -, *, / and sqrt through binary64 is innocuous).
//! An instruction collects its lanes' flags in an [`Fp`] and commits them
//! with [`Fp::finish`]: masked exceptions only set MXCSR flags; an
//! unmasked one leaves the destination unwritten and raises #XM (#UD when
//! CR4.OSXMMEXCPT is clear). Tininess is detected after rounding.

use crate::core::{fault, ud, Core, R};
use crate::cpu::*;

pub const IE: u32 = 1;
pub const DE: u32 = 2;
pub const ZE: u32 = 4;
pub const OE: u32 = 8;
pub const UE: u32 = 0x10;
pub const PE: u32 = 0x20;
const FTZ: u32 = 1 << 15;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Add,
    Sub,
    Mul,
    Div,
    Sqrt,
}

/// The flags of one instruction, and MXCSR's controls.
pub struct Fp {
    mxcsr: u32,
    pub flags: u32,
}

/// A binary float format: f32 or f64.
pub trait Float: Copy + PartialOrd + Into<f64> {
    const MAX: Self;
    const MIN_POSITIVE: Self;
    fn from_f64(v: f64) -> Self;
    fn next_up(self) -> Self;
    fn next_down(self) -> Self;
    fn is_nan(self) -> bool;
    fn is_infinite(self) -> bool;
    fn is_subnormal(self) -> bool;
    fn is_snan(self) -> bool;
    fn zero(neg: bool) -> Self;
    fn neg(self) -> Self;
}

impl Float for f64 {
    const MAX: f64 = f64::MAX;
    const MIN_POSITIVE: f64 = f64::MIN_POSITIVE;
    fn from_f64(v: f64) -> f64 {
        v
    }
    fn next_up(self) -> f64 {
        f64::next_up(self)
    }
    fn next_down(self) -> f64 {
        f64::next_down(self)
    }
    fn is_nan(self) -> bool {
        f64::is_nan(self)
    }
    fn is_infinite(self) -> bool {
        f64::is_infinite(self)
    }
    fn is_subnormal(self) -> bool {
        f64::is_subnormal(self)
    }
    fn is_snan(self) -> bool {
        self.is_nan() && self.to_bits() & (1 << 51) == 0
    }
    fn zero(neg: bool) -> f64 {
        if neg {
            -0.0
        } else {
            0.0
        }
    }
    fn neg(self) -> f64 {
        -self
    }
}

impl Float for f32 {
    const MAX: f32 = f32::MAX;
    const MIN_POSITIVE: f32 = f32::MIN_POSITIVE;
    fn from_f64(v: f64) -> f32 {
        v as f32
    }
    fn next_up(self) -> f32 {
        f32::next_up(self)
    }
    fn next_down(self) -> f32 {
        f32::next_down(self)
    }
    fn is_nan(self) -> bool {
        f32::is_nan(self)
    }
    fn is_infinite(self) -> bool {
        f32::is_infinite(self)
    }
    fn is_subnormal(self) -> bool {
        f32::is_subnormal(self)
    }
    fn is_snan(self) -> bool {
        self.is_nan() && self.to_bits() & (1 << 22) == 0
    }
    fn zero(neg: bool) -> f32 {
        if neg {
            -0.0
        } else {
            0.0
        }
    }
    fn neg(self) -> f32 {
        -self
    }
}

/// Results below this may have lost bits to the subnormal range.
const TINY: f64 = f64::from_bits((1023 - 969) << 52); // 2^-969
/// 2^600: scales tiny operands and results into the normal range exactly.
const UP: f64 = f64::from_bits((1023 + 600) << 52);

/// v * 2^(600 k), exactly for the tiny results it is used on.
fn up(v: f64, k: u32) -> f64 {
    (0..k).fold(v, |v, _| v * UP)
}

/// Round-to-nearest result of `op` in binary64 and the sign of the error
/// (exact - result): < 0, 0 or > 0. Meaningful for finite results.
fn nearest(op: Op, a: f64, b: f64) -> (f64, f64) {
    match op {
        Op::Add | Op::Sub => {
            let b = if op == Op::Sub { -b } else { b };
            let s = a + b;
            if !s.is_finite() {
                return (s, 0.0);
            }
            let bb = s - a;
            (s, (a - (s - bb)) + (b - bb))
        }
        Op::Mul => {
            let p = a * b;
            if !p.is_finite() {
                return (p, 0.0);
            }
            if p.abs() < TINY && a != 0.0 && b != 0.0 {
                // The error of a subnormal (or underflowed) product is
                // below what a fused multiply-add can show: redo it with
                // operands below 1 scaled up by 2^600 (exactly), which
                // lands the product in the normal range, and compare.
                let (mut xs, mut ys, mut k) = (a, b, 0);
                if xs.abs() < 1.0 {
                    xs *= UP;
                    k += 1;
                }
                if ys.abs() < 1.0 {
                    ys *= UP;
                    k += 1;
                }
                let ps = xs * ys;
                let d = ps - up(p, k);
                return (p, if d != 0.0 { d } else { xs.mul_add(ys, -ps) });
            }
            (p, a.mul_add(b, -p))
        }
        Op::Div => {
            let q = a / b;
            if !q.is_finite() || b == 0.0 || b.is_infinite() {
                return (q, 0.0);
            }
            let sign_of = |rem: f64| {
                if (rem < 0.0) == (b < 0.0) {
                    rem.abs()
                } else {
                    -rem.abs()
                }
            };
            if q.abs() < TINY && a != 0.0 {
                // As for the product: scale a up and b down by 2^600
                // (exactly) until the quotient is normal.
                let (mut xs, mut ys, mut k) = (a, b, 0);
                if xs.abs() < 1.0 {
                    xs *= UP;
                    k += 1;
                }
                if ys.abs() >= 1.0 {
                    ys /= UP;
                    k += 1;
                }
                let qs = xs / ys;
                let d = qs - up(q, k);
                let rem = (-qs).mul_add(ys, xs);
                let e = if (rem < 0.0) == (ys < 0.0) {
                    rem.abs()
                } else {
                    -rem.abs()
                };
                return (q, if d != 0.0 { d } else { e });
            }
            (q, sign_of((-q).mul_add(b, a)))
        }
        Op::Sqrt => {
            let r = b.sqrt();
            if !r.is_finite() || r == 0.0 {
                return (r, 0.0);
            }
            if b < TINY {
                // The remainder of a tiny operand's root underflows:
                // redo it 2^600 higher (the root 2^300 higher, exactly).
                let bs = b * UP;
                let rs = bs.sqrt();
                let d = rs - r * f64::from_bits((1023 + 300) << 52);
                return (r, if d != 0.0 { d } else { (-rs).mul_add(rs, bs) });
            }
            (r, (-r).mul_add(r, b))
        }
    }
}

impl Fp {
    pub fn new(core: &Core) -> Fp {
        Fp {
            mxcsr: core.st.mxcsr,
            flags: 0,
        }
    }

    /// MXCSR.RC: 0 nearest, 1 down, 2 up, 3 toward zero.
    pub fn rc(&self) -> u32 {
        (self.mxcsr >> 13) & 3
    }

    /// Denormal-operand and signalling-NaN checks of the inputs.
    fn inputs<T: Float>(&mut self, v: &[T]) {
        if v.iter().any(|x| x.is_snan()) {
            self.flags |= IE;
        } else if v.iter().any(|x| x.is_subnormal()) {
            self.flags |= DE;
        }
    }

    /// `op` on a and b (b alone for Sqrt) in format T, rounded as RC says.
    pub fn op<T: Float>(&mut self, op: Op, a: T, b: T) -> T {
        // Per lane the pre-computation exceptions exclude each other:
        // IE (SNaN, invalid operation), then a QNaN operand (no flag),
        // then ZE, then DE.
        let ins: &[T] = if op == Op::Sqrt { &[b] } else { &[a, b] };
        let (a64, b64): (f64, f64) = (a.into(), b.into());
        let (r64, e64) = nearest(op, a64, b64);
        if r64.is_nan() {
            let any_nan = ins.iter().any(|x| x.is_nan());
            if !any_nan || ins.iter().any(|x| x.is_snan()) {
                self.flags |= IE;
            }
            return T::from_f64(r64);
        }
        if op == Op::Div && b64 == 0.0 && a64 != 0.0 && a64.is_finite() {
            self.flags |= ZE;
            return T::from_f64(r64);
        }
        if ins.iter().any(|x| x.is_subnormal()) {
            self.flags |= DE;
        }
        if r64 == 0.0 && e64 == 0.0 && matches!(op, Op::Add | Op::Sub) && self.rc() == 1 {
            // An exact zero sum is -0 when rounding down, unless both
            // addends are +0.
            let b_eff = if op == Op::Sub { -b64 } else { b64 };
            let both_plus =
                a64 == 0.0 && b_eff == 0.0 && !a64.is_sign_negative() && !b_eff.is_sign_negative();
            return T::zero(!both_plus);
        }
        let n = T::from_f64(r64);
        let inputs_finite = ins.iter().all(|x| !x.is_infinite());
        if n.is_infinite() {
            if !inputs_finite || (op == Op::Div && b64 == 0.0) {
                return n;
            }
            // Overflow: infinity or the largest finite value, as RC says.
            self.flags |= OE | PE;
            let pos = n > T::zero(false);
            return match (self.rc(), pos) {
                (0, _) | (2, true) | (1, false) => n,
                (_, true) => T::MAX,
                (_, false) => T::MAX.neg(),
            };
        }
        // The error of n against the exact value: T's rounding of r64
        // dominates when there is one (it is at least an ulp of r64).
        let d = r64 - n.into();
        let err = if d != 0.0 { d } else { e64 };
        let mut r = n;
        if err != 0.0 {
            self.flags |= PE;
            let pos = n > T::zero(false) || (n == T::zero(false) && err > 0.0);
            r = match self.rc() {
                1 if err < 0.0 => n.next_down(),
                2 if err > 0.0 => n.next_up(),
                3 if pos && err < 0.0 => n.next_down(),
                3 if !pos && err > 0.0 => n.next_up(),
                _ => n,
            };
        }
        // Tiny: nonzero below the normal range after rounding (or an
        // inexact result rounded to zero). Masked, UE is set when the
        // result is also inexact; with FTZ the result becomes a zero of
        // the true result's sign and UE and PE are set.
        let mag: f64 = r.into();
        let tiny = (mag != 0.0 || err != 0.0) && mag.abs() < T::MIN_POSITIVE.into();
        if tiny {
            if self.mxcsr & FTZ != 0 {
                self.flags |= UE | PE;
                r = T::zero(mag.is_sign_negative());
            } else if err != 0.0 {
                self.flags |= UE;
            }
        }
        r
    }

    /// MIN/MAX: IE for any NaN operand, DE for denormal ones.
    pub fn minmax<T: Float>(&mut self, a: T, b: T) {
        if a.is_nan() || b.is_nan() {
            self.flags |= IE;
        } else if a.is_subnormal() || b.is_subnormal() {
            self.flags |= DE;
        }
    }

    /// Compare: IE for signalling NaNs, or any NaN when `signalling`.
    pub fn compare<T: Float>(&mut self, a: T, b: T, signalling: bool) {
        if a.is_snan() || b.is_snan() || (signalling && (a.is_nan() || b.is_nan())) {
            self.flags |= IE;
        } else if a.is_nan() || b.is_nan() {
            // A QNaN operand of a quiet compare: no flag, not even DE.
        } else if a.is_subnormal() || b.is_subnormal() {
            self.flags |= DE;
        }
    }

    /// Integer to float in format T (inexact for wide integers).
    pub fn from_int<T: Float>(&mut self, v: i64) -> T {
        let n = T::from_f64(v as f64);
        // v as f64 may itself round (|v| > 2^53): compare exactly.
        let nf: f64 = n.into();
        let exact = v as i128;
        let got = nf as i128;
        if exact == got {
            return n;
        }
        self.flags |= PE;
        let err = if exact > got { 1.0 } else { -1.0 };
        match self.rc() {
            1 if err < 0.0 => n.next_down(),
            2 if err > 0.0 => n.next_up(),
            3 if nf > 0.0 && err < 0.0 => n.next_down(),
            3 if nf < 0.0 && err > 0.0 => n.next_up(),
            _ => n,
        }
    }

    /// Float to a `size`-byte integer, rounded (`round` applied already):
    /// IE and the integer indefinite when out of range, PE when inexact.
    pub fn to_int(&mut self, v: f64, rounded: f64, size: u8) -> u64 {
        let r = super::sse::f2i(rounded, size);
        let lim = 2f64.powi(size as i32 * 8 - 1);
        if v.is_nan() || rounded >= lim || rounded < -lim {
            self.flags |= IE;
        } else if rounded != v {
            self.flags |= PE;
        }
        r
    }

    /// Float to float (CVTSD2SS and CVTPD2PS): as an exact operation
    /// followed by rounding to f32.
    pub fn narrow(&mut self, v: f64) -> f32 {
        if v.is_nan() {
            if f64::is_snan(v) {
                self.flags |= IE;
            }
            return v as f32;
        }
        self.inputs(&[v]);
        let n = v as f32;
        if v.is_infinite() {
            return n;
        }
        if n.is_infinite() && v.is_finite() {
            self.flags |= OE | PE;
            return match (self.rc(), v > 0.0) {
                (0, _) | (2, true) | (1, false) => n,
                (_, true) => f32::MAX,
                (_, false) => -f32::MAX,
            };
        }
        let err = v - n as f64;
        if err == 0.0 {
            return n;
        }
        self.flags |= PE;
        let mut r = match self.rc() {
            1 if err < 0.0 => n.next_down(),
            2 if err > 0.0 => n.next_up(),
            3 if v > 0.0 && err < 0.0 => n.next_down(),
            3 if v < 0.0 && err > 0.0 => n.next_up(),
            _ => n,
        };
        if r.abs() < f32::MIN_POSITIVE {
            self.flags |= UE;
            if self.mxcsr & FTZ != 0 {
                r = 0.0f32.copysign(v as f32);
            }
        }
        r
    }

    /// Widening (CVTSS2SD, CVTPS2PD): exact; IE for SNaN, DE for denormals.
    pub fn widen(&mut self, v: f32) -> f64 {
        self.inputs(&[v]);
        if v.is_nan() {
            return f64::from_bits((v as f64).to_bits() | 1 << 51);
        }
        v as f64
    }

    /// Commit: OR the flags into MXCSR; fault on an unmasked one.
    pub fn finish(self, core: &mut Core) -> R {
        let unmasked = self.flags & !(self.mxcsr >> 7) & 0x3f;
        core.st.mxcsr |= self.flags;
        if unmasked != 0 {
            if core.st.cr4 & CR4_OSXMMEXCPT != 0 {
                return Err(fault(19, None));
            }
            return Err(ud());
        }
        Ok(())
    }
}
