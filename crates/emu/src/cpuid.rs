//! CPUID: advertise exactly what the engine implements.
//!
//! The vendor is AuthenticAMD so Linux does not enable page-table isolation
//! (a CR3 switch per kernel entry). The feature set is the minimum a 64-bit
//! Linux kernel requires (fpu msr pae cx8 cmov fxsr sse sse2 lm syscall)
//! plus cheap extras the engine implements (tsc, pge, pse, nx, cx16,
//! popcnt, lahf_lm, clflush) and the vector extensions of the x86-64-v2
//! level (mmx, sse3, ssse3, sse4.1, sse4.2) with LZCNT (AMD's abm), all
//! executed by the interpreter (`exec::sse`, `exec::sse4`).
//!
//! With the KVM signature (a PC-mode VM) leaf 0x40000001 offers kvmclock
//! and `KVM_FEATURE_PV_UNHALT` (paravirtual spinlocks: HLT, also with
//! IF=0, ends when another vCPU's `KVM_HC_KICK_CPU` names this one; see
//! `exec::system::hypercall`), whatever the vCPU count, as KVM does: a
//! guest's CPUID then does not depend on `--cpus`, and Linux itself leaves
//! PV spinlocks off on one vCPU. EDX (KVM's hints) stays 0: in particular
//! no `KVM_HINTS_REALTIME`, which would turn PV spinlocks off.

/// Leaf 1 EDX.
pub const FEAT_FPU: u32 = 1 << 0;
pub const FEAT_PSE: u32 = 1 << 3;
pub const FEAT_TSC: u32 = 1 << 4;
pub const FEAT_MSR: u32 = 1 << 5;
pub const FEAT_PAE: u32 = 1 << 6;
pub const FEAT_CX8: u32 = 1 << 8;
pub const FEAT_PGE: u32 = 1 << 13;
pub const FEAT_CMOV: u32 = 1 << 15;
pub const FEAT_CLFLUSH: u32 = 1 << 19;
pub const FEAT_MMX: u32 = 1 << 23;
pub const FEAT_FXSR: u32 = 1 << 24;
pub const FEAT_SSE: u32 = 1 << 25;
pub const FEAT_SSE2: u32 = 1 << 26;
/// Leaf 1 ECX.
pub const FEAT_SSE3: u32 = 1 << 0;
pub const FEAT_SSSE3: u32 = 1 << 9;
pub const FEAT_CX16: u32 = 1 << 13;
pub const FEAT_SSE41: u32 = 1 << 19;
pub const FEAT_SSE42: u32 = 1 << 20;
pub const FEAT_POPCNT: u32 = 1 << 23;
pub const FEAT_HYPERVISOR: u32 = 1 << 31;
/// Leaf 0x80000001 EDX / ECX.
pub const EXT_SYSCALL: u32 = 1 << 11;
pub const EXT_NX: u32 = 1 << 20;
pub const EXT_LM: u32 = 1 << 29;
pub const EXT_LAHF_LM: u32 = 1 << 0;
/// AMD's ABM bit: LZCNT (POPCNT has its own bit in leaf 1).
pub const EXT_ABM: u32 = 1 << 5;

const LEAF1_EDX: u32 = FEAT_FPU
    | FEAT_PSE
    | FEAT_TSC
    | FEAT_MSR
    | FEAT_PAE
    | FEAT_CX8
    | FEAT_PGE
    | FEAT_CMOV
    | FEAT_CLFLUSH
    | FEAT_MMX
    | FEAT_FXSR
    | FEAT_SSE
    | FEAT_SSE2;
const LEAF1_ECX: u32 =
    FEAT_SSE3 | FEAT_SSSE3 | FEAT_CX16 | FEAT_SSE41 | FEAT_SSE42 | FEAT_POPCNT | FEAT_HYPERVISOR;

