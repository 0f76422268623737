//! `bench blk` and `bench net`: virtio-blk and virtio-net throughput inside
//! the Debian test guest, Vireo beside QEMU, same kernel, initramfs and
//! accelerator kind. The guest's `vireo-io` (guest/vireo-io.c) does the I/O
//! and prints its own figures (guest clock) between two marker lines; the
//! host times those lines as they arrive for a wall-clock figure beside
//! them (blk), or measures at its own end of the TCP connection (net).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::guest::{has_binary, Console, Disk, Finished, Guest};
use super::{median, BenchArgs};

/// An amount of work and the time it took.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    pub ops: u64,
    pub bytes: u64,
    pub time: Duration,
}

impl Sample {
    fn rate(&self, unit: Unit) -> f64 {
        let s = self.time.as_secs_f64().max(1e-9);
        match unit {
            Unit::MibPerSec => self.bytes as f64 / (1 << 20) as f64 / s,
            Unit::Iops => self.ops as f64 / s,
        }
    }
}

/// One test's figures from one run: the guest's own, and the host's.
#[derive(Clone, Debug, PartialEq)]
pub struct Figure {
    pub name: String,
    pub guest: Sample,
    /// blk: the guest's bytes over the host's time between the BEGIN and
    /// result lines; net: what the host's end of the connection measured.
    pub host: Option<Sample>,
}

/// What the guest's `vireo-io` runs printed on the console.
#[derive(Default, Debug)]
pub struct IoReport {
    pub figures: Vec<Figure>,
    /// (test name, message) for each `VIREO-IO-ERROR` line.
    pub errors: Vec<(String, String)>,
}

impl IoReport {
    fn figure_mut(&mut self, name: &str) -> Option<&mut Figure> {
        self.figures.iter_mut().find(|f| f.name == name)
    }
}

/// Read `VIREO-IO-BEGIN NAME`, `VIREO-IO NAME ops=N bytes=N ns=N` and
/// `VIREO-IO-ERROR NAME message` lines (anywhere in a line: the console may
/// carry other output before them).
pub fn parse_io(lines: &[(Instant, String)]) -> IoReport {
    let mut report = IoReport::default();
    let mut begun: Vec<(String, Instant)> = Vec::new();
    for (at, line) in lines {
        if let Some(i) = line.find("VIREO-IO-BEGIN ") {
            let name = line[i + 15..].trim().to_string();
            begun.retain(|(n, _)| *n != name);
            begun.push((name, *at));
        } else if let Some(i) = line.find("VIREO-IO-ERROR ") {
            let rest = line[i + 15..].trim();
            let (name, msg) = rest.split_once(' ').unwrap_or((rest, "failed"));
            report.errors.push((name.to_string(), msg.to_string()));
        } else if let Some(i) = line.find("VIREO-IO ") {
            let mut words = line[i + 9..].split_whitespace();
            let name = words.next().unwrap_or("").to_string();
            let (mut ops, mut bytes, mut ns) = (None, None, None);
            for w in words {
                let (k, v) = w.split_once('=').unwrap_or((w, ""));
                let v = v.parse::<u64>().ok();
                match k {
                    "ops" => ops = v,
                    "bytes" => bytes = v,
                    "ns" => ns = v,
                    _ => {}
                }
            }
            let (Some(ops), Some(bytes), Some(ns)) = (ops, bytes, ns) else {
                report
                    .errors
                    .push((name, format!("malformed result line: {line}")));
                continue;
            };
            let host = begun.iter().find(|(n, _)| *n == name).map(|(_, t)| Sample {
                ops,
                bytes,
                time: at.saturating_duration_since(*t),
            });
            report.figures.push(Figure {
                name,
                guest: Sample {
                    ops,
                    bytes,
                    time: Duration::from_nanos(ns),
                },
                host,
            });
        }
    }
    report
}

#[derive(Clone, Copy, PartialEq, Debug)]
pub(crate) enum Unit {
    MibPerSec,
    Iops,
}

/// A row of the table: the guest's test name and how to show it.
pub(crate) struct Test {
    pub name: &'static str,
    pub label: &'static str,
    pub unit: Unit,
}

/// One VMM's results over the runs.
pub(crate) struct Column {
    title: String,
    runs: Vec<IoReport>,
    /// Why a run (or the whole column) failed.
    failures: Vec<String>,
}

