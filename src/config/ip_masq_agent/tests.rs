//! Upstream kubernetes-sigs/ip-masq-agent's own config cases (cmd/ip-masq-agent/
//! ip-masq-agent_test.go: `validateConfigTests`, `syncConfigTests`, `TestSyncMasqRules`,
//! `TestSyncMasqRulesIPv6`), rewritten with the same inputs and the expected values; plus
//! masqd's stricter cases.

use super::*;
use std::path::PathBuf;

fn path() -> PathBuf {
    PathBuf::from("/etc/config/ip-masq-agent")
}

fn nets(list: &[&str]) -> Vec<IpNet> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

fn ok(text: &str) -> AgentConfig {
    parse(&path(), text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
}

fn err(text: &str) -> String {
    match parse(&path(), text) {
        Ok(c) => panic!("{text:?} was accepted: {c:?}"),
        Err(e) => e.to_string(),
    }
}

fn cfg(cidrs: &[&str], link_local: bool, resync: u64) -> AgentConfig {
    AgentConfig {
        non_masquerade_cidrs: nets(cidrs),
        cidr_limit: 64,
        masq_link_local: link_local,
        masq_link_local_ipv6: false,
        resync_interval: Duration::from_secs(resync),
        resync_given: resync != 60,
        unknown_keys: Vec::new(),
    }
}

const DEFAULTS: [&str; 3] = DEFAULT_NON_MASQUERADE;

// syncConfigTests ------------------------------------------------------------------------------

#[test]
fn valid_yaml_all_keys() {
    let text = "\nnonMasqueradeCIDRs:\n  - 172.16.0.0/12\n  - 10.0.0.0/8\ncidrLimit: 64\n\
                masqLinkLocal: true\nresyncInterval: 5s\n";
    assert_eq!(ok(text), cfg(&["172.16.0.0/12", "10.0.0.0/8"], true, 5));
}

#[test]
fn valid_yaml_single_keys_keep_the_other_defaults() {
    assert_eq!(
        ok("\nnonMasqueradeCIDRs:\n  - 192.168.0.0/16\n"),
        cfg(&["192.168.0.0/16"], false, 60)
    );
    assert_eq!(ok("\nmasqLinkLocal: true\n"), cfg(&DEFAULTS, true, 60));
    assert_eq!(ok("\nresyncInterval: 5m\n"), cfg(&DEFAULTS, false, 300));
}

#[test]
fn invalid_yaml_is_refused_naming_the_file() {
    let e = err("*");
    assert!(
        e.starts_with("/etc/config/ip-masq-agent:1: not valid YAML or JSON"),
        "{e}"
    );
    assert!(
        e.contains("did not find expected alphabetic or numeric character"),
        "{e}"
    );
}

#[test]
fn valid_json_all_keys_and_single_keys() {
    let all = "\n{\n  \"nonMasqueradeCIDRs\": [\"172.16.0.0/12\", \"10.0.0.0/8\"],\n  \
               \"masqLinkLocal\": true,\n  \"resyncInterval\": \"5s\"\n}\n";
    assert_eq!(ok(all), cfg(&["172.16.0.0/12", "10.0.0.0/8"], true, 5));
    assert_eq!(
        ok("\n{\n\t\"nonMasqueradeCIDRs\": [\"192.168.0.0/16\"]\n}\n"),
        cfg(&["192.168.0.0/16"], false, 60)
    );
    assert_eq!(
        ok("\n{\n\t\"masqLinkLocal\": true\n}\n"),
        cfg(&DEFAULTS, true, 60)
    );
    assert_eq!(
        ok("\n{\n\t\"resyncInterval\": \"5m\"\n}\n"),
        cfg(&DEFAULTS, false, 300)
    );
}

#[test]
fn json_escapes_are_decoded() {
    // "valid json file, just resyncInterval but escaped": \u0035\u006d is "5m".
    let text = "\n{\n\t\"resyncInterval\": \"\\u0035\\u006d\"\n}\n";
    assert_eq!(ok(text), cfg(&DEFAULTS, false, 300));
}

#[test]
fn invalid_json_is_refused_naming_the_file() {
    // An opening curly brace, then `*` (escaped: brace counters must not be misled).
    let e = err("\x7b*");
    assert!(
        e.starts_with("/etc/config/ip-masq-agent:1: not valid JSON"),
        "{e}"
    );
}

#[test]
fn no_file_and_empty_file_are_the_defaults() {
    // "no config file": the caller passes the default; an empty file is YAML null upstream.
    assert_eq!(AgentConfig::default(), cfg(&DEFAULTS, false, 60));
    assert_eq!(ok(""), AgentConfig::default());
    assert_eq!(ok("# only a comment\n"), AgentConfig::default());
}

#[test]
fn json_with_an_ipv6_cidr() {
    let text = "\n\t\t{\n\t\t  \"nonMasqueradeCIDRs\": [\"172.16.0.0/12\", \"10.0.0.0/8\", \
                \"fc00::/7\"],\n\t\t  \"masqLinkLocal\": true,\n\t\t  \"resyncInterval\": \
                \"5s\"\n\t\t}\n\t\t";
    assert_eq!(
        ok(text),
        cfg(&["172.16.0.0/12", "10.0.0.0/8", "fc00::/7"], true, 5)
    );
}

// validateConfigTests --------------------------------------------------------------------------

#[test]
fn validation_cases() {
    assert!(ok("nonMasqueradeCIDRs: []\n")
        .non_masquerade_cidrs
        .is_empty());
    let e = err("nonMasqueradeCIDRs: [abcdefg]\n");
    assert!(
        e.contains("CIDR \"abcdefg\" could not be parsed, invalid CIDR address: abcdefg"),
        "{e}"
    );
    let e = err("nonMasqueradeCIDRs: [10.0.0.0/8, abcdefg]\n");
    assert!(e.contains("CIDR \"abcdefg\" could not be parsed"), "{e}");
    let e = err("nonMasqueradeCIDRs: [10.256.0.0/16]\n");
    assert!(
        e.contains("CIDR \"10.256.0.0/16\" could not be parsed, invalid CIDR address"),
        "{e}"
    );
    let e = err("nonMasqueradeCIDRs: [10.0.0.1/8]\n");
    assert!(
        e.contains(
            "CIDR \"10.0.0.1/8\" is not aligned to a CIDR block, ip: \"10.0.0.1\" network: \
             \"10.0.0.0/8\""
        ),
        "{e}"
    );
    assert!(
        e.starts_with("/etc/config/ip-masq-agent:1: nonMasqueradeCIDRs: "),
        "{e}"
    );
}

#[test]
fn cidr_limit_is_enforced_excluding_link_local() {
    let list: Vec<String> = (0..65).map(|i| format!("  - 10.{i}.0.0/16")).collect();
    let text = format!("nonMasqueradeCIDRs:\n{}\n", list.join("\n"));
    let e = err(&text);
    assert!(
        e.contains("65 CIDRs, more than cidrLimit (default 64) = 64"),
        "{e}"
    );
    let at_limit = format!("nonMasqueradeCIDRs:\n{}\n", list[..64].join("\n"));
    assert_eq!(ok(&at_limit).non_masquerade_cidrs.len(), 64);
    let raised = format!("cidrLimit: 65\n{text}");
    assert_eq!(ok(&raised).non_masquerade_cidrs.len(), 65);
    // The defaults count too: upstream validates the merged config.
    let e = err("cidrLimit: 2\n");
    assert!(e.contains("3 CIDRs, more than cidrLimit = 2"), "{e}");
}

// TestSyncMasqRules / TestSyncMasqRulesIPv6: the exception sets ------------------------------

#[test]
fn rule_set_empty_config_has_only_link_local() {
    let empty = AgentConfig {
        non_masquerade_cidrs: Vec::new(),
        ..AgentConfig::default()
    };
    assert_eq!(empty.exceptions(), nets(&[LINK_LOCAL_V4, LINK_LOCAL_V6]));
}

#[test]
fn rule_set_default_config() {
    assert_eq!(
        AgentConfig::default().exceptions(),
        nets(&[
            "169.254.0.0/16",
            "fe80::/10",
            "10.0.0.0/8",
            "172.16.0.0/12",
            "192.168.0.0/16"
        ])
    );
}

#[test]
fn rule_set_v4_and_v6_cidrs() {
    let c = ok("nonMasqueradeCIDRs: [10.244.0.0/16, fc00::/7]\n");
    assert_eq!(
        c.exceptions(),
        nets(&["169.254.0.0/16", "fe80::/10", "10.244.0.0/16", "fc00::/7"])
    );
}

#[test]
fn rule_set_link_local_masqueraded_on_request() {
    let c = ok("masqLinkLocal: true\nmasqLinkLocalIPv6: true\nnonMasqueradeCIDRs: [fc00::/7]\n");
    assert_eq!(c.exceptions(), nets(&["fc00::/7"]));
    let c = ok("masqLinkLocalIPv6: true\nnonMasqueradeCIDRs: []\n");
    assert_eq!(c.exceptions(), nets(&["169.254.0.0/16"]));
}

// Bad input and masqd's stricter cases -----------------------------------------------------------

#[test]
fn wrong_types_are_refused_naming_the_key_and_line() {
    let e = err("masqLinkLocal: true\nnonMasqueradeCIDRs: 10.0.0.0/8\n");
    assert!(
        e.starts_with("/etc/config/ip-masq-agent:2: nonMasqueradeCIDRs: must be a list"),
        "{e}"
    );
    let e = err("nonMasqueradeCIDRs: [10.0.0.0/8, 7]\n");
    assert!(
        e.contains("nonMasqueradeCIDRs: every entry must be a CIDR string"),
        "{e}"
    );
    let e = err("cidrLimit: \"64\"\n");
    assert!(e.contains("cidrLimit: must be a number"), "{e}");
    let e = err("cidrLimit: 6.5\n");
    assert!(e.contains("cidrLimit: must be a whole number"), "{e}");
    let e = err("masqLinkLocal: maybe\n");
    assert!(e.contains("masqLinkLocal: must be true or false"), "{e}");
    let e = err("- 10.0.0.0/8\n");
    assert!(e.contains("the file is a list, not a mapping"), "{e}");
}

#[test]
fn resync_interval_durations() {
    assert_eq!(
        ok("resyncInterval: 1m30s\n").resync_interval,
        Duration::from_secs(90)
    );
    assert_eq!(
        ok("resyncInterval: 1.5h\n").resync_interval,
        Duration::from_secs(5400)
    );
    assert_eq!(
        ok("resyncInterval: 2500ms\n").resync_interval,
        Duration::from_millis(2500)
    );
    let e = err("resyncInterval: 5 parsecs\n");
    assert!(
        e.starts_with("/etc/config/ip-masq-agent:1: resyncInterval: "),
        "{e}"
    );
    assert!(e.contains("time: unknown unit"), "{e}");
    let e = err("resyncInterval: 5\n");
    assert!(e.contains("must be a duration string"), "{e}");
    let e = err("resyncInterval: fortnight\n");
    assert!(e.contains("time: invalid duration \"fortnight\""), "{e}");
    let e = err("{\"resyncInterval\": null}");
    assert!(e.contains("time: invalid duration \"\""), "{e}");
    assert!(err("resyncInterval: 0s\n").contains("out of range"));
    assert!(err("resyncInterval: 100ms\n").contains("out of range"));
    assert!(err("resyncInterval: -5s\n").contains("negative"));
}

#[test]
fn go_duration_grammar() {
    assert_eq!(go_duration("0"), Ok(Duration::ZERO));
    assert_eq!(go_duration("+10s"), Ok(Duration::from_secs(10)));
    assert_eq!(
        go_duration("1h2m3s4ms5us6ns").map(|d| d.as_nanos()),
        Ok(3_723_004_005_006)
    );
    assert_eq!(go_duration("3\u{b5}s"), Ok(Duration::from_micros(3)));
    assert_eq!(go_duration(".5s"), Ok(Duration::from_millis(500)));
    for bad in ["", "s", "5", "1.2.3s", ".s", "5 s", "-", "1d"] {
        assert!(go_duration(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn null_values_follow_go_json() {
    // null clears a list, leaves a number or boolean as it was.
    let c = ok("nonMasqueradeCIDRs:\ncidrLimit:\nmasqLinkLocal:\n");
    assert!(c.non_masquerade_cidrs.is_empty());
    assert_eq!(c.cidr_limit, 64);
    assert!(!c.masq_link_local);
}

#[test]
fn keys_match_case_insensitively_and_unknown_keys_are_reported() {
    let c = ok("nonmasqueradecidrs: [10.1.0.0/16]\nMasqLinkLocal: true\nresync: 5s\n");
    assert_eq!(c.non_masquerade_cidrs, nets(&["10.1.0.0/16"]));
    assert!(c.masq_link_local);
    assert_eq!(c.unknown_keys, vec!["resync".to_string()]);
}

#[test]
fn duplicate_keys_are_refused() {
    let e = err("cidrLimit: 1\ncidrLimit: 64\n");
    assert!(e.contains("duplicate mapping key"), "{e}");
    assert!(
        !e.contains("DuplicateKeyPolicy"),
        "advice to the programmer: {e}"
    );
    // JSON keeps the last of two equal keys in a map: masqd still sees both.
    let e = err("{\"cidrLimit\": 1, \"cidrLimit\": 64}");
    assert!(e.contains("sets \"cidrLimit\" twice"), "{e}");
    // Equal ignoring case is the same setting to Go's JSON decoding.
    let e = err("{\"nonmasqueradecidrs\": [\"192.168.0.0/16\"],\n\"nonMasqueradeCIDRs\": []}");
    assert!(
        e.starts_with("/etc/config/ip-masq-agent:2: nonMasqueradeCIDRs: the file sets"),
        "{e}"
    );
    let e = err("masqLinkLocal: true\nMASQLINKLOCAL: false\n");
    assert!(e.contains("keys match regardless of case"), "{e}");
}

#[test]
fn go_refuses_leading_zeros_and_so_does_masqd() {
    let e = err("nonMasqueradeCIDRs: [010.0.0.0/8]\n");
    assert!(
        e.contains("CIDR \"010.0.0.0/8\" could not be parsed"),
        "{e}"
    );
    assert_eq!(
        ok("nonMasqueradeCIDRs: [10.0.0.0/8, 0.0.0.0/8, \"fd00::/8\"]\n")
            .non_masquerade_cidrs
            .len(),
        3
    );
}

#[test]
fn whole_floats_are_numbers_as_upstreams_yaml_to_json_makes_them() {
    assert_eq!(ok("cidrLimit: 2.0\nnonMasqueradeCIDRs: []\n").cidr_limit, 2);
}

#[test]
fn parser_messages_carry_no_advice_to_programmers() {
    for text in [
        "a: 1\n---\nb: 2\n",
        "resyncInterval: [1\n",
        "nonMasqueradeCIDRs: [*x]\n",
    ] {
        let e = err(text);
        assert!(e.starts_with("/etc/config/ip-masq-agent"), "{e}");
        for hint in ["Options", "Option<", "from_str"] {
            assert!(!e.contains(hint), "{text:?}: {e}");
        }
    }
}

#[test]
fn yaml_1_1_booleans_as_upstream() {
    assert!(ok("masqLinkLocal: yes\n").masq_link_local);
    assert!(!ok("masqLinkLocal: off\n").masq_link_local);
}

// As a source of masqd's configuration ------------------------------------------------------------

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("masqd-agent-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn exceptions(c: &super::super::Config) -> Vec<String> {
    c.exception_origins
        .iter()
        .map(|o| format!("{} {}", o.net(), o.key()))
        .collect()
}

#[test]
fn toml_names_the_agent_file_and_its_exceptions_join_the_toml_ones() {
    let d = scratch("toml");
    std::fs::write(
        d.join("agent"),
        "nonMasqueradeCIDRs: [10.96.0.0/12]\nresyncInterval: 7s\n",
    )
    .unwrap();
    let toml = "[node]\npod_cidrs = [\"10.244.1.0/24\"]\nip_masq_agent_config = \"agent\"\n\
                [masquerade]\ncluster_cidrs = [\"10.244.0.0/16\"]\n";
    let c = super::super::parse(&d.join("masqd.toml"), toml).unwrap();
    assert_eq!(
        exceptions(&c),
        vec![
            "10.244.0.0/16 masquerade.cluster_cidrs".to_string(),
            format!("169.254.0.0/16 {LINK_LOCAL_KEY}"),
            format!("fe80::/10 {LINK_LOCAL_KEY}"),
            format!("10.96.0.0/12 {CIDR_KEY}"),
        ]
    );
    assert_eq!(c.resync_interval, Some(Duration::from_secs(7)));
    assert_eq!(c.ip_masq_agent_config, Some(d.join("agent")));
    assert_eq!(
        super::super::watch_paths(&d.join("masqd.toml"), &c),
        vec![d.join("masqd.toml"), d.join("agent")]
    );
    // [daemon] resync_interval wins over the agent's.
    let with = format!("{toml}[daemon]\nresync_interval = \"3s\"\n");
    let c = super::super::parse(&d.join("masqd.toml"), &with).unwrap();
    assert_eq!(c.resync_interval, Some(Duration::from_secs(3)));
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn an_absent_agent_file_is_the_upstream_defaults_and_a_broken_one_names_the_toml_key() {
    let d = scratch("absent");
    let toml = "[node]\npod_cidrs = [\"10.244.1.0/24\"]\nip_masq_agent_config = \"agent\"\n";
    let c = super::super::parse(&d.join("masqd.toml"), toml).unwrap();
    assert_eq!(
        c.nonmasquerade_cidrs.len(),
        5,
        "{:?}",
        c.nonmasquerade_cidrs
    );
    assert_eq!(c.resync_interval, None, "masqd's own default applies");
    std::fs::write(d.join("agent"), "cidrLimit: [1]\n").unwrap();
    let e = super::super::parse(&d.join("masqd.toml"), toml)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(&format!(
            "{}:1: cidrLimit (in the file of node.ip_masq_agent_config, {}:3): must be a number",
            d.join("agent").display(),
            d.join("masqd.toml").display()
        )),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn agent_mode_takes_pods_from_flags_or_flannel() {
    let d = scratch("mode");
    let agent = d.join("ip-masq-agent");
    let env = d.join("subnet.env");
    std::fs::write(
        &agent,
        "{\"nonMasqueradeCIDRs\": [\"10.0.0.0/8\"], \"masqLinkLocal\": true}",
    )
    .unwrap();
    let pods: Vec<IpNet> = nets(&["10.244.3.0/24", "fd00:3::/64"]);
    let c = super::super::load_agent_mode(&agent, &pods, &env).unwrap();
    assert_eq!(c.pod_cidrs, pods);
    assert_eq!(c.path, agent);
    assert_eq!(
        exceptions(&c),
        vec![
            format!("fe80::/10 {LINK_LOCAL_KEY}"),
            format!("10.0.0.0/8 {CIDR_KEY}"),
        ]
    );
    assert_eq!(c.bridge_interfaces, Vec::<String>::new());
    assert!(c.replace_default_rule);
    // No --pod-cidr: flannel's subnet.env, waited for while it is missing.
    let e = super::super::load_agent_mode(&agent, &[], &env).unwrap_err();
    assert!(e.missing_file, "{e}");
    std::fs::write(
        &env,
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\n",
    )
    .unwrap();
    let c = super::super::load_agent_mode(&agent, &[], &env).unwrap();
    assert_eq!(c.pod_cidrs, nets(&["10.244.3.0/24"]));
    assert!(exceptions(&c).contains(&"10.244.0.0/16 FLANNEL_NETWORK".to_string()));
    assert_eq!(
        super::super::watch_paths(&agent, &c),
        vec![agent.clone(), env.clone()]
    );
    let _ = std::fs::remove_dir_all(d);
}
