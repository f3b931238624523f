//! `masqd explain SRC DST`: what happens to a new connection from SRC to DST on this node, read
//! from the kernel as it is now. [`evaluate`] is pure: it walks masqd's rules as the kernel holds
//! them (the chain `inet masqd postrouting`, in legacy mode then `MASQD-POSTROUTING`) with the
//! answers of single-element set lookups, names the configuration entries a matched range came
//! from, reports where configuration and kernel disagree (the kernel decides the verdict), and
//! lists the other components' NAT rules that would have matched. [`read_kernel`] gathers those
//! facts.
//!
//! Verdicts: `untouched` (leaves through a bridge, or not a pod source: masqd binds nothing),
//! `marked` (an honoured mark: left to the component that marked it), `kept` (an exception:
//! the guard's identity source NAT claims the connection) and `masqueraded`.

use std::fmt;
use std::net::IpAddr;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::backend::legacy::{self, LegacyObserved};
use crate::backend::nft::{self, lookup, lookup::Lookup, netlink::Socket};
use crate::config::{self, Config, HonorMark};
use crate::detect::Backend;
use crate::foreign::{NatRule, SourceMatch};
use crate::plan::{self, RuleSpec, CHAIN_PRIORITY};
use crate::policy::{Family, Policy, Range};

/// What masqd does with a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// masqd binds nothing: a bridge, or not a pod source.
    Untouched,
    /// An honoured mark: left to the component that marked it.
    Marked,
    /// An exception: the source is kept.
    Kept,
    /// Masqueraded.
    Masqueraded,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Untouched => "untouched",
            Verdict::Marked => "marked",
            Verdict::Kept => "kept",
            Verdict::Masqueraded => "masqueraded",
        })
    }
}

/// The connection asked about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Output interface, when given.
    pub oif: Option<String>,
    /// Packet mark, when given (else 0).
    pub mark: Option<u32>,
}

/// Parses a packet mark: a 32-bit number, hexadecimal (`0x…`) or decimal.
pub fn parse_mark(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) if !h.is_empty() && h.bytes().all(|b| b.is_ascii_hexdigit()) => {
            u32::from_str_radix(h, 16)
        }
        None if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) => t.parse(),
        _ => {
            return Err(format!(
                "--mark {s:?} is not a number (hexadecimal 0x… or decimal, 32 bits)"
            ))
        }
    };
    r.map_err(|_| format!("--mark {s:?} does not fit in 32 bits"))
}

impl Query {
    /// Parses the command line's words; the error names the argument and the value.
    pub fn parse(
        src: &str,
        dst: &str,
        oif: Option<&str>,
        mark: Option<&str>,
    ) -> Result<Query, String> {
        let addr = |what: &str, s: &str| -> Result<IpAddr, String> {
            s.trim()
                .parse::<IpAddr>()
                .map_err(|_| format!("{what} {s:?} is not an IPv4 or IPv6 address"))
        };
        let src = addr("SRC", src)?;
        let dst = addr("DST", dst)?;
        if src.is_ipv4() != dst.is_ipv4() {
            return Err(format!(
                "SRC {src} and DST {dst} are of different address families: give two IPv4 or \
                 two IPv6 addresses"
            ));
        }
        if let Some(i) = oif {
            config::validate_ifname(i).map_err(|m| format!("--oif {i:?}: {m}"))?;
        }
        let mark = mark.map(parse_mark).transpose()?;
        Ok(Query {
            src,
            dst,
            oif: oif.map(str::to_string),
            mark,
        })
    }

    /// The address family of both addresses.
    pub fn family(&self) -> Family {
        if self.src.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }
}

fn int(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

/// A rule of masqd's nftables chain as the kernel holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainRule {
    /// Kernel handle.
    pub handle: u64,
    /// Its comment (masqd's tag), when it has one.
    pub comment: Option<String>,
}

/// What the kernel holds for the query's family (read by [`read_kernel`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    /// Where the family's policy lives, as detection decides.
    pub backend: Backend,
    /// Whether nf_tables answers (masqd's guard can exist).
    pub nft: bool,
    /// Whether `table inet masqd` exists.
    pub table: bool,
    /// The rules of `inet masqd postrouting`, in order.
    pub chain: Vec<ChainRule>,
    /// The lookup of SRC in the set `pod4`/`pod6`.
    pub pod: Lookup,
    /// The lookup of DST in the set `nomasq4`/`nomasq6`.
    pub nomasq: Lookup,
    /// The legacy nat table of the family, when it was read (legacy mode).
    pub legacy: Option<LegacyObserved>,
    /// The other components' source NAT rules (nftables and legacy xtables).
    pub foreign: Vec<NatRule>,
}

/// A configuration entry that holds an address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Source {
    /// The CIDR as configured.
    pub cidr: String,
    /// `path:line` it came from.
    pub source: String,
    /// The key that named it.
    pub key: String,
}

