//! Configuration: owns [`Config`], its errors, and [`load`], the one place that reads files.
//!
//! Each input source has its own module with a pure `parse` of its text (no file I/O):
//! [`toml`](self::toml) for masqd.toml, [`flannel`] for flannel's `subnet.env`, [`list`] for
//! the CIDR list file; [`validate`] holds the checks they share. [`load`] reads the TOML, then
//! (in [`parse`], which takes the TOML's text already read) each file it names, and combines
//! what the sources gave into one validated [`Config`] ([`combine`], pure);
//! [`watch_paths`] says which files a daemon watches to notice a change.
//!
//! Every error names the file, the line (when there is one), the key and the offending value,
//! so an operator can fix it without reading code.
//!
//! Adding a source (e.g. the ip-masq-agent ConfigMap file): a module here with a pure
//! `parse(path, text)` and the error of a failed read; the key naming its file in the
//! [`toml`](self::toml) schema (a [`Named`] from [`toml::TomlSource`]); a field of [`Sources`]
//! filled by [`parse`] (read with [`read_bounded`], in the order its errors should come);
//! its contribution merged in [`combine`]; its path pushed by [`watch_paths`].

mod flannel;
mod incremental;
pub mod ip_masq_agent;
mod list;
mod source;
mod toml;
mod validate;

#[cfg(test)]
mod tests;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

pub use self::flannel::{parse_subnet_env, SubnetEnv};
pub use self::incremental::{ListBase, ListEdit, Loaded};
pub use self::list::parse_cidr_list;
pub use self::source::{load_agent_mode, Source, DEFAULT_FLANNEL_SUBNET_ENV};
use self::toml::TomlSource;
use self::validate::check_cover;
pub use self::validate::{parse_cidr, parse_duration, validate_ifname, DURATION_BOUNDS};

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
    /// `[daemon] resync_interval`, when set (default: 60 s).
    pub resync_interval: Option<Duration>,
    /// `[daemon] full_verify_interval`, when set: how often `masqd run` reads masqd's sets and
    /// every rule back even though the notifications say nothing changed (default: never).
    pub full_verify_interval: Option<Duration>,
    /// Where each pod CIDR came from (file and line), in order.
    pub pod_origins: Vec<Origin>,
    /// Where each exception CIDR (cluster and non-masquerade) came from, in order.
    pub exception_origins: Vec<Origin>,
    /// `[metrics] listen`, when set (metrics are off by default).
    pub metrics: Option<crate::metrics::MetricsConfig>,
    /// ip-masq-agent's configuration file (`[node] ip_masq_agent_config` or
    /// `--ip-masq-agent-config`), when used.
    pub ip_masq_agent_config: Option<PathBuf>,
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
    let r = read_bounded_once(path);
    incremental::record(path, &r);
    r
}

/// [`read_bounded`] without the record [`Loaded::load`] keeps of every read.
fn read_bounded_once(path: &Path) -> Result<String, ReadError> {
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
    load_toml(path, None)
}

pub(super) fn load_toml(path: &Path, agent: Option<&Path>) -> Result<Config, ConfigError> {
    let text = read_bounded(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        line: None,
        key: None,
        message: format!("cannot read the configuration file: {}", e.message),
        missing_file: false,
    })?;
    parse_with(path, &text, agent)
}

/// What the files the configuration names contributed, each parsed by its own module.
#[derive(Debug, Default)]
pub(super) struct Sources {
    /// `masquerade.nonmasquerade_cidrs_file` and its entries ([`list`]).
    list: Option<(Named, Vec<Origin>)>,
    /// `node.flannel_subnet_env` and what it gave ([`flannel`]).
    flannel: Option<(Named, SubnetEnv)>,
    /// `node.ip_masq_agent_config` and what it gave ([`ip_masq_agent`]).
    agent: Option<(Named, ip_masq_agent::AgentConfig)>,
}

/// [`load`] of configuration text already read: `path` is used in messages and to resolve the
/// relative paths the configuration names (against the file's directory); the files it names
/// are read here, the CIDR list first, then flannel's subnet.env.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    parse_with(path, text, None)
}

/// [`parse`], with ip-masq-agent's file given on the command line instead of (or in the absence
/// of) `[node] ip_masq_agent_config`.
fn parse_with(path: &Path, text: &str, agent: Option<&Path>) -> Result<Config, ConfigError> {
    let mut toml = self::toml::parse(path, text)?;
    let mut sources = Sources::default();
    if let Some(named) = toml.cidr_list_file()? {
        let text = read_bounded(&named.path).map_err(|e| list::read_error(&named, &e))?;
        let entries = list::parse(&named, &text)?;
        sources.list = Some((named, entries));
    }
    if let Some(named) = toml.flannel_subnet_env()? {
        let env = load_subnet_env(&named.path).map_err(|e| named.blame(e))?;
        sources.flannel = Some((named, env));
    }
    let agent = match agent {
        Some(p) => Some(Named {
            path: p.to_path_buf(),
            key: "--ip-masq-agent-config",
            at: "command line".to_string(),
        }),
        None => toml.agent_config()?,
    };
    if let Some(named) = agent {
        let agent = load_agent_file(&named.path).map_err(|e| named.blame(e))?;
        sources.agent = Some((named, agent));
    }
    combine(&mut toml, sources)
}

