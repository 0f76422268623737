//! Snapshot state from one accelerator in the other's form, so a VM
//! snapshotted under `--accel emu` restores under `--accel kvm` and back.
//!
//! Per vCPU: GPRs, RIP/RFLAGS, segments with their hidden parts, control
//! registers, EFER, descriptor tables, debug registers, the MSRs both keep
//! (SYSCALL/SYSENTER, KERNEL_GS_BASE, TSC_AUX, PAT, TSC, TSC deadline,
//! kvmclock), the FXSAVE image (x87, SSE, MXCSR), halt / wait-for-SIPI,
//! interrupt shadow, NMI masking and a pending NMI, and the local APIC
//! (KVM's `kvm_lapic_state` register page, with the timer's current count).
//! Per VM: the PIC pair, the I/O APIC redirection table and pin levels, the
//! PIT channels (which count again from their initial value, as KVM does on
//! KVM_SET_PIT2), and guest time: kvmclock nanoseconds become the engine's
//! guest time and back, and each vCPU's TSC keeps its value (its rate is
//! the destination's: see `vmm`'s TSC check).
//!
//! What one side has and the other cannot hold is refused with a clear
//! error rather than dropped: an event KVM was injecting, a read the
//! engine could not finish before parking (its instruction also writes
//! device memory), XSAVE state beyond SSE.
//!
//! It lives beside the engine because it is the one place that knows both
//! forms: the `hypervisor` seam carries each backend's state opaquely. Both
//! sides are decoded (and the engine's checked, see [`crate::state`]) before
//! anything is converted, and the engine state made from KVM's is checked
//! the same way before it is handed on.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_pit_channel_state, kvm_pit_state2, kvm_sregs, kvm_vcpu_events, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};

use emu_platform::{IoApicRegs, PicChipRegs, PitChannelRegs, PitRegs, Platform, PlatformConfig};
use hypervisor::kvm::{
    pod_bytes, pod_from, regs_from_kvm, regs_to_kvm, seg_to_kvm, KvmVcpuState, KvmVmState,
};
use hypervisor::{AccelKind, HypervisorError, Result, SpecialRegs, VcpuSnapshot, VmSnapshot};

use crate::state::{EmuFpuState, EmuMsrs, EmuVcpuState, EmuVmState};

/// The engine's TSC and APIC bus rates (and KVM's APIC bus).
pub const EMU_TSC_HZ: u64 = 1_000_000_000;
pub const APIC_BUS_HZ: u64 = emu_platform::lapic::DEFAULT_BUS_HZ;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_PAT: u32 = 0x277;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_TSC_AUX: u32 = 0xc000_0103;
const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;

const MP_RUNNABLE: u32 = 0;
const MP_UNINITIALIZED: u32 = 1;
const MP_INIT_RECEIVED: u32 = 2;
const MP_HALTED: u32 = 3;
const MP_SIPI_RECEIVED: u32 = 4;

const VCPUEVENT_VALID_NMI_PENDING: u32 = 1;
const VCPUEVENT_VALID_SHADOW: u32 = 4;
const SHADOW_INT_STI: u8 = 2;
const PIT_FLAGS_SPEAKER_DATA_ON: u32 = 2;

fn err<T>(what: String) -> Result<T> {
    Err(HypervisorError::Other(what))
}

/// A snapshot's vCPU and VM state in `to`'s form (unchanged if already).
pub fn convert(
    vcpus: &[VcpuSnapshot],
    vm: &VmSnapshot,
    to: AccelKind,
) -> Result<(Vec<VcpuSnapshot>, VmSnapshot)> {
    match (vm.accel(), to) {
        (AccelKind::Emu, AccelKind::Kvm) => {
            let emu = vcpus
                .iter()
                .map(EmuVcpuState::try_from)
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let emu_vm = EmuVmState::try_from(vm)?;
            let refs: Vec<&EmuVcpuState> = emu.iter().collect();
            let (k, kvm) = emu_to_kvm(&refs, &emu_vm)?;
            Ok((
                k.iter()
                    .map(|s| VcpuSnapshot::new(AccelKind::Kvm, s))
                    .collect::<std::result::Result<_, _>>()?,
                VmSnapshot::new(AccelKind::Kvm, &kvm)?,
            ))
        }
        (AccelKind::Kvm, AccelKind::Emu) => {
            let kvm = vcpus
                .iter()
                .map(|s| s.decode::<KvmVcpuState>(AccelKind::Kvm))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let kvm_vm: KvmVmState = vm.decode(AccelKind::Kvm)?;
            let refs: Vec<&KvmVcpuState> = kvm.iter().collect();
            let (e, emu) = kvm_to_emu(&refs, &kvm_vm)?;
            Ok((
                e.iter()
                    .map(|s| s.to_snapshot())
                    .collect::<std::result::Result<_, _>>()?,
                emu.to_snapshot()?,
            ))
        }
        _ => Ok((vcpus.to_vec(), vm.clone())),
    }
}

