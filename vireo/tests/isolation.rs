//! Isolation and placement, end to end: every thread of a running VMM is
//! in `vm.info` with its host TID and role, and `--cpu-affinity` pins the
//! vCPU threads.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// 32-bit PVH guest: print '.' on COM1, spin a while, forever.
fn counting_guest(dir: &Path) -> PathBuf {
    let delay: u32 = 20_000;
    let mut code = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    code.extend_from_slice(&[0xb0, b'.', 0xee]); // top: mov al, '.'; out dx, al
    code.push(0xb9); // mov ecx, delay
    code.extend_from_slice(&delay.to_le_bytes());
    code.extend_from_slice(&[0x49, 0x75, 0xfd]); // 1: dec ecx; jnz 1b
    code.extend_from_slice(&[0xeb, 0xf3]); // jmp top
    let path = dir.join("counter.elf");
    std::fs::write(&path, arch::tiny_elf::pvh_elf(0x10_0000, &code)).unwrap();
    path
}

fn dots(vm: &Running) -> usize {
    vm.stdout_text().matches('.').count()
}

fn accels() -> Vec<&'static str> {
    let mut v = vec!["emu"];
    if kvm_usable() {
        v.push("kvm");
    }
    v
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vireo-iso-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A field of /proc/PID/task/TID/status.
fn task_status(pid: u32, tid: u64, field: &str) -> String {
    let text =
        std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

/// The first host CPU this test process may run on (a CI container's
/// cpuset need not hold CPU 0).
fn first_allowed_cpu() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim();
    list.split([',', '-']).next().unwrap().parse().unwrap()
}

