//! `vireo top`: a live view of running VMMs through their API sockets.
//!
//! Each refresh asks every VMM for `vm.counters` and shows rates computed
//! against the previous answer; VMMs that do not answer stay listed as
//! "gone". The screen is drawn with plain ANSI sequences so it works in
//! any terminal over SSH, laid out for 80x24 (wider terminals get a wider
//! name column, taller ones more rows). Keys: q (or Ctrl-C) quits, 1-0
//! choose the sort column, Tab the next one, r reverses the order.
//!
//! When standard output is not a terminal, each refresh is printed as
//! plain lines instead, with no escape sequences (for logs and pipes).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use vmm::api::client::ApiClient;
use vmm::counters::VmCounters;

#[derive(Args)]
pub struct TopArgs {
    /// API sockets of the VMMs to show (`vireo run --api-socket PATH`).
    #[arg(value_name = "SOCKET")]
    sockets: Vec<PathBuf>,
    /// Also show every socket in this directory (looked at again on each
    /// refresh, so VMMs that start or stop come and go).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Seconds between refreshes.
    #[arg(long, value_name = "SECONDS", default_value_t = 1.0)]
    interval: f64,
    /// Stop after this many refreshes [default: until q].
    #[arg(long, value_name = "N")]
    iterations: Option<u64>,
}

/// The columns, in display order; the sort keys are their numbers.
const COLUMNS: [&str; 10] = [
    "VM", "STATE", "CPU%", "MEM", "BALLN", "DSK-RD", "DSK-WR", "NET-RX", "NET-TX", "EXIT/s",
];

/// One VMM as last seen.
struct Sample {
    at: Instant,
    counters: VmCounters,
}

/// A row of the table: the figures behind each column.
struct Row {
    name: String,
    state: String,
    cpu_pct: f64,
    vcpu_pct: Vec<f64>,
    mem: u64,
    balloon: Option<u64>,
    disk_rd: f64,
    disk_wr: f64,
    net_rx: f64,
    net_tx: f64,
    exits: f64,
}

impl Row {
    fn key(&self, col: usize) -> f64 {
        match col {
            2 => self.cpu_pct,
            3 => self.mem as f64,
            4 => self.balloon.unwrap_or(0) as f64,
            5 => self.disk_rd,
            6 => self.disk_wr,
            7 => self.net_rx,
            8 => self.net_tx,
            9 => self.exits,
            _ => 0.0,
        }
    }
}

fn total_exits(c: &VmCounters) -> u64 {
    c.vcpus.iter().flat_map(|v| v.exits.values()).sum()
}

/// Per-second rate of a counter between two samples.
fn rate(new: u64, old: u64, secs: f64) -> f64 {
    if secs <= 0.0 {
        return 0.0;
    }
    new.saturating_sub(old) as f64 / secs
}

