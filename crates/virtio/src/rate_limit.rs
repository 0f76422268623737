//! Token-bucket I/O limits for virtio-blk and virtio-net queues.
//!
//! The model and its field names are Firecracker's: a bucket holds up to
//! `size` tokens and refills at `size` tokens every `refill_time`
//! milliseconds; `one_time_burst` tokens more are available once, at the
//! start (spent before the bucket's own, never refilled). A
//! [`RateLimiter`] has a bandwidth bucket (tokens are bytes) and an
//! operations bucket (tokens are requests or packets); either may be absent
//! (no limit of that kind).
//!
//! Invariants:
//! - A throttled queue delays its requests; it never drops or reorders
//!   them. The device puts the request it could not afford back on the
//!   queue (`VirtQueue::undo_pop`) and the queue's [`Waker`], a timerfd
//!   polled by the worker thread, fires when the buckets will afford it.
//! - A request asks for `min(n, size)` tokens to be present and then takes
//!   all `n`: a request larger than the bucket (a 4 MiB write against a
//!   1 MiB bucket) still goes once the bucket is full, and the debt it
//!   leaves (a negative balance) is paid back by refill before the next
//!   request goes. So the long-run rate never exceeds `size / refill_time`.
//! - A [`SharedLimiter`] is one device's or one named group's: every
//!   queue using it draws from the same buckets. Changing its
//!   configuration (the API) resets the buckets full and wakes every
//!   waiting queue at once, so lifting a limit takes effect immediately.
//! - An unlimited limiter costs its queues one relaxed atomic load per
//!   request: no lock, no clock read.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use metrics::Counter;
use serde::{Deserialize, Serialize};

/// One token bucket, as a user gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketConfig {
    /// Tokens the bucket holds when full (bytes or operations).
    pub size: u64,
    /// Extra tokens usable once, before the bucket's own.
    #[serde(default)]
    pub one_time_burst: u64,
    /// Milliseconds to refill an empty bucket completely.
    pub refill_time: u64,
}

impl TokenBucketConfig {
    /// Tokens per second this bucket allows in the long run.
    pub fn rate_per_sec(&self) -> f64 {
        self.size as f64 * 1000.0 / self.refill_time as f64
    }

    fn validate(&self, what: &str) -> Result<(), RateLimitError> {
        if self.size == 0 {
            return Err(RateLimitError::Invalid(format!(
                "{what} bucket: size must be at least 1 (omit the bucket for no limit)"
            )));
        }
        if self.refill_time == 0 {
            return Err(RateLimitError::Invalid(format!(
                "{what} bucket: refill_time must be at least 1 ms"
            )));
        }
        Ok(())
    }
}

/// A limiter's configuration: a bandwidth bucket (bytes) and an operations
/// bucket (requests or packets). `{}` (both absent) means no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucketConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucketConfig>,
}

