//! `masqd teardown`: the recorded default rules put back, then masqd's own objects removed
//! from every backend (design.md §5).

use anyhow::{anyhow, Result};
use serde::Serialize;

use super::{Paths, RecordedRule};
use crate::backend::{Driver, LegacyDriver, NftDriver, Restored};
use crate::state::{RemovedRule, State};

/// What `masqd teardown` did, rule by rule.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TeardownReport {
    /// The recorded default rules put back.
    pub restored: Vec<RecordedRule>,
    /// Recorded default rules present already (their owner re-inserted them): not added twice,
    /// their records dropped.
    pub already_present: Vec<RecordedRule>,
    /// masqd's own objects removed (`table inet masqd`, a legacy chain and its jump).
    pub removed: Vec<String>,
    /// The state directory held no record, so nothing was put back (a record lost with the
    /// directory cannot be restored).
    pub no_record: bool,
}

/// Puts the recorded default rules back, then removes masqd's objects from both backends
/// (design.md §5), so that at no moment neither masqd's policy nor the restored rule is in
/// place. Returns what it put back and removed.
///
/// 1. Every record is checked before it is replayed (it must still decode as a broad masquerade
///    rule for its source CIDR); nftables records go back in one transaction that recreates a
///    missing `ip`/`ip6 nat` table or `POSTROUTING` chain, legacy ones in one
///    `iptables-legacy-restore` per family. Nothing of masqd's is removed yet.
/// 2. Where a record cannot be put back, teardown says so naming the rule, keeps the record and
///    stops: masqd's policy stays in place.
/// 3. Otherwise masqd's legacy chains and jumps go, then its nftables table; it succeeds only
///    when nothing of masqd's is left.
///
/// Holds the state lock throughout: refused while `masqd run` holds the state directory.
pub fn teardown(paths: &Paths) -> Result<TeardownReport> {
    let state = State::new(&paths.state_dir);
    let _lock = state.lock_command("teardown")?;
    state.load()?;
    let mut nft = NftDriver::open()?;
    nft.probe()?;
    let mut legacy = LegacyDriver::default();
    teardown_with(&state, &mut [&mut nft, &mut legacy])
}

/// Teardown over drivers, in restore order; their own objects are removed in the reverse
/// order (legacy chains before the nftables table), then each checks that nothing is left.
/// The caller holds the state lock.
pub fn teardown_with(state: &State, drivers: &mut [&mut dyn Driver]) -> Result<TeardownReport> {
    let records = state.load()?;
    let mut report = TeardownReport {
        no_record: records.is_empty(),
        ..Default::default()
    };
    let mut kept = Vec::new();
    let mut problems = Vec::new();
    for d in drivers.iter_mut() {
        let Restored {
            restored,
            already_present,
            problems: failed,
        } = d.restore(&records);
        report
            .restored
            .extend(restored.iter().map(RecordedRule::of));
        report
            .already_present
            .extend(already_present.iter().map(RecordedRule::of));
        for (r, why) in failed {
            problems.push(format!("{}: {why}", r.description));
            kept.push(r);
        }
    }
    for r in records.iter().filter(|r| r.backend.known().is_none()) {
        problems.push(unknown_backend(r));
        kept.push(r.clone());
    }
    state.store(&kept)?;
    if !problems.is_empty() {
        return Err(anyhow!(
            "{} recorded rule(s) could not be put back, so masqd's policy stays in place and \
             the records stay in {}:\n  {}",
            problems.len(),
            state.path().display(),
            problems.join("\n  ")
        ));
    }
    for d in drivers.iter_mut().rev() {
        report.removed.extend(d.remove_own()?);
    }
    for d in drivers.iter_mut() {
        d.check_removed()?;
    }
    Ok(report)
}

/// The problem line of a record naming a backend this masqd does not know.
fn unknown_backend(r: &RemovedRule) -> String {
    format!(
        "{}: unknown backend {:?}",
        r.description,
        r.backend.as_str()
    )
}
