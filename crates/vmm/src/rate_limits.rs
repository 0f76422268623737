//! Where the API finds a VM's I/O limiters: by device id (`disk0`,
//! `net1`, as `vm.counters` names them) or by rate-group name.
//!
//! Invariants: every virtio-blk disk and virtio-net NIC has limiters from
//! the start, unlimited when the configuration gives none, so a limit can
//! be set on any of them later. Devices of one group hold the same
//! limiters (the `Arc`s are shared), so a change through any name reaches
//! all of them. A group name belongs to disks or to NICs, never both
//! (`VmConfig::validate`).

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio::rate_limit::{RateLimiterConfig, SharedLimiter};

use crate::api::{ApiError, RateLimitRequest};
use crate::config::{DiskConfig, NetConfig};
use crate::VmmError;

/// One device's (or group's) limiters.
#[derive(Debug, Clone)]
pub(crate) enum Limiters {
    Disk(Arc<SharedLimiter>),
    Net {
        rx: Arc<SharedLimiter>,
        tx: Arc<SharedLimiter>,
    },
}

/// The limits of one device or group as `vm.counters` shows them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimitInfo {
    /// A disk's limit (null for a NIC).
    pub rate_limiter: Option<RateLimiterConfig>,
    /// A NIC's receive and transmit limits (null for a disk).
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    pub tx_rate_limiter: Option<RateLimiterConfig>,
    /// The group the device draws from with others, if any.
    pub rate_group: Option<String>,
}

/// Every limiter of one VM.
#[derive(Debug, Default)]
pub(crate) struct RateLimits {
    devices: HashMap<String, (Limiters, Option<String>)>,
    groups: HashMap<String, Limiters>,
}

fn limiter(cfg: Option<RateLimiterConfig>, who: &str) -> Result<Arc<SharedLimiter>, VmmError> {
    SharedLimiter::new(cfg.unwrap_or_default()).map_err(|e| VmmError::Config(format!("{who}: {e}")))
}

impl RateLimits {
    /// The limiter of disk `id`: its group's (made by the first disk of
    /// the group; later ones may repeat its limit) or its own.
    pub(crate) fn disk(
        &mut self,
        id: &str,
        d: &DiskConfig,
    ) -> Result<Arc<SharedLimiter>, VmmError> {
        let l = match &d.rate_group {
            Some(g) => match self.groups.get(g) {
                Some(Limiters::Disk(l)) => {
                    if let Some(c) = d.rate_limiter {
                        l.update(c)
                            .map_err(|e| VmmError::Config(format!("{id}: {e}")))?;
                    }
                    l.clone()
                }
                Some(Limiters::Net { .. }) => {
                    return Err(VmmError::Config(format!(
                        "rate group '{g}' names both disks and NICs: give them groups of their own"
                    )))
                }
                None => {
                    let l = limiter(d.rate_limiter, id)?;
                    self.groups.insert(g.clone(), Limiters::Disk(l.clone()));
                    l
                }
            },
            None => limiter(d.rate_limiter, id)?,
        };
        self.devices
            .insert(id.into(), (Limiters::Disk(l.clone()), d.rate_group.clone()));
        Ok(l)
    }

    /// The receive and transmit limiters of NIC `id`, as [`RateLimits::disk`].
    pub(crate) fn net(
        &mut self,
        id: &str,
        n: &NetConfig,
    ) -> Result<(Arc<SharedLimiter>, Arc<SharedLimiter>), VmmError> {
        let given = n.rx_rate_limiter.is_some() || n.tx_rate_limiter.is_some();
        let (rx, tx) = match &n.rate_group {
            Some(g) => match self.groups.get(g) {
                Some(Limiters::Net { rx, tx }) => {
                    if given {
                        for (l, c) in [(rx, n.rx_rate_limiter), (tx, n.tx_rate_limiter)] {
                            l.update(c.unwrap_or_default())
                                .map_err(|e| VmmError::Config(format!("{id}: {e}")))?;
                        }
                    }
                    (rx.clone(), tx.clone())
                }
                Some(Limiters::Disk(_)) => {
                    return Err(VmmError::Config(format!(
                        "rate group '{g}' names both disks and NICs: give them groups of their own"
                    )))
                }
                None => {
                    let rx = limiter(n.rx_rate_limiter, id)?;
                    let tx = limiter(n.tx_rate_limiter, id)?;
                    let l = Limiters::Net {
                        rx: rx.clone(),
                        tx: tx.clone(),
                    };
                    self.groups.insert(g.clone(), l);
                    (rx, tx)
                }
            },
            None => (
                limiter(n.rx_rate_limiter, id)?,
                limiter(n.tx_rate_limiter, id)?,
            ),
        };
        let l = Limiters::Net {
            rx: rx.clone(),
            tx: tx.clone(),
        };
        self.devices.insert(id.into(), (l, n.rate_group.clone()));
        Ok((rx, tx))
    }

    /// What device `id` is limited to now (None: no such disk or NIC).
    pub(crate) fn info(&self, id: &str) -> Option<RateLimitInfo> {
        let (l, group) = self.devices.get(id)?;
        let mut i = RateLimitInfo {
            rate_group: group.clone(),
            ..Default::default()
        };
        match l {
            Limiters::Disk(l) => i.rate_limiter = Some(l.config()),
            Limiters::Net { rx, tx } => {
                i.rx_rate_limiter = Some(rx.config());
                i.tx_rate_limiter = Some(tx.config());
            }
        }
        Some(i)
    }

    /// Apply `req` (the API's `vm.rate-limit`): everything is checked
    /// before anything changes.
    pub(crate) fn apply(&self, req: &RateLimitRequest) -> Result<(), ApiError> {
        let l = self
            .devices
            .get(&req.target)
            .map(|(l, _)| l)
            .or_else(|| self.groups.get(&req.target))
            .ok_or_else(|| ApiError::NoRateLimitTarget(req.target.clone()))?;
        let wrong = |what: &str| ApiError::BadRateLimit {
            target: req.target.clone(),
            reason: what.into(),
        };
        let given = [req.rate_limiter, req.rx_rate_limiter, req.tx_rate_limiter];
        if given.iter().all(Option::is_none) {
            return Err(wrong(
                "the request sets no limit (give rate_limiter for a disk, rx_rate_limiter and/or tx_rate_limiter for a NIC; {} lifts a limit)",
            ));
        }
        for c in given.iter().flatten() {
            c.validate().map_err(|e| wrong(&e.to_string()))?;
        }
        let changes: Vec<(&Arc<SharedLimiter>, RateLimiterConfig)> = match l {
            Limiters::Disk(l) => {
                if req.rx_rate_limiter.is_some() || req.tx_rate_limiter.is_some() {
                    return Err(wrong(
                        "a disk has one limiter: give rate_limiter, not rx_/tx_rate_limiter",
                    ));
                }
                req.rate_limiter.iter().map(|c| (l, *c)).collect()
            }
            Limiters::Net { rx, tx } => {
                if req.rate_limiter.is_some() {
                    return Err(wrong(
                        "a NIC has a limiter per direction: give rx_rate_limiter and/or tx_rate_limiter",
                    ));
                }
                [(rx, req.rx_rate_limiter), (tx, req.tx_rate_limiter)]
                    .into_iter()
                    .filter_map(|(l, c)| c.map(|c| (l, c)))
                    .collect()
            }
        };
        for (l, c) in changes {
            // Validated above: cannot fail.
            l.update(c).map_err(|e| wrong(&e.to_string()))?;
        }
        Ok(())
    }
}
