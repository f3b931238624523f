//! Configuration: the TOML file (and optionally flannel's `subnet.env`) → [`Config`].
//!
//! Everything here is pure apart from reading the two files. Every error names the file, the
//! line (when there is one), the key and the offending value, so an operator can fix it without
//! reading code.

use std::fmt;
use std::net::IpAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

/// Default location of the configuration file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/masqd/masqd.toml";

/// Longest interface name the kernel accepts (IFNAMSIZ - 1).
pub const IFNAME_MAX: usize = 15;

/// Which firewall backend masqd writes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendMode {
    /// Decide per address family (design.md §4).
    Auto,
    /// Native nftables over netlink.
    Nft,
    /// Legacy xtables through the iptables-legacy binaries.
    Legacy,
}

impl fmt::Display for BackendMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendMode::Auto => "auto",
            BackendMode::Nft => "nft",
            BackendMode::Legacy => "legacy",
        })
    }
}

/// A validated configuration. CIDRs are networks (no host bits), interface names are safe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The file this configuration was read from.
    pub path: PathBuf,
    /// This node's pod CIDRs: `[node] pod_cidrs` plus FLANNEL_SUBNET / FLANNEL_IPV6_SUBNET.
    pub pod_cidrs: Vec<IpNet>,
    /// `[masquerade] cluster_cidrs` plus FLANNEL_NETWORK / FLANNEL_IPV6_NETWORK.
    pub cluster_cidrs: Vec<IpNet>,
    /// `[masquerade] nonmasquerade_cidrs`, plus the CIDRs of `nonmasquerade_cidrs_file`.
    pub nonmasquerade_cidrs: Vec<IpNet>,
    /// `[masquerade] nonmasquerade_cidrs_file`, when set.
    pub nonmasquerade_cidrs_file: Option<PathBuf>,
    /// `[masquerade] bridge_interfaces`.
    pub bridge_interfaces: Vec<String>,
    /// `[masquerade] random_fully`.
    pub random_fully: bool,
    /// `[masquerade] replace_default_rule`.
    pub replace_default_rule: bool,
    /// `[masquerade] honor_marks`: packets another component marked for masquerade (kube-proxy's
    /// `0x4000/0x4000` by default) are left to the chain that marked them.
    pub honor_marks: Vec<HonorMark>,
    /// `[backend] mode`.
    pub mode: BackendMode,
    /// `[node] flannel_subnet_env`, when set.
    pub flannel_subnet_env: Option<PathBuf>,
    /// `[daemon] resync_interval`, when set (default: 60 s, or 5 s with a legacy family).
    pub resync_interval: Option<Duration>,
}

/// Most `honor_marks` entries accepted (each is one rule in the hot path).
pub const MAX_HONOR_MARKS: usize = 8;

/// The default of `[masquerade] honor_marks`: kube-proxy's masquerade bit (flannel and
/// kube-proxy in iptables and nftables mode all use it).
pub const DEFAULT_HONOR_MARK: HonorMark = HonorMark {
    value: 0x4000,
    mask: 0x4000,
};

/// A packet mark that another component sets to ask for masquerade: a packet whose
/// `mark & mask == value` is left alone by masqd (`meta mark & MASK == VALUE return`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HonorMark {
    /// The bits that must be set (within `mask`).
    pub value: u32,
    /// The bits compared; never zero.
    pub mask: u32,
}

impl fmt::Display for HonorMark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}/{:#x}", self.value, self.mask)
    }
}

