//! virtio-blk (type 2): one request queue over a [`block::DiskImage`].
//!
//! A request is a chain: a 16-byte header (type, reserved, sector) and, for
//! writes, the data in device-readable buffers; then, device-writable, the
//! data for reads (or the 20-byte id) and one status byte last. Requests
//! outside the disk, or writes to a read-only disk, complete with IOERR;
//! a chain with no room for the status byte is a driver bug that marks the
//! device broken (DEVICE_NEEDS_RESET).

use std::sync::{Arc, Mutex};

use block::{BlockError, DiskImage, IoBuf};
use hypervisor::GuestRam;
use vm_memory::bitmap::Bitmap;
use vm_memory::Bytes;

use crate::queue::GuestSlice;
use crate::rate_limit::{RateLimitError, SharedLimiter, Throttle, Waker};

use crate::{
    device_type, ActivateError, DescChain, Persist, PersistError, Processed, QueueError,
    QueueWorker, VirtQueue, VirtioDevice, VirtioInterrupt,
};

pub const QUEUE_SIZE: u16 = 256;

/// How this device names itself in errors.
const DEVICE: &str = "virtio-blk";
pub const SECTOR_SIZE: u64 = 512;
/// Length of the id a GET_ID request returns.
pub const ID_LEN: usize = 20;

pub const VIRTIO_BLK_F_SIZE_MAX: u64 = 1 << 1;
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
pub const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
pub const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Largest single data buffer and request the device announces and accepts.
const SIZE_MAX: u32 = 1 << 20;
const MAX_REQUEST_BYTES: u64 = 4 << 20;
/// Discard / write-zeroes: one segment per request, up to 4 GiB - 512.
const MAX_DISCARD_SECTORS: u32 = u32::MAX >> 9;

type SharedDisk = Arc<Mutex<Box<dyn DiskImage>>>;

/// What a snapshot keeps of a disk: which file, and enough about it to
/// refuse a restore once the file has changed. A snapshot holds the
/// guest's memory, whose page cache and filesystem state match the disk
/// as it was; resuming over a modified disk would corrupt it. So the disk
/// must be the same file, unchanged (same size and modification time)
/// since the snapshot; the restored guest then writes it, and the snapshot
/// cannot be restored again over that disk (copy the disk beside the
/// snapshot to restore it more than once).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockState {
    /// The image file, absolute.
    pub path: std::path::PathBuf,
    pub format: String,
    pub capacity_sectors: u64,
    pub read_only: bool,
    /// The id the guest reads (GET_ID), up to 20 bytes.
    pub serial: Vec<u8>,
    /// The file's size and modification time (ns since the epoch) after
    /// the device's writes were flushed.
    pub file_size: u64,
    pub file_mtime_ns: u64,
    /// The rate limit in force when the snapshot was taken (perhaps set
    /// through the API since the start); absent in older snapshots and
    /// for devices without a limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<crate::rate_limit::RateLimiterConfig>,
}

/// Size and modification time of `path`.
fn file_identity(path: &std::path::Path) -> Result<(u64, u64), PersistError> {
    let m = std::fs::metadata(path)
        .map_err(|e| PersistError::host(DEVICE, format!("cannot stat {}: {e}", path.display())))?;
    let mtime = m
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as u64);
    Ok((m.len(), mtime))
}

/// The block device: a disk image and the id the guest reads as its serial.
pub struct Block {
    disk: SharedDisk,
    capacity_sectors: u64,
    read_only: bool,
    id: [u8; ID_LEN],
    counters: Arc<crate::stats::BlockCounters>,
    /// The limiter this disk draws from (its own or its group's), and the
    /// timer that wakes its queue when throttled.
    limit: Option<(Arc<SharedLimiter>, Arc<Waker>)>,
}

impl Block {
    /// `serial` is cut to 20 bytes (the driver's /sys/block/vdX/serial).
    pub fn new(disk: Box<dyn DiskImage>, serial: &str) -> Self {
        let capacity_sectors = disk.size() / SECTOR_SIZE;
        let read_only = disk.read_only();
        let mut id = [0u8; ID_LEN];
        let s = serial.as_bytes();
        let n = s.len().min(ID_LEN);
        id[..n].copy_from_slice(&s[..n]);
        Block {
            disk: Arc::new(Mutex::new(disk)),
            capacity_sectors,
            read_only,
            id,
            counters: Arc::default(),
            limit: None,
        }
    }

    /// Draw from `limiter` (the disk's own or its group's): requests wait
    /// for its tokens from now on, and its configuration may change live.
    pub fn set_rate_limiter(&mut self, limiter: Arc<SharedLimiter>) -> Result<(), RateLimitError> {
        let waker = match self.limit.take() {
            Some((_, w)) => w,
            None => Arc::new(Waker::new()?),
        };
        self.limit = Some((limiter, waker));
        Ok(())
    }

    /// What this device counts (it outlives resets and snapshots).
    pub fn counters(&self) -> Arc<crate::stats::BlockCounters> {
        self.counters.clone()
    }

    fn config_bytes(&self) -> [u8; 60] {
        let mut c = [0u8; 60];
        c[0..8].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        c[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes()); // size_max
        c[12..16].copy_from_slice(&(QUEUE_SIZE as u32 - 2).to_le_bytes()); // seg_max
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
        c[34..36].copy_from_slice(&1u16.to_le_bytes()); // num_queues
        c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes()); // max_discard_sectors
        c[40..44].copy_from_slice(&1u32.to_le_bytes()); // max_discard_seg
        c[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
        c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
        c[52..56].copy_from_slice(&1u32.to_le_bytes()); // max_write_zeroes_seg
        c[56] = 1; // write_zeroes_may_unmap
        c
    }
}

