//! The engine over the in-memory driver: no root, no socket, no network namespace.

use std::path::Path;
use std::sync::{Arc, Mutex};

use super::detection::guard_text;
use super::*;
use crate::backend::fake::FakeDriver;
use crate::backend::{is_generation_change, ForeignRule, Slot, RESTART_ATTEMPTS};
use crate::detect::Facts;

const CFG: &str = "[node]\npod_cidrs = [\"172.7.21.0/24\"]\n[masquerade]\n\
                   cluster_cidrs = [\"172.7.0.0/16\"]\n\
                   nonmasquerade_cidrs = [\"10.200.0.0/24\"]\n\
                   bridge_interfaces = [\"docker0\"]\n";

/// The table the policy of [`CFG`] makes, written out by hand from design.md §3.1.
const WANT: &str = "table inet masqd {\n  set nomasq4 { 10.200.0.0/24, 172.7.0.0/16 }\n  \
                    set pod4 { 172.7.21.0/24 }\n  chain postrouting {\n    \
                    masqd:bridge:docker0 # handle 1\n    \
                    masqd:mark:0x4000/0x4000 # handle 2\n    masqd:guard:4 # handle 3\n    \
                    masqd:masquerade:4 # handle 4\n  }\n}\n";

/// A state directory of its own, removed afterwards.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new() -> Scratch {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let d = std::env::temp_dir().join(format!("masqd-engine-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        Scratch(d)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn policy() -> Policy {
    let c = config::parse(Path::new("/etc/masqd/masqd.toml"), CFG).expect("test config");
    Policy::from_config(&c)
}

fn family_detection(backend: Backend) -> FamilyDetection {
    FamilyDetection {
        backend,
        reason: "test".into(),
        guard: guard_text(backend, true),
        facts: Facts::default(),
    }
}

fn detection(v4: Backend) -> Detection {
    Detection {
        ipv4: family_detection(v4),
        ipv6: family_detection(Backend::Nft),
    }
}

fn nft_only(fake: &FakeDriver, policy: &Policy) -> DriverSet<'static> {
    DriverSet::new(vec![Slot {
        driver: Box::new(fake.clone()),
        policy: policy.clone(),
    }])
}

fn docker_rule() -> ForeignRule {
    ForeignRule {
        table_family: Family::V4,
        table: "nat".into(),
        chain: "POSTROUTING".into(),
        handle: 90,
        saddr: "172.7.21.0/24".parse().expect("cidr"),
        oif_neq: Some("docker0".into()),
        expressions: Vec::new(),
        userdata: None,
    }
}

fn apply_fake(fake: &FakeDriver, dir: &Path) -> Result<Plan> {
    let p = policy();
    apply_drivers(&mut nft_only(fake, &p), dir, &detection(Backend::Nft), None)
}

#[test]
fn first_apply_creates_everything() {
    let dir = Scratch::new();
    let fake = FakeDriver::default();
    let p = apply_fake(&fake, dir.path()).expect("apply");
    assert!(!p.is_empty());
    assert!(p.touches_own());
    assert_eq!(fake.dump(), WANT);
    assert_eq!(fake.with(|s| s.log.len()), 1, "one transaction");
}

#[test]
fn second_plan_is_empty() {
    let dir = Scratch::new();
    let fake = FakeDriver::default();
    apply_fake(&fake, dir.path()).expect("first");
    let again = apply_fake(&fake, dir.path()).expect("second");
    assert!(again.is_empty(), "{:?}", again.nft_changes());
    assert_eq!(again.len(), 0);
    assert_eq!(
        fake.with(|s| s.log.len()),
        1,
        "nothing committed the second time"
    );
}

#[test]
fn drift_is_repaired() {
    let dir = Scratch::new();
    let fake = FakeDriver::default();
    apply_fake(&fake, dir.path()).expect("first");
    fake.with(|s| {
        let t = s.table.as_mut().expect("table");
        t.sets.get_mut("nomasq4").expect("set").ranges = Some(Vec::new().into());
    });
    let p = apply_fake(&fake, dir.path()).expect("repair");
    assert_eq!(p.len(), 1, "{:?}", p.nft_changes());
    assert!(p.nft_changes()[0]
        .summary()
        .starts_with("add element inet masqd nomasq4 (2 intervals)"));
    assert_eq!(fake.dump(), WANT);
}

