//! The run loop of one vCPU (QEMU's `cpu-exec.c`): poll the platform for
//! interrupts, INIT and start-up IPIs; sleep through HLT; run the next block
//! through the translator or the interpreter, chained to the last one when
//! nothing in between could change what runs; turn exceptions and exit
//! requests into [`RunExit`]s for the backend.

use std::sync::atomic::Ordering;

use crate::core::{BlockPtr, Core, Exc, IoExchange, RunExit, HIST_BLOCK, POLL_INTERVAL};
use crate::cpu::{ArchRegs, CS, FLAG_IF};
use crate::platform::{CpuView, Event, Idle};

impl Core {
    /// Run until something needs the VMM.
    pub fn run(&mut self) -> RunExit {
        if self.mem.refresh() {
            self.flush_all_caches();
        }
        // Whatever the VMM did while we were out may have raised an interrupt
        // or changed registers: poll, and do not chain across it.
        self.poll_now = true;
        self.prev_block = BlockPtr::NONE;
        loop {
            if self.kick.load(Ordering::Relaxed) && self.kick.swap(false, Ordering::AcqRel) {
                return RunExit::Interrupted;
            }
            // A debugger's single step runs the next instruction, not an
            // interrupt handler's first (QEMU's default too), unless the
            // vCPU sleeps in HLT and only an interrupt can go on.
            if !self.int_shadow && (!self.host_debug.step || self.halted) {
                // Asking the controller costs (a platform reads its clock):
                // poll when something asked for it (and, on a platform that
                // does not kick on every event, every few blocks).
                let asked = self.attention.load(Ordering::Relaxed);
                if self.poll_now || asked || self.poll_countdown == 0 {
                    if asked {
                        self.attention.swap(false, Ordering::SeqCst);
                        // A kicker sets `kick` before `attention`: either
                        // its kick is seen here, or its attention store
                        // comes after this clear and stops chained code.
                        if self.kick.load(Ordering::SeqCst)
                            && self.kick.swap(false, Ordering::AcqRel)
                        {
                            return RunExit::Interrupted;
                        }
                    }
                    self.poll_now = false;
                    self.poll_countdown = if self.timed_polls {
                        POLL_INTERVAL
                    } else {
                        u32::MAX
                    };
                    self.publish_stats();
                    if let Some(exit) = self.check_interrupts() {
                        return exit;
                    }
                } else {
                    self.poll_countdown -= 1;
                }
            }
            if self.halted || self.wait_for_sipi {
                // Sleep until the platform has something for this vCPU
                // (then poll), or leave.
                // A halted CPU has no interrupt shadow left.
                self.int_shadow = false;
                match self.platform.idle(self.cpu_view(), &self.kick) {
                    Idle::Wake => {
                        self.poll_now = true;
                        continue;
                    }
                    Idle::Unhalt => {
                        // A paravirtual kick ended the HLT (the platform
                        // consumed it): run on after the HLT.
                        self.halted = false;
                        self.poll_now = true;
                        continue;
                    }
                    Idle::Halt => return RunExit::Halt,
                    Idle::Interrupted => return RunExit::Interrupted,
                }
            }
            if self.host_debug.armed {
                if let Some(exit) = self.host_debug_check() {
                    return exit;
                }
            }
            if self.debug_armed() {
                // One interpreted instruction with #DB checks around it
                // (crate::debug).
                self.int_shadow = false;
                if let Some(delivered) = self.debug_before() {
                    match delivered {
                        Some(exit) => return exit,
                        None => {
                            if self.host_debug.step {
                                return RunExit::Debug(hypervisor::DebugStop::Step);
                            }
                            continue;
                        }
                    }
                }
                let tf = self.st.rflags & crate::cpu::FLAG_TF != 0;
                let retired = self.icount;
                let exit = self.run_block(1);
                if let Some(e) = self.debug_after(tf, self.icount != retired) {
                    return e;
                }
                if let Some(exit) = exit {
                    return exit;
                }
                if self.host_debug.step {
                    return RunExit::Debug(hypervisor::DebugStop::Step);
                }
                continue;
            }
            // RF only suppresses instruction breakpoints, none are armed:
            // it is clear once the next instruction completes.
            self.st.rflags &= !crate::cpu::FLAG_RF;
            let limit = if self.int_shadow { 1 } else { usize::MAX };
            self.int_shadow = false;
            if let Some(exit) = self.run_block(limit) {
                return exit;
            }
            if self.host_debug.step {
                return RunExit::Debug(hypervisor::DebugStop::Step);
            }
        }
    }

