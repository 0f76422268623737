//! Debian's kernel on Vireo's CPU engine (`--accel emu`) driving two more
//! virtio devices with its own drivers: the balloon, sized through the API
//! while the guest watches its memory shrink and grow back, and the virtio
//! console as the guest's console (hvc0), output and input.
//!
//! Markers the tests wait for are built from shell variables inside the
//! guest (`$p-READY`), so the kernel command line the kernel echoes at boot
//! never matches them.

mod common;

use common::*;
use std::io::Write;
use std::process::Command;
use std::time::Duration;

const BOOT_LIMIT: Duration = Duration::from_secs(600);

fn vireo_run(memory: &str, cmdline: &str, extra: &[&str]) -> Command {
    let g = guest_dir();
    let mut c = vireo();
    c.args(["run", "--accel", "emu", "--memory", memory, "--kernel"])
        .arg(g.join("vmlinux"))
        .arg("--initrd")
        .arg(g.join("initramfs.cpio.gz"))
        .arg("--cmdline")
        .arg(cmdline)
        .args(extra);
    c
}

/// The number after `key ` on the line that starts with it.
fn value(lines: &[String], key: &str) -> u64 {
    lines
        .iter()
        .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no '{key} N' line in {lines:?}"))
}

fn info(sock: &std::path::Path) -> serde_json::Value {
    let out = client(&["info"], sock);
    assert!(out.status.success(), "info: {out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Resident kB of process `pid`'s guest RAM mapping: the one mapping of
/// `size_kb`, or a little more (up to 1 MiB): the kernel merges an
/// anonymous mapping with a neighbour of the same protection (a small heap
/// arena mapped right after it was seen), so the VMA can be slightly
/// larger than the RAM. The neighbour's few resident kB are counted too,
/// well inside the margins the test asserts.
fn guest_ram_rss_kb(pid: u32, size_kb: u64) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let field = |l: &str, name: &str| -> Option<u64> {
        l.strip_prefix(name)?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()
    };
    let mut sizes = smaps.lines().filter_map(|l| field(l, "Size:"));
    let mut rss = smaps.lines().filter_map(|l| field(l, "Rss:"));
    let mut found = Vec::new();
    while let (Some(s), Some(r)) = (sizes.next(), rss.next()) {
        if (size_kb..=size_kb + 1024).contains(&s) {
            found.push(r);
        }
    }
    assert_eq!(
        found.len(),
        1,
        "one mapping of {size_kb} kB (to +1 MiB) expected"
    );
    found[0]
}

/// A 256 MiB guest with `--balloon deflate_on_oom=off` (so MemTotal shows
/// the balloon): it dirties 100 MiB, reports MemTotal and waits. The test
/// asks for a 64 MiB balloon; MemTotal drops by exactly 64 MiB, the
/// balloon's `actual` and the guest's statistics say the same, the host
/// memory behind it is released; a target larger than RAM is refused
/// meanwhile. Then a target of 0 gives it all back.
#[test]
fn balloon_inflates_and_deflates_under_api_control() {
    let dir = std::env::temp_dir().join(format!("vireo-balloon-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("api.sock");
    // Each wait polls MemTotal once a second for at most 10 minutes.
    let cmd = "p=BALLOON; mt() { awk '/MemTotal/{print $2}' /proc/meminfo; }; \
        dd if=/dev/zero of=/tmp/fill bs=1M count=100 2>/dev/null; rm /tmp/fill; \
        t0=$(mt); echo MEMTOTAL0 $t0; ls /sys/bus/virtio/drivers/virtio_balloon | grep -c virtio; \
        echo $p-READY; \
        i=0; while [ $(mt) -gt $((t0-65536)) ] && [ $i -lt 600 ]; do sleep 1; i=$((i+1)); done; \
        echo $p-INFLATED $(mt); \
        i=0; while [ $(mt) -lt $t0 ] && [ $i -lt 600 ]; do sleep 1; i=$((i+1)); done; \
        echo $p-DEFLATED $(mt)";
    let mut c = vireo_run(
        "256M",
        &format!("console=ttyS0 reboot=k panic=1 vireo.cmd=\"{cmd}\""),
        &["--balloon", "deflate_on_oom=off"],
    );
    c.arg("--api-socket").arg(&sock);
    let mut vm = Running::spawn(c);
    assert!(
        vm.wait_for("BALLOON-READY", BOOT_LIMIT),
        "the guest did not get ready:\n{}\n{}",
        vm.stdout_text(),
        vm.stderr_text()
    );
    let lines = command_output(&vm.stdout_text());
    let t0 = value(&lines, "MEMTOTAL0");
    assert_eq!(lines[1], "1", "the virtio_balloon driver bound: {lines:?}");
    // The driver posts its statistics when it starts.
    assert!(
        wait_until(Duration::from_secs(60), || info(&sock)["balloon"]["stats"]
            ["total_memory"]
            .as_u64()
            == Some(t0 * 1024)),
        "no statistics: {}",
        info(&sock)["balloon"]
    );
    let pid = vm.child.id();
    let rss_before = guest_ram_rss_kb(pid, 256 << 10);

    let out = client(&["balloon", "--target-mib", "64"], &sock);
    assert!(out.status.success(), "{out:?}");
    assert!(
        vm.wait_for("BALLOON-INFLATED", BOOT_LIMIT),
        "the balloon did not inflate: {}",
        info(&sock)["balloon"]
    );
    assert!(
        wait_until(Duration::from_secs(60), || info(&sock)["balloon"]
            ["actual_mib"]
            == 64),
        "actual never reached the target: {}",
        info(&sock)["balloon"]
    );
    // Fresh statistics show the smaller guest too (each info asks for them).
    assert!(
        wait_until(Duration::from_secs(60), || info(&sock)["balloon"]["stats"]
            ["total_memory"]
            .as_u64()
            == Some((t0 - 65536) * 1024)),
        "statistics did not follow: {}",
        info(&sock)["balloon"]
    );
    let b = info(&sock)["balloon"].clone();
    assert_eq!(b["inflated_pages"], 16384, "{b}");
    assert_eq!(b["refused_pfns"], 0, "{b}");
    assert_eq!(b["release_errors"], 0, "{b}");
    // 16384 released pages cannot be resident; the guest had touched more.
    let rss_after = guest_ram_rss_kb(pid, 256 << 10);
    eprintln!("guest RAM resident: {rss_before} kB before, {rss_after} kB inflated");
    assert!(rss_after <= (256 - 64) << 10, "{rss_after} kB resident");
    assert!(
        rss_before >= rss_after + (32 << 10),
        "{rss_before} -> {rss_after} kB"
    );

    // Too large: refused, nothing changes.
    let out = client(&["balloon", "--target-mib", "257"], &sock);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("400"));
    assert_eq!(info(&sock)["balloon"]["target_mib"], 64);

    let out = client(&["balloon", "--target-mib", "0"], &sock);
    assert!(out.status.success(), "{out:?}");
    let code = vm.wait_exit(BOOT_LIMIT);
    let console = vm.stdout_text();
    assert_eq!(
        code,
        Some(0),
        "exit {code:?}\n{console}\n{}",
        vm.stderr_text()
    );
    let lines = command_output(&console);
    assert_eq!(value(&lines, "BALLOON-INFLATED"), t0 - 65536, "{lines:?}");
    assert_eq!(value(&lines, "BALLOON-DEFLATED"), t0, "{lines:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--console virtio` with console=hvc0: the command's output reaches
/// vireo's stdout through hvc0, the guest reads a line typed on vireo's
/// stdin, and COM1 is disconnected. /init's own stdio is closed (hvc0
/// appears only when its module loads), so the command reopens
/// /dev/console, which is hvc0 by then.
#[test]
fn virtio_console_is_the_guests_console_both_ways() {
    let cmd = "exec </dev/console >/dev/console 2>&1; p=HVC; s=ttyS0; \
        echo COM1-$s > /dev/ttyS0; echo ACTIVE-$(cat /sys/class/tty/console/active); \
        echo $p-READY; read line; echo GOT[$line]";
    let c = vireo_run(
        "256M",
        &format!("console=hvc0 reboot=k panic=1 vireo.cmd=\"{cmd}\""),
        &["--console", "virtio"],
    );
    let (mut vm, mut stdin) = Running::spawn_with_stdin(c);
    assert!(
        vm.wait_for("HVC-READY", BOOT_LIMIT),
        "no output through hvc0:\n{}\n{}",
        vm.stdout_text(),
        vm.stderr_text()
    );
    stdin.write_all(b"hello-from-the-host\n").unwrap();
    stdin.flush().unwrap();
    let code = vm.wait_exit(BOOT_LIMIT);
    let out = vm.stdout_text();
    assert_eq!(code, Some(0), "exit {code:?}\n{out}\n{}", vm.stderr_text());
    let lines: Vec<&str> = out.lines().map(|l| l.trim_end_matches('\r')).collect();
    // The active console is printed before HVC-READY, so the tty's echo of
    // the host's line (sent on HVC-READY) cannot come between.
    assert!(lines.contains(&"ACTIVE-hvc0"), "{out}");
    assert!(lines.contains(&"GOT[hello-from-the-host]"), "{out}");
    assert!(!out.contains("COM1-ttyS0"), "COM1 output leaked: {out}");
    assert!(vm.stderr_text().contains("guest powered off"));
}

/// `vireo migrate-receive` on a free port with its API on `sock`, once it
/// listens; returns it and its address.
fn migration_destination(sock: &std::path::Path) -> (Running, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let mut c = vireo();
    c.args(["-v", "migrate-receive", "--listen"])
        .arg(&addr)
        .arg("--api-socket")
        .arg(sock);
    let dst = Running::spawn(c);
    assert!(
        wait_until(Duration::from_secs(20), || dst
            .stderr_text()
            .contains("waiting for a migration")),
        "the destination does not listen: {}",
        dst.stderr_text()
    );
    (dst, addr)
}

/// The VM behind `sock` answers and runs.
fn running(sock: &std::path::Path) -> bool {
    let out = client(&["info"], sock);
    out.status.success()
        && serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .is_ok_and(|v| v["state"] == "running")
}

/// The guest's console lines (carriage returns dropped).
fn console_lines(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.trim_end_matches('\r').to_string())
        .collect()
}

/// An inflated balloon goes through a snapshot and a live migration: the
/// guest inflates 64 MiB, is snapshotted, restored in a new process
/// (balloon still 64 MiB, the guest's MemTotal still 64 MiB short), that
/// one migrates to a third process, whose balloon is still inflated, whose
/// guest still sends fresh statistics (the statistics buffer the device
/// held came along), and which deflates it through the API: the guest gets
/// its memory back.
#[test]
fn an_inflated_balloon_survives_snapshot_restore_and_migration() {
    let dir = std::env::temp_dir().join(format!("vireo-balloon-snap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (sa, sb, sc) = (dir.join("a.sock"), dir.join("b.sock"), dir.join("c.sock"));
    let snap = dir.join("snap");
    let cmd = "p=BALLOON; mt() { awk '/MemTotal/{print $2}' /proc/meminfo; }; \
        t0=$(mt); echo MEMTOTAL0 $t0; echo $p-READY; \
        i=0; while [ $(mt) -gt $((t0-65536)) ] && [ $i -lt 600 ]; do sleep 1; i=$((i+1)); done; \
        echo $p-INFLATED $(mt); \
        i=0; while [ $(mt) -lt $t0 ] && [ $i -lt 900 ]; do sleep 1; i=$((i+1)); done; \
        echo $p-DEFLATED $(mt)";
    let mut c = vireo_run(
        "256M",
        &format!("console=ttyS0 reboot=k panic=1 vireo.cmd=\"{cmd}\""),
        &["--balloon", "deflate_on_oom=off"],
    );
    c.arg("--api-socket").arg(&sa);
    let mut a = Running::spawn(c);
    assert!(
        a.wait_for("BALLOON-READY", BOOT_LIMIT),
        "the guest did not get ready:\n{}\n{}",
        a.stdout_text(),
        a.stderr_text()
    );
    let t0 = value(&command_output(&a.stdout_text()), "MEMTOTAL0");
    assert!(client(&["balloon", "--target-mib", "64"], &sa)
        .status
        .success());
    assert!(
        a.wait_for("BALLOON-INFLATED", BOOT_LIMIT),
        "the balloon did not inflate: {}",
        info(&sa)["balloon"]
    );
    assert!(
        wait_until(Duration::from_secs(60), || info(&sa)["balloon"]
            ["actual_mib"]
            == 64),
        "{}",
        info(&sa)["balloon"]
    );
    assert_eq!(
        value(&console_lines(&a.stdout_text()), "BALLOON-INFLATED"),
        t0 - 65536
    );

    // Snapshot, then restore in a new process.
    snapshot_and_stop(&mut a, &sa, &snap, Duration::from_secs(10));
    let mut c = vireo();
    c.args(["restore", "--from"])
        .arg(&snap)
        .arg("--api-socket")
        .arg(&sb);
    let mut b = Running::spawn(c);
    assert!(
        wait_until(Duration::from_secs(30), || running(&sb)),
        "the restored VM does not run: {}",
        b.stderr_text()
    );
    let bb = info(&sb)["balloon"].clone();
    assert_eq!(bb["target_mib"], 64, "{bb}");
    assert_eq!(bb["actual_mib"], 64, "{bb}");
    assert_eq!(bb["inflated_pages"], 16384, "{bb}");
    // The restored guest still misses the ballooned memory.
    assert!(
        wait_until(Duration::from_secs(120), || info(&sb)["balloon"]["stats"]
            ["total_memory"]
            .as_u64()
            == Some((t0 - 65536) * 1024)
            && info(&sb)["balloon"]["stats_age_ms"].is_u64()),
        "no fresh statistics after restore: {}",
        info(&sb)["balloon"]
    );

    // Live migration of the restored VM.
    let (mut c3, addr) = migration_destination(&sc);
    let out = vireo()
        .args(["migrate", "--api-socket"])
        .arg(&sb)
        .arg("--to")
        .arg(&addr)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "migrate: {out:?}\n{}",
        c3.stderr_text()
    );
    assert_eq!(b.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(
        wait_until(Duration::from_secs(30), || running(&sc)),
        "the migrated VM does not run: {}",
        c3.stderr_text()
    );
    let cb = info(&sc)["balloon"].clone();
    assert_eq!(cb["target_mib"], 64, "{cb}");
    assert_eq!(cb["actual_mib"], 64, "{cb}");
    let updates = cb["stats_updates"].as_u64().unwrap();
    assert!(
        wait_until(Duration::from_secs(120), || info(&sc)["balloon"]
            ["stats_updates"]
            .as_u64()
            > Some(updates)),
        "the migrated guest sends no fresh statistics: {}",
        info(&sc)["balloon"]
    );

    // Deflate on the destination: the guest gets its memory back.
    assert!(client(&["balloon", "--target-mib", "0"], &sc)
        .status
        .success());
    let code = c3.wait_exit(BOOT_LIMIT);
    let console = c3.stdout_text();
    assert_eq!(code, Some(0), "{console}\n{}", c3.stderr_text());
    assert_eq!(value(&console_lines(&console), "BALLOON-DEFLATED"), t0);
    let _ = std::fs::remove_dir_all(&dir);
}
