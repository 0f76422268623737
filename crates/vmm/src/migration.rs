//! Live migration over TCP: the source copies guest memory while the guest
//! runs (pre-copy, following the backend's dirty page log), then pauses it,
//! sends the pages written since plus the snapshot manifest (vCPU, VM and
//! device state, configuration), and waits for the destination to say it
//! has built the VM. The destination builds it the way `vireo restore`
//! does, with memory filled from the stream instead of mapped from a file.
//!
//! The stream (all integers little-endian):
//!
//! ```text
//! the destination speaks first: "VIREODST" u8 flags, 32-byte nonce
//!   (flags: 1 a key is required, 2 TLS follows)
//! [with TLS: the TLS handshake, then the destination sends 'T'; all that
//!  follows is inside the TLS session]
//! "VIREOMIG" u32 version [32-byte tag if a key is required] u32 len hello (JSON)
//! then messages, each starting with a tag byte:
//!   'P' u32 count, count x (u64 gpa | ZERO_PAGE, [4096 bytes unless ZERO_PAGE])
//!   'Q' the destination answers 'R' once it has read everything before
//!   'S' u32 len, the snapshot manifest (JSON): the last message
//! the destination answers 'A' (the VM is built and will run) or
//!   'N' u32 len, its error message.
//!
//! The source sends 'Q' before it pauses the guest, so the downtime does
//! not include the destination catching up on pre-copy data.
//! ```
//!
//! Authentication: with TLS (`crate::tls`: a destination with a
//! certificate speaks only TLS; a source checks it against its CA file,
//! and with a CA of its own the destination checks the source's
//! certificate too) the stream is encrypted as well. With a shared key (`--migration-key-file`, the same
//! file on both hosts) the destination demands the tag HMAC-SHA256(key,
//! nonce) of a nonce it drew for this connection, so only a source holding
//! the key is accepted (the stream is not encrypted: use a trusted
//! network, or a tunnel). Until a connection has passed the greeting, the
//! tag and a well-formed hello (within [`HANDSHAKE`]), it is only turned
//! away (logged, answered 'N') and the destination waits on: a port scan
//! or an impostor cannot end a planned receive. After that, the whole
//! stream must arrive within the receive deadline (`--migration-timeout`,
//! an overall limit, not a per-read one) and no read may wait longer than
//! [`IDLE`].
//!
//! Which pages changed: vCPU writes are in the backend's dirty log (KVM's,
//! or the engine's per-page write flags); device writes (virtio used rings,
//! block reads, net RX, ...) go through vm-memory, whose per-region bitmap
//! ([`hypervisor::GuestRam`]) marks them. Each round takes and clears both
//! and sends their union; the final (paused, devices quiesced) round does
//! the same, so it sends only what was written since the last round.
//!
//! Disks are not copied: both sides must see the same files (one host, or
//! shared storage). The source flushes them and gives up its file locks
//! just before it sends the state, and takes them back if the migration
//! fails.

use crate::counters::Phase;
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hypervisor::GuestRam;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::snapshot::{is_zero, Manifest, MemoryRange};
use crate::tls::Channel;
use crate::{VmHandle, VmmError};

pub const MAGIC: &[u8; 8] = b"VIREOMIG";
/// What the destination sends first.
pub const GREETING: &[u8; 8] = b"VIREODST";
/// Greeting flags: the source must answer the nonce with the key's tag...
const FLAG_KEY: u8 = 1;
/// ...and TLS follows the greeting.
const FLAG_TLS: u8 = 2;
/// What a TLS destination sends first inside the session: the source then
/// knows its certificate was taken (under TLS 1.3 a client finishes its
/// handshake before the server has checked the client's certificate).
const TLS_ACCEPTED: u8 = b'T';
/// 2: the state message carries the version-3 snapshot manifest (devices as one
/// list walked in order).
/// 3: the destination greets first with a nonce; a keyed source answers it.
pub const VERSION: u32 = 3;
/// From accept to a well-formed hello: longer and the connection is turned away.
pub const HANDSHAKE: Duration = Duration::from_secs(10);
/// The longest a read of the stream may wait for a byte.
pub const IDLE: Duration = Duration::from_secs(120);
/// What the tag of a nonce is computed over, with the nonce.
const TAG_CONTEXT: &[u8] = b"vireo migration source v3";
const PAGE: u64 = 4096;
/// Set in a page's address: the page is all zeros and no bytes follow.
const ZERO_PAGE: u64 = 1;
/// Pre-copy stops when fewer pages than this are dirty...
const SMALL_REMAINDER: usize = 256;
/// ...or after this many rounds (the first sends everything).
const MAX_ROUNDS: u32 = 30;
/// Pages per 'P' message.
const BATCH: usize = 1024;
/// The largest JSON part the destination accepts.
const MAX_JSON: u32 = 64 << 20;

/// What the source tells the destination first.
#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    vireo: String,
    accel: hypervisor::AccelKind,
    memory_bytes: u64,
    vcpus: u32,
}

/// How a migration went (the answer to `vm.migrate-send`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationReport {
    pub destination: String,
    /// From connecting to the destination's acknowledgment.
    pub total_ms: u64,
    /// From pausing the guest to the destination's acknowledgment.
    pub downtime_ms: u64,
    /// The same in microseconds.
    pub downtime_us: u64,
    /// Bytes sent on the stream.
    pub bytes: u64,
    /// Memory rounds, the final (paused) one included.
    pub iterations: u32,
    /// Pages sent in all rounds, and in the final one.
    pub pages: u64,
    pub final_pages: u64,
    /// Bytes sent while the guest was paused (final pages and the state).
    pub final_bytes: u64,
}

