//! The PC's interrupt controllers and timers inside the engine, as KVM has
//! them in the kernel: the `emu-platform` models (LAPIC per vCPU, IOAPIC,
//! 8259 pair, 8254 PIT, port 0x61, kvmclock) behind a [`SharedPlatform`],
//! plus what only the engine can do with them:
//!
//! - serve port I/O, MMIO and MSR accesses to those devices without leaving
//!   the vCPU thread (every other access still exits to the VMM);
//! - poll for interrupts cheaply between blocks: only when this vCPU's
//!   "attention" flag is set (the platform kicked it, or it touched the
//!   platform itself), when a maskable interrupt waits for IF, or every
//!   [`POLL_INTERVAL_BLOCKS`] blocks so timer deadlines are noticed while
//!   the guest computes;
//! - sleep in HLT (IF=1) and in wait-for-SIPI until the next timer deadline
//!   or a wake-up ([`VcpuSignal`]: a mutex + condvar per vCPU that the
//!   platform's kick, IPIs, device interrupts and the VMM's kicker notify);
//! - INIT/SIPI for application processors, which start in wait-for-SIPI.
//!
//! # Time
//!
//! Guest time is the host's monotonic clock since the platform was made
//! ([`EngineClock`]), and the guest TSC is that time in nanoseconds plus the
//! vCPU's IA32_TSC offset: a constant 1 GHz TSC, the same on every vCPU. So
//! the engine advertises an invariant TSC, kvmclock's scale is exact
//! (mul 2^31, shift 1), a kvmclock structure written once stays correct
//! (it is rewritten only when the guest moves its TSC), and TSC-deadline
//! values convert to platform time without drift.

use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use emu_platform::lapic::{
    APIC_BASE_EXTD, MSR_IA32_APIC_BASE, MSR_IA32_TSC_DEADLINE, MSR_X2APIC_FIRST, MSR_X2APIC_LAST,
};
use emu_platform::pic::Pic;
use emu_platform::pit::Pit;
use emu_platform::pvclock::{
    system_time_msr_gpa, PvClock, PvClockWallClock, MSR_KVM_SYSTEM_TIME_NEW,
    MSR_KVM_WALL_CLOCK_NEW, VCPU_TIME_INFO_SIZE, WALL_CLOCK_SIZE,
};
use emu_platform::{
    Delivery, DeliveryMode, DestMode, GuestClock, Platform, PlatformConfig, SharedPlatform, Trigger,
};
use hypervisor::Segment;

use crate::core::{Core, RunExit};
use crate::cpu::{CpuState, CS, FLAG_IF};
use crate::irq::InterruptController;
use crate::msr::MsrFault;

/// The guest TSC rate (see the module notes on time).
pub const TSC_HZ: u64 = 1_000_000_000;

/// Blocks between two deadline checks while the guest runs. A block is a
/// handful of instructions, so this bounds timer latency to a few
/// microseconds while keeping the clock read off the per-block path.
pub const POLL_INTERVAL_BLOCKS: u32 = 64;

/// Whether CPUID advertises x2APIC. The platform implements it, but xAPIC
/// is what the engine's Linux boots have been checked with; with this off,
/// x2APIC MSRs and IA32_APIC_BASE.EXTD raise #GP like on a CPU without it.
pub const ADVERTISE_X2APIC: bool = false;

/// Upper bound of one sleep in HLT: a safety net, never needed for
/// correctness (every wake-up source notifies the vCPU's signal).
const MAX_SLEEP: Duration = Duration::from_millis(100);

/// CPUID 0x40000001 EAX bits (KVM paravirtual features).
pub const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;
pub const KVM_FEATURE_CLOCKSOURCE_STABLE_BIT: u32 = 1 << 24;

const IA32_TSC: u32 = 0x10;
const IOAPIC_BASE: u64 = 0xfec0_0000;

/// Guest time: the host's monotonic clock since the platform was made.
pub struct EngineClock {
    epoch: Instant,
}

impl EngineClock {
    pub fn new() -> Self {
        EngineClock {
            epoch: Instant::now(),
        }
    }
}

impl Default for EngineClock {
    fn default() -> Self {
        Self::new()
    }
}

