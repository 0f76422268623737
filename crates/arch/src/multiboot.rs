//! Multiboot (version 1) kernels, loaded as QEMU's `-kernel` loads them:
//! hobby and test kernels and some hypervisors boot this way.
//!
//! A kernel is multiboot when a header (magic 0x1BADB002, flags, checksum
//! summing to zero) sits 4-byte aligned in its first 8 KiB and it is not a
//! 64-bit ELF (QEMU refuses those too). The image is placed either by the
//! header's address fields (flag 16, the "a.out kludge") or, for an ELF32
//! file, by its PT_LOAD segments at their physical addresses. The kernel
//! starts in flat 32-bit protected mode, paging off, interrupts off, with
//! EAX = 0x2BADB002 and EBX = the multiboot information structure, which
//! gives the memory sizes, the command line, the modules (each page-aligned
//! after the kernel) and the memory map (the same e820 map a Linux guest
//! gets). The boot information lives in one page below 1 MiB
//! ([`MBI_START`]); the MP and ACPI tables are written as for Linux.
//!
//! Every address and size comes from the file: each is checked against
//! the file and low RAM with checked arithmetic, and a bad one is an
//! [`ArchError::Multiboot`] naming it.

use hypervisor::{CpuState, GuestRam};

use crate::layout::{BOOT_GDT_START, EBDA_START, HIMEM_START};
use crate::{
    acpi, bootparams, e820_table, low_ram_end, mptable, protected_mode_state, write_bytes,
    ArchError,
};

pub const MULTIBOOT_MAGIC: u32 = 0x1bad_b002;
/// What the loader leaves in EAX.
pub const MULTIBOOT_BOOTLOADER_MAGIC: u32 = 0x2bad_b002;
/// The multiboot information structure, its memory map, command lines and
/// module list: one page, clear of the boot GDT (0x500), the MP floating
/// pointer and the kernel (at 1 MiB or above for real kernels).
pub const MBI_START: u64 = 0x9000;
const MBI_END: u64 = 0xa000;

/// Header flags.
const MB_PAGE_ALIGN: u32 = 1 << 0;
const MB_MEMORY_INFO: u32 = 1 << 1;
const MB_VIDEO_MODE: u32 = 1 << 2;
const MB_AOUT_KLUDGE: u32 = 1 << 16;
/// Information flags.
const MBI_MEM: u32 = 1 << 0;
const MBI_CMDLINE: u32 = 1 << 2;
const MBI_MODS: u32 = 1 << 3;
const MBI_MMAP: u32 = 1 << 6;
const MBI_LOADER_NAME: u32 = 1 << 9;

const SEARCH: usize = 8192;

fn err(msg: impl Into<String>) -> ArchError {
    ArchError::Multiboot(msg.into())
}

fn le32(b: &[u8], off: usize) -> Option<u32> {
    b.get(off..off.checked_add(4)?)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn le16(b: &[u8], off: usize) -> Option<u16> {
    b.get(off..off.checked_add(2)?)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
}

/// The multiboot header found in a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Offset of the header in the file.
    pub offset: usize,
    pub flags: u32,
    /// header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr
    /// (valid with the a.out kludge flag).
    pub addrs: [u32; 5],
}

/// The multiboot header of `file`, if it has one and is not a 64-bit ELF.
pub fn find_header(file: &[u8]) -> Option<Header> {
    if file.starts_with(b"\x7fELF") && file.get(4) == Some(&2) {
        return None;
    }
    let end = file.len().min(SEARCH);
    (0..end.saturating_sub(11)).step_by(4).find_map(|off| {
        let magic = le32(file, off)?;
        let flags = le32(file, off + 4)?;
        let sum = le32(file, off + 8)?;
        if magic != MULTIBOOT_MAGIC || magic.wrapping_add(flags).wrapping_add(sum) != 0 {
            return None;
        }
        let mut addrs = [0u32; 5];
        if flags & MB_AOUT_KLUDGE != 0 {
            for (i, a) in addrs.iter_mut().enumerate() {
                *a = le32(file, off + 12 + 4 * i)?;
            }
        }
        Some(Header {
            offset: off,
            flags,
            addrs,
        })
    })
}

