//! Booting through a BIOS image (SeaBIOS) instead of a kernel: what the VMM
//! gives the firmware of QEMU's PC platform (docs/firmware.md).
//!
//! - The image is mapped at the top of the 4 GiB space (its last byte at
//!   0xffff_ffff, where the reset vector's far jump lands) as a RAM region
//!   of guest memory, and its last 128 KiB are copied to 0xe0000-0xfffff,
//!   the ISA BIOS window the CPU starts in (F000:FFF0). The whole
//!   0xc0000-0xfffff range stays plain RAM: the i440FX PAM registers read
//!   back what the firmware writes and nothing else (SeaBIOS, finding PAM
//!   "not present", copies itself from the high alias to low RAM, as it
//!   does under QEMU).
//! - fw_cfg (`devices::fw_cfg`) carries the e820 map of the RAM regions
//!   (not the image), the ACPI tables with their table-loader script
//!   (`arch::acpi::fw_cfg_acpi_tables`: the same tables a direct kernel
//!   boot gets), the CPU count, `etc/sercon-port` (COM1, so that firmware
//!   and boot loader text goes to the serial console) and
//!   `etc/show-boot-menu` = 0 (no boot menu wait).
//! - The CMOS memory-size bytes are the RTC's (`devices::rtc`), written for
//!   every VM.
//!
//! Invariants: the image region is not RAM the guest is told about; a
//! firmware boot is refused before anything is built when the image is
//! missing or not a BIOS image, or when the first disk has no boot sector
//! (a firmware finding nothing to boot would retry forever).

use std::path::{Path, PathBuf};

use devices::fw_cfg::{FwCfgItems, FILE_NAME_LEN};
use hypervisor::{CpuState, GuestRam};
use vm_memory::{Bytes, GuestAddress};

use crate::config::DiskConfig;
use crate::VmmError;

/// Sizes a BIOS image may have: a multiple of 64 KiB, at most 16 MiB
/// (SeaBIOS's are 128 or 256 KiB).
const IMAGE_ALIGN: usize = 64 << 10;
const IMAGE_MAX: usize = 16 << 20;
/// The ISA BIOS window below 1 MiB that holds the image's last 128 KiB.
const ISA_BIOS_LEN: usize = 128 << 10;
const ONE_MIB: u64 = 1 << 20;
const FOUR_GIB: u64 = 1 << 32;
/// COM1, where `etc/sercon-port` points the firmware's console.
const SERCON_PORT: u64 = 0x3f8;

/// A BIOS image read from its file.
pub(crate) struct FirmwareImage {
    pub path: PathBuf,
    pub bytes: Vec<u8>,
}

fn firmware_error(path: &Path, reason: impl Into<String>) -> VmmError {
    VmmError::Firmware {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Read the image at `path` and check that the first of `disks` can be
/// booted (it has a boot sector).
pub(crate) fn read_image(path: &Path, disks: &[DiskConfig]) -> Result<FirmwareImage, VmmError> {
    let bytes = std::fs::read(path).map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::NotFound
            && path.as_os_str() == crate::config::DEFAULT_FIRMWARE
        {
            " (install Debian's seabios package, or give --firmware PATH)"
        } else {
            ""
        };
        firmware_error(path, format!("cannot read it: {e}{hint}"))
    })?;
    if bytes.is_empty() || !bytes.len().is_multiple_of(IMAGE_ALIGN) || bytes.len() > IMAGE_MAX {
        return Err(firmware_error(
            path,
            format!(
                "is {} bytes; a BIOS image is a multiple of 64 KiB, at most 16 MiB",
                bytes.len()
            ),
        ));
    }
    // The reset vector (16 bytes below the end) must hold code: an image of
    // zeros there is not a BIOS.
    if bytes[bytes.len() - 16..].iter().all(|&b| b == 0) {
        return Err(firmware_error(
            path,
            "has no reset vector (its last 16 bytes are zero): not a BIOS image",
        ));
    }
    let disk = disks.first().ok_or_else(|| {
        VmmError::Config("firmware boot needs a disk to boot from (--disk path=...)".into())
    })?;
    check_boot_sector(disk)?;
    Ok(FirmwareImage {
        path: path.to_path_buf(),
        bytes,
    })
}

