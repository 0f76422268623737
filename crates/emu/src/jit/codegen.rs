//! The code generator: one decoded block to host x86-64 code with
//! dynasm-rs, uop by uop.
//!
//! Invariants of the generated code: `rbx` holds the `*mut Core` for the
//! whole block. The register map is fixed (`FIXED`): guest RSP, RAX, RDI
//! and RSI live in r12, r13, r14 and r15 in every block, so at every
//! block entry reached by a chained link, and at every chained exit, those
//! four host registers hold the guest's values and `Core::st` may be older
//! for them (a link writes nothing back and its successor reloads
//! nothing); `Core::st` holds every other guest GPR there. The entry from
//! the dispatcher loads the four. A block may spill one of them (it
//! addresses AH..BH of it, bytes only reachable in `Core::st`, or it does
//! not use it and wants its host register): it stores it at entry, works
//! on `Core::st` for it, and loads it back into its host register before
//! each exit. Inside a block its most used other guest GPRs (locals, see
//! `allocate`) live in r10 and rdi (`LOCAL_REG`, `LOCAL_REG2`; rdi not in
//! a block with a REP MOVS/STOS) and in the host registers of spilled
//! ones: loaded at entry, written back before every exit (a block
//! that loops to itself keeps them across its back edge). A guest GPR in
//! `Cg::map` lives in its host register and is newer than `Core::st`
//! exactly when its bit is in `Cg::dirty` (the mapped `FIXED` ones count
//! as dirty from entry on). Whenever control leaves the generated code
//! for Rust (the way back to the dispatcher from every exit, the
//! stale-code exit, `jit_interp` calls from inline interpreted
//! instructions and slow-path stubs) `Core::st` is complete first, so the
//! interpreter, fault and interrupt delivery, the run loop's attention
//! handling, snapshots and the debugger all see the guest's registers
//! there; after the interpreter ran the mapped registers are reloaded
//! (r12-r15 are callee-saved; r10 and rdi are reloaded, or unmapped and
//! never read). Every block pushes the same callee-saved registers, so chained
//! blocks share the frame of the block the dispatcher called, and `rbp`
//! counts the instructions of the blocks chained from since that call (the
//! epilogue adds it to `Core::icount`). `CpuState::rip` is stored before
//! every call into the interpreter and on every way back to the
//! dispatcher, not when one block chains to the next. The guest's
//! arithmetic flags are where `Loc` says (host RFLAGS, the `JitCtx::fl`
//! slot, or `CpuState::rflags`) and every exit leaves them in `rflags`. An
//! instruction either is translated whole or emits nothing and runs
//! through the interpreter (`jit_interp`). `JitCtx::tlb` points at the fast
//! TLB entries of the current CPL's privilege class wherever generated code
//! runs (set at every entry from the dispatcher and after every instruction
//! the interpreter ran for it), so an inline access that hits its tag is
//! allowed at that CPL.
//!
//! Outside 64-bit mode (`Cg::bits` 32 or 16) the same holds, and: guest
//! GPRs are still kept and handed on as 64-bit values (a 32-bit write
//! zero-extends, as in the interpreter); every memory operand's linear
//! address is computed as the interpreter's `Core::lin` computes it (the
//! offset wrapped at the address size, the segment's base from
//! `Core::st` added, 32 bits kept); a stack access checks SS.B against
//! the stack size the block was compiled for (`Cg::stack`) and goes to
//! its stub when they differ; RIP values (exit targets, `CpuState::rip`)
//! are EIP/IP, the linear address being CS base + RIP; a direct patch
//! site is emitted only for a target in the block's own linear page,
//! judged from the block's first byte's page offset (`Cg::in_own_page`);
//! a link made under an older key is never revalidated in the generated
//! code.

use std::mem::{offset_of, size_of};

use dynasmrt::x64::X64Relocation;
use dynasmrt::{dynasm, DynamicLabel, DynasmApi, DynasmLabelApi, VecAssembler};
use hypervisor::Segment;
use iced_x86::{Code, ConditionCode, Mnemonic};

use super::runtime::{jit_interp, LinkCell, RET_LINKS};
use super::why;
use crate::core::Core;
use crate::cpu::{CR0_EM, CR0_TS, CR4_OSFXSR};
use crate::frontend::decode::Block;
use crate::frontend::uop::{is_jcc, MemOp, Opnd, Uop};
use crate::memory::mmu::{FastEntry, TlbEntry};

// ------------------------------------------------------------------ layout

const fn gpr_off(i: u8) -> i32 {
    (offset_of!(Core, st.gpr) + 8 * i as usize) as i32
}
const OFF_RIP: i32 = offset_of!(Core, st.rip) as i32;
const OFF_RFLAGS: i32 = offset_of!(Core, st.rflags) as i32;
const OFF_CR0: i32 = offset_of!(Core, st.cr0) as i32;
const OFF_CR4: i32 = offset_of!(Core, st.cr4) as i32;
const fn xmm_off(i: u8) -> i32 {
    (offset_of!(Core, st.xmm) + 16 * i as usize) as i32
}
const OFF_FL: i32 = offset_of!(Core, jit.ctx.fl) as i32;
const OFF_TLB: i32 = offset_of!(Core, jit.ctx.tlb) as i32;
const OFF_TLB_FULL: i32 = offset_of!(Core, jit.ctx.tlb_full) as i32;
const OFF_ATTENTION: i32 = offset_of!(Core, jit.ctx.attention) as i32;
const OFF_CUR_BLOCK: i32 = offset_of!(Core, jit.ctx.cur_block) as i32;
const OFF_LAST_CELL: i32 = offset_of!(Core, jit.ctx.last_cell) as i32;
#[cfg(feature = "jit-trips")]
const OFF_TRIP: i32 = offset_of!(Core, jit.ctx.trip) as i32;
const OFF_RET_LINKS: i32 = offset_of!(Core, jit.ctx.ret_links) as i32;
const OFF_ICOUNT: i32 = offset_of!(Core, icount) as i32;
const OFF_COUNTDOWN: i32 = offset_of!(Core, poll_countdown) as i32;
const OFF_HIDDEN_L1ECX: i32 = offset_of!(Core, cpuid.hidden.leaf1_ecx) as i32;
const CELL_KEY: i32 = offset_of!(LinkCell, key) as i32;
const CELL_GEN: i32 = offset_of!(LinkCell, gen) as i32;
const CELL_PHYS: i32 = offset_of!(LinkCell, phys) as i32;
const OFF_LINK_KEY: i32 = offset_of!(Core, jit.ctx.link_key) as i32;
const OFF_GEN: i32 = offset_of!(Core, jit.ctx.gen) as i32;
const OFF_XMASK: i32 = offset_of!(Core, jit.ctx.xmask) as i32;
const OFF_XWANT: i32 = offset_of!(Core, jit.ctx.xwant) as i32;
const CELL_CODE: i32 = offset_of!(LinkCell, code) as i32;
const CELL_TARGET: i32 = offset_of!(LinkCell, target) as i32;
const fn segbase_off(s: usize) -> i32 {
    (offset_of!(Core, st.seg) + s * size_of::<Segment>() + offset_of!(Segment, base)) as i32
}
/// SS.B (the stack address size outside 64-bit mode: 32 bits when set).
const OFF_SS_DB: i32 = (offset_of!(Core, st.seg)
    + crate::cpu::SS * size_of::<Segment>()
    + offset_of!(Segment, db)) as i32;
const TLB_TAG: i32 = offset_of!(TlbEntry, tag) as i32;
const TLB_PHYS: i32 = offset_of!(TlbEntry, phys) as i32;
const TLB_PERM: i32 = offset_of!(TlbEntry, perm) as i32;
const TLBE_SIZE: i32 = size_of::<TlbEntry>() as i32;
const FAST_READ: i32 = offset_of!(FastEntry, read) as i32;
const FAST_WRITE: i32 = offset_of!(FastEntry, write) as i32;
const FAST_ADDEND: i32 = offset_of!(FastEntry, addend) as i32;
const FAST_CODE: i32 = offset_of!(FastEntry, code) as i32;
/// log2 of the size of a `FastEntry` (the inline path indexes by shifting).
const FAST_SHIFT: i32 = size_of::<FastEntry>().trailing_zeros() as i32;
const _: () = assert!(size_of::<FastEntry>() == 1 << FAST_SHIFT);
/// CF PF AF ZF SF OF.
const ARITH: i32 = 0x8d5;
// `Cg::translate` finds page crossings by the tag compare: two adjacent
// pages must index different TLB entries.
const _: () = assert!(crate::memory::mmu::TLB_SIZE >= 2);
// ------------------------------------------------------------------ codegen

type Asm = VecAssembler<X64Relocation>;

/// Where the guest's arithmetic flags are valid.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Loc {
    host: bool,
    slot: bool,
    st: bool,
    /// r11 holds them as a LAHF/SETO image: AH's flag bits in bits 15:8,
    /// OF in bit 0 (how chained blocks hand the flags on, see
    /// `Cg::capture`).
    img: bool,
}

/// Flags only in the r11 image: block entry (both the dispatcher's and a
/// chained one).
const AT_ENTRY: Loc = Loc {
    host: false,
    slot: false,
    st: false,
    img: true,
};

/// Flags only in `rflags`.
const IN_ST: Loc = Loc {
    host: false,
    slot: false,
    st: true,
    img: false,
};

/// The r11-image bits of RFLAGS bits `m` (CF PF AF ZF SF move up 8, OF to
/// bit 0).
const fn img_mask(m: i32) -> i32 {
    ((m & 0xff) << 8) | ((m >> 11) & 1)
}

/// Out-of-line code: the instruction's memory access missed the inline
/// path, so it runs through the interpreter instead.
struct Stub {
    label: DynamicLabel,
    uop: *const Uop,
    index: usize,
    rip: u64,
    /// Flags when the stub is entered (saved, never only in the host).
    entry: Loc,
    /// Flags the fast path has at `resume`.
    after: Loc,
    /// Cached guest registers not yet written back when the stub is entered.
    dirty: u16,
    resume: DynamicLabel,
}

/// The fixed register map: guest GPR -> the host register that holds it in
/// every block (callee-saved REX registers: byte forms never alias AH..BH,
/// none is used as scratch, and `jit_interp` calls keep them). Chained
/// blocks hand these on live: a link needs no write-back in the block that
/// leaves nor a reload in the one entered. RSP, RAX, RDI and RSI: the
/// stack pointer, the return value and the first two arguments of the
/// SysV ABI, which the guest kernel's and its programs' code use
/// everywhere (the hot blocks of the shell loop use all four).
const FIXED: [(u8, u8); 4] = [(4, 12), (0, 13), (7, 14), (6, 15)];

/// The host register that holds the block's most used guest GPR outside
/// `FIXED` (loaded at entry, written back at every exit where it changed:
/// a per-block cache; see `allocate` for more such registers).
const LOCAL_REG: u8 = 10;

/// The host register of the block's second local: RDI, free in generated
/// code except for REP MOVS/STOS (a block with one does without it) and as
/// `jit_interp`'s first argument (the cached registers are written back
/// before that call and reloaded after it, as for r10).
const LOCAL_REG2: u8 = 7;

struct Cg {
    a: Asm,
    loc: Loc,
    stubs: Vec<Stub>,
    epilogue: DynamicLabel,
    /// The stub of the instruction being translated, once it has a memory
    /// access.
    cur_stub: Option<DynamicLabel>,
    cur_entry: Loc,
    /// Guest GPR -> host register holding it for the whole block: the
    /// `FIXED` ones this block keeps there, and its locals.
    map: [Option<u8>; 16],
    /// `FIXED` guest GPRs this block does not keep in their host register
    /// (it addresses AH..BH of them, or a local has the register): stored
    /// to `Core::st` at entry, loaded back into their host register before
    /// each exit.
    spilled: u16,
    /// The `FIXED` guest GPRs in `map` (live in host registers at every
    /// entry and chained exit, newer than `Core::st` unless written back).
    fixed: u16,
    /// Cached guest GPRs whose host register is newer than `Core::st`.
    dirty: u16,
    cur_dirty: u16,
    /// The SSE guard ran earlier in this block.
    sse_ok: bool,
    /// Out-of-line revalidations of links made under an older link key.
    revals: Vec<Reval>,
    /// Per link cell, the offsets of the displacements of its exit's
    /// keyed and direct `jmp rel32` (0: none; see `jit::runtime`).
    sites: Sites,
    /// The block's RIP (EIP or IP outside 64-bit mode) and the offset of
    /// its first byte in its page (of the linear address, CS base added).
    rip: u64,
    page_off: u64,
    /// The block's code size (64, 32 or 16 bits: CS.L/CS.D).
    bits: u32,
    /// The stack address size the block's stack accesses are compiled for
    /// (8 in 64-bit mode; else 4 or 2, SS.B when it was compiled, checked
    /// at each such access).
    stack: u8,
    /// Chained exits count blocks down to the next timed poll (a platform
    /// that does not kick on every event).
    countdown: bool,
    /// The back edge of a block that branches to itself (see
    /// `back_edge`): where its taken Jcc goes, and where the back edge
    /// goes when the core is busy (the taken side's exit).
    back: Option<(DynamicLabel, DynamicLabel)>,
    /// The guest flags are dead at the block start (`flags_dead_at_start`)
    /// and no poll countdown runs: the back edge keeps them in the host
    /// flags instead of capturing them (see `back_edge`).
    loop_keeps_host: bool,
    /// Some instruction runs through the interpreter inline (it may have
    /// changed anything, so the block does not loop to itself).
    interpreted: bool,
}

/// Per link cell of a block, the offsets in its code of the displacements
/// of its exit's keyed and direct `jmp rel32` (0: none).
pub(super) type Sites = [(usize, usize); 2];

/// A chained exit's revalidation, emitted out of line.
struct Reval {
    /// Entry (the key differs; rax holds the current one).
    entry: DynamicLabel,
    /// Back to the exit after the key check.
    ok: DynamicLabel,
    /// The exit's no-link path (the block's count not yet in rbp).
    nolink: DynamicLabel,
    /// The exit's target RIP when it is a constant (else in `rip`).
    target: Option<u64>,
    /// The block's instruction count, added to rbp before the check.
    count: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Acc {
    Read,
    Write,
}

macro_rules! a {
    ($cg:expr; $($t:tt)*) => {
        dynasm!($cg.a ; .arch x64 ; $($t)*)
    };
}

/// `op` on al/ax/eax/rax with cl/cx/ecx/rcx.
macro_rules! op2 {
    ($cg:expr, $size:expr, $op:ident) => {
        match $size {
            1 => a!($cg; $op al, cl),
            2 => a!($cg; $op ax, cx),
            4 => a!($cg; $op eax, ecx),
            _ => a!($cg; $op rax, rcx),
        }
    };
}

/// `op` on al/ax/eax/rax.
macro_rules! op1 {
    ($cg:expr, $size:expr, $op:ident) => {
        match $size {
            1 => a!($cg; $op al),
            2 => a!($cg; $op ax),
            4 => a!($cg; $op eax),
            _ => a!($cg; $op rax),
        }
    };
}

/// `op [rsi], cl/cx/ecx/rcx` (the memory operand already translated).
macro_rules! opm {
    ($cg:expr, $size:expr, $op:ident) => {
        match $size {
            1 => a!($cg; $op BYTE [rsi], cl),
            2 => a!($cg; $op WORD [rsi], cx),
            4 => a!($cg; $op DWORD [rsi], ecx),
            _ => a!($cg; $op QWORD [rsi], rcx),
        }
    };
}

/// `op [rsi]` (INC/DEC of the translated memory operand).
macro_rules! opm1 {
    ($cg:expr, $size:expr, $op:ident) => {
        match $size {
            1 => a!($cg; $op BYTE [rsi]),
            2 => a!($cg; $op WORD [rsi]),
            4 => a!($cg; $op DWORD [rsi]),
            _ => a!($cg; $op QWORD [rsi]),
        }
    };
}

/// Bit test `op` of ax/eax/rax (or of `[rsi]`) by the offset in cx/ecx/rcx
/// (16, 32 or 64 bits; the offset is already inside the operand).
macro_rules! btop {
    ($cg:expr, $size:expr, $mem:expr, $op:ident) => {
        match ($size, $mem) {
            (2, false) => a!($cg; $op ax, cx),
            (4, false) => a!($cg; $op eax, ecx),
            (_, false) => a!($cg; $op rax, rcx),
            (2, true) => a!($cg; $op WORD [rsi], cx),
            (4, true) => a!($cg; $op DWORD [rsi], ecx),
            (_, true) => a!($cg; $op QWORD [rsi], rcx),
        }
    };
}

/// Shift/rotate al/ax/eax/rax by cl.
macro_rules! shift {
    ($cg:expr, $size:expr, $op:ident) => {
        match $size {
            1 => a!($cg; $op al, cl),
            2 => a!($cg; $op ax, cl),
            4 => a!($cg; $op eax, cl),
            _ => a!($cg; $op rax, cl),
        }
    };
}

fn cc_code(cc: ConditionCode) -> Option<u8> {
    use ConditionCode as C;
    Some(match cc {
        C::o => 0,
        C::no => 1,
        C::b => 2,
        C::ae => 3,
        C::e => 4,
        C::ne => 5,
        C::be => 6,
        C::a => 7,
        C::s => 8,
        C::ns => 9,
        C::p => 10,
        C::np => 11,
        C::l => 12,
        C::ge => 13,
        C::le => 14,
        C::g => 15,
        _ => return None,
    })
}

fn reg_off(o: Opnd) -> i32 {
    match o {
        Opnd::Reg { idx, hi } => gpr_off(idx) + hi as i32,
        _ => 0,
    }
}

impl Cg {
    fn new(countdown: bool) -> Cg {
        let mut a = Asm::new(0);
        let epilogue = a.new_dynamic_label();
        Cg {
            a,
            loc: AT_ENTRY,
            stubs: Vec::new(),
            epilogue,
            cur_stub: None,
            cur_entry: AT_ENTRY,
            map: [None; 16],
            spilled: 0,
            fixed: 0,
            dirty: 0,
            cur_dirty: 0,
            sse_ok: false,
            revals: Vec::new(),
            sites: [(0, 0); 2],
            rip: 0,
            page_off: 0,
            bits: 64,
            stack: 8,
            countdown,
            back: None,
            loop_keeps_host: false,
            interpreted: false,
        }
    }

