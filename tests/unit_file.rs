//! The systemd unit: the directives the daemon relies on, and its exposure score as
//! `systemd-analyze security --offline=yes` computes it (at most 2.0).

use std::process::Command;

const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/masqd.service");

#[test]
fn unit_has_the_daemon_contract() {
    let text = std::fs::read_to_string(UNIT).unwrap();
    for line in [
        "Type=notify",
        "ExecStart=/usr/sbin/masqd run",
        "ExecReload=/usr/sbin/masqd check --reload $MAINPID",
        "Restart=on-failure",
        "RestartPreventExitStatus=78",
        "StateDirectory=masqd",
        "Wants=network-pre.target",
        "Before=network-pre.target kubelet.service",
        "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
    ] {
        assert!(text.lines().any(|l| l.trim() == line), "missing {line:?}");
    }
    assert!(text.lines().any(|l| l.starts_with("WatchdogSec=")));
    assert!(text.lines().any(|l| l.starts_with("SystemCallFilter=")));
    assert!(text
        .lines()
        .any(|l| l.starts_with("RestrictAddressFamilies=AF_NETLINK AF_UNIX")));
    // A reload validates before it signals: no bare `kill -HUP` that reports success for a
    // broken configuration.
    for l in text.lines().filter(|l| l.starts_with("ExecReload=")) {
        assert!(!l.contains("kill"), "unvalidated reload: {l}");
    }
    // Ordering only: no hard dependency on flannel, docker or kubelet.
    for l in text.lines() {
        if l.starts_with("Requires=") || l.starts_with("BindsTo=") {
            panic!("hard dependency: {l}");
        }
    }
}

#[test]
fn exposure_is_at_most_2_0() {
    let o = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", UNIT])
        .output()
        .expect("systemd-analyze is required (apt-get install systemd)");
    let out = String::from_utf8_lossy(&o.stdout);
    let line = out
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| {
            panic!(
                "no exposure level in: {out}{}",
                String::from_utf8_lossy(&o.stderr)
            )
        });
    let score: f64 = line
        .split(':')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the score in {line:?}"));
    eprintln!("{line}");
    assert!(score <= 2.0, "{line}");
}