#[test]
fn a_default_rule_is_recorded_before_it_is_removed() {
    let dir = Scratch::new();
    let fake = FakeDriver::default();
    fake.with(|s| {
        s.foreign.push(docker_rule());
        s.fail_next = Some("kernel said no".into());
    });
    let e = apply_fake(&fake, dir.path()).expect_err("the commit fails");
    assert!(format!("{e:#}").contains("kernel said no"), "{e:#}");
    // The record is there although nothing was removed.
    let recs = State::new(dir.path()).load().expect("records");
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].backend.known(), Some(Backend::Nft));
    assert_eq!(recs[0].family.known(), Some(Family::V4));
    assert_eq!(recs[0].saddr, "172.7.21.0/24");
    assert_eq!(fake.with(|s| s.foreign.len()), 1);
    // Next time the rule goes; the record stays for teardown, once.
    apply_fake(&fake, dir.path()).expect("second");
    assert!(fake.with(|s| s.foreign.is_empty()));
    assert_eq!(State::new(dir.path()).load().expect("records").len(), 1);
}

#[test]
fn a_failing_apply_leaves_the_fake_unchanged_and_drops_the_cache() {
    let dir = Scratch::new();
    let fake = FakeDriver::default();
    apply_fake(&fake, dir.path()).expect("first");
    let before = fake.dump();
    fake.with(|s| {
        s.table.as_mut().expect("table").sets.remove("pod4");
        s.fail_next = Some("ENOMEM".into());
    });
    let drifted = fake.dump();
    assert_ne!(before, drifted);
    let e = apply_fake(&fake, dir.path()).expect_err("fails");
    assert!(
        format!("{e:#}").starts_with("applying the nftables changes"),
        "{e:#}"
    );
    assert_eq!(fake.dump(), drifted, "all or nothing");
    assert_eq!(fake.with(|s| s.forgotten), 1, "caches dropped");
}

#[test]
fn a_generation_change_is_planned_again() {
    let dir = Scratch::new();
    let fake = FakeDriver::default();
    fake.with(|s| s.restart_next = 2);
    apply_fake(&fake, dir.path()).expect("third attempt commits");
    assert_eq!(fake.with(|s| (s.restart_next, s.log.len())), (0, 1));
    assert_eq!(fake.dump(), WANT);
}

#[test]
fn generation_change_retries_give_up_at_the_limit() {
    let dir = Scratch::new();
    let fake = FakeDriver::default();
    fake.with(|s| s.restart_next = 100);
    let e = apply_fake(&fake, dir.path()).expect_err("gives up");
    assert!(is_generation_change(&e), "{e:#}");
    assert_eq!(fake.with(|s| s.restart_next), 100 - RESTART_ATTEMPTS);
    assert!(fake.with(|s| s.table.is_none()));
}

#[test]
fn teardown_puts_records_back_then_removes_own_objects() {
    let dir = Scratch::new();
    let fake = FakeDriver::default();
    fake.with(|s| s.foreign.push(docker_rule()));
    apply_fake(&fake, dir.path()).expect("apply");
    assert!(fake.with(|s| s.foreign.is_empty() && s.table.is_some()));
    let state = State::new(dir.path());
    let mut d = fake.clone();
    let r = teardown_with(&state, &mut [&mut d]).expect("teardown");
    assert_eq!(r.restored.len(), 1);
    assert_eq!(r.removed, vec!["table inet masqd".to_string()]);
    assert!(!r.no_record);
    let (back, table, log) = fake.with(|s| (s.foreign.clone(), s.table.is_some(), s.log.clone()));
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].saddr, docker_rule().saddr);
    assert!(!table);
    assert_eq!(
        log.last().map(String::as_str),
        Some("delete table inet masqd")
    );
    assert!(state.load().expect("records").is_empty(), "records dropped");
}

