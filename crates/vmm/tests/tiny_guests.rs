//! Tiny hand-assembled guests, run through the whole VMM (memory, buses,
//! devices, vCPU threads) on every backend: Vireo's CPU engine, and KVM when
//! /dev/kvm is usable. Each mode of entry, port I/O, the serial device, MMIO
//! exits, reset and triple fault: the same guest, the same expectations,
//! whichever backend runs it.

use std::io::Write;
use std::sync::{Arc, Mutex};

use devices::BusDevice;
use iced_x86::code_asm::*;
use vmm::{Accel, Boot, RawBoot, RawMode, Vm, VmExit, VmSpec};

const LOAD: u64 = 0x10000;
const ACPI_PM1A_CNT: u16 = 0x604;
/// SLP_TYP = 5 (S5) | SLP_EN.
const S5: u16 = (5 << 10) | (1 << 13);

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

fn kvm_usable() -> bool {
    if hypervisor::kvm::kvm_available() {
        return true;
    }
    eprintln!("note: /dev/kvm is not usable here; KVM tiny-guest test skipped");
    false
}

/// Every backend this host can run: the software engine always, KVM when usable.
fn accels() -> Vec<Accel> {
    let mut v = vec![Accel::Emu];
    if kvm_usable() {
        v.push(Accel::Kvm);
    }
    v
}

/// Assemble `body` for `bitness` at LOAD; `body` gets the assembler and a
/// label placed on a NUL-terminated message.
fn assemble(bitness: u32, f: impl FnOnce(&mut CodeAssembler)) -> Vec<u8> {
    assemble_at(bitness, LOAD, f)
}

fn assemble_at(bitness: u32, ip: u64, f: impl FnOnce(&mut CodeAssembler)) -> Vec<u8> {
    let mut a = CodeAssembler::new(bitness).unwrap();
    f(&mut a);
    a.assemble(ip).unwrap()
}

/// Where a test guest keeps its messages, as an offset from the image start.
const MSG_OFFSET: u64 = 0x800;

/// Emit: print the NUL-terminated string at `addr` on COM1, in any mode.
fn print(a: &mut CodeAssembler, bitness: u32, addr: u64) {
    let mut lp = a.create_label();
    let mut done = a.create_label();
    a.mov(dx, 0x3f8u32).unwrap();
    match bitness {
        16 => a.mov(si, addr as u32).unwrap(),
        32 => a.mov(esi, addr as u32).unwrap(),
        _ => a.mov(rsi, addr).unwrap(),
    }
    a.set_label(&mut lp).unwrap();
    a.lodsb().unwrap();
    a.test(al, al).unwrap();
    a.jz(done).unwrap();
    a.out(dx, al).unwrap();
    a.jmp(lp).unwrap();
    a.set_label(&mut done).unwrap();
    a.nop().unwrap();
}

/// The image with NUL-terminated `msgs` placed from MSG_OFFSET on; returns
/// the image and each message's offset from the image start.
fn with_messages(mut code: Vec<u8>, msgs: &[&str]) -> Vec<u8> {
    assert!(code.len() as u64 <= MSG_OFFSET, "test guest code too long");
    code.resize(MSG_OFFSET as usize, 0x90);
    for m in msgs {
        code.extend_from_slice(m.as_bytes());
        code.push(0);
    }
    code
}

/// Offset of message `i` of `msgs` from the image start.
fn msg_at(msgs: &[&str], i: usize) -> u64 {
    MSG_OFFSET + msgs[..i].iter().map(|m| m.len() as u64 + 1).sum::<u64>()
}

fn power_off(a: &mut CodeAssembler) {
    a.mov(dx, ACPI_PM1A_CNT as u32).unwrap();
    a.mov(ax, S5 as u32).unwrap();
    a.out(dx, ax).unwrap();
    // Should never get here; a halted vCPU would hang the test, so spin on
    // a port write that the test would see as an unexpected exit instead.
    a.hlt().unwrap();
}

fn run_raw(accel: Accel, image: Vec<u8>, mode: RawMode) -> (VmExit, String, Vm2) {
    run_raw_with(accel, image, mode, false)
}

fn run_raw_with(accel: Accel, image: Vec<u8>, mode: RawMode, rng: bool) -> (VmExit, String, Vm2) {
    run_raw_setup(accel, image, mode, rng, |_| {})
}

