//! Checksum offload done by the device itself, for a backend that carries
//! no virtio-net header (passt): the guest is offered VIRTIO_NET_F_CSUM
//! and VIRTIO_NET_F_GUEST_CSUM, and the device
//!
//! - completes a transmitted frame's partial checksum (`NEEDS_CSUM`: the
//!   guest summed the pseudo-header into the field and asks for the sum
//!   from `csum_start` to the end) before the frame leaves, and
//! - verifies each received TCP or UDP checksum over IPv4 or IPv6 and, when
//!   it is right, sets `DATA_VALID` so the guest does not sum the frame
//!   again; a frame it cannot parse or whose sum is wrong goes to the guest
//!   unflagged, and the guest's own check decides.
//!
//! Either way the per-byte summing moves from guest code (which the engine
//! runs translated) to native host code. Every offset comes from the guest
//! or the network: each is checked against the frame's length, and a
//! transmit request that does not fit is refused, never a panic.

/// `virtio_net_hdr.flags`: the device must complete the checksum.
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
/// `virtio_net_hdr.flags`: the device checked the checksum.
pub const VIRTIO_NET_HDR_F_DATA_VALID: u8 = 2;

const ETH_HLEN: usize = 14;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// The one's-complement sum of `data` as big-endian 16-bit words (an odd
/// last byte padded with zero), added to `acc`, not folded.
fn sum(data: &[u8], mut acc: u64) -> u64 {
    let mut words = data.chunks_exact(8);
    for w in &mut words {
        let v = u64::from_be_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        // Four 16-bit words at once: add the two 32-bit halves.
        acc += (v >> 32) + (v & 0xffff_ffff);
    }
    let rest = words.remainder();
    let mut pairs = rest.chunks_exact(2);
    for p in &mut pairs {
        acc += u16::from_be_bytes([p[0], p[1]]) as u64;
    }
    if let [b] = pairs.remainder() {
        acc += (*b as u64) << 8;
    }
    acc
}

/// `acc` folded to 16 bits.
fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// Why a transmit request for a checksum was refused (the guest's doing).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("checksum request at start {start} offset {offset} does not fit a {len}-byte frame")]
pub struct CsumRequestError {
    pub start: usize,
    pub offset: usize,
    pub len: usize,
}