/// The first sector of `disk` ends in the 55 aa boot signature.
fn check_boot_sector(disk: &DiskConfig) -> Result<(), VmmError> {
    let mut image =
        block::open(&disk.path, disk.format, true).map_err(|source| VmmError::Disk {
            path: disk.path.clone(),
            source,
        })?;
    let mut sector = [0u8; 512];
    image
        .read_at(&mut sector, 0)
        .map_err(|source| VmmError::Disk {
            path: disk.path.clone(),
            source,
        })?;
    if sector[510..] != [0x55, 0xaa] {
        return Err(VmmError::NoBootSector {
            path: disk.path.clone(),
        });
    }
    Ok(())
}

/// Whether `gpa..gpa+len` is where a BIOS image of a valid size sits (for
/// checking a snapshot's memory layout).
pub(crate) fn is_image_region(gpa: u64, len: u64) -> bool {
    len > 0
        && len.is_multiple_of(IMAGE_ALIGN as u64)
        && len <= IMAGE_MAX as u64
        && gpa.checked_add(len) == Some(FOUR_GIB)
}

impl FirmwareImage {
    /// The guest memory region that holds the image below 4 GiB.
    pub fn region(&self) -> (GuestAddress, usize) {
        (
            GuestAddress(FOUR_GIB - self.bytes.len() as u64),
            self.bytes.len(),
        )
    }

    /// Put the image into guest memory and return the boot CPU's state:
    /// as after RESET, at F000:FFF0.
    pub fn load(&self, mem: &GuestRam) -> Result<CpuState, VmmError> {
        let write = |data: &[u8], at: u64| {
            mem.write_slice(data, GuestAddress(at)).map_err(|e| {
                firmware_error(&self.path, format!("cannot be loaded at {at:#x}: {e}"))
            })
        };
        write(&self.bytes, self.region().0 .0)?;
        let low = &self.bytes[self.bytes.len().saturating_sub(ISA_BIOS_LEN)..];
        write(low, ONE_MIB - low.len() as u64)?;
        Ok(arch::real_mode_state(0xf000, 0xfff0))
    }
}

/// QEMU's e820 entry as fw_cfg's `etc/e820` holds it: address, length
/// (u64 each) and type (u32), little-endian, packed.
fn e820_entry(out: &mut Vec<u8>, addr: u64, len: u64, kind: u32) {
    out.extend_from_slice(&addr.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
}

const E820_RAM: u32 = 1;

/// Everything fw_cfg tells the firmware of a VM with `memory` bytes of RAM
/// and `cpus` vCPUs.
pub(crate) fn fw_cfg_items(memory: u64, cpus: u32) -> Result<FwCfgItems, VmmError> {
    let cpus16 = u16::try_from(cpus)
        .map_err(|_| VmmError::Config(format!("--cpus {cpus} is too many for firmware")))?;
    let mut items = FwCfgItems::new(cpus16);
    let mut e820 = Vec::new();
    for (start, len) in arch::ram_regions(memory) {
        e820_entry(&mut e820, start.0, len as u64, E820_RAM);
    }
    let acpi = arch::acpi::fw_cfg_acpi_tables(cpus, &[])?;
    let files: [(&str, Vec<u8>); 4] = [
        ("etc/e820", e820),
        (arch::acpi::FW_CFG_ACPI_TABLES, acpi.tables),
        (arch::acpi::FW_CFG_ACPI_RSDP, acpi.rsdp),
        (arch::acpi::FW_CFG_TABLE_LOADER, acpi.loader),
    ];
    let bad = |e: devices::fw_cfg::FwCfgError| VmmError::Config(e.to_string());
    for (name, data) in files {
        debug_assert!(name.len() < FILE_NAME_LEN);
        items.add_file(name, data).map_err(bad)?;
    }
    items
        .add_int("etc/sercon-port", SERCON_PORT, 2)
        .map_err(bad)?;
    items.add_int("etc/show-boot-menu", 0, 2).map_err(bad)?;
    Ok(items)
}
