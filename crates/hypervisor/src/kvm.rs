//! The KVM backend: vCPUs run on the host CPU through /dev/kvm, with KVM's
//! in-kernel interrupt controllers (PIC, IOAPIC, LAPIC) and PIT.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_config, kvm_pit_state2, kvm_regs, kvm_segment, kvm_sregs,
    kvm_userspace_memory_region, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, NoDatamatch, VcpuExit as KvmExit, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::{
    AccelKind, DescriptorTable, HypervisorError, InternalError, IrqLine, Result, Segment,
    SpecialRegs, StandardRegs, Vcpu, VcpuExit, VcpuKicker,
};

fn ioctl_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> HypervisorError {
    move |e| HypervisorError::Ioctl {
        op,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

/// What kind of KVM this host has; some hosts cannot run every guest instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmFlavor {
    /// VT-x or AMD-V: guest ring 0 runs natively.
    Hardware,
    /// Pagetable-based nested virtualization (`kvm_pvm`): guest ring 0 and real
    /// mode go through the host kernel's instruction emulator, which lacks
    /// XSAVE/XRSTOR, CMPXCHG16B, POPCNT, CLAC and others.
    Pvm,
}

impl KvmFlavor {
    pub fn detect() -> Self {
        if std::path::Path::new("/sys/module/kvm_pvm").exists() {
            KvmFlavor::Pvm
        } else {
            KvmFlavor::Hardware
        }
    }
}

pub struct KvmHypervisor {
    kvm: Kvm,
    flavor: KvmFlavor,
}

impl KvmHypervisor {
    /// Open [`DEFAULT_KVM_DEVICE`].
    pub fn new() -> Result<Self> {
        Self::open(DEFAULT_KVM_DEVICE)
    }

    /// Open the KVM device node `path` (the caller decides which: the
    /// `vireo` binary takes it from `VIREO_KVM_DEVICE`), turning the usual
    /// failures into errors that say what to do.
    pub fn open(path: &str) -> Result<Self> {
        let path = path.to_string();
        if let Err(e) = std::fs::metadata(&path) {
            return Err(HypervisorError::KvmMissing(path, e));
        }
        let cpath = std::ffi::CString::new(path.clone())
            .map_err(|_| HypervisorError::Other(format!("bad KVM device path {path}")))?;
        let kvm = Kvm::new_with_path(&cpath).map_err(|e| match e.errno() {
            libc::EACCES | libc::EPERM => HypervisorError::KvmPermission(path.clone()),
            libc::ENOENT | libc::ENODEV | libc::ENXIO => HypervisorError::KvmMissing(
                path.clone(),
                std::io::Error::from_raw_os_error(e.errno()),
            ),
            n => HypervisorError::KvmOpen(path.clone(), std::io::Error::from_raw_os_error(n)),
        })?;
        let api = kvm.get_api_version();
        if api != 12 {
            return Err(HypervisorError::KvmApiVersion(api));
        }
        for (cap, name) in [
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::Irqfd, "KVM_CAP_IRQFD"),
            (Cap::Pit2, "KVM_CAP_PIT2"),
            (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(HypervisorError::KvmCapability(name));
            }
        }
        Ok(KvmHypervisor {
            kvm,
            flavor: KvmFlavor::detect(),
        })
    }

    pub fn flavor(&self) -> KvmFlavor {
        self.flavor
    }

    /// Most vCPUs this host's KVM allows in one VM.
    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }
}

impl crate::Hypervisor for KvmHypervisor {
    fn kind(&self) -> AccelKind {
        AccelKind::Kvm
    }

    fn create_vm(&self) -> Result<Arc<dyn crate::Vm>> {
        Ok(Arc::new(self.create_kvm_vm()?))
    }

    fn supported_cpuid(&self) -> Result<Vec<crate::CpuidEntry>> {
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl_err("KVM_GET_SUPPORTED_CPUID"))?;
        let mut entries = recorded_leaves(&cpuid);
        if self.flavor == KvmFlavor::Pvm {
            // What setup_cpuid hides on this host (its emulator lacks it).
            for e in entries.iter_mut().filter(|e| e.function == 1) {
                e.ecx &= !(1 << 13);
            }
        }
        Ok(entries)
    }

    fn guest_workarounds(&self) -> Vec<String> {
        match self.flavor {
            KvmFlavor::Hardware => Vec::new(),
            // This KVM re-adds XSAVE to CPUID whatever the VMM says, and its
            // emulator cannot run XRSTOR, POPCNT, CLAC in guest ring 0: have
            // the kernel avoid them (README.md, "This machine's KVM").
            KvmFlavor::Pvm => vec!["noxsave".into(), "clearcpuid=cx16,popcnt,smap".into()],
        }
    }
}

