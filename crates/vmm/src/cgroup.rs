//! cgroup v2: the VMM in a cgroup of its own, with CPU and memory limits.
//!
//! `vireo run --cgroup PARENT` makes `PARENT/vireo-PID`, writes the limits
//! given (`cpu.max`, `cpu.weight`, `memory.max`, `memory.high`) and moves
//! the whole process into it before the VM is built, so guest RAM is
//! charged to it from the first page. Inside, two threaded sub-groups
//! split the CPU: `vcpus` (each vCPU thread moves itself there when it
//! starts, through the `threads` crate's placement hook) and `vmm` (every
//! other thread: the main thread, device workers, the API), the latter with 100 times the former's `cpu.weight`, so that
//! within the VM's quota the threads doing its I/O run first and a guest
//! spinning its vCPUs cannot starve its own disk and network.
//!
//! Invariants:
//! - The cgroup is made and entered once per process, before any vCPU
//!   thread starts; [`CgroupGuard`] moves the process back where it came
//!   from and removes the cgroup (sub-groups first) when the VMM ends.
//!   A VMM killed with SIGKILL leaves an empty cgroup its parent's owner
//!   can remove.
//! - Every failure names the file and what was being done, and says what
//!   the user can change: no cgroup v2 mounted, a parent that does not
//!   exist, a controller not enabled, no permission, a parent that holds
//!   processes itself (cgroup v2's no-internal-process rule).
//! - A failed start leaves nothing behind: the cgroup made so far is
//!   removed and the process stays where it was.
//!
//! Hybrid hosts (cgroup v2 mounted beside v1, with the cpu controller
//! bound to v1) get a fallback with the same meaning: when cgroup v2 has
//! no cpu controller, a v1 hierarchy has it and no memory limit is asked
//! for, the cgroup is made in the v1 cpu hierarchy (`PARENT` resolved
//! under its mount), `cpu.max` written as `cpu.cfs_period_us` and
//! `cpu.cfs_quota_us` (the same CFS bandwidth control), `cpu.weight` as
//! `cpu.shares` (weight × 1024 / 100: the defaults correspond), with the
//! `vcpus` and `vmm` sub-groups as plain v1 groups (v1 places threads
//! anywhere, through `tasks`). Memory limits there are refused.

use std::fmt;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// The default `cpu.max` period, as the kernel's.
pub const DEFAULT_PERIOD_US: u64 = 100_000;
/// `cpu.weight` of the `vcpus` and `vmm` sub-groups.
const VCPU_WEIGHT: u32 = 100;
const VMM_WEIGHT: u32 = 10_000;

/// `cpu.max`: at most `quota_us` of CPU time every `period_us` (`quota_us`
/// null: no quota). On the command line `150%` (one and a half CPUs),
/// `50000/100000` (quota/period in µs) or `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuMax {
    pub quota_us: Option<u64>,
    #[serde(default = "default_period")]
    pub period_us: u64,
}

fn default_period() -> u64 {
    DEFAULT_PERIOD_US
}

impl CpuMax {
    /// The period the kernel accepts (1 ms to 1 s) and a quota of at
    /// least 1 ms.
    pub fn validate(&self) -> Result<(), String> {
        if !(1_000..=1_000_000).contains(&self.period_us) {
            return Err(format!(
                "cpu.max period {} µs is outside 1000-1000000",
                self.period_us
            ));
        }
        if self.quota_us.is_some_and(|q| q < 1_000) {
            return Err("cpu.max quota must be at least 1000 µs (1% of a CPU)".into());
        }
        Ok(())
    }

    fn file_value(&self) -> String {
        match self.quota_us {
            Some(q) => format!("{q} {}", self.period_us),
            None => format!("max {}", self.period_us),
        }
    }
}

