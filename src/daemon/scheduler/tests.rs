//! The scheduler against a fake clock: a fixed base instant plus offsets.

use super::*;

const PERIOD: Duration = Duration::from_secs(60);

/// A fake clock: `t(ms)` is `ms` milliseconds after a fixed base.
struct Clock(Instant);

impl Clock {
    fn new() -> Clock {
        Clock(Instant::now())
    }
    fn t(&self, ms: u64) -> Instant {
        self.0 + Duration::from_millis(ms)
    }
}

fn applied(changed: bool, touches_own: bool) -> Outcome {
    Outcome::Applied {
        changed,
        touches_own,
        missed_events: false,
    }
}

/// Starts the owed reconcile at `now` and ends it there with `outcome`.
fn cycle(s: &mut Scheduler, now: Instant, outcome: Outcome) -> (Start, Ended) {
    let st = s.start(now).expect("a reconcile is owed and due");
    (st, s.ended(now, outcome))
}

/// A scheduler past its first successful reconcile.
fn ready(c: &Clock) -> Scheduler {
    let mut s = Scheduler::new(c.t(0), PERIOD);
    let (st, e) = cycle(&mut s, c.t(0), applied(true, true));
    assert_eq!(st.trigger, Trigger::Start);
    assert!(e.became_ready && !e.repair);
    s
}

#[test]
fn a_burst_of_triggers_is_one_reconcile_under_the_first_reason() {
    let c = Clock::new();
    let mut s = ready(&c);
    assert_eq!(s.next_start(), None, "idle: nothing owed");
    s.trigger(Trigger::NetlinkEvent);
    for _ in 0..100 {
        s.trigger(Trigger::NetlinkEvent);
        s.trigger(Trigger::Resync);
    }
    let st = s.start(c.t(10)).unwrap();
    assert_eq!(st.trigger, Trigger::NetlinkEvent);
    assert_eq!(s.start(c.t(10)), None, "one at a time");
    // Triggers while it runs: one more reconcile follows, not one per trigger.
    s.trigger(Trigger::NetlinkEvent);
    s.trigger(Trigger::MonitorOverflow);
    assert_eq!(s.next_start(), None, "nothing starts while one runs");
    s.ended(c.t(20), applied(false, false));
    assert_eq!(s.next_start(), Some(c.t(0)), "due at once");
    assert_eq!(s.start(c.t(20)).unwrap().trigger, Trigger::NetlinkEvent);
    s.ended(c.t(30), applied(false, false));
    assert_eq!(s.start(c.t(30)), None, "the burst is covered");
}

#[test]
fn backoff_doubles_from_100_ms_and_stops_at_5_s() {
    let waits: Vec<u128> = (1..=9).map(|n| backoff(n).as_millis()).collect();
    assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
    assert_eq!(backoff(u32::MAX), Duration::from_secs(5));
}

#[test]
fn failures_back_off_and_a_success_resets_the_count() {
    let c = Clock::new();
    let mut s = Scheduler::new(c.t(0), PERIOD);
    let mut now = 0;
    for (attempt, wait) in [(1, 100), (2, 200), (3, 400)] {
        let (st, e) = cycle(&mut s, c.t(now), Outcome::Failed);
        assert_eq!(st.trigger, Trigger::Start, "retried under its own reason");
        assert_eq!(e.retry, Some((attempt, Duration::from_millis(wait))));
        assert!(!e.became_ready);
        assert_eq!(s.next_start(), Some(c.t(now + wait)));
        assert_eq!(s.start(c.t(now + wait - 1)), None, "not before the backoff");
        now += wait;
    }
    let (_, e) = cycle(&mut s, c.t(now), applied(true, true));
    assert!(e.became_ready && e.retry.is_none(), "recovered");
    s.trigger(Trigger::NetlinkEvent);
    let (_, e) = cycle(&mut s, c.t(now + 1), Outcome::Failed);
    assert_eq!(
        e.retry,
        Some((1, Duration::from_millis(100))),
        "the count starts again after a success"
    );
}

