//! `masqd run`, the systemd daemon: event sources turned into typed triggers, a pure scheduler,
//! and the thin I/O loop that hands the scheduler's decisions to the engine.
//!
//! The pipeline of `apply`, triggered by start-up, SIGHUP, changes to the config file and
//! flannel's subnet.env (inotify on their directories), nftables change notifications
//! (NFNLGRP_NFTABLES), legacy xtables changes (inotify on the xtables lock file, confirmed by
//! the nat table's entry count and size) and a slow resync timer (a safety net).
//!
//! Bursts coalesce: while a reconcile runs, triggers only mark the state dirty, and one more
//! reconcile follows. The notifications caused by masqd's own transactions carry the port id
//! of its apply socket and are ignored, so it never loops on itself. Failures back off
//! (50 ms doubling to 5 s). The guard (design.md §3.1) keeps excepted sources right whatever
//! else writes NAT rules, so correctness never waits for a repair; the repair rate limit
//! exists only against a writer that keeps undoing masqd's own table or chain (two daemons
//! fighting), where unlimited repairs would burn CPU and flood the ruleset. Removing a
//! re-added broad rule (Docker's restarts) is never rate-limited.
//! Idle means idle: besides the resync timer, the watchdog and (while a legacy nat table is
//! loaded) a 5 s look at its info without a binary, nothing wakes the loop but
//! events. Stopping leaves the rules in place.
//!
//! Layout: [`triggers`] (what asks for a reconcile), [`scheduler`] (when it runs: coalescing,
//! backoff, repair rate limit, READY and reload decisions, resync and trim deadlines; no I/O,
//! the clock is passed in), `view` (the live configuration and the STATUS= line), `reconcile`
//! (the one call into the engine), `watch` (inotify), `legacy` (the legacy change source),
//! `signals` (signalfd), [`notify`]
//! (sd_notify), `control` (the control socket's server) and `run` (start-up and the select
//! loop).

mod control;
mod follow;
mod legacy;
mod monitor;
pub mod notify;
mod reconcile;
mod run;
pub mod scheduler;
mod signals;
pub mod triggers;
mod view;
mod watch;

pub use run::run;
pub use signals::{block_signals, unblock_signals};
pub use triggers::relevant;

/// EX_CONFIG: the configuration is broken at start-up.
pub const EX_CONFIG: u8 = 78;

/// The target of the daemon's log lines (the module path they had before the split, which the
/// JSON and journal formats show).
const TARGET: &str = "masqd::daemon";
