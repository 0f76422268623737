//! Shared test harness: a VM with Vec-backed RAM, helpers to build a 64-bit
//! (or other mode) environment and to run assembled guest code.
#![allow(dead_code)]

use emu::{EmuVcpu, EmuVm};
use hypervisor::{DescriptorTable, Segment, SpecialRegs, StandardRegs, Vcpu, VcpuExit, Vm};
use iced_x86::code_asm::{CodeAssembler, IcedError};

/// Arithmetic flag bits of RFLAGS.
pub const CF: u64 = 1;
pub const PF: u64 = 4;
pub const AF: u64 = 0x10;
pub const ZF: u64 = 0x40;
pub const SF: u64 = 0x80;
pub const OF: u64 = 0x800;

/// The random-program tests' seed unless one is given.
pub const DEFAULT_SEED: u64 = 0x2545_f491_4f6c_dd1d;

/// An opt-in random-program run at scale (`scripts/diff-random.sh`): the
/// number of programs and the seed come from `VIREO_DIFF_CASES` (default
/// one million) and `VIREO_DIFF_SEED` (default [`DEFAULT_SEED`]); `run`
/// checks that many programs from that seed against the host CPU, the
/// interpreter and the translator (`what` names the tiers or the code
/// size for the report) and returns the programs and instructions
/// checked. Prints the `VIREO-DIFF` line the script totals.
pub fn at_scale(what: &str, run: impl FnOnce(usize, u64) -> (usize, u64)) {
    let var = |name: &str, default: u64| match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?}: not a number")),
        Err(_) => default,
    };
    let cases = var("VIREO_DIFF_CASES", 1_000_000) as usize;
    let seed = var("VIREO_DIFF_SEED", DEFAULT_SEED);
    let t = std::time::Instant::now();
    let (programs, instructions) = run(cases, seed);
    let s = t.elapsed().as_secs_f64();
    println!(
        "VIREO-DIFF seed {seed:#x}: {programs} programs, {instructions} instructions, \
         each on the host CPU, the interpreter and the translator ({what}): \
         0 mismatches in {s:.1} s ({:.0} programs/s)",
        programs as f64 / s
    );
}

/// The machine code `f` assembles for `bits`-bit code placed at `at`.
pub fn assemble(
    bits: u32,
    at: u64,
    f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Vec<u8> {
    let mut a = CodeAssembler::new(bits).unwrap();
    f(&mut a).unwrap();
    a.assemble(at).unwrap()
}

pub const GDT: u64 = 0x1000;
pub const IDT: u64 = 0x2000;
pub const TSS: u64 = 0x3000;
pub const STUBS: u64 = 0x5000;
pub const PML4: u64 = 0x10000;
pub const PDPT: u64 = 0x11000;
pub const PD: u64 = 0x12000;
/// 4 KiB page table covering 0x400000..0x600000 (PD entry 2).
pub const PT: u64 = 0x13000;
pub const CODE: u64 = 0x100000;
pub const STACK_TOP: u64 = 0x80000;
pub const DATA: u64 = 0x200000;

pub const SEL_CODE64: u16 = 0x08;
pub const SEL_DATA: u16 = 0x10;
pub const SEL_CODE32: u16 = 0x18;
pub const SEL_UDATA: u16 = 0x20 | 3;
pub const SEL_UCODE64: u16 = 0x28 | 3;
pub const SEL_TSS: u16 = 0x30;

/// An owned copy of a `VcpuExit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ex {
    Halt,
    Shutdown,
    IoOut(u16, Vec<u8>),
    IoIn(u16, usize),
    MmioRead(u64, usize),
    MmioWrite(u64, Vec<u8>),
    Internal(String),
    Interrupted,
    Other(String),
}

pub struct Guest {
    // Field order matters: the vCPU and VM hold raw pointers into `ram`.
    pub vcpu: EmuVcpu,
    pub vm: EmuVm,
    pub ram: Box<[u8]>,
}

