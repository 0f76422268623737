//! One VM once built: `Vm` is what its owner runs (to the first reason to
//! stop), `VmHandle` what outlives `run` and is shared with the API and a
//! migration (memory, vCPUs, devices, the pause control). Putting a VM
//! together is `builder.rs`; the vCPU threads are `vcpu.rs`; the devices
//! `device_manager.rs`; snapshot and restore `persist.rs`.

use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};

use devices::Bus;
use hypervisor::GuestRam;

use crate::config::VmConfig;
use crate::control::VmControl;
use crate::device_manager::{DeviceInfo, DeviceManager};
use crate::vcpu::SharedVcpu;
use crate::{VmExit, VmmError};

/// What a running VM reports about itself (the API's `vm.info`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct VmInfo {
    pub state: crate::control::RunState,
    pub accel: hypervisor::AccelKind,
    pub memory_bytes: u64,
    pub vcpus: u32,
    pub devices: Vec<DeviceInfo>,
}

/// The parts of a VM that outlive `Vm::run` and are shared with the API:
/// what a snapshot reads and the power button.
pub struct VmHandle {
    pub(crate) vm: Arc<dyn hypervisor::Vm>,
    pub(crate) accel: hypervisor::AccelKind,
    pub(crate) memory: GuestRam,
    pub(crate) memory_bytes: u64,
    pub(crate) vcpus: Vec<SharedVcpu>,
    pub(crate) control: Arc<VmControl>,
    pub(crate) devices: DeviceManager,
    /// What monitoring reads (see `counters.rs`).
    pub(crate) monitor: crate::counters::VmMonitor,
}

/// Lock a mutex even if a thread panicked while holding it: the VMM keeps
/// serving the VM (a device's state stays as consistent as its last write).
pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl VmHandle {
    pub fn press_power_button(&self) {
        self.devices.press_power_button();
    }

    /// The virtio-balloon's host side, if the VM has one.
    pub fn balloon(&self) -> Option<&virtio::balloon::BalloonHandle> {
        self.devices.balloon()
    }

    /// What a live migration needs of the VM (see `migration.rs`).
    pub(crate) fn backend(&self) -> &Arc<dyn hypervisor::Vm> {
        &self.vm
    }

    pub(crate) fn guest_memory(&self) -> &GuestRam {
        &self.memory
    }

    pub(crate) fn control(&self) -> &Arc<VmControl> {
        &self.control
    }

    pub(crate) fn accel(&self) -> hypervisor::AccelKind {
        self.accel
    }

    pub(crate) fn memory_bytes(&self) -> u64 {
        self.memory_bytes
    }

    pub(crate) fn vcpu_count(&self) -> u32 {
        self.vcpus.len() as u32
    }

    /// Let another process on this host open the disks (`false`), or take
    /// them back (`true`).
    pub(crate) fn set_disk_locks(&self, held: bool) -> Result<(), VmmError> {
        self.devices.set_disk_locks(held)
    }

    /// Stop (or restart) the virtio queue workers.
    pub(crate) fn quiesce_devices(&self, stop: bool) {
        self.devices.quiesce(stop)
    }
}

/// A built VM, ready to run.
pub struct Vm {
    pub(crate) handle: Arc<VmHandle>,
    pub(crate) exit_tx: Sender<VmExit>,
    pub(crate) exit_rx: Receiver<VmExit>,
    pub(crate) info: VmInfo,
    /// Host CPUs for the vCPU threads.
    pub(crate) affinity: crate::config::CpuAffinity,
}

impl Vm {
    /// Build the VM: backend, memory, devices, boot image, vCPUs (not yet
    /// running). The console writes to `serial_out`.
    pub fn new(
        spec: crate::VmSpec,
        serial_out: Box<dyn std::io::Write + Send>,
    ) -> Result<Self, VmmError> {
        crate::builder::build(spec, serial_out)
    }

    /// Pin vCPU threads to host CPUs when they start (checked already:
    /// `VmConfig::validate`).
    pub fn set_cpu_affinity(&mut self, affinity: crate::config::CpuAffinity) {
        self.affinity = affinity;
    }

    /// Pause/resume/stop for this VM, usable from any thread.
    pub fn control(&self) -> Arc<VmControl> {
        self.handle.control.clone()
    }

    /// What outlives `run` and is shared with the API.
    pub fn handle(&self) -> Arc<VmHandle> {
        self.handle.clone()
    }

    /// What the management API needs to serve this VM.
    pub fn api_context(&self, config: Option<VmConfig>) -> crate::api::ApiContext {
        crate::api::ApiContext {
            control: self.handle.control.clone(),
            info: self.info.clone(),
            config,
            exits: self.exit_tx.clone(),
            vm: self.handle.clone(),
        }
    }

    /// A snapshot of the VM's state and make-up.
    pub fn info(&self) -> VmInfo {
        VmInfo {
            state: self.handle.control.state(),
            ..self.info.clone()
        }
    }

    pub fn serial(&self) -> Arc<Mutex<devices::serial::Serial>> {
        self.handle.devices.serial()
    }

    /// Where console input goes: the virtio console when it is the
    /// console, else COM1.
    pub fn console_input(&self) -> crate::console::ConsoleTarget {
        match self.handle.devices.virtio_console_input() {
            Some(i) => crate::console::ConsoleTarget::Virtio(i),
            None => crate::console::ConsoleTarget::Serial(self.serial()),
        }
    }

    pub fn exit_sender(&self) -> Sender<VmExit> {
        self.exit_tx.clone()
    }

    /// The port I/O bus, for adding devices before `run`.
    pub fn pio_bus(&self) -> &Bus {
        self.handle.devices.pio_bus()
    }

    /// The MMIO bus, for adding devices before `run`.
    pub fn mmio_bus(&self) -> &Bus {
        self.handle.devices.mmio_bus()
    }

    pub fn memory(&self) -> &GuestRam {
        &self.handle.memory
    }

    /// Run every vCPU on a thread of its own until the first reason to stop.
    pub fn run(self) -> VmExit {
        let control = self.handle.control.clone();
        let devices = &self.handle.devices;
        let threads = crate::vcpu::start(
            &self.handle.vcpus,
            devices.pio_bus(),
            devices.mmio_bus(),
            &self.exit_tx,
            &control,
            &self.handle.monitor.vcpus,
            &self.affinity,
        );
        let exit = self
            .exit_rx
            .recv()
            .unwrap_or_else(|_| VmExit::Error("every vCPU thread ended".into()));
        control.request_stop();
        threads.join();
        exit
    }
}
