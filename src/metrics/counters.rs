//! The connection counters of `masqd run` (each kernel counter followed with a running base, so
//! that a total never goes down), what a reconcile's plan and observation add to them, and the
//! repair causes of a plan.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::kernel::legacy_counts;
use crate::backend::{Change, RuleSpec};
use crate::engine::Plan;
use crate::policy::Family;

/// A kernel counter followed with a running base, so that its total never goes down.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Running {
    base: u64,
    last: u64,
    handle: Option<u64>,
    genid: u32,
}

impl Running {
    /// A reading of the counter: `value` of the rule `handle`, read at ruleset generation
    /// `genid` (0 where there is none: legacy). A reading older than the last one is ignored;
    /// a drop or another rule adds the last value to the base.
    pub fn observe(&mut self, handle: Option<u64>, value: u64, genid: u32) {
        if genid < self.genid {
            return;
        }
        // The same rule at the same generation never counts down: a lower value is a reading
        // taken earlier and handed over later (a reconcile's, after a scrape's). Keep the max.
        let same_rule = handle.is_some() && handle == self.handle && genid == self.genid;
        if same_rule && value < self.last {
            return;
        }
        if value < self.last || (self.handle.is_some() && handle != self.handle) {
            self.base = self.base.saturating_add(self.last);
        }
        self.last = value;
        self.handle = handle;
        self.genid = genid;
    }

    /// The rule was rebuilt (counter at 0) by the commit that made generation `genid`; a
    /// reading at that generation or later already accounted for it.
    pub fn rebuilt(&mut self, genid: u32) {
        if self.genid < genid {
            self.base = self.base.saturating_add(self.last);
            self.last = 0;
            self.handle = None;
            self.genid = genid;
        }
    }

    /// Connections counted since the daemon started following the counter.
    pub fn total(&self) -> u64 {
        self.base.saturating_add(self.last)
    }
}

/// Where a connection counter comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Source {
    /// A rule of masqd's nftables chain.
    Nft,
    /// A rule of the legacy chain `MASQD-POSTROUTING`.
    Legacy,
}

/// A connection counter: the family, the verdict it counts, where it comes from.
pub(super) type ConnKey = (Family, &'static str, Source);

/// What the daemon keeps between reconciles, for scrapes and `/healthz`.
#[derive(Debug, Default)]
pub(super) struct Inner {
    pub(super) conns: BTreeMap<ConnKey, Running>,
    pub(super) families: Vec<Family>,
    /// masqd's chain lives in nftables (a scrape may dump it).
    pub(super) nft_chain: bool,
    pub(super) last_ok: Option<Instant>,
    pub(super) last_error: Option<String>,
    pub(super) resync: Duration,
    pub(super) backend: String,
    /// The reconcile socket's dump requests at the last look, by object.
    pub(super) dumps: BTreeMap<String, u64>,
}

/// The repair causes of an applied plan: the table was gone (everything else follows from
/// that), masqd's chain or rules changed, its set elements changed, a broad default rule was
/// re-added (and removed again), its legacy chain or jump drifted.
pub fn repair_causes(p: &Plan) -> BTreeSet<&'static str> {
    let mut out = BTreeSet::new();
    for c in p.nft_changes() {
        out.insert(match c {
            Change::AddTable => "table_gone",
            Change::AddElements { .. } | Change::DeleteElements { .. } | Change::FlushSet(_) => {
                "elements_changed"
            }
            Change::RemoveDefaultRule(_) => "broad_rule_readded",
            _ => "rule_changed",
        });
    }
    for (_, lp) in p.legacy_plans() {
        if !lp.removed_defaults.is_empty() {
            out.insert("broad_rule_readded");
        }
        if lp.summary.iter().any(|s| !s.ends_with("(default rule)")) {
            out.insert("legacy_drift");
        }
    }
    if out.contains("table_gone") {
        out.retain(|c| *c == "table_gone" || *c == "broad_rule_readded" || *c == "legacy_drift");
    }
    out
}

pub(super) use crate::backend::counters::verdict_of;

/// A counter of masqd's nftables chain as read from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainCounter {
    /// The rule's tag (`masqd:guard:4`), when it has one.
    pub comment: Option<String>,
    /// Its handle.
    pub handle: u64,
    /// Its packets (the nat chain sees a connection's first packet only).
    pub packets: u64,
}

/// Follows one reading of a rule of masqd's nftables chain at ruleset generation `genid`.
fn observe_rule(inner: &mut Inner, comment: Option<&str>, handle: u64, packets: u64, genid: u32) {
    let Some((f, v)) = comment.and_then(verdict_of) else {
        return;
    };
    inner
        .conns
        .entry((f, v, Source::Nft))
        .or_default()
        .observe(Some(handle), packets, genid);
}

/// Follows the counters of masqd's nftables chain read at generation `genid` (a scrape's).
pub(super) fn observe_chain(inner: &mut Inner, rules: &[ChainCounter], genid: u32) {
    for r in rules {
        observe_rule(inner, r.comment.as_deref(), r.handle, r.packets, genid);
    }
}

/// The counters a reconcile read (before its changes), then the rules it rebuilt.
pub(super) fn observe_plan(inner: &mut Inner, p: &Plan) {
    if let Some(ch) = p
        .nft_observed()
        .table
        .as_ref()
        .and_then(|t| t.chain.as_ref())
    {
        for r in &ch.rules {
            let packets = r.packets.unwrap_or(0);
            observe_rule(
                inner,
                r.comment.as_deref(),
                r.handle,
                packets,
                p.nft_observed().genid,
            );
        }
    }
    let committed = p.nft_observed().genid.wrapping_add(1);
    for c in p.nft_changes() {
        let (f, v) = match c {
            Change::AddRule(RuleSpec::Guard(f)) => (*f, "kept"),
            Change::AddRule(RuleSpec::Masquerade { family, .. }) => (*family, "masqueraded"),
            _ => continue,
        };
        inner
            .conns
            .entry((f, v, Source::Nft))
            .or_default()
            .rebuilt(committed);
    }
    for (f, lo) in p.legacy_observed() {
        let (masq, kept) = legacy_counts(lo);
        for (v, n) in [("masqueraded", masq), ("kept", kept)] {
            inner
                .conns
                .entry((*f, v, Source::Legacy))
                .or_default()
                .observe(None, n, 0);
        }
    }
}
