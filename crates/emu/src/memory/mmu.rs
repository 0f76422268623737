//! Linear-to-physical translation: paging walks and the software TLB.
//!
//! The TLB is direct-mapped by linear page number. An entry caches the
//! physical page, a host pointer when the page is RAM, and the combined
//! permissions of the walk; beside it, per privilege class, the entry the
//! generated code reads (an exact tag per access kind and a host addend,
//! see [`FastEntry`]). Writes only hit an entry whose leaf already has the
//! dirty bit set, so D is always set by a walk.

use std::sync::atomic::AtomicU8;

use crate::cpu::{ArchRegs, CR0_PG, CR0_WP, CR4_PAE, CR4_PGE, CR4_PSE, EFER_NXE};
use crate::memory::mem::MemView;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    Exec,
}

pub const PF_P: u32 = 1;
pub const PF_W: u32 = 2;
pub const PF_U: u32 = 4;
pub const PF_RSVD: u32 = 8;
pub const PF_I: u32 = 16;

/// Combined permission bits of a translation.
pub const PERM_USER: u8 = 1;
pub const PERM_WRITE: u8 = 2;
pub const PERM_NX: u8 = 4;
pub const PERM_DIRTY: u8 = 8;
pub const PERM_GLOBAL: u8 = 16;

/// Physical address bits the engine reports (CPUID 0x80000008) and enforces.
pub const MAX_PHYS_BITS: u32 = 40;
const PHYS_MASK: u64 = ((1u64 << MAX_PHYS_BITS) - 1) & !0xfff;
/// Bits 51:MAXPHYADDR of an entry must be zero.
const RSVD_HIGH: u64 = ((1u64 << 52) - 1) & !((1u64 << MAX_PHYS_BITS) - 1);

const P: u64 = 1;
const RW: u64 = 2;
const US: u64 = 4;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
const PS: u64 = 1 << 7;
const G: u64 = 1 << 8;
const XD: u64 = 1 << 63;

/// The result of a successful walk.
#[derive(Debug, Clone, Copy)]
pub struct Translation {
    /// Physical address of the 4 KiB page holding the linear address.
    pub page: u64,
    pub perm: u8,
}

pub const TLB_SIZE: usize = 512;

/// What the interpreter (the Rust side) knows of a cached translation: the
/// "full" entry, TCG's `CPUTLBEntryFull`.
#[derive(Clone, Copy)]
pub struct TlbEntry {
    /// Linear page address | 1 when valid.
    pub tag: u64,
    pub phys: u64,
    /// Host address of the page start, null for MMIO pages.
    pub host: *mut u8,
    /// The page's "holds decoded code" flag: writes check it.
    pub code: *const AtomicU8,
    pub perm: u8,
}

impl Default for TlbEntry {
    fn default() -> Self {
        TlbEntry {
            tag: 0,
            phys: 0,
            host: std::ptr::null_mut(),
            code: std::ptr::null(),
            perm: 0,
        }
    }
}

/// The entry the generated code reads (32 bytes, TCG's `CPUTLBEntry`): per
/// access kind a tag that equals the page's linear address exactly when
/// that access may take the inline path at the table's privilege class,
/// and [`FAST_NONE`] otherwise; and the addend that turns a linear address
/// in the page into its host address.
///
/// A read tag is set when the page is RAM (and, in the user table, user
/// accessible); a write tag when it is also writable at that class by the
/// page tables' R/W bit alone (a supervisor write to a read-only page with
/// CR0.WP clear is allowed, but takes the slow path) and the leaf's dirty
/// bit is set. So the tags depend on the walk's permissions and the class
/// only, never on CR0.WP. What a write must still check inline is the
/// page's code/dirty-tracking flag (`code`), which other threads set at
/// any time.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct FastEntry {
    pub read: u64,
    pub write: u64,
    /// Host address of the page minus its linear address (wrapping).
    pub addend: u64,
    /// The page's code/dirty-tracking flag (as in [`TlbEntry::code`]).
    pub code: *const AtomicU8,
}

