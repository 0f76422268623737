//! x86 boot for Vireo guests: load a Linux kernel (ELF vmlinux, with or
//! without a PVH note, or a bzImage) into guest memory, write everything a
//! PC firmware would have left behind (zero page or PVH start info, e820
//! map, MP table, ACPI tables), and hand back the boot vCPU's state.
//!
//! ```ignore
//! let image = arch::load_kernel(&mem, &mut File::open(path)?)?;
//! let bsp = arch::configure_system(&mem, &image, &arch::BootConfig {
//!     cmdline: "console=ttyS0", initrd: None, num_cpus: 2,
//!     protocol: arch::EntryProtocol::Linux64,
//! })?;
//! ```

pub mod acpi;
mod bootparams;
mod cpu;
pub mod layout;
mod loader;
pub mod mptable;
pub mod multiboot;
pub mod tiny_elf;

pub use bootparams::{e820_table, E820Entry, E820_RAM, E820_RESERVED};
pub use cpu::{
    long_mode_state, protected_mode_state, real_mode_state, setup_gdt, setup_identity_paging,
    APIC_BASE_BSP, BOOT_GDT, GDT_CODE32_SELECTOR, GDT_CODE64_SELECTOR, GDT_DATA_SELECTOR,
    GDT_TSS_SELECTOR,
};
pub use loader::load_kernel;

use hypervisor::CpuState;
use hypervisor::GuestRam;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use layout::*;

const MIB: u64 = 1 << 20;

/// Everything that can go wrong while booting, in words a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    #[error("kernel is neither an ELF vmlinux nor a bzImage")]
    NotAKernel,
    #[error("kernel file is empty")]
    EmptyKernel,
    #[error("multiboot kernel: {0}")]
    Multiboot(String),
    #[error("cannot read the kernel: {0}")]
    KernelRead(#[source] std::io::Error),
    #[error("kernel is an ELF file but not a 64-bit little-endian x86 one (class {class}, data {data}, machine {machine})")]
    ElfNotX86_64 { class: u8, data: u8, machine: u16 },
    #[error("kernel ELF is malformed or truncated: {0}")]
    BadElf(String),
    #[error("kernel bzImage is malformed or truncated: {0}")]
    BadBzImage(String),
    #[error("kernel bzImage uses boot protocol {version:#06x}, which has no 64-bit entry point (need 2.12+ with XLF_KERNEL_64)")]
    BzImageNot64Bit { version: u16 },
    #[error("kernel wants to be loaded at {addr:#x}, below 1 MiB where the boot tables live")]
    KernelBelow1MiB { addr: u64 },
    #[error("guest memory ({mem_mib} MiB) is too small for the kernel (need {need_mib} MiB)")]
    KernelTooBig { mem_mib: u64, need_mib: u64 },
    #[error("guest memory ({mem_mib} MiB) is too small for the kernel and initramfs (need {need_mib} MiB)")]
    MemoryTooSmall { mem_mib: u64, need_mib: u64 },
    #[error("initramfs ({initrd_bytes} bytes) does not fit between the kernel's end ({kernel_end:#x}) and the highest address this kernel accepts for it ({limit:#x})")]
    InitrdAboveLimit {
        initrd_bytes: u64,
        kernel_end: u64,
        limit: u64,
    },
    #[error("guest memory must start at address 0 and cover at least the first MiB")]
    NoLowMemory,
    #[error("kernel command line is {len} bytes; this kernel accepts at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("kernel command line contains a NUL byte")]
    CmdlineHasNul,
    #[error("at least one vCPU is needed")]
    NoVcpus,
    #[error("{0} vCPUs requested; the MP and ACPI tables describe at most 255 (xAPIC ids are 8 bits and 0xff is the broadcast id)")]
    TooManyVcpus(u32),
    #[error("PVH boot requested but the kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); use the 64-bit Linux boot protocol")]
    NoPvhEntry,
    #[error("entry point {0:#x} is above 4 GiB, out of reach in 32-bit mode")]
    EntryNotIn32Bits(u64),
    #[error("cannot write the {what} to guest memory at {addr:#x} (outside RAM?)")]
    GuestWrite { what: &'static str, addr: u64 },
    #[error("the {what} needs {size} bytes but only {room} fit in its area")]
    TableTooLarge {
        what: &'static str,
        size: usize,
        room: usize,
    },
    #[error("boot page tables can map at most {max:#x} bytes, {requested:#x} requested")]
    IdentityMapTooLarge { requested: u64, max: u64 },
}

/// What kind of file the kernel was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelKind {
    /// An uncompressed ELF vmlinux, loaded at its segments' physical addresses.
    Elf,
    /// A bzImage: the protected-mode part loaded at `code32_start`.
    BzImage,
}

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryProtocol {
    /// The 64-bit Linux boot protocol: long mode, `startup_64` with
    /// `boot_params` (the zero page) in RSI.
    Linux64,
    /// The PVH boot protocol: 32-bit protected mode, paging off, at the
    /// ELF note's entry, with `hvm_start_info` in EBX.
    Pvh,
}

