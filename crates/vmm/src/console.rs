//! The host terminal as the guest's console (COM1 or virtio-console): raw
//! mode, input forwarding, and the Ctrl-A escape (Ctrl-A X quits, Ctrl-A
//! Ctrl-A sends Ctrl-A).

use std::io::Write;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use devices::serial::Serial;

use crate::VmExit;

/// Unbuffered stdout: every byte the guest writes shows at once.
pub struct RawStdout;

impl Write for RawStdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // SAFETY: writing a valid buffer to fd 1.
        let n = unsafe { libc::write(1, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            // A closed pipe must not stop the guest: drop its output.
            if e.raw_os_error() == Some(libc::EPIPE) {
                return Ok(buf.len());
            }
            return Err(e);
        }
        Ok(n as usize)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const CTRL_A: u8 = 0x01;

/// What the escape state machine makes of one input byte.
#[derive(Debug, PartialEq, Eq)]
pub enum Key {
    /// Bytes for the guest.
    Send(Vec<u8>),
    Quit,
    None,
}

/// Ctrl-A escape handling, separate from I/O so that it can be tested.
#[derive(Default)]
pub struct Escape {
    pending: bool,
}

impl Escape {
    pub fn feed(&mut self, b: u8) -> Key {
        if self.pending {
            self.pending = false;
            return match b {
                b'x' | b'X' => Key::Quit,
                CTRL_A => Key::Send(vec![CTRL_A]),
                // Unknown escape: pass both through, as typed.
                other => Key::Send(vec![CTRL_A, other]),
            };
        }
        if b == CTRL_A {
            self.pending = true;
            return Key::None;
        }
        Key::Send(vec![b])
    }
}

/// Saved terminal settings, restored on drop.
struct RawMode {
    saved: libc::termios,
}

/// The settings to restore if a signal ends the process while in raw mode.
static SAVED_TERMIOS: std::sync::OnceLock<libc::termios> = std::sync::OnceLock::new();

extern "C" fn restore_and_exit(sig: libc::c_int) {
    // Only async-signal-safe calls here: tcsetattr, write, _exit.
    if let Some(t) = SAVED_TERMIOS.get() {
        // SAFETY: restoring saved settings on fd 0.
        unsafe {
            libc::tcsetattr(0, libc::TCSANOW, t);
        }
    }
    let msg = b"\r\nvireo: killed by a signal\n";
    // SAFETY: write and _exit are async-signal-safe.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(128 + sig);
    }
}

/// A VMM killed with SIGTERM or SIGHUP must not leave the terminal raw.
fn restore_terminal_on_signals(saved: libc::termios) {
    if SAVED_TERMIOS.set(saved).is_err() {
        return; // already installed
    }
    for sig in [libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
        // SAFETY: installing a handler that only makes async-signal-safe calls.
        unsafe {
            libc::signal(sig, restore_and_exit as *const () as libc::sighandler_t);
        }
    }
}

impl RawMode {
    fn enter() -> Option<Self> {
        // SAFETY: isatty/tcgetattr/tcsetattr on fd 0 with valid pointers.
        unsafe {
            if libc::isatty(0) != 1 {
                return None;
            }
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return None;
            }
            let saved = t;
            libc::cfmakeraw(&mut t);
            // Keep output post-processing so host-side messages stay readable.
            t.c_oflag |= libc::OPOST;
            restore_terminal_on_signals(saved);
            if libc::tcsetattr(0, libc::TCSANOW, &t) != 0 {
                return None;
            }
            Some(RawMode { saved })
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restoring settings read from the same fd.
        unsafe {
            libc::tcsetattr(0, libc::TCSANOW, &self.saved);
        }
    }
}

/// The device console input goes to.
#[derive(Clone)]
pub enum ConsoleTarget {
    /// COM1's receive FIFO (input waits while it is full).
    Serial(Arc<Mutex<Serial>>),
    /// The virtio console's receive buffer (bounded; see
    /// [`virtio::console::INPUT_BUFFER_MAX`]).
    Virtio(virtio::console::ConsoleInput),
}

impl ConsoleTarget {
    fn send(&self, bytes: &[u8]) {
        match self {
            ConsoleTarget::Serial(s) => send_all(s, bytes),
            ConsoleTarget::Virtio(i) => i.push(bytes),
        }
    }
}

/// Forwards stdin to the guest's console from a thread of its own.
/// Dropping it restores the terminal.
pub struct StdinForwarder {
    _raw: Option<RawMode>,
}

impl StdinForwarder {
    pub fn start(target: ConsoleTarget, exits: Sender<VmExit>) -> Self {
        let raw = RawMode::enter();
        let spawned = threads::spawn(threads::Role::Console, move || forward(target, exits));
        if let Err(e) = spawned {
            tracing::warn!("no console input: cannot start the stdin thread: {e}");
        }
        StdinForwarder { _raw: raw }
    }
}

fn forward(target: ConsoleTarget, exits: Sender<VmExit>) {
    let mut esc = Escape::default();
    let mut buf = [0u8; 256];
    loop {
        // SAFETY: reading into a valid buffer from fd 0.
        let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
        if n == 0 {
            return; // EOF: no more input, the guest runs on
        }
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        for &b in &buf[..n as usize] {
            match esc.feed(b) {
                Key::Quit => {
                    let _ = exits.send(VmExit::UserQuit);
                    return;
                }
                Key::Send(bytes) => target.send(&bytes),
                Key::None => {}
            }
        }
    }
}

/// Push bytes into the UART, waiting while its receive FIFO is full.
fn send_all(serial: &Arc<Mutex<Serial>>, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        let n = match serial.lock() {
            Ok(mut s) => s.enqueue_input(bytes),
            Err(_) => return,
        };
        bytes = &bytes[n..];
        if n == 0 {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctrl_a_x_quits_and_ctrl_a_twice_sends_one() {
        let mut e = Escape::default();
        assert_eq!(e.feed(b'a'), Key::Send(vec![b'a']));
        assert_eq!(e.feed(CTRL_A), Key::None);
        assert_eq!(e.feed(CTRL_A), Key::Send(vec![CTRL_A]));
        assert_eq!(e.feed(CTRL_A), Key::None);
        assert_eq!(e.feed(b'q'), Key::Send(vec![CTRL_A, b'q']));
        assert_eq!(e.feed(CTRL_A), Key::None);
        assert_eq!(e.feed(b'x'), Key::Quit);
    }
}