impl KvmHypervisor {
    fn create_kvm_vm(&self) -> Result<KvmVm> {
        let fd = self.kvm.create_vm().map_err(ioctl_err("KVM_CREATE_VM"))?;
        // The TSS and identity map pages live just below the 4 GiB BIOS area,
        // inside the MMIO hole where no RAM is mapped.
        fd.set_tss_address(0xfffb_d000)
            .map_err(ioctl_err("KVM_SET_TSS_ADDR"))?;
        fd.set_identity_map_address(0xfffb_c000)
            .map_err(ioctl_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        fd.create_irq_chip()
            .map_err(ioctl_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(ioctl_err("KVM_CREATE_PIT2"))?;
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl_err("KVM_GET_SUPPORTED_CPUID"))?;
        // The MSRs this KVM can save and restore, for snapshots.
        let msr_index_list = self
            .kvm
            .get_msr_index_list()
            .map(|l| l.as_slice().to_vec())
            .unwrap_or_default();
        Ok(KvmVm {
            fd,
            cpuid,
            flavor: self.flavor,
            memory: Arc::new(Mutex::new(Vec::new())),
            msr_index_list: Arc::new(msr_index_list),
            msi_routes: Mutex::new(Default::default()),
            guest_cpuid: Mutex::new(None),
        })
    }
}

impl KvmVm {
    /// Set or clear KVM_MEM_LOG_DIRTY_PAGES on every memory slot.
    fn set_dirty_logging(&self, on: bool) -> Result<()> {
        let slots = self
            .memory
            .lock()
            .map_err(|_| HypervisorError::Other("memory slots lock poisoned".into()))?
            .clone();
        for m in slots {
            let region = kvm_userspace_memory_region {
                slot: m.slot,
                flags: if on {
                    kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
                guest_phys_addr: m.guest,
                memory_size: m.size,
                userspace_addr: m.host,
            };
            // SAFETY: the same host range `map_memory` was given, still
            // mapped by its contract; only the flags change.
            unsafe { self.fd.set_user_memory_region(region) }
                .map_err(ioctl_err("KVM_SET_USER_MEMORY_REGION (dirty log)"))?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
struct MemSlot {
    slot: u32,
    guest: u64,
    size: u64,
    host: u64,
}

pub struct KvmVm {
    fd: VmFd,
    cpuid: CpuId,
    /// The CPUID the guest is shown instead of everything KVM supports
    /// (`--cpu-model portable`, or a restored guest's own).
    guest_cpuid: Mutex<Option<Vec<crate::CpuidEntry>>>,
    flavor: KvmFlavor,
    /// Guest RAM as mapped, to read instruction bytes for error reports.
    memory: Arc<Mutex<Vec<MemSlot>>>,
    msr_index_list: Arc<Vec<u32>>,
    /// MSI messages delivered through irqfds and GSI routes.
    msi_routes: Mutex<crate::kvm_irq::MsiRoutes>,
}

impl crate::Vm for KvmVm {
    unsafe fn map_memory(
        &self,
        slot: u32,
        guest_addr: u64,
        size: u64,
        host_addr: u64,
    ) -> Result<()> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: guest_addr,
            memory_size: size,
            userspace_addr: host_addr,
        };
        // SAFETY: the caller guarantees the host range stays mapped.
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(ioctl_err("KVM_SET_USER_MEMORY_REGION"))?;
        if let Ok(mut m) = self.memory.lock() {
            m.push(MemSlot {
                slot,
                guest: guest_addr,
                size,
                host: host_addr,
            });
        }
        Ok(())
    }

    fn start_dirty_log(&self) -> Result<()> {
        self.set_dirty_logging(true)
    }

    fn dirty_log(&self, slot: u32) -> Result<Vec<u64>> {
        let size = self
            .memory
            .lock()
            .map_err(|_| HypervisorError::Other("memory slots lock poisoned".into()))?
            .iter()
            .find(|m| m.slot == slot)
            .map(|m| m.size)
            .ok_or_else(|| HypervisorError::Other(format!("no memory slot {slot}")))?;
        self.fd
            .get_dirty_log(slot, size as usize)
            .map_err(ioctl_err("KVM_GET_DIRTY_LOG"))
    }

    fn stop_dirty_log(&self) -> Result<()> {
        self.set_dirty_logging(false)
    }

    fn create_vcpu(&self, index: u32, count: u32) -> Result<Box<dyn Vcpu>> {
        let fd = self
            .fd
            .create_vcpu(index as u64)
            .map_err(ioctl_err("KVM_CREATE_VCPU"))?;
        let mut fd = fd;
        let run_page = fd.get_kvm_run() as *mut kvm_bindings::kvm_run as usize;
        let mut vcpu = KvmVcpu {
            fd,
            index,
            msr_index_list: self.msr_index_list.clone(),
            flavor: self.flavor,
            memory: self.memory.clone(),
            kicker: Arc::new(KvmKicker {
                thread: AtomicU64::new(0),
                run_page: Mutex::new(Some(run_page)),
            }),
            cpuid: CpuId::new(0).map_err(|e| HypervisorError::Other(format!("CPUID: {e:?}")))?,
            guest_debug: crate::GuestDebug::default(),
        };
        let chosen = self
            .guest_cpuid
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let table = match chosen {
            None => self.cpuid.clone(),
            Some(entries) => {
                let (entries, dropped) =
                    crate::cpuid::restrict(&entries, &recorded_leaves(&self.cpuid));
                if !dropped.is_empty() && index == 0 {
                    tracing::warn!(
                        "this KVM lacks CPU features the chosen CPU model has: {}",
                        dropped.join(" ")
                    );
                }
                let mut t: Vec<kvm_bindings::kvm_cpuid_entry2> = entries
                    .iter()
                    .map(|e| kvm_bindings::kvm_cpuid_entry2 {
                        function: e.function,
                        index: e.index,
                        flags: if matches!(e.function, 7 | 0xd) {
                            kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX
                        } else {
                            0
                        },
                        eax: e.eax,
                        ebx: e.ebx,
                        ecx: e.ecx,
                        edx: e.edx,
                        ..Default::default()
                    })
                    .collect();
                // The guest is told the TSC rate its vCPU really runs at.
                if let (Some(e), Ok(khz)) = (
                    t.iter_mut().find(|e| e.function == 0x4000_0010),
                    vcpu.fd.get_tsc_khz(),
                ) {
                    e.eax = khz;
                }
                t.sort_by_key(|e| (e.function, e.index));
                CpuId::from_entries(&t)
                    .map_err(|e| HypervisorError::Other(format!("CPUID: {e:?}")))?
            }
        };
        vcpu.setup_cpuid(&table, count, self.flavor)?;
        vcpu.setup_msrs();
        vcpu.setup_fpu()?;
        vcpu.setup_lapic()?;
        Ok(Box::new(vcpu))
    }

    fn set_guest_cpuid(&self, entries: &[crate::CpuidEntry]) -> Result<()> {
        *self.guest_cpuid.lock().unwrap_or_else(|e| e.into_inner()) = Some(entries.to_vec());
        Ok(())
    }

    fn save_state(&self) -> Result<crate::VmSnapshot> {
        let mut chips = Vec::new();
        for chip_id in [
            KVM_IRQCHIP_PIC_MASTER,
            KVM_IRQCHIP_PIC_SLAVE,
            KVM_IRQCHIP_IOAPIC,
        ] {
            let mut c = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut c)
                .map_err(ioctl_err("KVM_GET_IRQCHIP"))?;
            chips.push(c);
        }
        let pit = self.fd.get_pit2().map_err(ioctl_err("KVM_GET_PIT2"))?;
        let clock = self.fd.get_clock().map_err(ioctl_err("KVM_GET_CLOCK"))?;
        Ok(crate::VmSnapshot::new(
            AccelKind::Kvm,
            &KvmVmState {
                irqchips: chips,
                pit,
                clock,
            },
        )?)
    }

    fn restore_state(&self, state: &crate::VmSnapshot) -> Result<()> {
        let s: KvmVmState = state.decode(AccelKind::Kvm)?;
        self.fd
            .set_pit2(&s.pit)
            .map_err(ioctl_err("KVM_SET_PIT2"))?;
        let mut clock = s.clock;
        // Only the time itself may be set; the flags describe the host.
        clock.flags = 0;
        self.fd
            .set_clock(&clock)
            .map_err(ioctl_err("KVM_SET_CLOCK"))?;
        for c in &s.irqchips {
            self.fd
                .set_irqchip(c)
                .map_err(ioctl_err("KVM_SET_IRQCHIP"))?;
        }
        Ok(())
    }

    fn signal_msi(&self, addr: u64, data: u32) -> Result<()> {
        {
            let mut routes = self.msi_routes.lock().unwrap_or_else(|e| e.into_inner());
            match routes.signal(&self.fd, addr, data) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(source) => {
                    return Err(HypervisorError::Ioctl {
                        op: "irqfd write",
                        source,
                    })
                }
            }
        }
        let msi = kvm_bindings::kvm_msi {
            address_lo: addr as u32,
            address_hi: (addr >> 32) as u32,
            data,
            ..Default::default()
        };
        match self.fd.signal_msi(msi) {
            Ok(_) => Ok(()),
            Err(e) => Err(ioctl_err("KVM_SIGNAL_MSI")(e)),
        }
    }

