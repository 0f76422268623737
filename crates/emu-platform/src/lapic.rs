//! Local APIC model (xAPIC MMIO page, plus x2APIC MSR access).
//!
//! Guest-visible behaviour follows the Intel SDM vol. 3A chapter 11 ("Advanced
//! Programmable Interrupt Controller") and what Linux's arch/x86/kernel/apic
//! code relies on:
//! - interrupts are accepted into IRR (with TMR recording the trigger mode),
//!   move to ISR when the CPU acknowledges them, and an EOI retires the
//!   highest ISR bit; level-triggered EOIs are reported so the platform can
//!   broadcast them to the I/O APIC;
//! - PPR is derived from TPR and the highest in-service vector; a vector is
//!   only deliverable when its priority class is above PPR's;
//! - the timer counts at `bus_hz / divide` and supports one-shot, periodic and
//!   TSC-deadline modes; its expiries are computed from the explicit clock so
//!   periodic mode never drifts;
//! - IPIs written to the ICR are returned to the caller as [`IpiRequest`]s
//!   because routing them needs the other vCPUs (see `platform`).

use serde::{Deserialize, Serialize};

use crate::{get_le, put_le, DeliveryMode, DestMode, Trigger, NS_PER_SEC};

/// Default physical base of the xAPIC MMIO page.
pub const LAPIC_DEFAULT_BASE: u64 = 0xfee0_0000;
/// Size of the xAPIC MMIO page.
pub const LAPIC_MMIO_SIZE: u64 = 0x1000;

/// IA32_APIC_BASE MSR index.
pub const MSR_IA32_APIC_BASE: u32 = 0x1b;
/// IA32_TSC_DEADLINE MSR index.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// First x2APIC MSR (x2APIC register = 0x800 + xAPIC offset / 16).
pub const MSR_X2APIC_FIRST: u32 = 0x800;
/// Last x2APIC MSR.
pub const MSR_X2APIC_LAST: u32 = 0x8ff;

/// IA32_APIC_BASE: this processor is the bootstrap processor.
pub const APIC_BASE_BSP: u64 = 1 << 8;
/// IA32_APIC_BASE: x2APIC mode enable.
pub const APIC_BASE_EXTD: u64 = 1 << 10;
/// IA32_APIC_BASE: global APIC enable.
pub const APIC_BASE_ENABLE: u64 = 1 << 11;

/// Default APIC bus frequency: KVM models a 1 GHz bus (1 ns per bus cycle),
/// which keeps the timer arithmetic exact.
pub const DEFAULT_BUS_HZ: u64 = 1_000_000_000;

// Register offsets in the xAPIC page.
pub const APIC_ID: u32 = 0x20;
pub const APIC_VERSION: u32 = 0x30;
pub const APIC_TPR: u32 = 0x80;
pub const APIC_APR: u32 = 0x90;
pub const APIC_PPR: u32 = 0xa0;
pub const APIC_EOI: u32 = 0xb0;
pub const APIC_RRD: u32 = 0xc0;
pub const APIC_LDR: u32 = 0xd0;
pub const APIC_DFR: u32 = 0xe0;
pub const APIC_SVR: u32 = 0xf0;
pub const APIC_ISR: u32 = 0x100;
pub const APIC_TMR: u32 = 0x180;
pub const APIC_IRR: u32 = 0x200;
pub const APIC_ESR: u32 = 0x280;
pub const APIC_ICR_LO: u32 = 0x300;
pub const APIC_ICR_HI: u32 = 0x310;
pub const APIC_LVT_TIMER: u32 = 0x320;
pub const APIC_LVT_THERMAL: u32 = 0x330;
pub const APIC_LVT_PERF: u32 = 0x340;
pub const APIC_LVT_LINT0: u32 = 0x350;
pub const APIC_LVT_LINT1: u32 = 0x360;
pub const APIC_LVT_ERROR: u32 = 0x370;
pub const APIC_TMICT: u32 = 0x380;
pub const APIC_TMCCT: u32 = 0x390;
pub const APIC_TDCR: u32 = 0x3e0;
/// x2APIC only (MSR 0x83f).
pub const APIC_SELF_IPI: u32 = 0x3f0;

/// Version register: version 0x14 (integrated APIC) with 6 LVT entries
/// (max LVT index 5), no EOI-broadcast suppression, like KVM's default.
pub const APIC_VERSION_VALUE: u32 = 0x14 | (5 << 16);

/// LVT mask bit.
pub const LVT_MASKED: u32 = 1 << 16;
/// SVR software enable bit.
pub const SVR_ENABLE: u32 = 1 << 8;

// ESR bits.
const ESR_SEND_ILLEGAL_VECTOR: u32 = 1 << 5;
const ESR_RECV_ILLEGAL_VECTOR: u32 = 1 << 6;
const ESR_ILLEGAL_REGISTER: u32 = 1 << 7;

// Indices into `lvt`.
const LVT_IDX_TIMER: usize = 0;
const LVT_IDX_THERMAL: usize = 1;
const LVT_IDX_PERF: usize = 2;
const LVT_IDX_LINT0: usize = 3;
const LVT_IDX_LINT1: usize = 4;
const LVT_IDX_ERROR: usize = 5;
const LVT_COUNT: usize = 6;

/// Writable bits of each LVT entry (delivery status and remote IRR are
/// read-only and never set here).
const LVT_WRITE_MASK: [u32; LVT_COUNT] = [
    0x0007_00ff, // timer: vector, mask, mode (bits 17-18)
    0x0001_07ff, // thermal: vector, delivery mode, mask
    0x0001_07ff, // perfmon
    0x0001_a7ff, // LINT0: vector, mode, polarity, trigger, mask
    0x0001_a7ff, // LINT1
    0x0001_00ff, // error: vector, mask
];

/// LVT timer mode field (bits 17-18).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TimerMode {
    OneShot,
    Periodic,
    TscDeadline,
}

