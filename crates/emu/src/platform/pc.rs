//! The PC's interrupt controllers and timers inside the engine, as KVM has
//! them in the kernel: the `emu-platform` models (LAPIC per vCPU, IOAPIC,
//! 8259 pair, 8254 PIT, port 0x61, kvmclock) behind a [`SharedPlatform`],
//! plus what only the engine can do with them:
//!
//! - serve port I/O and MMIO to those devices without leaving the vCPU
//!   thread (every other access still exits to the VMM); their MSRs and
//!   kvmclock come through the [`InterruptController`] hooks;
//! - take INIT/SIPI/NMI/interrupts in one platform look when the core
//!   polls (its attention flag, which the platform's kicks set, or STI/
//!   IRET/EOI);
//! - notice timer deadlines while the guest computes without the vCPUs
//!   reading the clock: one timer thread per VM ([`TimerThread`]) sleeps
//!   until the platform's published deadline (re-armed through the
//!   platform's deadline hook when a deadline moves earlier), then ticks
//!   the platform, whose kicks set the attention flag of each vCPU that
//!   got an interrupt. So every event for a vCPU sets its attention flag,
//!   and chained translated code tests that one flag (QEMU's timers kick
//!   the vCPU the same way);
//! - sleep in HLT (IF=1) and in wait-for-SIPI until the next timer deadline
//!   or a wake-up ([`VcpuSignal`]: a mutex + condvar per vCPU that the
//!   platform's kicks, IPIs, device interrupts and the VMM's kicker notify);
//! - paravirtual spinlocks (KVM's `PV_UNHALT`): another vCPU's
//!   `KVM_HC_KICK_CPU` sets the target's `pv_unhalt` flag in its
//!   [`VcpuSignal`] and notifies it; a HLT of that vCPU, also one with
//!   IF=0, completes while the flag is set and clears it. The flag stays
//!   set until a HLT takes it (or an interrupt ends the HLT), so a kick
//!   that comes before the waiter halts is not lost. With the feature
//!   offered a HLT with IF=0 sleeps here too (a kick can end it) for up to
//!   `PV_HALT_SLICE`, then goes to the VMM as it always did (which sleeps
//!   1 ms and runs the vCPU again: a kick then waits that long at most);
//! - application processors start in wait-for-SIPI.
//!
//! # Time
//!
//! Guest time is the host's monotonic clock since the platform was made
//! ([`EngineClock`]), and the guest TSC is that time in nanoseconds (plus
//! the vCPU's IA32_TSC offset): a constant 1 GHz TSC, the same on every
//! vCPU. So the engine advertises an invariant TSC, kvmclock's scale is
//! exact (mul 2^31, shift 1) and a kvmclock structure written once stays
//! correct, and TSC-deadline values convert to platform time without drift.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use emu_platform::lapic::{
    APIC_BASE_EXTD, DEFAULT_BUS_HZ, MSR_IA32_APIC_BASE, MSR_X2APIC_FIRST, MSR_X2APIC_LAST,
};
use emu_platform::pic::Pic;
use emu_platform::pit::Pit;
use emu_platform::pvclock::{PvClock, PvClockWallClock};
use emu_platform::{
    Delivery, DeliveryMode, DestMode, GuestClock, Platform, PlatformConfig, SharedPlatform, Trigger,
};

use crate::cpuid::CpuidConfig;
use crate::platform::irq::{InterruptController, MsrFault};
use crate::platform::notify::NotifyTable;
use crate::platform::{CpuView, Event, Idle, VcpuPlatform};

/// The guest TSC rate (see the module notes on time).
pub const TSC_HZ: u64 = 1_000_000_000;

/// Whether CPUID advertises x2APIC. The platform implements it, but xAPIC
/// is what the engine's Linux boots have been checked with; with this off,
/// x2APIC MSRs and IA32_APIC_BASE.EXTD raise #GP like on a CPU without it.
pub const ADVERTISE_X2APIC: bool = false;

