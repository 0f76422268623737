//! The operations behind `vireo img`: create, info, check, compare,
//! convert, resize, commit and rebase, on any format this crate reads.
//!
//! Invariants: no operation overwrites a file it did not create, except
//! the image it was asked to change (resize, commit's backing file,
//! rebase's overlay); `convert` refuses an existing destination and removes
//! what it created when it fails. Backing file names are resolved as qcow2
//! stores them: relative to the directory of the image that names them.
//! Progress is reported through a callback, so the library prints nothing.

use std::path::{Path, PathBuf};

use crate::{
    open_with, qcow2, Allocation, BlockError, DiskImage, ImageDetails, ImageFormat, OpenOptions,
    MAX_BACKING_DEPTH,
};

/// Unit of copying: big enough for throughput, small enough for progress.
const CHUNK: u64 = 1 << 20;
/// Zero detection granularity when copying: a zero run this long and
/// aligned is not written (qcow2's default cluster size).
const ZERO_GRAIN: u64 = 64 << 10;

/// Errors `check` lists before it stops walking a VMDK or VHDX.
const MAX_REPORTED: usize = 100;

/// Reports `(bytes done, bytes total)` as a long operation advances.
pub type ProgressFn<'a> = &'a mut dyn FnMut(u64, u64);

fn invalid(path: &Path, what: impl Into<String>) -> BlockError {
    BlockError::Invalid {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

fn open_ro(path: &Path, format: Option<ImageFormat>) -> Result<Box<dyn DiskImage>, BlockError> {
    open_with(
        path,
        &OpenOptions {
            format,
            read_only: true,
            ..OpenOptions::default()
        },
    )
}

/// Open one layer of a chain alone (its backing file not opened).
fn open_layer(
    path: &Path,
    format: Option<ImageFormat>,
    read_only: bool,
) -> Result<Box<dyn DiskImage>, BlockError> {
    open_with(
        path,
        &OpenOptions {
            format,
            read_only,
            follow_backing: false,
            detach_backing: true,
        },
    )
}

/// Where a backing file named `name` in `image` is.
pub fn resolve_backing(image: &Path, name: &Path) -> PathBuf {
    if name.is_absolute() {
        name.to_path_buf()
    } else {
        image.parent().unwrap_or(Path::new("")).join(name)
    }
}

/// Parse a size: bytes, or with a suffix K, M, G, T (powers of 1024;
/// an optional trailing "iB" or "B" is accepted).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                'P' => 50,
                _ => return Err(format!("unknown size suffix in '{s}' (use K, M, G or T)")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 10G, 512M, 1048576)"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size '{s}' is too large"))
}

// ---- create -----------------------------------------------------------------

/// What [`create`] makes.
#[derive(Debug, Clone)]
pub struct CreateSpec {
    pub format: ImageFormat,
    /// Virtual size; with a backing file, None means the backing file's.
    pub size: Option<u64>,
    /// Backing file name as it is to be stored (relative to the new image's
    /// directory), and its format (None: probed). qcow2 only.
    pub backing: Option<(PathBuf, Option<ImageFormat>)>,
    /// log2 of the qcow2 cluster size (16: 64 KiB).
    pub cluster_bits: u32,
}

/// Create a new image; refuses to overwrite an existing file.
pub fn create(path: &Path, spec: &CreateSpec) -> Result<(), BlockError> {
    if path.symlink_metadata().is_ok() {
        return Err(invalid(path, "already exists; refusing to overwrite it"));
    }
    match spec.format {
        ImageFormat::Raw => {
            if spec.backing.is_some() {
                return Err(invalid(path, "raw images cannot have a backing file"));
            }
            let Some(size) = spec.size else {
                return Err(invalid(path, "no size given"));
            };
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .map_err(|e| BlockError::io(path, "creating", e))?;
            file.set_len(size).map_err(|e| {
                let _ = std::fs::remove_file(path);
                BlockError::io(path, "sizing", e)
            })?;
            Ok(())
        }
        ImageFormat::Qcow2 => {
            let backing = match &spec.backing {
                None => None,
                Some((name, fmt)) => {
                    let full = resolve_backing(path, name);
                    if !full.exists() {
                        return Err(BlockError::BackingNotFound {
                            name: name.display().to_string(),
                            dir: full.parent().map(Path::to_path_buf).unwrap_or_default(),
                        });
                    }
                    // The whole chain opens: a broken one is reported now.
                    let base = open_ro(&full, *fmt)?;
                    Some((name.clone(), base.format(), base.size()))
                }
            };
            let size = match (spec.size, &backing) {
                (Some(s), _) => s,
                (None, Some((_, _, s))) => *s,
                (None, None) => return Err(invalid(path, "no size given")),
            };
            qcow2::create(
                path,
                &qcow2::CreateOptions {
                    size,
                    cluster_bits: spec.cluster_bits,
                    backing: backing.map(|(n, f, _)| (n, f)),
                },
            )
        }
        f => Err(BlockError::ReadOnlyFormat {
            path: path.to_path_buf(),
            format: f,
        }),
    }
}

