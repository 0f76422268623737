//! `vireo-bench`: Vireo's figures beside a peer (QEMU) measured in the same run.
//!
//! A tool of its own, outside the product binary: it drives QEMU over QMP,
//! makes network namespaces and disk images, and runs the `vireo` binary it
//! measures as a separate process, the one built beside it in the same
//! target directory (or `--vireo PATH`), so what it times is exactly what a
//! user runs.
//!
//! `startup`: wall time from spawning the VMM process to the first byte a
//! tiny guest writes to its serial port (its first instructions), and the
//! VMM's resident memory beyond guest RAM while that guest idles. The guest
//! is a PVH ELF made here, so both VMMs load the same file.
//!
//! `boot`, `blk` and `net` run the Debian test guest (guest/build.sh) under
//! both VMMs with the same kernel, initramfs and accelerator kind (see
//! `guest`); `blk` and `net` are in `io`, `vsock` (virtio-vsock stream
//! throughput both ways) in `vsock`.

mod disk;
mod guest;
mod io;
mod vsock;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "vireo-bench",
    version,
    about = "Measure Vireo beside QEMU and print the figures side by side"
)]
pub struct BenchArgs {
    /// Which benchmark: startup (VMM start and overhead), snapshot (snapshot
    /// and restore times for 256 MiB and 2 GiB guests), migrate (live
    /// migration and API latency), boot (Debian boot, a shell loop and guest
    /// MIPS), blk (virtio-blk throughput and IOPS in the guest),
    /// net (virtio-net TCP throughput both ways through a tap; needs root),
    /// vsock (virtio-vsock stream throughput both ways) or disk-boot (the
    /// Debian disk image through SeaBIOS and GRUB to the login prompt and
    /// power-off).
    #[arg(default_value = "startup")]
    which: String,
    /// Runs per VMM (the median is printed) [default: 20; blk, net and vsock: 3; disk-boot: 1].
    #[arg(long)]
    runs: Option<usize>,
    /// Peer binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: String,
    /// Guest images for boot, blk, net and vsock (guest/build.sh output) [default: $VIREO_GUEST_DIR or guest/out].
    #[arg(long, value_name = "DIR")]
    guest_dir: Option<PathBuf>,
    /// boot, blk, net and vsock: emu (Vireo's engine beside QEMU TCG) or kvm (both on KVM).
    #[arg(long, value_enum, default_value = "emu")]
    accel: guest::Accel,
    /// blk: the disk image format, raw or qcow2 (the same image for both VMMs).
    #[arg(long, default_value = "raw")]
    format: String,
    /// blk, net and vsock: seconds per test, on the guest's clock.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// boot, blk, net, vsock and disk-boot: seconds before a VM that has not finished is killed
    /// [default: 900; disk-boot: 3600].
    #[arg(long)]
    timeout: Option<u64>,
    /// disk-boot: the BIOS image both VMMs boot [default: /usr/share/seabios/bios-256k.bin].
    #[arg(long, value_name = "PATH")]
    firmware: Option<PathBuf>,
    /// net: tap (a tap in a namespace; needs root) or user (passt, beside
    /// QEMU's -netdev stream on the same passt; no privileges).
    #[arg(long, default_value = "tap")]
    backend: String,
    /// The vireo binary to measure [default: `vireo` beside this program,
    /// i.e. built in the same target directory and profile].
    #[arg(long, value_name = "PATH")]
    vireo: Option<PathBuf>,
    /// An option for every vireo the bench starts, before its subcommand
    /// (repeatable), e.g. --vireo-arg=--seccomp --vireo-arg=off to measure
    /// without seccomp filters.
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    vireo_arg: Vec<String>,
    /// boot, blk, net and vsock: a second Vireo ("B") measured in the same
    /// rounds as the first ("A"), for an A/B comparison of two builds or two
    /// option sets; the B/A ratio is printed [default: the same binary as A,
    /// when --vireo-b-arg is given].
    #[arg(long, value_name = "PATH")]
    vireo_b: Option<PathBuf>,
    /// An option for every B vireo, before its subcommand (repeatable).
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    vireo_b_arg: Vec<String>,
    /// With a B: leave QEMU out, for a quicker A/B run of two Vireos (no
    /// ratio to the peer is printed then).
    #[arg(long)]
    no_qemu: bool,
    /// The resolved A and (optional) B binaries with their options.
    #[arg(skip)]
    vmms: Vec<Vireo>,
}

/// A Vireo binary to measure and the options it is started with.
#[derive(Clone, Debug)]
pub struct Vireo {
    pub path: PathBuf,
    pub args: Vec<String>,
    /// Column title suffix: "" for A, " (B)" for B.
    pub tag: &'static str,
}

impl Vireo {
    /// `vireo` with its options; the caller adds the subcommand.
    pub fn command(&self) -> Command {
        let mut c = Command::new(&self.path);
        c.args(&self.args);
        c
    }
}

impl BenchArgs {
    /// The vireo to measure, A (resolved in `run`).
    fn vireo(&self) -> &Vireo {
        &self.vmms[0]
    }

    /// How long a VM may run before it is killed.
    fn timeout(&self) -> Duration {
        let default = if self.which == "disk-boot" { 3600 } else { 900 };
        Duration::from_secs(self.timeout.unwrap_or(default))
    }

    /// Every vireo to measure: A, then B when one was asked for.
    pub fn vireos(&self) -> &[Vireo] {
        &self.vmms
    }
}

/// The host's load while a bench runs: sampled before each run, so each
/// figure can be judged against how busy the machine was.
pub mod load {
    use std::sync::Mutex;

    static SAMPLES: Mutex<Vec<f64>> = Mutex::new(Vec::new());

    /// The 1-minute load average now (recorded for [`summary`]).
    pub fn sample() -> f64 {
        let l = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(f64::NAN);
        if let Ok(mut v) = SAMPLES.lock() {
            v.push(l);
        }
        l
    }

