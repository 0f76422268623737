//! The Debian test guest (guest/build.sh) under Vireo and under QEMU with
//! the same kernel, initramfs, command line and devices, and its serial
//! console read line by line with the time each line reached the host.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The MAC both VMMs give the guest's NIC.
pub const GUEST_MAC: &str = "52:54:00:12:34:56";

/// How long a VMM may take to exit after the guest says it powers off.
pub const EXIT_GRACE: Duration = Duration::from_secs(30);

/// How guest code runs: Vireo's engine beside QEMU's TCG, or KVM in both.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Accel {
    /// `vireo --accel emu` beside `qemu -accel tcg`.
    Emu,
    /// `vireo --accel kvm` beside `qemu -accel kvm`.
    Kvm,
}

impl Accel {
    pub fn vireo(self) -> &'static str {
        match self {
            Accel::Emu => "emu",
            Accel::Kvm => "kvm",
        }
    }
    fn qemu(self) -> &'static str {
        match self {
            Accel::Emu => "tcg",
            Accel::Kvm => "kvm",
        }
    }
    /// Column titles for the two VMMs.
    pub fn names(self) -> [String; 2] {
        [
            format!("vireo --accel {}", self.vireo()),
            format!("qemu -accel {}", self.qemu()),
        ]
    }
}

/// A disk image for the guest's virtio-blk device.
#[derive(Clone)]
pub struct Disk {
    pub path: PathBuf,
    /// raw or qcow2.
    pub format: &'static str,
}

/// One guest: the images, the kernel command line and the devices.
#[derive(Clone)]
pub struct Guest {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub append: String,
    pub disk: Option<Disk>,
    /// A virtio-net NIC on this tap (created by the VMM).
    pub tap: Option<String>,
    /// vCPUs (QEMU: `-smp`, which under TCG runs one host thread per vCPU).
    pub cpus: u32,
    /// A virtio-net NIC on passt: Vireo's `--net user` (which starts its
    /// own passt), QEMU's `-netdev stream` on descriptor 3, which the
    /// caller connects to a passt it starts.
    pub user_net: bool,
    /// A virtio-vsock: Vireo's `--vsock cid=3,socket=PATH` (host side as
    /// Unix sockets), QEMU's `vhost-vsock-pci` with this guest CID (host
    /// side as AF_VSOCK sockets through the host's vhost_vsock).
    pub vsock: Option<Vsock>,
}

/// The guest's vsock device in both VMMs.
#[derive(Clone)]
pub struct Vsock {
    /// Vireo's Unix socket (host programs listen on `PATH_<port>`).
    pub socket: PathBuf,
    /// The guest CID QEMU's vhost-vsock gets (unique on the host).
    pub qemu_cid: u32,
}