/// Another component's NAT rule that would have matched the connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OtherRule {
    /// `nft` or `legacy`.
    pub backend: String,
    /// Table (`ip docker-bridges`; legacy: `nat`).
    pub table: String,
    /// Chain.
    pub chain: String,
    /// nft handle, or the position in the legacy chain.
    pub handle: u64,
    /// Priority of the chain it runs in.
    pub priority: i32,
    /// The rule.
    pub rule: String,
    /// `yes`, or `maybe` for a source match masqd does not decode (only the source is
    /// compared; other matches such as `oifname` are not evaluated).
    pub matches: String,
    /// Whether masqd's chain decides the connection before this rule can.
    pub overridden: bool,
    /// One line: why.
    pub reason: String,
}

/// The answer of `masqd explain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Explanation {
    /// The verdict.
    pub verdict: Verdict,
    /// `nft` or `legacy`: where the family's policy lives.
    pub backend: String,
    /// `ipv4` or `ipv6`.
    pub ip_family: String,
    /// Source address.
    pub src: String,
    /// Destination address.
    pub dst: String,
    /// Output interface, when given.
    pub oif: Option<String>,
    /// Packet mark, when given.
    pub mark: Option<String>,
    /// The deciding rule of masqd (nft text, or the iptables-save line); None when none did.
    pub rule: Option<String>,
    /// Where that rule is (`inet masqd postrouting`, `legacy nat MASQD-POSTROUTING`).
    pub chain: Option<String>,
    /// Its nft handle, or its position in the legacy chain.
    pub handle: Option<u64>,
    /// For `kept`: the exception range of the kernel that matched.
    pub range: Option<String>,
    /// For `kept`: `path:line` of the most specific configuration entry holding DST.
    pub source: Option<String>,
    /// For `kept`: every configuration entry holding DST, most specific first.
    pub sources: Vec<Source>,
    /// One line: why.
    pub reason: String,
    /// Notes on assumptions (no `--oif`, no `--mark`).
    pub notes: Vec<String>,
    /// Where the configuration and the kernel disagree (the verdict follows the kernel).
    pub disagreements: Vec<String>,
    /// What the verdict is based on: always `kernel`.
    pub based_on: String,
    /// Other components' NAT rules that would have matched.
    pub other_rules: Vec<OtherRule>,
}

/// The rule a masqd tag stands for, read from the kernel's comment (not the configuration).
fn spec_of_tag(tag: &str) -> Option<RuleSpec> {
    let rest = tag.strip_prefix("masqd:")?;
    let fam = |d: &str| match d {
        "4" => Some(Family::V4),
        "6" => Some(Family::V6),
        _ => None,
    };
    if let Some(b) = rest.strip_prefix("bridge:") {
        return Some(RuleSpec::BridgeReturn(b.to_string()));
    }
    if let Some(m) = rest.strip_prefix("mark:") {
        return HonorMark::parse(m).ok().map(RuleSpec::MarkReturn);
    }
    if let Some(d) = rest.strip_prefix("guard:") {
        return fam(d).map(RuleSpec::Guard);
    }
    let m = rest.strip_prefix("masquerade:")?;
    let (d, random_fully) = match m.strip_suffix(":fully-random") {
        Some(d) => (d, true),
        None => (m, false),
    };
    fam(d).map(|family| RuleSpec::Masquerade {
        family,
        random_fully,
    })
}

/// The decision of one chain walk.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Decision {
    verdict: Verdict,
    rule: String,
    chain: String,
    handle: u64,
    reason: String,
    /// Priority of the chain that decided (for the other rules' order).
    priority: i32,
    /// For `kept`: the exception range that matched.
    range: Option<String>,
}

/// Walks `inet masqd postrouting` as the kernel holds it.
fn walk_nft(q: &Query, k: &Kernel, notes: &mut Vec<String>) -> Option<Decision> {
    let f = q.family();
    let (pod, nomasq) = (
        matches!(k.pod, Lookup::In(_)),
        matches!(k.nomasq, Lookup::In(_)),
    );
    let (ps, ns) = (plan::pod_set(f), plan::nomasq_set(f));
    let mark = q.mark.unwrap_or(0);
    for r in &k.chain {
        let Some(spec) = r.comment.as_deref().and_then(spec_of_tag) else {
            notes.push(format!(
                "rule handle {} of inet masqd postrouting has no masqd tag; not evaluated",
                r.handle
            ));
            continue;
        };
        let reason = match &spec {
            RuleSpec::BridgeReturn(b) if q.oif.as_deref() == Some(b) => format!(
                "it leaves through the bridge {b}: masqd's chain returns before its guard and binds \
                 nothing"
            ),
            RuleSpec::MarkReturn(m) if mark & m.mask == m.value => format!(
                "the packet mark {mark:#x} matches the honoured mark {m}: masqd leaves the connection \
                 to the component that marked it"
            ),
            RuleSpec::Guard(g) if *g == f && pod && nomasq => format!(
                "{} is in set {ps} and {} in set {ns}: the guard's identity source NAT claims the \
                 connection, so no later NAT chain can masquerade it",
                q.src, q.dst
            ),
            RuleSpec::Masquerade { family, .. } if *family == f && pod => format!(
                "{} is in set {ps} and {} is not in set {ns}: masqd masquerades it",
                q.src, q.dst
            ),
            _ => continue,
        };
        let verdict = match spec {
            RuleSpec::BridgeReturn(_) => Verdict::Untouched,
            RuleSpec::MarkReturn(_) => Verdict::Marked,
            RuleSpec::Guard(_) => Verdict::Kept,
            RuleSpec::Masquerade { .. } => Verdict::Masqueraded,
        };
        let text = spec.nft();
        let rule = text.split(" comment ").next().unwrap_or(&text).to_string();
        return Some(Decision {
            verdict,
            rule,
            chain: format!("inet {} {}", plan::TABLE, plan::CHAIN),
            handle: r.handle,
            reason,
            priority: CHAIN_PRIORITY,
            range: match (verdict, k.nomasq) {
                (Verdict::Kept, Lookup::In(r)) => Some(r.display(f)),
                _ => None,
            },
        });
    }
    None
}