impl Guest {
    pub fn new(size: usize) -> Guest {
        Self::with_platform(size, None, Default::default())
    }

    /// A guest whose VM has `intc` as interrupt controller and `cpuid`.
    pub fn with_platform(
        size: usize,
        intc: Option<std::sync::Arc<dyn emu::InterruptController>>,
        cpuid: emu::cpuid::CpuidConfig,
    ) -> Guest {
        let mut ram = vec![0u8; size].into_boxed_slice();
        let vm = EmuVm::new();
        if let Some(i) = intc {
            vm.set_interrupt_controller(i);
        }
        vm.set_cpuid_config(cpuid);
        // SAFETY: `ram` lives as long as the Guest and is dropped last.
        unsafe {
            vm.map_memory(0, 0, size as u64, ram.as_mut_ptr() as u64)
                .unwrap()
        };
        let vcpu = vm.create_emu_vcpu(0);
        Guest { vcpu, vm, ram }
    }

    pub fn write(&mut self, addr: u64, bytes: &[u8]) {
        self.ram[addr as usize..addr as usize + bytes.len()].copy_from_slice(bytes);
    }

    pub fn w64(&mut self, addr: u64, v: u64) {
        self.write(addr, &v.to_le_bytes());
    }

    pub fn w32(&mut self, addr: u64, v: u32) {
        self.write(addr, &v.to_le_bytes());
    }

    pub fn r64(&self, addr: u64) -> u64 {
        u64::from_le_bytes(
            self.ram[addr as usize..addr as usize + 8]
                .try_into()
                .unwrap(),
        )
    }

    pub fn r32(&self, addr: u64) -> u32 {
        u32::from_le_bytes(
            self.ram[addr as usize..addr as usize + 4]
                .try_into()
                .unwrap(),
        )
    }

    pub fn r8(&self, addr: u64) -> u8 {
        self.ram[addr as usize]
    }

    pub fn regs(&self) -> StandardRegs {
        self.vcpu.get_regs().unwrap()
    }

    pub fn sregs(&self) -> SpecialRegs {
        self.vcpu.get_sregs().unwrap()
    }

    pub fn set_regs(&mut self, r: &StandardRegs) {
        self.vcpu.set_regs(r).unwrap()
    }