/// `run_raw_with`, calling `setup` on the built VM before it runs.
fn run_raw_setup(
    accel: Accel,
    image: Vec<u8>,
    mode: RawMode,
    rng: bool,
    setup: impl FnOnce(&Vm),
) -> (VmExit, String, Vm2) {
    let cap = Capture::default();
    let spec = VmSpec {
        accel,
        cpu_model: Default::default(),
        memory: 64 << 20,
        cpus: 1,
        rng,
        disks: Vec::new(),
        nets: Vec::new(),
        balloon: None,
        vsock: None,
        fs: Vec::new(),
        virtiofsd: None,
        console: vmm::ConsoleKind::Serial,
        // Every tiny guest has the exit device at port 0xf4 (4 bytes).
        exit_device: Some(Default::default()),
        seed: None,
        firmware: false,
        pvpanic: false,
        boot: Boot::Raw(RawBoot {
            load_addr: LOAD,
            image,
            mode,
        }),
    };
    let vm = Vm::new(spec, Box::new(cap.clone())).expect("VM builds");
    let probe = Arc::new(Mutex::new(MmioProbe::default()));
    vm.mmio_bus()
        .insert(MMIO_PROBE, 0x1000, probe.clone())
        .unwrap();
    setup(&vm);
    let exit = run_with_timeout(vm);
    (exit, cap.text(), Vm2 { probe })
}

struct Vm2 {
    probe: Arc<Mutex<MmioProbe>>,
}

fn run_with_timeout(vm: Vm) -> VmExit {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(vm.run());
    });
    rx.recv_timeout(std::time::Duration::from_secs(60))
        .expect("tiny guest finished within 60 s")
}

const MMIO_PROBE: u64 = 0xd000_0000;

/// An MMIO device that answers reads with a known value and records writes.
#[derive(Default)]
struct MmioProbe {
    writes: Vec<(u64, Vec<u8>)>,
}

impl BusDevice for MmioProbe {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = 0x1234_5678_9abc_def0u64.wrapping_add(offset);
        let n = data.len().min(8);
        data[..n].copy_from_slice(&v.to_le_bytes()[..n]);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.writes.push((offset, data.to_vec()));
    }
}

#[test]
fn real_mode_guest_prints_and_powers_off() {
    for accel in accels() {
        // Real mode at CS = LOAD/16, IP = 0: labels are offsets from 0 and
        // DS must equal CS for lodsb.
        let msgs = ["hello from real mode\n"];
        let code = assemble_at(16, 0, |a| {
            a.mov(ax, cs).unwrap();
            a.mov(ds, ax).unwrap();
            print(a, 16, msg_at(&msgs, 0));
            power_off(a);
        });
        let image = with_messages(code, &msgs);
        let (exit, out, _) = run_raw(
            accel,
            image,
            RawMode::Real {
                cs: (LOAD >> 4) as u16,
                ip: 0,
            },
        );
        assert_eq!(out, "hello from real mode\n", "{accel:?}");
        assert_eq!(exit, VmExit::PowerOff, "{accel:?}");
    }
}

/// A flat guest in `bits`-bit code entered with `mode` prints and powers off.
fn hello(bits: u32, mode: RawMode, name: &str) {
    for accel in accels() {
        let text = format!("hello from {name} mode\n");
        let msgs = [text.as_str()];
        let code = assemble(bits, |a| {
            print(a, bits, LOAD + msg_at(&msgs, 0));
            power_off(a);
        });
        let (exit, out, _) = run_raw(accel, with_messages(code, &msgs), mode);
        assert_eq!(out, text, "{accel:?}");
        assert_eq!(exit, VmExit::PowerOff, "{accel:?}");
    }
}

#[test]
fn exit_device_ends_the_vm_with_the_guest_value() {
    for accel in accels() {
        let code = assemble(32, |a| {
            a.mov(eax, 0x2au32).unwrap();
            a.out(0xf4, eax).unwrap();
            a.hlt().unwrap();
        });
        let (exit, _, _) = run_raw(accel, code, RawMode::Protected { entry: LOAD });
        assert_eq!(exit, VmExit::GuestExit { value: 0x2a }, "{accel:?}");
        assert_eq!(exit.code(), 0x55, "QEMU's (V << 1) | 1");
    }
}

#[test]
fn protected_mode_guest_prints_and_powers_off() {
    hello(32, RawMode::Protected { entry: LOAD }, "protected");
}

#[test]
fn long_mode_guest_prints_and_powers_off() {
    hello(64, RawMode::Long { entry: LOAD }, "long");
}

/// A 64-bit guest that runs `checks` (which jump to the label they are
/// given on failure), prints "<name> ok" or "<name> bad", and powers off;
/// returns what the guest printed and the MMIO probe.
fn run_checks(
    accel: Accel,
    name: &str,
    checks: impl FnOnce(&mut CodeAssembler, CodeLabel),
) -> (VmExit, String, Vm2) {
    run_checks_with(accel, name, false, checks)
}