/// The value after `opt` in an iptables-save rule (`-s 10.0.0.0/8`).
fn opt<'a>(words: &'a [String], opt: &str) -> Option<&'a str> {
    let i = words.iter().position(|w| w == opt)?;
    (i == 0 || words[i - 1] != "!")
        .then(|| words.get(i + 1).map(String::as_str))
        .flatten()
}

/// Walks `MASQD-POSTROUTING` in the legacy nat table (when POSTROUTING jumps to it).
fn walk_legacy(q: &Query, lo: &LegacyObserved) -> Option<Decision> {
    if !lo.postrouting.iter().any(|r| r == legacy::JUMP) {
        return None;
    }
    let holds = |w: &[String], o: &str, a: IpAddr| match opt(w, o) {
        None => true,
        Some(s) => legacy::parse_saved_net(s).is_some_and(|n| n.contains(&a)),
    };
    for (i, spec) in lo.chain_rules.iter().enumerate() {
        let words: Vec<String> = match legacy::split_saved(spec) {
            Some(w) => w.into_iter().map(|w| w.text).collect(),
            None => continue,
        };
        if !holds(&words, "-s", q.src) || !holds(&words, "-d", q.dst) {
            continue;
        }
        if let Some(o) = opt(&words, "-o") {
            if q.oif.as_deref() != Some(o) {
                continue;
            }
        }
        let (verdict, reason) = match opt(&words, "-j") {
            Some("RETURN") if opt(&words, "-o").is_some() => (
                Verdict::Untouched,
                "it leaves through a bridge: MASQD-POSTROUTING returns".to_string(),
            ),
            Some("RETURN") => (
                Verdict::Kept,
                "MASQD-POSTROUTING returns for the exception; without the guard a later NAT \
                 chain may still masquerade it"
                    .to_string(),
            ),
            Some("MASQUERADE") => (
                Verdict::Masqueraded,
                format!(
                    "{} is a pod source leaving the cluster: MASQD-POSTROUTING masquerades it",
                    q.src
                ),
            ),
            _ => continue,
        };
        return Some(Decision {
            verdict,
            rule: format!("-A {} {spec}", legacy::CHAIN),
            chain: format!("legacy nat {}", legacy::CHAIN),
            handle: i as u64 + 1,
            reason,
            priority: 100,
            range: (verdict == Verdict::Kept)
                .then(|| opt(&words, "-d").map(str::to_string))
                .flatten(),
        });
    }
    None
}

/// The configuration entries of `origins` holding `addr`, most specific first.
fn sources_of(origins: &[config::Origin], addr: IpAddr) -> Vec<Source> {
    let mut v: Vec<&config::Origin> = origins.iter().filter(|o| o.net().contains(&addr)).collect();
    v.sort_by_key(|o| std::cmp::Reverse(o.net().prefix_len()));
    v.into_iter()
        .map(|o| Source {
            cidr: o.net().to_string(),
            source: o.location(),
            key: o.key().to_string(),
        })
        .collect()
}

/// The configuration's range of `ranges` holding `addr`.
fn config_range(ranges: &[Range], addr: u128) -> Option<Range> {
    let i = ranges.partition_point(|r| r.end < addr);
    ranges.get(i).filter(|r| r.start <= addr).copied()
}

/// Compares one set lookup with the configuration's answer for the same address.
fn compare_set(
    set: &str,
    f: Family,
    addr: IpAddr,
    want: Option<Range>,
    got: Lookup,
) -> Option<String> {
    let show = |r: Option<Range>| match r {
        Some(r) => format!("holds {addr} in {}", r.display(f)),
        None => format!("does not hold {addr}"),
    };
    let got = match got {
        Lookup::NoSet => {
            return Some(format!(
                "the kernel has no set {set} (the configuration {}): run `masqd apply`; the \
                 verdict follows the kernel",
                show(want)
            ))
        }
        Lookup::In(r) => Some(r),
        Lookup::NotIn => None,
    };
    (got != want).then(|| {
        format!(
            "the configuration {}, but the kernel's set {set} {}: the verdict follows the kernel \
             (`masqd apply` would repair it)",
            show(want),
            show(got)
        )
    })
}

