//! System instructions: control/debug registers, descriptor tables, MSRs,
//! CPUID, port I/O, HLT, CLI/STI, segment loads.

use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};

use super::operand::{ea, mem_seg, op_size, read_op, reg_read, reg_write, sreg_index, write_op};
use crate::core::{gp, ud, Core, R};
use crate::cpu::*;
use crate::seg;

fn need_cpl0(core: &Core) -> R {
    if core.st.cpl() != 0 {
        Err(gp(0))
    } else {
        Ok(())
    }
}

/// Port access permission (IOPL only; the TSS I/O bitmap is not consulted,
/// so a port access above IOPL always raises #GP).
pub fn check_io(core: &mut Core, port: u16, size: u8) -> R {
    if core.st.protected() && (core.st.v86() || core.st.cpl() > core.st.iopl()) {
        return Err(gp(0));
    }
    if core.st.dr[7] & 0xff != 0 {
        core.watch_io(port, size);
    }
    Ok(())
}

pub fn mov(core: &mut Core, insn: &Instruction) -> R {
    let k0 = insn.op0_kind();
    let k1 = insn.op1_kind();
    if k0 == OpKind::Register {
        let r = insn.op0_register();
        if r.is_cr() {
            return mov_to_cr(core, insn, r);
        }
        if r.is_dr() {
            return mov_to_dr(core, insn, r);
        }
        if r.is_segment_register() {
            let v = read_op(core, insn, 1, 2)? as u16;
            let idx = sreg_index(r);
            seg::load_sreg(core, idx, v)?;
            if idx == SS {
                core.int_shadow = true;
                core.debug.ss_load = true;
                core.end_block = true;
            }
            return Ok(());
        }
    }
    if k1 == OpKind::Register {
        let r = insn.op1_register();
        if r.is_cr() {
            need_cpl0(core)?;
            let v = read_cr(core, r)?;
            reg_write(&mut core.st, insn.op0_register(), v);
            return Ok(());
        }
        if r.is_dr() {
            need_cpl0(core)?;
            let n = dr_index(core, r)?;
            general_detect(core)?;
            let v = core.st.dr[n];
            reg_write(&mut core.st, insn.op0_register(), v);
            return Ok(());
        }
        if r.is_segment_register() {
            let v = reg_read(&core.st, r);
            let size = op_size(insn, 0);
            // A selector stored to memory is 16 bits; to a register it is
            // zero-extended.
            return write_op(core, insn, 0, size, v);
        }
    }
    super::alu::mov_plain(core, insn)
}

fn cr_number(r: Register) -> usize {
    (r as usize).wrapping_sub(Register::CR0 as usize)
}

fn read_cr(core: &Core, r: Register) -> R<u64> {
    Ok(match cr_number(r) {
        0 => core.st.cr0,
        2 => core.st.cr2,
        3 => core.st.cr3,
        4 => core.st.cr4,
        8 => core
            .platform
            .tpr(core.index)
            .map(|t| t as u64)
            .unwrap_or(core.st.cr8),
        _ => return Err(ud()),
    })
}

fn mov_to_cr(core: &mut Core, insn: &Instruction, r: Register) -> R {
    need_cpl0(core)?;
    let v = reg_read(&core.st, insn.op1_register());
    let v = if core.st.mode64() { v } else { v & 0xffff_ffff };
    match cr_number(r) {
        0 => write_cr0(core, v)?,
        2 => core.st.cr2 = v,
        3 => {
            core.st.cr3 = v & if core.st.long_mode() {
                0x000f_ffff_ffff_f000 | 0x18
            } else {
                0xffff_ffff
            };
            if core.st.cr4 & CR4_PGE != 0 {
                core.tlb.flush_nonglobal();
            } else {
                core.tlb.flush_all();
            }
        }
        4 => write_cr4(core, v)?,
        8 => {
            if v & !0xf != 0 {
                return Err(gp(0));
            }
            core.st.cr8 = v;
            core.platform.set_tpr(core.index, v as u8);
            core.request_poll();
        }
        _ => return Err(ud()),
    }
    core.end_block = true;
    Ok(())
}

