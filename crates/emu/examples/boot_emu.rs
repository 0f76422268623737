//! Boots a kernel on the software engine with `arch`'s loader and tables,
//! printing the serial console, to see how far a real kernel gets and which
//! instruction stops it. Not a VMM: no devices beyond a write-only UART stub;
//! with `--platform` the `emu-platform` interrupt controllers and timers
//! (LAPIC, IOAPIC, PIC, PIT, kvmclock) are plugged in on a wall clock, and
//! `--cpus N` runs N vCPU threads (APs start in wait-for-SIPI).
//!
//! ```text
//! cargo run --release -p emu --example boot_emu -- VMLINUX [--pvh] [--mem MIB]
//!     [--initrd FILE] [--timeout SECS] [--append "ARGS"] [--platform] [--cpus N]
//! ```
//!
//! `EMU_TRACE=1` prints every block start; `EMU_HISTORY=1` prints the last
//! blocks and exceptions when the run ends.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use emu::irq::{InterruptController, MsrFault};
use emu::EmuVcpu;
use emu_platform::{
    GuestClock, Platform, PlatformConfig, PvClock, PvClockWallClock, SharedPlatform,
};
use hypervisor::GuestRam;
use hypervisor::{Vcpu, VcpuExit, VcpuKicker, Vm};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

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
    fn take_init(&self, vcpu: u32) -> bool {
        self.0.take_init(vcpu)
    }
    fn take_startup(&self, vcpu: u32) -> Option<u8> {
        self.0.take_startup(vcpu)
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

struct Args {
    kernel: String,
    pvh: bool,
    mem_mib: u64,
    timeout: u64,
    platform: bool,
    cpus: u32,
    initrd: Option<String>,
    append: String,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mut a = Args {
        kernel: String::new(),
        pvh: false,
        mem_mib: 256,
        timeout: 60,
        platform: false,
        cpus: 1,
        initrd: None,
        append: String::new(),
    };
    while let Some(arg) = it.next() {
        let mut val = |n: &str| it.next().ok_or(format!("{n} needs a value"));
        match arg.as_str() {
            "--pvh" => a.pvh = true,
            "--platform" => a.platform = true,
            "--mem" => a.mem_mib = val("--mem")?.parse().map_err(|e| format!("--mem: {e}"))?,
            "--cpus" => a.cpus = val("--cpus")?.parse().map_err(|e| format!("--cpus: {e}"))?,
            "--timeout" => {
                a.timeout = val("--timeout")?
                    .parse()
                    .map_err(|e| format!("--timeout: {e}"))?
            }
            "--initrd" => a.initrd = Some(val("--initrd")?),
            "--append" => a.append = val("--append")?,
            k if a.kernel.is_empty() && !k.starts_with("--") => a.kernel = k.to_string(),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.kernel.is_empty() {
        return Err("usage: boot_emu VMLINUX [--pvh] [--mem MIB] [--initrd FILE] [--timeout SECS] [--append ARGS] [--platform] [--cpus N]".into());
    }
    if a.cpus > 1 && !a.platform {
        return Err("--cpus > 1 needs --platform (APs are started by INIT/SIPI)".into());
    }
    Ok(a)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("boot_emu: {e}");
        std::process::exit(1);
    }
}

/// State the vCPU threads share.
struct Shared {
    platform: Option<Arc<SharedPlatform>>,
    line: Mutex<Vec<u8>>,
    cmos_index: AtomicU8,
    stop: AtomicBool,
    start: Instant,
    kickers: Mutex<Vec<Arc<dyn VcpuKicker>>>,
}

impl Shared {
    fn stop_all(&self) {
        self.stop.store(true, Ordering::SeqCst);
        for k in self
            .kickers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            k.kick();
        }
    }

    fn serial(&self, data: &[u8]) {
        let mut line = self.line.lock().unwrap_or_else(|e| e.into_inner());
        for &b in data {
            line.push(b);
            if b == b'\n' {
                let text = String::from_utf8_lossy(&line);
                let mut out = std::io::stdout();
                let _ = write!(out, "[{:7.3}] {text}", self.start.elapsed().as_secs_f64());
                let _ = out.flush();
                line.clear();
            }
        }
    }
}

fn run() -> Result<(), String> {
    let args = parse_args()?;
    let mem =
        GuestRam::from_ranges(&arch::ram_regions(args.mem_mib << 20)).map_err(|e| e.to_string())?;
    let mut kf = std::fs::File::open(&args.kernel).map_err(|e| format!("{}: {e}", args.kernel))?;
    let kernel = arch::load_kernel(&mem, &mut kf).map_err(|e| e.to_string())?;
    let initrd = match &args.initrd {
        Some(p) => Some(std::fs::read(p).map_err(|e| format!("{p}: {e}"))?),
        None => None,
    };
    let cmdline = format!(
        "console=ttyS0 earlyprintk=serial,ttyS0 keep_bootcon {}",
        args.append
    );
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
        "boot_emu: entry {:#x}, {} vCPU(s), cmdline {:?}",
        state.regs.rip, args.cpus, cfg.cmdline
    );

    let vm = emu::EmuVm::new();
    // The process reads the translator knobs; the engine is given them.
    vm.set_jit_config(emu::jit::JitConfig {
        threshold: std::env::var("VIREO_JIT")
            .map(|v| emu::jit::JitConfig::parse_threshold(&v))
            .unwrap_or(Some(emu::jit::DEFAULT_THRESHOLD)),
        perf_map: std::env::var_os("VIREO_JIT_PERFMAP").is_some(),
    });
    let platform = args.platform.then(|| {
        let clock: Arc<dyn GuestClock> = Arc::new(WallClock(Instant::now()));
        let pc = PlatformConfig {
            num_vcpus: args.cpus as usize,
            ..PlatformConfig::default()
        };
        Arc::new(SharedPlatform::new(Platform::new(pc), clock))
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
            hidden: Default::default(),
        });
    }
    for (slot, region) in mem.iter().enumerate() {
        // SAFETY: `mem` lives until the end of this function, after the VM
        // and every vCPU thread (joined in the scope below).
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
    let mut vcpus = Vec::new();
    for i in 0..args.cpus {
        let mut v = vm.create_emu_vcpu(i);
        v.core_mut().trace = std::env::var_os("EMU_TRACE").is_some();
        if i == 0 {
            v.set_boot_state(&state).map_err(|e| e.to_string())?;
        } else {
            v.set_wait_for_sipi(true);
        }
        vcpus.push(v);
    }
    let shared = Arc::new(Shared {
        platform: platform.clone(),
        line: Mutex::new(Vec::new()),
        cmos_index: AtomicU8::new(0),
        stop: AtomicBool::new(false),
        start: Instant::now(),
        kickers: Mutex::new(vcpus.iter().map(|v| v.kicker()).collect()),
    });
    if let Some(p) = &platform {
        // A vCPU that got an interrupt, INIT or SIPI polls its controller at
        // its next block boundary (or wakes from its HLT sleep below).
        let flags: Vec<_> = vcpus.iter().map(|v| v.irq_attention()).collect();
        p.set_kick(Arc::new(move |cpu| {
            if let Some(f) = flags.get(cpu) {
                f.store(true, Ordering::SeqCst);
            }
        }));
    }
    let timer = shared.clone();
    let timeout = args.timeout;
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(timeout));
        eprintln!("\nboot_emu: timeout after {timeout} s");
        timer.stop_all();
    });
    std::thread::scope(|s| {
        let handles: Vec<_> = vcpus
            .into_iter()
            .map(|v| {
                let sh = shared.clone();
                s.spawn(move || vcpu_thread(v, sh))
            })
            .collect();
        for h in handles {
            match h.join() {
                Ok(msg) => eprintln!("{msg}"),
                Err(_) => eprintln!("boot_emu: a vCPU thread panicked"),
            }
        }
    });
    Ok(())
}

