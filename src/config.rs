//! Configuration: the TOML file (and optionally flannel's `subnet.env`) → [`Config`].
//!
//! Everything here is pure apart from reading the two files. Every error names the file, the
//! line (when there is one), the key and the offending value, so an operator can fix it without
//! reading code.

use std::fmt;
use std::net::IpAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use crate::policy::{covers_family, Family};

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
    /// Where each pod CIDR came from (file and line), in order.
    pub pod_origins: Vec<Origin>,
    /// Where each exception CIDR (cluster and non-masquerade) came from, in order.
    pub exception_origins: Vec<Origin>,
    /// `[metrics] listen`, when set (metrics are off by default).
    pub metrics: Option<crate::metrics::MetricsConfig>,
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
    #[serde(default)]
    metrics: RawMetrics,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<Spanned<String>>,
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

/// Most bytes masqd reads from a configuration, CIDR list or subnet.env file (64 MiB).
pub const MAX_FILE_BYTES: u64 = 64 << 20;

/// Why a file could not be read; `not_found` when it does not exist (only flannel's
/// subnet.env may be waited for).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadError {
    /// The file (or a directory on its path) does not exist.
    pub not_found: bool,
    /// What went wrong.
    pub message: String,
}

/// Reads a file the configuration depends on, bounded: opened without blocking (a FIFO never
/// hangs the caller), required to be a regular file of at most [`MAX_FILE_BYTES`], read with
/// that limit (a file that grows meanwhile is refused, `/dev/zero` never fills memory), UTF-8.
/// A leading byte-order mark is left to the parsers, which drop it (they take text directly too).
pub fn read_bounded(path: &Path) -> Result<String, ReadError> {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let fail = |message: String| ReadError {
        not_found: false,
        message,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| ReadError {
            not_found: e.kind() == std::io::ErrorKind::NotFound,
            message: e.to_string(),
        })?;
    let meta = file.metadata().map_err(|e| fail(e.to_string()))?;
    let ft = meta.file_type();
    if !ft.is_file() {
        let what = if ft.is_dir() {
            "a directory"
        } else if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_char_device() {
            "a character device"
        } else if ft.is_block_device() {
            "a block device"
        } else if ft.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        return Err(fail(format!("it is {what}; a regular file is required")));
    }
    let too_big = || {
        fail(format!(
            "it is larger than {} MiB, more than any configuration needs",
            MAX_FILE_BYTES >> 20
        ))
    };
    if meta.len() > MAX_FILE_BYTES {
        return Err(too_big());
    }
    let mut buf = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|e| fail(e.to_string()))?;
    if buf.len() as u64 > MAX_FILE_BYTES {
        return Err(too_big());
    }
    String::from_utf8(buf).map_err(|e| {
        fail(format!(
            "it is not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        ))
    })
}

/// Drops a leading UTF-8 byte-order mark.
fn strip_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

/// Reads and validates the configuration file at `path` (and the files it names).
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = read_bounded(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        line: None,
        key: None,
        message: format!("cannot read the configuration file: {}", e.message),
        missing_file: false,
    })?;
    parse(path, &text)
}

/// A path the configuration names: relative ones are taken relative to the configuration
/// file's directory (under systemd the working directory is `/`).
pub fn resolve(config: &Path, named: &str) -> PathBuf {
    let named = Path::new(named);
    if named.is_absolute() {
        return named.to_path_buf();
    }
    let config = std::path::absolute(config).unwrap_or_else(|_| config.to_path_buf());
    match config.parent() {
        Some(dir) => dir.join(named),
        None => named.to_path_buf(),
    }
}

/// Where a CIDR of the configuration came from, for messages (cheap: one per entry of lists
/// that can be tens of thousands long).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    net: IpNet,
    file: Arc<Path>,
    line: Option<usize>,
    key: &'static str,
}

impl Origin {
    /// The CIDR as written.
    pub fn net(&self) -> IpNet {
        self.net
    }

    /// `path:line` (the configuration's line for TOML entries, the list file's or
    /// subnet.env's line for theirs), or `path` when there is no line.
    pub fn location(&self) -> String {
        match self.line {
            Some(l) => format!("{}:{l}", self.file.display()),
            None => self.file.display().to_string(),
        }
    }

