//! The one-shot pipeline: config → policy → detect → observe → plan → apply, with the records
//! of design.md §5, over both backends.
//!
//! Each family goes to the backend detection picks. The nftables part of the policy is applied
//! as one netlink transaction, the legacy part of each family as one
//! `iptables-legacy-restore --noflush`. The backend that installs the policy goes first and the
//! one that only removes (stale objects, default rules) second, so there is no moment without a
//! masquerade rule. The default-rule search covers both backends whatever was chosen.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use serde::Serialize;

use crate::backend::legacy::{self, LegacyObserved, LegacyPlan};
use crate::backend::nft::{self, netlink::Socket, netlink::ERESTART, SetCache};
use crate::config::{self, Config, ConfigError};
use crate::detect::{self, Backend, Decision, Facts};
use crate::foreign::{self, NatRule, Overridden};
use crate::plan::{self, Change, Observed};
use crate::policy::{Family, Policy};
use crate::state::State;

/// Paths every command takes.
#[derive(Debug, Clone)]
pub struct Paths {
    /// Configuration file.
    pub config: PathBuf,
    /// State directory.
    pub state_dir: PathBuf,
}

/// Loads and validates the configuration and derives the policy.
pub fn load(path: &Path) -> Result<(Config, Policy), ConfigError> {
    let cfg = config::load(path)?;
    let policy = Policy::from_config(&cfg);
    Ok((cfg, policy))
}

/// Facts and decision of each family.
#[derive(Debug, Clone, Serialize)]
pub struct Detection {
    /// IPv4.
    pub ipv4: FamilyDetection,
    /// IPv6.
    pub ipv6: FamilyDetection,
}

/// Facts and decision of one family.
#[derive(Debug, Clone, Serialize)]
pub struct FamilyDetection {
    /// Chosen backend.
    pub backend: Backend,
    /// Why.
    pub reason: String,
    /// Where the guard of this family lives (design.md §3.1, §3.2), or why it has none.
    pub guard: String,
    /// What was found.
    pub facts: Facts,
}

impl FamilyDetection {
    /// Whether masqd keeps the guard of this family in nftables.
    pub fn has_guard(&self) -> bool {
        !self.facts.nft_unavailable
    }
}

fn guard_text(backend: Backend, nft_available: bool) -> String {
    match (backend, nft_available) {
        (_, false) => "unavailable: the kernel answers no nf_tables requests, so exceptions are \
                       enforced by RETURN rules only and a masquerade rule that runs first \
                       (another daemon's) wins"
            .to_string(),
        (Backend::Nft, true) => format!(
            "identity SNAT in table inet {} chain {} (priority {})",
            plan::TABLE,
            plan::CHAIN,
            plan::CHAIN_PRIORITY_NFT
        ),
        (Backend::Legacy, true) => format!(
            "identity SNAT in table inet {} chain {} (priority {}), in front of the policy in \
             legacy xtables",
            plan::TABLE,
            plan::CHAIN,
            plan::CHAIN_PRIORITY_NFT
        ),
    }
}

impl Detection {
    /// The detection of a family.
    pub fn family(&self, f: Family) -> &FamilyDetection {
        match f {
            Family::V4 => &self.ipv4,
            Family::V6 => &self.ipv6,
        }
    }

    /// Families whose backend is `b`.
    pub fn families(&self, b: Backend) -> Vec<Family> {
        Family::ALL
            .into_iter()
            .filter(|f| self.family(*f).backend == b)
            .collect()
    }
}

/// Runs detection for both families. A family without pod CIDRs whose legacy side cannot be
/// inspected is reported, not fatal; one with pod CIDRs is an error that says how to fix it.
pub fn detect(cfg: &Config, policy: &Policy, sock: &mut Socket) -> Result<Detection> {
    detect_in(cfg.mode, policy, sock)
}