impl Persist for Block {
    type State = BlockState;

    /// Flushes the image first, so the file is what the snapshot expects.
    fn save(&self) -> Result<BlockState, PersistError> {
        let mut disk = self.disk.lock().unwrap_or_else(|e| e.into_inner());
        disk.flush().map_err(|e| {
            PersistError::host(
                DEVICE,
                format!("cannot flush {}: {e}", disk.path().display()),
            )
        })?;
        let path = std::fs::canonicalize(disk.path()).map_err(|e| {
            PersistError::host(DEVICE, format!("disk {}: {e}", disk.path().display()))
        })?;
        let (file_size, file_mtime_ns) = file_identity(&path)?;
        Ok(BlockState {
            path,
            format: disk.format().name().into(),
            capacity_sectors: self.capacity_sectors,
            read_only: self.read_only,
            serial: self.id.to_vec(),
            file_size,
            file_mtime_ns,
            rate_limiter: self.limit.as_ref().map(|(l, _)| l.config()),
        })
    }

    /// Changes nothing: the device was opened over the same disk; this
    /// checks that it is the snapshot's disk and that it is unchanged.
    fn restore(&mut self, s: &BlockState) -> Result<(), PersistError> {
        let disk = self.disk.lock().unwrap_or_else(|e| e.into_inner());
        let opened = std::fs::canonicalize(disk.path()).map_err(|e| {
            PersistError::host(DEVICE, format!("disk {}: {e}", disk.path().display()))
        })?;
        // The snapshot's own disk, or a clone's overlay straight over it
        // (then the base is what must be unchanged).
        let base_of_overlay = disk
            .backing()
            .filter(|_| opened != s.path)
            .filter(|b| std::fs::canonicalize(b.path()).is_ok_and(|p| p == s.path));
        let (path, format) = match base_of_overlay {
            Some(b) => (s.path.clone(), b.format().name()),
            None if opened == s.path => (opened, disk.format().name()),
            None => {
                return Err(PersistError::mismatch(
                    DEVICE,
                    format!(
                        "the snapshot's disk is {}, this VM opened {} (neither it nor an overlay over it)",
                        s.path.display(),
                        opened.display()
                    ),
                ))
            }
        };
        if format != s.format
            || self.capacity_sectors != s.capacity_sectors
            || self.read_only != s.read_only
            || self.id.as_slice() != s.serial.as_slice()
        {
            return Err(PersistError::mismatch(
                DEVICE,
                format!(
                    "disk {}: format, size, read-only flag or serial differ from the snapshot's",
                    path.display()
                ),
            ));
        }
        if let Some(cfg) = &s.rate_limiter {
            cfg.validate()
                .map_err(|e| PersistError::mismatch(DEVICE, e.to_string()))?;
        }
        let (size, mtime) = file_identity(&path)?;
        if (size, mtime) != (s.file_size, s.file_mtime_ns) {
            return Err(PersistError::host(DEVICE, format!(
                "disk {} changed since the snapshot (size {} then, {size} now; modified at {} ns then, {mtime} ns now): \
                 a snapshot resumes only over the disk file it was taken with, unchanged",
                path.display(),
                s.file_size,
                s.file_mtime_ns
            )));
        }
        // Everything checked: the limit the snapshot had is the one in force.
        if let (Some(cfg), Some((l, _))) = (&s.rate_limiter, &self.limit) {
            l.update(*cfg)
                .map_err(|e| PersistError::mismatch(DEVICE, e.to_string()))?;
        }
        Ok(())
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = VIRTIO_BLK_F_SIZE_MAX
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_FLUSH;
        if self.read_only {
            f |= VIRTIO_BLK_F_RO;
        } else {
            f |= VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }

    fn pci_class(&self) -> u32 {
        0x01_80_00 // mass storage, other
    }

    fn config_len(&self) -> usize {
        60
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::read_config_image(&self.config_bytes(), offset, data);
    }

    fn activate(
        &mut self,
        _features: u64,
        _mem: GuestRam,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<Box<dyn QueueWorker>, ActivateError> {
        let mut w = self.worker();
        w.irq = Some(interrupt);
        Ok(Box::new(w))
    }

    fn save_state(&self) -> Result<crate::DeviceState, PersistError> {
        crate::save_as(self, crate::DeviceState::Block)
    }

    fn set_host_locks(&mut self, held: bool) -> Result<(), String> {
        let mut disk = self.disk.lock().unwrap_or_else(|e| e.into_inner());
        disk.set_lock(held).map_err(|e| e.to_string())
    }

    fn restore_state(&mut self, state: &crate::DeviceState) -> Result<(), PersistError> {
        crate::restore_from(self, DEVICE, state, |s| match s {
            crate::DeviceState::Block(s) => Some(s),
            _ => None,
        })
    }
}

impl Block {
    /// The queue side; it shares the disk, which outlives device resets.
    fn worker(&self) -> BlockWorker {
        BlockWorker {
            disk: self.disk.clone(),
            capacity_sectors: self.capacity_sectors,
            read_only: self.read_only,
            id: self.id,
            counters: self.counters.clone(),
            iov: Vec::new(),
            irq: None,
            throttle: self
                .limit
                .as_ref()
                .map(|(l, w)| Throttle::new(l.clone(), w.clone(), self.counters.throttle.clone())),
        }
    }
}

/// The queue side of the device. Data moves between the image and guest
/// memory with no copy in between: the request's buffers become an
/// [`IoBuf`] list that the image reads into or writes from (`preadv` /
/// `pwritev` for raw images). The descriptor walk has checked every buffer
/// against guest RAM, and each piece handed to the image lies inside one
/// memory region, so a hostile chain cannot make the VMM touch memory
/// outside the guest; a chain that points outside RAM is refused with a
/// [`QueueError`] as before.
struct BlockWorker {
    disk: SharedDisk,
    capacity_sectors: u64,
    read_only: bool,
    id: [u8; ID_LEN],
    counters: Arc<crate::stats::BlockCounters>,
    /// Kept from request to request (capacity only).
    iov: Vec<IoBuf>,
    /// Where a completion is signalled before the whole batch is done
    /// (see [`EARLY_SIGNAL`]); `None` leaves every signal to the transport.
    irq: Option<Arc<dyn VirtioInterrupt>>,
    /// The disk's rate limit, when it has a limiter.
    throttle: Option<Throttle>,
}

/// How long completed requests may wait for the rest of their batch
/// before the driver is told about them. The transport signals once per
/// batch (whatever `pop` found), which is right for small requests: one
/// interrupt covers many (a 4 KiB read is a few µs of host work). But the
/// driver sleeps while the worker runs the whole batch, and the worker
/// then idles while the driver completes and resubmits, so for large
/// requests (a 1 MiB read is ~100 µs) the guest and the worker took turns
/// instead of working at once. Past this time each completion is offered
/// to the driver as it comes (EVENT_IDX still decides whether it wants an
/// interrupt: a driver already busy in its handler asks for none).
const EARLY_SIGNAL: std::time::Duration = std::time::Duration::from_micros(50);

/// Header (16 bytes) and the one discard / write-zeroes segment (16).
const HEADER_AND_SEGMENT: usize = 32;

impl BlockWorker {
    /// Byte range of `sectors` sectors at `sector`, if it lies on the disk.
    fn range(&self, sector: u64, bytes: u64) -> Option<u64> {
        let end = sector.checked_mul(SECTOR_SIZE)?.checked_add(bytes)?;
        (end <= self.capacity_sectors * SECTOR_SIZE).then_some(sector * SECTOR_SIZE)
    }

    fn io<T>(&self, what: &str, f: impl FnOnce(&mut dyn DiskImage) -> Result<T, BlockError>) -> u8 {
        let mut disk = self.disk.lock().unwrap_or_else(|e| e.into_inner());
        match f(disk.as_mut()) {
            Ok(_) => VIRTIO_BLK_S_OK,
            Err(e) => {
                tracing::warn!("virtio-blk: {what} failed: {e}");
                VIRTIO_BLK_S_IOERR
            }
        }
    }

    /// Run one request. What it hands back goes into its data area here;
    /// the caller zeroes whatever part `Outcome::filled` does not cover.
    fn execute(&mut self, req: &Request<'_, '_>) -> Outcome {
        let Request {
            kind,
            sector,
            segment,
            payload,
            payload_len,
            data,
            data_len,
        } = *req;
        match kind {
            VIRTIO_BLK_T_IN => {
                if data_len > MAX_REQUEST_BYTES {
                    return Outcome::status(VIRTIO_BLK_S_IOERR);
                }
                let Some(offset) = self.range(sector, data_len) else {
                    return Outcome::status(VIRTIO_BLK_S_IOERR);
                };
                let mut iov = std::mem::take(&mut self.iov);
                let status = self.io("read", |d| d.read_vectored(iobufs(&mut iov, data), offset));
                self.iov = iov;
                // Nothing of a failed read reaches the guest: the caller
                // zeroes the data area.
                Outcome {
                    status,
                    filled: if status == VIRTIO_BLK_S_OK {
                        data_len
                    } else {
                        0
                    },
                }
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    return Outcome::status(VIRTIO_BLK_S_IOERR);
                }
                let Some(offset) = self.range(sector, payload_len) else {
                    return Outcome::status(VIRTIO_BLK_S_IOERR);
                };
                let mut iov = std::mem::take(&mut self.iov);
                let status = self.io("write", |d| {
                    d.write_vectored(iobufs(&mut iov, payload), offset)
                });
                self.iov = iov;
                Outcome::status(status)
            }
            VIRTIO_BLK_T_FLUSH => Outcome::status(self.io("flush", |d| d.flush())),
            VIRTIO_BLK_T_GET_ID => {
                let mut at = 0;
                for s in data {
                    if at == ID_LEN {
                        break;
                    }
                    let n = s.len().min(ID_LEN - at);
                    iobuf(s).copy_from(&self.id[at..at + n]);
                    at += n;
                }
                Outcome {
                    status: VIRTIO_BLK_S_OK,
                    filled: at as u64,
                }
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                if self.read_only {
                    return Outcome::status(VIRTIO_BLK_S_IOERR);
                }
                // One 16-byte segment: sector, num_sectors, flags.
                if payload_len != 16 || segment.len() != 16 {
                    return Outcome::status(VIRTIO_BLK_S_UNSUPP);
                }
                let seg_sector = u64::from_le_bytes(segment[0..8].try_into().unwrap_or([0; 8]));
                let sectors = u32::from_le_bytes(segment[8..12].try_into().unwrap_or([0; 4]));
                let flags = u32::from_le_bytes(segment[12..16].try_into().unwrap_or([0; 4]));
                let len = sectors as u64 * SECTOR_SIZE;
                let Some(offset) = self.range(seg_sector, len) else {
                    return Outcome::status(VIRTIO_BLK_S_IOERR);
                };
                if kind == VIRTIO_BLK_T_DISCARD {
                    if flags != 0 {
                        return Outcome::status(VIRTIO_BLK_S_UNSUPP);
                    }
                    Outcome::status(self.io("discard", |d| d.discard(offset, len)))
                } else {
                    Outcome::status(self.io("write zeroes", |d| d.write_zeroes(offset, len)))
                }
            }
            _ => Outcome::status(VIRTIO_BLK_S_UNSUPP),
        }
    }

    /// Serve one chain; returns how many bytes were written back.
    fn handle(&mut self, chain: &DescChain, mem: &GuestRam) -> Result<u32, QueueError> {
        let writable = chain.writable_len();
        if writable == 0 {
            return Err(QueueError::Config(format!(
                "virtio-blk request {} has no status byte",
                chain.head
            )));
        }
        let readable = chain.readable_len();
        let mut head = [0u8; HEADER_AND_SEGMENT];
        let got = chain.read_prefix(mem, &mut head)?;
        if got < 16 {
            return Err(QueueError::Config(format!(
                "virtio-blk request {} has a {readable}-byte header (needs 16)",
                chain.head,
            )));
        }
        let kind = u32::from_le_bytes(head[0..4].try_into().unwrap_or([0; 4]));
        let sector = u64::from_le_bytes(head[8..16].try_into().unwrap_or([0; 8]));
        let data_len = (writable - 1) as u64;
        let payload_len = readable as u64 - 16;
        let mut data = Vec::new();
        chain.guest_slices(mem, true, 0, data_len, &mut data)?;
        let mut payload = Vec::new();
        if kind == VIRTIO_BLK_T_OUT {
            chain.guest_slices(mem, false, 16, payload_len, &mut payload)?;
        }
        let started = metrics::ENABLED.then(std::time::Instant::now);
        let out = self.execute(&Request {
            kind,
            sector,
            segment: &head[16..got],
            payload: &payload,
            payload_len,
            data: &data,
            data_len,
        });
        let took = started.map(|t| t.elapsed()).unwrap_or_default();
        self.counters.record_sized(
            kind,
            payload_len,
            &head[16..got],
            data_len,
            out.status,
            took,
        );
        // The data area: what the request filled, zeros after it (the old
        // contents of guest buffers never pass for disk data).
        let mut at = 0u64;
        for s in &data {
            let len = s.len() as u64;
            if at + len > out.filled {
                let skip = out.filled.saturating_sub(at) as usize;
                let b = iobuf(s);
                // SAFETY: within the slice, which is guest RAM (see `iobuf`).
                unsafe { std::ptr::write_bytes(b.as_ptr().add(skip), 0, b.len() - skip) };
            }
            // Written through a raw pointer: tell dirty logging, after the
            // write, as `write_slice` does.
            s.bitmap().mark_dirty(0, s.len());
            at += len;
        }
        // The status byte is the chain's last writable byte.
        let mut status = Vec::with_capacity(1);
        chain.guest_slices(mem, true, data_len, 1, &mut status)?;
        let Some(st) = status.first() else {
            return Err(QueueError::Config(format!(
                "virtio-blk request {} has no status byte",
                chain.head
            )));
        };
        st.write_obj(out.status, 0)
            .map_err(|e| QueueError::UsedRing(format!("virtio-blk status byte: {e}")))?;
        let used = if kind == VIRTIO_BLK_T_IN || kind == VIRTIO_BLK_T_GET_ID {
            writable
        } else {
            1
        };
        Ok(used)
    }
}

/// The data bytes a request moves, as the bandwidth bucket counts them:
/// a read's data area, a write's payload; other requests only cost an
/// operation. A chain too short to parse costs nothing here: `handle`
/// refuses it.
fn request_bytes(chain: &DescChain, mem: &GuestRam) -> u64 {
    let mut head = [0u8; 16];
    match chain.read_prefix(mem, &mut head) {
        Ok(16) => match u32::from_le_bytes([head[0], head[1], head[2], head[3]]) {
            VIRTIO_BLK_T_IN => u64::from(chain.writable_len().saturating_sub(1)),
            VIRTIO_BLK_T_OUT => u64::from(chain.readable_len().saturating_sub(16)),
            _ => 0,
        },
        _ => 0,
    }
}

/// One request as [`BlockWorker::execute`] sees it.
#[derive(Clone, Copy)]
struct Request<'a, 'm> {
    kind: u32,
    sector: u64,
    /// The readable bytes after the header, up to 16 (a discard segment).
    segment: &'a [u8],
    /// All readable bytes after the header (writes only; else empty).
    payload: &'a [GuestSlice<'m>],
    payload_len: u64,
    /// The device-writable data area: all writable bytes but the status.
    data: &'a [GuestSlice<'m>],
    data_len: u64,
}