/// Reads ip-masq-agent's file ([`ip_masq_agent::load`]: absent is the upstream defaults) and
/// warns about each key upstream does not read.
pub(super) fn load_agent_file(path: &Path) -> Result<ip_masq_agent::AgentConfig, ConfigError> {
    let agent = ip_masq_agent::load(path)?;
    for k in &agent.unknown_keys {
        tracing::warn!(
            "{}: unknown key {k:?} ignored (ip-masq-agent reads {})",
            path.display(),
            "nonMasqueradeCIDRs, cidrLimit, masqLinkLocal, masqLinkLocalIPv6, resyncInterval"
        );
    }
    Ok(agent)
}

/// Reads flannel's `subnet.env` (shell assignments; see [`parse_subnet_env`]) and logs its
/// warnings.
pub fn load_subnet_env(path: &Path) -> Result<SubnetEnv, ConfigError> {
    let text = read_bounded(path).map_err(|e| flannel::read_error(path, &e))?;
    let env = parse_subnet_env(path, &text)?;
    for w in &env.warnings {
        tracing::warn!("{w}");
    }
    Ok(env)
}

/// The keys whose CIDRs make [`Config::cluster_cidrs`].
const CLUSTER_KEYS: [&str; 3] = [
    "masquerade.cluster_cidrs",
    "FLANNEL_NETWORK",
    "FLANNEL_IPV6_NETWORK",
];

/// The keys whose CIDRs make [`Config::nonmasquerade_cidrs`].
const NONMASQUERADE_KEYS: [&str; 4] = [
    "masquerade.nonmasquerade_cidrs",
    toml::LIST_KEY,
    ip_masq_agent::CIDR_KEY,
    ip_masq_agent::LINK_LOCAL_KEY,
];

/// Pure: merges the TOML's own values with what the named files gave, then checks the whole
/// (a pod CIDR exists, neither set covers a family) and the TOML's other keys, in that order.
pub(super) fn combine(toml: &mut TomlSource, sources: Sources) -> Result<Config, ConfigError> {
    let path = toml.path().to_path_buf();
    let mut pods = std::mem::take(&mut toml.pods);
    let mut exceptions = std::mem::take(&mut toml.exceptions);
    let list_file = sources.list.map(|(named, entries)| {
        exceptions.extend(entries);
        named.path
    });
    let flannel_subnet_env = sources.flannel.map(|(named, env)| {
        pods.extend(env.subnet_origins);
        exceptions.extend(env.network_origins);
        named.path
    });
    let mut agent_resync = None;
    let agent_file = sources.agent.map(|(named, agent)| {
        exceptions.extend(agent.origins(&named.path));
        agent_resync = agent.resync_given.then_some(agent.resync_interval);
        named.path
    });
    if pods.is_empty() {
        return Err(ConfigError {
            file: path,
            line: None,
            key: Some("node.pod_cidrs".to_string()),
            message: "no pod CIDR for this node: set [node] pod_cidrs or [node] flannel_subnet_env"
                .to_string(),
            missing_file: false,
        });
    }
    check_cover(&path, &pods, true)?;
    check_cover(&path, &exceptions, false)?;
    let split = |v: &[Origin], keys: &[&str]| -> Vec<IpNet> {
        v.iter()
            .filter(|o| keys.contains(&o.key))
            .map(|o| o.net)
            .collect()
    };
    let s = toml.settings()?;
    Ok(Config {
        pod_cidrs: pods.iter().map(|o| o.net).collect(),
        cluster_cidrs: split(&exceptions, &CLUSTER_KEYS),
        nonmasquerade_cidrs: split(&exceptions, &NONMASQUERADE_KEYS),
        nonmasquerade_cidrs_file: list_file,
        bridge_interfaces: s.bridge_interfaces,
        random_fully: s.random_fully,
        replace_default_rule: s.replace_default_rule,
        honor_marks: s.honor_marks,
        mode: s.mode,
        flannel_subnet_env,
        resync_interval: s.resync_interval.or(agent_resync),
        full_verify_interval: s.full_verify_interval,
        pod_origins: pods,
        exception_origins: exceptions,
        metrics: s.metrics,
        ip_masq_agent_config: agent_file,
        path,
    })
}

/// The files a daemon watches for `cfg`, read from `config_path`: the configuration file
/// itself, then each file it names (flannel's subnet.env, then the CIDR list), when set.
pub fn watch_paths(config_path: &Path, cfg: &Config) -> Vec<PathBuf> {
    let mut v = vec![config_path.to_path_buf()];
    v.extend(cfg.flannel_subnet_env.iter().cloned());
    v.extend(cfg.nonmasquerade_cidrs_file.iter().cloned());
    if let Some(p) = &cfg.ip_masq_agent_config {
        if !v.contains(p) {
            v.push(p.clone());
        }
    }
    v
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

/// A file the configuration names: where it is (resolved), the key naming it and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Named {
    /// The file, resolved against the configuration's directory.
    path: PathBuf,
    /// The key that names it (`masquerade.nonmasquerade_cidrs_file`, …).
    key: &'static str,
    /// `config:line` of that key.
    at: String,
}

impl Named {
    /// An error in the named file, told with the key that named it and where.
    fn blame(&self, mut e: ConfigError) -> ConfigError {
        let var = e.key.take();
        e.key = Some(match var {
            Some(v) => format!("{v} (in the file of {}, {})", self.key, self.at),
            None => format!("{} ({})", self.key, self.at),
        });
        e
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
