//! `masqd run`: the systemd daemon. The pipeline of `apply`, triggered by start-up, SIGHUP,
//! changes to the config file and flannel's subnet.env (inotify on their directories), nftables
//! change notifications (NFNLGRP_NFTABLES) and a resync timer (the only way to see legacy
//! drift).
//!
//! Bursts coalesce: while a reconcile runs, triggers only mark the state dirty, and one more
//! reconcile follows. The notifications caused by masqd's own transactions carry the port id
//! of its apply socket and are ignored, so it never loops on itself. Failures back off
//! (50 ms doubling to 5 s). The guard (design.md §3.1) keeps excepted sources right whatever
//! else writes NAT rules, so correctness never waits for a repair; the repair rate limit
//! exists only against a writer that keeps undoing masqd's own table or chain (two daemons
//! fighting), where unlimited repairs would burn CPU and flood the ruleset. Removing a
//! re-added broad rule (Docker's restarts) is never rate-limited.
//! Idle means idle: besides the resync timer and the watchdog, nothing wakes the loop but
//! events. Stopping leaves the rules in place.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use tokio::io::unix::AsyncFd;
use tokio::task::JoinHandle;

use crate::backend::nft::netlink::{Event, Socket};
use crate::backend::nft::SetCache;
use crate::config::{self, Config};
use crate::detect::Backend;
use crate::engine::{self, Paths, Plan};
use crate::policy::{Family, Policy};
use crate::systemd::{self, Notifier};

/// EX_CONFIG: the configuration is broken at start-up.
pub const EX_CONFIG: u8 = 78;
const NFPROTO_INET: u8 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
const NFT_MSG_NEWGEN: u16 = 15;
/// Repairs in this window before the rate limit kicks in.
const REPAIR_WINDOW: Duration = Duration::from_secs(10);
const REPAIR_BURST: usize = 20;

struct Fd<T: AsFd>(T);

/// Lost nftables notifications (`ENOBUFS` on the event socket, or an error reading it): a full
/// reconcile that trusts no set cache follows, and each burst is logged once, with its end.
#[derive(Debug, Default)]
struct Overflow {
    /// The current burst was logged.
    warned: bool,
    /// Notifications were lost since the last reconcile started.
    unseen: bool,
    /// The reconcile now running started after lost notifications.
    covered: bool,
}

impl Overflow {
    fn lost(&mut self, why: &str) {
        if !std::mem::replace(&mut self.warned, true) {
            tracing::warn!("nftables notifications were lost ({why}): resyncing everything");
        }
        self.unseen = true;
    }

    /// A reconcile starts: whether it must read everything (no cache).
    fn starting(&mut self) -> bool {
        self.covered = std::mem::take(&mut self.unseen);
        self.covered
    }

    /// A reconcile ended: whether its set cache may be kept.
    fn ended(&mut self, ok: bool) -> bool {
        let covered = std::mem::take(&mut self.covered);
        if !ok {
            self.unseen |= covered;
        } else if covered && !self.unseen {
            self.warned = false;
            tracing::info!("resynced with the kernel after lost nftables notifications");
        }
        !self.unseen
    }
}

impl<T: AsFd> AsRawFd for Fd<T> {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// Whether a notification concerns masqd: its own table, or the nat tables where default rules
/// live, changed by someone else (or lost notifications).
pub fn relevant(e: &Event, own_pid: u32) -> bool {
    match e {
        Event::Overrun => true,
        Event::Change {
            kind,
            family,
            pid,
            table,
        } => {
            if *pid == own_pid || *kind == NFT_MSG_NEWGEN {
                return false;
            }
            matches!(
                (family, table.as_deref()),
                (&NFPROTO_INET, Some(crate::plan::TABLE))
                    | (&NFPROTO_IPV4 | &NFPROTO_IPV6, Some("nat"))
            )
        }
    }
}

/// Whether an inotify event in a watched directory concerns one of `files` (by name; names
/// starting with `..` are the atomic symlink swaps of Kubernetes-style config volumes).
fn touches(name: &Option<OsString>, files: &[PathBuf]) -> bool {
    match name {
        None => true,
        Some(n) => {
            n.to_string_lossy().starts_with("..")
                || files.iter().any(|f| f.file_name() == Some(n.as_os_str()))
        }
    }
}

fn utc_hms(t: SystemTime) -> String {
    let s = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        % 86_400;
    format!("{:02}:{:02}:{:02}Z", s / 3600, (s / 60) % 60, s % 60)
}

struct Daemon {
    paths: Paths,
    notifier: Notifier,
    cfg: Config,
    policy: Policy,
    config_error: Option<String>,
    backend: String,
    legacy_in_use: bool,
    repairs: u64,
    last: Option<String>,
    ready: bool,
    reload_ready_pending: bool,
    /// `masqd check --reload` helpers waiting for the outcome of the pending reload.
    reload_requesters: Vec<i32>,
    pending: Option<&'static str>,
    failures: u32,
    not_before: Instant,
    repair_times: VecDeque<Instant>,
    rate_limited_warned: bool,
    /// When to give freed heap memory back to the kernel (a second after the last reconcile,
    /// so bursts of reconciles keep their pages and an idle daemon stays small).
    trim_at: Option<Instant>,
    /// `/metrics` and `/healthz`, when `[metrics] listen` is set.
    exporter: crate::metrics::Exporter,
}

impl Daemon {
    fn resync(&self) -> Duration {
        self.cfg.resync_interval.unwrap_or(if self.legacy_in_use {
            Duration::from_secs(5)
        } else {
            Duration::from_secs(60)
        })
    }

