//! Unit tests of the state directory and its records.
use super::*;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("masqd-state-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn rule(saddr: &str) -> RemovedRule {
    RemovedRule {
        backend: "nft".into(),
        family: "ip".into(),
        table: "nat".into(),
        chain: "POSTROUTING".into(),
        description: "x".into(),
        saddr: saddr.into(),
        oif_neq: Some("docker0".into()),
        expressions_hex: "00".into(),
        userdata_hex: None,
        legacy_rule: None,
    }
}

#[test]
fn hex_roundtrip() {
    assert_eq!(
        unhex(&hex(&[0, 1, 0xab, 0xff])),
        Some(vec![0, 1, 0xab, 0xff])
    );
    assert_eq!(unhex("abc"), None);
    assert_eq!(unhex("zz"), None);
}

#[test]
fn record_dedups_and_removes() {
    let dir = scratch("dedup");
    let st = State::new(&dir);
    let r = rule("10.0.0.0/24");
    st.record(std::slice::from_ref(&r)).unwrap();
    let mut r2 = r.clone();
    r2.expressions_hex = "01".into();
    st.record(&[r2]).unwrap();
    assert_eq!(st.load().unwrap(), vec![r]);
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "a new state directory is private");
    st.store(&[]).unwrap();
    assert!(st.load().unwrap().is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_state_files_are_refused_with_their_path() {
    let dir = scratch("bad");
    let st = State::new(&dir);
    st.record(&[rule("10.0.0.0/24")]).unwrap();
    let path = st.path();
    let text = std::fs::read_to_string(&path).unwrap();
    let err = |st: &State| format!("{:#}", st.load().unwrap_err());
    // Truncated.
    std::fs::write(&path, &text[..text.len() / 2]).unwrap();
    let e = err(&st);
    assert!(
        e.contains(&path.display().to_string()) && e.contains("corrupt"),
        "{e}"
    );
    // Empty.
    std::fs::write(&path, "").unwrap();
    assert!(err(&st).contains("corrupt"));
    // World-writable.
    std::fs::write(&path, &text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let e = err(&st);
    assert!(
        e.contains(&path.display().to_string()) && e.contains("writable"),
        "{e}"
    );
    // A symlink to a good file.
    let elsewhere = dir.join("elsewhere.json");
    std::fs::write(&elsewhere, &text).unwrap();
    std::fs::remove_file(&path).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &path).unwrap();
    let e = err(&st);
    assert!(
        e.contains(&path.display().to_string()) && e.contains("symlink"),
        "{e}"
    );
    // A group-writable directory.
    std::fs::remove_file(&path).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o770)).unwrap();
    let e = err(&st);
    assert!(
        e.contains(&dir.display().to_string()) && e.contains("writable"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn temporary_file_never_follows_a_symlink() {
    let dir = scratch("tmp");
    let st = State::new(&dir);
    st.record(&[rule("10.0.0.0/24")]).unwrap();
    let victim = dir.join("victim");
    std::fs::write(&victim, "keep").unwrap();
    // The old fixed temporary name, and every name a file of this directory has.
    std::os::unix::fs::symlink(&victim, dir.join(format!("{FILE}.tmp"))).unwrap();
    st.record(&[rule("10.1.0.0/24")]).unwrap();
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
    assert_eq!(st.load().unwrap().len(), 2);
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .filter(|e| !e.file_type().unwrap().is_symlink())
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn locks_exclude_and_name_the_holder() {
    let dir = scratch("lock");
    let st = State::new(&dir);
    let held = st.lock_command("apply").unwrap();
    let e = format!(
        "{:#}",
        st.lock_command_within("apply", Duration::from_millis(100))
            .unwrap_err()
    );
    assert!(e.contains(&format!("PID {}", std::process::id())), "{e}");
    drop(held);
    let daemon = st.lock_daemon().unwrap();
    let e = format!("{:#}", st.lock_command("teardown").unwrap_err());
    assert!(
        e.contains(&format!("masqd run (PID {})", std::process::id())),
        "{e}"
    );
    drop(daemon);
    st.lock_command("teardown").unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn typed_records_read_and_write_the_old_strings() {
    // A record as masqd wrote it before backend and family were types.
    let old = r#"{"version":1,"removed_default_rules":[
        {"backend":"legacy","family":"ip6","table":"nat","chain":"POSTROUTING",
         "description":"-A POSTROUTING -s fd00::/64 -j MASQUERADE","saddr":"fd00::/64",
         "oif_neq":null,"legacy_rule":"-s fd00::/64 -j MASQUERADE"},
        {"backend":"xt","family":"arp","table":"nat","chain":"POSTROUTING",
         "description":"d","saddr":"10.0.0.0/8","oif_neq":null}]}"#;
    let sf: StateFile = serde_json::from_str(old).expect("old file loads");
    let r = &sf.removed_default_rules;
    assert_eq!(r[0].backend, Named::Known(crate::backend::Backend::Legacy));
    assert_eq!(r[0].family, Named::Known(crate::policy::Family::V6));
    assert_eq!(r[1].backend, Named::Unknown("xt".into()));
    assert_eq!(r[1].family.known(), None);
    let text = serde_json::to_string(&sf).expect("serialize");
    assert!(
        text.contains(r#""backend":"legacy","family":"ip6""#),
        "{text}"
    );
    assert!(text.contains(r#""backend":"xt","family":"arp""#), "{text}");
    let back: StateFile = serde_json::from_str(&text).expect("round trip");
    assert_eq!(back.removed_default_rules, sf.removed_default_rules);
}
