//! Start-up of `masqd run` and its I/O loop: every event source (signals, nftables
//! notifications, inotify, the resync, retry and trim deadlines, the watchdog) awaited in one
//! `select!`, each turned into a trigger for the scheduler, whose decisions start reconciles
//! and send the sd_notify states.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Result;
use nix::sys::inotify::InotifyEvent;
use nix::sys::signal::Signal;
use tokio::task::JoinError;

use super::control::{Control, Question, Snapshot};
use super::follow::Follow;
use super::legacy::{lockfile, LegacyWatch};
use super::monitor::Monitor;
use super::notify::{self as systemd, Notifier};
use super::reconcile::{Inputs, Output, Reconciler};
use super::scheduler::{Outcome, Scheduler};
use super::signals::{block_signals, Signals};
use super::triggers::Trigger;
use super::view::{Reloaded, View};
use super::watch::Watcher;
use super::{EX_CONFIG, TARGET};
use crate::config::watch_paths;
use crate::config::{self, Loaded};
use crate::engine::Paths;
use crate::netlink::{Event, NlError};

/// Runs the daemon until SIGTERM/SIGINT. A broken configuration at start-up exits with 78.
pub fn run(paths: Paths) -> ExitCode {
    // Before anything else: a signal during start-up waits for the loop (see block_signals).
    block_signals();
    tracing::info!(
        target: TARGET,
        version = env!("CARGO_PKG_VERSION"),
        config = %paths.config.display(),
        "masqd {} starting with {}",
        env!("CARGO_PKG_VERSION"),
        paths.config.display()
    );
    match start(paths) {
        Ok(code) | Err(code) => code,
    }
}

/// Reports the error that ends the daemon; exit status 1.
fn fatal(e: &dyn std::fmt::Display) -> ExitCode {
    crate::logging::report_error(e);
    ExitCode::from(1)
}

/// The start-up of [`run`], up to the loop and through it: `Err` carries an early exit.
fn start(paths: Paths) -> Result<ExitCode, ExitCode> {
    let first = first_config(&paths.source)?;
    // Held until the process ends: `apply` and `teardown` are refused meanwhile (state.rs).
    let _state_lock = match crate::state::State::new(&paths.state_dir).lock_daemon() {
        Ok(l) => l,
        Err(e) if e.to_string() == crate::state::STOPPED_WAITING => {
            tracing::info!(target: TARGET, "{e}: stopping before installing anything");
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) => return Err(fatal(&format_args!("{e:#}"))),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| fatal(&format_args!("starting the runtime: {e}")))?;
    let signals = rt
        .block_on(async { Signals::new() })
        .map_err(|e| fatal(&format_args!("{e:#}")))?;
    let cfg = match first {
        Some(c) => c,
        None => match rt.block_on(wait_for_config(&paths, &signals)) {
            Ok(Some(c)) => c,
            Ok(None) => return Ok(ExitCode::SUCCESS),
            Err(e) => return Err(fatal(&format_args!("{e:#}"))),
        },
    };
    let exporter = crate::metrics::Exporter::start(&cfg).map_err(|e| {
        crate::logging::report_error(&format_args!("{e}"));
        Notifier::from_env().notify(&format!("STATUS={}", systemd::one_line(&e)));
        ExitCode::from(EX_CONFIG)
    })?;
    if let Some(m) = exporter.metrics() {
        m.config_read(true);
    }
    match rt.block_on(main_loop(paths, cfg, signals, exporter)) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => Err(fatal(&format_args!("{e:#}"))),
    }
}

/// The configuration at start-up; None while a file it names is still missing. A broken one
/// exits with [`EX_CONFIG`].
fn first_config(source: &config::Source) -> Result<Option<Loaded>, ExitCode> {
    match Loaded::load(source) {
        Ok(c) => Ok(Some(c)),
        // A file the config names (flannel's subnet.env) may appear only once flannel runs,
        // which may itself wait for kubelet: start, report, and wait for it.
        Err(e) if e.missing_file => {
            tracing::warn!(target: TARGET, "waiting: {e}");
            Ok(None)
        }
        Err(e) => {
            crate::logging::report_error(&e);
            let n = Notifier::from_env();
            n.notify(&format!(
                "STATUS={}",
                systemd::one_line(&format!("config error: {e}"))
            ));
            Err(ExitCode::from(EX_CONFIG))
        }
    }
}

