//! The masqd.toml source: its schema (the `Raw*` serde structs) and the pure parse of its text
//! into checked values with `file:line` errors; the files it names are left to the caller.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ::toml::Spanned;
use ipnet::IpNet;
use serde::Deserialize;

use super::validate::{
    check_exception, parse_cidr, parse_duration, pod_cover_message, validate_ifname,
};
use super::{
    resolve, strip_bom, BackendMode, ConfigError, HonorMark, Named, Origin, DEFAULT_HONOR_MARK,
    MAX_HONOR_MARKS,
};

/// The key naming the CIDR list file.
pub const LIST_KEY: &str = "masquerade.nonmasquerade_cidrs_file";
/// The key naming flannel's subnet.env.
pub const ENV_KEY: &str = "node.flannel_subnet_env";
/// The key naming ip-masq-agent's configuration file.
pub const AGENT_KEY: &str = "node.ip_masq_agent_config";

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
    full_verify_interval: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawNode {
    #[serde(default)]
    pod_cidrs: Vec<Spanned<String>>,
    flannel_subnet_env: Option<Spanned<String>>,
    ip_masq_agent_config: Option<Spanned<String>>,
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

/// The configuration file and its line ends, to turn spans into 1-based lines (counted once:
/// 60,000 entries must not each count lines from the top).
struct Spans {
    path: PathBuf,
    newlines: Vec<usize>,
}

impl Spans {
    fn new(path: &Path, text: &str) -> Spans {
        let newlines = text
            .bytes()
            .enumerate()
            .filter(|(_, b)| *b == b'\n')
            .map(|(i, _)| i)
            .collect();
        Spans {
            path: path.to_path_buf(),
            newlines,
        }
    }

    /// 1-based line of a byte offset.
    fn line(&self, offset: usize) -> usize {
        self.newlines.partition_point(|&nl| nl < offset) + 1
    }

    fn err(&self, span: Option<Range<usize>>, key: Option<&str>, message: String) -> ConfigError {
        ConfigError {
            file: self.path.clone(),
            line: span.map(|s| self.line(s.start)),
            key: key.map(str::to_string),
            message,
            missing_file: false,
        }
    }
}

/// What the configuration file says, its CIDRs checked; the rest is checked by
/// [`TomlSource::cidr_list_file`], [`TomlSource::flannel_subnet_env`] and
/// [`TomlSource::settings`], called in the order their errors take.
pub struct TomlSource {
    spans: Spans,
    raw: RawFile,
    /// `node.pod_cidrs`, each with its line.
    pub pods: Vec<Origin>,
    /// `masquerade.cluster_cidrs`, then `masquerade.nonmasquerade_cidrs`, each with its line.
    pub exceptions: Vec<Origin>,
}

/// The keys of the configuration file that are not CIDRs or file names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `masquerade.bridge_interfaces`, checked, duplicates dropped.
    pub bridge_interfaces: Vec<String>,
    /// `masquerade.random_fully`.
    pub random_fully: bool,
    /// `masquerade.replace_default_rule`.
    pub replace_default_rule: bool,
    /// `masquerade.honor_marks` (absent: kube-proxy's bit).
    pub honor_marks: Vec<HonorMark>,
    /// `backend.mode` (absent: auto).
    pub mode: BackendMode,
    /// `daemon.resync_interval`.
    pub resync_interval: Option<Duration>,
    /// `daemon.full_verify_interval`.
    pub full_verify_interval: Option<Duration>,
    /// `metrics.listen`.
    pub metrics: Option<crate::metrics::MetricsConfig>,
}

/// Parses configuration text (pure: the files it names are not read). `path` is used in
/// messages and to resolve the relative paths the configuration names. Syntax, unknown keys,
/// wrong types and the inline CIDRs are checked here.
pub fn parse(path: &Path, text: &str) -> Result<TomlSource, ConfigError> {
    let text = strip_bom(text);
    let spans = Spans::new(path, text);
    let raw: RawFile = ::toml::from_str(text).map_err(|e| toml_error(&spans, text, &e))?;
    let (pods, exceptions) = inline_cidrs(&spans, &raw)?;
    Ok(TomlSource {
        spans,
        raw,
        pods,
        exceptions,
    })
}

impl TomlSource {
    /// The configuration file.
    pub fn path(&self) -> &Path {
        &self.spans.path
    }

