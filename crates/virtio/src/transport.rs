//! The virtio 1.x modern PCI transport ("Virtio Over PCI Bus").
//!
//! BAR 0 (64-bit memory, 32 KiB) holds every structure:
//!
//! ```text
//! 0x0000  common configuration (0x38 bytes)
//! 0x1000  ISR status (1 byte, read-to-clear)
//! 0x2000  device-specific configuration
//! 0x3000  notifications: queue n at 0x3000 + 4 * n (notify_off_multiplier 4)
//! 0x4000  MSI-X table         0x5000  MSI-X PBA
//! ```
//!
//! The vendor capabilities in configuration space point there, plus a
//! VIRTIO_PCI_CAP_PCI_CFG window. Queue work happens on a worker thread
//! started at DRIVER_OK and stopped at reset; a notify write only signals
//! that queue's eventfd (which KVM's ioeventfd can later signal directly).

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use hypervisor::GuestRam;
use pci::config::{PciConfig, PciIds};
use pci::{BarKind, MsiSink, MsixTable, PciDevice};

use crate::{Persist, PersistError};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::features::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use crate::queue::{QueueConfig, QueuePosition, VirtQueue};
use crate::status::*;
use crate::{QueueWorker, VirtioDevice, VirtioInterrupt};

pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// "No MSI-X vector" in config_msix_vector / queue_msix_vector.
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

pub const BAR_INDEX: usize = 0;
pub const BAR_SIZE: u64 = 0x8000;
pub const COMMON_OFFSET: u64 = 0x0000;
pub const COMMON_LEN: u64 = 0x38;
pub const ISR_OFFSET: u64 = 0x1000;
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
pub const DEVICE_CFG_MAX: u64 = 0x1000;
pub const NOTIFY_OFFSET: u64 = 0x3000;
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
pub const MSIX_PBA_OFFSET: u64 = 0x5000;
/// Queues one device may have (the notify area and MSI-X table bound it).
pub const MAX_QUEUES: usize = 255;

/// virtio_pci_cap cfg_type values.
pub const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
pub const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
pub const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
pub const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;
pub const VIRTIO_PCI_CAP_PCI_CFG: u8 = 5;

/// Common configuration register offsets.
pub mod common {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VirtioPciError {
    #[error("device has {0} queues; 1..={MAX_QUEUES} supported")]
    QueueCount(usize),
    #[error("device config space of {0} bytes is too large")]
    ConfigTooLarge(usize),
    #[error("PCI configuration: {0}")]
    Pci(#[from] pci::config::ConfigError),
    #[error("eventfd: {0}")]
    EventFd(String),
}

/// An INTx edge (used only while MSI-X is disabled).
pub type IntxSink = Arc<dyn Fn() + Send + Sync>;

/// Interrupt state shared by the transport (vCPU threads) and the worker.
struct Interrupts {
    isr: AtomicU8,
    generation: AtomicU8,
    config_vector: AtomicU16,
    queue_vectors: Vec<AtomicU16>,
    msix: Arc<Mutex<MsixTable>>,
    intx: Mutex<Option<IntxSink>>,
    counters: Arc<crate::stats::TransportCounters>,
}

impl Interrupts {
    fn msix(&self) -> MutexGuard<'_, MsixTable> {
        self.msix.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn raise(&self, isr_bit: u8, vector: u16) {
        self.isr.fetch_or(isr_bit, Ordering::SeqCst);
        let mut msix = self.msix();
        if msix.enabled() {
            // With MSI-X on, NO_VECTOR means "no interrupt for this event".
            if vector != VIRTIO_MSI_NO_VECTOR {
                msix.notify(vector);
                self.counters.interrupts.inc();
            }
            return;
        }
        drop(msix);
        let intx = self.intx.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(f) = intx {
            f();
            self.counters.interrupts.inc();
        }
    }
}

impl VirtioInterrupt for Interrupts {
    fn signal_queue(&self, queue: u16) {
        let v = self
            .queue_vectors
            .get(queue as usize)
            .map_or(VIRTIO_MSI_NO_VECTOR, |v| v.load(Ordering::SeqCst));
        self.raise(1, v);
    }

    fn signal_config(&self) {
        self.raise(2, self.config_vector.load(Ordering::SeqCst));
    }