impl HonorMark {
    /// Parses `VALUE/MASK`, each a hexadecimal (`0x…`) or decimal 32-bit number; the mask is
    /// not zero and the value has no bit outside the mask (it could never match).
    pub fn parse(s: &str) -> Result<HonorMark, String> {
        let (v, m) = s.split_once('/').ok_or_else(|| {
            format!("{s:?} is not VALUE/MASK (e.g. \"0x4000/0x4000\", hexadecimal or decimal)")
        })?;
        let num = |t: &str, what: &str| -> Result<u32, String> {
            let t = t.trim();
            let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
                Some(h) if !h.is_empty() && h.bytes().all(|b| b.is_ascii_hexdigit()) => {
                    u32::from_str_radix(h, 16)
                }
                Some(_) => return Err(format!("{s:?}: {what} {t:?} is not a hexadecimal number")),
                None if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) => t.parse(),
                None => return Err(format!("{s:?}: {what} {t:?} is not a number")),
            };
            r.map_err(|_| format!("{s:?}: {what} {t:?} does not fit in 32 bits"))
        };
        let value = num(v, "value")?;
        let mask = num(m, "mask")?;
        if mask == 0 {
            return Err(format!(
                "{s:?}: the mask is zero, so every packet would match; give the bits to compare"
            ));
        }
        if value == 0 {
            return Err(format!(
                "{s:?}: a value of 0 would leave every unmarked packet alone and switch masqd \
                 off; give the bits that mark a packet for masquerade (kube-proxy: \"0x4000/0x4000\")"
            ));
        }
        if value & !mask != 0 {
            return Err(format!(
                "{s:?}: the value has bits outside the mask ({:#x}), so no packet could match",
                value & !mask
            ));
        }
        Ok(HonorMark { value, mask })
    }
}