impl GuestClock for EngineClock {
    fn now_ns(&self) -> u64 {
        // u64 nanoseconds last 584 years.
        self.epoch.elapsed().as_nanos() as u64
    }

    fn tsc(&self) -> u64 {
        // TSC_HZ is 1 GHz: one tick per nanosecond.
        self.now_ns()
    }
}

/// Wakes one vCPU thread: sets its attention flag (poll the platform at the
/// next block) and ends a sleep in HLT or wait-for-SIPI.
#[derive(Default)]
pub struct VcpuSignal {
    attention: AtomicBool,
    /// Set by `notify`, consumed by `wait`: a wake-up that arrives between
    /// the vCPU's last check and its sleep is not lost.
    woken: Mutex<bool>,
    cv: Condvar,
}

impl VcpuSignal {
    pub fn notify(&self) {
        self.attention.store(true, Ordering::Release);
        let mut w = self.woken.lock().unwrap_or_else(|e| e.into_inner());
        *w = true;
        self.cv.notify_all();
    }

    /// Sleep until notified or until guest time `deadline_ns`.
    fn wait(&self, clock: &EngineClock, deadline_ns: Option<u64>) {
        let mut w = self.woken.lock().unwrap_or_else(|e| e.into_inner());
        if *w {
            *w = false;
            return;
        }
        let timeout = match deadline_ns {
            Some(d) => {
                let now = clock.now_ns();
                if now >= d {
                    return;
                }
                Duration::from_nanos(d - now).min(MAX_SLEEP)
            }
            None => MAX_SLEEP,
        };
        let (mut w, _) = self
            .cv
            .wait_timeout(w, timeout)
            .unwrap_or_else(|e| e.into_inner());
        *w = false;
    }

    fn poke(&self) {
        self.attention.store(true, Ordering::Release);
    }

    #[inline]
    fn take_attention(&self) -> bool {
        self.attention.load(Ordering::Relaxed) && self.attention.swap(false, Ordering::AcqRel)
    }
}

/// The interrupt controllers and timers of one VM, with a wake-up signal per
/// vCPU.
pub struct Pc {
    shared: Arc<SharedPlatform>,
    clock: Arc<EngineClock>,
    signals: Vec<Arc<VcpuSignal>>,
    pvclock: PvClock,
}

impl Pc {
    /// A platform for `num_vcpus` vCPUs (clamped to 1..=255, the xAPIC
    /// limit), its clock starting now.
    pub fn new(num_vcpus: u32) -> Arc<Pc> {
        let n = (num_vcpus as usize).clamp(1, 255);
        let clock = Arc::new(EngineClock::new());
        let platform = Platform::new(PlatformConfig {
            num_vcpus: n,
            tsc_hz: TSC_HZ,
            ..PlatformConfig::default()
        });
        let shared = Arc::new(SharedPlatform::new(platform, clock.clone()));
        let signals: Vec<Arc<VcpuSignal>> = (0..n).map(|_| Arc::default()).collect();
        let wake = signals.clone();
        shared.set_kick(Arc::new(move |i: usize| {
            if let Some(s) = wake.get(i) {
                s.notify();
            }
        }));
        Arc::new(Pc {
            shared,
            clock,
            signals,
            // 1 GHz is exactly representable (mul 2^31, shift 1).
            pvclock: PvClock::new(TSC_HZ).unwrap_or(PvClock {
                tsc_hz: TSC_HZ,
                tsc_to_system_mul: 1 << 31,
                tsc_shift: 1,
            }),
        })
    }

    pub fn shared(&self) -> &Arc<SharedPlatform> {
        &self.shared
    }

    pub fn clock(&self) -> &Arc<EngineClock> {
        &self.clock
    }

    pub fn num_vcpus(&self) -> u32 {
        self.signals.len() as u32
    }

    pub fn signal(&self, vcpu: u32) -> Option<&Arc<VcpuSignal>> {
        self.signals.get(vcpu as usize)
    }

    /// Guest nanoseconds now.
    pub fn now_ns(&self) -> u64 {
        self.clock.now_ns()
    }
}

