//! Kernel loading: tell an ELF vmlinux from a bzImage, check that it fits,
//! and let linux-loader copy it into guest memory.
//!
//! linux-loader trusts the file's headers; Vireo checks them first (class,
//! machine, segment bounds against the file and guest RAM, boot protocol
//! version) so that a bad file or too little memory gives a message naming
//! the problem instead of "Unable to read kernel image".

use std::io::{Read, Seek, SeekFrom};

use hypervisor::GuestRam;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    Address, ByteValued, Bytes, GuestAddress, ReadVolatile, VolatileMemoryError, VolatileSlice,
};

use crate::layout::HIMEM_START;
use crate::{align_up, low_ram_end, mem_mib, ArchError, KernelImage, KernelKind, MIB};

const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const ELF64_EHDR_SIZE: usize = 64;
const ELF64_PHDR_SIZE: usize = 56;

/// Offset of the setup header in a bzImage, and of its "HdrS" magic.
const SETUP_HEADER_OFFSET: usize = 0x1f1;
const HDRS_OFFSET: usize = 0x202;
/// The 64-bit entry is 0x200 bytes into the protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Lets linux-loader (which wants `ReadVolatile`) read from any `Read`.
struct VolatileReader<'a, F> {
    inner: &'a mut F,
    buf: Vec<u8>,
}

impl<F: Read> Read for VolatileReader<'_, F> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf)
    }
}

impl<F: Seek> Seek for VolatileReader<'_, F> {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        self.inner.seek(pos)
    }
}

impl<F: Read> ReadVolatile for VolatileReader<'_, F> {
    /// Fills `buf` completely unless the file ends first: vm-memory's
    /// `read_exact_volatile_from` calls this once per guest memory region
    /// and treats a short read as an error, so returning one chunk at a time
    /// would fail for any kernel bigger than a chunk.
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        const CHUNK: usize = 1 << 20;
        let mut done = 0;
        while done < buf.len() {
            let want = (buf.len() - done).min(CHUNK);
            self.buf.resize(want, 0);
            let n = match self.inner.read(&mut self.buf[..want]) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(VolatileMemoryError::IOError(e)),
            };
            buf.offset(done)?.copy_from(&self.buf[..n]);
            done += n;
        }
        Ok(done)
    }
}

/// Reads up to `buf.len()` bytes from the start of the file; returns how many.
fn read_head<F: Read + Seek>(f: &mut F, buf: &mut [u8]) -> Result<usize, ArchError> {
    f.seek(SeekFrom::Start(0)).map_err(ArchError::KernelRead)?;
    let mut filled = 0;
    while filled < buf.len() {
        match f.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ArchError::KernelRead(e)),
        }
    }
    Ok(filled)
}

fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}
fn le64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// Loads a kernel (ELF vmlinux or bzImage) into guest memory.
pub fn load_kernel<F: Read + Seek>(
    mem: &GuestRam,
    kernel: &mut F,
) -> Result<KernelImage, ArchError> {
    let file_len = kernel
        .seek(SeekFrom::End(0))
        .map_err(ArchError::KernelRead)?;
    if file_len == 0 {
        return Err(ArchError::EmptyKernel);
    }
    let mut head = [0u8; 0x300];
    let got = read_head(kernel, &mut head)?;
    let head = &head[..got];
    if head.starts_with(&ELF_MAGIC) {
        load_elf(mem, kernel, head, file_len)
    } else if head.len() >= HDRS_OFFSET + 4 && head[HDRS_OFFSET..HDRS_OFFSET + 4] == *b"HdrS" {
        load_bzimage(mem, kernel, head, file_len)
    } else {
        Err(ArchError::NotAKernel)
    }
}

fn too_big(mem: &GuestRam, end: u64) -> ArchError {
    ArchError::KernelTooBig {
        mem_mib: mem_mib(mem),
        need_mib: end.div_ceil(MIB),
    }
}