fn row(name: String, now: &Sample, before: Option<&Sample>) -> Row {
    let c = &now.counters;
    let state = serde_json::to_value(c.state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    let mut r = Row {
        name,
        state,
        cpu_pct: 0.0,
        vcpu_pct: vec![0.0; c.vcpus.len()],
        mem: c.memory.resident_bytes.unwrap_or(c.memory.guest_bytes),
        balloon: c.memory.balloon_bytes,
        disk_rd: 0.0,
        disk_wr: 0.0,
        net_rx: 0.0,
        net_tx: 0.0,
        exits: 0.0,
    };
    let Some(b) = before else {
        return r;
    };
    let p = &b.counters;
    let secs = now.at.duration_since(b.at).as_secs_f64();
    for (i, v) in c.vcpus.iter().enumerate() {
        let old = p.vcpus.get(i).and_then(|o| o.cpu_ns).unwrap_or(0);
        let pct = 100.0 * rate(v.cpu_ns.unwrap_or(0), old, secs) / 1e9;
        r.vcpu_pct[i] = pct;
        r.cpu_pct += pct;
    }
    let sum = |c: &VmCounters, f: fn(&vmm::counters::DiskReport) -> u64| -> u64 {
        c.disks.iter().map(f).sum()
    };
    r.disk_rd = rate(
        sum(c, |d| d.stats.read.bytes),
        sum(p, |d| d.stats.read.bytes),
        secs,
    );
    r.disk_wr = rate(
        sum(c, |d| d.stats.write.bytes),
        sum(p, |d| d.stats.write.bytes),
        secs,
    );
    let net = |c: &VmCounters, f: fn(&vmm::counters::NetReport) -> u64| -> u64 {
        c.nets.iter().map(f).sum()
    };
    r.net_rx = rate(
        net(c, |n| n.stats.rx_bytes),
        net(p, |n| n.stats.rx_bytes),
        secs,
    );
    r.net_tx = rate(
        net(c, |n| n.stats.tx_bytes),
        net(p, |n| n.stats.tx_bytes),
        secs,
    );
    r.exits = rate(total_exits(c), total_exits(p), secs);
    r
}

/// 1234567 -> "1.2M": at most 5 characters.
fn human(v: f64) -> String {
    const UNITS: [&str; 5] = ["", "K", "M", "G", "T"];
    let mut v = v.max(0.0);
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0}")
    } else if v < 10.0 {
        format!("{v:.1}{}", UNITS[u])
    } else {
        format!("{v:.0}{}", UNITS[u])
    }
}

fn cut(s: &str, w: usize) -> String {
    if s.chars().count() <= w {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(w.saturating_sub(1)).collect();
        t.push('~');
        t
    }
}

/// The screen's lines for `rows` in a `width` x `height` terminal.
fn render(
    rows: &[Row],
    gone: &[String],
    sort: usize,
    reverse: bool,
    width: usize,
    height: usize,
) -> Vec<String> {
    // Fixed columns take 64 characters with their separators (state 7,
    // eight figures of 6); the VM name gets the rest (at least 10).
    let name_w = width.saturating_sub(64).clamp(10, 40);
    let mut lines = Vec::new();
    let mut title = format!(
        "vireo top - {} VMM(s), sorted by {}{} - q quits, 1-0/Tab sort, r reverse",
        rows.len(),
        COLUMNS[sort],
        if reverse { " (reversed)" } else { "" }
    );
    title = cut(&title, width);
    lines.push(title);
    let mut head = format!("{:<name_w$}", COLUMNS[0]);
    for (i, c) in COLUMNS.iter().enumerate().skip(1) {
        let w = if i == 1 { 7 } else { 6 };
        // The sort column is marked by a `*` in place of its padding
        // (or of its first letter, for a full-width name).
        let label = if i == sort {
            let c = if c.len() >= w { &c[1..] } else { c };
            format!("*{c}")
        } else {
            c.to_string()
        };
        head.push_str(&format!(" {label:>w$}"));
    }
    lines.push(cut(&head, width));
    for r in rows {
        if lines.len() + 1 >= height {
            break;
        }
        let balloon = r.balloon.map_or("-".to_string(), |b| human(b as f64));
        let line = format!(
            "{:<name_w$} {:>7} {:>6.1} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6}",
            cut(&r.name, name_w),
            r.state,
            r.cpu_pct,
            human(r.mem as f64),
            balloon,
            human(r.disk_rd),
            human(r.disk_wr),
            human(r.net_rx),
            human(r.net_tx),
            human(r.exits),
        );
        lines.push(cut(&line, width));
        if lines.len() + 1 < height && r.vcpu_pct.len() > 1 {
            let per: Vec<String> = r
                .vcpu_pct
                .iter()
                .enumerate()
                .map(|(i, p)| format!("{i}:{p:.0}%"))
                .collect();
            lines.push(cut(&format!("  vCPU {}", per.join(" ")), width));
        }
    }
    for g in gone {
        if lines.len() + 1 >= height {
            break;
        }
        lines.push(cut(
            &format!("{:<name_w$} {:>7}", cut(g, name_w), "gone"),
            width,
        ));
    }
    lines
}