    fn config_changed(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.signal_config();
    }
}

/// Error accounting shared with the worker.
#[derive(Default)]
struct Health {
    needs_reset: AtomicBool,
    errors: AtomicU64,
}

/// Per-queue registers as the driver programmed them.
#[derive(Debug, Clone, Copy, Default)]
struct QueueRegs {
    max_size: u16,
    cfg: QueueConfig,
    enabled: bool,
}

/// Each queue's position when a worker stopped (`None`: not live).
type Positions = Vec<Option<QueuePosition>>;

struct Worker {
    kill: EventFd,
    thread: Option<threads::Handle<Option<Positions>>>,
}

impl Worker {
    /// Stop the thread once it has finished what it was doing; where it
    /// left each queue (`None` if it panicked).
    fn stop(&mut self) -> Option<Positions> {
        let _ = self.kill.write(1);
        match self.thread.take()?.join() {
            Ok(p) => p,
            Err(_) => {
                tracing::error!("virtio worker thread panicked");
                None
            }
        }
    }
}

/// Per-queue registers and position in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub enabled: bool,
    pub msix_vector: u16,
    /// Where the device was in the live queue (after DRIVER_OK).
    pub position: Option<QueuePosition>,
}

/// A virtio PCI function in a snapshot: configuration space, MSI-X, the
/// common configuration registers, interrupt status, queues, and the
/// device model's own state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VirtioPciState {
    pub device_type: u32,
    pub pci_config: pci::ConfigSpaceState,
    pub msix: pci::MsixState,
    pub device_features: u64,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    pub status: u8,
    pub needs_reset: bool,
    pub queue_select: u16,
    pub isr: u8,
    pub config_generation: u8,
    pub config_msix_vector: u16,
    pub queues: Vec<QueueSnapshot>,
    pub device: crate::DeviceState,
}

/// The live queues `queues` describe under `driver_features`, at
/// `positions` if given (a snapshot's) or at the start; an error names the
/// queue the driver could never have had live.
fn live_queues(
    mem: &GuestRam,
    driver_features: u64,
    queues: &[QueueRegs],
    positions: Option<&[Option<QueuePosition>]>,
) -> Result<Vec<Option<VirtQueue>>, String> {
    let event_idx = driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
    let indirect = driver_features & VIRTIO_RING_F_INDIRECT_DESC != 0;
    let mut live = Vec::with_capacity(queues.len());
    for (i, q) in queues.iter().enumerate() {
        if !q.enabled {
            live.push(None);
            continue;
        }
        let mut vq = VirtQueue::new(mem, q.max_size, q.cfg, event_idx, indirect)
            .map_err(|e| format!("queue {i}: {e}"))?;
        if let Some(p) = positions.and_then(|p| p.get(i).copied().flatten()) {
            vq.set_position(p);
        }
        live.push(Some(vq));
    }
    Ok(live)
}

