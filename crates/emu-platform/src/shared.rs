//! A thread-safe [`Platform`] for the engine: vCPU threads and device threads
//! share one `Mutex<Platform>`, and a [`GuestClock`] supplies "now".
//!
//! The engine polls for interrupts between blocks, so the common case
//! ("nothing pending, no timer due") must not take the lock. After every
//! locked operation the per-vCPU "may have an event" hints and the earliest
//! timer deadline are republished in atomics; [`SharedPlatform::pending_vector`]
//! only locks when a hint is set or the deadline has passed.
//!
//! Device interrupts (MSIs) do not take the lock either when they can be
//! routed from the published state alone: a fixed, edge-triggered message
//! to one physical xAPIC ID that exactly one enabled APIC has. The sender
//! sets the vector's bit in that vCPU's posted set (atomic), raises its
//! "posted" flag and kicks it; whoever takes the lock next (normally that
//! vCPU, whose interrupt check sees the flag) first moves every posted
//! vector into its APIC's IRR, exactly as the locked path would have.
//! Nothing reads an IRR without the lock, so no observer can tell a posted
//! MSI from one delivered under the lock at the moment it was posted, and
//! an MSI is neither lost (the flag is raised after the bit and cleared
//! before the bits are taken) nor delivered twice (each bit is taken by one
//! atomic swap). Every other message (logical or broadcast destination,
//! level trigger, NMI/INIT/SMI, an x2APIC target) takes the lock.
//!
//! Timer deadlines: a platform embedded with a timer source (the engine's
//! PC platform runs one timer thread per VM) installs a deadline hook
//! ([`SharedPlatform::set_deadline_hook`]), called whenever the published
//! deadline moves earlier, and calls [`SharedPlatform::tick`] when the
//! deadline passes; the tick kicks the vCPUs that got an interrupt. vCPUs
//! then need not read the clock between blocks to notice a timer.
//!
//! The method names and signatures follow the engine's
//! `emu::platform::irq::InterruptController` trait (`trigger_gsi`, `pending_vector`,
//! `ack`, `take_nmi`, `has_pending`, `set_tpr`), so implementing that trait
//! for this type is a one-line forward per method.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use crate::ioapic::Delivery;
use crate::lapic::GpFault;
use crate::{DeliveryMode, DestMode, Platform, Trigger, NS_PER_SEC};

/// The guest's notion of time.
pub trait GuestClock: Send + Sync {
    /// Monotonic guest time in nanoseconds.
    fn now_ns(&self) -> u64;
    /// The guest TSC at the same instant (for IA32_TSC_DEADLINE).
    fn tsc(&self) -> u64;
}

/// A clock that only moves when told to (tests, deterministic replay). The
/// TSC runs at `tsc_hz` from 0 at time 0.
#[derive(Debug)]
pub struct ManualClock {
    now: AtomicU64,
    tsc_hz: u64,
}

impl ManualClock {
    pub fn new(tsc_hz: u64) -> Self {
        ManualClock {
            now: AtomicU64::new(0),
            tsc_hz,
        }
    }

    pub fn set_ns(&self, ns: u64) {
        self.now.store(ns, Ordering::SeqCst);
    }

    pub fn advance_ns(&self, ns: u64) {
        self.now.fetch_add(ns, Ordering::SeqCst);
    }
}

impl GuestClock for ManualClock {
    fn now_ns(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }

    fn tsc(&self) -> u64 {
        crate::mul_div_floor(self.now_ns(), self.tsc_hz, NS_PER_SEC)
    }
}

/// Called with a vCPU index when that vCPU received something (interrupt,
/// NMI, INIT, SIPI), so a halted vCPU thread can be woken.
pub type KickFn = dyn Fn(usize) + Send + Sync;

/// See [`SharedPlatform::set_deadline_hook`].
pub type DeadlineHook = dyn Fn() + Send + Sync;

/// MSIs posted to one vCPU without the lock, not yet in its APIC's IRR.
#[derive(Default)]
struct Posted {
    /// Raised (after the bit) by every post, cleared by the drain before it
    /// takes the bits: while a bit waits, this is set.
    any: AtomicBool,
    /// One bit per vector.
    bits: [AtomicU64; 4],
}

/// `routes` entry: the APIC is enabled in xAPIC mode, with the ID in bits 7:0.
const ROUTE_VALID: u32 = 1 << 31;

