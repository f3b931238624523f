//! The legacy xtables backend, through the iptables-legacy binaries (design.md §3):
//!
//! ```text
//! *nat
//! :MASQD-POSTROUTING - [0:0]
//! -I POSTROUTING 1 -m comment --comment masqd -j MASQD-POSTROUTING
//! -A MASQD-POSTROUTING -o docker0 -j RETURN
//! -A MASQD-POSTROUTING -s <pod> -d <exception> -j RETURN     (one per exception CIDR)
//! -A MASQD-POSTROUTING -s <pod> -j MASQUERADE
//! COMMIT
//! ```
//!
//! Observed by parsing `iptables-legacy-save -t nat` (only when the nat table is loaded, so
//! observing never creates it), applied atomically with `iptables-legacy-restore --noflush
//! --wait`. Binaries get an argument vector, never a shell, and a timeout.

use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

use crate::exec::{self, ExecError};
use crate::policy::{Family, FamilyPolicy};
use crate::state::RemovedRule;

/// masqd's chain in the nat table.
pub const CHAIN: &str = "MASQD-POSTROUTING";
/// The jump from POSTROUTING, as iptables-save prints it.
pub const JUMP: &str = "-m comment --comment masqd -j MASQD-POSTROUTING";

/// The legacy binaries of one family.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// `iptables-legacy-save` / `ip6tables-legacy-save`.
    pub save: PathBuf,
    /// `iptables-legacy-restore` / `ip6tables-legacy-restore`.
    pub restore: PathBuf,
    /// Bound on every call.
    pub timeout: Duration,
}

/// Names of the legacy binaries of a family: (save, restore, plain).
pub fn binary_names(f: Family) -> (&'static str, &'static str, &'static str) {
    match f {
        Family::V4 => (
            "iptables-legacy-save",
            "iptables-legacy-restore",
            "iptables-legacy",
        ),
        Family::V6 => (
            "ip6tables-legacy-save",
            "ip6tables-legacy-restore",
            "ip6tables-legacy",
        ),
    }
}

/// The legacy binaries of a family found on `$PATH`, if both save and restore are there.
pub fn binaries(f: Family) -> Option<Binaries> {
    let (save, restore, _) = binary_names(f);
    Some(Binaries {
        save: exec::find_binary(save)?,
        restore: exec::find_binary(restore)?,
        timeout: exec::DEFAULT_TIMEOUT,
    })
}

/// The `/proc` file listing the loaded legacy tables of a family.
pub fn tables_names_path(f: Family) -> &'static str {
    match f {
        Family::V4 => "/proc/net/ip_tables_names",
        Family::V6 => "/proc/net/ip6_tables_names",
    }
}

