//! A VM's state in and out: writing a paused VM's snapshot, loading a
//! snapshot's (or a migration's) state into a newly built VM, and turning
//! a snapshot into the `VmSpec` the builder makes the VM from. The on-disk
//! format (manifest, memory file) is `snapshot.rs`; the live stream is
//! `migration.rs`.
//!
//! Invariants: a snapshot is taken only of a paused VM, held paused from
//! its first byte to its last (`VmControl::hold`: a resume asked meanwhile
//! is refused with 409), with its device workers quiesced, and everything is read before anything is written, so
//! a state that cannot be saved leaves no half-written directory. A restore
//! loads vCPUs, then the backend VM, then the devices, and starts the
//! device workers last.

use crate::builder::{Boot, CrossRestore, SnapshotSource, VmSpec};
use crate::config::{Accel, ConsoleKind, VmConfig};
use crate::snapshot::{DeviceStates, Manifest};
use crate::vm::{lock, VmHandle};
use crate::{RestoreOptions, VmmError};

impl VmHandle {
    /// Write a paused VM to `dir` (a new directory).
    pub fn snapshot(
        &self,
        dir: &std::path::Path,
        config: Option<VmConfig>,
    ) -> Result<(), VmmError> {
        // Held from the first byte to the last: a resume asked meanwhile
        // is refused, not let run a guest whose memory is being written.
        let _hold = self
            .control
            .hold("a snapshot is written")
            .map_err(|e| match e {
                crate::ControlError::NotPaused => {
                    VmmError::Conflict("pause the VM before taking a snapshot".into())
                }
                other => VmmError::Conflict(format!("cannot take a snapshot now: {other}")),
            })?;
        // Device queue workers finish what they are doing and stop, so
        // neither guest memory nor device state moves until they restart.
        self.devices.quiesce(true);
        let started = std::time::Instant::now();
        let result = self.write_snapshot(dir, config);
        self.devices.quiesce(false);
        if result.is_ok() {
            let ms = started.elapsed().as_millis() as u64;
            crate::events::snapshot_written(dir, self.memory_bytes, ms);
        }
        result
    }

    fn write_snapshot(
        &self,
        dir: &std::path::Path,
        config: Option<VmConfig>,
    ) -> Result<(), VmmError> {
        use crate::snapshot::*;
        // Read everything before writing anything, so a backend or device
        // that cannot snapshot leaves no half-written directory behind.
        let (vcpu_states, vm_state, devices) = self.save_states()?;
        let (cpuid, tsc_khz) = self.cpu_record();
        let dir = prepare_dir(dir)?;
        let (progress, started) = self.progress();
        progress.begin(
            started,
            crate::counters::Operation::Snapshot,
            self.memory_bytes,
        );
        let memory = write_memory_with(&self.memory, &dir, &mut |covered, written| {
            progress.advance(covered, written)
        });
        progress.end();
        let memory = memory?;
        tracing::info!(
            "snapshot: {} MiB of guest memory, {} MiB of it written",
            memory.file_bytes >> 20,
            memory.data_bytes >> 20
        );
        write_manifest(
            &dir,
            &Manifest {
                vireo: env!("CARGO_PKG_VERSION").into(),
                accel: self.accel,
                memory_bytes: self.memory_bytes,
                vcpus: self.vcpus.len() as u32,
                config,
                memory: memory.ranges,
                memory_file_bytes: memory.file_bytes,
                vcpu_states,
                vm_state,
                devices,
                cpuid,
                tsc_khz,
            },
        )
    }

    /// The CPUID the guest sees and its TSC rate (vCPU 0's), for the
    /// manifest: what a restore under the other accelerator checks.
    pub(crate) fn cpu_record(&self) -> (Option<Vec<hypervisor::CpuidEntry>>, Option<u32>) {
        match self.vcpus.first() {
            Some(v) => {
                let v = lock(v);
                (v.guest_cpuid().ok(), v.tsc_khz())
            }
            None => (None, None),
        }
    }

    /// The paused VM's vCPU, backend and device state (devices quiesced).
    #[allow(clippy::type_complexity)]
    pub(crate) fn save_states(
        &self,
    ) -> Result<
        (
            Vec<hypervisor::VcpuSnapshot>,
            hypervisor::VmSnapshot,
            DeviceStates,
        ),
        VmmError,
    > {
        let vcpu_states = self
            .vcpus
            .iter()
            .map(|v| lock(v).save_state())
            .collect::<Result<Vec<_>, _>>()?;
        let vm_state = self.vm.save_state()?;
        let devices = self.devices.save()?;
        Ok((vcpu_states, vm_state, devices))
    }

    /// Load a snapshot's vCPU, backend and device state into this new VM.
    pub(crate) fn restore(
        &self,
        m: &Manifest,
        cross: Option<&CrossRestore>,
    ) -> Result<(), VmmError> {
        if m.vcpu_states.len() != self.vcpus.len() {
            return Err(VmmError::Snapshot(
                "snapshot vCPU count does not match".into(),
            ));
        }
        if let Some(c) = cross {
            for v in &self.vcpus {
                check_tsc_rate(lock(v).as_mut(), c)?;
            }
        }
        for (v, st) in self.vcpus.iter().zip(&m.vcpu_states) {
            lock(v).restore_state(st)?;
        }
        self.vm.restore_state(&m.vm_state)?;
        self.devices.restore(&m.devices)
    }
}

/// Two TSC rates closer than this (parts per million) are the same: KVM
/// itself tolerates 250 ppm before it scales.
const TSC_TOLERANCE_PPM: u64 = 250;