/// [`Platform`] behind a mutex, with lock-free fast paths.
pub struct SharedPlatform {
    inner: Mutex<Platform>,
    clock: Arc<dyn GuestClock>,
    /// Set once; read without a lock on every kick.
    kick: OnceLock<Arc<KickFn>>,
    /// Set once: told when the published deadline moves earlier.
    deadline_hook: OnceLock<Arc<DeadlineHook>>,
    /// Per vCPU: something may be pending (interrupt, NMI, INIT, SIPI).
    hints: Vec<AtomicBool>,
    /// Earliest timer deadline (u64::MAX = none).
    deadline: AtomicU64,
    /// Per vCPU: what a physical-mode MSI matches (`ROUTE_VALID | id`), or
    /// 0; republished with the hints after every locked operation.
    routes: Vec<AtomicU32>,
    /// Per vCPU: MSIs posted without the lock.
    posted: Vec<Posted>,
}

impl SharedPlatform {
    pub fn new(platform: Platform, clock: Arc<dyn GuestClock>) -> Self {
        let hints = (0..platform.num_vcpus())
            .map(|_| AtomicBool::new(false))
            .collect();
        let n = platform.num_vcpus();
        let s = SharedPlatform {
            inner: Mutex::new(platform),
            clock,
            kick: OnceLock::new(),
            deadline_hook: OnceLock::new(),
            hints,
            deadline: AtomicU64::new(u64::MAX),
            routes: (0..n).map(|_| AtomicU32::new(0)).collect(),
            posted: (0..n).map(|_| Posted::default()).collect(),
        };
        let g = s.lock();
        s.publish(&g);
        drop(g);
        s
    }

    pub fn clock(&self) -> &Arc<dyn GuestClock> {
        &self.clock
    }

    /// Installs the function that wakes vCPU threads. It is called outside
    /// the platform lock, once per vCPU that got new work. Only the first
    /// function installed counts (it is read without a lock).
    pub fn set_kick(&self, kick: Arc<KickFn>) {
        // A second function is ignored: kicks already in flight read the
        // first without a lock, so it cannot be swapped safely.
        let _ = self.kick.set(kick);
    }

    /// Installs the function told (under the platform lock, so it must
    /// not block or lock the platform) that the earliest timer deadline
    /// moved earlier: a timer source re-arms for it. Only the first one
    /// installed counts.
    pub fn set_deadline_hook(&self, hook: Arc<DeadlineHook>) {
        let _ = self.deadline_hook.set(hook);
    }

    fn kick(&self, vcpu: usize) {
        if let Some(k) = self.kick.get() {
            k(vcpu);
        }
    }

