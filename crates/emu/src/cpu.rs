//! Architectural state of one vCPU.

use hypervisor::{DescriptorTable, Segment};

use crate::flags::Flags;

/// Segment register indices, in the order the x86 encoding numbers them.
pub const ES: usize = 0;
pub const CS: usize = 1;
pub const SS: usize = 2;
pub const DS: usize = 3;
pub const FS: usize = 4;
pub const GS: usize = 5;

/// GPR indices.
pub const RAX: usize = 0;
pub const RCX: usize = 1;
pub const RDX: usize = 2;
pub const RBX: usize = 3;
pub const RSP: usize = 4;
pub const RBP: usize = 5;
pub const RSI: usize = 6;
pub const RDI: usize = 7;

pub const CR0_PE: u64 = 1 << 0;
pub const CR0_MP: u64 = 1 << 1;
pub const CR0_EM: u64 = 1 << 2;
pub const CR0_TS: u64 = 1 << 3;
pub const CR0_ET: u64 = 1 << 4;
pub const CR0_NE: u64 = 1 << 5;
pub const CR0_WP: u64 = 1 << 16;
pub const CR0_AM: u64 = 1 << 18;
pub const CR0_NW: u64 = 1 << 29;
pub const CR0_CD: u64 = 1 << 30;
pub const CR0_PG: u64 = 1 << 31;

pub const CR4_VME: u64 = 1 << 0;
pub const CR4_PVI: u64 = 1 << 1;
pub const CR4_TSD: u64 = 1 << 2;
pub const CR4_DE: u64 = 1 << 3;
pub const CR4_PSE: u64 = 1 << 4;
pub const CR4_PAE: u64 = 1 << 5;
pub const CR4_MCE: u64 = 1 << 6;
pub const CR4_PGE: u64 = 1 << 7;
pub const CR4_PCE: u64 = 1 << 8;
pub const CR4_OSFXSR: u64 = 1 << 9;
pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
pub const CR4_UMIP: u64 = 1 << 11;
pub const CR4_LA57: u64 = 1 << 12;
pub const CR4_FSGSBASE: u64 = 1 << 16;
pub const CR4_PCIDE: u64 = 1 << 17;
pub const CR4_OSXSAVE: u64 = 1 << 18;
pub const CR4_SMEP: u64 = 1 << 20;
pub const CR4_SMAP: u64 = 1 << 21;

/// CR4 bits the engine lets the guest set (the rest raise #GP).
pub const CR4_SUPPORTED: u64 = CR4_VME
    | CR4_PVI
    | CR4_TSD
    | CR4_DE
    | CR4_PSE
    | CR4_PAE
    | CR4_MCE
    | CR4_PGE
    | CR4_PCE
    | CR4_OSFXSR
    | CR4_OSXMMEXCPT;

pub const EFER_SCE: u64 = 1 << 0;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;
pub const EFER_NXE: u64 = 1 << 11;
/// EFER bits the guest may write (LMA is read-only, set by the CPU).
pub const EFER_WRITABLE: u64 = EFER_SCE | EFER_LME | EFER_NXE;

pub const FLAG_CF: u64 = 1 << 0;
pub const FLAG_FIXED1: u64 = 1 << 1;
pub const FLAG_PF: u64 = 1 << 2;
pub const FLAG_AF: u64 = 1 << 4;
pub const FLAG_ZF: u64 = 1 << 6;
pub const FLAG_SF: u64 = 1 << 7;
pub const FLAG_TF: u64 = 1 << 8;
pub const FLAG_IF: u64 = 1 << 9;
pub const FLAG_DF: u64 = 1 << 10;
pub const FLAG_OF: u64 = 1 << 11;
pub const FLAG_IOPL: u64 = 3 << 12;
pub const FLAG_NT: u64 = 1 << 14;
pub const FLAG_RF: u64 = 1 << 16;
pub const FLAG_VM: u64 = 1 << 17;
pub const FLAG_AC: u64 = 1 << 18;
pub const FLAG_VIF: u64 = 1 << 19;
pub const FLAG_VIP: u64 = 1 << 20;
pub const FLAG_ID: u64 = 1 << 21;
/// The six arithmetic flags the lazy evaluator owns.
pub const FLAGS_ARITH: u64 = FLAG_CF | FLAG_PF | FLAG_AF | FLAG_ZF | FLAG_SF | FLAG_OF;
/// Bits of RFLAGS that exist (the rest read as zero, bit 1 reads as one).
pub const FLAGS_MASK: u64 = FLAGS_ARITH
    | FLAG_TF
    | FLAG_IF
    | FLAG_DF
    | FLAG_IOPL
    | FLAG_NT
    | FLAG_RF
    | FLAG_VM
    | FLAG_AC
    | FLAG_VIF
    | FLAG_VIP
    | FLAG_ID;

/// Model-specific registers the engine keeps (see [`crate::msr`]).
#[derive(Debug, Clone, Default)]
pub struct Msrs {
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub sfmask: u64,
    pub kernel_gs_base: u64,
    pub tsc_aux: u64,
    pub apic_base: u64,
    pub pat: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    /// Added to the host TSC to form the guest's.
    pub tsc_offset: u64,
    /// kvmclock MSR values (guest-physical address | enable bit).
    pub kvm_system_time: u64,
    pub kvm_wall_clock: u64,
}

