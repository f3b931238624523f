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
    f.ipt_binaries()
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

/// One argument of a rule as iptables-save prints it: a quoted string (`"…"` with `\` escapes,
/// how `xtables_save_string` prints comments and other free text), or a bare word. Interface
/// names (`-i`, `-o`) are printed raw, quotes and backslashes included: the word after them
/// is always bare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedWord {
    /// The argument's value, unescaped.
    pub text: String,
    /// Whether it was printed as a quoted string.
    pub quoted: bool,
}

/// How a rule's text reads in iptables-save's notation.
#[derive(Debug, PartialEq, Eq)]
enum Scan {
    /// Its arguments.
    Words(Vec<SavedWord>),
    /// A quoted string is still open at the end (its value holds a newline).
    Open,
    /// A closing quote not followed by a blank.
    Bad,
}

fn scan(spec: &str) -> Scan {
    let blank = |c: char| c == ' ' || c == '\t' || c == '\n';
    let mut words = Vec::new();
    let mut chars = spec.chars().peekable();
    let mut raw_next = false;
    loop {
        while chars.next_if(|c| blank(*c)).is_some() {}
        let Some(&first) = chars.peek() else {
            return Scan::Words(words);
        };
        let mut text = String::new();
        if first == '"' && !raw_next {
            chars.next();
            loop {
                match chars.next() {
                    None => return Scan::Open,
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some(c) => text.push(c),
                        None => return Scan::Open,
                    },
                    Some(c) => text.push(c),
                }
            }
            if chars.peek().is_some_and(|c| !blank(*c)) {
                return Scan::Bad;
            }
            words.push(SavedWord { text, quoted: true });
            raw_next = false;
            continue;
        }
        while let Some(c) = chars.next_if(|c| !blank(*c)) {
            text.push(c);
        }
        // Options whose value iptables-save prints raw (no quoting, even with quotes in it).
        raw_next = matches!(
            text.as_str(),
            "-i" | "-o"
                | "--in-interface"
                | "--out-interface"
                | "--physdev-in"
                | "--physdev-out"
                | "--match-set"
        );
        words.push(SavedWord {
            text,
            quoted: false,
        });
    }
}

/// The arguments of a rule spec as iptables-save printed it, or None when it does not read
/// (a quote left open, a closing quote followed by more text).
pub fn split_saved(spec: &str) -> Option<Vec<SavedWord>> {
    match scan(spec) {
        Scan::Words(w) => Some(w),
        Scan::Open | Scan::Bad => None,
    }
}

/// One argument in iptables-restore's notation (xtables' `add_param_to_argv`: blanks end an
/// argument, `"` opens a quoted string in which `\` escapes the next character). None for a
/// value restore cannot read back (a newline or NUL: restore reads line by line).
pub fn restore_word(w: &str) -> Option<String> {
    if w.contains(['\n', '\r', '\0']) {
        return None;
    }
    let plain = |c: char| c.is_ascii_graphic() && !matches!(c, '"' | '\\' | '\'' | '#');
    if !w.is_empty() && w.chars().all(plain) {
        return Some(w.to_string());
    }
    let mut s = String::from("\"");
    for c in w.chars() {
        if c == '"' || c == '\\' {
            s.push('\\');
        }
        s.push(c);
    }
    s.push('"');
    Some(s)
}

/// A rule spec read in iptables-save's notation, written back in iptables-restore's: each
/// argument through [`restore_word`]. This is how foreign rule text goes into a restore
/// payload — never pasted.
pub fn quote_rule(spec: &str) -> Option<String> {
    let words = split_saved(spec)?;
    let quoted: Option<Vec<String>> = words.iter().map(|w| restore_word(&w.text)).collect();
    Some(quoted?.join(" "))
}

/// One argument of a rule for comparison: the address of `-s`/`-d` as a CIDR (whatever notation
/// the tool printed it in), everything else as printed.
#[derive(Debug, PartialEq, Eq)]
enum RuleArg {
    Net(IpNet),
    Word(SavedWord),
}

fn rule_key(spec: &str) -> Option<Vec<RuleArg>> {
    let mut addr_next = false;
    let mut key = Vec::new();
    for w in split_saved(spec)? {
        let is_addr_opt = !w.quoted
            && matches!(
                w.text.as_str(),
                "-s" | "-d" | "--source" | "--destination" | "--src" | "--dst"
            );
        key.push(if addr_next && !w.quoted {
            RuleArg::Net(parse_saved_net(&w.text)?)
        } else {
            RuleArg::Word(w)
        });
        addr_next = is_addr_opt;
    }
    Some(key)
}

