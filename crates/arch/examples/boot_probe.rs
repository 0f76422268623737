//! Boots a kernel with `arch`'s loader and tables on one KVM vCPU, printing
//! what the guest writes to the serial port, to see what a real kernel
//! makes of the boot set-up (e820, ACPI, MP table, entry state) before the
//! VMM exists. Not a VMM: no devices beyond a write-only UART stub.
//!
//! ```text
//! cargo run -p arch --example boot_probe -- KERNEL [--pvh] [--cpus N] [--mem MIB]
//!     [--initrd FILE] [--timeout SECS] [--until TEXT] [--append "ARGS"]
//! ```

use std::io::Write;
use std::time::{Duration, Instant};

use hypervisor::kvm::KvmHypervisor;
use hypervisor::GuestRam;
use hypervisor::{Hypervisor, VcpuExit};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

struct Args {
    kernel: String,
    pvh: bool,
    cpus: u32,
    mem_mib: u64,
    initrd: Option<String>,
    timeout: u64,
    until: Option<String>,
    append: String,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mut a = Args {
        kernel: String::new(),
        pvh: false,
        cpus: 1,
        mem_mib: 256,
        initrd: None,
        timeout: 120,
        until: None,
        append: String::new(),
    };
    while let Some(arg) = it.next() {
        let mut val = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--pvh" => a.pvh = true,
            "--cpus" => a.cpus = val("--cpus")?.parse().map_err(|e| format!("--cpus: {e}"))?,
            "--mem" => a.mem_mib = val("--mem")?.parse().map_err(|e| format!("--mem: {e}"))?,
            "--initrd" => a.initrd = Some(val("--initrd")?),
            "--timeout" => {
                a.timeout = val("--timeout")?
                    .parse()
                    .map_err(|e| format!("--timeout: {e}"))?
            }
            "--until" => a.until = Some(val("--until")?),
            "--append" => a.append = val("--append")?,
            k if !k.starts_with("--") && a.kernel.is_empty() => a.kernel = k.to_string(),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.kernel.is_empty() {
        return Err("usage: boot_probe KERNEL [--pvh] [--cpus N] [--mem MIB] [--initrd FILE] [--timeout SECS] [--until TEXT] [--append ARGS]".into());
    }
    Ok(a)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("boot_probe: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let args = parse_args()?;
    let hv = KvmHypervisor::new().map_err(|e| e.to_string())?;
    let mem =
        GuestRam::from_ranges(&arch::ram_regions(args.mem_mib << 20)).map_err(|e| e.to_string())?;
    let mut kf = std::fs::File::open(&args.kernel).map_err(|e| format!("{}: {e}", args.kernel))?;
    let kernel = arch::load_kernel(&mem, &mut kf).map_err(|e| e.to_string())?;
    let initrd = match &args.initrd {
        Some(p) => Some(std::fs::read(p).map_err(|e| format!("{p}: {e}"))?),
        None => None,
    };
    let mut cmdline = format!(
        "console=ttyS0 earlyprintk=serial,ttyS0 keep_bootcon {}",
        args.append
    );
    for w in hv.guest_workarounds() {
        cmdline.push(' ');
        cmdline.push_str(&w);
    }
    let cfg = arch::BootConfig {
        cmdline: cmdline.trim(),
        initrd: initrd.as_deref(),
        num_cpus: args.cpus,
        protocol: if args.pvh {
            arch::EntryProtocol::Pvh
        } else {
            arch::EntryProtocol::Linux64
        },
    };
    let state = arch::configure_system(&mem, &kernel, &cfg).map_err(|e| e.to_string())?;
    eprintln!(
        "boot_probe: {:?} kernel, entry {:#x}, end {:#x}, cmdline {:?}",
        kernel.kind, state.regs.rip, kernel.end.0, cfg.cmdline
    );

    let vm = hv.create_vm().map_err(|e| e.to_string())?;
    for (slot, region) in mem.iter().enumerate() {
        // SAFETY: `mem` lives until the end of this function, after the VM.
        unsafe {
            vm.map_memory(
                slot as u32,
                region.start_addr().0,
                region.len(),
                region.as_ptr() as u64,
            )
        }
        .map_err(|e| e.to_string())?;
    }
    let mut vcpu = vm.create_vcpu(0, args.cpus).map_err(|e| e.to_string())?;
    vcpu.set_boot_state(&state).map_err(|e| e.to_string())?;

    let start = Instant::now();
    let deadline = start + Duration::from_secs(args.timeout);
    // A guest busy without exits (a bzImage decompressing) never returns
    // from run(): kick it at the deadline.
    let kicker = vcpu.kicker();
    let timeout = args.timeout;
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(timeout));
        kicker.kick();
    });
    let mut line = Vec::new();
    let mut stdout = std::io::stdout();
    let mut cmos_index = 0u8;
    loop {
        if Instant::now() > deadline {
            let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
            eprintln!(
                "\nboot_probe: timeout after {} s (RIP {rip:#x})",
                args.timeout
            );
            return Ok(());
        }
        match vcpu.run().map_err(|e| e.to_string())? {
            VcpuExit::IoOut { port: 0x3f8, data } => {
                for &b in data.iter() {
                    line.push(b);
                    if b == b'\n' {
                        let text = String::from_utf8_lossy(&line);
                        let _ = write!(stdout, "[{:7.3}] {text}", start.elapsed().as_secs_f64());
                        let _ = stdout.flush();
                        if let Some(u) = &args.until {
                            if text.contains(u.as_str()) {
                                return Ok(());
                            }
                        }
                        line.clear();
                    }
                }
            }
            VcpuExit::IoOut { port: 0x70, data } => cmos_index = data[0] & 0x7f,
            VcpuExit::IoOut { port, data } => {
                if port == 0xcf9 && data[0] == 6
                    || port == 0x604 && data.len() == 2 && data[1] & 0x20 != 0
                {
                    eprintln!("\nboot_probe: guest asked for reset/poweroff (port {port:#x})");
                    return Ok(());
                }
            }
            VcpuExit::IoIn { port, data } => {
                let v = match port {
                    0x3fd => 0x60, // LSR: transmitter empty
                    0x71 => match cmos_index {
                        0x0b => 0x02, // 24-hour, BCD
                        0x0d => 0x80, // battery good
                        _ => 0,
                    },
                    _ => 0xff,
                };
                data.fill(v);
            }
            VcpuExit::MmioRead { data, .. } => data.fill(0xff),
            VcpuExit::MmioWrite { .. } | VcpuExit::Interrupted => {}
            other => {
                eprintln!(
                    "\nboot_probe: stopped on {other:?} after {:.1} s",
                    start.elapsed().as_secs_f64()
                );
                return Ok(());
            }
        }
    }
}