fn sregs_to_kvm(n: &SpecialRegs) -> kvm_sregs {
    let mut s = kvm_sregs {
        cs: seg_to_kvm(&n.cs),
        ds: seg_to_kvm(&n.ds),
        es: seg_to_kvm(&n.es),
        fs: seg_to_kvm(&n.fs),
        gs: seg_to_kvm(&n.gs),
        ss: seg_to_kvm(&n.ss),
        tr: seg_to_kvm(&n.tr),
        ldt: seg_to_kvm(&n.ldt),
        cr0: n.cr0,
        cr2: n.cr2,
        cr3: n.cr3,
        cr4: n.cr4,
        cr8: n.cr8,
        efer: n.efer,
        apic_base: n.apic_base,
        ..Default::default()
    };
    s.gdt.base = n.gdt.base;
    s.gdt.limit = n.gdt.limit;
    s.idt.base = n.idt.base;
    s.idt.limit = n.idt.limit;
    s
}

fn sregs_from_kvm(s: &kvm_sregs) -> Result<SpecialRegs> {
    // An interrupt KVM had taken from the LAPIC but not delivered yet.
    if s.interrupt_bitmap.iter().any(|&w| w != 0) {
        return err("a vCPU was delivering an interrupt when the snapshot was taken".into());
    }
    Ok(hypervisor::kvm::sregs_from_kvm(s))
}

fn bytes16(v: [u64; 2]) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&v[0].to_le_bytes());
    b[8..].copy_from_slice(&v[1].to_le_bytes());
    b
}

fn halves(b: &[u8; 16]) -> [u64; 2] {
    let mut lo = [0u8; 8];
    let mut hi = [0u8; 8];
    lo.copy_from_slice(&b[..8]);
    hi.copy_from_slice(&b[8..]);
    [u64::from_le_bytes(lo), u64::from_le_bytes(hi)]
}

/// The FXSAVE image: x87 registers in stack order (ST0 first), the
/// abridged tag word by physical register, as the engine keeps it.
fn fpu_to_kvm(f: &EmuFpuState) -> kvm_fpu {
    let top = ((f.fsw >> 11) & 7) as usize;
    let mut k = kvm_fpu {
        fcw: f.fcw,
        fsw: f.fsw,
        ftwx: f.ftw,
        last_opcode: f.fop,
        last_ip: f.fip,
        last_dp: f.fdp,
        mxcsr: f.mxcsr,
        ..Default::default()
    };
    for i in 0..8 {
        let mut r = f.st[(top + i) & 7];
        r[1] &= 0xffff; // 80-bit registers
        k.fpr[i] = bytes16(r);
    }
    for (x, v) in k.xmm.iter_mut().zip(&f.xmm) {
        *x = bytes16(*v);
    }
    k
}

fn fpu_from_kvm(k: &kvm_fpu) -> EmuFpuState {
    let top = ((k.fsw >> 11) & 7) as usize;
    let mut f = EmuFpuState {
        fcw: k.fcw,
        fsw: k.fsw,
        ftw: k.ftwx,
        fop: k.last_opcode,
        fip: k.last_ip,
        fdp: k.last_dp,
        mxcsr: k.mxcsr,
        ..Default::default()
    };
    for i in 0..8 {
        let mut r = halves(&k.fpr[i]);
        r[1] &= 0xffff;
        f.st[(top + i) & 7] = r;
    }
    for (v, x) in f.xmm.iter_mut().zip(&k.xmm) {
        *v = halves(x);
    }
    f
}

fn lapic_to_kvm(page: &[u8; 1024]) -> kvm_lapic_state {
    let mut l = kvm_lapic_state::default();
    for (d, s) in l.regs.iter_mut().zip(page) {
        *d = *s as libc::c_char;
    }
    l
}

fn lapic_from_kvm(l: &kvm_lapic_state) -> [u8; 1024] {
    let mut page = [0u8; 1024];
    for (d, s) in page.iter_mut().zip(&l.regs) {
        *d = *s as u8;
    }
    page
}

