//! The native nftables driver: [`super::Driver`] over the `pub` API of [`super::nft`], owning
//! its netlink socket and the cache of the sets it committed last ([`SetCache`]).

use std::borrow::BorrowMut;

use anyhow::{anyhow, Context, Result};

use crate::backend::nft::{self, SetCache};
use crate::backend::{Applied, Backend, Change, Changes, Driver, Mute, Observation, Restored};
use crate::backend::{Observed, QUIET_ELEMENTS};
use crate::detect::{Facts, HINT_CHAINS};
use crate::foreign::NatRule;
use crate::netlink::Socket;
use crate::policy::{Family, Policy};
use crate::state::RemovedRule;

/// The nftables driver over a socket it owns (`S = Socket`) or borrows (`&mut Socket`).
pub struct NftDriver<S: BorrowMut<Socket> = Socket> {
    sock: S,
    cache: Option<SetCache>,
    available: bool,
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
        }
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
                _ => 0,
            })
            .sum();
        let muted = mute.filter(|_| elements > QUIET_ELEMENTS);
        if let Some(m) = muted {
            m(true);
        }
        let res = nft::apply(self.sock.borrow_mut(), changes, Some(o.genid));
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
        if now != Some(own) {
            tracing::debug!(
                "ruleset generation {now:?} after masqd's commit, not {own}: the set cache is \
                 dropped (someone else committed too)"
            );
        }
        self.cache = (now == Some(own)).then(|| SetCache::after(policy, own));
        Ok(Applied {
            missed_events: muted.is_some() && now != Some(own),
        })
    }
}

impl<S: BorrowMut<Socket>> Driver for NftDriver<S> {
    fn backend(&self) -> Backend {
        Backend::Nft
    }

    /// Equals `nft -j list ruleset` counted (over netlink), after a GETGEN that tells
    /// whether the kernel answers nf_tables requests at all.
    fn facts(&mut self, f: Family, facts: &mut Facts) -> Result<()> {
        let sock = self.sock.borrow_mut();
        match nft::genid(sock) {
            Ok(_) => {}
            Err(e) if unsupported(e.errno()) => {
                facts.nft_unavailable = true;
                return Ok(());
            }
            Err(e) => return Err(e).context("asking nf_tables for the ruleset generation"),
        }
        let n = nft::facts(sock, f)?;
        facts.nft_rules = n.rules;
        facts.nft_hint_chains = n
            .chains
            .into_iter()
            .filter(|(_, _, c)| HINT_CHAINS.contains(&c.as_str()))
            .map(|(fam, t, c)| format!("{fam} {t}/{c}"))
            .collect();
        facts.nft_masqd = n.masqd;
        Ok(())
    }

    /// Equals `nft -j list table inet masqd` plus `nft -j list chain ip nat POSTROUTING` and
    /// `… ip6 nat POSTROUTING` (the sets from the cache while the generation is unchanged).
    fn observe(&mut self) -> Result<Observation> {
        let o = nft::observe(self.sock.borrow_mut(), self.cache.as_ref())
            .context("reading the nftables ruleset")?;
        Ok(Observation::Nft(o))
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
