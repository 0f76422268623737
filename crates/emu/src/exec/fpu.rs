//! x87, FXSAVE/FXRSTOR and MXCSR.
//!
//! The x87 control instructions (FINIT, FCLEX, FLDCW, FSTCW, FSTSW,
//! FSTENV/FLDENV, FSAVE/FRSTOR in their 16- and 32-bit, real- and
//! protected-mode layouts) are done here in software; every other x87
//! instruction (arithmetic, loads and stores in every format, compares,
//! FCMOVcc, the transcendental ones) runs on the host's own x87 unit
//! ([`super::x87`]), so its results, flags and condition codes are the
//! CPU's own. Pending unmasked exceptions raise #MF (vector 16) at the next
//! waiting x87 instruction when CR0.NE = 1.
//!
//! Invariants: `Fpu::tag` is the abridged tag word (bit i: physical
//! register i in use), the full tag word is derived from the register
//! contents when an image is stored; `Fpu::fsw` holds the status word
//! without TOP. An instruction that faults leaves the x87 state as it was.

use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};

use super::operand::{ea, mem_seg, reg_write};
use super::x87::{self, abridged_tags, full_tags};
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

// ------------------------------------------------------------- memory

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

/// Chunks (offset, size) covering `n` bytes with 8/4/2/1-byte accesses.
fn chunks(n: usize) -> impl Iterator<Item = (usize, u8)> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let left = n - at;
        let size = [8, 4, 2, 1].into_iter().find(|&s| s <= left)?;
        let c = (at, size as u8);
        at += size;
        Some(c)
    })
}

fn read_bytes(core: &mut Core, insn: &Instruction, buf: &mut [u8]) -> R {
    let s = mem_seg(insn);
    let off = ea(&core.st, insn);
    for (at, size) in chunks(buf.len()) {
        let v = core.read_mem(s, off.wrapping_add(at as u64), size)?;
        buf[at..at + size as usize].copy_from_slice(&v.to_le_bytes()[..size as usize]);
    }
    Ok(())
}

/// Writes `buf`; the last byte is probed first, so a fault on the far page
/// leaves memory untouched.
fn write_bytes(core: &mut Core, insn: &Instruction, buf: &[u8]) -> R {
    let s = mem_seg(insn);
    let off = ea(&core.st, insn);
    let last = off.wrapping_add(buf.len() as u64 - 1);
    let probe = core.read_mem(s, last, 1)?;
    core.write_mem(s, last, 1, probe)?;
    for (at, size) in chunks(buf.len()) {
        let mut v = [0u8; 8];
        v[..size as usize].copy_from_slice(&buf[at..at + size as usize]);
        core.write_mem(s, off.wrapping_add(at as u64), size, u64::from_le_bytes(v))?;
    }
    Ok(())
}

// ------------------------------------------------- environment images

/// The layout of an FSTENV/FSAVE image: 16- or 32-bit operand size, real
/// (and virtual-8086) or protected mode. 64-bit mode uses the 32-bit
/// protected-mode layout (FIP/FDP truncated to 32 bits).
#[derive(Clone, Copy)]
struct EnvForm {
    wide: bool,
    real: bool,
}

impl EnvForm {
    fn of(core: &Core, insn: &Instruction) -> EnvForm {
        use iced_x86::MemorySize as S;
        EnvForm {
            wide: matches!(insn.memory_size(), S::FpuEnv28 | S::FpuState108),
            real: !core.st.protected() || core.st.v86(),
        }
    }

    fn env_len(self) -> usize {
        if self.wide {
            28
        } else {
            14
        }
    }
}

/// The environment as FNSTENV stores it. FCS and FDS are stored as 0 (the
/// engine does not keep them, as FXSAVE's 64-bit layout does not).
fn store_env(f: &Fpu, form: EnvForm) -> Vec<u8> {
    let (fip, fdp, fop) = (f.fip, f.fdp, f.fop as u64 & 0x7ff);
    let words: [u64; 7] = if form.real {
        [
            f.fcw as u64,
            f.status() as u64,
            full_tags(f) as u64,
            fip & 0xffff,
            if form.wide {
                ((fip >> 16) & 0xffff) << 12 | fop
            } else {
                ((fip >> 16) & 0xf) << 12 | fop
            },
            fdp & 0xffff,
            if form.wide {
                ((fdp >> 16) & 0xffff) << 12
            } else {
                ((fdp >> 16) & 0xf) << 12
            },
        ]
    } else if form.wide {
        [
            f.fcw as u64,
            f.status() as u64,
            full_tags(f) as u64,
            fip & 0xffff_ffff,
            fop << 16,
            fdp & 0xffff_ffff,
            0,
        ]
    } else {
        [
            f.fcw as u64,
            f.status() as u64,
            full_tags(f) as u64,
            fip & 0xffff,
            0,
            fdp & 0xffff,
            0,
        ]
    };
    let mut out = Vec::with_capacity(108);
    for (i, w) in words.iter().enumerate() {
        if form.wide {
            // The reserved upper halves (of the control, status and tag
            // dwords, and of FDS's) are stored as ones, as the CPU does.
            let reserved = if form.real {
                matches!(i, 0..=3 | 5)
            } else {
                matches!(i, 0..=2 | 6)
            };
            let hi = if reserved { 0xffff_0000 } else { 0 };
            out.extend_from_slice(&((*w as u32) | hi).to_le_bytes());
        } else {
            out.extend_from_slice(&(*w as u16).to_le_bytes());
        }
    }
    out
}