    // ---------------------------------------------------- register cache

    /// Load the block's locals (mapped, not `FIXED`) from `Core::st`
    /// (block entry).
    fn reload_local(&mut self) {
        for g in 0..16u8 {
            if let Some(h) = self.map[g as usize] {
                if self.fixed & (1 << g) == 0 {
                    a!(self; mov Rq(h), QWORD [rbx + gpr_off(g)]);
                }
            }
        }
    }

    /// Load every cached guest register from `Core::st` (after the
    /// interpreter ran an instruction).
    fn reload(&mut self) {
        for g in 0..16u8 {
            if let Some(h) = self.map[g as usize] {
                a!(self; mov Rq(h), QWORD [rbx + gpr_off(g)]);
            }
        }
    }

    /// Store the cached registers in `dirty` back to `Core::st` (no flags).
    fn writeback_code(&mut self, dirty: u16) {
        for g in 0..16u8 {
            if dirty & (1 << g) != 0 {
                if let Some(h) = self.map[g as usize] {
                    a!(self; mov QWORD [rbx + gpr_off(g)], Rq(h));
                }
            }
        }
    }

    /// Make `Core::st` hold every guest register (before a call into the
    /// interpreter).
    fn writeback(&mut self) {
        let d = self.dirty;
        self.writeback_code(d);
        self.dirty = 0;
    }

    /// Store the `FIXED` host registers of the guest GPRs in `mask` to
    /// `Core::st`, whether or not this block mapped them.
    fn store_fixed(&mut self, mask: u16) {
        for (g, h) in FIXED {
            if mask & (1 << g) != 0 {
                a!(self; mov QWORD [rbx + gpr_off(g)], Rq(h));
            }
        }
    }

    /// Load the `FIXED` host registers of the guest GPRs in `mask` from
    /// `Core::st`.
    fn load_fixed(&mut self, mask: u16) {
        for (g, h) in FIXED {
            if mask & (1 << g) != 0 {
                a!(self; mov Rq(h), QWORD [rbx + gpr_off(g)]);
            }
        }
    }

    /// Before an exit (chained or not): the block's locals back to
    /// `Core::st` where they changed, its spilled `FIXED` registers back
    /// into their host registers. Then every `FIXED` host register holds
    /// its guest register, as the successor's chained entry expects, and
    /// `Core::st` holds every other one. The mapped `FIXED` ones stay dirty.
    fn exit_regs(&mut self) {
        let local = self.dirty & !self.fixed;
        self.writeback_code(local);
        self.dirty &= self.fixed;
        let s = self.spilled;
        self.load_fixed(s);
    }

    /// On a way from an exit back to the dispatcher (after `exit_regs`):
    /// `Core::st` gets the mapped `FIXED` registers too.
    fn leave_regs(&mut self) {
        let f = self.fixed;
        self.store_fixed(f);
    }

    /// Guest register `g` (64 bits) into host register `r`.
    fn gq(&mut self, r: u8, g: u8) {
        match self.map[g as usize] {
            Some(h) => a!(self; mov Rq(r), Rq(h)),
            None => a!(self; mov Rq(r), QWORD [rbx + gpr_off(g)]),
        }
    }

    /// CALL's push of its return address `next_ip` (`n` bytes): the slot
    /// below the stack pointer translated for a write (a miss goes to the
    /// stub before anything is written), the address stored, the stack
    /// pointer lowered. Uses rsi and r9 (and what `translate` clobbers);
    /// r8 survives, so an indirect CALL keeps its target there.
    fn push_ret_addr(&mut self, next_ip: u64, n: u8) {
        self.stack_slot(-(n as i32), n, Acc::Write);
        a!(self; mov r9, QWORD next_ip as i64);
        self.st(9, n, Opnd::Mem);
        self.add_sp(-(n as i32));
    }

    /// The stack slot `delta` bytes from the guest's stack pointer,
    /// translated for an `n`-byte access into rsi (`translate`). Outside
    /// 64-bit mode the offset wraps at the stack size the block was
    /// compiled for and SS's base is added; a stack of the other size
    /// (SS.B changed since) goes to the stub, whose interpreter does it
    /// right. Inside a block SS only changes through instructions that
    /// end it, but a block may run again under another SS.
    fn stack_slot(&mut self, delta: i32, n: u8, acc: Acc) {
        if self.bits != 64 {
            self.begin_access();
            let stub = self.stub_label();
            a!(self
                ; cmp BYTE [rbx + OFF_SS_DB], (self.stack == 4) as i8
                ; jne =>stub
            );
        }
        self.gq(6, 4);
        match self.stack {
            8 if delta != 0 => a!(self; lea rsi, [rsi + delta]),
            8 => {}
            s => {
                a!(self; lea esi, [rsi + delta]);
                if s == 2 {
                    a!(self; movzx esi, si);
                }
                a!(self
                    ; mov eax, DWORD [rbx + segbase_off(crate::cpu::SS)]
                    ; lea esi, [rsi + rax]
                );
            }
        }
        self.translate(n, acc);
    }

    /// Move the guest's stack pointer by `delta` at the stack size the
    /// block was compiled for, keeping the bits above it as the
    /// interpreter's `set_sp` does. Only after a `stack_slot` (host flags
    /// already clobbered). Uses r9 and rax.
    fn add_sp(&mut self, delta: i32) {
        self.gq(9, 4);
        match self.stack {
            8 => a!(self; lea r9, [r9 + delta]),
            4 => a!(self
                ; lea eax, [r9 + delta]
                ; shr r9, 32
                ; shl r9, 32
                ; or r9, rax
            ),
            _ => a!(self
                ; lea eax, [r9 + delta]
                ; mov r9w, ax
            ),
        }
        self.sq(4, 9);
    }

    /// Host register `r` (64 bits) into guest register `g`.
    fn sq(&mut self, g: u8, r: u8) {
        match self.map[g as usize] {
            Some(h) => {
                a!(self; mov Rq(h), Rq(r));
                self.dirty |= 1 << g;
            }
            None => a!(self; mov QWORD [rbx + gpr_off(g)], Rq(r)),
        }
    }

    /// The host register caching a register operand, if any.
    fn cached(&self, o: Opnd) -> Option<u8> {
        match o {
            Opnd::Reg { idx, hi: false } => self.map[idx as usize],
            _ => None,
        }
    }

    // -------------------------------------------------------------- flags

    /// Host flags are about to be clobbered: keep the guest's elsewhere.
    /// They go to the r11 image (LAHF/SETO, a few simple instructions)
    /// rather than through PUSHFQ to the slot: PUSHFQ, and the POPFQ that
    /// `need_host` would pay for the slot, are microcoded and slow, and
    /// this runs before nearly every memory access that follows a flag
    /// write (`inc rax; cmp byte [rax], 0`). RAX may hold an operand: kept.
    fn clobber(&mut self) {
        if self.loc.host && !self.loc.slot && !self.loc.st && !self.loc.img {
            a!(self
                ; push rax
                ; lahf
                ; seto al
                ; movzx r11d, ax
                ; pop rax
            );
            self.loc.img = true;
        }
        self.loc.host = false;
    }

    /// The guest flags must be in the host RFLAGS (an instruction reads
    /// them or only changes some of them).
    fn need_host(&mut self) {
        if self.loc.host {
            return;
        }
        if self.loc.img {
            // SAHF sets SF ZF AF PF CF; 0x7f + OF overflows exactly when
            // OF is 1. RAX may hold an operand: kept.
            a!(self
                ; push rax
                ; mov eax, r11d
                ; add al, 0x7f
                ; sahf
                ; pop rax
            );
        } else if self.loc.slot {
            a!(self; push QWORD [rbx + OFF_FL] ; popfq);
        } else {
            // Only in `rflags` (after the interpreter ran an instruction):
            // through the r11 image and SAHF rather than POPFQ (slow), and
            // the image stays valid for the exit's `capture`.
            a!(self; push rax);
            self.img_from(OFF_RFLAGS);
            a!(self
                ; mov eax, r11d
                ; add al, 0x7f
                ; sahf
                ; pop rax
            );
            self.loc.img = true;
        }
        self.loc.host = true;
    }

    /// Only the guest CF must be in the host (the next instruction writes
    /// every other flag): BT from the saved image instead of POPFQ.
    fn need_cf(&mut self) {
        if self.loc.host {
            return;
        }
        if self.loc.img {
            a!(self; bt r11d, 8);
            return;
        }
        let at = if self.loc.slot { OFF_FL } else { OFF_RFLAGS };
        a!(self; bt DWORD [rbx + at], 0);
    }

    /// An instruction just wrote all six flags in the host.
    fn wrote_flags(&mut self) {
        self.loc = Loc {
            host: true,
            slot: false,
            st: false,
            img: false,
        };
    }

    /// Emit code that makes `rflags` hold the flags (clobbers rax, rcx and
    /// the host flags), given they are at `loc`.
    fn flush_code(&mut self, loc: Loc) {
        if loc.st {
            return;
        }
        if loc.img {
            self.img_to_st();
            return;
        }
        if loc.host {
            a!(self; pushfq ; pop rax);
        } else {
            a!(self; mov rax, QWORD [rbx + OFF_FL]);
        }
        a!(self
            ; and eax, ARITH
            ; mov rcx, QWORD [rbx + OFF_RFLAGS]
            ; and rcx, !ARITH
            ; or rcx, rax
            ; mov QWORD [rbx + OFF_RFLAGS], rcx
        );
    }

    fn flush(&mut self) {
        let loc = self.loc;
        self.flush_code(loc);
        self.loc = Loc {
            host: false,
            slot: loc.slot,
            st: true,
            img: loc.img,
        };
    }

    /// `rflags` from the r11 image (clobbers rax, rcx and the host flags).
    fn img_to_st(&mut self) {
        a!(self
            ; mov rax, QWORD [rbx + OFF_RFLAGS]
            ; and rax, !ARITH
            ; mov ecx, r11d
            ; shr ecx, 8
            ; and ecx, 0xd5
            ; or rax, rcx
            ; mov ecx, r11d
            ; and ecx, 1
            ; shl ecx, 11
            ; or rax, rcx
            ; mov QWORD [rbx + OFF_RFLAGS], rax
        );
    }

    /// The r11 image from an RFLAGS image at `[rbx + at]` (clobbers rax
    /// and the host flags).
    fn img_from(&mut self, at: i32) {
        a!(self
            ; mov r11, QWORD [rbx + at]
            ; mov eax, r11d
            ; and eax, 0xd5
            ; shl eax, 8
            ; shr r11d, 11
            ; and r11d, 1
            ; or r11d, eax
        );
    }

    /// Put the flags in the r11 image, where an exit hands them on: a
    /// chained successor starts from it, the no-link path writes it to
    /// `rflags`. Clobbers rax; the host flags stay.
    fn capture(&mut self) {
        if self.loc.img {
            return;
        }
        if self.loc.host {
            a!(self
                ; lahf
                ; seto al
                ; movzx r11d, ax
            );
        } else {
            let at = if self.loc.slot { OFF_FL } else { OFF_RFLAGS };
            self.img_from(at);
        }
        self.loc.img = true;
    }

    /// Code that recreates `want` from flags in `rflags` (after the
    /// interpreter ran an instruction).
    fn restore_code(&mut self, want: Loc) {
        if want.st && !want.host && !want.slot && !want.img {
            return;
        }
        if want.img {
            // r11 did not survive the call.
            self.img_from(OFF_RFLAGS);
        }
        if want.slot || want.host {
            a!(self
                ; mov rax, QWORD [rbx + OFF_RFLAGS]
                ; and eax, ARITH
                ; or eax, 0x202
            );
        }
        if want.slot {
            a!(self; mov QWORD [rbx + OFF_FL], rax);
        }
        if want.host {
            a!(self; push rax ; popfq);
        }
    }

    // ------------------------------------------------------------ memory

    /// Effective address of the memory operand into rsi (clobbers rax; no
    /// flags). `seg`: the linear address, with the FS/GS base added in
    /// 64-bit mode, and outside it the base of the operand's segment
    /// (whatever it is, read from `Core` at run time: one load and a
    /// 32-bit add) and truncated to 32 bits. The interpreter checks no
    /// segment limit or type either (`Core::lin`), so there is nothing to
    /// fault on here.
    fn ea(&mut self, m: &MemOp, seg: bool) {
        let disp = m.disp as i64;
        let small = disp == disp as i32 as i64;
        // A cached base and no index: base + displacement in one LEA.
        let one = match (m.base, m.index) {
            (b, 0xff) if b != 0xff && small => self.map[b as usize & 15],
            _ => None,
        };
        if let Some(h) = one {
            a!(self; lea rsi, [Rq(h) + disp as i32]);
        } else if m.base != 0xff {
            self.gq(6, m.base);
        } else if small {
            a!(self; mov rsi, disp as i32);
        } else {
            a!(self; mov rsi, QWORD disp);
        }
        if m.index != 0xff {
            self.gq(0, m.index);
            match m.scale {
                1 => a!(self; lea rsi, [rsi + rax]),
                2 => a!(self; lea rsi, [rsi + rax * 2]),
                4 => a!(self; lea rsi, [rsi + rax * 4]),
                _ => a!(self; lea rsi, [rsi + rax * 8]),
            }
        }
        if m.base != 0xff && one.is_none() {
            if small {
                if disp != 0 {
                    a!(self; lea rsi, [rsi + disp as i32]);
                }
            } else {
                a!(self; mov rax, QWORD disp ; lea rsi, [rsi + rax]);
            }
        }
        if self.bits != 64 {
            if m.amask == 0xffff {
                a!(self; movzx esi, si);
            }
            if seg {
                // The 32-bit LEA truncates the sum (and zero-extends).
                a!(self
                    ; mov eax, DWORD [rbx + segbase_off(m.seg as usize)]
                    ; lea esi, [rsi + rax]
                );
            } else if m.amask == 0xffff_ffff {
                a!(self; mov esi, esi);
            }
            return;
        }
        if m.amask == 0xffff_ffff {
            a!(self; mov esi, esi);
        } else if m.amask == 0xffff {
            a!(self; movzx esi, si);
        }
        if seg && (m.seg == 4 || m.seg == 5) {
            a!(self; mov rax, QWORD [rbx + segbase_off(m.seg as usize)] ; lea rsi, [rsi + rax]);
        }
    }

    /// The stub label of the current instruction, creating it.
    fn stub_label(&mut self) -> DynamicLabel {
        if let Some(l) = self.cur_stub {
            return l;
        }
        let l = self.a.new_dynamic_label();
        self.cur_stub = Some(l);
        l
    }

    /// Translate the linear address in rsi to a host pointer in rsi, or
    /// go to the instruction's stub. Clobbers rax, rcx and flags.
    ///
    /// TCG's softmmu hit: the fast entry of the current privilege class
    /// (`JitCtx::tlb`) holds, per access kind, a tag equal to the page's
    /// linear address exactly when the access may take this path (RAM,
    /// allowed at this class, a write's dirty bit set: see
    /// `mmu::FastEntry`), and the host addend. A read is 9 host
    /// instructions; a write adds the test of the page's code/dirty-tracking
    /// flag (3), which another vCPU may set at any time.
    fn translate(&mut self, size: u8, acc: Acc) {
        self.begin_access();
        let stub = self.stub_label();
        let tag = if acc == Acc::Write {
            FAST_WRITE
        } else {
            FAST_READ
        };
        a!(self
            ; mov rax, rsi
            ; shr rax, (12 - FAST_SHIFT) as i8
            ; and eax, ((crate::memory::mmu::TLB_SIZE - 1) << FAST_SHIFT) as i32
            ; add rax, QWORD [rbx + OFF_TLB]
        );
        // The tag of the page of the access's last byte: an access that
        // crosses into the next page finds the entry of its first page
        // holding another tag (the two pages index different entries), so
        // it takes the slow path by the same compare.
        if size > 1 {
            a!(self; lea rcx, [rsi + (size as i32 - 1)]);
        } else {
            a!(self; mov rcx, rsi);
        }
        a!(self
            ; and rcx, -4096
            ; cmp QWORD [rax + tag], rcx
            ; jne =>stub
        );
        if acc == Acc::Write {
            a!(self
                ; mov rcx, QWORD [rax + FAST_CODE]
                ; cmp BYTE [rcx], 0
                ; jne =>stub
            );
        }
        a!(self; add rsi, QWORD [rax + FAST_ADDEND]);
    }

