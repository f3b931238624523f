//! `[metrics] listen`: `masqd run` on node A of the two-node cluster (scripts/cluster.sh) serves
//! `/metrics` and `/healthz` on a loopback port inside node A's namespace; every scrape is made
//! from inside that namespace. The exposition is checked by `promtool check metrics` (Debian's
//! prometheus package, scripts/install-deps.sh), the connection counters against real
//! connections, the repair counters against a deleted table, the health against reconciles that
//! really fail, and bad `metrics.listen` values at start and at reload.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn config(listen: &str) -> String {
    format!("{NODE_A_CONFIG}[metrics]\nlisten = \"{listen}\"\n")
}

/// `masqd run` in a namespace, its stderr in a file; stopped on drop.
struct Run {
    child: Child,
    log: PathBuf,
}

impl Run {
    fn start(ns: &Netns, cfg: &Path, state: &Path, dir: &TempDir) -> Run {
        let log = dir.path().join(format!("masqd-{}.log", fastrand::u32(..)));
        let err = std::fs::File::create(&log).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "env", &nft_variant_path()])
            .arg(env!("CARGO_BIN_EXE_masqd"))
            .args(["--config", cfg.to_str().unwrap()])
            .args(["--state-dir", state.to_str().unwrap()])
            .args(["--log-level", "info", "run"])
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("start masqd run");
        Run { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn hup(&self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    }

    /// Waits for the process to exit (it is killed after `t`): its exit code and log.
    fn exit_within(mut self, t: Duration) -> (Option<i32>, String) {
        let deadline = Instant::now() + t;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return (st.code(), self.log());
            }
            if Instant::now() > deadline {
                return (None, format!("still running after {t:?}:\n{}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the log to contain `what` (15 s).
    fn wait_log(&self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !self.log().contains(what) {
            assert!(
                Instant::now() < deadline,
                "{what:?} never logged:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `/healthz` until it answers `code` (15 s); returns the body.
fn wait_health(ns: &Netns, addr: &str, code: u16, run: &Run) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let got = http_get(ns, addr, "/healthz");
        if let Some((c, body)) = &got {
            if *c == code {
                return body.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "/healthz never answered {code} (last: {got:?}); log:\n{}",
            run.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn value(s: &BTreeMap<String, f64>, key: &str) -> f64 {
    *s.get(key)
        .unwrap_or_else(|| panic!("{key} missing from {:#?}", s.keys().collect::<Vec<_>>()))
}

const MASQ4: &str = r#"masqd_connections_total{ip_family="ipv4",verdict="masqueraded"}"#;
const KEPT4: &str = r#"masqd_connections_total{ip_family="ipv4",verdict="kept"}"#;
const TABLE_GONE: &str = r#"masqd_repairs_total{cause="table_gone"}"#;

/// Scrapes `/metrics`, checks it with `promtool check metrics`, returns the samples.
fn scrape(ns: &Netns, addr: &str) -> BTreeMap<String, f64> {
    let (code, body) = http_get(ns, addr, "/metrics").expect("/metrics answers");
    assert_eq!(code, 200, "{body}");
    let mut p = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package: scripts/install-deps.sh)");
    p.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let o = p.wait_with_output().unwrap();
    assert!(
        o.status.success() && o.stdout.is_empty() && o.stderr.is_empty(),
        "promtool check metrics refused it: {}{}\n{body}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    samples(&body)
}

/// No counter (a `_total`, or a histogram's `_count`/`_sum`/`_bucket`) went down.
fn no_counter_lower(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) {
    for (k, v) in before {
        let name = k.split('{').next().unwrap_or_default();
        let counter = ["_total", "_count", "_sum", "_bucket"]
            .iter()
            .any(|s| name.ends_with(s));
        if counter {
            let now = after.get(k).copied().unwrap_or(-1.0);
            assert!(now >= *v, "{k} went down: {v} → {now}");
        }
    }
}

#[test]
fn metrics_count_real_connections_and_survive_a_deleted_table() {
    let c = Cluster::up("nft");
    let dir = TempDir::new();
    let addr = "127.0.0.1:9816";
    let cfg = dir.write("masqd.toml", &config(addr));
    let state = dir.path().join("state");
    let run = Run::start(&c.a, &cfg, &state, &dir);
    wait_health(&c.a, addr, 200, &run);

    let m0 = scrape(&c.a, addr);
    assert_eq!(
        value(&m0, r#"masqd_build_info{backend="nft",version="0.1.0"}"#),
        1.0
    );
    assert_eq!(
        value(&m0, r#"masqd_set_elements{ip_family="ipv4",set="pod4"}"#),
        1.0
    );
    assert!(value(&m0, "masqd_sync_last_timestamp_seconds") > 1.0e9);
    assert!(value(&m0, "masqd_sync_duration_seconds_count") >= 1.0);

    // N connections to the outside: masqueraded (the outside host sees node A), counted once
    // each; one to pod B: kept (pod B sees pod A).
    let n = 3;
    for i in 0..n {
        let seen = seen_source(&c.pa, &c.out, ip("10.200.0.3"), 8100 + i);
        assert_eq!(seen, Some(ip("10.200.0.1")));
    }
    assert_eq!(
        seen_source(&c.pa, &c.pb, ip("172.7.22.2"), 8110),
        Some(ip("172.7.21.2"))
    );
    let m1 = scrape(&c.a, addr);
    assert_eq!(value(&m1, MASQ4), value(&m0, MASQ4) + f64::from(n));
    assert_eq!(value(&m1, KEPT4), value(&m0, KEPT4) + 1.0);
    no_counter_lower(&m0, &m1);

    // Someone deletes masqd's table: repaired, counted as table_gone, and no counter drops
    // although the kernel's counters start again from zero.
    c.a.ok(&["nft", "delete", "table", "inet", "masqd"]);
    let deadline = Instant::now() + Duration::from_secs(15);
    let m2 = loop {
        let m = scrape(&c.a, addr);
        if value(&m, TABLE_GONE) > value(&m1, TABLE_GONE) {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "no table_gone repair:\n{}",
            run.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(value(&m2, TABLE_GONE), value(&m1, TABLE_GONE) + 1.0);
    no_counter_lower(&m1, &m2);
    for i in 0..2 {
        let seen = seen_source(&c.pa, &c.out, ip("10.200.0.3"), 8120 + i);
        assert_eq!(seen, Some(ip("10.200.0.1")));
    }
    let m3 = scrape(&c.a, addr);
    assert_eq!(value(&m3, MASQ4), value(&m1, MASQ4) + 2.0);
    assert_eq!(value(&m3, KEPT4), value(&m1, KEPT4));
    no_counter_lower(&m2, &m3);

    // Another component's masquerade for the pod CIDR (Docker's `ip docker-bridges` style):
    // overridden by the guard, counted by table once a reload re-reads the other NAT rules.
    let overridden = r#"masqd_overridden_rules{table="ip other"}"#;
    assert!(!m3.contains_key(overridden));
    for cmd in [
        "add table ip other",
        "add chain ip other post { type nat hook postrouting priority srcnat ; }",
        "add rule ip other post ip saddr 172.7.21.0/24 masquerade",
    ] {
        c.a.ok(&["nft", cmd]);
    }
    run.hup();
    let deadline = Instant::now() + Duration::from_secs(15);
    let m4 = loop {
        let m = scrape(&c.a, addr);
        if m.contains_key(overridden) {
            break m;
        }
        assert!(Instant::now() < deadline, "no {overridden}:\n{}", run.log());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(value(&m4, overridden), 1.0);
    no_counter_lower(&m3, &m4);
}

/// Reconciles that really fail: the state file (the record of the removed default rules,
/// read before every change) is corrupt, so every reconcile is refused before it touches the
/// kernel, and retried with back-off. A broken *configuration* would not do: it keeps the
/// last good one and reconciles go on succeeding.
#[test]
fn healthz_is_503_while_reconciles_fail() {
    let c = Cluster::up("nft");
    let dir = TempDir::new();
    let addr = "127.0.0.1:9816";
    let cfg = dir.write("masqd.toml", &config(addr));
    let state = dir.path().join("state");
    let run = Run::start(&c.a, &cfg, &state, &dir);
    assert_eq!(wait_health(&c.a, addr, 200, &run), "ok\n");
    let before = scrape(&c.a, addr);

    let file = state.join("removed-default-rules.json");
    let good = std::fs::read(&file).expect("the daemon recorded the default rule it removed");
    std::fs::write(&file, b"{ not json").unwrap();
    // Make it reconcile: someone deletes its table.
    c.a.ok(&["nft", "delete", "table", "inet", "masqd"]);
    let why = wait_health(&c.a, addr, 503, &run);
    assert!(
        why.starts_with("the last reconcile failed:") && why.contains("removed-default-rules"),
        "{why}"
    );
    assert_eq!(why.lines().count(), 1, "{why}");
    let failing = scrape(&c.a, addr);
    assert!(
        value(&failing, "masqd_sync_failures_total") > value(&before, "masqd_sync_failures_total"),
        "failures not counted"
    );
    no_counter_lower(&before, &failing);

    std::fs::write(&file, good).unwrap();
    assert_eq!(wait_health(&c.a, addr, 200, &run), "ok\n");
    let nft = c.a.ok(&["nft", "list", "table", "inet", "masqd"]);
    assert!(nft.contains("masqd:guard:4"), "{nft}");
}

/// A port held by someone else, inside node A's namespace (the listener stays open while the
/// returned value lives).
fn occupy(ns: &Netns, addr: &str) -> TcpListener {
    let addr: SocketAddr = addr.parse().unwrap();
    ns.run(move || TcpListener::bind(addr).expect("occupy the port"))
}

#[test]
fn bad_listen_values_are_refused_at_start_and_at_reload() {
    let c = Cluster::up("nft");
    let dir = TempDir::new();
    let state = dir.path().join("state");

    // At start: not ADDRESS:PORT nor an absolute path, and a port in use: exit 78, naming
    // the file, the line and the value.
    for (listen, says) in [
        ("localhost:9816", "neither ADDRESS:PORT"),
        ("metrics.sock", "neither ADDRESS:PORT"),
        ("127.0.0.1:9817", "in use"),
    ] {
        let _held = occupy(&c.a, "127.0.0.1:9817");
        let cfg = dir.write("masqd.toml", &config(listen));
        let line = config(listen).lines().count();
        let run = Run::start(&c.a, &cfg, &state, &dir);
        let (code, err) = run.exit_within(Duration::from_secs(15));
        assert_eq!(code, Some(78), "{listen}: {err}");
        let at = format!("{}:{line}: metrics.listen", cfg.display());
        assert!(
            err.contains(&at) && err.contains(listen) && err.contains(says),
            "{listen}: {err}"
        );
    }

    // At reload: the last good configuration (and listener) is kept.
    let addr = "127.0.0.1:9816";
    let cfg = dir.write("masqd.toml", &config(addr));
    let run = Run::start(&c.a, &cfg, &state, &dir);
    wait_health(&c.a, addr, 200, &run);
    let _held = occupy(&c.a, "127.0.0.1:9817");
    let changed = |listen: &str| {
        config(listen).replace(
            "nonmasquerade_cidrs = []",
            "nonmasquerade_cidrs = [\"10.200.0.3/32\"]",
        )
    };
    for bad in ["127.0.0.1:9817", "localhost:9818"] {
        std::fs::write(&cfg, changed(bad)).unwrap();
        run.hup();
        let line = changed(bad).lines().count();
        let at = format!("{}:{line}: metrics.listen", cfg.display());
        let deadline = Instant::now() + Duration::from_secs(15);
        let refused = |log: String| {
            log.lines().any(|l| {
                l.contains("ERROR")
                    && l.contains("keeping the last good one")
                    && l.contains(&at)
                    && l.contains(bad)
            })
        };
        while !refused(run.log()) {
            assert!(
                Instant::now() < deadline,
                "{bad}: not refused:\n{}",
                run.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(http_get(&c.a, addr, "/healthz").map(|r| r.0), Some(200));
        let set = c.a.ok(&["nft", "list", "set", "inet", "masqd", "nomasq4"]);
        assert!(
            !set.contains("10.200.0.3"),
            "{bad}: the new policy was applied: {set}"
        );
    }

    // A good new address: served there, no longer on the old one, and the policy applied.
    let new = "127.0.0.1:9818";
    std::fs::write(&cfg, changed(new)).unwrap();
    run.hup();
    wait_health(&c.a, new, 200, &run);
    run.wait_log("serving /metrics and /healthz on 127.0.0.1:9818");
    assert_eq!(http_get(&c.a, addr, "/healthz"), None);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !c
        .a
        .ok(&["nft", "list", "set", "inet", "masqd", "nomasq4"])
        .contains("10.200.0.3")
    {
        assert!(
            Instant::now() < deadline,
            "new policy not applied:\n{}",
            run.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An absolute unix socket path serves the same endpoints.
#[test]
fn metrics_on_a_unix_socket() {
    let ns = Netns::new("mqm");
    let dir = TempDir::new();
    let sock = dir.path().join("metrics.sock");
    let cfg = dir.write(
        "masqd.toml",
        &format!(
            "{NODE_A_CONFIG}[metrics]\nlisten = \"{}\"\n",
            sock.display()
        ),
    );
    let state = dir.path().join("state");
    let run = Run::start(&ns, &cfg, &state, &dir);
    let deadline = Instant::now() + Duration::from_secs(15);
    let ask = |path: &str| unix_get(&sock, path);
    while ask("/healthz").map(|r| r.0) != Some(200) {
        assert!(Instant::now() < deadline, "no health:\n{}", run.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, body) = ask("/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(
        body.contains("# TYPE masqd_connections_total counter"),
        "{body}"
    );
    drop(run);
    // SIGKILL leaves the socket file; a new daemon takes the stale socket over.
    assert!(sock.exists());
    let run = Run::start(&ns, &cfg, &state, &dir);
    let deadline = Instant::now() + Duration::from_secs(15);
    while ask("/healthz").map(|r| r.0) != Some(200) {
        assert!(
            Instant::now() < deadline,
            "stale socket not taken over:\n{}",
            run.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