#[test]
fn vm_info_lists_every_thread_and_cpu_affinity_pins_the_vcpus() {
    let cpu = first_allowed_cpu();
    for accel in accels() {
        let dir = temp_dir(&format!("threads-{accel}"));
        let sock = dir.join("api.sock");
        let mut cmd = vireo();
        cmd.args(["run", "--accel", accel, "--boot", "pvh", "--memory", "64M"])
            .args(["--cpus", "2", "--rng", "--cpu-affinity"])
            .arg(format!("0={cpu},1={cpu}"))
            .arg("--kernel")
            .arg(counting_guest(&dir))
            .arg("--api-socket")
            .arg(&sock);
        let vm = Running::spawn(cmd);
        let pid = vm.child.id();
        assert!(
            wait_until(Duration::from_secs(60), || dots(&vm) >= 3),
            "{accel}: the guest did not count: {}",
            vm.stderr_text()
        );
        let out = client(&["info"], &sock);
        assert!(out.status.success(), "{accel}: info: {out:?}");
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(info["config"]["cpu_affinity"], format!("0={cpu},1={cpu}"));
        let threads = info["threads"].as_array().expect("threads listed");
        let role = |t: &serde_json::Value| t["role"].as_str().unwrap().to_string();
        let main: Vec<_> = threads.iter().filter(|t| role(t) == "main").collect();
        assert_eq!(main.len(), 1, "{accel}: one main thread: {threads:?}");
        assert_eq!(
            main[0]["tid"], pid as u64,
            "{accel}: the main thread is the process"
        );
        assert!(
            threads.iter().any(|t| role(t) == "api"),
            "{accel}: {threads:?}"
        );
        // The api-request thread that answered may be gone by now.
        for t in threads.iter().filter(|t| role(t) != "api-request") {
            let tid = t["tid"].as_u64().unwrap();
            assert!(
                Path::new(&format!("/proc/{pid}/task/{tid}")).exists(),
                "{accel}: {t} is not a thread of the VMM"
            );
        }
        for i in 0..2u64 {
            let v = threads
                .iter()
                .find(|t| role(t) == "vcpu" && t["vcpu"] == i)
                .unwrap_or_else(|| panic!("{accel}: no vcpu {i} thread in {threads:?}"));
            let tid = v["tid"].as_u64().unwrap();
            assert_eq!(
                task_status(pid, tid, "Cpus_allowed_list"),
                cpu.to_string(),
                "{accel}: vcpu {i} is not pinned"
            );
        }
        // A thread that is neither a vCPU nor pinned keeps the process's CPUs.
        let api = threads.iter().find(|t| role(t) == "api").unwrap();
        assert_eq!(
            task_status(pid, api["tid"].as_u64().unwrap(), "Cpus_allowed_list"),
            task_status(pid, pid as u64, "Cpus_allowed_list")
        );
        let _ = client(&["stop"], &sock);
        drop(vm);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn cpu_affinity_outside_the_host_or_the_vm_is_a_clear_error() {
    let dir = temp_dir("affinity-errors");
    let kernel = counting_guest(&dir);
    let run = |cpus: &str, affinity: &str| {
        vireo()
            .args(["run", "--accel", "emu", "--boot", "pvh", "--memory", "64M"])
            .args([
                "--cpus",
                cpus,
                "--cpu-affinity",
                affinity,
                "--serial",
                "none",
            ])
            .arg("--kernel")
            .arg(&kernel)
            .output()
            .unwrap()
    };
    let out = run("1", "0=1023");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("host CPU 1023 (for vCPU 0) is not one this process may run on"),
        "{err}"
    );
    let out = run("1", "1=0");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("names vCPU 1, but the VM has 1"), "{err}");
    let out = run("1", "0:1");
    assert_eq!(
        out.status.code(),
        Some(2),
        "a malformed option is a usage error"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The Seccomp: field of every thread of process `pid`, by thread name.
fn seccomp_of_threads(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let tid: u64 = e.file_name().to_string_lossy().parse().unwrap();
        let name = task_status(pid, tid, "Name");
        out.push((format!("{name} ({tid})"), task_status(pid, tid, "Seccomp")));
    }
    out
}

#[test]
fn every_thread_of_a_running_vmm_is_filtered() {
    let g = guest_dir();
    let dir = temp_dir("seccomp-all");
    let sock = dir.join("api.sock");
    let disk = dir.join("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    // The guest reads from every device that has a worker thread, then
    // waits while the threads are looked at. (Its output goes to hvc0
    // once it opens /dev/console.)
    let cmd = "exec </dev/console >/dev/console 2>&1; head -c 64 /dev/hwrng >/dev/null; dd if=/dev/vda of=/dev/null bs=4k count=4 2>/dev/null; echo DEVICES-USED; sleep 600";
    let mut c = vireo();
    c.args(["run", "--accel", "emu", "--memory", "256M", "--cpus", "2"])
        .arg("--kernel")
        .arg(g.join("vmlinux"))
        .arg("--initrd")
        .arg(g.join("initramfs.cpio.gz"))
        .args(["--rng", "--balloon", "--console", "virtio"])
        .arg("--disk")
        .arg(format!("path={}", disk.display()))
        .arg("--vsock")
        .arg(format!("cid=3,socket={}", dir.join("v.sock").display()))
        .arg("--api-socket")
        .arg(&sock)
        .args(["--metrics", "127.0.0.1:0"])
        .arg("--cmdline")
        .arg(format!(
            "console=hvc0 reboot=k panic=1 quiet vireo.cmd=\"{cmd}\""
        ));
    let mut vm = Running::spawn(c);
    assert!(
        vm.wait_for("DEVICES-USED", Duration::from_secs(600)),
        "the guest did not use its devices: {}{}",
        vm.stdout_text(),
        vm.stderr_text()
    );
    // An API request thread and the counters, while we look.
    assert!(client(&["counters"], &sock).status.success());
    let pid = vm.child.id();
    let threads = seccomp_of_threads(pid);
    assert!(
        threads.len() >= 8,
        "main, spawner, 2 vCPUs, api, metrics, vsock-host and the workers: {threads:?}"
    );
    // Workers are named by virtio device id: 2 blk, 3 console, 4 rng,
    // 5 balloon, 19 vsock.
    for name in [
        "vcpu0",
        "vcpu1",
        "spawner",
        "virtio-2",
        "virtio-4",
        "vsock-host",
        "api",
    ] {
        assert!(
            threads
                .iter()
                .any(|(n, _)| n.starts_with(&format!("{name} "))),
            "no {name} thread in {threads:?}"
        );
    }
    for (name, seccomp) in &threads {
        assert_eq!(seccomp, "2", "thread {name} has no seccomp filter");
    }
    let _ = client(&["stop"], &sock);
    assert_eq!(
        vm.wait_exit(Duration::from_secs(60)),
        Some(0),
        "{}",
        vm.stderr_text()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_forbidden_system_call_ends_the_vmm_with_a_report() {
    let dir = temp_dir("seccomp-forbidden");
    let kernel = counting_guest(&dir);
    for (role, thread) in [("vcpu", "vcpu 0"), ("api", "api"), ("main", "main")] {
        let sock = dir.join(format!("{role}.sock"));
        let mut c = vireo();
        c.env("VIREO_TEST_FORBIDDEN_SYSCALL", role)
            .args(["--seccomp", "on", "run", "--accel", "emu", "--boot", "pvh"])
            .args(["--memory", "64M"])
            .arg("--kernel")
            .arg(&kernel)
            .arg("--api-socket")
            .arg(&sock);
        let mut vm = Running::spawn(c);
        let code = vm.wait_exit(Duration::from_secs(120));
        let err = vm.stderr_text();
        assert_eq!(
            code,
            Some(159),
            "{role}: the VMM did not end with 128+SIGSYS: {err}"
        );
        let want = format!("vireo: seccomp: the {thread} thread (tid ");
        assert!(
            err.contains(&want),
            "{role}: no report naming the thread: {err}"
        );
        assert!(
            err.contains(") made a forbidden system call: syslog (103)"),
            "{role}: the report does not name the call: {err}"
        );
    }
    // Under --seccomp log the same call is let through (and logged by the
    // kernel): the VM runs on.
    let mut c = vireo();
    c.env("VIREO_TEST_FORBIDDEN_SYSCALL", "vcpu")
        .args(["--seccomp", "log", "run", "--accel", "emu", "--boot", "pvh"])
        .args(["--memory", "64M", "--kernel"])
        .arg(&kernel);
    let vm = Running::spawn(c);
    assert!(
        wait_until(Duration::from_secs(60), || dots(&vm) >= 3),
        "log mode: the guest did not run: {}",
        vm.stderr_text()
    );
    drop(vm);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn seccomp_off_installs_no_filter() {
    let dir = temp_dir("seccomp-off");
    let mut c = vireo();
    c.args(["--seccomp", "off", "run", "--accel", "emu", "--boot", "pvh"])
        .args(["--memory", "64M", "--kernel"])
        .arg(counting_guest(&dir));
    let vm = Running::spawn(c);
    assert!(
        wait_until(Duration::from_secs(60), || dots(&vm) >= 3),
        "the guest did not run: {}",
        vm.stderr_text()
    );
    for (name, seccomp) in seccomp_of_threads(vm.child.id()) {
        assert_eq!(
            seccomp, "0",
            "thread {name} is filtered under --seccomp off"
        );
    }
    drop(vm);
    let _ = std::fs::remove_dir_all(&dir);
}
