//! Entry CPU states: real mode, flat 32-bit protected mode, and 64-bit long
//! mode with an identity map, plus the GDT and page tables they rely on.

use hypervisor::GuestRam;
use hypervisor::{
    CpuState, DescriptorTable, Segment, SpecialRegs, StandardRegs, CR0_ET, CR0_NE, CR0_PE, CR0_PG,
    CR4_PAE, EFER_LMA, EFER_LME,
};
use vm_memory::{Bytes, GuestAddress};

use crate::layout::*;
use crate::ArchError;

/// GDT selectors, laid out like Linux's own boot GDT so that a kernel
/// entered through the 64-bit boot protocol finds `__BOOT_CS` = 0x10 and
/// `__BOOT_DS` = 0x18 already loaded.
pub const GDT_CODE32_SELECTOR: u16 = 0x08;
pub const GDT_CODE64_SELECTOR: u16 = 0x10;
pub const GDT_DATA_SELECTOR: u16 = 0x18;
pub const GDT_TSS_SELECTOR: u16 = 0x20;

/// The boot GDT's descriptors (accessed bits preset so the CPU never needs
/// to write them back).
pub const BOOT_GDT: [u64; BOOT_GDT_ENTRIES] = [
    0,                     // null
    0x00cf_9b00_0000_ffff, // 0x08: flat 32-bit code, 4 GiB, read/execute
    0x00af_9b00_0000_ffff, // 0x10: 64-bit code (L=1)
    0x00cf_9300_0000_ffff, // 0x18: flat data, 4 GiB, read/write
    0x0000_8b00_0000_0067, // 0x20: busy 32-bit TSS at 0, limit 0x67 (VMX wants a valid TR)
];

/// RFLAGS with only the always-one bit 1 set: interrupts off.
const RFLAGS_RESERVED: u64 = 0x2;

/// IA32_APIC_BASE for the bootstrap processor: default base, enabled, BSP.
pub const APIC_BASE_BSP: u64 = LAPIC_ADDR | (1 << 11) | (1 << 8);

/// Page table entry bits.
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_HUGE: u64 = 1 << 7;

fn write_u64(mem: &GuestRam, addr: u64, val: u64, what: &'static str) -> Result<(), ArchError> {
    mem.write_obj(val, GuestAddress(addr))
        .map_err(|_| ArchError::GuestWrite { what, addr })
}

/// Writes the boot GDT at [`BOOT_GDT_START`] and a null IDT at
/// [`BOOT_IDT_START`]. Returns the GDT and IDT registers.
pub fn setup_gdt(mem: &GuestRam) -> Result<(DescriptorTable, DescriptorTable), ArchError> {
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        write_u64(mem, BOOT_GDT_START + (i as u64) * 8, *entry, "GDT")?;
    }
    write_u64(mem, BOOT_IDT_START, 0, "IDT")?;
    let gdt = DescriptorTable {
        base: BOOT_GDT_START,
        limit: (BOOT_GDT_ENTRIES * 8 - 1) as u16,
    };
    let idt = DescriptorTable {
        base: BOOT_IDT_START,
        limit: 7,
    };
    Ok((gdt, idt))
}

/// Writes page tables identity-mapping `[0, up_to)` (rounded up to 1 GiB)
/// with 2 MiB pages, which every x86-64 CPU supports (1 GiB pages need
/// PDPE1GB). Returns the value for CR3.
pub fn setup_identity_paging(mem: &GuestRam, up_to: u64) -> Result<u64, ArchError> {
    if up_to > IDENTITY_MAP_MAX {
        return Err(ArchError::IdentityMapTooLarge {
            requested: up_to,
            max: IDENTITY_MAP_MAX,
        });
    }
    let gibs = up_to.div_ceil(1 << 30).max(1);
    write_u64(
        mem,
        PML4_START,
        PDPT_START | PTE_PRESENT | PTE_WRITABLE,
        "PML4",
    )?;
    // Clear the rest of the PML4 and PDPT: memory may hold an earlier boot's tables.
    for i in 1..512u64 {
        write_u64(mem, PML4_START + i * 8, 0, "PML4")?;
    }
    for i in 0..512u64 {
        let val = if i < gibs {
            (PD_START + i * 0x1000) | PTE_PRESENT | PTE_WRITABLE
        } else {
            0
        };
        write_u64(mem, PDPT_START + i * 8, val, "PDPT")?;
    }
    for g in 0..gibs {
        for i in 0..512u64 {
            let phys = (g << 30) | (i << 21);
            write_u64(
                mem,
                PD_START + g * 0x1000 + i * 8,
                phys | PTE_PRESENT | PTE_WRITABLE | PTE_HUGE,
                "page directory",
            )?;
        }
    }
    Ok(PML4_START)
}