/// A fast tag that no access takes: no page-aligned address has bit 0 set.
pub const FAST_NONE: u64 = u64::MAX;

impl FastEntry {
    const NONE: FastEntry = FastEntry {
        read: FAST_NONE,
        write: FAST_NONE,
        addend: 0,
        code: std::ptr::null(),
    };
}

// The generated code indexes the fast table with a shift.
const _: () = assert!(std::mem::size_of::<FastEntry>() == 32);

/// The software TLB: direct-mapped by linear page number, one full entry
/// per index for the interpreter, and per privilege class (supervisor,
/// user: TCG's MMU indexes) one [`FastEntry`] per index for the generated
/// code. Invariant: the fast entries at an index are derived from the full
/// entry there (its page, `perm` and `host`); whenever a full entry is
/// filled or dropped, so are both fast entries at its index. One walk
/// therefore serves both classes.
pub struct Tlb {
    entries: Box<[TlbEntry]>,
    /// The supervisor class's entries, then the user class's.
    fast: Box<[FastEntry]>,
    /// Advanced by 2 at every flush (the low bit stays clear: link keys put
    /// the CPL's user bit there). A link made under the current epoch is
    /// followed without looking at the TLB; one made under an older epoch
    /// is checked against the TLB entry of its target's page first (see
    /// [`crate::jit::runtime`]).
    pub epoch: u64,
    /// Whole-TLB flushes (all entries, or all but global ones): statistics.
    pub flushes: u64,
}

// SAFETY: the raw pointers point into RAM regions the VM keeps alive; the TLB
// is owned by one vCPU thread at a time.
unsafe impl Send for Tlb {}

impl Default for Tlb {
    fn default() -> Self {
        Tlb {
            entries: vec![TlbEntry::default(); TLB_SIZE].into_boxed_slice(),
            fast: vec![FastEntry::NONE; 2 * TLB_SIZE].into_boxed_slice(),
            epoch: 0,
            flushes: 0,
        }
    }
}

impl Tlb {
    #[inline(always)]
    pub fn index(lin: u64) -> usize {
        ((lin >> 12) as usize) & (TLB_SIZE - 1)
    }

    #[inline(always)]
    pub fn lookup(&self, lin: u64) -> Option<&TlbEntry> {
        let e = &self.entries[Self::index(lin)];
        if e.tag == (lin & !0xfff) | 1 {
            Some(e)
        } else {
            None
        }
    }

    /// The full entries (what the link revalidation of generated code reads).
    pub fn entries(&self) -> &[TlbEntry] {
        &self.entries
    }

    /// The fast entries of the privilege class of CPL 3 (`user`) or of
    /// CPL 0-2.
    pub fn fast(&self, user: bool) -> &[FastEntry] {
        &self.fast[user as usize * TLB_SIZE..][..TLB_SIZE]
    }

    /// Cache `e` (made for linear page `lin & !0xfff`, canonical) and its
    /// fast entries.
    pub fn fill(&mut self, lin: u64, e: TlbEntry) {
        let i = Self::index(lin);
        self.entries[i] = e;
        let page = lin & !0xfff;
        let ram = !e.host.is_null();
        let tag = |ok: bool| if ram && ok { page } else { FAST_NONE };
        let writable = e.perm & (PERM_WRITE | PERM_DIRTY) == PERM_WRITE | PERM_DIRTY;
        let user = e.perm & PERM_USER != 0;
        let addend = (e.host as u64).wrapping_sub(page);
        self.fast[i] = FastEntry {
            read: tag(true),
            write: tag(writable),
            addend,
            code: e.code,
        };
        self.fast[TLB_SIZE + i] = FastEntry {
            read: tag(user),
            write: tag(user && writable),
            addend,
            code: e.code,
        };
    }

