//! The PC interrupt and timer platform for N vCPUs: one local APIC per vCPU,
//! one I/O APIC, the 8259 pair and the 8254, wired together as on a PIIX
//! class machine.
//!
//! - ISA IRQs go to both the PIC and the I/O APIC (IRQ0 to GSI 2 by default,
//!   matching the interrupt source override ACPI tables normally declare).
//! - The PIC's INT output reaches vCPU 0 through LINT0 when that is in
//!   ExtINT mode (virtual wire) or when vCPU 0's APIC is globally disabled.
//! - I/O APIC messages and IPIs are routed to local APICs by physical or
//!   logical (flat or cluster) destination, with the ICR shorthands;
//!   lowest-priority delivery picks the matching APIC with the lowest TPR,
//!   ties going to the lowest vCPU index.
//! - Level-triggered EOIs from local APICs are broadcast to the I/O APIC.
//!
//! The engine calls [`Platform::tick`] with the current guest time whenever it
//! gets the chance (and at [`Platform::next_deadline_ns`] when all vCPUs
//! halt), and [`Platform::pending_vector`]/[`Platform::ack`] when a vCPU can
//! take an interrupt.

use serde::{Deserialize, Serialize};

use crate::ioapic::{Delivery, IoApic, IOAPIC_DEFAULT_BASE, IOAPIC_MMIO_SIZE};
use crate::lapic::{
    GpFault, IpiRequest, Lapic, LapicEvent, Shorthand, DEFAULT_BUS_HZ, LAPIC_MMIO_SIZE,
    MSR_IA32_APIC_BASE, MSR_IA32_TSC_DEADLINE, MSR_X2APIC_FIRST, MSR_X2APIC_LAST,
};
use crate::pic::Pic;
use crate::pit::Pit;
use crate::{DeliveryMode, DestMode, Trigger};

/// Platform construction parameters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlatformConfig {
    /// Number of vCPUs (and local APICs). APIC IDs equal vCPU indices.
    pub num_vcpus: usize,
    /// Local APIC timer input clock.
    pub apic_bus_hz: u64,
    /// Guest TSC frequency (for IA32_TSC_DEADLINE).
    pub tsc_hz: u64,
    /// Route ISA IRQ0 to I/O APIC pin 2 (the usual MADT override). When
    /// false, IRQ0 goes to pin 0.
    pub irq0_to_gsi2: bool,
}

impl Default for PlatformConfig {
    fn default() -> Self {
        PlatformConfig {
            num_vcpus: 1,
            apic_bus_hz: DEFAULT_BUS_HZ,
            tsc_hz: 1_000_000_000,
            irq0_to_gsi2: true,
        }
    }
}

/// Why a saved platform cannot replace a live one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreError {
    /// Not one local APIC per vCPU of the VM it is loaded into.
    ApicCount {
        lapics: usize,
        configured: usize,
        vcpus: usize,
    },
    /// A zero TSC or APIC bus rate (timers divide by them).
    ZeroRate,
}

impl std::fmt::Display for RestoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RestoreError::ApicCount {
                lapics,
                configured,
                vcpus,
            } => write!(
                f,
                "the saved platform has {lapics} local APICs (configured for {configured}), \
                 this VM has {vcpus} vCPUs"
            ),
            RestoreError::ZeroRate => {
                f.write_str("the saved platform has a zero TSC or APIC bus rate")
            }
        }
    }
}

impl std::error::Error for RestoreError {}

/// Interrupt controllers and timers of one VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Platform {
    config: PlatformConfig,
    lapics: Vec<Lapic>,
    ioapic: IoApic,
    pic: Pic,
    pit: Pit,
    /// vCPUs that received something (interrupt, NMI, INIT, SIPI) since the
    /// last `take_kicks`, one bit per vCPU index (first 64 vCPUs).
    kicks: u64,
}

impl Platform {
    /// Builds the platform. `num_vcpus` is clamped to 1..=255 (xAPIC IDs;
    /// 0xff is the broadcast ID so at most 255 APICs are addressable).
    pub fn new(config: PlatformConfig) -> Self {
        let mut config = config;
        config.num_vcpus = config.num_vcpus.clamp(1, 255);
        let lapics = (0..config.num_vcpus)
            .map(|i| Lapic::new(i as u32, i == 0, config.apic_bus_hz))
            .collect();
        let ioapic = IoApic::new(config_ioapic_id(config.num_vcpus));
        Platform {
            config,
            lapics,
            ioapic,
            pic: Pic::new(),
            pit: Pit::new(),
            kicks: 0,
        }
    }

