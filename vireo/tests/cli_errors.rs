//! Bad input gets one clear line on stderr and a non-zero exit, never a panic.

mod common;

use common::*;
use std::process::Output;

fn run(args: &[&str]) -> Output {
    vireo().args(args).output().expect("vireo runs")
}

fn one_line_error(out: &Output, code: i32, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
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
fn help_reads_like_a_real_tool() {
    let out = run(&["run", "--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--kernel",
        "--initrd",
        "--cmdline",
        "--memory",
        "--cpus",
        "--accel",
        "--serial",
        "--config",
        "Exit status",
        "Ctrl-A X",
    ] {
        assert!(text.contains(opt), "help lacks {opt}:\n{text}");
    }
}

#[test]
fn missing_kernel_file() {
    let out = run(&["run", "--kernel", "/nonexistent/vmlinux", "--accel", "kvm"]);
    if !kvm_usable() {
        return;
    }
    one_line_error(&out, 1, "cannot open kernel /nonexistent/vmlinux");
}

#[test]
fn kernel_that_is_neither_elf_nor_bzimage() {
    if !kvm_usable() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("vireo-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bogus = dir.join("notakernel");
    std::fs::write(&bogus, vec![0x5au8; 8192]).unwrap();
    let out = run(&["run", "--kernel", bogus.to_str().unwrap(), "--accel", "kvm"]);
    one_line_error(&out, 1, "neither");
    std::fs::write(&bogus, b"").unwrap();
    let out = run(&["run", "--kernel", bogus.to_str().unwrap(), "--accel", "kvm"]);
    one_line_error(&out, 1, "kernel file is empty");
    // An ELF header cut short.
    std::fs::write(&bogus, &b"\x7fELF\x02\x01\x01"[..]).unwrap();
    let out = run(&["run", "--kernel", bogus.to_str().unwrap(), "--accel", "kvm"]);
    one_line_error(&out, 1, "kernel");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn zero_cpus_is_refused() {
    let out = run(&["run", "--kernel", "/k", "--cpus", "0"]);
    one_line_error(&out, 1, "--cpus");
}

#[test]
fn bad_memory_size_is_a_usage_error() {
    let out = run(&["run", "--kernel", "/k", "--memory", "lots"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad memory size"));
}

#[test]
fn bad_gdb_address_is_a_usage_error() {
    let out = run(&["run", "--kernel", "/k", "--gdb", "tcp:1234"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected tcp:HOST:PORT"));
    // --gdb-wait means nothing without --gdb.
    let out = run(&["run", "--kernel", "/k", "--gdb-wait"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn gdb_port_in_use_is_one_line_and_exit_1() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let g = guest_dir();
    let out = vireo()
        .args(["run", "--accel", "emu", "--kernel"])
        .arg(g.join("vmlinux"))
        .args([
            "--serial",
            "none",
            "--gdb",
            &format!("tcp:127.0.0.1:{port}"),
        ])
        .output()
        .expect("vireo runs");
    one_line_error(&out, 1, &format!("--gdb tcp:127.0.0.1:{port}"));
}

#[test]
fn unknown_accelerator_is_a_usage_error() {
    let out = run(&["run", "--kernel", "/k", "--accel", "xen"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown accelerator"));
}

#[test]
fn missing_kvm_device_names_the_way_out() {
    let out = vireo()
        .env("VIREO_KVM_DEVICE", "/nonexistent/kvm")
        .args(["run", "--kernel", "/k", "--accel", "kvm"])
        .output()
        .unwrap();
    one_line_error(&out, 1, "--accel emu");
}

#[test]
fn memory_too_small_for_kernel_and_initramfs() {
    if !kvm_usable() {
        return;
    }
    let g = guest_dir();
    let out = run(&[
        "run",
        "--accel",
        "kvm",
        "--kernel",
        g.join("vmlinuz").to_str().unwrap(),
        "--initrd",
        g.join("initramfs.cpio.gz").to_str().unwrap(),
        "--memory",
        "16M",
    ]);
    one_line_error(&out, 1, "too small");
}

#[test]
fn bad_config_file_is_named() {
    let dir = std::env::temp_dir().join(format!("vireo-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("vm.toml");
    std::fs::write(&cfg, "kernel = \"/k\"\ncpu = 2\n").unwrap();
    let out = run(&["run", "--config", cfg.to_str().unwrap()]);
    one_line_error(&out, 1, "bad config file");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn disk_that_cannot_be_opened_is_named() {
    if !kvm_usable() {
        return;
    }
    let g = guest_dir();
    let out = run(&[
        "run",
        "--accel",
        "kvm",
        "--kernel",
        g.join("vmlinux").to_str().unwrap(),
        "--disk",
        "path=/nonexistent/disk.qcow2",
    ]);
    one_line_error(&out, 1, "disk /nonexistent/disk.qcow2");
}

#[test]
fn disk_option_errors_are_usage_errors() {
    let out = run(&["run", "--kernel", "/k", "--disk", "path=/d,format=vmdk"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("vmdk"));
    let out = run(&["run", "--kernel", "/k", "--disk", "readonly=on"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no path"));
}

/// A qcow2 file given as format=raw would expose its metadata to the guest.
#[test]
fn qcow2_image_given_as_raw_is_refused() {
    if !kvm_usable()
        || std::process::Command::new("qemu-img")
            .arg("--version")
            .output()
            .is_err()
    {
        return;
    }
    let dir = std::env::temp_dir().join(format!("vireo-qcow-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("d.qcow2");
    let st = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("16M")
        .status()
        .unwrap();
    assert!(st.success());
    let g = guest_dir();
    let out = run(&[
        "run",
        "--accel",
        "kvm",
        "--kernel",
        g.join("vmlinux").to_str().unwrap(),
        "--disk",
        &format!("path={},format=raw", img.display()),
    ]);
    one_line_error(&out, 1, "qcow2");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn balloon_and_console_option_errors_are_usage_errors() {
    let out = run(&["run", "--kernel", "/k", "--balloon", "size=64"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown balloon option 'size'"));
    let out = run(&["run", "--kernel", "/k", "--balloon", "stats=maybe"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("stats=maybe"));
    let out = run(&["run", "--kernel", "/k", "--console", "hvc"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected serial or virtio"));
    let out = run(&["balloon", "--api-socket", "/nonexistent/s"]);
    assert_eq!(out.status.code(), Some(2), "--target-mib is required");
    let out = run(&[
        "balloon",
        "--api-socket",
        "/nonexistent/s",
        "--target-mib",
        "8",
    ]);
    one_line_error(&out, 1, "cannot connect to API socket");
}

/// An empty VMM (`vireo run --api-socket` alone) in a fresh directory: the
/// directory, the socket and the running VMM.
fn empty_vmm(name: &str) -> (std::path::PathBuf, std::path::PathBuf, Running) {
    let dir = std::env::temp_dir().join(format!("vireo-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("api.sock");
    let mut cmd = vireo();
    cmd.arg("run").arg("--api-socket").arg(&sock);
    let vm = Running::spawn(cmd);
    assert!(
        wait_until(std::time::Duration::from_secs(10), || client(
            &["ping"],
            &sock
        )
        .status
        .success()),
        "the empty VMM did not answer: {}",
        vm.stderr_text()
    );
    (dir, sock, vm)
}

/// `vireo info | head -c 10`: a reader that goes away is no error of ours;
/// the client exits quietly instead of panicking on the broken pipe.
#[test]
fn a_closed_stdout_ends_the_client_quietly() {
    let (dir, sock, _vm) = empty_vmm("pipe");
    for cmd in ["info", "ping"] {
        let mut child = vireo()
            .arg(cmd)
            .arg("--api-socket")
            .arg(&sock)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Close the read end before the client writes: its write gets EPIPE.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{cmd}: {err}");
        assert!(err.trim().is_empty(), "{cmd}: stderr says: {err}");
        assert_eq!(out.status.code(), Some(0), "{cmd}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