    fn register_mmio_notify(&self, addr: u64, event: &EventFd) -> Result<bool> {
        if self.flavor == KvmFlavor::Pvm {
            // Seen on the nested PVM host: with an ioeventfd on an MMIO
            // address (any length), the guest's write to it never completes
            // and KVM_RUN does not return. Notifications stay MMIO exits.
            return Ok(false);
        }
        self.fd
            .register_ioevent(event, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(ioctl_err("KVM_IOEVENTFD"))?;
        Ok(true)
    }

    fn unregister_mmio_notify(&self, addr: u64, event: &EventFd) -> Result<()> {
        if self.flavor == KvmFlavor::Pvm {
            return Ok(());
        }
        self.fd
            .unregister_ioevent(event, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(ioctl_err("KVM_IOEVENTFD deassign"))
    }

    fn irq_line(&self, gsi: u32) -> Result<Arc<dyn IrqLine>> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| HypervisorError::Ioctl {
            op: "eventfd",
            source,
        })?;
        self.fd
            .register_irqfd(&evt, gsi)
            .map_err(ioctl_err("KVM_IRQFD"))?;
        Ok(Arc::new(KvmIrqLine { evt }))
    }
}

struct KvmIrqLine {
    evt: EventFd,
}

impl IrqLine for KvmIrqLine {
    fn trigger(&self) -> Result<()> {
        self.evt.write(1).map_err(|source| HypervisorError::Ioctl {
            op: "irqfd write",
            source,
        })
    }
}

/// Kicks a vCPU out of KVM_RUN: sets `immediate_exit` so that the next
/// KVM_RUN returns at once, and signals the thread in case it is inside one.
struct KvmKicker {
    /// pthread_t of the thread running the vCPU, 0 before its first run.
    thread: AtomicU64,
    /// Address of the vCPU's kvm_run mapping; None once the vCPU is gone.
    /// The lock keeps a kick and the vCPU's drop (which unmaps the page and
    /// ends the thread) from overlapping.
    run_page: Mutex<Option<usize>>,
}

static KICK_SIGNAL_INSTALLED: Once = Once::new();

fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() {
    KICK_SIGNAL_INSTALLED.call_once(|| {
        // The handler only needs to exist so that KVM_RUN returns EINTR.
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler) {
            tracing::warn!("cannot install the vCPU kick signal handler: {e}");
        }
    });
}

impl VcpuKicker for KvmKicker {
    fn kick(&self) {
        let Ok(page) = self.run_page.lock() else {
            return;
        };
        let Some(run_page) = *page else {
            return; // the vCPU is gone
        };
        // SAFETY: run_page is the vCPU's kvm_run mapping, still mapped while
        // it is Some (KvmVcpu's drop clears it under this lock first);
        // immediate_exit is a byte KVM reads at entry and user space may
        // write at any time.
        unsafe {
            let run = run_page as *mut kvm_bindings::kvm_run;
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*run).immediate_exit), 1);
        }
        let t = self.thread.load(Ordering::Acquire);
        if t != 0 {
            // SAFETY: t is the pthread_t of a live vCPU thread, recorded by
            // that thread; pthread_kill with a handled signal is harmless.
            unsafe {
                libc::pthread_kill(t as libc::pthread_t, kick_signal());
            }
        }
    }
}

pub struct KvmVcpu {
    fd: VcpuFd,
    index: u32,
    msr_index_list: Arc<Vec<u32>>,
    flavor: KvmFlavor,
    memory: Arc<Mutex<Vec<MemSlot>>>,
    kicker: Arc<KvmKicker>,
    /// The CPUID table this vCPU was given.
    cpuid: CpuId,
    /// What the debugger armed: which debug register is which breakpoint.
    guest_debug: crate::GuestDebug,
}

