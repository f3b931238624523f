//! Metrics and health of `masqd run`, off by default: `[metrics] listen = "127.0.0.1:9816"` (or
//! an absolute unix socket path) serves `/metrics` (Prometheus/OpenMetrics text, encoded by the
//! `prometheus-client` crate) and `/healthz`.
//!
//! The HTTP side is a minimal hand-written HTTP/1.1 responder on one thread of its own (no
//! HTTP crate): it reads one request head (at most 8 KiB, 5 s), answers `GET`/`HEAD` of the two
//! paths with `Connection: close`, and serves connections one at a time. Its clients are a
//! Prometheus server and curl on the loopback (the shipped unit allows nothing else), so there
//! is no keep-alive, no chunking and no concurrency to get wrong.
//!
//! A scrape never dumps a set. It serves the values the daemon keeps after each reconcile,
//! plus at most one small dump of masqd's own chain (`nft -a list chain inet masqd
//! postrouting`, a handful of rules) for fresh connection counters when the chain is in
//! nftables. Legacy xtables counters are read by the reconciles only (their resync interval is
//! 5 s). `masqd_overridden_rules` needs every NAT rule of the node, so it is refreshed by the
//! start-up, resync and reload reconciles only, never per nftables change or per scrape.
//!
//! Counters never go down while the daemon runs: each kernel counter is followed with a
//! running base (when it drops below the last value seen, or its rule is rebuilt, the last
//! value seen is added to the base), so a deleted and rebuilt table loses no count.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family as MetricFamily;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::backend::nft::{self, netlink::Socket};
use crate::config::Config;
use crate::engine::Plan;
use crate::plan::{Change, RuleSpec};
use crate::policy::{Family, Policy};

/// Longest unix socket path (`sun_path` is 108 bytes with its NUL).
const SUN_PATH_MAX: usize = 107;
/// The causes of `masqd_repairs_total`.
pub const CAUSES: [&str; 5] = [
    "table_gone",
    "rule_changed",
    "elements_changed",
    "broad_rule_readded",
    "legacy_drift",
];
const NFPROTO_INET: u8 = 1;

/// Where the metrics are served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A TCP address and port.
    Tcp(SocketAddr),
    /// An absolute unix socket path.
    Unix(PathBuf),
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Tcp(a) => write!(f, "{a}"),
            Listen::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

impl Listen {
    /// Parses `ADDRESS:PORT` (`127.0.0.1:9816`, `[::1]:9816`; port 1–65535) or an absolute unix
    /// socket path. Host names are refused: the unit allows the loopback addresses only.
    pub fn parse(s: &str) -> Result<Listen, String> {
        if s.starts_with('/') {
            if s.len() > SUN_PATH_MAX || s.ends_with('/') || s.contains('\0') {
                return Err(format!(
                    "{s:?} is not a usable unix socket path (a file path of at most \
                     {SUN_PATH_MAX} bytes)"
                ));
            }
            return Ok(Listen::Unix(PathBuf::from(s)));
        }
        match s.parse::<SocketAddr>() {
            Ok(a) if a.port() == 0 => Err(format!(
                "{s:?}: port 0 would listen on a random port; give one (masqd's is 9816)"
            )),
            Ok(a) => Ok(Listen::Tcp(a)),
            Err(_) => Err(format!(
                "{s:?} is neither ADDRESS:PORT (e.g. \"127.0.0.1:9816\" or \"[::1]:9816\") \
                 nor an absolute unix socket path"
            )),
        }
    }
}