    /// Address + translate for the instruction's memory operand.
    fn mem(&mut self, u: &Uop, size: u8, acc: Acc) {
        self.ea(&u.mem, true);
        self.translate(size, acc);
    }

    /// Host flags may be clobbered from here on and the instruction may
    /// leave for its stub: note the state the stub starts from.
    fn begin_access(&mut self) {
        if self.cur_stub.is_none() {
            self.clobber();
            self.cur_entry = self.loc;
            self.cur_dirty = self.dirty;
        } else {
            self.loc.host = false;
        }
    }

    /// SSE may run (CR0.EM/TS clear, CR4.OSFXSR set), else the stub lets
    /// the interpreter raise #UD/#NM. Checked once per block: inside a
    /// block CR0 and CR4 only change through instructions that end it.
    fn sse_guard(&mut self) {
        if self.sse_ok {
            return;
        }
        self.begin_access();
        let stub = self.stub_label();
        a!(self
            ; test DWORD [rbx + OFF_CR0], (CR0_EM | CR0_TS) as i32
            ; jnz =>stub
            ; test DWORD [rbx + OFF_CR4], CR4_OSFXSR as i32
            ; jz =>stub
        );
        self.sse_ok = true;
    }

    // ------------------------------------------------------ operand moves

    /// Load operand `o` (`size` bytes) into host register `r`.
    fn ld(&mut self, r: u8, size: u8, o: Opnd) {
        match o {
            Opnd::Reg { .. } if self.cached(o).is_some() => {
                let h = self.cached(o).unwrap_or(0);
                match size {
                    1 => a!(self; mov Rb(r), Rb(h)),
                    2 => a!(self; mov Rw(r), Rw(h)),
                    4 => a!(self; mov Rd(r), Rd(h)),
                    _ => a!(self; mov Rq(r), Rq(h)),
                }
            }
            Opnd::Reg { .. } => {
                let d = reg_off(o);
                match size {
                    1 => a!(self; mov Rb(r), BYTE [rbx + d]),
                    2 => a!(self; mov Rw(r), WORD [rbx + d]),
                    4 => a!(self; mov Rd(r), DWORD [rbx + d]),
                    _ => a!(self; mov Rq(r), QWORD [rbx + d]),
                }
            }
            Opnd::Mem => match size {
                1 => a!(self; mov Rb(r), BYTE [rsi]),
                2 => a!(self; mov Rw(r), WORD [rsi]),
                4 => a!(self; mov Rd(r), DWORD [rsi]),
                _ => a!(self; mov Rq(r), QWORD [rsi]),
            },
            Opnd::Imm(v) => {
                let v = v & crate::cpu::mask(size);
                if size == 8 && v as i64 != v as i32 as i64 {
                    a!(self; mov Rq(r), QWORD v as i64);
                } else if size == 8 {
                    a!(self; mov Rq(r), v as i32);
                } else {
                    a!(self; mov Rd(r), v as u32 as i32);
                }
            }
            Opnd::None => a!(self; xor Rd(r), Rd(r)),
        }
    }

    /// Store host register `r` to operand `o`.
    fn st(&mut self, r: u8, size: u8, o: Opnd) {
        match o {
            Opnd::Reg { idx, .. } if self.cached(o).is_some() => {
                let h = self.cached(o).unwrap_or(0);
                // A 32-bit write zero-extends, as in the guest.
                match size {
                    1 => a!(self; mov Rb(h), Rb(r)),
                    2 => a!(self; mov Rw(h), Rw(r)),
                    4 => a!(self; mov Rd(h), Rd(r)),
                    _ => a!(self; mov Rq(h), Rq(r)),
                }
                self.dirty |= 1 << idx;
            }
            Opnd::Reg { .. } => {
                let d = reg_off(o);
                match size {
                    1 => a!(self; mov BYTE [rbx + d], Rb(r)),
                    2 => a!(self; mov WORD [rbx + d], Rw(r)),
                    4 => a!(self
                        ; mov DWORD [rbx + d], Rd(r)
                        ; mov DWORD [rbx + d + 4], 0
                    ),
                    _ => a!(self; mov QWORD [rbx + d], Rq(r)),
                }
            }
            Opnd::Mem => match size {
                1 => a!(self; mov BYTE [rsi], Rb(r)),
                2 => a!(self; mov WORD [rsi], Rw(r)),
                4 => a!(self; mov DWORD [rsi], Rd(r)),
                _ => a!(self; mov QWORD [rsi], Rq(r)),
            },
            _ => {}
        }
    }

    /// Exit to the successor whose link cell is in rdx, flags captured in
    /// r11 (`capture`): `to` is the cell's index in the block and the
    /// successor's RIP when that is a constant, else (None, a cell of the
    /// dynamic table) `rip` holds it already. Follows the link when the
    /// dispatcher would go straight on to that block (the core's attention
    /// word clear, which every kick, platform event and poll request sets;
    /// on a platform without a timer source also no poll due by the block
    /// countdown) and the link holds (same link key, or revalidated
    /// against the TLB out of line, see `jit::runtime`), handing the
    /// successor the flags in r11 and the block's instructions added to
    /// the count in rbp; else stores `rip`, writes the flags to `rflags`
    /// and returns with the cell noted. A chained successor does not need
    /// `rip`: every way out of its code stores its own (its stale-code
    /// exit included).
    ///
    /// A constant target has a keyed patch site (`jump_site`) after the
    /// key check, in front of the jump through the cell, and if it lies in
    /// the block's own virtual page and nothing in the block ran through
    /// the interpreter, a direct one before the key check (see
    /// `jit::runtime` for when each is patched). Unpatched, each jumps to
    /// the next instruction.
    ///
    /// An interrupt shadow or HLT cannot be pending here: the instructions
    /// that set them end the block through the interpreter's exit.
    fn chain_exit(&mut self, count: usize, to: Option<(usize, u64)>) {
        // A dynamic exit (no constant target) did this before its lookup.
        if to.is_some() {
            self.exit_regs();
        }
        let e = self.epilogue;
        let nolink = self.a.new_dynamic_label();
        let entry = self.a.new_dynamic_label();
        let ok = self.a.new_dynamic_label();
        self.revals.push(Reval {
            entry,
            ok,
            nolink,
            target: to.map(|(_, t)| t),
            count,
        });
        // Where a busy core leaves: the no-link path, through a note of the
        // cause in a `jit-trips` build.
        let noted = cfg!(feature = "jit-trips");
        let busy = if noted {
            self.a.new_dynamic_label()
        } else {
            nolink
        };
        self.go_on_or(busy, count);
        if let Some((k, t)) = to {
            if self.in_own_page(t) && !self.interpreted {
                self.sites[k].1 = self.jump_site();
            }
        }
        a!(self
            ; mov rax, QWORD [rbx + OFF_LINK_KEY]
            ; cmp rax, QWORD [rdx + CELL_KEY]
            ; jne =>entry
            ; =>ok
        );
        if let Some((k, _)) = to {
            self.sites[k].0 = self.jump_site();
        }
        a!(self
            ; jmp QWORD [rdx + CELL_CODE]
            ; =>nolink
        );
        self.leave_regs();
        if let Some((_, t)) = to {
            self.set_rip(t);
        }
        self.img_to_st();
        a!(self
            ; mov QWORD [rbx + OFF_LAST_CELL], rdx
            ; mov eax, count as i32
            ; jmp =>e
        );
        if noted {
            a!(self; =>busy);
            self.trip(why::BUSY);
            a!(self; jmp =>nolink);
        }
    }

    /// Whether RIP `t` lies in the block's own linear page. Outside 64-bit
    /// mode the linear address is CS base + `t`, and the base need not be
    /// page aligned: measured from the block's first byte, whose offset in
    /// its page is the same under any base the block runs with (it is
    /// keyed by its physical address).
    fn in_own_page(&self, t: u64) -> bool {
        let at = self.page_off as i64 + t.wrapping_sub(self.rip) as i64;
        (0..4096).contains(&at)
    }

    /// The test every chained exit and back edge makes before it goes on
    /// in compiled code: to `busy` when the core's attention word is set
    /// (or, on a platform without a timer source, the poll countdown has
    /// run out, else it is counted down); otherwise the `count`
    /// instructions just run go to the count in rbp. Clobbers rax and the
    /// host flags.
    fn go_on_or(&mut self, busy: DynamicLabel, count: usize) {
        a!(self
            ; mov rax, QWORD [rbx + OFF_ATTENTION]
            ; cmp BYTE [rax], 0
            ; jne =>busy
        );
        if self.countdown {
            a!(self
                ; cmp DWORD [rbx + OFF_COUNTDOWN], 0
                ; je =>busy
                ; dec DWORD [rbx + OFF_COUNTDOWN]
            );
        }
        a!(self; add rbp, count as i32);
    }

    /// Note why the code goes back to the dispatcher (a `jit-trips` build;
    /// nothing otherwise). No flags or registers change.
    fn trip(&mut self, cause: u8) {
        #[cfg(feature = "jit-trips")]
        a!(self; mov BYTE [rbx + OFF_TRIP], cause as i8);
        let _ = cause;
    }

    /// A `jmp rel32` to the next instruction, for `jit::runtime::link` to
    /// patch: the offset of its displacement.
    fn jump_site(&mut self) -> usize {
        let at = self.a.offset().0 + 1;
        self.a.extend([0xe9, 0, 0, 0, 0]);
        at
    }

    /// The out-of-line revalidations of `chain_exit`: the cell in rdx was
    /// made under another link key (rax holds the current one). It holds if
    /// its code is from the current arena generation and the TLB entry of
    /// the target page maps the recorded physical page with execute
    /// permission at this CPL; then it takes the current key. Else the
    /// exit's count comes off rbp again (and the poll countdown is given
    /// back) on the way to its no-link path. Outside 64-bit mode it never
    /// holds: the target's linear address depends on the CS base, which
    /// the cell does not record (a new CS base or code size changes the
    /// link key, see `Core::note_code_mode`), so the dispatcher links
    /// again.
    fn emit_revals(&mut self) {
        for r in std::mem::take(&mut self.revals) {
            let fail = self.a.new_dynamic_label();
            a!(self; =>r.entry);
            // Outside 64-bit mode the entry is the failure path.
            if self.bits == 64 {
                a!(self
                    ; mov rcx, QWORD [rbx + OFF_GEN]
                    ; cmp rcx, QWORD [rdx + CELL_GEN]
                    ; jne =>fail
                );
                match r.target {
                    Some(t) => a!(self; mov rcx, QWORD t as i64),
                    None => a!(self; mov rcx, QWORD [rbx + OFF_RIP]),
                }
                a!(self
                    ; mov rsi, rcx
                    ; shr rsi, 12
                    ; and esi, (crate::memory::mmu::TLB_SIZE - 1) as i32
                    ; imul esi, esi, TLBE_SIZE
                    ; add rsi, QWORD [rbx + OFF_TLB_FULL]
                    ; and rcx, -4096
                    ; or rcx, 1
                    ; cmp QWORD [rsi + TLB_TAG], rcx
                    ; jne =>fail
                    ; mov rcx, QWORD [rsi + TLB_PHYS]
                    ; cmp rcx, QWORD [rdx + CELL_PHYS]
                    ; jne =>fail
                    ; mov cl, BYTE [rsi + TLB_PERM]
                    ; and cl, BYTE [rbx + OFF_XMASK]
                    ; cmp cl, BYTE [rbx + OFF_XWANT]
                    ; jne =>fail
                    ; mov QWORD [rdx + CELL_KEY], rax
                    ; jmp =>r.ok
                );
            }
            a!(self
                ; =>fail
                ; sub rbp, r.count as i32
            );
            if self.countdown {
                a!(self; inc DWORD [rbx + OFF_COUNTDOWN]);
            }
            self.trip(why::UNLINKED);
            a!(self; jmp =>r.nolink);
        }
    }

    /// Exit to the computed target in `rip` (RET, indirect JMP/CALL),
    /// flags captured: the target is looked up in the core's table of
    /// dynamic link cells (filled by the dispatcher, like any link) and
    /// followed like a direct link when the cell holds that target.
    fn dynamic_exit(&mut self, count: usize) {
        self.exit_regs();
        let e = self.epilogue;
        a!(self
            ; mov rax, QWORD [rbx + OFF_RIP]
            ; mov rcx, rax
            ; shr rcx, 12
            ; xor rcx, rax
            ; and ecx, (RET_LINKS - 1) as i32
            ; imul ecx, ecx, size_of::<LinkCell>() as i32
            ; mov rdx, QWORD [rbx + OFF_RET_LINKS]
            ; add rdx, rcx
            ; cmp rax, QWORD [rdx + CELL_TARGET]
            ; je >same
        );
        self.trip(why::DYN_MISS);
        self.leave_regs();
        self.img_to_st();
        a!(self
            ; mov QWORD [rbx + OFF_LAST_CELL], rdx
            ; mov eax, count as i32
            ; jmp =>e
            ; same:
        );
        self.chain_exit(count, None);
    }

    /// The back edge of a block that branches to itself, emitted in front
    /// of the body's first instruction (after the register cache was
    /// loaded; the entry jumps past it): its Jcc's taken side jumps here.
    /// When the dispatcher would go straight on (attention clear, no timed
    /// poll due) the iteration's instructions go to the count in rbp and
    /// the body starts again with the cached registers live in their host
    /// registers (all of them count as dirty from entry on, so nothing is
    /// stored); else it goes to `busy`, the taken side's chained exit, as
    /// the Jcc would have. Nothing else is checked:
    ///
    /// - the link key cannot have changed: no instruction of the block ran
    ///   through the interpreter inline, and a slow-path access (a TLB
    ///   fill, MMIO, a code write) changes neither the TLB epoch nor the
    ///   CPL without ending the block;
    /// - the code pages: this vCPU's own writes to a code page go through
    ///   a stub (the inline write path sends every access to a code page
    ///   there), which ends the block (`code_written`), and a stub of a
    ///   looping block that finds the block's pages changed after the
    ///   interpreter ran (a page walk's A/D bits) raises the attention
    ///   word (`gen_block`); another vCPU's or a device's write is seen at
    ///   the next attention (an interrupt, a kick, the timer thread), which
    ///   is what cross-modifying code may expect without the executing
    ///   CPU serialising itself, and the dispatcher then checks the pages.
    ///
    /// With `loop_keeps_host` the guest flags are dead at the block start,
    /// so the back edge needs them nowhere but on the way to `busy`: the
    /// Jcc leaves them in the host flags and this path tests the
    /// attention word without touching them (JRCXZ); `busy` captures them.
    /// Otherwise the Jcc captured them into r11, which the body starts
    /// from, and the tests may clobber the host flags.
    fn back_edge(&mut self, count: usize) -> DynamicLabel {
        let back = self.a.new_dynamic_label();
        let busy = self.a.new_dynamic_label();
        let again = self.a.new_dynamic_label();
        a!(self
            ; jmp =>again
            ; =>back
        );
        if self.loop_keeps_host {
            a!(self
                ; mov rcx, QWORD [rbx + OFF_ATTENTION]
                ; movzx ecx, BYTE [rcx]
                ; lea rbp, [rbp + count as i32]
                ; jrcxz =>again
                ; lea rbp, [rbp - count as i32]
                ; jmp =>busy
            );
        } else {
            self.go_on_or(busy, count);
        }
        a!(self; =>again);
        self.back = Some((back, busy));
        again
    }

    /// `j<cc> label` (a rel32 jump).
    fn jcc_to(&mut self, cc: u8, l: DynamicLabel) {
        match cc & 15 {
            0 => a!(self; jo =>l),
            1 => a!(self; jno =>l),
            2 => a!(self; jb =>l),
            3 => a!(self; jae =>l),
            4 => a!(self; je =>l),
            5 => a!(self; jne =>l),
            6 => a!(self; jbe =>l),
            7 => a!(self; ja =>l),
            8 => a!(self; js =>l),
            9 => a!(self; jns =>l),
            10 => a!(self; jp =>l),
            11 => a!(self; jnp =>l),
            12 => a!(self; jl =>l),
            13 => a!(self; jge =>l),
            14 => a!(self; jle =>l),
            _ => a!(self; jg =>l),
        }
    }

    fn cell(&mut self, block: &Block, k: usize, target: u64) {
        block.links[k].target.set(target);
        let p = &block.links[k] as *const LinkCell as i64;
        a!(self; mov rdx, QWORD p);
    }

    fn set_rip(&mut self, rip: u64) {
        a!(self
            ; mov rax, QWORD rip as i64
            ; mov QWORD [rbx + OFF_RIP], rax
        );
    }

