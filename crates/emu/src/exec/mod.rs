//! The interpreter: one decoded instruction at a time, dispatched on its
//! mnemonic to the family modules.

pub mod alu;
pub mod control;
pub mod fpu;
pub mod operand;
pub mod sse;
pub mod sse4;
pub mod string;
pub mod system;
pub mod x87;

use iced_x86::{ConditionCode, Instruction, Mnemonic, OpKind};

use crate::core::{Core, Exc, R};
use crate::cpu::{mask, FLAG_CF, SS};

/// Execute one instruction. On `Ok`, `core.next_rip` is where execution
/// continues; on `Err` architectural state is as before the instruction
/// (except for completed iterations of a REP string instruction).
pub fn execute(core: &mut Core, insn: &Instruction) -> R {
    use Mnemonic as M;
    match insn.mnemonic() {
        M::Mov => system::mov(core, insn),
        M::Add => alu::binop(core, insn, alu::Bin::Add),
        M::Or => alu::binop(core, insn, alu::Bin::Or),
        M::Adc => alu::binop(core, insn, alu::Bin::Adc),
        M::Sbb => alu::binop(core, insn, alu::Bin::Sbb),
        M::And => alu::binop(core, insn, alu::Bin::And),
        M::Sub => alu::binop(core, insn, alu::Bin::Sub),
        M::Xor => alu::binop(core, insn, alu::Bin::Xor),
        M::Cmp => alu::binop(core, insn, alu::Bin::Cmp),
        M::Test => alu::binop(core, insn, alu::Bin::Test),
        M::Inc => alu::incdec(core, insn, true),
        M::Dec => alu::incdec(core, insn, false),
        M::Neg => alu::neg(core, insn),
        M::Not => alu::not(core, insn),
        M::Lea => alu::lea(core, insn),
        M::Movzx => alu::movx(core, insn, false),
        M::Movsx | M::Movsxd => alu::movx(core, insn, true),
        M::Xchg => alu::xchg(core, insn),
        M::Xadd => alu::xadd(core, insn),
        M::Cmpxchg => alu::cmpxchg(core, insn),
        M::Cmpxchg8b | M::Cmpxchg16b => alu::cmpxchg_double(core, insn),
        M::Mul => alu::mul(core, insn),
        M::Imul => alu::imul(core, insn),
        M::Div => alu::div(core, insn, false),
        M::Idiv => alu::div(core, insn, true),
        M::Shl | M::Sal | M::Shr | M::Sar | M::Rol | M::Ror | M::Rcl | M::Rcr => {
            alu::shift(core, insn)
        }
        M::Shld | M::Shrd => alu::shiftd(core, insn),
        M::Bt | M::Bts | M::Btr | M::Btc => alu::bittest(core, insn),
        // Without BMI1 advertised, F3 0F BC executes as BSF (Linux relies
        // on this for `rep; bsf`); F3 0F BD is LZCNT where CPUID says so,
        // BSR otherwise.
        M::Bsf | M::Tzcnt => alu::bitscan(core, insn, false),
        M::Bsr => alu::bitscan(core, insn, true),
        M::Lzcnt => alu::lzcnt(core, insn),
        M::Popcnt => alu::popcnt(core, insn),
        M::Bswap => alu::bswap(core, insn),
        M::Cbw | M::Cwde | M::Cdqe => alu::extend_acc(core, insn),
        M::Cwd | M::Cdq | M::Cqo => alu::extend_to_dx(core, insn),
        M::Lahf => alu::lahf(core),
        M::Sahf => alu::sahf(core),
        M::Clc | M::Stc | M::Cmc | M::Cld | M::Std => alu::flag_op(core, insn.mnemonic()),
        M::Xlatb => alu::xlat(core, insn),
        M::Seta
        | M::Setae
        | M::Setb
        | M::Setbe
        | M::Sete
        | M::Setg
        | M::Setge
        | M::Setl
        | M::Setle
        | M::Setne
        | M::Setno
        | M::Setnp
        | M::Setns
        | M::Seto
        | M::Setp
        | M::Sets => {
            let v = cond(core, insn.condition_code()) as u64;
            operand::write_op(core, insn, 0, 1, v)
        }
        M::Cmova
        | M::Cmovae
        | M::Cmovb
        | M::Cmovbe
        | M::Cmove
        | M::Cmovg
        | M::Cmovge
        | M::Cmovl
        | M::Cmovle
        | M::Cmovne
        | M::Cmovno
        | M::Cmovnp
        | M::Cmovns
        | M::Cmovo
        | M::Cmovp
        | M::Cmovs => alu::cmov(core, insn),

        M::Ja
        | M::Jae
        | M::Jb
        | M::Jbe
        | M::Je
        | M::Jg
        | M::Jge
        | M::Jl
        | M::Jle
        | M::Jne
        | M::Jno
        | M::Jnp
        | M::Jns
        | M::Jo
        | M::Jp
        | M::Js => {
            if cond(core, insn.condition_code()) {
                core.next_rip = insn.near_branch_target();
            }
            Ok(())
        }
        M::Jmp => control::jmp(core, insn),
        M::Call => control::call(core, insn),
        M::Ret => control::ret(core, insn),
        M::Retf => control::retf(core, insn),
        M::Jcxz | M::Jecxz | M::Jrcxz | M::Loop | M::Loope | M::Loopne => {
            control::loop_op(core, insn)
        }
        M::Push => control::push_op(core, insn),
        M::Pop => control::pop_op(core, insn),
        M::Pushf | M::Pushfd | M::Pushfq => control::pushf(core, insn),
        M::Popf | M::Popfd | M::Popfq => control::popf(core, insn),
        M::Pusha | M::Pushad => control::pusha(core, insn),
        M::Popa | M::Popad => control::popa(core, insn),
        M::Leave => control::leave(core, insn),
        M::Enter => control::enter(core, insn),
        M::Int | M::Int3 | M::Into | M::Int1 => control::int(core, insn),
        M::Iret | M::Iretd | M::Iretq => control::iret(core, insn),
        M::Syscall => control::syscall(core),
        M::Sysret | M::Sysretq => control::sysret(core, insn),

        M::Movsb | M::Movsw | M::Movsq | M::Stosb | M::Stosw | M::Stosd | M::Stosq => {
            string::string_op(core, insn)
        }
        M::Lodsb | M::Lodsw | M::Lodsd | M::Lodsq | M::Scasb | M::Scasw | M::Scasd => {
            string::string_op(core, insn)
        }
        M::Scasq | M::Cmpsb | M::Cmpsw | M::Cmpsq | M::Insb | M::Insw | M::Insd => {
            string::string_op(core, insn)
        }
        M::Outsb | M::Outsw | M::Outsd => string::string_op(core, insn),
        // MOVSD/CMPSD are also SSE2 mnemonics: the string forms have the
        // ES:[rDI] operand.
        M::Movsd | M::Cmpsd if is_string_form(insn) => string::string_op(core, insn),

        M::Nop
        | M::Pause
        | M::Endbr32
        | M::Endbr64
        | M::Lfence
        | M::Sfence
        | M::Prefetch
        | M::Prefetchw
        | M::Prefetchnta
        | M::Prefetcht0
        | M::Prefetcht1
        | M::Prefetcht2
        | M::Clflush
        | M::Clflushopt => Ok(()),
        M::Mfence => {
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
        M::Ud0 | M::Ud1 | M::Ud2 => Err(crate::core::ud()),
        M::INVALID => Err(crate::core::ud()),
        _ => system::execute_system(core, insn),
    }
}

fn is_string_form(insn: &Instruction) -> bool {
    matches!(
        insn.op0_kind(),
        OpKind::MemoryESDI | OpKind::MemoryESEDI | OpKind::MemoryESRDI
    ) || matches!(
        insn.op1_kind(),
        OpKind::MemoryESDI | OpKind::MemoryESEDI | OpKind::MemoryESRDI
    )
}

/// Evaluate a condition code against the (lazy) flags.
#[inline]
pub fn cond(core: &Core, cc: ConditionCode) -> bool {
    let f = &core.st.flags;
    let r = core.st.rflags;
    use ConditionCode as C;
    match cc {
        C::o => f.of(r),
        C::no => !f.of(r),
        C::b => f.cf(r),
        C::ae => !f.cf(r),
        C::e => f.zf(r),
        C::ne => !f.zf(r),
        C::be => f.cf(r) || f.zf(r),
        C::a => !f.cf(r) && !f.zf(r),
        C::s => f.sf(r),
        C::ns => !f.sf(r),
        C::p => f.pf(r),
        C::np => !f.pf(r),
        C::l => f.sf(r) != f.of(r),
        C::ge => f.sf(r) == f.of(r),
        C::le => f.zf(r) || f.sf(r) != f.of(r),
        C::g => !f.zf(r) && f.sf(r) == f.of(r),
        _ => false,
    }
}

#[inline]
pub fn carry(core: &Core) -> bool {
    core.st.flags.cf(core.st.rflags)
}

/// Set CF to `v` keeping the other flags (settles lazy flags first).
pub fn set_cf(core: &mut Core, v: bool) {
    core.st.settle_flags();
    if v {
        core.st.rflags |= FLAG_CF;
    } else {
        core.st.rflags &= !FLAG_CF;
    }
}

// ------------------------------------------------------------------ stack

/// Push `size` bytes. Writes memory before updating RSP so a fault leaves
/// RSP unchanged.
pub fn push(core: &mut Core, size: u8, v: u64) -> R {
    let ss = core.st.stack_size();
    let sp = core.st.gpr[4].wrapping_sub(size as u64) & mask(ss);
    core.write_mem(SS, sp, size, v)?;
    set_sp(core, sp);
    Ok(())
}

pub fn pop(core: &mut Core, size: u8) -> R<u64> {
    let ss = core.st.stack_size();
    let sp = core.st.gpr[4] & mask(ss);
    let v = core.read_mem(SS, sp, size)?;
    set_sp(core, sp.wrapping_add(size as u64));
    Ok(v)
}

/// Read a stack slot `off` bytes above the current top without popping.
pub fn peek(core: &mut Core, off: u64, size: u8) -> R<u64> {
    let ss = core.st.stack_size();
    let sp = core.st.gpr[4].wrapping_add(off) & mask(ss);
    core.read_mem(SS, sp, size)
}

/// Update RSP/ESP/SP according to the stack address size.
pub fn set_sp(core: &mut Core, sp: u64) {
    let ss = core.st.stack_size();
    let m = mask(ss);
    core.st.gpr[4] = (core.st.gpr[4] & !m) | (sp & m);
}

/// Operand size of a near branch/stack instruction in the current mode.
pub fn stack_op_size(insn: &Instruction) -> u8 {
    let inc = insn.stack_pointer_increment();
    inc.unsigned_abs() as u8
}

/// #UD unless the advertised CPU has `f`: for the few instructions the
/// interpreter implements beyond what CPUID shows (RDTSCP, FISTTP, LDDQU).
pub fn require(core: &Core, f: iced_x86::CpuidFeature) -> R {
    if crate::cpuid::has_feature(&core.cpuid, f) {
        Ok(())
    } else {
        Err(crate::core::ud())
    }
}

/// An instruction the interpreter has no handler for: #UD when the
/// advertised CPU lacks it (one of the CPUID features it needs is not
/// advertised, or the encoding is invalid in this mode), otherwise an
/// internal error naming it, since a real CPU of this model would execute it.
pub fn not_executed(core: &Core, insn: &Instruction) -> Exc {
    let lacks = insn
        .cpuid_features()
        .iter()
        .any(|f| !crate::cpuid::has_feature(&core.cpuid, *f));
    if lacks {
        crate::core::ud()
    } else {
        unimplemented(insn)
    }
}

pub fn unimplemented(insn: &Instruction) -> Exc {
    Exc::unimplemented(format!(
        "instruction {:?} ({:?}) not implemented",
        insn.mnemonic(),
        insn.code()
    ))
}
