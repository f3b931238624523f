//! The one-shot pipeline over the driver interface of [`crate::backend`]: config → policy →
//! detect → for each driver: observe, plan, record, apply; with the records of design.md §5.
//!
//! Detection chooses a [`DriverSet`] ([`drivers`]): the nft driver with the families in
//! nftables (and the guard of the legacy ones), the legacy driver with the families whose
//! policy or default rules live in legacy xtables. Each driver's changes are one transaction
//! (one netlink batch; one `iptables-legacy-restore --noflush` per family). The driver that
//! installs the policy goes first and the one that only removes (stale objects, default rules)
//! or only guards second, so there is no moment without a masquerade rule. The default-rule
//! search covers both backends whatever was chosen. The engine names no backend module: the
//! entry points taking a `Socket` are thin wrappers building the kernel's nft driver.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};

use crate::backend::Slot;
use crate::backend::Socket;
use crate::backend::{self, Backend, Change, Changes, Driver, DriverSet, LegacyDriver};
use crate::backend::{LegacyObserved, LegacyPlan, NftDriver, Observation, Observed};
use crate::config::{self, Config, ConfigError};
use crate::foreign::{self, NatRule, Overridden};
use crate::policy::{Family, Policy};
use crate::state::State;

mod detection;
mod report;
mod teardown;
#[cfg(test)]
mod tests;

pub use backend::{Mute, QUIET_ELEMENTS};
pub use detection::{detect_cached, detect_with, detect_without_policy, LegacyFacts};
pub use detection::{Detection, FamilyDetection};
pub use report::{status, status_of, status_with, FamilyStatus, RecordedRule, Status};
pub use teardown::{teardown, teardown_with, TeardownReport};

/// Paths every command takes.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The configuration file messages name first (masqd.toml, or ip-masq-agent's file).
    pub config: PathBuf,
    /// Where the configuration comes from.
    pub source: config::Source,
    /// State directory.
    pub state_dir: PathBuf,
}

/// Loads and validates the configuration and derives the policy.
pub fn load(source: &config::Source) -> Result<(Config, Policy), ConfigError> {
    let cfg = source.load()?;
    let policy = Policy::from_config(&cfg);
    Ok((cfg, policy))
}

/// Everything that would change.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The part of the policy that lives in nftables.
    pub nft_policy: Policy,
    /// Detection it is based on.
    pub detection: Detection,
    /// Per driver of the set, in apply order: what it observed and what it would change (one
    /// transaction each).
    pub steps: Vec<Step>,
    /// Set when change notifications were muted around a large commit and the ruleset
    /// changed in that window by someone else: the caller should reconcile again.
    pub missed_events: bool,
}

/// One driver's part of a [`Plan`].
#[derive(Debug, Clone)]
pub struct Step {
    /// What the driver observed.
    pub observed: Observation,
    /// What it would change.
    pub changes: Changes,
}

static NO_NFT_OBSERVATION: std::sync::LazyLock<Observed> =
    std::sync::LazyLock::new(Observed::default);
static NO_LEGACY_OBSERVATION: BTreeMap<Family, LegacyObserved> = BTreeMap::new();

impl Plan {
    /// Whether nothing needs to change.
    pub fn is_empty(&self) -> bool {
        self.steps.iter().all(|s| s.changes.is_empty())
    }

    /// Number of changes (a legacy family's restore counts its lines, at least one).
    pub fn len(&self) -> usize {
        self.nft_changes().len()
            + self
                .legacy_plans()
                .iter()
                .map(|(_, p)| p.summary.len().max(1))
                .sum::<usize>()
    }

    /// The nftables changes (empty without an nftables driver).
    pub fn nft_changes(&self) -> &[Change] {
        self.steps
            .iter()
            .find_map(|s| match &s.changes {
                Changes::Nft(c) => Some(c.as_slice()),
                Changes::Legacy(_) => None,
            })
            .unwrap_or(&[])
    }

    /// The legacy plans that change something, per family.
    pub fn legacy_plans(&self) -> &[(Family, LegacyPlan)] {
        self.steps
            .iter()
            .find_map(|s| match &s.changes {
                Changes::Legacy(l) => Some(l.as_slice()),
                Changes::Nft(_) => None,
            })
            .unwrap_or(&[])
    }

    /// The nftables observation (its generation guards the transaction; empty without one).
    pub fn nft_observed(&self) -> &Observed {
        self.steps
            .iter()
            .find_map(|s| match &s.observed {
                Observation::Nft(o) => Some(o),
                Observation::Legacy(_) => None,
            })
            .unwrap_or(&NO_NFT_OBSERVATION)
    }