/// `[metrics]` of the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    /// `metrics.listen`.
    pub listen: Listen,
    /// Its line in the configuration file (for messages).
    pub line: usize,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabel {
    cause: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SetLabels {
    ip_family: String,
    set: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnLabels {
    ip_family: String,
    verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TableLabel {
    table: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
    backend: String,
}

/// A kernel counter followed with a running base, so that its total never goes down.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Running {
    base: u64,
    last: u64,
    handle: Option<u64>,
    genid: u32,
}

impl Running {
    /// A reading of the counter: `value` of the rule `handle`, read at ruleset generation
    /// `genid` (0 where there is none: legacy). A reading older than the last one is ignored;
    /// a drop or another rule adds the last value to the base.
    pub fn observe(&mut self, handle: Option<u64>, value: u64, genid: u32) {
        if genid < self.genid {
            return;
        }
        // The same rule at the same generation never counts down: a lower value is a reading
        // taken earlier and handed over later (a reconcile's, after a scrape's). Keep the max.
        let same_rule = handle.is_some() && handle == self.handle && genid == self.genid;
        if same_rule && value < self.last {
            return;
        }
        if value < self.last || (self.handle.is_some() && handle != self.handle) {
            self.base = self.base.saturating_add(self.last);
        }
        self.last = value;
        self.handle = handle;
        self.genid = genid;
    }

    /// The rule was rebuilt (counter at 0) by the commit that made generation `genid`; a
    /// reading at that generation or later already accounted for it.
    pub fn rebuilt(&mut self, genid: u32) {
        if self.genid < genid {
            self.base = self.base.saturating_add(self.last);
            self.last = 0;
            self.handle = None;
            self.genid = genid;
        }
    }

    /// Connections counted since the daemon started following the counter.
    pub fn total(&self) -> u64 {
        self.base.saturating_add(self.last)
    }
}

/// Where a connection counter comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Source {
    Nft,
    Legacy,
}

type ConnKey = (Family, &'static str, Source);

/// What the daemon keeps between reconciles, for scrapes and `/healthz`.
#[derive(Debug, Default)]
struct Inner {
    conns: BTreeMap<ConnKey, Running>,
    families: Vec<Family>,
    /// masqd's chain lives in nftables (a scrape may dump it).
    nft_chain: bool,
    last_ok: Option<Instant>,
    last_error: Option<String>,
    resync: Duration,
    backend: String,
}

/// The metrics of one daemon (they outlive listener changes at reload).
pub struct Metrics {
    registry: Registry,
    sync_duration: Histogram,
    sync_last: Gauge<f64, AtomicU64>,
    sync_failures: Counter,
    repairs: MetricFamily<CauseLabel, Counter>,
    set_elements: MetricFamily<SetLabels, Gauge>,
    connections: MetricFamily<ConnLabels, Counter>,
    overridden: MetricFamily<TableLabel, Gauge>,
    build_info: MetricFamily<BuildLabels, Gauge>,
    inner: Mutex<Inner>,
}

/// One finished reconcile, as the metrics see it.
pub struct Reconciled<'a> {
    /// The plan applied, or the error.
    pub result: Result<&'a Plan, String>,
    /// How long it took.
    pub took: Duration,
    /// Whether it repaired drift (not start-up, not a configuration change).
    pub repair: bool,
    /// The policy it applied.
    pub policy: &'a Policy,
    /// The resync interval now in force.
    pub resync: Duration,
    /// The backend name after it (`nft`, `legacy`, `ipv4:legacy ipv6:nft`).
    pub backend: &'a str,
}

impl Metrics {
    /// Registers every family (the `cause` labels at 0, so a rise is visible from the start).
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::default();
        let m = Metrics {
            sync_duration: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            sync_last: Gauge::default(),
            sync_failures: Counter::default(),
            repairs: MetricFamily::default(),
            set_elements: MetricFamily::default(),
            connections: MetricFamily::default(),
            overridden: MetricFamily::default(),
            build_info: MetricFamily::default(),
            inner: Mutex::new(Inner {
                backend: "undecided".into(),
                ..Inner::default()
            }),
            registry: Registry::default(),
        };
        registry.register(
            "masqd_sync_duration_seconds",
            "How long a reconcile (observe, plan, apply) took",
            m.sync_duration.clone(),
        );
        registry.register(
            "masqd_sync_last_timestamp_seconds",
            "When the last successful reconcile ended (Unix time)",
            m.sync_last.clone(),
        );
        registry.register(
            "masqd_sync_failures",
            "Reconciles that failed",
            m.sync_failures.clone(),
        );
        registry.register(
            "masqd_repairs",
            "Reconciles that repaired drift, by what had drifted",
            m.repairs.clone(),
        );
        registry.register(
            "masqd_set_elements",
            "Intervals in masqd's sets after the last successful reconcile",
            m.set_elements.clone(),
        );
        registry.register(
            "masqd_connections",
            "New connections from pod sources by verdict (the NAT chains see a connection's \
             first packet only)",
            m.connections.clone(),
        );
        registry.register(
            "masqd_overridden_rules",
            "Other components' source NAT rules that masqd's guard overrides for excepted \
             traffic, by table",
            m.overridden.clone(),
        );
        registry.register(
            "masqd_build_info",
            "masqd's version and the backend in use",
            m.build_info.clone(),
        );
        for cause in CAUSES {
            m.repairs
                .get_or_create(&CauseLabel {
                    cause: cause.into(),
                })
                .inc_by(0);
        }
        let mut m = m;
        m.registry = registry;
        m.set_build_info("undecided");
        Arc::new(m)
    }

    fn set_build_info(&self, backend: &str) {
        self.build_info.clear();
        self.build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").into(),
                backend: backend.into(),
            })
            .set(1);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes in a finished reconcile: timings, failures, repairs by cause, set sizes, the
    /// counters its observation read, and the rebuilt rules' fresh counters.
    pub fn reconciled(&self, r: &Reconciled<'_>) {
        self.sync_duration.observe(r.took.as_secs_f64());
        let mut inner = self.lock();
        inner.resync = r.resync;
        let p = match &r.result {
            Err(e) => {
                self.sync_failures.inc();
                inner.last_error = Some(e.clone());
                return;
            }
            Ok(p) => p,
        };
        inner.last_error = None;
        inner.last_ok = Some(Instant::now());
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.sync_last.set(now);
        if r.repair {
            for cause in repair_causes(p) {
                self.repairs
                    .get_or_create(&CauseLabel {
                        cause: cause.into(),
                    })
                    .inc();
            }
        }
        if inner.backend != r.backend {
            inner.backend = r.backend.to_string();
            self.set_build_info(r.backend);
        }
        self.set_elements.clear();
        inner.families.clear();
        for f in Family::ALL {
            let Some(fp) = r.policy.family(f) else {
                continue;
            };
            inner.families.push(f);
            for (set, n) in [
                (crate::plan::pod_set(f), fp.pod.len()),
                (crate::plan::nomasq_set(f), fp.nomasq.len()),
            ] {
                let labels = SetLabels {
                    ip_family: f.to_string(),
                    set,
                };
                self.set_elements
                    .get_or_create(&labels)
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
        inner.nft_chain = p.detection.ipv4.has_guard() && p.detection.ipv6.has_guard();
        observe_plan(&mut inner, p);
        self.export_connections(&inner);
    }

    /// Sets `masqd_overridden_rules` from the other NAT rules of the node (a dump of every
    /// rule: `nft -a list ruleset` plus the plan's `iptables-legacy-save -t nat`; see
    /// [`Plan::overridden`]). Called from the reconcile's thread, after a successful apply.
    pub fn refresh_overridden(&self, p: &Plan, policy: &Policy, sock: &mut Socket) {
        let list = match p.overridden(policy, sock) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("metrics: reading the other NAT rules: {e:#}");
                return;
            }
        };
        let mut per_table: BTreeMap<String, BTreeSet<(String, String, u64)>> = BTreeMap::new();
        for o in list
            .iter()
            .filter(|o| o.reason.starts_with("overridden by"))
        {
            let table = if o.backend == "legacy" {
                format!("legacy {}", o.table)
            } else {
                o.table.clone()
            };
            per_table.entry(table).or_default().insert((
                o.table.clone(),
                o.chain.clone(),
                o.handle,
            ));
        }
        self.overridden.clear();
        for (table, rules) in per_table {
            self.overridden
                .get_or_create(&TableLabel { table })
                .set(i64::try_from(rules.len()).unwrap_or(i64::MAX));
        }
    }

    /// Raises `masqd_connections_total` to the running totals (never lowers it).
    fn export_connections(&self, inner: &Inner) {
        for f in &inner.families {
            for verdict in ["kept", "masqueraded"] {
                let total: u64 = inner
                    .conns
                    .iter()
                    .filter(|((kf, kv, _), _)| kf == f && *kv == verdict)
                    .map(|(_, r)| r.total())
                    .sum();
                let c = self.connections.get_or_create(&ConnLabels {
                    ip_family: f.to_string(),
                    verdict: verdict.into(),
                });
                let have = c.get();
                if total > have {
                    c.inc_by(total - have);
                }
            }
        }
    }

    /// The `/metrics` body. Reads masqd's own chain first when it is in nftables (a few rules:
    /// `nft -a list chain inet masqd postrouting`, then the generation); sets are never read.
    pub fn render(&self) -> String {
        if self.lock().nft_chain {
            match read_own_chain() {
                Ok((rules, genid)) => {
                    let mut inner = self.lock();
                    observe_nft_rules(&mut inner, &rules, genid);
                    self.export_connections(&inner);
                }
                Err(e) => tracing::debug!("metrics: reading masqd's chain: {e:#}"),
            }
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!("metrics: encoding: {e}");
        }
        out
    }

    /// `Ok` while the last reconcile succeeded and the kernel matched within the last resync
    /// interval (plus 10 s for the reconcile itself); otherwise the one-line reason.
    pub fn health(&self) -> Result<(), String> {
        let inner = self.lock();
        let grace = Duration::from_secs(10);
        if let Some(e) = &inner.last_error {
            return Err(format!("the last reconcile failed: {e}"));
        }
        match inner.last_ok {
            None => Err("no reconcile has finished yet".into()),
            Some(t) if t.elapsed() > inner.resync + grace => Err(format!(
                "the last successful reconcile was {}s ago, more than the resync interval ({}s)",
                t.elapsed().as_secs(),
                inner.resync.as_secs()
            )),
            Some(_) => Ok(()),
        }
    }
}

