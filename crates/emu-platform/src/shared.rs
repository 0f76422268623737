//! A thread-safe [`Platform`] for the engine: vCPU threads and device threads
//! share one `Mutex<Platform>`, and a [`GuestClock`] supplies "now".
//!
//! The engine polls for interrupts between blocks, so the common case
//! ("nothing pending, no timer due") must not take the lock. After every
//! locked operation the per-vCPU "may have an event" hints and the earliest
//! timer deadline are republished in atomics; [`SharedPlatform::pending_vector`]
//! only locks when a hint is set or the deadline has passed.
//!
//! The method names and signatures follow the engine's
//! `emu::platform::irq::InterruptController` trait (`trigger_gsi`, `pending_vector`,
//! `ack`, `take_nmi`, `has_pending`, `set_tpr`), so implementing that trait
//! for this type is a one-line forward per method.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::lapic::GpFault;
use crate::{Platform, NS_PER_SEC};

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

/// [`Platform`] behind a mutex, with lock-free fast paths.
pub struct SharedPlatform {
    inner: Mutex<Platform>,
    clock: Arc<dyn GuestClock>,
    kick: Mutex<Option<Arc<KickFn>>>,
    /// Per vCPU: something may be pending (interrupt, NMI, INIT, SIPI).
    hints: Vec<AtomicBool>,
    /// Earliest timer deadline (u64::MAX = none).
    deadline: AtomicU64,
}

impl SharedPlatform {
    pub fn new(platform: Platform, clock: Arc<dyn GuestClock>) -> Self {
        let hints = (0..platform.num_vcpus())
            .map(|_| AtomicBool::new(false))
            .collect();
        let s = SharedPlatform {
            inner: Mutex::new(platform),
            clock,
            kick: Mutex::new(None),
            hints,
            deadline: AtomicU64::new(u64::MAX),
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
    /// the platform lock, once per vCPU that got new work.
    pub fn set_kick(&self, kick: Arc<KickFn>) {
        *self.kick.lock().unwrap_or_else(|e| e.into_inner()) = Some(kick);
    }

    fn lock(&self) -> MutexGuard<'_, Platform> {
        // A panic while holding the lock cannot leave the models in a state
        // that is unsafe to keep using (they have no invariants spanning
        // several fields that a panic could break halfway), so recover.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, p: &Platform) {
        for (i, h) in self.hints.iter().enumerate() {
            h.store(p.has_event(i), Ordering::SeqCst);
        }
        self.deadline
            .store(p.next_deadline_ns().unwrap_or(u64::MAX), Ordering::SeqCst);
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
        if kicks != 0 {
            let kick = self.kick.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some(kick) = kick {
                for i in 0..64 {
                    if kicks & (1 << i) != 0 {
                        kick(i);
                    }
                }
            }
        }
        r
    }

    /// Whether the lock-free state says nothing can be pending for `vcpu`.
    fn quiet(&self, vcpu: u32) -> bool {
        let Some(h) = self.hints.get(vcpu as usize) else {
            return true;
        };
        !h.load(Ordering::SeqCst) && self.clock.now_ns() < self.deadline.load(Ordering::SeqCst)
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
        g.take_kicks();
        self.publish(&g);
        drop(g);
        let kick = self.kick.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(kick) = kick {
            for i in 0..self.hints.len() {
                kick(i);
            }
        }
        Ok(())
    }
}
