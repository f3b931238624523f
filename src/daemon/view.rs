//! What the daemon knows and shows: the live configuration and its policy (a refused reload
//! keeps the last good one; an edit of the CIDR list file alone is applied to them in place,
//! [`crate::config::ListBase`]), the backend in use, the last reconcile, the STATUS= line
//! built from them, and the log lines and metrics of each reconcile's outcome.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Result;

use super::scheduler::{resync_period, Ended};
use super::triggers::Trigger;
use super::TARGET;
use crate::config::{Config, ListBase, Loaded, Source};
use crate::detect::Backend;
use crate::engine::Plan;
use crate::policy::{Family, Policy};

/// The configuration as the daemon keeps it: without the file:line of every CIDR (only
/// one-shot `explain` and `check` show them; 60,000 of them are ~4 MiB the daemon would hold,
/// and copy into every reconcile).
pub(super) fn lean(mut cfg: Config) -> Config {
    cfg.pod_origins = Vec::new();
    cfg.exception_origins = Vec::new();
    cfg
}

/// `HH:MM:SSZ` of `t` (UTC), for STATUS.
fn utc_hms(t: SystemTime) -> String {
    let s = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        % 86_400;
    format!("{:02}:{:02}:{:02}Z", s / 3600, (s / 60) % 60, s % 60)
}

/// The first line of an error with its causes.
fn first_line(e: &anyhow::Error) -> String {
    format!("{e:#}")
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// What a reload did to the live configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Reloaded {
    /// Refused: the last good configuration and policy stay.
    Refused,
    /// The same configuration: nothing to do.
    Unchanged,
    /// Adopted: a reconcile under [`Trigger::ConfigChanged`] is owed.
    Changed,
}

/// The daemon's view of its configuration and of the kernel.
#[derive(Debug)]
pub(super) struct View {
    /// Shared with the running reconcile (a clone of 60,000 CIDRs would cost a millisecond).
    pub cfg: Arc<Config>,
    pub policy: Arc<Policy>,
    pub config_error: Option<String>,
    /// The last good load's base for edits of the list file alone.
    list: Option<ListBase>,
    backend: String,
    legacy_in_use: bool,
    last: Option<String>,
}

impl View {
    pub fn new(loaded: Loaded) -> View {
        let cfg = lean(loaded.cfg);
        View {
            policy: Arc::new(Policy::from_config(&cfg)),
            cfg: Arc::new(cfg),
            config_error: None,
            list: loaded.base,
            backend: "undecided".into(),
            legacy_in_use: false,
            last: None,
        }
    }

    /// The last reconcile as STATUS= shows it.
    pub fn last_reconcile(&self) -> &str {
        self.last.as_deref().unwrap_or("none yet")
    }

    /// The resync period the configuration and the backend in use imply.
    pub fn resync(&self) -> Duration {
        resync_period(self.cfg.resync_interval, self.legacy_in_use)
    }

