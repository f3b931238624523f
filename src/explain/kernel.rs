//! Every read `masqd explain` makes from the kernel and every call it makes into the nft and
//! legacy backends: the socket, detection, masqd's chain and set lookups, the legacy nat table,
//! the other NAT rules, and the legacy save-format helpers the pure walk needs.

use std::net::IpAddr;

use anyhow::{Context, Result};

use super::evaluate::evaluate;
use super::{int, Explanation, Kernel, Query};
use crate::backend::legacy;
pub use crate::backend::legacy::LegacyObserved;
pub use crate::backend::nft::lookup::Lookup;
use crate::backend::nft::{self, lookup, netlink::Socket};
use crate::config::Config;
use crate::detect::Backend;
use crate::plan::{self, RuleSpec};
use crate::policy::{Family, FamilyPolicy, Policy};

/// The legacy chain masqd's policy lives in (`MASQD-POSTROUTING`).
pub const LEGACY_CHAIN: &str = legacy::CHAIN;

/// Reads what [`evaluate`] needs for `q` from the kernel: detection, the rules of masqd's
/// chain, two single-element set lookups, the legacy nat table of the family and every other
/// NAT rule. Returns the facts and the rules the configuration wants in masqd's chain. Equals
/// `masqd detect` + `nft -a list chain inet masqd postrouting` + `nft get element inet masqd
/// pod4 { SRC }` + `nft get element inet masqd nomasq4 { DST }` + `iptables-legacy-save -t
/// nat` + `nft -a list ruleset` (filtered to NAT rules).
pub fn read_kernel(
    cfg: &Config,
    policy: &Policy,
    q: &Query,
    sock: &mut Socket,
) -> Result<(Kernel, Vec<RuleSpec>)> {
    let det = crate::engine::detect(cfg, policy, sock)?;
    let f = q.family();
    let fd = det.family(f);
    let nft_ok = det.ipv4.has_guard() && det.ipv6.has_guard();
    let guard: Vec<Family> = det
        .families(Backend::Legacy)
        .into_iter()
        .filter(|g| det.family(*g).has_guard())
        .collect();
    let desired = plan::desired_rules(&policy.nft_part(&det.families(Backend::Nft), &guard));
    let mut k = Kernel {
        backend: fd.backend,
        nft: nft_ok,
        table: false,
        chain: Vec::new(),
        pod: Lookup::NoSet,
        nomasq: Lookup::NoSet,
        legacy: None,
        foreign: Vec::new(),
    };
    if nft_ok {
        k.table = nft::own_table_exists(sock)?;
        if k.table {
            k.chain = lookup::masqd_chain(sock)?;
            k.pod = lookup::range_of(sock, &plan::pod_set(f), f, int(q.src))?;
            k.nomasq = lookup::range_of(sock, &plan::nomasq_set(f), f, int(q.dst))?;
        }
        k.foreign = nft::foreign::nat_rules(sock).context("reading other NAT rules")?;
    }
    let nat_loaded = fd.facts.legacy_tables.iter().any(|t| t == "nat");
    if fd.backend == Backend::Legacy || nat_loaded {
        if let Some(bins) = legacy::binaries(f) {
            let lo = legacy::observe(f, &bins)
                .with_context(|| format!("reading the legacy {f} nat table"))?;
            k.foreign.extend(legacy::nat_rules(f, &lo));
            k.legacy = Some(lo);
        }
    }
    Ok((k, desired))
}

/// Reads the kernel and explains `q`. The one entry point of `masqd explain`; reads what
/// [`read_kernel`] reads, over a netlink socket of its own.
pub fn explain(cfg: &Config, policy: &Policy, q: &Query) -> Result<Explanation> {
    let mut sock = Socket::open().context("opening netlink")?;
    let (k, desired) = read_kernel(cfg, policy, q, &mut sock)?;
    Ok(evaluate(q, cfg, policy, &desired, &k))
}

/// Whether the legacy POSTROUTING chain jumps to `MASQD-POSTROUTING` (`iptables-legacy-save -t
/// nat` lists `-A POSTROUTING -m comment --comment masqd -j MASQD-POSTROUTING`).
pub fn legacy_jumps(lo: &LegacyObserved) -> bool {
    lo.postrouting.iter().any(|r| r == legacy::JUMP)
}

/// The words of a rule as `iptables-legacy-save` prints it (quotes removed); None when it does
/// not split.
pub fn legacy_rule_words(spec: &str) -> Option<Vec<String>> {
    legacy::split_saved(spec).map(|w| w.into_iter().map(|w| w.text).collect())
}

/// Whether an address of `iptables-legacy-save` (`10.0.0.0/8`, `10.0.0.1`) holds `a`.
pub fn saved_net_holds(s: &str, a: IpAddr) -> bool {
    legacy::parse_saved_net(s).is_some_and(|n| n.contains(&a))
}

/// When the legacy chain differs from what `fp` wants: its name, how many rules it holds and
/// how many the configuration wants (the rules of `iptables-legacy-save -t nat` compared with
/// the restore payload's).
pub fn legacy_drift(
    lo: &LegacyObserved,
    fp: &FamilyPolicy,
    policy: &Policy,
) -> Option<(&'static str, usize, usize)> {
    let want = legacy::desired_chain(fp, &policy.bridges, policy.random_fully);
    (!legacy::same_rules(&lo.chain_rules, &want)).then_some((
        legacy::CHAIN,
        lo.chain_rules.len(),
        want.len(),
    ))
}