fn detect_in(mode: config::BackendMode, policy: &Policy, sock: &mut Socket) -> Result<Detection> {
    let v4 = detect::gather(Family::V4, sock).context("detecting the ipv4 backend")?;
    let v6 = detect::gather(Family::V6, sock).context("detecting the ipv6 backend")?;
    let decisions = detect::decide_both(mode, [&v4, &v6]);
    let mut out = Vec::new();
    for ((f, facts), d) in Family::ALL.into_iter().zip([v4, v6]).zip(decisions) {
        let d = match d {
            Ok(d) => d,
            Err(e) if policy.family(f).is_none() => Decision {
                backend: Backend::Nft,
                reason: format!("no {f} pod CIDRs, so nothing to install ({e})"),
            },
            Err(e) => return Err(anyhow!(e)),
        };
        out.push(FamilyDetection {
            backend: d.backend,
            reason: d.reason,
            guard: guard_text(d.backend, !facts.nft_unavailable),
            facts,
        });
    }
    let ipv6 = out
        .pop()
        .ok_or_else(|| anyhow!("internal: no IPv6 detection"))?;
    let ipv4 = out
        .pop()
        .ok_or_else(|| anyhow!("internal: no IPv4 detection"))?;
    Ok(Detection { ipv4, ipv6 })
}

/// Runs detection for both families with no configuration (`masqd detect` without a config
/// file): `backend.mode = "auto"` and no policy, so a family whose legacy side cannot be
/// inspected is reported, not fatal.
pub fn detect_without_policy(sock: &mut Socket) -> Result<Detection> {
    let none = Policy {
        v4: None,
        v6: None,
        bridges: Vec::new(),
        random_fully: false,
        replace_default_rule: true,
        default_rule_cidrs: Vec::new(),
        honor_marks: Vec::new(),
        guard_only: Vec::new(),
    };
    detect_in(config::BackendMode::Auto, &none, sock)
}

/// Everything that would change.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The part of the policy that lives in nftables.
    pub nft_policy: Policy,
    /// Detection it is based on.
    pub detection: Detection,
    /// The nftables observation (its generation guards the transaction).
    pub observed: Observed,
    /// nftables changes (one transaction).
    pub nft: Vec<Change>,
    /// Legacy plans that change something, per family.
    pub legacy: Vec<(Family, LegacyPlan)>,
    /// Legacy observations per family (for status).
    pub legacy_observed: BTreeMap<Family, LegacyObserved>,
    /// Set when change notifications were muted around a large commit and the ruleset
    /// changed in that window by someone else: the caller should reconcile again.
    pub missed_events: bool,
}

impl Plan {
    /// Whether nothing needs to change.
    pub fn is_empty(&self) -> bool {
        self.nft.is_empty() && self.legacy.is_empty()
    }