/// How long a HLT with IF=0 sleeps in the engine for a paravirtual kick
/// before it goes to the VMM (which keeps a vCPU that halted for good, a
/// `cli; hlt`, from looking busy to the engine; a lock holder's host
/// thread rarely waits this long for a CPU).
const PV_HALT_SLICE: Duration = Duration::from_millis(10);

/// Upper bound of one sleep in HLT: a safety net, never needed for
/// correctness (every wake-up source notifies the vCPU's signal).
const MAX_SLEEP: Duration = Duration::from_millis(100);

const IOAPIC_BASE: u64 = 0xfec0_0000;

/// How long the timer thread waits before ticking again when a tick left
/// the deadline where it was, in the past (a model that cannot advance
/// yet): it must not spin, nor stop ticking.
const TIMER_RETRY: Duration = Duration::from_millis(1);

/// The VM's timer source (see the module notes): a thread that ticks the
/// platform at its published deadlines. It holds the platform weakly and
/// ends when the platform is gone or [`Pc`] is dropped.
pub struct TimerThread {
    thread: std::thread::Thread,
    stop: Arc<AtomicBool>,
}

impl TimerThread {
    fn spawn(shared: &Arc<SharedPlatform>, clock: &Arc<EngineClock>) -> Option<TimerThread> {
        let stop = Arc::new(AtomicBool::new(false));
        let (weak, clock, flag) = (Arc::downgrade(shared), clock.clone(), stop.clone());
        let handle = threads::spawn(threads::Role::Helper("emu-timer".into()), move || {
            timer_loop(weak, clock, flag)
        })
        .ok()?;
        let thread = handle.thread().clone();
        let t = thread.clone();
        // Called under the platform lock: unpark neither blocks nor locks.
        shared.set_deadline_hook(Arc::new(move || t.unpark()));
        Some(TimerThread { thread, stop })
    }

    /// Look at the deadline again now (the clock or the state was replaced).
    fn rearm(&self) {
        self.thread.unpark();
    }
}

impl Drop for TimerThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.unpark();
    }
}

/// The timer thread's body. An unpark that comes before the park is not
/// lost (the park returns at once), so a deadline published between the
/// read and the sleep is seen.
fn timer_loop(
    shared: std::sync::Weak<SharedPlatform>,
    clock: Arc<EngineClock>,
    stop: Arc<AtomicBool>,
) {
    let mut ticked_at = None;
    while !stop.load(Ordering::SeqCst) {
        let Some(s) = shared.upgrade() else {
            return;
        };
        let now = clock.now_ns();
        let wait = match s.next_deadline_ns() {
            Some(d) if d <= now => {
                // Advances the timers and kicks every vCPU they interrupt.
                s.tick();
                // A deadline the last tick did not move is ticked again,
                // but only every TIMER_RETRY.
                let stuck = ticked_at == Some(d);
                ticked_at = Some(d);
                if stuck {
                    TIMER_RETRY
                } else {
                    Duration::ZERO
                }
            }
            Some(d) => Duration::from_nanos(d - now).min(MAX_SLEEP),
            None => MAX_SLEEP,
        };
        drop(s);
        if !wait.is_zero() {
            std::thread::park_timeout(wait);
        }
    }
}

/// What CPUID advertises on a PC-mode vCPU: the LAPIC with TSC-deadline,
/// kvmclock with the TSC and APIC bus rates, and (through the fixed TSC
/// rate) an invariant TSC.
pub fn cpuid_config() -> CpuidConfig {
    CpuidConfig {
        apic: true,
        tsc_deadline: true,
        x2apic: ADVERTISE_X2APIC,
        kvm_clock: true,
        tsc_khz: (TSC_HZ / 1000) as u32,
        apic_bus_khz: (DEFAULT_BUS_HZ / 1000) as u32,
        hidden: Default::default(),
    }
}