    fn watched_files(&self) -> Vec<PathBuf> {
        let mut v = vec![self.paths.config.clone()];
        if let Some(e) = &self.cfg.flannel_subnet_env {
            v.push(e.clone());
        }
        if let Some(e) = &self.cfg.nonmasquerade_cidrs_file {
            v.push(e.clone());
        }
        v
    }

    fn status(&self) {
        let sizes: Vec<String> = Family::ALL
            .iter()
            .filter_map(|f| {
                self.policy.family(*f).map(|fp| {
                    format!(
                        "pod{d}={} nomasq{d}={}",
                        fp.pod.len(),
                        fp.nomasq.len(),
                        d = f.digit()
                    )
                })
            })
            .collect();
        let mut s = format!(
            "backend {}; {}; last reconcile {}; repairs {}",
            self.backend,
            sizes.join(" "),
            self.last.as_deref().unwrap_or("none yet"),
            self.repairs
        );
        if let Some(e) = &self.config_error {
            s.push_str(&format!("; config error (keeping the last good one): {e}"));
        }
        self.notifier
            .notify(&format!("STATUS={}", systemd::one_line(&s)));
    }

    /// Re-reads the configuration. A broken one keeps the last good policy and the kernel
    /// state; it is logged with its file and line and shown in STATUS.
    fn reload(&mut self, why: &str) {
        match config::load(&self.paths.config) {
            Err(e) => {
                tracing::error!(
                    "{why}: configuration not reloaded, keeping the last good one: {e}"
                );
                self.config_error = Some(e.to_string());
            }
            Ok(cfg) => {
                let cfg = lean(cfg);
                // A new metrics address that cannot be bound refuses the whole configuration.
                if let Err(e) = self.exporter.reconfigure(&cfg) {
                    tracing::error!(
                        "{why}: configuration not reloaded, keeping the last good one: {e}"
                    );
                    self.config_error = Some(e);
                    self.status();
                    return;
                }
                self.config_error = None;
                if cfg != self.cfg {
                    tracing::info!("{why}: configuration changed");
                    crate::logging::log_config_diff(&self.cfg, &cfg);
                    self.policy = Policy::from_config(&cfg);
                    self.cfg = cfg;
                    self.pending = Some("configuration change");
                    self.not_before = Instant::now();
                }
            }
        }
        self.status();
    }

    /// Hands a finished reconcile to the metrics (before [`Daemon::finished`] updates the
    /// daemon's own view, whose `ready` says whether it was a repair).
    fn metrics_after(&self, reason: &str, res: &Result<Plan>, took: Duration) {
        let Some(m) = self.exporter.metrics() else {
            return;
        };
        let (backend, legacy) = match res {
            Ok(p) => (
                p.backend_name(&self.policy),
                p.backends(&self.policy)
                    .values()
                    .any(|b| *b == Backend::Legacy),
            ),
            Err(_) => (self.backend.clone(), self.legacy_in_use),
        };
        let resync = self.cfg.resync_interval.unwrap_or(if legacy {
            Duration::from_secs(5)
        } else {
            Duration::from_secs(60)
        });
        m.reconciled(&crate::metrics::Reconciled {
            result: res.as_ref().map_err(|e| {
                format!("{e:#}")
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_string()
            }),
            took,
            repair: self.ready && reason != "configuration change",
            policy: &self.policy,
            resync,
            backend: &backend,
        });
    }

