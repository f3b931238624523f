//! Unit tests of `masqd explain` on constructed kernel facts (no kernel, no root).

use std::path::Path;

use super::evaluate::config_range;
use super::*;
use crate::backend::query::{desired_legacy_chain, desired_rules, RuleSpec, LEGACY_JUMP};
use crate::config::Config;
use crate::foreign::SourceMatch;
use crate::policy::{Policy, Range};

const CFG: &str = "[node]\npod_cidrs = [\"172.7.21.0/24\"]\n[masquerade]\n\
                   cluster_cidrs = [\"172.7.0.0/16\"]\n\
                   nonmasquerade_cidrs = [\"10.200.0.2/32\", \"10.200.0.0/24\"]\n\
                   bridge_interfaces = [\"docker0\"]\n";

fn cfg() -> (Config, Policy) {
    let c = config::parse(Path::new("/etc/masqd/masqd.toml"), CFG).unwrap();
    let p = Policy::from_config(&c);
    (c, p)
}

fn r(a: &str, b: &str) -> Range {
    let i = |s: &str| int(s.parse().unwrap());
    Range {
        start: i(a),
        end: i(b),
    }
}

fn q(src: &str, dst: &str, oif: Option<&str>, mark: Option<&str>) -> Query {
    Query::parse(src, dst, oif, mark).unwrap()
}

/// The kernel as `masqd apply` leaves it for CFG in nft mode; lookups for `query`.
fn kernel(p: &Policy, query: &Query) -> (Kernel, Vec<RuleSpec>) {
    let desired = desired_rules(p);
    let fp = p.family(Family::V4).unwrap();
    let look = |ranges: &[Range], a: IpAddr| match config_range(ranges, int(a)) {
        Some(r) => Lookup::In(r),
        None => Lookup::NotIn,
    };
    let k = Kernel {
        backend: Backend::Nft,
        nft: true,
        table: true,
        chain: desired
            .iter()
            .enumerate()
            .map(|(i, s)| ChainRule {
                handle: 10 + i as u64,
                comment: Some(s.tag()),
            })
            .collect(),
        pod: look(&fp.pod, query.src),
        nomasq: look(&fp.nomasq, query.dst),
        legacy: None,
        foreign: Vec::new(),
    };
    (k, desired)
}

fn run(query: &Query, edit: impl FnOnce(&mut Kernel)) -> Explanation {
    let (c, p) = cfg();
    let (mut k, desired) = kernel(&p, query);
    edit(&mut k);
    evaluate(query, &c, &p, &desired, &k)
}

fn foreign(priority: i32, source: SourceMatch, text: &str) -> NatRule {
    NatRule {
        backend: crate::backend::Backend::Nft,
        family: Some(Family::V4),
        table_family: "ip".into(),
        table: "docker-bridges".into(),
        chain: "nat-postrouting".into(),
        handle: 5,
        priority,
        source,
        text: text.into(),
    }
}

#[test]
fn kept_names_the_range_and_every_config_line() {
    let e = run(&q("172.7.21.2", "10.200.0.2", None, None), |_| {});
    assert_eq!(e.verdict, Verdict::Kept);
    assert_eq!(e.handle, Some(12), "guard after bridge and mark returns");
    assert_eq!(e.range.as_deref(), Some("10.200.0.0/24"));
    // The /32 (line 5, first item) is more specific than the /24 on the same line.
    assert_eq!(e.source.as_deref(), Some("/etc/masqd/masqd.toml:5"));
    let cidrs: Vec<&str> = e.sources.iter().map(|s| s.cidr.as_str()).collect();
    assert_eq!(cidrs, ["10.200.0.2/32", "10.200.0.0/24"]);
    assert!(e.disagreements.is_empty(), "{:?}", e.disagreements);
    let e = run(&q("172.7.21.2", "172.7.22.2", None, None), |_| {});
    assert_eq!(e.source.as_deref(), Some("/etc/masqd/masqd.toml:4"));
    assert_eq!(e.sources[0].key, "masquerade.cluster_cidrs");
}

