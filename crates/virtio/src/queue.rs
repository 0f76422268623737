//! Split virtqueues.
//!
//! Ring state (sizes, addresses, avail/used indices, EVENT_IDX suppression
//! through `used_event`/`avail_event`) is rust-vmm's `virtio_queue::Queue`.
//! Descriptor chains are walked here instead of with its `DescriptorChain`
//! iterator: that iterator ends a chain silently (returns `None`) when a
//! descriptor loops, points outside guest memory, overflows the total
//! length or nests indirect tables, which is indistinguishable from a
//! well-formed end of chain. A device must refuse such a chain and go to
//! NEEDS_RESET, so the walker below returns a [`QueueError`] for each case.

use std::mem::size_of;

use hypervisor::GuestRam;
use virtio_queue::desc::split::Descriptor as RawDescriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, Permissions};

/// A piece of guest memory inside one region (see [`DescChain::guest_slices`]).
pub type GuestSlice<'m> = vm_memory::VolatileSlice<'m, vm_memory::bitmap::MS<'m, GuestRam>>;

pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;

/// Why a queue or a descriptor chain was refused. Every variant is the
/// driver's doing (or a bug in it); none is a reason to panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error("queue configuration invalid: {0}")]
    Config(String),
    #[error("available index {avail} is more than the queue size ahead of {next}")]
    AvailIndex { avail: u16, next: u16 },
    #[error("chain head {head} is outside a queue of {size}")]
    HeadOutOfRange { head: u16, size: u16 },
    #[error("descriptor next {next} is outside a table of {size}")]
    NextOutOfRange { next: u16, size: u16 },
    #[error("descriptor chain longer than its table ({0}): a loop")]
    ChainTooLong(u16),
    #[error("descriptor {index} of the table at {table:#x} is outside guest memory")]
    DescriptorOutOfMemory { table: u64, index: u16 },
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    BufferOutOfMemory { addr: u64, len: u32 },
    #[error("descriptor chain total length overflows 32 bits")]
    LengthOverflow,
    #[error("indirect descriptor without VIRTIO_F_INDIRECT_DESC")]
    IndirectNotNegotiated,
    #[error("indirect descriptor inside an indirect table")]
    NestedIndirect,
    #[error("indirect descriptor with NEXT set")]
    IndirectWithNext,
    #[error("indirect table length {0:#x} is not a non-zero multiple of 16 up to 65535 entries")]
    IndirectTableSize(u32),
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    #[error("used ring update failed: {0}")]
    UsedRing(String),
}

/// One buffer of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    pub addr: GuestAddress,
    pub len: u32,
    /// Device-writable (VIRTQ_DESC_F_WRITE).
    pub writable: bool,
}

/// A validated descriptor chain: every buffer lies inside guest memory, the
/// readable buffers come first, and the total length fits 32 bits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DescChain {
    pub head: u16,
    pub descs: Vec<Descriptor>,
}

impl DescChain {
    pub fn readable(&self) -> impl Iterator<Item = &Descriptor> {
        self.descs.iter().filter(|d| !d.writable)
    }

    pub fn writable(&self) -> impl Iterator<Item = &Descriptor> {
        self.descs.iter().filter(|d| d.writable)
    }

    /// Total bytes the device may write.
    pub fn writable_len(&self) -> u32 {
        // Cannot overflow: the walker checked the sum of all lengths.
        self.writable().map(|d| d.len).sum()
    }

    /// Total bytes the device may read.
    pub fn readable_len(&self) -> u32 {
        self.readable().map(|d| d.len).sum()
    }

    /// Copy all readable bytes out of guest memory.
    pub fn read_all(&self, mem: &GuestRam) -> Result<Vec<u8>, QueueError> {
        let mut out = Vec::new();
        self.read_all_into(mem, &mut out)?;
        Ok(out)
    }