/// The leaves of [`crate::cpuid::RECORDED_LEAVES`] in a KVM CPUID table.
fn recorded_leaves(cpuid: &CpuId) -> Vec<crate::CpuidEntry> {
    let all = cpuid.as_slice();
    crate::cpuid::recorded(|function, index| {
        all.iter()
            .find(|e| {
                e.function == function
                    && (e.index == index
                        || e.flags & kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0)
            })
            .map(|e| [e.eax, e.ebx, e.ecx, e.edx])
    })
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

impl KvmVcpu {
    fn setup_cpuid(&mut self, supported: &CpuId, count: u32, flavor: KvmFlavor) -> Result<()> {
        let mut cpuid = supported.clone();
        let index = self.index;
        for e in cpuid.as_mut_slice() {
            match e.function {
                1 => {
                    // Initial APIC ID and logical processor count.
                    e.ebx = (e.ebx & 0x0000_ffff) | (index << 24) | (count.min(255) << 16);
                    e.ecx |= 1 << 31; // running under a hypervisor
                    if flavor == KvmFlavor::Pvm {
                        // The host's emulator has no CMPXCHG16B (README.md,
                        // "This machine's KVM").
                        e.ecx &= !(1 << 13);
                    }
                    if count > 1 {
                        e.edx |= 1 << 28; // HTT: the count above is valid
                    }
                }
                0xb | 0x1f => {
                    // x2APIC topology: one thread per core, all cores in one package.
                    e.edx = index;
                }
                6 => {
                    // No APERF/MPERF: Linux would otherwise sample them constantly.
                    e.ecx &= !1;
                }
                _ => {}
            }
        }
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(ioctl_err("KVM_SET_CPUID2"))?;
        self.cpuid = cpuid;
        Ok(())
    }

    /// MSRs as a CPU has them after reset. A host may refuse some of them
    /// (nested KVM: README.md, "This machine's KVM"); that is logged, not
    /// fatal.
    fn setup_msrs(&mut self) {
        let entries = [
            (MSR_IA32_SYSENTER_CS, 0),
            (MSR_IA32_SYSENTER_ESP, 0),
            (MSR_IA32_SYSENTER_EIP, 0),
            (MSR_STAR, 0),
            (MSR_CSTAR, 0),
            (MSR_KERNEL_GS_BASE, 0),
            (MSR_SYSCALL_MASK, 0),
            (MSR_LSTAR, 0),
            (MSR_IA32_TSC, 0),
            (MSR_IA32_MISC_ENABLE, 1),          // fast strings
            (MSR_MTRR_DEF_TYPE, (1 << 11) | 6), // MTRRs on, write-back by default
        ];
        for (index, data) in entries {
            let Ok(msrs) = Msrs::from_entries(&[kvm_msr_entry {
                index,
                data,
                ..Default::default()
            }]) else {
                continue;
            };
            match self.fd.set_msrs(&msrs) {
                Ok(1) => {}
                Ok(_) => tracing::debug!("vCPU {}: KVM refused MSR {index:#x}", self.index),
                Err(e) => tracing::debug!("vCPU {}: MSR {index:#x}: {e}", self.index),
            }
        }
    }

    fn setup_fpu(&mut self) -> Result<()> {
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd.set_fpu(&fpu).map_err(ioctl_err("KVM_SET_FPU"))
    }

    /// LINT0 as ExtINT and LINT1 as NMI: the virtual-wire mode a BIOS leaves
    /// behind, so that PIC interrupts reach the BSP before the guest sets up
    /// its APICs.
    fn setup_lapic(&mut self) -> Result<()> {
        const APIC_LVT0: usize = 0x350;
        const APIC_LVT1: usize = 0x360;
        const DM_EXTINT: u32 = 0x7;
        const DM_NMI: u32 = 0x4;
        let mut lapic = self.fd.get_lapic().map_err(ioctl_err("KVM_GET_LAPIC"))?;
        let set = |regs: &mut [libc::c_char; 1024], off: usize, mode: u32| {
            let mut v = [0u8; 4];
            for (i, b) in v.iter_mut().enumerate() {
                *b = regs[off + i] as u8;
            }
            let val = (u32::from_le_bytes(v) & !0x700) | (mode << 8);
            for (i, b) in val.to_le_bytes().iter().enumerate() {
                regs[off + i] = *b as libc::c_char;
            }
        };
        set(&mut lapic.regs, APIC_LVT0, DM_EXTINT);
        set(&mut lapic.regs, APIC_LVT1, DM_NMI);
        self.fd
            .set_lapic(&lapic)
            .map_err(ioctl_err("KVM_SET_LAPIC"))
    }

    /// The nested host's emulator refuses a few simple instructions in guest
    /// ring 0 that Linux runs at boot (README.md, "This machine's KVM").
    /// Complete the ones
    /// whose effect is exactly known, as the CPU would; true if done.
    fn complete_refused_instruction(&mut self, insn: &[u8]) -> bool {
        match insn {
            // INT3 (Linux's alternatives self-test): a trap, so #BP is
            // delivered with RIP past the instruction.
            [0xcc, ..] => self.skip(1).and_then(|_| self.inject_breakpoint()).is_ok(),
            // FWAIT not fused with an x87 instruction: with no unmasked x87
            // exception pending (Linux runs with a clean x87 state here)
            // it does nothing.
            [0x9b, next, ..] if !(0xd8..=0xdf).contains(next) => self.skip(1).is_ok(),
            _ => false,
        }
    }

    fn skip(&mut self, len: u64) -> Result<()> {
        let mut regs = self.fd.get_regs().map_err(ioctl_err("KVM_GET_REGS"))?;
        regs.rip = regs.rip.wrapping_add(len);
        self.fd.set_regs(&regs).map_err(ioctl_err("KVM_SET_REGS"))
    }

    /// Deliver #BP to the guest (after RIP was moved past the INT3).
    fn inject_breakpoint(&mut self) -> Result<()> {
        let mut events = self
            .fd
            .get_vcpu_events()
            .map_err(ioctl_err("KVM_GET_VCPU_EVENTS"))?;
        events.exception.injected = 1;
        events.exception.nr = 3;
        events.exception.has_error_code = 0;
        events.exception.pending = 0;
        self.fd
            .set_vcpu_events(&events)
            .map_err(ioctl_err("KVM_SET_VCPU_EVENTS"))
    }

    /// Read up to 15 bytes at a guest virtual address through KVM_TRANSLATE.
    fn read_guest_bytes(&self, gva: u64) -> Vec<u8> {
        let mut out = Vec::new();
        let Ok(slots) = self.memory.lock() else {
            return out;
        };
        for i in 0..15u64 {
            let Ok(t) = self.fd.translate_gva(gva + i) else {
                break;
            };
            if t.valid == 0 {
                break;
            }
            let gpa = t.physical_address;
            let Some(slot) = slots
                .iter()
                .find(|s| gpa >= s.guest && gpa < s.guest + s.size)
            else {
                break;
            };
            // SAFETY: the slot's host range is mapped for the VM's lifetime
            // (map_memory's contract) and gpa lies inside it.
            let b =
                unsafe { std::ptr::read_volatile((slot.host + (gpa - slot.guest)) as *const u8) };
            out.push(b);
        }
        out
    }

    fn internal_error(&mut self, reason: String, insn_from_kvm: Vec<u8>) -> Box<InternalError> {
        let regs = self.get_regs().ok();
        let sregs = self.get_sregs().ok();
        let rip = regs
            .map(|r| r.rip.wrapping_add(sregs.map(|s| s.cs.base).unwrap_or(0)))
            .unwrap_or(0);
        let insn = if insn_from_kvm.is_empty() {
            self.read_guest_bytes(rip)
        } else {
            insn_from_kvm
        };
        Box::new(InternalError {
            reason,
            rip,
            insn,
            regs,
            sregs,
        })
    }
}

/// Decode KVM_EXIT_INTERNAL_ERROR's payload into a reason and, for
/// emulation failures, the instruction bytes KVM hands back.
fn describe_internal_error(suberror: u32, data: &[u64]) -> (String, Vec<u8>) {
    const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;
    const KVM_INTERNAL_ERROR_SIMUL_EX: u32 = 2;
    const KVM_INTERNAL_ERROR_DELIVERY_EV: u32 = 3;
    const FLAG_INSTRUCTION_BYTES: u64 = 1;
    tracing::debug!("KVM internal error suberror {suberror}, data {data:x?}");
    match suberror {
        KVM_INTERNAL_ERROR_EMULATION => {
            // struct emulation_failure: data[0] = flags, then 16 bytes
            // (data[1], data[2]) holding insn_size (u8) and insn_bytes[15].
            let mut insn = Vec::new();
            if data.len() >= 3 && data[0] & FLAG_INSTRUCTION_BYTES != 0 {
                let raw: Vec<u8> = data[1..3].iter().flat_map(|w| w.to_le_bytes()).collect();
                let len = (raw[0] as usize).min(15);
                insn.extend_from_slice(&raw[1..1 + len]);
            }
            (
                "KVM internal error: the host's instruction emulator failed (suberror 1)".into(),
                insn,
            )
        }
        KVM_INTERNAL_ERROR_SIMUL_EX => (
            "KVM internal error: exception while delivering an exception (suberror 2)".into(),
            Vec::new(),
        ),
        KVM_INTERNAL_ERROR_DELIVERY_EV => (
            "KVM internal error: event delivery failed (suberror 3)".into(),
            Vec::new(),
        ),
        n => (format!("KVM internal error (suberror {n})"), Vec::new()),
    }
}

impl Drop for KvmVcpu {
    fn drop(&mut self) {
        // No kick may touch the kvm_run page or signal the thread after this.
        if let Ok(mut page) = self.kicker.run_page.lock() {
            *page = None;
        }
        self.kicker.thread.store(0, Ordering::Release);
    }
}

/// A KVM vCPU's whole state, in the order KVM wants it back.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct KvmVcpuState {
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// kvm_fpu and kvm_xsave as raw bytes: kvm-bindings gives them no serde.
    pub fpu: Vec<u8>,
    pub xsave: Option<Vec<u8>>,
    pub xcrs: Option<kvm_xcrs>,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// (index, value) of every MSR this KVM could read.
    pub msrs: Vec<(u32, u64)>,
    pub events: kvm_vcpu_events,
}

