//! virtio-console through the simulated driver: guest output reaches the
//! host callback, host input fills the guest's receive buffers, early
//! input waits for buffers.

mod harness;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use harness::*;
use virtio::console::{Console, RECEIVEQ, TRANSMITQ};
use virtio::features::VIRTIO_F_VERSION_1;
use vm_memory::{Bytes, GuestAddress};

#[test]
fn console_output_and_input() {
    let out = Arc::new(Mutex::new(Vec::<u8>::new()));
    let o = out.clone();
    let console = Console::new(Arc::new(move |b: &[u8]| {
        o.lock().unwrap().extend_from_slice(b)
    }))
    .unwrap();
    let input = console.input();
    let m = machine_with(Box::new(console));
    let d = Driver::probe(&m);
    assert_eq!(d.num_queues(), 2);
    d.enable_msix();
    d.init(VIRTIO_F_VERSION_1);
    let (rx, tx) = (RECEIVEQ as u16, TRANSMITQ as u16);
    let (rx_desc, _, _) = ring(rx);
    let (tx_desc, _, _) = ring(tx);

    // Output: "hello, " + "hvc0\n" in a two-descriptor chain.
    m.mem
        .write_slice(b"hello, hvc0\n", GuestAddress(BUF))
        .unwrap();
    d.desc(tx_desc, 0, BUF, 7, 1, 1);
    d.desc(tx_desc, 1, BUF + 7, 5, 0, 0);
    d.submit_q(tx, 0);
    d.wait_used_q(tx, 1);
    assert_eq!(out.lock().unwrap().as_slice(), b"hello, hvc0\n");
    assert_eq!(d.used_elem_q(tx, 0), (0, 0));
    wait(
        || msis(&m).contains(&(MSI_ADDR, QUEUE_DATA + 1)),
        "transmitq MSI",
    );

    // Input before any receive buffer waits for one.
    input.push(b"ls -l\n");
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(input.pending(), 6);
    d.desc(rx_desc, 0, BUF + 0x1000, 4, 2, 0);
    d.desc(rx_desc, 1, BUF + 0x2000, 64, 2, 0);
    d.submit_q(rx, 0);
    d.wait_used_q(rx, 1);
    assert_eq!(d.used_elem_q(rx, 0), (0, 4));
    let mut got = [0u8; 4];
    m.mem
        .read_slice(&mut got, GuestAddress(BUF + 0x1000))
        .unwrap();
    assert_eq!(&got, b"ls -");
    d.submit_q(rx, 1);
    d.wait_used_q(rx, 2);
    assert_eq!(d.used_elem_q(rx, 1), (1, 2));
    let mut got = [0u8; 2];
    m.mem
        .read_slice(&mut got, GuestAddress(BUF + 0x2000))
        .unwrap();
    assert_eq!(&got, b"l\n");
    assert_eq!(input.pending(), 0);

    // A posted buffer is filled as soon as input arrives (no kick needed).
    d.desc(rx_desc, 2, BUF + 0x3000, 64, 2, 0);
    d.submit_q(rx, 2);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(d.used_idx_q(rx), 2, "nothing to receive yet");
    input.push(b"q");
    d.wait_used_q(rx, 3);
    assert_eq!(d.used_elem_q(rx, 2), (2, 1));
    wait(
        || {
            msis(&m)
                .iter()
                .filter(|&&x| x == (MSI_ADDR, QUEUE_DATA))
                .count()
                == 3
        },
        "receiveq MSIs",
    );
    assert_eq!(m.dev.lock().unwrap().queue_errors(), 0);
}