    /// Run uop `index` through the interpreter, inline.
    fn interp(&mut self, u: &Uop, index: usize, rip: u64) {
        self.flush();
        self.writeback();
        self.call_interp(u, index, rip);
        self.reload();
        self.loc = IN_ST;
    }

    /// Call `jit_interp`; returns through the epilogue on an exit.
    fn call_interp(&mut self, u: &Uop, index: usize, rip: u64) {
        let e = self.epilogue;
        self.set_rip(rip);
        a!(self
            ; mov rdi, rbx
            ; mov rsi, QWORD u as *const Uop as i64
            ; mov edx, index as i32
            ; mov rax, QWORD jit_interp as *const () as i64
            ; call rax
            ; test rax, rax
            ; jnz =>e
        );
    }
}

/// Which guest GPRs the block keeps in host registers, and which `FIXED`
/// ones it spills: every `FIXED` one it can keep in its host register (not
/// one that some instruction addresses as AH/CH/DH/BH: those bytes are
/// only reachable in `Core::st`, so such a one is spilled), and its most
/// used other ones as locals: the first in `LOCAL_REG`, the second in
/// `LOCAL_REG2` (unless a REP MOVS/STOS needs it), more in the host
/// registers of `FIXED` ones the block spills or does not use (spilled on
/// demand). A spill costs a store at entry and a load at each exit, a
/// local a load at entry and a store at exits where it changed, so more
/// than one local is taken only where it pays: in a block that loops to
/// itself (paid once per run of the loop), or for a register used at least
/// `MIN_USES` times.
fn allocate(block: &Block, self_loop: bool) -> ([Option<u8>; 16], u16) {
    const MIN_USES: u32 = 4;
    let mut uses = [0u32; 16];
    let mut banned = [false; 16];
    for u in &block.uops {
        for o in u.ops {
            match o {
                Opnd::Reg { idx, hi: true } => banned[idx as usize & 15] = true,
                Opnd::Reg { idx, hi: false } => uses[idx as usize & 15] += 1,
                Opnd::Mem => {
                    for r in [u.mem.base, u.mem.index] {
                        if r < 16 {
                            uses[r as usize] += 1;
                        }
                    }
                }
                _ => {}
            }
        }
        use Mnemonic as M;
        match u.insn.mnemonic() {
            M::Push | M::Pop | M::Call | M::Ret => uses[4] += 2,
            M::Mul | M::Cqo | M::Cdqe => uses[0] += 1,
            _ => {}
        }
    }
    let mut map = [None; 16];
    let mut spilled = 0u16;
    // Host registers free for locals: LOCAL_REG, RDI unless a REP string
    // instruction needs it, then those of spilled `FIXED` registers, then
    // those of unused ones.
    let mut free = vec![LOCAL_REG];
    if !block.uops.iter().any(is_rep_string) {
        free.push(LOCAL_REG2);
    }
    let mut unused = Vec::new();
    for (g, h) in FIXED {
        if banned[g as usize] {
            spilled |= 1 << g;
            free.push(h);
        } else if uses[g as usize] == 0 {
            unused.push((g, h));
        }
    }
    let mut order: Vec<usize> = (0..16)
        .filter(|&g| uses[g] > 0 && !banned[g] && !FIXED.iter().any(|&(f, _)| f as usize == g))
        .collect();
    order.sort_by_key(|&g| (std::cmp::Reverse(uses[g]), g));
    let mut unused = unused.into_iter();
    for (n, g) in order.into_iter().enumerate() {
        if n > 0 && !self_loop && uses[g] < MIN_USES {
            break;
        }
        let h = match free.get(n) {
            Some(&h) => h,
            None => match unused.next() {
                Some((f, h)) => {
                    spilled |= 1 << f;
                    h
                }
                None => break,
            },
        };
        map[g] = Some(h);
    }
    for (g, h) in FIXED {
        if spilled & (1 << g) == 0 {
            map[g as usize] = Some(h);
        }
    }
    (map, spilled)
}

/// True if the block writes every arithmetic flag before anything could
/// read the guest's flags as they were at its start: its instructions up
/// to the first that writes all six from its operands alone (ALU, NEG,
/// two- and three-operand IMUL, a shift by a non-zero immediate) touch no
/// flag and no memory (no access, so no stub or fault, can come before),
/// and that one has no memory operand either. Conservative: anything not
/// listed counts as a read. Used for a block that loops to itself (only
/// when no instruction of it runs through the interpreter inline, so each
/// listed one is translated as the same host instruction).
fn flags_dead_at_start(block: &Block) -> bool {
    use Mnemonic as M;
    for u in &block.uops {
        let m = u.insn.mnemonic();
        let nops = u.insn.op_count() as usize;
        let mem = u.ops[..nops.min(3)].contains(&Opnd::Mem);
        if u.lock {
            return false;
        }
        match m {
            M::Lea => {}
            _ if mem => return false,
            M::Add | M::Or | M::And | M::Sub | M::Xor | M::Cmp | M::Test if nops == 2 => {
                return true
            }
            M::Neg if nops == 1 => return true,
            M::Imul if nops >= 2 => return true,
            M::Shl | M::Sal | M::Shr | M::Sar if nops == 2 => {
                let cmask = if u.size == 8 { 63 } else { 31 };
                return matches!(u.ops[1], Opnd::Imm(c) if c & cmask != 0);
            }
            M::Mov | M::Movzx | M::Movsx | M::Movsxd | M::Nop if nops <= 2 => {}
            _ => return false,
        }
    }
    false
}

/// The code, the offset of the chained entry point, and per link cell the
/// offsets of its exit's patch sites (keyed, direct; 0: none).
/// `countdown`: see `Cg::countdown`; `allow_loop`: a block whose last
/// branch targets its own start may jump back to its body without leaving
/// its code (not while tracing, which prints every block start, nor while
/// a host debugger is armed, whose breakpoints are checked at block starts).
pub(super) fn gen_block(
    block: &Block,
    stack: u8,
    countdown: bool,
    allow_loop: bool,
) -> Option<(Vec<u8>, usize, Sites)> {
    let mut cg = Cg::new(countdown);
    cg.bits = block.bits;
    cg.stack = if block.bits == 64 { 8 } else { stack };
    // A block whose last instruction is a Jcc back to its start (it may
    // loop inside its code, see `Cg::self_loop`).
    let loops = allow_loop
        && block.uops.last().is_some_and(|u| {
            is_jcc(u.insn.mnemonic())
                && is_near_rel(&u.insn)
                && u.insn.near_branch_target() == block.rip
        });
    let (map, spilled) = allocate(block, loops);
    cg.map = map;
    cg.spilled = spilled;
    cg.fixed = FIXED
        .iter()
        .filter(|&&(g, _)| map[g as usize].is_some())
        .fold(0, |m, &(g, _)| m | 1 << g);
    cg.rip = block.rip;
    cg.page_off = block.phys & 0xfff;
    let body = cg.a.new_dynamic_label();
    let chain = cg.a.new_dynamic_label();
    let stale_chained = cg.a.new_dynamic_label();
    // Every block saves the same registers, so chained code (which jumps
    // past this) shares the frame of the block the dispatcher called.
    // rbp counts the instructions of the blocks chained to since the
    // dispatcher's call (added to `Core::icount` on the way out: a register
    // add per link instead of a read-modify-write of memory, which chained
    // blocks would serialise on). 8 more bytes keep calls 16-byte aligned.
    a!(cg
        ; push rbx
        ; push rbp
        ; push r12
        ; push r13
        ; push r14
        ; push r15
        ; sub rsp, 8
        ; mov rbx, rdi
        ; xor ebp, ebp
    );
    // The dispatcher settled the flags in `rflags`; chained code passes
    // them in r11 (see `Cg::capture`): start from the same image. It also
    // wrote every register to `Core::st`; chained code passes the `FIXED`
    // ones in their host registers: load them.
    cg.img_from(OFF_RFLAGS);
    cg.load_fixed(FIXED.iter().fold(0, |m, &(g, _)| m | 1 << g));
    a!(cg
        ; jmp =>body
        ; =>chain
    );
    // Entered from another block's code: the code pages must be unchanged
    // (the dispatcher's block lookup checks the same).
    for &(p, g) in block.page_gens() {
        a!(cg
            ; mov rax, QWORD p as i64
            ; cmp DWORD [rax], g as i32
            ; jne =>stale_chained
        );
    }
    a!(cg; =>body);
    // The `FIXED` registers this block spills go to `Core::st`, where its
    // code reads and writes them; its locals come from there (into r10,
    // rdi and the spilled ones' host registers). The mapped `FIXED` ones may be
    // newer than `Core::st` (a chained predecessor changed them): dirty;
    // in a block that loops to itself the locals count as dirty too.
    cg.store_fixed(spilled);
    cg.reload_local();
    cg.dirty = cg.fixed;
    if loops {
        // Every cached register is dirty from here on, so the back edge
        // stores nothing.
        cg.dirty = map
            .iter()
            .enumerate()
            .filter(|(_, h)| h.is_some())
            .fold(0, |m, (g, _)| m | 1 << g);
        cg.loop_keeps_host = !countdown && flags_dead_at_start(block);
        cg.back_edge(block.uops.len());
    }
    let n = block.uops.len();
    let mut translated = 0;
    let mut ended = false;
    for (i, u) in block.uops.iter().enumerate() {
        let rip = if i == 0 {
            block.rip
        } else {
            block.uops[i - 1].next_ip
        };
        cg.cur_stub = None;
        let before = cg.a.offset();
        match insn(&mut cg, block, u, i, n) {
            Some(Done::Next) => translated += 1,
            Some(Done::Exited) => {
                translated += 1;
                ended = true;
            }
            None => {
                if cg.cur_stub.is_some() || cg.a.offset() != before {
                    // A translator bailed after emitting code: cannot happen
                    // by construction, but never run half an instruction.
                    return None;
                }
                cg.interp(u, i, rip);
                cg.interpreted = true;
            }
        }
        if let Some(label) = cg.cur_stub.take() {
            let resume = cg.a.new_dynamic_label();
            a!(cg; =>resume);
            cg.stubs.push(Stub {
                label,
                uop: u,
                index: i,
                rip,
                entry: cg.cur_entry,
                after: cg.loc,
                dirty: cg.cur_dirty,
                resume,
            });
        }
        if ended {
            break;
        }
    }
    if translated == 0 {
        return None;
    }
    if !ended {
        // Fell off the end (the block stopped at an instruction that falls
        // through, or an interpreted one that let it continue).
        cg.capture();
        let next = block.uops.last().map(|u| u.next_ip).unwrap_or(block.rip);
        cg.cell(block, 1, next);
        cg.chain_exit(n, Some((1, next)));
    }
    if let Some((_, busy)) = cg.back.take() {
        // The block does not loop after all (an instruction ran through the
        // interpreter): its back edge is never reached.
        a!(cg; =>busy ; ud2);
    }
    let looped = loops && !cg.interpreted;
    let e = cg.epilogue;
    // Every way out of this block's code (to the dispatcher; a chained
    // jump goes on into the next block's code instead) passes here, so the
    // dispatcher learns which block ran last without a store at every
    // chained entry. RAX holds the instruction count.
    a!(cg
        ; =>e
        ; mov rcx, QWORD block as *const Block as i64
        ; mov QWORD [rbx + OFF_CUR_BLOCK], rcx
        ; add QWORD [rbx + OFF_ICOUNT], rbp
        ; add rsp, 8
        ; pop r15
        ; pop r14
        ; pop r13
        ; pop r12
        ; pop rbp
        ; pop rbx
        ; ret
        ; =>stale_chained
    );
    // Entered from a chained exit: every `FIXED` register is live in the
    // host only.
    cg.store_fixed(FIXED.iter().fold(0, |m, &(g, _)| m | 1 << g));
    // Back to the dispatcher, which decodes the block again; the link is
    // made again to the new translation. Chained code does not store the
    // RIP it goes to: this block's is stored here.
    cg.set_rip(block.rip);
    cg.trip(why::STALE);
    cg.img_to_st();
    a!(cg
        ; mov QWORD [rbx + OFF_LAST_CELL], rdx
        ; xor eax, eax
        ; jmp =>e
    );
    cg.emit_revals();
    for s in std::mem::take(&mut cg.stubs) {
        a!(cg; =>s.label);
        cg.flush_code(s.entry);
        cg.writeback_code(s.dirty);
        // SAFETY: the uop lives in the block, which outlives its code.
        let u = unsafe { &*s.uop };
        cg.call_interp(u, s.index, s.rip);
        if looped {
            // The back edge does not check the code pages: a write to them
            // that did not end the block (a page walk's A/D bits) raises
            // the attention word, so the loop leaves at its back edge.
            let same = cg.a.new_dynamic_label();
            let changed = cg.a.new_dynamic_label();
            for &(p, g) in block.page_gens() {
                a!(cg
                    ; mov rax, QWORD p as i64
                    ; cmp DWORD [rax], g as i32
                    ; jne =>changed
                );
            }
            a!(cg
                ; jmp =>same
                ; =>changed
                ; mov rax, QWORD [rbx + OFF_ATTENTION]
                ; mov BYTE [rax], 1
                ; =>same
            );
        }
        // The interpreter may have changed any register; the fast path
        // goes on from `resume` with the cached ones in host registers.
        cg.reload();
        cg.restore_code(s.after);
        let r = s.resume;
        a!(cg; jmp =>r);
    }
    let chain = cg.a.labels().resolve_dynamic(chain).ok()?.0;
    let sites = cg.sites;
    Some((cg.a.finalize().ok()?, chain, sites))
}

enum Done {
    /// Continue with the next instruction.
    Next,
    /// The code exits (branch at the block end).
    Exited,
}

/// INC, DEC, NEG or NOT (`m`) around `emit`, which emits the host
/// instruction of that name: INC and DEC keep CF, so the guest's CF must
/// be in the host flags first; all but NOT write the flags.
fn unary(cg: &mut Cg, m: Mnemonic, emit: impl FnOnce(&mut Cg)) {
    if matches!(m, Mnemonic::Inc | Mnemonic::Dec) {
        cg.need_cf();
    }
    emit(cg);
    if m != Mnemonic::Not {
        cg.wrote_flags();
    }
}

fn is_gpr_or_imm(o: Opnd) -> bool {
    matches!(o, Opnd::Reg { .. } | Opnd::Imm(_))
}

/// Translate one instruction, or None (nothing emitted) to interpret it.
fn insn(cg: &mut Cg, block: &Block, u: &Uop, i: usize, n: usize) -> Option<Done> {
    use Mnemonic as M;
    let insn = &u.insn;
    let m = insn.mnemonic();
    let size = u.size;
    let [o0, o1, o2] = u.ops;
    if let Some(done) = extra(cg, u) {
        return Some(done);
    }
    if u.lock {
        return None;
    }
    if let Some(done) = sse(cg, u) {
        return Some(done);
    }
    if matches!(
        m,
        M::Nop
            | M::Endbr64
            | M::Pause
            | M::Lfence
            | M::Sfence
            | M::Prefetch
            | M::Prefetchw
            | M::Prefetchnta
            | M::Prefetcht0
            | M::Prefetcht1
            | M::Prefetcht2
            | M::Clflush
            | M::Clflushopt
    ) {
        // No operand is accessed (a multi-byte NOP's memory operand is
        // never read); the interpreter runs the load/store fences, the
        // prefetches and the cache flushes as nothing too (the engine's
        // stores are the host's, already ordered as x86 orders them).
        return Some(Done::Next);
    }
    if m == M::Mfence {
        // Store-load ordering against the other vCPU threads.
        a!(cg; mfence);
        return Some(Done::Next);
    }
    let branch = matches!(
        m,
        M::Call | M::Ret | M::Jmp | M::Loop | M::Jcxz | M::Jecxz | M::Jrcxz
    ) || is_jcc(m);
    // CDQE/CQO have no explicit operand (no operand size in the uop).
    if !branch && !matches!(m, M::Cdqe | M::Cqo) && !matches!(size, 1 | 2 | 4 | 8) {
        return None;
    }
    // Operands must be resolved (the uop builder leaves them None if an
    // operand is not a GPR, memory or immediate).
    let nops = insn.op_count() as usize;
    if !branch && u.ops[..nops.min(3)].contains(&Opnd::None) {
        return None;
    }
    let has_mem = o0 == Opnd::Mem || o1 == Opnd::Mem || o2 == Opnd::Mem;
    if let Some(done) = direct(cg, u) {
        return Some(done);
    }
    match m {
        M::Mov if nops == 2 => {
            if has_mem {
                cg.mem(
                    u,
                    size,
                    if o0 == Opnd::Mem {
                        Acc::Write
                    } else {
                        Acc::Read
                    },
                );
            }
            cg.ld(0, size, o1);
            cg.st(0, size, o0);
            Some(Done::Next)
        }
        M::Add | M::Or | M::Adc | M::Sbb | M::And | M::Sub | M::Xor | M::Cmp | M::Test
            if nops == 2 =>
        {
            let writes = !matches!(m, M::Cmp | M::Test);
            if has_mem {
                let acc = if writes && o0 == Opnd::Mem {
                    Acc::Write
                } else {
                    Acc::Read
                };
                cg.mem(u, size, acc);
            }
            cg.ld(0, size, o0);
            cg.ld(1, size, o1);
            match m {
                M::Adc | M::Sbb => cg.need_cf(),
                _ => {}
            }
            match m {
                M::Add => op2!(cg, size, add),
                M::Or => op2!(cg, size, or),
                M::Adc => op2!(cg, size, adc),
                M::Sbb => op2!(cg, size, sbb),
                M::And => op2!(cg, size, and),
                M::Sub => op2!(cg, size, sub),
                M::Xor => op2!(cg, size, xor),
                M::Cmp => op2!(cg, size, cmp),
                _ => op2!(cg, size, test),
            }
            cg.wrote_flags();
            if writes {
                cg.st(0, size, o0);
            }
            Some(Done::Next)
        }
        M::Inc | M::Dec | M::Neg | M::Not if nops == 1 => {
            if has_mem {
                cg.mem(u, size, Acc::Write);
            }
            cg.ld(0, size, o0);
            unary(cg, m, |cg| match m {
                M::Inc => op1!(cg, size, inc),
                M::Dec => op1!(cg, size, dec),
                M::Neg => op1!(cg, size, neg),
                _ => op1!(cg, size, not),
            });
            cg.st(0, size, o0);
            Some(Done::Next)
        }
        M::Shl | M::Sal | M::Shr | M::Sar | M::Rol | M::Ror | M::Rcl | M::Rcr if nops == 2 => {
            // Count: an immediate or CL.
            match o1 {
                Opnd::Imm(_) => {}
                Opnd::Reg { idx: 1, hi: false } => {}
                _ => return None,
            }
            if has_mem {
                cg.mem(u, size, Acc::Write);
            }
            cg.ld(0, size, o0);
            match o1 {
                Opnd::Imm(c) => a!(cg; mov cl, c as u8 as i8),
                _ => match cg.map[1] {
                    Some(h) => a!(cg; mov cl, Rb(h)),
                    None => a!(cg; mov cl, BYTE [rbx + gpr_off(1)]),
                },
            }
            // A zero count changes no flag, rotates keep SF/ZF/PF/AF: start
            // from the guest's. A non-zero immediate SHL/SHR/SAR count sets
            // every defined flag from the operands alone (AF, and OF beyond
            // a count of 1, are undefined).
            let cmask = if size == 8 { 63 } else { 31 };
            let fresh = matches!(o1, Opnd::Imm(c) if c & cmask != 0)
                && matches!(m, M::Shl | M::Sal | M::Shr | M::Sar);
            if !fresh {
                cg.need_host();
            }
            match m {
                M::Shl | M::Sal => shift!(cg, size, shl),
                M::Shr => shift!(cg, size, shr),
                M::Sar => shift!(cg, size, sar),
                M::Rol => shift!(cg, size, rol),
                M::Ror => shift!(cg, size, ror),
                M::Rcl => shift!(cg, size, rcl),
                _ => shift!(cg, size, rcr),
            }
            cg.wrote_flags();
            cg.st(0, size, o0);
            Some(Done::Next)
        }
        M::Lea if matches!(o0, Opnd::Reg { .. }) && size >= 2 => {
            cg.ea(&u.mem, false);
            cg.st(6, size, o0);
            Some(Done::Next)
        }
        M::Movzx | M::Movsx | M::Movsxd if matches!(o0, Opnd::Reg { .. }) && nops == 2 => {
            let ss = u.target as u8;
            let sx = m != M::Movzx;
            // MOVZX has no 32-bit source.
            if !matches!(ss, 1 | 2 | 4) || size < 2 || (ss == 4 && !sx) {
                return None;
            }
            if has_mem {
                cg.mem(u, ss, Acc::Read);
            }
            // The source into al/ax/eax, then extended in place.
            cg.ld(0, ss, o1);
            match (ss, sx) {
                (1, false) => a!(cg; movzx eax, al),
                (2, false) => a!(cg; movzx eax, ax),
                (1, true) => a!(cg; movsx rax, al),
                (2, true) => a!(cg; movsx rax, ax),
                _ => a!(cg; movsxd rax, eax),
            }
            cg.st(0, size, o0);
            Some(Done::Next)
        }
        M::Mul | M::Imul if nops == 1 && size >= 4 => {
            if has_mem {
                cg.mem(u, size, Acc::Read);
            }
            cg.ld(1, size, o0);
            cg.gq(0, 0);
            if size == 8 {
                if m == M::Mul {
                    a!(cg; mul rcx);
                } else {
                    a!(cg; imul rcx);
                }
            } else {
                if m == M::Mul {
                    a!(cg; mul ecx);
                } else {
                    a!(cg; imul ecx);
                }
            }
            cg.wrote_flags();
            cg.st(0, size, Opnd::Reg { idx: 0, hi: false });
            cg.st(2, size, Opnd::Reg { idx: 2, hi: false });
            Some(Done::Next)
        }
        M::Imul if (nops == 2 || nops == 3) && size >= 2 && matches!(o0, Opnd::Reg { .. }) => {
            if has_mem {
                cg.mem(u, size, Acc::Read);
            }
            if nops == 2 {
                cg.ld(0, size, o0);
                cg.ld(1, size, o1);
            } else {
                cg.ld(0, size, o1);
                cg.ld(1, size, o2);
            }
            match size {
                2 => a!(cg; imul ax, cx),
                4 => a!(cg; imul eax, ecx),
                _ => a!(cg; imul rax, rcx),
            }
            cg.wrote_flags();
            cg.st(0, size, o0);
            Some(Done::Next)
        }
        _ if is_cmov(m) && nops == 2 && size >= 2 && matches!(o0, Opnd::Reg { .. }) => {
            let cc = cc_code(u.cc)?;
            if has_mem {
                cg.mem(u, size, Acc::Read);
            }
            cg.ld(0, size, o0);
            cg.ld(1, size, o1);
            cg.need_host();
            if size == 2 {
                cg.a.push(0x66);
            }
            if size == 8 {
                cg.a.push(0x48);
            }
            cg.a.extend([0x0f, 0x40 | cc, 0xc1]);
            cg.st(0, size, o0);
            Some(Done::Next)
        }
        _ if is_setcc(m) && nops == 1 => {
            let cc = cc_code(u.cc)?;
            if has_mem {
                cg.mem(u, 1, Acc::Write);
            }
            cg.need_host();
            cg.a.extend([0x0f, 0x90 | cc, 0xc0]);
            cg.st(0, 1, o0);
            Some(Done::Next)
        }
        M::Xchg if nops == 2 && !has_mem => {
            cg.ld(0, size, o0);
            cg.ld(1, size, o1);
            cg.st(0, size, o1);
            cg.st(1, size, o0);
            Some(Done::Next)
        }
        M::Cdqe => {
            cg.gq(0, 0);
            a!(cg; movsxd rax, eax);
            cg.sq(0, 0);
            Some(Done::Next)
        }
        M::Cqo => {
            cg.gq(0, 0);
            a!(cg; cqo);
            cg.sq(2, 2);
            Some(Done::Next)
        }
        // The stack forms of the block's code size (operand size 2, 4 or
        // 8 bytes: what the stack pointer moves by).
        M::Push
            if matches!(
                insn.code(),
                Code::Push_r64
                    | Code::Pushq_imm32
                    | Code::Pushq_imm8
                    | Code::Push_r32
                    | Code::Pushd_imm32
                    | Code::Pushd_imm8
                    | Code::Push_r16
                    | Code::Push_imm16
                    | Code::Pushw_imm8
            ) && is_gpr_or_imm(o0) =>
        {
            let n = stack_bytes(insn)?;
            cg.stack_slot(-(n as i32), n, Acc::Write);
            match o0 {
                Opnd::Imm(v) => a!(cg; mov r8, v as i64 as i32),
                _ => cg.ld(8, n, o0),
            }
            cg.st(8, n, Opnd::Mem);
            cg.add_sp(-(n as i32));
            Some(Done::Next)
        }
        M::Pop if matches!(insn.code(), Code::Pop_r64 | Code::Pop_r32 | Code::Pop_r16) => {
            let n = stack_bytes(insn)?;
            cg.stack_slot(0, n, Acc::Read);
            cg.ld(8, n, Opnd::Mem);
            cg.add_sp(n as i32);
            // POP RSP: the popped value wins.
            cg.st(8, n, o0);
            Some(Done::Next)
        }
        M::Call if is_near_rel(insn) && i + 1 == n => {
            let push = stack_bytes(insn)?;
            cg.push_ret_addr(u.next_ip, push);
            cg.capture();
            let t = insn.near_branch_target();
            cg.cell(block, 0, t);
            cg.chain_exit(i + 1, Some((0, t)));
            Some(Done::Exited)
        }
        M::Ret if matches!(insn.code(), Code::Retnq | Code::Retnd | Code::Retnw) && i + 1 == n => {
            // The target zero-extended from its size (what the interpreter
            // masks it to outside 64-bit mode).
            let n = stack_bytes(insn)?;
            cg.stack_slot(0, n, Acc::Read);
            load_zx(cg, 8, n);
            cg.add_sp(n as i32);
            a!(cg; mov QWORD [rbx + OFF_RIP], r8);
            cg.capture();
            cg.dynamic_exit(i + 1);
            Some(Done::Exited)
        }
        M::Jmp | M::Call
            if matches!(
                insn.code(),
                Code::Jmp_rm64
                    | Code::Call_rm64
                    | Code::Jmp_rm32
                    | Code::Call_rm32
                    | Code::Jmp_rm16
                    | Code::Call_rm16
            ) && i + 1 == n
                && matches!(o0, Opnd::Reg { hi: false, .. } | Opnd::Mem)
                && matches!(size, 2 | 4 | 8) =>
        {
            // The target first (the operand may be RSP or on the stack);
            // nothing is written before every access has translated, so a
            // miss still runs the whole instruction through the interpreter.
            // It is zero-extended from the operand size (the interpreter
            // masks it so outside 64-bit mode).
            let push = if m == M::Call { stack_bytes(insn)? } else { 0 };
            if o0 == Opnd::Mem {
                cg.mem(u, size, Acc::Read);
                load_zx(cg, 8, size);
            } else {
                cg.ld(8, size, o0);
                if size == 2 {
                    a!(cg; movzx r8d, r8w);
                }
            }
            if push != 0 {
                cg.push_ret_addr(u.next_ip, push);
            }
            a!(cg; mov QWORD [rbx + OFF_RIP], r8);
            cg.capture();
            cg.dynamic_exit(i + 1);
            Some(Done::Exited)
        }
        M::Jmp if is_near_rel(insn) && i + 1 == n => {
            cg.capture();
            let t = insn.near_branch_target();
            cg.cell(block, 0, t);
            cg.chain_exit(i + 1, Some((0, t)));
            Some(Done::Exited)
        }
        _ if is_jcc(m) && is_near_rel(insn) && i + 1 == n => {
            let cc = cc_code(u.cc)?;
            // The condition into the host flags as `hold` (true when the
            // branch is taken), the guest flags kept where they are.
            let hold = match simple_cc(cc) {
                Some((bit, set)) if !cg.loc.host => {
                    // Test the saved image instead of reloading RFLAGS.
                    cg.capture();
                    a!(cg; test r11d, img_mask(bit));
                    if set {
                        5
                    } else {
                        4
                    }
                }
                _ => {
                    cg.need_host();
                    cc
                }
            };
            block.links[0].target.set(insn.near_branch_target());
            block.links[1].target.set(u.next_ip);
            let taken = &block.links[0] as *const LinkCell as i64;
            let fall = &block.links[1] as *const LinkCell as i64;
            // Two exits, one per side, rather than one that selects the
            // target and cell with CMOVs: each side's indirect jump into
            // its successor then always goes to the same place (the host's
            // branch predictor learns it), and the taken side's RIP and
            // cell are constants. Both sides write back the same cached
            // registers. A block that loops to itself jumps to its back
            // edge instead (`Cg::back_edge`), which comes back to the taken
            // side's exit only when the core is busy.
            let (loc, dirty) = (cg.loc, cg.dirty);
            let target = insn.near_branch_target();
            match cg.back.take() {
                Some((back, busy)) if !cg.interpreted => {
                    if !cg.loop_keeps_host {
                        // The body starts from the r11 image.
                        cg.capture();
                    }
                    cg.jcc_to(hold, back);
                    cg.capture();
                    a!(cg; mov rdx, QWORD fall);
                    cg.chain_exit(i + 1, Some((1, u.next_ip)));
                    (cg.loc, cg.dirty) = (loc, dirty);
                    a!(cg; =>busy);
                    cg.capture();
                    a!(cg; mov rdx, QWORD taken);
                    cg.chain_exit(i + 1, Some((0, target)));
                }
                back => {
                    cg.back = back;
                    let fall_side = cg.a.new_dynamic_label();
                    cg.jcc_to(hold ^ 1, fall_side);
                    cg.capture();
                    a!(cg; mov rdx, QWORD taken);
                    cg.chain_exit(i + 1, Some((0, target)));
                    (cg.loc, cg.dirty) = (loc, dirty);
                    a!(cg; =>fall_side);
                    cg.capture();
                    a!(cg; mov rdx, QWORD fall);
                    cg.chain_exit(i + 1, Some((1, u.next_ip)));
                }
            }
            Some(Done::Exited)
        }
        // LOOP and JCXZ/JECXZ/JRCXZ: the count register (its size from
        // the address size; a LOOP's ECX is zero-extended, its CX keeps
        // the bits above it) decides, no flag changes. Two exits, as a Jcc
        // that does not loop to itself has.
        M::Loop | M::Jcxz | M::Jecxz | M::Jrcxz if is_near_rel(insn) && i + 1 == n => {
            use Code as C;
            let csize = match insn.code() {
                C::Loop_rel8_16_CX | C::Loop_rel8_32_CX | C::Jcxz_rel8_16 | C::Jcxz_rel8_32 => 2,
                C::Loop_rel8_16_ECX
                | C::Loop_rel8_32_ECX
                | C::Loop_rel8_64_ECX
                | C::Jecxz_rel8_16
                | C::Jecxz_rel8_32
                | C::Jecxz_rel8_64 => 4,
                _ => 8,
            };
            // The guest flags go to the r11 image first: the host's are
            // free for the count's test (taken on NE for LOOP, E for
            // JCXZ).
            cg.capture();
            cg.loc.host = false;
            cg.gq(0, 1);
            let hold = match (m == M::Loop, csize) {
                (true, 2) => {
                    a!(cg; sub ax, 1);
                    5
                }
                (true, 4) => {
                    a!(cg; sub eax, 1);
                    5
                }
                (true, _) => {
                    a!(cg; sub rax, 1);
                    5
                }
                (false, 2) => {
                    a!(cg; test ax, ax);
                    4
                }
                (false, 4) => {
                    a!(cg; test eax, eax);
                    4
                }
                (false, _) => {
                    a!(cg; test rax, rax);
                    4
                }
            };
            if m == M::Loop {
                cg.sq(1, 0);
            }
            let target = insn.near_branch_target();
            block.links[0].target.set(target);
            block.links[1].target.set(u.next_ip);
            let taken = &block.links[0] as *const LinkCell as i64;
            let fall = &block.links[1] as *const LinkCell as i64;
            let (loc, dirty) = (cg.loc, cg.dirty);
            let fall_side = cg.a.new_dynamic_label();
            cg.jcc_to(hold ^ 1, fall_side);
            a!(cg; mov rdx, QWORD taken);
            cg.chain_exit(i + 1, Some((0, target)));
            (cg.loc, cg.dirty) = (loc, dirty);
            a!(cg; =>fall_side);
            a!(cg; mov rdx, QWORD fall);
            cg.chain_exit(i + 1, Some((1, u.next_ip)));
            Some(Done::Exited)
        }
        _ => None,
    }
}

/// A near branch with a constant target (already wrapped by the decoder
/// to the operand size: 16 or 32 bits outside 64-bit mode).
fn is_near_rel(insn: &iced_x86::Instruction) -> bool {
    use iced_x86::OpKind as K;
    matches!(
        insn.op0_kind(),
        K::NearBranch64 | K::NearBranch32 | K::NearBranch16
    )
}

/// Bytes a stack instruction moves the stack pointer by (its operand size:
/// 2, 4 or 8).
fn stack_bytes(insn: &iced_x86::Instruction) -> Option<u8> {
    match insn.stack_pointer_increment().unsigned_abs() {
        n @ (2 | 4 | 8) => Some(n as u8),
        _ => None,
    }
}

/// `n` bytes at [rsi] into host register `r`, zero-extended to 64 bits.
fn load_zx(cg: &mut Cg, r: u8, n: u8) {
    match n {
        2 => a!(cg; movzx Rd(r), WORD [rsi]),
        4 => a!(cg; mov Rd(r), DWORD [rsi]),
        _ => a!(cg; mov Rq(r), QWORD [rsi]),
    }
}

/// The source of a `direct` form.
#[derive(Clone, Copy)]
enum Src {
    /// A host register caching the guest's.
    Reg(u8),
    /// The guest register at `[rbx + disp]` in `Core::st` (AH..BH too).
    St(i32),
    /// The translated memory operand at `[rsi]`.
    Mem,
    /// An immediate (only for 32- and 64-bit operations).
    Imm(i32),
}

/// `op dst, src` with `dst` a host register, `src` a `Src`, at operand
/// size `size` (an immediate only at 4 and 8).
macro_rules! dop {
    ($cg:expr, $size:expr, $op:ident, $d:expr, $src:expr) => {
        match ($src, $size) {
            (Src::Reg(s), 1) => a!($cg; $op Rb($d), Rb(s)),
            (Src::Reg(s), 2) => a!($cg; $op Rw($d), Rw(s)),
            (Src::Reg(s), 4) => a!($cg; $op Rd($d), Rd(s)),
            (Src::Reg(s), _) => a!($cg; $op Rq($d), Rq(s)),
            (Src::St(o), 1) => a!($cg; $op Rb($d), BYTE [rbx + o]),
            (Src::St(o), 2) => a!($cg; $op Rw($d), WORD [rbx + o]),
            (Src::St(o), 4) => a!($cg; $op Rd($d), DWORD [rbx + o]),
            (Src::St(o), _) => a!($cg; $op Rq($d), QWORD [rbx + o]),
            (Src::Mem, 1) => a!($cg; $op Rb($d), BYTE [rsi]),
            (Src::Mem, 2) => a!($cg; $op Rw($d), WORD [rsi]),
            (Src::Mem, 4) => a!($cg; $op Rd($d), DWORD [rsi]),
            (Src::Mem, _) => a!($cg; $op Rq($d), QWORD [rsi]),
            (Src::Imm(v), 4) => a!($cg; $op Rd($d), v),
            (Src::Imm(v), _) => a!($cg; $op Rq($d), v),
        }
    };
}

/// The common forms whose destination is a guest register cached in a
/// host register, run as one host instruction on that register (rather
/// than through rax/rcx and back): MOV, the ALU group, INC/DEC/NEG/NOT,
/// SHL/SHR/SAR by a non-zero immediate, IMUL with two or three operands,
/// MOVZX/MOVSX/MOVSXD and LEA from cached registers; MOV into a guest
/// register left in `Core::st` from a cached one or an immediate; and with
/// a memory destination, `direct_to_mem`'s. Flags as in the general
/// path (the same host instruction); None for anything else, with nothing
/// emitted.
fn direct(cg: &mut Cg, u: &Uop) -> Option<Done> {
    use Mnemonic as M;
    let insn = &u.insn;
    let m = insn.mnemonic();
    let size = u.size;
    let nops = insn.op_count() as usize;
    let [o0, o1, o2] = u.ops;
    // The source operand, if it can be one.
    let src = |cg: &Cg, o: Opnd| -> Option<Src> {
        match o {
            Opnd::Reg { .. } => Some(match cg.cached(o) {
                Some(h) => Src::Reg(h),
                None => Src::St(reg_off(o)),
            }),
            Opnd::Mem => Some(Src::Mem),
            Opnd::Imm(v) if size >= 4 => {
                let v = v & crate::cpu::mask(size);
                if size == 4 {
                    Some(Src::Imm(v as u32 as i32))
                } else if v as i64 == v as i32 as i64 {
                    Some(Src::Imm(v as i32))
                } else {
                    None
                }
            }
            _ => None,
        }
    };
    if o0 == Opnd::Mem {
        return direct_to_mem(cg, u);
    }
    if m == M::Mov && nops == 2 && matches!(o0, Opnd::Reg { .. }) && cg.cached(o0).is_none() {
        // Into the guest register in `Core::st`, from a cached one or an
        // immediate; a 32-bit write clears the upper half, as the guest's.
        let at = reg_off(o0);
        match (src(cg, o1)?, size) {
            (Src::Reg(h), 1) => a!(cg; mov BYTE [rbx + at], Rb(h)),
            (Src::Reg(h), 2) => a!(cg; mov WORD [rbx + at], Rw(h)),
            (Src::Reg(h), 4) => a!(cg
                ; mov DWORD [rbx + at], Rd(h)
                ; mov DWORD [rbx + at + 4], 0
            ),
            (Src::Reg(h), _) => a!(cg; mov QWORD [rbx + at], Rq(h)),
            (Src::Imm(v), 4) => a!(cg
                ; mov DWORD [rbx + at], v
                ; mov DWORD [rbx + at + 4], 0
            ),
            (Src::Imm(v), _) => a!(cg; mov QWORD [rbx + at], v),
            _ => return None,
        }
        return Some(Done::Next);
    }
    let Opnd::Reg { idx, hi: false } = o0 else {
        return None;
    };
    let d = cg.cached(o0)?;
    match m {
        M::Mov if nops == 2 => {
            let s = src(cg, o1)?;
            if matches!(s, Src::Mem) {
                cg.mem(u, size, Acc::Read);
            }
            dop!(cg, size, mov, d, s);
        }
        M::Add | M::Or | M::Adc | M::Sbb | M::And | M::Sub | M::Xor | M::Cmp if nops == 2 => {
            let s = src(cg, o1)?;
            if matches!(s, Src::Mem) {
                cg.mem(u, size, Acc::Read);
            }
            if matches!(m, M::Adc | M::Sbb) {
                cg.need_cf();
            }
            match m {
                M::Add => dop!(cg, size, add, d, s),
                M::Or => dop!(cg, size, or, d, s),
                M::Adc => dop!(cg, size, adc, d, s),
                M::Sbb => dop!(cg, size, sbb, d, s),
                M::And => dop!(cg, size, and, d, s),
                M::Sub => dop!(cg, size, sub, d, s),
                M::Xor => dop!(cg, size, xor, d, s),
                _ => dop!(cg, size, cmp, d, s),
            }
            cg.wrote_flags();
            if m == M::Cmp {
                return Some(Done::Next);
            }
        }
        M::Test if nops == 2 => {
            let s = src(cg, o1)?;
            if !matches!(s, Src::Reg(_) | Src::Imm(_)) {
                return None;
            }
            dop!(cg, size, test, d, s);
            cg.wrote_flags();
            return Some(Done::Next);
        }
        M::Inc | M::Dec | M::Neg | M::Not if nops == 1 => match m {
            M::Inc => {
                cg.need_cf();
                match size {
                    1 => a!(cg; inc Rb(d)),
                    2 => a!(cg; inc Rw(d)),
                    4 => a!(cg; inc Rd(d)),
                    _ => a!(cg; inc Rq(d)),
                }
                cg.wrote_flags();
            }
            M::Dec => {
                cg.need_cf();
                match size {
                    1 => a!(cg; dec Rb(d)),
                    2 => a!(cg; dec Rw(d)),
                    4 => a!(cg; dec Rd(d)),
                    _ => a!(cg; dec Rq(d)),
                }
                cg.wrote_flags();
            }
            M::Neg => {
                match size {
                    1 => a!(cg; neg Rb(d)),
                    2 => a!(cg; neg Rw(d)),
                    4 => a!(cg; neg Rd(d)),
                    _ => a!(cg; neg Rq(d)),
                }
                cg.wrote_flags();
            }
            _ => match size {
                1 => a!(cg; not Rb(d)),
                2 => a!(cg; not Rw(d)),
                4 => a!(cg; not Rd(d)),
                _ => a!(cg; not Rq(d)),
            },
        },
        M::Shl | M::Sal | M::Shr | M::Sar if nops == 2 => {
            // A non-zero immediate count sets every defined flag from the
            // operands alone (see the general path).
            let cmask = if size == 8 { 63 } else { 31 };
            let Opnd::Imm(c) = o1 else {
                return None;
            };
            if c & cmask == 0 {
                return None;
            }
            let c = (c & cmask) as i8;
            match (m, size) {
                (M::Shr, 1) => a!(cg; shr Rb(d), c),
                (M::Shr, 2) => a!(cg; shr Rw(d), c),
                (M::Shr, 4) => a!(cg; shr Rd(d), c),
                (M::Shr, _) => a!(cg; shr Rq(d), c),
                (M::Sar, 1) => a!(cg; sar Rb(d), c),
                (M::Sar, 2) => a!(cg; sar Rw(d), c),
                (M::Sar, 4) => a!(cg; sar Rd(d), c),
                (M::Sar, _) => a!(cg; sar Rq(d), c),
                (_, 1) => a!(cg; shl Rb(d), c),
                (_, 2) => a!(cg; shl Rw(d), c),
                (_, 4) => a!(cg; shl Rd(d), c),
                _ => a!(cg; shl Rq(d), c),
            }
            cg.wrote_flags();
        }
        M::Imul if nops == 2 && size >= 2 => {
            let s = src(cg, o1)?;
            match s {
                Src::Mem => cg.mem(u, size, Acc::Read),
                Src::Imm(_) => return None,
                _ => {}
            }
            match (s, size) {
                (Src::Reg(s), 2) => a!(cg; imul Rw(d), Rw(s)),
                (Src::Reg(s), 4) => a!(cg; imul Rd(d), Rd(s)),
                (Src::Reg(s), _) => a!(cg; imul Rq(d), Rq(s)),
                (Src::St(o), 2) => a!(cg; imul Rw(d), WORD [rbx + o]),
                (Src::St(o), 4) => a!(cg; imul Rd(d), DWORD [rbx + o]),
                (Src::St(o), _) => a!(cg; imul Rq(d), QWORD [rbx + o]),
                (_, 2) => a!(cg; imul Rw(d), WORD [rsi]),
                (_, 4) => a!(cg; imul Rd(d), DWORD [rsi]),
                _ => a!(cg; imul Rq(d), QWORD [rsi]),
            }
            cg.wrote_flags();
        }
        M::Imul if nops == 3 && size >= 4 => {
            let Some(Src::Imm(v)) = src(cg, o2) else {
                return None;
            };
            let s = src(cg, o1)?;
            if matches!(s, Src::Mem) {
                cg.mem(u, size, Acc::Read);
            }
            match (s, size) {
                (Src::Reg(s), 4) => a!(cg; imul Rd(d), Rd(s), v),
                (Src::Reg(s), _) => a!(cg; imul Rq(d), Rq(s), v),
                (Src::St(o), 4) => a!(cg; imul Rd(d), DWORD [rbx + o], v),
                (Src::St(o), _) => a!(cg; imul Rq(d), QWORD [rbx + o], v),
                (_, 4) => a!(cg; imul Rd(d), DWORD [rsi], v),
                _ => a!(cg; imul Rq(d), QWORD [rsi], v),
            }
            cg.wrote_flags();
        }
        M::Movzx | M::Movsx | M::Movsxd if nops == 2 && size >= 4 => {
            let ss = u.target as u8;
            let sx = m != M::Movzx;
            if !matches!(ss, 1 | 2 | 4) || (ss == 4 && (!sx || size != 8)) {
                return None;
            }
            let s = match o1 {
                Opnd::Reg { .. } => match cg.cached(o1) {
                    Some(h) => Src::Reg(h),
                    None => Src::St(reg_off(o1)),
                },
                Opnd::Mem => {
                    cg.mem(u, ss, Acc::Read);
                    Src::Mem
                }
                _ => return None,
            };
            // A 32-bit destination zero-extends into the host register, as
            // the guest's does.
            match (s, ss, sx, size) {
                (Src::Reg(s), 1, false, _) => a!(cg; movzx Rd(d), Rb(s)),
                (Src::Reg(s), 2, false, _) => a!(cg; movzx Rd(d), Rw(s)),
                (Src::Reg(s), 1, true, 4) => a!(cg; movsx Rd(d), Rb(s)),
                (Src::Reg(s), 2, true, 4) => a!(cg; movsx Rd(d), Rw(s)),
                (Src::Reg(s), 1, true, _) => a!(cg; movsx Rq(d), Rb(s)),
                (Src::Reg(s), 2, true, _) => a!(cg; movsx Rq(d), Rw(s)),
                (Src::Reg(s), _, _, _) => a!(cg; movsxd Rq(d), Rd(s)),
                (Src::St(o), 1, false, _) => a!(cg; movzx Rd(d), BYTE [rbx + o]),
                (Src::St(o), 2, false, _) => a!(cg; movzx Rd(d), WORD [rbx + o]),
                (Src::St(o), 1, true, 4) => a!(cg; movsx Rd(d), BYTE [rbx + o]),
                (Src::St(o), 2, true, 4) => a!(cg; movsx Rd(d), WORD [rbx + o]),
                (Src::St(o), 1, true, _) => a!(cg; movsx Rq(d), BYTE [rbx + o]),
                (Src::St(o), 2, true, _) => a!(cg; movsx Rq(d), WORD [rbx + o]),
                (Src::St(o), _, _, _) => a!(cg; movsxd Rq(d), DWORD [rbx + o]),
                (_, 1, false, _) => a!(cg; movzx Rd(d), BYTE [rsi]),
                (_, 2, false, _) => a!(cg; movzx Rd(d), WORD [rsi]),
                (_, 1, true, 4) => a!(cg; movsx Rd(d), BYTE [rsi]),
                (_, 2, true, 4) => a!(cg; movsx Rd(d), WORD [rsi]),
                (_, 1, true, _) => a!(cg; movsx Rq(d), BYTE [rsi]),
                (_, 2, true, _) => a!(cg; movsx Rq(d), WORD [rsi]),
                _ => a!(cg; movsxd Rq(d), DWORD [rsi]),
            }
        }
        M::Lea if size >= 4 && u.mem.amask == u64::MAX => {
            let mo = &u.mem;
            let disp = mo.disp as i64;
            if disp != disp as i32 as i64 {
                return None;
            }
            let disp = disp as i32;
            let reg = |g: u8| {
                if g == 0xff {
                    Some(None)
                } else {
                    cg.map[g as usize & 15].map(Some)
                }
            };
            let (b, x) = (reg(mo.base)?, reg(mo.index)?);
            let s = mo.scale;
            match (b, x, size) {
                (Some(b), None, 4) => a!(cg; lea Rd(d), [Rq(b) + disp]),
                (Some(b), None, _) => a!(cg; lea Rq(d), [Rq(b) + disp]),
                (b, Some(x), _) => {
                    // [base + index * scale + disp], base optional.
                    match (b, s) {
                        (Some(b), 1) => a!(cg; lea Rq(d), [Rq(b) + Rq(x) + disp]),
                        (Some(b), 2) => a!(cg; lea Rq(d), [Rq(b) + Rq(x) * 2 + disp]),
                        (Some(b), 4) => a!(cg; lea Rq(d), [Rq(b) + Rq(x) * 4 + disp]),
                        (Some(b), _) => a!(cg; lea Rq(d), [Rq(b) + Rq(x) * 8 + disp]),
                        (None, 1) => a!(cg; lea Rq(d), [Rq(x) + disp]),
                        (None, 2) => a!(cg; lea Rq(d), [Rq(x) * 2 + disp]),
                        (None, 4) => a!(cg; lea Rq(d), [Rq(x) * 4 + disp]),
                        (None, _) => a!(cg; lea Rq(d), [Rq(x) * 8 + disp]),
                    }
                    if size == 4 {
                        a!(cg; mov Rd(d), Rd(d));
                    }
                }
                (None, None, _) => return None,
            }
        }
        _ => return None,
    }
    cg.dirty |= 1 << idx;
    Some(Done::Next)
}

/// `op [rsi], src` at operand size `size`: a cached register or (at 4
/// and 8) an immediate.
macro_rules! mop {
    ($cg:expr, $size:expr, $op:ident, $src:expr) => {
        match ($src, $size) {
            (Src::Reg(s), 1) => a!($cg; $op BYTE [rsi], Rb(s)),
            (Src::Reg(s), 2) => a!($cg; $op WORD [rsi], Rw(s)),
            (Src::Reg(s), 4) => a!($cg; $op DWORD [rsi], Rd(s)),
            (Src::Reg(s), _) => a!($cg; $op QWORD [rsi], Rq(s)),
            (Src::Imm(v), 4) => a!($cg; $op DWORD [rsi], v),
            (Src::Imm(v), _) => a!($cg; $op QWORD [rsi], v),
            _ => {}
        }
    };
}

/// `direct`'s forms with a memory destination (no LOCK): MOV, the ALU
/// group, TEST and INC/DEC/NEG/NOT on the translated address, from a
/// cached register or an immediate.
fn direct_to_mem(cg: &mut Cg, u: &Uop) -> Option<Done> {
    use Mnemonic as M;
    let insn = &u.insn;
    let m = insn.mnemonic();
    let size = u.size;
    let nops = insn.op_count() as usize;
    let o1 = u.ops[1];
    let src = match o1 {
        Opnd::Reg { .. } => Src::Reg(cg.cached(o1)?),
        Opnd::Imm(v) if size >= 4 && nops == 2 => {
            let v = v & crate::cpu::mask(size);
            if size == 4 {
                Src::Imm(v as u32 as i32)
            } else if v as i64 == v as i32 as i64 {
                Src::Imm(v as i32)
            } else {
                return None;
            }
        }
        _ if nops == 1 => Src::Mem,
        _ => return None,
    };
    match m {
        M::Mov if nops == 2 => {
            cg.mem(u, size, Acc::Write);
            mop!(cg, size, mov, src);
        }
        M::Add | M::Or | M::Adc | M::Sbb | M::And | M::Sub | M::Xor | M::Cmp | M::Test
            if nops == 2 =>
        {
            let acc = if matches!(m, M::Cmp | M::Test) {
                Acc::Read
            } else {
                Acc::Write
            };
            cg.mem(u, size, acc);
            if matches!(m, M::Adc | M::Sbb) {
                cg.need_cf();
            }
            match m {
                M::Add => mop!(cg, size, add, src),
                M::Or => mop!(cg, size, or, src),
                M::Adc => mop!(cg, size, adc, src),
                M::Sbb => mop!(cg, size, sbb, src),
                M::And => mop!(cg, size, and, src),
                M::Sub => mop!(cg, size, sub, src),
                M::Xor => mop!(cg, size, xor, src),
                M::Cmp => mop!(cg, size, cmp, src),
                _ => mop!(cg, size, test, src),
            }
            cg.wrote_flags();
        }
        M::Inc | M::Dec | M::Neg | M::Not if nops == 1 => {
            cg.mem(u, size, Acc::Write);
            unary(cg, m, |cg| match m {
                M::Inc => opm1!(cg, size, inc),
                M::Dec => opm1!(cg, size, dec),
                M::Neg => opm1!(cg, size, neg),
                _ => opm1!(cg, size, not),
            });
        }
        _ => return None,
    }
    Some(Done::Next)
}

/// Conditions that test one flag mask of a saved RFLAGS image: (mask,
/// true if the condition holds when a masked bit is set).
fn simple_cc(cc: u8) -> Option<(i32, bool)> {
    let mask = match cc >> 1 {
        0 => 0x800,
        1 => 0x1,
        2 => 0x40,
        3 => 0x41,
        4 => 0x80,
        5 => 0x4,
        _ => return None,
    };
    Some((mask, cc & 1 == 0))
}

fn is_cmov(m: Mnemonic) -> bool {
    use Mnemonic as M;
    matches!(
        m,
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
            | M::Cmovs
    )
}

fn is_setcc(m: Mnemonic) -> bool {
    use Mnemonic as M;
    matches!(
        m,
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
            | M::Sets
    )
}

/// XMM register number of operand `n`, if it is one.
fn xmm_of(insn: &iced_x86::Instruction, n: u32) -> Option<u8> {
    if insn.op_kind(n) != iced_x86::OpKind::Register {
        return None;
    }
    let r = insn.op_register(n) as usize;
    let x = r.wrapping_sub(iced_x86::Register::XMM0 as usize);
    (x < 16).then_some(x as u8)
}

/// `op xmm0, xmm1` or `op xmm0, [rsi]`.
macro_rules! sse2 {
    ($cg:expr, $mem:expr, $op:ident) => {
        if $mem {
            a!($cg; $op xmm0, [rsi])
        } else {
            a!($cg; $op xmm0, xmm1)
        }
    };
}

/// SSE2 data movement and packed-integer forms the host runs as they are
/// (legacy encoding only: nothing beyond what the engine implements).
/// 128-bit memory operands go through the inline TLB path; the aligned
/// forms check alignment there and leave a misaligned one to the
/// interpreter's #GP. None: not one of these (nothing emitted).
fn sse(cg: &mut Cg, u: &Uop) -> Option<Done> {
    use Mnemonic as M;
    let insn = &u.insn;
    let m = insn.mnemonic();
    let moves = matches!(m, M::Movaps | M::Movups | M::Movdqa | M::Movdqu);
    let binary = matches!(
        m,
        M::Pxor
            | M::Por
            | M::Pand
            | M::Pandn
            | M::Pcmpeqb
            | M::Pcmpeqw
            | M::Pcmpeqd
            | M::Pcmpgtb
            | M::Paddb
            | M::Paddw
            | M::Paddd
            | M::Paddq
            | M::Psubb
            | M::Psubw
            | M::Psubd
            | M::Psubq
            | M::Pminub
            | M::Pmaxub
            | M::Punpcklbw
            | M::Punpcklwd
            | M::Punpckldq
            | M::Punpcklqdq
            | M::Pshufd
    );
    let movmsk = m == M::Pmovmskb;
    if matches!(m, M::Pslldq | M::Psrldq)
        && insn.encoding() == iced_x86::EncodingKind::Legacy
        && !u.lock
        && insn.op_count() == 2
        && insn.op_kind(1) == iced_x86::OpKind::Immediate8
    {
        // Byte shifts of a whole register by an immediate.
        let d = xmm_of(insn, 0)?;
        cg.sse_guard();
        let imm = insn.immediate8() as i8;
        a!(cg; movdqu xmm0, [rbx + xmm_off(d)]);
        if m == M::Pslldq {
            a!(cg; pslldq xmm0, imm);
        } else {
            a!(cg; psrldq xmm0, imm);
        }
        a!(cg; movdqu [rbx + xmm_off(d)], xmm0);
        return Some(Done::Next);
    }
    if !(moves || binary || movmsk)
        || insn.encoding() != iced_x86::EncodingKind::Legacy
        || u.lock
        || insn.op_count() != 2 + (m == M::Pshufd) as u32
    {
        return None;
    }
    let (x0, x1) = (xmm_of(insn, 0), xmm_of(insn, 1));
    let mem0 = insn.op_kind(0) == iced_x86::OpKind::Memory;
    let mem1 = insn.op_kind(1) == iced_x86::OpKind::Memory;
    let aligned = !matches!(m, M::Movups | M::Movdqu);
    // The operand shapes first, so that nothing is emitted for others.
    let dst_gpr = if movmsk {
        match (crate::frontend::uop::gpr(insn.op0_register()), x1) {
            (Some((idx, false)), Some(_)) => Some(idx),
            _ => return None,
        }
    } else {
        None
    };
    match (x0, x1, mem0, mem1) {
        (Some(_), Some(_), false, false) => {}
        (Some(_), None, false, true) if !movmsk => {}
        (None, Some(_), true, false) if moves => {}
        (None, Some(_), false, false) if movmsk => {}
        _ => return None,
    }
    cg.sse_guard();
    let has_mem = mem0 || mem1;
    if has_mem {
        let mo = crate::frontend::uop::memop(insn);
        cg.ea(&mo, true);
        cg.translate(16, if mem0 { Acc::Write } else { Acc::Read });
        if aligned {
            let stub = cg.stub_label();
            a!(cg; test sil, 15 ; jnz =>stub);
        }
    }
    if let Some(s) = x1 {
        a!(cg; movdqu xmm1, [rbx + xmm_off(s)]);
    }
    if moves {
        match (x0, mem0) {
            (Some(d), false) => {
                if mem1 {
                    a!(cg; movdqu xmm1, [rsi]);
                }
                a!(cg; movdqu [rbx + xmm_off(d)], xmm1);
            }
            _ => a!(cg; movdqu [rsi], xmm1),
        }
        return Some(Done::Next);
    }
    if let Some(g) = dst_gpr {
        a!(cg; pmovmskb eax, xmm1);
        cg.st(0, 4, Opnd::Reg { idx: g, hi: false });
        return Some(Done::Next);
    }
    let d = x0?;
    if m == M::Pshufd {
        let imm = insn.immediate8() as i8;
        if mem1 {
            a!(cg; pshufd xmm0, [rsi], imm);
        } else {
            a!(cg; pshufd xmm0, xmm1, imm);
        }
        a!(cg; movdqu [rbx + xmm_off(d)], xmm0);
        return Some(Done::Next);
    }
    a!(cg; movdqu xmm0, [rbx + xmm_off(d)]);
    match m {
        M::Pxor => sse2!(cg, mem1, pxor),
        M::Por => sse2!(cg, mem1, por),
        M::Pand => sse2!(cg, mem1, pand),
        M::Pandn => sse2!(cg, mem1, pandn),
        M::Pcmpeqb => sse2!(cg, mem1, pcmpeqb),
        M::Pcmpeqw => sse2!(cg, mem1, pcmpeqw),
        M::Pcmpeqd => sse2!(cg, mem1, pcmpeqd),
        M::Pcmpgtb => sse2!(cg, mem1, pcmpgtb),
        M::Paddb => sse2!(cg, mem1, paddb),
        M::Paddw => sse2!(cg, mem1, paddw),
        M::Paddd => sse2!(cg, mem1, paddd),
        M::Paddq => sse2!(cg, mem1, paddq),
        M::Psubb => sse2!(cg, mem1, psubb),
        M::Psubw => sse2!(cg, mem1, psubw),
        M::Psubd => sse2!(cg, mem1, psubd),
        M::Psubq => sse2!(cg, mem1, psubq),
        M::Pminub => sse2!(cg, mem1, pminub),
        M::Pmaxub => sse2!(cg, mem1, pmaxub),
        M::Punpcklbw => sse2!(cg, mem1, punpcklbw),
        M::Punpcklwd => sse2!(cg, mem1, punpcklwd),
        M::Punpckldq => sse2!(cg, mem1, punpckldq),
        _ => sse2!(cg, mem1, punpcklqdq),
    }
    a!(cg; movdqu [rbx + xmm_off(d)], xmm0);
    Some(Done::Next)
}

/// The host runs POPCNT (CPUID 1 ECX bit 23); the guest is offered it
/// whatever the host has, so without it the interpreter runs it.
fn host_has_popcnt() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| std::arch::x86_64::__cpuid(1).ecx & (1 << 23) != 0)
}

