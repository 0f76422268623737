//! qcow2 images: version 2 read-only, version 3 read/write.
//!
//! Layout reminders (all integers big-endian): a header in cluster 0; a
//! two-level table (L1 -> L2 -> data cluster) maps guest clusters to host
//! clusters; a two-level refcount structure (refcount table -> refcount
//! blocks) counts references to every host cluster.
//!
//! Allocation policy: new clusters are always appended at the end of the
//! file and freed clusters are never reused (their space is returned to the
//! filesystem with a hole punch instead). That keeps allocation simple and
//! makes a crash between metadata writes at worst leak clusters.
//!
//! Metadata is cached and written back on [`DiskImage::flush`] in the order
//! data + refcount increments, L2 tables, L1 entries, and only then refcount
//! decrements for clusters that the new tables no longer reference, with an
//! fdatasync between the stages.

use std::collections::{BTreeSet, HashMap};
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::{
    check_range, iobufs_range, open_depth, pread_zero_fill, punch_hole, pwrite_all,
    transfer_vectored, Allocation, BlockError, DiskImage, ImageDetails, ImageFormat, IoBuf,
    OpenOptions,
};

/// The largest write buffer a qcow2 image keeps between requests
/// (virtio-blk's largest request and then some).
const MAX_KEPT_BOUNCE: usize = 8 << 20;

/// "QFI\xfb"
pub const MAGIC: u32 = 0x5146_49fb;

const V2_HEADER_LEN: u64 = 72;
const V3_MIN_HEADER_LEN: u64 = 104;
/// What Vireo writes for new images (104 + compression type byte, padded).
const V3_HEADER_LEN: u64 = 112;

const MIN_CLUSTER_BITS: u32 = 9;
const MAX_CLUSTER_BITS: u32 = 21;

/// Same limits as QEMU: bounds the memory a hostile header can make us use.
const MAX_L1_BYTES: u64 = 32 << 20;
const MAX_REFTABLE_BYTES: u64 = 8 << 20;
const MAX_BACKING_NAME: u64 = 1023;

const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L1E_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L2E_STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
const OFLAG_COPIED: u64 = 1 << 63;
const OFLAG_COMPRESSED: u64 = 1 << 62;
const OFLAG_ZERO: u64 = 1;

const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Bits this implementation understands (compression type only changes how
/// compressed clusters are encoded, and those are refused when met).
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
const EXT_CRYPTO: u32 = 0x0537_be77;
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Header field offsets we rewrite.
const HDR_REFTABLE_OFFSET: u64 = 48;
const HDR_AUTOCLEAR: u64 = 88;

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// The parsed, validated header.
#[derive(Debug, Clone)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    /// From the backing-format header extension.
    pub backing_format: Option<String>,
    pub backing_file: Option<Vec<u8>>,
}

/// A stretch of a guest read, as [`Qcow2::for_each_read_run`] hands it on.
enum ReadRun {
    /// Bytes at this host offset (clusters contiguous on the host: one call).
    Data { host: u64 },
    /// Zeros (the v3 zero flag).
    Zero,
    /// Not allocated here: from the backing file at this guest offset (or
    /// zeros without one).
    Backing { voff: u64 },
}

/// Where a guest cluster lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mapping {
    /// Not allocated here: backing file, or zeros without one.
    Unallocated,
    /// v3 zero flag; `host` may hold a preallocated cluster.
    Zero {
        host: u64,
    },
    Data {
        host: u64,
        copied: bool,
    },
    Compressed,
}

struct L2Table {
    entries: Vec<u64>,
    dirty: bool,
    last_use: u64,
}

struct RefBlock {
    data: Vec<u8>,
    dirty: bool,
    last_use: u64,
}

pub struct Qcow2Image {
    file: File,
    path: PathBuf,
    read_only: bool,
    header: Header,
    cluster_bits: u32,
    cluster_size: u64,
    size: u64,
    /// log2 of entries per L2 table.
    l2_bits: u32,

    l1: Vec<u64>,
    l1_offset: u64,
    l1_dirty: BTreeSet<usize>,

    l2_cache: HashMap<u64, L2Table>,
    l2_cache_cap: usize,

    refcount_order: u32,
    /// log2 of entries per refcount block.
    rb_bits: u32,
    reftable: Vec<u64>,
    reftable_offset: u64,
    reftable_clusters: u64,
    reftable_dirty: BTreeSet<usize>,
    rb_cache: HashMap<u64, RefBlock>,
    rb_cache_cap: usize,
    /// Host clusters to dereference once the tables that dropped them are on disk.
    pending_frees: Vec<u64>,
    growing_reftable: bool,
    /// Kept between vectored writes (see `write_vectored`).
    bounce: Vec<u8>,

    /// Current length of the file, including clusters we appended.
    file_len: u64,
    /// Where the next cluster is allocated (cluster-aligned end of file).
    next_free: u64,
    tick: u64,
    data_dirty: bool,

    backing: Option<Box<dyn DiskImage>>,
}

impl Qcow2Image {
    fn corrupt(&self, what: String) -> BlockError {
        corrupt(&self.path, what)
    }

    fn unsupported(&self, what: impl Into<String>) -> BlockError {
        unsupported(&self.path, what)
    }

    pub(crate) fn from_file(
        file: File,
        path: &Path,
        opts: &OpenOptions,
        depth: usize,
    ) -> Result<Self, BlockError> {
        let read_only = opts.read_only;
        let file_len = file
            .metadata()
            .map_err(|e| BlockError::io(path, "stat", e))?
            .len();
        let header = parse_header(&file, path, file_len)?;
        let cluster_bits = header.cluster_bits;
        let cs = 1u64 << cluster_bits;

        // Write-time refusals: these images are fine to read.
        if !read_only {
            if header.version < 3 {
                return Err(unsupported(
                    path,
                    "version 2 images are read-only in Vireo (upgrade with: qemu-img amend -o compat=1.1)",
                ));
            }
            if header.nb_snapshots > 0 {
                return Err(BlockError::HasSnapshots {
                    path: path.to_path_buf(),
                });
            }
            if header.incompatible_features & INCOMPAT_DIRTY != 0 {
                return Err(unsupported(
                    path,
                    "image has the dirty bit set (lazy refcounts, not closed cleanly); repair with qemu-img check -r all before writing",
                ));
            }
            if header.incompatible_features & INCOMPAT_CORRUPT != 0 {
                return Err(unsupported(
                    path,
                    "image is marked corrupt; repair with qemu-img check -r all before writing",
                ));
            }
        }

        // L1 table.
        let l1_bytes = header.l1_size as u64 * 8;
        let mut raw_l1 = vec![0u8; l1_bytes as usize];
        read_exact(
            &file,
            path,
            &mut raw_l1,
            header.l1_table_offset,
            "reading the L1 table",
        )?;
        let l1: Vec<u64> = raw_l1.chunks_exact(8).map(|c| be64(c, 0)).collect();

        // Refcount table.
        let rt_bytes = header.refcount_table_clusters as u64 * cs;
        let mut raw_rt = vec![0u8; rt_bytes as usize];
        read_exact(
            &file,
            path,
            &mut raw_rt,
            header.refcount_table_offset,
            "reading the refcount table",
        )?;
        let reftable: Vec<u64> = raw_rt.chunks_exact(8).map(|c| be64(c, 0)).collect();

        // Backing file.
        let backing = match &header.backing_file {
            None => None,
            Some(_) if opts.detach_backing => None,
            Some(name) => {
                if !opts.follow_backing {
                    return Err(unsupported(
                        path,
                        "image has a backing file and backing files are disabled",
                    ));
                }
                let fmt = match header.backing_format.as_deref() {
                    None => None,
                    Some(name) => match name.parse::<ImageFormat>() {
                        Ok(f) => Some(f),
                        Err(_) => {
                            return Err(unsupported(
                                path,
                                format!(
                                    "backing file format '{}' is not supported",
                                    name.escape_debug()
                                ),
                            ))
                        }
                    },
                };
                Some(open_backing(path, name, fmt, depth)?)
            }
        };

        let l2_bits = cluster_bits - 3;
        let rb_bits = cluster_bits + 3 - header.refcount_order;
        // Cache sizes: a few tens of MiB at most whatever the cluster size.
        let l2_cache_cap = ((32u64 << 20) >> cluster_bits).clamp(8, 1024) as usize;
        let rb_cache_cap = ((8u64 << 20) >> cluster_bits).clamp(8, 256) as usize;

        let mut img = Qcow2Image {
            file,
            path: path.to_path_buf(),
            read_only,
            cluster_bits,
            cluster_size: cs,
            size: header.size,
            l2_bits,
            l1,
            l1_offset: header.l1_table_offset,
            l1_dirty: BTreeSet::new(),
            l2_cache: HashMap::new(),
            l2_cache_cap,
            refcount_order: header.refcount_order,
            rb_bits,
            reftable,
            reftable_offset: header.refcount_table_offset,
            reftable_clusters: header.refcount_table_clusters as u64,
            reftable_dirty: BTreeSet::new(),
            rb_cache: HashMap::new(),
            rb_cache_cap,
            pending_frees: Vec::new(),
            growing_reftable: false,
            bounce: Vec::new(),
            file_len,
            next_free: align_up(file_len, cs),
            tick: 0,
            data_dirty: false,
            backing,
            header,
        };

        if !read_only && img.header.autoclear_features != 0 {
            // The spec requires a writer that does not maintain the
            // structures these bits vouch for (e.g. persistent bitmaps) to
            // clear them, so readers know the structures are stale.
            pwrite_all(&img.file, &img.path, &0u64.to_be_bytes(), HDR_AUTOCLEAR)?;
            img.file
                .sync_data()
                .map_err(|e| BlockError::io(&img.path, "fsync", e))?;
            img.header.autoclear_features = 0;
        }
        Ok(img)
    }

