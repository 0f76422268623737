//! Dispatcher trips counted by cause: a `jit-trips` build only (`cargo
//! build --release -p vireo -p emu --features emu/jit-trips`); without the
//! feature neither the generated code nor the run loop counts anything.
//!
//! Every call of the run loop's `run_block` is one trip. It either runs
//! compiled code, which comes back for the reason its exit path noted in
//! `JitCtx::trip` (see [`super::why`]), or runs the block in the
//! interpreter, counted by why it was not compiled. The guest instructions
//! run from each trip are counted too, by the code size of its block (16,
//! 32 or 64 bits) and whether compiled code ran them (instructions it runs
//! through the interpreter inline included; chained blocks have the code
//! size of the block entered: a change of it ends the chain). The totals
//! are printed to stderr every 2^21 trips and when the vCPU's engine is
//! dropped.

use super::{why, JitState};

const CAUSES: usize = 11;

const NAMES: [&str; CAUSES] = [
    "compiled code, exit not noted",
    "compiled code, attention word set or timed poll due",
    "compiled code, link not held (never linked, other key and TLB check failed, older arena)",
    "compiled code, RET/indirect target not in the dynamic table",
    "compiled code, successor's code written (entry check)",
    "compiled code, interpreted instruction faulted",
    "compiled code, interpreted instruction did I/O",
    "compiled code, interpreted instruction branched or ended the block",
    "interpreted block, not hot yet",
    "interpreted block, nothing translatable",
    "interpreted block, one instruction only (interrupt shadow, debugging)",
];

/// Trip counts of one vCPU.
#[derive(Default)]
pub struct Trips {
    n: [u64; CAUSES],
    total: u64,
    /// Guest instructions by code size (16, 32, 64 bits) and tier
    /// (interpreted, compiled).
    insns: [[u64; 2]; 3],
    /// The trip running now: its counter and `Core::icount` at its start.
    open: Option<(usize, usize, u64)>,
}

impl Trips {
    /// Compiled code returned, its exit path having noted `trip`; `exc`:
    /// an interpreted instruction faulted, `io`: it asked for I/O.
    pub fn compiled(&mut self, trip: u64, exc: bool, io: bool) {
        let i = match trip as u8 {
            why::BUSY => 1,
            why::UNLINKED => 2,
            why::DYN_MISS => 3,
            why::STALE => 4,
            why::INTERP if exc => 5,
            why::INTERP if io => 6,
            why::INTERP => 7,
            _ => 0,
        };
        self.add(i);
    }

    /// A block ran in the interpreter: its translation state and the
    /// instruction limit it ran under.
    pub fn interpreted(&mut self, state: JitState, limit: usize) {
        let i = if limit != usize::MAX {
            10
        } else if matches!(state, JitState::Failed) {
            9
        } else {
            8
        };
        self.add(i);
    }

    /// A trip starts (`Core::icount` is `icount`): the one before it ended.
    pub fn settle(&mut self, icount: u64) {
        if let Some((b, c, at)) = self.open.take() {
            self.insns[b][c] += icount.wrapping_sub(at);
        }
    }

    /// The trip runs a block of code size `bits`, compiled or not, from
    /// `Core::icount` = `icount` on.
    pub fn runs(&mut self, bits: u32, compiled: bool, icount: u64) {
        let b = match bits {
            16 => 0,
            32 => 1,
            _ => 2,
        };
        self.open = Some((b, compiled as usize, icount));
    }

    fn add(&mut self, i: usize) {
        self.n[i] += 1;
        self.total += 1;
        if self.total & ((1 << 21) - 1) == 0 {
            self.print();
        }
    }

    fn print(&self) {
        let mut s = format!("emu: jit trips: {} in all", self.total);
        for (name, n) in NAMES.iter().zip(self.n) {
            if n > 0 {
                s.push_str(&format!("; {name}: {n}"));
            }
        }
        for (bits, [i, c]) in [16, 32, 64].iter().zip(self.insns) {
            if i + c > 0 {
                s.push_str(&format!(
                    "; {bits}-bit instructions: {i} interpreted, {c} in compiled code"
                ));
            }
        }
        eprintln!("{s}");
    }
}

impl Drop for Trips {
    fn drop(&mut self) {
        if self.total > 0 {
            self.print();
        }
    }
}
