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
//! - [`jit`]: the translating tier (hot 64-bit blocks to host x86-64 code
//!   with dynasm-rs, chained block to block).
//! - [`exception`]: exception and interrupt delivery through the IVT/IDT.
//! - [`seg`]: segment register loads and descriptor-table access.
//! - [`cpuid`], [`msr`]: what the engine advertises and its model-specific registers.
//! - [`core`]: the run loop that ties the above together for one vCPU.
//! - [`backend`]: `EmuHypervisor` / `EmuVm` / `EmuVcpu`, the `hypervisor` seam.
//! - [`irq`]: the interface an interrupt-controller model plugs into.
//! - [`pc`]: the PC platform inside the engine (LAPIC, IOAPIC, PIC, PIT,
//!   kvmclock from `emu-platform`): device access, interrupt polling, HLT
//!   sleep, INIT/SIPI.
//!
//! # Wiring it into a VMM
//!
//! [`EmuHypervisor`] makes PC-mode VMs ([`EmuVm::new_pc`]): the platform
//! ([`pc`]) is inside the engine, ports and MMIO of the PIC, PIT, IOAPIC
//! and LAPIC never exit, HLT with IF=1 sleeps in `run`, APs wait for SIPI,
//! and `irq_line`/`signal_msi` reach the APICs. Only the VMM's own devices
//! see exits, and `Halt` comes only from HLT with IF=0. The rest of this
//! section is for a bare [`EmuVm::new`] with an embedder's controller:
//!
//! - Make an [`EmuVm`], then before creating vCPUs: plug the platform in
//!   with [`EmuVm::set_interrupt_controller`] (an adapter from
//!   `emu_platform::SharedPlatform` to [`InterruptController`] is a one-line
//!   forward per method: see the one in `pc.rs`) and say what it provides
//!   with [`EmuVm::set_cpuid_config`] (APIC, TSC-deadline, kvmclock).
//! - Route `IoIn`/`IoOut` and `MmioRead`/`MmioWrite` exits to the devices
//!   (the platform decodes PIC/PIT ports and the LAPIC/IOAPIC pages); read
//!   exits are completed by filling the buffer and calling `run` again.
//! - `Halt` means "nothing to do until an interrupt": sleep until the
//!   platform's next deadline or a kick, then `run` again.
//! - Hand each vCPU's [`EmuVcpu::irq_attention`] flag to the platform's kick
//!   function; APs start with [`EmuVcpu::set_wait_for_sipi`].
//!
//! # Snapshots
//!
//! `EmuVcpu` and `EmuVm` implement the `hypervisor` snapshot calls: every
//! architectural register (with hidden segment parts, MSRs, x87/SSE), the
//! halt/interrupt-shadow/NMI/SIPI state and a read the VMM had answered,
//! as `hypervisor::EmuVcpuState`; the platform with its timers in guest
//! nanoseconds as `hypervisor::EmuVmState`. A restored VM's clock resumes
//! at the saved guest time, so the TSC, kvmclock and timers go on from
//! there.
//!
//! # Status
//!
//! Debian's 6.1 cloud kernel boots to its initramfs and powers off, with one
//! or two vCPUs (`vireo run --accel emu`; vireo/tests/linux_emu.rs). Blocks run through the uop
//! interpreter until they are hot; hot 64-bit blocks are then compiled to
//! host code by the translating tier ([`jit`]), which runs a boot at about
//! 150-200 M guest instructions per CPU-second. `VIREO_JIT=off` keeps
//! everything interpreted, `VIREO_JIT=N` compiles a block on its N-th run
//! (0: on its first, which the tests use to force every block through the
//! translator). Not implemented:
//! TF single-step and debug-register breakpoints, segment limit checks,
//! hardware task switches and call gates, virtual-8086 mode, the TSS I/O
//! bitmap, MMX, SSE3 and later, 80-bit x87 arithmetic (computed in f64),
//! MXCSR exception flags.

pub mod backend;
pub mod core;
pub mod cpu;
pub mod cpuid;
pub mod decode;
pub mod exception;
pub mod exec;
pub mod flags;
pub mod irq;
pub mod jit;
pub mod mem;
pub mod mmu;
pub mod msr;
pub mod pc;
pub mod seg;
pub mod uop;

pub use backend::{EmuHypervisor, EmuVcpu, EmuVm};
pub use irq::{InterruptController, QueueInterruptController};
pub use pc::{Pc, PcBoard};
