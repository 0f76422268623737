//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        // tmpfs when available: the tests fsync a lot and only need
        // correctness, not durability.
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let p = base.join(format!(
            "vireo-block-{}-{}-{}",
            tag,
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("KEEP_TMP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Whether qemu-img and qemu-io are installed; tests that need them skip
/// (loudly) otherwise.
pub fn have_qemu() -> bool {
    let ok = |bin: &str| {
        Command::new(bin)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    };
    let have = ok("qemu-img") && ok("qemu-io");
    if !have {
        eprintln!("SKIPPED: qemu-img/qemu-io (package qemu-utils) not installed");
    }
    have
}

pub fn run(bin: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new(bin).args(args).output().expect("spawn");
    out
}

/// Run and require success.
pub fn run_ok(bin: &str, args: &[&str]) -> String {
    let out = run(bin, args);
    assert!(
        out.status.success(),
        "{bin} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

/// qemu-img check must exit 0 and report neither errors nor leaks.
pub fn assert_check_clean(img: &Path) {
    let out = run("qemu-img", &["check", p(img)]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "qemu-img check failed on {}: {text}",
        img.display()
    );
    assert!(
        text.contains("No errors were found"),
        "qemu-img check: {text}"
    );
    assert!(
        !text.contains("leaked"),
        "qemu-img check reports leaks: {text}"
    );
}

/// qemu-img compare (contents equal, sizes included).
pub fn assert_same(img: &Path, fmt: &str, other: &Path, other_fmt: &str) {
    let out = run(
        "qemu-img",
        &["compare", "-f", fmt, "-F", other_fmt, p(img), p(other)],
    );
    assert!(
        out.status.success(),
        "qemu-img compare {} {} differ: {}{}",
        img.display(),
        other.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// xorshift64*: deterministic test randomness without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = self.next() as u8;
        }
    }
}
