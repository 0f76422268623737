//! virtio-fs over vhost-user: the guest's FUSE requests are served by a
//! virtiofsd in its own process, which reads and writes the queues in
//! guest memory itself.
//!
//! Vireo is the vhost-user frontend (rust-vmm's `vhost` crate). At
//! creation it connects to the backend's Unix socket and checks the
//! features it offers; at DRIVER_OK the transport hands the device the
//! driver's queues ([`VirtioDevice::activate_external`]) and the device
//! gives the backend, in this order: the negotiated features, the guest
//! memory table (every region's memfd, so the backend can map it), and for
//! each queue its size, ring addresses, start index, call and kick
//! eventfds, then enables it. The kick eventfd is the queue's notify
//! eventfd itself: under KVM an ioeventfd and under the engine the
//! doorbell table signal it, so a guest notify reaches virtiofsd without
//! passing through Vireo. The backend signals a queue's call eventfd when
//! it has used buffers; one thread per device turns each into the queue's
//! interrupt (MSI-X or INTx through the transport), which both accelerators
//! take through `signal_msi`.
//!
//! virtiofsd writes the guest's read buffers from its own process, so
//! neither the VMM's page bitmap nor the engine (which must drop translated
//! code of a page a device overwrote) sees those writes. Before raising a
//! queue's interrupt the thread therefore reads what the backend put in the
//! used ring since the last call ([`UsedWatch`]) and marks each completed
//! chain's device-writable buffers, up to the length the backend reported,
//! as written by a device. The guest learns of a completion from that
//! interrupt, so it sees the data only after the mark; a driver already
//! polling the used ring may take a completion before the next call, but
//! a page it read that way holds file data, which runs as code only after
//! the guest maps it (the mark comes with the call that follows within
//! microseconds). A malformed chain is the driver's error, which the
//! backend refuses too; it is skipped here.
//!
//! Invariants: guest memory must be backed by shareable file descriptors
//! (the builder uses a memfd when the VM has a virtio-fs device); a
//! device reset takes the rings back from the backend (GET_VRING_BASE)
//! before the driver may set them up again. The backend's state (open
//! files, in-flight requests) lives in virtiofsd, so the device cannot be
//! snapshotted or migrated: saving it is refused with
//! [`PersistError::Unsupported`].
//!
//! [`Virtiofsd`] starts a virtiofsd for a host directory on a private
//! socket and stops it when dropped.

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hypervisor::GuestRam;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::features::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use crate::queue::walk_chain;
use crate::{
    ActivateError, DeviceState, ExternalQueue, PersistError, QueueWorker, VirtioDevice,
    VirtioInterrupt,
};

/// The longest tag the device's configuration space holds (bytes).
pub const TAG_MAX: usize = 36;
/// Queues: one high-priority queue and one request queue.
const NUM_QUEUES: usize = 2;
/// Entries per queue (virtiofsd's own limit is 1024 or more).
pub const QUEUE_SIZE: u16 = 1024;
/// How long a started virtiofsd may take to listen on its socket (the
/// machine may be busy; it normally takes milliseconds).
const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(30);

