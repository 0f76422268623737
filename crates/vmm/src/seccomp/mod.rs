//! seccomp-bpf on every VMM thread (docs/isolation.md): an allow-list per
//! thread role ([`lists`]), compiled with the rust-vmm `seccompiler` crate
//! and installed by a `threads` hook at the start of every thread, and on
//! the main thread once the VM is built ([`confine_main`]), before the
//! guest runs its first instruction.
//!
//! Invariants:
//! - `--seccomp on` (the default): a call outside the thread's list is
//!   trapped (SIGSYS); the handler writes one line naming the call and
//!   the thread, with async-signal-safe calls only (`write`, `_exit`,
//!   which every list allows), and ends the process with status
//!   128 + SIGSYS = 159. No forbidden call is ever silently refused.
//! - `--seccomp log`: the same filters, but a call outside the list is
//!   allowed and the kernel logs it (audit, `dmesg`), for diagnosis.
//! - `--seccomp off`: no filter, no handler.
//! - Filters only narrow: a thread's filter is the intersection of its
//!   own list and its creator's. New threads come from the spawner thread
//!   (`threads::start_spawner`), whose list is the union of all the roles'
//!   lists, so each thread ends up with exactly its own list.

use std::collections::BTreeMap;
use std::convert::TryInto;
use std::str::FromStr;
use std::sync::Arc;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use threads::{Role, RoleKind, Stage};

use crate::VmmError;

pub mod lists;
pub mod names;

/// The exit status of a VMM that made a forbidden system call.
pub const EXIT_FORBIDDEN: i32 = 128 + libc::SIGSYS;

/// `--seccomp on|log|off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompMode {
    /// Forbidden calls end the VMM with a report.
    #[default]
    On,
    /// Forbidden calls are allowed and logged by the kernel (the audit
    /// log: `dmesg` shows `type=1326 ... comm="THREAD" ... syscall=N`).
    Log,
    /// No filters.
    Off,
}

impl FromStr for SeccompMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" => Ok(SeccompMode::On),
            "log" => Ok(SeccompMode::Log),
            "off" => Ok(SeccompMode::Off),
            _ => Err(format!(
                "unknown seccomp mode '{s}' (expected on, log or off)"
            )),
        }
    }
}

/// How the VMM filters its threads.
#[derive(Debug, Clone, Default)]
pub struct SeccompSettings {
    pub mode: SeccompMode,
    /// Test only: a thread of this role makes a forbidden call right after
    /// its filter is installed (the `vireo` binary takes it from
    /// VIREO_TEST_FORBIDDEN_SYSCALL).
    pub test_forbidden: Option<RoleKind>,
}

/// The filter for threads of `kind` under `mode`.
pub fn compile(kind: RoleKind, mode: SeccompMode) -> Result<BpfProgram, String> {
    let mismatch = match mode {
        SeccompMode::Log => SeccompAction::Log,
        _ => SeccompAction::Trap,
    };
    let allows: Vec<&lists::Allow> = match kind {
        RoleKind::Spawner => RoleKind::ALL
            .iter()
            .filter(|k| **k != RoleKind::Spawner)
            .flat_map(|k| lists::for_role(*k))
            .chain(lists::for_role(RoleKind::Spawner))
            .collect(),
        k => lists::for_role(k).collect(),
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    // A call allowed unconditionally anywhere in the list stays so.
    let mut unconditional = std::collections::BTreeSet::new();
    for a in allows {
        let nr = names::number(a.name)
            .ok_or_else(|| format!("the {kind} list names an unknown system call '{}'", a.name))?;
        if unconditional.contains(&nr) {
            continue;
        }
        match &a.only {
            None => {
                unconditional.insert(nr);
                rules.insert(nr, Vec::new());
            }
            Some(cond) => {
                let entry = rules.entry(nr).or_default();
                for rule in cond.rules()? {
                    entry.push(rule);
                }
            }
        }
    }
    // The calls refused without a report pass this filter; the refusal
    // filter stacked on it (`compile_refusals`) fails them.
    for nr in refused_numbers(kind)? {
        rules.insert(nr, Vec::new());
    }
    build(kind, rules, mismatch, SeccompAction::Allow)
}

/// The [`lists::REFUSED`] calls that a thread of `kind` may not make.
fn refused_numbers(kind: RoleKind) -> Result<Vec<i64>, String> {
    let allowed: Vec<&str> = match kind {
        // The spawner's list is every list's union.
        RoleKind::Spawner => return Ok(Vec::new()),
        k => lists::for_role(k).map(|a| a.name).collect(),
    };
    lists::REFUSED
        .iter()
        .filter(|name| !allowed.contains(name))
        .map(|name| names::number(name).ok_or_else(|| format!("unknown system call '{name}'")))
        .collect()
}

/// The second filter of a thread of `kind`: its [`lists::REFUSED`] calls
/// fail with EACCES (`on`) or are logged (`log`); everything else passes
/// to the allow-list filter. None when the role may make them all.
/// (The kernel runs every filter of a thread and takes the strictest
/// answer: EACCES here wins over "allow" there.)
pub fn compile_refusals(kind: RoleKind, mode: SeccompMode) -> Result<Option<BpfProgram>, String> {
    let refused = refused_numbers(kind)?;
    if refused.is_empty() {
        return Ok(None);
    }
    let action = match mode {
        SeccompMode::Log => SeccompAction::Log,
        _ => SeccompAction::Errno(libc::EACCES as u32),
    };
    let rules = refused.into_iter().map(|nr| (nr, Vec::new())).collect();
    build(kind, rules, SeccompAction::Allow, action).map(Some)
}

fn build(
    kind: RoleKind,
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, String> {
    let filter = SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64)
        .map_err(|e| format!("the {kind} filter does not build: {e}"))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| format!("the {kind} filter does not compile: {e}"))
}

