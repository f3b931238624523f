//! When the daemon reconciles, decided without I/O and without reading the clock (every
//! method that needs the time takes `now`): coalescing of triggers, the earliest start
//! (`not_before`), the failure backoff, the repair rate limit, READY=1 and the end of a reload,
//! the resync deadline and when to give memory back. The I/O loop asks it what to do and when,
//! and reports every outcome to it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::triggers::Trigger;

/// Repairs in this window before the rate limit kicks in.
pub const REPAIR_WINDOW: Duration = Duration::from_secs(10);
/// How many repairs of masqd's own objects [`REPAIR_WINDOW`] allows.
pub const REPAIR_BURST: usize = 20;
/// The spacing of repairs while rate-limited.
const RATE_LIMITED_SPACING: Duration = Duration::from_secs(1);
/// Heap memory is given back this long after the last reconcile.
const TRIM_DELAY: Duration = Duration::from_secs(1);
/// tokio's interval treats a tick later than this as missed (and then delays the next one).
const LATE_TICK: Duration = Duration::from_millis(5);

/// The wait after the `failures`-th failure in a row: 50 ms doubling, at most 5 s.
pub fn backoff(failures: u32) -> Duration {
    Duration::from_millis(50)
        .saturating_mul(1u32 << failures.min(7))
        .min(Duration::from_secs(5))
}

/// The resync period: the configured one, else 60 s, legacy xtables in use or not: legacy
/// changes are seen through the xtables lock file and the nat table's info (`daemon::legacy`),
/// so the resync is only a safety net there too.
/// (`_legacy_in_use` stays for the callers that pass it.)
pub fn resync_period(configured: Option<Duration>, _legacy_in_use: bool) -> Duration {
    configured.unwrap_or(Duration::from_secs(60))
}

/// A reconcile the loop should start now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Start {
    /// Why (the reason in its logs).
    pub trigger: Trigger,
    /// It ends a reload: READY=1 follows it, whatever its outcome.
    pub ends_reload: bool,
    /// It reads everything back (the full verification was due), trusting no cache.
    pub full: bool,
}

/// How a reconcile ended, as far as scheduling cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Applied (or found in sync).
    Applied {
        /// It changed something.
        changed: bool,
        /// Among the changes, repairs of masqd's own objects (`Plan::touches_own`), as
        /// opposed to only removing a re-added broad default rule.
        touches_own: bool,
        /// The ruleset changed while notifications were muted: reconcile again.
        missed_events: bool,
    },
    /// Failed.
    Failed,
}

/// What the loop does after a reconcile ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ended {
    /// It was a repair (counted in STATUS): the daemon was ready, and not a config change.
    pub repair: bool,
    /// The first success: STATUS, READY=1 and the "ready" log line.
    pub became_ready: bool,
    /// It ended a reload: READY=1 and the `check --reload` helpers get their answer.
    pub ends_reload: bool,
    /// Repairs crossed the limit just now: warn once, with this many in the window.
    pub rate_limit_warning: Option<usize>,
    /// Failed: the attempt number and the wait before the next one.
    pub retry: Option<(u32, Duration)>,
}

/// The daemon's scheduling state.
#[derive(Debug)]
pub struct Scheduler {
    pending: Option<Trigger>,
    not_before: Instant,
    /// The reconcile running, and whether it ends a reload.
    running: Option<Start>,
    failures: u32,
    ready: bool,
    /// A SIGHUP asked for a reload: the next reconcile to start ends it.
    reload_pending: bool,
    repairs: u64,
    repair_times: VecDeque<Instant>,
    rate_limited: bool,
    trim_at: Option<Instant>,
    resync_period: Duration,
    resync_at: Instant,
    /// `daemon.full_verify_interval` and its next deadline (None: never).
    full_verify: Option<(Duration, Instant)>,
    /// A full verification is owed: the next reconcile to start reads everything.
    full_owed: bool,
}

impl Scheduler {
    /// At start-up: one reconcile due at once, the first resync one period later.
    pub fn new(now: Instant, resync_period: Duration) -> Scheduler {
        Scheduler {
            pending: Some(Trigger::Start),
            not_before: now,
            running: None,
            failures: 0,
            ready: false,
            reload_pending: false,
            repairs: 0,
            repair_times: VecDeque::new(),
            rate_limited: false,
            trim_at: None,
            resync_period,
            resync_at: now + resync_period,
            full_verify: None,
            full_owed: false,
        }
    }

    /// A trigger: one reconcile is owed; if one is owed already, it covers this one too (and
    /// keeps its reason).
    pub fn trigger(&mut self, t: Trigger) {
        self.pending.get_or_insert(t);
    }

    /// A reload adopted a new configuration: a reconcile under that reason, due at once (it
    /// does not wait out a backoff or the rate limit).
    pub fn config_changed(&mut self, now: Instant) {
        self.pending = Some(Trigger::ConfigChanged);
        self.not_before = now;
    }

    /// SIGHUP: whether a reload is announced (RELOADING=1). Before the first READY=1 there
    /// is none: the configuration is read again and start-up goes on with it.
    pub fn reload_requested(&mut self) -> bool {
        if self.ready {
            self.reload_pending = true;
        }
        self.ready
    }

    /// Whether the first reconcile succeeded (READY=1 was sent).
    pub fn ready(&self) -> bool {
        self.ready
    }

    /// Repairs so far (reconciles that changed something after READY=1, config changes
    /// aside).
    pub fn repairs(&self) -> u64 {
        self.repairs
    }

    /// Whether a reconcile under `t` that changes something counts as a repair.
    pub fn is_repair(&self, t: Trigger) -> bool {
        self.ready && t != Trigger::ConfigChanged
    }