// ---- info -------------------------------------------------------------------

/// One image of a chain, as `vireo img info` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LayerInfo {
    pub filename: String,
    pub format: ImageFormat,
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    /// Bytes the file takes on the host (its allocated blocks).
    #[serde(rename = "actual-size")]
    pub actual_size: u64,
    /// Bytes of the virtual disk this image itself stores (data and zero
    /// clusters; not what its backing file provides).
    #[serde(rename = "allocated-size")]
    pub allocated_size: u64,
    #[serde(flatten)]
    pub details: ImageDetails,
    #[serde(
        rename = "full-backing-filename",
        skip_serializing_if = "Option::is_none"
    )]
    pub full_backing_filename: Option<String>,
}

/// An image and the chain of backing files below it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Info {
    #[serde(flatten)]
    pub image: LayerInfo,
    /// The backing files, nearest first.
    #[serde(rename = "backing-chain")]
    pub backing_chain: Vec<LayerInfo>,
}

fn layer_info(path: &Path, format: Option<ImageFormat>) -> Result<LayerInfo, BlockError> {
    let mut img = open_layer(path, format, true)?;
    let meta = std::fs::metadata(path).map_err(|e| BlockError::io(path, "stat", e))?;
    let actual_size = {
        use std::os::unix::fs::MetadataExt;
        meta.blocks() * 512
    };
    let size = img.size();
    let mut allocated = 0;
    let mut off = 0;
    while off < size {
        let (st, n) = img.block_status(off, (size - off).min(1 << 40))?;
        if st != Allocation::Unallocated {
            allocated += n;
        }
        off += n;
    }
    let details = img.details();
    let full = details
        .backing_filename
        .as_ref()
        .map(|n| resolve_backing(path, Path::new(n)).display().to_string());
    Ok(LayerInfo {
        filename: path.display().to_string(),
        format: img.format(),
        virtual_size: size,
        actual_size,
        allocated_size: allocated,
        details,
        full_backing_filename: full,
    })
}

/// Describe `path` and its backing chain.
pub fn info(path: &Path, format: Option<ImageFormat>) -> Result<Info, BlockError> {
    let image = layer_info(path, format)?;
    let mut chain = Vec::new();
    let mut next = image.full_backing_filename.clone().map(|f| {
        let fmt = image
            .details
            .backing_format
            .as_deref()
            .and_then(|s| s.parse().ok());
        (PathBuf::from(f), fmt)
    });
    while let Some((p, fmt)) = next {
        if chain.len() >= MAX_BACKING_DEPTH {
            return Err(BlockError::BackingChainTooDeep {
                path: path.to_path_buf(),
            });
        }
        let l = layer_info(&p, fmt)?;
        next = l.full_backing_filename.clone().map(|f| {
            let fmt = l
                .details
                .backing_format
                .as_deref()
                .and_then(|s| s.parse().ok());
            (PathBuf::from(f), fmt)
        });
        chain.push(l);
    }
    Ok(Info {
        image,
        backing_chain: chain,
    })
}

fn human(b: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.3} {}", UNITS[u])
    }
}

impl LayerInfo {
    /// The text form, one `key: value` a line.
    pub fn text(&self) -> String {
        let mut s = format!(
            "image: {}\nfile format: {}\nvirtual size: {} ({} bytes)\ndisk size: {}\nallocated: {} ({} bytes)\n",
            self.filename,
            self.format,
            human(self.virtual_size),
            self.virtual_size,
            human(self.actual_size),
            human(self.allocated_size),
            self.allocated_size
        );
        if let Some(c) = self.details.cluster_size {
            s += &format!("cluster_size: {c}\n");
        }
        if let Some(f) = &self.details.subformat {
            s += &format!("subformat: {f}\n");
        }
        if let Some(b) = &self.details.backing_filename {
            s += &format!("backing file: {b}");
            if let Some(full) = &self.full_backing_filename {
                if full != b {
                    s += &format!(" (actual path: {full})");
                }
            }
            s += "\n";
        }
        if let Some(f) = &self.details.backing_format {
            s += &format!("backing file format: {f}\n");
        }
        s
    }
}