/// Forms the host runs as they are, beyond the common integer set of
/// `insn`: read-modify-write on memory with or without LOCK (ALU, INC/DEC,
/// XADD, CMPXCHG, XCHG, BTS/BTR/BTC: a LOCK on guest RAM is the host's
/// LOCK on the host address, so it stays atomic against the other vCPU
/// threads; a page-crossing or MMIO operand takes the stub, where the
/// interpreter does what it always did), BT*, BSF/BSR, POPCNT, BSWAP, DIV
/// that cannot fault, MOVD/MOVQ and REP MOVS/STOS within one page. None:
/// not one of these (nothing emitted).
/// A REP MOVS/STOS, which `rep_string` runs as the host's (in rsi, rdi
/// and rcx).
fn is_rep_string(u: &Uop) -> bool {
    use Mnemonic as M;
    let insn = &u.insn;
    matches!(
        insn.mnemonic(),
        M::Movsb | M::Movsw | M::Movsd | M::Movsq | M::Stosb | M::Stosw | M::Stosd | M::Stosq
    ) && (insn.has_rep_prefix() || insn.has_repne_prefix())
}

fn extra(cg: &mut Cg, u: &Uop) -> Option<Done> {
    use Mnemonic as M;
    let insn = &u.insn;
    let m = insn.mnemonic();
    if is_rep_string(u) {
        return rep_string(cg, u);
    }
    if matches!(
        m,
        M::Movsb
            | M::Movsw
            | M::Movsd
            | M::Movsq
            | M::Stosb
            | M::Stosw
            | M::Stosd
            | M::Stosq
            | M::Lodsb
            | M::Lodsw
            | M::Lodsd
            | M::Lodsq
    ) && !insn.has_rep_prefix()
        && !insn.has_repne_prefix()
    {
        return string1(cg, u);
    }
    if matches!(m, M::Movd | M::Movq) {
        return movd(cg, u);
    }
    if matches!(m, M::Pshufb | M::Palignr | M::Pcmpistri) {
        return sse_v2(cg, u);
    }
    let size = u.size;
    let [o0, o1, _] = u.ops;
    let nops = insn.op_count() as usize;
    if !matches!(size, 1 | 2 | 4 | 8) || u.ops[..nops.min(3)].contains(&Opnd::None) {
        return None;
    }
    let mem0 = o0 == Opnd::Mem;
    let lock = u.lock;
    let is_reg = |o: Opnd| matches!(o, Opnd::Reg { .. });
    let low_reg = |o: Opnd| matches!(o, Opnd::Reg { hi: false, .. });
    match m {
        // Without LOCK these run in `insn` (loaded, computed, stored).
        M::Add | M::Or | M::Adc | M::Sbb | M::And | M::Sub | M::Xor
            if lock && nops == 2 && mem0 =>
        {
            cg.mem(u, size, Acc::Write);
            cg.ld(1, size, o1);
            if matches!(m, M::Adc | M::Sbb) {
                cg.need_cf();
            }
            cg.a.push(0xf0);
            match m {
                M::Add => opm!(cg, size, add),
                M::Or => opm!(cg, size, or),
                M::Adc => opm!(cg, size, adc),
                M::Sbb => opm!(cg, size, sbb),
                M::And => opm!(cg, size, and),
                M::Sub => opm!(cg, size, sub),
                _ => opm!(cg, size, xor),
            }
            cg.wrote_flags();
            Some(Done::Next)
        }
        M::Inc | M::Dec if lock && nops == 1 && mem0 => {
            cg.mem(u, size, Acc::Write);
            // CF is kept.
            cg.need_cf();
            cg.a.push(0xf0);
            if m == M::Inc {
                opm1!(cg, size, inc);
            } else {
                opm1!(cg, size, dec);
            }
            cg.wrote_flags();
            Some(Done::Next)
        }
        M::Xadd if nops == 2 && mem0 && is_reg(o1) => {
            cg.mem(u, size, Acc::Write);
            cg.ld(1, size, o1);
            if lock {
                cg.a.push(0xf0);
            }
            opm!(cg, size, xadd);
            cg.wrote_flags();
            cg.st(1, size, o1);
            Some(Done::Next)
        }
        M::Cmpxchg if nops == 2 && mem0 && is_reg(o1) => {
            cg.mem(u, size, Acc::Write);
            cg.ld(1, size, o1);
            // The whole RAX: the host writes AL/AX/EAX (zero-extended)/RAX
            // only when the comparison fails, as the guest must.
            cg.gq(0, 0);
            if lock {
                cg.a.push(0xf0);
            }
            opm!(cg, size, cmpxchg);
            cg.wrote_flags();
            cg.sq(0, 0);
            Some(Done::Next)
        }
        // XCHG with memory locks by itself.
        M::Xchg if nops == 2 && (mem0 || o1 == Opnd::Mem) && is_reg(if mem0 { o1 } else { o0 }) => {
            let r = if mem0 { o1 } else { o0 };
            cg.mem(u, size, Acc::Write);
            cg.ld(1, size, r);
            opm!(cg, size, xchg);
            cg.st(1, size, r);
            Some(Done::Next)
        }
        M::Bt | M::Bts | M::Btr | M::Btc if nops == 2 && size >= 2 => {
            let writes = m != M::Bt;
            // LOCK BT and LOCK on a register are #UD: the interpreter's.
            if lock && (!writes || !mem0) {
                return None;
            }
            let bits = size as u64 * 8;
            let acc = if writes { Acc::Write } else { Acc::Read };
            match (o0, o1) {
                (Opnd::Reg { .. }, Opnd::Reg { .. } | Opnd::Imm(_)) => {
                    // A register operand takes the offset modulo its size.
                    cg.ld(0, size, o0);
                    cg.ld(1, size, o1);
                }
                (Opnd::Mem, Opnd::Imm(c)) => {
                    // An immediate offset stays inside the operand.
                    cg.mem(u, size, acc);
                    a!(cg; mov ecx, (c & (bits - 1)) as i32);
                }
                (Opnd::Mem, Opnd::Reg { .. }) if u.mem.amask == u64::MAX => {
                    // A register offset is signed and addresses memory
                    // beyond the operand: the operand-sized word holding
                    // the bit is translated, the host tests inside it.
                    cg.ld(8, size, o1);
                    match size {
                        2 => a!(cg; movsx r8, r8w),
                        4 => a!(cg; movsxd r8, r8d),
                        _ => {}
                    }
                    cg.ea(&u.mem, true);
                    let shift = bits.trailing_zeros() as i8;
                    a!(cg
                        ; mov rax, r8
                        ; sar rax, shift
                    );
                    match size {
                        2 => a!(cg; lea rsi, [rsi + rax * 2]),
                        4 => a!(cg; lea rsi, [rsi + rax * 4]),
                        _ => a!(cg; lea rsi, [rsi + rax * 8]),
                    }
                    a!(cg; and r8d, (bits - 1) as i32);
                    cg.translate(size, acc);
                    a!(cg; mov rcx, r8);
                }
                _ => return None,
            }
            // ZF is kept, CF set; the rest is undefined (the host's).
            cg.need_host();
            if lock {
                cg.a.push(0xf0);
            }
            match m {
                M::Bt => btop!(cg, size, mem0, bt),
                M::Bts => btop!(cg, size, mem0, bts),
                M::Btr => btop!(cg, size, mem0, btr),
                _ => btop!(cg, size, mem0, btc),
            }
            cg.wrote_flags();
            if writes && !mem0 {
                cg.st(0, size, o0);
            }
            Some(Done::Next)
        }
        M::Bsf | M::Bsr if nops == 2 && size >= 2 && low_reg(o0) && !lock => {
            if o1 == Opnd::Mem {
                cg.mem(u, size, Acc::Read);
            }
            cg.ld(1, size, o1);
            match (m, size) {
                (M::Bsf, 2) => a!(cg; bsf ax, cx),
                (M::Bsf, 4) => a!(cg; bsf eax, ecx),
                (M::Bsf, _) => a!(cg; bsf rax, rcx),
                (_, 2) => a!(cg; bsr ax, cx),
                (_, 4) => a!(cg; bsr eax, ecx),
                _ => a!(cg; bsr rax, rcx),
            }
            // ZF from the source, the rest undefined (the host's); a zero
            // source leaves the destination as it was (the interpreter's
            // choice, AMD's documented one), upper half included.
            cg.wrote_flags();
            a!(cg; jz >bs_zero);
            cg.st(0, size, o0);
            a!(cg; bs_zero:);
            Some(Done::Next)
        }
        M::Popcnt if nops == 2 && size >= 2 && low_reg(o0) && !lock && host_has_popcnt() => {
            if o1 == Opnd::Mem {
                cg.mem(u, size, Acc::Read);
            }
            cg.ld(1, size, o1);
            match size {
                2 => a!(cg; popcnt ax, cx),
                4 => a!(cg; popcnt eax, ecx),
                _ => a!(cg; popcnt rax, rcx),
            }
            cg.wrote_flags();
            cg.st(0, size, o0);
            Some(Done::Next)
        }
        M::Bswap if size >= 4 && low_reg(o0) => {
            cg.ld(0, size, o0);
            if size == 4 {
                a!(cg; bswap eax);
            } else {
                a!(cg; bswap rax);
            }
            cg.st(0, size, o0);
            Some(Done::Next)
        }
        M::Div if nops == 1 && size >= 4 && !lock => {
            // #DE (a zero divisor, a quotient too wide: high half >=
            // divisor) goes to the interpreter through the stub.
            cg.begin_access();
            let stub = cg.stub_label();
            if mem0 {
                cg.mem(u, size, Acc::Read);
            }
            cg.ld(1, size, o0);
            cg.gq(2, 2);
            cg.gq(0, 0);
            if size == 4 {
                a!(cg
                    ; cmp edx, ecx
                    ; jae =>stub
                    ; div ecx
                );
            } else {
                a!(cg
                    ; cmp rdx, rcx
                    ; jae =>stub
                    ; div rcx
                );
            }
            // The flags are undefined: the guest's saved ones stay (as the
            // interpreter leaves them).
            cg.st(0, size, Opnd::Reg { idx: 0, hi: false });
            cg.st(2, size, Opnd::Reg { idx: 2, hi: false });
            Some(Done::Next)
        }
        _ => None,
    }
}

