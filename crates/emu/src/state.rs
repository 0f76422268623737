//! What the software engine (`--accel emu`) saves of a vCPU and of its
//! platform: plain serde data owned by the engine, carried through the
//! `hypervisor` seam opaquely as a [`VcpuSnapshot`] / [`VmSnapshot`].
//!
//! Invariant: state that came from outside (a snapshot file, a migration
//! stream, another accelerator's state converted by [`crate::convert`]) is
//! checked once, by [`EmuVcpuState::try_from`] and [`EmuVmState::check`],
//! with an [`EmuStateError`] naming what was wrong, before any of it is
//! loaded into a live vCPU or platform. What passes holds only values the
//! guest itself could have produced (control bits the engine supports, a
//! read of 1, 2, 4 or 8 bytes, one local APIC per vCPU, non-zero clocks).

use hypervisor::{AccelKind, SpecialRegs, StandardRegs, StateError, VcpuSnapshot, VmSnapshot};
use serde::{Deserialize, Serialize};

use crate::cpu::{CR4_SUPPORTED, EFER_LMA, EFER_WRITABLE};

/// Model-specific registers the engine keeps outside the register files.
/// IA32_APIC_BASE is in [`SpecialRegs::apic_base`]; FS/GS bases are in the
/// segment registers; the LAPIC's own MSRs (TSC deadline, x2APIC) are in
/// the platform's state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmuMsrs {
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub sfmask: u64,
    pub kernel_gs_base: u64,
    pub tsc_aux: u64,
    pub pat: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    /// Guest TSC = guest clock (ns, 1 GHz TSC) + this offset (IA32_TSC writes).
    pub tsc_offset: u64,
    /// MSR_KVM_SYSTEM_TIME_NEW / MSR_KVM_WALL_CLOCK_NEW as the guest wrote them.
    pub kvm_system_time: u64,
    pub kvm_wall_clock: u64,
}

/// x87, SSE and MXCSR. 128-bit registers are `[low, high]` 64-bit halves
/// (JSON numbers stay within u64).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmuFpuState {
    pub fcw: u16,
    /// Status word with TOP folded in (bits 13:11), as FNSTSW reads it.
    pub fsw: u16,
    /// Abridged tag word: bit i set = physical register i holds a value.
    pub ftw: u8,
    /// The eight x87 registers by physical index (80 bits in the low bits).
    pub st: [[u64; 2]; 8],
    pub fop: u16,
    pub fip: u64,
    pub fdp: u64,
    pub mxcsr: u32,
    pub xmm: [[u64; 2]; 16],
}

/// A port or MMIO read the vCPU was waiting for when it stopped: the VMM
/// had answered it (`data`), the instruction had not rerun yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmuPendingRead {
    Io { port: u16, size: u8, data: u64 },
    Mmio { addr: u64, size: u8, data: u64 },
}

/// One vCPU of the software engine, between two instructions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmuVcpuState {
    /// GPRs, RIP and RFLAGS (arithmetic flags materialised).
    pub regs: StandardRegs,
    /// Segment registers with their hidden parts, TR, LDTR, GDTR, IDTR,
    /// CR0/2/3/4/8, EFER and IA32_APIC_BASE.
    pub sregs: SpecialRegs,
    pub dr: [u64; 8],
    pub xcr0: u64,
    pub msrs: EmuMsrs,
    pub fpu: EmuFpuState,
    /// HLT executed and no interrupt taken since.
    pub halted: bool,
    /// A paravirtual kick (`KVM_HC_KICK_CPU`) waits for this vCPU's next
    /// HLT. Carried because a kick that comes between the guest's last
    /// look at its lock and its HLT with IF=0 is all that ends that HLT.
    #[serde(default)]
    pub pv_unhalted: bool,
    /// Interrupts inhibited for one instruction (after STI or MOV SS).
    pub int_shadow: bool,
    /// An NMI handler runs (further NMIs wait for its IRET).
    pub nmi_blocked: bool,
    /// An application processor before its start-up IPI.
    pub wait_for_sipi: bool,
    pub pending_read: Option<EmuPendingRead>,
    /// Instructions retired (statistics).
    pub icount: u64,
}

