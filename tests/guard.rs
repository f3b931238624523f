//! Exceptions always win (design.md §3.1): on a node where other components masquerade pod
//! traffic at the same time — the broad rule in legacy xtables, the broad rule in
//! iptables-nft, a Docker-29-style `docker-bridges` table, a kube-proxy-like table that
//! masquerades marked packets — masqd's guard keeps the pod source for excepted destinations,
//! in nft mode and in legacy mode, with real TCP between namespaces. And it holds under churn:
//! a broad rule re-inserted every 40 ms while `masqd run` runs.

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const NODE_A: &str = r#"
[node]
pod_cidrs = ["172.7.21.0/24", "fd00:7:21::/64"]
[masquerade]
cluster_cidrs = ["172.7.0.0/16", "fd00:7::/32"]
bridge_interfaces = ["docker0"]
[backend]
mode = "MODE"
"#;

/// Docker 29's nftables layout for the bridge docker0 (its masquerade reached through a
/// verdict map), for both families.
fn docker_bridges(fam: &str, saddr: &str) -> String {
    format!(
        "table {fam} docker-bridges {{
	map nat-postrouting-in-interfaces {{
		type ifname : verdict
		elements = {{ \"docker0\" : jump nat-postrouting-in__docker0 }}
	}}
	chain nat-POSTROUTING {{
		type nat hook postrouting priority srcnat; policy accept;
		iifname vmap @nat-postrouting-in-interfaces
	}}
	chain nat-postrouting-in__docker0 {{
		oifname != \"docker0\" {fam} saddr {saddr} counter masquerade
	}}
}}
"
    )
}

/// A kube-proxy-like table: connections to pod B on `port` are marked 0x4000 before routing,
/// and marked packets are masqueraded at srcnat (kube-proxy's nftables `masquerading` chain).
fn kube_proxy(port: u16) -> String {
    format!(
        "table ip kube-proxy {{
	chain mark-for-masquerade {{
		type filter hook prerouting priority mangle; policy accept;
		ip daddr 172.7.22.2 tcp dport {port} meta mark set meta mark | 0x4000
	}}
	chain masquerading {{
		type nat hook postrouting priority srcnat; policy accept;
		meta mark & 0x4000 == 0 return
		meta mark set meta mark ^ 0x4000
		masquerade fully-random
	}}
}}
"
    )
}

fn nft_load(ns: &Netns, text: &str) {
    let dir = TempDir::new();
    let f = dir.write("rules.nft", text);
    ns.ok(&["nft", "-f", f.to_str().unwrap()]);
}

/// A `nft list table` listing without its counter values (they move with traffic).
fn strip_counters(listing: &str) -> String {
    listing
        .lines()
        .map(|l| {
            let words: Vec<&str> = l.split(' ').collect();
            let mut out = Vec::new();
            let mut i = 0;
            while i < words.len() {
                if words[i] == "packets" || words[i] == "bytes" {
                    i += 2;
                    continue;
                }
                out.push(words[i]);
                i += 1;
            }
            out.join(" ") + "\n"
        })
        .collect()
}

/// Node A carrying every other masquerade at once: the broad rule in iptables-nft (written
/// by cluster.sh), the same in legacy xtables, and Docker-29-style tables.
fn crowded_cluster() -> Cluster {
    let c = Cluster::up("nft");
    c.a.ok_words(
        "iptables-legacy -t nat -A POSTROUTING -s 172.7.21.0/24 ! -o docker0 -j MASQUERADE",
    );
    c.a.ok_words(
        "ip6tables-legacy -t nat -A POSTROUTING -s fd00:7:21::/64 ! -o docker0 -j MASQUERADE",
    );
    nft_load(
        &c.a,
        &(docker_bridges("ip", "172.7.21.0/24") + &docker_bridges("ip6", "fd00:7:21::/64")),
    );
    c
}