/// Loads an environment image (FLDENV, and the first part of FRSTOR).
fn load_env(f: &mut Fpu, img: &[u8], form: EnvForm) {
    let w = |i: usize| -> u64 {
        if form.wide {
            u32::from_le_bytes(img[4 * i..4 * i + 4].try_into().unwrap()) as u64
        } else {
            u16::from_le_bytes(img[2 * i..2 * i + 2].try_into().unwrap()) as u64
        }
    };
    f.fcw = fcw_value(w(0) as u16);
    let fsw = w(1) as u16;
    f.top = ((fsw >> 11) & 7) as u8;
    f.fsw = fsw & !0x3800;
    f.tag = abridged_tags(w(2) as u16);
    if form.real {
        let hi = if form.wide { 0xffff } else { 0xf };
        f.fip = w(3) & 0xffff | ((w(4) >> 12) & hi) << 16;
        f.fop = (w(4) & 0x7ff) as u16;
        f.fdp = w(5) & 0xffff | ((w(6) >> 12) & hi) << 16;
    } else if form.wide {
        f.fip = w(3);
        f.fop = ((w(4) >> 16) & 0x7ff) as u16;
        f.fdp = w(5);
    } else {
        f.fip = w(3);
        f.fdp = w(5);
    }
}
pub fn execute(core: &mut Core, insn: &Instruction) -> R {
    let mn = insn.mnemonic();
    match mn {
        M::Wait => {
            if core.st.cr0 & CR0_TS != 0 && core.st.cr0 & CR0_MP != 0 {
                return Err(nm());
            }
            wait_check(core)
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

/// FLDCW's value as the CPU keeps it: bits 7 and 13-15 read as 0, bit 6
/// as 1.
fn fcw_value(v: u16) -> u16 {
    (v & 0x1f7f) | 0x40
}

/// FNINIT (also the end of FSAVE): the data registers keep their contents,
/// only tagged empty; FNSAVE images and FXSAVE show them.
fn init(f: &mut Fpu) {
    *f = Fpu {
        st: f.st,
        ..Fpu::default()
    };
}

/// #MF for an unmasked exception left pending by an earlier instruction,
/// checked by every waiting x87 instruction. With CR0.NE = 0 (the legacy
/// FERR#/IRQ 13 reporting) the engine behaves as if IGNNE# were asserted:
/// the instruction proceeds and the flags stay pending.
pub(crate) fn wait_check(core: &Core) -> R {
    if x87::pending(&core.st.fpu) != 0 && core.st.cr0 & CR0_NE != 0 {
        return Err(fault(16, None));
    }
    Ok(())
}

/// What determines an encoding (see `stub_of` and `guest_modrm`).
type EncodingKey = (u8, u16, u16, u16, u16);

thread_local! {
    /// Encodings already worked out: re-encoding with iced's encoder costs
    /// more than running the instruction. Keyed by what determines them
    /// (see `stub_of` and `guest_modrm`).
    static ENCODINGS: std::cell::RefCell<std::collections::HashMap<EncodingKey, (u8, u8)>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

fn cached(key: EncodingKey, f: impl FnOnce() -> Option<(u8, u8)>) -> Option<(u8, u8)> {
    if let Some(v) = ENCODINGS.with(|c| c.borrow().get(&key).copied()) {
        return Some(v);
    }
    let v = f()?;
    ENCODINGS.with(|c| c.borrow_mut().insert(key, v));
    Some(v)
}

/// The (escape, ModRM) pair the host stub table is indexed by: the
/// instruction re-encoded in 64-bit mode, a memory operand replaced by
/// `[rdi]`. It depends on the instruction's code and register operands.
fn stub_of(insn: &Instruction, is_mem: bool) -> R<(u8, u8)> {
    let reg = |n: u32| {
        if n < insn.op_count() && insn.op_kind(n) == OpKind::Register {
            insn.op_register(n) as u16
        } else {
            0
        }
    };
    let key = (0, insn.code() as u16, reg(0), reg(1), 0);
    let encode = || {
        let mut i = *insn;
        if is_mem {
            i.set_memory_base(Register::RDI);
            i.set_memory_index(Register::None);
            i.set_memory_index_scale(1);
            i.set_memory_displacement64(0);
            i.set_memory_displ_size(0);
            i.set_segment_prefix(Register::None);
        }
        let mut enc = iced_x86::Encoder::new(64);
        enc.encode(&i, 0).ok()?;
        match enc.take_buffer()[..] {
            [esc, modrm] if x87::has_stub(esc, modrm) => Some((esc, modrm)),
            _ => None,
        }
    };
    cached(key, encode)
        .ok_or_else(|| Exc::unimplemented(format!("x87 instruction {insn} has no host form")))
}

/// The ModRM byte of the guest's own encoding of a memory form (for FOP):
/// it depends on the code size, the instruction's code and its addressing
/// form (base, index, displacement size).
fn guest_modrm(core: &Core, insn: &Instruction) -> Option<u8> {
    let key = (
        core.st.code_bits() as u8,
        insn.code() as u16,
        insn.memory_base() as u16,
        insn.memory_index() as u16,
        insn.memory_displ_size() as u16,
    );
    let encode = || {
        let mut enc = iced_x86::Encoder::new(core.st.code_bits());
        enc.encode(insn, insn.ip()).ok()?;
        let b = enc.take_buffer();
        let at = b.iter().position(|x| (0xd8..=0xdf).contains(x))?;
        Some((*b.get(at + 1)?, 0))
    };
    cached(key, encode).map(|(m, _)| m)
}

/// Instructions that write their memory operand (the rest read it).
fn stores(mn: M) -> bool {
    matches!(
        mn,
        M::Fst | M::Fstp | M::Fist | M::Fistp | M::Fisttp | M::Fbstp
    )
}

/// One arithmetic, load, store, compare or stack instruction, run on the
/// host x87 unit (see `x87`'s module docs).
fn on_host(core: &mut Core, insn: &Instruction, is_mem: bool) -> R {
    let mn = insn.mnemonic();
    let (esc, modrm) = stub_of(insn, is_mem)?;
    let size = if is_mem { insn.memory_size().size() } else { 0 };
    // The stubs' operand buffer holds the 10-byte formats at most; the
    // larger images (FLDENV, FSAVE, ...) never run on the host.
    if size > 10 {
        return Err(Exc::unimplemented(format!(
            "x87 instruction {insn} has a {size}-byte operand"
        )));
    }
    let mut buf = [0u8; 16];
    if is_mem && !stores(mn) {
        read_bytes(core, insn, &mut buf[..size])?;
    }
    let uses_flags = matches!(
        mn,
        M::Fcomi
            | M::Fcomip
            | M::Fucomi
            | M::Fucomip
            | M::Fcmovb
            | M::Fcmove
            | M::Fcmovbe
            | M::Fcmovu
            | M::Fcmovnb
            | M::Fcmovne
            | M::Fcmovnbe
            | M::Fcmovnu
    );
    let mut flags = if uses_flags { core.st.get_rflags() } else { 0 };
    let old = core.st.fpu;
    let mut f = old;
    x87::exec(&mut f, esc, modrm, &mut buf, &mut flags);
    if is_mem && stores(mn) {
        // An unmasked exception raised by this store can suppress it: run
        // it again over other buffer contents to tell whether it wrote.
        let new_unmasked = f.fsw & !old.fsw & !f.fcw & 0x3f != 0;
        let wrote = if new_unmasked {
            let mut again = old;
            let mut buf2 = [0xffu8; 16];
            let mut fl2 = flags;
            x87::exec(&mut again, esc, modrm, &mut buf2, &mut fl2);
            buf2[..size] == buf[..size]
        } else {
            true
        };
        if wrote {
            write_bytes(core, insn, &buf[..size])?;
        }
    }
    // The last non-control instruction's pointers and opcode.
    let rm = if is_mem {
        guest_modrm(core, insn).unwrap_or(modrm)
    } else {
        modrm
    };
    f.fop = ((esc as u16 & 7) << 8) | rm as u16;
    // In real and virtual-8086 mode the pointers are linear addresses
    // (segment * 16 + offset), elsewhere offsets.
    let real = !core.st.protected() || core.st.v86();
    let base = |seg: usize| if real { core.st.seg[seg].base } else { 0 };
    f.fip = insn.ip().wrapping_add(base(CS));
    if is_mem {
        f.fdp = ea(&core.st, insn).wrapping_add(base(mem_seg(insn)));
    }
    core.st.fpu = f;
    if uses_flags {
        core.st.settle_flags();
        let r = core.st.rflags;
        core.st.set_rflags((r & !x87::ARITH) | flags);
    }
    Ok(())
}

/// Whether iced files the instruction under the x87 (its CPUID features
/// include one of the FPU's).
fn is_x87(insn: &Instruction) -> bool {
    use iced_x86::CpuidFeature as F;
    insn.cpuid_features().iter().any(|f| {
        matches!(
            f,
            F::FPU | F::FPU287 | F::FPU387 | F::FPU287XL_ONLY | F::FPU387SL_ONLY | F::CYRIX_FPU
        )
    })
}

fn x87(core: &mut Core, insn: &Instruction) -> R {
    let mn = insn.mnemonic();
    // EMMS (MMX) empties the x87 tag word.
    if mn == M::Emms {
        x87_check(core)?;
        wait_check(core)?;
        core.st.fpu.tag = 0;
        return Ok(());
    }
    // Not x87, or of an FPU feature the advertised CPU lacks (FISTTP
    // without SSE3, 287XL/387SL/Cyrix-only forms): #UD or an internal error.
    let lacks = insn
        .cpuid_features()
        .iter()
        .any(|f| !crate::cpuid::has_feature(&core.cpuid, *f));
    if !is_x87(insn) || lacks {
        return Err(super::not_executed(core, insn));
    }
    x87_check(core)?;
    let is_mem =
        insn.op_count() > 0 && (0..insn.op_count()).any(|n| insn.op_kind(n) == OpKind::Memory);
    // The no-wait control instructions ignore pending exceptions; their
    // waiting forms (FWAIT + the same) and every other x87 instruction
    // raise #MF for them first.
    if !matches!(
        mn,
        M::Fninit | M::Fnclex | M::Fnstsw | M::Fnstcw | M::Fnstenv | M::Fnsave
    ) {
        wait_check(core)?;
    }
    match mn {
        M::Fninit | M::Finit => init(&mut core.st.fpu),
        M::Fnclex | M::Fclex => core.st.fpu.fsw &= !0x80ff,
        // Without effect since the 80387.
        M::Fneni | M::Feni | M::Fndisi | M::Fdisi | M::Fnsetpm | M::Fsetpm => {}
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
            core.st.fpu.fcw = fcw_value(v);
        }
        M::Fnstenv | M::Fstenv => {
            let form = EnvForm::of(core, insn);
            let img = store_env(&core.st.fpu, form);
            write_bytes(core, insn, &img)?;
            // FSTENV then masks every exception.
            core.st.fpu.fcw |= 0x3f;
        }
        M::Fldenv => {
            let form = EnvForm::of(core, insn);
            let mut img = vec![0u8; form.env_len()];
            read_bytes(core, insn, &mut img)?;
            load_env(&mut core.st.fpu, &img, form);
        }
        M::Fnsave | M::Fsave => {
            let form = EnvForm::of(core, insn);
            let f = core.st.fpu;
            let mut img = store_env(&f, form);
            for i in 0..8 {
                let v = f.st[(f.top as usize + i) & 7];
                img.extend_from_slice(&v.to_le_bytes()[..10]);
            }
            write_bytes(core, insn, &img)?;
            init(&mut core.st.fpu);
        }
        M::Frstor => {
            let form = EnvForm::of(core, insn);
            let n = form.env_len();
            let mut img = vec![0u8; n + 80];
            read_bytes(core, insn, &mut img)?;
            let mut f = core.st.fpu;
            load_env(&mut f, &img, form);
            for i in 0..8 {
                let mut r = [0u8; 16];
                r[..10].copy_from_slice(&img[n + 10 * i..n + 10 * i + 10]);
                f.st[(f.top as usize + i) & 7] = u128::from_le_bytes(r);
            }
            core.st.fpu = f;
        }
        _ => on_host(core, insn, is_mem)?,
    }
    Ok(())
}
fn fxsave(core: &mut Core, insn: &Instruction, wide: bool) -> R {
    let s = mem_seg(insn);
    let base = ea(&core.st, insn);
    if core.lin(s, base)? & 15 != 0 {
        return Err(gp(0));
    }
    let mut f = core.st.fpu;
    // As AMD CPUs do: FOP, FIP and FDP are saved only while an unmasked
    // exception is pending (ES); otherwise they are stored as 0.
    if f.fsw & 0x80 == 0 {
        (f.fop, f.fip, f.fdp) = (0, 0, 0);
    }
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
