//! The local terminal and signals: raw mode for `-it`, window size, and forwarding.

use airlock_sandbox::WinSize;
use nix::sys::termios::{self, SetArg, Termios};
use tokio::signal::unix::{signal, Signal, SignalKind};

/// Size of the terminal on our stdout (or stdin), if there is one.
pub fn local_size() -> Option<WinSize> {
    for fd in [1, 0, 2] {
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: TIOCGWINSZ into a valid winsize.
        if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0 && ws.ws_row > 0 {
            return Some(WinSize {
                rows: ws.ws_row,
                cols: ws.ws_col,
            });
        }
    }
    None
}

/// Puts stdin's terminal in raw mode until dropped.
pub struct RawMode {
    saved: Termios,
}

impl RawMode {
    /// `None` when stdin is not a terminal.
    pub fn enable() -> Option<RawMode> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(&stdin, SetArg::TCSANOW, &raw).ok()?;
        Some(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin(), SetArg::TCSANOW, &self.saved);
    }
}

/// What a signal to airlock means for the command.
pub enum SignalEvent {
    /// Forward this signal to the command.
    Forward(i32),
    /// Our terminal changed size.
    Resize,
}

/// Signals airlock handles instead of dying: INT, TERM, HUP, QUIT are forwarded (like
/// `docker run --sig-proxy`), WINCH resizes.
pub struct Signals {
    int: Signal,
    term: Signal,
    hup: Signal,
    quit: Signal,
    winch: Signal,
}

impl Signals {
    pub fn new() -> Result<Signals, String> {
        let s = |k: SignalKind| signal(k).map_err(|e| format!("install signal handler: {e}"));
        Ok(Signals {
            int: s(SignalKind::interrupt())?,
            term: s(SignalKind::terminate())?,
            hup: s(SignalKind::hangup())?,
            quit: s(SignalKind::quit())?,
            winch: s(SignalKind::window_change())?,
        })
    }

    pub async fn next(&mut self) -> SignalEvent {
        tokio::select! {
            _ = self.int.recv() => SignalEvent::Forward(libc::SIGINT),
            _ = self.term.recv() => SignalEvent::Forward(libc::SIGTERM),
            _ = self.hup.recv() => SignalEvent::Forward(libc::SIGHUP),
            _ = self.quit.recv() => SignalEvent::Forward(libc::SIGQUIT),
            _ = self.winch.recv() => SignalEvent::Resize,
        }
    }

    /// The next signal that should end airlock (ignores WINCH).
    pub async fn next_terminating(&mut self) -> i32 {
        loop {
            if let SignalEvent::Forward(s) = self.next().await {
                return s;
            }
        }
    }
}
