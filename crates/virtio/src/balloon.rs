//! virtio-balloon (type 5), the traditional memory balloon.
//!
//! The host sets a target balloon size (`num_pages` in the configuration
//! space, in 4 KiB pages) through a [`BalloonHandle`]; that raises a
//! configuration-change interrupt. The guest's driver then allocates pages
//! and hands their frame numbers to the device on the inflate queue, and the
//! device releases the host memory behind them (`madvise(MADV_DONTNEED)` on
//! the guest RAM mapping: the pages read as zero if the guest ever touches
//! them again). The driver writes the balloon's size to `actual` as it goes.
//! Deflating hands frame numbers back on the deflate queue; nothing needs
//! doing for them (VIRTIO_BALLOON_F_MUST_TELL_HOST is not offered, so the
//! guest may reuse a page before telling).
//!
//! VIRTIO_BALLOON_F_DEFLATE_ON_OOM is offered (the guest may deflate under
//! memory pressure) unless turned off. With VIRTIO_BALLOON_F_STATS_VQ the
//! guest posts one buffer of (tag, value) statistics on queue 2: the device
//! keeps the latest values and holds the buffer, giving it back when the
//! host wants fresh numbers ([`BalloonHandle::request_stats`]); the guest
//! then refills and reposts it.
//!
//! Frame numbers come from the guest: one outside guest RAM is refused
//! (counted in [`BalloonState::refused_pfns`] and logged), never trusted.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hypervisor::GuestRam;
use serde::{Deserialize, Serialize};
use std::ops::Deref;
use vm_memory::bitmap::Bitmap;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{
    device_type, ActivateError, Descriptor, DeviceState, Persist, PersistError, Processed,
    QueueError, QueueWorker, VirtQueue, VirtioDevice, VirtioInterrupt,
};

pub const VIRTIO_BALLOON_F_MUST_TELL_HOST: u64 = 1 << 0;
pub const VIRTIO_BALLOON_F_STATS_VQ: u64 = 1 << 1;
pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u64 = 1 << 2;

/// Frame numbers are in 4 KiB units whatever the guest's page size.
pub const PFN_SHIFT: u32 = 12;
pub const PAGE_SIZE: u64 = 1 << PFN_SHIFT;
pub const QUEUE_SIZE: u16 = 256;
pub const INFLATEQ: usize = 0;
pub const DEFLATEQ: usize = 1;
pub const STATSQ: usize = 2;
/// `num_pages` and `actual` (le32 each); the fields after them belong to
/// features not offered.
pub const CONFIG_LEN: usize = 8;
/// One statistic: le16 tag, le64 value (packed).
pub const STAT_LEN: usize = 10;
/// Most statistics bytes read from one buffer (Linux sends 10 entries).
const MAX_STATS_BYTES: usize = 4096;
/// Frame numbers read from guest memory at a time.
const PFN_CHUNK: usize = 1024;
/// Refused frame numbers logged one by one per activation; later ones are
/// only counted.
const REFUSALS_LOGGED: u64 = 8;

/// Statistic tags (virtio 1.x 5.5.6.3).
pub mod tag {
    pub const SWAP_IN: u16 = 0;
    pub const SWAP_OUT: u16 = 1;
    pub const MAJOR_FAULTS: u16 = 2;
    pub const MINOR_FAULTS: u16 = 3;
    pub const FREE_MEMORY: u16 = 4;
    pub const TOTAL_MEMORY: u16 = 5;
    pub const AVAILABLE_MEMORY: u16 = 6;
    pub const DISK_CACHES: u16 = 7;
    pub const HUGETLB_ALLOCATIONS: u16 = 8;
    pub const HUGETLB_FAILURES: u16 = 9;
}

/// What the balloon offers the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonOptions {
    /// Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM.
    pub deflate_on_oom: bool,
    /// Offer VIRTIO_BALLOON_F_STATS_VQ (a third queue).
    pub stats: bool,
}

impl Default for BalloonOptions {
    fn default() -> Self {
        BalloonOptions {
            deflate_on_oom: true,
            stats: true,
        }
    }
}

/// The guest's memory statistics as it last sent them (bytes, except the
/// fault and hugetlb counts); a tag the guest did not send is absent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BalloonStats {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swap_in: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swap_out: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub major_faults: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub minor_faults: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free_memory: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_memory: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub available_memory: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_caches: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hugetlb_allocations: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hugetlb_failures: Option<u64>,
}

