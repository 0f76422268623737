//! ACPI tables: RSDP, XSDT, FADT, FACS, DSDT and MADT, in the BIOS area at
//! [`RSDP_START`]..[`ACPI_END`].
//!
//! The machine is a legacy-compatible PC, not a hardware-reduced one: the
//! FADT describes PM1a event/control blocks and a PM timer in I/O space at
//! [`ACPI_PM_BASE`], an SCI on IRQ 9, and a reset register at 0xcf9. With
//! SMI_CMD = 0 the OS treats ACPI as always enabled (SCI_EN is expected to
//! read back as set).
//!
//! acpi_tables 0.2 provides the RSDP, XSDT, FADT, FACS, the generic SDT and
//! AML. Its MADT builder cannot set the MADT flags (PCAT_COMPAT, which tells
//! Linux there are 8259s to mask) and has no Interrupt Source Override or
//! Local APIC NMI structures, so the MADT here is assembled on the generic
//! [`Sdt`] from hand-written structures.

use acpi_tables::aml;
use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags, PmProfile};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use hypervisor::GuestRam;
use vm_memory::GuestAddress;

use crate::layout::*;
use crate::{write_bytes, ArchError};

pub const OEM_ID: [u8; 6] = *b"VIREO ";
pub const OEM_TABLE_ID: [u8; 8] = *b"VIREOVM ";
const OEM_REVISION: u32 = 1;

/// FADT IAPC_BOOT_ARCH bits.
pub const IAPC_BOOT_ARCH_LEGACY_DEVICES: u16 = 1 << 0;
pub const IAPC_BOOT_ARCH_8042: u16 = 1 << 1;
pub const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;

/// MADT flags: PC-AT compatible dual 8259s are present.
pub const MADT_PCAT_COMPAT: u32 = 1;
const MADT_TYPE_LOCAL_APIC: u8 = 0;
const MADT_TYPE_IOAPIC: u8 = 1;
const MADT_TYPE_INTERRUPT_OVERRIDE: u8 = 2;
const MADT_TYPE_LOCAL_APIC_NMI: u8 = 4;
const MADT_LAPIC_ENABLED: u32 = 1;
/// MPS INTI flags: polarity bits 0-1 (01 active high), trigger 2-3 (11 level).
const MPS_INTI_ACTIVE_HIGH_LEVEL: u16 = 0b01 | (0b11 << 2);

/// The DSDT's own AML: `Name (_S5_, Package () { 5, 5, 0, 0 })`, the soft-off
/// sleep type the guest writes to PM1a_CNT.SLP_TYP to power off.
pub fn dsdt_aml() -> Vec<u8> {
    let mut bytes = Vec::new();
    let s5 = ACPI_S5_SLP_TYP;
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&s5, &s5, &aml::ZERO, &aml::ZERO]),
    )
    .to_aml_bytes(&mut bytes);
    bytes
}

/// First GSI used for PCI INTx: the IOAPIC pins above the 16 ISA ones.
pub const PCI_INTX_GSI_BASE: u32 = 16;
/// How many GSIs PCI INTx lines are spread over (IOAPIC pins 16-23).
pub const PCI_INTX_GSI_COUNT: u32 = 8;

/// The GSI the DSDT's `_PRT` gives to INTx `pin` (0 = INTA .. 3 = INTD) of
/// PCI device `slot` on bus 0: the usual swizzle, spread over GSIs 16-23.
/// PCI interrupts are level-triggered, active-low (the ACPI default for a
/// `_PRT` entry with a GSI); the device model must raise the same GSI.
pub fn pci_intx_gsi(slot: u8, pin: u8) -> u32 {
    PCI_INTX_GSI_BASE + (slot as u32 + pin as u32) % PCI_INTX_GSI_COUNT
}