/// Start-up with a file the config names still missing: READY (so that units ordered after
/// masqd, kubelet among them, can start), STATUS says what is awaited, the config is tried
/// again every 2 s. None when stopped while waiting.
async fn wait_for_config(paths: &Paths, signals: &Signals) -> Result<Option<Loaded>> {
    let n = Notifier::from_env();
    let wd = systemd::watchdog_interval();
    let mut watchdog = tokio::time::interval(wd.unwrap_or(Duration::from_secs(3600)));
    let mut retry = tokio::time::interval(Duration::from_secs(2));
    let mut told = false;
    loop {
        match Loaded::load(&paths.source) {
            Ok(c) => return Ok(Some(c)),
            Err(e) => {
                n.notify(&format!(
                    "STATUS={}",
                    systemd::one_line(&format!("waiting, no rules installed yet: {e}"))
                ));
                if !told {
                    n.notify("READY=1");
                    told = true;
                }
                if !e.missing_file {
                    tracing::error!(target: TARGET, "{e}");
                }
            }
        }
        tokio::select! {
            sig = signals.recv() => {
                if sig? != Signal::SIGHUP {
                    n.notify("STOPPING=1");
                    return Ok(None);
                }
                crate::check::acknowledge_reload(signals.take_requester(), true);
            }
            _ = retry.tick() => {}
            _ = watchdog.tick(), if wd.is_some() => n.notify("WATCHDOG=1"),
        }
    }
}

/// What woke the loop.
enum Wake {
    /// The reconcile task ended (or died).
    Reconciled(Box<Result<Output, JoinError>>),
    Signal(Signal),
    Netlink(Result<Vec<Event>, NlError>),
    Files(Vec<InotifyEvent>),
    /// Events on the xtables lock file.
    Legacy(Vec<InotifyEvent>),
    /// The cheap look at the legacy nat tables' info.
    LegacyPoll,
    Resync,
    FullVerify,
    Watchdog,
    /// The owed reconcile's time came.
    Due,
    Trim,
    /// A question on the control socket.
    Control(Question),
}

/// The daemon's state around the loop.
struct Daemon {
    paths: Paths,
    notifier: Notifier,
    view: View,
    sched: Scheduler,
    /// `masqd check --reload` helpers waiting for the outcome of the pending reload.
    reload_requesters: Vec<i32>,
    /// `/metrics` and `/healthz`, when `[metrics] listen` is set.
    exporter: crate::metrics::Exporter,
    reconciler: Reconciler,
    monitor: Monitor,
    /// What the event stream says beyond triggers (facts changes, trust in the set cache).
    follow: Follow,
    watcher: Watcher,
    legacy: LegacyWatch,
    /// The control socket (`masqd status`, `masqd plan`).
    control: Control,
}

/// How often the legacy nat tables' info is sampled without an event (one getsockopt per
/// family, no binary), while a legacy nat table is loaded: changes by a writer that does not
/// take the xtables lock.
const LEGACY_POLL: Duration = Duration::from_secs(5);

async fn main_loop(
    paths: Paths,
    cfg: Loaded,
    signals: Signals,
    exporter: crate::metrics::Exporter,
) -> Result<()> {
    let mut d = Daemon::new(paths, cfg, exporter)?;
    let wd_period = systemd::watchdog_interval();
    let mut watchdog = tokio::time::interval(wd_period.unwrap_or(Duration::from_secs(3600)));
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut legacy_poll = tokio::time::interval(LEGACY_POLL);
    legacy_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    d.status();

    loop {
        d.start_due();
        d.serve_control();
        let far = Instant::now() + Duration::from_secs(86_400);
        let due = tokio::time::Instant::from_std(d.sched.next_start().unwrap_or(far));
        let resync_at = tokio::time::Instant::from_std(d.sched.resync_at());
        let trim_at = d.sched.trim_at();
        let full_at = d.sched.full_verify_at();
        let full = tokio::time::Instant::from_std(full_at.unwrap_or(far));
        let trim = tokio::time::Instant::from_std(trim_at.unwrap_or(far));
        let wake = tokio::select! {
            r = d.reconciler.wait() => Wake::Reconciled(Box::new(r)),
            sig = signals.recv() => Wake::Signal(sig?),
            ev = d.monitor.next() => Wake::Netlink(ev?),
            evs = d.watcher.next() => Wake::Files(evs?),
            evs = d.legacy.next() => Wake::Legacy(evs?),
            _ = legacy_poll.tick(), if d.legacy.nat_loaded() => Wake::LegacyPoll,
            _ = tokio::time::sleep_until(resync_at) => Wake::Resync,
            _ = tokio::time::sleep_until(full), if full_at.is_some() => Wake::FullVerify,
            _ = watchdog.tick(), if wd_period.is_some() => Wake::Watchdog,
            _ = tokio::time::sleep_until(due) => Wake::Due,
            _ = tokio::time::sleep_until(trim), if trim_at.is_some() => Wake::Trim,
            q = d.control.next() => Wake::Control(q),
        };
        match wake {
            Wake::Reconciled(r) => match *r {
                Ok(out) => d.reconciled(out),
                Err(e) => d.task_died(e)?,
            },
            Wake::Signal(Signal::SIGHUP) => d.sighup(signals.take_requester()),
            Wake::Signal(_) => break,
            Wake::Netlink(ev) => d.netlink(ev),
            Wake::Files(evs) => d.files_changed(&evs),
            Wake::Legacy(evs) => {
                if d.legacy.take_in(&evs) {
                    d.legacy_check();
                }
            }
            Wake::LegacyPoll => d.legacy_check(),
            Wake::Resync => d.sched.resync_due(Instant::now()),
            Wake::FullVerify => d.sched.full_verify_due(Instant::now()),
            Wake::Watchdog => d.notifier.notify("WATCHDOG=1"),
            Wake::Due => {}
            Wake::Trim => d.trim(),
            Wake::Control(q) => d.control.park(q),
        }
    }

    d.notifier.notify("STOPPING=1");
    tracing::info!(target: TARGET, "stopping; the rules stay in place");
    d.reconciler.drain().await;
    Ok(())
}