/// The legacy tables loaded in this network namespace (empty when the module is not loaded).
/// Reading the file has no side effect.
pub fn tables_loaded(f: Family) -> std::io::Result<Vec<String>> {
    match std::fs::read_to_string(tables_names_path(f)) {
        Ok(t) => Ok(t.split_whitespace().map(str::to_string).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// One table of an iptables-save dump.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SavedTable {
    /// Table name.
    pub name: String,
    /// Chain names, in order (`:NAME policy [p:b]` lines).
    pub chains: Vec<String>,
    /// Rules: (chain, spec after `-A CHAIN `).
    pub rules: Vec<(String, String)>,
    /// Packet counters of the rules (with `iptables-save -c`), parallel to `rules`.
    pub packets: Vec<Option<u64>>,
}

/// Parses iptables-save output into its tables.
pub fn parse_save(text: &str) -> Vec<SavedTable> {
    let mut out: Vec<SavedTable> = Vec::new();
    for line in text.lines().map(str::trim_end) {
        if let Some(name) = line.strip_prefix('*') {
            out.push(SavedTable {
                name: name.trim().to_string(),
                ..Default::default()
            });
        } else if let Some(rest) = line.strip_prefix(':') {
            if let (Some(t), Some(name)) = (out.last_mut(), rest.split_whitespace().next()) {
                t.chains.push(name.to_string());
            }
        } else {
            // `[packets:bytes] -A …` with -c
            let (packets, line) = match line.strip_prefix('[').and_then(|l| l.split_once("] ")) {
                Some((c, rest)) => (c.split(':').next().and_then(|p| p.parse().ok()), rest),
                None => (None, line),
            };
            if let Some(rest) = line.strip_prefix("-A ") {
                if let Some(t) = out.last_mut() {
                    let (chain, spec) = rest.split_once(' ').unwrap_or((rest, ""));
                    t.rules.push((chain.to_string(), spec.trim().to_string()));
                    t.packets.push(packets);
                }
            }
        }
    }
    out
}

/// What the legacy nat table of a family holds that matters to masqd.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LegacyObserved {
    /// Whether the legacy nat table is loaded at all.
    pub nat_loaded: bool,
    /// Whether MASQD-POSTROUTING exists.
    pub chain_exists: bool,
    /// Its rules (specs).
    pub chain_rules: Vec<String>,
    /// Their packet counters.
    pub chain_packets: Vec<u64>,
    /// POSTROUTING's rules (specs), in order.
    pub postrouting: Vec<String>,
    /// Every rule of the nat table outside masqd's chain: (chain, spec), in order.
    pub nat_rules: Vec<(String, String)>,
}

impl LegacyObserved {
    /// From the text of `iptables-legacy-save -t nat`.
    pub fn from_save(text: &str) -> LegacyObserved {
        let mut o = LegacyObserved {
            nat_loaded: true,
            ..Default::default()
        };
        if let Some(t) = parse_save(text).into_iter().find(|t| t.name == "nat") {
            o.chain_exists = t.chains.iter().any(|c| c == CHAIN);
            for ((chain, spec), packets) in t.rules.into_iter().zip(t.packets) {
                if chain == CHAIN {
                    o.chain_rules.push(spec);
                    o.chain_packets.push(packets.unwrap_or(0));
                    continue;
                }
                if chain == "POSTROUTING" {
                    o.postrouting.push(spec.clone());
                }
                o.nat_rules.push((chain, spec));
            }
        }
        o
    }

    /// Whether masqd's objects are present.
    pub fn has_masqd(&self) -> bool {
        self.chain_exists || self.postrouting.iter().any(|r| r == JUMP)
    }
}

/// The source NAT rules (`-j MASQUERADE`, `-j SNAT`) of the legacy nat table outside masqd's
/// chain, for [`crate::foreign`]. The handle is the rule's position in its chain, as
/// `iptables-legacy -t nat -L <chain> --line-numbers` numbers it.
pub fn nat_rules(f: Family, o: &LegacyObserved) -> Vec<crate::foreign::NatRule> {
    use crate::foreign::{NatRule, SourceMatch};
    let mut pos: std::collections::BTreeMap<&str, u64> = Default::default();
    let mut out = Vec::new();
    for (chain, spec) in &o.nat_rules {
        let n = pos.entry(chain.as_str()).or_insert(0);
        *n += 1;
        let t: Vec<&str> = spec.split_whitespace().collect();
        let target = t.windows(2).find(|w| w[0] == "-j").map(|w| w[1]);
        if !matches!(target, Some("MASQUERADE") | Some("SNAT")) {
            continue;
        }
        let mut source = SourceMatch::Any;
        for (i, w) in t.iter().enumerate() {
            if *w == "-s" || *w == "--source" {
                let neg = i > 0 && t[i - 1] == "!";
                source = match t.get(i + 1).and_then(|s| parse_saved_net(s)) {
                    Some(net) if neg => SourceMatch::NotNet(net),
                    Some(net) => SourceMatch::Net(net),
                    None => SourceMatch::Unknown,
                };
            } else if w.starts_with("--src-range") || *w == "--match-set" {
                source = SourceMatch::Unknown;
            }
        }
        out.push(NatRule {
            backend: "legacy",
            family: Some(f),
            table_family: match f {
                Family::V4 => "ip".into(),
                Family::V6 => "ip6".into(),
            },
            table: "nat".into(),
            chain: chain.clone(),
            handle: *n,
            priority: 100, // iptable_nat's NF_IP_PRI_NAT_SRC
            source,
            text: format!("-A {chain} {spec}"),
        });
    }
    out
}

/// A CIDR as iptables-save prints it (a host without its prefix length, too).
fn parse_saved_net(s: &str) -> Option<IpNet> {
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<std::net::IpAddr>().ok().map(IpNet::from))
        .map(|n| n.trunc())
}

