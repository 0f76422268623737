//! virtio-vsock with Debian's vsock driver, host side as Unix sockets in
//! the Firecracker convention: a 4 MiB stream guest to host (the guest
//! connects to CID 2, the test listens on `PATH_5000`), a 4 MiB stream host
//! to guest (the test connects to `PATH`, writes `CONNECT 6000\n`, reads
//! `OK <port>\n`), checksums compared; then 50 connections at once to an
//! echo server in the guest, each carrying its own 256 KiB both ways. Also
//! prints the throughput of both streams (MiB/s, wall clock, engine).

mod common;

use common::*;
use std::io::{BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn accel() -> String {
    std::env::var("VIREO_TEST_ACCEL").unwrap_or_else(|_| "emu".into())
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vireo-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn md5(data: &[u8], dir: &Path) -> String {
    let f = dir.join("md5-input");
    std::fs::write(&f, data).unwrap();
    let out = Command::new("md5sum").arg(&f).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Connect to the VM's socket and open guest port `port`; the stream.
fn connect_guest(sock: &Path, port: u32) -> UnixStream {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    writeln!(s, "CONNECT {port}").unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while b[0] != b'\n' {
        assert_eq!(s.read(&mut b).unwrap(), 1, "closed before OK: {line:?}");
        line.push(b[0]);
    }
    let line = String::from_utf8_lossy(&line);
    assert!(line.starts_with("OK "), "{line}");
    s
}

/// `vireo run` of the test guest with a vsock device on `sock` (guest CID
/// 3), running `cmd` in the guest; more options may be added before it
/// is spawned.
fn vsock_vm(accel: &str, sock: &Path, cmd: &str) -> Command {
    let g = guest_dir();
    let mut c = vireo();
    c.args(["run", "--accel", accel, "--memory", "256M", "--kernel"])
        .arg(g.join("vmlinux"))
        .arg("--initrd")
        .arg(g.join("initramfs.cpio.gz"))
        .arg("--vsock")
        .arg(format!("cid=3,socket={}", sock.display()))
        .arg("--cmdline")
        .arg(format!(
            "console=ttyS0 reboot=k panic=1 quiet vireo.cmd=\"{cmd}\""
        ));
    c
}

/// Data with a per-connection pattern.
fn pattern(tag: u32, len: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9u32.wrapping_mul(tag + 1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

#[test]
fn vsock_streams_both_ways_and_fifty_connections_at_once() {
    let g = guest_dir();
    let dir = scratch("vsock");
    let sock = dir.join("v.sock");
    let one = std::fs::read(g.join("data.bin")).unwrap();
    let four: Vec<u8> = one.iter().copied().cycle().take(4 * one.len()).collect();
    let four_md5 = md5(&four, &dir);
    let host_listener = UnixListener::bind(format!("{}_5000", sock.display())).unwrap();

    let cmd = "d=/vireo/data.bin; cat $d $d $d $d | vireo-io vsock-connect 2 5000 >/dev/null && \
               echo G2H-DONE && vireo-io vsock-listen 6000 </dev/null | md5sum && \
               vireo-io vsock-echo 7000 50 && vireo-io vsock-listen 8000 </dev/null >/dev/null && \
               echo ECHOES-CONFIRMED";
    let c = vsock_vm(&accel(), &sock, cmd);
    let mut vm = Running::spawn(c);

    // Guest to host.
    let (mut s, _) = host_listener.accept().unwrap();
    let start = Instant::now();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    let g2h = start.elapsed();
    drop(s);
    assert_eq!(got.len(), four.len(), "guest-to-host length");
    assert!(got == four, "the guest's stream arrived changed");

    // Host to guest.
    assert!(
        vm.wait_for("VSOCK-LISTEN 6000", Duration::from_secs(120)),
        "{}\n{}",
        vm.stdout_text(),
        vm.stderr_text()
    );
    let mut s = connect_guest(&sock, 6000);
    let start = Instant::now();
    s.write_all(&four).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    let h2g = start.elapsed();
    assert!(rest.is_empty());
    let mib = four.len() as f64 / (1 << 20) as f64;
    eprintln!(
        "vsock ({}): guest to host {:.1} MiB/s, host to guest {:.1} MiB/s",
        accel(),
        mib / g2h.as_secs_f64(),
        mib / h2g.as_secs_f64()
    );

    // 50 connections at once, each echoed.
    assert!(
        vm.wait_for("VSOCK-LISTEN 7000", Duration::from_secs(120)),
        "{}",
        vm.stdout_text()
    );
    let conns: Vec<_> = (0..50u32)
        .map(|i| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let s = connect_guest(&sock, 7000);
                let data = pattern(i, 256 * 1024);
                let mut w = s.try_clone().unwrap();
                let d = data.clone();
                let writer = std::thread::spawn(move || {
                    w.write_all(&d).unwrap();
                    w.shutdown(std::net::Shutdown::Write).unwrap();
                });
                let mut back = Vec::new();
                BufReader::new(s).read_to_end(&mut back).unwrap();
                writer.join().unwrap();
                (i, back == data, back.len())
            })
        })
        .collect();
    let bad: Vec<String> = conns
        .into_iter()
        .map(|t| t.join().unwrap())
        .filter(|(_, same, _)| !same)
        .map(|(i, _, len)| format!("connection {i}: {len} bytes came back, not its 256 KiB"))
        .collect();
    // The echo server's children exit once their last bytes are queued in
    // the guest's kernel, not delivered: the guest powers off only when the
    // host says it has them all (as a real program's peer would confirm).
    assert!(
        vm.wait_for("VSOCK-LISTEN 8000", Duration::from_secs(120)),
        "{bad:?}\n{}",
        vm.stdout_text()
    );
    let done = connect_guest(&sock, 8000);
    done.shutdown(std::net::Shutdown::Both).unwrap();
    drop(done);
    let code = vm.wait_exit(Duration::from_secs(300));
    assert!(
        bad.is_empty(),
        "{bad:?}\n{}\n{}",
        vm.stdout_text(),
        vm.stderr_text()
    );
    let out = vm.stdout_text();
    assert_eq!(code, Some(0), "exit {code:?}\n{out}\n{}", vm.stderr_text());
    let lines = command_output(&out);
    assert!(lines.iter().any(|l| l == "G2H-DONE"), "{lines:?}");
    assert!(
        lines.iter().any(|l| l.starts_with(&four_md5)),
        "host-to-guest md5 {four_md5} not in {lines:?}"
    );
    assert!(lines.iter().any(|l| l == "VSOCK-ECHO 50"), "{lines:?}");
    assert!(lines.iter().any(|l| l == "ECHOES-CONFIRMED"), "{lines:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The guest sends its last bytes and powers off before the host reader
/// took them: they still arrive (the VMM finishes writing what the device
/// accepted from the guest before it exits), and nothing else does.
#[test]
fn guest_data_sent_right_before_power_off_reaches_a_slow_host_reader() {
    let g = guest_dir();
    let dir = scratch("vsock-off");
    let sock = dir.join("v.sock");
    let listener = UnixListener::bind(format!("{}_5000", sock.display())).unwrap();
    // More than a Unix socket buffer holds (~200 KiB; less when the VMM
    // wrote it in small pieces, ~130 KiB seen under load), and no more
    // than that plus the device's credit for one connection (256 KiB): the
    // guest can send it all without a reader, and part of it waits in the
    // VMM at power-off.
    const LEN: usize = 360_000;
    let cmd = format!(
        "head -c {LEN} /vireo/data.bin | vireo-io vsock-connect 2 5000 >/dev/null & \
         sleep 3; echo POWER-OFF"
    );
    let c = vsock_vm(&accel(), &sock, &cmd);
    let mut vm = Running::spawn(c);
    let (mut s, _) = listener.accept().unwrap();
    // Read nothing until the guest is on its way out.
    assert!(
        vm.wait_for("POWER-OFF", Duration::from_secs(120)),
        "{}\n{}",
        vm.stdout_text(),
        vm.stderr_text()
    );
    // ...and then some more: the VM is off and the VMM stopping.
    std::thread::sleep(Duration::from_secs(2));
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    let code = vm.wait_exit(Duration::from_secs(120));
    assert_eq!(code, Some(0), "{}", vm.stderr_text());
    let data = std::fs::read(g.join("data.bin")).unwrap();
    assert_eq!(got.len(), LEN, "bytes the host got\n{}", vm.stderr_text());
    assert!(got == data[..LEN], "the guest's stream arrived changed");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A snapshot taken with a guest connection open, restored in a new
/// process: the guest is told its transport was reset (its open connection
/// fails with a reset), and a new connection then works.
#[test]
fn vsock_restore_resets_open_connections_and_new_ones_work() {
    let dir = scratch("vsock-snap");
    let vs = dir.join("v.sock");
    let api = dir.join("a.sock");
    let first = UnixListener::bind(format!("{}_5000", vs.display())).unwrap();
    let second = UnixListener::bind(format!("{}_5001", vs.display())).unwrap();
    let cmd = "vireo-io vsock-connect 2 5000; echo FIRST-ENDED rc=$?; \
               echo after-restore | vireo-io vsock-connect 2 5001 && echo SECOND-DONE";
    let mut c = vsock_vm("emu", &vs, cmd);
    // Before the command line: the guest's command is its last argument.
    c.arg("--api-socket").arg(&api);
    let mut src = Running::spawn(c);
    let (mut s, _) = first.accept().unwrap();
    s.write_all(b"LIVE-BEFORE-SNAPSHOT\n").unwrap();
    assert!(
        src.wait_for("LIVE-BEFORE-SNAPSHOT", Duration::from_secs(60)),
        "{}",
        src.stdout_text()
    );
    let snap = dir.join("snap");
    snapshot_and_stop(&mut src, &api, &snap, Duration::from_secs(30));
    drop(s);

    let mut cmd = vireo();
    cmd.args(["restore", "--from"]).arg(&snap);
    let mut dst = Running::spawn(cmd);
    let (mut s2, _) = second.accept().unwrap();
    let mut got = String::new();
    s2.read_to_string(&mut got).unwrap();
    assert_eq!(got, "after-restore\n");
    drop(s2);
    let code = dst.wait_exit(Duration::from_secs(120));
    let out = dst.stdout_text();
    assert_eq!(code, Some(0), "{out}\n{}", dst.stderr_text());
    assert!(
        out.contains("VIREO-IO-ERROR vsock-connect recv:") && out.contains("FIRST-ENDED rc=1"),
        "the open connection did not see the reset:\n{out}"
    );
    assert!(out.contains("SECOND-DONE"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}
