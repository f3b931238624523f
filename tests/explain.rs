//! `masqd explain` in the two-node topology of scripts/cluster.sh, each verdict cross-checked
//! with real traffic, in nft and legacy mode; the single-element set lookup against the kernel;
//! bad input.

mod common;

use common::*;
use masqd::backend::nft::lookup::{range_by_get, range_of, Lookup};
use masqd::netlink::Socket;
use masqd::policy::{Family, Range};

fn v4(s: &str) -> u128 {
    u32::from(s.parse::<std::net::Ipv4Addr>().unwrap()) as u128
}

/// The single-element lookup answers the interval holding the address (start and end from
/// the kernel's get), NotIn between intervals and at the element one past an end, NoSet for a
/// missing set: compared with the ranges written.
#[test]
fn lookup_finds_the_containing_interval() {
    let ns = Netns::new("mqxl");
    ns.ok(&["nft", "add table inet masqd"]);
    ns.ok(&[
        "nft",
        "add set inet masqd nomasq4 { type ipv4_addr; flags interval; }",
    ]);
    ns.ok(&[
        "nft",
        "add element inet masqd nomasq4 { 10.0.0.0/8, 172.7.0.0/16, 192.168.1.5, 192.168.1.7-192.168.1.9, 224.0.0.0-255.255.255.255 }",
    ]);
    let r = |a: &str, b: &str| {
        Lookup::In(Range {
            start: v4(a),
            end: v4(b),
        })
    };
    let cases = [
        ("10.0.0.0", r("10.0.0.0", "10.255.255.255")),
        ("10.1.2.3", r("10.0.0.0", "10.255.255.255")),
        ("10.255.255.255", r("10.0.0.0", "10.255.255.255")),
        ("11.0.0.0", Lookup::NotIn),
        ("9.255.255.255", Lookup::NotIn),
        ("172.7.22.2", r("172.7.0.0", "172.7.255.255")),
        ("192.168.1.5", r("192.168.1.5", "192.168.1.5")),
        ("192.168.1.6", Lookup::NotIn),
        ("192.168.1.8", r("192.168.1.7", "192.168.1.9")),
        ("192.168.1.10", Lookup::NotIn),
        ("0.0.0.0", Lookup::NotIn),
        ("230.1.1.1", r("224.0.0.0", "255.255.255.255")),
        ("255.255.255.255", r("224.0.0.0", "255.255.255.255")),
    ];
    ns.ok(&[
        "nft",
        "add set inet masqd nomasq6 { type ipv6_addr; flags interval; }",
    ]);
    ns.ok(&[
        "nft",
        "add element inet masqd nomasq6 { fd00:7::/32, ff00::/8 }",
    ]);
    let got = ns.run(move || {
        let mut sock = Socket::open().unwrap();
        let mut out = Vec::new();
        for (a, _) in cases {
            // By gets alone (Some: the kernel answered them; no dump), and as explain asks.
            let by_get = range_by_get(&mut sock, "nomasq4", Family::V4, v4(a)).unwrap();
            assert_eq!(
                by_get,
                Some(range_of(&mut sock, "nomasq4", Family::V4, v4(a)).unwrap())
            );
            out.push(by_get.unwrap());
        }
        let v6 = |s: &str| u128::from(s.parse::<std::net::Ipv6Addr>().unwrap());
        for a in ["fd00:7:22::2", "fd00:8::1", "ffff::1", "::"] {
            out.push(
                range_by_get(&mut sock, "nomasq6", Family::V6, v6(a))
                    .unwrap()
                    .unwrap(),
            );
        }
        out.push(range_of(&mut sock, "pod4", Family::V4, 1).unwrap());
        out
    });
    for ((a, want), got) in cases.iter().zip(&got) {
        assert_eq!(got, want, "{a}");
    }
    let v6 = |a: &str, b: &str| {
        let i = |s: &str| u128::from(s.parse::<std::net::Ipv6Addr>().unwrap());
        Lookup::In(Range {
            start: i(a),
            end: i(b),
        })
    };
    let n = cases.len();
    assert_eq!(
        got[n..n + 4],
        [
            v6("fd00:7::", "fd00:7:ffff:ffff:ffff:ffff:ffff:ffff"),
            Lookup::NotIn,
            v6("ff00::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
            Lookup::NotIn,
        ]
    );
    assert_eq!(got[n + 4], Lookup::NoSet);
}

const LIST: &str =
    "# peers outside the cluster that must see pod addresses\n192.168.50.0/24\n10.200.0.2/32\n";

/// A kube-proxy-like component on node A, in its own nftables table at srcnat: it marks
/// connections to pod B port [`MARKED_PORT`] with 0x4000 and masquerades marked packets, and it
/// carries a broad masquerade of the pod subnet (as Docker's `docker-bridges` does).
const FOREIGN: &str = r#"table ip kp {
    chain kp-forward {
        type filter hook forward priority 0; policy accept;
        ip daddr 172.7.22.2 tcp dport 18090 meta mark set mark | 0x4000
    }
    chain kp-postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        meta mark & 0x4000 == 0x4000 masquerade
        ip saddr 172.7.21.0/24 oifname != "docker0" masquerade
    }
}
"#;
const MARKED_PORT: u16 = 18090;

