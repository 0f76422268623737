//! Arbitrary bytes as one request on the API socket: read under the
//! server's limits, its head parsed, and its body parsed as the action of
//! the endpoint it names (or of every endpoint, the body alone). Errors
//! only: never a panic, a hang, or memory beyond the limits.
#![no_main]

use std::io::{Cursor, Read, Write};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use vmm::api::http::{parse_head, read_request, Conn, Limits};
use vmm::api::{ApiAction, Endpoint};

/// A connection whose client sent `data` and then closed.
struct Mem(Cursor<Vec<u8>>, Vec<u8>);

impl Read for Mem {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Mem {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.1.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Conn for Mem {
    fn set_read_timeout(&self, _: Option<Duration>) -> std::io::Result<()> {
        Ok(())
    }
    fn set_write_timeout(&self, _: Option<Duration>) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = parse_head(data);
    let mut conn = Mem(Cursor::new(data.to_vec()), Vec::new());
    let limits = Limits::default();
    if let Ok(req) = read_request(&mut conn, &limits, Instant::now()) {
        assert!(req.body.len() as u64 <= limits.max_body);
        let path = req.head.target.split('?').next().unwrap_or("");
        if let (Some(e), Ok(body)) = (Endpoint::from_path(path), std::str::from_utf8(&req.body)) {
            let _ = ApiAction::parse(e, body);
        }
    }
    if let Ok(body) = std::str::from_utf8(data) {
        for e in Endpoint::ALL {
            let _ = ApiAction::parse(e, body);
        }
    }
});