fn run_checks_with(
    accel: Accel,
    name: &str,
    rng: bool,
    checks: impl FnOnce(&mut CodeAssembler, CodeLabel),
) -> (VmExit, String, Vm2) {
    run_raw_with(
        accel,
        checks_image(name, checks),
        RawMode::Long { entry: LOAD },
        rng,
    )
}

/// The image (code, then its messages) of [`run_checks`]'s guest.
fn checks_image(name: &str, checks: impl FnOnce(&mut CodeAssembler, CodeLabel)) -> Vec<u8> {
    let (ok, bad) = (format!("{name} ok\n"), format!("{name} bad\n"));
    let msgs = [ok.as_str(), bad.as_str()];
    let code = assemble(64, |a| {
        let mut fail = a.create_label();
        let mut end = a.create_label();
        checks(a, fail);
        print(a, 64, LOAD + msg_at(&msgs, 0));
        a.jmp(end).unwrap();
        a.set_label(&mut fail).unwrap();
        print(a, 64, LOAD + msg_at(&msgs, 1));
        a.set_label(&mut end).unwrap();
        power_off(a);
    });
    with_messages(code, &msgs)
}

/// Port reads reach real devices: CMOS register D says "valid" (0x80) and
/// an unclaimed port reads all-ones; the guest reports what it saw.
#[test]
fn port_reads_reach_devices() {
    for accel in accels() {
        let (exit, out, _) = run_checks(accel, "ports", |a, fail| {
            a.mov(al, 0x0du32).unwrap();
            a.out(0x70, al).unwrap();
            a.in_(al, 0x71).unwrap();
            a.cmp(al, 0x80).unwrap();
            a.jne(fail).unwrap();
            a.mov(dx, 0x2ffu32).unwrap(); // nothing there
            a.in_(al, dx).unwrap();
            a.cmp(al, 0xff).unwrap();
            a.jne(fail).unwrap();
        });
        assert_eq!(out, "ports ok\n", "{accel:?}");
        assert_eq!(exit, VmExit::PowerOff);
    }
}

/// MMIO outside RAM exits to the VMM: reads return what the device says,
/// writes arrive with their width and data, unclaimed MMIO reads all-ones.
#[test]
fn mmio_exits_reach_the_mmio_bus() {
    for accel in accels() {
        let (exit, out, vm) = run_checks(accel, "mmio", |a, fail| {
            a.mov(rbx, MMIO_PROBE).unwrap();
            a.mov(eax, dword_ptr(rbx + 0x10)).unwrap();
            a.cmp(eax, 0x9abc_df00u32 as i32).unwrap();
            a.jne(fail).unwrap();
            a.mov(dword_ptr(rbx + 0x20), 0xcafe_f00du32 as i32).unwrap();
            a.mov(word_ptr(rbx + 0x30), 0x4242).unwrap();
            a.mov(rbx, 0xfe00_0000u64).unwrap(); // unclaimed: past ECAM, below the IOAPIC
            a.mov(eax, dword_ptr(rbx)).unwrap();
            a.cmp(eax, -1).unwrap();
            a.jne(fail).unwrap();
        });
        assert_eq!(out, "mmio ok\n", "{accel:?}");
        assert_eq!(exit, VmExit::PowerOff);
        let writes = vm.probe.lock().unwrap().writes.clone();
        assert_eq!(
            writes,
            vec![
                (0x20, 0xcafe_f00du32.to_le_bytes().to_vec()),
                (0x30, 0x4242u16.to_le_bytes().to_vec())
            ]
        );
    }
}

/// PCI configuration space through both mechanisms: 0xcf8/0xcfc and ECAM
/// see the host bridge in slot 0 and virtio-rng (1af4:1044) in slot 1; an
/// empty slot reads all-ones.
#[test]
fn pci_config_space_shows_the_host_bridge_and_virtio_rng() {
    for accel in accels() {
        let (exit, out, _) = run_checks_with(accel, "pci", true, |a, fail| {
            let cf8 = |a: &mut CodeAssembler, slot: u32| {
                a.mov(eax, 0x8000_0000u32 | (slot << 11)).unwrap();
                a.mov(dx, 0xcf8u32).unwrap();
                a.out(dx, eax).unwrap();
                a.mov(dx, 0xcfcu32).unwrap();
                a.in_(eax, dx).unwrap();
            };
            cf8(a, 1);
            a.cmp(eax, 0x1044_1af4).unwrap();
            a.jne(fail).unwrap();
            cf8(a, 0);
            a.cmp(ax, 0x8086).unwrap(); // host bridge vendor
            a.jne(fail).unwrap();
            cf8(a, 7);
            a.cmp(eax, -1).unwrap();
            a.jne(fail).unwrap();
            // ECAM: bus 0, device 1, function 0 at base + (1 << 15).
            a.mov(rbx, arch::layout::PCI_ECAM_BASE + (1 << 15)).unwrap();
            a.mov(eax, dword_ptr(rbx)).unwrap();
            a.cmp(eax, 0x1044_1af4).unwrap();
            a.jne(fail).unwrap();
        });
        assert_eq!(out, "pci ok\n", "{accel:?}");
        assert_eq!(exit, VmExit::PowerOff);
    }
}

