//! Policy × Observed → Changes for the nftables layout of design.md §3. Pure and deterministic.
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

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use ipnet::IpNet;

use crate::config::HonorMark;
use crate::policy::{Family, Policy, Range};

/// Name of masqd's table (family inet).
pub const TABLE: &str = "masqd";
/// Name of masqd's base chain.
pub const CHAIN: &str = "postrouting";
/// Priority of the base chain: `srcnat - 1` (NF_IP_PRI_NAT_SRC is 100), so the guard runs
/// before every other NAT chain at the hook.
pub const CHAIN_PRIORITY: i32 = 99;
/// The priority as nft writes it.
pub const CHAIN_PRIORITY_NFT: &str = "srcnat - 1";

/// Name of the pod set of a family (`pod4`, `pod6`).
pub fn pod_set(f: Family) -> String {
    format!("pod{}", f.digit())
}

/// Name of the exception set of a family (`nomasq4`, `nomasq6`).
pub fn nomasq_set(f: Family) -> String {
    format!("nomasq{}", f.digit())
}

/// One rule of masqd's chain.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RuleSpec {
    /// `oifname "<bridge>" return`
    BridgeReturn(String),
    /// `meta mark & MASK == VALUE return`: marked for masquerade by another component (kube-proxy),
    /// left to the chain that marked it.
    MarkReturn(HonorMark),
    /// `ip saddr @pod4 ip daddr @nomasq4 counter snat ip to ip saddr`: the guard, an identity
    /// source NAT that claims the connection so no later NAT chain can masquerade it.
    Guard(Family),
    /// `ip saddr @pod4 counter masquerade [fully-random]`
    Masquerade {
        /// Address family.
        family: Family,
        /// Fully randomised source ports.
        random_fully: bool,
    },
}

impl RuleSpec {
    /// The tag stored as the rule's comment; it identifies the rule when observed.
    pub fn tag(&self) -> String {
        match self {
            RuleSpec::BridgeReturn(b) => format!("masqd:bridge:{b}"),
            RuleSpec::MarkReturn(m) => format!("masqd:mark:{m}"),
            RuleSpec::Guard(f) => format!("masqd:guard:{}", f.digit()),
            RuleSpec::Masquerade {
                family,
                random_fully,
            } => format!(
                "masqd:masquerade:{}{}",
                family.digit(),
                if *random_fully { ":fully-random" } else { "" }
            ),
        }
    }

    /// The rule in nft syntax (with its comment).
    pub fn nft(&self) -> String {
        let body = match self {
            RuleSpec::BridgeReturn(b) => format!("oifname \"{b}\" return"),
            RuleSpec::MarkReturn(m) if m.mask == u32::MAX => {
                format!("meta mark {:#010x} return", m.value)
            }
            RuleSpec::MarkReturn(m) => {
                format!("meta mark & {:#010x} == {:#010x} return", m.mask, m.value)
            }
            RuleSpec::Guard(f) => {
                let (ip, d) = ip_kw(*f);
                format!("{ip} saddr @pod{d} {ip} daddr @nomasq{d} counter snat {ip} to {ip} saddr")
            }
            RuleSpec::Masquerade {
                family,
                random_fully,
            } => {
                let (ip, d) = ip_kw(*family);
                format!(
                    "{ip} saddr @pod{d} counter masquerade{}",
                    if *random_fully { " fully-random" } else { "" }
                )
            }
        };
        format!("{body} comment \"{}\"", self.tag())
    }
}

fn ip_kw(f: Family) -> (&'static str, char) {
    match f {
        Family::V4 => ("ip", '4'),
        Family::V6 => ("ip6", '6'),
    }
}

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
    let mut sets = BTreeMap::new();
    for f in Family::ALL {
        if let Some(fp) = p.family(f) {
            sets.insert(pod_set(f), (f, fp.pod.clone()));
            sets.insert(nomasq_set(f), (f, fp.nomasq.clone()));
        }
    }
    sets
}

/// A set as observed in the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedSet {
    /// Family of the key, when the key is ipv4_addr / ipv6_addr.
    pub family: Option<Family>,
    /// Whether the set has `flags interval` (and no other flags masqd does not set).
    pub interval: bool,
    /// Covered ranges, in element order, or None when the elements could not be read back
    /// as intervals (the set is then rebuilt).
    pub ranges: Option<Vec<Range>>,
}

/// A rule as observed in a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedRule {
    /// Kernel handle.
    pub handle: u64,
    /// Comment, when it has one.
    pub comment: Option<String>,
    /// Packets of its counter, when it has one.
    pub packets: Option<u64>,
}