/// A kernel loaded into guest memory.
#[derive(Debug, Clone, Copy)]
pub struct KernelImage {
    pub kind: KernelKind,
    /// The 64-bit entry point (for a bzImage: load address + 0x200).
    pub entry: GuestAddress,
    /// The PVH 32-bit entry, if the ELF kernel has a PVH note.
    pub pvh_entry: Option<GuestAddress>,
    /// The bzImage's setup header (None for an ELF vmlinux).
    pub setup_header: Option<linux_loader::loader::bootparam::setup_header>,
    /// First byte past everything the kernel occupies, including a bzImage's
    /// decompression area (`init_size`); the initramfs goes above it.
    pub end: GuestAddress,
}

/// What to boot with.
#[derive(Debug, Clone, Copy)]
pub struct BootConfig<'a> {
    pub cmdline: &'a str,
    pub initrd: Option<&'a [u8]>,
    pub num_cpus: u32,
    pub protocol: EntryProtocol,
}

/// The RAM regions for `mem_size` bytes of guest memory: below the 32-bit
/// MMIO hole, and the rest above 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(GuestAddress, usize)> {
    if mem_size <= MMIO_HOLE_START {
        vec![(GuestAddress(0), mem_size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_HOLE_START as usize),
            (
                GuestAddress(MMIO_HOLE_END),
                (mem_size - MMIO_HOLE_START) as usize,
            ),
        ]
    }
}

/// Total guest RAM in MiB (rounded down), for messages.
fn mem_mib(mem: &GuestRam) -> u64 {
    mem.iter().map(|r| r.len()).sum::<u64>() / MIB
}