    /// The key that named it (`masquerade.cluster_cidrs`, `FLANNEL_NETWORK`, …).
    pub fn key(&self) -> &'static str {
        self.key
    }
}

/// Parses and validates configuration text; `path` is used in messages and to resolve the
/// relative paths the configuration names (against the file's directory).
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let text = strip_bom(text);
    let err = |span: Option<Range<usize>>, key: Option<&str>, message: String| ConfigError {
        file: path.to_path_buf(),
        line: span.map(|s| line_of(text, s.start)),
        key: key.map(str::to_string),
        message,
        missing_file: false,
    };
    let raw: RawFile = toml::from_str(text).map_err(|e| toml_error(path, text, &e))?;
    let (mut pods, mut exceptions) = inline_cidrs(path, text, &raw, &err)?;
    let named_path = |spanned: &Option<Spanned<String>>, key: &str| match spanned {
        None => Ok(None),
        Some(p) if p.get_ref().is_empty() => Err(err(
            Some(p.span()),
            Some(key),
            "the path is empty".to_string(),
        )),
        Some(p) => Ok(Some((
            resolve(path, p.get_ref()),
            line_of(text, p.span().start),
        ))),
    };
    let list_key = "masquerade.nonmasquerade_cidrs_file";
    let list_file = named_path(&raw.masquerade.nonmasquerade_cidrs_file, list_key)?;
    if let Some((list, line)) = &list_file {
        let named_at = format!("{}:{line}", path.display());
        exceptions.extend(load_cidr_list_origins(list, list_key, &named_at)?);
    }
    let env_key = "node.flannel_subnet_env";
    let flannel_subnet_env = named_path(&raw.node.flannel_subnet_env, env_key)?;
    if let Some((env_path, line)) = &flannel_subnet_env {
        let named_at = format!("{}:{line}", path.display());
        let env = load_subnet_env(env_path).map_err(|e| name_the_key(e, env_key, &named_at))?;
        pods.extend(env.subnet_origins);
        exceptions.extend(env.network_origins);
    }
    if pods.is_empty() {
        return Err(err(
            None,
            Some("node.pod_cidrs"),
            "no pod CIDR for this node: set [node] pod_cidrs or [node] flannel_subnet_env"
                .to_string(),
        ));
    }
    check_cover(path, &pods, true)?;
    check_cover(path, &exceptions, false)?;
    let split = |v: &[Origin], keys: &[&str]| -> Vec<IpNet> {
        v.iter()
            .filter(|o| keys.contains(&o.key))
            .map(|o| o.net)
            .collect()
    };
    let (bridge_interfaces, honor_marks, mode, resync_interval) = parse_rest(&raw, &err)?;
    let metrics = match &raw.metrics.listen {
        None => None,
        Some(v) => Some(crate::metrics::MetricsConfig {
            listen: crate::metrics::Listen::parse(v.get_ref())
                .map_err(|m| err(Some(v.span()), Some("metrics.listen"), m))?,
            line: line_of(text, v.span().start),
        }),
    };
    Ok(Config {
        path: path.to_path_buf(),
        pod_cidrs: pods.iter().map(|o| o.net).collect(),
        cluster_cidrs: split(
            &exceptions,
            &[
                "masquerade.cluster_cidrs",
                "FLANNEL_NETWORK",
                "FLANNEL_IPV6_NETWORK",
            ],
        ),
        nonmasquerade_cidrs: split(&exceptions, &["masquerade.nonmasquerade_cidrs", list_key]),
        nonmasquerade_cidrs_file: list_file.map(|(p, _)| p),
        bridge_interfaces,
        random_fully: raw.masquerade.random_fully,
        replace_default_rule: raw.masquerade.replace_default_rule,
        honor_marks,
        mode,
        flannel_subnet_env: flannel_subnet_env.map(|(p, _)| p),
        resync_interval,
        pod_origins: pods,
        exception_origins: exceptions,
        metrics,
    })
}