    /// The validated header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    fn check_writable(&self) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly {
                path: self.path.clone(),
            });
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), BlockError> {
        self.file
            .sync_data()
            .map_err(|e| BlockError::io(&self.path, "fsync", e))
    }

    fn write_meta(&mut self, buf: &[u8], offset: u64) -> Result<(), BlockError> {
        pwrite_all(&self.file, &self.path, buf, offset)?;
        self.file_len = self.file_len.max(offset + buf.len() as u64);
        Ok(())
    }

    // ---- L1 / L2 -------------------------------------------------------

    fn l1_index(&self, voff: u64) -> usize {
        ((voff >> self.cluster_bits) >> self.l2_bits) as usize
    }

    fn l2_index(&self, voff: u64) -> usize {
        ((voff >> self.cluster_bits) & ((1u64 << self.l2_bits) - 1)) as usize
    }

    /// The L2 table offset named by L1 entry `l1i` (0 = none), validated.
    fn l2_offset(&self, l1i: usize) -> Result<(u64, bool), BlockError> {
        let Some(&e) = self.l1.get(l1i) else {
            return Err(self.corrupt(format!("L1 table: index {l1i} beyond l1_size")));
        };
        if e & L1E_RESERVED_MASK != 0 {
            return Err(self.corrupt(format!(
                "L1 table: entry {l1i} ({e:#x}) has reserved bits set"
            )));
        }
        let off = e & L1E_OFFSET_MASK;
        if off == 0 {
            return Ok((0, false));
        }
        if off & (self.cluster_size - 1) != 0 {
            return Err(self.corrupt(format!(
                "L1 table: entry {l1i} points to unaligned L2 table offset {off:#x}"
            )));
        }
        if !self.l2_cache.contains_key(&off) && off + self.cluster_size > self.file_len {
            return Err(self.corrupt(format!(
                "L1 table: entry {l1i} points to L2 table offset {off:#x} outside the file"
            )));
        }
        Ok((off, e & OFLAG_COPIED != 0))
    }

    fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// Make sure the L2 table at `off` is cached.
    fn load_l2(&mut self, off: u64) -> Result<(), BlockError> {
        let tick = self.next_tick();
        if let Some(t) = self.l2_cache.get_mut(&off) {
            t.last_use = tick;
            return Ok(());
        }
        if off < self.cluster_size {
            return Err(self.corrupt(format!("L2 table at offset {off:#x}: overlaps the header")));
        }
        self.make_room_l2()?;
        let mut raw = vec![0u8; self.cluster_size as usize];
        read_exact(&self.file, &self.path, &mut raw, off, "reading an L2 table")?;
        let entries = raw.chunks_exact(8).map(|c| be64(c, 0)).collect();
        self.l2_cache.insert(
            off,
            L2Table {
                entries,
                dirty: false,
                last_use: tick,
            },
        );
        Ok(())
    }

    fn make_room_l2(&mut self) -> Result<(), BlockError> {
        if self.l2_cache.len() < self.l2_cache_cap {
            return Ok(());
        }
        let victim = self
            .l2_cache
            .iter()
            .min_by_key(|(_, t)| t.last_use)
            .map(|(&k, t)| (k, t.dirty));
        if let Some((off, dirty)) = victim {
            if dirty {
                // The table may reference clusters whose refcounts are only in
                // memory: those must reach the disk first.
                self.write_refcounts()?;
                self.sync()?;
                self.write_l2(off)?;
            }
            self.l2_cache.remove(&off);
        }
        Ok(())
    }

    fn write_l2(&mut self, off: u64) -> Result<(), BlockError> {
        let Some(t) = self.l2_cache.get(&off) else {
            return Ok(());
        };
        if !t.dirty {
            return Ok(());
        }
        let mut raw = Vec::with_capacity(self.cluster_size as usize);
        for e in &t.entries {
            raw.extend_from_slice(&e.to_be_bytes());
        }
        self.write_meta(&raw, off)?;
        if let Some(t) = self.l2_cache.get_mut(&off) {
            t.dirty = false;
        }
        Ok(())
    }

    fn l2_entry(&self, l2off: u64, l2i: usize) -> Result<u64, BlockError> {
        self.l2_cache
            .get(&l2off)
            .and_then(|t| t.entries.get(l2i).copied())
            .ok_or_else(|| {
                self.corrupt(format!(
                    "L2 table at offset {l2off:#x}: internal cache miss"
                ))
            })
    }

    fn set_l2_entry(&mut self, l2off: u64, l2i: usize, value: u64) -> Result<(), BlockError> {
        self.load_l2(l2off)?;
        let path = self.path.clone();
        match self.l2_cache.get_mut(&l2off).and_then(|t| {
            t.dirty = true;
            t.entries.get_mut(l2i)
        }) {
            Some(e) => {
                *e = value;
                Ok(())
            }
            None => Err(corrupt(
                &path,
                format!("L2 table at offset {l2off:#x}: internal cache miss"),
            )),
        }
    }

    /// Interpret an L2 entry.
    fn classify(&self, e: u64, l2off: u64, l2i: usize) -> Result<Mapping, BlockError> {
        if e & OFLAG_COMPRESSED != 0 {
            return Ok(Mapping::Compressed);
        }
        if e & L2E_STD_RESERVED_MASK != 0 {
            return Err(self.corrupt(format!(
                "L2 table at offset {l2off:#x}: entry {l2i} ({e:#x}) has reserved bits set"
            )));
        }
        let zero = e & OFLAG_ZERO != 0;
        if zero && self.header.version < 3 {
            return Err(self.corrupt(format!(
                "L2 table at offset {l2off:#x}: entry {l2i} has the zero flag in a version 2 image"
            )));
        }
        let host = e & L2E_OFFSET_MASK;
        if host != 0 {
            if host & (self.cluster_size - 1) != 0 {
                return Err(self.corrupt(format!(
                    "L2 table at offset {l2off:#x}: entry {l2i} points to unaligned offset {host:#x}"
                )));
            }
            if host >= self.file_len {
                return Err(self.corrupt(format!(
                    "L2 table at offset {l2off:#x}: entry {l2i} points to {host:#x}, outside the file"
                )));
            }
        }
        Ok(if zero {
            Mapping::Zero { host }
        } else if host == 0 {
            Mapping::Unallocated
        } else {
            Mapping::Data {
                host,
                copied: e & OFLAG_COPIED != 0,
            }
        })
    }

    /// Map guest offset `voff` without allocating anything.
    fn lookup(&mut self, voff: u64) -> Result<Mapping, BlockError> {
        let l1i = self.l1_index(voff);
        let (l2off, _) = self.l2_offset(l1i)?;
        if l2off == 0 {
            return Ok(Mapping::Unallocated);
        }
        self.load_l2(l2off)?;
        let l2i = self.l2_index(voff);
        let e = self.l2_entry(l2off, l2i)?;
        self.classify(e, l2off, l2i)
    }

    /// The writable L2 table covering `voff`, allocating (or copying a
    /// shared one) if needed. With `allocate == false`, returns 0 when there
    /// is no table.
    fn l2_for_write(&mut self, voff: u64, allocate: bool) -> Result<u64, BlockError> {
        let l1i = self.l1_index(voff);
        let (l2off, copied) = self.l2_offset(l1i)?;
        if l2off != 0 && copied {
            self.load_l2(l2off)?;
            return Ok(l2off);
        }
        if l2off == 0 && !allocate {
            return Ok(0);
        }
        let entries = if l2off == 0 {
            vec![0u64; 1 << self.l2_bits]
        } else {
            // Shared L2 table (refcount > 1): copy on write. The data
            // clusters it names keep their refcounts; both tables use them.
            self.load_l2(l2off)?;
            self.l2_cache
                .get(&l2off)
                .map(|t| t.entries.clone())
                .ok_or_else(|| {
                    self.corrupt(format!(
                        "L2 table at offset {l2off:#x}: internal cache miss"
                    ))
                })?
        };
        let new = self.alloc_cluster()?;
        self.make_room_l2()?;
        let tick = self.next_tick();
        self.l2_cache.insert(
            new,
            L2Table {
                entries,
                dirty: true,
                last_use: tick,
            },
        );
        self.l1[l1i] = new | OFLAG_COPIED;
        self.l1_dirty.insert(l1i);
        if l2off != 0 {
            self.pending_frees.push(l2off);
        }
        Ok(new)
    }

    // ---- refcounts ------------------------------------------------------

    fn rb_index(&self, host: u64) -> (usize, usize) {
        let cluster = host >> self.cluster_bits;
        (
            (cluster >> self.rb_bits) as usize,
            (cluster & ((1u64 << self.rb_bits) - 1)) as usize,
        )
    }

    fn load_rb(&mut self, off: u64) -> Result<(), BlockError> {
        let tick = self.next_tick();
        if let Some(b) = self.rb_cache.get_mut(&off) {
            b.last_use = tick;
            return Ok(());
        }
        let inside = off
            .checked_add(self.cluster_size)
            .is_some_and(|end| end <= self.file_len);
        if off & (self.cluster_size - 1) != 0 || off < self.cluster_size || !inside {
            return Err(self.corrupt(format!(
                "refcount table: refcount block offset {off:#x} is unaligned or outside the file"
            )));
        }
        self.make_room_rb()?;
        let mut data = vec![0u8; self.cluster_size as usize];
        read_exact(
            &self.file,
            &self.path,
            &mut data,
            off,
            "reading a refcount block",
        )?;
        self.rb_cache.insert(
            off,
            RefBlock {
                data,
                dirty: false,
                last_use: tick,
            },
        );
        Ok(())
    }

    fn make_room_rb(&mut self) -> Result<(), BlockError> {
        if self.rb_cache.len() < self.rb_cache_cap {
            return Ok(());
        }
        let victim = self
            .rb_cache
            .iter()
            .min_by_key(|(_, b)| b.last_use)
            .map(|(&k, _)| k);
        if let Some(off) = victim {
            // Evicted blocks only ever hold increments (decrements are
            // applied during flush, which writes every block out), and a
            // refcount ahead of its reference can only leak, never corrupt.
            self.write_rb(off)?;
            self.rb_cache.remove(&off);
        }
        Ok(())
    }

    fn write_rb(&mut self, off: u64) -> Result<(), BlockError> {
        let Some(b) = self.rb_cache.get(&off) else {
            return Ok(());
        };
        if !b.dirty {
            return Ok(());
        }
        let data = b.data.clone();
        self.write_meta(&data, off)?;
        if let Some(b) = self.rb_cache.get_mut(&off) {
            b.dirty = false;
        }
        Ok(())
    }

    /// Write dirty refcount blocks, then dirty refcount table entries (a
    /// table entry must never point at a block not yet on disk).
    fn write_refcounts(&mut self) -> Result<(), BlockError> {
        let dirty: Vec<u64> = self
            .rb_cache
            .iter()
            .filter(|(_, b)| b.dirty)
            .map(|(&k, _)| k)
            .collect();
        for off in dirty {
            self.write_rb(off)?;
        }
        let idx: Vec<usize> = std::mem::take(&mut self.reftable_dirty)
            .into_iter()
            .collect();
        for i in idx {
            let v = self.reftable[i];
            self.write_meta(&v.to_be_bytes(), self.reftable_offset + 8 * i as u64)?;
        }
        Ok(())
    }

    fn get_rc(&self, data: &[u8], i: usize) -> u64 {
        match self.refcount_order {
            0..=2 => {
                let bits = 1usize << self.refcount_order;
                let bit = i * bits;
                ((data[bit / 8] >> (bit % 8)) & ((1u16 << bits) - 1) as u8) as u64
            }
            3 => data[i] as u64,
            4 => be16(data, 2 * i) as u64,
            5 => be32(data, 4 * i) as u64,
            _ => be64(data, 8 * i),
        }
    }

    fn set_rc(order: u32, data: &mut [u8], i: usize, v: u64) {
        match order {
            0..=2 => {
                let bits = 1usize << order;
                let bit = i * bits;
                let mask = (((1u16 << bits) - 1) as u8) << (bit % 8);
                let b = &mut data[bit / 8];
                *b = (*b & !mask) | (((v as u8) << (bit % 8)) & mask);
            }
            3 => data[i] = v as u8,
            4 => data[2 * i..2 * i + 2].copy_from_slice(&(v as u16).to_be_bytes()),
            5 => data[4 * i..4 * i + 4].copy_from_slice(&(v as u32).to_be_bytes()),
            _ => data[8 * i..8 * i + 8].copy_from_slice(&v.to_be_bytes()),
        }
    }

    fn max_refcount(&self) -> u64 {
        if self.refcount_order >= 6 {
            u64::MAX
        } else {
            (1u64 << (1u32 << self.refcount_order)) - 1
        }
    }

    /// Refcount block offset for table index `idx`, allocating one if
    /// `create` (growing the table if needed). Returns 0 for "none".
    fn refblock_for(&mut self, idx: usize, create: bool) -> Result<u64, BlockError> {
        if idx < self.reftable.len() {
            let off = self.reftable[idx] & REFT_OFFSET_MASK;
            if off != 0 || !create {
                return Ok(off);
            }
        } else {
            if !create {
                return Ok(0);
            }
            self.grow_reftable(idx + 1)?;
            // Growing may itself have created the block for `idx`.
            let off = self.reftable[idx] & REFT_OFFSET_MASK;
            if off != 0 {
                return Ok(off);
            }
        }
        // New refcount block at the end of the file. It usually describes
        // itself; if not, the recursion allocates the block that does.
        let b = self.next_free;
        self.next_free += self.cluster_size;
        self.make_room_rb()?;
        let tick = self.next_tick();
        self.rb_cache.insert(
            b,
            RefBlock {
                data: vec![0u8; self.cluster_size as usize],
                dirty: true,
                last_use: tick,
            },
        );
        self.reftable[idx] = b;
        self.reftable_dirty.insert(idx);
        self.update_refcount(b, 1)?;
        Ok(b)
    }

    fn refcount(&mut self, host: u64) -> Result<u64, BlockError> {
        let (idx, i) = self.rb_index(host);
        let b = self.refblock_for(idx, false)?;
        if b == 0 {
            return Ok(0);
        }
        self.load_rb(b)?;
        let data = &self.rb_cache[&b].data;
        Ok(self.get_rc(data, i))
    }

    fn update_refcount(&mut self, host: u64, delta: i64) -> Result<u64, BlockError> {
        let (idx, i) = self.rb_index(host);
        let b = self.refblock_for(idx, delta > 0)?;
        if b == 0 {
            return Err(self.corrupt(format!(
                "refcount table: no refcount block for in-use cluster {host:#x}"
            )));
        }
        self.load_rb(b)?;
        let max = self.max_refcount();
        let order = self.refcount_order;
        let path = self.path.clone();
        let cur = {
            let data = &self.rb_cache[&b].data;
            self.get_rc(data, i)
        };
        let new = if delta >= 0 {
            cur.checked_add(delta as u64).filter(|&v| v <= max)
        } else {
            cur.checked_sub(delta.unsigned_abs())
        };
        let Some(new) = new else {
            return Err(corrupt(
                &path,
                format!("refcount block at {b:#x}: refcount of cluster {host:#x} would leave its range ({cur} {delta:+})"),
            ));
        };
        if let Some(blk) = self.rb_cache.get_mut(&b) {
            Self::set_rc(order, &mut blk.data, i, new);
            blk.dirty = true;
        }
        Ok(new)
    }

    /// Allocate one cluster at the end of the file with refcount 1.
    fn alloc_cluster(&mut self) -> Result<u64, BlockError> {
        let mut skipped = 0u32;
        loop {
            let off = self.next_free;
            let (idx, _) = self.rb_index(off);
            let have = idx < self.reftable.len() && self.reftable[idx] & REFT_OFFSET_MASK != 0;
            if !have {
                // Allocates at `off` (or grows the table there); retry after.
                self.refblock_for(idx, true)?;
                continue;
            }
            self.next_free += self.cluster_size;
            // Clusters past the end of the file with a refcount (leaked by a
            // crash) are skipped; a long run of them means a corrupt table,
            // and looping over it could take forever.
            if self.refcount(off)? != 0 {
                skipped += 1;
                if skipped > 4096 {
                    return Err(self.corrupt(format!(
                        "refcount table: clusters past the end of the file (at {off:#x}) are in use"
                    )));
                }
                continue;
            }
            self.update_refcount(off, 1)?;
            return Ok(off);
        }
    }

    /// Replace the refcount table with a bigger one at the end of the file.
    fn grow_reftable(&mut self, min_len: usize) -> Result<(), BlockError> {
        if self.growing_reftable {
            return Err(self.corrupt("refcount table: recursive growth (internal error)".into()));
        }
        let cs = self.cluster_size;
        let per_cluster = (cs / 8) as usize;
        let rb_span_bits = self.cluster_bits + self.rb_bits;
        let mut new_len = min_len.max(self.reftable.len() * 2).max(per_cluster);
        let new_clusters = loop {
            let clusters = new_len.div_ceil(per_cluster) as u64;
            // Room for the table, the refcount blocks describing it, and slack.
            let top = self.next_free + (2 * clusters + 4) * cs;
            let needed = ((top >> rb_span_bits) + 1) as usize;
            if needed <= new_len {
                break clusters;
            }
            new_len = needed.max(new_len * 2);
        };
        if new_clusters * cs > MAX_REFTABLE_BYTES {
            return Err(self.unsupported("image too large: the refcount table would exceed 8 MiB"));
        }
        let table_off = self.next_free;
        self.next_free += new_clusters * cs;
        self.reftable.resize((new_clusters * cs / 8) as usize, 0);
        self.growing_reftable = true;
        let res = (|| {
            for c in 0..new_clusters {
                self.update_refcount(table_off + c * cs, 1)?;
            }
            Ok(())
        })();
        self.growing_reftable = false;
        res?;
        // Every block the new table names must be on disk before the header
        // switches to it; the old table stays valid until then.
        let old_off = self.reftable_offset;
        let old_clusters = self.reftable_clusters;
        self.reftable_offset = table_off;
        self.reftable_dirty.clear();
        self.write_refcounts()?;
        let mut raw = Vec::with_capacity((new_clusters * cs) as usize);
        for e in &self.reftable {
            raw.extend_from_slice(&e.to_be_bytes());
        }
        self.write_meta(&raw, table_off)?;
        self.sync()?;
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&table_off.to_be_bytes());
        hdr[8..].copy_from_slice(&(new_clusters as u32).to_be_bytes());
        self.write_meta(&hdr, HDR_REFTABLE_OFFSET)?;
        self.sync()?;
        self.reftable_clusters = new_clusters;
        self.header.refcount_table_offset = table_off;
        self.header.refcount_table_clusters = new_clusters as u32;
        for c in 0..old_clusters {
            self.pending_frees.push(old_off + c * cs);
        }
        Ok(())
    }

    // ---- data path ------------------------------------------------------

    /// Fill `buf` with what an unallocated range at `voff` reads as.
    fn read_backing(&mut self, buf: &mut [u8], voff: u64) -> Result<(), BlockError> {
        match self.backing.as_mut() {
            Some(b) => {
                let bsize = b.size();
                let n = if voff < bsize {
                    (bsize - voff).min(buf.len() as u64) as usize
                } else {
                    0
                };
                if n > 0 {
                    b.read_at(&mut buf[..n], voff)?;
                }
                buf[n..].fill(0);
                Ok(())
            }
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    fn compressed_error(&self) -> BlockError {
        self.unsupported("compressed clusters are not supported")
    }

    /// Walk the guest range `[offset, offset + len)` (checked by the caller)
    /// as runs, calling `f(self, run, at, n)` for the `n` bytes at `at` in
    /// the request; clusters that are contiguous on the host too make one
    /// run, so a read of them is one call.
    fn for_each_read_run(
        &mut self,
        offset: u64,
        len: usize,
        mut f: impl FnMut(&mut Self, ReadRun, usize, usize) -> Result<(), BlockError>,
    ) -> Result<(), BlockError> {
        let cs = self.cluster_size;
        let mut done = 0usize;
        while done < len {
            let voff = offset + done as u64;
            let in_off = voff & (cs - 1);
            let n = ((cs - in_off) as usize).min(len - done);
            match self.lookup(voff)? {
                Mapping::Data { host, .. } => {
                    let mut run = n;
                    let mut next_host = host + cs;
                    while done + run < len {
                        match self.lookup(voff + run as u64)? {
                            Mapping::Data { host: h, .. } if h == next_host => {
                                run += (cs as usize).min(len - done - run);
                                next_host += cs;
                            }
                            _ => break,
                        }
                    }
                    f(
                        self,
                        ReadRun::Data {
                            host: host + in_off,
                        },
                        done,
                        run,
                    )?;
                    done += run;
                }
                Mapping::Zero { .. } => {
                    f(self, ReadRun::Zero, done, n)?;
                    done += n;
                }
                Mapping::Unallocated => {
                    f(self, ReadRun::Backing { voff }, done, n)?;
                    done += n;
                }
                Mapping::Compressed => return Err(self.compressed_error()),
            }
        }
        Ok(())
    }

    fn write_cluster(&mut self, data: &[u8], voff: u64) -> Result<(), BlockError> {
        let cs = self.cluster_size;
        let in_off = (voff & (cs - 1)) as usize;
        let cstart = voff - in_off as u64;
        let l2off = self.l2_for_write(voff, true)?;
        let l2i = self.l2_index(voff);
        let e = self.l2_entry(l2off, l2i)?;
        let m = self.classify(e, l2off, l2i)?;
        let old_host = match m {
            Mapping::Compressed => return Err(self.compressed_error()),
            Mapping::Data { host, copied: true } => {
                pwrite_all(&self.file, &self.path, data, host + in_off as u64)?;
                self.file_len = self.file_len.max(host + (in_off + data.len()) as u64);
                self.data_dirty = true;
                return Ok(());
            }
            Mapping::Data {
                host,
                copied: false,
            } => host,
            Mapping::Zero { host } => host,
            Mapping::Unallocated => 0,
        };
        // A preallocated zero cluster we own outright can be reused.
        let reuse = matches!(m, Mapping::Zero { host } if host != 0 && e & OFLAG_COPIED != 0);
        let backing_size = self.backing.as_ref().map_or(0, |b| b.size());
        let zero_based = match m {
            Mapping::Zero { .. } => true,
            Mapping::Unallocated => cstart >= backing_size,
            _ => false,
        };
        if zero_based && !reuse && data.len() as u64 != cs {
            // Fast path for a partial write into a cluster that reads as
            // zeros: a freshly allocated cluster lies past the end of the
            // file (allocation only appends and never reuses space), so it
            // already reads as zeros and only the new bytes need writing.
            // The file is extended to cover the whole cluster, as QEMU does.
            let host = self.alloc_cluster()?;
            if host < self.file_len {
                return Err(self.corrupt(format!(
                    "refcount table: cluster {host:#x} inside the file was free for allocation"
                )));
            }
            pwrite_all(&self.file, &self.path, data, host + in_off as u64)?;
            self.file
                .set_len(host + cs)
                .map_err(|e| BlockError::io(&self.path, "extending", e))?;
            self.file_len = host + cs;
            self.data_dirty = true;
            self.set_l2_entry(l2off, l2i, host | OFLAG_COPIED)?;
            if old_host != 0 {
                self.pending_frees.push(old_host);
            }
            return Ok(());
        }
        // A new (or copied) cluster: build its full contents.
        let mut owned;
        let content: &[u8] = if data.len() as u64 == cs {
            data
        } else {
            owned = vec![0u8; cs as usize];
            match m {
                Mapping::Unallocated => self.read_backing(&mut owned, cstart)?,
                Mapping::Data { host, .. } => {
                    pread_zero_fill(&self.file, &self.path, &mut owned, host)?
                }
                _ => {}
            }
            owned[in_off..in_off + data.len()].copy_from_slice(data);
            &owned
        };
        let host = if reuse {
            old_host
        } else {
            self.alloc_cluster()?
        };
        pwrite_all(&self.file, &self.path, content, host)?;
        self.file_len = self.file_len.max(host + cs);
        self.data_dirty = true;
        self.set_l2_entry(l2off, l2i, host | OFLAG_COPIED)?;
        if old_host != 0 && !reuse {
            self.pending_frees.push(old_host);
        }
        Ok(())
    }

    /// Set whole cluster `voff`'s L2 entry to unallocated (0) or zero flag.
    fn unmap_cluster(&mut self, voff: u64, make_zero: bool) -> Result<(), BlockError> {
        let l2off = self.l2_for_write(voff, make_zero)?;
        if l2off == 0 {
            return Ok(()); // already unallocated, no backing to hide
        }
        let l2i = self.l2_index(voff);
        let e = self.l2_entry(l2off, l2i)?;
        let old_host = match self.classify(e, l2off, l2i)? {
            Mapping::Compressed => return Err(self.compressed_error()),
            Mapping::Data { host, .. } | Mapping::Zero { host } => host,
            Mapping::Unallocated => 0,
        };
        let new = if make_zero { OFLAG_ZERO } else { 0 };
        if e != new {
            self.set_l2_entry(l2off, l2i, new)?;
        }
        if old_host != 0 {
            self.pending_frees.push(old_host);
        }
        Ok(())
    }

    /// Apply each whole cluster in `[offset, offset+len)` to `f`; return the
    /// unaligned head and tail ranges left over.
    fn whole_clusters(
        &mut self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(&mut Self, u64) -> Result<(), BlockError>,
    ) -> Result<[(u64, u64); 2], BlockError> {
        let cs = self.cluster_size;
        let end = offset + len;
        let first = align_up(offset, cs);
        let last = end & !(cs - 1);
        if first >= last {
            return Ok([(offset, len), (end, 0)]);
        }
        let mut c = first;
        while c < last {
            f(self, c)?;
            c += cs;
        }
        Ok([(offset, first - offset), (last, end - last)])
    }

    fn apply_pending_frees(&mut self) -> Result<(), BlockError> {
        let frees = std::mem::take(&mut self.pending_frees);
        let mut released = Vec::new();
        for host in frees {
            if self.update_refcount(host, -1)? == 0 {
                released.push(host);
            }
        }
        self.write_refcounts()?;
        for host in released {
            // Give the space back to the filesystem; the cluster itself is
            // never reused because allocation only appends.
            punch_hole(&self.file, host, self.cluster_size);
        }
        Ok(())
    }
}

impl DiskImage for Qcow2Image {
    fn size(&self) -> u64 {
        self.size
    }

    fn backing(&self) -> Option<&dyn DiskImage> {
        self.backing.as_deref()
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
        check_range(&self.path, self.size, offset, buf.len() as u64)?;
        self.for_each_read_run(offset, buf.len(), |img, run, at, n| {
            let dst = &mut buf[at..at + n];
            match run {
                ReadRun::Data { host } => pread_zero_fill(&img.file, &img.path, dst, host),
                ReadRun::Zero => {
                    dst.fill(0);
                    Ok(())
                }
                ReadRun::Backing { voff } => img.read_backing(dst, voff),
            }
        })
    }

    /// Data clusters are read straight into `bufs` (`preadv`, runs of
    /// host-contiguous clusters in one call); zero clusters are zeroed in
    /// place; only clusters from the backing file go through a buffer.
    fn read_vectored(&mut self, bufs: &[IoBuf], offset: u64) -> Result<(), BlockError> {
        let len = self.vectored_len(bufs, offset)? as usize;
        let mut piece = Vec::new();
        self.for_each_read_run(offset, len, |img, run, at, n| {
            iobufs_range(bufs, at, n, &mut piece);
            match run {
                ReadRun::Data { host } => {
                    transfer_vectored(&img.file, &img.path, &piece, host, false)
                }
                ReadRun::Zero => {
                    for b in &piece {
                        // SAFETY: IoBuf's invariant: writable for its length.
                        unsafe { std::ptr::write_bytes(b.as_ptr(), 0, b.len()) };
                    }
                    Ok(())
                }
                ReadRun::Backing { voff } => {
                    let mut tmp = vec![0u8; n];
                    img.read_backing(&mut tmp, voff)?;
                    let mut from = 0;
                    for b in &piece {
                        b.copy_from(&tmp[from..from + b.len()]);
                        from += b.len();
                    }
                    Ok(())
                }
            }
        })
    }

    /// Through a buffer the image keeps (a write may allocate clusters and
    /// goes cluster by cluster), so no allocation per request.
    fn write_vectored(&mut self, bufs: &[IoBuf], offset: u64) -> Result<(), BlockError> {
        self.check_writable()?;
        let len = self.vectored_len(bufs, offset)? as usize;
        let mut tmp = std::mem::take(&mut self.bounce);
        tmp.clear();
        tmp.resize(len, 0);
        let mut at = 0;
        for b in bufs {
            b.copy_to(&mut tmp[at..at + b.len()]);
            at += b.len();
        }
        let r = self.write_at(&tmp, offset);
        if tmp.capacity() <= MAX_KEPT_BOUNCE {
            self.bounce = tmp;
        }
        r
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), BlockError> {
        self.check_writable()?;
        check_range(&self.path, self.size, offset, buf.len() as u64)?;
        let cs = self.cluster_size;
        let mut done = 0usize;
        while done < buf.len() {
            let voff = offset + done as u64;
            let n = ((cs - (voff & (cs - 1))) as usize).min(buf.len() - done);
            self.write_cluster(&buf[done..done + n], voff)?;
            done += n;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), BlockError> {
        if self.read_only {
            return Ok(());
        }
        let l2_dirty: Vec<u64> = self
            .l2_cache
            .iter()
            .filter(|(_, t)| t.dirty)
            .map(|(&k, _)| k)
            .collect();
        let rc_dirty = !self.reftable_dirty.is_empty() || self.rb_cache.values().any(|b| b.dirty);
        if !self.data_dirty
            && !rc_dirty
            && l2_dirty.is_empty()
            && self.l1_dirty.is_empty()
            && self.pending_frees.is_empty()
        {
            return Ok(());
        }
        // 1. data and refcount increments (a refcount ahead of its reference
        //    only leaks a cluster, so one barrier covers both).
        self.write_refcounts()?;
        self.sync()?;
        // 2. L2 tables, which now only name durable, counted clusters.
        if !l2_dirty.is_empty() {
            for off in l2_dirty {
                self.write_l2(off)?;
            }
            if !self.l1_dirty.is_empty() || !self.pending_frees.is_empty() {
                self.sync()?;
            }
        }
        // 3. L1 entries pointing at the new L2 tables.
        if !self.l1_dirty.is_empty() {
            let idx: Vec<usize> = std::mem::take(&mut self.l1_dirty).into_iter().collect();
            for i in idx {
                let v = self.l1[i];
                self.write_meta(&v.to_be_bytes(), self.l1_offset + 8 * i as u64)?;
            }
            if !self.pending_frees.is_empty() {
                self.sync()?;
            }
        }
        // 4. Only now drop references the old tables held.
        if !self.pending_frees.is_empty() {
            self.apply_pending_frees()?;
        }
        self.sync()?;
        self.data_dirty = false;
        Ok(())
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.check_writable()?;
        check_range(&self.path, self.size, offset, len)?;
        // With a backing file, an unallocated cluster would show the backing
        // data again, so (like QEMU) discarded clusters become zero clusters.
        let make_zero = self.backing.is_some();
        self.whole_clusters(offset, len, |s, c| s.unmap_cluster(c, make_zero))?;
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.check_writable()?;
        check_range(&self.path, self.size, offset, len)?;
        // Without a backing file an unallocated cluster already reads as
        // zeros, and needs no L2 table.
        let make_zero = self.backing.is_some();
        let parts = self.whole_clusters(offset, len, |s, c| s.unmap_cluster(c, make_zero))?;
        for (off, n) in parts {
            if n > 0 {
                let zeros = vec![0u8; n as usize];
                self.write_at(&zeros, off)?;
            }
        }
        Ok(())
    }

    fn discard_granularity(&self) -> u64 {
        self.cluster_size
    }

    fn block_status(&mut self, offset: u64, len: u64) -> Result<(Allocation, u64), BlockError> {
        check_range(&self.path, self.size, offset, len)?;
        let cs = self.cluster_size;
        let status = |m: Mapping| match m {
            Mapping::Unallocated => Allocation::Unallocated,
            Mapping::Zero { .. } => Allocation::Zero,
            Mapping::Data { .. } | Mapping::Compressed => Allocation::Data,
        };
        // An L1 entry of 0 leaves a whole L2 table's span unallocated:
        // skip it in one step (an empty disk can be terabytes).
        let span = cs << self.l2_bits;
        let step = |img: &mut Self, at: u64| -> Result<(Allocation, u64), BlockError> {
            let l1i = img.l1_index(at);
            if img.l2_offset(l1i)?.0 == 0 {
                Ok((Allocation::Unallocated, span - at % span))
            } else {
                Ok((status(img.lookup(at)?), cs - (at & (cs - 1))))
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
            cluster_size: Some(self.cluster_size),
            subformat: Some(
                if self.header.version >= 3 {
                    "1.1"
                } else {
                    "0.10"
                }
                .into(),
            ),
            backing_filename: self
                .header
                .backing_file
                .as_ref()
                .map(|n| String::from_utf8_lossy(n).into_owned()),
            backing_format: self.header.backing_format.clone(),
        }
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn format(&self) -> ImageFormat {
        ImageFormat::Qcow2
    }

    fn path(&self) -> &Path {
        &self.path
    }

    /// Grow only (shrinking would have to drop clusters past the new end).
    /// The L1 table grows in place when its last cluster has room, and is
    /// otherwise copied to new clusters at the end of the file before the
    /// header switches to it, so a crash leaves either the old or the new
    /// table in use (and at worst leaks clusters).
    fn resize(&mut self, new_size: u64) -> Result<(), BlockError> {
        self.check_writable()?;
        if new_size < self.size {
            return Err(self.unsupported(format!(
                "shrinking a qcow2 image ({} to {new_size} bytes) is not supported",
                self.size
            )));
        }
        if self.header.nb_snapshots > 0 {
            return Err(BlockError::HasSnapshots {
                path: self.path.clone(),
            });
        }
        self.flush()?;
        let cs = self.cluster_size;
        let l2_span = cs * (cs / 8);
        let needed = new_size.div_ceil(l2_span).max(1);
        if needed * 8 > MAX_L1_BYTES {
            return Err(self.unsupported(format!("virtual size {new_size} is too large")));
        }
        let old_len = self.l1.len() as u64;
        let mut l1_offset = self.l1_offset;
        let mut l1_len = old_len;
        if needed > old_len {
            let capacity = align_up(old_len * 8, cs) / 8;
            if needed <= capacity {
                // The rest of the table's last cluster is the table's own.
                let zeros = vec![0u8; ((needed - old_len) * 8) as usize];
                self.write_meta(&zeros, l1_offset + old_len * 8)?;
            } else {
                let clusters = (needed * 8).div_ceil(cs);
                let new_off = self.next_free;
                self.next_free += clusters * cs;
                for c in 0..clusters {
                    self.update_refcount(new_off + c * cs, 1)?;
                }
                self.write_refcounts()?;
                let mut raw = vec![0u8; (clusters * cs) as usize];
                for (i, e) in self.l1.iter().enumerate() {
                    raw[8 * i..8 * i + 8].copy_from_slice(&e.to_be_bytes());
                }
                self.write_meta(&raw, new_off)?;
                let old_clusters = align_up(old_len * 8, cs) / cs;
                for c in 0..old_clusters {
                    self.pending_frees.push(self.l1_offset + c * cs);
                }
                l1_offset = new_off;
            }
            l1_len = needed;
            self.sync()?;
        }
        // size, crypt_method, l1_size, l1_table_offset: one write.
        let mut hdr = [0u8; 24];
        hdr[..8].copy_from_slice(&new_size.to_be_bytes());
        hdr[8..12].copy_from_slice(&self.header.crypt_method.to_be_bytes());
        hdr[12..16].copy_from_slice(&(l1_len as u32).to_be_bytes());
        hdr[16..].copy_from_slice(&l1_offset.to_be_bytes());
        self.write_meta(&hdr, 24)?;
        self.sync()?;
        self.l1.resize(l1_len as usize, 0);
        self.l1_offset = l1_offset;
        self.size = new_size;
        self.header.size = new_size;
        self.header.l1_size = l1_len as u32;
        self.header.l1_table_offset = l1_offset;
        self.data_dirty = true;
        self.flush()
    }

    fn set_lock(&mut self, held: bool) -> Result<(), BlockError> {
        if held {
            crate::lock_file(&self.file, &self.path, self.read_only)
        } else {
            crate::unlock_file(&self.file);
            Ok(())
        }
    }
}

impl Drop for Qcow2Image {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::error!("{e}");
        }
        crate::unlock_file(&self.file);
    }
}

// ---- header parsing -------------------------------------------------------

fn corrupt(path: &Path, what: String) -> BlockError {
    BlockError::Corrupt {
        path: path.to_path_buf(),
        format: ImageFormat::Qcow2,
        what,
    }
}

fn unsupported(path: &Path, what: impl Into<String>) -> BlockError {
    BlockError::Unsupported {
        path: path.to_path_buf(),
        format: ImageFormat::Qcow2,
        what: what.into(),
    }
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

fn read_exact(
    file: &File,
    path: &Path,
    buf: &mut [u8],
    off: u64,
    what: &'static str,
) -> Result<(), BlockError> {
    use std::os::unix::fs::FileExt;
    file.read_exact_at(buf, off)
        .map_err(|e| BlockError::io(path, what, e))
}

/// Check that `[off, off+len)` is cluster-aligned, past the header cluster
/// and inside the file.
fn check_region(
    path: &Path,
    what: &str,
    off: u64,
    len: u64,
    cs: u64,
    file_len: u64,
) -> Result<(), BlockError> {
    if off & (cs - 1) != 0 {
        return Err(corrupt(
            path,
            format!("{what} at offset {off:#x}: not cluster-aligned"),
        ));
    }
    if len > 0 && off < cs {
        return Err(corrupt(
            path,
            format!("{what} at offset {off:#x}: overlaps the header"),
        ));
    }
    match off.checked_add(len) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(corrupt(
            path,
            format!("{what} at offset {off:#x} ({len} bytes): extends past the end of the file ({file_len} bytes)"),
        )),
    }
}

/// Parse and validate the header and its extensions.
pub fn parse_header(file: &File, path: &Path, file_len: u64) -> Result<Header, BlockError> {
    if file_len < V2_HEADER_LEN {
        return Err(corrupt(
            path,
            format!("header: file is truncated ({file_len} bytes)"),
        ));
    }
    let mut b = [0u8; V3_MIN_HEADER_LEN as usize];
    let n = (V3_MIN_HEADER_LEN.min(file_len)) as usize;
    read_exact(file, path, &mut b[..n], 0, "reading the header")?;
    if be32(&b, 0) != MAGIC {
        return Err(corrupt(path, "header: bad magic".into()));
    }
    let version = be32(&b, 4);
    if version != 2 && version != 3 {
        return Err(unsupported(
            path,
            format!("version {version} images are not supported"),
        ));
    }
    let mut h = Header {
        version,
        backing_file_offset: be64(&b, 8),
        backing_file_size: be32(&b, 16),
        cluster_bits: be32(&b, 20),
        size: be64(&b, 24),
        crypt_method: be32(&b, 32),
        l1_size: be32(&b, 36),
        l1_table_offset: be64(&b, 40),
        refcount_table_offset: be64(&b, 48),
        refcount_table_clusters: be32(&b, 56),
        nb_snapshots: be32(&b, 60),
        snapshots_offset: be64(&b, 64),
        incompatible_features: 0,
        compatible_features: 0,
        autoclear_features: 0,
        refcount_order: 4,
        header_length: V2_HEADER_LEN as u32,
        backing_format: None,
        backing_file: None,
    };
    if version >= 3 {
        if file_len < V3_MIN_HEADER_LEN {
            return Err(corrupt(
                path,
                format!("header: file is truncated ({file_len} bytes)"),
            ));
        }
        h.incompatible_features = be64(&b, 72);
        h.compatible_features = be64(&b, 80);
        h.autoclear_features = be64(&b, 88);
        h.refcount_order = be32(&b, 96);
        h.header_length = be32(&b, 100);
    }
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&h.cluster_bits) {
        return Err(corrupt(
            path,
            format!(
                "header: cluster_bits {} out of range {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}",
                h.cluster_bits
            ),
        ));
    }
    let cs = 1u64 << h.cluster_bits;
    if version >= 3 && ((h.header_length as u64) < V3_MIN_HEADER_LEN || h.header_length as u64 > cs)
    {
        return Err(corrupt(
            path,
            format!("header: header_length {} out of range", h.header_length),
        ));
    }
    if h.crypt_method != 0 {
        return Err(unsupported(path, "encryption is not supported"));
    }
    let incompat = h.incompatible_features;
    if incompat & INCOMPAT_DATA_FILE != 0 {
        return Err(unsupported(path, "external data files are not supported"));
    }
    if incompat & INCOMPAT_EXTL2 != 0 {
        return Err(unsupported(
            path,
            "extended L2 entries (subclusters) are not supported",
        ));
    }
    if incompat & !INCOMPAT_KNOWN != 0 {
        return Err(unsupported(
            path,
            format!(
                "unknown incompatible feature bits {:#x}",
                incompat & !INCOMPAT_KNOWN
            ),
        ));
    }
    if h.refcount_order > 6 {
        return Err(corrupt(
            path,
            format!(
                "header: refcount_order {} out of range 0..=6",
                h.refcount_order
            ),
        ));
    }

    // Virtual size and L1.
    let l2_span = cs * (cs / 8); // guest bytes per L2 table
    let l1_needed = h.size.div_ceil(l2_span);
    if l1_needed * 8 > MAX_L1_BYTES {
        return Err(unsupported(
            path,
            format!("virtual size {} is too large", h.size),
        ));
    }
    if (h.l1_size as u64) < l1_needed {
        return Err(corrupt(
            path,
            format!(
                "header: l1_size {} too small for virtual size {} (needs {l1_needed})",
                h.l1_size, h.size
            ),
        ));
    }
    if h.l1_size as u64 * 8 > MAX_L1_BYTES {
        return Err(unsupported(
            path,
            format!("L1 table of {} entries is too large", h.l1_size),
        ));
    }
    check_region(
        path,
        "L1 table",
        h.l1_table_offset,
        h.l1_size as u64 * 8,
        cs,
        file_len,
    )?;

    // Refcount table.
    let rt_bytes = h.refcount_table_clusters as u64 * cs;
    if h.refcount_table_clusters == 0 {
        return Err(corrupt(
            path,
            "header: refcount table has no clusters".into(),
        ));
    }
    if rt_bytes > MAX_REFTABLE_BYTES {
        return Err(unsupported(
            path,
            format!("refcount table of {rt_bytes} bytes is too large"),
        ));
    }
    check_region(
        path,
        "refcount table",
        h.refcount_table_offset,
        rt_bytes,
        cs,
        file_len,
    )?;
    let (l1s, l1e) = (h.l1_table_offset, h.l1_table_offset + h.l1_size as u64 * 8);
    let (rts, rte) = (h.refcount_table_offset, h.refcount_table_offset + rt_bytes);
    if h.l1_size > 0 && l1s < rte && rts < l1e {
        return Err(corrupt(
            path,
            "header: L1 table and refcount table overlap".into(),
        ));
    }

    // Header extensions, all inside cluster 0.
    let ext_start = if version >= 3 {
        h.header_length as u64
    } else {
        V2_HEADER_LEN
    };
    let first_cluster_len = cs.min(file_len);
    let mut c0 = vec![0u8; first_cluster_len as usize];
    read_exact(file, path, &mut c0, 0, "reading the header cluster")?;
    let ext_end = if h.backing_file_offset != 0 && h.backing_file_offset > ext_start {
        h.backing_file_offset.min(first_cluster_len)
    } else {
        first_cluster_len
    };
    let mut pos = ext_start;
    while pos + 8 <= ext_end {
        let ty = be32(&c0, pos as usize);
        let len = be32(&c0, pos as usize + 4) as u64;
        if ty == EXT_END {
            break;
        }
        let data_start = pos + 8;
        if data_start + len > first_cluster_len {
            return Err(corrupt(
                path,
                format!("header extension {ty:#x} at {pos:#x}: runs past the first cluster"),
            ));
        }
        let data = &c0[data_start as usize..(data_start + len) as usize];
        match ty {
            EXT_BACKING_FORMAT => {
                h.backing_format = Some(String::from_utf8_lossy(data).into_owned());
            }
            EXT_CRYPTO => return Err(unsupported(path, "encryption is not supported")),
            EXT_DATA_FILE => {
                return Err(unsupported(path, "external data files are not supported"))
            }
            EXT_FEATURE_TABLE => {}
            _ => {} // unknown extensions are ignorable by specification
        }
        pos = data_start + align_up(len, 8);
    }

    // Backing file name.
    if h.backing_file_offset != 0 {
        let size = h.backing_file_size as u64;
        if size == 0 || size > MAX_BACKING_NAME {
            return Err(corrupt(
                path,
                format!("header: backing file name length {size} out of range 1..=1023"),
            ));
        }
        let start = h.backing_file_offset;
        match start.checked_add(size) {
            Some(end) if start >= ext_start && end <= first_cluster_len => {
                let name = c0[start as usize..end as usize].to_vec();
                if name.contains(&0) {
                    return Err(corrupt(
                        path,
                        "header: backing file name contains NUL".into(),
                    ));
                }
                h.backing_file = Some(name);
            }
            _ => {
                return Err(corrupt(
                    path,
                    format!(
                        "header: backing file name at {start:#x} is outside the header cluster"
                    ),
                ))
            }
        }
    }
    Ok(h)
}

/// Open a backing file named in `overlay`'s header: relative names are
/// relative to the overlay's directory.
fn open_backing(
    overlay: &Path,
    name: &[u8],
    format: Option<ImageFormat>,
    depth: usize,
) -> Result<Box<dyn DiskImage>, BlockError> {
    let rel = Path::new(OsStr::from_bytes(name));
    let dir = overlay.parent().unwrap_or(Path::new("")).to_path_buf();
    let full = if rel.is_absolute() {
        rel.to_path_buf()
    } else {
        dir.join(rel)
    };
    if !full.exists() {
        return Err(BlockError::BackingNotFound {
            name: rel.display().to_string(),
            dir: if dir.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                dir
            },
        });
    }
    open_depth(
        &full,
        &OpenOptions {
            format,
            read_only: true,
            ..OpenOptions::default()
        },
        depth + 1,
    )
}

