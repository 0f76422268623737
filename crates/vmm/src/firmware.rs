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
//! - With a kernel (`--kernel` and `--firmware`), fw_cfg also carries the
//!   kernel as QEMU hands it over: the bzImage split into its real-mode
//!   setup (at 0x10000, with the boot protocol header filled in: loader
//!   type, heap end, command line and initrd addresses) and its protected-
//!   mode part (at 1 MiB), the initrd and the command line (at 0x20000),
//!   each with its address and size; and QEMU's option ROM
//!   `linuxboot_dma.bin` (Debian's qemu-system-data) as
//!   `genroms/linuxboot_dma.bin`, first in `bootorder`. SeaBIOS runs the
//!   ROM as a boot device; the ROM reads those items through fw_cfg DMA
//!   (moving the initrd below the top of RAM SeaBIOS reports) and jumps to
//!   the setup code in real mode, which boots the kernel as on a PC.
//!
//! - A boot order (`bootindex=N` on disks) goes to fw_cfg's `bootorder`
//!   as QEMU's device paths, which SeaBIOS matches against the devices it
//!   finds (`/pci@i0cf8/scsi@SLOT/disk@0,0` for the virtio-blk function in
//!   SLOT): the disks with an index first, lowest first, then the others
//!   in the order given, after the option ROM when a kernel is handed over.
//!   Without any index no `bootorder` names a disk and SeaBIOS tries them
//!   in PCI order, which is the order given.
//! - Firmware files outside a jail (the BIOS image, the option ROM) are
//!   read by `crate::jail::prepare` before the VMM enters it and kept here
//!   ([`preload`]); [`read_file`] takes those first.
//!
//! Invariants: the image region is not RAM the guest is told about; a
//! firmware boot is refused before anything is built when the image is
//! missing or not a BIOS image, or when the disk it boots first (the first
//! disk, or the lowest `bootindex`) or any disk with a `bootindex` has no
//! boot sector (a firmware finding nothing to boot would retry forever) --
//! unless a kernel is handed over, which then boots first and needs no
//! disk.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

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

/// Firmware files read before the VMM entered its jail, by the host path
/// the configuration names them with (the jailed VMM cannot open it).
static PRELOADED: Mutex<Vec<(PathBuf, Arc<[u8]>)>> = Mutex::new(Vec::new());

/// Keep `data` as the contents of the firmware file `path` for the rest of
/// this process (a later [`read_file`] of `path` gets it).
pub(crate) fn preload(path: &Path, data: Vec<u8>) {
    let mut files = PRELOADED.lock().unwrap_or_else(|e| e.into_inner());
    files.retain(|(p, _)| p != path);
    files.push((path.to_path_buf(), Arc::from(data)));
}

fn preloaded(path: &Path) -> Option<Arc<[u8]>> {
    let files = PRELOADED.lock().unwrap_or_else(|e| e.into_inner());
    files
        .iter()
        .find(|(p, _)| p == path)
        .map(|(_, d)| d.clone())
}

/// The contents of the firmware file `path`: as preloaded, else read now.
pub(crate) fn read_file(path: &Path) -> std::io::Result<Vec<u8>> {
    match preloaded(path) {
        Some(d) => Ok(d.to_vec()),
        None => std::fs::read(path),
    }
}

/// Whether the firmware file `path` can be had: preloaded, or a file.
pub(crate) fn file_available(path: &Path) -> std::io::Result<()> {
    if preloaded(path).is_some() {
        return Ok(());
    }
    let m = std::fs::metadata(path)?;
    if !m.is_file() {
        return Err(std::io::Error::other("not a file"));
    }
    Ok(())
}

