//! Ethernet MAC addresses.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A random, locally administered, unicast address (52:54:00 is QEMU's
    /// prefix; Vireo uses its own locally administered bit pattern).
    pub fn random() -> Self {
        let mut b = [0u8; 6];
        // SAFETY: getrandom fills the buffer it is given.
        let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
        if n != b.len() as isize {
            // Fall back to time and pid: unique enough for a host's taps.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
                ^ ((std::process::id() as u64) << 20);
            b.copy_from_slice(&t.to_le_bytes()[..6]);
        }
        b[0] = (b[0] & 0xfc) | 0x02; // unicast, locally administered
        MacAddr(b)
    }

    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }
}

impl FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            || format!("bad MAC address '{s}' (expected six hex bytes like 52:54:00:12:34:56)");
        let parts: Vec<&str> = s.split([':', '-']).collect();
        if parts.len() != 6 {
            return Err(bad());
        }
        let mut b = [0u8; 6];
        for (i, p) in parts.iter().enumerate() {
            if p.len() != 2 {
                return Err(bad());
            }
            b[i] = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        let mac = MacAddr(b);
        if mac.is_multicast() {
            return Err(format!(
                "MAC address {s} is a multicast address; a NIC needs a unicast one"
            ));
        }
        Ok(mac)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print_round_trip() {
        let m: MacAddr = "52:54:00:AB:cd:0f".parse().unwrap();
        assert_eq!(m.0, [0x52, 0x54, 0x00, 0xab, 0xcd, 0x0f]);
        assert_eq!(m.to_string(), "52:54:00:ab:cd:0f");
        assert_eq!("52-54-00-ab-cd-0f".parse::<MacAddr>().unwrap(), m);
    }

    #[test]
    fn bad_addresses_are_refused() {
        for s in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:0f:11",
            "zz:54:00:ab:cd:0f",
            "5:54:00:ab:cd:0f",
        ] {
            assert!(s.parse::<MacAddr>().is_err(), "{s}");
        }
        let e = "01:00:5e:00:00:01".parse::<MacAddr>().unwrap_err();
        assert!(e.contains("multicast"));
    }

    #[test]
    fn random_addresses_are_local_unicast_and_differ() {
        let a = MacAddr::random();
        let b = MacAddr::random();
        assert_eq!(a.0[0] & 0x03, 0x02);
        assert_ne!(a, b);
    }
}
