//! Lazy arithmetic flags.
//!
//! Most flag results are never read (the next instruction overwrites them),
//! so a flag-setting instruction only records its operation, operands and
//! result; CF/PF/AF/ZF/SF/OF are computed when a Jcc, SETcc, PUSHF, an
//! interrupt or anything else asks. While `op` is [`FlagOp::None`] the bits in
//! `ArchRegs::rflags` are authoritative.

use crate::cpu::{mask, FLAGS_ARITH, FLAG_AF, FLAG_CF, FLAG_OF, FLAG_PF, FLAG_SF, FLAG_ZF};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FlagOp {
    /// `rflags` holds the flags.
    #[default]
    None,
    Add,
    /// ADC: `aux` is the carry-in.
    Adc,
    Sub,
    /// SBB: `aux` is the borrow-in.
    Sbb,
    /// AND/OR/XOR/TEST: CF=OF=AF=0.
    Logic,
    /// INC/DEC keep CF: `aux` holds the previous CF.
    Inc,
    Dec,
    /// Shifts: `src` is the (masked, non-zero) count, `dst` the original value.
    Shl,
    Shr,
    Sar,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Flags {
    pub op: FlagOp,
    /// Operand size in bytes.
    pub size: u8,
    pub dst: u64,
    pub src: u64,
    pub res: u64,
    pub aux: u64,
}

#[inline(always)]
fn parity(v: u64) -> bool {
    (v as u8).count_ones() & 1 == 0
}

impl Flags {
    #[inline(always)]
    pub fn set(op: FlagOp, size: u8, dst: u64, src: u64, res: u64) -> Flags {
        Flags {
            op,
            size,
            dst,
            src,
            res: res & mask(size),
            aux: 0,
        }
    }

    #[inline(always)]
    fn sign_bit(&self) -> u32 {
        // Only meaningful with a pending op; wraps harmlessly for `None`.
        (self.size as u32 * 8).wrapping_sub(1) & 63
    }

    #[inline]
    pub fn cf(&self, rflags: u64) -> bool {
        let m = mask(self.size);
        let (d, s, r) = (self.dst & m, self.src & m, self.res);
        match self.op {
            FlagOp::None => rflags & FLAG_CF != 0,
            FlagOp::Add => r < d,
            FlagOp::Adc => r < d || (self.aux != 0 && r == d),
            FlagOp::Sub => d < s,
            FlagOp::Sbb => d < s || (self.aux != 0 && d == s),
            FlagOp::Logic => false,
            FlagOp::Inc | FlagOp::Dec => self.aux != 0,
            FlagOp::Shl => {
                let bits = self.size as u32 * 8;
                let c = s as u32;
                // The last bit shifted out; counts beyond the width shift out zeros.
                c <= bits && ((d as u128) << c >> bits) & 1 != 0
            }
            FlagOp::Shr => {
                let c = s as u32;
                c <= 64 && (d as u128 >> (c - 1)) & 1 != 0
            }
            FlagOp::Sar => {
                let c = (s as u32).min(63);
                let sd = crate::cpu::sext(d, self.size) as i64;
                (sd >> (c - 1)) & 1 != 0
            }
        }
    }

    #[inline]
    pub fn zf(&self, rflags: u64) -> bool {
        match self.op {
            FlagOp::None => rflags & FLAG_ZF != 0,
            _ => self.res == 0,
        }
    }

    #[inline]
    pub fn sf(&self, rflags: u64) -> bool {
        match self.op {
            FlagOp::None => rflags & FLAG_SF != 0,
            _ => (self.res >> self.sign_bit()) & 1 != 0,
        }
    }

    #[inline]
    pub fn pf(&self, rflags: u64) -> bool {
        match self.op {
            FlagOp::None => rflags & FLAG_PF != 0,
            _ => parity(self.res),
        }
    }

    #[inline]
    pub fn af(&self, rflags: u64) -> bool {
        match self.op {
            FlagOp::None => rflags & FLAG_AF != 0,
            FlagOp::Logic | FlagOp::Shl | FlagOp::Shr | FlagOp::Sar => false,
            FlagOp::Inc => self.res & 0xf == 0,
            FlagOp::Dec => self.res & 0xf == 0xf,
            _ => ((self.dst ^ self.src ^ self.res) >> 4) & 1 != 0,
        }
    }

    #[inline]
    pub fn of(&self, rflags: u64) -> bool {
        let sb = self.sign_bit();
        let (d, s, r) = (self.dst, self.src, self.res);
        match self.op {
            FlagOp::None => rflags & FLAG_OF != 0,
            FlagOp::Add | FlagOp::Adc => ((d ^ r) & (s ^ r)) >> sb & 1 != 0,
            FlagOp::Sub | FlagOp::Sbb => ((d ^ s) & (d ^ r)) >> sb & 1 != 0,
            FlagOp::Logic | FlagOp::Sar => false,
            FlagOp::Inc => r == 1u64 << sb,
            FlagOp::Dec => r == (1u64 << sb) - 1,
            // Defined for a count of 1; larger counts give the same formula on
            // the CPUs we compare with, and software must not rely on it.
            FlagOp::Shl => ((r >> sb) & 1 != 0) != self.cf(0),
            FlagOp::Shr => (d >> sb) & 1 != 0,
        }
    }

    /// RFLAGS with the six arithmetic bits computed from the pending op.
    pub fn materialize(&self, rflags: u64) -> u64 {
        if self.op == FlagOp::None {
            return rflags;
        }
        let mut f = rflags & !FLAGS_ARITH;
        if self.cf(rflags) {
            f |= FLAG_CF;
        }
        if self.pf(rflags) {
            f |= FLAG_PF;
        }
        if self.af(rflags) {
            f |= FLAG_AF;
        }
        if self.zf(rflags) {
            f |= FLAG_ZF;
        }
        if self.sf(rflags) {
            f |= FLAG_SF;
        }
        if self.of(rflags) {
            f |= FLAG_OF;
        }
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_sets_carry_and_overflow() {
        let f = Flags::set(FlagOp::Add, 1, 0x7f, 1, 0x80);
        let r = f.materialize(0);
        assert_eq!(r & FLAG_OF, FLAG_OF);
        assert_eq!(r & FLAG_CF, 0);
        assert_eq!(r & FLAG_SF, FLAG_SF);
        assert_eq!(r & FLAG_AF, FLAG_AF);
        let f = Flags::set(FlagOp::Add, 1, 0xff, 1, 0x100);
        let r = f.materialize(0);
        assert_eq!(r & (FLAG_CF | FLAG_ZF), FLAG_CF | FLAG_ZF);
    }

    #[test]
    fn sub_borrow() {
        let f = Flags::set(FlagOp::Sub, 4, 1, 2, 1u64.wrapping_sub(2));
        let r = f.materialize(0);
        assert_eq!(r & FLAG_CF, FLAG_CF);
        assert_eq!(r & FLAG_SF, FLAG_SF);
        assert_eq!(r & FLAG_OF, 0);
    }
}
