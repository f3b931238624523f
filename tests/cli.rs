//! The command line keeps its word (issue 10, item 5): usage errors exit 64 so that `plan`'s 2
//! means only "changes pending"; `status` reports per family, counts connections (one
//! connection of many packets counts once), shows the recorded removed rules, exits 3 out of
//! sync and prints errors as JSON under `--json`; `export` loads twice into one copy with
//! `nft -f -` and, on a legacy node, is the `iptables-legacy-restore --noflush` payload plus
//! the guard-only nft chain; `detect` runs without a config; a run without privileges names
//! root / CAP_NET_ADMIN; `teardown` lists what it restored and removed and warns when there is
//! no record. Every command runs in private network namespaces.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Output;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const CFG: &str = r#"
[node]
pod_cidrs = ["172.7.21.0/24", "fd00:7:21::/64"]
[masquerade]
cluster_cidrs = ["172.7.0.0/16", "fd00:7::/32"]
bridge_interfaces = ["docker0"]
"#;

const BROAD4: &str =
    "iptables-nft -t nat -A POSTROUTING -s 172.7.21.0/24 ! -o docker0 -j MASQUERADE";
const BROAD6: &str =
    "ip6tables-nft -t nat -A POSTROUTING -s fd00:7:21::/64 ! -o docker0 -j MASQUERADE";

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn code(o: &Output) -> Option<i32> {
    o.status.code()
}

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn setup(prefix: &str) -> (Netns, TempDir, std::path::PathBuf, std::path::PathBuf) {
    let ns = Netns::new(prefix);
    let dir = TempDir::new();
    let cfg = dir.write("masqd.toml", CFG);
    let state = dir.path().join("state");
    (ns, dir, cfg, state)
}

#[test]
fn usage_errors_exit_64_help_and_version_exit_0() {
    let (ns, _dir, cfg, state) = setup("mqusage");
    for args in [
        &["--bogus"][..],
        &["frobnicate"],
        &["status", "--bogus"],
        &["export", "--format", "yaml"],
        &[],
    ] {
        let o = ns.masqd(&cfg, &state, args);
        assert_eq!(code(&o), Some(64), "{args:?}: {}", text(&o.stderr));
        assert!(!text(&o.stderr).is_empty(), "{args:?} says why");
    }
    for args in [&["--help"][..], &["--version"], &["status", "--help"]] {
        let o = ns.masqd(&cfg, &state, args);
        assert_eq!(code(&o), Some(0), "{args:?}: {}", text(&o.stderr));
        assert!(!text(&o.stdout).is_empty(), "{args:?} prints");
    }
}

