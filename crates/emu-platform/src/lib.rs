//! Software models of the PC's interrupt controllers and timers for Vireo's
//! emulated CPU engine (`--accel emu`).
//!
//! With KVM these devices live in the host kernel; the software engine needs
//! them in user space. Every model here is a plain, deterministic state
//! machine: nothing reads a host clock. Time is passed in explicitly as
//! nanoseconds of guest time (`now_ns`) so the engine decides what "now" is
//! and tests can drive time exactly. All model structs derive serde
//! `Serialize`/`Deserialize`, so the whole interrupt state can be snapshotted.
//!
//! - [`lapic::Lapic`]: local APIC (xAPIC MMIO page, x2APIC MSRs), timer in
//!   one-shot, periodic and TSC-deadline modes, IPIs.
//! - [`ioapic::IoApic`]: 82093AA-style I/O APIC with 24 pins.
//! - [`pic::Pic`]: cascaded 8259A pair plus ELCR.
//! - [`pit::Pit`]: 8254 timer plus port 0x61.
//! - [`pvclock`]: kvmclock structures (`pvclock_vcpu_time_info`,
//!   `pvclock_wall_clock`).
//! - [`platform::Platform`]: all of the above wired together for N vCPUs.
//! - [`shared::SharedPlatform`]: the platform behind a mutex with lock-free
//!   "nothing pending" fast paths and a [`shared::GuestClock`], shaped like
//!   the engine's `InterruptController` trait.
//!
//! Guest-controlled input never panics: invalid accesses are ignored or read
//! as zero/all-ones, as the hardware would do.
//!
//! # Driving it from the engine
//!
//! - Route port I/O to [`Platform::pio_read`]/[`Platform::pio_write`] and
//!   MMIO to [`Platform::mmio_read`]/[`Platform::mmio_write`] (they return
//!   false for addresses they do not decode); route RDMSR/WRMSR to
//!   [`Platform::rdmsr`]/[`Platform::wrmsr`] (`None` = not an APIC MSR,
//!   `Some(Err(GpFault))` = inject #GP). CR8 accesses map to
//!   [`Lapic::set_cr8`]/[`Lapic::cr8`].
//! - Call [`Platform::tick`] with the current guest time often (at block
//!   boundaries, before checking for interrupts) and at
//!   [`Platform::next_deadline_ns`] when every vCPU is halted. Guest time must
//!   be monotonic and consistent with the TSC the guest reads (Linux's PIT
//!   calibration loop wants about 1000 reads of port 0x61 per 10 ms).
//! - Before each instruction boundary where IF=1 and no interrupt shadow:
//!   `if let Some(v) = p.pending_vector(cpu) { if let Some(v) = p.ack(cpu, v) { inject(v) } }`.
//!   NMI, INIT and SIPI come from [`Platform::take_nmi`],
//!   [`Platform::take_init`] and [`Platform::take_startup`]; APs stay in
//!   wait-for-INIT until they see INIT then a start-up vector (CS =
//!   vector << 8, IP = 0).
//! - CPUID: advertising TSC-deadline (leaf 1 ECX bit 24) lets Linux skip its
//!   100 ms APIC timer calibration; the APIC bus is 1 GHz by default (KVM's
//!   value, reportable in the hypervisor timing leaf 0x40000010 EBX in kHz).
//! - kvmclock: on a write to MSR_KVM_SYSTEM_TIME_NEW with bit 0 set, write
//!   [`PvClock::time_info`] bytes (see [`PvClockVcpuTimeInfo::to_bytes_for_update`])
//!   to the given address; on MSR_KVM_WALL_CLOCK_NEW write
//!   [`PvClockWallClock::to_bytes`].

pub mod ioapic;
pub mod lapic;
pub mod pic;
pub mod pit;
pub mod platform;
pub mod pvclock;
pub mod shared;

pub use ioapic::{Delivery, IoApic};
pub use lapic::{IpiRequest, Lapic, LapicEvent};
pub use pic::Pic;
pub use pit::Pit;
pub use platform::{Platform, PlatformConfig, RestoreError};
pub use pvclock::{PvClock, PvClockVcpuTimeInfo, PvClockWallClock};
pub use shared::{GuestClock, ManualClock, SharedPlatform};

use serde::{Deserialize, Serialize};

/// Interrupt message delivery modes (the 3-bit field shared by the ICR, LVT
/// entries and I/O APIC redirection entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeliveryMode {
    Fixed,
    LowestPriority,
    Smi,
    Nmi,
    Init,
    StartUp,
    ExtInt,
    /// Encoding 0b011 is reserved; kept so a guest-written value round-trips.
    Reserved,
}