impl lists::Only {
    fn rules(&self) -> Result<Vec<SeccompRule>, String> {
        let cond = |arg: u8, op: SeccompCmpOp, v: u64| {
            SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, v)
                .map_err(|e| format!("bad seccomp condition: {e}"))
        };
        let one = |c: SeccompCondition| {
            SeccompRule::new(vec![c]).map_err(|e| format!("bad seccomp rule: {e}"))
        };
        match self {
            lists::Only::IoctlTypes(types) => types
                .iter()
                .map(|t| one(cond(1, SeccompCmpOp::MaskedEq(0xff00), (*t as u64) << 8)?))
                .collect(),
            lists::Only::Arg0(values) => values
                .iter()
                .map(|v| one(cond(0, SeccompCmpOp::Eq, *v)?))
                .collect(),
        }
    }
}

/// Filter every thread started from now on (and the main thread at
/// [`confine_main`]) as `settings` say. Call once, before the VMM starts
/// any thread.
pub fn install(settings: SeccompSettings) -> Result<(), VmmError> {
    if settings.mode == SeccompMode::Off {
        return Ok(());
    }
    let mut filters = BTreeMap::new();
    for kind in RoleKind::ALL {
        let prog = compile(kind, settings.mode).map_err(VmmError::Isolation)?;
        let refusals = compile_refusals(kind, settings.mode).map_err(VmmError::Isolation)?;
        filters.insert(kind, (prog, refusals));
    }
    if settings.mode == SeccompMode::On {
        install_sigsys_handler()?;
    }
    let filters = Arc::new(filters);
    let forbidden = settings.test_forbidden;
    threads::add_hook(
        Stage::Confine,
        Arc::new(move |role: &Role| {
            let (prog, refusals) = filters
                .get(&role.kind())
                .ok_or_else(|| format!("no seccomp filter for {role}"))?;
            apply(prog, refusals.as_ref())
                .map_err(|e| format!("cannot install the {} seccomp filter: {e}", role.kind()))?;
            if forbidden == Some(role.kind()) {
                make_forbidden_call();
            }
            Ok(())
        }),
    );
    threads::start_spawner()
        .map_err(|e| VmmError::Isolation(format!("cannot start the spawner thread: {e}")))
}

/// Install a thread's filters: the refusal filter first, since the
/// allow-list filter forbids the `seccomp` call that a second install
/// needs (the refusal filter lets it through).
fn apply(prog: &BpfProgram, refusals: Option<&BpfProgram>) -> Result<(), seccompiler::Error> {
    for p in refusals.into_iter().chain(std::iter::once(prog)) {
        seccompiler::apply_filter(p)?;
    }
    Ok(())
}

/// Confine the main thread (run every thread hook in it): once the VM is
/// built and before its vCPUs run.
pub fn confine_main() -> Result<(), VmmError> {
    threads::setup_current(Role::Main).map_err(VmmError::Isolation)
}