/// The sockets to look at now: those given, then the directory's.
fn sockets(args: &TopArgs) -> Vec<PathBuf> {
    let mut v = args.sockets.clone();
    if let Some(dir) = &args.dir {
        if let Ok(entries) = std::fs::read_dir(dir) {
            let mut found: Vec<PathBuf> = entries
                .flatten()
                .filter(|e| {
                    use std::os::unix::fs::FileTypeExt;
                    e.file_type().is_ok_and(|t| t.is_socket())
                })
                .map(|e| e.path())
                .filter(|p| !v.contains(p))
                .collect();
            found.sort();
            v.extend(found);
        }
    }
    v
}

fn display_name(p: &Path) -> String {
    // The socket's file name, or its directory's for a generic name.
    let stem = p.file_stem().map(|s| s.to_string_lossy().into_owned());
    match stem.as_deref() {
        Some("api") | Some("sock") | Some("socket") | None => p
            .parent()
            .and_then(|d| d.file_name())
            .map(|d| d.to_string_lossy().into_owned())
            .unwrap_or_else(|| p.display().to_string()),
        Some(s) => s.to_string(),
    }
}

/// The terminal in raw mode while a `RawTerminal` lives.
struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    fn enter() -> Option<Self> {
        // SAFETY: tcgetattr fills a termios we own; fd 0 may not be a tty,
        // which the return value says.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return None;
            }
            let saved = t;
            // ISIG off too: Ctrl-C arrives as a key, so the terminal is
            // restored on the way out.
            t.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ISIG);
            t.c_cc[libc::VMIN] = 0;
            t.c_cc[libc::VTIME] = 0;
            if libc::tcsetattr(0, libc::TCSANOW, &t) != 0 {
                return None;
            }
            Some(RawTerminal { saved })
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in `enter`.
        unsafe {
            libc::tcsetattr(0, libc::TCSANOW, &self.saved);
        }
        let mut out = std::io::stdout();
        // Leave the alternate screen and show the cursor again.
        let _ = out.write_all(b"\x1b[?25h\x1b[?1049l");
        let _ = out.flush();
    }
}

fn is_tty(fd: i32) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd) == 1 }
}

fn term_size() -> (usize, usize) {
    // SAFETY: TIOCGWINSZ fills a winsize we own.
    unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        if libc::ioctl(1, libc::TIOCGWINSZ, &mut ws) == 0 && ws.ws_col > 0 && ws.ws_row > 0 {
            return (ws.ws_col as usize, ws.ws_row as usize);
        }
    }
    (80, 24)
}

/// Wait up to `timeout` for a key; the bytes typed.
fn read_keys(timeout: Duration) -> Vec<u8> {
    let mut fd = libc::pollfd {
        fd: 0,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut fd, 1, ms) };
    if n <= 0 {
        return Vec::new();
    }
    let mut buf = [0u8; 32];
    // SAFETY: reads into a buffer we own, at most its length.
    let got = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
    if got <= 0 {
        // End of input: no more keys will come; wait out the interval.
        std::thread::sleep(timeout);
        return Vec::new();
    }
    buf[..got as usize].to_vec()
}