/// How this VMM authenticates migrations and how long a receive may take
/// (set once by the binary from its command line).
#[derive(Debug, Clone)]
pub struct MigrationSettings {
    /// The shared key both ends hold; None: any source is accepted.
    pub key: Option<crate::auth::Key>,
    /// The whole stream must arrive within this, once accepted.
    pub receive_deadline: Duration,
    /// TLS certificates and CA; None: no TLS.
    pub tls: Option<Arc<crate::tls::MigrationTls>>,
}

impl Default for MigrationSettings {
    fn default() -> Self {
        MigrationSettings {
            key: None,
            receive_deadline: Duration::from_secs(3600),
            tls: None,
        }
    }
}

static SETTINGS: std::sync::RwLock<Option<MigrationSettings>> = std::sync::RwLock::new(None);

/// Set how migrations are authenticated and bounded in this process.
pub fn set_migration_settings(s: MigrationSettings) {
    *SETTINGS.write().unwrap_or_else(|e| e.into_inner()) = Some(s);
}

fn settings() -> MigrationSettings {
    SETTINGS
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or_default()
}

/// A stream read under an overall deadline and a per-read idle limit; a
/// timeout is an error that says which limit passed.
struct Deadline {
    stream: Channel,
    start: Instant,
    limit: Duration,
    idle: Duration,
}

impl Read for Deadline {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::io::{Error, ErrorKind};
        let overall = || {
            Error::new(
                ErrorKind::TimedOut,
                format!(
                    "the migration did not complete within {} s",
                    self.limit.as_secs()
                ),
            )
        };
        let left = self.limit.saturating_sub(self.start.elapsed());
        if left.is_zero() {
            return Err(overall());
        }
        self.stream
            .tcp()
            .set_read_timeout(Some(left.min(self.idle)))?;
        match self.stream.read(buf) {
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if self.start.elapsed() >= self.limit {
                    Err(overall())
                } else {
                    Err(Error::new(
                        ErrorKind::TimedOut,
                        format!("the source sent nothing for {} s", self.idle.as_secs()),
                    ))
                }
            }
            r => r,
        }
    }
}

fn io(what: &str) -> impl Fn(std::io::Error) -> VmmError + '_ {
    move |source| VmmError::Migration {
        what: format!("migration: {what}"),
        source,
    }
}

/// How a migration is sent.
#[derive(Debug, Clone, Default)]
pub struct SendOptions {
    /// At most this many bytes a second while the guest runs (pre-copy).
    /// The paused final round is never held back: downtime matters more.
    pub max_bandwidth: Option<u64>,
    /// Given up from another thread (`vm.migrate-cancel`).
    pub cancel: Cancel,
}

/// Cancels a migration from another thread: honoured until the source
/// sends the VM's state (after that the destination may already run it,
/// and the source must not run it too). Cancelling also shuts the stream,
/// so a source blocked on a slow destination notices at once.
#[derive(Debug, Clone, Default)]
pub struct Cancel {
    flag: Arc<AtomicBool>,
    stage: Arc<Mutex<Stage>>,
}

#[derive(Debug, Default)]
enum Stage {
    /// Not connected yet: a cancel is seen at the first check.
    #[default]
    Starting,
    /// The stream, to cut on cancel.
    Sending(TcpStream),
    /// The state is (being) sent: too late.
    Committed,
}