impl Column {
    fn new(title: String) -> Column {
        Column {
            title,
            runs: Vec::new(),
            failures: Vec::new(),
        }
    }

    /// Medians of the guest and host rates for `t`, or why there are none.
    fn cell(&self, t: &Test) -> (String, String) {
        let figs: Vec<&Figure> = self
            .runs
            .iter()
            .flat_map(|r| r.figures.iter().filter(|f| f.name == t.name))
            .collect();
        if figs.is_empty() {
            let failed = self
                .runs
                .iter()
                .any(|r| r.errors.iter().any(|(n, _)| n == t.name))
                || !self.failures.is_empty();
            let word = if failed { "failed" } else { "-" };
            return (word.into(), word.into());
        }
        let med = |v: Vec<f64>| -> String {
            if v.is_empty() {
                return "-".into();
            }
            let v: Vec<u64> = v.iter().map(|x| (x * 10.0) as u64).collect();
            let m = median(v) as f64 / 10.0;
            match t.unit {
                Unit::MibPerSec => format!("{m:.1}"),
                Unit::Iops => format!("{m:.0}"),
            }
        };
        (
            med(figs.iter().map(|f| f.guest.rate(t.unit)).collect()),
            med(figs
                .iter()
                .filter_map(|f| f.host.map(|h| h.rate(t.unit)))
                .collect()),
        )
    }

    fn notes(&self) -> Vec<String> {
        let mut out: Vec<String> = self.failures.clone();
        for r in &self.runs {
            for (n, m) in &r.errors {
                let note = format!("{n}: {m}");
                if !out.contains(&note) {
                    out.push(note);
                }
            }
        }
        out.into_iter()
            .map(|m| format!("{}: {m}", self.title))
            .collect()
    }
}

pub(crate) fn print_table(tests: &[Test], cols: &[Column], host_title: &str) {
    print!("{:<34}", "");
    for c in cols {
        print!(" {:>25}", c.title);
    }
    println!();
    print!("{:<34}", "test");
    for _ in cols {
        print!(" {:>12} {:>12}", "guest", host_title);
    }
    println!();
    for t in tests {
        print!("{:<34}", t.label);
        for c in cols {
            let (g, h) = c.cell(t);
            print!(" {g:>12} {h:>12}");
        }
        println!();
    }
    print_ratios(tests, cols);
    for c in cols {
        for n in c.notes() {
            println!("  {n}");
        }
    }
}

/// Ratio rows under a table whose last column is the peer: each Vireo
/// against the peer and, with two Vireos, B against A; the median of
/// per-round ratios of the guest's figures (the VMMs took turns, so each
/// round's pair ran under the same load).
fn print_ratios(tests: &[Test], cols: &[Column]) {
    for (a, b) in crate::ratio_pairs(cols, |c| &c.title) {
        if a.runs.is_empty() || b.runs.is_empty() {
            continue;
        }
        let what = format!("{} / {}", a.title, b.title);
        println!("ratio {what} (guest figures, median of per-round ratios; below 1 is slower):");
        for t in tests {
            let per_run = |c: &Column| -> Vec<f64> {
                c.runs
                    .iter()
                    .map(|r| {
                        r.figures
                            .iter()
                            .find(|f| f.name == t.name)
                            .map_or(f64::NAN, |f| f.guest.rate(t.unit))
                    })
                    .collect()
            };
            let cell = crate::paired_quartiles(&per_run(a), &per_run(b))
                .map_or("-".into(), |(q1, m, q3)| {
                    format!("{m:>8.2}   (middle half of the rounds {q1:.2}-{q3:.2})")
                });
            println!("  {:<32} {cell}", t.label);
        }
    }
}

/// Run each VMM in turn, `runs` times, on the guest `guest(n)` gives for
/// the n-th VM; a VMM that fails a run is not run again.
fn measure(
    args: &BenchArgs,
    runs: usize,
    guest: &mut dyn FnMut(usize) -> Guest,
    once: &mut dyn FnMut(&Guest, Command) -> Result<IoReport>,
) -> Vec<Column> {
    measure_with(args, runs, None, guest, once)
}