/// REP MOVS/STOS forwards with 64-bit addresses, when the whole count fits
/// in the current source and destination pages (then the interpreter, too,
/// finishes it in one go, see `exec::string`): both pages through the
/// inline TLB path (RAM, no code or dirty tracking on the destination),
/// then the host's own REP MOVS/STOS on the host addresses. DF set, a count
/// beyond the page, a TLB miss or MMIO: the stub runs the interpreter,
/// before anything was written.
fn rep_string(cg: &mut Cg, u: &Uop) -> Option<Done> {
    use iced_x86::{OpKind, Register};
    use Mnemonic as M;
    let insn = &u.insn;
    let m = insn.mnemonic();
    let stos = matches!(m, M::Stosb | M::Stosw | M::Stosd | M::Stosq);
    // 64-bit addresses and count in 64-bit mode, 32-bit ones outside it
    // (with the segments' bases added); not 16-bit addresses.
    let a32 = cg.bits != 64;
    let (dst, src) = if a32 {
        (OpKind::MemoryESEDI, OpKind::MemorySegESI)
    } else {
        (OpKind::MemoryESRDI, OpKind::MemorySegRSI)
    };
    if u.lock || insn.op0_kind() != dst {
        return None;
    }
    // The source segment's base is 0 in 64-bit mode unless FS/GS.
    let seg = match insn.memory_segment() {
        Register::ES => 0,
        Register::CS => 1,
        Register::SS => 2,
        Register::DS => 3,
        Register::FS if a32 => 4,
        Register::GS if a32 => 5,
        _ => return None,
    };
    if !stos && insn.op1_kind() != src {
        return None;
    }
    let size = insn.memory_size().size() as u8;
    if !matches!(size, 1 | 2 | 4 | 8) {
        return None;
    }
    let shift = size.trailing_zeros() as i8;
    cg.begin_access();
    let stub = cg.stub_label();
    let done = cg.a.new_dynamic_label();
    // r8 = count, r9 = bytes.
    cg.gq(8, 1);
    if a32 {
        a!(cg; mov r8d, r8d);
    }
    a!(cg
        ; test r8, r8
        ; jz =>done
        ; test DWORD [rbx + OFF_RFLAGS], crate::cpu::FLAG_DF as i32
        ; jnz =>stub
        ; cmp r8, 0x1000 >> shift
        ; ja =>stub
        ; mov r9, r8
        ; shl r9, shift
    );
    // The linear address of an offset in rsi (outside 64-bit mode: 32 bits
    // of it, plus the segment's base, 32 bits kept).
    let lin = |cg: &mut Cg, s: usize| {
        if a32 {
            a!(cg
                ; mov eax, DWORD [rbx + segbase_off(s)]
                ; lea esi, [rsi + rax]
            );
        }
    };
    cg.gq(6, 7);
    lin(cg, 0);
    a!(cg
        ; mov eax, esi
        ; and eax, 0xfff
        ; add rax, r9
        ; cmp rax, 0x1000
        ; ja =>stub
    );
    cg.translate(1, Acc::Write);
    a!(cg; mov rdi, rsi);
    if stos {
        cg.gq(0, 0);
    } else {
        cg.gq(6, 6);
        lin(cg, seg);
        a!(cg
            ; mov eax, esi
            ; and eax, 0xfff
            ; add rax, r9
            ; cmp rax, 0x1000
            ; ja =>stub
        );
        cg.translate(1, Acc::Read);
    }
    a!(cg; mov rcx, r8);
    // The host's DF is clear (the ABI's, at every call into this code).
    cg.a.push(0xf3);
    match size {
        2 => cg.a.push(0x66),
        8 => cg.a.push(0x48),
        _ => {}
    }
    cg.a.push(match (stos, size) {
        (true, 1) => 0xaa,
        (true, _) => 0xab,
        (false, 1) => 0xa4,
        (false, _) => 0xa5,
    });
    // RDI/RSI advance (32-bit addresses: zero-extended, as the
    // interpreter writes them), RCX is 0.
    cg.gq(0, 7);
    if a32 {
        a!(cg; add eax, r9d);
    } else {
        a!(cg; add rax, r9);
    }
    cg.sq(7, 0);
    if !stos {
        cg.gq(0, 6);
        if a32 {
            a!(cg; add eax, r9d);
        } else {
            a!(cg; add rax, r9);
        }
        cg.sq(6, 0);
    }
    a!(cg; xor eax, eax);
    cg.sq(1, 0);
    a!(cg; =>done);
    Some(Done::Next)
}

