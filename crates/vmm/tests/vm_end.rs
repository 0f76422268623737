//! The end of a VM releases what its accelerator holds: once a VM that ran
//! to power-off is dropped, the backend VM (`hypervisor::Vm`) is dropped
//! too, and with it KVM's VM file descriptor or the engine's platform and
//! its timer thread. A reference that outlived the VM used to keep the
//! backend VM alive until the process exited, so its `Drop` never ran.
//!
//! One test in this binary: it counts what the whole process holds (file
//! descriptors, threads by name), which another test's VM running at the
//! same time would change.

use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use vmm::{Accel, Boot, RawBoot, RawMode, Vm, VmExit, VmSpec};

const LOAD: u64 = 0x10000;
const ACPI_PM1A_CNT: u16 = 0x604;
/// SLP_TYP = 5 (S5) | SLP_EN.
const S5: u16 = (5 << 10) | (1 << 13);

/// KVM VMs this process holds: descriptors on `anon_inode:kvm-vm`.
fn kvm_vm_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|t| t.as_os_str() == "anon_inode:kvm-vm")
        })
        .count()
}

/// Threads of this process named `name`.
fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end() == name)
        })
        .count()
}

/// What a backend VM holds while it lives, as this process counts it.
fn held(accel: Accel) -> usize {
    match accel {
        Accel::Kvm => kvm_vm_fds(),
        _ => threads_named("emu-timer"),
    }
}

/// A real-mode guest that powers off at once, with virtio devices on PCI
/// (their MSI-X messages go to the backend VM).
fn spec(accel: Accel) -> VmSpec {
    let mut a = CodeAssembler::new(16).unwrap();
    a.mov(dx, ACPI_PM1A_CNT as u32).unwrap();
    a.mov(ax, S5 as u32).unwrap();
    a.out(dx, ax).unwrap();
    a.hlt().unwrap();
    VmSpec {
        accel,
        cpu_model: Default::default(),
        memory: 64 << 20,
        cpus: 1,
        rng: true,
        disks: Vec::new(),
        nets: Vec::new(),
        balloon: Some(vmm::config::BalloonConfig {
            deflate_on_oom: true,
            stats: true,
        }),
        vsock: None,
        fs: Vec::new(),
        virtiofsd: None,
        console: vmm::ConsoleKind::Serial,
        exit_device: None,
        seed: None,
        firmware: false,
        pvpanic: false,
        boot: Boot::Raw(RawBoot {
            load_addr: LOAD,
            image: a.assemble(0).unwrap(),
            mode: RawMode::Real {
                cs: (LOAD >> 4) as u16,
                ip: 0,
            },
        }),
    }
}

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

#[test]
fn a_dropped_vm_releases_its_backend_vm() {
    let mut accels = vec![Accel::Emu];
    if hypervisor::kvm::kvm_available() {
        accels.push(Accel::Kvm);
    } else {
        eprintln!("note: /dev/kvm is not usable here; the KVM half of the test skipped");
    }
    for accel in accels {
        let before = held(accel);
        let vm = Vm::new(spec(accel), Box::new(std::io::sink())).expect("VM builds");
        assert_eq!(
            held(accel),
            before + 1,
            "{accel:?}: the backend VM is there"
        );
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(vm.run());
        });
        let exit = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the guest powered off within 60 s");
        assert_eq!(exit, VmExit::PowerOff, "{accel:?}");
        // The thread that ran the VM dropped it before sending the exit.
        assert!(
            wait_until(Duration::from_secs(10), || held(accel) == before),
            "{accel:?}: the backend VM outlived its VM ({} held, {before} before)",
            held(accel)
        );
    }
}