/// The CIDRs written in the configuration itself: `node.pod_cidrs`, then the exceptions of
/// `masquerade.cluster_cidrs` and `masquerade.nonmasquerade_cidrs`, each with its line.
fn inline_cidrs(
    path: &Path,
    text: &str,
    raw: &RawFile,
    err: &ErrFn<'_>,
) -> Result<(Vec<Origin>, Vec<Origin>), ConfigError> {
    // Offsets of the line ends, once: 60,000 entries must not each count lines from the top.
    let newlines: Vec<usize> = text
        .bytes()
        .enumerate()
        .filter(|(_, b)| *b == b'\n')
        .map(|(i, _)| i)
        .collect();
    let file: Arc<Path> = Arc::from(path);
    let origin = |item: &Spanned<String>, net: IpNet, key: &'static str| Origin {
        net,
        file: file.clone(),
        line: Some(newlines.partition_point(|&nl| nl < item.span().start) + 1),
        key,
    };

    let mut pods = Vec::new();
    for item in &raw.node.pod_cidrs {
        let key = "node.pod_cidrs";
        let net = parse_cidr(item.get_ref()).map_err(|m| err(Some(item.span()), Some(key), m))?;
        if net.prefix_len() == 0 {
            let what = format!("{:?}", item.get_ref());
            return Err(err(Some(item.span()), Some(key), pod_cover_message(&what)));
        }
        pods.push(origin(item, net, key));
    }
    let mut exceptions = Vec::new();
    for (key, list) in [
        ("masquerade.cluster_cidrs", &raw.masquerade.cluster_cidrs),
        (
            "masquerade.nonmasquerade_cidrs",
            &raw.masquerade.nonmasquerade_cidrs,
        ),
    ] {
        for item in list {
            let net =
                parse_cidr(item.get_ref()).map_err(|m| err(Some(item.span()), Some(key), m))?;
            check_exception(&net, item.get_ref())
                .map_err(|m| err(Some(item.span()), Some(key), m))?;
            exceptions.push(origin(item, net, key));
        }
    }
    Ok((pods, exceptions))
}

type ErrFn<'a> = dyn Fn(Option<Range<usize>>, Option<&str>, String) -> ConfigError + 'a;

/// The keys that are not CIDRs: bridge interfaces, honoured marks, backend mode, resync.
#[allow(clippy::type_complexity)]
fn parse_rest(
    raw: &RawFile,
    err: &ErrFn<'_>,
) -> Result<(Vec<String>, Vec<HonorMark>, BackendMode, Option<Duration>), ConfigError> {
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
    Ok((bridge_interfaces, honor_marks, mode, resync_interval))
}

/// A file the configuration names failed to load: say which key named it, and where.
fn name_the_key(mut e: ConfigError, key: &str, named_at: &str) -> ConfigError {
    let var = e.key.take();
    e.key = Some(match var {
        Some(v) => format!("{v} (in the file of {key}, {named_at})"),
        None => format!("{key} ({named_at})"),
    });
    e
}

/// The TOML error as an operator reads it: an unknown key is called one (with the valid keys),
/// a value of the wrong type names its key, only a syntax error is "invalid TOML".
fn toml_error(path: &Path, text: &str, e: &toml::de::Error) -> ConfigError {
    let msg = e.message().trim().lines().collect::<Vec<_>>().join("; ");
    let span = e.span();
    let line = span.as_ref().map(|s| line_of(text, s.start));
    let at = span.as_ref().map_or(0, |s| s.start.min(text.len()));
    let (section, key) = key_at(text, at);
    let full = |k: &str| match &section {
        Some(s) if !k.is_empty() => format!("{s}.{k}"),
        Some(s) => s.clone(),
        None => k.to_string(),
    };
    let (key, message) = if let Some(rest) = msg.strip_prefix("unknown field `") {
        let (name, expected) = rest.split_once('`').unwrap_or((rest, ""));
        let valid = expected
            .trim_start_matches([',', ' '])
            .trim_start_matches("expected one of ")
            .trim_start_matches("expected ");
        let here = match &section {
            Some(s) if !text[at..].starts_with('[') => format!("in [{s}]"),
            _ => "at the top level".to_string(),
        };
        let name_key = if text[at..].starts_with('[') {
            name.to_string()
        } else {
            full(name)
        };
        (
            Some(name_key),
            format!("unknown key `{name}` {here}; the valid keys there are {valid}"),
        )
    } else if msg.starts_with("invalid type") || msg.starts_with("invalid value") {
        (key.map(|k| full(&k)), format!("wrong type: {msg}"))
    } else {
        (None, format!("invalid TOML: {msg}"))
    };
    ConfigError {
        file: path.to_path_buf(),
        line,
        key,
        message,
        missing_file: false,
    }
}

