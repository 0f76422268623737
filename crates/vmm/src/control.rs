//! Run control shared by the vCPU threads and whoever manages the VM (the
//! API server, the console): pause, resume, stop, and what state the VM is in.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use hypervisor::VcpuKicker;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Running,
    Paused,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ControlError {
    #[error("the VM is already paused")]
    AlreadyPaused,
    #[error("the VM is not paused")]
    NotPaused,
    #[error("the VM is stopping")]
    Stopping,
    #[error("vCPUs did not stop within {0:?}")]
    Timeout(Duration),
    /// Something holds the VM paused ([`VmControl::hold`]).
    #[error("the VM stays paused while {0}")]
    Held(&'static str),
}

#[derive(Default)]
struct Gate {
    /// The vCPUs must park as soon as they are out of the guest.
    pause: bool,
    /// How many vCPU threads are parked.
    parked: usize,
    /// Why the VM must stay paused, while something (a snapshot being
    /// written) needs it still: resume is refused meanwhile.
    held: Option<&'static str>,
    /// vCPUs (by index) that stay parked even while the VM runs: gdb's
    /// scheduler locking resumes only the vCPUs it names.
    frozen: Vec<bool>,
}

/// Pause/resume/stop for one VM's vCPU threads.
pub struct VmControl {
    gate: Mutex<Gate>,
    cv: Condvar,
    stop: AtomicBool,
    live_vcpus: AtomicUsize,
    kickers: Mutex<Vec<Arc<dyn VcpuKicker>>>,
    /// Serialises pause/resume requests from several API clients.
    requests: Mutex<()>,
    /// Debugger stops the vCPUs reported and the gdb stub has not yet
    /// taken (vCPU index, why), oldest first.
    debug_stops: Mutex<std::collections::VecDeque<(u32, hypervisor::DebugStop)>>,
}

impl Default for VmControl {
    fn default() -> Self {
        VmControl {
            gate: Mutex::new(Gate::default()),
            cv: Condvar::new(),
            stop: AtomicBool::new(false),
            live_vcpus: AtomicUsize::new(0),
            kickers: Mutex::new(Vec::new()),
            requests: Mutex::new(()),
            debug_stops: Mutex::new(std::collections::VecDeque::new()),
        }
    }
}

const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

impl VmControl {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn gate(&self) -> std::sync::MutexGuard<'_, Gate> {
        self.gate.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn add_vcpu(&self, kicker: Arc<dyn VcpuKicker>) {
        self.live_vcpus.fetch_add(1, Ordering::SeqCst);
        self.kickers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(kicker);
    }

    /// A vCPU thread ends (its guest stopped it, or the VM stops).
    pub(crate) fn vcpu_exited(&self) {
        self.live_vcpus.fetch_sub(1, Ordering::SeqCst);
        // A pause waiting for this vCPU to park must not wait for it forever.
        let _g = self.gate();
        self.cv.notify_all();
    }

    fn kick_all(&self) {
        for k in self
            .kickers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            k.kick();
        }
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Ask every vCPU to leave the guest for good.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        {
            let _g = self.gate();
            self.cv.notify_all();
        }
        self.kick_all();
    }

    pub fn state(&self) -> RunState {
        if self.gate().pause {
            RunState::Paused
        } else {
            RunState::Running
        }
    }

    /// Stop every vCPU outside the guest; returns once all are parked.
    pub fn pause(&self) -> Result<(), ControlError> {
        let _req = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        if self.stopping() {
            return Err(ControlError::Stopping);
        }
        {
            let mut g = self.gate();
            if g.pause {
                return Err(ControlError::AlreadyPaused);
            }
            g.pause = true;
        }
        self.wait_parked()
    }

    /// A vCPU stopped for the debugger (`VcpuExit::Debug`): remember why
    /// for the gdb stub and stop the whole VM (all-stop, as gdb expects),
    /// without waiting: the caller is a vCPU thread, which parks next.
    pub(crate) fn debug_stop(&self, vcpu: u32, stop: hypervisor::DebugStop) {
        self.debug_stops
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back((vcpu, stop));
        self.gate().pause = true;
        self.kick_all();
    }

    /// The oldest debugger stop not yet taken.
    pub(crate) fn take_debug_stop(&self) -> Option<(u32, hypervisor::DebugStop)> {
        self.debug_stops
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
    }

    pub(crate) fn has_debug_stop(&self) -> bool {
        !self
            .debug_stops
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    pub(crate) fn clear_debug_stops(&self) {
        self.debug_stops
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Keep the vCPUs whose index is `true` in `frozen` parked while the
    /// VM runs (the debugger's scheduler locking); empty: none. Takes
    /// effect at the next resume.
    pub(crate) fn set_frozen(&self, frozen: Vec<bool>) {
        self.gate().frozen = frozen;
        self.cv.notify_all();
    }

    /// The debugger stops the VM: as `pause`, but a VM already paused
    /// (by a vCPU's debug stop, or through the API) is fine.
    pub(crate) fn debug_pause(&self) -> Result<(), ControlError> {
        let _req = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        if self.stopping() {
            return Err(ControlError::Stopping);
        }
        self.gate().pause = true;
        self.wait_parked()
    }

    /// Wait until every vCPU is parked after `pause` was set (kicking them
    /// meanwhile); on a timeout the pause is called off.
    fn wait_parked(&self) -> Result<(), ControlError> {
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        let mut g = self.gate();
        let all_parked =
            |g: &Gate| g.parked >= self.live_vcpus.load(Ordering::SeqCst) || self.stopping();
        while !all_parked(&g) {
            drop(g);
            // Kick again while waiting: a vCPU may have been between its
            // pause check and entering the guest when the first kick came.
            self.kick_all();
            g = self.gate();
            // The vCPUs may have parked (and notified) while the gate was
            // not held here: look before waiting, or that wake-up is lost.
            if all_parked(&g) {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                g.pause = false;
                self.cv.notify_all();
                return Err(ControlError::Timeout(PAUSE_TIMEOUT));
            }
            let wait = (deadline - now).min(Duration::from_millis(20));
            g = self
                .cv
                .wait_timeout(g, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(g);
        crate::events::paused();
        Ok(())
    }

    pub fn resume(&self) -> Result<(), ControlError> {
        let _req = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        let mut g = self.gate();
        if !g.pause {
            return Err(ControlError::NotPaused);
        }
        if let Some(why) = g.held {
            return Err(ControlError::Held(why));
        }
        g.pause = false;
        self.cv.notify_all();
        drop(g);
        crate::events::resumed();
        Ok(())
    }

    /// Keep the paused VM paused until the returned guard is dropped:
    /// [`VmControl::resume`] answers [`ControlError::Held`] with `why`
    /// meanwhile. Taken and checked under the same locks as pause and
    /// resume, so no resume slips in between "is it paused?" and the hold.
    pub fn hold(&self, why: &'static str) -> Result<Hold<'_>, ControlError> {
        let _req = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        let mut g = self.gate();
        if !g.pause {
            return Err(ControlError::NotPaused);
        }
        if let Some(other) = g.held {
            return Err(ControlError::Held(other));
        }
        g.held = Some(why);
        Ok(Hold(self))
    }

    /// Called by a vCPU thread between runs: parks while the VM is paused,
    /// after `before_park` (which brings the vCPU to a consistent state).
    /// Returns false when the vCPU must stop.
    pub(crate) fn checkpoint(&self, vcpu: u32, before_park: impl FnOnce()) -> bool {
        if self.stopping() {
            return false;
        }
        let parks = |g: &Gate| g.pause || g.frozen.get(vcpu as usize).is_some_and(|&f| f);
        if !parks(&self.gate()) {
            return true;
        }
        before_park();
        let mut g = self.gate();
        if !parks(&g) {
            return !self.stopping();
        }
        g.parked += 1;
        self.cv.notify_all();
        while parks(&g) && !self.stopping() {
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g.parked -= 1;
        !self.stopping()
    }
}

/// The VM held paused; released on drop.
pub struct Hold<'a>(&'a VmControl);

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        self.0.gate().held = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoKick;
    impl VcpuKicker for NoKick {
        fn kick(&self) {}
    }

    #[test]
    fn pause_waits_for_every_vcpu_and_resume_releases_them() {
        let ctl = VmControl::new();
        let ran = Arc::new(AtomicUsize::new(0));
        let mut threads = Vec::new();
        for _ in 0..2 {
            ctl.add_vcpu(Arc::new(NoKick));
            let (c, r) = (ctl.clone(), ran.clone());
            threads.push(std::thread::spawn(move || {
                while c.checkpoint(0, || ()) {
                    r.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(1));
                }
                c.vcpu_exited();
            }));
        }
        std::thread::sleep(Duration::from_millis(20));
        ctl.pause().unwrap();
        assert_eq!(ctl.state(), RunState::Paused);
        assert_eq!(ctl.pause(), Err(ControlError::AlreadyPaused));
        let frozen = ran.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(ran.load(Ordering::SeqCst), frozen, "a paused vCPU ran");
        // Held (a snapshot being written): resume is refused until the
        // hold ends, and nothing runs meanwhile.
        let hold = ctl.hold("a snapshot is written").unwrap();
        assert_eq!(
            ctl.resume(),
            Err(ControlError::Held("a snapshot is written"))
        );
        assert!(ctl.hold("again").is_err(), "one hold at a time");
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(ran.load(Ordering::SeqCst), frozen, "a held vCPU ran");
        drop(hold);
        ctl.resume().unwrap();
        assert_eq!(ctl.resume(), Err(ControlError::NotPaused));
        assert_eq!(
            ctl.hold("x").err(),
            Some(ControlError::NotPaused),
            "only a paused VM is held"
        );
        std::thread::sleep(Duration::from_millis(30));
        assert!(
            ran.load(Ordering::SeqCst) > frozen,
            "resume did not release"
        );
        ctl.request_stop();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(ctl.pause(), Err(ControlError::Stopping));
    }
}