impl FromStr for CpuMax {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let bad = || format!("bad CPU limit '{s}' (examples: 150%, 50000/100000, max)");
        let c = if t == "max" {
            CpuMax {
                quota_us: None,
                period_us: DEFAULT_PERIOD_US,
            }
        } else if let Some(p) = t.strip_suffix('%') {
            let pct: u64 = p.trim().parse().map_err(|_| bad())?;
            CpuMax {
                quota_us: Some(pct * DEFAULT_PERIOD_US / 100),
                period_us: DEFAULT_PERIOD_US,
            }
        } else if let Some((q, p)) = t.split_once('/') {
            CpuMax {
                quota_us: Some(q.trim().parse().map_err(|_| bad())?),
                period_us: p.trim().parse().map_err(|_| bad())?,
            }
        } else {
            return Err(bad());
        };
        c.validate()?;
        Ok(c)
    }
}

/// `memory.max` / `memory.high`: bytes, or no limit (`"max"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryLimit {
    Max,
    Bytes(u64),
}

impl MemoryLimit {
    fn file_value(&self) -> String {
        match self {
            MemoryLimit::Max => "max".into(),
            MemoryLimit::Bytes(b) => b.to_string(),
        }
    }
}

impl FromStr for MemoryLimit {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim() == "max" {
            return Ok(MemoryLimit::Max);
        }
        s.parse::<crate::config::MemSize>()
            .map(|m| MemoryLimit::Bytes(m.0))
            .map_err(|e| format!("{e}, or max"))
    }
}

impl Serialize for MemoryLimit {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            MemoryLimit::Max => s.serialize_str("max"),
            MemoryLimit::Bytes(b) => s.serialize_u64(*b),
        }
    }
}

impl<'de> Deserialize<'de> for MemoryLimit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(MemoryLimit::Bytes(n)),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// The limits of the VMM's cgroup; a field left out is not changed (at
/// start: the kernel's default, no limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CgroupLimits {
    /// `cpu.max` of the whole VMM.
    #[serde(default)]
    pub cpu_max: Option<CpuMax>,
    /// `cpu.weight` (1-10000, the kernel's default 100): the VMM's share
    /// against its siblings under the parent.
    #[serde(default)]
    pub cpu_weight: Option<u32>,
    /// `memory.max`: the hard limit (guest RAM counts as it is touched).
    #[serde(default)]
    pub memory_max: Option<MemoryLimit>,
    /// `memory.high`: where the kernel starts reclaiming and throttling.
    #[serde(default)]
    pub memory_high: Option<MemoryLimit>,
}

impl CgroupLimits {
    pub fn validate(&self) -> Result<(), CgroupError> {
        if let Some(c) = &self.cpu_max {
            c.validate().map_err(CgroupError::Invalid)?;
        }
        if let Some(w) = self.cpu_weight {
            if !(1..=10_000).contains(&w) {
                return Err(CgroupError::Invalid(format!(
                    "cpu.weight {w} is outside 1-10000"
                )));
            }
        }
        Ok(())
    }

    fn needs_memory(&self) -> bool {
        self.memory_max.is_some() || self.memory_high.is_some()
    }

    /// (file, value) pairs to write in the cgroup v1 fallback: `cpu.max`
    /// as the CFS period and quota, `cpu.weight` as `cpu.shares`; v1 has
    /// no memory.high, and the fallback takes no memory controller.
    fn files_v1(&self) -> Result<Vec<(&'static str, String)>, CgroupError> {
        if self.needs_memory() {
            return Err(CgroupError::Invalid(
                "memory limits need cgroup v2's memory controller; this VMM's cgroup is in cgroup v1's cpu hierarchy (the fallback on hosts whose cgroup v2 has no cpu controller)".into(),
            ));
        }
        let mut f = Vec::new();
        if let Some(c) = &self.cpu_max {
            f.push(("cpu.cfs_period_us", c.period_us.to_string()));
            let quota = c.quota_us.map_or("-1".to_string(), |q| q.to_string());
            f.push(("cpu.cfs_quota_us", quota));
        }
        if let Some(w) = self.cpu_weight {
            f.push(("cpu.shares", shares_of_weight(w).to_string()));
        }
        Ok(f)
    }

    /// (file, value) pairs to write.
    fn files(&self) -> Vec<(&'static str, String)> {
        let mut f = Vec::new();
        if let Some(c) = &self.cpu_max {
            f.push(("cpu.max", c.file_value()));
        }
        if let Some(w) = self.cpu_weight {
            f.push(("cpu.weight", w.to_string()));
        }
        if let Some(m) = &self.memory_max {
            f.push(("memory.max", m.file_value()));
        }
        if let Some(m) = &self.memory_high {
            f.push(("memory.high", m.file_value()));
        }
        f
    }
}