#[test]
fn ready_only_after_the_first_successful_reconcile() {
    let c = Clock::new();
    let mut s = Scheduler::new(c.t(0), PERIOD);
    assert!(!s.ready());
    let (_, e) = cycle(&mut s, c.t(0), Outcome::Failed);
    assert!(!e.became_ready && !s.ready(), "a failure is not ready");
    let (_, e) = cycle(&mut s, c.t(100), applied(false, false));
    assert!(e.became_ready && s.ready(), "in sync counts as success");
    assert!(!e.repair, "the start-up reconcile is not a repair");
    s.trigger(Trigger::NetlinkEvent);
    let (_, e) = cycle(&mut s, c.t(200), applied(true, true));
    assert!(!e.became_ready, "READY=1 once");
    assert!(e.repair);
    assert_eq!(s.repairs(), 1);
}

#[test]
fn a_sighup_before_ready_announces_no_reload() {
    let c = Clock::new();
    let mut s = Scheduler::new(c.t(0), PERIOD);
    assert!(!s.reload_requested(), "no RELOADING=1 during start-up");
    s.trigger(Trigger::Reload);
    let (st, e) = cycle(&mut s, c.t(0), applied(true, true));
    assert_eq!(st.trigger, Trigger::Start);
    assert!(!st.ends_reload && !e.ends_reload);
    assert!(e.became_ready);
}

#[test]
fn reload_ready_after_the_reconcile_that_started_after_it() {
    let c = Clock::new();
    let mut s = ready(&c);
    s.trigger(Trigger::NetlinkEvent);
    let old = s.start(c.t(10)).unwrap();
    assert!(!old.ends_reload);
    // SIGHUP while a reconcile with the old configuration runs.
    assert!(s.reload_requested(), "RELOADING=1");
    s.config_changed(c.t(15));
    s.trigger(Trigger::Reload);
    let e = s.ended(c.t(20), applied(true, true));
    assert!(
        !e.ends_reload,
        "the reconcile already running does not end the reload"
    );
    let st = s.start(c.t(20)).unwrap();
    assert_eq!(st.trigger, Trigger::ConfigChanged);
    assert!(st.ends_reload);
    let e = s.ended(c.t(30), Outcome::Failed);
    assert!(e.ends_reload, "READY=1 follows whatever the outcome");
    let (st, e) = cycle(&mut s, c.t(130), applied(true, true));
    assert_eq!(st.trigger, Trigger::ConfigChanged, "still a config change");
    assert!(
        !e.ends_reload && !e.repair,
        "a config change is not a repair"
    );
}

#[test]
fn a_dead_reconcile_task_is_retried_and_still_ends_the_reload() {
    let c = Clock::new();
    let mut s = ready(&c);
    assert!(s.reload_requested());
    s.trigger(Trigger::Reload);
    assert!(s.start(c.t(10)).unwrap().ends_reload);
    s.crashed();
    assert!(!s.running());
    let st = s.start(c.t(10)).unwrap();
    assert_eq!(st.trigger, Trigger::Retry);
    assert!(st.ends_reload, "the reload still owes its READY=1");
}

#[test]
fn repairs_of_own_objects_are_rate_limited_and_warned_once() {
    let c = Clock::new();
    let mut s = ready(&c);
    let mut warnings = Vec::new();
    // One repair every 100 ms: the 20th within 10 s crosses the limit.
    for i in 1..=25u64 {
        s.trigger(Trigger::NetlinkEvent);
        let now = c.t(i * 100);
        let st = s.start(now);
        let Some(_) = st else {
            // Rate-limited: the next one waits a second after the last repair.
            assert!(i > 20);
            assert_eq!(s.next_start(), Some(c.t(2000 + 1000)));
            break;
        };
        let e = s.ended(now, applied(true, true));
        assert!(e.repair);
        warnings.extend(e.rate_limit_warning.map(|n| (i, n)));
        if i < REPAIR_BURST as u64 {
            assert_eq!(s.next_start(), None, "below the limit: no wait");
        }
    }
    assert_eq!(
        warnings,
        [(20, 20)],
        "warned once, when the limit is crossed"
    );
    assert_eq!(s.repairs(), 20);
}