    /// The STATUS= value (before [`crate::systemd::one_line`]).
    pub fn status_line(&self, repairs: u64) -> String {
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
            repairs
        );
        if let Some(e) = &self.config_error {
            s.push_str(&format!("; config error (keeping the last good one): {e}"));
        }
        s
    }

    /// Reads the configuration again (`check`: what else must accept it, the metrics
    /// address). An edit of the list file alone is applied in place to the configuration and
    /// its policy ([`ListBase`]); anything else is a full read ([`Loaded::load`]), then
    /// [`View::offer`]. Either way the outcome is that of a full read.
    pub fn reload(
        &mut self,
        why: &str,
        source: &Source,
        check: impl FnOnce(&Config) -> Result<(), String>,
    ) -> Reloaded {
        if let Some(r) = self.list_edit(why) {
            return r;
        }
        match Loaded::load(source).map_err(|e| e.to_string()) {
            Ok(l) => match check(&l.cfg) {
                Ok(()) => {
                    let r = self.offer(why, Ok(l.cfg));
                    self.list = l.base;
                    r
                }
                Err(e) => self.offer(why, Err(e)),
            },
            Err(e) => self.offer(why, Err(e)),
        }
    }

    /// The list file's edit applied in place, when that is what changed; None: a full read
    /// is needed.
    fn list_edit(&mut self, why: &str) -> Option<Reloaded> {
        let base = self.list.as_mut()?;
        let edit = match base.edit() {
            None => return None,
            Some(Err(e)) => return Some(self.offer(why, Err(e.to_string()))),
            Some(Ok(edit)) => edit,
        };
        let (cfg, policy) = (
            Arc::make_mut(&mut self.cfg),
            Arc::make_mut(&mut self.policy),
        );
        let Some(changed) = base.apply(edit, cfg, policy) else {
            self.list = None;
            return None;
        };
        self.config_error = None;
        if !changed {
            return Some(Reloaded::Unchanged);
        }
        tracing::info!(target: TARGET, "{why}: configuration changed");
        Some(Reloaded::Changed)
    }

    /// A reload's result (`loaded`: the configuration read, or why it was refused). A broken
    /// one keeps the last good policy and the kernel state; it is logged with its file and
    /// line and shown in STATUS.
    pub fn offer(&mut self, why: &str, loaded: Result<Config, String>) -> Reloaded {
        match loaded {
            Err(e) => {
                tracing::error!(
                    target: TARGET,
                    "{why}: configuration not reloaded, keeping the last good one: {e}"
                );
                self.config_error = Some(e);
                Reloaded::Refused
            }
            Ok(cfg) => {
                let cfg = lean(cfg);
                self.config_error = None;
                if cfg == *self.cfg {
                    return Reloaded::Unchanged;
                }
                tracing::info!(target: TARGET, "{why}: configuration changed");
                crate::logging::log_config_diff(&self.cfg, &cfg);
                self.policy = Arc::new(Policy::from_config(&cfg));
                self.cfg = Arc::new(cfg);
                Reloaded::Changed
            }
        }
    }

    /// Hands a finished reconcile to the metrics (before the view takes the outcome in).
    pub fn metrics(
        &self,
        m: &crate::metrics::Metrics,
        res: &Result<Plan>,
        took: Duration,
        repair: bool,
    ) {
        let (backend, legacy) = match res {
            Ok(p) => (p.backend_name(&self.policy), uses_legacy(p, &self.policy)),
            Err(_) => (self.backend.clone(), self.legacy_in_use),
        };
        m.reconciled(&crate::metrics::Reconciled {
            result: res.as_ref().map_err(first_line),
            took,
            repair,
            policy: &self.policy,
            resync: resync_period(self.cfg.resync_interval, legacy),
            backend: &backend,
        });
    }

    /// A successful reconcile: its log lines and the "last reconcile" of STATUS.
    pub fn applied(&mut self, why: Trigger, plan: &Plan, took: Duration, e: &Ended) {
        self.backend = plan.backend_name(&self.policy);
        self.legacy_in_use = uses_legacy(plan, &self.policy);
        if plan.is_empty() {
            tracing::debug!(
                target: TARGET,
                "in sync after {why} ({:.1} ms)",
                took.as_secs_f64() * 1000.0
            );
            self.last = Some(format!("{} in sync", utc_hms(SystemTime::now())));
            return;
        }
        let what: Vec<String> = plan
            .nft_changes()
            .iter()
            .map(|c| c.summary())
            .chain(
                plan.legacy_plans()
                    .iter()
                    .flat_map(|(f, l)| l.summary.iter().map(move |s| format!("{f} legacy: {s}"))),
            )
            .collect();
        tracing::info!(
            target: TARGET,
            "reconciled after {why} in {:.1} ms: {} change(s): {}",
            took.as_secs_f64() * 1000.0,
            what.len(),
            what.join("; ")
        );
        crate::logging::log_plan_details(plan);
        if let Some(n) = e.rate_limit_warning {
            tracing::warn!(
                target: TARGET,
                "{n} repairs of masqd's own table in the last {}s: another \
                 writer keeps undoing it; repairs are now limited to one a \
                 second to protect the ruleset and the CPU from the fight \
                 (excepted sources stay right through the guard while it \
                 is intact; removals of re-added broad rules are not limited)",
                super::scheduler::REPAIR_WINDOW.as_secs()
            );
        }
        self.last = Some(format!(
            "{} applied {} change(s) ({why})",
            utc_hms(SystemTime::now()),
            what.len()
        ));
    }

    /// The "ready" log line of the first success.
    pub fn log_ready(&self, plan: &Plan) {
        tracing::info!(
            target: TARGET,
            backend = %self.backend,
            "ready: backend {} ({})",
            self.backend,
            backend_reasons(plan, &self.policy)
        );
    }

    /// A failed reconcile: its log line and the "last reconcile" of STATUS.
    pub fn failed(&mut self, why: Trigger, err: &anyhow::Error, attempt: u32, wait: Duration) {
        tracing::error!(
            target: TARGET,
            "reconcile after {why} failed (attempt {attempt}), retrying in {} ms: {err:#}",
            wait.as_millis()
        );
        self.last = Some(format!(
            "{} failed: {}",
            utc_hms(SystemTime::now()),
            first_line(err)
        ));
    }
}