/// Guest time: the host's monotonic clock since the platform was made,
/// plus an offset that a restored VM sets so its time resumes where the
/// snapshot left it.
pub struct EngineClock {
    epoch: Instant,
    offset: AtomicU64,
}

impl EngineClock {
    pub fn new() -> Self {
        EngineClock {
            epoch: Instant::now(),
            offset: AtomicU64::new(0),
        }
    }

    /// From now on the clock reads `guest_ns` plus the host time elapsed
    /// since this call (restoring a snapshot taken at `guest_ns`).
    pub fn resume_at(&self, guest_ns: u64) {
        let elapsed = self.epoch.elapsed().as_nanos() as u64;
        self.offset
            .store(guest_ns.wrapping_sub(elapsed), Ordering::SeqCst);
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
        (self.epoch.elapsed().as_nanos() as u64).wrapping_add(self.offset.load(Ordering::Relaxed))
    }

    fn tsc(&self) -> u64 {
        // TSC_HZ is 1 GHz: one tick per nanosecond.
        self.now_ns()
    }
}

/// Wakes one vCPU thread: sets its attention flag (the core's, so it polls
/// the platform before its next block) and ends a sleep in HLT or
/// wait-for-SIPI.
#[derive(Default)]
pub struct VcpuSignal {
    attention: Arc<AtomicBool>,
    /// The vCPU is in (or about to enter) [`VcpuPlatform::idle`]: only then
    /// does `notify` need the lock and the condvar. A running vCPU sees the
    /// attention flag at its next block boundary, so an interrupt for it
    /// costs two atomic operations and no system call.
    ///
    /// Lost wake-ups are excluded Dekker-style: the vCPU sets this, then
    /// (after a SeqCst fence) looks at its kick flag and the platform; a
    /// notifier publishes its event (attention, kick flag or platform
    /// state), then (after a SeqCst fence) reads this. One of the two sees
    /// the other's store.
    idle: AtomicBool,
    /// Set by `notify`, consumed by `wait`: a wake-up that arrives between
    /// the vCPU's last check and its sleep is not lost.
    woken: Mutex<bool>,
    cv: Condvar,
    /// A paravirtual kick (`KVM_HC_KICK_CPU`) waits for this vCPU's next
    /// HLT (KVM's `pv_unhalted`): set by [`VcpuSignal::pv_kick`] before
    /// its `notify`, so the Dekker argument above covers it; cleared by
    /// the HLT it ends, or when an interrupt ends the HLT first.
    pv_unhalt: AtomicBool,
}

impl VcpuSignal {
    /// `KVM_HC_KICK_CPU` for this vCPU: mark it unhalted and wake it.
    pub fn pv_kick(&self) {
        self.pv_unhalt.store(true, Ordering::SeqCst);
        self.notify();
    }

    /// The pending paravirtual kick (vCPU state: snapshots carry it).
    pub fn pv_unhalt(&self) -> &AtomicBool {
        &self.pv_unhalt
    }

