//! Tests of the whole boot set-up through the public API, checking what
//! lands in guest memory with independent parsers (byte offsets from the
//! ACPI, MP and Linux boot protocol specifications, not the structs the
//! code under test uses).

use std::io::Cursor;

use hypervisor::GuestRam;
use hypervisor::{CR0_PE, CR0_PG, EFER_LMA};
use vm_memory::{Bytes, GuestAddress};

use crate::layout::*;
use crate::*;

const MIB: u64 = 1 << 20;

fn mem(size: u64) -> GuestRam {
    GuestRam::from_ranges(&ram_regions(size)).unwrap()
}

fn read(m: &GuestRam, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    m.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}
fn r8(m: &GuestRam, a: u64) -> u8 {
    m.read_obj(GuestAddress(a)).unwrap()
}
fn r16(m: &GuestRam, a: u64) -> u16 {
    m.read_obj(GuestAddress(a)).unwrap()
}
fn r32(m: &GuestRam, a: u64) -> u32 {
    m.read_obj(GuestAddress(a)).unwrap()
}
fn r64(m: &GuestRam, a: u64) -> u64 {
    m.read_obj(GuestAddress(a)).unwrap()
}
fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
}

// ---------------------------------------------------------------------------
// Synthetic kernels.

const ELF_LOAD: u64 = 0x100_0000;
const ELF_PVH_ENTRY: u64 = 0x100_0040;
const ELF_CODE: &[u8] = b"\xf4\xeb\xfd synthetic kernel text";

