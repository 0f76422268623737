//! VMware VMDK images, read-only: the two single-file variants, monolithic
//! sparse (`createType="monolithicSparse"`) and stream-optimized
//! (`createType="streamOptimized"`, deflate-compressed grains and the grain
//! directory in a footer), which is what VMware and other hypervisors' P2V
//! tools export.
//!
//! Layout (all integers little-endian): a 512-byte sparse extent header
//! ("KDMV") at offset 0; an embedded text descriptor; a grain directory
//! (GD) of 32-bit sector offsets of grain tables (GT); each GT holds
//! `num_gtes_per_gt` 32-bit sector offsets of grains (0: unallocated, 1: a
//! zero grain). A stream-optimized image stores `GD_AT_END` in the header
//! and the real header in a footer 1024 bytes before the end of the file;
//! each of its grains is a marker (LBA: u64, size: u32) and that many bytes
//! of zlib data.
//!
//! Invariants: every offset read from the file is checked against the
//! file's length before use, and every allocation is bounded by the file's
//! size or by fixed limits (`MAX_*`), so a hostile image yields a
//! [`BlockError`], never a panic or a huge allocation. Delta links (a
//! `parentFileNameHint`), descriptor-only VMDKs (flat, split, ESXi) and
//! other compressions are refused as unsupported, by name.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::{
    check_range,
    source::{read_by_unit, read_exact, read_zero_fill, ImageSource, ReadOnlyImage},
    Allocation, BlockError, ImageDetails, ImageFormat,
};

/// "KDMV" as it appears at offset 0.
pub const MAGIC: [u8; 4] = *b"KDMV";
/// How a text descriptor file starts.
pub const DESCRIPTOR_SIGNATURE: &[u8; 21] = b"# Disk DescriptorFile";

const SECTOR: u64 = 512;
const GD_AT_END: u64 = u64::MAX;
const FLAG_COMPRESSED: u32 = 1 << 16;
const COMPRESSION_DEFLATE: u16 = 1;
/// Largest grain: 1 MiB (VMware uses 64 KiB), bounding each inflate.
const MAX_GRAIN_SECTORS: u64 = 2048;
/// The spec fixes 512 entries per grain table; QEMU accepts no more.
const MAX_GTES_PER_GT: u32 = 512;
/// Largest descriptor read (they are a few hundred bytes).
const MAX_DESCRIPTOR: u64 = 1 << 20;
/// Grain tables kept in memory before the cache is emptied.
const GT_CACHE_CAP: usize = 4096;

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

/// The fields of a sparse extent header Vireo uses.
#[derive(Debug, Clone)]
struct SparseHeader {
    version: u32,
    flags: u32,
    capacity: u64,
    grain_size: u64,
    descriptor_offset: u64,
    descriptor_size: u64,
    num_gtes_per_gt: u32,
    gd_offset: u64,
    compress_algorithm: u16,
}

fn parse_sparse_header(b: &[u8; 512]) -> Option<SparseHeader> {
    if b[..4] != MAGIC {
        return None;
    }
    Some(SparseHeader {
        version: le32(b, 4),
        flags: le32(b, 8),
        capacity: le64(b, 12),
        grain_size: le64(b, 20),
        descriptor_offset: le64(b, 28),
        descriptor_size: le64(b, 36),
        num_gtes_per_gt: le32(b, 44),
        gd_offset: le64(b, 56),
        compress_algorithm: le16(b, 77),
    })
}

pub struct VmdkImage {
    file: Box<dyn ImageSource>,
    path: PathBuf,
    file_len: u64,
    /// Virtual size in bytes.
    size: u64,
    grain_bytes: u64,
    gtes_per_gt: u32,
    compressed: bool,
    create_type: String,
    /// Grain directory: sector offsets of grain tables (0: none).
    gd: Vec<u32>,
    gt_cache: HashMap<usize, Vec<u32>>,
    /// The last grain inflated (its index and data): reads of one grain in
    /// pieces inflate it once.
    last_grain: Option<(u64, Vec<u8>)>,
}

fn corrupt(path: &Path, what: String) -> BlockError {
    BlockError::Corrupt {
        path: path.to_path_buf(),
        format: ImageFormat::Vmdk,
        what,
    }
}

fn unsupported(path: &Path, what: impl Into<String>) -> BlockError {
    BlockError::Unsupported {
        path: path.to_path_buf(),
        format: ImageFormat::Vmdk,
        what: what.into(),
    }
}

