//! The legacy planner: what masqd's chain must hold ([`desired_chain`]), which broad default
//! rules go ([`match_default`]), and the [`LegacyPlan`] that turns an observed nat table into
//! the wanted one with one `iptables-legacy-restore --noflush` payload. Pure.

use ipnet::IpNet;

use super::observe::LegacyObserved;
use super::restore::Payload;
use super::save::{parse_saved_net, quote_rule, same_rules, split_saved};
use super::{CHAIN, JUMP};
use crate::policy::FamilyPolicy;

fn net_arg(n: &IpNet) -> String {
    // Compared with what iptables-save prints by `same_rules` (as CIDRs, whatever notation).
    n.to_string()
}

/// The rules MASQD-POSTROUTING must hold, as iptables-save prints them.
pub fn desired_chain(fp: &FamilyPolicy, bridges: &[String], random_fully: bool) -> Vec<String> {
    let mut v: Vec<String> = bridges
        .iter()
        .map(|b| format!("-o {b} -j RETURN"))
        .collect();
    for pod in &fp.pod_cidrs {
        for e in fp.exception_cidrs.iter() {
            v.push(format!("-s {} -d {} -j RETURN", net_arg(pod), net_arg(e)));
        }
    }
    for pod in &fp.pod_cidrs {
        v.push(format!(
            "-s {} -j MASQUERADE{}",
            net_arg(pod),
            if random_fully { " --random-fully" } else { "" }
        ));
    }
    v
}

/// Recognises the broad default rule `-s <cidr> [! -o <if>] -j MASQUERADE [--random|--random-fully]`
/// with nothing else. Returns its source and excluded interface.
pub fn match_default(spec: &str) -> Option<(IpNet, Option<String>)> {
    let words = split_saved(spec)?;
    // A quoted string has no place in the default rule.
    if words.iter().any(|w| w.quoted) {
        return None;
    }
    let t: Vec<&str> = words.iter().map(|w| w.text.as_str()).collect();
    let mut saddr = None;
    let mut oif = None;
    let mut masq = false;
    let mut i = 0;
    while i < t.len() {
        match t[i] {
            "-s" if saddr.is_none() => {
                saddr = Some(parse_saved_net(t.get(i + 1)?)?);
                i += 2;
            }
            "!" if t.get(i + 1) == Some(&"-o") && oif.is_none() => {
                oif = Some(t.get(i + 2)?.to_string());
                i += 3;
            }
            "-j" if t.get(i + 1) == Some(&"MASQUERADE") && !masq => {
                masq = true;
                i += 2;
            }
            "--random" | "--random-fully" if masq => i += 1,
            _ => return None,
        }
    }
    if masq {
        saddr.map(|s| (s, oif))
    } else {
        None
    }
}

/// What the legacy nat table of one family should become.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyPlan {
    /// The iptables-legacy-restore payload, or None when in sync.
    pub payload: Option<String>,
    /// Default rules the payload removes (specs, for records and display).
    pub removed_defaults: Vec<(String, IpNet, Option<String>)>,
    /// One-line summary of each change.
    pub summary: Vec<String>,
}

impl LegacyPlan {
    /// Nothing to change.
    fn in_sync() -> LegacyPlan {
        LegacyPlan {
            payload: None,
            removed_defaults: Vec::new(),
            summary: Vec::new(),
        }
    }
}

/// A broad default rule of POSTROUTING: (spec, source, excluded interface).
type DefaultRule = (String, IpNet, Option<String>);

/// The broad default rules of POSTROUTING whose source is one of `default_pods` and that
/// restore's quoting can express (a rule it cannot express stays).
fn removable_defaults(o: &LegacyObserved, default_pods: &[IpNet]) -> Vec<DefaultRule> {
    o.postrouting
        .iter()
        .filter_map(|r| {
            let (s, oif) = match_default(r)?;
            quote_rule(r)?;
            default_pods.contains(&s).then(|| (r.clone(), s, oif))
        })
        .collect()
}

/// The jumps from POSTROUTING to masqd's chain.
pub(super) fn jumps(o: &LegacyObserved) -> usize {
    o.postrouting.iter().filter(|r| *r == JUMP).count()
}

