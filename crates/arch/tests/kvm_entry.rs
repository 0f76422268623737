//! The entry states run on a real vCPU: tiny hand-assembled guests check
//! that KVM accepts each state (VM-entry checks on segments, TR, paging)
//! and that what the guest sees matches the boot protocol. Skipped, with a
//! note, where /dev/kvm is unusable.

use std::io::Cursor;

use hypervisor::kvm::{kvm_available, KvmHypervisor};
use hypervisor::GuestRam;
use hypervisor::{CpuState, Hypervisor, VcpuExit};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

const SERIAL: u16 = 0x3f8;
const DONE: u16 = 0x501;

fn kvm() -> Option<KvmHypervisor> {
    if !kvm_available() {
        eprintln!("note: /dev/kvm not usable, skipping");
        return None;
    }
    match KvmHypervisor::new() {
        Ok(h) => Some(h),
        Err(e) => {
            eprintln!("note: KVM unusable ({e}), skipping");
            None
        }
    }
}

/// Runs one vCPU from `state` and returns every (port, bytes) written until
/// the guest writes to port DONE.
fn run(h: &KvmHypervisor, mem: &GuestRam, state: &CpuState) -> Vec<(u16, Vec<u8>)> {
    let vm = h.create_vm().unwrap();
    for (slot, region) in mem.iter().enumerate() {
        // SAFETY: `mem` outlives the VM, which is dropped at the end of this function.
        unsafe {
            vm.map_memory(
                slot as u32,
                region.start_addr().0,
                region.len(),
                region.as_ptr() as u64,
            )
            .unwrap()
        };
    }
    let mut vcpu = vm.create_vcpu(0, 1).unwrap();
    vcpu.set_boot_state(state).unwrap();
    let mut out = Vec::new();
    for _ in 0..100 {
        match vcpu.run().unwrap() {
            VcpuExit::IoOut { port: DONE, .. } => return out,
            VcpuExit::IoOut { port, data } => out.push((port, data.to_vec())),
            other => panic!("unexpected exit {other:?}; output so far {out:?}"),
        }
    }
    panic!("guest never finished; output {out:?}");
}

fn mem() -> GuestRam {
    GuestRam::from_ranges(&arch::ram_regions(64 << 20)).unwrap()
}

// mov dx, 0x501 ; out dx, al  (32/64-bit encodings)
const FINISH: [u8; 5] = [0x66, 0xba, 0x01, 0x05, 0xee];

#[test]
fn real_mode_state_runs() {
    let Some(h) = kvm() else { return };
    let m = mem();
    // mov al,'R' ; mov dx,0x3f8 ; out dx,al ; mov dx,0x501 ; out dx,al
    let code = [0xb0, b'R', 0xba, 0xf8, 0x03, 0xee, 0xba, 0x01, 0x05, 0xee];
    m.write_slice(&code, GuestAddress(0x10000)).unwrap();
    let out = run(&h, &m, &arch::real_mode_state(0x1000, 0));
    assert_eq!(out, vec![(SERIAL, vec![b'R'])]);
}

#[test]
fn protected_mode_state_runs() {
    let Some(h) = kvm() else { return };
    let m = mem();
    // mov al,'P' ; mov dx,0x3f8 ; out dx,al ; push eax ; pop ecx ; mov al,cl ; out dx,al
    let mut code = vec![
        0xb0, b'P', 0x66, 0xba, 0xf8, 0x03, 0xee, 0x50, 0x59, 0x88, 0xc8, 0xee,
    ];
    code.extend_from_slice(&FINISH);
    m.write_slice(&code, GuestAddress(0x200000)).unwrap();
    let mut st = arch::protected_mode_state(&m, 0x200000).unwrap();
    st.regs.rsp = 0x8ff0;
    let out = run(&h, &m, &st);
    assert_eq!(out, vec![(SERIAL, vec![b'P']), (SERIAL, vec![b'P'])]);
}

#[test]
fn long_mode_state_runs_with_paging_and_a_stack() {
    let Some(h) = kvm() else { return };
    let m = mem();
    // mov al,'L' ; mov dx,0x3f8 ; out dx,al ; push rax ; pop rcx ; mov al,cl ; out dx,al
    // mov eax,[0x3000000] (through the identity map, above the first 2 MiB page)
    // out dx,eax
    let mut code = vec![
        0xb0, b'L', 0x66, 0xba, 0xf8, 0x03, 0xee, 0x50, 0x59, 0x88, 0xc8, 0xee,
    ];
    code.extend_from_slice(&[0x8b, 0x04, 0x25, 0x00, 0x00, 0x00, 0x03, 0xef]);
    code.extend_from_slice(&FINISH);
    m.write_slice(&code, GuestAddress(0x200000)).unwrap();
    m.write_obj(0xfeed_f00du32, GuestAddress(0x300_0000))
        .unwrap();
    let st = arch::long_mode_state(&m, 0x200000).unwrap();
    let out = run(&h, &m, &st);
    assert_eq!(
        out,
        vec![
            (SERIAL, vec![b'L']),
            (SERIAL, vec![b'L']),
            (SERIAL, 0xfeed_f00du32.to_le_bytes().to_vec())
        ]
    );
}

