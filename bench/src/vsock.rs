//! `bench vsock`: stream throughput over virtio-vsock, both ways, in the
//! Debian test guest. The guest's `vireo-io vsock-send` / `vsock-recv`
//! connect to the host (CID 2) and send or read for the test's seconds,
//! printing their own figures (guest clock); the host's end measures its
//! side of each connection.
//!
//! Vireo's host side is Unix sockets (`--vsock cid=3,socket=PATH`, the
//! host listens on `PATH_5000` and `PATH_5001`). QEMU has no such mode: its
//! peer is `vhost-vsock-pci`, whose host side is AF_VSOCK sockets through
//! the host kernel's vhost_vsock module. QEMU runs beside Vireo only where
//! that module is present (or loads); otherwise its column says why.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::guest::{Console, Guest, Vsock};
use super::io::{
    download_to, joined, measure_with, print_table, report_of, scratch_dir, upload_from, IoReport,
    Sample, Test, Unit,
};
use super::BenchArgs;

/// Guest to host (the guest sends), host to guest (the guest reads).
const UP_PORT: u32 = 5000;
const DOWN_PORT: u32 = 5001;

const VSOCK_TESTS: [Test; 2] = [
    Test {
        name: "vsock-send",
        label: "guest -> host MiB/s (vsock)",
        unit: Unit::MibPerSec,
    },
    Test {
        name: "vsock-recv",
        label: "host -> guest MiB/s (vsock)",
        unit: Unit::MibPerSec,
    },
];

/// Where the host's ends listen: Vireo's Unix sockets or the host's own
/// AF_VSOCK (for QEMU's vhost-vsock).
enum Listener {
    Unix(UnixListener),
    Vsock(OwnedFd),
}

impl Listener {
    fn unix(base: &Path, port: u32) -> Result<Listener> {
        let path = format!("{}_{port}", base.display());
        let l = UnixListener::bind(&path).with_context(|| format!("listening on {path}"))?;
        l.set_nonblocking(true)?;
        Ok(Listener::Unix(l))
    }

