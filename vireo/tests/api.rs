//! The management API, end to end: a counting guest under `vireo run
//! --api-socket`, driven with the `vireo` client subcommands, on every
//! backend; and docs/openapi.json held against the server's routes.

mod common;

use common::*;
use std::collections::BTreeSet;
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

#[test]
fn pause_resume_info_stop_through_the_api() {
    for accel in accels() {
        let dir = std::env::temp_dir().join(format!("vireo-api-{accel}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("api.sock");
        let kernel = counting_guest(&dir);
        let mut cmd = vireo();
        cmd.args([
            "run", "--accel", accel, "--boot", "pvh", "--memory", "64M", "--kernel",
        ])
        .arg(&kernel)
        .arg("--api-socket")
        .arg(&sock);
        let mut vm = Running::spawn(cmd);
        assert!(
            wait_until(Duration::from_secs(60), || dots(&vm) >= 3),
            "{accel}: the guest did not count: {}",
            vm.stderr_text()
        );

        let ping = client(&["ping"], &sock);
        assert!(ping.status.success(), "{accel}: ping: {ping:?}");
        assert!(String::from_utf8_lossy(&ping.stdout).contains("\"version\""));

        let out = client(&["pause"], &sock);
        assert!(out.status.success(), "{accel}: pause: {out:?}");
        let frozen = dots(&vm);
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(dots(&vm), frozen, "{accel}: the guest ran while paused");

        let info = client(&["info"], &sock);
        assert!(info.status.success());
        let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(v["state"], "paused", "{v}");
        assert_eq!(v["accel"], accel);
        assert_eq!(v["vcpus"], 1);
        assert_eq!(v["memory_bytes"], 64 << 20);
        assert_eq!(v["config"]["kernel"], kernel.to_str().unwrap());
        assert!(v["devices"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["name"] == "serial (COM1)" && d["base"] == 0x3f8));

        // A second pause is refused and changes nothing.
        let again = client(&["pause"], &sock);
        assert_eq!(again.status.code(), Some(1));
        let err = String::from_utf8_lossy(&again.stderr);
        assert!(
            err.contains("already paused") && err.contains("409"),
            "{err}"
        );
        assert_eq!(dots(&vm), frozen);

        let out = client(&["resume"], &sock);
        assert!(out.status.success(), "{accel}: resume: {out:?}");
        assert!(
            wait_until(Duration::from_secs(30), || dots(&vm) > frozen),
            "{accel}: the guest did not run again after resume"
        );
        let info: serde_json::Value =
            serde_json::from_slice(&client(&["info"], &sock).stdout).unwrap();
        assert_eq!(info["state"], "running");
        let out = client(&["resume"], &sock);
        assert_eq!(out.status.code(), Some(1), "resume of a running VM");

        // Wrong method and unknown endpoint: JSON errors, right status.
        let (status, body) = vmm::api::client::request(&sock, "GET", "/api/v1/vm.pause").unwrap();
        assert_eq!(status, 405, "{body}");
        assert!(body.contains("\"error\""));
        let (status, _) = vmm::api::client::request(&sock, "GET", "/api/v1/nope").unwrap();
        assert_eq!(status, 404);
        assert!(dots(&vm) > frozen);

        let out = client(&["stop"], &sock);
        assert!(out.status.success(), "{accel}: stop: {out:?}");
        let code = vm.wait_exit(Duration::from_secs(10));
        assert_eq!(code, Some(0), "{accel}: {}", vm.stderr_text());
        assert!(vm.stderr_text().contains("stopped through the API"));
        assert!(!sock.exists(), "the API socket is removed on exit");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Exit code and stderr of a client call expected to fail.
fn refused(args: &[&str], sock: &Path) -> (Option<i32>, String) {
    let out = client(args, sock);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn state(sock: &Path) -> serde_json::Value {
    let out = client(&["info"], sock);
    assert!(out.status.success(), "info: {out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `vireo run --api-socket` alone starts an empty VMM; `vireo create` and
/// `vireo boot` give it a VM. Requests that do not fit the state are
/// refused and change nothing.
#[test]
fn an_empty_vmm_creates_and_boots_a_vm_through_the_api() {
    let dir = std::env::temp_dir().join(format!("vireo-api-create-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("api.sock");
    let kernel = counting_guest(&dir);
    let mut cmd = vireo();
    cmd.arg("run").arg("--api-socket").arg(&sock);
    let mut vm = Running::spawn(cmd);
    assert!(
        wait_until(Duration::from_secs(10), || client(&["ping"], &sock)
            .status
            .success()),
        "the empty VMM did not answer: {}",
        vm.stderr_text()
    );
    let v = state(&sock);
    assert_eq!(v["state"], "not-created", "{v}");
    assert!(v["config"].is_null());

    // Nothing to pause or boot yet.
    let (code, err) = refused(&["pause"], &sock);
    assert_eq!(code, Some(1));
    assert!(err.contains("no VM runs") && err.contains("409"), "{err}");
    let (code, err) = refused(&["boot"], &sock);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("no VM is created") && err.contains("409"),
        "{err}"
    );

    // A configuration naming a missing kernel, or too little memory, is refused.
    let missing = dir.join("no-such-kernel");
    let (code, err) = refused(&["create", "--kernel", missing.to_str().unwrap()], &sock);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("does not exist") && err.contains("400"),
        "{err}"
    );
    let k = kernel.to_str().unwrap();
    let (code, err) = refused(&["create", "--kernel", k, "--memory", "1M"], &sock);
    assert_eq!(code, Some(1));
    assert!(err.contains("too small") && err.contains("400"), "{err}");
    // A body that is not a configuration.
    let (status, body) =
        vmm::api::client::request_with_body(&sock, "PUT", "/api/v1/vm.create", "{\"cpus\": 1}")
            .unwrap();
    assert_eq!(status, 400, "{body}");
    assert_eq!(state(&sock)["state"], "not-created");

    let create = [
        "create", "--accel", "emu", "--boot", "pvh", "--memory", "64M", "--kernel", k,
    ];
    let out = client(&create, &sock);
    assert!(out.status.success(), "create: {out:?}");
    let v = state(&sock);
    assert_eq!(v["state"], "created", "{v}");
    assert_eq!(v["config"]["kernel"], k);
    let (code, err) = refused(&create, &sock);
    assert_eq!(code, Some(1));
    assert!(err.contains("already created"), "{err}");
    // Delete and create again.
    assert!(client(&["delete"], &sock).status.success());
    assert_eq!(state(&sock)["state"], "not-created");
    assert!(client(&create, &sock).status.success());
    assert_eq!(dots(&vm), 0, "nothing runs before boot");

    let out = client(&["boot"], &sock);
    assert!(out.status.success(), "boot: {out:?}");
    assert!(
        wait_until(Duration::from_secs(60), || dots(&vm) >= 3),
        "the booted guest did not count: {}",
        vm.stderr_text()
    );
    let v = state(&sock);
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(v["accel"], "emu");
    assert_eq!(v["memory_bytes"], 64 << 20);
    assert_eq!(v["config"]["kernel"], k);
    // One VM per VMM.
    let (code, err) = refused(&create, &sock);
    assert_eq!(code, Some(1));
    assert!(err.contains("already runs") && err.contains("409"), "{err}");
    let (code, _) = refused(&["boot"], &sock);
    assert_eq!(code, Some(1));
    let out = client(&["pause"], &sock);
    assert!(out.status.success(), "pause: {out:?}");
    assert_eq!(state(&sock)["state"], "paused");

    let out = client(&["shutdown"], &sock);
    assert!(out.status.success(), "shutdown: {out:?}");
    assert_eq!(vm.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(!sock.exists(), "the API socket is removed on exit");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `vmm.shutdown` ends an empty VMM too.
#[test]
fn an_empty_vmm_shuts_down_through_the_api() {
    let dir = std::env::temp_dir().join(format!("vireo-api-empty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("api.sock");
    let mut cmd = vireo();
    cmd.arg("run").arg("--api-socket").arg(&sock);
    let mut vm = Running::spawn(cmd);
    assert!(wait_until(Duration::from_secs(10), || client(
        &["ping"],
        &sock
    )
    .status
    .success()));
    let out = client(&["shutdown"], &sock);
    assert!(out.status.success(), "shutdown: {out:?}");
    assert_eq!(vm.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(vm.stderr_text().contains("stopped through the API"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn client_without_a_server_says_so() {
    let out = client(&["info"], Path::new("/nonexistent/api.sock"));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot connect to API socket"), "{err}");
}

/// docs/openapi.json documents exactly the routes the server answers.
#[test]
fn openapi_document_matches_the_server() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json");
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let mut documented = BTreeSet::new();
    for (p, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            documented.insert((method.to_uppercase(), p.clone()));
            assert!(op["responses"].as_object().is_some_and(|r| !r.is_empty()));
        }
    }
    let served: BTreeSet<(String, String)> = vmm::api::ROUTES
        .iter()
        .map(|(m, p, _)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, served);
}

fn info_json(sock: &Path) -> serde_json::Value {
    let out = client(&["info"], sock);
    assert!(out.status.success(), "info: {out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The balloon API on a guest with no balloon driver: the target is kept
/// and shown, bad targets are refused with the right status and change
/// nothing, and a VM without a balloon says so.
#[test]
fn balloon_target_through_the_api() {
    let dir = std::env::temp_dir().join(format!("vireo-api-balloon-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = counting_guest(&dir);
    let start = |sock: &Path, extra: &[&str]| {
        let mut cmd = vireo();
        cmd.args([
            "run", "--accel", "emu", "--boot", "pvh", "--memory", "64M", "--kernel",
        ])
        .arg(&kernel)
        .args(extra)
        .arg("--api-socket")
        .arg(sock);
        let vm = Running::spawn(cmd);
        assert!(
            wait_until(Duration::from_secs(60), || sock.exists() && dots(&vm) >= 1),
            "the VM did not start: {}",
            vm.stderr_text()
        );
        vm
    };

    let sock = dir.join("b.sock");
    let mut vm = start(&sock, &["--balloon", "deflate_on_oom=off"]);
    let b = &info_json(&sock)["balloon"];
    assert_eq!(b["target_mib"], 0, "{b}");
    assert_eq!(b["actual_mib"], 0);
    assert_eq!(b["options"]["deflate_on_oom"], false);
    assert_eq!(b["options"]["stats"], true);
    assert_eq!(
        info_json(&sock)["config"]["balloon"]["deflate_on_oom"],
        false
    );

    let out = client(&["balloon", "--target-mib", "16"], &sock);
    assert!(out.status.success(), "{out:?}");
    let b = &info_json(&sock)["balloon"];
    assert_eq!(
        (b["target_mib"].as_u64(), b["num_pages"].as_u64()),
        (Some(16), Some(4096))
    );
    assert_eq!(b["actual_mib"], 0, "no driver, nothing given");

    let out = client(&["balloon", "--target-mib", "65"], &sock);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("more than the guest's 64 MiB") && err.contains("400"),
        "{err}"
    );
    for body in [r#"{"target":1}"#, r#"{"target_mib":-1}"#, "nonsense"] {
        let (status, text) =
            vmm::api::client::request_with_body(&sock, "PUT", "/api/v1/vm.balloon", body).unwrap();
        assert_eq!(status, 400, "{body}: {text}");
        assert!(text.contains("\"error\""));
    }
    let (status, _) = vmm::api::client::request(&sock, "GET", "/api/v1/vm.balloon").unwrap();
    assert_eq!(status, 405);
    assert_eq!(info_json(&sock)["balloon"]["target_mib"], 16, "unchanged");
    assert!(client(&["stop"], &sock).status.success());
    assert_eq!(vm.wait_exit(Duration::from_secs(10)), Some(0));

    let sock = dir.join("nb.sock");
    let mut vm = start(&sock, &[]);
    assert!(info_json(&sock)["balloon"].is_null());
    let out = client(&["balloon", "--target-mib", "1"], &sock);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no balloon device") && err.contains("409"),
        "{err}"
    );
    assert!(client(&["stop"], &sock).status.success());
    assert_eq!(vm.wait_exit(Duration::from_secs(10)), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

/// An empty VMM started by `sh -c "<prefix>; exec vireo run --api-socket
/// SOCK"` (a umask, a file limit), answering pings.
fn empty_vmm_under(prefix: &str, sock: &Path) -> Running {
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg(format!("{prefix}; exec \"$0\" run --api-socket \"$1\""))
        .arg(env!("CARGO_BIN_EXE_vireo"))
        .arg(sock);
    let vm = Running::spawn(cmd);
    assert!(
        wait_until(Duration::from_secs(10), || client(&["ping"], sock)
            .status
            .success()),
        "the empty VMM did not answer: {}",
        vm.stderr_text()
    );
    vm
}

/// The API socket is 0600 even under umask 000 (another user must not
/// pause or snapshot the VM), and a path holding a file that is not a
/// stale socket is refused and left alone, at start and at exit.
#[test]
fn the_api_socket_is_private_and_replaces_nothing() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("vireo-api-sockmode-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("api.sock");
    let mut vm = empty_vmm_under("umask 000", &sock);
    let mode = std::fs::symlink_metadata(&sock)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "the API socket's mode");
    assert!(client(&["shutdown"], &sock).status.success());
    assert_eq!(vm.wait_exit(Duration::from_secs(10)), Some(0));

    std::fs::write(&sock, b"not a socket").unwrap();
    let out = vireo()
        .arg("run")
        .arg("--api-socket")
        .arg(&sock)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&sock).unwrap(), b"not a socket");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Past the open-file limit the API refuses connections for a while but
/// never loses its listener: once the clients go, it answers again.
#[test]
fn the_api_survives_running_out_of_file_descriptors() {
    let dir = std::env::temp_dir().join(format!("vireo-api-nofile-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("api.sock");
    let vm = empty_vmm_under("ulimit -n 24", &sock);
    // More idle clients than the VMM has descriptors left.
    let flood: Vec<std::os::unix::net::UnixStream> = (0..100)
        .filter_map(|_| std::os::unix::net::UnixStream::connect(&sock).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    drop(flood);
    assert!(
        wait_until(Duration::from_secs(30), || client(&["ping"], &sock)
            .status
            .success()),
        "the API did not come back: {}",
        vm.stderr_text()
    );
    let err = vm.stderr_text();
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("Too many open files"),
        "the flood did not reach the file limit: {err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A 1 GiB header line does not grow the VMM: it is refused at the head
/// limit, and the VMM's resident memory stays put.
#[test]
fn a_huge_header_is_refused_without_being_read() {
    use std::io::{Read, Write};
    let dir = std::env::temp_dir().join(format!("vireo-api-bighead-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("api.sock");
    let vm = empty_vmm_under("true", &sock);
    let rss = |pid: u32| -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap()
    };
    let before = rss(vm.child.id());
    let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    c.write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\nX-Big: ")
        .unwrap();
    let chunk = vec![b'a'; 1 << 20];
    // The server answers and closes long before 1 GiB; writing then fails.
    for _ in 0..1024 {
        if c.write_all(&chunk).is_err() {
            break;
        }
    }
    let mut answer = String::new();
    let _ = c.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    let after = rss(vm.child.id());
    assert!(
        after < before + 16 * 1024,
        "RSS grew from {before} kB to {after} kB"
    );
    assert!(client(&["ping"], &sock).status.success());
    let _ = std::fs::remove_dir_all(&dir);
}