impl BalloonStats {
    /// Parse a statistics buffer; entries with unknown tags are skipped
    /// (newer drivers send more), a trailing partial entry is ignored.
    pub fn parse(buf: &[u8]) -> Self {
        let mut s = BalloonStats::default();
        for e in buf.chunks_exact(STAT_LEN) {
            let t = u16::from_le_bytes([e[0], e[1]]);
            let mut v = [0u8; 8];
            v.copy_from_slice(&e[2..10]);
            let v = Some(u64::from_le_bytes(v));
            match t {
                tag::SWAP_IN => s.swap_in = v,
                tag::SWAP_OUT => s.swap_out = v,
                tag::MAJOR_FAULTS => s.major_faults = v,
                tag::MINOR_FAULTS => s.minor_faults = v,
                tag::FREE_MEMORY => s.free_memory = v,
                tag::TOTAL_MEMORY => s.total_memory = v,
                tag::AVAILABLE_MEMORY => s.available_memory = v,
                tag::DISK_CACHES => s.disk_caches = v,
                tag::HUGETLB_ALLOCATIONS => s.hugetlb_allocations = v,
                tag::HUGETLB_FAILURES => s.hugetlb_failures = v,
                _ => {}
            }
        }
        s
    }
}

/// The balloon's state: the configuration space and what the device saw.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonState {
    /// The host's target: pages the guest is asked to give up.
    pub num_pages: u32,
    /// Pages the guest says the balloon holds (written by the driver).
    pub actual: u32,
    /// Frame numbers received on the inflate queue (and released).
    pub inflated_pages: u64,
    /// Frame numbers received on the deflate queue.
    pub deflated_pages: u64,
    /// Frame numbers outside guest RAM, refused.
    pub refused_pfns: u64,
    /// madvise calls the host refused (the memory stays allocated).
    pub release_errors: u64,
    /// The guest's latest statistics.
    pub stats: Option<BalloonStats>,
    /// Statistics buffers received.
    pub stats_updates: u64,
}

/// The balloon in a snapshot: what the host asked, what the guest holds,
/// and the statistics buffer the device keeps (its queue positions are the
/// transport's). The inflated pages themselves are zero in guest memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonSnapshot {
    pub options: BalloonOptions,
    pub state: BalloonState,
    /// Head of the statistics buffer the device holds until it wants fresh
    /// numbers (the guest waits for it to come back).
    pub held_stats: Option<u16>,
}

struct Inner {
    state: BalloonState,
    stats_at: Option<Instant>,
    irq: Option<Arc<dyn VirtioInterrupt>>,
    stats_negotiated: bool,
    /// See [`BalloonSnapshot::held_stats`]; kept here, not in the worker,
    /// so it outlives a worker stopped for a snapshot.
    held_stats: Option<u16>,
}

struct Shared {
    inner: Mutex<Inner>,
    /// The host wants fresh statistics.
    stats_wanted: AtomicBool,
    /// Wakes the worker for a statistics request.
    wake: EventFd,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The host's side of the balloon, usable from any thread (the API).
#[derive(Clone)]
pub struct BalloonHandle {
    shared: Arc<Shared>,
    options: BalloonOptions,
}

impl BalloonHandle {
    /// Ask the guest for a balloon of `pages` 4 KiB pages. The caller checks
    /// the target against guest RAM.
    pub fn set_target_pages(&self, pages: u32) {
        let irq = {
            let mut i = self.shared.lock();
            i.state.num_pages = pages;
            i.irq.clone()
        };
        // A driver that is not up yet reads the target when it probes.
        if let Some(irq) = irq {
            irq.config_changed();
        }
        self.request_stats();
    }

    pub fn state(&self) -> BalloonState {
        self.shared.lock().state.clone()
    }

    pub fn options(&self) -> BalloonOptions {
        self.options
    }

    /// How long ago the guest last sent statistics.
    pub fn stats_age(&self) -> Option<Duration> {
        self.shared.lock().stats_at.map(|t| t.elapsed())
    }

