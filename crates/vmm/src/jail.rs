//! The jail: `vireo run --jail DIR --uid N --gid N [--netns PATH]` runs
//! the VMM as an unprivileged user, alone in new mount, PID, IPC and UTS
//! namespaces (and in a network namespace the user names), with `DIR` as
//! its root and no capabilities (docs/isolation.md, "The jail").
//!
//! Two steps, both run by the `vireo` binary's main thread before the VMM
//! starts any other thread:
//!
//! 1. [`prepare`] checks everything and changes nothing: root, `DIR` an
//!    existing directory other than `/`, `DIR/dev` absent or empty, uid
//!    and gid not 0, every file the configuration names inside `DIR`, no
//!    feature that needs a program or a file outside it (passt, a
//!    virtiofsd Vireo starts, a cloud-init seed in the host's temporary
//!    directory, a cgroup), the network namespace a namespace. It turns
//!    every host path under `DIR` into the path the jailed VMM sees (`DIR`
//!    stripped, so `DIR/disk.img` is `/disk.img`) and resolves `--accel
//!    auto` on the host, where the jail's missing `/sys` cannot mislead it.
//!    Firmware files outside `DIR` (the default SeaBIOS image, QEMU's
//!    option ROM for `--firmware --kernel`, both from Debian's packages)
//!    are the one exception to "everything inside": it reads them now, if
//!    the jailed uid/gid could read them, and leaves their contents to the
//!    VMM (`crate::firmware::preload`), which never opens them.
//! 2. [`enter`] closes every inherited descriptor but stdin, stdout and
//!    stderr, forks into a new PID namespace and, in the child (PID 1
//!    there): joins the network namespace, unshares the mount, IPC and UTS
//!    namespaces, makes every mount private, bind-mounts `DIR` on itself,
//!    mounts a small tmpfs on `DIR/dev` holding only the device nodes the
//!    VM needs (`kvm` under KVM, `net/tun` with a tap NIC; owned by the
//!    jailed user, mode 0600), pivots into `DIR` and detaches the old root,
//!    sets the resource limits, drops supplementary groups, gid, every
//!    capability (bounding, ambient, then effective/permitted/inheritable
//!    through the uid change, checked afterwards) and uid, and sets
//!    `no_new_privs` and a parent-death SIGKILL. The parent stays outside,
//!    forwards SIGINT/SIGTERM/SIGHUP/SIGQUIT and exits with the child's
//!    status.
//!
//! Invariants:
//! - Nothing on the host changes before [`prepare`] has accepted the whole
//!   configuration; afterwards the only change outside the jail's own
//!   namespaces is `DIR/dev` made (empty) when it did not exist.
//! - [`enter`] runs while the process has exactly one thread: namespaces
//!   and credentials are per thread, and `fork` copies only the caller.
//!   The seccomp filters are installed after it, so the jailed start-up
//!   runs under them as an unjailed one does.
//! - The jailed VMM never regains what it gave up: uid and gid non-zero,
//!   empty capability sets including the bounding set, `no_new_privs`.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicI32, Ordering};

use rustix::fs::{FileType, Mode, CWD};
use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};
use rustix::process::{Gid, Resource, Rlimit, Uid};
use rustix::thread::{LinkNameSpaceType, UnshareFlags};

use crate::config::{Accel, NetBackendKind, SerialMode, VmConfig};
use crate::launch::Servers;

/// RLIMIT_NOFILE in the jail unless `--jail-limits` says otherwise:
/// enough for many disks, NICs and API connections (Firecracker's jailer
/// uses the same figure).
pub const DEFAULT_NOFILE: u64 = 2048;
/// RLIMIT_NPROC in the jail: processes and threads of the jailed uid (a
/// VMM has about ten threads plus one per vCPU and per API connection).
pub const DEFAULT_NPROC: u64 = 512;

/// What `--jail` and its companions ask for.
#[derive(Debug, Clone)]
pub struct JailOptions {
    /// The directory that becomes the VMM's `/`.
    pub dir: PathBuf,
    pub uid: u32,
    pub gid: u32,
    /// A network namespace to join (`/var/run/netns/NAME`, `/proc/PID/ns/net`).
    pub netns: Option<PathBuf>,
    pub limits: JailLimits,
}

