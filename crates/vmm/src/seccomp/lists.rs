//! The system calls each thread role may make (docs/isolation.md says how
//! they were found and how to regenerate the evidence:
//! scripts/seccomp-trace.sh). A call absent here ends the VMM with a
//! report under `--seccomp on`; add it to the one role that needs it.

use threads::RoleKind;

/// One allowed call, with an optional condition on its arguments.
pub struct Allow {
    pub name: &'static str,
    pub only: Option<Only>,
}

/// Argument conditions, cheap enough to check on every call.
pub enum Only {
    /// ioctl whose request has one of these types (bits 8-15, the "magic"
    /// of _IOC): 0xAE KVM, b'T' terminals and tun, 0x12 block devices,
    /// 0x89 socket interface requests.
    IoctlTypes(&'static [u8]),
    /// The first argument is one of these (socket families).
    Arg0(&'static [u64]),
}

const fn any(name: &'static str) -> Allow {
    Allow { name, only: None }
}

const KVM: u8 = 0xae;
const TTY_TUN: u8 = b'T';
const BLOCK: u8 = 0x12;
const SOCK_IF: u8 = 0x89;
const UNIX_INET: &[u64] = &[
    libc::AF_UNIX as u64,
    libc::AF_INET as u64,
    libc::AF_INET6 as u64,
];

/// What every thread does: the Rust runtime (memory, locks, thread start
/// and end, signals), reading clocks, writing logs, and the SIGSYS
/// handler's own write and exit.
const COMMON: &[Allow] = &[
    any("read"),
    any("write"),
    any("writev"),
    any("close"),
    any("futex"),
    any("mmap"),
    any("munmap"),
    any("mprotect"),
    any("madvise"),
    any("brk"),
    any("mremap"),
    any("rt_sigprocmask"),
    any("rt_sigreturn"),
    any("sigaltstack"),
    any("sched_yield"),
    any("sched_getaffinity"),
    any("getrandom"),
    any("clock_gettime"),
    any("clock_nanosleep"),
    any("nanosleep"),
    any("gettid"),
    any("getpid"),
    any("exit"),
    any("exit_group"),
    any("set_robust_list"),
    any("rseq"),
    any("prctl"),
    any("poll"),
    any("ppoll"),
    any("epoll_wait"),
    any("epoll_ctl"),
    any("fcntl"),
    any("dup"),
    any("eventfd2"),
    any("lseek"),
    any("statx"),
    any("fstat"),
    any("newfstatat"),
    any("restart_syscall"),
    // Kicking a vCPU out of the guest (pause, stop, an interrupt) is a
    // signal to its thread, from whichever thread asks.
    any("tgkill"),
];

/// Calls that glibc makes from whichever thread gets there first, and
/// copes with failing. On a thread whose list lacks one, it fails with
/// EACCES (no report, the VMM runs on) instead of ending the VMM; under
/// `--seccomp log` it is let through and logged.
///
/// `openat`: malloc reads /proc/sys/vm/overcommit_memory once per process,
/// the first time a thread's own arena gives memory back
/// (`check_may_shrink_heap`). Refused, malloc returns that memory with
/// `madvise` instead of remapping it, which frees it all the same. Seen on
/// a vCPU thread after SeaBIOS and GRUB booted an installed Debian.
pub const REFUSED: &[&str] = &["openat"];

const MAIN: &[Allow] = &[
    any("readlink"),
    any("readlinkat"),
    // Waiting for the VM's end, then tearing it down.
    any("wait4"),
    any("waitid"),
    any("kill"),
    any("tgkill"),
    any("unlink"),
    any("unlinkat"),
    // Removing the VMM's cgroup (--cgroup) when it ends, and a helper
    // daemon's private socket directory (virtiofsd) as its device goes.
    any("rmdir"),
    any("getdents64"),
    any("openat"),
    any("ioctl").only_ioctl(&[KVM, TTY_TUN, BLOCK]),
    any("flock"),
    any("shutdown"),
    any("rt_sigaction"),
    any("pread64"),
    any("pwrite64"),
    any("fsync"),
    any("fdatasync"),
];

const VCPU: &[Allow] = &[
    any("ioctl").only_ioctl(&[KVM, TTY_TUN]),
    // The engine's code cache (a memfd mapped twice: executed through one
    // view, written through the other) and its timers.
    any("memfd_create"),
    any("ftruncate"),
    any("pread64"),
    any("pwrite64"),
    any("preadv"),
    any("pwritev"),
    any("fsync"),
    any("fdatasync"),
    any("rt_sigaction"),
    any("tgkill"),
    any("timerfd_create"),
    any("timerfd_settime"),
    // A vhost-user device (virtio-fs) is set up when the guest's driver
    // writes DRIVER_OK: the vCPU sends virtiofsd its memory table and
    // rings, fds attached.
    any("sendmsg"),
    any("recvmsg"),
];

const WORKER: &[Allow] = &[
    any("ioctl").only_ioctl(&[KVM, TTY_TUN, BLOCK]),
    any("readv"),
    any("pread64"),
    any("pwrite64"),
    any("preadv"),
    any("pwritev"),
    any("preadv2"),
    any("pwritev2"),
    any("fsync"),
    any("fdatasync"),
    any("fallocate"),
    any("ftruncate"),
    any("flock"),
    any("sendto"),
    any("sendmsg"),
    any("recvfrom"),
    any("recvmsg"),
    any("socket").only_arg0(UNIX_INET),
    any("connect"),
    any("shutdown"),
    // Rate limiters wait for tokens on a timerfd.
    any("timerfd_create"),
    any("timerfd_settime"),
    any("timerfd_gettime"),
];

const API: &[Allow] = &[
    any("accept4"),
    any("accept"),
    any("shutdown"),
    any("setsockopt"),
    any("getsockopt"),
    any("recvfrom"),
    any("sendto"),
];

/// An API request runs snapshots and migrations: files, directories,
/// TCP, the backend's state.
const API_REQUEST: &[Allow] = &[
    any("ioctl").only_ioctl(&[KVM, TTY_TUN, BLOCK]),
    any("openat"),
    any("mkdir"),
    any("mkdirat"),
    any("unlink"),
    any("unlinkat"),
    any("rename"),
    any("renameat"),
    any("renameat2"),
    any("getdents64"),
    any("pread64"),
    any("pwrite64"),
    any("preadv"),
    any("pwritev"),
    any("fsync"),
    any("fdatasync"),
    any("ftruncate"),
    any("fallocate"),
    any("fchmod"),
    any("flock"),
    any("readv"),
    any("socket").only_arg0(UNIX_INET),
    any("connect"),
    any("bind"),
    any("listen"),
    any("getsockname"),
    any("getpeername"),
    any("setsockopt"),
    any("getsockopt"),
    any("shutdown"),
    any("sendto"),
    any("sendmsg"),
    any("recvfrom"),
    any("recvmsg"),
    any("getuid"),
    any("geteuid"),
    // A migration names its disks by /proc/self/fd links.
    any("readlink"),
    any("readlinkat"),
    // A rate limit changed live re-arms the device's token timer.
    any("timerfd_settime"),
    any("timerfd_gettime"),
];

const CONSOLE: &[Allow] = &[any("ioctl").only_ioctl(&[TTY_TUN])];

/// passt's helpers (its log, its exit, its frames) and vsock's host side.
const HELPER: &[Allow] = &[
    any("wait4"),
    any("waitid"),
    any("kill"),
    any("sendto"),
    any("sendmsg"),
    any("recvfrom"),
    any("recvmsg"),
    any("accept4"),
    any("socket").only_arg0(UNIX_INET),
    any("connect"),
    any("shutdown"),
    any("getsockopt"),
    any("setsockopt"),
    // SOCK_IF: interface requests; TTY_TUN's type also holds FIONBIO,
    // which std's set_nonblocking uses (vsock-host on an accepted stream).
    any("ioctl").only_ioctl(&[SOCK_IF, TTY_TUN]),
];

/// The spawner only creates threads (its filter adds every other list)
/// and lets each new thread install its own filter.
/// A new thread pins itself (sched_setaffinity) under this filter too.
const SPAWNER: &[Allow] = &[
    any("clone"),
    any("clone3"),
    any("seccomp"),
    any("sched_setaffinity"),
];

impl Allow {
    const fn only_ioctl(self, types: &'static [u8]) -> Allow {
        Allow {
            name: self.name,
            only: Some(Only::IoctlTypes(types)),
        }
    }

    const fn only_arg0(self, values: &'static [u64]) -> Allow {
        Allow {
            name: self.name,
            only: Some(Only::Arg0(values)),
        }
    }
}

/// Everything a thread of `kind` may call: the common list and its own.
pub fn for_role(kind: RoleKind) -> impl Iterator<Item = &'static Allow> {
    let (own, more): (&'static [Allow], &'static [Allow]) = match kind {
        RoleKind::Main => (MAIN, &[]),
        RoleKind::Vcpu => (VCPU, &[]),
        RoleKind::Worker => (WORKER, &[]),
        RoleKind::Api => (API, &[]),
        RoleKind::ApiRequest => (API_REQUEST, &[]),
        RoleKind::Console => (CONSOLE, &[]),
        RoleKind::Helper => (HELPER, &[]),
        RoleKind::Spawner => (SPAWNER, &[]),
        // The gdb stub serves a TCP connection and reads and sets the
        // guest's state, as an API request does.
        RoleKind::Gdb => (API, API_REQUEST),
    };
    COMMON.iter().chain(own.iter()).chain(more.iter())
}
