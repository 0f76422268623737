//! What can go wrong in the VMM, one variant per kind of failure, each
//! carrying its cause (the typed error underneath where there is one) and
//! what it concerned (a file, a device, a migration step).
//!
//! Every message is one line that a user can act on: it names the file,
//! device or option concerned. The variant, not the message, decides how a
//! failure is reported: `exit_code` for the process (`vireo run`, `restore`,
//! `migrate-receive`) and `http_status` for the management API. Both are
//! exhaustive matches, so a new variant has to choose.

use std::path::PathBuf;

use crate::exit_code;

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The configuration, command line or request asks for something that
    /// cannot be: a wrong value, a missing option, a file that is not there.
    #[error("{0}")]
    Config(String),
    /// A host file the VMM reads or writes (kernel, initramfs, serial
    /// output, snapshot files): what it was doing, which file, why.
    #[error("{op} {}: {source}", path.display())]
    File {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The directory given as a snapshot holds none.
    #[error("{} is not a snapshot: cannot read {}: {source}", dir.display(), manifest.display())]
    NotASnapshot {
        dir: PathBuf,
        manifest: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A snapshot, or a migrated VM's state, that this VMM cannot restore:
    /// another format version, parts that contradict each other, a guest
    /// the chosen accelerator cannot run as it ran.
    #[error("{0}")]
    Snapshot(String),
    /// Saved state (a manifest, a migration message) that does not parse.
    #[error("{what}: {source}")]
    BadState {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    /// State that cannot be written out as JSON.
    #[error("{what}: {source}")]
    Serialize {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    /// A disk image that cannot be opened.
    #[error("disk {}: {source}", path.display())]
    Disk {
        path: PathBuf,
        #[source]
        source: block::BlockError,
    },
    /// A BIOS image that cannot be read or is not one (docs/firmware.md).
    #[error("firmware {}: {reason}", path.display())]
    Firmware { path: PathBuf, reason: String },
    /// The disk a firmware boot would start from has no boot sector.
    #[error(
        "disk {} has no boot sector (bytes 510-511 are not 55 aa): the firmware would find nothing to boot",
        path.display()
    )]
    NoBootSector { path: PathBuf },
    /// A clone's disk overlay that cannot be made.
    #[error("overlay {} over {}: {source}", overlay.display(), backing.display())]
    Overlay {
        overlay: PathBuf,
        backing: PathBuf,
        #[source]
        source: block::BlockError,
    },
    /// A NIC's tap that cannot be opened or brought up.
    #[error(transparent)]
    Tap(#[from] net::TapError),
    /// User networking's passt that is missing or cannot start.
    #[error(transparent)]
    Passt(#[from] net::PasstError),
    /// A virtio-fs device whose backend cannot be started or reached.
    #[error("--fs tag={tag}: {source}")]
    Fs {
        tag: String,
        #[source]
        source: virtio::fs::FsError,
    },
    /// The accelerator refused (no usable /dev/kvm, a failed ioctl, a
    /// state it cannot load).
    #[error(transparent)]
    Hypervisor(#[from] hypervisor::HypervisorError),
    /// The kernel cannot be loaded or the machine set up for it.
    #[error(transparent)]
    Arch(#[from] arch::ArchError),
    /// Guest memory that cannot be allocated, mapped or read.
    #[error("{what}: {source}")]
    GuestMemory {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A device that cannot be placed on its bus.
    #[error("{device} at {bus} {base:#x}: {source}")]
    Bus {
        device: &'static str,
        bus: &'static str,
        base: u64,
        #[source]
        source: devices::BusError,
    },
    /// A PCI function that finds no slot or BAR space.
    #[error("{device} on PCI: {source}")]
    Pci {
        device: String,
        #[source]
        source: pci::PciError,
    },
    /// A virtio device whose PCI transport cannot be made.
    #[error("{device}: {source}")]
    Virtio {
        device: String,
        #[source]
        source: virtio::VirtioPciError,
    },
    /// A device whose host side (eventfd, worker) cannot be made.
    #[error("{device}: {source}")]
    DeviceIo {
        device: String,
        #[source]
        source: std::io::Error,
    },
    /// A device refused a host-side change (its disk locks).
    #[error("{device}: {reason}")]
    DeviceHost { device: String, reason: String },
    /// A device whose state cannot be saved: busy as it is now, or a host
    /// resource it describes cannot be read.
    #[error("{device}: {source}")]
    DeviceSave {
        device: String,
        #[source]
        source: devices::PersistError,
    },
    /// A device refused the state a snapshot holds for it.
    #[error("snapshot {device}: {source}")]
    DeviceRestore {
        device: String,
        #[source]
        source: devices::PersistError,
    },
    /// The migration's connection failed: the step, and the socket error.
    #[error("{what}: {source}")]
    Migration {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The migration stream ended early.
    #[error("the migration stream ended before the VM's state arrived (the source stopped or the connection was cut)")]
    MigrationCut,
    /// What arrived is not a migration this VMM reads.
    #[error("{0}")]
    MigrationStream(String),
    /// The migration destination answered something other than expected,
    /// or refused the VM.
    #[error("{0}")]
    Destination(String),
    #[error("the migration was cancelled")]
    MigrationCancelled,
    /// The migration's TLS files, or a TLS handshake.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The request does not fit the VM's current state.
    #[error("{0}")]
    Conflict(String),
    /// The VMM's cgroup cannot be made, entered or changed.
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::CgroupError),
    /// The VM could not be paused for a step that needs it still.
    #[error("cannot pause the VM: {0}")]
    Pause(#[source] crate::ControlError),
    /// The management API server cannot start or went away.
    #[error("{0}")]
    ApiServer(String),
    /// The VMM's main thread is gone while the API waited on it.
    #[error("{0}")]
    VmmStopped(&'static str),
    /// The VMM cannot confine itself as asked: a seccomp filter that does
    /// not build or install, a jail that cannot be set up.
    #[error("{0}")]
    Isolation(String),
    /// The jail (`--jail`) cannot be set up as asked.
    #[error(transparent)]
    Jail(#[from] crate::jail::JailError),
    /// The gdb stub cannot listen where `--gdb` says, or cannot hold the VM.
    #[error("{0}")]
    Gdb(String),
}

impl VmmError {
    /// The process exit code for a VMM that fails with this error. The
    /// command line documents one code for every failure of Vireo itself
    /// (`vireo --help`, README): the message says which it was.
    pub fn exit_code(&self) -> i32 {
        use VmmError::*;
        match self {
            Config(_)
            | File { .. }
            | NotASnapshot { .. }
            | Snapshot(_)
            | BadState { .. }
            | Serialize { .. }
            | Disk { .. }
            | Firmware { .. }
            | NoBootSector { .. }
            | Overlay { .. }
            | Tap(_)
            | Passt(_)
            | Fs { .. }
            | Hypervisor(_)
            | Arch(_)
            | GuestMemory { .. }
            | Bus { .. }
            | Pci { .. }
            | Virtio { .. }
            | DeviceIo { .. }
            | DeviceHost { .. }
            | DeviceSave { .. }
            | DeviceRestore { .. }
            | Migration { .. }
            | MigrationCut
            | MigrationStream(_)
            | Destination(_)
            | MigrationCancelled
            | Tls(_)
            | Conflict(_)
            | Pause(_)
            | ApiServer(_)
            | Gdb(_)
            | VmmStopped(_)
            | Isolation(_) => exit_code::VMM_ERROR,
            Cgroup(_) | Jail(_) => exit_code::VMM_ERROR,
        }
    }

    /// The HTTP status the management API answers this error with: 400
    /// for what the client gave (settings, files, snapshots, a stream that
    /// is not a migration), 409 for a request the VM's state does not
    /// allow now, 500 for the host or the VMM failing.
    pub fn http_status(&self) -> u16 {
        use VmmError::*;
        match self {
            Config(_)
            | NotASnapshot { .. }
            | Snapshot(_)
            | BadState { .. }
            | Disk { .. }
            | Firmware { .. }
            | NoBootSector { .. }
            | Overlay { .. }
            | Tap(_)
            | Arch(_)
            | DeviceRestore { .. }
            | MigrationStream(_) => 400,
            // A host resource the saved state names cannot be read: the
            // host's failure; otherwise the device is busy as it is now.
            DeviceSave {
                source: devices::PersistError::Host { .. },
                ..
            } => 500,
            Conflict(_) | DeviceSave { .. } | MigrationCancelled => 409,
            // A handshake that failed is the peer's or the network's
            // doing; the files are the caller's.
            Tls(crate::tls::TlsError::Handshake { .. }) => 500,
            Tls(_) => 400,
            Cgroup(crate::cgroup::CgroupError::Invalid(_)) => 400,
            Cgroup(crate::cgroup::CgroupError::NotInCgroup) => 409,
            Cgroup(_) => 500,
            // Already paused or stopping: the VM's state; vCPUs that do
            // not stop in time: the VMM's failure.
            Pause(crate::ControlError::Timeout(_)) => 500,
            Pause(_) => 409,
            File { .. }
            | Serialize { .. }
            | Hypervisor(_)
            | Passt(_)
            | Fs { .. }
            | GuestMemory { .. }
            | Bus { .. }
            | Pci { .. }
            | Virtio { .. }
            | DeviceIo { .. }
            | DeviceHost { .. }
            | Migration { .. }
            | MigrationCut
            | Destination(_)
            | ApiServer(_)
            | Gdb(_)
            | VmmStopped(_)
            | Isolation(_)
            | Jail(_) => 500,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error;

    #[test]
    fn a_file_error_names_the_file_and_keeps_its_cause() {
        let e = VmmError::File {
            op: "cannot open kernel",
            path: "/nonexistent/vmlinux".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert!(e
            .to_string()
            .starts_with("cannot open kernel /nonexistent/vmlinux: "));
        assert!(e.source().is_some());
        assert_eq!(e.exit_code(), exit_code::VMM_ERROR);
        assert_eq!(e.http_status(), 500);
    }

    #[test]
    fn statuses_follow_whose_fault_it_is() {
        assert_eq!(VmmError::Config("x".into()).http_status(), 400);
        assert_eq!(VmmError::Conflict("x".into()).http_status(), 409);
        assert_eq!(VmmError::MigrationCancelled.http_status(), 409);
        assert_eq!(VmmError::MigrationCut.http_status(), 500);
        let stopping = VmmError::Pause(crate::ControlError::Stopping);
        assert_eq!(stopping.http_status(), 409);
        assert_eq!(
            stopping.to_string(),
            "cannot pause the VM: the VM is stopping"
        );
        let slow = crate::ControlError::Timeout(std::time::Duration::from_secs(1));
        assert_eq!(VmmError::Pause(slow).http_status(), 500);
        let disk = VmmError::Disk {
            path: "/d.qcow2".into(),
            source: block::BlockError::ReadOnly {
                path: "/d.qcow2".into(),
            },
        };
        assert_eq!(disk.http_status(), 400);
        assert!(disk.to_string().starts_with("disk /d.qcow2: "));
    }
}
