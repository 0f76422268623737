//! The CPUID a guest saw, recorded in snapshots, and the check a restore
//! under another accelerator makes against it: every feature bit the guest
//! was offered must be offered by the destination too.

use serde::{Deserialize, Serialize};

/// One CPUID leaf/subleaf and its four registers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// Which CPU a KVM guest is shown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuModel {
    /// Everything this host's KVM can offer.
    #[default]
    Host,
    /// Only what the software engine implements too (its CPUID), so that
    /// snapshots and migrations move between `--accel kvm` and `--accel emu`.
    Portable,
}

impl std::fmt::Display for CpuModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CpuModel::Host => "host",
            CpuModel::Portable => "portable",
        })
    }
}

impl std::str::FromStr for CpuModel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "host" => Ok(CpuModel::Host),
            "portable" => Ok(CpuModel::Portable),
            _ => Err(format!("unknown CPU model '{s}' (host or portable)")),
        }
    }
}

/// The leaves (function, subleaf) a snapshot records.
pub const RECORDED_LEAVES: [(u32, u32); 16] = [
    (0, 0),
    (1, 0),
    (7, 0),
    (0xd, 0),
    (0xd, 1),
    (0x4000_0000, 0),
    (0x4000_0001, 0),
    (0x4000_0010, 0),
    (0x8000_0000, 0),
    (0x8000_0001, 0),
    (0x8000_0002, 0),
    (0x8000_0003, 0),
    (0x8000_0004, 0),
    (0x8000_0007, 0),
    (0x8000_0008, 0),
    (0xa, 0),
];

#[derive(Clone, Copy)]
enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

impl Reg {
    fn get(self, e: &CpuidEntry) -> u32 {
        match self {
            Reg::Eax => e.eax,
            Reg::Ebx => e.ebx,
            Reg::Ecx => e.ecx,
            Reg::Edx => e.edx,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Reg::Eax => "EAX",
            Reg::Ebx => "EBX",
            Reg::Ecx => "ECX",
            Reg::Edx => "EDX",
        }
    }
}