#[test]
fn masqueraded_untouched_marked() {
    let e = run(&q("172.7.21.2", "10.200.1.3", None, None), |_| {});
    assert_eq!(e.verdict, Verdict::Masqueraded);
    assert_eq!(e.rule.as_deref(), Some("ip saddr @pod4 counter masquerade"));
    assert_eq!(e.range, None);
    let e = run(&q("10.200.0.1", "10.200.1.3", None, None), |_| {});
    assert_eq!(e.verdict, Verdict::Untouched);
    assert!(e.reason.contains("not a pod source"), "{}", e.reason);
    let e = run(
        &q("172.7.21.2", "10.200.1.3", Some("docker0"), None),
        |_| {},
    );
    assert_eq!((e.verdict, e.handle), (Verdict::Untouched, Some(10)));
    // Another interface is not a bridge.
    let e = run(&q("172.7.21.2", "10.200.1.3", Some("eth0"), None), |_| {});
    assert_eq!(e.verdict, Verdict::Masqueraded);
    for m in ["0x4000", "16384", "0xc000"] {
        let e = run(&q("172.7.21.2", "172.7.22.2", None, Some(m)), |_| {});
        assert_eq!(e.verdict, Verdict::Marked, "{m}");
        assert_eq!(
            e.mark.as_deref(),
            Some(format!("{:#x}", parse_mark(m).unwrap()).as_str())
        );
    }
    let e = run(&q("172.7.21.2", "172.7.22.2", None, Some("0x8000")), |_| {});
    assert_eq!(
        e.verdict,
        Verdict::Kept,
        "another bit is not the honoured mark"
    );
}

#[test]
fn the_kernel_decides_and_disagreements_are_named() {
    // The kernel's set lacks the exception the configuration has.
    let e = run(&q("172.7.21.2", "10.200.0.2", None, None), |k| {
        k.nomasq = Lookup::NotIn
    });
    assert_eq!(e.verdict, Verdict::Masqueraded);
    assert_eq!(e.disagreements.len(), 1, "{:?}", e.disagreements);
    assert!(
        e.disagreements[0].contains("10.200.0.0/24"),
        "{:?}",
        e.disagreements
    );
    // The kernel holds a range the configuration lacks.
    let e = run(&q("172.7.21.2", "192.168.9.9", None, None), |k| {
        k.nomasq = Lookup::In(r("192.168.9.0", "192.168.9.255"))
    });
    assert_eq!(e.verdict, Verdict::Kept);
    assert_eq!(e.source, None);
    assert_eq!(e.disagreements.len(), 2, "{:?}", e.disagreements);
    // The guard is gone from the kernel.
    let e = run(&q("172.7.21.2", "172.7.22.2", None, None), |k| {
        k.chain
            .retain(|c| c.comment.as_deref() != Some("masqd:guard:4"))
    });
    assert_eq!(e.verdict, Verdict::Masqueraded);
    assert!(
        e.disagreements[0].contains("the rules of inet masqd"),
        "{:?}",
        e.disagreements
    );
    // No table at all: nothing of masqd's runs.
    let e = run(&q("172.7.21.2", "172.7.22.2", None, None), |k| {
        k.table = false;
        k.chain.clear();
        k.pod = Lookup::NoSet;
        k.nomasq = Lookup::NoSet;
    });
    assert_eq!(e.verdict, Verdict::Untouched);
    assert!(
        e.disagreements[0].contains("not in the kernel"),
        "{:?}",
        e.disagreements
    );
}

#[test]
fn other_rules_by_priority_and_match() {
    let rules = vec![
        foreign(
            100,
            SourceMatch::Net("172.7.21.0/24".parse().unwrap()),
            "a masquerade",
        ),
        foreign(90, SourceMatch::Any, "b masquerade"),
        foreign(
            100,
            SourceMatch::Net("172.7.22.0/24".parse().unwrap()),
            "c masquerade",
        ),
        foreign(
            100,
            SourceMatch::NotNet("172.7.0.0/16".parse().unwrap()),
            "d masquerade",
        ),
        foreign(
            100,
            SourceMatch::Unknown,
            "oifname != \"docker0\" e masquerade",
        ),
    ];
    let e = run(&q("172.7.21.2", "172.7.22.2", None, None), |k| {
        k.foreign = rules.clone()
    });
    let got: Vec<(&str, bool, &str)> = e
        .other_rules
        .iter()
        .map(|o| (o.rule.as_str(), o.overridden, o.matches.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("a masquerade", true, "yes"),
            ("b masquerade", false, "yes"),
            ("oifname != \"docker0\" e masquerade", true, "maybe"),
        ]
    );
    assert!(e.other_rules[1].reason.starts_with("NOT overridden"));
    // Untouched: every matching rule applies; the bridge excludes rule e.
    let e = run(&q("172.7.21.2", "10.1.1.1", Some("docker0"), None), |k| {
        k.foreign = rules
    });
    assert_eq!(e.other_rules.len(), 2);
    assert!(e.other_rules.iter().all(|o| !o.overridden));
}

