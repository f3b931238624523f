//! The native nftables driver: [`super::Driver`] over the `pub` API of [`super::nft`], owning
//! its netlink socket, the cache of the sets it committed last ([`SetCache`]) and, for the
//! daemon, the counted detection facts it follows from notifications ([`Counted`]).

use std::borrow::BorrowMut;

use anyhow::{anyhow, Context, Result};

use crate::backend::nft::{self, Counted, SetCache, TxnDelta};
use crate::backend::{Applied, Backend, Change, Changes, Driver, Mute, Observation, Restored};
use crate::backend::{Observed, QUIET_ELEMENTS};
use crate::detect::Facts;
use crate::foreign::NatRule;
use crate::netlink::Socket;
use crate::policy::{Family, Policy};
use crate::state::RemovedRule;

/// The nftables driver over a socket it owns (`S = Socket`) or borrows (`&mut Socket`).
pub struct NftDriver<S: BorrowMut<Socket> = Socket> {
    sock: S,
    cache: Option<SetCache>,
    available: bool,
    /// The owner follows the change notifications ([`NftDriver::follow`]): the set cache and
    /// the counted facts stay valid across other writers' commits.
    following: bool,
    /// The counted detection facts per family (`[ipv4, ipv6]`), while followed.
    counted: [Option<Counted>; 2],
    /// The last counted facts that could no longer be followed (lost notifications around a
    /// muted commit): used, once, only when counting again is starved by other writers'
    /// commits interrupting the dump.
    stale: [Option<Counted>; 2],
    /// Whether detection looks at the counts (not in a forced `backend.mode`).
    counts_needed: bool,
    /// The sets the next observation leaves unread (an apply replaces them whole).
    refill: std::collections::BTreeSet<String>,
}

/// Whether an errno says the kernel answers no nf_tables requests.
fn unsupported(errno: Option<i32>) -> bool {
    matches!(errno, Some(libc::EOPNOTSUPP | libc::EPROTONOSUPPORT))
}

impl NftDriver<Socket> {
    /// The ruleset of a policy part as an `nft -f` file ([`nft::export`]); pure.
    pub fn export_text(policy: &Policy) -> String {
        nft::export(policy)
    }

    /// Opens a netlink socket.
    pub fn open() -> Result<NftDriver<Socket>> {
        Ok(NftDriver::new(
            Socket::open().context("opening netlink")?,
            None,
        ))
    }
}

impl<S: BorrowMut<Socket>> NftDriver<S> {
    /// The driver over `sock`, with the daemon's cache of the sets committed last.
    pub fn new(sock: S, cache: Option<SetCache>) -> NftDriver<S> {
        NftDriver {
            sock,
            cache,
            available: true,
            following: false,
            counted: [None, None],
            stale: [None, None],
            counts_needed: true,
            refill: Default::default(),
        }
    }

    /// The daemon's driver: it follows the change notifications and hands them in before each
    /// reconcile ([`NftDriver::follow`], [`NftDriver::trust_sets`]).
    pub fn following(mut self) -> NftDriver<S> {
        self.following = true;
        self
    }

    /// Takes in the changes of the transactions committed since the last call (in generation
    /// order): to the counted facts, and someone else's to masqd's set elements. What cannot
    /// be followed is dropped (read again): facts after a deleted table; the set cache after
    /// an element change it cannot place, or one made before the cache's generation (it
    /// happened while masqd committed, so the cache does not hold it).
    pub fn follow(&mut self, deltas: &[TxnDelta]) {
        self.follow_sets(deltas);
        if !deltas.is_empty() {
            tracing::debug!("detection facts: following {} transaction(s)", deltas.len());
        }
        for f in Family::ALL {
            let c = &mut self.counted[f.index()];
            if let Some(facts) = c {
                if !deltas.iter().all(|d| facts.follow(f, d)) {
                    *c = None;
                }
            }
        }
    }