// ---- creation -------------------------------------------------------------

/// Options for [`create`].
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub size: u64,
    /// log2 of the cluster size, 9..=21 (16 = 64 KiB, QEMU's default).
    pub cluster_bits: u32,
    /// Backing file name exactly as it is to be stored (relative names are
    /// resolved against the new image's directory), and its format.
    pub backing: Option<(PathBuf, ImageFormat)>,
}

/// Create a new, empty qcow2 v3 image (16-bit refcounts, no lazy refcounts).
/// Refuses to overwrite an existing file.
pub fn create(path: &Path, opts: &CreateOptions) -> Result<(), BlockError> {
    let invalid = |what: String| BlockError::Invalid {
        path: path.to_path_buf(),
        what,
    };
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&opts.cluster_bits) {
        return Err(invalid(format!(
            "cluster_bits {} out of range",
            opts.cluster_bits
        )));
    }
    let cs = 1u64 << opts.cluster_bits;
    let l2_span = cs * (cs / 8);
    let l1_size = opts.size.div_ceil(l2_span).max(1);
    if l1_size * 8 > MAX_L1_BYTES {
        return Err(invalid(format!("virtual size {} is too large", opts.size)));
    }
    let refcount_order = 4u32;
    let rb_entries = cs * 8 / (1 << refcount_order);
    let l1_clusters = (l1_size * 8).div_ceil(cs);
    // Find a fixed point: enough refcount blocks for every metadata cluster,
    // enough table clusters for every refcount block.
    let (mut rt_clusters, mut rb_count) = (1u64, 1u64);
    loop {
        let total = 1 + rt_clusters + rb_count + l1_clusters;
        let need_rb = total.div_ceil(rb_entries);
        let need_rt = (need_rb * 8).div_ceil(cs);
        if need_rb == rb_count && need_rt == rt_clusters {
            break;
        }
        rb_count = need_rb;
        rt_clusters = need_rt;
    }
    if rt_clusters * cs > MAX_REFTABLE_BYTES {
        return Err(invalid("image too large for its cluster size".into()));
    }
    let rt_off = cs;
    let rb_off = rt_off + rt_clusters * cs;
    let l1_off = rb_off + rb_count * cs;
    let total = l1_off / cs + l1_clusters;

    // Header cluster.
    let mut h = vec![0u8; cs as usize];
    let put32 = |h: &mut [u8], at: usize, v: u32| h[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let put64 = |h: &mut [u8], at: usize, v: u64| h[at..at + 8].copy_from_slice(&v.to_be_bytes());
    put32(&mut h, 0, MAGIC);
    put32(&mut h, 4, 3);
    put32(&mut h, 20, opts.cluster_bits);
    put64(&mut h, 24, opts.size);
    put32(&mut h, 36, l1_size as u32);
    put64(&mut h, 40, l1_off);
    put64(&mut h, 48, rt_off);
    put32(&mut h, 56, rt_clusters as u32);
    put32(&mut h, 96, refcount_order);
    put32(&mut h, 100, V3_HEADER_LEN as u32);
    let mut pos = V3_HEADER_LEN as usize;
    if let Some((name, fmt)) = &opts.backing {
        let fmt_name = fmt.name().as_bytes();
        let name = name.as_os_str().as_bytes();
        if name.is_empty() || name.len() as u64 > MAX_BACKING_NAME || name.contains(&0) {
            return Err(invalid(
                "backing file name must be 1..=1023 bytes without NUL".into(),
            ));
        }
        let needed = pos + 8 + align_up(fmt_name.len() as u64, 8) as usize + 8 + name.len();
        if needed as u64 > cs {
            return Err(invalid(
                "backing file name does not fit in the header cluster".into(),
            ));
        }
        put32(&mut h, pos, EXT_BACKING_FORMAT);
        put32(&mut h, pos + 4, fmt_name.len() as u32);
        h[pos + 8..pos + 8 + fmt_name.len()].copy_from_slice(fmt_name);
        pos += 8 + align_up(fmt_name.len() as u64, 8) as usize;
        // End-of-extensions marker (already zero), then the name.
        pos += 8;
        put64(&mut h, 8, pos as u64);
        put32(&mut h, 16, name.len() as u32);
        h[pos..pos + name.len()].copy_from_slice(name);
    }

    // Refcount table and blocks.
    let mut rt = vec![0u8; (rt_clusters * cs) as usize];
    for i in 0..rb_count {
        put64(&mut rt, 8 * i as usize, rb_off + i * cs);
    }
    let mut rbs = vec![0u8; (rb_count * cs) as usize];
    for c in 0..total {
        rbs[2 * c as usize..2 * c as usize + 2].copy_from_slice(&1u16.to_be_bytes());
    }

    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| BlockError::io(path, "creating", e))?;
    let res = (|| {
        pwrite_all(&file, path, &h, 0)?;
        pwrite_all(&file, path, &rt, rt_off)?;
        pwrite_all(&file, path, &rbs, rb_off)?;
        file.set_len(total * cs)
            .map_err(|e| BlockError::io(path, "sizing", e))?;
        file.sync_all()
            .map_err(|e| BlockError::io(path, "fsync", e))?;
        // Make the new directory entry durable too.
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| BlockError::io(dir, "fsync of the directory", e))
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(path);
    }
    res
}