/// What `vireo run --cgroup` asks for.
#[derive(Debug, Clone, Default)]
pub struct CgroupOptions {
    /// The parent cgroup: a path inside the cgroup v2 hierarchy (`/vms`)
    /// or a path under its mount point (`/sys/fs/cgroup/vms`).
    pub parent: PathBuf,
    pub limits: CgroupLimits,
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup v2 hierarchy is mounted (/proc/self/mountinfo lists no cgroup2): --cgroup needs cgroup v2")]
    NoCgroup2,
    #[error("cgroup {0} does not exist (create it, or name an existing one)")]
    ParentMissing(PathBuf),
    #[error("the {controller} controller is not available in cgroup {}: {hint}", parent.display())]
    ControllerMissing {
        controller: &'static str,
        parent: PathBuf,
        /// What to do about it.
        hint: String,
    },
    #[error("no permission to {op} {} (run as root, or have the parent cgroup delegated to this user)", path.display())]
    Permission { op: &'static str, path: PathBuf },
    #[error("cgroup {} holds processes itself, so it cannot hand controllers to sub-groups (cgroup v2's no-internal-process rule): name a parent with no processes of its own", path.display())]
    InternalProcesses { path: PathBuf },
    #[error("cgroup {} already exists (another VMM with this process id?): remove it", path.display())]
    Exists { path: PathBuf },
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid cgroup limit: {0}")]
    Invalid(String),
    #[error("this VMM runs in no cgroup of its own (start it with --cgroup PARENT)")]
    NotInCgroup,
}

fn io_err(op: &'static str, path: &Path, e: std::io::Error) -> CgroupError {
    match e.kind() {
        ErrorKind::PermissionDenied => CgroupError::Permission {
            op,
            path: path.into(),
        },
        _ => CgroupError::Io {
            op,
            path: path.into(),
            source: e,
        },
    }
}

fn write(path: &Path, value: &str, op: &'static str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|e| io_err(op, path, e))
}

fn read(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(|e| io_err("read", path, e))
}

/// The cgroup hierarchies mounted here.
struct Mounts {
    /// cgroup v2's mount point.
    v2: Option<PathBuf>,
    /// Controllers bound to cgroup v1 hierarchies.
    v1: Vec<String>,
    /// The mount point of the v1 hierarchy holding the cpu controller.
    v1_cpu: Option<PathBuf>,
}

/// Where cgroup v2 is mounted, and where controllers are bound to v1.
fn mounts() -> Result<Mounts, CgroupError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| io_err("read", Path::new("/proc/self/mountinfo"), e))?;
    let mut v2 = None;
    let mut v1 = Vec::new();
    let mut v1_cpu = None;
    for line in text.lines() {
        // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mut r = right.split_whitespace();
        let fstype = r.next().unwrap_or("");
        let point = left.split_whitespace().nth(4).unwrap_or("");
        match fstype {
            "cgroup2" if v2.is_none() => v2 = Some(PathBuf::from(point)),
            "cgroup" => {
                let super_opts = r.nth(1).unwrap_or("");
                if v1_cpu.is_none() && super_opts.split(',').any(|o| o == "cpu") {
                    v1_cpu = Some(PathBuf::from(point));
                }
                v1.extend(super_opts.split(',').map(str::to_string));
            }
            _ => {}
        }
    }
    Ok(Mounts { v2, v1, v1_cpu })
}

/// `parent` as a path on the host: under `mount` unless it already is.
fn resolve(mount: &Path, parent: &Path) -> PathBuf {
    let p = if parent.starts_with(mount) {
        parent.to_path_buf()
    } else {
        mount.join(parent.strip_prefix("/").unwrap_or(parent))
    };
    // Without a trailing slash, so it compares equal to the mount point.
    p.components().collect()
}

/// The process's own cgroup (the `0::` line of /proc/self/cgroup).
fn own_cgroup(mount: &Path) -> Result<PathBuf, CgroupError> {
    let text = read(Path::new("/proc/self/cgroup"))?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("/");
    Ok(resolve(mount, Path::new(rel)))
}

