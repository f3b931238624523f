//! The nft planner: Policy × Observed → Changes for the nftables layout of design.md §3, and
//! the set diff. Pure and deterministic.
//!
//! The chain runs at `srcnat - 1`, before every other NAT chain at the postrouting hook
//! (iptables-nft's `ip nat`, legacy xtables, Docker's, flannel's, kube-proxy's — all at
//! srcnat). The kernel's NAT core calls those chains only until one of them sets up a binding
//! for the connection; an identity source NAT (`snat ip to ip saddr`) sets one up that changes
//! nothing, so an excepted connection keeps its source whatever other masquerade rules exist
//! (design.md §3.1). A `return` would let a later chain masquerade it.
//!
//! The skeleton (table, base chain, rules) is fixed; the data (set elements) is dynamic. Rules
//! carry a comment tag (`masqd:…`) naming what they are, so the observed skeleton is compared by
//! tag: any difference (a rule edited, added, removed or reordered by someone else, a bridge
//! added, `random_fully` toggled, a family appearing) rebuilds the rules of the chain — inside
//! the same transaction, never by deleting the chain or the table.
//!
//! A set of [`REFILL_AT`] or more wanted ranges is not read back by `apply` ([`refill`]): the
//! kernel's dump of an interval set restarts its tree walk for every message, so reading costs
//! O(n²) while writing costs O(n). Its contents are replaced instead — `flush set` and `add
//! element` of every wanted range in the plan's one transaction, which packets see atomically
//! (the old contents until the commit, the new ones after it).

use std::collections::{BTreeMap, BTreeSet};

use crate::policy::{Family, Policy, Range};

pub use super::model::*;

/// The rules masqd's chain must hold, in order: bridges return, honoured marks return, then
/// per family the guard and the masquerade (the latter only for families whose policy lives
/// in nftables, not for guard-only ones). The bridge return precedes the guard in legacy mode
/// too: traffic leaving through a bridge (hairpin to a published port) is untouched, so a
/// hairpin masquerade of another component still applies.
pub fn desired_rules(p: &Policy) -> Vec<RuleSpec> {
    let mut rules: Vec<RuleSpec> = Vec::new();
    if Family::ALL.into_iter().any(|f| p.family(f).is_some()) {
        rules.extend(p.bridges.iter().map(|b| RuleSpec::BridgeReturn(b.clone())));
        rules.extend(p.honor_marks.iter().map(|m| RuleSpec::MarkReturn(*m)));
    }
    for f in Family::ALL {
        if p.family(f).is_some() {
            rules.push(RuleSpec::Guard(f));
        }
        if p.is_full(f) {
            rules.push(RuleSpec::Masquerade {
                family: f,
                random_fully: p.random_fully,
            });
        }
    }
    rules
}

/// The sets masqd's table must hold: name → (family, ranges).
pub fn desired_sets(p: &Policy) -> BTreeMap<String, (Family, Vec<Range>)> {
    wanted_sets(p)
        .into_iter()
        .map(|(name, (f, ranges))| (name, (f, ranges.to_vec())))
        .collect()
}

/// [`desired_sets`] borrowed from the policy (no copy of the ranges).
pub fn wanted_sets(p: &Policy) -> WantSets<'_> {
    let mut sets = BTreeMap::new();
    for f in Family::ALL {
        if let Some(fp) = p.family(f) {
            sets.insert(pod_set(f), (f, &fp.pod[..]));
            sets.insert(nomasq_set(f), (f, &fp.nomasq[..]));
        }
    }
    sets
}

/// Wanted ranges at and above which `apply` replaces a set's contents instead of reading it
/// back. Measured in a network namespace (release build, 2 shared cores): reading a set back
/// costs 0.03 s at 10,000 intervals, 0.2 s at 30,000, 0.75 s at 60,000, 3.1 s at 120,000 and
/// about a minute at 1,000,000; writing it into an empty set 0.06 s, 0.2 s, 0.43 s, 0.82 s and
/// 2.3 s (8–14 s on a loaded machine). A refill costs more than a write into an empty set:
/// the flush (~1.5 µs per element) and the inserts among the flushed elements, which stay in
/// the tree until the commit. Onto an existing set, read-and-diff against refill measured
/// 1.0–1.4 s against 1.5–4.3 s at 60,000, 3.5–5.1 s against 2.7–3.4 s at 120,000 and 26 s
/// against 6.3 s at 250,000. Below this a read pays off, and an apply in sync then writes
/// nothing.
pub const REFILL_AT: usize = 100_000;

/// Environment variable overriding [`REFILL_AT`], for tests only (a number of ranges; `0`
/// replaces every set). Not a documented setting.
pub const REFILL_AT_ENV: &str = "MASQD_REFILL_AT";

