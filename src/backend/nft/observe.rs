//! Observe: reading masqd's table, its sets and base chain, the ruleset generation and the
//! broad default rules of `ip nat` / `ip6 nat` POSTROUTING, over netlink.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result};
use rustables::sys;

use super::cache::SetCache;
use super::decode::{elements_to_ranges, exprs, match_default_rule, udata_comment};
use super::model::{
    ForeignRule, Observed, ObservedChain, ObservedRule, ObservedSet, ObservedTable, CHAIN,
    CHAIN_PRIORITY, TABLE,
};
use super::{a, family_name, NFPROTO_INET};
use crate::netlink::{Attrs, Msg, NlError, Socket};
use crate::policy::{Family, Range};

/// Key type of `ipv4_addr` sets (nft's `TYPE_IPADDR`).
pub(crate) const NFT_TYPE_IPADDR: u32 = 7;
/// Key type of `ipv6_addr` sets (`TYPE_IP6ADDR`).
pub(crate) const NFT_TYPE_IP6ADDR: u32 = 8;

/// The ruleset generation. Equals `nft list ruleset` reading its generation id.
pub fn genid(sock: &mut Socket) -> Result<u32, NlError> {
    let msgs = sock.request(
        sys::NFT_MSG_GETGEN,
        libc::AF_UNSPEC as u8,
        "get ruleset generation",
        |_| {},
    )?;
    msgs.iter()
        .find_map(|m| m.attrs().get(a(sys::NFTA_GEN_ID)).and_then(|x| x.be32()))
        .ok_or_else(|| NlError::Malformed("generation message without NFTA_GEN_ID".into()))
}

/// Whether `table inet masqd` exists. Equals `nft list table inet masqd` succeeding.
pub(crate) fn table_exists(sock: &mut Socket) -> Result<bool, NlError> {
    let tables = sock.dump(
        sys::NFT_MSG_GETTABLE,
        NFPROTO_INET,
        "list tables inet",
        |_| {},
    )?;
    Ok(tables
        .iter()
        .any(|m| m.attrs().get(a(sys::NFTA_TABLE_NAME)).and_then(|x| x.str()) == Some(TABLE)))
}

/// Reads everything the plan needs. Equals `nft -j list table inet masqd` plus
/// `nft -j list chain ip nat POSTROUTING` and `… ip6 nat POSTROUTING`. With a cache of the
/// current generation (or one the daemon keeps true by following notifications), the sets are
/// taken from it instead of dumped.
pub fn observe(sock: &mut Socket, cache: Option<&SetCache>) -> Result<Observed> {
    observe_refilling(sock, cache, &BTreeSet::new())
}

/// [`observe`], leaving the elements of the sets named in `refill` unread (`ObservedSet::
/// unread`: their shape is read, their contents are replaced by the plan). Equals `nft -j
/// list table inet masqd` without those sets' elements (`nft -t list table` for them), plus
/// `nft -j list chain ip nat POSTROUTING` and `… ip6 nat POSTROUTING`.
pub fn observe_refilling(
    sock: &mut Socket,
    cache: Option<&SetCache>,
    refill: &BTreeSet<String>,
) -> Result<Observed> {
    let genid = genid(sock).context("reading the ruleset generation")?;
    let cached = cache.filter(|c| c.followed || c.genid == genid);
    if let (Some(c), None) = (cache, cached) {
        tracing::debug!(
            "ruleset generation {genid}, set cache of {}: reading the sets back",
            c.genid
        );
    }
    let table = if table_exists(sock)? {
        Some(observe_table(sock, cached, refill)?)
    } else {
        None
    };
    let mut foreign = Vec::new();
    for f in Family::ALL {
        foreign.extend(observe_foreign(sock, f)?);
    }
    Ok(Observed {
        genid,
        table,
        foreign,
    })
}

/// masqd's table: its chains (the base chain with its rules), then its sets, from `cached`
/// when the generation is the cached one, else read (but for the elements of `refill`).
/// Equals `nft -a list table inet masqd`.
fn observe_table(
    sock: &mut Socket,
    cached: Option<&SetCache>,
    refill: &BTreeSet<String>,
) -> Result<ObservedTable> {
    let mut t = ObservedTable::default();
    let chains = sock.dump(
        sys::NFT_MSG_GETCHAIN,
        NFPROTO_INET,
        "list chains inet",
        |_| {},
    )?;
    for m in &chains {
        let at = m.attrs();
        if at.get(a(sys::NFTA_CHAIN_TABLE)).and_then(|x| x.str()) != Some(TABLE) {
            continue;
        }
        let name = at
            .get(a(sys::NFTA_CHAIN_NAME))
            .and_then(|x| x.str())
            .unwrap_or_default()
            .to_string();
        if name != CHAIN {
            t.other_chains.push(name);
            continue;
        }
        let rules = list_rules(sock, NFPROTO_INET, TABLE, CHAIN)?
            .into_iter()
            .map(|r| ObservedRule {
                handle: r.handle,
                comment: r.comment,
                packets: r.packets,
            })
            .collect();
        t.chain = Some(ObservedChain {
            base_ok: base_chain_ok(at),
            rules,
        });
    }
    t.sets = match cached {
        Some(c) => c.sets.clone(),
        None => observe_sets(sock, refill)?,
    };
    Ok(t)
}