/// A configuration error. `Display` gives `file:line: key = value: what is wrong`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file at fault.
    pub file: PathBuf,
    /// 1-based line, when the error has one.
    pub line: Option<usize>,
    /// The key (`masquerade.cluster_cidrs`) or subnet.env variable, when there is one.
    pub key: Option<String>,
    /// What is wrong and, where possible, how to fix it.
    pub message: String,
    /// A file the configuration names (flannel's subnet.env, a CIDR list) does not exist
    /// yet: the daemon waits for it instead of failing.
    pub missing_file: bool,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        write!(f, ": ")?;
        if let Some(key) = &self.key {
            write!(f, "{key}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    node: RawNode,
    #[serde(default)]
    masquerade: RawMasquerade,
    #[serde(default)]
    backend: RawBackend,
    #[serde(default)]
    daemon: RawDaemon,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    resync_interval: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawNode {
    #[serde(default)]
    pod_cidrs: Vec<Spanned<String>>,
    flannel_subnet_env: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMasquerade {
    #[serde(default)]
    cluster_cidrs: Vec<Spanned<String>>,
    #[serde(default)]
    nonmasquerade_cidrs: Vec<Spanned<String>>,
    nonmasquerade_cidrs_file: Option<Spanned<String>>,
    #[serde(default)]
    bridge_interfaces: Vec<Spanned<String>>,
    #[serde(default)]
    random_fully: bool,
    #[serde(default = "default_true")]
    replace_default_rule: bool,
    honor_marks: Option<Spanned<Vec<Spanned<String>>>>,
}

impl Default for RawMasquerade {
    fn default() -> Self {
        RawMasquerade {
            cluster_cidrs: Vec::new(),
            nonmasquerade_cidrs: Vec::new(),
            nonmasquerade_cidrs_file: None,
            bridge_interfaces: Vec::new(),
            random_fully: false,
            replace_default_rule: true,
            honor_marks: None,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    mode: Option<Spanned<String>>,
}

fn default_true() -> bool {
    true
}

/// 1-based line of a byte offset in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Reads and validates the configuration file at `path` (and the subnet.env it names).
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        line: None,
        key: None,
        message: format!("cannot read the configuration file: {e}"),
        missing_file: false,
    })?;
    parse(path, &text)
}

/// Parses and validates configuration text; `path` is used in messages and to resolve nothing
/// else (a relative `flannel_subnet_env` is taken relative to the process's directory).
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let err = |span: Option<Range<usize>>, key: Option<&str>, message: String| ConfigError {
        file: path.to_path_buf(),
        line: span.map(|s| line_of(text, s.start)),
        key: key.map(str::to_string),
        message,
        missing_file: false,
    };

    let raw: RawFile = toml::from_str(text).map_err(|e| {
        // toml's message carries its own excerpt; keep its first line and use our line number.
        let msg = e.message().trim().lines().collect::<Vec<_>>().join("; ");
        err(e.span(), None, format!("invalid TOML: {msg}"))
    })?;

    let mut pod_cidrs = Vec::new();
    for item in &raw.node.pod_cidrs {
        let net = parse_cidr(item.get_ref())
            .map_err(|m| err(Some(item.span()), Some("node.pod_cidrs"), m))?;
        if net.prefix_len() == 0 {
            return Err(err(
                Some(item.span()),
                Some("node.pod_cidrs"),
                format!(
                    "\"{}\" covers every address: all traffic of the node, not only its pods, \
                     would be masqueraded; give this node's pod subnet",
                    item.get_ref()
                ),
            ));
        }
        pod_cidrs.push(net);
    }

    let mut cluster_cidrs = Vec::new();
    let mut nonmasquerade_cidrs = Vec::new();
    for (key, list, out) in [
        (
            "masquerade.cluster_cidrs",
            &raw.masquerade.cluster_cidrs,
            &mut cluster_cidrs,
        ),
        (
            "masquerade.nonmasquerade_cidrs",
            &raw.masquerade.nonmasquerade_cidrs,
            &mut nonmasquerade_cidrs,
        ),
    ] {
        for item in list {
            let net =
                parse_cidr(item.get_ref()).map_err(|m| err(Some(item.span()), Some(key), m))?;
            check_exception(&net, item.get_ref())
                .map_err(|m| err(Some(item.span()), Some(key), m))?;
            out.push(net);
        }
    }

    let nonmasquerade_cidrs_file = match &raw.masquerade.nonmasquerade_cidrs_file {
        None => None,
        Some(p) if p.get_ref().is_empty() => {
            return Err(err(
                Some(p.span()),
                Some("masquerade.nonmasquerade_cidrs_file"),
                "the path is empty".to_string(),
            ))
        }
        Some(p) => {
            let path = PathBuf::from(p.get_ref());
            nonmasquerade_cidrs.extend(load_cidr_list(&path)?);
            Some(path)
        }
    };

    let mut bridge_interfaces = Vec::new();
    for item in &raw.masquerade.bridge_interfaces {
        validate_ifname(item.get_ref()).map_err(|m| {
            err(
                Some(item.span()),
                Some("masquerade.bridge_interfaces"),
                format!("interface name {:?} {m}", item.get_ref()),
            )
        })?;
        if !bridge_interfaces.contains(item.get_ref()) {
            bridge_interfaces.push(item.get_ref().clone());
        }
    }

    let honor_marks = parse_honor_marks(&raw.masquerade.honor_marks)
        .map_err(|(span, m)| err(Some(span), Some("masquerade.honor_marks"), m))?;

    let mode = match &raw.backend.mode {
        None => BackendMode::Auto,
        Some(m) => match m.get_ref().as_str() {
            "auto" => BackendMode::Auto,
            "nft" => BackendMode::Nft,
            "legacy" => BackendMode::Legacy,
            other => {
                return Err(err(
                    Some(m.span()),
                    Some("backend.mode"),
                    format!(
                        "unknown backend mode {other:?}; expected \"auto\", \"nft\" or \"legacy\""
                    ),
                ))
            }
        },
    };

    let resync_interval = match &raw.daemon.resync_interval {
        None => None,
        Some(v) => Some(
            parse_duration(v.get_ref())
                .map_err(|m| err(Some(v.span()), Some("daemon.resync_interval"), m))?,
        ),
    };

    let flannel_subnet_env = raw
        .node
        .flannel_subnet_env
        .as_ref()
        .map(|s| PathBuf::from(s.get_ref()));
    if let (Some(env_path), Some(spanned)) = (&flannel_subnet_env, &raw.node.flannel_subnet_env) {
        if spanned.get_ref().is_empty() {
            return Err(err(
                Some(spanned.span()),
                Some("node.flannel_subnet_env"),
                "the path is empty".to_string(),
            ));
        }
        let env = load_subnet_env(env_path)?;
        pod_cidrs.extend(env.subnets);
        cluster_cidrs.extend(env.networks);
    }

    if pod_cidrs.is_empty() {
        return Err(err(
            None,
            Some("node.pod_cidrs"),
            "no pod CIDR for this node: set [node] pod_cidrs or [node] flannel_subnet_env"
                .to_string(),
        ));
    }

    Ok(Config {
        path: path.to_path_buf(),
        pod_cidrs,
        cluster_cidrs,
        nonmasquerade_cidrs,
        nonmasquerade_cidrs_file,
        bridge_interfaces,
        random_fully: raw.masquerade.random_fully,
        replace_default_rule: raw.masquerade.replace_default_rule,
        honor_marks,
        mode,
        flannel_subnet_env,
        resync_interval,
    })
}

/// `[masquerade] honor_marks`: absent → kube-proxy's bit; an empty list turns it off.
/// Duplicates are dropped; more than [`MAX_HONOR_MARKS`] entries are refused.
fn parse_honor_marks(
    raw: &Option<Spanned<Vec<Spanned<String>>>>,
) -> Result<Vec<HonorMark>, (Range<usize>, String)> {
    let Some(list) = raw else {
        return Ok(vec![DEFAULT_HONOR_MARK]);
    };
    if list.get_ref().len() > MAX_HONOR_MARKS {
        return Err((
            list.span(),
            format!(
                "{} entries; at most {MAX_HONOR_MARKS} marks can be honoured",
                list.get_ref().len()
            ),
        ));
    }
    let mut out = Vec::new();
    for item in list.get_ref() {
        let m = HonorMark::parse(item.get_ref()).map_err(|e| (item.span(), e))?;
        if !out.contains(&m) {
            out.push(m);
        }
    }
    Ok(out)
}

/// Parses `500ms`, `5s`, `2m`, `1h` (1 s to 24 h).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. \"60s\", \"500ms\", \"2m\")"))?;
    let d = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "s" | "" => Duration::from_secs(n),
        "m" | "min" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => {
            return Err(format!(
                "{s:?} is not a duration (e.g. \"60s\", \"500ms\", \"2m\")"
            ))
        }
    };
    if d < Duration::from_secs(1) || d > Duration::from_secs(86_400) {
        return Err(format!("{s:?} is out of range: between 1s and 24h"));
    }
    Ok(d)
}