/// Whether the one jump is at the head of POSTROUTING.
pub(super) fn jump_ok(o: &LegacyObserved) -> bool {
    jumps(o) == 1 && o.postrouting.first().map(String::as_str) == Some(JUMP)
}

/// `-D POSTROUTING <spec>` per default rule, each with its summary line.
fn delete_defaults(p: &mut Payload, summary: &mut Vec<String>, defaults: &[DefaultRule]) {
    for (spec, _, _) in defaults {
        p.delete_default(spec);
        summary.push(format!("delete rule nat POSTROUTING {spec} (default rule)"));
    }
}

/// The payload lines of a family whose backend is legacy: the chain rewritten unless it holds
/// `want`, the jump moved to the head unless it is there once, the defaults deleted. False
/// when all is in sync.
fn plan_active(
    p: &mut Payload,
    summary: &mut Vec<String>,
    o: &LegacyObserved,
    want: &[String],
    defaults: &[DefaultRule],
) -> bool {
    let chain_ok = o.chain_exists && same_rules(&o.chain_rules, want);
    let jump_ok = jump_ok(o);
    if chain_ok && jump_ok && defaults.is_empty() {
        return false;
    }
    if !chain_ok {
        // Declaring a user chain with --noflush flushes it (or creates it).
        p.declare_chain();
        summary.push(format!(
            "{} chain nat {CHAIN} ({} rules)",
            if o.chain_exists { "rewrite" } else { "create" },
            want.len()
        ));
    }
    if !jump_ok {
        p.delete_jumps(jumps(o));
        p.insert_jump();
        summary.push(format!("insert rule nat POSTROUTING 1 {JUMP}"));
    }
    delete_defaults(p, summary, defaults);
    if !chain_ok {
        p.fill_chain(want);
    }
    true
}

/// The payload lines of a family whose backend is not legacy: masqd's stale jump and chain
/// removed, the defaults deleted. False when there is nothing of either.
fn plan_stale(
    p: &mut Payload,
    summary: &mut Vec<String>,
    o: &LegacyObserved,
    defaults: &[DefaultRule],
) -> bool {
    if !o.has_masqd() && defaults.is_empty() {
        return false;
    }
    p.delete_jumps(jumps(o));
    delete_defaults(p, summary, defaults);
    if o.chain_exists {
        p.remove_chain();
    }
    if o.has_masqd() {
        summary.push(format!(
            "remove masqd's stale chain nat {CHAIN} and its jump"
        ));
    }
    true
}

/// Plans the legacy nat table of one family. `active` is the family's policy when legacy is
/// its backend; when it is not, masqd's stale objects are removed. Default rules whose source
/// is one of `default_pods` are removed either way (when `replace_default`).
pub fn plan(
    active: Option<(&FamilyPolicy, &[String], bool)>,
    o: &LegacyObserved,
    default_pods: &[IpNet],
    replace_default: bool,
) -> LegacyPlan {
    let defaults = match replace_default {
        true => removable_defaults(o, default_pods),
        false => Vec::new(),
    };
    let mut p = Payload::nat();
    let mut summary = Vec::new();
    let changed = match active {
        Some((fp, bridges, random_fully)) => {
            let want = desired_chain(fp, bridges, random_fully);
            plan_active(&mut p, &mut summary, o, &want, &defaults)
        }
        None => plan_stale(&mut p, &mut summary, o, &defaults),
    };
    if !changed {
        return LegacyPlan::in_sync();
    }
    LegacyPlan {
        payload: Some(p.commit()),
        removed_defaults: defaults,
        summary,
    }
}

#[cfg(test)]
mod tests {
    use super::super::captured::SAVE_V4;
    use super::*;
    use crate::policy::{Family, Policy};

    const DEFAULT: &str = "-s 172.7.21.0/24 ! -o docker0 -j MASQUERADE";

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    /// The policy whose chain the captured table holds.
    fn fp() -> FamilyPolicy {
        FamilyPolicy {
            configured_pod_cidrs: vec![net("172.7.21.0/24")],
            pod_cidrs: vec![net("172.7.21.0/24")],
            exception_cidrs: vec![net("172.7.0.0/16"), net("10.0.0.1/32")].into(),
            pod: Vec::new().into(),
            nomasq: Vec::new().into(),
        }
    }