#[test]
fn the_repair_window_slides() {
    let c = Clock::new();
    let mut s = ready(&c);
    // 19 repairs, then a pause longer than the window: the next ones are not limited.
    for i in 1..=19u64 {
        s.trigger(Trigger::NetlinkEvent);
        let e = cycle(&mut s, c.t(i * 10), applied(true, true)).1;
        assert_eq!(e.rate_limit_warning, None);
    }
    let later = 190 + REPAIR_WINDOW.as_millis() as u64 + 1;
    for i in 0..19u64 {
        s.trigger(Trigger::NetlinkEvent);
        let e = cycle(&mut s, c.t(later + i), applied(true, true)).1;
        assert_eq!(
            e.rate_limit_warning, None,
            "the old repairs left the window"
        );
        assert_eq!(s.next_start(), None);
    }
}

#[test]
fn removing_a_re_added_default_rule_is_never_rate_limited() {
    let c = Clock::new();
    let mut s = ready(&c);
    for i in 1..=100u64 {
        s.trigger(Trigger::NetlinkEvent);
        let (_, e) = cycle(&mut s, c.t(i), applied(true, false));
        assert!(e.repair, "still counted as a repair in STATUS");
        assert_eq!(e.rate_limit_warning, None);
        assert_eq!(s.start(c.t(i)), None, "nothing owed");
    }
    assert_eq!(s.repairs(), 100);
    // And they do not fill the window for the repairs that are limited.
    for i in 1..REPAIR_BURST as u64 {
        s.trigger(Trigger::NetlinkEvent);
        let e = cycle(&mut s, c.t(100 + i), applied(true, true)).1;
        assert_eq!(e.rate_limit_warning, None);
    }
}

#[test]
fn in_sync_reconciles_are_no_repairs() {
    let c = Clock::new();
    let mut s = ready(&c);
    for i in 1..=50u64 {
        s.trigger(Trigger::Resync);
        let e = cycle(&mut s, c.t(i), applied(false, false)).1;
        assert!(!e.repair && e.rate_limit_warning.is_none());
    }
    assert_eq!(s.repairs(), 0);
}

#[test]
fn a_config_change_skips_the_backoff() {
    let c = Clock::new();
    let mut s = ready(&c);
    s.trigger(Trigger::NetlinkEvent);
    cycle(&mut s, c.t(0), Outcome::Failed);
    cycle(&mut s, c.t(100), Outcome::Failed);
    assert_eq!(s.next_start(), Some(c.t(300)));
    s.config_changed(c.t(150));
    assert_eq!(s.start(c.t(150)).unwrap().trigger, Trigger::ConfigChanged);
}

#[test]
fn missed_events_owe_one_more_reconcile() {
    let c = Clock::new();
    let mut s = ready(&c);
    s.trigger(Trigger::NetlinkEvent);
    s.start(c.t(1)).unwrap();
    s.ended(
        c.t(2),
        Outcome::Applied {
            changed: true,
            touches_own: true,
            missed_events: true,
        },
    );
    assert_eq!(s.start(c.t(2)).unwrap().trigger, Trigger::MissedEvents);
}