/// Parses `a.b.c.d/len`, `x::/len` or a bare address (taken as /32 or /128). Host bits are an
/// error that suggests the network.
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let net = if s.contains('/') {
        s.parse::<IpNet>().map_err(|_| {
            format!("{s:?} is not a CIDR (expected e.g. 10.244.0.0/16 or fd00::/64)")
        })?
    } else {
        let addr = s
            .parse::<IpAddr>()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR"))?;
        IpNet::from(addr)
    };
    if net.trunc() != net {
        return Err(format!(
            "{s:?} has host bits set; did you mean {}?",
            net.trunc()
        ));
    }
    Ok(net)
}

fn check_exception(net: &IpNet, raw: &str) -> Result<(), String> {
    if net.prefix_len() == 0 {
        return Err(format!(
            "{raw:?} covers every destination: nothing would ever be masqueraded, so pods could \
             no longer reach the outside world; list the cluster and private ranges instead, or \
             remove the masquerade rule of this node altogether"
        ));
    }
    Ok(())
}

/// Checks an interface name: 1..=15 bytes of ASCII letters, digits, `-`, `_` and `.`, as the
/// kernel and every shell accept without quoting.
pub fn validate_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".to_string());
    }
    if name == "." || name == ".." {
        return Err("is not a valid interface name".to_string());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        let what = if c == '/' {
            "holds '/'".to_string()
        } else if c.is_whitespace() {
            "holds whitespace".to_string()
        } else {
            format!("holds {c:?}")
        };
        return Err(format!(
            "{what}; only letters, digits, '-', '_' and '.' are allowed"
        ));
    }
    if name.len() > IFNAME_MAX {
        return Err(format!(
            "is {} bytes long; Linux allows at most {IFNAME_MAX}",
            name.len()
        ));
    }
    Ok(())
}

/// Reads a CIDR list file: one CIDR (or bare address) per line; `#` starts a comment; blank
/// lines are ignored. Meant for long exception lists (tens of thousands of entries), which it
/// parses an order of magnitude faster than a TOML array.
pub fn load_cidr_list(path: &Path) -> Result<Vec<IpNet>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        line: None,
        key: None,
        message: format!("cannot read the CIDR list: {e}"),
        missing_file: e.kind() == std::io::ErrorKind::NotFound,
    })?;
    parse_cidr_list(path, &text)
}