    pub fn notify(&self) {
        self.attention.store(true, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
        if !self.idle.load(Ordering::SeqCst) {
            return;
        }
        let mut w = self.woken.lock().unwrap_or_else(|e| e.into_inner());
        *w = true;
        self.cv.notify_all();
    }

    /// The flag the core polls on (shared with `Core::attention`).
    pub fn attention(&self) -> &Arc<AtomicBool> {
        &self.attention
    }

    /// The vCPU is about to look for wake-up reasons and maybe sleep: from
    /// now on `notify` takes the slow path.
    fn enter_idle(&self) {
        self.idle.store(true, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
    }

    /// The vCPU runs again: notifications only set the attention flag.
    fn leave_idle(&self) {
        self.idle.store(false, Ordering::SeqCst);
    }

    /// Sleep until notified or until guest time `deadline_ns`.
    fn wait(&self, clock: &EngineClock, deadline_ns: Option<u64>) {
        let w = self.woken.lock().unwrap_or_else(|e| e.into_inner());
        let mut w = w;
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
}

/// The interrupt controllers and timers of one VM, with a wake-up signal per
/// vCPU.
pub struct Pc {
    shared: Arc<SharedPlatform>,
    clock: Arc<EngineClock>,
    signals: Vec<Arc<VcpuSignal>>,
    pvclock: PvClock,
    /// kvmclock structure versions handed out (even, increasing), so a
    /// re-registered structure is visibly new.
    pvclock_version: AtomicU32,
    /// None if the thread could not be started: the vCPUs then poll every
    /// few blocks and read the clock themselves.
    timer: Option<TimerThread>,
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
            apic_bus_hz: DEFAULT_BUS_HZ,
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
        let timer = TimerThread::spawn(&shared, &clock);
        if timer.is_none() {
            tracing::warn!("no timer thread: the engine's vCPUs poll for timers every few blocks");
        }
        Arc::new(Pc {
            timer,
            shared,
            clock,
            signals,
            // 1 GHz is exactly representable (mul 2^31, shift 1).
            pvclock: PvClock::new(TSC_HZ).unwrap_or(PvClock {
                tsc_hz: TSC_HZ,
                tsc_to_system_mul: 1 << 31,
                tsc_shift: 1,
            }),
            pvclock_version: AtomicU32::new(0),
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

    /// Whether a timer thread ticks the platform at its deadlines (then
    /// every event sets the target vCPU's attention flag).
    pub fn has_timer_thread(&self) -> bool {
        self.timer.is_some()
    }

    pub fn signal(&self, vcpu: u32) -> Option<&Arc<VcpuSignal>> {
        self.signals.get(vcpu as usize)
    }

    /// `KVM_HC_KICK_CPU` with physical APIC ID `apic_id` (guest data): as
    /// KVM delivers it, to each vCPU whose enabled APIC has that ID (all
    /// of them for the xAPIC broadcast 0xff); an ID nobody has is ignored.
    pub fn pv_kick(&self, apic_id: u64) {
        for i in self.shared.physical_targets(apic_id) {
            if let Some(s) = self.signals.get(i) {
                s.pv_kick();
            }
        }
    }

    /// Guest nanoseconds now.
    pub fn now_ns(&self) -> u64 {
        self.clock.now_ns()
    }

    /// The platform's state and guest time, for a snapshot (vCPUs stopped).
    pub fn save(&self) -> crate::state::EmuVmState {
        let (platform, guest_ns) = self.shared.save();
        crate::state::EmuVmState {
            guest_ns,
            pvclock_version: self.pvclock_version.load(Ordering::SeqCst),
            platform,
        }
    }

    /// Load a snapshot's platform, with guest time resuming at the
    /// snapshot's (before any vCPU runs).
    pub fn restore(&self, s: crate::state::EmuVmState) -> Result<(), crate::state::EmuStateError> {
        s.check(self.signals.len())?;
        self.clock.resume_at(s.guest_ns);
        self.pvclock_version
            .store(s.pvclock_version & !1, Ordering::SeqCst);
        self.shared.restore(s.platform)?;
        // Guest time jumped: the timer thread's sleep was computed on the
        // old clock.
        if let Some(t) = &self.timer {
            t.rearm();
        }
        Ok(())
    }

    fn next_pvclock_version(&self) -> u32 {
        self.pvclock_version
            .fetch_add(2, Ordering::Relaxed)
            .wrapping_add(2)
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
/// method. `ack` picks the vector again under the platform lock, so what it
/// returns is what the CPU must deliver.
impl InterruptController for SharedPlatform {
    fn trigger_gsi(&self, gsi: u32) {
        SharedPlatform::trigger_gsi(self, gsi);
    }

    fn pending_vector(&self, vcpu: u32) -> Option<u8> {
        SharedPlatform::pending_vector(self, vcpu)
    }

    fn ack(&self, vcpu: u32, vector: u8) -> Option<u8> {
        SharedPlatform::ack(self, vcpu, vector)
    }

    fn take_nmi(&self, vcpu: u32) -> bool {
        SharedPlatform::take_nmi(self, vcpu)
    }

    fn take_init(&self, vcpu: u32) -> bool {
        SharedPlatform::take_init(self, vcpu)
    }

    fn take_startup(&self, vcpu: u32) -> Option<u8> {
        SharedPlatform::take_startup(self, vcpu)
    }

    fn has_pending(&self, vcpu: u32) -> bool {
        SharedPlatform::has_pending(self, vcpu)
    }

    fn set_tpr(&self, vcpu: u32, cr8: u8) {
        SharedPlatform::set_tpr(self, vcpu, cr8);
    }

    fn tpr(&self, vcpu: u32) -> Option<u8> {
        Some(SharedPlatform::tpr(self, vcpu))
    }

    fn signal_msi(&self, addr: u64, data: u32) {
        match msi_delivery(addr, data) {
            Some(d) => SharedPlatform::signal_msi(self, d),
            None => tracing::debug!("MSI to {addr:#x} (data {data:#x}) is not an APIC message"),
        }
    }

    fn rdmsr(&self, vcpu: u32, msr: u32) -> Option<Result<u64, MsrFault>> {
        SharedPlatform::rdmsr(self, vcpu, msr).map(|r| r.map_err(|_| MsrFault))
    }

    fn wrmsr(&self, vcpu: u32, msr: u32, value: u64) -> Option<Result<(), MsrFault>> {
        SharedPlatform::wrmsr(self, vcpu, msr, value).map(|r| r.map_err(|_| MsrFault))
    }

    fn guest_tsc(&self) -> Option<u64> {
        Some(self.clock().tsc())
    }
}

/// What the vCPUs of a PC-mode VM use: the platform, with x2APIC refused
/// unless advertised, and kvmclock data on the engine's clock.
impl InterruptController for Pc {
    fn trigger_gsi(&self, gsi: u32) {
        self.shared.trigger_gsi(gsi);
    }

    fn pending_vector(&self, vcpu: u32) -> Option<u8> {
        self.shared.pending_vector(vcpu)
    }

    fn ack(&self, vcpu: u32, vector: u8) -> Option<u8> {
        self.shared.ack(vcpu, vector)
    }

    fn take_nmi(&self, vcpu: u32) -> bool {
        self.shared.take_nmi(vcpu)
    }

    fn take_init(&self, vcpu: u32) -> bool {
        self.shared.take_init(vcpu)
    }

    fn take_startup(&self, vcpu: u32) -> Option<u8> {
        self.shared.take_startup(vcpu)
    }

    fn has_pending(&self, vcpu: u32) -> bool {
        self.shared.has_pending(vcpu)
    }

    fn set_tpr(&self, vcpu: u32, cr8: u8) {
        self.shared.set_tpr(vcpu, cr8);
    }

    fn tpr(&self, vcpu: u32) -> Option<u8> {
        Some(self.shared.tpr(vcpu))
    }

    fn signal_msi(&self, addr: u64, data: u32) {
        InterruptController::signal_msi(&*self.shared, addr, data);
    }

    fn rdmsr(&self, vcpu: u32, msr: u32) -> Option<Result<u64, MsrFault>> {
        if !ADVERTISE_X2APIC && (MSR_X2APIC_FIRST..=MSR_X2APIC_LAST).contains(&msr) {
            return None;
        }
        InterruptController::rdmsr(&*self.shared, vcpu, msr)
    }

    fn wrmsr(&self, vcpu: u32, msr: u32, value: u64) -> Option<Result<(), MsrFault>> {
        if !ADVERTISE_X2APIC {
            if (MSR_X2APIC_FIRST..=MSR_X2APIC_LAST).contains(&msr) {
                return None;
            }
            if msr == MSR_IA32_APIC_BASE && value & APIC_BASE_EXTD != 0 {
                return Some(Err(MsrFault));
            }
        }
        InterruptController::wrmsr(&*self.shared, vcpu, msr, value)
    }

    fn guest_tsc(&self) -> Option<u64> {
        Some(self.clock.tsc())
    }

    fn pvclock_time_info(&self, _vcpu: u32) -> Option<[u8; 32]> {
        // Guest TSC = guest ns at the same instant (1 GHz, offset 0 unless
        // the guest wrote IA32_TSC, which Linux does not).
        let now = self.clock.now_ns();
        let info = self
            .pvclock
            .time_info(self.next_pvclock_version(), now, now);
        Some(info.to_bytes())
    }

    fn pvclock_wall_clock(&self) -> Option<[u8; 12]> {
        let unix_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let wc = PvClockWallClock::new(self.next_pvclock_version(), unix_ns, self.now_ns());
        Some(wc.to_bytes())
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

/// Only what devices and the VMM use before and after the vCPUs exist
/// (the vCPUs talk to their [`Pc`] directly).
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

    fn ack(&self, vcpu: u32, vector: u8) -> Option<u8> {
        self.get()?.ack(vcpu, vector)
    }

    fn take_nmi(&self, vcpu: u32) -> bool {
        self.get().is_some_and(|pc| pc.take_nmi(vcpu))
    }

    fn has_pending(&self, vcpu: u32) -> bool {
        self.get().is_some_and(|pc| pc.has_pending(vcpu))
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
    /// Times this vCPU slept in HLT or wait-for-SIPI (statistics; a vCPU
    /// that spun instead of sleeping would count thousands per millisecond).
    pub sleeps: u64,
    /// The VM's doorbells: MMIO writes the platform does not claim look
    /// here before they exit.
    pub notify: Arc<NotifyTable>,
}

impl PcVcpu {
    /// The link for vCPU `index`; `None` if the platform has no APIC for it.
    pub fn new(pc: Arc<Pc>, index: u32) -> Option<PcVcpu> {
        let signal = pc.signal(index)?.clone();
        Some(PcVcpu {
            pc,
            signal,
            sleeps: 0,
            notify: Arc::default(),
        })
    }

    /// [`VcpuPlatform::idle`] with the signal marked idle.
    fn idle_loop(&mut self, cpu: CpuView, kick: &AtomicBool) -> Idle {
        // HLT with IF=0 under PV_UNHALT sleeps until here at most.
        let mut slice_end = None;
        loop {
            if kick.load(Ordering::Relaxed) && kick.swap(false, Ordering::AcqRel) {
                return Idle::Interrupted;
            }
            // A kick pending from before the HLT, or one that woke us:
            // this HLT completes and uses it up.
            if !cpu.wait_for_sipi
                && cpu.pv_unhalt
                && self.signal.pv_unhalt.load(Ordering::SeqCst)
                && self.signal.pv_unhalt.swap(false, Ordering::SeqCst)
            {
                return Idle::Unhalt;
            }
            // One locked look: timers advanced to now, the wake-up reasons,
            // and when to look again. The PIT counts for every vCPU because
            // its interrupt may be routed to any of them and somebody must
            // advance it when all are asleep.
            let (wake, deadline) = self.pc.shared.with(|pl, _| {
                let i = cpu.vcpu as usize;
                let Some(l) = pl.lapic(i) else {
                    return (false, None);
                };
                let wake = if cpu.wait_for_sipi {
                    l.init_pending() || l.startup_pending()
                } else {
                    l.init_pending()
                        || (cpu.nmi_ok && l.nmi_pending())
                        || (cpu.if_set && pl.pending_vector(i).is_some())
                };
                let deadline = match (pl.next_lapic_deadline_ns(i), pl.pit().next_event_ns()) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                (wake, deadline)
            });
            if wake {
                return Idle::Wake;
            }
            let mut deadline = deadline;
            if !cpu.wait_for_sipi && !cpu.if_set {
                // HLT with interrupts off: only an NMI, INIT or SIPI could
                // wake it, and a paravirtual kick if the guest was offered
                // them (Linux's `kvm_wait` halts with IF=0 when the lock
                // was taken with interrupts off). Without PV_UNHALT the
                // VMM waits and runs the vCPU again, which looks again;
                // with it, wait here for a kick, one slice at a time.
                if !cpu.pv_unhalt {
                    return Idle::Halt;
                }
                // Timer deadlines cannot end it: sleep to the slice's end
                // (whoever takes the timer interrupts wakes for them).
                let now = self.pc.clock.now_ns();
                let end = *slice_end.get_or_insert(now + PV_HALT_SLICE.as_nanos() as u64);
                if now >= end {
                    return Idle::Halt;
                }
                deadline = Some(end);
            }
            self.sleeps += 1;
            self.signal.wait(&self.pc.clock, deadline);
        }
    }
}

// ------------------------------------------------------------ the vCPU's view

impl VcpuPlatform for PcVcpu {
    /// The interrupt check (called when the core decides to poll: attention
    /// flag, STI/IRET/EOI, every few blocks): take the most urgent thing the
    /// platform has for this vCPU, under one lock.
    fn poll(&mut self, cpu: CpuView) -> Event {
        let idx = cpu.vcpu;
        // Lock-free unless something is hinted for this vCPU or a timer is
        // due (then it advances the timers and kicks whoever they interrupt).
        if !self.pc.shared.has_pending(idx) {
            return Event::None;
        }
        self.pc.shared.with(|pl, _| {
            let i = idx as usize;
            if pl.take_init(i) {
                // KVM restarts the BSP on INIT (an INIT is a reset for it).
                Event::Init { restart: i == 0 }
            } else if cpu.wait_for_sipi {
                pl.take_startup(i).map_or(Event::None, Event::Sipi)
            } else if cpu.nmi_ok && pl.take_nmi(i) {
                Event::Nmi
            } else if cpu.if_set {
                // `ack` picks again under this lock and returns what to
                // deliver (the PIC's spurious vector if the request went away).
                match pl.pending_vector(i) {
                    Some(v) => pl.ack(i, v).map_or(Event::None, Event::Irq),
                    None => Event::None,
                }
            } else {
                Event::None
            }
        })
    }

    /// Sleep while halted (IF=1) or waiting for SIPI, until something can
    /// wake the CPU, the next timer deadline (to advance the timers), or a
    /// kick. HLT with IF=0 goes to the VMM.
    fn idle(&mut self, cpu: CpuView, kick: &AtomicBool) -> Idle {
        self.signal.enter_idle();
        let r = self.idle_loop(cpu, kick);
        self.signal.leave_idle();
        r
    }

    /// The PIC, ELCR, PIT and port 0x61.
    fn pio_in(&mut self, port: u16, size: u8) -> Option<(u64, bool)> {
        if !(Pic::handles_port(port) || Pit::handles_port(port)) {
            return None;
        }
        let mut buf = [0u8; 8];
        let n = (size as usize).min(8);
        if !self.pc.shared.pio_read(port, &mut buf[..n]) {
            return None;
        }
        // Reading the PIC can acknowledge (poll mode): look again.
        Some((u64::from_le_bytes(buf), Pic::handles_port(port)))
    }

    fn pio_out(&mut self, port: u16, size: u8, data: u64) -> bool {
        if !(Pic::handles_port(port) || Pit::handles_port(port)) {
            return false;
        }
        let bytes = data.to_le_bytes();
        let n = (size as usize).min(8);
        self.pc.shared.pio_write(port, &bytes[..n])
    }

    /// This vCPU's LAPIC page and the IOAPIC.
    fn mmio_read(&mut self, vcpu: u32, apic_base: u64, addr: u64, size: u8) -> Option<u64> {
        if !platform_mmio(apic_base, addr) {
            return None;
        }
        let mut buf = [0u8; 8];
        let n = (size as usize).min(8);
        if !self.pc.shared.mmio_read(vcpu, addr, &mut buf[..n]) {
            return None;
        }
        Some(u64::from_le_bytes(buf))
    }

    /// This vCPU's LAPIC page and the IOAPIC, then the VM's doorbells.
    fn mmio_write(&mut self, vcpu: u32, apic_base: u64, addr: u64, size: u8, data: u64) -> bool {
        if !platform_mmio(apic_base, addr) {
            return self.notify.signal(addr);
        }
        let bytes = data.to_le_bytes();
        let n = (size as usize).min(8);
        self.pc.shared.mmio_write(vcpu, addr, &bytes[..n])
    }

    fn set_tpr(&self, vcpu: u32, cr8: u8) {
        InterruptController::set_tpr(&*self.pc, vcpu, cr8)
    }

    fn tpr(&self, vcpu: u32) -> Option<u8> {
        InterruptController::tpr(&*self.pc, vcpu)
    }

    fn rdmsr(&self, vcpu: u32, msr: u32) -> Option<Result<u64, MsrFault>> {
        InterruptController::rdmsr(&*self.pc, vcpu, msr)
    }

    fn wrmsr(&self, vcpu: u32, msr: u32, value: u64) -> Option<Result<(), MsrFault>> {
        InterruptController::wrmsr(&*self.pc, vcpu, msr, value)
    }

    fn guest_tsc(&self) -> Option<u64> {
        InterruptController::guest_tsc(&*self.pc)
    }

    fn pvclock_time_info(&self, vcpu: u32) -> Option<[u8; 32]> {
        InterruptController::pvclock_time_info(&*self.pc, vcpu)
    }

    fn pvclock_wall_clock(&self) -> Option<[u8; 12]> {
        InterruptController::pvclock_wall_clock(&*self.pc)
    }

    /// The VMM loaded IA32_APIC_BASE through the special registers: the
    /// platform takes it as it is (x2APIC included, unlike a guest WRMSR).
    fn load_apic_base(&mut self, vcpu: u32, v: u64) -> Option<u64> {
        let shared = &self.pc.shared;
        if shared.rdmsr(vcpu, MSR_IA32_APIC_BASE) == Some(Ok(v)) {
            return None;
        }
        match shared.wrmsr(vcpu, MSR_IA32_APIC_BASE, v) {
            Some(Ok(())) => match shared.rdmsr(vcpu, MSR_IA32_APIC_BASE) {
                Some(Ok(base)) => Some(base),
                _ => None,
            },
            _ => None,
        }
    }

    fn pv_kick(&self, apic_id: u64) {
        self.pc.pv_kick(apic_id);
    }

    fn pv_unhalted(&self) -> Option<&AtomicBool> {
        Some(self.signal.pv_unhalt())
    }

    fn waker(&self) -> Option<Arc<dyn Fn() + Send + Sync>> {
        let signal = self.signal.clone();
        Some(Arc::new(move || signal.notify()))
    }

    fn sleeps(&self) -> u64 {
        self.sleeps
    }

    fn kicks_on_events(&self) -> bool {
        self.pc.has_timer_thread()
    }
}

/// Whether `addr` may belong to the LAPIC page at `apic_base` or the
/// IOAPIC: a cheap filter before taking the platform lock.
#[inline]
fn platform_mmio(apic_base: u64, addr: u64) -> bool {
    let page = addr & !0xfff;
    page == IOAPIC_BASE || page == apic_base & 0x000f_ffff_ffff_f000
}
