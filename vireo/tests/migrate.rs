//! Live migration between two Vireo processes on this host: the a..z
//! counting guest (its counter in guest memory) keeps running while its
//! memory is copied, and the destination's letters continue the source's
//! with nothing repeated and nothing skipped. A cut stream leaves the source
//! running; a stream that is not a migration is refused.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vireo-mig-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The letters guest, running and counting, with its API on `sock`.
fn source(accel: &str, memory: &str, dir: &Path, devices: bool, sock: &Path) -> Running {
    source_in(None, accel, memory, dir, devices, sock)
}

/// `vireo` to run inside network namespace `ns`, or here.
fn vireo_in(ns: Option<&str>) -> std::process::Command {
    match ns {
        Some(ns) => {
            let mut c = std::process::Command::new("ip");
            c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_vireo")]);
            c
        }
        None => vireo(),
    }
}

fn source_in(
    ns: Option<&str>,
    accel: &str,
    memory: &str,
    dir: &Path,
    devices: bool,
    sock: &Path,
) -> Running {
    let mut extra = Vec::new();
    let disk_opt;
    if devices {
        // One host: both processes use the same disk file, in turn.
        let disk = dir.join("disk.img");
        std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
        disk_opt = format!("path={},format=raw", disk.display());
        extra = vec!["--disk", &disk_opt, "--rng"];
    }
    start_letters(vireo_in(ns), dir, accel, memory, &extra, sock)
}

/// The letters guest started by `cmd` (a `vireo`, perhaps in a namespace
/// or with global options) under `accel` with `memory`, the further run
/// options `extra` and its API on `sock`; returned once it counts.
fn start_letters(
    mut cmd: std::process::Command,
    dir: &Path,
    accel: &str,
    memory: &str,
    extra: &[&str],
    sock: &Path,
) -> Running {
    let kernel = counting_guest(dir);
    cmd.args(["run", "--accel", accel, "--boot", "pvh", "--memory", memory])
        .args(extra)
        .arg("--kernel")
        .arg(&kernel)
        .arg("--api-socket")
        .arg(sock);
    let src = Running::spawn(cmd);
    assert!(
        wait_until(Duration::from_secs(60), || src.stdout_text().len() >= 30),
        "the guest did not count: {}",
        src.stderr_text()
    );
    src
}

/// `vireo migrate-receive` on `port`, once it listens.
fn destination(port: u16, sock: Option<&Path>) -> Running {
    receive(vireo(), &[], "127.0.0.1", port, sock)
}

/// `cmd` (a `vireo`, perhaps in a namespace or with global options) as
/// `-v migrate-receive` with the options `extra`, listening on
/// `ip:port`, with its API on `sock` if given; returned once it listens.
fn receive(
    mut cmd: std::process::Command,
    extra: &[&str],
    ip: &str,
    port: u16,
    sock: Option<&Path>,
) -> Running {
    cmd.args(["-v", "migrate-receive"])
        .args(extra)
        .arg("--listen")
        .arg(format!("{ip}:{port}"));
    if let Some(s) = sock {
        cmd.arg("--api-socket").arg(s);
    }
    let dst = Running::spawn(cmd);
    assert!(
        wait_until(Duration::from_secs(20), || dst
            .stderr_text()
            .contains("waiting for a migration")),
        "the destination does not listen: {}",
        dst.stderr_text()
    );
    dst
}

/// Stop the VM at `sock` through its API and see its VMM exit with 0.
fn stop(vm: &mut Running, sock: &Path) {
    assert!(client(&["stop"], sock).status.success());
    assert_eq!(
        vm.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        vm.stderr_text()
    );
}

/// Stop the migrated guest (`dst`, its API on `sock`) and check that its
/// letters continue `before` (the source's) with nothing repeated and
/// nothing skipped.
fn stop_and_check_count(dst: &mut Running, sock: &Path, before: &str) {
    stop(dst, sock);
    assert_unbroken_cycle(&format!("{before}{}", dst.stdout_text()));
}

/// A fake destination on a new port, in a thread: it takes one
/// connection, greets it as a destination that needs no key, and hands it
/// to `then`. (The port; the thread, which returns what `then` did.)
fn fake_destination<T: Send + 'static>(
    then: impl FnOnce(std::net::TcpStream) -> T + Send + 'static,
) -> (u16, std::thread::JoinHandle<T>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let fake = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(&migration_greeting(false)).unwrap();
        then(s)
    });
    (port, fake)
}