    /// The platform, locked, with every posted MSI moved into its APIC.
    fn lock(&self) -> MutexGuard<'_, Platform> {
        // A panic while holding the lock cannot leave the models in a state
        // that is unsafe to keep using (they have no invariants spanning
        // several fields that a panic could break halfway), so recover.
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        self.drain_posted(&mut g);
        g
    }

    /// Moves the lock-free posted MSIs into the APICs (under the lock).
    fn drain_posted(&self, p: &mut Platform) {
        for (i, q) in self.posted.iter().enumerate() {
            if !q.any.load(Ordering::Acquire) {
                continue;
            }
            // Clear the flag before taking the bits: a post that lands
            // after our swap of its word raises the flag again.
            q.any.store(false, Ordering::SeqCst);
            for (w, word) in q.bits.iter().enumerate() {
                let mut bits = word.swap(0, Ordering::SeqCst);
                while bits != 0 {
                    let b = bits.trailing_zeros();
                    bits &= bits - 1;
                    p.accept_posted(i, (w as u32 * 64 + b) as u8);
                }
            }
        }
    }

    fn publish(&self, p: &Platform) {
        for (i, h) in self.hints.iter().enumerate() {
            h.store(p.has_event(i), Ordering::SeqCst);
        }
        for (i, r) in self.routes.iter().enumerate() {
            let route = p
                .xapic_physical_id(i)
                .map_or(0, |id| ROUTE_VALID | id as u32);
            r.store(route, Ordering::SeqCst);
        }
        let next = p.next_deadline_ns().unwrap_or(u64::MAX);
        let old = self.deadline.swap(next, Ordering::SeqCst);
        if next < old {
            if let Some(h) = self.deadline_hook.get() {
                h();
            }
        }
    }

    /// Runs `f` on the platform at the current time (timers advanced first)
    /// and republishes the hints.
    pub fn with<R>(&self, f: impl FnOnce(&mut Platform, u64) -> R) -> R {
        let now = self.clock.now_ns();
        let mut g = self.lock();
        g.tick(now);
        let r = f(&mut g, now);
        self.publish(&g);
        let kicks = g.take_kicks();
        drop(g);
        let mut kicks = kicks;
        while kicks != 0 {
            let i = kicks.trailing_zeros() as usize;
            kicks &= kicks - 1;
            self.kick(i);
        }
        r
    }

    /// A device's message-signalled interrupt. Posted without the lock
    /// when the published routes name exactly one target (see the module
    /// notes), else routed under the lock like an I/O APIC message.
    pub fn signal_msi(&self, d: Delivery) {
        if let Some(i) = self.lock_free_target(&d) {
            let q = &self.posted[i];
            q.bits[(d.vector >> 6) as usize].fetch_or(1 << (d.vector & 63), Ordering::SeqCst);
            q.any.store(true, Ordering::SeqCst);
            self.kick(i);
            return;
        }
        self.with(|p, _| p.route_delivery(d));
    }

    /// The vCPUs a physical-mode message to APIC ID `dest` reaches, from
    /// the published routes (no lock): those whose enabled xAPIC has that
    /// ID, or all of them for 0xff (the xAPIC broadcast). An ID no APIC
    /// has (guest-controlled, any width) reaches none.
    pub fn physical_targets(&self, dest: u64) -> impl Iterator<Item = usize> + '_ {
        let valid = dest <= 0xff;
        self.routes.iter().enumerate().filter_map(move |(i, r)| {
            let route = r.load(Ordering::SeqCst);
            let hit = valid
                && route & ROUTE_VALID != 0
                && (dest == 0xff || route == ROUTE_VALID | dest as u32);
            hit.then_some(i)
        })
    }

    /// The one vCPU a message can be posted to without the lock, if any.
    fn lock_free_target(&self, d: &Delivery) -> Option<usize> {
        let simple = matches!(
            d.delivery_mode,
            DeliveryMode::Fixed | DeliveryMode::LowestPriority
        ) && d.trigger == Trigger::Edge
            && d.dest_mode == DestMode::Physical
            && d.dest < 0xff;
        if !simple {
            return None;
        }
        let want = ROUTE_VALID | d.dest;
        let mut found = None;
        for (i, r) in self.routes.iter().enumerate() {
            if r.load(Ordering::SeqCst) == want {
                if found.is_some() {
                    return None; // two APICs with one ID: both get it, locked
                }
                found = Some(i);
            }
        }
        found
    }

    /// Whether the lock-free state says nothing can be pending for `vcpu`.
    fn quiet(&self, vcpu: u32) -> bool {
        let Some(h) = self.hints.get(vcpu as usize) else {
            return true;
        };
        !h.load(Ordering::SeqCst)
            && !self.posted[vcpu as usize].any.load(Ordering::SeqCst)
            && self.clock.now_ns() < self.deadline.load(Ordering::SeqCst)
    }

    /// Advances the timers to now.
    pub fn tick(&self) {
        self.with(|_, _| ());
    }

    /// Earliest guest time a timer fires, for sleeping while halted.
    pub fn next_deadline_ns(&self) -> Option<u64> {
        let d = self.deadline.load(Ordering::SeqCst);
        (d != u64::MAX).then_some(d)
    }

    /// Pulses GSI `gsi` (an edge from a device). GSIs 0-15 are the ISA IRQs
    /// and also reach the PIC; GSI 2 stands for ISA IRQ0 when IRQ0 is routed
    /// to pin 2.
    pub fn trigger_gsi(&self, gsi: u32) {
        self.with(|p, _| p.pulse_gsi(gsi));
    }

    /// Sets the level of GSI `gsi` (level-triggered devices).
    pub fn set_gsi_level(&self, gsi: u32, level: bool) {
        self.with(|p, _| p.set_gsi_level(gsi, level));
    }

    /// See [`Platform::pending_vector`].
    pub fn pending_vector(&self, vcpu: u32) -> Option<u8> {
        if self.quiet(vcpu) {
            return None;
        }
        self.with(|p, _| p.pending_vector(vcpu as usize))
    }

    /// See [`Platform::ack`]. Prefer [`SharedPlatform::ack_pending`], which
    /// picks and acknowledges under one lock so the vector cannot change in
    /// between.
    pub fn ack(&self, vcpu: u32, vector: u8) -> Option<u8> {
        self.with(|p, _| p.ack(vcpu as usize, vector))
    }

    /// Picks and acknowledges the pending vector atomically.
    pub fn ack_pending(&self, vcpu: u32) -> Option<u8> {
        if self.quiet(vcpu) {
            return None;
        }
        self.with(|p, _| {
            let v = p.pending_vector(vcpu as usize)?;
            p.ack(vcpu as usize, v)
        })
    }

    pub fn take_nmi(&self, vcpu: u32) -> bool {
        if self.quiet(vcpu) {
            return false;
        }
        self.with(|p, _| p.take_nmi(vcpu as usize))
    }

    pub fn take_init(&self, vcpu: u32) -> bool {
        if self.quiet(vcpu) {
            return false;
        }
        self.with(|p, _| p.take_init(vcpu as usize))
    }

    pub fn take_startup(&self, vcpu: u32) -> Option<u8> {
        if self.quiet(vcpu) {
            return None;
        }
        self.with(|p, _| p.take_startup(vcpu as usize))
    }

    /// Anything that should wake a halted `vcpu` (an interrupt, NMI, INIT
    /// or SIPI); the caller still applies IF to maskable interrupts.
    pub fn has_pending(&self, vcpu: u32) -> bool {
        if self.quiet(vcpu) {
            return false;
        }
        self.with(|p, _| p.has_event(vcpu as usize))
    }

    /// MOV to CR8.
    pub fn set_tpr(&self, vcpu: u32, cr8: u8) {
        self.with(|p, _| {
            if let Some(l) = p.lapic_mut(vcpu as usize) {
                l.set_cr8(cr8 as u64);
            }
        });
    }

    /// MOV from CR8.
    pub fn tpr(&self, vcpu: u32) -> u8 {
        let g = self.lock();
        g.lapic(vcpu as usize).map_or(0, |l| l.cr8() as u8)
    }

    pub fn pio_read(&self, port: u16, data: &mut [u8]) -> bool {
        self.with(|p, now| p.pio_read(port, data, now))
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) -> bool {
        self.with(|p, now| p.pio_write(port, data, now))
    }

    pub fn mmio_read(&self, vcpu: u32, addr: u64, data: &mut [u8]) -> bool {
        self.with(|p, now| p.mmio_read(vcpu as usize, addr, data, now))
    }

    pub fn mmio_write(&self, vcpu: u32, addr: u64, data: &[u8]) -> bool {
        self.with(|p, now| p.mmio_write(vcpu as usize, addr, data, now))
    }

    pub fn rdmsr(&self, vcpu: u32, msr: u32) -> Option<Result<u64, GpFault>> {
        self.with(|p, now| p.rdmsr(vcpu as usize, msr, now))
    }

    pub fn wrmsr(&self, vcpu: u32, msr: u32, value: u64) -> Option<Result<(), GpFault>> {
        let tsc = self.clock.tsc();
        self.with(|p, now| p.wrmsr(vcpu as usize, msr, value, now, tsc))
    }

    /// A copy of the whole state (for snapshots).
    pub fn snapshot(&self) -> Platform {
        self.lock().clone()
    }

    /// The whole state with the timers advanced to now, and that guest
    /// time: what a snapshot records (timer deadlines are absolute guest
    /// times, so they stay right on a clock that resumes from it).
    pub fn save(&self) -> (Platform, u64) {
        self.with(|p, now| (p.clone(), now))
    }

    /// Replace the whole state with a saved one (see
    /// [`Platform::check_restorable`]); every vCPU is kicked so a sleeping
    /// one looks at what it now has pending. The clock must already read
    /// the saved guest time or later.
    pub fn restore(&self, saved: Platform) -> Result<(), crate::platform::RestoreError> {
        saved.check_restorable(self.hints.len())?;
        let mut g = self.lock();
        *g = saved;
        // MSIs posted since the lock was taken belonged to the state just
        // replaced (the locked path would have put them in its IRRs).
        for q in &self.posted {
            q.any.store(false, Ordering::SeqCst);
            for w in &q.bits {
                w.store(0, Ordering::SeqCst);
            }
        }
        g.take_kicks();
        self.publish(&g);
        drop(g);
        for i in 0..self.hints.len() {
            self.kick(i);
        }
        Ok(())
    }
}
