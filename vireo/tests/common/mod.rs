//! Shared helpers for tests that run the `vireo` binary.

#![allow(dead_code)]

pub mod stream;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn vireo() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vireo"))
}

/// The guest images made by guest/build.sh. Tests need them: a missing image
/// is a failure that says how to make it, never a silent skip.
pub fn guest_dir() -> PathBuf {
    let dir = std::env::var_os("VIREO_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../guest/out"));
    for f in ["vmlinux", "vmlinuz", "initramfs.cpio.gz"] {
        assert!(
            dir.join(f).exists(),
            "guest image {} is missing: run guest/build.sh (or scripts/test.sh, which does)",
            dir.join(f).display()
        );
    }
    dir
}

/// Poll `f` every 20 ms until it holds or `limit` passes.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// `vireo <args> --api-socket <sock>`, run to completion.
pub fn client(args: &[&str], sock: &std::path::Path) -> std::process::Output {
    vireo()
        .args(args)
        .arg("--api-socket")
        .arg(sock)
        .output()
        .expect("vireo client runs")
}

/// `vireo snapshot --stay-paused` of the VM behind `sock` into `snap`,
/// asserted to succeed.
pub fn snapshot_paused(sock: &Path, snap: &Path) {
    let out = vireo()
        .args(["snapshot", "--stay-paused", "--api-socket"])
        .arg(sock)
        .arg("--dir")
        .arg(snap)
        .output()
        .unwrap();
    assert!(out.status.success(), "snapshot: {out:?}");
}

/// [`snapshot_paused`], then stop the VM through its API: it must exit 0
/// within `limit`.
pub fn snapshot_and_stop(vm: &mut Running, sock: &Path, snap: &Path, limit: Duration) {
    snapshot_paused(sock, snap);
    let out = client(&["stop"], sock);
    assert!(
        out.status.success(),
        "stop: {out:?}\nthe VMM's stderr:\n{}",
        vm.stderr_text()
    );
    assert_eq!(vm.wait_exit(limit), Some(0), "{}", vm.stderr_text());
}

pub fn kvm_usable() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        eprintln!("note: /dev/kvm is not usable on this host; KVM test skipped");
    }
    ok
}

/// A running `vireo` whose stdout and stderr are collected by threads.
pub struct Running {
    pub child: Child,
    pub stdout: Arc<Mutex<Vec<u8>>>,
    pub stderr: Arc<Mutex<Vec<u8>>>,
}

