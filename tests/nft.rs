//! The nftables backend against the real kernel, one network namespace per test, with
//! `nft -j list ruleset` as the oracle.

mod common;

use common::*;
use serde_json::Value;

const BASE: &str = r#"
[node]
pod_cidrs = ["172.7.21.0/24", "fd00:7:21::/64"]
[masquerade]
cluster_cidrs = ["172.7.0.0/16", "fd00:7::/32"]
nonmasquerade_cidrs = ["169.254.0.0/16", "255.255.255.0/24", "ffff::/16"]
bridge_interfaces = ["docker0"]
"#;

fn handles(rs: &Value) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = Vec::new();
    for kind in ["table", "chain", "set", "rule"] {
        for o in objects(rs, kind) {
            if o["family"] == "inet" && (o["name"] == "masqd" || o["table"] == "masqd") {
                v.push((
                    format!("{kind}:{}", o["name"].as_str().unwrap_or("")),
                    o["handle"].as_u64().unwrap(),
                ));
            }
        }
    }
    v
}

#[test]
fn layout_matches_design() {
    let ns = Netns::new("mqlay");
    let dir = TempDir::new();
    let cfg = dir.write("masqd.toml", BASE);
    let state = dir.path().join("state");
    ns.masqd_ok(&cfg, &state, &["apply"], 0);
    let rs = ns.ruleset();

    let tables: Vec<_> = objects(&rs, "table");
    assert_eq!(tables.len(), 1, "only masqd's table: {rs}");
    assert_eq!(tables[0]["family"], "inet");
    assert_eq!(tables[0]["name"], "masqd");

    let chains = objects(&rs, "chain");
    assert_eq!(chains.len(), 1);
    let c = chains[0];
    assert_eq!(
        (
            c["name"].as_str(),
            c["type"].as_str(),
            c["hook"].as_str(),
            c["prio"].as_i64(),
            c["policy"].as_str()
        ),
        (
            Some("postrouting"),
            Some("nat"),
            Some("postrouting"),
            Some(99), // srcnat - 1: before every other NAT chain at the hook
            Some("accept")
        )
    );

    for (name, ty) in [
        ("pod4", "ipv4_addr"),
        ("nomasq4", "ipv4_addr"),
        ("pod6", "ipv6_addr"),
        ("nomasq6", "ipv6_addr"),
    ] {
        let s = objects(&rs, "set")
            .into_iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("set {name}"));
        assert_eq!(s["type"], ty);
        assert_eq!(s["flags"], serde_json::json!(["interval"]));
    }
    assert_eq!(
        set_ranges(&rs, "pod4").unwrap(),
        vec![(cidr_range("172.7.21.0/24").1, cidr_range("172.7.21.0/24").2)]
    );
    let want_nomasq4 = merge(
        ["172.7.0.0/16", "169.254.0.0/16", "255.255.255.0/24"]
            .iter()
            .map(|c| {
                let (_, a, b) = cidr_range(c);
                (a, b)
            })
            .collect(),
    );
    assert_eq!(set_ranges(&rs, "nomasq4").unwrap(), want_nomasq4);

    let r: Vec<String> = rules(&rs, "inet", "masqd", "postrouting")
        .into_iter()
        .map(|x| x.1)
        .collect();
    assert_eq!(
        r,
        vec![
            "meta.oifname == docker0 return",
            "meta.mark & 16384 == 16384 return",
            "ip.saddr == @pod4 ip.daddr == @nomasq4 counter snat(ip to ip.saddr)",
            "ip.saddr == @pod4 counter masquerade",
            "ip6.saddr == @pod6 ip6.daddr == @nomasq6 counter snat(ip6 to ip6.saddr)",
            "ip6.saddr == @pod6 counter masquerade",
        ]
    );
    // The same statements as nft itself encodes them (its netlink debug output is the
    // oracle of the bytes): the identity SNAT reloads the source into register 1.
    let dbg = ns.ok(&[
        "nft",
        "--debug=netlink",
        "list",
        "chain",
        "inet",
        "masqd",
        "postrouting",
    ]);
    for want in [
        "[ meta load mark => reg 1 ]\n  [ bitwise reg 1 = ( reg 1 & 0x00004000 ) ^ 0x00000000 ]\n  [ cmp eq reg 1 0x00004000 ]\n  [ immediate reg 0 return ]",
        "[ counter pkts 0 bytes 0 ]\n  [ payload load 4b @ network header + 12 => reg 1 ]\n  [ nat snat ip addr_min reg 1 addr_max reg 1 flags 0x1 ]",
        "[ payload load 16b @ network header + 8 => reg 1 ]\n  [ nat snat ip6 addr_min reg 1 addr_max reg 1 flags 0x1 ]",
    ] {
        assert!(dbg.contains(want), "{want}\nnot in\n{dbg}");
    }
}