impl std::fmt::Debug for KvmVcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "KvmVcpuState {{ rip: {:#x}, {} MSRs }}",
            self.regs.rip,
            self.msrs.len()
        )
    }
}

/// KVM's in-kernel PIC, IOAPIC, PIT and clock.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct KvmVmState {
    pub irqchips: Vec<kvm_irqchip>,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

impl std::fmt::Debug for KvmVmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KvmVmState {{ clock: {} }}", self.clock.clock)
    }
}

/// The bytes of a plain-old-data kernel struct.
pub fn pod_bytes<T>(v: &T) -> Vec<u8> {
    // SAFETY: T is a C struct of integers from kvm-bindings; every byte is
    // initialised (KVM filled it, or Default zeroed it).
    unsafe { std::slice::from_raw_parts(v as *const T as *const u8, std::mem::size_of::<T>()) }
        .to_vec()
}

/// A kernel struct back from [`pod_bytes`]; the size must match exactly.
pub fn pod_from<T: Default>(b: &[u8], what: &str) -> Result<T> {
    if b.len() != std::mem::size_of::<T>() {
        return Err(HypervisorError::Other(format!(
            "snapshot {what} state is {} bytes, this KVM expects {}",
            b.len(),
            std::mem::size_of::<T>()
        )));
    }
    let mut v = T::default();
    // SAFETY: sizes match and T is plain data valid for any bit pattern.
    unsafe {
        std::ptr::copy_nonoverlapping(b.as_ptr(), &mut v as *mut T as *mut u8, b.len());
    }
    Ok(v)
}

impl KvmVcpu {
    fn read_msrs(&self) -> Vec<(u32, u64)> {
        // One at a time: a host may refuse some listed MSRs (README.md,
        // "This machine's KVM"), and
        // one refusal must not lose the others.
        let mut out = Vec::with_capacity(self.msr_index_list.len());
        for &index in self.msr_index_list.iter() {
            let Ok(mut msrs) = Msrs::from_entries(&[kvm_msr_entry {
                index,
                ..Default::default()
            }]) else {
                continue;
            };
            if let Ok(1) = self.fd.get_msrs(&mut msrs) {
                out.push((index, msrs.as_slice()[0].data));
            }
        }
        out
    }

    fn write_msrs(&self, msrs: &[(u32, u64)]) {
        for &(index, data) in msrs {
            let Ok(m) = Msrs::from_entries(&[kvm_msr_entry {
                index,
                data,
                ..Default::default()
            }]) else {
                continue;
            };
            if !matches!(self.fd.set_msrs(&m), Ok(1)) {
                tracing::warn!("vCPU {}: MSR {index:#x} could not be restored", self.index);
            }
        }
    }
}