fn exceptions_win(mode: &str) {
    let c = crowded_cluster();
    let dir = TempDir::new();
    let cfg = dir.write("masqd.toml", &NODE_A.replace("MODE", mode));
    let state = dir.path().join("state");
    // The bug, reproduced through every one of them.
    assert_eq!(
        seen_source(&c.pa, &c.pb, ip("172.7.22.2"), 8201),
        Some(ip("10.200.0.1"))
    );
    let docker4 = c.a.ok(&["nft", "list", "table", "ip", "docker-bridges"]);
    let docker6 = c.a.ok(&["nft", "list", "table", "ip6", "docker-bridges"]);

    c.a.masqd_ok(&cfg, &state, &["apply"], 0);
    assert_eq!(
        c.a.ok(&["nft", "list", "table", "ip", "docker-bridges"]),
        docker4,
        "Docker's table is never modified"
    );
    assert_eq!(
        c.a.ok(&["nft", "list", "table", "ip6", "docker-bridges"]),
        docker6
    );

    let port = if mode == "nft" { 8210 } else { 8220 };
    assert_eq!(
        seen_source(&c.pa, &c.pb, ip("172.7.22.2"), port),
        Some(ip("172.7.21.2")),
        "{mode}: pod B sees pod A"
    );
    assert_eq!(
        seen_source(&c.pa, &c.pb, ip("fd00:7:22::2"), port + 1),
        Some(ip("fd00:7:21::2"))
    );
    assert_eq!(
        seen_source(&c.pa, &c.out, ip("10.200.0.3"), port + 2),
        Some(ip("10.200.0.1")),
        "{mode}: the outside sees node A"
    );
    assert_eq!(
        seen_source(&c.pa, &c.out, ip("fd00:200::3"), port + 3),
        Some(ip("fd00:200::1"))
    );

    let st: Value =
        serde_json::from_str(&c.a.masqd_ok(&cfg, &state, &["status", "--json"], 0)).unwrap();
    assert_eq!(st["in_sync"], true, "{st}");
    let over = st["overridden"].as_array().unwrap();
    for (fam, net) in [("ip", "172.7.21.0/24"), ("ip6", "fd00:7:21::/64")] {
        let table = format!("{fam} docker-bridges");
        let o = over
            .iter()
            .find(|o| o["table"] == table.as_str())
            .unwrap_or_else(|| panic!("{table} not named in {st}"));
        assert_eq!(o["chain"], "nat-postrouting-in__docker0");
        assert!(o["handle"].as_u64().unwrap() > 0);
        assert!(o["rule"].as_str().unwrap().contains(net), "{o}");
        assert!(
            o["reason"]
                .as_str()
                .unwrap()
                .starts_with("overridden by masqd's guard for 1 excepted CIDR"),
            "{o}"
        );
    }
    // The broad rules of ip nat and legacy POSTROUTING were removed (hygiene).
    assert!(rules(&c.a.ruleset(), "ip", "nat", "POSTROUTING").is_empty());
    assert!(!legacy_save(&c.a, false, Some("nat")).contains("-s 172.7.21.0/24 ! -o docker0"));
    // The human status names it too.
    let text = c.a.masqd_ok(&cfg, &state, &["status"], 0);
    assert!(
        text.contains("ip docker-bridges nat-postrouting-in__docker0 handle"),
        "{text}"
    );
    // Docker's table still byte-identical but for its counters.
    assert_eq!(
        strip_counters(&c.a.ok(&["nft", "list", "table", "ip", "docker-bridges"])),
        strip_counters(&docker4)
    );
}

#[test]
fn exceptions_win_against_every_other_masquerade_nft_mode() {
    exceptions_win("nft");
}

#[test]
fn exceptions_win_against_every_other_masquerade_legacy_mode() {
    exceptions_win("legacy");
}