/// Features the embedder turns on when it provides the hardware behind them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuidConfig {
    /// A local APIC is present (leaf 1 EDX.APIC).
    pub apic: bool,
    /// The APIC timer has TSC-deadline mode (leaf 1 ECX bit 24).
    pub tsc_deadline: bool,
    /// x2APIC MSRs are implemented (leaf 1 ECX bit 21).
    pub x2apic: bool,
    /// Advertise the KVM signature with kvmclock (the interrupt controller
    /// supplies the pvclock data) and the TSC and APIC bus frequencies.
    pub kvm_clock: bool,
    /// Guest TSC frequency in kHz (leaf 0x40000010 EAX).
    pub tsc_khz: u32,
    /// APIC bus frequency in kHz (leaf 0x40000010 EBX).
    pub apic_bus_khz: u32,
    /// Feature bits not to advertise (`--cpu-model portable`, a guest
    /// restored from KVM that never saw them).
    pub hidden: Hidden,
}

/// Feature bits CPUID leaves out: leaf 1 ECX/EDX, leaf 0x80000001 ECX/EDX,
/// and KVM's paravirtual features (leaf 0x40000001 EAX).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hidden {
    pub leaf1_ecx: u32,
    pub leaf1_edx: u32,
    pub ext1_ecx: u32,
    pub ext1_edx: u32,
    pub kvm_features: u32,
}

/// KVM paravirtual feature bits (leaf 0x40000001 EAX).
pub const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;
/// HLT ends on a `KVM_HC_KICK_CPU` (paravirtual spinlocks).
pub const KVM_FEATURE_PV_UNHALT: u32 = 1 << 7;
pub const KVM_FEATURE_CLOCKSOURCE_STABLE_BIT: u32 = 1 << 24;

/// What leaf 0x40000001 EAX offers with the KVM signature.
pub const KVM_FEATURES: u32 =
    KVM_FEATURE_CLOCKSOURCE2 | KVM_FEATURE_PV_UNHALT | KVM_FEATURE_CLOCKSOURCE_STABLE_BIT;

impl CpuidConfig {
    /// Whether the guest is shown `KVM_FEATURE_PV_UNHALT` (and so may
    /// use `KVM_HC_KICK_CPU`).
    pub fn pv_unhalt(&self) -> bool {
        self.kvm_clock && self.hidden.kvm_features & KVM_FEATURE_PV_UNHALT == 0
    }
}

pub const FEAT_APIC: u32 = 1 << 9;
pub const FEAT_X2APIC: u32 = 1 << 21;
pub const FEAT_TSC_DEADLINE: u32 = 1 << 24;

/// Family 0xf, model 0x6b, stepping 1: the signature of QEMU's default
/// `qemu64` CPU. An old AMD family keeps Linux off the Zen-specific paths
/// (RETBleed/SRSO return thunks, Zen errata MSRs) that cost instructions on
/// every return and touch MSRs the engine does not model.
pub const SIGNATURE: u32 = 0x0006_0fb1;

fn regs(s: &[u8; 12]) -> [u32; 3] {
    let w = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
    [w(0), w(4), w(8)]
}

