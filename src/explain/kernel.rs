//! Every read `masqd explain` makes of the kernel: detection through the engine, then masqd's
//! chain, the set lookups, the legacy nat table and the other NAT rules in one
//! [`query::Nftables::read_for_explain`]; and (re-exported from [`crate::backend::query`]) the
//! legacy save-format helpers the pure walk needs.

use anyhow::{Context, Result};

use super::evaluate::evaluate;
use super::{int, Explanation, Kernel, Query};
use crate::backend::query::{self, ExplainAsk, Nftables, RuleSpec};
use crate::backend::Backend;
use crate::config::Config;
use crate::engine;
use crate::policy::Policy;

pub use crate::backend::query::{
    legacy_drift, legacy_jumps, legacy_rule_words, saved_net_holds, LegacyObserved, Lookup,
    LEGACY_CHAIN,
};

/// Reads what [`evaluate`] needs for `q` from the kernel through `nft`: detection, the rules of
/// masqd's chain, two single-element set lookups, the legacy nat table of the family and every
/// other NAT rule. Returns the facts and the rules the configuration wants in masqd's chain.
/// Equals `masqd detect` + `nft -a list chain inet masqd postrouting` + `nft get element inet
/// masqd pod4 { SRC }` + `nft get element inet masqd nomasq4 { DST }` + `iptables-legacy-save
/// -t nat` + `nft -a list ruleset` (filtered to NAT rules).
pub fn read_kernel(
    cfg: &Config,
    policy: &Policy,
    q: &Query,
    nft: &mut Nftables,
) -> Result<(Kernel, Vec<RuleSpec>)> {
    let det = engine::detect_with(cfg.mode, policy, nft.driver())?;
    let f = q.family();
    let fd = det.family(f);
    let nft_ok = det.ipv4.has_guard() && det.ipv6.has_guard();
    let desired = query::desired_rules(&engine::nft_part(&det, policy));
    let nat_loaded = fd.facts.legacy_tables.iter().any(|t| t == "nat");
    let read = nft.read_for_explain(&ExplainAsk {
        family: f,
        src: int(q.src),
        dst: int(q.dst),
        nft: nft_ok,
        legacy: fd.backend == Backend::Legacy || nat_loaded,
    })?;
    let k = Kernel {
        backend: fd.backend,
        nft: nft_ok,
        table: read.table,
        chain: read.chain,
        pod: read.pod,
        nomasq: read.nomasq,
        legacy: read.legacy,
        foreign: read.foreign,
    };
    Ok((k, desired))
}

/// Reads the kernel and explains `q`. The one entry point of `masqd explain`; reads what
/// [`read_kernel`] reads, over a netlink socket of its own.
pub fn explain(cfg: &Config, policy: &Policy, q: &Query) -> Result<Explanation> {
    let mut nft = Nftables::open().context("opening netlink")?;
    let (k, desired) = read_kernel(cfg, policy, q, &mut nft)?;
    Ok(evaluate(q, cfg, policy, &desired, &k))
}