/// One MOVS, STOS or LODS (no REP) with 64-bit addresses, or 32-bit ones
/// outside 64-bit mode (segment bases added): the source read, the
/// destination written (or AL..RAX), RSI/RDI advanced by the element
/// size (32-bit addresses: zero-extended, as the interpreter writes
/// them). DF set, a TLB miss or a page crossing run the interpreter;
/// nothing is written before both accesses have translated.
fn string1(cg: &mut Cg, u: &Uop) -> Option<Done> {
    use iced_x86::{OpKind, Register};
    use Mnemonic as M;
    let insn = &u.insn;
    let m = insn.mnemonic();
    let movs = matches!(m, M::Movsb | M::Movsw | M::Movsd | M::Movsq);
    let lods = matches!(m, M::Lodsb | M::Lodsw | M::Lodsd | M::Lodsq);
    let stos = !movs && !lods;
    let a32 = cg.bits != 64;
    let (dst, src) = if a32 {
        (OpKind::MemoryESEDI, OpKind::MemorySegESI)
    } else {
        (OpKind::MemoryESRDI, OpKind::MemorySegRSI)
    };
    if u.lock || (!lods && insn.op0_kind() != dst) || (!stos && insn.op1_kind() != src) {
        return None;
    }
    // The source segment's base is 0 in 64-bit mode unless FS/GS.
    let seg = match insn.memory_segment() {
        Register::ES => 0,
        Register::CS => 1,
        Register::SS => 2,
        Register::DS => 3,
        Register::FS if a32 => 4,
        Register::GS if a32 => 5,
        _ if stos => 0,
        _ => return None,
    };
    let size = insn.memory_size().size() as u8;
    if !matches!(size, 1 | 2 | 4 | 8) {
        return None;
    }
    cg.begin_access();
    let stub = cg.stub_label();
    a!(cg
        ; test DWORD [rbx + OFF_RFLAGS], crate::cpu::FLAG_DF as i32
        ; jnz =>stub
    );
    let lin = |cg: &mut Cg, s: usize| {
        if a32 {
            a!(cg
                ; mov eax, DWORD [rbx + segbase_off(s)]
                ; lea esi, [rsi + rax]
            );
        }
    };
    let rax = Opnd::Reg { idx: 0, hi: false };
    if stos {
        cg.ld(8, size, rax);
    } else {
        cg.gq(6, 6);
        lin(cg, seg);
        cg.translate(size, Acc::Read);
        cg.ld(8, size, Opnd::Mem);
    }
    if lods {
        cg.st(8, size, rax);
    } else {
        cg.gq(6, 7);
        lin(cg, 0);
        cg.translate(size, Acc::Write);
        cg.st(8, size, Opnd::Mem);
    }
    for (moved, g) in [(!stos, 6), (!lods, 7)] {
        if moved {
            cg.gq(0, g);
            if a32 {
                a!(cg; add eax, size as i32);
            } else {
                a!(cg; add rax, size as i32);
            }
            cg.sq(g, 0);
        }
    }
    Some(Done::Next)
}

