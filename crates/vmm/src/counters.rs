//! Monitoring: what one VM counts while it runs and how the API reports it
//! (`GET /api/v1/vm.counters` as [`VmCounters`], `GET /metrics` as
//! Prometheus text from [`render_prometheus`]).
//!
//! Where the counts are kept: each vCPU thread counts its exits by reason
//! and the time it spends in the guest and answering exits
//! ([`VcpuCounters`], written by that thread only); the engine publishes
//! its own per-vCPU counters (`hypervisor::stats`); the virtio transport
//! counts notifications and interrupts per function and the block and net
//! workers their requests and packets (`virtio::stats`). Nothing here
//! takes a lock on a path the guest drives: a report reads atomics, and
//! the few files under /proc/self for CPU time and resident memory.
//!
//! Invariants: every counter only grows while the VMM runs; a counter
//! family has one unit, named in its key (`_ns`, `_bytes`) in JSON and in
//! its name (`_seconds`, `_bytes`, `_total`) in the exposition; the two
//! reports are made from one [`VmCounters`], so they agree.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hypervisor::stats::{EngineCounters, EngineStats};
use hypervisor::VcpuExit;
use metrics::{Counter, Exposition, Kind};
use serde::{Deserialize, Serialize};
use virtio::stats::{
    BlockCounters, BlockStats, NetCounters, NetStats, TransportCounters, TransportStats,
};

use crate::api::VmState;

/// Why a vCPU left the guest, as the counters name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Halt,
    Interrupted,
    /// Power-off, reset, shutdown and errors: each ends the VM.
    Other,
}

impl ExitReason {
    pub const ALL: [ExitReason; 7] = [
        ExitReason::IoIn,
        ExitReason::IoOut,
        ExitReason::MmioRead,
        ExitReason::MmioWrite,
        ExitReason::Halt,
        ExitReason::Interrupted,
        ExitReason::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ExitReason::IoIn => "io_in",
            ExitReason::IoOut => "io_out",
            ExitReason::MmioRead => "mmio_read",
            ExitReason::MmioWrite => "mmio_write",
            ExitReason::Halt => "halt",
            ExitReason::Interrupted => "interrupted",
            ExitReason::Other => "other",
        }
    }

    pub fn of(exit: &VcpuExit<'_>) -> Self {
        match exit {
            VcpuExit::IoIn { .. } => ExitReason::IoIn,
            VcpuExit::IoOut { .. } => ExitReason::IoOut,
            VcpuExit::MmioRead { .. } => ExitReason::MmioRead,
            VcpuExit::MmioWrite { .. } => ExitReason::MmioWrite,
            VcpuExit::Halt => ExitReason::Halt,
            VcpuExit::Interrupted => ExitReason::Interrupted,
            _ => ExitReason::Other,
        }
    }
}

/// What one vCPU thread counts (it alone writes these).
#[derive(Debug, Default)]
pub struct VcpuCounters {
    exits: [Counter; ExitReason::ALL.len()],
    /// Time inside the accelerator's run call (for the engine this
    /// includes a halted vCPU's sleep inside it).
    guest_ns: Counter,
    /// Time answering exits (device emulation on the vCPU thread).
    vmm_ns: Counter,
    /// The thread's id, for its CPU time in /proc (0 before it starts).
    tid: AtomicI32,
    /// The engine's own counters (None under KVM).
    engine: Option<Arc<EngineCounters>>,
}

impl VcpuCounters {
    pub(crate) fn new(engine: Option<Arc<EngineCounters>>) -> Self {
        VcpuCounters {
            engine,
            ..Default::default()
        }
    }

    /// The vCPU thread starts: note its id.
    pub(crate) fn thread_started(&self) {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        self.tid.store(tid, Ordering::Relaxed);
    }

    #[inline]
    pub(crate) fn exited(&self, reason: ExitReason, in_guest: Duration) {
        self.exits[reason as usize].inc();
        self.guest_ns.add(in_guest.as_nanos() as u64);
    }

    #[inline]
    pub(crate) fn answered(&self, took: Duration) {
        self.vmm_ns.add(took.as_nanos() as u64);
    }

