//! Every thread a Vireo VMM starts is started here, with a [`Role`]
//! (main, vCPU N, API, device worker, console, helper): [`spawn`] records
//! the thread's host TID and role in a process-wide registry ([`list`],
//! which `vm.info` reports) and runs the setup hooks the VMM installed
//! ([`add_hook`]: seccomp filters, cgroup placement) in the new thread
//! before the thread's own work.
//!
//! Invariants:
//! - A thread's work never runs before every hook succeeded in that
//!   thread; a failing hook makes [`spawn`] fail with the hook's reason,
//!   and the work is dropped unrun.
//! - A thread is in the registry from before its hooks run until its work
//!   has returned (or unwound).
//! - Once [`start_spawner`] ran, every thread is created by one spawner
//!   thread rather than by the thread asking for it, so a new thread
//!   inherits only the spawner's seccomp filter (the union of the roles'
//!   lists), never the asking thread's: a vCPU thread that activates a
//!   device does not pass its own filter on to the device's worker.
//! - Hooks run in [`Stage`] order: placement (affinity, cgroups) before
//!   confinement (seccomp, which may forbid what placement needs).

use std::fmt;
use std::io;
use std::sync::mpsc::{self, Sender, SyncSender};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::thread::JoinHandle;

/// What a thread is for. Its seccomp allow-list and its cgroup follow
/// from it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Role {
    /// The thread that builds the VM and waits for its end.
    Main,
    /// vCPU N (its index in the VM).
    Vcpu(u32),
    /// A server's accept loop: "api" (the Unix socket) or "metrics" (TCP).
    Api(String),
    /// One API connection: it runs the request, a snapshot or a migration
    /// included.
    ApiRequest,
    /// A virtio device's queue worker, named by its device ("virtio-blk").
    Worker(String),
    /// The terminal-to-console forwarder.
    Console,
    /// A backend's helper thread ("passt-tx", "passt-wait", "passt-log",
    /// "vsock-host", "virtio-fs-irq", the engine's "emu-timer", the RTC's "rtc").
    Helper(String),
    /// The thread that creates every other one (see the module doc).
    Spawner,
    /// The gdb stub (`--gdb`): its connection, the guest's registers and
    /// memory.
    Gdb,
}

/// The kinds of [`Role`], what per-role tables (seccomp lists, cgroups)
/// are keyed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RoleKind {
    Main,
    Vcpu,
    Api,
    ApiRequest,
    Worker,
    Console,
    Helper,
    Spawner,
    Gdb,
}

impl RoleKind {
    pub const ALL: [RoleKind; 9] = [
        RoleKind::Main,
        RoleKind::Vcpu,
        RoleKind::Api,
        RoleKind::ApiRequest,
        RoleKind::Worker,
        RoleKind::Console,
        RoleKind::Helper,
        RoleKind::Spawner,
        RoleKind::Gdb,
    ];

    /// The name `vm.info` and the docs use.
    pub fn as_str(self) -> &'static str {
        match self {
            RoleKind::Main => "main",
            RoleKind::Vcpu => "vcpu",
            RoleKind::Api => "api",
            RoleKind::ApiRequest => "api-request",
            RoleKind::Worker => "worker",
            RoleKind::Console => "console",
            RoleKind::Helper => "helper",
            RoleKind::Spawner => "spawner",
            RoleKind::Gdb => "gdb",
        }
    }

    pub fn parse(s: &str) -> Option<RoleKind> {
        RoleKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for RoleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Role {
    pub fn kind(&self) -> RoleKind {
        match self {
            Role::Main => RoleKind::Main,
            Role::Vcpu(_) => RoleKind::Vcpu,
            Role::Api(_) => RoleKind::Api,
            Role::ApiRequest => RoleKind::ApiRequest,
            Role::Worker(_) => RoleKind::Worker,
            Role::Console => RoleKind::Console,
            Role::Helper(_) => RoleKind::Helper,
            Role::Spawner => RoleKind::Spawner,
            Role::Gdb => RoleKind::Gdb,
        }
    }

    /// The thread's name as the host shows it (at most 15 bytes are kept).
    pub fn thread_name(&self) -> String {
        match self {
            Role::Main => "vireo".into(),
            Role::Vcpu(i) => format!("vcpu{i}"),
            Role::Api(n) | Role::Worker(n) | Role::Helper(n) => n.clone(),
            Role::ApiRequest => "api-request".into(),
            Role::Console => "console".into(),
            Role::Spawner => "spawner".into(),
            Role::Gdb => "gdb".into(),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Role::Vcpu(i) => write!(f, "vcpu {i}"),
            // "api" or "metrics" says it all.
            Role::Api(n) => f.write_str(n),
            Role::Worker(n) | Role::Helper(n) => {
                write!(f, "{} {n}", self.kind())
            }
            _ => f.write_str(self.kind().as_str()),
        }
    }
}

/// One live thread, as `vm.info` reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ThreadInfo {
    /// The host thread id (what /proc/PID/task, taskset and cgroup.threads take).
    pub tid: u32,
    /// main, vcpu, api, api-request, worker, console, helper or spawner.
    pub role: String,
    /// The role in full: "vcpu 1", "worker virtio-blk", "helper passt-tx".
    pub name: String,
    /// The vCPU's index, for vCPU threads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu: Option<u32>,
}