/// The repair causes of an applied plan: the table was gone (everything else follows from
/// that), masqd's chain or rules changed, its set elements changed, a broad default rule was
/// re-added (and removed again), its legacy chain or jump drifted.
pub fn repair_causes(p: &Plan) -> BTreeSet<&'static str> {
    let mut out = BTreeSet::new();
    for c in &p.nft {
        out.insert(match c {
            Change::AddTable => "table_gone",
            Change::AddElements { .. } | Change::DeleteElements { .. } => "elements_changed",
            Change::RemoveDefaultRule(_) => "broad_rule_readded",
            _ => "rule_changed",
        });
    }
    for (_, lp) in &p.legacy {
        if !lp.removed_defaults.is_empty() {
            out.insert("broad_rule_readded");
        }
        if lp.summary.iter().any(|s| !s.ends_with("(default rule)")) {
            out.insert("legacy_drift");
        }
    }
    if out.contains("table_gone") {
        out.retain(|c| *c == "table_gone" || *c == "broad_rule_readded" || *c == "legacy_drift");
    }
    out
}

/// Reads masqd's chain and then the generation. Equals
/// `nft -a list chain inet masqd postrouting` (a handful of rules, no set elements).
fn read_own_chain() -> anyhow::Result<(Vec<nft::KernelRule>, u32)> {
    let mut sock = Socket::open()?;
    let rules = nft::list_rules(
        &mut sock,
        NFPROTO_INET,
        crate::plan::TABLE,
        crate::plan::CHAIN,
    )?;
    // Read after the rules: a commit in between makes the reading look newer than it is, so a
    // rebuild reported by that commit is detected by the counter's drop instead of twice.
    let genid = nft::genid(&mut sock)?;
    Ok((rules, genid))
}