    /// Run exactly one instruction, without looking for interrupts: how a
    /// read the VMM answered is finished before the vCPU is paused. What it
    /// exits with, if anything.
    pub fn step(&mut self) -> Option<RunExit> {
        if self.mem.refresh() {
            self.flush_all_caches();
        }
        self.prev_block = BlockPtr::NONE;
        let exit = self.run_block(1);
        self.prev_block = BlockPtr::NONE;
        exit
    }

    /// INIT: architectural state as after RESET (real mode at F000:FFF0),
    /// then wait for a start-up IPI. Caches that depend on the old paging
    /// state are dropped.
    pub fn init_reset(&mut self) {
        let keep_apic_base = self.st.msr.apic_base;
        self.st = ArchRegs::reset();
        self.st.msr.apic_base = keep_apic_base;
        self.tlb.flush_all();
        self.halted = false;
        self.int_shadow = false;
        self.nmi_blocked = false;
        self.io = IoExchange::default();
        self.wait_for_sipi = true;
    }

    /// SIPI with vector `v`: start in real mode at `v`00:0000.
    pub fn start_up(&mut self, v: u8) {
        let sel = (v as u16) << 8;
        self.st.seg[CS].selector = sel;
        self.st.seg[CS].base = (sel as u64) << 4;
        self.st.rip = 0;
        self.wait_for_sipi = false;
        self.halted = false;
    }

    fn cpu_view(&self) -> CpuView {
        CpuView {
            vcpu: self.index,
            if_set: self.st.rflags & FLAG_IF != 0,
            nmi_ok: !self.nmi_blocked,
            wait_for_sipi: self.wait_for_sipi,
            pv_unhalt: self.cpuid.pv_unhalt(),
        }
    }

    /// The HLT completed because an interrupt or NMI was taken: like KVM
    /// (which clears `pv_unhalted` whenever a halted vCPU runs again), a
    /// paravirtual kick pending for it is used up too.
    fn hlt_completed(&mut self) {
        if std::mem::take(&mut self.halted) {
            if let Some(f) = self.platform.pv_unhalted() {
                f.store(false, Ordering::SeqCst);
            }
        }
    }

    /// INIT as the platform asked for it: the power-on state with kvmclock
    /// off (KVM turns it off on a vCPU reset too), then wait for a start-up
    /// IPI unless `restart` (run from the reset vector).
    fn init_cpu(&mut self, restart: bool) {
        self.init_reset();
        self.flush_all_caches();
        self.st.msr.kvm_system_time = 0;
        self.delivering = None;
        if restart {
            self.wait_for_sipi = false;
        }
    }

    /// Take what the platform has for this CPU: INIT, start-up, NMI or an
    /// interrupt it can accept now.
    fn check_interrupts(&mut self) -> Option<RunExit> {
        let ev = self.platform.poll(self.cpu_view());
        if ev != Event::None {
            // More may be queued behind it (a SIPI after INIT, an interrupt
            // after an NMI): look again before the next block.
            self.poll_now = true;
        }
        match ev {
            Event::None => None,
            Event::Init { restart } => {
                self.init_cpu(restart);
                // A start-up IPI may already wait behind the INIT.
                self.check_interrupts()
            }
            Event::Sipi(v) => {
                self.start_up(v);
                self.end_block = true;
                None
            }
            Event::Nmi => {
                self.interrupts += 1;
                self.hlt_completed();
                self.nmi_blocked = true;
                self.deliver_and_check(2, None, crate::exception::Kind::External)
            }
            Event::Irq(v) => {
                self.interrupts += 1;
                self.hlt_completed();
                self.deliver_and_check(v, None, crate::exception::Kind::External)
            }
        }
    }