impl Guest {
    /// The guest images in `dir` (or $VIREO_GUEST_DIR, or guest/out) running
    /// `cmd` in the initramfs (`vireo.cmd=`; no double quotes inside).
    pub fn new(dir: Option<&Path>, cmd: &str) -> Result<Guest> {
        let g = dir
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("VIREO_GUEST_DIR").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("guest/out"));
        let (kernel, initrd) = (g.join("vmlinuz"), g.join("initramfs.cpio.gz"));
        if !kernel.exists() || !initrd.exists() {
            bail!("no guest images in {} (run guest/build.sh)", g.display());
        }
        Ok(Guest {
            kernel,
            initrd,
            append: format!("console=ttyS0 quiet reboot=k panic=-1 vireo.cmd=\"{cmd}\""),
            disk: None,
            tap: None,
            cpus: 1,
            user_net: false,
            vsock: None,
        })
    }

    /// `vireo run` of the binary `vireo` for this guest.
    pub fn vireo(&self, vireo: &crate::Vireo, accel: Accel) -> Command {
        let mut c = vireo.command();
        c.args([
            "run",
            "--accel",
            accel.vireo(),
            "--memory",
            "512M",
            "--kernel",
        ])
        .arg(&self.kernel)
        .arg("--initrd")
        .arg(&self.initrd)
        .arg("--cmdline")
        .arg(&self.append);
        if self.cpus > 1 {
            c.arg("--cpus").arg(self.cpus.to_string());
        }
        if let Some(d) = &self.disk {
            c.arg("--disk")
                .arg(format!("path={},format={}", d.path.display(), d.format));
        }
        if let Some(tap) = &self.tap {
            c.arg("--net").arg(format!("tap={tap},mac={GUEST_MAC}"));
        }
        if self.user_net {
            c.arg("--net").arg(format!("user,mac={GUEST_MAC}"));
        }
        if let Some(v) = &self.vsock {
            c.arg("--vsock")
                .arg(format!("cid=3,socket={}", v.socket.display()));
        }
        c
    }

    /// The same guest under QEMU's PC machine: no default NIC, the disk on
    /// virtio-blk-pci with QEMU's default host cache (writeback, like
    /// Vireo's buffered image I/O), the NIC on virtio-net-pci with vhost off
    /// (the device in QEMU's userspace, as Vireo's is).
    pub fn qemu(&self, qemu: &str, accel: Accel) -> Command {
        let mut c = Command::new(qemu);
        c.args(["-accel", accel.qemu(), "-M", "pc", "-m", "512"])
            .args(["-nographic", "-no-reboot", "-nic", "none"])
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&self.initrd)
            .arg("-append")
            .arg(&self.append);
        if self.cpus > 1 {
            c.arg("-smp").arg(self.cpus.to_string());
        }
        if let Some(d) = &self.disk {
            c.arg("-drive")
                .arg(format!(
                    "file={},if=none,format={},id=d0",
                    d.path.display(),
                    d.format
                ))
                .args(["-device", "virtio-blk-pci,drive=d0"]);
        }
        if let Some(tap) = &self.tap {
            c.arg("-netdev")
                .arg(format!(
                    "tap,id=n0,ifname={tap},script=no,downscript=no,vhost=off"
                ))
                .arg("-device")
                .arg(format!("virtio-net-pci,netdev=n0,mac={GUEST_MAC}"));
        }
        if self.user_net {
            c.arg("-netdev")
                .arg("stream,id=n0,server=off,addr.type=fd,addr.str=3")
                .arg("-device")
                .arg(format!("virtio-net-pci,netdev=n0,mac={GUEST_MAC}"));
        }
        if let Some(v) = &self.vsock {
            c.arg("-device")
                .arg(format!("vhost-vsock-pci,guest-cid={}", v.qemu_cid));
        }
        c
    }
}

/// A VMM running a guest, its console lines arriving in the background.
pub struct Console {
    child: Child,
    lines: Receiver<(Instant, String, Option<u64>)>,
    stderr: std::thread::JoinHandle<String>,
    pub start: Instant,
}

/// What a guest printed, and how its VMM ended.
pub struct Finished {
    /// Console lines without line ends, each with the time it arrived.
    pub lines: Vec<(Instant, String)>,
    /// For each line of `lines`: the CPU time (ns, all its threads) the VMM
    /// process had used when the line arrived, read for `VIREO-` lines only
    /// (None for the others, or where the kernel would not say). Guest work
    /// between two such lines over the CPU time between them is a figure
    /// that does not depend on how much of the host the VMM got.
    pub cpu_ns: Vec<Option<u64>>,
    pub start: Instant,
    /// When the VMM exited (or was killed).
    pub end: Instant,
    pub status: Option<ExitStatus>,
    /// The VMM's peak resident set (KiB), from the kernel's accounting of
    /// the reaped process (`wait4`'s `ru_maxrss`); None if it was not reaped.
    pub peak_rss_kib: Option<u64>,
    /// Why the VMM was killed, if it was.
    pub hung: Option<String>,
    pub stderr: String,
}

impl Finished {
    /// Why the run did not end with the guest powering off, if it did not.
    pub fn failure(&self) -> Option<String> {
        let why = match (&self.hung, self.status) {
            (Some(h), _) => h.clone(),
            (None, Some(s)) if s.success() => return None,
            (None, Some(s)) => format!(
                "exit {}",
                s.code().map_or("by signal".into(), |c| c.to_string())
            ),
            (None, None) => "its exit status was lost".into(),
        };
        let err = self
            .stderr
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim();
        Some(if err.is_empty() {
            why
        } else {
            format!("{why}: {err}")
        })
    }
}

