//! ip-masq-agent's configuration file (the `ip-masq-agent` ConfigMap, mounted at
//! `/etc/config/ip-masq-agent`): a pure parse of its YAML or JSON text into the exception set
//! and resync interval masqd uses, with upstream kubernetes-sigs/ip-masq-agent's semantics.
//!
//! Upstream reads the file with `yaml.ToJSON` then `json.Unmarshal` into a struct pre-filled with
//! its defaults, so: keys present override the defaults, absent keys keep them; an empty file or
//! `null` is the defaults; keys match case-insensitively (Go's `encoding/json`); a JSON `null`
//! for a list clears it, for a number or a boolean changes nothing, for `resyncInterval` is an
//! error; `resyncInterval` is a Go duration string (`time.ParseDuration`); validation refuses more
//! than `cidrLimit` CIDRs, then every CIDR that does not parse or is not aligned, in order.
//! Where masqd is stricter (unknown keys are reported, duplicate keys and a zero or negative
//! resync interval are refused) or differs (IPv6 CIDRs need no `--enable-ipv6`), the README's
//! table says so. The Go duration grammar is written here by hand: no crate parses exactly it.

use std::path::Path;
use std::time::Duration;

use ipnet::IpNet;
use serde_json::{Map, Value};

use super::{read_bounded, ConfigError, Origin};

/// Where ip-masq-agent (and a ConfigMap mounted as the DaemonSet in `deploy/` mounts it) keeps
/// the file.
pub const DEFAULT_PATH: &str = "/etc/config/ip-masq-agent";

/// Never masqueraded unless `masqLinkLocal: true`.
pub const LINK_LOCAL_V4: &str = "169.254.0.0/16";
/// Never masqueraded unless `masqLinkLocalIPv6: true` (RFC 4291).
pub const LINK_LOCAL_V6: &str = "fe80::/10";

/// Upstream's default `nonMasqueradeCIDRs` (RFC 1918).
pub const DEFAULT_NON_MASQUERADE: [&str; 3] = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"];

/// The keys upstream reads, as it spells them.
const KEYS: [&str; 5] = [
    "nonMasqueradeCIDRs",
    "cidrLimit",
    "masqLinkLocal",
    "masqLinkLocalIPv6",
    "resyncInterval",
];

/// The file's settings after defaults, as upstream's `MasqConfig`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// `nonMasqueradeCIDRs`, as written (validated: each parses and is aligned).
    pub non_masquerade_cidrs: Vec<IpNet>,
    /// `cidrLimit` (default 64).
    pub cidr_limit: i64,
    /// `masqLinkLocal` (default false: 169.254.0.0/16 is an exception).
    pub masq_link_local: bool,
    /// `masqLinkLocalIPv6` (default false: fe80::/10 is an exception).
    pub masq_link_local_ipv6: bool,
    /// `resyncInterval` (default 60 s).
    pub resync_interval: Duration,
    /// Whether the file sets `resyncInterval` (otherwise masqd's own default applies: 60 s).
    pub resync_given: bool,
    /// Keys the file has that upstream does not read (masqd warns naming each).
    pub unknown_keys: Vec<String>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            non_masquerade_cidrs: DEFAULT_NON_MASQUERADE
                .iter()
                .filter_map(|s| s.parse().ok())
                .collect(),
            cidr_limit: 64,
            masq_link_local: false,
            masq_link_local_ipv6: false,
            resync_interval: Duration::from_secs(60),
            resync_given: false,
            unknown_keys: Vec::new(),
        }
    }
}

impl AgentConfig {
    /// The CIDRs never masqueraded: `nonMasqueradeCIDRs` of both families, plus the link-local
    /// ranges unless the file masquerades them, as upstream's rule set.
    pub fn exceptions(&self) -> Vec<IpNet> {
        let mut out = Vec::new();
        if !self.masq_link_local {
            out.extend(LINK_LOCAL_V4.parse::<IpNet>().ok());
        }
        if !self.masq_link_local_ipv6 {
            out.extend(LINK_LOCAL_V6.parse::<IpNet>().ok());
        }
        out.extend(self.non_masquerade_cidrs.iter().copied());
        out
    }
}

