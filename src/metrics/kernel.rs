//! The reads of the kernel and of backend observations the metrics make: masqd's nftables
//! chain for a scrape, the other NAT rules for `masqd_overridden_rules`, and the counts of the
//! legacy chain a reconcile observed. Every call into the backends from the metrics is here.

use crate::backend::legacy::LegacyObserved;
use crate::backend::nft::{self, netlink::Socket};
use crate::engine::Plan;
use crate::policy::Policy;

use super::counters::ChainCounter;
use super::Metrics;

/// The nfproto of `table inet masqd`.
const NFPROTO_INET: u8 = 1;

/// Reads masqd's chain and then the generation. Equals
/// `nft -a list chain inet masqd postrouting` (a handful of rules, no set elements).
pub fn read_own_chain() -> anyhow::Result<(Vec<ChainCounter>, u32)> {
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
/// rules for an exception), from the packet counters of `iptables-legacy-save -c -t nat`.
pub fn legacy_counts(lo: &LegacyObserved) -> (u64, u64) {
    let (mut masq, mut kept) = (0u64, 0u64);
    for (rule, n) in lo.chain_rules.iter().zip(&lo.chain_packets) {
        if rule.ends_with("-j MASQUERADE") || rule.contains("-j MASQUERADE ") {
            masq += n;
        } else if rule.contains(" -d ") && rule.ends_with("-j RETURN") {
            kept += n;
        }
    }
    (masq, kept)
}

impl Metrics {
    /// Sets `masqd_overridden_rules` from the other NAT rules of the node (a dump of every
    /// rule: `nft -a list ruleset` plus the plan's `iptables-legacy-save -t nat`; see
    /// [`Plan::overridden`]). Called from the reconcile's thread, after a successful apply.
    pub fn refresh_overridden(&self, p: &Plan, policy: &Policy, sock: &mut Socket) {
        match p.overridden(policy, sock) {
            Ok(list) => self.set_overridden(&list),
            Err(e) => tracing::warn!("metrics: reading the other NAT rules: {e:#}"),
        }
    }
}
