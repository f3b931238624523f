//! The counted detection facts followed from notifications: a recorded event stream applied
//! to facts read at some generation gives what reading them again would.

use super::*;

// linux/netfilter.h and linux/netfilter/nf_tables.h, written out as an independent source.
const INET: u8 = 1;
const IPV4: u8 = 2;
const IPV6: u8 = 10;
const NEWTABLE: u16 = 0;
const DELTABLE: u16 = 2;
const NEWCHAIN: u16 = 3;
const DELCHAIN: u16 = 5;
const NEWRULE: u16 = 6;
const DELRULE: u16 = 8;
const NEWSETELEM: u16 = 12;

fn ev(kind: u16, family: u8, table: &str, name: Option<&str>) -> Event {
    Event::Change {
        kind,
        family,
        pid: 4242,
        res_id: 0,
        table: Some(table.into()),
        name: name.map(str::to_string),
    }
}

fn delta(gen: u32, events: &[Event]) -> TxnDelta {
    let mut d = TxnDelta::default();
    for e in events {
        d.take(e);
    }
    d.gen = gen;
    d
}

fn at(gen: u32, rules: usize) -> Counted {
    Counted {
        gen,
        rules,
        hints: Vec::new(),
    }
}

#[test]
fn rules_of_the_family_and_of_other_inet_tables_count() {
    let d = delta(
        11,
        &[
            ev(NEWRULE, IPV4, "nat", Some("KUBE-SVC-X")),
            ev(NEWRULE, IPV4, "filter", Some("INPUT")),
            ev(DELRULE, IPV6, "nat", Some("POSTROUTING")),
            ev(NEWRULE, INET, "firewalld", Some("filter_IN")),
            ev(NEWRULE, INET, "masqd", Some("postrouting")),
            ev(NEWSETELEM, INET, "masqd", Some("nomasq4")),
        ],
    );
    assert_eq!(d.rules, [3, 0], "ipv4: 2 + inet 1; ipv6: -1 + inet 1");
    let (mut v4, mut v6) = (at(10, 100), at(10, 5));
    assert!(v4.follow(Family::V4, &d) && v6.follow(Family::V6, &d));
    assert_eq!((v4.rules, v4.gen, v6.rules), (103, 11, 5));
}

#[test]
fn a_transaction_older_than_the_facts_is_already_in_them() {
    let d = delta(10, &[ev(NEWRULE, IPV4, "nat", Some("X"))]);
    let mut c = at(10, 7);
    assert!(c.follow(Family::V4, &d));
    assert_eq!(c.rules, 7, "generation 10 is what was read");
    let d = delta(12, &[ev(DELRULE, IPV4, "nat", Some("X"))]);
    assert!(c.follow(Family::V4, &d));
    assert_eq!((c.rules, c.gen), (6, 12));
}

#[test]
fn hint_chains_come_and_go_per_family() {
    let add = delta(
        3,
        &[
            ev(NEWTABLE, IPV4, "mangle", None),
            ev(NEWCHAIN, IPV4, "mangle", Some("KUBE-IPTABLES-HINT")),
            ev(NEWCHAIN, IPV4, "mangle", Some("OTHER")),
            ev(NEWCHAIN, INET, "x", Some("KUBE-IPTABLES-HINT")),
        ],
    );
    assert_eq!(
        add.hints,
        vec![(Family::V4, "ip mangle/KUBE-IPTABLES-HINT".to_string(), true)],
        "inet chains are not a family's chains"
    );
    let (mut v4, mut v6) = (at(2, 0), at(2, 0));
    assert!(v4.follow(Family::V4, &add) && v6.follow(Family::V6, &add));
    assert_eq!(v4.hints, vec!["ip mangle/KUBE-IPTABLES-HINT".to_string()]);
    assert!(v6.hints.is_empty());
    let del = delta(
        4,
        &[ev(DELCHAIN, IPV4, "mangle", Some("KUBE-IPTABLES-HINT"))],
    );
    assert!(v4.follow(Family::V4, &del));
    assert!(v4.hints.is_empty());
}

#[test]
fn a_deleted_table_or_an_impossible_count_asks_for_a_new_read() {
    let d = delta(5, &[ev(DELTABLE, IPV4, "nat", None)]);
    assert!(d.regather);
    assert!(!at(4, 9).follow(Family::V4, &d));
    let d = delta(5, &[ev(DELRULE, IPV4, "nat", Some("X"))]);
    assert!(!at(4, 0).follow(Family::V4, &d), "fewer than no rules");
    assert!(delta(6, &[ev(NEWSETELEM, INET, "masqd", Some("pod4"))]).is_empty());
    let gen = Event::Generation { id: 6, pid: 1 };
    assert!(!TxnDelta::default().take(&gen));
}

fn op(set: &str, add: bool, key: [u8; 4], end: bool) -> ElemOp {
    ElemOp {
        set: set.into(),
        add,
        key: key.to_vec(),
        end,
    }
}