#[test]
fn honor_marks_configurable_and_off() {
    let ns = Netns::new("mqmark");
    let dir = TempDir::new();
    let cfg = dir.write(
        "masqd.toml",
        &BASE.replace(
            "bridge_interfaces",
            "honor_marks = [\"0x4000/0x4000\", \"0x10/0xffffffff\"]\nbridge_interfaces",
        ),
    );
    let state = dir.path().join("state");
    ns.masqd_ok(&cfg, &state, &["apply"], 0);
    let r: Vec<String> = rules(&ns.ruleset(), "inet", "masqd", "postrouting")
        .into_iter()
        .map(|x| x.1)
        .collect();
    assert_eq!(r[1], "meta.mark & 16384 == 16384 return");
    assert_eq!(r[2], "meta.mark == 16 return");
    ns.masqd_ok(&cfg, &state, &["plan"], 0);
    // An empty list turns the mark rule off; the change rebuilds the rules in place.
    dir.write(
        "masqd.toml",
        &BASE.replace("bridge_interfaces", "honor_marks = []\nbridge_interfaces"),
    );
    ns.masqd_ok(&cfg, &state, &["apply"], 0);
    let r = rules(&ns.ruleset(), "inet", "masqd", "postrouting");
    assert_eq!(r.len(), 5, "{r:?}");
    assert!(!r.iter().any(|(_, t)| t.contains("mark")), "{r:?}");
    ns.masqd_ok(&cfg, &state, &["plan"], 0);
}

#[test]
fn second_apply_changes_nothing() {
    let ns = Netns::new("mqidem");
    let dir = TempDir::new();
    let cfg = dir.write("masqd.toml", BASE);
    let state = dir.path().join("state");
    ns.masqd_ok(&cfg, &state, &["plan"], 2);
    ns.masqd_ok(&cfg, &state, &["apply"], 0);
    let before = ns.ruleset();
    let out = ns.masqd_ok(&cfg, &state, &["apply"], 0);
    assert!(out.contains("in sync"), "{out}");
    ns.masqd_ok(&cfg, &state, &["plan"], 0);
    let after = ns.ruleset();
    assert_eq!(
        handles(&before),
        handles(&after),
        "same handles after a second apply"
    );
    assert_eq!(before, after);
    let st: Value =
        serde_json::from_str(&ns.masqd_ok(&cfg, &state, &["status", "--json"], 0)).unwrap();
    assert_eq!(st["backend"], "nft");
    assert_eq!(st["in_sync"], true);
    for f in ["ipv4", "ipv6"] {
        assert_eq!(st[f]["masqueraded_connections"], 0, "{st}");
        assert_eq!(st[f]["kept_connections"], 0, "{st}");
    }
}

#[test]
fn added_cidr_touches_elements_only() {
    let ns = Netns::new("mqadd");
    let dir = TempDir::new();
    let cfg = dir.write("masqd.toml", BASE);
    let state = dir.path().join("state");
    ns.masqd_ok(&cfg, &state, &["apply"], 0);
    let before = ns.ruleset();

    dir.write(
        "masqd.toml",
        &BASE.replace(
            "\"ffff::/16\"",
            "\"ffff::/16\", \"10.96.0.0/12\", \"fd00:96::/108\"",
        ),
    );
    let plan = ns.masqd_ok(&cfg, &state, &["plan"], 2);
    for line in plan.lines() {
        assert!(
            line.starts_with("add element inet masqd nomasq"),
            "only element changes: {plan}"
        );
    }
    ns.masqd_ok(&cfg, &state, &["apply"], 0);
    let after = ns.ruleset();
    assert_eq!(
        handles(&before),
        handles(&after),
        "rules, sets, chain and table untouched"
    );
    assert!(set_ranges(&after, "nomasq4")
        .unwrap()
        .contains(&(cidr_range("10.96.0.0/12").1, cidr_range("10.96.0.0/12").2)));

    // And removed again.
    dir.write("masqd.toml", BASE);
    let plan = ns.masqd_ok(&cfg, &state, &["plan"], 2);
    assert!(
        plan.lines()
            .all(|l| l.starts_with("delete element inet masqd nomasq")),
        "{plan}"
    );
    ns.masqd_ok(&cfg, &state, &["apply"], 0);
    assert_eq!(ns.ruleset(), before);
}