    /// `masquerade.nonmasquerade_cidrs_file`, when set (an empty path is an error).
    pub fn cidr_list_file(&self) -> Result<Option<Named>, ConfigError> {
        self.named(&self.raw.masquerade.nonmasquerade_cidrs_file, LIST_KEY)
    }

    /// `node.flannel_subnet_env`, when set (an empty path is an error).
    pub fn flannel_subnet_env(&self) -> Result<Option<Named>, ConfigError> {
        self.named(&self.raw.node.flannel_subnet_env, ENV_KEY)
    }

    /// `node.ip_masq_agent_config`, when set (an empty path is an error).
    pub fn agent_config(&self) -> Result<Option<Named>, ConfigError> {
        self.named(&self.raw.node.ip_masq_agent_config, AGENT_KEY)
    }

    fn named(
        &self,
        spanned: &Option<Spanned<String>>,
        key: &'static str,
    ) -> Result<Option<Named>, ConfigError> {
        match spanned {
            None => Ok(None),
            Some(p) if p.get_ref().is_empty() => {
                Err(self
                    .spans
                    .err(Some(p.span()), Some(key), "the path is empty".to_string()))
            }
            Some(p) => Ok(Some(Named {
                path: resolve(&self.spans.path, p.get_ref()),
                key,
                at: format!(
                    "{}:{}",
                    self.spans.path.display(),
                    self.spans.line(p.span().start)
                ),
            })),
        }
    }

    /// The keys that are not CIDRs: bridge interfaces, honoured marks, backend mode, resync,
    /// metrics, checked in that order.
    pub fn settings(&self) -> Result<Settings, ConfigError> {
        let err = |span, key, m| self.spans.err(Some(span), Some(key), m);
        let mut bridge_interfaces = Vec::new();
        for item in &self.raw.masquerade.bridge_interfaces {
            validate_ifname(item.get_ref()).map_err(|m| {
                let m = format!("interface name {:?} {m}", item.get_ref());
                err(item.span(), "masquerade.bridge_interfaces", m)
            })?;
            if !bridge_interfaces.contains(item.get_ref()) {
                bridge_interfaces.push(item.get_ref().clone());
            }
        }
        let honor_marks = parse_honor_marks(&self.raw.masquerade.honor_marks)
            .map_err(|(span, m)| err(span, "masquerade.honor_marks", m))?;
        let mode = match &self.raw.backend.mode {
            None => BackendMode::Auto,
            Some(m) => parse_mode(m.get_ref()).map_err(|e| err(m.span(), "backend.mode", e))?,
        };
        let resync_interval = match &self.raw.daemon.resync_interval {
            None => None,
            Some(v) => Some(
                parse_duration(v.get_ref())
                    .map_err(|m| err(v.span(), "daemon.resync_interval", m))?,
            ),
        };
        let full_verify_interval = match &self.raw.daemon.full_verify_interval {
            None => None,
            Some(v) => Some(
                parse_duration(v.get_ref())
                    .map_err(|m| err(v.span(), "daemon.full_verify_interval", m))?,
            ),
        };
        let metrics = match &self.raw.metrics.listen {
            None => None,
            Some(v) => Some(crate::metrics::MetricsConfig {
                listen: crate::metrics::Listen::parse(v.get_ref())
                    .map_err(|m| err(v.span(), "metrics.listen", m))?,
                line: self.spans.line(v.span().start),
            }),
        };
        Ok(Settings {
            bridge_interfaces,
            random_fully: self.raw.masquerade.random_fully,
            replace_default_rule: self.raw.masquerade.replace_default_rule,
            honor_marks,
            mode,
            resync_interval,
            full_verify_interval,
            metrics,
        })
    }
}

/// `backend.mode`: `auto`, `nft` or `legacy`.
fn parse_mode(s: &str) -> Result<BackendMode, String> {
    match s {
        "auto" => Ok(BackendMode::Auto),
        "nft" => Ok(BackendMode::Nft),
        "legacy" => Ok(BackendMode::Legacy),
        other => Err(format!(
            "unknown backend mode {other:?}; expected \"auto\", \"nft\" or \"legacy\""
        )),
    }
}

