//! The gdb stub (`--gdb`, docs/debugging.md) driven by Debian's own `gdb
//! -batch`, against Debian's kernel, with addresses from the System.map
//! that guest/build.sh writes next to the vmlinux.
//!
//! - Engine: the guest is held until gdb attaches; a breakpoint on the
//!   uname system call (`__x64_sys_newuname`) hits each time the guest
//!   runs `uname`; `info registers` shows RIP there; memory read by virtual
//!   address through the guest's page tables matches the kernel image; a
//!   `stepi` moves RIP; `continue` from the breakpoint runs to the next
//!   hit; a hardware watchpoint on `jiffies` stops when a timer tick
//!   writes it; after delete and detach the guest finishes on its own: its
//!   command's output and exit code, and Vireo's exit code 0.
//! - KVM (on hosts where /dev/kvm opens): a whole boot does not reach
//!   userspace on the nested PVM hosts this project's machines are (README,
//!   "This machine's KVM"), so the KVM test stops earlier: over a Unix
//!   socket, a single step from the first instruction, a breakpoint (a
//!   debug register) on `start_kernel`, registers there, a step, and gdb's
//!   `kill`, which ends Vireo with exit code 0.
//!
//! Skipped, with a note, where gdb is not installed (scripts/install-deps.sh
//! installs it).

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn have_gdb() -> bool {
    let ok = Command::new("gdb")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!(
            "note: gdb is not installed (scripts/install-deps.sh installs it); gdb test skipped"
        );
    }
    ok
}

/// A symbol's address in the guest kernel's System.map.
fn symbol(name: &str) -> u64 {
    let map = guest_dir().join("System.map");
    let text = std::fs::read_to_string(&map).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: run guest/build.sh, which writes the kernel's System.map",
            map.display()
        )
    });
    text.lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (addr, _kind, sym) = (f.next()?, f.next()?, f.next()?);
            (sym == name).then(|| u64::from_str_radix(addr, 16).ok())?
        })
        .unwrap_or_else(|| panic!("{name} is not in {}", map.display()))
}

/// `len` bytes of the ELF file `path` at virtual address `va` (through its
/// program headers).
fn elf_bytes(path: &Path, va: u64, len: usize) -> Vec<u8> {
    let f = std::fs::read(path).unwrap();
    let u16_at = |o: usize| u16::from_le_bytes(f[o..o + 2].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(f[o..o + 8].try_into().unwrap());
    let (phoff, phentsize, phnum) = (u64_at(0x20) as usize, u16_at(0x36), u16_at(0x38));
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let (offset, vaddr, filesz) = (u64_at(ph + 8), u64_at(ph + 16), u64_at(ph + 32));
        if va >= vaddr && va + len as u64 <= vaddr + filesz {
            let o = (offset + va - vaddr) as usize;
            return f[o..o + len].to_vec();
        }
    }
    panic!("{va:#x} is not in a segment of {}", path.display());
}

/// Run gdb in batch mode on `commands`, within `limit`.
fn gdb(commands: &[String], limit: Duration) -> Output {
    let mut c = Command::new("timeout");
    c.arg(limit.as_secs().to_string())
        .args(["gdb", "-batch", "-nx"])
        .args(["-ex", "set pagination off", "-ex", "set confirm off"]);
    for cmd in commands {
        c.arg("-ex").arg(cmd);
    }
    c.stdin(Stdio::null()).output().expect("gdb runs")
}

/// The value `info registers rip` printed, for each time it ran.
fn rips(out: &str) -> Vec<u64> {
    out.lines()
        .filter_map(|l| l.strip_prefix("rip"))
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok())
        .collect()
}

/// Bytes as `x/Nxb` prints them.
fn xb(out: &str) -> Vec<u8> {
    out.lines()
        .filter(|l| l.starts_with("0x") && l.contains(':'))
        .flat_map(|l| l.split(':').nth(1).unwrap_or("").split_whitespace())
        .filter_map(|v| u8::from_str_radix(v.trim_start_matches("0x"), 16).ok())
        .collect()
}

fn spawn_held(accel: &str, gdb_addr: &str, cmdline: &str) -> Running {
    let g = guest_dir();
    let mut c = vireo();
    c.args(["run", "--accel", accel, "--memory", "512M", "--kernel"])
        .arg(g.join("vmlinux"))
        .arg("--initrd")
        .arg(g.join("initramfs.cpio.gz"))
        .arg("--cmdline")
        .arg(cmdline)
        .args(["--gdb", gdb_addr, "--gdb-wait"]);
    let mut vm = Running::spawn(c);
    let listening = wait_until(Duration::from_secs(60), || {
        vm.stderr_text().contains("gdb stub listening")
    });
    if !listening {
        vm.kill();
        panic!(
            "vireo did not start its gdb stub\n--- stderr:\n{}",
            vm.stderr_text()
        );
    }
    vm
}

