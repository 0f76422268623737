//! A simulated guest driver doing what Linux's virtio_pci_modern and
//! virtio_rng do, through the PCI configuration ports and BAR 0 only:
//! find the device, walk its capabilities, enable MSI-X, negotiate
//! features, set up the request queue, DRIVER_OK, and fetch entropy. Then
//! reset, masking, and hostile rings.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::Bus;
use pci::{BarAllocator, PciBus, PciConfigIo};
use virtio::features::*;
use virtio::status::*;
use virtio::transport::common;
use virtio::VirtioPciDevice;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

const MEM_SIZE: usize = 16 << 20;
const DESC: u64 = 0x10_0000;
const AVAIL: u64 = 0x10_1000;
const USED: u64 = 0x10_2000;
const BUF: u64 = 0x20_0000;
const INDIRECT: u64 = 0x30_0000;
const QSIZE: u16 = 16;
const MSI_ADDR: u64 = 0xfee0_0000;
const CONFIG_DATA: u32 = 0x30;
const QUEUE_DATA: u32 = 0x31;

type Msis = Arc<Mutex<Vec<(u64, u32)>>>;

struct Machine {
    mem: GuestMemoryMmap,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    msis: Msis,
    dev: Arc<Mutex<VirtioPciDevice>>,
}

fn machine() -> Machine {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
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
        VirtioPciDevice::new(Box::new(virtio::rng::Rng::new()), mem.clone(), sink).unwrap(),
    ));
    let mut alloc = BarAllocator::default();
    pci.add_device(dev.clone(), &mut alloc).unwrap();
    Machine {
        mem,
        pio,
        mmio,
        msis,
        dev,
    }
}

/// Where the driver found things.
struct Driver<'a> {
    m: &'a Machine,
    slot: u8,
    common: u64,
    notify: u64,
    notify_mult: u32,
    isr: u64,
    msix_cap: u8,
    pci_cfg_cap: u8,
    msix_table: u64,
}

fn cfg_addr(slot: u8, reg: u8) -> [u8; 4] {
    (0x8000_0000u32 | (slot as u32) << 11 | (reg as u32 & 0xfc)).to_le_bytes()
}

fn cfg_read(m: &Machine, slot: u8, reg: u8, len: usize) -> u32 {
    m.pio.write(0xcf8, &cfg_addr(slot, reg));
    let mut d = [0u8; 4];
    m.pio.read(0xcfc + (reg & 3) as u64, &mut d[..len]);
    u32::from_le_bytes(d)
}

fn cfg_write(m: &Machine, slot: u8, reg: u8, v: u32, len: usize) {
    m.pio.write(0xcf8, &cfg_addr(slot, reg));
    m.pio
        .write(0xcfc + (reg & 3) as u64, &v.to_le_bytes()[..len]);
}

