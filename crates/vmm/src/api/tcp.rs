//! `--metrics ADDR:PORT`: the monitoring endpoints (`GET /metrics` and
//! `GET /api/v1/vm.counters`) on TCP, for a Prometheus server to scrape.
//!
//! Invariant: only endpoints that read ([`Endpoint::is_monitoring`]) are
//! served here ([`Limits::monitoring_only`]); everything that controls the
//! VM stays on the Unix socket, whose file permissions say who may use it.
//! Anything else is 404. The same bounded server as the API socket's
//! answers, so a scraper (or anyone on the network) gets the same limits.
//!
//! [`Endpoint::is_monitoring`]: super::Endpoint::is_monitoring

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use super::http::{serve, Limits, Serving};
use super::RequestHandler;

/// A listening metrics server; it stops when dropped.
pub struct MetricsServer {
    _serving: Serving,
    addr: SocketAddr,
}

impl MetricsServer {
    /// Listen on `addr` and answer on a thread of its own.
    pub fn start(addr: SocketAddr, handler: Arc<dyn RequestHandler>) -> Result<Self, String> {
        let listener = TcpListener::bind(addr)
            .map_err(|e| format!("cannot listen for metrics on {addr}: {e}"))?;
        let bound = listener
            .local_addr()
            .map_err(|e| format!("metrics listener on {addr}: {e}"))?;
        let limits = Limits {
            monitoring_only: true,
            ..Limits::default()
        };
        let serving = serve(listener, handler, limits, "metrics")
            .map_err(|e| format!("cannot start the metrics thread: {e}"))?;
        tracing::info!("metrics on http://{bound}/metrics");
        Ok(MetricsServer {
            _serving: serving,
            addr: bound,
        })
    }

    /// Where it listens (the port the system chose for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}
