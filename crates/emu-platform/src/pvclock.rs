//! kvmclock (pvclock) structures, produced as the bytes to write into guest
//! memory.
//!
//! The guest registers a per-vCPU `pvclock_vcpu_time_info` through
//! MSR_KVM_SYSTEM_TIME_NEW and asks for a `pvclock_wall_clock` through
//! MSR_KVM_WALL_CLOCK_NEW (see the KVM documentation, virt/kvm/x86/msr.rst).
//! The guest computes
//!
//! ```text
//! delta = tsc - tsc_timestamp
//! delta = tsc_shift >= 0 ? delta << tsc_shift : delta >> -tsc_shift
//! time  = system_time + (delta * tsc_to_system_mul) >> 32
//! ```
//!
//! and retries while `version` is odd or changed during the read, so the
//! writer must publish an odd version, then the data, then the next even
//! version (see [`PvClockVcpuTimeInfo::to_bytes_for_update`]).

use serde::{Deserialize, Serialize};

use crate::NS_PER_SEC;

/// MSR the guest writes with the address of a `pvclock_wall_clock`.
pub const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
/// MSR the guest writes with the address of its `pvclock_vcpu_time_info`
/// (bit 0 = enable).
pub const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
/// Legacy MSR numbers (same layouts), still accepted by KVM.
pub const MSR_KVM_WALL_CLOCK: u32 = 0x11;
pub const MSR_KVM_SYSTEM_TIME: u32 = 0x12;

/// The TSC is synchronised across vCPUs: the guest may skip its
/// cross-CPU monotonicity fix-up.
pub const PVCLOCK_TSC_STABLE_BIT: u8 = 1 << 0;
/// The VM was paused; the guest's soft-lockup watchdog should not fire.
pub const PVCLOCK_GUEST_STOPPED: u8 = 1 << 1;

/// Size of `pvclock_vcpu_time_info`.
pub const VCPU_TIME_INFO_SIZE: usize = 32;
/// Size of `pvclock_wall_clock`.
pub const WALL_CLOCK_SIZE: usize = 12;

/// Decodes an MSR_KVM_SYSTEM_TIME(_NEW) value: `Some(gpa)` when the enable
/// bit (bit 0) is set; the address is the value without that bit, as KVM
/// takes it. Checking that the 32 bytes lie in RAM is the caller's job.
pub fn system_time_msr_gpa(value: u64) -> Option<u64> {
    (value & 1 != 0).then_some(value & !1)
}

/// `pvclock_vcpu_time_info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PvClockVcpuTimeInfo {
    pub version: u32,
    pub tsc_timestamp: u64,
    pub system_time: u64,
    pub tsc_to_system_mul: u32,
    pub tsc_shift: i8,
    pub flags: u8,
}

impl PvClockVcpuTimeInfo {
    /// The 32-byte guest layout (little endian, packed).
    pub fn to_bytes(&self) -> [u8; VCPU_TIME_INFO_SIZE] {
        let mut b = [0u8; VCPU_TIME_INFO_SIZE];
        b[0..4].copy_from_slice(&self.version.to_le_bytes());
        // 4..8: pad0
        b[8..16].copy_from_slice(&self.tsc_timestamp.to_le_bytes());
        b[16..24].copy_from_slice(&self.system_time.to_le_bytes());
        b[24..28].copy_from_slice(&self.tsc_to_system_mul.to_le_bytes());
        b[28] = self.tsc_shift as u8;
        b[29] = self.flags;
        // 30..32: pad
        b
    }

    /// Parses the guest layout (for tests and for reading back the version).
    pub fn from_bytes(b: &[u8; VCPU_TIME_INFO_SIZE]) -> Self {
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| (u32_at(o) as u64) | ((u32_at(o + 4) as u64) << 32);
        PvClockVcpuTimeInfo {
            version: u32_at(0),
            tsc_timestamp: u64_at(8),
            system_time: u64_at(16),
            tsc_to_system_mul: u32_at(24),
            tsc_shift: b[28] as i8,
            flags: b[29],
        }
    }

    /// The three writes of a consistent update when the structure in guest
    /// memory currently carries `old_version`: first only the 4-byte odd
    /// version, then the full structure with the new even version. Write
    /// `.0` to offset 0, then `.1` to offset 0 (the version bytes last if
    /// the memory writes are not ordered as a whole).
    pub fn to_bytes_for_update(&self, old_version: u32) -> ([u8; 4], [u8; VCPU_TIME_INFO_SIZE]) {
        let odd = (old_version | 1).wrapping_add(if old_version & 1 == 0 { 0 } else { 2 });
        let mut done = *self;
        done.version = odd.wrapping_add(1);
        (odd.to_le_bytes(), done.to_bytes())
    }

