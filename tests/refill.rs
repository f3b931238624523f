//! Large sets are replaced, not read back: `apply` onto an existing set at or above the refill
//! threshold (100,000 wanted ranges; `MASQD_REFILL_AT` lowers it for tests) flushes and refills
//! it in its one transaction. Checked against `nft -j list set` computed independently of
//! masqd: exactly the wanted contents whatever was there (foreign elements added, wanted ones
//! deleted); pod traffic to an excepted address keeps its source while the replace runs; and
//! `masqd run` started onto an existing 1,000,000-element set becomes READY without a dump,
//! its RSS printed (asserted only with a generous bound).

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// The `n` /32 exceptions of the list file: every other address from 11.0.0.0 (none merge),
/// leaving out the indices in `skip`.
fn list(n: u32, skip: &[u32]) -> String {
    let mut out = String::with_capacity(n as usize * 16);
    for i in (0..n).filter(|i| !skip.contains(i)) {
        let a = std::net::Ipv4Addr::from(0x0b00_0000 + 2 * i);
        out.push_str(&format!("{a}/32\n"));
    }
    out
}

/// The ranges nomasq4 must hold for `list`: its lines and the cluster CIDR, computed here.
fn expected(list: &str) -> Vec<(u128, u128)> {
    let mut v: Vec<(u128, u128)> = list
        .lines()
        .map(|l| {
            let (_, a, b) = cidr_range(l);
            (a, b)
        })
        .collect();
    let (_, a, b) = cidr_range("172.7.0.0/16");
    v.push((a, b));
    merge(v)
}

const CONFIG: &str = r#"[node]
pod_cidrs = ["172.7.21.0/24"]
[masquerade]
cluster_cidrs = ["172.7.0.0/16"]
bridge_interfaces = ["docker0"]
nonmasquerade_cidrs_file = "extra.list"
"#;