/// The resource limits of the jailed VMM (soft and hard alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JailLimits {
    /// RLIMIT_NOFILE: open descriptors.
    pub nofile: u64,
    /// RLIMIT_NPROC: processes and threads of the jailed uid.
    pub nproc: u64,
    /// RLIMIT_FSIZE: the largest file the VMM may write, in bytes (None:
    /// no limit). A write past it kills the VMM with SIGXFSZ.
    pub fsize: Option<u64>,
}

impl Default for JailLimits {
    fn default() -> Self {
        JailLimits {
            nofile: DEFAULT_NOFILE,
            nproc: DEFAULT_NPROC,
            fsize: None,
        }
    }
}

/// `nofile=N,nproc=N,fsize=SIZE`, any subset; the rest keep their defaults.
impl FromStr for JailLimits {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut l = JailLimits::default();
        for item in s.split(',').filter(|i| !i.is_empty()) {
            let (key, value) = item.split_once('=').ok_or_else(|| {
                format!("'{item}' is not KEY=VALUE (nofile=N, nproc=N, fsize=SIZE)")
            })?;
            let count = || -> Result<u64, String> {
                match value.parse::<u64>() {
                    Ok(n) if n > 0 => Ok(n),
                    _ => Err(format!("{key}={value}: a count of at least 1")),
                }
            };
            match key {
                "nofile" => l.nofile = count()?,
                "nproc" => l.nproc = count()?,
                "fsize" => l.fsize = Some(crate::config::MemSize::from_str(value)?.0),
                _ => return Err(format!("unknown limit '{key}' (nofile, nproc, fsize)")),
            }
        }
        Ok(l)
    }
}