/// The threshold in force: [`REFILL_AT_ENV`] when set to a number, else [`REFILL_AT`].
pub fn refill_at() -> usize {
    std::env::var(REFILL_AT_ENV)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(REFILL_AT)
}

/// Whether a set that must hold `wanted` ranges is replaced rather than read back, with the
/// threshold `at` ([`refill_at`]).
pub fn refill(wanted: usize, at: usize) -> bool {
    wanted >= at
}

/// The sets of the policy that `apply` replaces rather than reads back, with threshold `at`.
pub fn refill_sets(p: &Policy, at: usize) -> BTreeSet<String> {
    wanted_sets(p)
        .into_iter()
        .filter(|(_, (_, ranges))| refill(ranges.len(), at))
        .map(|(name, _)| name)
        .collect()
}

/// Ranges only in `have` (to delete) and only in `want` (to add), comparing whole ranges.
/// Linear when both are sorted (as kernel dumps and policies are); sorts copies otherwise;
/// nothing to do, at once, when both are the same slice.
pub fn diff_sorted(have: &[Range], want: &[Range]) -> (Vec<Range>, Vec<Range>) {
    // The daemon's set cache shares the policy's ranges: the same memory needs no look.
    if have.len() == want.len() && std::ptr::eq(have.as_ptr(), want.as_ptr()) {
        return (Vec::new(), Vec::new());
    }
    let sorted = |v: &[Range]| v.windows(2).all(|w| w[0] <= w[1]);
    if !sorted(have) || !sorted(want) {
        let mut h = have.to_vec();
        let mut w = want.to_vec();
        h.sort();
        w.sort();
        return diff_sorted(&h, &w);
    }
    let (mut del, mut add) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while i < have.len() || j < want.len() {
        match (have.get(i), want.get(j)) {
            (Some(h), Some(w)) if h == w => {
                i += 1;
                j += 1;
            }
            (Some(h), Some(w)) if h < w => {
                del.push(*h);
                i += 1;
            }
            (Some(_), Some(w)) => {
                add.push(*w);
                j += 1;
            }
            (Some(h), None) => {
                del.push(*h);
                i += 1;
            }
            (None, Some(w)) => {
                add.push(*w);
                j += 1;
            }
            (None, None) => break,
        }
    }
    (del, add)
}

/// The broad default rules that the policy replaces: source exactly one of the node's pod
/// CIDRs (as configured or aggregated), in the same family.
pub fn default_rules_to_remove<'a>(
    p: &Policy,
    observed: &'a [ForeignRule],
) -> Vec<&'a ForeignRule> {
    if !p.replace_default_rule {
        return Vec::new();
    }
    observed
        .iter()
        .filter(|r| {
            Family::of(&r.saddr) == r.table_family && p.default_rule_cidrs.contains(&r.saddr)
        })
        .collect()
}

/// The sets wanted: name → (family, ranges), borrowed from the policy.
pub type WantSets<'a> = BTreeMap<String, (Family, &'a [Range])>;

/// Computes the changes that make the kernel match the policy. Empty when in sync.
pub fn plan(p: &Policy, o: &Observed) -> Vec<Change> {
    let mut out = Vec::new();
    if p.v4.is_none() && p.v6.is_none() {
        // Nothing of the policy lives in nftables: masqd's table goes, default rules still do.
        if o.table.is_some() {
            out.push(Change::DeleteTable);
        }
        push_default_rules(&mut out, p, o);
        return out;
    }
    let want_sets = wanted_sets(p);
    let want_rules = desired_rules(p);

    let empty = ObservedTable::default();
    let table = match &o.table {
        Some(t) => t,
        None => {
            out.push(Change::AddTable);
            &empty
        }
    };

    // 1. Chains that are not masqd's: flush them first (they may reference sets).
    for c in &table.other_chains {
        out.push(Change::FlushChain(c.clone()));
    }

    // 2. The base chain: rebuilt when its rules differ, or a set must go (a set of the wrong
    // shape is recreated, which needs the rules referencing it gone).
    let (stale, recreate) = sets_to_drop(table, &want_sets);
    let rebuild = rules_differ(table, &want_rules) || !stale.is_empty() || !recreate.is_empty();
    push_chain_changes(&mut out, table, rebuild);
    for c in &table.other_chains {
        out.push(Change::DeleteChain(c.clone()));
    }

    // 3. Sets.
    for name in stale.iter().chain(recreate.iter()) {
        out.push(Change::DeleteSet(name.clone()));
    }
    push_set_changes(&mut out, table, &want_sets, &recreate);

    // 4. Rules.
    if rebuild {
        out.extend(want_rules.into_iter().map(Change::AddRule));
    }

    // 5. The broad default rules.
    push_default_rules(&mut out, p, o);
    out
}