impl DeliveryMode {
    /// Decodes the 3-bit delivery mode field.
    pub fn from_bits(bits: u32) -> Self {
        match bits & 7 {
            0 => DeliveryMode::Fixed,
            1 => DeliveryMode::LowestPriority,
            2 => DeliveryMode::Smi,
            4 => DeliveryMode::Nmi,
            5 => DeliveryMode::Init,
            6 => DeliveryMode::StartUp,
            7 => DeliveryMode::ExtInt,
            _ => DeliveryMode::Reserved,
        }
    }

    /// The 3-bit encoding.
    pub fn bits(self) -> u32 {
        match self {
            DeliveryMode::Fixed => 0,
            DeliveryMode::LowestPriority => 1,
            DeliveryMode::Smi => 2,
            DeliveryMode::Reserved => 3,
            DeliveryMode::Nmi => 4,
            DeliveryMode::Init => 5,
            DeliveryMode::StartUp => 6,
            DeliveryMode::ExtInt => 7,
        }
    }
}

/// Physical (APIC ID) or logical (LDR/DFR match) destination addressing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DestMode {
    Physical,
    Logical,
}

/// Edge- or level-triggered interrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Trigger {
    Edge,
    Level,
}

/// Nanoseconds per second, used by all the clock conversions.
pub const NS_PER_SEC: u64 = 1_000_000_000;

/// `a * b / c` without intermediate overflow, rounding down; saturates at
/// `u64::MAX` and returns 0 when `c` is 0 (callers validate `c` earlier, but
/// a zero must not panic).
pub(crate) fn mul_div_floor(a: u64, b: u64, c: u64) -> u64 {
    if c == 0 {
        return 0;
    }
    let r = (a as u128) * (b as u128) / (c as u128);
    u64::try_from(r).unwrap_or(u64::MAX)
}

/// `a * b / c` rounding up; same overflow rules as [`mul_div_floor`].
pub(crate) fn mul_div_ceil(a: u64, b: u64, c: u64) -> u64 {
    if c == 0 {
        return 0;
    }
    let r = ((a as u128) * (b as u128)).div_ceil(c as u128);
    u64::try_from(r).unwrap_or(u64::MAX)
}

/// Reads a little-endian value of `data.len()` (1..=8) bytes out of `value`
/// starting at byte `shift`. Used for sub-register MMIO/PIO reads.
pub(crate) fn put_le(value: u64, byte_offset: usize, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        let idx = byte_offset + i;
        *b = if idx < 8 {
            (value >> (idx * 8)) as u8
        } else {
            0
        };
    }
}

/// Assembles up to 8 little-endian bytes into a u64.
pub(crate) fn get_le(data: &[u8]) -> u64 {
    let mut v = 0u64;
    for (i, b) in data.iter().take(8).enumerate() {
        v |= (*b as u64) << (i * 8);
    }
    v
}

/// One 8259 as KVM_GET_IRQCHIP lays it out (`struct kvm_pic_state`): the
/// form in which the engine's PIC moves to and from another accelerator.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PicChipRegs {
    pub last_irr: u8,
    pub irr: u8,
    pub imr: u8,
    pub isr: u8,
    pub priority_add: u8,
    pub irq_base: u8,
    pub read_reg_select: bool,
    pub poll: bool,
    pub special_mask: bool,
    pub init_state: u8,
    pub auto_eoi: bool,
    pub rotate_on_auto_eoi: bool,
    pub special_fully_nested_mode: bool,
    pub init4: bool,
    pub elcr: u8,
    pub elcr_mask: u8,
}

/// The I/O APIC as `struct kvm_ioapic_state` has it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoApicRegs {
    pub id: u32,
    pub ioregsel: u32,
    /// Input pins asserted.
    pub irr: u32,
    pub redirection: [u64; ioapic::IOAPIC_NUM_PINS],
}

/// One 8254 channel as `struct kvm_pit_channel_state` has it. `mode` 0xff:
/// never programmed. The count restarts from `count` when loaded (KVM does
/// the same on KVM_SET_PIT2).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PitChannelRegs {
    /// Initial count, 1..=0x10000.
    pub count: u32,
    pub latched_count: u16,
    /// 0: no count latched; else the read state of the latched count.
    pub count_latched: u8,
    pub status_latched: bool,
    pub status: u8,
    /// 1 LSB, 2 MSB, 3 LSB next of a word, 4 MSB next of a word.
    pub read_state: u8,
    pub write_state: u8,
    pub write_latch: u8,
    /// 1 LSB, 2 MSB, 3 word.
    pub rw_mode: u8,
    pub mode: u8,
    pub bcd: bool,
    pub gate: bool,
}

/// The PIT and port 0x61 (bit 0 gate 2, bit 1 speaker data).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PitRegs {
    pub channels: [PitChannelRegs; 3],
    pub port_b: u8,
}
