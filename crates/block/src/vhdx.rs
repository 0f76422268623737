//! Hyper-V VHDX images, read-only (dynamic and fixed; differencing images
//! are refused).
//!
//! Layout (MS-VHDX; integers little-endian, GUIDs in Microsoft's mixed
//! byte order): the file identifier "vhdxfile" at 0; two headers at 64 KiB
//! and 128 KiB ("head", CRC-32C, sequence number: the valid one with the
//! higher number is current); two copies of the region table at 192 KiB
//! and 256 KiB ("regi", CRC-32C), naming the block allocation table (BAT)
//! and metadata regions; the metadata region ("metadata" table) gives the
//! block size, the virtual size and the logical sector size. BAT entries
//! (64 bits: state in bits 0-2, file offset in MiB in bits 20-63) map each
//! payload block; after every `chunk_ratio` payload entries comes one
//! sector-bitmap entry, which only differencing images use.
//!
//! Invariants: checksums are verified; every offset read from the file is
//! checked against the file's length before use and allocations are
//! bounded by the file's size or fixed limits, so a hostile image yields a
//! [`BlockError`], never a panic. An image whose log must be replayed (not
//! closed cleanly) is refused with what to do about it, since reading
//! around the log could return stale data.

use std::path::{Path, PathBuf};

use crate::crc32c::crc32c;
use crate::{
    check_range,
    source::{read_by_unit, read_exact, read_zero_fill, ImageSource, ReadOnlyImage},
    Allocation, BlockError, ImageDetails, ImageFormat,
};

/// The file type identifier's signature, at offset 0.
pub const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";

const KIB64: u64 = 64 << 10;
const MIB: u64 = 1 << 20;
/// Offsets of the two headers and the two region tables.
pub const HEADER_OFFSETS: [u64; 2] = [KIB64, 2 * KIB64];
pub const REGION_TABLE_OFFSETS: [u64; 2] = [3 * KIB64, 4 * KIB64];
pub const HEADER_LEN: usize = 4096;
pub const REGION_TABLE_LEN: usize = 64 << 10;
const HEADER_SIG: &[u8; 4] = b"head";
const REGION_SIG: &[u8; 4] = b"regi";
const METADATA_SIG: &[u8; 8] = b"metadata";
const MAX_ENTRIES: u32 = 2047;
/// Largest BAT read into memory (enough for 64 TiB at 32 MiB blocks).
const MAX_BAT_BYTES: u64 = 256 << 20;
/// Largest virtual size the specification allows: 64 TiB.
const MAX_SIZE: u64 = 64 << 40;

const PAYLOAD_NOT_PRESENT: u64 = 0;
const PAYLOAD_UNDEFINED: u64 = 1;
const PAYLOAD_ZERO: u64 = 2;
const PAYLOAD_UNMAPPED: u64 = 3;
const PAYLOAD_FULLY_PRESENT: u64 = 6;
const PAYLOAD_PARTIALLY_PRESENT: u64 = 7;

/// A GUID in its on-disk (mixed-endian) byte order.
const fn guid(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> [u8; 16] {
    let a = d1.to_le_bytes();
    let b = d2.to_le_bytes();
    let c = d3.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4], d4[5],
        d4[6], d4[7],
    ]
}