/// The CIDRs written in the configuration itself: `node.pod_cidrs`, then the exceptions of
/// `masquerade.cluster_cidrs` and `masquerade.nonmasquerade_cidrs`, each with its line.
fn inline_cidrs(spans: &Spans, raw: &RawFile) -> Result<(Vec<Origin>, Vec<Origin>), ConfigError> {
    let file: Arc<Path> = Arc::from(spans.path.as_path());
    let origin = |item: &Spanned<String>, net: IpNet, key: &'static str| Origin {
        net,
        file: file.clone(),
        line: Some(spans.line(item.span().start)),
        key,
    };
    let err = |item: &Spanned<String>, key, m| spans.err(Some(item.span()), Some(key), m);

    let mut pods = Vec::new();
    for item in &raw.node.pod_cidrs {
        let key = "node.pod_cidrs";
        let net = parse_cidr(item.get_ref()).map_err(|m| err(item, key, m))?;
        if net.prefix_len() == 0 {
            let what = format!("{:?}", item.get_ref());
            return Err(err(item, key, pod_cover_message(&what)));
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
            let net = parse_cidr(item.get_ref()).map_err(|m| err(item, key, m))?;
            check_exception(&net, item.get_ref()).map_err(|m| err(item, key, m))?;
            exceptions.push(origin(item, net, key));
        }
    }
    Ok((pods, exceptions))
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

/// The TOML error as an operator reads it: an unknown key is called one (with the valid keys),
/// a value of the wrong type names its key, only a syntax error is "invalid TOML".
fn toml_error(spans: &Spans, text: &str, e: &::toml::de::Error) -> ConfigError {
    let msg = e.message().trim().lines().collect::<Vec<_>>().join("; ");
    let span = e.span();
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
    let mut err = spans.err(span, None, message);
    err.key = key;
    err
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A configuration path that does not exist: parsing never opens a file.
    const PATH: &str = "/nonexistent/masqd/masqd.toml";

    #[test]
    fn names_files_without_reading_them() {
        let t = parse(
            Path::new(PATH),
            "[node]\nflannel_subnet_env = \"subnet.env\"\n[masquerade]\n\
             cluster_cidrs = [\"10.96.0.0/12\"]\nnonmasquerade_cidrs_file = \"/nonexistent/x.list\"\n",
        )
        .unwrap();
        assert!(t.pods.is_empty());
        assert_eq!(t.exceptions.len(), 1);
        assert_eq!(t.exceptions[0].location(), format!("{PATH}:4"));
        assert_eq!(t.exceptions[0].key(), "masquerade.cluster_cidrs");
        let list = t.cidr_list_file().unwrap().unwrap();
        assert_eq!(list.path, PathBuf::from("/nonexistent/x.list"));
        assert_eq!(list.key, "masquerade.nonmasquerade_cidrs_file");
        assert_eq!(list.at, format!("{PATH}:5"));
        let env = t.flannel_subnet_env().unwrap().unwrap();
        assert_eq!(env.path, PathBuf::from("/nonexistent/masqd/subnet.env"));
        assert_eq!(env.key, "node.flannel_subnet_env");
        assert_eq!(env.at, format!("{PATH}:2"));
    }

    #[test]
    fn other_keys_are_checked_when_asked_for() {
        let t = parse(
            Path::new(PATH),
            "[node]\npod_cidrs = [\"10.1.0.0/24\"]\n[masquerade]\n\
             bridge_interfaces = [\"a b\"]\n[backend]\nmode = \"x\"\n",
        )
        .expect("the CIDRs are fine; the interface is checked by settings()");
        let e = t.settings().unwrap_err();
        assert_eq!(e.line, Some(4));
        assert_eq!(e.key.as_deref(), Some("masquerade.bridge_interfaces"));
        let t = parse(Path::new(PATH), "[node]\nflannel_subnet_env = \"\"\n").unwrap();
        let e = t.flannel_subnet_env().unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("{PATH}:2: node.flannel_subnet_env: the path is empty")
        );
        let s = parse(Path::new(PATH), "").unwrap().settings().unwrap();
        assert_eq!(
            s,
            Settings {
                bridge_interfaces: vec![],
                random_fully: false,
                replace_default_rule: true,
                honor_marks: vec![HonorMark {
                    value: 0x4000,
                    mask: 0x4000
                }],
                mode: BackendMode::Auto,
                resync_interval: None,
                full_verify_interval: None,
                metrics: None,
            }
        );
    }

    #[test]
    fn lines_are_counted_from_the_line_ends() {
        let s = Spans::new(Path::new(PATH), "a\nb\r\n\nc");
        // (offset, line) by hand: the '\n' ending a line is still on that line.
        for (offset, line) in [(0, 1), (1, 1), (2, 2), (4, 2), (5, 3), (6, 4), (99, 4)] {
            assert_eq!(s.line(offset), line, "offset {offset}");
        }
    }
}