/// MOVD/MOVQ between an XMM register and a GPR, memory or (MOVQ) another
/// XMM register; a write to an XMM register zeroes the rest of it.
fn movd(cg: &mut Cg, u: &Uop) -> Option<Done> {
    use iced_x86::OpKind;
    let insn = &u.insn;
    if insn.encoding() != iced_x86::EncodingKind::Legacy || u.lock || insn.op_count() != 2 {
        return None;
    }
    let w: u8 = if insn.mnemonic() == Mnemonic::Movd {
        4
    } else {
        8
    };
    let gpr_of = |n: u32| {
        if insn.op_kind(n) != OpKind::Register {
            return None;
        }
        match crate::frontend::uop::gpr(insn.op_register(n)) {
            Some((g, false)) => Some(g),
            _ => None,
        }
    };
    let mem0 = insn.op_kind(0) == OpKind::Memory;
    let mem1 = insn.op_kind(1) == OpKind::Memory;
    let (x0, x1) = (xmm_of(insn, 0), xmm_of(insn, 1));
    let (g0, g1) = (gpr_of(0), gpr_of(1));
    let ok = match (x0, x1) {
        (Some(_), Some(_)) => w == 8,
        (Some(_), None) => g1.is_some() || mem1,
        (None, Some(_)) => g0.is_some() || mem0,
        _ => false,
    };
    if !ok {
        return None;
    }
    cg.sse_guard();
    if mem0 || mem1 {
        let mo = crate::frontend::uop::memop(insn);
        cg.ea(&mo, true);
        cg.translate(w, if mem0 { Acc::Write } else { Acc::Read });
    }
    match (x1, g1, w) {
        (Some(s), _, 4) => a!(cg; mov eax, DWORD [rbx + xmm_off(s)]),
        (Some(s), _, _) => a!(cg; mov rax, QWORD [rbx + xmm_off(s)]),
        (None, Some(g), _) => cg.ld(0, w, Opnd::Reg { idx: g, hi: false }),
        (None, None, 4) => a!(cg; mov eax, DWORD [rsi]),
        (None, None, _) => a!(cg; mov rax, QWORD [rsi]),
    }
    // rax holds the value zero-extended to 64 bits.
    match (x0, g0, w) {
        (Some(d), _, _) => a!(cg
            ; mov QWORD [rbx + xmm_off(d)], rax
            ; mov QWORD [rbx + xmm_off(d) + 8], 0
        ),
        (None, Some(g), _) => cg.st(0, w, Opnd::Reg { idx: g, hi: false }),
        (None, None, 4) => a!(cg; mov DWORD [rsi], eax),
        (None, None, _) => a!(cg; mov QWORD [rsi], rax),
    }
    Some(Done::Next)
}

/// The host has the leaf 1 ECX feature bits `bits` (SSSE3, SSE4.2).
fn host_leaf1_ecx(bits: u32) -> bool {
    std::arch::x86_64::__cpuid(1).ecx & bits == bits
}

/// PSHUFB, PALIGNR (SSSE3) and PCMPISTRI (SSE4.2) on XMM registers, as
/// the host instruction when the host has them: glibc's string functions
/// (strcspn, strspn, memmove) pick these once they are advertised. The
/// guest's CPUID may hide them (`--cpu-model portable`): then, as for a
/// TLB miss, the stub lets the interpreter raise #UD. The legacy m128
/// forms of PSHUFB and PALIGNR need alignment, PCMPISTRI's does not.
fn sse_v2(cg: &mut Cg, u: &Uop) -> Option<Done> {
    use iced_x86::OpKind;
    use Mnemonic as M;
    let insn = &u.insn;
    let m = insn.mnemonic();
    let (bit, imm, aligned) = match m {
        M::Pshufb => (9, false, true),
        M::Palignr => (9, true, true),
        M::Pcmpistri => (20, true, false),
        _ => return None,
    };
    if insn.encoding() != iced_x86::EncodingKind::Legacy
        || u.lock
        || insn.op_count() != 2 + imm as u32
        || !host_leaf1_ecx(1 << bit)
    {
        return None;
    }
    let d = xmm_of(insn, 0)?;
    let x1 = xmm_of(insn, 1);
    let mem1 = insn.op_kind(1) == OpKind::Memory;
    if x1.is_none() && !mem1 {
        return None;
    }
    cg.begin_access();
    let stub = cg.stub_label();
    a!(cg
        ; test DWORD [rbx + OFF_HIDDEN_L1ECX], 1 << bit
        ; jnz =>stub
    );
    cg.sse_guard();
    if mem1 {
        let mo = crate::frontend::uop::memop(insn);
        cg.ea(&mo, true);
        cg.translate(16, Acc::Read);
        if aligned {
            a!(cg; test sil, 15 ; jnz =>stub);
        }
    }
    a!(cg; movdqu xmm0, [rbx + xmm_off(d)]);
    if let Some(s) = x1 {
        a!(cg; movdqu xmm1, [rbx + xmm_off(s)]);
    }
    let i8 = if imm { insn.immediate8() as i8 } else { 0 };
    match m {
        M::Pshufb => sse2!(cg, mem1, pshufb),
        M::Palignr => {
            if mem1 {
                a!(cg; palignr xmm0, [rsi], i8);
            } else {
                a!(cg; palignr xmm0, xmm1, i8);
            }
        }
        _ => {
            if mem1 {
                a!(cg; pcmpistri xmm0, [rsi], i8);
            } else {
                a!(cg; pcmpistri xmm0, xmm1, i8);
            }
            // The index in ECX (zero-extended), CF ZF SF OF set, AF PF
            // cleared.
            cg.wrote_flags();
            cg.sq(1, 1);
            return Some(Done::Next);
        }
    }
    a!(cg; movdqu [rbx + xmm_off(d)], xmm0);
    Some(Done::Next)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Host instructions of the inline TLB path for an access of `size`
    /// bytes, all of them on a hit (the branches to the stub not taken),
    /// with the guest flags already saved.
    fn hit_path(size: u8, acc: Acc) -> Vec<String> {
        let mut cg = Cg::new(false);
        cg.loc = IN_ST;
        cg.translate(size, acc);
        let stub = cg.cur_stub.expect("a stub label");
        a!(cg; =>stub);
        let code = cg.a.finalize().expect("assembled");
        let mut d = iced_x86::Decoder::new(64, &code, 0);
        let mut out = Vec::new();
        while d.can_decode() {
            out.push(d.decode().to_string());
        }
        out
    }

    /// TCG's softmmu hit is ~8-9 host instructions; this path was 19 for a
    /// read and 22 for a write (from the index to the host address) before
    /// the tags said "allowed" by themselves and the entry held an addend.
    #[test]
    fn the_inline_tlb_hit_is_short() {
        for size in [1, 2, 4, 8] {
            let r = hit_path(size, Acc::Read);
            assert_eq!(r.len(), 9, "{r:#?}");
            let w = hit_path(size, Acc::Write);
            assert_eq!(w.len(), 12, "{w:#?}");
            assert!(r.last().unwrap().starts_with("add rsi,"), "{r:#?}");
        }
    }
}
