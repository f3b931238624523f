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
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;
use tokio::signal::unix::{signal, SignalKind};
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
    pending: Option<&'static str>,
    failures: u32,
    not_before: Instant,
    repair_times: VecDeque<Instant>,
    rate_limited_warned: bool,
    /// When to give freed heap memory back to the kernel (a second after the last reconcile,
    /// so bursts of reconciles keep their pages and an idle daemon stays small).
    trim_at: Option<Instant>,
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
                self.config_error = None;
                if cfg != self.cfg {
                    tracing::info!("{why}: configuration changed");
                    self.policy = Policy::from_config(&cfg);
                    self.cfg = cfg;
                    self.pending = Some("configuration change");
                    self.not_before = Instant::now();
                }
            }
        }
        self.status();
    }

    fn finished(&mut self, reason: &'static str, res: Result<Plan>, took: Duration) {
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
                    tracing::info!("ready: backend {}", self.backend);
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
                self.pending.get_or_insert("retry");
                self.not_before = now + backoff;
            }
        }
        self.status();
    }
}

/// Runs the daemon until SIGTERM/SIGINT. A broken configuration at start-up exits with 78.
pub fn run(paths: Paths) -> ExitCode {
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
            eprintln!("masqd: error: {e}");
            let n = Notifier::from_env();
            n.notify(&format!(
                "STATUS={}",
                systemd::one_line(&format!("config error: {e}"))
            ));
            return ExitCode::from(EX_CONFIG);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("masqd: error: starting the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let cfg = match cfg {
        Some(c) => c,
        None => match rt.block_on(wait_for_config(&paths)) {
            Ok(Some(c)) => c,
            Ok(None) => return ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("masqd: error: {e:#}");
                return ExitCode::from(1);
            }
        },
    };
    match rt.block_on(main_loop(paths, cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("masqd: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Start-up with a file the config names still missing: READY (so that units ordered after
/// masqd, kubelet among them, can start), STATUS says what is awaited, the config is tried
/// again every 2 s. None when stopped while waiting.
async fn wait_for_config(paths: &Paths) -> Result<Option<Config>> {
    let n = Notifier::from_env();
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
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
            _ = sigterm.recv() => { n.notify("STOPPING=1"); return Ok(None) }
            _ = sigint.recv() => { n.notify("STOPPING=1"); return Ok(None) }
            _ = sighup.recv() => {}
            _ = retry.tick() => {}
            _ = watchdog.tick(), if wd.is_some() => n.notify("WATCHDOG=1"),
        }
    }
}

fn watch_dirs(ino: &Inotify, files: &[PathBuf], watched: &mut Vec<PathBuf>) {
    for f in files {
        let dir = f
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        if watched.contains(&dir) {
            continue;
        }
        let flags = AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_ATTRIB;
        match ino.add_watch(&dir, flags) {
            Ok(_) => watched.push(dir),
            Err(e) => tracing::warn!(
                "cannot watch {}: {e}; changes there need SIGHUP",
                dir.display()
            ),
        }
    }
}

async fn main_loop(paths: Paths, cfg: Config) -> Result<()> {
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
        pending: Some("start-up"),
        failures: 0,
        not_before: Instant::now(),
        repair_times: VecDeque::new(),
        rate_limited_warned: false,
        trim_at: None,
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

    let mut sighup = signal(SignalKind::hangup())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;

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
                let mut c = cache.take();
                let mon_fd = monitor.get_ref().as_raw_fd();
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
                    (sock, c, reason, r, t.elapsed())
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
                        cache = c;
                        d.trim_at = Some(Instant::now() + Duration::from_secs(1));
                        if r.as_ref().is_ok_and(|p| p.missed_events) {
                            d.pending.get_or_insert("ruleset changed while masqd was committing");
                        }
                        d.finished(reason, r, took);
                        if std::mem::take(&mut running_is_reload) {
                            d.notifier.notify("READY=1");
                        }
                    }
                    Err(e) => {
                        // The blocking task panicked: a fresh socket, and retry.
                        tracing::error!("reconcile task failed: {e}");
                        let sock = Socket::open().context("reopening netlink")?;
                        own_pid = sock.portid()?;
                        apply_sock = Some(sock);
                        cache = None;
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
            _ = sighup.recv() => {
                d.notifier.notify(&format!("RELOADING=1\nMONOTONIC_USEC={}", systemd::monotonic_usec()));
                d.reload("SIGHUP");
                watch_dirs(&ino.get_ref().0, &d.watched_files(), &mut watched);
                // A SIGHUP also asks for a resync; READY=1 follows when it is done.
                d.reload_ready_pending = true;
                d.pending.get_or_insert("SIGHUP");
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            guard = monitor.readable_mut() => {
                let mut guard = guard?;
                let events = guard.get_inner_mut().drain_events();
                guard.clear_ready();
                match events {
                    Ok(ev) => {
                        if ev.iter().any(|e| relevant(e, own_pid)) {
                            d.pending.get_or_insert("nftables change");
                        }
                    }
                    Err(e) => tracing::warn!("reading nftables events: {e}"),
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
                if evs.iter().any(|e| e.mask.contains(AddWatchFlags::IN_IGNORED)) {
                    // A watched directory went away: watch it again when it comes back.
                    watched.clear();
                }
                if evs.iter().any(|e| touches(&e.name, &files)) {
                    d.reload("configuration file changed");
                }
                watch_dirs(&ino.get_ref().0, &d.watched_files(), &mut watched);
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
    fn touched_files() {
        let files = vec![PathBuf::from("/etc/masqd/masqd.toml")];
        assert!(touches(&Some("masqd.toml".into()), &files));
        assert!(touches(&Some("..data".into()), &files));
        assert!(!touches(&Some("other.toml".into()), &files));
    }
}