#[test]
fn teardown_keeps_a_record_of_an_unknown_backend() {
    let dir = Scratch::new();
    let state = State::new(dir.path());
    let fake = FakeDriver::default();
    let changes = Changes::Nft(vec![Change::RemoveDefaultRule(docker_rule())]);
    let mut rec = fake.records(&changes).pop().expect("a record");
    rec.backend = "xt".into();
    state.store(&[rec]).expect("store");
    fake.with(|s| s.table = Some(Default::default()));
    let mut d = fake.clone();
    let e = teardown_with(&state, &mut [&mut d]).expect_err("refused");
    let msg = format!("{e:#}");
    assert!(msg.contains("unknown backend \"xt\""), "{msg}");
    assert!(fake.with(|s| s.table.is_some()), "policy stays in place");
    assert_eq!(state.load().expect("kept").len(), 1);
}

#[test]
fn legacy_mode_is_the_guard_in_front_of_the_legacy_policy() {
    let dir = Scratch::new();
    let full = policy();
    let journal = Arc::new(Mutex::new(Vec::new()));
    let legacy = FakeDriver::new(Backend::Legacy);
    let nft = FakeDriver::new(Backend::Nft);
    for f in [&legacy, &nft] {
        f.with(|s| s.journal = Some(journal.clone()));
    }
    let det = detection(Backend::Legacy);
    let mut set = compose(
        &det,
        &full,
        Some(Box::new(nft.clone())),
        Some(Box::new(legacy.clone())),
    );
    let p = apply_drivers(&mut set, dir.path(), &det, None).expect("ok");
    assert_eq!(p.backend_name(&full), "legacy");
    let order = journal.lock().expect("journal").clone();
    assert_eq!(order.len(), 2);
    assert!(order[0].starts_with("legacy:"), "{order:?}");
    assert!(order[1].starts_with("nft:"), "{order:?}");
    let guard = nft.dump();
    assert!(guard.contains("masqd:guard:4"), "{guard}");
    assert!(!guard.contains("masqd:masquerade"), "{guard}");
    assert!(legacy.dump().contains("masqd:masquerade:4"));
    // Without a legacy family the nft driver goes first and holds the whole policy.
    let mut set = compose(
        &detection(Backend::Nft),
        &full,
        Some(Box::new(FakeDriver::new(Backend::Nft))),
        Some(Box::new(FakeDriver::new(Backend::Legacy))),
    );
    let order: Vec<Backend> = set.slots.iter().map(|s| s.driver.backend()).collect();
    assert_eq!(order, vec![Backend::Nft, Backend::Legacy]);
    assert!(set.slots[0].policy.guard_only.is_empty());
    assert!(plan_with(&mut set, detection(Backend::Nft)).is_ok());
}

#[test]
fn status_counts_connections_by_rule() {
    let dir = Scratch::new();
    let fake = FakeDriver::default();
    apply_fake(&fake, dir.path()).expect("apply");
    fake.with(|s| {
        let ch = s
            .table
            .as_mut()
            .and_then(|t| t.chain.as_mut())
            .expect("chain");
        for r in &mut ch.rules {
            r.packets = match r.comment.as_deref() {
                Some("masqd:guard:4") => Some(7),
                Some("masqd:masquerade:4") => Some(11),
                _ => Some(1000),
            };
        }
    });
    let pol = policy();
    let p = plan_with(&mut nft_only(&fake, &pol), detection(Backend::Nft)).expect("plan");
    let st = status_of(&p, &pol, &[], Vec::new());
    assert!(st.in_sync && st.table_present);
    assert_eq!(st.backend, "nft");
    let v4 = st.ipv4.expect("ipv4");
    assert_eq!((v4.kept_connections, v4.masqueraded_connections), (7, 11));
    assert_eq!(v4.sets.get("nomasq4"), Some(&2));
    assert_eq!(v4.sets.get("pod4"), Some(&1));
    assert!(st.ipv6.is_none());
}

