//! virtio-fs (vhost-user, virtiofsd) with Debian's virtiofs driver.
//!
//! - `--fs tag=NAME,dir=DIR`, Vireo and therefore virtiofsd running as an
//!   unprivileged user: the guest mounts the tag, reads a 1 MiB host file
//!   (checksums compared), writes one the host then reads (bytes
//!   compared; owned by that user on the host), and `ls -ln` of a tree
//!   (files of several sizes and modes, a subdirectory) matches the host's
//!   own listing.
//! - `--fs tag=NAME,socket=PATH` to a virtiofsd the test started: the guest
//!   reads a file through it; a snapshot of that VM is refused, naming the
//!   device.
//! - Bad input: a missing virtiofsd, a socket nobody listens on, a tag that
//!   is too long: each a clear error before any guest runs.
//!
//! The guest runs under `VIREO_TEST_ACCEL` (the engine by default).

mod common;

use common::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn accel() -> String {
    std::env::var("VIREO_TEST_ACCEL").unwrap_or_else(|_| "emu".into())
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vireo-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

/// The virtiofsd Vireo would find (PATH, ~/.cargo/bin, /usr/libexec), or
/// None with the reason printed: the caller says SKIPPED.
fn virtiofsd() -> Option<PathBuf> {
    let home = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin"));
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(home)
        .chain(std::iter::once(PathBuf::from("/usr/libexec")))
        .map(|d| d.join("virtiofsd"))
        .find(|p| p.is_file());
    if found.is_none() {
        eprintln!(
            "SKIPPED: virtiofsd is not installed (scripts/install-deps.sh installs it with \
             `cargo install virtiofsd`)"
        );
    }
    found
}

/// `(uid, gid)` of `user`.
fn ids(user: &str) -> (u32, u32) {
    let id = |flag: &str| {
        let out = Command::new("id").args([flag, user]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    };
    (id("-u"), id("-g"))
}

fn md5_of(path: &Path) -> String {
    let out = Command::new("md5sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// `ls -l`'s mode column for `m` (no setuid, setgid or sticky bits here).
fn mode_string(m: &std::fs::Metadata) -> String {
    let kind = if m.is_dir() { 'd' } else { '-' };
    let bits = m.mode();
    let rwx: String = (0..9)
        .map(|i| {
            let on = bits & (0o400 >> i) != 0;
            match (on, i % 3) {
                (false, _) => '-',
                (true, 0) => 'r',
                (true, 1) => 'w',
                _ => 'x',
            }
        })
        .collect();
    format!("{kind}{rwx}")
}

/// One `ls -ln` entry as compared: mode, links, uid, gid, size, name.
type Entry = (String, u64, u32, u32, u64, String);

/// The host's view of `dir`, as `ls -ln` lists it (sorted by name).
fn host_listing(dir: &Path) -> Vec<Entry> {
    let mut v: Vec<Entry> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            (
                mode_string(&m),
                m.nlink(),
                m.uid(),
                m.gid(),
                m.size(),
                e.file_name().to_string_lossy().into_owned(),
            )
        })
        .collect();
    v.sort_by(|a, b| a.5.cmp(&b.5));
    v
}

/// The entries of busybox `ls -ln` lines between `start` and the next
/// line that is not an entry.
fn guest_listing(lines: &[String], start: &str) -> Vec<Entry> {
    let at = lines
        .iter()
        .position(|l| l == start)
        .unwrap_or_else(|| panic!("no '{start}' in {lines:#?}"));
    lines[at + 1..]
        .iter()
        .skip_while(|l| l.starts_with("total"))
        .take_while(|l| l.starts_with('-') || l.starts_with('d'))
        .map(|l| {
            // mode links uid gid size month day time|year name
            let f: Vec<&str> = l.split_whitespace().collect();
            assert!(f.len() >= 9, "odd ls line: {l}");
            (
                f[0].to_string(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
                f[3].parse().unwrap(),
                f[4].parse().unwrap(),
                f[8..].join(" "),
            )
        })
        .collect()
}

/// Files of several sizes and modes and a subdirectory, under `root`.
fn make_tree(root: &Path) {
    let tree = root.join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    let files: [(&str, usize, u32); 5] = [
        ("empty", 0, 0o644),
        ("small.txt", 13, 0o600),
        ("script.sh", 300, 0o755),
        ("big.bin", 70_000, 0o640),
        ("sub/inner.dat", 4097, 0o444),
    ];
    for (name, len, mode) in files {
        let p = tree.join(name);
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
        std::fs::write(&p, data).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    std::fs::set_permissions(tree.join("sub"), std::fs::Permissions::from_mode(0o750)).unwrap();
}

#[test]
fn guest_reads_writes_and_lists_a_host_directory_as_an_unprivileged_user() {
    let Some(_) = virtiofsd() else { return };
    let g = guest_dir();
    let dir = scratch("virtiofs");
    let share = dir.join("share");
    std::fs::create_dir_all(share.join("out")).unwrap();
    std::fs::copy(g.join("data.bin"), share.join("data.bin")).unwrap();
    make_tree(&share);

    let mut c = vireo();
    // As root, Vireo (and so virtiofsd) runs as the unprivileged test
    // user, which owns the shared tree; not as root, it already is one.
    let user = unprivileged_user();
    if let Some(u) = user {
        let (uid, gid) = ids(u);
        Command::new("chown")
            .arg("-R")
            .arg(format!("{uid}:{gid}"))
            .arg(&share)
            .status()
            .unwrap();
        // Vireo's search for virtiofsd sees this user's PATH: keep ours
        // (CI installs virtiofsd in /usr/local/bin).
        c.uid(uid).gid(gid).env("HOME", &dir);
    }
    let cmd = "mount -t virtiofs share /mnt && md5sum /mnt/data.bin && \
               cp /vireo/data.bin /mnt/out/written.bin && echo from-guest > /mnt/out/note.txt && \
               echo LS-TREE && ls -ln /mnt/tree && echo LS-SUB && ls -ln /mnt/tree/sub && \
               echo LS-END && umount /mnt && echo UMOUNTED";
    c.args(["run", "--accel", &accel(), "--memory", "256M", "--kernel"])
        .arg(g.join("vmlinux"))
        .arg("--initrd")
        .arg(g.join("initramfs.cpio.gz"))
        .arg("--fs")
        .arg(format!("tag=share,dir={}", share.display()))
        .arg("--cmdline")
        .arg(format!(
            "console=ttyS0 reboot=k panic=1 quiet vireo.cmd=\"{cmd}\""
        ));
    let mut vm = Running::spawn(c);
    let code = vm.wait_exit(Duration::from_secs(900));
    let console = vm.stdout_text();
    assert_eq!(code, Some(0), "{console}\n{}", vm.stderr_text());
    assert!(console.contains("VIREO-CMD-END rc=0"), "{console}");
    let lines = command_output(&console);

    // The guest read the host's file.
    let want = md5_of(&share.join("data.bin"));
    assert!(
        lines.iter().any(|l| l.starts_with(&want)),
        "guest md5 of the host file is not {want}: {lines:#?}"
    );
    // The host reads what the guest wrote, owned by the user virtiofsd ran as.
    let written = share.join("out/written.bin");
    assert!(
        std::fs::read(&written).unwrap() == std::fs::read(g.join("data.bin")).unwrap(),
        "the file the guest wrote differs from the guest's data.bin"
    );
    assert_eq!(
        std::fs::read_to_string(share.join("out/note.txt")).unwrap(),
        "from-guest\n"
    );
    if let Some(u) = user {
        assert_eq!(
            std::fs::metadata(&written).unwrap().uid(),
            ids(u).0,
            "the guest's file is not owned by {u}, the user virtiofsd ran as"
        );
    }
    // `ls -ln` in the guest matches the host's listing.
    assert_eq!(
        guest_listing(&lines, "LS-TREE"),
        host_listing(&share.join("tree")),
        "{lines:#?}"
    );
    assert_eq!(
        guest_listing(&lines, "LS-SUB"),
        host_listing(&share.join("tree/sub")),
        "{lines:#?}"
    );
    assert!(lines.iter().any(|l| l == "UMOUNTED"), "{lines:#?}");
    // The virtiofsd Vireo started went with it, and its socket directory.
    assert!(
        !vm.stderr_text().contains("panicked"),
        "{}",
        vm.stderr_text()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_running_virtiofsd_serves_the_guest_and_snapshots_are_refused() {
    let Some(bin) = virtiofsd() else { return };
    let g = guest_dir();
    let dir = scratch("virtiofs-sock");
    let share = dir.join("share");
    std::fs::create_dir_all(&share).unwrap();
    std::fs::write(share.join("hello.txt"), "hello through a socket\n").unwrap();
    let vfs_sock = dir.join("vfs.sock");
    let mut daemon = Command::new(&bin);
    daemon
        .arg(format!("--socket-path={}", vfs_sock.display()))
        .arg(format!("--shared-dir={}", share.display()))
        .arg("--sandbox=none");
    let mut daemon = Running::spawn(daemon);
    assert!(
        wait_until(Duration::from_secs(60), || vfs_sock.exists()),
        "virtiofsd did not listen: {}",
        daemon.stderr_text()
    );
    let api = dir.join("api.sock");
    let cmd =
        "mount -t virtiofs hostshare /mnt && cat /mnt/hello.txt && echo READ-DONE && sleep 600";
    let mut c = vireo();
    c.args(["run", "--accel", &accel(), "--memory", "256M", "--kernel"])
        .arg(g.join("vmlinux"))
        .arg("--initrd")
        .arg(g.join("initramfs.cpio.gz"))
        .arg("--fs")
        .arg(format!("tag=hostshare,socket={}", vfs_sock.display()))
        .arg("--api-socket")
        .arg(&api)
        .arg("--cmdline")
        .arg(format!(
            "console=ttyS0 reboot=k panic=1 quiet vireo.cmd=\"{cmd}\""
        ));
    let mut vm = Running::spawn(c);
    assert!(
        vm.wait_for("READ-DONE", Duration::from_secs(600)),
        "{}\n{}",
        vm.stdout_text(),
        vm.stderr_text()
    );
    assert!(
        vm.stdout_text().contains("hello through a socket"),
        "{}",
        vm.stdout_text()
    );
    // Refused before the VM is even paused, naming the device.
    let out = vireo()
        .args(["snapshot", "--api-socket"])
        .arg(&api)
        .arg("--dir")
        .arg(dir.join("snap"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a snapshot with virtio-fs was taken");
    assert!(
        err.contains("virtio-fs 'hostshare'") && err.contains("virtiofsd"),
        "{err}"
    );
    assert!(!dir.join("snap/manifest.json").exists());
    vm.kill();
    daemon.kill();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `vireo run` with `args`, expected to fail at once: its stderr.
fn refused(args: &[&str]) -> String {
    let g = guest_dir();
    let out = vireo()
        .args(["run", "--accel", "emu", "--kernel"])
        .arg(g.join("vmlinux"))
        .args(args)
        .env("PATH", "/nonexistent")
        .env("HOME", "/nonexistent")
        .output()
        .unwrap();
    // 1 for what the VMM refuses, 2 for what the option parser does.
    assert!(matches!(out.status.code(), Some(1 | 2)), "{out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_virtio_fs_settings_are_clear_errors() {
    let dir = scratch("virtiofs-bad");
    let d = dir.display().to_string();

    // No virtiofsd where Vireo looks (PATH and HOME point nowhere; a
    // Debian /usr/libexec/virtiofsd would be found, so only when absent).
    if !Path::new("/usr/libexec/virtiofsd").exists() {
        let e = refused(&["--fs", &format!("tag=a,dir={d}")]);
        assert!(
            e.contains("virtiofsd not found") && e.contains("cargo install virtiofsd"),
            "{e}"
        );
    }
    // A named one that is not there.
    let e = refused(&[
        "--virtiofsd",
        "/nonexistent/virtiofsd",
        "--fs",
        &format!("tag=a,dir={d}"),
    ]);
    assert!(e.contains("/nonexistent/virtiofsd"), "{e}");

    // A socket nobody listens on (the file is there, the listener gone).
    let sock = dir.join("dead.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let e = refused(&["--fs", &format!("tag=a,socket={}", sock.display())]);
    assert!(
        e.contains("dead.sock") && e.contains("is virtiofsd listening there"),
        "{e}"
    );
    // And one that does not exist at all.
    let e = refused(&["--fs", &format!("tag=a,socket={d}/none.sock")]);
    assert!(e.contains("none.sock"), "{e}");

    // A tag longer than the 36 bytes the device's configuration holds.
    let long = "t".repeat(37);
    let e = refused(&["--fs", &format!("tag={long},dir={d}")]);
    assert!(e.contains("37 bytes") && e.contains("at most 36"), "{e}");
    // Neither or both of socket= and dir=; the same tag twice.
    let e = refused(&["--fs", "tag=a"]);
    assert!(e.contains("socket=") && e.contains("dir="), "{e}");
    let e = refused(&["--fs", &format!("tag=a,dir={d},socket={d}/s")]);
    assert!(e.contains("not both"), "{e}");
    let e = refused(&[
        "--fs",
        &format!("tag=a,socket={d}/s"),
        "--fs",
        &format!("tag=a,socket={d}/t"),
    ]);
    assert!(e.contains("given twice"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