    /// Number of changes.
    pub fn len(&self) -> usize {
        self.nft.len()
            + self
                .legacy
                .iter()
                .map(|(_, p)| p.summary.len().max(1))
                .sum::<usize>()
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
    /// with the guard never decides a connection's source.
    pub fn touches_own(&self) -> bool {
        let nft = self
            .nft
            .iter()
            .any(|c| !matches!(c, Change::RemoveDefaultRule(_)));
        let legacy = self
            .legacy
            .iter()
            .any(|(_, lp)| lp.summary.iter().any(|s| !s.ends_with("(default rule)")));
        nft || legacy
    }

    /// Whether any family's policy lives in legacy xtables.
    fn legacy_first(&self) -> bool {
        !self.detection.families(Backend::Legacy).is_empty()
    }
}

/// Observes both backends and plans.
pub fn make_plan(cfg: &Config, policy: &Policy, sock: &mut Socket) -> Result<Plan> {
    make_plan_cached(cfg, policy, sock, None)
}

/// [`make_plan`] with the daemon's cache of the sets it committed last.
pub fn make_plan_cached(
    cfg: &Config,
    policy: &Policy,
    sock: &mut Socket,
    cache: Option<&SetCache>,
) -> Result<Plan> {
    let detection = detect(cfg, policy, sock)?;
    let nft_ok = detection.ipv4.has_guard() && detection.ipv6.has_guard();
    let guard: Vec<Family> = detection
        .families(Backend::Legacy)
        .into_iter()
        .filter(|f| detection.family(*f).has_guard())
        .collect();
    let nft_policy = policy.nft_part(&detection.families(Backend::Nft), &guard);
    let (observed, nft_changes) = if nft_ok {
        let observed = nft::observe(sock, cache).context("reading the nftables ruleset")?;
        let changes = plan::plan(&nft_policy, &observed);
        (observed, changes)
    } else if !detection.families(Backend::Nft).is_empty() {
        return Err(anyhow!(
            "the kernel answers no nf_tables requests; set backend.mode = \"legacy\" or load \
             the nf_tables module"
        ));
    } else {
        (Observed::default(), Vec::new())
    };
    let mut legacy_plans = Vec::new();
    let mut legacy_observed = BTreeMap::new();
    for f in Family::ALL {
        let fd = detection.family(f);
        let on_legacy = fd.backend == Backend::Legacy;
        let nat_loaded = fd.facts.legacy_tables.iter().any(|t| t == "nat");
        if !on_legacy && !nat_loaded {
            continue;
        }
        let Some(bins) = legacy::binaries(f) else {
            // Detection already refused a legacy family without binaries; a non-legacy
            // family with legacy nat loaded but no binaries cannot be cleaned: say so.
            tracing::warn!(
                "{f}: the legacy nat table is loaded but the iptables-legacy binaries are missing; \
                 default rules there cannot be removed"
            );
            continue;
        };
        let lo = legacy::observe(f, &bins)
            .with_context(|| format!("reading the legacy {f} nat table"))?;
        let active = if on_legacy {
            policy
                .family(f)
                .map(|fp| (fp, policy.bridges.as_slice(), policy.random_fully))
        } else {
            None
        };
        let lp = legacy::plan(
            active,
            &lo,
            &policy.default_rule_cidrs,
            policy.replace_default_rule,
        );
        legacy_observed.insert(f, lo);
        if lp.payload.is_some() {
            legacy_plans.push((f, lp));
        }
    }
    Ok(Plan {
        nft_policy,
        detection,
        observed,
        nft: nft_changes,
        legacy: legacy_plans,
        legacy_observed,
        missed_events: false,
    })
}

impl Plan {
    /// The other components' source NAT rules that can apply to the pod traffic of
    /// `policy`, and what masqd's guard does about each: the legacy ones from this plan's
    /// observation, the nftables ones read now (a dump of every rule, so only the one-shot
    /// `status` and `detect` ask; reconciles never do). Equals `nft -a list ruleset` plus
    /// `iptables-legacy-save -t nat`, filtered.
    pub fn overridden(&self, policy: &Policy, sock: &mut Socket) -> Result<Vec<Overridden>> {
        let mut rules: Vec<NatRule> = Vec::new();
        if self.detection.ipv4.has_guard() && self.detection.ipv6.has_guard() {
            rules = nft::foreign::nat_rules(sock).context("reading other NAT rules")?;
        }
        for (f, lo) in &self.legacy_observed {
            rules.extend(legacy::nat_rules(*f, lo));
        }
        let removed_nft: Vec<(Family, &str, &str, u64)> = self
            .nft
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
            if r.backend == "nft" {
                let fam_ok = r.table_family == if f == Family::V4 { "ip" } else { "ip6" };
                return fam_ok
                    && removed_nft.iter().any(|(rf, t, c, h)| {
                        *rf == f && *t == r.table && *c == r.chain && *h == r.handle
                    });
            }
            self.legacy.iter().any(|(lf, lp)| {
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
/// (generation mismatch) is re-planned, at most 5 times.
///
/// The state directory is locked for the whole observe → record → apply
/// ([`State::lock_command`]): refused while `masqd run` holds it, waiting for another `apply`
/// or `teardown` up to [`crate::state::LOCK_WAIT`].
pub fn apply(paths: &Paths, cfg: &Config, policy: &Policy) -> Result<Plan> {
    let _lock = State::new(&paths.state_dir).lock_command("apply")?;
    let mut sock = Socket::open().context("opening netlink")?;
    apply_with(&mut sock, &paths.state_dir, cfg, policy, &mut None, None)
}

/// Elements in a transaction above which the daemon mutes its change notifications around the
/// commit (the kernel then does not build one notification per element).
pub const QUIET_ELEMENTS: usize = 1_000;

/// Called with `true` before a large commit and `false` after it.
pub type Mute<'a> = &'a (dyn Fn(bool) + Sync);

/// [`apply`] over an open socket (the daemon keeps one, so that it recognises the change
/// notifications its own transactions cause by the socket's port id).
///
/// `cache` holds the sets masqd committed last (see [`SetCache`]); it is refreshed after every
/// success and dropped after any failure.
///
/// The caller holds the state directory's lock: [`apply`] takes it per command, `masqd run`
/// ([`State::lock_daemon`]) for its whole life.
pub fn apply_with(
    sock: &mut Socket,
    state_dir: &Path,
    cfg: &Config,
    policy: &Policy,
    cache: &mut Option<SetCache>,
    mute: Option<Mute<'_>>,
) -> Result<Plan> {
    let r = apply_inner(sock, state_dir, cfg, policy, cache, mute);
    if r.is_err() {
        *cache = None;
    }
    r
}

fn apply_inner(
    sock: &mut Socket,
    state_dir: &Path,
    cfg: &Config,
    policy: &Policy,
    cache: &mut Option<SetCache>,
    mute: Option<Mute<'_>>,
) -> Result<Plan> {
    let state = State::new(state_dir);
    // A state file that cannot be read is refused before anything changes, whether or not
    // this apply has a rule to record.
    state.load()?;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let p = make_plan_cached(cfg, policy, sock, cache.as_ref())?;
        if p.is_empty() {
            *cache = Some(SetCache::after(&p.nft_policy, p.observed.genid));
            return Ok(p);
        }
        let mut records: Vec<_> = p
            .nft
            .iter()
            .filter_map(|c| match c {
                Change::RemoveDefaultRule(r) => Some(nft::record_of(r)),
                _ => None,
            })
            .collect();
        for (f, lp) in &p.legacy {
            for (spec, saddr, oif) in &lp.removed_defaults {
                records.push(legacy::record_of(*f, spec, saddr, oif));
            }
        }
        if !records.is_empty() {
            state
                .record(&records)
                .context("recording the default rules before removing them")?;
        }
        let legacy_first = p.legacy_first();
        if legacy_first {
            apply_legacy(&p)?;
        }
        let elements: usize = p
            .nft
            .iter()
            .map(|c| match c {
                Change::AddElements { ranges, .. } | Change::DeleteElements { ranges, .. } => {
                    ranges.len()
                }
                _ => 0,
            })
            .sum();
        let muted = mute.filter(|_| elements > QUIET_ELEMENTS);
        if let Some(m) = muted {
            m(true);
        }
        let res = nft::apply(sock, &p.nft, Some(p.observed.genid));
        if let Some(m) = muted {
            m(false);
        }
        let mut p = p;
        match res {
            Ok(()) => {
                // Our transaction made generation G+1. Anything else means someone else changed
                // the ruleset too: the cache cannot be trusted then, and if we were not
                // listening the caller must reconcile again.
                let own = p.observed.genid.wrapping_add(1);
                *cache = if p.nft.is_empty() {
                    Some(SetCache::after(&p.nft_policy, p.observed.genid))
                } else {
                    let now = nft::genid(sock).ok();
                    if now != Some(own) {
                        tracing::debug!(
                            "ruleset generation {now:?} after masqd's commit, not {own}: the set \
                             cache is dropped (someone else committed too)"
                        );
                    }
                    p.missed_events = muted.is_some() && now != Some(own);
                    (now == Some(own)).then(|| SetCache::after(&p.nft_policy, own))
                };
            }
            Err(e) if e.errno() == Some(ERESTART) && attempt < 5 => {
                tracing::info!("nftables ruleset changed while planning; planning again");
                continue;
            }
            Err(e) => return Err(e).context("applying the nftables changes"),
        }
        if !legacy_first {
            apply_legacy(&p)?;
        }
        return Ok(p);
    }
}

fn apply_legacy(p: &Plan) -> Result<()> {
    for (f, lp) in &p.legacy {
        let Some(payload) = &lp.payload else { continue };
        let bins = legacy::binaries(*f)
            .ok_or_else(|| anyhow!("{f}: the iptables-legacy binaries disappeared from PATH"))?;
        legacy::apply(&bins, payload)
            .with_context(|| format!("applying the legacy {f} changes:\n{payload}"))?;
    }
    Ok(())
}

/// What `masqd status` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Backend in use: `nft`, `legacy`, or per family (`ipv4:legacy ipv6:nft`).
    pub backend: String,
    /// Whether the kernel matches the policy.
    pub in_sync: bool,
    /// Number of pending changes.
    pub pending_changes: usize,
    /// Whether `table inet masqd` exists.
    pub table_present: bool,
    /// The IPv4 part, when the policy has IPv4 pod CIDRs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<FamilyStatus>,
    /// The IPv6 part, when the policy has IPv6 pod CIDRs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<FamilyStatus>,
    /// Broad default rules for the pod CIDRs still present (both backends).
    pub default_rules_present: usize,
    /// The default rules masqd removed and recorded in the state directory, which
    /// `masqd teardown` puts back.
    pub removed_rules: Vec<RecordedRule>,
    /// Other components' source NAT rules that can apply to pod traffic, with what masqd's
    /// guard does about each.
    pub overridden: Vec<Overridden>,
}

/// The status of one address family. masqd's rules live in nat chains, which see only the
/// first packet of each connection: their counters count connections.
#[derive(Debug, Clone, Serialize)]
pub struct FamilyStatus {
    /// Where the family's policy lives.
    pub backend: Backend,
    /// Intervals per nftables set (`pod4`, `nomasq4`), and rules of the legacy chain
    /// (`legacy-chain`).
    pub sets: BTreeMap<String, usize>,
    /// New connections masqueraded by masqd's masquerade rule (nftables or legacy).
    pub masqueraded_connections: u64,
    /// New connections to an exception kept with the pod's address: claimed by the guard, or
    /// returned by a legacy RETURN rule.
    pub kept_connections: u64,
}

/// A default rule masqd removed, as recorded in the state directory.
#[derive(Debug, Clone, Serialize)]
pub struct RecordedRule {
    /// `nft` or `legacy`.
    pub backend: String,
    /// `ip` or `ip6`.
    pub family: String,
    /// Table.
    pub table: String,
    /// Chain.
    pub chain: String,
    /// The rule, as masqd recorded it.
    pub rule: String,
}

impl RecordedRule {
    fn of(r: &crate::state::RemovedRule) -> RecordedRule {
        RecordedRule {
            backend: r.backend.clone(),
            family: r.family.clone(),
            table: r.table.clone(),
            chain: r.chain.clone(),
            rule: r.description.clone(),
        }
    }
}

impl std::fmt::Display for RecordedRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.backend == "legacy" {
            let bin = if self.family == "ip6" {
                "ip6tables-legacy"
            } else {
                "iptables-legacy"
            };
            write!(f, "{bin} -t {} {}", self.table, self.rule)
        } else {
            write!(f, "{}", self.rule)
        }
    }
}

/// Reads the status: the plan (detection, both backends observed), the rule counters of each
/// family, the records of the state directory and the overridden rules. Equals `nft list table
/// inet masqd`, `iptables-legacy-save -c -t nat` per legacy family, `nft -a list ruleset`
/// (filtered) and reading `removed-default-rules.json`.
pub fn status(paths: &Paths, cfg: &Config, policy: &Policy) -> Result<Status> {
    let mut sock = Socket::open().context("opening netlink")?;
    let p = make_plan(cfg, policy, &mut sock)?;
    let records = State::new(&paths.state_dir).load()?;
    let fam = |f: Family| {
        policy.family(f).map(|_| FamilyStatus {
            backend: p.detection.family(f).backend,
            sets: BTreeMap::new(),
            masqueraded_connections: 0,
            kept_connections: 0,
        })
    };
    let mut st = Status {
        backend: p.backend_name(policy),
        in_sync: p.is_empty(),
        pending_changes: p.len(),
        table_present: p.observed.table.is_some(),
        ipv4: fam(Family::V4),
        ipv6: fam(Family::V6),
        default_rules_present: plan::default_rules_to_remove(policy, &p.observed.foreign).len()
            + p.legacy
                .iter()
                .map(|(_, l)| l.removed_defaults.len())
                .sum::<usize>(),
        removed_rules: records.iter().map(RecordedRule::of).collect(),
        overridden: p.overridden(policy, &mut sock)?,
    };
    count_nft(&p, &mut st);
    count_legacy(&p, &mut st);
    Ok(st)
}

impl Status {
    /// The status of a family the policy has.
    pub fn family_mut(&mut self, f: Family) -> Option<&mut FamilyStatus> {
        match f {
            Family::V4 => self.ipv4.as_mut(),
            Family::V6 => self.ipv6.as_mut(),
        }
    }
}

/// The sets and rule counters of masqd's nftables table, per family (by the sets' and the
/// rules' `masqd:…` tags).
fn count_nft(p: &Plan, st: &mut Status) {
    let Some(t) = &p.observed.table else { return };
    for f in Family::ALL {
        let Some(fs) = st.family_mut(f) else { continue };
        for name in [plan::pod_set(f), plan::nomasq_set(f)] {
            if let Some(s) = t.sets.get(&name) {
                fs.sets.insert(name, s.ranges.as_ref().map_or(0, Vec::len));
            }
        }
        let Some(ch) = &t.chain else { continue };
        for r in &ch.rules {
            let c = r.comment.as_deref().unwrap_or_default();
            let n = r.packets.unwrap_or(0);
            if c.starts_with(&format!("masqd:masquerade:{}", f.digit())) {
                fs.masqueraded_connections += n;
            } else if c == format!("masqd:guard:{}", f.digit()) {
                fs.kept_connections += n;
            }
        }
    }
}

/// The rules and counters of masqd's legacy chain, per family. (Where the guard runs, it claims
/// the excepted connections first and the RETURN rules count none.)
fn count_legacy(p: &Plan, st: &mut Status) {
    for (f, lo) in &p.legacy_observed {
        let Some(fs) = st.family_mut(*f) else {
            continue;
        };
        if !lo.chain_exists {
            continue;
        }
        fs.sets.insert("legacy-chain".into(), lo.chain_rules.len());
        for (rule, n) in lo.chain_rules.iter().zip(&lo.chain_packets) {
            if rule.ends_with("-j MASQUERADE") || rule.contains("-j MASQUERADE ") {
                fs.masqueraded_connections += n;
            } else if rule.contains(" -d ") && rule.ends_with("-j RETURN") {
                fs.kept_connections += n;
            }
        }
    }
}

/// What `masqd teardown` did, rule by rule.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TeardownReport {
    /// The recorded default rules put back.
    pub restored: Vec<RecordedRule>,
    /// Recorded default rules present already (their owner re-inserted them): not added twice,
    /// their records dropped.
    pub already_present: Vec<RecordedRule>,
    /// masqd's own objects removed (`table inet masqd`, a legacy chain and its jump).
    pub removed: Vec<String>,
    /// The state directory held no record, so nothing was put back (a record lost with the
    /// directory cannot be restored).
    pub no_record: bool,
}

