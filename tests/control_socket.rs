//! The control socket of `masqd run`: `status` and `plan` answered by the running daemon equal
//! what they read from the kernel themselves, fast at 100,000 exceptions; non-root peers are
//! refused; without the daemon the commands fall back and say so; two daemons in two network
//! namespaces never answer for each other. Timings are printed (--nocapture), asserted only
//! against generous bounds.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const FALLBACK: &str = "no running masqd daemon for this state directory: reading the kernel";

/// `n` exceptions that never merge: every other address of 10.0.0.0/8, one per line.
fn list(n: usize) -> String {
    let mut s = String::with_capacity(n * 16);
    for i in 0..n {
        let a = 0x0a00_0000u32 + 2 * i as u32;
        s.push_str(&format!("{}/32\n", std::net::Ipv4Addr::from(a)));
    }
    s
}

/// A namespace, node A's configuration with `n` extra exceptions from a list file, a state
/// directory.
fn setup(prefix: &str, n: usize) -> (Netns, TempDir, PathBuf, PathBuf) {
    let ns = Netns::new(prefix);
    let dir = TempDir::new();
    dir.write("ex.list", &list(n));
    let cfg = dir.write(
        "masqd.toml",
        &format!("{NODE_A_TOML}nonmasquerade_cidrs_file = \"ex.list\"\n"),
    );
    let state = dir.path().join("state");
    (ns, dir, cfg, state)
}

/// `masqd run` in `ns`, READY awaited.
fn start(ns: &Netns, cfg: &Path, state: &Path) -> Daemon {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name, env!("CARGO_BIN_EXE_masqd")])
        .args(["--config", cfg.to_str().unwrap()])
        .args(["--state-dir", state.to_str().unwrap(), "run"]);
    let mut d = Daemon::spawn(cmd);
    d.wait_note("READY=1", Duration::from_secs(60));
    d
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs masqd in `ns`; (exit code, stdout, stderr, time taken).
fn timed(ns: &Netns, cfg: &Path, state: &Path, args: &[&str]) -> (i32, String, String, Duration) {
    let t = Instant::now();
    let o = ns.masqd(cfg, state, args);
    let took = t.elapsed();
    let code = o.status.code().unwrap_or(-1);
    (code, text(&o.stdout), text(&o.stderr), took)
}

fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}"))
}

/// `status --json` through the daemon and read directly: both parsed, the fields compared
/// (all but `daemon`), the daemon's part returned with the direct status.
fn both_ways(ns: &Netns, cfg: &Path, state: &Path) -> (Value, Value) {
    let (code, out, err, took) = timed(ns, cfg, state, &["status", "--json"]);
    assert_eq!(code, 0, "through the daemon: {out}\n{err}");
    assert!(
        !err.contains("reading the kernel"),
        "answered by the daemon: {err}"
    );
    let mut via = json(&out);
    let daemon = via
        .as_object_mut()
        .and_then(|o| o.remove("daemon"))
        .unwrap_or_else(|| panic!("no daemon field: {out}"));
    let (dcode, dout, derr, dtook) = timed(ns, cfg, state, &["status", "--json", "--direct"]);
    assert_eq!(dcode, 0, "direct: {dout}\n{derr}");
    assert!(
        !derr.contains("reading the kernel"),
        "--direct says nothing: {derr}"
    );
    let direct = json(&dout);
    assert!(direct.get("daemon").is_none(), "{dout}");
    assert_eq!(via, direct, "the daemon's status equals the kernel's");
    eprintln!("status: through the daemon {took:?}, direct {dtook:?}");
    (daemon, direct)
}