/// The VM at `sock` says it is running, and its guest (`vm`) counts on
/// 20 more letters; `what` says what failed otherwise.
fn runs_on(vm: &Running, sock: &Path, what: &str) {
    let info = client(&["info"], sock);
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["state"], "running");
    let n = vm.stdout_text().len();
    assert!(
        wait_until(Duration::from_secs(30), || vm.stdout_text().len() >= n + 20),
        "{what}"
    );
}

/// `vireo migrate --api-socket <sock> --to <to>`, run to completion.
fn migrate_to(sock: &Path, to: &str) -> std::process::Output {
    vireo()
        .args(["migrate", "--api-socket"])
        .arg(sock)
        .arg("--to")
        .arg(to)
        .output()
        .unwrap()
}

/// Migrate the letters guest at `sock` to `to` and check the handover:
/// `vireo migrate` succeeds and reports its figures, the source exits 0
/// saying where the VM went, and the destination counts on to at least
/// `letters` letters. (What `vireo migrate` printed, the source's letters,
/// the destination's `vm.info`.)
fn hand_over(
    src: &mut Running,
    sock: &Path,
    to: &str,
    dst: &Running,
    sock2: &Path,
    letters: usize,
) -> (String, String, serde_json::Value) {
    let out = migrate_to(sock, to);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "migrate: {out:?}\n{}",
        dst.stderr_text()
    );
    assert!(
        said.contains("downtime") && said.contains("iterations"),
        "{said}"
    );
    assert_eq!(
        src.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        src.stderr_text()
    );
    assert!(
        src.stderr_text().contains("migrated to"),
        "{}",
        src.stderr_text()
    );
    assert!(
        wait_until(Duration::from_secs(60), || dst.stdout_text().len()
            >= letters),
        "the migrated guest did not count on: {}",
        dst.stderr_text()
    );
    let info = client(&["info"], sock2);
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    (said, src.stdout_text(), v)
}

/// Where the two processes run: namespaces for each and the destination's
/// address, or both here on localhost.
struct Placement<'a> {
    src_ns: Option<&'a str>,
    dst_ns: Option<&'a str>,
    dst_ip: &'a str,
    /// The destination is an empty VMM (`vireo run --api-socket` alone)
    /// told to receive through its API (`vireo migrate-receive --into`).
    via_api: bool,
}

const HERE: Placement<'static> = Placement {
    src_ns: None,
    dst_ns: None,
    dst_ip: "127.0.0.1",
    via_api: false,
};