/// The MSI message a PCI device sends (address 0xfeeXXXXX, data word) as the
/// interrupt message the local APICs accept; `None` for an address outside
/// the interrupt window (the write would go to memory, not to an APIC).
pub fn msi_delivery(addr: u64, data: u32) -> Option<Delivery> {
    if addr & 0xfff0_0000 != 0xfee0_0000 {
        return None;
    }
    Some(Delivery {
        dest: ((addr >> 12) & 0xff) as u32,
        dest_mode: if addr & (1 << 2) != 0 {
            DestMode::Logical
        } else {
            DestMode::Physical
        },
        vector: data as u8,
        delivery_mode: DeliveryMode::from_bits(data >> 8),
        trigger: if data & (1 << 15) != 0 {
            Trigger::Level
        } else {
            Trigger::Edge
        },
    })
}

/// The platform as the engine's interrupt controller: one forward per
/// method, with pick-and-acknowledge under one lock.
impl InterruptController for SharedPlatform {
    fn trigger_gsi(&self, gsi: u32) {
        SharedPlatform::trigger_gsi(self, gsi);
    }

    fn pending_vector(&self, vcpu: u32) -> Option<u8> {
        SharedPlatform::pending_vector(self, vcpu)
    }

    fn ack(&self, vcpu: u32, vector: u8) {
        // The vector actually delivered may differ (PIC spurious IRQ);
        // callers that deliver use `take_pending`, which returns it.
        let _ = SharedPlatform::ack(self, vcpu, vector);
    }

    fn take_pending(&self, vcpu: u32) -> Option<u8> {
        self.ack_pending(vcpu)
    }

    fn take_nmi(&self, vcpu: u32) -> bool {
        SharedPlatform::take_nmi(self, vcpu)
    }

    fn has_pending(&self, vcpu: u32) -> bool {
        SharedPlatform::has_pending(self, vcpu)
    }

    fn set_tpr(&self, vcpu: u32, cr8: u8) {
        SharedPlatform::set_tpr(self, vcpu, cr8);
    }

    fn signal_msi(&self, addr: u64, data: u32) {
        match msi_delivery(addr, data) {
            Some(d) => self.with(|p, _| p.route_delivery(d)),
            None => tracing::debug!("MSI to {addr:#x} (data {data:#x}) is not an APIC message"),
        }
    }
}

/// What the vCPUs see: the platform, plus a wake-up of the vCPU whose own
/// CR8 write may have unmasked an interrupt.
impl InterruptController for Pc {
    fn trigger_gsi(&self, gsi: u32) {
        self.shared.trigger_gsi(gsi);
    }

    fn pending_vector(&self, vcpu: u32) -> Option<u8> {
        self.shared.pending_vector(vcpu)
    }

    fn ack(&self, vcpu: u32, vector: u8) {
        InterruptController::ack(&*self.shared, vcpu, vector);
    }

    fn take_pending(&self, vcpu: u32) -> Option<u8> {
        self.shared.ack_pending(vcpu)
    }

    fn take_nmi(&self, vcpu: u32) -> bool {
        self.shared.take_nmi(vcpu)
    }

    fn has_pending(&self, vcpu: u32) -> bool {
        self.shared.has_pending(vcpu)
    }

    fn set_tpr(&self, vcpu: u32, cr8: u8) {
        self.shared.set_tpr(vcpu, cr8);
        if let Some(s) = self.signal(vcpu) {
            s.poke();
        }
    }

    fn signal_msi(&self, addr: u64, data: u32) {
        InterruptController::signal_msi(&*self.shared, addr, data);
    }
}

/// The VM's platform slot. The vCPU count, and so the number of local
/// APICs, is known only when the first vCPU is made, but devices ask for
/// their interrupt lines before that: they get this slot, which forwards to
/// the platform once it exists (an edge raised earlier reaches no CPU and
/// is dropped).
#[derive(Default)]
pub struct PcBoard {
    pc: OnceLock<Arc<Pc>>,
}

impl PcBoard {
    pub fn new() -> Self {
        Self::default()
    }

    /// The platform, made for `num_vcpus` if it does not exist yet.
    pub fn get_or_create(&self, num_vcpus: u32) -> Arc<Pc> {
        self.pc.get_or_init(|| Pc::new(num_vcpus)).clone()
    }