    /// [`DescChain::read_all`] into `out` (cleared first), so a device can
    /// keep one buffer for all its requests.
    pub fn read_all_into(&self, mem: &GuestRam, out: &mut Vec<u8>) -> Result<(), QueueError> {
        out.clear();
        out.reserve(self.readable_len() as usize);
        for d in self.readable() {
            let start = out.len();
            out.resize(start + d.len as usize, 0);
            mem.read_slice(&mut out[start..], d.addr).map_err(|_| {
                QueueError::BufferOutOfMemory {
                    addr: d.addr.0,
                    len: d.len,
                }
            })?;
        }
        Ok(())
    }

    /// Copy the first `out.len()` readable bytes out of guest memory;
    /// returns how many there were (fewer if the chain is shorter).
    pub fn read_prefix(&self, mem: &GuestRam, out: &mut [u8]) -> Result<usize, QueueError> {
        let mut done = 0;
        for d in self.readable() {
            if done == out.len() {
                break;
            }
            let n = (out.len() - done).min(d.len as usize);
            mem.read_slice(&mut out[done..done + n], d.addr)
                .map_err(|_| QueueError::BufferOutOfMemory {
                    addr: d.addr.0,
                    len: d.len,
                })?;
            done += n;
        }
        Ok(done)
    }

    /// Bytes `[skip, skip + len)` of the chain's device-readable buffers
    /// (or, with `writable`, its device-writable ones) as slices of guest
    /// memory, in chain order, each inside one memory region, appended to
    /// `out`; returns how many bytes they cover (less than `len` when the
    /// chain is shorter). A device hands these to the host kernel without a
    /// bounce buffer; after writing through them it must mark them dirty
    /// (`bitmap().mark_dirty`), which `write_slice` would have done.
    pub fn guest_slices<'m>(
        &self,
        mem: &'m GuestRam,
        writable: bool,
        skip: u64,
        len: u64,
        out: &mut Vec<GuestSlice<'m>>,
    ) -> Result<u64, QueueError> {
        let mut pos = 0u64; // start of `d` in the stream of buffers
        let end = skip.saturating_add(len);
        let mut covered = 0u64;
        for d in self.descs.iter().filter(|d| d.writable == writable) {
            let (start, stop) = (pos, pos + d.len as u64);
            pos = stop;
            if stop <= skip || d.len == 0 {
                continue;
            }
            if start >= end {
                break;
            }
            let from = skip.max(start) - start;
            let to = end.min(stop) - start;
            let bad = || QueueError::BufferOutOfMemory {
                addr: d.addr.0,
                len: d.len,
            };
            let addr = d.addr.checked_add(from).ok_or_else(bad)?;
            for piece in GuestMemoryBackend::get_slices(mem, addr, (to - from) as usize) {
                out.push(piece.map_err(|_| bad())?);
            }
            covered += to - from;
        }
        Ok(covered)
    }

    /// Fill the writable buffers front to back with `data`; returns how
    /// many bytes were written (at most `writable_len`).
    pub fn write_all(&self, mem: &GuestRam, mut data: &[u8]) -> Result<u32, QueueError> {
        let mut written = 0u32;
        for d in self.writable() {
            if data.is_empty() {
                break;
            }
            let n = data.len().min(d.len as usize);
            mem.write_slice(&data[..n], d.addr)
                .map_err(|_| QueueError::BufferOutOfMemory {
                    addr: d.addr.0,
                    len: d.len,
                })?;
            written += n as u32;
            data = &data[n..];
        }
        Ok(written)
    }
}