impl<'a> Driver<'a> {
    /// Enumerate bus 0 and read the capabilities, as virtio_pci_modern_probe.
    fn probe(m: &'a Machine) -> Driver<'a> {
        let slot = (0..32u8)
            .find(|&s| cfg_read(m, s, 0, 4) == 0x1044_1af4)
            .expect("virtio-rng not found");
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

    fn r(&self, addr: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        assert!(
            self.m.mmio.read(addr, &mut b[..len]),
            "nothing at {addr:#x}"
        );
        u64::from_le_bytes(b)
    }

    fn w(&self, addr: u64, v: u64, len: usize) {
        assert!(
            self.m.mmio.write(addr, &v.to_le_bytes()[..len]),
            "nothing at {addr:#x}"
        );
    }

    fn status(&self) -> u8 {
        self.r(self.common + common::DEVICE_STATUS, 1) as u8
    }

    fn set_status(&self, s: u8) {
        self.w(self.common + common::DEVICE_STATUS, s as u64, 1)
    }

    /// MSI-X on, vector 0 for config and 1 for the queue, both unmasked.
    fn enable_msix(&self) {
        for (v, data) in [(0u64, CONFIG_DATA), (1, QUEUE_DATA)] {
            let e = self.msix_table + 16 * v;
            self.w(e, MSI_ADDR, 4);
            self.w(e + 4, 0, 4);
            self.w(e + 8, data as u64, 4);
            self.w(e + 12, 0, 4);
        }
        let ctrl = self.msix_cap + 2;
        let v = cfg_read(self.m, self.slot, ctrl, 2);
        assert_eq!(v & 0x7ff, 1, "two vectors");
        cfg_write(self.m, self.slot, ctrl, v | 0x8000, 2);
    }

    fn features(&self) -> u64 {
        let mut f = 0;
        for sel in 0..2u64 {
            self.w(self.common + common::DEVICE_FEATURE_SELECT, sel, 4);
            f |= self.r(self.common + common::DEVICE_FEATURE, 4) << (32 * sel);
        }
        f
    }

    fn write_features(&self, f: u64) {
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
    fn init(&self, want: u64) {
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
        assert_eq!(self.r(self.common + common::NUM_QUEUES, 2), 1);
        self.w(self.common + common::QUEUE_SELECT, 0, 2);
        assert_eq!(self.r(self.common + common::QUEUE_SIZE, 2), 256);
        self.w(self.common + common::QUEUE_SIZE, QSIZE as u64, 2);
        self.w(self.common + common::QUEUE_MSIX_VECTOR, 1, 2);
        assert_eq!(self.r(self.common + common::QUEUE_MSIX_VECTOR, 2), 1);
        // 64-bit fields as two dwords, as Linux's vp_iowrite64_twopart.
        for (off, v) in [
            (common::QUEUE_DESC, DESC),
            (common::QUEUE_DRIVER, AVAIL),
            (common::QUEUE_DEVICE, USED),
        ] {
            self.w(self.common + off, v & 0xffff_ffff, 4);
            self.w(self.common + off + 4, v >> 32, 4);
        }
        assert_eq!(self.r(self.common + common::QUEUE_DESC, 8), DESC);
        self.w(self.common + common::QUEUE_ENABLE, 1, 2);
        assert_eq!(self.r(self.common + common::QUEUE_ENABLE, 2), 1);
        // Clean rings.
        let zero = vec![0u8; 0x3000];
        self.m.mem.write_slice(&zero, GuestAddress(DESC)).unwrap();
        self.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        assert_eq!(
            self.status(),
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
        );
    }

    fn desc(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let a = GuestAddress(table + 16 * i as u64);
        let mem = &self.m.mem;
        mem.write_obj(addr, a).unwrap();
        mem.write_obj(len, a.unchecked_add(8)).unwrap();
        mem.write_obj(flags, a.unchecked_add(12)).unwrap();
        mem.write_obj(next, a.unchecked_add(14)).unwrap();
    }

    fn avail_idx(&self) -> u16 {
        self.m.mem.read_obj(GuestAddress(AVAIL + 2)).unwrap()
    }

    /// Make `head` available and kick queue 0.
    fn submit(&self, head: u16) {
        let idx = self.avail_idx();
        let mem = &self.m.mem;
        mem.write_obj(head, GuestAddress(AVAIL + 4 + 2 * (idx % QSIZE) as u64))
            .unwrap();
        mem.write_obj(idx.wrapping_add(1), GuestAddress(AVAIL + 2))
            .unwrap();
        self.kick();
    }

    fn kick(&self) {
        let off = self.r(self.common + common::QUEUE_NOTIFY_OFF, 2);
        self.w(self.notify + off * self.notify_mult as u64, 0, 2);
    }

    fn used_idx(&self) -> u16 {
        self.m.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    fn used_elem(&self, i: u16) -> (u32, u32) {
        let a = GuestAddress(USED + 4 + 8 * (i % QSIZE) as u64);
        (
            self.m.mem.read_obj(a).unwrap(),
            self.m.mem.read_obj(a.unchecked_add(4)).unwrap(),
        )
    }

    fn wait_used(&self, n: u16) {
        wait(|| self.used_idx() == n, "used ring");
    }
}

fn wait(mut f: impl FnMut() -> bool, what: &str) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn msis(m: &Machine) -> Vec<(u64, u32)> {
    m.msis.lock().unwrap().clone()
}

#[test]
fn linux_style_init_then_entropy_with_msix() {
    let m = machine();
    let d = Driver::probe(&m);
    d.enable_msix();
    d.init(VIRTIO_F_VERSION_1);
    d.desc(DESC, 0, BUF, 64, 2, 0);
    d.submit(0);
    d.wait_used(1);
    assert_eq!(d.used_elem(0), (0, 64));
    let mut got = [0u8; 65];
    m.mem.read_slice(&mut got, GuestAddress(BUF)).unwrap();
    assert_ne!(&got[..64], &[0u8; 64][..], "random bytes arrived");
    assert_eq!(got[64], 0, "nothing past the buffer");
    wait(|| msis(&m) == vec![(MSI_ADDR, QUEUE_DATA)], "queue MSI");
    // A second request, split over two writable descriptors.
    d.desc(DESC, 1, BUF + 0x1000, 16, 1 | 2, 2);
    d.desc(DESC, 2, BUF + 0x2000, 4000, 2, 0);
    d.submit(1);
    d.wait_used(2);
    assert_eq!(d.used_elem(1), (1, 4016));
    wait(|| msis(&m).len() == 2, "second queue MSI");
    assert_eq!(m.dev.lock().unwrap().queue_errors(), 0);
}

#[test]
fn event_idx_and_indirect_descriptors() {
    let m = machine();
    let d = Driver::probe(&m);
    d.enable_msix();
    d.init(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC);
    // used_event = 1: no interrupt wanted for the first used entry.
    m.mem
        .write_obj(1u16, GuestAddress(AVAIL + 4 + 2 * QSIZE as u64))
        .unwrap();
    d.desc(DESC, 0, INDIRECT, 32, 4, 0);
    d.desc(INDIRECT, 0, BUF, 8, 1 | 2, 1);
    d.desc(INDIRECT, 1, BUF + 8, 8, 2, 0);
    d.submit(0);
    d.wait_used(1);
    assert_eq!(d.used_elem(0), (0, 16));
    // The device published avail_event = 1 so the driver kicks for the next.
    let avail_event: u16 = m
        .mem
        .read_obj(GuestAddress(USED + 4 + 8 * QSIZE as u64))
        .unwrap();
    assert_eq!(avail_event, 1);
    std::thread::sleep(Duration::from_millis(20));
    assert!(msis(&m).is_empty(), "suppressed by used_event");
    d.desc(DESC, 1, BUF + 0x100, 8, 2, 0);
    d.submit(1);
    d.wait_used(2);
    wait(
        || msis(&m) == vec![(MSI_ADDR, QUEUE_DATA)],
        "MSI once used passes used_event",
    );
}

#[test]
fn feature_negotiation_refuses_bad_sets() {
    let m = machine();
    let d = Driver::probe(&m);
    for bad in [0u64, VIRTIO_F_VERSION_1 | 1 << 40, 1 << 29] {
        d.set_status(0);
        d.set_status(ACKNOWLEDGE | DRIVER);
        d.write_features(bad);
        d.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(
            d.status() & FEATURES_OK,
            0,
            "features {bad:#x} must be refused"
        );
        // DRIVER_OK without FEATURES_OK does not start the device.
        d.set_status(ACKNOWLEDGE | DRIVER | DRIVER_OK);
        assert_eq!(d.status() & DRIVER_OK, 0);
        assert!(!m.dev.lock().unwrap().is_active());
    }
    // Features are frozen once FEATURES_OK is set.
    d.init(VIRTIO_F_VERSION_1);
    d.write_features(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
    d.w(d.common + common::DRIVER_FEATURE_SELECT, 0, 4);
    assert_eq!(d.r(d.common + common::DRIVER_FEATURE, 4), 0);
    // So is the queue layout after DRIVER_OK.
    d.w(d.common + common::QUEUE_SIZE, 4, 2);
    assert_eq!(d.r(d.common + common::QUEUE_SIZE, 2), QSIZE as u64);
    // Out-of-range MSI-X vectors read back as NO_VECTOR; absent queues have size 0.
    d.w(d.common + common::CONFIG_MSIX_VECTOR, 9, 2);
    assert_eq!(d.r(d.common + common::CONFIG_MSIX_VECTOR, 2), 0xffff);
    d.w(d.common + common::QUEUE_SELECT, 3, 2);
    assert_eq!(d.r(d.common + common::QUEUE_SIZE, 2), 0);
}

#[test]
fn reset_really_resets_and_the_device_works_again() {
    let m = machine();
    let d = Driver::probe(&m);
    d.enable_msix();
    d.init(VIRTIO_F_VERSION_1);
    d.desc(DESC, 0, BUF, 32, 2, 0);
    d.submit(0);
    d.wait_used(1);
    d.set_status(0);
    assert_eq!(d.status(), 0);
    assert!(!m.dev.lock().unwrap().is_active());
    d.w(d.common + common::QUEUE_SELECT, 0, 2);
    assert_eq!(d.r(d.common + common::QUEUE_ENABLE, 2), 0);
    assert_eq!(d.r(d.common + common::QUEUE_SIZE, 2), 256);
    assert_eq!(d.r(d.common + common::QUEUE_DESC, 8), 0);
    assert_eq!(d.r(d.common + common::QUEUE_MSIX_VECTOR, 2), 0xffff);
    assert_eq!(d.r(d.common + common::CONFIG_MSIX_VECTOR, 2), 0xffff);
    d.w(d.common + common::DRIVER_FEATURE_SELECT, 1, 4);
    assert_eq!(d.r(d.common + common::DRIVER_FEATURE, 4), 0);
    // A kick while reset does nothing.
    d.kick();
    std::thread::sleep(Duration::from_millis(10));
    // Re-initialise from scratch (rings zeroed by init): fresh indices.
    d.init(VIRTIO_F_VERSION_1);
    d.desc(DESC, 0, BUF, 32, 2, 0);
    d.submit(0);
    d.wait_used(1);
    assert_eq!(d.used_elem(0), (0, 32));
}

#[test]
fn msix_masking_holds_interrupts_until_unmasked_and_intx_without_msix() {
    let m = machine();
    let d = Driver::probe(&m);
    d.enable_msix();
    // Mask the queue vector.
    d.w(d.msix_table + 16 + 12, 1, 4);
    d.init(VIRTIO_F_VERSION_1);
    d.desc(DESC, 0, BUF, 8, 2, 0);
    d.submit(0);
    d.wait_used(1);
    let pba = d.msix_table + 0x1000;
    wait(|| d.r(pba, 8) == 2, "pending bit for vector 1");
    assert!(msis(&m).is_empty());
    d.w(d.msix_table + 16 + 12, 0, 4);
    assert_eq!(msis(&m), vec![(MSI_ADDR, QUEUE_DATA)]);
    assert_eq!(d.r(pba, 8), 0);

    // Without MSI-X the ISR and INTx carry the interrupt.
    let m = machine();
    let d = Driver::probe(&m);
    let edges = Arc::new(Mutex::new(0));
    let e = edges.clone();
    m.dev
        .lock()
        .unwrap()
        .set_intx(Arc::new(move || *e.lock().unwrap() += 1));
    d.init(VIRTIO_F_VERSION_1);
    d.desc(DESC, 0, BUF, 8, 2, 0);
    d.submit(0);
    d.wait_used(1);
    wait(|| *edges.lock().unwrap() == 1, "INTx edge");
    assert_eq!(d.r(d.isr, 1), 1, "queue interrupt in ISR");
    assert_eq!(d.r(d.isr, 1), 0, "ISR clears on read");
    assert!(msis(&m).is_empty());
}

#[test]
fn pci_cfg_capability_reaches_bar0() {
    let m = machine();
    let d = Driver::probe(&m);
    let c = d.pci_cfg_cap;
    // Read device_feature (select 1 -> VERSION_1 is bit 0) through the window.
    d.w(d.common + common::DEVICE_FEATURE_SELECT, 1, 4);
    cfg_write(&m, d.slot, c + 4, 0, 1);
    cfg_write(&m, d.slot, c + 8, common::DEVICE_FEATURE as u32, 4);
    cfg_write(&m, d.slot, c + 12, 4, 4);
    assert_eq!(cfg_read(&m, d.slot, c + 16, 4) & 1, 1);
    // Write the status register through it.
    cfg_write(&m, d.slot, c + 8, common::DEVICE_STATUS as u32, 4);
    cfg_write(&m, d.slot, c + 12, 1, 4);
    cfg_write(&m, d.slot, c + 16, ACKNOWLEDGE as u32, 1);
    assert_eq!(d.status(), ACKNOWLEDGE);
}

#[test]
fn bar_moved_by_the_guest_still_reaches_the_device() {
    let m = machine();
    let d = Driver::probe(&m);
    let old = d.common;
    cfg_write(&m, d.slot, 4, 0, 2);
    cfg_write(&m, d.slot, 0x10, 0xd000_0000, 4);
    cfg_write(&m, d.slot, 4, 0x6, 2);
    let d = Driver::probe(&m);
    assert_eq!(d.common & !0xfff, 0xd000_0000);
    assert!(!m.mmio.write(old + common::DEVICE_STATUS, &[1]));
    d.set_status(ACKNOWLEDGE);
    assert_eq!(d.status(), ACKNOWLEDGE);
}

/// Each hostile ring puts the device in NEEDS_RESET with a config interrupt,
/// counts the error, completes nothing, and a reset brings it back.
#[test]
fn hostile_rings_need_reset_and_raise_a_config_interrupt() {
    type Setup = fn(&Driver);
    let cases: Vec<(&str, Setup)> = vec![
        ("loop", |d| {
            d.desc(DESC, 0, BUF, 8, 1 | 2, 1);
            d.desc(DESC, 1, BUF, 8, 1 | 2, 0);
            d.submit(0);
        }),
        ("outside memory", |d| {
            d.desc(DESC, 0, MEM_SIZE as u64 - 8, 64, 2, 0);
            d.submit(0);
        }),
        ("length overflow", |d| {
            d.desc(DESC, 0, BUF, 0xffff_fff0, 1 | 2, 1);
            d.desc(DESC, 1, BUF, 0x100, 2, 0);
            d.submit(0);
        }),
        ("next beyond queue size", |d| {
            d.desc(DESC, 0, BUF, 8, 1 | 2, QSIZE);
            d.submit(0);
        }),
        ("head beyond queue size", |d| d.submit(QSIZE + 3)),
        ("avail index beyond queue size", |d| {
            d.m.mem
                .write_obj(QSIZE + 1, GuestAddress(AVAIL + 2))
                .unwrap();
            d.kick();
        }),
        ("indirect not negotiated", |d| {
            d.desc(DESC, 0, INDIRECT, 32, 4, 0);
            d.submit(0);
        }),
    ];
    for (name, setup) in cases {
        let m = machine();
        let d = Driver::probe(&m);
        d.enable_msix();
        d.init(VIRTIO_F_VERSION_1);
        setup(&d);
        wait(|| d.status() & DEVICE_NEEDS_RESET != 0, name);
        wait(|| msis(&m) == vec![(MSI_ADDR, CONFIG_DATA)], name);
        assert_eq!(m.dev.lock().unwrap().queue_errors(), 1, "{name}");
        assert_eq!(d.used_idx(), 0, "{name}");
        // Further kicks are ignored while broken.
        d.kick();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(d.used_idx(), 0, "{name}");
        // Reset and a clean request works.
        d.init(VIRTIO_F_VERSION_1);
        assert_eq!(d.status() & DEVICE_NEEDS_RESET, 0, "{name}");
        d.desc(DESC, 0, BUF, 8, 2, 0);
        d.submit(0);
        d.wait_used(1);
    }
}

#[test]
fn bad_queue_setup_needs_reset_at_driver_ok() {
    let m = machine();
    let d = Driver::probe(&m);
    d.enable_msix();
    d.set_status(0);
    d.set_status(ACKNOWLEDGE | DRIVER);
    d.write_features(VIRTIO_F_VERSION_1);
    d.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
    d.w(d.common + common::CONFIG_MSIX_VECTOR, 0, 2);
    d.w(d.common + common::QUEUE_SIZE, 12, 2);
    d.w(d.common + common::QUEUE_DESC, DESC, 8);
    d.w(d.common + common::QUEUE_DRIVER, AVAIL, 8);
    d.w(d.common + common::QUEUE_DEVICE, MEM_SIZE as u64 - 4, 8);
    d.w(d.common + common::QUEUE_ENABLE, 1, 2);
    d.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_ne!(d.status() & DEVICE_NEEDS_RESET, 0);
    assert_eq!(msis(&m), vec![(MSI_ADDR, CONFIG_DATA)]);
    assert!(!m.dev.lock().unwrap().is_active());
}