    /// The legacy observations per family (for status).
    pub fn legacy_observed(&self) -> &BTreeMap<Family, LegacyObserved> {
        self.steps
            .iter()
            .find_map(|s| match &s.observed {
                Observation::Legacy(m) => Some(m),
                Observation::Nft(_) => None,
            })
            .unwrap_or(&NO_LEGACY_OBSERVATION)
    }

    /// The backend of each family the policy has (`ipv4`, `ipv6`).
    pub fn backends(&self, policy: &Policy) -> BTreeMap<String, Backend> {
        Family::ALL
            .into_iter()
            .filter(|f| policy.family(*f).is_some())
            .map(|f| (f.to_string(), self.detection.family(f).backend))
            .collect()
    }

    /// `nft` or `legacy` when all families agree, else per family (`ipv4:legacy ipv6:nft`).
    pub fn backend_name(&self, policy: &Policy) -> String {
        let backends = self.backends(policy);
        let distinct: std::collections::BTreeSet<Backend> = backends.values().copied().collect();
        if distinct.len() == 1 {
            return distinct.iter().map(Backend::to_string).collect();
        }
        backends
            .iter()
            .map(|(f, b)| format!("{f}:{b}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Whether the plan repairs masqd's own objects (its table, chain, rules, set elements,
    /// legacy chain or jump), as opposed to only removing a re-added broad default rule, which
    /// with the guard never decides a connection's source. Moving masqd's legacy jump back to
    /// the head of POSTROUTING counts as part of the removal when only the broad rules removed
    /// stand in front of it (a head insert like Docker's pushed it down).
    pub fn touches_own(&self) -> bool {
        let nft = self
            .nft_changes()
            .iter()
            .any(|c| !matches!(c, Change::RemoveDefaultRule(_)));
        let legacy = self.legacy_plans().iter().any(|(f, lp)| {
            lp.summary
                .iter()
                .any(|s| !s.ends_with("(default rule)") && !self.only_pushed_down(*f, lp, s))
        });
        nft || legacy
    }

    /// Whether `line` of the legacy plan of `f` moves the jump back to the head of POSTROUTING
    /// only because broad rules this plan removes were inserted in front of it.
    fn only_pushed_down(&self, f: Family, lp: &LegacyPlan, line: &str) -> bool {
        let Some(jump) = line.strip_prefix("insert rule nat POSTROUTING 1 ") else {
            return false;
        };
        let Some(o) = self.legacy_observed().get(&f) else {
            return false;
        };
        let removed = |r: &String| lp.removed_defaults.iter().any(|(s, _, _)| s == r);
        let mut kept = o.postrouting.iter().filter(|r| !removed(r));
        kept.next().map(String::as_str) == Some(jump)
            && !kept.any(|r| r == jump)
            && o.postrouting.iter().any(|r| r == jump)
    }
}

/// The drivers detection chose, each with its part of the policy, in apply order (design.md
/// §3.2, §4): the nft driver (`nft`) with the families in nftables and the guard of the
/// families in legacy xtables, the legacy driver with every family whose policy lives there
/// or whose legacy nat table is loaded (its default rules go either way). The one installing
/// a policy first: legacy first when some family's policy lives there (the nft driver then
/// holds only guards, or stale objects to remove).
pub fn drivers<'a>(
    detection: &Detection,
    policy: &Policy,
    nft: Box<dyn Driver + 'a>,
) -> Result<DriverSet<'a>> {
    let nft_ok = detection.ipv4.has_guard() && detection.ipv6.has_guard();
    if !nft_ok && !detection.families(Backend::Nft).is_empty() {
        return Err(anyhow!(
            "the kernel answers no nf_tables requests; set backend.mode = \"legacy\" or load \
             the nf_tables module"
        ));
    }
    let mut families = Vec::new();
    for f in Family::ALL {
        let fd = detection.family(f);
        let active = fd.backend == Backend::Legacy;
        let nat_loaded = fd.facts.legacy_tables.iter().any(|t| t == "nat");
        if active || nat_loaded {
            families.push((f, active));
        }
    }
    let legacy = LegacyDriver::for_families(&families);
    let legacy: Option<Box<dyn Driver + 'a>> = (!legacy.is_empty()).then(|| Box::new(legacy) as _);
    Ok(compose(detection, policy, nft_ok.then_some(nft), legacy))
}

/// The composition of design.md §3.2: the legacy driver (the whole policy of its families)
/// in front of the nft driver (only the guard of those families) when some family's policy
/// lives in legacy xtables; otherwise the nft driver first and the legacy one (removing
/// stale objects and default rules only) behind it.
pub fn compose<'a>(
    detection: &Detection,
    policy: &Policy,
    nft: Option<Box<dyn Driver + 'a>>,
    legacy: Option<Box<dyn Driver + 'a>>,
) -> DriverSet<'a> {
    let legacy_first = !detection.families(Backend::Legacy).is_empty();
    let mut slots = Vec::new();
    if let Some(driver) = nft {
        slots.push(Slot {
            driver,
            policy: nft_part(detection, policy),
        });
    }
    if let Some(driver) = legacy {
        let slot = Slot {
            driver,
            policy: policy.clone(),
        };
        if legacy_first {
            slots.insert(0, slot);
        } else {
            slots.push(slot);
        }
    }
    DriverSet::new(slots)
}

