//! The one-shot pipeline: config → policy → observe → plan → apply, with the records of §5.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::backend::nft::{self, netlink::Socket, netlink::ERESTART};
use crate::config::{self, BackendMode, Config, ConfigError};
use crate::plan::{self, Change, Observed};
use crate::policy::Policy;
use crate::state::State;

/// Paths every command takes.
#[derive(Debug, Clone)]
pub struct Paths {
    /// Configuration file.
    pub config: PathBuf,
    /// State directory.
    pub state_dir: PathBuf,
}

/// Loads and validates the configuration and derives the policy.
pub fn load(path: &Path) -> Result<(Config, Policy), ConfigError> {
    let cfg = config::load(path)?;
    if cfg.mode == BackendMode::Legacy {
        return Err(ConfigError {
            file: cfg.path.clone(),
            line: None,
            key: Some("backend.mode".into()),
            message: "\"legacy\" is not available in this version of masqd (only nftables is); \
                      use \"nft\" or \"auto\""
                .into(),
        });
    }
    let policy = Policy::from_config(&cfg);
    Ok((cfg, policy))
}

/// Observes the kernel and plans. Equals `nft -j list ruleset` followed by a diff.
pub fn observe_and_plan(sock: &mut Socket, policy: &Policy) -> Result<(Observed, Vec<Change>)> {
    let observed = nft::observe(sock).context("reading the nftables ruleset")?;
    let changes = plan::plan(policy, &observed);
    Ok((observed, changes))
}

/// Makes the kernel match the policy. Returns the changes applied (empty when in sync).
/// The default rules about to be removed are recorded in the state directory first, so a crash
/// never loses one. A transaction refused because the ruleset changed underneath (generation
/// mismatch) is re-planned, at most 5 times.
pub fn apply(paths: &Paths, policy: &Policy) -> Result<Vec<Change>> {
    let state = State::new(&paths.state_dir);
    let mut sock = Socket::open().context("opening netlink")?;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let (observed, changes) = observe_and_plan(&mut sock, policy)?;
        if changes.is_empty() {
            return Ok(changes);
        }
        let records: Vec<_> = changes
            .iter()
            .filter_map(|c| match c {
                Change::RemoveDefaultRule(r) => Some(nft::record_of(r)),
                _ => None,
            })
            .collect();
        if !records.is_empty() {
            state
                .record(&records)
                .context("recording the default rules before removing them")?;
        }
        match nft::apply(&mut sock, &changes, Some(observed.genid)) {
            Ok(()) => return Ok(changes),
            Err(e) if e.errno() == Some(ERESTART) && attempt < 5 => {
                tracing::info!("ruleset changed while planning; planning again");
                continue;
            }
            Err(e) => return Err(e).context("applying the changes"),
        }
    }
}

/// What `masqd status` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Backend in use.
    pub backend: String,
    /// Whether the kernel matches the policy.
    pub in_sync: bool,
    /// Number of pending changes.
    pub pending_changes: usize,
    /// Whether `table inet masqd` exists.
    pub table_present: bool,
    /// Intervals per set (as read from the kernel).
    pub sets: BTreeMap<String, usize>,
    /// Packets counted by the masquerade rules.
    pub masqueraded_packets: u64,
    /// Packets counted by the exception rules.
    pub excepted_packets: u64,
    /// Broad default rules for the pod CIDRs still present.
    pub default_rules_present: usize,
}

/// Reads the status.
pub fn status(policy: &Policy) -> Result<Status> {
    let mut sock = Socket::open().context("opening netlink")?;
    let (observed, changes) = observe_and_plan(&mut sock, policy)?;
    let mut st = Status {
        backend: "nft".into(),
        in_sync: changes.is_empty(),
        pending_changes: changes.len(),
        table_present: observed.table.is_some(),
        sets: BTreeMap::new(),
        masqueraded_packets: 0,
        excepted_packets: 0,
        default_rules_present: plan::default_rules_to_remove(policy, &observed.foreign).len(),
    };
    if let Some(t) = &observed.table {
        for (name, s) in &t.sets {
            st.sets
                .insert(name.clone(), s.ranges.as_ref().map_or(0, Vec::len));
        }
        if let Some(ch) = &t.chain {
            for r in &ch.rules {
                let c = r.comment.as_deref().unwrap_or_default();
                let p = r.packets.unwrap_or(0);
                if c.starts_with("masqd:masquerade:") {
                    st.masqueraded_packets += p;
                } else if c.starts_with("masqd:except:") {
                    st.excepted_packets += p;
                }
            }
        }
    }
    Ok(st)
}

/// Removes masqd's table and restores the recorded default rules. Returns how many rules were
/// put back.
pub fn teardown(paths: &Paths) -> Result<usize> {
    let state = State::new(&paths.state_dir);
    let records = state.load()?;
    let mut sock = Socket::open().context("opening netlink")?;
    let mut attempt = 0;
    let restored = loop {
        attempt += 1;
        match nft::teardown(&mut sock, &records) {
            Ok(n) => break n,
            Err(e)
                if attempt < 5
                    && e.downcast_ref::<nft::netlink::NlError>()
                        .and_then(|n| n.errno())
                        == Some(ERESTART) =>
            {
                continue
            }
            Err(e) => return Err(e).context("tearing down"),
        }
    };
    let left: Vec<_> = records.into_iter().filter(|r| r.backend != "nft").collect();
    state.store(&left)?;
    if !left.is_empty() {
        bail!("some records are of a backend this version cannot restore");
    }
    Ok(restored)
}
