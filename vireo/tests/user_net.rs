//! User-mode networking (`--net user`) through passt, run as an
//! unprivileged user: the guest takes its address by DHCP, fetches a file
//! from an HTTP server the test runs on the host's loopback (passt maps the
//! gateway address to the host), and the host fetches a file from a server
//! in the guest through a `hostfwd`; both byte streams are compared, and
//! both cross at passt's MTU of 65520 (frames of up to 64 KiB). Then
//! passt is killed under the running VM: the guest must see its carrier
//! drop and the VMM must exit cleanly with the guest's poweroff. A second
//! guest takes in 64 MiB and sends it back, every byte checked.
//!
//! As root (CI), Vireo runs as `nobody` through `setpriv`, so the test shows
//! that no privilege is used.

mod common;

use common::stream::{relay, store_and_return_command};
use common::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

fn accel() -> String {
    std::env::var("VIREO_TEST_ACCEL").unwrap_or_else(|_| "emu".into())
}

/// Whether the test runs as root (then Vireo runs as nobody).
fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// What nobody can reach: as root, the vireo binary, the kernel and the
/// initramfs copied into a world-readable directory under the temp dir
/// (the checkout, for example under /root, may be closed to other users),
/// one per `test` (tests run at once); otherwise the originals. Returns
/// (vireo binary, directory of the guest files).
fn reachable_files(g: &std::path::Path, test: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_vireo"));
    if !is_root() {
        return (bin, g.to_path_buf());
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("vireo-usernet-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let copy = |from: &std::path::Path, name: &str, mode: u32| {
        let to = dir.join(name);
        std::fs::copy(from, &to).unwrap();
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    copy(&bin, "vireo", 0o755);
    copy(&g.join("vmlinux"), "vmlinux", 0o644);
    copy(&g.join("initramfs.cpio.gz"), "initramfs.cpio.gz", 0o644);
    (dir.join("vireo"), dir)
}

/// `bin` (vireo) as an unprivileged user: as itself when it is not root,
/// as nobody (through setpriv) when it is.
fn unprivileged_vireo(bin: &std::path::Path) -> Command {
    if !is_root() {
        return Command::new(bin);
    }
    let mut c = Command::new("setpriv");
    c.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
    ])
    .arg(bin);
    c
}

fn passt_installed() -> bool {
    Command::new("passt")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Serve `body` once as an HTTP/1.0 response to a GET; returns the port.
fn serve_once(body: Vec<u8>) -> (u16, std::thread::JoinHandle<String>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let t = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut req = Vec::new();
        let mut b = [0u8; 1024];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut b).unwrap();
            if n == 0 {
                break;
            }
            req.extend_from_slice(&b[..n]);
        }
        write!(
            s,
            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n\r\n",
            body.len()
        )
        .unwrap();
        s.write_all(&body).unwrap();
        String::from_utf8_lossy(&req).into_owned()
    });
    (port, t)
}

/// GET `path` from 127.0.0.1:`port` with HTTP/1.0; the body.
fn http_get(port: u16, path: &str) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: guest\r\n\r\n").unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    let at = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP header in {:?}", String::from_utf8_lossy(&all)));
    assert!(
        all.starts_with(b"HTTP/1.") && all[..at].windows(3).any(|w| w == b"200"),
        "{}",
        String::from_utf8_lossy(&all[..at])
    );
    all[at + 4..].to_vec()
}

/// The pids of `pid`'s children (all its threads').
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(c) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(c.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
            }
        }
    }
    out
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