/// A call no list allows (`syslog(SYSLOG_ACTION_SIZE_BUFFER)`, harmless
/// where it is let through).
fn make_forbidden_call() {
    // SAFETY: syslog's size query reads and writes no memory.
    unsafe {
        libc::syscall(
            libc::SYS_syslog,
            10,
            std::ptr::null_mut::<libc::c_char>(),
            0,
        );
    }
}

fn install_sigsys_handler() -> Result<(), VmmError> {
    // SAFETY: a zeroed sigaction is valid; the fields are set below.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = on_sigsys as *const () as usize;
    act.sa_flags = libc::SA_SIGINFO;
    // SAFETY: installs a handler that only calls async-signal-safe code.
    let rc = unsafe { libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(VmmError::Isolation(format!(
            "cannot install the SIGSYS handler: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// A fixed-size line built without allocating.
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn push(&mut self, s: &[u8]) {
        for &b in s {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }

    fn push_num(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// The SIGSYS handler: one line on stderr, then the process ends. Only
/// async-signal-safe calls (write, _exit), no lock, no allocation.
extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: for SIGSYS the kernel fills the siginfo's _sigsys member:
    // the call's number is the int at offset 24 (after si_signo, si_errno,
    // si_code, padding and the 8-byte _call_addr).
    let nr = unsafe { *(info as *const u8).add(24).cast::<libc::c_int>() };
    let mut line = Line {
        buf: [0; 256],
        len: 0,
    };
    let mut role = [0u8; 32];
    let role_len = threads::current_name(&mut role);
    line.push(b"\r\nvireo: seccomp: the ");
    if role_len == 0 {
        line.push(b"unregistered");
    } else {
        line.push(&role[..role_len]);
    }
    line.push(b" thread (tid ");
    line.push_num(threads::gettid() as u64);
    line.push(b") made a forbidden system call: ");
    match usize::try_from(nr).ok().and_then(|n| names::NAMES.get(n)) {
        Some(name) if !name.is_empty() => line.push(name.as_bytes()),
        _ => line.push(b"?"),
    }
    line.push(b" (");
    line.push_num(nr as u64);
    line.push(b"); the VMM stops (see docs/isolation.md)\r\n");
    // SAFETY: write and _exit are async-signal-safe; the buffer is ours.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        libc::_exit(EXIT_FORBIDDEN);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_compiles_in_both_modes() {
        for kind in RoleKind::ALL {
            for mode in [SeccompMode::On, SeccompMode::Log] {
                let p = compile(kind, mode).unwrap();
                assert!(!p.is_empty(), "{kind}");
            }
        }
    }

    #[test]
    fn refused_calls_fail_with_eacces_on_threads_whose_list_lacks_them() {
        assert!(compile_refusals(RoleKind::Main, SeccompMode::On)
            .unwrap()
            .is_none());
        assert!(compile_refusals(RoleKind::Spawner, SeccompMode::On)
            .unwrap()
            .is_none());
        let refusals = compile_refusals(RoleKind::Vcpu, SeccompMode::On)
            .unwrap()
            .expect("a vCPU may not open files");
        let prog = compile(RoleKind::Vcpu, SeccompMode::On).unwrap();
        // On a thread of its own (a filter stays with its thread), both
        // filters as a vCPU thread gets them: the install itself must pass.
        let errno = std::thread::spawn(move || {
            apply(&prog, Some(&refusals)).unwrap();
            let path = c"/proc/sys/vm/overcommit_memory";
            // SAFETY: a valid C string; the descriptor, if any, is closed.
            let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
            let errno = std::io::Error::last_os_error().raw_os_error();
            if fd >= 0 {
                // SAFETY: our own descriptor.
                unsafe { libc::close(fd) };
            }
            (fd, errno)
        })
        .join()
        .unwrap();
        assert_eq!(errno, (-1, Some(libc::EACCES)));
    }

    #[test]
    fn names_and_numbers_agree() {
        assert_eq!(names::number("read"), Some(0));
        assert_eq!(names::number("ioctl"), Some(libc::SYS_ioctl));
        assert_eq!(names::NAMES[libc::SYS_exit_group as usize], "exit_group");
        assert_eq!(names::number("no_such_call"), None);
    }

    #[test]
    fn modes_parse() {
        assert_eq!("log".parse(), Ok(SeccompMode::Log));
        assert!("strict".parse::<SeccompMode>().is_err());
    }
}