    fn report(&self, index: u32) -> VcpuReport {
        let exits = ExitReason::ALL
            .iter()
            .map(|r| (r.name().to_string(), self.exits[*r as usize].get()))
            .collect();
        let tid = self.tid.load(Ordering::Relaxed);
        VcpuReport {
            index,
            exits,
            guest_ns: self.guest_ns.get(),
            vmm_ns: self.vmm_ns.get(),
            cpu_ns: (tid != 0).then(|| thread_cpu_ns(tid)).flatten(),
            engine: self.engine.as_ref().map(|e| e.snapshot()),
        }
    }
}

/// CPU time of one of this process's threads, in ns (its schedstat).
fn thread_cpu_ns(tid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// Resident memory of this process in bytes (guest RAM the host backs,
/// plus the VMM's own).
fn resident_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page.max(0) as u64)
}

/// What a device model counts beyond its transport's figures.
pub(crate) enum DeviceKind {
    Block {
        path: std::path::PathBuf,
        counters: Arc<BlockCounters>,
    },
    Net {
        tap: String,
        mac: String,
        counters: Arc<NetCounters>,
    },
    /// rng, console, balloon: notifications and interrupts only.
    Plain(&'static str),
}

/// One virtio function as monitoring sees it.
pub(crate) struct MonitoredDevice {
    /// Stable within a VM: `disk0`, `net0`, `rng0`, ... (configuration order).
    pub id: String,
    pub transport: Arc<TransportCounters>,
    pub kind: DeviceKind,
}

/// Everything monitoring reads of one VM, gathered when it is built.
pub(crate) struct VmMonitor {
    pub started: Instant,
    pub vcpus: Vec<Arc<VcpuCounters>>,
    pub devices: Vec<MonitoredDevice>,
    /// The long operation in progress, if any.
    pub progress: Progress,
}

/// What a long operation has done so far (a snapshot's memory written, a
/// migration's pages sent), for `vm.counters` and the CLI's progress.
/// Written by the one thread doing the operation; `op` 0 means none.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    op: std::sync::atomic::AtomicU8,
    phase: std::sync::atomic::AtomicU8,
    /// Nanoseconds after the monitor's start when the operation began.
    began_ns: Counter,
    /// Guest memory covered so far (a migration's pages x 4 KiB).
    done_bytes: Counter,
    /// What the whole (snapshot) or this round (migration) covers.
    total_bytes: Counter,
    /// Of this round, done (the migration's rounds restart it).
    round_done_bytes: Counter,
    /// Bytes that went on the wire or to the file.
    sent_bytes: Counter,
    round: Counter,
    /// Pages the guest dirtied during the last round, and how fast.
    dirty_pages: Counter,
    dirty_pages_per_s: Counter,
}

/// Which long operation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Operation {
    Snapshot = 1,
    Migration = 2,
}

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Writing memory (a snapshot) or copying it while the guest runs.
    Copy = 1,
    /// The guest is paused; the last dirty pages and the state go over.
    StopAndCopy = 2,
}

impl Progress {
    pub(crate) fn begin(&self, started: Instant, op: Operation, total_bytes: u64) {
        self.began_ns.publish(started.elapsed().as_nanos() as u64);
        for c in [
            &self.done_bytes,
            &self.round_done_bytes,
            &self.sent_bytes,
            &self.round,
            &self.dirty_pages,
            &self.dirty_pages_per_s,
        ] {
            c.publish(0);
        }
        self.total_bytes.publish(total_bytes);
        self.phase.store(Phase::Copy as u8, Ordering::Relaxed);
        self.op.store(op as u8, Ordering::Release);
    }

    /// (memory covered, bytes sent) so far.
    #[cfg(test)]
    pub(crate) fn done(&self) -> (u64, u64) {
        (self.done_bytes.get(), self.sent_bytes.get())
    }

    pub(crate) fn end(&self) {
        self.op.store(0, Ordering::Release);
    }

    /// `bytes` more of guest memory are done; `sent` is the running total
    /// that went out.
    pub(crate) fn advance(&self, bytes: u64, sent: u64) {
        self.done_bytes.add(bytes);
        self.round_done_bytes.add(bytes);
        self.sent_bytes.publish(sent);
    }

    /// A new round (migration) over `total_bytes` of dirty memory; the
    /// last one left `dirty_pages`, dirtied at `per_s` pages a second.
    pub(crate) fn round(&self, phase: Phase, total_bytes: u64, dirty_pages: u64, per_s: u64) {
        self.round.inc();
        self.round_done_bytes.publish(0);
        self.total_bytes.publish(total_bytes);
        self.dirty_pages.publish(dirty_pages);
        self.dirty_pages_per_s.publish(per_s);
        self.phase.store(phase as u8, Ordering::Relaxed);
    }