/// The `[section]` in force at byte `at` and the key whose value holds it (the last
/// `key = …` line at or before it), both as written.
fn key_at(text: &str, at: usize) -> (Option<String>, Option<String>) {
    let this_line_end = text[at..].find('\n').map_or(text.len(), |i| at + i);
    let mut section = None;
    let mut key = None;
    for l in text[..this_line_end].lines() {
        let t = l.trim();
        if t.starts_with('[') && !t.starts_with("[[") {
            if let Some(end) = t.find(']') {
                section = Some(t[1..end].trim().to_string());
                key = None;
            }
        } else if let Some((k, _)) = t.split_once('=') {
            let k = k.trim();
            if !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-".contains(c))
            {
                key = Some(k.to_string());
            }
        }
    }
    (section, key)
}

/// Whether the CIDRs of `set` together cover a whole family's address space (after
/// aggregation, however it is spelled: `0.0.0.0/1` + `128.0.0.0/1`, or many pieces). Such a
/// set is refused like `/0`: pods (all traffic of the node masqueraded) or exceptions
/// (nothing masqueraded ever).
fn check_cover(config: &Path, set: &[Origin], pods: bool) -> Result<(), ConfigError> {
    for family in Family::ALL {
        let nets: Vec<IpNet> = set.iter().map(|o| o.net).collect();
        if !covers_family(&nets, family) {
            continue;
        }
        let mine: Vec<&Origin> = set
            .iter()
            .filter(|o| Family::of(&o.net) == family)
            .collect();
        let shown: Vec<String> = mine
            .iter()
            .take(6)
            .map(|o| match o.line {
                Some(l) => format!("{} ({}:{l})", o.net, o.file.display()),
                None => format!("{} ({})", o.net, o.file.display()),
            })
            .collect();
        let more = match mine.len().saturating_sub(shown.len()) {
            0 => String::new(),
            n => format!(" and {n} more"),
        };
        let what = format!("{}{more} together", shown.join(", "));
        let mut keys: Vec<&str> = Vec::new();
        for o in &mine {
            if !keys.contains(&o.key) {
                keys.push(o.key);
            }
        }
        let first = mine[0];
        let in_config = &*first.file == config;
        return Err(ConfigError {
            file: first.file.to_path_buf(),
            line: if in_config || mine.len() == 1 {
                first.line
            } else {
                None
            },
            key: Some(keys.join(" + ")),
            message: if pods {
                pod_cover_message(&what)
            } else {
                exception_cover_message(&what)
            },
            missing_file: false,
        });
    }
    Ok(())
}

fn pod_cover_message(what: &str) -> String {
    let covers = cover_verb(what);
    format!(
        "{what} {covers} every address: all traffic of the node, not only its pods, would be \
         masqueraded; give this node's pod subnet"
    )
}

/// "covers", or "cover" after a list of entries "… together".
fn cover_verb(what: &str) -> &'static str {
    if what.ends_with(" together") {
        "cover"
    } else {
        "covers"
    }
}

fn exception_cover_message(what: &str) -> String {
    let covers = cover_verb(what);
    format!(
        "{what} {covers} every destination: nothing would ever be masqueraded, so pods could \
         no longer reach the outside world; list the cluster and private ranges instead, or \
         remove the masquerade rule of this node altogether"
    )
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

/// Shortest and longest `daemon.resync_interval` accepted.
pub const DURATION_BOUNDS: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(86_400));

