//! The verdict of `masqd explain` from kernel facts, pure: the decision of masqd's chains, the
//! configuration entries behind a kept range, where configuration and kernel disagree, and the
//! other components' NAT rules that would have matched.

use std::net::IpAddr;

use super::kernel::{legacy_drift, Lookup};
use super::walk::{decide, Decision};
use super::{int, Explanation, Kernel, OtherRule, Query, Source, Verdict};
use crate::backend::query::RuleSpec;
use crate::backend::{set_names, Backend, CHAIN, TABLE};
use crate::config::{self, Config};
use crate::foreign::{NatRule, SourceMatch};
use crate::policy::{Family, Policy, Range};

/// The configuration entries of `origins` holding `addr`, most specific first.
fn sources_of(origins: &[config::Origin], addr: IpAddr) -> Vec<Source> {
    let mut v: Vec<&config::Origin> = origins.iter().filter(|o| o.net().contains(&addr)).collect();
    v.sort_by_key(|o| std::cmp::Reverse(o.net().prefix_len()));
    v.into_iter()
        .map(|o| Source {
            cidr: o.net().to_string(),
            source: o.location(),
            key: o.key().to_string(),
        })
        .collect()
}

/// The configuration's range of `ranges` holding `addr`.
pub(super) fn config_range(ranges: &[Range], addr: u128) -> Option<Range> {
    let i = ranges.partition_point(|r| r.end < addr);
    ranges.get(i).filter(|r| r.start <= addr).copied()
}

/// Compares one set lookup with the configuration's answer for the same address.
fn compare_set(
    set: &str,
    f: Family,
    addr: IpAddr,
    want: Option<Range>,
    got: Lookup,
) -> Option<String> {
    let show = |r: Option<Range>| match r {
        Some(r) => format!("holds {addr} in {}", r.display(f)),
        None => format!("does not hold {addr}"),
    };
    let got = match got {
        Lookup::NoSet => {
            return Some(format!(
                "the kernel has no set {set} (the configuration {}): run `masqd apply`; the \
                 verdict follows the kernel",
                show(want)
            ))
        }
        Lookup::In(r) => Some(r),
        Lookup::NotIn => None,
    };
    (got != want).then(|| {
        format!(
            "the configuration {}, but the kernel's set {set} {}: the verdict follows the kernel \
             (`masqd apply` would repair it)",
            show(want),
            show(got)
        )
    })
}

/// Where configuration and kernel disagree about this connection.
fn disagreements(q: &Query, policy: &Policy, desired: &[RuleSpec], k: &Kernel) -> Vec<String> {
    let f = q.family();
    let mut out = Vec::new();
    if k.nft && !k.table {
        out.push(format!(
            "masqd's table inet {} is not in the kernel: run `masqd apply`; the verdict follows \
             the kernel",
            TABLE
        ));
    }
    let fp = policy.family(f);
    if k.nft && k.table {
        let [pod_set, nomasq_set] = set_names(f);
        let want = fp.and_then(|p| config_range(&p.pod, int(q.src)));
        out.extend(compare_set(&pod_set, f, q.src, want, k.pod));
        let want = fp.and_then(|p| config_range(&p.nomasq, int(q.dst)));
        out.extend(compare_set(&nomasq_set, f, q.dst, want, k.nomasq));
        let have: Vec<&str> = k
            .chain
            .iter()
            .filter_map(|r| r.comment.as_deref())
            .collect();
        let want: Vec<String> = desired.iter().map(RuleSpec::tag).collect();
        if have != want {
            out.push(format!(
                "the rules of inet {} {} are [{}], the configuration wants [{}]: the verdict \
                 follows the kernel",
                TABLE,
                CHAIN,
                have.join(", "),
                want.join(", ")
            ));
        }
    }
    if let (Backend::Legacy, Some(lo), Some(fp)) = (k.backend, &k.legacy, fp) {
        if let Some((chain, have, want)) = legacy_drift(lo, fp, policy) {
            out.push(format!(
                "the legacy chain {chain} holds {have} rule(s) that differ from the {want} the \
                 configuration wants: the verdict follows the kernel"
            ));
        }
    }
    out
}

/// Whether another component's rule `r` would match the source of `q`: `yes`, `maybe`, or None.
fn source_matches(r: &NatRule, q: &Query) -> Option<&'static str> {
    if r.family.is_some_and(|rf| rf != q.family()) {
        return None;
    }
    // The one other match worth reading: a rule that excludes the given output interface
    // (`oifname != "docker0"`, `! -o docker0`) cannot match.
    if let Some(o) = &q.oif {
        if r.text.contains(&format!("oifname != \"{o}\"")) || r.text.contains(&format!("! -o {o} "))
        {
            return None;
        }
    }
    match &r.source {
        SourceMatch::Any => Some("yes"),
        SourceMatch::Unknown => Some("maybe"),
        SourceMatch::Net(n) => n.contains(&q.src).then_some("yes"),
        SourceMatch::NotNet(n) => (!n.contains(&q.src)).then_some("yes"),
    }
}