impl TimerMode {
    fn from_lvt(lvt: u32) -> Self {
        match (lvt >> 17) & 3 {
            1 => TimerMode::Periodic,
            2 => TimerMode::TscDeadline,
            // 3 is reserved; treat as one-shot rather than trusting it.
            _ => TimerMode::OneShot,
        }
    }
}

/// ICR destination shorthand (bits 18-19).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Shorthand {
    None,
    SelfOnly,
    AllIncludingSelf,
    AllExcludingSelf,
}

/// An inter-processor interrupt written to the ICR, to be routed by the
/// platform to the destination local APICs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpiRequest {
    /// APIC ID of the sender (for the self/all-excluding-self shorthands).
    pub source: u32,
    pub vector: u8,
    pub delivery_mode: DeliveryMode,
    pub dest_mode: DestMode,
    pub trigger: Trigger,
    /// The ICR level bit (assert/de-assert).
    pub level: bool,
    pub shorthand: Shorthand,
    /// Destination field: 8 bits in xAPIC mode, 32 bits in x2APIC mode.
    pub dest: u32,
}

/// Something a register write asks the platform to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LapicEvent {
    /// Route this IPI.
    Ipi(IpiRequest),
    /// A level-triggered interrupt with this vector was EOI'd: broadcast the
    /// EOI to the I/O APIC so it clears remote IRR.
    EoiBroadcast(u8),
}

/// x2APIC MSR access fault: the guest should receive #GP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpFault;

/// One local APIC.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Lapic {
    apic_id: u32,
    /// The ID the hardware assigned (CPUID's initial APIC ID): the x2APIC
    /// ID, and what the xAPIC ID returns to when the APIC is enabled again
    /// or enters x2APIC mode. None in states saved before it was kept
    /// (then `apic_id` is it).
    #[serde(default)]
    hw_id: Option<u32>,
    apic_base: u64,
    bus_hz: u64,
    tpr: u32,
    ldr: u32,
    dfr: u32,
    svr: u32,
    isr: [u32; 8],
    tmr: [u32; 8],
    irr: [u32; 8],
    /// ESR as last latched by a write to ESR (what the guest reads).
    esr: u32,
    /// Errors accumulated since the last ESR write.
    esr_pending: u32,
    icr_lo: u32,
    icr_hi: u32,
    lvt: [u32; LVT_COUNT],
    tdcr: u32,
    timer: TimerState,
    nmi_pending: bool,
    /// A second NMI arrived while one was pending: as KVM does, one NMI
    /// can be pending behind another, so two NMIs sent at once both run.
    #[serde(default)]
    nmi_second: bool,
    /// INIT was received and not yet taken by the CPU.
    init_pending: bool,
    /// INIT received, a SIPI will be accepted.
    wait_for_sipi: bool,
    sipi_vector: Option<u8>,
}

/// Timer bookkeeping. One-shot/periodic expiries are derived from the load
/// time and a count of expiries already processed, so periodic deadlines are
/// exact multiples of the period from the load time (no accumulated error).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct TimerState {
    initial: u32,
    /// Guest time at which TMICT was written (count load).
    start_ns: u64,
    /// Counts already consumed at `start_ns` (non-zero after a divide
    /// change re-based the timer mid-count).
    base_counts: u64,
    /// Number of expiries already processed since `start_ns`.
    fired: u64,
    /// One-shot/periodic countdown is running.
    armed: bool,
    /// IA32_TSC_DEADLINE as the guest sees it (0 = disarmed).
    tsc_deadline: u64,
    /// Guest time at which the TSC deadline is reached.
    tsc_deadline_ns: u64,
}

impl Lapic {
    /// A local APIC in its power-on state. `bus_hz` is the timer input clock
    /// before the divider (use [`DEFAULT_BUS_HZ`]). The BSP gets LINT0 in
    /// ExtINT mode unmasked (virtual-wire mode, as firmware and KVM leave it)
    /// so the 8259 works before the OS programs the APIC.
    pub fn new(apic_id: u32, bsp: bool, bus_hz: u64) -> Self {
        let mut apic_base = LAPIC_DEFAULT_BASE | APIC_BASE_ENABLE;
        if bsp {
            apic_base |= APIC_BASE_BSP;
        }
        let mut l = Lapic {
            apic_id,
            hw_id: Some(apic_id),
            apic_base,
            bus_hz: if bus_hz == 0 { DEFAULT_BUS_HZ } else { bus_hz },
            tpr: 0,
            ldr: 0,
            dfr: 0xffff_ffff,
            svr: 0xff,
            isr: [0; 8],
            tmr: [0; 8],
            irr: [0; 8],
            esr: 0,
            esr_pending: 0,
            icr_lo: 0,
            icr_hi: 0,
            lvt: [LVT_MASKED; LVT_COUNT],
            tdcr: 0,
            timer: TimerState::default(),
            nmi_pending: false,
            nmi_second: false,
            init_pending: false,
            wait_for_sipi: false,
            sipi_vector: None,
        };
        l.reset_registers();
        if bsp {
            l.lvt[LVT_IDX_LINT0] = DeliveryMode::ExtInt.bits() << 8;
            l.lvt[LVT_IDX_LINT1] = DeliveryMode::Nmi.bits() << 8;
        }
        l
    }

    /// Register state after power-on or INIT (SDM 11.4.7.1): everything but
    /// the APIC ID and IA32_APIC_BASE is cleared, LVTs are masked, DFR is
    /// all ones and the APIC is software-disabled.
    fn reset_registers(&mut self) {
        self.tpr = 0;
        self.ldr = 0;
        self.dfr = 0xffff_ffff;
        self.svr = 0xff;
        self.isr = [0; 8];
        self.tmr = [0; 8];
        self.irr = [0; 8];
        self.esr = 0;
        self.esr_pending = 0;
        self.icr_lo = 0;
        self.icr_hi = 0;
        self.lvt = [LVT_MASKED; LVT_COUNT];
        self.tdcr = 0;
        self.timer = TimerState::default();
        self.nmi_pending = false;
        self.nmi_second = false;
        if self.x2apic_mode() {
            self.ldr = x2apic_ldr(self.apic_id);
        }
    }