/// One module: its contents and its string (command line).
pub struct Module<'a> {
    pub data: &'a [u8],
    pub cmdline: &'a str,
}

/// One piece of the image: guest address, bytes from the file, zeroed
/// bytes after them.
type Segment = (u64, Vec<u8>, u64);

/// Where the image goes, and the entry point.
fn plan(file: &[u8], h: &Header) -> Result<(Vec<Segment>, u64), ArchError> {
    if h.flags & MB_AOUT_KLUDGE != 0 {
        let [header_addr, load_addr, load_end, bss_end, entry] = h.addrs.map(|a| a as u64);
        if header_addr < load_addr {
            return Err(err(format!(
                "header_addr {header_addr:#x} is below load_addr {load_addr:#x}"
            )));
        }
        let file_off = (h.offset as u64)
            .checked_sub(header_addr - load_addr)
            .ok_or_else(|| err("load_addr lies before the start of the file"))?
            as usize;
        let len = if load_end == 0 {
            file.len()
                .checked_sub(file_off)
                .ok_or_else(|| err("load_addr lies past the end of the file"))?
        } else {
            load_end
                .checked_sub(load_addr)
                .ok_or_else(|| err("load_end_addr is below load_addr"))? as usize
        };
        let data = file
            .get(file_off..file_off.checked_add(len).ok_or_else(|| err("image size"))?)
            .ok_or_else(|| {
                err(format!(
                    "the image ({len} bytes) runs past the end of the file"
                ))
            })?;
        let image_end = load_addr + len as u64;
        let zero = if bss_end == 0 {
            0
        } else {
            bss_end
                .checked_sub(image_end)
                .ok_or_else(|| err("bss_end_addr is below the end of the image"))?
        };
        return Ok((vec![(load_addr, data.to_vec(), zero)], entry));
    }
    // ELF32: PT_LOAD segments at their physical addresses.
    if !file.starts_with(b"\x7fELF") {
        return Err(err(
            "the header has no address fields (flag 16) and the file is not ELF",
        ));
    }
    let class = file.get(4).copied();
    let machine = le16(file, 18);
    if class != Some(1) || file.get(5) != Some(&1) || machine != Some(3) {
        return Err(err(format!(
            "not a 32-bit little-endian i386 ELF (class {class:?}, machine {machine:?})"
        )));
    }
    let bad = || err("the ELF header is truncated");
    let mut entry = le32(file, 24).ok_or_else(bad)? as u64;
    let phoff = le32(file, 28).ok_or_else(bad)? as usize;
    let phentsize = le16(file, 42).ok_or_else(bad)? as usize;
    let phnum = le16(file, 44).ok_or_else(bad)? as usize;
    if phentsize < 32 {
        return Err(err(format!("program header size {phentsize} is below 32")));
    }
    let mut loads = Vec::new();
    for i in 0..phnum {
        let p = phoff
            .checked_add(i * phentsize)
            .ok_or_else(|| err("program header offset"))?;
        let field = |o: usize| {
            le32(file, p + o).ok_or_else(|| err(format!("program header {i} is truncated")))
        };
        if field(0)? != 1 {
            continue; // not PT_LOAD
        }
        let (off, vaddr, paddr) = (field(4)? as usize, field(8)? as u64, field(12)? as u64);
        let (filesz, memsz) = (field(16)? as usize, field(20)? as u64);
        if (filesz as u64) > memsz {
            return Err(err(format!("segment {i}: file size above memory size")));
        }
        let data = file
            .get(off..off.checked_add(filesz).ok_or_else(|| err("segment size"))?)
            .ok_or_else(|| err(format!("segment {i} runs past the end of the file")))?;
        // A virtual entry point inside a segment loaded elsewhere.
        if vaddr != paddr && entry >= vaddr && entry < vaddr + memsz {
            entry = entry - vaddr + paddr;
        }
        loads.push((paddr, data.to_vec(), memsz - filesz as u64));
    }
    if loads.is_empty() {
        return Err(err("the ELF file has no loadable segment"));
    }
    Ok((loads, entry))
}