/// The other rules that would have matched and what masqd's decision does to them.
fn other_rules(q: &Query, k: &Kernel, d: Option<&Decision>) -> Vec<OtherRule> {
    let mut out = Vec::new();
    for r in &k.foreign {
        let Some(matches) = source_matches(r, q) else {
            continue;
        };
        let (overridden, reason) = match d {
            Some(d) if matches!(d.verdict, Verdict::Kept | Verdict::Masqueraded) => {
                let what = if d.verdict == Verdict::Kept {
                    "the guard's identity source NAT"
                } else {
                    "masqd's masquerade"
                };
                if r.priority > d.priority {
                    (
                        true,
                        format!(
                            "overridden: it runs at priority {}, after masqd's {} (priority {}), \
                             where {what} has already bound the connection",
                            r.priority, d.chain, d.priority
                        ),
                    )
                } else {
                    (
                        false,
                        format!(
                            "NOT overridden: it runs at priority {}, not after masqd's {} \
                             (priority {}), so it can NAT the connection first",
                            r.priority, d.chain, d.priority
                        ),
                    )
                }
            }
            _ => (
                false,
                "applies: masqd binds nothing for this connection, so this rule decides"
                    .to_string(),
            ),
        };
        out.push(OtherRule {
            backend: r.backend.to_string(),
            table: if r.backend == Backend::Nft {
                format!("{} {}", r.table_family, r.table)
            } else {
                r.table.clone()
            },
            chain: r.chain.clone(),
            handle: r.handle,
            priority: r.priority,
            rule: r.text.clone(),
            matches: matches.to_string(),
            overridden,
            reason,
        });
    }
    out
}

/// Explains `q` from the kernel facts `k`, with the configuration `cfg`, its `policy` and the
/// rules `desired` it wants in masqd's nftables chain (for the disagreements). Pure.
pub fn evaluate(
    q: &Query,
    cfg: &Config,
    policy: &Policy,
    desired: &[RuleSpec],
    k: &Kernel,
) -> Explanation {
    let f = q.family();
    let mut notes = Vec::new();
    if q.oif.is_none() && !policy.bridges.is_empty() {
        notes.push(format!(
            "no --oif: assumed it does not leave through a bridge ({})",
            policy.bridges.join(", ")
        ));
    }
    if q.mark.is_none() && !policy.honor_marks.is_empty() {
        notes.push("no --mark: assumed the packet is not marked".to_string());
    }
    if !k.nft {
        notes.push("the kernel answers no nf_tables requests: masqd has no guard".to_string());
    }
    let d = decide(q, k, &mut notes);
    let mut disagree = disagreements(q, policy, desired, k);
    let kept = d.as_ref().is_some_and(|d| d.verdict == Verdict::Kept);
    let sources = if kept {
        sources_of(&cfg.exception_origins, q.dst)
    } else {
        Vec::new()
    };
    if kept && sources.is_empty() {
        disagree.push(format!(
            "the kernel keeps {} but no configuration entry holds it: the verdict follows the \
             kernel",
            q.dst
        ));
    }
    let other_rules = other_rules(q, k, d.as_ref());
    let none_reason = if matches!(k.pod, Lookup::In(_)) {
        format!("no rule of masqd's matches {} → {}", q.src, q.dst)
    } else {
        format!(
            "{} is not a pod source of this node (not in set {} in the kernel): masqd binds \
             nothing",
            q.src,
            set_names(f)[0]
        )
    };
    Explanation {
        verdict: d.as_ref().map_or(Verdict::Untouched, |d| d.verdict),
        backend: k.backend.to_string(),
        ip_family: f.to_string(),
        src: q.src.to_string(),
        dst: q.dst.to_string(),
        oif: q.oif.clone(),
        mark: q.mark.map(|m| format!("{m:#x}")),
        rule: d.as_ref().map(|d| d.rule.clone()),
        chain: d.as_ref().map(|d| d.chain.clone()),
        handle: d.as_ref().map(|d| d.handle),
        range: d.as_ref().and_then(|d| d.range.clone()),
        source: sources.first().map(|s| s.source.clone()),
        sources,
        reason: d.map_or(none_reason, |d| d.reason),
        notes,
        disagreements: disagree,
        based_on: "kernel".to_string(),
        other_rules,
    }
}
