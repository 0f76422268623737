//! I/O limits with real guests: a Debian kernel writing to a disk limited
//! to 20 MiB/s, and sending TCP through a NIC limited the same way. The
//! rate is measured on the host, over a wall-clock window well after the
//! bucket's first burst, from what reached the device (the disk's write
//! counter, the NIC's transmit counter, the bytes the host's TCP listener
//! received), and checked both ways within 10% (see [`assert_limited`]):
//! - at most the limit over the wall time: a bound that holds however
//!   loaded the host is;
//! - at least the limit over the time the queue waited for tokens (the
//!   device's `throttled_us` over the same window). While a request waits,
//!   a token bucket passes exactly its rate: tokens accrue at the rate and
//!   the waiting request takes them as soon as they suffice, so none are
//!   lost. Time in which the guest did not keep up, or the host's disk or
//!   CPU held the device back, is not time the limit held the queue, and
//!   a loaded host cannot fail the bound; on a quiet host the queue waits
//!   all but the few milliseconds a second the writes take, so the bound
//!   is the wall-clock one within a few percent. A limiter that passes
//!   less than its rate while a request waits (a wrong refill, a timer
//!   that fires late or never) fails it on any host.
//!
//! After the limit is lifted through the API the rate must exceed twice it.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{client, guest_dir, Netns, Running};

const LIMIT: f64 = (20 << 20) as f64;

/// One rate test at a time: two engine guests side by side on a small,
/// loaded host would measure the host, not the limit.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vireo-lim-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn counters(sock: &Path) -> serde_json::Value {
    let out = client(&["counters"], sock);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `auto`: KVM on a host with VT-x/AMD-V, the engine where KVM is absent or
/// nested too slowly to boot Debian in reasonable time (see README.md).
fn accel() -> &'static str {
    "auto"
}

/// Bytes per second `f` grows by over `window` of wall time.
fn rate(window: Duration, mut f: impl FnMut() -> u64) -> f64 {
    let (secs, [d]) = grown(window, || [f()]);
    d / secs
}

/// What each of the counters `f` reads grew by over `window`, and the
/// seconds of wall time that took (from before the first reading to after
/// the last).
fn grown<const N: usize>(window: Duration, mut f: impl FnMut() -> [u64; N]) -> (f64, [f64; N]) {
    let (t0, a) = (Instant::now(), f());
    std::thread::sleep(window);
    let (b, t1) = (f(), Instant::now());
    let d = std::array::from_fn(|i| b[i].saturating_sub(a[i]) as f64);
    ((t1 - t0).as_secs_f64(), d)
}

/// The two bounds of a 20 MiB/s limit (see the module doc): `bytes`
/// passed in `secs` of wall time, while the queue waited `waited_us` for
/// tokens. `what` names the counter for the messages.
fn assert_limited(what: &str, secs: f64, bytes: f64, waited_us: f64) {
    let waited = waited_us / 1e6;
    eprintln!(
        "{what}: {:.1} MiB/s over {secs:.1} s; the queue waited for tokens {waited:.1} s of it ({:.1} MiB/s over that time)",
        mib(bytes / secs),
        mib(bytes / waited.max(1e-9)),
    );
    assert!(
        bytes / secs <= LIMIT * 1.10,
        "under a 20 MiB/s limit {what} was {:.2} MiB/s",
        mib(bytes / secs)
    );
    assert!(
        bytes >= LIMIT * 0.90 * waited,
        "under a 20 MiB/s limit {what} was {:.2} MiB in the {waited:.2} s its queue waited for tokens: {:.2} MiB/s",
        mib(bytes),
        mib(bytes / waited)
    );
}

fn mib(r: f64) -> f64 {
    r / (1 << 20) as f64
}

fn vm_command(g: &Path, sock: &Path, script: &str) -> Command {
    let mut c = common::vireo();
    c.args(["run", "--accel", accel(), "--memory", "256M", "--kernel"])
        .arg(g.join("vmlinux"))
        .arg("--initrd")
        .arg(g.join("initramfs.cpio.gz"))
        .arg("--api-socket")
        .arg(sock)
        .arg("--cmdline")
        .arg(format!(
            "console=ttyS0 reboot=k panic=1 quiet vireo.cmd=\"{script}\""
        ));
    c
}

