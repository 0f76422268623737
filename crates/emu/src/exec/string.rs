//! String instructions with REP/REPE/REPNE.
//!
//! A REP instruction runs a bounded number of iterations per execution and
//! then restarts itself (RIP stays on it), so interrupts and kicks are seen
//! during long copies and every I/O or MMIO element can exit to the VMM.

use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};

use super::operand::{reg_write, sreg_index};
use crate::core::{Core, R};
use crate::cpu::{mask, ES, FLAG_DF, RCX, RDI, RSI};
use crate::flags::{FlagOp, Flags};
use crate::memory::mmu::Access;

/// Iterations per execution before the instruction yields.
const BUDGET: u32 = 4096;

fn addr_size(insn: &Instruction) -> u8 {
    for n in 0..insn.op_count() {
        match insn.op_kind(n) {
            OpKind::MemorySegSI | OpKind::MemoryESDI => return 2,
            OpKind::MemorySegESI | OpKind::MemoryESEDI => return 4,
            OpKind::MemorySegRSI | OpKind::MemoryESRDI => return 8,
            _ => {}
        }
    }
    8
}

fn src_seg(insn: &Instruction) -> usize {
    for n in 0..insn.op_count() {
        if matches!(
            insn.op_kind(n),
            OpKind::MemorySegSI | OpKind::MemorySegESI | OpKind::MemorySegRSI
        ) {
            return sreg_index(insn.memory_segment());
        }
    }
    3
}

#[inline]
fn upd(core: &mut Core, r: usize, v: u64, asz: u8) {
    let g = &mut core.st.gpr[r];
    *g = match asz {
        2 => (*g & !0xffff) | (v & 0xffff),
        4 => v & 0xffff_ffff,
        _ => v,
    };
}

fn acc_reg(size: u8) -> Register {
    match size {
        1 => Register::AL,
        2 => Register::AX,
        4 => Register::EAX,
        _ => Register::RAX,
    }
}

/// REP MOVS/STOS forwards (addresses of `asz` bytes): copy or fill as
/// many elements as fit in the current source and destination pages (of
/// their linear addresses, segment bases added) at once, and with 16-bit
/// addresses before either offset wraps, when both are plain RAM (no MMIO,
/// no code or dirty tracking on the destination). Returns the elements
/// done (0: take the element path).
fn bulk_chunk(core: &mut Core, stos: bool, seg: usize, size: u8, budget: u32, asz: u8) -> u64 {
    let sz = size as u64;
    let am = mask(asz);
    let count = core.st.gpr[RCX] & am;
    let di = core.st.gpr[RDI] & am;
    let si = core.st.gpr[RSI] & am;
    let Ok(dlin) = core.lin(ES, di) else {
        return 0;
    };
    let slin = if stos {
        0
    } else {
        match core.lin(seg, si) {
            Ok(l) => l,
            Err(_) => return 0,
        }
    };
    // Elements before the page end, and with 16-bit offsets before the
    // offset wraps (32-bit ones wrap with the linear address).
    let room = |lin: u64, off: u64| {
        let r = (0x1000 - (lin & 0xfff)) / sz;
        if asz == 2 {
            r.min((0x1_0000 - off) / sz)
        } else {
            r
        }
    };
    let mut n = count.min(budget as u64).min(room(dlin, di));
    if !stos {
        n = n.min(room(slin, si));
    }
    if n == 0 {
        return 0;
    }
    let user = core.user();
    let Some((dst, tracked)) = core.ram_ptr_lin(dlin, Access::Write, user) else {
        return 0;
    };
    if tracked {
        return 0;
    }
    let len = (n * sz) as usize;
    if stos {
        let v = core.st.gpr[0];
        // SAFETY: `dst..dst+len` stays inside one RAM page (see `room`).
        unsafe {
            if size == 1 {
                std::ptr::write_bytes(dst, v as u8, len);
            } else {
                for i in 0..n as usize {
                    crate::memory::mem::store(dst.add(i * size as usize), size, v);
                }
            }
        }
    } else {
        let Some((src, _)) = core.ram_ptr_lin(slin, Access::Read, user) else {
            return 0;
        };
        let (s0, d0) = (src as usize, dst as usize);
        // SAFETY: both ranges stay inside one RAM page each. Forward
        // element order matters only when the destination starts inside
        // the source: copy element by element then.
        unsafe {
            if d0 > s0 && d0 < s0 + len {
                for i in 0..n as usize {
                    let o = i * size as usize;
                    crate::memory::mem::store(
                        dst.add(o),
                        size,
                        crate::memory::mem::load(src.add(o), size),
                    );
                }
            } else {
                std::ptr::copy(src, dst, len);
            }
        }
        upd(core, RSI, si.wrapping_add(n * sz), asz);
    }
    upd(core, RDI, di.wrapping_add(n * sz), asz);
    upd(core, RCX, count - n, asz);
    n
}

