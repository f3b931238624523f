//! Unit tests of the backend decision.
use super::*;

fn facts(bins: bool) -> Facts {
    let mut f = Facts::default();
    for b in &binary_list(Family::V4) {
        f.binaries
            .insert(b.clone(), bins.then(|| format!("/usr/sbin/{b}")));
    }
    f
}

fn auto(f: &Facts) -> Backend {
    decide(BackendMode::Auto, Family::V4, f).unwrap().backend
}

#[test]
fn nothing_anywhere_is_nft() {
    assert_eq!(auto(&facts(true)), Backend::Nft);
    assert_eq!(auto(&facts(false)), Backend::Nft);
}

#[test]
fn nft_rules_only_is_nft() {
    let mut f = facts(true);
    f.nft_rules = 12;
    assert_eq!(auto(&f), Backend::Nft);
}

#[test]
fn real_legacy_rules_only_is_legacy() {
    let mut f = facts(true);
    f.legacy_tables = vec!["nat".into()];
    apply_legacy_save(
        "*nat\n:POSTROUTING ACCEPT [0:0]\n-A POSTROUTING -s 10.0.0.0/24 -j MASQUERADE\nCOMMIT\n",
        &mut f,
    );
    assert_eq!(f.legacy_rules, 1);
    let d = decide(BackendMode::Auto, Family::V4, &f).unwrap();
    assert_eq!(d.backend, Backend::Legacy);
    assert!(d.reason.contains("1 legacy"), "{}", d.reason);
}

#[test]
fn empty_legacy_tables_are_not_rules() {
    let mut f = facts(true);
    f.legacy_tables = vec!["nat".into(), "filter".into()];
    apply_legacy_save(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n",
        &mut f,
    );
    assert_eq!(f.legacy_rules, 0);
    assert_eq!(auto(&f), Backend::Nft);
}

#[test]
fn hint_chain_wins_over_rule_counts() {
    let mut f = facts(true);
    f.legacy_tables = vec!["mangle".into()];
    apply_legacy_save("*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n", &mut f);
    f.nft_rules = 500;
    assert_eq!(auto(&f), Backend::Legacy);
    // The mirror case.
    let mut g = facts(true);
    g.legacy_rules = 40;
    g.legacy_tables = vec!["filter".into()];
    g.nft_hint_chains = vec!["ip mangle/KUBE-IPTABLES-HINT".into()];
    assert_eq!(auto(&g), Backend::Nft);
}

#[test]
fn hint_name_must_be_the_whole_chain_name() {
    let mut f = facts(true);
    f.legacy_tables = vec!["mangle".into()];
    apply_legacy_save(
        "*mangle\n:KUBE-IPTABLES-HINT-OLD - [0:0]\n:X - [0:0]\n-A X -m comment --comment KUBE-IPTABLES-HINT -j RETURN\nCOMMIT\n",
        &mut f,
    );
    assert!(f.legacy_hint_chains.is_empty());
    f.nft_rules = 3;
    assert_eq!(auto(&f), Backend::Nft);
}

#[test]
fn own_objects_keep_their_backend() {
    let mut f = facts(true);
    f.legacy_tables = vec!["nat".into()];
    apply_legacy_save(
        &format!("*nat\n:{} - [0:0]\nCOMMIT\n", legacy::CHAIN),
        &mut f,
    );
    f.nft_rules = 10;
    assert_eq!(auto(&f), Backend::Legacy);
    let mut g = facts(true);
    g.nft_masqd = true;
    g.legacy_rules = 10;
    assert_eq!(auto(&g), Backend::Nft);
}

#[test]
fn uninspectable_legacy_is_an_error() {
    let mut f = facts(false);
    f.legacy_tables = vec!["nat".into()];
    f.legacy_error =
        Some("legacy tables are loaded (nat) but iptables-legacy-save is not on PATH".into());
    let e = decide(BackendMode::Auto, Family::V4, &f).unwrap_err();
    assert!(
        e.contains("install the iptables package") && e.contains("backend.mode"),
        "{e}"
    );
    // A forced nft mode does not need to look.
    assert_eq!(
        decide(BackendMode::Nft, Family::V4, &f).unwrap().backend,
        Backend::Nft
    );
}

#[test]
fn families_decide_independently() {
    let mut v4 = facts(true);
    v4.legacy_rules = 3;
    let v6 = facts(true);
    assert_eq!(auto(&v4), Backend::Legacy);
    assert_eq!(
        decide(BackendMode::Auto, Family::V6, &v6).unwrap().backend,
        Backend::Nft
    );
}

