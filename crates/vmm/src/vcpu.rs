//! The vCPU threads: one per vCPU, each running its vCPU and answering
//! its exits (port and MMIO accesses go to the buses; power-off, reset and
//! faults end the VM through the exit channel).
//!
//! Invariants: a vCPU thread holds its vCPU's lock only while the guest
//! runs and while it answers an exit; at a pause (`VmControl::checkpoint`)
//! it completes any half-done I/O first and releases the lock, so whoever
//! reads the vCPU's state while paused sees it between instructions. The
//! first reason to stop wins: every later one is dropped with the channel.

use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::Bus;
use hypervisor::{Vcpu, VcpuExit, VcpuKicker};

use crate::control::VmControl;
use crate::counters::{ExitReason, VcpuCounters};
use crate::vm::lock;
use crate::VmExit;

/// A vCPU shared between its thread (which holds the lock while the guest
/// runs) and whoever reads its state while the VM is paused.
pub type SharedVcpu = Arc<Mutex<Box<dyn Vcpu>>>;

/// Create the VM's vCPUs; the boot vCPU gets `boot_state` if given (a
/// restored VM's vCPUs get theirs from the snapshot afterwards).
pub(crate) fn create_vcpus(
    vm: &dyn hypervisor::Vm,
    count: u32,
    boot_state: Option<&hypervisor::CpuState>,
) -> Result<Vec<SharedVcpu>, hypervisor::HypervisorError> {
    let mut vcpus = Vec::with_capacity(count as usize);
    for i in 0..count {
        let mut vcpu = vm.create_vcpu(i, count)?;
        if let (0, Some(state)) = (i, boot_state) {
            vcpu.set_boot_state(state)?;
        }
        vcpus.push(Arc::new(Mutex::new(vcpu)));
    }
    Ok(vcpus)
}

struct VcpuHandle {
    kicker: Arc<dyn VcpuKicker>,
    thread: threads::Handle<()>,
}

/// The running vCPU threads of one VM.
pub(crate) struct VcpuThreads {
    handles: Vec<VcpuHandle>,
}

/// Start one thread per vCPU. A thread that cannot be started ends the VM
/// (an error on `exits`); those already started run until told to stop.
pub(crate) fn start(
    vcpus: &[SharedVcpu],
    pio: &Arc<Bus>,
    mmio: &Arc<Bus>,
    exits: &Sender<VmExit>,
    control: &Arc<VmControl>,
    counters: &[Arc<VcpuCounters>],
    affinity: &crate::config::CpuAffinity,
) -> VcpuThreads {
    let mut handles = Vec::new();
    for (vcpu, counters) in vcpus.iter().cloned().zip(counters.iter().cloned()) {
        let (kicker, index) = {
            let v = lock(&vcpu);
            (v.kicker(), v.index())
        };
        control.add_vcpu(kicker.clone());
        let ctx = VcpuContext {
            pio: pio.clone(),
            mmio: mmio.clone(),
            exits: exits.clone(),
            control: control.clone(),
            counters,
        };
        let opts = threads::Options {
            cpus: affinity.of(index).map(|c| c.to_vec()),
        };
        match threads::spawn_with(threads::Role::Vcpu(index), opts, move || {
            ctx.run(vcpu);
            ctx.control.vcpu_exited();
        }) {
            Ok(thread) => handles.push(VcpuHandle { kicker, thread }),
            Err(e) => {
                control.vcpu_exited();
                let _ = exits.send(VmExit::Error(format!(
                    "cannot start vCPU {index} thread: {e}"
                )));
                break;
            }
        }
    }
    VcpuThreads { handles }
}

impl VcpuThreads {
    /// Wait for the threads to leave the guest (after `request_stop`). Give
    /// them a moment; a vCPU stuck in a host call is left behind rather
    /// than hanging the VMM.
    pub(crate) fn join(self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        for h in self.handles {
            while !h.thread.is_finished() && std::time::Instant::now() < deadline {
                h.kicker.kick();
                std::thread::sleep(Duration::from_millis(5));
            }
            if h.thread.is_finished() {
                let _ = h.thread.join();
            }
        }
    }
}

/// What a vCPU thread needs to answer exits.
struct VcpuContext {
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exits: Sender<VmExit>,
    control: Arc<VmControl>,
    counters: Arc<VcpuCounters>,
}

