//! The signals `masqd run` acts on (SIGHUP reloads, SIGTERM and SIGINT stop): blocked from the
//! first moment and read from a signalfd by the loop, with the `masqd check --reload` helper
//! that sent a SIGHUP remembered for its answer.

use std::os::fd::{AsFd, AsRawFd, RawFd};

use anyhow::{Context, Result};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use tokio::io::unix::AsyncFd;

use super::TARGET;

/// An fd-owning value that tokio's `AsyncFd` can watch.
pub(super) struct Fd<T: AsFd>(pub T);

impl<T: AsFd> AsRawFd for Fd<T> {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// The signals `masqd run` acts on: SIGHUP (reload), SIGTERM and SIGINT (stop).
fn handled_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [Signal::SIGHUP, Signal::SIGTERM, Signal::SIGINT] {
        set.add(s);
    }
    set
}

/// Blocks SIGHUP, SIGTERM and SIGINT in the calling thread and every thread it starts later
/// (`sigprocmask(SIG_BLOCK, …)`): from then on such a signal waits, pending, until the loop
/// reads it from its signalfd, so one that arrives during start-up does what it means instead
/// of killing the process (a SIGHUP's default action). The first thing `masqd run` does.
pub fn block_signals() {
    if let Err(e) = handled_signals().thread_block() {
        tracing::warn!(target: TARGET, "blocking SIGHUP/SIGTERM/SIGINT: {e}");
    }
}

/// Undoes [`block_signals`] (for the one-shot commands, which keep the default actions).
pub fn unblock_signals() {
    if let Err(e) = handled_signals().thread_unblock() {
        tracing::warn!(target: TARGET, "unblocking SIGHUP/SIGTERM/SIGINT: {e}");
    }
}

/// The blocked signals, read by the loop through a signalfd (pending ones included).
pub(super) struct Signals {
    fd: AsyncFd<Fd<SignalFd>>,
    /// The pid of the `masqd check --reload` helper behind the last SIGHUP read.
    requester: std::cell::Cell<Option<i32>>,
}

impl Signals {
    /// `signalfd(2)` over the blocked signals (blocking them first).
    pub fn new() -> Result<Signals> {
        block_signals();
        let fd = SignalFd::with_flags(
            &handled_signals(),
            SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC,
        )
        .context("signalfd")?;
        // SAFETY: the SignalFd owns its fd for its whole life and never swaps it.
        let fd = unsafe { AsyncFd::register(Fd(fd)) }
            .map_err(|e| anyhow::anyhow!("registering the signalfd: {e}"))?;
        Ok(Signals {
            fd,
            requester: std::cell::Cell::new(None),
        })
    }

    /// The next signal (cancel-safe: a signal is only taken from the fd when returned).
    pub async fn recv(&self) -> Result<Signal> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.get_inner().0.read_signal() {
                Ok(Some(info)) => {
                    // `masqd check --reload PID` (the unit's ExecReload) waits for its ack.
                    if crate::check::is_reload_request(&info) {
                        self.requester.set(Some(info.ssi_pid as i32));
                    }
                    return Signal::try_from(info.ssi_signo as i32).context("signalfd");
                }
                Ok(None) | Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
                Err(e) => return Err(e).context("reading the signalfd"),
            }
        }
    }

    /// The helper waiting for the answer to the SIGHUP just read, if one sent it.
    pub fn take_requester(&self) -> Option<i32> {
        self.requester.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn blocked_signals_are_read_from_the_signalfd() {
        // In a thread of its own: the mask is per thread.
        std::thread::spawn(|| {
            block_signals();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let signals = Signals::new().unwrap();
                // A SIGHUP sent to this very thread before anyone reads: pending, then read.
                // SAFETY: a signal to the calling thread, which has it blocked.
                assert_eq!(
                    unsafe { libc::pthread_kill(libc::pthread_self(), libc::SIGHUP) },
                    0
                );
                let got = tokio::time::timeout(Duration::from_secs(5), signals.recv()).await;
                assert_eq!(got.unwrap().unwrap(), Signal::SIGHUP);
                assert_eq!(signals.take_requester(), None, "not from a reload helper");
            });
            unblock_signals();
        })
        .join()
        .unwrap();
    }
}