/// The verdict a rule of masqd's chain counts, from its tag.
fn verdict_of(comment: &str) -> Option<(Family, &'static str)> {
    let (verdict, rest) = if let Some(r) = comment.strip_prefix("masqd:guard:") {
        ("kept", r)
    } else if let Some(r) = comment.strip_prefix("masqd:masquerade:") {
        ("masqueraded", r)
    } else {
        return None;
    };
    match rest.chars().next() {
        Some('4') => Some((Family::V4, verdict)),
        Some('6') => Some((Family::V6, verdict)),
        _ => None,
    }
}

fn observe_nft_rules(inner: &mut Inner, rules: &[nft::KernelRule], genid: u32) {
    for r in rules {
        let Some((f, v)) = r.comment.as_deref().and_then(verdict_of) else {
            continue;
        };
        inner.conns.entry((f, v, Source::Nft)).or_default().observe(
            Some(r.handle),
            r.packets.unwrap_or(0),
            genid,
        );
    }
}

/// The counters a reconcile read (before its changes), then the rules it rebuilt.
fn observe_plan(inner: &mut Inner, p: &Plan) {
    if let Some(ch) = p.observed.table.as_ref().and_then(|t| t.chain.as_ref()) {
        for r in &ch.rules {
            let Some((f, v)) = r.comment.as_deref().and_then(verdict_of) else {
                continue;
            };
            inner.conns.entry((f, v, Source::Nft)).or_default().observe(
                Some(r.handle),
                r.packets.unwrap_or(0),
                p.observed.genid,
            );
        }
    }
    let committed = p.observed.genid.wrapping_add(1);
    for c in &p.nft {
        let (f, v) = match c {
            Change::AddRule(RuleSpec::Guard(f)) => (*f, "kept"),
            Change::AddRule(RuleSpec::Masquerade { family, .. }) => (*family, "masqueraded"),
            _ => continue,
        };
        inner
            .conns
            .entry((f, v, Source::Nft))
            .or_default()
            .rebuilt(committed);
    }
    for (f, lo) in &p.legacy_observed {
        let (mut masq, mut kept) = (0u64, 0u64);
        for (rule, n) in lo.chain_rules.iter().zip(&lo.chain_packets) {
            if rule.ends_with("-j MASQUERADE") || rule.contains("-j MASQUERADE ") {
                masq += n;
            } else if rule.contains(" -d ") && rule.ends_with("-j RETURN") {
                kept += n;
            }
        }
        for (v, n) in [("masqueraded", masq), ("kept", kept)] {
            inner
                .conns
                .entry((*f, v, Source::Legacy))
                .or_default()
                .observe(None, n, 0);
        }
    }
}

