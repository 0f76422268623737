//! The translating tier: hot blocks compiled to host x86-64 code.
//!
//! A block that has run [`Jit::threshold`] times is compiled with dynasm-rs
//! into a function `extern "sysv64" fn(*mut Core) -> u64`. The generated
//! code keeps guest RSP, RAX, RDI and RSI in r12-r15 in every block (a
//! fixed register map), so a chained link hands them on in host registers
//! with no write-back or reload; they are written back to `Core::st` only
//! on the way back to the dispatcher, before a call into the interpreter
//! (inline or from a slow-path stub) and at a stale-code exit, and loaded
//! at the entry from the dispatcher and after the interpreter ran. A
//! block's most used other guest GPRs live in r10 and rdi, and where it
//! pays in the host registers of fixed ones it does not use (those written
//! back at its entry and reloaded at its exits), from block entry to its
//! exits; the rest stay in `Core::st` (see `codegen`'s module docs for the
//! invariant). It runs the common integer instructions
//! (MOV/MOVZX/MOVSX/LEA, the ALU group, INC/DEC/NEG/NOT, shifts and
//! rotates, MUL/IMUL, CMOVcc/SETcc, PUSH/POP, CALL/RET/JMP/Jcc) with the
//! same host instruction, so results and flags are the host CPU's; where
//! the destination is a cached register, the common forms are that one
//! instruction on it (no moves through scratch registers).
//!
//! SSE2 moves (MOVAPS/MOVUPS/MOVDQA/MOVDQU), the common packed-integer
//! operations (PXOR/POR/PAND/PANDN, PCMPEQ*/PCMPGTB, PADD*/PSUB*,
//! PMINUB/PMAXUB, PUNPCKL*, PSHUFD) and PMOVMSKB run as the same host
//! instruction on xmm0/xmm1 loaded from `CpuState::xmm`, behind a
//! once-per-block CR0.EM/TS and CR4.OSFXSR guard and an alignment check
//! for the aligned forms (failing either runs the interpreter, which
//! raises the fault).
//!
//! Memory operands go through an inline lookup of the soft TLB, TCG's
//! softmmu hit: the fast entry of the current privilege class holds a read
//! and a write tag that equal the page's linear address only where that
//! access is allowed at that class and needs nothing else (RAM, the dirty
//! bit set for writes; see `memory::mmu::FastEntry`), so one compare
//! checks the tag, the permissions and a page crossing, and a hit adds the
//! entry's host addend; a write also tests the page's code/dirty-tracking
//! flag. Anything else, and every instruction the translator does
//! not handle, runs through the interpreter's own handler for that one
//! instruction (`jit_interp`), called from the generated code: exceptions,
//! MMIO, self-modifying code and mode changes are therefore exactly the
//! interpreter's, and correctness never depends on coverage.
//!
//! Flags: the dispatcher settles the lazy flags (`CpuState::rflags` holds
//! them) and a block's code starts from them as a LAHF/SETO image in r11;
//! translated instructions leave them in the host RFLAGS, which are saved
//! (PUSHFQ) to a slot before code that clobbers them unless the r11 image
//! is still current, and put back in the host (SAHF from the image, POPFQ
//! from a slot) only when an instruction reads them. A chained exit hands
//! them to its successor in r11 (LAHF/SETO, no PUSHFQ and no write to
//! `rflags`); every path back to the dispatcher, the interpreter or a
//! fault writes them to `rflags` with no pending lazy operation.
//!
//! Chaining: every exit with a known target (JMP, both sides of Jcc, CALL,
//! fall-through) has a [`LinkCell`] in its block; RET and indirect
//! JMP/CALL (register or memory operand) look their computed target up in
//! a per-core table of dynamic cells, hashed by target RIP (TCG's
//! lookup_and_goto_ptr in a few instructions). The dispatcher fills a cell
//! when the exit's successor is compiled, and patches the exit's direct
//! jump to lead into the successor's code (TCG's goto_tb: see
//! [`runtime`]); the code follows it only while the link holds (the same TLB
//! epoch and CPL as when it was made, or else a TLB entry that still maps
//! the target's page to the successor's physical page: see [`runtime`];
//! blocks are keyed by physical address, so an address-space switch does
//! not unlink them; a link within one physical page holds under any key
//! and is followed without the check) and
//! when the run loop would have gone on to that block anyway: the core's
//! one "work pending" word (`Core::attention`, set by kicks, platform
//! events, the timer thread and poll requests) is clear, and on a
//! platform without a timer source no poll is due by the 64-block
//! countdown; an
//! interrupt shadow or HLT always ends the block through the interpreter,
//! so they need no check there. The successor re-checks its code pages on
//! entry. So interrupts are taken at the same block boundaries as in the
//! interpreter, and instruction counts are the same.
//!
//! A block whose conditional branch goes back to its own start (a loop of
//! one block: string scans, copy and checksum loops) loops inside its own
//! code when the branch is taken and the attention word is clear: the
//! Jcc jumps on the host flags to a back edge in front of the body, which
//! tests the attention word, counts the iteration and jumps back with
//! every cached register live in its host register. The flags stay in the
//! r11 image, or, when the body writes every flag before it reads any,
//! in the host flags untouched by the test (captured only on the way
//! out). No link cell, key, code-page check or indirect jump is involved:
//! a write of this vCPU to the block's code pages ends the block or raises
//! the attention word, and another vCPU's or a device's is seen at the next
//! attention (see `codegen`'s `Cg::back_edge`). Only blocks without an
//! instruction interpreted inline do this (such an instruction could
//! change the TLB epoch or CPL without ending the block).
//!
//! Return value: the number of guest instructions completed by the last
//! block (the blocks chained from count theirs in a host register, added
//! to `Core::icount` when the code returns); an exception raised by an
//! interpreted instruction is left in [`Jit::exc`].
//!
//! Read-modify-writes on memory with or without LOCK (the ALU group,
//! INC/DEC, XADD, CMPXCHG, XCHG, BTS/BTR/BTC) run as the host instruction
//! on the host address of guest RAM, LOCK included, so they stay atomic
//! against the other vCPU threads; BT*, BSF/BSR, POPCNT, BSWAP, MOVD/MOVQ
//! and DIV (32/64-bit, #DE left to the interpreter) as the host
//! instruction too; REP MOVS/STOS forwards as the host's REP MOVS/STOS
//! when the whole count fits in the current source and destination pages.
//!
//! Not translated (interpreted from the generated code): IDIV, 8/16-bit
//! DIV and one-operand MUL/IMUL, the other string forms (and REP MOVS/STOS
//! with DF set or beyond one page, or outside 64-bit mode), LZCNT/TZCNT,
//! floating point and the SSE forms not listed above.
//!
//! 32- and 16-bit code (protected mode, compatibility mode, real and
//! virtual-8086 mode) is compiled by the same code generator: a block is
//! decoded for its code size and keyed by it, every memory operand's
//! linear address is its offset (wrapped at the address size) plus the
//! base of its segment read from `Core` at run time, truncated to 32 bits
//! (the interpreter checks no segment limit or type, so neither does the
//! translated code); PUSH/POP/CALL/RET use the stack size (SS.B) the block
//! was compiled with, behind a check of SS.B at each access that sends the
//! other size to the interpreter; near branches of every operand size are
//! exits like the 64-bit ones (their targets wrapped by the decoder as the
//! interpreter has them). A block is keyed by EIP and the physical address
//! of its code, and a link leads from an EIP: so a change of the CS base
//! or of the code size moves the link key as a TLB flush does
//! (`Core::note_code_mode`, checked by the dispatcher: every instruction
//! that loads CS ends its block), and outside 64-bit mode a link made
//! under an older key is not revalidated against the TLB (its target's
//! linear address depends on the CS base) but goes to the dispatcher.
//! Instructions that only exist outside 64-bit mode (PUSHA/POPA, BCD
//! arithmetic, segment loads, far transfers, ...) run through the
//! interpreter inline, like anything else not translated.
//!
//! # Layout
//!
//! - [`runtime`]: what lives while translations run: the per-core [`Jit`]
//!   state and its executable arena, the hot-block counter
//!   ([`code_for`]), link cells and linking, the interpreter helper the
//!   generated code calls, and the per-entry context ([`prepare`]).
//! - `codegen`: the dynasm emission of one block, uop by uop, with the
//!   `Core` field offsets the generated code addresses through `rbx`.
//!
//! Configuration ([`JitConfig`]) is a plain value given by the embedder
//! (the `vireo` binary reads `VIREO_JIT` / `VIREO_JIT_PERFMAP`); the
//! library never reads the environment.