    fn report(&self, started: Instant) -> Option<OperationReport> {
        let op = match self.op.load(Ordering::Acquire) {
            1 => "snapshot",
            2 => "migration",
            _ => return None,
        };
        let phase = match self.phase.load(Ordering::Relaxed) {
            2 => "stop-and-copy",
            _ => "copy",
        };
        let now = started.elapsed().as_nanos() as u64;
        let elapsed_ns = now.saturating_sub(self.began_ns.get()).max(1);
        let done = self.done_bytes.get();
        let rate = (done as u128 * 1_000_000_000 / elapsed_ns as u128) as u64;
        let dirty = self.dirty_pages.get();
        Some(OperationReport {
            kind: op.into(),
            phase: phase.into(),
            elapsed_ms: elapsed_ns / 1_000_000,
            done_bytes: done,
            round_done_bytes: self.round_done_bytes.get(),
            round_total_bytes: self.total_bytes.get(),
            sent_bytes: self.sent_bytes.get(),
            rate_bytes_per_s: rate,
            round: self.round.get(),
            dirty_pages: dirty,
            dirty_pages_per_s: self.dirty_pages_per_s.get(),
            expected_downtime_ms: (op == "migration" && rate > 0)
                .then(|| dirty * 4096 * 1000 / rate),
        })
    }
}

/// A long operation as `vm.counters` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OperationReport {
    /// snapshot or migration.
    pub kind: String,
    /// copy (memory goes out; a migrating guest runs) or stop-and-copy
    /// (the migrating guest is paused for the last pages and its state).
    pub phase: String,
    pub elapsed_ms: u64,
    /// Guest memory covered since the start (every round together).
    pub done_bytes: u64,
    /// Of the current round (a snapshot has one).
    pub round_done_bytes: u64,
    pub round_total_bytes: u64,
    /// What went to the file or the wire (zero pages cost little).
    pub sent_bytes: u64,
    /// Memory covered per second since the start.
    pub rate_bytes_per_s: u64,
    /// A migration's pre-copy round (0 for a snapshot).
    pub round: u64,
    /// Pages the guest dirtied during the last round, and how fast.
    pub dirty_pages: u64,
    pub dirty_pages_per_s: u64,
    /// A migration's downtime if it stopped the guest now: the dirty
    /// pages at the rate so far.
    pub expected_downtime_ms: Option<u64>,
}