/// Whether a chain message describes masqd's base chain as it must be: `type nat hook
/// postrouting priority srcnat - 1; policy accept;`.
pub(crate) fn base_chain_ok(at: Attrs<'_>) -> bool {
    let hook = at.get(a(sys::NFTA_CHAIN_HOOK));
    let hooknum = hook
        .and_then(|h| h.nested().get(a(sys::NFTA_HOOK_HOOKNUM)))
        .and_then(|x| x.be32());
    let prio = hook
        .and_then(|h| h.nested().get(a(sys::NFTA_HOOK_PRIORITY)))
        .and_then(|x| x.be32());
    let policy = at.get(a(sys::NFTA_CHAIN_POLICY)).and_then(|x| x.be32());
    let ty = at.get(a(sys::NFTA_CHAIN_TYPE)).and_then(|x| x.str());
    hooknum == Some(libc::NF_INET_POST_ROUTING as u32)
        && prio == Some(CHAIN_PRIORITY as u32)
        && policy == Some(libc::NF_ACCEPT as u32)
        && ty == Some("nat")
}

/// The sets of masqd's table with their elements. Equals `nft list sets table inet masqd`
/// plus `nft list set inet masqd <name>` for each interval address set not in `refill`.
fn observe_sets(
    sock: &mut Socket,
    refill: &BTreeSet<String>,
) -> Result<BTreeMap<String, ObservedSet>> {
    let mut out = BTreeMap::new();
    for m in &list_sets(sock)? {
        let at = m.attrs();
        if at.get(a(sys::NFTA_SET_TABLE)).and_then(|x| x.str()) != Some(TABLE) {
            continue;
        }
        let Some(name) = at.get(a(sys::NFTA_SET_NAME)).and_then(|x| x.str()) else {
            continue;
        };
        let (family, interval) = set_shape(at);
        let unread = refill.contains(name);
        let ranges = match family {
            Some(_) if unread => None,
            Some(f) if interval => list_ranges(sock, name, f)?.map(Into::into),
            _ => None,
        };
        if unread {
            tracing::debug!("set {name}: not read back (large), its contents are replaced");
        }
        out.insert(
            name.to_string(),
            ObservedSet {
                family,
                interval,
                ranges,
                unread,
            },
        );
    }
    Ok(out)
}

/// The key family (ipv4_addr / ipv6_addr keys only) of a set message, and whether its flags
/// are exactly `interval`.
pub(crate) fn set_shape(at: Attrs<'_>) -> (Option<Family>, bool) {
    let flags = at
        .get(a(sys::NFTA_SET_FLAGS))
        .and_then(|x| x.be32())
        .unwrap_or(0);
    let key_type = at.get(a(sys::NFTA_SET_KEY_TYPE)).and_then(|x| x.be32());
    let key_len = at.get(a(sys::NFTA_SET_KEY_LEN)).and_then(|x| x.be32());
    let family = match (key_type, key_len) {
        (Some(NFT_TYPE_IPADDR), Some(4)) => Some(Family::V4),
        (Some(NFT_TYPE_IP6ADDR), Some(16)) => Some(Family::V6),
        _ => None,
    };
    (family, flags == libc::NFT_SET_INTERVAL as u32)
}

/// The sets of masqd's table. Equals `nft list sets table inet masqd`.
fn list_sets(sock: &mut Socket) -> Result<Vec<Msg>, NlError> {
    sock.dump(
        sys::NFT_MSG_GETSET,
        NFPROTO_INET,
        "list sets inet masqd",
        |w| w.put_str(a(sys::NFTA_SET_TABLE), TABLE),
    )
}

/// Reads the elements of an interval set back as ranges. Equals
/// `nft list set inet masqd <name>`. None when the elements do not form intervals.
pub fn list_ranges(sock: &mut Socket, set: &str, f: Family) -> Result<Option<Vec<Range>>> {
    let msgs = sock.dump(
        sys::NFT_MSG_GETSETELEM,
        NFPROTO_INET,
        &format!("list set inet {TABLE} {set}"),
        |w| {
            w.put_str(a(sys::NFTA_SET_ELEM_LIST_TABLE), TABLE);
            w.put_str(a(sys::NFTA_SET_ELEM_LIST_SET), set);
        },
    )?;
    let mut elems: Vec<(u128, bool)> = Vec::new();
    for m in &msgs {
        let Some(list) = m.attrs().get(a(sys::NFTA_SET_ELEM_LIST_ELEMENTS)) else {
            continue;
        };
        for e in list.nested() {
            let ea = e.nested();
            let key = ea
                .get(a(sys::NFTA_SET_ELEM_KEY))
                .and_then(|k| k.nested().get(a(sys::NFTA_DATA_VALUE)))
                .and_then(|v| f.addr_from_bytes(v.data));
            let Some(key) = key else {
                return Ok(None);
            };
            let flags = ea
                .get(a(sys::NFTA_SET_ELEM_FLAGS))
                .and_then(|x| x.be32())
                .unwrap_or(0);
            elems.push((key, flags & libc::NFT_SET_ELEM_INTERVAL_END as u32 != 0));
        }
    }
    Ok(elements_to_ranges(elems, f.max()))
}