/// The feature registers compared, with the bits that are not features
/// (state the CPU reflects, topology) masked out, and names for the bits
/// (Linux's /proc/cpuinfo names; empty = unnamed).
struct FeatureReg {
    function: u32,
    index: u32,
    reg: Reg,
    ignore: u32,
    names: [&'static str; 32],
}

const N: &str = "";

#[rustfmt::skip]
const FEATURE_REGS: &[FeatureReg] = &[
    FeatureReg { function: 1, index: 0, reg: Reg::Edx,
        // Bit 28 (HTT) describes the topology Vireo sets per VM.
        ignore: 1 << 28,
        names: ["fpu", "vme", "de", "pse", "tsc", "msr", "pae", "mce", "cx8", "apic", N, "sep",
            "mtrr", "pge", "mca", "cmov", "pat", "pse36", "pn", "clflush", N, "dts", "acpi",
            "mmx", "fxsr", "sse", "sse2", "ss", "ht", "tm", "ia64", "pbe"] },
    FeatureReg { function: 1, index: 0, reg: Reg::Ecx,
        // Bit 27 (OSXSAVE) mirrors CR4; bit 31 (hypervisor) Vireo always sets.
        ignore: (1 << 27) | (1 << 31),
        names: ["pni", "pclmulqdq", "dtes64", "monitor", "ds_cpl", "vmx", "smx", "est", "tm2",
            "ssse3", "cid", "sdbg", "fma", "cx16", "xtpr", "pdcm", N, "pcid", "dca", "sse4_1",
            "sse4_2", "x2apic", "movbe", "popcnt", "tsc_deadline_timer", "aes", "xsave",
            "osxsave", "avx", "f16c", "rdrand", "hypervisor"] },
    FeatureReg { function: 7, index: 0, reg: Reg::Ebx, ignore: 0,
        names: ["fsgsbase", "tsc_adjust", "sgx", "bmi1", "hle", "avx2", "fdp_excptn_only",
            "smep", "bmi2", "erms", "invpcid", "rtm", "pqm", "zero_fcs_fds", "mpx", "rdt_a",
            "avx512f", "avx512dq", "rdseed", "adx", "smap", "avx512ifma", "pcommit",
            "clflushopt", "clwb", "intel_pt", "avx512pf", "avx512er", "avx512cd", "sha_ni",
            "avx512bw", "avx512vl"] },
    FeatureReg { function: 7, index: 0, reg: Reg::Ecx, ignore: 0,
        names: ["prefetchwt1", "avx512vbmi", "umip", "pku", "ospke", "waitpkg",
            "avx512_vbmi2", "cet_ss", "gfni", "vaes", "vpclmulqdq", "avx512_vnni",
            "avx512_bitalg", "tme", "avx512_vpopcntdq", N, "la57", N, N, N, N, N, "rdpid",
            "bus_lock_detect", "cldemote", N, "movdiri", "movdir64b", "enqcmd", "sgx_lc", N,
            "pks"] },
    FeatureReg { function: 7, index: 0, reg: Reg::Edx, ignore: 0,
        names: [N, N, "avx512_4vnniw", "avx512_4fmaps", "fsrm", N, N, N,
            "avx512_vp2intersect", N, "md_clear", N, N, N, "serialize", "hybrid", "tsxldtrk",
            N, "pconfig", "arch_lbr", "ibt", N, "amx_bf16", "avx512_fp16", "amx_tile",
            "amx_int8", "spec_ctrl", "intel_stibp", "flush_l1d", "arch_capabilities",
            "core_capabilities", "spec_ctrl_ssbd"] },
    FeatureReg { function: 0xd, index: 0, reg: Reg::Eax, ignore: 0,
        names: ["xstate.x87", "xstate.sse", "xstate.avx", "xstate.bndregs", "xstate.bndcsr",
            "xstate.opmask", "xstate.zmm_hi256", "xstate.hi16_zmm", "xstate.pt", "xstate.pkru",
            N, N, N, N, N, N, N, "xstate.xtilecfg", "xstate.xtiledata", N, N, N, N, N, N, N, N,
            N, N, N, N, N] },
    FeatureReg { function: 0xd, index: 1, reg: Reg::Eax, ignore: 0,
        names: ["xsaveopt", "xsavec", "xgetbv1", "xsaves", "xfd", N, N, N, N, N, N, N, N, N,
            N, N, N, N, N, N, N, N, N, N, N, N, N, N, N, N, N, N] },
    FeatureReg { function: 0x8000_0001, index: 0, reg: Reg::Edx, ignore: 0,
        names: ["fpu", "vme", "de", "pse", "tsc", "msr", "pae", "mce", "cx8", "apic", N,
            "syscall", "mtrr", "pge", "mca", "cmov", "pat", "pse36", N, "mp", "nx", N, "mmxext",
            "mmx", "fxsr", "fxsr_opt", "pdpe1gb", "rdtscp", N, "lm", "3dnowext", "3dnow"] },
    FeatureReg { function: 0x8000_0001, index: 0, reg: Reg::Ecx, ignore: 0,
        names: ["lahf_lm", "cmp_legacy", "svm", "extapic", "cr8_legacy", "abm", "sse4a",
            "misalignsse", "3dnowprefetch", "osvw", "ibs", "xop", "skinit", "wdt", N, "lwp",
            "fma4", "tce", N, "nodeid_msr", N, "tbm", "topoext", "perfctr_core", "perfctr_nb",
            N, "bpext", "ptsc", "perfctr_llc", "mwaitx", N, N] },
    FeatureReg { function: 0x8000_0007, index: 0, reg: Reg::Edx, ignore: 0,
        names: ["ts", "fid", "vid", "ttp", "tm", "stc", "100mhzsteps", "hwpstate",
            "invariant_tsc", "cpb", "eff_freq_ro", N, N, N, N, N, N, N, N, N, N, N, N, N, N, N,
            N, N, N, N, N, N] },
    FeatureReg { function: 0x8000_0008, index: 0, reg: Reg::Ebx, ignore: 0,
        names: ["clzero", "irperf", "xsaveerptr", N, "rdpru", N, N, N, N, "wbnoinvd", N, N,
            "amd_ibpb", "amd_ibrs", "amd_stibp", "amd_stibp_always_on", N, "amd_stibp_preferred",
            N, N, N, N, N, N, "amd_ssbd", "virt_ssbd", "amd_ssb_no", N, N, N, N, N] },
    FeatureReg { function: 0x4000_0001, index: 0, reg: Reg::Eax, ignore: 0,
        names: ["kvm.clocksource", "kvm.nop_io_delay", "kvm.mmu_op", "kvm.clocksource2",
            "kvm.async_pf", "kvm.steal_time", "kvm.pv_eoi", "kvm.pv_unhalt", N,
            "kvm.pv_tlb_flush", "kvm.async_pf_vmexit", "kvm.pv_send_ipi", "kvm.poll_control",
            "kvm.pv_sched_yield", "kvm.async_pf_int", "kvm.msi_ext_dest_id",
            "kvm.hc_map_gpa_range", "kvm.migration_control", N, N, N, N, N, N,
            "kvm.clocksource_stable", N, N, N, N, N, N, N] },
];

fn find(entries: &[CpuidEntry], function: u32, index: u32) -> Option<&CpuidEntry> {
    entries
        .iter()
        .find(|e| e.function == function && e.index == index)
}

/// The vendor string of leaf 0 (EBX, EDX, ECX).
pub fn vendor(entries: &[CpuidEntry]) -> Option<String> {
    let e = find(entries, 0, 0)?;
    let mut v = Vec::with_capacity(12);
    for r in [e.ebx, e.edx, e.ecx] {
        v.extend_from_slice(&r.to_le_bytes());
    }
    Some(
        String::from_utf8_lossy(&v)
            .trim_end_matches('\0')
            .to_string(),
    )
}

/// The features the guest saw (`seen`) that `offered` lacks, by name
/// (`CPUID.7.0.EBX[5]`-style for unnamed bits); also a different CPU
/// vendor. Empty: the guest fits.
pub fn missing_features(seen: &[CpuidEntry], offered: &[CpuidEntry]) -> Vec<String> {
    let mut missing = Vec::new();
    if let (Some(a), Some(b)) = (vendor(seen), vendor(offered)) {
        if a != b {
            missing.push(format!("vendor {a} (this accelerator shows {b})"));
        }
    }
    for fr in FEATURE_REGS {
        // A leaf above the guest's maximum was never visible to it.
        let max = if fr.function >= 0x8000_0000 {
            find(seen, 0x8000_0000, 0).map(|e| e.eax)
        } else if fr.function >= 0x4000_0000 {
            find(seen, 0x4000_0000, 0).map(|e| e.eax)
        } else {
            find(seen, 0, 0).map(|e| e.eax)
        };
        if max.is_some_and(|m| m < fr.function) {
            continue;
        }
        let Some(s) = find(seen, fr.function, fr.index) else {
            continue;
        };
        let have = find(offered, fr.function, fr.index)
            .map(|e| fr.reg.get(e))
            .unwrap_or(0);
        let lack = fr.reg.get(s) & !have & !fr.ignore;
        for bit in 0..32 {
            if lack & (1 << bit) != 0 {
                let name = fr.names[bit];
                // AMD repeats leaf 1's EDX bits in 0x80000001: name each once.
                if !name.is_empty() && missing.iter().any(|m| m == name) {
                    continue;
                }
                missing.push(if name.is_empty() {
                    format!(
                        "CPUID.{:#x}.{}.{}[{bit}]",
                        fr.function,
                        fr.index,
                        fr.reg.name()
                    )
                } else {
                    name.to_string()
                });
            }
        }
    }
    missing
}

/// `entries` with every feature bit `supported` lacks cleared (the bits
/// that are not features kept), and the names of what was cleared.
pub fn restrict(
    entries: &[CpuidEntry],
    supported: &[CpuidEntry],
) -> (Vec<CpuidEntry>, Vec<String>) {
    let dropped = missing_features(entries, supported)
        .into_iter()
        .filter(|m| !m.starts_with("vendor "))
        .collect();
    let mut out = entries.to_vec();
    for e in out.iter_mut() {
        for fr in FEATURE_REGS
            .iter()
            .filter(|fr| fr.function == e.function && fr.index == e.index)
        {
            let have = find(supported, fr.function, fr.index)
                .map(|s| fr.reg.get(s))
                .unwrap_or(0)
                | fr.ignore;
            match fr.reg {
                Reg::Eax => e.eax &= have,
                Reg::Ebx => e.ebx &= have,
                Reg::Ecx => e.ecx &= have,
                Reg::Edx => e.edx &= have,
            }
        }
    }
    (out, dropped)
}

/// Only the leaves of [`RECORDED_LEAVES`], in that order.
pub fn recorded(entries: impl Fn(u32, u32) -> Option<[u32; 4]>) -> Vec<CpuidEntry> {
    RECORDED_LEAVES
        .iter()
        .filter_map(|&(function, index)| {
            let r = entries(function, index)?;
            Some(CpuidEntry {
                function,
                index,
                eax: r[0],
                ebx: r[1],
                ecx: r[2],
                edx: r[3],
            })
        })
        .collect()
}

/// The TSC frequency the guest was told (kHz), if any: the hypervisor
/// timing leaf 0x40000010 EAX.
pub fn told_tsc_khz(seen: &[CpuidEntry]) -> Option<u32> {
    let max = find(seen, 0x4000_0000, 0)?.eax;
    if max < 0x4000_0010 {
        return None;
    }
    find(seen, 0x4000_0010, 0)
        .map(|e| e.eax)
        .filter(|&k| k != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(function: u32, index: u32, r: [u32; 4]) -> CpuidEntry {
        CpuidEntry {
            function,
            index,
            eax: r[0],
            ebx: r[1],
            ecx: r[2],
            edx: r[3],
        }
    }

    #[test]
    fn missing_features_are_named() {
        let seen = [
            e(0, 0, [7, 0x6874_7541, 0x444d_4163, 0x6974_6e65]),
            e(
                1,
                0,
                [0, 0, (1 << 28) | (1 << 27) | (1 << 31), 1 | (1 << 28)],
            ),
            e(7, 0, [0, 1 << 5, 0, 0]),
        ];
        let offered = [
            e(0, 0, [1, 0x6874_7541, 0x444d_4163, 0x6974_6e65]),
            e(1, 0, [0, 0, 0, 1]),
        ];
        // avx (1.ECX[28]) and avx2 (7.0.EBX[5]); not OSXSAVE, hypervisor, HTT.
        assert_eq!(missing_features(&seen, &offered), vec!["avx", "avx2"]);
        assert!(missing_features(&offered, &seen).is_empty());
        let intel = [e(0, 0, [1, 0x756e_6547, 0x6c65_746e, 0x4965_6e69])];
        assert_eq!(
            missing_features(&seen, &intel)[0],
            "vendor AuthenticAMD (this accelerator shows GenuineIntel)"
        );
    }

    #[test]
    fn leaves_beyond_the_maximum_do_not_count() {
        let seen = [e(0, 0, [1, 0, 0, 0]), e(7, 0, [0, 1 << 5, 0, 0])];
        assert!(missing_features(&seen, &[]).is_empty());
        let tsc = [
            e(0x4000_0000, 0, [0x4000_0010, 0, 0, 0]),
            e(0x4000_0010, 0, [1_000_000, 0, 0, 0]),
        ];
        assert_eq!(told_tsc_khz(&tsc), Some(1_000_000));
        assert_eq!(told_tsc_khz(&tsc[1..]), None);
    }
}
