//! x87 arithmetic executed by the host's own x87 unit.
//!
//! The engine only runs on x86-64 hosts, and every x86-64 CPU has the x87
//! unit the guest expects. Executing the guest's instruction on it gives
//! results bit-identical to that CPU for everything: 80-bit arithmetic with
//! the control word's precision (24/53/64-bit mantissas) and rounding,
//! denormals, NaNs, infinities, the status word's exception flags, C0-C3,
//! stack overflow/underflow (IE with SF and C1), the transcendental
//! instructions (FSIN, FPTAN, FYL2X, ...) and what an unmasked exception
//! leaves behind (destination untouched, ES set). A soft-float of our own
//! would have to reproduce all of that, and could still not match a given
//! CPU's transcendental results bit for bit.
//!
//! How one instruction runs ([`exec`]): the guest's x87 state is written as
//! a 108-byte FSAVE image (32-bit protected-mode layout, the one FNSAVE and
//! FRSTOR use on x86-64 without REX.W), loaded with FRSTOR, the instruction
//! runs from a table of stubs assembled at build time (one per escape byte
//! and ModRM byte: register forms as they are, memory forms with their
//! operand at `[rdi]`, a 16-byte buffer of ours), and FNSAVE takes the state
//! back. The guest's arithmetic flags go in and out through RFLAGS (FCMOVcc
//! reads them, FCOMI writes them). Guest bytes never run on the host: only
//! the stubs of this table, chosen by (escape, ModRM).
//!
//! Invariant: the host never takes an x87 exception (#MF, a SIGFPE for the
//! VMM). x87 exceptions are delayed: an instruction that raises an unmasked
//! one only records it (ES in the status word), and the *next waiting* x87
//! instruction faults. The sequence here is FNSTCW (no-wait), FRSTOR (waits
//! on the host's own state, which has nothing pending), the guest
//! instruction (waits on the loaded guest state: [`exec`] never loads an
//! unmasked exception flag as pending: it clears such flags in the image and
//! ORs them back afterwards), FNSAVE (no-wait; it also re-initialises the
//! unit, so nothing is pending any more) and FLDCW of the host's control
//! word (waits on that re-initialised state). The x87 stack is empty again
//! when the block ends, as the ABI requires.
//!
//! Results follow the host CPU: moving a VM between hosts of different
//! vendors can change the last bit of a transcendental result, as moving a
//! process would.

use std::arch::{asm, global_asm};

use crate::cpu::{Fpu, FLAG_AF, FLAG_CF, FLAG_OF, FLAG_PF, FLAG_SF, FLAG_ZF};

/// The arithmetic flags (what FCMOVcc reads and FCOMI writes).
pub const ARITH: u64 = FLAG_CF | FLAG_PF | FLAG_AF | FLAG_ZF | FLAG_SF | FLAG_OF;

// One 4-byte stub per (escape byte D8-DF, ModRM byte): the instruction and
// RET. Register forms (mod = 11) are the instruction itself; memory forms
// with mod = 00 and r/m = 111 address `[rdi]`; other ModRM values are never
// chosen (UD2).
global_asm!(
    ".pushsection .text.vireo_emu_x87,\"ax\",@progbits",
    ".balign 16",
    ".globl vireo_emu_x87_table",
    ".hidden vireo_emu_x87_table",
    "vireo_emu_x87_table:",
    ".set vireo_x87_op, 0xd8",
    ".rept 8",
    ".set vireo_x87_rm, 0",
    ".rept 256",
    ".if (vireo_x87_rm & 0xc0) == 0xc0",
    ".byte vireo_x87_op, vireo_x87_rm, 0xc3, 0xcc",
    ".elseif (vireo_x87_rm & 0xc7) == 0x07",
    ".byte vireo_x87_op, vireo_x87_rm, 0xc3, 0xcc",
    ".else",
    ".byte 0x0f, 0x0b, 0xcc, 0xcc",
    ".endif",
    ".set vireo_x87_rm, vireo_x87_rm + 1",
    ".endr",
    ".set vireo_x87_op, vireo_x87_op + 1",
    ".endr",
    ".popsection",
);

extern "C" {
    static vireo_emu_x87_table: [u8; 8 * 256 * 4];
}