/// Why the VMM cannot be jailed as asked. Every error before [`enter`]
/// comes from [`prepare`], which changes nothing.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("--jail needs root (to make namespaces, mount and change user); this process runs as uid {0}")]
    NotRoot(u32),
    #[error("--{0} 0: the jailed VMM must not run as root; give an unprivileged {0} (an account's, or an unused number)")]
    RootId(&'static str),
    #[error("the jail directory {0} does not exist (create it and put the VM's files in it)")]
    DirMissing(PathBuf),
    #[error("the jail directory {0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("the jail directory cannot be / (give a directory holding only the VM's files)")]
    DirIsRoot,
    #[error("{0} is not an empty directory: the jail's /dev is Vireo's to fill with the device nodes the VM needs (empty it, or remove it)")]
    DevNotEmpty(PathBuf),
    #[error("{what} {} is outside the jail {}: the jailed VMM sees only what is under it (hard-link, copy or bind-mount the file into it)", path.display(), dir.display())]
    Outside {
        what: String,
        path: PathBuf,
        dir: PathBuf,
    },
    #[error("{what} {}: {source}", path.display())]
    Missing {
        what: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{what} {} is outside the jail and the jailed user (uid {uid}, gid {gid}) may not read it: Vireo reads a firmware file from outside the jail only when that user could (make it readable, or put it in the jail)", path.display())]
    NotReadable {
        what: String,
        path: PathBuf,
        uid: u32,
        gid: u32,
    },
    #[error("{0} cannot be used with --jail: {1}")]
    Unsupported(&'static str, &'static str),
    #[error("--netns {}: {reason}", path.display())]
    Netns { path: PathBuf, reason: String },
    #[error("the jail needs the host's {} for {why}: {source}", path.display())]
    HostDevice {
        path: PathBuf,
        why: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot set up the jail: {step}: {source}")]
    Setup {
        step: String,
        #[source]
        source: io::Error,
    },
}

fn setup_err(step: impl Into<String>) -> impl FnOnce(rustix::io::Errno) -> JailError {
    let step = step.into();
    move |e| JailError::Setup {
        step,
        source: e.into(),
    }
}

/// A device node to make in the jail's `/dev`.
#[derive(Debug, Clone)]
struct Node {
    /// Below `/dev` (`kvm`, `net/tun`).
    name: String,
    rdev: u64,
}

/// A checked jail, ready to [`enter`].
#[derive(Debug)]
pub struct Jail {
    /// `DIR`, canonical.
    dir: PathBuf,
    uid: u32,
    gid: u32,
    netns: Option<PathBuf>,
    limits: JailLimits,
    nodes: Vec<Node>,
}

/// Which side of [`enter`]'s fork this process is on.
#[derive(Debug)]
pub enum Side {
    /// The jailed VMM: go on and run the VM.
    Inside,
    /// The parent, outside the jail, after the jailed VMM ended: exit
    /// with this status (the VMM's own, or 128 + the signal that ended it).
    Outside(i32),
}

/// Check `opts` against the VM's configuration (None: an empty VMM that
/// waits on its API) and the servers, and rewrite every host path in them
/// to the path the jailed VMM sees. Changes nothing on the host.
pub fn prepare(
    opts: &JailOptions,
    cfg: Option<&mut VmConfig>,
    servers: &mut Servers,
    cgroup: bool,
) -> Result<Jail, JailError> {
    let euid = rustix::process::geteuid().as_raw();
    if euid != 0 {
        return Err(JailError::NotRoot(euid));
    }
    if opts.uid == 0 {
        return Err(JailError::RootId("uid"));
    }
    if opts.gid == 0 {
        return Err(JailError::RootId("gid"));
    }
    let dir = match std::fs::canonicalize(&opts.dir) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(JailError::DirMissing(opts.dir.clone()))
        }
        Err(e) => {
            return Err(JailError::Missing {
                what: "the jail directory".into(),
                path: opts.dir.clone(),
                source: e,
            })
        }
    };
    if !dir.is_dir() {
        return Err(JailError::NotADirectory(opts.dir.clone()));
    }
    if dir == Path::new("/") {
        return Err(JailError::DirIsRoot);
    }
    let dev = dir.join("dev");
    match std::fs::symlink_metadata(&dev) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Ok(m) if m.is_dir() && std::fs::read_dir(&dev).is_ok_and(|mut d| d.next().is_none()) => {}
        _ => return Err(JailError::DevNotEmpty(dev)),
    }
    if cgroup {
        return Err(JailError::Unsupported(
            "--cgroup",
            "the jailed VMM's threads place themselves in the cgroup's sub-groups, which the jail does not show (run the jail inside a cgroup instead)",
        ));
    }
    if let Some(ns) = &opts.netns {
        check_netns(ns)?;
    }
    let jail = Jail {
        dir,
        uid: opts.uid,
        gid: opts.gid,
        netns: opts.netns.clone(),
        limits: opts.limits,
        nodes: Vec::new(),
    };
    let mut nodes = Vec::new();
    if let Some(sock) = &mut servers.api_socket {
        *sock = jail.made_inside("the API socket", sock)?;
    }
    if let Some(gdb) = &mut servers.gdb {
        if let crate::gdb::GdbAddr::Unix(p) = &mut gdb.addr {
            *p = jail.made_inside("the gdb socket", p)?;
        }
    }
    let kvm = match cfg {
        Some(cfg) => {
            jail.map_config(cfg)?;
            if cfg.nets.iter().any(|n| n.backend == NetBackendKind::Tap) {
                nodes.push(host_node("/dev/net/tun", "a tap NIC")?);
            }
            cfg.accel = crate::builder::resolve_accel(cfg.accel);
            cfg.accel == Accel::Kvm
        }
        // An empty VMM learns its VM later (`vireo create`): give it KVM
        // when the host has it, so that either accelerator works, and the
        // default firmware files when the host has them, so that a
        // firmware boot works too.
        None => {
            for (what, path) in [
                ("the firmware", crate::config::DEFAULT_FIRMWARE),
                ("QEMU's option ROM", crate::firmware::LINUXBOOT_ROM),
            ] {
                if let Err(e) = jail.firmware_file(what, Path::new(path)) {
                    tracing::debug!("not preloaded for the jail: {e}");
                }
            }
            hypervisor::kvm::kvm_available_at(crate::builder::kvm_device())
        }
    };
    if kvm {
        nodes.push(host_node(crate::builder::kvm_device(), "KVM")?);
    }
    Ok(Jail { nodes, ..jail })
}

/// A network namespace file: it opens and lives on nsfs.
fn check_netns(path: &Path) -> Result<(), JailError> {
    let bad = |reason: String| JailError::Netns {
        path: path.to_path_buf(),
        reason,
    };
    let f = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let fs = rustix::fs::fstatfs(&f).map_err(|e| bad(e.to_string()))?;
    // NSFS_MAGIC: a /proc/PID/ns/* link or a bind mount of one.
    if fs.f_type as u64 != 0x6e73_6673 {
        return Err(bad(
            "not a namespace (give /var/run/netns/NAME or /proc/PID/ns/net)".into(),
        ));
    }
    Ok(())
}

