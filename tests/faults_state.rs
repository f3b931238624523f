//! The state directory under faults (issue 14, points 1 and 7): concurrent commands serialize on
//! its lock, a running daemon holds it, its files are written atomically and refused when they
//! are corrupt, symlinked or writable by others, and teardown puts every recorded rule back
//! before it removes anything of masqd's — after foreign deletions and while another tool holds
//! the xtables lock. Each test in its own network namespace.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const POD4: &str = "172.7.21.0/24";

fn cfg_text(mode: &str) -> String {
    format!(
        "[node]\npod_cidrs = [\"{POD4}\", \"fd00:7:21::/64\"]\n[masquerade]\n\
         cluster_cidrs = [\"172.7.0.0/16\", \"fd00:7::/32\"]\nbridge_interfaces = [\"docker0\"]\n\
         [backend]\nmode = \"{mode}\"\n"
    )
}

const NFT_BROAD4: &str =
    "iptables-nft -t nat -A POSTROUTING -s 172.7.21.0/24 ! -o docker0 -j MASQUERADE";
const NFT_BROAD6: &str =
    "ip6tables-nft -t nat -A POSTROUTING -s fd00:7:21::/64 ! -o docker0 -j MASQUERADE";
const LEGACY_BROAD4: &str =
    "iptables-legacy -t nat -A POSTROUTING -s 172.7.21.0/24 ! -o docker0 -j MASQUERADE";
const SAVED_BROAD4: &str = "-A POSTROUTING -s 172.7.21.0/24 ! -o docker0 -j MASQUERADE";
const SAVED_BROAD6: &str = "-A POSTROUTING -s fd00:7:21::/64 ! -o docker0 -j MASQUERADE";

fn state_file(state: &Path) -> PathBuf {
    state.join("removed-default-rules.json")
}

fn records(state: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(state_file(state)).expect("state file");
    let v: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("state file does not parse ({e}):\n{text}"));
    v["removed_default_rules"].as_array().unwrap().clone()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn has_table(ns: &Netns) -> bool {
    ns.exec(&["nft", "list", "table", "inet", "masqd"])
        .status
        .success()
}

fn nft_save(ns: &Netns, v6: bool) -> String {
    let bin = if v6 {
        "ip6tables-nft-save"
    } else {
        "iptables-nft-save"
    };
    ns.ok(&[bin, "-t", "nat"])
}

/// Nothing of masqd's left in either backend.
fn nothing_of_masqd(ns: &Netns) {
    assert!(
        !has_table(ns),
        "table inet masqd left:\n{}",
        ns.ruleset_text()
    );
    for v6 in [false, true] {
        let s = legacy_save(ns, v6, None);
        assert!(!s.contains("MASQD"), "legacy objects left:\n{s}");
    }
}

#[test]
fn concurrent_applies_from_a_fresh_state_record_each_rule_once() {
    let ns = Arc::new(Netns::new("mqcc"));
    let dir = TempDir::new();
    let cfg = dir.write("masqd.toml", &cfg_text("nft"));
    for round in 0..5 {
        // Fresh: the broad rules present (iptables-nft both families, legacy IPv4), no table of
        // masqd's, a state directory that does not exist yet.
        let _ = ns.exec(&["nft", "delete", "table", "inet", "masqd"]);
        let _ = ns.exec(&["iptables-nft", "-t", "nat", "-F", "POSTROUTING"]);
        let _ = ns.exec(&["ip6tables-nft", "-t", "nat", "-F", "POSTROUTING"]);
        let _ = ns.exec(&["iptables-legacy", "-t", "nat", "-F", "POSTROUTING"]);
        ns.ok_words(NFT_BROAD4);
        ns.ok_words(NFT_BROAD6);
        ns.ok_words(LEGACY_BROAD4);
        let state = dir.path().join(format!("state-{round}"));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let (ns, cfg, state) = (ns.clone(), cfg.clone(), state.clone());
                std::thread::spawn(move || ns.masqd(&cfg, &state, &["apply"]))
            })
            .collect();
        // All joined before any assertion, so that the namespace is removed even on failure.
        let outputs: Vec<Output> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        for o in outputs {
            let err = stderr(&o);
            // Eight short applies never wait anywhere near the lock's 10 s bound: all succeed.
            assert!(
                o.status.success(),
                "round {round}: apply exited {:?}: {err}",
                o.status.code()
            );
        }
        let recs = records(&state);
        let mut keys: Vec<String> = recs
            .iter()
            .map(|r| {
                format!(
                    "{} {} {} {}",
                    r["backend"], r["family"], r["saddr"], r["oif_neq"]
                )
            })
            .collect();
        keys.sort();
        assert_eq!(
            keys,
            vec![
                format!("\"legacy\" \"ip\" \"{POD4}\" \"docker0\""),
                format!("\"nft\" \"ip\" \"{POD4}\" \"docker0\""),
                "\"nft\" \"ip6\" \"fd00:7:21::/64\" \"docker0\"".to_string(),
            ],
            "round {round}: each removed rule recorded exactly once"
        );
        let leftovers: Vec<_> = std::fs::read_dir(&state)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
        ns.masqd_ok(&cfg, &state, &["plan"], 0);
    }
}

