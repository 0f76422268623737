//! Linux tap interfaces in virtio-net mode.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

use crate::MacAddr;

// From <linux/if_tun.h>: _IOW('T', n, int/unsigned int).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;
const TUN_F_TSO_ECN: libc::c_uint = 0x08;
const TUN_F_UFO: libc::c_uint = 0x10;

/// The virtio-net header in front of every frame: `struct virtio_net_hdr_v1`
/// (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers).
pub const VNET_HDR_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("cannot open /dev/net/tun: {0} (is the tun module loaded, and are you root or CAP_NET_ADMIN?)")]
    OpenTun(io::Error),
    #[error("tap name '{0}' is too long (at most 15 bytes)")]
    NameTooLong(String),
    #[error("cannot create or attach tap '{name}': {source}")]
    SetIff { name: String, source: io::Error },
    #[error("tap '{name}': {op} failed: {source}")]
    Ioctl {
        name: String,
        op: &'static str,
        source: io::Error,
    },
}

/// Offloads the guest negotiated, to be mirrored on the tap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offloads {
    pub csum: bool,
    pub tso4: bool,
    pub tso6: bool,
    pub tso_ecn: bool,
    pub ufo: bool,
}

/// `struct ifreq` with the union as raw bytes (we use the short flags only).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    union: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> Result<Self, TapError> {
        let bytes = name.as_bytes();
        if bytes.len() >= libc::IFNAMSIZ {
            return Err(TapError::NameTooLong(name.into()));
        }
        let mut r = IfReq {
            name: [0; libc::IFNAMSIZ],
            union: [0; 24],
        };
        r.name[..bytes.len()].copy_from_slice(bytes);
        Ok(r)
    }

    fn flags(&self) -> libc::c_short {
        libc::c_short::from_ne_bytes([self.union[0], self.union[1]])
    }

    fn set_flags(&mut self, f: libc::c_short) {
        self.union[..2].copy_from_slice(&f.to_ne_bytes());
    }

    fn name(&self) -> String {
        let end = self
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

/// An open tap interface (the interface lives as long as the fd, unless it
/// was made persistent by someone else).
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Create a tap (a name with `%d`, e.g. "vireo%d", lets the kernel pick
    /// the number) or attach to an existing one by name.
    pub fn open(name: &str) -> Result<Self, TapError> {
        // SAFETY: open(2) on a constant, NUL-terminated path.
        let fd = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(TapError::OpenTun(io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor we own.
        let file = unsafe { File::from_raw_fd(fd) };
        let mut req = IfReq::new(name)?;
        req.set_flags(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR);
        // SAFETY: TUNSETIFF reads and writes a struct ifreq.
        if unsafe { libc::ioctl(fd, TUNSETIFF, &mut req) } < 0 {
            return Err(TapError::SetIff {
                name: name.into(),
                source: io::Error::last_os_error(),
            });
        }
        let tap = Tap {
            file,
            name: req.name(),
        };
        // Reads must never block the device thread: set O_NONBLOCK on the
        // open file explicitly (seen: the flag given to open(2) did not hold
        // for the attached tap).
        // SAFETY: fcntl on our own descriptor.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        tap.check(flags, "F_GETFL")?;
        tap.check(
            // SAFETY: fcntl on our own descriptor, as above.
            unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) },
            "F_SETFL O_NONBLOCK",
        )?;
        let hdr = VNET_HDR_LEN as libc::c_int;
        tap.check(
            // SAFETY: TUNSETVNETHDRSZ reads an int, and `hdr` is one.
            unsafe { libc::ioctl(fd, TUNSETVNETHDRSZ, &hdr) },
            "TUNSETVNETHDRSZ",
        )?;
        tap.set_offloads(Offloads::default())?;
        Ok(tap)
    }

    /// The interface name the kernel gave (e.g. "vireo0").
    pub fn name(&self) -> &str {
        &self.name
    }

    fn check(&self, rc: libc::c_int, op: &'static str) -> Result<(), TapError> {
        if rc < 0 {
            return Err(TapError::Ioctl {
                name: self.name.clone(),
                op,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Tell the kernel which offloads the guest can take in received frames.
    pub fn set_offloads(&self, o: Offloads) -> Result<(), TapError> {
        let mut f: libc::c_uint = 0;
        for (on, bit) in [
            (o.csum, TUN_F_CSUM),
            (o.tso4, TUN_F_TSO4),
            (o.tso6, TUN_F_TSO6),
            (o.tso_ecn, TUN_F_TSO_ECN),
            (o.ufo, TUN_F_UFO),
        ] {
            if on {
                f |= bit;
            }
        }
        // SAFETY: TUNSETOFFLOAD takes the flags by value.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETOFFLOAD, f as libc::c_ulong) };
        self.check(rc, "TUNSETOFFLOAD")
    }

    /// Bring the interface up (IFF_UP), as `ip link set NAME up` does.
    pub fn set_up(&self) -> Result<(), TapError> {
        // SAFETY: a datagram socket just to carry interface ioctls.
        let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        self.check(s, "socket")?;
        // SAFETY: s is ours; closed when this guard drops.
        let sock = unsafe { File::from_raw_fd(s) };
        let mut req = IfReq::new(&self.name)?;
        self.check(
            // SAFETY: SIOCGIFFLAGS writes a struct ifreq, which `req` is.
            unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) },
            "SIOCGIFFLAGS",
        )?;
        req.set_flags(req.flags() | libc::IFF_UP as libc::c_short);
        self.check(
            // SAFETY: SIOCSIFFLAGS reads a struct ifreq, which `req` is.
            unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req) },
            "SIOCSIFFLAGS",
        )
    }

    /// Read one frame (virtio-net header first); `WouldBlock` when none waits.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: reading into a valid buffer.
        let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Send one frame given as pieces (virtio-net header first), in one writev.
    pub fn write_frame(&self, parts: &[&[u8]]) -> io::Result<usize> {
        let iov: Vec<libc::iovec> = parts
            .iter()
            .map(|p| libc::iovec {
                iov_base: p.as_ptr() as *mut libc::c_void,
                iov_len: p.len(),
            })
            .collect();
        // SAFETY: iov describes live buffers for the duration of the call.
        let n = unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// A MAC for the guest's NIC when the user gave none.
    pub fn default_guest_mac() -> MacAddr {
        MacAddr::random()
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_longer_than_ifnamsiz_are_refused() {
        assert!(matches!(
            IfReq::new("a-very-long-interface-name"),
            Err(TapError::NameTooLong(_))
        ));
        let r = IfReq::new("vireo%d").unwrap();
        assert_eq!(r.name(), "vireo%d");
    }
}
