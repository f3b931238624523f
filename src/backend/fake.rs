//! The in-memory driver (knftables' `Fake`): holds masqd's nftables objects and the broad
//! default rules of `ip`/`ip6 nat`, takes the same transactions as the kernel's nft driver,
//! applies each atomically (all or nothing), and dumps nft-like text for tests to assert on.
//! It can be told to refuse the next transactions with a generation change (ERESTART) or with
//! a plain failure. No root, no socket.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Result};

use super::{Applied, Backend, Change, Changes, Driver, Mute, Observation, Observed, Restored};
use crate::backend::nft::plan::{
    ForeignRule, ObservedChain, ObservedRule, ObservedSet, ObservedTable,
};
use crate::detect::Facts;
use crate::foreign::NatRule;
use crate::netlink::{NlError, ERESTART};
use crate::policy::{Family, Policy};
use crate::state::RemovedRule;

/// What the fake holds; shared (`Arc`) so a test keeps a handle after giving the driver away.
#[derive(Debug, Clone, Default)]
pub struct FakeState {
    /// Ruleset generation, bumped by every transaction that commits.
    pub genid: u32,
    /// masqd's table.
    pub table: Option<ObservedTable>,
    /// Broad default rules in `ip`/`ip6 nat POSTROUTING`.
    pub foreign: Vec<ForeignRule>,
    /// Next rule handle.
    pub next_handle: u64,
    /// Transactions refused with a generation change before the next one commits.
    pub restart_next: u32,
    /// Set: the next transaction fails with this message (then it is cleared).
    pub fail_next: Option<String>,
    /// Every transaction committed, as its changes' one-line summaries.
    pub log: Vec<String>,
    /// A log shared between fakes: every transaction offered, as `<backend>: N change(s)`.
    pub journal: Option<Arc<Mutex<Vec<String>>>>,
    /// How many times the engine told the driver to forget its caches.
    pub forgotten: u32,
}

/// The in-memory driver.
#[derive(Debug, Clone)]
pub struct FakeDriver {
    /// The objects, shared with the test.
    pub state: Arc<Mutex<FakeState>>,
    backend: Backend,
}

impl Default for FakeDriver {
    fn default() -> FakeDriver {
        FakeDriver::new(Backend::Nft)
    }
}

impl FakeDriver {
    /// An empty fake presenting itself as `backend`.
    pub fn new(backend: Backend) -> FakeDriver {
        FakeDriver {
            state: Arc::new(Mutex::new(FakeState {
                genid: 1,
                next_handle: 1,
                ..FakeState::default()
            })),
            backend,
        }
    }

    /// Runs `f` on the state.
    pub fn with<T>(&self, f: impl FnOnce(&mut FakeState) -> T) -> T {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// The objects as nft-like text (`table inet masqd { set pod4 { … } chain … }`), then the
    /// default rules (`ip nat POSTROUTING handle N: …`).
    pub fn dump(&self) -> String {
        self.with(|s| dump_state(s))
    }
}

fn dump_state(s: &FakeState) -> String {
    let mut out = String::new();
    if let Some(t) = &s.table {
        let _ = writeln!(out, "table inet {} {{", super::TABLE);
        for (name, set) in &t.sets {
            let fam = set.family.unwrap_or(Family::V4);
            let elems: Vec<String> = set
                .ranges
                .iter()
                .flat_map(|r| r.iter())
                .map(|r| r.display(fam))
                .collect();
            let _ = writeln!(out, "  set {name} {{ {} }}", elems.join(", "));
        }
        if let Some(ch) = &t.chain {
            let _ = writeln!(out, "  chain {} {{", super::CHAIN);
            for r in &ch.rules {
                let c = r.comment.as_deref().unwrap_or_default();
                let _ = writeln!(out, "    {c} # handle {}", r.handle);
            }
            let _ = writeln!(out, "  }}");
        }
        for c in &t.other_chains {
            let _ = writeln!(out, "  chain {c} {{ }}");
        }
        let _ = writeln!(out, "}}");
    }
    for r in &s.foreign {
        let _ = writeln!(
            out,
            "{} {} {} handle {}: {}",
            r.table_family.nft_keyword(),
            r.table,
            r.chain,
            r.handle,
            r.describe()
        );
    }
    out
}

/// Applies one change to the copy `s`; an impossible change fails like the kernel (ENOENT,
/// EEXIST), which aborts the whole transaction.
fn table<'s>(s: &'s mut FakeState, c: &Change) -> Result<&'s mut ObservedTable> {
    s.table
        .as_mut()
        .ok_or_else(|| anyhow!("{c}: no such table (ENOENT)"))
}