/// Where configuration and kernel disagree about this connection.
fn disagreements(q: &Query, policy: &Policy, desired: &[RuleSpec], k: &Kernel) -> Vec<String> {
    let f = q.family();
    let mut out = Vec::new();
    if k.nft && !k.table {
        out.push(format!(
            "masqd's table inet {} is not in the kernel: run `masqd apply`; the verdict follows \
             the kernel",
            plan::TABLE
        ));
    }
    let fp = policy.family(f);
    if k.nft && k.table {
        let want = fp.and_then(|p| config_range(&p.pod, int(q.src)));
        out.extend(compare_set(&plan::pod_set(f), f, q.src, want, k.pod));
        let want = fp.and_then(|p| config_range(&p.nomasq, int(q.dst)));
        out.extend(compare_set(&plan::nomasq_set(f), f, q.dst, want, k.nomasq));
        let have: Vec<&str> = k
            .chain
            .iter()
            .filter_map(|r| r.comment.as_deref())
            .collect();
        let want: Vec<String> = desired.iter().map(RuleSpec::tag).collect();
        if have != want {
            out.push(format!(
                "the rules of inet {} {} are [{}], the configuration wants [{}]: the verdict \
                 follows the kernel",
                plan::TABLE,
                plan::CHAIN,
                have.join(", "),
                want.join(", ")
            ));
        }
    }
    if let (Backend::Legacy, Some(lo), Some(fp)) = (k.backend, &k.legacy, fp) {
        let want = legacy::desired_chain(fp, &policy.bridges, policy.random_fully);
        if !legacy::same_rules(&lo.chain_rules, &want) {
            out.push(format!(
                "the legacy chain {} holds {} rule(s) that differ from the {} the configuration \
                 wants: the verdict follows the kernel",
                legacy::CHAIN,
                lo.chain_rules.len(),
                want.len()
            ));
        }
    }
    out
}

/// Whether another component's rule `r` would match the source of `q`: `yes`, `maybe`, or None.
fn source_matches(r: &NatRule, q: &Query) -> Option<&'static str> {
    if r.family.is_some_and(|rf| rf != q.family()) {
        return None;
    }
    // The one other match worth reading: a rule that excludes the given output interface
    // (`oifname != "docker0"`, `! -o docker0`) cannot match.
    if let Some(o) = &q.oif {
        if r.text.contains(&format!("oifname != \"{o}\"")) || r.text.contains(&format!("! -o {o} "))
        {
            return None;
        }
    }
    match &r.source {
        SourceMatch::Any => Some("yes"),
        SourceMatch::Unknown => Some("maybe"),
        SourceMatch::Net(n) => n.contains(&q.src).then_some("yes"),
        SourceMatch::NotNet(n) => (!n.contains(&q.src)).then_some("yes"),
    }
}

/// The other rules that would have matched and what masqd's decision does to them.
fn other_rules(q: &Query, k: &Kernel, d: Option<&Decision>) -> Vec<OtherRule> {
    let mut out = Vec::new();
    for r in &k.foreign {
        let Some(matches) = source_matches(r, q) else {
            continue;
        };
        let (overridden, reason) = match d {
            Some(d) if matches!(d.verdict, Verdict::Kept | Verdict::Masqueraded) => {
                let what = if d.verdict == Verdict::Kept {
                    "the guard's identity source NAT"
                } else {
                    "masqd's masquerade"
                };
                if r.priority > d.priority {
                    (
                        true,
                        format!(
                            "overridden: it runs at priority {}, after masqd's {} (priority {}), \
                             where {what} has already bound the connection",
                            r.priority, d.chain, d.priority
                        ),
                    )
                } else {
                    (
                        false,
                        format!(
                            "NOT overridden: it runs at priority {}, not after masqd's {} \
                             (priority {}), so it can NAT the connection first",
                            r.priority, d.chain, d.priority
                        ),
                    )
                }
            }
            _ => (
                false,
                "applies: masqd binds nothing for this connection, so this rule decides"
                    .to_string(),
            ),
        };
        out.push(OtherRule {
            backend: r.backend.to_string(),
            table: if r.backend == "nft" {
                format!("{} {}", r.table_family, r.table)
            } else {
                r.table.clone()
            },
            chain: r.chain.clone(),
            handle: r.handle,
            priority: r.priority,
            rule: r.text.clone(),
            matches: matches.to_string(),
            overridden,
            reason,
        });
    }
    out
}

/// The decision of masqd's rules for `q`: the nftables chain first (priority `srcnat - 1`),
/// then in legacy mode `MASQD-POSTROUTING` (a marked packet the guard leaves alone is still
/// masqueraded there when it leaves the cluster).
fn decide(q: &Query, k: &Kernel, notes: &mut Vec<String>) -> Option<Decision> {
    let nft_d = (k.nft && k.table).then(|| walk_nft(q, k, notes)).flatten();
    let legacy_d = match (k.backend, &k.legacy) {
        (Backend::Legacy, Some(lo)) => walk_legacy(q, lo),
        _ => None,
    };
    match (nft_d, legacy_d) {
        (Some(d), Some(l)) if d.verdict == Verdict::Marked && l.verdict == Verdict::Masqueraded => {
            Some(Decision {
                reason: format!("{}; then {}", d.reason, l.reason),
                ..l
            })
        }
        (Some(d), _) => Some(d),
        (None, l) => l,
    }
}

