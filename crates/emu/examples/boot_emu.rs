//! Boots a kernel on the software engine with `arch`'s loader and tables,
//! printing the serial console, to see how far a real kernel gets and which
//! instruction stops it. Not a VMM: no devices beyond a write-only UART stub;
//! with `--platform` the `emu-platform` interrupt controllers and timers
//! (LAPIC, IOAPIC, PIC, PIT) are plugged in on a wall clock.
//!
//! ```text
//! cargo run --release -p emu --example boot_emu -- VMLINUX [--pvh] [--mem MIB]
//!     [--initrd FILE] [--timeout SECS] [--append "ARGS"] [--platform]
//! ```
//!
//! `EMU_TRACE=1` prints every block start; `EMU_HISTORY=1` prints the last
//! blocks and exceptions when the run ends.

use std::io::Write;
use std::time::{Duration, Instant};

use std::sync::Arc;

use emu::irq::{InterruptController, MsrFault};
use emu_platform::{
    GuestClock, Platform, PlatformConfig, PvClock, PvClockWallClock, SharedPlatform,
};
use hypervisor::{Vcpu, VcpuExit, Vm};

/// Guest time = host wall time since start; the TSC runs at 1 GHz.
struct WallClock(Instant);

impl GuestClock for WallClock {
    fn now_ns(&self) -> u64 {
        self.0.elapsed().as_nanos() as u64
    }
    fn tsc(&self) -> u64 {
        self.now_ns()
    }
}

/// The platform models as the engine's interrupt controller.
struct PlatformIrq(Arc<SharedPlatform>);

impl InterruptController for PlatformIrq {
    fn trigger_gsi(&self, gsi: u32) {
        self.0.trigger_gsi(gsi)
    }
    fn pending_vector(&self, vcpu: u32) -> Option<u8> {
        self.0.pending_vector(vcpu)
    }
    fn ack(&self, vcpu: u32, vector: u8) -> Option<u8> {
        self.0.ack(vcpu, vector)
    }
    fn take_nmi(&self, vcpu: u32) -> bool {
        self.0.take_nmi(vcpu)
    }
    fn has_pending(&self, vcpu: u32) -> bool {
        self.0.has_pending(vcpu)
    }
    fn set_tpr(&self, vcpu: u32, cr8: u8) {
        self.0.set_tpr(vcpu, cr8)
    }
    fn tpr(&self, vcpu: u32) -> Option<u8> {
        Some(self.0.tpr(vcpu))
    }
    fn rdmsr(&self, vcpu: u32, msr: u32) -> Option<Result<u64, MsrFault>> {
        self.0.rdmsr(vcpu, msr).map(|r| r.map_err(|_| MsrFault))
    }
    fn wrmsr(&self, vcpu: u32, msr: u32, value: u64) -> Option<Result<(), MsrFault>> {
        self.0
            .wrmsr(vcpu, msr, value)
            .map(|r| r.map_err(|_| MsrFault))
    }
    fn guest_tsc(&self) -> Option<u64> {
        Some(self.0.clock().tsc())
    }
    fn pvclock_time_info(&self, _vcpu: u32) -> Option<[u8; 32]> {
        let clock = self.0.clock();
        let pv = PvClock::new(1_000_000_000)?;
        Some(pv.time_info(2, clock.tsc(), clock.now_ns()).to_bytes())
    }
    fn pvclock_wall_clock(&self) -> Option<[u8; 12]> {
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_nanos() as u64;
        Some(PvClockWallClock::new(2, unix, self.0.clock().now_ns()).to_bytes())
    }
}
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