/// `masqd apply` in `ns` with `MASQD_REFILL_AT` set when `at` is given; asserts exit 0.
fn apply(ns: &Netns, cfg: &Path, state: &Path, at: Option<&str>) -> String {
    let mut v = vec!["env".to_string(), nft_variant_path()];
    if let Some(at) = at {
        v.push(format!("MASQD_REFILL_AT={at}"));
    }
    v.extend([env!("CARGO_BIN_EXE_masqd").to_string(), "--config".into()]);
    v.push(cfg.to_str().unwrap().into());
    v.extend(["--state-dir".into(), state.to_str().unwrap().into()]);
    v.push("apply".into());
    let args: Vec<&str> = v.iter().map(String::as_str).collect();
    let o = ns.exec(&args);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "apply: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

/// nomasq4 as `nft -j list set` shows it, merged.
fn nomasq4(ns: &Netns) -> Vec<(u128, u128)> {
    let rs: serde_json::Value =
        serde_json::from_str(&ns.ok(&["nft", "-j", "list", "set", "inet", "masqd", "nomasq4"]))
            .expect("nft -j output");
    set_ranges(&rs, "nomasq4").expect("set nomasq4")
}

/// Puts wrong contents into nomasq4 behind masqd's back: two foreign intervals added, two
/// wanted ones deleted.
fn spoil(ns: &Netns) {
    ns.ok_words("nft add element inet masqd nomasq4 { 10.250.0.0/16, 192.0.2.0/24 }");
    ns.ok_words("nft delete element inet masqd nomasq4 { 11.0.0.4/32, 11.0.0.200/32 }");
}

#[test]
fn a_large_set_is_replaced_whole_and_holds_exactly_the_wanted_contents() {
    let ns = Netns::new("mqrf");
    let dir = TempDir::new();
    let cfg = dir.write("masqd.toml", CONFIG);
    let state = dir.path().join("state");
    dir.write("extra.list", &list(120_000, &[]));
    apply(&ns, &cfg, &state, None);
    spoil(&ns);
    // One line gone, the rest as before: the set is not read back but flushed and refilled.
    let want = list(120_000, &[7]);
    dir.write("extra.list", &want);
    let out = apply(&ns, &cfg, &state, None);
    assert!(out.contains("flush set inet masqd nomasq4"), "{out}");
    assert!(
        out.contains("add element inet masqd nomasq4 (120000 intervals)"),
        "{out}"
    );
    assert_eq!(nomasq4(&ns), expected(&want));
    // `plan` still reads the set back: in sync, nothing to do (exit 0).
    ns.masqd_ok(&cfg, &state, &["plan"], 0);
}

#[test]
fn below_the_threshold_the_set_is_diffed_and_a_forced_threshold_replaces_it() {
    let ns = Netns::new("mqrf");
    let dir = TempDir::new();
    let cfg = dir.write("masqd.toml", CONFIG);
    let state = dir.path().join("state");
    let want = list(300, &[]);
    dir.write("extra.list", &want);
    apply(&ns, &cfg, &state, None);
    spoil(&ns);
    let out = apply(&ns, &cfg, &state, None);
    assert!(
        !out.contains("flush set"),
        "300 ranges are read back: {out}"
    );
    assert_eq!(nomasq4(&ns), expected(&want));
    spoil(&ns);
    let out = apply(&ns, &cfg, &state, Some("100"));
    assert!(out.contains("flush set inet masqd nomasq4"), "{out}");
    assert!(!out.contains("flush set inet masqd pod4"), "{out}");
    assert_eq!(nomasq4(&ns), expected(&want));
}

#[test]
fn pod_traffic_to_an_exception_keeps_its_source_while_the_set_is_replaced() {
    let c = Cluster::up("nft");
    let dir = TempDir::new();
    let cfg = dir.write("masqd.toml", CONFIG);
    let state = dir.path().join("state");
    dir.write("extra.list", &list(120_000, &[]));
    apply(&c.a, &cfg, &state, None);
    let stop = Arc::new(AtomicBool::new(false));
    let (pa, pb) = (
        Netns {
            name: c.pa.name.clone(),
        },
        Netns {
            name: c.pb.name.clone(),
        },
    );
    let flag = stop.clone();
    let prober = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut port = 8400;
        while !flag.load(Ordering::SeqCst) {
            let t = Instant::now();
            seen.push((t, seen_source(&pa, &pb, ip("172.7.22.2"), port)));
            port += 1;
        }
        // The namespaces belong to the cluster: never delete them from here.
        std::mem::forget(pa);
        std::mem::forget(pb);
        seen
    });
    std::thread::sleep(Duration::from_millis(300));
    let mut windows = Vec::new();
    for skip in [3, 5, 9] {
        dir.write("extra.list", &list(120_000, &[skip]));
        let t = Instant::now();
        let out = apply(&c.a, &cfg, &state, None);
        windows.push((t, Instant::now()));
        assert!(out.contains("flush set inet masqd nomasq4"), "{out}");
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let seen = prober.join().expect("prober");
    let during = seen
        .iter()
        .filter(|(t, _)| windows.iter().any(|(a, b)| t >= a && t <= b))
        .count();
    println!(
        "{} connections, {during} started while a replace ran",
        seen.len()
    );
    assert!(during > 0, "no connection overlapped a replace");
    for (_, s) in &seen {
        assert_eq!(*s, Some(ip("172.7.21.2")), "pod B sees pod A: {seen:?}");
    }
}

/// VmRSS of a process in KiB.
fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

#[test]
fn run_onto_a_million_existing_elements_is_ready_without_a_dump() {
    let ns = Netns::new("mqrf");
    let dir = TempDir::new();
    let cfg = dir.write("masqd.toml", CONFIG);
    let state = dir.path().join("state");
    dir.write("extra.list", &list(1_000_000, &[]));
    let t = Instant::now();
    apply(&ns, &cfg, &state, None);
    let from_empty = t.elapsed();
    // One line gone: the daemon's first reconcile must change the set. (No `nft` command may
    // touch a set this large here: it reads the whole set first, for minutes.)
    dir.write("extra.list", &list(1_000_000, &[4]));
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name, env!("CARGO_BIN_EXE_masqd")])
        .args(["--config", cfg.to_str().unwrap()])
        .args(["--state-dir", state.to_str().unwrap()])
        .args(["--log-level", "info", "run"]);
    let t = Instant::now();
    let mut d = Daemon::spawn(cmd);
    // A dump of 1,000,000 intervals takes a minute and more; a replace about an apply.
    d.wait_note("READY=1", from_empty * 3 + Duration::from_secs(20));
    let ready = t.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let rss = rss_kib(d.child.id());
    println!(
        "1,000,000 exceptions: apply from empty {from_empty:?}, run READY onto them {ready:?}, \
         RSS {rss} KiB"
    );
    assert!(rss < 1024 * 1024, "RSS {rss} KiB");
    assert!(d.alive(), "the daemon runs on");
}