fn load_elf<F: Read + Seek>(
    mem: &GuestRam,
    kernel: &mut F,
    head: &[u8],
    file_len: u64,
) -> Result<KernelImage, ArchError> {
    if head.len() < ELF64_EHDR_SIZE {
        // Too short even for the identification bytes of a 64-bit header.
        if head.len() >= 19 && head[4] != ELFCLASS64 {
            return Err(ArchError::ElfNotX86_64 {
                class: head[4],
                data: head[5],
                machine: le16(head, 18),
            });
        }
        return Err(ArchError::BadElf(format!(
            "the file is {} bytes, shorter than an ELF64 header",
            head.len()
        )));
    }
    let (class, data, machine) = (head[4], head[5], le16(head, 18));
    if class != ELFCLASS64 || data != ELFDATA2LSB || machine != EM_X86_64 {
        return Err(ArchError::ElfNotX86_64 {
            class,
            data,
            machine,
        });
    }
    let entry = le64(head, 24);
    let phoff = le64(head, 32);
    let phentsize = le16(head, 54) as usize;
    let phnum = le16(head, 56) as u64;
    if phentsize != ELF64_PHDR_SIZE {
        return Err(ArchError::BadElf(format!(
            "program header entries are {phentsize} bytes, not {ELF64_PHDR_SIZE}"
        )));
    }
    let ph_end = phnum
        .checked_mul(ELF64_PHDR_SIZE as u64)
        .and_then(|n| n.checked_add(phoff))
        .filter(|&e| e <= file_len && phoff >= ELF64_EHDR_SIZE as u64)
        .ok_or_else(|| {
            ArchError::BadElf(format!(
                "{phnum} program headers at offset {phoff:#x} do not fit in the {file_len}-byte file"
            ))
        })?;
    let mut phdrs = vec![0u8; (ph_end - phoff) as usize];
    kernel
        .seek(SeekFrom::Start(phoff))
        .and_then(|_| kernel.read_exact(&mut phdrs))
        .map_err(|e| ArchError::BadElf(format!("cannot read the program headers: {e}")))?;

    let ram_end = low_ram_end(mem)?;
    let mut end = 0u64;
    let mut loadable = 0;
    let mut entry_loaded = false;
    // (start, end) of each segment's bss, which the loader does not write.
    let mut bss: Vec<(u64, u64)> = Vec::new();
    for ph in phdrs.chunks_exact(ELF64_PHDR_SIZE) {
        let (p_type, offset, paddr, filesz, memsz) = (
            le32(ph, 0),
            le64(ph, 8),
            le64(ph, 24),
            le64(ph, 32),
            le64(ph, 40),
        );
        // linux-loader skips PT_LOAD segments with nothing in the file.
        if p_type != PT_LOAD || filesz == 0 {
            continue;
        }
        loadable += 1;
        if offset.checked_add(filesz).is_none_or(|e| e > file_len) {
            return Err(ArchError::BadElf(format!(
                "a segment at file offset {offset:#x} of {filesz:#x} bytes runs past the end of the {file_len}-byte file"
            )));
        }
        if paddr < HIMEM_START {
            return Err(ArchError::KernelBelow1MiB { addr: paddr });
        }
        let seg_end = paddr
            .checked_add(memsz.max(filesz))
            .ok_or_else(|| ArchError::BadElf(format!("segment at {paddr:#x} wraps around")))?;
        if seg_end > ram_end {
            return Err(too_big(mem, seg_end));
        }
        end = end.max(seg_end);
        entry_loaded |= (paddr..paddr + filesz).contains(&entry);
        if memsz > filesz {
            bss.push((paddr + filesz, seg_end));
        }
    }
    if loadable == 0 {
        return Err(ArchError::BadElf("no loadable segments".into()));
    }
    if !entry_loaded {
        return Err(ArchError::BadElf(format!(
            "entry point {entry:#x} is not inside a loaded segment"
        )));
    }

    let mut reader = VolatileReader {
        inner: kernel,
        buf: Vec::new(),
    };
    let result = Elf::load(mem, None, &mut reader, Some(GuestAddress(HIMEM_START)))
        .map_err(|e| ArchError::BadElf(e.to_string()))?;
    // Zero the bss: on a reboot guest memory still holds the last run.
    for (start, stop) in bss {
        zero_guest(mem, start, stop)?;
    }
    let pvh_entry = match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => Some(addr),
        _ => None,
    };
    Ok(KernelImage {
        kind: KernelKind::Elf,
        entry: GuestAddress(entry),
        pvh_entry,
        setup_header: None,
        end: GuestAddress(end.max(result.kernel_end)),
    })
}