/// The keys masqd's [`Origin`]s of this source carry (for `explain` and messages).
pub const CIDR_KEY: &str = "ip-masq-agent nonMasqueradeCIDRs";
/// The key of the link-local exceptions (upstream adds them unless `masqLinkLocal*`).
pub const LINK_LOCAL_KEY: &str = "ip-masq-agent link-local (masqLinkLocal/masqLinkLocalIPv6 false)";

impl AgentConfig {
    /// [`AgentConfig::exceptions`] as origins in the file at `path` (no line: the list is
    /// validated as a whole).
    pub fn origins(&self, path: &Path) -> Vec<Origin> {
        let file: std::sync::Arc<Path> = path.into();
        let n = self.exceptions().len() - self.non_masquerade_cidrs.len();
        self.exceptions()
            .into_iter()
            .enumerate()
            .map(|(i, net)| Origin {
                net,
                file: file.clone(),
                line: None,
                key: if i < n { LINK_LOCAL_KEY } else { CIDR_KEY },
            })
            .collect()
    }
}

/// Reads and parses the file at `path`. A file that does not exist is the upstream defaults
/// (an optional ConfigMap that is not there), not an error; one that cannot be read is.
pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
    match read_bounded(path) {
        Ok(text) => parse(path, &text),
        Err(e) if e.not_found => Ok(AgentConfig::default()),
        Err(e) => Err(error(
            path,
            None,
            None,
            format!("cannot read ip-masq-agent's configuration: {}", e.message),
        )),
    }
}

/// Parses the text of the file at `path` (named in errors). `text` is what the file holds; a
/// file that does not exist is [`AgentConfig::default`], decided by the caller.
pub fn parse(path: &Path, text: &str) -> Result<AgentConfig, ConfigError> {
    let value = to_value(path, text)?;
    let mut cfg = AgentConfig::default();
    let map = match value {
        Value::Null => return Ok(cfg),
        Value::Object(m) => m,
        other => {
            return Err(error(
                path,
                None,
                None,
                format!(
                    "the file is {}, not a mapping of ip-masq-agent keys ({})",
                    kind(&other),
                    KEYS.join(", ")
                ),
            ))
        }
    };
    let mut cidrs: Option<Vec<String>> = None;
    let keys = document_keys(path, text)?;
    same_setting_twice(path, text, &keys)?;
    for key in &keys {
        let Some(v) = map.get(key) else { continue };
        let Some(known) = KEYS.iter().find(|k| k.eq_ignore_ascii_case(key)) else {
            cfg.unknown_keys.push(key.clone());
            continue;
        };
        let at = |msg: String| error(path, line_of_key(text, key), Some(key), msg);
        match *known {
            "nonMasqueradeCIDRs" => cidrs = Some(string_list(v).map_err(at)?),
            "cidrLimit" => set_int(&mut cfg.cidr_limit, v).map_err(at)?,
            "masqLinkLocal" => set_bool(&mut cfg.masq_link_local, v).map_err(at)?,
            "masqLinkLocalIPv6" => set_bool(&mut cfg.masq_link_local_ipv6, v).map_err(at)?,
            _ => {
                cfg.resync_interval = resync(v).map_err(at)?;
                cfg.resync_given = true;
            }
        }
    }
    if let Some(list) = cidrs {
        cfg.non_masquerade_cidrs = validate(path, text, &map, &list, cfg.cidr_limit)?;
    } else {
        let defaults: Vec<String> = DEFAULT_NON_MASQUERADE.map(String::from).to_vec();
        validate(path, text, &map, &defaults, cfg.cidr_limit)?;
    }
    Ok(cfg)
}

/// The top-level keys of a mapping in the order the file writes them (a JSON value's map has
/// its own order and keeps only the last of two equal keys).
struct Keys(Vec<String>);

impl<'de> serde::Deserialize<'de> for Keys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Keys, D::Error> {
        d.deserialize_map(KeysVisitor)
    }
}

struct KeysVisitor;

impl<'de> serde::de::Visitor<'de> for KeysVisitor {
    type Value = Keys;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a mapping")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Keys, A::Error> {
        let mut v = Vec::new();
        while let Some((k, _)) = m.next_entry::<String, serde::de::IgnoredAny>()? {
            v.push(k);
        }
        Ok(Keys(v))
    }
}

/// The top-level keys in document order (the file is a mapping: [`parse`] checked it).
fn document_keys(path: &Path, text: &str) -> Result<Vec<String>, ConfigError> {
    decode::<Keys>(path, text).map(|k| k.0)
}

