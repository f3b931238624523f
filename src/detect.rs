//! Backend detection per address family (design.md §4): facts, then a decision with a reason.
//!
//! Probing has no side effects: the loaded legacy tables are read from
//! `/proc/net/ip{,6}_tables_names`; a legacy binary runs only when that lists tables, and then
//! `iptables-legacy-save` without `-t` (which would create the table); nftables is read over
//! netlink. Every binary call is bounded, and an exit-0 output that reports an error is a
//! failure, not "zero rules".

use std::collections::BTreeMap;

use anyhow::Result;
use serde::Serialize;

use crate::backend::legacy;
use crate::backend::nft::{self, netlink::Socket};
use crate::config::BackendMode;
use crate::exec;
use crate::policy::Family;

/// Chains whose presence tells which backend the node's Kubernetes components use.
pub const HINT_CHAINS: [&str; 2] = ["KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY"];

/// A backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Native nftables.
    Nft,
    /// Legacy xtables.
    Legacy,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        })
    }
}

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
    /// Whether masqd's own objects for this family exist in nftables.
    pub nft_masqd: bool,
}

impl Facts {
    fn has(&self, name: &str) -> bool {
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

fn binary_list(f: Family) -> [&'static str; 6] {
    match f {
        Family::V4 => [
            "iptables-legacy",
            "iptables-legacy-save",
            "iptables-legacy-restore",
            "iptables-nft",
            "iptables-nft-save",
            "iptables-nft-restore",
        ],
        Family::V6 => [
            "ip6tables-legacy",
            "ip6tables-legacy-save",
            "ip6tables-legacy-restore",
            "ip6tables-nft",
            "ip6tables-nft-save",
            "ip6tables-nft-restore",
        ],
    }
}

/// The legacy part of the facts, from the loaded-table list and (when tables are loaded) the
/// output of `iptables-legacy-save` without `-t`.
pub fn legacy_facts(f: Family, facts: &mut Facts) {
    for b in binary_list(f) {
        facts.binaries.insert(
            b.to_string(),
            exec::find_binary(b).map(|p| p.display().to_string()),
        );
    }
    facts.legacy_tables = match legacy::tables_loaded(f) {
        Ok(t) => t,
        Err(e) => {
            facts.legacy_error = Some(format!("reading {}: {e}", legacy::tables_names_path(f)));
            return;
        }
    };
    if facts.legacy_tables.is_empty() {
        return;
    }
    let (save, _, _) = legacy::binary_names(f);
    let Some(path) = exec::find_binary(save) else {
        facts.legacy_error = Some(format!(
            "legacy tables are loaded ({}) but {save} is not on PATH to inspect them",
            facts.legacy_tables.join(", ")
        ));
        return;
    };
    match exec::run(&path, &[], None, exec::DEFAULT_TIMEOUT) {
        Ok(out) => {
            facts.legacy_inspected = true;
            apply_legacy_save(&out.stdout, facts);
        }
        Err(e) => facts.legacy_error = Some(e.to_string()),
    }
}

/// Counts rules, hint chains and masqd's chain in iptables-save output.
pub fn apply_legacy_save(text: &str, facts: &mut Facts) {
    for t in legacy::parse_save(text) {
        facts.legacy_rules += t.rules.len();
        for c in &t.chains {
            if HINT_CHAINS.contains(&c.as_str()) {
                facts.legacy_hint_chains.push(format!("{}/{c}", t.name));
            }
            if t.name == "nat" && c == legacy::CHAIN {
                facts.legacy_masqd = true;
            }
        }
    }
}

/// Gathers the facts of one family.
pub fn gather(f: Family, sock: &mut Socket) -> Result<Facts> {
    let mut facts = Facts::default();
    legacy_facts(f, &mut facts);
    let n = nft::facts(sock, f)?;
    facts.nft_rules = n.rules;
    facts.nft_hint_chains = n
        .chains
        .into_iter()
        .filter(|(_, _, c)| HINT_CHAINS.contains(&c.as_str()))
        .map(|(fam, t, c)| format!("{fam} {t}/{c}"))
        .collect();
    facts.nft_masqd = n.masqd;
    Ok(facts)
}

/// Decides the backend of a family (design.md §4), or says why it cannot.
pub fn decide(mode: BackendMode, f: Family, facts: &Facts) -> Result<Decision, String> {
    let (save, restore, _) = legacy::binary_names(f);
    let legacy_usable = facts.has(save) && facts.has(restore);
    let d = |backend, reason: String| Ok(Decision { backend, reason });
    match mode {
        BackendMode::Nft => {
            return d(
                Backend::Nft,
                "backend.mode = \"nft\" in the configuration".into(),
            )
        }
        BackendMode::Legacy => {
            if !legacy_usable {
                return Err(format!(
                    "backend.mode = \"legacy\" but {} not found on PATH; install the iptables \
                     package (it provides the legacy binaries) or set backend.mode = \"nft\"",
                    [save, restore]
                        .iter()
                        .filter(|b| !facts.has(b))
                        .copied()
                        .collect::<Vec<_>>()
                        .join(" and ")
                ));
            }
            return d(
                Backend::Legacy,
                "backend.mode = \"legacy\" in the configuration".into(),
            );
        }
        BackendMode::Auto => {}
    }
    if let Some(e) = &facts.legacy_error {
        return Err(format!(
            "{f}: {e}; masqd cannot tell whether this node's rules live in legacy xtables: \
             install the iptables package (it provides {save}), or set backend.mode = \"nft\" \
             or \"legacy\" in the configuration"
        ));
    }
    let legacy = |reason: String| {
        if legacy_usable {
            d(Backend::Legacy, reason)
        } else {
            Err(format!(
                "{f}: {reason}, but {restore} is not on PATH to write there; install the \
                 iptables package or set backend.mode = \"nft\""
            ))
        }
    };
    match (facts.nft_masqd, facts.legacy_masqd) {
        (true, false) => {
            return d(
                Backend::Nft,
                "masqd's own objects are in nftables (table inet masqd): staying there".into(),
            )
        }
        (false, true) => {
            return legacy(format!(
                "masqd's own objects are in legacy xtables (chain nat {}): staying there",
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
            return d(
                Backend::Nft,
                format!(
                    "hint chain {} exists in nftables only",
                    facts.nft_hint_chains.join(", ")
                ),
            )
        }
        _ => {}
    }
    if facts.legacy_rules > 0 && facts.nft_rules == 0 {
        return legacy(format!(
            "{} legacy xtables rule(s) and none in nftables",
            facts.legacy_rules
        ));
    }
    let reason = if facts.legacy_rules == 0 && facts.nft_rules == 0 {
        if facts.legacy_tables.is_empty() {
            "no rules anywhere: nftables, the default".to_string()
        } else {
            format!(
                "legacy tables loaded ({}) but hold no rules, nor does nftables: nftables, the default",
                facts.legacy_tables.join(", ")
            )
        }
    } else if facts.legacy_rules == 0 {
        format!("{} nftables rule(s), no legacy rules", facts.nft_rules)
    } else {
        format!(
            "rules in both ({} nftables, {} legacy) and no hint chain: nftables, the default",
            facts.nft_rules, facts.legacy_rules
        )
    };
    d(Backend::Nft, reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(bins: bool) -> Facts {
        let mut f = Facts::default();
        for b in binary_list(Family::V4) {
            f.binaries
                .insert(b.into(), bins.then(|| format!("/usr/sbin/{b}")));
        }
        f
    }

    fn auto(f: &Facts) -> Backend {
        decide(BackendMode::Auto, Family::V4, f).unwrap().backend
    }

    #[test]
    fn nothing_anywhere_is_nft() {
        assert_eq!(auto(&facts(true)), Backend::Nft);
        assert_eq!(auto(&facts(false)), Backend::Nft);
    }

    #[test]
    fn nft_rules_only_is_nft() {
        let mut f = facts(true);
        f.nft_rules = 12;
        assert_eq!(auto(&f), Backend::Nft);
    }

    #[test]
    fn real_legacy_rules_only_is_legacy() {
        let mut f = facts(true);
        f.legacy_tables = vec!["nat".into()];
        apply_legacy_save("*nat\n:POSTROUTING ACCEPT [0:0]\n-A POSTROUTING -s 10.0.0.0/24 -j MASQUERADE\nCOMMIT\n", &mut f);
        assert_eq!(f.legacy_rules, 1);
        let d = decide(BackendMode::Auto, Family::V4, &f).unwrap();
        assert_eq!(d.backend, Backend::Legacy);
        assert!(d.reason.contains("1 legacy"), "{}", d.reason);
    }

    #[test]
    fn empty_legacy_tables_are_not_rules() {
        let mut f = facts(true);
        f.legacy_tables = vec!["nat".into(), "filter".into()];
        apply_legacy_save(
            "*nat\n:PREROUTING ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n",
            &mut f,
        );
        assert_eq!(f.legacy_rules, 0);
        assert_eq!(auto(&f), Backend::Nft);
    }

    #[test]
    fn hint_chain_wins_over_rule_counts() {
        let mut f = facts(true);
        f.legacy_tables = vec!["mangle".into()];
        apply_legacy_save("*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n", &mut f);
        f.nft_rules = 500;
        assert_eq!(auto(&f), Backend::Legacy);
        // The mirror case.
        let mut g = facts(true);
        g.legacy_rules = 40;
        g.legacy_tables = vec!["filter".into()];
        g.nft_hint_chains = vec!["ip mangle/KUBE-IPTABLES-HINT".into()];
        assert_eq!(auto(&g), Backend::Nft);
    }

    #[test]
    fn hint_name_must_be_the_whole_chain_name() {
        let mut f = facts(true);
        f.legacy_tables = vec!["mangle".into()];
        apply_legacy_save(
            "*mangle\n:KUBE-IPTABLES-HINT-OLD - [0:0]\n:X - [0:0]\n-A X -m comment --comment KUBE-IPTABLES-HINT -j RETURN\nCOMMIT\n",
            &mut f,
        );
        assert!(f.legacy_hint_chains.is_empty());
        f.nft_rules = 3;
        assert_eq!(auto(&f), Backend::Nft);
    }

    #[test]
    fn own_objects_keep_their_backend() {
        let mut f = facts(true);
        f.legacy_tables = vec!["nat".into()];
        apply_legacy_save(
            &format!("*nat\n:{} - [0:0]\nCOMMIT\n", legacy::CHAIN),
            &mut f,
        );
        f.nft_rules = 10;
        assert_eq!(auto(&f), Backend::Legacy);
        let mut g = facts(true);
        g.nft_masqd = true;
        g.legacy_rules = 10;
        assert_eq!(auto(&g), Backend::Nft);
    }

    #[test]
    fn uninspectable_legacy_is_an_error() {
        let mut f = facts(false);
        f.legacy_tables = vec!["nat".into()];
        f.legacy_error =
            Some("legacy tables are loaded (nat) but iptables-legacy-save is not on PATH".into());
        let e = decide(BackendMode::Auto, Family::V4, &f).unwrap_err();
        assert!(
            e.contains("install the iptables package") && e.contains("backend.mode"),
            "{e}"
        );
        // A forced nft mode does not need to look.
        assert_eq!(
            decide(BackendMode::Nft, Family::V4, &f).unwrap().backend,
            Backend::Nft
        );
    }

    #[test]
    fn families_decide_independently() {
        let mut v4 = facts(true);
        v4.legacy_rules = 3;
        let v6 = facts(true);
        assert_eq!(auto(&v4), Backend::Legacy);
        assert_eq!(
            decide(BackendMode::Auto, Family::V6, &v6).unwrap().backend,
            Backend::Nft
        );
    }

    #[test]
    fn forced_modes() {
        assert_eq!(
            decide(BackendMode::Legacy, Family::V4, &facts(true))
                .unwrap()
                .backend,
            Backend::Legacy
        );
        let e = decide(BackendMode::Legacy, Family::V4, &facts(false)).unwrap_err();
        assert!(
            e.contains("iptables-legacy-save and iptables-legacy-restore not found"),
            "{e}"
        );
        assert_eq!(
            decide(BackendMode::Nft, Family::V4, &facts(false))
                .unwrap()
                .backend,
            Backend::Nft
        );
    }
}