impl Cancel {
    pub fn cancel(&self) {
        let stage = self.stage.lock().unwrap_or_else(|e| e.into_inner());
        match &*stage {
            Stage::Starting => self.flag.store(true, Ordering::SeqCst),
            Stage::Sending(s) => {
                self.flag.store(true, Ordering::SeqCst);
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
            Stage::Committed => {}
        }
    }

    fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    fn arm(&self, stream: &TcpStream) -> Result<(), VmmError> {
        let clone = stream.try_clone().map_err(io("socket"))?;
        *self.stage.lock().unwrap_or_else(|e| e.into_inner()) = Stage::Sending(clone);
        cancelled(self)
    }

    /// Past this point a cancel changes nothing; fails if one came first.
    fn commit(&self) -> Result<(), VmmError> {
        *self.stage.lock().unwrap_or_else(|e| e.into_inner()) = Stage::Committed;
        cancelled(self)
    }
}

/// A writer that counts bytes and, with a limit, paces them.
struct Counted<W> {
    inner: W,
    bytes: u64,
    /// (bytes per second, when pacing began, bytes then).
    limit: Option<(u64, Instant, u64)>,
}

impl<W: Write> Counted<W> {
    fn new(inner: W, max_bandwidth: Option<u64>) -> Self {
        Counted {
            inner,
            bytes: 0,
            limit: max_bandwidth.map(|b| (b.max(1), Instant::now(), 0)),
        }
    }
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(b)?;
        self.bytes += n as u64;
        if let Some((rate, since, at)) = self.limit {
            // Sleep until the bytes so far fit the rate.
            let due = Duration::from_secs_f64((self.bytes - at) as f64 / rate as f64);
            let spent = since.elapsed();
            if due > spent + Duration::from_millis(1) {
                std::thread::sleep(due - spent);
            }
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// One bitmap per memory slot (region, in order).
type Dirty = Vec<Vec<u64>>;

fn all_pages(mem: &GuestRam) -> Dirty {
    mem.iter()
        .map(|r| {
            let pages = r.len().div_ceil(PAGE) as usize;
            let mut v = vec![u64::MAX; pages.div_ceil(64)];
            if !pages.is_multiple_of(64) {
                if let Some(last) = v.last_mut() {
                    *last = (1u64 << (pages % 64)) - 1;
                }
            }
            v
        })
        .collect()
}

/// Drop from `d` the pages of anonymous guest memory this process never
/// touched: they are zero here and on the destination, whose memory starts
/// zeroed. (Memory mapped from a snapshot's file is left alone: its
/// untouched pages hold the file's data.) Dirty logging must already be on,
/// so a page first touched after this look is still caught.
fn drop_untouched(mem: &GuestRam, d: &mut Dirty) {
    for (region, bits) in mem.iter().zip(d.iter_mut()) {
        let Ok(host) = region.get_host_address(vm_memory::MemoryRegionAddress(0)) else {
            continue;
        };
        if region.file_offset().is_some() || !(host as usize).is_multiple_of(PAGE as usize) {
            continue;
        }
        let Some(touched) = crate::snapshot::touched_pages(host as usize, region.len() as usize)
        else {
            continue;
        };
        for (i, t) in touched.iter().enumerate() {
            if !t {
                if let Some(w) = bits.get_mut(i / 64) {
                    *w &= !(1u64 << (i % 64));
                }
            }
        }
    }
}

fn count(d: &Dirty) -> usize {
    d.iter().flatten().map(|w| w.count_ones() as usize).sum()
}

fn collect(vm: &VmHandle) -> Result<Dirty, VmmError> {
    (0..vm.guest_memory().num_regions() as u32)
        .map(|slot| Ok(vm.backend().dirty_log(slot)?))
        .collect()
}

/// The pages written through vm-memory (by devices) since the last call;
/// clears the marks.
fn device_dirty(mem: &GuestRam) -> Dirty {
    mem.iter()
        .map(|r| r.deref().bitmap().get_and_reset())
        .collect()
}

/// What the backend's log and the devices' bitmap name since the last call.
fn collect_all(vm: &VmHandle) -> Result<Dirty, VmmError> {
    let mut d = collect(vm)?;
    merge(&mut d, device_dirty(vm.guest_memory()));
    Ok(d)
}

fn merge(into: &mut Dirty, from: Dirty) {
    for (a, b) in into.iter_mut().zip(from) {
        for (x, y) in a.iter_mut().zip(b) {
            *x |= y;
        }
    }
}

/// Send the pages a dirty set names; returns how many.
fn cancelled(cancel: &Cancel) -> Result<(), VmmError> {
    if cancel.is_set() {
        return Err(VmmError::MigrationCancelled);
    }
    Ok(())
}

fn send_pages<W: Write>(
    out: &mut Counted<W>,
    mem: &GuestRam,
    d: &Dirty,
    cancel: &Cancel,
    progress: &crate::counters::Progress,
) -> Result<u64, VmmError> {
    let mut batch: Vec<u64> = Vec::with_capacity(BATCH);
    let mut sent = 0u64;
    let mut buf = vec![0u8; PAGE as usize];
    let mut flush = |out: &mut Counted<W>, batch: &mut Vec<u64>| -> Result<(), VmmError> {
        if batch.is_empty() {
            return Ok(());
        }
        cancelled(cancel)?;
        out.write_all(b"P").map_err(io("send"))?;
        out.write_all(&(batch.len() as u32).to_le_bytes())
            .map_err(io("send"))?;
        for &gpa in batch.iter() {
            // The guest may be writing it right now: a torn copy is fine,
            // the write marks the page dirty for a later round.
            mem.read_slice(&mut buf, GuestAddress(gpa))
                .map_err(|e| VmmError::GuestMemory {
                    what: format!("migration: guest page {gpa:#x}"),
                    source: Box::new(e),
                })?;
            if is_zero(&buf) {
                out.write_all(&(gpa | ZERO_PAGE).to_le_bytes())
                    .map_err(io("send"))?;
            } else {
                out.write_all(&gpa.to_le_bytes()).map_err(io("send"))?;
                out.write_all(&buf).map_err(io("send"))?;
            }
        }
        progress.advance(batch.len() as u64 * PAGE, out.bytes);
        batch.clear();
        Ok(())
    };
    for (region, bits) in mem.iter().zip(d) {
        let base = region.start_addr().0;
        let pages = region.len().div_ceil(PAGE);
        for (w, &word) in bits.iter().enumerate() {
            let mut word = word;
            while word != 0 {
                let b = word.trailing_zeros() as u64;
                word &= word - 1;
                let page = w as u64 * 64 + b;
                if page >= pages {
                    break;
                }
                batch.push(base + page * PAGE);
                sent += 1;
                if batch.len() == BATCH {
                    flush(out, &mut batch)?;
                }
            }
        }
    }
    flush(out, &mut batch)?;
    Ok(sent)
}

/// Migrate a running (or paused) VM to a `vireo migrate-receive` at
/// `destination`. On success the VM stays paused here and the caller ends
/// this VMM; on failure the VM runs again (if it was running) and nothing
/// else changed.
pub fn send(
    vm: &VmHandle,
    destination: &str,
    config: Option<crate::VmConfig>,
    opts: &SendOptions,
) -> Result<MigrationReport, VmmError> {
    let control = vm.control();
    let was_running = control.state() == crate::RunState::Running;
    let (mut paused, mut unlocked) = (false, false);
    crate::events::migration_started(destination);
    let result = send_inner(
        vm,
        destination,
        config,
        opts,
        was_running,
        &mut paused,
        &mut unlocked,
    )
    .map_err(|e| match opts.cancel.is_set() {
        // The cut stream's own error says less.
        true => VmmError::MigrationCancelled,
        false => e,
    });
    let _ = vm.backend().stop_dirty_log();
    if result.is_err() && unlocked {
        // The destination may still be letting go of the disks.
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Err(e) = vm.set_disk_locks(true) {
            if Instant::now() >= deadline {
                tracing::warn!("migration failed and a disk lock cannot be taken back: {e}");
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    if result.is_err() && paused {
        vm.quiesce_devices(false);
        if was_running {
            if let Err(e) = control.resume() {
                tracing::warn!("migration failed and the VM cannot resume: {e}");
            }
        }
    }
    vm.progress().0.end();
    match &result {
        Ok(r) => crate::events::migration_ended(destination, None, r.bytes, r.total_ms),
        Err(e) => crate::events::migration_ended(destination, Some(&e.to_string()), 0, 0),
    }
    result
}

fn send_inner(
    vm: &VmHandle,
    destination: &str,
    config: Option<crate::VmConfig>,
    opts: &SendOptions,
    was_running: bool,
    paused: &mut bool,
    unlocked: &mut bool,
) -> Result<MigrationReport, VmmError> {
    vm.devices.check_saveable("migrate")?;
    let start = Instant::now();
    let addr = destination
        .to_socket_addrs()
        .map_err(|e| VmmError::Config(format!("migration destination {destination}: {e}")))?
        .next()
        .ok_or_else(|| {
            VmmError::Config(format!("migration destination {destination}: no address"))
        })?;
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).map_err(|source| {
        VmmError::Migration {
            what: format!("cannot connect to {destination}"),
            source,
        }
    })?;
    let _ = stream.set_nodelay(true);
    stream
        .set_write_timeout(Some(Duration::from_secs(60)))
        .map_err(io("socket"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(io("socket"))?;
    let mut greeted = stream.try_clone().map_err(io("socket"))?;
    // Armed first: a cancel also cuts a wait for a silent destination.
    opts.cancel.arm(&stream)?;
    greeted
        .set_read_timeout(Some(HANDSHAKE))
        .map_err(io("socket"))?;
    let (tls, tag) = answer_greeting(&mut greeted, destination)?;
    let reader = match tls {
        Some(config) => {
            let mut c = Channel::connect(stream, &config, destination, HANDSHAKE)?;
            let mut t = [0u8; 1];
            c.tcp()
                .set_read_timeout(Some(HANDSHAKE))
                .map_err(io("socket"))?;
            match c.read_exact(&mut t) {
                Ok(()) if t[0] == TLS_ACCEPTED => {}
                Ok(()) => {
                    return Err(VmmError::Destination(format!(
                        "migration: {destination} answered {:#x} after the TLS handshake, not 'T'",
                        t[0]
                    )))
                }
                // The destination's alert says why (an unknown CA, no
                // certificate, ...).
                Err(e) => {
                    return Err(crate::tls::TlsError::Handshake {
                        peer: destination.to_string(),
                        reason: format!("the destination turned this source away: {e}"),
                    }
                    .into())
                }
            }
            tracing::info!("migration: TLS session with {destination}");
            c
        }
        None => Channel::plain(stream).map_err(io("socket"))?,
    };
    reader
        .tcp()
        .set_read_timeout(Some(IDLE))
        .map_err(io("socket"))?;
    // A small buffer under a limit, so that pacing is smooth.
    let buffer = if opts.max_bandwidth.is_some() {
        64 << 10
    } else {
        1 << 20
    };
    let mut out = Counted::new(
        BufWriter::with_capacity(buffer, reader.clone()),
        opts.max_bandwidth,
    );
    let mem = vm.guest_memory();

    let hello = serde_json::to_vec(&Hello {
        vireo: env!("CARGO_PKG_VERSION").into(),
        accel: vm.accel(),
        memory_bytes: vm.memory_bytes(),
        vcpus: vm.vcpu_count(),
    })
    .map_err(|source| VmmError::Serialize {
        what: "migration".into(),
        source,
    })?;
    out.write_all(MAGIC).map_err(io("send"))?;
    out.write_all(&VERSION.to_le_bytes()).map_err(io("send"))?;
    if let Some(tag) = tag {
        out.write_all(&tag).map_err(io("send"))?;
    }
    out.write_all(&(hello.len() as u32).to_le_bytes())
        .map_err(io("send"))?;
    out.write_all(&hello).map_err(io("send"))?;

    // Pre-copy: everything, then what the guest wrote meanwhile.
    vm.backend().start_dirty_log()?;
    // Device writes from now on; the first round sends everything anyway.
    drop(device_dirty(mem));
    let mut pages = 0u64;
    let mut rounds = 0u32;
    let mut dirty = all_pages(mem);
    drop_untouched(mem, &mut dirty);
    let (progress, started) = vm.progress();
    let to_send = count(&dirty) as u64 * PAGE;
    progress.begin(started, crate::counters::Operation::Migration, to_send);
    if was_running {
        let mut round_start = Instant::now();
        loop {
            pages += send_pages(&mut out, mem, &dirty, &opts.cancel, progress)?;
            rounds += 1;
            out.flush().map_err(io("send"))?;
            dirty = collect_all(vm)?;
            let left = count(&dirty);
            let secs = round_start.elapsed().as_secs_f64().max(1e-3);
            round_start = Instant::now();
            let per_s = (left as f64 / secs) as u64;
            progress.round(Phase::Copy, left as u64 * PAGE, left as u64, per_s);
            tracing::info!("migration round {rounds}: {left} pages dirty");
            if left < SMALL_REMAINDER || rounds + 1 >= MAX_ROUNDS {
                break;
            }
        }
    }

    // Let the destination catch up before the guest stops.
    let mut reader = reader;
    out.write_all(b"Q").map_err(io("send"))?;
    out.flush().map_err(io("send"))?;
    let mut tag = [0u8; 1];
    reader
        .read_exact(&mut tag)
        .map_err(|source| VmmError::Migration {
            what: "migration: the destination stopped answering".into(),
            source,
        })?;
    if tag[0] != b'R' {
        return Err(VmmError::Destination(format!(
            "migration: the destination answered {:#x}, not 'R'",
            tag[0]
        )));
    }

    // Stop-and-copy, at full speed.
    cancelled(&opts.cancel)?;
    out.limit = None;
    // Downtime counts from asking the vCPUs to stop.
    let down = Instant::now();
    if was_running {
        vm.control().pause().map_err(VmmError::Pause)?;
    }
    *paused = true;
    let bytes_before_pause = out.bytes;
    tracing::debug!("migration: paused in {:?}", down.elapsed());
    vm.quiesce_devices(true);
    tracing::debug!("migration: devices quiesced at {:?}", down.elapsed());
    // The devices are stopped: their writes up to here are in the bitmap.
    merge(&mut dirty, collect_all(vm)?);
    let left = count(&dirty) as u64;
    progress.round(Phase::StopAndCopy, left * PAGE, left, 0);
    tracing::info!("migration: paused; {left} pages left to send");
    tracing::debug!("migration: dirty pages collected at {:?}", down.elapsed());
    let final_pages = send_pages(&mut out, mem, &dirty, &opts.cancel, progress)?;
    tracing::debug!("migration: final pages sent at {:?}", down.elapsed());
    pages += final_pages;
    rounds += 1;

    let (vcpu_states, vm_state, devices) = vm.save_states()?;
    tracing::debug!("migration: state saved at {:?}", down.elapsed());
    let mut ranges = Vec::new();
    let mut offset = 0;
    for r in mem.iter() {
        ranges.push(MemoryRange {
            gpa: r.start_addr().0,
            len: r.len(),
            file_offset: offset,
        });
        offset += r.len();
    }
    let (cpuid, tsc_khz) = vm.cpu_record();
    let manifest = Manifest {
        vireo: env!("CARGO_PKG_VERSION").into(),
        accel: vm.accel(),
        memory_bytes: vm.memory_bytes(),
        vcpus: vm.vcpu_count(),
        config,
        memory: ranges,
        memory_file_bytes: offset,
        vcpu_states,
        vm_state,
        devices,
        cpuid,
        tsc_khz,
    };
    let body = serde_json::to_vec(&manifest).map_err(|source| VmmError::Serialize {
        what: "migration".into(),
        source,
    })?;
    // Both processes may be on this host: let the destination open the
    // disks (their data is flushed; the queue workers are stopped).
    opts.cancel.commit()?;
    *unlocked = true;
    vm.set_disk_locks(false)?;
    out.write_all(b"S").map_err(io("send"))?;
    out.write_all(&(body.len() as u32).to_le_bytes())
        .map_err(io("send"))?;
    out.write_all(&body).map_err(io("send"))?;
    out.flush().map_err(io("send"))?;
    tracing::debug!("migration: state sent at {:?}", down.elapsed());
    tracing::info!(
        "migration: state sent ({} bytes), waiting for the destination",
        body.len()
    );

    reader
        .read_exact(&mut tag)
        .map_err(|source| VmmError::Migration {
            what: "migration: the destination did not acknowledge".into(),
            source,
        })?;
    match tag[0] {
        b'A' => {}
        b'N' => {
            let msg = read_json_bytes(&mut reader, 64 << 10)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_else(|e| e.to_string());
            return Err(VmmError::Destination(format!(
                "migration: the destination refused the VM: {msg}"
            )));
        }
        t => {
            return Err(VmmError::Destination(format!(
                "migration: the destination answered {t:#x}, not an acknowledgment"
            )))
        }
    }
    let report = MigrationReport {
        destination: destination.to_string(),
        total_ms: start.elapsed().as_millis() as u64,
        downtime_ms: down.elapsed().as_millis() as u64,
        downtime_us: down.elapsed().as_micros() as u64,
        bytes: out.bytes,
        iterations: rounds,
        pages,
        final_pages,
        final_bytes: out.bytes - bytes_before_pause,
    };
    tracing::info!("migration done: {report:?}");
    Ok(report)
}

fn read_u32<R: Read>(r: &mut R) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_json_bytes<R: Read>(r: &mut R, max: u32) -> Result<Vec<u8>, VmmError> {
    let len = read_u32(r).map_err(cut)?;
    if len > max {
        return Err(VmmError::MigrationStream(format!(
            "migration stream: a {len}-byte message (at most {max})"
        )));
    }
    let mut b = vec![0u8; len as usize];
    r.read_exact(&mut b).map_err(cut)?;
    Ok(b)
}

fn cut(e: std::io::Error) -> VmmError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        VmmError::MigrationCut
    } else if e.kind() == std::io::ErrorKind::TimedOut {
        // Deadline's own message says which limit passed.
        VmmError::MigrationStream(format!("migration stream: {e}"))
    } else {
        VmmError::Migration {
            what: "migration stream".into(),
            source: e,
        }
    }
}

/// What the destination received: the manifest and the filled memory.
pub struct Received {
    pub manifest: Manifest,
    pub memory: GuestRam,
    pub peer: String,
    /// To acknowledge (or refuse) once the VM is built.
    pub stream: Channel,
}

/// Called once the stream's header has said which accelerator made the
/// VM and its memory is allocated, while the pages still stream in.
pub type OnHello<'a> = &'a mut dyn FnMut(hypervisor::AccelKind, &GuestRam);

/// The TLS client settings to use (when the destination speaks TLS).
type TlsClient = Option<Arc<rustls::ClientConfig>>;

/// Read the destination's greeting: whether TLS follows (with the
/// settings to use), and the tag that answers its nonce when it demands
/// one.
fn answer_greeting(
    reader: &mut TcpStream,
    destination: &str,
) -> Result<(TlsClient, Option<[u8; crate::auth::TAG]>), VmmError> {
    let mut g = [0u8; 8 + 1 + 32];
    reader.read_exact(&mut g).map_err(|e| {
        VmmError::MigrationStream(format!(
            "{destination} did not greet as a Vireo migrate-receive of this version ({e})"
        ))
    })?;
    if &g[..8] != GREETING {
        return Err(VmmError::MigrationStream(format!(
            "{destination} is not a Vireo migrate-receive of this version"
        )));
    }
    let settings = settings();
    let client = settings.tls.as_ref().and_then(|t| t.client().cloned());
    let tls = match (g[8] & FLAG_TLS != 0, client) {
        (true, Some(c)) => Some(c),
        (true, None) => {
            return Err(VmmError::Config(format!(
                "the destination {destination} requires TLS: start this VMM with \
                 --migration-tls-ca (the CA that signed the destination's certificate)"
            )))
        }
        // Never a silent downgrade.
        (false, Some(_)) => {
            return Err(VmmError::Config(format!(
                "the destination {destination} does not offer TLS, and this VMM migrates only \
                 over TLS (it was given --migration-tls-ca): start the destination with \
                 --migration-tls-cert and --migration-tls-key"
            )))
        }
        (false, None) => None,
    };
    if g[8] & FLAG_KEY == 0 {
        return Ok((tls, None));
    }
    let Some(key) = settings.key else {
        return Err(VmmError::Config(format!(
            "the destination {destination} requires a migration key: start this VMM with \
             --migration-key-file (the destination's key)"
        )));
    };
    Ok((tls, Some(key.tag(&[TAG_CONTEXT, &g[9..]]))))
}

/// Wait on `listen` for one migration and read it to the end.
pub fn receive(listen: &str, on_hello: OnHello) -> Result<Received, VmmError> {
    let listener = TcpListener::bind(listen).map_err(|source| VmmError::Migration {
        what: format!("cannot listen on {listen}"),
        source,
    })?;
    let settings = settings();
    let tls = settings.tls.as_ref().and_then(|t| t.server().cloned());
    let mutual = settings.tls.as_ref().is_some_and(|t| t.mutual());
    if settings.key.is_none() && !mutual {
        tracing::warn!(
            "migration receive without --migration-key-file or --migration-tls-ca: any host that \
             reaches {listen} can send a VM"
        );
    }
    if tls.is_none() {
        tracing::warn!(
            "migration receive without --migration-tls-cert: the stream (guest memory) is not encrypted"
        );
    }
    tracing::info!("waiting for a migration on {listen}");
    let (stream, peer, hello) = loop {
        let (stream, peer) = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors and the like: wait, and go on waiting.
                tracing::warn!("migration: accept on {listen}: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        match handshake(
            stream,
            &peer.to_string(),
            settings.key.as_ref(),
            tls.as_ref(),
        ) {
            Ok((chan, hello)) => break (chan, peer, hello),
            Err(turned) => {
                let (e, chan) = *turned;
                tracing::warn!("migration: turned away {peer}: {e}");
                // A peer that failed the TLS handshake already has
                // rustls's alert; the others get the reason.
                if let Some(mut s) = chan {
                    let _ = s.tcp().set_write_timeout(Some(Duration::from_secs(1)));
                    let _ = answer(&mut s, &Err(e));
                }
            }
        }
    };
    drop(listener);
    tracing::info!(
        "migration from {peer}: accepted{}",
        if stream.is_tls() { " (TLS)" } else { "" }
    );
    let timed = Deadline {
        stream: stream.clone(),
        start: Instant::now(),
        limit: settings.receive_deadline,
        idle: IDLE,
    };
    let mut r = BufReader::with_capacity(1 << 20, timed);
    let mut w = stream.clone();
    let (manifest, memory) = read_body(&mut r, &mut w, hello, on_hello)?;
    Ok(Received {
        manifest,
        memory,
        peer: peer.to_string(),
        stream,
    })
}

/// Why a connection was turned away, and the channel to tell it on (none
/// when its TLS handshake failed).
type TurnedAway = Box<(VmmError, Option<Channel>)>;

/// Greet a new connection, run its TLS handshake when this destination
/// speaks TLS, and read its header, tag and hello, all within
/// [`HANDSHAKE`]: what a connection must get right to be taken for the
/// migration (anything else only turns it away).
fn handshake(
    stream: TcpStream,
    peer: &str,
    key: Option<&crate::auth::Key>,
    tls: Option<&Arc<rustls::ServerConfig>>,
) -> Result<(Channel, Hello), TurnedAway> {
    let start = Instant::now();
    let nonce = crate::auth::random::<32>();
    let mut greeting = GREETING.to_vec();
    greeting
        .push(if key.is_some() { FLAG_KEY } else { 0 } | if tls.is_some() { FLAG_TLS } else { 0 });
    greeting.extend_from_slice(&nonce);
    let plain = Channel::plain(stream).map_err(|e| Box::new((io("socket")(e), None)))?;
    let greet = |mut c: Channel| -> Result<Channel, VmmError> {
        c.tcp()
            .set_write_timeout(Some(HANDSHAKE))
            .map_err(io("socket"))?;
        c.write_all(&greeting).map_err(io("greeting"))?;
        Ok(c)
    };
    let plain = greet(plain.clone()).map_err(|e| Box::new((e, Some(plain))))?;
    let chan = match tls {
        None => plain,
        Some(config) => {
            let tcp = plain
                .tcp()
                .try_clone()
                .map_err(|e| Box::new((io("socket")(e), None)))?;
            let left = HANDSHAKE.saturating_sub(start.elapsed());
            let mut c =
                Channel::accept(tcp, config, peer, left).map_err(|e| Box::new((e.into(), None)))?;
            c.write_all(&[TLS_ACCEPTED])
                .and_then(|()| c.flush())
                .map_err(|e| Box::new((io("TLS")(e), None)))?;
            c
        }
    };
    let mut r = Deadline {
        stream: chan.clone(),
        start,
        limit: HANDSHAKE,
        idle: HANDSHAKE,
    };
    let hello = (|| {
        read_header(&mut r)?;
        if let Some(key) = key {
            let mut tag = [0u8; crate::auth::TAG];
            r.read_exact(&mut tag).map_err(cut)?;
            if !key.verify(&[TAG_CONTEXT, &nonce], &tag) {
                return Err(VmmError::MigrationStream(
                    "wrong migration key: the source's answer to the challenge does not match"
                        .into(),
                ));
            }
        }
        read_hello(&mut r)
    })()
    .map_err(|e| Box::new((e, Some(chan.clone()))))?;
    Ok((chan, hello))
}

/// Parse a migration stream: header, memory, state (with no greeting or
/// key: the part of the protocol that comes from the source).
pub fn read_stream<R: Read, W: Write>(
    r: &mut R,
    w: &mut W,
) -> Result<(Manifest, GuestRam), VmmError> {
    read_header(r)?;
    let hello = read_hello(r)?;
    read_body(r, w, hello, &mut |_, _| {})
}

fn read_header<R: Read>(r: &mut R) -> Result<(), VmmError> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).map_err(cut)?;
    if &magic != MAGIC {
        return Err(VmmError::MigrationStream(format!(
            "not a Vireo migration stream: it starts with {:02x?}, not \"VIREOMIG\"",
            magic
        )));
    }
    let version = read_u32(r).map_err(cut)?;
    if version != VERSION {
        return Err(VmmError::MigrationStream(format!(
            "migration stream version {version}; this Vireo reads version {VERSION}"
        )));
    }
    Ok(())
}

fn read_hello<R: Read>(r: &mut R) -> Result<Hello, VmmError> {
    let hello: Hello =
        serde_json::from_slice(&read_json_bytes(r, 64 << 10)?).map_err(|source| {
            VmmError::BadState {
                what: "migration stream: bad header".into(),
                source,
            }
        })?;
    // The limits a new VM is held to (vm.create's).
    if !hello.memory_bytes.is_multiple_of(PAGE)
        || crate::config::check_size(hello.memory_bytes, hello.vcpus).is_err()
    {
        return Err(VmmError::MigrationStream(format!(
            "migration stream: {} bytes of guest memory and {} vCPUs is not a VM Vireo runs",
            hello.memory_bytes, hello.vcpus
        )));
    }
    Ok(hello)
}

/// Memory and state, after the hello: allocates the memory the hello
/// announced and calls `on_hello` once it is.
fn read_body<R: Read, W: Write>(
    r: &mut R,
    w: &mut W,
    hello: Hello,
    on_hello: OnHello,
) -> Result<(Manifest, GuestRam), VmmError> {
    let memory = GuestRam::from_ranges(&arch::ram_regions(hello.memory_bytes)).map_err(|e| {
        VmmError::GuestMemory {
            what: format!(
                "cannot allocate {} MiB of guest memory",
                hello.memory_bytes >> 20
            ),
            source: Box::new(e),
        }
    })?;
    on_hello(hello.accel, &memory);
    loop {
        let mut tag = [0u8; 1];
        r.read_exact(&mut tag).map_err(cut)?;
        match tag[0] {
            b'P' => {
                let n = read_u32(r).map_err(cut)?;
                for _ in 0..n {
                    let mut a = [0u8; 8];
                    r.read_exact(&mut a).map_err(cut)?;
                    let a = u64::from_le_bytes(a);
                    let gpa = a & !(PAGE - 1);
                    if a & (PAGE - 1) & !ZERO_PAGE != 0 {
                        return Err(VmmError::MigrationStream(format!(
                            "migration stream: bad page address {a:#x}"
                        )));
                    }
                    let outside = || {
                        VmmError::MigrationStream(format!(
                            "migration stream: page {gpa:#x} is outside guest RAM"
                        ))
                    };
                    // The whole page inside one region (pages never straddle).
                    memory
                        .get_slice(GuestAddress(gpa), PAGE as usize)
                        .map_err(|_| outside())?;
                    let host = memory
                        .get_host_address(GuestAddress(gpa))
                        .map_err(|_| outside())?;
                    // SAFETY: 4 KiB of this process's anonymous guest
                    // memory, checked above to lie inside one region; no VM
                    // runs on it yet, so nothing else accesses it.
                    let page = unsafe { std::slice::from_raw_parts_mut(host, PAGE as usize) };
                    if a & ZERO_PAGE == 0 {
                        r.read_exact(page).map_err(cut)?;
                    } else if !is_zero(page) {
                        page.fill(0);
                    }
                }
            }
            b'Q' => {
                w.write_all(b"R")
                    .and_then(|()| w.flush())
                    .map_err(|source| VmmError::Migration {
                        what: "migration stream".into(),
                        source,
                    })?;
            }
            b'S' => {
                tracing::info!("migration: memory received, reading the VM's state");
                let body = read_json_bytes(r, MAX_JSON)?;
                let manifest: Manifest =
                    serde_json::from_slice(&body).map_err(|source| VmmError::BadState {
                        what: "migration stream: bad VM state".into(),
                        source,
                    })?;
                manifest.check()?;
                if manifest.memory_bytes != hello.memory_bytes || manifest.accel != hello.accel {
                    return Err(VmmError::MigrationStream(
                        "migration stream: the VM state contradicts its header".into(),
                    ));
                }
                return Ok((manifest, memory));
            }
            t => {
                return Err(VmmError::MigrationStream(format!(
                    "migration stream: unknown message {t:#04x}"
                )))
            }
        }
    }
}

/// Tell the source how building the VM went.
pub fn answer<W: Write>(stream: &mut W, result: &Result<(), VmmError>) -> Result<(), VmmError> {
    match result {
        Ok(()) => stream.write_all(b"A"),
        Err(e) => {
            let msg = e.to_string();
            let mut b = vec![b'N'];
            b.extend_from_slice(&(msg.len() as u32).to_le_bytes());
            b.extend_from_slice(msg.as_bytes());
            stream.write_all(&b)
        }
    }
    .and_then(|()| stream.flush())
    .map_err(io("acknowledge"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bandwidth_cap_paces_the_stream() {
        let start = Instant::now();
        let mut out = Counted::new(std::io::sink(), Some(8 << 20));
        for _ in 0..32 {
            out.write_all(&[0u8; 64 << 10]).unwrap();
        }
        // 2 MiB at 8 MiB/s: at least a quarter of a second.
        assert_eq!(out.bytes, 2 << 20);
        assert!(
            start.elapsed() >= Duration::from_millis(245),
            "{:?}",
            start.elapsed()
        );
        let start = Instant::now();
        let mut free = Counted::new(std::io::sink(), None);
        free.write_all(&[0u8; 1 << 20]).unwrap();
        assert!(start.elapsed() < Duration::from_millis(200));
    }

    #[test]
    fn a_cancel_after_commit_changes_nothing() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let s = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let c = Cancel::default();
        c.arm(&s).unwrap();
        c.commit().unwrap();
        c.cancel();
        assert!(!c.is_set());
        let c = Cancel::default();
        c.arm(&s).unwrap();
        c.cancel();
        assert!(c.is_set());
        assert!(c.commit().is_err());
    }

    #[test]
    fn a_bad_header_is_refused_clearly() {
        let e = read_stream(&mut &b"GET / HTTP/1.1\r\n\r\n"[..], &mut Vec::new())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("not a Vireo migration stream"), "{e}");
        let mut s = MAGIC.to_vec();
        s.extend_from_slice(&7u32.to_le_bytes());
        let e = read_stream(&mut &s[..], &mut Vec::new())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("version 7"), "{e}");
    }

    #[test]
    fn a_cut_stream_is_an_error() {
        let mut s = MAGIC.to_vec();
        s.extend_from_slice(&VERSION.to_le_bytes());
        let hello = br#"{"vireo":"x","accel":"emu","memory_bytes":16777216,"vcpus":1}"#;
        s.extend_from_slice(&(hello.len() as u32).to_le_bytes());
        s.extend_from_slice(hello);
        s.extend_from_slice(b"P");
        s.extend_from_slice(&2u32.to_le_bytes());
        s.extend_from_slice(&(0x1000u64 | ZERO_PAGE).to_le_bytes());
        s.extend_from_slice(&0x2000u64.to_le_bytes());
        s.extend_from_slice(&[7u8; 100]);
        let e = read_stream(&mut &s[..], &mut Vec::new())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("ended before"), "{e}");
    }