#[test]
fn legacy_mode_walks_masqd_postrouting() {
    let (c, p) = cfg();
    let mut lo = LegacyObserved {
        nat_loaded: true,
        chain_exists: true,
        postrouting: vec![LEGACY_JUMP.to_string()],
        ..Default::default()
    };
    let fp = p.family(Family::V4).unwrap();
    lo.chain_rules = desired_legacy_chain(fp, &p);
    let guard_only = p.nft_part(&[], &[Family::V4]);
    let query = q("172.7.21.2", "10.200.1.3", None, Some("0x4000"));
    let (mut k, _) = kernel(&p, &query);
    let desired = desired_rules(&guard_only);
    k.backend = Backend::Legacy;
    k.chain.retain(|c| {
        !c.comment
            .as_deref()
            .unwrap_or("")
            .starts_with("masqd:masquerade")
    });
    k.legacy = Some(lo.clone());
    let e = evaluate(&query, &c, &p, &desired, &k);
    // Marked, but leaving the cluster: MASQD-POSTROUTING masquerades it anyway.
    assert_eq!(e.verdict, Verdict::Masqueraded);
    assert_eq!(
        e.rule.as_deref(),
        Some("-A MASQD-POSTROUTING -s 172.7.21.0/24 -j MASQUERADE")
    );
    assert_eq!(e.handle, Some(lo.chain_rules.len() as u64));
    assert!(e.disagreements.is_empty(), "{:?}", e.disagreements);
    // Marked to an exception: the legacy chain returns, the mark decides.
    let query = q("172.7.21.2", "172.7.22.2", None, Some("0x4000"));
    let (mut k2, _) = kernel(&p, &query);
    k2.backend = Backend::Legacy;
    k2.chain = k.chain.clone();
    k2.legacy = Some(lo.clone());
    assert_eq!(
        evaluate(&query, &c, &p, &desired, &k2).verdict,
        Verdict::Marked
    );
    // A drifted legacy chain is reported.
    lo.chain_rules.pop();
    k2.legacy = Some(lo);
    let e = evaluate(&query, &c, &p, &desired, &k2);
    assert_eq!(e.disagreements.len(), 1, "{:?}", e.disagreements);
    assert!(
        e.disagreements[0].contains("MASQD-POSTROUTING"),
        "{:?}",
        e.disagreements
    );
}

#[test]
fn bad_queries() {
    let bad =
        |s: &str, d: &str, o: Option<&str>, m: Option<&str>| Query::parse(s, d, o, m).unwrap_err();
    assert!(bad("1.2.3", "1.2.3.4", None, None).contains("SRC \"1.2.3\""));
    assert!(bad("1.2.3.4", "::1", None, None).contains("different address families"));
    assert!(bad("::1", "1.2.3.4", None, None).contains("different address families"));
    assert!(bad("1.2.3.4", "1.2.3.5", Some(""), None).contains("--oif \"\": is empty"));
    assert!(bad("1.2.3.4", "1.2.3.5", Some("a b"), None).contains("whitespace"));
    for m in [
        "",
        "0x",
        "-1",
        "1e3",
        "0x1_0",
        "4294967296",
        "0x100000000",
        "0xg",
    ] {
        let e = bad("1.2.3.4", "1.2.3.5", None, Some(m));
        assert!(e.starts_with(&format!("--mark {m:?}")), "{m}: {e}");
    }
    assert_eq!(parse_mark("4294967295"), Ok(u32::MAX));
    assert_eq!(parse_mark("0XFFFFFFFF"), Ok(u32::MAX));
    assert_eq!(parse_mark("0"), Ok(0));
    assert_eq!(q("fd00::1", "fd00::2", None, None).family(), Family::V6);
}

#[test]
fn tags_name_the_rule_they_stand_for() {
    use super::walk::spec_of_tag;
    assert_eq!(
        spec_of_tag("masqd:bridge:cni0"),
        Some(RuleSpec::BridgeReturn("cni0".into()))
    );
    assert_eq!(
        spec_of_tag("masqd:guard:6"),
        Some(RuleSpec::Guard(Family::V6))
    );
    assert_eq!(
        spec_of_tag("masqd:masquerade:4:fully-random"),
        Some(RuleSpec::Masquerade {
            family: Family::V4,
            random_fully: true
        })
    );
    for bad in [
        "masqd:guard:5",
        "masqd:masquerade:",
        "docker:guard:4",
        "masqd:other:4",
    ] {
        assert_eq!(spec_of_tag(bad), None, "{bad}");
    }
}