/// `GET /api/v1/vm.counters`: the VM's counters now.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmCounters {
    pub state: VmState,
    pub accel: hypervisor::AccelKind,
    /// Since the VM was built (a restored VM counts from its restore).
    pub uptime_ms: u64,
    pub memory: MemoryReport,
    pub vcpus: Vec<VcpuReport>,
    pub disks: Vec<DiskReport>,
    pub nets: Vec<NetReport>,
    /// Every virtio function, disks and NICs included.
    pub virtio: Vec<VirtioReport>,
    /// A snapshot or migration in progress (null when none runs).
    pub operation: Option<OperationReport>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct MemoryReport {
    /// Guest RAM as configured.
    pub guest_bytes: u64,
    /// The VMM process's resident memory (guest pages the host backs
    /// now, plus the VMM's own); null if /proc cannot be read.
    pub resident_bytes: Option<u64>,
    /// What the guest has handed to the balloon (null without one).
    pub balloon_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VcpuReport {
    pub index: u32,
    /// Exits to the VMM by reason (io_in, io_out, mmio_read, mmio_write,
    /// halt, interrupted, other). Under KVM exits the kernel handles
    /// itself are not seen.
    pub exits: BTreeMap<String, u64>,
    /// Time in the accelerator's run call, ns.
    pub guest_ns: u64,
    /// Time the vCPU thread spent answering exits, ns.
    pub vmm_ns: u64,
    /// CPU time the vCPU thread used, ns (null before it started).
    pub cpu_ns: Option<u64>,
    /// The engine's counters (null under KVM).
    pub engine: Option<EngineStats>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskReport {
    pub id: String,
    pub path: std::path::PathBuf,
    #[serde(flatten)]
    pub stats: BlockStats,
    /// The disk's limits now (null: unlimited) and its rate group.
    #[serde(default)]
    pub rate_limiter: Option<virtio::rate_limit::RateLimiterConfig>,
    #[serde(default)]
    pub rate_group: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetReport {
    pub id: String,
    pub tap: String,
    pub mac: String,
    #[serde(flatten)]
    pub stats: NetStats,
    /// The NIC's limits now, per direction (null: unlimited), and its rate group.
    #[serde(default)]
    pub rx_rate_limiter: Option<virtio::rate_limit::RateLimiterConfig>,
    #[serde(default)]
    pub tx_rate_limiter: Option<virtio::rate_limit::RateLimiterConfig>,
    #[serde(default)]
    pub rate_group: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VirtioReport {
    pub id: String,
    /// blk, net, rng, console or balloon.
    pub kind: String,
    #[serde(flatten)]
    pub stats: TransportStats,
}

impl crate::VmHandle {
    /// The counters now, for the API.
    pub fn counters(&self) -> VmCounters {
        let m = &self.monitor;
        let mut disks = Vec::new();
        let mut nets = Vec::new();
        let mut virtio = Vec::new();
        for d in &m.devices {
            let kind = match &d.kind {
                DeviceKind::Block { path, counters } => {
                    let limit = self.rate_limits().info(&d.id).unwrap_or_default();
                    disks.push(DiskReport {
                        id: d.id.clone(),
                        path: path.clone(),
                        stats: counters.snapshot(),
                        rate_limiter: limit.rate_limiter.filter(|c| !c.is_unlimited()),
                        rate_group: limit.rate_group,
                    });
                    "blk"
                }
                DeviceKind::Net { tap, mac, counters } => {
                    let limit = self.rate_limits().info(&d.id).unwrap_or_default();
                    nets.push(NetReport {
                        id: d.id.clone(),
                        tap: tap.clone(),
                        mac: mac.clone(),
                        stats: counters.snapshot(),
                        rx_rate_limiter: limit.rx_rate_limiter.filter(|c| !c.is_unlimited()),
                        tx_rate_limiter: limit.tx_rate_limiter.filter(|c| !c.is_unlimited()),
                        rate_group: limit.rate_group,
                    });
                    "net"
                }
                DeviceKind::Plain(k) => k,
            };
            virtio.push(VirtioReport {
                id: d.id.clone(),
                kind: kind.into(),
                stats: d.transport.snapshot(),
            });
        }
        let balloon_bytes = self
            .balloon()
            .map(|b| b.state().actual as u64 * virtio::balloon::PAGE_SIZE);
        VmCounters {
            state: self.control.state().into(),
            accel: self.accel,
            uptime_ms: m.started.elapsed().as_millis() as u64,
            memory: MemoryReport {
                guest_bytes: self.memory_bytes,
                resident_bytes: resident_bytes(),
                balloon_bytes,
            },
            vcpus: m
                .vcpus
                .iter()
                .enumerate()
                .map(|(i, c)| c.report(i as u32))
                .collect(),
            disks,
            nets,
            virtio,
            operation: m.progress.report(m.started),
        }
    }

    /// The progress of the operation this VM runs (see [`Progress`]).
    pub(crate) fn progress(&self) -> (&Progress, Instant) {
        (&self.monitor.progress, self.monitor.started)
    }
}

/// A family's name, help, and how to read its value from a report.
type Family<R, V> = (&'static str, &'static str, fn(&R) -> V);
/// The same with the family's kind.
type KindFamily<R> = (&'static str, &'static str, Kind, fn(&R) -> u64);

fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// The same counters in the Prometheus text exposition format: `vireo_`
/// names with their unit, `_total` on counters, labels for the vCPU, the
/// exit reason, the device and the direction or operation.
pub fn render_prometheus(c: &VmCounters) -> String {
    let mut e = Exposition::new();
    e.family(
        "vireo_vm_state",
        "The VM's run state (1 for the current one)",
        Kind::Gauge,
    );
    for (s, name) in [(VmState::Running, "running"), (VmState::Paused, "paused")] {
        e.sample("vireo_vm_state", &[("state", name)], (c.state == s) as u64);
    }
    let accel = c.accel.to_string();
    e.family(
        "vireo_vm_info",
        "Constant 1, labelled with the accelerator",
        Kind::Gauge,
    );
    e.sample("vireo_vm_info", &[("accel", &accel)], 1u64);
    e.family(
        "vireo_vm_uptime_seconds",
        "Time since the VM was built or restored",
        Kind::Gauge,
    );
    e.sample("vireo_vm_uptime_seconds", &[], c.uptime_ms as f64 / 1e3);
    e.family(
        "vireo_vm_memory_bytes",
        "Guest RAM as configured",
        Kind::Gauge,
    );
    e.sample("vireo_vm_memory_bytes", &[], c.memory.guest_bytes);
    if let Some(r) = c.memory.resident_bytes {
        e.family(
            "vireo_vmm_resident_memory_bytes",
            "Resident memory of the VMM process (backed guest RAM included)",
            Kind::Gauge,
        );
        e.sample("vireo_vmm_resident_memory_bytes", &[], r);
    }
    if let Some(b) = c.memory.balloon_bytes {
        e.family(
            "vireo_vm_balloon_bytes",
            "Memory the guest has handed to the balloon",
            Kind::Gauge,
        );
        e.sample("vireo_vm_balloon_bytes", &[], b);
    }

    let idx: Vec<String> = c.vcpus.iter().map(|v| v.index.to_string()).collect();
    e.family(
        "vireo_vcpu_exits_total",
        "vCPU exits to the VMM by reason",
        Kind::Counter,
    );
    for (v, i) in c.vcpus.iter().zip(&idx) {
        for (reason, n) in &v.exits {
            e.sample(
                "vireo_vcpu_exits_total",
                &[("vcpu", i), ("reason", reason)],
                *n,
            );
        }
    }
    let times: [Family<VcpuReport, Option<u64>>; 3] = [
        (
            "vireo_vcpu_guest_seconds_total",
            "Time in the accelerator's run call (guest code; halted time too under the engine)",
            |v| Some(v.guest_ns),
        ),
        (
            "vireo_vcpu_vmm_seconds_total",
            "Time the vCPU thread spent answering exits",
            |v| Some(v.vmm_ns),
        ),
        (
            "vireo_vcpu_cpu_seconds_total",
            "CPU time used by the vCPU thread",
            |v| v.cpu_ns,
        ),
    ];
    for (name, help, get) in times {
        e.family(name, help, Kind::Counter);
        for (v, i) in c.vcpus.iter().zip(&idx) {
            if let Some(ns) = get(v) {
                e.sample(name, &[("vcpu", i)], secs(ns));
            }
        }
    }
    let engine: [KindFamily<EngineStats>; 7] = [
        (
            "vireo_engine_instructions_total",
            "Guest instructions the engine retired",
            Kind::Counter,
            |s| s.instructions,
        ),
        (
            "vireo_engine_blocks_translated_total",
            "Blocks the engine compiled to host code",
            Kind::Counter,
            |s| s.blocks_translated,
        ),
        (
            "vireo_engine_code_cache_bytes",
            "Host code in the engine's translation cache",
            Kind::Gauge,
            |s| s.code_cache_bytes,
        ),
        (
            "vireo_engine_cache_flushes_total",
            "Times the engine emptied its block and translation caches",
            Kind::Counter,
            |s| s.cache_flushes,
        ),
        (
            "vireo_engine_tlb_flushes_total",
            "Whole flushes of the engine's software TLB",
            Kind::Counter,
            |s| s.tlb_flushes,
        ),
        (
            "vireo_engine_interrupts_total",
            "External interrupts and NMIs the engine delivered to the guest",
            Kind::Counter,
            |s| s.interrupts,
        ),
        (
            "vireo_engine_pv_kicks_total",
            "Paravirtual spinlock kicks (KVM_HC_KICK_CPU) the vCPU sent",
            Kind::Counter,
            |s| s.pv_kicks,
        ),
    ];
    if c.vcpus.iter().any(|v| v.engine.is_some()) {
        for (name, help, kind, get) in engine {
            e.family(name, help, kind);
            for (v, i) in c.vcpus.iter().zip(&idx) {
                if let Some(s) = &v.engine {
                    e.sample(name, &[("vcpu", i)], get(s));
                }
            }
        }
    }

    if !c.disks.is_empty() {
        e.family(
            "vireo_block_requests_total",
            "virtio-blk requests by operation",
            Kind::Counter,
        );
        for d in &c.disks {
            for (op, s) in block_ops(&d.stats) {
                e.sample(
                    "vireo_block_requests_total",
                    &[("device", d.id.as_str()), ("op", op)],
                    s.requests,
                );
            }
        }
        e.family(
            "vireo_block_bytes_total",
            "virtio-blk bytes by operation (requests that succeeded)",
            Kind::Counter,
        );
        for d in &c.disks {
            for (op, s) in block_ops(&d.stats) {
                e.sample(
                    "vireo_block_bytes_total",
                    &[("device", d.id.as_str()), ("op", op)],
                    s.bytes,
                );
            }
        }
        e.family(
            "vireo_block_errors_total",
            "virtio-blk requests that completed with an error",
            Kind::Counter,
        );
        for d in &c.disks {
            e.sample(
                "vireo_block_errors_total",
                &[("device", &d.id)],
                d.stats.errors,
            );
        }
        e.family(
            "vireo_block_throttled_requests_total",
            "virtio-blk requests that waited for the disk's rate limit",
            Kind::Counter,
        );
        for d in &c.disks {
            e.sample(
                "vireo_block_throttled_requests_total",
                &[("device", &d.id)],
                d.stats.throttled_requests,
            );
        }
        e.family(
            "vireo_block_throttled_seconds_total",
            "Time virtio-blk requests waited for the disk's rate limit",
            Kind::Counter,
        );
        for d in &c.disks {
            e.sample(
                "vireo_block_throttled_seconds_total",
                &[("device", &d.id)],
                d.stats.throttled_us as f64 / 1e6,
            );
        }
        e.family(
            "vireo_block_request_duration_seconds",
            "virtio-blk request latency, from the queue to the status",
            Kind::Histogram,
        );
        for d in &c.disks {
            e.histogram(
                "vireo_block_request_duration_seconds",
                &[("device", &d.id)],
                &d.stats.latency_us,
                1e6,
            );
        }
    }

    if !c.nets.is_empty() {
        let per_dir: [Family<NetStats, (u64, u64)>; 3] = [
            (
                "vireo_net_packets_total",
                "virtio-net frames by direction (rx: to the guest)",
                |s| (s.rx_packets, s.tx_packets),
            ),
            (
                "vireo_net_bytes_total",
                "virtio-net frame bytes by direction, without the virtio header",
                |s| (s.rx_bytes, s.tx_bytes),
            ),
            (
                "vireo_net_dropped_total",
                "virtio-net frames dropped by direction",
                |s| (s.rx_dropped, s.tx_dropped),
            ),
        ];
        for (name, help, get) in per_dir {
            e.family(name, help, Kind::Counter);
            for n in &c.nets {
                let (rx, tx) = get(&n.stats);
                e.sample(name, &[("device", n.id.as_str()), ("direction", "rx")], rx);
                e.sample(name, &[("device", n.id.as_str()), ("direction", "tx")], tx);
            }
        }
        e.family(
            "vireo_net_throttled_total",
            "Times a virtio-net direction waited for its rate limit (rx: to the guest)",
            Kind::Counter,
        );
        for n in &c.nets {
            let s = &n.stats;
            let id = n.id.as_str();
            e.sample(
                "vireo_net_throttled_total",
                &[("device", id), ("direction", "rx")],
                s.rx_throttled,
            );
            e.sample(
                "vireo_net_throttled_total",
                &[("device", id), ("direction", "tx")],
                s.tx_throttled,
            );
        }
        e.family(
            "vireo_net_throttled_seconds_total",
            "Time a virtio-net direction waited for its rate limit",
            Kind::Counter,
        );
        for n in &c.nets {
            let s = &n.stats;
            let id = n.id.as_str();
            for (dir, us) in [("rx", s.rx_throttled_us), ("tx", s.tx_throttled_us)] {
                e.sample(
                    "vireo_net_throttled_seconds_total",
                    &[("device", id), ("direction", dir)],
                    us as f64 / 1e6,
                );
            }
        }
        e.family(
            "vireo_net_errors_total",
            "virtio-net backend reads and writes that failed",
            Kind::Counter,
        );
        for n in &c.nets {
            e.sample(
                "vireo_net_errors_total",
                &[("device", &n.id)],
                n.stats.errors,
            );
        }
    }

    if !c.virtio.is_empty() {
        e.family(
            "vireo_virtio_notifications_total",
            "Queue notifications from the guest's driver",
            Kind::Counter,
        );
        for v in &c.virtio {
            e.sample(
                "vireo_virtio_notifications_total",
                &[("device", &v.id), ("kind", &v.kind)],
                v.stats.notifications,
            );
        }
        e.family(
            "vireo_virtio_interrupts_total",
            "Interrupts raised toward the guest's driver",
            Kind::Counter,
        );
        for v in &c.virtio {
            e.sample(
                "vireo_virtio_interrupts_total",
                &[("device", &v.id), ("kind", &v.kind)],
                v.stats.interrupts,
            );
        }
    }
    e.finish()
}

fn block_ops(s: &BlockStats) -> [(&'static str, virtio::stats::OpStats); 4] {
    [
        ("read", s.read),
        ("write", s.write),
        ("flush", s.flush),
        ("discard", s.discard),
    ]
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Counters with every optional part present (one of each device).
    pub(crate) fn full_counters() -> VmCounters {
        let blk = BlockCounters::default();
        blk.record(0, &[], 512, 0, Duration::from_micros(20));
        let exits = ExitReason::ALL
            .iter()
            .map(|r| (r.name().to_string(), 1))
            .collect();
        VmCounters {
            state: VmState::Running,
            accel: hypervisor::AccelKind::Emu,
            uptime_ms: 1500,
            memory: MemoryReport {
                guest_bytes: 64 << 20,
                resident_bytes: Some(1 << 20),
                balloon_bytes: Some(4096),
            },
            vcpus: vec![VcpuReport {
                index: 0,
                exits,
                guest_ns: 2_000_000_000,
                vmm_ns: 5,
                cpu_ns: Some(7),
                engine: Some(EngineStats {
                    instructions: 9,
                    ..Default::default()
                }),
            }],
            disks: vec![DiskReport {
                id: "disk0".into(),
                path: "/d".into(),
                stats: blk.snapshot(),
                rate_limiter: Some(virtio::rate_limit::RateLimiterConfig {
                    bandwidth: Some(crate::config::bucket_for_rate(20 << 20)),
                    ops: Some(crate::config::bucket_for_rate(1000)),
                }),
                rate_group: Some("g".into()),
            }],
            nets: vec![NetReport {
                id: "net0".into(),
                tap: "t\"0".into(),
                mac: "52:54:00:12:34:56".into(),
                stats: NetStats {
                    tx_bytes: 3,
                    ..Default::default()
                },
                rx_rate_limiter: None,
                tx_rate_limiter: None,
                rate_group: None,
            }],
            virtio: vec![VirtioReport {
                id: "disk0".into(),
                kind: "blk".into(),
                stats: TransportStats {
                    notifications: 1,
                    interrupts: 2,
                },
            }],
            operation: Some(OperationReport {
                kind: "migration".into(),
                phase: "copy".into(),
                elapsed_ms: 1,
                done_bytes: 4096,
                round_done_bytes: 4096,
                round_total_bytes: 8192,
                sent_bytes: 4104,
                rate_bytes_per_s: 4096000,
                round: 1,
                dirty_pages: 2,
                dirty_pages_per_s: 3,
                expected_downtime_ms: Some(2),
            }),
        }
    }

    #[test]
    fn the_exposition_carries_every_family_with_its_labels() {
        let t = render_prometheus(&full_counters());
        for line in [
            "# TYPE vireo_vcpu_exits_total counter\n",
            "vireo_vcpu_exits_total{vcpu=\"0\",reason=\"mmio_write\"} 1\n",
            "vireo_vcpu_guest_seconds_total{vcpu=\"0\"} 2\n",
            "vireo_engine_instructions_total{vcpu=\"0\"} 9\n",
            "# TYPE vireo_engine_code_cache_bytes gauge\n",
            "vireo_block_bytes_total{device=\"disk0\",op=\"read\"} 512\n",
            "# TYPE vireo_block_request_duration_seconds histogram\n",
            "vireo_block_request_duration_seconds_bucket{device=\"disk0\",le=\"0.000025\"} 1\n",
            "vireo_block_request_duration_seconds_count{device=\"disk0\"} 1\n",
            "vireo_net_bytes_total{device=\"net0\",direction=\"tx\"} 3\n",
            "vireo_virtio_interrupts_total{device=\"disk0\",kind=\"blk\"} 2\n",
            "vireo_vm_balloon_bytes 4096\n",
            "vireo_vm_uptime_seconds 1.5\n",
            "vireo_vm_state{state=\"running\"} 1\n",
        ] {
            assert!(t.contains(line), "{line:?} not in\n{t}");
        }
        // Each family is announced once, before its samples.
        let types: Vec<&str> = t.lines().filter(|l| l.starts_with("# TYPE ")).collect();
        let unique: std::collections::BTreeSet<_> = types.iter().collect();
        assert_eq!(types.len(), unique.len());
    }
}
