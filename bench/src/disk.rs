//! `bench disk-boot`: an installed system booting from its own disk, Vireo
//! beside QEMU in the same run. Both VMMs boot the Debian 12 disk image of
//! guest/build-disk.sh through the same SeaBIOS image (Debian's
//! `bios-256k.bin`), GRUB, the image's kernel and systemd, with the same
//! NoCloud seed (made by Vireo's own seed builder, so both read the same
//! bytes) and a fresh qcow2 overlay per run, so every run is a first boot
//! with all of cloud-init's stages. The bench times, by the host's clock
//! from spawning the VMM, the serial login prompt (which carries the
//! hostname cloud-init set) and the VMM's exit after it logs in as root and
//! runs `poweroff`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::guest::Accel;
use super::{
    interleave, peer_runs, print_peer_absent, print_series, vmm_series, BenchArgs, Col, Vireo,
};

/// The image guest/build-disk.sh makes, and its root password
/// (docs/disk-images.md).
const IMAGE: &str = "debian-12.qcow2";
const ROOT_PASSWORD: &str = "vireo";
/// The firmware both VMMs boot (Debian's seabios package), unless
/// `--firmware` names another.
const DEFAULT_FIRMWARE: &str = "/usr/share/seabios/bios-256k.bin";
/// meta-data's hostname: the login prompt must show it.
const HOSTNAME: &str = "vireo-bench";
const MEMORY: &str = "1G";
/// COM1, as Vireo's fw_cfg gives SeaBIOS (`etc/sercon-port`).
const SERCON_PORT: u16 = 0x3f8;

/// One boot's times from spawning the VMM.
struct DiskSample {
    login: Duration,
    off: Duration,
}

/// What both VMMs are given.
struct Setup {
    dir: PathBuf,
    base: PathBuf,
    firmware: PathBuf,
    seed: PathBuf,
    /// QEMU's `etc/sercon-port` contents (Vireo sets it itself).
    sercon: PathBuf,
}