/// A minimal x86-64 ELF vmlinux: one PT_LOAD at 16 MiB (with a bss), and,
/// if `pvh`, a PT_NOTE holding an unrelated note and then the Xen
/// PHYS32_ENTRY note (type 18).
fn synthetic_elf(pvh: bool) -> Vec<u8> {
    let phnum: u16 = if pvh { 2 } else { 1 };
    let mut f = vec![0u8; 0x1000];
    // ELF header.
    f[0..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // ELFCLASS64
    f[5] = 1; // little-endian
    f[6] = 1; // EV_CURRENT
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&ELF_LOAD.to_le_bytes()); // e_entry
    f[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    f[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    f[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    f[56..58].copy_from_slice(&phnum.to_le_bytes());
    let phdr =
        |f: &mut Vec<u8>, i: usize, p_type: u32, off: u64, addr: u64, filesz: u64, memsz: u64| {
            let b = 64 + i * 56;
            f[b..b + 4].copy_from_slice(&p_type.to_le_bytes());
            f[b + 4..b + 8].copy_from_slice(&7u32.to_le_bytes());
            f[b + 8..b + 16].copy_from_slice(&off.to_le_bytes());
            f[b + 16..b + 24].copy_from_slice(&addr.to_le_bytes());
            f[b + 24..b + 32].copy_from_slice(&addr.to_le_bytes());
            f[b + 32..b + 40].copy_from_slice(&filesz.to_le_bytes());
            f[b + 40..b + 48].copy_from_slice(&memsz.to_le_bytes());
            f[b + 48..b + 56].copy_from_slice(&4096u64.to_le_bytes());
        };
    phdr(&mut f, 0, 1, 0x1000, ELF_LOAD, 0x100, 0x20_0000);
    if pvh {
        let mut notes = Vec::new();
        // An unrelated note first, so the parser has to skip one.
        notes.extend_from_slice(&4u32.to_le_bytes());
        notes.extend_from_slice(&8u32.to_le_bytes());
        notes.extend_from_slice(&1u32.to_le_bytes());
        notes.extend_from_slice(b"GNU\0");
        notes.extend_from_slice(&[0xaa; 8]);
        // XEN_ELFNOTE_PHYS32_ENTRY.
        notes.extend_from_slice(&4u32.to_le_bytes());
        notes.extend_from_slice(&4u32.to_le_bytes());
        notes.extend_from_slice(&18u32.to_le_bytes());
        notes.extend_from_slice(b"Xen\0");
        notes.extend_from_slice(&(ELF_PVH_ENTRY as u32).to_le_bytes());
        f[0x200..0x200 + notes.len()].copy_from_slice(&notes);
        phdr(
            &mut f,
            1,
            4,
            0x200,
            0,
            notes.len() as u64,
            notes.len() as u64,
        );
    }
    f.resize(0x1100, 0);
    f[0x1000..0x1000 + ELF_CODE.len()].copy_from_slice(ELF_CODE);
    f
}

const BZ_SETUP_SECTS: u8 = 1;
const BZ_PAYLOAD_LEN: usize = 0x3000;
const BZ_PREF_ADDRESS: u64 = 0x100_0000;
const BZ_INIT_SIZE: u32 = 0x40_0000;

/// A minimal bzImage: one setup sector after the boot sector, a boot
/// protocol 2.15 header, and a payload that is just a byte pattern.
fn synthetic_bzimage(version: u16, initrd_addr_max: u32) -> Vec<u8> {
    let setup_size = (BZ_SETUP_SECTS as usize + 1) * 512;
    let mut f = vec![0u8; setup_size + BZ_PAYLOAD_LEN];
    let put = |f: &mut Vec<u8>, off: usize, v: &[u8]| f[off..off + v.len()].copy_from_slice(v);
    put(&mut f, 0x1f1, &[BZ_SETUP_SECTS]);
    put(&mut f, 0x1fe, &0xaa55u16.to_le_bytes());
    put(&mut f, 0x202, b"HdrS");
    put(&mut f, 0x206, &version.to_le_bytes());
    put(&mut f, 0x211, &[0x01]); // LOADED_HIGH
    put(&mut f, 0x214, &0x10_0000u32.to_le_bytes()); // code32_start
    put(&mut f, 0x22c, &initrd_addr_max.to_le_bytes());
    put(&mut f, 0x230, &0x20_0000u32.to_le_bytes()); // kernel_alignment
    put(&mut f, 0x234, &[1]); // relocatable
    put(&mut f, 0x236, &0x3u16.to_le_bytes()); // XLF_KERNEL_64 | CAN_BE_LOADED_ABOVE_4G
    put(&mut f, 0x238, &2047u32.to_le_bytes()); // cmdline_size
    put(&mut f, 0x258, &BZ_PREF_ADDRESS.to_le_bytes());
    put(&mut f, 0x260, &BZ_INIT_SIZE.to_le_bytes());
    for (i, b) in f[setup_size..].iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    f
}

fn linux64<'a>(cmdline: &'a str, initrd: Option<&'a [u8]>, num_cpus: u32) -> BootConfig<'a> {
    BootConfig {
        cmdline,
        initrd,
        num_cpus,
        protocol: EntryProtocol::Linux64,
    }
}

// ---------------------------------------------------------------------------
// Independent table parsers.

#[derive(Debug)]
struct Table {
    addr: u64,
    bytes: Vec<u8>,
}

/// Reads an ACPI SDT at `addr`, checking its length and checksum.
fn read_sdt(m: &GuestRam, addr: u64, sig: &[u8; 4]) -> Table {
    let head = read(m, addr, 36);
    assert_eq!(&head[0..4], sig, "signature at {addr:#x}");
    let len = u32::from_le_bytes(head[4..8].try_into().unwrap()) as usize;
    assert!(len >= 36, "{} length {len}", String::from_utf8_lossy(sig));
    assert!(
        addr + len as u64 <= HIMEM_START,
        "tables stay in the BIOS area"
    );
    let bytes = read(m, addr, len);
    assert_eq!(sum(&bytes), 0, "{} checksum", String::from_utf8_lossy(sig));
    assert_eq!(&bytes[10..16], b"VIREO ", "OEM id");
    Table { addr, bytes }
}

struct Acpi {
    rsdp: u64,
    tables: Vec<Table>,
    dsdt: Table,
    facs_addr: u64,
}

impl Acpi {
    fn get(&self, sig: &[u8; 4]) -> &Table {
        self.tables
            .iter()
            .find(|t| &t.bytes[0..4] == sig)
            .unwrap_or_else(|| panic!("no {} table", String::from_utf8_lossy(sig)))
    }
}

/// Finds the RSDP the way Linux does without a hint (16-byte steps in
/// 0xe0000..0xfffff), then walks XSDT -> tables, FADT -> DSDT and FACS.
fn parse_acpi(m: &GuestRam) -> Acpi {
    let rsdp = (0xe0000u64..0x100000)
        .step_by(16)
        .find(|&a| read(m, a, 8) == b"RSD PTR ")
        .expect("RSDP in 0xe0000..0xfffff");
    let r = read(m, rsdp, 36);
    assert_eq!(sum(&r[0..20]), 0, "RSDP checksum");
    assert_eq!(r[15], 2, "RSDP revision 2 (ACPI 2.0+)");
    assert_eq!(u32::from_le_bytes(r[20..24].try_into().unwrap()), 36);
    assert_eq!(sum(&r), 0, "RSDP extended checksum");
    let xsdt_addr = u64::from_le_bytes(r[24..32].try_into().unwrap());
    let xsdt = read_sdt(m, xsdt_addr, b"XSDT");
    let entries = (xsdt.bytes.len() - 36) / 8;
    assert_eq!((xsdt.bytes.len() - 36) % 8, 0);
    let mut tables = Vec::new();
    for i in 0..entries {
        let o = 36 + i * 8;
        let addr = u64::from_le_bytes(xsdt.bytes[o..o + 8].try_into().unwrap());
        let sig: [u8; 4] = read(m, addr, 4).try_into().unwrap();
        tables.push(read_sdt(m, addr, &sig));
    }
    let fadt = tables
        .iter()
        .find(|t| &t.bytes[0..4] == b"FACP")
        .expect("FADT in XSDT");
    let x_dsdt = u64::from_le_bytes(fadt.bytes[140..148].try_into().unwrap());
    let dsdt32 = u32::from_le_bytes(fadt.bytes[40..44].try_into().unwrap()) as u64;
    assert_ne!(x_dsdt, 0);
    assert!(dsdt32 == 0 || dsdt32 == x_dsdt, "DSDT and X_DSDT agree");
    let dsdt = read_sdt(m, x_dsdt, b"DSDT");
    // The FACS is below 4 GiB: FIRMWARE_CTRL holds it, X_FIRMWARE_CTRL is 0.
    let facs_addr = u32::from_le_bytes(fadt.bytes[36..40].try_into().unwrap()) as u64;
    assert_eq!(
        u64::from_le_bytes(fadt.bytes[132..140].try_into().unwrap()),
        0
    );
    assert_eq!(facs_addr % 64, 0, "FACS 64-byte aligned");
    assert_eq!(read(m, facs_addr, 4), b"FACS");
    assert_eq!(r32(m, facs_addr + 4), 64);
    // No table overlaps another.
    let mut spans: Vec<(u64, u64)> = tables
        .iter()
        .chain([&xsdt, &dsdt])
        .map(|t| (t.addr, t.addr + t.bytes.len() as u64))
        .chain([(rsdp, rsdp + 36), (facs_addr, facs_addr + 64)])
        .collect();
    spans.sort();
    for w in spans.windows(2) {
        assert!(w[0].1 <= w[1].0, "ACPI tables overlap: {spans:x?}");
    }
    Acpi {
        rsdp,
        tables,
        dsdt,
        facs_addr,
    }
}

#[derive(Debug, Default)]
struct Madt {
    lapic_addr: u32,
    flags: u32,
    lapics: Vec<(u8, u8, u32)>,
    ioapics: Vec<(u8, u32, u32)>,
    overrides: Vec<(u8, u8, u32, u16)>,
    nmis: Vec<(u8, u16, u8)>,
}

fn parse_madt(t: &Table) -> Madt {
    let b = &t.bytes;
    let mut madt = Madt {
        lapic_addr: u32::from_le_bytes(b[36..40].try_into().unwrap()),
        flags: u32::from_le_bytes(b[40..44].try_into().unwrap()),
        ..Default::default()
    };
    let mut o = 44;
    while o < b.len() {
        let (ty, len) = (b[o], b[o + 1] as usize);
        assert!(len >= 2 && o + len <= b.len(), "MADT entry at {o} overruns");
        let e = &b[o..o + len];
        match ty {
            0 => {
                assert_eq!(len, 8);
                madt.lapics
                    .push((e[2], e[3], u32::from_le_bytes(e[4..8].try_into().unwrap())));
            }
            1 => {
                assert_eq!(len, 12);
                madt.ioapics.push((
                    e[2],
                    u32::from_le_bytes(e[4..8].try_into().unwrap()),
                    u32::from_le_bytes(e[8..12].try_into().unwrap()),
                ));
            }
            2 => {
                assert_eq!(len, 10);
                madt.overrides.push((
                    e[2],
                    e[3],
                    u32::from_le_bytes(e[4..8].try_into().unwrap()),
                    u16::from_le_bytes(e[8..10].try_into().unwrap()),
                ));
            }
            4 => {
                assert_eq!(len, 6);
                madt.nmis
                    .push((e[2], u16::from_le_bytes(e[3..5].try_into().unwrap()), e[5]));
            }
            other => panic!("unexpected MADT entry type {other}"),
        }
        o += len;
    }
    assert_eq!(o, b.len());
    madt
}

#[derive(Debug, Default)]
struct MpTable {
    cpus: Vec<(u8, u8)>,
    buses: Vec<(u8, [u8; 6])>,
    ioapics: Vec<(u8, u8, u32)>,
    io_ints: Vec<(u8, u16, u8, u8, u8, u8)>,
    local_ints: Vec<(u8, u8, u8)>,
    lapic_addr: u32,
}

/// Finds the MP floating pointer where Linux looks (first KiB of the EBDA,
/// the last KiB of base memory, the F segment) and walks the config table.
fn parse_mptable(m: &GuestRam) -> MpTable {
    let ebda = (r16(m, 0x40e) as u64) << 4;
    let candidates = [(ebda, 1024u64), (639 * 1024, 1024), (0xf0000, 0x10000)];
    let mpf = candidates
        .iter()
        .flat_map(|&(base, len)| (base..base + len).step_by(16))
        .find(|&a| read(m, a, 4) == b"_MP_")
        .expect("MP floating pointer");
    let f = read(m, mpf, 16);
    assert_eq!(sum(&f), 0, "MP floating pointer checksum");
    assert_eq!(f[8], 1, "length 1 paragraph");
    assert_eq!(f[9], 4, "spec revision 1.4");
    assert_eq!(f[11], 0, "feature byte 1: config table present");
    let cfg = u32::from_le_bytes(f[4..8].try_into().unwrap()) as u64;
    let head = read(m, cfg, 44);
    assert_eq!(&head[0..4], b"PCMP");
    let len = u16::from_le_bytes(head[4..6].try_into().unwrap()) as usize;
    let table = read(m, cfg, len);
    assert_eq!(sum(&table), 0, "MP config table checksum");
    assert!(cfg + len as u64 <= HIMEM_START);
    let count = u16::from_le_bytes(table[34..36].try_into().unwrap());
    let mut mp = MpTable {
        lapic_addr: u32::from_le_bytes(table[36..40].try_into().unwrap()),
        ..Default::default()
    };
    let mut o = 44;
    for _ in 0..count {
        let e = &table[o..];
        match e[0] {
            0 => {
                mp.cpus.push((e[1], e[3]));
                o += 20;
            }
            1 => {
                mp.buses.push((e[1], e[2..8].try_into().unwrap()));
                o += 8;
            }
            2 => {
                mp.ioapics
                    .push((e[1], e[3], u32::from_le_bytes(e[4..8].try_into().unwrap())));
                o += 8;
            }
            3 => {
                mp.io_ints.push((
                    e[1],
                    u16::from_le_bytes(e[2..4].try_into().unwrap()),
                    e[4],
                    e[5],
                    e[6],
                    e[7],
                ));
                o += 8;
            }
            4 => {
                mp.local_ints.push((e[1], e[6], e[7]));
                o += 8;
            }
            t => panic!("unknown MP entry type {t}"),
        }
    }
    assert_eq!(o, len, "entry count matches table length");
    mp
}

/// e820 entries from a zero page at `zp`, read by Linux's offsets.
fn zero_page_e820(m: &GuestRam, zp: u64) -> Vec<(u64, u64, u32)> {
    let n = r8(m, zp + 0x1e8) as u64;
    (0..n)
        .map(|i| {
            let a = zp + 0x2d0 + i * 20;
            (r64(m, a), r64(m, a + 8), r32(m, a + 16))
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Memory layout.

#[test]
fn ram_regions_split_around_the_mmio_hole() {
    assert_eq!(
        ram_regions(64 * MIB),
        vec![(GuestAddress(0), (64 * MIB) as usize)]
    );
    assert_eq!(
        ram_regions(MMIO_HOLE_START),
        vec![(GuestAddress(0), MMIO_HOLE_START as usize)]
    );
    assert_eq!(
        ram_regions(4 << 30),
        vec![
            (GuestAddress(0), MMIO_HOLE_START as usize),
            (GuestAddress(1 << 32), (1 << 30) as usize)
        ]
    );
}

#[test]
fn e820_for_small_memory() {
    let m = mem(64 * MIB);
    let e = e820_table(&m).unwrap();
    assert_eq!(
        e,
        vec![
            E820Entry {
                addr: 0,
                size: 0x9fc00,
                type_: E820_RAM
            },
            E820Entry {
                addr: 0x9fc00,
                size: 0x100000 - 0x9fc00,
                type_: E820_RESERVED
            },
            E820Entry {
                addr: 0x100000,
                size: 63 * MIB,
                type_: E820_RAM
            },
            E820Entry {
                addr: PCI_ECAM_BASE,
                size: PCI_ECAM_SIZE,
                type_: E820_RESERVED
            },
        ]
    );
}

#[test]
fn e820_with_memory_above_4gib() {
    // Mappings are lazy: 5 GiB of address space costs nothing here.
    let m = mem(5 << 30);
    let e = e820_table(&m).unwrap();
    assert_eq!(e.len(), 5);
    assert_eq!(
        (e[2].addr, e[2].addr + e[2].size),
        (HIMEM_START, MMIO_HOLE_START)
    );
    assert_eq!(
        (e[3].addr, e[3].size, e[3].type_),
        (PCI_ECAM_BASE, PCI_ECAM_SIZE, E820_RESERVED)
    );
    assert_eq!(
        (e[4].addr, e[4].size, e[4].type_),
        (1 << 32, 2 << 30, E820_RAM)
    );
    // No RAM in the hole; only ECAM is reserved there.
    assert!(e.iter().all(|x| x.type_ != E820_RAM
        || x.addr + x.size <= MMIO_HOLE_START
        || x.addr >= MMIO_HOLE_END));
}

#[test]
fn memory_must_cover_the_first_mib() {
    let m = GuestRam::from_ranges(&[(GuestAddress(0), 0x80000)]).unwrap();
    assert!(matches!(e820_table(&m), Err(ArchError::NoLowMemory)));
}

// ---------------------------------------------------------------------------
// Kernel loading.

#[test]
fn not_a_kernel_is_reported_clearly() {
    let m = mem(64 * MIB);
    let mut seed = 0x1234_5678u32;
    let random: Vec<u8> = (0..8192)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed as u8
        })
        .collect();
    let err = load_kernel(&m, &mut Cursor::new(&random)).unwrap_err();
    assert!(matches!(err, ArchError::NotAKernel));
    assert_eq!(
        err.to_string(),
        "kernel is neither an ELF vmlinux nor a bzImage"
    );

    let err = load_kernel(&m, &mut Cursor::new(Vec::<u8>::new())).unwrap_err();
    assert!(matches!(err, ArchError::EmptyKernel), "{err}");

    // A short file that is not ELF either.
    let err = load_kernel(&m, &mut Cursor::new(b"MZ".to_vec())).unwrap_err();
    assert!(matches!(err, ArchError::NotAKernel));
}

#[test]
fn truncated_elf_is_reported_clearly() {
    let m = mem(64 * MIB);
    let elf = synthetic_elf(true);
    // Cut inside the ELF header, inside the program headers, inside the segment.
    for cut in [10usize, 40, 100, 0x1050] {
        let err = load_kernel(&m, &mut Cursor::new(&elf[..cut])).unwrap_err();
        assert!(matches!(err, ArchError::BadElf(_)), "cut at {cut}: {err:?}");
        assert!(err
            .to_string()
            .starts_with("kernel ELF is malformed or truncated"));
    }
}

#[test]
fn elf_for_another_machine_is_rejected() {
    let m = mem(64 * MIB);
    let mut elf = synthetic_elf(false);
    elf[18] = 3; // EM_386
    let err = load_kernel(&m, &mut Cursor::new(&elf)).unwrap_err();
    assert!(
        matches!(err, ArchError::ElfNotX86_64 { machine: 3, .. }),
        "{err:?}"
    );
    let mut elf = synthetic_elf(false);
    elf[4] = 1; // ELFCLASS32
    let err = load_kernel(&m, &mut Cursor::new(&elf)).unwrap_err();
    assert!(matches!(err, ArchError::ElfNotX86_64 { class: 1, .. }));
}

#[test]
fn elf_with_pvh_note_loads() {
    let m = mem(64 * MIB);
    let k = load_kernel(&m, &mut Cursor::new(synthetic_elf(true))).unwrap();
    assert_eq!(k.kind, KernelKind::Elf);
    assert_eq!(k.entry, GuestAddress(ELF_LOAD));
    assert_eq!(k.pvh_entry, Some(GuestAddress(ELF_PVH_ENTRY)));
    assert!(k.setup_header.is_none());
    // memsz (with the bss) counts, not just the bytes in the file.
    assert_eq!(k.end, GuestAddress(ELF_LOAD + 0x20_0000));
    assert_eq!(read(&m, ELF_LOAD, ELF_CODE.len()), ELF_CODE);
}

#[test]
fn elf_bss_is_zeroed_on_reload() {
    let m = mem(64 * MIB);
    // Leftovers from an earlier run where the bss will be.
    m.write_slice(&[0xee; 64], GuestAddress(ELF_LOAD + 0x1000))
        .unwrap();
    load_kernel(&m, &mut Cursor::new(synthetic_elf(false))).unwrap();
    assert_eq!(read(&m, ELF_LOAD + 0x1000, 64), vec![0; 64]);
}

#[test]
fn elf_entry_outside_its_segments_is_rejected() {
    let m = mem(64 * MIB);
    let mut elf = synthetic_elf(false);
    elf[24..32].copy_from_slice(&0x300_0000u64.to_le_bytes());
    let err = load_kernel(&m, &mut Cursor::new(&elf)).unwrap_err();
    assert!(
        err.to_string().contains("not inside a loaded segment"),
        "{err}"
    );
}

/// A reader that hands out at most 4 KiB per `read`, like a pipe or a
/// network file system would.
struct Trickle(Cursor<Vec<u8>>);

impl std::io::Read for Trickle {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(4096);
        self.0.read(&mut buf[..n])
    }
}

impl std::io::Seek for Trickle {
    fn seek(&mut self, pos: std::io::SeekFrom) -> std::io::Result<u64> {
        self.0.seek(pos)
    }
}

#[test]
fn kernels_larger_than_one_read_load_completely() {
    let m = mem(64 * MIB);
    let len = 3 * MIB as usize + 5;
    let mut elf = synthetic_elf(false);
    elf[64 + 32..64 + 40].copy_from_slice(&(len as u64).to_le_bytes());
    elf[64 + 40..64 + 48].copy_from_slice(&(len as u64).to_le_bytes());
    elf.resize(0x1000 + len, 0);
    for (i, b) in elf[0x1000..].iter_mut().enumerate() {
        *b = (i % 253) as u8;
    }
    let k = load_kernel(&m, &mut Trickle(Cursor::new(elf.clone()))).unwrap();
    assert_eq!(k.end, GuestAddress(ELF_LOAD + len as u64));
    assert_eq!(read(&m, ELF_LOAD, len), elf[0x1000..]);

    let mut bz = synthetic_bzimage(0x020f, 0x7fff_ffff);
    bz.resize(1024 + len, 0x77);
    load_kernel(&m, &mut Trickle(Cursor::new(bz.clone()))).unwrap();
    assert_eq!(read(&m, 0x10_0000, len), bz[1024..]);
}

#[test]
fn elf_without_pvh_note_has_no_pvh_entry() {
    let m = mem(64 * MIB);
    let k = load_kernel(&m, &mut Cursor::new(synthetic_elf(false))).unwrap();
    assert_eq!(k.pvh_entry, None);
    let err = configure_system(
        &m,
        &k,
        &BootConfig {
            protocol: EntryProtocol::Pvh,
            ..linux64("", None, 1)
        },
    )
    .unwrap_err();
    assert!(matches!(err, ArchError::NoPvhEntry));
}

#[test]
fn elf_that_does_not_fit_names_the_sizes() {
    // The segment ends at 18 MiB; 16 MiB of RAM is not enough.
    let m = mem(16 * MIB);
    let err = load_kernel(&m, &mut Cursor::new(synthetic_elf(true))).unwrap_err();
    assert_eq!(
        err.to_string(),
        "guest memory (16 MiB) is too small for the kernel (need 18 MiB)"
    );
}

#[test]
fn bzimage_loads_at_code32_start() {
    let m = mem(64 * MIB);
    let img = synthetic_bzimage(0x020f, 0x7fff_ffff);
    let k = load_kernel(&m, &mut Cursor::new(&img)).unwrap();
    assert_eq!(k.kind, KernelKind::BzImage);
    assert_eq!(
        k.entry,
        GuestAddress(0x10_0200),
        "64-bit entry = load + 0x200"
    );
    assert_eq!(k.pvh_entry, None);
    let hdr = k.setup_header.unwrap();
    assert_eq!({ hdr.version }, 0x020f);
    // The decompressor needs init_size bytes at pref_address.
    assert_eq!(k.end, GuestAddress(BZ_PREF_ADDRESS + BZ_INIT_SIZE as u64));
    assert_eq!(read(&m, 0x10_0000, BZ_PAYLOAD_LEN), img[1024..]);
}

#[test]
fn old_or_broken_bzimages_are_rejected() {
    let m = mem(64 * MIB);
    let err = load_kernel(&m, &mut Cursor::new(synthetic_bzimage(0x020b, 0))).unwrap_err();
    assert!(
        matches!(err, ArchError::BzImageNot64Bit { version: 0x020b }),
        "{err:?}"
    );
    // Header present, payload missing.
    let img = synthetic_bzimage(0x020f, 0x7fff_ffff);
    let err = load_kernel(&m, &mut Cursor::new(&img[..1024])).unwrap_err();
    assert!(matches!(err, ArchError::BadBzImage(_)), "{err:?}");
    // Too little memory for the decompressed kernel.
    let m = mem(8 * MIB);
    let err = load_kernel(&m, &mut Cursor::new(&img)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "guest memory (8 MiB) is too small for the kernel (need 20 MiB)"
    );
}

// ---------------------------------------------------------------------------
// Linux 64-bit boot.

#[test]
fn linux64_boot_of_an_elf_writes_zero_page_and_long_mode_state() {
    let m = mem(128 * MIB);
    let k = load_kernel(&m, &mut Cursor::new(synthetic_elf(true))).unwrap();
    let initrd = vec![0x5a; 3 * MIB as usize + 123];
    let cmdline = "console=ttyS0 reboot=k panic=1";
    let st = configure_system(&m, &k, &linux64(cmdline, Some(&initrd), 2)).unwrap();

    // Entry state.
    assert_eq!(st.regs.rip, ELF_LOAD);
    assert_eq!(st.regs.rsi, ZERO_PAGE_START);
    assert_eq!(st.sregs.cs.selector, 0x10);
    assert!(st.sregs.cs.l);
    assert_eq!(st.sregs.ds.selector, 0x18);
    assert_ne!(st.sregs.cr0 & CR0_PG, 0);
    assert_ne!(st.sregs.efer & EFER_LMA, 0);
    assert_eq!(st.regs.rflags & (1 << 9), 0);
    assert!(st.regs.rsp > 0 && st.regs.rsp < HIMEM_START);

    // Setup header, by the boot protocol's offsets.
    let zp = ZERO_PAGE_START;
    assert_eq!(r16(&m, zp + 0x1fe), 0xaa55);
    assert_eq!(read(&m, zp + 0x202, 4), b"HdrS");
    assert!(r16(&m, zp + 0x206) >= 0x020c);
    assert_eq!(r8(&m, zp + 0x210), 0xff, "type_of_loader");
    assert_eq!(r8(&m, zp + 0x211) & 1, 1, "LOADED_HIGH");
    let cmd_ptr = r32(&m, zp + 0x228) as u64;
    assert_eq!(cmd_ptr, CMDLINE_START);
    assert_eq!(
        read(&m, cmd_ptr, cmdline.len() + 1),
        format!("{cmdline}\0").as_bytes()
    );
    assert_eq!(r32(&m, zp + 0x238) as usize, cmdline.len(), "cmdline_size");
    assert_eq!(r8(&m, zp + 0x1ef), 0, "sentinel");

    // Initramfs: page-aligned, as high as RAM allows, intact, above the kernel.
    let rd_addr = r32(&m, zp + 0x218) as u64;
    let rd_size = r32(&m, zp + 0x21c) as u64;
    assert_eq!(rd_size, initrd.len() as u64);
    assert_eq!(rd_addr % 4096, 0);
    assert_eq!(rd_addr, (128 * MIB - rd_size) & !0xfff);
    assert!(rd_addr >= k.end.0);
    assert_eq!(read(&m, rd_addr, initrd.len()), initrd);

    // e820.
    assert_eq!(
        zero_page_e820(&m, zp),
        vec![
            (0, 0x9fc00, 1),
            (0x9fc00, 0x60400, 2),
            (0x100000, 127 * MIB, 1),
            (PCI_ECAM_BASE, PCI_ECAM_SIZE, 2)
        ]
    );

    // RSDP hint.
    let acpi = parse_acpi(&m);
    assert_eq!(r64(&m, zp + 0x70), acpi.rsdp);
}

#[test]
fn linux64_boot_of_a_bzimage_keeps_its_header() {
    let m = mem(64 * MIB);
    let k = load_kernel(&m, &mut Cursor::new(synthetic_bzimage(0x020f, 0x7fff_ffff))).unwrap();
    let st = configure_system(&m, &k, &linux64("quiet", Some(&[1, 2, 3]), 1)).unwrap();
    assert_eq!(st.regs.rip, 0x10_0200);
    let zp = ZERO_PAGE_START;
    assert_eq!(
        r32(&m, zp + 0x238),
        2047,
        "the kernel's cmdline_size is kept"
    );
    assert_eq!(r32(&m, zp + 0x258) as u64, BZ_PREF_ADDRESS);
    assert_eq!(r32(&m, zp + 0x214), 0x10_0000, "code32_start");
    assert_eq!(r8(&m, zp + 0x210), 0xff);
    let rd = r32(&m, zp + 0x218) as u64;
    assert_eq!(rd, 64 * MIB - 4096);
    assert_eq!(read(&m, rd, 3), [1, 2, 3]);
}

#[test]
fn initrd_respects_initrd_addr_max() {
    let m = mem(256 * MIB);
    let k = load_kernel(&m, &mut Cursor::new(synthetic_bzimage(0x020f, 0x03ff_fffe))).unwrap();
    // 0x03ff_fffe is the last allowed byte: the initrd must end at or below it.
    configure_system(&m, &k, &linux64("", Some(&[7; 5000]), 1)).unwrap();
    let rd = r32(&m, ZERO_PAGE_START + 0x218) as u64;
    assert!(rd + 5000 <= 0x03ff_ffff, "{rd:#x}");
    assert_eq!(rd, (0x03ff_ffff - 5000) & !0xfff);
    // An initrd that cannot fit between the kernel and the limit.
    let big = vec![0u8; 0x0300_0000];
    let err = configure_system(&m, &k, &linux64("", Some(&big), 1)).unwrap_err();
    assert!(matches!(err, ArchError::InitrdAboveLimit { .. }), "{err:?}");
}

#[test]
fn initrd_too_big_for_memory_names_the_sizes() {
    let m = mem(64 * MIB);
    let k = load_kernel(&m, &mut Cursor::new(synthetic_elf(false))).unwrap();
    // The kernel ends at 18 MiB; 50 MiB more does not fit in 64 MiB.
    let initrd = vec![0u8; 50 * MIB as usize];
    let err = configure_system(&m, &k, &linux64("", Some(&initrd), 1)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "guest memory (64 MiB) is too small for the kernel and initramfs (need 68 MiB)"
    );
    // Exactly fitting works.
    let initrd = vec![0u8; 46 * MIB as usize];
    configure_system(&m, &k, &linux64("", Some(&initrd), 1)).unwrap();
    assert_eq!(r32(&m, ZERO_PAGE_START + 0x218) as u64, 18 * MIB);
}

#[test]
fn initrd_stays_below_the_mmio_hole() {
    let m = mem(5 << 30);
    let k = load_kernel(&m, &mut Cursor::new(synthetic_elf(false))).unwrap();
    configure_system(&m, &k, &linux64("", Some(&[9; 100]), 1)).unwrap();
    let rd = r32(&m, ZERO_PAGE_START + 0x218) as u64;
    assert_eq!(rd, MMIO_HOLE_START - 4096);
    let e = zero_page_e820(&m, ZERO_PAGE_START);
    assert_eq!(e.last().copied(), Some((1 << 32, 2 << 30, 1)));
}

#[test]
fn command_line_limits() {
    let m = mem(64 * MIB);
    let k = load_kernel(&m, &mut Cursor::new(synthetic_elf(false))).unwrap();
    let long = "x".repeat(2048);
    let err = configure_system(&m, &k, &linux64(&long, None, 1)).unwrap_err();
    assert!(matches!(
        err,
        ArchError::CmdlineTooLong {
            len: 2048,
            max: 2047
        }
    ));
    let err = configure_system(&m, &k, &linux64("a\0b", None, 1)).unwrap_err();
    assert!(matches!(err, ArchError::CmdlineHasNul));
    configure_system(&m, &k, &linux64(&long[..2047], None, 1)).unwrap();
}

// ---------------------------------------------------------------------------
// PVH boot.

#[test]
fn pvh_boot_writes_start_info_and_32bit_state() {
    let m = mem(64 * MIB);
    let k = load_kernel(&m, &mut Cursor::new(synthetic_elf(true))).unwrap();
    let cfg = BootConfig {
        cmdline: "console=hvc0",
        initrd: Some(&[0xab; 4096]),
        num_cpus: 4,
        protocol: EntryProtocol::Pvh,
    };
    let st = configure_system(&m, &k, &cfg).unwrap();
    assert_eq!(st.regs.rip, ELF_PVH_ENTRY);
    assert_eq!(st.regs.rbx, PVH_INFO_START);
    assert_eq!(st.sregs.cr0 & (CR0_PE | CR0_PG), CR0_PE);
    assert_eq!(st.sregs.efer, 0);
    assert!(st.sregs.cs.db && !st.sregs.cs.l);
    assert_eq!((st.sregs.cs.base, st.sregs.cs.limit), (0, 0xffff_ffff));
    assert_eq!(
        st.regs.rflags & ((1 << 9) | (1 << 17)),
        0,
        "IF and VM clear"
    );

    // hvm_start_info, by the Xen ABI's offsets.
    let si = PVH_INFO_START;
    assert_eq!(r32(&m, si), 0x336e_c578);
    assert_eq!(r32(&m, si + 4), 1, "version");
    assert_eq!(r32(&m, si + 12), 1, "nr_modules");
    let modlist = r64(&m, si + 16);
    let cmdline = r64(&m, si + 24);
    let rsdp = r64(&m, si + 32);
    let memmap = r64(&m, si + 40);
    let entries = r32(&m, si + 48) as u64;
    assert_eq!(read(&m, cmdline, 13), b"console=hvc0\0");
    let (rd, rd_size) = (r64(&m, modlist), r64(&m, modlist + 8));
    assert_eq!(rd_size, 4096);
    assert_eq!(rd, 64 * MIB - 4096);
    assert_eq!(read(&m, rd, 4096), vec![0xab; 4096]);
    assert_eq!(parse_acpi(&m).rsdp, rsdp);
    let map: Vec<(u64, u64, u32)> = (0..entries)
        .map(|i| {
            let a = memmap + i * 24;
            (r64(&m, a), r64(&m, a + 8), r32(&m, a + 16))
        })
        .collect();
    assert_eq!(
        map,
        vec![
            (0, 0x9fc00, 1),
            (0x9fc00, 0x60400, 2),
            (0x100000, 63 * MIB, 1),
            (PCI_ECAM_BASE, PCI_ECAM_SIZE, 2)
        ]
    );
    // The MP table is there for PVH too.
    assert_eq!(parse_mptable(&m).cpus.len(), 4);
}

// ---------------------------------------------------------------------------
// ACPI.

#[test]
fn acpi_tables_walk_and_checksum() {
    for n in [1u32, 2, 8, 255] {
        let m = mem(64 * MIB);
        let rsdp = acpi::create_acpi_tables(&m, n, &[]).unwrap();
        let acpi = parse_acpi(&m);
        assert_eq!(acpi.rsdp, rsdp.0);
        assert_eq!(acpi.rsdp, RSDP_START);
        let sigs: Vec<&[u8]> = acpi.tables.iter().map(|t| &t.bytes[0..4]).collect();
        assert_eq!(sigs, vec![b"FACP" as &[u8], b"APIC", b"MCFG"]);
        assert!(acpi.facs_addr > 0);
    }
}

#[test]
fn mcfg_describes_ecam_for_bus_0_to_255() {
    let m = mem(64 * MIB);
    acpi::create_acpi_tables(&m, 1, &[]).unwrap();
    let acpi = parse_acpi(&m);
    let t = &acpi.get(b"MCFG").bytes;
    // Header (36) + reserved (8), then one 16-byte allocation entry.
    assert_eq!(t.len(), 36 + 8 + 16);
    let e = &t[44..60];
    assert_eq!(
        u64::from_le_bytes(e[0..8].try_into().unwrap()),
        PCI_ECAM_BASE
    );
    assert_eq!(
        u16::from_le_bytes(e[8..10].try_into().unwrap()),
        0,
        "segment"
    );
    assert_eq!((e[10], e[11]), (0, 255), "buses");
}

#[test]
fn fadt_describes_legacy_pm_hardware() {
    let m = mem(64 * MIB);
    acpi::create_acpi_tables(&m, 1, &[]).unwrap();
    let acpi = parse_acpi(&m);
    let f = &acpi.get(b"FACP").bytes;
    let u16at = |o: usize| u16::from_le_bytes(f[o..o + 2].try_into().unwrap());
    let u32at = |o: usize| u32::from_le_bytes(f[o..o + 4].try_into().unwrap());
    let u64at = |o: usize| u64::from_le_bytes(f[o..o + 8].try_into().unwrap());
    assert_eq!(f.len(), 276, "ACPI 6 FADT");
    assert!(f[8] >= 3, "FADT revision with X_ fields");
    assert_eq!(u16at(46), 9, "SCI_INT");
    assert_eq!(u32at(48), 0, "SMI_CMD: ACPI always enabled");
    assert_eq!(u32at(56), 0x600, "PM1a_EVT_BLK");
    assert_eq!(u32at(64), 0x604, "PM1a_CNT_BLK");
    assert_eq!(u32at(76), 0x608, "PM_TMR_BLK");
    assert_eq!(
        (f[88], f[89], f[91]),
        (4, 2, 4),
        "PM1_EVT/PM1_CNT/PM_TMR lengths"
    );
    assert_eq!(
        u16at(109) & 0x3,
        0x3,
        "IAPC_BOOT_ARCH: legacy devices + 8042"
    );
    let flags = u32at(112);
    assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
    assert_eq!(flags & (1 << 20), 0, "not HW_REDUCED_ACPI");
    assert_eq!(
        flags & (1 << 8),
        0,
        "no TMR_VAL_EXT: the PM timer is 24-bit"
    );
    // RESET_REG: GAS at 116, system I/O, 8 bits, port 0xcf9; value 6.
    assert_eq!(f[116], 1);
    assert_eq!(f[117], 8);
    assert_eq!(u64at(120), 0xcf9);
    assert_eq!(f[128], 6, "RESET_VALUE");
    assert_eq!(f[108], 0x32, "CENTURY: CMOS register 0x32");
    // X_ blocks (GAS: space, width, offset, access size, address).
    for (off, port, bits) in [(148, 0x600u64, 32u8), (172, 0x604, 16), (208, 0x608, 32)] {
        assert_eq!(f[off], 1, "system I/O at {off}");
        assert_eq!(f[off + 1], bits, "bit width at {off}");
        assert_eq!(u64at(off + 4), port);
    }
    assert_eq!(u64at(140), acpi.dsdt.addr, "X_DSDT");
    // The FACS is found through the 32-bit FIRMWARE_CTRL (it is below
    // 4 GiB), and X_FIRMWARE_CTRL is then zero.
    assert_eq!(
        u32::from_le_bytes(f[36..40].try_into().unwrap()) as u64,
        acpi.facs_addr,
        "FIRMWARE_CTRL"
    );
    assert_eq!(u64at(132), 0, "X_FIRMWARE_CTRL");
}

#[test]
fn dsdt_has_s5() {
    let m = mem(64 * MIB);
    acpi::create_acpi_tables(&m, 1, &[0x10, 0x20]).unwrap();
    let acpi = parse_acpi(&m);
    let aml = &acpi.dsdt.bytes[36..];
    // NameOp "_S5_" PackageOp PkgLength(8, counting itself) NumElements(4) BytePrefix 5 BytePrefix 5 Zero Zero
    let s5 = [
        0x08, b'_', b'S', b'5', b'_', 0x12, 0x08, 0x04, 0x0a, 0x05, 0x0a, 0x05, 0x00, 0x00,
    ];
    assert!(aml.starts_with(&s5), "{aml:02x?}");
    assert!(aml.ends_with(&[0x10, 0x20]), "extra AML appended");
}

#[test]
fn madt_lists_every_cpu_and_the_ioapic() {
    for n in [1u32, 3, 255] {
        let m = mem(64 * MIB);
        acpi::create_acpi_tables(&m, n, &[]).unwrap();
        let madt = parse_madt(parse_acpi(&m).get(b"APIC"));
        assert_eq!(madt.lapic_addr as u64, LAPIC_ADDR);
        assert_eq!(madt.flags & 1, 1, "PCAT_COMPAT");
        let expect: Vec<(u8, u8, u32)> = (0..n).map(|i| (i as u8, i as u8, 1)).collect();
        assert_eq!(madt.lapics, expect);
        assert_eq!(madt.ioapics, vec![(n as u8, IOAPIC_ADDR as u32, 0)]);
        assert_eq!(madt.overrides, vec![(0, 0, 2, 0), (0, 9, 9, 0x0d)]);
        assert_eq!(madt.nmis, vec![(0xff, 0, 1)]);
    }
}

#[test]
fn vcpu_count_limits() {
    let m = mem(64 * MIB);
    let k = load_kernel(&m, &mut Cursor::new(synthetic_elf(false))).unwrap();
    let err = configure_system(&m, &k, &linux64("", None, 256)).unwrap_err();
    assert!(matches!(err, ArchError::TooManyVcpus(256)));
    assert!(err.to_string().contains("at most 255"));
    let err = configure_system(&m, &k, &linux64("", None, 0)).unwrap_err();
    assert!(matches!(err, ArchError::NoVcpus));
    configure_system(&m, &k, &linux64("", None, 255)).unwrap();
    assert_eq!(parse_mptable(&m).cpus.len(), 255);
    assert_eq!(parse_madt(parse_acpi(&m).get(b"APIC")).lapics.len(), 255);
}

// ---------------------------------------------------------------------------
// MP table.

#[test]
fn mp_table_lists_cpus_bus_ioapic_and_isa_irqs() {
    for n in [1u32, 2, 255] {
        let m = mem(64 * MIB);
        bootparams::write_bda(&m).unwrap();
        mptable::setup_mptable(&m, n).unwrap();
        let mp = parse_mptable(&m);
        assert_eq!(mp.lapic_addr as u64, LAPIC_ADDR);
        let expect: Vec<(u8, u8)> = (0..n)
            .map(|i| (i as u8, if i == 0 { 0b11 } else { 0b01 }))
            .collect();
        assert_eq!(mp.cpus, expect, "enabled, BSP flag only on CPU 0");
        assert_eq!(mp.buses, vec![(0, *b"ISA   ")]);
        assert_eq!(mp.ioapics, vec![(n as u8, 1, IOAPIC_ADDR as u32)]);
        // (type INT, flags, bus, irq, ioapic, pin) for ISA IRQs 0-15 but the cascade.
        let irqs: Vec<u8> = mp.io_ints.iter().map(|e| e.3).collect();
        assert_eq!(irqs, (0..16).filter(|&i| i != 2).collect::<Vec<u8>>());
        for &(ty, flags, bus, irq, apic, pin) in &mp.io_ints {
            assert_eq!((ty, bus, apic), (0, 0, n as u8));
            assert_eq!(pin, if irq == 0 { 2 } else { irq });
            assert_eq!(flags, if irq == 9 { 0x0d } else { 0 });
        }
        assert_eq!(mp.local_ints, vec![(3, 0xff, 0), (1, 0xff, 1)]);
    }
}

#[test]
fn bda_points_at_the_ebda() {
    let m = mem(64 * MIB);
    bootparams::write_bda(&m).unwrap();
    assert_eq!((r16(&m, 0x40e) as u64) << 4, EBDA_START);
    assert_eq!(r16(&m, 0x413), 639);
}

// ---------------------------------------------------------------------------
// Debian's kernel, when another engineer's build has produced it.

fn debian_kernel(name: &str) -> Option<std::fs::File> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../guest/out")
        .join(name);
    match std::fs::File::open(&path) {
        Ok(f) => Some(f),
        Err(_) => {
            eprintln!("note: {} not present, skipping", path.display());
            None
        }
    }
}

#[test]
fn debian_vmlinux_loads_with_pvh_and_linux64() {
    let Some(mut f) = debian_kernel("vmlinux") else {
        return;
    };
    let m = mem(512 * MIB);
    let k = load_kernel(&m, &mut f).unwrap();
    assert_eq!(k.kind, KernelKind::Elf);
    assert!(k.entry.0 >= HIMEM_START);
    assert!(k.pvh_entry.is_some(), "Debian's kernel has a PVH note");
    configure_system(&m, &k, &linux64("console=ttyS0", Some(&[0; 4096]), 2)).unwrap();
    let cfg = BootConfig {
        protocol: EntryProtocol::Pvh,
        ..linux64("console=ttyS0", None, 2)
    };
    let st = configure_system(&m, &k, &cfg).unwrap();
    assert_eq!(Some(GuestAddress(st.regs.rip)), k.pvh_entry);
}

#[test]
fn debian_bzimage_loads() {
    let Some(mut f) = debian_kernel("vmlinuz") else {
        return;
    };
    let m = mem(512 * MIB);
    let k = load_kernel(&m, &mut f).unwrap();
    assert_eq!(k.kind, KernelKind::BzImage);
    let hdr = k.setup_header.unwrap();
    assert!({ hdr.version } >= 0x020c);
    let st = configure_system(&m, &k, &linux64("console=ttyS0", Some(&[0; 4096]), 2)).unwrap();
    assert_eq!(st.regs.rip, 0x10_0200);
    let rd = r32(&m, ZERO_PAGE_START + 0x218) as u64;
    assert!(rd >= k.end.0);
}

/// Run a fw_cfg table-loader script as SeaBIOS does: allocate each file
/// at the address given, patch pointers, fix checksums.
fn run_table_loader(m: &GuestRam, t: &acpi::FwCfgAcpi, tables_at: u64, rsdp_at: u64) {
    let mut files: Vec<(String, Vec<u8>, u64)> = vec![
        (acpi::FW_CFG_ACPI_TABLES.into(), t.tables.clone(), tables_at),
        (acpi::FW_CFG_ACPI_RSDP.into(), t.rsdp.clone(), rsdp_at),
    ];
    let name = |b: &[u8]| {
        let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
        String::from_utf8(b[..end].to_vec()).unwrap()
    };
    let idx = |files: &Vec<(String, Vec<u8>, u64)>, n: &str| {
        files.iter().position(|f| f.0 == n).expect("file in script")
    };
    assert_eq!(t.loader.len() % 128, 0);
    for e in t.loader.chunks(128) {
        let cmd = u32::from_le_bytes(e[0..4].try_into().unwrap());
        match cmd {
            1 => {
                let i = idx(&files, &name(&e[4..60]));
                let align = u32::from_le_bytes(e[60..64].try_into().unwrap()) as u64;
                assert!(files[i].2.is_multiple_of(align));
            }
            2 => {
                let d = idx(&files, &name(&e[4..60]));
                let s = idx(&files, &name(&e[60..116]));
                let off = u32::from_le_bytes(e[116..120].try_into().unwrap()) as usize;
                let size = e[120] as usize;
                let mut v = [0u8; 8];
                v[..size].copy_from_slice(&files[d].1[off..off + size]);
                let p = u64::from_le_bytes(v) + files[s].2;
                files[d].1[off..off + size].copy_from_slice(&p.to_le_bytes()[..size]);
            }
            3 => {
                let f = idx(&files, &name(&e[4..60]));
                let off = u32::from_le_bytes(e[60..64].try_into().unwrap()) as usize;
                let start = u32::from_le_bytes(e[64..68].try_into().unwrap()) as usize;
                let len = u32::from_le_bytes(e[68..72].try_into().unwrap()) as usize;
                let s = sum(&files[f].1[start..start + len]);
                files[f].1[off] = files[f].1[off].wrapping_sub(s);
            }
            other => panic!("unknown loader command {other}"),
        }
    }
    for (_, data, at) in files {
        m.write_slice(&data, GuestAddress(at)).unwrap();
    }
}

#[test]
fn fw_cfg_acpi_tables_load_anywhere_and_checksum() {
    for (n, base) in [(1u32, 0x8_0000u64), (4, 0x9_0040)] {
        let m = mem(64 * MIB);
        let t = acpi::fw_cfg_acpi_tables(n, &[]).unwrap();
        run_table_loader(&m, &t, base, 0xf5a40);
        let acpi = parse_acpi(&m);
        assert_eq!(acpi.rsdp, 0xf5a40);
        let sigs: Vec<&[u8]> = acpi.tables.iter().map(|t| &t.bytes[0..4]).collect();
        assert_eq!(sigs, vec![b"FACP" as &[u8], b"APIC", b"MCFG"]);
        assert!(acpi.facs_addr >= base && acpi.facs_addr.is_multiple_of(64));
    }
}
