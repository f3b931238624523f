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

//!
//! Files: this one holds the configuration's `[metrics]` and the [`Exporter`] the daemon
//! keeps; [`registry`] the metric families and what a reconcile or a scrape puts in them,
//! [`counters`] the running connection counters and the repair causes, [`kernel`] the reads
//! of the kernel a scrape or a reconcile makes for them, [`http`] the responder.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::config::Config;

pub mod counters;
pub mod http;
pub mod kernel;
pub mod registry;

#[cfg(test)]
mod tests;

pub use counters::{repair_causes, Running};
pub use http::{prometheus_text, Server};
pub use registry::{Metrics, Reconciled};

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

pub(crate) fn same_port(a: &Listen, b: &Listen) -> bool {
    matches!((a, b), (Listen::Tcp(x), Listen::Tcp(y)) if x.port() == y.port())
}
