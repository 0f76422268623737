//! The jail (`vireo run --jail DIR --uid N --gid N`), end to end: a
//! jailed VMM runs as the given user with no capabilities, no_new_privs
//! and its seccomp filters, in namespaces of its own, sees only DIR, and
//! boots a Debian guest from files in it; the errors come before anything
//! changes; signals reach it through the process that stays outside.
//!
//! Making namespaces and changing user need root: without it each test
//! says SKIPPED and why (CI runs as root).

mod common;

use common::*;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The jailed user and group: a number no account needs to have.
const JAIL_ID: u32 = 59_999;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("SKIPPED: the jail needs root (namespaces, mounts, changing user)");
    }
    root
}

/// A fresh jail directory owned by the jailed user (its API socket is made
/// there), under a fresh parent for files that stay outside.
fn jail_dir(name: &str) -> (PathBuf, PathBuf) {
    let base = std::env::temp_dir().join(format!("vireo-jail-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let dir = base.join("root");
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(JAIL_ID), Some(JAIL_ID)).unwrap();
    (base, dir)
}

/// Hard-link (or copy, across file systems) the guest images into `dir`.
fn put_guest_in(dir: &Path) {
    let g = guest_dir();
    for f in ["vmlinux", "initramfs.cpio.gz"] {
        if std::fs::hard_link(g.join(f), dir.join(f)).is_err() {
            std::fs::copy(g.join(f), dir.join(f)).unwrap();
        }
    }
}

fn jailed(dir: &Path) -> Command {
    let mut c = vireo();
    c.args(["--seccomp", "on", "run", "--jail"]).arg(dir).args([
        "--uid",
        &JAIL_ID.to_string(),
        "--gid",
        &JAIL_ID.to_string(),
    ]);
    c
}

/// The jailed VMM: the child the `vireo` process outside forked.
fn jailed_pid(outside: u32) -> u32 {
    let mut pid = None;
    assert!(
        wait_until(Duration::from_secs(60), || {
            pid = std::fs::read_to_string(format!("/proc/{outside}/task/{outside}/children"))
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse().ok());
            pid.is_some()
        }),
        "vireo {outside} started no jailed VMM"
    );
    pid.unwrap()
}