    /// GDT, IDT with one stub per vector (`mov eax, vector; hlt`), TSS,
    /// identity page tables (2 MiB pages for the first GiB, except
    /// 0x400000..0x600000 which uses 4 KiB pages), 64-bit ring 0.
    pub fn long_mode(&mut self) {
        let gdt: [u64; 8] = [
            0,
            0x00af_9b00_0000_ffff,
            0x00cf_9300_0000_ffff,
            0x00cf_9b00_0000_ffff,
            0x00cf_f300_0000_ffff,
            0x00af_fb00_0000_ffff,
            0,
            0,
        ];
        for (i, d) in gdt.iter().enumerate() {
            self.w64(GDT + i as u64 * 8, *d);
        }
        // 64-bit TSS descriptor at 0x30.
        let base = TSS;
        let limit = 0x67u64;
        let lo =
            limit | ((base & 0xff_ffff) << 16) | (0x89u64 << 40) | (((base >> 24) & 0xff) << 56);
        self.w64(GDT + 0x30, lo);
        self.w64(GDT + 0x38, base >> 32);
        // TSS.RSP0 and IST1.
        self.w64(TSS + 4, 0x70000);
        self.w64(TSS + 0x24, 0x60000);
        for v in 0..256u64 {
            let stub = STUBS + v * 16;
            self.write(stub, &[0xb8, v as u8, 0, 0, 0, 0xf4]);
            let lo = (stub & 0xffff)
                | ((SEL_CODE64 as u64) << 16)
                | (0x8eu64 << 40)
                | (((stub >> 16) & 0xffff) << 48);
            self.w64(IDT + v * 16, lo);
            self.w64(IDT + v * 16 + 8, stub >> 32);
        }
        self.w64(PML4, PDPT | 7);
        self.w64(PDPT, PD | 7);
        for i in 0..512u64 {
            self.w64(PD + i * 8, (i << 21) | 0x87);
        }
        self.w64(PD + 2 * 8, PT | 7);
        for i in 0..512u64 {
            self.w64(PT + i * 8, (0x400000 + (i << 12)) | 7);
        }
        let code = Segment::from_gdt_entry(SEL_CODE64, gdt[1]);
        let data = Segment::from_gdt_entry(SEL_DATA, gdt[2]);
        let mut tr = Segment::from_gdt_entry(SEL_TSS, lo);
        tr.type_ = 0xb;
        let s = SpecialRegs {
            cs: code,
            ds: data,
            es: data,
            fs: data,
            gs: data,
            ss: data,
            tr,
            ldt: Segment {
                unusable: true,
                ..Default::default()
            },
            gdt: DescriptorTable {
                base: GDT,
                limit: 0x3f,
            },
            idt: DescriptorTable {
                base: IDT,
                limit: 0xfff,
            },
            cr0: 0x8000_0011 | (1 << 16),
            cr3: PML4,
            // PAE, OSFXSR, OSXMMEXCPT.
            cr4: (1 << 5) | (1 << 9) | (1 << 10),
            efer: (1 << 8) | (1 << 10) | (1 << 11) | 1,
            ..Default::default()
        };
        self.vcpu.set_sregs(&s).unwrap();
        let r = StandardRegs {
            rip: CODE,
            rsp: STACK_TOP,
            rflags: 2,
            ..Default::default()
        };
        self.vcpu.set_regs(&r).unwrap();
    }

    /// Load 64-bit code at CODE and point RIP at it.
    pub fn load_code(&mut self, code: &[u8]) {
        self.write(CODE, code);
        let mut r = self.regs();
        r.rip = CODE;
        self.set_regs(&r);
    }

    /// Run once; read exits get `in_value` as their data.
    pub fn run_io(&mut self, in_value: u64) -> Ex {
        match self.vcpu.run().unwrap() {
            VcpuExit::Halt => Ex::Halt,
            VcpuExit::Shutdown => Ex::Shutdown,
            VcpuExit::Interrupted => Ex::Interrupted,
            VcpuExit::IoOut { port, data } => Ex::IoOut(port, data.to_vec()),
            VcpuExit::IoIn { port, data } => {
                let n = data.len();
                data.copy_from_slice(&in_value.to_le_bytes()[..n]);
                Ex::IoIn(port, n)
            }
            VcpuExit::MmioRead { addr, data } => {
                let n = data.len();
                data.copy_from_slice(&in_value.to_le_bytes()[..n]);
                Ex::MmioRead(addr, n)
            }
            VcpuExit::MmioWrite { addr, data } => Ex::MmioWrite(addr, data.to_vec()),
            VcpuExit::InternalError(e) => Ex::Internal(e.to_string()),
            other => Ex::Other(format!("{other:?}")),
        }
    }

    pub fn run(&mut self) -> Ex {
        self.run_io(0)
    }

    /// Run to HLT, failing on any other exit.
    pub fn run_to_halt(&mut self) {
        let e = self.run();
        assert_eq!(e, Ex::Halt, "regs {:x?}", self.regs());
    }
}

/// Assemble 64-bit code at CODE.
#[macro_export]
macro_rules! asm64 {
    (|$a:ident| $body:block) => {{
        use iced_x86::code_asm::*;
        let mut $a = CodeAssembler::new(64).unwrap();
        (|| -> Result<(), IcedError> {
            $body
            Ok(())
        })()
        .unwrap();
        $a.assemble(common::CODE).unwrap()
    }};
}