fn pic_to_kvm(r: &PicChipRegs) -> kvm_bindings::kvm_pic_state {
    kvm_bindings::kvm_pic_state {
        last_irr: r.last_irr,
        irr: r.irr,
        imr: r.imr,
        isr: r.isr,
        priority_add: r.priority_add,
        irq_base: r.irq_base,
        read_reg_select: r.read_reg_select as u8,
        poll: r.poll as u8,
        special_mask: r.special_mask as u8,
        init_state: r.init_state,
        auto_eoi: r.auto_eoi as u8,
        rotate_on_auto_eoi: r.rotate_on_auto_eoi as u8,
        special_fully_nested_mode: r.special_fully_nested_mode as u8,
        init4: r.init4 as u8,
        elcr: r.elcr,
        elcr_mask: r.elcr_mask,
    }
}

fn pic_from_kvm(k: &kvm_bindings::kvm_pic_state) -> PicChipRegs {
    PicChipRegs {
        last_irr: k.last_irr,
        irr: k.irr,
        imr: k.imr,
        isr: k.isr,
        priority_add: k.priority_add,
        irq_base: k.irq_base,
        read_reg_select: k.read_reg_select != 0,
        poll: k.poll != 0,
        special_mask: k.special_mask != 0,
        init_state: k.init_state,
        auto_eoi: k.auto_eoi != 0,
        rotate_on_auto_eoi: k.rotate_on_auto_eoi != 0,
        special_fully_nested_mode: k.special_fully_nested_mode != 0,
        init4: k.init4 != 0,
        elcr: k.elcr,
        elcr_mask: k.elcr_mask,
    }
}

fn pit_channel_to_kvm(c: &PitChannelRegs) -> kvm_pit_channel_state {
    kvm_pit_channel_state {
        count: c.count,
        latched_count: c.latched_count,
        count_latched: c.count_latched,
        status_latched: c.status_latched as u8,
        status: c.status,
        read_state: c.read_state,
        write_state: c.write_state,
        write_latch: c.write_latch,
        rw_mode: c.rw_mode,
        mode: c.mode,
        bcd: c.bcd as u8,
        gate: c.gate as u8,
        count_load_time: 0,
    }
}

fn pit_channel_from_kvm(k: &kvm_pit_channel_state) -> PitChannelRegs {
    PitChannelRegs {
        count: k.count,
        latched_count: k.latched_count,
        count_latched: k.count_latched,
        status_latched: k.status_latched != 0,
        status: k.status,
        read_state: k.read_state,
        write_state: k.write_state,
        write_latch: k.write_latch,
        rw_mode: k.rw_mode,
        mode: k.mode,
        bcd: k.bcd != 0,
        gate: k.gate != 0,
    }
}

fn chip(id: u32) -> kvm_irqchip {
    kvm_irqchip {
        chip_id: id,
        ..Default::default()
    }
}

