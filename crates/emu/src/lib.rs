//! Vireo's software x86-64 CPU engine (`--accel emu`).
//!
//! Module map, from the top:
//! - [`backend`]: `EmuHypervisor` / `EmuVm` / `EmuVcpu`, the `hypervisor` seam;
//!   [`state`]: the engine's saved vCPU and platform state and its checks;
//!   [`convert`]: that state to KVM's form and back.
//! - [`cpu_exec`]: the run loop of one vCPU (interrupt polls, HLT, block
//!   dispatch to the translator or the interpreter, exits).
//! - [`core`]: the vCPU ([`core::Core`]) and the types its parts share.
//! - CPU state: [`cpu`] (architectural registers, [`cpu::ArchRegs`]),
//!   [`flags`] (lazy arithmetic flags: the last flag-setting operation is
//!   recorded, flags are computed when read), [`seg`] (segment loads,
//!   descriptor tables), [`msr`], [`cpuid`], [`exception`] (delivery
//!   through the IVT/IDT).
//! - [`memory`]: the memory path: guest-physical memory ([`memory::mem`]),
//!   paging and the software TLB ([`memory::mmu`]), one vCPU's linear,
//!   segmented, MMIO and port accesses ([`memory::access`]).
//! - [`frontend`]: guest code to blocks ([`frontend::decode`]) of compact
//!   uops with pre-resolved operands ([`frontend::uop`]).
//! - [`exec`]: the interpreter, split by instruction family.
//! - [`jit`]: the translating tier (hot 64-bit blocks to host x86-64 code
//!   with dynasm-rs, chained block to block: [`jit::runtime`] and its code
//!   generator).
//! - [`platform`]: the one trait the core calls for everything outside the
//!   CPU ([`platform::VcpuPlatform`]: interrupt polls, HLT sleep, INIT/SIPI,
//!   the ports and MMIO the platform serves, its MSRs, time), with the PC
//!   platform ([`platform::pc`]: LAPIC, IOAPIC, PIC, PIT, kvmclock from
//!   `emu-platform`) and an adapter over an embedder's interrupt controller
//!   ([`platform::irq`], [`platform::ControllerLink`]).
//!
//! # Wiring it into a VMM
//!
//! [`EmuHypervisor`] makes PC-mode VMs ([`EmuVm::new_pc`]): the platform
//! ([`platform::pc`]) is inside the engine, ports and MMIO of the PIC, PIT, IOAPIC
//! and LAPIC never exit, HLT with IF=1 sleeps in `run`, APs wait for SIPI,
//! and `irq_line`/`signal_msi` reach the APICs. Only the VMM's own devices
//! see exits, and `Halt` comes only from HLT with IF=0. The rest of this
//! section is for a bare [`EmuVm::new`] with an embedder's controller:
//!
//! - Make an [`EmuVm`], then before creating vCPUs: plug the platform in
//!   with [`EmuVm::set_interrupt_controller`] (an adapter from
//!   `emu_platform::SharedPlatform` to [`InterruptController`] is a one-line
//!   forward per method: see the one in `platform/pc.rs`) and say what it provides
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
//! as [`state::EmuVcpuState`]; the platform with its timers in guest
//! nanoseconds as [`state::EmuVmState`]. The seam carries them opaquely
//! (`hypervisor::VcpuSnapshot` / `VmSnapshot`); they are decoded and checked
//! once ([`state`]) before they reach a live vCPU. A restored VM's clock
//! resumes at the saved guest time, so the TSC, kvmclock and timers go on
//! from there. [`convert`] turns them into KVM's form and back
//! (cross-accelerator restore and migration).
//!
//! # Status
//!
//! Debian's 6.1 cloud kernel boots to its initramfs and powers off, with one
//! or two vCPUs (`vireo run --accel emu`; vireo/tests/linux_emu.rs). Blocks run through the uop
//! interpreter until they are hot; hot 64-bit blocks are then compiled to
//! host code by the translating tier ([`jit`]), which runs a boot at about
//! 150-200 M guest instructions per CPU-second. The embedder sets
//! the threshold with [`jit::JitConfig`] (the `vireo` binary reads
//! `VIREO_JIT`: `off` keeps everything interpreted, `N` compiles a block on
//! its N-th run; 0 compiles on the first, which the tests use to force
//! every block through the translator). Not implemented:
//! TF single-step and debug-register breakpoints, segment limit checks,
//! hardware task switches and call gates, virtual-8086 mode, the TSS I/O
//! bitmap, MMX, SSE3 and later, 80-bit x87 arithmetic (computed in f64),
//! MXCSR exception flags.

pub mod backend;
pub mod convert;
pub mod core;
pub mod cpu;
pub mod cpu_exec;
pub mod cpuid;
pub mod debug;
pub mod exception;
pub mod exec;
pub mod flags;
pub mod frontend;
pub mod jit;
pub mod memory;
pub mod msr;
pub mod platform;
pub mod seg;
pub mod state;

pub use backend::{EmuHypervisor, EmuVcpu, EmuVm};
pub use platform::irq::{InterruptController, QueueInterruptController};
pub use platform::pc::{Pc, PcBoard};
pub use platform::{ControllerLink, VcpuPlatform};