/// masqd's base chain as observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedChain {
    /// Type nat, hook postrouting, priority srcnat - 1, policy accept.
    pub base_ok: bool,
    /// Rules in order.
    pub rules: Vec<ObservedRule>,
}

/// masqd's table as observed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObservedTable {
    /// The `postrouting` chain.
    pub chain: Option<ObservedChain>,
    /// Other chains found in the table (not masqd's: removed).
    pub other_chains: Vec<String>,
    /// Sets by name.
    pub sets: BTreeMap<String, ObservedSet>,
}

/// A broad masquerade rule found in another table (design.md §5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignRule {
    /// nft family of its table: `ip` or `ip6`.
    pub table_family: Family,
    /// Table name (`nat`).
    pub table: String,
    /// Chain name (`POSTROUTING`).
    pub chain: String,
    /// Kernel handle.
    pub handle: u64,
    /// Its source match.
    pub saddr: IpNet,
    /// Its `oifname !=` match, when present.
    pub oif_neq: Option<String>,
    /// The raw NFTA_RULE_EXPRESSIONS payload, to put the rule back verbatim.
    pub expressions: Vec<u8>,
    /// The raw NFTA_RULE_USERDATA payload, if any.
    pub userdata: Option<Vec<u8>>,
}

impl ForeignRule {
    /// nft-like description, e.g. `ip nat POSTROUTING: oifname != "docker0" ip saddr 10.0.0.0/24 masquerade`.
    pub fn describe(&self) -> String {
        let fam = match self.table_family {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        };
        let oif = self
            .oif_neq
            .as_ref()
            .map(|o| format!("oifname != \"{o}\" "))
            .unwrap_or_default();
        format!(
            "{fam} {} {}: {oif}{fam} saddr {} masquerade",
            self.table, self.chain, self.saddr
        )
    }
}

/// Everything the nft backend observed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// Ruleset generation the observation belongs to.
    pub genid: u32,
    /// masqd's table, when it exists.
    pub table: Option<ObservedTable>,
    /// Broad masquerade rules in `ip nat` / `ip6 nat` POSTROUTING.
    pub foreign: Vec<ForeignRule>,
}

/// One change to the kernel. A list of them is applied as one transaction, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// `add table inet masqd`
    AddTable,
    /// `delete table inet masqd` (no family is left for nftables)
    DeleteTable,
    /// `flush chain inet masqd <name>` (a chain that is not masqd's, or a broken base chain)
    FlushChain(String),
    /// `delete chain inet masqd <name>`
    DeleteChain(String),
    /// `add chain inet masqd postrouting { type nat hook postrouting priority srcnat - 1; policy accept; }`
    AddChain,
    /// `delete rule inet masqd postrouting handle N`
    DeleteRule {
        /// Handle.
        handle: u64,
        /// Its comment, for display.
        comment: Option<String>,
    },
    /// `delete set inet masqd <name>`
    DeleteSet(String),
    /// `add set inet masqd <name> { type ipvX_addr; flags interval; }`
    AddSet {
        /// Set name.
        name: String,
        /// Key family.
        family: Family,
    },
    /// `delete element inet masqd <set> { … }`
    DeleteElements {
        /// Set name.
        set: String,
        /// Key family.
        family: Family,
        /// Intervals to remove (each exactly as present in the kernel).
        ranges: Vec<Range>,
    },
    /// `add element inet masqd <set> { … }`
    AddElements {
        /// Set name.
        set: String,
        /// Key family.
        family: Family,
        /// Intervals to add.
        ranges: Vec<Range>,
    },
    /// `add rule inet masqd postrouting …`
    AddRule(RuleSpec),
    /// `delete rule ip nat POSTROUTING handle N` — the broad default rule (recorded first).
    RemoveDefaultRule(ForeignRule),
}

impl Change {
    /// A one-line summary (element lists counted, not listed).
    pub fn summary(&self) -> String {
        match self {
            Change::DeleteElements { set, ranges, .. } => format!(
                "delete element inet {TABLE} {set} ({} interval{})",
                ranges.len(),
                if ranges.len() == 1 { "" } else { "s" }
            ),
            Change::AddElements { set, ranges, .. } => format!(
                "add element inet {TABLE} {set} ({} interval{})",
                ranges.len(),
                if ranges.len() == 1 { "" } else { "s" }
            ),
            other => other.to_string(),
        }
    }
}

