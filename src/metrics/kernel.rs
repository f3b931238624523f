//! The reads of the kernel and of backend observations the metrics make: masqd's nftables
//! chain for a scrape, the other NAT rules for `masqd_overridden_rules` (through the nft
//! driver, [`Plan::overridden_with`]), and the counts of the legacy chain a reconcile observed
//! ([`crate::backend::counters`]). Every call into the backends from the metrics is here.

use rustables::ProtocolFamily;

use crate::backend::{counters, genid, list_rules, Driver, LegacyObserved, CHAIN, TABLE};
use crate::engine::Plan;
use crate::netlink::Socket;
use crate::policy::Policy;

use super::counters::ChainCounter;
use super::Metrics;

/// Reads masqd's chain and then the generation. Equals
/// `nft -a list chain inet masqd postrouting` (a handful of rules, no set elements).
pub fn read_own_chain() -> anyhow::Result<(Vec<ChainCounter>, u32)> {
    let mut sock = Socket::open()?;
    // `table inet masqd`: masqd's own table is of the inet family.
    let inet = ProtocolFamily::Inet as i32 as u8;
    let rules = list_rules(&mut sock, inet, TABLE, CHAIN)?;
    // Read after the rules: a commit in between makes the reading look newer than it is, so a
    // rebuild reported by that commit is detected by the counter's drop instead of twice.
    let genid = genid(&mut sock)?;
    let counters = rules
        .into_iter()
        .map(|r| ChainCounter {
            comment: r.comment,
            handle: r.handle,
            packets: r.packets.unwrap_or(0),
        })
        .collect();
    Ok((counters, genid))
}

/// The connections the legacy chain `MASQD-POSTROUTING` masqueraded and kept (its RETURN
/// rules for an exception), from the packet counters of `iptables-legacy-save -c -t nat`
/// ([`counters::legacy`], the status counters). The rules are counted as given, whether or
/// not the observation says the chain exists (a chain that is not there has no rules).
pub fn legacy_counts(lo: &LegacyObserved) -> (u64, u64) {
    let chain = LegacyObserved {
        chain_exists: true,
        chain_rules: lo.chain_rules.clone(),
        chain_packets: lo.chain_packets.clone(),
        ..LegacyObserved::default()
    };
    counters::legacy(&chain).map_or((0, 0), |c| (c.masqueraded, c.kept))
}

impl Metrics {
    /// Sets `masqd_overridden_rules` from the other NAT rules of the node (a dump of every
    /// rule: `nft -a list ruleset` through the nft driver `nft`, plus the plan's
    /// `iptables-legacy-save -t nat`; see [`Plan::overridden_with`]). Called from the
    /// reconcile's thread, after a successful apply.
    pub fn refresh_overridden(&self, p: &Plan, policy: &Policy, nft: &mut dyn Driver) {
        match p.overridden_with(policy, nft) {
            Ok(list) => self.set_overridden(&list),
            Err(e) => tracing::warn!("metrics: reading the other NAT rules: {e:#}"),
        }
    }
}