mod codegen;
pub mod runtime;
#[cfg(feature = "jit-trips")]
pub mod trips;

/// Why compiled code went back to the dispatcher: what its exit path
/// leaves in `JitCtx::trip` (only in a `jit-trips` build, see `trips`).
pub(crate) mod why {
    /// The attention word was set, or a timed poll was due.
    pub const BUSY: u8 = 1;
    /// The exit's link did not hold (never linked, made under another key
    /// and the TLB check failed, or from an older arena generation).
    pub const UNLINKED: u8 = 2;
    /// A RET or indirect target that the dynamic table does not hold.
    pub const DYN_MISS: u8 = 3;
    /// The successor's code pages were written (its entry check).
    pub const STALE: u8 = 4;
    /// An instruction run through the interpreter ended the block.
    pub const INTERP: u8 = 5;
}

pub use runtime::{code_for, link, linked_block, prepare, Jit, JitCtx, LinkCell};

use crate::core::Core;

/// Compiled code of one block.
pub type JitFn = unsafe extern "sysv64" fn(*mut Core) -> u64;

/// A block's translation state.
#[derive(Clone, Copy, Default)]
pub enum JitState {
    /// Executions so far.
    #[default]
    Cold,
    Counting(u32),
    /// Code, the arena generation it was written in, and the entry point
    /// for chained code (checks the block's pages first).
    Code(JitFn, u64, usize),
    /// Not worth translating (nothing the translator handles).
    Failed,
}

/// Executions before a block is compiled, by default.
pub const DEFAULT_THRESHOLD: u32 = 32;

/// How the translating tier runs, given by the embedder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JitConfig {
    /// A block is compiled on its N-th execution (0 and 1: on its first);
    /// `None` keeps everything in the interpreter.
    pub threshold: Option<u32>,
    /// Append every translation to /tmp/perf-PID.map so `perf report`
    /// names samples in translated code by guest RIP.
    pub perf_map: bool,
}

impl Default for JitConfig {
    fn default() -> Self {
        JitConfig {
            threshold: Some(DEFAULT_THRESHOLD),
            perf_map: false,
        }
    }
}

impl JitConfig {
    /// The threshold a `VIREO_JIT`-style setting names: `off`/`no` for
    /// none, a number, or (anything else) the default.
    pub fn parse_threshold(s: &str) -> Option<u32> {
        match s.trim() {
            "off" | "no" => None,
            v => v.parse().ok().or(Some(DEFAULT_THRESHOLD)),
        }
    }
}