fn marked_left_to_marker(mode: &str) {
    let c = crowded_cluster();
    nft_load(&c.a, &kube_proxy(8301));
    let dir = TempDir::new();
    let cfg = dir.write("masqd.toml", &NODE_A.replace("MODE", mode));
    let state = dir.path().join("state");
    c.a.masqd_ok(&cfg, &state, &["apply"], 0);
    assert_eq!(
        seen_source(&c.pa, &c.pb, ip("172.7.22.2"), 8301),
        Some(ip("10.200.0.1")),
        "{mode}: a marked connection is left to the chain that marked it"
    );
    assert_eq!(
        seen_source(&c.pa, &c.pb, ip("172.7.22.2"), 8302),
        Some(ip("172.7.21.2")),
        "{mode}: an unmarked one keeps pod A's source"
    );
    // Turned off, the mark is ignored and the guard claims the marked connection too.
    let off = NODE_A
        .replace("MODE", mode)
        .replace("bridge_interfaces", "honor_marks = []\nbridge_interfaces");
    dir.write("masqd.toml", &off);
    c.a.masqd_ok(&cfg, &state, &["apply"], 0);
    assert_eq!(
        seen_source(&c.pa, &c.pb, ip("172.7.22.2"), 8301),
        Some(ip("172.7.21.2"))
    );
}

#[test]
fn marked_connections_are_left_to_the_marker_nft_mode() {
    marked_left_to_marker("nft");
}

#[test]
fn marked_connections_are_left_to_the_marker_legacy_mode() {
    marked_left_to_marker("legacy");
}

/// `masqd run` in a namespace, killed on drop; its log goes to `log`.
struct Run(Child);

