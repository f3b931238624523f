//! Other components' NAT rules that can apply to this node's pod traffic, and what masqd's
//! guard does about them (design.md §3.1, §5). Pure: the backends decode the kernel's rules
//! into [`NatRule`]s, this module decides which of them matter and says why.
//!
//! masqd never modifies tables it does not own (Docker's `docker-bridges`, flannel's,
//! firewalld's, kube-proxy's). A masquerade there still runs for pod traffic, but after the
//! guard: the guard's identity source NAT claims every excepted connection first, so such a
//! rule is *overridden* for the exception set and keeps masquerading the rest.

use ipnet::IpNet;
use serde::Serialize;

use crate::policy::{Family, Policy};

/// What a NAT rule matches on the source address, as far as masqd can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceMatch {
    /// No source match: any source.
    Any,
    /// `ip saddr <net>`.
    Net(IpNet),
    /// `ip saddr != <net>`.
    NotNet(IpNet),
    /// A match masqd does not decode (a set lookup, a range): it may apply.
    Unknown,
}

/// A source NAT rule (masquerade or snat) found in a table masqd does not own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatRule {
    /// Where the rule lives.
    pub backend: crate::backend::Backend,
    /// Address family the rule applies to; None for an inet rule without a family match.
    pub family: Option<Family>,
    /// Family of its table as nft names it (`ip`, `ip6`, `inet`).
    pub table_family: String,
    /// Table.
    pub table: String,
    /// Chain.
    pub chain: String,
    /// nft handle, or the 1-based position in the legacy chain.
    pub handle: u64,
    /// Priority of the postrouting NAT chain it runs in (for a regular chain: the earliest
    /// such base chain of its table; legacy xtables: 100).
    pub priority: i32,
    /// The source match.
    pub source: SourceMatch,
    /// The rule in nft-like (or iptables-save) text.
    pub text: String,
}

/// A foreign NAT rule that can apply to the node's pod traffic, with what masqd does about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Overridden {
    /// Where the rule lives (`nft` or `legacy` in JSON).
    pub backend: crate::backend::Backend,
    /// `ipv4` or `ipv6`.
    pub ip_family: String,
    /// Table (with its nft family, e.g. `ip docker-bridges`; legacy: `nat`).
    pub table: String,
    /// Chain.
    pub chain: String,
    /// nft handle, or the position in the legacy chain.
    pub handle: u64,
    /// The rule.
    pub rule: String,
    /// One line: why it does not decide the source of excepted pod traffic (or why it does).
    pub reason: String,
}

/// Whether `rule` can apply to traffic from one of `pods`.
fn applies(source: &SourceMatch, pods: &[IpNet]) -> bool {
    match source {
        SourceMatch::Any | SourceMatch::Unknown => true,
        SourceMatch::Net(n) => pods.iter().any(|p| n.contains(p) || p.contains(n)),
        SourceMatch::NotNet(n) => pods.iter().any(|p| !n.contains(p)),
    }
}

/// The foreign NAT rules that can apply to the pod traffic of `policy`'s families, each with
/// its reason. `guarded(f)` says whether masqd keeps the guard of family `f` in the kernel;
/// `removing(rule)` whether masqd removes the rule as the broad default rule.
pub fn overridden(
    policy: &Policy,
    rules: &[NatRule],
    guarded: impl Fn(Family) -> bool,
    removing: impl Fn(&NatRule) -> bool,
) -> Vec<Overridden> {
    let mut out = Vec::new();
    for r in rules {
        for f in Family::ALL {
            if r.family.is_some_and(|rf| rf != f) {
                continue;
            }
            let Some(fp) = policy.family(f) else { continue };
            if !applies(&r.source, &fp.pod_cidrs) {
                continue;
            }
            let reason = if r.priority <= crate::backend::CHAIN_PRIORITY {
                format!(
                    "NOT overridden: it runs at priority {}, not after masqd's guard ({}), so it \
                     can masquerade excepted pod traffic",
                    r.priority,
                    crate::backend::CHAIN_PRIORITY_NFT
                )
            } else if removing(r) {
                "the broad default rule for this node's pod CIDRs: masqd removes it (recorded \
                 for teardown)"
                    .to_string()
            } else if guarded(f) {
                guard_reason(fp.exception_cidrs.len(), policy)
            } else {
                "not overridden: this kernel has no nf_tables for masqd's guard, so this rule \
                 can masquerade excepted pod traffic"
                    .to_string()
            };
            out.push(Overridden {
                backend: r.backend,
                ip_family: f.to_string(),
                table: if r.backend == crate::backend::Backend::Nft {
                    format!("{} {}", r.table_family, r.table)
                } else {
                    r.table.clone()
                },
                chain: r.chain.clone(),
                handle: r.handle,
                rule: r.text.clone(),
                reason,
            });
        }
    }
    out
}