/// Parses the text of a CIDR list file (see [`load_cidr_list`]).
pub fn parse_cidr_list(path: &Path, text: &str) -> Result<Vec<IpNet>, ConfigError> {
    let mut out = Vec::new();
    for (idx, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let err = |message: String| ConfigError {
            file: path.to_path_buf(),
            line: Some(idx + 1),
            key: None,
            message,
            missing_file: false,
        };
        let net = parse_cidr(line).map_err(err)?;
        check_exception(&net, line).map_err(err)?;
        out.push(net);
    }
    Ok(out)
}

/// What flannel's `subnet.env` contributes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubnetEnv {
    /// FLANNEL_SUBNET / FLANNEL_IPV6_SUBNET, masked to their networks.
    pub subnets: Vec<IpNet>,
    /// FLANNEL_NETWORK / FLANNEL_IPV6_NETWORK.
    pub networks: Vec<IpNet>,
}

/// Reads flannel's `subnet.env` (`KEY=VALUE` lines; `#` comments and blank lines ignored).
pub fn load_subnet_env(path: &Path) -> Result<SubnetEnv, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        line: None,
        key: None,
        message: format!("cannot read flannel's subnet.env: {e}"),
        missing_file: e.kind() == std::io::ErrorKind::NotFound,
    })?;
    parse_subnet_env(path, &text)
}

/// Parses the text of a `subnet.env`.
pub fn parse_subnet_env(path: &Path, text: &str) -> Result<SubnetEnv, ConfigError> {
    let mut env = SubnetEnv::default();
    let mut seen_any = false;
    for (idx, raw_line) in text.lines().enumerate() {
        let line_no = idx + 1;
        let err = |key: Option<&str>, message: String| ConfigError {
            file: path.to_path_buf(),
            line: Some(line_no),
            key: key.map(str::to_string),
            message,
            missing_file: false,
        };
        let line = raw_line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((key, value)) = line.split_once('=') else {
            return Err(err(
                None,
                format!("malformed line {raw_line:?}: expected KEY=VALUE"),
            ));
        };
        let key = key.trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(err(
                None,
                format!("malformed line {raw_line:?}: {key:?} is not a variable name"),
            ));
        }
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        seen_any = true;
        match key {
            "FLANNEL_SUBNET" | "FLANNEL_IPV6_SUBNET" => {
                let net: IpNet = value.parse().map_err(|_| {
                    err(
                        Some(key),
                        format!("{value:?} is not an address with a prefix (e.g. 10.244.1.1/24)"),
                    )
                })?;
                check_family(key, &net).map_err(|m| err(Some(key), m))?;
                if net.prefix_len() == 0 {
                    return Err(err(
                        Some(key),
                        format!("{value:?} covers every address: all traffic of the node would be masqueraded"),
                    ));
                }
                env.subnets.push(net.trunc());
            }
            "FLANNEL_NETWORK" | "FLANNEL_IPV6_NETWORK" => {
                let net = parse_cidr(value).map_err(|m| err(Some(key), m))?;
                check_family(key, &net).map_err(|m| err(Some(key), m))?;
                check_exception(&net, value).map_err(|m| err(Some(key), m))?;
                env.networks.push(net);
            }
            _ => {}
        }
    }
    if !seen_any || env.subnets.is_empty() {
        return Err(ConfigError {
            file: path.to_path_buf(),
            line: None,
            key: None,
            message: "no FLANNEL_SUBNET or FLANNEL_IPV6_SUBNET in the file".to_string(),
            missing_file: false,
        });
    }
    Ok(env)
}