/// What went wrong setting up a virtio-fs device.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("virtio-fs tag '{tag}' is {len} bytes; at most {TAG_MAX}")]
    TagTooLong { tag: String, len: usize },
    #[error("virtio-fs tag is empty")]
    TagEmpty,
    #[error("cannot connect to the vhost-user socket {}: {source} (is virtiofsd listening there?)", socket.display())]
    Connect {
        socket: PathBuf,
        source: vhost::Error,
    },
    #[error("vhost-user backend at {}: {step} failed: {source}", socket.display())]
    Protocol {
        socket: PathBuf,
        step: &'static str,
        source: vhost::Error,
    },
    #[error("vhost-user backend at {} offers virtio features {offered:#x}, without {missing:#x} that Vireo needs (VERSION_1, INDIRECT_DESC, EVENT_IDX)", socket.display())]
    Features {
        socket: PathBuf,
        offered: u64,
        missing: u64,
    },
    #[error("virtiofsd not found (looked on PATH, in ~/.cargo/bin and /usr/libexec): install it with `cargo install virtiofsd` or name it with --virtiofsd PATH")]
    DaemonMissing,
    #[error("virtiofsd {} is not an executable file", .0.display())]
    DaemonNotExecutable(PathBuf),
    #[error("shared directory {}: {reason}", dir.display())]
    BadDir { dir: PathBuf, reason: String },
    #[error("cannot start virtiofsd {}: {source}", binary.display())]
    DaemonSpawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("virtiofsd {} for {} exited ({status}) before it listened on its socket; its messages are above", binary.display(), dir.display())]
    DaemonExited {
        binary: PathBuf,
        dir: PathBuf,
        status: std::process::ExitStatus,
    },
    #[error("virtiofsd {} for {} did not listen on {} within {}s", binary.display(), dir.display(), socket.display(), DAEMON_START_TIMEOUT.as_secs())]
    DaemonTimeout {
        binary: PathBuf,
        dir: PathBuf,
        socket: PathBuf,
    },
    #[error("private socket directory: {0}")]
    SocketDir(std::io::Error),
}

/// Check a tag before anything is started.
pub fn check_tag(tag: &str) -> Result<(), FsError> {
    if tag.is_empty() {
        return Err(FsError::TagEmpty);
    }
    if tag.len() > TAG_MAX {
        return Err(FsError::TagTooLong {
            tag: tag.into(),
            len: tag.len(),
        });
    }
    Ok(())
}

/// The features the transport always offers the driver; the backend must
/// offer them too, since it is the one walking the rings.
const RING_FEATURES: u64 =
    VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX;

/// The thread that turns the backend's call eventfds into interrupts and
/// notices the backend hanging up.
struct CallThread {
    kill: EventFd,
    thread: Option<threads::Handle<()>>,
}