/// The part of the policy the nft driver installs: the families in nftables whole, the guard
/// of the families in legacy xtables where the kernel has nf_tables (design.md §3.2).
pub fn nft_part(detection: &Detection, policy: &Policy) -> Policy {
    let guard: Vec<Family> = detection
        .families(Backend::Legacy)
        .into_iter()
        .filter(|f| detection.family(*f).has_guard())
        .collect();
    policy.nft_part(&detection.families(Backend::Nft), &guard)
}

/// `masqd export --format nft`: the nft driver's part of the policy as an `nft -f` file; with
/// no detection, the whole policy (every family in nftables).
pub fn export_nft(detection: Option<&Detection>, policy: &Policy) -> String {
    match detection {
        Some(d) => NftDriver::export_text(&nft_part(d, policy)),
        None => NftDriver::export_text(policy),
    }
}

/// What each driver of a set observed and would change, in apply order.
type Steps = Vec<(Observation, Changes)>;

/// Observes with every driver of the set and plans (pure, per driver).
fn observe_and_plan(set: &mut DriverSet<'_>) -> Result<Steps> {
    let mut steps = Vec::new();
    for slot in &mut set.slots {
        let o = slot.driver.observe()?;
        let c = slot.driver.plan(&slot.policy, &o);
        steps.push((o, c));
    }
    Ok(steps)
}

/// The [`Plan`] of the steps (the nftables-speaking driver's part, the legacy part).
fn plan_of(set: &DriverSet<'_>, detection: Detection, steps: Steps) -> Plan {
    let mut p = Plan {
        nft_policy: Policy {
            v4: None,
            v6: None,
            ..set
                .slots
                .first()
                .map(|s| s.policy.clone())
                .unwrap_or_else(Policy::empty)
        },
        detection,
        steps: Vec::new(),
        missed_events: false,
    };
    for (slot, (observed, changes)) in set.slots.iter().zip(steps) {
        if let Observation::Nft(_) = observed {
            p.nft_policy = slot.policy.clone();
        }
        p.steps.push(Step { observed, changes });
    }
    p
}

/// Plans over a driver set (observe, then plan per driver).
pub fn plan_with(set: &mut DriverSet<'_>, detection: Detection) -> Result<Plan> {
    let steps = observe_and_plan(set)?;
    Ok(plan_of(set, detection, steps))
}

impl Plan {
    /// The other components' source NAT rules that can apply to the pod traffic of
    /// `policy`, and what masqd's guard does about each: the legacy ones from this plan's
    /// observation, the nftables ones read now (a dump of every rule, so only the one-shot
    /// `status` and `detect` ask; reconciles never do). Equals `nft -a list ruleset` plus
    /// `iptables-legacy-save -t nat`, filtered.
    pub fn overridden_with(
        &self,
        policy: &Policy,
        nft: &mut dyn Driver,
    ) -> Result<Vec<Overridden>> {
        let mut rules: Vec<NatRule> = Vec::new();
        if self.detection.ipv4.has_guard() && self.detection.ipv6.has_guard() {
            rules = nft.nat_rules(&Observation::Nft(Observed::default()))?;
        }
        let legacy = Observation::Legacy(self.legacy_observed().clone());
        rules.extend(LegacyDriver::default().nat_rules(&legacy)?);
        let removed_nft: Vec<(Family, &str, &str, u64)> = self
            .nft_changes()
            .iter()
            .filter_map(|c| match c {
                Change::RemoveDefaultRule(r) => {
                    Some((r.table_family, r.table.as_str(), r.chain.as_str(), r.handle))
                }
                _ => None,
            })
            .collect();
        let removing = |r: &NatRule| {
            let Some(f) = r.family else { return false };
            if r.backend == Backend::Nft {
                return r.table_family == f.nft_keyword()
                    && removed_nft.iter().any(|(rf, t, c, h)| {
                        *rf == f && *t == r.table && *c == r.chain && *h == r.handle
                    });
            }
            self.legacy_plans().iter().any(|(lf, lp)| {
                *lf == f
                    && lp
                        .removed_defaults
                        .iter()
                        .any(|(spec, _, _)| r.text == format!("-A POSTROUTING {spec}"))
            })
        };
        let guarded = |f: Family| self.detection.family(f).has_guard();
        Ok(foreign::overridden(policy, &rules, guarded, removing))
    }
}