/// Load the multiboot kernel `file` (which has header `h`) with its command
/// line and modules, write the boot information and tables, and return the
/// entry state.
pub fn load(
    mem: &GuestRam,
    file: &[u8],
    h: &Header,
    cmdline: &str,
    modules: &[Module],
    num_cpus: u32,
) -> Result<CpuState, ArchError> {
    // Bits 0-15 are requirements: refuse those the loader cannot meet.
    let known = MB_PAGE_ALIGN | MB_MEMORY_INFO | MB_VIDEO_MODE;
    if h.flags & 0xffff & !known != 0 {
        return Err(err(format!(
            "the kernel requires features this loader lacks (header flags {:#x})",
            h.flags
        )));
    }
    let ram_end = low_ram_end(mem)?;
    let (loads, entry) = plan(file, h)?;
    let mut kernel_end = 0u64;
    for (addr, data, zero) in &loads {
        let end = addr
            .checked_add(data.len() as u64)
            .and_then(|e| e.checked_add(*zero))
            .filter(|e| *e <= ram_end)
            .ok_or_else(|| {
                err(format!(
                    "a segment at {addr:#x} does not fit in guest RAM (ends at {ram_end:#x})"
                ))
            })?;
        // The boot GDT, the boot information, the EBDA (MP table) and the
        // BIOS area (ACPI tables) are Vireo's.
        for (lo, hi, what) in [
            (BOOT_GDT_START, MBI_END, "the boot GDT and information"),
            (EBDA_START, HIMEM_START, "the EBDA and BIOS area"),
        ] {
            if *addr < hi && end > lo {
                return Err(err(format!(
                    "a segment at {addr:#x}..{end:#x} overlaps {what} ({lo:#x}..{hi:#x})"
                )));
            }
        }
        write_bytes(mem, *addr, data, "multiboot kernel")?;
        write_bytes(
            mem,
            addr + data.len() as u64,
            &vec![0u8; *zero as usize],
            "multiboot kernel bss",
        )?;
        kernel_end = kernel_end.max(end);
    }

    // Modules, each page-aligned after the kernel.
    let mut next = kernel_end.max(HIMEM_START).next_multiple_of(4096);
    let mut placed = Vec::new();
    for m in modules {
        let end = next
            .checked_add(m.data.len() as u64)
            .filter(|e| *e <= ram_end)
            .ok_or_else(|| err(format!("module '{}' does not fit in guest RAM", m.cmdline)))?;
        write_bytes(mem, next, m.data, "multiboot module")?;
        placed.push((next, end, m.cmdline));
        next = end.next_multiple_of(4096);
    }

    // Firmware tables, as for Linux.
    bootparams::write_bda(mem)?;
    mptable::setup_mptable(mem, num_cpus)?;
    acpi::create_acpi_tables(mem, num_cpus, &[])?;
    let e820 = e820_table(mem)?;

    // The information page: MBI (0x58 bytes), then the memory map, the
    // module list, then strings.
    let mut page = vec![0u8; (MBI_END - MBI_START) as usize];
    let put32 = |page: &mut Vec<u8>, off: usize, v: u32| {
        page[off..off + 4].copy_from_slice(&v.to_le_bytes());
    };
    let mut at = 0x58usize;
    let mmap_at = at;
    for e in &e820 {
        let rec = at;
        if rec + 24 > page.len() {
            return Err(err(
                "the memory map does not fit in the boot information page",
            ));
        }
        put32(&mut page, rec, 20);
        page[rec + 4..rec + 12].copy_from_slice(&e.addr.to_le_bytes());
        page[rec + 12..rec + 20].copy_from_slice(&e.size.to_le_bytes());
        put32(&mut page, rec + 20, e.type_);
        at += 24;
    }
    let mmap_len = at - mmap_at;
    let mods_at = at;
    at += 16 * placed.len();
    let mut strings: Vec<(usize, u32)> = Vec::new();
    let add_string = |page: &mut Vec<u8>, at: &mut usize, s: &str| -> Result<u32, ArchError> {
        if s.as_bytes().contains(&0) {
            return Err(err("a command line contains a NUL byte"));
        }
        let start = *at;
        let end = start + s.len() + 1;
        if end > page.len() {
            return Err(err(
                "the command lines do not fit in the boot information page (3 KiB)",
            ));
        }
        page[start..end - 1].copy_from_slice(s.as_bytes());
        *at = end;
        Ok((MBI_START + start as u64) as u32)
    };
    if at > page.len() {
        return Err(err("too many modules for the boot information page"));
    }
    let cmdline_addr = add_string(&mut page, &mut at, cmdline)?;
    let name_addr = add_string(&mut page, &mut at, "Vireo")?;
    for (i, (start, end, s)) in placed.iter().enumerate() {
        let addr = add_string(&mut page, &mut at, s)?;
        strings.push((mods_at + 16 * i, addr));
        put32(&mut page, mods_at + 16 * i, *start as u32);
        put32(&mut page, mods_at + 16 * i + 4, *end as u32);
    }
    for (off, addr) in strings {
        put32(&mut page, off + 8, addr);
    }
    // Lower memory: up to the EBDA; upper: contiguous RAM from 1 MiB.
    let lower_kib = (EBDA_START / 1024) as u32;
    let upper_kib = ((ram_end - HIMEM_START) / 1024) as u32;
    let mut flags = MBI_MEM | MBI_CMDLINE | MBI_MMAP | MBI_LOADER_NAME;
    if !placed.is_empty() {
        flags |= MBI_MODS;
    }
    put32(&mut page, 0, flags);
    put32(&mut page, 4, lower_kib);
    put32(&mut page, 8, upper_kib);
    put32(&mut page, 16, cmdline_addr);
    put32(&mut page, 20, placed.len() as u32);
    put32(&mut page, 24, (MBI_START + mods_at as u64) as u32);
    put32(&mut page, 44, mmap_len as u32);
    put32(&mut page, 48, (MBI_START + mmap_at as u64) as u32);
    put32(&mut page, 64, name_addr);
    write_bytes(mem, MBI_START, &page, "multiboot information")?;

    let mut state = protected_mode_state(mem, entry)?;
    state.regs.rax = MULTIBOOT_BOOTLOADER_MAGIC as u64;
    state.regs.rbx = MBI_START;
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    fn mem() -> GuestRam {
        GuestRam::from_ranges(&crate::ram_regions(32 << 20)).unwrap()
    }

    /// An a.out-kludge image: header at 0, loaded at 2 MiB, 0x100 bytes of
    /// bss, entry 16 bytes past the header's end.
    fn aout(code: &[u8]) -> Vec<u8> {
        let load = 0x20_0000u32;
        let flags = MB_AOUT_KLUDGE | MB_MEMORY_INFO;
        let mut f = Vec::new();
        for w in [
            MULTIBOOT_MAGIC,
            flags,
            0u32.wrapping_sub(MULTIBOOT_MAGIC.wrapping_add(flags)),
            load,
            load,
            0,
            load + 48 + code.len() as u32 + 0x100,
            load + 48,
        ] {
            f.extend_from_slice(&w.to_le_bytes());
        }
        f.resize(48, 0);
        f.extend_from_slice(code);
        f
    }

    #[test]
    fn aout_kludge_image_loads_at_its_address_with_boot_information() {
        let m = mem();
        let file = aout(&[0xf4]);
        let h = find_header(&file).expect("header");
        let mods = [Module {
            data: b"module",
            cmdline: "mod1 arg",
        }];
        let st = load(&m, &file, &h, "kernel args", &mods, 1).unwrap();
        assert_eq!(st.regs.rip, 0x20_0030);
        assert_eq!(st.regs.rax, MULTIBOOT_BOOTLOADER_MAGIC as u64);
        assert_eq!(st.regs.rbx, MBI_START);
        let r32 = |a: u64| m.read_obj::<u32>(GuestAddress(a)).unwrap();
        let r8 = |a: u64| m.read_obj::<u8>(GuestAddress(a)).unwrap();
        assert_eq!(r8(0x20_0030), 0xf4);
        let flags = r32(MBI_START);
        assert_eq!(flags & 0x24d, 0x24d, "mem, cmdline, mods, mmap, name");
        assert_eq!(r32(MBI_START + 4), 639);
        assert_eq!(r32(MBI_START + 8), (32 << 10) - 1024);
        let mut s = [0u8; 11];
        m.read_slice(&mut s, GuestAddress(r32(MBI_START + 16) as u64))
            .unwrap();
        assert_eq!(&s, b"kernel args");
        let mods_at = r32(MBI_START + 24) as u64;
        let start = r32(mods_at) as u64;
        assert_eq!(start % 4096, 0);
        assert!(start >= 0x20_0031 + 0x100, "after the kernel and its bss");
        assert_eq!(r32(mods_at + 4) as u64, start + 6);
        assert_eq!(r8(start), b'm');
        // The memory map has RAM at 1 MiB.
        let (len, at) = (r32(MBI_START + 44) as u64, r32(MBI_START + 48) as u64);
        assert!(len >= 24);
        let found = (0..len / 24).any(|i| {
            let e = at + i * 24;
            m.read_obj::<u64>(GuestAddress(e + 4)).unwrap() == HIMEM_START && r32(e + 20) == 1
        });
        assert!(found, "RAM at 1 MiB in the memory map");
    }

    #[test]
    fn bad_images_are_errors_not_panics() {
        let m = mem();
        // No header, a broken checksum, a 64-bit ELF.
        assert!(find_header(&[0u8; 64]).is_none());
        let mut f = aout(&[0xf4]);
        f[8] ^= 1;
        assert!(find_header(&f).is_none());
        let mut elf64 = aout(&[0xf4]);
        elf64.splice(0..0, *b"\x7fELF\x02\x01\x01\0");
        assert!(find_header(&elf64).is_none());
        // Load addresses past the file, past RAM, over the boot tables.
        for (i, v) in [
            (3usize, 0x0u32), // header_addr below load_addr
            (4, 0x7fff_0000), // load_addr above header_addr
            (5, 0x10),        // load_end below load_addr
            (6, 0xffff_fff0), // bss end far past RAM
        ] {
            let mut f = aout(&[0xf4]);
            f[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
            let h = find_header(&f).unwrap();
            assert!(load(&m, &f, &h, "", &[], 1).is_err(), "field {i} = {v:#x}");
        }
        let mut f = aout(&[0xf4]);
        f[12..16].copy_from_slice(&0x9000u32.to_le_bytes());
        f[16..20].copy_from_slice(&0x9000u32.to_le_bytes());
        f[24..28].copy_from_slice(&0u32.to_le_bytes());
        let h = find_header(&f).unwrap();
        let e = load(&m, &f, &h, "", &[], 1).unwrap_err().to_string();
        assert!(e.contains("overlaps"), "{e}");
        // A required feature bit the loader does not know.
        let flags = MB_AOUT_KLUDGE | (1 << 5);
        let mut f = aout(&[0xf4]);
        f[4..8].copy_from_slice(&flags.to_le_bytes());
        f[8..12].copy_from_slice(
            &0u32
                .wrapping_sub(MULTIBOOT_MAGIC.wrapping_add(flags))
                .to_le_bytes(),
        );
        let h = find_header(&f).unwrap();
        assert!(load(&m, &f, &h, "", &[], 1).is_err());
    }
}