    pub fn get(&self) -> Option<&Arc<Pc>> {
        self.pc.get()
    }
}

impl InterruptController for PcBoard {
    fn trigger_gsi(&self, gsi: u32) {
        match self.get() {
            Some(pc) => pc.trigger_gsi(gsi),
            None => tracing::debug!("GSI {gsi} raised before any vCPU exists; dropped"),
        }
    }

    fn pending_vector(&self, vcpu: u32) -> Option<u8> {
        self.get()?.pending_vector(vcpu)
    }

    fn ack(&self, vcpu: u32, vector: u8) {
        if let Some(pc) = self.get() {
            pc.ack(vcpu, vector);
        }
    }

    fn take_pending(&self, vcpu: u32) -> Option<u8> {
        self.get()?.take_pending(vcpu)
    }

    fn take_nmi(&self, vcpu: u32) -> bool {
        self.get().is_some_and(|pc| pc.take_nmi(vcpu))
    }

    fn has_pending(&self, vcpu: u32) -> bool {
        self.get().is_some_and(|pc| pc.has_pending(vcpu))
    }

    fn set_tpr(&self, vcpu: u32, cr8: u8) {
        if let Some(pc) = self.get() {
            pc.set_tpr(vcpu, cr8);
        }
    }

    fn signal_msi(&self, addr: u64, data: u32) {
        if let Some(pc) = self.get() {
            pc.signal_msi(addr, data);
        }
    }
}

/// One vCPU's link to the platform and its engine-side state.
pub struct PcVcpu {
    pub pc: Arc<Pc>,
    pub signal: Arc<VcpuSignal>,
    /// An application processor before its start-up IPI: it does not run.
    pub wait_sipi: bool,
    /// Blocks until the next deadline check.
    countdown: u32,
    /// A maskable interrupt was pending while IF=0: poll as soon as IF=1.
    irq_maybe: bool,
    /// MSR_KVM_SYSTEM_TIME_NEW as last written (0 = kvmclock off).
    pub system_time_msr: u64,
    /// MSR_KVM_WALL_CLOCK_NEW as last written.
    pub wall_clock_msr: u64,
    /// Times this vCPU slept in HLT or wait-for-SIPI (statistics; a vCPU
    /// that spun instead of sleeping would count thousands per millisecond).
    pub sleeps: u64,
}

impl PcVcpu {
    /// The link for vCPU `index`; `None` if the platform has no APIC for it.
    /// Application processors start in wait-for-SIPI.
    pub fn new(pc: Arc<Pc>, index: u32) -> Option<PcVcpu> {
        let signal = pc.signal(index)?.clone();
        Some(PcVcpu {
            pc,
            signal,
            wait_sipi: index != 0,
            countdown: POLL_INTERVAL_BLOCKS,
            irq_maybe: false,
            system_time_msr: 0,
            wall_clock_msr: 0,
            sleeps: 0,
        })
    }
}

// ------------------------------------------------------------------ run loop

/// Called by the run loop before each block in platform mode: takes
/// INIT/SIPI/NMI/interrupts when due, and sleeps while halted or waiting for
/// SIPI. `None` = run the next block.
pub(crate) fn before_block(core: &mut Core) -> Option<RunExit> {
    loop {
        if !core.int_shadow && poll_due(core) {
            if let Some(exit) = poll(core) {
                return Some(exit);
            }
        }
        let waiting = core.pc.as_ref()?.wait_sipi;
        if !core.halted && !waiting {
            return None;
        }
        if let Some(exit) = idle(core) {
            return Some(exit);
        }
        // Woken with something to take: `idle` set the attention flag, so
        // the next round polls.
    }
}

#[inline]
fn poll_due(core: &mut Core) -> bool {
    let if_set = core.st.rflags & FLAG_IF != 0;
    let Some(p) = core.pc.as_mut() else {
        return false;
    };
    let mut due = p.signal.take_attention();
    p.countdown -= 1;
    if p.countdown == 0 {
        p.countdown = POLL_INTERVAL_BLOCKS;
        due = true;
    }
    due || (p.irq_maybe && if_set)
}