/// Whether any family's policy lives in legacy xtables.
fn uses_legacy(plan: &Plan, policy: &Policy) -> bool {
    plan.backends(policy)
        .values()
        .any(|b| *b == Backend::Legacy)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(extra: &str) -> Config {
        let text = format!(
            "[node]\npod_cidrs = [\"172.7.21.0/24\"]\n\
             [masquerade]\ncluster_cidrs = [\"172.7.0.0/16\"]\n{extra}"
        );
        crate::config::parse(Path::new("/etc/masqd/masqd.toml"), &text).expect("valid")
    }

    fn loaded(cfg: Config) -> Loaded {
        Loaded { cfg, base: None }
    }

    #[test]
    fn status_before_the_first_reconcile() {
        let v = View::new(loaded(config("")));
        assert_eq!(
            v.status_line(0),
            "backend undecided; pod4=1 nomasq4=1; last reconcile none yet; repairs 0"
        );
    }

    #[test]
    fn a_config_error_keeps_the_last_good_policy() {
        let mut v = View::new(loaded(config("")));
        let good = v.policy.clone();
        let r = v.offer("SIGHUP", Err("masqd.toml:3: bad CIDR".into()));
        assert_eq!(r, Reloaded::Refused);
        assert_eq!(v.policy, good, "the last good policy stays");
        assert_eq!(
            v.status_line(2),
            "backend undecided; pod4=1 nomasq4=1; last reconcile none yet; repairs 2; \
             config error (keeping the last good one): masqd.toml:3: bad CIDR"
        );
        // The same file fixed: the error is gone, nothing to reconcile.
        assert_eq!(v.offer("SIGHUP", Ok(config(""))), Reloaded::Unchanged);
        assert_eq!(v.config_error, None);
        // A real change is adopted.
        let more = config("nonmasquerade_cidrs = [\"10.0.0.0/8\", \"192.168.0.0/16\"]");
        assert_eq!(v.offer("SIGHUP", Ok(more)), Reloaded::Changed);
        assert!(v.status_line(0).contains("pod4=1 nomasq4=3"));
        assert!(v.cfg.pod_origins.is_empty(), "kept lean");
    }

    #[test]
    fn a_list_edit_is_applied_in_place_as_a_full_read_would() {
        let dir = std::env::temp_dir().join(format!("masqd-view-list-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (toml, list) = (dir.join("masqd.toml"), dir.join("x.list"));
        let head = "[node]\npod_cidrs = [\"172.7.21.0/24\"]\n[masquerade]\n";
        std::fs::write(
            &toml,
            format!("{head}nonmasquerade_cidrs_file = \"x.list\"\n"),
        )
        .unwrap();
        std::fs::write(&list, "10.1.0.0/16\n10.3.0.0/16\n").unwrap();
        let source = Source::toml(&toml);
        let mut v = View::new(Loaded::load(&source).unwrap());
        let refuse = |_: &Config| Err("the full read's check".to_string());
        // The list alone changed: applied in place (the full read's check is not asked).
        std::fs::write(&list, "10.1.0.0/16\n10.2.0.0/16\n10.3.0.0/16\n").unwrap();
        assert_eq!(v.reload("edit", &source, refuse), Reloaded::Changed);
        let full = lean(Loaded::load(&source).unwrap().cfg);
        assert_eq!(*v.cfg, full);
        assert_eq!(*v.policy, Policy::from_config(&full));
        assert!(v.status_line(0).contains("nomasq4=1"), "10.1-10.3 merged");
        // A bad line: refused with its file and line, the policy stays.
        std::fs::write(&list, "10.1.0.0/16\n10.2.0.0/16\n10.3.0.1/16\n").unwrap();
        assert_eq!(v.reload("edit", &source, refuse), Reloaded::Refused);
        let e = v.config_error.clone().unwrap();
        assert!(e.starts_with(&format!("{}:3: ", list.display())), "{e}");
        assert_eq!(*v.policy, Policy::from_config(&full));
        // The configuration file changed too: a full read (whose check refuses here).
        std::fs::write(&list, "10.1.0.0/16\n").unwrap();
        std::fs::write(
            &toml,
            format!("{head}nonmasquerade_cidrs_file = \"./x.list\"\n"),
        )
        .unwrap();
        assert_eq!(v.reload("edit", &source, refuse), Reloaded::Refused);
        assert_eq!(v.config_error.as_deref(), Some("the full read's check"));
        assert_eq!(v.reload("edit", &source, |_| Ok(())), Reloaded::Changed);
        assert!(v.status_line(0).contains("nomasq4=1"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn clock_text_is_utc() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(86_400 * 3 + 3600 * 13 + 60 * 5 + 7);
        assert_eq!(utc_hms(t), "13:05:07Z");
    }
}