impl RateLimiterConfig {
    /// No bucket at all: nothing is limited.
    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }

    /// Both buckets, if present, have a size and a refill time.
    pub fn validate(&self) -> Result<(), RateLimitError> {
        if let Some(b) = &self.bandwidth {
            b.validate("bandwidth")?;
        }
        if let Some(o) = &self.ops {
            o.validate("ops")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateLimitError {
    #[error("invalid rate limit: {0}")]
    Invalid(String),
    #[error("cannot create a rate-limit timer: {0}")]
    Timer(String),
}

/// One bucket's live state.
#[derive(Debug)]
struct TokenBucket {
    cfg: TokenBucketConfig,
    /// Tokens in the bucket; negative after a request larger than it.
    budget: f64,
    /// What is left of the one-time burst.
    burst: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(cfg: TokenBucketConfig, now: Instant) -> Self {
        TokenBucket {
            cfg,
            budget: cfg.size as f64,
            burst: cfg.one_time_burst as f64,
            last: now,
        }
    }

    /// Tokens per nanosecond.
    fn rate_ns(&self) -> f64 {
        self.cfg.size as f64 / (self.cfg.refill_time as f64 * 1e6)
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_nanos() as f64;
        self.last = now;
        self.budget = (self.budget + dt * self.rate_ns()).min(self.cfg.size as f64);
    }

    /// How long until `n` tokens may be taken (zero: now). Refilled first.
    fn wait_for(&self, n: u64) -> Duration {
        let need = n.min(self.cfg.size) as f64;
        let have = self.burst + self.budget;
        if have >= need {
            return Duration::ZERO;
        }
        let ns = ((need - have) / self.rate_ns()).ceil();
        // At least a microsecond: a timer for "a few ns" would fire before
        // the refill it waits for is visible in floating point.
        Duration::from_nanos((ns as u64).max(1_000))
    }

    fn take(&mut self, n: u64) {
        let n = n as f64;
        let from_burst = n.min(self.burst);
        self.burst -= from_burst;
        self.budget -= n - from_burst;
    }
}

/// A bandwidth and an operations bucket.
#[derive(Debug)]
pub struct RateLimiter {
    cfg: RateLimiterConfig,
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
}

impl RateLimiter {
    /// `cfg` must be valid ([`RateLimiterConfig::validate`]).
    pub fn new(cfg: RateLimiterConfig) -> Self {
        let now = Instant::now();
        RateLimiter {
            cfg,
            bandwidth: cfg.bandwidth.map(|c| TokenBucket::new(c, now)),
            ops: cfg.ops.map(|c| TokenBucket::new(c, now)),
        }
    }

    pub fn config(&self) -> RateLimiterConfig {
        self.cfg
    }

    /// Take `bytes` bandwidth tokens and `ops` operation tokens, or say how
    /// long to wait before asking again (nothing is taken then).
    pub fn try_consume(&mut self, bytes: u64, ops: u64, now: Instant) -> Result<(), Duration> {
        let mut wait = Duration::ZERO;
        for (b, n) in [(&mut self.bandwidth, bytes), (&mut self.ops, ops)] {
            if let Some(b) = b {
                b.refill(now);
                wait = wait.max(b.wait_for(n));
            }
        }
        if !wait.is_zero() {
            return Err(wait);
        }
        if let Some(b) = &mut self.bandwidth {
            b.take(bytes);
        }
        if let Some(b) = &mut self.ops {
            b.take(ops);
        }
        Ok(())
    }
}

impl RateLimiter {
    /// How long until one token of each bucket is there (zero: now): for a
    /// request whose size is known only once it is taken (a received
    /// frame), which then pays with [`RateLimiter::charge`].
    pub fn wait_for_any(&mut self, now: Instant) -> Duration {
        let mut wait = Duration::ZERO;
        for b in [&mut self.bandwidth, &mut self.ops].into_iter().flatten() {
            b.refill(now);
            wait = wait.max(b.wait_for(1));
        }
        wait
    }

    /// Take `bytes` and `ops` tokens whatever the balance (it may go
    /// negative: the debt delays what comes next).
    pub fn charge(&mut self, bytes: u64, ops: u64) {
        if let Some(b) = &mut self.bandwidth {
            b.take(bytes);
        }
        if let Some(b) = &mut self.ops {
            b.take(ops);
        }
    }
}

/// A queue's wake-up timer: a non-blocking timerfd the worker thread polls.
#[derive(Debug)]
pub struct Waker {
    fd: OwnedFd,
}

impl Waker {
    pub fn new() -> Result<Self, RateLimitError> {
        // SAFETY: no pointers; the result is checked.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(RateLimitError::Timer(
                std::io::Error::last_os_error().to_string(),
            ));
        }
        // SAFETY: a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Waker { fd })
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Fire in `d`, unless it is already set to fire sooner.
    pub fn arm(&self, d: Duration) {
        // SAFETY: itimerspec is plain integers; all-zero is a valid value.
        let mut cur: libc::itimerspec = unsafe { std::mem::zeroed() };
        // SAFETY: a valid descriptor and a valid out-pointer.
        if unsafe { libc::timerfd_gettime(self.fd(), &mut cur) } == 0 {
            let left = Duration::new(cur.it_value.tv_sec as u64, cur.it_value.tv_nsec as u32);
            if !left.is_zero() && left <= d {
                return;
            }
        }
        self.set(d.max(Duration::from_nanos(1)));
    }

    /// Fire as soon as possible (a limit changed).
    pub fn fire_now(&self) {
        self.set(Duration::from_nanos(1));
    }

    fn set(&self, d: Duration) {
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: d.as_secs() as libc::time_t,
                tv_nsec: d.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: a valid descriptor and itimerspec; no old value wanted.
        let r = unsafe { libc::timerfd_settime(self.fd(), 0, &spec, std::ptr::null_mut()) };
        if r < 0 {
            tracing::warn!("rate limit timer: {}", std::io::Error::last_os_error());
        }
    }

    /// Consume an expiry (after poll said readable); harmless when none.
    pub fn clear(&self) {
        let mut n = 0u64;
        // SAFETY: reads 8 bytes into a u64; the descriptor is non-blocking.
        unsafe { libc::read(self.fd(), (&mut n as *mut u64).cast(), 8) };
    }
}

