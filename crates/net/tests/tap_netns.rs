//! A tap in a network namespace made by the test: the test plays the guest
//! behind the tap (answers ARP and ICMP echo with virtio-net headers on
//! every frame) and `ping` inside the namespace must get its reply. Needs
//! root and /dev/net/tun; says so and skips otherwise.

use std::process::Command;
use std::time::{Duration, Instant};

use net::{MacAddr, Tap, VNET_HDR_LEN};

const HOST_IP: [u8; 4] = [10, 213, 0, 1];
const GUEST_IP: [u8; 4] = [10, 213, 0, 2];

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        ip(&["netns", "del", &self.0]);
    }
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += w as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The guest's answer to one frame from the host, if it deserves one.
fn answer(frame: &[u8], mac: MacAddr) -> Option<Vec<u8>> {
    if frame.len() < 14 {
        return None;
    }
    let (dst_src, ethertype, payload) = (&frame[..12], &frame[12..14], &frame[14..]);
    let host_mac = &dst_src[6..12];
    let mut out = Vec::new();
    out.extend_from_slice(host_mac);
    out.extend_from_slice(&mac.0);
    match ethertype {
        // ARP request for the guest's address -> ARP reply.
        [0x08, 0x06] if payload.len() >= 28 && payload[7] == 1 && payload[24..28] == GUEST_IP => {
            out.extend_from_slice(&[0x08, 0x06]);
            out.extend_from_slice(&payload[..6]); // htype, ptype, hlen, plen
            out.extend_from_slice(&[0, 2]); // reply
            out.extend_from_slice(&mac.0);
            out.extend_from_slice(&GUEST_IP);
            out.extend_from_slice(&payload[8..18]); // sender MAC + IP
            Some(out)
        }
        // ICMP echo request to the guest -> echo reply.
        [0x08, 0x00] if payload.len() >= 28 && payload[9] == 1 && payload[16..20] == GUEST_IP => {
            let ihl = ((payload[0] & 0xf) as usize) * 4;
            let total = u16::from_be_bytes([payload[2], payload[3]]) as usize;
            if payload.get(ihl) != Some(&8) || total > payload.len() {
                return None;
            }
            let mut ipv4 = payload[..total].to_vec();
            ipv4[12..16].copy_from_slice(&GUEST_IP);
            ipv4[16..20].copy_from_slice(&payload[12..16]);
            ipv4[10..12].copy_from_slice(&[0, 0]);
            let c = checksum(&ipv4[..ihl]);
            ipv4[10..12].copy_from_slice(&c.to_be_bytes());
            ipv4[ihl] = 0; // echo reply
            ipv4[ihl + 2..ihl + 4].copy_from_slice(&[0, 0]);
            let c = checksum(&ipv4[ihl..]);
            ipv4[ihl + 2..ihl + 4].copy_from_slice(&c.to_be_bytes());
            out.extend_from_slice(&[0x08, 0x00]);
            out.extend_from_slice(&ipv4);
            Some(out)
        }
        _ => None,
    }
}

#[test]
fn ping_through_a_tap_in_a_test_namespace() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("note: needs root and /dev/net/tun; tap test skipped");
        return;
    }
    let ns = Netns(format!("vireo-net-{}", std::process::id()));
    assert!(ip(&["netns", "add", &ns.0]), "ip netns add");
    let tap = Tap::open("vtest%d").expect("tap opens");
    let name = tap.name().to_string();
    assert!(name.starts_with("vtest"), "{name}");
    assert!(ip(&["link", "set", &name, "netns", &ns.0]));
    let host = format!(
        "{}.{}.{}.{}/24",
        HOST_IP[0], HOST_IP[1], HOST_IP[2], HOST_IP[3]
    );
    assert!(ip(&["-n", &ns.0, "addr", "add", &host, "dev", &name]));
    assert!(ip(&["-n", &ns.0, "link", "set", &name, "up"]));

    let guest = format!(
        "{}.{}.{}.{}",
        GUEST_IP[0], GUEST_IP[1], GUEST_IP[2], GUEST_IP[3]
    );
    let mut ping = Command::new("ip")
        .args([
            "netns", "exec", &ns.0, "ping", "-c", "1", "-W", "10", &guest,
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("ping starts");
    let mac: MacAddr = "02:56:49:52:45:4f".parse().unwrap();
    let mut buf = vec![0u8; 65536];
    let (mut arp, mut icmp) = (false, false);
    let start = Instant::now();
    let status = loop {
        if let Some(st) = ping.try_wait().unwrap() {
            break st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "ping never finished"
        );
        match tap.read_frame(&mut buf) {
            Ok(n) => {
                assert!(n >= VNET_HDR_LEN, "frame without its virtio-net header");
                let frame = &buf[VNET_HDR_LEN..n];
                if let Some(reply) = answer(frame, mac) {
                    arp |= reply[12..14] == [0x08, 0x06];
                    icmp |= reply[12..14] == [0x08, 0x00];
                    let hdr = [0u8; VNET_HDR_LEN];
                    let sent = tap.write_frame(&[&hdr, &reply]).expect("write to tap");
                    assert_eq!(sent, VNET_HDR_LEN + reply.len());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("tap read: {e}"),
        }
    };
    assert!(arp, "no ARP request reached the tap");
    assert!(icmp, "no ICMP echo request reached the tap");
    assert!(status.success(), "ping got no reply through the tap");
}

/// An idle tap must answer "nothing yet", never block its reader.
#[test]
fn reading_an_idle_tap_does_not_block() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("note: needs root and /dev/net/tun; tap test skipped");
        return;
    }
    let tap = Tap::open("vidle%d").expect("tap opens");
    tap.set_up().unwrap();
    let mut buf = [0u8; 2048];
    // Drain whatever the kernel sent when the link came up, then expect WouldBlock.
    let start = Instant::now();
    loop {
        match tap.read_frame(&mut buf) {
            Ok(_) => assert!(start.elapsed() < Duration::from_secs(5)),
            Err(e) => {
                assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
                break;
            }
        }
    }
}

#[test]
fn checksum_matches_a_known_ipv4_header() {
    // A textbook header whose checksum is 0xb861.
    let mut h = [
        0x45u8, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00,
        0x01, 0xc0, 0xa8, 0x00, 0xc7,
    ];
    assert_eq!(checksum(&h), 0xb861);
    h[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
    assert_eq!(checksum(&h), 0);
}