#[test]
fn plan_2_and_status_3_only_out_of_sync_per_family_with_the_recorded_rules() {
    let (ns, dir, cfg, state) = setup("mqsync");
    ns.ok_words(BROAD4);
    ns.ok_words(BROAD6);
    ns.masqd_ok(&cfg, &state, &["plan"], 2);
    let st = json(&ns.masqd_ok(&cfg, &state, &["status", "--json"], 3));
    assert_eq!(st["in_sync"], false, "{st}");
    assert_eq!(st["removed_rules"], serde_json::json!([]), "{st}");
    ns.masqd_ok(&cfg, &state, &["status"], 3);

    ns.masqd_ok(&cfg, &state, &["apply"], 0);
    ns.masqd_ok(&cfg, &state, &["plan"], 0);
    let st = json(&ns.masqd_ok(&cfg, &state, &["status", "--json"], 0));
    assert_eq!(st["in_sync"], true, "{st}");
    for (f, d) in [("ipv4", 4), ("ipv6", 6)] {
        let fs = &st[f];
        assert_eq!(fs["backend"], "nft", "{st}");
        assert_eq!(fs["sets"][format!("pod{d}")], 1, "{st}");
        assert_eq!(fs["sets"][format!("nomasq{d}")], 1, "{st}");
        assert_eq!(fs["masqueraded_connections"], 0, "{st}");
        assert_eq!(fs["kept_connections"], 0, "{st}");
    }
    assert!(st.get("masqueraded_packets").is_none(), "{st}");
    // The broad rules masqd removed are shown, as recorded for teardown.
    let removed = st["removed_rules"].as_array().unwrap();
    assert_eq!(removed.len(), 2, "{st}");
    for (fam, net) in [("ip", "172.7.21.0/24"), ("ip6", "fd00:7:21::/64")] {
        let r = removed
            .iter()
            .find(|r| r["family"] == fam)
            .unwrap_or_else(|| panic!("no {fam} record in {st}"));
        assert_eq!((&r["backend"], &r["table"]), (&"nft".into(), &"nat".into()));
        assert!(r["rule"].as_str().unwrap().contains(net), "{r}");
    }
    let human = ns.masqd_ok(&cfg, &state, &["status"], 0);
    assert!(
        human.contains("removed default rules (restored by teardown):"),
        "{human}"
    );
    assert!(
        human.contains("ip nat POSTROUTING: oifname != \"docker0\" ip saddr 172.7.21.0/24"),
        "{human}"
    );
    assert!(human.contains("ipv6 (nft):"), "{human}");

    // Drift: out of sync again, plan 2 and status 3.
    ns.ok_words("nft delete element inet masqd nomasq4 { 172.7.0.0/16 }");
    ns.masqd_ok(&cfg, &state, &["plan"], 2);
    let st = json(&ns.masqd_ok(&cfg, &state, &["status", "--json"], 3));
    assert_eq!(st["ipv4"]["sets"]["nomasq4"], 0, "{st}");
    assert_eq!(st["ipv6"]["sets"]["nomasq6"], 1, "{st}");
    // A broken config is an error (1), never "out of sync" (3) nor "changes pending" (2).
    let bad = dir.write("bad.toml", "[node]\npod_cidrs = [\"nope\"]\n");
    for cmd in ["plan", "status"] {
        let o = ns.masqd(&bad, &state, &[cmd]);
        assert_eq!(code(&o), Some(1), "{cmd}: {}", text(&o.stderr));
    }
}

/// Accepts one connection in `ns` and echoes what it reads until the peer closes.
fn serve_echo(ns: &Netns, bind: SocketAddr) -> std::thread::JoinHandle<()> {
    let path = format!("/run/netns/{}", ns.name);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open netns");
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let l = TcpListener::bind(bind).expect("bind");
        l.set_nonblocking(true).unwrap();
        ready_tx.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut s = loop {
            match l.accept() {
                Ok((s, _)) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("no connection: {e}"),
            }
        };
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 64];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    });
    ready_rx.recv().unwrap();
    h
}

/// One TCP connection from `client` to `to` carrying `rounds` request/answer exchanges (so at
/// least `rounds` packets each way); true when every answer came back.
fn chatty_connection(client: &Netns, server: &Netns, to: SocketAddr, rounds: usize) -> bool {
    let bind = SocketAddr::new(
        if to.is_ipv4() {
            "0.0.0.0".parse().unwrap()
        } else {
            "::".parse().unwrap()
        },
        to.port(),
    );
    let h = serve_echo(server, bind);
    let ok = client.run(move || {
        let Ok(mut s) = TcpStream::connect_timeout(&to, Duration::from_secs(5)) else {
            return false;
        };
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        for i in 0..rounds {
            let msg = format!("ping {i:04}\n");
            let mut back = vec![0u8; msg.len()];
            if s.write_all(msg.as_bytes()).is_err() || s.read_exact(&mut back).is_err() {
                return false;
            }
            if back != msg.as_bytes() {
                return false;
            }
        }
        true
    });
    h.join().expect("echo server");
    ok
}

fn counters(st: &Value, f: &str) -> (u64, u64) {
    (
        st[f]["masqueraded_connections"].as_u64().unwrap(),
        st[f]["kept_connections"].as_u64().unwrap(),
    )
}