/// The process's own cgroup in the v1 hierarchy of the cpu controller
/// (the `N:...cpu...:PATH` line of /proc/self/cgroup).
fn own_cgroup_v1_cpu(mount: &Path) -> Result<PathBuf, CgroupError> {
    let text = read(Path::new("/proc/self/cgroup"))?;
    let rel = text
        .lines()
        .find_map(|l| {
            let mut f = l.splitn(3, ':');
            let _id = f.next()?;
            let controllers = f.next()?;
            let path = f.next()?;
            controllers.split(',').any(|c| c == "cpu").then_some(path)
        })
        .unwrap_or("/");
    Ok(resolve(mount, Path::new(rel)))
}

/// cgroup v1's `cpu.shares` for a cgroup v2 `cpu.weight` (the kernel's
/// defaults, 1024 and 100, correspond).
fn shares_of_weight(weight: u32) -> u64 {
    (u64::from(weight) * 1024 / 100).max(2)
}

fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// The VMM's cgroup while it is in it.
#[derive(Debug)]
pub struct VmCgroup {
    dir: PathBuf,
    original: PathBuf,
    limits: Mutex<CgroupLimits>,
    /// In cgroup v1's cpu hierarchy (the fallback where cgroup v2 has no
    /// cpu controller), not cgroup v2.
    v1: bool,
}

/// Which sub-group a thread belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadRole {
    Vcpu,
    Other,
}

impl VmCgroup {
    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn group(&self, role: ThreadRole) -> PathBuf {
        self.dir.join(match role {
            ThreadRole::Vcpu => "vcpus",
            ThreadRole::Other => "vmm",
        })
    }