    fn follow_sets(&mut self, deltas: &[TxnDelta]) {
        let Some(cache) = &mut self.cache else {
            return;
        };
        for d in deltas.iter().filter(|d| !d.elements.is_empty()) {
            if d.gen <= cache.genid || !cache.follow(&d.elements) {
                tracing::debug!(
                    "someone else changed masqd's set elements in generation {}: the sets are \
                     read back",
                    d.gen
                );
                self.cache = None;
                return;
            }
        }
    }

    /// Whether the set cache may be used whatever the generation: no one else changed
    /// masqd's sets since it was made, as far as the notifications tell.
    pub fn trust_sets(&mut self, trusted: bool) {
        if let Some(c) = &mut self.cache {
            c.followed = trusted && self.following;
        }
    }

    /// Drops the counted facts only (the notifications that follow them were lost).
    pub fn forget_counted(&mut self) {
        self.drop_counted();
    }

    /// The counted facts can no longer be followed: counted again next time (they stay as
    /// the stale stand-in).
    fn drop_counted(&mut self) {
        for i in 0..2 {
            if let Some(c) = self.counted[i].take() {
                self.stale[i] = Some(c);
            }
        }
    }

    /// Drops the set cache only (someone else changed masqd's sets).
    pub fn forget_sets(&mut self) {
        self.cache = None;
    }

    /// The counted facts of family `f`: followed ones, else read now (and kept when the
    /// driver follows and the read saw one generation only). A following driver counts
    /// nothing detection will not look at (an empty count stands for it), and falls back to
    /// its stale counts when other writers' commits keep interrupting the dump.
    fn counted_of(&mut self, f: Family, gen: u32) -> Result<Counted> {
        let i = f.index();
        if let Some(c) = &self.counted[i] {
            return Ok(c.clone());
        }
        if self.following && !self.counts_needed {
            return Ok(Counted::new(gen, &nft::NftFacts::default()));
        }
        let sock = self.sock.borrow_mut();
        let read = match nft::counted(sock, f) {
            Err(e) if self.following && self.stale[i].is_some() => {
                tracing::debug!("{e:#}: the last counts stand in until the next reading");
                return Ok(self.stale[i]
                    .clone()
                    .unwrap_or_else(|| Counted::new(gen, &Default::default())));
            }
            r => r?,
        };
        let c = Counted::new(gen, &read);
        if self.following {
            self.stale[i] = Some(c.clone());
            if nft::genid(sock).ok() == Some(gen) {
                self.counted[i] = Some(c.clone());
            }
        }
        Ok(c)
    }

    /// The socket (the daemon recognises its own notifications by its port id).
    pub fn socket(&mut self) -> &mut Socket {
        self.sock.borrow_mut()
    }

    /// The set cache (the daemon's control socket answers from a copy).
    pub fn cache(&self) -> Option<&SetCache> {
        self.cache.as_ref()
    }

    /// Takes the set cache out (kept by the daemon between reconciles).
    pub fn take_cache(&mut self) -> Option<SetCache> {
        self.cache.take()
    }

    /// Asks the kernel whether it answers nf_tables requests (teardown does before anything).
    /// Equals `nft list ruleset` succeeding (a GETGEN request).
    pub fn probe(&mut self) -> Result<bool> {
        self.available = match nft::genid(self.sock.borrow_mut()) {
            Ok(_) => true,
            Err(e) if unsupported(e.errno()) => false,
            Err(e) => return Err(e).context("reading the nftables ruleset generation"),
        };
        Ok(self.available)
    }

    fn restore_available(&mut self, good: &[&RemovedRule], out: &mut Restored) {
        let sock = self.sock.borrow_mut();
        let res = crate::backend::retry_on_generation_change(
            "nftables ruleset changed while restoring; restoring again",
            |_| nft::restore_rules(sock, good),
        );
        match res {
            Ok(done) => {
                for r in good {
                    if done.contains(&r.description) {
                        out.restored.push((*r).clone());
                    } else {
                        out.already_present.push((*r).clone());
                    }
                }
            }
            Err(e) => {
                for r in good {
                    out.problems.push(((*r).clone(), format!("{e:#}")));
                }
            }
        }
    }