fn fmt_ranges(family: Family, ranges: &[Range]) -> String {
    let items: Vec<String> = ranges.iter().map(|r| r.display(family)).collect();
    items.join(", ")
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::AddTable => write!(f, "add table inet {TABLE}"),
            Change::DeleteTable => write!(f, "delete table inet {TABLE}"),
            Change::FlushChain(c) => write!(f, "flush chain inet {TABLE} {c}"),
            Change::DeleteChain(c) => write!(f, "delete chain inet {TABLE} {c}"),
            Change::AddChain => write!(
                f,
                "add chain inet {TABLE} {CHAIN} {{ type nat hook postrouting priority {CHAIN_PRIORITY_NFT}; policy accept; }}"
            ),
            Change::DeleteRule { handle, comment } => {
                write!(f, "delete rule inet {TABLE} {CHAIN} handle {handle}")?;
                if let Some(c) = comment {
                    write!(f, " # {c}")?;
                }
                Ok(())
            }
            Change::DeleteSet(s) => write!(f, "delete set inet {TABLE} {s}"),
            Change::AddSet { name, family } => write!(
                f,
                "add set inet {TABLE} {name} {{ type {family}_addr; flags interval; }}"
            ),
            Change::DeleteElements {
                set,
                family,
                ranges,
            } => write!(
                f,
                "delete element inet {TABLE} {set} {{ {} }}",
                fmt_ranges(*family, ranges)
            ),
            Change::AddElements {
                set,
                family,
                ranges,
            } => write!(
                f,
                "add element inet {TABLE} {set} {{ {} }}",
                fmt_ranges(*family, ranges)
            ),
            Change::AddRule(r) => write!(f, "add rule inet {TABLE} {CHAIN} {}", r.nft()),
            Change::RemoveDefaultRule(r) => {
                let fam = match r.table_family {
                    Family::V4 => "ip",
                    Family::V6 => "ip6",
                };
                write!(
                    f,
                    "delete rule {fam} {} {} handle {} # default rule: {}",
                    r.table,
                    r.chain,
                    r.handle,
                    r.describe()
                )
            }
        }
    }
}

/// Ranges only in `have` (to delete) and only in `want` (to add), comparing whole ranges.
/// Linear when both are sorted (as kernel dumps and policies are); sorts copies otherwise.
pub fn diff_sorted(have: &[Range], want: &[Range]) -> (Vec<Range>, Vec<Range>) {
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

/// Computes the changes that make the kernel match the policy. Empty when in sync.
pub fn plan(p: &Policy, o: &Observed) -> Vec<Change> {
    let mut out = Vec::new();
    if p.v4.is_none() && p.v6.is_none() {
        // Nothing of the policy lives in nftables: masqd's table goes, default rules still do.
        if o.table.is_some() {
            out.push(Change::DeleteTable);
        }
        for r in default_rules_to_remove(p, &o.foreign) {
            out.push(Change::RemoveDefaultRule(r.clone()));
        }
        return out;
    }
    let want_sets = desired_sets(p);
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

    // 2. Decide whether the rules of the base chain must be rebuilt.
    let mut rebuild = match &table.chain {
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
    };
    // A set of the wrong shape is recreated, which needs the rules referencing it gone.
    let mut recreate: BTreeSet<String> = BTreeSet::new();
    let mut stale: Vec<String> = Vec::new();
    for (name, s) in &table.sets {
        match want_sets.get(name) {
            None => stale.push(name.clone()),
            Some((fam, _)) => {
                if s.family != Some(*fam) || !s.interval || s.ranges.is_none() {
                    recreate.insert(name.clone());
                }
            }
        }
    }
    if !stale.is_empty() || !recreate.is_empty() {
        rebuild = true;
    }

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
    for c in &table.other_chains {
        out.push(Change::DeleteChain(c.clone()));
    }

    // 3. Sets.
    for name in stale.iter().chain(recreate.iter()) {
        out.push(Change::DeleteSet(name.clone()));
    }
    let mut adds = Vec::new();
    for (name, (fam, ranges)) in &want_sets {
        let observed = table.sets.get(name).filter(|_| !recreate.contains(name));
        match observed {
            None => {
                out.push(Change::AddSet {
                    name: name.clone(),
                    family: *fam,
                });
                if !ranges.is_empty() {
                    adds.push(Change::AddElements {
                        set: name.clone(),
                        family: *fam,
                        ranges: ranges.clone(),
                    });
                }
            }
            Some(s) => match &s.ranges {
                None => {} // unreadable sets are in `recreate`, so never observed here
                Some(have) => {
                    let (del, add) = diff_sorted(have, ranges);
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
            },
        }
    }
    out.extend(adds);

    // 4. Rules.
    if rebuild {
        out.extend(want_rules.into_iter().map(Change::AddRule));
    }

    // 5. The broad default rules.
    for r in default_rules_to_remove(p, &o.foreign) {
        out.push(Change::RemoveDefaultRule(r.clone()));
    }

    out
}
