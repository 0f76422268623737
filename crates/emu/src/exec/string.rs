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
use crate::mmu::Access;

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
    loop {
        if rep && core.st.gpr[RCX] & am == 0 {
            return Ok(());
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
            _ => return Err(super::unimplemented(insn)),
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