    /// Drop the entries at index `i` (the fast ones' tags are enough).
    #[inline(always)]
    fn drop_index(&mut self, i: usize) {
        self.entries[i].tag = 0;
        for f in [i, TLB_SIZE + i] {
            self.fast[f].read = FAST_NONE;
            self.fast[f].write = FAST_NONE;
        }
    }

    pub fn flush_all(&mut self) {
        self.epoch += 2;
        self.flushes += 1;
        for i in 0..TLB_SIZE {
            if self.entries[i].tag != 0 {
                self.drop_index(i);
            }
        }
    }

    /// CR3 load: global pages survive when CR4.PGE is on.
    pub fn flush_nonglobal(&mut self) {
        self.epoch += 2;
        self.flushes += 1;
        for i in 0..TLB_SIZE {
            let e = &self.entries[i];
            if e.tag != 0 && e.perm & PERM_GLOBAL == 0 {
                self.drop_index(i);
            }
        }
    }

    pub fn flush_page(&mut self, lin: u64) {
        self.epoch += 2;
        let i = Self::index(lin);
        if self.entries[i].tag == (lin & !0xfff) | 1 {
            self.drop_index(i);
        }
    }
}

/// Page-table walk for `lin`. On failure returns the #PF error code.
pub fn walk(
    st: &ArchRegs,
    mem: &MemView,
    lin: u64,
    acc: Access,
    user: bool,
) -> Result<Translation, u32> {
    if st.cr0 & CR0_PG == 0 {
        let page = if st.long_mode() {
            lin
        } else {
            lin & 0xffff_ffff
        } & !0xfff;
        return Ok(Translation {
            page,
            perm: PERM_USER | PERM_WRITE | PERM_DIRTY,
        });
    }
    let nxe = st.efer & EFER_NXE != 0;
    let base_err = match acc {
        Access::Write => PF_W,
        Access::Exec if nxe => PF_I,
        _ => 0,
    } | if user { PF_U } else { 0 };

    // Entries visited, so A bits are set only once the walk succeeds.
    let mut visited: [(u64, bool); 4] = [(0, false); 4];
    let mut nvisited = 0;
    let mut allow = RW | US;
    let mut nx = false;
    let leaf_addr;
    let leaf;
    let page;
    let wide = st.cr4 & CR4_PAE != 0;

    let rsvd_common = |e: u64| -> bool { e & RSVD_HIGH != 0 || (!nxe && e & XD != 0) };

    if st.long_mode() || wide {
        // Long mode: PML4 -> PDPT -> PD -> PT. PAE: 4 PDPTEs -> PD -> PT.
        let mut table = st.cr3 & PHYS_MASK;
        let mut level: u32 = if st.long_mode() { 4 } else { 3 };
        if !st.long_mode() {
            let a = (st.cr3 & 0xffff_ffe0) + ((lin >> 30) & 3) * 8;
            let e = mem.read_phys(a, 8).unwrap_or(0);
            if e & P == 0 {
                return Err(base_err);
            }
            if e & RSVD_HIGH != 0 || e & 0x1e6 != 0 {
                return Err(base_err | PF_P | PF_RSVD);
            }
            table = e & PHYS_MASK;
            level = 2;
        }
        loop {
            let shift = 12 + 9 * (level - 1);
            let a = table + ((lin >> shift) & 511) * 8;
            let e = mem.read_phys(a, 8).unwrap_or(0);
            if e & P == 0 {
                return Err(base_err);
            }
            if rsvd_common(e) || (level == 4 && e & PS != 0) {
                return Err(base_err | PF_P | PF_RSVD);
            }
            allow &= e;
            nx |= e & XD != 0;
            visited[nvisited] = (a, e & A != 0);
            nvisited += 1;
            if level == 1 || (level <= 3 && e & PS != 0) {
                let size_mask = (1u64 << shift) - 1;
                if level > 1 && (e & PHYS_MASK & size_mask & !0x1fff) != 0 {
                    // Large-page address bits below the page size are reserved
                    // (bit 12 is PAT).
                    return Err(base_err | PF_P | PF_RSVD);
                }
                let frame = if level > 1 {
                    e & PHYS_MASK & !size_mask & !0x1000
                } else {
                    e & PHYS_MASK
                };
                page = frame | (lin & size_mask & !0xfff);
                leaf_addr = a;
                leaf = e;
                break;
            }
            table = e & PHYS_MASK;
            level -= 1;
        }
    } else {
        // 32-bit paging with 4 KiB pages or (CR4.PSE) 4 MiB pages.
        let a = (st.cr3 & 0xffff_f000) + ((lin >> 22) & 1023) * 4;
        let e = mem.read_phys(a, 4).unwrap_or(0);
        if e & P == 0 {
            return Err(base_err);
        }
        allow &= e;
        visited[0] = (a, e & A != 0);
        nvisited = 1;
        if e & PS != 0 && st.cr4 & CR4_PSE != 0 {
            page = (e & 0xffc0_0000) | ((e >> 13) & 0xff) << 32 | (lin & 0x3f_f000);
            leaf_addr = a;
            leaf = e;
        } else {
            let a2 = (e & 0xffff_f000) + ((lin >> 12) & 1023) * 4;
            let e2 = mem.read_phys(a2, 4).unwrap_or(0);
            if e2 & P == 0 {
                return Err(base_err);
            }
            allow &= e2;
            visited[1] = (a2, e2 & A != 0);
            nvisited = 2;
            page = e2 & 0xffff_f000;
            leaf_addr = a2;
            leaf = e2;
        }
    }

    let user_ok = allow & US != 0;
    let write_ok = allow & RW != 0;
    let fault = match acc {
        Access::Read => user && !user_ok,
        Access::Write => (user && !user_ok) || (!write_ok && (user || st.cr0 & CR0_WP != 0)),
        Access::Exec => (user && !user_ok) || (nxe && nx),
    };
    if fault {
        return Err(base_err | PF_P);
    }

    let wide_entries = st.long_mode() || wide;
    for &(a, has_a) in &visited[..nvisited] {
        if !has_a {
            set_bits(mem, a, A, wide_entries);
        }
    }
    let mut dirty = leaf & D != 0;
    if acc == Access::Write && !dirty {
        set_bits(mem, leaf_addr, D, wide_entries);
        dirty = true;
    }

    let mut perm = 0;
    if user_ok {
        perm |= PERM_USER;
    }
    // Supervisor writes to read-only pages are allowed when CR0.WP is clear;
    // PERM_WRITE means "writable by the supervisor" in that case, and user
    // writes additionally need PERM_USER plus the real R/W bit, so keep both.
    if write_ok {
        perm |= PERM_WRITE;
    }
    if nx && nxe {
        perm |= PERM_NX;
    }
    if dirty {
        perm |= PERM_DIRTY;
    }
    if leaf & G != 0 && st.cr4 & CR4_PGE != 0 {
        perm |= PERM_GLOBAL;
    }
    Ok(Translation { page, perm })
}

fn set_bits(mem: &MemView, a: u64, bits: u64, wide: bool) {
    if wide {
        mem.fetch_or_phys_u64(a, bits);
    } else {
        mem.fetch_or_phys_u32(a, bits as u32);
    }
}

/// Does a cached translation allow this access without a new walk?
#[inline(always)]
pub fn tlb_allows(perm: u8, acc: Access, user: bool, wp: bool) -> bool {
    if user && perm & PERM_USER == 0 {
        return false;
    }
    match acc {
        Access::Read => true,
        Access::Write => perm & PERM_DIRTY != 0 && (perm & PERM_WRITE != 0 || (!user && !wp)),
        Access::Exec => perm & PERM_NX == 0,
    }
}