    // ----- identity and mode -------------------------------------------------

    /// The APIC ID used for physical destination matching. In xAPIC mode the
    /// guest can rewrite the ID register; this reflects that.
    pub fn apic_id(&self) -> u32 {
        self.apic_id
    }

    /// The hardware-assigned (initial) APIC ID.
    pub fn hw_id(&self) -> u32 {
        self.hw_id.unwrap_or(self.apic_id)
    }

    /// IA32_APIC_BASE value.
    pub fn apic_base(&self) -> u64 {
        self.apic_base
    }

    /// Physical address of the xAPIC page, if it is decoded at all (the APIC
    /// is globally enabled and not in x2APIC mode).
    pub fn mmio_base(&self) -> Option<u64> {
        if self.hw_enabled() && !self.x2apic_mode() {
            Some(self.apic_base & 0x000f_ffff_ffff_f000)
        } else {
            None
        }
    }

    /// Globally enabled through IA32_APIC_BASE.
    pub fn hw_enabled(&self) -> bool {
        self.apic_base & APIC_BASE_ENABLE != 0
    }

    /// Software enabled through SVR bit 8 (and globally enabled).
    pub fn sw_enabled(&self) -> bool {
        self.hw_enabled() && self.svr & SVR_ENABLE != 0
    }

    /// x2APIC mode (IA32_APIC_BASE.EXTD).
    pub fn x2apic_mode(&self) -> bool {
        self.apic_base & APIC_BASE_EXTD != 0 && self.hw_enabled()
    }

    /// Writes IA32_APIC_BASE. Illegal transitions (x2APIC -> xAPIC without
    /// disabling, disabled -> x2APIC, reserved bits) return `Err(GpFault)`.
    pub fn write_apic_base(&mut self, value: u64) -> Result<(), GpFault> {
        // Bits 12..=51 hold the base; 8, 10, 11 are flags; the rest reserved.
        let reserved = !(0x000f_ffff_ffff_f000 | APIC_BASE_BSP | APIC_BASE_EXTD | APIC_BASE_ENABLE);
        if value & reserved != 0 {
            return Err(GpFault);
        }
        let old_en = self.hw_enabled();
        let old_x2 = self.x2apic_mode();
        let new_en = value & APIC_BASE_ENABLE != 0;
        let new_x2 = value & APIC_BASE_EXTD != 0;
        if new_x2 && !new_en {
            return Err(GpFault);
        }
        if old_x2 && new_en && !new_x2 {
            return Err(GpFault);
        }
        if !old_en && new_en && new_x2 {
            return Err(GpFault);
        }
        // The BSP flag is read-only for software.
        let value = (value & !APIC_BASE_BSP) | (self.apic_base & APIC_BASE_BSP);
        self.apic_base = value;
        if old_en && !new_en {
            // Disabling the APIC is equivalent to a power-up reset of its
            // registers (SDM 11.4.3); only the ID survives.
            self.reset_registers();
        }
        // Enabling it again, or entering x2APIC mode (whose ID is
        // read-only), brings back the hardware-assigned ID, as KVM does.
        if (!old_en && new_en) || (!old_x2 && self.x2apic_mode()) {
            self.apic_id = self.hw_id();
        }
        if !old_x2 && self.x2apic_mode() {
            self.ldr = x2apic_ldr(self.apic_id);
        }
        Ok(())
    }

    // ----- interrupt acceptance ------------------------------------------------

    /// Accepts a fixed/lowest-priority interrupt into IRR. Returns false when
    /// it was not accepted (illegal vector, APIC disabled).
    pub fn accept_interrupt(&mut self, vector: u8, trigger: Trigger) -> bool {
        if !self.sw_enabled() {
            // A software-disabled APIC drops fixed interrupts (only NMI, INIT,
            // SIPI and SMI get through), which is also what KVM does.
            return false;
        }
        if vector < 16 {
            self.raise_error(ESR_RECV_ILLEGAL_VECTOR);
            return false;
        }
        set_bit(&mut self.irr, vector);
        match trigger {
            Trigger::Level => set_bit(&mut self.tmr, vector),
            Trigger::Edge => clear_bit(&mut self.tmr, vector),
        }
        true
    }

    /// Accepts an interrupt message of any delivery mode (from an IPI, the
    /// I/O APIC or an LVT). Returns true if it changed anything the CPU has to
    /// look at (a new IRR bit, NMI, INIT or SIPI).
    pub fn deliver(&mut self, mode: DeliveryMode, vector: u8, trigger: Trigger) -> bool {
        if !self.hw_enabled() {
            return false;
        }
        match mode {
            DeliveryMode::Fixed | DeliveryMode::LowestPriority => {
                self.accept_interrupt(vector, trigger)
            }
            DeliveryMode::Nmi => {
                if self.nmi_pending {
                    self.nmi_second = true;
                }
                self.nmi_pending = true;
                true
            }
            DeliveryMode::Init => {
                self.reset_registers();
                self.init_pending = true;
                self.wait_for_sipi = true;
                self.sipi_vector = None;
                true
            }
            DeliveryMode::StartUp => {
                // A SIPI is only honoured in wait-for-SIPI state; further
                // SIPIs (Linux sends two) are ignored once the CPU started.
                if self.wait_for_sipi {
                    self.wait_for_sipi = false;
                    self.sipi_vector = Some(vector);
                    true
                } else {
                    false
                }
            }
            // SMM is not modelled; ExtINT is handled by the platform (the
            // vector comes from the 8259's INTA cycle, not from the message).
            DeliveryMode::Smi | DeliveryMode::ExtInt | DeliveryMode::Reserved => false,
        }
    }