/// Engine state to KVM's.
pub fn emu_to_kvm(
    vcpus: &[&EmuVcpuState],
    vm: &EmuVmState,
) -> Result<(Vec<KvmVcpuState>, KvmVmState)> {
    let p = &vm.platform;
    if p.num_vcpus() != vcpus.len() {
        return err(format!(
            "the engine snapshot has {} local APICs for {} vCPUs",
            p.num_vcpus(),
            vcpus.len()
        ));
    }
    let now = vm.guest_ns;
    let mut out = Vec::with_capacity(vcpus.len());
    for (i, s) in vcpus.iter().enumerate() {
        if let Some(r) = &s.pending_read {
            return err(format!(
                "vCPU {i} was in the middle of a read ({r:?}) when the snapshot was taken; \
                 KVM cannot take it over"
            ));
        }
        let lapic = p
            .lapic(i)
            .ok_or_else(|| HypervisorError::Other(format!("no local APIC for vCPU {i}")))?;
        let m = &s.msrs;
        let tsc = now.wrapping_add(m.tsc_offset);
        let mut msrs = vec![
            // The TSC first: KVM computes the deadline against it.
            (MSR_IA32_TSC, tsc),
            (MSR_IA32_SYSENTER_CS, m.sysenter_cs),
            (MSR_IA32_SYSENTER_ESP, m.sysenter_esp),
            (MSR_IA32_SYSENTER_EIP, m.sysenter_eip),
            (MSR_STAR, m.star),
            (MSR_LSTAR, m.lstar),
            (MSR_CSTAR, m.cstar),
            (MSR_SYSCALL_MASK, m.sfmask),
            (MSR_KERNEL_GS_BASE, m.kernel_gs_base),
            (MSR_TSC_AUX, m.tsc_aux),
            (MSR_IA32_PAT, m.pat),
            (MSR_IA32_TSC_DEADLINE, lapic.tsc_deadline()),
        ];
        // kvmclock, if the guest turned it on: KVM then writes the
        // structures with its own TSC rate.
        if m.kvm_system_time != 0 {
            msrs.push((MSR_KVM_SYSTEM_TIME_NEW, m.kvm_system_time));
        }
        if m.kvm_wall_clock != 0 {
            msrs.push((MSR_KVM_WALL_CLOCK_NEW, m.kvm_wall_clock));
        }
        let mut events = kvm_vcpu_events {
            flags: VCPUEVENT_VALID_NMI_PENDING | VCPUEVENT_VALID_SHADOW,
            ..Default::default()
        };
        events.interrupt.shadow = if s.int_shadow { SHADOW_INT_STI } else { 0 };
        events.nmi.masked = s.nmi_blocked as u8;
        events.nmi.pending = lapic.nmi_pending() as u8;
        let mp_state = if s.wait_for_sipi || lapic.waiting_for_sipi() {
            MP_INIT_RECEIVED
        } else if s.halted && !s.pv_unhalted {
            // A halted vCPU with a paravirtual kick pending runs on, as
            // KVM_GET_MP_STATE itself reports it. KVM has no place for a
            // kick pending on a vCPU that has not halted yet (its own
            // snapshots drop it too): the engine's is dropped here. It
            // matters only in the few instructions between the guest's
            // last look at its lock word and its HLT.
            MP_HALTED
        } else {
            MP_RUNNABLE
        };
        let debugregs = kvm_debugregs {
            db: [s.dr[0], s.dr[1], s.dr[2], s.dr[3]],
            dr6: s.dr[6],
            dr7: s.dr[7],
            ..Default::default()
        };
        out.push(KvmVcpuState {
            mp_state: kvm_mp_state { mp_state },
            regs: regs_to_kvm(&s.regs),
            sregs: sregs_to_kvm(&s.sregs),
            fpu: pod_bytes(&fpu_to_kvm(&s.fpu)),
            xsave: None,
            xcrs: None,
            debugregs,
            lapic: lapic_to_kvm(&lapic.register_page(now)),
            msrs,
            events,
        });
    }
    let [master, slave] = p.pic().export();
    let mut m = chip(KVM_IRQCHIP_PIC_MASTER);
    m.chip.pic = pic_to_kvm(&master);
    let mut sl = chip(KVM_IRQCHIP_PIC_SLAVE);
    sl.chip.pic = pic_to_kvm(&slave);
    let io = p.ioapic().export();
    let mut ioc = chip(KVM_IRQCHIP_IOAPIC);
    // The IOAPIC member of the union, as chip_id says.
    ioc.chip.ioapic = kvm_bindings::kvm_ioapic_state {
        base_address: 0xfec0_0000,
        ioregsel: io.ioregsel,
        id: io.id,
        irr: io.irr,
        pad: 0,
        redirtbl: io
            .redirection
            .map(|bits| kvm_bindings::kvm_ioapic_state__bindgen_ty_1 { bits }),
    };
    let pit = p.pit().export();
    let pit = kvm_pit_state2 {
        channels: pit.channels.map(|c| pit_channel_to_kvm(&c)),
        flags: if pit.port_b & 2 != 0 {
            PIT_FLAGS_SPEAKER_DATA_ON
        } else {
            0
        },
        ..Default::default()
    };
    Ok((
        out,
        KvmVmState {
            irqchips: vec![m, sl, ioc],
            pit,
            clock: kvm_clock_data {
                clock: now,
                ..Default::default()
            },
        },
    ))
}

fn msr(list: &[(u32, u64)], index: u32) -> u64 {
    list.iter()
        .find(|(i, _)| *i == index)
        .map_or(0, |(_, v)| *v)
}