impl Info {
    pub fn text(&self) -> String {
        let mut s = self.image.text();
        for l in &self.backing_chain {
            s += "\n";
            s += &l.text();
        }
        s
    }
}

// ---- check ------------------------------------------------------------------

/// What `vireo img check` found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckResult {
    pub filename: String,
    pub format: ImageFormat,
    /// Each corruption found (empty: none).
    pub corruptions: Vec<String>,
    pub leaks: u64,
    #[serde(rename = "allocated-clusters", skip_serializing_if = "Option::is_none")]
    pub allocated_clusters: Option<u64>,
    #[serde(rename = "total-clusters", skip_serializing_if = "Option::is_none")]
    pub total_clusters: Option<u64>,
    #[serde(rename = "image-end-offset", skip_serializing_if = "Option::is_none")]
    pub image_end_offset: Option<u64>,
    /// False when the format has no metadata to check (raw).
    pub checked: bool,
}

/// Check an image's metadata. qcow2: refcounts against references (as
/// `qemu-img check`); VMDK and VHDX: every grain table / BAT entry is
/// walked and validated; raw: nothing to check. A structure too broken to
/// walk at all is an `Err`.
pub fn check(path: &Path, format: Option<ImageFormat>) -> Result<CheckResult, BlockError> {
    let fmt = match format {
        Some(f) => f,
        None => crate::probe_format(path)?,
    };
    let mut res = CheckResult {
        filename: path.display().to_string(),
        format: fmt,
        corruptions: Vec::new(),
        leaks: 0,
        allocated_clusters: None,
        total_clusters: None,
        image_end_offset: None,
        checked: true,
    };
    match fmt {
        ImageFormat::Raw => {
            // Opening checks the format given matches.
            open_layer(path, Some(fmt), true)?;
            res.checked = false;
        }
        ImageFormat::Qcow2 => {
            let r = qcow2::check(path)?;
            res.corruptions = r.corruptions;
            res.leaks = r.leaks;
            res.allocated_clusters = Some(r.allocated_clusters);
            res.total_clusters = Some(r.total_clusters);
            res.image_end_offset = Some(r.image_end_offset);
        }
        ImageFormat::Vmdk | ImageFormat::Vhdx => {
            let mut img = open_layer(path, Some(fmt), true)?;
            let size = img.size();
            let unit = img.details().cluster_size.unwrap_or(CHUNK).max(1);
            let (mut off, mut allocated) = (0u64, 0u64);
            while off < size {
                match img.block_status(off, (size - off).min(1 << 40)) {
                    Ok((st, n)) => {
                        if st != Allocation::Unallocated {
                            allocated += n.div_ceil(unit);
                        }
                        off += n;
                    }
                    Err(e) => {
                        res.corruptions.push(e.to_string());
                        if res.corruptions.len() >= MAX_REPORTED {
                            res.corruptions
                                .push(format!("(stopped after {MAX_REPORTED} errors)"));
                            break;
                        }
                        off = (off / unit + 1) * unit;
                    }
                }
            }
            res.allocated_clusters = Some(allocated);
            res.total_clusters = Some(size.div_ceil(unit));
        }
    }
    Ok(res)
}

impl CheckResult {
    pub fn text(&self) -> String {
        if !self.checked {
            return format!(
                "{}: {} images have no metadata to check\n",
                self.filename, self.format
            );
        }
        let mut s = String::new();
        for c in &self.corruptions {
            s += &format!("ERROR {c}\n");
        }
        if self.leaks > 0 {
            s += &format!(
                "{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                self.leaks
            );
        }
        if self.corruptions.is_empty() && self.leaks == 0 {
            s += "No errors were found on the image.\n";
        } else if !self.corruptions.is_empty() {
            s += &format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                self.corruptions.len()
            );
        }
        if let (Some(a), Some(t)) = (self.allocated_clusters, self.total_clusters) {
            let pct = if t > 0 {
                a as f64 * 100.0 / t as f64
            } else {
                0.0
            };
            s += &format!("{a}/{t} = {pct:.2}% allocated\n");
        }
        if let Some(e) = self.image_end_offset {
            s += &format!("Image end offset: {e}\n");
        }
        s
    }

    /// `qemu-img check`'s exit codes: 0 clean, 2 corruptions, 3 leaks only.
    pub fn exit_code(&self) -> i32 {
        if !self.corruptions.is_empty() {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }
}