/// Walk the chain starting at `head` in the descriptor table at
/// `desc_table` of a queue of `queue_size`, refusing anything malformed.
pub fn walk_chain(
    mem: &GuestRam,
    desc_table: GuestAddress,
    queue_size: u16,
    head: u16,
    indirect_allowed: bool,
) -> Result<DescChain, QueueError> {
    if head >= queue_size {
        return Err(QueueError::HeadOutOfRange {
            head,
            size: queue_size,
        });
    }
    let mut table = desc_table;
    let mut table_size = queue_size;
    let mut index = head;
    let mut in_indirect = false;
    let mut visited: u32 = 0;
    let mut total: u32 = 0;
    let mut seen_writable = false;
    let mut descs = Vec::new();
    loop {
        // A well-formed chain visits each descriptor of its table at most
        // once, so more steps than entries means a loop.
        visited += 1;
        if visited > table_size as u32 {
            return Err(QueueError::ChainTooLong(table_size));
        }
        let raw: RawDescriptor = table
            .checked_add(index as u64 * size_of::<RawDescriptor>() as u64)
            .and_then(|a| mem.read_obj(a).ok())
            .ok_or(QueueError::DescriptorOutOfMemory {
                table: table.0,
                index,
            })?;
        let (addr, len, flags) = (raw.addr(), raw.len(), raw.flags());
        if flags & VIRTQ_DESC_F_INDIRECT != 0 {
            if !indirect_allowed {
                return Err(QueueError::IndirectNotNegotiated);
            }
            if in_indirect {
                return Err(QueueError::NestedIndirect);
            }
            if flags & VIRTQ_DESC_F_NEXT != 0 {
                return Err(QueueError::IndirectWithNext);
            }
            let entries = len / size_of::<RawDescriptor>() as u32;
            if len == 0 || len % size_of::<RawDescriptor>() as u32 != 0 || entries > u16::MAX as u32
            {
                return Err(QueueError::IndirectTableSize(len));
            }
            if !in_memory(mem, addr, len) {
                return Err(QueueError::BufferOutOfMemory { addr: addr.0, len });
            }
            table = addr;
            table_size = entries as u16;
            index = 0;
            in_indirect = true;
            visited = 0;
            continue;
        }
        let writable = flags & VIRTQ_DESC_F_WRITE != 0;
        if seen_writable && !writable {
            return Err(QueueError::ReadableAfterWritable);
        }
        seen_writable |= writable;
        total = total.checked_add(len).ok_or(QueueError::LengthOverflow)?;
        descs.push(Descriptor {
            addr,
            len,
            writable,
        });
        if flags & VIRTQ_DESC_F_NEXT == 0 {
            break;
        }
        let next = raw.next();
        if next >= table_size {
            return Err(QueueError::NextOutOfRange {
                next,
                size: table_size,
            });
        }
        index = next;
    }
    // Buffers are checked once the chain's shape is known to be sane, so
    // that a length overflow is reported as such even for huge buffers.
    if let Some(d) = descs.iter().find(|d| !in_memory(mem, d.addr, d.len)) {
        return Err(QueueError::BufferOutOfMemory {
            addr: d.addr.0,
            len: d.len,
        });
    }
    Ok(DescChain { head, descs })
}

fn in_memory(mem: &GuestRam, addr: GuestAddress, len: u32) -> bool {
    addr.checked_add(len as u64).is_some()
        && (len == 0 || GuestMemory::check_range(mem, addr, len as usize, Permissions::ReadWrite))
}

/// The driver-programmed parameters of one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueConfig {
    pub size: u16,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

/// Where the device is in a live queue: the next available entry it will
/// take and the next used entry it will fill (free-running 16-bit indices).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct QueuePosition {
    pub next_avail: u16,
    pub next_used: u16,
}

/// A split virtqueue the device side uses after DRIVER_OK.
#[derive(Debug)]
pub struct VirtQueue {
    inner: Queue,
    indirect: bool,
    /// `next_used` when the driver was last asked about an interrupt:
    /// entries from here on are the ones [`VirtQueue::needs_notification`]
    /// judges (rust-vmm's own count misses those [`VirtQueue::add_used_many`]
    /// writes itself).
    notified_used: u16,
    /// With EVENT_IDX, after [`VirtQueue::undo_pops`]: the avail index just
    /// past the chains put back. The device has seen them and needs more, so
    /// [`VirtQueue::enable_notification`] asks the driver to notify past
    /// this index, not past `next_avail` (which the undo moved back behind
    /// chains the driver already made available: it would never notify
    /// again). Cleared by the next [`VirtQueue::pop`].
    wake_past: Option<u16>,
}

