//! The VMM's side of the API: [`ApiShared`] answers every action, for the
//! VM that runs in this process or, before there is one (a VMM started
//! with only `--api-socket`), with the configuration `vm.create` stored and
//! a way to ask the VMM's main thread to launch a VM.
//!
//! Invariants: one VM per VMM process (create, boot, restore and
//! migrate-receive are refused once one runs); at most one migration runs
//! at a time, and while it does pause, resume, snapshot and another
//! migration are refused.

use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, RwLock};

use super::{
    ApiAction, ApiError, ApiReply, BalloonInfo, BalloonRequest, Device, MigrateReceiveRequest,
    MigrateRequest, RateLimitRequest, RequestHandler, RestoreRequest, RunningVmInfo,
    SnapshotRequest, VmInfoReply, VmState,
};
use crate::control::VmControl;
use crate::migration::MigrationReport;
use crate::{VmConfig, VmExit, VmInfo};

/// What the API needs from a VM, gathered before the VM starts running.
#[derive(Clone)]
pub struct ApiContext {
    pub control: Arc<VmControl>,
    pub info: VmInfo,
    pub config: Option<VmConfig>,
    pub exits: Sender<VmExit>,
    pub vm: Arc<crate::VmHandle>,
}

/// What the server answers for: the running VM once there is one; before
/// that the configuration `vm.create` stored and the way to ask the VMM's
/// main thread for a VM.
pub struct ApiShared {
    vm: RwLock<Option<ApiContext>>,
    created: Mutex<Option<VmConfig>>,
    /// None when the VMM was started with its VM (`vireo run --kernel`).
    launcher: Option<Mutex<Sender<crate::LaunchRequest>>>,
    /// The cancel flag of the migration in progress, if one is.
    migrating: Mutex<Option<crate::migration::Cancel>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ApiShared {
    /// A server for a VMM that already runs its VM.
    pub fn with_vm(ctx: ApiContext) -> Arc<Self> {
        Arc::new(ApiShared {
            vm: RwLock::new(Some(ctx)),
            created: Mutex::new(None),
            launcher: None,
            migrating: Mutex::new(None),
        })
    }

    /// A server for an empty VMM whose main thread takes launches on `tx`.
    pub(crate) fn empty(tx: Sender<crate::LaunchRequest>) -> Arc<Self> {
        Arc::new(ApiShared {
            vm: RwLock::new(None),
            created: Mutex::new(None),
            launcher: Some(Mutex::new(tx)),
            migrating: Mutex::new(None),
        })
    }

    /// The VM is built: from now on requests go to it.
    pub(crate) fn set_vm(&self, ctx: ApiContext) {
        // `created` is not touched here: vm.boot holds its lock meanwhile.
        *self.vm.write().unwrap_or_else(|e| e.into_inner()) = Some(ctx);
    }

    fn vm(&self) -> Option<ApiContext> {
        self.vm.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The running VM, for actions that need one.
    fn running(&self) -> Result<ApiContext, ApiError> {
        self.vm().ok_or(ApiError::NoVm)
    }

    /// For actions that start a VM: none may run yet.
    fn empty_vmm(&self) -> Result<(), ApiError> {
        match self.vm() {
            Some(_) => Err(ApiError::VmRuns),
            None => Ok(()),
        }
    }

    /// The running VM, for actions a migration in progress excludes.
    fn running_not_migrating(&self) -> Result<ApiContext, ApiError> {
        let ctx = self.running()?;
        if lock(&self.migrating).is_some() {
            return Err(ApiError::Migrating);
        }
        Ok(ctx)
    }

    /// Hand a launch to the main thread and wait for its outcome.
    fn launch(&self, launch: crate::Launch) -> Result<(), ApiError> {
        let Some(tx) = &self.launcher else {
            return Err(ApiError::StartedWithVm);
        };
        let (reply, outcome) = std::sync::mpsc::channel();
        lock(tx)
            .send(crate::LaunchRequest { launch, reply })
            .map_err(|_| crate::VmmError::VmmStopped("the VMM is shutting down"))?;
        Ok(outcome
            .recv()
            .map_err(|_| crate::VmmError::VmmStopped("the VMM stopped before answering"))??)
    }

    /// A restore or a migration into this VMM: only while nothing is created.
    fn launch_instead_of_created(
        &self,
        launch: crate::Launch,
        instead: &'static str,
    ) -> Result<(), ApiError> {
        self.empty_vmm()?;
        if lock(&self.created).is_some() {
            return Err(ApiError::CreatedInstead { instead });
        }
        self.launch(launch)
    }
}

fn restore_options(accel: Option<crate::Accel>, allow_tsc_change: bool) -> crate::RestoreOptions {
    crate::RestoreOptions {
        accel,
        allow_tsc_change,
    }
}

impl RequestHandler for ApiShared {
    fn vm_info(&self) -> Result<VmInfoReply, ApiError> {
        let Some(ctx) = self.vm() else {
            let created = lock(&self.created).clone();
            let state = match created {
                Some(_) => VmState::Created,
                None => VmState::NotCreated,
            };
            return Ok(VmInfoReply {
                state,
                config: created,
                vm: None,
            });
        };
        let balloon = ctx.vm.balloon();
        let reply = VmInfoReply {
            state: ctx.control.state().into(),
            config: ctx.config.clone(),
            vm: Some(RunningVmInfo {
                accel: ctx.info.accel,
                memory_bytes: ctx.info.memory_bytes,
                vcpus: ctx.info.vcpus,
                devices: ctx.info.devices.iter().map(Device::from).collect(),
                balloon: balloon.map(BalloonInfo::of),
                threads: threads::list(),
            }),
        };
        // Fresh statistics for the next look.
        if let Some(b) = balloon {
            b.request_stats();
        }
        Ok(reply)
    }

    fn vm_pause(&self) -> Result<(), ApiError> {
        Ok(self.running_not_migrating()?.control.pause()?)
    }

    fn vm_resume(&self) -> Result<(), ApiError> {
        Ok(self.running_not_migrating()?.control.resume()?)
    }

    fn vm_power_button(&self) -> Result<(), ApiError> {
        let ctx = self.running()?;
        if ctx.control.state() == crate::RunState::Paused {
            return Err(ApiError::Paused);
        }
        ctx.vm.press_power_button();
        Ok(())
    }

    /// Only checks that a VM runs: it is stopped in
    /// [`RequestHandler::after_reply`], once the answer is out. Stopped
    /// here, the VMM could exit before the answer was written, and the
    /// client would see its connection closed instead of a success.
    fn vm_stop(&self) -> Result<(), ApiError> {
        self.running().map(|_| ())
    }

    fn vm_snapshot(&self, req: &SnapshotRequest) -> Result<(), ApiError> {
        let ctx = self.running_not_migrating()?;
        Ok(ctx.vm.snapshot(&req.destination, ctx.config.clone())?)
    }

    fn vm_migrate_send(&self, req: &MigrateRequest) -> Result<MigrationReport, ApiError> {
        let ctx = self.running()?;
        let opts = crate::migration::SendOptions {
            max_bandwidth: req.max_bandwidth_mib.map(|m| m.saturating_mul(1 << 20)),
            cancel: crate::migration::Cancel::default(),
        };
        {
            let mut m = lock(&self.migrating);
            if m.is_some() {
                return Err(ApiError::Migrating);
            }
            *m = Some(opts.cancel.clone());
        }
        let result = crate::migration::send(&ctx.vm, &req.destination, ctx.config.clone(), &opts);
        *lock(&self.migrating) = None;
        Ok(result?)
    }

    fn vm_migrate_cancel(&self) -> Result<(), ApiError> {
        self.running()?;
        let cancel = lock(&self.migrating).clone();
        cancel.ok_or(ApiError::NotMigrating)?.cancel();
        Ok(())
    }

    fn vm_balloon(&self, req: &BalloonRequest) -> Result<(), ApiError> {
        let ctx = self.running()?;
        let b = ctx.vm.balloon().ok_or(ApiError::NoBalloon)?;
        let ram_mib = ctx.info.memory_bytes >> 20;
        if req.target_mib > ram_mib {
            return Err(ApiError::BalloonTooLarge {
                target_mib: req.target_mib,
                ram_mib,
            });
        }
        // At most 1 TiB of RAM: 2^28 pages fit the 32-bit num_pages, so
        // a target within RAM always converts.
        let pages = req.target_mib << (20 - virtio::balloon::PFN_SHIFT);
        let pages = u32::try_from(pages).map_err(|_| ApiError::BalloonTooLarge {
            target_mib: req.target_mib,
            ram_mib,
        })?;
        b.set_target_pages(pages);
        Ok(())
    }

    fn vm_rate_limit(&self, req: &RateLimitRequest) -> Result<(), ApiError> {
        let ctx = self.running()?;
        ctx.vm.rate_limits().apply(req)?;
        crate::events::rate_limit_changed(&req.target);
        Ok(())
    }

    fn vm_create(&self, config: &VmConfig) -> Result<(), ApiError> {
        self.empty_vmm()?;
        if self.launcher.is_none() {
            return Err(ApiError::StartedWithVm);
        }
        let mut created = lock(&self.created);
        if created.is_some() {
            return Err(ApiError::AlreadyCreated);
        }
        config
            .validate()
            .and_then(|_| config.check_files())
            .and_then(|_| crate::VmSpec::from_config(config).map(|_| ()))
            .map_err(ApiError::BadConfig)?;
        *created = Some(config.clone());
        Ok(())
    }

    fn vm_delete(&self) -> Result<(), ApiError> {
        self.empty_vmm()?;
        lock(&self.created)
            .take()
            .map(|_| ())
            .ok_or(ApiError::NotCreated)
    }

    fn vm_boot(&self) -> Result<(), ApiError> {
        self.empty_vmm()?;
        // Held across the launch: a concurrent create or delete waits.
        let mut created = lock(&self.created);
        let config = created.clone().ok_or(ApiError::NotCreated)?;
        self.launch(crate::Launch::Boot(Box::new(config)))?;
        *created = None;
        Ok(())
    }

    fn vm_restore(&self, req: &RestoreRequest) -> Result<(), ApiError> {
        let launch = crate::Launch::Restore {
            dir: req.source.clone(),
            opts: restore_options(req.accel, req.allow_tsc_change),
            clone: crate::CloneOptions {
                overlays: req.overlays.clone(),
                taps: req.taps.clone(),
                disks: req.disks.clone(),
            },
            serial: req.serial.clone().unwrap_or_default(),
        };
        self.launch_instead_of_created(launch, "restore")
    }

    fn vm_migrate_receive(&self, req: &MigrateReceiveRequest) -> Result<(), ApiError> {
        let launch = crate::Launch::MigrateReceive {
            listen: req.listen.clone(),
            opts: restore_options(req.accel, req.allow_tsc_change),
            serial: req.serial.clone().unwrap_or_default(),
        };
        self.launch_instead_of_created(launch, "receive one")
    }

    fn vmm_shutdown(&self) -> Result<(), ApiError> {
        Ok(())
    }

    fn vm_counters(&self) -> Result<crate::counters::VmCounters, ApiError> {
        Ok(self.running()?.vm.counters())
    }

    fn after_reply(&self, action: &ApiAction, _reply: &ApiReply) {
        match action {
            // A VM that migrated ends here, after its answer is out.
            ApiAction::VmMigrateSend(req) => {
                if let Some(ctx) = self.vm() {
                    let _ = ctx.exits.send(VmExit::Migrated(req.destination.clone()));
                }
            }
            ApiAction::VmStop => {
                if let Some(ctx) = self.vm() {
                    let _ = ctx.exits.send(VmExit::Stopped);
                }
            }
            ApiAction::VmmShutdown => match self.vm() {
                Some(ctx) => {
                    let _ = ctx.exits.send(VmExit::Stopped);
                }
                None => {
                    let _ = self.launch(crate::Launch::Shutdown);
                }
            },
            _ => {}
        }
    }
}
