//! The machine around the CPU, and the one interface the core has to it.
//!
//! The core ([`crate::core::Core`]) owns one `Box<dyn VcpuPlatform>` and
//! never asks which platform it has. It calls it:
//!
//! - at interrupt polls (its attention flag, STI/IRET/EOI, and every few
//!   blocks unless [`VcpuPlatform::kicks_on_events`]): [`VcpuPlatform::poll`] hands back the most urgent event (INIT,
//!   start-up IPI, NMI, an acknowledged interrupt vector);
//! - when the CPU is halted or waits for a start-up IPI:
//!   [`VcpuPlatform::idle`] sleeps until something can wake it, or says the
//!   VMM must wait instead;
//! - for port I/O and MMIO before they exit to the VMM: what the platform
//!   claims (its interrupt controllers and timers) never leaves the vCPU,
//!   and a write to a registered doorbell ([`notify::NotifyTable`]) signals
//!   its eventfd on the vCPU thread;
//! - for CR8, the MSRs the platform owns (APIC base, x2APIC, TSC deadline)
//!   and time (the guest TSC, kvmclock structures).
//!
//! Two implementations: the PC platform ([`crate::platform::pc::PcVcpu`]: LAPIC,
//! IOAPIC, PIC, PIT and kvmclock from `emu-platform`, which is what
//! `EmuHypervisor` makes) and [`ControllerLink`], a plain adapter over an
//! embedder's [`InterruptController`] (the tests' queue controller), whose
//! devices all live in the VMM and whose halts go to the VMM.
//!
//! Cost: one indirect call per poll, per platform-claimed device access and
//! per MSR/CR8/RDTSC; nothing per ordinary instruction.

pub mod irq;
pub mod notify;
pub mod pc;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use irq::{InterruptController, MsrFault};
use notify::NotifyTable;

/// What the core's interrupt state allows at a poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuView {
    pub vcpu: u32,
    /// RFLAGS.IF: maskable interrupts can be taken.
    pub if_set: bool,
    /// No NMI handler runs.
    pub nmi_ok: bool,
    /// The CPU waits for a start-up IPI.
    pub wait_for_sipi: bool,
    /// The guest was offered `KVM_FEATURE_PV_UNHALT`: another vCPU's
    /// `KVM_HC_KICK_CPU` can end a HLT, also one with IF=0.
    pub pv_unhalt: bool,
}

/// The most urgent thing the platform has for a vCPU, already taken from
/// it (acknowledged): the core must act on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    None,
    /// INIT: reset the CPU; `restart` runs it from the reset vector (a PC's
    /// bootstrap processor, as KVM does), else it waits for a start-up IPI.
    Init {
        restart: bool,
    },
    /// Start-up IPI with this vector (only while waiting for one).
    Sipi(u8),
    Nmi,
    /// A maskable interrupt with this vector (only when IF=1).
    Irq(u8),
}

/// What [`VcpuPlatform::idle`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idle {
    /// Something can wake the CPU: poll.
    Wake,
    /// Nothing this platform can wait for here: the VMM waits (HLT with
    /// IF=0, or a platform whose interrupts come from the VMM).
    Halt,
    /// The vCPU was kicked while it slept.
    Interrupted,
    /// A paravirtual kick (`KVM_HC_KICK_CPU`) for this halted CPU was
    /// pending or arrived: the HLT completes (the kick is consumed).
    Unhalt,
}

