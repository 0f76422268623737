//! Model-specific registers.

use crate::core::Core;
use crate::cpu::*;

pub const IA32_TSC: u32 = 0x10;
pub const IA32_APIC_BASE: u32 = 0x1b;
pub const IA32_SYSENTER_CS: u32 = 0x174;
pub const IA32_SYSENTER_ESP: u32 = 0x175;
pub const IA32_SYSENTER_EIP: u32 = 0x176;
pub const IA32_PAT: u32 = 0x277;
pub const EFER: u32 = 0xc000_0080;
pub const STAR: u32 = 0xc000_0081;
pub const LSTAR: u32 = 0xc000_0082;
pub const CSTAR: u32 = 0xc000_0083;
pub const SFMASK: u32 = 0xc000_0084;
pub const FS_BASE: u32 = 0xc000_0100;
pub const GS_BASE: u32 = 0xc000_0101;
pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
pub const TSC_AUX: u32 = 0xc000_0103;
/// AMD K8 "interrupt pending message" (C1E detection): reads as zero.
pub const MSR_K8_INT_PENDING_MSG: u32 = 0xc001_0055;
/// AMD northbridge configuration: reads as zero, writes ignored.
pub const MSR_AMD64_NB_CFG: u32 = 0xc001_001f;
/// Microcode patch level (IA32_BIOS_SIGN_ID / MSR_AMD64_PATCH_LEVEL):
/// reads as zero (no patch loaded), writes ignored.
pub const MSR_PATCH_LEVEL: u32 = 0x8b;
/// Machine-check global capability and status. MCE/MCA are not advertised,
/// but every CPU of the family has the registers: no banks, nothing logged.
pub const IA32_MCG_CAP: u32 = 0x179;
pub const IA32_MCG_STATUS: u32 = 0x17a;
/// The four legacy AMD performance counters (PerfEvtSel0-3 at
/// 0xc0010000-3, PerfCtr0-3 at 0xc0010004-7) every AMD CPU since the K7
/// has, with or without the PerfCtrExtCore CPUID bit.
pub const MSR_K7_EVNTSEL0: u32 = 0xc001_0000;
pub const MSR_K7_PERFCTR3: u32 = 0xc001_0007;
/// System configuration, hardware configuration, top of memory, top of
/// memory 2: K8 MSRs the firmware owns.
pub const MSR_K8_SYSCFG: u32 = 0xc001_0010;
pub const MSR_K7_HWCR: u32 = 0xc001_0015;
pub const MSR_K8_TOP_MEM1: u32 = 0xc001_001a;
pub const MSR_K8_TOP_MEM2: u32 = 0xc001_001d;
pub const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
pub const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;

fn host_tsc() -> u64 {
    // SAFETY: RDTSC has no memory effects; x86-64 hosts always have it.
    unsafe { core::arch::x86_64::_rdtsc() }
}

pub fn guest_tsc(core: &Core) -> u64 {
    match core.platform.guest_tsc() {
        Some(t) => t.wrapping_add(core.st.msr.tsc_offset),
        None => host_tsc().wrapping_add(core.st.msr.tsc_offset),
    }
}

pub fn canonical(v: u64) -> bool {
    ((v << 16) as i64 >> 16) as u64 == v
}

/// RDMSR; None raises #GP. MSRs the interrupt controller owns go to it.
pub fn read(core: &Core, idx: u32) -> Option<u64> {
    if let Some(r) = core.platform.rdmsr(core.index, idx) {
        return r.ok();
    }
    let m = &core.st.msr;
    Some(match idx {
        IA32_TSC => guest_tsc(core),
        IA32_APIC_BASE => m.apic_base | if core.index == 0 { 1 << 8 } else { 0 },
        IA32_SYSENTER_CS => m.sysenter_cs,
        IA32_SYSENTER_ESP => m.sysenter_esp,
        IA32_SYSENTER_EIP => m.sysenter_eip,
        IA32_PAT => m.pat,
        EFER => core.st.efer,
        STAR => m.star,
        LSTAR => m.lstar,
        CSTAR => m.cstar,
        SFMASK => m.sfmask,
        FS_BASE => core.st.seg[FS].base,
        GS_BASE => core.st.seg[GS].base,
        KERNEL_GS_BASE => m.kernel_gs_base,
        TSC_AUX => m.tsc_aux,
        // AMD model-specific registers Linux reads unguarded on this family.
        MSR_K8_INT_PENDING_MSG | MSR_AMD64_NB_CFG => 0,
        // A CPU whose PMU counts nothing (as KVM without a PMU): selects
        // and counters read as zero.
        MSR_K7_EVNTSEL0..=MSR_K7_PERFCTR3 => 0,
        MSR_K8_SYSCFG | MSR_K7_HWCR | MSR_K8_TOP_MEM1 | MSR_K8_TOP_MEM2 => 0,
        MSR_PATCH_LEVEL | IA32_MCG_CAP | IA32_MCG_STATUS => 0,
        MSR_KVM_SYSTEM_TIME_NEW if core.cpuid.kvm_clock => m.kvm_system_time,
        MSR_KVM_WALL_CLOCK_NEW if core.cpuid.kvm_clock => m.kvm_wall_clock,
        _ => return None,
    })
}

/// A WRMSR the CPU refuses (#GP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsrFault;