/// How a virtio function names itself in persistence errors.
fn type_name(device_type: u32) -> &'static str {
    match device_type {
        crate::device_type::NET => "virtio-net",
        crate::device_type::BLOCK => "virtio-blk",
        crate::device_type::CONSOLE => "virtio-console",
        crate::device_type::RNG => "virtio-rng",
        crate::device_type::BALLOON => "virtio-balloon",
        crate::device_type::VSOCK => "virtio-vsock",
        _ => "virtio",
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A virtio device on PCI.
pub struct VirtioPciDevice {
    config: PciConfig,
    device: Box<dyn VirtioDevice>,
    mem: GuestRam,
    msix_cap: usize,
    pci_cfg_cap: usize,
    irq: Arc<Interrupts>,
    health: Arc<Health>,
    notify: Vec<EventFd>,
    worker: Option<Worker>,
    /// Queue positions of a worker stopped for a snapshot (or loaded from
    /// one), until [`VirtioPciDevice::resume`] starts it again.
    parked: Option<Positions>,
    device_features: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    queue_select: u16,
    queues: Vec<QueueRegs>,
}

fn virtio_cap(cfg_type: u8, offset: u64, len: u64, extra: &[u8]) -> Vec<u8> {
    let mut c = vec![
        0x09,
        0,
        (16 + extra.len()) as u8,
        cfg_type,
        BAR_INDEX as u8,
        0,
        0,
        0,
    ];
    c.extend_from_slice(&(offset as u32).to_le_bytes());
    c.extend_from_slice(&(len as u32).to_le_bytes());
    c.extend_from_slice(extra);
    c
}

impl VirtioPciDevice {
    /// Wrap `device`; `mem` is guest memory, `msi` where MSI-X messages go.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestRam,
        msi: MsiSink,
    ) -> Result<Self, VirtioPciError> {
        let max_sizes = device.queue_max_sizes();
        if max_sizes.is_empty() || max_sizes.len() > MAX_QUEUES {
            return Err(VirtioPciError::QueueCount(max_sizes.len()));
        }
        if device.config_len() as u64 > DEVICE_CFG_MAX {
            return Err(VirtioPciError::ConfigTooLarge(device.config_len()));
        }
        let nq = max_sizes.len();
        let mut config = PciConfig::new(PciIds {
            vendor: VIRTIO_PCI_VENDOR_ID,
            device: VIRTIO_PCI_DEVICE_ID_BASE + device.device_type() as u16,
            // Modern (non-transitional) devices have revision 1 or more.
            revision: 1,
            class: device.pci_class(),
            subsystem_vendor: VIRTIO_PCI_VENDOR_ID,
            subsystem: 0x1100,
        });
        config.set_interrupt_pin(1);
        config.add_bar(
            BAR_INDEX,
            BAR_SIZE,
            BarKind::Memory64 {
                prefetchable: false,
            },
        )?;
        let msix = MsixTable::new(nq + 1, msi);
        let full = |c: &[u8]| vec![0u8; c.len()];
        for cap in [
            virtio_cap(VIRTIO_PCI_CAP_COMMON_CFG, COMMON_OFFSET, COMMON_LEN, &[]),
            virtio_cap(
                VIRTIO_PCI_CAP_NOTIFY_CFG,
                NOTIFY_OFFSET,
                NOTIFY_OFF_MULTIPLIER as u64 * nq as u64,
                &NOTIFY_OFF_MULTIPLIER.to_le_bytes(),
            ),
            virtio_cap(VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET, 1, &[]),
        ] {
            config.add_capability(&cap, &full(&cap))?;
        }
        if device.config_len() > 0 {
            let cap = virtio_cap(
                VIRTIO_PCI_CAP_DEVICE_CFG,
                DEVICE_CFG_OFFSET,
                device.config_len() as u64,
                &[],
            );
            config.add_capability(&cap, &full(&cap))?;
        }
        // VIRTIO_PCI_CAP_PCI_CFG: bar, offset, length and data are the
        // driver's to write.
        let cap = virtio_cap(VIRTIO_PCI_CAP_PCI_CFG, 0, 0, &[0; 4]);
        let mut mask = full(&cap);
        mask[4] = 0xff;
        mask[8..20].fill(0xff);
        let pci_cfg_cap = config.add_capability(&cap, &mask)?;
        let (body, mask) = msix.capability(
            BAR_INDEX as u8,
            MSIX_TABLE_OFFSET as u32,
            BAR_INDEX as u8,
            MSIX_PBA_OFFSET as u32,
        );
        let msix_cap = config.add_capability(&body, &mask)?;

        let notify = (0..nq)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| VirtioPciError::EventFd(e.to_string()))?;
        let irq = Arc::new(Interrupts {
            isr: AtomicU8::new(0),
            generation: AtomicU8::new(0),
            config_vector: AtomicU16::new(VIRTIO_MSI_NO_VECTOR),
            queue_vectors: (0..nq)
                .map(|_| AtomicU16::new(VIRTIO_MSI_NO_VECTOR))
                .collect(),
            msix: Arc::new(Mutex::new(msix)),
            intx: Mutex::new(None),
            counters: Arc::default(),
        });
        let device_features = device.features()
            | VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_INDIRECT_DESC
            | VIRTIO_RING_F_EVENT_IDX;
        Ok(VirtioPciDevice {
            config,
            device,
            mem,
            msix_cap,
            pci_cfg_cap,
            irq,
            health: Arc::new(Health::default()),
            notify,
            worker: None,
            parked: None,
            device_features,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            queues: max_sizes
                .iter()
                .map(|&m| QueueRegs {
                    max_size: m,
                    cfg: QueueConfig {
                        size: m,
                        ..Default::default()
                    },
                    enabled: false,
                })
                .collect(),
        })
    }

    /// Where INTx edges go while MSI-X is off (optional).
    pub fn set_intx(&mut self, intx: IntxSink) {
        *self.irq.intx.lock().unwrap_or_else(|e| e.into_inner()) = Some(intx);
    }

    /// The eventfd each queue's notify write signals, with the offset of
    /// that queue's notify address inside BAR 0: register these as KVM
    /// ioeventfds (datamatch-free, 2 bytes) to skip the MMIO exit.
    pub fn notify_eventfds(&self) -> Vec<(u64, &EventFd)> {
        self.notify
            .iter()
            .enumerate()
            .map(|(i, e)| (NOTIFY_OFFSET + i as u64 * NOTIFY_OFF_MULTIPLIER as u64, e))
            .collect()
    }

    /// Descriptor chains refused since creation.
    pub fn queue_errors(&self) -> u64 {
        self.health.errors.load(Ordering::SeqCst)
    }

    /// Device status as the driver reads it.
    pub fn status(&self) -> u8 {
        let nr = if self.health.needs_reset.load(Ordering::SeqCst) {
            DEVICE_NEEDS_RESET
        } else {
            0
        };
        self.status | nr
    }

    /// Whether a worker thread is running (after DRIVER_OK, until reset).
    pub fn is_active(&self) -> bool {
        self.worker.is_some()
    }

    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    fn reset(&mut self) {
        if let Some(mut w) = self.worker.take() {
            w.stop();
        }
        self.parked = None;
        self.device.reset();
        for e in &self.notify {
            let _ = e.read();
        }
        for q in &mut self.queues {
            *q = QueueRegs {
                max_size: q.max_size,
                cfg: QueueConfig {
                    size: q.max_size,
                    ..Default::default()
                },
                enabled: false,
            };
        }
        for v in &self.irq.queue_vectors {
            v.store(VIRTIO_MSI_NO_VECTOR, Ordering::SeqCst);
        }
        self.irq
            .config_vector
            .store(VIRTIO_MSI_NO_VECTOR, Ordering::SeqCst);
        self.irq.isr.store(0, Ordering::SeqCst);
        self.health.needs_reset.store(false, Ordering::SeqCst);
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        self.status = 0;
    }

    /// The device cannot go on until the driver resets it.
    fn fail(&self, why: &str) {
        tracing::error!(
            "virtio device type {}: {why}; needs reset",
            self.device.device_type()
        );
        self.health.errors.fetch_add(1, Ordering::SeqCst);
        self.health.needs_reset.store(true, Ordering::SeqCst);
        self.irq.signal_config();
    }

    fn write_status(&mut self, v: u8) {
        if v == 0 {
            if self.status & crate::status::DRIVER_OK != 0 {
                // A working device reset by its driver (unload, recovery):
                // an event a supervisor may want (see vmm's events.rs).
                tracing::info!(
                    target: "vireo::event",
                    event = "device-reset",
                    device_type = self.device.device_type(),
                    "the guest reset virtio device type {}",
                    self.device.device_type()
                );
            }
            self.reset();
            return;
        }
        let old = self.status;
        // Status bits only accumulate until reset, and NEEDS_RESET is the
        // device's to set.
        let mut new = (old | v) & !DEVICE_NEEDS_RESET;
        if new & FEATURES_OK != 0 && old & FEATURES_OK == 0 {
            let ok = self.driver_features & !self.device_features == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !ok {
                tracing::warn!(
                    "virtio: driver features {:#x} refused (offered {:#x})",
                    self.driver_features,
                    self.device_features
                );
                new &= !FEATURES_OK;
            }
        }
        if new & DRIVER_OK != 0 && old & DRIVER_OK == 0 {
            if new & FEATURES_OK == 0 {
                new &= !DRIVER_OK;
            } else {
                self.status = new;
                self.activate();
                return;
            }
        }
        self.status = new;
    }

    /// The live queues as the driver set them up, at `positions` if given
    /// (a snapshot's) or at the start.
    fn live_queues(
        &self,
        positions: Option<&[Option<QueuePosition>]>,
    ) -> Result<Vec<Option<VirtQueue>>, String> {
        live_queues(&self.mem, self.driver_features, &self.queues, positions)
    }

    fn activate(&mut self) {
        self.activate_at(None)
    }

    /// Start the worker (DRIVER_OK, or resuming after a snapshot).
    fn activate_at(&mut self, positions: Option<Positions>) {
        let queues = match self.live_queues(positions.as_deref()) {
            Ok(q) => q,
            Err(e) => return self.fail(&e),
        };
        let irq: Arc<dyn VirtioInterrupt> = self.irq.clone();
        let worker = match self
            .device
            .activate(self.driver_features, self.mem.clone(), irq.clone())
        {
            Ok(w) => w,
            Err(e) => return self.fail(&e.to_string()),
        };
        let spawn = || -> std::io::Result<Worker> {
            let kill = EventFd::new(EFD_NONBLOCK)?;
            let ctx = WorkerContext {
                worker,
                queues,
                mem: self.mem.clone(),
                irq,
                health: self.health.clone(),
                counters: self.irq.counters.clone(),
                kill: kill.try_clone()?,
                notify: self
                    .notify
                    .iter()
                    .map(|e| e.try_clone())
                    .collect::<Result<_, _>>()?,
            };
            let role = threads::Role::Worker(format!("virtio-{}", self.device.device_type()));
            let thread = threads::spawn(role, move || {
                let health = ctx.health.clone();
                let irq = ctx.irq.clone();
                // A bug in a device model must not take the VMM down
                // with it: the device just stops, asking for a reset.
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ctx.run())) {
                    Ok(positions) => Some(positions),
                    Err(_) => {
                        tracing::error!("virtio worker panicked; device needs reset");
                        health.errors.fetch_add(1, Ordering::SeqCst);
                        health.needs_reset.store(true, Ordering::SeqCst);
                        irq.signal_config();
                        None
                    }
                }
            })?;
            Ok(Worker {
                kill,
                thread: Some(thread),
            })
        };
        match spawn() {
            Ok(w) => self.worker = Some(w),
            Err(e) => self.fail(&format!("cannot start worker: {e}")),
        }
    }

    /// Stop queue processing (before a snapshot): the worker finishes what
    /// it was doing and stops; its queue positions are kept for
    /// [`Persist::save`] and [`VirtioPciDevice::resume`].
    pub fn quiesce(&mut self) {
        if let Some(mut w) = self.worker.take() {
            // A worker that panicked left no positions: the device already
            // asked for a reset; it is not restarted.
            self.parked = w.stop();
        }
    }

    /// Restart queue processing stopped by [`VirtioPciDevice::quiesce`] or
    /// set up by [`Persist::restore`].
    pub fn resume(&mut self) {
        if let Some(p) = self.parked.take() {
            if self.worker.is_none() {
                self.activate_at(Some(p));
            }
        }
    }

    /// The notifications and interrupts this function counts.
    pub fn counters(&self) -> Arc<crate::stats::TransportCounters> {
        self.irq.counters.clone()
    }

    /// See [`VirtioDevice::set_host_locks`].
    pub fn set_host_locks(&mut self, held: bool) -> Result<(), String> {
        self.device.set_host_locks(held)
    }

    fn selected(&mut self) -> Option<&mut QueueRegs> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// The common configuration structure as the driver sees it now.
    fn common_bytes(&self) -> [u8; COMMON_LEN as usize] {
        let mut b = [0u8; COMMON_LEN as usize];
        let mut put =
            |off: u64, v: &[u8]| b[off as usize..off as usize + v.len()].copy_from_slice(v);
        put(
            common::DEVICE_FEATURE_SELECT,
            &self.device_feature_select.to_le_bytes(),
        );
        let feat = match self.device_feature_select {
            0 => self.device_features as u32,
            1 => (self.device_features >> 32) as u32,
            _ => 0,
        };
        put(common::DEVICE_FEATURE, &feat.to_le_bytes());
        put(
            common::DRIVER_FEATURE_SELECT,
            &self.driver_feature_select.to_le_bytes(),
        );
        let dfeat = match self.driver_feature_select {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        };
        put(common::DRIVER_FEATURE, &dfeat.to_le_bytes());
        put(
            common::CONFIG_MSIX_VECTOR,
            &self.irq.config_vector.load(Ordering::SeqCst).to_le_bytes(),
        );
        put(
            common::NUM_QUEUES,
            &(self.queues.len() as u16).to_le_bytes(),
        );
        put(common::DEVICE_STATUS, &[self.status()]);
        put(
            common::CONFIG_GENERATION,
            &[self.irq.generation.load(Ordering::SeqCst)],
        );
        put(common::QUEUE_SELECT, &self.queue_select.to_le_bytes());
        let qs = self.queue_select as usize;
        if let Some(q) = self.queues.get(qs) {
            put(common::QUEUE_SIZE, &q.cfg.size.to_le_bytes());
            let vec = self.irq.queue_vectors[qs].load(Ordering::SeqCst);
            put(common::QUEUE_MSIX_VECTOR, &vec.to_le_bytes());
            put(common::QUEUE_ENABLE, &(q.enabled as u16).to_le_bytes());
            put(common::QUEUE_NOTIFY_OFF, &(qs as u16).to_le_bytes());
            put(common::QUEUE_DESC, &q.cfg.desc_table.to_le_bytes());
            put(common::QUEUE_DRIVER, &q.cfg.avail_ring.to_le_bytes());
            put(common::QUEUE_DEVICE, &q.cfg.used_ring.to_le_bytes());
        } else {
            // No such queue: size 0 tells the driver so.
            put(
                common::QUEUE_MSIX_VECTOR,
                &VIRTIO_MSI_NO_VECTOR.to_le_bytes(),
            );
        }
        b
    }

    fn read_common(&self, offset: u64, data: &mut [u8]) {
        let b = self.common_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = b.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let v = match *data {
            [a] => a as u64,
            [a, b] => u16::from_le_bytes([a, b]) as u64,
            [a, b, c, d] => u32::from_le_bytes([a, b, c, d]) as u64,
            [a, b, c, d, e, f, g, h] => u64::from_le_bytes([a, b, c, d, e, f, g, h]),
            _ => return,
        };
        let configurable = self.status & DRIVER_OK == 0;
        let features_open = self.status & FEATURES_OK == 0;
        let nvec = self.irq.msix().num_vectors() as u64;
        let vector = |v: u64| {
            if v < nvec {
                v as u16
            } else {
                VIRTIO_MSI_NO_VECTOR
            }
        };
        use common::*;
        match (offset, data.len()) {
            (DEVICE_FEATURE_SELECT, 4) => self.device_feature_select = v as u32,
            (DRIVER_FEATURE_SELECT, 4) => self.driver_feature_select = v as u32,
            (DRIVER_FEATURE, 4) if features_open => match self.driver_feature_select {
                0 => self.driver_features = self.driver_features & !0xffff_ffff | v,
                1 => self.driver_features = self.driver_features & 0xffff_ffff | v << 32,
                _ => {}
            },
            (CONFIG_MSIX_VECTOR, 2) => self.irq.config_vector.store(vector(v), Ordering::SeqCst),
            (DEVICE_STATUS, 1) => self.write_status(v as u8),
            (QUEUE_SELECT, 2) => self.queue_select = v as u16,
            (QUEUE_MSIX_VECTOR, 2) => {
                if let Some(q) = self.irq.queue_vectors.get(self.queue_select as usize) {
                    q.store(vector(v), Ordering::SeqCst);
                }
            }
            (QUEUE_SIZE, 2) if configurable => {
                if let Some(q) = self.selected() {
                    q.cfg.size = v as u16;
                }
            }
            // Writing 0 to queue_enable is not allowed; ignore it.
            (QUEUE_ENABLE, 2) if configurable && v == 1 => {
                if let Some(q) = self.selected() {
                    q.enabled = true;
                }
            }
            (QUEUE_DESC | QUEUE_DRIVER | QUEUE_DEVICE, 4 | 8) | (0x24 | 0x2c | 0x34, 4)
                if configurable =>
            {
                if let Some(q) = self.selected() {
                    let field = match offset & !7 {
                        QUEUE_DESC => &mut q.cfg.desc_table,
                        QUEUE_DRIVER => &mut q.cfg.avail_ring,
                        _ => &mut q.cfg.used_ring,
                    };
                    *field = match (offset & 7, data.len()) {
                        (0, 8) => v,
                        (0, _) => *field & !0xffff_ffff | v,
                        _ => *field & 0xffff_ffff | v << 32,
                    };
                }
            }
            _ => tracing::debug!(
                offset,
                len = data.len(),
                "virtio: ignored common config write"
            ),
        }
    }

    fn msix(&self) -> MutexGuard<'_, MsixTable> {
        self.irq.msix()
    }

    fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match offset {
            o if o < COMMON_OFFSET + COMMON_LEN => self.read_common(o, data),
            o if o == ISR_OFFSET => {
                // Reading ISR clears it (and deasserts INTx).
                data[0] = self.irq.isr.swap(0, Ordering::SeqCst);
            }
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_MAX).contains(&o) => {
                let off = o - DEVICE_CFG_OFFSET;
                if off + data.len() as u64 <= self.device.config_len() as u64 {
                    self.device.read_config(off, data);
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                self.msix().read_table(o - MSIX_TABLE_OFFSET, data)
            }
            o if (MSIX_PBA_OFFSET..BAR_SIZE).contains(&o) => {
                self.msix().read_pba(o - MSIX_PBA_OFFSET, data)
            }
            _ => {}
        }
    }

    fn bar_write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON_OFFSET + COMMON_LEN => self.write_common(o, data),
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_MAX).contains(&o) => {
                let off = o - DEVICE_CFG_OFFSET;
                if off + data.len() as u64 <= self.device.config_len() as u64 {
                    self.device.write_config(off, data);
                }
            }
            o if (NOTIFY_OFFSET..MSIX_TABLE_OFFSET).contains(&o) => {
                let q = ((o - NOTIFY_OFFSET) / NOTIFY_OFF_MULTIPLIER as u64) as usize;
                if self.worker.is_some() {
                    if let Some(e) = self.notify.get(q) {
                        let _ = e.write(1);
                    }
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                self.msix().write_table(o - MSIX_TABLE_OFFSET, data)
            }
            _ => {}
        }
    }

    /// The VIRTIO_PCI_CAP_PCI_CFG window: (offset, length) it selects in
    /// BAR 0, if valid.
    fn pci_cfg_window(&self) -> Option<(u64, usize)> {
        let c = self.pci_cfg_cap;
        let bar = self.config.read_u8(c + 4);
        let off = self.config.read_u32(c + 8) as u64;
        let len = self.config.read_u32(c + 12) as usize;
        (bar == BAR_INDEX as u8 && matches!(len, 1 | 2 | 4) && off + len as u64 <= BAR_SIZE)
            .then_some((off, len))
    }
}