fn main() {
    if let Err(e) = run() {
        eprintln!("boot_emu: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let mut kernel_path = String::new();
    let (mut pvh, mut mem_mib, mut timeout, mut with_platform) = (false, 256u64, 60u64, false);
    let mut initrd_path = None;
    let mut append = String::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--pvh" => pvh = true,
            "--platform" => with_platform = true,
            "--mem" => {
                mem_mib = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--mem MIB")?
            }
            "--timeout" => {
                timeout = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--timeout SECS")?
            }
            "--initrd" => initrd_path = Some(args.next().ok_or("--initrd FILE")?),
            "--append" => append = args.next().ok_or("--append ARGS")?,
            k if kernel_path.is_empty() && !k.starts_with("--") => kernel_path = k.to_string(),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if kernel_path.is_empty() {
        return Err("usage: boot_emu VMLINUX [--pvh] [--mem MIB] [--initrd FILE] [--timeout SECS] [--append ARGS]".into());
    }
    let mem = GuestMemoryMmap::from_ranges(&arch::ram_regions(mem_mib << 20))
        .map_err(|e| e.to_string())?;
    let mut kf = std::fs::File::open(&kernel_path).map_err(|e| format!("{kernel_path}: {e}"))?;
    let kernel = arch::load_kernel(&mem, &mut kf).map_err(|e| e.to_string())?;
    let initrd = match &initrd_path {
        Some(p) => Some(std::fs::read(p).map_err(|e| format!("{p}: {e}"))?),
        None => None,
    };
    let cmdline = format!("console=ttyS0 earlyprintk=serial,ttyS0 keep_bootcon {append}");
    let cfg = arch::BootConfig {
        cmdline: cmdline.trim(),
        initrd: initrd.as_deref(),
        num_cpus: 1,
        protocol: if pvh {
            arch::EntryProtocol::Pvh
        } else {
            arch::EntryProtocol::Linux64
        },
    };
    let state = arch::configure_system(&mem, &kernel, &cfg).map_err(|e| e.to_string())?;
    eprintln!(
        "boot_emu: entry {:#x}, cmdline {:?}",
        state.regs.rip, cfg.cmdline
    );

    let vm = emu::EmuVm::new();
    let platform = with_platform.then(|| {
        let clock: Arc<dyn GuestClock> = Arc::new(WallClock(Instant::now()));
        Arc::new(SharedPlatform::new(
            Platform::new(PlatformConfig::default()),
            clock,
        ))
    });
    if let Some(p) = &platform {
        vm.set_interrupt_controller(Arc::new(PlatformIrq(p.clone())));
        vm.set_cpuid_config(emu::cpuid::CpuidConfig {
            apic: true,
            tsc_deadline: true,
            x2apic: false,
            kvm_clock: std::env::var_os("EMU_NO_KVMCLOCK").is_none(),
            tsc_khz: 1_000_000,
            apic_bus_khz: 1_000_000,
        });
    }
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
    let mut vcpu = vm.create_emu_vcpu(0);
    vcpu.core_mut().trace = std::env::var_os("EMU_TRACE").is_some();
    if let Some(p) = &platform {
        // Interrupts raised from outside the vCPU (none in this single-
        // threaded probe, but this is the wiring a VMM needs).
        let attention = vcpu.irq_attention();
        p.set_kick(Arc::new(move |_cpu| {
            attention.store(true, std::sync::atomic::Ordering::SeqCst)
        }));
    }
    vcpu.set_boot_state(&state).map_err(|e| e.to_string())?;

    let start = Instant::now();
    let kicker = vcpu.kicker();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(timeout));
        kicker.kick();
    });
    let mut line = Vec::new();
    let mut stdout = std::io::stdout();
    let mut cmos_index = 0u8;
    let mut halts = 0u64;
    let mut slept = Duration::ZERO;
    loop {
        let exit = vcpu.run().map_err(|e| e.to_string())?;
        if !matches!(exit, VcpuExit::Halt) {
            halts = 0;
        }
        match exit {
            VcpuExit::IoOut { port: 0x3f8, data } => {
                for &b in data.iter() {
                    line.push(b);
                    if b == b'\n' {
                        let text = String::from_utf8_lossy(&line);
                        let _ = write!(stdout, "[{:7.3}] {text}", start.elapsed().as_secs_f64());
                        let _ = stdout.flush();
                        line.clear();
                    }
                }
            }
            VcpuExit::IoOut { port, data }
                if platform.as_ref().is_some_and(|p| p.pio_write(port, data)) => {}
            VcpuExit::MmioWrite { addr, data }
                if platform
                    .as_ref()
                    .is_some_and(|p| p.mmio_write(0, addr, data)) => {}
            VcpuExit::IoOut { port: 0x70, data } => cmos_index = data[0] & 0x7f,
            VcpuExit::IoOut { port, data } => {
                if port == 0xcf9 && data[0] == 6
                    || port == 0x604 && data.len() == 2 && data[1] & 0x20 != 0
                {
                    eprintln!("\nboot_emu: guest asked for reset/poweroff (port {port:#x})");
                    break;
                }
            }
            VcpuExit::IoIn { port, data } => {
                if platform
                    .as_ref()
                    .is_some_and(|p| p.pio_read(port, &mut data[..]))
                {
                    continue;
                }
                let v = match port {
                    0x3fd => 0x60,
                    0x71 => match cmos_index {
                        0x0b => 0x02,
                        0x0d => 0x80,
                        _ => 0,
                    },
                    _ => 0xff,
                };
                data.fill(v);
            }
            VcpuExit::MmioRead { addr, data } => {
                if !platform
                    .as_ref()
                    .is_some_and(|p| p.mmio_read(0, addr, &mut data[..]))
                {
                    data.fill(0xff);
                }
            }
            VcpuExit::MmioWrite { .. } => {}
            VcpuExit::Halt => {
                halts += 1;
                match &platform {
                    // Sleep until the next timer deadline (at most 10 ms).
                    Some(p) if !p.has_pending(0) => {
                        let now = p.clock().now_ns();
                        let until = p.next_deadline_ns().unwrap_or(now + 10_000_000);
                        let ns = until.saturating_sub(now).min(10_000_000);
                        std::thread::sleep(Duration::from_nanos(ns));
                        slept += Duration::from_nanos(ns);
                        p.tick();
                    }
                    Some(_) => {}
                    None if halts > 1_000_000 => {
                        eprintln!("\nboot_emu: halted with nothing to wake it");
                        break;
                    }
                    None => {}
                }
            }
            VcpuExit::Interrupted => {
                eprintln!("\nboot_emu: timeout after {timeout} s");
                break;
            }
            other => {
                eprintln!("\nboot_emu: stopped on {other}", other = describe(&other));
                break;
            }
        }
    }
    let r = vcpu.get_regs().map_err(|e| e.to_string())?;
    if std::env::var_os("EMU_HISTORY").is_some() {
        for (rip, tag) in vcpu.core().history.recent() {
            if tag == emu::core::HIST_BLOCK {
                eprintln!("  block {rip:#x}");
            } else {
                eprintln!(
                    "  exception {} (error {:#x}) at {rip:#x}",
                    (tag & 0xffff) - 0x100,
                    tag >> 16
                );
            }
        }
        eprintln!("  sregs {:x?}", vcpu.get_sregs());
    }
    eprintln!(
        "boot_emu: {:.1} s ({:.1} s halted), {} instructions, RIP {:#x} RSP {:#x}",
        start.elapsed().as_secs_f64(),
        slept.as_secs_f64(),
        vcpu.core().icount,
        r.rip,
        r.rsp
    );
    Ok(())
}

fn describe(e: &VcpuExit) -> String {
    match e {
        VcpuExit::InternalError(ie) => ie.to_string(),
        other => format!("{other:?}"),
    }
}