/// CPUID leaf `leaf`, subleaf `sub`, for vCPU `index`: [EAX, EBX, ECX, EDX].
pub fn cpuid(cfg: &CpuidConfig, index: u32, leaf: u32, _sub: u32) -> [u32; 4] {
    match leaf {
        0 => {
            // "AuthenticAMD" is returned in EBX, EDX, ECX order.
            let [b, d, c] = regs(b"AuthenticAMD");
            [1, b, c, d]
        }
        1 => {
            let eax = SIGNATURE;
            let ebx = (index << 24) | (1 << 16) | (8 << 8);
            let mut ecx = LEAF1_ECX;
            let mut edx = LEAF1_EDX;
            if cfg.apic {
                edx |= FEAT_APIC;
                if cfg.tsc_deadline {
                    ecx |= FEAT_TSC_DEADLINE;
                }
                if cfg.x2apic {
                    ecx |= FEAT_X2APIC;
                }
            }
            // The hypervisor bit stays: the guest runs under one.
            [
                eax,
                ebx,
                ecx & !(cfg.hidden.leaf1_ecx & !FEAT_HYPERVISOR),
                edx & !cfg.hidden.leaf1_edx,
            ]
        }
        0x4000_0000 if cfg.kvm_clock => {
            let [b, c, d] = regs(b"KVMKVMKVM\0\0\0");
            [0x4000_0010, b, c, d]
        }
        0x4000_0000 => {
            // Hypervisor leaf range present, no known signature.
            let [b, c, d] = regs(b"VireoEmuVire");
            [0x4000_0000, b, c, d]
        }
        0x4000_0001 if cfg.kvm_clock => [KVM_FEATURES & !cfg.hidden.kvm_features, 0, 0, 0],
        0x4000_0010 if cfg.kvm_clock => [cfg.tsc_khz, cfg.apic_bus_khz, 0, 0],
        0x8000_0000 => {
            let [b, d, c] = regs(b"AuthenticAMD");
            [0x8000_0008, b, c, d]
        }
        0x8000_0001 => [
            SIGNATURE,
            0,
            (EXT_LAHF_LM | EXT_ABM) & !cfg.hidden.ext1_ecx,
            (LEAF1_EDX & 0x0183_f3ff | EXT_SYSCALL | EXT_NX | EXT_LM) & !cfg.hidden.ext1_edx,
        ],
        0x8000_0002..=0x8000_0004 => {
            let name = *b"Vireo software x86-64 CPU\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";
            let i = (leaf - 0x8000_0002) as usize * 16;
            let w = |k: usize| {
                u32::from_le_bytes([
                    name[i + k],
                    name[i + k + 1],
                    name[i + k + 2],
                    name[i + k + 3],
                ])
            };
            [w(0), w(4), w(8), w(12)]
        }
        // Invariant TSC: the embedder states a fixed TSC rate (the PC-mode
        // engine derives its TSC from the host's monotonic clock).
        0x8000_0007 if cfg.tsc_khz != 0 => [0, 0, 0, 1 << 8],
        0x8000_0008 => [(48 << 8) | crate::memory::mmu::MAX_PHYS_BITS, 0, 0, 0],
        _ => [0; 4],
    }
}