impl Run {
    fn start(ns: &Netns, cfg: &Path, state: &Path, log: &Path) -> Run {
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, env!("CARGO_BIN_EXE_masqd")])
            .args(["--config", cfg.to_str().unwrap()])
            .args(["--state-dir", state.to_str().unwrap(), "run"])
            .stdout(Stdio::null())
            .stderr(File::create(log).unwrap())
            .spawn()
            .expect("masqd run");
        let run = Run(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while ns.masqd(cfg, state, &["plan"]).status.code() != Some(0) {
            assert!(Instant::now() < deadline, "masqd run never got in sync");
            std::thread::sleep(Duration::from_millis(50));
        }
        run
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Accepts connections in `ns` on `port` until `stop`; returns the peers seen, counted.
fn count_peers(
    ns: &Netns,
    port: u16,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<BTreeMap<IpAddr, usize>> {
    let path = format!("/run/netns/{}", ns.name);
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        nix::sched::setns(
            File::open(&path).unwrap(),
            nix::sched::CloneFlags::CLONE_NEWNET,
        )
        .unwrap();
        let l = TcpListener::bind(SocketAddr::new(ip("0.0.0.0"), port)).unwrap();
        l.set_nonblocking(true).unwrap();
        ready_tx.send(()).unwrap();
        let mut seen = BTreeMap::new();
        loop {
            match l.accept() {
                Ok((_, peer)) => *seen.entry(peer.ip()).or_insert(0) += 1,
                Err(_) if stop.load(Ordering::SeqCst) => return seen,
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    });
    ready.recv().unwrap();
    h
}

/// Re-inserts the broad rule at the head of POSTROUTING every 40 ms (for at least 6 s and 150
/// re-inserts) while pod A
/// opens a new connection to pod B every 10 ms under `masqd run`; returns the peers pod B
/// saw and how many re-inserts ran.
fn churn(mode: &str, writer: &str) -> (BTreeMap<IpAddr, usize>, usize) {
    let c = Cluster::up(writer);
    let dir = TempDir::new();
    let cfg = dir.write("masqd.toml", &NODE_A.replace("MODE", mode));
    let state = dir.path().join("state");
    let log = dir.path().join("masqd.log");
    let _run = Run::start(&c.a, &cfg, &state, &log);
    let stop = Arc::new(AtomicBool::new(false));
    let server = count_peers(&c.pb, 8400, stop.clone());
    let client_stop = Arc::new(AtomicBool::new(false));
    let cs = client_stop.clone();
    let pa = format!("/run/netns/{}", c.pa.name);
    let client = std::thread::spawn(move || {
        nix::sched::setns(
            File::open(&pa).unwrap(),
            nix::sched::CloneFlags::CLONE_NEWNET,
        )
        .unwrap();
        let to = SocketAddr::new(ip("172.7.22.2"), 8400);
        let mut failed = 0;
        while !cs.load(Ordering::SeqCst) {
            if TcpStream::connect_timeout(&to, Duration::from_secs(2)).is_err() {
                failed += 1;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        failed
    });
    let bin = format!("iptables-{writer}");
    // At least 6 s and 150 re-inserts (a loaded machine runs the writer slower), at most 30 s.
    let start = Instant::now();
    let mut inserts = 0;
    while (start.elapsed() < Duration::from_secs(6) || inserts < 150)
        && start.elapsed() < Duration::from_secs(30)
    {
        let t = Instant::now();
        c.a.ok(&[
            &bin,
            "-w",
            "-t",
            "nat",
            "-I",
            "POSTROUTING",
            "1",
            "-s",
            "172.7.21.0/24",
            "!",
            "-o",
            "docker0",
            "-j",
            "MASQUERADE",
        ]);
        inserts += 1;
        if let Some(rest) = Duration::from_millis(40).checked_sub(t.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    client_stop.store(true, Ordering::SeqCst);
    let failed = client.join().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    let seen = server.join().unwrap();
    assert_eq!(failed, 0, "every connection was accepted");
    // The daemon also removed the re-added rule each time (hygiene): it ends in sync.
    let deadline = Instant::now() + Duration::from_secs(15);
    while c.a.masqd(&cfg, &state, &["plan"]).status.code() != Some(0) {
        assert!(
            Instant::now() < deadline,
            "the daemon never removed the broad rule"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Removing a re-added broad rule is hygiene, never rate-limited like a fight over
    // masqd's own table.
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("reconciled after"), "{log}");
    assert!(!log.contains("repairs are now limited"), "{log}");
    (seen, inserts)
}

fn assert_no_wrong_source(mode: &str, writer: &str) {
    let (seen, inserts) = churn(mode, writer);
    let total: usize = seen.values().sum();
    eprintln!("churn {mode}/{writer}: {inserts} re-inserts, peers {seen:?}");
    assert!(inserts >= 60, "the writer ran ({inserts} re-inserts)");
    assert!(
        total >= 200,
        "enough connections to mean something: {total}"
    );
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        vec![ip("172.7.21.2")],
        "{mode}: zero connections arrived with node A's address"
    );
}

#[test]
fn churn_of_the_broad_rule_never_leaks_nft_mode() {
    assert_no_wrong_source("nft", "nft");
}

#[test]
fn churn_of_the_broad_rule_never_leaks_legacy_mode() {
    assert_no_wrong_source("legacy", "legacy");
}

/// Runs `masqd detect --json` in `ns` with `PATH` set.
fn detect_with_path(ns: &Netns, cfg: &Path, state: &Path, path: &str) -> Value {
    let o = Command::new("ip")
        .args(["netns", "exec", &ns.name, "env", &format!("PATH={path}")])
        .arg(env!("CARGO_BIN_EXE_masqd"))
        .args(["--config", cfg.to_str().unwrap()])
        .args(["--state-dir", state.to_str().unwrap(), "detect", "--json"])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "detect: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn no_rules_anywhere_follows_the_system_iptables() {
    let ns = Netns::new("mqsys");
    let dir = TempDir::new();
    let cfg = dir.write("masqd.toml", &NODE_A.replace("MODE", "auto"));
    let state = dir.path().join("state");
    let names = tables_names(&ns);
    for (variant, want) in [("legacy", "legacy"), ("nft", "nft")] {
        let bin = dir.path().join(format!("bin-{variant}"));
        std::fs::create_dir_all(&bin).unwrap();
        for cmd in ["iptables", "ip6tables"] {
            // Debian's alternatives: iptables -> /usr/sbin/iptables-<variant> -> xtables-…-multi
            let _ = std::fs::remove_file(bin.join(cmd));
            std::os::unix::fs::symlink(format!("/usr/sbin/{cmd}-{variant}"), bin.join(cmd))
                .unwrap();
        }
        let path = format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", bin.display());
        let d = detect_with_path(&ns, &cfg, &state, &path);
        for fam in ["ipv4", "ipv6"] {
            assert_eq!(d[fam]["backend"], want, "{variant}: {d}");
            let reason = d[fam]["reason"].as_str().unwrap();
            assert!(
                reason.contains("system default") && reason.contains(variant),
                "{reason}"
            );
        }
        assert_eq!(
            tables_names(&ns),
            names,
            "detection created no legacy table"
        );
    }
    // Nothing on PATH at all: nftables.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let d = detect_with_path(&ns, &cfg, &state, empty.to_str().unwrap());
    assert_eq!(d["ipv4"]["backend"], "nft", "{d}");
    assert_eq!(tables_names(&ns), names);
}

#[test]
fn detect_names_the_guard_and_the_overridden_rules() {
    let c = crowded_cluster();
    let dir = TempDir::new();
    let cfg = dir.write("masqd.toml", &NODE_A.replace("MODE", "legacy"));
    let state = dir.path().join("state");
    let text = c.a.masqd_ok(&cfg, &state, &["detect"], 0);
    assert!(
        text.contains("guard") && text.contains("srcnat - 1"),
        "{text}"
    );
    assert!(text.contains("ip6 docker-bridges"), "{text}");
    let d: Value =
        serde_json::from_str(&c.a.masqd_ok(&cfg, &state, &["detect", "--json"], 0)).unwrap();
    assert!(d["overridden"].as_array().unwrap().len() >= 4, "{d}");
    // A masquerade that runs before the guard is named as NOT overridden, and it really wins.
    nft_load(
        &c.a,
        "table ip early {\n\tchain post {\n\t\ttype nat hook postrouting priority srcnat - 10; policy accept;\n\t\tip saddr 172.7.21.0/24 tcp dport 8501 masquerade\n\t}\n}\n",
    );
    let d: Value =
        serde_json::from_str(&c.a.masqd_ok(&cfg, &state, &["detect", "--json"], 0)).unwrap();
    let early = d["overridden"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["table"] == "ip early")
        .unwrap_or_else(|| panic!("ip early not listed: {d}"))
        .clone();
    assert!(
        early["reason"]
            .as_str()
            .unwrap()
            .starts_with("NOT overridden: it runs at priority 90"),
        "{early}"
    );
    c.a.masqd_ok(&cfg, &state, &["apply"], 0);
    assert_eq!(
        seen_source(&c.pa, &c.pb, ip("172.7.22.2"), 8501),
        Some(ip("10.200.0.1")),
        "a chain before the guard wins, as status says"
    );
    c.a.ok(&["nft", "delete", "table", "ip", "early"]);
    // After apply in legacy mode the guard is in nftables, and detection still says legacy
    // (the guard is not masqd's nft policy: no flip-flop).
    c.a.masqd_ok(&cfg, &state, &["apply"], 0);
    let auto = dir.write("auto.toml", &NODE_A.replace("MODE", "auto"));
    let d: Value =
        serde_json::from_str(&c.a.masqd_ok(&auto, &state, &["detect", "--json"], 0)).unwrap();
    assert_eq!(d["ipv4"]["backend"], "legacy", "{d}");
    assert_eq!(d["ipv4"]["facts"]["nft_masqd"], false, "{d}");
    c.a.masqd_ok(&auto, &state, &["plan"], 0);
}
