//! Unit tests of the metrics: counters, the configuration key, the HTTP answers.

use std::path::Path;

use super::counters::verdict_of;
use super::http::{respond, OPENMETRICS, PROMETHEUS_TEXT};
use super::*;
use crate::policy::Family;

#[test]
fn a_stale_lower_reading_is_not_a_reset() {
    // A scrape reads 110; the reconcile that read 100 earlier hands its reading over later.
    let mut r = Running::default();
    r.observe(Some(7), 100, 5);
    r.observe(Some(7), 110, 5);
    r.observe(Some(7), 100, 5);
    assert_eq!(r.total(), 110);
    // A real reset: the rule was replaced (new handle) — the old count is kept.
    r.observe(Some(9), 3, 6);
    assert_eq!(r.total(), 113);
}

#[test]
fn listen_values() {
    assert_eq!(
        Listen::parse("127.0.0.1:9816"),
        Ok(Listen::Tcp("127.0.0.1:9816".parse().unwrap()))
    );
    assert!(matches!(Listen::parse("[::1]:9816"), Ok(Listen::Tcp(_))));
    assert_eq!(
        Listen::parse("/run/masqd/metrics.sock"),
        Ok(Listen::Unix("/run/masqd/metrics.sock".into()))
    );
    for bad in [
        "localhost:9816",
        "127.0.0.1",
        "9816",
        "run/metrics.sock",
        "127.0.0.1:0",
        "127.0.0.1:70000",
        "/run/masqd/",
        "",
    ] {
        assert!(Listen::parse(bad).is_err(), "{bad:?} accepted");
    }
    assert!(Listen::parse(&format!("/{}", "x".repeat(200))).is_err());
}

#[test]
fn the_config_key_names_file_line_and_value() {
    let path = Path::new("/etc/masqd/masqd.toml");
    let base = "[node]\npod_cidrs = [\"10.1.0.0/24\"]\n";
    let c = crate::config::parse(path, base).unwrap();
    assert_eq!(c.metrics, None, "off by default");
    let on = format!("{base}[metrics]\nlisten = \"127.0.0.1:9816\"\n");
    let c = crate::config::parse(path, &on).unwrap();
    assert_eq!(
        c.metrics,
        Some(MetricsConfig {
            listen: Listen::Tcp("127.0.0.1:9816".parse().unwrap()),
            line: 4
        })
    );
    let bad = format!("{base}[metrics]\nlisten = \"localhost:9816\"\n");
    let e = crate::config::parse(path, &bad).unwrap_err().to_string();
    assert!(
        e.starts_with("/etc/masqd/masqd.toml:4: metrics.listen: \"localhost:9816\""),
        "{e}"
    );
    let unknown = format!("{base}[metrics]\nport = 9816\n");
    assert!(crate::config::parse(path, &unknown).is_err());
}

#[test]
fn running_counters_never_go_down() {
    let mut r = Running::default();
    r.observe(Some(4), 10, 5);
    r.observe(Some(4), 12, 6);
    assert_eq!(r.total(), 12);
    // The table was deleted and rebuilt (same handle, counter from 0).
    r.observe(Some(4), 3, 9);
    assert_eq!(r.total(), 15);
    // A reading older than the last one changes nothing.
    r.observe(Some(4), 0, 8);
    assert_eq!(r.total(), 15);
    // Another rule (handle) with a higher count: a new instance all the same.
    r.observe(Some(7), 20, 10);
    assert_eq!(r.total(), 35);
    // Rebuilt by masqd's commit 11, then read at 11 or later: counted once.
    r.rebuilt(11);
    assert_eq!(r.total(), 35);
    r.observe(Some(2), 1, 11);
    assert_eq!(r.total(), 36);
    // A reading at the commit's generation came first: the rebuild report is not counted
    // again.
    let mut s = Running::default();
    s.observe(Some(4), 10, 5);
    s.observe(Some(4), 2, 6);
    s.rebuilt(6);
    assert_eq!(s.total(), 12);
}

#[test]
fn verdicts_from_tags() {
    assert_eq!(verdict_of("masqd:guard:4"), Some((Family::V4, "kept")));
    assert_eq!(
        verdict_of("masqd:masquerade:6:fully-random"),
        Some((Family::V6, "masqueraded"))
    );
    assert_eq!(verdict_of("masqd:bridge:docker0"), None);
    assert_eq!(verdict_of("masqd:mark:0x4000/0x4000"), None);
}