    /// Commits and refreshes the cache. Our transaction makes generation G+1; anything else
    /// means someone else committed too: the cache cannot be trusted then, and if we were not
    /// listening the caller must reconcile again.
    fn commit(
        &mut self,
        policy: &Policy,
        o: &Observed,
        changes: &[Change],
        mute: Option<Mute<'_>>,
    ) -> Result<Applied> {
        let elements: usize = changes
            .iter()
            .map(|c| match c {
                Change::AddElements { ranges, .. } | Change::DeleteElements { ranges, .. } => {
                    ranges.len()
                }
                // One notification per element flushed: as many as the set held.
                Change::FlushSet(_) => QUIET_ELEMENTS + 1,
                _ => 0,
            })
            .sum();
        let muted = mute.filter(|_| elements > QUIET_ELEMENTS);
        if let Some(m) = muted {
            m(true);
        }
        // Only a change to someone else's object (the broad rule's handle) needs the ruleset
        // as observed; masqd's own objects are created without EXCL and sets written whole,
        // so another writer's commit in between does not invalidate the batch.
        let guard = changes
            .iter()
            .any(|c| matches!(c, Change::RemoveDefaultRule(_)))
            .then_some(o.genid);
        let res = nft::apply(self.sock.borrow_mut(), changes, guard);
        if let Some(m) = muted {
            m(false);
        }
        res.context("applying the nftables changes")?;
        if changes.is_empty() {
            self.cache = Some(SetCache::after(policy, o.genid));
            return Ok(Applied::default());
        }
        let own = o.genid.wrapping_add(1);
        let now = nft::genid(self.sock.borrow_mut()).ok();
        let others = now != Some(own);
        // masqd's own notifications were not read either: its commit changes the counts only
        // when it removed a broad rule (its own table is not counted); that, or another
        // writer's commit meanwhile, means counting again.
        let removed = changes
            .iter()
            .any(|c| matches!(c, Change::RemoveDefaultRule(_)));
        if muted.is_some() && (others || removed) {
            self.drop_counted();
        }
        // Someone else committed too: without notifications to say what, the cache cannot be
        // trusted (a follower keeps it unless the notifications were muted meanwhile).
        let keep = !others || (self.following && muted.is_none());
        if !keep {
            tracing::debug!(
                "ruleset generation {now:?} after masqd's commit, not {own}: the set cache is \
                 dropped (someone else committed too)"
            );
        }
        // The generation of masqd's own commit: element changes notified after it are
        // followed, ones before it (made while masqd committed) are not in the cache.
        self.cache = keep.then(|| SetCache::after(policy, own));
        Ok(Applied {
            missed_events: muted.is_some() && others,
        })
    }
}

impl<S: BorrowMut<Socket>> Driver for NftDriver<S> {
    fn backend(&self) -> Backend {
        Backend::Nft
    }

    /// Equals `nft -j list ruleset` counted (over netlink; the daemon's driver counts once and
    /// then follows the counts from notifications), after a GETGEN that tells whether the
    /// kernel answers nf_tables requests at all, and `nft -a list chain inet masqd postrouting`
    /// for masqd's own policy.
    fn facts(&mut self, f: Family, facts: &mut Facts) -> Result<()> {
        let sock = self.sock.borrow_mut();
        let gen = match nft::genid(sock) {
            Ok(g) => g,
            Err(e) if unsupported(e.errno()) => {
                facts.nft_unavailable = true;
                return Ok(());
            }
            Err(e) => return Err(e).context("asking nf_tables for the ruleset generation"),
        };
        let c = self.counted_of(f, gen)?;
        facts.nft_rules = c.rules;
        facts.nft_hint_chains = c.hints;
        facts.nft_masqd = nft::own_policy(self.sock.borrow_mut(), f)?;
        Ok(())
    }

    /// Equals `nft -j list table inet masqd` plus `nft -j list chain ip nat POSTROUTING` and
    /// `… ip6 nat POSTROUTING` (the sets from the cache while the generation is unchanged, or
    /// while the daemon follows them).
    ///
    /// After [`Driver::will_apply`], the sets it chose are not read back (their shape is).
    fn observe(&mut self) -> Result<Observation> {
        let refill = std::mem::take(&mut self.refill);
        let o =
            nft::observe::observe_refilling(self.sock.borrow_mut(), self.cache.as_ref(), &refill)
                .context("reading the nftables ruleset")?;
        Ok(Observation::Nft(o))
    }