/// Complete the checksum `NEEDS_CSUM` asks for in `eth` (an Ethernet frame
/// without the virtio-net header): the sum from `start` to the end, stored
/// complemented at `start + offset` (a zero result is sent as 0xffff, as
/// Linux does when it completes one in software).
pub fn complete(eth: &mut [u8], start: usize, offset: usize) -> Result<(), CsumRequestError> {
    let len = eth.len();
    let at = start.checked_add(offset);
    let Some(at) = at.filter(|&at| start <= len && at.checked_add(2).is_some_and(|e| e <= len))
    else {
        return Err(CsumRequestError { start, offset, len });
    };
    let c = !fold(sum(&eth[start..], 0));
    let c = if c == 0 { 0xffff } else { c };
    eth[at..at + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

/// Whether `eth` is a TCP or UDP over IPv4 or IPv6 frame (not a fragment,
/// no IPv6 extension headers) whose transport checksum is right. UDP
/// without a checksum (zero, IPv4 only) is not flagged: there is nothing
/// to check.
pub fn valid(eth: &[u8]) -> bool {
    let Some(ethertype) = eth.get(12..ETH_HLEN) else {
        return false;
    };
    let ip = &eth[ETH_HLEN..];
    let (proto, l4, pseudo) = match u16::from_be_bytes([ethertype[0], ethertype[1]]) {
        ETH_P_IPV4 => {
            if ip.len() < 20 || ip[0] >> 4 != 4 {
                return false;
            }
            let ihl = (ip[0] & 0xf) as usize * 4;
            let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
            // More fragments, or a fragment offset: not a whole datagram.
            let frag = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff;
            if ihl < 20 || total < ihl || total > ip.len() || frag != 0 {
                return false;
            }
            let l4 = &ip[ihl..total];
            let mut p = sum(&ip[12..20], 0);
            p += ip[9] as u64 + l4.len() as u64;
            (ip[9], l4, p)
        }
        ETH_P_IPV6 => {
            if ip.len() < 40 || ip[0] >> 4 != 6 {
                return false;
            }
            let payload = u16::from_be_bytes([ip[4], ip[5]]) as usize;
            if 40 + payload > ip.len() {
                return false;
            }
            let l4 = &ip[40..40 + payload];
            let mut p = sum(&ip[8..40], 0);
            p += ip[6] as u64 + l4.len() as u64;
            (ip[6], l4, p)
        }
        _ => return false,
    };
    match proto {
        IPPROTO_TCP if l4.len() >= 20 => {}
        IPPROTO_UDP if l4.len() >= 8 => {
            if l4[6] == 0 && l4[7] == 0 {
                return false;
            }
        }
        _ => return false,
    }
    fold(sum(l4, pseudo)) == 0xffff
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An Ethernet + IPv4 + TCP frame with `payload`, its TCP checksum
    /// left as the pseudo-header partial sum (what a guest asking for
    /// NEEDS_CSUM writes) and the offsets of the request.
    fn tcp4(payload: &[u8]) -> (Vec<u8>, usize, usize) {
        let mut f = vec![0u8; 14];
        f[12..14].copy_from_slice(&ETH_P_IPV4.to_be_bytes());
        let total = 20 + 20 + payload.len();
        let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, IPPROTO_TCP, 0, 0];
        ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        ip.extend([10, 0, 2, 15, 10, 0, 2, 2]);
        f.extend(&ip);
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
        tcp[12] = 5 << 4;
        let partial = fold(sum(&ip[12..20], 0) + IPPROTO_TCP as u64 + (20 + payload.len()) as u64);
        tcp[16..18].copy_from_slice(&partial.to_be_bytes());
        f.extend(&tcp);
        f.extend(payload);
        (f, 34, 16)
    }

    /// The reference: RFC 1071 over 16-bit words, one at a time.
    fn slow_sum(data: &[u8]) -> u32 {
        let mut s = 0u32;
        for c in data.chunks(2) {
            s += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
        }
        s
    }

    #[test]
    fn the_sum_matches_the_word_by_word_reference() {
        let data: Vec<u8> = (0..1501u32).map(|i| (i * 7 + 3) as u8).collect();
        for n in [0, 1, 2, 7, 8, 9, 15, 16, 17, 1500, 1501] {
            let d = &data[..n];
            assert_eq!(fold(sum(d, 0)), fold(slow_sum(d) as u64), "length {n}");
        }
    }

    #[test]
    fn a_completed_checksum_verifies_and_a_flipped_byte_does_not() {
        for len in [0, 1, 11, 1460] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 13) as u8).collect();
            let (mut f, start, off) = tcp4(&payload);
            assert!(!valid(&f), "a partial sum is not a checksum");
            complete(&mut f, start, off).unwrap();
            assert!(valid(&f), "{len}-byte payload");
            let last = f.len() - 1;
            f[last] ^= 0x40;
            assert!(!valid(&f), "a corrupt frame is not flagged");
        }
    }

    #[test]
    fn requests_outside_the_frame_are_refused() {
        let (mut f, _, _) = tcp4(b"abc");
        let len = f.len();
        for (start, off) in [
            (len + 1, 0),
            (len - 1, 0),
            (34, len),
            (usize::MAX, 2),
            (2, usize::MAX),
        ] {
            assert_eq!(
                complete(&mut f, start, off),
                Err(CsumRequestError {
                    start,
                    offset: off,
                    len
                })
            );
        }
        assert!(complete(&mut f, len - 2, 0).is_ok());
    }

    #[test]
    fn frames_that_cannot_be_checked_are_not_flagged() {
        let (mut f, start, off) = tcp4(b"hello");
        complete(&mut f, start, off).unwrap();
        // A fragment.
        let mut g = f.clone();
        g[14 + 6] = 0x20;
        assert!(!valid(&g));
        // A length beyond the frame.
        let mut g = f.clone();
        g[14 + 2] = 0x7f;
        assert!(!valid(&g));
        // Truncated, ARP, too short to hold a header.
        assert!(!valid(&f[..30]));
        let mut g = f.clone();
        g[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert!(!valid(&g));
        assert!(!valid(&f[..13]));
        assert!(!valid(&[]));
    }

    #[test]
    fn udp_over_ipv6_verifies_and_udp_without_a_checksum_is_left_alone() {
        let payload = b"dns-ish payload";
        let mut f = vec![0u8; 14];
        f[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
        let l4len = 8 + payload.len();
        let mut ip = vec![0x60, 0, 0, 0];
        ip.extend((l4len as u16).to_be_bytes());
        ip.extend([IPPROTO_UDP, 64]);
        ip.extend((0..32).map(|i| i as u8));
        f.extend(&ip);
        let mut udp = vec![0u8; 8];
        udp[0..2].copy_from_slice(&53u16.to_be_bytes());
        udp[2..4].copy_from_slice(&5353u16.to_be_bytes());
        udp[4..6].copy_from_slice(&(l4len as u16).to_be_bytes());
        let partial = fold(sum(&ip[8..40], 0) + IPPROTO_UDP as u64 + l4len as u64);
        udp[6..8].copy_from_slice(&partial.to_be_bytes());
        f.extend(&udp);
        f.extend(payload);
        complete(&mut f, 54, 6).unwrap();
        assert!(valid(&f));
        f[54 + 6] = 0;
        f[54 + 7] = 0;
        assert!(!valid(&f), "no checksum: nothing to vouch for");
    }
}