impl VirtQueue {
    /// A live queue from what the driver programmed; refuses sizes that are
    /// not a power of two up to `max_size`, misaligned rings and rings
    /// outside guest memory.
    pub fn new(
        mem: &GuestRam,
        max_size: u16,
        cfg: QueueConfig,
        event_idx: bool,
        indirect: bool,
    ) -> Result<Self, QueueError> {
        let bad = |e: virtio_queue::Error| QueueError::Config(e.to_string());
        let mut q = Queue::new(max_size).map_err(bad)?;
        q.try_set_size(cfg.size).map_err(bad)?;
        q.try_set_desc_table_address(GuestAddress(cfg.desc_table))
            .map_err(bad)?;
        q.try_set_avail_ring_address(GuestAddress(cfg.avail_ring))
            .map_err(bad)?;
        q.try_set_used_ring_address(GuestAddress(cfg.used_ring))
            .map_err(bad)?;
        q.set_event_idx(event_idx);
        q.set_ready(true);
        if !q.is_valid(mem) {
            return Err(QueueError::Config(format!(
                "rings of a {}-entry queue at {:#x}/{:#x}/{:#x} are not in guest memory",
                cfg.size, cfg.desc_table, cfg.avail_ring, cfg.used_ring
            )));
        }
        Ok(VirtQueue {
            notified_used: q.next_used(),
            inner: q,
            indirect,
            wake_past: None,
        })
    }

    pub fn size(&self) -> u16 {
        self.inner.size()
    }

    pub fn position(&self) -> QueuePosition {
        QueuePosition {
            next_avail: self.inner.next_avail(),
            next_used: self.inner.next_used(),
        }
    }

    /// Continue from where a snapshot left the queue.
    pub fn set_position(&mut self, p: QueuePosition) {
        self.inner.set_next_avail(p.next_avail);
        self.inner.set_next_used(p.next_used);
        self.notified_used = p.next_used;
        self.wake_past = None;
    }

    /// The next available chain, validated; `Ok(None)` when the driver has
    /// made nothing more available.
    pub fn pop(&mut self, mem: &GuestRam) -> Result<Option<DescChain>, QueueError> {
        self.wake_past = None;
        let desc_table = GuestAddress(self.inner.desc_table());
        let size = self.inner.size();
        let next = self.inner.next_avail();
        let head = match self.inner.iter(mem) {
            Ok(mut it) => it.next().map(|c| c.head_index()),
            Err(virtio_queue::Error::InvalidAvailRingIndex) => {
                let avail = self
                    .inner
                    .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
                    .map(|w| w.0)
                    .unwrap_or(0);
                return Err(QueueError::AvailIndex { avail, next });
            }
            Err(e) => return Err(QueueError::Config(e.to_string())),
        };
        match head {
            None => Ok(None),
            Some(h) => walk_chain(mem, desc_table, size, h, self.indirect).map(Some),
        }
    }

    /// Put back the chain [`VirtQueue::pop`] just returned (the device
    /// cannot use it yet): the next `pop` returns it again.
    pub fn undo_pop(&mut self) {
        let next = self.inner.next_avail().wrapping_sub(1);
        self.inner.set_next_avail(next);
    }

    /// Put back the last `n` chains [`VirtQueue::pop`] returned because
    /// they are not enough (a merged receive frame needs more): the device
    /// waits for the driver to make more available, and
    /// [`VirtQueue::enable_notification`] asks for a notify past them.
    pub fn undo_pops(&mut self, n: u16) {
        let past = self.inner.next_avail();
        self.inner.set_next_avail(past.wrapping_sub(n));
        self.wake_past = Some(past);
    }

