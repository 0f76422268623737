//! What a kernel reads at entry: the e820 memory map, Linux's `boot_params`
//! (zero page) for the 64-bit boot protocol, and `hvm_start_info` for PVH.

use hypervisor::GuestRam;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::layout::*;
use crate::{ArchError, KernelImage};

/// e820 "usable RAM".
pub const E820_RAM: u32 = 1;
/// e820 "reserved".
pub const E820_RESERVED: u32 = 2;

/// x86 Linux's COMMAND_LINE_SIZE is 2048 bytes including the NUL.
pub(crate) const DEFAULT_CMDLINE_MAX: usize = 2047;

/// `setup_header.header`: "HdrS".
const HDRS_MAGIC: u32 = 0x5372_6448;
/// `setup_header.boot_flag`.
const BOOT_FLAG: u16 = 0xaa55;
/// Boot protocol version Vireo claims for an ELF vmlinux: 2.15, recent
/// enough that `acpi_rsdp_addr` and the 64-bit fields are honoured.
const SYNTH_BOOT_PROTOCOL: u16 = 0x020f;
/// `type_of_loader` 0xff: "undefined" loader (no assigned id).
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// `loadflags` bits.
const LOADED_HIGH: u8 = 1 << 0;
const CAN_USE_HEAP: u8 = 1 << 7;
/// `xloadflags` bits.
const XLF_KERNEL_64: u16 = 1 << 0;

/// `hvm_start_info.magic`.
pub const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;

/// One e820 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub type_: u32,
}

/// The e820 map for `mem`: RAM below the EBDA, the BIOS area reserved from
/// the EBDA to 1 MiB (EBDA, MP table, ACPI tables live there), RAM from
/// 1 MiB to the end of the first region (at most the MMIO hole), and every
/// other region (RAM above 4 GiB) as RAM.
pub fn e820_table(mem: &GuestRam) -> Result<Vec<E820Entry>, ArchError> {
    let mut table = Vec::new();
    let mut saw_low = false;
    for region in mem.iter() {
        let start = region.start_addr().raw_value();
        let end = start + region.len();
        if start == 0 {
            if end < HIMEM_START {
                return Err(ArchError::NoLowMemory);
            }
            saw_low = true;
            table.push(E820Entry {
                addr: 0,
                size: EBDA_START,
                type_: E820_RAM,
            });
            table.push(E820Entry {
                addr: EBDA_START,
                size: HIMEM_START - EBDA_START,
                type_: E820_RESERVED,
            });
            if end > HIMEM_START {
                table.push(E820Entry {
                    addr: HIMEM_START,
                    size: end - HIMEM_START,
                    type_: E820_RAM,
                });
            }
        } else {
            table.push(E820Entry {
                addr: start,
                size: region.len(),
                type_: E820_RAM,
            });
        }
    }
    if !saw_low {
        return Err(ArchError::NoLowMemory);
    }
    // Linux uses the MCFG's ECAM window only if the firmware reserved it.
    table.push(E820Entry {
        addr: PCI_ECAM_BASE,
        size: PCI_ECAM_SIZE,
        type_: E820_RESERVED,
    });
    table.sort_by_key(|e| e.addr);
    Ok(table)
}

/// The BIOS data area fields Linux reads to find the EBDA and the size of
/// base memory; with them it reserves 0x9fc00..1 MiB itself, where the MP
/// floating pointer lives.
pub(crate) fn write_bda(mem: &GuestRam) -> Result<(), ArchError> {
    let ebda_segment = (EBDA_START >> 4) as u16;
    let base_kib = (EBDA_START >> 10) as u16;
    mem.write_obj(ebda_segment, GuestAddress(BDA_EBDA_SEGMENT))
        .and_then(|_| mem.write_obj(base_kib, GuestAddress(BDA_BASE_MEM_KIB)))
        .map_err(|_| ArchError::GuestWrite {
            what: "BIOS data area",
            addr: BDA_EBDA_SEGMENT,
        })
}