/// The metrics of a running daemon and their server, when `[metrics] listen` is set.
#[derive(Default)]
pub struct Exporter {
    on: Option<(Arc<Metrics>, Server, MetricsConfig)>,
}

impl Exporter {
    /// Starts serving when the configuration asks for it. The error (the address is in use,
    /// the socket path is taken) names the file, the line and the value.
    pub fn start(cfg: &Config) -> Result<Exporter, String> {
        let Some(mc) = &cfg.metrics else {
            return Ok(Exporter::default());
        };
        let m = Metrics::new();
        let server = Server::start(&cfg.path, mc, m.clone())?;
        Ok(Exporter {
            on: Some((m, server, mc.clone())),
        })
    }

    /// The metrics, when they are on.
    pub fn metrics(&self) -> Option<Arc<Metrics>> {
        self.on.as_ref().map(|(m, _, _)| m.clone())
    }

    /// At reload: follows a changed `metrics.listen` (the values carry over). When the new
    /// address cannot be bound, even after freeing the old one, the old one is kept and the
    /// error returned: the caller keeps the last good configuration.
    pub fn reconfigure(&mut self, cfg: &Config) -> Result<(), String> {
        let Some(mc) = &cfg.metrics else {
            if let Some((_, server, _)) = self.on.take() {
                server.stop();
                tracing::info!("metrics switched off");
            }
            return Ok(());
        };
        let Some((m, server, old)) = self.on.take() else {
            *self = Exporter::start(cfg)?;
            return Ok(());
        };
        if old.listen == mc.listen {
            self.on = Some((m, server, mc.clone()));
            return Ok(());
        }
        let e = match Server::start(&cfg.path, mc, m.clone()) {
            Ok(s) => {
                server.stop();
                self.on = Some((m, s, mc.clone()));
                return Ok(());
            }
            Err(e) => e,
        };
        if !same_port(&old.listen, &mc.listen) {
            self.on = Some((m, server, old));
            return Err(e);
        }
        // The new address overlaps the old one (the same port on another address): free the
        // old one first, and take it back if the new one still cannot be bound.
        server.stop();
        match Server::start(&cfg.path, mc, m.clone()) {
            Ok(s) => {
                self.on = Some((m, s, mc.clone()));
                Ok(())
            }
            Err(e) => {
                match Server::start(&cfg.path, &old, m.clone()) {
                    Ok(s) => self.on = Some((m, s, old)),
                    Err(e2) => {
                        tracing::error!("metrics: cannot listen on the old address again: {e2}")
                    }
                }
                Err(e)
            }
        }
    }
}