/// Makes the kernel match the policy. Returns the plan that was applied (empty when in sync).
/// Default rules about to be removed are recorded in the state directory first, so a crash
/// never loses one. An nftables transaction refused because the ruleset changed underneath
/// (generation mismatch) is re-planned, at most [`backend::RESTART_ATTEMPTS`] times.
///
/// The state directory is locked for the whole observe → record → apply
/// ([`State::lock_command`]): refused while `masqd run` holds it, waiting for another `apply`
/// or `teardown` up to [`crate::state::LOCK_WAIT`].
pub fn apply(paths: &Paths, cfg: &Config, policy: &Policy) -> Result<Plan> {
    let _lock = State::new(&paths.state_dir).lock_command("apply")?;
    let mut nft = NftDriver::new(Socket::open().context("opening netlink")?, None);
    apply_nft_with(&mut nft, &paths.state_dir, cfg.mode, policy, None)
}

/// [`apply`] over an nft driver (the kernel's, or a fake; the daemon keeps one, so that it
/// recognises the change notifications its own transactions cause by the socket's port id, and
/// its set cache): detection through it, then [`apply_drivers`] over the set it chooses. The
/// caller holds the state directory's lock: [`apply`] takes it per command, `masqd run`
/// ([`State::lock_daemon`]) for its whole life.
pub fn apply_nft_with(
    nft: &mut dyn Driver,
    state_dir: &Path,
    mode: config::BackendMode,
    policy: &Policy,
    mute: Option<Mute<'_>>,
) -> Result<Plan> {
    apply_nft_cached(nft, state_dir, mode, policy, mute, &mut None)
}

/// [`apply_nft_with`] with the legacy detection facts from `legacy` when it holds them (the
/// daemon keeps them while legacy xtables did not change: no `iptables-legacy-save` for
/// detection), else gathered and left there. A failure empties it.
pub fn apply_nft_cached(
    nft: &mut dyn Driver,
    state_dir: &Path,
    mode: config::BackendMode,
    policy: &Policy,
    mute: Option<Mute<'_>>,
    legacy: &mut LegacyFacts,
) -> Result<Plan> {
    let state = State::new(state_dir);
    // A state file that cannot be read is refused before anything changes, whether or not
    // this apply has a rule to record.
    let r = state.load().and_then(|_| {
        backend::retry_on_generation_change(
            "nftables ruleset changed while planning; planning again",
            |_| {
                let detection = detect_cached(mode, policy, &mut *nft, &mut *legacy)?;
                let mut set = drivers(&detection, policy, Box::new(&mut *nft))?;
                apply_once(&mut set, &state, detection, mute)
            },
        )
    });
    if r.is_err() {
        nft.forget();
        *legacy = None;
    }
    r
}

/// [`apply_nft_with`] over a driver set chosen already (the detection it came from given):
/// plan, record, apply, re-planned on a generation change.
pub fn apply_drivers(
    set: &mut DriverSet<'_>,
    state_dir: &Path,
    detection: &Detection,
    mute: Option<Mute<'_>>,
) -> Result<Plan> {
    let state = State::new(state_dir);
    let r = state.load().and_then(|_| {
        backend::retry_on_generation_change(
            "nftables ruleset changed while planning; planning again",
            |_| apply_once(set, &state, detection.clone(), mute),
        )
    });
    if r.is_err() {
        for s in &mut set.slots {
            s.driver.forget();
        }
    }
    r
}

/// One observe → plan → record → apply over the set, in its order.
fn apply_once(
    set: &mut DriverSet<'_>,
    state: &State,
    detection: Detection,
    mute: Option<Mute<'_>>,
) -> Result<Plan> {
    for slot in &mut set.slots {
        slot.driver.will_apply(&slot.policy);
    }
    let steps = observe_and_plan(set)?;
    if steps.iter().all(|(_, c)| c.is_empty()) {
        for (slot, (o, _)) in set.slots.iter_mut().zip(&steps) {
            slot.driver.settled(&slot.policy, o);
        }
        return Ok(plan_of(set, detection, steps));
    }
    let records: Vec<_> = set
        .slots
        .iter()
        .zip(&steps)
        .flat_map(|(slot, (_, c))| slot.driver.records(c))
        .collect();
    if !records.is_empty() {
        state
            .record(&records)
            .context("recording the default rules before removing them")?;
    }
    let mut missed = false;
    for (slot, (o, c)) in set.slots.iter_mut().zip(&steps) {
        missed |= slot.driver.apply(&slot.policy, o, c, mute)?.missed_events;
    }
    let mut p = plan_of(set, detection, steps);
    p.missed_events = missed;
    Ok(p)
}