/// Whether two lists of rule specs say the same, comparing addresses as CIDRs: `::10.0.0.0/104`
/// and `::a00:0/104`, `10.0.0.1` and `10.0.0.1/32` are the same match.
pub fn same_rules(observed: &[String], desired: &[String]) -> bool {
    observed.len() == desired.len()
        && observed
            .iter()
            .zip(desired)
            .all(|(o, d)| match rule_key(o) {
                Some(k) => rule_key(d).is_some_and(|dk| dk == k),
                None => false,
            })
}

/// The lines of an iptables-save dump, a rule whose quoted string holds newlines (a comment
/// `"x\nerror y"`) joined back into one line. A quote still open at the end of the dump is not
/// joined (the line stands alone).
fn saved_lines(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::with_capacity(lines.len());
    let mut i = 0;
    while i < lines.len() {
        let mut line = lines[i].to_string();
        let mut j = i;
        let rule = line.starts_with("-A ") || line.starts_with('[');
        while rule && scan(&line) == Scan::Open && j + 1 < lines.len() {
            j += 1;
            line.push('\n');
            line.push_str(lines[j]);
        }
        if scan(&line) == Scan::Open {
            line = lines[i].to_string();
            j = i;
        }
        out.push(line.trim_end().to_string());
        i = j + 1;
    }
    out
}