/// All architectural registers of one vCPU.
#[derive(Debug, Clone)]
pub struct ArchRegs {
    pub gpr: [u64; 16],
    pub rip: u64,
    /// RFLAGS; the arithmetic bits are stale while `flags` holds a pending op.
    pub rflags: u64,
    pub flags: Flags,
    pub seg: [Segment; 6],
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub dr: [u64; 8],
    pub xcr0: u64,
    pub msr: Msrs,
    pub mxcsr: u32,
    pub xmm: [u128; 16],
    pub fpu: Fpu,
}

/// x87 state. Registers hold 80-bit extended values (low 80 bits of each
/// slot), indexed physically; ST(i) is `st[(top + i) & 7]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fpu {
    pub fcw: u16,
    /// Status word without TOP (bits 13:11 come from `top`).
    pub fsw: u16,
    pub top: u8,
    /// Abridged tag word: bit i set = physical register i holds a value.
    pub tag: u8,
    pub st: [u128; 8],
    pub fop: u16,
    pub fip: u64,
    pub fdp: u64,
}

impl Default for Fpu {
    fn default() -> Self {
        Fpu {
            fcw: 0x37f,
            fsw: 0,
            top: 0,
            tag: 0,
            st: [0; 8],
            fop: 0,
            fip: 0,
            fdp: 0,
        }
    }
}

impl Fpu {
    /// FSW as software sees it (TOP folded in).
    pub fn status(&self) -> u16 {
        (self.fsw & !0x3800) | ((self.top as u16 & 7) << 11)
    }
}

impl Default for ArchRegs {
    fn default() -> Self {
        Self::reset()
    }
}

impl ArchRegs {
    /// The state of a CPU just out of RESET (real mode at F000:FFF0).
    pub fn reset() -> Self {
        let mut seg = [Segment::real_mode(0, false); 6];
        seg[CS] = Segment::real_mode(0xf000, true);
        seg[CS].base = 0xffff_0000;
        let mut tr = Segment::real_mode(0, false);
        tr.type_ = 0xb;
        tr.s = false;
        let mut ldt = Segment::real_mode(0, false);
        ldt.type_ = 0x2;
        ldt.s = false;
        ArchRegs {
            gpr: [0; 16],
            rip: 0xfff0,
            rflags: FLAG_FIXED1,
            flags: Flags::default(),
            seg,
            tr,
            ldt,
            gdt: DescriptorTable {
                base: 0,
                limit: 0xffff,
            },
            idt: DescriptorTable {
                base: 0,
                limit: 0xffff,
            },
            cr0: CR0_ET | CR0_CD | CR0_NW,
            cr2: 0,
            cr3: 0,
            cr4: 0,
            cr8: 0,
            efer: 0,
            dr: [0, 0, 0, 0, 0, 0, 0xffff_0ff0, 0x400],
            xcr0: 1,
            msr: Msrs {
                apic_base: 0xfee0_0000 | (1 << 11) | (1 << 8),
                pat: 0x0007_0406_0007_0406,
                ..Default::default()
            },
            mxcsr: 0x1f80,
            xmm: [0; 16],
            fpu: Fpu::default(),
        }
    }

    #[inline]
    pub fn long_mode(&self) -> bool {
        self.efer & EFER_LMA != 0
    }

    #[inline]
    pub fn protected(&self) -> bool {
        self.cr0 & CR0_PE != 0
    }

    #[inline]
    pub fn v86(&self) -> bool {
        self.rflags & FLAG_VM != 0
    }

    /// 64-bit mode proper (not compatibility mode).
    #[inline]
    pub fn mode64(&self) -> bool {
        self.long_mode() && self.seg[CS].l
    }

    /// Current privilege level. Real mode is ring 0; v86 is ring 3.
    #[inline]
    pub fn cpl(&self) -> u8 {
        if !self.protected() {
            0
        } else if self.v86() {
            3
        } else {
            self.seg[CS].dpl
        }
    }

    /// Default operand/address size of the code segment, in bits.
    #[inline]
    pub fn code_bits(&self) -> u32 {
        if self.mode64() {
            64
        } else if self.seg[CS].db && self.protected() && !self.v86() {
            32
        } else {
            16
        }
    }

    /// Stack address size in bytes (SS.B, or 8 in 64-bit mode).
    #[inline]
    pub fn stack_size(&self) -> u8 {
        if self.mode64() {
            8
        } else if self.seg[SS].db {
            4
        } else {
            2
        }
    }

    #[inline]
    pub fn iopl(&self) -> u8 {
        ((self.rflags >> 12) & 3) as u8
    }

    /// Full RFLAGS with the lazy arithmetic flags folded in.
    pub fn get_rflags(&self) -> u64 {
        self.flags.materialize(self.rflags)
    }

    /// Replace RFLAGS; the arithmetic flags become authoritative again.
    pub fn set_rflags(&mut self, v: u64) {
        self.rflags = (v & FLAGS_MASK) | FLAG_FIXED1;
        self.flags = Flags::default();
    }

    /// Fold any pending lazy flag state into `rflags`.
    pub fn settle_flags(&mut self) {
        self.rflags = self.get_rflags();
        self.flags = Flags::default();
    }
}

/// Mask to `size` bytes (1, 2, 4 or 8).
#[inline(always)]
pub fn mask(size: u8) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (size as u32 * 8)) - 1
    }
}

/// Sign-extend the low `size` bytes of `v` to 64 bits.
#[inline(always)]
pub fn sext(v: u64, size: u8) -> u64 {
    if size == 0 || size >= 8 {
        return v;
    }
    let sh = 64 - size as u32 * 8;
    (((v << sh) as i64) >> sh) as u64
}