/// The guest's TSC must keep the rate it ran at (the guest may keep time
/// by it, at the rate it calibrated or was told): run the destination vCPU
/// at that rate, or refuse unless the user allowed the change.
fn check_tsc_rate(vcpu: &mut dyn hypervisor::Vcpu, c: &CrossRestore) -> Result<(), VmmError> {
    let Some(want) = c.tsc_khz else {
        return Ok(());
    };
    let have = vcpu.tsc_khz();
    let close =
        |h: u32| (h as u64).abs_diff(want as u64) * 1_000_000 <= want as u64 * TSC_TOLERANCE_PPM;
    if have.is_some_and(close) {
        return Ok(());
    }
    let why = match vcpu.set_tsc_khz(want) {
        Ok(()) => return Ok(()),
        Err(e) => e.to_string(),
    };
    let have = have.map_or("an unknown rate".to_string(), |h| format!("{h} kHz"));
    if c.allow_tsc_change {
        tracing::warn!(
            "the guest's TSC ran at {want} kHz and now runs at {have} ({why}); its value goes on from where it was"
        );
        return Ok(());
    }
    Err(VmmError::Snapshot(format!(
        "the guest's TSC ran at {want} kHz; this accelerator runs it at {have} and cannot change that ({why}). \
         A guest that keeps time by the TSC would see its clock run at the wrong speed; \
         --allow-tsc-change restores anyway (the TSC value stays continuous)"
    )))
}

pub(crate) fn accel_of(k: hypervisor::AccelKind) -> Accel {
    match k {
        hypervisor::AccelKind::Kvm => Accel::Kvm,
        hypervisor::AccelKind::Emu => Accel::Emu,
    }
}

/// The accelerator a snapshot (or migration) `what` restores under; under
/// the other one than made it, check that the guest's CPU features are all
/// offered there and convert its state (in `manifest`).
pub(crate) fn prepare_accel(
    what: &str,
    manifest: &mut Manifest,
    opts: RestoreOptions,
) -> Result<(Accel, Option<CrossRestore>), VmmError> {
    let made_with = manifest.accel;
    let to = opts.target(made_with);
    if to == made_with {
        return Ok((accel_of(made_with), None));
    }
    let Some(seen) = manifest.cpuid.clone() else {
        return Err(VmmError::Snapshot(format!(
            "{what} was made under --accel {made_with} by a Vireo that did not record the CPU \
             features its guest saw; it restores only under --accel {made_with}"
        )));
    };
    let hv = crate::builder::open_hypervisor(accel_of(to))?;
    let offered = hv.supported_cpuid()?;
    let missing = hypervisor::cpuid::missing_features(&seen, &offered);
    if !missing.is_empty() {
        let hint = if made_with == hypervisor::AccelKind::Kvm {
            " (start KVM guests with --cpu-model portable to move them to the engine)"
        } else {
            ""
        };
        return Err(VmmError::Snapshot(format!(
            "{what} cannot be restored under --accel {to}: its guest saw CPU features \
             --accel {to} does not offer: {}{hint}",
            missing.join(" ")
        )));
    }
    let (vcpus, vm_state) = emu::convert::convert(&manifest.vcpu_states, &manifest.vm_state, to)
        .map_err(|e| VmmError::Snapshot(format!("{what} under --accel {to}: {e}")))?;
    tracing::info!("{what}: made under --accel {made_with}, restored under --accel {to}");
    manifest.vcpu_states = vcpus;
    manifest.vm_state = vm_state;
    manifest.accel = to;
    if let Some(c) = &mut manifest.config {
        c.accel = accel_of(to);
    }
    Ok((
        accel_of(to),
        Some(CrossRestore {
            tsc_khz: manifest.tsc_khz,
            allow_tsc_change: opts.allow_tsc_change,
        }),
    ))
}

/// The VM a snapshot needs: its memory and vCPUs, and the devices its
/// configuration makes (disks at the files the snapshot names).
pub(crate) fn restore_spec(
    dir: &std::path::Path,
    manifest: &Manifest,
    accel: Accel,
) -> Result<VmSpec, VmmError> {
    let (rng, mut disks, nets, balloon, console) = match &manifest.config {
        Some(c) => (c.rng, c.disks.clone(), c.nets.clone(), c.balloon, c.console),
        None => (false, Vec::new(), Vec::new(), None, ConsoleKind::Serial),
    };
    // The files the snapshot's disks were taken with, absolute (the
    // configuration may hold paths relative to another directory).
    let files: Vec<&std::path::Path> = manifest
        .devices
        .virtio()
        .filter_map(|v| match &v.device {
            virtio::DeviceState::Block(b) => Some(b.path.as_path()),
            _ => None,
        })
        .collect();
    if files.len() != disks.len() {
        return Err(VmmError::Snapshot(format!(
            "snapshot {}: {} disk states for {} configured disks",
            dir.display(),
            files.len(),
            disks.len()
        )));
    }
    for (d, f) in disks.iter_mut().zip(files) {
        d.path = f.to_path_buf();
    }
    Ok(VmSpec {
        accel,
        cpu_model: manifest
            .config
            .as_ref()
            .map(|c| c.cpu_model)
            .unwrap_or_default(),
        memory: manifest.memory_bytes,
        cpus: manifest.vcpus,
        boot: Boot::Snapshot(Box::new(SnapshotSource {
            dir: dir.to_path_buf(),
            manifest: manifest.clone(),
            memory: None,
            cross: None,
            prepared: None,
        })),
        rng,
        disks,
        nets,
        balloon,
        vsock: manifest.config.as_ref().and_then(|c| c.vsock.clone()),
        console,
        exit_device: manifest.config.as_ref().and_then(|c| c.exit_device),
        pvpanic: manifest.config.as_ref().is_some_and(|c| c.pvpanic),
    })
}