/// An empty VMM serving `sock`, told through its API to wait for a
/// migration on `port`; (the VMM, the waiting `migrate-receive --into`).
fn destination_via_api(port: u16, sock: &Path) -> (Running, Running) {
    let mut cmd = vireo();
    cmd.args(["-v", "run", "--api-socket"]).arg(sock);
    let vmm = Running::spawn(cmd);
    assert!(wait_until(Duration::from_secs(10), || client(
        &["ping"],
        sock
    )
    .status
    .success()));
    let mut cmd = vireo();
    cmd.args(["migrate-receive", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--into")
        .arg(sock);
    let request = Running::spawn(cmd);
    assert!(
        wait_until(Duration::from_secs(20), || vmm
            .stderr_text()
            .contains("waiting for a migration")),
        "the empty VMM does not listen: {}",
        vmm.stderr_text()
    );
    (vmm, request)
}

fn letters_migrate(accel: &str, memory: &str, devices: bool) {
    letters_migrate_between(accel, memory, devices, &HERE)
}

fn letters_migrate_between(accel: &str, memory: &str, devices: bool, at: &Placement) {
    let api = if at.via_api { "-api" } else { "" };
    let dir = scratch(&format!("{accel}-{memory}{api}"));
    let (sock, sock2) = (dir.join("a.sock"), dir.join("b.sock"));
    let mut src = source_in(at.src_ns, accel, memory, &dir, devices, &sock);
    let port = free_port();
    let (mut dst, mut request) = if at.via_api {
        let (vmm, request) = destination_via_api(port, &sock2);
        (vmm, Some(request))
    } else {
        (
            receive(vireo_in(at.dst_ns), &[], at.dst_ip, port, Some(&sock2)),
            None,
        )
    };
    let (said, before, v) = hand_over(
        &mut src,
        &sock,
        &format!("{}:{port}", at.dst_ip),
        &dst,
        &sock2,
        60,
    );
    eprintln!("{accel} {memory} devices={devices}: {said}");
    if let Some(r) = &mut request {
        // `migrate-receive --into` answered once the VM ran in the VMM.
        assert_eq!(
            r.wait_exit(Duration::from_secs(20)),
            Some(0),
            "{}",
            r.stderr_text()
        );
    }
    assert_eq!(v["state"], "running");
    assert_eq!(v["accel"], accel);
    assert_eq!(v["config"]["rng"], devices);
    stop_and_check_count(&mut dst, &sock2, &before);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn engine_letters_guest_migrates_while_running_and_counts_on() {
    letters_migrate("emu", "256M", false);
}

#[test]
fn engine_letters_guest_migrates_into_an_empty_vmm_through_its_api() {
    letters_migrate_between(
        "emu",
        "256M",
        false,
        &Placement {
            via_api: true,
            ..HERE
        },
    );
}

/// Two network namespaces joined by a veth pair, removed on drop.
struct NsPair {
    a: String,
    b: String,
}

impl NsPair {
    fn new() -> Self {
        let id = std::process::id() % 100_000;
        let (a, b) = (format!("vireo-ma{id}"), format!("vireo-mb{id}"));
        let sh = |c: String| {
            let st = std::process::Command::new("sh")
                .args(["-c", &c])
                .status()
                .unwrap();
            assert!(st.success(), "{c}");
        };
        for n in [&a, &b] {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", n])
                .output();
            sh(format!("ip netns add {n} && ip -n {n} link set lo up"));
        }
        sh(format!(
            "ip link add vma{id} netns {a} type veth peer name vmb{id} netns {b} && \
             ip -n {a} addr add 10.214.0.1/24 dev vma{id} && ip -n {a} link set vma{id} up && \
             ip -n {b} addr add 10.214.0.2/24 dev vmb{id} && ip -n {b} link set vmb{id} up"
        ));
        NsPair { a, b }
    }
}

impl Drop for NsPair {
    fn drop(&mut self) {
        for n in [&self.a, &self.b] {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", n])
                .output();
        }
    }
}

/// The source in one network namespace, the destination in another: the
/// stream crosses a veth pair, as between two hosts.
#[test]
fn engine_guest_migrates_between_two_network_namespaces() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("note: needs root (network namespaces); test skipped");
        return;
    }
    let ns = NsPair::new();
    letters_migrate_between(
        "emu",
        "256M",
        false,
        &Placement {
            src_ns: Some(&ns.a),
            dst_ns: Some(&ns.b),
            dst_ip: "10.214.0.2",
            via_api: false,
        },
    );
}

#[test]
fn engine_guest_with_virtio_devices_migrates() {
    letters_migrate("emu", "64M", true);
}

#[test]
fn kvm_letters_guest_migrates_while_running_and_counts_on() {
    if !kvm_usable() {
        return;
    }
    letters_migrate("kvm", "256M", false);
}

/// A destination that takes the stream but never says it caught up: the
/// source waits; meanwhile the API still answers (requests run
/// concurrently), pausing is refused, and `vireo migrate-cancel` gives the
/// migration up: the source runs on.
#[test]
fn a_cancelled_migration_leaves_the_source_running() {
    let dir = scratch("cancel");
    let sock = dir.join("a.sock");
    let mut src = source("emu", "64M", &dir, true, &sock);
    let (accepted_tx, accepted) = std::sync::mpsc::channel();
    let (port, fake) = fake_destination(move |mut s| {
        accepted_tx.send(()).unwrap();
        // Drain until the source cuts the stream; never answer.
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut s, &mut sink);
        sink.len()
    });
    let mut cmd = vireo();
    cmd.args(["migrate", "--max-bandwidth-mib", "64", "--api-socket"])
        .arg(&sock)
        .arg("--to")
        .arg(format!("127.0.0.1:{port}"));
    let mut mig = Running::spawn(cmd);
    accepted.recv_timeout(Duration::from_secs(20)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let info = client(&["info"], &sock);
    assert!(info.status.success(), "info during a migration: {info:?}");
    let out = client(&["pause"], &sock);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("migration is in progress"), "{err}");

    let out = client(&["migrate-cancel"], &sock);
    assert!(out.status.success(), "migrate-cancel: {out:?}");
    assert_eq!(mig.wait_exit(Duration::from_secs(20)), Some(1));
    let err = mig.stderr_text();
    assert!(
        err.contains("the migration was cancelled") && err.contains("409"),
        "{err}"
    );
    assert!(
        fake.join().unwrap() > 0,
        "the destination got the start of the stream"
    );
    let out = client(&["migrate-cancel"], &sock);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no migration is in progress"));

    runs_on(&src, &sock, "the source did not run on after the cancel");
    stop(&mut src, &sock);
    assert_unbroken_cycle(&src.stdout_text());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A destination that reads the whole migration and then refuses the VM
/// (as `vireo migrate-receive` does when it cannot build it): the source
/// takes its disk back and runs on.
#[test]
fn a_destination_that_refuses_leaves_the_source_running() {
    let dir = scratch("refused");
    let sock = dir.join("a.sock");
    let mut src = source("emu", "64M", &dir, true, &sock);
    let (port, fake) = fake_destination(|mut s| {
        let mut r = std::io::BufReader::new(s.try_clone().unwrap());
        let mut w = s.try_clone().unwrap();
        let got = vmm::migration::read_stream(&mut r, &mut w).map(|(m, _)| m.vcpus);
        let no = vmm::VmmError::Config("no room here".into());
        vmm::migration::answer(&mut s, &Err(no)).unwrap();
        got.unwrap()
    });
    let out = migrate_to(&sock, &format!("127.0.0.1:{port}"));
    assert_eq!(fake.join().unwrap(), 1, "the whole VM arrived");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the destination refused the VM: no room here"),
        "{err}"
    );
    runs_on(&src, &sock, "the source stopped counting after the refusal");
    // The source holds its disk again.
    let other = vireo()
        .args(["run", "--accel", "emu", "--kernel"])
        .arg(dir.join("letters.elf"))
        .arg("--disk")
        .arg(format!(
            "path={},format=raw",
            dir.join("disk.img").display()
        ))
        .output()
        .unwrap();
    assert_eq!(other.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&other.stderr).contains("lock held"));
    stop(&mut src, &sock);
    assert_unbroken_cycle(&src.stdout_text());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A device that cannot migrate (the balloon has no saved state yet) is
