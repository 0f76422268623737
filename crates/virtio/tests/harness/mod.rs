//! A simulated guest driver doing what Linux's virtio_pci_modern does,
//! through the PCI configuration ports and BAR 0 only. Queue `q` has its
//! rings at `ring(q)`.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::Bus;
use hypervisor::GuestRam;
use pci::{BarAllocator, PciBus, PciConfigIo};
use virtio::features::*;
use virtio::status::*;
use virtio::transport::common;
use virtio::{VirtioDevice, VirtioPciDevice};
use vm_memory::{Address, Bytes, GuestAddress};

pub const MEM_SIZE: usize = 16 << 20;
pub const DESC: u64 = 0x10_0000;
pub const AVAIL: u64 = 0x10_1000;
pub const USED: u64 = 0x10_2000;
/// Rings of queue `q`: descriptor table, avail, used.
pub fn ring(q: u16) -> (u64, u64, u64) {
    let b = q as u64 * 0x1_0000;
    (DESC + b, AVAIL + b, USED + b)
}
pub const BUF: u64 = 0x20_0000;
pub const INDIRECT: u64 = 0x30_0000;
pub const QSIZE: u16 = 16;
pub const MSI_ADDR: u64 = 0xfee0_0000;
pub const CONFIG_DATA: u32 = 0x30;
pub const QUEUE_DATA: u32 = 0x31;

pub type Msis = Arc<Mutex<Vec<(u64, u32)>>>;

pub struct Machine {
    pub mem: GuestRam,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub msis: Msis,
    pub dev: Arc<Mutex<VirtioPciDevice>>,
    pub pci: Arc<PciBus>,
    pub device_id: u16,
}

pub fn machine() -> Machine {
    machine_with(Box::new(virtio::rng::Rng::new()))
}

pub fn machine_with(device: Box<dyn VirtioDevice>) -> Machine {
    let device_id = 0x1040 + device.device_type() as u16;
    let mem = GuestRam::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let mmio = Arc::new(Bus::new());
    let pio = Arc::new(Bus::new());
    let pci = Arc::new(PciBus::new(mmio.clone(), pio.clone()));
    let cio = PciConfigIo::new(pci.clone());
    pio.insert(0xcf8, 1, Arc::new(Mutex::new(cio.address_port())))
        .unwrap();
    pio.insert(0xcfc, 4, Arc::new(Mutex::new(cio.data_port())))
        .unwrap();
    let msis: Msis = Arc::new(Mutex::new(Vec::new()));
    let seen = msis.clone();
    let sink: pci::MsiSink = Arc::new(move |a, d| seen.lock().unwrap().push((a, d)));
    let dev = Arc::new(Mutex::new(
        VirtioPciDevice::new(device, mem.clone(), sink).unwrap(),
    ));
    let mut alloc = BarAllocator::default();
    pci.add_device(dev.clone(), &mut alloc).unwrap();
    Machine {
        mem,
        pio,
        mmio,
        msis,
        dev,
        pci,
        device_id,
    }
}

/// Where the driver found things.
pub struct Driver<'a> {
    pub m: &'a Machine,
    pub slot: u8,
    pub common: u64,
    pub notify: u64,
    pub notify_mult: u32,
    pub isr: u64,
    pub msix_cap: u8,
    pub pci_cfg_cap: u8,
    pub msix_table: u64,
}

fn cfg_addr(slot: u8, reg: u8) -> [u8; 4] {
    (0x8000_0000u32 | (slot as u32) << 11 | (reg as u32 & 0xfc)).to_le_bytes()
}

pub fn cfg_read(m: &Machine, slot: u8, reg: u8, len: usize) -> u32 {
    m.pio.write(0xcf8, &cfg_addr(slot, reg));
    let mut d = [0u8; 4];
    m.pio.read(0xcfc + (reg & 3) as u64, &mut d[..len]);
    u32::from_le_bytes(d)
}

pub fn cfg_write(m: &Machine, slot: u8, reg: u8, v: u32, len: usize) {
    m.pio.write(0xcf8, &cfg_addr(slot, reg));
    m.pio
        .write(0xcfc + (reg & 3) as u64, &v.to_le_bytes()[..len]);
}