fn zero_guest(mem: &GuestRam, start: u64, stop: u64) -> Result<(), ArchError> {
    const ZEROS: [u8; 4096] = [0; 4096];
    let mut at = start;
    while at < stop {
        let n = (stop - at).min(ZEROS.len() as u64) as usize;
        mem.write_slice(&ZEROS[..n], GuestAddress(at))
            .map_err(|_| ArchError::GuestWrite {
                what: "kernel bss",
                addr: at,
            })?;
        at += n as u64;
    }
    Ok(())
}

fn load_bzimage<F: Read + Seek>(
    mem: &GuestRam,
    kernel: &mut F,
    head: &[u8],
    file_len: u64,
) -> Result<KernelImage, ArchError> {
    let hdr_len = std::mem::size_of::<setup_header>();
    if head.len() < SETUP_HEADER_OFFSET + hdr_len {
        return Err(ArchError::BadBzImage(format!(
            "the file is {} bytes, too short for a setup header",
            head.len()
        )));
    }
    let mut hdr = setup_header::default();
    hdr.as_mut_slice()
        .copy_from_slice(&head[SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + hdr_len]);
    let version = hdr.version;
    if version < 0x020c || hdr.xloadflags & 1 == 0 {
        return Err(ArchError::BzImageNot64Bit { version });
    }
    if hdr.loadflags & 1 == 0 {
        return Err(ArchError::BadBzImage(
            "not loaded high (a zImage, not a bzImage)".into(),
        ));
    }
    let setup_sects = if hdr.setup_sects == 0 {
        4
    } else {
        hdr.setup_sects as u64
    };
    let setup_size = (setup_sects + 1) * 512;
    if file_len <= setup_size {
        return Err(ArchError::BadBzImage(format!(
            "the file is {file_len} bytes, but its setup code alone is {setup_size}"
        )));
    }
    let payload = file_len - setup_size;
    let load = hdr.code32_start as u64;
    if load < HIMEM_START {
        return Err(ArchError::KernelBelow1MiB { addr: load });
    }
    // The decompressor writes the kernel at max(load aligned up to
    // kernel_alignment, pref_address) and needs init_size bytes there.
    let align = (hdr.kernel_alignment as u64).max(4096);
    let decompress_at = align_up(load, align).max(hdr.pref_address);
    let end = (load + payload).max(decompress_at.saturating_add(hdr.init_size as u64));
    if end > low_ram_end(mem)? {
        return Err(too_big(mem, end));
    }

    let mut reader = VolatileReader {
        inner: kernel,
        buf: Vec::new(),
    };
    let result = BzImage::load(mem, None, &mut reader, Some(GuestAddress(HIMEM_START)))
        .map_err(|e| ArchError::BadBzImage(e.to_string()))?;
    let load_addr = result.kernel_load.raw_value();
    Ok(KernelImage {
        kind: KernelKind::BzImage,
        entry: GuestAddress(load_addr + BZIMAGE_64BIT_ENTRY_OFFSET),
        pvh_entry: None,
        setup_header: result.setup_header,
        end: GuestAddress(end.max(result.kernel_end)),
    })
}