enum Event {
    None,
    Init,
    Sipi(u8),
    Nmi,
    Irq(u8),
}

/// Take the most urgent thing the platform has for this vCPU.
fn poll(core: &mut Core) -> Option<RunExit> {
    let idx = core.index;
    let if_set = core.st.rflags & FLAG_IF != 0;
    let nmi_ok = !core.nmi_blocked;
    let p = core.pc.as_mut()?;
    let shared = p.pc.shared.clone();
    // Lock-free unless something is hinted for this vCPU or a timer is due
    // (then it advances the timers).
    if !shared.has_pending(idx) {
        p.irq_maybe = false;
        return None;
    }
    let wait_sipi = p.wait_sipi;
    let (ev, irq_left) = shared.with(|pl, _| {
        let i = idx as usize;
        let ev = if pl.take_init(i) {
            Event::Init
        } else if wait_sipi {
            pl.take_startup(i).map_or(Event::None, Event::Sipi)
        } else if nmi_ok && pl.take_nmi(i) {
            Event::Nmi
        } else if if_set {
            match pl.pending_vector(i) {
                Some(v) => pl.ack(i, v).map_or(Event::None, Event::Irq),
                None => Event::None,
            }
        } else {
            Event::None
        };
        (ev, pl.pending_vector(i).is_some())
    });
    p.irq_maybe = irq_left;
    if !matches!(ev, Event::None) {
        // More may be queued behind it (a SIPI after INIT, an interrupt
        // after an NMI): look again at the next block.
        p.signal.poke();
    }
    match ev {
        Event::None => None,
        Event::Init => {
            init_cpu(core);
            None
        }
        Event::Sipi(v) => {
            start_cpu(core, v);
            None
        }
        Event::Nmi => {
            core.halted = false;
            core.nmi_blocked = true;
            core.deliver_and_check(2, None, crate::exception::Kind::External)
        }
        Event::Irq(v) => {
            core.halted = false;
            core.deliver_and_check(v, None, crate::exception::Kind::External)
        }
    }
}