/// A minimal ELF vmlinux whose 64-bit entry (at 16 MiB) sends the zero
/// page's "HdrS" and the first e820 entry's size out of port 0x3f8, and
/// whose PVH entry (16 MiB + 0x100) sends the start info magic.
fn probe_kernel() -> Vec<u8> {
    let mut f = vec![0u8; 0x1000];
    f[0..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
    f[16] = 2;
    f[18] = 62;
    f[24..32].copy_from_slice(&0x100_0000u64.to_le_bytes());
    f[32] = 64;
    f[54] = 56;
    f[56] = 2;
    // PT_LOAD: file 0x1000.., 0x200 bytes at 16 MiB.
    let ph = 64;
    f[ph] = 1;
    f[ph + 8..ph + 16].copy_from_slice(&0x1000u64.to_le_bytes());
    f[ph + 16..ph + 24].copy_from_slice(&0x100_0000u64.to_le_bytes());
    f[ph + 24..ph + 32].copy_from_slice(&0x100_0000u64.to_le_bytes());
    f[ph + 32..ph + 40].copy_from_slice(&0x200u64.to_le_bytes());
    f[ph + 40..ph + 48].copy_from_slice(&0x200u64.to_le_bytes());
    // PT_NOTE with the Xen PHYS32_ENTRY note.
    let ph = 64 + 56;
    f[ph] = 4;
    f[ph + 8..ph + 16].copy_from_slice(&0x200u64.to_le_bytes());
    f[ph + 32..ph + 40].copy_from_slice(&20u64.to_le_bytes());
    let note = [
        4u32.to_le_bytes(),
        4u32.to_le_bytes(),
        18u32.to_le_bytes(),
        *b"Xen\0",
        0x100_0100u32.to_le_bytes(),
    ]
    .concat();
    f[0x200..0x214].copy_from_slice(&note);
    f.resize(0x1200, 0);
    // 64-bit: mov eax,[rsi+0x202] ; mov dx,0x3f8 ; out dx,eax ;
    //         mov eax,[rsi+0x2d0+8] (e820[0].size) ; out dx,eax ; finish
    let mut c64 = vec![0x8b, 0x86, 0x02, 0x02, 0, 0, 0x66, 0xba, 0xf8, 0x03, 0xef];
    c64.extend_from_slice(&[0x8b, 0x86, 0xd8, 0x02, 0, 0, 0xef]);
    c64.extend_from_slice(&FINISH);
    f[0x1000..0x1000 + c64.len()].copy_from_slice(&c64);
    // 32-bit PVH: mov eax,[ebx] ; mov dx,0x3f8 ; out dx,eax ; finish
    let mut c32 = vec![0x8b, 0x03, 0x66, 0xba, 0xf8, 0x03, 0xef];
    c32.extend_from_slice(&FINISH);
    f[0x1100..0x1100 + c32.len()].copy_from_slice(&c32);
    f
}

#[test]
fn configure_system_linux64_state_runs() {
    let Some(h) = kvm() else { return };
    let m = mem();
    let k = arch::load_kernel(&m, &mut Cursor::new(probe_kernel())).unwrap();
    let cfg = arch::BootConfig {
        cmdline: "console=ttyS0",
        initrd: Some(&[1; 4096]),
        num_cpus: 1,
        protocol: arch::EntryProtocol::Linux64,
    };
    let st = arch::configure_system(&m, &k, &cfg).unwrap();
    let out = run(&h, &m, &st);
    assert_eq!(
        out,
        vec![
            (SERIAL, b"HdrS".to_vec()),
            (SERIAL, 0x9fc00u32.to_le_bytes().to_vec())
        ]
    );
}

#[test]
fn configure_system_pvh_state_runs() {
    let Some(h) = kvm() else { return };
    let m = mem();
    let k = arch::load_kernel(&m, &mut Cursor::new(probe_kernel())).unwrap();
    let cfg = arch::BootConfig {
        cmdline: "console=ttyS0",
        initrd: None,
        num_cpus: 2,
        protocol: arch::EntryProtocol::Pvh,
    };
    let st = arch::configure_system(&m, &k, &cfg).unwrap();
    let out = run(&h, &m, &st);
    assert_eq!(out, vec![(SERIAL, 0x336e_c578u32.to_le_bytes().to_vec())]);
}
