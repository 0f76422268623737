//! What a software accelerator counts about one vCPU, published for
//! monitoring while the vCPU runs (the vCPU itself is locked by its thread
//! then, so these live beside it, shared).
//!
//! Invariant: only the vCPU's own thread writes them, at points where it
//! already stops to look around (the engine's interrupt poll and its
//! return to the VMM), with relaxed stores: nothing is added to the code
//! that runs guest instructions. Values may lag the vCPU by one poll
//! interval.

use metrics::Counter;
use serde::{Deserialize, Serialize};

/// One engine vCPU's counters.
#[derive(Debug, Default)]
pub struct EngineCounters {
    /// Guest instructions retired.
    pub instructions: Counter,
    /// Blocks compiled to host code by the translator.
    pub blocks_translated: Counter,
    /// Bytes of host code in the translation cache now (a gauge).
    pub code_cache_bytes: Counter,
    /// Times the translation and block caches were emptied.
    pub cache_flushes: Counter,
    /// Full flushes of the software TLB.
    pub tlb_flushes: Counter,
    /// External interrupts and NMIs delivered to the guest.
    pub interrupts: Counter,
    /// Paravirtual kicks (`KVM_HC_KICK_CPU`) this vCPU sent: how often a
    /// guest spinlock's unlocker woke a waiter that had halted.
    pub pv_kicks: Counter,
}

/// [`EngineCounters`] at one time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineStats {
    pub instructions: u64,
    pub blocks_translated: u64,
    pub code_cache_bytes: u64,
    pub cache_flushes: u64,
    pub tlb_flushes: u64,
    pub interrupts: u64,
    #[serde(default)]
    pub pv_kicks: u64,
}

impl EngineCounters {
    pub fn snapshot(&self) -> EngineStats {
        EngineStats {
            instructions: self.instructions.get(),
            blocks_translated: self.blocks_translated.get(),
            code_cache_bytes: self.code_cache_bytes.get(),
            cache_flushes: self.cache_flushes.get(),
            tlb_flushes: self.tlb_flushes.get(),
            interrupts: self.interrupts.get(),
            pv_kicks: self.pv_kicks.get(),
        }
    }
}