#[test]
fn skeleton_change_rebuilds_rules_not_sets() {
    let ns = Netns::new("mqskel");
    let dir = TempDir::new();
    let cfg = dir.write("masqd.toml", BASE);
    let state = dir.path().join("state");
    ns.masqd_ok(&cfg, &state, &["apply"], 0);
    let before = handles(&ns.ruleset());
    dir.write(
        "masqd.toml",
        &BASE.replace(
            "bridge_interfaces = [\"docker0\"]",
            "bridge_interfaces = [\"docker0\", \"cni0\"]\nrandom_fully = true",
        ),
    );
    ns.masqd_ok(&cfg, &state, &["apply"], 0);
    let rs = ns.ruleset();
    let r: Vec<String> = rules(&rs, "inet", "masqd", "postrouting")
        .into_iter()
        .map(|x| x.1)
        .collect();
    assert_eq!(r[1], "meta.oifname == cni0 return");
    assert_eq!(r[4], "ip.saddr == @pod4 counter masquerade(fully-random)");
    let after = handles(&rs);
    let keep = |v: &Vec<(String, u64)>| {
        v.iter()
            .filter(|(k, _)| !k.starts_with("rule"))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        keep(&before),
        keep(&after),
        "table, chain and sets keep their handles"
    );

    // Dropping the IPv6 pods drops the IPv6 sets and rules.
    dir.write("masqd.toml", &BASE.replace(", \"fd00:7:21::/64\"", ""));
    ns.masqd_ok(&cfg, &state, &["apply"], 0);
    let rs = ns.ruleset();
    assert!(set_ranges(&rs, "pod6").is_none() && set_ranges(&rs, "nomasq6").is_none());
    assert_eq!(rules(&rs, "inet", "masqd", "postrouting").len(), 4);
    ns.masqd_ok(&cfg, &state, &["plan"], 0);
}

#[test]
fn foreign_edits_are_repaired_in_place() {
    let ns = Netns::new("mqedit");
    let dir = TempDir::new();
    let cfg = dir.write("masqd.toml", BASE);
    let state = dir.path().join("state");
    ns.masqd_ok(&cfg, &state, &["apply"], 0);
    let table_handle = objects(&ns.ruleset(), "table")[0]["handle"].clone();
    // Someone adds a rule and an element, and deletes a rule.
    ns.ok_words("nft insert rule inet masqd postrouting ip saddr 1.2.3.4 accept");
    ns.ok_words("nft add element inet masqd nomasq4 { 8.8.8.0/24 }");
    let h = rules(&ns.ruleset(), "inet", "masqd", "postrouting")
        .last()
        .unwrap()
        .0
        .to_string();
    ns.ok(&[
        "nft",
        "delete",
        "rule",
        "inet",
        "masqd",
        "postrouting",
        "handle",
        &h,
    ]);
    ns.masqd_ok(&cfg, &state, &["plan"], 2);
    ns.masqd_ok(&cfg, &state, &["apply"], 0);
    ns.masqd_ok(&cfg, &state, &["plan"], 0);
    let rs = ns.ruleset();
    assert_eq!(
        objects(&rs, "table")[0]["handle"],
        table_handle,
        "table never deleted"
    );
    assert_eq!(rules(&rs, "inet", "masqd", "postrouting").len(), 6);
    assert!(!set_ranges(&rs, "nomasq4")
        .unwrap()
        .iter()
        .any(|r| r.0 == cidr_range("8.8.8.0/24").1));
}

#[test]
fn export_loads_with_nft_and_is_in_sync() {
    let ns = Netns::new("mqexp");
    let dir = TempDir::new();
    let cfg = dir.write(
        "masqd.toml",
        &BASE.replace(
            "bridge_interfaces",
            "random_fully = true\nbridge_interfaces",
        ),
    );
    let state = dir.path().join("state");
    let export = ns.masqd_ok(&cfg, &state, &["export"], 0);
    let file = dir.write("export.nft", &export);
    ns.ok(&["nft", "-f", file.to_str().unwrap()]);
    // What nft wrote from the export is exactly what masqd wants.
    ns.masqd_ok(&cfg, &state, &["plan"], 0);
}