#[test]
fn status_counts_connections_not_packets() {
    let c = Cluster::up("nft");
    let dir = TempDir::new();
    let cfg = dir.write("masqd.toml", CFG);
    let state = dir.path().join("state");
    c.a.masqd_ok(&cfg, &state, &["apply"], 0);
    let status = || json(&c.a.masqd_ok(&cfg, &state, &["status", "--json"], 0));
    let ip = |s: &str| -> std::net::IpAddr { s.parse().unwrap() };

    for (f, out, pod_b) in [
        ("ipv4", ip("10.200.0.3"), ip("172.7.22.2")),
        ("ipv6", ip("fd00:200::3"), ip("fd00:7:22::2")),
    ] {
        let other = if f == "ipv4" { "ipv6" } else { "ipv4" };
        let st0 = status();
        // One connection to the outside, 20 round trips: masqueraded once.
        assert!(chatty_connection(
            &c.pa,
            &c.out,
            SocketAddr::new(out, 8301),
            20
        ));
        let st1 = status();
        let (m0, k0) = counters(&st0, f);
        let (m1, k1) = counters(&st1, f);
        assert_eq!((m1 - m0, k1 - k0), (1, 0), "{f}: {st0}\n{st1}");
        // One connection to pod B, 20 round trips: kept once.
        assert!(chatty_connection(
            &c.pa,
            &c.pb,
            SocketAddr::new(pod_b, 8302),
            20
        ));
        let st2 = status();
        let (m2, k2) = counters(&st2, f);
        assert_eq!((m2 - m1, k2 - k1), (0, 1), "{f}: {st1}\n{st2}");
        // The other family counted nothing.
        assert_eq!(counters(&st0, other), counters(&st2, other), "{st2}");
    }
}

#[test]
fn json_errors_are_json_on_stdout() {
    let (ns, dir, _cfg, state) = setup("mqjerr");
    let missing = dir.path().join("absent.toml");
    let broken = dir.write("broken.toml", "[node]\npod_cidrs = [\"10.244.3.1/24\"]\n");
    for (cfg, cmd, needle) in [
        (&missing, "status", "absent.toml"),
        (&broken, "status", "did you mean 10.244.3.0/24"),
    ] {
        let o = ns.masqd(cfg, &state, &[cmd, "--json"]);
        assert_eq!(code(&o), Some(1), "{cmd}: {}", text(&o.stderr));
        let v = json(&text(&o.stdout));
        let e = v["error"].as_str().unwrap_or_else(|| panic!("{v}"));
        assert!(e.contains(needle), "{cmd}: {e}");
    }
    // `detect` still works with a broken configuration and says why in its JSON.
    let o = ns.masqd(&broken, &state, &["detect", "--json"]);
    assert_eq!(code(&o), Some(0), "{}", text(&o.stderr));
    let v = json(&text(&o.stdout));
    assert!(
        v["note"]
            .as_str()
            .is_some_and(|n| n.contains("broken.toml")),
        "{v}"
    );
}

/// Pipes `input` into a command run in `ns` and asserts success.
fn pipe(ns: &Netns, args: &[&str], input: &str) {
    use std::process::{Command, Stdio};
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}\ninput:\n{input}",
        text(&o.stderr)
    );
}

fn own_tables(ns: &Netns) -> usize {
    objects(&ns.ruleset(), "table")
        .into_iter()
        .filter(|t| t["family"] == "inet" && t["name"] == "masqd")
        .count()
}

#[test]
fn nft_export_through_stdin_twice_leaves_one_copy_in_sync() {
    let (ns, _dir, cfg, state) = setup("mqexpn");
    for args in [&["export"][..], &["export", "--format", "nft"]] {
        for _ in 0..2 {
            let export = ns.masqd_ok(&cfg, &state, args, 0);
            assert!(export.contains("table inet masqd {"), "{export}");
            pipe(&ns, &["nft", "-f", "-"], &export);
        }
        assert_eq!(own_tables(&ns), 1);
        let rs = ns.ruleset();
        assert_eq!(rules(&rs, "inet", "masqd", "postrouting").len(), 6, "{rs}");
        ns.masqd_ok(&cfg, &state, &["plan"], 0);
    }
}