/// Parses a duration in humantime's grammar (`1500ms`, `60s`, `1m30s`, `2h`; a bare number is
/// seconds), within [`DURATION_BOUNDS`] (1 s to 24 h).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let d = if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        t.parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|e| e.to_string())
    } else {
        humantime::parse_duration(t).map_err(|e| e.to_string())
    }
    .map_err(|e| {
        format!("{s:?} is not a duration ({e}; e.g. \"60s\", \"1500ms\", \"1m30s\", \"2h\")")
    })?;
    let (lo, hi) = DURATION_BOUNDS;
    if d < lo || d > hi {
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
        return Err(exception_cover_message(&format!("{raw:?}")));
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
/// lines are ignored; CR/LF line endings and a byte-order mark are accepted. Meant for long
/// exception lists (tens of thousands of entries), which it parses an order of magnitude
/// faster than a TOML array. The list is part of the configuration: a missing file is an
/// error like any other (never waited for). Each entry comes with its line and the key that
/// named the list.
fn load_cidr_list_origins(
    path: &Path,
    key: &'static str,
    named_at: &str,
) -> Result<Vec<Origin>, ConfigError> {
    let text = read_bounded(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        line: None,
        key: Some(format!("{key} ({named_at})")),
        message: format!("cannot read the CIDR list: {}", e.message),
        missing_file: false,
    })?;
    let mut out = Vec::new();
    let file: Arc<Path> = Arc::from(path);
    for_each_cidr_line(path, &text, |net, _, line| {
        out.push(Origin {
            net,
            file: file.clone(),
            line: Some(line),
            key,
        })
    })
    .map_err(|e| name_the_key(e, key, named_at))?;
    Ok(out)
}

/// Parses the text of a CIDR list file (the format `[masquerade] nonmasquerade_cidrs_file` names).
pub fn parse_cidr_list(path: &Path, text: &str) -> Result<Vec<IpNet>, ConfigError> {
    let mut out = Vec::new();
    for_each_cidr_line(path, text, |net, _, _| out.push(net))?;
    Ok(out)
}

fn for_each_cidr_line(
    path: &Path,
    text: &str,
    mut f: impl FnMut(IpNet, &str, usize),
) -> Result<(), ConfigError> {
    for (idx, raw) in strip_bom(text).lines().enumerate() {
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
        f(net, line, idx + 1);
    }
    Ok(())
}

/// What flannel's `subnet.env` contributes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubnetEnv {
    /// FLANNEL_SUBNET / FLANNEL_IPV6_SUBNET, masked to their networks.
    pub subnets: Vec<IpNet>,
    /// FLANNEL_NETWORK / FLANNEL_IPV6_NETWORK.
    pub networks: Vec<IpNet>,
    /// What is odd but not wrong (a subnet outside its network); logged by [`load_subnet_env`].
    pub warnings: Vec<String>,
    subnet_origins: Vec<Origin>,
    network_origins: Vec<Origin>,
}

/// Reads flannel's `subnet.env` (shell assignments; see [`parse_subnet_env`]) and logs its
/// warnings.
pub fn load_subnet_env(path: &Path) -> Result<SubnetEnv, ConfigError> {
    let text = read_bounded(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        line: None,
        key: None,
        message: format!("cannot read flannel's subnet.env: {}", e.message),
        missing_file: e.not_found,
    })?;
    let env = parse_subnet_env(path, &text)?;
    for w in &env.warnings {
        tracing::warn!("{w}");
    }
    Ok(env)
}