    /// Ask the guest to send its statistics again (answered asynchronously:
    /// [`BalloonHandle::state`] shows them once they arrive).
    pub fn request_stats(&self) {
        if !self.shared.lock().stats_negotiated {
            return;
        }
        self.shared.stats_wanted.store(true, Ordering::SeqCst);
        let _ = self.shared.wake.write(1);
    }
}

/// The balloon device.
pub struct Balloon {
    shared: Arc<Shared>,
    options: BalloonOptions,
}

impl Balloon {
    pub fn new(options: BalloonOptions) -> std::io::Result<Self> {
        Ok(Balloon {
            shared: Arc::new(Shared {
                inner: Mutex::new(Inner {
                    state: BalloonState::default(),
                    stats_at: None,
                    irq: None,
                    stats_negotiated: false,
                    held_stats: None,
                }),
                stats_wanted: AtomicBool::new(false),
                wake: EventFd::new(EFD_NONBLOCK)?,
            }),
            options,
        })
    }

    pub fn handle(&self) -> BalloonHandle {
        BalloonHandle {
            shared: self.shared.clone(),
            options: self.options,
        }
    }

    fn config_bytes(&self) -> [u8; CONFIG_LEN] {
        let i = self.shared.lock();
        let mut c = [0u8; CONFIG_LEN];
        c[0..4].copy_from_slice(&i.state.num_pages.to_le_bytes());
        c[4..8].copy_from_slice(&i.state.actual.to_le_bytes());
        c
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        device_type::BALLOON
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        let n = if self.options.stats { 3 } else { 2 };
        vec![QUEUE_SIZE; n]
    }

    fn features(&self) -> u64 {
        let mut f = 0;
        if self.options.deflate_on_oom {
            f |= VIRTIO_BALLOON_F_DEFLATE_ON_OOM;
        }
        if self.options.stats {
            f |= VIRTIO_BALLOON_F_STATS_VQ;
        }
        f
    }

    fn config_len(&self) -> usize {
        CONFIG_LEN
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::read_config_image(&self.config_bytes(), offset, data);
    }

    /// Only `actual` (bytes 4..8) is the driver's to write.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut i = self.shared.lock();
        let mut actual = i.state.actual.to_le_bytes();
        for (k, b) in data.iter().enumerate() {
            let at = offset.checked_add(k as u64);
            if let Some(slot) = at
                .and_then(|a| a.checked_sub(4))
                .and_then(|a| actual.get_mut(a as usize))
            {
                *slot = *b;
            }
        }
        i.state.actual = u32::from_le_bytes(actual);
    }

    fn activate(
        &mut self,
        features: u64,
        _mem: GuestRam,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<Box<dyn QueueWorker>, ActivateError> {
        let wake = self
            .shared
            .wake
            .try_clone()
            .map_err(|e| ActivateError::Failed(e.to_string()))?;
        let stats = features & VIRTIO_BALLOON_F_STATS_VQ != 0;
        {
            let mut i = self.shared.lock();
            i.irq = Some(interrupt);
            i.stats_negotiated = stats;
        }
        Ok(Box::new(BalloonWorker {
            shared: self.shared.clone(),
            wake,
            stats,
            refusals_logged: 0,
        }))
    }

    fn reset(&mut self) {
        let mut i = self.shared.lock();
        i.irq = None;
        i.stats_negotiated = false;
        i.held_stats = None;
        // A reset device's balloon is empty; the host's target stands.
        i.state.actual = 0;
    }

    fn save_state(&self) -> Result<DeviceState, PersistError> {
        crate::save_as(self, DeviceState::Balloon)
    }

    fn restore_state(&mut self, state: &DeviceState) -> Result<(), PersistError> {
        crate::restore_from(self, "virtio-balloon", state, |s| match s {
            DeviceState::Balloon(s) => Some(s),
            _ => None,
        })
    }
}

impl Persist for Balloon {
    type State = BalloonSnapshot;

    fn save(&self) -> Result<BalloonSnapshot, PersistError> {
        let i = self.shared.lock();
        Ok(BalloonSnapshot {
            options: self.options,
            state: i.state.clone(),
            held_stats: i.held_stats,
        })
    }