/// Puts the recorded default rules back, then removes masqd's objects from both backends
/// (design.md §5), so that at no moment neither masqd's policy nor the restored rule is in
/// place. Returns what it put back and removed.
///
/// 1. Every record is checked before it is replayed (it must still decode as a broad masquerade
///    rule for its source CIDR); nftables records go back in one transaction that recreates a
///    missing `ip`/`ip6 nat` table or `POSTROUTING` chain, legacy ones in one
///    `iptables-legacy-restore` per family. Nothing of masqd's is removed yet.
/// 2. Where a record cannot be put back, teardown says so naming the rule, keeps the record and
///    stops: masqd's policy stays in place.
/// 3. Otherwise masqd's legacy chains and jumps go, then its nftables table; it succeeds only
///    when nothing of masqd's is left.
///
/// Holds the state lock throughout: refused while `masqd run` holds the state directory.
pub fn teardown(paths: &Paths) -> Result<TeardownReport> {
    let state = State::new(&paths.state_dir);
    let _lock = state.lock_command("teardown")?;
    let records = state.load()?;
    let mut sock = Socket::open().context("opening netlink")?;
    let nft_ok = match nft::genid(&mut sock) {
        Ok(_) => true,
        Err(e) if matches!(e.errno(), Some(libc::EOPNOTSUPP | libc::EPROTONOSUPPORT)) => false,
        Err(e) => return Err(e).context("reading the nftables ruleset generation"),
    };
    let mut report = TeardownReport {
        no_record: records.is_empty(),
        ..Default::default()
    };
    let mut kept = Vec::new();
    let mut problems = Vec::new();
    restore_nft_records(
        &mut sock,
        nft_ok,
        &records,
        &mut kept,
        &mut problems,
        &mut report,
    );
    restore_legacy_records(&records, &mut kept, &mut problems, &mut report);
    for r in records
        .iter()
        .filter(|r| r.backend != "nft" && r.backend != "legacy")
    {
        problems.push(format!(
            "{}: unknown backend {:?}",
            r.description, r.backend
        ));
        kept.push(r.clone());
    }
    state.store(&kept)?;
    if !problems.is_empty() {
        return Err(anyhow!(
            "{} recorded rule(s) could not be put back, so masqd's policy stays in place and \
             the records stay in {}:\n  {}",
            problems.len(),
            state.path().display(),
            problems.join("\n  ")
        ));
    }
    report.removed = remove_own_objects(&mut sock, nft_ok)?;
    Ok(report)
}