struct Setup {
    c: Cluster,
    /// A host on node A's bridge docker0 outside the pod subnet (10.99.0.5): traffic to it is
    /// routed out through the bridge.
    pc: Netns,
    _dir: TempDir,
    cfg: std::path::PathBuf,
    list: std::path::PathBuf,
    state: std::path::PathBuf,
}

/// The cluster with `writer`'s default rule, the host on the bridge, the foreign table, and
/// masqd applied with `backend.mode = writer`.
fn setup(writer: &str) -> Setup {
    let c = Cluster::up(writer);
    let pc = Netns::new("mqxc");
    c.a.ip(&[
        "link", "add", "vpc", "type", "veth", "peer", "name", "eth0", "netns", &pc.name,
    ]);
    c.a.ip(&["link", "set", "vpc", "master", "docker0", "up"]);
    c.a.ip(&["addr", "add", "10.99.0.1/24", "dev", "docker0"]);
    pc.ip(&["addr", "add", "10.99.0.5/24", "dev", "eth0"]);
    pc.ip(&["link", "set", "eth0", "up"]);
    pc.ip(&["route", "add", "172.7.21.0/24", "via", "10.99.0.1"]);
    let dir = TempDir::new();
    let list = dir.write("extra.list", LIST);
    let foreign = dir.write("foreign.nft", FOREIGN);
    c.a.ok(&["nft", "-f", foreign.to_str().unwrap()]);
    let cfg = dir.write(
        "masqd.toml",
        &format!(
            "[node]\npod_cidrs = [\"172.7.21.0/24\", \"fd00:7:21::/64\"]\n[masquerade]\n\
             cluster_cidrs = [\"172.7.0.0/16\", \"fd00:7::/32\"]\nnonmasquerade_cidrs_file = \"extra.list\"\n\
             bridge_interfaces = [\"docker0\"]\n[backend]\nmode = \"{writer}\"\n"
        ),
    );
    let state = dir.path().join("state");
    c.a.masqd_ok(&cfg, &state, &["apply"], 0);
    Setup {
        c,
        pc,
        _dir: dir,
        cfg,
        list,
        state,
    }
}

fn explain(s: &Setup, args: &[&str]) -> serde_json::Value {
    let mut v = vec!["explain", "--json"];
    v.extend_from_slice(args);
    let out = s.c.a.masqd_ok(&s.cfg, &s.state, &v, 0);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("explain {args:?}: {e}: {out}"))
}

fn other<'a>(e: &'a serde_json::Value, needle: &str) -> Option<&'a serde_json::Value> {
    e["other_rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["rule"].as_str().unwrap().contains(needle))
}