/// `add element` / `delete element` on a set of the copy.
fn elements(
    s: &mut FakeState,
    c: &Change,
    set: &str,
    ranges: &[crate::policy::Range],
) -> Result<()> {
    let st = table(s, c)?
        .sets
        .get_mut(set)
        .ok_or_else(|| anyhow!("{c}: ENOENT"))?;
    let mut have = st.ranges.as_deref().unwrap_or_default().to_vec();
    if matches!(c, Change::FlushSet(_)) {
        have.clear();
    } else if matches!(c, Change::AddElements { .. }) {
        have.extend(ranges.iter().cloned());
        have = crate::policy::normalize(have);
    } else {
        have.retain(|r| !ranges.contains(r));
    }
    st.ranges = Some(have.into());
    Ok(())
}

fn apply_change(s: &mut FakeState, c: &Change) -> Result<()> {
    match c {
        Change::AddTable if s.table.is_some() => {}
        Change::AddTable => s.table = Some(ObservedTable::default()),
        Change::DeleteTable => {
            s.table.take().ok_or_else(|| anyhow!("{c}: ENOENT"))?;
        }
        Change::FlushChain(name) if name == super::CHAIN => {
            if let Some(ch) = table(s, c)?.chain.as_mut() {
                ch.rules.clear();
            }
        }
        Change::FlushChain(_) => {}
        Change::DeleteChain(name) if name == super::CHAIN => table(s, c)?.chain = None,
        Change::DeleteChain(name) => table(s, c)?.other_chains.retain(|n| n != name),
        Change::AddChain => {
            table(s, c)?.chain.get_or_insert(ObservedChain {
                base_ok: true,
                rules: Vec::new(),
            });
        }
        Change::DeleteRule { handle, .. } => {
            let ch = table(s, c)?
                .chain
                .as_mut()
                .ok_or_else(|| anyhow!("{c}: ENOENT"))?;
            let before = ch.rules.len();
            ch.rules.retain(|r| r.handle != *handle);
            if ch.rules.len() == before {
                bail!("{c}: ENOENT");
            }
        }
        Change::DeleteSet(name) => {
            table(s, c)?
                .sets
                .remove(name)
                .ok_or_else(|| anyhow!("{c}: ENOENT"))?;
        }
        Change::AddSet { name, family } => {
            table(s, c)?
                .sets
                .entry(name.clone())
                .or_insert(ObservedSet {
                    family: Some(*family),
                    interval: true,
                    ranges: Some(Vec::new().into()),
                    unread: false,
                });
        }
        Change::FlushSet(set) => elements(s, c, set, &[])?,
        Change::DeleteElements { set, ranges, .. } | Change::AddElements { set, ranges, .. } => {
            elements(s, c, set, ranges)?
        }
        Change::AddRule(spec) => {
            let handle = s.next_handle;
            s.next_handle += 1;
            let ch = table(s, c)?
                .chain
                .as_mut()
                .ok_or_else(|| anyhow!("{c}: ENOENT"))?;
            ch.rules.push(ObservedRule {
                handle,
                comment: Some(spec.tag()),
                packets: Some(0),
            });
        }
        Change::RemoveDefaultRule(r) => {
            let before = s.foreign.len();
            s.foreign.retain(|f| f != r);
            if s.foreign.len() == before {
                bail!("{c}: ENOENT");
            }
        }
    }
    Ok(())
}

impl FakeDriver {
    /// Applies a transaction against generation `genid`: refused as the kernel would when
    /// told to, or when the generation moved; otherwise all changes or none.
    pub fn commit(&self, changes: &[Change], genid: Option<u32>) -> Result<()> {
        self.with(|s| {
            if let Some(j) = &s.journal {
                j.lock().unwrap_or_else(|p| p.into_inner()).push(format!(
                    "{}: {} change(s)",
                    self.backend,
                    changes.len()
                ));
            }
            if s.restart_next > 0 || genid.is_some_and(|g| g != s.genid) {
                s.restart_next = s.restart_next.saturating_sub(1);
                return Err(anyhow::Error::new(NlError::Kernel {
                    what: "commit".into(),
                    errno: ERESTART,
                    ext: None,
                }));
            }
            if let Some(msg) = s.fail_next.take() {
                bail!("{msg}");
            }
            let mut copy = s.clone();
            for c in changes {
                apply_change(&mut copy, c)?;
            }
            copy.genid = s.genid.wrapping_add(1);
            copy.log.push(
                changes
                    .iter()
                    .map(Change::summary)
                    .collect::<Vec<_>>()
                    .join("; "),
            );
            *s = copy;
            Ok(())
        })
    }
}