/// Teardown step 1 for the nftables records: checked, then put back in one transaction
/// (re-planned when the ruleset changed meanwhile). Failures go to `problems`, with the
/// records to `kept`; what went back (or was there already) to `report`.
fn restore_nft_records(
    sock: &mut Socket,
    nft_ok: bool,
    records: &[crate::state::RemovedRule],
    kept: &mut Vec<crate::state::RemovedRule>,
    problems: &mut Vec<String>,
    report: &mut TeardownReport,
) {
    let mut good = Vec::new();
    for r in records.iter().filter(|r| r.backend == "nft") {
        let why = match nft::replayable(r) {
            Ok(_) if nft_ok => {
                good.push(r);
                continue;
            }
            Ok(_) => "the kernel answers no nf_tables requests".to_string(),
            Err(why) => format!("refused to replay it: {why}"),
        };
        problems.push(format!("{}: {why}", r.description));
        kept.push(r.clone());
    }
    if good.is_empty() {
        return;
    }
    let mut attempt = 0;
    loop {
        attempt += 1;
        match nft::restore_rules(sock, &good) {
            Ok(done) => {
                for r in good {
                    let list = if done.contains(&r.description) {
                        &mut report.restored
                    } else {
                        &mut report.already_present
                    };
                    list.push(RecordedRule::of(r));
                }
                return;
            }
            Err(e)
                if attempt < 5
                    && e.downcast_ref::<nft::netlink::NlError>()
                        .and_then(|n| n.errno())
                        == Some(ERESTART) => {}
            Err(e) => {
                for r in good {
                    problems.push(format!("{}: {e:#}", r.description));
                    kept.push(r.clone());
                }
                return;
            }
        }
    }
}