    fn finished(&mut self, reason: &'static str, res: Result<Plan>, took: Duration) {
        self.metrics_after(reason, &res, took);
        let now = Instant::now();
        match res {
            Ok(plan) => {
                self.failures = 0;
                self.backend = plan.backend_name(&self.policy);
                self.legacy_in_use = plan
                    .backends(&self.policy)
                    .values()
                    .any(|b| *b == Backend::Legacy);
                if plan.is_empty() {
                    self.last = Some(format!("{} in sync", utc_hms(SystemTime::now())));
                } else {
                    let what: Vec<String> = plan
                        .nft
                        .iter()
                        .map(|c| c.summary())
                        .chain(plan.legacy.iter().flat_map(|(f, l)| {
                            l.summary.iter().map(move |s| format!("{f} legacy: {s}"))
                        }))
                        .collect();
                    tracing::info!(
                        "reconciled after {reason} in {:.1} ms: {} change(s): {}",
                        took.as_secs_f64() * 1000.0,
                        what.len(),
                        what.join("; ")
                    );
                    crate::logging::log_plan_details(&plan);
                    let repair = self.ready && reason != "configuration change";
                    if repair {
                        self.repairs += 1;
                    }
                    if repair && plan.touches_own() {
                        self.repair_times.push_back(now);
                        while self
                            .repair_times
                            .front()
                            .is_some_and(|t| now.duration_since(*t) > REPAIR_WINDOW)
                        {
                            self.repair_times.pop_front();
                        }
                        if self.repair_times.len() >= REPAIR_BURST {
                            if !self.rate_limited_warned {
                                tracing::warn!(
                                    "{} repairs of masqd's own table in the last {}s: another \
                                     writer keeps undoing it; repairs are now limited to one a \
                                     second to protect the ruleset and the CPU from the fight \
                                     (excepted sources stay right through the guard while it \
                                     is intact; removals of re-added broad rules are not limited)",
                                    self.repair_times.len(),
                                    REPAIR_WINDOW.as_secs()
                                );
                                self.rate_limited_warned = true;
                            }
                            self.not_before = now + Duration::from_secs(1);
                        } else {
                            self.rate_limited_warned = false;
                        }
                    }
                    self.last = Some(format!(
                        "{} applied {} change(s) ({reason})",
                        utc_hms(SystemTime::now()),
                        what.len()
                    ));
                }
                if !self.ready {
                    self.ready = true;
                    self.status();
                    self.notifier.notify("READY=1");
                    tracing::info!(
                        backend = %self.backend,
                        "ready: backend {} ({})",
                        self.backend,
                        backend_reasons(&plan, &self.policy)
                    );
                }
            }
            Err(e) => {
                self.failures += 1;
                let backoff = Duration::from_millis(50)
                    .saturating_mul(1u32 << self.failures.min(7))
                    .min(Duration::from_secs(5));
                tracing::error!(
                    "reconcile after {reason} failed (attempt {}), retrying in {} ms: {e:#}",
                    self.failures,
                    backoff.as_millis()
                );
                self.last = Some(format!(
                    "{} failed: {}",
                    utc_hms(SystemTime::now()),
                    format!("{e:#}").lines().next().unwrap_or_default()
                ));
                // Retried under its own reason: a configuration change that succeeds on the
                // second attempt is still a configuration change, not a repair.
                self.pending.get_or_insert(reason);
                self.not_before = now + backoff;
            }
        }
        self.status();
    }
}

/// The backend decision of each family present, with its reason (for the start-up log).
fn backend_reasons(plan: &Plan, policy: &Policy) -> String {
    Family::ALL
        .iter()
        .filter(|f| policy.family(**f).is_some())
        .map(|f| {
            let d = plan.detection.family(*f);
            format!("{f}: {} — {}", d.backend, d.reason)
        })
        .collect::<Vec<_>>()
        .join("; ")
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
        tracing::warn!("blocking SIGHUP/SIGTERM/SIGINT: {e}");
    }
}

/// Undoes [`block_signals`] (for the one-shot commands, which keep the default actions).
pub fn unblock_signals() {
    if let Err(e) = handled_signals().thread_unblock() {
        tracing::warn!("unblocking SIGHUP/SIGTERM/SIGINT: {e}");
    }
}

