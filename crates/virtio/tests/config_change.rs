//! A device-side configuration change: the generation moves, the driver
//! gets a configuration interrupt, and reads see the new value.

mod harness;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use harness::*;
use hypervisor::GuestRam;
use virtio::features::VIRTIO_F_VERSION_1;
use virtio::transport::{common, DEVICE_CFG_OFFSET};
use virtio::{
    ActivateError, Processed, QueueError, QueueWorker, VirtQueue, VirtioDevice, VirtioInterrupt,
};

type Slot = Arc<Mutex<Option<Arc<dyn VirtioInterrupt>>>>;

struct Capacity {
    value: Arc<AtomicU32>,
    irq: Slot,
}

struct Idle;

impl QueueWorker for Idle {
    fn process_queue(
        &mut self,
        _: usize,
        _: &mut VirtQueue,
        _: &GuestRam,
    ) -> Result<Processed, QueueError> {
        Ok(Processed::default())
    }
}

impl VirtioDevice for Capacity {
    fn device_type(&self) -> u32 {
        2
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![256]
    }
    fn features(&self) -> u64 {
        0
    }
    fn config_len(&self) -> usize {
        4
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let v = self.value.load(Ordering::SeqCst).to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = v.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn activate(
        &mut self,
        _: u64,
        _: GuestRam,
        irq: Arc<dyn VirtioInterrupt>,
    ) -> Result<Box<dyn QueueWorker>, ActivateError> {
        *self.irq.lock().unwrap() = Some(irq);
        Ok(Box::new(Idle))
    }
}

#[test]
fn config_change_bumps_generation_and_interrupts() {
    let value = Arc::new(AtomicU32::new(100));
    let irq: Slot = Arc::new(Mutex::new(None));
    let m = machine_with(Box::new(Capacity {
        value: value.clone(),
        irq: irq.clone(),
    }));
    let d = Driver::probe(&m);
    d.enable_msix();
    d.init(VIRTIO_F_VERSION_1);
    // The device config capability points at DEVICE_CFG_OFFSET.
    let dev_cfg = d.common - common::DEVICE_FEATURE_SELECT + DEVICE_CFG_OFFSET;
    assert_eq!(d.r(dev_cfg, 4), 100);
    // Reads past the device's config space are zero.
    assert_eq!(d.r(dev_cfg + 4, 4), 0);
    let gen0 = d.r(d.common + common::CONFIG_GENERATION, 1);
    value.store(200, Ordering::SeqCst);
    irq.lock().unwrap().as_ref().unwrap().config_changed();
    assert_eq!(
        d.r(d.common + common::CONFIG_GENERATION, 1),
        (gen0 + 1) & 0xff
    );
    assert_eq!(d.r(dev_cfg, 4), 200);
    assert_eq!(msis(&m), vec![(MSI_ADDR, CONFIG_DATA)]);
}

struct Panicky;

struct Boom;

impl QueueWorker for Boom {
    fn process_queue(
        &mut self,
        _: usize,
        q: &mut VirtQueue,
        mem: &GuestRam,
    ) -> Result<Processed, QueueError> {
        if q.pop(mem)?.is_some() {
            panic!("device model bug");
        }
        Ok(Processed::default())
    }
}

impl VirtioDevice for Panicky {
    fn device_type(&self) -> u32 {
        4
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![256]
    }
    fn features(&self) -> u64 {
        0
    }
    fn activate(
        &mut self,
        _: u64,
        _: GuestRam,
        _: Arc<dyn VirtioInterrupt>,
    ) -> Result<Box<dyn QueueWorker>, ActivateError> {
        Ok(Box::new(Boom))
    }
}

#[test]
fn a_panicking_worker_leaves_the_device_needing_reset() {
    let m = machine_with(Box::new(Panicky));
    let d = Driver::probe(&m);
    d.enable_msix();
    d.init(VIRTIO_F_VERSION_1);
    d.desc(DESC, 0, BUF, 8, 2, 0);
    d.submit(0);
    wait(
        || d.status() & virtio::status::DEVICE_NEEDS_RESET != 0,
        "NEEDS_RESET",
    );
    wait(|| msis(&m) == vec![(MSI_ADDR, CONFIG_DATA)], "config MSI");
    // Reset joins the dead worker cleanly and the device can start again.
    d.init(VIRTIO_F_VERSION_1);
    assert!(m.dev.lock().unwrap().is_active());
}