pub fn write_cr0(core: &mut Core, v: u64) -> R {
    if v >> 32 != 0 {
        return Err(gp(0));
    }
    let v = v | CR0_ET;
    if v & CR0_PG != 0 && v & CR0_PE == 0 {
        return Err(gp(0));
    }
    if v & CR0_NW != 0 && v & CR0_CD == 0 {
        return Err(gp(0));
    }
    let old = core.st.cr0;
    let enabling_pg = v & CR0_PG != 0 && old & CR0_PG == 0;
    if enabling_pg && core.st.efer & EFER_LME != 0 {
        if core.st.cr4 & CR4_PAE == 0 || core.st.seg[CS].l {
            return Err(gp(0));
        }
        core.st.efer |= EFER_LMA;
    }
    if v & CR0_PG == 0 && old & CR0_PG != 0 && core.st.long_mode() {
        if core.st.mode64() {
            return Err(gp(0));
        }
        core.st.efer &= !EFER_LMA;
    }
    core.st.cr0 = v;
    if (old ^ v) & (CR0_PG | CR0_WP | CR0_PE) != 0 {
        core.tlb.flush_all();
    }
    core.end_block = true;
    Ok(())
}

pub fn write_cr4(core: &mut Core, v: u64) -> R {
    if v & !CR4_SUPPORTED != 0 {
        return Err(gp(0));
    }
    if core.st.long_mode() && v & CR4_PAE == 0 {
        return Err(gp(0));
    }
    let old = core.st.cr4;
    core.st.cr4 = v;
    if (old ^ v) & (CR4_PGE | CR4_PAE | CR4_PSE | CR4_SMEP | CR4_PCIDE) != 0 {
        core.tlb.flush_all();
    }
    core.end_block = true;
    Ok(())
}

fn dr_index(core: &Core, r: Register) -> R<usize> {
    let n = (r as usize).wrapping_sub(Register::DR0 as usize);
    match n {
        0..=3 | 6 | 7 => Ok(n),
        4 | 5 if core.st.cr4 & CR4_DE == 0 => Ok(n + 2),
        _ => Err(ud()),
    }
}

/// DR7.GD (general detect): a MOV to or from a debug register raises a
/// #DB fault before it runs, with DR6.BD set and GD cleared so that the
/// handler itself can use the debug registers.
fn general_detect(core: &mut Core) -> R {
    if core.st.dr[7] & crate::debug::DR7_GD == 0 {
        return Ok(());
    }
    core.st.dr[6] |= crate::debug::DR6_BD | crate::debug::DR6_FIXED1;
    core.st.dr[7] &= !crate::debug::DR7_GD;
    Err(crate::core::Exc::Fault {
        vector: 1,
        error: None,
    })
}

fn mov_to_dr(core: &mut Core, insn: &Instruction, r: Register) -> R {
    need_cpl0(core)?;
    let n = dr_index(core, r)?;
    general_detect(core)?;
    let v = reg_read(&core.st, insn.op1_register());
    if (n == 6 || n == 7) && v >> 32 != 0 {
        return Err(gp(0));
    }
    // DR6 and DR7 keep their fixed bits; DR7 (and DR0-3 while armed) can
    // arm or move a breakpoint: the run loop looks again before the next
    // instruction (crate::debug).
    core.st.dr[n] = match n {
        6 => (v & 0xe00f) | crate::debug::DR6_FIXED1,
        7 => (v & 0xffff_23ff) | 0x400,
        _ => v,
    };
    core.end_block = true;
    Ok(())
}

/// Descriptor-table register image: (limit, base) through memory.
fn table_operand(core: &mut Core, insn: &Instruction) -> R<(usize, u64)> {
    if insn.op0_kind() != OpKind::Memory {
        return Err(ud());
    }
    Ok((mem_seg(insn), ea(&core.st, insn)))
}