/// Create a qcow2 v3 overlay at `path` whose backing file is `backing`
/// (stored as given: a relative name is relative to `path`'s directory),
/// with the backing image's virtual size. The backing image's format is
/// probed and recorded. For linked clones.
pub fn create_qcow2_overlay(path: &Path, backing: &Path) -> Result<(), BlockError> {
    let resolved = if backing.is_absolute() {
        backing.to_path_buf()
    } else {
        path.parent().unwrap_or(Path::new("")).join(backing)
    };
    if !resolved.exists() {
        let dir = path.parent().unwrap_or(Path::new("")).to_path_buf();
        return Err(BlockError::BackingNotFound {
            name: backing.display().to_string(),
            dir: if dir.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                dir
            },
        });
    }
    // Open the whole chain, so a broken chain is reported now, not at boot.
    let base = crate::open(&resolved, None, true)?;
    create(
        path,
        &CreateOptions {
            size: base.size(),
            cluster_bits: 16,
            backing: Some((backing.to_path_buf(), base.format())),
        },
    )
}

// ---- check ------------------------------------------------------------------

/// What [`check`] found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CheckReport {
    /// One line per inconsistency that loses or may lose data (a refcount
    /// lower than the references, a table pointing outside the file).
    pub corruptions: Vec<String>,
    /// Clusters with a refcount but no reference: wasted space only.
    pub leaks: u64,
    /// Guest clusters allocated in this image, and the image's total.
    pub allocated_clusters: u64,
    pub total_clusters: u64,
    /// The end of the last cluster in use.
    pub image_end_offset: u64,
}