/// [`measure`], with QEMU left out for the reason `no_qemu` gives.
pub(crate) fn measure_with(
    args: &BenchArgs,
    runs: usize,
    no_qemu: Option<String>,
    guest: &mut dyn FnMut(usize) -> Guest,
    once: &mut dyn FnMut(&Guest, Command) -> Result<IoReport>,
) -> Vec<Column> {
    let [vname, qname] = args.accel.names();
    let vireos = args.vireos();
    let mut cols: Vec<Column> = vireos
        .iter()
        .map(|v| Column::new(format!("{vname}{}", v.tag)))
        .collect();
    cols.push(Column::new(qname));
    let peer = cols.len() - 1;
    if args.no_qemu {
        cols.pop();
    } else if let Some(why) = no_qemu {
        cols[peer].failures.push(why);
    } else if !has_binary(&args.qemu) {
        cols[peer]
            .failures
            .push(format!("not installed ({})", args.qemu));
    }
    let mut n = 0;
    for round in 0..runs {
        for i in crate::round_order(round, cols.len()) {
            let col = &mut cols[i];
            if !col.failures.is_empty() {
                continue;
            }
            n += 1;
            let g = guest(n);
            crate::load::sample();
            let cmd = match vireos.get(i) {
                Some(v) => Ok(g.vireo(v, args.accel)),
                None => Ok(g.qemu(&args.qemu, args.accel)),
            };
            match cmd.and_then(|c| once(&g, c)) {
                Ok(r) => col.runs.push(r),
                Err(e) => col.failures.push(format!("{e:#}")),
            }
        }
    }
    cols
}

/// A host-side thread's figure (or why there is none).
pub(crate) fn joined(t: std::thread::JoinHandle<Result<Option<Sample>>>) -> Result<Option<Sample>> {
    t.join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the host side panicked")))
}

/// The guest's report of a net run with the host ends' figures of its
/// upload (`tcp-send`) and download (`tcp-recv`) beside them.
fn with_host_figures(
    finished: &Finished,
    upload: Result<Option<Sample>>,
    download: Result<Option<Sample>>,
) -> Result<IoReport> {
    let mut report = report_of(finished)?;
    for (name, host) in [("tcp-send", upload), ("tcp-recv", download)] {
        match host {
            Ok(sample) => {
                if let Some(f) = report.figure_mut(name) {
                    f.host = sample;
                }
            }
            Err(e) => report
                .errors
                .push((name.into(), format!("host side: {e:#}"))),
        }
    }
    Ok(report)
}

/// The console's report (with the VMM's failure, if any, as an error named
/// `vmm`); an error if the VM failed and reported nothing.
pub(crate) fn report_of(f: &Finished) -> Result<IoReport> {
    let mut report = parse_io(&f.lines);
    if let Some(why) = f.failure() {
        if report.figures.is_empty() && report.errors.is_empty() {
            bail!("{why}");
        }
        // The figures stand; say what went wrong after them.
        report.errors.push(("vmm".into(), why));
    }
    if report.figures.is_empty() && report.errors.is_empty() {
        bail!(
            "the guest printed no vireo-io figures (initramfs without /bin/vireo-io? rebuild with guest/build.sh)"
        );
    }
    Ok(report)
}

pub(crate) fn scratch_dir(what: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("vireo-bench-{what}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

// ---- blk ----------------------------------------------------------------

const DISK_MIB: u64 = 256;

/// (test, block size, queue depth) as vireo-io takes them.
const BLK: [(Test, &str, u32); 4] = [
    (
        Test {
            name: "read",
            label: "seq read MiB/s (1 MiB, qd 4)",
            unit: Unit::MibPerSec,
        },
        "1M",
        4,
    ),
    (
        Test {
            name: "write",
            label: "seq write MiB/s (1 MiB, qd 4)",
            unit: Unit::MibPerSec,
        },
        "1M",
        4,
    ),
    (
        Test {
            name: "randread",
            label: "rand read IOPS (4 KiB, qd 16)",
            unit: Unit::Iops,
        },
        "4k",
        16,
    ),
    (
        Test {
            name: "randwrite",
            label: "rand write IOPS (4 KiB, qd 16)",
            unit: Unit::Iops,
        },
        "4k",
        16,
    ),
];

/// A raw image of `DISK_MIB` MiB of non-zero data (so a qcow2 made from it
/// has every cluster allocated and reads touch real data).
fn make_image(dir: &Path, format: &str) -> Result<PathBuf> {
    let raw = dir.join("disk.raw");
    let mut f = std::fs::File::create(&raw)?;
    let mut x = 0x5649524f424c4b31u64;
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..DISK_MIB {
        for w in chunk.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&chunk)?;
    }
    f.sync_all()?;
    if format == "raw" {
        return Ok(raw);
    }
    let q = dir.join("disk.qcow2");
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&q)
        .output()
        .context("running qemu-img (install qemu-utils)")?;
    if !out.status.success() {
        bail!("qemu-img convert: {}", String::from_utf8_lossy(&out.stderr));
    }
    std::fs::remove_file(&raw)?;
    Ok(q)
}