    /// The sets of `policy` large enough ([`nft::plan::refill_at`]) are replaced by the apply
    /// rather than read back first, unless the set cache holds them.
    fn will_apply(&mut self, policy: &Policy) {
        self.refill = nft::plan::refill_sets(policy, nft::plan::refill_at());
    }

    fn plan(&self, policy: &Policy, observed: &Observation) -> Changes {
        crate::backend::nft::plan::plan_observation(policy, observed)
    }

    /// Equals `nft -f` of the plan's lines, as one transaction guarded by the generation.
    fn apply(
        &mut self,
        policy: &Policy,
        observed: &Observation,
        changes: &Changes,
        mute: Option<Mute<'_>>,
    ) -> Result<Applied> {
        match (observed, changes) {
            (Observation::Nft(o), Changes::Nft(c)) => self.commit(policy, o, c, mute),
            _ => Err(anyhow!(
                "internal: the nft driver was given another driver's plan"
            )),
        }
    }

    fn settled(&mut self, policy: &Policy, observed: &Observation) {
        if let Observation::Nft(o) = observed {
            self.cache = Some(SetCache::after(policy, o.genid));
        }
    }

    fn forget(&mut self) {
        self.cache = None;
        self.drop_counted();
    }

    fn counts_needed(&mut self, needed: bool) {
        self.counts_needed = needed;
    }

    fn records(&self, changes: &Changes) -> Vec<RemovedRule> {
        let Changes::Nft(c) = changes else {
            return Vec::new();
        };
        c.iter()
            .filter_map(|c| match c {
                Change::RemoveDefaultRule(r) => Some(nft::record_of(r)),
                _ => None,
            })
            .collect()
    }

    /// Checked ([`nft::replayable`]), then put back in one transaction (re-planned when the
    /// ruleset changed meanwhile). Equals `nft add rule ip nat POSTROUTING …` per record.
    fn restore(&mut self, records: &[RemovedRule]) -> Restored {
        let mut out = Restored::default();
        let mut good = Vec::new();
        for r in records
            .iter()
            .filter(|r| r.backend.known() == Some(Backend::Nft))
        {
            let why = match nft::replayable(r) {
                Ok(_) if self.available => {
                    good.push(r);
                    continue;
                }
                Ok(_) => "the kernel answers no nf_tables requests".to_string(),
                Err(why) => format!("refused to replay it: {why}"),
            };
            out.problems.push((r.clone(), why));
        }
        if !good.is_empty() {
            self.restore_available(&good, &mut out);
        }
        out
    }

    /// Equals `nft delete table inet masqd`, then checks that it is gone.
    fn remove_own(&mut self) -> Result<Vec<String>> {
        if !self.available {
            return Ok(Vec::new());
        }
        let sock = self.sock.borrow_mut();
        let existed = nft::own_table_exists(sock)?;
        crate::backend::retry_on_generation_change(
            "nftables ruleset changed while deleting masqd's table; deleting again",
            |_| Ok(nft::delete_own_table(sock)?),
        )
        .context("deleting table inet masqd")?;
        if nft::own_table_exists(sock)? {
            return Err(anyhow!(
                "table inet {} is still there",
                crate::backend::TABLE
            ));
        }
        Ok(if existed {
            vec![format!("table inet {}", crate::backend::TABLE)]
        } else {
            Vec::new()
        })
    }

    /// Equals `nft -a list ruleset`, filtered to source NAT rules.
    fn nat_rules(&mut self, _observed: &Observation) -> Result<Vec<NatRule>> {
        nft::foreign::nat_rules(self.sock.borrow_mut()).context("reading other NAT rules")
    }

    fn export(&self, policy: &Policy, _observed: Option<&Observation>) -> String {
        nft::export(policy)
    }
}