    /// The limits in force (as last written).
    pub fn limits(&self) -> CgroupLimits {
        *self.limits.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether this is the cgroup v1 fallback (see the module doc).
    pub fn is_v1(&self) -> bool {
        self.v1
    }

    /// The file a thread's TID is written to, to move it into `role`'s
    /// sub-group.
    fn threads_file(&self, role: ThreadRole) -> PathBuf {
        self.group(role)
            .join(if self.v1 { "tasks" } else { "cgroup.threads" })
    }

    /// Write new limits; fields left out stay. All are checked first.
    pub fn update(&self, new: &CgroupLimits) -> Result<(), CgroupError> {
        new.validate()?;
        let files = if self.v1 {
            new.files_v1()?
        } else {
            new.files()
        };
        for (file, value) in files {
            write(&self.dir.join(file), &value, "write")?;
        }
        let mut l = self.limits.lock().unwrap_or_else(|e| e.into_inner());
        l.cpu_max = new.cpu_max.or(l.cpu_max);
        l.cpu_weight = new.cpu_weight.or(l.cpu_weight);
        l.memory_max = new.memory_max.or(l.memory_max);
        l.memory_high = new.memory_high.or(l.memory_high);
        Ok(())
    }

    fn remove(&self) {
        for sub in ["vcpus", "vmm", ""] {
            let p = if sub.is_empty() {
                self.dir.clone()
            } else {
                self.dir.join(sub)
            };
            if let Err(e) = std::fs::remove_dir(&p) {
                if e.kind() != ErrorKind::NotFound {
                    tracing::warn!("cannot remove cgroup {}: {e}", p.display());
                }
            }
        }
    }
}

static CURRENT: Mutex<Option<Arc<VmCgroup>>> = Mutex::new(None);

/// The VMM's cgroup, if it was started with one.
pub fn current() -> Option<Arc<VmCgroup>> {
    CURRENT.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Put the calling thread in its role's sub-group (nothing without a
/// cgroup). Run for every new thread by the `threads` crate's placement
/// hook (see [`enter`]), so a thread that cannot be placed does not start.
pub fn place_current_thread(role: ThreadRole) -> Result<(), CgroupError> {
    match current() {
        Some(cg) => {
            let file = cg.threads_file(role);
            write(&file, &gettid().to_string(), "move a thread into")
        }
        None => Ok(()),
    }
}

/// The placement hook, added once: vCPU threads to `vcpus`, every other
/// thread to `vmm`.
fn add_placement_hook() {
    static ADDED: std::sync::Once = std::sync::Once::new();
    ADDED.call_once(|| {
        threads::add_hook(
            threads::Stage::Place,
            Arc::new(|role: &threads::Role| {
                let r = match role {
                    threads::Role::Vcpu(_) => ThreadRole::Vcpu,
                    _ => ThreadRole::Other,
                };
                place_current_thread(r).map_err(|e| e.to_string())
            }),
        );
    });
}

/// Removes the cgroup when the VMM ends (see the module doc).
#[must_use = "the cgroup is left when the guard drops"]
pub struct CgroupGuard(Arc<VmCgroup>);

impl CgroupGuard {
    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let back = self.0.original.join("cgroup.procs");
        if let Err(e) = write(
            &back,
            &std::process::id().to_string(),
            "move the VMM back into",
        ) {
            tracing::warn!("{e}; cgroup {} stays", self.0.dir.display());
            return;
        }
        self.0.remove();
    }
}

/// Make the VMM's cgroup under `opts.parent` and move the process into it.
pub fn enter(opts: &CgroupOptions) -> Result<CgroupGuard, CgroupError> {
    opts.limits.validate()?;
    let Mounts { v2, v1, v1_cpu } = mounts()?;
    // cgroup v1's cpu controller when cgroup v2 cannot have it (hybrid
    // hosts) and no memory limit is asked for (see the module doc).
    let v2_has_cpu = v2.as_ref().is_some_and(|m| {
        std::fs::read_to_string(m.join("cgroup.controllers"))
            .is_ok_and(|c| c.split_whitespace().any(|x| x == "cpu"))
    });
    if let (false, Some(v1_mount), false) = (v2_has_cpu, &v1_cpu, opts.limits.needs_memory()) {
        return enter_v1(opts, v1_mount);
    }
    let mount = v2.ok_or(CgroupError::NoCgroup2)?;
    let parent = resolve(&mount, &opts.parent);
    if !parent.join("cgroup.controllers").is_file() {
        return Err(CgroupError::ParentMissing(parent));
    }
    let available = read(&parent.join("cgroup.controllers"))?;
    let mut wanted = vec!["cpu"];
    if opts.limits.needs_memory() {
        wanted.push("memory");
    }
    for c in &wanted {
        if !available.split_whitespace().any(|a| a == *c) {
            let hint = if v1.iter().any(|x| x == c) {
                "this host binds it to a cgroup v1 hierarchy, so cgroup v2 cannot use it (boot with systemd.unified_cgroup_hierarchy=1)".to_string()
            } else if parent == mount {
                "the kernel offers it to no cgroup v2 hierarchy here".to_string()
            } else {
                let up = parent
                    .parent()
                    .unwrap_or(&mount)
                    .join("cgroup.subtree_control");
                format!("enable it in its parent: echo +{c} > {}", up.display())
            };
            return Err(CgroupError::ControllerMissing {
                controller: c,
                parent,
                hint,
            });
        }
    }
    let control = parent.join("cgroup.subtree_control");
    let enabled = read(&control)?;
    for c in &wanted {
        if enabled.split_whitespace().any(|a| a == *c) {
            continue;
        }
        std::fs::write(&control, format!("+{c}")).map_err(|e| match e.raw_os_error() {
            Some(libc::EBUSY) => CgroupError::InternalProcesses {
                path: parent.clone(),
            },
            _ => io_err("enable controllers in", &control, e),
        })?;
    }
    let original = own_cgroup(&mount)?;
    create(&parent, original, false, &opts.limits)
}

/// Made as a cgroup of `opts.parent` in cgroup v1's cpu hierarchy
/// mounted at `mount`: the same layout, limits through the v1 files.
fn enter_v1(opts: &CgroupOptions, mount: &Path) -> Result<CgroupGuard, CgroupError> {
    let parent = resolve(mount, &opts.parent);
    if !parent.join("tasks").is_file() {
        return Err(CgroupError::ParentMissing(parent));
    }
    let original = own_cgroup_v1_cpu(mount)?;
    create(&parent, original, true, &opts.limits)
}

/// Make the VMM's cgroup (`vireo-<pid>` under `parent`), fill it with
/// `limits`, the process and its sub-groups (cgroup v1's layout when
/// `v1`), and keep it with its placement hook; or, when filling it fails,
/// move the process back to `original` and leave nothing behind.
fn create(
    parent: &Path,
    original: PathBuf,
    v1: bool,
    limits: &CgroupLimits,
) -> Result<CgroupGuard, CgroupError> {
    let dir = parent.join(format!("vireo-{}", std::process::id()));
    std::fs::create_dir(&dir).map_err(|e| match e.kind() {
        ErrorKind::AlreadyExists => CgroupError::Exists { path: dir.clone() },
        _ => io_err("create", &dir, e),
    })?;
    if v1 {
        tracing::info!(
            "cgroup v2 has no cpu controller here: using cgroup v1's cpu hierarchy ({})",
            dir.display()
        );
    }
    let cg = Arc::new(VmCgroup {
        dir,
        original,
        limits: Mutex::new(CgroupLimits::default()),
        v1,
    });
    let populated = if v1 {
        populate_v1(&cg, limits)
    } else {
        populate(&cg, limits)
    };
    match populated {
        Ok(()) => {
            *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = Some(cg.clone());
            add_placement_hook();
            Ok(CgroupGuard(cg))
        }
        Err(e) => {
            // Back where it was, then nothing left behind.
            let _ = std::fs::write(
                cg.original.join("cgroup.procs"),
                std::process::id().to_string(),
            );
            cg.remove();
            Err(e)
        }
    }
}

/// Every thread of the process so far into `file` (a sub-group's).
fn move_threads(file: &Path) -> Result<(), CgroupError> {
    let tasks = std::fs::read_dir("/proc/self/task")
        .map_err(|e| io_err("list", Path::new("/proc/self/task"), e))?;
    for t in tasks.flatten() {
        let tid = t.file_name().to_string_lossy().into_owned();
        match std::fs::write(file, &tid) {
            Ok(()) => {}
            // A thread that ended meanwhile.
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            Err(e) => return Err(io_err("move a thread into", file, e)),
        }
    }
    Ok(())
}

/// What [`populate`] and [`populate_v1`] begin with: the limits, the
/// process moved in, and the `vcpus` and `vmm` sub-groups made, each then
/// set up by `setup` (given its path and its weight).
fn begin_populate(
    cg: &VmCgroup,
    limits: &CgroupLimits,
    setup: impl Fn(&Path, u32) -> Result<(), CgroupError>,
) -> Result<(), CgroupError> {
    cg.update(limits)?;
    write(
        &cg.dir.join("cgroup.procs"),
        &std::process::id().to_string(),
        "move the VMM into",
    )?;
    for (sub, weight) in [("vcpus", VCPU_WEIGHT), ("vmm", VMM_WEIGHT)] {
        let p = cg.dir.join(sub);
        std::fs::create_dir(&p).map_err(|e| io_err("create", &p, e))?;
        setup(&p, weight)?;
    }
    Ok(())
}

/// The v1 fallback's [`populate`]: v1 groups hold threads anywhere, so
/// the sub-groups are plain ones, weighted through `cpu.shares`.
fn populate_v1(cg: &VmCgroup, limits: &CgroupLimits) -> Result<(), CgroupError> {
    begin_populate(cg, limits, |p, weight| {
        write(
            &p.join("cpu.shares"),
            &shares_of_weight(weight).to_string(),
            "write",
        )
    })?;
    move_threads(&cg.threads_file(ThreadRole::Other))
}

/// Limits, the process, the threaded sub-groups and every thread so far.
fn populate(cg: &VmCgroup, limits: &CgroupLimits) -> Result<(), CgroupError> {
    begin_populate(cg, limits, |p, _| {
        write(&p.join("cgroup.type"), "threaded", "make threaded")
    })?;
    // Weights need the controller, enabled once both sub-groups exist.
    write(
        &cg.dir.join("cgroup.subtree_control"),
        "+cpu",
        "enable the cpu controller in",
    )?;
    for (sub, weight) in [("vcpus", VCPU_WEIGHT), ("vmm", VMM_WEIGHT)] {
        write(
            &cg.dir.join(sub).join("cpu.weight"),
            &weight.to_string(),
            "write",
        )?;
    }
    move_threads(&cg.threads_file(ThreadRole::Other))
}

impl fmt::Display for CpuMax {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file_value())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_limits_parse() {
        let c: CpuMax = "150%".parse().unwrap();
        assert_eq!((c.quota_us, c.period_us), (Some(150_000), 100_000));
        assert_eq!(c.file_value(), "150000 100000");
        let c: CpuMax = "25000/50000".parse().unwrap();
        assert_eq!(c.file_value(), "25000 50000");
        assert_eq!("max".parse::<CpuMax>().unwrap().file_value(), "max 100000");
        assert!("lots".parse::<CpuMax>().is_err());
        assert!("0%"
            .parse::<CpuMax>()
            .unwrap_err()
            .contains("at least 1000"));
        assert!("10/10".parse::<CpuMax>().unwrap_err().contains("period"));
    }

