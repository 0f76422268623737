//! Why a VM stopped, and the process exit code each reason maps to (the
//! codes are part of the command line's interface: README and `vireo --help`).

/// Why a VM stopped. Each reason has a documented process exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset (keyboard controller, ACPI reset register).
    Reset,
    /// A vCPU triple-faulted: the CPU would reset.
    TripleFault { vcpu: u32, detail: String },
    /// A vCPU met an instruction or state its backend cannot run.
    InternalError { vcpu: u32, detail: String },
    /// The user quit from the console (Ctrl-A X).
    UserQuit,
    /// Stopped through the management API.
    Stopped,
    /// gdb's `kill` (the gdb stub, `--gdb`).
    KilledByDebugger,
    /// The VMM itself failed while the guest ran.
    Error(String),
    /// The VM was handed over to another Vireo (live migration).
    Migrated(String),
    /// The guest wrote `value` to the exit device (`--exit-device`); the
    /// process exits with `(value << 1) | 1`, as QEMU's isa-debug-exit.
    GuestExit { value: u32 },
    /// The guest kernel panicked and said so through pvpanic (`--pvpanic`).
    GuestPanic,
}

/// Process exit codes, for scripts. Documented in the README and `vireo --help`.
pub mod exit_code {
    pub const POWER_OFF: i32 = 0;
    pub const VMM_ERROR: i32 = 1;
    /// clap's own code for a bad command line.
    pub const USAGE: i32 = 2;
    pub const GUEST_RESET: i32 = 3;
    pub const TRIPLE_FAULT: i32 = 4;
    pub const INTERNAL_ERROR: i32 = 5;
    pub const GUEST_PANIC: i32 = 6;
    pub const USER_QUIT: i32 = 0;
    pub const STOPPED: i32 = 0;
}

impl VmExit {
    pub fn code(&self) -> i32 {
        match self {
            VmExit::PowerOff => exit_code::POWER_OFF,
            VmExit::Reset => exit_code::GUEST_RESET,
            VmExit::TripleFault { .. } => exit_code::TRIPLE_FAULT,
            VmExit::InternalError { .. } => exit_code::INTERNAL_ERROR,
            VmExit::UserQuit => exit_code::USER_QUIT,
            VmExit::Stopped | VmExit::KilledByDebugger => exit_code::STOPPED,
            VmExit::Error(_) => exit_code::VMM_ERROR,
            VmExit::Migrated(_) => exit_code::STOPPED,
            VmExit::GuestExit { value } => devices::debug_exit::exit_status(*value),
            VmExit::GuestPanic => exit_code::GUEST_PANIC,
        }
    }
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::PowerOff => write!(f, "guest powered off"),
            VmExit::Reset => write!(f, "guest rebooted"),
            VmExit::TripleFault { vcpu, detail } => {
                write!(
                    f,
                    "vCPU {vcpu} triple-faulted (the CPU would reset): {detail}"
                )
            }
            VmExit::InternalError { vcpu, detail } => write!(f, "vCPU {vcpu} stopped: {detail}"),
            VmExit::UserQuit => write!(f, "stopped by the user (Ctrl-A X)"),
            VmExit::Stopped => write!(f, "stopped through the API"),
            VmExit::KilledByDebugger => write!(f, "killed from gdb"),
            VmExit::Error(e) => write!(f, "VMM error: {e}"),
            VmExit::Migrated(to) => write!(f, "the VM migrated to {to}"),
            VmExit::GuestExit { value } => write!(
                f,
                "the guest wrote {value:#x} to the exit device (exit status {})",
                devices::debug_exit::exit_status(*value)
            ),
            VmExit::GuestPanic => write!(f, "the guest kernel panicked (reported through pvpanic)"),
        }
    }
}