/// Check a qcow2 image's metadata: rebuild every cluster's reference count
/// from the tables (header, L1, L2, refcount structures, data) and compare
/// it with the stored refcounts, as `qemu-img check` does. Reads the file
/// directly, without the cache, and changes nothing.
pub fn check(path: &Path) -> Result<CheckReport, BlockError> {
    let file = File::open(path).map_err(|e| BlockError::io(path, "opening", e))?;
    crate::lock_file(&file, path, true)?;
    let r = check_file(&file, path);
    crate::unlock_file(&file);
    r
}

fn check_file(file: &File, path: &Path) -> Result<CheckReport, BlockError> {
    let file_len = file
        .metadata()
        .map_err(|e| BlockError::io(path, "stat", e))?
        .len();
    let h = parse_header(file, path, file_len)?;
    if h.nb_snapshots > 0 {
        return Err(unsupported(
            path,
            "checking images with internal snapshots is not supported (use qemu-img check)",
        ));
    }
    let cs = 1u64 << h.cluster_bits;
    let file_clusters = file_len.div_ceil(cs);
    // Expected references per host cluster; anything pointing past the
    // file's end is a corruption, so the vector is bounded by the file.
    let mut refs = vec![0u32; file_clusters as usize];
    let mut rep = CheckReport::default();
    let mut mark = |rep: &mut CheckReport, off: u64, len: u64, what: &str| {
        let first = off / cs;
        let last = (off + len.max(1) - 1) / cs;
        for c in first..=last {
            match refs.get_mut(c as usize) {
                Some(r) => *r = r.saturating_add(1),
                None => rep.corruptions.push(format!(
                    "{what} at {off:#x}: cluster {c} is past the end of the file"
                )),
            }
        }
    };
    mark(&mut rep, 0, cs, "header");
    mark(
        &mut rep,
        h.l1_table_offset,
        h.l1_size as u64 * 8,
        "L1 table",
    );
    let rt_bytes = h.refcount_table_clusters as u64 * cs;
    mark(
        &mut rep,
        h.refcount_table_offset,
        rt_bytes,
        "refcount table",
    );

    let mut raw = vec![0u8; (h.l1_size as u64 * 8) as usize];
    read_exact(
        file,
        path,
        &mut raw,
        h.l1_table_offset,
        "reading the L1 table",
    )?;
    let l1: Vec<u64> = raw.chunks_exact(8).map(|c| be64(c, 0)).collect();
    let mut l2 = vec![0u8; cs as usize];
    for (i, &e) in l1.iter().enumerate() {
        let off = e & L1E_OFFSET_MASK;
        if off == 0 {
            continue;
        }
        if off & (cs - 1) != 0 || off + cs > file_len {
            rep.corruptions.push(format!(
                "L1 entry {i}: L2 table at {off:#x} is unaligned or outside the file"
            ));
            continue;
        }
        mark(&mut rep, off, cs, "L2 table");
        read_exact(file, path, &mut l2, off, "reading an L2 table")?;
        for (j, c) in l2.chunks_exact(8).enumerate() {
            let e = be64(c, 0);
            if e & OFLAG_COMPRESSED != 0 {
                // Offset and length of compressed data (spec: x = 62 - (cluster_bits - 8)).
                let x = 62 - (h.cluster_bits - 8);
                let host = e & ((1u64 << x) - 1);
                let sectors = ((e >> x) & ((1u64 << (62 - x)) - 1)) + 1;
                let end = (host & !511) + sectors * 512;
                mark(&mut rep, host, end - host, "compressed cluster");
                rep.allocated_clusters += 1;
                continue;
            }
            let host = e & L2E_OFFSET_MASK;
            if host != 0 {
                if host & (cs - 1) != 0 {
                    rep.corruptions.push(format!(
                        "L2 table at {off:#x}, entry {j}: unaligned data offset {host:#x}"
                    ));
                    continue;
                }
                mark(&mut rep, host, cs, "data cluster");
            }
            if host != 0 || e & OFLAG_ZERO != 0 {
                rep.allocated_clusters += 1;
            }
        }
    }

    // Refcount table and blocks.
    let mut rt = vec![0u8; rt_bytes as usize];
    read_exact(
        file,
        path,
        &mut rt,
        h.refcount_table_offset,
        "reading the refcount table",
    )?;
    let rb_entries = (cs * 8) >> h.refcount_order;
    let mut blocks = Vec::new();
    for (i, c) in rt.chunks_exact(8).enumerate() {
        let off = be64(c, 0) & REFT_OFFSET_MASK;
        if off == 0 {
            continue;
        }
        if off & (cs - 1) != 0 || off + cs > file_len {
            rep.corruptions.push(format!(
                "refcount table entry {i}: block at {off:#x} is unaligned or outside the file"
            ));
            continue;
        }
        mark(&mut rep, off, cs, "refcount block");
        blocks.push((i as u64, off));
    }
    let order = h.refcount_order;
    let get = |data: &[u8], i: usize| -> u64 {
        match order {
            0..=2 => {
                let bits = 1usize << order;
                let bit = i * bits;
                ((data[bit / 8] >> (bit % 8)) & ((1u16 << bits) - 1) as u8) as u64
            }
            3 => data[i] as u64,
            4 => be16(data, 2 * i) as u64,
            5 => be32(data, 4 * i) as u64,
            _ => be64(data, 8 * i),
        }
    };
    let mut stored = vec![0u64; file_clusters as usize];
    let mut rb = vec![0u8; cs as usize];
    for (i, off) in blocks {
        // Counts for clusters past the end of the file are not looked at
        // (they cover no data), which also bounds the work by the file size.
        let first = i.saturating_mul(rb_entries);
        if first >= file_clusters {
            continue;
        }
        read_exact(file, path, &mut rb, off, "reading a refcount block")?;
        for k in 0..rb_entries.min(file_clusters - first) {
            stored[(first + k) as usize] = get(&rb, k as usize);
        }
    }
    for (c, (&want, &have)) in refs.iter().zip(stored.iter()).enumerate() {
        let want = want as u64;
        if want > have {
            rep.corruptions.push(format!(
                "cluster {c} (offset {:#x}): refcount {have}, but {want} references",
                c as u64 * cs
            ));
        } else if want < have {
            rep.leaks += 1;
        }
        if want > 0 || have > 0 {
            rep.image_end_offset = (c as u64 + 1) * cs;
        }
    }
    rep.total_clusters = h.size.div_ceil(cs);
    Ok(rep)
}