#[test]
fn engine_gdb_breaks_on_uname_steps_and_detaches() {
    if !have_gdb() {
        return;
    }
    let uname = symbol("__x64_sys_newuname");
    let jiffies = symbol("jiffies");
    let port = free_port();
    // nokaslr: the kernel runs at the addresses System.map names (the
    // vmlinux entry does not relocate it anyway). Three unames: the first
    // hit is looked at and stepped, the next is reached from there, the
    // third by continuing from a breakpoint.
    let mut vm = spawn_held(
        "emu",
        &format!("tcp:127.0.0.1:{port}"),
        "console=ttyS0 reboot=k panic=1 nokaslr vireo.cmd=\"uname -r; uname -m; uname -s\"",
    );
    let next = uname + 5;
    let out = gdb(
        &[
            format!("target remote 127.0.0.1:{port}"),
            format!("break *{uname:#x}"),
            "continue".into(),
            "info registers rip".into(),
            format!("x/8xb {next:#x}"),
            "stepi".into(),
            "info registers rip".into(),
            "continue".into(),
            "continue".into(),
            "info registers rip".into(),
            // A hardware watchpoint (the engine's, not gdb's single-stepping
            // software one) on jiffies: the next timer tick writes it.
            format!("watch *(long *){jiffies:#x}"),
            "continue".into(),
            "delete".into(),
            "detach".into(),
        ],
        Duration::from_secs(900),
    );
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let code = vm.wait_exit(Duration::from_secs(600));
    let console = vm.stdout_text();
    let err = vm.stderr_text();
    vm.kill();
    let ctx = format!("\n--- gdb:\n{text}\n--- console:\n{console}\n--- vireo stderr:\n{err}");
    assert!(out.status.success(), "gdb failed{ctx}");
    let hits = text
        .matches(&format!("Breakpoint 1, {uname:#018x}"))
        .count();
    assert_eq!(hits, 3, "the uname breakpoint did not hit three times{ctx}");
    let r = rips(&text);
    assert_eq!(r.len(), 3, "three `info registers rip`{ctx}");
    assert_eq!(r[0], uname, "RIP at the breakpoint{ctx}");
    assert_ne!(r[1], uname, "stepi did not move RIP{ctx}");
    assert_eq!(r[2], uname, "RIP at the third hit{ctx}");
    // The bytes after the (boot-patched) ftrace call site are the kernel
    // image's: read by virtual address through the guest's page tables.
    let want = elf_bytes(&guest_dir().join("vmlinux"), next, 8);
    assert_eq!(xb(&text), want, "memory at {next:#x}{ctx}");
    assert!(
        text.contains(&format!("Hardware watchpoint 2: *(long *){jiffies:#x}")),
        "gdb did not set a hardware watchpoint{ctx}"
    );
    assert!(
        text.contains("Old value = ") && text.contains("New value = "),
        "the jiffies watchpoint did not trigger{ctx}"
    );
    assert!(text.contains("detached"), "gdb did not detach{ctx}");
    // The guest ran on by itself: its command's output, its exit code.
    let release = std::fs::read_to_string(guest_dir().join("kernel.version")).unwrap();
    let lines = command_output(&console);
    assert_eq!(
        lines,
        vec![release.trim().to_string(), "x86_64".into(), "Linux".into()],
        "the guest's uname output{ctx}"
    );
    assert!(
        console.contains("VIREO-CMD-END rc=0"),
        "guest exit code{ctx}"
    );
    assert_eq!(code, Some(0), "vireo's exit code{ctx}");
}

#[test]
fn kvm_gdb_steps_breaks_on_start_kernel_and_kills() {
    if !have_gdb() || !kvm_usable() {
        return;
    }
    let start_kernel = symbol("start_kernel");
    let dir = std::env::temp_dir().join(format!("vireo-gdb-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock: PathBuf = dir.join("gdb.sock");
    let mut vm = spawn_held(
        "kvm",
        &format!("unix:{}", sock.display()),
        "console=ttyS0 reboot=k panic=1 nokaslr",
    );
    let out = gdb(
        &[
            format!("target remote {}", sock.display()),
            "info registers rip".into(),
            "stepi".into(),
            "info registers rip".into(),
            format!("hbreak *{start_kernel:#x}"),
            "continue".into(),
            "info registers rip".into(),
            "stepi".into(),
            "info registers rip".into(),
            "kill".into(),
        ],
        Duration::from_secs(900),
    );
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let code = vm.wait_exit(Duration::from_secs(60));
    let err = vm.stderr_text();
    vm.kill();
    let _ = std::fs::remove_dir_all(&dir);
    let ctx = format!("\n--- gdb:\n{text}\n--- vireo stderr:\n{err}");
    let r = rips(&text);
    assert_eq!(r.len(), 4, "four `info registers rip`{ctx}");
    assert_ne!(r[0], r[1], "stepi from the entry did not move RIP{ctx}");
    assert_eq!(
        r[2], start_kernel,
        "RIP at the start_kernel breakpoint{ctx}"
    );
    assert_ne!(r[3], start_kernel, "stepi did not move RIP{ctx}");
    assert!(
        text.contains(&format!("Breakpoint 1, {start_kernel:#018x}")),
        "the breakpoint was not reported as such{ctx}"
    );
    assert!(
        err.contains("killed from gdb"),
        "gdb's kill did not end the VM{ctx}"
    );
    assert_eq!(code, Some(0), "vireo's exit code after gdb's kill{ctx}");
}
