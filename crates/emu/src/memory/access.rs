//! The memory path of one vCPU: linear addresses through the software TLB
//! (filled by page walks in [`super::mmu`]) to host RAM or to MMIO, segmented
//! access, and port I/O. What the platform serves (its LAPIC page, IOAPIC,
//! PIC and PIT ports) never leaves the vCPU; everything else becomes an exit
//! request in `Core::io`.

use std::sync::atomic::Ordering;

use crate::core::{fault, gp, Core, Exc, ExitReq, R};
use crate::cpu::{CR0_WP, SS};
use crate::memory::mem::{cas, load, store};
use crate::memory::mmu::{tlb_allows, walk, Access, TlbEntry};

impl Core {
    // ---------------------------------------------------------------- paging

    #[inline(always)]
    pub fn user(&self) -> bool {
        self.st.cpl() == 3
    }

    #[inline(always)]
    fn tlb_entry(&mut self, lin: u64, acc: Access, user: bool) -> R<TlbEntry> {
        if let Some(e) = self.tlb.lookup(lin) {
            if tlb_allows(e.perm, acc, user, self.st.cr0 & CR0_WP != 0) {
                return Ok(*e);
            }
        }
        self.tlb_fill(lin, acc, user)
    }

    #[cold]
    fn tlb_fill(&mut self, lin: u64, acc: Access, user: bool) -> R<TlbEntry> {
        match walk(&self.st, &self.mem, lin, acc, user) {
            Ok(t) if self.st.long_mode() && ((lin << 16) as i64 >> 16) as u64 != lin => {
                // Not cached: the translated code's inline TLB lookup relies
                // on never finding a non-canonical address there.
                Ok(TlbEntry {
                    tag: 0,
                    phys: t.page,
                    host: self
                        .mem
                        .ram_ptr(t.page, 4096)
                        .unwrap_or(std::ptr::null_mut()),
                    code: self.mem.code_flag(t.page),
                    perm: t.perm,
                })
            }
            Ok(t) => {
                let e = TlbEntry {
                    tag: (lin & !0xfff) | 1,
                    phys: t.page,
                    host: self
                        .mem
                        .ram_ptr(t.page, 4096)
                        .unwrap_or(std::ptr::null_mut()),
                    code: self.mem.code_flag(t.page),
                    perm: t.perm,
                };
                self.tlb.fill(lin, e);
                Ok(e)
            }
            Err(error) => Err(Exc::PageFault { addr: lin, error }),
        }
    }

    /// Host address of `lin` if it is in RAM and the access is allowed,
    /// with whether writes there must go through code/dirty tracking;
    /// None on a fault or MMIO (the caller takes its slow path, which
    /// raises the fault).
    pub(crate) fn ram_ptr_lin(
        &mut self,
        lin: u64,
        acc: Access,
        user: bool,
    ) -> Option<(*mut u8, bool)> {
        // Armed watchpoints: every access takes the checked slow path.
        if self.st.dr[7] & 0xff != 0 {
            return None;
        }
        let e = self.tlb_entry(lin, acc, user).ok()?;
        if e.host.is_null() {
            return None;
        }
        // SAFETY: RAM entries have their page's flag (see `tlb_fill`).
        let tracked = unsafe { (*e.code).load(Ordering::Relaxed) } != 0;
        // SAFETY: inside the entry's 4 KiB page.
        Some((unsafe { e.host.add((lin & 0xfff) as usize) }, tracked))
    }

    /// Translate a linear address to physical without side effects on the TLB.
    pub fn translate(&mut self, lin: u64, acc: Access, user: bool) -> R<u64> {
        Ok(self.tlb_entry(lin, acc, user)?.phys | (lin & 0xfff))
    }

    /// Host pointer to the page of `lin` for code fetch, or the physical page.
    pub fn fetch_entry(&mut self, lin: u64) -> R<TlbEntry> {
        let user = self.user();
        self.tlb_entry(lin, Access::Exec, user)
    }

    // ---------------------------------------------------------- linear access

