//! The status counters of masqd's own rules, per family, from a driver's observation: rules
//! are told apart by identity (nftables: the rules' `masqd:…` comment tags; legacy: the rule
//! of masqd's chain), and nat chains see only a connection's first packet, so they count
//! connections.

use std::collections::BTreeMap;

use super::{LegacyObserved, Observed, RuleSpec};
use crate::policy::Family;

/// The verdict a rule of masqd's nftables chain counts, from its tag: the rule is told apart by
/// identity, its tag being the one [`RuleSpec::tag`] gives the guard (`kept`) or the masquerade
/// rule (`masqueraded`, with or without `fully-random`) of a family. The status counters and
/// the metrics both classify by it.
pub fn verdict_of(tag: &str) -> Option<(Family, &'static str)> {
    Family::ALL.into_iter().find_map(|f| {
        let masquerade = [false, true].map(|random_fully| RuleSpec::Masquerade {
            family: f,
            random_fully,
        });
        if RuleSpec::Guard(f).tag() == tag {
            Some((f, "kept"))
        } else if masquerade.iter().any(|r| r.tag() == tag) {
            Some((f, "masqueraded"))
        } else {
            None
        }
    })
}

/// One family's counters in one backend.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Intervals per nftables set (`pod4`, `nomasq4`), rules of the legacy chain
    /// (`legacy-chain`).
    pub sets: BTreeMap<String, usize>,
    /// Connections masqueraded by masqd's masquerade rule.
    pub masqueraded: u64,
    /// Connections to an exception kept with the pod's address (the guard's identity SNAT, or
    /// a legacy RETURN rule).
    pub kept: u64,
}

/// The sets and rule counters of masqd's nftables table for `f` (by the sets' names and the
/// rules' `masqd:…` tags); None without the table. Equals `nft list table inet masqd`.
pub fn nft(o: &Observed, f: Family) -> Option<Counters> {
    let t = o.table.as_ref()?;
    let mut c = Counters::default();
    for name in super::set_names(f) {
        if let Some(s) = t.sets.get(&name) {
            c.sets
                .insert(name, s.ranges.as_ref().map_or(0, |r| r.len()));
        }
    }
    let Some(ch) = &t.chain else { return Some(c) };
    for r in &ch.rules {
        let n = r.packets.unwrap_or(0);
        match r.comment.as_deref().and_then(verdict_of) {
            Some((rf, "masqueraded")) if rf == f => c.masqueraded += n,
            Some((rf, "kept")) if rf == f => c.kept += n,
            _ => {}
        }
    }
    Some(c)
}

/// The rules and counters of masqd's legacy chain; None without the chain. (Where the guard
/// runs, it claims the excepted connections first and the RETURN rules count none.) Equals
/// `iptables-legacy-save -c -t nat`, masqd's chain.
pub fn legacy(lo: &LegacyObserved) -> Option<Counters> {
    if !lo.chain_exists {
        return None;
    }
    let mut c = Counters::default();
    c.sets.insert("legacy-chain".into(), lo.chain_rules.len());
    for (rule, n) in lo.chain_rules.iter().zip(&lo.chain_packets) {
        if rule.ends_with("-j MASQUERADE") || rule.contains("-j MASQUERADE ") {
            c.masqueraded += n;
        } else if rule.contains(" -d ") && rule.ends_with("-j RETURN") {
            c.kept += n;
        }
    }
    Some(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_counters_by_rule() {
        let lo = LegacyObserved {
            chain_exists: true,
            chain_rules: vec![
                "-A MASQD-POSTROUTING -o docker0 -j RETURN".into(),
                "-A MASQD-POSTROUTING -s 172.7.21.0/24 -d 172.7.0.0/16 -j RETURN".into(),
                "-A MASQD-POSTROUTING -s 172.7.21.0/24 -j MASQUERADE".into(),
            ],
            chain_packets: vec![100, 5, 9],
            ..LegacyObserved::default()
        };
        let c = legacy(&lo).expect("chain");
        assert_eq!((c.kept, c.masqueraded), (5, 9));
        assert_eq!(c.sets.get("legacy-chain"), Some(&3));
        assert_eq!(legacy(&LegacyObserved::default()), None);
    }
}