/// Every verdict of `explain` in one mode, each checked against the source the peer sees.
fn verdicts_match_traffic(writer: &str) {
    let s = setup(writer);
    let c = &s.c;
    let cfg = s.cfg.display().to_string();
    let list = s.list.display().to_string();
    let legacy = writer == "legacy";

    // pod A → pod B on the other node: kept by the cluster CIDR (config line 4), the guard
    // overrides the foreign broad masquerade; pod B sees pod A.
    let e = explain(&s, &["172.7.21.2", "172.7.22.2"]);
    assert_eq!(e["verdict"], "kept", "{e:#}");
    assert_eq!(e["backend"], writer, "{e:#}");
    assert_eq!(e["range"], "172.7.0.0/16", "{e:#}");
    assert_eq!(e["source"], format!("{cfg}:4"), "{e:#}");
    assert_eq!(e["chain"], "inet masqd postrouting", "{e:#}");
    assert!(
        e["rule"].as_str().unwrap().contains("snat ip to ip saddr"),
        "{e:#}"
    );
    assert!(e["handle"].as_u64().is_some(), "{e:#}");
    assert_eq!(e["disagreements"], serde_json::json!([]), "{e:#}");
    let broad = other(&e, "ip saddr 172.7.21.0/24").unwrap_or_else(|| panic!("{e:#}"));
    assert_eq!(broad["overridden"], true, "{e:#}");
    assert_eq!(broad["table"], "ip kp", "{e:#}");
    assert_eq!(
        seen_source(&c.pa, &c.pb, ip("172.7.22.2"), 18081),
        Some(ip("172.7.21.2"))
    );

    // pod A → outside: masqueraded (nft: masqd's rule; legacy: MASQD-POSTROUTING).
    let e = explain(&s, &["172.7.21.2", "10.200.0.3"]);
    assert_eq!(e["verdict"], "masqueraded", "{e:#}");
    if legacy {
        assert_eq!(e["chain"], "legacy nat MASQD-POSTROUTING", "{e:#}");
        assert_eq!(
            e["rule"], "-A MASQD-POSTROUTING -s 172.7.21.0/24 -j MASQUERADE",
            "{e:#}"
        );
    } else {
        assert_eq!(e["rule"], "ip saddr @pod4 counter masquerade", "{e:#}");
    }
    assert!(e["handle"].as_u64().is_some(), "{e:#}");
    assert_eq!(
        seen_source(&c.pa, &c.out, ip("10.200.0.3"), 18082),
        Some(ip("10.200.0.1"))
    );

    // pod A → node B, an exception of the list file (its line 3): kept; node B sees pod A.
    let e = explain(&s, &["172.7.21.2", "10.200.0.2"]);
    assert_eq!(e["verdict"], "kept", "{e:#}");
    assert_eq!(e["range"], "10.200.0.2/32", "{e:#}");
    assert_eq!(e["source"], format!("{list}:3"), "{e:#}");
    assert_eq!(
        e["sources"][0]["key"], "masquerade.nonmasquerade_cidrs_file",
        "{e:#}"
    );
    assert_eq!(
        seen_source(&c.pa, &c.b, ip("10.200.0.2"), 18083),
        Some(ip("172.7.21.2"))
    );

    // node A → outside: not a pod source, untouched; the outside sees node A's own address.
    let e = explain(&s, &["10.200.0.1", "10.200.0.3"]);
    assert_eq!(e["verdict"], "untouched", "{e:#}");
    assert!(
        e["reason"].as_str().unwrap().contains("not a pod source"),
        "{e:#}"
    );
    assert_eq!(e["rule"], serde_json::Value::Null, "{e:#}");
    assert_eq!(
        seen_source(&c.a, &c.out, ip("10.200.0.3"), 18084),
        Some(ip("10.200.0.1"))
    );

    // pod A → a host behind the bridge: untouched by the bridge return (without it masqd
    // would masquerade to 10.99.0.1); the foreign broad rule excludes docker0, so not listed.
    let e = explain(&s, &["172.7.21.2", "10.99.0.5", "--oif", "docker0"]);
    assert_eq!(e["verdict"], "untouched", "{e:#}");
    assert_eq!(e["rule"], "oifname \"docker0\" return", "{e:#}");
    assert!(other(&e, "ip saddr 172.7.21.0/24").is_none(), "{e:#}");
    assert_eq!(
        seen_source(&c.pa, &s.pc, ip("10.99.0.5"), 18085),
        Some(ip("172.7.21.2"))
    );

    // A marked flow to pod B: left to the marker, whose masquerade applies; pod B sees node A.
    let e = explain(&s, &["172.7.21.2", "172.7.22.2", "--mark", "0x4000"]);
    assert_eq!(e["verdict"], "marked", "{e:#}");
    assert_eq!(e["mark"], "0x4000", "{e:#}");
    assert!(e["rule"].as_str().unwrap().contains("meta mark"), "{e:#}");
    let marker = other(&e, "meta mark").unwrap_or_else(|| panic!("{e:#}"));
    assert_eq!(marker["overridden"], false, "{e:#}");
    assert_eq!(
        seen_source(&c.pa, &c.pb, ip("172.7.22.2"), MARKED_PORT),
        Some(ip("10.200.0.1"))
    );

    // IPv6: pod A → pod B kept (config line 4), pod A → outside masqueraded.
    let e = explain(&s, &["fd00:7:21::2", "fd00:7:22::2"]);
    assert_eq!(
        (&e["verdict"], &e["ip_family"]),
        (&"kept".into(), &"ipv6".into()),
        "{e:#}"
    );
    assert_eq!(e["range"], "fd00:7::/32", "{e:#}");
    assert_eq!(e["source"], format!("{cfg}:4"), "{e:#}");
    assert_eq!(
        seen_source(&c.pa, &c.pb, ip("fd00:7:22::2"), 18087),
        Some(ip("fd00:7:21::2"))
    );
    let e = explain(&s, &["fd00:7:21::2", "fd00:200::3"]);
    assert_eq!(e["verdict"], "masqueraded", "{e:#}");
    assert_eq!(
        seen_source(&c.pa, &c.out, ip("fd00:200::3"), 18088),
        Some(ip("fd00:200::1"))
    );

    // The text form names the same facts.
    let text = c.a.masqd_ok(
        &s.cfg,
        &s.state,
        &["explain", "172.7.21.2", "10.200.0.2"],
        0,
    );
    assert!(text.contains("verdict: kept"), "{text}");
    assert!(text.contains(&format!("source: {list}:3")), "{text}");
}