    fn bridges() -> Vec<String> {
        vec!["docker0".to_string()]
    }

    fn plan_of(o: &LegacyObserved, replace: bool) -> LegacyPlan {
        let bridges = bridges();
        plan(
            Some((&fp(), &bridges, true)),
            o,
            &[net("172.7.21.0/24")],
            replace,
        )
    }

    fn captured() -> LegacyObserved {
        LegacyObserved::from_save(SAVE_V4)
    }

    #[test]
    fn the_captured_table_is_in_sync_but_for_its_default_rule() {
        let p = plan_of(&captured(), false);
        assert_eq!(p, LegacyPlan::in_sync());
        let p = plan_of(&captured(), true);
        assert_eq!(
            p.payload.as_deref(),
            Some("*nat\n-D POSTROUTING -s 172.7.21.0/24 ! -o docker0 -j MASQUERADE\nCOMMIT\n")
        );
        assert_eq!(
            p.removed_defaults,
            [(
                DEFAULT.to_string(),
                net("172.7.21.0/24"),
                Some("docker0".to_string())
            )]
        );
        assert_eq!(
            p.summary,
            [format!(
                "delete rule nat POSTROUTING {DEFAULT} (default rule)"
            )]
        );
    }

    #[test]
    fn a_missing_chain_is_created_with_its_jump() {
        let o = LegacyObserved {
            nat_loaded: true,
            ..Default::default()
        };
        let p = plan_of(&o, true);
        assert_eq!(
            p.payload.as_deref(),
            Some(
                "*nat\n\
                 :MASQD-POSTROUTING - [0:0]\n\
                 -I POSTROUTING 1 -m comment --comment masqd -j MASQD-POSTROUTING\n\
                 -A MASQD-POSTROUTING -o docker0 -j RETURN\n\
                 -A MASQD-POSTROUTING -s 172.7.21.0/24 -d 172.7.0.0/16 -j RETURN\n\
                 -A MASQD-POSTROUTING -s 172.7.21.0/24 -d 10.0.0.1/32 -j RETURN\n\
                 -A MASQD-POSTROUTING -s 172.7.21.0/24 -j MASQUERADE --random-fully\n\
                 COMMIT\n"
            )
        );
        assert_eq!(
            p.summary,
            [
                "create chain nat MASQD-POSTROUTING (4 rules)",
                "insert rule nat POSTROUTING 1 -m comment --comment masqd -j MASQD-POSTROUTING"
            ]
        );
        assert!(p.removed_defaults.is_empty());
    }

    #[test]
    fn a_missing_jump_is_inserted_alone() {
        let text = SAVE_V4.replace(&format!("-A POSTROUTING {JUMP}\n"), "");
        let o = LegacyObserved::from_save(&text);
        assert!(o.chain_exists);
        assert!(!o.postrouting.iter().any(|r| r == JUMP));
        let p = plan_of(&o, false);
        assert_eq!(
            p.payload.as_deref(),
            Some(
                "*nat\n-I POSTROUTING 1 -m comment --comment masqd -j MASQD-POSTROUTING\nCOMMIT\n"
            )
        );
        assert_eq!(p.summary.len(), 1);
    }

    #[test]
    fn a_chain_that_drifted_is_rewritten_in_place() {
        let mut o = captured();
        o.chain_rules.remove(2);
        let p = plan_of(&o, false);
        let payload = p.payload.unwrap();
        assert!(payload.starts_with("*nat\n:MASQD-POSTROUTING - [0:0]\n-A MASQD-POSTROUTING"));
        assert_eq!(payload.matches("-A MASQD-POSTROUTING").count(), 4);
        assert!(!payload.contains("POSTROUTING 1"), "{payload}");
        assert_eq!(p.summary, ["rewrite chain nat MASQD-POSTROUTING (4 rules)"]);
    }