/// Applies with the broad rules of `mode`, breaks the node with `damage`, tears down.
fn teardown_after(damage: &[&str], mode: &str) {
    let ns = Netns::new("mqtd");
    let dir = TempDir::new();
    let cfg = dir.write("masqd.toml", &cfg_text(mode));
    let state = dir.path().join("state");
    if mode == "legacy" {
        ns.ok_words(LEGACY_BROAD4);
    } else {
        ns.ok_words(NFT_BROAD4);
        ns.ok_words(NFT_BROAD6);
    }
    ns.masqd_ok(&cfg, &state, &["apply"], 0);
    assert!(has_table(&ns));
    ns.ok(damage);
    let out = ns.masqd_ok(&cfg, &state, &["teardown"], 0);
    nothing_of_masqd(&ns);
    if mode == "legacy" {
        assert!(out.contains("restored 1"), "{out}");
        let s = legacy_save(&ns, false, Some("nat"));
        assert_eq!(s.matches(SAVED_BROAD4).count(), 1, "{s}");
    } else {
        assert!(out.contains("restored 2"), "{out}");
        // iptables-nft reads the recreated table, chain and rule back as its own.
        let (s4, s6) = (nft_save(&ns, false), nft_save(&ns, true));
        assert!(s4.contains(SAVED_BROAD4) && !s4.contains("Warning"), "{s4}");
        assert!(s6.contains(SAVED_BROAD6) && !s6.contains("Warning"), "{s6}");
    }
    assert!(!state_file(&state).exists());
    // Total: a second teardown finds nothing to do.
    let out = ns.masqd_ok(&cfg, &state, &["teardown"], 0);
    assert!(out.contains("restored 0"), "{out}");
}

#[test]
fn teardown_after_each_kind_of_foreign_deletion() {
    // Each in a namespace of its own.
    teardown_after(&["nft", "delete", "table", "ip", "nat"], "nft");
    teardown_after(&["nft", "flush", "ruleset"], "nft");
    teardown_after(
        &["nft", "delete", "chain", "ip", "nat", "POSTROUTING"],
        "nft",
    );
    teardown_after(
        &["iptables-legacy", "-t", "nat", "-F", "POSTROUTING"],
        "legacy",
    );
    teardown_after(&["iptables-legacy", "-t", "nat", "-F"], "legacy");
}

/// The xtables lock held by another process (its own process group, killed on drop). Not the
/// host's /run/xtables.lock (network namespaces share it, and holding it would stall the
/// host's iptables users): a private lock file that this test process's iptables calls and
/// masqd's children use through XTABLES_LOCKFILE, as the unit sets it.
struct XtablesLock(Child);

fn private_xtables_lock() -> &'static Path {
    static LOCK: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    LOCK.get_or_init(|| {
        let p =
            std::env::temp_dir().join(format!("masqd-test-xtables-{}.lock", std::process::id()));
        std::env::set_var("XTABLES_LOCKFILE", &p);
        p
    })
}