/// The blocked signals, read by the loop through a signalfd (pending ones included).
struct Signals(AsyncFd<Fd<SignalFd>>, std::cell::Cell<Option<i32>>);

impl Signals {
    fn new() -> Result<Signals> {
        block_signals();
        let fd = SignalFd::with_flags(
            &handled_signals(),
            SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC,
        )
        .context("signalfd")?;
        // SAFETY: the SignalFd owns its fd for its whole life and never swaps it.
        let fd = unsafe { AsyncFd::register(Fd(fd)) }
            .map_err(|e| anyhow::anyhow!("registering the signalfd: {e}"))?;
        Ok(Signals(fd, std::cell::Cell::new(None)))
    }

    /// The next signal (cancel-safe: a signal is only taken from the fd when returned).
    async fn recv(&self) -> Result<Signal> {
        loop {
            let mut guard = self.0.readable().await?;
            match guard.get_inner().0.read_signal() {
                Ok(Some(info)) => {
                    // `masqd check --reload PID` (the unit's ExecReload) waits for its ack.
                    if crate::check::is_reload_request(&info) {
                        self.1.set(Some(info.ssi_pid as i32));
                    }
                    return Signal::try_from(info.ssi_signo as i32).context("signalfd");
                }
                Ok(None) | Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
                Err(e) => return Err(e).context("reading the signalfd"),
            }
        }
    }
}

/// Runs the daemon until SIGTERM/SIGINT. A broken configuration at start-up exits with 78.
pub fn run(paths: Paths) -> ExitCode {
    // Before anything else: a signal during start-up waits for the loop (see block_signals).
    block_signals();
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %paths.config.display(),
        "masqd {} starting with {}",
        env!("CARGO_PKG_VERSION"),
        paths.config.display()
    );
    let first = config::load(&paths.config);
    let cfg = match first {
        Ok(c) => Some(c),
        // A file the config names (flannel's subnet.env) may appear only once flannel runs,
        // which may itself wait for kubelet: start, report, and wait for it.
        Err(e) if e.missing_file => {
            tracing::warn!("waiting: {e}");
            None
        }
        Err(e) => {
            crate::logging::report_error(&e);
            let n = Notifier::from_env();
            n.notify(&format!(
                "STATUS={}",
                systemd::one_line(&format!("config error: {e}"))
            ));
            return ExitCode::from(EX_CONFIG);
        }
    };
    // Held until the process ends: `apply` and `teardown` are refused meanwhile (state.rs).
    let _state_lock = match crate::state::State::new(&paths.state_dir).lock_daemon() {
        Ok(l) => l,
        Err(e) if e.to_string() == crate::state::STOPPED_WAITING => {
            tracing::info!("{e}: stopping before installing anything");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            crate::logging::report_error(&format_args!("{e:#}"));
            return ExitCode::from(1);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            crate::logging::report_error(&format_args!("starting the runtime: {e}"));
            return ExitCode::from(1);
        }
    };
    let signals = match rt.block_on(async { Signals::new() }) {
        Ok(s) => s,
        Err(e) => {
            crate::logging::report_error(&format_args!("{e:#}"));
            return ExitCode::from(1);
        }
    };
    let cfg = match cfg {
        Some(c) => c,
        None => match rt.block_on(wait_for_config(&paths, &signals)) {
            Ok(Some(c)) => c,
            Ok(None) => return ExitCode::SUCCESS,
            Err(e) => {
                crate::logging::report_error(&format_args!("{e:#}"));
                return ExitCode::from(1);
            }
        },
    };
    let exporter = match crate::metrics::Exporter::start(&cfg) {
        Ok(e) => e,
        Err(e) => {
            crate::logging::report_error(&format_args!("{e}"));
            Notifier::from_env().notify(&format!("STATUS={}", systemd::one_line(&e)));
            return ExitCode::from(EX_CONFIG);
        }
    };
    match rt.block_on(main_loop(paths, cfg, signals, exporter)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            crate::logging::report_error(&format_args!("{e:#}"));
            ExitCode::from(1)
        }
    }
}