#[test]
fn user_net_http_both_ways_then_passt_dies_and_the_link_drops() {
    if !passt_installed() {
        panic!("passt is not installed: scripts/install-deps.sh installs Debian's passt package");
    }
    let g = guest_dir();
    let data = std::fs::read(g.join("data.bin")).unwrap();
    let md5 = std::fs::read_to_string(g.join("data.bin.md5")).unwrap();
    let md5 = md5.split_whitespace().next().unwrap().to_string();
    let (http_port, server) = serve_once(data.clone());
    let fwd = free_port();

    let cmd = format!(
        "timeout 60 udhcpc -i eth0 -n -q -t 10 && \
         gw=$(ip route | grep default | cut -d' ' -f3) && echo GW=$gw && \
         echo MTU=$(cat /sys/class/net/eth0/mtu) && \
         wget -q -O - http://$gw:{http_port}/data.bin | md5sum && \
         httpd -p 8080 -h /vireo && echo GUEST-SERVER-UP && \
         while [ $(cat /sys/class/net/eth0/carrier) = 1 ]; do sleep 0.2; done; \
         echo LINK-DOWN-SEEN"
    );
    let (bin, files) = reachable_files(&g, "http");
    let mut c = unprivileged_vireo(&bin);
    c.args(["run", "--accel", &accel(), "--memory", "256M", "--kernel"])
        .arg(files.join("vmlinux"))
        .arg("--initrd")
        .arg(files.join("initramfs.cpio.gz"))
        .arg("--net")
        .arg(format!("user,hostfwd=tcp:127.0.0.1:{fwd}-:8080"))
        .arg("--cmdline")
        .arg(format!(
            "console=ttyS0 reboot=k panic=1 quiet vireo.cmd=\"{cmd}\""
        ));
    let mut vm = Running::spawn(c);
    assert!(
        vm.wait_for("GUEST-SERVER-UP", Duration::from_secs(300)),
        "the guest did not get through DHCP and the download:\n{}\n{}",
        vm.stdout_text(),
        vm.stderr_text()
    );
    let req = server.join().unwrap();
    assert!(req.starts_with("GET /data.bin"), "{req}");
    let out = vm.stdout_text();
    // passt's own MTU by default (merged receive buffers are on), taken
    // by DHCP: the transfers below cross in frames of up to 64 KiB.
    assert!(
        command_output(&out).iter().any(|l| l == "MTU=65520"),
        "the guest's interface is not at passt's MTU of 65520:\n{out}"
    );
    assert!(
        command_output(&out).iter().any(|l| l.starts_with(&md5)),
        "host-to-guest download md5 {md5} not in:\n{out}"
    );
    // Guest to host, through the forwarded port.
    let got = http_get(fwd, "/data.bin");
    assert_eq!(got.len(), data.len(), "guest-to-host length");
    assert!(got == data, "the file from the guest arrived changed");

    // Kill passt under the running VM.
    let vm_pid = vm.child.id();
    let passt: Vec<u32> = children(vm_pid)
        .into_iter()
        .filter(|&p| comm(p).starts_with("passt"))
        .collect();
    assert_eq!(passt.len(), 1, "one passt child of {vm_pid}: {passt:?}");
    // SAFETY: signalling a process this test's VMM started.
    unsafe { libc::kill(passt[0] as libc::pid_t, libc::SIGKILL) };
    let code = vm.wait_exit(Duration::from_secs(120));
    let (out, err) = (vm.stdout_text(), vm.stderr_text());
    assert_eq!(code, Some(0), "exit {code:?}\n{out}\n{err}");
    assert!(
        command_output(&out).iter().any(|l| l == "LINK-DOWN-SEEN"),
        "the guest never saw its carrier drop:\n{out}"
    );
    assert!(
        err.contains("passt") && err.contains("link is down"),
        "no clear error about passt:\n{err}"
    );
    if files != g {
        let _ = std::fs::remove_dir_all(&files);
    }
}

