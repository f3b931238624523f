//! Root-free tests of the refill of large sets: the size decision, the plan over a set left
//! unread (flush and add every wanted range, in one transaction, nothing else touched), and
//! the batch it becomes. Expectations written by hand.

use rustables::sys;

use super::model::{Change, Observed, ObservedSet};
use super::plan::{plan, refill, refill_at, refill_sets, REFILL_AT, REFILL_AT_ENV};
use super::tests_plan::{in_sync, policy, range};
use super::transaction;
use crate::netlink::split;
use crate::policy::{Family, Range};

/// `n` disjoint /32s from 11.0.0.0, every other address (nothing merges).
fn spread(n: u128) -> Vec<Range> {
    (0..n)
        .map(|i| {
            let a = 0x0b00_0000 + 2 * i;
            Range { start: a, end: a }
        })
        .collect()
}

/// [`in_sync`] with `nomasq4` left unread, as an apply's observation of a large set is.
fn unread_nomasq() -> Observed {
    let mut o = in_sync();
    let t = o.table.as_mut().expect("table");
    t.sets.insert(
        "nomasq4".into(),
        ObservedSet {
            family: Some(Family::V4),
            interval: true,
            ranges: None,
            unread: true,
        },
    );
    o
}

#[test]
fn the_decision_is_by_wanted_size_at_the_threshold() {
    assert!(!refill(0, 100_000));
    assert!(!refill(99_999, 100_000));
    assert!(refill(100_000, 100_000));
    assert!(refill(1_000_000, 100_000));
    // A threshold of 0 replaces every set, even an empty one.
    assert!(refill(0, 0));
    // Measured crossing of a read back and a refill: between 60,000 and 120,000 intervals.
    assert!((60_000..=120_000).contains(&REFILL_AT));
}

#[test]
fn the_threshold_is_the_constant_unless_the_test_variable_says_otherwise() {
    // Tests of this crate never set the variable; the integration test sets it per process.
    if std::env::var_os(REFILL_AT_ENV).is_none() {
        assert_eq!(refill_at(), 100_000);
    }
}

#[test]
fn only_the_large_sets_of_the_policy_are_refilled() {
    let mut p = policy();
    assert!(refill_sets(&p, 50_000).is_empty());
    p.v4.as_mut().expect("v4").nomasq = spread(50_000).into();
    let sets = refill_sets(&p, 50_000);
    assert_eq!(sets.into_iter().collect::<Vec<_>>(), vec!["nomasq4"]);
    // pod4 holds one range: refilled only with a threshold of 1 or 0.
    assert_eq!(refill_sets(&p, 1).len(), 2);
}

#[test]
fn an_unread_set_is_flushed_and_refilled_whole_and_nothing_else_changes() {
    let p = policy();
    let changes = plan(&p, &unread_nomasq());
    assert_eq!(
        changes,
        vec![
            Change::FlushSet("nomasq4".into()),
            Change::AddElements {
                set: "nomasq4".into(),
                family: Family::V4,
                ranges: vec![range("10.96.0.0/12"), range("172.7.0.0/16")],
            },
        ]
    );
    assert_eq!(changes[0].to_string(), "flush set inet masqd nomasq4");
    // The same plan again: a refill is idempotent (it never depends on what was there).
    assert_eq!(plan(&p, &unread_nomasq()), changes);
}

#[test]
fn an_unread_set_that_must_become_empty_is_only_flushed() {
    let mut p = policy();
    p.v4.as_mut().expect("v4").nomasq = Vec::new().into();
    assert_eq!(
        plan(&p, &unread_nomasq()),
        vec![Change::FlushSet("nomasq4".into())]
    );
}

#[test]
fn an_unread_set_of_the_wrong_shape_is_recreated_not_flushed() {
    let p = policy();
    let mut o = unread_nomasq();
    let t = o.table.as_mut().expect("table");
    t.sets.get_mut("nomasq4").expect("set").family = Some(Family::V6);
    let changes = plan(&p, &o);
    assert!(!changes.iter().any(|c| matches!(c, Change::FlushSet(_))));
    assert!(changes.contains(&Change::DeleteSet("nomasq4".into())));
    assert!(changes.contains(&Change::AddSet {
        name: "nomasq4".into(),
        family: Family::V4,
    }));
}

#[test]
fn the_flush_precedes_the_refill_in_the_one_batch() {
    let p = policy();
    let (bytes, what) = transaction(&plan(&p, &unread_nomasq()), Some(7)).finish();
    let msgs = split(&bytes).expect("a well-formed batch");
    let kind = |k: u32| ((sys::NFNL_SUBSYS_NFTABLES as u16) << 8) | k as u16;
    let kinds: Vec<u16> = msgs.iter().map(|m| m.kind).collect();
    // BATCH_BEGIN, flush (DELSETELEM), add (NEWSETELEM), BATCH_END: one transaction.
    assert_eq!(kinds.len(), 4, "{what:?}");
    assert_eq!(kinds[1], kind(sys::NFT_MSG_DELSETELEM));
    assert_eq!(kinds[2], kind(sys::NFT_MSG_NEWSETELEM));
    assert_eq!(what[0], "flush set inet masqd nomasq4");
}

#[test]
fn the_set_cache_shares_the_policy_ranges_instead_of_copying_them() {
    let mut p = policy();
    p.v4.as_mut().expect("v4").nomasq = spread(1_000).into();
    let cache = super::SetCache::after(&p, 9);
    let cached = cache.sets["nomasq4"].ranges.as_ref().expect("ranges");
    let fp = p.v4.as_ref().expect("v4");
    assert!(std::sync::Arc::ptr_eq(cached, &fp.nomasq), "a copy");
    assert_eq!(cached.len(), 1_000);
    // A clone of the policy (each reconcile of the daemon takes one) shares them too.
    let q = p.clone();
    assert!(std::sync::Arc::ptr_eq(
        &q.v4.as_ref().expect("v4").nomasq,
        &fp.nomasq
    ));
}
