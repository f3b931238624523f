//! Root-free tests of the planner, the set diff, batch chunking of large element lists and the
//! export text. Policies are written out field by field, expectations by hand.

use std::collections::BTreeSet;

use ipnet::IpNet;
use rustables::sys;

use super::model::{
    Change, ForeignRule, Observed, ObservedChain, ObservedRule, ObservedSet, ObservedTable,
    RuleSpec, CHAIN,
};
use super::plan::{desired_rules, diff_sorted, plan};
use super::{a, export, transaction};
use crate::config::HonorMark;
use crate::netlink::{split, Attrs, MAX_NEST};
use crate::policy::{Family, FamilyPolicy, Policy, Range};

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

pub(super) fn range(s: &str) -> Range {
    Range::of_net(&net(s))
}

/// Node A: pods 172.7.21.0/24, exceptions 10.96.0.0/12 and 172.7.0.0/16, bridge docker0,
/// kube-proxy's mark honoured.
pub(super) fn policy() -> Policy {
    let pods = vec![net("172.7.21.0/24")];
    let exceptions = vec![net("10.96.0.0/12"), net("172.7.0.0/16")];
    Policy {
        v4: Some(FamilyPolicy {
            configured_pod_cidrs: pods.clone(),
            pod_cidrs: pods.clone(),
            pod: vec![range("172.7.21.0/24")].into(),
            nomasq: vec![range("10.96.0.0/12"), range("172.7.0.0/16")].into(),
            exception_cidrs: exceptions.into(),
        }),
        v6: None,
        bridges: vec!["docker0".into()],
        random_fully: false,
        replace_default_rule: true,
        default_rule_cidrs: pods,
        honor_marks: vec![HonorMark {
            value: 0x4000,
            mask: 0x4000,
        }],
        guard_only: Vec::new(),
    }
}

fn tags() -> [&'static str; 4] {
    [
        "masqd:bridge:docker0",
        "masqd:mark:0x4000/0x4000",
        "masqd:guard:4",
        "masqd:masquerade:4",
    ]
}

fn set(ranges: Vec<Range>) -> ObservedSet {
    ObservedSet {
        family: Some(Family::V4),
        interval: true,
        ranges: Some(ranges.into()),
        unread: false,
    }
}

/// What the kernel holds after masqd applied [`policy`] (handles 10, 11, …).
pub(super) fn in_sync() -> Observed {
    let rules = tags()
        .iter()
        .enumerate()
        .map(|(i, t)| ObservedRule {
            handle: 10 + i as u64,
            comment: Some(t.to_string()),
            packets: Some(0),
        })
        .collect();
    let mut table = ObservedTable {
        chain: Some(ObservedChain {
            base_ok: true,
            rules,
        }),
        ..ObservedTable::default()
    };
    table
        .sets
        .insert("pod4".into(), set(vec![range("172.7.21.0/24")]));
    table.sets.insert(
        "nomasq4".into(),
        set(vec![range("10.96.0.0/12"), range("172.7.0.0/16")]),
    );
    Observed {
        genid: 7,
        table: Some(table),
        foreign: Vec::new(),
    }
}

fn default_rule(saddr: &str) -> ForeignRule {
    ForeignRule {
        table_family: Family::V4,
        table: "nat".into(),
        chain: "POSTROUTING".into(),
        handle: 4,
        saddr: net(saddr),
        oif_neq: Some("docker0".into()),
        expressions: vec![1, 2, 3],
        userdata: None,
    }
}

fn add_rules() -> Vec<Change> {
    vec![
        Change::AddRule(RuleSpec::BridgeReturn("docker0".into())),
        Change::AddRule(RuleSpec::MarkReturn(HonorMark {
            value: 0x4000,
            mask: 0x4000,
        })),
        Change::AddRule(RuleSpec::Guard(Family::V4)),
        Change::AddRule(RuleSpec::Masquerade {
            family: Family::V4,
            random_fully: false,
        }),
    ]
}

#[test]
fn desired_rules_are_in_the_documented_order_with_their_tags() {
    let got: Vec<String> = desired_rules(&policy()).iter().map(RuleSpec::tag).collect();
    assert_eq!(got, tags());
}

#[test]
fn in_sync_plans_nothing() {
    assert_eq!(plan(&policy(), &in_sync()), Vec::<Change>::new());
}

#[test]
fn missing_table_is_built_whole() {
    let mut want = vec![
        Change::AddTable,
        Change::AddChain,
        Change::AddSet {
            name: "nomasq4".into(),
            family: Family::V4,
        },
        Change::AddSet {
            name: "pod4".into(),
            family: Family::V4,
        },
        Change::AddElements {
            set: "nomasq4".into(),
            family: Family::V4,
            ranges: vec![range("10.96.0.0/12"), range("172.7.0.0/16")],
        },
        Change::AddElements {
            set: "pod4".into(),
            family: Family::V4,
            ranges: vec![range("172.7.21.0/24")],
        },
    ];
    want.extend(add_rules());
    assert_eq!(plan(&policy(), &Observed::default()), want);
}