fn collect(mut r: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let b = buf.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = r.read(&mut chunk) {
            if n == 0 {
                break;
            }
            b.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    buf
}

impl Running {
    pub fn spawn(cmd: Command) -> Self {
        Self::start(cmd, Stdio::null())
    }

    /// Like [`Running::spawn`], with stdin a pipe the caller writes to.
    pub fn spawn_with_stdin(cmd: Command) -> (Self, ChildStdin) {
        let mut r = Self::start(cmd, Stdio::piped());
        let stdin = r.child.stdin.take().unwrap();
        (r, stdin)
    }

    fn start(mut cmd: Command, stdin: Stdio) -> Self {
        let mut child = cmd
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("vireo starts");
        let stdout = collect(child.stdout.take().unwrap());
        let stderr = collect(child.stderr.take().unwrap());
        Running {
            child,
            stdout,
            stderr,
        }
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Wait until stdout contains `needle` or the process ends or time runs out.
    pub fn wait_for(&mut self, needle: &str, limit: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < limit {
            if self.stdout_text().contains(needle) {
                return true;
            }
            if let Ok(Some(_)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                return self.stdout_text().contains(needle);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// Wait for the process to exit; kill it after `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(st)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.kill();
        None
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The lines the guest's command printed (between the init's markers),
/// kernel messages left out.
pub fn command_output(console: &str) -> Vec<String> {
    let start = console
        .find("VIREO-CMD-BEGIN")
        .expect("the command started");
    console[start..]
        .lines()
        .skip(1)
        .take_while(|l| !l.starts_with("VIREO-CMD-END"))
        .filter(|l| !l.starts_with('['))
        .map(|l| l.trim_end_matches('\r').to_string())
        .collect()
}

/// The tiny a..z counting guest (arch::tiny_elf::letters_guest), as a file in `dir`.
pub fn counting_guest(dir: &Path) -> PathBuf {
    let path = dir.join("letters.elf");
    std::fs::write(&path, arch::tiny_elf::letters_guest(20_000)).unwrap();
    path
}

pub fn assert_unbroken_cycle(text: &str) {
    let letters: Vec<u8> = text.bytes().filter(|b| b.is_ascii_lowercase()).collect();
    assert!(!letters.is_empty());
    assert_eq!(letters[0], b'a', "the count starts at a");
    for (i, w) in letters.windows(2).enumerate() {
        let want = if w[0] == b'z' { b'a' } else { w[0] + 1 };
        assert_eq!(
            w[1],
            want,
            "letter {} breaks the count: ...{}",
            i + 1,
            String::from_utf8_lossy(&letters[i.saturating_sub(10)..(i + 10).min(letters.len())])
        );
    }
}

/// Every `COUNT:<n>:<uptime>:` the guest printed, in order.
pub fn count_lines(console: &str) -> Vec<(u64, f64)> {
    console
        .split("COUNT:")
        .skip(1)
        .filter_map(|rest| {
            let mut f = rest.split(':');
            Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
        })
        .collect()
}

pub fn counts(console: &str) -> Vec<u64> {
    count_lines(console).into_iter().map(|(n, _)| n).collect()
}

/// How far the Debian counting guest counts.
pub const LAST_COUNT: u64 = 40;

/// Debian on the engine (256 MiB, virtio-rng, a fresh 32 MiB ext4 disk at
/// `dir`/disk.img, the API on `dir`/a.sock) counting every 0.2 s to its
/// console (`COUNT:n:uptime:`) and to /count.txt on the disk, with a sync
/// after each, up to [`LAST_COUNT`]; returned once it has counted to 5.
/// (The VM, its disk, its API socket.)
pub fn spawn_debian_counter(dir: &Path) -> (Running, PathBuf, PathBuf) {
    let g = guest_dir();
    let disk = dir.join("disk.img");
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&disk)
        .arg("32M")
        .output()
        .unwrap();
    assert!(mkfs.status.success(), "{mkfs:?}");
    let script = format!(
        "mount /dev/vda /mnt && i=0 && while [ $i -lt {LAST_COUNT} ]; do i=$((i+1)); \
         echo COUNT:$i:$(cut -d' ' -f1 /proc/uptime):; echo $i >> /mnt/count.txt; sync; sleep 0.2; \
         done; umount /mnt"
    );
    let sock = dir.join("a.sock");
    let mut cmd = vireo();
    cmd.args(["run", "--accel", "emu", "--memory", "256M", "--kernel"])
        .arg(g.join("vmlinux"))
        .arg("--initrd")
        .arg(g.join("initramfs.cpio.gz"))
        .arg("--cmdline")
        .arg(format!(
            "console=ttyS0 reboot=k panic=1 quiet vireo.cmd=\"{script}\""
        ))
        .arg("--disk")
        .arg(format!("path={},format=raw", disk.display()))
        .arg("--rng")
        .arg("--api-socket")
        .arg(&sock);
    let mut vm = Running::spawn(cmd);
    assert!(
        vm.wait_for("COUNT:5:", Duration::from_secs(900)),
        "the guest did not count:\n{}\n{}",
        vm.stdout_text(),
        vm.stderr_text()
    );
    (vm, disk, sock)
}

/// The numbers in /count.txt on a raw ext4 image (read with debugfs), and
/// the text they came from.
pub fn counts_on_disk(image: &Path) -> (Vec<u64>, String) {
    let cat = Command::new("debugfs")
        .args(["-R", "cat /count.txt"])
        .arg(image)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&cat.stdout).into_owned();
    let n = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
    (n, text)
}

/// The unprivileged account tests use to play a hostile local user
/// (scripts/install-deps.sh makes it; made here too when missing). None,
/// with the reason printed, when the tests do not run as root or it cannot
/// be made: the caller then says SKIPPED.
pub const TEST_USER: &str = "vireo-test";

pub fn unprivileged_user() -> Option<&'static str> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: acting as another user needs root (to run as {TEST_USER})");
        return None;
    }
    let exists = |u: &str| {
        Command::new("id")
            .arg(u)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !exists(TEST_USER) {
        let _ = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
            ])
            .arg(TEST_USER)
            .output();
    }
    if !exists(TEST_USER) {
        eprintln!("SKIPPED: no user {TEST_USER} and useradd could not make one");
        return None;
    }
    Some(TEST_USER)
}

/// `sh -c script` run as `user`; panics with its output if it fails.
pub fn as_user(user: &str, script: &str) {
    let out = Command::new("runuser")
        .args(["-u", user, "--", "sh", "-c", script])
        .output()
        .expect("runuser runs");
    assert!(out.status.success(), "as {user}: {script}: {out:?}");
}

/// What a migration destination says first: `vmm::migration::GREETING`,
/// whether it needs a key, a nonce (zeros here). Fake destinations in tests send it so that a
/// source gets as far as sending.
pub fn migration_greeting(key: bool) -> Vec<u8> {
    let mut g = vmm::migration::GREETING.to_vec();
    g.push(key as u8);
    g.extend_from_slice(&[0u8; 32]);
    g
}

/// A loopback TCP port nobody listens on now (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A network namespace made by a test (loopback up), removed on drop. The
/// name should carry the test's pid: a leftover of an interrupted run of
/// the same process id is removed first.
pub struct Netns(pub String);

impl Netns {
    pub fn new(name: String) -> Self {
        if Path::new("/run/netns").join(&name).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap();
        assert!(ok.success(), "ip netns add {name}");
        let ns = Netns(name);
        assert!(
            ns.ip(&["link", "set", "lo", "up"]),
            "ip -n {} link set lo up",
            ns.0
        );
        ns
    }

    /// `ip -n NS ARGS`: whether it succeeded.
    pub fn ip(&self, args: &[&str]) -> bool {
        Command::new("ip")
            .args(["-n", &self.0])
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// A TCP listener on `port` inside the namespace (the socket stays in
    /// it; the calling thread does not move).
    pub fn listen(&self, port: u16) -> std::net::TcpListener {
        let ns = self.0.clone();
        std::thread::spawn(move || {
            let f = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
            // SAFETY: setns on this short-lived thread only, with a
            // namespace descriptor we opened.
            let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
            std::net::TcpListener::bind(("0.0.0.0", port)).unwrap()
        })
        .join()
        .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}
