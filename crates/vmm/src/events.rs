//! The VMM's state changes as structured log events, for a supervisor to
//! follow: each is one `tracing` event at INFO level with target
//! [`TARGET`], an `event` field naming it (boot, pause, resume, snapshot,
//! migration-start, migration-end, device-reset, guest-panic, exit) and its details as
//! fields. `vireo -v --log-format json` prints each as one JSON line.
//!
//! Invariant: an event is emitted after the change it reports has
//! happened (a failed pause emits nothing); names and fields are an
//! interface (docs/monitoring.md lists them), so they change only by
//! adding.

/// The target every event is logged under.
pub const TARGET: &str = "vireo::event";

/// A VM started running: `how` is boot, restore or migration.
pub(crate) fn started(how: &str, accel: hypervisor::AccelKind, vcpus: u32, memory_bytes: u64) {
    tracing::info!(
        target: TARGET,
        event = "boot",
        how,
        accel = %accel,
        vcpus,
        memory_bytes,
        "VM started ({how})"
    );
}

pub(crate) fn paused() {
    tracing::info!(target: TARGET, event = "pause", "VM paused");
}

pub(crate) fn resumed() {
    tracing::info!(target: TARGET, event = "resume", "VM resumed");
}

pub(crate) fn snapshot_written(dir: &std::path::Path, memory_bytes: u64, ms: u64) {
    tracing::info!(
        target: TARGET,
        event = "snapshot",
        dir = %dir.display(),
        memory_bytes,
        ms,
        "snapshot written to {}",
        dir.display()
    );
}

pub(crate) fn migration_started(destination: &str) {
    tracing::info!(
        target: TARGET,
        event = "migration-start",
        destination,
        "live migration to {destination} started"
    );
}

/// `error` is None when the VM is on the destination now.
pub(crate) fn migration_ended(destination: &str, error: Option<&str>, bytes: u64, ms: u64) {
    match error {
        None => tracing::info!(
            target: TARGET,
            event = "migration-end",
            destination,
            ok = true,
            bytes,
            ms,
            "live migration to {destination} done"
        ),
        Some(e) => tracing::info!(
            target: TARGET,
            event = "migration-end",
            destination,
            ok = false,
            error = e,
            "live migration to {destination} failed: {e}"
        ),
    }
}

/// The guest kernel reported a panic through pvpanic. With a crash kernel
/// loaded (`crash_loaded`) the VM keeps running for kdump; otherwise the VM
/// stops next (an `exit` event with reason guest-panic follows).
pub(crate) fn guest_panic(crash_loaded: bool) {
    tracing::warn!(
        target: TARGET,
        event = "guest-panic",
        crash_loaded,
        "the guest kernel panicked{}",
        if crash_loaded { " (a crash kernel is loaded and takes over)" } else { "" }
    );
}

/// The VM stopped; `reason` is the exit's kind (power-off, reset, ...).
/// A guest that panics reboots (panic=N on its command line) or stops:
/// its exit says which.
pub(crate) fn exited(exit: &crate::VmExit) {
    let reason = match exit {
        crate::VmExit::PowerOff => "power-off",
        crate::VmExit::Reset => "reset",
        crate::VmExit::TripleFault { .. } => "triple-fault",
        crate::VmExit::InternalError { .. } => "internal-error",
        crate::VmExit::UserQuit => "user-quit",
        crate::VmExit::Stopped => "stopped",
        crate::VmExit::KilledByDebugger => "debugger-kill",
        crate::VmExit::Error(_) => "error",
        crate::VmExit::Migrated(_) => "migrated",
        crate::VmExit::GuestExit { .. } => "guest-exit",
        crate::VmExit::GuestPanic => "guest-panic",
    };
    tracing::info!(
        target: TARGET,
        event = "exit",
        reason,
        detail = %exit,
        "VM stopped: {exit}"
    );
}
