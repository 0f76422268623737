//! Monitoring, end to end (issue 14): `vm.counters`, `/metrics` on the API
//! socket and on `--metrics` TCP, checked against what the guest did and
//! against a real Prometheus parser; exit counters that stop while paused;
//! `vireo top` in a pseudo-terminal showing two VMs.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vireo-mon-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn counters(sock: &Path) -> serde_json::Value {
    let out = client(&["counters"], sock);
    assert!(out.status.success(), "vireo counters: {out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn exits(c: &serde_json::Value) -> u64 {
    c["vcpus"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|v| v["exits"].as_object().unwrap().values())
        .map(|n| n.as_u64().unwrap())
        .sum()
}

/// The letters guest (one COM1 write per letter: an exit each) under
/// `accel`, with the API on `dir`/api.sock and metrics on a TCP port.
fn letters_vm(dir: &Path, accel: &str, metrics: Option<&str>) -> (Running, PathBuf) {
    letters_vm_at(dir, "api.sock", accel, metrics)
}

fn letters_vm_at(
    dir: &Path,
    sock_name: &str,
    accel: &str,
    metrics: Option<&str>,
) -> (Running, PathBuf) {
    let sock = dir.join(sock_name);
    let kernel = counting_guest(dir);
    let mut cmd = vireo();
    cmd.args(["run", "--accel", accel, "--boot", "pvh", "--memory", "32M"])
        .arg("--kernel")
        .arg(&kernel)
        .arg("--api-socket")
        .arg(&sock);
    if let Some(m) = metrics {
        cmd.args(["--metrics", m]);
    }
    let mut vm = Running::spawn(cmd);
    assert!(
        vm.wait_for("abc", Duration::from_secs(60)),
        "{accel}: the guest did not count: {}",
        vm.stderr_text()
    );
    (vm, sock)
}

/// Every sample of a Prometheus text as Python's prometheus_client parses
/// it: (sample name, labels) -> value; with the family types by name.
/// None (with a note) where python3 or the package is missing
/// (scripts/install-deps.sh installs python3-prometheus-client).
/// Samples by (name, labels), and family types by family name.
type Parsed = (
    BTreeMap<(String, BTreeMap<String, String>), f64>,
    BTreeMap<String, String>,
);