pub fn string_op(core: &mut Core, insn: &Instruction) -> R {
    let mn = insn.mnemonic();
    let size = insn.memory_size().size() as u8;
    let asz = addr_size(insn);
    let am = mask(asz);
    let seg = src_seg(insn);
    let is_cmp = matches!(
        mn,
        M::Cmpsb | M::Cmpsw | M::Cmpsd | M::Cmpsq | M::Scasb | M::Scasw | M::Scasd | M::Scasq
    );
    let rep = insn.has_rep_prefix() || insn.has_repne_prefix();
    let repne = insn.has_repne_prefix();
    let step = if core.st.rflags & FLAG_DF != 0 {
        (size as u64).wrapping_neg()
    } else {
        size as u64
    };
    let port = (core.st.gpr[2] & 0xffff) as u16;
    let mut budget = BUDGET;
    let bulk = rep
        && step == size as u64
        && matches!(
            mn,
            M::Movsb | M::Movsw | M::Movsd | M::Movsq | M::Stosb | M::Stosw | M::Stosd | M::Stosq
        );
    loop {
        if rep && core.st.gpr[RCX] & am == 0 {
            return Ok(());
        }
        if bulk {
            let n = bulk_chunk(
                core,
                mn == M::Stosb || mn == M::Stosw || mn == M::Stosd || mn == M::Stosq,
                seg,
                size,
                budget,
                asz,
            );
            if n > 0 {
                budget -= n as u32;
                if core.st.gpr[RCX] & am == 0 {
                    return Ok(());
                }
                if budget == 0 {
                    core.next_rip = core.st.rip;
                    core.end_block = true;
                    return Ok(());
                }
                continue;
            }
        }
        let si = core.st.gpr[RSI] & am;
        let di = core.st.gpr[RDI] & am;
        match mn {
            M::Movsb | M::Movsw | M::Movsd | M::Movsq => {
                let v = core.read_mem(seg, si, size)?;
                core.write_mem(ES, di, size, v)?;
                upd(core, RSI, si.wrapping_add(step), asz);
                upd(core, RDI, di.wrapping_add(step), asz);
            }
            M::Stosb | M::Stosw | M::Stosd | M::Stosq => {
                let v = core.st.gpr[0] & mask(size);
                core.write_mem(ES, di, size, v)?;
                upd(core, RDI, di.wrapping_add(step), asz);
            }
            M::Lodsb | M::Lodsw | M::Lodsd | M::Lodsq => {
                let v = core.read_mem(seg, si, size)?;
                reg_write(&mut core.st, acc_reg(size), v);
                upd(core, RSI, si.wrapping_add(step), asz);
            }
            M::Cmpsb | M::Cmpsw | M::Cmpsd | M::Cmpsq => {
                let a = core.read_mem(seg, si, size)?;
                let b = core.read_mem(ES, di, size)?;
                core.st.flags = Flags::set(FlagOp::Sub, size, a, b, a.wrapping_sub(b));
                upd(core, RSI, si.wrapping_add(step), asz);
                upd(core, RDI, di.wrapping_add(step), asz);
            }
            M::Scasb | M::Scasw | M::Scasd | M::Scasq => {
                let a = core.st.gpr[0] & mask(size);
                let b = core.read_mem(ES, di, size)?;
                core.st.flags = Flags::set(FlagOp::Sub, size, a, b, a.wrapping_sub(b));
                upd(core, RDI, di.wrapping_add(step), asz);
            }
            M::Insb | M::Insw | M::Insd => {
                super::system::check_io(core, port, size)?;
                // Probe the destination first so a #PF does not lose port data.
                let lin = core.lin(ES, di)?;
                let user = core.user();
                core.translate(lin, Access::Write, user)?;
                let v = core.io_in(port, size)?;
                core.write_mem(ES, di, size, v)?;
                upd(core, RDI, di.wrapping_add(step), asz);
            }
            M::Outsb | M::Outsw | M::Outsd => {
                super::system::check_io(core, port, size)?;
                let v = core.read_mem(seg, si, size)?;
                core.io_out(port, size, v)?;
                upd(core, RSI, si.wrapping_add(step), asz);
            }
            _ => return Err(super::not_executed(core, insn)),
        }
        if !rep {
            return Ok(());
        }
        let c = core.st.gpr[RCX].wrapping_sub(1) & am;
        upd(core, RCX, c, asz);
        if c == 0 {
            return Ok(());
        }
        if is_cmp {
            let zf = core.st.flags.zf(core.st.rflags);
            if zf == repne {
                return Ok(());
            }
        }
        budget -= 1;
        if budget == 0 || core.io.request.is_some() || core.end_block {
            // Yield: rerun this instruction for the remaining iterations.
            core.next_rip = core.st.rip;
            core.end_block = true;
            return Ok(());
        }
    }
}