/// The value of `key="value"` in a descriptor, if present.
fn descriptor_value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"'))
    })
}

impl VmdkImage {
    /// Parse an image opened (and locked) by [`crate::open_with`].
    pub(crate) fn from_source(file: Box<dyn ImageSource>, path: &Path) -> Result<Self, BlockError> {
        let res = Self::parse(&*file, path);
        match res {
            Ok(parts) => Ok(Self::assemble(file, path, parts)),
            Err(e) => {
                file.release();
                Err(e)
            }
        }
    }

    fn assemble(file: Box<dyn ImageSource>, path: &Path, p: Parsed) -> Self {
        VmdkImage {
            file,
            path: path.to_path_buf(),
            file_len: p.file_len,
            size: p.size,
            grain_bytes: p.grain_bytes,
            gtes_per_gt: p.gtes_per_gt,
            compressed: p.compressed,
            create_type: p.create_type,
            gd: p.gd,
            gt_cache: HashMap::new(),
            last_grain: None,
        }
    }

    fn parse(file: &dyn ImageSource, path: &Path) -> Result<Parsed, BlockError> {
        let file_len = file.len().map_err(|e| BlockError::io(path, "stat", e))?;
        let mut first = [0u8; 512];
        if file_len < SECTOR {
            // A descriptor file can be short; anything else is truncated.
            let n = file_len as usize;
            read_exact(file, path, &mut first[..n], 0, "reading the header")?;
            if first.starts_with(DESCRIPTOR_SIGNATURE) {
                return Err(Self::descriptor_only(&first[..n], path));
            }
            return Err(corrupt(
                path,
                format!("header: file is truncated ({file_len} bytes)"),
            ));
        }
        read_exact(file, path, &mut first, 0, "reading the header")?;
        if first.starts_with(DESCRIPTOR_SIGNATURE) {
            let n = file_len.min(MAX_DESCRIPTOR) as usize;
            let mut text = vec![0u8; n];
            read_exact(file, path, &mut text, 0, "reading the descriptor")?;
            return Err(Self::descriptor_only(&text, path));
        }
        let Some(mut h) = parse_sparse_header(&first) else {
            return Err(corrupt(path, "header: bad magic (expected KDMV)".into()));
        };
        if !(1..=3).contains(&h.version) {
            return Err(unsupported(
                path,
                format!("sparse extent version {} is not supported", h.version),
            ));
        }
        if h.gd_offset == GD_AT_END {
            // Stream-optimized: the footer's copy of the header is the
            // real one (footer marker, header, end-of-stream marker).
            if file_len < 3 * SECTOR {
                return Err(corrupt(path, "footer: file is truncated".into()));
            }
            let mut footer = [0u8; 512];
            read_exact(
                file,
                path,
                &mut footer,
                file_len - 2 * SECTOR,
                "reading the footer",
            )?;
            h = match parse_sparse_header(&footer) {
                Some(f) if f.gd_offset != GD_AT_END => f,
                Some(_) => {
                    return Err(corrupt(
                        path,
                        "footer: grain directory offset missing".into(),
                    ))
                }
                None => {
                    return Err(corrupt(
                        path,
                        "footer: bad magic (a stream-optimized image cut short?)".into(),
                    ))
                }
            };
        }
        let compressed = h.flags & FLAG_COMPRESSED != 0;
        if compressed && h.compress_algorithm != COMPRESSION_DEFLATE {
            return Err(unsupported(
                path,
                format!(
                    "compression algorithm {} is not supported",
                    h.compress_algorithm
                ),
            ));
        }
        if h.grain_size == 0 || !h.grain_size.is_power_of_two() || h.grain_size > MAX_GRAIN_SECTORS
        {
            return Err(corrupt(
                path,
                format!(
                    "header: grain size {} sectors (expected a power of two up to {MAX_GRAIN_SECTORS})",
                    h.grain_size
                ),
            ));
        }
        if h.num_gtes_per_gt == 0 || h.num_gtes_per_gt > MAX_GTES_PER_GT {
            return Err(corrupt(
                path,
                format!(
                    "header: {} entries per grain table (expected 1..={MAX_GTES_PER_GT})",
                    h.num_gtes_per_gt
                ),
            ));
        }
        let Some(size) = h.capacity.checked_mul(SECTOR) else {
            return Err(corrupt(
                path,
                format!("header: capacity of {} sectors overflows", h.capacity),
            ));
        };
        let grain_bytes = h.grain_size * SECTOR;

        // The descriptor names the variant and any parent.
        let mut create_type = String::from("monolithicSparse");
        if h.descriptor_offset != 0 && h.descriptor_size != 0 {
            let off = h.descriptor_offset.checked_mul(SECTOR);
            let len = h
                .descriptor_size
                .checked_mul(SECTOR)
                .map(|l| l.min(MAX_DESCRIPTOR));
            match (off, len) {
                (Some(off), Some(len)) if off.checked_add(len).is_some_and(|e| e <= file_len) => {
                    let mut d = vec![0u8; len as usize];
                    read_exact(file, path, &mut d, off, "reading the descriptor")?;
                    let end = d.iter().position(|&b| b == 0).unwrap_or(d.len());
                    let text = String::from_utf8_lossy(&d[..end]);
                    if let Some(t) = descriptor_value(&text, "createType") {
                        create_type = t.chars().take(64).collect();
                    }
                    if let Some(parent) = descriptor_value(&text, "parentFileNameHint") {
                        return Err(unsupported(
                            path,
                            format!(
                                "delta link images (parentFileNameHint=\"{}\") are not supported",
                                parent.escape_debug()
                            ),
                        ));
                    }
                }
                _ => {
                    return Err(corrupt(
                        path,
                        format!(
                        "descriptor at sector {} ({} sectors): outside the file ({file_len} bytes)",
                        h.descriptor_offset, h.descriptor_size
                    ),
                    ))
                }
            }
        }

        // Grain directory: it must lie inside the file, which also bounds
        // the memory it takes.
        let gt_span = grain_bytes * h.num_gtes_per_gt as u64;
        let gd_entries = size.div_ceil(gt_span);
        let gd_bytes = gd_entries * 4;
        let gd_off = h.gd_offset.checked_mul(SECTOR);
        let gd = match gd_off {
            Some(off) if off != 0 && off.checked_add(gd_bytes).is_some_and(|e| e <= file_len) => {
                let mut raw = vec![0u8; gd_bytes as usize];
                read_exact(file, path, &mut raw, off, "reading the grain directory")?;
                raw.chunks_exact(4).map(|c| le32(c, 0)).collect()
            }
            _ => {
                return Err(corrupt(
                    path,
                    format!(
                        "grain directory at sector {} ({gd_entries} entries): outside the file ({file_len} bytes)",
                        h.gd_offset
                    ),
                ))
            }
        };
        Ok(Parsed {
            file_len,
            size,
            grain_bytes,
            gtes_per_gt: h.num_gtes_per_gt,
            compressed,
            create_type,
            gd,
        })
    }

