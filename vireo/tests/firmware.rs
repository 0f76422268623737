//! Firmware boot (docs/firmware.md): SeaBIOS from Debian's seabios package
//! boots a disk under the engine; bad input gets one clear line.
//!
//! These tests need /usr/share/seabios/bios-256k.bin (scripts/install-deps.sh
//! installs it); without it they fail saying so, never pass silently.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

const SEABIOS: &str = "/usr/share/seabios/bios-256k.bin";

fn seabios() -> &'static str {
    assert!(
        Path::new(SEABIOS).is_file(),
        "{SEABIOS} is missing: install Debian's seabios package (scripts/install-deps.sh does)"
    );
    SEABIOS
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vireo-fw-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A boot sector (loaded at 0:7c00, real mode) that prints through the
/// BIOS video service (int 10h, AH=0Eh: SeaBIOS's serial console must carry
/// it to COM1), waits for three timer ticks with interrupts on (the BDA
/// tick count at 0:46c, kept by SeaBIOS's IRQ0 handler), writes a second
/// line straight to COM1 and ends the VM through the exit device (0x21 ->
/// status 67). Assembled from:
///
/// ```text
///   xor ax,ax ; mov ds,ax ; mov si,msg
/// 1: lodsb ; test al,al ; jz 2f ; mov ah,0x0e ; xor bx,bx ; int 0x10 ; jmp 1b
/// 2: sti ; mov cx,3
/// 6: mov bx,[0x46c]
/// 7: hlt ; cmp bx,[0x46c] ; je 7b ; loop 6b
///   mov si,msg2 ; mov dx,0x3f8
/// 3: lodsb ; test al,al ; jz 4f ; out dx,al ; jmp 3b
/// 4: mov dx,0xf4 ; mov al,0x21 ; out dx,al
/// 5: hlt ; jmp 5b
/// msg: "int 10h: hello\r\n\0"   msg2: "port: bye\r\n\0"
/// ```
const BOOT_SECTOR: &[u8] = &[
    0x31, 0xc0, 0x8e, 0xd8, 0xbe, 0x3c, 0x7c, 0xac, 0x84, 0xc0, 0x74, 0x08, 0xb4, 0x0e, 0x31, 0xdb,
    0xcd, 0x10, 0xeb, 0xf3, 0xfb, 0xb9, 0x03, 0x00, 0x8b, 0x1e, 0x6c, 0x04, 0xf4, 0x3b, 0x1e, 0x6c,
    0x04, 0x74, 0xf9, 0xe2, 0xf3, 0xbe, 0x4d, 0x7c, 0xba, 0xf8, 0x03, 0xac, 0x84, 0xc0, 0x74, 0x03,
    0xee, 0xeb, 0xf8, 0xba, 0xf4, 0x00, 0xb0, 0x21, 0xee, 0xf4, 0xeb, 0xfd, 0x69, 0x6e, 0x74, 0x20,
    0x31, 0x30, 0x68, 0x3a, 0x20, 0x68, 0x65, 0x6c, 0x6c, 0x6f, 0x0d, 0x0a, 0x00, 0x70, 0x6f, 0x72,
    0x74, 0x3a, 0x20, 0x62, 0x79, 0x65, 0x0d, 0x0a, 0x00,
];

/// A 1 MiB raw disk whose first sector is `code` with the 55 aa signature.
fn boot_disk(dir: &Path, code: &[u8]) -> PathBuf {
    let mut disk = vec![0u8; 1 << 20];
    disk[..code.len()].copy_from_slice(code);
    disk[510] = 0x55;
    disk[511] = 0xaa;
    let path = dir.join("boot.img");
    std::fs::write(&path, disk).unwrap();
    path
}

fn run(args: &[&str]) -> Output {
    vireo().args(args).output().expect("vireo runs")
}

fn one_line_error(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {err}");
    assert!(
        lines[0].contains(needle),
        "expected '{needle}' in: {}",
        lines[0]
    );
}

#[test]
fn seabios_boots_a_boot_sector_that_uses_bios_services() {
    let fw = seabios();
    let dir = scratch("bootsector");
    let disk = boot_disk(&dir, BOOT_SECTOR);
    let mut vm = Running::spawn({
        let mut c = vireo();
        c.args(["run", "--accel", "emu", "--memory", "128M", "--exit-device"])
            .args(["--firmware", fw])
            .arg("--disk")
            .arg(format!("path={}", disk.display()));
        c
    });
    let code = vm.wait_exit(Duration::from_secs(300));
    let out = vm.stdout_text();
    assert_eq!(
        code,
        Some(67),
        "stdout: {out}\nstderr: {}",
        vm.stderr_text()
    );
    assert!(out.contains("SeaBIOS (version"), "firmware banner: {out}");
    assert!(out.contains("Booting from Hard Disk"), "{out}");
    assert!(
        out.contains("int 10h: hello"),
        "int 10h text on COM1: {out}"
    );
    assert!(out.contains("port: bye"), "after three timer ticks: {out}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn seabios_boots_the_same_sector_from_a_qcow2_disk() {
    let fw = seabios();
    let dir = scratch("qcow2");
    let raw = boot_disk(&dir, BOOT_SECTOR);
    let qcow2 = dir.join("boot.qcow2");
    let st = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow2)
        .status()
        .expect("qemu-img runs (scripts/install-deps.sh installs qemu-utils)");
    assert!(st.success());
    let mut vm = Running::spawn({
        let mut c = vireo();
        c.args(["run", "--accel", "emu", "--memory", "128M", "--exit-device"])
            .args(["--firmware", fw])
            .arg("--disk")
            .arg(format!("path={}", qcow2.display()));
        c
    });
    let code = vm.wait_exit(Duration::from_secs(300));
    assert_eq!(code, Some(67), "stdout: {}", vm.stdout_text());
    assert!(vm.stdout_text().contains("port: bye"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_disk_with_no_boot_sector_is_refused() {
    let fw = seabios();
    let dir = scratch("noboot");
    let disk = dir.join("blank.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let out = run(&[
        "run",
        "--accel",
        "emu",
        "--firmware",
        fw,
        "--disk",
        &format!("path={}", disk.display()),
    ]);
    one_line_error(&out, "has no boot sector");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_missing_or_bogus_firmware_is_refused() {
    let dir = scratch("nofw");
    let disk = boot_disk(&dir, BOOT_SECTOR);
    let disk_opt = format!("path={}", disk.display());
    let out = run(&[
        "run",
        "--accel",
        "emu",
        "--firmware",
        "/nonexistent/bios.bin",
        "--disk",
        &disk_opt,
    ]);
    one_line_error(&out, "firmware /nonexistent/bios.bin: cannot read it");
    let bogus = dir.join("bios.bin");
    std::fs::write(&bogus, vec![0u8; 1000]).unwrap();
    let out = run(&[
        "run",
        "--accel",
        "emu",
        "--firmware",
        bogus.to_str().unwrap(),
        "--disk",
        &disk_opt,
    ]);
    one_line_error(&out, "a BIOS image is a multiple of 64 KiB");
    // Firmware with no disk to boot.
    let out = run(&["run", "--accel", "emu", "--firmware", SEABIOS]);
    one_line_error(&out, "needs a disk");
    let _ = std::fs::remove_dir_all(&dir);
}
