//! Backend detection per address family (design.md §4): the facts ([`facts`], gathered
//! through the drivers), then the pure decision with a reason (this file).
//!
//! Probing has no side effects: the loaded legacy tables are read from
//! `/proc/net/ip{,6}_tables_names`; a legacy binary runs only when that lists tables, and then
//! `iptables-legacy-save` without `-t` (which would create the table); nftables is read over
//! netlink. Every binary call is bounded, and an exit-0 output that reports an error is a
//! failure, not "zero rules".

use std::collections::BTreeMap;

use serde::Serialize;

use crate::backend::legacy;
use crate::config::BackendMode;
use crate::policy::Family;

/// Chains whose presence tells which backend the node's Kubernetes components use.
pub const HINT_CHAINS: [&str; 2] = ["KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY"];

pub use crate::backend::Backend;
pub use facts::{apply_legacy_save, gather, gather_from, legacy_facts, system_default};
#[cfg(test)]
use facts::{binary_list, variant_of_name, variant_of_version};

mod facts;

/// What was found for one family.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Facts {
    /// Binaries looked up on $PATH → their path (None when absent).
    pub binaries: BTreeMap<String, Option<String>>,
    /// Legacy tables loaded in this network namespace.
    pub legacy_tables: Vec<String>,
    /// Whether the legacy tables were read (a save ran).
    pub legacy_inspected: bool,
    /// Real legacy rules (`-A` lines) over all loaded tables.
    pub legacy_rules: usize,
    /// Hint chains in legacy xtables (`table/chain`).
    pub legacy_hint_chains: Vec<String>,
    /// Whether masqd's own chain exists in legacy xtables.
    pub legacy_masqd: bool,
    /// Why the legacy tables could not be inspected, if they could not.
    pub legacy_error: Option<String>,
    /// nftables rules of this family (ip/ip6 tables, and inet tables other than masqd's).
    pub nft_rules: usize,
    /// Hint chains in nftables (`family table/chain`).
    pub nft_hint_chains: Vec<String>,
    /// Whether masqd's own policy for this family exists in nftables (its masquerade rule;
    /// the guard that legacy mode keeps in nftables does not count).
    pub nft_masqd: bool,
    /// Whether the kernel refuses nf_tables requests (then legacy mode has no guard).
    pub nft_unavailable: bool,
    /// The node's own `iptables` / `ip6tables` on PATH, resolved through its symlinks.
    pub system_iptables: Option<String>,
    /// The variant it runs (`legacy` or `nft`), when it could be told.
    pub system_default: Option<Backend>,
}

impl Facts {
    pub(crate) fn has(&self, name: &str) -> bool {
        self.binaries.get(name).is_some_and(Option::is_some)
    }
}

/// The decision for one family.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// The backend.
    pub backend: Backend,
    /// Why, in words.
    pub reason: String,
}

/// Decides the backend of both families (design.md §4), or says why one cannot be decided.
/// `facts[0]` is IPv4's, `facts[1]` IPv6's. A family without evidence of its own follows the
/// other family's evidence (kubernetes-sigs/iptables-wrappers decides once for both); with no
/// evidence anywhere, the variant the node's own `iptables` runs decides, nftables when there
/// is none.
pub fn decide_both(mode: BackendMode, facts: [&Facts; 2]) -> [Result<Decision, String>; 2] {
    let own = [
        evidence(mode, Family::V4, facts[0]),
        evidence(mode, Family::V6, facts[1]),
    ];
    let pick = |i: usize| -> Result<Decision, String> {
        let f = Family::ALL[i];
        let (other_f, other) = (Family::ALL[1 - i], &own[1 - i]);
        match &own[i] {
            Err(e) => Err(e.clone()),
            Ok(Some(d)) => Ok(d.clone()),
            Ok(None) => {
                let (b, why) = default_of(f, facts[i]);
                let own_default = usable(f, facts[i], b, why);
                match other {
                    Ok(Some(d)) => usable(
                        f,
                        facts[i],
                        d.backend,
                        format!("no evidence for {f}; follows {other_f}: {}", d.reason),
                    )
                    .or_else(|e| {
                        // It cannot follow (no legacy binaries for this family): its own default.
                        own_default.map(|mut o| {
                            o.reason = format!("{}; not following {other_f} ({e})", o.reason);
                            o
                        })
                    }),
                    _ => own_default,
                }
            }
        }
    };
    [pick(0), pick(1)]
}

/// Decides one family as if the other had no evidence (tests, and callers with one family).
pub fn decide(mode: BackendMode, f: Family, facts: &Facts) -> Result<Decision, String> {
    let none = Facts::default();
    let both = match f {
        Family::V4 => [facts, &none],
        Family::V6 => [&none, facts],
    };
    let [v4, v6] = decide_both(mode, both);
    match f {
        Family::V4 => v4,
        Family::V6 => v6,
    }
}