/// A limiter that one device or a named group of devices draws from,
/// and the timers of the queues that wait on it.
#[derive(Debug)]
pub struct SharedLimiter {
    unlimited: AtomicBool,
    inner: Mutex<RateLimiter>,
    waiters: Mutex<Vec<Weak<Waker>>>,
}

impl SharedLimiter {
    pub fn new(cfg: RateLimiterConfig) -> Result<Arc<Self>, RateLimitError> {
        cfg.validate()?;
        Ok(Arc::new(SharedLimiter {
            unlimited: AtomicBool::new(cfg.is_unlimited()),
            inner: Mutex::new(RateLimiter::new(cfg)),
            waiters: Mutex::new(Vec::new()),
        }))
    }

    pub fn config(&self) -> RateLimiterConfig {
        self.lock().config()
    }

    /// Replace the configuration: buckets start full, and every waiting
    /// queue retries at once.
    pub fn update(&self, cfg: RateLimiterConfig) -> Result<(), RateLimitError> {
        cfg.validate()?;
        *self.lock() = RateLimiter::new(cfg);
        self.unlimited.store(cfg.is_unlimited(), Ordering::Release);
        let mut w = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        w.retain(|w| match w.upgrade() {
            Some(w) => {
                w.fire_now();
                true
            }
            None => false,
        });
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RateLimiter> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register(&self, waker: &Arc<Waker>) {
        let mut w = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        w.retain(|w| w.strong_count() > 0);
        if !w.iter().any(|x| x.as_ptr() == Arc::as_ptr(waker)) {
            w.push(Arc::downgrade(waker));
        }
    }
}

/// What throttling cost one queue direction: kept by its worker.
#[derive(Debug, Default)]
pub struct ThrottleCounters {
    /// Requests (or packets) that had to wait for tokens.
    pub requests: Counter,
    /// Time the queue spent waiting, in nanoseconds.
    pub nanos: Counter,
}

/// [`ThrottleCounters`] at one time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThrottleStats {
    /// Requests (block) or packets (net) delayed by a rate limit.
    pub throttled_requests: u64,
    /// Microseconds spent waiting for tokens.
    pub throttled_us: u64,
}

impl ThrottleCounters {
    pub fn snapshot(&self) -> ThrottleStats {
        ThrottleStats {
            throttled_requests: self.requests.get(),
            throttled_us: self.nanos.get() / 1000,
        }
    }
}

/// One queue direction's view of a limiter: the limiter, the device's
/// timer, its counters, and when the request at the head of the queue
/// started to wait.
#[derive(Debug)]
pub struct Throttle {
    limiter: Arc<SharedLimiter>,
    waker: Arc<Waker>,
    counters: Arc<ThrottleCounters>,
    since: Option<Instant>,
}

impl Throttle {
    pub fn new(
        limiter: Arc<SharedLimiter>,
        waker: Arc<Waker>,
        counters: Arc<ThrottleCounters>,
    ) -> Self {
        limiter.register(&waker);
        Throttle {
            limiter,
            waker,
            counters,
            since: None,
        }
    }

    /// Whether a request of `bytes` (and one operation) may go now. When
    /// not, the queue's timer is armed for when it may; the caller puts
    /// the request back and stops serving this queue.
    pub fn admit(&mut self, bytes: u64) -> bool {
        if self.limiter.unlimited.load(Ordering::Acquire) {
            self.end_wait(None);
            return true;
        }
        let now = Instant::now();
        let r = self.limiter.lock().try_consume(bytes, 1, now);
        match r {
            Ok(()) => {
                self.end_wait(Some(now));
                true
            }
            Err(wait) => {
                if self.since.is_none() {
                    self.since = Some(now);
                    self.counters.requests.inc();
                }
                self.waker.arm(wait);
                false
            }
        }
    }

    /// Whether the limiter has tokens for one more request of a size not
    /// known yet; when not, as [`Throttle::admit`] refusing. The request
    /// then pays with [`Throttle::charge`].
    pub fn ready(&mut self) -> bool {
        if self.limiter.unlimited.load(Ordering::Acquire) {
            self.end_wait(None);
            return true;
        }
        let now = Instant::now();
        let wait = self.limiter.lock().wait_for_any(now);
        if wait.is_zero() {
            self.end_wait(Some(now));
            return true;
        }
        if self.since.is_none() {
            self.since = Some(now);
            self.counters.requests.inc();
        }
        self.waker.arm(wait);
        false
    }

    /// Pay for a request [`Throttle::ready`] let through: `bytes` and one
    /// operation.
    pub fn charge(&mut self, bytes: u64) {
        if !self.limiter.unlimited.load(Ordering::Acquire) {
            self.limiter.lock().charge(bytes, 1);
        }
    }