// ---- compare ----------------------------------------------------------------

/// Where two images first differ, if they do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Comparison {
    Identical,
    /// First differing byte offset (of the virtual disks).
    Differ(u64),
    /// Sizes differ (`strict`), or the longer image has data past the
    /// shorter one's end at this offset.
    SizeDiffers {
        a: u64,
        b: u64,
    },
}

/// Compare the guest-visible contents of two images (chains followed).
/// Without `strict`, a size difference is fine if the longer image reads
/// as zeros past the shorter one's end, as with `qemu-img compare`.
pub fn compare(
    a: &Path,
    fa: Option<ImageFormat>,
    b: &Path,
    fb: Option<ImageFormat>,
    strict: bool,
    progress: ProgressFn,
) -> Result<Comparison, BlockError> {
    let mut ia = open_ro(a, fa)?;
    let mut ib = open_ro(b, fb)?;
    let (sa, sb) = (ia.size(), ib.size());
    if strict && sa != sb {
        return Ok(Comparison::SizeDiffers { a: sa, b: sb });
    }
    let common = sa.min(sb);
    let total = sa.max(sb);
    let mut ba = vec![0u8; CHUNK as usize];
    let mut bb = vec![0u8; CHUNK as usize];
    let mut off = 0;
    while off < common {
        let n = (common - off).min(CHUNK) as usize;
        ia.read_at(&mut ba[..n], off)?;
        ib.read_at(&mut bb[..n], off)?;
        if ba[..n] != bb[..n] {
            let i = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y);
            return Ok(Comparison::Differ(off + i.unwrap_or(0) as u64));
        }
        off += n as u64;
        progress(off, total);
    }
    let longer = if sa > sb { &mut ia } else { &mut ib };
    while off < total {
        let n = (total - off).min(CHUNK) as usize;
        longer.read_at(&mut ba[..n], off)?;
        if let Some(i) = ba[..n].iter().position(|&x| x != 0) {
            let _ = i;
            return Ok(Comparison::SizeDiffers { a: sa, b: sb });
        }
        off += n as u64;
        progress(off, total);
    }
    Ok(Comparison::Identical)
}

// ---- convert ----------------------------------------------------------------

/// What [`convert`] writes.
#[derive(Debug, Clone)]
pub struct ConvertSpec {
    /// Source format (None: probed).
    pub src_format: Option<ImageFormat>,
    pub dst_format: ImageFormat,
    /// log2 of the qcow2 cluster size.
    pub cluster_bits: u32,
}

/// What a finished [`convert`] did.
#[derive(Debug, Clone, Default)]
pub struct ConvertStats {
    pub virtual_size: u64,
    /// Bytes read from the source (unallocated ranges are not read).
    pub bytes_read: u64,
    /// Bytes written to the destination (zero runs are skipped).
    pub bytes_written: u64,
}

