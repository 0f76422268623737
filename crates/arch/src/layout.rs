//! Where things live in a Vireo x86 guest's physical address space.
//!
//! Everything the VMM writes before the first instruction (GDT, page tables,
//! zero page, PVH start info, command line, MP and ACPI tables) lives below
//! 1 MiB, in places a PC BIOS would use, so that the kernel's own scans (EBDA,
//! F segment, 0xe0000-0xfffff for the RSDP) find it there. The kernel goes at
//! 1 MiB and above.
//!
//! ```text
//! 0x0000_0000  real-mode IVT / BIOS data area (0x40e: EBDA segment, 0x413: base memory KiB)
//! 0x0000_0500  GDT (5 entries)            0x0000_0540  IDT (one null entry)
//! 0x0000_6000  PVH hvm_start_info          0x0000_6040  PVH module list
//! 0x0000_6100  PVH memory map              0x0000_7000  zero page (boot_params)
//! 0x0000_8ff0  boot stack top              0x0000_9000  PML4, then PDPT, then 4 PDs
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA: MP floating pointer   (reserved in e820 from here to 1 MiB)
//! 0x000e_0000  ACPI: RSDP, XSDT, FADT, FACS, DSDT, MADT (up to 0xf0000)
//! 0x000f_0000  MP configuration table
//! 0x0010_0000  kernel (ELF p_paddr or bzImage code32_start)
//! ...          initramfs, as high as allowed below the MMIO hole
//! 0xc000_0000  32-bit MMIO hole: IOAPIC 0xfec0_0000, LAPIC 0xfee0_0000
//! 0x1_0000_0000 RAM above 4 GiB, if any
//! ```

/// Start of the 32-bit MMIO hole: RAM beyond this is moved above 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// End of the 32-bit MMIO hole (4 GiB).
pub const MMIO_HOLE_END: u64 = 1 << 32;

/// The IOAPIC's MMIO window.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;

/// PCI Express enhanced configuration space (ECAM / MMCONFIG): 256 buses x
/// 32 devices x 8 functions x 4 KiB, described to the guest by the MCFG
/// table. PCI BARs go in the 32-bit window below it.
pub const PCI_ECAM_BASE: u64 = 0xe000_0000;
pub const PCI_ECAM_SIZE: u64 = 0x1000_0000;
/// Where 32-bit PCI memory BARs live: the MMIO hole up to ECAM.
pub const PCI_MMIO32_START: u64 = MMIO_HOLE_START;
pub const PCI_MMIO32_END: u64 = PCI_ECAM_BASE;
// ECAM lies in the MMIO hole, after the BAR window, before the IOAPIC.
const _: () =
    assert!(PCI_ECAM_BASE >= MMIO_HOLE_START && PCI_ECAM_BASE + PCI_ECAM_SIZE <= IOAPIC_ADDR);
/// The local APIC's MMIO window (same for every vCPU).
pub const LAPIC_ADDR: u64 = 0xfee0_0000;

/// Real-mode interrupt vector table / BIOS data area: the word at 0x40e holds
/// the EBDA segment, the word at 0x413 the base memory size in KiB.
pub const BDA_EBDA_SEGMENT: u64 = 0x40e;
pub const BDA_BASE_MEM_KIB: u64 = 0x413;

/// Boot GDT (null, 32-bit code 0x08, 64-bit code 0x10, data 0x18, TSS 0x20).
pub const BOOT_GDT_START: u64 = 0x500;
/// Number of GDT entries Vireo writes.
pub const BOOT_GDT_ENTRIES: usize = 5;
/// A one-entry (null) IDT: a fault before the kernel sets its own IDT
/// becomes a triple fault (a clean Shutdown exit), never a jump into garbage.
pub const BOOT_IDT_START: u64 = 0x540;

/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initramfs).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map (e820-style entries, 24 bytes each, up to the zero page).
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Maximum number of PVH memory map entries that fit before the zero page.
pub const PVH_MEMMAP_MAX_ENTRIES: usize = ((ZERO_PAGE_START - PVH_MEMMAP_START) / 24) as usize;

/// Linux `boot_params`, the "zero page".
pub const ZERO_PAGE_START: u64 = 0x7000;

/// Initial stack pointer (the stack grows down into 0x8000..0x8ff0).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;

/// Identity-mapping page tables: PML4, one PDPT, then one PD per GiB.
pub const PML4_START: u64 = 0x9000;
pub const PDPT_START: u64 = 0xa000;
pub const PD_START: u64 = 0xb000;
/// How much the boot page tables can map (4 PDs of 2 MiB pages).
pub const IDENTITY_MAP_MAX: u64 = 4 << 30;

