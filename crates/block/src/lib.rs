//! Disk images for Vireo: the layer below virtio-blk.
//!
//! Synchronous positional I/O on image files, with no knowledge of guests or
//! devices. Formats: raw files (or block devices) and qcow2 (version 2
//! read-only, version 3 read/write, backing-file chains), read/write; VMware
//! VMDK (monolithic sparse and stream-optimized, [`vmdk`]) and Hyper-V VHDX
//! ([`vhdx`]) read-only, for import. [`img`] holds the operations behind
//! `vireo img` (create, info, check, convert, resize, commit, rebase).
//!
//! Every value read from an image file is treated as hostile: a corrupt or
//! crafted image yields a [`BlockError`], never a panic or an allocation
//! larger than the file's own metadata limits.
//!
//! Images are locked with `flock` (exclusive for writers, shared for readers
//! and backing files) so two Vireo processes cannot corrupt one image, and
//! with QEMU's open-file-description byte locks, so Vireo and QEMU (or
//! qemu-img, qemu-io) refuse each other's open images too.
//!
//! Tests: `tests/qemu_interop.rs` checks against qemu-img/qemu-io (package
//! qemu-utils; those tests print SKIPPED and pass without it),
//! `tests/corrupt.rs` feeds corrupt and randomly mutated images,
//! `tests/formats.rs` reads VMDK and VHDX images (and `vireo/tests/img.rs`
//! runs `vireo img` against qemu-img). Fuzzing: `scripts/fuzz.sh`, or
//! `cd crates/block/fuzz && cargo +nightly fuzz run qcow2_open` (also
//! `vmdk_open`, `vhdx_open`). Baseline
//! throughput: `cargo run --release -p block --example image_bench`.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::str::FromStr;

pub mod crc32c;
pub mod img;
pub mod qcow2;
pub mod raw;
pub mod source;
pub mod vhdx;
pub mod vmdk;

pub use qcow2::create_qcow2_overlay;
pub use source::{open_in_memory, MemFile};

/// How deep a backing chain may be before we assume a loop.
pub const MAX_BACKING_DEPTH: usize = 32;

/// Image file formats Vireo understands (named `raw`, `qcow2`, `vmdk` and
/// `vhdx` in options, configuration files and the API). VMDK and VHDX are
/// read-only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Raw,
    Qcow2,
    Vmdk,
    Vhdx,
}

impl ImageFormat {
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Vmdk => "vmdk",
            ImageFormat::Vhdx => "vhdx",
        }
    }

    /// Whether Vireo can write images of this format (VMDK and VHDX are
    /// read for import only).
    pub fn writable(self) -> bool {
        matches!(self, ImageFormat::Raw | ImageFormat::Qcow2)
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ImageFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "raw" => Ok(ImageFormat::Raw),
            "qcow2" => Ok(ImageFormat::Qcow2),
            "vmdk" => Ok(ImageFormat::Vmdk),
            "vhdx" => Ok(ImageFormat::Vhdx),
            other => Err(format!(
                "unknown disk image format '{other}' (expected raw, qcow2, vmdk or vhdx)"
            )),
        }
    }
}