#[test]
fn no_evidence_anywhere_follows_the_system_iptables() {
    let mut v4 = facts(true);
    let mut v6 = facts(true);
    for b in &binary_list(Family::V6) {
        v6.binaries
            .insert(b.clone(), Some(format!("/usr/sbin/{b}")));
    }
    for (variant, want) in [
        ("/usr/sbin/xtables-legacy-multi", Backend::Legacy),
        ("/usr/sbin/xtables-nft-multi", Backend::Nft),
    ] {
        for f in [&mut v4, &mut v6] {
            f.system_iptables = Some(format!("/usr/sbin/iptables -> {variant}"));
            f.system_default = variant_of_name(variant.rsplit('/').next().unwrap());
        }
        let [a, b] = decide_both(BackendMode::Auto, [&v4, &v6]);
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!((a.backend, b.backend), (want, want), "{variant}");
        assert!(a.reason.contains("system default"), "{}", a.reason);
        assert!(a.reason.contains(variant), "{}", a.reason);
    }
    // No iptables at all: nftables.
    let none = facts(false);
    let [a, _] = decide_both(BackendMode::Auto, [&none, &none]);
    assert_eq!(a.unwrap().backend, Backend::Nft);
}

#[test]
fn variant_names_and_versions() {
    assert_eq!(
        variant_of_name("xtables-legacy-multi"),
        Some(Backend::Legacy)
    );
    assert_eq!(variant_of_name("iptables-legacy"), Some(Backend::Legacy));
    assert_eq!(variant_of_name("xtables-nft-multi"), Some(Backend::Nft));
    assert_eq!(variant_of_name("iptables"), None);
    assert_eq!(
        variant_of_version("iptables v1.8.9 (legacy)\n"),
        Some(Backend::Legacy)
    );
    assert_eq!(
        variant_of_version("iptables v1.8.9 (nf_tables)\n"),
        Some(Backend::Nft)
    );
    assert_eq!(
        variant_of_version("iptables v1.4.21\n"),
        Some(Backend::Legacy)
    );
    assert_eq!(variant_of_version("iptables v1.8.9\n"), None);
    assert_eq!(variant_of_name("xtables-multi"), Some(Backend::Legacy));
}

#[test]
fn a_family_without_evidence_follows_the_other() {
    let mut v4 = facts(true);
    v4.legacy_tables = vec!["nat".into()];
    v4.legacy_rules = 2;
    let mut v6 = facts(true);
    for b in &binary_list(Family::V6) {
        v6.binaries
            .insert(b.clone(), Some(format!("/usr/sbin/{b}")));
    }
    // The system default says nft, but IPv4's evidence decides for IPv6 too.
    v6.system_iptables = Some("/usr/sbin/ip6tables -> /usr/sbin/xtables-nft-multi".into());
    v6.system_default = Some(Backend::Nft);
    let [a, b] = decide_both(BackendMode::Auto, [&v4, &v6]);
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!((a.backend, b.backend), (Backend::Legacy, Backend::Legacy));
    assert!(b.reason.contains("follows ipv4"), "{}", b.reason);
    // Evidence of its own wins over the other family's.
    v6.nft_rules = 3;
    let [_, b] = decide_both(BackendMode::Auto, [&v4, &v6]);
    assert_eq!(b.unwrap().backend, Backend::Nft);
    // It cannot follow into legacy without the binaries: its own default, saying why.
    let mut v6 = facts(false);
    v6.system_default = None;
    let [_, b] = decide_both(BackendMode::Auto, [&v4, &v6]);
    let b = b.unwrap();
    assert_eq!(b.backend, Backend::Nft);
    assert!(b.reason.contains("not following ipv4"), "{}", b.reason);
}

#[test]
fn the_guard_is_not_masqd_policy() {
    // Legacy mode keeps the guard in nftables: nft_masqd stays false (the masquerade rule
    // is what counts), so the legacy chain keeps the family in legacy.
    let mut f = facts(true);
    f.legacy_masqd = true;
    f.nft_masqd = false;
    f.nft_rules = 0;
    assert_eq!(auto(&f), Backend::Legacy);
}

#[test]
fn forced_modes() {
    assert_eq!(
        decide(BackendMode::Legacy, Family::V4, &facts(true))
            .unwrap()
            .backend,
        Backend::Legacy
    );
    let e = decide(BackendMode::Legacy, Family::V4, &facts(false)).unwrap_err();
    assert!(
        e.contains("iptables-legacy-save and iptables-legacy-restore not found"),
        "{e}"
    );
    assert_eq!(
        decide(BackendMode::Nft, Family::V4, &facts(false))
            .unwrap()
            .backend,
        Backend::Nft
    );
}