fn vcpu_thread(mut vcpu: EmuVcpu, sh: Arc<Shared>) -> String {
    let idx = vcpu.index();
    let mut slept = Duration::ZERO;
    let mut halts = 0u64;
    let end = loop {
        if sh.stop.load(Ordering::SeqCst) {
            break "stopped".to_string();
        }
        let exit = match vcpu.run() {
            Ok(e) => e,
            Err(e) => break format!("run failed: {e}"),
        };
        if !matches!(exit, VcpuExit::Halt) {
            halts = 0;
        }
        match exit {
            VcpuExit::IoOut { port: 0x3f8, data } => sh.serial(data),
            VcpuExit::IoOut { port, data }
                if sh
                    .platform
                    .as_ref()
                    .is_some_and(|p| p.pio_write(port, data)) => {}
            VcpuExit::IoOut { port: 0x70, data } => {
                sh.cmos_index.store(data[0] & 0x7f, Ordering::SeqCst)
            }
            VcpuExit::IoOut { port, data } => {
                if port == 0xcf9 && data[0] == 6
                    || port == 0x604 && data.len() == 2 && data[1] & 0x20 != 0
                {
                    sh.stop_all();
                    break format!("guest asked for reset/poweroff (port {port:#x})");
                }
            }
            VcpuExit::IoIn { port, data } => {
                if sh
                    .platform
                    .as_ref()
                    .is_some_and(|p| p.pio_read(port, &mut data[..]))
                {
                    continue;
                }
                let v = match port {
                    0x3fd => 0x60, // LSR: transmitter empty
                    0x71 => match sh.cmos_index.load(Ordering::SeqCst) {
                        0x0b => 0x02,
                        0x0d => 0x80,
                        _ => 0,
                    },
                    _ => 0xff,
                };
                data.fill(v);
            }
            VcpuExit::MmioRead { addr, data } => {
                if !sh
                    .platform
                    .as_ref()
                    .is_some_and(|p| p.mmio_read(idx, addr, &mut data[..]))
                {
                    data.fill(0xff);
                }
            }
            VcpuExit::MmioWrite { addr, data } => {
                if let Some(p) = &sh.platform {
                    p.mmio_write(idx, addr, data);
                }
            }
            VcpuExit::Halt => {
                halts += 1;
                match &sh.platform {
                    // Sleep until the next timer deadline (at most 10 ms).
                    Some(p) if !p.has_pending(idx) => {
                        let now = p.clock().now_ns();
                        let until = p.next_deadline_ns().unwrap_or(now + 10_000_000);
                        let ns = until.saturating_sub(now).min(10_000_000);
                        std::thread::sleep(Duration::from_nanos(ns));
                        slept += Duration::from_nanos(ns);
                        p.tick();
                    }
                    Some(_) => {}
                    None if halts > 1_000_000 => break "halted with nothing to wake it".into(),
                    None => {}
                }
            }
            VcpuExit::Interrupted => {}
            VcpuExit::InternalError(ie) => {
                sh.stop_all();
                break format!("stopped on {ie}");
            }
            other => {
                sh.stop_all();
                break format!("stopped on {other:?}");
            }
        }
    };
    let r = vcpu.get_regs().unwrap_or_default();
    if std::env::var_os("EMU_HISTORY").is_some() {
        for (rip, tag) in vcpu.core().history.recent() {
            if tag == emu::core::HIST_BLOCK {
                eprintln!("  cpu{idx} block {rip:#x}");
            } else {
                eprintln!(
                    "  cpu{idx} exception {} (error {:#x}) at {rip:#x}",
                    (tag & 0xffff) - 0x100,
                    tag >> 16
                );
            }
        }
        eprintln!("  cpu{idx} sregs {:x?}", vcpu.get_sregs());
    }
    format!(
        "boot_emu: cpu{idx}: {end}; {:.1} s ({:.1} s halted), {} instructions ({:.0} MIPS), {} blocks decoded, {} compiled, RIP {:#x}",
        sh.start.elapsed().as_secs_f64(),
        slept.as_secs_f64(),
        vcpu.core().icount,
        vcpu.core().icount as f64 / (sh.start.elapsed() - slept).as_secs_f64().max(1e-9) / 1e6,
        vcpu.core().blocks.decoded,
        vcpu.core().jit.compiled,
        r.rip
    )
}