pub fn blk(args: &BenchArgs, runs: usize) -> Result<()> {
    let format: &'static str = match args.format.as_str() {
        "raw" => "raw",
        "qcow2" => "qcow2",
        f => bail!("--format {f}: raw or qcow2"),
    };
    let secs = args.seconds;
    let cmd = BLK
        .iter()
        .map(|(t, bs, qd)| format!("vireo-io blk /dev/vda {} {bs} {qd} {secs}", t.name))
        .collect::<Vec<_>>()
        .join("; ");
    let mut guest = Guest::new(args.guest_dir.as_deref(), &cmd)?;
    let dir = scratch_dir("blk")?;
    let img = make_image(&dir, format);
    let img = match img {
        Ok(p) => p,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
    };
    guest.disk = Some(Disk { path: img, format });
    println!(
        "blk: {format} image ({DISK_MIB} MiB, host page cache) on virtio-blk-pci; guest O_DIRECT with AIO, \
{secs} s per test (guest clock); MiB/s or IOPS, median of {runs} runs"
    );
    println!(
        "     guest = the guest's own clock; host wall = the same work over the time between the guest's \
begin and result lines on the host"
    );
    let limit = args.timeout();
    let cols = measure(args, runs, &mut |_| guest.clone(), &mut |_, cmd| {
        report_of(&Console::spawn(cmd)?.finish(limit))
    });
    let tests: Vec<Test> = BLK.into_iter().map(|(t, _, _)| t).collect();
    print_table(&tests, &cols, "host wall");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

// ---- net ----------------------------------------------------------------

const HOST_IP: &str = "10.213.2.1";
const GUEST_IP: &str = "10.213.2.2";
/// Guest -> host (the guest's tcp-send) and host -> guest (its tcp-recv).
const UP_PORT: u16 = 5555;
const DOWN_PORT: u16 = 5556;

/// A network namespace made by the bench, removed on drop.
struct Netns(String);

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl Netns {
    fn new(name: String) -> Result<Netns> {
        let _ = ip(&["netns", "del", &name]);
        ip(&["netns", "add", &name])?;
        let ns = Netns(name);
        ip(&["-n", &ns.0, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `cmd` run inside the namespace.
    fn wrap(&self, cmd: &Command) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0])
            .arg(cmd.get_program())
            .args(cmd.get_args());
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.0]);
    }
}

/// Accept one connection on `l`, or give up when `stop` is set.
fn accept(l: &TcpListener, stop: &AtomicBool) -> Result<Option<TcpStream>> {
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(Duration::from_secs(60)))?;
                s.set_write_timeout(Some(Duration::from_secs(60)))?;
                return Ok(Some(s));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if stop.load(Ordering::Relaxed) {
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The guest's upload: what arrives on one connection on `l`, timed from
/// its first byte to EOF (then the close tells the guest it all arrived).
fn take_upload(l: TcpListener, stop: &AtomicBool) -> Result<Option<Sample>> {
    let Some(s) = accept(&l, stop)? else {
        return Ok(None);
    };
    upload_from(s)
}

/// What arrives on `s`, timed from its first byte to EOF.
pub(crate) fn upload_from(mut s: impl Read) -> Result<Option<Sample>> {
    let mut buf = vec![0u8; 128 << 10];
    let (mut bytes, mut ops, mut first) = (0u64, 0u64, None);
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                first.get_or_insert_with(Instant::now);
                bytes += n as u64;
                ops += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => bail!("receiving from the guest: {e}"),
        }
    }
    Ok(first.map(|t| Sample {
        ops,
        bytes,
        time: t.elapsed(),
    }))
}