/// Everything that can go wrong with a disk image. Messages are one line and
/// name the file concerned.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("{}: {op}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
    #[error("{} is a {actual} image but format={given} was given", path.display())]
    FormatMismatch {
        path: PathBuf,
        actual: ImageFormat,
        given: ImageFormat,
    },
    #[error("{format}: {what} (image {})", path.display())]
    Unsupported {
        path: PathBuf,
        format: ImageFormat,
        what: String,
    },
    #[error("{format}: corrupt {what} (image {})", path.display())]
    Corrupt {
        path: PathBuf,
        format: ImageFormat,
        what: String,
    },
    #[error("qcow2: image has internal snapshots; Vireo refuses to write to it (image {})", path.display())]
    HasSnapshots { path: PathBuf },
    #[error("backing file {name} not found (relative to {})", dir.display())]
    BackingNotFound { name: String, dir: PathBuf },
    #[error("backing chain of {} is deeper than {MAX_BACKING_DEPTH} images (a loop?)", path.display())]
    BackingChainTooDeep { path: PathBuf },
    #[error("request beyond the end of the disk: offset {offset} length {len}, disk size {size} (image {})", path.display())]
    OutOfRange {
        path: PathBuf,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("{} is opened read-only", path.display())]
    ReadOnly { path: PathBuf },
    #[error("{} is in use by another process (lock held)", path.display())]
    Locked { path: PathBuf },
    #[error("{}: {what}", path.display())]
    Invalid { path: PathBuf, what: String },
    #[error("{} is a {format} image, which Vireo only reads: attach it with readonly=on, or convert it (vireo img convert -O qcow2)", path.display())]
    ReadOnlyFormat { path: PathBuf, format: ImageFormat },
}

impl BlockError {
    pub(crate) fn io(path: &Path, op: &'static str, source: io::Error) -> Self {
        BlockError::Io {
            path: path.to_path_buf(),
            op,
            source,
        }
    }
}