fn gdt_segment(selector: u16) -> Segment {
    Segment::from_gdt_entry(selector, BOOT_GDT[(selector >> 3) as usize])
}

fn null_ldt() -> Segment {
    Segment {
        type_: 0x2,
        unusable: true,
        ..Default::default()
    }
}

fn flat_sregs(code_selector: u16, gdt: DescriptorTable, idt: DescriptorTable) -> SpecialRegs {
    let data = gdt_segment(GDT_DATA_SELECTOR);
    SpecialRegs {
        cs: gdt_segment(code_selector),
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: gdt_segment(GDT_TSS_SELECTOR),
        ldt: null_ldt(),
        gdt,
        idt,
        apic_base: APIC_BASE_BSP,
        ..Default::default()
    }
}

/// A CPU state in real mode at `cs:ip` (as after reset, but at a chosen
/// address), with all data segments at 0 and interrupts off.
pub fn real_mode_state(cs: u16, ip: u16) -> CpuState {
    let data = Segment::real_mode(0, false);
    CpuState {
        regs: StandardRegs {
            rip: ip as u64,
            rflags: RFLAGS_RESERVED,
            ..Default::default()
        },
        sregs: SpecialRegs {
            cs: Segment::real_mode(cs, true),
            ds: data,
            es: data,
            fs: data,
            gs: data,
            ss: data,
            // VMX insists on a present busy TSS in TR even in real mode.
            tr: Segment {
                limit: 0xffff,
                type_: 0xb,
                present: true,
                ..Default::default()
            },
            ldt: null_ldt(),
            gdt: DescriptorTable {
                base: 0,
                limit: 0xffff,
            },
            idt: DescriptorTable {
                base: 0,
                limit: 0x3ff,
            },
            cr0: CR0_ET,
            apic_base: APIC_BASE_BSP,
            ..Default::default()
        },
    }
}

/// Flat 32-bit protected mode, paging off, at `entry`: CS 0x08, data 0x18,
/// the boot GDT written to guest memory, interrupts off. This is the PVH
/// entry state.
pub fn protected_mode_state(mem: &GuestRam, entry: u64) -> Result<CpuState, ArchError> {
    if entry > u32::MAX as u64 {
        return Err(ArchError::EntryNotIn32Bits(entry));
    }
    let (gdt, idt) = setup_gdt(mem)?;
    let mut sregs = flat_sregs(GDT_CODE32_SELECTOR, gdt, idt);
    sregs.cr0 = CR0_PE | CR0_ET;
    Ok(CpuState {
        regs: StandardRegs {
            rip: entry,
            rflags: RFLAGS_RESERVED,
            ..Default::default()
        },
        sregs,
    })
}