/// 64 MiB each way through passt at its default MTU of 65520: the host
/// sends a stream, the guest stores and sums it (busybox `crc32`) and then
/// sends it all back, and the host checks the sum and every byte. (One
/// direction at a time: with both at once, passt 2023_03_09 resets the
/// guest's upload after some 20-40 MiB, at MTU 1500 as at 65520; see
/// docs/engine-profile.md.) The guest's own counters show frames above
/// what MTU 1500 allows (1514 bytes) each way: more than 8 KiB on average
/// both while it downloads and while it uploads (through `vireo-io
/// tcp-connect`'s 128 KiB writes; busybox nc's 1 KiB writes left the upload's
/// frame size to timing), so what is tested is frames of up to 64 KiB spread
/// over merged receive buffers one way, and frames of up to 64 KiB whose
/// checksums the device completes the other (some 50-58 KiB on average each
/// way here).
#[test]
fn user_net_moves_64_mib_each_way_in_frames_above_1500_bytes() {
    if !passt_installed() {
        panic!("passt is not installed: scripts/install-deps.sh installs Debian's passt package");
    }
    const LEN: u64 = 64 << 20;
    const SEED: u64 = 0x2545_f491_4f6c_dd1d;
    let listen = || {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        (l, port)
    };
    let ((down, down_port), (up, up_port)) = (listen(), listen());
    let frames = |tag: &str| {
        let stat = |n: &str| format!("$(cat /sys/class/net/eth0/statistics/{n})");
        format!(
            "echo {tag} {} {} {} {}",
            stat("rx_bytes"),
            stat("rx_packets"),
            stat("tx_bytes"),
            stat("tx_packets")
        )
    };
    let cmd = format!(
        "timeout 60 udhcpc -i eth0 -n -q -t 10 && \
         gw=$(ip route | grep default | cut -d' ' -f3) && \
         echo MTU=$(cat /sys/class/net/eth0/mtu) && {} && {}; {}",
        frames("FRAMES0"),
        store_and_return_command("$gw", down_port, up_port, &frames("FRAMES1")),
        frames("FRAMES2"),
    );
    let g = guest_dir();
    let (bin, files) = reachable_files(&g, "stream");
    let mut c = unprivileged_vireo(&bin);
    c.args(["run", "--accel", &accel(), "--memory", "256M", "--kernel"])
        .arg(files.join("vmlinux"))
        .arg("--initrd")
        .arg(files.join("initramfs.cpio.gz"))
        .args(["--net", "user"])
        .arg("--cmdline")
        .arg(format!(
            "console=ttyS0 reboot=k panic=1 quiet vireo.cmd=\"{cmd}\""
        ));
    let (sender, receiver) = relay(down, up, LEN, SEED);
    let mut vm = Running::spawn(c);
    let code = vm.wait_exit(Duration::from_secs(1800));
    let out = vm.stdout_text();
    assert_eq!(code, Some(0), "exit {code:?}\n{out}\n{}", vm.stderr_text());
    let lines = command_output(&out);
    // Both ends' outcomes: one end's failure often follows from the other's.
    let sum = match (sender.join().unwrap(), receiver.join().unwrap()) {
        (Ok(sum), Ok(())) => sum,
        (sent, back) => panic!(
            "the host's send: {sent:?}; the stream the guest sent back: {back:?}; guest: {lines:?}"
        ),
    };
    let want = format!("sum={sum:08x}");
    assert!(
        lines.iter().any(|l| l.starts_with(&want)),
        "the guest's crc32 of what arrived: want {want:?} in {lines:?}"
    );
    assert!(lines.iter().any(|l| l == "MTU=65520"), "{lines:?}");
    // [rx bytes, rx frames, tx bytes, tx frames] at each point.
    let at = |tag: &str| -> Vec<u64> {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(&format!("{tag} ")))
            .unwrap_or_else(|| panic!("no {tag} counts in {lines:?}"))
            .split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect()
    };
    let (f0, f1, f2) = (at("FRAMES0"), at("FRAMES1"), at("FRAMES2"));
    let (down_bytes, down_frames) = (f1[0] - f0[0], f1[1] - f0[1]);
    let (up_bytes, up_frames) = (f2[2] - f1[2], f2[3] - f1[3]);
    assert!(
        down_bytes >= LEN && up_bytes >= LEN,
        "the guest's counters missed bytes: {f0:?} {f1:?} {f2:?}"
    );
    let (rx_mean, tx_mean) = (down_bytes / down_frames, up_bytes / up_frames);
    eprintln!("mean frame: {rx_mean} bytes in while downloading, {tx_mean} out while uploading");
    assert!(
        rx_mean > 8 << 10 && tx_mean > 8 << 10,
        "frames of {rx_mean} bytes in while downloading, {tx_mean} out while uploading: \
         not above MTU 1500"
    );
    if files != g {
        let _ = std::fs::remove_dir_all(&files);
    }
}

/// Without passt installed, `--net user` fails at start and says what to
/// install (PATH is emptied so passt cannot be found).
#[test]
fn user_net_without_passt_says_what_is_missing() {
    let g = guest_dir();
    let empty = std::env::temp_dir().join(format!("vireo-nopasst-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let out = vireo()
        .env("PATH", &empty)
        .args(["run", "--accel", "emu", "--memory", "64M", "--kernel"])
        .arg(g.join("vmlinux"))
        .args(["--net", "user", "--serial", "none"])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir(&empty);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("passt") && err.contains("not installed"),
        "unclear error: {err}"
    );
}
