//! KVM's fast path for virtio queue notifications, checked on the
//! hypervisor seam itself: a guest write to a registered notify address
//! signals the eventfd without leaving the vCPU (ioeventfd), and the same
//! through the engine's doorbell table.

use std::sync::Arc;

use hypervisor::{Hypervisor, VcpuExit};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const RAM: usize = 0x10000;
const CODE: u64 = 0x1000;
/// Not backed by RAM: an MMIO address.
const NOTIFY: u64 = 0x2_0000;

fn kvm_vm() -> Option<(Arc<dyn hypervisor::Vm>, *mut u8)> {
    if !hypervisor::kvm::kvm_available() {
        eprintln!("note: /dev/kvm is not usable here; KVM notify test skipped");
        return None;
    }
    let hv = hypervisor::kvm::KvmHypervisor::new().expect("KVM opens");
    let vm = hv.create_vm().expect("VM");
    // SAFETY: a fresh anonymous mapping, leaked for the test's lifetime.
    let host = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            RAM,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(host, libc::MAP_FAILED);
    // SAFETY: the mapping above is never unmapped.
    unsafe { vm.map_memory(0, 0, RAM as u64, host as u64) }.expect("memory");
    Some((vm, host.cast()))
}

/// Real-mode code: `mov ax, 0x2000; mov ds, ax; mov [0], ax; out 0x80, al`
/// (the write goes to 0x20000), then `out 0x81, al`.
const GUEST: &[u8] = &[
    0xb8, 0x00, 0x20, // mov ax, 0x2000
    0x8e, 0xd8, // mov ds, ax
    0xa3, 0x00, 0x00, // mov [0], ax
    0xe6, 0x80, // out 0x80, al
    0xe6, 0x81, // out 0x81, al
];

#[test]
fn notify_write_signals_the_eventfd_without_an_exit() {
    let Some((vm, host)) = kvm_vm() else { return };
    // SAFETY: CODE + GUEST fits in the RAM mapping.
    unsafe { std::ptr::copy_nonoverlapping(GUEST.as_ptr(), host.add(CODE as usize), GUEST.len()) };
    let evt = EventFd::new(EFD_NONBLOCK).unwrap();
    if !vm.register_mmio_notify(NOTIFY, &evt).expect("ioeventfd") {
        // The nested PVM KVM: its vCPU hangs on a write to an ioeventfd
        // address, so the backend declines and notifications stay exits.
        eprintln!("note: this KVM declines ioeventfds (nested PVM); test skipped");
        return;
    }
    let mut vcpu = vm.create_vcpu(0, 1).expect("vCPU");
    vcpu.set_boot_state(&arch::real_mode_state(0, CODE as u16))
        .unwrap();
    match vcpu.run().expect("runs") {
        VcpuExit::IoOut { port: 0x80, .. } => {}
        other => panic!("the notify write left the vCPU: {other:?}"),
    }
    assert_eq!(evt.read().expect("the eventfd was signalled"), 1);

    // Unregistered, the same address is an ordinary MMIO exit again.
    vm.unregister_mmio_notify(NOTIFY, &evt).unwrap();
    let mut vcpu2 = vm.create_vcpu(1, 2).expect("vCPU");
    vcpu2
        .set_boot_state(&arch::real_mode_state(0, CODE as u16))
        .unwrap();
    match vcpu2.run().expect("runs") {
        VcpuExit::MmioWrite { addr, .. } => assert_eq!(addr, NOTIFY),
        other => panic!("expected the MMIO write, got {other:?}"),
    }
    assert!(evt.read().is_err(), "no signal after unregistering");
}

/// The engine's counterpart (its doorbell table): the same guest, the same
/// promise, on any host.
#[test]
fn engine_notify_write_signals_the_eventfd_without_an_exit() {
    let hv = emu::EmuHypervisor::new();
    let vm = hv.create_vm().expect("VM");
    let mut ram = vec![0u8; RAM];
    ram[CODE as usize..CODE as usize + GUEST.len()].copy_from_slice(GUEST);
    let host = ram.leak().as_mut_ptr();
    // SAFETY: the leaked buffer lives as long as the test process.
    unsafe { vm.map_memory(0, 0, RAM as u64, host as u64) }.expect("memory");
    let evt = EventFd::new(EFD_NONBLOCK).unwrap();
    assert!(
        vm.register_mmio_notify(NOTIFY, &evt).expect("registers"),
        "the engine has a notify fast path"
    );
    assert!(
        vm.register_mmio_notify(NOTIFY, &evt).is_err(),
        "one eventfd per address"
    );
    let mut vcpu = vm.create_vcpu(0, 1).expect("vCPU");
    vcpu.set_boot_state(&arch::real_mode_state(0, CODE as u16))
        .unwrap();
    match vcpu.run().expect("runs") {
        VcpuExit::IoOut { port: 0x80, .. } => {}
        other => panic!("the notify write left the vCPU: {other:?}"),
    }
    assert_eq!(evt.read().expect("the eventfd was signalled"), 1);

    // Unregistered, the same address is an ordinary MMIO exit again.
    vm.unregister_mmio_notify(NOTIFY, &evt).unwrap();
    vcpu.set_boot_state(&arch::real_mode_state(0, CODE as u16))
        .unwrap();
    match vcpu.run().expect("runs") {
        VcpuExit::MmioWrite { addr, .. } => assert_eq!(addr, NOTIFY),
        other => panic!("expected the MMIO write, got {other:?}"),
    }
    assert!(evt.read().is_err(), "no signal after unregistering");
}