    pub fn read_lin(&mut self, lin: u64, size: u8, user: bool) -> R<u64> {
        if self.watching() {
            self.watch(lin, size, false);
        }
        if (lin & 0xfff) + size as u64 > 0x1000 {
            return self.read_split(lin, size, user);
        }
        let e = self.tlb_entry(lin, Access::Read, user)?;
        if !e.host.is_null() {
            // SAFETY: the entry's host page is 4 KiB of mapped RAM and the
            // access does not cross it.
            Ok(unsafe { load(e.host.add((lin & 0xfff) as usize), size) })
        } else {
            self.mmio_read(e.phys | (lin & 0xfff), size)
        }
    }

    #[cold]
    fn read_split(&mut self, lin: u64, size: u8, user: bool) -> R<u64> {
        let mut v = 0u64;
        for i in 0..size as u64 {
            v |= self.read_lin(lin.wrapping_add(i), 1, user)? << (8 * i);
        }
        Ok(v)
    }

    pub fn write_lin(&mut self, lin: u64, size: u8, val: u64, user: bool) -> R {
        if self.watching() {
            self.watch(lin, size, true);
        }
        if (lin & 0xfff) + size as u64 > 0x1000 {
            return self.write_split(lin, size, val, user);
        }
        let e = self.tlb_entry(lin, Access::Write, user)?;
        if !e.host.is_null() {
            // SAFETY: as in `read_lin`.
            unsafe {
                store(e.host.add((lin & 0xfff) as usize), size, val);
                if (*e.code).load(Ordering::Relaxed) != 0 {
                    self.code_written(e.phys | (lin & 0xfff), size as u64);
                }
            }
            Ok(())
        } else {
            self.mmio_write(e.phys | (lin & 0xfff), size, val)
        }
    }

    #[cold]
    fn write_split(&mut self, lin: u64, size: u8, val: u64, user: bool) -> R {
        // Check both pages before writing anything: no partial writes on #PF.
        let last = lin.wrapping_add(size as u64 - 1);
        self.tlb_entry(lin, Access::Write, user)?;
        self.tlb_entry(last, Access::Write, user)?;
        for i in 0..size as u64 {
            self.write_lin(lin.wrapping_add(i), 1, val >> (8 * i), user)?;
        }
        Ok(())
    }

    #[cold]
    fn code_written(&mut self, gpa: u64, len: u64) {
        if self.mem.note_write_gpa(gpa, len) {
            // The running block may be the one just modified.
            self.end_block = true;
        }
    }

    /// Read-modify-write; with `locked` the update is one atomic operation
    /// on guest RAM, so other vCPU threads see LOCK semantics. `f` may run
    /// more than once. Returns the old value.
    pub fn rmw_lin(
        &mut self,
        lin: u64,
        size: u8,
        locked: bool,
        user: bool,
        f: &mut dyn FnMut(u64) -> u64,
    ) -> R<u64> {
        let aligned = lin & (size as u64 - 1) == 0;
        if self.watching() {
            self.watch(lin, size, true);
        }
        if (lin & 0xfff) + size as u64 <= 0x1000 {
            let e = self.tlb_entry(lin, Access::Write, user)?;
            if !e.host.is_null() {
                // SAFETY: inside one mapped RAM page; CAS only when aligned.
                let p = unsafe { e.host.add((lin & 0xfff) as usize) };
                // SAFETY: `p` is in that page with `size` bytes after it; the
                // CAS only when aligned.
                let old = unsafe {
                    if locked && aligned {
                        let mut old = load(p, size);
                        loop {
                            let found = cas(p, size, old, f(old));
                            if found == old {
                                break old;
                            }
                            old = found;
                        }
                    } else {
                        let old = load(p, size);
                        store(p, size, f(old));
                        old
                    }
                };
                // SAFETY: the code flag pointer comes from the same region.
                if unsafe { (*e.code).load(Ordering::Relaxed) } != 0 {
                    self.code_written(e.phys | (lin & 0xfff), size as u64);
                }
                return Ok(old);
            }
        }
        // Split or MMIO: not atomic (a split-locked access is rare and slow on
        // real hardware too).
        self.tlb_entry(lin, Access::Write, user)?;
        let old = self.read_lin(lin, size, user)?;
        self.write_lin(lin, size, f(old), user)?;
        Ok(old)
    }