#[test]
fn stale_chain_priority_recreates_the_chain_inside_the_table() {
    let mut o = in_sync();
    if let Some(c) = o.table.as_mut().and_then(|t| t.chain.as_mut()) {
        c.base_ok = false;
    }
    let mut want = vec![
        Change::FlushChain(CHAIN.into()),
        Change::DeleteChain(CHAIN.into()),
        Change::AddChain,
    ];
    want.extend(add_rules());
    let got = plan(&policy(), &o);
    assert_eq!(got, want);
    assert!(!got.contains(&Change::DeleteTable));
}

#[test]
fn set_elements_are_diffed_not_replaced() {
    let mut o = in_sync();
    let t = o.table.as_mut().unwrap();
    t.sets.insert(
        "nomasq4".into(),
        set(vec![range("10.96.0.0/12"), range("192.168.0.0/16")]),
    );
    assert_eq!(
        plan(&policy(), &o),
        vec![
            Change::DeleteElements {
                set: "nomasq4".into(),
                family: Family::V4,
                ranges: vec![range("192.168.0.0/16")],
            },
            Change::AddElements {
                set: "nomasq4".into(),
                family: Family::V4,
                ranges: vec![range("172.7.0.0/16")],
            },
        ]
    );
}

#[test]
fn reordered_rules_are_rebuilt_by_handle() {
    let mut o = in_sync();
    let rules = &mut o.table.as_mut().unwrap().chain.as_mut().unwrap().rules;
    rules.swap(2, 3);
    let mut want: Vec<Change> = [10u64, 11, 13, 12]
        .iter()
        .zip([tags()[0], tags()[1], tags()[3], tags()[2]])
        .map(|(h, t)| Change::DeleteRule {
            handle: *h,
            comment: Some(t.into()),
        })
        .collect();
    want.extend(add_rules());
    assert_eq!(plan(&policy(), &o), want);
}

#[test]
fn unreadable_or_foreign_sets_are_recreated_or_removed() {
    let mut o = in_sync();
    let t = o.table.as_mut().unwrap();
    t.sets.get_mut("pod4").unwrap().ranges = None;
    t.sets.insert("old".into(), set(vec![]));
    let got = plan(&policy(), &o);
    assert_eq!(
        got[4..7],
        [
            Change::DeleteSet("old".into()),
            Change::DeleteSet("pod4".into()),
            Change::AddSet {
                name: "pod4".into(),
                family: Family::V4
            },
        ]
    );
    assert!(matches!(got[0], Change::DeleteRule { handle: 10, .. }));
    assert!(got.contains(&Change::AddElements {
        set: "pod4".into(),
        family: Family::V4,
        ranges: vec![range("172.7.21.0/24")],
    }));
    assert_eq!(got[got.len() - 4..], add_rules()[..]);
}

#[test]
fn default_rule_of_a_pod_cidr_is_removed_and_only_that() {
    let mut o = in_sync();
    o.foreign = vec![default_rule("172.7.21.0/24"), default_rule("10.1.0.0/16")];
    assert_eq!(
        plan(&policy(), &o),
        vec![Change::RemoveDefaultRule(default_rule("172.7.21.0/24"))]
    );
    let mut keep = policy();
    keep.replace_default_rule = false;
    assert_eq!(plan(&keep, &o), Vec::<Change>::new());
    // A policy with nothing in nftables: the table goes, the default rule still does.
    let mut none = policy();
    none.v4 = None;
    assert_eq!(
        plan(&none, &o),
        vec![
            Change::DeleteTable,
            Change::RemoveDefaultRule(default_rule("172.7.21.0/24"))
        ]
    );
}

/// The set diff by brute force: address sets of whole ranges compared as sets.
fn brute_diff(have: &[Range], want: &[Range]) -> (Vec<Range>, Vec<Range>) {
    let h: BTreeSet<Range> = have.iter().copied().collect();
    let w: BTreeSet<Range> = want.iter().copied().collect();
    (
        h.difference(&w).copied().collect(),
        w.difference(&h).copied().collect(),
    )
}

#[test]
fn set_diff_matches_a_brute_force_model_on_random_inputs() {
    let mut rng = fastrand::Rng::with_seed(12);
    for round in 0..2_000 {
        let gen = |rng: &mut fastrand::Rng| -> Vec<Range> {
            let n = rng.usize(0..12);
            let mut v: BTreeSet<Range> = BTreeSet::new();
            for _ in 0..n {
                let start = rng.u128(0..40);
                v.insert(Range {
                    start,
                    end: start + rng.u128(0..3),
                });
            }
            let mut v: Vec<Range> = v.into_iter().collect();
            if rng.bool() {
                rng.shuffle(&mut v); // unsorted input takes the sorting path
            }
            v
        };
        let (have, want) = (gen(&mut rng), gen(&mut rng));
        assert_eq!(
            diff_sorted(&have, &want),
            brute_diff(&have, &want),
            "round {round}: {have:?} → {want:?}"
        );
    }
}