impl Daemon {
    /// Opens the sockets and watches the loop reads, with the configuration read at start.
    fn new(paths: Paths, cfg: Loaded, exporter: crate::metrics::Exporter) -> Result<Daemon> {
        let view = View::new(cfg);
        let watcher = Watcher::new(&watch_paths(&paths.config, &view.cfg))?;
        Ok(Daemon {
            sched: Scheduler::new(Instant::now(), view.resync()),
            control: Control::open(&paths),
            paths,
            notifier: Notifier::from_env(),
            view,
            reload_requesters: Vec::new(),
            exporter,
            reconciler: Reconciler::open()?,
            monitor: Monitor::open()?,
            follow: Follow::default(),
            watcher,
            legacy: LegacyWatch::new(lockfile())?,
        })
    }

    /// Sends STATUS= (not repeated when unchanged).
    fn status(&self) {
        let s = self.view.status_line(self.sched.repairs());
        self.notifier
            .notify(&format!("STATUS={}", systemd::one_line(&s)));
    }

    /// Answers the control socket's waiting questions once no reconcile runs or is due, the
    /// notifications already queued taken in first (see `control`).
    fn serve_control(&mut self) {
        if !self.control.waiting() {
            return;
        }
        let ev = self.monitor.drain_now();
        self.netlink(ev);
        self.start_due();
        if !self.reconciler.idle() {
            return;
        }
        self.control.serve(Snapshot {
            mirror: self.reconciler.mirror(),
            trusted: self.sched.next_start().is_none() && self.sched.ready(),
            policy: self.view.policy.clone(),
            mode: self.view.cfg.mode,
            last_reconcile: self.view.last_reconcile().to_string(),
            config_error: self.view.config_error.clone(),
        });
    }

    /// Starts the owed reconcile when the scheduler says its time has come.
    fn start_due(&mut self) {
        if !self.reconciler.idle() {
            return;
        }
        let Some(s) = self.sched.start(Instant::now()) else {
            return;
        };
        let full = self.monitor.overflow.starting() || s.full;
        let follow = self.follow.starting();
        let reads_all = s.trigger.reads_all_rules()
            || (s.trigger == Trigger::Resync && self.follow.overridden_stale());
        if reads_all {
            self.follow.overridden_read();
        }
        self.legacy.starting();
        self.reconciler.start(Inputs {
            trigger: s.trigger,
            cfg: self.view.cfg.clone(),
            policy: self.view.policy.clone(),
            state_dir: self.paths.state_dir.clone(),
            full,
            follow,
            monitor_fd: self.monitor.raw_fd(),
            overridden_to: self.exporter.metrics().filter(|_| reads_all),
        });
    }

    /// A reconcile ended: metrics, logs, READY=1, STATUS, and what the scheduler owes next.
    fn reconciled(&mut self, out: Output) {
        // Listen again whatever happened while muted.
        self.monitor.listen();
        let sets_kept = self.follow.ended();
        let overflow = &mut self.monitor.overflow;
        let f = self.reconciler.finished(out, |ok| overflow.ended(ok));
        if !sets_kept {
            self.reconciler.forget_sets();
        }
        if let (Some(m), Some(d)) = (self.exporter.metrics(), self.reconciler.dumps()) {
            m.dumps(&d);
        }
        let now = Instant::now();
        let changed = f.result.as_ref().is_ok_and(|p| !p.is_empty());
        if let Some(m) = self.exporter.metrics() {
            let repair = self.sched.is_repair(f.trigger);
            self.view.metrics(&m, &f.result, f.took, repair);
        }
        let outcome = match &f.result {
            Ok(p) => Outcome::Applied {
                changed,
                touches_own: p.touches_own(),
                missed_events: p.missed_events,
            },
            Err(_) => Outcome::Failed,
        };
        let e = self.sched.ended(now, outcome);
        match &f.result {
            Ok(plan) => {
                self.view.applied(f.trigger, plan, f.took, &e);
                if e.became_ready {
                    self.status();
                    self.notifier.notify("READY=1");
                    self.view.log_ready(plan);
                }
            }
            Err(err) => {
                let (attempt, wait) = e.retry.unwrap_or_default();
                self.view.failed(f.trigger, err, attempt, wait);
            }
        }
        self.status();
        if e.ends_reload {
            self.notifier.notify("READY=1");
            for pid in std::mem::take(&mut self.reload_requesters) {
                crate::check::acknowledge_reload(Some(pid), f.result.is_ok());
            }
        }
        self.sched
            .set_resync_period(Instant::now(), self.view.resync());
        self.sched
            .set_full_verify_period(Instant::now(), self.view.cfg.full_verify_interval);
        let legacy_applied = f
            .result
            .as_ref()
            .map_or(true, |p| !p.legacy_plans().is_empty());
        if let Some(t) = self.legacy.ended(legacy_applied) {
            self.sched.trigger(t);
        }
    }