impl VcpuContext {
    fn run(&self, shared: SharedVcpu) {
        let index = lock(&shared).index();
        let settle = || {
            if let Err(e) = lock(&shared).complete_pending_io() {
                tracing::warn!("vCPU {index}: cannot complete pending I/O before pausing: {e}");
            }
        };
        self.counters.thread_started();
        while self.control.checkpoint(index, settle) {
            // Held while the guest runs; released while paused (checkpoint).
            let mut vcpu = lock(&shared);
            // The clock is read only to count (a build without counters
            // skips it: `metrics::ENABLED`).
            let entered = metrics::ENABLED.then(Instant::now);
            let exit = match vcpu.run() {
                Ok(e) => e,
                Err(e) => {
                    let _ = self.exits.send(VmExit::Error(format!("vCPU {index}: {e}")));
                    return;
                }
            };
            let left = metrics::ENABLED.then(Instant::now);
            let in_guest = match (entered, left) {
                (Some(a), Some(b)) => b.duration_since(a),
                _ => Duration::ZERO,
            };
            self.counters.exited(ExitReason::of(&exit), in_guest);
            // Every arm that goes on (but a halt's sleep) falls through to
            // count its time.
            match exit {
                VcpuExit::IoIn { port, data } => {
                    if !self.pio.read(port as u64, data) {
                        tracing::trace!("vCPU {index}: read from unclaimed port {port:#x}");
                        data.fill(0xff);
                    }
                }
                VcpuExit::IoOut { port, data } => {
                    if !self.pio.write(port as u64, data) {
                        tracing::trace!("vCPU {index}: write to unclaimed port {port:#x}");
                    }
                }
                VcpuExit::MmioRead { addr, data } => {
                    if !self.mmio.read(addr, data) {
                        tracing::debug!("vCPU {index}: read from unclaimed MMIO {addr:#x}");
                        data.fill(0xff);
                    }
                }
                VcpuExit::MmioWrite { addr, data } => {
                    if !self.mmio.write(addr, data) {
                        tracing::debug!("vCPU {index}: write to unclaimed MMIO {addr:#x}");
                    }
                }
                VcpuExit::Interrupted => {}
                VcpuExit::Debug(stop) => {
                    // The gdb stub takes it from here; this vCPU parks at
                    // the next checkpoint with the others.
                    self.control.debug_stop(index, stop);
                }
                VcpuExit::Halt => {
                    // The backend leaves the wait to us: nothing can wake a
                    // halted vCPU but an interrupt, which the backend checks
                    // on its next run.
                    std::thread::sleep(Duration::from_millis(1));
                    // Sleeping is not answering an exit: not counted.
                    continue;
                }
                VcpuExit::SystemPowerOff => {
                    let _ = self.exits.send(VmExit::PowerOff);
                    return;
                }
                VcpuExit::SystemReset => {
                    let _ = self.exits.send(VmExit::Reset);
                    return;
                }
                VcpuExit::Shutdown => {
                    let detail = describe_cpu(vcpu.as_ref());
                    let _ = self.exits.send(VmExit::TripleFault {
                        vcpu: index,
                        detail,
                    });
                    return;
                }
                VcpuExit::InternalError(e) => {
                    let _ = self.exits.send(VmExit::InternalError {
                        vcpu: index,
                        detail: e.to_string(),
                    });
                    return;
                }
                VcpuExit::Unknown(what) => {
                    let _ = self.exits.send(VmExit::Error(format!(
                        "vCPU {index}: unexpected exit from the backend: {what}"
                    )));
                    return;
                }
            }
            if let Some(left) = left {
                self.counters.answered(left.elapsed());
            }
        }
    }
}

fn describe_cpu(vcpu: &dyn Vcpu) -> String {
    match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(r), Ok(s)) => format!(
            "RIP {:#x} RSP {:#x} RFLAGS {:#x} CS {:#x} CR0 {:#x} CR3 {:#x} CR4 {:#x} EFER {:#x} IDT {:#x}/{:#x}",
            r.rip, r.rsp, r.rflags, s.cs.selector, s.cr0, s.cr3, s.cr4, s.efer, s.idt.base, s.idt.limit
        ),
        _ => "registers unavailable".into(),
    }
}