/// `\_SB.PCI0`: a PCI host bridge (PNP0A03) on bus 0 with configuration
/// mechanism #1 at 0xcf8, I/O windows around it, a 32-bit MMIO window from
/// the start of the MMIO hole up to ECAM, and a `_PRT` routing INTx
/// of slots 1-31 by [`pci_intx_gsi`]. Without such a device a Linux
/// kernel that uses ACPI never scans PCI bus 0.
pub fn pci_host_bridge_aml() -> Vec<u8> {
    use aml::{AddressSpace, AddressSpaceCacheable, Name, Package, ResourceTemplate, IO};
    let hid = Name::new("_HID".into(), &aml::EISAName::new("PNP0A03"));
    let adr = Name::new("_ADR".into(), &aml::ZERO);
    let seg = Name::new("_SEG".into(), &aml::ZERO);
    let uid = Name::new("_UID".into(), &aml::ZERO);
    let bbn = Name::new("_BBN".into(), &aml::ZERO);
    let bus = AddressSpace::new_bus_number(0u16, 0xffu16);
    let cfg_io = IO::new(0xcf8, 0xcf8, 1, 8);
    let io_low = AddressSpace::new_io(0u16, 0xcf7u16, None);
    let io_high = AddressSpace::new_io(0xd00u16, 0xffffu16, None);
    // The BAR window stops where ECAM starts (ECAM is claimed by MCFG).
    let mmio = AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MMIO32_START as u32,
        (PCI_MMIO32_END - 1) as u32,
        None,
    );
    let crs = Name::new(
        "_CRS".into(),
        &ResourceTemplate::new(vec![&bus, &cfg_io, &io_low, &io_high, &mmio]),
    );
    let routes: Vec<(u32, u8, u32)> = (1u8..32)
        .flat_map(|slot| {
            (0u8..4).map(move |pin| ((slot as u32) << 16 | 0xffff, pin, pci_intx_gsi(slot, pin)))
        })
        .collect();
    let entries: Vec<Package> = routes
        .iter()
        .map(|(addr, pin, gsi)| Package::new(vec![addr, pin, &aml::ZERO, gsi]))
        .collect();
    let prt = Name::new(
        "_PRT".into(),
        &Package::new(entries.iter().map(|p| p as &dyn Aml).collect()),
    );
    let pci0 = aml::Device::new(
        "PCI0".into(),
        vec![&hid, &adr, &seg, &uid, &bbn, &crs, &prt],
    );
    to_bytes(&aml::Scope::new("\\_SB_".into(), vec![&pci0]))
}

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    table.to_aml_bytes(&mut v);
    v
}

/// The MCFG: ECAM for segment 0, buses 0-255, at PCI_ECAM_BASE.
pub fn build_mcfg() -> Vec<u8> {
    let mut mcfg = acpi_tables::mcfg::MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let last_bus = (PCI_ECAM_SIZE >> 20).saturating_sub(1).min(255) as u8;
    mcfg.add_ecam(PCI_ECAM_BASE, 0, 0, last_bus);
    to_bytes(&mcfg)
}

/// The DSDT: `_S5_`, the PCI host bridge, then `extra_aml` (devices
/// defined by the VMM).
pub fn build_dsdt(extra_aml: &[u8]) -> Vec<u8> {
    // Revision 2: integers in this table's AML are 64-bit.
    let mut dsdt = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    dsdt.append_slice(&dsdt_aml());
    dsdt.append_slice(&pci_host_bridge_aml());
    dsdt.append_slice(extra_aml);
    dsdt.as_slice().to_vec()
}

/// The MADT: a local APIC per vCPU (ids 0..n, all enabled), the IOAPIC
/// with id `num_cpus` and GSI base 0, IRQ0 -> GSI2, the SCI (IRQ9)
/// level/active-high, and LINT1 as NMI on every CPU.
pub fn build_madt(num_cpus: u32) -> Result<Vec<u8>, ArchError> {
    if num_cpus == 0 {
        return Err(ArchError::NoVcpus);
    }
    if num_cpus > MAX_VCPUS {
        return Err(ArchError::TooManyVcpus(num_cpus));
    }
    // Revision 5 (ACPI 6.x) with the 8-byte header extension written below.
    let mut madt = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    madt.write_u32(36, LAPIC_ADDR as u32);
    madt.write_u32(40, MADT_PCAT_COMPAT);
    let mut s = Vec::new();
    for cpu in 0..num_cpus {
        // ACPI processor UID = APIC id = vCPU index.
        s.extend_from_slice(&[MADT_TYPE_LOCAL_APIC, 8, cpu as u8, cpu as u8]);
        s.extend_from_slice(&MADT_LAPIC_ENABLED.to_le_bytes());
    }
    s.extend_from_slice(&[MADT_TYPE_IOAPIC, 12, num_cpus as u8, 0]);
    s.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    s.extend_from_slice(&0u32.to_le_bytes()); // GSI base
    for (irq, gsi, flags) in [
        (0u8, 2u32, 0u16),
        (
            ACPI_SCI_IRQ,
            ACPI_SCI_IRQ as u32,
            MPS_INTI_ACTIVE_HIGH_LEVEL,
        ),
    ] {
        s.extend_from_slice(&[MADT_TYPE_INTERRUPT_OVERRIDE, 10, 0 /* ISA */, irq]);
        s.extend_from_slice(&gsi.to_le_bytes());
        s.extend_from_slice(&flags.to_le_bytes());
    }
    // Processor UID 0xff: all processors; LINT1.
    s.extend_from_slice(&[MADT_TYPE_LOCAL_APIC_NMI, 6, 0xff, 0, 0, 1]);
    madt.append_slice(&s);
    Ok(madt.as_slice().to_vec())
}