    pub(crate) fn deliver_and_check(
        &mut self,
        vector: u8,
        error: Option<u32>,
        kind: crate::exception::Kind,
    ) -> Option<RunExit> {
        self.history.push(
            self.st.rip,
            0x100 + vector as u32 + ((error.unwrap_or(0) & 0xffff) << 16),
        );
        // Delivery changes RIP, maybe CPL and stack: never chain across it.
        self.prev_block = BlockPtr::NONE;
        match crate::exception::deliver(self, vector, error, kind) {
            Ok(()) => None,
            Err(Exc::Shutdown) => Some(RunExit::Shutdown),
            Err(Exc::Unimplemented(reason)) => Some(RunExit::Internal {
                reason: *reason,
                rip: self.st.rip,
            }),
            Err(e) => Some(RunExit::Internal {
                reason: format!("unexpected {e:?} while delivering vector {vector}"),
                rip: self.st.rip,
            }),
        }
    }

    /// Execute (part of) one basic block. Returns an exit if one is due.
    fn run_block(&mut self, limit: usize) -> Option<RunExit> {
        self.history.push(self.st.rip, HIST_BLOCK);
        if self.trace {
            eprintln!(
                "emu: block {:#x} rax={:#x} rsp={:#x}",
                self.st.rip, self.st.gpr[0], self.st.gpr[4]
            );
        }
        let prev = std::mem::replace(&mut self.prev_block, BlockPtr::NONE).0;
        let rip = self.st.rip;
        #[cfg(feature = "jit-trips")]
        self.jit.trips.settle(self.icount);
        self.note_code_mode();
        // Links hold under the TLB epoch and CPL they were made under (see
        // `crate::jit::runtime`); older ones are fetched again here.
        let key = self.tlb.epoch | self.user() as u64;
        let cache_gen = self.blocks.generation;
        let cell = std::mem::take(&mut self.jit.ctx.last_cell);
        let chained = if prev.is_null() {
            None
        } else {
            // SAFETY: a non-null `prev` is in this vCPU's block arena (links are
            // reset whenever the cache is cleared).
            crate::frontend::decode::chained(unsafe { &*prev }, rip, key)
                // SAFETY: a cell noted by the code of `prev` (a live block).
                .or_else(|| unsafe { crate::jit::linked_block(cell, rip, key) })
        };
        // The previous block may be linked to this one (same link key,
        // cache not cleared since).
        let mut linkable = !prev.is_null();
        let block = match chained {
            Some(b) => b,
            None => match crate::frontend::decode::fetch_block(self) {
                Ok(b) => {
                    // Link only if fetching neither flushed the TLB nor
                    // cleared the cache (which would have freed `prev`).
                    if !prev.is_null()
                        && self.tlb.epoch | self.user() as u64 == key
                        && self.blocks.generation == cache_gen
                    {
                        // SAFETY: `prev` is still in the arena (no clear).
                        crate::frontend::decode::link(unsafe { &*prev }, rip, b, key);
                    } else {
                        linkable = false;
                    }
                    b
                }
                Err(e) => return self.handle_exc(e),
            },
        };
        // SAFETY: see `fetch_block`: the cache is not modified while the
        // block runs (handlers never fetch blocks or flush the cache).
        let block = unsafe { &*block };
        self.end_block = false;
        // A host breakpoint inside the block: run up to it (interpreted).
        let limit = if self.host_debug.armed {
            limit.min(self.host_debug_limit(rip, &block.uops))
        } else {
            limit
        };
        if limit == usize::MAX {
            if let Some(f) = crate::jit::code_for(self, block) {
                // Compiling may recycle the arena (which flushes the TLB).
                if cell != 0
                    && linkable
                    && self.tlb.epoch | self.user() as u64 == key
                    && !self.trace
                    && !self.host_debug.armed
                {
                    // SAFETY: the cell is in `prev`, still in the arena.
                    unsafe { crate::jit::link(&self.jit, cell, block, key) };
                }
                #[cfg(feature = "jit-trips")]
                self.jit.trips.runs(block.bits, true, self.icount);
                return self.run_jit(block, f);
            }
        }
        #[cfg(feature = "jit-trips")]
        {
            self.jit.trips.interpreted(block.jit.get(), limit);
            self.jit.trips.runs(block.bits, false, self.icount);
        }
        for u in block.uops.iter().take(limit) {
            let next = u.next_ip;
            self.next_rip = next;
            match (u.handler)(self, u) {
                Ok(()) => {
                    self.icount += 1;
                    self.st.rip = self.next_rip;
                    if let Some(req) = self.io.request.take() {
                        return Some(RunExit::Io(req));
                    }
                    if self.next_rip != next || self.end_block {
                        break;
                    }
                }
                Err(e) => return self.handle_exc(e),
            }
        }
        if !self.end_block {
            self.prev_block = BlockPtr(block);
        }
        None
    }