/// found after pre-copy, with the guest paused: it runs on.
/// A VM with a virtio-balloon (was refused before the balloon had a
/// snapshot state): it migrates, the destination has the balloon with the
/// same options, and the count goes on.
#[test]
fn a_vm_with_a_balloon_migrates() {
    let dir = scratch("balloon");
    let (sock, sock2) = (dir.join("a.sock"), dir.join("b.sock"));
    let extra = ["--balloon", "stats=off"];
    let mut src = start_letters(vireo(), &dir, "emu", "64M", &extra, &sock);
    // A target the guest (no balloon driver) never acts on travels too.
    assert!(client(&["balloon", "--target-mib", "8"], &sock)
        .status
        .success());
    let port = free_port();
    let mut dst = destination(port, Some(&sock2));
    let to = format!("127.0.0.1:{port}");
    let (_, before, v) = hand_over(&mut src, &sock, &to, &dst, &sock2, 60);
    assert_eq!(v["state"], "running");
    assert_eq!(v["balloon"]["target_mib"], 8, "{v}");
    assert_eq!(v["balloon"]["actual_mib"], 0, "{v}");
    assert_eq!(v["balloon"]["options"]["stats"], false, "{v}");
    assert_eq!(v["balloon"]["options"]["deflate_on_oom"], true, "{v}");
    stop_and_check_count(&mut dst, &sock2, &before);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_cut_stream_leaves_the_source_running() {
    let dir = scratch("cut");
    let sock = dir.join("a.sock");
    let mut src = source("emu", "64M", &dir, false, &sock);
    // A fake destination: takes some of the stream, then hangs up.
    let (port, fake) = fake_destination(|mut s| {
        let mut buf = vec![0u8; 100_000];
        let _ = s.read_exact(&mut buf);
        drop(s);
        buf
    });
    let out = migrate_to(&sock, &format!("127.0.0.1:{port}"));
    let got = fake.join().unwrap();
    assert_eq!(&got[..8], b"VIREOMIG");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("migration"), "{err}");
    // The guest runs on here.
    runs_on(
        &src,
        &sock,
        "the source stopped counting after a failed migration",
    );
    // Nothing listens at all: refused at once, still running.
    let out = migrate_to(&sock, &format!("127.0.0.1:{}", free_port()));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"));
    stop(&mut src, &sock);
    assert_unbroken_cycle(&src.stdout_text());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Connect to a destination and read its greeting; the connection and
/// whether it demands a key.
fn greeted(port: u16) -> (std::net::TcpStream, bool) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut g = [0u8; 41];
    s.read_exact(&mut g).unwrap();
    assert_eq!(&g[..8], b"VIREODST");
    (s, g[8] == 1)
}