impl<'a> Driver<'a> {
    /// Enumerate bus 0 and read the capabilities, as virtio_pci_modern_probe.
    pub fn probe(m: &'a Machine) -> Driver<'a> {
        let slot = (0..32u8)
            .find(|&s| cfg_read(m, s, 0, 4) == (m.device_id as u32) << 16 | 0x1af4)
            .expect("virtio device not found");
        assert!(
            cfg_read(m, slot, 8, 1) >= 1,
            "modern devices have revision >= 1"
        );
        assert_ne!(cfg_read(m, slot, 6, 2) & 0x10, 0, "capability list");
        let bar_lo = cfg_read(m, slot, 0x10, 4);
        assert_eq!(bar_lo & 0x6, 0x4, "64-bit memory BAR");
        let bar = (bar_lo & !0xf) as u64 | (cfg_read(m, slot, 0x14, 4) as u64) << 32;
        assert_ne!(bar, 0);
        // Memory decode and bus mastering on, as pci_enable_device/pci_set_master.
        cfg_write(m, slot, 4, 0x6, 2);
        let mut d = Driver {
            m,
            slot,
            common: 0,
            notify: 0,
            notify_mult: 0,
            isr: 0,
            msix_cap: 0,
            pci_cfg_cap: 0,
            msix_table: 0,
        };
        let mut p = cfg_read(m, slot, 0x34, 1) as u8;
        let mut seen = 0;
        while p != 0 {
            seen += 1;
            assert!(seen < 48, "capability list loops");
            let id = cfg_read(m, slot, p, 1);
            if id == 0x09 {
                let ty = cfg_read(m, slot, p + 3, 1) as u8;
                let bir = cfg_read(m, slot, p + 4, 1);
                let off = cfg_read(m, slot, p + 8, 4) as u64;
                assert_eq!(bir, 0);
                match ty {
                    1 => d.common = bar + off,
                    2 => {
                        d.notify = bar + off;
                        d.notify_mult = cfg_read(m, slot, p + 16, 4);
                    }
                    3 => d.isr = bar + off,
                    5 => d.pci_cfg_cap = p,
                    _ => {}
                }
            } else if id == 0x11 {
                d.msix_cap = p;
                let t = cfg_read(m, slot, p + 4, 4);
                assert_eq!(t & 7, 0, "table in BAR 0");
                d.msix_table = bar + (t & !7) as u64;
            }
            p = cfg_read(m, slot, p + 1, 1) as u8;
        }
        assert!(
            d.common != 0 && d.notify != 0 && d.isr != 0 && d.msix_cap != 0 && d.pci_cfg_cap != 0
        );
        assert_eq!(d.notify_mult, 4);
        d
    }

    pub fn r(&self, addr: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        assert!(
            self.m.mmio.read(addr, &mut b[..len]),
            "nothing at {addr:#x}"
        );
        u64::from_le_bytes(b)
    }

    pub fn w(&self, addr: u64, v: u64, len: usize) {
        assert!(
            self.m.mmio.write(addr, &v.to_le_bytes()[..len]),
            "nothing at {addr:#x}"
        );
    }

    pub fn status(&self) -> u8 {
        self.r(self.common + common::DEVICE_STATUS, 1) as u8
    }

    pub fn set_status(&self, s: u8) {
        self.w(self.common + common::DEVICE_STATUS, s as u64, 1)
    }

    /// MSI-X on: vector 0 for config (data CONFIG_DATA), vector q + 1
    /// for queue q (data QUEUE_DATA + q), all unmasked.
    pub fn enable_msix(&self) {
        let ctrl = self.msix_cap + 2;
        let v = cfg_read(self.m, self.slot, ctrl, 2);
        let nvec = (v & 0x7ff) as u64 + 1;
        assert_eq!(
            nvec,
            self.num_queues() as u64 + 1,
            "a vector per queue plus config"
        );
        for v in 0..nvec {
            let e = self.msix_table + 16 * v;
            self.w(e, MSI_ADDR, 4);
            self.w(e + 4, 0, 4);
            self.w(e + 8, CONFIG_DATA as u64 + v, 4);
            self.w(e + 12, 0, 4);
        }
        cfg_write(self.m, self.slot, ctrl, v | 0x8000, 2);
    }

    pub fn num_queues(&self) -> u16 {
        self.r(self.common + common::NUM_QUEUES, 2) as u16
    }

    pub fn features(&self) -> u64 {
        let mut f = 0;
        for sel in 0..2u64 {
            self.w(self.common + common::DEVICE_FEATURE_SELECT, sel, 4);
            f |= self.r(self.common + common::DEVICE_FEATURE, 4) << (32 * sel);
        }
        f
    }

    pub fn write_features(&self, f: u64) {
        for sel in 0..2u64 {
            self.w(self.common + common::DRIVER_FEATURE_SELECT, sel, 4);
            self.w(
                self.common + common::DRIVER_FEATURE,
                (f >> (32 * sel)) & 0xffff_ffff,
                4,
            );
        }
    }

    /// The init sequence up to DRIVER_OK, queue 0 at our rings.
    pub fn init(&self, want: u64) {
        self.set_status(0);
        assert_eq!(self.status(), 0);
        self.set_status(ACKNOWLEDGE);
        self.set_status(ACKNOWLEDGE | DRIVER);
        let offered = self.features();
        assert_ne!(offered & VIRTIO_F_VERSION_1, 0);
        self.write_features(offered & want);
        self.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_ne!(self.status() & FEATURES_OK, 0, "features accepted");
        self.w(self.common + common::CONFIG_MSIX_VECTOR, 0, 2);
        assert_eq!(self.r(self.common + common::CONFIG_MSIX_VECTOR, 2), 0);
        for q in 0..self.num_queues() {
            let (desc, avail, used) = ring(q);
            self.w(self.common + common::QUEUE_SELECT, q as u64, 2);
            assert_eq!(self.r(self.common + common::QUEUE_SIZE, 2), 256);
            self.w(self.common + common::QUEUE_SIZE, QSIZE as u64, 2);
            self.w(self.common + common::QUEUE_MSIX_VECTOR, q as u64 + 1, 2);
            assert_eq!(
                self.r(self.common + common::QUEUE_MSIX_VECTOR, 2),
                q as u64 + 1
            );
            // 64-bit fields as two dwords, as Linux's vp_iowrite64_twopart.
            for (off, v) in [
                (common::QUEUE_DESC, desc),
                (common::QUEUE_DRIVER, avail),
                (common::QUEUE_DEVICE, used),
            ] {
                self.w(self.common + off, v & 0xffff_ffff, 4);
                self.w(self.common + off + 4, v >> 32, 4);
            }
            assert_eq!(self.r(self.common + common::QUEUE_DESC, 8), desc);
            self.w(self.common + common::QUEUE_ENABLE, 1, 2);
            assert_eq!(self.r(self.common + common::QUEUE_ENABLE, 2), 1);
            // Clean rings.
            let zero = vec![0u8; 0x3000];
            self.m.mem.write_slice(&zero, GuestAddress(desc)).unwrap();
        }
        self.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        assert_eq!(
            self.status(),
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
        );
    }

    pub fn desc(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let a = GuestAddress(table + 16 * i as u64);
        let mem = &self.m.mem;
        mem.write_obj(addr, a).unwrap();
        mem.write_obj(len, a.unchecked_add(8)).unwrap();
        mem.write_obj(flags, a.unchecked_add(12)).unwrap();
        mem.write_obj(next, a.unchecked_add(14)).unwrap();
    }

    pub fn avail_idx(&self) -> u16 {
        self.avail_idx_q(0)
    }

    pub fn avail_idx_q(&self, q: u16) -> u16 {
        self.m.mem.read_obj(GuestAddress(ring(q).1 + 2)).unwrap()
    }

    /// Make `head` available on queue 0 and kick it.
    pub fn submit(&self, head: u16) {
        self.submit_q(0, head)
    }

    pub fn submit_q(&self, q: u16, head: u16) {
        let avail = ring(q).1;
        let idx = self.avail_idx_q(q);
        let mem = &self.m.mem;
        mem.write_obj(head, GuestAddress(avail + 4 + 2 * (idx % QSIZE) as u64))
            .unwrap();
        mem.write_obj(idx.wrapping_add(1), GuestAddress(avail + 2))
            .unwrap();
        self.kick_q(q);
    }

    pub fn kick(&self) {
        self.kick_q(0)
    }

    pub fn kick_q(&self, q: u16) {
        self.w(self.common + common::QUEUE_SELECT, q as u64, 2);
        let off = self.r(self.common + common::QUEUE_NOTIFY_OFF, 2);
        self.w(self.notify + off * self.notify_mult as u64, q as u64, 2);
    }

    pub fn used_idx(&self) -> u16 {
        self.used_idx_q(0)
    }

    pub fn used_idx_q(&self, q: u16) -> u16 {
        self.m.mem.read_obj(GuestAddress(ring(q).2 + 2)).unwrap()
    }

    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        self.used_elem_q(0, i)
    }

    pub fn used_elem_q(&self, q: u16, i: u16) -> (u32, u32) {
        let a = GuestAddress(ring(q).2 + 4 + 8 * (i % QSIZE) as u64);
        (
            self.m.mem.read_obj(a).unwrap(),
            self.m.mem.read_obj(a.unchecked_add(4)).unwrap(),
        )
    }

    pub fn wait_used(&self, n: u16) {
        self.wait_used_q(0, n)
    }

    pub fn wait_used_q(&self, q: u16, n: u16) {
        wait(|| self.used_idx_q(q) == n, "used ring");
    }
}

pub fn wait(mut f: impl FnMut() -> bool, what: &str) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

pub fn msis(m: &Machine) -> Vec<(u64, u32)> {
    m.msis.lock().unwrap().clone()
}
