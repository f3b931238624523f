//! Root-free tests of the nft backend: decoding, the default-rule matcher (on rules that
//! iptables-nft itself made, see [`super::tests_golden`]) and record replay checks.

use rustables::sys;

use super::a;
use super::decode::{elements_to_ranges, udata_comment, NFTA_TARGET_NAME};
use super::encode::{
    addr_field, expr_cmp_eq, expr_counter, expr_masq, expr_meta, expr_payload_nh, put_data_value,
    put_expr, udata_with_comment, Field,
};
use super::tests_golden::rule_exprs;
use super::{match_default_rule, replayable};
use crate::netlink::Writer;
use crate::policy::{Family, Range};
use crate::state::{hex, RemovedRule};

fn r(a: u128, b: u128) -> Range {
    Range { start: a, end: b }
}

#[test]
fn ranges_from_elements() {
    // nft's leading end element at 0, adjacent intervals, an open top interval.
    let e = vec![
        (0, true),
        (10, false),
        (20, true),
        (20, false),
        (30, true),
        (100, false),
    ];
    assert_eq!(
        elements_to_ranges(e, u32::MAX as u128),
        Some(vec![r(10, 19), r(20, 29), r(100, u32::MAX as u128)])
    );
    assert_eq!(elements_to_ranges(vec![(1, false), (2, false)], 7), None);
}

#[test]
fn udata_roundtrip() {
    assert_eq!(
        udata_comment(&udata_with_comment("masqd:guard:4")).as_deref(),
        Some("masqd:guard:4")
    );
}

/// A rule shaped like iptables-nft's, for the cases the real tool cannot produce (a
/// non-contiguous source mask): `[! -o oif] -s saddr/mask -j target`.
fn synthetic_rule(
    f: Family,
    saddr: &[u8],
    plen: u32,
    mask: Option<&[u8]>,
    oif: Option<&[u8]>,
    target: &str,
) -> Vec<u8> {
    let mut w = Writer::default();
    if let Some(o) = oif {
        expr_meta(&mut w, sys::NFT_META_OIFNAME);
        put_expr(&mut w, "cmp", |w| {
            w.put_be32(a(sys::NFTA_CMP_SREG), 1);
            w.put_be32(a(sys::NFTA_CMP_OP), sys::NFT_CMP_NEQ);
            put_data_value(w, a(sys::NFTA_CMP_DATA), o);
        });
    }
    let field = Field {
        offset: addr_field(f, true).offset,
        len: plen,
    };
    expr_payload_nh(&mut w, field);
    if let Some(m) = mask {
        put_expr(&mut w, "bitwise", |w| {
            put_data_value(w, a(sys::NFTA_BITWISE_MASK), m);
            put_data_value(w, a(sys::NFTA_BITWISE_XOR), &vec![0; m.len()]);
        });
    }
    expr_cmp_eq(&mut w, saddr);
    expr_counter(&mut w);
    if target == "masq" {
        expr_masq(&mut w, false);
    } else {
        put_expr(&mut w, "target", |w| w.put_str(NFTA_TARGET_NAME, target));
    }
    w.into_bytes()
}

#[test]
fn only_default_rules_for_their_record_are_replayable() {
    // `iptables-nft -t nat -A POSTROUTING -s 172.7.21.0/24 ! -o docker0 -j MASQUERADE`
    let exprs = rule_exprs(include_str!("golden/iptables-nft-masquerade.hex"));
    let rec = RemovedRule {
        backend: "nft".into(),
        family: "ip".into(),
        table: "nat".into(),
        chain: "POSTROUTING".into(),
        description: "ip nat POSTROUTING x".into(),
        saddr: "172.7.21.0/24".into(),
        oif_neq: Some("docker0".into()),
        expressions_hex: hex(&exprs),
        userdata_hex: None,
        legacy_rule: None,
    };
    let ok = replayable(&rec).unwrap();
    assert_eq!((ok.family, ok.exprs), (Family::V4, exprs.clone()));
    let refused = |f: &dyn Fn(&mut RemovedRule)| {
        let mut r = rec.clone();
        f(&mut r);
        replayable(&r).unwrap_err()
    };
    assert!(refused(&|r| r.saddr = "10.0.0.0/8".into()).contains("not for 10.0.0.0/8"));
    assert!(refused(&|r| r.oif_neq = None).contains("not for"));
    assert!(refused(&|r| r.family = "ip6".into()).contains("not a broad masquerade"));
    refused(&|r| r.table = "filter".into());
    refused(&|r| r.expressions_hex = "zz".into());
    assert!(refused(&|r| r.family = "inet".into()).contains("unknown family"));
    // `iptables-nft -t nat -A POSTROUTING -s 172.7.21.0/24 -j SNAT --to-source 192.0.2.1`
    let snat = rule_exprs(include_str!("golden/iptables-nft-snat.hex"));
    assert!(refused(&|r| r.expressions_hex = hex(&snat)).contains("not a broad"));
}

#[test]
fn default_rule_matcher() {
    // Rules made by iptables-nft itself (src/backend/nft/golden/, captured with strace).
    let b = rule_exprs(include_str!("golden/iptables-nft-masquerade.hex"));
    assert_eq!(
        match_default_rule(Family::V4, &b),
        Some(("172.7.21.0/24".parse().unwrap(), Some("docker0".into())))
    );
    let b = rule_exprs(include_str!("golden/iptables-nft-masquerade-nooif.hex"));
    assert_eq!(
        match_default_rule(Family::V4, &b),
        Some(("10.0.0.0/20".parse().unwrap(), None))
    );
    let b = rule_exprs(include_str!("golden/iptables-nft-snat.hex"));
    assert_eq!(match_default_rule(Family::V4, &b), None);
    let b = rule_exprs(include_str!("golden/ip6tables-nft-masquerade.hex"));
    assert_eq!(
        match_default_rule(Family::V6, &b),
        Some(("fd00:7:21::/64".parse().unwrap(), Some("docker+".into())))
    );
    // The v4 rule read as a v6 one: the source offset differs, no match.
    let b4 = rule_exprs(include_str!("golden/iptables-nft-masquerade.hex"));
    assert_eq!(match_default_rule(Family::V6, &b4), None);
    // A non-contiguous mask (no tool writes one): not the default rule.
    let b = synthetic_rule(
        Family::V4,
        &[10, 0, 0, 0],
        4,
        Some(&[255, 0, 255, 0]),
        None,
        "masq",
    );
    assert_eq!(match_default_rule(Family::V4, &b), None);
    // The same shape with a contiguous mask does match (the synthetic rule is well-formed).
    let b = synthetic_rule(
        Family::V4,
        &[10, 0, 0, 0],
        4,
        Some(&[255, 255, 240, 0]),
        None,
        "masq",
    );
    assert_eq!(
        match_default_rule(Family::V4, &b),
        Some(("10.0.0.0/20".parse().unwrap(), None))
    );
}

#[test]
fn default_rule_matcher_refuses_anything_after_the_verdict_or_extra_matches() {
    let mut b = rule_exprs(include_str!("golden/iptables-nft-masquerade.hex"));
    let mut w = Writer::default();
    expr_counter(&mut w);
    b.extend(w.into_bytes());
    assert_eq!(match_default_rule(Family::V4, &b), None);
    // Truncated lists never panic and never match.
    let full = rule_exprs(include_str!("golden/iptables-nft-masquerade.hex"));
    for cut in 0..full.len() {
        assert_eq!(
            match_default_rule(Family::V4, &full[..cut]),
            None,
            "cut at {cut}"
        );
    }
}
