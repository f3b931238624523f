//! The nftables event socket (NFNLGRP_NFTABLES, what `nft monitor` reads): its notifications
//! turned into triggers, lost ones into a full resync, and the membership a reconcile drops
//! around its large commits.

use std::os::fd::{AsRawFd, RawFd};

use anyhow::{Context, Result};
use tokio::io::unix::AsyncFd;

use super::triggers::{Overflow, Trigger};
use super::TARGET;
use crate::netlink::{Event, NlError, Socket};

/// The subscribed socket and the bookkeeping of lost notifications.
pub(super) struct Monitor {
    sock: AsyncFd<Socket>,
    /// Lost notifications: whether the set cache may be trusted.
    pub overflow: Overflow,
}

impl Monitor {
    /// Subscribes to NFNLGRP_NFTABLES. Equals `nft monitor`.
    pub fn open() -> Result<Monitor> {
        let s = Socket::monitor().context("subscribing to nftables events")?;
        // SAFETY: the socket owns its fd (OwnedFd) for its whole life and never swaps it.
        let sock = unsafe { AsyncFd::register(s) }
            .map_err(|e| anyhow::anyhow!("registering the event socket: {e}"))?;
        Ok(Monitor {
            sock,
            overflow: Overflow::default(),
        })
    }

    /// The socket's fd, for muting it from the reconcile task.
    pub fn raw_fd(&self) -> RawFd {
        self.sock.get_ref().as_raw_fd()
    }

    /// The next batch of notifications, drained without blocking once the socket is readable
    /// (cancel-safe: nothing is read before that). The outer error ends the loop; the inner
    /// one is a failed read, which loses notifications.
    pub async fn next(&mut self) -> Result<Result<Vec<Event>, NlError>> {
        let mut guard = self.sock.readable_mut().await?;
        let events = guard.get_inner_mut().drain_events();
        guard.clear_ready();
        Ok(events)
    }

    /// The notifications already queued, read without waiting (the control socket takes
    /// them in before it answers: every commit made before the question is then known).
    pub fn drain_now(&mut self) -> Result<Vec<Event>, NlError> {
        self.sock.get_mut().drain_events()
    }

    /// The trigger a drained batch (or a failed read) asks for, noting lost notifications.
    pub fn take_in(
        &mut self,
        events: Result<Vec<Event>, NlError>,
        own_pid: u32,
    ) -> Option<Trigger> {
        match events {
            Ok(ev) => {
                let t = Trigger::from_events(&ev, own_pid);
                if t == Some(Trigger::MonitorOverflow) {
                    self.overflow.lost("the event socket's buffer overflowed");
                }
                t
            }
            Err(e) => {
                self.overflow.lost(&format!("reading nftables events: {e}"));
                Some(Trigger::MonitorOverflow)
            }
        }
    }

    /// Joins NFNLGRP_NFTABLES again after a reconcile, whatever happened while muted.
    pub fn listen(&self) {
        if let Err(e) = Socket::set_membership(self.raw_fd(), true) {
            tracing::error!(target: TARGET, "{e}; drift is only seen by the resync timer");
        }
    }

    /// [`Monitor::listen`] without the log line (after a dead reconcile task).
    pub fn listen_quietly(&self) {
        let _ = Socket::set_membership(self.raw_fd(), true);
    }
}