    /// One line: the load averages seen before the runs, and the CPUs.
    pub fn summary() -> String {
        let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
        let v = SAMPLES.lock().map(|v| v.clone()).unwrap_or_default();
        let v: Vec<f64> = v.into_iter().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return format!("load: not sampled ({cpus} CPUs)");
        }
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(0.0, f64::max);
        format!(
            "load (1-min average before each run, {} runs, {cpus} CPUs): min {min:.2}, max {max:.2}, last {:.2}",
            v.len(),
            v[v.len() - 1]
        )
    }
}

/// Which columns a ratio row compares: each Vireo against the peer (the
/// column whose title does not start with "vireo", if there is one), and
/// with two Vireos, B against A.
pub(crate) fn ratio_pairs<T>(cols: &[T], title: impl Fn(&T) -> &str) -> Vec<(&T, &T)> {
    let (vireos, peers): (Vec<&T>, Vec<&T>) =
        cols.iter().partition(|c| title(c).starts_with("vireo"));
    let mut pairs: Vec<(&T, &T)> = match peers.first() {
        Some(p) => vireos.iter().map(|v| (*v, *p)).collect(),
        None => Vec::new(),
    };
    if let [a, b] = vireos[..] {
        pairs.push((b, a));
    }
    pairs
}

/// The order in which `n` series run in round `round`: each round starts
/// one series later than the last (A, B, QEMU, then B, QEMU, A, ...), so
/// going first or right after another VMM (page cache, a tap just torn
/// down, CPU frequency) favours no series.
pub(crate) fn round_order(round: usize, n: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |k| (round + k) % n)
}

/// Median of per-round ratios a[i] / b[i] (rounds where both ran): robust
/// against load that drifts over the bench, since both sides of each ratio
/// ran back to back.
pub(crate) fn paired_ratio(a: &[f64], b: &[f64]) -> Option<f64> {
    paired_quartiles(a, b).map(|(_, m, _)| m)
}

/// First quartile, median and third quartile of the per-round ratios
/// a[i] / b[i]: the middle half of the rounds lies between the outer two,
/// which says how far one median ratio can be trusted.
pub(crate) fn paired_quartiles(a: &[f64], b: &[f64]) -> Option<(f64, f64, f64)> {
    let mut r: Vec<f64> = a
        .iter()
        .zip(b)
        .filter(|(x, y)| x.is_finite() && y.is_finite() && **y > 0.0)
        .map(|(x, y)| x / y)
        .collect();
    if r.is_empty() {
        return None;
    }
    r.sort_by(f64::total_cmp);
    Some((r[r.len() / 4], r[r.len() / 2], r[(3 * r.len()) / 4]))
}

/// `vireo` next to this executable: cargo puts both binaries of the
/// workspace in the same target directory.
fn vireo_beside_me() -> Result<PathBuf> {
    let me = std::env::current_exe().context("finding this program's path")?;
    let dir = me
        .parent()
        .with_context(|| format!("{} has no directory", me.display()))?;
    Ok(dir.join("vireo"))
}

fn main() -> std::process::ExitCode {
    match run(BenchArgs::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vireo-bench: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

const GUEST_MEM_MIB: u64 = 64;
const LOAD: u64 = 0x10_0000;

/// A PVH kernel whose 32-bit entry writes '!' to COM1 and halts.
fn tiny_pvh_elf() -> Vec<u8> {
    // mov dx,0x3f8 ; mov al,'!' ; out dx,al ; 1: hlt ; jmp 1b
    let code: &[u8] = &[0x66, 0xba, 0xf8, 0x03, 0xb0, b'!', 0xee, 0xf4, 0xeb, 0xfd];
    arch::tiny_elf::pvh_elf(LOAD as u32, code)
}

struct Sample {
    first_byte: Duration,
    rss_beyond_guest_kib: u64,
}

/// Resident memory of `pid` outside mappings the size of guest RAM.
fn rss_beyond_guest_kib(pid: u32, guest_bytes: u64) -> Result<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .with_context(|| format!("reading /proc/{pid}/smaps"))?;
    let mut total = 0u64;
    let mut in_guest = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            // A mapping header: "start-end perms ...".
            let mut it = first.split('-');
            let a = u64::from_str_radix(it.next().unwrap_or("0"), 16).unwrap_or(0);
            let b = u64::from_str_radix(it.next().unwrap_or("0"), 16).unwrap_or(0);
            let size = b.saturating_sub(a);
            // Guest RAM: one mapping of the guest's size (QEMU may round it
            // up to its alignment).
            in_guest = size >= guest_bytes && size <= guest_bytes + (4 << 20);
        } else if let Some(v) = line.strip_prefix("Rss:") {
            if !in_guest {
                total += v
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0);
            }
        }
    }
    Ok(total)
}

fn measure_once(mut cmd: Command) -> Result<Sample> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child: Child = cmd.spawn().context("spawning the VMM")?;
    let mut out = child.stdout.take().context("no stdout")?;
    let mut byte = [0u8; 1];
    let got = loop {
        match out.read(&mut byte) {
            Ok(0) => break false,
            Ok(_) if byte[0] == b'!' => break true,
            Ok(_) => continue,
            Err(e) => {
                let _ = child.kill();
                return Err(e.into());
            }
        }
    };
    let first_byte = start.elapsed();
    if !got {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        let _ = child.kill();
        let _ = child.wait();
        let line = err
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no output");
        bail!("{line}");
    }
    // Let the VMM settle into its idle state before reading its memory.
    std::thread::sleep(Duration::from_millis(100));
    let rss = rss_beyond_guest_kib(child.id(), GUEST_MEM_MIB << 20);
    let _ = child.kill();
    let _ = child.wait();
    Ok(Sample {
        first_byte,
        rss_beyond_guest_kib: rss?,
    })
}

pub(crate) fn median<T: Copy + Ord>(mut v: Vec<T>) -> T {
    v.sort();
    v[v.len() / 2]
}