/// Two keys for one setting (equal, or equal ignoring case, which Go's JSON decoding upstream
/// relies on treats as one): refused, naming both, rather than guessing which one is meant.
fn same_setting_twice(path: &Path, text: &str, keys: &[String]) -> Result<(), ConfigError> {
    for (i, a) in keys.iter().enumerate() {
        if let Some(b) = keys[i + 1..].iter().find(|b| b.eq_ignore_ascii_case(a)) {
            return Err(error(
                path,
                line_of_key(text, b),
                Some(b),
                format!(
                    "the file sets {a:?} twice ({b:?}; keys match regardless of case): keep one"
                ),
            ));
        }
    }
    Ok(())
}

/// A parser's message without its advice to the programmer ("…, set DuplicateKeyPolicy in
/// Options", "…; use Option<String>").
fn tidy(msg: &str) -> String {
    let first = msg.lines().next().unwrap_or_default();
    let first = first.strip_prefix("error: ").unwrap_or(first);
    let cut = [", set ", "; use ", ", use ", " use from_str"]
        .iter()
        .filter_map(|m| first.find(m))
        .min()
        .unwrap_or(first.len());
    first[..cut].to_string()
}

/// YAML or JSON text → a JSON value.
fn to_value(path: &Path, text: &str) -> Result<Value, ConfigError> {
    decode::<Value>(path, text)
}

/// The character a JSON document (an object) starts with: an opening curly brace, written as
/// an escape so that tools counting braces to find a function's end are not misled.
const JSON_OPEN: char = '\x7b';

/// Decodes the file's text. Text that starts with `{` is JSON (as upstream's `yaml.ToJSON`,
/// which passes JSON through), anything else YAML; a leading byte-order mark is dropped.
fn decode<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if text.trim_start().starts_with(JSON_OPEN) {
        return serde_json::from_str(text)
            .map_err(|e| error(path, Some(e.line()), None, format!("not valid JSON: {e}")));
    }
    serde_saphyr::from_str::<T>(text).map_err(|e| {
        let first = tidy(&e.to_string());
        let line = first
            .strip_prefix("line ")
            .and_then(|r| r.split(' ').next())
            .and_then(|n| n.parse().ok());
        error(path, line, None, format!("not valid YAML or JSON: {first}"))
    })
}

/// Upstream's `validate`: at most `limit` CIDRs, then each parses and is aligned.
fn validate(
    path: &Path,
    text: &str,
    map: &Map<String, Value>,
    list: &[String],
    limit: i64,
) -> Result<Vec<IpNet>, ConfigError> {
    let key = map
        .keys()
        .find(|k| k.eq_ignore_ascii_case("nonMasqueradeCIDRs"))
        .cloned()
        .unwrap_or_else(|| "nonMasqueradeCIDRs".to_string());
    let line = line_of_key(text, &key);
    if list.len() as i64 > limit {
        let limit_key = map
            .keys()
            .find(|k| k.eq_ignore_ascii_case("cidrLimit"))
            .map_or("cidrLimit (default 64)".to_string(), |k| k.clone());
        return Err(error(
            path,
            line,
            Some(&key),
            format!(
                "{} CIDRs, more than {limit_key} = {limit} allows (link-local not counted); \
                 raise cidrLimit or shorten the list",
                list.len()
            ),
        ));
    }
    list.iter()
        .map(|s| {
            check_cidr(s).map_err(|m| error(path, line_of_value(text, s).or(line), Some(&key), m))
        })
        .collect()
}

/// Upstream's `validateCIDR`: Go's `net.ParseCIDR`, then the address must be the network's.
fn check_cidr(s: &str) -> Result<IpNet, String> {
    let unparsable = || format!("CIDR {s:?} could not be parsed, invalid CIDR address: {s}");
    // Go's ParseCIDR (since 1.17) refuses IPv4 octets with a leading zero ("010.0.0.0/8").
    let (addr, _) = s.split_once('/').unwrap_or((s, ""));
    if !addr.contains(':') && addr.split('.').any(|o| o.len() > 1 && o.starts_with('0')) {
        return Err(unparsable());
    }
    let net: IpNet = s.parse().map_err(|_| unparsable())?;
    if net.trunc() != net {
        return Err(format!(
            "CIDR {s:?} is not aligned to a CIDR block, ip: {:?} network: {:?}",
            net.addr().to_string(),
            net.trunc().to_string()
        ));
    }
    Ok(net)
}

