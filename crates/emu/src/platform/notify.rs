//! Doorbell addresses the vCPU signals itself: the engine's counterpart of
//! KVM's ioeventfd.
//!
//! A virtio queue notification is a guest write to a fixed MMIO address
//! whose only effect is to wake the device's worker. Leaving the vCPU for
//! it (an MMIO exit, the VMM's bus lookup and locks, then an eventfd write)
//! costs far more than the write itself, and blk and net pay it on every
//! request. The VMM registers those addresses here
//! (`Vm::register_mmio_notify`) and the vCPU, before it turns an MMIO write
//! into an exit, looks the address up and writes the eventfd instead.
//!
//! Invariants:
//! - an address is in the table at most once (a second registration is an
//!   error, as KVM's EEXIST); writes of any size to it match (KVM's
//!   datamatch-free, length-0 ioeventfd);
//! - the table holds its own duplicates of the registered eventfds, so the
//!   caller's may be dropped or moved; unregistering goes by address;
//! - the platform's own MMIO (LAPIC page, IOAPIC) is served before the table
//!   is looked at, so a doorbell can never shadow an interrupt controller;
//! - the lookup on the vCPU is one relaxed load when the table is empty,
//!   else an uncontended read lock and a binary search: registrations only
//!   happen when the guest programs a BAR.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::RwLock;

use vmm_sys_util::eventfd::EventFd;

/// Why a registration was refused.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("MMIO notify address {0:#x} is already registered")]
    Taken(u64),
    #[error("MMIO notify address {addr:#x}: cannot duplicate its eventfd: {source}")]
    Dup { addr: u64, source: std::io::Error },
}

/// See the module documentation.
#[derive(Default)]
pub struct NotifyTable {
    /// Sorted by address.
    entries: RwLock<Vec<(u64, EventFd)>>,
    /// `entries.len()`, readable without the lock.
    len: AtomicUsize,
}

impl NotifyTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Guest writes to `addr` signal `event` from now on.
    pub fn register(&self, addr: u64, event: &EventFd) -> Result<(), NotifyError> {
        let dup = event
            .try_clone()
            .map_err(|source| NotifyError::Dup { addr, source })?;
        let mut e = self.entries.write().unwrap_or_else(|e| e.into_inner());
        match e.binary_search_by_key(&addr, |x| x.0) {
            Ok(_) => Err(NotifyError::Taken(addr)),
            Err(i) => {
                e.insert(i, (addr, dup));
                self.len.store(e.len(), Ordering::Release);
                Ok(())
            }
        }
    }

    /// Writes to `addr` are ordinary MMIO again. Whether it was registered.
    pub fn unregister(&self, addr: u64) -> bool {
        let mut e = self.entries.write().unwrap_or_else(|e| e.into_inner());
        match e.binary_search_by_key(&addr, |x| x.0) {
            Ok(i) => {
                e.remove(i);
                self.len.store(e.len(), Ordering::Release);
                true
            }
            Err(_) => false,
        }
    }

    /// Number of registered addresses.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The vCPU's guest write to `addr`: signal its eventfd if it is a
    /// doorbell (the write is then done), else `false` (it exits as MMIO).
    #[inline]
    pub fn signal(&self, addr: u64) -> bool {
        if self.len.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let e = self.entries.read().unwrap_or_else(|e| e.into_inner());
        match e.binary_search_by_key(&addr, |x| x.0) {
            Ok(i) => {
                // Only an overflow of the 64-bit counter could fail; the
                // worker drains it on every wake-up, so it cannot happen,
                // and a lost increment would still leave the fd readable.
                let _ = e[i].1.write(1);
                true
            }
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_registered_addresses_only() {
        let t = NotifyTable::new();
        let a = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let b = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        assert!(!t.signal(0x1000));
        t.register(0x2000, &a).unwrap();
        t.register(0x1000, &b).unwrap();
        assert!(matches!(
            t.register(0x1000, &a),
            Err(NotifyError::Taken(0x1000))
        ));
        assert!(t.signal(0x2000));
        assert!(t.signal(0x2000));
        assert!(!t.signal(0x2002));
        assert_eq!(a.read().unwrap(), 2);
        assert!(b.read().is_err(), "b was not signalled");
        assert!(t.unregister(0x2000));
        assert!(!t.unregister(0x2000));
        assert!(!t.signal(0x2000));
        assert_eq!(t.len(), 1);
    }
}