    /// System reset (reset port, triple fault): every device back to its
    /// power-on state, same configuration.
    pub fn reset(&mut self) {
        *self = Platform::new(self.config.clone());
    }

    pub fn config(&self) -> &PlatformConfig {
        &self.config
    }

    /// Checks a state that came from outside (a snapshot file) before it
    /// replaces the state of a platform made for `num_vcpus` vCPUs: one
    /// local APIC per vCPU and clock rates that can divide.
    pub fn check_restorable(&self, num_vcpus: usize) -> Result<(), RestoreError> {
        if self.lapics.len() != num_vcpus || self.config.num_vcpus != num_vcpus {
            return Err(RestoreError::ApicCount {
                lapics: self.lapics.len(),
                configured: self.config.num_vcpus,
                vcpus: num_vcpus,
            });
        }
        if self.config.tsc_hz == 0 || self.config.apic_bus_hz == 0 {
            return Err(RestoreError::ZeroRate);
        }
        Ok(())
    }

    pub fn num_vcpus(&self) -> usize {
        self.lapics.len()
    }

    pub fn lapic(&self, vcpu: usize) -> Option<&Lapic> {
        self.lapics.get(vcpu)
    }

    pub fn lapic_mut(&mut self, vcpu: usize) -> Option<&mut Lapic> {
        self.lapics.get_mut(vcpu)
    }

    pub fn ioapic(&self) -> &IoApic {
        &self.ioapic
    }

    pub fn pic(&self) -> &Pic {
        &self.pic
    }

    pub fn pit(&self) -> &Pit {
        &self.pit
    }

    pub fn ioapic_mut(&mut self) -> &mut IoApic {
        &mut self.ioapic
    }

    pub fn pic_mut(&mut self) -> &mut Pic {
        &mut self.pic
    }

    pub fn pit_mut(&mut self) -> &mut Pit {
        &mut self.pit
    }

    /// Bitmask of vCPUs that got new work since the last call (bit i =
    /// vCPU i, first 64 vCPUs), for waking halted vCPU threads.
    pub fn take_kicks(&mut self) -> u64 {
        std::mem::take(&mut self.kicks)
    }

    fn kick(&mut self, vcpu: usize) {
        if vcpu < 64 {
            self.kicks |= 1 << vcpu;
        }
    }

    // ----- interrupt lines -------------------------------------------------

    /// Sets ISA IRQ line `irq` (0-15): feeds the PIC and the I/O APIC pin it
    /// is wired to.
    pub fn set_isa_irq(&mut self, irq: u8, level: bool) {
        if irq >= 16 {
            return;
        }
        self.pic.set_irq(irq, level);
        if self.pic.interrupt_output() {
            self.kick(0);
        }
        let gsi = if irq == 0 && self.config.irq0_to_gsi2 {
            2
        } else {
            irq as u32
        };
        self.set_gsi(gsi, level);
    }

    /// Sets I/O APIC input `gsi` (e.g. PCI INTx lines, GSI 16-23).
    pub fn set_gsi(&mut self, gsi: u32, level: bool) {
        if let Some(d) = self.ioapic.set_irq(gsi, level) {
            self.route_delivery(d);
        }
    }

    /// The ISA IRQ (PIC input) behind GSI `gsi`, if any: GSIs 0-15 are the
    /// ISA IRQs, except that with the IRQ0 override GSI 2 is IRQ0 and GSI 0
    /// has no ISA line; without it GSI 2 is the PIC cascade.
    fn isa_irq_for_gsi(&self, gsi: u32) -> Option<u8> {
        match gsi {
            16.. => None,
            0 if self.config.irq0_to_gsi2 => None,
            2 if self.config.irq0_to_gsi2 => Some(0),
            2 => None,
            g => Some(g as u8),
        }
    }

    /// Sets the level of GSI `gsi` as a device sees it: ISA GSIs also drive
    /// the PIC, higher GSIs only the I/O APIC.
    pub fn set_gsi_level(&mut self, gsi: u32, level: bool) {
        match self.isa_irq_for_gsi(gsi) {
            Some(irq) => self.set_isa_irq(irq, level),
            None => self.set_gsi(gsi, level),
        }
    }