/// The answer a turned-away connection gets: 'N' and the message.
fn turned_away(s: &mut std::net::TcpStream) -> String {
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert_eq!(rest.first(), Some(&b'N'), "{rest:?}");
    String::from_utf8_lossy(&rest[5.min(rest.len())..]).into_owned()
}

/// Streams that are not migrations, cut headers, a port scan and absurd
/// VMs are each turned away with a clear message, and the destination
/// keeps waiting: none of them ends a planned receive.
#[test]
fn a_destination_turns_away_what_is_not_a_migration_and_waits_on() {
    let port = free_port();
    let mut dst = destination(port, None);
    let (mut s, key) = greeted(port);
    assert!(!key);
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let said = turned_away(&mut s);
    assert!(said.contains("not a Vireo migration stream"), "{said}");
    // A stream cut after a good header.
    let (mut s, _) = greeted(port);
    s.write_all(b"VIREOMIG\x03\x00\x00\x00").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let said = turned_away(&mut s);
    assert!(said.contains("ended before"), "{said}");
    // A port scan: connect and go.
    drop(std::net::TcpStream::connect(("127.0.0.1", port)).unwrap());
    // 8 TiB of memory: more than vm.create allows.
    let (mut s, _) = greeted(port);
    let hello = br#"{"vireo":"x","accel":"emu","memory_bytes":8796093022208,"vcpus":1}"#;
    s.write_all(b"VIREOMIG\x03\x00\x00\x00").unwrap();
    s.write_all(&(hello.len() as u32).to_le_bytes()).unwrap();
    s.write_all(hello).unwrap();
    let said = turned_away(&mut s);
    assert!(said.contains("not a VM Vireo runs"), "{said}");
    // Still waiting.
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        dst.child.try_wait().unwrap().is_none(),
        "{}",
        dst.stderr_text()
    );
    let (_s, _) = greeted(port);
    let err = dst.stderr_text();
    assert!(err.matches("turned away").count() >= 4, "{err}");
    dst.kill();
}