/// 64-bit long mode at `entry`: paging on with the first 4 GiB
/// identity-mapped, CS 0x10 (64-bit), data 0x18, a stack at
/// [`BOOT_STACK_POINTER`], interrupts off.
pub fn long_mode_state(mem: &GuestRam, entry: u64) -> Result<CpuState, ArchError> {
    let (gdt, idt) = setup_gdt(mem)?;
    let cr3 = setup_identity_paging(mem, IDENTITY_MAP_MAX)?;
    let mut sregs = flat_sregs(GDT_CODE64_SELECTOR, gdt, idt);
    sregs.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG;
    sregs.cr3 = cr3;
    sregs.cr4 = CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
    Ok(CpuState {
        regs: StandardRegs {
            rip: entry,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rflags: RFLAGS_RESERVED,
            ..Default::default()
        },
        sregs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    fn mem(size: usize) -> GuestRam {
        GuestRam::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    /// Walks the guest page tables the way the MMU does (4-level, 2 MiB or
    /// 4 KiB leaves) and returns the physical address for `virt`.
    fn translate(mem: &GuestRam, cr3: u64, virt: u64) -> Option<u64> {
        let pml4e: u64 = mem
            .read_obj(GuestAddress(cr3 + ((virt >> 39) & 511) * 8))
            .ok()?;
        if pml4e & 1 == 0 {
            return None;
        }
        let pdpte: u64 = mem
            .read_obj(GuestAddress(
                (pml4e & 0x000f_ffff_ffff_f000) + ((virt >> 30) & 511) * 8,
            ))
            .ok()?;
        if pdpte & 1 == 0 {
            return None;
        }
        if pdpte & PTE_HUGE != 0 {
            return Some((pdpte & 0x000f_ffff_c000_0000) | (virt & 0x3fff_ffff));
        }
        let pde: u64 = mem
            .read_obj(GuestAddress(
                (pdpte & 0x000f_ffff_ffff_f000) + ((virt >> 21) & 511) * 8,
            ))
            .ok()?;
        if pde & 1 == 0 {
            return None;
        }
        assert!(pde & PTE_HUGE != 0, "boot tables use 2 MiB pages");
        Some((pde & 0x000f_ffff_ffe0_0000) | (virt & 0x1f_ffff))
    }

    #[test]
    fn identity_map_covers_4gib_and_nothing_more() {
        let m = mem(1 << 20);
        let st = long_mode_state(&m, 0x100_0000).unwrap();
        for va in [
            0u64,
            0x1234,
            0x20_0000,
            0x100_0000,
            0xbfff_ffff,
            0xfee0_0000,
            0xffff_ffff,
        ] {
            assert_eq!(translate(&m, st.sregs.cr3, va), Some(va), "va {va:#x}");
        }
        assert_eq!(translate(&m, st.sregs.cr3, 1 << 32), None);
    }

    #[test]
    fn long_mode_state_is_64bit_flat() {
        let m = mem(1 << 20);
        let st = long_mode_state(&m, 0x100_0000).unwrap();
        let s = &st.sregs;
        assert_eq!(st.regs.rip, 0x100_0000);
        assert_eq!(s.cs.selector, 0x10);
        assert!(s.cs.l && !s.cs.db && s.cs.present && s.cs.s);
        assert_eq!(s.cs.type_ & 0x8, 0x8, "code segment");
        for d in [s.ds, s.es, s.ss, s.fs, s.gs] {
            assert_eq!(d.selector, 0x18);
            assert_eq!((d.base, d.limit), (0, 0xffff_ffff));
            assert_eq!(d.type_ & 0x8, 0, "data segment");
        }
        assert_ne!(s.cr0 & CR0_PG, 0);
        assert_ne!(s.cr0 & CR0_PE, 0);
        assert_ne!(s.cr4 & CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(st.regs.rflags & (1 << 9), 0, "IF clear");
        assert_eq!(st.regs.rsp, BOOT_STACK_POINTER);
        // The GDT in memory matches the cached descriptors.
        let cs_raw: u64 = m.read_obj(GuestAddress(s.gdt.base + 0x10)).unwrap();
        assert_eq!(Segment::from_gdt_entry(0x10, cs_raw), s.cs);
        let ds_raw: u64 = m.read_obj(GuestAddress(s.gdt.base + 0x18)).unwrap();
        assert_eq!(Segment::from_gdt_entry(0x18, ds_raw), s.ds);
        assert_eq!(s.gdt.limit as usize, BOOT_GDT_ENTRIES * 8 - 1);
        // TR: a present busy TSS, as VMX requires.
        assert!(s.tr.present && s.tr.type_ == 0xb && !s.tr.s);
        // Stack and page tables are in RAM and do not overlap each other.
        assert!(m.address_in_range(GuestAddress(st.regs.rsp - 8)));
    }

    #[test]
    fn protected_mode_state_is_flat_32bit_without_paging() {
        let m = mem(1 << 20);
        let st = protected_mode_state(&m, 0x100_0000).unwrap();
        let s = &st.sregs;
        assert_eq!(s.cs.selector, 0x08);
        assert!(s.cs.db && !s.cs.l && s.cs.g);
        assert_eq!((s.cs.base, s.cs.limit), (0, 0xffff_ffff));
        assert_eq!(s.ss.selector, 0x18);
        assert!(s.ss.db);
        assert_eq!(s.cr0 & CR0_PE, CR0_PE);
        assert_eq!(s.cr0 & CR0_PG, 0);
        assert_eq!(s.efer, 0);
        assert_eq!(st.regs.rflags, 2);
        assert!(matches!(
            protected_mode_state(&m, 1 << 32),
            Err(ArchError::EntryNotIn32Bits(_))
        ));
    }

    #[test]
    fn real_mode_state_points_at_cs_ip() {
        let st = real_mode_state(0xf000, 0xfff0);
        assert_eq!(st.sregs.cs.base, 0xf0000);
        assert_eq!(st.sregs.cs.selector, 0xf000);
        assert_eq!(st.regs.rip, 0xfff0);
        assert_eq!(st.sregs.cr0 & CR0_PE, 0);
        assert_eq!(st.sregs.ds.base, 0);
        assert_eq!(st.regs.rflags, 2);
    }

    #[test]
    fn identity_map_rejects_more_than_4gib() {
        let m = mem(1 << 20);
        assert!(setup_identity_paging(&m, (4 << 30) + 1).is_err());
    }

    #[test]
    fn tables_outside_memory_are_an_error_not_a_panic() {
        // 16 KiB of RAM: the GDT fits, the page tables at 0x9000 do not.
        let m = mem(0x4000);
        assert!(setup_gdt(&m).is_ok());
        assert!(matches!(
            long_mode_state(&m, 0x1000),
            Err(ArchError::GuestWrite { .. })
        ));
    }
}
