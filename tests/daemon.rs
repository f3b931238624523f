//! `masqd run` with the real binary in a network namespace and a fake NOTIFY_SOCKET.
//! Latencies are printed (run with --nocapture to see them), never asserted against a clock
//! tighter than "eventually, within seconds": the benchmark is the record of speed.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const CFG: &str = NODE_A_TOML;

/// `masqd run` through `ip netns exec`, with a watchdog of 400 ms.
fn start_daemon(ns: &Netns, cfg: &Path, state: &Path) -> Daemon {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name, env!("CARGO_BIN_EXE_masqd")])
        .args([
            "--config",
            cfg.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
        ])
        .args(["--log-level", "info", "run"])
        .env("WATCHDOG_USEC", "400000");
    Daemon::spawn(cmd)
}

fn has_table(ns: &Netns) -> bool {
    ns.exec(&["nft", "list", "table", "inet", "masqd"])
        .status
        .success()
}

/// Polls until `cond` holds; returns how long it took.
fn until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(2));
    }
    t.elapsed()
}

fn in_sync(ns: &Netns, cfg: &Path, state: &Path) -> bool {
    ns.masqd(cfg, state, &["plan"]).status.code() == Some(0)
}

fn setup(cfg_text: &str) -> (Netns, TempDir, PathBuf, PathBuf) {
    let ns = Netns::new("mqd");
    let dir = TempDir::new();
    let cfg = dir.write("masqd.toml", cfg_text);
    let state = dir.path().join("state");
    (ns, dir, cfg, state)
}

#[test]
fn ready_only_after_the_rules_are_in_and_drift_is_repaired() {
    let (ns, _dir, cfg, state) = setup(CFG);
    ns.ok_words("iptables-nft -t nat -A POSTROUTING -s 172.7.21.0/24 ! -o docker0 -j MASQUERADE");
    let mut d = start_daemon(&ns, &cfg, &state);
    d.wait_note("READY=1", Duration::from_secs(10));
    // READY=1 came after the first reconcile: everything is in already.
    assert!(in_sync(&ns, &cfg, &state), "in sync at READY");
    assert!(rules(&ns.ruleset(), "ip", "nat", "POSTROUTING").is_empty());
    d.wait_note("WATCHDOG=1", Duration::from_secs(5));

    // The table deleted: restored.
    ns.ok(&["nft", "delete", "table", "inet", "masqd"]);
    let t = until("table restored", Duration::from_secs(5), || has_table(&ns));
    eprintln!("drift repair (nft delete table inet masqd → table back, polled with nft): {t:?}");
    until("in sync after delete", Duration::from_secs(5), || {
        in_sync(&ns, &cfg, &state)
    });

    // The whole ruleset flushed: restored.
    ns.ok(&["nft", "flush", "ruleset"]);
    let t = until("table restored after flush", Duration::from_secs(5), || {
        has_table(&ns)
    });
    eprintln!("drift repair (nft flush ruleset): {t:?}");
    until("in sync after flush", Duration::from_secs(5), || {
        in_sync(&ns, &cfg, &state)
    });

    // Docker restarts and re-inserts its rule through iptables-nft: removed again.
    ns.ok_words("iptables-nft -t nat -I POSTROUTING -s 172.7.21.0/24 ! -o docker0 -j MASQUERADE");
    let t = until("broad rule removed", Duration::from_secs(5), || {
        rules(&ns.ruleset(), "ip", "nat", "POSTROUTING").is_empty()
    });
    eprintln!("default rule re-inserted → removed: {t:?}");
    // Someone edits the set behind masqd's back (its cache of the sets must not hide that).
    ns.ok_words("nft add element inet masqd nomasq4 { 8.8.8.0/24 }");
    ns.ok_words("nft delete element inet masqd nomasq4 { 172.7.0.0/16 }");
    let t = until("set repaired", Duration::from_secs(5), || {
        in_sync(&ns, &cfg, &state)
    });
    eprintln!("foreign element edits → repaired: {t:?}");
    let st: serde_json::Value =
        serde_json::from_str(&ns.masqd_ok(&cfg, &state, &["status", "--json"], 0)).unwrap();
    assert_eq!(st["in_sync"], true);
    let status = d.wait_note("repairs 4", Duration::from_secs(5));
    assert!(status.contains("STATUS=backend nft"), "{status}");
    assert!(d.alive());
}