/// One piece of a vectored transfer: `len` bytes at `ptr`, typically guest
/// RAM that a device hands straight to the image (no bounce buffer).
///
/// Invariant (promised by [`IoBuf::new`]'s caller): the whole range stays
/// mapped, readable and writable for as long as the `IoBuf` is used. Other
/// threads (the guest's vCPUs) may read or write it meanwhile, so it is
/// never turned into a Rust reference: only the kernel (`preadv`/`pwritev`)
/// or a raw byte copy touches it, and a guest racing with its own I/O sees
/// torn data, as on real hardware, but never makes the VMM misbehave.
#[derive(Debug, Clone, Copy)]
pub struct IoBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: an IoBuf is an address range, not a borrow; the constructor's
// caller promised the range outlives its use on whichever thread.
unsafe impl Send for IoBuf {}
// SAFETY: as for Send: sharing the address range hands out no reference.
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// # Safety
    /// `ptr..ptr+len` must be valid for reads and writes (mapped memory,
    /// not owned by a Rust reference) for as long as this value is used.
    pub unsafe fn new(ptr: *mut u8, len: usize) -> Self {
        IoBuf { ptr, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Copy `src` (at most `len` bytes) to the start of the buffer.
    pub fn copy_from(&self, src: &[u8]) {
        let n = src.len().min(self.len);
        // SAFETY: the type's invariant makes `ptr..ptr+len` writable; `src`
        // is a Rust slice, so the two cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr, n) }
    }

    /// Copy the start of the buffer into `dst` (at most `len` bytes).
    pub fn copy_to(&self, dst: &mut [u8]) {
        let n = dst.len().min(self.len);
        // SAFETY: as in `copy_from`, readable instead of writable.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr, dst.as_mut_ptr(), n) }
    }
}

/// The byte range `[start, start + len)` of the stream `bufs` form, as
/// buffers (appended to `out`, which is cleared first).
pub(crate) fn iobufs_range(bufs: &[IoBuf], start: usize, len: usize, out: &mut Vec<IoBuf>) {
    out.clear();
    let end = start + len;
    let mut pos = 0usize;
    for b in bufs {
        let (s, e) = (pos, pos + b.len);
        pos = e;
        if e <= start || b.len == 0 {
            continue;
        }
        if s >= end {
            break;
        }
        let from = start.max(s) - s;
        let to = end.min(e) - s;
        // SAFETY: a sub-range of `b`, so within memory its invariant covers.
        out.push(unsafe { IoBuf::new(b.ptr.add(from), to - from) });
    }
}

/// Total length of `bufs`, or None if it overflows.
pub fn iobufs_len(bufs: &[IoBuf]) -> Option<u64> {
    bufs.iter()
        .try_fold(0u64, |acc, b| acc.checked_add(b.len as u64))
}

/// A disk image: a fixed-size array of bytes with positional access.
///
/// All methods are synchronous. `read_at`/`write_at` (and their vectored
/// forms) either transfer the whole buffer or fail; ranges beyond
/// [`DiskImage::size`] are refused before anything is transferred.
pub trait DiskImage: Send {
    /// Virtual size in bytes, as the guest sees it.
    fn size(&self) -> u64;
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), BlockError>;
    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), BlockError>;
    /// Read `[offset, offset + total length)` into `bufs`, front to back.
    /// The default goes through a bounce buffer and [`DiskImage::read_at`];
    /// raw images override it with `preadv` straight into the buffers. On
    /// failure the buffers' contents are unspecified.
    fn read_vectored(&mut self, bufs: &[IoBuf], offset: u64) -> Result<(), BlockError> {
        let total = self.vectored_len(bufs, offset)?;
        let mut tmp = vec![0u8; total as usize];
        self.read_at(&mut tmp, offset)?;
        let mut done = 0;
        for b in bufs {
            b.copy_from(&tmp[done..done + b.len()]);
            done += b.len();
        }
        Ok(())
    }
    /// Write `bufs`, front to back, at `offset` (see [`DiskImage::read_vectored`]).
    fn write_vectored(&mut self, bufs: &[IoBuf], offset: u64) -> Result<(), BlockError> {
        let total = self.vectored_len(bufs, offset)?;
        let mut tmp = vec![0u8; total as usize];
        let mut done = 0;
        for b in bufs {
            b.copy_to(&mut tmp[done..done + b.len()]);
            done += b.len();
        }
        self.write_at(&tmp, offset)
    }
    /// The total length of `bufs`, checked to lie on the disk at `offset`.
    fn vectored_len(&self, bufs: &[IoBuf], offset: u64) -> Result<u64, BlockError> {
        let size = self.size();
        let len = iobufs_len(bufs).unwrap_or(u64::MAX);
        check_range(self.path(), size, offset, len)?;
        Ok(len)
    }
    /// Make every completed write durable (metadata included).
    fn flush(&mut self) -> Result<(), BlockError>;
    /// Advisory: the range's contents are no longer needed. Space may be
    /// released; afterwards the range reads as zeros or (qcow2 v2 over a
    /// backing file) as the backing file's data. Parts that cannot be
    /// released (e.g. partial qcow2 clusters) are left untouched.
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), BlockError>;
    /// The range reads as zeros afterwards, preferably without writing data.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), BlockError>;
    /// The unit in which [`DiskImage::discard`] can release space (qcow2:
    /// the cluster size); smaller or unaligned parts are ignored.
    fn discard_granularity(&self) -> u64 {
        512
    }
    fn read_only(&self) -> bool;
    /// Give up (`false`) or take back (`true`) this image's file lock, so
    /// another process on this host can open it for a while (a live
    /// migration's destination). Taking it back fails if someone holds it.
    fn set_lock(&mut self, _held: bool) -> Result<(), BlockError> {
        Ok(())
    }
    fn format(&self) -> ImageFormat;
    fn path(&self) -> &Path;
    /// The image this one's unallocated parts read from (a qcow2 backing file).
    fn backing(&self) -> Option<&dyn DiskImage> {
        None
    }
    /// What this image (this layer alone, not its backing file) holds at
    /// `offset`: the status and how many bytes from `offset` (at least 1,
    /// at most `len`) share it. `len` must be at least 1 and the range on
    /// the disk. The default says "data" for the whole range, which is
    /// always correct, only slower to copy.
    fn block_status(&mut self, offset: u64, len: u64) -> Result<(Allocation, u64), BlockError> {
        check_range(self.path(), self.size(), offset, len)?;
        Ok((Allocation::Data, len))
    }
    /// Change the virtual size. Growing adds zeros at the end; what
    /// shrinking does and which formats can is the format's to say.
    fn resize(&mut self, _new_size: u64) -> Result<(), BlockError> {
        Err(BlockError::Invalid {
            path: self.path().to_path_buf(),
            what: format!("{} images cannot be resized", self.format()),
        })
    }
    /// Format-specific facts for `vireo img info`.
    fn details(&self) -> ImageDetails {
        ImageDetails::default()
    }
}

