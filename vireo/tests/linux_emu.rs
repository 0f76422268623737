//! Debian's own kernel on Vireo's CPU engine (`--accel emu`): boot to the
//! busybox userspace, run a command there and check what the guest itself
//! reports, then power off (exit 0). Also the paravirtual devices the guest
//! drives with its own virtio modules: virtio-blk on raw and qcow2 images
//! and virtio-rng, all on PCI with MSI-X.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Boot with the test initramfs; `cmd` runs in the guest. Returns the exit
/// code and the console.
fn boot(kernel: &str, extra: &[&str], cmd: &str) -> (Option<i32>, String, String) {
    let g = guest_dir();
    let mut c = vireo();
    c.args(["run", "--accel", "emu", "--memory", "512M", "--kernel"])
        .arg(g.join(kernel))
        .arg("--initrd")
        .arg(g.join("initramfs.cpio.gz"))
        .arg("--cmdline")
        .arg(format!(
            "console=ttyS0 reboot=k panic=1 vireo.cmd=\"{cmd}\""
        ))
        .args(extra);
    let mut vm = Running::spawn(c);
    let code = vm.wait_exit(Duration::from_secs(900));
    (code, vm.stdout_text(), vm.stderr_text())
}

/// The lines the guest's command printed (between the init's markers).
fn command_output(console: &str) -> Vec<String> {
    let start = console
        .find("VIREO-CMD-BEGIN")
        .expect("the command started");
    console[start..]
        .lines()
        .skip(1)
        .take_while(|l| !l.starts_with("VIREO-CMD-END"))
        .filter(|l| !l.starts_with('['))
        .map(|l| l.trim_end_matches('\r').to_string())
        .collect()
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vireo-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An ext4 image made with `mkfs.ext4 -d` holding a 300 KB file; its sha256.
fn ext4_image(dir: &Path) -> (PathBuf, String) {
    let root = dir.join("root");
    std::fs::create_dir_all(&root).unwrap();
    let blob: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(root.join("blob.bin"), &blob).unwrap();
    let img = dir.join("disk.img");
    sh(&format!(
        "mkfs.ext4 -q -d {} -F {} 32M",
        root.display(),
        img.display()
    ));
    let sum = sh(&format!("sha256sum {}", root.join("blob.bin").display()));
    (img, sum.split_whitespace().next().unwrap().to_string())
}

const DISK_SCRIPT: &str = "mount /dev/vda /mnt && sha256sum /mnt/blob.bin && \
    echo written-by-the-guest > /mnt/guest.txt && sync && umount /mnt";

#[test]
fn vmlinux_boots_to_userspace_on_two_vcpus_and_powers_off() {
    let g = guest_dir();
    let want = std::fs::read_to_string(g.join("data.bin.md5")).unwrap();
    let (code, out, err) = boot(
        "vmlinux",
        &["--cpus", "2"],
        "md5sum /vireo/data.bin; nproc; cat /sys/devices/system/cpu/online",
    );
    assert_eq!(code, Some(0), "exit {code:?}\n{out}\n{err}");
    let lines = command_output(&out);
    assert_eq!(
        lines.first().map(String::as_str),
        Some(want.trim()),
        "{out}"
    );
    assert_eq!(lines.get(1).map(String::as_str), Some("2"), "{out}");
    assert_eq!(lines.get(2).map(String::as_str), Some("0-1"), "{out}");
    assert!(out.contains("VIREO-CMD-END rc=0"));
    assert!(err.contains("guest powered off"), "{err}");
}

#[test]
fn bzimage_decompresses_itself_and_boots() {
    let (code, out, err) = boot("vmlinuz", &[], "uname -r");
    assert_eq!(code, Some(0), "exit {code:?}\n{out}\n{err}");
    let g = guest_dir();
    let version = std::fs::read_to_string(g.join("kernel.version")).unwrap();
    assert_eq!(
        command_output(&out),
        vec![version.trim().to_string()],
        "{out}"
    );
}

/// virtio-blk on a raw ext4 image and virtio-rng: the guest reads a file
/// whose sha256 the host knows, writes one, syncs; the host finds it.
#[test]
fn virtio_blk_raw_ext4_round_trip_and_virtio_rng() {
    let dir = scratch("blk-raw");
    let (img, sum) = ext4_image(&dir);
    let disk = format!("path={},format=raw,serial=vireo-test-disk", img.display());
    let (code, out, err) = boot(
        "vmlinux",
        &["--disk", &disk, "--rng"],
        &format!(
            "cat /sys/class/misc/hw_random/rng_current; cat /sys/block/vda/serial; echo; {DISK_SCRIPT}"
        ),
    );
    assert_eq!(code, Some(0), "exit {code:?}\n{out}\n{err}");
    let lines = command_output(&out);
    assert_eq!(lines[0], "virtio_rng.0", "{out}");
    assert_eq!(lines[1], "vireo-test-disk", "{out}");
    assert!(
        lines.iter().any(|l| l.starts_with(&sum)),
        "sha256 {sum} not in {lines:?}"
    );
    let written = sh(&format!(
        "debugfs -R 'cat /guest.txt' {} 2>/dev/null",
        img.display()
    ));
    assert_eq!(written.trim(), "written-by-the-guest");
    sh(&format!("e2fsck -fn {}", img.display()));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A qcow2 overlay over a raw base (a linked clone): the guest's writes land
/// in the overlay, `qemu-img check` finds it clean, the base is unchanged.
#[test]
fn virtio_blk_qcow2_overlay_keeps_the_base_intact() {
    let dir = scratch("blk-qcow2");
    let (base, sum) = ext4_image(&dir);
    let base_sum_before = sh(&format!("sha256sum {}", base.display()));
    let overlay = dir.join("overlay.qcow2");
    sh(&format!(
        "qemu-img create -q -f qcow2 -b {} -F raw {}",
        base.display(),
        overlay.display()
    ));
    let disk = format!("path={},format=qcow2", overlay.display());
    let (code, out, err) = boot("vmlinux", &["--disk", &disk], DISK_SCRIPT);
    assert_eq!(code, Some(0), "exit {code:?}\n{out}\n{err}");
    let lines = command_output(&out);
    assert!(
        lines.iter().any(|l| l.starts_with(&sum)),
        "sha256 {sum} not in {lines:?}"
    );
    sh(&format!("qemu-img check -q {}", overlay.display()));
    assert_eq!(
        sh(&format!("sha256sum {}", base.display())),
        base_sum_before
    );
    let flat = dir.join("flat.img");
    sh(&format!(
        "qemu-img convert -O raw {} {}",
        overlay.display(),
        flat.display()
    ));
    let written = sh(&format!(
        "debugfs -R 'cat /guest.txt' {} 2>/dev/null",
        flat.display()
    ));
    assert_eq!(written.trim(), "written-by-the-guest");
    let _ = std::fs::remove_dir_all(&dir);
}