pub fn execute_system(core: &mut Core, insn: &Instruction) -> R {
    match insn.mnemonic() {
        M::In => {
            let size = op_size(insn, 0);
            let port = port_of(core, insn, 1);
            check_io(core, port, size)?;
            let v = core.io_in(port, size)?;
            reg_write(&mut core.st, insn.op0_register(), v);
            Ok(())
        }
        M::Out => {
            let size = op_size(insn, 1);
            let port = port_of(core, insn, 0);
            check_io(core, port, size)?;
            let v = reg_read(&core.st, insn.op1_register());
            core.io_out(port, size, v & mask(size))
        }
        M::Hlt => {
            need_cpl0(core)?;
            core.halted = true;
            core.request_poll();
            core.end_block = true;
            Ok(())
        }
        M::Cli | M::Sti => {
            if core.st.protected() && core.st.cpl() > core.st.iopl() {
                return Err(gp(0));
            }
            if insn.mnemonic() == M::Cli {
                core.st.rflags &= !FLAG_IF;
            } else {
                if core.st.rflags & FLAG_IF == 0 {
                    core.int_shadow = true;
                }
                core.st.rflags |= FLAG_IF;
                core.request_poll();
            }
            core.end_block = true;
            Ok(())
        }
        M::Cpuid => {
            let r = crate::cpuid::cpuid(
                &core.cpuid,
                core.index,
                core.st.gpr[RAX] as u32,
                core.st.gpr[RCX] as u32,
            );
            let mut r = r;
            // A globally disabled local APIC (IA32_APIC_BASE.EN clear)
            // drops out of CPUID, as on hardware.
            if core.st.gpr[RAX] as u32 == 1 && core.st.msr.apic_base & (1 << 11) == 0 {
                r[3] &= !crate::cpuid::FEAT_APIC;
            }
            core.st.gpr[RAX] = r[0] as u64;
            core.st.gpr[RBX] = r[1] as u64;
            core.st.gpr[RCX] = r[2] as u64;
            core.st.gpr[RDX] = r[3] as u64;
            Ok(())
        }
        M::Rdtsc | M::Rdtscp => {
            if insn.mnemonic() == M::Rdtscp {
                super::require(core, iced_x86::CpuidFeature::RDTSCP)?;
            }
            if core.st.cr4 & CR4_TSD != 0 && core.st.cpl() != 0 {
                return Err(gp(0));
            }
            let t = crate::msr::guest_tsc(core);
            core.st.gpr[RAX] = t & 0xffff_ffff;
            core.st.gpr[RDX] = t >> 32;
            if insn.mnemonic() == M::Rdtscp {
                core.st.gpr[RCX] = core.st.msr.tsc_aux & 0xffff_ffff;
            }
            Ok(())
        }
        M::Rdmsr => {
            need_cpl0(core)?;
            let v = crate::msr::read(core, core.st.gpr[RCX] as u32).ok_or(gp(0))?;
            core.st.gpr[RAX] = v & 0xffff_ffff;
            core.st.gpr[RDX] = v >> 32;
            Ok(())
        }
        M::Wrmsr => {
            need_cpl0(core)?;
            let v = (core.st.gpr[RAX] & 0xffff_ffff) | (core.st.gpr[RDX] << 32);
            crate::msr::write(core, core.st.gpr[RCX] as u32, v).map_err(|_| gp(0))?;
            // An x2APIC EOI or TPR write can unmask the next interrupt.
            core.request_poll();
            core.end_block = true;
            Ok(())
        }
        M::Lgdt | M::Lidt => {
            need_cpl0(core)?;
            let (s, off) = table_operand(core, insn)?;
            let limit = core.read_mem(s, off, 2)? as u16;
            let base = if core.st.mode64() {
                core.read_mem(s, off + 2, 8)?
            } else {
                let b = core.read_mem(s, off + 2, 4)?;
                if insn.code() == iced_x86::Code::Lgdt_m1632_16
                    || insn.code() == iced_x86::Code::Lidt_m1632_16
                {
                    b & 0x00ff_ffff
                } else {
                    b
                }
            };
            // A 64-bit base must be canonical.
            if core.st.mode64() && !crate::msr::canonical(base) {
                return Err(gp(0));
            }
            let t = hypervisor::DescriptorTable { base, limit };
            if insn.mnemonic() == M::Lgdt {
                core.st.gdt = t;
            } else {
                core.st.idt = t;
            }
            Ok(())
        }
        M::Sgdt | M::Sidt => {
            let (s, off) = table_operand(core, insn)?;
            let t = if insn.mnemonic() == M::Sgdt {
                core.st.gdt
            } else {
                core.st.idt
            };
            let bsize = if core.st.mode64() { 8 } else { 4 };
            // Probe the whole operand before writing.
            core.write_mem(s, off + 2, bsize, t.base)?;
            core.write_mem(s, off, 2, t.limit as u64)
        }
        M::Ltr | M::Lldt => {
            if !core.st.protected() || core.st.v86() {
                return Err(ud());
            }
            need_cpl0(core)?;
            let sel = read_op(core, insn, 0, 2)? as u16;
            if insn.mnemonic() == M::Ltr {
                seg::ltr(core, sel)
            } else {
                seg::lldt(core, sel)
            }
        }
        M::Str | M::Sldt => {
            if !core.st.protected() || core.st.v86() {
                return Err(ud());
            }
            let v = if insn.mnemonic() == M::Str {
                core.st.tr.selector
            } else {
                core.st.ldt.selector
            };
            let size = op_size(insn, 0);
            write_op(core, insn, 0, size, v as u64)
        }
        M::Invlpg => {
            need_cpl0(core)?;
            let off = ea(&core.st, insn);
            let lin = core.lin(mem_seg(insn), off)?;
            core.tlb.flush_page(lin);
            Ok(())
        }
        M::Wbinvd | M::Invd => need_cpl0(core),
        M::Swapgs => {
            if !core.st.mode64() {
                return Err(ud());
            }
            need_cpl0(core)?;
            std::mem::swap(&mut core.st.seg[GS].base, &mut core.st.msr.kernel_gs_base);
            Ok(())
        }
        M::Lmsw => {
            need_cpl0(core)?;
            let v = read_op(core, insn, 0, 2)?;
            // LMSW can set PE but never clear it.
            let new = (core.st.cr0 & !0xe) | (v & 0xf) | (core.st.cr0 & CR0_PE);
            write_cr0(core, new)
        }
        M::Smsw => {
            let size = op_size(insn, 0);
            let v = core.st.cr0;
            write_op(core, insn, 0, size, v)
        }
        M::Clts => {
            need_cpl0(core)?;
            core.st.cr0 &= !CR0_TS;
            Ok(())
        }
        M::Lds | M::Les | M::Lfs | M::Lgs | M::Lss => {
            let size = op_size(insn, 0);
            let s = mem_seg(insn);
            let off = ea(&core.st, insn);
            let o = core.read_mem(s, off, size)?;
            let sel = core.read_mem(s, off.wrapping_add(size as u64), 2)? as u16;
            let idx = match insn.mnemonic() {
                M::Lds => DS,
                M::Les => ES,
                M::Lfs => FS,
                M::Lgs => GS,
                _ => SS,
            };
            seg::load_sreg(core, idx, sel)?;
            reg_write(&mut core.st, insn.op0_register(), o);
            Ok(())
        }
        M::Lar | M::Lsl | M::Verr | M::Verw => {
            if !core.st.protected() || core.st.v86() {
                return Err(ud());
            }
            let mn = insn.mnemonic();
            let n = if matches!(mn, M::Lar | M::Lsl) { 1 } else { 0 };
            let sel = read_op(core, insn, n, 2)? as u16;
            let kind = match mn {
                M::Lar => seg::Probe::Lar,
                M::Lsl => seg::Probe::Lsl,
                M::Verr => seg::Probe::Verr,
                _ => seg::Probe::Verw,
            };
            let found = seg::probe(core, sel, kind)?;
            core.st.settle_flags();
            match found {
                Some(desc) => {
                    core.st.rflags |= FLAG_ZF;
                    if n == 1 {
                        let size = op_size(insn, 0);
                        let v = if mn == M::Lar {
                            (desc >> 32) & if size == 2 { 0xff00 } else { 0x00ff_ff00 }
                        } else {
                            hypervisor::Segment::from_gdt_entry(sel, desc).limit as u64
                        };
                        reg_write(&mut core.st, insn.op0_register(), v & mask(size));
                    }
                }
                None => core.st.rflags &= !FLAG_ZF,
            }
            Ok(())
        }
        // Not advertised in CPUID: behave like a CPU without them.
        M::Xgetbv | M::Xsetbv | M::Rdpid | M::Rdrand | M::Rdseed | M::Monitor | M::Mwait => {
            Err(ud())
        }
        M::Clac | M::Stac => Err(ud()),
        M::Vmcall | M::Vmmcall => hypercall(core),
        M::Rdpmc => {
            // The four legacy AMD counters exist and count nothing.
            if core.st.cr4 & CR4_PCE == 0 && core.st.protected() && core.st.cpl() != 0 {
                return Err(gp(0));
            }
            if core.st.gpr[RCX] & 0xffff_ffff > 3 {
                return Err(gp(0));
            }
            core.st.gpr[RAX] = 0;
            core.st.gpr[RDX] = 0;
            Ok(())
        }
        _ => super::sse::execute(core, insn),
    }
}