#[test]
fn hundred_thousand_elements_are_chunked_within_the_nest_limit_each_once() {
    // 100,000 disjoint /32s with a gap after each: a start and an end element apiece.
    let ranges: Vec<Range> = (0..100_000u128)
        .map(|i| Range {
            start: 0x0a00_0000 + 2 * i,
            end: 0x0a00_0000 + 2 * i,
        })
        .collect();
    let change = Change::AddElements {
        set: "nomasq4".into(),
        family: Family::V4,
        ranges: ranges.clone(),
    };
    let (bytes, what) = transaction(&[change], Some(3)).finish();
    let msgs = split(&bytes).unwrap();
    let elem_kind = ((sys::NFNL_SUBSYS_NFTABLES as u16) << 8) | sys::NFT_MSG_NEWSETELEM as u16;
    let chunks: Vec<_> = msgs.iter().filter(|m| m.kind == elem_kind).collect();
    assert!(chunks.len() > 10, "{} messages", chunks.len());
    assert_eq!(what.len(), chunks.len());
    assert!(what[0].starts_with("add element inet masqd nomasq4 { 10.0.0.0/32 … "));
    let mut keys: Vec<(u32, bool)> = Vec::new();
    for (i, m) in chunks.iter().enumerate() {
        assert_eq!(m.seq, i as u32 + 1);
        let list = Attrs(&m.body[4..])
            .get(a(sys::NFTA_SET_ELEM_LIST_ELEMENTS))
            .expect("element list");
        assert!(list.data.len() + 4 < 65_536, "nest of {}", list.data.len());
        assert!(list.data.len() <= MAX_NEST + 64);
        for e in list.nested() {
            let key = e
                .nested()
                .get(a(sys::NFTA_SET_ELEM_KEY))
                .and_then(|k| k.nested().get(a(sys::NFTA_DATA_VALUE)))
                .and_then(|v| v.be32())
                .expect("key");
            let end = e.nested().get(a(sys::NFTA_SET_ELEM_FLAGS)).is_some();
            keys.push((key, end));
        }
    }
    let want: Vec<(u32, bool)> = ranges
        .iter()
        .flat_map(|r| [(r.start as u32, false), (r.end as u32 + 1, true)])
        .collect();
    assert_eq!(keys, want);
    // The generation id rides on BATCH_BEGIN, and BATCH_END closes the batch.
    assert_eq!(msgs[0].kind, 0x10);
    assert_eq!(msgs.last().unwrap().kind, 0x11);
}

#[test]
fn export_text_is_an_nft_file_that_replaces_the_table() {
    let mut p = policy();
    p.honor_marks.clear();
    let want = "#!/usr/sbin/nft -f
# masqd export: replaces table inet masqd atomically; load with `nft -f FILE`
table inet masqd
delete table inet masqd
table inet masqd {
\tset nomasq4 {
\t\ttype ipv4_addr
\t\tflags interval
\t\telements = { 10.96.0.0/12,
\t\t\t     172.7.0.0/16 }
\t}
\tset pod4 {
\t\ttype ipv4_addr
\t\tflags interval
\t\telements = { 172.7.21.0/24 }
\t}
\tchain postrouting {
\t\ttype nat hook postrouting priority srcnat - 1; policy accept;
\t\toifname \"docker0\" return comment \"masqd:bridge:docker0\"
\t\tip saddr @pod4 ip daddr @nomasq4 counter snat ip to ip saddr comment \"masqd:guard:4\"
\t\tip saddr @pod4 counter masquerade comment \"masqd:masquerade:4\"
\t}
}
";
    assert_eq!(export(&p), want);
    let mut none = p;
    none.v4 = None;
    assert!(export(&none).ends_with("table inet masqd\ndelete table inet masqd\n"));
}

#[test]
fn changes_print_as_the_nft_commands_they_equal() {
    assert_eq!(
        Change::RemoveDefaultRule(default_rule("172.7.21.0/24")).to_string(),
        "delete rule ip nat POSTROUTING handle 4 # default rule: ip nat POSTROUTING: \
         oifname != \"docker0\" ip saddr 172.7.21.0/24 masquerade"
    );
    assert_eq!(
        Change::AddChain.to_string(),
        "add chain inet masqd postrouting { type nat hook postrouting priority srcnat - 1; \
         policy accept; }"
    );
    let many = Change::AddElements {
        set: "pod4".into(),
        family: Family::V4,
        ranges: vec![range("10.0.0.0/8"), range("192.168.0.0/16")],
    };
    assert_eq!(many.summary(), "add element inet masqd pod4 (2 intervals)");
    assert_eq!(
        many.to_string(),
        "add element inet masqd pod4 { 10.0.0.0/8, 192.168.0.0/16 }"
    );
}