fn guard_reason(n: usize, policy: &Policy) -> String {
    let mut s = format!(
        "overridden by masqd's guard for {n} excepted CIDR{}",
        if n == 1 { "" } else { "s" }
    );
    if !policy.honor_marks.is_empty() {
        let marks: Vec<String> = policy.honor_marks.iter().map(|m| m.to_string()).collect();
        s.push_str(&format!(
            "; packets marked {} are left to it",
            marks.join(", ")
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        let cfg = crate::config::parse(
            std::path::Path::new("t.toml"),
            "[node]\npod_cidrs = [\"172.7.21.0/24\"]\n[masquerade]\ncluster_cidrs = [\"172.7.0.0/16\", \"10.96.0.0/12\"]\n",
        )
        .unwrap();
        Policy::from_config(&cfg)
    }

    fn rule(family: Option<Family>, source: SourceMatch) -> NatRule {
        NatRule {
            backend: crate::backend::Backend::Nft,
            family,
            table_family: "ip".into(),
            table: "docker-bridges".into(),
            chain: "nat-POSTROUTING-docker0".into(),
            handle: 7,
            priority: 100,
            source,
            text: "masquerade".into(),
        }
    }

    #[test]
    fn which_rules_apply() {
        let p = policy();
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        let cases = [
            (SourceMatch::Any, true),
            (SourceMatch::Unknown, true),
            (SourceMatch::Net(net("172.7.21.0/24")), true),
            (SourceMatch::Net(net("172.7.0.0/16")), true),
            (SourceMatch::Net(net("172.7.21.128/25")), true),
            (SourceMatch::Net(net("172.7.22.0/24")), false),
            (SourceMatch::NotNet(net("172.7.0.0/16")), false),
            (SourceMatch::NotNet(net("10.0.0.0/8")), true),
        ];
        for (src, want) in cases {
            let got = overridden(
                &p,
                &[rule(Some(Family::V4), src.clone())],
                |_| true,
                |_| false,
            );
            assert_eq!(!got.is_empty(), want, "{src:?}");
        }
        // An IPv6 rule cannot apply to an IPv4-only node; an inet rule without family can.
        assert!(overridden(
            &p,
            &[rule(Some(Family::V6), SourceMatch::Any)],
            |_| true,
            |_| false
        )
        .is_empty());
        assert_eq!(
            overridden(&p, &[rule(None, SourceMatch::Any)], |_| true, |_| false).len(),
            1
        );
    }

    #[test]
    fn reasons() {
        let p = policy();
        let r = rule(Some(Family::V4), SourceMatch::Any);
        let o = overridden(&p, std::slice::from_ref(&r), |_| true, |_| false);
        assert_eq!(o[0].table, "ip docker-bridges");
        assert_eq!(
            o[0].reason,
            "overridden by masqd's guard for 2 excepted CIDRs; packets marked 0x4000/0x4000 are left to it"
        );
        let o = overridden(&p, std::slice::from_ref(&r), |_| false, |_| false);
        assert!(o[0].reason.starts_with("not overridden"), "{}", o[0].reason);
        let o = overridden(&p, std::slice::from_ref(&r), |_| true, |x| x.handle == 7);
        assert!(o[0].reason.contains("masqd removes it"), "{}", o[0].reason);
        // A chain that runs before the guard is not overridden, and status says so.
        let early = NatRule { priority: 90, ..r };
        let o = overridden(&p, &[early], |_| true, |_| false);
        assert!(
            o[0].reason
                .starts_with("NOT overridden: it runs at priority 90"),
            "{}",
            o[0].reason
        );
    }
}