fn check_family(key: &str, net: &IpNet) -> Result<(), String> {
    let v6_key = key.contains("IPV6");
    match (v6_key, net) {
        (false, IpNet::V6(_)) => Err(format!("{net} is IPv6; {key} takes an IPv4 CIDR")),
        (true, IpNet::V4(_)) => Err(format!("{net} is IPv4; {key} takes an IPv6 CIDR")),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<Config, ConfigError> {
        parse(Path::new("/etc/masqd/masqd.toml"), text)
    }

    #[test]
    fn full_example() {
        let c = p(r#"
[node]
pod_cidrs = ["172.7.21.0/24", "fd00:7:21::/64"]
[masquerade]
cluster_cidrs = ["172.7.0.0/16"]
nonmasquerade_cidrs = ["169.254.0.0/16"]
bridge_interfaces = ["docker0", "cni0"]
random_fully = true
replace_default_rule = false
[backend]
mode = "nft"
"#)
        .unwrap();
        assert_eq!(c.pod_cidrs.len(), 2);
        assert_eq!(c.bridge_interfaces, vec!["docker0", "cni0"]);
        assert!(c.random_fully);
        assert!(!c.replace_default_rule);
        assert_eq!(c.mode, BackendMode::Nft);
    }

    #[test]
    fn shipped_example_is_valid() {
        let c = p(include_str!("../systemd/masqd.toml")).unwrap();
        assert_eq!(c.pod_cidrs, vec!["172.7.21.0/24".parse::<IpNet>().unwrap()]);
        assert_eq!(c.mode, BackendMode::Auto);
    }

    #[test]
    fn defaults() {
        let c = p("[node]\npod_cidrs = [\"10.1.0.0/24\"]\n").unwrap();
        assert!(c.replace_default_rule);
        assert!(!c.random_fully);
        assert_eq!(c.mode, BackendMode::Auto);
        assert!(c.cluster_cidrs.is_empty());
    }

    #[test]
    fn host_bits_suggest_network() {
        let e = p("[node]\npod_cidrs = [\"10.244.3.1/24\"]\n").unwrap_err();
        let s = e.to_string();
        assert!(s.contains("masqd.toml:2"), "{s}");
        assert!(s.contains("node.pod_cidrs"), "{s}");
        assert!(s.contains("10.244.3.0/24"), "{s}");
    }

    #[test]
    fn unknown_key_names_line() {
        let e = p("[node]\npod_cidrs = [\"10.1.0.0/24\"]\n[masquerade]\nclustr_cidrs = []\n")
            .unwrap_err();
        let s = e.to_string();
        assert!(s.contains(":4:"), "{s}");
        assert!(s.contains("clustr_cidrs"), "{s}");
    }

    #[test]
    fn bad_ifnames() {
        for name in [
            "",
            "abcdefghijklmnop",
            "a/b",
            "a b",
            "x;rm",
            "$(id)",
            "a`b`",
        ] {
            let text = format!(
                "[node]\npod_cidrs = [\"10.1.0.0/24\"]\n[masquerade]\nbridge_interfaces = [{name:?}]\n"
            );
            let s = p(&text).unwrap_err().to_string();
            assert!(s.contains("bridge_interfaces"), "{s}");
            assert!(s.contains(":4:"), "{s}");
        }
        assert!(validate_ifname("cni0").is_ok());
        assert!(validate_ifname("br-1a2b.100").is_ok());
    }

    #[test]
    fn everything_exception_refused() {
        for net in ["0.0.0.0/0", "::/0"] {
            let text = format!(
                "[node]\npod_cidrs = [\"10.1.0.0/24\"]\n[masquerade]\nnonmasquerade_cidrs = [\"{net}\"]\n"
            );
            let s = p(&text).unwrap_err().to_string();
            assert!(s.contains("nothing would ever be masqueraded"), "{s}");
        }
    }

    #[test]
    fn pod_cidrs_required() {
        let s = p("[node]\npod_cidrs = []\n").unwrap_err().to_string();
        assert!(s.contains("flannel_subnet_env"), "{s}");
    }

    #[test]
    fn subnet_env() {
        let env = parse_subnet_env(
            Path::new("/run/flannel/subnet.env"),
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\n\
             FLANNEL_IPMASQ=true\nFLANNEL_IPV6_NETWORK=fd00:10::/56\nFLANNEL_IPV6_SUBNET=fd00:10:0:1::1/64\n",
        )
        .unwrap();
        assert_eq!(
            env.subnets,
            vec![
                "10.244.1.0/24".parse::<IpNet>().unwrap(),
                "fd00:10:0:1::/64".parse().unwrap()
            ]
        );
        assert_eq!(env.networks.len(), 2);
        let e = parse_subnet_env(
            Path::new("s.env"),
            "FLANNEL_SUBNET=10.244.1.1/24\ngarbage\n",
        )
        .unwrap_err();
        assert_eq!(e.line, Some(2));
        assert!(e.to_string().contains("garbage"));
        let e = parse_subnet_env(Path::new("s.env"), "FLANNEL_SUBNET=10.244.1.1\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("FLANNEL_SUBNET"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("10ms").is_err());
        assert!(parse_duration("soon").is_err());
        let s = p("[node]\npod_cidrs = [\"10.1.0.0/24\"]\n[daemon]\nresync_interval = \"fast\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            s.contains(":4:") && s.contains("daemon.resync_interval"),
            "{s}"
        );
    }

    #[test]
    fn cidr_list_file() {
        let l = parse_cidr_list(
            Path::new("/etc/masqd/nonmasq.list"),
            "# VPC ranges\n10.0.0.0/8\n\n 192.168.1.1  # a host\nfd00::/8\n",
        )
        .unwrap();
        assert_eq!(l.len(), 3);
        let e = parse_cidr_list(
            Path::new("/etc/masqd/nonmasq.list"),
            "10.0.0.0/8\n10.1.2.3/16\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("nonmasq.list:2:") && e.contains("10.1.0.0/16"),
            "{e}"
        );
        let e = parse_cidr_list(Path::new("x.list"), "0.0.0.0/0\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("x.list:1:") && e.contains("nothing would ever be masqueraded"),
            "{e}"
        );
    }

    #[test]
    fn honor_marks() {
        let base = "[node]\npod_cidrs = [\"10.1.0.0/24\"]\n[masquerade]\n";
        let c = p(base).unwrap();
        assert_eq!(c.honor_marks, vec![DEFAULT_HONOR_MARK]);
        let c = p(&format!("{base}honor_marks = []\n")).unwrap();
        assert!(c.honor_marks.is_empty());
        let c = p(&format!(
            "{base}honor_marks = [\"0x4000/0x4000\", \"16384/16384\", \"1/0xFFFFFFFF\"]\n"
        ))
        .unwrap();
        assert_eq!(
            c.honor_marks,
            vec![
                DEFAULT_HONOR_MARK,
                HonorMark {
                    value: 1,
                    mask: u32::MAX
                }
            ]
        );
        for (bad, want) in [
            ("0x4000", "VALUE/MASK"),
            ("0x4000/0", "mask is zero"),
            ("0x4000/0x0", "mask is zero"),
            ("0x1ffffffff/0xffffffff", "32 bits"),
            ("4294967296/1", "32 bits"),
            ("0xg/1", "hexadecimal"),
            ("-1/1", "not a number"),
            ("0x8000/0x4000", "outside the mask"),
            ("0x0/0x4000", "switch masqd off"),
            ("/1", "not a number"),
        ] {
            let text = format!("{base}random_fully = false\nhonor_marks = [\n  \"{bad}\",\n]\n");
            let e = p(&text).unwrap_err();
            let s = e.to_string();
            assert_eq!(e.line, Some(6), "{s}");
            assert!(
                s.contains("masquerade.honor_marks") && s.contains(want),
                "{bad}: {s}"
            );
            assert!(s.contains(bad), "names the value: {s}");
        }
        let nine: Vec<String> = (0..9).map(|i| format!("\"{}/0xffff\"", i)).collect();
        let e = p(&format!("{base}honor_marks = [{}]\n", nine.join(", "))).unwrap_err();
        assert!(e.to_string().contains("at most 8"), "{e}");
        assert_eq!(e.line, Some(4));
    }

    #[test]
    fn bad_mode() {
        let s = p("[node]\npod_cidrs = [\"10.1.0.0/24\"]\n[backend]\nmode = \"iptables\"\n")
            .unwrap_err()
            .to_string();
        assert!(s.contains(":4:") && s.contains("\"iptables\""), "{s}");
    }
}
