//! Unit tests of the command bodies: exit-code classification, the export choice, the text of
//! `status`, `detect` and `teardown`.

use super::apply;
use super::exit::{self, ExitClass};
use super::export::{choose, Choice, Format};
use crate::backend::query::{ExecError, NlError};
use crate::backend::Backend;
use crate::engine::{Detection, FamilyDetection};
use crate::policy::{Family, Policy};

#[test]
fn denied_by_the_kernel_or_the_state_directory_is_its_own_class() {
    let eperm = anyhow::Error::new(NlError::Kernel {
        errno: libc::EPERM,
        what: "get gen".into(),
        ext: None,
    })
    .context("opening netlink");
    assert_eq!(ExitClass::of(&eperm), ExitClass::Denied);
    assert!(
        exit::message(&eperm).starts_with("masqd needs root or CAP_NET_ADMIN"),
        "{}",
        exit::message(&eperm)
    );
    let enoent = anyhow::Error::new(NlError::Kernel {
        errno: libc::ENOENT,
        what: "list table inet masqd".into(),
        ext: None,
    });
    assert_eq!(ExitClass::of(&enoent), ExitClass::Failed);
    assert!(!exit::message(&enoent).contains("CAP_NET_ADMIN"));
    let io = anyhow::Error::new(std::io::Error::from_raw_os_error(libc::EACCES))
        .context("locking /var/lib/masqd");
    assert_eq!(ExitClass::of(&io), ExitClass::Denied);
    let other = anyhow::anyhow!("no ipv4 pod CIDRs");
    assert_eq!(ExitClass::of(&other), ExitClass::Failed);
    assert_eq!(exit::message(&other), "no ipv4 pod CIDRs");
    // Every failure exits 1, whatever its class.
    assert_eq!((ExitClass::Denied.code(), ExitClass::Failed.code()), (1, 1));
}

#[test]
fn a_legacy_binary_that_says_permission_denied_is_denied() {
    let e = |stderr: &str| {
        anyhow::Error::new(ExecError::Failed {
            cmd: "iptables-legacy-save".into(),
            why: "exit status 4".into(),
            stderr: stderr.into(),
        })
    };
    let denied = e("iptables-legacy-save: Permission denied (you must be root)");
    assert_eq!(ExitClass::of(&denied), ExitClass::Denied);
    assert_eq!(
        ExitClass::of(&e("iptables-legacy-save: unknown option")),
        ExitClass::Failed
    );
}

fn family(backend: Backend, nft_unavailable: bool) -> FamilyDetection {
    FamilyDetection {
        backend,
        reason: "configured".into(),
        guard: "identity SNAT".into(),
        facts: crate::detect::Facts {
            nft_unavailable,
            ..Default::default()
        },
    }
}

fn detection(v4: FamilyDetection, v6: FamilyDetection) -> Detection {
    Detection { ipv4: v4, ipv6: v6 }
}

fn dual_stack() -> Policy {
    let text = "[node]\npod_cidrs = [\"172.7.21.0/24\", \"fd00:7:21::/64\"]\n\
                [masquerade]\ncluster_cidrs = [\"172.7.0.0/16\", \"fd00:7::/48\"]\n";
    let c = crate::config::parse(std::path::Path::new("/etc/masqd/masqd.toml"), text)
        .expect("valid test configuration");
    Policy::from_config(&c)
}

#[test]
fn export_follows_the_detected_backends() {
    let p = dual_stack();
    // Both in nftables: the whole policy as an nft script.
    let d = detection(family(Backend::Nft, false), family(Backend::Nft, false));
    assert_eq!(
        choose(&d, &p, None, None),
        Choice::Nft {
            full: vec![Family::V4, Family::V6],
            guard: vec![],
        }
    );
    // IPv6 in legacy xtables: its restore payload, pointing at the guard.
    let d = detection(family(Backend::Nft, false), family(Backend::Legacy, false));
    let Choice::Iptables {
        family: f,
        warning,
        notes,
    } = choose(&d, &p, None, None)
    else {
        panic!("a legacy family exports iptables by default");
    };
    assert_eq!((f, warning), (Family::V6, None));
    assert_eq!(notes, ["the guard in nftables: masqd export --format nft"]);
    // `--format nft` then: IPv4 in full, IPv6's guard only.
    assert_eq!(
        choose(&d, &p, Some(Format::Nft), None),
        Choice::Nft {
            full: vec![Family::V4],
            guard: vec![Family::V6],
        }
    );
}

#[test]
fn export_of_a_family_not_in_legacy_warns_and_names_the_others() {
    let p = dual_stack();
    // Both legacy, no nf_tables: no guard note; asking for IPv4 names the IPv6 payload.
    let d = detection(family(Backend::Legacy, true), family(Backend::Legacy, true));
    let Choice::Iptables { family, notes, .. } = choose(&d, &p, None, Some(Family::V4)) else {
        panic!("legacy families export iptables");
    };
    assert_eq!(family, Family::V4);
    assert_eq!(
        notes,
        ["the ipv6 policy: masqd export --format iptables --family ipv6"]
    );
    // `--format iptables` on a node in nftables: IPv4 by default, with a warning.
    let d = detection(family_nft(), family_nft());
    let Choice::Iptables {
        family, warning, ..
    } = choose(&d, &p, Some(Format::Iptables), None)
    else {
        panic!("the format asked for wins");
    };
    assert_eq!(family, Family::V4);
    let w = warning.unwrap_or_default();
    assert!(
        w.contains("ipv4 is not in legacy xtables on this node (backend nft)"),
        "{w}"
    );
}

fn family_nft() -> FamilyDetection {
    family(Backend::Nft, false)
}

#[test]
fn status_names_the_legacy_chain_and_the_rule_positions() {
    assert_eq!(
        apply::status_set_line("legacy-chain", 3),
        "  chain MASQD-POSTROUTING   3 rule(s)"
    );
    assert_eq!(
        apply::status_set_line("nomasq4", 2),
        "  set nomasq4               2 interval(s)"
    );
    assert_eq!(apply::position("legacy", 2), "rule 2");
    assert_eq!(apply::position("nft", 7), "handle 7");
    assert_eq!(
        apply::overridden_text(&[]),
        "other NAT rules for the pod CIDRs: none\n"
    );
}

#[test]
fn teardown_counts_what_it_did() {
    let r = crate::engine::TeardownReport {
        removed: vec!["table inet masqd".into()],
        ..Default::default()
    };
    assert_eq!(
        super::teardown::report_text(&r),
        "removed: table inet masqd\n\
         teardown: restored 0 default rule(s), 0 already present; removed 1 object(s) of masqd's\n"
    );
    let none = super::teardown::report_text(&Default::default());
    assert!(
        none.starts_with("removed: nothing (no masqd rules were installed)\n"),
        "{none}"
    );
}

#[test]
fn detection_text_lists_every_fact() {
    let mut v4 = family(Backend::Legacy, false);
    v4.facts.legacy_error = Some("iptables-legacy-save: incompatible".into());
    let t = super::detect::detection_text(&detection(v4, family_nft()));
    let lines: Vec<&str> = t.lines().collect();
    assert_eq!(lines[0], "ipv4: legacy — configured");
    assert!(lines.contains(&"    system iptables            (not found)"));
    assert!(lines.contains(&"    legacy tables loaded       (none)"));
    assert!(lines.contains(&"    legacy error               iptables-legacy-save: incompatible"));
    assert_eq!(t.matches("nftables masqd policy").count(), 2);
}