#[test]
fn legacy_node_exports_the_restore_payload_and_the_guard_only_chain() {
    let (ns, _dir, cfg, state) = setup("mqexpl");
    // Legacy rules of other components, none in nftables: a legacy node.
    ns.ok_words("iptables-legacy -t nat -A POSTROUTING -s 10.9.0.0/24 -j MASQUERADE");
    ns.ok_words("ip6tables-legacy -t nat -A POSTROUTING -s fd00:9::/64 -j MASQUERADE");
    let d = json(&ns.masqd_ok(&cfg, &state, &["detect", "--json"], 0));
    assert_eq!(
        (&d["ipv4"]["backend"], &d["ipv6"]["backend"]),
        (&"legacy".into(), &"legacy".into())
    );
    for round in 0..2 {
        // The default format on a legacy node is the restore payload (IPv4 first).
        let v4 = ns.masqd_ok(&cfg, &state, &["export"], 0);
        assert!(
            v4.contains("\n*nat\n") && !v4.contains("table inet"),
            "{v4}"
        );
        assert!(v4.contains("-s 172.7.21.0/24 -j MASQUERADE"), "{v4}");
        pipe(&ns, &["iptables-legacy-restore", "--noflush"], &v4);
        let v6 = ns.masqd_ok(
            &cfg,
            &state,
            &["export", "--format", "iptables", "--family", "ipv6"],
            0,
        );
        assert!(v6.contains("-s fd00:7:21::/64 -j MASQUERADE"), "{v6}");
        pipe(&ns, &["ip6tables-legacy-restore", "--noflush"], &v6);
        // The nft export is the guard-only chain legacy mode keeps: no masquerade of its own.
        let nft = ns.masqd_ok(&cfg, &state, &["export", "--format", "nft"], 0);
        assert!(
            nft.contains("snat ip to ip saddr") && !nft.contains("masquerade"),
            "{nft}"
        );
        pipe(&ns, &["nft", "-f", "-"], &nft);
        ns.masqd_ok(&cfg, &state, &["plan"], 0);
        let save = legacy_save(&ns, false, Some("nat"));
        let jumps = save.matches("--comment masqd -j MASQD-POSTROUTING").count();
        assert_eq!(jumps, 1, "round {round}: {save}");
        assert_eq!(own_tables(&ns), 1);
    }
    let st = json(&ns.masqd_ok(&cfg, &state, &["status", "--json"], 0));
    assert_eq!(st["ipv4"]["backend"], "legacy", "{st}");
    assert_eq!(st["ipv4"]["sets"]["legacy-chain"], 3, "{st}");
}

#[test]
fn detect_works_without_a_config_file() {
    let (ns, dir, _cfg, state) = setup("mqdetn");
    let none = dir.path().join("no-such.toml");
    let out = ns.masqd_ok(&none, &state, &["detect"], 0);
    assert!(out.contains("no config file at"), "{out}");
    // An invalid one does not hide the facts either, and says why.
    let bad = dir.write("bad.toml", "[node]\npod_cidrs = [\"10.0.0.1/33\"]\n");
    let out = ns.masqd_ok(&bad, &state, &["detect"], 0);
    assert!(
        out.contains("the configuration is invalid") && out.contains("bad.toml:2"),
        "{out}"
    );
    assert!(out.contains("ipv4: "), "{out}");
    assert!(
        out.contains("ipv4: nft") && out.contains("ipv6: nft"),
        "{out}"
    );
    let d = json(&ns.masqd_ok(&none, &state, &["detect", "--json"], 0));
    for f in ["ipv4", "ipv6"] {
        assert!(
            d[f]["backend"].is_string() && d[f]["facts"].is_object(),
            "{d}"
        );
    }
    assert!(d.get("overridden").is_none(), "{d}");
    assert!(d["note"].as_str().unwrap().contains("overridden"), "{d}");
    // With legacy rules it decides legacy, still without a policy.
    ns.ok_words("iptables-legacy -t nat -A POSTROUTING -s 10.9.0.0/24 -j MASQUERADE");
    let d = json(&ns.masqd_ok(&none, &state, &["detect", "--json"], 0));
    assert_eq!(d["ipv4"]["backend"], "legacy", "{d}");
}

