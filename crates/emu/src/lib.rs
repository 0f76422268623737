//! Vireo's software x86-64 CPU engine (`--accel emu`).
//!
//! Module map:
//! - [`cpu`]: architectural register state (GPRs, segments, control registers, MSRs).
//! - [`flags`]: lazy arithmetic flags (the last flag-setting operation is recorded,
//!   individual flags are computed only when something reads them).
//! - [`mem`]: guest-physical memory: host-mapped RAM regions, MMIO holes and
//!   per-page code tracking for self-modifying code.
//! - [`mmu`]: linear-to-physical translation (paging walks, A/D bits, permission
//!   checks) behind a software TLB.
//! - [`decode`]: the per-basic-block decode cache keyed by physical address.
//! - [`uop`]: the compact cached instruction form with pre-resolved operands
//!   and a handler per hot instruction form.
//! - [`exec`]: the interpreter, split by instruction family.
//! - [`exception`]: exception and interrupt delivery through the IVT/IDT.
//! - [`seg`]: segment register loads and descriptor-table access.
//! - [`cpuid`], [`msr`]: what the engine advertises and its model-specific registers.
//! - [`core`]: the run loop that ties the above together for one vCPU.
//! - [`backend`]: `EmuHypervisor` / `EmuVm` / `EmuVcpu`, the `hypervisor` seam.
//! - [`irq`]: the interface an interrupt-controller model plugs into.
//! - [`pc`]: the PC platform inside the engine (LAPIC, IOAPIC, PIC, PIT,
//!   kvmclock from `emu-platform`): device access, interrupt polling, HLT
//!   sleep, INIT/SIPI.

pub mod backend;
pub mod core;
pub mod cpu;
pub mod cpuid;
pub mod decode;
pub mod exception;
pub mod exec;
pub mod flags;
pub mod irq;
pub mod mem;
pub mod mmu;
pub mod msr;
pub mod pc;
pub mod seg;
pub mod uop;

pub use backend::{EmuHypervisor, EmuVcpu, EmuVm};
pub use irq::{InterruptController, QueueInterruptController};
pub use pc::{Pc, PcBoard};