impl CallThread {
    fn stop(&mut self) {
        let _ = self.kill.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for CallThread {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A virtio-fs device whose requests a vhost-user backend serves.
pub struct VhostUserFs {
    tag: String,
    socket: PathBuf,
    frontend: Frontend,
    backend_features: u64,
    mem: GuestRam,
    /// Queues handed to the backend (to take back at reset).
    started: Vec<usize>,
    calls: Option<CallThread>,
    /// A virtiofsd this device started, stopped after the connection.
    daemon: Option<Virtiofsd>,
}

impl VhostUserFs {
    /// Connect to the backend listening on `socket` and check what it
    /// offers. `mem` is the VM's guest memory, which must be memfd-backed.
    pub fn connect(tag: &str, socket: &Path, mem: GuestRam) -> Result<Self, FsError> {
        check_tag(tag)?;
        let frontend =
            Frontend::connect(socket, NUM_QUEUES as u64).map_err(|source| FsError::Connect {
                socket: socket.into(),
                source,
            })?;
        let step = |step: &'static str| {
            let socket = socket.to_path_buf();
            move |source| FsError::Protocol {
                socket,
                step,
                source,
            }
        };
        frontend.set_owner().map_err(step("SET_OWNER"))?;
        let offered = frontend.get_features().map_err(step("GET_FEATURES"))?;
        let missing = RING_FEATURES & !offered;
        if missing != 0 {
            return Err(FsError::Features {
                socket: socket.into(),
                offered,
                missing,
            });
        }
        let mut frontend = frontend;
        if offered & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let pf = frontend
                .get_protocol_features()
                .map_err(step("GET_PROTOCOL_FEATURES"))?;
            // Only what Vireo uses: several queues. No reply-ack, no
            // backend-initiated requests (DAX windows are not offered).
            frontend
                .set_protocol_features(pf & VhostUserProtocolFeatures::MQ)
                .map_err(step("SET_PROTOCOL_FEATURES"))?;
        }
        Ok(VhostUserFs {
            tag: tag.into(),
            socket: socket.into(),
            frontend,
            backend_features: offered,
            mem,
            started: Vec::new(),
            calls: None,
            daemon: None,
        })
    }

    /// Keep `daemon` (the virtiofsd this device talks to) until the device
    /// goes away.
    pub fn with_daemon(mut self, daemon: Virtiofsd) -> Self {
        self.daemon = Some(daemon);
        self
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Whether the backend was told that the rings start disabled
    /// (VHOST_USER_F_PROTOCOL_FEATURES): they are then enabled one by one.
    fn has_protocol_features(&self) -> bool {
        self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    fn memory_table(&self) -> Result<Vec<VhostUserMemoryRegionInfo>, String> {
        self.mem
            .iter()
            .map(|r| {
                VhostUserMemoryRegionInfo::from_guest_region(r).map_err(|_| {
                    format!(
                        "guest memory at {:#x} is not shareable (no memfd behind it)",
                        r.start_addr().0
                    )
                })
            })
            .collect()
    }

    fn host_address(&self, gpa: u64) -> Result<u64, String> {
        self.mem
            .get_host_address(GuestAddress(gpa))
            .map(|p| p as u64)
            .map_err(|e| format!("ring address {gpa:#x}: {e}"))
    }

    fn start(
        &mut self,
        features: u64,
        queues: &[ExternalQueue],
        irq: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), String> {
        let proto = self.has_protocol_features();
        let sock = self.socket.display().to_string();
        let fail = |step: &'static str| {
            let s = sock.clone();
            move |e: vhost::Error| format!("vhost-user backend at {s}: {step}: {e}")
        };
        let acked =
            features | (self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits());
        self.frontend
            .set_features(acked)
            .map_err(fail("SET_FEATURES"))?;
        let table = self.memory_table()?;
        self.frontend
            .set_mem_table(&table)
            .map_err(fail("SET_MEM_TABLE"))?;
        let mut calls = Vec::with_capacity(queues.len());
        for q in queues {
            let i = q.index;
            let call = EventFd::new(EFD_NONBLOCK).map_err(|e| format!("call eventfd: {e}"))?;
            let ring = VringConfigData {
                queue_max_size: QUEUE_SIZE,
                queue_size: q.cfg.size,
                flags: 0,
                desc_table_addr: self.host_address(q.cfg.desc_table)?,
                used_ring_addr: self.host_address(q.cfg.used_ring)?,
                avail_ring_addr: self.host_address(q.cfg.avail_ring)?,
                log_addr: None,
            };
            self.frontend
                .set_vring_num(i, q.cfg.size)
                .map_err(fail("SET_VRING_NUM"))?;
            self.frontend
                .set_vring_addr(i, &ring)
                .map_err(fail("SET_VRING_ADDR"))?;
            self.frontend
                .set_vring_base(i, 0)
                .map_err(fail("SET_VRING_BASE"))?;
            self.frontend
                .set_vring_call(i, &call)
                .map_err(fail("SET_VRING_CALL"))?;
            self.frontend
                .set_vring_kick(i, &q.kick)
                .map_err(fail("SET_VRING_KICK"))?;
            self.started.push(i);
            if proto {
                self.frontend
                    .set_vring_enable(i, true)
                    .map_err(fail("SET_VRING_ENABLE"))?;
            }
            calls.push((i, call, UsedWatch::new(self.mem.clone(), q, features)));
        }
        self.calls = Some(spawn_calls(
            calls,
            self.frontend.as_raw_fd(),
            irq,
            format!("virtio-fs '{}' ({})", self.tag, self.socket.display()),
        )?);
        Ok(())
    }

    /// Take the rings back from the backend (device reset).
    fn stop(&mut self) {
        if let Some(mut c) = self.calls.take() {
            c.stop();
        }
        let proto = self.has_protocol_features();
        for i in std::mem::take(&mut self.started) {
            if proto {
                let _ = self.frontend.set_vring_enable(i, false);
            }
            if let Err(e) = self.frontend.get_vring_base(i) {
                tracing::warn!(
                    "virtio-fs '{}': taking queue {i} back from the backend: {e}",
                    self.tag
                );
            }
        }
    }
}

/// One queue's used ring as the backend fills it: what was completed
/// since the last look, so its written buffers can be marked.
struct UsedWatch {
    mem: GuestRam,
    desc_table: GuestAddress,
    used_ring: GuestAddress,
    size: u16,
    indirect: bool,
    /// The used index up to which completions were marked.
    next: u16,
}

impl UsedWatch {
    fn new(mem: GuestRam, q: &ExternalQueue, features: u64) -> Self {
        UsedWatch {
            mem,
            desc_table: GuestAddress(q.cfg.desc_table),
            used_ring: GuestAddress(q.cfg.used_ring),
            size: q.cfg.size,
            indirect: features & VIRTIO_RING_F_INDIRECT_DESC != 0,
            next: 0,
        }
    }

    /// Mark the device-writable buffers of every chain the backend used
    /// since the last call, each up to its used length; returns how many
    /// completions were read. A used index more than the queue ahead, or
    /// unreadable, is the backend's or the driver's fault: nothing can be
    /// marked, so it is skipped (logged at debug).
    fn mark_completed(&mut self) -> u16 {
        let idx_at = self.used_ring.unchecked_add(2);
        let idx = match self.mem.load::<u16>(idx_at, Ordering::Acquire) {
            Ok(i) => i,
            Err(e) => {
                tracing::debug!("virtio-fs: used index at {:#x}: {e}", idx_at.0);
                return 0;
            }
        };
        let n = idx.wrapping_sub(self.next);
        if self.size == 0 || n > self.size {
            tracing::debug!(
                "virtio-fs: used index {idx} is {n} ahead of {} in a queue of {}",
                self.next,
                self.size
            );
            self.next = idx;
            return 0;
        }
        let mut slices = Vec::new();
        for k in 0..n {
            let slot = self.next.wrapping_add(k) % self.size;
            let at = self.used_ring.unchecked_add(4 + 8 * slot as u64);
            let (Ok(id), Ok(len)) = (
                self.mem.read_obj::<u32>(at),
                self.mem.read_obj::<u32>(at.unchecked_add(4)),
            ) else {
                continue;
            };
            let Ok(head) = u16::try_from(id) else {
                continue;
            };
            let walked = walk_chain(&self.mem, self.desc_table, self.size, head, self.indirect)
                .and_then(|chain| {
                    slices.clear();
                    chain.guest_slices(&self.mem, true, 0, len as u64, &mut slices)
                });
            match walked {
                Ok(_) => {
                    for piece in &slices {
                        piece.bitmap().mark_dirty(0, piece.len());
                    }
                }
                Err(e) => tracing::debug!("virtio-fs: used chain {head}: {e}"),
            }
        }
        self.next = idx;
        n
    }
}

/// Start the thread that raises queue `i`'s interrupt whenever the backend
/// signals its call eventfd (after marking what the backend wrote), and
/// reports the backend hanging up on `sock`.
fn spawn_calls(
    calls: Vec<(usize, EventFd, UsedWatch)>,
    sock: RawFd,
    irq: Arc<dyn VirtioInterrupt>,
    name: String,
) -> Result<CallThread, String> {
    let kill = EventFd::new(EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?;
    let kill2 = kill.try_clone().map_err(|e| format!("eventfd: {e}"))?;
    let mut calls = calls;
    let thread = threads::spawn(threads::Role::Helper("virtio-fs-irq".into()), move || {
        let n = calls.len();
        // Entries: kill, each call eventfd, then the socket, watched
        // for hang-up only (events 0: its replies are the frontend's
        // to read).
        let mut fds: Vec<libc::pollfd> = std::iter::once(kill2.as_raw_fd())
            .chain(calls.iter().map(|(_, e, _)| e.as_raw_fd()))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .chain(std::iter::once(libc::pollfd {
                fd: sock,
                events: 0,
                revents: 0,
            }))
            .collect();
        loop {
            // SAFETY: `fds` is a valid array of pollfd for its length.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if r < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!("{name}: poll: {}", std::io::Error::last_os_error());
                return;
            }
            if fds[0].revents != 0 {
                return;
            }
            for (k, (q, e, used)) in calls.iter_mut().enumerate() {
                if fds[k + 1].revents != 0 && e.read().is_ok() {
                    used.mark_completed();
                    irq.signal_queue(*q as u16);
                }
            }
            let s = &mut fds[n + 1];
            if s.fd >= 0 && s.revents & (libc::POLLHUP | libc::POLLERR) != 0 {
                tracing::error!(
                    "{name}: the vhost-user backend (virtiofsd) closed its connection; \
                         the guest's file system there stops answering"
                );
                // Keep raising what is already signalled; stop
                // watching the dead socket.
                s.fd = -1;
            }
        }
    })
    .map_err(|e| format!("cannot start the interrupt thread: {e}"))?;
    Ok(CallThread {
        kill,
        thread: Some(thread),
    })
}

impl VirtioDevice for VhostUserFs {
    fn device_type(&self) -> u32 {
        crate::device_type::FS
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; NUM_QUEUES]
    }

    /// No device-specific features (DAX and notifications are not offered).
    fn features(&self) -> u64 {
        0
    }

    fn config_len(&self) -> usize {
        TAG_MAX + 4
    }

    /// struct virtio_fs_config: the tag (NUL-padded) and the number of
    /// request queues.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut image = [0u8; TAG_MAX + 4];
        image[..self.tag.len()].copy_from_slice(self.tag.as_bytes());
        image[TAG_MAX..].copy_from_slice(&((NUM_QUEUES - 1) as u32).to_le_bytes());
        crate::read_config_image(&image, offset, data)
    }