impl Console {
    pub fn spawn(mut cmd: Command) -> Result<Console> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let start = Instant::now();
        let mut child = cmd.spawn().context("spawning the VMM")?;
        let out = child.stdout.take().context("no stdout")?;
        let mut err = child.stderr.take().context("no stderr")?;
        let (tx, lines) = mpsc::channel();
        let cpu_clock = process_cpu_clock(child.id());
        std::thread::spawn(move || {
            let mut r = BufReader::new(out);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let at = Instant::now();
                        let text = String::from_utf8_lossy(&buf);
                        let line = text.trim_end_matches(['\r', '\n']).to_string();
                        let cpu = if line.contains("VIREO-") {
                            cpu_clock.and_then(cpu_time_ns)
                        } else {
                            None
                        };
                        if tx.send((at, line, cpu)).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = err.read_to_end(&mut s);
            String::from_utf8_lossy(&s).into_owned()
        });
        Ok(Console {
            child,
            lines,
            stderr,
            start,
        })
    }

    /// Whether the VMM has exited.
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
    }

    /// Collect the console until the VMM closes it, at most `limit` after
    /// the start, and at most [`EXIT_GRACE`] after the guest said it powers
    /// off (then kill the VMM).
    pub fn finish(mut self, limit: Duration) -> Finished {
        let mut deadline = self.start + limit;
        let mut lines: Vec<(Instant, String)> = Vec::new();
        let mut cpu_ns = Vec::new();
        let mut hung = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((at, line, cpu)) => {
                    if line.contains("VIREO-INIT: poweroff") || line.contains("VIREO-INIT: reboot")
                    {
                        deadline = deadline.min(at + EXIT_GRACE);
                    }
                    lines.push((at, line));
                    cpu_ns.push(cpu);
                }
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    hung = Some(if deadline < self.start + limit {
                        format!(
                            "the VMM did not exit within {} s of the guest's poweroff (killed)",
                            EXIT_GRACE.as_secs()
                        )
                    } else {
                        format!("timed out after {} s (killed)", limit.as_secs())
                    });
                    break;
                }
            }
        }
        let (status, peak_rss_kib) = match reap(self.child.id()) {
            Some((st, rss)) => (Some(st), Some(rss)),
            None => (self.child.wait().ok(), None),
        };
        let end = Instant::now();
        Finished {
            lines,
            cpu_ns,
            start: self.start,
            end,
            status,
            peak_rss_kib,
            hung,
            stderr: self.stderr.join().unwrap_or_default(),
        }
    }
}

/// The CPU-time clock of process `pid` (all its threads, exited ones
/// included), which any process of the same user may read.
fn process_cpu_clock(pid: u32) -> Option<libc::clockid_t> {
    let mut id: libc::clockid_t = 0;
    // SAFETY: id is a valid, writable local; the call only fills it in.
    let r = unsafe { libc::clock_getcpuclockid(pid as libc::pid_t, &mut id) };
    (r == 0).then_some(id)
}

/// The CPU time (ns) on a process's CPU-time clock, None once the process
/// is gone.
fn cpu_time_ns(clock: libc::clockid_t) -> Option<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable local for the call.
    let r = unsafe { libc::clock_gettime(clock, &mut ts) };
    (r == 0).then(|| ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// Wait for child `pid` with `wait4`, which also returns the peak resident
/// set of the process (`ru_maxrss`, KiB) that `Child::wait` cannot see.
/// None if the wait failed (the caller then waits the ordinary way).
fn reap(pid: u32) -> Option<(ExitStatus, u64)> {
    use std::os::unix::process::ExitStatusExt;
    let mut status: libc::c_int = 0;
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: status and usage are valid, writable locals for the call;
        // pid is our own child, not yet reaped (Child::wait was not called).
        let r = unsafe { libc::wait4(pid as libc::pid_t, &mut status, 0, &mut usage) };
        if r == pid as libc::pid_t {
            return Some((ExitStatus::from_raw(status), usage.ru_maxrss.max(0) as u64));
        }
        if r < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        return None;
    }
}

/// Whether `name --version` runs.
pub fn has_binary(name: &str) -> bool {
    Command::new(name)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}
