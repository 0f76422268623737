//! The one seam between the VMM and whatever runs guest instructions.
//!
//! A [`Hypervisor`] makes [`Vm`]s; a [`Vm`] owns guest memory mappings, the
//! interrupt controllers and makes [`Vcpu`]s. A vCPU runs guest code until
//! something only the VMM can answer and returns a [`VcpuExit`]. Devices only
//! ever see exits and [`IrqLine`]s, never the backend behind them.

pub mod cpuid;
pub mod kvm;
mod kvm_irq;
mod ram_bitmap;
mod regs;
mod snapshot;
pub mod stats;

pub use cpuid::{CpuModel, CpuidEntry};
pub use ram_bitmap::{DeviceWriteWatch, RamBitmap};
pub use regs::*;
pub use snapshot::{StateError, VcpuSnapshot, VmSnapshot};

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// Guest RAM as the VMM and its devices access it: vm-memory's mmap backend
/// with a page bitmap ([`RamBitmap`]) that every write through vm-memory
/// marks (virtio used rings, block reads, net RX, ...). Live migration
/// reads and resets it to learn which pages devices wrote; vCPU writes go
/// to the backend's own dirty log ([`Vm::dirty_log`]), which does not see
/// device writes. A backend that translates guest code also hears of each
/// device write through the bitmap ([`Vm::device_write_watch`]).
pub type GuestRam = vm_memory::GuestMemoryMmap<RamBitmap>;

/// Errors of a vCPU backend.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("no KVM on this host: {0}: {1}; use --accel emu (software virtualization) instead")]
    KvmMissing(String, std::io::Error),
    #[error(
        "cannot open {0}: permission denied; add your user to the 'kvm' group, or use --accel emu"
    )]
    KvmPermission(String),
    #[error("cannot open {0}: {1}; use --accel emu")]
    KvmOpen(String, std::io::Error),
    #[error("KVM API version {0} is not supported (need 12)")]
    KvmApiVersion(i32),
    #[error("KVM lacks a capability Vireo needs: {0}")]
    KvmCapability(&'static str),
    #[error("{op} failed: {source}")]
    Ioctl {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// Saved backend state that cannot be restored here (made by another
    /// accelerator, malformed, or contradicting the VM it is loaded into).
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, HypervisorError>;

/// Which technique runs the guest's instructions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelKind {
    Kvm,
    Emu,
}

/// Why a vCPU stopped and handed control back to the VMM.
///
/// Data buffers borrow from the vCPU: the VMM fills `IoIn`/`MmioRead`
/// buffers in place, and the backend hands them to the guest on the next
/// [`Vcpu::run`].
#[derive(Debug)]
pub enum VcpuExit<'a> {
    IoIn {
        port: u16,
        data: &'a mut [u8],
    },
    IoOut {
        port: u16,
        data: &'a [u8],
    },
    MmioRead {
        addr: u64,
        data: &'a mut [u8],
    },
    MmioWrite {
        addr: u64,
        data: &'a [u8],
    },
    /// The vCPU executed HLT with nothing to wake it (only seen when the
    /// backend does not handle HLT itself).
    Halt,
    /// The guest triple-faulted or otherwise asked for a reset of the CPU.
    Shutdown,
    /// The guest asked for a system reset (e.g. through a PSCI-like event).
    SystemReset,
    /// The guest powered off through a backend-handled path.
    SystemPowerOff,
    /// The run was interrupted (a signal or a kick); nothing to do.
    Interrupted,
    /// The backend could not go on: the failing instruction, where, and why.
    InternalError(Box<InternalError>),
    /// Something the backend reports but the VMM has no handler for.
    Unknown(String),
    /// A debugger's stop (see [`Vcpu::set_guest_debug`]): a breakpoint or
    /// watchpoint hit, or a single step done. Only seen while guest
    /// debugging is enabled; the guest itself saw nothing.
    Debug(DebugStop),
}

/// What a host debugger (the gdb stub) asks a vCPU to stop on. The guest
/// does not see any of it: no #DB or #BP is delivered to the guest for
/// these, and the guest's own DR0-DR7 and TF keep working for the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestDebug {
    /// Run one instruction, then stop with [`DebugStop::Step`].
    pub single_step: bool,
    /// Stop before the instruction at any of these RIPs runs.
    pub breakpoints: Vec<u64>,
    /// Stop after an access to any of these linear ranges.
    pub watchpoints: Vec<Watchpoint>,
}

impl GuestDebug {
    /// Is there anything to stop on?
    pub fn is_active(&self) -> bool {
        self.single_step || !self.breakpoints.is_empty() || !self.watchpoints.is_empty()
    }
}

/// Which accesses a watchpoint stops on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchKind {
    Write,
    Read,
    ReadWrite,
}