/// Parses the text of a `subnet.env` as the shell would source it: `KEY=VALUE` lines, an
/// optional `export` prefix, values bare or quoted (`"…"`, `'…'`), `#` comments, blank lines,
/// CR/LF line endings and a byte-order mark; the last assignment of a variable wins. A
/// FLANNEL_SUBNET outside FLANNEL_NETWORK is a warning, not an error.
pub fn parse_subnet_env(path: &Path, text: &str) -> Result<SubnetEnv, ConfigError> {
    const VARS: [&str; 4] = [
        "FLANNEL_SUBNET",
        "FLANNEL_IPV6_SUBNET",
        "FLANNEL_NETWORK",
        "FLANNEL_IPV6_NETWORK",
    ];
    let mut last: [Option<(String, usize)>; 4] = Default::default();
    for (idx, raw_line) in strip_bom(text).lines().enumerate() {
        let err = |key: Option<&str>, message: String| ConfigError {
            file: path.to_path_buf(),
            line: Some(idx + 1),
            key: key.map(str::to_string),
            message,
            missing_file: false,
        };
        let Some((key, value)) = shell_assignment(raw_line).map_err(|m| err(None, m))? else {
            continue;
        };
        if let Some(i) = VARS.iter().position(|v| *v == key) {
            last[i] = Some((value, idx + 1));
        }
    }
    let mut env = SubnetEnv::default();
    let mut nets: [Option<IpNet>; 4] = [None; 4];
    for (i, key) in VARS.iter().enumerate() {
        let Some((value, line)) = &last[i] else {
            continue;
        };
        let net = subnet_env_value(key, value, i < 2).map_err(|m| ConfigError {
            file: path.to_path_buf(),
            line: Some(*line),
            key: Some(key.to_string()),
            message: m,
            missing_file: false,
        })?;
        nets[i] = Some(net);
        let origin = Origin {
            net,
            file: Arc::from(path),
            line: Some(*line),
            key,
        };
        if i < 2 {
            env.subnets.push(net);
            env.subnet_origins.push(origin);
        } else {
            env.networks.push(net);
            env.network_origins.push(origin);
        }
    }
    for (s, n) in [(0, 2), (1, 3)] {
        if let (Some(sub), Some(net)) = (nets[s], nets[n]) {
            if !net.contains(&sub) {
                env.warnings.push(format!(
                    "{}: {}={sub} is outside {}={net}; using it as this node's pod CIDR anyway",
                    path.display(),
                    VARS[s],
                    VARS[n]
                ));
            }
        }
    }
    if env.subnets.is_empty() {
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

/// One subnet.env value: a subnet (host address with prefix, masked) or a network.
fn subnet_env_value(key: &str, value: &str, subnet: bool) -> Result<IpNet, String> {
    let net = if subnet {
        let net: IpNet = value.parse().map_err(|_| {
            format!("{value:?} is not an address with a prefix (e.g. 10.244.1.1/24)")
        })?;
        net.trunc()
    } else {
        parse_cidr(value)?
    };
    check_family(key, &net)?;
    if net.prefix_len() == 0 {
        let what = format!("{value:?}");
        return Err(if subnet {
            pod_cover_message(&what)
        } else {
            exception_cover_message(&what)
        });
    }
    Ok(net)
}

/// One line of a shell-sourced file: None for blank and comment lines, else the variable and
/// its value with the quoting removed (`export` prefix, bare, `"…"` with `\` escapes, `'…'`,
/// a trailing `# comment`).
fn shell_assignment(raw_line: &str) -> Result<Option<(String, String)>, String> {
    let line = raw_line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let line = match line.strip_prefix("export") {
        Some(rest) if rest.starts_with([' ', '\t']) => rest.trim_start(),
        _ => line,
    };
    let Some((key, value)) = line.split_once('=') else {
        return Err(format!("malformed line {raw_line:?}: expected KEY=VALUE"));
    };
    // A shell reads `KEY = VALUE` (or `KEY= VALUE`) as a command, not an assignment.
    if key.ends_with([' ', '\t']) || value.starts_with([' ', '\t']) {
        return Err(format!(
            "malformed line {raw_line:?}: no blank may stand next to '=' (a shell would run \
             it as a command)"
        ));
    }
    let key = key.trim();
    if key.is_empty()
        || key.starts_with(|c: char| c.is_ascii_digit())
        || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(format!(
            "malformed line {raw_line:?}: {key:?} is not a variable name"
        ));
    }
    let mut out = String::new();
    let mut chars = value.trim().chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => loop {
                match chars.next() {
                    Some('\'') => break,
                    Some(c) => out.push(c),
                    None => return Err(format!("{key}: unterminated ' in {raw_line:?}")),
                }
            },
            '"' => loop {
                match chars.next() {
                    Some('"') => break,
                    Some('\\') if chars.peek().is_some_and(|n| "\"\\$`".contains(*n)) => {
                        out.extend(chars.next());
                    }
                    Some(c) => out.push(c),
                    None => return Err(format!("{key}: unterminated \" in {raw_line:?}")),
                }
            },
            '\\' => out.extend(chars.next()),
            c if c.is_whitespace() => {
                let rest: String = chars.collect();
                if rest.trim_start().starts_with('#') || rest.trim().is_empty() {
                    break;
                }
                return Err(format!(
                    "{key}: unexpected text after the value in {raw_line:?} (quote a value \
                     that holds spaces)"
                ));
            }
            c => out.push(c),
        }
    }
    Ok(Some((key.to_string(), out)))
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

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("masqd-config-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    const POD: &str = "[node]\npod_cidrs = [\"10.1.0.0/24\"]\n[masquerade]\n";

    #[test]
    fn whole_space_covers_refused_like_slash_0() {
        for (list, key) in [
            (
                "cluster_cidrs = [\"0.0.0.0/1\", \"128.0.0.0/1\"]\n",
                "masquerade.cluster_cidrs",
            ),
            (
                "nonmasquerade_cidrs = [\"::/1\", \"8000::/1\"]\n",
                "masquerade.nonmasquerade_cidrs",
            ),
            (
                "cluster_cidrs = [\"0.0.0.0/1\"]\nnonmasquerade_cidrs = [\"128.0.0.0/2\", \"192.0.0.0/2\"]\n",
                "masquerade.cluster_cidrs + masquerade.nonmasquerade_cidrs",
            ),
        ] {
            let e = p(&format!("{POD}{list}")).unwrap_err();
            let s = e.to_string();
            assert!(s.contains("nothing would ever be masqueraded"), "{s}");
            assert!(s.contains(key) && s.contains("together"), "{s}");
            assert!(s.contains("masqd.toml:4"), "names the lines: {s}");
        }
        let pieces: Vec<String> = (0..=255).map(|i| format!("\"{i}.0.0.0/8\"")).collect();
        let s = p(&format!(
            "{POD}nonmasquerade_cidrs = [{}]\n",
            pieces.join(",")
        ))
        .unwrap_err()
        .to_string();
        assert!(
            s.contains("and 250 more together cover every destination"),
            "{s}"
        );
        // One piece short of the whole space is fine.
        assert!(p(&format!(
            "{POD}nonmasquerade_cidrs = [{}]\n",
            pieces[1..].join(",")
        ))
        .is_ok());
        for pods in [
            "[\"0.0.0.0/1\", \"128.0.0.0/1\"]",
            "[\"::/1\", \"8000::/1\", \"10.1.0.0/24\"]",
        ] {
            let s = p(&format!("[node]\npod_cidrs = {pods}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                s.contains("node.pod_cidrs") && s.contains("all traffic of the node"),
                "{s}"
            );
        }
    }

    #[test]
    fn unknown_key_and_type_errors_are_called_what_they_are() {
        let s = p(&format!("{POD}clustr_cidrs = []\n"))
            .unwrap_err()
            .to_string();
        assert!(!s.contains("invalid TOML"), "{s}");
        assert!(
            s.contains("unknown key `clustr_cidrs` in [masquerade]"),
            "{s}"
        );
        assert!(
            s.contains("masquerade.clustr_cidrs") && s.contains("`cluster_cidrs`"),
            "{s}"
        );
        let s = p("[nod]\npod_cidrs = []\n").unwrap_err().to_string();
        assert!(
            s.contains("unknown key `nod`") && s.contains("`node`"),
            "{s}"
        );
        let e = p(&format!("{POD}random_fully = \"yes\"\n")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("masquerade.random_fully"), "{e}");
        assert!(e.to_string().contains("wrong type"), "{e}");
        assert_eq!(e.line, Some(4));
        let e = p("[node]\npod_cidrs = \"10.1.0.0/24\"\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("node.pod_cidrs"), "{e}");
        let e = p("[node]\npod_cidrs = [\n  \"10.1.0.0/24\",\n  7,\n]\n").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("node.pod_cidrs"), "{e}");
        assert_eq!(e.line, Some(4), "{e}");
        let s = p("[node\n").unwrap_err().to_string();
        assert!(s.contains("invalid TOML"), "{s}");
    }

    #[test]
    fn humantime_durations_within_bounds() {
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1m 30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert!(parse_duration("500ms")
            .unwrap_err()
            .contains("between 1s and 24h"));
        assert!(parse_duration("25h")
            .unwrap_err()
            .contains("between 1s and 24h"));
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn subnet_env_follows_shell_semantics() {
        let env = parse_subnet_env(
            Path::new("s.env"),
            "\u{feff}FLANNEL_NETWORK=10.244.0.0/16\r\nFLANNEL_SUBNET=10.244.1.1/24\r\n\
             export FLANNEL_SUBNET=\"10.244.9.1/24\"  # the new lease\r\n\
             export\tFLANNEL_IPV6_SUBNET='fd00:10:0:1::1/64'\r\nFLANNEL_IPMASQ=true\r\n",
        )
        .unwrap();
        assert_eq!(
            env.subnets,
            vec![
                "10.244.9.0/24".parse::<IpNet>().unwrap(),
                "fd00:10:0:1::/64".parse().unwrap()
            ],
            "the last assignment wins; quotes removed"
        );
        assert!(env.warnings.is_empty(), "{:?}", env.warnings);
        let env = parse_subnet_env(
            Path::new("s.env"),
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.9.1.1/24\n",
        )
        .unwrap();
        assert_eq!(env.subnets, vec!["10.9.1.0/24".parse::<IpNet>().unwrap()]);
        assert!(
            env.warnings[0].contains("outside FLANNEL_NETWORK"),
            "{:?}",
            env.warnings
        );
        for bad in [
            "FLANNEL_SUBNET=\"10.244.1.1/24\n",
            "FLANNEL_SUBNET=10.244.1.1/24 rm -rf\n",
            "FLANNEL_SUBNET = 10.244.1.1/24\n",
            "FLANNEL_SUBNET= 10.244.1.1/24\n",
        ] {
            let e = parse_subnet_env(Path::new("s.env"), bad).unwrap_err();
            assert_eq!(e.line, Some(1), "{e}");
        }
    }

    #[test]
    fn cidr_list_crlf_and_bom() {
        let l = parse_cidr_list(
            Path::new("x.list"),
            "\u{feff}10.0.0.0/8\r\n# c\r\n192.168.0.0/16\r\n",
        )
        .unwrap();
        assert_eq!(l.len(), 2);
    }

    #[test]
    fn relative_paths_resolve_against_the_config_directory() {
        let d = scratch("rel");
        std::fs::create_dir_all(d.join("lists")).unwrap();
        std::fs::write(d.join("lists/extra.list"), "10.96.0.0/12\n").unwrap();
        std::fs::write(d.join("subnet.env"), "FLANNEL_SUBNET=10.244.1.1/24\n").unwrap();
        let cfg = d.join("masqd.toml");
        std::fs::write(
            &cfg,
            "[node]\nflannel_subnet_env = \"subnet.env\"\n[masquerade]\n\
             nonmasquerade_cidrs_file = \"lists/extra.list\"\n",
        )
        .unwrap();
        let c = load(&cfg).unwrap();
        assert_eq!(c.flannel_subnet_env, Some(d.join("subnet.env")));
        assert_eq!(c.nonmasquerade_cidrs_file, Some(d.join("lists/extra.list")));
        assert_eq!(
            c.nonmasquerade_cidrs,
            vec!["10.96.0.0/12".parse::<IpNet>().unwrap()]
        );
        assert_eq!(
            resolve(Path::new("/etc/masqd/masqd.toml"), "/abs"),
            PathBuf::from("/abs")
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn missing_or_bad_list_names_its_key_and_is_not_waited_for() {
        let d = scratch("list");
        let cfg = d.join("masqd.toml");
        std::fs::write(
            &cfg,
            format!("{POD}nonmasquerade_cidrs_file = \"nope.list\"\n"),
        )
        .unwrap();
        let e = load(&cfg).unwrap_err();
        assert!(!e.missing_file, "only flannel's subnet.env is waited for");
        let s = e.to_string();
        assert!(
            s.contains("nope.list") && s.contains("masquerade.nonmasquerade_cidrs_file"),
            "{s}"
        );
        assert!(s.contains("masqd.toml:4"), "{s}");
        std::fs::write(d.join("nope.list"), "10.0.0.0/8\n10.1.2.3/16\n").unwrap();
        let s = load(&cfg).unwrap_err().to_string();
        assert!(
            s.contains("nope.list:2:") && s.contains("masquerade.nonmasquerade_cidrs_file"),
            "{s}"
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn only_bounded_regular_files_are_read() {
        let d = scratch("bounded");
        let fifo = d.join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let big = d.join("big");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(MAX_FILE_BYTES + 1)
            .unwrap();
        for (path, want) in [
            (d.clone(), "directory"),
            (fifo, "FIFO"),
            (PathBuf::from("/dev/zero"), "character device"),
            (big, "larger than 64 MiB"),
        ] {
            let e = load(&path).unwrap_err();
            let s = e.to_string();
            assert!(
                s.contains(want) && s.contains(&*path.to_string_lossy()),
                "{s}"
            );
        }
        std::fs::write(d.join("bom.toml"), format!("\u{feff}{POD}")).unwrap();
        assert!(load(&d.join("bom.toml")).is_ok());
        let _ = std::fs::remove_dir_all(&d);
    }
}