/// Whether (escape, ModRM) has a stub: a register form, or a memory form
/// addressing `[rdi]`.
pub fn has_stub(esc: u8, modrm: u8) -> bool {
    (0xd8..=0xdf).contains(&esc) && (modrm & 0xc0 == 0xc0 || modrm & 0xc7 == 0x07)
}

/// The tag (2 bits, FSAVE encoding) a non-empty register holds.
pub fn tag_of(v: u128) -> u16 {
    let exp = ((v >> 64) & 0x7fff) as u16;
    let mant = v as u64;
    if exp == 0 && mant == 0 {
        1 // zero
    } else if exp == 0 || exp == 0x7fff || mant >> 63 == 0 {
        2 // special: denormal, NaN, infinity, unnormal
    } else {
        0 // valid
    }
}

/// The full tag word (FSTENV/FSAVE) from the abridged one and the values.
pub fn full_tags(f: &Fpu) -> u16 {
    (0..8).fold(0u16, |w, p| {
        let t = if f.tag & (1 << p) == 0 {
            3
        } else {
            tag_of(f.st[p])
        };
        w | t << (2 * p)
    })
}

/// The abridged tag word: a register is in use unless its tag is 11.
pub fn abridged_tags(ftw: u16) -> u8 {
    (0..8).fold(0u8, |a, p| {
        if (ftw >> (2 * p)) & 3 != 3 {
            a | 1 << p
        } else {
            a
        }
    })
}

/// Exception flags (IE..PE) set and not masked: what makes the next waiting
/// x87 instruction raise #MF.
pub fn pending(f: &Fpu) -> u16 {
    f.fsw & !f.fcw & 0x3f
}

#[repr(C, align(16))]
struct Image([u8; 108]);