fn io_gas(port: u16, bits: u8, access: AccessSize) -> GAS {
    GAS::new(AddressSpace::SystemIo, bits, 0, access, port as u64)
}

/// The FADT (revision 6.5, not hardware-reduced).
pub fn build_fadt(dsdt_addr: u64, facs_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .preferred_pm_profile(PmProfile::EnterpriseServer)
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        // No sleep button; the power button is the fixed-feature one
        // (PM1 PWRBTN_STS), so the VMM can ask for an orderly shutdown.
        .flag(Flags::SlpButton)
        // No RTC wake status in PM1.
        .flag(Flags::FixRtc)
        // No TMR_VAL_EXT: the PM timer (devices::acpi) is 24 bits wide, and
        // Linux masks its clocksource by this flag.
        .flag(Flags::ResetRegSup);
    fadt.dsdt = (dsdt_addr as u32).into();
    fadt.x_dsdt = dsdt_addr.into();
    // The FACS is below 4 GiB: its address goes in the 32-bit
    // FIRMWARE_CTRL (X_FIRMWARE_CTRL must then be zero), where firmware
    // and test kernels that only read the ACPI 1.0 fields look for it.
    fadt.firmware_ctrl = (facs_addr as u32).into();
    fadt.x_firmware_ctrl = 0.into();
    fadt.sci_int = (ACPI_SCI_IRQ as u16).into();
    // SMI_CMD = 0: no SMM handshake; ACPI is always enabled.
    fadt.smi_cmd = 0.into();
    fadt.acpi_enable = 0;
    fadt.acpi_disable = 0;
    fadt.pm1a_evt_blk = (ACPI_PM1_EVT_BLK as u32).into();
    fadt.pm1a_cnt_blk = (ACPI_PM1_CNT_BLK as u32).into();
    fadt.pm_tmr_blk = (ACPI_PM_TMR_BLK as u32).into();
    fadt.pm1_evt_len = ACPI_PM1_EVT_LEN;
    fadt.pm1_cnt_len = ACPI_PM1_CNT_LEN;
    fadt.pm_tmr_len = ACPI_PM_TMR_LEN;
    fadt.x_pm1a_evt_blk = io_gas(
        ACPI_PM1_EVT_BLK,
        ACPI_PM1_EVT_LEN * 8,
        AccessSize::WordAccess,
    );
    fadt.x_pm1a_cnt_blk = io_gas(
        ACPI_PM1_CNT_BLK,
        ACPI_PM1_CNT_LEN * 8,
        AccessSize::WordAccess,
    );
    fadt.x_pm_tmr_blk = io_gas(
        ACPI_PM_TMR_BLK,
        ACPI_PM_TMR_LEN * 8,
        AccessSize::DwordAccess,
    );
    // C2/C3 latencies above 100/1000 us mean "not supported".
    fadt.p_lvl2_lat = 0x0fff.into();
    fadt.p_lvl3_lat = 0x0fff.into();
    fadt.iapc_boot_arch =
        (IAPC_BOOT_ARCH_LEGACY_DEVICES | IAPC_BOOT_ARCH_8042 | IAPC_BOOT_ARCH_VGA_NOT_PRESENT)
            .into();
    // The CMOS RTC (devices::rtc) keeps the century in register 0x32.
    fadt.century = RTC_CENTURY_INDEX;
    fadt.reset_reg = io_gas(RESET_PORT, 8, AccessSize::ByteAccess);
    fadt.reset_value = RESET_VALUE;
    to_bytes(&fadt.finalize())
}

/// The FACS (version 2, no waking vector: Vireo has no S3).
pub fn build_facs() -> Vec<u8> {
    let mut facs = FACS::new();
    facs.version = 2;
    to_bytes(&facs)
}

/// Hands out addresses in the ACPI area.
struct Placer {
    next: u64,
}

