//! `masqd status`: the plan, the rule counters of each family, the records of the state
//! directory and the overridden rules.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use serde::Serialize;

use super::{detect_with, drivers, plan_with, Paths, Plan};
use crate::backend::{counters, Backend, Driver, NftDriver, Socket};
use crate::config::{BackendMode, Config};
use crate::foreign::Overridden;
use crate::policy::{Family, Policy};
use crate::state::{RecordBackend, RecordFamily, RemovedRule, State};

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
    /// `nft` or `legacy` (as the state file names it).
    pub backend: RecordBackend,
    /// `ip` or `ip6` (as the state file names it).
    pub family: RecordFamily,
    /// Table.
    pub table: String,
    /// Chain.
    pub chain: String,
    /// The rule, as masqd recorded it.
    pub rule: String,
}

impl RecordedRule {
    /// The status line of a record.
    pub fn of(r: &RemovedRule) -> RecordedRule {
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
        if self.backend.known() == Some(Backend::Legacy) {
            let bin = self.family.known().unwrap_or(Family::V4).ipt_binary();
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
    let sock = Socket::open().context("opening netlink")?;
    let mut nft = NftDriver::new(sock, None);
    status_with(&mut nft, &paths.state_dir, cfg.mode, policy)
}

/// [`status`] through an nft driver (the kernel's, or a fake).
pub fn status_with(
    nft: &mut dyn Driver,
    state_dir: &std::path::Path,
    mode: BackendMode,
    policy: &Policy,
) -> Result<Status> {
    let detection = detect_with(mode, policy, &mut *nft)?;
    let p = {
        let mut set = drivers(&detection, policy, Box::new(&mut *nft))?;
        plan_with(&mut set, detection)?
    };
    let records = State::new(state_dir).load()?;
    let overridden = p.overridden_with(policy, nft)?;
    Ok(status_of(&p, policy, &records, overridden))
}

/// The status of a plan: its counters, the records and the overridden rules given.
pub fn status_of(
    p: &Plan,
    policy: &Policy,
    records: &[RemovedRule],
    overridden: Vec<Overridden>,
) -> Status {
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
        table_present: p.nft_observed().table.is_some(),
        ipv4: fam(Family::V4),
        ipv6: fam(Family::V6),
        default_rules_present: crate::backend::default_rules_present(policy, p.nft_observed())
            + p.legacy_plans()
                .iter()
                .map(|(_, l)| l.removed_defaults.len())
                .sum::<usize>(),
        removed_rules: records.iter().map(RecordedRule::of).collect(),
        overridden,
    };
    count(p, &mut st);
    st
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

/// The counters of every driver's observation, added to the family's status.
fn count(p: &Plan, st: &mut Status) {
    for f in Family::ALL {
        let Some(fs) = st.family_mut(f) else { continue };
        let nft = counters::nft(p.nft_observed(), f);
        let legacy = p.legacy_observed().get(&f).map(counters::legacy);
        for c in std::iter::once(nft).chain(legacy).flatten() {
            fs.sets.extend(c.sets);
            fs.masqueraded_connections += c.masqueraded;
            fs.kept_connections += c.kept;
        }
    }
}
