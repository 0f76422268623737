//! A Vireo virtual machine monitor: guest memory, the device buses, vCPU
//! threads and the loop that answers their exits. Backend-neutral: it talks
//! to KVM and to the software engine only through the `hypervisor` traits.
//!
//! The modules by job: `launch` (the ways a VMM starts its VM) calls
//! `builder` (one routine puts every VM together), which uses
//! `device_manager` (devices and their wiring) and `vcpu` (the vCPU
//! threads); `vm` is the built VM and the handle the API shares; `persist`
//! takes and restores its state, in `snapshot`'s on-disk format or over
//! `migration`'s stream; `api` and `control` serve and steer it.

pub mod api;
pub mod auth;
mod builder;
pub mod cgroup;
pub mod cloud_init;
pub mod config;
pub mod console;
pub mod control;
pub mod counters;
mod device_manager;
mod error;
pub mod events;
mod exit;
mod firmware;
pub mod gdb;
pub mod jail;
mod launch;
pub mod migration;
mod persist;
pub mod rate_limits;
pub mod seccomp;
pub mod snapshot;
pub mod tls;
mod vcpu;
mod vm;

pub use builder::{
    kvm_device, set_engine_jit, set_kvm_device, Boot, CrossRestore, RawBoot, RawMode,
    SnapshotSource, VmSpec,
};
pub use config::{Accel, BootProtocol, ConsoleKind, MemSize, SerialMode, VmConfig};
pub use control::{ControlError, RunState, VmControl};
pub use device_manager::DeviceInfo;
pub use error::VmmError;
pub use exit::{exit_code, VmExit};
pub(crate) use launch::LaunchRequest;
pub use launch::{
    migrate_receive, restore, run, serve, CloneOptions, Launch, RestoreOptions, Servers,
};
pub use vm::{Vm, VmHandle, VmInfo};
