//! End to end, the source documents' verification: two nodes, a pod on each, an outside host,
//! and the broad default rule written by iptables-nft on node A (scripts/cluster.sh). Before
//! masqd, pod B sees node A's IP; after `masqd apply` on node A it sees pod A's IP, while the
//! outside host still sees node A's IP. IPv4 and IPv6.

mod common;

use common::*;

#[test]
fn pod_keeps_its_ip_inside_cluster_and_is_masqueraded_outside() {
    let c = Cluster::up("nft");
    let dir = TempDir::new();
    let cfg = dir.write("masqd.toml", NODE_A_CONFIG);
    let state = dir.path().join("state");
    let pod_b4 = ip("172.7.22.2");
    let pod_b6 = ip("fd00:7:22::2");
    let out4 = ip("10.200.0.3");
    let out6 = ip("fd00:200::3");

    // The bug, reproduced: pod B sees node A's address.
    assert_eq!(
        seen_source(&c.pa, &c.pb, pod_b4, 8081),
        Some(ip("10.200.0.1"))
    );
    assert_eq!(
        seen_source(&c.pa, &c.pb, pod_b6, 8082),
        Some(ip("fd00:200::1"))
    );
    assert_eq!(
        seen_source(&c.pa, &c.out, out4, 8083),
        Some(ip("10.200.0.1"))
    );
    assert_eq!(
        seen_source(&c.pa, &c.out, out6, 8084),
        Some(ip("fd00:200::1"))
    );

    c.a.masqd_ok(&cfg, &state, &["apply"], 0);

    // Fixed: pod A's own address inside the cluster, node A's address outside.
    assert_eq!(
        seen_source(&c.pa, &c.pb, pod_b4, 8085),
        Some(ip("172.7.21.2"))
    );
    assert_eq!(
        seen_source(&c.pa, &c.pb, pod_b6, 8086),
        Some(ip("fd00:7:21::2"))
    );
    assert_eq!(
        seen_source(&c.pa, &c.out, out4, 8087),
        Some(ip("10.200.0.1"))
    );
    assert_eq!(
        seen_source(&c.pa, &c.out, out6, 8088),
        Some(ip("fd00:200::1"))
    );

    let st: serde_json::Value =
        serde_json::from_str(&c.a.masqd_ok(&cfg, &state, &["status", "--json"], 0)).unwrap();
    assert_eq!(st["in_sync"], true);
    for f in ["ipv4", "ipv6"] {
        assert!(
            st[f]["masqueraded_connections"].as_u64().unwrap() >= 1,
            "{st}"
        );
        assert!(st[f]["kept_connections"].as_u64().unwrap() >= 1, "{st}");
    }

    // Teardown puts the broad rule back: the bug returns, proving the rule is live again.
    c.a.masqd_ok(&cfg, &state, &["teardown"], 0);
    assert_eq!(
        seen_source(&c.pa, &c.pb, pod_b4, 8089),
        Some(ip("10.200.0.1"))
    );
    assert_eq!(
        seen_source(&c.pa, &c.pb, pod_b6, 8090),
        Some(ip("fd00:200::1"))
    );
}

#[test]
fn only_the_policy_masquerades_no_default_rule_needed() {
    // Without any default rule, masqd alone masquerades outside traffic (the chain works on
    // its own), and nonmasquerade_cidrs exempt the outside host when listed.
    let c = Cluster::up("nft");
    c.a.ok(&["iptables-nft", "-t", "nat", "-F", "POSTROUTING"]);
    c.a.ok(&["ip6tables-nft", "-t", "nat", "-F", "POSTROUTING"]);
    let dir = TempDir::new();
    let state = dir.path().join("state");
    let cfg = dir.write("masqd.toml", NODE_A_CONFIG);
    c.a.masqd_ok(&cfg, &state, &["apply"], 0);
    assert_eq!(
        seen_source(&c.pa, &c.out, ip("10.200.0.3"), 8091),
        Some(ip("10.200.0.1"))
    );
    let cfg = dir.write(
        "masqd.toml",
        &NODE_A_CONFIG.replace(
            "nonmasquerade_cidrs = []",
            "nonmasquerade_cidrs = [\"10.200.0.3/32\"]",
        ),
    );
    c.a.masqd_ok(&cfg, &state, &["apply"], 0);
    // The outside host now sees the pod address, but has no route back: the connection fails,
    // which is exactly what an exception without routing means.
    assert_eq!(seen_source(&c.pa, &c.out, ip("10.200.0.3"), 8092), None);
    c.out
        .ip(&["route", "add", "172.7.21.0/24", "via", "10.200.0.1"]);
    assert_eq!(
        seen_source(&c.pa, &c.out, ip("10.200.0.3"), 8093),
        Some(ip("172.7.21.2"))
    );
}