/// A guest writes 1 MiB O_DIRECT requests to a disk started with
/// `bw=20M`: the disk takes 20 MiB/s (within 10%), the throttling shows
/// in vm.counters and /metrics, and once `vireo rate-limit disk0 --limit
/// none` lifts it the guest writes more than twice as fast. No request
/// fails.
#[test]
fn a_disk_limited_to_20_mib_s_takes_20_mib_s_until_lifted() {
    let _serial = one_at_a_time();
    let g = guest_dir();
    let dir = scratch("disk");
    let disk = dir.join("disk.img");
    let f = std::fs::File::create(&disk).unwrap();
    f.set_len(64 << 20).unwrap();
    drop(f);
    let sock = dir.join("api.sock");
    // Sequential writes wrap at the end of the disk; far longer than the test.
    let script = "echo WRITING; vireo-io blk /dev/vda write 1048576 8 3600";
    let mut c = vm_command(&g, &sock, script);
    c.arg("--disk")
        .arg(format!("path={},format=raw,bw=20M", disk.display()));
    let mut vm = Running::spawn(c);
    assert!(
        vm.wait_for("VIREO-IO-BEGIN", Duration::from_secs(600)),
        "the guest did not start writing:\n{}\n{}",
        vm.stdout_text(),
        vm.stderr_text()
    );
    let written = |sock: &Path| {
        counters(sock)["disks"][0]["write"]["bytes"]
            .as_u64()
            .unwrap()
    };
    // Past the first burst (2 MiB: a tenth of a second's worth).
    assert!(
        common::wait_until(Duration::from_secs(120), || written(&sock) > 8 << 20),
        "the guest wrote almost nothing: {}",
        counters(&sock)
    );
    let c0 = counters(&sock);
    assert_eq!(
        c0["disks"][0]["rate_limiter"]["bandwidth"],
        serde_json::json!({"size": 2097152, "one_time_burst": 0, "refill_time": 100}),
        "{c0}"
    );
    let (secs, [bytes, waited_us]) = grown(Duration::from_secs(10), || {
        let d = &counters(&sock)["disks"][0];
        [
            d["write"]["bytes"].as_u64().unwrap(),
            d["throttled_us"].as_u64().unwrap(),
        ]
    });
    assert_limited("the disk's write rate", secs, bytes, waited_us);

    let c1 = counters(&sock);
    let d = &c1["disks"][0];
    assert!(d["throttled_requests"].as_u64().unwrap() > 0, "{d}");
    // Most of those 10 s the queue waited for tokens.
    assert!(d["throttled_us"].as_u64().unwrap() > 1_000_000, "{d}");
    let text = client(&["counters", "--prometheus"], &sock);
    let text = String::from_utf8(text.stdout).unwrap();
    for name in [
        "vireo_block_throttled_requests_total{device=\"disk0\"}",
        "vireo_block_throttled_seconds_total{device=\"disk0\"}",
    ] {
        assert!(text.contains(name), "{name} not in\n{text}");
    }

    let out = client(&["rate-limit", "disk0", "--limit", "none"], &sock);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::thread::sleep(Duration::from_millis(500));
    let free = rate(Duration::from_secs(4), || written(&sock));
    eprintln!("lifted: {:.1} MiB/s", mib(free));
    assert!(
        free > 2.0 * LIMIT,
        "after lifting the limit the disk took only {:.2} MiB/s",
        mib(free)
    );
    let c2 = counters(&sock);
    assert!(c2["disks"][0]["rate_limiter"].is_null(), "{c2}");
    assert_eq!(c2["disks"][0]["errors"], 0, "{c2}");

    // Errors the API names: an unknown device, a NIC's limits for a disk.
    let out = client(&["rate-limit", "disk7", "--limit", "bw=1M"], &sock);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("disk7"), "{err}");
    let out = client(&["rate-limit", "disk0", "--rx", "bw=1M"], &sock);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("a disk has one limiter"), "{err}");

    assert!(client(&["stop"], &sock).status.success());
    vm.wait_exit(Duration::from_secs(30));
    let console = vm.stdout_text();
    assert!(
        !console.contains("VIREO-IO-ERROR") && !console.contains("I/O error"),
        "the guest saw I/O errors:\n{console}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A guest sends TCP to the host through a tap whose NIC is started with
/// `tx_bw=20M`: the host receives 20 MiB/s (within 10%); after `vireo
/// rate-limit net0 --tx none` more than twice that. Needs root (a tap in
/// a namespace); says so and skips otherwise.
#[test]
fn a_nic_limited_to_20_mib_s_sends_20_mib_s_until_lifted() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/net/tun").exists() {
        eprintln!("note: needs root and /dev/net/tun; NIC rate limit test skipped");
        return;
    }
    let _serial = one_at_a_time();
    let g = guest_dir();
    let dir = scratch("net");
    let sock = dir.join("api.sock");
    let ns = Netns::new(format!("vireo-lim{}", std::process::id()));
    let tap = format!("vl{}", std::process::id() % 100_000);
    const PORT: u16 = 5577;
    let listener = ns.listen(PORT);
    let script = format!(
        "ip link set eth0 up && ip addr add 10.213.7.2/24 dev eth0 && \
         vireo-io tcp-send 10.213.7.1 {PORT} 3600"
    );
    let mut c = Command::new("ip");
    let vm_cmd = vm_command(&g, &sock, &script);
    c.args(["netns", "exec", &ns.0])
        .arg(vm_cmd.get_program())
        .args(vm_cmd.get_args())
        .arg("--net")
        .arg(format!("tap={tap},mac=52:54:00:12:34:57,tx_bw=20M"));
    let mut vm = Running::spawn(c);
    assert!(
        common::wait_until(Duration::from_secs(60), || ns.ip(&["link", "show", &tap])),
        "the VMM made no tap {tap}:\n{}",
        vm.stderr_text()
    );
    assert!(ns.ip(&["link", "set", &tap, "up"]));
    assert!(ns.ip(&["addr", "add", "10.213.7.1/24", "dev", &tap]));

    let received = Arc::new(AtomicU64::new(0));
    {
        let received = received.clone();
        std::thread::spawn(move || {
            let Ok((mut s, _)) = listener.accept() else {
                return;
            };
            let mut buf = vec![0u8; 256 << 10];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
                received.fetch_add(n as u64, Ordering::Relaxed);
            }
        });
    }
    let got = || received.load(Ordering::Relaxed);
    assert!(
        common::wait_until(Duration::from_secs(600), || got() > 16 << 20),
        "the guest sent almost nothing ({} bytes):\n{}\n{}",
        got(),
        vm.stdout_text(),
        vm.stderr_text()
    );
    // What the device sent (frames, as the bucket counts them) and what
    // the host's listener received (TCP payload), over the same window.
    let (secs, [frames, payload, waited_us]) = grown(Duration::from_secs(10), || {
        let n = &counters(&sock)["nets"][0];
        [
            n["tx_bytes"].as_u64().unwrap(),
            got(),
            n["tx_throttled_us"].as_u64().unwrap(),
        ]
    });
    assert_limited("the NIC's transmitted frames", secs, frames, waited_us);
    // TCP payload: the limit counts frames (headers too), so the payload
    // rate sits a few percent under it.
    assert_limited(
        "the TCP payload the host received",
        secs,
        payload,
        waited_us,
    );
    let n = &counters(&sock)["nets"][0];
    assert!(n["tx_throttled"].as_u64().unwrap() > 0, "{n}");
    assert!(n["tx_throttled_us"].as_u64().unwrap() > 1_000_000, "{n}");
    assert_eq!(n["tx_dropped"], 0, "{n}");

    let out = client(&["rate-limit", "net0", "--tx", "none"], &sock);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::thread::sleep(Duration::from_millis(500));
    let free = rate(Duration::from_secs(4), got);
    eprintln!("lifted: {:.1} MiB/s", mib(free));
    assert!(
        free > 2.0 * LIMIT,
        "after lifting the limit the host received only {:.2} MiB/s",
        mib(free)
    );
    let n = &counters(&sock)["nets"][0];
    assert_eq!(n["errors"], 0, "{n}");
    assert!(client(&["stop"], &sock).status.success());
    vm.wait_exit(Duration::from_secs(30));
    let console = vm.stdout_text();
    assert!(
        !console.contains("VIREO-IO-ERROR"),
        "the guest's sender failed:\n{console}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Where the cpu controller is: cgroup v2, or (Vireo's fallback on
/// hybrid hosts, docs/limits.md) a cgroup v1 hierarchy.
enum CpuHierarchy {
    V2(PathBuf),
    V1(PathBuf),
}

impl CpuHierarchy {
    fn mount(&self) -> &Path {
        match self {
            CpuHierarchy::V2(m) | CpuHierarchy::V1(m) => m,
        }
    }

    /// The file a sub-group lists its threads in.
    fn threads_file(&self) -> &'static str {
        match self {
            CpuHierarchy::V2(_) => "cgroup.threads",
            CpuHierarchy::V1(_) => "tasks",
        }
    }

    /// The CFS quota and period the cgroup `dir` has, in µs.
    fn quota_period(&self, dir: &Path) -> (String, String) {
        let read = |f: &str| {
            std::fs::read_to_string(dir.join(f))
                .unwrap()
                .trim()
                .to_string()
        };
        match self {
            CpuHierarchy::V2(_) => {
                let v = read("cpu.max");
                let (q, p) = v.split_once(' ').unwrap();
                (q.to_string(), p.to_string())
            }
            CpuHierarchy::V1(_) => (read("cpu.cfs_quota_us"), read("cpu.cfs_period_us")),
        }
    }
}