/// KVM state to the engine's.
pub fn kvm_to_emu(
    vcpus: &[&KvmVcpuState],
    vm: &KvmVmState,
) -> Result<(Vec<EmuVcpuState>, EmuVmState)> {
    let n = vcpus.len();
    if n == 0 || n > 255 {
        return err(format!("{n} vCPUs: the engine takes 1 to 255"));
    }
    let now = vm.clock.clock;
    let mut platform = Platform::new(PlatformConfig {
        num_vcpus: n,
        tsc_hz: EMU_TSC_HZ,
        apic_bus_hz: APIC_BUS_HZ,
        ..PlatformConfig::default()
    });
    let mut out = Vec::with_capacity(n);
    for (i, k) in vcpus.iter().enumerate() {
        let e = &k.events;
        if e.exception.injected != 0 || e.exception.pending != 0 {
            return err(format!(
                "vCPU {i} was delivering exception {} when the snapshot was taken",
                e.exception.nr
            ));
        }
        if e.interrupt.injected != 0 {
            return err(format!(
                "vCPU {i} was delivering interrupt {:#x} when the snapshot was taken",
                e.interrupt.nr
            ));
        }
        if e.smi.smm != 0 || e.smi.pending != 0 {
            return err(format!("vCPU {i} was in system management mode"));
        }
        if let Some(x) = &k.xcrs {
            let xcr0 = x.xcrs.first().map_or(1, |x| x.value);
            if x.nr_xcrs > 0 && xcr0 & !3 != 0 {
                return err(format!(
                    "vCPU {i} has XSAVE state the engine does not keep (XCR0 {xcr0:#x})"
                ));
            }
        }
        let sregs = sregs_from_kvm(&k.sregs)
            .map_err(|e| HypervisorError::Other(format!("vCPU {i}: {}", e.to_string().trim())))?;
        let fpu: kvm_fpu = pod_from(&k.fpu, "fpu")?;
        let tsc = msr(&k.msrs, MSR_IA32_TSC);
        let wait_for_sipi = matches!(
            k.mp_state.mp_state,
            MP_UNINITIALIZED | MP_INIT_RECEIVED | MP_SIPI_RECEIVED
        );
        let lapic = platform
            .lapic_mut(i)
            .ok_or_else(|| HypervisorError::Other(format!("no local APIC for vCPU {i}")))?;
        let page = lapic_from_kvm(&k.lapic);
        // The engine's TSC: guest ns (1 GHz) plus the offset kept below.
        let emu_tsc = tsc;
        lapic
            .load_register_page(
                &page,
                sregs.apic_base,
                msr(&k.msrs, MSR_IA32_TSC_DEADLINE),
                now,
                emu_tsc,
                EMU_TSC_HZ,
            )
            .map_err(|e| HypervisorError::Other(format!("vCPU {i} local APIC: {e}")))?;
        lapic.set_pending_events(e.nmi.pending != 0, wait_for_sipi);
        out.push(EmuVcpuState {
            regs: regs_from_kvm(&k.regs),
            sregs,
            dr: [
                k.debugregs.db[0],
                k.debugregs.db[1],
                k.debugregs.db[2],
                k.debugregs.db[3],
                0,
                0,
                k.debugregs.dr6,
                k.debugregs.dr7,
            ],
            xcr0: k
                .xcrs
                .and_then(|x| x.xcrs.first().map(|x| x.value))
                .filter(|&v| v != 0)
                .unwrap_or(1),
            msrs: EmuMsrs {
                star: msr(&k.msrs, MSR_STAR),
                lstar: msr(&k.msrs, MSR_LSTAR),
                cstar: msr(&k.msrs, MSR_CSTAR),
                sfmask: msr(&k.msrs, MSR_SYSCALL_MASK),
                kernel_gs_base: msr(&k.msrs, MSR_KERNEL_GS_BASE),
                tsc_aux: msr(&k.msrs, MSR_TSC_AUX),
                pat: msr(&k.msrs, MSR_IA32_PAT),
                sysenter_cs: msr(&k.msrs, MSR_IA32_SYSENTER_CS),
                sysenter_esp: msr(&k.msrs, MSR_IA32_SYSENTER_ESP),
                sysenter_eip: msr(&k.msrs, MSR_IA32_SYSENTER_EIP),
                tsc_offset: tsc.wrapping_sub(now),
                kvm_system_time: msr(&k.msrs, MSR_KVM_SYSTEM_TIME_NEW),
                kvm_wall_clock: msr(&k.msrs, MSR_KVM_WALL_CLOCK_NEW),
            },
            fpu: fpu_from_kvm(&fpu),
            halted: k.mp_state.mp_state == MP_HALTED,
            pv_unhalted: false,
            int_shadow: e.interrupt.shadow != 0,
            nmi_blocked: e.nmi.masked != 0,
            wait_for_sipi,
            pending_read: None,
            icount: 0,
        });
    }
    for c in &vm.irqchips {
        match c.chip_id {
            KVM_IRQCHIP_PIC_MASTER | KVM_IRQCHIP_PIC_SLAVE => {}
            KVM_IRQCHIP_IOAPIC => {
                // SAFETY: chip_id says the union holds the IOAPIC's state
                // (plain integers, valid for any bytes).
                let io = unsafe { c.chip.ioapic };
                platform.ioapic_mut().import(&IoApicRegs {
                    id: io.id,
                    ioregsel: io.ioregsel,
                    irr: io.irr,
                    // SAFETY: both members of the entry union are the same
                    // 64 bits of plain data.
                    redirection: io.redirtbl.map(|r| unsafe { r.bits }),
                });
            }
            n => return err(format!("unknown KVM interrupt controller {n}")),
        }
    }
    let pic = |id: u32| {
        vm.irqchips
            .iter()
            .find(|c| c.chip_id == id)
            // SAFETY: chip_id says the union holds a PIC's state (plain
            // bytes, valid for any value).
            .map(|c| pic_from_kvm(unsafe { &c.chip.pic }))
            .ok_or_else(|| HypervisorError::Other(format!("the KVM snapshot lacks PIC {id}")))
    };
    platform
        .pic_mut()
        .import(&[pic(KVM_IRQCHIP_PIC_MASTER)?, pic(KVM_IRQCHIP_PIC_SLAVE)?]);
    platform.pit_mut().import(
        &PitRegs {
            channels: vm.pit.channels.map(|c| pit_channel_from_kvm(&c)),
            port_b: (vm.pit.channels[2].gate != 0) as u8
                | if vm.pit.flags & PIT_FLAGS_SPEAKER_DATA_ON != 0 {
                    2
                } else {
                    0
                },
        },
        now,
    );
    let emu = EmuVmState {
        guest_ns: now,
        pvclock_version: 0,
        platform,
    };
    // What KVM held but the engine cannot (CR4 bits it lacks, say) is
    // refused here, as the engine's own restore would refuse it.
    for (i, s) in out.iter().enumerate() {
        s.check()
            .map_err(|e| HypervisorError::Other(format!("vCPU {i}: {e}")))?;
    }
    emu.check(n)
        .map_err(|e| HypervisorError::Other(e.to_string()))?;
    Ok((out, emu))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hypervisor::{DescriptorTable, Segment, StandardRegs};

    fn seg(selector: u16, type_: u8, l: bool, db: bool) -> Segment {
        Segment {
            base: 0,
            limit: 0xffff_ffff,
            selector,
            type_,
            present: true,
            dpl: 0,
            db,
            s: true,
            l,
            g: true,
            avl: false,
            unusable: false,
        }
    }

    /// A long-mode vCPU with every field something other than its default.
    fn vcpu(i: u64) -> EmuVcpuState {
        let code = seg(0x10, 0xb, true, false);
        let data = seg(0x18, 0x3, false, true);
        let mut fpu = EmuFpuState {
            fcw: 0x37f,
            fsw: (5 << 11) | 0x20,
            ftw: 0b1110_0000,
            fop: 0x1d9,
            fip: 0xffff_8000_1234_5678,
            fdp: 0x7000,
            mxcsr: 0x1fa0,
            ..Default::default()
        };
        for (k, r) in fpu.st.iter_mut().enumerate() {
            *r = [0x8000_0000_0000_0000 | k as u64, 0x3fff + k as u64];
        }
        for (k, x) in fpu.xmm.iter_mut().enumerate() {
            *x = [k as u64 * 0x0101_0101, !(k as u64)];
        }
        EmuVcpuState {
            regs: StandardRegs {
                rax: 1 + i,
                rbx: 2,
                rcx: 3,
                rdx: 4,
                rsi: 5,
                rdi: 6,
                rsp: 0xffff_c900_0001_0000,
                rbp: 8,
                r8: 9,
                r9: 10,
                r10: 11,
                r11: 12,
                r12: 13,
                r13: 14,
                r14: 15,
                r15: 16,
                rip: 0xffff_ffff_8100_0000 + i,
                rflags: 0x246,
            },
            sregs: SpecialRegs {
                cs: code,
                ds: data,
                es: data,
                fs: Segment {
                    base: 0x7f00_0000_1000,
                    ..data
                },
                gs: Segment {
                    base: 0xffff_8880_0000_0000,
                    ..data
                },
                ss: data,
                tr: Segment {
                    base: 0xfffffe0000003000,
                    limit: 0x4087,
                    selector: 0x40,
                    type_: 0xb,
                    s: false,
                    g: false,
                    ..code
                },
                ldt: Segment {
                    unusable: true,
                    ..Default::default()
                },
                gdt: DescriptorTable {
                    base: 0xfffffe0000001000,
                    limit: 0x7f,
                },
                idt: DescriptorTable {
                    base: 0xfffffe0000000000,
                    limit: 0xfff,
                },
                cr0: 0x8005_0033,
                cr2: 0x7f12_3456,
                cr3: 0x0123_4000,
                cr4: 0x6b0,
                cr8: 0,
                efer: 0xd01,
                apic_base: 0xfee0_0900 & !(((i != 0) as u64) << 8),
            },
            dr: [0x1000, 0x2000, 0, 0, 0, 0, 0xffff_0ff0, 0x401],
            xcr0: 1,
            msrs: EmuMsrs {
                star: 0x0023_0010_0000_0000,
                lstar: 0xffff_ffff_8160_0000,
                cstar: 0xffff_ffff_8160_1000,
                sfmask: 0x4_7700,
                kernel_gs_base: 0x7f00_0000_2000,
                tsc_aux: i,
                pat: 0x0007_0406_0007_0406,
                sysenter_cs: 0x10,
                sysenter_esp: 0xfffffe0000004000,
                sysenter_eip: 0xffff_ffff_8160_2000,
                tsc_offset: 12_345,
                kvm_system_time: 0x2_0001,
                kvm_wall_clock: 0x3000,
            },
            fpu,
            halted: i == 1,
            pv_unhalted: false,
            int_shadow: i == 0,
            nmi_blocked: false,
            wait_for_sipi: false,
            pending_read: None,
            icount: 0,
        }
    }

    fn platform(now: u64) -> Platform {
        let mut p = Platform::new(PlatformConfig {
            num_vcpus: 2,
            tsc_hz: EMU_TSC_HZ,
            apic_bus_hz: APIC_BUS_HZ,
            ..PlatformConfig::default()
        });
        let w32 = |p: &mut Platform, cpu: usize, reg: u64, v: u32| {
            assert!(p.mmio_write(cpu, 0xfee0_0000 + reg, &v.to_le_bytes(), 0));
        };
        // LAPICs: enabled, TPR, LINT0/1, a periodic timer on vCPU 0 and a
        // one-shot on vCPU 1, both part-way through.
        for cpu in 0..2 {
            w32(&mut p, cpu, 0xf0, 0x1ff);
            w32(&mut p, cpu, 0x80, 0x20);
            w32(&mut p, cpu, 0x3e0, 0x3);
            w32(&mut p, cpu, 0x350, 0x700);
            w32(&mut p, cpu, 0xd0, 1 << (24 + cpu));
        }
        w32(&mut p, 0, 0x320, 0x2_00ec);
        w32(&mut p, 0, 0x380, 1_000_000);
        w32(&mut p, 1, 0x320, 0xec);
        w32(&mut p, 1, 0x380, 5_000_000);
        // PICs initialised as Linux does, IRQ 0 masked.
        for (port, v) in [
            (0x20, 0x11),
            (0x21, 0x30),
            (0x21, 0x04),
            (0x21, 0x01),
            (0xa0, 0x11),
            (0xa1, 0x38),
            (0xa1, 0x02),
            (0xa1, 0x01),
            (0x21, 0xfb),
            (0xa1, 0xff),
            (0x4d1, 0x0e),
        ] {
            p.pio_write(port, &[v], 0);
        }
        // PIT channel 0 rate generator, channel 2 one-shot with gate on.
        for (port, v) in [
            (0x43u16, 0x34u8),
            (0x40, 0x9b),
            (0x40, 0x2e),
            (0x61, 0x01),
            (0x43, 0xb0),
            (0x42, 0xff),
        ] {
            p.pio_write(port, &[v], 0);
        }
        // IOAPIC: pin 4 to vector 0x24 on CPU 1, level-triggered.
        for (reg, v) in [(0x18u32, 0x0000_8024u32), (0x19, 0x0100_0000)] {
            assert!(p.mmio_write(0, 0xfec0_0000, &reg.to_le_bytes(), 0));
            assert!(p.mmio_write(0, 0xfec0_0010, &v.to_le_bytes(), 0));
        }
        p.tick(now);
        p
    }

    #[test]
    fn engine_state_survives_a_round_trip_through_kvm() {
        let now = 3_000_123;
        let vcpus = [vcpu(0), vcpu(1)];
        let vm = EmuVmState {
            guest_ns: now,
            pvclock_version: 0,
            platform: platform(now),
        };
        let refs: Vec<&EmuVcpuState> = vcpus.iter().collect();
        let (kvm, kvm_vm) = emu_to_kvm(&refs, &vm).unwrap();
        // What KVM gets: the guest TSC, kvmclock and the LAPIC page.
        assert_eq!(msr(&kvm[0].msrs, MSR_IA32_TSC), now + 12_345);
        assert_eq!(kvm_vm.clock.clock, now);
        assert_eq!(kvm[1].mp_state.mp_state, MP_HALTED);
        let tmcct = u32::from_le_bytes(
            lapic_from_kvm(&kvm[0].lapic)[0x390..0x394]
                .try_into()
                .unwrap(),
        );
        assert!(tmcct > 0 && tmcct < 1_000_000, "current count {tmcct}");
        // Through serde, as a snapshot stores it.
        let json = serde_json::to_string(&(&kvm, &kvm_vm)).unwrap();
        let (kvm, kvm_vm): (Vec<KvmVcpuState>, KvmVmState) = serde_json::from_str(&json).unwrap();
        let refs: Vec<&KvmVcpuState> = kvm.iter().collect();
        let (back, back_vm) = kvm_to_emu(&refs, &kvm_vm).unwrap();
        assert_eq!(back, vcpus);
        assert_eq!(back_vm.guest_ns, now);
        let (a, b) = (&vm.platform, &back_vm.platform);
        for cpu in 0..2 {
            let (la, lb) = (a.lapic(cpu).unwrap(), b.lapic(cpu).unwrap());
            assert_eq!(la.register_page(now), lb.register_page(now), "LAPIC {cpu}");
            assert_eq!(la.apic_base(), lb.apic_base());
            // The timers go on from where they were (to within one count:
            // the register page keeps whole counts).
            let (da, db) = (
                la.next_timer_deadline().unwrap(),
                lb.next_timer_deadline().unwrap(),
            );
            assert!(
                da.abs_diff(db) < la.timer_divisor(),
                "LAPIC {cpu}: {da} vs {db}"
            );
            assert_eq!(
                la.register_page(now + 777_777),
                lb.register_page(now + 777_777)
            );
        }
        assert_eq!(a.pic().export(), b.pic().export());
        assert_eq!(a.ioapic().export(), b.ioapic().export());
        assert_eq!(a.pit().export(), b.pit().export());
        assert_eq!(a.ioapic().export().redirection[4], 0x0100_0000_0000_8024);
    }

    #[test]
    fn what_the_other_side_cannot_hold_is_refused() {
        let mut v = vcpu(0);
        v.pending_read = Some(crate::state::EmuPendingRead::Io {
            port: 0x3fd,
            size: 1,
            data: 0x60,
        });
        let vm = EmuVmState {
            guest_ns: 1,
            pvclock_version: 0,
            platform: Platform::new(PlatformConfig::default()),
        };
        let e = emu_to_kvm(&[&v], &vm).unwrap_err().to_string();
        assert!(e.contains("in the middle of a read"), "{e}");
        let (mut k, kvm_vm) = emu_to_kvm(&[&vcpu(0)], &vm).unwrap();
        k[0].events.exception.injected = 1;
        k[0].events.exception.nr = 14;
        let e = kvm_to_emu(&[&k[0]], &kvm_vm).unwrap_err().to_string();
        assert!(e.contains("delivering exception 14"), "{e}");
    }

    #[test]
    fn a_pending_pv_kick_ends_the_hlt_under_kvm() {
        let now = 1_000;
        let vm = EmuVmState {
            guest_ns: now,
            pvclock_version: 0,
            platform: platform(now),
        };
        // vCPU 1 is halted: with a kick pending it is runnable under KVM
        // (as KVM_GET_MP_STATE reports such a vCPU), without one halted.
        let mut kicked = vcpu(1);
        kicked.pv_unhalted = true;
        let (kvm, _) = emu_to_kvm(&[&vcpu(0), &kicked], &vm).unwrap();
        assert_eq!(kvm[1].mp_state.mp_state, MP_RUNNABLE);
        let (kvm, _) = emu_to_kvm(&[&vcpu(0), &vcpu(1)], &vm).unwrap();
        assert_eq!(kvm[1].mp_state.mp_state, MP_HALTED);
    }
}