    /// Return several chains (`(head, len)`, in order) to the driver at
    /// once: the driver sees the used index move only after every entry is
    /// written, so it never finds part of a group (a merged receive buffer
    /// spread over several chains is dropped by Linux if its later buffers
    /// are not there yet).
    pub fn add_used_many(&mut self, mem: &GuestRam, used: &[(u16, u32)]) -> Result<(), QueueError> {
        let Some((&(last_head, last_len), first)) = used.split_last() else {
            return Ok(());
        };
        let size = self.inner.size();
        let ring = GuestAddress(self.inner.used_ring());
        let start = self.inner.next_used();
        for (k, &(head, len)) in first.iter().enumerate() {
            if head >= size {
                return Err(QueueError::UsedRing(format!(
                    "descriptor {head} is outside a queue of {size}"
                )));
            }
            let slot = start.wrapping_add(k as u16) % size;
            let at = ring.unchecked_add(4 + 8 * slot as u64);
            mem.write_obj(head as u32, at)
                .and_then(|()| mem.write_obj(len, at.unchecked_add(4)))
                .map_err(|e| QueueError::UsedRing(e.to_string()))?;
        }
        // The last entry goes in through rust-vmm, whose release store of
        // the used index publishes all of them.
        self.inner
            .set_next_used(start.wrapping_add(first.len() as u16));
        self.add_used(mem, last_head, last_len)
    }

    /// Return chain `head` to the driver with `len` bytes written.
    pub fn add_used(&mut self, mem: &GuestRam, head: u16, len: u32) -> Result<(), QueueError> {
        self.inner
            .add_used(mem, head, len)
            .map_err(|e| QueueError::UsedRing(e.to_string()))
    }

    /// Whether the driver wants an interrupt for what was added since the
    /// last call (always true without EVENT_IDX).
    pub fn needs_notification(&mut self, mem: &GuestRam) -> Result<bool, QueueError> {
        // Fences and resets rust-vmm's count; its answer stands without
        // EVENT_IDX (it always says yes).
        let plain = self
            .inner
            .needs_notification(mem)
            .map_err(|e| QueueError::UsedRing(e.to_string()))?;
        let new = self.inner.next_used();
        let old = std::mem::replace(&mut self.notified_used, new);
        if !self.inner.event_idx_enabled() {
            return Ok(plain);
        }
        // used_event sits after the avail ring's entries; the ring was
        // checked to lie in guest memory when the queue was made.
        let at = GuestAddress(self.inner.avail_ring()).unchecked_add(4 + 2 * self.size() as u64);
        let used_event: u16 = mem
            .read_obj(at)
            .map_err(|e| QueueError::UsedRing(e.to_string()))?;
        // The driver wants an interrupt once the used index passes
        // used_event: was it among the entries added since `old`?
        Ok(new.wrapping_sub(used_event).wrapping_sub(1) < new.wrapping_sub(old))
    }

    /// Ask the driver for notifications again (with EVENT_IDX: publish
    /// `avail_event`); true if more chains arrived meanwhile.
    pub fn enable_notification(&mut self, mem: &GuestRam) -> Result<bool, QueueError> {
        let past = match self.wake_past {
            Some(past) if self.inner.event_idx_enabled() => past,
            // Without EVENT_IDX a notify comes for every kick; without a
            // put-back group the device waits past what it took.
            _ => {
                return self
                    .inner
                    .enable_notification(mem)
                    .map_err(|e| QueueError::UsedRing(e.to_string()))
            }
        };
        // avail_event sits after the used ring's entries (checked to lie in
        // guest memory when the queue was made). The driver notifies once
        // its avail index passes it: for the first chain after `past`.
        let at = GuestAddress(self.inner.used_ring()).unchecked_add(4 + 8 * self.size() as u64);
        mem.write_obj(past, at)
            .map_err(|e| QueueError::UsedRing(e.to_string()))?;
        // The driver writes its index then reads avail_event; the device
        // writes avail_event then reads the index: one of the two sees the
        // other's write, so a chain made available now is not missed.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let avail = self
            .inner
            .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
            .map_err(|e| QueueError::UsedRing(e.to_string()))?;
        Ok(avail.0 != past)
    }