impl Persist for VirtioPciDevice {
    type State = VirtioPciState;

    /// This function's state for a snapshot. Queue processing must be
    /// stopped ([`VirtioPciDevice::quiesce`]) so nothing moves meanwhile.
    fn save(&self) -> Result<VirtioPciState, PersistError> {
        let name = type_name(self.device.device_type());
        if self.worker.is_some() {
            return Err(PersistError::busy(
                name,
                "queue processing is running (quiesce the device first)",
            ));
        }
        let device = self.device.save_state()?;
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| QueueSnapshot {
                max_size: q.max_size,
                size: q.cfg.size,
                desc_table: q.cfg.desc_table,
                avail_ring: q.cfg.avail_ring,
                used_ring: q.cfg.used_ring,
                enabled: q.enabled,
                msix_vector: self.irq.queue_vectors[i].load(Ordering::SeqCst),
                position: self
                    .parked
                    .as_ref()
                    .and_then(|p| p.get(i).copied().flatten()),
            })
            .collect();
        Ok(VirtioPciState {
            device_type: self.device.device_type(),
            pci_config: self.config.save()?,
            msix: self.msix().save()?,
            device_features: self.device_features,
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            driver_features: self.driver_features,
            status: self.status,
            needs_reset: self.health.needs_reset.load(Ordering::SeqCst),
            queue_select: self.queue_select,
            isr: self.irq.isr.load(Ordering::SeqCst),
            config_generation: self.irq.generation.load(Ordering::SeqCst),
            config_msix_vector: self.irq.config_vector.load(Ordering::SeqCst),
            queues,
            device,
        })
    }

    /// Load a snapshot's state into this (new, never activated) function.
    /// Queue processing starts at [`VirtioPciDevice::resume`]. The PCI bus
    /// must then re-map the BARs the restored configuration decodes.
    ///
    /// Everything is checked before anything changes: the transport's own
    /// registers first, then the parts (configuration space, MSI-X, the
    /// device model), each all or nothing, the earlier ones put back if a
    /// later one refuses.
    fn restore(&mut self, s: &VirtioPciState) -> Result<(), PersistError> {
        let ty = self.device.device_type();
        let name = type_name(ty);
        if s.device_type != ty {
            return Err(PersistError::mismatch(
                name,
                format!(
                    "the snapshot has a virtio device of type {} here, this VM a type {ty}",
                    s.device_type
                ),
            ));
        }
        if s.device_features != self.device_features {
            return Err(PersistError::mismatch(
                name,
                format!(
                    "the device offered features {:#x} when saved, {:#x} now",
                    s.device_features, self.device_features
                ),
            ));
        }
        if s.queues.len() != self.queues.len()
            || s.queues
                .iter()
                .zip(&self.queues)
                .any(|(a, b)| a.max_size != b.max_size)
        {
            return Err(PersistError::mismatch(
                name,
                "the snapshot's queues do not match this device's",
            ));
        }
        let nvec = self.msix().num_vectors();
        let vector_ok = |v: u16| v == VIRTIO_MSI_NO_VECTOR || (v as usize) < nvec;
        if !vector_ok(s.config_msix_vector) || s.queues.iter().any(|q| !vector_ok(q.msix_vector)) {
            return Err(PersistError::invalid(
                name,
                "an MSI-X vector beyond the device's table",
            ));
        }
        if self.worker.is_some() {
            return Err(PersistError::busy(name, "the device is already running"));
        }
        let driver_features = s.driver_features & self.device_features;
        let queues: Vec<QueueRegs> = s
            .queues
            .iter()
            .map(|q| QueueRegs {
                max_size: q.max_size,
                cfg: QueueConfig {
                    size: q.size,
                    desc_table: q.desc_table,
                    avail_ring: q.avail_ring,
                    used_ring: q.used_ring,
                },
                enabled: q.enabled,
            })
            .collect();
        let status = s.status & !DEVICE_NEEDS_RESET;
        let parked = if status & DRIVER_OK != 0 && !s.needs_reset {
            let positions: Positions = s.queues.iter().map(|q| q.position).collect();
            // Refuse queues the driver could never have had live, now
            // rather than as a device failure once the guest runs.
            live_queues(&self.mem, driver_features, &queues, Some(&positions))
                .map_err(|e| PersistError::invalid(name, format!("snapshot virtio queues: {e}")))?;
            Some(positions)
        } else {
            None
        };

        let old_config = self.config.save()?;
        let old_msix = self.msix().save()?;
        let parts = self
            .config
            .restore(&s.pci_config)
            .and_then(|()| self.msix().restore(&s.msix))
            .and_then(|()| self.device.restore_state(&s.device));
        if let Err(e) = parts {
            // Each part takes back what it saved itself.
            let _ = self.config.restore(&old_config);
            let _ = self.msix().restore(&old_msix);
            return Err(e);
        }

        self.device_feature_select = s.device_feature_select;
        self.driver_feature_select = s.driver_feature_select;
        self.driver_features = driver_features;
        self.status = status;
        self.health
            .needs_reset
            .store(s.needs_reset, Ordering::SeqCst);
        self.queue_select = s.queue_select;
        self.irq.isr.store(s.isr, Ordering::SeqCst);
        self.irq
            .generation
            .store(s.config_generation, Ordering::SeqCst);
        self.irq
            .config_vector
            .store(s.config_msix_vector, Ordering::SeqCst);
        for (i, q) in s.queues.iter().enumerate() {
            self.irq.queue_vectors[i].store(q.msix_vector, Ordering::SeqCst);
        }
        self.queues = queues;
        self.parked = parked;
        Ok(())
    }
}

