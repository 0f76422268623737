//! MSI delivery through irqfd and KVM's GSI routing.
//!
//! Devices signal an MSI as (address, data). The first time a pair is seen
//! it gets a GSI above the interrupt controllers' pins, a routing entry and
//! an irqfd; from then on signalling it is one eventfd write, which KVM
//! turns into the interrupt without a system call that walks the routing
//! each time. Guests rarely use more than a few dozen distinct messages (one
//! per MSI-X vector, re-targeted now and then by IRQ balancing); past
//! [`MAX_MSI_ROUTES`] the rest go through KVM_SIGNAL_MSI.
//!
//! KVM_SET_GSI_ROUTING replaces the whole table, so the table sent always
//! starts with the default routes of the in-kernel PIC and IOAPIC pins
//! (what KVM installs by itself when the irqchip is created).

use std::collections::HashMap;

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

/// GSIs 0-23 are the IOAPIC pins (0-15 also the PICs').
const IOAPIC_PINS: u32 = 24;
/// Distinct MSI messages given their own route and irqfd.
pub const MAX_MSI_ROUTES: usize = 512;

/// The routes this VM installed and the irqfd behind each MSI message.
#[derive(Default)]
pub struct MsiRoutes {
    routes: HashMap<(u64, u32), EventFd>,
    entries: Vec<kvm_irq_routing_entry>,
    /// Set after a routing failure: everything goes through KVM_SIGNAL_MSI.
    disabled: bool,
}

fn irqchip_entry(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

/// The routes KVM sets up by itself for the in-kernel irqchip.
fn default_entries() -> Vec<kvm_irq_routing_entry> {
    let mut v = Vec::new();
    for gsi in 0..IOAPIC_PINS {
        if gsi < 8 {
            v.push(irqchip_entry(gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
        } else if gsi < 16 {
            v.push(irqchip_entry(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
        }
        v.push(irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    v
}

fn msi_entry(gsi: u32, addr: u64, data: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    e.u.msi.address_lo = addr as u32;
    e.u.msi.address_hi = (addr >> 32) as u32;
    e.u.msi.data = data;
    e
}

impl MsiRoutes {
    /// How many MSI messages have their own route, and whether routing
    /// was given up after an error.
    #[cfg(test)]
    pub fn stats(&self) -> (usize, bool) {
        (self.routes.len(), self.disabled)
    }

    /// Signal (addr, data) through its irqfd, making the route first if
    /// needed. `Ok(false)`: no route for it (table full or routing failed
    /// before); the caller uses KVM_SIGNAL_MSI.
    pub fn signal(&mut self, vm: &VmFd, addr: u64, data: u32) -> std::io::Result<bool> {
        if let Some(e) = self.routes.get(&(addr, data)) {
            e.write(1)?;
            return Ok(true);
        }
        if self.disabled || self.routes.len() >= MAX_MSI_ROUTES {
            return Ok(false);
        }
        match self.add(vm, addr, data) {
            Ok(e) => {
                e.write(1)?;
                Ok(true)
            }
            Err(err) => {
                tracing::warn!("MSI routing through irqfd failed ({err}); using KVM_SIGNAL_MSI");
                self.disabled = true;
                Ok(false)
            }
        }
    }

    fn add(&mut self, vm: &VmFd, addr: u64, data: u32) -> std::io::Result<&EventFd> {
        if self.entries.is_empty() {
            self.entries = default_entries();
        }
        let gsi = IOAPIC_PINS + self.routes.len() as u32;
        let mut entries = self.entries.clone();
        entries.push(msi_entry(gsi, addr, data));
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|e| std::io::Error::other(format!("routing table: {e:?}")))?;
        vm.set_gsi_routing(&table)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        self.entries = entries;
        let evt = EventFd::new(libc::EFD_NONBLOCK)?;
        vm.register_irqfd(&evt, gsi)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        Ok(self.routes.entry((addr, data)).or_insert(evt))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_table_matches_kvms_own() {
        let e = default_entries();
        // 16 PIC pins and 24 IOAPIC pins.
        assert_eq!(e.len(), 40);
        // SAFETY: reading the union as irqchip: every entry is of that kind.
        let pins: Vec<(u32, u32, u32)> = e
            .iter()
            .map(|x| unsafe { (x.gsi, x.u.irqchip.irqchip, x.u.irqchip.pin) })
            .collect();
        assert!(pins.contains(&(2, KVM_IRQCHIP_PIC_MASTER, 2)));
        assert!(pins.contains(&(12, KVM_IRQCHIP_PIC_SLAVE, 4)));
        assert!(pins.contains(&(23, KVM_IRQCHIP_IOAPIC, 23)));
        assert!(!pins.iter().any(|p| p.0 >= 16 && p.1 != KVM_IRQCHIP_IOAPIC));
    }

    #[test]
    fn msi_entries_carry_the_message() {
        let e = msi_entry(30, 0x1_fee0_1000, 0x4041);
        assert_eq!(e.type_, KVM_IRQ_ROUTING_MSI);
        // SAFETY: an MSI entry.
        let m = unsafe { e.u.msi };
        assert_eq!(
            (m.address_lo, m.address_hi, m.data),
            (0xfee0_1000, 1, 0x4041)
        );
    }
}
