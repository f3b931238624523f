//! The native nftables backend, as a facade over one file per concern: [`model`] (names,
//! observed state, changes), [`observe`](mod@observe) (reading masqd's table, sets, chain),
//! [`decode`] (expression lists, rule comments, the default-rule matcher), [`plan`],
//! [`encode`] (one builder per statement), [`transaction`](mod@transaction),
//! [`export`](mod@export), [`cache`], [`facts`](mod@facts), [`restore`] (records and the own
//! table), [`foreign`] and [`lookup`].
//!
//! rustables encodes the table, the base chain and the sets; [`crate::netlink`] carries what
//! rustables 0.9 cannot: interval set elements (NFTA_SET_ELEM_FLAGS / NFT_SET_ELEM_INTERVAL_END),
//! rules (masquerade flags for `fully-random`, rule comments, raw expression lists of recorded
//! rules), rule deletion by handle, element and rule dumps, and the batch itself.

pub mod cache;
pub mod decode;
pub mod driver;
pub mod encode;
pub mod export;
pub mod facts;
pub mod foreign;
pub mod lookup;
pub mod model;
pub mod observe;
pub mod plan;
pub mod restore;
pub mod transaction;

pub use cache::SetCache;
pub use decode::{elements_to_ranges, match_default_rule};
pub use export::export;
pub use facts::{counted, own_policy, Counted, ElemOp, NftFacts, TxnDelta};
pub use observe::{genid, list_ranges, list_rules, observe, KernelRule};
pub use restore::{
    delete_own_table, own_table_exists, record_of, replayable, restore_rules, Replay,
};
pub use transaction::{apply, transaction};

use crate::policy::Family;

/// `NFPROTO_INET`: the family of masqd's table.
pub(crate) const NFPROTO_INET: u8 = 1;

/// An `NFTA_*` / `NFT_*` constant of rustables' sys module as an attribute type.
pub(crate) fn a(x: impl TryInto<u16>) -> u16 {
    x.try_into().unwrap_or(u16::MAX)
}

/// The address family of an nfgen family (`NFPROTO_IPV4` → V4), None for inet and others.
pub(crate) fn family_of_nfproto(p: u8) -> Option<Family> {
    Family::ALL.into_iter().find(|f| f.nfproto() == p)
}

/// The nft keyword of an nfgen family: `ip`, `ip6`, `inet` (`?` for others).
pub(crate) fn family_name(p: u8) -> &'static str {
    match family_of_nfproto(p) {
        Some(f) => f.nft_keyword(),
        None if p == NFPROTO_INET => "inet",
        None => "?",
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_golden;
#[cfg(test)]
mod tests_plan;
#[cfg(test)]
mod tests_refill;