#[test]
fn verdicts_of_the_tags_masqd_writes() {
    // The tags as `nft list chain inet masqd postrouting` shows them (written out here, not
    // taken from the encoder).
    let want = [
        ("masqd:guard:4", Some((Family::V4, "kept"))),
        ("masqd:guard:6", Some((Family::V6, "kept"))),
        ("masqd:masquerade:4", Some((Family::V4, "masqueraded"))),
        ("masqd:masquerade:6", Some((Family::V6, "masqueraded"))),
        (
            "masqd:masquerade:4:fully-random",
            Some((Family::V4, "masqueraded")),
        ),
        ("masqd:guard:5", None),
        ("masqd:masquerade:", None),
        ("other:guard:4", None),
        ("", None),
    ];
    for (tag, verdict) in want {
        assert_eq!(verdict_of(tag), verdict, "{tag:?}");
    }
    // Every rule the planner writes that counts a connection has a verdict.
    for f in Family::ALL {
        let guard = crate::backend::RuleSpec::Guard(f).tag();
        assert_eq!(verdict_of(&guard), Some((f, "kept")));
        for random_fully in [false, true] {
            let m = crate::backend::RuleSpec::Masquerade {
                family: f,
                random_fully,
            };
            assert_eq!(verdict_of(&m.tag()), Some((f, "masqueraded")));
        }
    }
}

#[test]
fn legacy_counts_are_the_status_counters() {
    let lo = crate::backend::LegacyObserved {
        chain_exists: true,
        chain_rules: vec![
            "-o cni0 -j RETURN".into(),
            "-s 10.244.1.0/24 -d 10.244.0.0/16 -j RETURN".into(),
            "-s 10.244.1.0/24 -j MASQUERADE".into(),
        ],
        chain_packets: vec![40, 5, 9],
        ..Default::default()
    };
    assert_eq!(super::kernel::legacy_counts(&lo), (9, 5));
    let status = crate::backend::counters::legacy(&lo).expect("the chain exists");
    assert_eq!((status.masqueraded, status.kept), (9, 5));
    // No chain observed: nothing counted.
    let none = crate::backend::LegacyObserved::default();
    assert_eq!(super::kernel::legacy_counts(&none), (0, 0));
}

#[test]
fn health_and_families_before_any_reconcile() {
    let m = Metrics::new();
    assert_eq!(m.health(), Err("no reconcile has finished yet".to_string()));
    let text = m.render();
    for family in [
        "# TYPE masqd_sync_duration_seconds histogram",
        "masqd_sync_duration_seconds_bucket{le=\"0.001\"} 0",
        "# TYPE masqd_sync_failures counter",
        "masqd_repairs_total{cause=\"table_gone\"} 0",
        "masqd_build_info{version=\"",
    ] {
        assert!(text.contains(family), "{family} missing from:\n{text}");
    }
}

#[test]
fn http_answers() {
    let m = Metrics::new();
    let (s, _, _, _) = respond(b"GET /healthz HTTP/1.1\r\n\r\n", &m);
    assert_eq!(s, "503 Service Unavailable");
    let (s, c, body, _) = respond(b"GET /metrics?x=1 HTTP/1.1\r\n\r\n", &m);
    assert_eq!((s, c), ("200 OK", PROMETHEUS_TEXT));
    assert!(
        body.contains("# TYPE masqd_sync_failures_total counter\n"),
        "{body}"
    );
    assert!(!body.contains("# EOF"));
    let om =
        b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text; version=1.0.0\r\n\r\n";
    let (s, c, body, _) = respond(om, &m);
    assert_eq!((s, c), ("200 OK", OPENMETRICS));
    assert!(body.ends_with("# EOF\n"));
    assert_eq!(
        respond(b"POST /metrics HTTP/1.1\r\n\r\n", &m).0,
        "405 Method Not Allowed"
    );
    assert_eq!(respond(b"GET / HTTP/1.1\r\n\r\n", &m).0, "404 Not Found");
    assert_eq!(respond(b"", &m).0, "405 Method Not Allowed");
    let (_, _, _, head_only) = respond(b"HEAD /metrics HTTP/1.1\r\n\r\n", &m);
    assert!(head_only);
}