const BAT_GUID: [u8; 16] = guid(
    0x2dc2_7766,
    0xf623,
    0x4200,
    [0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08],
);
const METADATA_GUID: [u8; 16] = guid(
    0x8b7c_a206,
    0x4790,
    0x4b9a,
    [0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e],
);
const FILE_PARAMETERS: [u8; 16] = guid(
    0xcaa1_6737,
    0xfa36,
    0x4d43,
    [0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b],
);
const VIRTUAL_DISK_SIZE: [u8; 16] = guid(
    0x2fa5_4224,
    0xcd1b,
    0x4876,
    [0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b, 0xf4, 0xb8],
);
const VIRTUAL_DISK_ID: [u8; 16] = guid(
    0xbeca_12ab,
    0xb2e6,
    0x4523,
    [0x93, 0xef, 0xc3, 0x09, 0xe0, 0x00, 0xc7, 0x46],
);
const LOGICAL_SECTOR_SIZE: [u8; 16] = guid(
    0x8141_bf1d,
    0xa96f,
    0x4709,
    [0xba, 0x47, 0xf2, 0x33, 0xa8, 0xfa, 0xab, 0x5f],
);
const PHYSICAL_SECTOR_SIZE: [u8; 16] = guid(
    0xcda3_48c7,
    0x445d,
    0x4471,
    [0x9c, 0xc9, 0xe9, 0x88, 0x52, 0x51, 0xc5, 0x56],
);
const PARENT_LOCATOR: [u8; 16] = guid(
    0xa8d3_5f2d,
    0xb30b,
    0x454d,
    [0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab, 0x0c],
);

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn corrupt(path: &Path, what: String) -> BlockError {
    BlockError::Corrupt {
        path: path.to_path_buf(),
        format: ImageFormat::Vhdx,
        what,
    }
}

fn unsupported(path: &Path, what: impl Into<String>) -> BlockError {
    BlockError::Unsupported {
        path: path.to_path_buf(),
        format: ImageFormat::Vhdx,
        what: what.into(),
    }
}

/// Whether a structure of `len` bytes with its CRC-32C at byte 4 checks.
fn checksum_ok(raw: &[u8]) -> bool {
    let stored = le32(raw, 4);
    let mut copy = raw.to_vec();
    copy[4..8].fill(0);
    crc32c(&copy) == stored
}

/// Store the right CRC-32C at byte 4 of a header or region table (for
/// tests and the fuzzer, which build images by hand).
pub fn fix_checksum(raw: &mut [u8]) {
    if raw.len() < 8 {
        return;
    }
    raw[4..8].fill(0);
    let c = crc32c(raw);
    raw[4..8].copy_from_slice(&c.to_le_bytes());
}

/// The pieces of a VHDX file (offset, bytes) that a compact fuzzer input
/// stands for, so that mutations land on metadata rather than on the
/// megabytes of padding between regions: the input is cut into a header
/// (4 KiB, placed at 64 KiB), the start of a region table (512 bytes, at
/// 192 KiB), the start of a metadata table (1 KiB, at 1 MiB), metadata
/// items (512 bytes, at 1 MiB + 64 KiB) and the rest (the BAT and data, at
/// 2 MiB). Signatures are forced and checksums fixed, so the parser gets
/// past them. The file is 2 MiB + the rest long.
#[doc(hidden)]
pub fn layout_for_fuzzing(input: &[u8]) -> Vec<(u64, Vec<u8>)> {
    let mut cut = input;
    let mut take = |n: usize| {
        let (a, b) = cut.split_at(n.min(cut.len()));
        cut = b;
        a.to_vec()
    };
    let mut header = take(HEADER_LEN);
    header.resize(HEADER_LEN, 0);
    header[..4].copy_from_slice(HEADER_SIG);
    fix_checksum(&mut header);
    let mut table = take(512);
    table.resize(REGION_TABLE_LEN, 0);
    table[..4].copy_from_slice(REGION_SIG);
    fix_checksum(&mut table);
    let mut meta = take(1024);
    meta.resize(1024, 0);
    meta[..8].copy_from_slice(METADATA_SIG);
    let items = take(512);
    let rest = take(usize::MAX);
    let mut file_id = FILE_SIGNATURE.to_vec();
    file_id.resize(8, 0);
    vec![
        (0, file_id),
        (HEADER_OFFSETS[0], header),
        (REGION_TABLE_OFFSETS[0], table),
        (MIB, meta),
        (MIB + KIB64, items),
        (2 * MIB, rest),
    ]
}

pub struct VhdxImage {
    file: Box<dyn ImageSource>,
    path: PathBuf,
    file_len: u64,
    size: u64,
    block_size: u64,
    chunk_ratio: u64,
    bat: Vec<u64>,
}

