//! The pure walks of masqd's chains for one query: `inet masqd postrouting` as the kernel holds
//! it (read from the rules' tags, not the configuration), then in legacy mode
//! `MASQD-POSTROUTING`, and the decision of both.

use std::net::IpAddr;

use super::kernel::{
    legacy_jumps, legacy_rule_words, saved_net_holds, LegacyObserved, Lookup, LEGACY_CHAIN,
};
use super::{Kernel, Query, Verdict};
use crate::backend::query::{RuleSpec, CHAIN_PRIORITY};
use crate::backend::{set_names, Backend, CHAIN, TABLE};
use crate::config::HonorMark;
use crate::policy::Family;

/// Where masqd's chain in backend `b` is, as an explanation names it: `inet masqd postrouting`,
/// `legacy nat MASQD-POSTROUTING`.
pub fn chain_name(b: Backend) -> String {
    match b {
        Backend::Nft => format!("inet {TABLE} {CHAIN}"),
        Backend::Legacy => format!("legacy nat {LEGACY_CHAIN}"),
    }
}

/// The backend of a chain named by [`chain_name`]; None for another name.
pub fn chain_backend(chain: &str) -> Option<Backend> {
    [Backend::Nft, Backend::Legacy]
        .into_iter()
        .find(|b| chain_name(*b) == chain)
}

/// The rule a masqd tag stands for, read from the kernel's comment (not the configuration).
pub(super) fn spec_of_tag(tag: &str) -> Option<RuleSpec> {
    let rest = tag.strip_prefix("masqd:")?;
    let fam = |d: &str| match d {
        "4" => Some(Family::V4),
        "6" => Some(Family::V6),
        _ => None,
    };
    if let Some(b) = rest.strip_prefix("bridge:") {
        return Some(RuleSpec::BridgeReturn(b.to_string()));
    }
    if let Some(m) = rest.strip_prefix("mark:") {
        return HonorMark::parse(m).ok().map(RuleSpec::MarkReturn);
    }
    if let Some(d) = rest.strip_prefix("guard:") {
        return fam(d).map(RuleSpec::Guard);
    }
    let m = rest.strip_prefix("masquerade:")?;
    let (d, random_fully) = match m.strip_suffix(":fully-random") {
        Some(d) => (d, true),
        None => (m, false),
    };
    fam(d).map(|family| RuleSpec::Masquerade {
        family,
        random_fully,
    })
}

/// The decision of one chain walk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Decision {
    pub(super) verdict: Verdict,
    pub(super) rule: String,
    pub(super) chain: String,
    pub(super) handle: u64,
    pub(super) reason: String,
    /// Priority of the chain that decided (for the other rules' order).
    pub(super) priority: i32,
    /// For `kept`: the exception range that matched.
    pub(super) range: Option<String>,
}

/// Walks `inet masqd postrouting` as the kernel holds it.
fn walk_nft(q: &Query, k: &Kernel, notes: &mut Vec<String>) -> Option<Decision> {
    let f = q.family();
    let (pod, nomasq) = (
        matches!(k.pod, Lookup::In(_)),
        matches!(k.nomasq, Lookup::In(_)),
    );
    let [ps, ns] = set_names(f);
    let mark = q.mark.unwrap_or(0);
    for r in &k.chain {
        let Some(spec) = r.comment.as_deref().and_then(spec_of_tag) else {
            notes.push(format!(
                "rule handle {} of inet masqd postrouting has no masqd tag; not evaluated",
                r.handle
            ));
            continue;
        };
        let reason = match &spec {
            RuleSpec::BridgeReturn(b) if q.oif.as_deref() == Some(b) => format!(
                "it leaves through the bridge {b}: masqd's chain returns before its guard and binds \
                 nothing"
            ),
            RuleSpec::MarkReturn(m) if mark & m.mask == m.value => format!(
                "the packet mark {mark:#x} matches the honoured mark {m}: masqd leaves the connection \
                 to the component that marked it"
            ),
            RuleSpec::Guard(g) if *g == f && pod && nomasq => format!(
                "{} is in set {ps} and {} in set {ns}: the guard's identity source NAT claims the \
                 connection, so no later NAT chain can masquerade it",
                q.src, q.dst
            ),
            RuleSpec::Masquerade { family, .. } if *family == f && pod => format!(
                "{} is in set {ps} and {} is not in set {ns}: masqd masquerades it",
                q.src, q.dst
            ),
            _ => continue,
        };
        let verdict = match spec {
            RuleSpec::BridgeReturn(_) => Verdict::Untouched,
            RuleSpec::MarkReturn(_) => Verdict::Marked,
            RuleSpec::Guard(_) => Verdict::Kept,
            RuleSpec::Masquerade { .. } => Verdict::Masqueraded,
        };
        let text = spec.nft();
        let rule = text.split(" comment ").next().unwrap_or(&text).to_string();
        return Some(Decision {
            verdict,
            rule,
            chain: chain_name(Backend::Nft),
            handle: r.handle,
            reason,
            priority: CHAIN_PRIORITY,
            range: match (verdict, k.nomasq) {
                (Verdict::Kept, Lookup::In(r)) => Some(r.display(f)),
                _ => None,
            },
        });
    }
    None
}