    /// Processor priority (SDM 11.8.3.1).
    pub fn ppr(&self) -> u8 {
        let isrv = highest_bit(&self.isr).unwrap_or(0) as u32;
        let ppr = if (self.tpr & 0xf0) >= (isrv & 0xf0) {
            self.tpr & 0xff
        } else {
            isrv & 0xf0
        };
        ppr as u8
    }

    /// Highest pending vector whose priority class is above PPR, i.e. what the
    /// APIC would present to the CPU now.
    pub fn pending_vector(&self) -> Option<u8> {
        if !self.hw_enabled() {
            return None;
        }
        let v = highest_bit(&self.irr)?;
        if (v & 0xf0) > (self.ppr() & 0xf0) {
            Some(v)
        } else {
            None
        }
    }

    /// The CPU accepted `vector` (interrupt acknowledge): IRR -> ISR.
    pub fn ack(&mut self, vector: u8) {
        if test_bit(&self.irr, vector) {
            clear_bit(&mut self.irr, vector);
            set_bit(&mut self.isr, vector);
        }
    }

    /// Takes a pending NMI.
    pub fn take_nmi(&mut self) -> bool {
        let taken = self.nmi_pending;
        self.nmi_pending = std::mem::take(&mut self.nmi_second);
        taken
    }

    /// An NMI is pending (without taking it).
    pub fn nmi_pending(&self) -> bool {
        self.nmi_pending
    }

    /// Takes a pending INIT: the CPU must enter wait-for-SIPI state (an AP) or
    /// reset (the engine decides what INIT means for the BSP).
    pub fn take_init(&mut self) -> bool {
        std::mem::take(&mut self.init_pending)
    }

    /// Takes the start-up vector of a received SIPI: the AP starts in real
    /// mode at CS = vector << 8, IP = 0.
    pub fn take_startup(&mut self) -> Option<u8> {
        self.sipi_vector.take()
    }

    /// An INIT is waiting for [`Lapic::take_init`].
    pub fn init_pending(&self) -> bool {
        self.init_pending
    }

    /// A start-up vector is waiting for [`Lapic::take_startup`].
    pub fn startup_pending(&self) -> bool {
        self.sipi_vector.is_some()
    }

    /// The CPU is in wait-for-SIPI state (INIT seen, no SIPI yet).
    pub fn waiting_for_sipi(&self) -> bool {
        self.wait_for_sipi
    }

    /// Whether an 8259 interrupt on LINT0 reaches the CPU: LINT0 is
    /// unmasked in ExtINT mode, or the APIC is globally disabled (then the
    /// PIC's INTR goes straight to the CPU).
    pub fn accepts_pic_interrupts(&self) -> bool {
        if !self.hw_enabled() {
            return true;
        }
        let lint0 = self.lvt[LVT_IDX_LINT0];
        lint0 & LVT_MASKED == 0 && DeliveryMode::from_bits(lint0 >> 8) == DeliveryMode::ExtInt
    }

    /// Raises LINT1 (e.g. an NMI button): delivered according to its LVT.
    pub fn raise_lint1(&mut self) -> bool {
        self.deliver_lvt(LVT_IDX_LINT1)
    }

    /// Signals a thermal event through the thermal LVT entry.
    pub fn raise_thermal(&mut self) -> bool {
        self.deliver_lvt(LVT_IDX_THERMAL)
    }

    /// Signals a performance-counter overflow through the perfmon LVT entry.
    pub fn raise_perfmon(&mut self) -> bool {
        self.deliver_lvt(LVT_IDX_PERF)
    }

    fn deliver_lvt(&mut self, idx: usize) -> bool {
        let lvt = self.lvt[idx];
        if lvt & LVT_MASKED != 0 {
            return false;
        }
        let vector = (lvt & 0xff) as u8;
        let mode = if idx == LVT_IDX_TIMER || idx == LVT_IDX_ERROR {
            DeliveryMode::Fixed
        } else {
            DeliveryMode::from_bits(lvt >> 8)
        };
        let trigger = if (idx == LVT_IDX_LINT0 || idx == LVT_IDX_LINT1) && lvt & (1 << 15) != 0 {
            Trigger::Level
        } else {
            Trigger::Edge
        };
        self.deliver(mode, vector, trigger)
    }

    fn raise_error(&mut self, bits: u32) {
        let newly = bits & !self.esr_pending;
        self.esr_pending |= bits;
        if newly == 0 {
            return;
        }
        let lvt = self.lvt[LVT_IDX_ERROR];
        let vector = (lvt & 0xff) as u8;
        // An error LVT with an illegal vector would recurse; drop it.
        if lvt & LVT_MASKED == 0 && vector >= 16 && self.sw_enabled() {
            set_bit(&mut self.irr, vector);
            clear_bit(&mut self.tmr, vector);
        }
    }

    // ----- destination matching ----------------------------------------------

    /// Whether this APIC is addressed by `dest` in `mode` (ignoring
    /// shorthands). xAPIC: 8-bit physical ID with 0xff broadcast, logical
    /// flat (DFR model 0xf) or cluster (model 0x0). x2APIC: 32-bit ID,
    /// logical cluster mode, 0xffffffff broadcast.
    pub fn matches_dest(&self, dest: u32, mode: DestMode) -> bool {
        if !self.hw_enabled() {
            return false;
        }
        if self.x2apic_mode() {
            if dest == 0xffff_ffff {
                return true;
            }
            return match mode {
                DestMode::Physical => dest == self.apic_id,
                DestMode::Logical => {
                    (dest >> 16) == (self.ldr >> 16) && (dest & self.ldr & 0xffff) != 0
                }
            };
        }
        let dest8 = dest & 0xff;
        match mode {
            DestMode::Physical => dest8 == 0xff || dest8 == (self.apic_id & 0xff),
            DestMode::Logical => {
                if dest8 == 0xff {
                    return true;
                }
                let ldr8 = self.ldr >> 24;
                if self.dfr >> 28 == 0xf {
                    ldr8 & dest8 != 0
                } else {
                    (ldr8 >> 4) == (dest8 >> 4) && (ldr8 & dest8 & 0xf) != 0
                }
            }
        }
    }

