//! `--metrics ADDR:PORT`: the monitoring endpoints (`GET /metrics` and
//! `GET /api/v1/vm.counters`) on TCP, for a Prometheus server to scrape.
//!
//! Invariant: only endpoints that read ([`Endpoint::is_monitoring`]) are
//! served here; everything that controls the VM stays on the Unix socket,
//! whose file permissions say who may use it. Anything else is 404.

use std::net::SocketAddr;
use std::sync::Arc;

use tiny_http::{Method, Server};

use super::{Endpoint, RequestHandler};

/// A listening metrics server; it stops when dropped.
pub struct MetricsServer {
    server: Arc<Server>,
    addr: SocketAddr,
}

impl MetricsServer {
    /// Listen on `addr` and answer on a thread of its own.
    pub fn start(addr: SocketAddr, handler: Arc<dyn RequestHandler>) -> Result<Self, String> {
        let server =
            Server::http(addr).map_err(|e| format!("cannot listen for metrics on {addr}: {e}"))?;
        let bound = server
            .server_addr()
            .to_ip()
            .ok_or_else(|| format!("metrics listener on {addr} is not a TCP socket"))?;
        let server = Arc::new(server);
        let s = server.clone();
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                // One at a time: a scrape is a few atomic reads, and a
                // slow client cannot start threads without bound.
                for req in s.incoming_requests() {
                    let path = req.url().split('?').next().unwrap_or("").to_string();
                    let answer = match Endpoint::from_path(&path) {
                        Some(e) if e.is_monitoring() => {
                            let method = match req.method() {
                                Method::Get => "GET",
                                _ => "OTHER",
                            };
                            super::http::route(handler.as_ref(), method, req.url(), "").0
                        }
                        _ => tiny_http::Response::from_data(
                            format!("no such endpoint here: {path} (try /metrics)").into_bytes(),
                        )
                        .with_status_code(404),
                    };
                    if let Err(e) = req.respond(answer) {
                        tracing::debug!("metrics client went away: {e}");
                    }
                }
            })
            .map_err(|e| format!("cannot start the metrics thread: {e}"))?;
        tracing::info!("metrics on http://{bound}/metrics");
        Ok(MetricsServer {
            server,
            addr: bound,
        })
    }

    /// Where it listens (the port the system chose for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.server.unblock();
    }
}