#[test]
fn default_rule_replaced_and_teardown_restores() {
    let ns = Netns::new("mqtear");
    let dir = TempDir::new();
    let cfg = dir.write("masqd.toml", BASE);
    let state = dir.path().join("state");
    ns.ok_words("iptables-nft -t nat -A POSTROUTING -s 10.9.9.0/24 -j MASQUERADE");
    ns.ok_words("iptables-nft -t nat -A POSTROUTING -s 172.7.21.0/24 ! -o docker0 -j MASQUERADE");
    ns.ok_words("ip6tables-nft -t nat -A POSTROUTING -s fd00:7:21::/64 ! -o docker0 -j MASQUERADE");
    // Not the default rule: it has a destination match.
    ns.ok_words("iptables-nft -t nat -A POSTROUTING -s 172.7.21.0/24 -d 8.8.8.8 -j MASQUERADE");
    let save_before = ns.ok(&["iptables-nft-save", "-t", "nat"]);
    let before = ns.ruleset();
    let v4_before = rules(&before, "ip", "nat", "POSTROUTING");

    ns.masqd_ok(&cfg, &state, &["apply"], 0);
    let rs = ns.ruleset();
    let v4: Vec<String> = rules(&rs, "ip", "nat", "POSTROUTING")
        .into_iter()
        .map(|x| x.1)
        .collect();
    assert_eq!(
        v4.len(),
        2,
        "only the broad rule for the pod CIDR is gone: {v4:?}"
    );
    assert!(
        v4.iter().all(|r| !r.contains("meta.oifname != docker0")),
        "{v4:?}"
    );
    assert!(rules(&rs, "ip6", "nat", "POSTROUTING").is_empty());
    assert!(state.join("removed-default-rules.json").exists());
    ns.masqd_ok(&cfg, &state, &["plan"], 0);

    // Docker restarts and re-inserts its rule: the next apply removes it again, one record.
    ns.ok_words("iptables-nft -t nat -I POSTROUTING -s 172.7.21.0/24 ! -o docker0 -j MASQUERADE");
    ns.masqd_ok(&cfg, &state, &["plan"], 2);
    ns.masqd_ok(&cfg, &state, &["apply"], 0);
    assert_eq!(rules(&ns.ruleset(), "ip", "nat", "POSTROUTING").len(), 2);

    let out = ns.masqd_ok(&cfg, &state, &["teardown"], 0);
    assert!(out.contains("restored 2"), "{out}");
    let rs = ns.ruleset();
    assert!(objects(&rs, "table").iter().all(|t| t["name"] != "masqd"));
    let mut v4_after: Vec<String> = rules(&rs, "ip", "nat", "POSTROUTING")
        .into_iter()
        .map(|x| x.1)
        .collect();
    let mut v4_orig: Vec<String> = v4_before.into_iter().map(|x| x.1).collect();
    v4_after.sort();
    v4_orig.sort();
    assert_eq!(v4_after, v4_orig);
    assert_eq!(rules(&rs, "ip6", "nat", "POSTROUTING").len(), 1);
    // iptables-nft reads the restored rules back as its own.
    let save_after = ns.ok(&["iptables-nft-save", "-t", "nat"]);
    let norm = |s: &str| {
        let mut v: Vec<String> = s
            .lines()
            .filter(|l| l.starts_with("-A"))
            .map(str::to_string)
            .collect();
        v.sort();
        v
    };
    assert_eq!(norm(&save_after), norm(&save_before));
    assert!(!state.join("removed-default-rules.json").exists());
    // A second teardown is harmless.
    ns.masqd_ok(&cfg, &state, &["teardown"], 0);
}

#[test]
fn replace_default_rule_false_leaves_it() {
    let ns = Netns::new("mqkeep");
    let dir = TempDir::new();
    let cfg = dir.write(
        "masqd.toml",
        &format!("{BASE}replace_default_rule = false\n"),
    );
    let state = dir.path().join("state");
    ns.ok_words("iptables-nft -t nat -A POSTROUTING -s 172.7.21.0/24 ! -o docker0 -j MASQUERADE");
    ns.masqd_ok(&cfg, &state, &["apply"], 0);
    assert_eq!(rules(&ns.ruleset(), "ip", "nat", "POSTROUTING").len(), 1);
}