/// Sleep while halted (IF=1) or waiting for SIPI, until something can wake
/// the CPU, the next timer deadline (to advance the timers), or a kick.
fn idle(core: &mut Core) -> Option<RunExit> {
    // A halted CPU has no interrupt shadow left.
    core.int_shadow = false;
    loop {
        if core.kick.load(Ordering::Relaxed) && core.kick.swap(false, Ordering::AcqRel) {
            return Some(RunExit::Interrupted);
        }
        let idx = core.index;
        let if_set = core.st.rflags & FLAG_IF != 0;
        let nmi_ok = !core.nmi_blocked;
        let p = core.pc.as_mut()?;
        let wait_sipi = p.wait_sipi;
        // One locked look: timers advanced to now, the wake-up reasons, and
        // when to look again. The PIT counts for every vCPU because its
        // interrupt may be routed to any of them and somebody must advance
        // it when all are asleep.
        let (wake, deadline) = p.pc.shared.with(|pl, _| {
            let i = idx as usize;
            let Some(l) = pl.lapic(i) else {
                return (false, None);
            };
            let wake = if wait_sipi {
                l.init_pending() || l.startup_pending()
            } else {
                l.init_pending()
                    || (nmi_ok && l.nmi_pending())
                    || (if_set && pl.pending_vector(i).is_some())
            };
            let deadline = match (pl.next_lapic_deadline_ns(i), pl.pit().next_event_ns()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            (wake, deadline)
        });
        if wake {
            p.signal.poke();
            return None;
        }
        if !wait_sipi && !if_set {
            // HLT with interrupts off: only an NMI, INIT or SIPI could wake
            // it; the VMM waits and runs the vCPU again, which looks again.
            return Some(RunExit::Halt);
        }
        p.sleeps += 1;
        p.signal.wait(&p.pc.clock, deadline);
    }
}

/// INIT: the CPU's power-on register state; MSRs (and so the TSC offset)
/// survive as on hardware. An AP then waits for SIPI; the BSP runs from the
/// reset vector.
fn init_cpu(core: &mut Core) {
    let msr = std::mem::take(&mut core.st.msr);
    core.st = CpuState::reset();
    core.st.msr = msr;
    core.flush_all_caches();
    core.halted = false;
    core.int_shadow = false;
    core.nmi_blocked = false;
    core.delivering = None;
    core.io = Default::default();
    let index = core.index;
    if let Some(p) = core.pc.as_mut() {
        // KVM turns kvmclock off on a vCPU reset too.
        p.system_time_msr = 0;
        p.irq_maybe = false;
        p.wait_sipi = index != 0;
    }
}

/// Start-up IPI: real mode at CS = vector << 8, IP = 0.
fn start_cpu(core: &mut Core, vector: u8) {
    core.st.seg[CS] = Segment::real_mode((vector as u16) << 8, true);
    core.st.rip = 0;
    core.halted = false;
    core.end_block = true;
    if let Some(p) = core.pc.as_mut() {
        p.wait_sipi = false;
    }
}

// ------------------------------------------------------------ device access

/// Port read served by the platform (PIC, ELCR, PIT, port 0x61); `None` for
/// ports the VMM serves.
pub(crate) fn pio_in(core: &mut Core, port: u16, size: u8) -> Option<u64> {
    let p = core.pc.as_ref()?;
    if !(Pic::handles_port(port) || Pit::handles_port(port)) {
        return None;
    }
    let mut buf = [0u8; 8];
    let n = (size as usize).min(8);
    if !p.pc.shared.pio_read(port, &mut buf[..n]) {
        return None;
    }
    // Reading the PIC can acknowledge (poll mode): look again.
    p.signal.poke();
    Some(u64::from_le_bytes(buf))
}

/// Port write served by the platform; false for ports the VMM serves.
pub(crate) fn pio_out(core: &mut Core, port: u16, size: u8, data: u64) -> bool {
    let Some(p) = core.pc.as_ref() else {
        return false;
    };
    if !(Pic::handles_port(port) || Pit::handles_port(port)) {
        return false;
    }
    let bytes = data.to_le_bytes();
    let n = (size as usize).min(8);
    if !p.pc.shared.pio_write(port, &bytes[..n]) {
        return false;
    }
    // An EOI or an unmask may have made an interrupt deliverable.
    p.signal.poke();
    true
}

/// Whether `addr` may belong to this vCPU's LAPIC page or the IOAPIC: a
/// cheap filter before taking the platform lock.
#[inline]
fn platform_mmio(core: &Core, addr: u64) -> bool {
    let page = addr & !0xfff;
    page == IOAPIC_BASE || page == core.st.msr.apic_base & 0x000f_ffff_ffff_f000
}

/// MMIO read served by the platform; `None` to exit to the VMM.
pub(crate) fn mmio_read(core: &mut Core, addr: u64, size: u8) -> Option<u64> {
    if !platform_mmio(core, addr) {
        return None;
    }
    let p = core.pc.as_ref()?;
    let mut buf = [0u8; 8];
    let n = (size as usize).min(8);
    if !p.pc.shared.mmio_read(core.index, addr, &mut buf[..n]) {
        return None;
    }
    Some(u64::from_le_bytes(buf))
}

/// MMIO write served by the platform; false to exit to the VMM.
pub(crate) fn mmio_write(core: &mut Core, addr: u64, size: u8, data: u64) -> bool {
    if !platform_mmio(core, addr) {
        return false;
    }
    let Some(p) = core.pc.as_ref() else {
        return false;
    };
    let bytes = data.to_le_bytes();
    let n = (size as usize).min(8);
    if !p.pc.shared.mmio_write(core.index, addr, &bytes[..n]) {
        return false;
    }
    // EOI, TPR, or an IPI to self.
    p.signal.poke();
    true
}

// --------------------------------------------------------------------- MSRs

/// The guest TSC of this vCPU in platform mode.
pub(crate) fn guest_tsc(core: &Core) -> Option<u64> {
    let p = core.pc.as_ref()?;
    Some(p.pc.clock.tsc().wrapping_add(core.st.msr.tsc_offset))
}

/// RDMSR of the MSRs the platform owns: `None` = not one of them (the
/// engine's own MSR code decides), `Some(None)` = #GP.
pub(crate) fn rdmsr(core: &Core, idx: u32) -> Option<Option<u64>> {
    let p = core.pc.as_ref()?;
    let shared = &p.pc.shared;
    match idx {
        IA32_TSC => guest_tsc(core).map(Some),
        MSR_IA32_APIC_BASE | MSR_IA32_TSC_DEADLINE => {
            Some(shared.rdmsr(core.index, idx).and_then(|r| r.ok()))
        }
        MSR_X2APIC_FIRST..=MSR_X2APIC_LAST if ADVERTISE_X2APIC => {
            Some(shared.rdmsr(core.index, idx).and_then(|r| r.ok()))
        }
        MSR_KVM_SYSTEM_TIME_NEW => Some(Some(p.system_time_msr)),
        MSR_KVM_WALL_CLOCK_NEW => Some(Some(p.wall_clock_msr)),
        _ => None,
    }
}

/// WRMSR of the MSRs the platform owns: `None` = not one of them.
pub(crate) fn wrmsr(core: &mut Core, idx: u32, v: u64) -> Option<Result<(), MsrFault>> {
    let p = core.pc.as_ref()?;
    let shared = p.pc.shared.clone();
    let clock = p.pc.clock.clone();
    let signal = p.signal.clone();
    let i = core.index;
    let r = match idx {
        IA32_TSC => {
            core.st.msr.tsc_offset = v.wrapping_sub(clock.tsc());
            // kvmclock pairs TSC values with times: republish.
            publish_kvmclock(core);
            Ok(())
        }
        MSR_IA32_APIC_BASE => {
            if !ADVERTISE_X2APIC && v & APIC_BASE_EXTD != 0 {
                return Some(Err(MsrFault));
            }
            match shared.wrmsr(i, idx, v) {
                Some(Ok(())) => {
                    // The engine's copy decides which page is the LAPIC's
                    // (and what get_sregs reports).
                    if let Some(Ok(base)) = shared.rdmsr(i, idx) {
                        core.st.msr.apic_base = base;
                    }
                    Ok(())
                }
                _ => Err(MsrFault),
            }
        }
        MSR_IA32_TSC_DEADLINE => {
            // The deadline is in this vCPU's TSC, which includes its offset.
            let offset = core.st.msr.tsc_offset;
            match shared.with(|pl, now| pl.wrmsr(i as usize, idx, v, now, now.wrapping_add(offset)))
            {
                Some(Ok(())) => Ok(()),
                _ => Err(MsrFault),
            }
        }
        MSR_X2APIC_FIRST..=MSR_X2APIC_LAST if ADVERTISE_X2APIC => match shared.wrmsr(i, idx, v) {
            Some(Ok(())) => Ok(()),
            _ => Err(MsrFault),
        },
        MSR_KVM_SYSTEM_TIME_NEW => {
            if let Some(p) = core.pc.as_mut() {
                p.system_time_msr = v;
            }
            publish_kvmclock(core);
            Ok(())
        }
        MSR_KVM_WALL_CLOCK_NEW => {
            if let Some(p) = core.pc.as_mut() {
                p.wall_clock_msr = v;
            }
            publish_wall_clock(core, v);
            Ok(())
        }
        _ => return None,
    };
    // A new deadline in the past, or a LAPIC write through x2APIC: look.
    signal.poke();
    Some(r)
}

/// The VMM loaded IA32_APIC_BASE through the special registers.
pub(crate) fn set_apic_base(core: &mut Core, v: u64) {
    let Some(p) = core.pc.as_ref() else {
        return;
    };
    let shared = p.pc.shared.clone();
    let i = core.index;
    if shared.rdmsr(i, MSR_IA32_APIC_BASE) == Some(Ok(v)) {
        return;
    }
    if let Some(Ok(())) = shared.wrmsr(i, MSR_IA32_APIC_BASE, v) {
        if let Some(Ok(base)) = shared.rdmsr(i, MSR_IA32_APIC_BASE) {
            core.st.msr.apic_base = base;
        }
    }
}

/// Write this vCPU's `pvclock_vcpu_time_info` where MSR_KVM_SYSTEM_TIME_NEW
/// points, if enabled and in RAM (KVM ignores other addresses too).
fn publish_kvmclock(core: &mut Core) {
    let Some(p) = core.pc.as_ref() else {
        return;
    };
    let Some(gpa) = system_time_msr_gpa(p.system_time_msr) else {
        return;
    };
    if core.mem.ram_ptr(gpa, VCPU_TIME_INFO_SIZE as u64).is_none() {
        tracing::debug!("kvmclock structure at {gpa:#x} is not in RAM");
        return;
    }
    let now = p.pc.clock.now_ns();
    let tsc = now.wrapping_add(core.st.msr.tsc_offset);
    let info = p.pc.pvclock.time_info(0, tsc, now);
    let old = core.mem.read_phys(gpa, 4).unwrap_or(0) as u32;
    let (odd, full) = info.to_bytes_for_update(old);
    // Odd version, then the body, then the even version: a reader on
    // another vCPU retries instead of mixing old and new fields.
    core.mem.write_phys(gpa, 4, u32::from_le_bytes(odd) as u64);
    fence(Ordering::SeqCst);
    core.mem.write_phys(gpa + 4, 4, le(&full[4..8]));
    for off in (8..VCPU_TIME_INFO_SIZE).step_by(8) {
        core.mem
            .write_phys(gpa + off as u64, 8, le(&full[off..off + 8]));
    }
    fence(Ordering::SeqCst);
    core.mem.write_phys(gpa, 4, le(&full[0..4]));
}

/// Write the `pvclock_wall_clock` (the host's wall-clock time at which
/// kvmclock read zero) at `gpa`.
fn publish_wall_clock(core: &mut Core, gpa: u64) {
    let Some(p) = core.pc.as_ref() else {
        return;
    };
    if core.mem.ram_ptr(gpa, WALL_CLOCK_SIZE as u64).is_none() {
        tracing::debug!("kvmclock wall clock at {gpa:#x} is not in RAM");
        return;
    }
    let unix_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let old = core.mem.read_phys(gpa, 4).unwrap_or(0) as u32;
    let odd = (old | 1).wrapping_add(if old & 1 == 0 { 0 } else { 2 });
    let wc = PvClockWallClock::new(odd.wrapping_add(1), unix_ns, p.pc.clock.now_ns());
    let b = wc.to_bytes();
    core.mem.write_phys(gpa, 4, odd as u64);
    fence(Ordering::SeqCst);
    core.mem.write_phys(gpa + 4, 8, le(&b[4..12]));
    fence(Ordering::SeqCst);
    core.mem.write_phys(gpa, 4, le(&b[0..4]));
}

fn le(b: &[u8]) -> u64 {
    b.iter()
        .enumerate()
        .fold(0u64, |v, (i, &x)| v | (x as u64) << (8 * i))
}

// -------------------------------------------------------------------- CPUID

/// CPUID with what the platform adds: APIC, TSC-deadline, the KVM leaves
/// with kvmclock, an invariant TSC. Without a platform, the bare engine's.
pub fn cpuid(core: &Core, leaf: u32, sub: u32) -> [u32; 4] {
    let mut r = crate::cpuid::cpuid(core.index, leaf, sub);
    if core.pc.is_none() {
        return r;
    }
    match leaf {
        1 => {
            r[3] |= 1 << 9; // APIC
            r[2] |= 1 << 24; // TSC-deadline
            if ADVERTISE_X2APIC {
                r[2] |= 1 << 21;
            }
        }
        0x4000_0000 => {
            let s = b"KVMKVMKVM\0\0\0";
            let w = |i: usize| u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
            r = [0x4000_0001, w(0), w(4), w(8)];
        }
        0x4000_0001 => {
            r = [
                KVM_FEATURE_CLOCKSOURCE2 | KVM_FEATURE_CLOCKSOURCE_STABLE_BIT,
                0,
                0,
                0,
            ];
        }
        // AMD mirrors the APIC bit in the extended leaf.
        0x8000_0001 => r[3] |= 1 << 9,
        // Invariant TSC: the guest TSC is the host's monotonic clock.
        0x8000_0007 => r[3] |= 1 << 8,
        _ => {}
    }
    r
}