/// The order a firmware tries `disks` in, as indices into `disks`: those
/// with a `bootindex`, lowest first, then the others in their order.
pub(crate) fn boot_order(disks: &[DiskConfig]) -> Vec<usize> {
    let mut indexed: Vec<(u32, usize)> = disks
        .iter()
        .enumerate()
        .filter_map(|(i, d)| d.bootindex.map(|n| (n, i)))
        .collect();
    indexed.sort_unstable();
    let rest = (0..disks.len()).filter(|&i| disks[i].bootindex.is_none());
    indexed.into_iter().map(|(_, i)| i).chain(rest).collect()
}

/// fw_cfg's `bootorder`: QEMU's device paths, one a line, most wanted
/// first: the option ROM when a kernel is handed over (SeaBIOS ranks a
/// ROM's boot entry after the disks unless the boot order names it; QEMU
/// gives it bootindex 0 the same way), then the virtio-blk functions in
/// `disk_slots` (PCI slots, in boot order). None when nothing is named.
fn bootorder(kernel: bool, disk_slots: &[u8]) -> Option<String> {
    let mut text = String::new();
    if kernel {
        text.push_str(&format!("/rom@{LINUXBOOT_ROM_FILE}\n"));
    }
    for slot in disk_slots {
        // SeaBIOS builds "/pci@i0cf8/*@SLOT" for each PCI device it boots
        // and matches it as a prefix, up to a '/', of these lines.
        text.push_str(&format!("/pci@i0cf8/scsi@{slot:x}/disk@0,0\n"));
    }
    (!text.is_empty()).then_some(text)
}

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

