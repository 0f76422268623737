//! Snapshot and restore, end to end: a guest that counts a..z on the serial
//! port (the counter lives in guest memory, the delay in a register) is
//! snapshotted through the API, its VMM stopped, and a new `vireo restore`
//! process carries on: the letters of both runs, joined, must form one
//! unbroken a..z cycle (nothing repeated, nothing skipped).

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The a..z counting guest (arch::tiny_elf::letters_guest).
fn counting_guest(dir: &Path) -> PathBuf {
    let path = dir.join("letters.elf");
    std::fs::write(&path, arch::tiny_elf::letters_guest(20_000)).unwrap();
    path
}

fn assert_unbroken_cycle(text: &str) {
    let letters: Vec<u8> = text.bytes().filter(|b| b.is_ascii_lowercase()).collect();
    assert!(!letters.is_empty());
    assert_eq!(letters[0], b'a', "the count starts at a");
    for (i, w) in letters.windows(2).enumerate() {
        let want = if w[0] == b'z' { b'a' } else { w[0] + 1 };
        assert_eq!(
            w[1],
            want,
            "letter {} breaks the count: ...{}",
            i + 1,
            String::from_utf8_lossy(&letters[i.saturating_sub(10)..(i + 10).min(letters.len())])
        );
    }
}

#[test]
fn snapshot_then_restore_in_a_new_process_continues_the_count() {
    if !kvm_usable() {
        return;
    }
    letters_continue_across_snapshot("kvm");
}

#[test]
fn engine_snapshot_then_restore_in_a_new_process_continues_the_count() {
    letters_continue_across_snapshot("emu");
}

/// The letters guest under `accel`, snapshotted, stopped, and restored in
/// a new process: one unbroken a..z cycle across both.
fn letters_continue_across_snapshot(accel: &str) {
    let dir = std::env::temp_dir().join(format!("vireo-snap-{accel}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = counting_guest(&dir);
    let sock = dir.join("a.sock");
    let snap = dir.join("snap");

    let mut cmd = vireo();
    cmd.args([
        "run", "--accel", accel, "--boot", "pvh", "--memory", "64M", "--kernel",
    ])
    .arg(&kernel)
    .arg("--api-socket")
    .arg(&sock);
    let mut src = Running::spawn(cmd);
    assert!(
        wait_until(Duration::from_secs(60), || src.stdout_text().len() >= 30),
        "the guest did not count: {}",
        src.stderr_text()
    );
    let out = vireo()
        .args(["snapshot", "--stay-paused", "--api-socket"])
        .arg(&sock)
        .arg("--dir")
        .arg(&snap)
        .output()
        .unwrap();
    assert!(out.status.success(), "snapshot: {out:?}");
    assert!(snap.join("manifest.json").exists() && snap.join("memory.bin").exists());
    // A second snapshot into the same directory is refused.
    let again = vireo()
        .args(["snapshot", "--stay-paused", "--api-socket"])
        .arg(&sock)
        .arg("--dir")
        .arg(&snap)
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds a snapshot"));
    assert!(client(&["stop"], &sock).status.success());
    assert_eq!(src.wait_exit(Duration::from_secs(10)), Some(0));
    let before = src.stdout_text();

    let sock2 = dir.join("b.sock");
    let mut cmd = vireo();
    cmd.args(["restore", "--from"])
        .arg(&snap)
        .arg("--api-socket")
        .arg(&sock2);
    let start = Instant::now();
    let mut dst = Running::spawn(cmd);
    assert!(
        wait_until(Duration::from_secs(60), || dst.stdout_text().len() >= 30),
        "the restored guest did not count: {}",
        dst.stderr_text()
    );
    eprintln!("restore to 30 more letters took {:?}", start.elapsed());
    let info = client(&["info"], &sock2);
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["state"], "running");
    assert_eq!(v["accel"], accel);
    assert_eq!(v["config"]["kernel"], kernel.to_str().unwrap());
    assert!(client(&["stop"], &sock2).status.success());
    assert_eq!(dst.wait_exit(Duration::from_secs(10)), Some(0));
    let after = dst.stdout_text();
    assert_unbroken_cycle(&format!("{before}{after}"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn snapshot_needs_a_paused_vm_and_restore_needs_a_snapshot() {
    let dir = std::env::temp_dir().join(format!("vireo-snap2-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // Restoring something that is not a snapshot: one clear line.
    let out = vireo()
        .args(["restore", "--from"])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("manifest.json"));
    std::fs::write(dir.join("manifest.json"), r#"{"version": 99}"#).unwrap();
    let out = vireo()
        .args(["restore", "--from"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("version 99"));
    std::fs::remove_file(dir.join("manifest.json")).unwrap();

    // The raw API refuses a snapshot of a running VM and changes nothing.
    let kernel = counting_guest(&dir);
    let sock = dir.join("c.sock");
    let mut cmd = vireo();
    cmd.args([
        "run", "--accel", "emu", "--boot", "pvh", "--memory", "64M", "--kernel",
    ])
    .arg(&kernel)
    .arg("--api-socket")
    .arg(&sock);
    let mut vm = Running::spawn(cmd);
    assert!(wait_until(Duration::from_secs(30), || sock.exists()));
    let body = serde_json::json!({ "destination": dir.join("s") }).to_string();
    let (status, text) =
        vmm::api::client::request_with_body(&sock, "PUT", "/api/v1/vm.snapshot", &body).unwrap();
    assert_eq!(status, 409, "{text}");
    assert!(text.contains("pause"));
    let (status, _) =
        vmm::api::client::request_with_body(&sock, "PUT", "/api/v1/vm.snapshot", "{}").unwrap();
    assert_eq!(status, 400);
    assert!(!dir.join("s").exists());
    // Paused, it can.
    assert!(client(&["pause"], &sock).status.success());
    let (status, text) =
        vmm::api::client::request_with_body(&sock, "PUT", "/api/v1/vm.snapshot", &body).unwrap();
    assert_eq!(status, 204, "{text}");
    assert!(dir.join("s").join("manifest.json").exists());
    vm.kill();
    let _ = std::fs::remove_dir_all(&dir);
}