#[test]
fn keyboard_controller_reset_reboots() {
    for accel in accels() {
        let image = assemble(32, |a| {
            a.mov(al, 0xfeu32).unwrap();
            a.out(0x64, al).unwrap();
            a.hlt().unwrap();
        });
        let (exit, _, _) = run_raw(accel, image, RawMode::Protected { entry: LOAD });
        assert_eq!(exit, VmExit::Reset, "{accel:?}");
    }
}

#[test]
fn triple_fault_is_reported() {
    for accel in accels() {
        let image = assemble(64, |a| {
            let mut idtr = a.create_label();
            a.lidt(ptr(idtr)).unwrap();
            // Past the 4 GiB identity map: #PF, and with no IDT #GP, #DF,
            // then a triple fault.
            a.mov(rax, qword_ptr(0x10_0000_0000u64)).unwrap();
            a.hlt().unwrap();
            a.set_label(&mut idtr).unwrap();
            a.db(&[0u8; 10]).unwrap();
        });
        let (exit, _, _) = run_raw(accel, image, RawMode::Long { entry: LOAD });
        assert!(
            matches!(exit, VmExit::TripleFault { vcpu: 0, .. }),
            "{accel:?}: {exit:?}"
        );
        assert_eq!(exit.code(), vmm::exit_code::TRIPLE_FAULT);
    }
}

/// Where the DMA test's device sits on the MMIO bus.
const DMA_DEVICE: u64 = 0xd000_1000;

/// A device that, on any MMIO write, writes `code` into guest RAM at `at`
/// through vm-memory, as virtio devices write guest buffers.
struct DmaWriter {
    mem: hypervisor::GuestRam,
    at: u64,
    code: Vec<u8>,
}

impl BusDevice for DmaWriter {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {
        use vm_memory::Bytes;
        self.mem
            .write_slice(&self.code, vm_memory::GuestAddress(self.at))
            .expect("the code page is guest RAM");
    }
}

/// A device that overwrites code the guest has run (and the engine has
/// decoded and compiled: the function ran far past the translation
/// threshold) makes the guest run the new code at once, as DMA does on
/// real hardware: the engine hears of every device write through the RAM
/// bitmap and drops the page's translations.
#[test]
fn code_a_device_overwrote_is_never_run_stale() {
    const FUNC: u64 = LOAD + 0x2000;
    let func = |v: u32| {
        assemble_at(64, FUNC, |a| {
            a.mov(eax, v).unwrap();
            a.ret().unwrap();
        })
    };
    for accel in accels() {
        let mut image = checks_image("dma", |a, fail| {
            // Call the function 1000 times; each must answer `want`.
            let calls = |a: &mut CodeAssembler, want: u32| {
                let mut top = a.create_label();
                a.mov(ecx, 1000u32).unwrap();
                a.set_label(&mut top).unwrap();
                a.mov(rax, FUNC).unwrap();
                a.call(rax).unwrap();
                a.cmp(eax, want).unwrap();
                a.jne(fail).unwrap();
                a.dec(ecx).unwrap();
                a.jnz(top).unwrap();
            };
            calls(a, 1);
            // The device replaces the function.
            a.mov(rbx, DMA_DEVICE).unwrap();
            a.mov(dword_ptr(rbx), 1).unwrap();
            calls(a, 2);
        });
        image.resize((FUNC - LOAD) as usize, 0x90);
        image.extend(func(1));
        let (exit, out, _) =
            run_raw_setup(accel, image, RawMode::Long { entry: LOAD }, false, |vm| {
                let dev = DmaWriter {
                    mem: vm.memory().clone(),
                    at: FUNC,
                    code: func(2),
                };
                vm.mmio_bus()
                    .insert(DMA_DEVICE, 0x1000, Arc::new(Mutex::new(dev)))
                    .unwrap();
            });
        assert_eq!(out, "dma ok\n", "{accel:?}");
        assert_eq!(exit, VmExit::PowerOff);
    }
}