#[test]
fn verdicts_match_traffic_nft() {
    verdicts_match_traffic("nft");
}

#[test]
fn verdicts_match_traffic_legacy() {
    verdicts_match_traffic("legacy");
}

/// When the kernel's exception set lacks a range the configuration has (or holds one it
/// lacks), explain says so and follows the kernel, as the traffic does.
#[test]
fn config_and_kernel_disagree() {
    let s = setup("nft");
    let c = &s.c;
    c.a.ok_words("nft delete element inet masqd nomasq4 { 10.200.0.2 }");
    let e = explain(&s, &["172.7.21.2", "10.200.0.2"]);
    assert_eq!(e["verdict"], "masqueraded", "{e:#}");
    let d = e["disagreements"].to_string();
    assert!(
        d.contains("10.200.0.2/32") && d.contains("nomasq4"),
        "{e:#}"
    );
    assert_eq!(e["based_on"], "kernel");
    assert_eq!(
        seen_source(&c.pa, &c.b, ip("10.200.0.2"), 18086),
        Some(ip("10.200.0.1"))
    );

    c.a.ok_words("nft add element inet masqd nomasq4 { 10.200.0.3 }");
    let e = explain(&s, &["172.7.21.2", "10.200.0.3"]);
    assert_eq!(e["verdict"], "kept", "{e:#}");
    assert_eq!(e["range"], "10.200.0.3/32", "{e:#}");
    assert_eq!(e["source"], serde_json::Value::Null, "{e:#}");
    let d = e["disagreements"].to_string();
    assert!(d.contains("no configuration entry holds it"), "{e:#}");
    let text = c.a.masqd_ok(
        &s.cfg,
        &s.state,
        &["explain", "172.7.21.2", "10.200.0.3"],
        0,
    );
    assert!(text.contains("DISAGREE"), "{text}");
}

/// Bad input: a clear error naming the argument and the value, exit 1, before any config or
/// kernel access (no namespace needed: nothing is read).
#[test]
fn bad_input_is_refused() {
    let cases: [(&[&str], &str); 7] = [
        (
            &["172.7.21.x", "10.0.0.1"],
            "SRC \"172.7.21.x\" is not an IPv4 or IPv6 address",
        ),
        (
            &["172.7.21.2", "10.0.0"],
            "DST \"10.0.0\" is not an IPv4 or IPv6 address",
        ),
        (&["172.7.21.2", "fd00::1"], "different address families"),
        (
            &["172.7.21.2", "10.0.0.1", "--oif", "much-too-long-name0"],
            "--oif \"much-too-long-name0\"",
        ),
        (&["172.7.21.2", "10.0.0.1", "--oif", "a/b"], "--oif \"a/b\""),
        (
            &["172.7.21.2", "10.0.0.1", "--mark", "0x100000000"],
            "does not fit in 32 bits",
        ),
        (
            &["172.7.21.2", "10.0.0.1", "--mark=4k"],
            "--mark \"4k\" is not a number",
        ),
    ];
    for (args, want) in cases {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_masqd"))
            .args(["--config", "/nonexistent/masqd.toml", "explain"])
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(o.stdout.is_empty(), "{args:?}");
    }
}