/// KVM hypercall numbers and return codes (linux/kvm_para.h).
const KVM_HC_VAPIC_POLL_IRQ: u64 = 1;
const KVM_HC_KICK_CPU: u64 = 5;
const KVM_ENOSYS: u64 = 1000;
const KVM_EPERM: u64 = 1;

/// VMCALL / VMMCALL. With the KVM signature advertised they follow KVM's
/// hypercall ABI (number in RAX, arguments in RBX, RCX, RDX, RSI, result
/// in RAX; in 32-bit code all of them 32 bits wide; KVM accepts either
/// instruction on either vendor). User mode gets -KVM_EPERM whatever the
/// number. Implemented: the no-op VAPIC poll, and `KVM_HC_KICK_CPU` (RBX
/// flags, unused, RCX the target's physical APIC ID) while
/// `KVM_FEATURE_PV_UNHALT` is offered: it marks the target "unhalted" and
/// wakes it (`VcpuPlatform::pv_kick`; an APIC ID no vCPU has is ignored)
/// and answers 0, as KVM does. Every other number answers -KVM_ENOSYS.
/// Without the signature no hypervisor interface is promised: #UD, as on
/// a CPU without virtualisation extensions.
fn hypercall(core: &mut Core) -> R {
    if !core.cpuid.kvm_clock {
        return Err(ud());
    }
    let long = core.st.mode64();
    let arg = |v: u64| if long { v } else { v & 0xffff_ffff };
    let nr = arg(core.st.gpr[RAX]);
    let ret = if core.st.protected() && core.st.cpl() != 0 {
        KVM_EPERM.wrapping_neg()
    } else if nr == KVM_HC_VAPIC_POLL_IRQ {
        0
    } else if nr == KVM_HC_KICK_CPU && core.cpuid.pv_unhalt() {
        core.platform.pv_kick(arg(core.st.gpr[RCX]));
        core.pv_kicks += 1;
        0
    } else {
        KVM_ENOSYS.wrapping_neg()
    };
    core.st.gpr[RAX] = arg(ret);
    Ok(())
}