    #[test]
    fn memory_limits_parse_and_serialize() {
        assert_eq!("1G".parse(), Ok(MemoryLimit::Bytes(1 << 30)));
        assert_eq!("max".parse(), Ok(MemoryLimit::Max));
        let l: CgroupLimits =
            serde_json::from_str(r#"{"memory_max":"512M","memory_high":1048576,"cpu_weight":50}"#)
                .unwrap();
        assert_eq!(l.memory_max, Some(MemoryLimit::Bytes(512 << 20)));
        assert_eq!(l.memory_high, Some(MemoryLimit::Bytes(1 << 20)));
        let files = l.files();
        assert!(files.contains(&("memory.max", "536870912".into())));
        assert!(files.contains(&("cpu.weight", "50".into())));
        let e = CgroupLimits {
            cpu_weight: Some(0),
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("cpu.weight 0"), "{e}");
        assert!(serde_json::from_str::<CgroupLimits>(r#"{"memory_max":"lots"}"#).is_err());
    }

    #[test]
    fn v1_files_carry_the_same_limits() {
        let l = CgroupLimits {
            cpu_max: Some("50%".parse().unwrap()),
            cpu_weight: Some(100),
            ..Default::default()
        };
        assert_eq!(
            l.files_v1().unwrap(),
            [
                ("cpu.cfs_period_us", "100000".to_string()),
                ("cpu.cfs_quota_us", "50000".to_string()),
                ("cpu.shares", "1024".to_string()),
            ]
        );
        let unlimited = CgroupLimits {
            cpu_max: Some("max".parse().unwrap()),
            ..Default::default()
        };
        assert!(unlimited
            .files_v1()
            .unwrap()
            .contains(&("cpu.cfs_quota_us", "-1".to_string())));
        assert_eq!(shares_of_weight(10_000), 102_400);
        assert_eq!(shares_of_weight(1), 10);
        let memory = CgroupLimits {
            memory_max: Some(MemoryLimit::Bytes(1 << 30)),
            ..Default::default()
        };
        let e = memory.files_v1().unwrap_err();
        assert!(e.to_string().contains("need cgroup v2's memory"), "{e}");
    }

    #[test]
    fn parents_resolve_under_the_mount() {
        let m = Path::new("/sys/fs/cgroup");
        assert_eq!(resolve(m, Path::new("/vms")), m.join("vms"));
        assert_eq!(resolve(m, Path::new("vms/a")), m.join("vms/a"));
        assert_eq!(resolve(m, &m.join("vms")), m.join("vms"));
    }

    #[test]
    fn a_missing_parent_is_named() {
        if !mounts().is_ok_and(|m| m.v2.is_some() || m.v1_cpu.is_some()) {
            eprintln!("note: no cgroup hierarchy with cpu mounted here; parent check skipped");
            return;
        }
        let e = enter(&CgroupOptions {
            parent: "/vireo-no-such-parent".into(),
            limits: CgroupLimits::default(),
        })
        .err()
        .unwrap();
        assert!(
            e.to_string()
                .contains("vireo-no-such-parent does not exist"),
            "{e}"
        );
    }
}