/// Reads the legacy nat table. Equals `iptables-legacy-save -c -t nat`, run only when
/// `/proc/net/ip_tables_names` lists `nat` (so it never creates the table).
pub fn observe(f: Family, bins: &Binaries) -> Result<LegacyObserved, ExecError> {
    let loaded = tables_loaded(f).unwrap_or_default();
    if !loaded.iter().any(|t| t == "nat") {
        return Ok(LegacyObserved::default());
    }
    let out = exec::run(&bins.save, &["-c", "-t", "nat"], None, bins.timeout)?;
    Ok(LegacyObserved::from_save(&out.stdout))
}

fn net_arg(n: &IpNet) -> String {
    // iptables-save prints host routes with their prefix length, like every other CIDR.
    n.to_string()
}

/// The rules MASQD-POSTROUTING must hold, as iptables-save prints them.
pub fn desired_chain(fp: &FamilyPolicy, bridges: &[String], random_fully: bool) -> Vec<String> {
    let mut v: Vec<String> = bridges
        .iter()
        .map(|b| format!("-o {b} -j RETURN"))
        .collect();
    for pod in &fp.pod_cidrs {
        for e in &fp.exception_cidrs {
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
    let t: Vec<&str> = spec.split_whitespace().collect();
    let mut saddr = None;
    let mut oif = None;
    let mut masq = false;
    let mut i = 0;
    while i < t.len() {
        match t[i] {
            "-s" if saddr.is_none() => {
                let n: IpNet = t.get(i + 1)?.parse().ok()?;
                if n.trunc() != n {
                    return None;
                }
                saddr = Some(n);
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

/// Plans the legacy nat table of one family. `active` is the family's policy when legacy is
/// its backend; when it is not, masqd's stale objects are removed. Default rules whose source
/// is one of `default_pods` are removed either way (when `replace_default`).
pub fn plan(
    active: Option<(&FamilyPolicy, &[String], bool)>,
    o: &LegacyObserved,
    default_pods: &[IpNet],
    replace_default: bool,
) -> LegacyPlan {
    let defaults: Vec<(String, IpNet, Option<String>)> = if replace_default {
        o.postrouting
            .iter()
            .filter_map(|r| {
                let (s, oif) = match_default(r)?;
                default_pods.contains(&s).then(|| (r.clone(), s, oif))
            })
            .collect()
    } else {
        Vec::new()
    };
    let jumps = o.postrouting.iter().filter(|r| *r == JUMP).count();
    let mut lines = vec!["*nat".to_string()];
    let mut summary = Vec::new();
    match active {
        Some((fp, bridges, random_fully)) => {
            let want = desired_chain(fp, bridges, random_fully);
            let chain_ok = o.chain_exists && o.chain_rules == want;
            let jump_ok = jumps == 1 && o.postrouting.first().map(String::as_str) == Some(JUMP);
            if chain_ok && jump_ok && defaults.is_empty() {
                return LegacyPlan {
                    payload: None,
                    removed_defaults: Vec::new(),
                    summary: Vec::new(),
                };
            }
            if !chain_ok {
                // Declaring a user chain with --noflush flushes it (or creates it).
                lines.push(format!(":{CHAIN} - [0:0]"));
                summary.push(format!(
                    "{} chain nat {CHAIN} ({} rules)",
                    if o.chain_exists { "rewrite" } else { "create" },
                    want.len()
                ));
            }
            if !jump_ok {
                for _ in 0..jumps {
                    lines.push(format!("-D POSTROUTING {JUMP}"));
                }
                lines.push(format!("-I POSTROUTING 1 {JUMP}"));
                summary.push(format!("insert rule nat POSTROUTING 1 {JUMP}"));
            }
            for (spec, _, _) in &defaults {
                lines.push(format!("-D POSTROUTING {spec}"));
                summary.push(format!("delete rule nat POSTROUTING {spec} (default rule)"));
            }
            if !chain_ok {
                for r in &want {
                    lines.push(format!("-A {CHAIN} {r}"));
                }
            }
        }
        None => {
            if !o.has_masqd() && defaults.is_empty() {
                return LegacyPlan {
                    payload: None,
                    removed_defaults: Vec::new(),
                    summary: Vec::new(),
                };
            }
            for _ in 0..jumps {
                lines.push(format!("-D POSTROUTING {JUMP}"));
            }
            for (spec, _, _) in &defaults {
                lines.push(format!("-D POSTROUTING {spec}"));
                summary.push(format!("delete rule nat POSTROUTING {spec} (default rule)"));
            }
            if o.chain_exists {
                lines.push(format!("-F {CHAIN}"));
                lines.push(format!("-X {CHAIN}"));
            }
            if o.has_masqd() {
                summary.push(format!(
                    "remove masqd's stale chain nat {CHAIN} and its jump"
                ));
            }
        }
    }
    lines.push("COMMIT".into());
    let mut payload = lines.join("\n");
    payload.push('\n');
    LegacyPlan {
        payload: Some(payload),
        removed_defaults: defaults,
        summary,
    }
}

/// Applies a payload atomically. Equals `iptables-legacy-restore --noflush --wait < payload`.
pub fn apply(bins: &Binaries, payload: &str) -> Result<(), ExecError> {
    exec::run(
        &bins.restore,
        &["--noflush", "--wait"],
        Some(payload.as_bytes()),
        bins.timeout,
    )
    .map(|_| ())
}

/// The record of a removed legacy default rule.
pub fn record_of(f: Family, spec: &str, saddr: &IpNet, oif: &Option<String>) -> RemovedRule {
    RemovedRule {
        backend: "legacy".into(),
        family: match f {
            Family::V4 => "ip".into(),
            Family::V6 => "ip6".into(),
        },
        table: "nat".into(),
        chain: "POSTROUTING".into(),
        description: format!("-A POSTROUTING {spec}"),
        saddr: saddr.to_string(),
        oif_neq: oif.clone(),
        expressions_hex: String::new(),
        userdata_hex: None,
        legacy_rule: Some(spec.to_string()),
    }
}

/// The teardown payload: masqd's jump and chain removed, recorded default rules appended back
/// (unless an identical one is present). Equals `iptables-legacy-restore --noflush` of it.
pub fn teardown_payload(o: &LegacyObserved, records: &[&RemovedRule]) -> Option<String> {
    let mut lines = vec!["*nat".to_string()];
    for r in o.postrouting.iter().filter(|r| *r == JUMP) {
        lines.push(format!("-D POSTROUTING {r}"));
    }
    if o.chain_exists {
        lines.push(format!("-F {CHAIN}"));
        lines.push(format!("-X {CHAIN}"));
    }
    for rec in records {
        if let Some(spec) = &rec.legacy_rule {
            if !o.postrouting.iter().any(|r| r == spec) {
                lines.push(format!("-A POSTROUTING {spec}"));
            }
        }
    }
    if lines.len() == 1 {
        return None;
    }
    lines.push("COMMIT".into());
    Some(lines.join("\n") + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVE: &str = "# Generated by iptables-save v1.8.9\n*nat\n:PREROUTING ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
        :MASQD-POSTROUTING - [0:0]\n-A POSTROUTING -m comment --comment masqd -j MASQD-POSTROUTING\n\
        -A POSTROUTING -s 172.7.21.0/24 ! -o docker0 -j MASQUERADE\n-A MASQD-POSTROUTING -o docker0 -j RETURN\nCOMMIT\n";

    fn fp() -> FamilyPolicy {
        FamilyPolicy {
            configured_pod_cidrs: vec!["172.7.21.0/24".parse().unwrap()],
            pod_cidrs: vec!["172.7.21.0/24".parse().unwrap()],
            exception_cidrs: vec![
                "172.7.0.0/16".parse().unwrap(),
                "10.0.0.1/32".parse().unwrap(),
            ],
            pod: vec![],
            nomasq: vec![],
        }
    }

    #[test]
    fn parse_and_observe() {
        let o = LegacyObserved::from_save(
            &SAVE.replace("-A MASQD-POSTROUTING", "[7:420] -A MASQD-POSTROUTING"),
        );
        assert_eq!(o.chain_packets, vec![7]);
        assert!(o.chain_exists && o.has_masqd());
        assert_eq!(o.chain_rules, vec!["-o docker0 -j RETURN"]);
        assert_eq!(o.postrouting.len(), 2);
    }

    #[test]
    fn default_rule_matching() {
        assert_eq!(
            match_default("-s 172.7.21.0/24 ! -o docker0 -j MASQUERADE"),
            Some(("172.7.21.0/24".parse().unwrap(), Some("docker0".into())))
        );
        assert!(match_default("-s 172.7.21.0/24 -j MASQUERADE --random-fully").is_some());
        assert_eq!(
            match_default("-s 172.7.21.0/24 -d 10.0.0.0/8 -j MASQUERADE"),
            None
        );
        assert_eq!(
            match_default("-s 172.7.21.0/24 -j SNAT --to-source 1.2.3.4"),
            None
        );
        assert_eq!(
            match_default("-s 172.7.21.0/24 ! -o docker0 -j MASQUERADE -m comment --comment x"),
            None
        );
        assert_eq!(match_default("-o docker0 -j MASQUERADE"), None);
    }

    #[test]
    fn plan_rewrites_and_is_then_in_sync() {
        let pods: Vec<IpNet> = vec!["172.7.21.0/24".parse().unwrap()];
        let o = LegacyObserved::from_save(SAVE);
        let bridges = vec!["docker0".to_string()];
        let p = plan(Some((&fp(), &bridges, false)), &o, &pods, true);
        let payload = p.payload.unwrap();
        assert!(payload.contains(":MASQD-POSTROUTING - [0:0]"));
        assert!(payload.contains("-D POSTROUTING -s 172.7.21.0/24 ! -o docker0 -j MASQUERADE"));
        assert!(payload.contains("-A MASQD-POSTROUTING -s 172.7.21.0/24 -d 10.0.0.1/32 -j RETURN"));
        assert_eq!(p.removed_defaults.len(), 1);
        // The state that payload produces is in sync.
        let synced = LegacyObserved {
            nat_loaded: true,
            chain_exists: true,
            chain_rules: desired_chain(&fp(), &bridges, false),
            chain_packets: vec![],
            postrouting: vec![JUMP.to_string()],
            nat_rules: vec![],
        };
        assert_eq!(
            plan(Some((&fp(), &bridges, false)), &synced, &pods, true).payload,
            None
        );
        // Not the backend any more: the stale chain and jump go.
        let p = plan(None, &synced, &pods, true).payload.unwrap();
        assert!(
            p.contains("-X MASQD-POSTROUTING") && p.contains(&format!("-D POSTROUTING {JUMP}"))
        );
        assert_eq!(
            plan(None, &LegacyObserved::default(), &pods, true).payload,
            None
        );
    }

    #[test]
    fn foreign_nat_rules_of_a_save() {
        let o = LegacyObserved::from_save(
            "*nat\n:POSTROUTING ACCEPT [0:0]\n:FLANNEL-POSTRTG - [0:0]\n:MASQD-POSTROUTING - [0:0]\n\
             -A POSTROUTING -m comment --comment masqd -j MASQD-POSTROUTING\n\
             -A POSTROUTING -j FLANNEL-POSTRTG\n\
             -A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -j RETURN\n\
             -A FLANNEL-POSTRTG -s 172.7.0.0/16 ! -d 224.0.0.0/4 -j MASQUERADE --random-fully\n\
             -A FLANNEL-POSTRTG ! -s 172.7.0.0/16 -d 172.7.21.0/24 -j MASQUERADE\n\
             -A FLANNEL-POSTRTG -s 10.9.0.5 -j SNAT --to-source 1.2.3.4\n\
             -A MASQD-POSTROUTING -s 172.7.21.0/24 -j MASQUERADE\nCOMMIT\n",
        );
        let r = nat_rules(Family::V4, &o);
        use crate::foreign::SourceMatch::*;
        let got: Vec<(&str, u64, &crate::foreign::SourceMatch)> = r
            .iter()
            .map(|r| (r.chain.as_str(), r.handle, &r.source))
            .collect();
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        assert_eq!(
            got,
            vec![
                ("FLANNEL-POSTRTG", 2, &Net(net("172.7.0.0/16"))),
                ("FLANNEL-POSTRTG", 3, &NotNet(net("172.7.0.0/16"))),
                ("FLANNEL-POSTRTG", 4, &Net(net("10.9.0.5/32"))),
            ]
        );
    }

    #[test]
    fn jump_not_first_is_moved() {
        let pods: Vec<IpNet> = vec![];
        let bridges: Vec<String> = vec![];
        let o = LegacyObserved {
            nat_loaded: true,
            chain_exists: true,
            chain_rules: desired_chain(&fp(), &bridges, true),
            chain_packets: vec![],
            postrouting: vec!["-s 10.1.0.0/16 -j MASQUERADE".into(), JUMP.into()],
            nat_rules: vec![],
        };
        let p = plan(Some((&fp(), &bridges, true)), &o, &pods, true)
            .payload
            .unwrap();
        assert!(
            p.contains(&format!("-D POSTROUTING {JUMP}\n-I POSTROUTING 1 {JUMP}")),
            "{p}"
        );
        assert!(!p.contains(":MASQD-POSTROUTING"), "chain kept: {p}");
    }
}
