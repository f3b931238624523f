//! The driver interface (design.md §6, §7): what every firewall backend offers the engine —
//! facts for detection, observe, plan (pure), apply (one transaction), teardown, counters and
//! foreign NAT rules for status, export — and the set of drivers detection chooses.
//!
//! The interface is a trait ([`Driver`]) used as `Box<dyn Driver>`, not an enum over the
//! drivers: the engine's tests plug in the in-memory [`fake::FakeDriver`] (knftables' `Fake`)
//! next to the two real ones without the real ones knowing about it, and a third backend is
//! one more implementation. What a driver observes and plans stays typed per driver family
//! ([`Observation`], [`Changes`]): the nftables-speaking drivers (the kernel's and the fake)
//! share one transaction language, as knftables' `Fake` does.
//!
//! The legacy-mode guard of design.md §3.2 is a composition: a [`DriverSet`] holds the nft
//! driver with only the guard part of the policy behind the legacy driver holding the policy.
//! Native nftables lives in [`nft`] (its driver: [`nft::driver`]), legacy xtables in [`legacy`]
//! ([`legacy::driver`]). Which one a family uses is decided by [`crate::detect`].
pub mod counters;
pub mod fake;
pub mod legacy;
pub mod nft;
pub mod query;

use std::collections::BTreeMap;

use anyhow::Result;
use serde::{Deserialize, Serialize};

use crate::detect::Facts;
use crate::foreign::NatRule;
use crate::policy::{Family, Policy};
use crate::state::RemovedRule;

pub use crate::backend::nft::plan::{
    Change, ForeignRule, Observed, CHAIN, CHAIN_PRIORITY, CHAIN_PRIORITY_NFT, TABLE,
};
pub use crate::netlink::Socket;
pub use legacy::driver::LegacyDriver;
pub use legacy::{LegacyObserved, LegacyPlan};
pub use nft::driver::NftDriver;
pub use nft::{genid, list_rules, model::RuleSpec};
pub use nft::{ElemOp, SetCache, TxnDelta};

/// A backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Native nftables.
    Nft,
    /// Legacy xtables.
    Legacy,
}

impl Backend {
    /// The name in state files, status and messages: `nft` or `legacy`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        }
    }

    /// The backend of a name ([`Backend::name`]).
    pub fn from_name(name: &str) -> Option<Backend> {
        match name {
            "nft" => Some(Backend::Nft),
            "legacy" => Some(Backend::Legacy),
            _ => None,
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Elements in a transaction above which the daemon mutes its change notifications around the
/// commit (the kernel then does not build one notification per element).
pub const QUIET_ELEMENTS: usize = 1_000;

/// Called with `true` before a large commit and `false` after it.
pub type Mute<'a> = &'a (dyn Fn(bool) + Sync);

/// How many times a plan is made and applied when each transaction is refused because the
/// ruleset changed underneath (ERESTART, generation mismatch).
pub const RESTART_ATTEMPTS: u32 = 5;

/// Whether an error is the kernel's "the ruleset generation changed" refusal (ERESTART), after
/// which the work is planned again.
pub fn is_generation_change(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<crate::netlink::NlError>()
            .and_then(|n| n.errno())
            == Some(crate::netlink::ERESTART)
    })
}

/// The one retry policy for generation changes: runs `step` (given the attempt number,
/// counted from one) until it succeeds, fails otherwise, or has been refused
/// [`RESTART_ATTEMPTS`] times, in which case the last refusal is returned. `what` is logged
/// before each retry.
pub fn retry_on_generation_change<T>(
    what: &str,
    mut step: impl FnMut(u32) -> Result<T>,
) -> Result<T> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match step(attempt) {
            Err(e) if attempt < RESTART_ATTEMPTS && is_generation_change(&e) => {
                tracing::info!("{what}");
            }
            r => return r,
        }
    }
}

/// What a driver observed.
#[derive(Debug, Clone)]
pub enum Observation {
    /// nftables (the kernel's, or the fake's).
    Nft(Observed),
    /// Legacy xtables, per family observed.
    Legacy(BTreeMap<Family, LegacyObserved>),
}

/// What a driver would change: one transaction.
#[derive(Debug, Clone)]
pub enum Changes {
    /// nftables changes, one netlink transaction.
    Nft(Vec<Change>),
    /// Legacy plans that change something, one `iptables-legacy-restore` per family.
    Legacy(Vec<(Family, LegacyPlan)>),
}

impl Changes {
    /// Whether nothing would change.
    pub fn is_empty(&self) -> bool {
        match self {
            Changes::Nft(c) => c.is_empty(),
            Changes::Legacy(l) => l.is_empty(),
        }
    }
}

/// What a successful [`Driver::apply`] reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// Notifications were muted around the commit and someone else changed the ruleset in
    /// that window: the caller should reconcile again.
    pub missed_events: bool,
}

/// What teardown's first step did with a driver's records.
#[derive(Debug, Default)]
pub struct Restored {
    /// Records put back.
    pub restored: Vec<RemovedRule>,
    /// Records whose rule was present already.
    pub already_present: Vec<RemovedRule>,
    /// Records that could not be put back, with why (`description: why`).
    pub problems: Vec<(RemovedRule, String)>,
}

/// One firewall backend.
pub trait Driver {
    /// The backend it drives.
    fn backend(&self) -> Backend;

    /// Adds what this driver knows to the detection facts of family `f` (design.md §4).
    fn facts(&mut self, f: Family, facts: &mut Facts) -> Result<()>;