/// Explains `q` from the kernel facts `k`, with the configuration `cfg`, its `policy` and the
/// rules `desired` it wants in masqd's nftables chain (for the disagreements). Pure.
pub fn evaluate(
    q: &Query,
    cfg: &Config,
    policy: &Policy,
    desired: &[RuleSpec],
    k: &Kernel,
) -> Explanation {
    let f = q.family();
    let mut notes = Vec::new();
    if q.oif.is_none() && !policy.bridges.is_empty() {
        notes.push(format!(
            "no --oif: assumed it does not leave through a bridge ({})",
            policy.bridges.join(", ")
        ));
    }
    if q.mark.is_none() && !policy.honor_marks.is_empty() {
        notes.push("no --mark: assumed the packet is not marked".to_string());
    }
    if !k.nft {
        notes.push("the kernel answers no nf_tables requests: masqd has no guard".to_string());
    }
    let d = decide(q, k, &mut notes);
    let mut disagree = disagreements(q, policy, desired, k);
    let kept = d.as_ref().is_some_and(|d| d.verdict == Verdict::Kept);
    let sources = if kept {
        sources_of(&cfg.exception_origins, q.dst)
    } else {
        Vec::new()
    };
    if kept && sources.is_empty() {
        disagree.push(format!(
            "the kernel keeps {} but no configuration entry holds it: the verdict follows the \
             kernel",
            q.dst
        ));
    }
    let other_rules = other_rules(q, k, d.as_ref());
    let none_reason = if matches!(k.pod, Lookup::In(_)) {
        format!("no rule of masqd's matches {} → {}", q.src, q.dst)
    } else {
        format!(
            "{} is not a pod source of this node (not in set {} in the kernel): masqd binds \
             nothing",
            q.src,
            plan::pod_set(f)
        )
    };
    Explanation {
        verdict: d.as_ref().map_or(Verdict::Untouched, |d| d.verdict),
        backend: k.backend.to_string(),
        ip_family: f.to_string(),
        src: q.src.to_string(),
        dst: q.dst.to_string(),
        oif: q.oif.clone(),
        mark: q.mark.map(|m| format!("{m:#x}")),
        rule: d.as_ref().map(|d| d.rule.clone()),
        chain: d.as_ref().map(|d| d.chain.clone()),
        handle: d.as_ref().map(|d| d.handle),
        range: d.as_ref().and_then(|d| d.range.clone()),
        source: sources.first().map(|s| s.source.clone()),
        sources,
        reason: d.map_or(none_reason, |d| d.reason),
        notes,
        disagreements: disagree,
        based_on: "kernel".to_string(),
        other_rules,
    }
}

/// Reads what [`evaluate`] needs for `q` from the kernel: detection, the rules of masqd's
/// chain, two single-element set lookups, the legacy nat table of the family and every other
/// NAT rule. Returns the facts and the rules the configuration wants in masqd's chain. Equals
/// `masqd detect` + `nft -a list chain inet masqd postrouting` + `nft get element inet masqd
/// pod4 { SRC }` + `nft get element inet masqd nomasq4 { DST }` + `iptables-legacy-save -t
/// nat` + `nft -a list ruleset` (filtered to NAT rules).
pub fn read_kernel(
    cfg: &Config,
    policy: &Policy,
    q: &Query,
    sock: &mut Socket,
) -> Result<(Kernel, Vec<RuleSpec>)> {
    let det = crate::engine::detect(cfg, policy, sock)?;
    let f = q.family();
    let fd = det.family(f);
    let nft_ok = det.ipv4.has_guard() && det.ipv6.has_guard();
    let guard: Vec<Family> = det
        .families(Backend::Legacy)
        .into_iter()
        .filter(|g| det.family(*g).has_guard())
        .collect();
    let desired = plan::desired_rules(&policy.nft_part(&det.families(Backend::Nft), &guard));
    let mut k = Kernel {
        backend: fd.backend,
        nft: nft_ok,
        table: false,
        chain: Vec::new(),
        pod: Lookup::NoSet,
        nomasq: Lookup::NoSet,
        legacy: None,
        foreign: Vec::new(),
    };
    if nft_ok {
        k.table = nft::own_table_exists(sock)?;
        if k.table {
            k.chain = lookup::masqd_chain(sock)?;
            k.pod = lookup::range_of(sock, &plan::pod_set(f), f, int(q.src))?;
            k.nomasq = lookup::range_of(sock, &plan::nomasq_set(f), f, int(q.dst))?;
        }
        k.foreign = nft::foreign::nat_rules(sock).context("reading other NAT rules")?;
    }
    let nat_loaded = fd.facts.legacy_tables.iter().any(|t| t == "nat");
    if fd.backend == Backend::Legacy || nat_loaded {
        if let Some(bins) = legacy::binaries(f) {
            let lo = legacy::observe(f, &bins)
                .with_context(|| format!("reading the legacy {f} nat table"))?;
            k.foreign.extend(legacy::nat_rules(f, &lo));
            k.legacy = Some(lo);
        }
    }
    Ok((k, desired))
}

