//! Snapshot and restore, end to end: a guest that counts a..z on the serial
//! port (the counter lives in guest memory, the delay in a register) is
//! snapshotted through the API, its VMM stopped, and a new `vireo restore`
//! process carries on: the letters of both runs, joined, must form one
//! unbroken a..z cycle (nothing repeated, nothing skipped).

mod common;

use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

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
    letters_continue_across_accels(accel, &[], accel, &[]);
}

#[test]
fn engine_snapshot_restores_under_kvm_and_counts_on() {
    if !kvm_usable() {
        return;
    }
    // Portable: the engine hides what this host's KVM cannot offer (on
    // nested PVM: cx16, popcnt). KVM runs the TSC at the host's rate, not
    // the engine's 1 GHz; the letters guest does not read it.
    letters_continue_across_accels(
        "emu",
        &["--cpu-model", "portable"],
        "kvm",
        &["--allow-tsc-change"],
    );
}

#[test]
fn portable_kvm_snapshot_restores_under_the_engine_and_counts_on() {
    if !kvm_usable() {
        return;
    }
    letters_continue_across_accels(
        "kvm",
        &["--cpu-model", "portable"],
        "emu",
        &["--allow-tsc-change"],
    );
}

/// The letters guest run under `accel` (with `run_args`), snapshotted,
/// stopped, and restored under `to` (with `restore_args`) in a new
/// process: one unbroken a..z cycle across both.
fn letters_continue_across_accels(accel: &str, run_args: &[&str], to: &str, restore_args: &[&str]) {
    let dir = std::env::temp_dir().join(format!("vireo-snap-{accel}-{to}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = counting_guest(&dir);
    let sock = dir.join("a.sock");
    let snap = dir.join("snap");

    // Devices the guest never drives (disk, rng, balloon) still go through
    // the snapshot.
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let mut cmd = vireo();
    cmd.args([
        "run", "--accel", accel, "--boot", "pvh", "--memory", "64M", "--kernel",
    ])
    .arg(&kernel)
    .arg("--disk")
    .arg(format!("path={},format=raw", disk.display()))
    .arg("--rng")
    .args(["--balloon", "stats=off"])
    .args(run_args)
    .arg("--api-socket")
    .arg(&sock);
    let mut src = Running::spawn(cmd);
    assert!(
        wait_until(Duration::from_secs(60), || src.stdout_text().len() >= 30),
        "the guest did not count: {}",
        src.stderr_text()
    );
    assert!(client(&["balloon", "--target-mib", "4"], &sock)
        .status
        .success());
    snapshot_paused(&sock, &snap);
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
    let start = Instant::now();
    let mut dst = if accel == "emu" {
        // Through the API: an empty VMM, then `vireo restore --into`.
        let mut cmd = vireo();
        cmd.arg("run").arg("--api-socket").arg(&sock2);
        let dst = Running::spawn(cmd);
        assert!(wait_until(Duration::from_secs(10), || client(
            &["ping"],
            &sock2
        )
        .status
        .success()));
        // A directory that is not a snapshot is refused; the VMM stays empty.
        let out = vireo()
            .args(["restore", "--from"])
            .arg(&dir)
            .arg("--into")
            .arg(&sock2)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("manifest") && err.contains("400"), "{err}");
        let info = client(&["info"], &sock2);
        let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(v["state"], "not-created", "{v}");
        let out = vireo()
            .args(["restore", "--from"])
            .arg(&snap)
            .args(["--accel", to])
            .args(restore_args)
            .arg("--into")
            .arg(&sock2)
            .output()
            .unwrap();
        assert!(out.status.success(), "restore --into: {out:?}");
        dst
    } else {
        let mut cmd = vireo();
        cmd.args(["restore", "--from"])
            .arg(&snap)
            .args(["--accel", to])
            .args(restore_args)
            .arg("--api-socket")
            .arg(&sock2);
        Running::spawn(cmd)
    };
    assert!(
        wait_until(Duration::from_secs(60), || dst.stdout_text().len() >= 30),
        "the restored guest did not count: {}",
        dst.stderr_text()
    );
    eprintln!("restore to 30 more letters took {:?}", start.elapsed());
    let info = client(&["info"], &sock2);
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["state"], "running");
    assert_eq!(v["accel"], to);
    assert_eq!(v["config"]["accel"], to);
    assert_eq!(v["config"]["kernel"], kernel.to_str().unwrap());
    assert_eq!(v["config"]["rng"], true);
    // The balloon's target (never acted on: no driver) came along.
    assert_eq!(v["balloon"]["target_mib"], 4, "{v}");
    assert_eq!(v["balloon"]["options"]["stats"], false, "{v}");
    assert!(client(&["stop"], &sock2).status.success());
    assert_eq!(dst.wait_exit(Duration::from_secs(10)), Some(0));
    let after = dst.stdout_text();
    assert_unbroken_cycle(&format!("{before}{after}"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A KVM guest shown everything this KVM offers (the default host CPU
/// model) saw features the engine lacks: refused, with them named.
#[test]
fn host_model_kvm_snapshot_is_refused_under_the_engine_naming_what_is_missing() {
    if !kvm_usable() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("vireo-snap-host-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = counting_guest(&dir);
    let sock = dir.join("a.sock");
    let snap = dir.join("snap");
    let mut cmd = vireo();
    cmd.args([
        "run", "--accel", "kvm", "--boot", "pvh", "--memory", "64M", "--kernel",
    ])
    .arg(&kernel)
    .arg("--api-socket")
    .arg(&sock);
    let mut src = Running::spawn(cmd);
    assert!(
        wait_until(Duration::from_secs(60), || src.stdout_text().len() >= 3),
        "the guest did not count: {}",
        src.stderr_text()
    );
    snapshot_and_stop(&mut src, &sock, &snap, Duration::from_secs(10));
    let m = vmm::snapshot::read_manifest(&snap).unwrap();
    let cpuid = m.cpuid.expect("the CPUID the guest saw is recorded");
    assert!(cpuid.iter().any(|e| e.function == 7));
    let (code, err) = restore_output(&snap, &["--accel", "emu"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("cannot be restored under --accel emu: its guest saw CPU features --accel emu does not offer:"),
        "{err}"
    );
    // KVM's paravirtual features beyond kvmclock at least: every KVM
    // offers them, the engine none.
    assert!(err.contains("kvm.nop_io_delay"), "{err}");
    assert!(err.contains("--cpu-model portable"), "{err}");
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

/// `vireo restore --from <snap> <extra>`, run to completion; (exit code, stderr).
fn restore_output(snap: &Path, extra: &[&str]) -> (Option<i32>, String) {
    let out = vireo()
        .args(["restore", "--serial", "none", "--from"])
        .arg(snap)
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// A snapshot that does not fit what restoring it would use is refused
/// with one clear line: tampered manifests (version, checksum, a memory
/// file of another size, a configuration edited to contradict the state),
/// another accelerator, and a disk that changed since.
#[test]
fn damaged_or_mismatched_snapshots_are_refused_clearly() {
    let dir = std::env::temp_dir().join(format!("vireo-snap3-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = counting_guest(&dir);
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let sock = dir.join("a.sock");
    let snap = dir.join("snap");
    let mut cmd = vireo();
    cmd.args([
        "run", "--accel", "emu", "--boot", "pvh", "--memory", "64M", "--kernel",
    ])
    .arg(&kernel)
    .arg("--disk")
    .arg(format!("path={},format=raw", disk.display()))
    .arg("--rng")
    .arg("--api-socket")
    .arg(&sock);
    let mut src = Running::spawn(cmd);
    assert!(
        wait_until(Duration::from_secs(60), || src.stdout_text().len() >= 5),
        "the guest did not count: {}",
        src.stderr_text()
    );
    snapshot_and_stop(&mut src, &sock, &snap, Duration::from_secs(10));

    // Each case works on a copy of the good snapshot.
    let case = |name: &str| {
        let d = dir.join(name);
        copy_dir(&snap, &d);
        d
    };
    let manifest = |d: &Path| std::fs::read_to_string(d.join("manifest.json")).unwrap();

    let d = case("version");
    let m = manifest(&d).replacen("\"version\":3", "\"version\":4", 1);
    std::fs::write(d.join("manifest.json"), m).unwrap();
    let (code, err) = restore_output(&d, &[]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("has version 4; this Vireo reads version 3"),
        "{err}"
    );

    let d = case("checksum");
    let m = manifest(&d).replacen("\"vcpus\":1", "\"vcpus\":2", 1);
    std::fs::write(d.join("manifest.json"), m).unwrap();
    let (code, err) = restore_output(&d, &[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("damaged or was edited"), "{err}");

    let d = case("size");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.join("memory.bin"))
        .unwrap();
    f.set_len(32 << 20).unwrap();
    let (code, err) = restore_output(&d, &[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("its manifest says 67108864"), "{err}");

    // Edited consistently (checksum recomputed): the configuration no
    // longer matches the saved state.
    let d = case("config");
    let mut m = vmm::snapshot::read_manifest(&d).unwrap();
    m.config.as_mut().unwrap().cpus = 2;
    std::fs::remove_file(d.join("manifest.json")).unwrap();
    vmm::snapshot::rewrite_manifest(&d, &m).unwrap();
    let (code, err) = restore_output(&d, &[]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("its configuration says 64 MiB and 2 vCPUs"),
        "{err}"
    );

    let d = case("devices");
    let mut m = vmm::snapshot::read_manifest(&d).unwrap();
    m.config.as_mut().unwrap().rng = false;
    std::fs::remove_file(d.join("manifest.json")).unwrap();
    vmm::snapshot::rewrite_manifest(&d, &m).unwrap();
    // Edited, so no longer signed: its restorer names its disk.
    let named = ["--disk", disk.to_str().unwrap()];
    let (code, err) = restore_output(&d, &named);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("2 virtio devices, its configuration makes 1"),
        "{err}"
    );

    // A snapshot without the record of the CPU its guest saw (an older
    // Vireo's) restores only under its own accelerator.
    let d = case("no-cpuid");
    let mut m = vmm::snapshot::read_manifest(&d).unwrap();
    assert!(m.cpuid.is_some() && m.tsc_khz == Some(1_000_000));
    m.cpuid = None;
    std::fs::remove_file(d.join("manifest.json")).unwrap();
    vmm::snapshot::rewrite_manifest(&d, &m).unwrap();
    let (code, err) = restore_output(&d, &["--accel", "kvm", named[0], named[1]]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains(
            "did not record the CPU features its guest saw; it restores only under --accel emu"
        ),
        "{err}"
    );
    // ... where it still restores and counts on.
    let mut cmd = vireo();
    cmd.args(["restore", "--from"]).arg(&d).args(named);
    let mut old = Running::spawn(cmd);
    assert!(
        wait_until(Duration::from_secs(60), || old.stdout_text().len() >= 5),
        "a snapshot without the CPUID record did not restore: {}",
        old.stderr_text()
    );
    old.kill();

    // The disk changed after the snapshot: refused, nothing runs.
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(&disk, vec![1u8; 1 << 20]).unwrap();
    let (code, err) = restore_output(&snap, &[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("changed since the snapshot"), "{err}");
    std::fs::remove_file(&disk).unwrap();
    let (code, err) = restore_output(&snap, &[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("disk.img"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The last count the guest loop reaches before it unmounts and powers off.
/// Host time between stopping the snapshotted VM and restoring it.
const DOWNTIME: Duration = Duration::from_secs(8);

/// Debian on the engine with a raw ext4 disk, counting: every ~0.2 s it
/// prints the next number and appends it to a file on the disk with sync.
/// Snapshotted mid-count (the VM stops), restored in a new process, where
/// it counts on to the end, unmounts and powers off. The console counts
/// of both processes form one unbroken sequence, and so does the file on
/// the disk. The snapshot then no longer restores over the changed disk.
#[test]
fn debian_counting_to_console_and_disk_continues_across_an_engine_snapshot() {
    let dir = std::env::temp_dir().join(format!("vireo-snap-linux-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (mut src, disk, sock) = spawn_debian_counter(&dir);
    let snap = dir.join("snap");
    let start = Instant::now();
    snapshot_paused(&sock, &snap);
    eprintln!("snapshot took {:?}", start.elapsed());
    assert!(client(&["stop"], &sock).status.success());
    assert_eq!(src.wait_exit(Duration::from_secs(10)), Some(0));
    let before = src.stdout_text();
    let counted = counts(&before);
    assert!(counted.len() >= 5, "{before}");

    // Clones first: two at once from the same snapshot, each on its own
    // qcow2 overlay over the snapshot's disk. Each carries on the count on
    // its own disk; the snapshot's disk stays as it was (the in-place
    // restore below would refuse it otherwise).
    let base_before = std::fs::read(&disk).unwrap();
    let overlays = [dir.join("clone-a.qcow2"), dir.join("clone-b.qcow2")];
    let mut clones: Vec<Running> = overlays
        .iter()
        .map(|o| {
            let mut cmd = vireo();
            cmd.args(["restore", "--from"])
                .arg(&snap)
                .arg("--overlay")
                .arg(o);
            Running::spawn(cmd)
        })
        .collect();
    for (c, o) in clones.iter_mut().zip(&overlays) {
        let code = c.wait_exit(Duration::from_secs(900));
        let out = c.stdout_text();
        assert_eq!(
            code,
            Some(0),
            "clone {}:\n{out}\n{}",
            o.display(),
            c.stderr_text()
        );
        let all = counts(&format!("{before}{out}"));
        assert_eq!(all, (1..=LAST_COUNT).collect::<Vec<_>>(), "clone:\n{out}");
        let raw = o.with_extension("raw");
        let conv = std::process::Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(o)
            .arg(&raw)
            .output()
            .unwrap();
        assert!(conv.status.success(), "{conv:?}");
        let (on_disk, text) = counts_on_disk(&raw);
        assert_eq!(
            on_disk,
            (1..=LAST_COUNT).collect::<Vec<_>>(),
            "clone disk: {text}"
        );
    }
    assert!(
        std::fs::read(&disk).unwrap() == base_before,
        "a clone wrote to the snapshot's disk"
    );
    // A clone needs a new overlay, not an existing file.
    let (code, err) = restore_output(&snap, &["--overlay", overlays[0].to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("already exists"), "{err}");

    std::thread::sleep(DOWNTIME);
    let mut cmd = vireo();
    cmd.args(["restore", "--from"]).arg(&snap);
    let mut dst = Running::spawn(cmd);
    let code = dst.wait_exit(Duration::from_secs(900));
    let after = dst.stdout_text();
    assert_eq!(
        code,
        Some(0),
        "the restored guest did not finish:\n{after}\n{}",
        dst.stderr_text()
    );
    assert!(after.contains("VIREO-CMD-END rc=0"), "{after}");
    let resumed = counts(&after);
    assert!(!resumed.is_empty(), "{after}");
    // One sequence across both consoles (a line may straddle the cut).
    let all = counts(&format!("{before}{after}"));
    let want: Vec<u64> = (1..=LAST_COUNT).collect();
    assert_eq!(all, want, "before:\n{before}\nafter:\n{after}");
    assert!(counted.len() + resumed.len() >= want.len() - 1);
    // Guest time never goes back, and the time the VM spent stopped does
    // not pass for it: the step across the cut is one count's (~0.2 s
    // plus a sync), not the downtime.
    let times: Vec<f64> = count_lines(&format!("{before}{after}"))
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    assert!(
        times.windows(2).all(|w| w[1] >= w[0]),
        "guest uptime went back: {times:?}"
    );
    let cut = counted.len();
    let step = times[cut] - times[cut - 1];
    assert!(
        step < DOWNTIME.as_secs_f64(),
        "the guest's clock counted the downtime: {step} s across the snapshot"
    );
    eprintln!(
        "counted to {} before the snapshot, from {} after; guest clock step across it {step:.2} s",
        counted.last().unwrap(),
        resumed[0]
    );

    // The file on the disk: every count once, in order.
    let (on_disk, text) = counts_on_disk(&disk);
    assert_eq!(on_disk, want, "{text}");

    let (code, err) = restore_output(&snap, &[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("changed since the snapshot"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The letters guest on the engine with its API at `dir`/api.sock.
fn letters_vm(dir: &Path) -> (Running, std::path::PathBuf) {
    let kernel = counting_guest(dir);
    let sock = dir.join("api.sock");
    let mut cmd = vireo();
    cmd.args([
        "run", "--accel", "emu", "--boot", "pvh", "--memory", "64M", "--kernel",
    ])
    .arg(&kernel)
    .arg("--api-socket")
    .arg(&sock);
    let vm = Running::spawn(cmd);
    assert!(
        wait_until(Duration::from_secs(30), || client(&["ping"], &sock)
            .status
            .success()),
        "the VM did not start: {}",
        vm.stderr_text()
    );
    (vm, sock)
}

/// Another user plants `memory.bin` and `manifest.json` links in a
/// directory of theirs and has root snapshot into it: root refuses, and
/// neither the victim file nor the link's target is touched. A snapshot
/// root writes is 0700/0600 (guest RAM is secret).
#[test]
fn snapshot_refuses_a_directory_with_planted_links() {
    let dir = std::env::temp_dir().join(format!("vireo-snap-planted-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (mut vm, sock) = letters_vm(&dir);
    // Root's own snapshot: private.
    let own = dir.join("own");
    let out = client(&["snapshot", "--dir", own.to_str().unwrap()], &sock);
    assert!(out.status.success(), "{out:?}");
    let mode = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
    };
    assert_eq!(mode(&own), 0o700);
    assert_eq!(mode(&own.join("memory.bin")), 0o600);
    assert_eq!(mode(&own.join("manifest.json")), 0o600);

    let Some(user) = unprivileged_user() else {
        vm.kill();
        return;
    };
    // The attacker's directory: world-readable so they can reach it.
    let open = dir.join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(
        &open,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o1777),
    )
    .unwrap();
    let victim = dir.join("victim");
    std::fs::write(&victim, b"root's data").unwrap();
    let created = dir.join("created-by-root");
    let trap = open.join("trap");
    as_user(
        user,
        &format!(
            "mkdir {t} && ln -s {v} {t}/memory.bin && ln -s {c} {t}/manifest.json",
            t = trap.display(),
            v = victim.display(),
            c = created.display()
        ),
    );
    let out = client(&["snapshot", "--dir", trap.to_str().unwrap()], &sock);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("snapshot directory"), "{err}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"root's data");
    assert!(!created.exists(), "root created the link's target");
    // An empty directory of theirs is refused too: they could plant later.
    let empty = open.join("empty");
    as_user(user, &format!("mkdir {}", empty.display()));
    let out = client(&["snapshot", "--dir", empty.to_str().unwrap()], &sock);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is owned by user"), "{err}");
    // The VM still runs after the refusals.
    let v: serde_json::Value = serde_json::from_slice(&client(&["info"], &sock).stdout).unwrap();
    assert_eq!(v["state"], "running", "{v}");
    vm.kill();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `vm.resume` asked again and again while a snapshot is written is
/// refused (409, naming the snapshot) until the snapshot is done: the
/// guest never runs while its memory is written, and the snapshot restores
/// into an unbroken count. (The race the issue found: pause, snapshot, and
/// a resume 30 ms later both answered 204 and the restored guest died.)
#[test]
fn a_resume_cannot_race_a_snapshot() {
    let dir = std::env::temp_dir().join(format!("vireo-snap-race-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (mut vm, sock) = letters_vm(&dir);
    assert!(wait_until(Duration::from_secs(30), || vm
        .stdout_text()
        .contains("m")));
    let mut refused = 0;
    let mut snap = None;
    for round in 0..10 {
        assert!(client(&["pause"], &sock).status.success());
        let dest = dir.join(format!("snap{round}"));
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let spam = {
            let (sock, done) = (sock.clone(), done.clone());
            std::thread::spawn(move || {
                let (mut refused, mut resumed) = (0, 0);
                while !done.load(std::sync::atomic::Ordering::Acquire) {
                    let (status, text) =
                        vmm::api::client::request(&sock, "PUT", "/api/v1/vm.resume").unwrap();
                    match status {
                        409 if text.contains("snapshot") => refused += 1,
                        204 => resumed += 1,
                        _ => {}
                    }
                    if resumed > 0 {
                        break;
                    }
                }
                (refused, resumed)
            })
        };
        let body = serde_json::json!({ "destination": dest }).to_string();
        let (status, text) =
            vmm::api::client::request_with_body(&sock, "PUT", "/api/v1/vm.snapshot", &body)
                .unwrap();
        done.store(true, std::sync::atomic::Ordering::Release);
        let (r, _) = spam.join().unwrap();
        refused += r;
        // The spam may resume before the snapshot starts (then it is
        // refused for a running VM) or after it ends: both are fine.
        assert!(status == 204 || status == 409, "{status} {text}");
        if status == 204 && snap.is_none() {
            snap = Some(dest);
        }
        let _ = client(&["resume"], &sock);
        if refused > 0 && snap.is_some() {
            break;
        }
    }
    assert!(
        refused > 0,
        "no resume was refused while a snapshot was written"
    );
    let snap = snap.expect("a snapshot was written");
    vm.kill();
    let before = vm.stdout_text();
    // The restored guest counts on from the snapshot, unbroken: its state
    // and memory are of one instant.
    let mut cmd = vireo();
    cmd.args(["restore", "--from"]).arg(&snap);
    let restored = Running::spawn(cmd);
    assert!(
        wait_until(Duration::from_secs(30), || restored
            .stdout_text()
            .bytes()
            .filter(|b| b.is_ascii_lowercase())
            .count()
            > 60),
        "the restored guest did not count: {}",
        restored.stderr_text()
    );
    // Unbroken from wherever the snapshot left the count.
    let letters: Vec<u8> = restored
        .stdout_text()
        .bytes()
        .filter(|b| b.is_ascii_lowercase())
        .collect();
    for w in letters.windows(2) {
        let want = if w[0] == b'z' { b'a' } else { w[0] + 1 };
        assert_eq!(w[1], want, "the restored count breaks: {letters:?}");
    }
    assert!(!before.is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Replace every string `from` in a JSON value with `to`; the block
/// state's file size and mtime with those of `to`.
fn forge(v: &mut serde_json::Value, from: &str, to: &Path) {
    use std::os::unix::fs::MetadataExt;
    match v {
        serde_json::Value::String(s) if s == from => *s = to.display().to_string(),
        serde_json::Value::Array(a) => a.iter_mut().for_each(|x| forge(x, from, to)),
        serde_json::Value::Object(o) => {
            if o.contains_key("file_mtime_ns") {
                let m = std::fs::metadata(to).unwrap();
                o.insert("file_size".into(), m.len().into());
                let ns = m.mtime() as u64 * 1_000_000_000 + m.mtime_nsec() as u64;
                o.insert("file_mtime_ns".into(), ns.into());
            }
            o.values_mut().for_each(|x| forge(x, from, to));
        }
        _ => {}
    }
}

/// A forged snapshot cannot give the guest a host file as its disk: a
/// local user copies a snapshot, points its disk at a root-only file
/// (size and mtime matched, checksum recomputed) and has root restore it.
/// The manifest does not verify under root's snapshot key, so restore
/// refuses to open the file unless root names it; the file is untouched.
/// Root's own snapshot restores as before, and a forged 8 TiB memory claim
/// is held to vm.create's limit.
#[test]
fn a_forged_snapshot_cannot_name_a_host_file_as_its_disk() {
    let dir = std::env::temp_dir().join(format!("vireo-snap-forged-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = counting_guest(&dir);
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let sock = dir.join("a.sock");
    let snap = dir.join("snap");
    let mut cmd = vireo();
    cmd.args([
        "run", "--accel", "emu", "--boot", "pvh", "--memory", "64M", "--kernel",
    ])
    .arg(&kernel)
    .arg("--disk")
    .arg(format!("path={},format=raw", disk.display()))
    .arg("--api-socket")
    .arg(&sock);
    let mut src = Running::spawn(cmd);
    assert!(wait_until(Duration::from_secs(60), || src
        .stdout_text()
        .len()
        >= 5));
    let out = client(&["snapshot", "--dir", snap.to_str().unwrap()], &sock);
    assert!(out.status.success(), "{out:?}");
    assert!(client(&["stop"], &sock).status.success());
    assert_eq!(src.wait_exit(Duration::from_secs(10)), Some(0));

    // A root-only file the attacker can stat but not read.
    let secret = dir.join("secret.img");
    std::fs::write(&secret, vec![0x5au8; 1 << 20]).unwrap();
    std::fs::set_permissions(
        &secret,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
    )
    .unwrap();
    let mut m = serde_json::to_value(vmm::snapshot::read_manifest(&snap).unwrap()).unwrap();
    forge(&mut m, disk.to_str().unwrap(), &secret);
    let m: vmm::snapshot::Manifest = serde_json::from_value(m).unwrap();
    let staged = dir.join("staged");
    std::fs::create_dir(&staged).unwrap();
    vmm::snapshot::rewrite_manifest(&staged, &m).unwrap();
    std::fs::copy(snap.join("memory.bin"), staged.join("memory.bin")).unwrap();
    // The forged directory is the attacker's own where one exists.
    let shared = dir.join("shared");
    std::fs::create_dir(&shared).unwrap();
    let forged = shared.join("forged");
    match unprivileged_user() {
        Some(user) => {
            let open = <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode;
            std::fs::set_permissions(&dir, open(0o755)).unwrap();
            std::fs::set_permissions(&shared, open(0o1777)).unwrap();
            for f in ["manifest.json", "memory.bin"] {
                std::fs::set_permissions(staged.join(f), open(0o644)).unwrap();
            }
            as_user(
                user,
                &format!(
                    "mkdir {f} && cp {s}/manifest.json {s}/memory.bin {f}/",
                    f = forged.display(),
                    s = staged.display()
                ),
            );
        }
        None => std::fs::rename(&staged, &forged).unwrap(),
    }
    let (code, err) = restore_output(&forged, &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("is not signed") && err.contains("secret.img"),
        "{err}"
    );
    // Naming another disk than it names does not help either.
    let (code, err) = restore_output(&forged, &["--disk", disk.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not the ones it was taken with"), "{err}");
    assert_eq!(std::fs::read(&secret).unwrap(), vec![0x5au8; 1 << 20]);

    // 8 TiB of memory, however consistently claimed: refused.
    let mut big = vmm::snapshot::read_manifest(&snap).unwrap();
    big.memory_bytes = 8 << 40;
    big.config.as_mut().unwrap().memory = vmm::config::MemSize(8 << 40);
    let huge = dir.join("huge");
    std::fs::create_dir(&huge).unwrap();
    vmm::snapshot::rewrite_manifest(&huge, &big).unwrap();
    let (code, err) = restore_output(&huge, &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("1 TiB"), "{err}");

    // Root's own, signed snapshot restores over its disk unnamed.
    let mut cmd = vireo();
    cmd.args(["restore", "--from"]).arg(&snap);
    let restored = Running::spawn(cmd);
    assert!(
        wait_until(Duration::from_secs(30), || restored.stdout_text().len()
            >= 5),
        "the signed snapshot did not restore: {}",
        restored.stderr_text()
    );
    drop(restored);
    let _ = std::fs::remove_dir_all(&dir);
}