/// The setup header Vireo presents for an ELF vmlinux, which has none.
fn synthesized_setup_header() -> setup_header {
    setup_header {
        boot_flag: BOOT_FLAG,
        header: HDRS_MAGIC,
        version: SYNTH_BOOT_PROTOCOL,
        loadflags: LOADED_HIGH,
        code32_start: HIMEM_START as u32,
        kernel_alignment: 0x20_0000,
        xloadflags: XLF_KERNEL_64,
        initrd_addr_max: (MMIO_HOLE_START - 1) as u32,
        cmdline_size: DEFAULT_CMDLINE_MAX as u32,
        ..Default::default()
    }
}

/// Writes `boot_params` at [`ZERO_PAGE_START`].
pub(crate) fn write_zero_page(
    mem: &GuestRam,
    kernel: &KernelImage,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
    e820: &[E820Entry],
    rsdp: GuestAddress,
) -> Result<(), ArchError> {
    let mut params = boot_params::default();
    let mut hdr = kernel.setup_header.unwrap_or_else(synthesized_setup_header);
    hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    if kernel.setup_header.is_some() {
        // The real-mode setup code is not run, but a kernel may still check
        // the heap flag; 0xfe00 is the documented value for a loader that
        // placed nothing there.
        hdr.loadflags |= CAN_USE_HEAP;
        hdr.heap_end_ptr = 0xfe00;
    } else {
        hdr.cmdline_size = cmdline_len as u32;
    }
    hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.ext_cmd_line_ptr = (CMDLINE_START >> 32) as u32;
    if let Some((addr, size)) = initrd {
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
        params.ext_ramdisk_image = (addr >> 32) as u32;
        params.ext_ramdisk_size = (size >> 32) as u32;
    }
    params.hdr = hdr;
    params.acpi_rsdp_addr = rsdp.raw_value();

    if e820.len() > params.e820_table.len() {
        return Err(ArchError::TableTooLarge {
            what: "e820 map",
            size: e820.len(),
            room: params.e820_table.len(),
        });
    }
    for (slot, e) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.type_,
        };
    }
    params.e820_entries = e820.len() as u8;

    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(|_| ArchError::GuestWrite {
            what: "zero page",
            addr: ZERO_PAGE_START,
        })
}

/// Writes `hvm_start_info` at [`PVH_INFO_START`], with the memory map and
/// (if there is an initramfs) a one-entry module list.
pub(crate) fn write_pvh_start_info(
    mem: &GuestRam,
    e820: &[E820Entry],
    initrd: Option<(u64, u64)>,
    rsdp: GuestAddress,
) -> Result<(), ArchError> {
    if e820.len() > PVH_MEMMAP_MAX_ENTRIES {
        return Err(ArchError::TableTooLarge {
            what: "PVH memory map",
            size: e820.len(),
            room: PVH_MEMMAP_MAX_ENTRIES,
        });
    }
    let write_err = |what, addr| move |_| ArchError::GuestWrite { what, addr };
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp.raw_value(),
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: e820.len() as u32,
        ..Default::default()
    };
    for (i, e) in e820.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.type_,
            reserved: 0,
        };
        let addr = PVH_MEMMAP_START + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(entry, GuestAddress(addr))
            .map_err(write_err("PVH memory map", addr))?;
    }
    if let Some((paddr, size)) = initrd {
        let module = hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(PVH_MODLIST_START))
            .map_err(write_err("PVH module list", PVH_MODLIST_START))?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_START))
        .map_err(write_err("PVH start info", PVH_INFO_START))
}

// The zero page and start info are plain old data shared with the guest.
const _: () = assert!(std::mem::size_of::<boot_params>() == 4096);
const _: () =
    assert!(std::mem::size_of::<hvm_start_info>() <= (PVH_MODLIST_START - PVH_INFO_START) as usize);