impl XtablesLock {
    fn hold(secs: u32) -> XtablesLock {
        let mut child = Command::new("flock")
            .arg(private_xtables_lock())
            .args(["sh", "-c"])
            .arg(format!("echo held; exec sleep {secs}"))
            .stdout(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("flock");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "held");
        XtablesLock(child)
    }
}

impl Drop for XtablesLock {
    fn drop(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

/// Whether masqd's policy for IPv4 is in place (nft mode: its table with the masquerade rule).
fn policy_in_place(ns: &Netns) -> bool {
    let o = ns.exec(&["nft", "list", "table", "inet", "masqd"]);
    o.status.success() && String::from_utf8_lossy(&o.stdout).contains("masquerade")
}

#[test]
fn teardown_with_the_xtables_lock_held_never_leaves_a_gap() {
    // Policy in nftables, Docker's broad rule in legacy xtables (removed and recorded by apply).
    let ns = Arc::new(Netns::new("mqxl"));
    let dir = TempDir::new();
    let cfg = dir.write("masqd.toml", &cfg_text("nft"));
    let state = dir.path().join("state");
    ns.ok_words(LEGACY_BROAD4);
    ns.masqd_ok(&cfg, &state, &["apply"], 0);
    assert!(!legacy_save(&ns, false, Some("nat")).contains(SAVED_BROAD4));
    assert!(policy_in_place(&ns));

    let lock = XtablesLock::hold(3);
    let held_since = Instant::now();
    let done = Arc::new(AtomicBool::new(false));
    let td = {
        let (ns, cfg, state, done) = (ns.clone(), cfg.clone(), state.clone(), done.clone());
        std::thread::spawn(move || {
            let o = ns.masqd(&cfg, &state, &["teardown"]);
            done.store(true, Ordering::SeqCst);
            o
        })
    };
    let mut samples = 0;
    let mut gap = None;
    while !done.load(Ordering::SeqCst) {
        // Policy first, then the rule: a removal of the policy after a restore cannot show up
        // as a gap between the two reads.
        let policy = policy_in_place(&ns);
        let restored = legacy_save(&ns, false, Some("nat")).contains(SAVED_BROAD4);
        if !policy && !restored && gap.is_none() {
            gap = Some(samples);
        }
        samples += 1;
    }
    let o = td.join().unwrap();
    let waited = held_since.elapsed();
    drop(lock);
    assert!(
        waited >= Duration::from_secs(2),
        "teardown did not wait for the held xtables lock ({waited:?}): XTABLES_LOCKFILE not honoured?"
    );
    assert_eq!(
        gap, None,
        "at sample {gap:?} of {samples}, neither masqd's policy nor the restored rule was in place"
    );
    assert!(o.status.success(), "teardown: {}", stderr(&o));
    assert!(samples >= 10, "only {samples} samples while teardown ran");
    nothing_of_masqd(&ns);
    assert!(legacy_save(&ns, false, Some("nat")).contains(SAVED_BROAD4));
}

#[test]
fn teardown_that_cannot_restore_keeps_the_policy_and_the_record() {
    let ns = Netns::new("mqkr");
    let dir = TempDir::new();
    let cfg = dir.write("masqd.toml", &cfg_text("nft"));
    let state = dir.path().join("state");
    ns.ok_words(NFT_BROAD4);
    ns.ok_words(LEGACY_BROAD4);
    ns.masqd_ok(&cfg, &state, &["apply"], 0);
    let good = std::fs::read_to_string(state_file(&state)).unwrap();

    // A record whose bytes are not a masquerade rule for its source CIDR is not replayed.
    let forged = good.replacen(
        &format!("\"saddr\": \"{POD4}\""),
        "\"saddr\": \"10.0.0.0/8\"",
        1,
    );
    assert_ne!(forged, good);
    std::fs::write(state_file(&state), &forged).unwrap();
    let o = ns.masqd(&cfg, &state, &["teardown"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("refused to replay") && err.contains("172.7.21.0/24"),
        "{err}"
    );
    assert!(policy_in_place(&ns), "masqd's policy stays");
    assert!(!nft_save(&ns, false).contains(SAVED_BROAD4));
    let kept = records(&state);
    assert_eq!(kept.len(), 1, "only the refused record is kept: {kept:?}");
    assert_eq!(kept[0]["saddr"], "10.0.0.0/8");
    // The legacy record was put back (masqd's policy runs first, nothing changes for traffic).
    assert!(legacy_save(&ns, false, Some("nat")).contains(SAVED_BROAD4));

    // The legacy rule cannot go back (no iptables-legacy binaries on PATH): nothing of masqd's
    // is removed and the record stays; with the binaries back, teardown completes. (A lock held
    // past the binaries' 10 s timeout would do the same, but would stall every other test's
    // legacy calls on this host's shared /run/xtables.lock.)
    std::fs::write(state_file(&state), &good).unwrap();
    ns.ok(&["iptables-legacy", "-t", "nat", "-F", "POSTROUTING"]);
    let o = ns.exec(&[
        "env",
        "PATH=/nonexistent",
        env!("CARGO_BIN_EXE_masqd"),
        "--config",
        cfg.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
        "teardown",
    ]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains(SAVED_BROAD4), "names the rule: {err}");
    assert!(policy_in_place(&ns), "masqd's policy stays");
    let kept = records(&state);
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(kept[0]["backend"], "legacy");
    let out = ns.masqd_ok(&cfg, &state, &["teardown"], 0);
    assert!(out.contains("restored 1"), "{out}");
    nothing_of_masqd(&ns);
    assert!(legacy_save(&ns, false, Some("nat")).contains(SAVED_BROAD4));
    assert!(nft_save(&ns, false).contains(SAVED_BROAD4));
}

/// `masqd run` in a namespace, killed on drop.
struct Run(Child);

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn apply_and_teardown_are_refused_beside_a_running_daemon() {
    let ns = Netns::new("mqrun");
    let dir = TempDir::new();
    let cfg = dir.write("masqd.toml", &cfg_text("nft"));
    let state = dir.path().join("state");
    ns.ok_words(NFT_BROAD4);
    let log = dir.path().join("run.log");
    let child = Command::new("ip")
        .args(["netns", "exec", &ns.name, env!("CARGO_BIN_EXE_masqd")])
        .args(["--config", cfg.to_str().unwrap()])
        .args(["--state-dir", state.to_str().unwrap(), "run"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("masqd run");
    // `ip netns exec` execs masqd: the child's PID is the daemon's.
    let pid = child.id();
    let mut run = Run(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while ns.masqd(&cfg, &state, &["plan"]).status.code() != Some(0) {
        assert!(Instant::now() < deadline, "masqd run never got in sync");
        assert!(run.0.try_wait().unwrap().is_none(), "masqd run exited");
        std::thread::sleep(Duration::from_millis(50));
    }
    for cmd in ["teardown", "apply"] {
        let t = Instant::now();
        let o = ns.masqd(&cfg, &state, &[cmd]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{cmd}: {err}");
        assert!(
            err.contains(&format!("masqd run (PID {pid})")),
            "{cmd} names the daemon: {err}"
        );
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{cmd} refused at once"
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(policy_in_place(&ns), "the daemon's policy stays");
    assert!(!nft_save(&ns, false).contains(SAVED_BROAD4));
    // Read-only commands take no lock.
    ns.masqd_ok(&cfg, &state, &["plan"], 0);
    ns.masqd_ok(&cfg, &state, &["status"], 0);
    ns.masqd_ok(&cfg, &state, &["detect"], 0);
    // A second daemon on the same directory does not start beside the first (after waiting
    // up to 10 s for it; `timeout` ends a daemon that started anyway with 124).
    let o = ns.exec(&[
        "timeout",
        "30",
        env!("CARGO_BIN_EXE_masqd"),
        "--config",
        cfg.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
        "run",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains(&format!("PID {pid}")), "{}", stderr(&o));
    drop(run);
    let out = ns.masqd_ok(&cfg, &state, &["teardown"], 0);
    assert!(out.contains("restored 1"), "{out}");
    nothing_of_masqd(&ns);
}

#[test]
fn bad_state_files_are_refused_with_their_path() {
    let ns = Netns::new("mqbad");
    let dir = TempDir::new();
    let cfg = dir.write("masqd.toml", &cfg_text("nft"));
    let state = dir.path().join("state");
    ns.ok_words(NFT_BROAD4);
    ns.masqd_ok(&cfg, &state, &["apply"], 0);
    let path = state_file(&state);
    let good = std::fs::read_to_string(&path).unwrap();
    // Something for apply to do, so that a refusal shows in the kernel.
    ns.ok(&["nft", "delete", "table", "inet", "masqd"]);
    let before = ns.ruleset_text();
    let refused = |what: &str, named: &Path, word: &str| {
        for cmd in ["apply", "teardown"] {
            let o = ns.masqd(&cfg, &state, &[cmd]);
            let err = stderr(&o);
            assert_eq!(o.status.code(), Some(1), "{what}: {cmd}: {err}");
            assert!(
                err.contains(&named.display().to_string()) && err.contains(word),
                "{what}: {cmd} names {} ({word}): {err}",
                named.display()
            );
            assert_eq!(
                ns.ruleset_text(),
                before,
                "{what}: {cmd} changed the kernel"
            );
        }
    };
    std::fs::write(&path, "{\"version\": 1, \"removed_default_rules\": [").unwrap();
    refused("truncated", &path, "corrupt");
    std::fs::write(&path, "").unwrap();
    refused("empty", &path, "corrupt");
    std::fs::write(&path, "not json").unwrap();
    refused("not JSON", &path, "corrupt");

    let elsewhere = dir.write("elsewhere.json", &good);
    std::fs::remove_file(&path).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &path).unwrap();
    refused("a symlink", &path, "symlink");
    std::fs::remove_file(&path).unwrap();

    std::fs::write(&path, &good).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    refused("world-writable", &path, "writable");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();

    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    refused("world-writable directory", &state, "writable");
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();

    let real = dir.path().join("real-state");
    std::fs::rename(&state, &real).unwrap();
    std::os::unix::fs::symlink(&real, &state).unwrap();
    refused("symlinked directory", &state, "symlink");
    std::fs::remove_file(&state).unwrap();
    std::fs::rename(&real, &state).unwrap();

    nix::unistd::chown(&path, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
    refused("not owned by root", &path, "owned by uid 65534");
    nix::unistd::chown(&path, Some(nix::unistd::Uid::from_raw(0)), None).unwrap();

    // Repaired, everything works again.
    ns.masqd_ok(&cfg, &state, &["apply"], 0);
    let out = ns.masqd_ok(&cfg, &state, &["teardown"], 0);
    assert!(out.contains("restored 1"), "{out}");
    nothing_of_masqd(&ns);
}

#[test]
fn apply_never_follows_a_symlink_at_a_temporary_path() {
    let ns = Netns::new("mqtmp");
    let dir = TempDir::new();
    let cfg = dir.write("masqd.toml", &cfg_text("nft"));
    let state = dir.path().join("state");
    ns.masqd_ok(&cfg, &state, &["apply"], 0);
    let victim = dir.write("victim", "not masqd's\n");
    // The fixed temporary name an older masqd wrote through, and names like the new ones.
    for name in [
        "removed-default-rules.json.tmp",
        ".removed-default-rules.json.tmp",
        "removed-default-rules.tmp",
    ] {
        std::os::unix::fs::symlink(&victim, state.join(name)).unwrap();
    }
    ns.ok_words(NFT_BROAD4);
    ns.masqd_ok(&cfg, &state, &["apply"], 0);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "not masqd's\n");
    let md = std::fs::symlink_metadata(state_file(&state)).unwrap();
    assert!(md.file_type().is_file(), "the state file is a regular file");
    assert_eq!(md.permissions().mode() & 0o077, 0, "and private");
    assert_eq!(records(&state).len(), 1);
}