/// The explanation as text, for a terminal.
pub fn render(e: &Explanation) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} → {} ({}, backend {})",
        e.src, e.dst, e.ip_family, e.backend
    );
    let _ = writeln!(s, "verdict: {}", e.verdict);
    let _ = writeln!(s, "  why:    {}", e.reason);
    if let (Some(rule), Some(chain), Some(h)) = (&e.rule, &e.chain, e.handle) {
        let h = if chain.starts_with("legacy") {
            format!("rule {h}")
        } else {
            format!("handle {h}")
        };
        let _ = writeln!(s, "  rule:   {chain} {h}: {rule}");
    }
    if let Some(r) = &e.range {
        let _ = writeln!(s, "  range:  {r}");
    }
    for (i, src) in e.sources.iter().enumerate() {
        let label = if i == 0 { "source:" } else { "also:  " };
        let _ = writeln!(s, "  {label} {} ({} {})", src.source, src.key, src.cidr);
    }
    for n in &e.notes {
        let _ = writeln!(s, "  note:   {n}");
    }
    if e.disagreements.is_empty() {
        let _ = writeln!(s, "configuration and kernel agree");
    } else {
        let _ = writeln!(
            s,
            "configuration and kernel DISAGREE (the verdict uses the kernel):"
        );
        for d in &e.disagreements {
            let _ = writeln!(s, "  {d}");
        }
    }
    if e.other_rules.is_empty() {
        let _ = writeln!(s, "other NAT rules that would match: none");
    } else {
        let _ = writeln!(s, "other NAT rules that would match:");
    }
    for o in &e.other_rules {
        let h = if o.backend == "legacy" {
            "rule"
        } else {
            "handle"
        };
        let _ = writeln!(
            s,
            "  {} {} {} {h} {} (priority {}, source matches: {}): {}",
            o.backend, o.table, o.chain, o.handle, o.priority, o.matches, o.rule
        );
        let _ = writeln!(s, "      {}", o.reason);
    }
    s
}

