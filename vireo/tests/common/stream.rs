//! A checked byte stream through a guest and back: the host sends a
//! xorshift stream on one connection, the guest sums what arrived (busybox
//! `crc32`) while relaying it all back on another, and the host checks the
//! sum and every byte it gets back, without holding the stream in memory.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The test stream: byte `i` of a xorshift sequence the host makes twice
/// (to send and to check what comes back).
pub struct Stream(pub u64);

impl Stream {
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            chunk.copy_from_slice(&self.0.to_le_bytes()[..chunk.len()]);
        }
    }
}

/// CRC-32 as zlib and busybox `crc32` make it (polynomial 0xEDB88320,
/// reflected, starting from and ending with all ones).
pub struct Crc32 {
    table: [u32; 256],
    crc: u32,
}

impl Crc32 {
    pub fn new() -> Self {
        let mut table = [0u32; 256];
        for (i, t) in table.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0xEDB8_8320
                } else {
                    c >> 1
                };
            }
            *t = c;
        }
        Crc32 { table, crc: !0 }
    }
    pub fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.crc = (self.crc >> 8) ^ self.table[((self.crc as u8) ^ b) as usize];
        }
    }
    pub fn finish(self) -> u32 {
        !self.crc
    }
}

/// The first connection to `l` within `limit` (the guest boots first).
pub fn accept_within(l: &TcpListener, limit: Duration) -> Result<TcpStream, String> {
    l.set_nonblocking(true).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + limit;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).map_err(|e| e.to_string())?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err("the guest never connected".into());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// The guest's side of [`relay`], a shell command: connect to `host` on
/// port `down`, relay what arrives back to `host` on port `up` through tee,
/// which also feeds crc32; then print `sum=<crc32 in hex>`.
pub fn relay_command(host: &str, down: u16, up: u16) -> String {
    format!(
        "mkfifo /tmp/f && (crc32 < /tmp/f > /tmp/sum &) && \
         nc {host} {down} | tee /tmp/f | nc {host} {up}; \
         sleep 1; echo sum=$(cat /tmp/sum)"
    )
}

/// The guest's side of [`relay`] one direction at a time, a shell command:
/// take the whole stream from `host` port `down` into a file, run `between`,
/// sum the file, then send it back to `host` port `up` (through `vireo-io
/// tcp-connect`, whose large writes leave in frames as large as the MTU
/// allows); print
/// `sum=<crc32 in hex>`.
pub fn store_and_return_command(host: &str, down: u16, up: u16, between: &str) -> String {
    format!(
        "nc {host} {down} > /tmp/s && {between} && crc32 < /tmp/s > /tmp/sum && \
         vireo-io tcp-connect {host} {up} < /tmp/s > /dev/null; echo sum=$(cat /tmp/sum)"
    )
}

/// The host's two ends of a [`relay`]: the sender answers the crc32 of what
/// it sent, the receiver whether every byte came back.
pub type Relay = (
    JoinHandle<Result<u32, String>>,
    JoinHandle<Result<(), String>>,
);

/// The host's side: send `len` bytes of the stream seeded `seed` to the
/// first connection on `down` (answering its crc32), and check that the
/// first connection on `up` gives back exactly those bytes. Each waits up
/// to ten minutes for the guest to connect.
pub fn relay(down: TcpListener, up: TcpListener, len: u64, seed: u64) -> Relay {
    let sender = std::thread::spawn(move || -> Result<u32, String> {
        let mut s = accept_within(&down, Duration::from_secs(600))?;
        let (mut gen, mut sum) = (Stream(seed), Crc32::new());
        let mut buf = vec![0u8; 1 << 16];
        let mut left = len;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            gen.fill(&mut buf[..n]);
            sum.update(&buf[..n]);
            s.write_all(&buf[..n])
                .map_err(|e| format!("sending at {}: {e}", len - left))?;
            left -= n as u64;
        }
        Ok(sum.finish())
    });
    let receiver = std::thread::spawn(move || -> Result<(), String> {
        let mut s = accept_within(&up, Duration::from_secs(600))?;
        s.set_read_timeout(Some(Duration::from_secs(120)))
            .map_err(|e| e.to_string())?;
        let mut gen = Stream(seed);
        let (mut got, mut want) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
        let mut at = 0u64;
        while at < len {
            let n = (len - at).min(got.len() as u64) as usize;
            s.read_exact(&mut got[..n])
                .map_err(|e| format!("receiving at {at} of {len}: {e}"))?;
            gen.fill(&mut want[..n]);
            if let Some(i) = (0..n).find(|&i| got[i] != want[i]) {
                return Err(format!("byte {} came back changed", at + i as u64));
            }
            at += n as u64;
        }
        Ok(())
    });
    (sender, receiver)
}