/// Start-up with a file the config names still missing: READY (so that units ordered after
/// masqd, kubelet among them, can start), STATUS says what is awaited, the config is tried
/// again every 2 s. None when stopped while waiting.
async fn wait_for_config(paths: &Paths, signals: &Signals) -> Result<Option<Config>> {
    let n = Notifier::from_env();
    let wd = systemd::watchdog_interval();
    let mut watchdog = tokio::time::interval(wd.unwrap_or(Duration::from_secs(3600)));
    let mut retry = tokio::time::interval(Duration::from_secs(2));
    let mut told = false;
    loop {
        match config::load(&paths.config) {
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
                    tracing::error!("{e}");
                }
            }
        }
        tokio::select! {
            sig = signals.recv() => {
                if sig? != Signal::SIGHUP {
                    n.notify("STOPPING=1");
                    return Ok(None);
                }
                crate::check::acknowledge_reload(signals.1.take(), true);
            }
            _ = retry.tick() => {}
            _ = watchdog.tick(), if wd.is_some() => n.notify("WATCHDOG=1"),
        }
    }
}

/// One inotify watch: a directory of a watched file, or its nearest existing ancestor while
/// that directory is missing.
struct Watch {
    wd: WatchDescriptor,
    dir: PathBuf,
    /// Device and inode of `dir` when the watch was added: a directory removed and recreated
    /// (flannel's /run/flannel) is a new inode, watched anew.
    id: (u64, u64),
}

/// The directory to watch for `file`: its own directory, or while that does not exist the
/// nearest existing ancestor (whose events say when it comes back).
fn watch_target(file: &Path) -> Option<(PathBuf, (u64, u64))> {
    use std::os::unix::fs::MetadataExt;
    let abs = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
    let mut dir = abs.parent();
    while let Some(d) = dir {
        if let Ok(m) = std::fs::metadata(d) {
            if m.is_dir() {
                return Some((d.to_path_buf(), (m.dev(), m.ino())));
            }
        }
        dir = d.parent();
    }
    None
}

/// Arms the watches for `files` (`inotify_add_watch` on each target of [`watch_target`],
/// `inotify_rm_watch` on those no longer needed). True when a watch was added or moved after
/// the first arming: a directory came back, and the files in it may have changed unseen.
fn watch_dirs(ino: &Inotify, files: &[PathBuf], watched: &mut Vec<Watch>) -> bool {
    let first = watched.is_empty();
    let targets: Vec<(PathBuf, (u64, u64))> =
        files.iter().filter_map(|f| watch_target(f)).collect();
    let mut changed = false;
    watched.retain(|w| {
        let keep = targets.iter().any(|(d, id)| *d == w.dir && *id == w.id);
        if !keep {
            let _ = ino.rm_watch(w.wd);
            changed = true;
        }
        keep
    });
    for (dir, id) in targets {
        if watched.iter().any(|w| w.dir == dir) {
            continue;
        }
        let flags = AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_ATTRIB
            | AddWatchFlags::IN_DELETE_SELF
            | AddWatchFlags::IN_MOVE_SELF
            | AddWatchFlags::IN_ONLYDIR;
        match ino.add_watch(&dir, flags) {
            Ok(wd) => {
                watched.push(Watch { wd, dir, id });
                changed = true;
            }
            Err(e) => tracing::warn!(
                "cannot watch {}: {e}; changes there need SIGHUP",
                dir.display()
            ),
        }
    }
    changed && !first
}

/// The configuration as the daemon keeps it: without the file:line of every CIDR (only
/// one-shot `explain` and `check` show them; 60,000 of them are ~4 MiB the daemon would hold,
/// and copy into every reconcile).
fn lean(mut cfg: Config) -> Config {
    cfg.pod_origins = Vec::new();
    cfg.exception_origins = Vec::new();
    cfg
}