    /// Reads what [`Driver::plan`] needs.
    fn observe(&mut self) -> Result<Observation>;

    /// Told before the next [`Driver::observe`] that its plan will be applied for `policy`:
    /// the driver may leave out of that one observation what it would rather rewrite than
    /// read (the nft driver: large sets, replaced whole). `plan` and `status` never call it.
    fn will_apply(&mut self, _policy: &Policy) {}

    /// Told before [`Driver::facts`] whether detection will look at rule counts at all (not
    /// when `backend.mode` forces a backend): a driver may then leave them uncounted.
    fn counts_needed(&mut self, _needed: bool) {}

    /// The changes that make `observed` match `policy` (this driver's part of it). Pure.
    fn plan(&self, policy: &Policy, observed: &Observation) -> Changes;

    /// Applies `changes` (planned from `observed` for `policy`) as one transaction.
    fn apply(
        &mut self,
        policy: &Policy,
        observed: &Observation,
        changes: &Changes,
        mute: Option<Mute<'_>>,
    ) -> Result<Applied>;

    /// The observation `observed` was found in sync with `policy` (drivers keep caches).
    fn settled(&mut self, _policy: &Policy, _observed: &Observation) {}

    /// Something failed: caches of what the kernel holds are no longer trusted.
    fn forget(&mut self) {}

    /// The default rules this driver would record before `changes` remove them.
    fn records(&self, changes: &Changes) -> Vec<RemovedRule>;

    /// Teardown step 1: puts this driver's records back (the others are not looked at).
    fn restore(&mut self, records: &[RemovedRule]) -> Restored;

    /// Teardown step 3: removes the driver's own objects. Returns what it removed.
    fn remove_own(&mut self) -> Result<Vec<String>>;

    /// After every driver's [`Driver::remove_own`]: fails when something of masqd's is left.
    fn check_removed(&mut self) -> Result<()> {
        Ok(())
    }

    /// Other components' source NAT rules this driver sees (for `status`).
    fn nat_rules(&mut self, observed: &Observation) -> Result<Vec<NatRule>>;

    /// The policy part as the driver's own text (an `nft -f` file, restore input).
    fn export(&self, policy: &Policy, observed: Option<&Observation>) -> String;
}

/// One driver of a [`DriverSet`] with its part of the policy.
pub struct Slot<'a> {
    /// The driver.
    pub driver: Box<dyn Driver + 'a>,
    /// The part of the policy it installs.
    pub policy: Policy,
}

/// The drivers detection chose, in the order they apply: the one installing the policy
/// first, the one only removing (stale objects, default rules) or only guarding second.
#[derive(Default)]
pub struct DriverSet<'a> {
    /// The drivers, in apply order.
    pub slots: Vec<Slot<'a>>,
}

impl<'a> DriverSet<'a> {
    /// A set of drivers, in apply order.
    pub fn new(slots: Vec<Slot<'a>>) -> DriverSet<'a> {
        DriverSet { slots }
    }
}

/// A borrowed driver drives too (the engine borrows the caller's nft driver for a plan).
impl<D: Driver + ?Sized> Driver for &mut D {
    fn backend(&self) -> Backend {
        (**self).backend()
    }
    fn facts(&mut self, f: Family, facts: &mut Facts) -> Result<()> {
        (**self).facts(f, facts)
    }
    fn observe(&mut self) -> Result<Observation> {
        (**self).observe()
    }
    fn will_apply(&mut self, policy: &Policy) {
        (**self).will_apply(policy)
    }
    fn counts_needed(&mut self, needed: bool) {
        (**self).counts_needed(needed)
    }
    fn plan(&self, policy: &Policy, observed: &Observation) -> Changes {
        (**self).plan(policy, observed)
    }
    fn apply(
        &mut self,
        policy: &Policy,
        observed: &Observation,
        changes: &Changes,
        mute: Option<Mute<'_>>,
    ) -> Result<Applied> {
        (**self).apply(policy, observed, changes, mute)
    }
    fn settled(&mut self, policy: &Policy, observed: &Observation) {
        (**self).settled(policy, observed)
    }
    fn forget(&mut self) {
        (**self).forget()
    }
    fn records(&self, changes: &Changes) -> Vec<RemovedRule> {
        (**self).records(changes)
    }
    fn restore(&mut self, records: &[RemovedRule]) -> Restored {
        (**self).restore(records)
    }
    fn remove_own(&mut self) -> Result<Vec<String>> {
        (**self).remove_own()
    }
    fn check_removed(&mut self) -> Result<()> {
        (**self).check_removed()
    }
    fn nat_rules(&mut self, observed: &Observation) -> Result<Vec<NatRule>> {
        (**self).nat_rules(observed)
    }
    fn export(&self, policy: &Policy, observed: Option<&Observation>) -> String {
        (**self).export(policy, observed)
    }
}

/// The broad default rules for the pod CIDRs still present in nftables (`ip`/`ip6 nat`).
pub fn default_rules_present(policy: &Policy, observed: &Observed) -> usize {
    crate::backend::nft::plan::default_rules_to_remove(policy, &observed.foreign).len()
}

/// The names of masqd's nftables sets of a family (`pod4`, `nomasq4`).
pub fn set_names(f: Family) -> [String; 2] {
    [
        crate::backend::nft::plan::pod_set(f),
        crate::backend::nft::plan::nomasq_set(f),
    ]
}