    fn restore(&mut self, s: &BalloonSnapshot) -> Result<(), PersistError> {
        const DEVICE: &str = "virtio-balloon";
        if s.options != self.options {
            return Err(PersistError::mismatch(
                DEVICE,
                format!(
                    "the balloon had options {:?} when saved, {:?} now",
                    s.options, self.options
                ),
            ));
        }
        if s.held_stats.is_some() && !s.options.stats {
            return Err(PersistError::invalid(
                DEVICE,
                "a held statistics buffer without a statistics queue",
            ));
        }
        if let Some(h) = s.held_stats {
            if h >= QUEUE_SIZE {
                return Err(PersistError::invalid(
                    DEVICE,
                    format!("held statistics buffer {h} beyond the queue"),
                ));
            }
        }
        let mut i = self.shared.lock();
        i.state = s.state.clone();
        i.held_stats = s.held_stats;
        i.stats_at = None;
        Ok(())
    }
}

/// A run of guest pages contiguous in host memory, released at once.
struct Run {
    region: GuestAddress,
    host: usize,
    len: usize,
}

/// What one chain of frame numbers amounted to.
#[derive(Default)]
struct Tally {
    pages: u64,
    refused: u64,
    release_errors: u64,
}

struct BalloonWorker {
    shared: Arc<Shared>,
    wake: EventFd,
    stats: bool,
    refusals_logged: u64,
}

/// Where page `pfn` lives in host memory: (its region's start, host
/// address), if the whole page is guest RAM.
fn locate(mem: &GuestRam, pfn: u32) -> Option<(GuestAddress, usize)> {
    let gpa = GuestAddress(u64::from(pfn) << PFN_SHIFT);
    let region = mem.find_region(gpa)?;
    let at = region.to_region_addr(gpa)?;
    if at.raw_value().checked_add(PAGE_SIZE)? > region.len() {
        return None;
    }
    let host = region.get_host_address(at).ok()? as usize;
    Some((region.start_addr(), host))
}

/// Mark `run`'s pages in guest memory's write bitmap.
fn mark_written(mem: &GuestRam, run: &Run) {
    let Some(region) = mem.find_region(run.region) else {
        return;
    };
    let Ok(base) = region.get_host_address(MemoryRegionAddress(0)) else {
        return;
    };
    if let Some(offset) = run.host.checked_sub(base as usize) {
        region.deref().bitmap().mark_dirty(offset, run.len);
    }
}

/// Give the host memory behind `run` back to the kernel.
fn release(run: &Run) -> std::io::Result<()> {
    // madvise needs a host-page-aligned start.
    if !run.host.is_multiple_of(PAGE_SIZE as usize) {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: [host, host + len) lies inside one guest RAM mapping that the
    // GuestRam this worker holds keeps mapped (checked by `locate`).
    // MADV_DONTNEED only drops the contents of pages the guest gave up; the
    // mapping stays valid and refaults zero-filled.
    let r = unsafe { libc::madvise(run.host as *mut libc::c_void, run.len, libc::MADV_DONTNEED) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl BalloonWorker {
    fn flush(mem: &GuestRam, run: &mut Option<Run>, tally: &mut Tally) {
        if let Some(r) = run.take() {
            // The pages now read as zero: a change live migration must
            // see, like any write by the device.
            mark_written(mem, &r);
            if let Err(e) = release(&r) {
                tracing::warn!(
                    "virtio-balloon: cannot release {} KiB at host {:#x}: {e}",
                    r.len >> 10,
                    r.host
                );
                tally.release_errors += 1;
            }
        }
    }

    fn refuse(&mut self, pfn: u32, inflate: bool) {
        self.refusals_logged += 1;
        let queue = if inflate { "inflate" } else { "deflate" };
        if self.refusals_logged <= REFUSALS_LOGGED {
            tracing::warn!(
                "virtio-balloon: {queue} frame number {pfn:#x} (guest address {:#x}) is outside guest RAM; refused",
                u64::from(pfn) << PFN_SHIFT
            );
        }
        if self.refusals_logged == REFUSALS_LOGGED {
            tracing::warn!(
                "virtio-balloon: further refused frame numbers are only counted (refused_pfns)"
            );
        }
    }

    /// One frame number from the inflate (release its memory) or deflate
    /// queue.
    fn page(
        &mut self,
        mem: &GuestRam,
        pfn: u32,
        inflate: bool,
        run: &mut Option<Run>,
        tally: &mut Tally,
    ) {
        let Some((region, host)) = locate(mem, pfn) else {
            tally.refused += 1;
            self.refuse(pfn, inflate);
            return;
        };
        tally.pages += 1;
        if !inflate {
            return;
        }
        if let Some(r) = run {
            if r.region == region && r.host + r.len == host {
                r.len += PAGE_SIZE as usize;
                return;
            }
        }
        Self::flush(mem, run, tally);
        *run = Some(Run {
            region,
            host,
            len: PAGE_SIZE as usize,
        });
    }

    /// Every frame number in the device-readable buffers of a chain.
    fn pages_of(
        &mut self,
        mem: &GuestRam,
        descs: &[Descriptor],
        inflate: bool,
    ) -> Result<Tally, QueueError> {
        let mut tally = Tally::default();
        let mut run = None;
        let mut buf = vec![0u8; PFN_CHUNK * 4];
        for d in descs.iter().filter(|d| !d.writable) {
            // A trailing partial frame number is ignored.
            let whole = d.len as usize / 4 * 4;
            let mut off = 0usize;
            while off < whole {
                let n = (whole - off).min(buf.len());
                let at = d.addr.checked_add(off as u64);
                let read = at.and_then(|a| mem.read_slice(&mut buf[..n], a).ok());
                if read.is_none() {
                    return Err(QueueError::BufferOutOfMemory {
                        addr: d.addr.0,
                        len: d.len,
                    });
                }
                for c in buf[..n].chunks_exact(4) {
                    let pfn = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    self.page(mem, pfn, inflate, &mut run, &mut tally);
                }
                off += n;
            }
        }
        Self::flush(mem, &mut run, &mut tally);
        Ok(tally)
    }

    fn pages(
        &mut self,
        queue: &mut VirtQueue,
        mem: &GuestRam,
        inflate: bool,
    ) -> Result<Processed, QueueError> {
        let mut done = Processed::default();
        while let Some(chain) = queue.pop(mem)? {
            let t = self.pages_of(mem, &chain.descs, inflate)?;
            {
                let mut i = self.shared.lock();
                let s = &mut i.state;
                if inflate {
                    s.inflated_pages += t.pages;
                } else {
                    s.deflated_pages += t.pages;
                }
                s.refused_pfns += t.refused;
                s.release_errors += t.release_errors;
            }
            queue.add_used(mem, chain.head, 0)?;
            done.used = true;
        }
        Ok(done)
    }

    fn stats(&mut self, queue: &mut VirtQueue, mem: &GuestRam) -> Result<Processed, QueueError> {
        let mut done = Processed::default();
        // Give the held buffer back: the guest refills and reposts it. With
        // none held the guest is refilling already.
        if self.shared.stats_wanted.swap(false, Ordering::SeqCst) {
            let held = self.shared.lock().held_stats.take();
            if let Some(head) = held {
                queue.add_used(mem, head, 0)?;
                done.used = true;
            }
        }
        while let Some(chain) = queue.pop(mem)? {
            let mut buf = Vec::new();
            for d in chain.readable() {
                let n = (d.len as usize).min(MAX_STATS_BYTES - buf.len());
                let start = buf.len();
                buf.resize(start + n, 0);
                mem.read_slice(&mut buf[start..], d.addr).map_err(|_| {
                    QueueError::BufferOutOfMemory {
                        addr: d.addr.0,
                        len: d.len,
                    }
                })?;
                if buf.len() == MAX_STATS_BYTES {
                    break;
                }
            }
            // The driver keeps one buffer in flight; should it post another,
            // the older one goes back.
            let old = {
                let mut i = self.shared.lock();
                i.state.stats = Some(BalloonStats::parse(&buf));
                i.state.stats_updates += 1;
                i.stats_at = Some(Instant::now());
                i.held_stats.replace(chain.head)
            };
            if let Some(old) = old {
                queue.add_used(mem, old, 0)?;
                done.used = true;
            }
        }
        Ok(done)
    }
}

impl QueueWorker for BalloonWorker {
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut VirtQueue,
        mem: &GuestRam,
    ) -> Result<Processed, QueueError> {
        match index {
            INFLATEQ => self.pages(queue, mem, true),
            DEFLATEQ => self.pages(queue, mem, false),
            STATSQ if self.stats => self.stats(queue, mem),
            _ => Ok(Processed::default()),
        }
    }

    fn host_event(&self) -> Option<&EventFd> {
        Some(&self.wake)
    }

    fn host_event_queues(&self) -> Vec<usize> {
        if self.stats {
            vec![STATSQ]
        } else {
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_parse_known_tags_and_skip_the_rest() {
        let mut b = Vec::new();
        for (t, v) in [
            (tag::FREE_MEMORY, 1000u64),
            (77, 5),
            (tag::TOTAL_MEMORY, 4096),
        ] {
            b.extend_from_slice(&t.to_le_bytes());
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&[1, 2, 3]);
        let s = BalloonStats::parse(&b);
        assert_eq!(s.free_memory, Some(1000));
        assert_eq!(s.total_memory, Some(4096));
        assert_eq!(s.swap_in, None);
        // Absent statistics are left out of the JSON, present ones named.
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, r#"{"free_memory":1000,"total_memory":4096}"#);
        assert_eq!(serde_json::from_str::<BalloonStats>(&json).unwrap(), s);
    }

    #[test]
    fn config_space_holds_target_and_actual() {
        let mut b = Balloon::new(BalloonOptions::default()).unwrap();
        let h = b.handle();
        h.set_target_pages(0x1234);
        b.write_config(4, &0x56u32.to_le_bytes());
        let mut c = [0u8; 8];
        b.read_config(0, &mut c);
        assert_eq!(u32::from_le_bytes(c[0..4].try_into().unwrap()), 0x1234);
        assert_eq!(u32::from_le_bytes(c[4..8].try_into().unwrap()), 0x56);
        // num_pages is the host's: a driver write there changes nothing.
        b.write_config(0, &[0xff; 4]);
        b.write_config(6, &[0x01]);
        let s = h.state();
        assert_eq!((s.num_pages, s.actual), (0x1234, 0x01_0056));
        b.reset();
        assert_eq!(h.state().actual, 0);
        assert_eq!(h.state().num_pages, 0x1234);
    }

    #[test]
    fn state_survives_save_and_restore() {
        let b = Balloon::new(BalloonOptions::default()).unwrap();
        let h = b.handle();
        h.set_target_pages(300);
        {
            let mut i = b.shared.lock();
            i.state.actual = 300;
            i.state.inflated_pages = 300;
            i.held_stats = Some(7);
        }
        let saved = b.save_state().unwrap();
        let json = serde_json::to_string(&saved).unwrap();
        let back: DeviceState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, saved);
        let mut c = Balloon::new(BalloonOptions::default()).unwrap();
        c.restore_state(&back).unwrap();
        let s = c.handle().state();
        assert_eq!((s.num_pages, s.actual, s.inflated_pages), (300, 300, 300));
        assert_eq!(c.shared.lock().held_stats, Some(7));
        let mut cfg = [0u8; 8];
        c.read_config(0, &mut cfg);
        assert_eq!(u32::from_le_bytes(cfg[4..8].try_into().unwrap()), 300);
        // Other options, another device or a held buffer beyond the queue:
        // refused.
        let mut d = Balloon::new(BalloonOptions {
            deflate_on_oom: true,
            stats: false,
        })
        .unwrap();
        assert!(d
            .restore_state(&back)
            .unwrap_err()
            .to_string()
            .contains("options"));
        assert!(c.restore_state(&DeviceState::Rng).is_err());
        let DeviceState::Balloon(mut bad) = back else {
            unreachable!()
        };
        bad.held_stats = Some(QUEUE_SIZE);
        assert!(c.restore_state(&DeviceState::Balloon(bad)).is_err());
    }

    #[test]
    fn released_pages_are_marked_written() {
        let mem = GuestRam::from_ranges(&[
            (GuestAddress(0), 64 * 4096),
            (GuestAddress(1 << 20), 64 * 4096),
        ])
        .unwrap();
        let (region, host) = locate(&mem, (1 << 20 >> PFN_SHIFT) + 3).unwrap();
        assert_eq!(region, GuestAddress(1 << 20));
        let run = Run {
            region,
            host,
            len: 2 * PAGE_SIZE as usize,
        };
        mark_written(&mem, &run);
        let bits: Vec<Vec<u64>> = mem
            .iter()
            .map(|r| r.deref().bitmap().get_and_reset())
            .collect();
        assert_eq!(bits, vec![vec![0], vec![0b11 << 3]]);
        // A frame number outside RAM has no place.
        assert!(locate(&mem, 64).is_none());
    }

    #[test]
    fn features_follow_the_options() {
        let b = Balloon::new(BalloonOptions::default()).unwrap();
        assert_eq!(
            b.features(),
            VIRTIO_BALLOON_F_DEFLATE_ON_OOM | VIRTIO_BALLOON_F_STATS_VQ
        );
        assert_eq!(b.queue_max_sizes().len(), 3);
        let b = Balloon::new(BalloonOptions {
            deflate_on_oom: false,
            stats: false,
        })
        .unwrap();
        assert_eq!(b.features(), 0);
        assert_eq!(b.queue_max_sizes().len(), 2);
    }
}