fn same_port(a: &Listen, b: &Listen) -> bool {
    matches!((a, b), (Listen::Tcp(x), Listen::Tcp(y)) if x.port() == y.port())
}

/// A listening socket of either kind.
enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    fn fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
        }
    }
}

/// Binds `listen`. A unix socket path that exists is taken over only when it is a stale
/// socket (nobody accepts on it); a live one is "in use", anything else is refused.
fn bind(listen: &Listen) -> std::io::Result<Listener> {
    match listen {
        Listen::Tcp(a) => TcpListener::bind(a).map(Listener::Tcp),
        Listen::Unix(p) => {
            use std::os::unix::fs::FileTypeExt;
            if let Ok(m) = std::fs::symlink_metadata(p) {
                if !m.file_type().is_socket() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        "the path exists and is not a socket",
                    ));
                }
                if UnixStream::connect(p).is_ok() {
                    return Err(std::io::Error::from(std::io::ErrorKind::AddrInUse));
                }
                std::fs::remove_file(p)?;
            }
            UnixListener::bind(p).map(|l| Listener::Unix(l, p.clone()))
        }
    }
}

/// The HTTP server: a thread accepting on the listener until [`Server::stop`].
pub struct Server {
    listen: Listen,
    fd: RawFd,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Binds `cfg.listen` and starts serving `metrics`. The error names the configuration
    /// file, the line and the value.
    pub fn start(
        config: &Path,
        cfg: &MetricsConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Server, String> {
        let l = bind(&cfg.listen).map_err(|e| {
            format!(
                "{}:{}: metrics.listen: cannot listen on \"{}\": {e}",
                config.display(),
                cfg.line,
                cfg.listen
            )
        })?;
        let fd = l.fd();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("masqd-metrics".into())
            .spawn(move || serve(l, &metrics, &stop2))
            .map_err(|e| format!("starting the metrics thread: {e}"))?;
        tracing::info!("serving /metrics and /healthz on {}", cfg.listen);
        Ok(Server {
            listen: cfg.listen.clone(),
            fd,
            stop,
            thread: Some(thread),
        })
    }

    /// Where it listens.
    pub fn listen(&self) -> &Listen {
        &self.listen
    }

    /// Stops accepting (`shutdown(2)` wakes the blocked `accept`), waits for the thread, and
    /// removes a unix socket.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        let Some(t) = self.thread.take() else { return };
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // SAFETY: the fd belongs to the listener the thread owns until it is joined below.
        unsafe {
            libc::shutdown(self.fd, libc::SHUT_RDWR);
        }
        let _ = t.join();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.halt();
    }
}