/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Room reserved for the command line (the kernel's own limit is usually lower).
pub const CMDLINE_MAX_SIZE: usize = 0x10000;

/// Extended BIOS data area: start of the e820 reserved range below 1 MiB.
pub const EBDA_START: u64 = 0x9fc00;
/// The MP floating pointer structure (first KiB of the EBDA, which Linux scans).
pub const MPTABLE_START: u64 = EBDA_START;
/// The MP configuration table (up to ~5.5 KiB for 255 vCPUs, so not in the
/// 1 KiB EBDA; the floating pointer points here).
pub const MPTABLE_CONFIG_START: u64 = 0xf0000;
/// End of the MP configuration table area.
pub const MPTABLE_CONFIG_END: u64 = 0x100000;

/// ACPI RSDP (16-byte aligned in 0xe0000..0xfffff, where Linux scans for it);
/// the other ACPI tables follow it.
pub const RSDP_START: u64 = 0xe0000;
/// End of the ACPI tables area.
pub const ACPI_END: u64 = 0xf0000;

/// Start of "high" memory: kernels are loaded at or above it.
pub const HIMEM_START: u64 = 0x100000;

/// ACPI fixed-hardware I/O ports (FADT PM1a_EVT_BLK).
/// PM1a_EVT_BLK: 4 bytes at +0 (PM1 status word, then PM1 enable word).
pub const ACPI_PM_BASE: u16 = 0x600;
pub const ACPI_PM1_EVT_BLK: u16 = ACPI_PM_BASE;
pub const ACPI_PM1_EVT_LEN: u8 = 4;
/// PM1a_CNT_BLK: 2 bytes at +4 (SCI_EN, SLP_TYP, SLP_EN).
pub const ACPI_PM1_CNT_BLK: u16 = ACPI_PM_BASE + 4;
pub const ACPI_PM1_CNT_LEN: u8 = 2;
/// PM_TMR_BLK: 4 bytes at +8, a 24-bit 3.579545 MHz counter (the FADT does
/// not set TMR_VAL_EXT).
pub const ACPI_PM_TMR_BLK: u16 = ACPI_PM_BASE + 8;
pub const ACPI_PM_TMR_LEN: u8 = 4;
/// The ACPI SCI is ISA IRQ 9, level-triggered active-high (MADT override).
pub const ACPI_SCI_IRQ: u8 = 9;
/// FADT RESET_REG: write RESET_VALUE to this I/O port to reset the machine.
pub const RESET_PORT: u16 = 0xcf9;
pub const RESET_VALUE: u8 = 0x06;
/// SLP_TYP value the DSDT's `_S5_` object gives for soft-off: the guest
/// writes `(ACPI_S5_SLP_TYP << 10) | SLP_EN (1 << 13)` to PM1a_CNT.
pub const ACPI_S5_SLP_TYP: u8 = 5;
/// CMOS register holding the BCD century (FADT CENTURY).
pub const RTC_CENTURY_INDEX: u8 = 0x32;
/// PM1 control register bits.
pub const ACPI_PM1_CNT_SCI_EN: u16 = 1 << 0;
pub const ACPI_PM1_CNT_SLP_EN: u16 = 1 << 13;
pub const ACPI_PM1_CNT_SLP_TYP_SHIFT: u16 = 10;

/// Local APIC ids are 8 bits in xAPIC mode and 0xff is the broadcast id, so
/// the MP table and MADT can describe at most 255 vCPUs (ids 0..=254).
pub const MAX_VCPUS: u32 = 255;

// The areas above must not overlap one another.
const _: () = {
    assert!(BOOT_IDT_START >= BOOT_GDT_START + (BOOT_GDT_ENTRIES as u64) * 8);
    assert!(BOOT_IDT_START + 8 <= PVH_INFO_START);
    assert!(PVH_MEMMAP_START > PVH_MODLIST_START + 32);
    assert!(ZERO_PAGE_START + 0x1000 < BOOT_STACK_POINTER);
    assert!(BOOT_STACK_POINTER <= PML4_START);
    assert!(PML4_START + 0x1000 <= PDPT_START);
    assert!(PDPT_START + 0x1000 <= PD_START);
    assert!(PD_START + (IDENTITY_MAP_MAX >> 30) * 0x1000 <= CMDLINE_START);
    assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
    assert!(RSDP_START < ACPI_END && ACPI_END <= MPTABLE_CONFIG_START);
    assert!(MPTABLE_CONFIG_END <= HIMEM_START);
};