/// A data watchpoint: `len` bytes (1, 2, 4 or 8, aligned) at `addr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watchpoint {
    pub addr: u64,
    pub len: u64,
    pub kind: WatchKind,
}

/// Why a vCPU stopped for the debugger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DebugStop {
    /// Before the instruction at this RIP (a breakpoint).
    Breakpoint(u64),
    /// After an access to the watchpoint at this address.
    Watchpoint(u64),
    /// One instruction (or the delivery of an interrupt) is done.
    Step,
}

/// What a backend knows about an instruction it could not execute.
#[derive(Debug, Clone)]
pub struct InternalError {
    pub reason: String,
    /// Guest RIP (linear address of the failing instruction).
    pub rip: u64,
    /// The instruction bytes, as many as could be read (up to 15).
    pub insn: Vec<u8>,
    pub regs: Option<StandardRegs>,
    pub sregs: Option<SpecialRegs>,
}

impl std::fmt::Display for InternalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at RIP {:#x}", self.reason, self.rip)?;
        if !self.insn.is_empty() {
            write!(f, ", instruction bytes")?;
            for b in &self.insn {
                write!(f, " {b:02x}")?;
            }
        }
        if let Some(s) = &self.sregs {
            write!(
                f,
                " (CS {:#x} CPL {} CR0 {:#x} CR3 {:#x} CR4 {:#x} EFER {:#x})",
                s.cs.selector, s.cs.dpl, s.cr0, s.cr3, s.cr4, s.efer
            )?;
        }
        Ok(())
    }
}

/// An interrupt line into the guest's interrupt controllers, as a device sees it.
pub trait IrqLine: Send + Sync {
    /// Raise an edge (assert then deassert) on the line.
    fn trigger(&self) -> Result<()>;
}

impl std::fmt::Display for AccelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AccelKind::Kvm => "kvm",
            AccelKind::Emu => "emu",
        })
    }
}

fn no_snapshots<T>(what: &str) -> Result<T> {
    Err(HypervisorError::Other(format!(
        "{what}: snapshots are not supported by this accelerator yet"
    )))
}

/// A vCPU backend family (KVM, the software engine).
pub trait Hypervisor: Send + Sync {
    fn kind(&self) -> AccelKind;
    /// Make an empty VM with its interrupt controllers and timers.
    fn create_vm(&self) -> Result<Arc<dyn Vm>>;
    /// Kernel command-line arguments this host needs so that a Linux guest
    /// avoids instructions the backend cannot run (empty on healthy hosts).
    fn guest_workarounds(&self) -> Vec<String> {
        Vec::new()
    }
    /// Every CPUID feature this accelerator can offer a guest (the leaves
    /// of [`cpuid::RECORDED_LEAVES`]): what a restored guest's features
    /// are checked against.
    fn supported_cpuid(&self) -> Result<Vec<CpuidEntry>>;
}

/// A virtual machine: memory, interrupt controllers, vCPUs.
pub trait Vm: Send + Sync {
    /// Map `size` bytes of host memory at `host_addr` into the guest at `guest_addr`.
    ///
    /// # Safety
    /// `host_addr..host_addr+size` must stay mapped and valid for the VM's lifetime.
    unsafe fn map_memory(
        &self,
        slot: u32,
        guest_addr: u64,
        size: u64,
        host_addr: u64,
    ) -> Result<()>;
    /// Make the vCPU with the given index; `count` is the total the VM will have.
    fn create_vcpu(&self, index: u32, count: u32) -> Result<Box<dyn Vcpu>>;
    /// An edge-triggered interrupt line for a GSI (0-23 are the IOAPIC pins).
    fn irq_line(&self, gsi: u32) -> Result<Arc<dyn IrqLine>>;
    /// Deliver a message-signalled interrupt (what a PCI device's MSI or
    /// MSI-X table entry says: the address 0xfeeXXXXX and the data word).
    fn signal_msi(&self, addr: u64, data: u32) -> Result<()>;
    /// Have guest writes of any size to the MMIO address `addr` signal
    /// `event` without leaving the vCPU (KVM's ioeventfd). `Ok(false)` when
    /// the backend has no such path (the engine): writes then reach the
    /// device as ordinary MMIO exits.
    fn register_mmio_notify(&self, _addr: u64, _event: &EventFd) -> Result<bool> {
        Ok(false)
    }
    /// Undo [`Vm::register_mmio_notify`] (the BAR moved or went away).
    fn unregister_mmio_notify(&self, _addr: u64, _event: &EventFd) -> Result<()> {
        Ok(())
    }
    /// The interrupt controllers', timers' and clock's state (VM paused).
    fn save_state(&self) -> Result<VmSnapshot> {
        no_snapshots("VM state")
    }
    /// Load what [`Vm::save_state`] returned, after the vCPUs exist.
    fn restore_state(&self, _state: &VmSnapshot) -> Result<()> {
        no_snapshots("VM state")
    }
    /// Whom the devices' writes into memory slot `slot` (as given to
    /// [`Vm::map_memory`]) must reach besides the dirty bitmap: a backend
    /// that translates guest code drops translations of the pages written
    /// there (instruction fetch sees DMA on real hardware). None (KVM: the
    /// CPU itself is coherent) unless the backend needs it. The VMM
    /// installs it in the slot's [`RamBitmap`] right after mapping it.
    fn device_write_watch(&self, _slot: u32) -> Option<Arc<dyn DeviceWriteWatch>> {
        None
    }
    /// Start recording which 4 KiB guest pages the vCPUs write (live
    /// migration). Writes by the VMM's own threads (devices) are not seen.
    fn start_dirty_log(&self) -> Result<()> {
        Err(HypervisorError::Other(
            "dirty page tracking is not supported by this accelerator".into(),
        ))
    }
    /// The pages of memory slot `slot` (as given to [`Vm::map_memory`])
    /// written since dirty logging started or since the last call, which
    /// resets them: bit `i % 64` of word `i / 64` is page `i` of the slot.
    fn dirty_log(&self, _slot: u32) -> Result<Vec<u64>> {
        Err(HypervisorError::Other(
            "dirty page tracking is not supported by this accelerator".into(),
        ))
    }
    /// Stop recording written pages.
    fn stop_dirty_log(&self) -> Result<()> {
        Ok(())
    }
    /// Show the vCPUs made from now on exactly this CPUID (features cut to
    /// what the accelerator supports; per-vCPU fields such as APIC IDs
    /// still set per vCPU). Backends that show one fixed CPU refuse.
    fn set_guest_cpuid(&self, _entries: &[CpuidEntry]) -> Result<()> {
        Err(HypervisorError::Other(
            "this accelerator shows one fixed CPUID".into(),
        ))
    }
}

