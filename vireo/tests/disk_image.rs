//! The Debian 12 disk image (guest/build-disk.sh) as an installed system,
//! booted the way a PC boots it: `vireo run --disk` with no `--kernel`, on a
//! qcow2 overlay of the image under `--accel emu`. SeaBIOS finds the disk,
//! GRUB (on the serial terminal) loads the image's own kernel and initrd,
//! systemd brings up a login prompt on the serial console, and cloud-init
//! reads the NoCloud seed `--cloud-init` attaches (the hostname from
//! meta-data is in the prompt, the user-data's runcmd has run). The test
//! logs in as root, runs a command, checks its output and powers off (exit
//! 0). The base image is unchanged and `qemu-img check` finds the overlay
//! clean. Also `--cloud-init`'s bad inputs, refused before boot.
//!
//! The image is part of the default suite: scripts/test.sh (and so CI)
//! builds it as root; a run that is not root and has no image says SKIPPED.

mod common;

use common::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Generous: a first boot runs all of cloud-init's stages in the engine,
/// on a machine shared with other builds.
const BOOT_LIMIT: Duration = Duration::from_secs(1800);
const STEP_LIMIT: Duration = Duration::from_secs(600);

/// The image, or why the test cannot run.
fn disk_image() -> Option<PathBuf> {
    let g = guest_dir();
    let image = g.join("debian-12.qcow2");
    if image.is_file() {
        return Some(image);
    }
    // Building the image needs root (loop devices, mount, chroot): without
    // it a developer's run says so; as root (CI) a missing image is a failure.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "SKIPPED: {} is missing and guest/build-disk.sh needs root to make it",
            image.display()
        );
        return None;
    }
    panic!(
        "{} is missing: run guest/build-disk.sh {} as root (scripts/test.sh does)",
        image.display(),
        g.display()
    );
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vireo-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("command runs");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn md5(path: &Path) -> String {
    run(Command::new("md5sum").arg(path))
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Wait for `needle` to appear in the console after byte `from`; the
/// offset just past it.
fn expect_after(vm: &mut Running, from: usize, needle: &str, limit: Duration) -> usize {
    let start = Instant::now();
    loop {
        let out = vm.stdout_text();
        if let Some(i) = out.get(from..).and_then(|s| s.find(needle)) {
            return from + i + needle.len();
        }
        let exited = matches!(vm.child.try_wait(), Ok(Some(_)));
        assert!(
            !exited && start.elapsed() < limit,
            "no '{needle}' on the console after {:?}{}:\n{}\n--- stderr:\n{}",
            start.elapsed(),
            if exited { " (vireo exited)" } else { "" },
            out.get(from.saturating_sub(4000)..).unwrap_or(&out),
            vm.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn send(stdin: &mut std::process::ChildStdin, line: &str) {
    stdin.write_all(line.as_bytes()).unwrap();
    stdin.write_all(b"\n").unwrap();
    stdin.flush().unwrap();
}

#[test]
fn debian_disk_boots_through_firmware_to_login_with_cloud_init() {
    let Some(base) = disk_image() else {
        return;
    };
    let dir = scratch("disk-image");
    let overlay = dir.join("overlay.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&base)
        .arg(&overlay));
    let base_md5 = md5(&base);

    let user_data = dir.join("user-data");
    std::fs::write(
        &user_data,
        // Single-quoted: unquoted, the item's ": " would make it a YAML
        // mapping, which cloud-init's runcmd refuses.
        "#cloud-config\nruncmd:\n  - 'echo \"runcmd ran: $((6 * 7))\" > /var/tmp/vireo-runcmd'\n",
    )
    .unwrap();
    let meta_data = dir.join("meta-data");
    std::fs::write(
        &meta_data,
        "instance-id: vireo-disk-test-1\nlocal-hostname: vireo-disk-test\n",
    )
    .unwrap();

    // No --kernel: SeaBIOS (the default firmware) boots the disk.
    let mut c = vireo();
    c.args(["run", "--accel", "emu", "--memory", "1G", "--disk"])
        .arg(format!("path={}", overlay.display()))
        .arg("--cloud-init")
        .arg(format!(
            "user-data={},meta-data={}",
            user_data.display(),
            meta_data.display()
        ));
    let started = Instant::now();
    let (mut vm, mut stdin) = Running::spawn_with_stdin(c);

    // Each stage of a PC's boot, in order: the firmware's banner, GRUB
    // loading the image's kernel and initrd (its menu entry's messages),
    // the kernel's first line.
    let at = expect_after(&mut vm, 0, "SeaBIOS (version", STEP_LIMIT);
    let at = expect_after(&mut vm, at, "Loading Linux ", STEP_LIMIT);
    let at = expect_after(&mut vm, at, "Loading initial ramdisk", STEP_LIMIT);
    let at = expect_after(&mut vm, at, "Linux version ", STEP_LIMIT);
    let kernel_after = started.elapsed();
    // The hostname in the prompt is meta-data's: cloud-init set it before
    // the getty started.
    let at = expect_after(&mut vm, at, "vireo-disk-test login:", BOOT_LIMIT);
    let login_after = started.elapsed();
    send(&mut stdin, "root");
    let at = expect_after(&mut vm, at, "Password:", STEP_LIMIT);
    send(&mut stdin, "vireo");
    let at = expect_after(&mut vm, at, "root@vireo-disk-test:", STEP_LIMIT);
    // The markers are computed in the guest, so the echo of the typed line
    // cannot match them.
    send(
        &mut stdin,
        "cloud-init status --wait >/dev/null; echo \"VIREO-CHECK $((40 + 2))\"; cat /var/tmp/vireo-runcmd; \
         echo \"host=$(hostname) root=$(findmnt -n -o SOURCE /) seed=$(blkid -s LABEL -o value /dev/vdb)\"; \
         echo \"v2=$(/lib64/ld-linux-x86-64.so.2 --help | grep -c 'x86-64-v2 (supported')\"; \
         echo \"VIREO-END $((1 + 1))\"",
    );
    let end = expect_after(&mut vm, at, "VIREO-END 2", STEP_LIMIT);
    let out = vm.stdout_text();
    let answer = &out[at..end];
    let lines: Vec<&str> = answer.lines().map(|l| l.trim_end_matches('\r')).collect();
    assert!(lines.contains(&"VIREO-CHECK 42"), "{answer}");
    assert!(lines.contains(&"runcmd ran: 42"), "{answer}");
    assert!(
        lines.contains(&"host=vireo-disk-test root=/dev/vda1 seed=CIDATA"),
        "{answer}"
    );
    // glibc's loader finds the CPU at the x86-64-v2 level (CMPXCHG16B,
    // LAHF/SAHF, POPCNT, SSE3, SSSE3, SSE4.1, SSE4.2), which the engine
    // implements and advertises.
    assert!(lines.contains(&"v2=1"), "{answer}");
    send(&mut stdin, "poweroff");
    let code = vm.wait_exit(STEP_LIMIT);
    let total = started.elapsed();
    assert_eq!(
        code,
        Some(0),
        "exit {code:?}\n{}\n{}",
        vm.stdout_text(),
        vm.stderr_text()
    );
    eprintln!(
        "debian disk image under --accel emu: kernel after {:.1} s, login prompt after {:.1} s, \
         powered off after {:.1} s",
        kernel_after.as_secs_f64(),
        login_after.as_secs_f64(),
        total.as_secs_f64()
    );

    assert_eq!(md5(&base), base_md5, "the base image changed");
    run(Command::new("qemu-img").arg("check").arg(&overlay));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `vireo run ... --cloud-init ...` that must fail before boot: the error.
fn refused(dir: &Path, spec: &str) -> String {
    let g = guest_dir();
    let child = vireo()
        .args(["run", "--accel", "emu", "--serial", "none", "--kernel"])
        .arg(g.join("vmlinux"))
        .arg("--cloud-init")
        .arg(spec)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{spec} was accepted: {err}");
    assert!(!err.contains("panicked"), "{err}");
    let prefix = format!("vireo-cidata-{pid}-");
    let left = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().starts_with(&prefix));
    assert!(!left, "{spec}: a seed file {prefix}* was left behind");
    err
}

#[test]
fn cloud_init_bad_input_is_refused_before_boot() {
    let dir = scratch("cloud-init-bad");
    std::fs::write(dir.join("ok"), "#cloud-config\nruncmd: [ [ls, /] ]\n").unwrap();
    std::fs::write(
        dir.join("bad-yaml"),
        "#cloud-config\nruncmd: [ls\n  - : :\n",
    )
    .unwrap();
    std::fs::write(dir.join("no-header"), "runcmd: [ls]\n").unwrap();
    std::fs::write(dir.join("md-no-id"), "local-hostname: x\n").unwrap();
    std::fs::write(dir.join("net-bad"), "version: 2\nethernets: {eth0: [\n").unwrap();

    let e = refused(&dir, "user-data=missing");
    assert!(
        e.contains("cloud-init user-data missing") && e.contains("No such file"),
        "{e}"
    );
    let e = refused(&dir, "user-data=bad-yaml");
    assert!(
        e.contains("cloud-init user-data bad-yaml") && e.contains("not valid YAML"),
        "{e}"
    );
    let e = refused(&dir, "user-data=no-header");
    assert!(e.contains("first line 'runcmd: [ls]'"), "{e}");
    let e = refused(&dir, "user-data=ok,meta-data=gone");
    assert!(e.contains("cloud-init meta-data gone"), "{e}");
    let e = refused(&dir, "user-data=ok,meta-data=md-no-id");
    assert!(e.contains("no instance-id"), "{e}");
    let e = refused(&dir, "user-data=ok,network-config=net-bad");
    assert!(
        e.contains("cloud-init network-config net-bad") && e.contains("not valid YAML"),
        "{e}"
    );
    let e = refused(&dir, "meta-data=md-no-id");
    assert!(e.contains("user-data"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