impl EmuPendingRead {
    /// The access size in bytes.
    pub fn size(&self) -> u8 {
        match *self {
            EmuPendingRead::Io { size, .. } | EmuPendingRead::Mmio { size, .. } => size,
        }
    }
}

/// Why saved engine state cannot be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmuStateError {
    /// Bits the guest could never have set (WRMSR and MOV CR refuse them).
    #[error("CR4 {cr4:#x} / EFER {efer:#x} has bits the engine does not support")]
    ControlBits { cr4: u64, efer: u64 },
    #[error("a pending read of {0} bytes")]
    ReadSize(u8),
    /// The platform does not fit the VM (or itself).
    #[error("{0}")]
    Platform(#[from] emu_platform::RestoreError),
}

impl EmuVcpuState {
    /// What the state's form alone does not guarantee.
    pub fn check(&self) -> Result<(), EmuStateError> {
        let (cr4, efer) = (self.sregs.cr4, self.sregs.efer);
        if cr4 & !CR4_SUPPORTED != 0 || efer & !(EFER_WRITABLE | EFER_LMA) != 0 {
            return Err(EmuStateError::ControlBits { cr4, efer });
        }
        if let Some(r) = &self.pending_read {
            if !matches!(r.size(), 1 | 2 | 4 | 8) {
                return Err(EmuStateError::ReadSize(r.size()));
            }
        }
        Ok(())
    }

    /// For the seam.
    pub fn to_snapshot(&self) -> Result<VcpuSnapshot, StateError> {
        VcpuSnapshot::new(AccelKind::Emu, self)
    }
}

impl TryFrom<&VcpuSnapshot> for EmuVcpuState {
    type Error = StateError;

    /// Decode and check a vCPU's saved state (made under `--accel emu`).
    fn try_from(s: &VcpuSnapshot) -> Result<Self, StateError> {
        let state: EmuVcpuState = s.decode(AccelKind::Emu)?;
        state.check().map_err(VcpuSnapshot::invalid)?;
        Ok(state)
    }
}

/// The software engine's platform: the interrupt controllers and timers
/// (LAPICs, IOAPIC, PICs, PIT) with every deadline in guest nanoseconds,
/// and the guest time they refer to. A restored VM's clock resumes at
/// `guest_ns`, so timers, the TSC and kvmclock go on without a jump back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EmuVmState {
    /// Guest time (ns since the VM started, across restores) when saved.
    pub guest_ns: u64,
    /// The last kvmclock structure version handed out (they only grow).
    pub pvclock_version: u32,
    pub platform: emu_platform::Platform,
}

impl EmuVmState {
    /// Whether it fits a VM of `num_vcpus` vCPUs.
    pub fn check(&self, num_vcpus: usize) -> Result<(), EmuStateError> {
        Ok(self.platform.check_restorable(num_vcpus)?)
    }

    /// For the seam.
    pub fn to_snapshot(&self) -> Result<VmSnapshot, StateError> {
        VmSnapshot::new(AccelKind::Emu, self)
    }
}

impl TryFrom<&VmSnapshot> for EmuVmState {
    type Error = StateError;

    /// Decode a VM's saved state and check it is whole (one local APIC per
    /// vCPU it was configured for); [`EmuVmState::check`] then checks it
    /// against the VM it is loaded into.
    fn try_from(s: &VmSnapshot) -> Result<Self, StateError> {
        let state: EmuVmState = s.decode(AccelKind::Emu)?;
        state
            .check(state.platform.config().num_vcpus)
            .map_err(VmSnapshot::invalid)?;
        Ok(state)
    }
}