/// What a range of one image layer holds (see [`DiskImage::block_status`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocation {
    /// Data stored in this layer.
    Data,
    /// Stored in this layer as zeros (qcow2 zero clusters, VHDX zero blocks).
    Zero,
    /// Not stored here: reads from the backing file, or as zeros without one.
    Unallocated,
}

/// Format-specific facts `vireo img info` shows.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ImageDetails {
    /// Allocation unit: qcow2 cluster, VMDK grain, VHDX block.
    #[serde(rename = "cluster-size", skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    /// The format's own name for its variant (VMDK createType, qcow2 compat).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subformat: Option<String>,
    /// Backing file name as stored in the image.
    #[serde(rename = "backing-filename", skip_serializing_if = "Option::is_none")]
    pub backing_filename: Option<String>,
    #[serde(
        rename = "backing-filename-format",
        skip_serializing_if = "Option::is_none"
    )]
    pub backing_format: Option<String>,
}

/// Check that `[offset, offset+len)` lies within a disk of `size` bytes.
pub(crate) fn check_range(path: &Path, size: u64, offset: u64, len: u64) -> Result<(), BlockError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::OutOfRange {
            path: path.to_path_buf(),
            offset,
            len,
            size,
        }),
    }
}

/// Options for [`open_with`].
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// `None`: probe. An explicit format that contradicts the file is refused.
    pub format: Option<ImageFormat>,
    pub read_only: bool,
    /// Open qcow2 backing files. When false an image with a backing file is
    /// refused (used by the fuzzer so hostile images cannot name host files).
    pub follow_backing: bool,
    /// Open this image alone, without its backing file: unallocated parts
    /// read as zeros (`vireo img commit` and `rebase` look at one layer).
    /// Takes precedence over `follow_backing`.
    pub detach_backing: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            format: None,
            read_only: false,
            follow_backing: true,
            detach_backing: false,
        }
    }
}