/// The guest's download: send on one connection on `l` for `secs`, then
/// close, timed from accept to close.
fn give_download(l: TcpListener, secs: u64, stop: &AtomicBool) -> Result<Option<Sample>> {
    let Some(s) = accept(&l, stop)? else {
        return Ok(None);
    };
    download_to(s, secs)
}

/// Send on `s` for `secs`, then close it, timed from the start to the close.
pub(crate) fn download_to(mut s: impl Write, secs: u64) -> Result<Option<Sample>> {
    let buf = vec![0x5au8; 128 << 10];
    let start = Instant::now();
    let (mut bytes, mut ops) = (0u64, 0u64);
    while start.elapsed() < Duration::from_secs(secs) {
        match s.write(&buf) {
            Ok(n) => {
                bytes += n as u64;
                ops += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => bail!("sending to the guest: {e}"),
        }
    }
    drop(s);
    Ok(Some(Sample {
        ops,
        bytes,
        time: start.elapsed(),
    }))
}

/// Listen on UP_PORT and DOWN_PORT inside namespace `ns` (the sockets stay
/// in it whichever thread serves them).
fn listen_in(ns: &str) -> Result<(TcpListener, TcpListener)> {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        let f = std::fs::File::open(format!("/run/netns/{ns}"))?;
        // SAFETY: setns on this short-lived thread only, with a namespace
        // fd we opened.
        if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) } != 0 {
            bail!("setns: {}", std::io::Error::last_os_error());
        }
        let bind = |port: u16| -> Result<TcpListener> {
            let l = TcpListener::bind(("0.0.0.0", port))
                .with_context(|| format!("listening on port {port} in {ns}"))?;
            l.set_nonblocking(true)?;
            Ok(l)
        };
        Ok((bind(UP_PORT)?, bind(DOWN_PORT)?))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the listening thread panicked"))?
}

