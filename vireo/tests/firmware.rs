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

/// Boot the disks `disk_opts` (each what `--disk` takes) through SeaBIOS
/// under the engine with the exit device, to the guest's exit: its exit
/// status and the console output (stdout, stderr).
fn firmware_boot(disk_opts: &[String]) -> (Option<i32>, String, String) {
    let mut vm = Running::spawn({
        let mut c = vireo();
        c.args(["run", "--accel", "emu", "--memory", "128M", "--exit-device"])
            .args(["--firmware", seabios()]);
        for d in disk_opts {
            c.arg("--disk").arg(d);
        }
        c
    });
    let code = vm.wait_exit(Duration::from_secs(300));
    (code, vm.stdout_text(), vm.stderr_text())
}

/// Boot `disk` as [`firmware_boot`] does, to the guest's exit: the
/// console output, once the exit code is the one the test sectors write
/// (0x21, i.e. 67).
fn boot_to_exit_device(disk: &Path) -> String {
    let (code, out, err) = firmware_boot(&[format!("path={}", disk.display())]);
    assert_eq!(code, Some(67), "stdout: {out}\nstderr: {err}");
    out
}

#[test]
fn seabios_boots_a_boot_sector_that_uses_bios_services() {
    let dir = scratch("bootsector");
    let disk = boot_disk(&dir, BOOT_SECTOR);
    let out = boot_to_exit_device(&disk);
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
    let out = boot_to_exit_device(&qcow2);
    assert!(out.contains("port: bye"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A boot sector that writes `tag` to COM1 and ends the VM through the
/// exit device with `value` (status `value << 1 | 1`):
///
/// ```text
///   mov dx,0x3f8 ; mov al,TAG ; out dx,al
///   mov dx,0xf4 ; mov al,VALUE ; out dx,al
/// 1: hlt ; jmp 1b
/// ```
fn exit_sector(tag: u8, value: u8) -> Vec<u8> {
    vec![
        0xba, 0xf8, 0x03, 0xb0, tag, 0xee, 0xba, 0xf4, 0x00, 0xb0, value, 0xee, 0xf4, 0xeb, 0xfd,
    ]
}

/// `bootindex=N` on `--disk`: SeaBIOS boots the disks with an index
/// first, lowest first, then the others in command-line order. Two disks
/// whose boot sectors end the VM with different statuses tell which one
/// booted.
#[test]
fn bootindex_chooses_the_disk_the_firmware_boots() {
    seabios();
    let dir = scratch("bootindex");
    let a = dir.join("a");
    let b = dir.join("b");
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    // Disk A exits with 0x21 (status 67), disk B with 0x22 (status 69).
    let a = boot_disk(&a, &exit_sector(b'A', 0x21));
    let b = boot_disk(&b, &exit_sector(b'B', 0x22));
    let (a, b) = (a.display(), b.display());
    for (disks, want, which) in [
        (
            [format!("path={a}"), format!("path={b}")],
            67,
            "without a bootindex, the first disk",
        ),
        (
            [format!("path={a}"), format!("path={b},bootindex=1")],
            69,
            "the disk with a bootindex before the one without",
        ),
        (
            [
                format!("path={b},bootindex=7"),
                format!("path={a},bootindex=3"),
            ],
            67,
            "the lowest bootindex, not the first given",
        ),
    ] {
        let (code, out, err) = firmware_boot(&disks);
        assert_eq!(
            code,
            Some(want),
            "{which} ({disks:?}) should boot\nstdout: {out}\nstderr: {err}"
        );
        assert!(out.contains("Booting from Hard Disk"), "{out}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The boot order's errors: one index for two disks, an index on a disk
/// that cannot boot (no boot sector) or on a NIC (no network boot), an
/// index where no firmware boots.
#[test]
fn bad_boot_orders_are_refused() {
    seabios();
    let dir = scratch("badbootindex");
    let disk = boot_disk(&dir, &exit_sector(b'A', 0x21));
    let blank = dir.join("blank.img");
    std::fs::write(&blank, vec![0u8; 1 << 20]).unwrap();
    let (disk, blank) = (disk.display(), blank.display());
    let fw_run = |disks: &[String]| {
        let mut c = vireo();
        c.args(["run", "--accel", "emu", "--firmware", SEABIOS]);
        for d in disks {
            c.arg("--disk").arg(d);
        }
        c.output().expect("vireo runs")
    };
    let out = fw_run(&[
        format!("path={disk},bootindex=1"),
        format!("path={blank},bootindex=1"),
    ]);
    one_line_error(
        &out,
        &format!("disks {disk} and {blank} both have bootindex=1"),
    );
    let out = fw_run(&[format!("path={disk}"), format!("path={blank},bootindex=1")]);
    one_line_error(
        &out,
        &format!("disk {blank} has bootindex=1 but cannot boot: it has no boot sector"),
    );
    let out = run(&[
        "run",
        "--accel",
        "emu",
        "--firmware",
        SEABIOS,
        "--disk",
        &format!("path={disk}"),
        "--net",
        "user,bootindex=2",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("a NIC cannot boot"), "{err}");
    let k = dir.join("kernel");
    std::fs::write(&k, vec![0u8; 8192]).unwrap();
    let out = run(&[
        "run",
        "--accel",
        "emu",
        "--kernel",
        k.to_str().unwrap(),
        "--disk",
        &format!("path={disk},bootindex=0"),
    ]);
    one_line_error(&out, "but the VM boots its kernel directly");
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

/// A boot sector that counts a..z to COM1 forever, one letter per timer
/// tick (`sti; hlt` waits for SeaBIOS's IRQ0 handler):
///
/// ```text
///   xor ax,ax ; mov ds,ax ; mov dx,0x3f8 ; mov al,'a'
/// 1: out dx,al ; sti ; hlt ; inc al ; cmp al,'z'+1 ; jne 1b ; mov al,'a' ; jmp 1b
/// ```
const COUNTING_SECTOR: &[u8] = &[
    0x31, 0xc0, 0x8e, 0xd8, 0xba, 0xf8, 0x03, 0xb0, 0x61, 0xee, 0xfb, 0xf4, 0xfe, 0xc0, 0x3c, 0x7b,
    0x75, 0xf7, 0xb0, 0x61, 0xeb, 0xf3,
];

/// The guest's own output: what follows SeaBIOS's "Booting from Hard
/// Disk" (the firmware's banner has letters of its own; the rest of its
/// line, dots and a line break, may come late, between the guest's first
/// letters, as SeaBIOS's serial console flushes lazily).
fn after_boot_line(console: &str) -> &str {
    const MARK: &str = "Booting from Hard Disk";
    match console.find(MARK) {
        Some(i) => &console[i + MARK.len()..],
        None => "",
    }
}

#[test]
fn a_firmware_booted_vm_snapshots_and_restores_in_a_new_process() {
    let fw = seabios();
    let dir = scratch("snapshot");
    let disk = boot_disk(&dir, COUNTING_SECTOR);
    let sock = dir.join("a.sock");
    let snap = dir.join("snap");
    let mut src = Running::spawn({
        let mut c = vireo();
        c.args(["run", "--accel", "emu", "--memory", "64M"])
            .args(["--firmware", fw])
            .arg("--disk")
            .arg(format!("path={}", disk.display()))
            .arg("--api-socket")
            .arg(&sock);
        c
    });
    assert!(
        wait_until(Duration::from_secs(300), || after_boot_line(
            &src.stdout_text()
        )
        .len()
            >= 30),
        "the boot sector did not count: {}\n{}",
        src.stdout_text(),
        src.stderr_text()
    );
    snapshot_and_stop(&mut src, &sock, &snap, Duration::from_secs(30));
    let before = after_boot_line(&src.stdout_text()).to_string();

    let sock2 = dir.join("b.sock");
    let mut dst = Running::spawn({
        let mut c = vireo();
        c.args(["restore", "--from"])
            .arg(&snap)
            .arg("--api-socket")
            .arg(&sock2);
        c
    });
    assert!(
        wait_until(Duration::from_secs(120), || dst.stdout_text().len() >= 30),
        "the restored guest did not count: {}",
        dst.stderr_text()
    );
    // The restored VM is the firmware platform again (its firmware is in
    // the configuration it reports).
    let info = client(&["info"], &sock2);
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(v["config"]["firmware"], fw, "{v}");
    assert!(client(&["stop"], &sock2).status.success());
    assert_eq!(dst.wait_exit(Duration::from_secs(30)), Some(0));
    let after = dst.stdout_text();
    assert!(
        !after.contains("SeaBIOS"),
        "the restore ran the firmware again: {after}"
    );
    assert_unbroken_cycle(&format!("{before}{after}"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A partitioned disk that boots GRUB: the MBR holds GRUB's boot.img
/// (pointed at sector 1) and one partition at 1 MiB (type 83, ext4 made
/// with `mkfs.ext4 -d` from `root`); core.img (grub-mkimage, with the
/// modules to read that partition and load Linux) fills the gap after the
/// MBR, its first sector's block list pointed at the rest. This is what
/// grub-install writes, without needing a loop device.
fn grub_disk(dir: &Path, root: &Path) -> PathBuf {
    let grub = Path::new("/usr/lib/grub/i386-pc");
    assert!(
        grub.join("boot.img").is_file(),
        "{} is missing: install grub-pc-bin (scripts/install-deps.sh does)",
        grub.display()
    );
    let part = dir.join("part.img");
    let _ = std::fs::remove_file(&part);
    let out = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-d"])
        .arg(root)
        .arg(&part)
        .arg("48M")
        .output()
        .expect("mkfs.ext4 runs");
    assert!(out.status.success(), "mkfs.ext4: {out:?}");
    let core = dir.join("core.img");
    let out = std::process::Command::new("grub-mkimage")
        .args(["-O", "i386-pc", "-o"])
        .arg(&core)
        .args(["-p", "(hd0,msdos1)/boot/grub"])
        .args(["biosdisk", "part_msdos", "ext2", "normal", "serial"])
        .args(["terminal", "configfile", "linux", "echo"])
        .output()
        .expect("grub-mkimage runs (grub-pc-bin)");
    assert!(out.status.success(), "grub-mkimage: {out:?}");
    let mut core = std::fs::read(&core).unwrap();
    core.resize(core.len().div_ceil(512) * 512, 0);
    let core_sectors = core.len() / 512;
    assert!(core_sectors < 2047, "core.img fits before the partition");
    // diskboot.img's block list (the last 12 bytes of core.img's first
    // sector): start LBA (u64), sectors (u16), load segment (u16).
    core[500..508].copy_from_slice(&2u64.to_le_bytes());
    core[508..510].copy_from_slice(&((core_sectors - 1) as u16).to_le_bytes());
    core[510..512].copy_from_slice(&0x820u16.to_le_bytes());
    let part = std::fs::read(&part).unwrap();
    let mut disk = vec![0u8; 2048 * 512];
    let boot = std::fs::read(grub.join("boot.img")).unwrap();
    disk[..440].copy_from_slice(&boot[..440]);
    // boot.img loads core.img's first sector from this LBA.
    disk[0x5c..0x64].copy_from_slice(&1u64.to_le_bytes());
    // Partition 1: active, type 83, LBA 2048, CHS fields "use LBA".
    let mut entry = vec![0x80, 0xfe, 0xff, 0xff, 0x83, 0xfe, 0xff, 0xff];
    entry.extend_from_slice(&2048u32.to_le_bytes());
    entry.extend_from_slice(&((part.len() / 512) as u32).to_le_bytes());
    disk[446..462].copy_from_slice(&entry);
    disk[510] = 0x55;
    disk[511] = 0xaa;
    disk[512..512 + core.len()].copy_from_slice(&core);
    disk.extend_from_slice(&part);
    let path = dir.join("grub.img");
    std::fs::write(&path, disk).unwrap();
    path
}

/// SeaBIOS, then GRUB (real mode, protected mode and back for every BIOS
/// disk read), reading its configuration, Debian's kernel and the test
/// initramfs from an ext4 partition through the BIOS's virtio-blk driver;
/// the kernel boots with GRUB's command line, runs a command and powers
/// off through the ACPI tables the firmware placed (exit 0).
#[test]
fn seabios_boots_grub_which_boots_linux_from_an_ext4_partition() {
    seabios();
    let g = guest_dir();
    let dir = scratch("grub");
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("boot/grub")).unwrap();
    std::fs::copy(g.join("vmlinuz"), root.join("boot/vmlinuz")).unwrap();
    std::fs::copy(g.join("initramfs.cpio.gz"), root.join("boot/initrd")).unwrap();
    std::fs::write(
        root.join("boot/grub/grub.cfg"),
        "serial --unit=0 --speed=115200\n\
         terminal_input serial\n\
         terminal_output serial\n\
         echo \"GRUB: loading the kernel\"\n\
         linux /boot/vmlinuz console=ttyS0 reboot=k panic=1 vireo.cmd=cat /proc/cmdline\n\
         initrd /boot/initrd\n\
         boot\n",
    )
    .unwrap();
    let disk = grub_disk(&dir, &root);
    let mut vm = Running::spawn({
        let mut c = vireo();
        c.args(["run", "--accel", "emu", "--memory", "512M"])
            .arg("--disk")
            .arg(format!("path={}", disk.display()));
        c
    });
    let code = vm.wait_exit(Duration::from_secs(900));
    let out = vm.stdout_text();
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {}", vm.stderr_text());
    assert!(out.contains("SeaBIOS (version"), "{out}");
    assert!(out.contains("GRUB: loading the kernel"), "{out}");
    let said = command_output(&out);
    assert!(
        said.iter()
            .any(|l| l.starts_with("BOOT_IMAGE=/boot/vmlinuz console=ttyS0")),
        "GRUB's command line reached the kernel: {said:?}"
    );
    assert!(out.contains("VIREO-CMD-END rc=0"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Boots the test kernel and initramfs under the engine with `cmdline`
/// and the `options` of `vireo run`, waits up to `secs` for the VM to
/// end, checks that it ended with status 0, and returns its console.
fn boot_test_kernel(options: &[&str], cmdline: &str, secs: u64) -> String {
    let g = guest_dir();
    let mut vm = Running::spawn({
        let mut c = vireo();
        c.args(["run", "--accel", "emu"])
            .args(options)
            .arg("--kernel")
            .arg(g.join("vmlinuz"))
            .arg("--initrd")
            .arg(g.join("initramfs.cpio.gz"))
            .args(["--cmdline", cmdline]);
        c
    });
    let code = vm.wait_exit(Duration::from_secs(secs));
    let out = vm.stdout_text();
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {}", vm.stderr_text());
    out
}

/// QEMU's `-kernel` with a BIOS: `--firmware` (the default SeaBIOS) and
/// `--kernel`, `--initrd`, `--cmdline`. The kernel, initrd and command line
/// go to SeaBIOS through fw_cfg; the option ROM from Debian's
/// qemu-system-data loads them and runs the kernel's real-mode setup, which
/// boots the kernel; the guest prints the command line it was given and
/// powers off. No disk is needed.
#[test]
fn seabios_boots_a_kernel_handed_over_fw_cfg() {
    seabios();
    assert!(
        Path::new("/usr/share/qemu/linuxboot_dma.bin").is_file(),
        "/usr/share/qemu/linuxboot_dma.bin is missing: install Debian's qemu-system-data (scripts/install-deps.sh does)"
    );
    let cmdline = "console=ttyS0 reboot=k panic=1 vireo.fwtest=42 vireo.cmd=cat /proc/cmdline";
    let out = boot_test_kernel(&["--memory", "512M", "--firmware"], cmdline, 900);
    assert!(out.contains("SeaBIOS (version"), "{out}");
    let said = command_output(&out);
    assert!(
        said.iter().any(|l| l.trim() == cmdline),
        "the kernel got the command line through fw_cfg: {said:?}"
    );
    assert!(out.contains("VIREO-CMD-END rc=0"), "{out}");
}

#[test]
fn a_kernel_for_the_firmware_must_be_a_bzimage() {
    seabios();
    let dir = scratch("notbz");
    let k = dir.join("kernel");
    std::fs::write(&k, vec![0u8; 8192]).unwrap();
    let out = run(&[
        "run",
        "--accel",
        "emu",
        "--firmware",
        SEABIOS,
        "--kernel",
        k.to_str().unwrap(),
    ]);
    one_line_error(&out, "is not a bzImage");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A boot sector that waits 300 ms through the BIOS (`int 15h, AH=86h`,
/// CX:DX microseconds: SeaBIOS turns on the RTC's periodic interrupt and
/// counts its IRQ 8s), then says whether the call succeeded on COM1 and
/// exits through the exit device (0x21 -> status 67):
///
/// ```text
///   xor ax,ax ; mov ds,ax ; sti
///   mov ah,0x86 ; mov cx,0x0004 ; mov dx,0x93e0 ; int 0x15
///   mov si,ok ; jnc 1f ; mov si,bad
/// 1: mov dx,0x3f8
/// 2: lodsb ; test al,al ; jz 3f ; out dx,al ; jmp 2b
/// 3: mov dx,0xf4 ; mov al,0x21 ; out dx,al
/// 4: hlt ; jmp 4b
/// ok: "int 15h/86h: waited\r\n\0"   bad: "int 15h/86h: failed\r\n\0"
/// ```
const BIOS_WAIT_SECTOR: &[u8] = &[
    0x31, 0xc0, 0x8e, 0xd8, 0xfb, 0xb4, 0x86, 0xb9, 0x04, 0x00, 0xba, 0xe0, 0x93, 0xcd, 0x15, 0xbe,
    0x2b, 0x7c, 0x73, 0x03, 0xbe, 0x41, 0x7c, 0xba, 0xf8, 0x03, 0xac, 0x84, 0xc0, 0x74, 0x03, 0xee,
    0xeb, 0xf8, 0xba, 0xf4, 0x00, 0xb0, 0x21, 0xee, 0xf4, 0xeb, 0xfd, 0x69, 0x6e, 0x74, 0x20, 0x31,
    0x35, 0x68, 0x2f, 0x38, 0x36, 0x68, 0x3a, 0x20, 0x77, 0x61, 0x69, 0x74, 0x65, 0x64, 0x0d, 0x0a,
    0x00, 0x69, 0x6e, 0x74, 0x20, 0x31, 0x35, 0x68, 0x2f, 0x38, 0x36, 0x68, 0x3a, 0x20, 0x66, 0x61,
    0x69, 0x6c, 0x65, 0x64, 0x0d, 0x0a, 0x00,
];

/// SeaBIOS's wait service returns: the RTC raises its periodic interrupt
/// on IRQ 8 at register A's rate while register B's PIE is on, and the
/// firmware's handler, reading register C, sees PF each time.
#[test]
fn the_bios_wait_service_returns_on_rtc_periodic_interrupts() {
    let dir = scratch("rtcwait");
    let disk = boot_disk(&dir, BIOS_WAIT_SECTOR);
    let out = boot_to_exit_device(&disk);
    assert!(out.contains("int 15h/86h: waited"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Linux's rtc-cmos driver gets the RTC's interrupt on IRQ 8: an alarm
/// two seconds ahead (through sysfs: AIE and the alarm registers) fires,
/// the count of IRQ 8 in /proc/interrupts goes from 0 to at least 1, and
/// the driver, having read register C's AF, turns the alarm off.
#[test]
fn linux_rtc_cmos_gets_the_alarm_interrupt_on_irq_8() {
    let cmd = "grep -E '^ *8:' /proc/interrupts; \
               echo +2 > /sys/class/rtc/rtc0/wakealarm; sleep 5; \
               grep -E '^ *8:' /proc/interrupts; grep alarm_IRQ /proc/driver/rtc";
    let out = boot_test_kernel(
        &["--memory", "256M"],
        &format!("console=ttyS0 reboot=k panic=1 vireo.cmd={cmd}"),
        600,
    );
    let said = command_output(&out);
    let irq8: Vec<u64> = said
        .iter()
        .filter(|l| l.contains("rtc0"))
        .map(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("an IRQ 8 count in {l:?}"))
        })
        .collect();
    assert_eq!(irq8.len(), 2, "IRQ 8 is rtc0's, before and after: {said:?}");
    assert_eq!(irq8[0], 0, "no RTC interrupt before the alarm: {said:?}");
    assert!(irq8[1] >= 1, "the alarm raised IRQ 8: {said:?}");
    assert!(
        said.iter()
            .any(|l| l.starts_with("alarm_IRQ") && l.ends_with("no")),
        "the driver saw the alarm and turned it off: {said:?}"
    );
}

/// SMBIOS through fw_cfg: SeaBIOS places the tables Vireo hands it, and
/// Linux shows the VM's manufacturer, name (`--name`) and UUID (`--uuid`)
/// in /sys/class/dmi/id, beside SeaBIOS's own type 0; the structure types
/// are all there.
#[test]
fn linux_reads_the_vm_name_and_uuid_from_smbios() {
    seabios();
    let uuid = "01234567-89ab-cdef-0011-223344556677";
    let cmd = "cd /sys/class/dmi/id && grep . sys_vendor product_name product_uuid bios_vendor; \
               ls /sys/firmware/dmi/entries";
    let out = boot_test_kernel(
        &[
            "--memory",
            "512M",
            "--cpus",
            "2",
            "--firmware",
            "--name",
            "test-vm",
            "--uuid",
            uuid,
        ],
        &format!("console=ttyS0 reboot=k panic=1 vireo.cmd={cmd}"),
        900,
    );
    let said = command_output(&out);
    for want in [
        "sys_vendor:Vireo".to_string(),
        "product_name:test-vm".to_string(),
        format!("product_uuid:{uuid}"),
        "bios_vendor:SeaBIOS".to_string(),
    ] {
        assert!(said.contains(&want), "{want} in {said:?}");
    }
    let entries: Vec<&str> = said.iter().flat_map(|l| l.split_whitespace()).collect();
    for e in ["0-0", "1-0", "4-0", "4-1", "16-0", "17-0", "32-0", "127-0"] {
        assert!(entries.contains(&e), "SMBIOS structure {e} in {entries:?}");
    }
}

#[test]
fn a_bad_uuid_or_name_is_refused() {
    seabios();
    let dir = scratch("baduuid");
    let disk = boot_disk(&dir, BOOT_SECTOR);
    let disk_opt = format!("path={}", disk.display());
    let out = run(&["run", "--disk", &disk_opt, "--uuid", "1234-5678"]);
    one_line_error(&out, "expected 8-4-4-4-12 hex digits");
    let out = run(&["run", "--disk", &disk_opt, "--name", ""]);
    one_line_error(&out, "a VM name is 1-64 characters");
    let _ = std::fs::remove_dir_all(&dir);
}