/// The host's device node at `path` (to copy its device number), which
/// must be under /dev.
fn host_node(path: &str, why: &'static str) -> Result<Node, JailError> {
    let err = |source: io::Error| JailError::HostDevice {
        path: path.into(),
        why,
        source,
    };
    let name = path
        .strip_prefix("/dev/")
        .ok_or_else(|| err(io::Error::other("a device node outside /dev")))?;
    let st = rustix::fs::stat(path).map_err(|e| err(e.into()))?;
    if FileType::from_raw_mode(st.st_mode) != FileType::CharacterDevice {
        return Err(err(io::Error::other("not a character device")));
    }
    Ok(Node {
        name: name.into(),
        rdev: st.st_rdev,
    })
}

impl Jail {
    /// The jail directory (canonical).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the host path `canonical` (under the jail) is inside it.
    fn inside(&self, what: &str, given: &Path, canonical: &Path) -> Result<PathBuf, JailError> {
        match canonical.strip_prefix(&self.dir) {
            Ok(rel) => Ok(Path::new("/").join(rel)),
            Err(_) => Err(JailError::Outside {
                what: what.into(),
                path: given.to_path_buf(),
                dir: self.dir.clone(),
            }),
        }
    }

    /// An existing file the VMM opens.
    fn existing_inside(&self, what: &str, p: &Path) -> Result<PathBuf, JailError> {
        let c = std::fs::canonicalize(p).map_err(|source| JailError::Missing {
            what: what.into(),
            path: p.to_path_buf(),
            source,
        })?;
        self.inside(what, p, &c)
    }

    /// A file the VMM makes (a socket, a log): its directory must exist in
    /// the jail.
    fn made_inside(&self, what: &str, p: &Path) -> Result<PathBuf, JailError> {
        let name = p.file_name().ok_or_else(|| JailError::Missing {
            what: what.into(),
            path: p.to_path_buf(),
            source: io::Error::other("names no file"),
        })?;
        let parent = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let c = std::fs::canonicalize(parent).map_err(|source| JailError::Missing {
            what: format!("the directory of {what}"),
            path: parent.to_path_buf(),
            source,
        })?;
        Ok(self.inside(what, p, &c)?.join(name))
    }

