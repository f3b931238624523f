//! `masqd run` follows the nftables event stream instead of reading the ruleset again: in a
//! private network namespace, another writer's churn in its own chains costs masqd no
//! reconcile and no dump (checked on masqd's `masqd_netlink_dumps_total` and reconcile
//! counters), a change where masqd must look costs a reconcile without reading masqd's sets or
//! every rule back, a change to masqd's own set is still repaired (from the followed
//! elements, no read back), rule counts followed from notifications decide a backend as a
//! fresh reading would, and the resync reads no set back while a full verification does.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// 2,000 exception CIDRs in a list file (10.100.0.0/24, 10.100.2.0/24, …: none adjacent, so
/// the set keeps 2,000 intervals).
fn list(dir: &TempDir) -> PathBuf {
    let text: String = (0..2000)
        .map(|i| format!("10.{}.{}.0/24\n", 100 + i / 128, (i % 128) * 2))
        .collect();
    dir.write("exceptions.list", &text)
}

fn config(dir: &TempDir, mode: &str, daemon: &str) -> PathBuf {
    let list = list(dir);
    let sock = dir.path().join("metrics.sock");
    dir.write(
        "masqd.toml",
        &format!(
            "[node]\npod_cidrs = [\"10.55.1.0/24\"]\n[masquerade]\ncluster_cidrs = \
             [\"10.55.0.0/16\"]\nnonmasquerade_cidrs_file = \"{}\"\n[backend]\nmode = \
             \"{mode}\"\n[daemon]\n{daemon}\n[metrics]\nlisten = \"{}\"\n",
            list.display(),
            sock.display()
        ),
    )
}

struct Node {
    ns: Netns,
    dir: TempDir,
    cfg: PathBuf,
    state: PathBuf,
    /// Killed on drop.
    _daemon: Daemon,
}

impl Node {
    /// No resync while a test runs (a slow machine may take a minute): what is counted is
    /// what the notifications cause.
    fn start(mode: &str, before: impl FnOnce(&Netns)) -> Node {
        Node::start_with(mode, "resync_interval = \"24h\"", before)
    }