/// Teardown step 1 for the legacy records: checked, then appended to POSTROUTING with one
/// `iptables-legacy-restore --noflush` per family. Failures go to `problems`, with the records
/// to `kept`; what went back (or was there already) to `report`.
fn restore_legacy_records(
    records: &[crate::state::RemovedRule],
    kept: &mut Vec<crate::state::RemovedRule>,
    problems: &mut Vec<String>,
    report: &mut TeardownReport,
) {
    for f in Family::ALL {
        let fam = if f == Family::V4 { "ip" } else { "ip6" };
        let mut good = Vec::new();
        for r in records
            .iter()
            .filter(|r| r.backend == "legacy" && r.family == fam)
        {
            match legacy::replayable(r) {
                Ok(_) => good.push(r),
                Err(why) => {
                    problems.push(format!("{}: refused to replay it: {why}", r.description));
                    kept.push(r.clone());
                }
            }
        }
        if good.is_empty() {
            continue;
        }
        let res = legacy::binaries(f)
            .ok_or_else(|| anyhow!("no iptables-legacy binaries to restore it with"))
            .and_then(|bins| {
                let lo = legacy::observe(f, &bins)?;
                let present: Vec<bool> = good
                    .iter()
                    .map(|r| {
                        let spec = r.legacy_rule.clone().unwrap_or_default();
                        lo.postrouting.iter().any(|o| {
                            legacy::same_rules(std::slice::from_ref(o), std::slice::from_ref(&spec))
                        })
                    })
                    .collect();
                let (payload, _) = legacy::restore_payload(&lo, &good);
                if let Some(p) = payload {
                    legacy::apply(&bins, &p)?;
                }
                Ok(present)
            });
        match res {
            Ok(present) => {
                for (r, there) in good.into_iter().zip(present) {
                    let list = if there {
                        &mut report.already_present
                    } else {
                        &mut report.restored
                    };
                    list.push(RecordedRule::of(r));
                }
            }
            Err(e) => {
                for r in good {
                    problems.push(format!("{}: {e:#}", r.description));
                    kept.push(r.clone());
                }
            }
        }
    }
}