    pub fn disable_notification(&mut self, mem: &GuestRam) -> Result<(), QueueError> {
        self.inner
            .disable_notification(mem)
            .map_err(|e| QueueError::UsedRing(e.to_string()))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const TABLE: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const MEM_SIZE: usize = 0x10_0000;

    fn mem() -> GuestRam {
        GuestRam::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    /// Write descriptor `i` of the table at `table` (also used by the
    /// device tests that build chains).
    pub(crate) fn desc(
        m: &GuestRam,
        table: u64,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let a = GuestAddress(table + 16 * i as u64);
        m.write_obj(addr, a).unwrap();
        m.write_obj(len, a.unchecked_add(8)).unwrap();
        m.write_obj(flags, a.unchecked_add(12)).unwrap();
        m.write_obj(next, a.unchecked_add(14)).unwrap();
    }

    fn walk(m: &GuestRam, head: u16, indirect: bool) -> Result<DescChain, QueueError> {
        walk_chain(m, GuestAddress(TABLE), 16, head, indirect)
    }

    #[test]
    fn well_formed_chains() {
        let m = mem();
        desc(&m, TABLE, 3, 0x8000, 10, VIRTQ_DESC_F_NEXT, 7);
        desc(&m, TABLE, 7, 0x9000, 20, VIRTQ_DESC_F_WRITE, 0);
        let c = walk(&m, 3, false).unwrap();
        assert_eq!(c.head, 3);
        assert_eq!(c.readable_len(), 10);
        assert_eq!(c.writable_len(), 20);
        m.write_slice(b"0123456789", GuestAddress(0x8000)).unwrap();
        assert_eq!(c.read_all(&m).unwrap(), b"0123456789");
        assert_eq!(c.write_all(&m, &[0xaa; 64]).unwrap(), 20);
        let mut back = [0u8; 21];
        m.read_slice(&mut back, GuestAddress(0x9000)).unwrap();
        assert_eq!(&back[..20], &[0xaa; 20]);
        assert_eq!(back[20], 0);
        // Indirect: a table of three in guest memory.
        desc(&m, TABLE, 0, 0x4000, 48, VIRTQ_DESC_F_INDIRECT, 0);
        desc(&m, 0x4000, 0, 0x8000, 4, VIRTQ_DESC_F_NEXT, 2);
        desc(
            &m,
            0x4000,
            2,
            0x9000,
            8,
            VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
            1,
        );
        desc(&m, 0x4000, 1, 0xa000, 8, VIRTQ_DESC_F_WRITE, 0);
        let c = walk(&m, 0, true).unwrap();
        assert_eq!(c.descs.len(), 3);
        assert_eq!(c.writable_len(), 16);
        // Zero-length buffers are fine.
        desc(&m, TABLE, 5, 0, 0, 0, 0);
        assert_eq!(walk(&m, 5, false).unwrap().descs.len(), 1);
    }

    /// Entries added together are published together, and the EVENT_IDX
    /// interrupt decision counts every one of them.
    #[test]
    fn used_groups_publish_at_once_and_count_for_interrupts() {
        let m = mem();
        let cfg = QueueConfig {
            size: 16,
            desc_table: TABLE,
            avail_ring: AVAIL,
            used_ring: USED,
        };
        let mut q = VirtQueue::new(&m, 16, cfg, true, false).unwrap();
        let used_event = GuestAddress(AVAIL + 4 + 2 * 16);
        // The driver wants an interrupt once entry 1 is used.
        m.write_obj(1u16, used_event).unwrap();
        q.add_used_many(&m, &[(3, 10), (4, 20), (5, 30)]).unwrap();
        assert_eq!(m.read_obj::<u16>(GuestAddress(USED + 2)).unwrap(), 3);
        for (k, (id, len)) in [(3u32, 10u32), (4, 20), (5, 30)].into_iter().enumerate() {
            let e = GuestAddress(USED + 4 + 8 * k as u64);
            assert_eq!(m.read_obj::<u32>(e).unwrap(), id);
            assert_eq!(m.read_obj::<u32>(e.unchecked_add(4)).unwrap(), len);
        }
        assert!(
            q.needs_notification(&m).unwrap(),
            "entry 1 was in the group"
        );
        // Entries 3 and 4 with used_event at 5: not yet; then entry 5: yes.
        m.write_obj(5u16, used_event).unwrap();
        q.add_used_many(&m, &[(6, 1), (7, 1)]).unwrap();
        assert!(!q.needs_notification(&m).unwrap());
        q.add_used(&m, 8, 1).unwrap();
        q.add_used(&m, 9, 1).unwrap();
        assert!(q.needs_notification(&m).unwrap());
        // A head outside the queue is refused, nothing published.
        assert!(q.add_used_many(&m, &[(16, 1), (1, 1)]).is_err());
        assert_eq!(m.read_obj::<u16>(GuestAddress(USED + 2)).unwrap(), 7);
    }

    #[test]
    fn hostile_chains_are_refused() {
        let m = mem();
        // Loop in the direct table.
        desc(&m, TABLE, 0, 0x8000, 1, VIRTQ_DESC_F_NEXT, 1);
        desc(&m, TABLE, 1, 0x8000, 1, VIRTQ_DESC_F_NEXT, 0);
        assert_eq!(walk(&m, 0, false), Err(QueueError::ChainTooLong(16)));
        // Self-loop.
        desc(&m, TABLE, 2, 0x8000, 1, VIRTQ_DESC_F_NEXT, 2);
        assert_eq!(walk(&m, 2, false), Err(QueueError::ChainTooLong(16)));
        // Head and next beyond the queue.
        assert_eq!(
            walk(&m, 16, false),
            Err(QueueError::HeadOutOfRange { head: 16, size: 16 })
        );
        desc(&m, TABLE, 3, 0x8000, 1, VIRTQ_DESC_F_NEXT, 16);
        assert_eq!(
            walk(&m, 3, false),
            Err(QueueError::NextOutOfRange { next: 16, size: 16 })
        );
        // Buffer outside memory, and one that wraps the address space.
        desc(&m, TABLE, 4, MEM_SIZE as u64 - 4, 8, 0, 0);
        assert!(matches!(
            walk(&m, 4, false),
            Err(QueueError::BufferOutOfMemory { .. })
        ));
        desc(&m, TABLE, 4, u64::MAX - 2, 8, 0, 0);
        assert!(matches!(
            walk(&m, 4, false),
            Err(QueueError::BufferOutOfMemory { .. })
        ));
        // Total length over 4 GiB.
        desc(&m, TABLE, 5, 0x8000, 0xffff_0000, VIRTQ_DESC_F_NEXT, 6);
        desc(&m, TABLE, 6, 0x8000, 0x10_0000, 0, 0);
        assert_eq!(walk(&m, 5, false), Err(QueueError::LengthOverflow));
        // Readable after writable.
        desc(
            &m,
            TABLE,
            7,
            0x8000,
            4,
            VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT,
            8,
        );
        desc(&m, TABLE, 8, 0x8000, 4, 0, 0);
        assert_eq!(walk(&m, 7, false), Err(QueueError::ReadableAfterWritable));
        // Indirect misuse.
        desc(&m, TABLE, 9, 0x4000, 32, VIRTQ_DESC_F_INDIRECT, 0);
        assert_eq!(walk(&m, 9, false), Err(QueueError::IndirectNotNegotiated));
        desc(&m, TABLE, 9, 0x4000, 33, VIRTQ_DESC_F_INDIRECT, 0);
        assert_eq!(walk(&m, 9, true), Err(QueueError::IndirectTableSize(33)));
        desc(&m, TABLE, 9, 0x4000, 0, VIRTQ_DESC_F_INDIRECT, 0);
        assert_eq!(walk(&m, 9, true), Err(QueueError::IndirectTableSize(0)));
        desc(
            &m,
            TABLE,
            9,
            0x4000,
            32,
            VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT,
            1,
        );
        assert_eq!(walk(&m, 9, true), Err(QueueError::IndirectWithNext));
        desc(
            &m,
            TABLE,
            9,
            MEM_SIZE as u64 - 16,
            32,
            VIRTQ_DESC_F_INDIRECT,
            0,
        );
        assert!(matches!(
            walk(&m, 9, true),
            Err(QueueError::BufferOutOfMemory { .. })
        ));
        desc(&m, TABLE, 9, 0x4000, 32, VIRTQ_DESC_F_INDIRECT, 0);
        desc(&m, 0x4000, 0, 0x5000, 16, VIRTQ_DESC_F_INDIRECT, 0);
        assert_eq!(walk(&m, 9, true), Err(QueueError::NestedIndirect));
        // Loop inside an indirect table.
        desc(&m, 0x4000, 0, 0x8000, 4, VIRTQ_DESC_F_NEXT, 1);
        desc(&m, 0x4000, 1, 0x8000, 4, VIRTQ_DESC_F_NEXT, 0);
        assert_eq!(walk(&m, 9, true), Err(QueueError::ChainTooLong(2)));
        // Next beyond an indirect table.
        desc(&m, 0x4000, 1, 0x8000, 4, VIRTQ_DESC_F_NEXT, 2);
        assert_eq!(
            walk(&m, 9, true),
            Err(QueueError::NextOutOfRange { next: 2, size: 2 })
        );
        // A descriptor table running off the end of memory.
        assert!(matches!(
            walk_chain(&m, GuestAddress(MEM_SIZE as u64 - 16), 16, 1, false),
            Err(QueueError::DescriptorOutOfMemory { .. })
        ));
        assert!(matches!(
            walk_chain(&m, GuestAddress(u64::MAX - 15), 16, 1, false),
            Err(QueueError::DescriptorOutOfMemory { .. })
        ));
    }

    #[test]
    fn queue_config_validation_and_avail_index() {
        let m = mem();
        let cfg = QueueConfig {
            size: 16,
            desc_table: TABLE,
            avail_ring: AVAIL,
            used_ring: USED,
        };
        assert!(VirtQueue::new(&m, 256, cfg, false, false).is_ok());
        for bad in [
            QueueConfig { size: 12, ..cfg },
            QueueConfig { size: 512, ..cfg },
            QueueConfig { size: 0, ..cfg },
            QueueConfig {
                desc_table: TABLE + 8,
                ..cfg
            },
            QueueConfig {
                used_ring: USED + 2,
                ..cfg
            },
            QueueConfig {
                avail_ring: MEM_SIZE as u64 - 4,
                ..cfg
            },
            QueueConfig {
                desc_table: u64::MAX - 15,
                ..cfg
            },
        ] {
            assert!(
                matches!(
                    VirtQueue::new(&m, 256, bad, false, false),
                    Err(QueueError::Config(_))
                ),
                "{bad:?}"
            );
        }
        let mut q = VirtQueue::new(&m, 256, cfg, false, false).unwrap();
        assert_eq!(q.pop(&m), Ok(None));
        // The driver claims 17 new chains in a queue of 16.
        m.write_obj(17u16, GuestAddress(AVAIL + 2)).unwrap();
        assert_eq!(
            q.pop(&m),
            Err(QueueError::AvailIndex { avail: 17, next: 0 })
        );
        // One chain whose head is out of range.
        m.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
        m.write_obj(40u16, GuestAddress(AVAIL + 4)).unwrap();
        assert_eq!(
            q.pop(&m),
            Err(QueueError::HeadOutOfRange { head: 40, size: 16 })
        );
    }
}
