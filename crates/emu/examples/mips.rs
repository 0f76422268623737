//! Rough interpreter throughput: a tight 64-bit loop with loads, stores and
//! arithmetic, run to HLT. `cargo run --release -p emu --example mips`.

use std::time::Instant;

use emu::EmuVm;
use hypervisor::{DescriptorTable, Segment, SpecialRegs, StandardRegs, Vcpu, VcpuExit, Vm};
use iced_x86::code_asm::*;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let size = 8usize << 20;
    let mut ram = vec![0u8; size].into_boxed_slice();
    let vm = EmuVm::new();
    // The process reads the translator knobs; the engine is given them.
    vm.set_jit_config(emu::jit::JitConfig {
        threshold: std::env::var("VIREO_JIT")
            .map(|v| emu::jit::JitConfig::parse_threshold(&v))
            .unwrap_or(Some(emu::jit::DEFAULT_THRESHOLD)),
        perf_map: std::env::var_os("VIREO_JIT_PERFMAP").is_some(),
    });
    // SAFETY: `ram` outlives the vCPU (dropped at the end of main).
    unsafe { vm.map_memory(0, 0, size as u64, ram.as_mut_ptr() as u64)? };
    // Identity map the first 1 GiB with 2 MiB pages.
    let w64 = |ram: &mut [u8], a: usize, v: u64| ram[a..a + 8].copy_from_slice(&v.to_le_bytes());
    w64(&mut ram, 0x10000, 0x11000 | 7);
    w64(&mut ram, 0x11000, 0x12000 | 7);
    for i in 0..512 {
        w64(&mut ram, 0x12000 + i * 8, ((i as u64) << 21) | 0x87);
    }
    let iters: u32 = 20_000_000;
    let mut a = CodeAssembler::new(64)?;
    let mut lp = a.create_label();
    a.mov(ecx, iters)?;
    a.mov(rbx, 0x200000u64)?;
    a.xor(eax, eax)?;
    a.set_label(&mut lp)?;
    a.add(rax, qword_ptr(rbx))?;
    a.mov(qword_ptr(rbx + 8), rax)?;
    a.lea(rdx, qword_ptr(rax + rcx * 2 + 1))?;
    a.xor(rdx, rax)?;
    a.dec(ecx)?;
    a.jnz(lp)?;
    a.hlt()?;
    let code = a.assemble(0x100000)?;
    ram[0x100000..0x100000 + code.len()].copy_from_slice(&code);

    let mut vcpu = vm.create_emu_vcpu(0);
    let code_seg = Segment::from_gdt_entry(8, 0x00af_9b00_0000_ffff);
    let data_seg = Segment::from_gdt_entry(16, 0x00cf_9300_0000_ffff);
    vcpu.set_sregs(&SpecialRegs {
        cs: code_seg,
        ds: data_seg,
        es: data_seg,
        fs: data_seg,
        gs: data_seg,
        ss: data_seg,
        gdt: DescriptorTable { base: 0, limit: 0 },
        cr0: 0x8000_0011,
        cr3: 0x10000,
        cr4: 0x20,
        efer: 0x500,
        ..Default::default()
    })?;
    vcpu.set_regs(&StandardRegs {
        rip: 0x100000,
        rsp: 0x80000,
        rflags: 2,
        ..Default::default()
    })?;
    let t = Instant::now();
    let exit = format!("{:?}", vcpu.run()?);
    let dt = t.elapsed().as_secs_f64();
    let n = vcpu.core().icount;
    println!(
        "{exit}: {n} instructions in {dt:.3} s = {:.1} MIPS",
        n as f64 / dt / 1e6
    );
    assert!(matches!(exit.as_str(), "Halt"), "{exit}");
    let _ = VcpuExit::Halt;
    drop(vcpu);
    drop(ram);
    Ok(())
}