    /// The reconcile to start now, if one is owed, none runs and its time has come. The first
    /// one to start after a SIGHUP ends the reload, not one already running with the old
    /// configuration.
    pub fn start(&mut self, now: Instant) -> Option<Start> {
        if self.running.is_some() || now < self.not_before {
            return None;
        }
        let trigger = self.pending.take()?;
        let s = Start {
            trigger,
            ends_reload: std::mem::take(&mut self.reload_pending),
            full: std::mem::take(&mut self.full_owed),
        };
        self.running = Some(s);
        Some(s)
    }

    /// When the owed reconcile may start (None: nothing owed, or one runs).
    pub fn next_start(&self) -> Option<Instant> {
        (self.running.is_none() && self.pending.is_some()).then_some(self.not_before)
    }

    /// Whether a reconcile runs.
    pub fn running(&self) -> bool {
        self.running.is_some()
    }

    /// The running reconcile ended with `outcome`.
    pub fn ended(&mut self, now: Instant, outcome: Outcome) -> Ended {
        let Some(run) = self.running.take() else {
            return Ended::default();
        };
        self.trim_at = Some(now + TRIM_DELAY);
        let mut e = Ended {
            ends_reload: run.ends_reload,
            ..Ended::default()
        };
        match outcome {
            Outcome::Applied {
                changed,
                touches_own,
                missed_events,
            } => {
                if missed_events {
                    self.trigger(Trigger::MissedEvents);
                }
                self.failures = 0;
                if changed && self.is_repair(run.trigger) {
                    e.repair = true;
                    self.repairs += 1;
                    if touches_own {
                        e.rate_limit_warning = self.repaired(now);
                    }
                }
                e.became_ready = !std::mem::replace(&mut self.ready, true);
            }
            Outcome::Failed => {
                self.failures += 1;
                let wait = backoff(self.failures);
                e.retry = Some((self.failures, wait));
                // Retried under its own reason: a configuration change that succeeds on the
                // second attempt is still a configuration change, not a repair.
                self.trigger(run.trigger);
                self.not_before = now + wait;
            }
        }
        e
    }

    /// Counts a repair of masqd's own objects; past the limit, repairs are spaced a second
    /// apart. The count in the window when the limit is first crossed.
    fn repaired(&mut self, now: Instant) -> Option<usize> {
        self.repair_times.push_back(now);
        while self
            .repair_times
            .front()
            .is_some_and(|t| now.duration_since(*t) > REPAIR_WINDOW)
        {
            self.repair_times.pop_front();
        }
        if self.repair_times.len() < REPAIR_BURST {
            self.rate_limited = false;
            return None;
        }
        self.not_before = now + RATE_LIMITED_SPACING;
        (!std::mem::replace(&mut self.rate_limited, true)).then_some(self.repair_times.len())
    }

    /// The reconcile task died (not a failed reconcile): the same work again under
    /// [`Trigger::Retry`], and a reload it was to end is still owed its READY=1.
    pub fn crashed(&mut self) {
        if let Some(run) = self.running.take() {
            self.reload_pending |= run.ends_reload;
        }
        self.trigger(Trigger::Retry);
    }

    /// When the next resync is due.
    pub fn resync_at(&self) -> Instant {
        self.resync_at
    }

    /// The resync timer fired at `now`: a reconcile is owed, and the next deadline is one
    /// period after this one (after `now` when this tick came late, as tokio's
    /// `MissedTickBehavior::Delay`).
    pub fn resync_due(&mut self, now: Instant) {
        self.trigger(Trigger::Resync);
        self.resync_at = if now > self.resync_at + LATE_TICK {
            now + self.resync_period
        } else {
            self.resync_at + self.resync_period
        };
    }

    /// After a reconcile: the period it implies (the backend may have changed). A new period
    /// starts counting from `now`; the same one keeps its deadline.
    pub fn set_resync_period(&mut self, now: Instant, period: Duration) {
        if period != self.resync_period {
            self.resync_period = period;
            self.resync_at = now + period;
        }
    }

    /// When the next full verification is due (None: never).
    pub fn full_verify_at(&self) -> Option<Instant> {
        self.full_verify.map(|(_, at)| at)
    }

    /// The full verification timer fired at `now`: a reconcile that reads everything back is
    /// owed (whatever else it coalesces with), the next one a period later.
    pub fn full_verify_due(&mut self, now: Instant) {
        if let Some((period, at)) = &mut self.full_verify {
            *at = now + *period;
            self.full_owed = true;
            self.trigger(Trigger::FullVerify);
        }
    }

    /// `daemon.full_verify_interval` now in force (None: never). A new period counts from
    /// `now`; the same one keeps its deadline.
    pub fn set_full_verify_period(&mut self, now: Instant, period: Option<Duration>) {
        if self.full_verify.map(|(p, _)| p) != period {
            self.full_verify = period.map(|p| (p, now + p));
        }
    }

    /// When to give freed heap memory back to the kernel, if it is owed: a second after the
    /// last reconcile, so bursts of reconciles keep their pages and an idle daemon stays small.
    pub fn trim_at(&self) -> Option<Instant> {
        self.trim_at
    }

    /// The trim deadline came: whether to trim now. While a reconcile runs it waits a second
    /// more (never spin).
    pub fn trim(&mut self, now: Instant) -> bool {
        if self.running.is_some() {
            self.trim_at = Some(now + TRIM_DELAY);
            false
        } else if self.trim_at.is_some_and(|t| now >= t) {
            self.trim_at = None;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests;