/// cgroup v2 with the cpu controller, else a cgroup v1 hierarchy with it
/// (else why neither, for the skip message).
fn cpu_hierarchy() -> Result<CpuHierarchy, String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mut v1 = None;
    let mut v2 = None;
    for (left, right) in info.lines().filter_map(|l| l.split_once(" - ")) {
        let point = left.split_whitespace().nth(4).map(PathBuf::from);
        let mut r = right.split_whitespace();
        match r.next() {
            Some("cgroup2") => v2 = v2.or(point),
            Some("cgroup") if r.nth(1).is_some_and(|o| o.split(',').any(|x| x == "cpu")) => {
                v1 = v1.or(point)
            }
            _ => {}
        }
    }
    if let Some(mount) = v2 {
        let controllers =
            std::fs::read_to_string(mount.join("cgroup.controllers")).unwrap_or_default();
        if controllers.split_whitespace().any(|c| c == "cpu") {
            return Ok(CpuHierarchy::V2(mount));
        }
    }
    v1.map(CpuHierarchy::V1)
        .ok_or_else(|| "no cgroup hierarchy offers the cpu controller".to_string())
}

/// CPU time the process `pid` used, all its threads, in µs.
fn process_cpu_us(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After the command name (in parentheses): state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    (f[11] + f[12]) * 1_000_000 / hz
}