#[test]
fn status_and_plan_through_the_daemon_equal_the_kernel_read_directly() {
    let n = 3000;
    let (ns, _dir, cfg, state) = setup("mqctl", n);
    let mut d = start(&ns, &cfg, &state);
    let sock = state.join("control.sock");
    let mode = std::fs::metadata(&sock)
        .expect("the socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    let (daemon, st) = both_ways(&ns, &cfg, &state);
    assert_eq!(daemon["pid"], d.child.id(), "{daemon}");
    assert_eq!(daemon["sets_from_mirror"], true, "{daemon}");
    assert_eq!(daemon["reconcile_pending"], false, "{daemon}");
    assert!(
        daemon["last_reconcile"]
            .as_str()
            .unwrap()
            .contains("applied"),
        "{daemon}"
    );
    // Independent expectations: the cluster CIDR and the n addresses, none merged.
    assert_eq!(st["in_sync"], true);
    assert_eq!(st["ipv4"]["sets"]["nomasq4"], n + 1, "{st}");
    assert_eq!(st["ipv4"]["sets"]["pod4"], 1, "{st}");
    let kernel = set_ranges(&ns.ruleset(), "nomasq4").expect("nomasq4");
    assert_eq!(kernel.len(), n + 1);
    // The text and `plan`.
    let human = ns.masqd_ok(&cfg, &state, &["status"], 0);
    let pid = d.child.id();
    assert!(
        human.starts_with("backend:              nft\nin sync:              yes\n"),
        "{human}"
    );
    assert!(
        human.contains(&format!(
            "answered by:          masqd run (pid {pid}), last reconcile "
        )),
        "{human}"
    );
    let plan = ns.masqd_ok(&cfg, &state, &["plan"], 0);
    assert_eq!(
        plan.lines().next(),
        Some("# in sync: nothing to change"),
        "{plan}"
    );
    assert!(
        plan.contains(&format!("# answered by masqd run (pid {pid})")),
        "{plan}"
    );
    // A foreign commit elsewhere leaves the mirror trusted (no read-back of the sets).
    ns.ok_words("nft add table ip other");
    let (daemon, _) = both_ways(&ns, &cfg, &state);
    assert_eq!(daemon["sets_from_mirror"], true, "{daemon}");
    // An element deleted behind masqd's back: the answer waits for the repair, and the kernel
    // holds every range again.
    ns.ok_words("nft delete element inet masqd nomasq4 { 10.0.0.2 }");
    let (daemon, st) = both_ways(&ns, &cfg, &state);
    assert_eq!(st["ipv4"]["sets"]["nomasq4"], n + 1, "{st}");
    assert_eq!(set_ranges(&ns.ruleset(), "nomasq4").unwrap().len(), n + 1);
    assert!(
        daemon["last_reconcile"]
            .as_str()
            .unwrap()
            .contains("nftables change"),
        "{daemon}"
    );
    // Stopped: the socket is gone, the commands read the kernel and say so.
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(d.exit(Duration::from_secs(15)).success());
    assert!(!sock.exists(), "removed at exit");
    for args in [&["status", "--json"][..], &["plan"]] {
        let (code, out, err, _) = timed(&ns, &cfg, &state, args);
        assert_eq!(code, 0, "{args:?}: {out}\n{err}");
        assert_eq!(err.trim_end(), format!("masqd: {FALLBACK}"), "{args:?}");
        assert!(
            !out.contains("answered by") && !out.contains("\"daemon\""),
            "{out}"
        );
    }
}

#[test]
fn a_non_root_client_is_refused() {
    let (ns, _dir, cfg, state) = setup("mqctlu", 10);
    let _d = start(&ns, &cfg, &state);
    let o = as_nobody(&ns, &cfg, &state, &["status"]);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("Permission denied") && err.contains("reading the kernel"),
        "{err}"
    );
    assert!(err.contains("masqd needs root"), "{err}");
    // The file modes opened up: the daemon itself refuses the peer by its uid.
    let sock = state.join("control.sock");
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let o = as_nobody(&ns, &cfg, &state, &["status", "--json"]);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("refused: masqd's control socket answers root only (peer uid 65534): reading the kernel"),
        "{err}"
    );
    assert!(
        !text(&o.stdout).contains("in_sync"),
        "no status leaked: {}",
        text(&o.stdout)
    );
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
}

#[test]
fn two_daemons_in_two_namespaces_answer_only_for_their_own() {
    let (ns1, _d1, cfg1, state1) = setup("mqctla", 20);
    let (ns2, _d2, cfg2, state2) = setup("mqctlb", 30);
    let a = start(&ns1, &cfg1, &state1);
    let b = start(&ns2, &cfg2, &state2);
    for (ns, cfg, state, d, n) in [
        (&ns1, &cfg1, &state1, &a, 20),
        (&ns2, &cfg2, &state2, &b, 30),
    ] {
        let (daemon, st) = both_ways(ns, cfg, state);
        assert_eq!(daemon["pid"], d.child.id());
        assert_eq!(st["ipv4"]["sets"]["nomasq4"], n + 1, "{st}");
    }
    // From namespace 2, the first daemon's socket (the same file system) is not taken.
    let (_, _, err, _) = timed(&ns2, &cfg1, &state1, &["status", "--json"]);
    assert!(
        err.contains(&format!(
            "the daemon (pid {}) serves another network namespace",
            a.child.id()
        )),
        "{err}"
    );
    assert!(err.trim_end().ends_with(": reading the kernel"), "{err}");
    // Another configuration file than the daemon's: not its answer either.
    let (_, _, err, _) = timed(&ns1, &cfg2, &state1, &["plan"]);
    assert!(err.contains("runs with the configuration"), "{err}");
}

#[test]
fn a_dead_daemons_socket_is_replaced() {
    let (ns, _dir, cfg, state) = setup("mqctls", 5);
    let mut d = start(&ns, &cfg, &state);
    let _ = d.child.kill();
    let _ = d.child.wait();
    assert!(
        state.join("control.sock").exists(),
        "SIGKILL leaves the file"
    );
    let (code, _, err, _) = timed(&ns, &cfg, &state, &["plan"]);
    assert_eq!(
        (code, err.trim_end()),
        (0, format!("masqd: {FALLBACK}").as_str())
    );
    let d2 = start(&ns, &cfg, &state);
    let (daemon, _) = both_ways(&ns, &cfg, &state);
    assert_eq!(daemon["pid"], d2.child.id());
}

#[test]
fn a_daemon_answered_status_is_fast_at_100000_exceptions() {
    let n: usize = std::env::var("MASQD_CONTROL_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let (ns, _dir, cfg, state) = setup("mqctlf", n);
    let t = Instant::now();
    let _d = start(&ns, &cfg, &state);
    eprintln!("{n} exceptions: masqd run READY after {:?}", t.elapsed());
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let (code, out, err, took) = timed(&ns, &cfg, &state, &["status", "--json"]);
        assert_eq!(code, 0, "{out}\n{err}");
        assert_eq!(json(&out)["ipv4"]["sets"]["nomasq4"], n + 1);
        assert_eq!(json(&out)["daemon"]["sets_from_mirror"], true);
        best = best.min(took);
    }
    let (code, out, err, direct) = timed(&ns, &cfg, &state, &["status", "--json", "--direct"]);
    assert_eq!(code, 0, "{out}\n{err}");
    eprintln!("{n} exceptions: status through the daemon {best:?} (best of 3), direct {direct:?}");
    assert!(best < Duration::from_secs(5), "{best:?}");
}