    #[test]
    fn a_stale_chain_goes_with_its_jump_and_the_default_rule() {
        let pods = [net("172.7.21.0/24")];
        let p = plan(None, &captured(), &pods, false);
        assert_eq!(
            p.payload.as_deref(),
            Some(
                "*nat\n-D POSTROUTING -m comment --comment masqd -j MASQD-POSTROUTING\n\
                 -F MASQD-POSTROUTING\n-X MASQD-POSTROUTING\nCOMMIT\n"
            )
        );
        assert_eq!(
            p.summary,
            ["remove masqd's stale chain nat MASQD-POSTROUTING and its jump"]
        );
        let p = plan(None, &captured(), &pods, true);
        assert_eq!(
            p.payload.as_deref(),
            Some(
                "*nat\n-D POSTROUTING -m comment --comment masqd -j MASQD-POSTROUTING\n\
                 -D POSTROUTING -s 172.7.21.0/24 ! -o docker0 -j MASQUERADE\n\
                 -F MASQD-POSTROUTING\n-X MASQD-POSTROUTING\nCOMMIT\n"
            )
        );
        assert_eq!(p.summary.len(), 2);
        assert!(p.summary[0].ends_with("(default rule)"), "{:?}", p.summary);
        assert_eq!(p.removed_defaults.len(), 1);
    }

    #[test]
    fn only_broad_defaults_of_the_node_pods_are_removed() {
        let o = LegacyObserved::from_save(
            "*nat\n:POSTROUTING ACCEPT [0:0]\n\
             -A POSTROUTING -s 10.244.0.0/16 ! -o cni0 -j MASQUERADE\n\
             -A POSTROUTING -s 172.7.21.0/24 -d 10.0.0.0/8 -j MASQUERADE\n\
             -A POSTROUTING -s 172.7.21.0/24 -m comment --comment \"x\" -j MASQUERADE\n\
             -A POSTROUTING -s 172.7.21.0/24 -j MASQUERADE --random-fully\nCOMMIT\n",
        );
        let pods = [net("172.7.21.0/24")];
        let p = plan(None, &o, &pods, true);
        assert_eq!(
            p.removed_defaults,
            [(
                "-s 172.7.21.0/24 -j MASQUERADE --random-fully".to_string(),
                pods[0],
                None
            )]
        );
        assert_eq!(
            p.payload.as_deref(),
            Some("*nat\n-D POSTROUTING -s 172.7.21.0/24 -j MASQUERADE --random-fully\nCOMMIT\n")
        );
        // Without replace_default_rule nothing of a foreign table changes.
        assert_eq!(plan(None, &o, &pods, false), LegacyPlan::in_sync());
    }

    #[test]
    fn the_legacy_chain_holds_the_whole_policy_with_or_without_the_guard() {
        let policy = Policy {
            v4: Some(fp()),
            v6: None,
            bridges: bridges(),
            random_fully: false,
            replace_default_rule: true,
            default_rule_cidrs: vec![net("172.7.21.0/24")],
            honor_marks: vec![],
            guard_only: vec![],
        };
        // The guard is the nftables part of a legacy family; the legacy planner gets the same
        // family policy either way and keeps the exceptions and the masquerade in xtables.
        let guarded = policy.nft_part(&[], &[Family::V4]);
        assert_eq!(guarded.guard_only, [Family::V4]);
        let o = LegacyObserved {
            nat_loaded: true,
            ..Default::default()
        };
        let legacy_plan = |p: &Policy| {
            let fp = p.family(Family::V4).unwrap();
            plan(
                Some((fp, &p.bridges, p.random_fully)),
                &o,
                &p.default_rule_cidrs,
                true,
            )
        };
        let without = legacy_plan(&policy);
        assert_eq!(legacy_plan(&guarded), without);
        let payload = without.payload.unwrap();
        for line in [
            "-A MASQD-POSTROUTING -s 172.7.21.0/24 -d 172.7.0.0/16 -j RETURN\n",
            "-A MASQD-POSTROUTING -s 172.7.21.0/24 -d 10.0.0.1/32 -j RETURN\n",
            "-A MASQD-POSTROUTING -s 172.7.21.0/24 -j MASQUERADE\n",
        ] {
            assert!(payload.contains(line), "{line} missing from {payload}");
        }
    }
}
