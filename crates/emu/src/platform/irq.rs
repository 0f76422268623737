//! The interface between the CPU and an interrupt-controller model.
//!
//! The CPU side (IF, the STI/MOV SS shadow, IDT delivery) lives in the engine;
//! which vector is pending and how it is acknowledged belongs to the
//! controller (LAPIC/IOAPIC/PIC in `emu-platform`). The engine polls
//! [`InterruptController::pending_vector`] between blocks and calls
//! [`InterruptController::ack`] when it actually delivers the vector.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

pub use crate::msr::MsrFault;

pub trait InterruptController: Send + Sync {
    /// A device raised an edge on a global system interrupt line.
    fn trigger_gsi(&self, gsi: u32);
    /// Highest-priority vector ready for `vcpu`, not yet acknowledged.
    /// Called between blocks only when the vCPU can take it (IF=1, no shadow).
    fn pending_vector(&self, vcpu: u32) -> Option<u8>;
    /// The vCPU accepts `vector` (for a LAPIC: IRR -> ISR). Returns the
    /// vector to deliver now (normally `vector`; None if it went away).
    fn ack(&self, vcpu: u32, vector: u8) -> Option<u8>;
    /// Take a pending NMI for `vcpu`, if any.
    fn take_nmi(&self, _vcpu: u32) -> bool {
        false
    }
    /// Take a pending INIT for `vcpu` (the CPU resets and waits for SIPI).
    fn take_init(&self, _vcpu: u32) -> bool {
        false
    }
    /// Take a pending start-up IPI vector for a vCPU waiting for SIPI.
    fn take_startup(&self, _vcpu: u32) -> Option<u8> {
        None
    }
    /// Cheap check whether anything could wake a halted vCPU.
    fn has_pending(&self, vcpu: u32) -> bool {
        self.pending_vector(vcpu).is_some()
    }
    /// The guest wrote CR8 (task priority, bits 3:0 = TPR bits 7:4).
    fn set_tpr(&self, _vcpu: u32, _cr8: u8) {}
    /// A device sent a message-signalled interrupt (address 0xfeeXXXXX,
    /// data with the vector in bits 7:0). Controllers without LAPICs drop it.
    fn signal_msi(&self, _addr: u64, _data: u32) {}
    /// CR8 as the controller sees it (None: the engine keeps CR8 itself).
    fn tpr(&self, _vcpu: u32) -> Option<u8> {
        None
    }
    /// RDMSR of an MSR the controller owns (APIC base, x2APIC, TSC deadline):
    /// None = not the controller's, `Some(Err)` = #GP.
    fn rdmsr(&self, _vcpu: u32, _msr: u32) -> Option<Result<u64, MsrFault>> {
        None
    }
    /// WRMSR counterpart of [`InterruptController::rdmsr`].
    fn wrmsr(&self, _vcpu: u32, _msr: u32, _value: u64) -> Option<Result<(), MsrFault>> {
        None
    }
    /// The guest TSC, when the platform owns guest time (so RDTSC and the
    /// timers agree). None: the engine uses the host TSC plus an offset.
    fn guest_tsc(&self) -> Option<u64> {
        None
    }
    /// kvmclock: the `pvclock_vcpu_time_info` (32 bytes) for `vcpu` as of
    /// now, written to guest memory when the guest enables its clock. None:
    /// no kvmclock (the MSR write raises #GP).
    fn pvclock_time_info(&self, _vcpu: u32) -> Option<[u8; 32]> {
        None
    }
    /// kvmclock: the `pvclock_wall_clock` (12 bytes) as of now.
    fn pvclock_wall_clock(&self) -> Option<[u8; 12]> {
        None
    }
}

/// A stand-in controller until the platform models plug in: GSI `n` raises
/// vector `base + n`, delivered FIFO to any vCPU.
pub struct QueueInterruptController {
    base: u8,
    queue: Mutex<VecDeque<u8>>,
    any: AtomicBool,
}

impl QueueInterruptController {
    pub fn new(base: u8) -> Self {
        QueueInterruptController {
            base,
            queue: Mutex::new(VecDeque::new()),
            any: AtomicBool::new(false),
        }
    }

    /// Queue a vector directly.
    pub fn inject(&self, vector: u8) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.push_back(vector);
        self.any.store(true, Ordering::SeqCst);
    }
}

impl InterruptController for QueueInterruptController {
    fn trigger_gsi(&self, gsi: u32) {
        self.inject(self.base.wrapping_add(gsi as u8));
    }

    fn signal_msi(&self, _addr: u64, data: u32) {
        self.inject(data as u8);
    }

    fn pending_vector(&self, _vcpu: u32) -> Option<u8> {
        if !self.any.load(Ordering::Relaxed) {
            return None;
        }
        let q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.front().copied()
    }

    fn ack(&self, _vcpu: u32, vector: u8) -> Option<u8> {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let r = if q.front() == Some(&vector) {
            q.pop_front()
        } else {
            None
        };
        self.any.store(!q.is_empty(), Ordering::SeqCst);
        r
    }
}