/// The broad default rules to remove (design.md §5), after everything else.
fn push_default_rules(out: &mut Vec<Change>, p: &Policy, o: &Observed) {
    for r in default_rules_to_remove(p, &o.foreign) {
        out.push(Change::RemoveDefaultRule(r.clone()));
    }
}

/// Whether the base chain's rules must be rebuilt: it is missing or broken, or its rules'
/// tags are not the wanted ones in the wanted order.
fn rules_differ(table: &ObservedTable, want_rules: &[RuleSpec]) -> bool {
    match &table.chain {
        None => true,
        Some(ch) if !ch.base_ok => true,
        Some(ch) => {
            let have: Vec<Option<&str>> = ch.rules.iter().map(|r| r.comment.as_deref()).collect();
            let want: Vec<String> = want_rules.iter().map(RuleSpec::tag).collect();
            have.len() != want.len()
                || have
                    .iter()
                    .zip(want.iter())
                    .any(|(h, w)| *h != Some(w.as_str()))
        }
    }
}

/// Sets to delete: those not wanted (stale), and those of the wrong shape or unreadable
/// (recreated).
fn sets_to_drop(
    table: &ObservedTable,
    want_sets: &WantSets<'_>,
) -> (Vec<String>, BTreeSet<String>) {
    let mut recreate: BTreeSet<String> = BTreeSet::new();
    let mut stale: Vec<String> = Vec::new();
    for (name, s) in &table.sets {
        match want_sets.get(name) {
            None => stale.push(name.clone()),
            Some((fam, _)) => {
                let unreadable = s.ranges.is_none() && !s.unread;
                if s.family != Some(*fam) || !s.interval || unreadable {
                    recreate.insert(name.clone());
                }
            }
        }
    }
    (stale, recreate)
}

/// The base chain: recreated when broken (flushed first: never by deleting the table), its
/// rules deleted by handle when they are rebuilt, added when missing.
fn push_chain_changes(out: &mut Vec<Change>, table: &ObservedTable, rebuild: bool) {
    match &table.chain {
        Some(ch) if !ch.base_ok => {
            out.push(Change::FlushChain(CHAIN.to_string()));
            out.push(Change::DeleteChain(CHAIN.to_string()));
            out.push(Change::AddChain);
        }
        Some(ch) if rebuild => {
            for r in &ch.rules {
                out.push(Change::DeleteRule {
                    handle: r.handle,
                    comment: r.comment.clone(),
                });
            }
        }
        Some(_) => {}
        None => out.push(Change::AddChain),
    }
}

/// Sets added where missing (or recreated), element deletions (a set not read is flushed),
/// then all element additions (after every deletion, so that an interval can move between
/// adjacent ranges, and a flushed set is refilled whole).
fn push_set_changes(
    out: &mut Vec<Change>,
    table: &ObservedTable,
    want_sets: &WantSets<'_>,
    recreate: &BTreeSet<String>,
) {
    let mut adds = Vec::new();
    for (name, (fam, ranges)) in want_sets {
        let observed = table.sets.get(name).filter(|_| !recreate.contains(name));
        let (del, add) = match observed {
            None => {
                out.push(Change::AddSet {
                    name: name.clone(),
                    family: *fam,
                });
                (Vec::new(), ranges.to_vec())
            }
            Some(s) if s.unread => {
                out.push(Change::FlushSet(name.clone()));
                (Vec::new(), ranges.to_vec())
            }
            // Unreadable sets are in `recreate`, so never observed here.
            Some(s) => match &s.ranges {
                None => continue,
                Some(have) => diff_sorted(have, ranges),
            },
        };
        if !del.is_empty() {
            out.push(Change::DeleteElements {
                set: name.clone(),
                family: *fam,
                ranges: del,
            });
        }
        if !add.is_empty() {
            adds.push(Change::AddElements {
                set: name.clone(),
                family: *fam,
                ranges: add,
            });
        }
    }
    out.extend(adds);
}

/// [`plan`] of an nftables observation, as the nftables-speaking drivers (the kernel's and the
/// fake) plan: another driver's observation plans nothing.
pub fn plan_observation(
    policy: &Policy,
    observed: &crate::backend::Observation,
) -> crate::backend::Changes {
    use crate::backend::{Changes, Observation};
    match observed {
        Observation::Nft(o) => Changes::Nft(plan(policy, o)),
        Observation::Legacy(_) => Changes::Nft(Vec::new()),
    }
}