fn overridden(backend: &str, table: &str, handle: u64, reason: &str) -> crate::foreign::Overridden {
    crate::foreign::Overridden {
        backend: crate::backend::Backend::from_name(backend).expect("nft or legacy"),
        ip_family: "ipv4".into(),
        table: table.into(),
        chain: "POSTROUTING".into(),
        handle,
        rule: "masquerade".into(),
        reason: reason.into(),
    }
}

#[test]
fn overridden_rules_are_counted_once_per_table() {
    let m = Metrics::new();
    let by_guard = "overridden by masqd's guard for 2 excepted CIDRs";
    m.set_overridden(&[
        overridden("nft", "ip docker-bridges", 5, by_guard),
        overridden("nft", "ip docker-bridges", 5, by_guard),
        overridden("nft", "ip docker-bridges", 9, by_guard),
        overridden("legacy", "nat", 1, by_guard),
        overridden(
            "nft",
            "ip nat",
            3,
            "removed by masqd (replace_default_rule)",
        ),
    ]);
    let text = m.render();
    assert!(
        text.contains("masqd_overridden_rules{table=\"ip docker-bridges\"} 2\n"),
        "{text}"
    );
    assert!(
        text.contains("masqd_overridden_rules{table=\"legacy nat\"} 1\n"),
        "{text}"
    );
    assert!(!text.contains("table=\"ip nat\""), "{text}");
    // A later refresh replaces the values: a rule that went away is not reported.
    m.set_overridden(&[]);
    assert!(!m.render().contains("masqd_overridden_rules{"));
}

#[test]
fn legacy_chain_counts_by_verdict() {
    let lo = crate::backend::LegacyObserved {
        chain_rules: vec![
            "-o docker0 -j RETURN".into(),
            "-s 172.7.21.0/24 -d 172.7.0.0/16 -j RETURN".into(),
            "-s 172.7.21.0/24 -d 10.200.0.0/24 -j RETURN".into(),
            "-s 172.7.21.0/24 -j MASQUERADE --random-fully".into(),
        ],
        chain_packets: vec![100, 7, 3, 11],
        ..Default::default()
    };
    // The bridge's RETURN is neither kept nor masqueraded.
    assert_eq!(super::kernel::legacy_counts(&lo), (11, 10));
}

#[test]
fn prometheus_text_names_counter_samples() {
    let om = "# HELP masqd_repairs Reconciles that repaired drift.\n\
              # TYPE masqd_repairs counter\n\
              masqd_repairs_total{cause=\"table_gone\"} 1\n\
              # HELP masqd_set_elements Intervals.\n\
              # TYPE masqd_set_elements gauge\n\
              # UNIT masqd_set_elements intervals\n\
              masqd_set_elements{ip_family=\"ipv4\",set=\"pod4\"} 1\n\
              # EOF\n";
    assert_eq!(
        prometheus_text(om),
        "# HELP masqd_repairs_total Reconciles that repaired drift.\n\
         # TYPE masqd_repairs_total counter\n\
         masqd_repairs_total{cause=\"table_gone\"} 1\n\
         # HELP masqd_set_elements Intervals.\n\
         # TYPE masqd_set_elements gauge\n\
         masqd_set_elements{ip_family=\"ipv4\",set=\"pod4\"} 1\n"
    );
}

#[test]
fn a_refused_configuration_shows_until_a_good_one_is_read() {
    let m = Metrics::new();
    m.config_read(true);
    assert!(m
        .render()
        .contains("\nmasqd_config_last_reload_successful 1\n"));
    m.config_read(false);
    m.config_read(false);
    let text = m.render();
    assert!(
        text.contains("\nmasqd_config_last_reload_successful 0\n"),
        "{text}"
    );
    assert!(
        text.contains("\nmasqd_config_reload_failures_total 2\n"),
        "{text}"
    );
    m.config_read(true);
    let text = m.render();
    assert!(
        text.contains("\nmasqd_config_last_reload_successful 1\n"),
        "{text}"
    );
    assert!(
        text.contains("\nmasqd_config_reload_failures_total 2\n"),
        "{text}"
    );
}
