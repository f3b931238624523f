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
        table: Some(table.into()),
        name: name.map(str::to_string),
    }
}

fn delta(gen: u32, events: &[Event]) -> FactsDelta {
    let mut d = FactsDelta::default();
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
    assert!(!FactsDelta::default().take(&gen));
}