/// Read the image at `path` and check that the disk the firmware boots
/// first (the first of `disks`, or the one with the lowest `bootindex`)
/// can be booted (it has a boot sector), unless the firmware is handed a
/// kernel (`with_kernel`), which it boots instead; and that every disk
/// given a `bootindex` has one.
pub(crate) fn read_image(
    path: &Path,
    disks: &[DiskConfig],
    with_kernel: bool,
) -> Result<FirmwareImage, VmmError> {
    let bytes = read_file(path).map_err(|e| {
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
    for d in disks {
        if let Some(n) = d.bootindex {
            check_boot_sector(d).map_err(|e| match e {
                VmmError::NoBootSector { path } => VmmError::Config(format!(
                    "disk {} has bootindex={n} but cannot boot: it has no boot sector (bytes 510-511 are not 55 aa)",
                    path.display()
                )),
                other => other,
            })?;
        }
    }
    if !with_kernel {
        let first = boot_order(disks).first().copied().ok_or_else(|| {
            VmmError::Config("firmware boot needs a disk to boot from (--disk path=...)".into())
        })?;
        check_boot_sector(&disks[first])?;
    }
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
/// and `cpus` vCPUs, the kernel it is to boot, if any, and the boot order
/// of the disks: the PCI slots of the virtio-blk functions, in the order
/// the firmware is to try them (empty: no order given, the firmware's own).
pub(crate) fn fw_cfg_items(
    memory: u64,
    cpus: u32,
    kernel: Option<&FirmwareKernel>,
    smbios: Option<&SmbiosIds>,
    disk_slots: &[u8],
) -> Result<FwCfgItems, VmmError> {
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
    if let Some(ids) = smbios {
        let (anchor, tables) = smbios_tables(memory, cpus, ids);
        items
            .add_file("etc/smbios/smbios-anchor", anchor)
            .map_err(bad)?;
        items
            .add_file("etc/smbios/smbios-tables", tables)
            .map_err(bad)?;
    }
    if let Some(k) = kernel {
        add_kernel(&mut items, k, memory)?;
        let rom = read_file(Path::new(LINUXBOOT_ROM)).map_err(|e| rom_error(&e))?;
        items.add_file(LINUXBOOT_ROM_FILE, rom).map_err(bad)?;
    }
    if let Some(order) = bootorder(kernel.is_some(), disk_slots) {
        items
            .add_file("bootorder", order.into_bytes())
            .map_err(bad)?;
    }
    Ok(items)
}

/// QEMU's option ROM that boots a kernel handed over fw_cfg (using the DMA
/// interface), as Debian's qemu-system-data package installs it.
pub const LINUXBOOT_ROM: &str = "/usr/share/qemu/linuxboot_dma.bin";
/// Its fw_cfg file name: SeaBIOS runs every `genroms/` file as an option ROM.
const LINUXBOOT_ROM_FILE: &str = "genroms/linuxboot_dma.bin";

/// The error for a missing or unreadable option ROM.
pub(crate) fn rom_error(e: &std::io::Error) -> VmmError {
    VmmError::Config(format!(
        "--kernel with firmware needs QEMU's option ROM {LINUXBOOT_ROM}: cannot read it: {e} \
         (install Debian's qemu-system-data package, or boot the kernel without --firmware)"
    ))
}

/// A kernel, initrd and command line handed to the firmware.
#[derive(Debug, Clone)]
pub struct FirmwareKernel {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
}

/// Where the parts go, as QEMU places them for a bzImage of boot protocol
/// 2.02 or later: the real-mode setup at 0x10000, the command line after
/// its stack and heap at 0x20000, the protected-mode kernel at 1 MiB.
const SETUP_ADDR: u32 = 0x1_0000;
const CMDLINE_ADDR: u32 = 0x2_0000;
const KERNEL_ADDR: u32 = 0x10_0000;
/// Kept free below the top of low RAM for the firmware's own tables when
/// the initrd's first place is computed (the ROM moves it lower still when
/// the firmware reports less memory).
const FIRMWARE_RESERVE: u64 = 128 << 10;

/// Offsets in the bzImage's setup header (Documentation/x86/boot.rst).
mod hdr {
    pub const SETUP_SECTS: usize = 0x1f1;
    pub const MAGIC: usize = 0x202;
    pub const VERSION: usize = 0x206;
    pub const TYPE_OF_LOADER: usize = 0x210;
    pub const LOADFLAGS: usize = 0x211;
    pub const RAMDISK_IMAGE: usize = 0x218;
    pub const RAMDISK_SIZE: usize = 0x21c;
    pub const HEAP_END_PTR: usize = 0x224;
    pub const CMD_LINE_PTR: usize = 0x228;
    pub const INITRD_ADDR_MAX: usize = 0x22c;
    pub const CMDLINE_SIZE: usize = 0x238;
    /// The header ends here for every version this loader takes.
    pub const END: usize = 0x250;
    pub const CAN_USE_HEAP: u8 = 0x80;
    /// "Undefined" loader: no registered ID.
    pub const LOADER_UNDEFINED: u8 = 0xff;
}

fn put32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn get32(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

/// Split the bzImage of `k` as QEMU's x86 loader does and add its parts
/// (and the initrd and command line) to `items`. Errors name the file and
/// what is wrong with it.
fn add_kernel(items: &mut FwCfgItems, k: &FirmwareKernel, memory: u64) -> Result<(), VmmError> {
    let kernel_error =
        |reason: String| VmmError::Config(format!("kernel {}: {reason}", k.kernel.display()));
    let mut file = std::fs::read(&k.kernel).map_err(|source| VmmError::File {
        op: "cannot read kernel",
        path: k.kernel.clone(),
        source,
    })?;
    if file.len() < hdr::END || &file[hdr::MAGIC..hdr::MAGIC + 4] != b"HdrS" {
        return Err(kernel_error(
            "is not a bzImage (no HdrS setup header); a firmware boot hands the firmware a bzImage"
                .into(),
        ));
    }
    let version = u16::from_le_bytes([file[hdr::VERSION], file[hdr::VERSION + 1]]);
    if version < 0x202 {
        return Err(kernel_error(format!(
            "boot protocol {}.{:02} is older than 2.02, which a firmware boot needs",
            version >> 8,
            version & 0xff
        )));
    }
    let sects = match file[hdr::SETUP_SECTS] {
        0 => 4,
        n => n as usize,
    };
    let setup_len = (sects + 1) * 512;
    if setup_len >= file.len() {
        return Err(kernel_error(format!(
            "its setup code ({setup_len} bytes) is all of the file"
        )));
    }
    let cmdline_max = if version >= 0x206 {
        get32(&file, hdr::CMDLINE_SIZE) as usize
    } else {
        255
    };
    if k.cmdline.len() > cmdline_max {
        return Err(kernel_error(format!(
            "takes a command line of at most {cmdline_max} bytes; this one is {}",
            k.cmdline.len()
        )));
    }
    let low_ram = memory.min(arch::layout::MMIO_HOLE_START);
    let mut initrd_max = if version >= 0x203 {
        get32(&file, hdr::INITRD_ADDR_MAX) as u64
    } else {
        0x37ff_ffff
    };
    initrd_max = initrd_max.min(low_ram.saturating_sub(FIRMWARE_RESERVE + 1));
    let kernel_len = file.len() - setup_len;
    let kernel_end = KERNEL_ADDR as u64 + kernel_len as u64;

    file[hdr::TYPE_OF_LOADER] = hdr::LOADER_UNDEFINED;
    file[hdr::LOADFLAGS] |= hdr::CAN_USE_HEAP;
    let heap_end = (CMDLINE_ADDR - SETUP_ADDR - 0x200) as u16;
    file[hdr::HEAP_END_PTR..hdr::HEAP_END_PTR + 2].copy_from_slice(&heap_end.to_le_bytes());
    put32(&mut file, hdr::CMD_LINE_PTR, CMDLINE_ADDR);

    let initrd = match &k.initrd {
        Some(p) => Some((
            p,
            std::fs::read(p).map_err(|source| VmmError::File {
                op: "cannot read initramfs",
                path: p.clone(),
                source,
            })?,
        )),
        None => None,
    };
    let mut top = initrd_max;
    if let Some((path, data)) = &initrd {
        let len = data.len() as u64;
        let addr = initrd_max.saturating_sub(len) & !0xfff;
        if len >= initrd_max || addr < kernel_end {
            return Err(VmmError::Config(format!(
                "initramfs {} ({} MiB) and the kernel do not fit below {} MiB of guest RAM: give more --memory",
                path.display(),
                len >> 20,
                initrd_max >> 20
            )));
        }
        top = addr;
        put32(&mut file, hdr::RAMDISK_IMAGE, addr as u32);
        put32(&mut file, hdr::RAMDISK_SIZE, len as u32);
    }
    if kernel_end > top {
        return Err(kernel_error(format!(
            "({} MiB) does not fit in {} MiB of guest RAM: give more --memory",
            kernel_len >> 20,
            low_ram >> 20
        )));
    }

    let mut cmdline = k.cmdline.clone().into_bytes();
    cmdline.push(0);
    let kernel = file.split_off(setup_len);
    let setup = file;
    let int = |v: u64| (v as u32).to_le_bytes().to_vec();
    use devices::fw_cfg::*;
    items.set(FW_CFG_SETUP_ADDR, int(SETUP_ADDR as u64));
    items.set(FW_CFG_SETUP_SIZE, int(setup.len() as u64));
    items.set(FW_CFG_SETUP_DATA, setup);
    items.set(FW_CFG_KERNEL_ADDR, int(KERNEL_ADDR as u64));
    items.set(FW_CFG_KERNEL_SIZE, int(kernel.len() as u64));
    items.set(FW_CFG_KERNEL_DATA, kernel);
    items.set(FW_CFG_CMDLINE_ADDR, int(CMDLINE_ADDR as u64));
    items.set(FW_CFG_CMDLINE_SIZE, int(cmdline.len() as u64));
    items.set(FW_CFG_CMDLINE_DATA, cmdline);
    let (addr, data) = match initrd {
        Some((_, data)) => (top, data),
        None => (0, Vec::new()),
    };
    items.set(FW_CFG_INITRD_ADDR, int(addr));
    items.set(FW_CFG_INITRD_SIZE, int(data.len() as u64));
    items.set(FW_CFG_INITRD_DATA, data);
    Ok(())
}

/// What the SMBIOS tables call the machine (types 1 and 17).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmbiosIds {
    /// The product name (`--name`, else "Vireo VM").
    pub name: String,
    /// The system UUID as written (RFC 4122 byte order).
    pub uuid: [u8; 16],
}

impl SmbiosIds {
    /// The VM's name and UUID from its configuration; a UUID not given is
    /// random (version 4), new at each start.
    pub(crate) fn for_config(c: &crate::config::VmConfig) -> Result<Self, VmmError> {
        let uuid = match &c.uuid {
            Some(u) => parse_uuid(u).map_err(VmmError::Config)?,
            None => {
                let mut u = [0u8; 16];
                // The getrandom system call, not /dev/urandom: a jail has
                // no /dev/urandom.
                virtio::rng::getrandom(&mut u).map_err(|e| {
                    VmmError::Config(format!(
                        "cannot get random bytes for the VM's UUID (getrandom): {e}"
                    ))
                })?;
                u[6] = (u[6] & 0x0f) | 0x40;
                u[8] = (u[8] & 0x3f) | 0x80;
                u
            }
        };
        Ok(SmbiosIds {
            name: c.name.clone().unwrap_or_else(|| "Vireo VM".into()),
            uuid,
        })
    }
}

/// A UUID written 8-4-4-4-12 in hex digits, as its 16 bytes.
pub(crate) fn parse_uuid(text: &str) -> Result<[u8; 16], String> {
    let bad = || format!("--uuid {text:?}: expected 8-4-4-4-12 hex digits");
    let groups: Vec<&str> = text.split('-').collect();
    if groups.iter().map(|g| g.len()).collect::<Vec<_>>() != [8, 4, 4, 4, 12] {
        return Err(bad());
    }
    let hex: String = groups.concat();
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
            .map_err(|_| bad())?;
    }
    Ok(out)
}

/// One SMBIOS structure: its formatted part (type, length, handle filled
/// in here) and its strings.
fn smbios_structure(out: &mut Vec<u8>, kind: u8, handle: u16, body: &[u8], strings: &[&str]) {
    out.push(kind);
    out.push((4 + body.len()) as u8);
    out.extend_from_slice(&handle.to_le_bytes());
    out.extend_from_slice(body);
    for s in strings {
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    }
    if strings.is_empty() {
        out.push(0);
    }
    out.push(0);
}

/// The SMBIOS 2.8 tables QEMU's fw_cfg hands SeaBIOS: the 31-byte entry
/// point (`etc/smbios/smbios-anchor`; the firmware fills in the table's
/// address and the checksums) and the structures (`etc/smbios/smbios-tables`):
/// type 1 (system: manufacturer "Vireo", the name, the UUID), one type 4
/// (processor) per vCPU, type 16 (memory array) with one type 17 (memory
/// device) holding all of the RAM, type 32 (boot information) and the
/// type 127 end. There is no type 0: SeaBIOS adds its own (its vendor,
/// version and date), as under QEMU.
fn smbios_tables(memory: u64, cpus: u32, ids: &SmbiosIds) -> (Vec<u8>, Vec<u8>) {
    let mut t = Vec::new();
    let mut count: u16 = 0;
    let mut max_size = 0usize;
    let mut add = |t: &mut Vec<u8>, kind: u8, handle: u16, body: &[u8], strings: &[&str]| {
        let start = t.len();
        smbios_structure(t, kind, handle, body, strings);
        max_size = max_size.max(t.len() - start);
        count += 1;
    };
    // Type 1. SMBIOS 2.6 and later store the UUID's first three fields
    // little-endian.
    let mut uuid = ids.uuid;
    uuid[0..4].reverse();
    uuid[4..6].reverse();
    uuid[6..8].reverse();
    let mut body = vec![1, 2, 3, 0];
    body.extend_from_slice(&uuid);
    body.extend_from_slice(&[0x06, 0, 4]); // wake-up: power switch; no SKU; family
    add(
        &mut t,
        1,
        0x100,
        &body,
        &["Vireo", &ids.name, env!("CARGO_PKG_VERSION"), "Vireo"],
    );
    for cpu in 0..cpus.min(0xff) {
        let mut body = vec![1, 0x03, 0x01, 2]; // socket string, central, family "other", manufacturer
        body.extend_from_slice(&[0u8; 8]); // processor ID
        body.push(0); // version string: none
        body.push(0); // voltage: unknown
        body.extend_from_slice(&0u16.to_le_bytes()); // external clock
        body.extend_from_slice(&2000u16.to_le_bytes()); // max speed, MHz
        body.extend_from_slice(&2000u16.to_le_bytes()); // current speed
        body.push(0x41); // socket populated, CPU enabled
        body.push(0x01); // upgrade: other
        body.extend_from_slice(&[0xff; 6]); // no cache structures
        body.extend_from_slice(&[0, 0, 0]); // serial, asset tag, part number
        body.extend_from_slice(&[1, 1, 1]); // cores, enabled, threads
        body.extend_from_slice(&0x02u16.to_le_bytes()); // characteristics: unknown
        body.extend_from_slice(&0x01u16.to_le_bytes()); // family 2: other
        let socket = format!("CPU {cpu}");
        add(&mut t, 4, 0x400 + cpu as u16, &body, &[&socket, "Vireo"]);
    }
    // Type 16: the array, in KiB (extended field when 2 TiB or more).
    let kib = memory / 1024;
    let mut body = vec![0x01, 0x03, 0x03]; // other location, system memory, no ECC
    body.extend_from_slice(&(kib.min(0x8000_0000) as u32).to_le_bytes());
    body.extend_from_slice(&0xfffeu16.to_le_bytes()); // no error information
    body.extend_from_slice(&1u16.to_le_bytes()); // one device
    body.extend_from_slice(&(if kib >= 0x8000_0000 { memory } else { 0 }).to_le_bytes());
    add(&mut t, 16, 0x1000, &body, &[]);
    // Type 17: the device, in MiB (extended when 32 GiB or more).
    let mib = memory >> 20;
    let mut body = Vec::new();
    body.extend_from_slice(&0x1000u16.to_le_bytes()); // its array
    body.extend_from_slice(&0xfffeu16.to_le_bytes()); // no error information
    body.extend_from_slice(&0xffffu16.to_le_bytes()); // total width: unknown
    body.extend_from_slice(&0xffffu16.to_le_bytes()); // data width: unknown
    body.extend_from_slice(&(mib.min(0x7fff) as u16).to_le_bytes());
    body.extend_from_slice(&[0x09, 0, 1, 0, 0x07]); // DIMM, no set, "DIMM 0", no bank, RAM
    body.extend_from_slice(&0x02u16.to_le_bytes()); // type detail: other
    body.extend_from_slice(&0u16.to_le_bytes()); // speed: unknown
    body.extend_from_slice(&[2, 0, 0, 0, 0]); // manufacturer; no serial, tag, part; rank unknown
    body.extend_from_slice(&(if mib >= 0x7fff { mib as u32 } else { 0 }).to_le_bytes());
    body.extend_from_slice(&0u16.to_le_bytes()); // configured speed
    body.extend_from_slice(&[0u8; 6]); // voltages: unknown
    add(&mut t, 17, 0x1100, &body, &["DIMM 0", "Vireo"]);
    // Type 32: no errors detected at boot.
    add(&mut t, 32, 0x2000, &[0u8; 7], &[]);
    add(&mut t, 127, 0x7f00, &[], &[]);

    let mut ep = Vec::with_capacity(31);
    ep.extend_from_slice(b"_SM_");
    ep.push(0); // checksum
    ep.push(31);
    ep.extend_from_slice(&[2, 8]);
    ep.extend_from_slice(&(max_size as u16).to_le_bytes());
    ep.push(0); // entry point revision
    ep.extend_from_slice(&[0u8; 5]);
    ep.extend_from_slice(b"_DMI_");
    ep.push(0); // intermediate checksum
    ep.extend_from_slice(&(t.len() as u16).to_le_bytes());
    ep.extend_from_slice(&0u32.to_le_bytes()); // address: the firmware's
    ep.extend_from_slice(&count.to_le_bytes());
    ep.push(0x28);
    let sum = |b: &[u8]| b.iter().fold(0u8, |a, &x| a.wrapping_add(x));
    ep[21] = 0u8.wrapping_sub(sum(&ep[16..31]));
    ep[4] = 0u8.wrapping_sub(sum(&ep));
    (ep, t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_order_puts_indexed_disks_first_then_the_rest_in_order() {
        let disks: Vec<DiskConfig> = [
            "path=/a",
            "path=/b,bootindex=5",
            "path=/c",
            "path=/d,bootindex=0",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        assert_eq!(boot_order(&disks), [3, 1, 0, 2]);
        assert_eq!(boot_order(&disks[..1]), [0]);
        assert!(boot_order(&[]).is_empty());
        assert_eq!(bootorder(false, &[]), None);
        assert_eq!(
            bootorder(false, &[4, 2, 0x1a]).unwrap(),
            "/pci@i0cf8/scsi@4/disk@0,0\n/pci@i0cf8/scsi@2/disk@0,0\n/pci@i0cf8/scsi@1a/disk@0,0\n"
        );
        assert_eq!(
            bootorder(true, &[1]).unwrap(),
            "/rom@genroms/linuxboot_dma.bin\n/pci@i0cf8/scsi@1/disk@0,0\n"
        );
    }

    #[test]
    fn preloaded_files_are_read_before_the_file_system() {
        let path = Path::new("/nonexistent/vireo-preload-test/bios.bin");
        assert!(read_file(path).is_err());
        assert!(file_available(path).is_err());
        preload(path, vec![1, 2, 3]);
        assert_eq!(read_file(path).unwrap(), [1, 2, 3]);
        file_available(path).unwrap();
    }

    #[test]
    fn smbios_entry_point_and_structures_are_consistent() {
        let ids = SmbiosIds {
            name: "test-vm".into(),
            uuid: parse_uuid("01234567-89ab-cdef-0011-223344556677").unwrap(),
        };
        let (ep, t) = smbios_tables(512 << 20, 2, &ids);
        assert_eq!(ep.len(), 31);
        assert_eq!(ep.iter().fold(0u8, |a, &x| a.wrapping_add(x)), 0);
        assert_eq!(u16::from_le_bytes([ep[22], ep[23]]) as usize, t.len());
        // Walk the structures: count them, find the end.
        let (mut at, mut n, mut kinds) = (0, 0, Vec::new());
        while at < t.len() {
            let (kind, len) = (t[at], t[at + 1] as usize);
            kinds.push(kind);
            let mut end = at + len;
            while t[end] != 0 || t[end + 1] != 0 {
                end += 1;
            }
            at = end + 2;
            n += 1;
        }
        assert_eq!(at, t.len());
        assert_eq!(u16::from_le_bytes([ep[28], ep[29]]), n);
        assert_eq!(kinds, [1, 4, 4, 16, 17, 32, 127]);
        // Type 1: the UUID's first fields little-endian, strings in order.
        assert_eq!(&t[8..12], &[0x67, 0x45, 0x23, 0x01]);
        assert_eq!(&t[12..14], &[0xab, 0x89]);
        assert_eq!(
            &t[16..24],
            &[0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77]
        );
        assert!(t[..t[1] as usize + 20]
            .windows(b"Vireo\0test-vm\0".len())
            .any(|w| w == b"Vireo\0test-vm\0"));
        assert!(parse_uuid("0123").is_err());
        assert!(parse_uuid("0123456z-89ab-cdef-0011-223344556677").is_err());
    }
}
