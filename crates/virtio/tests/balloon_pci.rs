//! virtio-balloon through the simulated driver: a new target raises a
//! configuration interrupt, inflated pages lose their contents (the host
//! memory is released), frame numbers outside guest RAM are refused and
//! counted, and the statistics buffer is held and given back on request.

mod harness;

use harness::*;
use virtio::balloon::*;
use virtio::features::VIRTIO_F_VERSION_1;
use virtio::transport::{common, DEVICE_CFG_OFFSET};
use vm_memory::{Bytes, GuestAddress};

const ALL: u64 = VIRTIO_F_VERSION_1 | VIRTIO_BALLOON_F_STATS_VQ | VIRTIO_BALLOON_F_DEFLATE_ON_OOM;

fn balloon(options: BalloonOptions) -> (Machine, BalloonHandle) {
    let b = Balloon::new(options).unwrap();
    let h = b.handle();
    (machine_with(Box::new(b)), h)
}

/// Post a one-descriptor chain of frame numbers on `q` and wait for it.
fn send_pfns(d: &Driver, q: u16, slot: u16, pfns: &[u32]) {
    let (desc, _, _) = ring(q);
    let addr = BUF + 0x1000 * slot as u64;
    let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
    d.m.mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
    d.desc(desc, slot, addr, bytes.len() as u32, 0, 0);
    let before = d.used_idx_q(q);
    d.submit_q(q, slot);
    d.wait_used_q(q, before.wrapping_add(1));
}

#[test]
fn target_change_interrupts_and_inflate_releases_pages() {
    let (m, h) = balloon(BalloonOptions::default());
    let d = Driver::probe(&m);
    assert_eq!(d.num_queues(), 3);
    assert_eq!(
        d.features() & ALL,
        ALL,
        "STATS_VQ and DEFLATE_ON_OOM offered"
    );
    d.enable_msix();
    d.init(ALL);
    let cfg = d.common - common::DEVICE_FEATURE_SELECT + DEVICE_CFG_OFFSET;
    assert_eq!(d.r(cfg, 4), 0, "no target yet");

    let gen0 = d.r(d.common + common::CONFIG_GENERATION, 1);
    h.set_target_pages(6);
    assert_eq!(d.r(cfg, 4), 6, "num_pages");
    assert_ne!(d.r(d.isr, 1) & 2, 0, "ISR bit 1: configuration change");
    assert_eq!(
        d.r(d.common + common::CONFIG_GENERATION, 1),
        (gen0 + 1) & 0xff
    );
    wait(
        || msis(&m).contains(&(MSI_ADDR, CONFIG_DATA)),
        "configuration MSI",
    );

    // Pages 0x800..0x806 hold data; the guest balloons 0x800..=0x803 (out
    // of order, so in two runs) and sends two frame numbers outside RAM.
    let base = 0x800u32;
    for p in 0..6u64 {
        let a = GuestAddress(((base as u64) << 12) + 0x1000 * p);
        m.mem.write_slice(&[0xaa; 4096], a).unwrap();
    }
    let outside = (MEM_SIZE >> 12) as u32;
    send_pfns(
        &d,
        INFLATEQ as u16,
        0,
        &[base, base + 1, base + 3, u32::MAX, outside, base + 2],
    );
    let page = |p: u32| {
        let mut b = vec![0u8; 4096];
        m.mem
            .read_slice(&mut b, GuestAddress((p as u64) << 12))
            .unwrap();
        b
    };
    for p in base..base + 4 {
        assert!(page(p).iter().all(|&b| b == 0), "page {p:#x} released");
    }
    assert!(page(base + 4).iter().all(|&b| b == 0xaa), "neighbour kept");
    let s = h.state();
    assert_eq!(
        (s.inflated_pages, s.refused_pfns, s.release_errors),
        (4, 2, 0)
    );
    assert_eq!(d.used_elem_q(INFLATEQ as u16, 0), (0, 0));
    wait(
        || msis(&m).contains(&(MSI_ADDR, QUEUE_DATA + INFLATEQ as u32)),
        "inflateq MSI",
    );

    // The driver reports the balloon's size.
    d.w(cfg + 4, 4, 4);
    assert_eq!(h.state().actual, 4);
    assert_eq!(d.r(cfg + 4, 4), 4);

    // Deflate two pages, plus one bogus frame number: refused, no harm.
    send_pfns(&d, DEFLATEQ as u16, 0, &[base, base + 1, 0x0fff_ffff]);
    let s = h.state();
    assert_eq!((s.deflated_pages, s.refused_pfns), (2, 3));
    // Deflated pages are usable again.
    m.mem
        .write_slice(&[1, 2, 3], GuestAddress((base as u64) << 12))
        .unwrap();
    assert_eq!(page(base)[..3], [1, 2, 3]);
    assert_eq!(
        d.status() & virtio::status::DEVICE_NEEDS_RESET,
        0,
        "bad frame numbers are not a device error"
    );
}

#[test]
fn statistics_are_kept_and_refreshed_on_request() {
    let (m, h) = balloon(BalloonOptions::default());
    let d = Driver::probe(&m);
    d.enable_msix();
    d.init(ALL);
    let q = STATSQ as u16;
    let (desc, _, _) = ring(q);
    let write_stats = |free: u64| {
        let mut b = Vec::new();
        for (t, v) in [(tag::FREE_MEMORY, free), (tag::TOTAL_MEMORY, 256 << 20)] {
            b.extend_from_slice(&t.to_le_bytes());
            b.extend_from_slice(&v.to_le_bytes());
        }
        m.mem.write_slice(&b, GuestAddress(BUF)).unwrap();
        d.desc(desc, 0, BUF, b.len() as u32, 0, 0);
    };
    write_stats(100 << 20);
    d.submit_q(q, 0);
    wait(|| h.state().stats_updates == 1, "first statistics");
    let s = h.state().stats.unwrap();
    assert_eq!(s.free_memory, Some(100 << 20));
    assert_eq!(s.total_memory, Some(256 << 20));
    assert!(h.stats_age().is_some());
    // The device holds the buffer until it wants new numbers.
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(d.used_idx_q(q), 0);

    h.request_stats();
    d.wait_used_q(q, 1);
    assert_eq!(d.used_elem_q(q, 0), (0, 0));
    wait(
        || msis(&m).contains(&(MSI_ADDR, QUEUE_DATA + q as u32)),
        "statsq MSI",
    );
    write_stats(90 << 20);
    d.submit_q(q, 0);
    wait(|| h.state().stats_updates == 2, "refreshed statistics");
    assert_eq!(h.state().stats.unwrap().free_memory, Some(90 << 20));
}

#[test]
fn without_the_stats_feature_requests_are_ignored() {
    let (m, h) = balloon(BalloonOptions {
        deflate_on_oom: false,
        stats: false,
    });
    let d = Driver::probe(&m);
    assert_eq!(d.num_queues(), 2);
    assert_eq!(
        d.features() & (VIRTIO_BALLOON_F_STATS_VQ | VIRTIO_BALLOON_F_DEFLATE_ON_OOM),
        0
    );
    d.enable_msix();
    d.init(VIRTIO_F_VERSION_1);
    h.request_stats();
    h.set_target_pages(1);
    send_pfns(&d, INFLATEQ as u16, 0, &[0x900]);
    assert_eq!(h.state().inflated_pages, 1);
    assert!(h.state().stats.is_none());
}