/// WRMSR; Err raises #GP.
pub fn write(core: &mut Core, idx: u32, v: u64) -> Result<(), MsrFault> {
    // The APIC base is a physical address: bits at or above MAXPHYADDR
    // (CPUID 0x80000008) are reserved.
    if idx == IA32_APIC_BASE && v >> crate::memory::mmu::MAX_PHYS_BITS != 0 {
        return Err(MsrFault);
    }
    if let Some(r) = core.platform.wrmsr(core.index, idx, v) {
        if idx == IA32_APIC_BASE && r.is_ok() {
            core.st.msr.apic_base = v;
        }
        return r;
    }
    match idx {
        IA32_TSC => {
            let base = core.platform.guest_tsc().unwrap_or_else(host_tsc);
            core.st.msr.tsc_offset = v.wrapping_sub(base);
        }
        IA32_APIC_BASE => core.st.msr.apic_base = v & !(1 << 8),
        IA32_SYSENTER_CS => core.st.msr.sysenter_cs = v & 0xffff,
        // Addresses: #GP unless canonical (as KVM checks them).
        IA32_SYSENTER_ESP | IA32_SYSENTER_EIP if !canonical(v) => return Err(MsrFault),
        IA32_SYSENTER_ESP => core.st.msr.sysenter_esp = v,
        IA32_SYSENTER_EIP => core.st.msr.sysenter_eip = v,
        IA32_PAT => {
            // Each byte must be a valid memory type (0, 1, 4, 5, 6, 7).
            if (0..8).any(|i| matches!((v >> (i * 8)) & 0xff, 2 | 3 | 8..=255)) {
                return Err(MsrFault);
            }
            core.st.msr.pat = v;
        }
        EFER => {
            if v & !(EFER_WRITABLE | EFER_LMA) != 0 {
                return Err(MsrFault);
            }
            let old = core.st.efer;
            // LME cannot change while paging is on.
            if core.st.cr0 & CR0_PG != 0 && (old ^ v) & EFER_LME != 0 {
                return Err(MsrFault);
            }
            core.st.efer = (v & EFER_WRITABLE) | (old & EFER_LMA);
            if (old ^ v) & EFER_NXE != 0 {
                core.tlb.flush_all();
            }
        }
        STAR => core.st.msr.star = v,
        LSTAR | CSTAR => {
            if !canonical(v) {
                return Err(MsrFault);
            }
            if idx == LSTAR {
                core.st.msr.lstar = v;
            } else {
                core.st.msr.cstar = v;
            }
        }
        SFMASK => core.st.msr.sfmask = v & 0xffff_ffff,
        FS_BASE | GS_BASE | KERNEL_GS_BASE => {
            if !canonical(v) {
                return Err(MsrFault);
            }
            match idx {
                FS_BASE => core.st.seg[FS].base = v,
                GS_BASE => core.st.seg[GS].base = v,
                _ => core.st.msr.kernel_gs_base = v,
            }
        }
        TSC_AUX => core.st.msr.tsc_aux = v & 0xffff_ffff,
        MSR_K8_INT_PENDING_MSG | MSR_AMD64_NB_CFG => {}
        // Writes to a PMU that counts nothing, and to firmware-owned
        // configuration, are accepted and have no effect.
        MSR_K7_EVNTSEL0..=MSR_K7_PERFCTR3 => {}
        MSR_K8_SYSCFG | MSR_K7_HWCR | MSR_K8_TOP_MEM1 | MSR_K8_TOP_MEM2 => {}
        MSR_PATCH_LEVEL => {}
        // MCG_CAP is read-only; MCG_STATUS takes only zero (nothing logged).
        IA32_MCG_STATUS if v == 0 => {}
        MSR_KVM_SYSTEM_TIME_NEW if core.cpuid.kvm_clock => {
            if v & 1 != 0 {
                let mut info = core
                    .platform
                    .pvclock_time_info(core.index)
                    .ok_or(MsrFault)?;
                // The structure pairs guest time with the guest's TSC,
                // which IA32_TSC writes (or a restore from KVM) offset.
                let stamp = u64::from_le_bytes(info[8..16].try_into().unwrap_or_default())
                    .wrapping_add(core.st.msr.tsc_offset);
                info[8..16].copy_from_slice(&stamp.to_le_bytes());
                write_guest_bytes(core, v & !1, &info)?;
            }
            core.st.msr.kvm_system_time = v;
        }
        MSR_KVM_WALL_CLOCK_NEW if core.cpuid.kvm_clock => {
            let wc = core.platform.pvclock_wall_clock().ok_or(MsrFault)?;
            write_guest_bytes(core, v, &wc)?;
            core.st.msr.kvm_wall_clock = v;
        }
        _ => return Err(MsrFault),
    }
    Ok(())
}

/// Write a paravirtual structure to guest-physical RAM (kvmclock pages);
/// #GP if it is not RAM.
fn write_guest_bytes(core: &Core, gpa: u64, bytes: &[u8]) -> Result<(), MsrFault> {
    for (i, b) in bytes.iter().enumerate() {
        if !core
            .mem
            .write_phys(gpa.wrapping_add(i as u64), 1, *b as u64)
        {
            return Err(MsrFault);
        }
    }
    Ok(())
}