fn string_list(v: &Value) -> Result<Vec<String>, String> {
    match v {
        Value::Null => Ok(Vec::new()),
        Value::Array(items) => items
            .iter()
            .map(|i| match i {
                Value::String(s) => Ok(s.clone()),
                other => Err(format!(
                    "every entry must be a CIDR string, found {} {other}",
                    kind(other)
                )),
            })
            .collect(),
        other => Err(format!(
            "must be a list of CIDR strings, found {} {other}",
            kind(other)
        )),
    }
}

fn set_int(slot: &mut i64, v: &Value) -> Result<(), String> {
    match v {
        Value::Null => Ok(()),
        Value::Number(n) => {
            // Upstream's YAML → JSON step writes a whole float (`2.0`) as `2`.
            let whole = n.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15);
            *slot = n
                .as_i64()
                .or(whole.map(|f| f as i64))
                .ok_or_else(|| format!("must be a whole number, found {n}"))?;
            Ok(())
        }
        other => Err(format!("must be a number, found {} {other}", kind(other))),
    }
}

fn set_bool(slot: &mut bool, v: &Value) -> Result<(), String> {
    match v {
        Value::Null => Ok(()),
        Value::Bool(b) => {
            *slot = *b;
            Ok(())
        }
        other => Err(format!(
            "must be true or false, found {} {other}",
            kind(other)
        )),
    }
}

/// `resyncInterval`: a Go duration string; masqd refuses one below 1 s or above 24 h (upstream
/// would spin on a zero one).
fn resync(v: &Value) -> Result<Duration, String> {
    let s = match v {
        Value::String(s) => s.as_str(),
        Value::Null => "",
        other => {
            return Err(format!(
                "must be a duration string such as \"60s\" or \"1m30s\", found {} {other}",
                kind(other)
            ))
        }
    };
    let d = go_duration(s)?;
    if d < Duration::from_secs(1) || d > Duration::from_secs(86_400) {
        return Err(format!(
            "{s:?} is out of range: masqd resyncs between every 1s and every 24h"
        ));
    }
    Ok(d)
}

/// Go's `time.ParseDuration`: `[-+]` then one or more `<decimal>[.<decimal>]<unit>` with units
/// `ns us µs μs ms s m h`; `0` alone is zero. A negative duration is an error here (it cannot be
/// an interval).
pub fn go_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("time: invalid duration {s:?}");
    let mut rest = s;
    let negative = rest.starts_with('-');
    rest = rest.strip_prefix(['-', '+']).unwrap_or(rest);
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("time: missing unit in duration {s:?}"))?;
        let (num, tail) = rest.split_at(num_len);
        if num.is_empty() || num == "." || num.matches('.').count() > 1 {
            return Err(bad());
        }
        let value: f64 = num.parse().map_err(|_| bad())?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_len);
        let nanos = match unit {
            "ns" => 1.0,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return Err(format!("time: unknown unit {unit:?} in duration {s:?}")),
        };
        total += value * nanos;
        rest = next;
    }
    if total > i64::MAX as f64 {
        return Err(format!("time: invalid duration {s:?}"));
    }
    if negative && total > 0.0 {
        return Err(format!("{s:?} is negative"));
    }
    Ok(Duration::from_nanos(total as u64))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

/// The 1-based line where `key` is written (`key:` or `"key":`), for errors.
fn line_of_key(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            let t = l.trim_start().trim_start_matches([JSON_OPEN, ',', ' ']);
            let t = t.strip_prefix('"').unwrap_or(t);
            t.strip_prefix(key)
                .map(|r| r.trim_start_matches('"').trim_start().starts_with(':'))
                .unwrap_or(false)
        })
        .map(|i| i + 1)
}

/// The 1-based line of the first appearance of a CIDR value, for errors.
fn line_of_value(text: &str, value: &str) -> Option<usize> {
    text.lines().position(|l| l.contains(value)).map(|i| i + 1)
}

fn error(path: &Path, line: Option<usize>, key: Option<&str>, message: String) -> ConfigError {
    ConfigError {
        file: path.to_path_buf(),
        line,
        key: key.map(str::to_string),
        message,
        missing_file: false,
    }
}

#[cfg(test)]
mod tests;