    // --------------------------------------------------------- segmented access

    /// Linear address of `seg:off`; #GP/#SS on a non-canonical 64-bit address.
    #[inline(always)]
    pub fn lin(&self, seg: usize, off: u64) -> R<u64> {
        if self.st.mode64() {
            let a = if seg >= 4 {
                off.wrapping_add(self.st.seg[seg].base)
            } else {
                off
            };
            if ((a << 16) as i64 >> 16) as u64 != a {
                return Err(if seg == SS { fault(12, Some(0)) } else { gp(0) });
            }
            Ok(a)
        } else {
            Ok(self.st.seg[seg].base.wrapping_add(off) & 0xffff_ffff)
        }
    }

    #[inline]
    pub fn read_mem(&mut self, seg: usize, off: u64, size: u8) -> R<u64> {
        let lin = self.lin(seg, off)?;
        let user = self.user();
        self.read_lin(lin, size, user)
    }

    #[inline]
    pub fn write_mem(&mut self, seg: usize, off: u64, size: u8, val: u64) -> R {
        let lin = self.lin(seg, off)?;
        let user = self.user();
        self.write_lin(lin, size, val, user)
    }

    /// Implicit supervisor-mode read (descriptor tables, TSS, IDT).
    pub fn read_sys(&mut self, lin: u64, size: u8) -> R<u64> {
        self.read_lin(lin, size, false)
    }

    pub fn write_sys(&mut self, lin: u64, size: u8, val: u64) -> R {
        self.write_lin(lin, size, val, false)
    }

    // ------------------------------------------------------------- MMIO / IO

    fn take_response(&mut self, is_io: bool, addr: u64, size: u8) -> Option<u64> {
        match self.io.response {
            Some(r) if r.is_io == is_io && r.addr == addr && r.size == size => {
                self.io.response = None;
                Some(r.data)
            }
            _ => None,
        }
    }

    fn mmio_read(&mut self, addr: u64, size: u8) -> R<u64> {
        let base = self.st.msr.apic_base;
        if let Some(v) = self.platform.mmio_read(self.index, base, addr, size) {
            return Ok(v);
        }
        if let Some(v) = self.take_response(false, addr, size) {
            return Ok(v);
        }
        self.io.request = Some(ExitReq::MmioRead { addr, size });
        Err(Exc::Exit)
    }

    fn mmio_write(&mut self, addr: u64, size: u8, data: u64) -> R {
        let base = self.st.msr.apic_base;
        if self.platform.mmio_write(self.index, base, addr, size, data) {
            // EOI, TPR, or an IPI to self.
            self.request_poll();
            return Ok(());
        }
        if self.io.request.is_some() {
            return Err(Exc::unimplemented(
                "more than one MMIO access in one instruction",
            ));
        }
        self.io.request = Some(ExitReq::MmioWrite { addr, size, data });
        Ok(())
    }

    pub fn io_in(&mut self, port: u16, size: u8) -> R<u64> {
        if let Some((v, repoll)) = self.platform.pio_in(port, size) {
            if repoll {
                self.request_poll();
            }
            return Ok(v);
        }
        if let Some(v) = self.take_response(true, port as u64, size) {
            return Ok(v);
        }
        self.io.request = Some(ExitReq::IoIn { port, size });
        Err(Exc::Exit)
    }

    pub fn io_out(&mut self, port: u16, size: u8, data: u64) -> R {
        if self.platform.pio_out(port, size, data) {
            // An EOI or an unmask may have made an interrupt deliverable.
            self.request_poll();
            return Ok(());
        }
        if self.io.request.is_some() {
            return Err(Exc::unimplemented(
                "more than one port access in one instruction",
            ));
        }
        self.io.request = Some(ExitReq::IoOut { port, size, data });
        Ok(())
    }
}