/// Does the CPU CPUID describes have `f` (iced's name for the CPUID bit
/// an instruction needs)? Decides between #UD (the advertised CPU lacks
/// the instruction) and an internal error (a real CPU of this model would
/// execute it and the engine cannot).
pub fn has_feature(cfg: &CpuidConfig, f: iced_x86::CpuidFeature) -> bool {
    use iced_x86::CpuidFeature as F;
    let l1 = cpuid(cfg, 0, 1, 0);
    let e1 = cpuid(cfg, 0, 0x8000_0001, 0);
    match f {
        // The base architecture every x86-64 CPU has.
        F::INTEL8086
        | F::INTEL186
        | F::INTEL286
        | F::INTEL386
        | F::INTEL486
        | F::X64
        | F::CPUID
        | F::FPU287
        | F::FPU387
        | F::MULTIBYTENOP
        | F::PAUSE
        // Every AMD CPU since the K7 has RDPMC (no CPUID bit of its own).
        | F::RDPMC => true,
        F::FPU => l1[3] & FEAT_FPU != 0,
        F::TSC => l1[3] & FEAT_TSC != 0,
        F::MSR => l1[3] & FEAT_MSR != 0,
        F::CX8 => l1[3] & FEAT_CX8 != 0,
        F::CMOV => l1[3] & FEAT_CMOV != 0,
        F::CLFSH => l1[3] & FEAT_CLFLUSH != 0,
        F::FXSR => l1[3] & FEAT_FXSR != 0,
        F::SSE => l1[3] & FEAT_SSE != 0,
        F::SSE2 => l1[3] & FEAT_SSE2 != 0,
        F::MMX => l1[3] & FEAT_MMX != 0,
        F::SSE3 => l1[2] & 1 != 0,
        F::SSSE3 => l1[2] & (1 << 9) != 0,
        F::SSE4_1 => l1[2] & (1 << 19) != 0,
        F::SSE4_2 => l1[2] & (1 << 20) != 0,
        F::CMPXCHG16B => l1[2] & FEAT_CX16 != 0,
        F::POPCNT => l1[2] & FEAT_POPCNT != 0,
        F::SYSCALL => e1[3] & EXT_SYSCALL != 0,
        F::RDTSCP => e1[3] & (1 << 27) != 0,
        F::LZCNT => e1[2] & EXT_ABM != 0,
        // Everything else (AVX, BMI, VMX/SVM, INVPCID, RDPRU, ...) is
        // never advertised.
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vendor_and_required_features() {
        let c = CpuidConfig::default();
        let r = cpuid(&c, 0, 0, 0);
        let mut v = Vec::new();
        for x in [r[1], r[3], r[2]] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        assert_eq!(&v, b"AuthenticAMD");
        let f = cpuid(&c, 0, 1, 0);
        for bit in [
            FEAT_FPU, FEAT_MSR, FEAT_PAE, FEAT_CX8, FEAT_CMOV, FEAT_FXSR, FEAT_SSE, FEAT_SSE2,
        ] {
            assert_ne!(f[3] & bit, 0);
        }
        let e = cpuid(&c, 0, 0x8000_0001, 0);
        assert_ne!(e[3] & EXT_LM, 0);
        assert_ne!(e[3] & EXT_SYSCALL, 0);
        // No XSAVE/AVX, no APERFMPERF leaf.
        assert_eq!(f[2] & (1 << 26), 0);
        assert_eq!(cpuid(&c, 0, 6, 0), [0; 4]);
        assert_eq!(f[3] & FEAT_APIC, 0, "no APIC unless configured");
        let on = CpuidConfig {
            apic: true,
            tsc_deadline: true,
            kvm_clock: true,
            tsc_khz: 1_000_000,
            ..Default::default()
        };
        let f = cpuid(&on, 0, 1, 0);
        assert_ne!(f[3] & FEAT_APIC, 0);
        assert_ne!(f[2] & FEAT_TSC_DEADLINE, 0);
        let sig = cpuid(&on, 0, 0x4000_0000, 0);
        let mut v = Vec::new();
        for x in [sig[1], sig[2], sig[3]] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        assert_eq!(&v, b"KVMKVMKVM\0\0\0");
        assert_ne!(
            cpuid(&on, 0, 0x4000_0001, 0)[0] & KVM_FEATURE_CLOCKSOURCE2,
            0
        );
        assert_eq!(cpuid(&on, 0, 0x4000_0010, 0)[0], 1_000_000);
    }

    #[test]
    fn pv_unhalt_with_the_kvm_signature_unless_hidden() {
        let on = CpuidConfig {
            kvm_clock: true,
            ..Default::default()
        };
        let f = cpuid(&on, 0, 0x4000_0001, 0);
        assert_ne!(f[0] & KVM_FEATURE_PV_UNHALT, 0);
        assert_eq!(
            f[3], 0,
            "no hints: KVM_HINTS_REALTIME would turn PV spinlocks off"
        );
        assert!(on.pv_unhalt());
        let hidden = CpuidConfig {
            hidden: Hidden {
                kvm_features: KVM_FEATURE_PV_UNHALT,
                ..Default::default()
            },
            ..on
        };
        let f = cpuid(&hidden, 0, 0x4000_0001, 0);
        assert_eq!(f[0] & KVM_FEATURE_PV_UNHALT, 0);
        assert_ne!(f[0] & KVM_FEATURE_CLOCKSOURCE2, 0);
        assert!(!hidden.pv_unhalt());
        assert!(!CpuidConfig::default().pv_unhalt(), "no KVM signature");
    }
}