    fn descriptor_only(text: &[u8], path: &Path) -> BlockError {
        let text = String::from_utf8_lossy(text);
        let t = descriptor_value(&text, "createType").unwrap_or("unknown");
        unsupported(
            path,
            format!(
                "a descriptor-only VMDK (createType=\"{}\") is not supported: Vireo reads monolithicSparse and streamOptimized images (qemu-img convert -O vmdk -o subformat=streamOptimized makes one)",
                t.escape_debug()
            ),
        )
    }

    /// The grain entry for grain number `g`.
    fn grain_entry(&mut self, g: u64) -> Result<u32, BlockError> {
        let per = self.gtes_per_gt as u64;
        let gdi = (g / per) as usize;
        let gti = (g % per) as usize;
        let Some(&gt_sector) = self.gd.get(gdi) else {
            return Err(corrupt(
                &self.path,
                format!("grain directory: no entry {gdi}"),
            ));
        };
        if gt_sector == 0 {
            return Ok(0);
        }
        if !self.gt_cache.contains_key(&gdi) {
            let off = gt_sector as u64 * SECTOR;
            let bytes = per * 4;
            if off.checked_add(bytes).is_none_or(|e| e > self.file_len) {
                return Err(corrupt(
                    &self.path,
                    format!(
                        "grain directory entry {gdi}: grain table at sector {gt_sector} is outside the file ({} bytes)",
                        self.file_len
                    ),
                ));
            }
            let mut raw = vec![0u8; bytes as usize];
            read_exact(
                &*self.file,
                &self.path,
                &mut raw,
                off,
                "reading a grain table",
            )?;
            if self.gt_cache.len() >= GT_CACHE_CAP {
                self.gt_cache.clear();
            }
            self.gt_cache
                .insert(gdi, raw.chunks_exact(4).map(|c| le32(c, 0)).collect());
        }
        Ok(self.gt_cache[&gdi][gti])
    }