#[test]
fn config_follows_atomic_rename_and_broken_reload_is_survived() {
    let (ns, dir, cfg, state) = setup(CFG);
    let mut d = start_daemon(&ns, &cfg, &state);
    d.wait_note("READY=1", Duration::from_secs(10));

    // Edited by atomic rename (as editors and config management do): no signal needed.
    let tmp = dir.write(
        "masqd.toml.new",
        &CFG.replace(
            "bridge_interfaces",
            "nonmasquerade_cidrs = [\"10.96.0.0/12\"]\nbridge_interfaces",
        ),
    );
    std::fs::rename(&tmp, &cfg).unwrap();
    let want = cidr_range("10.96.0.0/12");
    let t = until("set follows the config", Duration::from_secs(5), || {
        set_ranges(&ns.ruleset(), "nomasq4").is_some_and(|r| r.contains(&(want.1, want.2)))
    });
    eprintln!("config rename → element in the kernel (polled with nft): {t:?}");

    // A broken config + SIGHUP: rules unchanged, process alive, STATUS names the error.
    let before = ns.ruleset_text();
    std::fs::write(&cfg, CFG.replace("172.7.0.0/16", "172.7.0.1/16")).unwrap();
    d.wait_note("config error", Duration::from_secs(5));
    d.signal(nix::sys::signal::Signal::SIGHUP);
    d.wait_note("RELOADING=1", Duration::from_secs(5));
    d.wait_note("READY=1", Duration::from_secs(5));
    // The STATUS line in force (repeats are not resent) names the error.
    let st = d
        .notes
        .seen
        .iter()
        .rev()
        .find(|n| n.starts_with("STATUS="))
        .cloned()
        .unwrap_or_default();
    assert!(
        st.contains("masqd.toml:4") && st.contains("did you mean 172.7.0.0/16"),
        "{st}"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert!(d.alive(), "still running");
    assert_eq!(ns.ruleset_text(), before, "rules unchanged");

    // SIGTERM: STOPPING=1, exit 0, rules still there.
    d.signal(nix::sys::signal::Signal::SIGTERM);
    d.wait_note("STOPPING=1", Duration::from_secs(5));
    let status = d.child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert_eq!(ns.ruleset_text(), before, "rules left in place");
}

#[test]
fn broken_config_at_start_exits_78() {
    let (ns, _dir, cfg, state) = setup(&CFG.replace("docker0", "docker 0"));
    let o = ns.masqd(&cfg, &state, &["run"]);
    assert_eq!(o.status.code(), Some(78));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("masqd.toml:5") && err.contains("holds whitespace"),
        "{err}"
    );
    assert!(!has_table(&ns));
}

#[test]
fn kill_9_mid_reconcile_then_restart_converges() {
    // A large exception list makes the first reconcile long enough to be killed inside it.
    let list: Vec<String> = (0..60_000u32)
        .map(|i| {
            let a = 0x0b00_0000u32 + i * 32; // disjoint, not adjacent: 60,000 intervals
            format!("\"{}/28\"", std::net::Ipv4Addr::from(a))
        })
        .collect();
    let text = CFG.replace(
        "bridge_interfaces",
        &format!(
            "nonmasquerade_cidrs = [{}]\nbridge_interfaces",
            list.join(",")
        ),
    );
    let (ns, _dir, cfg, state) = setup(&text);
    // How long start-up to READY takes here; the kills land inside that window.
    let t0 = Instant::now();
    let mut d = start_daemon(&ns, &cfg, &state);
    d.wait_note("READY=1", Duration::from_secs(60));
    let full = t0.elapsed();
    drop(d);
    ns.ok(&["nft", "delete", "table", "inet", "masqd"]);
    let mut outcomes = Vec::new();
    for pct in [15u32, 30, 45, 60, 75, 90] {
        let delay_ms = full.as_millis() as u64 * pct as u64 / 100;
        let mut d = start_daemon(&ns, &cfg, &state);
        std::thread::sleep(Duration::from_millis(delay_ms));
        d.signal(nix::sys::signal::Signal::SIGKILL);
        let _ = d.child.wait();
        // Whatever the kernel holds now is a whole transaction or nothing.
        let rs = ns.ruleset();
        let n = rules(&rs, "inet", "masqd", "postrouting").len();
        let elems = set_ranges(&rs, "nomasq4").map_or(0, |r| r.len());
        assert!(n == 0 || n == 6, "never half-applied: {n} rules");
        assert!(
            elems == 0 || elems == 60_001,
            "never a half-filled set: {elems}"
        );
        outcomes.push((delay_ms, n, elems));
        if n == 6 {
            // Start again from nothing so the next kill can land mid-reconcile too.
            ns.ok(&["nft", "delete", "table", "inet", "masqd"]);
        }
    }
    eprintln!("start-up to READY {full:?}; kill -9 after (ms, rules, intervals): {outcomes:?}");
    let mut d = start_daemon(&ns, &cfg, &state);
    d.wait_note("READY=1", Duration::from_secs(30));
    assert!(in_sync(&ns, &cfg, &state));
    let rs = ns.ruleset();
    assert_eq!(
        rules(&rs, "inet", "masqd", "postrouting").len(),
        6,
        "no duplicate rules"
    );
    assert_eq!(objects(&rs, "table").len(), 1);
    assert_eq!(set_ranges(&rs, "nomasq4").unwrap().len(), 60_001);
}