    /// An edge on GSI `gsi` (raise then lower), e.g. a serial port interrupt.
    pub fn pulse_gsi(&mut self, gsi: u32) {
        self.set_gsi_level(gsi, true);
        self.set_gsi_level(gsi, false);
    }

    /// Raises and lowers an edge-triggered ISA IRQ.
    pub fn pulse_isa_irq(&mut self, irq: u8) {
        self.set_isa_irq(irq, true);
        self.set_isa_irq(irq, false);
    }

    // ----- routing ---------------------------------------------------------

    /// vCPU indices whose APIC matches a destination.
    fn targets(&self, dest: u32, mode: DestMode) -> Vec<usize> {
        (0..self.lapics.len())
            .filter(|&i| self.lapics[i].matches_dest(dest, mode))
            .collect()
    }

    /// Lowest-priority arbitration: lowest TPR wins, ties to the lowest
    /// vCPU index (deterministic, unlike hardware's rotating arbitration).
    fn lowest_priority(&self, targets: &[usize]) -> Option<usize> {
        targets
            .iter()
            .copied()
            .min_by_key(|&i| (self.lapics[i].tpr(), i))
    }

    fn deliver_to(&mut self, targets: &[usize], mode: DeliveryMode, vector: u8, trigger: Trigger) {
        let chosen: Vec<usize> = if mode == DeliveryMode::LowestPriority {
            self.lowest_priority(targets).into_iter().collect()
        } else {
            targets.to_vec()
        };
        for i in chosen {
            if self.lapics[i].deliver(mode, vector, trigger) {
                self.kick(i);
            }
        }
    }

    /// Routes an I/O APIC message to the local APICs.
    pub fn route_delivery(&mut self, d: Delivery) {
        let targets = self.targets(d.dest, d.dest_mode);
        if d.delivery_mode == DeliveryMode::ExtInt {
            // Virtual wire through the I/O APIC: the vector comes from the
            // PIC's INTA cycle, which pending_vector() performs for vCPU 0
            // when LINT0 accepts it. Other targets are not modelled.
            if targets.contains(&0) {
                self.kick(0);
            }
            return;
        }
        self.deliver_to(&targets, d.delivery_mode, d.vector, d.trigger);
    }

    /// vCPU `vcpu`'s xAPIC ID while its APIC is enabled in xAPIC mode
    /// (what a physical-mode MSI matches), else None.
    pub fn xapic_physical_id(&self, vcpu: usize) -> Option<u8> {
        let l = self.lapics.get(vcpu)?;
        (l.hw_enabled() && !l.x2apic_mode()).then_some(l.apic_id() as u8)
    }

    /// A fixed, edge-triggered interrupt message already routed to `vcpu`
    /// alone (an MSI that a device posted without the platform lock, see
    /// `SharedPlatform::signal_msi`): the APIC accepts it as
    /// [`Platform::route_delivery`] would have.
    pub fn accept_posted(&mut self, vcpu: usize, vector: u8) {
        if let Some(l) = self.lapics.get_mut(vcpu) {
            if l.deliver(DeliveryMode::Fixed, vector, Trigger::Edge) {
                self.kick(vcpu);
            }
        }
    }

    /// Routes an IPI sent by vCPU `source`.
    pub fn route_ipi(&mut self, source: usize, ipi: IpiRequest) {
        let n = self.lapics.len();
        let targets: Vec<usize> = match ipi.shorthand {
            Shorthand::None => self.targets(ipi.dest, ipi.dest_mode),
            Shorthand::SelfOnly => vec![source],
            Shorthand::AllIncludingSelf => (0..n).collect(),
            Shorthand::AllExcludingSelf => (0..n).filter(|&i| i != source).collect(),
        };
        let targets: Vec<usize> = targets.into_iter().filter(|&i| i < n).collect();
        self.deliver_to(&targets, ipi.delivery_mode, ipi.vector, ipi.trigger);
    }

    fn handle_lapic_event(&mut self, source: usize, ev: Option<LapicEvent>) {
        match ev {
            Some(LapicEvent::Ipi(ipi)) => self.route_ipi(source, ipi),
            Some(LapicEvent::EoiBroadcast(vector)) => {
                for d in self.ioapic.eoi(vector) {
                    self.route_delivery(d);
                }
            }
            None => {}
        }
    }

    // ----- CPU interrupt acceptance ---------------------------------------

    fn pic_feeds(&self, vcpu: usize) -> bool {
        vcpu == 0 && self.lapics[0].accepts_pic_interrupts() && self.pic.interrupt_output()
    }