pub fn seg_to_kvm(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present as u8,
        dpl: s.dpl,
        db: s.db as u8,
        s: s.s as u8,
        l: s.l as u8,
        g: s.g as u8,
        avl: s.avl as u8,
        unusable: s.unusable as u8,
        padding: 0,
    }
}

pub fn regs_to_kvm(r: &StandardRegs) -> kvm_regs {
    kvm_regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

pub fn regs_from_kvm(r: &kvm_regs) -> StandardRegs {
    StandardRegs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

pub fn sregs_from_kvm(s: &kvm_sregs) -> SpecialRegs {
    SpecialRegs {
        cs: seg_from_kvm(&s.cs),
        ds: seg_from_kvm(&s.ds),
        es: seg_from_kvm(&s.es),
        fs: seg_from_kvm(&s.fs),
        gs: seg_from_kvm(&s.gs),
        ss: seg_from_kvm(&s.ss),
        tr: seg_from_kvm(&s.tr),
        ldt: seg_from_kvm(&s.ldt),
        gdt: DescriptorTable {
            base: s.gdt.base,
            limit: s.gdt.limit,
        },
        idt: DescriptorTable {
            base: s.idt.base,
            limit: s.idt.limit,
        },
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        cr8: s.cr8,
        efer: s.efer,
        apic_base: s.apic_base,
    }
}

pub fn seg_from_kvm(s: &kvm_segment) -> Segment {
    Segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present != 0,
        dpl: s.dpl,
        db: s.db != 0,
        s: s.s != 0,
        l: s.l != 0,
        g: s.g != 0,
        avl: s.avl != 0,
        unusable: s.unusable != 0,
    }
}

/// KVM_GUESTDBG_* control bits (linux/kvm.h, asm/kvm.h).
const GUESTDBG_ENABLE: u32 = 0x1;
const GUESTDBG_SINGLESTEP: u32 = 0x2;
const GUESTDBG_USE_HW_BP: u32 = 0x2_0000;

impl KvmVcpu {
    /// The debugger's breakpoints and watchpoints in DR0-DR3 and DR7, in
    /// that order (breakpoints first). Breakpoints are debug-register
    /// breakpoints, not INT3 patched into guest memory: the guest's code
    /// is never changed, and there are four of them in all.
    fn guest_debug_regs(debug: &crate::GuestDebug) -> Result<[u64; 8]> {
        let n = debug.breakpoints.len() + debug.watchpoints.len();
        if n > 4 {
            return Err(HypervisorError::Other(format!(
                "KVM debugs with the four debug registers: {n} breakpoints and watchpoints asked"
            )));
        }
        let mut dr = [0u64; 8];
        let slots =
            debug
                .breakpoints
                .iter()
                .map(|&a| (a, 0u64, 1u64))
                .chain(debug.watchpoints.iter().map(|w| {
                    let rw = match w.kind {
                        crate::WatchKind::Write => 1,
                        // x86 has no read-only watchpoint: reads and writes.
                        crate::WatchKind::Read | crate::WatchKind::ReadWrite => 3,
                    };
                    (w.addr, rw, w.len)
                }));
        for (i, (addr, rw, len)) in slots.enumerate() {
            let len_bits = match len {
                1 => 0,
                2 => 1,
                8 => 2,
                4 => 3,
                l => {
                    return Err(HypervisorError::Other(format!(
                        "a watchpoint of {l} bytes: debug registers watch 1, 2, 4 or 8"
                    )))
                }
            };
            dr[i] = addr;
            // G<i>, R/W<i>, LEN<i>.
            dr[7] |= (2 << (2 * i)) | (rw << (16 + 4 * i)) | (len_bits << (18 + 4 * i));
        }
        Ok(dr)
    }

    fn debug_stop(&self, arch: &kvm_bindings::kvm_debug_exit_arch) -> crate::DebugStop {
        let nbp = self.guest_debug.breakpoints.len();
        for i in 0..4 {
            if arch.dr6 & (1 << i) == 0 {
                continue;
            }
            if i < nbp {
                return crate::DebugStop::Breakpoint(arch.pc);
            }
            if let Some(w) = self.guest_debug.watchpoints.get(i - nbp) {
                return crate::DebugStop::Watchpoint(w.addr);
            }
        }
        crate::DebugStop::Step
    }
}

impl Vcpu for KvmVcpu {
    fn index(&self) -> u32 {
        self.index
    }

    fn run(&mut self) -> Result<VcpuExit<'_>> {
        if self.kicker.thread.load(Ordering::Relaxed) == 0 {
            install_kick_handler();
            // SAFETY: pthread_self has no preconditions.
            let me = unsafe { libc::pthread_self() };
            self.kicker.thread.store(me as u64, Ordering::Release);
        }
        let fd: *mut VcpuFd = &mut self.fd;
        // SAFETY: the exit borrows the kvm_run mapping owned by self.fd; the
        // raw pointer only lets the error paths below call other ioctls on
        // self after the borrowing arms have returned (a borrow-checker
        // limitation with conditional returns, not an aliasing hazard).
        let exit = unsafe { &mut *fd }.run();
        let (reason, insn) = match exit {
            Ok(KvmExit::IoIn(port, data)) => return Ok(VcpuExit::IoIn { port, data }),
            Ok(KvmExit::IoOut(port, data)) => return Ok(VcpuExit::IoOut { port, data }),
            Ok(KvmExit::MmioRead(addr, data)) => return Ok(VcpuExit::MmioRead { addr, data }),
            Ok(KvmExit::MmioWrite(addr, data)) => return Ok(VcpuExit::MmioWrite { addr, data }),
            Ok(KvmExit::Debug(arch)) => return Ok(VcpuExit::Debug(self.debug_stop(&arch))),
            Ok(KvmExit::Hlt) => return Ok(VcpuExit::Halt),
            Ok(KvmExit::Shutdown) => return Ok(VcpuExit::Shutdown),
            Ok(KvmExit::Intr) => return Ok(VcpuExit::Interrupted),
            Ok(KvmExit::SystemEvent(kind, _)) => {
                return Ok(match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => VcpuExit::SystemPowerOff,
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => VcpuExit::SystemReset,
                    k => VcpuExit::Unknown(format!("KVM system event {k}")),
                })
            }
            Ok(KvmExit::InternalError) => {
                // SAFETY: reading the union member KVM filled for this exit reason.
                let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
                let n = (internal.ndata as usize).min(internal.data.len());
                describe_internal_error(internal.suberror, &internal.data[..n])
            }
            Ok(KvmExit::FailEntry(reason, cpu)) => (
                format!("KVM entry failed: hardware reason {reason:#x} on host CPU {cpu}"),
                Vec::new(),
            ),
            Ok(other) => return Ok(VcpuExit::Unknown(format!("{other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                return Ok(VcpuExit::Interrupted);
            }
            Err(e) => return Err(ioctl_err("KVM_RUN")(e)),
        };
        let err = self.internal_error(reason, insn);
        if self.flavor == KvmFlavor::Pvm && self.complete_refused_instruction(&err.insn) {
            return Ok(VcpuExit::Interrupted);
        }
        Ok(VcpuExit::InternalError(err))
    }

    fn set_guest_debug(&mut self, debug: &crate::GuestDebug) -> Result<()> {
        let mut dbg = kvm_bindings::kvm_guest_debug::default();
        if debug.is_active() {
            dbg.control = GUESTDBG_ENABLE | GUESTDBG_USE_HW_BP;
            if debug.single_step {
                dbg.control |= GUESTDBG_SINGLESTEP;
            }
            dbg.arch.debugreg = Self::guest_debug_regs(debug)?;
        }
        self.fd
            .set_guest_debug(&dbg)
            .map_err(ioctl_err("KVM_SET_GUEST_DEBUG"))?;
        self.guest_debug = debug.clone();
        Ok(())
    }

    fn get_regs(&self) -> Result<StandardRegs> {
        let r = self.fd.get_regs().map_err(ioctl_err("KVM_GET_REGS"))?;
        Ok(regs_from_kvm(&r))
    }

    fn set_regs(&mut self, r: &StandardRegs) -> Result<()> {
        let mut k = regs_to_kvm(r);
        // Bit 1 of RFLAGS is reserved and always set.
        k.rflags |= 2;
        self.fd.set_regs(&k).map_err(ioctl_err("KVM_SET_REGS"))
    }

    fn get_sregs(&self) -> Result<SpecialRegs> {
        let s = self.fd.get_sregs().map_err(ioctl_err("KVM_GET_SREGS"))?;
        Ok(sregs_from_kvm(&s))
    }

    fn set_sregs(&mut self, n: &SpecialRegs) -> Result<()> {
        // Start from KVM's view so that fields we do not model (the pending
        // interrupt bitmap) stay as they are.
        let mut s: kvm_sregs = self.fd.get_sregs().map_err(ioctl_err("KVM_GET_SREGS"))?;
        s.cs = seg_to_kvm(&n.cs);
        s.ds = seg_to_kvm(&n.ds);
        s.es = seg_to_kvm(&n.es);
        s.fs = seg_to_kvm(&n.fs);
        s.gs = seg_to_kvm(&n.gs);
        s.ss = seg_to_kvm(&n.ss);
        s.tr = seg_to_kvm(&n.tr);
        s.ldt = seg_to_kvm(&n.ldt);
        s.gdt.base = n.gdt.base;
        s.gdt.limit = n.gdt.limit;
        s.idt.base = n.idt.base;
        s.idt.limit = n.idt.limit;
        s.cr0 = n.cr0;
        s.cr2 = n.cr2;
        s.cr3 = n.cr3;
        s.cr4 = n.cr4;
        s.cr8 = n.cr8;
        s.efer = n.efer;
        if n.apic_base != 0 {
            s.apic_base = n.apic_base;
        }
        self.fd.set_sregs(&s).map_err(ioctl_err("KVM_SET_SREGS"))
    }

    fn set_boot_state(&mut self, state: &crate::CpuState) -> Result<()> {
        let mut sregs = state.sregs;
        // A zero TR/LDT from a boot template: give KVM a valid busy TSS and
        // an unusable LDT, as after reset, so VM entry checks pass.
        if sregs.tr.type_ == 0 {
            sregs.tr = Segment {
                limit: 0xffff,
                type_: 0xb,
                present: true,
                ..Default::default()
            };
        }
        if sregs.ldt.type_ == 0 {
            sregs.ldt = Segment {
                limit: 0xffff,
                type_: 0x2,
                present: true,
                ..Default::default()
            };
        }
        self.set_sregs(&sregs)?;
        self.set_regs(&state.regs)
    }

    fn kicker(&self) -> Arc<dyn VcpuKicker> {
        self.kicker.clone()
    }

    fn complete_pending_io(&mut self) -> Result<()> {
        // KVM finishes a pending PIO/MMIO at the next KVM_RUN, then sees
        // immediate_exit and returns EINTR without running the guest.
        self.fd.set_kvm_immediate_exit(1);
        let r = self.fd.run();
        let outcome = match r {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
            Err(e) => Err(ioctl_err("KVM_RUN")(e)),
            Ok(_) => Ok(()),
        };
        self.fd.set_kvm_immediate_exit(0);
        outcome
    }

    fn save_state(&self) -> Result<crate::VcpuSnapshot> {
        let fd = &self.fd;
        let state = KvmVcpuState {
            mp_state: fd.get_mp_state().map_err(ioctl_err("KVM_GET_MP_STATE"))?,
            regs: fd.get_regs().map_err(ioctl_err("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(ioctl_err("KVM_GET_SREGS"))?,
            fpu: pod_bytes(&fd.get_fpu().map_err(ioctl_err("KVM_GET_FPU"))?),
            // Not every host has XSAVE for guests (nested PVM does not).
            xsave: fd.get_xsave().ok().map(|x| pod_bytes(&x)),
            xcrs: fd.get_xcrs().ok(),
            debugregs: fd
                .get_debug_regs()
                .map_err(ioctl_err("KVM_GET_DEBUGREGS"))?,
            lapic: fd.get_lapic().map_err(ioctl_err("KVM_GET_LAPIC"))?,
            msrs: self.read_msrs(),
            events: fd
                .get_vcpu_events()
                .map_err(ioctl_err("KVM_GET_VCPU_EVENTS"))?,
        };
        Ok(crate::VcpuSnapshot::new(AccelKind::Kvm, &state)?)
    }

    fn guest_cpuid(&self) -> Result<Vec<crate::CpuidEntry>> {
        Ok(recorded_leaves(&self.cpuid))
    }

    fn tsc_khz(&self) -> Option<u32> {
        self.fd.get_tsc_khz().ok()
    }

    fn set_tsc_khz(&mut self, khz: u32) -> Result<()> {
        self.fd
            .set_tsc_khz(khz)
            .map_err(ioctl_err("KVM_SET_TSC_KHZ"))?;
        let mut cpuid = self.cpuid.clone();
        for e in cpuid.as_mut_slice() {
            if e.function == 0x4000_0010 {
                e.eax = khz;
            }
        }
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(ioctl_err("KVM_SET_CPUID2"))?;
        self.cpuid = cpuid;
        Ok(())
    }

    fn restore_state(&mut self, state: &crate::VcpuSnapshot) -> Result<()> {
        let s: KvmVcpuState = state.decode(AccelKind::Kvm)?;
        let fd = &self.fd;
        fd.set_mp_state(s.mp_state)
            .map_err(ioctl_err("KVM_SET_MP_STATE"))?;
        fd.set_regs(&s.regs).map_err(ioctl_err("KVM_SET_REGS"))?;
        let mut sregs = s.sregs;
        // State from the engine may hold a never-loaded (all-zero, not
        // marked unusable) TR or LDT, which VM entry refuses: give them the
        // after-reset values. KVM's own state never has such segments.
        if sregs.tr.type_ == 0 && sregs.tr.unusable == 0 {
            sregs.tr = seg_to_kvm(&Segment {
                limit: 0xffff,
                type_: 0xb,
                present: true,
                ..Default::default()
            });
        }
        if sregs.ldt.type_ == 0 && sregs.ldt.unusable == 0 {
            sregs.ldt = seg_to_kvm(&Segment {
                limit: 0xffff,
                type_: 0x2,
                present: true,
                ..Default::default()
            });
        }
        fd.set_sregs(&sregs).map_err(ioctl_err("KVM_SET_SREGS"))?;
        match &s.xsave {
            Some(x) => {
                let xsave: kvm_xsave = pod_from(x, "xsave")?;
                // SAFETY: a whole kvm_xsave, as KVM_GET_XSAVE returned it.
                unsafe { fd.set_xsave(&xsave) }.map_err(ioctl_err("KVM_SET_XSAVE"))?
            }
            None => {
                let fpu: kvm_fpu = pod_from(&s.fpu, "fpu")?;
                fd.set_fpu(&fpu).map_err(ioctl_err("KVM_SET_FPU"))?
            }
        }
        if let Some(x) = &s.xcrs {
            fd.set_xcrs(x).map_err(ioctl_err("KVM_SET_XCRS"))?;
        }
        fd.set_debug_regs(&s.debugregs)
            .map_err(ioctl_err("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&s.lapic).map_err(ioctl_err("KVM_SET_LAPIC"))?;
        self.write_msrs(&s.msrs);
        self.fd
            .set_vcpu_events(&s.events)
            .map_err(ioctl_err("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

/// The KVM device node unless the embedder names another.
pub const DEFAULT_KVM_DEVICE: &str = "/dev/kvm";

/// Whether [`DEFAULT_KVM_DEVICE`] is usable at all.
pub fn kvm_available() -> bool {
    kvm_available_at(DEFAULT_KVM_DEVICE)
}

/// Whether the KVM device node `path` can be opened for reading and
/// writing (for `--accel auto`).
pub fn kvm_available_at(path: &str) -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msis_get_irqfd_routes_that_kvm_accepts() {
        if !kvm_available() {
            eprintln!("note: /dev/kvm is not usable here; MSI routing test skipped");
            return;
        }
        let hv = KvmHypervisor::new().unwrap();
        let vm = hv.create_kvm_vm().unwrap();
        let _vcpu = crate::Vm::create_vcpu(&vm, 0, 1).unwrap();
        let line = crate::Vm::irq_line(&vm, 4).unwrap();
        for v in 0..40u32 {
            crate::Vm::signal_msi(&vm, 0xfee0_0000, 0x30 + v).unwrap();
            crate::Vm::signal_msi(&vm, 0xfee0_0000, 0x30 + v).unwrap();
        }
        // One route per distinct message, and KVM took every table (the
        // default IOAPIC/PIC pins included) without falling back.
        assert_eq!(vm.msi_routes.lock().unwrap().stats(), (40, false));
        line.trigger().unwrap();
    }

    #[test]
    fn emulation_failure_payload_yields_instruction_bytes() {
        // insn_size 5, then lock cmpxchg16b [rdi]: f0 48 0f c7 0f
        let bytes: [u8; 16] = [
            5, 0xf0, 0x48, 0x0f, 0xc7, 0x0f, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        let w0 = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        let w1 = u64::from_le_bytes(bytes[8..].try_into().unwrap());
        let (reason, insn) = describe_internal_error(1, &[1, w0, w1]);
        assert!(reason.contains("emulator"));
        assert_eq!(insn, vec![0xf0, 0x48, 0x0f, 0xc7, 0x0f]);
    }

    #[test]
    fn emulation_failure_without_bytes_flag_has_none() {
        let (_, insn) = describe_internal_error(1, &[0, 5, 0]);
        assert!(insn.is_empty());
        // A truncated payload is not trusted either.
        let (_, insn) = describe_internal_error(1, &[1, 5]);
        assert!(insn.is_empty());
        let (reason, _) = describe_internal_error(3, &[]);
        assert!(reason.contains("delivery"));
    }

    #[test]
    fn segment_conversion_round_trips() {
        let s = Segment::from_gdt_entry(0x10, 0x00af_9b00_0000_ffff);
        assert_eq!(seg_from_kvm(&seg_to_kvm(&s)), s);
    }
}
