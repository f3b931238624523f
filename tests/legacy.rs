//! Backend detection and the legacy iptables backend with the real binaries, each test in its
//! own network namespaces; oracles: `iptables-legacy-save`, `nft -j list ruleset`, the
//! `/proc/net/ip*_tables_names` files and real traffic.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

const CFG: &str = NODE_A_TOML;

fn detect(ns: &Netns, cfg: &Path, state: &Path) -> Value {
    serde_json::from_str(&ns.masqd_ok(cfg, state, &["detect", "--json"], 0)).unwrap()
}

fn backends(d: &Value) -> (String, String) {
    (
        d["ipv4"]["backend"].as_str().unwrap().to_string(),
        d["ipv6"]["backend"].as_str().unwrap().to_string(),
    )
}

fn setup() -> (Netns, TempDir, std::path::PathBuf, std::path::PathBuf) {
    let ns = Netns::new("mqlg");
    let dir = TempDir::new();
    let cfg = dir.write("masqd.toml", CFG);
    let state = dir.path().join("state");
    (ns, dir, cfg, state)
}

fn nft_tables(ns: &Netns) -> Vec<String> {
    objects(&ns.ruleset(), "table")
        .iter()
        .map(|t| {
            format!(
                "{} {}",
                t["family"].as_str().unwrap(),
                t["name"].as_str().unwrap()
            )
        })
        .collect()
}