fn cache_of(ranges: &[(u128, u128)]) -> super::super::cache::SetCache {
    use super::super::model::ObservedSet;
    let set = |r: &[(u128, u128)]| ObservedSet {
        family: Some(Family::V4),
        interval: true,
        ranges: Some(
            r.iter()
                .map(|&(start, end)| crate::policy::Range { start, end })
                .collect(),
        ),
        unread: false,
    };
    super::super::cache::SetCache {
        genid: 1,
        sets: [
            ("nomasq4".to_string(), set(ranges)),
            ("pod4".to_string(), set(&[])),
        ]
        .into_iter()
        .collect(),
        followed: true,
    }
}

const A: u128 = 0x0A00_0000; // 10.0.0.0

#[test]
fn someone_elses_element_changes_are_followed_as_a_dump_would_read_them() {
    let mut c = cache_of(&[(A, A + 255), (A + 512, A + 767)]);
    // delete element inet masqd nomasq4 { 10.0.0.0/24 }; add … { 10.0.1.0/24, 10.0.3.0/24 }
    assert!(c.follow(&[
        op("nomasq4", false, [10, 0, 0, 0], false),
        op("nomasq4", false, [10, 0, 1, 0], true),
        op("nomasq4", true, [10, 0, 1, 0], false),
        op("nomasq4", true, [10, 0, 2, 0], true),
        op("nomasq4", true, [10, 0, 3, 0], false),
        op("nomasq4", true, [10, 0, 4, 0], true),
    ]));
    let got: Vec<(u128, u128)> = c.sets["nomasq4"]
        .ranges
        .as_ref()
        .unwrap()
        .iter()
        .map(|r| (r.start, r.end))
        .collect();
    assert_eq!(
        got,
        vec![(A + 256, A + 511), (A + 512, A + 767), (A + 768, A + 1023)],
        "adjacent intervals stay apart, as the kernel keeps them"
    );
    // An interval up to the top of the address space has no end element.
    assert!(c.follow(&[op("pod4", true, [255, 0, 0, 0], false)]));
    assert_eq!(
        c.sets["pod4"].ranges.as_ref().unwrap()[0],
        crate::policy::Range {
            start: 0xFF00_0000,
            end: 0xFFFF_FFFF
        }
    );
}

#[test]
fn element_changes_the_cache_cannot_place_mean_reading_back() {
    let c = cache_of(&[(A, A + 255)]);
    let overlapping = [
        op("nomasq4", true, [10, 0, 0, 128], false),
        op("nomasq4", true, [10, 0, 1, 0], true),
    ];
    assert!(
        !c.clone().follow(&overlapping),
        "the kernel refuses overlaps"
    );
    let missing = [
        op("nomasq4", false, [10, 0, 5, 0], false),
        op("nomasq4", false, [10, 0, 6, 0], true),
    ];
    assert!(!c.clone().follow(&missing), "nothing to delete");
    assert!(
        !c.clone()
            .follow(&[op("nomasq4", true, [10, 0, 6, 0], true)]),
        "end alone"
    );
    assert!(
        !c.clone().follow(&[op("other", true, [10, 0, 6, 0], false)]),
        "no such set"
    );
    let mut short = op("nomasq4", true, [10, 0, 7, 0], false);
    short.key.truncate(2);
    assert!(!c.clone().follow(&[short]), "short key");
}

#[test]
fn one_transaction_is_applied_in_one_pass_and_order_that_would_matter_is_not_guessed() {
    let mut c = cache_of(&[(A, A + 255), (A + 1024, A + 1279)]);
    // Added before, between and after the existing intervals, one deleted: one pass.
    assert!(c.follow(&[
        op("nomasq4", true, [9, 0, 0, 0], false),
        op("nomasq4", true, [9, 0, 1, 0], true),
        op("nomasq4", true, [10, 0, 2, 0], false),
        op("nomasq4", true, [10, 0, 3, 0], true),
        op("nomasq4", false, [10, 0, 4, 0], false),
        op("nomasq4", false, [10, 0, 5, 0], true),
        op("nomasq4", true, [10, 0, 9, 0], false),
        op("nomasq4", true, [10, 0, 10, 0], true),
    ]));
    let starts: Vec<u128> = c.sets["nomasq4"]
        .ranges
        .as_ref()
        .unwrap()
        .iter()
        .map(|r| r.start)
        .collect();
    assert_eq!(starts, vec![0x0900_0000, A, A + 512, A + 2304]);
    // Deleted and added again in one transaction (someone else's refill): not guessed.
    let same = [
        op("nomasq4", false, [10, 0, 2, 0], false),
        op("nomasq4", false, [10, 0, 3, 0], true),
        op("nomasq4", true, [10, 0, 2, 0], false),
        op("nomasq4", true, [10, 0, 3, 0], true),
    ];
    assert!(!c.follow(&same));
}