impl ThreadInfo {
    fn of(tid: u32, role: &Role) -> Self {
        ThreadInfo {
            tid,
            role: role.kind().as_str().into(),
            name: role.to_string(),
            vcpu: match role {
                Role::Vcpu(i) => Some(*i),
                _ => None,
            },
        }
    }
}

/// When a hook runs among the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// Where the thread runs: CPU affinity, cgroups.
    Place,
    /// What the thread may do: seccomp. Last, as it may forbid the rest.
    Confine,
}

/// A per-thread setup step, run in the new thread; an error is the reason
/// the thread cannot run.
pub type Hook = Arc<dyn Fn(&Role) -> Result<(), String> + Send + Sync>;

static HOOKS: RwLock<Vec<(Stage, Hook)>> = RwLock::new(Vec::new());
static REGISTRY: Mutex<Vec<(u32, Role)>> = Mutex::new(Vec::new());
static SPAWNER: OnceLock<Mutex<Sender<Job>>> = OnceLock::new();

type Job = Box<dyn FnOnce() + Send>;

thread_local! {
    // The role's name for a signal handler, which may not lock or
    // allocate: fixed bytes, written once when the thread registers.
    static NAME: std::cell::Cell<([u8; 32], usize)> = const { std::cell::Cell::new(([0; 32], 0)) };
}

/// Add a per-thread setup step, run (in stage order, then in the order
/// added) at the start of every thread spawned from now on, and by
/// [`setup_current`].
pub fn add_hook(stage: Stage, hook: Hook) {
    let mut hooks = HOOKS.write().unwrap_or_else(|e| e.into_inner());
    hooks.push((stage, hook));
    hooks.sort_by_key(|(s, _)| *s);
}

/// The calling thread's host TID.
pub fn gettid() -> u32 {
    // SAFETY: gettid takes nothing and cannot fail.
    unsafe { libc::gettid() as u32 }
}

/// Every live thread the VMM started through this crate (and the main
/// thread once registered), in start order.
pub fn list() -> Vec<ThreadInfo> {
    let reg = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    reg.iter()
        .map(|(tid, role)| ThreadInfo::of(*tid, role))
        .collect()
}

/// The calling thread's role name, as bytes a signal handler may read
/// (empty for a thread that never registered). Async-signal-safe.
pub fn current_name(buf: &mut [u8; 32]) -> usize {
    NAME.with(|n| {
        let (b, len) = n.get();
        *buf = b;
        len
    })
}

fn register(tid: u32, role: &Role) {
    let name = role.to_string();
    let mut b = [0u8; 32];
    let len = name.len().min(b.len());
    b[..len].copy_from_slice(&name.as_bytes()[..len]);
    NAME.with(|n| n.set((b, len)));
    let mut reg = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    reg.retain(|(t, _)| *t != tid);
    reg.push((tid, role.clone()));
}

fn unregister(tid: u32) {
    let mut reg = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    reg.retain(|(t, _)| *t != tid);
}

/// Removes its thread from the registry when the thread's work ends,
/// unwinding included.
struct Registered(u32);

impl Drop for Registered {
    fn drop(&mut self) {
        unregister(self.0);
    }
}

fn run_hooks(role: &Role) -> Result<(), String> {
    let hooks: Vec<Hook> = {
        let h = HOOKS.read().unwrap_or_else(|e| e.into_inner());
        h.iter().map(|(_, f)| f.clone()).collect()
    };
    for hook in hooks {
        hook(role)?;
    }
    Ok(())
}

/// Register the calling thread (the one that did not come from [`spawn`],
/// i.e. the process's main thread) under `role`, without running hooks.
pub fn register_current(role: Role) {
    register(gettid(), &role);
}

/// In the child of a `fork` (which copies only the calling thread): forget
/// every thread of the parent and register the calling one under `role`.
/// For a process that forks before it starts any thread (the jail).
pub fn register_after_fork(role: Role) {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner()).clear();
    register(gettid(), &role);
}

/// Register the calling thread under `role` and run every hook in it now:
/// for the main thread, once it has done what the hooks would forbid
/// (building the VM) and before the guest runs.
pub fn setup_current(role: Role) -> Result<(), String> {
    register(gettid(), &role);
    run_hooks(&role)
}