    /// The external interrupt vector vCPU `vcpu` would take now (when its
    /// IF allows), without acknowledging it. A PIC interrupt through LINT0
    /// ExtINT takes precedence over APIC interrupts, as in KVM.
    pub fn pending_vector(&self, vcpu: usize) -> Option<u8> {
        if vcpu >= self.lapics.len() {
            return None;
        }
        if self.pic_feeds(vcpu) {
            return self.pic.pending();
        }
        self.lapics[vcpu].pending_vector()
    }

    /// The CPU delivers the interrupt `pending_vector` reported: performs
    /// the acknowledge (PIC INTA cycle or APIC IRR->ISR) and returns the
    /// vector to deliver, which can differ from `vector` if the state changed
    /// meanwhile (the PIC answers a vanished request with its spurious
    /// vector). `None` if nothing was pending.
    pub fn ack(&mut self, vcpu: usize, vector: u8) -> Option<u8> {
        if vcpu >= self.lapics.len() {
            return None;
        }
        if self.pic_feeds(vcpu) {
            return Some(self.pic.ack());
        }
        let lapic = &mut self.lapics[vcpu];
        let v = match lapic.pending_vector() {
            Some(p) if p == vector => vector,
            Some(p) => p,
            None => return None,
        };
        lapic.ack(v);
        Some(v)
    }

    /// Takes a pending NMI for `vcpu`.
    pub fn take_nmi(&mut self, vcpu: usize) -> bool {
        self.lapics.get_mut(vcpu).is_some_and(|l| l.take_nmi())
    }

    /// Takes a pending INIT for `vcpu` (the CPU enters wait-for-SIPI).
    pub fn take_init(&mut self, vcpu: usize) -> bool {
        self.lapics.get_mut(vcpu).is_some_and(|l| l.take_init())
    }

    /// Takes a received start-up vector for `vcpu`.
    pub fn take_startup(&mut self, vcpu: usize) -> Option<u8> {
        self.lapics.get_mut(vcpu).and_then(|l| l.take_startup())
    }

    /// Whether a halted `vcpu` has a reason to wake up: a deliverable
    /// interrupt (the caller still checks IF), NMI, INIT or SIPI.
    pub fn has_event(&self, vcpu: usize) -> bool {
        let Some(l) = self.lapics.get(vcpu) else {
            return false;
        };
        self.pending_vector(vcpu).is_some()
            || l.nmi_pending()
            || l.init_pending()
            || l.startup_pending()
    }

    // ----- time ------------------------------------------------------------

    /// Advances all timers to `now_ns`: raises IRQ0 for PIT edges (one
    /// pulse; missed ticks are coalesced) and expires local APIC timers.
    pub fn tick(&mut self, now_ns: u64) {
        if self.pit.irq0_edges(now_ns) > 0 {
            self.pulse_isa_irq(0);
        }
        for i in 0..self.lapics.len() {
            if self.lapics[i].tick(now_ns) {
                self.kick(i);
            }
        }
    }