    /// The file offset of an allocated grain, checked to be in the file.
    fn grain_offset(&self, g: u64, entry: u32) -> Result<u64, BlockError> {
        let off = entry as u64 * SECTOR;
        if off >= self.file_len {
            return Err(corrupt(
                &self.path,
                format!(
                    "grain table: grain {g} at sector {entry} is past the end of the file ({} bytes)",
                    self.file_len
                ),
            ));
        }
        Ok(off)
    }

    /// Inflate compressed grain `g` stored at `off` into `self.last_grain`.
    fn inflate_grain(&mut self, g: u64, off: u64) -> Result<(), BlockError> {
        if matches!(&self.last_grain, Some((lg, _)) if *lg == g) {
            return Ok(());
        }
        let mut marker = [0u8; 12];
        if off + 12 > self.file_len {
            return Err(corrupt(
                &self.path,
                format!("grain {g}: marker at {off:#x} runs past the end of the file"),
            ));
        }
        read_exact(
            &*self.file,
            &self.path,
            &mut marker,
            off,
            "reading a grain marker",
        )?;
        let len = le32(&marker, 8) as u64;
        // Deflate expands incompressible data a little; twice the grain is
        // more than any real encoder writes.
        if len == 0 || len > 2 * self.grain_bytes + 1024 || off + 12 + len > self.file_len {
            return Err(corrupt(
                &self.path,
                format!("grain {g}: compressed size {len} at {off:#x} is invalid or past the end of the file"),
            ));
        }
        let mut data = vec![0u8; len as usize];
        read_exact(
            &*self.file,
            &self.path,
            &mut data,
            off + 12,
            "reading a grain",
        )?;
        let mut out = miniz_oxide::inflate::decompress_to_vec_zlib_with_limit(
            &data,
            self.grain_bytes as usize,
        )
        .map_err(|e| {
            corrupt(
                &self.path,
                format!("grain {g}: does not inflate ({:?})", e.status),
            )
        })?;
        out.resize(self.grain_bytes as usize, 0);
        self.last_grain = Some((g, out));
        Ok(())
    }
}

struct Parsed {
    file_len: u64,
    size: u64,
    grain_bytes: u64,
    gtes_per_gt: u32,
    compressed: bool,
    create_type: String,
    gd: Vec<u32>,
}

impl ReadOnlyImage for VmdkImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
        check_range(&self.path, self.size, offset, buf.len() as u64)?;
        read_by_unit(buf, offset, self.grain_bytes, |g, in_off, dst| {
            match self.grain_entry(g)? {
                0 | 1 => dst.fill(0),
                e => {
                    let off = self.grain_offset(g, e)?;
                    if self.compressed {
                        self.inflate_grain(g, off)?;
                        if let Some((_, data)) = &self.last_grain {
                            let at = in_off as usize;
                            dst.copy_from_slice(&data[at..at + dst.len()]);
                        }
                    } else {
                        read_zero_fill(&*self.file, &self.path, dst, off + in_off)?;
                    }
                }
            }
            Ok(())
        })
    }

    fn format(&self) -> ImageFormat {
        ImageFormat::Vmdk
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn block_status(&mut self, offset: u64, len: u64) -> Result<(Allocation, u64), BlockError> {
        check_range(&self.path, self.size, offset, len)?;
        let gb = self.grain_bytes;
        let status = |e: u32| match e {
            0 => Allocation::Unallocated,
            1 => Allocation::Zero,
            _ => Allocation::Data,
        };
        // A grain directory entry of 0 leaves a whole table's span
        // unallocated: skip it in one step (a sparse disk can be huge).
        let span = gb * self.gtes_per_gt as u64;
        let step = |img: &mut Self, at: u64| -> Result<(Allocation, u64), BlockError> {
            let gdi = (at / span) as usize;
            if img.gd.get(gdi) == Some(&0) {
                Ok((Allocation::Unallocated, span - at % span))
            } else {
                Ok((status(img.grain_entry(at / gb)?), gb - at % gb))
            }
        };
        let (first, mut n) = step(self, offset)?;
        while n < len {
            let (st, m) = step(self, offset + n)?;
            if st != first {
                break;
            }
            n += m;
        }
        Ok((first, n.min(len)))
    }

    fn details(&self) -> ImageDetails {
        ImageDetails {
            cluster_size: Some(self.grain_bytes),
            subformat: Some(self.create_type.clone()),
            ..ImageDetails::default()
        }
    }
}

impl Drop for VmdkImage {
    fn drop(&mut self) {
        self.file.release();
    }
}