    /// A firmware file the VM needs (the BIOS image, the option ROM). One
    /// in the jail is a file like the kernel: its path inside is returned.
    /// One outside is read now and kept for the VMM under the path given,
    /// which is returned unchanged, but only when the jailed uid/gid could
    /// read it (this process is root), and never through the jail: a path
    /// that passes through `DIR` (where the jailed user may have put a
    /// symlink) must end inside it.
    fn firmware_file(&self, what: &str, given: &Path) -> Result<PathBuf, JailError> {
        let missing = |source: io::Error| JailError::Missing {
            what: what.into(),
            path: given.to_path_buf(),
            source,
        };
        let canonical = std::fs::canonicalize(given).map_err(missing)?;
        if canonical.starts_with(&self.dir) {
            return self.inside(what, given, &canonical);
        }
        let absolute = std::path::absolute(given).map_err(missing)?;
        let through_jail = absolute
            .ancestors()
            .any(|a| std::fs::canonicalize(a).is_ok_and(|c| c.starts_with(&self.dir)));
        if through_jail {
            return Err(JailError::Outside {
                what: what.into(),
                path: given.to_path_buf(),
                dir: self.dir.clone(),
            });
        }
        use std::io::Read;
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&canonical)
            .map_err(missing)?;
        let meta = file.metadata().map_err(missing)?;
        if !meta.is_file() {
            return Err(missing(io::Error::other("not a file")));
        }
        let mode = meta.mode();
        let readable = if meta.uid() == self.uid {
            mode & 0o400 != 0
        } else if meta.gid() == self.gid {
            mode & 0o040 != 0
        } else {
            mode & 0o004 != 0
        };
        if !readable {
            return Err(JailError::NotReadable {
                what: what.into(),
                path: given.to_path_buf(),
                uid: self.uid,
                gid: self.gid,
            });
        }
        // No firmware file is larger (a BIOS image is at most 16 MiB).
        const MAX: u64 = 16 << 20;
        if meta.len() > MAX {
            return Err(missing(io::Error::other(
                "is larger than 16 MiB: not a firmware file",
            )));
        }
        let mut data = Vec::with_capacity(meta.len() as usize);
        file.by_ref()
            .take(MAX + 1)
            .read_to_end(&mut data)
            .map_err(missing)?;
        crate::firmware::preload(given, data);
        Ok(given.to_path_buf())
    }

    /// Every path of `cfg` to its place in the jail; features that need
    /// the host refused.
    fn map_config(&self, cfg: &mut VmConfig) -> Result<(), JailError> {
        if cfg.nets.iter().any(|n| n.backend == NetBackendKind::User) {
            return Err(JailError::Unsupported(
                "--net user",
                "it starts passt, a program outside the jail (use a tap made beforehand: ip tuntap add NAME mode tap user UID)",
            ));
        }
        if cfg.fs.iter().any(|f| f.dir.is_some()) {
            return Err(JailError::Unsupported(
                "--fs ...,dir=DIR",
                "it starts virtiofsd, a program outside the jail (start virtiofsd yourself and give --fs tag=NAME,socket=PATH in the jail)",
            ));
        }
        if cfg.cloud_init.is_some() {
            return Err(JailError::Unsupported(
                "--cloud-init",
                "its seed image is written to the host's temporary directory (make the seed disk yourself and give it as a --disk in the jail)",
            ));
        }
        if !cfg.kernel.as_os_str().is_empty() {
            cfg.kernel = self.existing_inside("the kernel", &cfg.kernel)?;
        }
        if let Some(i) = &mut cfg.initrd {
            *i = self.existing_inside("the initrd", i)?;
        }
        if let Some(f) = &mut cfg.firmware {
            let what = if f.as_os_str() == crate::config::DEFAULT_FIRMWARE {
                "the firmware (Debian's seabios package)"
            } else {
                "the firmware"
            };
            *f = self.firmware_file(what, f)?;
            if !cfg.kernel.as_os_str().is_empty() {
                // The option ROM that boots a kernel handed to the firmware.
                self.firmware_file(
                    "QEMU's option ROM for --firmware --kernel (Debian's qemu-system-data package)",
                    Path::new(crate::firmware::LINUXBOOT_ROM),
                )?;
            }
        }
        for (n, d) in cfg.disks.iter_mut().enumerate() {
            d.path = self.existing_inside(&format!("disk {n}"), &d.path)?;
        }
        for f in &mut cfg.fs {
            if let Some(s) = &mut f.socket {
                *s = self.existing_inside(&format!("the virtio-fs socket of tag {}", f.tag), s)?;
            }
        }
        if let Some(v) = &mut cfg.vsock {
            v.socket = self.made_inside("the vsock socket", &v.socket)?;
        }
        if let SerialMode::File(p) = &mut cfg.serial {
            *p = self.made_inside("the serial log", p)?;
        }
        Ok(())
    }
}

/// The jailed VMM's host PID, for the parent's signal forwarding.
static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward_signal(sig: libc::c_int) {
    let pid = CHILD.load(Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

/// The jailed VMM is its PID namespace's init, which the kernel gives no
/// default action for signals: without a handler SIGTERM would be
/// ignored. End as the default action would (the console may replace
/// this with its own handler, which also restores the terminal).
extern "C" fn end_on_signal(sig: libc::c_int) {
    let msg = b"\r\nvireo: killed by a signal\n";
    // SAFETY: write and _exit are async-signal-safe.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(128 + sig);
    }
}

const ENDING_SIGNALS: [libc::c_int; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

fn handle_signals(handler: extern "C" fn(libc::c_int)) {
    for sig in ENDING_SIGNALS {
        // SAFETY: the handlers make only async-signal-safe calls.
        unsafe { libc::signal(sig, handler as *const () as libc::sighandler_t) };
    }
}

/// Enter the jail `prepare` checked: see the module docs. Must be called
/// while the process has one thread.
pub fn enter(jail: Jail) -> Result<Side, JailError> {
    close_inherited()?;
    // SAFETY: the process has one thread (the caller's contract), so no
    // other thread can see the descriptor table or namespaces change.
    unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWPID) }
        .map_err(setup_err("unshare a PID namespace"))?;
    // SAFETY: one thread, so the child is a whole copy of the process.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(JailError::Setup {
            step: "fork the jailed VMM".into(),
            source: io::Error::last_os_error(),
        });
    }
    if pid > 0 {
        CHILD.store(pid, Ordering::Relaxed);
        handle_signals(forward_signal);
        return Ok(Side::Outside(wait_for(pid)));
    }
    jail.set_up_child()?;
    Ok(Side::Inside)
}