/// Parses the query, reads the kernel and explains. The one entry point of `masqd explain`.
pub fn explain(cfg: &Config, policy: &Policy, q: &Query) -> Result<Explanation> {
    let mut sock = Socket::open().context("opening netlink")?;
    let (k, desired) = read_kernel(cfg, policy, q, &mut sock)?;
    Ok(evaluate(q, cfg, policy, &desired, &k))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const CFG: &str = "[node]\npod_cidrs = [\"172.7.21.0/24\"]\n[masquerade]\n\
                       cluster_cidrs = [\"172.7.0.0/16\"]\n\
                       nonmasquerade_cidrs = [\"10.200.0.2/32\", \"10.200.0.0/24\"]\n\
                       bridge_interfaces = [\"docker0\"]\n";

    fn cfg() -> (Config, Policy) {
        let c = config::parse(Path::new("/etc/masqd/masqd.toml"), CFG).unwrap();
        let p = Policy::from_config(&c);
        (c, p)
    }

    fn r(a: &str, b: &str) -> Range {
        let i = |s: &str| int(s.parse().unwrap());
        Range {
            start: i(a),
            end: i(b),
        }
    }

    fn q(src: &str, dst: &str, oif: Option<&str>, mark: Option<&str>) -> Query {
        Query::parse(src, dst, oif, mark).unwrap()
    }

    /// The kernel as `masqd apply` leaves it for CFG in nft mode; lookups for `query`.
    fn kernel(p: &Policy, query: &Query) -> (Kernel, Vec<RuleSpec>) {
        let desired = plan::desired_rules(p);
        let fp = p.family(Family::V4).unwrap();
        let look = |ranges: &[Range], a: IpAddr| match config_range(ranges, int(a)) {
            Some(r) => Lookup::In(r),
            None => Lookup::NotIn,
        };
        let k = Kernel {
            backend: Backend::Nft,
            nft: true,
            table: true,
            chain: desired
                .iter()
                .enumerate()
                .map(|(i, s)| ChainRule {
                    handle: 10 + i as u64,
                    comment: Some(s.tag()),
                })
                .collect(),
            pod: look(&fp.pod, query.src),
            nomasq: look(&fp.nomasq, query.dst),
            legacy: None,
            foreign: Vec::new(),
        };
        (k, desired)
    }

    fn run(query: &Query, edit: impl FnOnce(&mut Kernel)) -> Explanation {
        let (c, p) = cfg();
        let (mut k, desired) = kernel(&p, query);
        edit(&mut k);
        evaluate(query, &c, &p, &desired, &k)
    }

    fn foreign(priority: i32, source: SourceMatch, text: &str) -> NatRule {
        NatRule {
            backend: "nft",
            family: Some(Family::V4),
            table_family: "ip".into(),
            table: "docker-bridges".into(),
            chain: "nat-postrouting".into(),
            handle: 5,
            priority,
            source,
            text: text.into(),
        }
    }

    #[test]
    fn kept_names_the_range_and_every_config_line() {
        let e = run(&q("172.7.21.2", "10.200.0.2", None, None), |_| {});
        assert_eq!(e.verdict, Verdict::Kept);
        assert_eq!(e.handle, Some(12), "guard after bridge and mark returns");
        assert_eq!(e.range.as_deref(), Some("10.200.0.0/24"));
        // The /32 (line 5, first item) is more specific than the /24 on the same line.
        assert_eq!(e.source.as_deref(), Some("/etc/masqd/masqd.toml:5"));
        let cidrs: Vec<&str> = e.sources.iter().map(|s| s.cidr.as_str()).collect();
        assert_eq!(cidrs, ["10.200.0.2/32", "10.200.0.0/24"]);
        assert!(e.disagreements.is_empty(), "{:?}", e.disagreements);
        let e = run(&q("172.7.21.2", "172.7.22.2", None, None), |_| {});
        assert_eq!(e.source.as_deref(), Some("/etc/masqd/masqd.toml:4"));
        assert_eq!(e.sources[0].key, "masquerade.cluster_cidrs");
    }

    #[test]
    fn masqueraded_untouched_marked() {
        let e = run(&q("172.7.21.2", "10.200.1.3", None, None), |_| {});
        assert_eq!(e.verdict, Verdict::Masqueraded);
        assert_eq!(e.rule.as_deref(), Some("ip saddr @pod4 counter masquerade"));
        assert_eq!(e.range, None);
        let e = run(&q("10.200.0.1", "10.200.1.3", None, None), |_| {});
        assert_eq!(e.verdict, Verdict::Untouched);
        assert!(e.reason.contains("not a pod source"), "{}", e.reason);
        let e = run(
            &q("172.7.21.2", "10.200.1.3", Some("docker0"), None),
            |_| {},
        );
        assert_eq!((e.verdict, e.handle), (Verdict::Untouched, Some(10)));
        // Another interface is not a bridge.
        let e = run(&q("172.7.21.2", "10.200.1.3", Some("eth0"), None), |_| {});
        assert_eq!(e.verdict, Verdict::Masqueraded);
        for m in ["0x4000", "16384", "0xc000"] {
            let e = run(&q("172.7.21.2", "172.7.22.2", None, Some(m)), |_| {});
            assert_eq!(e.verdict, Verdict::Marked, "{m}");
            assert_eq!(
                e.mark.as_deref(),
                Some(format!("{:#x}", parse_mark(m).unwrap()).as_str())
            );
        }
        let e = run(&q("172.7.21.2", "172.7.22.2", None, Some("0x8000")), |_| {});
        assert_eq!(
            e.verdict,
            Verdict::Kept,
            "another bit is not the honoured mark"
        );
    }

    #[test]
    fn the_kernel_decides_and_disagreements_are_named() {
        // The kernel's set lacks the exception the configuration has.
        let e = run(&q("172.7.21.2", "10.200.0.2", None, None), |k| {
            k.nomasq = Lookup::NotIn
        });
        assert_eq!(e.verdict, Verdict::Masqueraded);
        assert_eq!(e.disagreements.len(), 1, "{:?}", e.disagreements);
        assert!(
            e.disagreements[0].contains("10.200.0.0/24"),
            "{:?}",
            e.disagreements
        );
        // The kernel holds a range the configuration lacks.
        let e = run(&q("172.7.21.2", "192.168.9.9", None, None), |k| {
            k.nomasq = Lookup::In(r("192.168.9.0", "192.168.9.255"))
        });
        assert_eq!(e.verdict, Verdict::Kept);
        assert_eq!(e.source, None);
        assert_eq!(e.disagreements.len(), 2, "{:?}", e.disagreements);
        // The guard is gone from the kernel.
        let e = run(&q("172.7.21.2", "172.7.22.2", None, None), |k| {
            k.chain
                .retain(|c| c.comment.as_deref() != Some("masqd:guard:4"))
        });
        assert_eq!(e.verdict, Verdict::Masqueraded);
        assert!(
            e.disagreements[0].contains("the rules of inet masqd"),
            "{:?}",
            e.disagreements
        );
        // No table at all: nothing of masqd's runs.
        let e = run(&q("172.7.21.2", "172.7.22.2", None, None), |k| {
            k.table = false;
            k.chain.clear();
            k.pod = Lookup::NoSet;
            k.nomasq = Lookup::NoSet;
        });
        assert_eq!(e.verdict, Verdict::Untouched);
        assert!(
            e.disagreements[0].contains("not in the kernel"),
            "{:?}",
            e.disagreements
        );
    }

    #[test]
    fn other_rules_by_priority_and_match() {
        let rules = vec![
            foreign(
                100,
                SourceMatch::Net("172.7.21.0/24".parse().unwrap()),
                "a masquerade",
            ),
            foreign(90, SourceMatch::Any, "b masquerade"),
            foreign(
                100,
                SourceMatch::Net("172.7.22.0/24".parse().unwrap()),
                "c masquerade",
            ),
            foreign(
                100,
                SourceMatch::NotNet("172.7.0.0/16".parse().unwrap()),
                "d masquerade",
            ),
            foreign(
                100,
                SourceMatch::Unknown,
                "oifname != \"docker0\" e masquerade",
            ),
        ];
        let e = run(&q("172.7.21.2", "172.7.22.2", None, None), |k| {
            k.foreign = rules.clone()
        });
        let got: Vec<(&str, bool, &str)> = e
            .other_rules
            .iter()
            .map(|o| (o.rule.as_str(), o.overridden, o.matches.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("a masquerade", true, "yes"),
                ("b masquerade", false, "yes"),
                ("oifname != \"docker0\" e masquerade", true, "maybe"),
            ]
        );
        assert!(e.other_rules[1].reason.starts_with("NOT overridden"));
        // Untouched: every matching rule applies; the bridge excludes rule e.
        let e = run(&q("172.7.21.2", "10.1.1.1", Some("docker0"), None), |k| {
            k.foreign = rules
        });
        assert_eq!(e.other_rules.len(), 2);
        assert!(e.other_rules.iter().all(|o| !o.overridden));
    }

    #[test]
    fn legacy_mode_walks_masqd_postrouting() {
        let (c, p) = cfg();
        let mut lo = LegacyObserved {
            nat_loaded: true,
            chain_exists: true,
            postrouting: vec![legacy::JUMP.to_string()],
            ..Default::default()
        };
        let fp = p.family(Family::V4).unwrap();
        lo.chain_rules = legacy::desired_chain(fp, &p.bridges, false);
        let guard_only = p.nft_part(&[], &[Family::V4]);
        let query = q("172.7.21.2", "10.200.1.3", None, Some("0x4000"));
        let (mut k, _) = kernel(&p, &query);
        let desired = plan::desired_rules(&guard_only);
        k.backend = Backend::Legacy;
        k.chain.retain(|c| {
            !c.comment
                .as_deref()
                .unwrap_or("")
                .starts_with("masqd:masquerade")
        });
        k.legacy = Some(lo.clone());
        let e = evaluate(&query, &c, &p, &desired, &k);
        // Marked, but leaving the cluster: MASQD-POSTROUTING masquerades it anyway.
        assert_eq!(e.verdict, Verdict::Masqueraded);
        assert_eq!(
            e.rule.as_deref(),
            Some("-A MASQD-POSTROUTING -s 172.7.21.0/24 -j MASQUERADE")
        );
        assert_eq!(e.handle, Some(lo.chain_rules.len() as u64));
        assert!(e.disagreements.is_empty(), "{:?}", e.disagreements);
        // Marked to an exception: the legacy chain returns, the mark decides.
        let query = q("172.7.21.2", "172.7.22.2", None, Some("0x4000"));
        let (mut k2, _) = kernel(&p, &query);
        k2.backend = Backend::Legacy;
        k2.chain = k.chain.clone();
        k2.legacy = Some(lo.clone());
        assert_eq!(
            evaluate(&query, &c, &p, &desired, &k2).verdict,
            Verdict::Marked
        );
        // A drifted legacy chain is reported.
        lo.chain_rules.pop();
        k2.legacy = Some(lo);
        let e = evaluate(&query, &c, &p, &desired, &k2);
        assert_eq!(e.disagreements.len(), 1, "{:?}", e.disagreements);
        assert!(
            e.disagreements[0].contains("MASQD-POSTROUTING"),
            "{:?}",
            e.disagreements
        );
    }

    #[test]
    fn bad_queries() {
        let bad = |s: &str, d: &str, o: Option<&str>, m: Option<&str>| {
            Query::parse(s, d, o, m).unwrap_err()
        };
        assert!(bad("1.2.3", "1.2.3.4", None, None).contains("SRC \"1.2.3\""));
        assert!(bad("1.2.3.4", "::1", None, None).contains("different address families"));
        assert!(bad("::1", "1.2.3.4", None, None).contains("different address families"));
        assert!(bad("1.2.3.4", "1.2.3.5", Some(""), None).contains("--oif \"\": is empty"));
        assert!(bad("1.2.3.4", "1.2.3.5", Some("a b"), None).contains("whitespace"));
        for m in [
            "",
            "0x",
            "-1",
            "1e3",
            "0x1_0",
            "4294967296",
            "0x100000000",
            "0xg",
        ] {
            let e = bad("1.2.3.4", "1.2.3.5", None, Some(m));
            assert!(e.starts_with(&format!("--mark {m:?}")), "{m}: {e}");
        }
        assert_eq!(parse_mark("4294967295"), Ok(u32::MAX));
        assert_eq!(parse_mark("0XFFFFFFFF"), Ok(u32::MAX));
        assert_eq!(parse_mark("0"), Ok(0));
        assert_eq!(q("fd00::1", "fd00::2", None, None).family(), Family::V6);
    }
}