    /// [`Node::start`] with `daemon` as the `[daemon]` section's keys.
    fn start_with(mode: &str, daemon: &str, before: impl FnOnce(&Netns)) -> Node {
        let ns = Netns::new("mqfw");
        before(&ns);
        let dir = TempDir::new();
        let cfg = config(&dir, mode, daemon);
        let state = dir.path().join("state");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.name])
            .arg(env!("CARGO_BIN_EXE_masqd"))
            .args(["--config", cfg.to_str().unwrap()])
            .args(["--state-dir", state.to_str().unwrap()])
            .args(["--log-level", "info", "run"]);
        let mut daemon = Daemon::spawn(cmd);
        daemon.wait_note("READY=1", Duration::from_secs(20));
        Node {
            ns,
            dir,
            cfg,
            state,
            _daemon: daemon,
        }
    }

    /// The metrics samples (a scrape reads masqd's own chain, never a set).
    fn metrics(&self) -> BTreeMap<String, f64> {
        let sock = self.dir.path().join("metrics.sock");
        let (code, body) = unix_get(&sock, "/metrics").expect("/metrics answers");
        assert_eq!(code, 200);
        samples(&body)
    }

    fn nft(&self, script: &str) {
        let f = self.dir.write("churn.nft", script);
        self.ns.ok(&["nft", "-f", f.to_str().unwrap()]);
    }

    /// Polls the kernel (with `nft get element`, a single lookup) until `check` holds.
    fn wait(&self, what: &str, within: Duration, check: impl Fn(&Netns) -> bool) -> Duration {
        let t = Instant::now();
        while !check(&self.ns) {
            assert!(t.elapsed() < within, "{what}: not within {within:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
        t.elapsed()
    }

    fn backend(&self) -> String {
        let out = self.ns.masqd(&self.cfg, &self.state, &["detect", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("detect --json");
        v["ipv4"]["backend"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

fn dumps(m: &BTreeMap<String, f64>, object: &str) -> f64 {
    m.get(&format!("masqd_netlink_dumps_total{{object=\"{object}\"}}"))
        .copied()
        .unwrap_or(0.0)
}

fn reconciles(m: &BTreeMap<String, f64>) -> f64 {
    m.get("masqd_sync_duration_seconds_count")
        .copied()
        .unwrap_or(-1.0)
}

fn has_element(ns: &Netns, addr: &str) -> bool {
    ns.exec(&[
        "nft",
        "get",
        "element",
        "inet",
        "masqd",
        "nomasq4",
        &format!("{{ {addr} }}"),
    ])
    .status
    .success()
}

/// One `nft` process per commit: `n` rules added to and deleted from `table`/`chain` (which
/// exist).
fn churn(node: &Node, table: &str, chain: &str, n: usize) {
    for i in 0..n {
        let rule = format!("ip daddr 10.96.{}.{} counter return", i / 250, i % 250 + 1);
        node.ns
            .ok_words(&format!("nft add rule ip {table} {chain} {rule}"));
        let handle = node
            .ns
            .ok(&["nft", "-a", "list", "chain", "ip", table, chain])
            .lines()
            .filter(|l| l.contains("counter"))
            .find_map(|l| l.split("# handle ").nth(1).map(|h| h.trim().to_string()))
            .expect("the rule's handle");
        node.ns.ok(&[
            "nft", "delete", "rule", "ip", table, chain, "handle", &handle,
        ]);
    }
}

#[test]
fn churn_in_other_chains_costs_no_reconcile_and_no_dump() {
    require_root();
    // kube-proxy's and a firewall's own chains (creating the nat table is looked at once).
    let node = Node::start("nft", |ns| {
        ns.ok_words("nft add table ip nat");
        ns.ok_words("nft add chain ip nat KUBE-SERVICES");
        ns.ok_words("nft add table ip filter");
        ns.ok_words("nft add chain ip filter KUBE-FIREWALL");
    });
    std::thread::sleep(Duration::from_millis(300));
    let before = node.metrics();
    churn(&node, "nat", "KUBE-SERVICES", 40);
    churn(&node, "filter", "KUBE-FIREWALL", 20);
    std::thread::sleep(Duration::from_millis(500));
    let after = node.metrics();
    eprintln!(
        "120 foreign commits: reconciles {} → {}, set element dumps {} → {}, rule dumps {} → {}",
        reconciles(&before),
        reconciles(&after),
        dumps(&before, "set_element"),
        dumps(&after, "set_element"),
        dumps(&before, "rule"),
        dumps(&after, "rule")
    );
    assert_eq!(reconciles(&after), reconciles(&before), "no reconcile");
    for object in ["set_element", "rule", "chain_rules", "chain", "table"] {
        assert_eq!(
            dumps(&after, object),
            dumps(&before, object),
            "{object} dumps"
        );
    }
}

#[test]
fn a_change_where_masqd_looks_costs_no_dump_of_its_sets_or_every_rule() {
    require_root();
    let node = Node::start("nft", |_| {});
    node.nft("add table ip nat\nadd chain ip nat POSTROUTING { type nat hook postrouting priority srcnat; }\n");
    node.wait(
        "the reconcile after ip nat POSTROUTING",
        Duration::from_secs(5),
        |_| reconciles(&node.metrics()) >= 2.0,
    );
    std::thread::sleep(Duration::from_millis(300));
    let before = node.metrics();
    // Not a broad rule (it masquerades another source): nothing to change, but masqd looks.
    for i in 0..5 {
        node.ns.ok_words(&format!(
            "nft add rule ip nat POSTROUTING ip saddr 192.168.{i}.0/24 masquerade"
        ));
    }
    node.wait(
        "a rule in POSTROUTING is looked at",
        Duration::from_secs(10),
        |_| reconciles(&node.metrics()) > reconciles(&before),
    );
    std::thread::sleep(Duration::from_millis(300));
    let after = node.metrics();
    assert_eq!(
        dumps(&after, "set_element"),
        dumps(&before, "set_element"),
        "masqd's 2,000-interval set is not read back: the notifications say no one touched it"
    );
    assert_eq!(
        dumps(&after, "rule"),
        dumps(&before, "rule"),
        "detection's rule counts are followed, not dumped"
    );
    let out = node.ns.masqd(&node.cfg, &node.state, &["plan"]);
    assert_eq!(out.status.code(), Some(0), "in sync");
}

#[test]
fn a_change_to_masqds_own_set_is_still_repaired() {
    require_root();
    let node = Node::start("nft", |_| {});
    let before = node.metrics();
    for addr in ["10.100.2.7", "10.101.0.1", "10.55.3.3"] {
        assert!(has_element(&node.ns, addr), "{addr} is an exception");
        node.ns.ok_words(&format!(
            "nft delete element inet masqd nomasq4 {{ {} }}",
            interval_of(addr)
        ));
        let took = node.wait(&format!("{addr} back"), Duration::from_secs(3), |ns| {
            has_element(ns, addr)
        });
        eprintln!("{addr}: deleted element back after {took:?}");
    }
    // An exception someone else slipped in is taken out again.
    node.ns
        .ok_words("nft add element inet masqd nomasq4 { 192.0.2.0/24 }");
    let took = node.wait("192.0.2.9 gone", Duration::from_secs(3), |ns| {
        !has_element(ns, "192.0.2.9")
    });
    eprintln!("an element added by someone else gone after {took:?}");
    let after = node.metrics();
    assert_eq!(
        dumps(&after, "set_element"),
        dumps(&before, "set_element"),
        "someone else's element changes are followed from the notifications, not read back"
    );
    assert_eq!(
        node.ns
            .masqd(&node.cfg, &node.state, &["plan"])
            .status
            .code(),
        Some(0)
    );
}

/// The interval of the set that holds `addr`, as `nft delete element` needs it written.
fn interval_of(addr: &str) -> String {
    match addr {
        "10.55.3.3" => "10.55.0.0/16".into(),
        a => {
            let mut o: Vec<&str> = a.split('.').collect();
            o[3] = "0/24";
            o.join(".")
        }
    }
}

#[test]
fn followed_rule_counts_decide_as_a_fresh_reading_would() {
    require_root();
    // A rule in each: auto mode picks nftables ("rules in both").
    let node = Node::start("auto", |ns| {
        ns.ok_words("iptables-legacy -t filter -A INPUT -s 192.0.2.1 -j ACCEPT");
        ns.ok_words("nft add table ip other");
        ns.ok_words("nft add chain ip other c");
        ns.ok_words("nft add rule ip other c counter");
    });
    assert_eq!(node.backend(), "nft");
    let masq_rule = |ns: &Netns| {
        ns.exec(&["nft", "list", "chain", "inet", "masqd", "postrouting"])
            .stdout
            .windows(11)
            .any(|w| w == b"masquerade\n" || w == b" masquerade")
    };
    assert!(masq_rule(&node.ns), "the policy lives in nftables");
    std::thread::sleep(Duration::from_millis(300));
    let before = node.metrics();
    // The only nftables rule goes (not a chain masqd looks at; its count crosses zero), then
    // masqd's table. With its own policy nowhere, detection decides by the counts again: 0 in
    // nftables, 1 in legacy xtables — legacy, which is what a fresh reading says.
    node.nft("flush chain ip other c\n");
    std::thread::sleep(Duration::from_millis(300));
    node.ns.ok_words("nft delete table inet masqd");
    let took = node.wait(
        "the policy in legacy xtables",
        Duration::from_secs(5),
        |ns| legacy_save(ns, false, Some("nat")).contains("-A MASQD-POSTROUTING"),
    );
    eprintln!("table deleted → policy rebuilt in legacy xtables after {took:?}");
    assert!(!masq_rule(&node.ns), "only the guard stays in nftables");
    assert_eq!(
        dumps(&node.metrics(), "rule"),
        dumps(&before, "rule"),
        "the counts were followed from the notifications, not dumped"
    );
    assert_eq!(node.backend(), "legacy");
}

#[test]
fn the_resync_reads_no_set_back_and_the_full_verification_does() {
    require_root();
    let resync = Node::start_with("nft", "resync_interval = \"1s\"", |_| {});
    let full = Node::start_with(
        "nft",
        "full_verify_interval = \"1s\"\nresync_interval = \"24h\"",
        |_| {},
    );
    let (r0, f0) = (resync.metrics(), full.metrics());
    std::thread::sleep(Duration::from_millis(3500));
    let (r1, f1) = (resync.metrics(), full.metrics());
    assert!(
        reconciles(&r1) >= reconciles(&r0) + 2.0,
        "resyncs ran: {} → {}",
        reconciles(&r0),
        reconciles(&r1)
    );
    assert_eq!(
        dumps(&r1, "set_element"),
        dumps(&r0, "set_element"),
        "a resync takes the sets from what it followed"
    );
    assert_eq!(dumps(&r1, "rule"), dumps(&r0, "rule"), "and the counts");
    assert!(
        dumps(&f1, "set_element") >= dumps(&f0, "set_element") + 2.0,
        "each full verification reads the sets back: {} → {}",
        dumps(&f0, "set_element"),
        dumps(&f1, "set_element")
    );
    assert!(
        dumps(&f1, "rule") > dumps(&f0, "rule"),
        "and counts every rule"
    );
}