impl Placer {
    fn place(&mut self, len: usize, align: u64, what: &'static str) -> Result<u64, ArchError> {
        let addr = self.next.div_ceil(align) * align;
        let end = addr + len as u64;
        if end > ACPI_END {
            return Err(ArchError::TableTooLarge {
                what,
                size: len,
                room: ACPI_END.saturating_sub(addr) as usize,
            });
        }
        self.next = end;
        Ok(addr)
    }
}

/// Builds all tables, writes them to guest memory and returns the RSDP's
/// address.
pub fn create_acpi_tables(
    mem: &GuestRam,
    num_cpus: u32,
    extra_dsdt_aml: &[u8],
) -> Result<GuestAddress, ArchError> {
    let dsdt = build_dsdt(extra_dsdt_aml);
    let madt = build_madt(num_cpus)?;
    let facs = build_facs();

    let mut placer = Placer { next: RSDP_START };
    let rsdp_addr = placer.place(Rsdp::len(), 16, "RSDP")?;
    let xsdt_len = 36 + 3 * 8;
    let xsdt_addr = placer.place(xsdt_len, 16, "XSDT")?;
    let fadt_addr = placer.place(acpi_tables::fadt::FADT::len(), 16, "FADT")?;
    // The FACS must be 64-byte aligned.
    let facs_addr = placer.place(facs.len(), 64, "FACS")?;
    let dsdt_addr = placer.place(dsdt.len(), 16, "DSDT")?;
    let madt_addr = placer.place(madt.len(), 16, "MADT")?;
    let mcfg = build_mcfg();
    let mcfg_addr = placer.place(mcfg.len(), 16, "MCFG")?;

    let fadt = build_fadt(dsdt_addr, facs_addr);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    xsdt.add_entry(mcfg_addr);
    let xsdt = to_bytes(&xsdt);
    debug_assert_eq!(xsdt.len(), xsdt_len);
    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr));

    write_bytes(mem, fadt_addr, &fadt, "ACPI FADT")?;
    write_bytes(mem, facs_addr, &facs, "ACPI FACS")?;
    write_bytes(mem, dsdt_addr, &dsdt, "ACPI DSDT")?;
    write_bytes(mem, madt_addr, &madt, "ACPI MADT")?;
    write_bytes(mem, mcfg_addr, &mcfg, "ACPI MCFG")?;
    write_bytes(mem, xsdt_addr, &xsdt, "ACPI XSDT")?;
    write_bytes(mem, rsdp_addr, &rsdp, "ACPI RSDP")?;
    Ok(GuestAddress(rsdp_addr))
}

/// The ACPI tables as firmware loads them through fw_cfg: one blob
/// (`etc/acpi/tables`), the RSDP (`etc/acpi/rsdp`) and the script
/// (`etc/table-loader`) that tells the firmware where to put them, which
/// fields are pointers to patch and which checksums to fix.
///
/// The firmware picks the addresses (the blob in high RAM, the RSDP in the
/// F segment, where OSes scan for it), so every pointer in the blob and the
/// RSDP holds an offset into the blob, and the script adds the blob's final
/// address to each. The tables are the same as [`create_acpi_tables`]
/// writes for a direct kernel boot.
#[derive(Debug, Clone)]
pub struct FwCfgAcpi {
    pub tables: Vec<u8>,
    pub rsdp: Vec<u8>,
    pub loader: Vec<u8>,
}

pub const FW_CFG_ACPI_TABLES: &str = "etc/acpi/tables";
pub const FW_CFG_ACPI_RSDP: &str = "etc/acpi/rsdp";
pub const FW_CFG_TABLE_LOADER: &str = "etc/table-loader";

/// One table-loader command is 128 bytes: a u32 command, then its fields.
const LOADER_ENTRY: usize = 128;
const LOADER_ALLOCATE: u32 = 1;
const LOADER_ADD_POINTER: u32 = 2;
const LOADER_ADD_CHECKSUM: u32 = 3;
const LOADER_ZONE_HIGH: u8 = 1;
const LOADER_ZONE_FSEG: u8 = 2;
const LOADER_NAME_LEN: usize = 56;

fn loader_name(e: &mut Vec<u8>, name: &str) {
    let mut n = [0u8; LOADER_NAME_LEN];
    n[..name.len()].copy_from_slice(name.as_bytes());
    e.extend_from_slice(&n);
}

fn loader_entry(script: &mut Vec<u8>, mut e: Vec<u8>) {
    e.resize(LOADER_ENTRY, 0);
    script.extend_from_slice(&e);
}

