//! The followed state against recorded notification streams.

use super::*;

// linux/netfilter.h and linux/netfilter/nf_tables.h, written out as an independent source.
const INET: u8 = 1;
const IPV4: u8 = 2;
const NEWRULE: u16 = 6;
const DELRULE: u16 = 8;
const NEWSETELEM: u16 = 12;
const DELSETELEM: u16 = 14;
const OWN: u32 = 7;
const OTHER: u32 = 99;

fn ev(kind: u16, family: u8, table: &str, name: &str, pid: u32) -> Event {
    Event::Change {
        kind,
        family,
        pid,
        table: Some(table.into()),
        name: Some(name.into()),
    }
}

fn gen(id: u32) -> Event {
    Event::Generation { id, pid: OTHER }
}

#[test]
fn transactions_get_their_generation_even_across_batches() {
    let mut f = Follow::default();
    f.take_in(&[ev(NEWRULE, IPV4, "nat", "KUBE-A", OTHER)], OWN);
    f.take_in(
        &[
            ev(NEWRULE, IPV4, "nat", "KUBE-B", OTHER),
            gen(21),
            ev(DELRULE, IPV4, "nat", "KUBE-A", OTHER),
            gen(22),
            ev(NEWSETELEM, INET, "masqd", "nomasq4", OWN),
            gen(23),
            ev(NEWRULE, IPV4, "nat", "KUBE-C", OTHER),
        ],
        OWN,
    );
    let s = f.starting();
    let d = s.deltas.expect("followed");
    let got: Vec<(u32, [i64; 2])> = d.iter().map(|d| (d.gen, d.rules)).collect();
    assert_eq!(
        got,
        vec![(21, [2, 0]), (22, [-1, 0])],
        "23 changed no facts"
    );
    assert!(s.trust_sets, "only masqd itself wrote its set");
    f.take_in(&[gen(24)], OWN);
    let d = f.starting().deltas.unwrap();
    assert_eq!(
        (d.len(), d[0].gen, d[0].rules),
        (1, 24, [1, 0]),
        "KUBE-C in 24"
    );
}

#[test]
fn someone_else_writing_masqds_set_ends_the_trust() {
    let mut f = Follow::default();
    f.take_in(
        &[ev(DELSETELEM, INET, "masqd", "nomasq4", OTHER), gen(5)],
        OWN,
    );
    assert!(!f.starting().trust_sets);
    assert!(
        f.starting().trust_sets,
        "the next reconcile read the sets again"
    );
    // During a reconcile: its cache is not kept.
    f.take_in(&[ev(NEWSETELEM, INET, "masqd", "pod4", OTHER), gen(6)], OWN);
    assert!(!f.ended());
    assert!(!f.starting().trust_sets);
    assert!(f.ended());
    // masqd's rules by someone else do not concern the sets.
    f.take_in(
        &[ev(DELRULE, INET, "masqd", "postrouting", OTHER), gen(7)],
        OWN,
    );
    assert!(f.starting().trust_sets);
}

#[test]
fn lost_notifications_or_a_long_backlog_mean_reading_again() {
    let mut f = Follow::default();
    f.take_in(&[ev(NEWRULE, IPV4, "nat", "K", OTHER), Event::Overrun], OWN);
    let s = f.starting();
    assert_eq!((s.trust_sets, s.deltas), (false, None));
    for g in 0..(MAX_READY as u32 + 1) {
        f.take_in(&[ev(NEWRULE, IPV4, "nat", "K", OTHER), gen(10 + g)], OWN);
    }
    assert_eq!(f.starting().deltas, None);
    assert_eq!(f.starting().deltas, Some(Vec::new()));
}

#[test]
fn the_other_nat_rules_are_read_again_only_after_rules_moved() {
    let mut f = Follow::default();
    assert!(!f.overridden_stale(), "read at start-up");
    f.take_in(
        &[ev(NEWSETELEM, INET, "masqd", "nomasq4", OWN), gen(2)],
        OWN,
    );
    assert!(!f.overridden_stale(), "elements are not rules");
    f.take_in(
        &[ev(NEWRULE, IPV4, "nat", "KUBE-POSTROUTING", OTHER), gen(3)],
        OWN,
    );
    assert!(f.overridden_stale());
    f.starting();
    assert!(
        f.overridden_stale(),
        "a reconcile that did not read them leaves them stale"
    );
    f.overridden_read();
    assert!(!f.overridden_stale());
    f.take_in(&[Event::Overrun], OWN);
    assert!(
        f.overridden_stale(),
        "lost notifications: anything may have changed"
    );
}