/// A field of /proc/PID/status.
fn status(pid: u32, field: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn names(dir: impl AsRef<Path>) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn a_jailed_vmm_sees_only_its_jail_and_boots_debian() {
    if !is_root() {
        return;
    }
    let (base, dir) = jail_dir("boot");
    put_guest_in(&dir);
    let sock = dir.join("api.sock");
    // An empty VMM waiting on its API: the VM is given through it below,
    // first by a host path (which the jailed VMM must not see), then by
    // the paths inside the jail.
    let mut c = jailed(&dir);
    c.args(["--jail-limits", "nofile=1024,nproc=256"])
        .arg("--api-socket")
        .arg(&sock);
    let mut vm = Running::spawn(c);
    assert!(
        wait_until(Duration::from_secs(120), || sock.exists()),
        "no API socket: {}",
        vm.stderr_text()
    );
    let pid = jailed_pid(vm.child.id());

    // Who it runs as and what it may do.
    let id = JAIL_ID.to_string();
    assert_eq!(status(pid, "Uid"), [id.as_str(); 4].join(" "));
    assert_eq!(status(pid, "Gid"), [id.as_str(); 4].join(" "));
    assert_eq!(status(pid, "Groups"), "");
    for caps in ["CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"] {
        assert_eq!(status(pid, caps), "0000000000000000", "{caps}");
    }
    assert_eq!(status(pid, "NoNewPrivs"), "1");
    // PID 1 of its own PID namespace; its own mount, IPC and UTS namespaces.
    assert_eq!(status(pid, "NSpid"), format!("{pid} 1"));
    for ns in ["mnt", "pid", "ipc", "uts"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "the jailed VMM shares the {ns} namespace");
    }
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let limit = |name: &str| {
        limits
            .lines()
            .find(|l| l.starts_with(name))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    assert!(limit("Max open files").contains("1024 1024"), "{limits}");
    assert!(limit("Max processes").contains("256 256"), "{limits}");
    // Only stdio and what it opened itself (the API socket, eventfds...).
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    assert!(fds < 20, "{fds} descriptors open");

    // Its root is the jail: the files put there, its API socket, and a
    // /dev of its own with at most KVM's node in it (made for the empty
    // VMM when the host has KVM), owned by the jailed user.
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    assert_eq!(
        names(&root),
        ["api.sock", "dev", "initramfs.cpio.gz", "vmlinux"]
            .map(String::from)
            .into(),
        "the jailed VMM's / is not the jail"
    );
    let dev = names(root.join("dev"));
    assert!(
        dev.is_empty() || dev == BTreeSet::from(["kvm".to_string()]),
        "{dev:?}"
    );
    if !dev.is_empty() {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(root.join("dev/kvm")).unwrap();
        assert_eq!(
            (m.uid(), m.gid(), m.mode() & 0o777),
            (JAIL_ID, JAIL_ID, 0o600)
        );
    }
    // The host sees none of the jail's /dev.
    assert!(names(dir.join("dev")).is_empty());

    // Probed through the VMM itself: the kernel by its host path is a file
    // that exists, yet the jailed VMM says it does not.
    let host_kernel = dir.join("vmlinux");
    assert!(host_kernel.is_file());
    let out = vireo()
        .args(["create", "--accel", "emu", "--memory", "256M", "--kernel"])
        .arg(&host_kernel)
        .arg("--api-socket")
        .arg(&sock)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("kernel {} does not exist", host_kernel.display())),
        "{err}"
    );

    // By the paths inside the jail it boots, and the guest runs its command.
    let cmd = "echo JAILED-$((6*7)); sleep 600";
    let out = vireo()
        .args(["create", "--accel", "emu", "--memory", "256M"])
        .args(["--kernel", "/vmlinux", "--initrd", "/initramfs.cpio.gz"])
        .arg("--cmdline")
        .arg(format!(
            "console=ttyS0 reboot=k panic=1 quiet vireo.cmd=\"{cmd}\""
        ))
        .arg("--api-socket")
        .arg(&sock)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = client(&["boot"], &sock);
    assert!(out.status.success(), "{out:?}");
    assert!(
        vm.wait_for("JAILED-42", Duration::from_secs(900)),
        "the guest did not run its command: {}\n{}",
        vm.stdout_text(),
        vm.stderr_text()
    );
    assert_eq!(command_output(&vm.stdout_text()), ["JAILED-42"]);
    // With the VM running, every thread has its seccomp filter (the main
    // thread of an empty VMM takes its own once the VM is built).
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let tid = task.unwrap().file_name();
        let text =
            std::fs::read_to_string(format!("/proc/{pid}/task/{}/status", tid.to_string_lossy()))
                .unwrap_or_default();
        assert!(
            text.lines().any(|l| l == "Seccomp:\t2") || text.is_empty(),
            "thread {tid:?} has no seccomp filter: {text}"
        );
    }
    assert_eq!(status(pid, "Seccomp"), "2");
    let out = client(&["stop"], &sock);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        vm.wait_exit(Duration::from_secs(120)),
        Some(0),
        "{}",
        vm.stderr_text()
    );
    // Nothing of the jail's mounts is left on the host.
    assert!(names(dir.join("dev")).is_empty());
    let _ = std::fs::remove_dir_all(&base);
}

/// Debian's SeaBIOS and QEMU's option ROM, which a firmware boot reads
/// from the host even in a jail (scripts/install-deps.sh installs both).
const SEABIOS: &str = "/usr/share/seabios/bios-256k.bin";
const LINUXBOOT_ROM: &str = "/usr/share/qemu/linuxboot_dma.bin";

/// Real-mode code that writes `tag` to COM1 and ends the VM through the
/// exit device with 0x21 (status 67):
///
/// ```text
///   mov dx,0x3f8 ; mov al,TAG ; out dx,al
///   mov dx,0xf4 ; mov al,0x21 ; out dx,al
/// 1: hlt ; jmp 1b
/// ```
fn exit_code(tag: u8) -> [u8; 15] {
    [
        0xba, 0xf8, 0x03, 0xb0, tag, 0xee, 0xba, 0xf4, 0x00, 0xb0, 0x21, 0xee, 0xf4, 0xeb, 0xfd,
    ]
}