/// The status of a request, and how many bytes of the data area it filled.
struct Outcome {
    status: u8,
    filled: u64,
}

impl Outcome {
    fn status(status: u8) -> Self {
        Outcome { status, filled: 0 }
    }
}

/// `s` as an [`IoBuf`] for the disk image.
fn iobuf(s: &GuestSlice<'_>) -> IoBuf {
    // SAFETY: `s` lies inside one region of guest RAM (mapped, readable
    // and writable); the `GuestRam` it borrows from keeps that mapping
    // alive for at least as long as the request is served.
    unsafe { IoBuf::new(s.ptr_guard_mut().as_ptr(), s.len()) }
}

/// Fill `iov` (kept for its capacity) with `slices` as IoBufs.
fn iobufs<'v>(iov: &'v mut Vec<IoBuf>, slices: &[GuestSlice<'_>]) -> &'v [IoBuf] {
    iov.clear();
    iov.extend(slices.iter().map(iobuf));
    iov
}

impl QueueWorker for BlockWorker {
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut VirtQueue,
        mem: &GuestRam,
    ) -> Result<Processed, QueueError> {
        let mut done = Processed::default();
        // When the oldest request not yet signalled was taken off the ring.
        let mut waiting_since: Option<std::time::Instant> = None;
        while let Some(chain) = queue.pop(mem)? {
            if let Some(t) = &mut self.throttle {
                if !t.admit(request_bytes(&chain, mem)) {
                    // Back on the queue, in its place: the timer serves it
                    // again when the tokens are there.
                    queue.undo_pop();
                    done.stalled = true;
                    return Ok(done);
                }
            }
            let popped = self.irq.is_some().then(std::time::Instant::now);
            let used = self.handle(&chain, mem)?;
            queue.add_used(mem, chain.head, used)?;
            done.used = true;
            if let (Some(irq), Some(popped)) = (&self.irq, popped) {
                let since = *waiting_since.get_or_insert(popped);
                if since.elapsed() >= EARLY_SIGNAL {
                    waiting_since = None;
                    if queue.needs_notification(mem)? {
                        irq.signal_queue(index as u16);
                    }
                }
            }
        }
        Ok(done)
    }

    fn timer_fd(&self) -> Option<std::os::fd::RawFd> {
        self.throttle.as_ref().map(Throttle::timer_fd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Descriptor;
    use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

    /// An in-memory disk that records what happened to it.
    struct MemDisk {
        data: Vec<u8>,
        ro: bool,
        flushes: usize,
        /// How long each read takes (a slow host disk).
        delay: std::time::Duration,
    }

    impl DiskImage for MemDisk {
        fn size(&self) -> u64 {
            self.data.len() as u64
        }
        fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), BlockError> {
            std::thread::sleep(self.delay);
            let o = offset as usize;
            buf.copy_from_slice(&self.data[o..o + buf.len()]);
            Ok(())
        }
        fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), BlockError> {
            let o = offset as usize;
            self.data[o..o + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn flush(&mut self) -> Result<(), BlockError> {
            self.flushes += 1;
            Ok(())
        }
        fn discard(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
            self.write_zeroes(offset, len)
        }
        fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
            self.data[offset as usize..(offset + len) as usize].fill(0);
            Ok(())
        }
        fn read_only(&self) -> bool {
            self.ro
        }
        fn format(&self) -> block::ImageFormat {
            block::ImageFormat::Raw
        }
        fn path(&self) -> &std::path::Path {
            std::path::Path::new("memdisk")
        }
    }

    fn device(ro: bool) -> Block {
        let data: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 251) as u8).collect();
        let disk = MemDisk {
            data,
            ro,
            flushes: 0,
            delay: std::time::Duration::ZERO,
        };
        Block::new(Box::new(disk), "vireo-disk-serial-number-too-long")
    }

    fn worker(ro: bool) -> (BlockWorker, SharedDisk) {
        let dev = device(ro);
        (dev.worker(), dev.disk.clone())
    }

    fn mem() -> GuestRam {
        GuestRam::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    const HDR: u64 = 0x1000;
    const DATA: u64 = 0x2000;
    const STATUS: u64 = 0x9000;

    /// header (readable), optional write payload (readable), data (writable), status.
    fn chain(m: &GuestRam, kind: u32, sector: u64, out: &[u8], in_len: u32) -> DescChain {
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        m.write_slice(&hdr, GuestAddress(HDR)).unwrap();
        let mut descs = vec![Descriptor {
            addr: GuestAddress(HDR),
            len: 16,
            writable: false,
        }];
        if !out.is_empty() {
            m.write_slice(out, GuestAddress(DATA)).unwrap();
            descs.push(Descriptor {
                addr: GuestAddress(DATA),
                len: out.len() as u32,
                writable: false,
            });
        }
        if in_len > 0 {
            descs.push(Descriptor {
                addr: GuestAddress(DATA),
                len: in_len,
                writable: true,
            });
        }
        m.write_slice(&[0xee], GuestAddress(STATUS)).unwrap();
        descs.push(Descriptor {
            addr: GuestAddress(STATUS),
            len: 1,
            writable: true,
        });
        DescChain { head: 0, descs }
    }

    fn status(m: &GuestRam) -> u8 {
        let mut s = [0u8];
        m.read_slice(&mut s, GuestAddress(STATUS)).unwrap();
        s[0]
    }

    #[test]
    fn read_write_flush_and_id() {
        let (mut w, disk) = worker(false);
        let m = mem();
        // Read sectors 2-3.
        let used = w
            .handle(&chain(&m, VIRTIO_BLK_T_IN, 2, &[], 1024), &m)
            .unwrap();
        assert_eq!((used, status(&m)), (1025, VIRTIO_BLK_S_OK));
        let mut got = vec![0u8; 1024];
        m.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        let want: Vec<u8> = (1024..2048u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(got, want);
        // Write sector 5.
        let payload = vec![0x5a; 512];
        let used = w
            .handle(&chain(&m, VIRTIO_BLK_T_OUT, 5, &payload, 0), &m)
            .unwrap();
        assert_eq!((used, status(&m)), (1, VIRTIO_BLK_S_OK));
        assert!(disk.lock().unwrap().size() > 0);
        let mut back = vec![0u8; 512];
        disk.lock().unwrap().read_at(&mut back, 5 * 512).unwrap();
        assert_eq!(back, payload);
        // Flush and GET_ID.
        w.handle(&chain(&m, VIRTIO_BLK_T_FLUSH, 0, &[], 0), &m)
            .unwrap();
        assert_eq!(status(&m), VIRTIO_BLK_S_OK);
        w.handle(&chain(&m, VIRTIO_BLK_T_GET_ID, 0, &[], 20), &m)
            .unwrap();
        let mut id = [0u8; 20];
        m.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, b"vireo-disk-serial-nu");
    }

    #[test]
    fn requests_past_the_end_fail_without_touching_the_disk() {
        let (mut w, disk) = worker(false);
        let m = mem();
        let sectors = 64 * 1024 / 512;
        w.handle(&chain(&m, VIRTIO_BLK_T_IN, sectors - 1, &[], 1024), &m)
            .unwrap();
        assert_eq!(status(&m), VIRTIO_BLK_S_IOERR);
        w.handle(&chain(&m, VIRTIO_BLK_T_OUT, sectors, &[1; 512], 0), &m)
            .unwrap();
        assert_eq!(status(&m), VIRTIO_BLK_S_IOERR);
        // A sector number whose byte offset overflows.
        w.handle(&chain(&m, VIRTIO_BLK_T_IN, u64::MAX / 256, &[], 512), &m)
            .unwrap();
        assert_eq!(status(&m), VIRTIO_BLK_S_IOERR);
        let mut last = vec![0u8; 512];
        disk.lock()
            .unwrap()
            .read_at(&mut last, (sectors - 1) * 512)
            .unwrap();
        assert!(last.iter().any(|&b| b != 1), "the disk was written");
    }

    #[test]
    fn read_only_disks_refuse_writes_and_discards() {
        let (mut w, _) = worker(true);
        let m = mem();
        w.handle(&chain(&m, VIRTIO_BLK_T_OUT, 0, &[1; 512], 0), &m)
            .unwrap();
        assert_eq!(status(&m), VIRTIO_BLK_S_IOERR);
        let mut seg = [0u8; 16];
        seg[8..12].copy_from_slice(&1u32.to_le_bytes());
        w.handle(&chain(&m, VIRTIO_BLK_T_DISCARD, 0, &seg, 0), &m)
            .unwrap();
        assert_eq!(status(&m), VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn discard_and_write_zeroes_clear_the_range() {
        let (mut w, disk) = worker(false);
        let m = mem();
        let mut seg = [0u8; 16];
        seg[0..8].copy_from_slice(&4u64.to_le_bytes());
        seg[8..12].copy_from_slice(&2u32.to_le_bytes());
        w.handle(&chain(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0, &seg, 0), &m)
            .unwrap();
        assert_eq!(status(&m), VIRTIO_BLK_S_OK);
        let mut z = vec![1u8; 1024];
        disk.lock().unwrap().read_at(&mut z, 4 * 512).unwrap();
        assert!(z.iter().all(|&b| b == 0));
        // Unknown request types are refused, not guessed at.
        w.handle(&chain(&m, 99, 0, &[], 0), &m).unwrap();
        assert_eq!(status(&m), VIRTIO_BLK_S_UNSUPP);
    }

    #[test]
    fn malformed_chains_are_driver_errors() {
        let (mut w, _) = worker(false);
        let m = mem();
        let mut c = chain(&m, VIRTIO_BLK_T_IN, 0, &[], 0);
        c.descs.pop(); // no status byte
        assert!(matches!(w.handle(&c, &m), Err(QueueError::Config(_))));
        let c = DescChain {
            head: 3,
            descs: vec![Descriptor {
                addr: GuestAddress(STATUS),
                len: 1,
                writable: true,
            }],
        };
        assert!(matches!(w.handle(&c, &m), Err(QueueError::Config(_))));
    }

    #[test]
    fn zero_copy_reads_span_regions_mark_dirty_and_refuse_foreign_memory() {
        let (mut w, _) = worker(false);
        // Two adjacent regions: the data buffer straddles their boundary.
        let m = GuestRam::from_ranges(&[(GuestAddress(0), 0x3000), (GuestAddress(0x3000), 0x7000)])
            .unwrap();
        let mut c = chain(&m, VIRTIO_BLK_T_IN, 1, &[], 0);
        c.descs.insert(
            1,
            Descriptor {
                addr: GuestAddress(0x2e00),
                len: 1024,
                writable: true,
            },
        );
        // Clear the dirty log left by setting the chain up, and record what
        // a backend watching device writes (the engine) hears.
        #[derive(Default)]
        struct Heard(std::sync::Mutex<Vec<(usize, usize)>>);
        impl hypervisor::DeviceWriteWatch for Heard {
            fn device_wrote(&self, offset: usize, len: usize) {
                self.0.lock().unwrap().push((offset, len));
            }
        }
        let heard: Vec<std::sync::Arc<Heard>> = m
            .iter()
            .map(|r| {
                let h = std::sync::Arc::new(Heard::default());
                let b = std::ops::Deref::deref(r).bitmap();
                b.get_and_reset();
                assert!(b.set_watch(h.clone()));
                h
            })
            .collect();
        let used = w.handle(&c, &m).unwrap();
        assert_eq!((used, status(&m)), (1025, VIRTIO_BLK_S_OK));
        let mut got = vec![0u8; 1024];
        m.read_slice(&mut got, GuestAddress(0x2e00)).unwrap();
        let want: Vec<u8> = (512..1536u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(got, want);
        // Both pages the device wrote behind the guest's back are dirty.
        let dirty = |a: u64| {
            let (r, off) = m.to_region_addr(GuestAddress(a)).unwrap();
            r.bitmap().dirty_at(off.0 as usize)
        };
        assert!(dirty(0x2e00) && dirty(0x3000), "device writes not logged");
        // And the watch of each region heard of its piece of the data.
        assert!(heard[0].0.lock().unwrap().contains(&(0x2e00, 0x200)));
        assert!(heard[1].0.lock().unwrap().contains(&(0, 0x200)));
        // A data buffer outside guest RAM: refused as a queue error, the
        // status byte untouched and nothing written.
        let mut c = chain(&m, VIRTIO_BLK_T_IN, 0, &[], 0);
        c.descs.insert(
            1,
            Descriptor {
                addr: GuestAddress(0x9f00),
                len: 0x200,
                writable: true,
            },
        );
        assert!(matches!(
            w.handle(&c, &m),
            Err(QueueError::BufferOutOfMemory { .. })
        ));
        assert_eq!(status(&m), 0xee);
        // Same for a write whose payload lies outside RAM.
        let mut c = chain(&m, VIRTIO_BLK_T_OUT, 0, &[], 0);
        c.descs.insert(
            1,
            Descriptor {
                addr: GuestAddress(u64::MAX - 0x100),
                len: 0x200,
                writable: false,
            },
        );
        assert!(matches!(
            w.handle(&c, &m),
            Err(QueueError::BufferOutOfMemory { .. })
        ));
    }

    #[test]
    fn failed_reads_leave_zeros_not_old_guest_data() {
        let (mut w, _) = worker(false);
        let m = mem();
        m.write_slice(&[0xab; 1024], GuestAddress(DATA)).unwrap();
        // Past the end of the 64 KiB disk.
        w.handle(&chain(&m, VIRTIO_BLK_T_IN, 127, &[], 1024), &m)
            .unwrap();
        assert_eq!(status(&m), VIRTIO_BLK_S_IOERR);
        let mut got = vec![1u8; 1024];
        m.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert!(got.iter().all(|&b| b == 0));
        // GET_ID into a 32-byte area: the id, then zeros.
        m.write_slice(&[0xab; 32], GuestAddress(DATA)).unwrap();
        w.handle(&chain(&m, VIRTIO_BLK_T_GET_ID, 0, &[], 32), &m)
            .unwrap();
        let mut id = [1u8; 32];
        m.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..20], b"vireo-disk-serial-nu");
        assert_eq!(&id[20..], &[0; 12]);
    }

    #[test]
    fn config_space_reports_capacity_and_limits() {
        let dev = device(false);
        let mut cap = [0u8; 8];
        dev.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 128);
        let mut bs = [0u8; 4];
        dev.read_config(20, &mut bs);
        assert_eq!(u32::from_le_bytes(bs), 512);
        let mut past = [0xffu8; 4];
        dev.read_config(58, &mut past);
        assert_eq!(past, [0, 0, 0, 0], "reads past the config read zeros");
        assert_ne!(dev.features() & VIRTIO_BLK_F_FLUSH, 0);
        assert_eq!(dev.features() & VIRTIO_BLK_F_RO, 0);
        assert_ne!(device(true).features() & VIRTIO_BLK_F_RO, 0);
    }

    #[test]
    fn the_limit_in_force_is_saved_and_restored() {
        use crate::rate_limit::{RateLimiterConfig, SharedLimiter, TokenBucketConfig};
        let dir = std::env::temp_dir().join(format!("vireo-blklimit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("d.img");
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        let open = |limiter: &Arc<SharedLimiter>| {
            let mut b = Block::new(
                block::open(&path, Some(block::ImageFormat::Raw), false).unwrap(),
                "s",
            );
            b.set_rate_limiter(limiter.clone()).unwrap();
            b
        };
        let set = RateLimiterConfig {
            bandwidth: Some(TokenBucketConfig {
                size: 1 << 20,
                one_time_burst: 0,
                refill_time: 100,
            }),
            ops: None,
        };
        // Set after the start (as the API does): the snapshot has it.
        let a_limit = SharedLimiter::new(RateLimiterConfig::default()).unwrap();
        let a = open(&a_limit);
        a_limit.update(set).unwrap();
        let st = a.save_state().unwrap();
        drop(a);
        let b_limit = SharedLimiter::new(RateLimiterConfig::default()).unwrap();
        open(&b_limit).restore_state(&st).unwrap();
        assert_eq!(b_limit.config(), set);
        // A snapshot with an invalid bucket changes nothing.
        let mut bad = st.clone();
        if let crate::DeviceState::Block(b) = &mut bad {
            b.rate_limiter
                .as_mut()
                .unwrap()
                .bandwidth
                .as_mut()
                .unwrap()
                .size = 0;
        }
        let c_limit = SharedLimiter::new(RateLimiterConfig::default()).unwrap();
        let e = open(&c_limit).restore_state(&bad).unwrap_err().to_string();
        assert!(e.contains("bandwidth bucket: size"), "{e}");
        assert!(c_limit.config().is_unlimited());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn saved_state_names_the_file_and_is_refused_once_the_file_changed() {
        let dir = std::env::temp_dir().join(format!("vireo-blkstate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("d.img");
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        let open = |p: &std::path::Path, serial: &str| {
            Block::new(
                block::open(p, Some(block::ImageFormat::Raw), false).unwrap(),
                serial,
            )
        };
        let a = open(&path, "s1");
        let st = a.save_state().unwrap();
        drop(a);
        match &st {
            crate::DeviceState::Block(b) => {
                assert!(b.path.is_absolute());
                assert_eq!(b.file_size, 1 << 20);
            }
            other => panic!("{other:?}"),
        }
        open(&path, "s1").restore_state(&st).unwrap();
        let e = open(&path, "s2")
            .restore_state(&st)
            .unwrap_err()
            .to_string();
        assert!(e.contains("serial"), "{e}");
        let e = open(&path, "s1")
            .restore_state(&crate::DeviceState::Rng)
            .unwrap_err()
            .to_string();
        assert!(e.contains("virtio-rng state"), "{e}");
        let other = dir.join("e.img");
        std::fs::copy(&path, &other).unwrap();
        let e = open(&other, "s1")
            .restore_state(&st)
            .unwrap_err()
            .to_string();
        assert!(e.contains("the snapshot's disk is"), "{e}");
        // A clone: a qcow2 overlay straight over the snapshot's disk is
        // accepted; one over another file is not.
        let overlay = dir.join("clone.qcow2");
        block::create_qcow2_overlay(&overlay, &path).unwrap();
        let clone = |p: &std::path::Path| {
            Block::new(
                block::open(p, Some(block::ImageFormat::Qcow2), false).unwrap(),
                "s1",
            )
        };
        clone(&overlay).restore_state(&st).unwrap();
        let stray = dir.join("stray.qcow2");
        block::create_qcow2_overlay(&stray, &other).unwrap();
        let e = clone(&stray).restore_state(&st).unwrap_err().to_string();
        assert!(e.contains("neither it nor an overlay over it"), "{e}");
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"x"))
            .unwrap();
        let e = open(&path, "s1")
            .restore_state(&st)
            .unwrap_err()
            .to_string();
        assert!(e.contains("changed since the snapshot"), "{e}");
        // ... and a clone over the changed base is refused as well.
        let e = clone(&overlay).restore_state(&st).unwrap_err().to_string();
        assert!(e.contains("changed since the snapshot"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Records, at each interrupt, how many used entries the driver could see.
    struct SeenAtSignal {
        mem: GuestRam,
        used_idx: Mutex<Vec<u16>>,
    }

    impl VirtioInterrupt for SeenAtSignal {
        fn signal_queue(&self, _queue: u16) {
            let idx: u16 = self.mem.read_obj(GuestAddress(Q_USED + 2)).unwrap();
            self.used_idx.lock().unwrap().push(idx);
        }
        fn signal_config(&self) {}
        fn config_changed(&self) {}
    }

    const Q_TABLE: u64 = 0x10000;
    const Q_AVAIL: u64 = 0x11000;
    const Q_USED: u64 = 0x12000;

    /// A batch of slow requests is not signalled only at its end: the
    /// driver hears of the first completion while the worker runs the
    /// second (when its EVENT_IDX asks for it), so guest and worker can
    /// overlap; a driver that asks for no interrupt gets none.
    #[test]
    fn slow_requests_are_signalled_as_they_complete() {
        for (used_event, want) in [(0u16, vec![1u16]), (5, vec![])] {
            let m = mem();
            let mut dev = device(false);
            dev.disk = Arc::new(Mutex::new(Box::new(MemDisk {
                data: vec![7; 64 * 1024],
                ro: false,
                flushes: 0,
                delay: EARLY_SIGNAL * 4,
            })));
            let rec = Arc::new(SeenAtSignal {
                mem: m.clone(),
                used_idx: Mutex::new(Vec::new()),
            });
            let mut w = dev.worker();
            w.irq = Some(rec.clone());
            // Two read requests (heads 0 and 3): header, 512 data bytes, status.
            let mut hdr = [0u8; 16];
            hdr[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
            m.write_slice(&hdr, GuestAddress(HDR)).unwrap();
            for (head, status) in [(0u16, STATUS), (3, STATUS + 1)] {
                let d = |i: u16, addr: u64, len: u32, flags: u16| {
                    let a = GuestAddress(Q_TABLE + 16 * i as u64);
                    m.write_obj(addr, a).unwrap();
                    m.write_obj(len, a.unchecked_add(8)).unwrap();
                    m.write_obj(flags, a.unchecked_add(12)).unwrap();
                    m.write_obj(i + 1, a.unchecked_add(14)).unwrap();
                };
                d(head, HDR, 16, crate::queue::VIRTQ_DESC_F_NEXT);
                d(
                    head + 1,
                    DATA,
                    512,
                    crate::queue::VIRTQ_DESC_F_NEXT | crate::queue::VIRTQ_DESC_F_WRITE,
                );
                d(head + 2, status, 1, crate::queue::VIRTQ_DESC_F_WRITE);
            }
            m.write_obj(0u16, GuestAddress(Q_AVAIL + 4)).unwrap();
            m.write_obj(3u16, GuestAddress(Q_AVAIL + 6)).unwrap();
            m.write_obj(2u16, GuestAddress(Q_AVAIL + 2)).unwrap();
            m.write_obj(used_event, GuestAddress(Q_AVAIL + 4 + 2 * 16))
                .unwrap();
            let cfg = crate::queue::QueueConfig {
                size: 16,
                desc_table: Q_TABLE,
                avail_ring: Q_AVAIL,
                used_ring: Q_USED,
            };
            let mut q = VirtQueue::new(&m, 16, cfg, true, false).unwrap();
            let done = w.process_queue(0, &mut q, &m).unwrap();
            assert!(done.used);
            assert_eq!(
                *rec.used_idx.lock().unwrap(),
                want,
                "used_event {used_event}"
            );
            assert_eq!(m.read_obj::<u16>(GuestAddress(Q_USED + 2)).unwrap(), 2);
            for status in [STATUS, STATUS + 1] {
                assert_eq!(
                    m.read_obj::<u8>(GuestAddress(status)).unwrap(),
                    VIRTIO_BLK_S_OK
                );
            }
            // Nothing is left for the transport's end-of-batch question.
            assert!(!q.needs_notification(&m).unwrap());
        }
    }
}