/// Close every descriptor but 0, 1 and 2.
fn close_inherited() -> Result<(), JailError> {
    // SAFETY: close_range only closes descriptors; nothing of ours is
    // open yet besides stdio.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if rc != 0 {
        return Err(JailError::Setup {
            step: "close inherited descriptors".into(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// The jailed VMM's status as a shell reports it.
fn wait_for(pid: libc::pid_t) -> i32 {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes only `status`.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        if rc == pid {
            if libc::WIFEXITED(status) {
                return libc::WEXITSTATUS(status);
            }
            if libc::WIFSIGNALED(status) {
                return 128 + libc::WTERMSIG(status);
            }
        } else if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return crate::exit_code::VMM_ERROR;
        }
    }
}

impl Jail {
    /// In the forked child: namespaces, the new root, limits, credentials.
    fn set_up_child(&self) -> Result<(), JailError> {
        if let Some(path) = &self.netns {
            let fd: OwnedFd = std::fs::File::open(path)
                .map_err(|e| JailError::Netns {
                    path: path.clone(),
                    reason: e.to_string(),
                })?
                .into();
            rustix::thread::move_into_link_name_space(fd.as_fd(), Some(LinkNameSpaceType::Network))
                .map_err(|e| JailError::Netns {
                    path: path.clone(),
                    reason: format!("cannot join it: {e}"),
                })?;
        }
        // SAFETY: one thread (see `enter`).
        unsafe {
            rustix::thread::unshare_unsafe(
                UnshareFlags::NEWNS | UnshareFlags::NEWIPC | UnshareFlags::NEWUTS,
            )
        }
        .map_err(setup_err("unshare the mount, IPC and UTS namespaces"))?;
        // Nothing mounted from here on reaches the host, nor the other way.
        rustix::mount::mount_change(
            "/",
            MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
        )
        .map_err(setup_err("make every mount private"))?;
        // pivot_root needs the new root to be a mount point.
        rustix::mount::mount_bind_recursive(&self.dir, &self.dir).map_err(setup_err(format!(
            "bind-mount {} on itself",
            self.dir.display()
        )))?;
        self.make_dev()?;
        rustix::process::chdir(&self.dir)
            .map_err(setup_err(format!("enter {}", self.dir.display())))?;
        // The old root ends up stacked on the new one and is detached at
        // once: no directory for it is needed in the jail.
        rustix::process::pivot_root(".", ".").map_err(setup_err("pivot_root into the jail"))?;
        rustix::mount::unmount(".", UnmountFlags::DETACH)
            .map_err(setup_err("detach the host's root"))?;
        rustix::process::chdir("/").map_err(setup_err("enter the jail's /"))?;
        self.set_limits()?;
        self.drop_privileges()?;
        // Credentials changed above, which clears the death signal: set now.
        rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
            .map_err(setup_err("set the parent-death signal"))?;
        handle_signals(end_on_signal);
        // vm.info lists the main thread by this process's TID, not the parent's.
        threads::register_after_fork(threads::Role::Main);
        Ok(())
    }

    /// A tmpfs on `DIR/dev` with the nodes the VM needs, owned by the
    /// jailed user.
    fn make_dev(&self) -> Result<(), JailError> {
        let dev = self.dir.join("dev");
        if !dev.exists() {
            std::fs::create_dir(&dev).map_err(|source| JailError::Setup {
                step: format!("make {}", dev.display()),
                source,
            })?;
        }
        rustix::mount::mount(
            "vireo-jail-dev",
            &dev,
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NOEXEC,
            Some(c"mode=0755,size=64k"),
        )
        .map_err(setup_err(format!("mount a tmpfs on {}", dev.display())))?;
        for node in &self.nodes {
            let path = dev.join(&node.name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|source| JailError::Setup {
                    step: format!("make {}", parent.display()),
                    source,
                })?;
            }
            rustix::fs::mknodat(
                CWD,
                &path,
                FileType::CharacterDevice,
                Mode::from_raw_mode(0o600),
                node.rdev,
            )
            .map_err(setup_err(format!(
                "make the device node {}",
                path.display()
            )))?;
            rustix::fs::chown(
                &path,
                Some(Uid::from_raw(self.uid)),
                Some(Gid::from_raw(self.gid)),
            )
            .map_err(setup_err(format!(
                "give {} to the jailed user",
                path.display()
            )))?;
        }
        Ok(())
    }

    fn set_limits(&self) -> Result<(), JailError> {
        let mut limits = vec![
            (Resource::Nofile, self.limits.nofile, "RLIMIT_NOFILE"),
            (Resource::Nproc, self.limits.nproc, "RLIMIT_NPROC"),
        ];
        if let Some(f) = self.limits.fsize {
            limits.push((Resource::Fsize, f, "RLIMIT_FSIZE"));
        }
        for (res, n, name) in limits {
            rustix::process::setrlimit(
                res,
                Rlimit {
                    current: Some(n),
                    maximum: Some(n),
                },
            )
            .map_err(setup_err(format!("set {name} to {n}")))?;
        }
        Ok(())
    }

    /// Groups, gid, capabilities, uid, in the order each step still has
    /// the capability the next needs; then checked.
    fn drop_privileges(&self) -> Result<(), JailError> {
        // The rustix calls act on this thread only: the process has one.
        rustix::thread::set_thread_groups(&[])
            .map_err(setup_err("drop the supplementary groups"))?;
        let gid = Gid::from_raw(self.gid);
        rustix::thread::set_thread_res_gid(gid, gid, gid)
            .map_err(setup_err(format!("change to gid {}", self.gid)))?;
        // The bounding set, so that no later execve could give any back
        // (no_new_privs forbids that too); every capability the kernel
        // knows, up to the first number it rejects.
        for cap in 0..64 {
            // SAFETY: PR_CAPBSET_DROP takes a capability number only.
            let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
            if rc != 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINVAL) && cap > 0 {
                    break;
                }
                return Err(JailError::Setup {
                    step: format!("drop capability {cap} from the bounding set"),
                    source: e,
                });
            }
        }
        rustix::thread::clear_ambient_capability_set()
            .map_err(setup_err("clear the ambient capabilities"))?;
        let uid = Uid::from_raw(self.uid);
        // Without SECBIT_KEEP_CAPS this empties the permitted and
        // effective sets.
        rustix::thread::set_thread_res_uid(uid, uid, uid)
            .map_err(setup_err(format!("change to uid {}", self.uid)))?;
        let none = rustix::thread::CapabilitySet::empty();
        rustix::thread::set_capabilities(
            None,
            rustix::thread::CapabilitySets {
                effective: none,
                permitted: none,
                inheritable: none,
            },
        )
        .map_err(setup_err("clear the capability sets"))?;
        let left =
            rustix::thread::capabilities(None).map_err(setup_err("read the capabilities"))?;
        if !left.effective.is_empty() || !left.permitted.is_empty() || !left.inheritable.is_empty()
        {
            return Err(JailError::Setup {
                step: "drop every capability".into(),
                source: io::Error::other(format!("{left:?} remain")),
            });
        }
        if rustix::process::getuid() != uid || rustix::process::getgid() != gid {
            return Err(JailError::Setup {
                step: "change user".into(),
                source: io::Error::other("the ids did not change"),
            });
        }
        rustix::thread::set_no_new_privs(true).map_err(setup_err("set no_new_privs"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_parse_and_keep_defaults() {
        let l: JailLimits = "nofile=100".parse().unwrap();
        assert_eq!(l.nofile, 100);
        assert_eq!(l.nproc, DEFAULT_NPROC);
        assert_eq!(l.fsize, None);
        let l: JailLimits = "nproc=64,fsize=1G".parse().unwrap();
        assert_eq!((l.nproc, l.fsize), (64, Some(1 << 30)));
        assert!("nofile=0".parse::<JailLimits>().is_err());
        assert!("stack=1".parse::<JailLimits>().is_err());
        assert!("nofile".parse::<JailLimits>().is_err());
    }

    fn jail(dir: &Path) -> Jail {
        Jail {
            dir: dir.to_path_buf(),
            uid: 1000,
            gid: 1000,
            netns: None,
            limits: JailLimits::default(),
            nodes: Vec::new(),
        }
    }

    #[test]
    fn paths_map_into_the_jail_and_outside_ones_are_refused() {
        let base = std::env::temp_dir().join(format!("vireo-jail-unit-{}", std::process::id()));
        let dir = base.join("root");
        std::fs::create_dir_all(dir.join("img")).unwrap();
        std::fs::write(dir.join("img/k"), b"k").unwrap();
        std::fs::write(base.join("outside"), b"o").unwrap();
        let dir = std::fs::canonicalize(&dir).unwrap();
        let j = jail(&dir);
        assert_eq!(
            j.existing_inside("the kernel", &dir.join("img/k")).unwrap(),
            Path::new("/img/k")
        );
        assert_eq!(
            j.made_inside("the API socket", &dir.join("api.sock"))
                .unwrap(),
            Path::new("/api.sock")
        );
        // A way out through .. or a symlink is outside all the same.
        let err = j
            .existing_inside("disk 0", &dir.join("../outside"))
            .unwrap_err();
        assert!(matches!(err, JailError::Outside { .. }), "{err}");
        assert!(err.to_string().contains("is outside the jail"), "{err}");
        std::os::unix::fs::symlink(base.join("outside"), dir.join("link")).unwrap();
        assert!(matches!(
            j.existing_inside("disk 0", &dir.join("link")),
            Err(JailError::Outside { .. })
        ));
        let err = j.existing_inside("disk 0", &dir.join("nope")).unwrap_err();
        assert!(matches!(err, JailError::Missing { .. }), "{err}");
        assert!(matches!(
            j.made_inside("the API socket", &base.join("api.sock")),
            Err(JailError::Outside { .. })
        ));
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn firmware_files_outside_are_read_if_the_jailed_user_could() {
        use std::os::unix::fs::PermissionsExt;
        let base = std::env::temp_dir().join(format!("vireo-jail-fw-{}", std::process::id()));
        let dir = base.join("root");
        std::fs::create_dir_all(&dir).unwrap();
        let dir = std::fs::canonicalize(&dir).unwrap();
        let base = std::fs::canonicalize(&base).unwrap();
        // An id that owns none of these files.
        let j = Jail {
            uid: 59_999,
            gid: 59_999,
            ..jail(&dir)
        };
        let set_mode = |p: &Path, mode: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
        };
        // Outside and world-readable: read now, kept under the path given.
        let bios = base.join("bios.bin");
        std::fs::write(&bios, b"firmware").unwrap();
        set_mode(&bios, 0o644);
        assert_eq!(j.firmware_file("the firmware", &bios).unwrap(), bios);
        assert_eq!(crate::firmware::read_file(&bios).unwrap(), b"firmware");
        // Outside and readable only by its owner: refused.
        let private = base.join("private.bin");
        std::fs::write(&private, b"secret").unwrap();
        set_mode(&private, 0o600);
        let err = j.firmware_file("the firmware", &private).unwrap_err();
        assert!(matches!(err, JailError::NotReadable { .. }), "{err}");
        assert!(err.to_string().contains("uid 59999"), "{err}");
        // Inside: a file of the jail like the kernel.
        std::fs::write(dir.join("own.bin"), b"x").unwrap();
        assert_eq!(
            j.firmware_file("the firmware", &dir.join("own.bin"))
                .unwrap(),
            Path::new("/own.bin")
        );
        // Through the jail to outside (a symlink the jailed user could
        // have made): refused, even though the file is readable.
        std::os::unix::fs::symlink(&bios, dir.join("link.bin")).unwrap();
        let err = j
            .firmware_file("the firmware", &dir.join("link.bin"))
            .unwrap_err();
        assert!(matches!(err, JailError::Outside { .. }), "{err}");
        // Missing.
        let err = j
            .firmware_file("the firmware", &base.join("nope.bin"))
            .unwrap_err();
        assert!(matches!(err, JailError::Missing { .. }), "{err}");
        let _ = std::fs::remove_dir_all(&base);
    }
}
