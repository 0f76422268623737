//! Backend-neutral register state. Both backends convert to and from these.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StandardRegs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// A segment register with its hidden descriptor cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    /// Descriptor type field (4 bits).
    pub type_: u8,
    pub present: bool,
    pub dpl: u8,
    /// D/B bit: 32-bit default operand size.
    pub db: bool,
    /// S bit: code/data (true) or system (false).
    pub s: bool,
    /// L bit: 64-bit code segment.
    pub l: bool,
    pub g: bool,
    pub avl: bool,
    pub unusable: bool,
}

impl Segment {
    /// A flat segment built from a GDT entry's access byte and flags.
    pub fn from_gdt_entry(selector: u16, entry: u64) -> Self {
        let base = ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24);
        let mut limit = ((entry & 0xffff) | (((entry >> 48) & 0xf) << 16)) as u32;
        let g = (entry >> 55) & 1 == 1;
        if g {
            limit = (limit << 12) | 0xfff;
        }
        Segment {
            base,
            limit,
            selector,
            type_: ((entry >> 40) & 0xf) as u8,
            s: (entry >> 44) & 1 == 1,
            dpl: ((entry >> 45) & 3) as u8,
            present: (entry >> 47) & 1 == 1,
            avl: (entry >> 52) & 1 == 1,
            l: (entry >> 53) & 1 == 1,
            db: (entry >> 54) & 1 == 1,
            g,
            unusable: false,
        }
    }

    /// A real-mode segment for `selector` (base = selector * 16, 64 KiB limit).
    pub fn real_mode(selector: u16, code: bool) -> Self {
        Segment {
            base: (selector as u64) << 4,
            limit: 0xffff,
            selector,
            type_: if code { 0xb } else { 0x3 },
            present: true,
            s: true,
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpecialRegs {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
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
    pub apic_base: u64,
}

/// Everything needed to start a vCPU at a chosen entry point.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuState {
    pub regs: StandardRegs,
    pub sregs: SpecialRegs,
}

pub const CR0_PE: u64 = 1 << 0;
pub const CR0_ET: u64 = 1 << 4;
pub const CR0_NE: u64 = 1 << 5;
pub const CR0_PG: u64 = 1 << 31;
pub const CR4_PAE: u64 = 1 << 5;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entry_decodes_flat_64bit_code() {
        // 0x00af9b000000ffff: the classic long-mode kernel code segment.
        let s = Segment::from_gdt_entry(0x10, 0x00af_9b00_0000_ffff);
        assert_eq!(s.base, 0);
        assert_eq!(s.limit, 0xffff_ffff);
        assert!(s.l && s.g && s.present && s.s);
        assert!(!s.db);
        assert_eq!(s.type_, 0xb);
        assert_eq!(s.dpl, 0);
    }
}
