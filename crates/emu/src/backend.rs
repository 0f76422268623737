//! The `hypervisor` seam for the engine: `EmuHypervisor`, `EmuVm`, `EmuVcpu`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use hypervisor::{
    AccelKind, Hypervisor, HypervisorError, InternalError, IrqLine, Result, SpecialRegs,
    StandardRegs, Vcpu, VcpuExit, VcpuKicker, VcpuSnapshot, Vm, VmSnapshot,
};

use crate::core::{Core, ExitReq, ReadResponse, RunExit};
use crate::cpu::*;
use crate::jit::JitConfig;
use crate::memory::mem::{MemView, PhysMem};
use crate::platform::irq::{InterruptController, QueueInterruptController};
use crate::platform::notify::NotifyTable;
use crate::platform::pc::{Pc, PcBoard, PcVcpu};
use crate::platform::ControllerLink;
use crate::state::{EmuFpuState, EmuMsrs, EmuPendingRead, EmuVcpuState, EmuVmState};
use vmm_sys_util::eventfd::EventFd;

/// The software CPU engine as a hypervisor backend.
#[derive(Default)]
pub struct EmuHypervisor {
    jit: JitConfig,
}

impl EmuHypervisor {
    /// The engine with the translator's default settings.
    pub fn new() -> Self {
        Self::default()
    }

    /// The engine with the given translator settings for every VM it makes.
    pub fn with_jit(jit: JitConfig) -> Self {
        EmuHypervisor { jit }
    }
}

impl Hypervisor for EmuHypervisor {
    fn kind(&self) -> AccelKind {
        AccelKind::Emu
    }

    fn create_vm(&self) -> Result<Arc<dyn Vm>> {
        let vm = EmuVm::new_pc();
        vm.set_jit_config(self.jit);
        Ok(Arc::new(vm))
    }

    fn supported_cpuid(&self) -> Result<Vec<hypervisor::CpuidEntry>> {
        let cfg = crate::platform::pc::cpuid_config();
        Ok(hypervisor::cpuid::recorded(|leaf, sub| {
            Some(crate::cpuid::cpuid(&cfg, 0, leaf, sub))
        }))
    }
}

pub struct EmuVm {
    mem: Arc<PhysMem>,
    intc: RwLock<Arc<dyn InterruptController>>,
    cpuid: RwLock<crate::cpuid::CpuidConfig>,
    /// The PC platform (a PC-mode VM, see [`EmuVm::new_pc`]).
    pc: Option<Arc<PcBoard>>,
    /// Memory slot number -> guest address of its region (dirty logs).
    slots: std::sync::Mutex<Vec<(u32, u64)>>,
    /// Doorbell addresses every vCPU signals without an exit
    /// (`register_mmio_notify`).
    notify: Arc<NotifyTable>,
    /// Translator settings for the vCPUs made from now on.
    jit: RwLock<JitConfig>,
}

impl Default for EmuVm {
    fn default() -> Self {
        Self::new()
    }
}

impl EmuVm {
    /// A VM with the stand-in queue controller (GSI n -> vector 0x20 + n).
    pub fn new() -> Self {
        EmuVm {
            mem: PhysMem::new(),
            intc: RwLock::new(Arc::new(QueueInterruptController::new(0x20))),
            cpuid: RwLock::new(Default::default()),
            pc: None,
            slots: Default::default(),
            notify: Default::default(),
            jit: Default::default(),
        }
    }

    /// A PC: LAPIC per vCPU, IOAPIC, 8259 pair, 8254 PIT and kvmclock inside
    /// the engine (see [`crate::platform::pc`]); what `EmuHypervisor` makes. The
    /// platform is sized when the first vCPU is made
    /// ([`EmuVm::create_pc_vcpu`] / `Vm::create_vcpu`).
    pub fn new_pc() -> Self {
        let board = Arc::new(PcBoard::new());
        EmuVm {
            mem: PhysMem::new(),
            intc: RwLock::new(board.clone()),
            cpuid: RwLock::new(crate::platform::pc::cpuid_config()),
            pc: Some(board),
            slots: Default::default(),
            notify: Default::default(),
            jit: Default::default(),
        }
    }

