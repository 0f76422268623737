//! A simulated guest driver doing what Linux's virtio_pci_modern and
//! virtio_rng do, through the PCI configuration ports and BAR 0 only:
//! find the device, walk its capabilities, enable MSI-X, negotiate
//! features, set up the request queue, DRIVER_OK, and fetch entropy. Then
//! reset, masking, and hostile rings.

mod harness;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use harness::*;
use virtio::features::*;
use virtio::status::*;
use virtio::transport::common;
use virtio::{Persist, PersistError};
use vm_memory::{Bytes, GuestAddress};

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

/// Stop `m`'s device, save it (through JSON, as a snapshot file holds it),
/// and bring it up in a new machine with a copy of `m`'s memory.
fn snapshot_into_new_machine(m: &Machine) -> Machine {
    let state = {
        let mut dev = m.dev.lock().unwrap();
        dev.quiesce();
        dev.save().unwrap()
    };
    let state: virtio::VirtioPciState =
        serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
    let n = machine();
    let mut ram = vec![0u8; MEM_SIZE];
    m.mem.read_slice(&mut ram, GuestAddress(0)).unwrap();
    n.mem.write_slice(&ram, GuestAddress(0)).unwrap();
    n.dev.lock().unwrap().restore(&state).unwrap();
    n.pci.refresh_routing();
    n.dev.lock().unwrap().resume();
    n
}

#[test]
fn snapshot_restores_into_a_new_machine_and_the_driver_carries_on() {
    let m = machine();
    let d = Driver::probe(&m);
    d.enable_msix();
    d.init(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
    d.desc(DESC, 0, BUF, 64, 2, 0);
    d.submit(0);
    d.wait_used(1);
    wait(|| msis(&m).len() == 1, "first MSI");
    {
        let mut dev = m.dev.lock().unwrap();
        dev.quiesce();
        assert!(!dev.is_active());
    }
    // Made available while the device is stopped for the snapshot: the
    // old device does not take it, the restored one does (and interrupts:
    // used_event says "after used entry 1", as the driver consumed entry 0).
    let used_event = GuestAddress(AVAIL + 4 + 2 * QSIZE as u64);
    m.mem.write_obj(1u16, used_event).unwrap();
    d.desc(DESC, 1, BUF + 0x1000, 32, 2, 0);
    d.submit(1);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(d.used_idx(), 1, "a quiesced device processed a request");

    let n = snapshot_into_new_machine(&m);
    // The driver finds the device as it left it: same BAR, status, MSI-X.
    let d2 = Driver::probe(&n);
    assert_eq!(d2.common, d.common);
    assert_eq!(d2.status(), ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    d2.wait_used(2);
    assert_eq!(d2.used_elem(1), (1, 32));
    wait(
        || msis(&n) == vec![(MSI_ADDR, QUEUE_DATA)],
        "queue MSI from the restored device",
    );
    n.mem.write_obj(2u16, used_event).unwrap();
    d2.desc(DESC, 2, BUF + 0x2000, 16, 2, 0);
    d2.submit(2);
    d2.wait_used(3);
    assert_eq!(d2.used_elem(2), (2, 16));
    wait(
        || msis(&n).len() == 2,
        "second MSI from the restored device",
    );
    assert_eq!(n.dev.lock().unwrap().queue_errors(), 0);
    // The original can go on too after a snapshot (vireo snapshot resumes).
    m.dev.lock().unwrap().resume();
    assert!(m.dev.lock().unwrap().is_active());
}

#[test]
fn a_saved_state_only_fits_the_same_kind_of_device() {
    let m = machine();
    let d = Driver::probe(&m);
    d.init(VIRTIO_F_VERSION_1);
    let state = {
        let mut dev = m.dev.lock().unwrap();
        dev.quiesce();
        dev.save().unwrap()
    };
    let n = machine();
    let mut other = state.clone();
    other.device_type = 2;
    let e = n.dev.lock().unwrap().restore(&other).unwrap_err();
    assert!(matches!(e, PersistError::Mismatch { .. }), "{e:?}");
    let e = e.to_string();
    assert!(e.contains("type 2"), "{e}");
    let mut other = state.clone();
    other.pci_config.bytes[2] ^= 1; // device ID
    let e = n.dev.lock().unwrap().restore(&other).unwrap_err();
    assert!(matches!(e, PersistError::Mismatch { .. }), "{e:?}");
    let e = e.to_string();
    assert!(e.contains("not the same kind of device"), "{e}");
    let mut other = state.clone();
    other.queues[0].desc_table = 0xffff_ffff_0000;
    let e = n.dev.lock().unwrap().restore(&other).unwrap_err();
    assert!(matches!(e, PersistError::Invalid { .. }), "{e:?}");
    let e = e.to_string();
    assert!(e.contains("queue 0"), "{e}");
    let mut other = state.clone();
    other.queues[0].msix_vector = 7;
    let e = n.dev.lock().unwrap().restore(&other).unwrap_err();
    assert!(matches!(e, PersistError::Invalid { .. }), "{e:?}");
    let e = e.to_string();
    assert!(e.contains("MSI-X vector"), "{e}");
    // A refused state changed nothing: the good one still restores.
    n.dev.lock().unwrap().restore(&state).unwrap();
    assert_eq!(n.dev.lock().unwrap().save().unwrap(), state);
}