pub fn run(args: &TopArgs) -> i32 {
    if args.sockets.is_empty() && args.dir.is_none() {
        eprintln!("vireo: error: give API sockets or --dir DIR");
        return crate::exit_code::USAGE;
    }
    if !(args.interval.is_finite() && args.interval > 0.0) {
        eprintln!("vireo: error: --interval must be a positive number of seconds");
        return crate::exit_code::USAGE;
    }
    let interval = Duration::from_secs_f64(args.interval.max(0.1));
    let interactive = is_tty(1);
    let _raw = if interactive && is_tty(0) {
        RawTerminal::enter()
    } else {
        None
    };
    let mut out = std::io::stdout();
    if interactive {
        // Alternate screen, cursor hidden.
        let _ = out.write_all(b"\x1b[?1049h\x1b[?25l");
    }
    let mut last: HashMap<PathBuf, Sample> = HashMap::new();
    let (mut sort, mut reverse) = (2usize, false);
    let mut shown = 0u64;
    loop {
        let socks = sockets(args);
        let mut rows = Vec::new();
        let mut gone = Vec::new();
        for s in &socks {
            match ApiClient::new(s).counters() {
                Ok(counters) => {
                    let now = Sample {
                        at: Instant::now(),
                        counters,
                    };
                    rows.push(row(display_name(s), &now, last.get(s)));
                    last.insert(s.clone(), now);
                }
                Err(_) => {
                    last.remove(s);
                    gone.push(display_name(s));
                }
            }
        }
        rows.sort_by(|a, b| {
            let o = match sort {
                0 => a.name.cmp(&b.name),
                1 => a.state.cmp(&b.state).then(a.name.cmp(&b.name)),
                // Figures: largest first.
                c => b.key(c).total_cmp(&a.key(c)).then(a.name.cmp(&b.name)),
            };
            if reverse {
                o.reverse()
            } else {
                o
            }
        });
        let (w, h) = if interactive { term_size() } else { (80, 24) };
        let lines = render(&rows, &gone, sort, reverse, w, h);
        let mut text = String::new();
        if interactive {
            text.push_str("\x1b[H\x1b[2J");
            text.push_str(&lines.join("\r\n"));
        } else {
            text.push_str(&lines.join("\n"));
            text.push('\n');
        }
        if out
            .write_all(text.as_bytes())
            .and_then(|_| out.flush())
            .is_err()
        {
            return 0;
        }
        shown += 1;
        if args.iterations.is_some_and(|n| shown >= n) {
            return 0;
        }
        // Wait out the interval, answering keys meanwhile.
        let until = Instant::now() + interval;
        let mut redraw = false;
        while !redraw {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            for k in read_keys(left) {
                match k {
                    b'q' | b'Q' | 3 => return 0,
                    b'1'..=b'9' => sort = (k - b'1') as usize,
                    b'0' => sort = 9,
                    b'\t' => sort = (sort + 1) % COLUMNS.len(),
                    b'r' | b'R' => reverse = !reverse,
                    _ => continue,
                }
                redraw = true;
            }
        }
        // A key redraws at once (rates are computed against the last
        // sample whatever the time between them).
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes_fit_their_column() {
        assert_eq!(human(0.0), "0");
        assert_eq!(human(999.0), "999");
        assert_eq!(human(1536.0), "1.5K");
        assert_eq!(human(64.0 * 1024.0 * 1024.0), "64M");
        for v in [1e3, 1e6, 9.99e9, 1e14] {
            assert!(human(v).len() <= 5, "{v}: {}", human(v));
        }
    }

    #[test]
    fn the_table_fits_80_by_24() {
        let rows: Vec<Row> = (0..30)
            .map(|i| Row {
                name: format!("a-very-long-vm-name-number-{i}"),
                state: "running".into(),
                cpu_pct: 199.9,
                vcpu_pct: vec![99.9, 100.0],
                mem: 1 << 40,
                balloon: Some(1 << 30),
                disk_rd: 1e12,
                disk_wr: 1e9,
                net_rx: 1e6,
                net_tx: 1e3,
                exits: 123456.0,
            })
            .collect();
        let lines = render(&rows, &["old".into()], 2, false, 80, 24);
        assert!(lines.len() <= 23, "{}", lines.len());
        for l in &lines {
            assert!(l.chars().count() <= 80, "{l}");
        }
        assert!(lines[1].contains("*CPU%"), "{}", lines[1]);
        let header_w = lines[1].chars().count();
        assert!(
            lines[2].chars().count() == header_w,
            "{}\n{}",
            lines[1],
            lines[2]
        );
    }
}
