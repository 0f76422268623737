//! Debian's own kernel on Vireo's CPU engine (`--accel emu`): boot to the
//! busybox userspace, run a command there and check what the guest itself
//! reports, then power off (exit 0). Also the paravirtual devices the guest
//! drives with its own virtio modules: virtio-blk on raw and qcow2 images,
//! virtio-net on a tap and virtio-rng, all on PCI with MSI-X.
//!
//! `VIREO_TEST_ACCEL=kvm` runs the same tests under KVM (the opt-in slow
//! target does, on hosts whose KVM can boot Debian: see scripts/test.sh).

mod common;

use common::stream::{relay, relay_command};
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The accelerator these tests run under: the engine unless
/// `VIREO_TEST_ACCEL` says otherwise.
fn accel() -> String {
    std::env::var("VIREO_TEST_ACCEL").unwrap_or_else(|_| "emu".into())
}

/// Boot with the test initramfs; `cmd` runs in the guest. Returns the exit
/// code and the console.
fn boot(kernel: &str, extra: &[&str], cmd: &str) -> (Option<i32>, String, String) {
    let g = guest_dir();
    let mut c = vireo();
    c.args(["run", "--accel", &accel(), "--memory", "512M", "--kernel"])
        .arg(g.join(kernel))
        .arg("--initrd")
        .arg(g.join("initramfs.cpio.gz"))
        .arg("--cmdline")
        .arg(format!(
            "console=ttyS0 reboot=k panic=1 vireo.cmd=\"{cmd}\""
        ))
        .args(extra);
    let mut vm = Running::spawn(c);
    let code = vm.wait_exit(Duration::from_secs(900));
    (code, vm.stdout_text(), vm.stderr_text())
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vireo-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An ext4 image made with `mkfs.ext4 -d` holding a 300 KB file; its sha256.
fn ext4_image(dir: &Path) -> (PathBuf, String) {
    let root = dir.join("root");
    std::fs::create_dir_all(&root).unwrap();
    let blob: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(root.join("blob.bin"), &blob).unwrap();
    let img = dir.join("disk.img");
    sh(&format!(
        "mkfs.ext4 -q -d {} -F {} 32M",
        root.display(),
        img.display()
    ));
    let sum = sh(&format!("sha256sum {}", root.join("blob.bin").display()));
    (img, sum.split_whitespace().next().unwrap().to_string())
}

const DISK_SCRIPT: &str = "mount /dev/vda /mnt && sha256sum /mnt/blob.bin && \
    echo written-by-the-guest > /mnt/guest.txt && sync && umount /mnt";

#[test]
fn vmlinux_boots_to_userspace_on_two_vcpus_and_powers_off() {
    let g = guest_dir();
    let want = std::fs::read_to_string(g.join("data.bin.md5")).unwrap();
    let (code, out, err) = boot(
        "vmlinux",
        &["--cpus", "2"],
        "md5sum /vireo/data.bin; nproc; cat /sys/devices/system/cpu/online",
    );
    assert_eq!(code, Some(0), "exit {code:?}\n{out}\n{err}");
    let lines = command_output(&out);
    assert_eq!(
        lines.first().map(String::as_str),
        Some(want.trim()),
        "{out}"
    );
    assert_eq!(lines.get(1).map(String::as_str), Some("2"), "{out}");
    assert_eq!(lines.get(2).map(String::as_str), Some("0-1"), "{out}");
    assert!(out.contains("VIREO-CMD-END rc=0"));
    assert!(err.contains("guest powered off"), "{err}");
}

/// Paravirtual spinlocks (KVM's PV_UNHALT and KICK_CPU): the guest kernel
/// finds the feature and turns them on, then both vCPUs fork and exec
/// hundreds of programs at once, which contends the kernel's locks across
/// them (a waiter halts, with interrupts off when it took the lock so, and
/// the unlocker's hypercall wakes it). One lost kick would leave a vCPU
/// halted for good and the command would never end.
#[test]
fn pv_spinlocks_on_two_vcpus_under_contended_kernel_locks() {
    let (code, out, err) = boot(
        "vmlinux",
        &["--cpus", "2"],
        // ([e]: the pattern must not match the command line dmesg shows.)
        "dmesg | grep -o 'kvm-guest: PV spinlocks [e]nabled'; \
         for c in 0 1; do taskset -c $c sh -c \
         'for i in $(seq 300); do vireo-io cpu 1000 >/dev/null || exit 1; done; echo loop-done' & \
         done; wait",
    );
    assert_eq!(code, Some(0), "exit {code:?}\n{out}\n{err}");
    assert_eq!(
        command_output(&out),
        vec!["kvm-guest: PV spinlocks enabled", "loop-done", "loop-done"],
        "{out}"
    );
    assert!(out.contains("VIREO-CMD-END rc=0"), "{out}");
}

#[test]
fn bzimage_decompresses_itself_and_boots() {
    let (code, out, err) = boot("vmlinuz", &[], "uname -r");
    assert_eq!(code, Some(0), "exit {code:?}\n{out}\n{err}");
    let g = guest_dir();
    let version = std::fs::read_to_string(g.join("kernel.version")).unwrap();
    assert_eq!(
        command_output(&out),
        vec![version.trim().to_string()],
        "{out}"
    );
}

/// virtio-blk on a raw ext4 image and virtio-rng: the guest reads a file
/// whose sha256 the host knows, writes one, syncs; the host finds it.
#[test]
fn virtio_blk_raw_ext4_round_trip_and_virtio_rng() {
    let dir = scratch("blk-raw");
    let (img, sum) = ext4_image(&dir);
    let disk = format!("path={},format=raw,serial=vireo-test-disk", img.display());
    let (code, out, err) = boot(
        "vmlinux",
        &["--disk", &disk, "--rng"],
        &format!(
            "cat /sys/class/misc/hw_random/rng_current; cat /sys/block/vda/serial; echo; {DISK_SCRIPT}"
        ),
    );
    assert_eq!(code, Some(0), "exit {code:?}\n{out}\n{err}");
    let lines = command_output(&out);
    assert_eq!(lines[0], "virtio_rng.0", "{out}");
    assert_eq!(lines[1], "vireo-test-disk", "{out}");
    assert!(
        lines.iter().any(|l| l.starts_with(&sum)),
        "sha256 {sum} not in {lines:?}"
    );
    let written = sh(&format!(
        "debugfs -R 'cat /guest.txt' {} 2>/dev/null",
        img.display()
    ));
    assert_eq!(written.trim(), "written-by-the-guest");
    sh(&format!("e2fsck -fn {}", img.display()));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A qcow2 overlay over a raw base (a linked clone): the guest's writes land
/// in the overlay, `qemu-img check` finds it clean, the base is unchanged.
#[test]
fn virtio_blk_qcow2_overlay_keeps_the_base_intact() {
    let dir = scratch("blk-qcow2");
    let (base, sum) = ext4_image(&dir);
    let base_sum_before = sh(&format!("sha256sum {}", base.display()));
    let overlay = dir.join("overlay.qcow2");
    sh(&format!(
        "qemu-img create -q -f qcow2 -b {} -F raw {}",
        base.display(),
        overlay.display()
    ));
    let disk = format!("path={},format=qcow2", overlay.display());
    let (code, out, err) = boot("vmlinux", &["--disk", &disk], DISK_SCRIPT);
    assert_eq!(code, Some(0), "exit {code:?}\n{out}\n{err}");
    let lines = command_output(&out);
    assert!(
        lines.iter().any(|l| l.starts_with(&sum)),
        "sha256 {sum} not in {lines:?}"
    );
    sh(&format!("qemu-img check -q {}", overlay.display()));
    assert_eq!(
        sh(&format!("sha256sum {}", base.display())),
        base_sum_before
    );
    let flat = dir.join("flat.img");
    sh(&format!(
        "qemu-img convert -O raw {} {}",
        overlay.display(),
        flat.display()
    ));
    let written = sh(&format!(
        "debugfs -R 'cat /guest.txt' {} 2>/dev/null",
        flat.display()
    ));
    assert_eq!(written.trim(), "written-by-the-guest");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Serve, from inside namespace `ns`: on port 5555 receive `len` bytes (the
/// guest's upload) into a file; on port 5556 send `data` (the download).
fn tcp_peer(
    ns: &str,
    addr: &str,
    len: usize,
    data: Vec<u8>,
    upload: PathBuf,
) -> std::thread::JoinHandle<Result<(), String>> {
    let (ns, addr) = (ns.to_string(), addr.to_string());
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        let f = std::fs::File::open(format!("/run/netns/{ns}")).map_err(|e| e.to_string())?;
        // SAFETY: setns on this thread only, with a namespace fd we opened.
        if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) } != 0 {
            return Err(format!("setns: {}", std::io::Error::last_os_error()));
        }
        let bind = |port: u16| {
            let l =
                std::net::TcpListener::bind((addr.as_str(), port)).map_err(|e| e.to_string())?;
            l.set_nonblocking(true).map_err(|e| e.to_string())?;
            Ok::<_, String>(l)
        };
        let accept = |l: &std::net::TcpListener| {
            let deadline = std::time::Instant::now() + Duration::from_secs(600);
            loop {
                match l.accept() {
                    Ok((s, _)) => {
                        s.set_nonblocking(false).map_err(|e| e.to_string())?;
                        s.set_read_timeout(Some(Duration::from_secs(120)))
                            .map_err(|e| e.to_string())?;
                        return Ok::<_, String>(s);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if std::time::Instant::now() > deadline {
                            return Err("the guest never connected".into());
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
        };
        let (up, down) = (bind(5555)?, bind(5556)?);
        let mut s = accept(&up)?;
        let mut got = vec![0u8; len];
        s.read_exact(&mut got).map_err(|e| format!("upload: {e}"))?;
        std::fs::write(&upload, &got).map_err(|e| e.to_string())?;
        drop(s);
        let mut s = accept(&down)?;
        s.write_all(&data).map_err(|e| format!("download: {e}"))?;
        Ok(())
    })
}

/// virtio-net on a tap that Vireo creates inside a namespace made by the
/// test: the guest configures eth0, pings the host side, uploads a 1 MiB
/// file over TCP and downloads it back; both checksums must match the
/// host's. Needs root (namespaces, taps); says so and skips otherwise.
#[test]
fn virtio_net_ping_and_tcp_both_ways_through_a_tap() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/net/tun").exists() {
        eprintln!("note: needs root and /dev/net/tun; network test skipped");
        return;
    }
    let g = guest_dir();
    let data = std::fs::read(g.join("data.bin")).unwrap();
    let md5 = std::fs::read_to_string(g.join("data.bin.md5")).unwrap();
    let md5 = md5.split_whitespace().next().unwrap().to_string();
    let dir = scratch("net");
    let ns = Netns::new(format!("vireo-nt{}", std::process::id()));
    let tap = format!("vt{}", std::process::id() % 100_000);
    let (host_ip, guest_ip) = ("10.213.1.1", "10.213.1.2");

    let cmd = format!(
        "ip link set eth0 up && ip addr add {guest_ip}/24 dev eth0 && \
         ping -c 3 -W 10 {host_ip} && nc {host_ip} 5555 < /vireo/data.bin; \
         nc {host_ip} 5556 | md5sum"
    );
    let mut vm = tap_vm(&ns, &format!("tap={tap},mac=52:54:00:12:34:56"), &cmd);
    // Vireo made the tap inside the namespace and brought it up; give the
    // host side its address, then listen.
    wait_for_tap(&ns, &tap, &vm, Duration::from_secs(30));
    sh(&format!("ip -n {} addr add {host_ip}/24 dev {tap}", ns.0));
    let upload = dir.join("upload.bin");
    let peer = tcp_peer(&ns.0, host_ip, data.len(), data.clone(), upload.clone());

    let code = vm.wait_exit(Duration::from_secs(300));
    let out = vm.stdout_text();
    assert_eq!(code, Some(0), "exit {code:?}\n{out}\n{}", vm.stderr_text());
    peer.join().unwrap().expect("the host side of the transfer");
    let lines = command_output(&out);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("3 packets transmitted, 3 packets received")),
        "ping failed: {lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with(&md5)),
        "download md5 {md5} not in {lines:?}"
    );
    assert_eq!(
        std::fs::read(&upload).unwrap(),
        data,
        "the upload arrived changed"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Hundreds of MiB through a tap with merged receive buffers on
/// (`mrg_rxbuf=on`; a tap's default is off): the host sends a 256 MiB
/// stream, the guest sums what arrived (busybox `crc32`) while sending it
/// all back, and the host checks both the sum and every byte it gets back.
/// This is the path whose 64 KiB frames once waited for the guest's
/// notify forever (a frame spread over many small buffers). Needs root
/// (namespaces, taps); says so and skips otherwise.
#[test]
fn virtio_net_hundreds_of_mib_both_ways_through_a_tap_with_merged_buffers() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/net/tun").exists() {
        eprintln!("note: needs root and /dev/net/tun; network test skipped");
        return;
    }
    const LEN: u64 = 256 << 20;
    const SEED: u64 = 0x9e37_79b9_7f4a_7c15;
    let ns = Netns::new(format!("vireo-nm{}", std::process::id()));
    let tap = format!("vm{}", std::process::id() % 100_000);
    let (host_ip, guest_ip) = ("10.213.2.1", "10.213.2.2");
    // The guest reports the negotiated feature bit (15: MRG_RXBUF), then
    // relays the stream back.
    let cmd = format!(
        "ip link set eth0 up && ip addr add {guest_ip}/24 dev eth0 && \
         echo mrg_rxbuf=$(cut -c16 /sys/class/net/eth0/device/features) && {}",
        relay_command(host_ip, 5555, 5556)
    );
    let mut vm = tap_vm(
        &ns,
        &format!("tap={tap},mac=52:54:00:12:34:57,mrg_rxbuf=on"),
        &cmd,
    );
    wait_for_tap(&ns, &tap, &vm, Duration::from_secs(60));
    sh(&format!("ip -n {} addr add {host_ip}/24 dev {tap}", ns.0));
    let (sender, receiver) = relay(ns.listen(5555), ns.listen(5556), LEN, SEED);
    let code = vm.wait_exit(Duration::from_secs(1800));
    let out = vm.stdout_text();
    assert_eq!(code, Some(0), "exit {code:?}\n{out}\n{}", vm.stderr_text());
    let lines = command_output(&out);
    let sum = sender
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("the host's send: {e}; guest: {lines:?}"));
    if let Err(e) = receiver.join().unwrap() {
        panic!("the stream the guest sent back: {e}; guest: {lines:?}");
    }
    assert!(
        lines.iter().any(|l| l == "mrg_rxbuf=1"),
        "the guest did not negotiate merged receive buffers: {lines:?}"
    );
    let want = format!("sum={sum:08x}");
    assert!(
        lines.iter().any(|l| l.starts_with(&want)),
        "the guest's crc32 of what arrived: want {want:?} in {lines:?}"
    );
}

/// `vireo run` of the test guest inside `ns` with one NIC (`net`, the
/// `--net` value), running `cmd` in the guest.
fn tap_vm(ns: &Netns, net: &str, cmd: &str) -> Running {
    let g = guest_dir();
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns.0])
        .arg(env!("CARGO_BIN_EXE_vireo"))
        .args(["run", "--accel", &accel(), "--memory", "512M", "--kernel"])
        .arg(g.join("vmlinux"))
        .arg("--initrd")
        .arg(g.join("initramfs.cpio.gz"))
        .arg("--net")
        .arg(net)
        .arg("--cmdline")
        .arg(format!(
            "console=ttyS0 reboot=k panic=1 vireo.cmd=\"{cmd}\""
        ));
    Running::spawn(c)
}

/// Wait (up to `limit`) until Vireo has made `tap` inside `ns`.
fn wait_for_tap(ns: &Netns, tap: &str, vm: &Running, limit: Duration) {
    let start = std::time::Instant::now();
    while !ns.ip(&["link", "show", tap]) {
        assert!(
            start.elapsed() < limit,
            "no tap {tap}: {}",
            vm.stderr_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