struct Region {
    offset: u64,
    len: u64,
}

impl VhdxImage {
    /// Parse an image opened (and locked) by [`crate::open_with`].
    pub(crate) fn from_source(file: Box<dyn ImageSource>, path: &Path) -> Result<Self, BlockError> {
        match Self::parse(&*file, path) {
            Ok((file_len, size, block_size, chunk_ratio, bat)) => Ok(VhdxImage {
                file,
                path: path.to_path_buf(),
                file_len,
                size,
                block_size,
                chunk_ratio,
                bat,
            }),
            Err(e) => {
                file.release();
                Err(e)
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn parse(
        file: &dyn ImageSource,
        path: &Path,
    ) -> Result<(u64, u64, u64, u64, Vec<u64>), BlockError> {
        let file_len = file.len().map_err(|e| BlockError::io(path, "stat", e))?;
        let mut sig = [0u8; 8];
        if file_len < 8 {
            return Err(corrupt(
                path,
                format!("file identifier: file is truncated ({file_len} bytes)"),
            ));
        }
        read_exact(file, path, &mut sig, 0, "reading the file identifier")?;
        if &sig != FILE_SIGNATURE {
            return Err(corrupt(
                path,
                "file identifier: bad signature (expected vhdxfile)".into(),
            ));
        }
        if file_len < REGION_TABLE_OFFSETS[1] + REGION_TABLE_LEN as u64 {
            return Err(corrupt(
                path,
                format!("headers: file is truncated ({file_len} bytes)"),
            ));
        }

        // The current header: valid, with the higher sequence number.
        let mut best: Option<(u64, Vec<u8>)> = None;
        for off in HEADER_OFFSETS {
            let mut h = vec![0u8; HEADER_LEN];
            read_exact(file, path, &mut h, off, "reading a header")?;
            if &h[..4] != HEADER_SIG || !checksum_ok(&h) {
                continue;
            }
            let seq = le64(&h, 8);
            if best.as_ref().is_none_or(|(s, _)| seq > *s) {
                best = Some((seq, h));
            }
        }
        let Some((_, h)) = best else {
            return Err(corrupt(
                path,
                "headers: neither copy has a valid signature and checksum".into(),
            ));
        };
        let log_guid = &h[48..64];
        let version = le16(&h, 66);
        if version != 1 {
            return Err(unsupported(
                path,
                format!("header version {version} is not supported"),
            ));
        }
        if log_guid.iter().any(|&b| b != 0) {
            return Err(unsupported(
                path,
                "the image's log must be replayed (it was not closed cleanly): open it once in Hyper-V, or run qemu-img check -r all on it",
            ));
        }

        // Region table: the first copy with a valid checksum.
        let mut table = None;
        for off in REGION_TABLE_OFFSETS {
            let mut t = vec![0u8; REGION_TABLE_LEN];
            read_exact(file, path, &mut t, off, "reading the region table")?;
            if &t[..4] == REGION_SIG && checksum_ok(&t) {
                table = Some(t);
                break;
            }
        }
        let Some(t) = table else {
            return Err(corrupt(
                path,
                "region table: neither copy has a valid signature and checksum".into(),
            ));
        };
        let count = le32(&t, 8);
        if count > MAX_ENTRIES {
            return Err(corrupt(
                path,
                format!("region table: {count} entries (at most {MAX_ENTRIES})"),
            ));
        }
        let (mut bat_region, mut meta_region) = (None, None);
        for i in 0..count as usize {
            let e = &t[16 + 32 * i..16 + 32 * (i + 1)];
            let offset = le64(e, 16);
            let len = le32(e, 24) as u64;
            let required = le32(e, 28) & 1 != 0;
            let g = &e[..16];
            let region = Region { offset, len };
            let name = if g == BAT_GUID {
                "BAT"
            } else if g == METADATA_GUID {
                "metadata"
            } else if required {
                return Err(unsupported(
                    path,
                    format!("region table: unknown required region {i}"),
                ));
            } else {
                continue;
            };
            if !offset.is_multiple_of(MIB)
                || offset < MIB
                || offset.checked_add(len).is_none_or(|end| end > file_len)
            {
                return Err(corrupt(
                    path,
                    format!(
                        "region table: {name} region at {offset:#x} ({len} bytes) is misaligned or outside the file ({file_len} bytes)"
                    ),
                ));
            }
            if name == "BAT" {
                bat_region = Some(region);
            } else {
                meta_region = Some(region);
            }
        }
        let (Some(bat_region), Some(meta)) = (bat_region, meta_region) else {
            return Err(corrupt(
                path,
                "region table: the BAT or metadata region is missing".into(),
            ));
        };

        // Metadata table (64 KiB at the start of its region).
        if meta.len < KIB64 {
            return Err(corrupt(
                path,
                format!("metadata region of {} bytes is too small", meta.len),
            ));
        }
        let mut mt = vec![0u8; KIB64 as usize];
        read_exact(
            file,
            path,
            &mut mt,
            meta.offset,
            "reading the metadata table",
        )?;
        if &mt[..8] != METADATA_SIG {
            return Err(corrupt(path, "metadata table: bad signature".into()));
        }
        let count = le16(&mt, 10) as u32;
        if count > MAX_ENTRIES {
            return Err(corrupt(
                path,
                format!("metadata table: {count} entries (at most {MAX_ENTRIES})"),
            ));
        }
        let item = |want: &[u8; 16], len: usize| -> Result<Option<Vec<u8>>, BlockError> {
            for i in 0..count as usize {
                let e = &mt[32 + 32 * i..32 + 32 * (i + 1)];
                if &e[..16] != want {
                    continue;
                }
                let off = le32(e, 16) as u64;
                let ilen = le32(e, 20) as u64;
                if ilen < len as u64 || off < KIB64 || off + len as u64 > meta.len {
                    return Err(corrupt(
                        path,
                        format!("metadata table: item {i} at {off:#x} ({ilen} bytes) is outside its region"),
                    ));
                }
                let mut v = vec![0u8; len];
                read_exact(file, path, &mut v, meta.offset + off, "reading metadata")?;
                return Ok(Some(v));
            }
            Ok(None)
        };
        let missing = |what: &str| corrupt(path, format!("metadata: no {what} item"));
        let fp = item(&FILE_PARAMETERS, 8)?.ok_or_else(|| missing("file parameters"))?;
        let vsize = item(&VIRTUAL_DISK_SIZE, 8)?.ok_or_else(|| missing("virtual disk size"))?;
        let lss = item(&LOGICAL_SECTOR_SIZE, 4)?.ok_or_else(|| missing("logical sector size"))?;
        if item(&PARENT_LOCATOR, 1)?.is_some() || le32(&fp, 4) & 2 != 0 {
            return Err(unsupported(
                path,
                "differencing images (with a parent) are not supported",
            ));
        }
        // Unknown required items change the meaning of the image.
        for i in 0..count as usize {
            let e = &mt[32 + 32 * i..32 + 32 * (i + 1)];
            let known = [
                FILE_PARAMETERS,
                VIRTUAL_DISK_SIZE,
                VIRTUAL_DISK_ID,
                LOGICAL_SECTOR_SIZE,
                PHYSICAL_SECTOR_SIZE,
                PARENT_LOCATOR,
            ];
            let required = le32(e, 24) & 4 != 0;
            if required && !known.iter().any(|k| &e[..16] == k) {
                return Err(unsupported(
                    path,
                    format!("metadata table: unknown required item {i}"),
                ));
            }
        }
        let block_size = le32(&fp, 0) as u64;
        if !block_size.is_power_of_two() || !(MIB..=256 * MIB).contains(&block_size) {
            return Err(corrupt(
                path,
                format!("metadata: block size {block_size} (expected a power of two, 1..=256 MiB)"),
            ));
        }
        let sector = le32(&lss, 0) as u64;
        if sector != 512 && sector != 4096 {
            return Err(corrupt(
                path,
                format!("metadata: logical sector size {sector} (expected 512 or 4096)"),
            ));
        }
        let size = le64(&vsize, 0);
        if size == 0 || size > MAX_SIZE || !size.is_multiple_of(sector) {
            return Err(corrupt(
                path,
                format!("metadata: virtual disk size {size} (expected a multiple of {sector}, at most 64 TiB)"),
            ));
        }

        // The BAT: payload entries with a sector-bitmap entry after every
        // chunk_ratio of them.
        let chunk_ratio = (1u64 << 23) * sector / block_size;
        let data_blocks = size.div_ceil(block_size);
        let entries = data_blocks + (data_blocks - 1) / chunk_ratio;
        let bat_bytes = entries * 8;
        if bat_bytes > bat_region.len || bat_bytes > MAX_BAT_BYTES {
            return Err(corrupt(
                path,
                format!(
                    "BAT region of {} bytes is smaller than its {entries} entries",
                    bat_region.len
                ),
            ));
        }
        let mut raw = vec![0u8; bat_bytes as usize];
        read_exact(file, path, &mut raw, bat_region.offset, "reading the BAT")?;
        let bat = raw.chunks_exact(8).map(|c| le64(c, 0)).collect();
        Ok((file_len, size, block_size, chunk_ratio, bat))
    }

    /// The state and file offset of payload block `b`.
    fn block(&self, b: u64) -> Result<(u64, u64), BlockError> {
        let idx = b + b / self.chunk_ratio;
        let Some(&e) = self.bat.get(idx as usize) else {
            return Err(corrupt(&self.path, format!("BAT: no entry {idx}")));
        };
        let state = e & 7;
        let off = (e >> 20) << 20;
        match state {
            PAYLOAD_NOT_PRESENT | PAYLOAD_UNDEFINED | PAYLOAD_ZERO | PAYLOAD_UNMAPPED => {
                Ok((state, 0))
            }
            PAYLOAD_FULLY_PRESENT => {
                if off < MIB || off >= self.file_len {
                    return Err(corrupt(
                        &self.path,
                        format!(
                            "BAT: block {b} at {off:#x} is past the end of the file ({} bytes)",
                            self.file_len
                        ),
                    ));
                }
                Ok((state, off))
            }
            PAYLOAD_PARTIALLY_PRESENT => Err(unsupported(
                &self.path,
                format!("BAT: block {b} is partially present (a differencing image)"),
            )),
            s => Err(corrupt(
                &self.path,
                format!("BAT: block {b} has invalid state {s}"),
            )),
        }
    }
}

impl ReadOnlyImage for VhdxImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
        check_range(&self.path, self.size, offset, buf.len() as u64)?;
        read_by_unit(buf, offset, self.block_size, |b, in_off, dst| {
            match self.block(b)? {
                (PAYLOAD_FULLY_PRESENT, off) => {
                    read_zero_fill(&*self.file, &self.path, dst, off + in_off)?
                }
                _ => dst.fill(0),
            }
            Ok(())
        })
    }

    fn format(&self) -> ImageFormat {
        ImageFormat::Vhdx
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn block_status(&mut self, offset: u64, len: u64) -> Result<(Allocation, u64), BlockError> {
        check_range(&self.path, self.size, offset, len)?;
        let bs = self.block_size;
        let status = |s: (u64, u64)| match s.0 {
            PAYLOAD_FULLY_PRESENT => Allocation::Data,
            PAYLOAD_ZERO => Allocation::Zero,
            _ => Allocation::Unallocated,
        };
        let first = status(self.block(offset / bs)?);
        let mut n = (bs - offset % bs).min(len);
        while n < len && status(self.block((offset + n) / bs)?) == first {
            n = (n + bs).min(len);
        }
        Ok((first, n))
    }

    fn details(&self) -> ImageDetails {
        ImageDetails {
            cluster_size: Some(self.block_size),
            ..ImageDetails::default()
        }
    }
}

impl Drop for VhdxImage {
    fn drop(&mut self) {
        self.file.release();
    }
}