/// One guest on a tap in `ns`: give the host side its address once the
/// VMM has made the tap, serve the transfers, collect the figures.
fn net_once(ns: &Netns, tap: &str, cmd: Command, secs: u64, limit: Duration) -> Result<IoReport> {
    let (up, down) = listen_in(&ns.0)?;
    let mut vm = Console::spawn(ns.wrap(&cmd))?;
    let start = Instant::now();
    let tap_up = loop {
        if ip(&["-n", &ns.0, "link", "show", tap]).is_ok() {
            let addr = format!("{HOST_IP}/24");
            break ip(&["-n", &ns.0, "link", "set", tap, "up"])
                .and_then(|_| ip(&["-n", &ns.0, "addr", "add", &addr, "dev", tap]));
        }
        if vm.exited() || start.elapsed() > Duration::from_secs(60) {
            break Err(anyhow::anyhow!("the VMM made no tap {tap}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stop = Arc::new(AtomicBool::new(false));
    let upload = {
        let stop = stop.clone();
        std::thread::spawn(move || take_upload(up, &stop))
    };
    let download = {
        let stop = stop.clone();
        std::thread::spawn(move || give_download(down, secs, &stop))
    };
    if tap_up.is_err() {
        vm.kill();
    }
    let finished = vm.finish(limit);
    stop.store(true, Ordering::Relaxed);
    let (upload, download) = (joined(upload), joined(download));
    if let Err(e) = tap_up {
        let why = finished.failure().unwrap_or_default();
        bail!("{e:#} {why}");
    }
    with_host_figures(&finished, upload, download)
}

/// passt on one end of a socket pair for one QEMU, started as Vireo
/// starts its own by default (foreground, passt's own MTU of 65520, which
/// QEMU's merged receive buffers take, `--fd`); QEMU gets the other end
/// as descriptor 3 (`-netdev stream,addr.type=fd`). passt exits when QEMU
/// closes its end.
struct QemuPasst(std::process::Child);

/// Make `fd` the child's descriptor 3 (close-on-exec cleared).
fn as_fd3(cmd: &mut Command, fd: std::os::fd::RawFd) {
    use std::os::unix::process::CommandExt;
    // SAFETY: only dup2/fcntl between fork and exec, on descriptors that
    // exist in the child.
    unsafe {
        cmd.pre_exec(move || {
            let rc = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

impl QemuPasst {
    /// passt on a new pair; the end for QEMU.
    fn start() -> Result<(QemuPasst, std::os::unix::net::UnixStream)> {
        // The pair and socket buffers Vireo gives its own passt, so both
        // VMMs see the same passt and the same pair.
        let (ours, theirs) = net::passt::socket_pair()?;
        let mut c = Command::new("passt");
        let mtu = net::passt::DEFAULT_MTU.to_string();
        c.args(["--foreground", "--quiet", "--mtu", &mtu, "--fd", "3"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        as_fd3(&mut c, std::os::fd::AsRawFd::as_raw_fd(&theirs));
        let child = c
            .spawn()
            .context("starting passt (install Debian's passt)")?;
        Ok((QemuPasst(child), ours))
    }
}

impl Drop for QemuPasst {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One guest on passt: the host ends listen on loopback (passt maps the
/// guest's gateway address to it).
fn net_user_once(mut cmd: Command, qemu: &str, secs: u64, limit: Duration) -> Result<IoReport> {
    let bind = |port: u16| -> Result<TcpListener> {
        let l = TcpListener::bind(("127.0.0.1", port))
            .with_context(|| format!("listening on 127.0.0.1:{port}"))?;
        l.set_nonblocking(true)?;
        Ok(l)
    };
    let (up, down) = (bind(UP_PORT)?, bind(DOWN_PORT)?);
    // Vireo starts its own passt; QEMU is given one.
    let passt = if cmd.get_program() == qemu {
        let (p, end) = QemuPasst::start()?;
        as_fd3(&mut cmd, std::os::fd::AsRawFd::as_raw_fd(&end));
        Some((p, end))
    } else {
        None
    };
    let vm = Console::spawn(cmd)?;
    // QEMU has its end now: ours must close, or passt never sees it go.
    let _passt = passt.map(|(p, _)| p);
    let stop = Arc::new(AtomicBool::new(false));
    let upload = {
        let stop = stop.clone();
        std::thread::spawn(move || take_upload(up, &stop))
    };
    let download = {
        let stop = stop.clone();
        std::thread::spawn(move || give_download(down, secs, &stop))
    };
    let finished = vm.finish(limit);
    stop.store(true, Ordering::Relaxed);
    with_host_figures(&finished, joined(upload), joined(download))
}

/// `bench net --backend user`: TCP both ways through passt, Vireo's
/// `--net user` beside QEMU's `-netdev stream` on the same passt binary
/// and options, in the same run. Needs no privileges.
pub fn net_user(args: &BenchArgs, runs: usize) -> Result<()> {
    let secs = args.seconds;
    let cmd = format!(
        "timeout 60 udhcpc -i eth0 -n -q -t 10 >/dev/null && \
         gw=$(ip route | grep default | cut -d' ' -f3) && \
         vireo-io tcp-send $gw {UP_PORT} {secs}; vireo-io tcp-recv $gw {DOWN_PORT}"
    );
    let template = Guest::new(args.guest_dir.as_deref(), &cmd)?;
    println!(
        "net --backend user: TCP through passt (virtio-net-pci; Vireo's --net user, QEMU's -netdev stream \
on a passt started here as Vireo starts its own by default: MTU {}), {secs} s per direction; MiB/s, median of {runs} runs",
        net::passt::DEFAULT_MTU
    );
    println!(
        "     guest = vireo-io's figure on the guest's clock; host = the host's end of the connection (loopback)"
    );
    let limit = args.timeout();
    let qemu = args.qemu.clone();
    let cols = measure(
        args,
        runs,
        &mut |_| {
            let mut g = template.clone();
            g.user_net = true;
            g
        },
        &mut |_, cmd| net_user_once(cmd, &qemu, secs, limit),
    );
    print_table(&NET_TESTS, &cols, "host");
    Ok(())
}

/// The rows of both net tables (tap and passt).
const NET_TESTS: [Test; 2] = [
    Test {
        name: "tcp-send",
        label: "guest -> host MiB/s (TCP)",
        unit: Unit::MibPerSec,
    },
    Test {
        name: "tcp-recv",
        label: "host -> guest MiB/s (TCP)",
        unit: Unit::MibPerSec,
    },
];

pub fn net(args: &BenchArgs, runs: usize) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/net/tun").exists() {
        bail!("bench net needs root and /dev/net/tun (it makes a network namespace and taps)");
    }
    let secs = args.seconds;
    let cmd = format!(
        "ip link set eth0 up && ip addr add {GUEST_IP}/24 dev eth0 && \
         vireo-io tcp-send {HOST_IP} {UP_PORT} {secs}; vireo-io tcp-recv {HOST_IP} {DOWN_PORT}"
    );
    let template = Guest::new(args.guest_dir.as_deref(), &cmd)?;
    let pid = std::process::id();
    let ns = Netns::new(format!("vireo-bench-{pid}"))?;
    println!(
        "net: TCP through a tap (virtio-net-pci, vhost off) in a namespace made here, {secs} s per direction; \
MiB/s, median of {runs} runs"
    );
    println!(
        "     guest = vireo-io's figure on the guest's clock; host = the host's end of the connection"
    );
    let limit = args.timeout();
    let cols = measure(
        args,
        runs,
        &mut |n| {
            let mut g = template.clone();
            g.tap = Some(format!("vbn{}x{n}", pid % 10_000));
            g
        },
        &mut |g, cmd| net_once(&ns, g.tap.as_deref().unwrap_or(""), cmd, secs, limit),
    );
    print_table(&NET_TESTS, &cols, "host");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_figures_errors_and_host_times() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let lines: Vec<(Instant, String)> = [
            (0, "VIREO-INIT: up"),
            (10, "VIREO-IO-BEGIN read"),
            (
                2010,
                "[   12.3] random kernel line VIREO-IO read ops=100 bytes=104857600 ns=2000000000",
            ),
            (2020, "VIREO-IO-BEGIN randread"),
            (
                4020,
                "VIREO-IO randread ops=5000 bytes=20480000 ns=1000000000",
            ),
            (
                4030,
                "VIREO-IO-ERROR tcp-send connect to 10.213.2.1:5555: No route to host (for 30 s)",
            ),
            (4040, "VIREO-IO write ops=1 bytes=x ns=1"),
            (4050, "VIREO-IO randwrite ops=10 bytes=40960 ns=1000000000"),
        ]
        .into_iter()
        .map(|(ms, l)| (at(ms), l.to_string()))
        .collect();
        let r = parse_io(&lines);
        assert_eq!(r.figures.len(), 3);
        let read = &r.figures[0];
        assert_eq!(read.name, "read");
        assert_eq!(read.guest.rate(Unit::MibPerSec), 50.0);
        let host = read.host.unwrap();
        assert_eq!(host.time, Duration::from_millis(2000));
        assert_eq!(host.rate(Unit::MibPerSec), 50.0);
        assert_eq!(r.figures[1].guest.rate(Unit::Iops), 5000.0);
        assert_eq!(r.figures[1].host.unwrap().rate(Unit::Iops), 2500.0);
        // No BEGIN line: no host figure.
        assert_eq!(r.figures[2].name, "randwrite");
        assert_eq!(r.figures[2].host, None);
        assert_eq!(
            r.errors[0],
            (
                "tcp-send".to_string(),
                "connect to 10.213.2.1:5555: No route to host (for 30 s)".to_string()
            )
        );
        assert_eq!(r.errors[1].0, "write");
        assert!(r.errors[1].1.starts_with("malformed"), "{:?}", r.errors);
    }

    #[test]
    fn cells_show_medians_and_failures() {
        let fig = |ops: u64| Figure {
            name: "randread".into(),
            guest: Sample {
                ops,
                bytes: ops * 4096,
                time: Duration::from_secs(1),
            },
            host: None,
        };
        let mut c = Column::new("x".into());
        for ops in [300, 100, 200] {
            c.runs.push(IoReport {
                figures: vec![fig(ops)],
                errors: vec![("read".into(), "boom".into())],
            });
        }
        let t = |name| Test {
            name,
            label: "",
            unit: Unit::Iops,
        };
        assert_eq!(c.cell(&t("randread")), ("200".into(), "-".into()));
        assert_eq!(c.cell(&t("read")), ("failed".into(), "failed".into()));
        assert_eq!(c.cell(&t("write")), ("-".into(), "-".into()));
        assert_eq!(c.notes(), vec!["x: read: boom".to_string()]);
    }
}