    /// Guest-side computation of the clock at `tsc` (what Linux's
    /// `__pvclock_read_cycles` does), for tests and for the host to know the
    /// guest's view of time.
    pub fn guest_time_ns(&self, tsc: u64) -> u64 {
        let delta = tsc.wrapping_sub(self.tsc_timestamp);
        self.system_time
            .wrapping_add(scale_delta(delta, self.tsc_to_system_mul, self.tsc_shift))
    }
}

/// `(delta shifted by shift) * mul >> 32`, the pvclock scaling.
pub fn scale_delta(delta: u64, mul: u32, shift: i8) -> u64 {
    let d = if shift >= 0 {
        delta.checked_shl(shift as u32).unwrap_or(0)
    } else {
        delta.checked_shr((-(shift as i32)) as u32).unwrap_or(0)
    };
    (((d as u128) * (mul as u128)) >> 32) as u64
}

/// `pvclock_wall_clock`: the wall-clock time at which kvmclock's
/// system_time was zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PvClockWallClock {
    pub version: u32,
    pub sec: u32,
    pub nsec: u32,
}

impl PvClockWallClock {
    /// Wall clock for a guest whose kvmclock reads `system_time_ns` when the
    /// host's wall clock reads `now_unix_ns` (nanoseconds since the Unix
    /// epoch). `version` should be even.
    pub fn new(version: u32, now_unix_ns: u64, system_time_ns: u64) -> Self {
        let boot = now_unix_ns.saturating_sub(system_time_ns);
        PvClockWallClock {
            version,
            // The ABI has 32-bit seconds; it wraps in 2106.
            sec: (boot / NS_PER_SEC) as u32,
            nsec: (boot % NS_PER_SEC) as u32,
        }
    }

    /// The 12-byte guest layout.
    pub fn to_bytes(&self) -> [u8; WALL_CLOCK_SIZE] {
        let mut b = [0u8; WALL_CLOCK_SIZE];
        b[0..4].copy_from_slice(&self.version.to_le_bytes());
        b[4..8].copy_from_slice(&self.sec.to_le_bytes());
        b[8..12].copy_from_slice(&self.nsec.to_le_bytes());
        b
    }
}

/// Scale factors for a TSC frequency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PvClock {
    pub tsc_hz: u64,
    pub tsc_to_system_mul: u32,
    pub tsc_shift: i8,
}

impl PvClock {
    /// Computes `mul`/`shift` so that `scale_delta(delta)` converts TSC
    /// cycles to nanoseconds. The shift is chosen as small as possible with
    /// the multiplier still fitting 32 bits, which keeps it at >= 2^31 and
    /// the relative error below 2^-31. Returns `None` for a zero frequency
    /// or one outside what the format can express.
    pub fn new(tsc_hz: u64) -> Option<Self> {
        if tsc_hz == 0 {
            return None;
        }
        for shift in -31i8..=31 {
            // mul = 1e9 * 2^(32 - shift) / tsc_hz
            let e = 32 - shift as i32;
            let num = if e >= 0 {
                (NS_PER_SEC as u128).checked_shl(e as u32)?
            } else {
                (NS_PER_SEC as u128) >> (-e) as u32
            };
            let mul = num / tsc_hz as u128;
            if mul < (1u128 << 32) {
                if mul == 0 {
                    return None;
                }
                return Some(PvClock {
                    tsc_hz,
                    tsc_to_system_mul: mul as u32,
                    tsc_shift: shift,
                });
            }
        }
        None
    }

    /// A `pvclock_vcpu_time_info` anchored at (`tsc`, `system_time_ns`),
    /// flagged TSC-stable (Vireo's guest TSC is one clock for all vCPUs).
    pub fn time_info(&self, version: u32, tsc: u64, system_time_ns: u64) -> PvClockVcpuTimeInfo {
        PvClockVcpuTimeInfo {
            version,
            tsc_timestamp: tsc,
            system_time: system_time_ns,
            tsc_to_system_mul: self.tsc_to_system_mul,
            tsc_shift: self.tsc_shift,
            flags: PVCLOCK_TSC_STABLE_BIT,
        }
    }

    /// Converts a TSC delta to nanoseconds exactly as the guest will.
    pub fn tsc_delta_to_ns(&self, delta: u64) -> u64 {
        scale_delta(delta, self.tsc_to_system_mul, self.tsc_shift)
    }
}