/// Once a source is accepted its whole stream must arrive within
/// --migration-timeout: a byte now and then does not keep the destination
/// waiting, and the message says which limit passed.
#[test]
fn a_trickling_source_is_cut_off_by_the_overall_deadline() {
    let port = free_port();
    let mut cmd = vireo();
    cmd.args(["--migration-timeout", "3"]);
    let mut dst = receive(cmd, &[], "127.0.0.1", port, None);
    let (mut s, _) = greeted(port);
    let hello = br#"{"vireo":"x","accel":"emu","memory_bytes":67108864,"vcpus":1}"#;
    s.write_all(b"VIREOMIG\x03\x00\x00\x00").unwrap();
    s.write_all(&(hello.len() as u32).to_le_bytes()).unwrap();
    s.write_all(hello).unwrap();
    let start = std::time::Instant::now();
    // One page announced, then its bytes one a second.
    s.write_all(b"P\x01\x00\x00\x00").unwrap();
    for _ in 0..20 {
        if s.write_all(&[0]).is_err() || dst.child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    assert_eq!(dst.wait_exit(Duration::from_secs(10)), Some(1));
    assert!(start.elapsed() < Duration::from_secs(10));
    let err = dst.stderr_text();
    assert!(err.contains("did not complete within 3 s"), "{err}");
}

/// With a migration key only a source holding it is taken: an impostor
/// with a wrong answer and a source with no key are turned away (the
/// destination waits on), then the keyed source migrates.
#[test]
fn a_keyed_destination_takes_only_the_source_with_the_key() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch("keyed");
    let key = dir.join("mig.key");
    std::fs::write(&key, "a shared secret of enough length\n").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (sock, sock2) = (dir.join("a.sock"), dir.join("b.sock"));
    // A source without the key.
    let mut plain = source("emu", "64M", &dir, false, &sock);
    let port = free_port();
    let key_file = key.to_str().unwrap();
    let with_key = ["--migration-key-file", key_file];
    let mut dst = receive(vireo(), &with_key, "127.0.0.1", port, Some(&sock2));
    // An impostor answering the challenge with the wrong tag.
    let (mut s, needs_key) = greeted(port);
    assert!(needs_key);
    s.write_all(b"VIREOMIG\x03\x00\x00\x00").unwrap();
    s.write_all(&[7u8; 32]).unwrap();
    let said = turned_away(&mut s);
    assert!(said.contains("wrong migration key"), "{said}");
    // The keyless source is refused and runs on.
    let out = migrate_to(&sock, &format!("127.0.0.1:{port}"));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("requires a migration key"), "{err}");
    stop(&mut plain, &sock);

    // The source with the key.
    let mut src = start_letters(vireo(), &dir, "emu", "64M", &with_key, &sock);
    let (_, before, v) = hand_over(
        &mut src,
        &sock,
        &format!("127.0.0.1:{port}"),
        &dst,
        &sock2,
        60,
    );
    assert_eq!(v["state"], "running");
    stop_and_check_count(&mut dst, &sock2, &before);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Debian on the engine with a raw ext4 disk (the same file for both
/// processes, on this host) and virtio-rng, counting to the console and
/// to a file on the disk, migrated mid-count while it runs: the
/// destination counts on to the end and powers off; both consoles form one
/// unbroken sequence, and so does the file.
#[test]
fn debian_counting_to_console_and_disk_continues_across_an_engine_migration() {
    let dir = scratch("linux");
    let (mut src, disk, sock) = spawn_debian_counter(&dir);
    let port = free_port();
    let mut dst = destination(port, None);
    let out = migrate_to(&sock, &format!("127.0.0.1:{port}"));
    assert!(
        out.status.success(),
        "migrate: {out:?}\n{}",
        dst.stderr_text()
    );
    eprintln!("debian: {}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(src.wait_exit(Duration::from_secs(10)), Some(0));
    let before = src.stdout_text();
    let code = dst.wait_exit(Duration::from_secs(900));
    let after = dst.stdout_text();
    assert_eq!(
        code,
        Some(0),
        "the migrated guest did not finish:\n{after}\n{}",
        dst.stderr_text()
    );
    assert!(after.contains("VIREO-CMD-END rc=0"), "{after}");
    let all: Vec<u64> = count_lines(&format!("{before}{after}"))
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        all,
        (1..=LAST_COUNT).collect::<Vec<_>>(),
        "before:\n{before}\nafter:\n{after}"
    );
    let (on_disk, text) = counts_on_disk(&disk);
    assert_eq!(on_disk, (1..=LAST_COUNT).collect::<Vec<_>>(), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A portable-CPU letters guest live-migrates from `from` to a
/// `migrate-receive --accel to`, and counts on there unbroken.
fn letters_migrate_across(from: &str, to: &str) {
    let dir = scratch(&format!("{from}-to-{to}"));
    let (sock, sock2) = (dir.join("a.sock"), dir.join("b.sock"));
    let portable = ["--cpu-model", "portable"];
    let mut src = start_letters(vireo(), &dir, from, "64M", &portable, &sock);
    let port = free_port();
    // The TSC rates differ (host rate under KVM, 1 GHz in the engine);
    // the letters guest does not read the TSC.
    let extra = ["--accel", to, "--allow-tsc-change"];
    let mut dst = receive(vireo(), &extra, "127.0.0.1", port, Some(&sock2));
    let dest = format!("127.0.0.1:{port}");
    let (_, before, v) = hand_over(&mut src, &sock, &dest, &dst, &sock2, 30);
    assert_eq!(v["accel"], to);
    stop_and_check_count(&mut dst, &sock2, &before);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn portable_guest_migrates_from_the_engine_to_kvm_and_back() {
    if !kvm_usable() {
        return;
    }
    letters_migrate_across("emu", "kvm");
    letters_migrate_across("kvm", "emu");
}

/// A CA made for a test: its certificate and key.
struct TestCa(rcgen::Certificate, rcgen::KeyPair);

impl TestCa {
    fn new(name: &str) -> TestCa {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        let k = rcgen::KeyPair::generate().unwrap();
        TestCa(p.self_signed(&k).unwrap(), k)
    }

    /// Files for one host under `dir`: its certificate for 127.0.0.1 (as
    /// server and client), its key (0600), and this CA's certificate;
    /// (cert, key, ca).
    fn host(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let mut p = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        p.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let k = rcgen::KeyPair::generate().unwrap();
        let c = p.signed_by(&k, &self.0, &self.1).unwrap();
        let (cert, key, ca) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
            dir.join(format!("{name}-ca.crt")),
        );
        std::fs::write(&cert, c.pem()).unwrap();
        std::fs::write(&key, k.serialize_pem()).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&ca, self.0.pem()).unwrap();
        (cert, key, ca)
    }
}

/// The global options that give a VMM these TLS files.
fn tls_args(cmd: &mut std::process::Command, cert: Option<&Path>, key: Option<&Path>, ca: &Path) {
    if let (Some(cert), Some(key)) = (cert, key) {
        cmd.arg("--migration-tls-cert")
            .arg(cert)
            .arg("--migration-tls-key")
            .arg(key);
    }
    cmd.arg("--migration-tls-ca").arg(ca);
}

/// The letters guest with its API on `sock`, given TLS files.
fn tls_source(dir: &Path, sock: &Path, files: Option<(&Path, &Path, &Path)>) -> Running {
    let mut cmd = vireo();
    if let Some((cert, key, ca)) = files {
        tls_args(&mut cmd, Some(cert), Some(key), ca);
    }
    start_letters(cmd, dir, "emu", "64M", &[], sock)
}

/// A TCP relay from a new port to `to` that keeps every byte the source
/// sends: what a network eavesdropper sees. (The port; the bytes, once
/// the connection ends.)
fn eavesdropper(to: u16) -> (u16, std::thread::JoinHandle<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let relay = std::thread::spawn(move || {
        let (mut from_src, _) = listener.accept().unwrap();
        let mut to_dst = std::net::TcpStream::connect(("127.0.0.1", to)).unwrap();
        let (mut back_src, mut back_dst) =
            (from_src.try_clone().unwrap(), to_dst.try_clone().unwrap());
        let answers = std::thread::spawn(move || {
            let _ = std::io::copy(&mut back_dst, &mut back_src);
            let _ = back_src.shutdown(std::net::Shutdown::Write);
        });
        let mut seen = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match from_src.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    seen.extend_from_slice(&buf[..n]);
                    if to_dst.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to_dst.shutdown(std::net::Shutdown::Write);
        let _ = answers.join();
        seen
    });
    (port, relay)
}

/// What of a migration an eavesdropper's bytes show in clear: the
/// stream's header, the VM's state (the manifest's JSON), the guest's
/// memory (the letters guest's code, which sits in its RAM at 1 MiB).
fn in_clear(seen: &[u8]) -> (bool, bool, bool) {
    let find = |needle: &[u8]| seen.windows(needle.len()).any(|w| w == needle);
    let code = &arch::tiny_elf::letters_guest(20_000)[0x1000..];
    (find(b"VIREOMIG"), find(b"\"vcpu_states\""), find(code))
}

/// The control for the TLS test's eavesdropper: without TLS it sees the
/// stream's header, the VM's state and the guest's memory.
#[test]
fn without_tls_an_eavesdropper_sees_the_guest() {
    let dir = scratch("clear");
    let (sock, sock2) = (dir.join("a.sock"), dir.join("b.sock"));
    let mut src = source("emu", "64M", &dir, false, &sock);
    let port = free_port();
    let mut dst = destination(port, Some(&sock2));
    let (relay_port, relay) = eavesdropper(port);
    hand_over(
        &mut src,
        &sock,
        &format!("127.0.0.1:{relay_port}"),
        &dst,
        &sock2,
        60,
    );
    assert_eq!(in_clear(&relay.join().unwrap()), (true, true, true));
    stop(&mut dst, &sock2);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Migration over mutual TLS: a TLS destination turns away a plain TCP
/// stream, a Vireo source without TLS and a source whose certificate
/// another CA signed, and waits on through all of them; a TLS source
/// refuses a destination that does not offer TLS; then the source with a
/// certificate of the destination's CA migrates, and what crossed the
/// network holds neither the protocol's plain text nor the guest's.
#[test]
fn a_tls_destination_takes_only_a_source_its_ca_signed() {
    let dir = scratch("tls");
    let (ca, other_ca) = (TestCa::new("vireo test CA"), TestCa::new("another CA"));
    let (dcert, dkey, dca) = ca.host(&dir, "dst");
    let (scert, skey, sca) = ca.host(&dir, "src");
    let (bcert, bkey, _) = other_ca.host(&dir, "stranger");
    let (sock, sock2) = (dir.join("a.sock"), dir.join("b.sock"));
    let port = free_port();
    let mut cmd = vireo();
    tls_args(&mut cmd, Some(&dcert), Some(&dkey), &dca);
    let mut dst = receive(cmd, &[], "127.0.0.1", port, Some(&sock2));

    // Plain TCP speaking the protocol without TLS: the greeting says TLS
    // follows, and what follows is not TLS.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut g = [0u8; 41];
    s.read_exact(&mut g).unwrap();
    assert_eq!(&g[..8], b"VIREODST");
    assert_eq!(g[8] & 2, 2, "the greeting announces TLS");
    s.write_all(b"VIREOMIG\x03\x00\x00\x00").unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(
        !rest.starts_with(b"T") && !rest.starts_with(b"N"),
        "{rest:?}"
    );
    assert!(wait_until(Duration::from_secs(20), || dst
        .stderr_text()
        .contains("TLS handshake with")));

    // A Vireo source without TLS learns why and runs on.
    let mut plain = tls_source(&dir, &sock, None);
    let out = migrate_to(&sock, &format!("127.0.0.1:{port}"));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("requires TLS"), "{err}");
    stop(&mut plain, &sock);

    // A source whose certificate another CA signed (it trusts ours).
    let mut stranger = tls_source(&dir, &sock, Some((&bcert, &bkey, &sca)));
    let out = migrate_to(&sock, &format!("127.0.0.1:{port}"));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("turned this source away"), "{err}");
    let info = client(&["info"], &sock);
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["state"], "running", "the refused source runs on");
    stop(&mut stranger, &sock);
    assert!(
        dst.child.try_wait().unwrap().is_none(),
        "the destination waits on: {}",
        dst.stderr_text()
    );
    assert!(dst.stderr_text().matches("turned away").count() >= 3);

    // The right source. First a destination without TLS: refused, no
    // silent downgrade.
    let mut src = tls_source(&dir, &sock, Some((&scert, &skey, &sca)));
    let (fake_port, greeter) = fake_destination(|mut s| {
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        rest
    });
    let out = migrate_to(&sock, &format!("127.0.0.1:{fake_port}"));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not offer TLS"), "{err}");
    assert!(greeter.join().unwrap().is_empty(), "nothing sent in clear");

    let (relay_port, relay) = eavesdropper(port);
    let (said, before, v) = hand_over(
        &mut src,
        &sock,
        &format!("127.0.0.1:{relay_port}"),
        &dst,
        &sock2,
        60,
    );
    eprintln!("over TLS: {said}");
    assert_eq!(v["state"], "running");
    assert!(dst.stderr_text().contains("accepted (TLS)"));
    let seen = relay.join().unwrap();
    let (header, state, memory) = in_clear(&seen);
    assert!(!header, "the header crossed in clear");
    assert!(!state, "the VM's state crossed in clear");
    assert!(!memory, "the guest's memory crossed in clear");
    stop_and_check_count(&mut dst, &sock2, &before);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Missing, mismatched and exposed TLS files end a VMM at start with a
/// message naming the file.
#[test]
fn bad_tls_files_are_refused_at_start() {
    let dir = scratch("tls-files");
    let ca = TestCa::new("vireo test CA");
    let (cert, _key, cafile) = ca.host(&dir, "a");
    let (_, other_key, _) = ca.host(&dir, "b");
    let port = free_port();
    let run = |args: &[&std::ffi::OsStr]| {
        let out = vireo()
            .args(args)
            .args(["migrate-receive", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let os = |p: &Path| p.as_os_str().to_owned();
    let missing = dir.join("missing.crt");
    let err = run(&[
        "--migration-tls-cert".as_ref(),
        &os(&missing),
        "--migration-tls-key".as_ref(),
        &os(&other_key),
    ]);
    assert!(
        err.contains("missing.crt") && err.contains("No such file"),
        "{err}"
    );
    let err = run(&[
        "--migration-tls-cert".as_ref(),
        &os(&cert),
        "--migration-tls-key".as_ref(),
        &os(&other_key),
        "--migration-tls-ca".as_ref(),
        &os(&cafile),
    ]);
    assert!(err.contains("does not belong to the certificate"), "{err}");
    let err = run(&["--migration-tls-cert".as_ref(), &os(&cert)]);
    assert!(err.contains("needs --migration-tls-key"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