fn overlaps(offset: usize, len: usize, start: usize, end: usize) -> bool {
    offset < end && offset + len > start
}

impl PciDevice for VirtioPciDevice {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }

    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        let win = self.pci_cfg_cap + 16;
        if overlaps(offset, data.len(), win, win + 4) {
            if let Some((off, len)) = self.pci_cfg_window() {
                let mut buf = [0u8; 4];
                self.bar_read(off, &mut buf[..len]);
                self.config.set_bytes(win, &buf);
            }
        }
        self.config.read(offset, data)
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        let ctrl = self.msix_cap + 2;
        if overlaps(offset, data.len(), ctrl, ctrl + 2) {
            let v = self.config.read_u16(ctrl);
            self.msix().set_control(v);
        }
        let win = self.pci_cfg_cap + 16;
        if overlaps(offset, data.len(), win, win + 4) {
            if let Some((off, len)) = self.pci_cfg_window() {
                let mut buf = [0u8; 4];
                self.config.read(win, &mut buf);
                self.bar_write(off, &buf[..len]);
            }
        }
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if bar == BAR_INDEX {
            self.bar_read(offset, data)
        } else {
            data.fill(0xff)
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar == BAR_INDEX {
            self.bar_write(offset, data)
        }
    }
}

impl Drop for VirtioPciDevice {
    fn drop(&mut self) {
        if let Some(mut w) = self.worker.take() {
            w.stop();
        }
    }
}