impl Driver for FakeDriver {
    fn backend(&self) -> Backend {
        self.backend
    }

    fn facts(&mut self, f: Family, facts: &mut Facts) -> Result<()> {
        let want = format!("masqd:masquerade:{}", f.digit());
        self.with(|s| {
            facts.nft_masqd = s.table.iter().flat_map(|t| &t.chain).any(|ch| {
                ch.rules
                    .iter()
                    .any(|r| r.comment.as_deref().is_some_and(|c| c.starts_with(&want)))
            });
        });
        Ok(())
    }

    fn observe(&mut self) -> Result<Observation> {
        Ok(self.with(|s| {
            Observation::Nft(Observed {
                genid: s.genid,
                table: s.table.clone(),
                foreign: s.foreign.clone(),
            })
        }))
    }

    fn plan(&self, policy: &Policy, observed: &Observation) -> Changes {
        crate::backend::nft::plan::plan_observation(policy, observed)
    }

    fn apply(
        &mut self,
        _policy: &Policy,
        observed: &Observation,
        changes: &Changes,
        _mute: Option<Mute<'_>>,
    ) -> Result<Applied> {
        let (Observation::Nft(o), Changes::Nft(c)) = (observed, changes) else {
            bail!("internal: the fake driver was given another driver's plan");
        };
        if c.is_empty() {
            return Ok(Applied::default());
        }
        self.commit(c, Some(o.genid))
            .map_err(|e| e.context("applying the nftables changes"))?;
        Ok(Applied::default())
    }

    fn records(&self, changes: &Changes) -> Vec<RemovedRule> {
        let Changes::Nft(c) = changes else {
            return Vec::new();
        };
        c.iter()
            .filter_map(|c| match c {
                Change::RemoveDefaultRule(r) => Some(super::nft::record_of(r)),
                _ => None,
            })
            .collect()
    }

    /// Puts back the records of its backend whose source matches no rule present.
    fn restore(&mut self, records: &[RemovedRule]) -> Restored {
        let mut out = Restored::default();
        let backend = self.backend;
        self.with(|s| {
            for r in records
                .iter()
                .filter(|r| r.backend.known() == Some(backend))
            {
                let Some(family) = Family::from_nft_keyword(r.family.as_str()) else {
                    out.problems.push((r.clone(), "unknown family".into()));
                    continue;
                };
                let Ok(saddr) = r.saddr.parse() else {
                    out.problems.push((r.clone(), "saddr is not a CIDR".into()));
                    continue;
                };
                if s.foreign.iter().any(|f| f.saddr == saddr) {
                    out.already_present.push(r.clone());
                    continue;
                }
                let handle = s.next_handle;
                s.next_handle += 1;
                s.foreign.push(ForeignRule {
                    table_family: family,
                    table: r.table.clone(),
                    chain: r.chain.clone(),
                    handle,
                    saddr,
                    oif_neq: r.oif_neq.clone(),
                    expressions: Vec::new(),
                    userdata: None,
                });
                out.restored.push(r.clone());
            }
        });
        out
    }

    fn remove_own(&mut self) -> Result<Vec<String>> {
        let existed = self.with(|s| s.table.is_some());
        if existed {
            self.commit(&[Change::DeleteTable], None)?;
            return Ok(vec![format!("table inet {}", super::TABLE)]);
        }
        Ok(Vec::new())
    }

    fn forget(&mut self) {
        self.with(|s| s.forgotten += 1);
    }

    fn nat_rules(&mut self, _observed: &Observation) -> Result<Vec<NatRule>> {
        Ok(Vec::new())
    }

    fn export(&self, _policy: &Policy, _observed: Option<&Observation>) -> String {
        self.dump()
    }
}