    fn activate(
        &mut self,
        _features: u64,
        _mem: GuestRam,
        _interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<Box<dyn QueueWorker>, ActivateError> {
        Err(ActivateError::Failed(
            "virtio-fs queues are served by the vhost-user backend".into(),
        ))
    }

    fn external_queues(&self) -> bool {
        true
    }

    fn activate_external(
        &mut self,
        features: u64,
        queues: &[ExternalQueue],
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> Result<(), ActivateError> {
        self.start(features, queues, interrupt).map_err(|e| {
            self.stop();
            ActivateError::Failed(format!("virtio-fs '{}': {e}", self.tag))
        })
    }

    fn reset(&mut self) {
        self.stop();
    }

    fn save_state(&self) -> Result<DeviceState, PersistError> {
        Err(PersistError::Unsupported {
            device: format!(
                "virtio-fs '{}' (its state lives in the vhost-user backend, virtiofsd)",
                self.tag
            ),
        })
    }
}

impl Drop for VhostUserFs {
    fn drop(&mut self) {
        if let Some(mut c) = self.calls.take() {
            c.stop();
        }
    }
}

/// Find virtiofsd: `explicit` if given, else on PATH, in ~/.cargo/bin
/// (where `cargo install virtiofsd` puts it) or /usr/libexec (Debian's
/// package).
pub fn find_virtiofsd(explicit: Option<&Path>) -> Result<PathBuf, FsError> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if let Some(p) = explicit {
        return if executable(p) {
            Ok(p.into())
        } else {
            Err(FsError::DaemonNotExecutable(p.into()))
        };
    }
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let home = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin"));
    path_dirs
        .into_iter()
        .chain(home)
        .chain(std::iter::once(PathBuf::from("/usr/libexec")))
        .map(|d| d.join("virtiofsd"))
        .find(|p| executable(p))
        .ok_or(FsError::DaemonMissing)
}

/// A virtiofsd Vireo started for one shared directory, listening on a
/// socket in a private directory; killed (and the directory removed) when
/// dropped.
pub struct Virtiofsd {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
    socket_dir: PathBuf,
}

impl Virtiofsd {
    /// Start `binary` sharing `dir` and wait until it listens. As root it
    /// runs with virtiofsd's default sandbox (a mount namespace and
    /// seccomp); as another user with `--sandbox none`, since the
    /// namespace sandbox needs privileges such a user lacks (the daemon
    /// then has exactly that user's access to the host).
    pub fn start(binary: &Path, dir: &Path) -> Result<Self, FsError> {
        let meta = std::fs::metadata(dir).map_err(|e| FsError::BadDir {
            dir: dir.into(),
            reason: e.to_string(),
        })?;
        if !meta.is_dir() {
            return Err(FsError::BadDir {
                dir: dir.into(),
                reason: "not a directory".into(),
            });
        }
        let socket_dir = private_dir().map_err(FsError::SocketDir)?;
        let socket = socket_dir.join("virtiofsd.sock");
        let mut cmd = Command::new(binary);
        cmd.arg(format!("--socket-path={}", socket.display()))
            .arg(format!("--shared-dir={}", dir.display()))
            .arg("--log-level=error")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            cmd.arg("--sandbox=none");
        }
        let child = cmd.spawn().map_err(|source| {
            let _ = std::fs::remove_dir_all(&socket_dir);
            FsError::DaemonSpawn {
                binary: binary.into(),
                source,
            }
        })?;
        let mut d = Virtiofsd {
            child,
            dir: dir.into(),
            socket,
            socket_dir,
        };
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = d.child.try_wait() {
                return Err(FsError::DaemonExited {
                    binary: binary.into(),
                    dir: dir.into(),
                    status,
                });
            }
            // The socket file appears when virtiofsd listens on it.
            if d.socket.exists() {
                return Ok(d);
            }
            if started.elapsed() > DAEMON_START_TIMEOUT {
                return Err(FsError::DaemonTimeout {
                    binary: binary.into(),
                    dir: dir.into(),
                    socket: d.socket.clone(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        // virtiofsd leaves by itself once its frontend hangs up; kill it
        // in case it did not get that far.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.socket_dir);
    }
}

/// A new directory only this user can enter, for a daemon's socket.
fn private_dir() -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let p = base.join(format!("vireo-virtiofsd-{}-{n}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&p) {
            Ok(()) => return Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::tests::desc;
    use crate::queue::{VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
    use std::sync::Mutex;

    /// What a backend watching device writes (the engine) hears.
    #[derive(Default)]
    struct Heard(Mutex<Vec<(usize, usize)>>);
    impl hypervisor::DeviceWriteWatch for Heard {
        fn device_wrote(&self, offset: usize, len: usize) {
            self.0.lock().unwrap().push((offset, len));
        }
    }

    const TABLE: u64 = 0x1000;
    const USED: u64 = 0x3000;

    /// The backend's side: put `(id, len)` in used slot `slot`.
    fn used(m: &GuestRam, slot: u16, id: u32, len: u32) {
        let a = GuestAddress(USED + 4 + 8 * slot as u64);
        m.write_obj(id, a).unwrap();
        m.write_obj(len, a.unchecked_add(4)).unwrap();
    }

    #[test]
    fn completions_mark_what_the_backend_wrote_and_skip_what_is_malformed() {
        let m = GuestRam::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let heard = Arc::new(Heard::default());
        let region = m.iter().next().unwrap();
        assert!(std::ops::Deref::deref(region)
            .bitmap()
            .set_watch(heard.clone()));
        let mut w = UsedWatch {
            mem: m.clone(),
            desc_table: GuestAddress(TABLE),
            used_ring: GuestAddress(USED),
            size: 16,
            indirect: true,
            next: 0,
        };
        let idx = |i: u16| m.write_obj(i, GuestAddress(USED + 2)).unwrap();
        let take = |h: &Heard| std::mem::take(&mut *h.0.lock().unwrap());
        // The watch hears the test's own set-up writes too: forget those.
        let mark = |w: &mut UsedWatch| {
            take(&heard);
            w.mark_completed()
        };
        // Chain 3: a request header, then 8 KiB of reply of which the
        // backend filled 6 KiB.
        desc(&m, TABLE, 3, 0x8000, 40, VIRTQ_DESC_F_NEXT, 7);
        desc(&m, TABLE, 7, 0x9000, 0x2000, VIRTQ_DESC_F_WRITE, 0);
        // Chain 0: indirect, two writable buffers, the second one untouched.
        desc(&m, TABLE, 0, 0x4000, 48, VIRTQ_DESC_F_INDIRECT, 0);
        desc(&m, 0x4000, 0, 0x8100, 16, VIRTQ_DESC_F_NEXT, 1);
        desc(
            &m,
            0x4000,
            1,
            0xc000,
            0x100,
            VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
            2,
        );
        desc(&m, 0x4000, 2, 0xd000, 0x100, VIRTQ_DESC_F_WRITE, 0);
        used(&m, 0, 3, 0x1800);
        used(&m, 1, 0, 0x80);
        idx(2);
        assert_eq!(mark(&mut w), 2);
        assert_eq!(take(&heard), vec![(0x9000, 0x1800), (0xc000, 0x80)]);
        // Nothing new: nothing marked.
        assert_eq!(mark(&mut w), 0);
        assert!(take(&heard).is_empty());
        // A head outside the queue and a chain that loops are skipped; the
        // completion after them is still marked.
        used(&m, 2, 5000, 0x10);
        desc(
            &m,
            TABLE,
            9,
            0xe000,
            0x10,
            VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT,
            9,
        );
        used(&m, 3, 9, 0x10);
        used(&m, 4, 3, 0x10);
        idx(5);
        assert_eq!(mark(&mut w), 3);
        assert_eq!(take(&heard), vec![(0x9000, 0x10)]);
        // The index wraps past 65535.
        w.next = 0xffff;
        used(&m, 15, 3, 0x20);
        used(&m, 0, 3, 0x30);
        idx(1);
        assert_eq!(mark(&mut w), 2);
        assert_eq!(take(&heard), vec![(0x9000, 0x20), (0x9000, 0x30)]);
        // An index more than the queue ahead: nothing can be trusted.
        idx(1 + 17);
        assert_eq!(mark(&mut w), 0);
        assert!(take(&heard).is_empty());
        assert_eq!(w.next, 18);
    }

    #[test]
    fn tags_are_checked() {
        assert!(check_tag("share").is_ok());
        assert!(check_tag(&"x".repeat(TAG_MAX)).is_ok());
        let e = check_tag(&"x".repeat(TAG_MAX + 1)).unwrap_err();
        assert!(e.to_string().contains("at most 36"), "{e}");
        assert!(matches!(check_tag(""), Err(FsError::TagEmpty)));
    }

    #[test]
    fn connecting_to_nobody_names_the_socket() {
        let dir = std::env::temp_dir().join(format!("vireo-fs-test-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let sock = dir.join("nobody.sock");
        // A socket file nobody listens on any more.
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let e = VhostUserFs::connect("t", &sock, mem).err().unwrap();
        let msg = e.to_string();
        assert!(
            msg.contains("nobody.sock") && msg.contains("virtiofsd"),
            "{msg}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_missing_named_binary_is_refused() {
        let e = find_virtiofsd(Some(Path::new("/nonexistent/virtiofsd"))).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/virtiofsd"), "{e}");
    }
}