/// A CPU-bound guest in a VMM started with `--cgroup PARENT --cpu-max
/// 50%` uses half a host CPU (the cgroup's cpu.stat usage over 10 s of
/// wall time, within 10%) and keeps running; vCPU threads sit in the
/// `vcpus` sub-group, the others in `vmm`; `vireo cgroup` changes
/// cpu.max live; the cgroup is gone once the VMM exits. Needs root and a
/// cgroup hierarchy with the cpu controller; says so and skips
/// otherwise. Where the cpu controller is bound to cgroup v1 the same
/// runs against Vireo's v1 fallback: the limit is read from
/// cpu.cfs_quota_us/cpu.cfs_period_us, the usage from the VMM's own CPU
/// time (/proc/PID/stat: the cgroup holds only this process, and the v1
/// cpu hierarchy need not have cpuacct).
#[test]
fn a_cpu_bound_guest_under_cpu_max_50_percent_uses_half_a_cpu() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("note: needs root (to make cgroups); cpu.max test skipped");
        return;
    }
    let hierarchy = match cpu_hierarchy() {
        Ok(h) => h,
        Err(why) => {
            eprintln!("note: {why}; cpu.max test skipped");
            return;
        }
    };
    let mount = hierarchy.mount().to_path_buf();
    let _serial = one_at_a_time();
    // The parent: under the root, with cpu enabled there (the root may
    // have processes and still hand out controllers) and a high weight,
    // so a loaded host does not keep the guest from its quota.
    let parent_name = format!("vireo-test-{}", std::process::id());
    let parent = mount.join(&parent_name);
    let _ = std::fs::remove_dir(&parent);
    match hierarchy {
        CpuHierarchy::V2(_) => {
            let _ = std::fs::write(mount.join("cgroup.subtree_control"), "+cpu");
            std::fs::create_dir(&parent).unwrap();
            let _ = std::fs::write(parent.join("cpu.weight"), "10000");
        }
        CpuHierarchy::V1(_) => {
            eprintln!(
                "note: the cpu controller is bound to cgroup v1 at {}: testing Vireo's v1 fallback",
                mount.display()
            );
            std::fs::create_dir(&parent).unwrap();
            let _ = std::fs::write(parent.join("cpu.shares"), "102400");
        }
    }

    let g = guest_dir();
    let dir = scratch("cpu");
    let sock = dir.join("api.sock");
    let script = "echo SPINNING; i=0; while :; do i=$((i+1)); \
                  [ $((i % 20000)) = 0 ] && echo TICK $i; done";
    let mut c = vm_command(&g, &sock, script);
    c.arg("--cgroup")
        .arg(format!("/{parent_name}"))
        .args(["--cpu-max", "50%"]);
    let mut vm = Running::spawn(c);
    let own = parent.join(format!("vireo-{}", vm.child.id()));
    assert!(
        vm.wait_for("TICK", Duration::from_secs(600)),
        "the guest did not start spinning:\n{}\n{}",
        vm.stdout_text(),
        vm.stderr_text()
    );
    assert_eq!(
        hierarchy.quota_period(&own),
        ("50000".to_string(), "100000".to_string())
    );
    for sub in ["vcpus", "vmm"] {
        let t = std::fs::read_to_string(own.join(sub).join(hierarchy.threads_file())).unwrap();
        assert!(!t.trim().is_empty(), "no thread in {sub}");
    }
    let pid = vm.child.id();
    let usage = || match hierarchy {
        CpuHierarchy::V2(_) => {
            let s = std::fs::read_to_string(own.join("cpu.stat")).unwrap();
            s.lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap()
        }
        CpuHierarchy::V1(_) => process_cpu_us(pid),
    };
    std::thread::sleep(Duration::from_secs(2));
    let ticks_before = vm.stdout_text().matches("TICK").count();
    let cpus = rate(Duration::from_secs(10), usage) / 1e6;
    eprintln!("under cpu.max 50%: {cpus:.3} CPUs");
    assert!(
        (cpus - 0.5).abs() <= 0.05,
        "under cpu.max 50% the VMM used {cpus:.3} CPUs"
    );
    assert!(
        common::wait_until(Duration::from_secs(60), || vm
            .stdout_text()
            .matches("TICK")
            .count()
            > ticks_before),
        "the guest stopped running under the quota"
    );

    let out = client(&["cgroup", "--cpu-max", "25%"], &sock);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        hierarchy.quota_period(&own),
        ("25000".to_string(), "100000".to_string())
    );
    assert!(client(&["stop"], &sock).status.success());
    vm.wait_exit(Duration::from_secs(30));
    assert!(
        !own.exists(),
        "{} is left after the VMM exited",
        own.display()
    );
    let _ = std::fs::remove_dir(&parent);
    let _ = std::fs::remove_dir_all(&dir);
}
