//! sd_notify(3) and the watchdog, by hand: a datagram to `$NOTIFY_SOCKET` (a path, or an
//! abstract name when it starts with `@`). A dozen lines, so no crate.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// The notification socket of the service manager, when there is one.
#[derive(Debug)]
pub struct Notifier {
    sock: Option<(UnixDatagram, SocketAddr)>,
    last_status: std::cell::RefCell<String>,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`; a no-op notifier when unset or unusable.
    pub fn from_env() -> Notifier {
        let sock = std::env::var_os("NOTIFY_SOCKET").and_then(|p| {
            let p = p.to_string_lossy().into_owned();
            let addr = if let Some(name) = p.strip_prefix('@') {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name.as_bytes()).ok()?
            } else {
                SocketAddr::from_pathname(&p).ok()?
            };
            let s = UnixDatagram::unbound().ok()?;
            // Never block the daemon's loop on a slow or stuck listener.
            s.set_nonblocking(true).ok()?;
            Some((s, addr))
        });
        Notifier {
            sock,
            last_status: std::cell::RefCell::new(String::new()),
        }
    }

    /// Whether a service manager listens.
    pub fn enabled(&self) -> bool {
        self.sock.is_some()
    }

    /// Sends `state` (e.g. `READY=1\nSTATUS=…`) without blocking. Errors are logged, never
    /// fatal. A `STATUS=…` identical to the last one sent is not repeated.
    pub fn notify(&self, state: &str) {
        let Some((s, addr)) = &self.sock else { return };
        if state.starts_with("STATUS=") {
            let mut last = self.last_status.borrow_mut();
            if *last == state {
                return;
            }
            *last = state.to_string();
        }
        if let Err(e) = s.send_to_addr(state.as_bytes(), addr) {
            tracing::warn!("sd_notify failed: {e}");
        }
    }
}

/// `MONOTONIC_USEC=` value: CLOCK_MONOTONIC in microseconds.
pub fn monotonic_usec() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
        .unwrap_or(0)
}

/// The watchdog period to ping at (half of `$WATCHDOG_USEC`), when the watchdog is on for us.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Makes a STATUS= value a single line.
pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