    /// The guest-physical address memory slot `slot` was mapped at.
    fn slot_gpa(&self, slot: u32) -> Option<u64> {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|&&(s, _)| s == slot)
            .map(|&(_, g)| g)
    }

    /// The platform of a PC-mode VM, once its first vCPU exists.
    pub fn platform(&self) -> Option<Arc<Pc>> {
        self.pc.as_ref()?.get().cloned()
    }

    /// Make vCPU `index` of `count` in a PC-mode VM; the first call creates
    /// the platform with `count` local APICs. Application processors start
    /// in wait-for-SIPI.
    pub fn create_pc_vcpu(&self, index: u32, count: u32) -> Result<EmuVcpu> {
        let board = self
            .pc
            .as_ref()
            .ok_or_else(|| HypervisorError::Other("not a PC-mode VM".into()))?;
        let pc = board.get_or_create(count);
        let mut link = PcVcpu::new(pc.clone(), index).ok_or_else(|| {
            HypervisorError::Other(format!(
                "vCPU {index} does not exist: the platform has {} local APICs",
                pc.num_vcpus()
            ))
        })?;
        link.notify = self.notify.clone();
        let cpuid = *self.cpuid.read().unwrap_or_else(|e| e.into_inner());
        let attention = link.signal.attention().clone();
        let mut core =
            Core::with_platform(index, MemView::new(self.mem.clone()), Box::new(link), cpuid);
        // The engine's copy of IA32_APIC_BASE (the LAPIC page it decodes,
        // what get_sregs reports) starts as the platform's: BSP bit on
        // vCPU 0 only.
        if let Some(Ok(base)) = pc.shared().rdmsr(index, crate::msr::IA32_APIC_BASE) {
            core.st.msr.apic_base = base;
        }
        // The platform's kicks set the flag the run loop polls on.
        core.attention = attention;
        // Application processors do not run before INIT and SIPI.
        core.wait_for_sipi = index != 0;
        core.jit.configure(self.jit_config());
        Ok(EmuVcpu {
            core,
            buf: [0; 8],
            pending_read: None,
            republish_pvclock: false,
        })
    }

    /// What CPUID advertises for hardware the embedder provides (APIC, ...).
    /// Like the controller, set it before creating vCPUs.
    pub fn set_cpuid_config(&self, cfg: crate::cpuid::CpuidConfig) {
        *self.cpuid.write().unwrap_or_else(|e| e.into_inner()) = cfg;
    }

    /// Translator settings (threshold, perf map) for vCPUs created after
    /// this call.
    pub fn set_jit_config(&self, cfg: JitConfig) {
        *self.jit.write().unwrap_or_else(|e| e.into_inner()) = cfg;
    }

    pub fn jit_config(&self) -> JitConfig {
        *self.jit.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Plug in the platform's interrupt controllers. Must happen before the
    /// vCPUs are created: each vCPU keeps the controller it was made with.
    pub fn set_interrupt_controller(&self, intc: Arc<dyn InterruptController>) {
        *self.intc.write().unwrap_or_else(|e| e.into_inner()) = intc;
    }

    pub fn interrupt_controller(&self) -> Arc<dyn InterruptController> {
        self.intc.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn phys_mem(&self) -> &Arc<PhysMem> {
        &self.mem
    }

    /// Make a vCPU with its concrete type (tests and the lead's wiring).
    pub fn create_emu_vcpu(&self, index: u32) -> EmuVcpu {
        let cpuid = *self.cpuid.read().unwrap_or_else(|e| e.into_inner());
        let mut core = Core::with_platform(
            index,
            MemView::new(self.mem.clone()),
            Box::new(ControllerLink::with_notify(
                self.interrupt_controller(),
                self.notify.clone(),
            )),
            cpuid,
        );
        core.jit.configure(self.jit_config());
        EmuVcpu {
            core,
            buf: [0; 8],
            pending_read: None,
            republish_pvclock: false,
        }
    }
}

/// Device writes make decoded code of the pages they touch stale
/// (`Region::device_wrote`).
impl hypervisor::DeviceWriteWatch for crate::memory::mem::Region {
    fn device_wrote(&self, offset: usize, len: usize) {
        crate::memory::mem::Region::device_wrote(self, offset, len)
    }
}

impl Vm for EmuVm {
    unsafe fn map_memory(
        &self,
        slot: u32,
        guest_addr: u64,
        size: u64,
        host_addr: u64,
    ) -> Result<()> {
        if size == 0 || guest_addr.checked_add(size).is_none() {
            return Err(HypervisorError::Other(format!(
                "bad memory region {guest_addr:#x}+{size:#x}"
            )));
        }
        // SAFETY: forwarded from the caller's `map_memory` contract.
        unsafe { self.mem.map(guest_addr, size, host_addr as *mut u8) };
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.retain(|&(s, _)| s != slot);
        slots.push((slot, guest_addr));
        Ok(())
    }

    fn device_write_watch(&self, slot: u32) -> Option<Arc<dyn hypervisor::DeviceWriteWatch>> {
        let gpa = self.slot_gpa(slot)?;
        let region = self.mem.snapshot().iter().find(|r| r.gpa == gpa)?.clone();
        Some(region)
    }

    fn start_dirty_log(&self) -> Result<()> {
        for r in self.mem.snapshot().iter() {
            r.collect_dirty();
        }
        Ok(())
    }

    fn dirty_log(&self, slot: u32) -> Result<Vec<u64>> {
        let gpa = self
            .slot_gpa(slot)
            .ok_or_else(|| HypervisorError::Other(format!("no memory slot {slot}")))?;
        self.mem
            .snapshot()
            .iter()
            .find(|r| r.gpa == gpa)
            .map(|r| r.collect_dirty())
            .ok_or_else(|| HypervisorError::Other(format!("no memory slot {slot}")))
    }

    fn stop_dirty_log(&self) -> Result<()> {
        for r in self.mem.snapshot().iter() {
            r.stop_tracking();
        }
        Ok(())
    }

    fn create_vcpu(&self, index: u32, count: u32) -> Result<Box<dyn Vcpu>> {
        if self.pc.is_some() {
            return Ok(Box::new(self.create_pc_vcpu(index, count)?));
        }
        Ok(Box::new(self.create_emu_vcpu(index)))
    }

    fn signal_msi(&self, addr: u64, data: u32) -> Result<()> {
        self.interrupt_controller().signal_msi(addr, data);
        Ok(())
    }

    /// Doorbells are signalled on the vCPU thread (see
    /// [`crate::platform::notify`]), for vCPUs made before or after.
    fn register_mmio_notify(&self, addr: u64, event: &EventFd) -> Result<bool> {
        self.notify
            .register(addr, event)
            .map_err(|e| HypervisorError::Other(e.to_string()))?;
        Ok(true)
    }

    fn unregister_mmio_notify(&self, addr: u64, _event: &EventFd) -> Result<()> {
        // One eventfd per address (register refuses a second), so the
        // address names the registration.
        self.notify.unregister(addr);
        Ok(())
    }

    fn irq_line(&self, gsi: u32) -> Result<Arc<dyn IrqLine>> {
        Ok(Arc::new(EmuIrqLine {
            intc: self.interrupt_controller(),
            gsi,
        }))
    }

    fn set_guest_cpuid(&self, entries: &[hypervisor::CpuidEntry]) -> Result<()> {
        // The engine cannot show what it lacks; it hides what the guest
        // is not to see.
        let mut cfg = *self.cpuid.read().unwrap_or_else(|e| e.into_inner());
        cfg.hidden = Default::default();
        let reg = |leaf: u32| {
            let full = crate::cpuid::cpuid(&cfg, 0, leaf, 0);
            let given = entries
                .iter()
                .find(|e| e.function == leaf && e.index == 0)
                .map_or([0; 4], |e| [e.eax, e.ebx, e.ecx, e.edx]);
            (full[2] & !given[2], full[3] & !given[3])
        };
        let (leaf1_ecx, leaf1_edx) = reg(1);
        let (ext1_ecx, ext1_edx) = reg(0x8000_0001);
        // KVM's paravirtual features (PV_UNHALT among them): a guest that
        // booted without one does not get it behind its back.
        let kvm_features = {
            let full = crate::cpuid::cpuid(&cfg, 0, 0x4000_0001, 0)[0];
            let sig = |l: u32| entries.iter().find(|e| e.function == l && e.index == 0);
            let kvm = sig(0x4000_0000)
                .is_some_and(|e| e.ebx == u32::from_le_bytes(*b"KVMK") && e.eax >= 0x4000_0001);
            let given = if kvm {
                sig(0x4000_0001).map_or(0, |e| e.eax)
            } else {
                0
            };
            full & !given
        };
        cfg.hidden = crate::cpuid::Hidden {
            leaf1_ecx,
            leaf1_edx,
            ext1_ecx,
            ext1_edx,
            kvm_features,
        };
        *self.cpuid.write().unwrap_or_else(|e| e.into_inner()) = cfg;
        Ok(())
    }

    fn save_state(&self) -> Result<VmSnapshot> {
        let pc = self.platform().ok_or_else(|| {
            HypervisorError::Other(
                "VM state: only a PC-mode VM with its vCPUs made can be saved".into(),
            )
        })?;
        Ok(pc.save().to_snapshot()?)
    }

    fn restore_state(&self, state: &VmSnapshot) -> Result<()> {
        let s = EmuVmState::try_from(state)?;
        let pc = self.platform().ok_or_else(|| {
            HypervisorError::Other("VM state: make the vCPUs before restoring the platform".into())
        })?;
        pc.restore(s).map_err(VmSnapshot::invalid)?;
        Ok(())
    }
}

fn split128(v: u128) -> [u64; 2] {
    [v as u64, (v >> 64) as u64]
}

fn join128(v: [u64; 2]) -> u128 {
    v[0] as u128 | (v[1] as u128) << 64
}

struct EmuIrqLine {
    intc: Arc<dyn InterruptController>,
    gsi: u32,
}

impl IrqLine for EmuIrqLine {
    fn trigger(&self) -> Result<()> {
        self.intc.trigger_gsi(self.gsi);
        Ok(())
    }
}

struct EmuKicker {
    flag: Arc<AtomicBool>,
    /// The core's attention flag, set after `flag`: chained translated
    /// code tests only this word (see `Core::attention`).
    attention: Arc<AtomicBool>,
    /// Wakes the vCPU from a sleep in HLT (a platform that sleeps there).
    waker: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl VcpuKicker for EmuKicker {
    fn kick(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.attention.store(true, Ordering::SeqCst);
        if let Some(w) = &self.waker {
            w();
        }
    }
}

impl EmuVcpu {
    /// The VMM's answer to read `req`, as the core takes it.
    fn response(&self, req: ExitReq) -> ReadResponse {
        let (is_io, addr, size) = match req {
            ExitReq::IoIn { port, size } => (true, port as u64, size),
            ExitReq::MmioRead { addr, size } => (false, addr, size),
            _ => (false, u64::MAX, 0),
        };
        ReadResponse {
            is_io,
            addr,
            size,
            data: u64::from_le_bytes(self.buf),
        }
    }
}

pub struct EmuVcpu {
    core: Core,
    /// Data of the current I/O or MMIO exit.
    buf: [u8; 8],
    /// A read exit whose data the VMM fills in `buf` before the next run.
    pending_read: Option<ExitReq>,
    /// A restored guest's kvmclock structure is written afresh before it
    /// runs again (as KVM does after KVM_SET_CLOCK): it may come from
    /// another accelerator, with another TSC rate.
    republish_pvclock: bool,
}

impl EmuVcpu {
    pub fn core(&self) -> &Core {
        &self.core
    }

    pub fn core_mut(&mut self) -> &mut Core {
        &mut self.core
    }

    /// Park this vCPU in wait-for-SIPI (application processors at power-on):
    /// `run` returns `Halt` until the interrupt controller delivers INIT and
    /// a start-up IPI.
    pub fn set_wait_for_sipi(&mut self, wait: bool) {
        self.core.wait_for_sipi = wait;
    }

    /// Set this flag (from any thread) after making an interrupt pending
    /// for this vCPU: it polls its controller at the next block boundary
    /// (on a platform without a timer source, it also polls within
    /// `POLL_INTERVAL` blocks). It does not end `run`.
    pub fn irq_attention(&self) -> Arc<AtomicBool> {
        self.core.attention.clone()
    }

    fn internal_error(&mut self, reason: String, rip: u64) -> Box<InternalError> {
        let lin = self.core.rip_lin();
        let mut insn = Vec::new();
        for i in 0..15 {
            match self.core.read_lin(lin.wrapping_add(i), 1, false) {
                Ok(b) => insn.push(b as u8),
                Err(_) => break,
            }
        }
        self.core.io.request = None;
        Box::new(InternalError {
            reason,
            rip,
            insn,
            regs: self.get_regs().ok(),
            sregs: self.get_sregs().ok(),
        })
    }
}

impl Vcpu for EmuVcpu {
    fn index(&self) -> u32 {
        self.core.index
    }

    fn run(&mut self) -> Result<VcpuExit<'_>> {
        if std::mem::take(&mut self.republish_pvclock) {
            let v = self.core.st.msr.kvm_system_time;
            if crate::msr::write(&mut self.core, crate::msr::MSR_KVM_SYSTEM_TIME_NEW, v).is_err() {
                tracing::warn!(
                    "vCPU {}: kvmclock structure at {:#x} could not be rewritten",
                    self.core.index,
                    v & !1
                );
            }
        }
        if let Some(req) = self.pending_read.take() {
            self.core.io.response = Some(self.response(req));
        }
        let exit = self.core.run();
        self.core.publish_stats();
        match exit {
            RunExit::Io(req) => {
                self.buf = [0; 8];
                match req {
                    ExitReq::IoIn { port, size } => {
                        self.pending_read = Some(req);
                        Ok(VcpuExit::IoIn {
                            port,
                            data: &mut self.buf[..size as usize],
                        })
                    }
                    ExitReq::IoOut { port, size, data } => {
                        self.buf = data.to_le_bytes();
                        Ok(VcpuExit::IoOut {
                            port,
                            data: &self.buf[..size as usize],
                        })
                    }
                    ExitReq::MmioRead { addr, size } => {
                        self.pending_read = Some(req);
                        Ok(VcpuExit::MmioRead {
                            addr,
                            data: &mut self.buf[..size as usize],
                        })
                    }
                    ExitReq::MmioWrite { addr, size, data } => {
                        self.buf = data.to_le_bytes();
                        Ok(VcpuExit::MmioWrite {
                            addr,
                            data: &self.buf[..size as usize],
                        })
                    }
                }
            }
            RunExit::Halt => Ok(VcpuExit::Halt),
            RunExit::Shutdown => Ok(VcpuExit::Shutdown),
            RunExit::Interrupted => Ok(VcpuExit::Interrupted),
            RunExit::Internal { reason, rip } => {
                Ok(VcpuExit::InternalError(self.internal_error(reason, rip)))
            }
            RunExit::Debug(stop) => Ok(VcpuExit::Debug(stop)),
        }
    }

    fn get_regs(&self) -> Result<StandardRegs> {
        let g = &self.core.st.gpr;
        Ok(StandardRegs {
            rax: g[0],
            rcx: g[1],
            rdx: g[2],
            rbx: g[3],
            rsp: g[4],
            rbp: g[5],
            rsi: g[6],
            rdi: g[7],
            r8: g[8],
            r9: g[9],
            r10: g[10],
            r11: g[11],
            r12: g[12],
            r13: g[13],
            r14: g[14],
            r15: g[15],
            rip: self.core.st.rip,
            rflags: self.core.st.get_rflags(),
        })
    }

    fn set_regs(&mut self, r: &StandardRegs) -> Result<()> {
        self.core.st.gpr = [
            r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ];
        self.core.st.rip = r.rip;
        self.core.st.set_rflags(r.rflags);
        // Loading registers means "continue from here": a halted vCPU (or
        // one that was waiting for I/O data) starts afresh.
        self.core.halted = false;
        self.core.int_shadow = false;
        self.pending_read = None;
        self.core.io = Default::default();
        Ok(())
    }

    fn get_sregs(&self) -> Result<SpecialRegs> {
        let st = &self.core.st;
        Ok(SpecialRegs {
            cs: st.seg[CS],
            ds: st.seg[DS],
            es: st.seg[ES],
            fs: st.seg[FS],
            gs: st.seg[GS],
            ss: st.seg[SS],
            tr: st.tr,
            ldt: st.ldt,
            gdt: st.gdt,
            idt: st.idt,
            cr0: st.cr0,
            cr2: st.cr2,
            cr3: st.cr3,
            cr4: st.cr4,
            cr8: st.cr8,
            efer: st.efer,
            apic_base: st.msr.apic_base,
        })
    }

    fn set_sregs(&mut self, s: &SpecialRegs) -> Result<()> {
        let st = &mut self.core.st;
        st.seg[CS] = s.cs;
        st.seg[DS] = s.ds;
        st.seg[ES] = s.es;
        st.seg[FS] = s.fs;
        st.seg[GS] = s.gs;
        st.seg[SS] = s.ss;
        st.tr = s.tr;
        st.ldt = s.ldt;
        st.gdt = s.gdt;
        st.idt = s.idt;
        st.cr0 = s.cr0 | CR0_ET;
        st.cr2 = s.cr2;
        st.cr3 = s.cr3;
        st.cr4 = s.cr4;
        st.cr8 = s.cr8;
        st.efer = s.efer;
        if s.apic_base != 0 {
            st.msr.apic_base = s.apic_base;
            self.core.load_apic_base(s.apic_base);
        }
        // In long mode CS.dpl is the CPL; a boot state may leave it zero, which
        // is what we want for ring 0 entry.
        self.core.tlb.flush_all();
        Ok(())
    }

    fn save_state(&self) -> Result<VcpuSnapshot> {
        let st = &self.core.st;
        let m = &st.msr;
        let pending_read = self.pending_read.map(|req| {
            let data = u64::from_le_bytes(self.buf);
            match req {
                ExitReq::IoIn { port, size } => EmuPendingRead::Io { port, size, data },
                ExitReq::MmioRead { addr, size } => EmuPendingRead::Mmio { addr, size, data },
                // Only reads are ever pending.
                ExitReq::IoOut { port, size, .. } => EmuPendingRead::Io { port, size, data },
                ExitReq::MmioWrite { addr, size, .. } => EmuPendingRead::Mmio { addr, size, data },
            }
        });
        // A read answered but not yet consumed by the rerun instruction (the
        // run was interrupted first) is the same thing seen a step later.
        let pending_read = pending_read.or_else(|| {
            self.core.io.response.map(|r| {
                if r.is_io {
                    EmuPendingRead::Io {
                        port: r.addr as u16,
                        size: r.size,
                        data: r.data,
                    }
                } else {
                    EmuPendingRead::Mmio {
                        addr: r.addr,
                        size: r.size,
                        data: r.data,
                    }
                }
            })
        });
        Ok(EmuVcpuState {
            regs: self.get_regs()?,
            sregs: self.get_sregs()?,
            dr: st.dr,
            xcr0: st.xcr0,
            msrs: EmuMsrs {
                star: m.star,
                lstar: m.lstar,
                cstar: m.cstar,
                sfmask: m.sfmask,
                kernel_gs_base: m.kernel_gs_base,
                tsc_aux: m.tsc_aux,
                pat: m.pat,
                sysenter_cs: m.sysenter_cs,
                sysenter_esp: m.sysenter_esp,
                sysenter_eip: m.sysenter_eip,
                tsc_offset: m.tsc_offset,
                kvm_system_time: m.kvm_system_time,
                kvm_wall_clock: m.kvm_wall_clock,
            },
            fpu: EmuFpuState {
                fcw: st.fpu.fcw,
                fsw: st.fpu.status(),
                ftw: st.fpu.tag,
                st: st.fpu.st.map(split128),
                fop: st.fpu.fop,
                fip: st.fpu.fip,
                fdp: st.fpu.fdp,
                mxcsr: st.mxcsr,
                xmm: st.xmm.map(split128),
            },
            halted: self.core.halted,
            pv_unhalted: self
                .core
                .platform
                .pv_unhalted()
                .is_some_and(|f| f.load(Ordering::SeqCst)),
            int_shadow: self.core.int_shadow,
            nmi_blocked: self.core.nmi_blocked,
            wait_for_sipi: self.core.wait_for_sipi,
            pending_read,
            icount: self.core.icount,
        }
        .to_snapshot()?)
    }

    fn restore_state(&mut self, state: &VcpuSnapshot) -> Result<()> {
        // Decoded and checked (control bits, read size) before any of it
        // reaches the vCPU.
        let s = EmuVcpuState::try_from(state)?;
        self.set_regs(&s.regs)?;
        let apic_base = self.core.st.msr.apic_base;
        // The platform's copy of IA32_APIC_BASE comes with its own state;
        // only the engine's mirror is loaded here.
        let mut sregs = s.sregs;
        sregs.apic_base = 0;
        self.set_sregs(&sregs)?;
        let st = &mut self.core.st;
        st.msr.apic_base = if s.sregs.apic_base != 0 {
            s.sregs.apic_base
        } else {
            apic_base
        };
        st.dr = s.dr;
        st.xcr0 = s.xcr0;
        let m = &s.msrs;
        st.msr.star = m.star;
        st.msr.lstar = m.lstar;
        st.msr.cstar = m.cstar;
        st.msr.sfmask = m.sfmask;
        st.msr.kernel_gs_base = m.kernel_gs_base;
        st.msr.tsc_aux = m.tsc_aux;
        st.msr.pat = m.pat;
        st.msr.sysenter_cs = m.sysenter_cs;
        st.msr.sysenter_esp = m.sysenter_esp;
        st.msr.sysenter_eip = m.sysenter_eip;
        st.msr.tsc_offset = m.tsc_offset;
        st.msr.kvm_system_time = m.kvm_system_time;
        st.msr.kvm_wall_clock = m.kvm_wall_clock;
        let f = &s.fpu;
        st.fpu.fcw = f.fcw;
        st.fpu.fsw = f.fsw & !0x3800;
        st.fpu.top = ((f.fsw >> 11) & 7) as u8;
        st.fpu.tag = f.ftw;
        st.fpu.st = f.st.map(join128);
        st.fpu.fop = f.fop;
        st.fpu.fip = f.fip;
        st.fpu.fdp = f.fdp;
        st.mxcsr = f.mxcsr;
        st.xmm = f.xmm.map(join128);
        // set_regs cleared these; they are part of the saved state.
        self.core.halted = s.halted;
        if let Some(f) = self.core.platform.pv_unhalted() {
            f.store(s.pv_unhalted, Ordering::SeqCst);
        }
        self.core.int_shadow = s.int_shadow;
        self.core.nmi_blocked = s.nmi_blocked;
        self.core.wait_for_sipi = s.wait_for_sipi;
        self.core.icount = s.icount;
        self.core.delivering = None;
        self.core.io = Default::default();
        self.pending_read = None;
        if let Some(p) = s.pending_read {
            // The instruction reruns and takes the answer.
            let (req, data) = match p {
                EmuPendingRead::Io { port, size, data } => (ExitReq::IoIn { port, size }, data),
                EmuPendingRead::Mmio { addr, size, data } => {
                    (ExitReq::MmioRead { addr, size }, data)
                }
            };
            self.pending_read = Some(req);
            self.buf = data.to_le_bytes();
        }
        self.core.flush_all_caches();
        self.republish_pvclock = s.msrs.kvm_system_time & 1 != 0;
        Ok(())
    }

    fn complete_pending_io(&mut self) -> Result<()> {
        let Some(req) = self.pending_read else {
            return Ok(());
        };
        // Finish the instruction that waits for the answer, so a snapshot
        // holds no read in flight (another accelerator could not take it
        // over). If it does not finish cleanly in one step (a write or
        // another read follows), put everything back: run() finishes it.
        let st = self.core.st.clone();
        let (icount, halted, int_shadow, nmi_blocked) = (
            self.core.icount,
            self.core.halted,
            self.core.int_shadow,
            self.core.nmi_blocked,
        );
        self.core.io.response = Some(self.response(req));
        let exit = self.core.step();
        if exit.is_none() && self.core.io.response.is_none() && self.core.io.request.is_none() {
            self.pending_read = None;
            return Ok(());
        }
        self.core.st = st;
        self.core.icount = icount;
        self.core.halted = halted;
        self.core.int_shadow = int_shadow;
        self.core.nmi_blocked = nmi_blocked;
        self.core.io = Default::default();
        Ok(())
    }

    fn guest_cpuid(&self) -> Result<Vec<hypervisor::CpuidEntry>> {
        let cfg = self.core.cpuid;
        let index = self.core.index;
        Ok(hypervisor::cpuid::recorded(|leaf, sub| {
            Some(crate::cpuid::cpuid(&cfg, index, leaf, sub))
        }))
    }

    fn tsc_khz(&self) -> Option<u32> {
        (self.core.cpuid.tsc_khz != 0).then_some(self.core.cpuid.tsc_khz)
    }

    fn engine_counters(&self) -> Option<Arc<hypervisor::stats::EngineCounters>> {
        Some(self.core.stats.clone())
    }

    fn set_guest_debug(&mut self, debug: &hypervisor::GuestDebug) -> Result<()> {
        self.core.set_host_debug(debug);
        Ok(())
    }

    fn kicker(&self) -> Arc<dyn VcpuKicker> {
        Arc::new(EmuKicker {
            flag: self.core.kick.clone(),
            attention: self.core.attention.clone(),
            waker: self.core.platform.waker(),
        })
    }
}
