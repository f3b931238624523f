//! What the legacy nat table of a family holds that matters to masqd: which tables are loaded
//! (`/proc/net/ip*_tables_names`), masqd's chain and jump, and the foreign source NAT rules,
//! read through a [`Runner`] from `iptables-legacy-save -c -t nat`.

use super::runner::{Binaries, Runner, SystemRunner};
use super::save::{parse_save, parse_saved_net, split_saved};
use super::{CHAIN, JUMP};
use crate::exec::ExecError;
use crate::policy::Family;

/// The `/proc` file listing the loaded legacy tables of a family.
pub fn tables_names_path(f: Family) -> &'static str {
    match f {
        Family::V4 => "/proc/net/ip_tables_names",
        Family::V6 => "/proc/net/ip6_tables_names",
    }
}

/// The legacy tables loaded in this network namespace (empty when the module is not loaded).
/// Reading the file has no side effect.
pub fn tables_loaded(f: Family) -> std::io::Result<Vec<String>> {
    match std::fs::read_to_string(tables_names_path(f)) {
        Ok(t) => Ok(t.split_whitespace().map(str::to_string).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// What the legacy nat table of a family holds that matters to masqd.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LegacyObserved {
    /// Whether the legacy nat table is loaded at all.
    pub nat_loaded: bool,
    /// Whether MASQD-POSTROUTING exists.
    pub chain_exists: bool,
    /// Its rules (specs).
    pub chain_rules: Vec<String>,
    /// Their packet counters.
    pub chain_packets: Vec<u64>,
    /// POSTROUTING's rules (specs), in order.
    pub postrouting: Vec<String>,
    /// Every rule of the nat table outside masqd's chain: (chain, spec), in order.
    pub nat_rules: Vec<(String, String)>,
}

impl LegacyObserved {
    /// From the text of `iptables-legacy-save -t nat`.
    pub fn from_save(text: &str) -> LegacyObserved {
        let mut o = LegacyObserved {
            nat_loaded: true,
            ..Default::default()
        };
        if let Some(t) = parse_save(text).into_iter().find(|t| t.name == "nat") {
            o.chain_exists = t.chains.iter().any(|c| c == CHAIN);
            for ((chain, spec), packets) in t.rules.into_iter().zip(t.packets) {
                if chain == CHAIN {
                    o.chain_rules.push(spec);
                    o.chain_packets.push(packets.unwrap_or(0));
                    continue;
                }
                if chain == "POSTROUTING" {
                    o.postrouting.push(spec.clone());
                }
                o.nat_rules.push((chain, spec));
            }
        }
        o
    }

    /// Whether masqd's objects are present.
    pub fn has_masqd(&self) -> bool {
        self.chain_exists || self.postrouting.iter().any(|r| r == JUMP)
    }
}

/// The source NAT rules (`-j MASQUERADE`, `-j SNAT`) of the legacy nat table outside masqd's
/// chain, for [`crate::foreign`]. The handle is the rule's position in its chain, as
/// `iptables-legacy -t nat -L <chain> --line-numbers` numbers it.
pub fn nat_rules(f: Family, o: &LegacyObserved) -> Vec<crate::foreign::NatRule> {
    use crate::foreign::{NatRule, SourceMatch};
    let mut pos: std::collections::BTreeMap<&str, u64> = Default::default();
    let mut out = Vec::new();
    for (chain, spec) in &o.nat_rules {
        let n = pos.entry(chain.as_str()).or_insert(0);
        *n += 1;
        // Options only among bare words: a comment saying "-j SNAT" is no target.
        let words = split_saved(spec);
        let t: Vec<&str> = match &words {
            Some(w) => w
                .iter()
                .map(|w| if w.quoted { "\"\"" } else { w.text.as_str() })
                .collect(),
            None => spec.split_whitespace().collect(),
        };
        let target = t.windows(2).find(|w| w[0] == "-j").map(|w| w[1]);
        if !matches!(target, Some("MASQUERADE") | Some("SNAT")) {
            continue;
        }
        let mut source = SourceMatch::Any;
        for (i, w) in t.iter().enumerate() {
            if *w == "-s" || *w == "--source" {
                let neg = i > 0 && t[i - 1] == "!";
                source = match t.get(i + 1).and_then(|s| parse_saved_net(s)) {
                    Some(net) if neg => SourceMatch::NotNet(net),
                    Some(net) => SourceMatch::Net(net),
                    None => SourceMatch::Unknown,
                };
            } else if w.starts_with("--src-range") || *w == "--match-set" {
                source = SourceMatch::Unknown;
            }
        }
        out.push(NatRule {
            backend: crate::backend::Backend::Legacy,
            family: Some(f),
            table_family: f.nft_keyword().into(),
            table: "nat".into(),
            chain: chain.clone(),
            handle: *n,
            priority: 100, // iptable_nat's NF_IP_PRI_NAT_SRC
            source,
            text: format!("-A {chain} {spec}"),
        });
    }
    out
}
/// Reads the legacy nat table. Equals `iptables-legacy-save -c -t nat`, run only when
/// `/proc/net/ip_tables_names` lists `nat` (so it never creates the table).
pub fn observe(f: Family, bins: &Binaries) -> Result<LegacyObserved, ExecError> {
    observe_with(&SystemRunner::only(f, bins.clone()), f)
}

/// [`observe`] through any [`Runner`]. Equals `iptables-legacy-save -c -t nat`, run only when
/// the runner lists `nat` among the loaded tables (so it never creates the table).
pub fn observe_with(r: &dyn Runner, f: Family) -> Result<LegacyObserved, ExecError> {
    let loaded = r.tables_loaded(f).unwrap_or_default();
    if !loaded.iter().any(|t| t == "nat") {
        return Ok(LegacyObserved::default());
    }
    Ok(LegacyObserved::from_save(&r.save(f)?))
}