    /// The earliest guest time at which a timer fires, so an idle engine
    /// can sleep until then.
    pub fn next_deadline_ns(&self) -> Option<u64> {
        let lapic = self
            .lapics
            .iter()
            .filter_map(|l| l.next_timer_deadline())
            .min();
        match (lapic, self.pit.next_event_ns()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The next deadline of one vCPU's APIC timer (its own wake-up time
    /// when each vCPU thread sleeps separately).
    pub fn next_lapic_deadline_ns(&self, vcpu: usize) -> Option<u64> {
        self.lapics.get(vcpu).and_then(|l| l.next_timer_deadline())
    }

    // ----- port and MMIO dispatch ------------------------------------------

    fn owns_port(port: u16) -> bool {
        Pic::handles_port(port) || Pit::handles_port(port)
    }

    /// Port read. Returns false if no device here decodes `port` (the caller
    /// tries other devices). Multi-byte accesses read consecutive ports.
    pub fn pio_read(&mut self, port: u16, data: &mut [u8], now_ns: u64) -> bool {
        if !Self::owns_port(port) {
            return false;
        }
        for (i, b) in data.iter_mut().enumerate() {
            let p = port.wrapping_add(i as u16);
            *b = if Pic::handles_port(p) {
                self.pic.read_port(p)
            } else if Pit::handles_port(p) {
                self.pit.read_port(p, now_ns)
            } else {
                0xff
            };
        }
        true
    }

    /// Port write. Returns false if no device here decodes `port`.
    pub fn pio_write(&mut self, port: u16, data: &[u8], now_ns: u64) -> bool {
        if !Self::owns_port(port) {
            return false;
        }
        for (i, &b) in data.iter().enumerate() {
            let p = port.wrapping_add(i as u16);
            if Pic::handles_port(p) {
                self.pic.write_port(p, b);
                if self.pic.interrupt_output() {
                    self.kick(0);
                }
            } else if Pit::handles_port(p) {
                self.pit.write_port(p, b, now_ns);
            }
        }
        true
    }

    /// MMIO read by `vcpu` (the local APIC page is per-CPU). Returns false
    /// if the address is not decoded here.
    pub fn mmio_read(&mut self, vcpu: usize, addr: u64, data: &mut [u8], now_ns: u64) -> bool {
        if let Some(l) = self.lapics.get(vcpu) {
            if let Some(base) = l.mmio_base() {
                if addr >= base && addr - base < LAPIC_MMIO_SIZE {
                    l.read(addr - base, data, now_ns);
                    return true;
                }
            }
        }
        if (IOAPIC_DEFAULT_BASE..IOAPIC_DEFAULT_BASE + IOAPIC_MMIO_SIZE).contains(&addr) {
            self.ioapic.read(addr - IOAPIC_DEFAULT_BASE, data);
            return true;
        }
        false
    }

    /// MMIO write by `vcpu`. Returns false if the address is not decoded.
    pub fn mmio_write(&mut self, vcpu: usize, addr: u64, data: &[u8], now_ns: u64) -> bool {
        if let Some(l) = self.lapics.get_mut(vcpu) {
            if let Some(base) = l.mmio_base() {
                if addr >= base && addr - base < LAPIC_MMIO_SIZE {
                    let ev = l.write(addr - base, data, now_ns);
                    self.handle_lapic_event(vcpu, ev);
                    return true;
                }
            }
        }
        if (IOAPIC_DEFAULT_BASE..IOAPIC_DEFAULT_BASE + IOAPIC_MMIO_SIZE).contains(&addr) {
            if let Some(d) = self.ioapic.write(addr - IOAPIC_DEFAULT_BASE, data) {
                self.route_delivery(d);
            }
            return true;
        }
        false
    }

    /// RDMSR of the APIC-related MSRs. `None` if `msr` is not handled here;
    /// `Some(Err(GpFault))` means the guest gets #GP.
    pub fn rdmsr(&self, vcpu: usize, msr: u32, now_ns: u64) -> Option<Result<u64, GpFault>> {
        let l = self.lapics.get(vcpu)?;
        match msr {
            MSR_IA32_APIC_BASE => Some(Ok(l.apic_base())),
            MSR_IA32_TSC_DEADLINE => Some(Ok(l.tsc_deadline())),
            MSR_X2APIC_FIRST..=MSR_X2APIC_LAST => Some(l.read_msr(msr, now_ns)),
            _ => None,
        }
    }

    /// WRMSR of the APIC-related MSRs. `now_tsc` is the guest TSC at
    /// `now_ns` (used for IA32_TSC_DEADLINE).
    pub fn wrmsr(
        &mut self,
        vcpu: usize,
        msr: u32,
        value: u64,
        now_ns: u64,
        now_tsc: u64,
    ) -> Option<Result<(), GpFault>> {
        let tsc_hz = self.config.tsc_hz;
        let l = self.lapics.get_mut(vcpu)?;
        match msr {
            MSR_IA32_APIC_BASE => Some(l.write_apic_base(value)),
            MSR_IA32_TSC_DEADLINE => {
                l.set_tsc_deadline(value, now_ns, now_tsc, tsc_hz);
                Some(Ok(()))
            }
            MSR_X2APIC_FIRST..=MSR_X2APIC_LAST => {
                let r = l.write_msr(msr, value, now_ns);
                Some(r.map(|ev| self.handle_lapic_event(vcpu, ev)))
            }
            _ => None,
        }
    }
}

/// The I/O APIC gets the first ID after the local APICs, as firmware
/// usually assigns it (the 4-bit field wraps for large VMs, which only
/// matters to guests that check ID uniqueness on the APIC bus).
fn config_ioapic_id(num_vcpus: usize) -> u32 {
    (num_vcpus as u32) & 0xf
}