fn series(name: &str, runs: usize, make: &dyn Fn() -> Command) -> String {
    let mut times = Vec::new();
    let mut rss = Vec::new();
    for _ in 0..runs {
        match measure_once(make()) {
            Ok(s) => {
                times.push(s.first_byte);
                rss.push(s.rss_beyond_guest_kib);
            }
            Err(e) => return format!("{name:<44} failed: {e}"),
        }
    }
    let t = median(times.clone());
    let min = times.iter().min().copied().unwrap_or(t);
    format!(
        "{name:<44} {:>9.2} ms (min {:.2}) {:>9.1} MiB",
        t.as_secs_f64() * 1e3,
        min.as_secs_f64() * 1e3,
        median(rss) as f64 / 1024.0
    )
}

fn run(mut args: BenchArgs) -> Result<()> {
    let runs = match (args.runs, args.which.as_str()) {
        (Some(0), _) => bail!("--runs must be at least 1"),
        (Some(n), _) => n,
        (None, "blk" | "net" | "vsock") => 3,
        // A first boot of an installed system under the engine takes
        // minutes: one run each unless asked for more.
        (None, "disk-boot") => 1,
        (None, _) => 20,
    };
    if !(1..=3600).contains(&args.seconds) {
        bail!("--seconds must be 1 to 3600");
    }
    let vireo = match args.vireo.take() {
        Some(path) => path,
        None => vireo_beside_me()?,
    };
    let mut vmms = vec![Vireo {
        path: vireo,
        args: std::mem::take(&mut args.vireo_arg),
        tag: "",
    }];
    if args.vireo_b.is_some() || !args.vireo_b_arg.is_empty() {
        if !matches!(args.which.as_str(), "boot" | "blk" | "net" | "vsock") {
            bail!("--vireo-b and --vireo-b-arg apply to boot, blk, net and vsock");
        }
        vmms.push(Vireo {
            path: args.vireo_b.take().unwrap_or_else(|| vmms[0].path.clone()),
            args: std::mem::take(&mut args.vireo_b_arg),
            tag: " (B)",
        });
    }
    if args.no_qemu && vmms.len() < 2 {
        bail!("--no-qemu is for A/B runs: give --vireo-b or --vireo-b-arg too");
    }
    for v in &vmms {
        if !v.path.is_file() {
            bail!(
                "no vireo binary at {} (build it: cargo build --release -p vireo, or give --vireo PATH)",
                v.path.display()
            );
        }
    }
    args.vmms = vmms;
    if cfg!(debug_assertions) && args.which != "snapshot" {
        eprintln!(
            "note: a debug build of vireo; build with --release for figures that mean something"
        );
    }
    let result = match args.which.as_str() {
        "startup" => startup(&args, runs),
        "snapshot" => snapshot(&args, runs),
        "migrate" => migrate(&args, runs),
        "boot" => boot(&args, runs),
        "blk" => io::blk(&args, runs),
        "net" if args.backend == "user" => io::net_user(&args, runs),
        "net" if args.backend == "tap" => io::net(&args, runs),
        "net" => bail!("unknown net backend '{}' (tap or user)", args.backend),
        "vsock" => vsock::vsock(&args, runs),
        "disk-boot" => disk::disk_boot(&args, runs),
        other => {
            bail!("unknown benchmark '{other}' (available: startup, snapshot, migrate, boot, blk, net, vsock, disk-boot)")
        }
    };
    println!("{}", load::summary());
    result
}

/// Wait until the child's stdout has produced `n` more bytes; the time it took.
fn read_bytes(out: &mut impl Read, n: usize) -> Result<()> {
    let mut buf = vec![0u8; n];
    out.read_exact(&mut buf)
        .context("the guest stopped talking")?;
    Ok(())
}

fn api(sock: &Path, method: &str, path: &str, body: &str) -> Result<Duration> {
    let start = Instant::now();
    let (status, text) = vmm::api::client::request_with_body(sock, method, path, body)
        .map_err(|e| anyhow::anyhow!(e))?;
    if !(200..300).contains(&status) {
        bail!("{path}: HTTP {status}: {text}");
    }
    Ok(start.elapsed())
}