/// A deterministic pseudo-random exception list: nested, overlapping and adjacent CIDRs in a
/// small region, host routes, and CIDRs at the top of both address spaces.
fn random_cidrs(rng: &mut fastrand::Rng) -> Vec<String> {
    let n = rng.usize(0..40);
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let s = match rng.u8(0..8) {
            0..=2 => {
                // 10.0.0.0/16 region, prefixes 16..=32: plenty of nesting and adjacency.
                let len = rng.u32(16..=32);
                let a: u32 = 0x0a00_0000 | rng.u32(0..=0xffff);
                let m = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                format!("{}/{len}", std::net::Ipv4Addr::from(a & m))
            }
            3 => {
                let len = rng.u32(1..=32);
                let a: u32 = u32::MAX - rng.u32(0..=0xffff);
                let m = u32::MAX << (32 - len);
                format!("{}/{len}", std::net::Ipv4Addr::from(a & m))
            }
            4 => format!("{}/32", std::net::Ipv4Addr::from(rng.u32(..))),
            5 => {
                let len = rng.u32(1..=128);
                let a: u128 = u128::MAX - rng.u128(0..=0xffff_ffff);
                let m = if len == 128 {
                    u128::MAX
                } else {
                    !((1u128 << (128 - len)) - 1)
                };
                format!("{}/{len}", std::net::Ipv6Addr::from(a & m))
            }
            6 => {
                let len = rng.u32(100..=128);
                let a: u128 = (0xfd00u128 << 112) | rng.u128(0..=0xffff_ffff);
                let m = if len == 128 {
                    u128::MAX
                } else {
                    !((1u128 << (128 - len)) - 1)
                };
                format!("{}/{len}", std::net::Ipv6Addr::from(a & m))
            }
            _ => format!("{}/128", std::net::Ipv6Addr::from(rng.u128(..))),
        };
        v.push(s);
    }
    v
}

#[test]
fn randomized_exception_lists_match_kernel_sets() {
    let ns = Netns::new("mqrand");
    let dir = TempDir::new();
    let state = dir.path().join("state");
    let seed = std::env::var("MASQD_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6d61_7371);
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut cfg = dir.write("masqd.toml", "");
    for round in 0..220 {
        let cidrs = random_cidrs(&mut rng);
        let list: Vec<String> = cidrs.iter().map(|c| format!("\"{c}\"")).collect();
        cfg = dir.write(
            "masqd.toml",
            &format!(
                "[node]\npod_cidrs = [\"172.7.21.0/24\", \"fd00:7:21::/64\"]\n[masquerade]\nnonmasquerade_cidrs = [{}]\n",
                list.join(", ")
            ),
        );
        ns.masqd_ok(&cfg, &state, &["apply"], 0);
        let rs = ns.ruleset();
        for v6 in [false, true] {
            let want = merge(
                cidrs
                    .iter()
                    .map(|c| cidr_range(c))
                    .filter(|r| r.0 == v6)
                    .map(|r| (r.1, r.2))
                    .collect(),
            );
            let name = if v6 { "nomasq6" } else { "nomasq4" };
            let have = set_ranges(&rs, name).unwrap_or_else(|| panic!("set {name} missing"));
            assert_eq!(
                have, want,
                "round {round} (seed {seed}), {name}, config {cidrs:?}"
            );
        }
        if round % 20 == 0 {
            ns.masqd_ok(&cfg, &state, &["plan"], 0);
        }
    }
    ns.masqd_ok(&cfg, &state, &["plan"], 0);
}

#[test]
fn exceptions_from_a_list_file() {
    let ns = Netns::new("mqlist");
    let dir = TempDir::new();
    let list = dir.write(
        "nonmasq.list",
        "# generated\n10.96.0.0/12\n\n192.168.7.7 # a host\n",
    );
    let cfg = dir.write(
        "masqd.toml",
        &format!("[node]\npod_cidrs = [\"172.7.21.0/24\"]\n[masquerade]\nnonmasquerade_cidrs_file = \"{}\"\n", list.display()),
    );
    let state = dir.path().join("state");
    ns.masqd_ok(&cfg, &state, &["apply"], 0);
    let r = |c: &str| {
        let (_, a, b) = cidr_range(c);
        (a, b)
    };
    assert_eq!(
        set_ranges(&ns.ruleset(), "nomasq4").unwrap(),
        vec![r("10.96.0.0/12"), r("192.168.7.7/32")]
    );
    // A bad line is refused with the list file and line named; the kernel keeps its state.
    let before = ns.ruleset_text();
    dir.write("nonmasq.list", "10.96.0.0/12\n10.1.2.3/8\n");
    let o = ns.masqd(&cfg, &state, &["apply"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err.contains("nonmasq.list:2:") && err.contains("did you mean 10.0.0.0/8"),
        "{err}"
    );
    assert_eq!(ns.ruleset_text(), before);
}