    /// The legacy nat tables' info may have changed: a reconcile when it did.
    fn legacy_check(&mut self) {
        if let Some(t) = self.legacy.check() {
            self.sched.trigger(t);
        }
    }

    /// The blocking task panicked: a fresh socket, and retry.
    fn task_died(&mut self, e: JoinError) -> Result<()> {
        tracing::error!(target: TARGET, "reconcile task failed: {e}");
        self.reconciler.crashed()?;
        self.monitor.overflow.ended(false);
        self.monitor.listen_quietly();
        self.legacy.ended(true);
        self.sched.crashed();
        self.sched
            .set_resync_period(Instant::now(), self.view.resync());
        self.sched
            .set_full_verify_period(Instant::now(), self.view.cfg.full_verify_interval);
        Ok(())
    }

    /// SIGHUP: RELOADING=1 (once ready), the configuration read again, a resync.
    fn sighup(&mut self, requester: Option<i32>) {
        if self.sched.reload_requested() {
            self.notifier.notify(&format!(
                "RELOADING=1\nMONOTONIC_USEC={}",
                systemd::monotonic_usec()
            ));
        }
        // The ExecReload helper is answered after RELOADING=1 (systemd then waits for
        // READY=1): at once when the configuration is refused, else once the reload's
        // reconcile ended, with its outcome.
        self.reload("SIGHUP");
        if self.view.config_error.is_some() || !self.sched.ready() {
            crate::check::acknowledge_reload(requester, self.view.config_error.is_none());
        } else {
            self.reload_requesters.extend(requester);
        }
        self.watcher
            .rearm(&watch_paths(&self.paths.config, &self.view.cfg));
        self.sched.trigger(Trigger::Reload);
    }

    /// Re-reads the configuration. A broken one keeps the last good policy and the kernel
    /// state (see [`View::offer`]); a new metrics address that cannot be bound refuses the
    /// whole configuration.
    fn reload(&mut self, why: &str) {
        let exporter = &mut self.exporter;
        let r = self
            .view
            .reload(why, &self.paths.source, |cfg| exporter.reconfigure(cfg));
        if let Some(m) = self.exporter.metrics() {
            m.config_read(r != Reloaded::Refused);
        }
        if r == Reloaded::Changed {
            self.sched.config_changed(Instant::now());
        }
        self.status();
    }

    /// nftables notifications (or a failed read of them).
    fn netlink(&mut self, ev: Result<Vec<Event>, NlError>) {
        let own_pid = self.reconciler.own_pid();
        let closed = match &ev {
            Ok(evs) => self.follow.take_in(evs, own_pid),
            Err(_) => {
                self.follow.lost();
                false
            }
        };
        match self.monitor.take_in(ev, own_pid) {
            // Someone else's element changes are still being read: the reconcile waits for
            // their `NEWGEN` (the `closed` below), so that it starts with them in hand.
            Some(Trigger::NetlinkEvent) if self.follow.elements_pending() => {}
            Some(t) => self.sched.trigger(t),
            None => {}
        }
        if closed {
            self.sched.trigger(Trigger::NetlinkEvent);
        }
    }

    /// inotify events in the watched directories.
    fn files_changed(&mut self, evs: &[InotifyEvent]) {
        let files = watch_paths(&self.paths.config, &self.view.cfg);
        if self.watcher.changed(evs, &files) {
            self.reload("configuration file changed");
            self.watcher
                .rearm(&watch_paths(&self.paths.config, &self.view.cfg));
        }
    }

    /// The trim deadline: give back what a large reconcile allocated (parse trees, the batch
    /// buffer), so the idle daemon's resident size is its state, not its peak.
    fn trim(&mut self) {
        if self.sched.trim(Instant::now()) {
            #[cfg(target_env = "gnu")]
            // SAFETY: malloc_trim only releases free heap memory.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    }
}