async fn main_loop(
    paths: Paths,
    cfg: Config,
    signals: Signals,
    exporter: crate::metrics::Exporter,
) -> Result<()> {
    let cfg = lean(cfg);
    let policy = Policy::from_config(&cfg);
    let mut d = Daemon {
        paths: paths.clone(),
        notifier: Notifier::from_env(),
        cfg,
        policy,
        config_error: None,
        backend: "undecided".into(),
        legacy_in_use: false,
        repairs: 0,
        last: None,
        ready: false,
        reload_ready_pending: false,
        reload_requesters: Vec::new(),
        pending: Some("start-up"),
        failures: 0,
        not_before: Instant::now(),
        repair_times: VecDeque::new(),
        rate_limited_warned: false,
        trim_at: None,
        exporter,
    };

    let mut apply_sock = Some(Socket::open().context("opening the netlink socket")?);
    let mut own_pid = apply_sock
        .as_ref()
        .map(|s| s.portid())
        .transpose()?
        .unwrap_or(0);
    let monitor_sock = Socket::monitor().context("subscribing to nftables events")?;
    // SAFETY: the socket owns its fd (OwnedFd) for its whole life and never swaps it.
    let mut monitor = unsafe { AsyncFd::register(monitor_sock) }
        .map_err(|e| anyhow::anyhow!("registering the event socket: {e}"))?;
    let ino =
        Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).context("inotify_init")?;
    let mut watched = Vec::new();
    watch_dirs(&ino, &d.watched_files(), &mut watched);
    // SAFETY: Inotify owns its fd for its whole life and never swaps it.
    let ino = unsafe { AsyncFd::register(Fd(ino)) }
        .map_err(|e| anyhow::anyhow!("registering inotify: {e}"))?;

    let mut resync_period = d.resync();
    let mut resync =
        tokio::time::interval_at(tokio::time::Instant::now() + resync_period, resync_period);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let wd_period = systemd::watchdog_interval();
    let mut watchdog = tokio::time::interval(wd_period.unwrap_or(Duration::from_secs(3600)));
    watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    type Job = JoinHandle<(
        Socket,
        Option<SetCache>,
        &'static str,
        Result<Plan>,
        Duration,
    )>;
    let mut cache: Option<SetCache> = None;
    let mut overflow = Overflow::default();
    let mut running: Option<Job> = None;
    let mut running_is_reload = false;
    d.status();

    loop {
        if running.is_none() && d.pending.is_some() && Instant::now() >= d.not_before {
            if let (Some(reason), Some(mut sock)) = (d.pending.take(), apply_sock.take()) {
                // The first reconcile that starts after a SIGHUP ends the reload (READY=1),
                // not one that was already running with the old configuration.
                running_is_reload = std::mem::take(&mut d.reload_ready_pending);
                let cfg = d.cfg.clone();
                let policy = d.policy.clone();
                let state_dir = d.paths.state_dir.clone();
                let full = overflow.starting();
                let mut c = cache.take().filter(|_| !full);
                let mon_fd = monitor.get_ref().as_raw_fd();
                // The other NAT rules (a dump of every rule) only at start-up, resync, reload.
                let overridden_to = d.exporter.metrics().filter(|_| {
                    matches!(
                        reason,
                        "start-up" | "resync" | "SIGHUP" | "configuration change"
                    )
                });
                running = Some(tokio::task::spawn_blocking(move || {
                    let t = Instant::now();
                    // Mute our own notifications around large commits (the kernel would build
                    // one per element); a change by someone else in that window is caught by
                    // the generation check and reported as `missed_events`.
                    let mute = move |quiet: bool| {
                        if let Err(e) = Socket::set_membership(mon_fd, !quiet) {
                            tracing::warn!("{e}");
                        }
                    };
                    let r = engine::apply_with(
                        &mut sock,
                        &state_dir,
                        &cfg,
                        &policy,
                        &mut c,
                        Some(&mute),
                    );
                    let took = t.elapsed();
                    if let (Some(m), Ok(p)) = (&overridden_to, &r) {
                        m.refresh_overridden(p, &policy, &mut sock);
                    }
                    (sock, c, reason, r, took)
                }));
            }
        }
        let retry_at = if running.is_none() && d.pending.is_some() {
            tokio::time::Instant::from_std(d.not_before)
        } else {
            tokio::time::Instant::now() + Duration::from_secs(86_400)
        };

        tokio::select! {
            res = async { running.as_mut().expect("guarded").await }, if running.is_some() => {
                running = None;
                match res {
                    Ok((sock, c, reason, r, took)) => {
                        apply_sock = Some(sock);
                        // Listen again whatever happened while muted.
                        if let Err(e) = Socket::set_membership(monitor.get_ref().as_raw_fd(), true) {
                            tracing::error!("{e}; drift is only seen by the resync timer");
                        }
                        let keep = overflow.ended(r.is_ok());
                        cache = c.filter(|_| keep);
                        d.trim_at = Some(Instant::now() + Duration::from_secs(1));
                        if r.as_ref().is_ok_and(|p| p.missed_events) {
                            d.pending.get_or_insert("ruleset changed while masqd was committing");
                        }
                        let ok = r.is_ok();
                        d.finished(reason, r, took);
                        if std::mem::take(&mut running_is_reload) {
                            d.notifier.notify("READY=1");
                            for pid in std::mem::take(&mut d.reload_requesters) {
                                crate::check::acknowledge_reload(Some(pid), ok);
                            }
                        }
                    }
                    Err(e) => {
                        // The blocking task panicked: a fresh socket, and retry.
                        tracing::error!("reconcile task failed: {e}");
                        let sock = Socket::open().context("reopening netlink")?;
                        own_pid = sock.portid()?;
                        apply_sock = Some(sock);
                        cache = None;
                        overflow.ended(false);
                        let _ = Socket::set_membership(monitor.get_ref().as_raw_fd(), true);
                        d.pending.get_or_insert("retry");
                        // A reload still owes its READY=1 to the retry.
                        d.reload_ready_pending |= std::mem::take(&mut running_is_reload);
                    }
                }
                let p = d.resync();
                if p != resync_period {
                    resync_period = p;
                    resync = tokio::time::interval_at(tokio::time::Instant::now() + p, p);
                    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                }
            }
            sig = signals.recv() => {
                if sig? != Signal::SIGHUP {
                    break;
                }
                // Before the first READY=1 (a SIGHUP during start-up) there is no reload to
                // announce: the configuration is read again and start-up goes on with it.
                if d.ready {
                    d.notifier.notify(&format!(
                        "RELOADING=1\nMONOTONIC_USEC={}",
                        systemd::monotonic_usec()
                    ));
                    // A SIGHUP also asks for a resync; READY=1 follows when it is done.
                    d.reload_ready_pending = true;
                }
                // The ExecReload helper is answered after RELOADING=1 (systemd then waits for
                // READY=1): at once when the configuration is refused, else once the reload's
                // reconcile ended, with its outcome.
                let requester = signals.1.take();
                d.reload("SIGHUP");
                if d.config_error.is_some() || !d.ready {
                    crate::check::acknowledge_reload(requester, d.config_error.is_none());
                } else {
                    d.reload_requesters.extend(requester);
                }
                watch_dirs(&ino.get_ref().0, &d.watched_files(), &mut watched);
                d.pending.get_or_insert("SIGHUP");
            }
            guard = monitor.readable_mut() => {
                let mut guard = guard?;
                let events = guard.get_inner_mut().drain_events();
                guard.clear_ready();
                match events {
                    Ok(ev) if ev.contains(&Event::Overrun) => {
                        overflow.lost("the event socket's buffer overflowed");
                        d.pending.get_or_insert("lost nftables notifications");
                    }
                    Ok(ev) => {
                        if ev.iter().any(|e| relevant(e, own_pid)) {
                            d.pending.get_or_insert("nftables change");
                        }
                    }
                    Err(e) => {
                        overflow.lost(&format!("reading nftables events: {e}"));
                        d.pending.get_or_insert("lost nftables notifications");
                    }
                }
            }
            guard = ino.readable() => {
                let mut guard = guard?;
                // Read until EAGAIN: readiness is edge-triggered.
                let mut evs = Vec::new();
                while let Ok(mut batch) = guard.get_inner().0.read_events() {
                    if batch.is_empty() {
                        break;
                    }
                    evs.append(&mut batch);
                }
                guard.clear_ready();
                let files = d.watched_files();
                // A watched directory removed or moved away: forget its watch; watch_dirs
                // then watches its nearest existing ancestor until it is back.
                let before = watched.len();
                let gone = AddWatchFlags::IN_IGNORED
                    | AddWatchFlags::IN_DELETE_SELF
                    | AddWatchFlags::IN_MOVE_SELF;
                for e in evs.iter().filter(|e| e.mask.intersects(gone)) {
                    if let Some(i) = watched.iter().position(|w| w.wd == e.wd) {
                        let w = watched.swap_remove(i);
                        let _ = ino.get_ref().0.rm_watch(w.wd);
                    }
                }
                let lost = watched.len() != before;
                let rearmed = watch_dirs(&ino.get_ref().0, &files, &mut watched);
                if lost || rearmed || evs.iter().any(|e| touches(&e.name, &files)) {
                    d.reload("configuration file changed");
                    watch_dirs(&ino.get_ref().0, &d.watched_files(), &mut watched);
                }
            }
            _ = resync.tick() => {
                d.pending.get_or_insert("resync");
            }
            _ = watchdog.tick(), if wd_period.is_some() => {
                d.notifier.notify("WATCHDOG=1");
            }
            _ = tokio::time::sleep_until(retry_at) => {}
            _ = tokio::time::sleep_until(
                d.trim_at.map(tokio::time::Instant::from_std).unwrap_or(retry_at)
            ), if d.trim_at.is_some() => {
                if running.is_some() {
                    // Busy: try again a second after this reconcile (never spin).
                    d.trim_at = Some(Instant::now() + Duration::from_secs(1));
                } else if d.trim_at.is_some_and(|t| Instant::now() >= t) {
                    d.trim_at = None;
                    // Give back what a large reconcile allocated (parse trees, the batch
                    // buffer): the idle daemon's resident size is its state, not its peak.
                    #[cfg(target_env = "gnu")]
                    // SAFETY: malloc_trim only releases free heap memory.
                    unsafe {
                        libc::malloc_trim(0);
                    }
                }
            }
        }
    }

    d.notifier.notify("STOPPING=1");
    tracing::info!("stopping; the rules stay in place");
    if let Some(job) = running {
        // Let an apply in flight finish (it is one transaction either way).
        let _ = tokio::time::timeout(Duration::from_secs(10), job).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(family: u8, table: &str, pid: u32) -> Event {
        Event::Change {
            kind: 6,
            family,
            pid,
            table: Some(table.into()),
        }
    }

    #[test]
    fn relevance() {
        assert!(relevant(&change(NFPROTO_INET, "masqd", 99), 7));
        assert!(
            !relevant(&change(NFPROTO_INET, "masqd", 7), 7),
            "own change"
        );
        assert!(relevant(&change(NFPROTO_IPV4, "nat", 99), 7));
        assert!(!relevant(&change(NFPROTO_IPV4, "filter", 99), 7));
        assert!(!relevant(&change(NFPROTO_INET, "other", 99), 7));
        assert!(relevant(&Event::Overrun, 7));
    }

    #[test]
    fn lost_notifications_mean_one_full_resync_per_burst() {
        let mut o = Overflow::default();
        assert!(!o.starting(), "no overflow: the cache may be used");
        assert!(o.ended(true));
        o.lost("a");
        o.lost("b");
        assert!(o.warned, "the burst is logged");
        assert!(o.starting(), "the next reconcile reads everything");
        o.lost("c"); // more lost while it runs: its cache is not kept, one more full pass
        assert!(!o.ended(true));
        assert!(o.warned, "still the same burst");
        assert!(o.starting());
        assert!(!o.ended(false), "a failed resync is owed again");
        assert!(o.starting());
        assert!(o.ended(true));
        assert!(!o.warned, "the burst is over: the next one is logged again");
        assert!(!o.starting());
    }

    #[test]
    fn touched_files() {
        let files = vec![PathBuf::from("/etc/masqd/masqd.toml")];
        assert!(touches(&Some("masqd.toml".into()), &files));
        assert!(touches(&Some("..data".into()), &files));
        assert!(!touches(&Some("other.toml".into()), &files));
    }

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
            });
            unblock_signals();
        })
        .join()
        .unwrap();
    }

    #[test]
    fn watch_targets_walk_up_to_an_existing_directory() {
        let d = std::env::temp_dir().join(format!("masqd-watch-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let file = d.join("a/b/subnet.env");
        assert_eq!(watch_target(&file).unwrap().0, d);
        std::fs::create_dir_all(d.join("a/b")).unwrap();
        assert_eq!(watch_target(&file).unwrap().0, d.join("a/b"));
        let ino = Inotify::init(InitFlags::IN_NONBLOCK).unwrap();
        let mut watched = Vec::new();
        let files = vec![file.clone()];
        assert!(!watch_dirs(&ino, &files, &mut watched), "first arming");
        assert_eq!(watched.len(), 1);
        std::fs::remove_dir_all(d.join("a")).unwrap();
        assert!(watch_dirs(&ino, &files, &mut watched), "moved up");
        assert_eq!(watched[0].dir, d);
        std::fs::create_dir_all(d.join("a/b")).unwrap();
        assert!(watch_dirs(&ino, &files, &mut watched), "back");
        assert_eq!(watched[0].dir, d.join("a/b"));
        assert!(!watch_dirs(&ino, &files, &mut watched), "steady");
        let _ = std::fs::remove_dir_all(&d);
    }
}