#[test]
fn the_resync_deadline_follows_the_period() {
    let c = Clock::new();
    let mut s = Scheduler::new(c.t(0), PERIOD);
    assert_eq!(s.resync_at(), c.t(60_000));
    // Legacy xtables in use keep the slow resync: their changes are watched.
    assert_eq!(resync_period(None, true), PERIOD);
    // A period that changes after the first reconcile: 5 s from its end.
    let five = resync_period(Some(Duration::from_secs(5)), true);
    cycle(&mut s, c.t(300), applied(true, true));
    s.set_resync_period(c.t(300), five);
    assert_eq!(s.resync_at(), c.t(5_300));
    // Another reconcile with the same period keeps the deadline.
    s.trigger(Trigger::NetlinkEvent);
    cycle(&mut s, c.t(1_000), applied(true, true));
    s.set_resync_period(c.t(1_000), five);
    assert_eq!(s.resync_at(), c.t(5_300));
    // On time: the next is one period after the deadline; late: one period after now.
    s.resync_due(c.t(5_301));
    assert_eq!(s.resync_at(), c.t(10_300));
    s.resync_due(c.t(12_000));
    assert_eq!(s.resync_at(), c.t(17_000));
    assert_eq!(s.start(c.t(12_000)).unwrap().trigger, Trigger::Resync);
    // A configured interval wins over the backend's default.
    let p = resync_period(Some(Duration::from_secs(2)), true);
    s.ended(c.t(12_100), applied(false, false));
    s.set_resync_period(c.t(12_100), p);
    assert_eq!(s.resync_at(), c.t(14_100));
    assert_eq!(resync_period(None, false), PERIOD);
}

#[test]
fn memory_is_trimmed_a_second_after_the_last_reconcile() {
    let c = Clock::new();
    let mut s = Scheduler::new(c.t(0), PERIOD);
    assert_eq!(s.trim_at(), None, "nothing to give back yet");
    cycle(&mut s, c.t(0), applied(true, true));
    assert_eq!(s.trim_at(), Some(c.t(1_000)));
    s.trigger(Trigger::NetlinkEvent);
    s.start(c.t(1_000)).unwrap();
    assert!(!s.trim(c.t(1_000)), "busy: later");
    assert_eq!(s.trim_at(), Some(c.t(2_000)));
    s.ended(c.t(1_500), applied(false, false));
    assert_eq!(s.trim_at(), Some(c.t(2_500)), "a burst keeps its pages");
    assert!(!s.trim(c.t(2_499)));
    assert!(s.trim(c.t(2_500)));
    assert_eq!(s.trim_at(), None, "once");
}

#[test]
fn a_failed_reload_reconcile_keeps_its_reason_when_other_triggers_wait() {
    let c = Clock::new();
    let mut s = ready(&c);
    s.config_changed(c.t(0));
    s.start(c.t(0)).unwrap();
    s.trigger(Trigger::NetlinkEvent);
    let e = s.ended(c.t(1), Outcome::Failed);
    assert!(e.retry.is_some());
    // The trigger that arrived while it ran is the one owed (as before the refactor: the
    // failed reason does not replace it).
    assert_eq!(s.start(c.t(200)).unwrap().trigger, Trigger::NetlinkEvent);
}

#[test]
fn a_full_verification_reads_everything_whatever_it_coalesces_with() {
    let c = Clock::new();
    let mut s = ready(&c);
    assert_eq!(s.full_verify_at(), None, "off unless configured");
    s.full_verify_due(c.t(0));
    assert!(s.start(c.t(0)).is_none(), "off: nothing owed");
    let hour = Duration::from_secs(3600);
    s.set_full_verify_period(c.t(10), Some(hour));
    assert_eq!(s.full_verify_at(), Some(c.t(10) + hour));
    s.set_full_verify_period(c.t(500), Some(hour));
    assert_eq!(
        s.full_verify_at(),
        Some(c.t(10) + hour),
        "same period, same deadline"
    );
    // Another trigger is owed already: the verification rides along, and reads everything.
    s.trigger(Trigger::NetlinkEvent);
    s.full_verify_due(c.t(10) + hour);
    let st = s.start(c.t(10) + hour).unwrap();
    assert_eq!((st.trigger, st.full), (Trigger::NetlinkEvent, true));
    s.ended(c.t(20) + hour, applied(false, false));
    assert_eq!(s.full_verify_at(), Some(c.t(10) + hour + hour));
    s.trigger(Trigger::Resync);
    assert!(
        !s.start(c.t(30) + hour).unwrap().full,
        "a plain resync trusts the mirror"
    );
    s.set_full_verify_period(c.t(40) + hour, None);
    assert_eq!(s.full_verify_at(), None);
}