fn parse_with_prometheus_client(text: &str) -> Option<Parsed> {
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
samples, types = [], {}
for fam in text_string_to_metric_families(sys.stdin.read()):
    types[fam.name] = fam.type
    for s in fam.samples:
        samples.append([s.name, s.labels, s.value])
print(json.dumps({"samples": samples, "types": types}))
"#;
    let probe = Command::new("python3")
        .args(["-c", "import prometheus_client"])
        .output();
    if !probe.map(|o| o.status.success()).unwrap_or(false) {
        eprintln!(
            "note: python3 with prometheus_client is missing (scripts/install-deps.sh \
             installs python3-prometheus-client); the exposition-format parse is skipped"
        );
        return None;
    }
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client refused the exposition:\n{}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut samples = BTreeMap::new();
    for s in v["samples"].as_array().unwrap() {
        let labels = s[1]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect();
        let key = (s[0].as_str().unwrap().to_string(), labels);
        assert!(samples.insert(key, s[2].as_f64().unwrap()).is_none());
    }
    let types = v["types"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    Some((samples, types))
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// GET `path` over plain HTTP/1.0 from `addr`: (status, content type, body).
fn http_get(addr: &str, path: &str) -> (u16, String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let ct = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    (status, ct, body.to_string())
}

/// Exit counters grow while the guest runs and stand still while it is
/// paused (on both accelerators); /metrics on the socket and on TCP says
/// what vm.counters says and parses as the exposition format.
#[test]
fn exit_counters_grow_while_running_and_stop_while_paused() {
    let mut accels = vec!["emu"];
    if kvm_usable() {
        accels.push("kvm");
    }
    for accel in accels {
        let dir = scratch(&format!("exits-{accel}"));
        let addr = format!("127.0.0.1:{}", free_port());
        let (mut vm, sock) = letters_vm(&dir, accel, Some(&addr));

        let a = counters(&sock);
        assert_eq!(a["state"], "running");
        assert_eq!(a["accel"], accel);
        assert!(
            a["vcpus"][0]["exits"]["io_out"].as_u64().unwrap() > 0,
            "{a}"
        );
        assert!(wait_until(Duration::from_secs(20), || exits(&counters(
            &sock
        )) > exits(&a)));
        let b = counters(&sock);
        assert!(b["vcpus"][0]["guest_ns"].as_u64() > a["vcpus"][0]["guest_ns"].as_u64());
        assert!(b["uptime_ms"].as_u64() >= a["uptime_ms"].as_u64());
        assert!(b["memory"]["guest_bytes"] == 32 << 20, "{b}");
        if accel == "emu" {
            let e = &b["vcpus"][0]["engine"];
            assert!(e["instructions"].as_u64().unwrap() > 0, "{b}");
            assert!(e["interrupts"].is_u64(), "{b}");
        } else {
            assert!(b["vcpus"][0]["engine"].is_null(), "{b}");
        }

        let out = client(&["pause"], &sock);
        assert!(out.status.success(), "{out:?}");
        let p1 = counters(&sock);
        assert_eq!(p1["state"], "paused");
        std::thread::sleep(Duration::from_millis(500));
        let p2 = counters(&sock);
        assert_eq!(exits(&p1), exits(&p2), "exits counted while paused");
        assert_eq!(p1["vcpus"][0]["guest_ns"], p2["vcpus"][0]["guest_ns"]);
        assert_eq!(p1["vcpus"][0]["engine"], p2["vcpus"][0]["engine"]);

        // Paused, the counters hold still: /metrics must say exactly what
        // vm.counters says, on the socket and on TCP.
        let text = client(&["counters", "--prometheus"], &sock);
        assert!(text.status.success(), "{text:?}");
        let text = String::from_utf8(text.stdout).unwrap();
        let (status, ct, tcp_text) = http_get(&addr, "/metrics");
        assert_eq!(status, 200);
        assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
        let (st, _, tcp_json) = http_get(&addr, "/api/v1/vm.counters");
        assert_eq!(st, 200);
        let tcp_json: serde_json::Value = serde_json::from_str(&tcp_json).unwrap();
        assert_eq!(tcp_json["vcpus"], p2["vcpus"].clone().tap_cpu(&tcp_json));
        // Control is not offered on TCP.
        assert_eq!(http_get(&addr, "/api/v1/vm.resume").0, 404);
        assert_eq!(http_get(&addr, "/api/v1/vm.info").0, 404);
        for t in [&text, &tcp_text] {
            assert!(t.contains("# TYPE vireo_vcpu_exits_total counter\n"), "{t}");
            assert!(t.contains("vireo_vm_state{state=\"paused\"} 1\n"), "{t}");
            for (reason, n) in p2["vcpus"][0]["exits"].as_object().unwrap() {
                let line =
                    format!("vireo_vcpu_exits_total{{vcpu=\"0\",reason=\"{reason}\"}} {n}\n");
                assert!(t.contains(&line), "{line} not in\n{t}");
            }
        }
        if let Some((samples, types)) = parse_with_prometheus_client(&text) {
            assert_eq!(types["vireo_vcpu_exits"], "counter", "{types:?}");
            assert_eq!(types["vireo_vm_uptime_seconds"], "gauge");
            let io_out = samples[&(
                "vireo_vcpu_exits_total".to_string(),
                labels(&[("vcpu", "0"), ("reason", "io_out")]),
            )];
            assert_eq!(
                io_out as u64,
                p2["vcpus"][0]["exits"]["io_out"].as_u64().unwrap()
            );
            let guest = samples[&(
                "vireo_vcpu_guest_seconds_total".to_string(),
                labels(&[("vcpu", "0")]),
            )];
            let ns = p2["vcpus"][0]["guest_ns"].as_u64().unwrap() as f64;
            assert!((guest - ns / 1e9).abs() < 1e-6, "{guest} vs {ns} ns");
            if accel == "emu" {
                assert_eq!(types["vireo_engine_code_cache_bytes"], "gauge");
                let insns = samples[&(
                    "vireo_engine_instructions_total".to_string(),
                    labels(&[("vcpu", "0")]),
                )];
                let want = p2["vcpus"][0]["engine"]["instructions"].as_u64().unwrap();
                assert_eq!(insns as u64, want);
            }
        }

        let out = client(&["resume"], &sock);
        assert!(out.status.success(), "{out:?}");
        assert!(
            wait_until(Duration::from_secs(20), || exits(&counters(&sock))
                > exits(&p2)),
            "{accel}: exits did not grow again after resume"
        );
        let out = client(&["stop"], &sock);
        assert!(out.status.success());
        assert_eq!(vm.wait_exit(Duration::from_secs(10)), Some(0));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// The vCPU reports but for the CPU time, which the thread may still use
/// while paused (its CPU time is read live from /proc).
trait TapCpu {
    fn tap_cpu(self, other: &serde_json::Value) -> serde_json::Value;
}

impl TapCpu for serde_json::Value {
    fn tap_cpu(mut self, other: &serde_json::Value) -> serde_json::Value {
        for (i, v) in self.as_array_mut().unwrap().iter_mut().enumerate() {
            v["cpu_ns"] = other["vcpus"][i]["cpu_ns"].clone();
        }
        self
    }
}

/// A pseudo-terminal: (master, slave) descriptors.
fn openpty(cols: u16, rows: u16) -> (std::fs::File, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let (mut master, mut slave) = (0, 0);
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two descriptors we then own.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are fresh and ours.
    unsafe {
        (
            std::fs::File::from_raw_fd(master),
            std::os::fd::OwnedFd::from_raw_fd(slave),
        )
    }
}

/// `vireo top` in an 80x24 pseudo-terminal, watching a directory with two
/// running VMs: both are listed with their state and a non-zero exit
/// rate, the table fits the terminal, and `q` ends it with status 0 and
/// the terminal restored (alternate screen left, cursor shown).
#[test]
fn top_shows_two_vms_in_a_terminal_and_quits_on_q() {
    let dir = scratch("top");
    let (mut a, _) = letters_vm_at(&dir, "alpha.sock", "emu", None);
    let (mut b, _) = letters_vm_at(&dir, "beta.sock", "emu", None);
    let (mut master, slave) = openpty(80, 24);
    let slave_out = slave.try_clone().unwrap();
    let slave_err = slave.try_clone().unwrap();
    let mut top = vireo()
        .args(["top", "--dir"])
        .arg(&dir)
        .stdin(std::process::Stdio::from(slave))
        .stdout(std::process::Stdio::from(slave_out))
        .stderr(std::process::Stdio::from(slave_err))
        .spawn()
        .unwrap();
    // The screen, read as it comes (a thread: reads block).
    let screen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let mut reader = master.try_clone().unwrap();
    let s = screen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            s.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    // The last whole frame: after the last clear, up to the next one.
    let frame = || {
        let text = String::from_utf8_lossy(&screen.lock().unwrap()).into_owned();
        let frames: Vec<&str> = text.split("\x1b[H\x1b[2J").collect();
        // The final piece may still be arriving: take the one before it.
        frames
            .len()
            .checked_sub(2)
            .map(|i| frames[i].to_string())
            .unwrap_or_default()
    };
    let exit_rate = |f: &str, name: &str| -> Option<String> {
        let line = f.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().last().map(str::to_string)
    };
    let shown = wait_until(Duration::from_secs(30), || {
        let f = frame();
        ["alpha", "beta"].iter().all(|n| {
            exit_rate(&f, n).is_some_and(|r| r != "0")
                && f.lines().any(|l| l.starts_with(n) && l.contains("running"))
        })
    });
    let f = frame();
    assert!(shown, "top did not show both VMs with exit rates:\n{f}");
    for line in f.lines() {
        let line = line.trim_end_matches('\r');
        assert!(
            line.chars().count() <= 80,
            "wider than the terminal: {line:?}"
        );
    }
    assert!(f.lines().count() <= 24, "taller than the terminal:\n{f}");
    assert!(f.contains("EXIT/s") && f.contains("CPU%"), "{f}");

    // Pause one: its state follows.
    let out = client(&["pause"], &dir.join("beta.sock"));
    assert!(out.status.success(), "{out:?}");
    assert!(
        wait_until(Duration::from_secs(10), || frame()
            .lines()
            .any(|l| l.starts_with("beta") && l.contains("paused"))),
        "the paused VM is not shown paused:\n{}",
        frame()
    );

    master.write_all(b"q").unwrap();
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(st) = top.try_wait().unwrap() {
            break Some(st);
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = top.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let status = status.expect("vireo top did not quit on q");
    assert!(status.success(), "{status:?}");
    // The last bytes may still be on their way through the pty.
    let restored = || screen.lock().unwrap().ends_with(b"\x1b[?25h\x1b[?1049l");
    wait_until(Duration::from_secs(5), restored);
    let all = String::from_utf8_lossy(&screen.lock().unwrap()).into_owned();
    assert!(
        all.ends_with("\x1b[?25h\x1b[?1049l"),
        "the terminal was not restored: {:?}",
        &all[all.len().saturating_sub(40)..]
    );
    a.kill();
    b.kill();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The number after `KEY:` on the guest's console.
fn console_value(console: &str, key: &str) -> u64 {
    let at = console
        .find(&format!("{key}:"))
        .unwrap_or_else(|| panic!("no {key}: on the console:\n{console}"));
    console[at + key.len() + 1..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{key}: has no number:\n{console}"))
}

/// Debian writes 4 MiB to its disk and sends pings out of its NIC; then
/// vm.counters and /metrics both show at least the bytes the guest's own
/// statistics say it wrote and sent, and say the same. Needs root (a tap
/// in a namespace); says so and skips otherwise.
#[test]
fn debian_disk_and_net_bytes_show_in_the_counters_and_metrics() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/net/tun").exists() {
        eprintln!("note: needs root and /dev/net/tun; disk and network counter test skipped");
        return;
    }
    let g = guest_dir();
    let dir = scratch("debian");
    let disk = dir.join("disk.img");
    let f = std::fs::File::create(&disk).unwrap();
    f.set_len(16 << 20).unwrap();
    drop(f);
    let ns = Netns::new(format!("vireo-mon{}", std::process::id()));
    let tap = format!("vm{}", std::process::id() % 100_000);
    let sock = dir.join("api.sock");
    const WRITE: u64 = 4 << 20;
    // Static ARP: the pings leave as ICMP frames though nobody answers.
    let script = format!(
        "dd if=/dev/zero of=/dev/vda bs=65536 count={} && sync && \
         echo WSECT:$(awk '{{print $7}}' /sys/block/vda/stat): && \
         ip link set eth0 up && ip addr add 10.213.9.2/24 dev eth0 && \
         arp -s 10.213.9.1 02:00:00:00:00:01 && \
         ping -c 5 -s 1400 -W 1 10.213.9.1; \
         echo TXBYTES:$(cat /sys/class/net/eth0/statistics/tx_bytes): && sleep 600",
        WRITE / 65536
    );
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns.0])
        .arg(env!("CARGO_BIN_EXE_vireo"))
        .args(["run", "--accel", "emu", "--memory", "256M", "--kernel"])
        .arg(g.join("vmlinux"))
        .arg("--initrd")
        .arg(g.join("initramfs.cpio.gz"))
        .arg("--disk")
        .arg(format!("path={},format=raw", disk.display()))
        .arg("--net")
        .arg(format!("tap={tap},mac=52:54:00:12:34:56"))
        .arg("--api-socket")
        .arg(&sock)
        .arg("--cmdline")
        .arg(format!(
            "console=ttyS0 reboot=k panic=1 quiet vireo.cmd=\"{script}\""
        ));
    let mut vm = Running::spawn(c);
    assert!(
        vm.wait_for("TXBYTES:", Duration::from_secs(600)),
        "the guest did not finish:\n{}\n{}",
        vm.stdout_text(),
        vm.stderr_text()
    );
    let console = vm.stdout_text();
    let tx_guest = console_value(&console, "TXBYTES");
    let wsect = console_value(&console, "WSECT");
    assert!(
        wsect * 512 >= WRITE,
        "the guest wrote {wsect} sectors:\n{console}"
    );
    assert!(
        tx_guest >= 5 * 1442,
        "the guest sent {tx_guest} bytes:\n{console}"
    );

    // Paused, nothing moves: the two reports must agree exactly.
    assert!(client(&["pause"], &sock).status.success());
    let c = counters(&sock);
    let d = &c["disks"][0];
    assert_eq!(d["id"], "disk0");
    let written = d["write"]["bytes"].as_u64().unwrap();
    assert!(
        written >= WRITE,
        "disk write bytes {written} < {WRITE}: {c}"
    );
    assert!(
        written >= wsect * 512,
        "{written} < the guest's {wsect} sectors"
    );
    assert!(d["write"]["requests"].as_u64().unwrap() >= 1);
    assert_eq!(d["errors"], 0);
    let lat = &d["latency_us"];
    let requests: u64 = ["read", "write", "flush", "discard"]
        .iter()
        .map(|op| d[op]["requests"].as_u64().unwrap())
        .sum();
    assert!(lat["count"].as_u64().unwrap() >= requests, "{lat}");
    let n = &c["nets"][0];
    assert_eq!(n["tap"], tap.as_str());
    let tx = n["tx_bytes"].as_u64().unwrap();
    assert!(
        tx >= tx_guest,
        "net tx bytes {tx} < the guest's {tx_guest}: {c}"
    );
    assert!(n["tx_packets"].as_u64().unwrap() >= 5);
    let virtio = c["virtio"].as_array().unwrap();
    for id in ["disk0", "net0"] {
        let v = virtio.iter().find(|v| v["id"] == id).unwrap();
        assert!(v["notifications"].as_u64().unwrap() > 0, "{v}");
        assert!(v["interrupts"].as_u64().unwrap() > 0, "{v}");
    }

    let text = client(&["counters", "--prometheus"], &sock);
    assert!(text.status.success());
    let text = String::from_utf8(text.stdout).unwrap();
    let want = [
        format!("vireo_block_bytes_total{{device=\"disk0\",op=\"write\"}} {written}\n"),
        format!("vireo_net_bytes_total{{device=\"net0\",direction=\"tx\"}} {tx}\n"),
        format!(
            "vireo_block_request_duration_seconds_count{{device=\"disk0\"}} {}\n",
            lat["count"]
        ),
    ];
    for w in &want {
        assert!(text.contains(w.as_str()), "{w} not in\n{text}");
    }
    if let Some((samples, types)) = parse_with_prometheus_client(&text) {
        assert_eq!(types["vireo_block_request_duration_seconds"], "histogram");
        let key = (
            "vireo_net_packets_total".to_string(),
            labels(&[("device", "net0"), ("direction", "tx")]),
        );
        assert_eq!(samples[&key] as u64, n["tx_packets"].as_u64().unwrap());
        let key = (
            "vireo_block_request_duration_seconds_bucket".to_string(),
            labels(&[("device", "disk0"), ("le", "+Inf")]),
        );
        assert_eq!(samples[&key] as u64, lat["count"].as_u64().unwrap());
    }
    assert!(client(&["stop"], &sock).status.success());
    vm.wait_exit(Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `-v --log-format json`: the VMM's state changes come out on stderr as
/// one JSON object per line, with an `event` field and their details.
#[test]
fn state_changes_are_json_event_lines() {
    let dir = scratch("events");
    let sock = dir.join("api.sock");
    let kernel = counting_guest(&dir);
    let mut cmd = vireo();
    cmd.args(["-v", "--log-format", "json", "run", "--accel", "emu"])
        .args(["--boot", "pvh", "--memory", "32M", "--kernel"])
        .arg(&kernel)
        .arg("--api-socket")
        .arg(&sock);
    let mut vm = Running::spawn(cmd);
    assert!(
        vm.wait_for("abc", Duration::from_secs(60)),
        "{}",
        vm.stderr_text()
    );
    let snap = dir.join("snap");
    let out = vireo()
        .args(["snapshot", "--api-socket"])
        .arg(&sock)
        .arg("--dir")
        .arg(&snap)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(client(&["stop"], &sock).status.success());
    assert_eq!(vm.wait_exit(Duration::from_secs(10)), Some(0));
    let lines: Vec<serde_json::Value> = vm
        .stderr_text()
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let events: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["target"] == "vireo::event")
        .collect();
    let names: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["boot", "pause", "snapshot", "resume", "exit"],
        "{events:#?}"
    );
    assert_eq!(events[0]["how"], "boot");
    assert_eq!(events[0]["accel"], "emu");
    assert_eq!(events[0]["vcpus"], 1);
    assert_eq!(events[2]["dir"], snap.to_str().unwrap());
    assert_eq!(events[4]["reason"], "stopped");
    for e in &events {
        assert_eq!(e["level"], "INFO");
        assert!(e["ts"].as_f64().unwrap() > 1.6e9, "{e}");
        assert!(e["message"].is_string(), "{e}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A live migration's progress: while a capped migration of a Debian guest
/// copies its memory (to a destination that greets, then only drains the stream),
/// vm.counters shows the operation growing at about the cap, and
/// `vireo migrate` prints progress lines on its (non-terminal) stderr;
/// once cancelled, no operation is shown.
#[test]
fn migration_progress_shows_in_the_counters_and_the_cli() {
    let g = guest_dir();
    let dir = scratch("progress");
    let sock = dir.join("api.sock");
    let mut cmd = vireo();
    cmd.args(["run", "--accel", "emu", "--memory", "256M", "--kernel"])
        .arg(g.join("vmlinux"))
        .arg("--initrd")
        .arg(g.join("initramfs.cpio.gz"))
        .arg("--cmdline")
        .arg("console=ttyS0 reboot=k panic=1 quiet vireo.cmd=\"echo READY: && sleep 600\"")
        .arg("--api-socket")
        .arg(&sock);
    let mut vm = Running::spawn(cmd);
    assert!(
        vm.wait_for("READY:", Duration::from_secs(600)),
        "{}\n{}",
        vm.stdout_text(),
        vm.stderr_text()
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let drain = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(&migration_greeting(false)).unwrap();
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    });
    let mut cmd = vireo();
    cmd.args(["migrate", "--max-bandwidth-mib", "8", "--api-socket"])
        .arg(&sock)
        .arg("--to")
        .arg(format!("127.0.0.1:{port}"));
    let mut mig = Running::spawn(cmd);
    let op = |c: &serde_json::Value| c["operation"].clone();
    assert!(
        wait_until(Duration::from_secs(20), || op(&counters(&sock))["kind"]
            == "migration"),
        "no operation shown: {}",
        counters(&sock)
    );
    let a = op(&counters(&sock));
    std::thread::sleep(Duration::from_millis(1500));
    let b = op(&counters(&sock));
    assert_eq!(b["phase"], "copy", "{b}");
    assert!(
        b["done_bytes"].as_u64() > a["done_bytes"].as_u64(),
        "no progress: {a} then {b}"
    );
    assert!(b["round_total_bytes"].as_u64().unwrap() >= b["round_done_bytes"].as_u64().unwrap());
    let rate = b["rate_bytes_per_s"].as_u64().unwrap();
    // Zero pages cost 8 bytes on the wire: memory may go faster than the cap.
    assert!(rate > 1 << 20, "{b}");
    assert!(
        wait_until(Duration::from_secs(10), || mig.stderr_text().contains("% ")),
        "no progress lines: {}",
        mig.stderr_text()
    );
    let line = mig
        .stderr_text()
        .lines()
        .find(|l| l.starts_with("migration"))
        .map(str::to_string)
        .unwrap_or_default();
    assert!(line.contains("MiB/s") && line.contains("round 1"), "{line}");

    assert!(client(&["migrate-cancel"], &sock).status.success());
    assert_eq!(mig.wait_exit(Duration::from_secs(20)), Some(1));
    drain.join().unwrap();
    assert!(wait_until(Duration::from_secs(10), || counters(&sock)
        ["operation"]
        .is_null()));
    assert!(client(&["stop"], &sock).status.success());
    vm.wait_exit(Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--pvpanic`: Debian's kernel, made to panic (sysrq `c`), reports it
/// through the pvpanic PCI device; the VMM logs a guest-panic event and
/// stops with exit status 6 and a message saying why, instead of leaving
/// a dead guest spinning.
#[test]
fn a_guest_panic_is_an_event_and_stops_the_vm() {
    let g = guest_dir();
    let mut cmd = vireo();
    cmd.args(["-v", "--log-format", "json", "run", "--accel", "emu"])
        .args(["--memory", "256M", "--pvpanic", "--kernel"])
        .arg(g.join("vmlinux"))
        .arg("--initrd")
        .arg(g.join("initramfs.cpio.gz"))
        .arg("--cmdline")
        // panic=0: the kernel would wait forever; only pvpanic ends the VM.
        .arg(
            "console=ttyS0 panic=0 quiet vireo.cmd=\"ls /sys/bus/pci/drivers/pvpanic-pci; \
             echo PANICKING; echo c > /proc/sysrq-trigger\"",
        );
    let mut vm = Running::spawn(cmd);
    let code = vm.wait_exit(Duration::from_secs(300));
    let console = vm.stdout_text();
    let stderr = vm.stderr_text();
    assert_eq!(code, Some(6), "console:\n{console}\nstderr:\n{stderr}");
    assert!(console.contains("PANICKING"), "{console}");
    // The driver bound to the device (its sysfs link is the PCI address).
    assert!(console.contains("0000:00:"), "{console}");
    assert!(console.contains("Kernel panic"), "{console}");
    let events: Vec<serde_json::Value> = stderr
        .lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["target"] == "vireo::event")
        .collect();
    let names: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    assert_eq!(names, ["boot", "guest-panic", "exit"], "{stderr}");
    assert_eq!(events[1]["crash_loaded"], false);
    assert_eq!(events[2]["reason"], "guest-panic");
    assert!(stderr.contains("the guest kernel panicked"), "{stderr}");
}