impl Setup {
    fn new(args: &BenchArgs) -> Result<Setup> {
        let g = args
            .guest_dir
            .clone()
            .or_else(|| std::env::var_os("VIREO_GUEST_DIR").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("guest/out"));
        let base = g.join(IMAGE);
        if !base.is_file() {
            bail!(
                "no {} (run guest/build-disk.sh {} as root)",
                base.display(),
                g.display()
            );
        }
        let firmware = args
            .firmware
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_FIRMWARE));
        if !firmware.is_file() {
            bail!(
                "no firmware at {} (install Debian's seabios, or give --firmware PATH)",
                firmware.display()
            );
        }
        let dir = std::env::temp_dir().join(format!("vireo-bench-disk-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let user_data = dir.join("user-data");
        std::fs::write(
            &user_data,
            "#cloud-config\nruncmd:\n  - echo \"runcmd ran\" > /var/tmp/vireo-runcmd\n",
        )?;
        let meta_data = dir.join("meta-data");
        std::fs::write(
            &meta_data,
            format!("instance-id: vireo-bench-1\nlocal-hostname: {HOSTNAME}\n"),
        )?;
        let cfg = vmm::cloud_init::CloudInitConfig {
            user_data,
            meta_data: Some(meta_data),
            network_config: None,
        };
        let image = vmm::cloud_init::Seed::load(&cfg)?.to_image()?;
        let seed = dir.join("seed.img");
        std::fs::write(&seed, image)?;
        let sercon = dir.join("sercon-port");
        std::fs::write(&sercon, SERCON_PORT.to_le_bytes())?;
        Ok(Setup {
            dir,
            base: base.canonicalize()?,
            firmware,
            seed,
            sercon,
        })
    }

    /// A new qcow2 overlay over the base image: each run is a first boot
    /// and the base is never written.
    fn overlay(&self, name: &str) -> Result<PathBuf> {
        let o = self.dir.join(format!("{name}.qcow2"));
        let _ = std::fs::remove_file(&o);
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&self.base)
            .arg(&o)
            .output()
            .context("running qemu-img (install qemu-utils)")?;
        if !out.status.success() {
            bail!(
                "qemu-img create: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(o)
    }

    fn vireo(&self, vireo: &Vireo, overlay: &Path) -> Command {
        let mut c = vireo.command();
        c.args(["run", "--accel", Accel::Emu.vireo(), "--memory", MEMORY])
            .arg("--firmware")
            .arg(&self.firmware)
            .arg("--disk")
            .arg(format!("path={},format=qcow2", overlay.display()))
            // The seed file itself, as `--cloud-init` would make it:
            // attached read-only after the system disk with serial cidata.
            .arg("--disk")
            .arg(format!(
                "path={},format=raw,readonly=on,serial=cidata",
                self.seed.display()
            ));
        c
    }

    fn qemu(&self, qemu: &str, overlay: &Path) -> Command {
        let mut c = Command::new(qemu);
        c.args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            "stdio",
            "-M",
            "pc",
            "-accel",
            "tcg",
            "-m",
            MEMORY,
            "-bios",
        ])
        .arg(&self.firmware)
        .arg("-fw_cfg")
        .arg(format!(
            "name=etc/sercon-port,file={}",
            self.sercon.display()
        ))
        .arg("-drive")
        .arg(format!(
            "file={},if=none,id=disk0,format=qcow2",
            overlay.display()
        ))
        .args(["-device", "virtio-blk-pci,drive=disk0"])
        .arg("-drive")
        .arg(format!(
            "file={},if=none,id=seed,format=raw,readonly=on",
            self.seed.display()
        ))
        .args(["-device", "virtio-blk-pci,drive=seed,serial=cidata"]);
        c
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A VMM whose serial console is this process's pipe both ways.
struct Vm {
    child: Child,
    stdin: ChildStdin,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
    start: Instant,
    deadline: Instant,
}

fn drain(mut r: impl Read + Send + 'static, into: Arc<Mutex<Vec<u8>>>) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            into.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
}

impl Vm {
    fn spawn(mut cmd: Command, limit: Duration) -> Result<Vm> {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let start = Instant::now();
        let mut child = cmd.spawn().context("spawning the VMM")?;
        let stdin = child.stdin.take().context("no stdin")?;
        let (out, err) = (Arc::default(), Arc::default());
        drain(child.stdout.take().context("no stdout")?, Arc::clone(&out));
        drain(child.stderr.take().context("no stderr")?, Arc::clone(&err));
        Ok(Vm {
            child,
            stdin,
            out,
            err,
            start,
            deadline: start + limit,
        })
    }

    /// Why the VM is of no more use, with the end of its console and the
    /// first line of its stderr.
    fn failure(&mut self, what: &str) -> anyhow::Error {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let out = self.out.lock().unwrap();
        let tail = String::from_utf8_lossy(&out[out.len().saturating_sub(600)..]).into_owned();
        let err = String::from_utf8_lossy(&self.err.lock().unwrap()).into_owned();
        let err = err.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        anyhow::anyhow!(
            "{what} after {:.0} s; stderr: {err}; console ends: {}",
            self.start.elapsed().as_secs_f64(),
            tail.replace(['\r', '\n'], " ")
        )
    }

    /// Wait until `needle` appears after byte `from` of the console; the
    /// offset just past it.
    fn expect(&mut self, from: usize, needle: &str) -> Result<usize> {
        loop {
            {
                let out = self.out.lock().unwrap();
                if let Some(i) = out
                    .get(from..)
                    .and_then(|s| s.windows(needle.len()).position(|w| w == needle.as_bytes()))
                {
                    return Ok(from + i + needle.len());
                }
            }
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return Err(self.failure(&format!("the VMM exited before '{needle}'")));
            }
            if Instant::now() >= self.deadline {
                return Err(self.failure(&format!("timed out waiting for '{needle}' (killed)")));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn send(&mut self, line: &str) -> Result<()> {
        self.stdin.write_all(line.as_bytes())?;
        self.stdin.write_all(b"\n")?;
        self.stdin.flush()?;
        Ok(())
    }

    /// Wait for the VMM to exit; it must exit with status 0.
    fn wait_exit(&mut self) -> Result<Duration> {
        loop {
            match self.child.try_wait()? {
                Some(s) if s.success() => return Ok(self.start.elapsed()),
                Some(s) => return Err(self.failure(&format!("the VMM ended with {s}"))),
                None if Instant::now() >= self.deadline => {
                    return Err(self.failure("timed out waiting for power-off (killed)"))
                }
                None => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

/// Boot to the login prompt, log in, power off.
fn disk_boot_once(cmd: Command, limit: Duration) -> Result<DiskSample> {
    let mut vm = Vm::spawn(cmd, limit)?;
    let at = vm.expect(0, &format!("{HOSTNAME} login:"))?;
    let login = vm.start.elapsed();
    vm.send("root")?;
    let at = vm.expect(at, "Password:")?;
    vm.send(ROOT_PASSWORD)?;
    vm.expect(at, &format!("root@{HOSTNAME}:"))?;
    vm.send("poweroff")?;
    let off = vm.wait_exit()?;
    Ok(DiskSample { login, off })
}

/// Vireo's engine beside QEMU TCG, each booting the disk image to the login
/// prompt and to power-off, taking turns; the medians and their ratio.
pub fn disk_boot(args: &BenchArgs, runs: usize) -> Result<()> {
    if args.accel != Accel::Emu {
        bail!("disk-boot runs under the engine beside QEMU TCG only (--accel emu)");
    }
    let setup = Setup::new(args)?;
    let limit = args.timeout();
    println!(
        "disk-boot: Debian 12 disk image (guest/build-disk.sh) through SeaBIOS ({}), GRUB, its kernel, \
         systemd and cloud-init's first boot to the serial login prompt, then logged in and powered off; \
         a fresh qcow2 overlay per run, {MEMORY} RAM, 1 vCPU; wall time from spawning the VMM, median of \
         {runs} runs, the VMMs taking turns",
        setup.firmware.display()
    );
    let have_qemu = peer_runs(args);
    let setup = &setup;
    let mut series = vmm_series(
        args,
        have_qemu,
        move |i, v| Ok(setup.vireo(v, &setup.overlay(&format!("vireo-{i}"))?)),
        move || Ok(setup.qemu(&args.qemu, &setup.overlay("qemu")?)),
    );
    interleave(&mut series, runs, &|c| {
        let s = disk_boot_once(c, limit)?;
        Ok(vec![s.login.as_secs_f64(), s.off.as_secs_f64()])
    });
    print_series(
        &series,
        &[
            Col::new("login prompt", 14, |x| format!("{x:.1} s")),
            Col::new("power-off", 12, |x| format!("{x:.1} s")),
        ],
        "VMM",
    );
    print_peer_absent(args, have_qemu);
    Ok(())
}