    #[test]
    fn device_writes_through_vm_memory_are_in_the_bitmap() {
        let mem = GuestRam::from_ranges(&[
            (GuestAddress(0), 70 * 4096),
            (GuestAddress(1 << 20), 8 * 4096),
        ])
        .unwrap();
        drop(device_dirty(&mem));
        mem.write_slice(&[1u8; 2], GuestAddress(5 * 4096 + 4095))
            .unwrap();
        mem.write_obj(7u16, GuestAddress(69 * 4096)).unwrap();
        mem.write_obj(7u32, GuestAddress((1 << 20) + 3 * 4096))
            .unwrap();
        let d = device_dirty(&mem);
        assert_eq!(d[0], vec![(1 << 5) | (1 << 6), 1 << (69 - 64)]);
        assert_eq!(d[1], vec![1 << 3]);
        // Taking the marks clears them; reads mark nothing.
        let _: u64 = mem.read_obj(GuestAddress(0)).unwrap();
        assert_eq!(count(&device_dirty(&mem)), 0);
    }

    #[test]
    fn dirty_sets_cover_exactly_the_pages() {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), 70 * 4096)]).unwrap();
        let d = all_pages(&mem);
        assert_eq!(count(&d), 70);
        let mut out = Counted::new(Vec::new(), None);
        mem.write_slice(&[1u8], GuestAddress(5 * 4096)).unwrap();
        let progress = crate::counters::Progress::default();
        assert_eq!(
            send_pages(&mut out, &mem, &d, &Cancel::default(), &progress).unwrap(),
            70
        );
        // 69 zero pages (8 bytes each), one full page, one 'P' header.
        assert_eq!(out.inner.len(), 5 + 70 * 8 + 4096);
        assert_eq!(progress.done(), (70 * 4096, out.bytes));
    }
}