    /// Run a block's compiled code (see [`crate::jit`]).
    fn run_jit(
        &mut self,
        block: &crate::frontend::decode::Block,
        f: crate::jit::JitFn,
    ) -> Option<RunExit> {
        if self.st.flags.op != crate::flags::FlagOp::None {
            self.st.settle_flags();
        }
        crate::jit::prepare(self);
        self.jit.ctx.cur_block = block as *const crate::frontend::decode::Block as usize;
        #[cfg(feature = "jit-trips")]
        {
            self.jit.ctx.trip = 0;
        }
        // SAFETY: `f` was compiled for `block`, which is alive (it is in the
        // cache's arena), from the arena generation still current; the
        // code only touches this core through the pointer.
        let r = unsafe { f(self as *mut Core) };
        #[cfg(feature = "jit-trips")]
        self.jit.trips.compiled(
            self.jit.ctx.trip,
            self.jit.exc.is_some(),
            self.io.request.is_some(),
        );
        self.icount += r as u32 as u64;
        if let Some(e) = self.jit.exc.take() {
            return self.handle_exc(e);
        }
        if let Some(req) = self.io.request.take() {
            return Some(RunExit::Io(req));
        }
        if !self.end_block {
            // The block that ran last (chained code may have gone on).
            self.prev_block =
                BlockPtr(self.jit.ctx.cur_block as *const crate::frontend::decode::Block);
        }
        None
    }

    fn handle_exc(&mut self, e: Exc) -> Option<RunExit> {
        use crate::exception::Kind;
        match e {
            Exc::Fault { vector, error } => {
                self.io.request = None;
                self.deliver_and_check(vector, error, Kind::Fault)
            }
            Exc::PageFault { addr, error } => {
                self.io.request = None;
                self.st.cr2 = addr;
                self.deliver_and_check(14, Some(error), Kind::Fault)
            }
            Exc::Exit => match self.io.request.take() {
                Some(req) => Some(RunExit::Io(req)),
                None => Some(RunExit::Internal {
                    reason: "exit requested without a request".into(),
                    rip: self.st.rip,
                }),
            },
            Exc::Unimplemented(reason) => {
                self.io.request = None;
                Some(RunExit::Internal {
                    reason: *reason,
                    rip: self.st.rip,
                })
            }
            Exc::Shutdown => Some(RunExit::Shutdown),
        }
    }
}