/// Step 6: the system default, with its reason.
fn default_of(f: Family, facts: &Facts) -> (Backend, String) {
    let none = if facts.legacy_tables.is_empty() {
        "no rules anywhere".to_string()
    } else {
        format!(
            "legacy tables loaded ({}) but hold no rules, nor does nftables",
            facts.legacy_tables.join(", ")
        )
    };
    let cmd = match f {
        Family::V4 => "iptables",
        Family::V6 => "ip6tables",
    };
    match (&facts.system_iptables, facts.system_default) {
        (Some(p), Some(b)) => (
            b,
            format!("{none}: the system default, {cmd} on PATH is the {b} variant ({p})"),
        ),
        (Some(p), None) => (
            Backend::Nft,
            format!("{none}: {cmd} on PATH ({p}) is neither variant; nftables"),
        ),
        (None, _) => (
            Backend::Nft,
            format!("{none}: no {cmd} on PATH; nftables, the default"),
        ),
    }
}

/// A decision for `backend`, or an error when it is legacy and the binaries are missing.
fn usable(f: Family, facts: &Facts, backend: Backend, reason: String) -> Result<Decision, String> {
    let (save, restore, _) = legacy::binary_names(f);
    if backend == Backend::Legacy && !(facts.has(save) && facts.has(restore)) {
        return Err(format!(
            "{f}: {reason}, but {restore} is not on PATH to write there; install the \
             iptables package or set backend.mode = \"nft\""
        ));
    }
    Ok(Decision { backend, reason })
}

/// Step 1: the configured mode, when it is not `auto`.
fn forced(mode: BackendMode, f: Family, facts: &Facts) -> Option<Result<Decision, String>> {
    let (save, restore, _) = legacy::binary_names(f);
    let some = |backend, reason: String| Some(Ok(Decision { backend, reason }));
    match mode {
        BackendMode::Nft => some(
            Backend::Nft,
            "backend.mode = \"nft\" in the configuration".into(),
        ),
        BackendMode::Legacy if !(facts.has(save) && facts.has(restore)) => Some(Err(format!(
            "backend.mode = \"legacy\" but {} not found on PATH; install the iptables \
             package (it provides the legacy binaries) or set backend.mode = \"nft\"",
            [save, restore]
                .iter()
                .filter(|b| !facts.has(b))
                .copied()
                .collect::<Vec<_>>()
                .join(" and ")
        ))),
        BackendMode::Legacy => some(
            Backend::Legacy,
            "backend.mode = \"legacy\" in the configuration".into(),
        ),
        BackendMode::Auto => None,
    }
}

/// Steps 1-4 for one family: Some(decision) when the configuration or the family's own
/// facts decide, None when there is no evidence.
fn evidence(mode: BackendMode, f: Family, facts: &Facts) -> Result<Option<Decision>, String> {
    if let Some(d) = forced(mode, f, facts) {
        return d.map(Some);
    }
    let (save, _, _) = legacy::binary_names(f);
    let some = |backend, reason: String| Ok(Some(Decision { backend, reason }));
    if let Some(e) = &facts.legacy_error {
        return Err(format!(
            "{f}: {e}; masqd cannot tell whether this node's rules live in legacy xtables: \
             install the iptables package (it provides {save}), or set backend.mode = \"nft\" \
             or \"legacy\" in the configuration"
        ));
    }
    let legacy = |reason: String| usable(f, facts, Backend::Legacy, reason).map(Some);
    if facts.nft_unavailable {
        return legacy("the kernel answers no nf_tables requests".into());
    }
    match (facts.nft_masqd, facts.legacy_masqd) {
        (true, false) => {
            return some(
                Backend::Nft,
                "masqd's own policy is in nftables (table inet masqd): staying there".into(),
            )
        }
        (false, true) => {
            return legacy(format!(
                "masqd's own policy is in legacy xtables (chain nat {}): staying there",
                legacy::CHAIN
            ))
        }
        _ => {}
    }
    match (
        facts.nft_hint_chains.is_empty(),
        facts.legacy_hint_chains.is_empty(),
    ) {
        (true, false) => {
            return legacy(format!(
                "hint chain {} exists in legacy xtables only",
                facts.legacy_hint_chains.join(", ")
            ))
        }
        (false, true) => {
            return some(
                Backend::Nft,
                format!(
                    "hint chain {} exists in nftables only",
                    facts.nft_hint_chains.join(", ")
                ),
            )
        }
        _ => {}
    }
    match (facts.nft_rules, facts.legacy_rules) {
        (0, 0) => Ok(None),
        (0, l) => legacy(format!("{l} legacy xtables rule(s) and none in nftables")),
        (n, 0) => some(
            Backend::Nft,
            format!("{n} nftables rule(s), no legacy rules"),
        ),
        (n, l) => some(
            Backend::Nft,
            format!("rules in both ({n} nftables, {l} legacy) and no hint chain: nftables"),
        ),
    }
}

#[cfg(test)]
mod tests;
