//! The Intel MultiProcessor Specification 1.4 table, so that a kernel booted
//! without ACPI (or with `acpi=off`) still finds every vCPU and the IOAPIC.
//!
//! The 16-byte floating pointer goes in the first KiB of the EBDA
//! ([`MPTABLE_START`]), which Linux scans; it points at the configuration
//! table in the F segment ([`MPTABLE_CONFIG_START`]), which has room for
//! 255 processor entries.

use hypervisor::GuestRam;

use crate::layout::*;
use crate::{write_bytes, ArchError};

const MP_SPEC_REV: u8 = 4; // version 1.4
const MP_ENTRY_PROCESSOR: u8 = 0;
const MP_ENTRY_BUS: u8 = 1;
const MP_ENTRY_IOAPIC: u8 = 2;
const MP_ENTRY_IO_INTERRUPT: u8 = 3;
const MP_ENTRY_LOCAL_INTERRUPT: u8 = 4;

const CPU_ENABLED: u8 = 1 << 0;
const CPU_BOOT_PROCESSOR: u8 = 1 << 1;
/// Family 6 signature and the FPU + APIC feature flags, as a PC BIOS writes.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
/// Local APIC version of an integrated (xAPIC) local APIC.
const LAPIC_VERSION: u8 = 0x14;
/// IOAPIC version register value of an 82093AA-style 24-pin IOAPIC.
const IOAPIC_VERSION: u8 = 0x11;
const IOAPIC_ENABLED: u8 = 1;

const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// Interrupt flags: polarity in bits 0-1, trigger mode in bits 2-3.
const IRQ_FLAGS_CONFORM: u16 = 0;
const IRQ_FLAGS_LEVEL_ACTIVE_HIGH: u16 = 0b01 | (0b11 << 2);

const ISA_BUS_ID: u8 = 0;

/// Size of the floating pointer structure.
pub const MPF_SIZE: usize = 16;
/// Size of the configuration table header.
pub const MPC_HEADER_SIZE: usize = 44;

/// Byte that makes `data` sum to zero.
fn checksum(data: &[u8]) -> u8 {
    0u8.wrapping_sub(data.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the MP configuration table (header and entries) for `num_cpus`
/// vCPUs with LAPIC ids 0..num_cpus and the IOAPIC with id `num_cpus`.
pub fn build_config_table(num_cpus: u32) -> Result<Vec<u8>, ArchError> {
    if num_cpus == 0 {
        return Err(ArchError::NoVcpus);
    }
    if num_cpus > MAX_VCPUS {
        return Err(ArchError::TooManyVcpus(num_cpus));
    }
    let ioapic_id = num_cpus as u8;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;

    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOT_PROCESSOR } else { 0 };
        entries.extend_from_slice(&[MP_ENTRY_PROCESSOR, cpu as u8, LAPIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[MP_ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[MP_ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, IOAPIC_ENABLED]);
    entries.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    count += 1;

    // ISA IRQs to IOAPIC pins, matching the MADT's overrides: IRQ0 (the
    // PIT) is wired to pin 2, IRQ2 (the PIC cascade) is not an interrupt
    // source, the SCI (IRQ9) is level/active-high, the rest are identity
    // mapped with ISA defaults (edge, active high).
    for irq in 0u8..16 {
        if irq == 2 {
            continue;
        }
        let pin = if irq == 0 { 2 } else { irq };
        let flags = if irq == ACPI_SCI_IRQ {
            IRQ_FLAGS_LEVEL_ACTIVE_HIGH
        } else {
            IRQ_FLAGS_CONFORM
        };
        entries.extend_from_slice(&[MP_ENTRY_IO_INTERRUPT, INT_TYPE_INT]);
        entries.extend_from_slice(&flags.to_le_bytes());
        entries.extend_from_slice(&[ISA_BUS_ID, irq, ioapic_id, pin]);
        count += 1;
    }
    // The 8259 (ExtINT) on every LAPIC's LINT0, NMI on LINT1, as on a PC.
    for (kind, lint) in [(INT_TYPE_EXTINT, 0u8), (INT_TYPE_NMI, 1u8)] {
        entries.extend_from_slice(&[MP_ENTRY_LOCAL_INTERRUPT, kind]);
        entries.extend_from_slice(&IRQ_FLAGS_CONFORM.to_le_bytes());
        entries.extend_from_slice(&[ISA_BUS_ID, 0, 0xff, lint]);
        count += 1;
    }

    let length = MPC_HEADER_SIZE + entries.len();
    let mut table = Vec::with_capacity(length);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(length as u16).to_le_bytes());
    table.push(MP_SPEC_REV);
    table.push(0); // checksum, below
    table.extend_from_slice(b"VIREO   "); // OEM id, 8 bytes
    table.extend_from_slice(b"VIREO VM    "); // product id, 12 bytes
    table.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // no extended entries
    table.push(0); // extended table checksum
    table.push(0); // reserved
    debug_assert_eq!(table.len(), MPC_HEADER_SIZE);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);
    Ok(table)
}

/// Builds the 16-byte floating pointer structure pointing at `config_addr`.
pub fn build_floating_pointer(config_addr: u32) -> [u8; MPF_SIZE] {
    let mut mpf = [0u8; MPF_SIZE];
    mpf[0..4].copy_from_slice(b"_MP_");
    mpf[4..8].copy_from_slice(&config_addr.to_le_bytes());
    mpf[8] = 1; // length in 16-byte units
    mpf[9] = MP_SPEC_REV;
    // feature byte 1 = 0: a configuration table is present; feature byte 2
    // bit 7 = 0: no IMCR, the PIC is in virtual wire mode.
    mpf[10] = checksum(&mpf);
    mpf
}

/// Writes the MP floating pointer and configuration table to guest memory.
pub fn setup_mptable(mem: &GuestRam, num_cpus: u32) -> Result<(), ArchError> {
    let table = build_config_table(num_cpus)?;
    let room = (MPTABLE_CONFIG_END - MPTABLE_CONFIG_START) as usize;
    if table.len() > room {
        return Err(ArchError::TableTooLarge {
            what: "MP configuration table",
            size: table.len(),
            room,
        });
    }
    write_bytes(mem, MPTABLE_CONFIG_START, &table, "MP configuration table")?;
    let mpf = build_floating_pointer(MPTABLE_CONFIG_START as u32);
    write_bytes(mem, MPTABLE_START, &mpf, "MP floating pointer")
}