/// Run x87 instruction (`esc`, `modrm`) on the host with the guest state
/// `f`. `mem` holds the memory operand of a memory form (read by loads,
/// written by stores); `flags` the guest's arithmetic flags, in and out.
/// FIP/FDP/FOP are left as they were (the caller knows the guest's).
///
/// Unmasked exception flags already pending in `f` are kept but not shown
/// to the host (so it cannot fault): the caller raises #MF for them before
/// calling, unless CR0.NE = 0, where the instruction proceeds as with
/// IGNNE# asserted.
pub fn exec(f: &mut Fpu, esc: u8, modrm: u8, mem: &mut [u8; 16], flags: &mut u64) {
    assert!(has_stub(esc, modrm), "x87 stub {esc:#x} {modrm:#x}");
    let held = pending(f);
    let mut img = Image([0; 108]);
    let b = &mut img.0;
    b[0..2].copy_from_slice(&f.fcw.to_le_bytes());
    let fsw = (f.status() & !held) & !0x8080;
    b[4..6].copy_from_slice(&fsw.to_le_bytes());
    b[8..10].copy_from_slice(&full_tags(f).to_le_bytes());
    for i in 0..8 {
        let v = f.st[(f.top as usize + i) & 7];
        b[28 + 10 * i..38 + 10 * i].copy_from_slice(&v.to_le_bytes()[..10]);
    }
    let index = (esc as usize - 0xd8) * 256 + modrm as usize;
    // SAFETY: the table is 8 KiB of 4-byte stubs; `has_stub` guarantees
    // the entry is a real x87 instruction followed by RET.
    let entry = unsafe {
        std::ptr::addr_of!(vireo_emu_x87_table)
            .cast::<u8>()
            .add(index * 4)
    };
    let mut host_cw = 0u16;
    let mut fl = *flags & ARITH;
    // SAFETY: see the module docs: the host takes no x87 exception, its
    // control word is put back and its x87 stack left empty. The stub
    // touches only the x87 state, RFLAGS and the 16 bytes at RDI (the
    // largest x87 memory operand of a stub is 10 bytes); it uses 8 bytes
    // of stack for its return address.
    unsafe {
        asm!(
            "fnstcw word ptr [{hcw}]",
            "frstor [{img}]",
            "pushfq",
            "and qword ptr [rsp], {keep}",
            "or qword ptr [rsp], {fl}",
            "popfq",
            "call {entry}",
            "pushfq",
            "pop {fl}",
            "fnsave [{img}]",
            "fldcw word ptr [{hcw}]",
            hcw = in(reg) &mut host_cw as *mut u16,
            img = in(reg) img.0.as_mut_ptr(),
            keep = in(reg) !ARITH,
            fl = inout(reg) fl,
            entry = in(reg) entry,
            in("rdi") mem.as_mut_ptr(),
        );
    }
    *flags = fl & ARITH;
    let b = &img.0;
    f.fcw = u16::from_le_bytes([b[0], b[1]]);
    let mut fsw = u16::from_le_bytes([b[4], b[5]]);
    f.top = ((fsw >> 11) & 7) as u8;
    fsw |= held;
    if held != 0 {
        fsw |= 0x8080;
    }
    f.fsw = fsw & !0x3800;
    f.tag = abridged_tags(u16::from_le_bytes([b[8], b[9]]));
    for i in 0..8 {
        let mut r = [0u8; 16];
        r[..10].copy_from_slice(&b[28 + 10 * i..38 + 10 * i]);
        f.st[(f.top as usize + i) & 7] = u128::from_le_bytes(r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE: u128 = (16383u128 << 64) | (1u128 << 63);

    fn run(f: &mut Fpu, esc: u8, modrm: u8) -> [u8; 16] {
        let mut mem = [0u8; 16];
        let mut fl = 0;
        exec(f, esc, modrm, &mut mem, &mut fl);
        mem
    }

    #[test]
    fn constants_and_arithmetic_in_80_bits() {
        let mut f = Fpu::default();
        run(&mut f, 0xd9, 0xe8); // fld1
        assert_eq!((f.top, f.tag), (7, 0x80));
        assert_eq!(f.st[7], ONE);
        run(&mut f, 0xd9, 0xeb); // fldpi
                                 // π to 64 bits, rounded to nearest: C90FDAA2_2168C235 (the host
                                 // rounds the internal 66-bit constant as the CPU documents).
        assert_eq!(f.st[6] as u64, 0xc90f_daa2_2168_c235);
        run(&mut f, 0xde, 0xc1); // faddp: 1 + π
        assert_eq!((f.top, f.tag), (7, 0x80));
        run(&mut f, 0xd9, 0xfa); // fsqrt
        let v = f.st[7];
        assert_eq!(v >> 64, 16384); // sqrt(4.14) is in [2, 4)
    }

    #[test]
    fn stack_overflow_is_invalid_with_c1_and_pending_exceptions_do_not_fault() {
        let mut f = Fpu::default();
        for _ in 0..8 {
            run(&mut f, 0xd9, 0xee); // fldz
        }
        assert_eq!(f.status() & 0x7f, 0);
        run(&mut f, 0xd9, 0xe8); // ninth push: stack fault
                                 // IE | SF, C1 = 1 (overflow); masked, so no ES.
        assert_eq!(f.status() & 0x2ff, 0x241);
        // Unmask IE: the flag is now pending; running on must not make
        // the host fault, and the pending flag stays.
        f.fcw &= !1;
        assert_eq!(pending(&f), 1);
        run(&mut f, 0xd9, 0xe0); // fchs
        assert_eq!(f.fsw & 0x8081, 0x8081);
    }

    #[test]
    fn memory_operand_at_rdi() {
        let mut f = Fpu::default();
        let mut mem = [0u8; 16];
        mem[..8].copy_from_slice(&2.5f64.to_le_bytes());
        let mut fl = 0;
        exec(&mut f, 0xdd, 0x07, &mut mem, &mut fl); // fld qword [rdi]
        exec(&mut f, 0xdb, 0x1f, &mut mem, &mut fl); // fistp dword [rdi]
        assert_eq!(i32::from_le_bytes(mem[..4].try_into().unwrap()), 2);
        assert_eq!(f.tag, 0);
    }

    #[test]
    fn fcomi_writes_and_fcmov_reads_flags() {
        let mut f = Fpu::default();
        run(&mut f, 0xd9, 0xe8); // fld1
        run(&mut f, 0xd9, 0xee); // fldz: st0 = 0, st1 = 1
        let mut mem = [0u8; 16];
        let mut fl = ARITH;
        exec(&mut f, 0xdb, 0xf1, &mut mem, &mut fl); // fcomi st0, st1: 0 < 1
        assert_eq!(fl, FLAG_CF);
        exec(&mut f, 0xda, 0xc1, &mut mem, &mut fl); // fcmovb st0, st1
        assert_eq!(f.st[f.top as usize], ONE);
    }
}