fn format_of_file(file: &File, path: &Path) -> Result<ImageFormat, BlockError> {
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < magic.len() {
        match file.read_at(&mut magic[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(BlockError::io(path, "reading the header", e)),
        }
    }
    if got == 4 && magic == qcow2::MAGIC.to_be_bytes() {
        return Ok(ImageFormat::Qcow2);
    }
    if got == 4 && magic == vmdk::MAGIC {
        return Ok(ImageFormat::Vmdk);
    }
    // The longer signatures: VHDX's file identifier, and the text
    // descriptor that starts every VMDK that is not a sparse extent.
    let mut sig = [0u8; 21];
    let mut got = 0;
    while got < sig.len() {
        match file.read_at(&mut sig[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(BlockError::io(path, "reading the header", e)),
        }
    }
    if sig.starts_with(vhdx::FILE_SIGNATURE) {
        return Ok(ImageFormat::Vhdx);
    }
    if got == sig.len() && &sig[..] == vmdk::DESCRIPTOR_SIGNATURE {
        return Ok(ImageFormat::Vmdk);
    }
    Ok(ImageFormat::Raw)
}

/// Guess an image's format from its contents: qcow2 magic "QFI\xfb", VMDK
/// "KDMV" (or a VMDK text descriptor), VHDX "vhdxfile", else raw.
pub fn probe_format(path: &Path) -> Result<ImageFormat, BlockError> {
    let file = File::open(path).map_err(|e| BlockError::io(path, "opening", e))?;
    format_of_file(&file, path)
}

/// Open a disk image. `format == None` probes the contents; an explicit
/// format that contradicts the file is refused (a qcow2 file opened as raw
/// would expose its metadata to the guest).
pub fn open(
    path: &Path,
    format: Option<ImageFormat>,
    read_only: bool,
) -> Result<Box<dyn DiskImage>, BlockError> {
    open_with(
        path,
        &OpenOptions {
            format,
            read_only,
            ..OpenOptions::default()
        },
    )
}

/// [`open`] with every option.
pub fn open_with(path: &Path, opts: &OpenOptions) -> Result<Box<dyn DiskImage>, BlockError> {
    open_depth(path, opts, 0)
}

pub(crate) fn open_depth(
    path: &Path,
    opts: &OpenOptions,
    depth: usize,
) -> Result<Box<dyn DiskImage>, BlockError> {
    if depth > MAX_BACKING_DEPTH {
        return Err(BlockError::BackingChainTooDeep {
            path: path.to_path_buf(),
        });
    }
    // Probe before opening for writing, so a read-only format is refused
    // with its own error rather than a failed lock or open.
    if !opts.read_only {
        let actual = probe_format(path)?;
        if !actual.writable() {
            return Err(BlockError::ReadOnlyFormat {
                path: path.to_path_buf(),
                format: actual,
            });
        }
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(!opts.read_only)
        .open(path)
        .map_err(|e| BlockError::io(path, "opening", e))?;
    let ft = file
        .metadata()
        .map_err(|e| BlockError::io(path, "stat", e))?
        .file_type();
    {
        use std::os::unix::fs::FileTypeExt;
        if !ft.is_file() && !ft.is_block_device() {
            return Err(BlockError::Invalid {
                path: path.to_path_buf(),
                what: "not a regular file or block device".into(),
            });
        }
    }
    lock_file(&file, path, opts.read_only)?;
    let actual = format_of_file(&file, path)?;
    if let Some(given) = opts.format {
        if given != actual {
            return Err(BlockError::FormatMismatch {
                path: path.to_path_buf(),
                actual,
                given,
            });
        }
    }
    match actual {
        ImageFormat::Raw => Ok(Box::new(raw::RawImage::from_file(
            file,
            path,
            opts.read_only,
        )?)),
        ImageFormat::Qcow2 => Ok(Box::new(qcow2::Qcow2Image::from_file(
            file, path, opts, depth,
        )?)),
        ImageFormat::Vmdk | ImageFormat::Vhdx if !opts.read_only => {
            unlock_file(&file);
            Err(BlockError::ReadOnlyFormat {
                path: path.to_path_buf(),
                format: actual,
            })
        }
        ImageFormat::Vmdk => Ok(Box::new(source::ReadOnly(vmdk::VmdkImage::from_source(
            Box::new(file),
            path,
        )?))),
        ImageFormat::Vhdx => Ok(Box::new(source::ReadOnly(vhdx::VhdxImage::from_source(
            Box::new(file),
            path,
        )?))),
    }
}

/// Lock an image against other users, Vireo's and QEMU's alike: an
/// advisory whole-file `flock` (what earlier Vireos take: exclusive for
/// writers, shared for readers and backing files), and QEMU's
/// open-file-description byte locks ([`qemu_lock`]), so each refuses
/// images the other has open.
pub(crate) fn lock_file(file: &File, path: &Path, read_only: bool) -> Result<(), BlockError> {
    let op = if read_only {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    } | libc::LOCK_NB;
    // SAFETY: flock on a valid, owned descriptor; no memory is passed.
    let r = unsafe { libc::flock(file.as_raw_fd(), op) };
    if r != 0 {
        let err = io::Error::last_os_error();
        return if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Err(BlockError::Locked {
                path: path.to_path_buf(),
            })
        } else {
            Err(BlockError::io(path, "locking", err))
        };
    }
    if let Err(e) = qemu_lock::take(file, path, read_only) {
        unlock_file(file);
        return Err(e);
    }
    Ok(())
}

/// Release the locks taken by [`lock_file`]. Done explicitly before close
/// because a child forked by another thread may briefly share the open file
/// description (until its exec), which would keep the locks alive.
pub(crate) fn unlock_file(file: &File) {
    qemu_lock::release(file);
    // SAFETY: flock on a valid, owned descriptor; no memory is passed.
    unsafe {
        libc::flock(file.as_raw_fd(), libc::LOCK_UN);
    }
}

/// QEMU's image locking (its file-posix driver), which Vireo takes part
/// in. QEMU describes what an opener does with an image as permissions,
/// numbered 0 consistent-read, 1 write, 2 write-unchanged, 3 resize, and
/// takes a shared open-file-description (`F_OFD_SETLK`) read lock on byte
/// 100 + n for each permission n it holds and on byte 200 + n for each it
/// does not let others have. An opener conflicts with another when it
/// wants a permission whose byte 200 + n someone holds, or refuses one
/// whose byte 100 + n someone holds; it finds out by asking (`F_OFD_GETLK`)
/// whether a write lock on that byte would be granted. Locking first and
/// checking after, as QEMU does, means two openers racing each other see
/// at least one conflict.
///
/// Vireo holds consistent-read, and write when the image is writable; it
/// shares neither write nor resize (a reader of a backing file must not
/// see it change), as QEMU's own writers and readers do by default.
mod qemu_lock {
    use super::*;

    const PERM_BASE: i64 = 100;
    const SHARED_BASE: i64 = 200;
    const CONSISTENT_READ: i64 = 0;
    const WRITE: i64 = 1;
    const RESIZE: i64 = 3;
    /// Every byte either side may lock (QEMU knows up to 5 permissions).
    const SPAN: i64 = SHARED_BASE + 8 - PERM_BASE;

    fn flock_of(kind: libc::c_int, start: i64, len: i64) -> libc::flock {
        // SAFETY: an all-zero flock is valid; l_pid must be 0 for OFD locks.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = kind as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = start;
        fl.l_len = len;
        fl
    }

    fn fcntl(file: &File, cmd: libc::c_int, fl: &mut libc::flock) -> io::Result<()> {
        // SAFETY: fl is a valid flock the kernel reads (and for GETLK
        // writes) during the call; the descriptor is open.
        let r = unsafe { libc::fcntl(file.as_raw_fd(), cmd, fl as *mut libc::flock) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Whether another open file description holds a lock on `byte`.
    fn held_elsewhere(file: &File, byte: i64) -> io::Result<bool> {
        let mut fl = flock_of(libc::F_WRLCK, byte, 1);
        fcntl(file, libc::F_OFD_GETLK, &mut fl)?;
        Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
    }

    pub(super) fn take(file: &File, path: &Path, read_only: bool) -> Result<(), BlockError> {
        let held: &[i64] = if read_only {
            &[CONSISTENT_READ]
        } else {
            &[CONSISTENT_READ, WRITE]
        };
        let not_shared: &[i64] = &[WRITE, RESIZE];
        let bytes = held
            .iter()
            .map(|n| PERM_BASE + n)
            .chain(not_shared.iter().map(|n| SHARED_BASE + n));
        for byte in bytes {
            let mut fl = flock_of(libc::F_RDLCK, byte, 1);
            if let Err(e) = fcntl(file, libc::F_OFD_SETLK, &mut fl) {
                release(file);
                return Err(match e.raw_os_error() {
                    // A write lock on the byte: nobody takes those on
                    // QEMU's bytes, but it is a refusal all the same.
                    Some(libc::EAGAIN) | Some(libc::EACCES) => BlockError::Locked {
                        path: path.to_path_buf(),
                    },
                    _ => BlockError::io(path, "locking", e),
                });
            }
        }
        let conflicts = held
            .iter()
            .map(|n| SHARED_BASE + n)
            .chain(not_shared.iter().map(|n| PERM_BASE + n));
        for byte in conflicts {
            match held_elsewhere(file, byte) {
                Ok(false) => {}
                Ok(true) => {
                    release(file);
                    return Err(BlockError::Locked {
                        path: path.to_path_buf(),
                    });
                }
                Err(e) => {
                    release(file);
                    return Err(BlockError::io(path, "checking locks", e));
                }
            }
        }
        Ok(())
    }

    pub(super) fn release(file: &File) {
        let mut fl = flock_of(libc::F_UNLCK, PERM_BASE, SPAN);
        let _ = fcntl(file, libc::F_OFD_SETLK, &mut fl);
    }
}

/// Read exactly `buf.len()` bytes at `offset`; bytes past the end of the
/// file read as zeros ([`source::read_zero_fill`] on a file).
pub(crate) fn pread_zero_fill(
    file: &File,
    path: &Path,
    buf: &mut [u8],
    offset: u64,
) -> Result<(), BlockError> {
    source::read_zero_fill(file, path, buf, offset)
}

/// Largest number of buffers one `preadv`/`pwritev` takes (IOV_MAX).
const IOV_MAX: usize = 1024;

/// Read or write (`write`) all of `bufs` at `offset` with `preadv` /
/// `pwritev`, resuming after short transfers. A read that meets the end of
/// the file fills the rest with zeros (as [`pread_zero_fill`]).
pub(crate) fn transfer_vectored(
    file: &File,
    path: &Path,
    bufs: &[IoBuf],
    offset: u64,
    write: bool,
) -> Result<(), BlockError> {
    let mut iov: Vec<libc::iovec> = bufs
        .iter()
        .filter(|b| !b.is_empty())
        .map(|b| libc::iovec {
            iov_base: b.as_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    let mut first = 0;
    let mut pos = offset;
    while first < iov.len() {
        let n = (iov.len() - first).min(IOV_MAX);
        let Ok(off) = libc::off_t::try_from(pos) else {
            return Err(BlockError::io(
                path,
                if write { "writing" } else { "reading" },
                io::Error::from_raw_os_error(libc::EOVERFLOW),
            ));
        };
        // SAFETY: `iov[first..first + n]` describes buffers that IoBuf's
        // invariant keeps valid for reads and writes during this call.
        let r = unsafe {
            if write {
                libc::pwritev(file.as_raw_fd(), iov[first..].as_ptr(), n as i32, off)
            } else {
                libc::preadv(file.as_raw_fd(), iov[first..].as_ptr(), n as i32, off)
            }
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(BlockError::io(
                path,
                if write { "writing" } else { "reading" },
                e,
            ));
        }
        let mut done = r as usize;
        if done == 0 {
            if write {
                return Err(BlockError::io(
                    path,
                    "writing",
                    io::Error::from(io::ErrorKind::WriteZero),
                ));
            }
            // End of file: the rest reads as zeros.
            for v in &iov[first..] {
                // SAFETY: as above; the buffer is writable for its length.
                unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
            }
            return Ok(());
        }
        pos += done as u64;
        // Skip the buffers done; shorten a partly done one.
        while done > 0 && first < iov.len() {
            let v = &mut iov[first];
            if done >= v.iov_len {
                done -= v.iov_len;
                first += 1;
            } else {
                // SAFETY: advancing within the same buffer.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(done).cast() };
                v.iov_len -= done;
                done = 0;
            }
        }
    }
    Ok(())
}

pub(crate) fn pwrite_all(
    file: &File,
    path: &Path,
    buf: &[u8],
    offset: u64,
) -> Result<(), BlockError> {
    file.write_all_at(buf, offset)
        .map_err(|e| BlockError::io(path, "writing", e))
}

/// Deallocate a byte range of a regular file (reads back as zeros).
/// Returns false when the filesystem cannot do it.
pub(crate) fn punch_hole(file: &File, offset: u64, len: u64) -> bool {
    let (Ok(off), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return false;
    };
    // SAFETY: fallocate on a valid, owned descriptor; no memory is passed.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
    };
    r == 0
}