#[test]
fn legacy_reinsert_undone_within_one_resync_interval() {
    let (ns, _dir, cfg, state) = setup(&format!(
        "{CFG}[backend]\nmode = \"legacy\"\n[daemon]\nresync_interval = \"1s\"\n"
    ));
    ns.ok_words(
        "iptables-legacy -t nat -A POSTROUTING -s 172.7.21.0/24 ! -o docker0 -j MASQUERADE",
    );
    let mut d = start_daemon(&ns, &cfg, &state);
    d.wait_note("READY=1", Duration::from_secs(10));
    let post = |ns: &Netns| -> Vec<String> {
        legacy_save(ns, false, Some("nat"))
            .lines()
            .filter(|l| l.starts_with("-A POSTROUTING"))
            .map(str::to_string)
            .collect()
    };
    assert_eq!(
        post(&ns),
        vec!["-A POSTROUTING -m comment --comment masqd -j MASQD-POSTROUTING"]
    );
    ns.ok_words(
        "iptables-legacy -t nat -I POSTROUTING 1 -s 172.7.21.0/24 ! -o docker0 -j MASQUERADE",
    );
    let t = until(
        "legacy re-insert undone",
        Duration::from_millis(2500),
        || post(&ns).len() == 1,
    );
    eprintln!("legacy Docker-style re-insert undone after {t:?} (resync interval 1s)");
    assert_eq!(
        post(&ns)[0],
        "-A POSTROUTING -m comment --comment masqd -j MASQD-POSTROUTING"
    );
    assert!(d.alive());
}

#[test]
fn waits_for_a_subnet_env_that_appears_later() {
    // kube-flannel as a DaemonSet writes subnet.env only after kubelet runs, and kubelet is
    // ordered after masqd: masqd must start, say what it waits for, and follow the file.
    let dir = TempDir::new();
    let env = dir.path().join("flannel").join("subnet.env");
    let (ns, _d2, cfg, state) = setup(&format!(
        "[node]\nflannel_subnet_env = \"{}\"\n[masquerade]\nbridge_interfaces = [\"cni0\"]\n",
        env.display()
    ));
    let mut d = start_daemon(&ns, &cfg, &state);
    d.wait_note("READY=1", Duration::from_secs(10));
    let st = d
        .notes
        .seen
        .iter()
        .find(|n| n.contains("waiting"))
        .cloned()
        .unwrap_or_default();
    assert!(st.contains("subnet.env"), "{st}");
    assert!(!has_table(&ns), "nothing installed while waiting");
    std::fs::create_dir_all(env.parent().unwrap()).unwrap();
    std::fs::write(
        &env,
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\n",
    )
    .unwrap();
    until(
        "policy installed once subnet.env exists",
        Duration::from_secs(10),
        || has_table(&ns),
    );
    let r = |c: &str| {
        let (_, a, b) = cidr_range(c);
        vec![(a, b)]
    };
    until("pod set filled", Duration::from_secs(5), || {
        set_ranges(&ns.ruleset(), "pod4") == Some(r("10.244.3.0/24"))
    });
    assert_eq!(
        set_ranges(&ns.ruleset(), "nomasq4"),
        Some(r("10.244.0.0/16"))
    );
    assert!(d.alive());
}