/// A stand-in bzImage for `--firmware --kernel`: a boot-protocol 2.12
/// header and one setup sector whose code (entered in real mode at
/// offset 0x200, where the option ROM jumps, and going on at 0x280) is
/// `exit_code`; 512 bytes of protected-mode part that never runs.
fn stand_in_bzimage(tag: u8) -> Vec<u8> {
    let mut k = vec![0u8; 3 * 512];
    k[0x1f1] = 1; // setup sectors after the boot sector
    k[0x1fe..0x200].copy_from_slice(&[0x55, 0xaa]);
    k[0x200..0x202].copy_from_slice(&[0xeb, 0x7e]); // jmp 0x280
    k[0x202..0x206].copy_from_slice(b"HdrS");
    k[0x206..0x208].copy_from_slice(&0x020cu16.to_le_bytes());
    k[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes()); // initrd_addr_max
    k[0x238..0x23c].copy_from_slice(&255u32.to_le_bytes()); // cmdline_size
    k[0x280..0x280 + 15].copy_from_slice(&exit_code(tag));
    k
}

/// A firmware boot in the jail, with the host's firmware files, which the
/// jail does not hold: SeaBIOS boots a disk in the jail (its boot sector
/// ends the VM through the exit device); and with `--firmware --kernel`,
/// QEMU's option ROM loads a kernel from the jail and runs its real-mode
/// setup code (a stand-in that does the same). Nothing is added to the
/// jail for either.
#[test]
fn a_jailed_vmm_boots_through_the_hosts_firmware() {
    if !is_root() {
        return;
    }
    for f in [SEABIOS, LINUXBOOT_ROM] {
        assert!(
            Path::new(f).is_file(),
            "{f} is missing: install Debian's seabios and qemu-system-data (scripts/install-deps.sh does)"
        );
    }
    let (base, dir) = jail_dir("firmware");
    let mut disk = vec![0u8; 1 << 20];
    disk[..15].copy_from_slice(&exit_code(b'D'));
    disk[510..512].copy_from_slice(&[0x55, 0xaa]);
    std::fs::write(dir.join("boot.img"), disk).unwrap();
    std::os::unix::fs::chown(dir.join("boot.img"), Some(JAIL_ID), Some(JAIL_ID)).unwrap();
    std::fs::write(dir.join("kernel"), stand_in_bzimage(b'K')).unwrap();
    let boot_disk = format!("path={}", dir.join("boot.img").display());
    let kernel = dir.join("kernel").to_string_lossy().into_owned();
    for (what, args, says) in [
        (
            "a disk through the default SeaBIOS",
            vec!["--disk", boot_disk.as_str()],
            "Booting from Hard Disk",
        ),
        (
            "a kernel through SeaBIOS and the option ROM",
            vec!["--firmware", "--kernel", kernel.as_str()],
            "Booting from ROM",
        ),
    ] {
        let mut c = jailed(&dir);
        c.args(["--accel", "emu", "--memory", "128M", "--exit-device"])
            .args(&args);
        let mut vm = Running::spawn(c);
        let code = vm.wait_exit(Duration::from_secs(300));
        let out = vm.stdout_text();
        assert_eq!(
            code,
            Some(67),
            "{what}: stdout: {out}\nstderr: {}",
            vm.stderr_text()
        );
        assert!(out.contains("SeaBIOS (version"), "{what}: {out}");
        assert!(out.contains(says), "{what}: {out}");
        let tag = if args[0] == "--disk" { "D" } else { "K" };
        assert!(
            out.rsplit(says)
                .next()
                .is_some_and(|rest| rest.contains(tag)),
            "{what}: the guest's code ran after the firmware: {out}"
        );
    }
    // The jail got no firmware file, and its /dev is gone from the host.
    assert_eq!(
        names(&dir),
        ["boot.img", "dev", "kernel"].map(String::from).into()
    );
    assert!(names(dir.join("dev")).is_empty());
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn jail_errors_come_before_anything_changes() {
    let (base, dir) = jail_dir("errors");
    std::fs::write(dir.join("k.elf"), b"not run").unwrap();
    std::fs::write(base.join("outside.img"), b"").unwrap();
    let kernel = dir.join("k.elf");
    let run = |jail: &Path, extra: &[&str]| {
        let mut c = vireo();
        c.args(["run", "--jail"])
            .arg(jail)
            .args(["--uid", "59999", "--gid", "59999", "--kernel"])
            .arg(&kernel)
            .args(extra);
        c.output().unwrap()
    };
    let fails_with = |out: std::process::Output, want: &str| {
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{want}: {err}");
        assert!(err.contains(want), "wanted '{want}' in: {err}");
    };
    if let Some(user) = unprivileged_user() {
        // Not root: said first (and this user may not even read DIR).
        let out = Command::new("runuser")
            .args(["-u", user, "--", env!("CARGO_BIN_EXE_vireo"), "run"])
            .arg("--jail")
            .arg(&dir)
            .args(["--uid", "59999", "--gid", "59999", "--kernel"])
            .arg(&kernel)
            .output()
            .unwrap();
        if out.status.code() == Some(126) || out.status.code() == Some(127) {
            eprintln!("SKIPPED (not root): {user} cannot run the test binary: {out:?}");
        } else {
            fails_with(out, "--jail needs root");
        }
    }
    if !is_root() {
        return;
    }
    let out = vireo()
        .args(["run", "--jail"])
        .arg(&dir)
        .args(["--uid", "0", "--gid", "59999", "--kernel"])
        .arg(&kernel)
        .output()
        .unwrap();
    fails_with(out, "--uid 0: the jailed VMM must not run as root");
    fails_with(
        run(&base.join("missing"), &[]),
        "does not exist (create it and put the VM's files in it)",
    );
    let outside = base.join("outside.img");
    fails_with(
        run(&dir, &["--disk", &format!("path={}", outside.display())]),
        &format!(
            "disk 0 {} is outside the jail {}",
            outside.display(),
            dir.display()
        ),
    );
    fails_with(
        run(
            &dir,
            &["--api-socket", &base.join("api.sock").to_string_lossy()],
        ),
        "the API socket",
    );
    fails_with(
        run(&dir, &["--net", "user"]),
        "--net user cannot be used with --jail",
    );
    fails_with(
        run(&dir, &["--netns", &dir.join("k.elf").to_string_lossy()]),
        "not a namespace",
    );
    // Nothing was made: no /dev in the jail yet.
    assert_eq!(names(&dir), BTreeSet::from(["k.elf".to_string()]));
    std::fs::create_dir(dir.join("dev")).unwrap();
    std::fs::write(dir.join("dev/stray"), b"").unwrap();
    fails_with(run(&dir, &[]), "dev is not an empty directory");
    // A usage error: --uid without --jail.
    let out = vireo()
        .args(["run", "--uid", "5", "--kernel"])
        .arg(&kernel)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let _ = std::fs::remove_dir_all(&base);
}

#[test]
fn signals_reach_the_jailed_vmm_through_the_process_outside() {
    if !is_root() {
        return;
    }
    for (signal, want_code) in [
        (libc::SIGTERM, Some(128 + libc::SIGTERM)),
        (libc::SIGKILL, None),
    ] {
        let (base, dir) = jail_dir(&format!("signal-{signal}"));
        let sock = dir.join("api.sock");
        let mut c = jailed(&dir);
        c.arg("--api-socket").arg(&sock);
        let mut vm = Running::spawn(c);
        assert!(
            wait_until(Duration::from_secs(120), || sock.exists()),
            "no API socket: {}",
            vm.stderr_text()
        );
        let outside = vm.child.id();
        let pid = jailed_pid(outside);
        // SAFETY: a signal to the child this test started.
        unsafe { libc::kill(outside as i32, signal) };
        let code = vm.wait_exit(Duration::from_secs(60));
        if let Some(want) = want_code {
            // Forwarded; the jailed VMM (its namespace's init, which has
            // no default action for SIGTERM) ends, and so does its parent.
            assert_eq!(code, Some(want), "{}", vm.stderr_text());
        }
        // SIGKILL cannot be forwarded: the parent-death signal ends it.
        assert!(
            wait_until(Duration::from_secs(30), || !Path::new(&format!(
                "/proc/{pid}/status"
            ))
            .exists()
                || status(pid, "State").starts_with('Z')),
            "the jailed VMM {pid} outlived its parent ({signal})"
        );
        let _ = std::fs::remove_dir_all(&base);
    }
}