/// Copy the guest-visible contents of `src` (a file or a block device, any
/// format, its backing chain flattened) into a new image `dst`. Ranges the
/// source does not store are not read, and aligned zero runs are not
/// written, so the result is sparse. `dst` must not exist; if the
/// conversion fails, the partial `dst` is removed.
pub fn convert(
    src: &Path,
    dst: &Path,
    spec: &ConvertSpec,
    progress: ProgressFn,
) -> Result<ConvertStats, BlockError> {
    if dst.symlink_metadata().is_ok() {
        return Err(invalid(dst, "already exists; refusing to overwrite it"));
    }
    if !spec.dst_format.writable() {
        return Err(BlockError::ReadOnlyFormat {
            path: dst.to_path_buf(),
            format: spec.dst_format,
        });
    }
    let mut input = open_ro(src, spec.src_format)?;
    let size = input.size();
    create(
        dst,
        &CreateSpec {
            format: spec.dst_format,
            size: Some(size),
            backing: None,
            cluster_bits: spec.cluster_bits,
        },
    )?;
    let result = (|| {
        let mut output = open_with(
            dst,
            &OpenOptions {
                format: Some(spec.dst_format),
                read_only: false,
                ..OpenOptions::default()
            },
        )?;
        let stats = copy_all(input.as_mut(), output.as_mut(), progress)?;
        output.flush()?;
        Ok(stats)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    result
}

/// Whether any layer of `img`'s chain may hold data at `[off, off+n)`:
/// answers for the top layer only when there is no backing file.
fn skippable(img: &mut dyn DiskImage, off: u64, len: u64) -> Result<Option<u64>, BlockError> {
    if img.backing().is_some() {
        return Ok(None);
    }
    match img.block_status(off, len)? {
        (Allocation::Data, _) => Ok(None),
        (_, n) => Ok(Some(n)),
    }
}

fn copy_all(
    input: &mut dyn DiskImage,
    output: &mut dyn DiskImage,
    progress: ProgressFn,
) -> Result<ConvertStats, BlockError> {
    let size = input.size();
    let mut stats = ConvertStats {
        virtual_size: size,
        ..ConvertStats::default()
    };
    let mut buf = vec![0u8; CHUNK as usize];
    let mut off = 0u64;
    progress(0, size);
    while off < size {
        let want = (size - off).min(CHUNK - off % CHUNK);
        if let Some(n) = skippable(input, off, want)? {
            off += n;
            progress(off, size);
            continue;
        }
        let n = match input.block_status(off, want) {
            Ok((Allocation::Data, n)) if input.backing().is_none() => n,
            _ => want,
        } as usize;
        input.read_at(&mut buf[..n], off)?;
        stats.bytes_read += n as u64;
        write_nonzero(output, &buf[..n], off, &mut stats)?;
        off += n as u64;
        progress(off, size);
    }
    Ok(stats)
}

/// Write `data` at `off`, skipping zero pieces aligned to [`ZERO_GRAIN`].
fn write_nonzero(
    output: &mut dyn DiskImage,
    data: &[u8],
    off: u64,
    stats: &mut ConvertStats,
) -> Result<(), BlockError> {
    let mut i = 0usize;
    let mut run: Option<usize> = None;
    while i < data.len() {
        let piece_end = ((((off + i as u64) / ZERO_GRAIN) + 1) * ZERO_GRAIN - off) as usize;
        let end = piece_end.min(data.len());
        let zero = data[i..end].iter().all(|&b| b == 0);
        match (zero, run) {
            (false, None) => run = Some(i),
            (true, Some(s)) => {
                output.write_at(&data[s..i], off + s as u64)?;
                stats.bytes_written += (i - s) as u64;
                run = None;
            }
            _ => {}
        }
        i = end;
    }
    if let Some(s) = run {
        output.write_at(&data[s..], off + s as u64)?;
        stats.bytes_written += (data.len() - s) as u64;
    }
    Ok(())
}

// ---- resize -----------------------------------------------------------------

/// Change an image's virtual size. Shrinking must be asked for
/// (`allow_shrink`), and only raw images can shrink.
pub fn resize(
    path: &Path,
    format: Option<ImageFormat>,
    new_size: u64,
    allow_shrink: bool,
) -> Result<u64, BlockError> {
    let mut img = open_with(
        path,
        &OpenOptions {
            format,
            read_only: false,
            ..OpenOptions::default()
        },
    )?;
    let old = img.size();
    if new_size < old && !allow_shrink {
        return Err(invalid(
            path,
            format!("shrinking from {old} to {new_size} bytes loses data; pass --shrink to do it"),
        ));
    }
    img.resize(new_size)?;
    img.flush()?;
    Ok(old)
}

// ---- commit -----------------------------------------------------------------

/// Write what the qcow2 overlay `path` stores into its backing file, so the
/// backing file holds the overlay's view of the disk. The overlay is left
/// as it is (it reads the same as before: its data now equals the base's).
/// Returns the bytes written.
pub fn commit(path: &Path, progress: ProgressFn) -> Result<u64, BlockError> {
    let mut top = open_layer(path, None, true)?;
    let d = top.details();
    let Some(name) = d.backing_filename else {
        return Err(invalid(path, "has no backing file to commit into"));
    };
    let base_path = resolve_backing(path, Path::new(&name));
    let base_fmt = d.backing_format.as_deref().and_then(|s| s.parse().ok());
    let mut base = open_with(
        &base_path,
        &OpenOptions {
            format: base_fmt,
            read_only: false,
            ..OpenOptions::default()
        },
    )?;
    let size = top.size();
    if base.size() < size {
        return Err(invalid(
            &base_path,
            format!(
                "backing file ({} bytes) is smaller than the overlay ({size} bytes): grow it first (vireo img resize)",
                base.size()
            ),
        ));
    }
    let mut buf = vec![0u8; CHUNK as usize];
    let mut written = 0;
    let mut off = 0;
    progress(0, size);
    while off < size {
        let want = (size - off).min(CHUNK - off % CHUNK);
        let (st, n) = top.block_status(off, want)?;
        match st {
            Allocation::Data => {
                top.read_at(&mut buf[..n as usize], off)?;
                base.write_at(&buf[..n as usize], off)?;
                written += n;
            }
            Allocation::Zero => {
                base.write_zeroes(off, n)?;
                written += n;
            }
            Allocation::Unallocated => {}
        }
        off += n;
        progress(off, size);
    }
    base.flush()?;
    Ok(written)
}

// ---- rebase -----------------------------------------------------------------

/// Give the qcow2 overlay `path` a new backing file (`None`: none, the
/// overlay becomes standalone). Safe mode (`unsafe_header_only == false`)
/// first copies into the overlay every range it does not store where the
/// old and new backing files differ, so the guest sees the same disk;
/// unsafe mode only rewrites the header (for a backing file that was
/// moved or renamed). `new_backing` is stored as given and, if relative,
/// resolved against the overlay's directory. Returns the bytes copied.
pub fn rebase(
    path: &Path,
    new_backing: Option<(&Path, Option<ImageFormat>)>,
    unsafe_header_only: bool,
    progress: ProgressFn,
) -> Result<u64, BlockError> {
    let fmt = crate::probe_format(path)?;
    if fmt != ImageFormat::Qcow2 {
        return Err(invalid(
            path,
            format!("is a {fmt} image; only qcow2 images have a backing file"),
        ));
    }
    // Open (and so check) the new backing chain and learn its format.
    let mut new_img = match new_backing {
        None => None,
        Some((name, f)) => {
            let full = resolve_backing(path, name);
            if !full.exists() {
                return Err(BlockError::BackingNotFound {
                    name: name.display().to_string(),
                    dir: full.parent().map(Path::to_path_buf).unwrap_or_default(),
                });
            }
            Some(open_ro(&full, f)?)
        }
    };
    let new_header = new_backing
        .zip(new_img.as_ref())
        .map(|((name, _), img)| (name, img.format()));
    let mut copied = 0;
    if !unsafe_header_only {
        let mut top = open_layer(path, Some(ImageFormat::Qcow2), false)?;
        let d = top.details();
        let mut old_img = match &d.backing_filename {
            None => None,
            Some(n) => {
                let f = d.backing_format.as_deref().and_then(|s| s.parse().ok());
                Some(open_ro(&resolve_backing(path, Path::new(n)), f)?)
            }
        };
        let size = top.size();
        let unit = d.cluster_size.unwrap_or(ZERO_GRAIN);
        let mut old_buf = vec![0u8; unit as usize];
        let mut new_buf = vec![0u8; unit as usize];
        let mut off = 0;
        progress(0, size);
        while off < size {
            let want = (size - off).min(unit - off % unit);
            let (st, n) = top.block_status(off, want)?;
            if st == Allocation::Unallocated {
                let n_us = n as usize;
                read_or_zero(old_img.as_deref_mut(), &mut old_buf[..n_us], off)?;
                read_or_zero(new_img.as_deref_mut(), &mut new_buf[..n_us], off)?;
                if old_buf[..n_us] != new_buf[..n_us] {
                    top.write_at(&old_buf[..n_us], off)?;
                    copied += n;
                }
            }
            off += n;
            progress(off, size);
        }
        top.flush()?;
    }
    drop(new_img);
    qcow2::set_backing(path, new_header)?;
    Ok(copied)
}

/// Read what a backing image shows at `off` (zeros past its end or
/// without one).
fn read_or_zero(
    img: Option<&mut (dyn DiskImage + '_)>,
    buf: &mut [u8],
    off: u64,
) -> Result<(), BlockError> {
    buf.fill(0);
    if let Some(img) = img {
        let size = img.size();
        if off < size {
            let n = (size - off).min(buf.len() as u64) as usize;
            img.read_at(&mut buf[..n], off)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64K").unwrap(), 64 << 10);
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("abc").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