/// See the module documentation.
pub trait VcpuPlatform: Send {
    /// Take the most urgent event for `cpu` (cheap when nothing is pending).
    fn poll(&mut self, cpu: CpuView) -> Event;
    /// The CPU is halted or waits for SIPI: sleep until something can wake
    /// it, or until `kick` is set (which this swaps back to false).
    fn idle(&mut self, cpu: CpuView, kick: &AtomicBool) -> Idle;
    /// A port read the platform serves: `(value, repoll)`, where `repoll`
    /// says the read may have changed what is deliverable (a PIC poll).
    fn pio_in(&mut self, _port: u16, _size: u8) -> Option<(u64, bool)> {
        None
    }
    /// A port write the platform serves (the core polls after it).
    fn pio_out(&mut self, _port: u16, _size: u8, _data: u64) -> bool {
        false
    }
    /// An MMIO read the platform serves; `apic_base` is the vCPU's
    /// IA32_APIC_BASE (where its local APIC page is).
    fn mmio_read(&mut self, _vcpu: u32, _apic_base: u64, _addr: u64, _size: u8) -> Option<u64> {
        None
    }
    /// An MMIO write the platform serves (the core polls after it).
    fn mmio_write(
        &mut self,
        _vcpu: u32,
        _apic_base: u64,
        _addr: u64,
        _size: u8,
        _data: u64,
    ) -> bool {
        false
    }
    /// The guest wrote CR8.
    fn set_tpr(&self, _vcpu: u32, _cr8: u8) {}
    /// CR8 as the platform sees it (None: the core keeps CR8 itself).
    fn tpr(&self, _vcpu: u32) -> Option<u8> {
        None
    }
    /// RDMSR of an MSR the platform owns: None = not the platform's.
    fn rdmsr(&self, _vcpu: u32, _msr: u32) -> Option<Result<u64, MsrFault>> {
        None
    }
    /// WRMSR counterpart of [`VcpuPlatform::rdmsr`].
    fn wrmsr(&self, _vcpu: u32, _msr: u32, _value: u64) -> Option<Result<(), MsrFault>> {
        None
    }
    /// The guest TSC when the platform owns guest time (None: the core
    /// uses the host TSC plus an offset).
    fn guest_tsc(&self) -> Option<u64> {
        None
    }
    /// kvmclock's `pvclock_vcpu_time_info` for `vcpu` as of now (None: no
    /// kvmclock; the MSR write raises #GP).
    fn pvclock_time_info(&self, _vcpu: u32) -> Option<[u8; 32]> {
        None
    }
    /// kvmclock's `pvclock_wall_clock` as of now.
    fn pvclock_wall_clock(&self) -> Option<[u8; 12]> {
        None
    }
    /// The VMM loads IA32_APIC_BASE (special registers, a restore): the
    /// base the platform then has, if it keeps one and it changed.
    fn load_apic_base(&mut self, _vcpu: u32, _value: u64) -> Option<u64> {
        None
    }
    /// Something to notify so a sleeping [`VcpuPlatform::idle`] returns
    /// (the vCPU's kicker calls it after setting the kick flag).
    fn waker(&self) -> Option<Arc<dyn Fn() + Send + Sync>> {
        None
    }
    /// `KVM_HC_KICK_CPU`: mark the vCPU with physical APIC ID `apic_id`
    /// (guest-controlled: one that matches no vCPU is ignored) as
    /// "paravirtually unhalted" and wake it. The mark stays until a HLT of
    /// that vCPU completes, so a kick that comes before the HLT is not
    /// lost. A platform without vCPU-to-vCPU wake-ups ignores it.
    fn pv_kick(&self, _apic_id: u64) {}
    /// This vCPU's pending paravirtual kick (see [`VcpuPlatform::pv_kick`]),
    /// if the platform keeps one: the core clears it when a HLT completes
    /// for another reason, snapshots carry it.
    fn pv_unhalted(&self) -> Option<&AtomicBool> {
        None
    }
    /// Times this vCPU slept in [`VcpuPlatform::idle`] (statistics: a vCPU
    /// that spun instead of sleeping would count thousands per millisecond).
    fn sleeps(&self) -> u64 {
        0
    }
    /// Every event for this vCPU, timer deadlines included, sets its
    /// attention flag (`Core::attention`): the core then polls only when
    /// asked and never reads the clock between blocks. False: something
    /// may become pending silently (an embedder's controller, a timer
    /// nobody ticks), so the core also polls every few blocks.
    fn kicks_on_events(&self) -> bool {
        false
    }
}

/// A vCPU's link to an embedder's [`InterruptController`]: interrupts,
/// NMI, INIT and SIPI come from it; every device access exits to the VMM;
/// a halted CPU returns to the VMM unless an interrupt is already there.
pub struct ControllerLink {
    intc: Arc<dyn InterruptController>,
    /// The VM's doorbells (empty unless the VMM registered some).
    notify: Arc<NotifyTable>,
}

impl ControllerLink {
    pub fn new(intc: Arc<dyn InterruptController>) -> Self {
        Self::with_notify(intc, Arc::default())
    }

    /// A link whose MMIO writes to `notify`'s addresses signal their
    /// eventfds instead of exiting.
    pub fn with_notify(intc: Arc<dyn InterruptController>, notify: Arc<NotifyTable>) -> Self {
        ControllerLink { intc, notify }
    }
}

impl VcpuPlatform for ControllerLink {
    fn poll(&mut self, cpu: CpuView) -> Event {
        let i = cpu.vcpu;
        if self.intc.take_init(i) {
            return Event::Init { restart: false };
        }
        if cpu.wait_for_sipi {
            return self.intc.take_startup(i).map_or(Event::None, Event::Sipi);
        }
        if cpu.nmi_ok && self.intc.take_nmi(i) {
            return Event::Nmi;
        }
        if !cpu.if_set {
            return Event::None;
        }
        match self.intc.pending_vector(i) {
            Some(v) => self.intc.ack(i, v).map_or(Event::None, Event::Irq),
            None => Event::None,
        }
    }

    fn idle(&mut self, _cpu: CpuView, _kick: &AtomicBool) -> Idle {
        // The poll just before found nothing to take: the VMM waits for
        // its devices and runs the vCPU again.
        Idle::Halt
    }

    fn mmio_write(
        &mut self,
        _vcpu: u32,
        _apic_base: u64,
        addr: u64,
        _size: u8,
        _data: u64,
    ) -> bool {
        self.notify.signal(addr)
    }

    fn set_tpr(&self, vcpu: u32, cr8: u8) {
        self.intc.set_tpr(vcpu, cr8)
    }

    fn tpr(&self, vcpu: u32) -> Option<u8> {
        self.intc.tpr(vcpu)
    }

    fn rdmsr(&self, vcpu: u32, msr: u32) -> Option<Result<u64, MsrFault>> {
        self.intc.rdmsr(vcpu, msr)
    }

    fn wrmsr(&self, vcpu: u32, msr: u32, value: u64) -> Option<Result<(), MsrFault>> {
        self.intc.wrmsr(vcpu, msr, value)
    }

    fn guest_tsc(&self) -> Option<u64> {
        self.intc.guest_tsc()
    }

    fn pvclock_time_info(&self, vcpu: u32) -> Option<[u8; 32]> {
        self.intc.pvclock_time_info(vcpu)
    }

    fn pvclock_wall_clock(&self) -> Option<[u8; 12]> {
        self.intc.pvclock_wall_clock()
    }
}