/// A way to make a vCPU's [`Vcpu::run`] return `Interrupted` from another thread.
pub trait VcpuKicker: Send + Sync {
    fn kick(&self);
}

/// One virtual CPU, owned by one thread.
pub trait Vcpu: Send {
    fn index(&self) -> u32;
    /// Run guest code until the next exit.
    fn run(&mut self) -> Result<VcpuExit<'_>>;
    fn get_regs(&self) -> Result<StandardRegs>;
    fn set_regs(&mut self, regs: &StandardRegs) -> Result<()>;
    fn get_sregs(&self) -> Result<SpecialRegs>;
    fn set_sregs(&mut self, sregs: &SpecialRegs) -> Result<()>;
    /// Load a whole boot state: registers, segments, control registers, and
    /// the FPU/MSR defaults of a CPU just out of reset.
    fn set_boot_state(&mut self, state: &CpuState) -> Result<()> {
        self.set_sregs(&state.sregs)?;
        self.set_regs(&state.regs)
    }
    /// Something another thread can use to interrupt `run`.
    fn kicker(&self) -> Arc<dyn VcpuKicker>;
    /// Finish an instruction whose I/O exit the VMM has answered, without
    /// running further guest code: needed before reading a consistent state.
    fn complete_pending_io(&mut self) -> Result<()> {
        Ok(())
    }
    /// Everything about this vCPU, while it is not running.
    fn save_state(&self) -> Result<VcpuSnapshot> {
        no_snapshots("vCPU state")
    }
    fn restore_state(&mut self, _state: &VcpuSnapshot) -> Result<()> {
        no_snapshots("vCPU state")
    }
    /// The CPUID leaves of [`cpuid::RECORDED_LEAVES`] as this vCPU shows them.
    fn guest_cpuid(&self) -> Result<Vec<CpuidEntry>>;
    /// The rate of the guest's TSC, in kHz, if known.
    fn tsc_khz(&self) -> Option<u32> {
        None
    }
    /// The counters a software accelerator keeps for this vCPU, readable
    /// while it runs (see [`stats`]); None where the hardware keeps them.
    fn engine_counters(&self) -> Option<Arc<stats::EngineCounters>> {
        None
    }
    /// Arm (or, with an inactive [`GuestDebug`], disarm) the host
    /// debugger's breakpoints, watchpoints and single-stepping; `run`
    /// then returns [`VcpuExit::Debug`] when one is hit.
    fn set_guest_debug(&mut self, _debug: &GuestDebug) -> Result<()> {
        Err(HypervisorError::Other(
            "this accelerator cannot debug its guest".into(),
        ))
    }
    /// Run the guest's TSC at `khz` (refused where the rate is fixed).
    fn set_tsc_khz(&mut self, khz: u32) -> Result<()> {
        Err(HypervisorError::Other(format!(
            "this accelerator cannot run the guest TSC at {khz} kHz"
        )))
    }
}