#[test]
fn without_privileges_the_error_names_root_and_cap_net_admin() {
    let (ns, dir, cfg, state) = setup("mqperm");
    const HINT: &str = "masqd needs root or CAP_NET_ADMIN (and CAP_NET_RAW for legacy iptables)";
    for cmd in ["status", "plan", "detect", "export", "apply", "teardown"] {
        let o = as_nobody(&ns, &cfg, &state, &[cmd]);
        let err = text(&o.stderr);
        assert_eq!(code(&o), Some(1), "{cmd}: {err}");
        assert!(err.contains(HINT), "{cmd}: {err}");
    }
    let o = as_nobody(&ns, &cfg, &state, &["status", "--json"]);
    assert_eq!(code(&o), Some(1));
    let v = json(&text(&o.stdout));
    assert!(v["error"].as_str().unwrap().contains(HINT), "{v}");
    assert!(!ns.ruleset_text().contains("masqd"), "nothing was written");
    // With every family in nftables by configuration, export needs no kernel.
    let nft_cfg = dir.write("nft.toml", &format!("{CFG}[backend]\nmode = \"nft\"\n"));
    let o = as_nobody(&ns, &nft_cfg, &state, &["export"]);
    assert_eq!(code(&o), Some(0), "{}", text(&o.stderr));
    assert!(text(&o.stdout).contains("masquerade comment \"masqd:masquerade:6\""));
}

#[test]
fn teardown_lists_what_it_restored_and_warns_without_a_record() {
    let (ns, _dir, cfg, state) = setup("mqtdn");
    ns.ok_words(BROAD4);
    ns.ok_words(BROAD6);
    ns.masqd_ok(&cfg, &state, &["apply"], 0);
    let o = ns.masqd(&cfg, &state, &["teardown"]);
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert_eq!(code(&o), Some(0), "{err}");
    for want in [
        "restored: ip nat POSTROUTING: oifname != \"docker0\" ip saddr 172.7.21.0/24 masquerade",
        "restored: ip6 nat POSTROUTING: oifname != \"docker0\" ip6 saddr fd00:7:21::/64 masquerade",
        "removed: table inet masqd",
    ] {
        assert!(out.contains(want), "{want:?} in:\n{out}");
    }
    assert!(!err.contains("warning"), "{err}");
    // Nothing recorded any more: it says so, and that nothing of masqd's was left.
    let o = ns.masqd(&cfg, &state, &["teardown"]);
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert_eq!(code(&o), Some(0), "{err}");
    assert!(
        err.contains("warning") && err.contains("holds no record"),
        "{err}"
    );
    assert!(out.contains("removed: nothing"), "{out}");
    assert!(!out.contains("restored:"), "{out}");

    // Legacy mode: the restored legacy rule and the removed chain and jump, each named.
    let (ns, dir, _cfg, state) = setup("mqtdl");
    let cfg = dir.write(
        "legacy.toml",
        &format!("{CFG}[backend]\nmode = \"legacy\"\n"),
    );
    ns.ok_words(
        "iptables-legacy -t nat -A POSTROUTING -s 172.7.21.0/24 ! -o docker0 -j MASQUERADE",
    );
    ns.masqd_ok(&cfg, &state, &["apply"], 0);
    let out = ns.masqd_ok(&cfg, &state, &["teardown"], 0);
    for want in [
        "restored: iptables-legacy -t nat -A POSTROUTING -s 172.7.21.0/24 ! -o docker0 -j MASQUERADE",
        "removed: iptables-legacy: chain nat MASQD-POSTROUTING (3 rules) and 1 jump(s) from POSTROUTING",
        "removed: ip6tables-legacy: chain nat MASQD-POSTROUTING",
        "removed: table inet masqd",
    ] {
        assert!(out.contains(want), "{want:?} in:\n{out}");
    }
}