/// Rounds over a queue with available buffers and no progress before the
/// worker goes back to waiting.
const MAX_IDLE_ROUNDS: u32 = 1024;

/// What the worker thread owns.
struct WorkerContext {
    worker: Box<dyn QueueWorker>,
    queues: Vec<Option<VirtQueue>>,
    mem: GuestRam,
    irq: Arc<dyn VirtioInterrupt>,
    health: Arc<Health>,
    counters: Arc<crate::stats::TransportCounters>,
    kill: EventFd,
    notify: Vec<EventFd>,
}

impl WorkerContext {
    /// Where each queue is (for a snapshot or a later restart).
    fn positions(&self) -> Positions {
        self.queues
            .iter()
            .map(|q| q.as_ref().map(|q| q.position()))
            .collect()
    }

    /// Serve the queues until told to stop; where it left them.
    fn run(mut self) -> Positions {
        self.serve();
        self.positions()
    }

    fn serve(&mut self) {
        // Buffers made available before DRIVER_OK (or while a notify was
        // lost to a previous reset or a snapshot) are served without
        // waiting for a kick.
        for i in 0..self.queues.len() {
            if !self.service(i) {
                return self.park();
            }
        }
        let host_fd = self.worker.host_event().map(|e| e.as_raw_fd());
        // Polled directly, and only while the device arms it (the last entry).
        let direct_fd = self.worker.host_fd();
        let mut fds: Vec<libc::pollfd> = std::iter::once(self.kill.as_raw_fd())
            .chain(self.notify.iter().map(|e| e.as_raw_fd()))
            .chain(host_fd)
            .chain(direct_fd)
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let nq = self.notify.len();
        loop {
            if let (Some(fd), Some(last)) = (direct_fd, fds.last_mut()) {
                // A negative descriptor is skipped by poll.
                last.fd = if self.worker.host_fd_armed() { fd } else { -1 };
            }
            // SAFETY: `fds` is a valid array of pollfd for its length.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if n < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(
                    "virtio worker: poll failed: {}",
                    std::io::Error::last_os_error()
                );
                return;
            }
            if fds[0].revents != 0 {
                return;
            }
            for i in 0..nq {
                if fds[i + 1].revents == 0 {
                    continue;
                }
                // The eventfd's value is how many notifies it gathered.
                if let Ok(n) = self.notify[i].read() {
                    self.counters.notifications.add(n);
                }
                if !self.service(i) {
                    return self.park();
                }
            }
            if host_fd.is_some() && fds[nq + 1].revents != 0 {
                if let Some(e) = self.worker.host_event() {
                    let _ = e.read();
                }
                for i in self.worker.host_event_queues() {
                    if !self.service(i) {
                        return self.park();
                    }
                }
            }
            if direct_fd.is_some() && fds.last().is_some_and(|f| f.fd >= 0 && f.revents != 0) {
                for i in self.worker.host_event_queues() {
                    if !self.service(i) {
                        return self.park();
                    }
                }
            }
        }
    }

    /// After a fatal queue error: ignore notifies until reset stops us.
    fn park(&self) {
        let mut fd = libc::pollfd {
            fd: self.kill.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        while unsafe { libc::poll(&mut fd, 1, -1) } < 0 {}
    }

    /// Process queue `i` until it is empty, with notification suppression
    /// done the EVENT_IDX way. False after a fatal error.
    fn service(&mut self, i: usize) -> bool {
        let Some(q) = self.queues.get_mut(i).and_then(|q| q.as_mut()) else {
            return true;
        };
        let mem = &self.mem;
        let mut idle_rounds = 0u32;
        let result = (|| loop {
            q.disable_notification(mem)?;
            let done = self.worker.process_queue(i, q, mem)?;
            if done.used && q.needs_notification(mem)? {
                self.irq.signal_queue(i as u16);
            }
            if !q.enable_notification(mem)? || done.stalled {
                return Ok(());
            }
            // Buffers stay available yet the device consumed none: a device
            // model that forgot to say `stalled`. Go back to waiting rather
            // than spin (a spinning worker never sees its stop request).
            idle_rounds = if done.used { 0 } else { idle_rounds + 1 };
            if idle_rounds >= MAX_IDLE_ROUNDS {
                tracing::warn!("virtio queue {i}: no progress on available buffers; waiting for the next notify");
                return Ok(());
            }
        })();
        match result {
            Ok(()) => true,
            Err(e) => {
                let e: crate::QueueError = e;
                tracing::error!("virtio queue {i}: {e}; device needs reset");
                self.health.errors.fetch_add(1, Ordering::SeqCst);
                self.health.needs_reset.store(true, Ordering::SeqCst);
                self.irq.signal_config();
                false
            }
        }
    }
}