/// A rule read from the kernel.
#[derive(Debug, Clone)]
pub struct KernelRule {
    /// Handle.
    pub handle: u64,
    /// Comment from its userdata.
    pub comment: Option<String>,
    /// Counter packets, if it has a counter.
    pub packets: Option<u64>,
    /// Raw NFTA_RULE_EXPRESSIONS payload.
    pub expressions: Vec<u8>,
    /// Raw NFTA_RULE_USERDATA payload.
    pub userdata: Option<Vec<u8>>,
}

/// Lists the rules of a chain. Equals `nft -a list chain <family> <table> <chain>`.
pub fn list_rules(
    sock: &mut Socket,
    family: u8,
    table: &str,
    chain: &str,
) -> Result<Vec<KernelRule>> {
    let what = format!("list chain {} {table} {chain}", family_name(family));
    let msgs = match sock.dump(sys::NFT_MSG_GETRULE, family, &what, |w| {
        w.put_str(a(sys::NFTA_RULE_TABLE), table);
        w.put_str(a(sys::NFTA_RULE_CHAIN), chain);
    }) {
        Ok(m) => m,
        Err(e) if e.errno() == Some(libc::ENOENT) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    for m in &msgs {
        let at = m.attrs();
        if at.get(a(sys::NFTA_RULE_TABLE)).and_then(|x| x.str()) != Some(table)
            || at.get(a(sys::NFTA_RULE_CHAIN)).and_then(|x| x.str()) != Some(chain)
        {
            continue;
        }
        let Some(handle) = at.get(a(sys::NFTA_RULE_HANDLE)).and_then(|x| x.be64()) else {
            continue;
        };
        let expressions = at
            .get(a(sys::NFTA_RULE_EXPRESSIONS))
            .map(|x| x.data.to_vec())
            .unwrap_or_default();
        let userdata = at.get(a(sys::NFTA_RULE_USERDATA)).map(|x| x.data.to_vec());
        let comment = userdata.as_deref().and_then(udata_comment);
        let packets = exprs(&expressions)
            .into_iter()
            .find(|(n, _)| n == "counter")
            .and_then(|(_, d)| {
                Attrs(d)
                    .get(a(sys::NFTA_COUNTER_PACKETS))
                    .and_then(|x| x.be64())
            });
        out.push(KernelRule {
            handle,
            comment,
            packets,
            expressions,
            userdata,
        });
    }
    Ok(out)
}

/// Broad masquerade rules in `<family> nat POSTROUTING`, as iptables-nft writes them
/// (`-s <cidr> [! -o <if>] -j MASQUERADE`). Equals `nft -a list chain ip nat POSTROUTING`.
pub(crate) fn observe_foreign(sock: &mut Socket, f: Family) -> Result<Vec<ForeignRule>> {
    let family = f.nfproto();
    let tables = sock.dump(sys::NFT_MSG_GETTABLE, family, "list tables", |_| {})?;
    let has_nat = tables
        .iter()
        .any(|m| m.attrs().get(a(sys::NFTA_TABLE_NAME)).and_then(|x| x.str()) == Some("nat"));
    if !has_nat {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for r in list_rules(sock, family, "nat", "POSTROUTING")? {
        if let Some((saddr, oif_neq)) = match_default_rule(f, &r.expressions) {
            out.push(ForeignRule {
                table_family: f,
                table: "nat".into(),
                chain: "POSTROUTING".into(),
                handle: r.handle,
                saddr,
                oif_neq,
                expressions: r.expressions,
                userdata: r.userdata,
            });
        }
    }
    Ok(out)
}

/// Whether a family's `nat` table and its `POSTROUTING` chain exist. Equals
/// `nft list table <family> nat` and `nft list chain <family> nat POSTROUTING` succeeding.
pub(crate) fn nat_postrouting(sock: &mut Socket, f: Family) -> Result<(bool, bool)> {
    let family = f.nfproto();
    let tables = sock.dump(sys::NFT_MSG_GETTABLE, family, "list tables", |_| {})?;
    let name = |m: &Msg, attr| m.attrs().get(a(attr)).and_then(|x| x.str()) == Some("nat");
    if !tables.iter().any(|m| name(m, sys::NFTA_TABLE_NAME)) {
        return Ok((false, false));
    }
    let chains = sock.dump(sys::NFT_MSG_GETCHAIN, family, "list chains", |_| {})?;
    let chain = chains.iter().any(|m| {
        name(m, sys::NFTA_CHAIN_TABLE)
            && m.attrs().get(a(sys::NFTA_CHAIN_NAME)).and_then(|x| x.str()) == Some("POSTROUTING")
    });
    Ok((true, chain))
}