#[test]
fn nothing_anywhere_is_nft_and_probing_creates_nothing() {
    let (ns, dir, cfg, state) = setup();
    // A legacy save that would leave a mark if it were ever run.
    let marker = dir.path().join("ran");
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for name in ["iptables-legacy-save", "ip6tables-legacy-save"] {
        let p = bin.join(name);
        std::fs::write(&p, format!("#!/bin/sh\ntouch {}\n", marker.display())).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let before = tables_names(&ns);
    let path = format!("PATH={}:/usr/sbin:/usr/bin:/sbin:/bin", bin.display());
    let o = ns.masqd_with(&[], &path, &cfg, &state, &["detect", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let d: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(backends(&d), ("nft".into(), "nft".into()));
    assert!(
        d["ipv4"]["reason"]
            .as_str()
            .unwrap()
            .contains("no rules anywhere"),
        "{d}"
    );
    assert!(
        !marker.exists(),
        "no legacy binary runs while no legacy table is loaded"
    );
    assert_eq!(tables_names(&ns), before, "no legacy table created");
    assert!(nft_tables(&ns).is_empty(), "no nft table created");
}

#[test]
fn nft_rules_only_is_nft() {
    let (ns, _dir, cfg, state) = setup();
    ns.ok_words("iptables-nft -t filter -A INPUT -s 10.1.1.1 -j ACCEPT");
    assert_eq!(backends(&detect(&ns, &cfg, &state)).0, "nft");
}

#[test]
fn legacy_rules_detected_twice_identically_without_side_effects() {
    let (ns, _dir, cfg, state) = setup();
    ns.ok_words("iptables-legacy -t nat -A POSTROUTING -s 10.9.0.0/24 -j MASQUERADE");
    let names = tables_names(&ns);
    let save4 = legacy_save(&ns, false, None);
    let save6 = legacy_save(&ns, true, None);
    let d1 = detect(&ns, &cfg, &state);
    let d2 = detect(&ns, &cfg, &state);
    assert_eq!(d1, d2, "same answer twice");
    // IPv6 has no evidence of its own and follows IPv4 (design.md §4 step 5).
    assert_eq!(
        backends(&d1),
        ("legacy".into(), "legacy".into()),
        "IPv6 follows IPv4's legacy evidence"
    );
    assert!(
        d1["ipv6"]["reason"]
            .as_str()
            .unwrap()
            .contains("follows ipv4"),
        "{d1}"
    );
    assert_eq!(d1["ipv4"]["facts"]["legacy_rules"], 1);
    assert_eq!(
        tables_names(&ns),
        names,
        "/proc/net/ip*_tables_names byte-identical"
    );
    assert_eq!(legacy_save(&ns, false, None), save4);
    assert_eq!(legacy_save(&ns, true, None), save6);
}

#[test]
fn empty_legacy_tables_are_not_rules() {
    let (ns, _dir, cfg, state) = setup();
    // Listing creates the tables, with no rules in them.
    ns.ok(&["iptables-legacy", "-t", "nat", "-L", "-n"]);
    ns.ok(&["iptables-legacy", "-t", "filter", "-L", "-n"]);
    let d = detect(&ns, &cfg, &state);
    assert_eq!(
        d["ipv4"]["facts"]["legacy_tables"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(d["ipv4"]["facts"]["legacy_rules"], 0);
    assert_eq!(backends(&d).0, "nft");
    assert_eq!(detect(&ns, &cfg, &state), d, "stable on the second run");
}

#[test]
fn hint_chains_decide_and_must_match_whole_names() {
    // Hint in legacy, while nftables holds more rules → legacy.
    let (ns, _dir, cfg, state) = setup();
    ns.ok_words("iptables-legacy -t mangle -N KUBE-IPTABLES-HINT");
    for i in 1..=3 {
        ns.ok(&[
            "iptables-nft",
            "-A",
            "INPUT",
            "-s",
            &format!("10.1.1.{i}"),
            "-j",
            "ACCEPT",
        ]);
    }
    let d = detect(&ns, &cfg, &state);
    assert_eq!(backends(&d).0, "legacy", "{d}");
    assert!(d["ipv4"]["reason"]
        .as_str()
        .unwrap()
        .contains("KUBE-IPTABLES-HINT"));

    // The mirror case → nft.
    let (ns, _dir, cfg, state) = setup();
    ns.ok(&["iptables-nft", "-t", "mangle", "-N", "KUBE-KUBELET-CANARY"]);
    for i in 1..=3 {
        ns.ok(&[
            "iptables-legacy",
            "-A",
            "INPUT",
            "-s",
            &format!("10.1.1.{i}"),
            "-j",
            "ACCEPT",
        ]);
    }
    assert_eq!(backends(&detect(&ns, &cfg, &state)).0, "nft");

    // A hint name inside a comment or a longer chain name is no hint.
    let (ns, _dir, cfg, state) = setup();
    ns.ok_words("iptables-legacy -t mangle -N KUBE-IPTABLES-HINT-X");
    ns.ok_words("iptables-legacy -A INPUT -m comment --comment KUBE-IPTABLES-HINT -j ACCEPT");
    ns.ok_words("iptables-nft -A INPUT -s 10.1.1.1 -j ACCEPT");
    let d = detect(&ns, &cfg, &state);
    assert!(d["ipv4"]["facts"]["legacy_hint_chains"]
        .as_array()
        .unwrap()
        .is_empty());
    assert_eq!(backends(&d).0, "nft");
}

#[test]
fn own_objects_keep_the_backend() {
    let (ns, dir, _cfg, state) = setup();
    let forced = dir.write(
        "forced.toml",
        &format!("{CFG}[backend]\nmode = \"legacy\"\n"),
    );
    let auto = dir.write("auto.toml", CFG);
    ns.masqd_ok(&forced, &state, &["apply"], 0);
    // Lots of nft rules appear; masqd's chain keeps IPv4 and IPv6 in legacy.
    for i in 1..=5 {
        ns.ok(&[
            "iptables-nft",
            "-A",
            "INPUT",
            "-s",
            &format!("10.1.1.{i}"),
            "-j",
            "ACCEPT",
        ]);
        ns.ok(&[
            "ip6tables-nft",
            "-A",
            "INPUT",
            "-s",
            &format!("fd00::{i}"),
            "-j",
            "ACCEPT",
        ]);
    }
    let d = detect(&ns, &auto, &state);
    assert_eq!(backends(&d), ("legacy".into(), "legacy".into()), "{d}");
    assert!(d["ipv4"]["reason"].as_str().unwrap().contains("own policy"));
    ns.masqd_ok(&auto, &state, &["plan"], 0);

    // Switching to nft moves everything and removes the stale legacy objects.
    let nft = dir.write("nft.toml", &format!("{CFG}[backend]\nmode = \"nft\"\n"));
    ns.masqd_ok(&nft, &state, &["apply"], 0);
    assert!(!legacy_save(&ns, false, Some("nat")).contains("MASQD"));
    assert!(!legacy_save(&ns, true, Some("nat")).contains("MASQD"));
    assert!(nft_tables(&ns).contains(&"inet masqd".to_string()));
    let d = detect(&ns, &auto, &state);
    assert_eq!(backends(&d), ("nft".into(), "nft".into()), "{d}");
}

#[test]
fn missing_legacy_binaries_with_legacy_rules_is_a_clear_error() {
    let (ns, _dir, cfg, state) = setup();
    ns.ok_words("iptables-legacy -t nat -A POSTROUTING -s 172.7.21.0/24 -j MASQUERADE");
    let before_save = legacy_save(&ns, false, None);
    let before_nft = ns.ruleset_text();
    for cmd in ["apply", "detect"] {
        let o = ns.masqd_with(&[], "PATH=/nonexistent", &cfg, &state, &[cmd]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{cmd}: {err}");
        assert!(
            err.contains("legacy tables are loaded (nat)"),
            "{cmd}: {err}"
        );
        assert!(
            err.contains("iptables-legacy-save is not on PATH"),
            "{cmd}: {err}"
        );
        assert!(err.contains("install the iptables package"), "{cmd}: {err}");
    }
    assert_eq!(
        legacy_save(&ns, false, None),
        before_save,
        "nothing changed"
    );
    assert_eq!(ns.ruleset_text(), before_nft, "nothing changed");

    // Forcing legacy without the binaries is refused too; forcing nft works.
    let dir = TempDir::new();
    let forced = dir.write("l.toml", &format!("{CFG}[backend]\nmode = \"legacy\"\n"));
    let o = ns.masqd_with(&[], "PATH=/nonexistent", &forced, &state, &["apply"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("backend.mode = \"legacy\" but iptables-legacy-save and iptables-legacy-restore not found"), "{err}");
    assert_eq!(ns.ruleset_text(), before_nft);
}

#[test]
fn shell_characters_never_reach_a_process() {
    let (ns, dir, _cfg, state) = setup();
    let pwned = dir.path().join("pwned");
    let cfg = dir.write(
        "masqd.toml",
        &CFG.replace("\"docker0\"", &format!("\"x;touch {}\"", pwned.display()))
            .replace("[node]", "[backend]\nmode = \"legacy\"\n[node]"),
    );
    let o = ns.masqd(&cfg, &state, &["apply"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("bridge_interfaces"));
    assert!(!pwned.exists(), "no file was created");
    assert!(!legacy_save(&ns, false, None).contains("MASQD"));
}

#[test]
fn mixed_node_default_rules_removed_in_both_backends() {
    // Docker in legacy, kube-proxy-ish rules in nft, backend forced to nft: the legacy default
    // rule goes too, and teardown puts both back.
    let (ns, dir, _cfg, state) = setup();
    let cfg = dir.write("masqd.toml", &format!("{CFG}[backend]\nmode = \"nft\"\n"));
    ns.ok_words(
        "iptables-legacy -t nat -A POSTROUTING -s 172.7.21.0/24 ! -o docker0 -j MASQUERADE",
    );
    ns.ok_words("iptables-nft -t nat -A POSTROUTING -s 172.7.21.0/24 -j MASQUERADE");
    let legacy_before = legacy_save(&ns, false, Some("nat"));
    ns.masqd_ok(&cfg, &state, &["apply"], 0);
    assert!(!legacy_save(&ns, false, Some("nat")).contains("-A POSTROUTING"));
    assert!(rules(&ns.ruleset(), "ip", "nat", "POSTROUTING").is_empty());
    ns.masqd_ok(&cfg, &state, &["plan"], 0);
    let out = ns.masqd_ok(&cfg, &state, &["teardown"], 0);
    assert!(out.contains("restored 2"), "{out}");
    assert_eq!(legacy_save(&ns, false, Some("nat")), legacy_before);
    assert_eq!(rules(&ns.ruleset(), "ip", "nat", "POSTROUTING").len(), 1);
}

#[test]
fn end_to_end_in_legacy() {
    let c = Cluster::up("legacy");
    let dir = TempDir::new();
    let cfg = dir.write("masqd.toml", CFG);
    let state = dir.path().join("state");
    assert_eq!(
        seen_source(&c.pa, &c.pb, ip("172.7.22.2"), 8101),
        Some(ip("10.200.0.1")),
        "bug reproduced"
    );

    let d = detect(&c.a, &cfg, &state);
    assert_eq!(backends(&d), ("legacy".into(), "legacy".into()), "{d}");
    c.a.masqd_ok(&cfg, &state, &["apply"], 0);
    // The policy lives in legacy xtables; nftables holds only the guard (design.md §3.2):
    // the bridge and honoured-mark returns and the identity SNAT, no masquerade of its own.
    assert_eq!(nft_tables(&c.a), vec!["inet masqd".to_string()]);
    let guard: Vec<String> = rules(&c.a.ruleset(), "inet", "masqd", "postrouting")
        .into_iter()
        .map(|(_, r)| r)
        .collect();
    assert_eq!(guard.len(), 4, "{guard:?}");
    assert_eq!(guard[0], "meta.oifname == docker0 return", "{guard:?}");
    assert_eq!(guard[1], "meta.mark & 16384 == 16384 return", "{guard:?}");
    assert_eq!(
        guard[2],
        "ip.saddr == @pod4 ip.daddr == @nomasq4 counter snat(ip to ip.saddr)"
    );
    assert_eq!(
        guard[3],
        "ip6.saddr == @pod6 ip6.daddr == @nomasq6 counter snat(ip6 to ip6.saddr)"
    );
    assert!(!guard.iter().any(|r| r.contains("masquerade")), "{guard:?}");

    assert_eq!(
        seen_source(&c.pa, &c.pb, ip("172.7.22.2"), 8102),
        Some(ip("172.7.21.2"))
    );
    assert_eq!(
        seen_source(&c.pa, &c.pb, ip("fd00:7:22::2"), 8103),
        Some(ip("fd00:7:21::2"))
    );
    assert_eq!(
        seen_source(&c.pa, &c.out, ip("10.200.0.3"), 8104),
        Some(ip("10.200.0.1"))
    );
    assert_eq!(
        seen_source(&c.pa, &c.out, ip("fd00:200::3"), 8105),
        Some(ip("fd00:200::1"))
    );
    let st: Value =
        serde_json::from_str(&c.a.masqd_ok(&cfg, &state, &["status", "--json"], 0)).unwrap();
    assert_eq!(st["backend"], "legacy");
    assert_eq!(st["in_sync"], true);
    for f in ["ipv4", "ipv6"] {
        assert!(
            st[f]["masqueraded_connections"].as_u64().unwrap() >= 1,
            "{st}"
        );
        assert!(st[f]["kept_connections"].as_u64().unwrap() >= 1, "{st}");
    }

    // Docker restarts: its rule comes back at the head of POSTROUTING. The guard claims the
    // excepted connection before legacy xtables run, so the source is right even before
    // masqd removes the rule again.
    c.a.ok_words(
        "iptables-legacy -t nat -I POSTROUTING 1 -s 172.7.21.0/24 ! -o docker0 -j MASQUERADE",
    );
    assert_eq!(
        seen_source(&c.pa, &c.pb, ip("172.7.22.2"), 8106),
        Some(ip("172.7.21.2"))
    );
    c.a.masqd_ok(&cfg, &state, &["plan"], 2);
    c.a.masqd_ok(&cfg, &state, &["apply"], 0);
    let save = legacy_save(&c.a, false, Some("nat"));
    let post: Vec<&str> = save
        .lines()
        .filter(|l| l.starts_with("-A POSTROUTING"))
        .collect();
    assert_eq!(
        post,
        vec!["-A POSTROUTING -m comment --comment masqd -j MASQD-POSTROUTING"],
        "{save}"
    );
    assert_eq!(
        seen_source(&c.pa, &c.pb, ip("172.7.22.2"), 8107),
        Some(ip("172.7.21.2"))
    );

    c.a.masqd_ok(&cfg, &state, &["teardown"], 0);
    let save = legacy_save(&c.a, false, Some("nat"));
    assert!(!save.contains("MASQD"), "{save}");
    assert!(
        save.contains("-A POSTROUTING -s 172.7.21.0/24 ! -o docker0 -j MASQUERADE"),
        "{save}"
    );
    assert!(legacy_save(&c.a, true, Some("nat"))
        .contains("-A POSTROUTING -s fd00:7:21::/64 ! -o docker0 -j MASQUERADE"));
    assert_eq!(
        seen_source(&c.pa, &c.pb, ip("172.7.22.2"), 8108),
        Some(ip("10.200.0.1"))
    );
}