/// The value after `opt` in an iptables-save rule (`-s 10.0.0.0/8`).
fn opt<'a>(words: &'a [String], opt: &str) -> Option<&'a str> {
    let i = words.iter().position(|w| w == opt)?;
    (i == 0 || words[i - 1] != "!")
        .then(|| words.get(i + 1).map(String::as_str))
        .flatten()
}

/// Walks `MASQD-POSTROUTING` in the legacy nat table (when POSTROUTING jumps to it).
fn walk_legacy(q: &Query, lo: &LegacyObserved) -> Option<Decision> {
    if !legacy_jumps(lo) {
        return None;
    }
    let holds = |w: &[String], o: &str, a: IpAddr| match opt(w, o) {
        None => true,
        Some(s) => saved_net_holds(s, a),
    };
    for (i, spec) in lo.chain_rules.iter().enumerate() {
        let Some(words) = legacy_rule_words(spec) else {
            continue;
        };
        if !holds(&words, "-s", q.src) || !holds(&words, "-d", q.dst) {
            continue;
        }
        if let Some(o) = opt(&words, "-o") {
            if q.oif.as_deref() != Some(o) {
                continue;
            }
        }
        let (verdict, reason) = match opt(&words, "-j") {
            Some("RETURN") if opt(&words, "-o").is_some() => (
                Verdict::Untouched,
                "it leaves through a bridge: MASQD-POSTROUTING returns".to_string(),
            ),
            Some("RETURN") => (
                Verdict::Kept,
                "MASQD-POSTROUTING returns for the exception; without the guard a later NAT \
                 chain may still masquerade it"
                    .to_string(),
            ),
            Some("MASQUERADE") => (
                Verdict::Masqueraded,
                format!(
                    "{} is a pod source leaving the cluster: MASQD-POSTROUTING masquerades it",
                    q.src
                ),
            ),
            _ => continue,
        };
        return Some(Decision {
            verdict,
            rule: format!("-A {} {spec}", LEGACY_CHAIN),
            chain: chain_name(Backend::Legacy),
            handle: i as u64 + 1,
            reason,
            priority: 100,
            range: (verdict == Verdict::Kept)
                .then(|| opt(&words, "-d").map(str::to_string))
                .flatten(),
        });
    }
    None
}

/// The decision of masqd's rules for `q`: the nftables chain first (priority `srcnat - 1`),
/// then in legacy mode `MASQD-POSTROUTING` (a marked packet the guard leaves alone is still
/// masqueraded there when it leaves the cluster).
pub(super) fn decide(q: &Query, k: &Kernel, notes: &mut Vec<String>) -> Option<Decision> {
    let nft_d = (k.nft && k.table).then(|| walk_nft(q, k, notes)).flatten();
    let legacy_d = match (k.backend, &k.legacy) {
        (Backend::Legacy, Some(lo)) => walk_legacy(q, lo),
        _ => None,
    };
    match (nft_d, legacy_d) {
        (Some(d), Some(l)) if d.verdict == Verdict::Marked && l.verdict == Verdict::Masqueraded => {
            Some(Decision {
                reason: format!("{}; then {}", d.reason, l.reason),
                ..l
            })
        }
        (Some(d), _) => Some(d),
        (None, l) => l,
    }
}