/// End of the RAM region that starts at 0, capped at the MMIO hole: the
/// kernel, command line and initramfs must all fit below it.
fn low_ram_end(mem: &GuestRam) -> Result<u64, ArchError> {
    let region = mem
        .find_region(GuestAddress(0))
        .ok_or(ArchError::NoLowMemory)?;
    let end = region.start_addr().raw_value() + region.len();
    if end < HIMEM_START {
        return Err(ArchError::NoLowMemory);
    }
    Ok(end.min(MMIO_HOLE_START))
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// Where the initramfs goes: page-aligned, as high as allowed (below
/// `addr_max`, the MMIO hole and the end of low RAM), above the kernel.
pub fn initrd_load_addr(
    mem: &GuestRam,
    kernel_end: u64,
    initrd_size: u64,
    addr_max: u64,
) -> Result<u64, ArchError> {
    let ram_end = low_ram_end(mem)?;
    let limit = ram_end.min(addr_max.saturating_add(1));
    let lowest = align_up(kernel_end.max(HIMEM_START), 4096);
    let needed_end = lowest.saturating_add(initrd_size);
    if needed_end <= limit {
        // limit - size >= lowest, and lowest is page-aligned, so aligning
        // down never drops below the kernel.
        return Ok((limit - initrd_size) & !0xfff);
    }
    if needed_end <= ram_end {
        return Err(ArchError::InitrdAboveLimit {
            initrd_bytes: initrd_size,
            kernel_end,
            limit: addr_max,
        });
    }
    Err(ArchError::MemoryTooSmall {
        mem_mib: mem_mib(mem),
        need_mib: needed_end.div_ceil(MIB),
    })
}

/// The highest address a kernel accepts for the initramfs's last byte.
fn initrd_addr_max(kernel: &KernelImage) -> u64 {
    match &kernel.setup_header {
        // Boot protocol < 2.03 has no such field; the documented default.
        Some(h) if h.version < 0x0203 => 0x37ff_ffff,
        Some(h) => h.initrd_addr_max as u64,
        // An ELF vmlinux entered in 64-bit mode, or PVH: anything below the hole.
        None => MMIO_HOLE_START - 1,
    }
}

/// The longest command line (without NUL) the kernel takes.
fn cmdline_max(kernel: &KernelImage) -> usize {
    match &kernel.setup_header {
        Some(h) if h.version >= 0x0206 => h.cmdline_size as usize,
        Some(_) => 255,
        // x86's COMMAND_LINE_SIZE is 2048 including the NUL.
        None => bootparams::DEFAULT_CMDLINE_MAX,
    }
    .min(CMDLINE_MAX_SIZE - 1)
}

/// Writes the command line, initramfs, e820/PVH memory map, zero page or
/// start info, MP table and ACPI tables, and returns the boot vCPU's state.
pub fn configure_system(
    mem: &GuestRam,
    kernel: &KernelImage,
    cfg: &BootConfig,
) -> Result<CpuState, ArchError> {
    configure_system_with_dsdt(mem, kernel, cfg, &[])
}

/// [`configure_system`], with extra AML (device objects, `_PRT`, ...)
/// appended to the DSDT after Vireo's own objects.
pub fn configure_system_with_dsdt(
    mem: &GuestRam,
    kernel: &KernelImage,
    cfg: &BootConfig,
    extra_dsdt_aml: &[u8],
) -> Result<CpuState, ArchError> {
    if cfg.num_cpus == 0 {
        return Err(ArchError::NoVcpus);
    }
    if cfg.num_cpus > MAX_VCPUS {
        return Err(ArchError::TooManyVcpus(cfg.num_cpus));
    }
    let ram_end = low_ram_end(mem)?;
    if kernel.end.raw_value() > ram_end {
        return Err(ArchError::KernelTooBig {
            mem_mib: mem_mib(mem),
            need_mib: kernel.end.raw_value().div_ceil(MIB),
        });
    }
    let pvh_entry = match cfg.protocol {
        EntryProtocol::Pvh => Some(kernel.pvh_entry.ok_or(ArchError::NoPvhEntry)?),
        EntryProtocol::Linux64 => None,
    };

    // Command line.
    if cfg.cmdline.as_bytes().contains(&0) {
        return Err(ArchError::CmdlineHasNul);
    }
    let max = cmdline_max(kernel);
    if cfg.cmdline.len() > max {
        return Err(ArchError::CmdlineTooLong {
            len: cfg.cmdline.len(),
            max,
        });
    }
    let mut cmdline = cfg.cmdline.as_bytes().to_vec();
    cmdline.push(0);
    write_bytes(mem, CMDLINE_START, &cmdline, "kernel command line")?;

    // Initramfs.
    let initrd = match cfg.initrd {
        Some(data) if !data.is_empty() => {
            let addr = initrd_load_addr(
                mem,
                kernel.end.raw_value(),
                data.len() as u64,
                initrd_addr_max(kernel),
            )?;
            write_bytes(mem, addr, data, "initramfs")?;
            Some((addr, data.len() as u64))
        }
        _ => None,
    };

    // Firmware-ish tables, the same for both entry protocols.
    bootparams::write_bda(mem)?;
    mptable::setup_mptable(mem, cfg.num_cpus)?;
    let rsdp = acpi::create_acpi_tables(mem, cfg.num_cpus, extra_dsdt_aml)?;
    let e820 = e820_table(mem)?;

    match pvh_entry {
        Some(entry) => {
            bootparams::write_pvh_start_info(mem, &e820, initrd, rsdp)?;
            let mut state = protected_mode_state(mem, entry.raw_value())?;
            state.regs.rbx = PVH_INFO_START;
            Ok(state)
        }
        None => {
            bootparams::write_zero_page(mem, kernel, cmdline.len() - 1, initrd, &e820, rsdp)?;
            let mut state = long_mode_state(mem, kernel.entry.raw_value())?;
            state.regs.rsi = ZERO_PAGE_START;
            Ok(state)
        }
    }
}

pub(crate) fn write_bytes(
    mem: &GuestRam,
    addr: u64,
    data: &[u8],
    what: &'static str,
) -> Result<(), ArchError> {
    use vm_memory::Bytes;
    mem.write_slice(data, GuestAddress(addr))
        .map_err(|_| ArchError::GuestWrite { what, addr })
}

#[cfg(test)]
mod tests;