    /// An AF_VSOCK listener on `port` for any CID, non-blocking.
    fn vsock(port: u32) -> Result<Listener> {
        // SAFETY: plain socket(2); the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_VSOCK,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if fd < 0 {
            bail!("AF_VSOCK socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_vm is plain data; zeroed is a valid start.
        let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        a.svm_cid = libc::VMADDR_CID_ANY;
        a.svm_port = port;
        let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        // SAFETY: `a` is a valid sockaddr_vm of `len` bytes; `fd` is open.
        let ok = unsafe {
            libc::bind(fd.as_raw_fd(), &a as *const _ as *const libc::sockaddr, len) == 0
                && libc::listen(fd.as_raw_fd(), 4) == 0
        };
        if !ok {
            bail!("AF_VSOCK port {port}: {}", std::io::Error::last_os_error());
        }
        Ok(Listener::Vsock(fd))
    }

    /// One connection (a Unix or vsock stream socket: both are read and
    /// written with the same calls), or None once `stop` is set.
    fn accept(&self, stop: &AtomicBool) -> Result<Option<UnixStream>> {
        loop {
            let got = match self {
                Listener::Unix(l) => l.accept().map(|(s, _)| s),
                Listener::Vsock(fd) => {
                    // SAFETY: accept4 on our listening socket; no address wanted.
                    let s = unsafe {
                        libc::accept4(
                            fd.as_raw_fd(),
                            std::ptr::null_mut(),
                            std::ptr::null_mut(),
                            libc::SOCK_CLOEXEC,
                        )
                    };
                    if s < 0 {
                        Err(std::io::Error::last_os_error())
                    } else {
                        // SAFETY: `s` is a new connected socket we own;
                        // UnixStream only reads, writes and shuts it down.
                        Ok(unsafe { UnixStream::from_raw_fd(s) })
                    }
                }
            };
            match got {
                Ok(s) => {
                    s.set_nonblocking(false)?;
                    s.set_read_timeout(Some(Duration::from_secs(60)))?;
                    s.set_write_timeout(Some(Duration::from_secs(60)))?;
                    return Ok(Some(s));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if stop.load(Ordering::Relaxed) {
                        return Ok(None);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Whether QEMU's vhost-vsock can run here; why not otherwise.
fn qemu_vsock_unavailable() -> Option<String> {
    if Path::new("/dev/vhost-vsock").exists() {
        return None;
    }
    let loaded = Command::new("modprobe")
        .args(["-q", "vhost_vsock"])
        .status()
        .is_ok_and(|s| s.success());
    if loaded && Path::new("/dev/vhost-vsock").exists() {
        return None;
    }
    Some(
        "not measured: its vsock peer is vhost-vsock-pci, which needs the host's vhost_vsock \
         module (/dev/vhost-vsock), absent here and not loadable (modprobe vhost_vsock failed)"
            .into(),
    )
}

/// One guest: the host's ends listen, the VM runs the two transfers.
fn vsock_once(cmd: Command, g: &Guest, qemu: bool, secs: u64, limit: Duration) -> Result<IoReport> {
    let v = g.vsock.as_ref().context("the guest has no vsock")?;
    let (up, down) = if qemu {
        (Listener::vsock(UP_PORT)?, Listener::vsock(DOWN_PORT)?)
    } else {
        for p in [UP_PORT, DOWN_PORT] {
            let _ = std::fs::remove_file(format!("{}_{p}", v.socket.display()));
        }
        (
            Listener::unix(&v.socket, UP_PORT)?,
            Listener::unix(&v.socket, DOWN_PORT)?,
        )
    };
    let vm = Console::spawn(cmd)?;
    let stop = Arc::new(AtomicBool::new(false));
    let upload = {
        let stop = stop.clone();
        std::thread::spawn(move || -> Result<Option<Sample>> {
            match up.accept(&stop)? {
                Some(s) => upload_from(s),
                None => Ok(None),
            }
        })
    };
    let download = {
        let stop = stop.clone();
        std::thread::spawn(move || -> Result<Option<Sample>> {
            match down.accept(&stop)? {
                Some(s) => download_to(s, secs),
                None => Ok(None),
            }
        })
    };
    let finished = vm.finish(limit);
    stop.store(true, Ordering::Relaxed);
    let mut report = report_of(&finished)?;
    for (name, host) in [
        ("vsock-send", joined(upload)),
        ("vsock-recv", joined(download)),
    ] {
        match host {
            Ok(sample) => {
                if let Some(f) = report.figures.iter_mut().find(|f| f.name == name) {
                    f.host = sample;
                }
            }
            Err(e) => report
                .errors
                .push((name.into(), format!("host side: {e:#}"))),
        }
    }
    Ok(report)
}

/// `bench vsock`: virtio-vsock stream throughput both ways.
pub fn vsock(args: &BenchArgs, runs: usize) -> Result<()> {
    let secs = args.seconds;
    let cmd = format!("vireo-io vsock-send 2 {UP_PORT} {secs}; vireo-io vsock-recv 2 {DOWN_PORT}");
    let mut template = Guest::new(args.guest_dir.as_deref(), &cmd)?;
    let dir = scratch_dir("vsock")?;
    template.vsock = Some(Vsock {
        socket: dir.join("vsock.sock"),
        // A CID no other VM on this host is likely to hold.
        qemu_cid: 10_000 + std::process::id() % 50_000,
    });
    println!(
        "vsock: stream throughput over virtio-vsock (Vireo: --vsock, host side Unix sockets; QEMU: \
vhost-vsock-pci, host side AF_VSOCK), {secs} s per direction; MiB/s, median of {runs} runs"
    );
    println!(
        "     guest = vireo-io's figure on the guest's clock; host = the host's end of the connection"
    );
    let limit = args.timeout();
    let qemu = args.qemu.clone();
    let cols = measure_with(
        args,
        runs,
        qemu_vsock_unavailable(),
        &mut |_| template.clone(),
        &mut |g, cmd| {
            let is_qemu = cmd.get_program() == qemu.as_str();
            vsock_once(cmd, g, is_qemu, secs, limit)
        },
    );
    print_table(&VSOCK_TESTS, &cols, "host");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