/// Pin the calling thread to `cpus` (host CPU numbers).
pub fn pin_current(cpus: &[usize]) -> Result<(), String> {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET write inside it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        if c >= libc::CPU_SETSIZE as usize {
            return Err(format!("host CPU {c} is beyond what the kernel takes"));
        }
        // SAFETY: `c` is below CPU_SETSIZE, so the bit is inside `set`.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: sched_setaffinity reads `set` of the size given; 0 is this thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    if rc != 0 {
        return Err(format!(
            "cannot pin to host CPUs {cpus:?}: {}",
            io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// A started thread: join it, or ask whether it ended.
pub struct Handle<T> {
    join: JoinHandle<Option<T>>,
    tid: u32,
}

impl<T> Handle<T> {
    /// The thread's host TID.
    pub fn tid(&self) -> u32 {
        self.tid
    }

    /// The thread itself (to unpark it).
    pub fn thread(&self) -> &std::thread::Thread {
        self.join.thread()
    }

    pub fn is_finished(&self) -> bool {
        self.join.is_finished()
    }

    /// Wait for the thread; `Err` carries its panic.
    pub fn join(self) -> std::thread::Result<T> {
        match self.join.join() {
            Ok(Some(v)) => Ok(v),
            // A Handle exists only for a thread whose setup succeeded.
            Ok(None) => Err(Box::new("thread setup failed")),
            Err(p) => Err(p),
        }
    }
}

impl<T> fmt::Debug for Handle<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Handle(tid {})", self.tid)
    }
}

/// How a thread starts besides its role.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Pin it to these host CPUs before its hooks run.
    pub cpus: Option<Vec<usize>>,
}

/// Start `work` on a new thread playing `role` (see the module doc).
pub fn spawn<F, T>(role: Role, work: F) -> io::Result<Handle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    spawn_with(role, Options::default(), work)
}

/// [`spawn`] with [`Options`].
pub fn spawn_with<F, T>(role: Role, opts: Options, work: F) -> io::Result<Handle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<u32, String>>(1);
    let r = role.clone();
    let body = move || -> Option<T> {
        let tid = gettid();
        register(tid, &r);
        let _registered = Registered(tid);
        let setup = match &opts.cpus {
            Some(cpus) => pin_current(cpus),
            None => Ok(()),
        }
        .and_then(|()| run_hooks(&r));
        match setup {
            Ok(()) => {
                let _ = ready_tx.send(Ok(tid));
                Some(work())
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                None
            }
        }
    };
    let builder = std::thread::Builder::new().name(role.thread_name());
    let join = match SPAWNER.get() {
        None => builder.spawn(body)?,
        Some(spawner) => {
            let (jtx, jrx) = mpsc::sync_channel::<io::Result<JoinHandle<Option<T>>>>(1);
            let job: Job = Box::new(move || {
                let _ = jtx.send(builder.spawn(body));
            });
            let sent = spawner.lock().unwrap_or_else(|e| e.into_inner()).send(job);
            if sent.is_err() {
                return Err(io::Error::other("the spawner thread has ended"));
            }
            jrx.recv()
                .map_err(|_| io::Error::other("the spawner thread has ended"))??
        }
    };
    match ready_rx.recv() {
        Ok(Ok(tid)) => Ok(Handle { join, tid }),
        Ok(Err(why)) => {
            let _ = join.join();
            Err(io::Error::other(format!(
                "cannot set up the {role} thread: {why}"
            )))
        }
        Err(_) => {
            let _ = join.join();
            Err(io::Error::other(format!(
                "the {role} thread ended during its setup"
            )))
        }
    }
}

/// Start the spawner thread (its own hooks run with [`Role::Spawner`]);
/// every later [`spawn`] goes through it. Call it after the hooks are
/// added and before any thread confines itself. Calling it again does
/// nothing.
pub fn start_spawner() -> io::Result<()> {
    if SPAWNER.get().is_some() {
        return Ok(());
    }
    let (tx, rx) = mpsc::channel::<Job>();
    let (ready_tx, ready_rx): (SyncSender<Result<(), String>>, _) = mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name(Role::Spawner.thread_name())
        .spawn(move || {
            let tid = gettid();
            register(tid, &Role::Spawner);
            let _registered = Registered(tid);
            let setup = run_hooks(&Role::Spawner);
            let ok = setup.is_ok();
            let _ = ready_tx.send(setup);
            if ok {
                for job in rx {
                    job();
                }
            }
        })?;
    match ready_rx.recv() {
        Ok(Ok(())) => {
            let _ = SPAWNER.set(Mutex::new(tx));
            Ok(())
        }
        Ok(Err(why)) => Err(io::Error::other(format!(
            "cannot set up the spawner thread: {why}"
        ))),
        Err(_) => Err(io::Error::other(
            "the spawner thread ended during its setup",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_is_listed_while_it_runs_and_not_after() {
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let h = spawn(Role::Worker("virtio-test".into()), move || {
            go_rx.recv().unwrap();
            7
        })
        .unwrap();
        let tid = h.tid();
        let listed = list();
        let me = listed.iter().find(|t| t.tid == tid).expect("listed");
        assert_eq!(me.role, "worker");
        assert_eq!(me.name, "worker virtio-test");
        go_tx.send(()).unwrap();
        assert_eq!(h.join().unwrap(), 7);
        assert!(list().iter().all(|t| t.tid != tid));
    }

    #[test]
    fn role_names() {
        assert_eq!(Role::Vcpu(3).to_string(), "vcpu 3");
        assert_eq!(Role::Vcpu(3).thread_name(), "vcpu3");
        let info = ThreadInfo::of(5, &Role::Vcpu(3));
        assert_eq!(info.vcpu, Some(3));
        for k in RoleKind::ALL {
            assert_eq!(RoleKind::parse(k.as_str()), Some(k));
        }
    }
}