    /// The timer to poll for this queue's wake-ups.
    pub fn timer_fd(&self) -> RawFd {
        self.waker.fd()
    }

    /// Whether the queue is waiting for tokens (a device that cannot size
    /// its next request, net receive, asks before taking one).
    pub fn blocked(&self) -> bool {
        self.since.is_some()
    }

    fn end_wait(&mut self, now: Option<Instant>) {
        if let Some(t) = self.since.take() {
            let now = now.unwrap_or_else(Instant::now);
            self.counters
                .nanos
                .add(now.saturating_duration_since(t).as_nanos() as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(size: u64, refill_ms: u64) -> Option<TokenBucketConfig> {
        Some(TokenBucketConfig {
            size,
            one_time_burst: 0,
            refill_time: refill_ms,
        })
    }

    #[test]
    fn a_bucket_limits_the_long_run_rate() {
        // 1000 bytes per 100 ms: 10 000 bytes/s.
        let cfg = RateLimiterConfig {
            bandwidth: bucket(1000, 100),
            ops: None,
        };
        let mut l = RateLimiter::new(cfg);
        let t0 = Instant::now();
        let mut now = t0;
        let mut sent = 0u64;
        // Simulated clock: advance by what the limiter asks for.
        while sent < 100_000 {
            match l.try_consume(300, 1, now) {
                Ok(()) => sent += 300,
                Err(d) => now += d,
            }
        }
        let secs = (now - t0).as_secs_f64();
        // 100 000 bytes less the 1000 of the full bucket at the start.
        let rate = (sent - 1000) as f64 / secs;
        assert!((rate - 10_000.0).abs() < 200.0, "{rate} bytes/s");
    }

    #[test]
    fn a_request_larger_than_the_bucket_goes_and_pays_back() {
        let cfg = RateLimiterConfig {
            bandwidth: bucket(1000, 1000),
            ops: None,
        };
        let mut l = RateLimiter::new(cfg);
        let t0 = Instant::now();
        assert!(l.try_consume(5000, 1, t0).is_ok());
        // 4000 of debt and 1000 to refill before the next byte: ~5 s.
        let d = l.try_consume(1, 1, t0).unwrap_err();
        assert!(
            d >= Duration::from_millis(4000) && d <= Duration::from_millis(4100),
            "{d:?}"
        );
    }

    #[test]
    fn one_time_burst_is_spent_first_and_not_refilled() {
        let cfg = RateLimiterConfig {
            bandwidth: None,
            ops: Some(TokenBucketConfig {
                size: 2,
                one_time_burst: 3,
                refill_time: 1000,
            }),
        };
        let mut l = RateLimiter::new(cfg);
        let t = Instant::now();
        for _ in 0..5 {
            assert!(l.try_consume(0, 1, t).is_ok());
        }
        assert!(l.try_consume(0, 1, t).is_err());
        let later = t + Duration::from_secs(10);
        assert!(l.try_consume(0, 1, later).is_ok());
        assert!(l.try_consume(0, 1, later).is_ok());
        assert!(l.try_consume(0, 1, later).is_err());
    }

    #[test]
    fn invalid_buckets_are_refused_by_name() {
        let e = SharedLimiter::new(RateLimiterConfig {
            bandwidth: bucket(0, 100),
            ops: None,
        })
        .unwrap_err();
        assert!(e.to_string().contains("bandwidth bucket: size"), "{e}");
        let e = RateLimiterConfig {
            bandwidth: None,
            ops: bucket(10, 0),
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("ops bucket: refill_time"), "{e}");
    }

    #[test]
    fn throttle_counts_a_waiting_request_once_and_lifting_wakes_it() {
        let l = SharedLimiter::new(RateLimiterConfig {
            bandwidth: None,
            ops: bucket(1, 60_000),
        })
        .unwrap();
        let waker = Arc::new(Waker::new().unwrap());
        let counters = Arc::new(ThrottleCounters::default());
        let mut t = Throttle::new(l.clone(), waker.clone(), counters.clone());
        assert!(t.admit(512));
        assert!(!t.admit(512));
        assert!(!t.admit(512));
        assert_eq!(counters.requests.get(), 1);
        assert!(t.blocked());
        l.update(RateLimiterConfig::default()).unwrap();
        let mut p = libc::pollfd {
            fd: waker.fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, 5000) };
        assert_eq!(n, 1, "lifting woke the queue");
        waker.clear();
        assert!(t.admit(512));
        assert!(!t.blocked());
        assert_eq!(counters.requests.get(), 1);
    }
}