#[test]
fn an_ipv6_pod_source_with_no_ipv6_policy_is_untouched() {
    // The kernel has no ipv6 sets and the configuration no ipv6 pod CIDRs.
    let query = q("fd00:7:21::2", "fd00:7:22::2", None, None);
    let e = run(&query, |k| {
        k.pod = Lookup::NoSet;
        k.nomasq = Lookup::NoSet;
    });
    assert_eq!(e.verdict, Verdict::Untouched);
    assert_eq!(e.ip_family, "ipv6");
    assert!(e.reason.contains("not in set pod6"), "{}", e.reason);
    assert_eq!((e.rule, e.handle), (None, None));
}

#[test]
fn render_prints_rule_positions_and_disagreements() {
    let e = Explanation {
        verdict: Verdict::Kept,
        backend: "legacy".into(),
        ip_family: "ipv4".into(),
        src: "172.7.21.2".into(),
        dst: "172.7.22.2".into(),
        oif: None,
        mark: None,
        rule: Some("-A MASQD-POSTROUTING -s 172.7.21.0/24 -d 172.7.0.0/16 -j RETURN".into()),
        chain: Some("legacy nat MASQD-POSTROUTING".into()),
        handle: Some(2),
        range: Some("172.7.0.0/16".into()),
        source: Some("/etc/masqd/masqd.toml:4".into()),
        sources: vec![Source {
            cidr: "172.7.0.0/16".into(),
            source: "/etc/masqd/masqd.toml:4".into(),
            key: "masquerade.cluster_cidrs".into(),
        }],
        reason: "MASQD-POSTROUTING returns".into(),
        notes: vec![],
        disagreements: vec!["the legacy chain differs".into()],
        based_on: "kernel".into(),
        other_rules: vec![OtherRule {
            backend: "legacy".into(),
            table: "nat".into(),
            chain: "POSTROUTING".into(),
            handle: 3,
            priority: 100,
            rule: "-A POSTROUTING -s 172.7.21.0/24 -j MASQUERADE".into(),
            matches: "yes".into(),
            overridden: false,
            reason: "NOT overridden".into(),
        }],
    };
    assert_eq!(
        render(&e),
        "172.7.21.2 → 172.7.22.2 (ipv4, backend legacy)\n\
         verdict: kept\n\
         \x20 why:    MASQD-POSTROUTING returns\n\
         \x20 rule:   legacy nat MASQD-POSTROUTING rule 2: -A MASQD-POSTROUTING -s 172.7.21.0/24 \
         -d 172.7.0.0/16 -j RETURN\n\
         \x20 range:  172.7.0.0/16\n\
         \x20 source: /etc/masqd/masqd.toml:4 (masquerade.cluster_cidrs 172.7.0.0/16)\n\
         configuration and kernel DISAGREE (the verdict uses the kernel):\n\
         \x20 the legacy chain differs\n\
         other NAT rules that would match:\n\
         \x20 legacy nat POSTROUTING rule 3 (priority 100, source matches: yes): -A POSTROUTING \
         -s 172.7.21.0/24 -j MASQUERADE\n\
         \x20     NOT overridden\n"
    );
}

#[test]
fn decided_chains_name_their_backend() {
    use super::walk::{chain_backend, chain_name};
    assert_eq!(chain_name(Backend::Nft), "inet masqd postrouting");
    assert_eq!(chain_name(Backend::Legacy), "legacy nat MASQD-POSTROUTING");
    assert_eq!(
        chain_backend("legacy nat MASQD-POSTROUTING"),
        Some(Backend::Legacy)
    );
    assert_eq!(chain_backend("inet masqd postrouting"), Some(Backend::Nft));
    assert_eq!(chain_backend("legacy nat POSTROUTING"), None);
    // In legacy mode the guard in nftables decides an exception: a handle, not a position.
    let e = run(&q("172.7.21.2", "10.200.0.2", None, None), |k| {
        k.backend = Backend::Legacy
    });
    assert_eq!((e.verdict, e.handle), (Verdict::Kept, Some(12)));
    assert!(
        render(&e).contains("  rule:   inet masqd postrouting handle 12: "),
        "{}",
        render(&e)
    );
}