fn port_of(core: &Core, insn: &Instruction, n: u32) -> u16 {
    if insn.op_kind(n) == OpKind::Register {
        (core.st.gpr[RDX] & 0xffff) as u16
    } else {
        insn.immediate(n) as u16
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::backend::{EmuVcpu, EmuVm};
    use crate::cpuid::KVM_FEATURE_PV_UNHALT;

    /// A PC-mode VM with two vCPUs (APIC IDs 0 and 1), both in real mode
    /// (CPL 0, 32-bit hypercall arguments) with the KVM signature.
    fn two_vcpus() -> (EmuVm, EmuVcpu, EmuVcpu) {
        let vm = EmuVm::new_pc();
        let a = vm.create_pc_vcpu(0, 2).unwrap();
        let b = vm.create_pc_vcpu(1, 2).unwrap();
        (vm, a, b)
    }

    fn kick(v: &mut EmuVcpu, apic_id: u64) -> u64 {
        let core = v.core_mut();
        core.st.gpr[RAX] = KVM_HC_KICK_CPU;
        core.st.gpr[RBX] = 0;
        core.st.gpr[RCX] = apic_id;
        hypercall(core).unwrap();
        core.st.gpr[RAX]
    }

    fn pending(vm: &EmuVm, vcpu: u32) -> bool {
        let pc = vm.platform().unwrap();
        pc.signal(vcpu).unwrap().pv_unhalt().load(Ordering::SeqCst)
    }

    #[test]
    fn kick_cpu_marks_the_target_and_answers_0() {
        let (vm, mut a, _b) = two_vcpus();
        assert!(a.core().cpuid.pv_unhalt());
        assert_eq!(kick(&mut a, 1), 0);
        assert!(pending(&vm, 1), "vCPU 1 kicked");
        assert!(!pending(&vm, 0), "vCPU 0 not");
        // A second kick before the HLT changes nothing: one flag.
        assert_eq!(kick(&mut a, 1), 0);
        assert!(pending(&vm, 1));
    }

    #[test]
    fn kick_cpu_to_an_apic_id_nobody_has_is_ignored() {
        let (vm, mut a, _b) = two_vcpus();
        for id in [2u64, 0xfe, 0x100, 0xffff_fff1] {
            assert_eq!(kick(&mut a, id), 0, "APIC ID {id:#x}");
        }
        assert!(!pending(&vm, 0) && !pending(&vm, 1));
        // In 32-bit code RCX's upper half is not part of the argument.
        assert_eq!(kick(&mut a, 0x1_0000_0001), 0);
        assert!(pending(&vm, 1) && !pending(&vm, 0));
    }

    #[test]
    fn kick_cpu_to_the_xapic_broadcast_marks_every_vcpu() {
        let (vm, mut a, _b) = two_vcpus();
        assert_eq!(kick(&mut a, 0xff), 0);
        assert!(pending(&vm, 0) && pending(&vm, 1));
    }

    #[test]
    fn kick_cpu_from_user_mode_is_refused() {
        let (vm, mut a, _b) = two_vcpus();
        let core = a.core_mut();
        core.st.cr0 |= crate::cpu::CR0_PE;
        core.st.seg[crate::cpu::CS].dpl = 3;
        // -KVM_EPERM, 32 bits wide outside long mode.
        assert_eq!(kick(&mut a, 1), 0xffff_ffff);
        assert!(!pending(&vm, 1));
    }

    #[test]
    fn kick_cpu_without_pv_unhalt_offered_is_unknown() {
        let (vm, mut a, _b) = two_vcpus();
        a.core_mut().cpuid.hidden.kvm_features = KVM_FEATURE_PV_UNHALT;
        assert_eq!(kick(&mut a, 1), (-1000i64 as u64) & 0xffff_ffff);
        assert!(!pending(&vm, 1));
    }
}