fn wait_socket(sock: &Path) -> Result<()> {
    let start = Instant::now();
    while !sock.exists() {
        if start.elapsed() > Duration::from_secs(20) {
            bail!("the VMM never opened its API socket");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// `vireo run` of the letters guest with its API on `sock`, once it prints
/// and serves: the process and its console.
fn spawn_letters(
    vireo: &Vireo,
    accel: &str,
    mib: u64,
    elf: &Path,
    sock: &Path,
) -> Result<(std::process::Child, std::process::ChildStdout)> {
    let mut src = vireo
        .command()
        .args(["run", "--accel", accel, "--boot", "pvh", "--memory"])
        .arg(format!("{mib}M"))
        .arg("--kernel")
        .arg(elf)
        .arg("--api-socket")
        .arg(sock)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut out = src.stdout.take().context("no stdout")?;
    read_bytes(&mut out, 3)?;
    wait_socket(sock)?;
    Ok((src, out))
}

/// Snapshot creation and restore time for a small and a large guest, under
/// KVM or the engine: snapshot = the API call on a paused VM (memory
/// written out, sparsely); restore = spawning `vireo restore` to the
/// restored guest's first letter.
fn snapshot(args: &BenchArgs, runs: usize) -> Result<()> {
    let accel = args.accel.vireo();
    let vireo = args.vireo();
    let dir = std::env::temp_dir().join(format!("vireo-bench-snap-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let elf = dir.join("letters.elf");
    std::fs::write(&elf, arch::tiny_elf::letters_guest(2_000))?;
    println!(
        "snapshot/restore under --accel {accel} (median of {runs} runs); restore = spawn to the restored guest's first serial byte",
    );
    println!(
        "{:<12} {:>14} {:>14} {:>18} {:>18}",
        "guest RAM", "snapshot", "restore", "RSS beyond guest", "memory.bin data"
    );
    for mib in [256u64, 2048] {
        let (mut snaps, mut restores, mut rss, mut data) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for run in 0..runs {
            let sock = dir.join(format!("s{mib}-{run}.sock"));
            let snap = dir.join(format!("snap{mib}-{run}"));
            let (mut src, _out) = spawn_letters(vireo, accel, mib, &elf, &sock)?;
            api(&sock, "PUT", "/api/v1/vm.pause", "")?;
            let body = serde_json::json!({ "destination": snap }).to_string();
            snaps.push(api(&sock, "PUT", "/api/v1/vm.snapshot", &body)?);
            let _ = src.kill();
            let _ = src.wait();
            data.push(allocated_kib(&snap.join("memory.bin")));

            let start = Instant::now();
            let mut dst = vireo
                .command()
                .args(["restore", "--from"])
                .arg(&snap)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()?;
            let mut out = dst.stdout.take().context("no stdout")?;
            read_bytes(&mut out, 1)?;
            restores.push(start.elapsed());
            rss.push(rss_beyond_guest_kib(dst.id(), mib << 20).unwrap_or(0));
            let _ = dst.kill();
            let _ = dst.wait();
            let _ = std::fs::remove_dir_all(&snap);
        }
        println!(
            "{:<12} {:>11.1} ms {:>11.2} ms {:>14.1} MiB {:>14.1} MiB",
            format!("{mib} MiB"),
            median(snaps).as_secs_f64() * 1e3,
            median(restores).as_secs_f64() * 1e3,
            median(rss) as f64 / 1024.0,
            median(data) as f64 / 1024.0
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Live migration between two processes on this host (a letters guest
/// running throughout), for a small and a large guest: the source's own
/// report of total time and downtime; then the API's request latency
/// (`GET vm.info` on a running VM).
fn migrate(args: &BenchArgs, runs: usize) -> Result<()> {
    let accel = args.accel.vireo();
    let vireo = args.vireo();
    let dir = std::env::temp_dir().join(format!("vireo-bench-mig-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let elf = dir.join("letters.elf");
    std::fs::write(&elf, arch::tiny_elf::letters_guest(2_000))?;
    let spawn_source = |mib: u64, sock: &Path| -> Result<std::process::Child> {
        let (src, mut out) = spawn_letters(vireo, accel, mib, &elf, sock)?;
        // Keep draining the console so the guest never blocks on it.
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        Ok(src)
    };
    println!(
        "live migration under --accel {accel}, localhost TCP, guest running (median of {runs} runs)"
    );
    println!(
        "{:<12} {:>12} {:>12} {:>12} {:>11}",
        "guest RAM", "total", "downtime", "sent", "iterations"
    );
    for mib in [256u64, 2048] {
        let (mut total, mut down, mut bytes, mut iters) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for run in 0..runs {
            let sock = dir.join(format!("m{mib}-{run}.sock"));
            let mut src = spawn_source(mib, &sock)?;
            let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
            let addr = listener.local_addr()?.to_string();
            drop(listener);
            let mut dst = vireo
                .command()
                .args(["migrate-receive", "--serial", "none", "--listen", &addr])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            // Until the destination listens, a migration fails to connect
            // and the source runs on: retry.
            let body = serde_json::json!({ "destination": addr }).to_string();
            let start = Instant::now();
            let text = loop {
                let (status, text) = vmm::api::client::request_with_body(
                    &sock,
                    "PUT",
                    "/api/v1/vm.migrate-send",
                    &body,
                )
                .map_err(|e| anyhow::anyhow!(e))?;
                if status == 200 {
                    break text;
                }
                if start.elapsed() > Duration::from_secs(20) {
                    let _ = src.kill();
                    let _ = dst.kill();
                    bail!("migration: HTTP {status}: {text}");
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            let r: serde_json::Value = serde_json::from_str(&text)?;
            let num = |k: &str| r.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
            total.push(Duration::from_millis(num("total_ms")));
            down.push(Duration::from_micros(num("downtime_us")));
            bytes.push(num("bytes"));
            iters.push(num("iterations"));
            let _ = src.wait();
            let _ = dst.kill();
            let _ = dst.wait();
        }
        println!(
            "{:<12} {:>9.0} ms {:>9.2} ms {:>8.1} MiB {:>11}   vireo --accel {accel}",
            format!("{mib} MiB"),
            median(total).as_secs_f64() * 1e3,
            median(down).as_secs_f64() * 1e3,
            median(bytes) as f64 / (1 << 20) as f64,
            median(iters)
        );
    }

    let qemu_accel = if accel == "kvm" { "kvm" } else { "tcg" };
    if guest::has_binary(&args.qemu) {
        for mib in [256u64, 2048] {
            let mut samples = Vec::new();
            for run in 0..runs {
                samples.push(qemu_migrate_once(
                    &args.qemu,
                    qemu_accel,
                    &elf,
                    mib,
                    &dir.join(format!("q{mib}-{run}")),
                )?);
            }
            let pick = |f: fn(&(u64, u64, u64)) -> u64| median(samples.iter().map(f).collect());
            println!(
                "{:<12} {:>9} ms {:>9} ms {:>8.1} MiB {:>11}   qemu -M microvm -accel {qemu_accel}",
                format!("{mib} MiB"),
                pick(|s| s.0),
                pick(|s| s.1),
                pick(|s| s.2) as f64 / (1 << 20) as f64,
                "-"
            );
        }
    } else {
        println!("qemu: not installed ({})", args.qemu);
    }

    // API latency: GET vm.info, one connection per request as the CLI does.
    let sock = dir.join("api.sock");
    let mut src = spawn_source(64, &sock)?;
    let mut lat = Vec::new();
    for _ in 0..200 {
        lat.push(api(&sock, "GET", "/api/v1/vm.info", "")?);
    }
    let _ = src.kill();
    let _ = src.wait();
    lat.sort();
    println!(
        "API GET vm.info: median {:.3} ms, p99 {:.3} ms (200 requests)",
        lat[lat.len() / 2].as_secs_f64() * 1e3,
        lat[lat.len() * 99 / 100].as_secs_f64() * 1e3
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Disk space a (sparse) file really uses, in KiB.
fn allocated_kib(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or(0, |m| m.blocks() / 2)
}

/// The guest command for `bench boot`: a CPU-bound shell loop timed by
/// the guest's own clock, then `vireo-io cpu` (guest/vireo-io.c): a loop
/// of exactly 10 integer instructions an iteration, timed by the guest's
/// clock, which gives guest instructions per second without a PMU.
const WORKLOAD: &str = "a=$(cut -d. -f1,2 /proc/uptime | cut -d' ' -f1); i=0; \
while [ $i -lt 20000 ]; do i=$((i+1)); done; \
b=$(cut -d' ' -f1 /proc/uptime); echo VIREO-WORK $a $b; vireo-io cpu 30000000";

/// The guest command for the SMP figure of `bench boot` (on 2 vCPUs): one
/// `vireo-io cpu` alone, then two at once.
const SMP_WORKLOAD: &str =
    "vireo-io cpu 30000000; vireo-io cpu 30000000 & vireo-io cpu 30000000; wait";

/// `(line index, instructions, ns)` of every `VIREO-CPU` line, in console
/// order.
fn cpu_lines(f: &guest::Finished) -> Vec<(usize, f64, f64)> {
    f.lines
        .iter()
        .enumerate()
        .filter_map(|(i, (_, l))| {
            let mut w = l.strip_prefix("VIREO-CPU")?.split_whitespace();
            Some((i, w.next()?.parse().ok()?, w.next()?.parse().ok()?))
        })
        .collect()
}

/// Guest MIPS per CPU-second of the VMM process (all its threads): the
/// `instructions` the guest ran between console lines `from` and `to` over
/// the CPU time the VMM used between their arrivals. Unlike MIPS by the
/// guest clock this does not depend on how much of the host the VMM got
/// (a loaded machine), only on what the VMM spends per guest instruction,
/// on every thread: a second vCPU's idle loop, timer and IPI threads count.
/// NaN where either line has no CPU time.
fn mips_per_cpu_s(f: &guest::Finished, from: usize, to: usize, instructions: f64) -> f64 {
    let at = |i: usize| f.cpu_ns.get(i).copied().flatten();
    match (at(from), at(to)) {
        (Some(a), Some(b)) if b > a => instructions / (b - a) as f64 * 1000.0,
        _ => f64::NAN,
    }
}

/// One SMP boot's figures.
struct SmpSample {
    /// MIPS (guest clock) of one process alone, and the aggregate of two at
    /// once: their instructions over the longer of their times.
    one: f64,
    two: f64,
    /// The same work over the VMM's CPU time ([`mips_per_cpu_s`]): for one
    /// process from the command's start to its result, for two from the
    /// first result to the last.
    one_per_cpu_s: f64,
    two_per_cpu_s: f64,
}

fn smp_once(cmd: Command, limit: Duration) -> Result<SmpSample> {
    let f = guest::Console::spawn(cmd)?.finish(limit);
    let cpu = cpu_lines(&f);
    let [(l0, i0, t0), (_, i1, t1), (_, i2, t2)] = cpu[..] else {
        bail!(
            "the guest printed {} VIREO-CPU lines, not 3 ({})",
            cpu.len(),
            f.failure().unwrap_or_else(|| "exit 0".into())
        );
    };
    if t0 <= 0.0 || t1.max(t2) <= 0.0 {
        bail!("zero time in a VIREO-CPU line");
    }
    // The init prints VIREO-CMD-BEGIN just before it runs the command.
    let begin = f.lines[..l0]
        .iter()
        .rposition(|(_, l)| l.starts_with("VIREO-CMD-BEGIN"));
    let last = cpu[2].0.max(cpu[1].0);
    Ok(SmpSample {
        one: i0 / t0 * 1000.0,
        two: (i1 + i2) / t1.max(t2) * 1000.0,
        one_per_cpu_s: begin.map_or(f64::NAN, |b| mips_per_cpu_s(&f, b, l0, i0)),
        two_per_cpu_s: mips_per_cpu_s(&f, l0, last, i1 + i2),
    })
}

struct BootSample {
    wall: Duration,
    work: f64,
    /// Guest instructions per second (millions) in `vireo-io cpu`.
    mips: f64,
    /// The same loop's instructions per CPU-second of the VMM
    /// ([`mips_per_cpu_s`], from the VIREO-WORK line printed just before
    /// it); NaN if not known.
    mips_per_cpu_s: f64,
    /// The VMM's peak resident set over the whole run (KiB).
    peak_rss_kib: u64,
}

/// MIPS from a `VIREO-CPU <instructions> <ns> <checksum>` line.
fn cpu_mips(line: &str) -> Option<f64> {
    let mut w = line.split_whitespace().skip(1);
    let instructions: f64 = w.next()?.parse().ok()?;
    let ns: f64 = w.next()?.parse().ok()?;
    (ns > 0.0).then(|| instructions / ns * 1000.0)
}

fn boot_once(cmd: Command, limit: Duration) -> Result<BootSample> {
    let f = guest::Console::spawn(cmd)?.finish(limit);
    let wall = f.end - f.start;
    let line = f
        .lines
        .iter()
        .map(|(_, l)| l)
        .find(|l| l.starts_with("VIREO-WORK"))
        .with_context(|| {
            format!(
                "the guest did not finish its workload ({})",
                f.failure().unwrap_or_else(|| "exit 0".into())
            )
        })?;
    let nums: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|w| w.parse().ok())
        .collect();
    if nums.len() != 2 {
        bail!("bad workload line: {line}");
    }
    let work_at = f
        .lines
        .iter()
        .position(|(_, l)| l.starts_with("VIREO-WORK"));
    let Some(&(cpu_at, instructions, _)) = cpu_lines(&f).first() else {
        bail!("the guest printed no VIREO-CPU line (is vireo-io in its initramfs? run guest/build.sh)");
    };
    let mips = cpu_mips(&f.lines[cpu_at].1).context("zero time in the VIREO-CPU line")?;
    let mips_per_cpu_s = work_at.map_or(f64::NAN, |w| mips_per_cpu_s(&f, w, cpu_at, instructions));
    Ok(BootSample {
        wall,
        work: nums[1] - nums[0],
        mips,
        mips_per_cpu_s,
        peak_rss_kib: f.peak_rss_kib.unwrap_or(0),
    })
}

/// One VMM's figures over interleaved rounds (see [`interleave`]).
struct Series<'a> {
    name: String,
    make: Box<dyn Fn() -> Result<Command> + 'a>,
    /// Each run's figures, one per table column.
    samples: Vec<Vec<f64>>,
    failure: Option<String>,
}

impl<'a> Series<'a> {
    fn new(name: String, make: impl Fn() -> Result<Command> + 'a) -> Series<'a> {
        Series {
            name,
            make: Box::new(make),
            samples: Vec::new(),
            failure: None,
        }
    }

    /// Column `i` over the runs.
    fn column(&self, i: usize) -> Vec<f64> {
        self.samples.iter().map(|v| v[i]).collect()
    }
}

/// Run each series once per round, `runs` rounds (in [`round_order`]), so
/// a load that drifts during the bench weighs on all of them alike and
/// each round gives a fair ratio. A series that fails is not run again.
fn interleave(series: &mut [Series], runs: usize, once: &dyn Fn(Command) -> Result<Vec<f64>>) {
    for round in 0..runs {
        for i in round_order(round, series.len()) {
            let s = &mut series[i];
            if s.failure.is_some() {
                continue;
            }
            load::sample();
            match (s.make)().and_then(once) {
                Ok(v) => s.samples.push(v),
                Err(e) => s.failure = Some(format!("{e:#}")),
            }
        }
    }
}

fn fmedian(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// A rate with one decimal, or "-" where it could not be measured.
fn show_rate(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.1}")
    } else {
        "-".into()
    }
}

/// A table column: header, width, and how a median is shown.
struct Col {
    head: &'static str,
    width: usize,
    show: fn(f64) -> String,
}

impl Col {
    fn new(head: &'static str, width: usize, show: fn(f64) -> String) -> Col {
        Col { head, width, show }
    }
}

/// The series' medians, one row each, then ratio rows from per-round
/// ratios: every Vireo against the last series (the peer), and B against
/// A when there is a B.
fn print_series(series: &[Series], cols: &[Col], first: &str) {
    print!("{first:<36}");
    for c in cols {
        print!(" {:>w$}", c.head, w = c.width);
    }
    println!();
    for s in series {
        print!("{:<36}", s.name);
        if let Some(f) = &s.failure {
            println!(" failed: {f}");
            continue;
        }
        for (i, c) in cols.iter().enumerate() {
            print!(" {:>w$}", (c.show)(fmedian(s.column(i))), w = c.width);
        }
        println!();
    }
    for (a, b) in ratio_pairs(series, |s| &s.name) {
        if a.failure.is_some() || b.failure.is_some() {
            continue;
        }
        print!(
            "{:<36}",
            format!("ratio {} / {}", short(&a.name), short(&b.name))
        );
        for (i, c) in cols.iter().enumerate() {
            let r = paired_ratio(&a.column(i), &b.column(i));
            let cell = r.map_or("-".into(), |r| format!("{r:.2}x"));
            print!(" {cell:>w$}", w = c.width);
        }
        println!();
    }
    println!(
        "  (ratios: the median of per-round ratios; for times above 1 is slower, for rates below 1 is slower)"
    );
}

/// "vireo" or "vireo (B)" or "qemu" from a column title.
fn short(name: &str) -> String {
    let first = name.split_whitespace().next().unwrap_or(name);
    if name.ends_with(" (B)") {
        format!("{first} (B)")
    } else {
        first.to_string()
    }
}

/// Whether the peer (QEMU) gets a series: not left out with --no-qemu,
/// and installed.
fn peer_runs(args: &BenchArgs) -> bool {
    !args.no_qemu && guest::has_binary(&args.qemu)
}

/// A series for each Vireo (A, and B if asked for), its command made by
/// `vireo` from the Vireo's index and binary, then, when `with_peer`, one
/// for the peer (QEMU) made by `peer`.
fn vmm_series<'a>(
    args: &'a BenchArgs,
    with_peer: bool,
    vireo: impl Fn(usize, &'a Vireo) -> Result<Command> + Copy + 'a,
    peer: impl Fn() -> Result<Command> + 'a,
) -> Vec<Series<'a>> {
    let [vname, qname] = args.accel.names();
    let mut series: Vec<Series> = args
        .vireos()
        .iter()
        .enumerate()
        .map(|(i, v)| Series::new(format!("{vname}{}", v.tag), move || vireo(i, v)))
        .collect();
    if with_peer {
        series.push(Series::new(qname, peer));
    }
    series
}

/// The line under a table that says why the peer has no row, if it has
/// none.
fn print_peer_absent(args: &BenchArgs, with_peer: bool) {
    let peer = &args.accel.names()[1];
    if args.no_qemu {
        println!("{peer:<36} left out (--no-qemu)");
    } else if !with_peer {
        println!("{peer:<36} not installed ({})", args.qemu);
    }
}

/// A series for each Vireo (A, and B if asked for) running `g`, then one
/// for QEMU running the same guest when it is installed.
fn series_of<'a>(args: &'a BenchArgs, g: &'a guest::Guest, qemu: bool) -> Vec<Series<'a>> {
    vmm_series(
        args,
        qemu,
        move |_, v| Ok(g.vireo(v, args.accel)),
        move || Ok(g.qemu(&args.qemu, args.accel)),
    )
}

/// Boot Debian's bzImage with the test initramfs to power-off, and time a
/// CPU-bound shell loop inside, on Vireo and on QEMU (engine beside TCG,
/// or both on KVM); then the same guest with 2 vCPUs for SMP scaling.
fn boot(args: &BenchArgs, runs: usize) -> Result<()> {
    let g = guest::Guest::new(args.guest_dir.as_deref(), WORKLOAD)?;
    let limit = args.timeout();
    println!(
        "boot: Debian bzImage + initramfs to power-off (wall), a 20k-iteration shell loop and \
         guest MIPS in a 300M-instruction integer loop (both by the guest clock) and per CPU-second \
         of the VMM (all threads: independent of the host's load), and the VMM's peak RSS, median of \
         {runs} runs, the VMMs taking turns"
    );
    let have_qemu = peer_runs(args);
    let mut series = series_of(args, &g, have_qemu);
    interleave(&mut series, runs, &|c| {
        let s = boot_once(c, limit)?;
        Ok(vec![
            s.wall.as_secs_f64(),
            s.work,
            s.mips,
            s.mips_per_cpu_s,
            s.peak_rss_kib as f64 / 1024.0,
        ])
    });
    print_series(
        &series,
        &[
            Col::new("boot+off", 11, |x| format!("{x:.2} s")),
            Col::new("shell loop", 16, |x| format!("{x:.2} s")),
            Col::new("guest MIPS", 12, |x| format!("{x:.1}")),
            Col::new("MIPS/CPU-s", 12, show_rate),
            Col::new("peak RSS", 14, |x| format!("{x:.0} MiB")),
        ],
        "VMM",
    );
    print_peer_absent(args, have_qemu);
    // SMP: does a second vCPU double the guest's throughput?
    let mut g2 = guest::Guest::new(args.guest_dir.as_deref(), SMP_WORKLOAD)?;
    g2.cpus = 2;
    println!();
    println!(
        "smp: 2 vCPUs; one `vireo-io cpu` process alone, then two at once (aggregate = both \
         processes' instructions over the longer time), guest MIPS, and the same work per CPU-second \
         of the VMM (all threads; equal for 1 and 2 when a second vCPU costs nothing), median of \
         {runs} runs"
    );
    let mut series = series_of(args, &g2, have_qemu);
    interleave(&mut series, runs, &|c| {
        let s = smp_once(c, limit)?;
        let scaling = if s.one > 0.0 { s.two / s.one } else { f64::NAN };
        Ok(vec![
            s.one,
            s.two,
            scaling,
            s.one_per_cpu_s,
            s.two_per_cpu_s,
        ])
    });
    print_series(
        &series,
        &[
            Col::new("1 process", 12, |x| format!("{x:.1}")),
            Col::new("2 processes", 14, |x| format!("{x:.1}")),
            Col::new("scaling", 11, |x| format!("{x:.2}x")),
            Col::new("1 per CPU-s", 12, show_rate),
            Col::new("2 per CPU-s", 12, show_rate),
        ],
        "VMM (2 vCPUs)",
    );
    Ok(())
}

fn startup(args: &BenchArgs, runs: usize) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("vireo-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let elf = dir.join("tiny-pvh.elf");
    std::fs::write(&elf, tiny_pvh_elf())?;
    let vireo = args.vireo();
    let mem = format!("{GUEST_MEM_MIB}M");

    println!(
        "startup: spawn -> first guest serial byte (median of {} runs), VMM RSS beyond {GUEST_MEM_MIB} MiB guest RAM",
        runs
    );
    println!(
        "{:<44} {:>12} {:>20}",
        "VMM", "first byte", "RSS beyond guest"
    );
    let vireo_cmd = |accel: &'static str| {
        let (vireo, elf, mem) = (vireo.clone(), elf.clone(), mem.clone());
        move || {
            let mut c = vireo.command();
            c.args([
                "run", "--accel", accel, "--boot", "pvh", "--memory", &mem, "--kernel",
            ])
            .arg(&elf);
            c
        }
    };
    println!("{}", series("vireo --accel kvm", runs, &vireo_cmd("kvm")));
    println!("{}", series("vireo --accel emu", runs, &vireo_cmd("emu")));
    for accel in ["kvm", "tcg"] {
        let name = format!("qemu -M microvm -accel {accel}");
        if !guest::has_binary(&args.qemu) {
            println!("{name:<44} not installed ({})", args.qemu);
            continue;
        }
        let q = qemu_cmd(&args.qemu, accel, &elf, &mem);
        println!("{}", series(&name, runs, &q));
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// One QEMU live migration of the letters guest between two processes on
/// this host, driven over QMP: (total ms, downtime ms, bytes sent), as
/// QEMU itself reports them.
fn qemu_migrate_once(
    qemu: &str,
    accel: &'static str,
    elf: &Path,
    mib: u64,
    base: &Path,
) -> Result<(u64, u64, u64)> {
    use std::io::{BufRead, BufReader, Write};
    let mem = format!("{mib}M");
    let qmp = base.with_extension("qmp");
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut dst = qemu_cmd(qemu, accel, elf, &mem)();
    dst.args(["-incoming", &format!("tcp:127.0.0.1:{port}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut dst = dst.spawn()?;
    let mut src = qemu_cmd(qemu, accel, elf, &mem)();
    src.arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut src = src.spawn()?;
    let result = (|| -> Result<(u64, u64, u64)> {
        let mut out = src.stdout.take().context("no stdout")?;
        read_bytes(&mut out, 3)?;
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        wait_socket(&qmp)?;
        let stream = std::os::unix::net::UnixStream::connect(&qmp)?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut w = stream.try_clone()?;
        let mut r = BufReader::new(stream);
        // Answers to commands only (events are skipped).
        let mut call = |cmd: serde_json::Value| -> Result<serde_json::Value> {
            writeln!(w, "{cmd}")?;
            loop {
                let mut line = String::new();
                if r.read_line(&mut line)? == 0 {
                    bail!("QMP closed");
                }
                let v: serde_json::Value = serde_json::from_str(&line)?;
                if let Some(e) = v.get("error") {
                    bail!("QMP {cmd}: {e}");
                }
                if let Some(ret) = v.get("return") {
                    return Ok(ret.clone());
                }
            }
        };
        call(serde_json::json!({"execute": "qmp_capabilities"}))?;
        std::thread::sleep(Duration::from_millis(200)); // the destination listens
        call(serde_json::json!({"execute": "migrate",
            "arguments": {"uri": format!("tcp:127.0.0.1:{port}")}}))?;
        let start = Instant::now();
        loop {
            let st = call(serde_json::json!({"execute": "query-migrate"}))?;
            match st.get("status").and_then(|s| s.as_str()) {
                Some("completed") => {
                    let n = |v: Option<&serde_json::Value>| v.and_then(|x| x.as_u64()).unwrap_or(0);
                    return Ok((
                        n(st.get("total-time")),
                        n(st.get("downtime")),
                        n(st.get("ram").and_then(|r| r.get("transferred"))),
                    ));
                }
                Some("failed") | Some("cancelled") => bail!("QEMU migration failed: {st}"),
                _ if start.elapsed() > Duration::from_secs(120) => {
                    bail!("QEMU migration did not complete: {st}")
                }
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    })();
    for c in [&mut src, &mut dst] {
        let _ = c.kill();
        let _ = c.wait();
    }
    let _ = std::fs::remove_file(&qmp);
    result
}

fn qemu_cmd(qemu: &str, accel: &'static str, elf: &Path, mem: &str) -> impl Fn() -> Command {
    let (qemu, elf, mem) = (qemu.to_string(), elf.to_path_buf(), mem.to_string());
    move || {
        let mut c = Command::new(&qemu);
        c.args([
            "-M",
            "microvm,isa-serial=on,rtc=off,pic=off,pit=off",
            "-accel",
            accel,
            "-m",
            &mem,
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-kernel",
        ])
        .arg(&elf);
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paired_ratios_take_the_median_of_each_rounds_ratio() {
        // Round 2 ran under load for both; the per-round ratio stays 2.
        let a = [2.0, 20.0, 4.0];
        let b = [1.0, 10.0, 2.0];
        assert_eq!(paired_ratio(&a, &b), Some(2.0));
        // Rounds one side lacks (NaN) or a zero peer are left out.
        assert_eq!(paired_ratio(&[f64::NAN, 3.0], &[1.0, 1.0]), Some(3.0));
        assert_eq!(paired_ratio(&[1.0], &[0.0]), None);
        assert_eq!(paired_ratio(&[], &[]), None);
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        assert_eq!(paired_quartiles(&a, &[1.0; 8]), Some((3.0, 5.0, 7.0)));
    }

    #[test]
    fn each_round_starts_one_series_later() {
        let order: Vec<Vec<usize>> = (0..4).map(|r| round_order(r, 3).collect()).collect();
        assert_eq!(order, [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2]]);
        let ab: Vec<Vec<usize>> = (0..2).map(|r| round_order(r, 2).collect()).collect();
        assert_eq!(ab, [[0, 1], [1, 0]]);
    }

    #[test]
    fn ratio_rows_pair_each_vireo_with_the_peer_and_b_with_a() {
        fn t<'a>(s: &'a &str) -> &'a str {
            s
        }
        let cols = ["vireo A", "vireo B", "qemu"];
        let names = |p: Vec<(&&str, &&str)>| -> Vec<(String, String)> {
            p.into_iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        let pair = |a: &str, b: &str| (a.to_string(), b.to_string());
        assert_eq!(
            names(ratio_pairs(&cols, t)),
            [
                pair("vireo A", "qemu"),
                pair("vireo B", "qemu"),
                pair("vireo B", "vireo A")
            ]
        );
        // --no-qemu: only B / A.
        assert_eq!(
            names(ratio_pairs(&cols[..2], t)),
            [pair("vireo B", "vireo A")]
        );
        assert_eq!(
            names(ratio_pairs(&["vireo A", "qemu"], t)),
            [pair("vireo A", "qemu")]
        );
    }

    #[test]
    fn ratio_rows_name_a_b_and_the_peer() {
        assert_eq!(short("vireo --accel emu"), "vireo");
        assert_eq!(short("vireo --accel emu (B)"), "vireo (B)");
        assert_eq!(short("qemu -accel tcg"), "qemu");
    }

    #[test]
    fn mips_per_cpu_second_come_from_the_vmm_cpu_time_between_two_lines() {
        let now = std::time::Instant::now();
        let line = |l: &str| (now, l.to_string());
        let f = guest::Finished {
            lines: vec![
                line("VIREO-CMD-BEGIN"),
                line("noise"),
                line("VIREO-CPU 300000000 150000000 1"),
                line("VIREO-CPU 300000000 300000000 1"),
                line("VIREO-CPU 300000000 300000000 1"),
            ],
            cpu_ns: vec![
                Some(1_000_000_000),
                None,
                Some(1_200_000_000),
                Some(1_500_000_000),
                None,
            ],
            start: now,
            end: now,
            status: None,
            peak_rss_kib: None,
            hung: None,
            stderr: String::new(),
        };
        // 3e8 instructions in 0.2 CPU-seconds.
        let m = mips_per_cpu_s(&f, 0, 2, 3e8);
        assert!((m - 1500.0).abs() < 1e-6, "{m}");
        // A line without a CPU time, or time running backwards: unknown.
        assert!(mips_per_cpu_s(&f, 0, 4, 3e8).is_nan());
        assert!(mips_per_cpu_s(&f, 3, 2, 3e8).is_nan());
        let cpu = cpu_lines(&f);
        assert_eq!(cpu.len(), 3);
        assert_eq!((cpu[0].0, cpu[0].1), (2, 3e8));
    }

    #[test]
    fn mips_come_from_the_cpu_line() {
        let m = cpu_mips("VIREO-CPU 300000000 1500000000 42").unwrap();
        assert!((m - 200.0).abs() < 1e-9, "{m}");
        assert!(cpu_mips("VIREO-CPU 1 0 0").is_none());
        assert!(cpu_mips("VIREO-CPU x").is_none());
    }

    #[test]
    fn tiny_elf_is_well_formed() {
        let f = tiny_pvh_elf();
        assert_eq!(&f[..4], b"\x7fELF");
        assert_eq!(u64::from_le_bytes(f[24..32].try_into().unwrap()), LOAD);
        // The note carries the entry point.
        let note = 64 + 2 * 56;
        assert_eq!(&f[note + 12..note + 16], b"Xen\0");
        assert_eq!(
            u32::from_le_bytes(f[note + 16..note + 20].try_into().unwrap()) as u64,
            LOAD
        );
    }
}