#[test]
fn one_retry_policy() {
    let mut calls = 0;
    let r: Result<()> = crate::backend::retry_on_generation_change("again", |n| {
        calls += 1;
        assert_eq!(n, calls);
        Err(anyhow!("not a generation change"))
    });
    assert!(r.is_err());
    assert_eq!(calls, 1, "other errors are not retried");
}

#[test]
fn export_of_a_legacy_family_is_the_guard_only() {
    let p = policy();
    let guard = export_nft(Some(&detection(Backend::Legacy)), &p);
    assert!(guard.contains("snat ip to ip saddr"), "{guard}");
    assert!(!guard.contains("counter masquerade"), "{guard}");
    let whole = export_nft(None, &p);
    assert!(
        whole.contains("ip saddr @pod4 counter masquerade"),
        "{whole}"
    );
}

#[test]
fn backend_names_are_the_state_file_strings() {
    assert_eq!(
        serde_json::to_string(&Backend::Legacy).ok().as_deref(),
        Some("\"legacy\"")
    );
    assert_eq!(Backend::from_name("nft"), Some(Backend::Nft));
    assert_eq!(Backend::from_name("iptables"), None);
    assert_eq!(
        (Backend::Nft.name(), Backend::Legacy.name()),
        ("nft", "legacy")
    );
}

/// A legacy-only plan of IPv4 over `save` (the text of `iptables-legacy-save -t nat`).
fn legacy_plan_over(save: &str) -> Plan {
    let p = policy();
    let o = LegacyObserved::from_save(save);
    let fp = p.family(Family::V4).expect("ipv4 policy");
    let active = Some((fp, p.bridges.as_slice(), p.random_fully));
    let lp = crate::backend::legacy::plan(active, &o, &p.default_rule_cidrs, true);
    Plan {
        nft_policy: Policy::empty(),
        detection: detection(Backend::Legacy),
        steps: vec![Step {
            observed: Observation::Legacy(BTreeMap::from([(Family::V4, o)])),
            changes: Changes::Legacy(vec![(Family::V4, lp)]),
        }],
        missed_events: false,
    }
}

#[test]
fn moving_the_jump_back_behind_a_removed_broad_rule_is_not_an_own_repair() {
    // masqd's chain in sync; the head of POSTROUTING as iptables-legacy-save prints it.
    let chain = "-A MASQD-POSTROUTING -o docker0 -j RETURN\n\
                 -A MASQD-POSTROUTING -s 172.7.21.0/24 -d 10.200.0.0/24 -j RETURN\n\
                 -A MASQD-POSTROUTING -s 172.7.21.0/24 -d 172.7.0.0/16 -j RETURN\n\
                 -A MASQD-POSTROUTING -s 172.7.21.0/24 -j MASQUERADE\n";
    let save = |post: &str| {
        format!(
            "*nat\n:PREROUTING ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
             :MASQD-POSTROUTING - [0:0]\n{post}{chain}COMMIT\n"
        )
    };
    let jump = "-A POSTROUTING -m comment --comment masqd -j MASQD-POSTROUTING\n";
    let broad = "-A POSTROUTING -s 172.7.21.0/24 ! -o docker0 -j MASQUERADE\n";
    let other = "-A POSTROUTING -s 10.1.0.0/16 -j MASQUERADE\n";
    let pushed = legacy_plan_over(&save(&format!("{broad}{jump}")));
    assert_eq!(
        pushed.legacy_plans()[0].1.summary.len(),
        2,
        "the broad rule goes and the jump moves back: {:?}",
        pushed.legacy_plans()
    );
    assert!(!pushed.touches_own(), "Docker's head insert: hygiene");
    let behind = legacy_plan_over(&save(&format!("{jump}{broad}")));
    assert!(!behind.is_empty());
    assert!(!behind.touches_own(), "only the broad rule goes");
    let foreign_head = legacy_plan_over(&save(&format!("{other}{broad}{jump}")));
    assert!(
        foreign_head.touches_own(),
        "someone else's rule in front of the jump: a repair"
    );
    let no_jump = legacy_plan_over(&save(broad));
    assert!(no_jump.touches_own(), "the jump is missing: a repair");
}