/// Teardown step 3: masqd's legacy chains and jumps, then its nftables table; then checks that
/// nothing of masqd's is left. Returns what it removed. Equals `iptables-legacy-restore
/// --noflush` of [`legacy::teardown_payload`] per family, then `nft delete table inet masqd`.
fn remove_own_objects(sock: &mut Socket, nft_ok: bool) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let mut legacy_bins = Vec::new();
    for f in Family::ALL {
        if !legacy::tables_loaded(f)
            .unwrap_or_default()
            .iter()
            .any(|t| t == "nat")
        {
            continue;
        }
        let Some(bins) = legacy::binaries(f) else {
            tracing::warn!(
                "{f}: the legacy nat table is loaded but the iptables-legacy binaries are \
                 missing: masqd's legacy chain, if any, cannot be removed"
            );
            continue;
        };
        let lo = legacy::observe(f, &bins)
            .with_context(|| format!("reading the legacy {f} nat table"))?;
        if let Some(payload) = legacy::teardown_payload(&lo) {
            legacy::apply(&bins, &payload).with_context(|| {
                format!(
                    "removing masqd's legacy {f} chain (the recorded rules are back; masqd's \
                     table stays until teardown runs again):\n{payload}"
                )
            })?;
            removed.push(legacy_removed(f, &lo));
        }
        legacy_bins.push((f, bins));
    }
    if nft_ok {
        let existed = nft::own_table_exists(sock)?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match nft::delete_own_table(sock) {
                Ok(()) => break,
                Err(e) if e.errno() == Some(ERESTART) && attempt < 5 => {}
                Err(e) => return Err(e).context("deleting table inet masqd"),
            }
        }
        if nft::own_table_exists(sock)? {
            return Err(anyhow!("table inet {} is still there", plan::TABLE));
        }
        if existed {
            removed.push(format!("table inet {}", plan::TABLE));
        }
    }
    for (f, bins) in legacy_bins {
        if legacy::observe(f, &bins)?.has_masqd() {
            return Err(anyhow!("masqd's legacy {f} chain or jump is still there"));
        }
    }
    Ok(removed)
}

/// How teardown names the legacy objects it removed.
fn legacy_removed(f: Family, lo: &LegacyObserved) -> String {
    let jumps = lo.postrouting.iter().filter(|r| *r == legacy::JUMP).count();
    let (_, _, bin) = legacy::binary_names(f);
    let mut parts = Vec::new();
    if lo.chain_exists {
        parts.push(format!(
            "chain nat {} ({} rules)",
            legacy::CHAIN,
            lo.chain_rules.len()
        ));
    }
    if jumps > 0 {
        parts.push(format!("{jumps} jump(s) from POSTROUTING"));
    }
    format!("{bin}: {}", parts.join(" and "))
}