    /// Task priority, used for lowest-priority arbitration.
    pub fn tpr(&self) -> u8 {
        self.tpr as u8
    }

    /// CR8 write (CR8 holds bits 7..4 of TPR).
    pub fn set_cr8(&mut self, cr8: u64) {
        self.tpr = ((cr8 & 0xf) << 4) as u32;
    }

    /// CR8 read.
    pub fn cr8(&self) -> u64 {
        ((self.tpr >> 4) & 0xf) as u64
    }

    // ----- another accelerator's form -------------------------------------------

    /// The register page as KVM_GET_LAPIC lays it out (the xAPIC MMIO page's
    /// first KiB, TMCCT as at `now_ns`). The TSC deadline is an MSR:
    /// [`Lapic::tsc_deadline`].
    pub fn register_page(&self, now_ns: u64) -> [u8; 1024] {
        let mut page = [0u8; 1024];
        for reg in (0x20u32..0x400).step_by(16) {
            if let Some(v) = self.read_reg(reg, now_ns) {
                let at = reg as usize;
                page[at..at + 4].copy_from_slice(&v.to_le_bytes());
            }
        }
        page
    }

    /// Load a register page of [`Lapic::register_page`]'s form with
    /// IA32_APIC_BASE and IA32_TSC_DEADLINE: the timer goes on from the
    /// page's current count (TMCCT) or the deadline, from guest time
    /// `now_ns` (guest TSC `now_tsc` at `tsc_hz`).
    #[allow(clippy::too_many_arguments)]
    pub fn load_register_page(
        &mut self,
        page: &[u8; 1024],
        apic_base: u64,
        tsc_deadline: u64,
        now_ns: u64,
        now_tsc: u64,
        tsc_hz: u64,
    ) -> Result<(), String> {
        let reserved = !(0x000f_ffff_ffff_f000 | APIC_BASE_BSP | APIC_BASE_EXTD | APIC_BASE_ENABLE);
        if apic_base & reserved != 0 {
            return Err(format!(
                "IA32_APIC_BASE {apic_base:#x} has reserved bits set"
            ));
        }
        let r = |reg: usize| {
            u32::from_le_bytes([page[reg], page[reg + 1], page[reg + 2], page[reg + 3]])
        };
        self.apic_base = apic_base;
        let x2 = self.x2apic_mode();
        self.apic_id = if x2 { r(0x20) } else { r(0x20) >> 24 };
        self.tpr = r(0x80) & 0xff;
        self.ldr = if x2 { r(0xd0) } else { r(0xd0) & 0xff00_0000 };
        self.dfr = if x2 {
            0xffff_ffff
        } else {
            r(0xe0) | 0x0fff_ffff
        };
        self.svr = r(0xf0) & 0x3ff;
        for i in 0..8 {
            self.isr[i] = r(0x100 + 16 * i);
            self.tmr[i] = r(0x180 + 16 * i);
            self.irr[i] = r(0x200 + 16 * i);
        }
        self.esr = r(0x280);
        self.esr_pending = 0;
        self.icr_lo = r(0x300) & !(1 << 12);
        self.icr_hi = r(0x310);
        for (i, lvt) in self.lvt.iter_mut().enumerate() {
            *lvt = r(0x320 + 16 * i) & LVT_WRITE_MASK[i];
        }
        self.tdcr = r(0x3e0) & 0xb;
        self.timer = TimerState::default();
        let initial = r(0x380);
        match self.timer_mode() {
            TimerMode::TscDeadline => self.set_tsc_deadline(tsc_deadline, now_ns, now_tsc, tsc_hz),
            mode if initial != 0 => {
                let current = r(0x390).min(initial);
                self.timer.initial = initial;
                self.timer.start_ns = now_ns;
                if current == 0 && mode != TimerMode::Periodic {
                    // A one-shot that ran out.
                    self.timer.fired = 1;
                } else {
                    self.timer.armed = true;
                    self.timer.base_counts = (initial - current) as u64;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Another accelerator's pending NMI, INIT and wait-for-SIPI state.
    pub fn set_pending_events(&mut self, nmi: bool, wait_for_sipi: bool) {
        self.nmi_pending = nmi;
        self.init_pending = false;
        self.wait_for_sipi = wait_for_sipi;
        self.sipi_vector = None;
    }

    // ----- timer ---------------------------------------------------------------

    /// The timer's divisor from TDCR bits 0, 1 and 3.
    pub fn timer_divisor(&self) -> u64 {
        let v = ((self.tdcr & 8) >> 1) | (self.tdcr & 3);
        1u64 << ((v + 1) & 7)
    }

    /// The current LVT timer mode.
    pub fn timer_mode(&self) -> TimerMode {
        TimerMode::from_lvt(self.lvt[LVT_IDX_TIMER])
    }

    /// Guest time of the `k`-th expiry after the count was loaded.
    fn expiry_ns(&self, k: u64) -> u64 {
        let counts = ((k as u128) * (self.timer.initial as u128))
            .saturating_sub(self.timer.base_counts as u128);
        let num = counts * (self.timer_divisor() as u128) * (NS_PER_SEC as u128);
        let ns = num.div_ceil(self.bus_hz.max(1) as u128);
        self.timer
            .start_ns
            .saturating_add(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    /// Timer input ticks (bus cycles / divisor) since the count was loaded.
    fn elapsed_counts(&self, now_ns: u64) -> u64 {
        let elapsed = now_ns.saturating_sub(self.timer.start_ns) as u128;
        let c = elapsed * (self.bus_hz.max(1) as u128)
            / ((NS_PER_SEC as u128) * (self.timer_divisor() as u128))
            + self.timer.base_counts as u128;
        u64::try_from(c).unwrap_or(u64::MAX)
    }

    /// TMCCT as read at `now_ns`.
    pub fn timer_current_count(&self, now_ns: u64) -> u32 {
        if self.timer_mode() == TimerMode::TscDeadline || self.timer.initial == 0 {
            return 0;
        }
        let initial = self.timer.initial as u64;
        let elapsed = self.elapsed_counts(now_ns);
        match self.timer_mode() {
            TimerMode::Periodic if self.timer.armed => (initial - elapsed % initial) as u32,
            _ if self.timer.armed && elapsed < initial => (initial - elapsed) as u32,
            _ => 0,
        }
    }

    /// Guest time of the next timer interrupt, if the timer is armed and its
    /// LVT entry unmasked (a masked timer needs no wake-up).
    pub fn next_timer_deadline(&self) -> Option<u64> {
        if !self.hw_enabled() || self.lvt[LVT_IDX_TIMER] & LVT_MASKED != 0 {
            return None;
        }
        self.raw_timer_deadline()
    }

    fn raw_timer_deadline(&self) -> Option<u64> {
        match self.timer_mode() {
            TimerMode::TscDeadline => {
                (self.timer.tsc_deadline != 0).then_some(self.timer.tsc_deadline_ns)
            }
            _ => (self.timer.armed && self.timer.initial != 0)
                .then(|| self.expiry_ns(self.timer.fired + 1)),
        }
    }

    /// Advances the timer to `now_ns`, raising the timer interrupt if it
    /// expired. Missed periodic expiries are coalesced into one interrupt (the
    /// vector can only be pending once anyway). Returns true if an interrupt
    /// was raised.
    pub fn tick(&mut self, now_ns: u64) -> bool {
        let Some(deadline) = self.raw_timer_deadline() else {
            return false;
        };
        if now_ns < deadline {
            return false;
        }
        match self.timer_mode() {
            TimerMode::TscDeadline => {
                self.timer.tsc_deadline = 0;
            }
            TimerMode::OneShot => {
                self.timer.armed = false;
                self.timer.fired = 1;
            }
            TimerMode::Periodic => {
                let initial = self.timer.initial as u64;
                self.timer.fired = self.elapsed_counts(now_ns) / initial;
                // Rounding of elapsed_counts vs expiry_ns: make sure the next
                // deadline really lies in the future.
                while self.expiry_ns(self.timer.fired + 1) <= now_ns {
                    self.timer.fired += 1;
                }
            }
        }
        self.deliver_lvt(LVT_IDX_TIMER)
    }

    /// IA32_TSC_DEADLINE write. `now_ns`/`now_tsc` are the current guest time
    /// and guest TSC, and `tsc_hz` the guest TSC frequency, used to turn the
    /// deadline into guest time. Ignored unless the timer is in TSC-deadline
    /// mode (SDM 11.5.4.1); 0 disarms.
    pub fn set_tsc_deadline(&mut self, deadline: u64, now_ns: u64, now_tsc: u64, tsc_hz: u64) {
        if self.timer_mode() != TimerMode::TscDeadline {
            return;
        }
        self.timer.tsc_deadline = deadline;
        if deadline == 0 {
            return;
        }
        let delta_tsc = deadline.saturating_sub(now_tsc);
        let delta_ns = if tsc_hz == 0 {
            0
        } else {
            crate::mul_div_ceil(delta_tsc, NS_PER_SEC, tsc_hz)
        };
        self.timer.tsc_deadline_ns = now_ns.saturating_add(delta_ns);
    }

    /// IA32_TSC_DEADLINE read: the armed deadline, 0 once it fired or when
    /// not in TSC-deadline mode.
    pub fn tsc_deadline(&self) -> u64 {
        if self.timer_mode() == TimerMode::TscDeadline {
            self.timer.tsc_deadline
        } else {
            0
        }
    }

    /// One-shot <-> periodic: the count goes on from where it is (it is
    /// not reloaded); a one-shot that already expired stays at zero.
    fn rebase_timer_for_mode_change(&mut self, now_ns: u64) {
        if !self.timer.armed {
            return;
        }
        let cur = self.timer_current_count(now_ns);
        if cur == 0 {
            // Expired, or due and not yet ticked (then it still fires).
            if self.timer.fired > 0 {
                self.timer.armed = false;
            }
            return;
        }
        self.timer.base_counts = (self.timer.initial - cur) as u64;
        self.timer.start_ns = now_ns;
        self.timer.fired = 0;
    }

    fn load_timer(&mut self, initial: u32, now_ns: u64) {
        self.timer.initial = initial;
        self.timer.start_ns = now_ns;
        self.timer.base_counts = 0;
        self.timer.fired = 0;
        self.timer.armed = initial != 0;
    }

    // ----- register access -------------------------------------------------

    /// Reads the 32-bit register at a 16-byte aligned offset; `None` for
    /// offsets that are not registers.
    fn read_reg(&self, reg: u32, now_ns: u64) -> Option<u32> {
        let v = match reg {
            APIC_ID => {
                if self.x2apic_mode() {
                    self.apic_id
                } else {
                    (self.apic_id & 0xff) << 24
                }
            }
            APIC_VERSION => APIC_VERSION_VALUE,
            APIC_TPR => self.tpr,
            APIC_APR => 0,
            APIC_PPR => self.ppr() as u32,
            APIC_EOI => 0,
            APIC_RRD => 0,
            APIC_LDR => self.ldr,
            APIC_DFR => {
                if self.x2apic_mode() {
                    return None;
                }
                self.dfr
            }
            APIC_SVR => self.svr,
            0x100..=0x170 => self.isr[((reg - APIC_ISR) >> 4) as usize],
            0x180..=0x1f0 => self.tmr[((reg - APIC_TMR) >> 4) as usize],
            0x200..=0x270 => self.irr[((reg - APIC_IRR) >> 4) as usize],
            APIC_ESR => self.esr,
            APIC_ICR_LO => self.icr_lo,
            APIC_ICR_HI => self.icr_hi,
            APIC_LVT_TIMER..=APIC_LVT_ERROR => self.lvt[((reg - APIC_LVT_TIMER) >> 4) as usize],
            APIC_TMICT => self.timer.initial,
            APIC_TMCCT => self.timer_current_count(now_ns),
            APIC_TDCR => self.tdcr,
            _ => return None,
        };
        Some(v)
    }

    /// Writes a 32-bit register. Returns `Err` for read-only or
    /// non-existent registers (the caller decides whether that is a #GP or
    /// an ignored MMIO write).
    fn write_reg(
        &mut self,
        reg: u32,
        val: u32,
        now_ns: u64,
    ) -> Result<Option<LapicEvent>, GpFault> {
        match reg {
            APIC_ID => {
                if self.x2apic_mode() {
                    return Err(GpFault);
                }
                // xAPIC IDs are software-writable (bits 24-31).
                self.apic_id = val >> 24;
            }
            APIC_TPR => self.tpr = val & 0xff,
            APIC_EOI => return Ok(self.eoi()),
            APIC_LDR => {
                if self.x2apic_mode() {
                    return Err(GpFault);
                }
                self.ldr = val & 0xff00_0000;
            }
            APIC_DFR => {
                if self.x2apic_mode() {
                    return Err(GpFault);
                }
                self.dfr = val | 0x0fff_ffff;
            }
            APIC_SVR => {
                // Vector, APIC enable, focus checking. EOI-broadcast
                // suppression (bit 12) is not advertised, so it is not kept.
                self.svr = val & 0x3ff;
                if self.svr & SVR_ENABLE == 0 {
                    for lvt in self.lvt.iter_mut() {
                        *lvt |= LVT_MASKED;
                    }
                }
            }
            APIC_ESR => {
                // A write latches the errors seen since the previous write.
                self.esr = std::mem::take(&mut self.esr_pending);
            }
            APIC_ICR_LO => {
                self.icr_lo = val & !(1 << 12);
                return Ok(self.send_ipi(self.icr_hi >> 24));
            }
            APIC_ICR_HI => {
                if self.x2apic_mode() {
                    return Err(GpFault);
                }
                self.icr_hi = val & 0xff00_0000;
            }
            APIC_LVT_TIMER..=APIC_LVT_ERROR => {
                let idx = ((reg - APIC_LVT_TIMER) >> 4) as usize;
                let mut v = val & LVT_WRITE_MASK[idx];
                if self.svr & SVR_ENABLE == 0 {
                    v |= LVT_MASKED;
                }
                if idx == LVT_IDX_TIMER {
                    let old_mode = self.timer_mode();
                    let new_mode = TimerMode::from_lvt(v);
                    if old_mode != new_mode
                        && old_mode != TimerMode::TscDeadline
                        && new_mode != TimerMode::TscDeadline
                    {
                        self.rebase_timer_for_mode_change(now_ns);
                    }
                    // Switching to or from TSC-deadline mode disarms the
                    // timer (SDM 11.5.4.1).
                    if (old_mode == TimerMode::TscDeadline) != (new_mode == TimerMode::TscDeadline)
                    {
                        self.timer.armed = false;
                        self.timer.initial = 0;
                        self.timer.tsc_deadline = 0;
                    }
                }
                self.lvt[idx] = v;
            }
            APIC_TMICT => {
                if self.timer_mode() != TimerMode::TscDeadline {
                    self.load_timer(val, now_ns);
                }
            }
            APIC_TDCR => {
                let old_div = self.timer_divisor();
                let cur = self.timer_current_count(now_ns);
                self.tdcr = val & 0xb;
                // A new divisor while counting: restart the countdown from the
                // current count at the new rate, so elapsed time is not
                // reinterpreted retroactively.
                if self.timer_divisor() != old_div && self.timer.armed {
                    // Keep the current count and continue at the new rate:
                    // restart the time base now, crediting the counts already
                    // done in this period. The reload value is unchanged. A
                    // one-shot that already reached 0 but was not ticked yet
                    // still fires (its expiry becomes `now`).
                    self.timer.base_counts = (self.timer.initial - cur) as u64;
                    self.timer.start_ns = now_ns;
                    self.timer.fired = 0;
                    if cur == 0 && self.timer_mode() == TimerMode::Periodic {
                        self.timer.base_counts = 0;
                    }
                }
            }
            APIC_SELF_IPI => {
                if !self.x2apic_mode() {
                    return Err(GpFault);
                }
                let vector = (val & 0xff) as u8;
                if vector < 16 {
                    self.raise_error(ESR_SEND_ILLEGAL_VECTOR);
                    return Ok(None);
                }
                return Ok(Some(LapicEvent::Ipi(IpiRequest {
                    source: self.apic_id,
                    vector,
                    delivery_mode: DeliveryMode::Fixed,
                    dest_mode: DestMode::Physical,
                    trigger: Trigger::Edge,
                    level: true,
                    shorthand: Shorthand::SelfOnly,
                    dest: 0,
                })));
            }
            _ => return Err(GpFault),
        }
        Ok(None)
    }

    fn eoi(&mut self) -> Option<LapicEvent> {
        let vector = highest_bit(&self.isr)?;
        clear_bit(&mut self.isr, vector);
        if test_bit(&self.tmr, vector) {
            clear_bit(&mut self.tmr, vector);
            Some(LapicEvent::EoiBroadcast(vector))
        } else {
            None
        }
    }

    fn send_ipi(&mut self, dest: u32) -> Option<LapicEvent> {
        let lo = self.icr_lo;
        let vector = (lo & 0xff) as u8;
        let delivery_mode = DeliveryMode::from_bits(lo >> 8);
        let dest_mode = if lo & (1 << 11) != 0 {
            DestMode::Logical
        } else {
            DestMode::Physical
        };
        let level = lo & (1 << 14) != 0;
        let trigger = if lo & (1 << 15) != 0 {
            Trigger::Level
        } else {
            Trigger::Edge
        };
        let shorthand = match (lo >> 18) & 3 {
            0 => Shorthand::None,
            1 => Shorthand::SelfOnly,
            2 => Shorthand::AllIncludingSelf,
            _ => Shorthand::AllExcludingSelf,
        };
        match delivery_mode {
            // INIT level de-assert only resynchronises arbitration IDs on
            // old parts; modern CPUs ignore it.
            DeliveryMode::Init if !level && trigger == Trigger::Level => return None,
            DeliveryMode::Fixed | DeliveryMode::LowestPriority if vector < 16 => {
                self.raise_error(ESR_SEND_ILLEGAL_VECTOR);
                return None;
            }
            DeliveryMode::Reserved => {
                self.raise_error(ESR_ILLEGAL_REGISTER);
                return None;
            }
            _ => {}
        }
        Some(LapicEvent::Ipi(IpiRequest {
            source: self.apic_id,
            vector,
            delivery_mode,
            dest_mode,
            trigger,
            level,
            shorthand,
            dest,
        }))
    }

    /// MMIO read of `data.len()` bytes at `offset` in the APIC page.
    /// Registers are 32 bits wide at 16-byte aligned offsets; other bytes and
    /// unknown registers read as zero.
    pub fn read(&self, offset: u64, data: &mut [u8], now_ns: u64) {
        data.fill(0);
        if offset >= LAPIC_MMIO_SIZE {
            return;
        }
        let reg = (offset & !0xf) as u32;
        let within = (offset & 0xf) as usize;
        if within >= 4 || self.x2apic_mode() {
            return;
        }
        let Some(v) = self.read_reg(reg, now_ns) else {
            return;
        };
        put_le(v as u64, within, data);
    }

    /// MMIO write. Only aligned 32-bit writes have an effect (as with KVM's
    /// in-kernel APIC); others are dropped. Returns what the platform must do
    /// (route an IPI, broadcast an EOI).
    pub fn write(&mut self, offset: u64, data: &[u8], now_ns: u64) -> Option<LapicEvent> {
        if offset >= LAPIC_MMIO_SIZE || offset & 0xf != 0 || data.len() != 4 || self.x2apic_mode() {
            return None;
        }
        let val = get_le(data) as u32;
        // Writes to read-only or reserved registers are ignored in xAPIC
        // mode (real hardware sets ESR bit 7 on some parts; Linux never does
        // this, so keep the model quiet).
        self.write_reg(offset as u32, val, now_ns)
            .unwrap_or_default()
    }

    /// x2APIC MSR read (0x800..=0x8ff). `Err` means #GP.
    pub fn read_msr(&self, msr: u32, now_ns: u64) -> Result<u64, GpFault> {
        if !self.x2apic_mode() || !(MSR_X2APIC_FIRST..=MSR_X2APIC_LAST).contains(&msr) {
            return Err(GpFault);
        }
        let reg = (msr - MSR_X2APIC_FIRST) << 4;
        match reg {
            APIC_ICR_LO => Ok(((self.icr_hi as u64) << 32) | self.icr_lo as u64),
            APIC_ICR_HI | APIC_EOI | APIC_SELF_IPI | APIC_DFR | APIC_APR | APIC_RRD => Err(GpFault),
            _ => self.read_reg(reg, now_ns).map(u64::from).ok_or(GpFault),
        }
    }

    /// x2APIC MSR write. `Err` means #GP.
    pub fn write_msr(
        &mut self,
        msr: u32,
        value: u64,
        now_ns: u64,
    ) -> Result<Option<LapicEvent>, GpFault> {
        if !self.x2apic_mode() || !(MSR_X2APIC_FIRST..=MSR_X2APIC_LAST).contains(&msr) {
            return Err(GpFault);
        }
        let reg = (msr - MSR_X2APIC_FIRST) << 4;
        match reg {
            APIC_ICR_LO => {
                self.icr_hi = (value >> 32) as u32;
                self.icr_lo = (value as u32) & !(1 << 12);
                Ok(self.send_ipi(self.icr_hi))
            }
            // x2APIC: EOI must be written with 0; the rest are read-only.
            APIC_EOI if value != 0 => Err(GpFault),
            APIC_ID | APIC_VERSION | APIC_PPR | APIC_LDR | APIC_TMCCT | APIC_ICR_HI | APIC_APR
            | APIC_RRD => Err(GpFault),
            0x100..=0x270 => Err(GpFault),
            APIC_ESR if value != 0 => Err(GpFault),
            _ => {
                if value >> 32 != 0 {
                    return Err(GpFault);
                }
                self.write_reg(reg, value as u32, now_ns)
            }
        }
    }

    /// IRR as a 256-bit bitmap (for debugging and tests).
    pub fn irr(&self) -> [u32; 8] {
        self.irr
    }

    /// ISR as a 256-bit bitmap.
    pub fn isr(&self) -> [u32; 8] {
        self.isr
    }

    /// TMR as a 256-bit bitmap.
    pub fn tmr(&self) -> [u32; 8] {
        self.tmr
    }
}

fn x2apic_ldr(id: u32) -> u32 {
    ((id >> 4) << 16) | (1 << (id & 0xf))
}

fn set_bit(bits: &mut [u32; 8], v: u8) {
    bits[(v >> 5) as usize] |= 1 << (v & 31);
}

fn clear_bit(bits: &mut [u32; 8], v: u8) {
    bits[(v >> 5) as usize] &= !(1 << (v & 31));
}

fn test_bit(bits: &[u32; 8], v: u8) -> bool {
    bits[(v >> 5) as usize] & (1 << (v & 31)) != 0
}

fn highest_bit(bits: &[u32; 8]) -> Option<u8> {
    for i in (0..8).rev() {
        if bits[i] != 0 {
            return Some((i as u32 * 32 + 31 - bits[i].leading_zeros()) as u8);
        }
    }
    None
}