/// Parses iptables-save output into its tables.
pub fn parse_save(text: &str) -> Vec<SavedTable> {
    let mut out: Vec<SavedTable> = Vec::new();
    for line in saved_lines(text) {
        let line = line.as_str();
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
        // Options only among bare words: a comment saying "-j SNAT" is no target.
        let words = split_saved(spec);
        let t: Vec<&str> = match &words {
            Some(w) => w
                .iter()
                .map(|w| if w.quoted { "\"\"" } else { w.text.as_str() })
                .collect(),
            None => spec.split_whitespace().collect(),
        };
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

/// A CIDR in any notation iptables-save prints: `addr/len`, a bare host (`/32` and `/128`
/// omitted by some versions), a contiguous mask (`10.0.0.0/255.0.0.0`), IPv6 compressed or
/// with an embedded IPv4 part (`::10.0.0.0/104` is `::a00:0/104`, `::ffff:10.0.0.0/104`).
pub fn parse_saved_net(s: &str) -> Option<IpNet> {
    use std::net::IpAddr;
    let net = match s.split_once('/') {
        None => IpNet::from(s.parse::<IpAddr>().ok()?),
        Some((addr, len)) if len.bytes().all(|b| b.is_ascii_digit()) => {
            IpNet::new(addr.parse().ok()?, len.parse().ok()?).ok()?
        }
        Some((addr, mask)) => IpNet::with_netmask(addr.parse().ok()?, mask.parse().ok()?).ok()?,
    };
    Some(net.trunc())
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

/// `-D POSTROUTING <spec>` with the foreign spec in restore's quoting ([`quote_rule`]; the
/// plan keeps only defaults it can quote).
fn delete_line(spec: &str) -> String {
    format!(
        "-D POSTROUTING {}",
        quote_rule(spec).unwrap_or_else(|| spec.to_string())
    )
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
                // Deleted through restore's quoting; a rule it cannot express stays.
                quote_rule(r)?;
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
            let chain_ok = o.chain_exists && same_rules(&o.chain_rules, &want);
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
                lines.push(delete_line(spec));
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
                lines.push(delete_line(spec));
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

/// Checks that a record may be replayed: a legacy record of `nat POSTROUTING` whose rule still
/// reads as the broad default rule ([`match_default`]) for the record's source CIDR and
/// interface, and can be written in restore's notation. Returns the family and the rule in
/// iptables-restore's notation ([`quote_rule`]), or why not.
pub fn replayable(rec: &RemovedRule) -> Result<(Family, String), String> {
    let f = match rec.family.as_str() {
        "ip" => Family::V4,
        "ip6" => Family::V6,
        other => return Err(format!("unknown family {other:?}")),
    };
    if rec.backend != "legacy" || rec.table != "nat" || rec.chain != "POSTROUTING" {
        return Err(format!(
            "not a rule of legacy nat POSTROUTING ({} {} {})",
            rec.backend, rec.table, rec.chain
        ));
    }
    let spec = rec.legacy_rule.as_deref().ok_or("no legacy_rule")?;
    let saddr: IpNet = rec
        .saddr
        .parse()
        .map_err(|_| format!("saddr {:?} is not a CIDR", rec.saddr))?;
    match match_default(spec) {
        Some((s, oif)) if s == saddr && oif == rec.oif_neq => {}
        Some((s, _)) => {
            return Err(format!(
                "the rule is a masquerade rule for {s}, not {saddr}"
            ))
        }
        None => return Err("the rule is not a broad masquerade rule".into()),
    }
    let quoted = quote_rule(spec).ok_or("the rule cannot be written for iptables-restore")?;
    Ok((f, quoted))
}

/// The payload that puts recorded default rules back at the end of POSTROUTING (unless the
/// same rule is present), leaving masqd's chain and jump in place; with the number of rules it
/// adds. Records that fail [`replayable`] are skipped (the caller refuses them first). Equals
/// `iptables-legacy-restore --noflush` of `-A POSTROUTING <rule>` per record.
pub fn restore_payload(o: &LegacyObserved, records: &[&RemovedRule]) -> (Option<String>, usize) {
    let mut lines = vec!["*nat".to_string()];
    for rec in records {
        let (Ok((_, quoted)), Some(spec)) = (replayable(rec), &rec.legacy_rule) else {
            continue;
        };
        let present = o
            .postrouting
            .iter()
            .any(|r| same_rules(std::slice::from_ref(r), std::slice::from_ref(spec)));
        if !present {
            lines.push(format!("-A POSTROUTING {quoted}"));
        }
    }
    let n = lines.len() - 1;
    if n == 0 {
        return (None, 0);
    }
    lines.push("COMMIT".into());
    (Some(lines.join("\n") + "\n"), n)
}

/// The payload that removes masqd's jump and chain, or None when there are none. Equals
/// `iptables-legacy-restore --noflush` of `-D POSTROUTING <jump>`, `-F` and `-X MASQD-POSTROUTING`.
pub fn teardown_payload(o: &LegacyObserved) -> Option<String> {
    let mut lines = vec!["*nat".to_string()];
    for r in o.postrouting.iter().filter(|r| *r == JUMP) {
        lines.push(format!("-D POSTROUTING {r}"));
    }
    if o.chain_exists {
        lines.push(format!("-F {CHAIN}"));
        lines.push(format!("-X {CHAIN}"));
    }
    if lines.len() == 1 {
        return None;
    }
    lines.push("COMMIT".into());
    Some(lines.join("\n") + "\n")
}

/// The `iptables-legacy-restore --noflush` payload that installs the legacy policy of one
/// family (`masqd export --format iptables`): chain nat MASQD-POSTROUTING declared (with
/// `--noflush` that creates or flushes it) and refilled, and the jump at the head of
/// POSTROUTING. The jump is written against `o`, the nat table as it is now: inserted only when
/// it is not already there once at the head (extra or misplaced jumps deleted first), so that
/// `masqd export --format iptables | iptables-legacy-restore --noflush` run again leaves one
/// jump. Broad default rules are left alone (removing one is `masqd apply`'s, which records it
/// for teardown). `notes` become comment lines of the header. Equals
/// `iptables-legacy-restore --noflush --wait` of the text.
pub fn export(
    f: Family,
    fp: &FamilyPolicy,
    bridges: &[String],
    random_fully: bool,
    o: &LegacyObserved,
    notes: &[String],
) -> String {
    let (_, restore, _) = binary_names(f);
    let mut lines = vec![
        format!(
            "# masqd export: the {f} policy in legacy xtables; load with \
             `{restore} --noflush --wait FILE`"
        ),
        "# (export again before loading again: the jump is written against the table as it is)"
            .to_string(),
    ];
    lines.extend(notes.iter().map(|n| format!("# {n}")));
    lines.push("*nat".into());
    lines.push(format!(":{CHAIN} - [0:0]"));
    let jumps = o.postrouting.iter().filter(|r| *r == JUMP).count();
    let jump_ok = jumps == 1 && o.postrouting.first().map(String::as_str) == Some(JUMP);
    if !jump_ok {
        for _ in 0..jumps {
            lines.push(format!("-D POSTROUTING {JUMP}"));
        }
        lines.push(format!("-I POSTROUTING 1 {JUMP}"));
    }
    for r in desired_chain(fp, bridges, random_fully) {
        lines.push(format!("-A {CHAIN} {r}"));
    }
    lines.push("COMMIT".into());
    lines.join("\n") + "\n"
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
    fn a_raw_quote_never_swallows_the_next_rule() {
        // iptables-save prints physdev names raw: a name starting with a quote must not
        // open a string that glues masqd's jump (or any following rule) onto it.
        let o = LegacyObserved::from_save(&format!(
            "*nat\n:POSTROUTING ACCEPT [0:0]\n:MASQD-POSTROUTING - [0:0]\n\
             -A POSTROUTING -m physdev --physdev-out \"x -j RETURN\n\
             -A POSTROUTING {JUMP}\n\
             -A POSTROUTING -m physdev --physdev-out y\" -j RETURN\nCOMMIT\n"
        ));
        assert_eq!(o.postrouting.len(), 3, "{:?}", o.postrouting);
        assert_eq!(o.postrouting[1], JUMP);
        assert!(o.has_masqd());
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
    fn teardown_replays_only_checked_records_and_removes_only_masqd() {
        let spec = "-s 172.7.21.0/24 ! -o docker0 -j MASQUERADE";
        let net: IpNet = "172.7.21.0/24".parse().unwrap();
        let oif = Some("docker0".to_string());
        let rec = record_of(Family::V4, spec, &net, &oif);
        assert_eq!(replayable(&rec), Ok((Family::V4, spec.to_string())));
        let mut other = rec.clone();
        other.saddr = "10.0.0.0/8".into();
        assert!(replayable(&other).unwrap_err().contains("not 10.0.0.0/8"));
        let mut extra = rec.clone();
        extra.legacy_rule = Some(format!("{spec} -m comment --comment x"));
        assert!(replayable(&extra).is_err());
        let mut injected = rec.clone();
        injected.legacy_rule = Some(format!("{spec}\n-A POSTROUTING -j ACCEPT"));
        assert!(replayable(&injected).is_err());
        let mut elsewhere = rec.clone();
        elsewhere.chain = "INPUT".into();
        assert!(replayable(&elsewhere).is_err());

        // Restoring leaves masqd's chain and jump; a rule present already is not added twice.
        let o = LegacyObserved::from_save(SAVE);
        assert_eq!(restore_payload(&o, &[&rec]), (None, 0));
        let o = LegacyObserved::from_save(&SAVE.replace(&format!("-A POSTROUTING {spec}\n"), ""));
        let (p, n) = restore_payload(&o, &[&rec, &other]);
        assert_eq!(n, 1);
        assert_eq!(p.unwrap(), format!("*nat\n-A POSTROUTING {spec}\nCOMMIT\n"));
        // Removing touches masqd's objects only.
        let p = teardown_payload(&o).unwrap();
        assert_eq!(
            p,
            format!("*nat\n-D POSTROUTING {JUMP}\n-F {CHAIN}\n-X {CHAIN}\nCOMMIT\n")
        );
        assert_eq!(teardown_payload(&LegacyObserved::default()), None);
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

    #[test]
    fn saved_nets_in_every_notation() {
        let n = |s: &str| s.parse::<IpNet>().unwrap();
        for (saved, want) in [
            ("::10.0.0.0/104", "::a00:0/104"),
            ("::ffff:10.0.0.0/104", "::ffff:a00:0/104"),
            ("::1.2.3.4/127", "::102:304/127"),
            ("fd00::1", "fd00::1/128"),
            ("fd00:0:0:0:0:0:0:1/128", "fd00::1/128"),
            ("10.0.0.1", "10.0.0.1/32"),
            ("10.0.0.0/255.0.0.0", "10.0.0.0/8"),
            ("8000::/1", "8000::/1"),
        ] {
            assert_eq!(parse_saved_net(saved), Some(n(want)), "{saved}");
        }
        for bad in [
            "10.0.0.0/255.0.255.0",
            "10.0.0.0/33",
            "x",
            "10.0.0.0/",
            "::/129",
        ] {
            assert_eq!(parse_saved_net(bad), None, "{bad}");
        }
    }

    #[test]
    fn chain_rules_compare_as_cidrs() {
        let want = vec!["-s fd00:7:21::/64 -d ::a00:0/104 -j RETURN".to_string()];
        let saved = vec!["-s fd00:7:21::/64 -d ::10.0.0.0/104 -j RETURN".to_string()];
        assert!(same_rules(&saved, &want));
        let host = vec!["-s fd00:7:21::/64 -d ::a00:0 -j RETURN".to_string()];
        let host_want = vec!["-s fd00:7:21::/64 -d ::a00:0/128 -j RETURN".to_string()];
        assert!(same_rules(&host, &host_want));
        assert!(!same_rules(&host, &want));
        assert!(!same_rules(&saved, &[]));
        let other = vec!["-s fd00:7:21::/64 -d ::10.0.0.0/104 -j MASQUERADE".to_string()];
        assert!(!same_rules(&other, &want));
    }

    #[test]
    fn saved_words_and_restore_quoting() {
        let spec = r#"-s 172.7.21.0/24 ! -o a"b -m comment --comment "x \"q\" \\ \'s" -j X"#;
        let w = split_saved(spec).unwrap();
        let texts: Vec<&str> = w.iter().map(|w| w.text.as_str()).collect();
        assert_eq!(
            texts,
            [
                "-s",
                "172.7.21.0/24",
                "!",
                "-o",
                "a\"b",
                "-m",
                "comment",
                "--comment",
                r#"x "q" \ 's"#,
                "-j",
                "X"
            ]
        );
        assert_eq!(
            quote_rule(spec).unwrap(),
            r#"-s 172.7.21.0/24 ! -o "a\"b" -m comment --comment "x \"q\" \\ 's" -j X"#
        );
        // An interface that begins with a quote is printed raw, too.
        assert_eq!(
            quote_rule(r#"! -o "ab" -j MASQUERADE"#).unwrap(),
            r#"! -o "\"ab\"" -j MASQUERADE"#
        );
        assert_eq!(split_saved(r#"--comment "open"#), None);
        assert_eq!(split_saved(r#"--comment "a"b"#), None);
        assert_eq!(quote_rule("--comment \"x\nerror y\" -j RETURN"), None);
        assert_eq!(restore_word(""), Some("\"\"".into()));
    }

    #[test]
    fn a_comment_with_newlines_stays_one_rule() {
        let text = "*nat\n:POSTROUTING ACCEPT [0:0]\n\
            -A POSTROUTING -m comment --comment \"x\nCOMMIT\n-A POSTROUTING -m comment --comment masqd -j MASQD-POSTROUTING\nerror y\" -j MASQUERADE\n\
            -A POSTROUTING -s 172.7.21.0/24 ! -o a\"b -j MASQUERADE\nCOMMIT\n";
        let o = LegacyObserved::from_save(text);
        assert_eq!(o.postrouting.len(), 2, "{:?}", o.postrouting);
        assert!(o.postrouting[0].contains("\nerror y\""));
        assert!(
            !o.has_masqd(),
            "the jump inside a foreign comment is not masqd's"
        );
        let pods: Vec<IpNet> = vec!["172.7.21.0/24".parse().unwrap()];
        let p = plan(Some((&fp(), &[], false)), &o, &pods, true);
        assert_eq!(p.removed_defaults.len(), 1);
        let payload = p.payload.unwrap();
        assert!(
            payload.contains("\n-D POSTROUTING -s 172.7.21.0/24 ! -o \"a\\\"b\" -j MASQUERADE\n"),
            "{payload}"
        );
        // A quote left open at the end is a line of its own, not the rest of the dump.
        let t = parse_save("*nat\n-A POSTROUTING -j \"x\n-A POSTROUTING -j RETURN\nCOMMIT\n");
        assert_eq!(t[0].rules.len(), 2);
    }

    #[test]
    fn export_writes_the_chain_and_one_jump_against_the_table() {
        let bridges = ["docker0".to_string()];
        let want = desired_chain(&fp(), &bridges, false);
        let export = |o: &LegacyObserved| export(Family::V4, &fp(), &bridges, false, o, &[]);
        // No jump yet: inserted; the chain is declared and filled with the desired rules.
        let text = export(&LegacyObserved::default());
        let t = parse_save(&text);
        let chain: Vec<String> = t[0]
            .rules
            .iter()
            .filter(|(c, _)| c == CHAIN)
            .map(|(_, r)| r.clone())
            .collect();
        assert!(same_rules(&chain, &want), "{text}");
        assert!(text.contains(&format!("\n:{CHAIN} - [0:0]\n")), "{text}");
        assert_eq!(text.matches(&format!("-I POSTROUTING 1 {JUMP}")).count(), 1);
        assert!(!text.contains("-D POSTROUTING"), "{text}");
        // The jump at the head once: left alone, so loading again leaves one.
        let o = LegacyObserved::from_save(SAVE);
        let text = export(&o);
        assert!(!text.contains("POSTROUTING 1"), "{text}");
        assert!(!text.contains("-D POSTROUTING"), "{text}");
        // Two jumps, or one not at the head: both deleted, one inserted at the head.
        let two = SAVE.replace(
            "-A POSTROUTING -s 172.7.21.0/24",
            &format!("-A POSTROUTING {JUMP}\n-A POSTROUTING -s 172.7.21.0/24"),
        );
        let text = export(&LegacyObserved::from_save(&two));
        assert_eq!(text.matches(&format!("-D POSTROUTING {JUMP}")).count(), 2);
        assert_eq!(text.matches(&format!("-I POSTROUTING 1 {JUMP}")).count(), 1);
        // The broad default rule is apply's to remove (and record): not touched.
        assert!(!text.contains("MASQUERADE\n-D") && !text.contains("-D POSTROUTING -s"));
    }
}
