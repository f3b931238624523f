//! The nft backend's model: names and priority of masqd's objects, the rules it installs
//! ([`RuleSpec`], with their nft text), what was observed ([`Observed`]) and the changes a plan
//! is made of ([`Change`], each printed as the nft command it equals).

use std::collections::BTreeMap;
use std::fmt;

use ipnet::IpNet;

use crate::config::HonorMark;
use crate::policy::{Family, Range};

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
    (f.nft_keyword(), f.digit())
}

/// A set as observed in the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedSet {
    /// Family of the key, when the key is ipv4_addr / ipv6_addr.
    pub family: Option<Family>,
    /// Whether the set has `flags interval` (and no other flags masqd does not set).
    pub interval: bool,
    /// Covered ranges, in element order, or None when the elements could not be read back
    /// as intervals (the set is then rebuilt) or were not read (`unread`).
    pub ranges: Option<std::sync::Arc<[Range]>>,
    /// The elements were not read on purpose: the set is so large that rewriting it costs less
    /// than reading it back ([`super::plan::refill`]); the plan replaces its contents.
    pub unread: bool,
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
        let fam = self.table_family.nft_keyword();
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
    /// `flush set inet masqd <set>`: every element goes; in the same transaction as the
    /// `add element` that refills it, so the datapath never sees the set empty.
    FlushSet(String),
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
            Change::FlushSet(s) => write!(f, "flush set inet {TABLE} {s}"),
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
                let fam = r.table_family.nft_keyword();
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