fn loader_allocate(script: &mut Vec<u8>, file: &str, align: u32, zone: u8) {
    let mut e = LOADER_ALLOCATE.to_le_bytes().to_vec();
    loader_name(&mut e, file);
    e.extend_from_slice(&align.to_le_bytes());
    e.push(zone);
    loader_entry(script, e);
}

/// Add `src`'s address to the `size`-byte pointer at `offset` in `dest`.
fn loader_pointer(script: &mut Vec<u8>, dest: &str, src: &str, offset: usize, size: u8) {
    let mut e = LOADER_ADD_POINTER.to_le_bytes().to_vec();
    loader_name(&mut e, dest);
    loader_name(&mut e, src);
    e.extend_from_slice(&(offset as u32).to_le_bytes());
    e.push(size);
    loader_entry(script, e);
}

/// Fix the checksum byte at `offset` so that `start..start+len` sums to 0.
fn loader_checksum(script: &mut Vec<u8>, file: &str, offset: usize, start: usize, len: usize) {
    let mut e = LOADER_ADD_CHECKSUM.to_le_bytes().to_vec();
    loader_name(&mut e, file);
    e.extend_from_slice(&(offset as u32).to_le_bytes());
    e.extend_from_slice(&(start as u32).to_le_bytes());
    e.extend_from_slice(&(len as u32).to_le_bytes());
    loader_entry(script, e);
}

/// Build the tables for firmware (see [`FwCfgAcpi`]).
pub fn fw_cfg_acpi_tables(num_cpus: u32, extra_dsdt_aml: &[u8]) -> Result<FwCfgAcpi, ArchError> {
    const T: &str = FW_CFG_ACPI_TABLES;
    const R: &str = FW_CFG_ACPI_RSDP;
    // SDT header: length at 4, checksum at 9. FADT: FIRMWARE_CTRL at 36,
    // DSDT at 40, X_DSDT at 140. XSDT entries from 36, 8 bytes each.
    // RSDP: checksum at 8 (first 20 bytes), RSDT at 16, XSDT at 24,
    // extended checksum at 32 (all 36 bytes).
    const SDT_CHECKSUM: usize = 9;
    let facs = build_facs();
    let dsdt = build_dsdt(extra_dsdt_aml);
    let madt = build_madt(num_cpus)?;
    let mcfg = build_mcfg();
    let mut blob = Vec::new();
    let put = |blob: &mut Vec<u8>, t: &[u8], align: usize| {
        blob.resize(blob.len().div_ceil(align) * align, 0);
        let at = blob.len();
        blob.extend_from_slice(t);
        at
    };
    // The FACS first: the blob is allocated 64-byte aligned, as the FACS
    // must be.
    let facs_at = put(&mut blob, &facs, 64);
    let dsdt_at = put(&mut blob, &dsdt, 16);
    let fadt = build_fadt(dsdt_at as u64, facs_at as u64);
    let fadt_at = put(&mut blob, &fadt, 16);
    let madt_at = put(&mut blob, &madt, 16);
    let mcfg_at = put(&mut blob, &mcfg, 16);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for at in [fadt_at, madt_at, mcfg_at] {
        xsdt.add_entry(at as u64);
    }
    let xsdt = to_bytes(&xsdt);
    let xsdt_at = put(&mut blob, &xsdt, 16);
    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_at as u64));

    let mut script = Vec::new();
    loader_allocate(&mut script, T, 64, LOADER_ZONE_HIGH);
    loader_allocate(&mut script, R, 16, LOADER_ZONE_FSEG);
    loader_pointer(&mut script, T, T, fadt_at + 36, 4);
    loader_pointer(&mut script, T, T, fadt_at + 40, 4);
    loader_pointer(&mut script, T, T, fadt_at + 140, 8);
    for i in 0..3 {
        loader_pointer(&mut script, T, T, xsdt_at + 36 + 8 * i, 8);
    }
    loader_pointer(&mut script, R, T, 24, 8);
    for (at, len) in [(fadt_at, fadt.len()), (xsdt_at, xsdt.len())] {
        loader_checksum(&mut script, T, at + SDT_CHECKSUM, at, len);
    }
    loader_checksum(&mut script, R, 8, 0, 20);
    loader_checksum(&mut script, R, 32, 0, rsdp.len());
    Ok(FwCfgAcpi {
        tables: blob,
        rsdp,
        loader: script,
    })
}
