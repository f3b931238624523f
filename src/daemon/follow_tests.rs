//! The followed state against recorded notification streams. Each change carries the low 16
//! bits of its generation (`nfgenmsg.res_id`), as the kernel sends it, and each transaction
//! ends with its `NEWGEN`.

use super::*;

// linux/netfilter.h and linux/netfilter/nf_tables.h, written out as an independent source.
const INET: u8 = 1;
const IPV4: u8 = 2;
const NEWRULE: u16 = 6;
const DELRULE: u16 = 8;
const DELSET: u16 = 11;
const OWN: u32 = 7;
const OTHER: u32 = 99;

/// A change of generation `gen`.
fn ev(gen: u32, kind: u16, family: u8, table: &str, name: &str, pid: u32) -> Event {
    Event::Change {
        kind,
        family,
        pid,
        res_id: gen as u16,
        table: Some(table.into()),
        name: Some(name.into()),
    }
}

/// Element changes of generation `gen` to masqd's set `set`.
fn elems(gen: u32, add: bool, set: &str, pid: u32, keys: &[([u8; 4], bool)]) -> Event {
    Event::Elements {
        add,
        family: INET,
        pid,
        res_id: gen as u16,
        table: Some("masqd".into()),
        set: Some(set.into()),
        elements: keys.iter().map(|(k, end)| (k.to_vec(), *end)).collect(),
    }
}

fn gen(id: u32) -> Event {
    Event::Generation { id, pid: OTHER }
}

#[test]
fn transactions_get_their_generation_even_across_batches() {
    let mut f = Follow::default();
    f.take_in(&[ev(21, NEWRULE, IPV4, "nat", "KUBE-A", OTHER)], OWN);
    f.take_in(
        &[
            ev(21, NEWRULE, IPV4, "nat", "KUBE-B", OTHER),
            gen(21),
            ev(22, DELRULE, IPV4, "nat", "KUBE-A", OTHER),
            gen(22),
            elems(23, true, "nomasq4", OWN, &[([10, 9, 0, 0], false)]),
            gen(23),
            ev(24, NEWRULE, IPV4, "nat", "KUBE-C", OTHER),
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
fn someone_elses_elements_are_followed_and_their_table_or_sets_end_the_trust() {
    let mut f = Follow::default();
    // One interval deleted from nomasq4 by someone else: start and end, one per message. The
    // reconcile it asks for waits for the transaction's NEWGEN.
    let first = f.take_in(
        &[elems(5, false, "nomasq4", OTHER, &[([10, 0, 0, 0], false)])],
        OWN,
    );
    assert!(!first && f.elements_pending(), "held until the NEWGEN");
    let closed = f.take_in(
        &[
            elems(5, false, "nomasq4", OTHER, &[([10, 0, 1, 0], true)]),
            gen(5),
            // masqd's own commit: already in the cache it made.
            elems(6, true, "nomasq4", OWN, &[([10, 0, 0, 0], false)]),
            gen(6),
        ],
        OWN,
    );
    assert!(closed && !f.elements_pending(), "now the repair is owed");
    let s = f.starting();
    assert!(
        s.trust_sets,
        "elements are followed, not a reason to read back"
    );
    let d = s.deltas.unwrap();
    assert_eq!((d.len(), d[0].gen), (1, 5));
    assert_eq!(
        d[0].elements
            .iter()
            .map(|o| (o.set.as_str(), o.add, o.key.clone(), o.end))
            .collect::<Vec<_>>(),
        vec![
            ("nomasq4", false, vec![10, 0, 0, 0], false),
            ("nomasq4", false, vec![10, 0, 1, 0], true)
        ]
    );
    // A set deleted and created again by someone else: not followed.
    f.take_in(&[ev(7, DELSET, INET, "masqd", "pod4", OTHER), gen(7)], OWN);
    assert!(!f.ended(), "during a reconcile: its cache is not kept");
    assert!(!f.starting().trust_sets);
    assert!(f.ended());
    // masqd's rules by someone else do not concern the sets.
    f.take_in(
        &[ev(8, DELRULE, INET, "masqd", "postrouting", OTHER), gen(8)],
        OWN,
    );
    assert!(f.starting().trust_sets);
}

#[test]
fn lost_notifications_or_a_long_backlog_mean_reading_again() {
    let mut f = Follow::default();
    f.take_in(
        &[ev(3, NEWRULE, IPV4, "nat", "K", OTHER), Event::Overrun],
        OWN,
    );
    let s = f.starting();
    assert_eq!((s.trust_sets, s.deltas), (false, None));
    for g in 0..(MAX_READY as u32 + 1) {
        f.take_in(
            &[ev(10 + g, NEWRULE, IPV4, "nat", "K", OTHER), gen(10 + g)],
            OWN,
        );
    }
    let s = f.starting();
    assert_eq!(
        (s.trust_sets, s.deltas),
        (false, None),
        "the backlog overflowed"
    );
    assert_eq!(f.starting().deltas, Some(Vec::new()));
}

#[test]
fn a_transaction_whose_newgen_was_lost_is_not_placed_in_the_next_one() {
    let mut f = Follow::default();
    // The head of transaction 40 was read, its tail and NEWGEN lost (muted around a commit
    // of masqd's), then transaction 41 arrives whole.
    f.take_in(
        &[elems(
            40,
            false,
            "nomasq4",
            OTHER,
            &[([10, 0, 0, 0], false)],
        )],
        OWN,
    );
    f.take_in(&[ev(41, NEWRULE, IPV4, "nat", "K", OTHER), gen(41)], OWN);
    let s = f.starting();
    assert_eq!(
        (s.trust_sets, s.deltas),
        (false, None),
        "read everything again"
    );
    // A NEWGEN that is not the one of the changes read before it.
    f.take_in(&[ev(50, NEWRULE, IPV4, "nat", "K", OTHER), gen(51)], OWN);
    assert_eq!(f.starting().deltas, None);
    // A failed read of the socket is the same.
    f.lost();
    assert!(!f.starting().trust_sets);
}

#[test]
fn a_bulk_load_into_masqds_set_is_read_back_not_replayed() {
    let mut f = Follow::default();
    let many: Vec<([u8; 4], bool)> = (0..MAX_OPS as u32 + 2)
        .map(|i| ((0x0B00_0000 + i * 2).to_be_bytes(), i % 2 == 1))
        .collect();
    f.take_in(&[elems(9, true, "nomasq4", OTHER, &many), gen(9)], OWN);
    let s = f.starting();
    assert!(!s.trust_sets);
    assert_eq!(s.deltas, Some(Vec::new()), "nothing kept of it");
}

#[test]
fn the_other_nat_rules_are_read_again_only_after_rules_moved() {
    let mut f = Follow::default();
    assert!(!f.overridden_stale(), "read at start-up");
    f.take_in(
        &[
            elems(2, true, "nomasq4", OTHER, &[([10, 9, 0, 0], false)]),
            gen(2),
        ],
        OWN,
    );
    assert!(!f.overridden_stale(), "elements are not rules");
    f.take_in(
        &[
            ev(3, NEWRULE, IPV4, "nat", "KUBE-POSTROUTING", OTHER),
            gen(3),
        ],
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
