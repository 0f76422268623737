//! Progress of a long operation the VMM runs for a client command
//! (`vireo snapshot`, `vireo migrate`): while the request waits for its
//! answer, a second connection reads `vm.counters` twice a second and
//! shows its `operation` on stderr: a bar redrawn in place on a terminal,
//! a plain line a second otherwise.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm::api::client::ApiClient;
use vmm::counters::OperationReport;

/// Shows progress until dropped.
pub struct Progress {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

/// One line about `op`; `width` is the bar's, 0 for none.
pub fn describe(op: &OperationReport, width: usize) -> String {
    let pct = if op.round_total_bytes > 0 {
        (op.round_done_bytes as f64 * 100.0 / op.round_total_bytes as f64).min(100.0)
    } else {
        0.0
    };
    let mut s = String::new();
    if width > 0 {
        let fill = (pct / 100.0 * width as f64).round() as usize;
        s.push('[');
        s.push_str(&"#".repeat(fill.min(width)));
        s.push_str(&" ".repeat(width - fill.min(width)));
        s.push_str("] ");
    }
    s.push_str(&format!(
        "{} {pct:3.0}% {:.0}/{:.0} MiB, {:.0} MiB/s",
        op.kind,
        mib(op.round_done_bytes),
        mib(op.round_total_bytes),
        mib(op.rate_bytes_per_s)
    ));
    if op.kind == "migration" {
        s.push_str(&format!(
            ", round {}, {}, dirty {} pages ({}/s)",
            op.round + 1,
            op.phase,
            op.dirty_pages,
            op.dirty_pages_per_s
        ));
        if let Some(d) = op.expected_downtime_ms {
            s.push_str(&format!(", downtime ~{d} ms"));
        }
    }
    s
}

impl Progress {
    /// Start watching the VMM at `socket`.
    pub fn start(socket: PathBuf) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        // SAFETY: isatty only inspects the descriptor.
        let tty = unsafe { libc::isatty(2) == 1 };
        let thread = std::thread::Builder::new()
            .name("progress".into())
            .spawn(move || {
                let client = ApiClient::new(socket);
                let mut drawn = false;
                let mut last_line = Instant::now() - Duration::from_secs(1);
                while !stopping.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(500));
                    if stopping.load(Ordering::Acquire) {
                        break;
                    }
                    let Ok(c) = client.counters() else {
                        continue;
                    };
                    let Some(op) = c.operation else {
                        continue;
                    };
                    let mut err = std::io::stderr();
                    if tty {
                        let _ = write!(err, "\r\x1b[K{}", describe(&op, 30));
                        drawn = true;
                    } else if last_line.elapsed() >= Duration::from_secs(1) {
                        let _ = writeln!(err, "{}", describe(&op, 0));
                        last_line = Instant::now();
                    }
                    let _ = err.flush();
                }
                if drawn {
                    // Leave the terminal on a fresh line.
                    let _ = write!(std::io::stderr(), "\r\x1b[K");
                }
            })
            .ok();
        Progress { stop, thread }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
