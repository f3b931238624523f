//! The metric families of `masqd run` (registered once, encoded by `prometheus-client`) and
//! what a finished reconcile and a scrape put in them; `/healthz`'s answer.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family as MetricFamily;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::counters::{observe_chain, observe_plan, repair_causes, Inner};
use super::kernel::read_own_chain;
use super::CAUSES;
use crate::engine::Plan;
use crate::foreign::Overridden;
use crate::policy::{Family, Policy};

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
struct ObjectLabel {
    object: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
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
    config_ok: Gauge,
    config_failures: Counter,
    dumps: MetricFamily<ObjectLabel, Counter>,
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
    /// A reading of the configuration (start-up or reload) succeeded or was refused.
    pub fn config_read(&self, ok: bool) {
        self.config_ok.set(i64::from(ok));
        if !ok {
            self.config_failures.inc();
        }
    }

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
            config_ok: Gauge::default(),
            config_failures: Counter::default(),
            dumps: MetricFamily::default(),
            inner: Mutex::new(Inner {
                backend: "undecided".into(),
                ..Inner::default()
            }),
            registry: Registry::default(),
        };
        m.register_all(&mut registry);
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

    /// Registers every family with its name and help text.
    fn register_all(&self, registry: &mut Registry) {
        let m = self;
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
            "masqd_config_last_reload_successful",
            "Whether the last reading of the configuration succeeded (0: a broken file, the last \
             good policy stays in force)",
            m.config_ok.clone(),
        );
        registry.register(
            "masqd_config_reload_failures",
            "Readings of the configuration refused since start (the last good policy stayed)",
            m.config_failures.clone(),
        );
        registry.register(
            "masqd_netlink_dumps",
            "Dump requests the reconciles sent to nf_tables, by object (restarted dumps count \
             again): what following the event stream saves",
            m.dumps.clone(),
        );
        registry.register(
            "masqd_build_info",
            "masqd's version and the backend in use",
            m.build_info.clone(),
        );
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

    /// Takes in the reconciles' dump requests so far (`object`, count since their socket was
    /// opened; a fresh socket starts again from zero).
    pub fn dumps(&self, counts: &[(&str, u64)]) {
        for (object, n) in counts {
            let c = self.dumps.get_or_create(&ObjectLabel {
                object: (*object).into(),
            });
            let mut inner = self.lock();
            let last = inner.dumps.entry((*object).to_string()).or_default();
            c.inc_by(if *n >= *last { *n - *last } else { *n });
            *last = *n;
        }
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
            let [pod, nomasq] = crate::backend::set_names(f);
            for (set, n) in [(pod, fp.pod.len()), (nomasq, fp.nomasq.len())] {
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

    /// Sets `masqd_overridden_rules` from the other NAT rules of the node (`list`, as
    /// [`Plan::overridden`] reads them): the rules masqd's guard overrides, per table.
    pub fn set_overridden(&self, list: &[Overridden]) {
        let mut per_table: BTreeMap<String, BTreeSet<(String, String, u64)>> = BTreeMap::new();
        for o in list
            .iter()
            .filter(|o| o.reason.starts_with("overridden by"))
        {
            let table = if o.backend == crate::backend::Backend::Legacy {
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
                    observe_chain(&mut inner, &rules, genid);
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