// ---- changing the backing file ---------------------------------------------

/// Rewrite the backing file name (and format) in `path`'s header, or drop
/// it (`None`). Changes only the header, not the data: `vireo img rebase`
/// copies what must be kept first. The header cluster is written in one
/// call; unknown header extensions are kept.
pub fn set_backing(path: &Path, backing: Option<(&Path, ImageFormat)>) -> Result<(), BlockError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| BlockError::io(path, "opening", e))?;
    crate::lock_file(&file, path, false)?;
    let r = set_backing_file(&file, path, backing);
    crate::unlock_file(&file);
    r
}

fn set_backing_file(
    file: &File,
    path: &Path,
    backing: Option<(&Path, ImageFormat)>,
) -> Result<(), BlockError> {
    let file_len = file
        .metadata()
        .map_err(|e| BlockError::io(path, "stat", e))?
        .len();
    let h = parse_header(file, path, file_len)?;
    if h.version < 3 {
        return Err(unsupported(
            path,
            "version 2 images are read-only in Vireo (upgrade with: qemu-img amend -o compat=1.1)",
        ));
    }
    let cs = 1u64 << h.cluster_bits;
    let mut c0 = vec![0u8; cs.min(file_len) as usize];
    read_exact(file, path, &mut c0, 0, "reading the header cluster")?;
    // Keep every extension but the backing format.
    let start = h.header_length as usize;
    let mut exts = Vec::new();
    let mut pos = start;
    while pos + 8 <= c0.len() {
        let ty = be32(&c0, pos);
        let len = be32(&c0, pos + 4) as usize;
        if ty == EXT_END {
            break;
        }
        let padded = align_up(len as u64, 8) as usize;
        if pos + 8 + padded > c0.len() {
            return Err(corrupt(
                path,
                format!("header extension {ty:#x} at {pos:#x}: runs past the first cluster"),
            ));
        }
        if ty != EXT_BACKING_FORMAT {
            exts.extend_from_slice(&c0[pos..pos + 8 + padded]);
        }
        pos += 8 + padded;
    }
    let mut name_bytes = Vec::new();
    if let Some((name, fmt)) = backing {
        let n = name.as_os_str().as_bytes();
        if n.is_empty() || n.len() as u64 > MAX_BACKING_NAME || n.contains(&0) {
            return Err(BlockError::Invalid {
                path: path.to_path_buf(),
                what: "backing file name must be 1..=1023 bytes without NUL".into(),
            });
        }
        let f = fmt.name().as_bytes();
        exts.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        exts.extend_from_slice(&(f.len() as u32).to_be_bytes());
        exts.extend_from_slice(f);
        exts.resize(align_up(exts.len() as u64, 8) as usize, 0);
        name_bytes = n.to_vec();
    }
    exts.extend_from_slice(&[0u8; 8]); // end of extensions
    let name_off = start + exts.len();
    if name_off + name_bytes.len() > cs as usize {
        return Err(BlockError::Invalid {
            path: path.to_path_buf(),
            what: "backing file name does not fit in the header cluster".into(),
        });
    }
    c0.resize(cs as usize, 0);
    c0[start..].fill(0);
    c0[start..name_off].copy_from_slice(&exts);
    c0[name_off..name_off + name_bytes.len()].copy_from_slice(&name_bytes);
    let (off, len) = if name_bytes.is_empty() {
        (0u64, 0u32)
    } else {
        (name_off as u64, name_bytes.len() as u32)
    };
    c0[8..16].copy_from_slice(&off.to_be_bytes());
    c0[16..20].copy_from_slice(&len.to_be_bytes());
    pwrite_all(file, path, &c0, 0)?;
    file.sync_all()
        .map_err(|e| BlockError::io(path, "fsync", e))
}