fn serve(l: Listener, metrics: &Metrics, stop: &std::sync::atomic::AtomicBool) {
    loop {
        let conn: std::io::Result<Box<dyn ReadWrite>> = match &l {
            Listener::Tcp(t) => t.accept().map(|(s, _)| {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
                Box::new(s) as Box<dyn ReadWrite>
            }),
            Listener::Unix(u, _) => u.accept().map(|(s, _)| {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
                Box::new(s) as Box<dyn ReadWrite>
            }),
        };
        if stop.load(std::sync::atomic::Ordering::SeqCst) {
            break;
        }
        match conn {
            Ok(mut s) => handle(&mut *s, metrics),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!("metrics: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    if let Listener::Unix(_, p) = &l {
        let _ = std::fs::remove_file(p);
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// Reads one request head and answers it.
fn handle(s: &mut dyn ReadWrite, metrics: &Metrics) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let (status, ctype, body, head_only) = respond(&head, metrics);
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    let _ = s.write_all(&out);
}

const TEXT: &str = "text/plain; charset=utf-8";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The Prometheus text format (0.0.4) of an OpenMetrics exposition: a counter's HELP and TYPE
/// name its `_total` samples, and there is no `# EOF` (what `promtool check metrics` and
/// clients that do not ask for OpenMetrics read).
pub fn prometheus_text(openmetrics: &str) -> String {
    let mut counters = BTreeSet::new();
    for l in openmetrics.lines() {
        if let Some(name) = l
            .strip_prefix("# TYPE ")
            .and_then(|r| r.strip_suffix(" counter"))
        {
            counters.insert(name.to_string());
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for l in openmetrics.lines() {
        if l == "# EOF" || l.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| l.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((p, rest)) => {
                let name = rest.split(' ').next().unwrap_or_default();
                if counters.contains(name) {
                    out.push_str(&format!("{p}{name}_total{}", &rest[name.len()..]));
                } else {
                    out.push_str(l);
                }
            }
            None => out.push_str(l),
        }
        out.push('\n');
    }
    out
}

/// Status line, content type, body, and whether to send the head only.
fn respond(head: &[u8], metrics: &Metrics) -> (&'static str, &'static str, String, bool) {
    let text = String::from_utf8_lossy(head);
    let mut words = text.lines().next().unwrap_or_default().split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or_default();
    let openmetrics = text.lines().any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.eq_ignore_ascii_case("accept") && v.contains("application/openmetrics-text")
        })
    });
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        let body = "only GET and HEAD\n".to_string();
        return ("405 Method Not Allowed", TEXT, body, false);
    }
    match path {
        "/metrics" if openmetrics => ("200 OK", OPENMETRICS, metrics.render(), head_only),
        "/metrics" => (
            "200 OK",
            PROMETHEUS_TEXT,
            prometheus_text(&metrics.render()),
            head_only,
        ),
        "/healthz" => match metrics.health() {
            Ok(()) => ("200 OK", TEXT, "ok\n".into(), head_only),
            Err(why) => (
                "503 Service Unavailable",
                TEXT,
                format!("{}\n", crate::systemd::one_line(&why)),
                head_only,
            ),
        },
        _ => (
            "404 Not Found",
            TEXT,
            "masqd serves /metrics and /healthz\n".into(),
            head_only,
        ),
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_stale_lower_reading_is_not_a_reset() {
        // A scrape reads 110; the reconcile that read 100 earlier hands its reading over later.
        let mut r = Running::default();
        r.observe(Some(7), 100, 5);
        r.observe(Some(7), 110, 5);
        r.observe(Some(7), 100, 5);
        assert_eq!(r.total(), 110);
        // A real reset: the rule was replaced (new handle) — the old count is kept.
        r.observe(Some(9), 3, 6);
        assert_eq!(r.total(), 113);
    }

    use super::*;

    #[test]
    fn listen_values() {
        assert_eq!(
            Listen::parse("127.0.0.1:9816"),
            Ok(Listen::Tcp("127.0.0.1:9816".parse().unwrap()))
        );
        assert!(matches!(Listen::parse("[::1]:9816"), Ok(Listen::Tcp(_))));
        assert_eq!(
            Listen::parse("/run/masqd/metrics.sock"),
            Ok(Listen::Unix("/run/masqd/metrics.sock".into()))
        );
        for bad in [
            "localhost:9816",
            "127.0.0.1",
            "9816",
            "run/metrics.sock",
            "127.0.0.1:0",
            "127.0.0.1:70000",
            "/run/masqd/",
            "",
        ] {
            assert!(Listen::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Listen::parse(&format!("/{}", "x".repeat(200))).is_err());
    }

    #[test]
    fn the_config_key_names_file_line_and_value() {
        let path = Path::new("/etc/masqd/masqd.toml");
        let base = "[node]\npod_cidrs = [\"10.1.0.0/24\"]\n";
        let c = crate::config::parse(path, base).unwrap();
        assert_eq!(c.metrics, None, "off by default");
        let on = format!("{base}[metrics]\nlisten = \"127.0.0.1:9816\"\n");
        let c = crate::config::parse(path, &on).unwrap();
        assert_eq!(
            c.metrics,
            Some(MetricsConfig {
                listen: Listen::Tcp("127.0.0.1:9816".parse().unwrap()),
                line: 4
            })
        );
        let bad = format!("{base}[metrics]\nlisten = \"localhost:9816\"\n");
        let e = crate::config::parse(path, &bad).unwrap_err().to_string();
        assert!(
            e.starts_with("/etc/masqd/masqd.toml:4: metrics.listen: \"localhost:9816\""),
            "{e}"
        );
        let unknown = format!("{base}[metrics]\nport = 9816\n");
        assert!(crate::config::parse(path, &unknown).is_err());
    }

    #[test]
    fn running_counters_never_go_down() {
        let mut r = Running::default();
        r.observe(Some(4), 10, 5);
        r.observe(Some(4), 12, 6);
        assert_eq!(r.total(), 12);
        // The table was deleted and rebuilt (same handle, counter from 0).
        r.observe(Some(4), 3, 9);
        assert_eq!(r.total(), 15);
        // A reading older than the last one changes nothing.
        r.observe(Some(4), 0, 8);
        assert_eq!(r.total(), 15);
        // Another rule (handle) with a higher count: a new instance all the same.
        r.observe(Some(7), 20, 10);
        assert_eq!(r.total(), 35);
        // Rebuilt by masqd's commit 11, then read at 11 or later: counted once.
        r.rebuilt(11);
        assert_eq!(r.total(), 35);
        r.observe(Some(2), 1, 11);
        assert_eq!(r.total(), 36);
        // A reading at the commit's generation came first: the rebuild report is not counted
        // again.
        let mut s = Running::default();
        s.observe(Some(4), 10, 5);
        s.observe(Some(4), 2, 6);
        s.rebuilt(6);
        assert_eq!(s.total(), 12);
    }

    #[test]
    fn verdicts_from_tags() {
        assert_eq!(verdict_of("masqd:guard:4"), Some((Family::V4, "kept")));
        assert_eq!(
            verdict_of("masqd:masquerade:6:fully-random"),
            Some((Family::V6, "masqueraded"))
        );
        assert_eq!(verdict_of("masqd:bridge:docker0"), None);
        assert_eq!(verdict_of("masqd:mark:0x4000/0x4000"), None);
    }

    #[test]
    fn health_and_families_before_any_reconcile() {
        let m = Metrics::new();
        assert_eq!(m.health(), Err("no reconcile has finished yet".to_string()));
        let text = m.render();
        for family in [
            "# TYPE masqd_sync_duration_seconds histogram",
            "masqd_sync_duration_seconds_bucket{le=\"0.001\"} 0",
            "# TYPE masqd_sync_failures counter",
            "masqd_repairs_total{cause=\"table_gone\"} 0",
            "masqd_build_info{version=\"",
        ] {
            assert!(text.contains(family), "{family} missing from:\n{text}");
        }
    }

    #[test]
    fn http_answers() {
        let m = Metrics::new();
        let (s, _, _, _) = respond(b"GET /healthz HTTP/1.1\r\n\r\n", &m);
        assert_eq!(s, "503 Service Unavailable");
        let (s, c, body, _) = respond(b"GET /metrics?x=1 HTTP/1.1\r\n\r\n", &m);
        assert_eq!((s, c), ("200 OK", PROMETHEUS_TEXT));
        assert!(
            body.contains("# TYPE masqd_sync_failures_total counter\n"),
            "{body}"
        );
        assert!(!body.contains("# EOF"));
        let om =
            b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text; version=1.0.0\r\n\r\n";
        let (s, c, body, _) = respond(om, &m);
        assert_eq!((s, c), ("200 OK", OPENMETRICS));
        assert!(body.ends_with("# EOF\n"));
        assert_eq!(
            respond(b"POST /metrics HTTP/1.1\r\n\r\n", &m).0,
            "405 Method Not Allowed"
        );
        assert_eq!(respond(b"GET / HTTP/1.1\r\n\r\n", &m).0, "404 Not Found");
        assert_eq!(respond(b"", &m).0, "405 Method Not Allowed");
        let (_, _, _, head_only) = respond(b"HEAD /metrics HTTP/1.1\r\n\r\n", &m);
        assert!(head_only);
    }
}
