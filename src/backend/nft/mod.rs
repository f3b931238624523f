//! The native nftables backend: observe over netlink, apply a plan as one transaction.
//!
//! rustables encodes the table, the base chain and the sets; [`netlink`] encodes what rustables
//! 0.9 cannot: interval set elements (NFTA_SET_ELEM_FLAGS / NFT_SET_ELEM_INTERVAL_END), rules
//! (masquerade flags for `fully-random`, rule comments, raw expression lists of recorded
//! rules), rule deletion by handle, element and rule dumps, and the batch itself.

pub mod foreign;
pub mod lookup;
pub mod netlink;

use anyhow::{Context, Result};
use ipnet::IpNet;
use rustables::sys;
use rustables::{
    Chain, ChainPolicy, ChainType, Hook, HookClass, MsgType, ProtocolFamily, Set, Table,
};

use crate::plan::{
    Change, ForeignRule, Observed, ObservedChain, ObservedRule, ObservedSet, ObservedTable,
    RuleSpec, CHAIN, CHAIN_PRIORITY, TABLE,
};
use crate::policy::{Family, Range};
use crate::state::{hex, unhex, RemovedRule};
use netlink::{Attrs, NlError, Socket, Transaction, Writer, MAX_NEST, NLM_F_APPEND, NLM_F_CREATE};

const NFPROTO_INET: u8 = 1;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
const NFT_TYPE_IPADDR: u32 = 7;
const NFT_TYPE_IP6ADDR: u32 = 8;
const NFTA_TARGET_NAME: u16 = 1;
const NF_NAT_RANGE_PROTO_RANDOM_FULLY: u32 = 0x10;
const IFNAMSIZ: usize = 16;
const NFTNL_UDATA_RULE_COMMENT: u8 = 0;
/// nft's set userdata: key byte order (what `nft -f` writes for address sets).
const SET_USERDATA: [u8; 6] = [1, 4, 1, 0, 0, 0];

fn a(x: impl TryInto<u16>) -> u16 {
    x.try_into().unwrap_or(u16::MAX)
}

fn nfproto(f: Family) -> u8 {
    f.nfproto()
}

fn fam_kw(f: Family) -> &'static str {
    f.nft_keyword()
}

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
fn table_exists(sock: &mut Socket) -> Result<bool, NlError> {
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

/// The sets of masqd's table as masqd itself last committed them, with the ruleset generation
/// right after that commit. While the generation is unchanged nothing in the ruleset changed,
/// so the (expensive) element dump can be skipped: the kernel's rbtree dump restarts its walk
/// for every 32 KiB message, which makes reading 60,000 intervals cost ~100 ms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetCache {
    /// Generation after masqd's commit.
    pub genid: u32,
    /// The sets it left.
    pub sets: std::collections::BTreeMap<String, ObservedSet>,
}

impl SetCache {
    /// The cache describing the sets a plan leaves behind at generation `genid`.
    pub fn after(policy: &crate::policy::Policy, genid: u32) -> SetCache {
        SetCache {
            genid,
            sets: crate::plan::desired_sets(policy)
                .into_iter()
                .map(|(name, (f, ranges))| {
                    (
                        name,
                        ObservedSet {
                            family: Some(f),
                            interval: true,
                            ranges: Some(ranges),
                        },
                    )
                })
                .collect(),
        }
    }
}

/// Reads everything the plan needs. Equals `nft -j list table inet masqd` plus
/// `nft -j list chain ip nat POSTROUTING` and `… ip6 nat POSTROUTING`. With a cache of the
/// current generation, the sets are taken from it instead of dumped.
pub fn observe(sock: &mut Socket, cache: Option<&SetCache>) -> Result<Observed> {
    let genid = genid(sock).context("reading the ruleset generation")?;
    let cached = cache.filter(|c| c.genid == genid);
    if let (Some(c), None) = (cache, cached) {
        tracing::debug!(
            "ruleset generation {genid}, set cache of {}: reading the sets back",
            c.genid
        );
    }
    let table = if table_exists(sock)? {
        Some(observe_table(sock, cached)?)
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

fn observe_table(sock: &mut Socket, cached: Option<&SetCache>) -> Result<ObservedTable> {
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
        let hook = at.get(a(sys::NFTA_CHAIN_HOOK));
        let hooknum = hook
            .and_then(|h| h.nested().get(a(sys::NFTA_HOOK_HOOKNUM)))
            .and_then(|x| x.be32());
        let prio = hook
            .and_then(|h| h.nested().get(a(sys::NFTA_HOOK_PRIORITY)))
            .and_then(|x| x.be32());
        let policy = at.get(a(sys::NFTA_CHAIN_POLICY)).and_then(|x| x.be32());
        let ty = at.get(a(sys::NFTA_CHAIN_TYPE)).and_then(|x| x.str());
        let base_ok = hooknum == Some(libc::NF_INET_POST_ROUTING as u32)
            && prio == Some(CHAIN_PRIORITY as u32)
            && policy == Some(libc::NF_ACCEPT as u32)
            && ty == Some("nat");
        let rules = list_rules(sock, NFPROTO_INET, TABLE, CHAIN)?
            .into_iter()
            .map(|r| ObservedRule {
                handle: r.handle,
                comment: r.comment,
                packets: r.packets,
            })
            .collect();
        t.chain = Some(ObservedChain { base_ok, rules });
    }
    if let Some(c) = cached {
        t.sets = c.sets.clone();
        return Ok(t);
    }
    let sets = list_sets(sock)?;
    for m in &sets {
        let at = m.attrs();
        if at.get(a(sys::NFTA_SET_TABLE)).and_then(|x| x.str()) != Some(TABLE) {
            continue;
        }
        let Some(name) = at.get(a(sys::NFTA_SET_NAME)).and_then(|x| x.str()) else {
            continue;
        };
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
        let interval = flags == libc::NFT_SET_INTERVAL as u32;
        let ranges = match family {
            Some(f) if interval => list_ranges(sock, name, f)?,
            _ => None,
        };
        t.sets.insert(
            name.to_string(),
            ObservedSet {
                family,
                interval,
                ranges,
            },
        );
    }
    Ok(t)
}

/// What detection needs to know about nftables for one family.
#[derive(Debug, Clone, Default)]
pub struct NftFacts {
    /// Rules in tables of the family, plus inet tables other than masqd's.
    pub rules: usize,
    /// Chains of the family's tables: (family, table, chain).
    pub chains: Vec<(String, String, String)>,
    /// Whether masqd's table holds the policy of this family (its masquerade rule; the
    /// guard alone, kept for a legacy family, does not count).
    pub masqd: bool,
}

/// Detection facts. Equals `nft -j list ruleset` counted, read over netlink.
pub fn facts(sock: &mut Socket, f: Family) -> Result<NftFacts> {
    let mut out = NftFacts::default();
    let fam = nfproto(f);
    for family in [fam, NFPROTO_INET] {
        let rules = sock.dump(sys::NFT_MSG_GETRULE, family, "list rules", |_| {})?;
        out.rules += rules
            .iter()
            .filter(|m| {
                m.attrs().get(a(sys::NFTA_RULE_TABLE)).and_then(|x| x.str()) != Some(TABLE)
                    || family != NFPROTO_INET
            })
            .count();
    }
    let chains = sock.dump(sys::NFT_MSG_GETCHAIN, fam, "list chains", |_| {})?;
    for m in &chains {
        let at = m.attrs();
        let t = at
            .get(a(sys::NFTA_CHAIN_TABLE))
            .and_then(|x| x.str())
            .unwrap_or_default();
        let c = at
            .get(a(sys::NFTA_CHAIN_NAME))
            .and_then(|x| x.str())
            .unwrap_or_default();
        out.chains
            .push((fam_kw(f).to_string(), t.to_string(), c.to_string()));
    }
    if table_exists(sock)? {
        // masqd's policy, not the guard that legacy mode keeps here: its masquerade rule.
        let want = format!("masqd:masquerade:{}", f.digit());
        out.masqd = list_rules(sock, NFPROTO_INET, TABLE, CHAIN)?
            .iter()
            .any(|r| r.comment.as_deref().is_some_and(|c| c.starts_with(&want)));
    }
    Ok(out)
}

/// The sets of masqd's table. Equals `nft list sets table inet masqd`.
fn list_sets(sock: &mut Socket) -> Result<Vec<netlink::Msg>, NlError> {
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

/// Pairs interval elements (start, or end = one past the last address) into ranges. An end
/// element without an open interval (nft writes one at address 0) is ignored.
pub fn elements_to_ranges(mut elems: Vec<(u128, bool)>, top: u128) -> Option<Vec<Range>> {
    // At the same key, the end of the previous interval sorts before the next start.
    elems.sort_by_key(|&(k, end)| (k, !end));
    let mut out = Vec::new();
    let mut open: Option<u128> = None;
    for (k, end) in elems {
        match (end, open) {
            (false, None) => open = Some(k),
            (false, Some(_)) => return None,
            (true, Some(s)) => {
                if k <= s {
                    return None;
                }
                out.push(Range {
                    start: s,
                    end: k - 1,
                });
                open = None;
            }
            (true, None) => {}
        }
    }
    if let Some(s) = open {
        // Only an interval reaching the top of the address space has no end element.
        out.push(Range { start: s, end: top });
    }
    Some(out)
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

fn family_name(f: u8) -> &'static str {
    match f {
        NFPROTO_INET => "inet",
        NFPROTO_IPV4 => "ip",
        NFPROTO_IPV6 => "ip6",
        _ => "?",
    }
}

/// (name, data) of each expression in an NFTA_RULE_EXPRESSIONS payload.
fn exprs(list: &[u8]) -> Vec<(String, &[u8])> {
    Attrs(list)
        .filter(|e| e.ty == a(sys::NFTA_LIST_ELEM))
        .map(|e| {
            let at = e.nested();
            let name = at
                .get(a(sys::NFTA_EXPR_NAME))
                .and_then(|x| x.str())
                .unwrap_or_default()
                .to_string();
            let data = at
                .get(a(sys::NFTA_EXPR_DATA))
                .map(|x| x.data)
                .unwrap_or(&[]);
            (name, data)
        })
        .collect()
}

/// The comment in libnftnl's rule userdata TLVs.
fn udata_comment(u: &[u8]) -> Option<String> {
    let mut i = 0;
    while i + 2 <= u.len() {
        let (ty, len) = (u[i], u[i + 1] as usize);
        let val = u.get(i + 2..i + 2 + len)?;
        if ty == NFTNL_UDATA_RULE_COMMENT {
            let end = val.iter().position(|&b| b == 0).unwrap_or(val.len());
            return std::str::from_utf8(&val[..end]).ok().map(str::to_string);
        }
        i += 2 + len;
    }
    None
}

fn udata_with_comment(c: &str) -> Vec<u8> {
    let mut v = vec![NFTNL_UDATA_RULE_COMMENT, (c.len() + 1) as u8];
    v.extend_from_slice(c.as_bytes());
    v.push(0);
    v
}

/// Broad masquerade rules in `<family> nat POSTROUTING`, as iptables-nft writes them
/// (`-s <cidr> [! -o <if>] -j MASQUERADE`). Equals `nft -a list chain ip nat POSTROUTING`.
fn observe_foreign(sock: &mut Socket, f: Family) -> Result<Vec<ForeignRule>> {
    let family = nfproto(f);
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

/// Recognises `[oifname != X] ip saddr <cidr> [counter] masquerade` in any order of matches,
/// with nothing else. Returns the source CIDR and the excluded interface.
pub fn match_default_rule(f: Family, list: &[u8]) -> Option<(IpNet, Option<String>)> {
    let ex = exprs(list);
    let (saddr_off, alen) = match f {
        Family::V4 => (12u32, 4usize),
        Family::V6 => (8, 16),
    };
    let mut saddr: Option<IpNet> = None;
    let mut oif: Option<String> = None;
    let mut masq = false;
    let mut i = 0;
    while i < ex.len() {
        let (name, data) = (&ex[i].0, Attrs(ex[i].1));
        if masq {
            return None; // nothing may follow the verdict
        }
        match name.as_str() {
            "counter" => i += 1,
            "masq" => {
                masq = true;
                i += 1;
            }
            "target" => {
                if data.get(NFTA_TARGET_NAME).and_then(|x| x.str()) != Some("MASQUERADE") {
                    return None;
                }
                masq = true;
                i += 1;
            }
            "meta" => {
                let key = data.get(a(sys::NFTA_META_KEY)).and_then(|x| x.be32())?;
                let (cname, cdata) = ex.get(i + 1)?;
                if key != sys::NFT_META_OIFNAME || cname != "cmp" || oif.is_some() {
                    return None;
                }
                let c = Attrs(cdata);
                if c.get(a(sys::NFTA_CMP_OP)).and_then(|x| x.be32()) != Some(sys::NFT_CMP_NEQ) {
                    return None;
                }
                let val = c
                    .get(a(sys::NFTA_CMP_DATA))
                    .and_then(|d| d.nested().get(a(sys::NFTA_DATA_VALUE)))?;
                let end = val.data.iter().position(|&b| b == 0);
                let name = std::str::from_utf8(&val.data[..end.unwrap_or(val.data.len())]).ok()?;
                // Without a terminating NUL it is a prefix match (`docker+`).
                oif = Some(if end.is_some() {
                    name.to_string()
                } else {
                    format!("{name}+")
                });
                i += 2;
            }
            "payload" => {
                if saddr.is_some() {
                    return None;
                }
                let base = data.get(a(sys::NFTA_PAYLOAD_BASE)).and_then(|x| x.be32())?;
                let off = data
                    .get(a(sys::NFTA_PAYLOAD_OFFSET))
                    .and_then(|x| x.be32())?;
                let len = data.get(a(sys::NFTA_PAYLOAD_LEN)).and_then(|x| x.be32())? as usize;
                if base != sys::NFT_PAYLOAD_NETWORK_HEADER
                    || off != saddr_off
                    || len == 0
                    || len > alen
                {
                    return None;
                }
                let mut j = i + 1;
                let mut mask: Option<Vec<u8>> = None;
                if ex.get(j).map(|e| e.0.as_str()) == Some("bitwise") {
                    let b = Attrs(ex[j].1);
                    let m = b
                        .get(a(sys::NFTA_BITWISE_MASK))
                        .and_then(|d| d.nested().get(a(sys::NFTA_DATA_VALUE)))?;
                    let x = b
                        .get(a(sys::NFTA_BITWISE_XOR))
                        .and_then(|d| d.nested().get(a(sys::NFTA_DATA_VALUE)))?;
                    if x.data.iter().any(|&v| v != 0) || m.data.len() != len {
                        return None;
                    }
                    mask = Some(m.data.to_vec());
                    j += 1;
                }
                let (cname, cdata) = ex.get(j)?;
                if cname != "cmp" {
                    return None;
                }
                let c = Attrs(cdata);
                if c.get(a(sys::NFTA_CMP_OP)).and_then(|x| x.be32()) != Some(sys::NFT_CMP_EQ) {
                    return None;
                }
                let val = c
                    .get(a(sys::NFTA_CMP_DATA))
                    .and_then(|d| d.nested().get(a(sys::NFTA_DATA_VALUE)))?;
                if val.data.len() != len {
                    return None;
                }
                let prefix = match &mask {
                    None => len * 8,
                    Some(m) => {
                        let ones: u32 = m.iter().map(|b| b.count_ones()).sum();
                        // the mask must be contiguous leading ones
                        let mut expect = vec![0u8; len];
                        for (bit, byte) in (0..ones as usize).map(|b| (b, b / 8)) {
                            expect[byte] |= 0x80 >> (bit % 8);
                        }
                        if &expect != m {
                            return None;
                        }
                        ones as usize
                    }
                };
                let mut full = vec![0u8; alen];
                full[..len].copy_from_slice(val.data);
                let addr = f.addr_from_bytes(&full)?;
                let net = match f {
                    Family::V4 => {
                        IpNet::V4(ipnet::Ipv4Net::new((addr as u32).into(), prefix as u8).ok()?)
                    }
                    Family::V6 => IpNet::V6(ipnet::Ipv6Net::new(addr.into(), prefix as u8).ok()?),
                };
                if net.trunc() != net {
                    return None;
                }
                saddr = Some(net);
                i = j + 1;
            }
            _ => return None,
        }
    }
    if masq {
        saddr.map(|s| (s, oif))
    } else {
        None
    }
}

// ---------------------------------------------------------------- encoding

fn put_expr(w: &mut Writer, name: &str, body: impl FnOnce(&mut Writer)) {
    let el = w.nest_begin(a(sys::NFTA_LIST_ELEM));
    w.put_str(a(sys::NFTA_EXPR_NAME), name);
    let d = w.nest_begin(a(sys::NFTA_EXPR_DATA));
    body(w);
    w.nest_end(d);
    w.nest_end(el);
}

fn put_data_value(w: &mut Writer, ty: u16, value: &[u8]) {
    let n = w.nest_begin(ty);
    w.put(a(sys::NFTA_DATA_VALUE), value);
    w.nest_end(n);
}

fn expr_meta(w: &mut Writer, key: u32) {
    put_expr(w, "meta", |w| {
        w.put_be32(a(sys::NFTA_META_KEY), key);
        w.put_be32(a(sys::NFTA_META_DREG), sys::NFT_REG_1);
    });
}

fn expr_cmp_eq(w: &mut Writer, value: &[u8]) {
    put_expr(w, "cmp", |w| {
        w.put_be32(a(sys::NFTA_CMP_SREG), sys::NFT_REG_1);
        w.put_be32(a(sys::NFTA_CMP_OP), sys::NFT_CMP_EQ);
        put_data_value(w, a(sys::NFTA_CMP_DATA), value);
    });
}

fn expr_payload_nh(w: &mut Writer, offset: u32, len: u32) {
    put_expr(w, "payload", |w| {
        w.put_be32(a(sys::NFTA_PAYLOAD_DREG), sys::NFT_REG_1);
        w.put_be32(a(sys::NFTA_PAYLOAD_BASE), sys::NFT_PAYLOAD_NETWORK_HEADER);
        w.put_be32(a(sys::NFTA_PAYLOAD_OFFSET), offset);
        w.put_be32(a(sys::NFTA_PAYLOAD_LEN), len);
    });
}

fn expr_lookup(w: &mut Writer, set: &str) {
    put_expr(w, "lookup", |w| {
        w.put_str(a(sys::NFTA_LOOKUP_SET), set);
        w.put_be32(a(sys::NFTA_LOOKUP_SREG), sys::NFT_REG_1);
    });
}

fn expr_counter(w: &mut Writer) {
    put_expr(w, "counter", |w| {
        w.put_be64(a(sys::NFTA_COUNTER_BYTES), 0);
        w.put_be64(a(sys::NFTA_COUNTER_PACKETS), 0);
    });
}

fn expr_return(w: &mut Writer) {
    put_expr(w, "immediate", |w| {
        w.put_be32(a(sys::NFTA_IMMEDIATE_DREG), sys::NFT_REG_VERDICT);
        let d = w.nest_begin(a(sys::NFTA_IMMEDIATE_DATA));
        let v = w.nest_begin(a(sys::NFTA_DATA_VERDICT));
        w.put_be32(a(sys::NFTA_VERDICT_CODE), libc::NFT_RETURN as u32);
        w.nest_end(v);
        w.nest_end(d);
    });
}

fn expr_masq(w: &mut Writer, random_fully: bool) {
    put_expr(w, "masq", |w| {
        if random_fully {
            w.put_be32(a(sys::NFTA_MASQ_FLAGS), NF_NAT_RANGE_PROTO_RANDOM_FULLY);
        }
    });
}

/// Offset and length of the source or destination address in the network header:
/// `offsetof(struct iphdr, saddr)` = 12, `daddr` = 16 (4 bytes);
/// `offsetof(struct ipv6hdr, saddr)` = 8, `daddr` = 24 (16 bytes).
pub(crate) fn addr_field(f: Family, source: bool) -> (u32, u32) {
    match (f, source) {
        (Family::V4, true) => (12, 4),
        (Family::V4, false) => (16, 4),
        (Family::V6, true) => (8, 16),
        (Family::V6, false) => (24, 16),
    }
}

/// `ip saddr @set` / `ip6 daddr @set` in an inet table: `meta nfproto` check, payload, lookup.
///
/// ```text
/// [ meta load nfproto => reg 1 ] [ cmp eq reg 1 0x02 ]          (with_proto)
/// [ payload load 4b @ network header + 12 => reg 1 ] [ lookup reg 1 set pod4 ]
/// ```
fn match_addr_set(w: &mut Writer, f: Family, source: bool, set: &str, with_proto: bool) {
    if with_proto {
        expr_meta(w, sys::NFT_META_NFPROTO);
        expr_cmp_eq(w, &[nfproto(f)]);
    }
    let (off, len) = addr_field(f, source);
    expr_payload_nh(w, off, len);
    expr_lookup(w, set);
}

/// `meta mark & MASK == VALUE` (`meta mark VALUE` when the mask is all ones). The mark is a
/// host-order u32 in the register, so the constants are too:
///
/// ```text
/// [ meta load mark => reg 1 ]
/// [ bitwise reg 1 = ( reg 1 & 0x00004000 ) ^ 0x00000000 ]    (mask not all ones)
/// [ cmp eq reg 1 0x00004000 ]
/// ```
fn match_mark(w: &mut Writer, value: u32, mask: u32) {
    expr_meta(w, sys::NFT_META_MARK);
    if mask != u32::MAX {
        put_expr(w, "bitwise", |w| {
            w.put_be32(a(sys::NFTA_BITWISE_SREG), sys::NFT_REG_1);
            w.put_be32(a(sys::NFTA_BITWISE_DREG), sys::NFT_REG_1);
            w.put_be32(a(sys::NFTA_BITWISE_LEN), 4);
            put_data_value(w, a(sys::NFTA_BITWISE_MASK), &mask.to_ne_bytes());
            put_data_value(w, a(sys::NFTA_BITWISE_XOR), &0u32.to_ne_bytes());
        });
    }
    expr_cmp_eq(w, &value.to_ne_bytes());
}

/// `snat ip to ip saddr` / `snat ip6 to ip6 saddr`: the identity source NAT of the guard. The
/// source address is loaded again (the lookups before it overwrote register 1) and used as
/// the NAT address; the kernel sets NF_NAT_RANGE_MAP_IPS itself for a register address.
///
/// ```text
/// [ payload load 4b @ network header + 12 => reg 1 ]
/// [ nat snat ip addr_min reg 1 ]
/// ```
fn stmt_identity_snat(w: &mut Writer, f: Family) {
    let (off, len) = addr_field(f, true);
    expr_payload_nh(w, off, len);
    put_expr(w, "nat", |w| {
        w.put_be32(a(sys::NFTA_NAT_TYPE), sys::NFT_NAT_SNAT);
        w.put_be32(a(sys::NFTA_NAT_FAMILY), nfproto(f) as u32);
        w.put_be32(a(sys::NFTA_NAT_REG_ADDR_MIN), sys::NFT_REG_1);
    });
}

/// Encodes the expressions of one of masqd's rules (each statement's nft text in
/// [`RuleSpec::nft`]).
fn encode_rule_exprs(w: &mut Writer, r: &RuleSpec) {
    match r {
        // oifname "docker0" return
        RuleSpec::BridgeReturn(b) => {
            expr_meta(w, sys::NFT_META_OIFNAME);
            let mut name = [0u8; IFNAMSIZ];
            let n = b.len().min(IFNAMSIZ - 1);
            name[..n].copy_from_slice(&b.as_bytes()[..n]);
            expr_cmp_eq(w, &name);
            expr_return(w);
        }
        // meta mark & 0x00004000 == 0x00004000 return
        RuleSpec::MarkReturn(m) => {
            match_mark(w, m.value, m.mask);
            expr_return(w);
        }
        // ip saddr @pod4 ip daddr @nomasq4 counter snat ip to ip saddr
        RuleSpec::Guard(f) => {
            match_addr_set(w, *f, true, &crate::plan::pod_set(*f), true);
            match_addr_set(w, *f, false, &crate::plan::nomasq_set(*f), false);
            expr_counter(w);
            stmt_identity_snat(w, *f);
        }
        // ip saddr @pod4 counter masquerade [fully-random]
        RuleSpec::Masquerade {
            family,
            random_fully,
        } => {
            match_addr_set(w, *family, true, &crate::plan::pod_set(*family), true);
            expr_counter(w);
            expr_masq(w, *random_fully);
        }
    }
}

fn element(w: &mut Writer, f: Family, key: u128, end: bool) {
    let el = w.nest_begin(a(sys::NFTA_LIST_ELEM));
    put_data_value(w, a(sys::NFTA_SET_ELEM_KEY), &f.key_bytes(key));
    if end {
        w.put_be32(
            a(sys::NFTA_SET_ELEM_FLAGS),
            libc::NFT_SET_ELEM_INTERVAL_END as u32,
        );
    }
    w.nest_end(el);
}

/// Adds NEWSETELEM/DELSETELEM messages for `ranges`, split so that no attribute nest exceeds
/// 16 bits. Each range is a start element and, unless it ends at the top of the address space,
/// an INTERVAL_END element at one past its last address. Equals
/// `nft add element inet masqd <set> { a-b, … }` (or `delete element`).
fn element_messages(txn: &mut Transaction, add: bool, set: &str, f: Family, ranges: &[Range]) {
    let kind = if add {
        sys::NFT_MSG_NEWSETELEM
    } else {
        sys::NFT_MSG_DELSETELEM
    };
    let flags = if add { NLM_F_CREATE } else { 0 };
    let verb = if add { "add" } else { "delete" };
    let top = f.max();
    let mut i = 0;
    while i < ranges.len() {
        let first = i;
        txn.begin_raw(kind, flags, NFPROTO_INET, String::new());
        let w = txn.writer();
        w.put_str(a(sys::NFTA_SET_ELEM_LIST_TABLE), TABLE);
        w.put_str(a(sys::NFTA_SET_ELEM_LIST_SET), set);
        let list = w.nest_begin(a(sys::NFTA_SET_ELEM_LIST_ELEMENTS));
        while i < ranges.len() && w.nest_len(list) < MAX_NEST {
            let r = ranges[i];
            element(w, f, r.start, false);
            if r.end < top {
                element(w, f, r.end + 1, true);
            }
            i += 1;
        }
        w.nest_end(list);
        txn.end_raw();
        let desc = if i - first == 1 {
            ranges[first].display(f)
        } else {
            format!(
                "{} … {} ({} intervals)",
                ranges[first].display(f),
                ranges[i - 1].display(f),
                i - first
            )
        };
        txn.set_last_what(format!("{verb} element inet {TABLE} {set} {{ {desc} }}"));
    }
}

fn inet_table() -> Table {
    Table::new(ProtocolFamily::Inet).with_name(TABLE)
}

fn set_object(name: &str) -> Set {
    // rustables' Set defaults to family Unspec, which the kernel answers with ENOENT.
    let mut set = Set::default().with_table(TABLE).with_name(name);
    set.family = ProtocolFamily::Inet;
    set
}

/// Builds the transaction for a plan. Every change maps to the nft command in its `Display`.
pub fn transaction(changes: &[Change], genid: Option<u32>) -> Transaction {
    let mut txn = Transaction::new(genid);
    // Start and end element of each interval: 40 bytes (IPv4) or 64 bytes (IPv6), plus the
    // per-message headers of each 60 kB chunk.
    let bytes: usize = changes
        .iter()
        .map(|c| match c {
            Change::AddElements { family, ranges, .. }
            | Change::DeleteElements { family, ranges, .. } => {
                ranges.len() * if *family == Family::V4 { 40 } else { 64 } * 101 / 100 + 128
            }
            _ => 512,
        })
        .sum();
    txn.reserve(bytes);
    let mut set_id = 1u32;
    for c in changes {
        let what = c.to_string();
        match c {
            Change::AddTable => txn.add_objects(what, |b| b.add(&inet_table(), MsgType::Add)),
            Change::DeleteTable => txn.add_objects(what, |b| b.add(&inet_table(), MsgType::Del)),
            Change::AddChain => txn.add_objects(what, |b| {
                let chain = Chain::new(&inet_table())
                    .with_name(CHAIN)
                    .with_hook(Hook::new(HookClass::PostRouting, CHAIN_PRIORITY))
                    .with_policy(ChainPolicy::Accept)
                    .with_type(ChainType::Nat);
                b.add(&chain, MsgType::Add)
            }),
            Change::DeleteChain(name) => txn.add_objects(what, |b| {
                b.add(
                    &Chain::new(&inet_table()).with_name(name.as_str()),
                    MsgType::Del,
                )
            }),
            Change::FlushChain(name) => {
                txn.message(sys::NFT_MSG_DELRULE, 0, NFPROTO_INET, what, |w| {
                    w.put_str(a(sys::NFTA_RULE_TABLE), TABLE);
                    w.put_str(a(sys::NFTA_RULE_CHAIN), name);
                })
            }
            Change::DeleteRule { handle, .. } => {
                txn.message(sys::NFT_MSG_DELRULE, 0, NFPROTO_INET, what, |w| {
                    w.put_str(a(sys::NFTA_RULE_TABLE), TABLE);
                    w.put_str(a(sys::NFTA_RULE_CHAIN), CHAIN);
                    w.put_be64(a(sys::NFTA_RULE_HANDLE), *handle);
                })
            }
            Change::DeleteSet(name) => {
                txn.add_objects(what, |b| b.add(&set_object(name), MsgType::Del))
            }
            Change::AddSet { name, family } => {
                let (ty, len) = match family {
                    Family::V4 => (NFT_TYPE_IPADDR, 4u32),
                    Family::V6 => (NFT_TYPE_IP6ADDR, 16u32),
                };
                let set = set_object(name)
                    .with_flags(libc::NFT_SET_INTERVAL as u32)
                    .with_key_type(ty)
                    .with_key_len(len)
                    .with_id(set_id)
                    .with_userdata(SET_USERDATA.to_vec());
                set_id += 1;
                txn.add_objects(what, |b| b.add(&set, MsgType::Add))
            }
            Change::DeleteElements {
                set,
                family,
                ranges,
            } => element_messages(&mut txn, false, set, *family, ranges),
            Change::AddElements {
                set,
                family,
                ranges,
            } => element_messages(&mut txn, true, set, *family, ranges),
            Change::AddRule(r) => txn.message(
                sys::NFT_MSG_NEWRULE,
                NLM_F_CREATE | NLM_F_APPEND,
                NFPROTO_INET,
                what,
                |w| {
                    w.put_str(a(sys::NFTA_RULE_TABLE), TABLE);
                    w.put_str(a(sys::NFTA_RULE_CHAIN), CHAIN);
                    let l = w.nest_begin(a(sys::NFTA_RULE_EXPRESSIONS));
                    encode_rule_exprs(w, r);
                    w.nest_end(l);
                    w.put(a(sys::NFTA_RULE_USERDATA), &udata_with_comment(&r.tag()));
                },
            ),
            Change::RemoveDefaultRule(r) => txn.message(
                sys::NFT_MSG_DELRULE,
                0,
                nfproto(r.table_family),
                what,
                |w| {
                    w.put_str(a(sys::NFTA_RULE_TABLE), &r.table);
                    w.put_str(a(sys::NFTA_RULE_CHAIN), &r.chain);
                    w.put_be64(a(sys::NFTA_RULE_HANDLE), r.handle);
                },
            ),
        }
    }
    txn
}

/// The record that lets teardown put a removed default rule back.
pub fn record_of(r: &ForeignRule) -> RemovedRule {
    RemovedRule {
        backend: "nft".into(),
        family: fam_kw(r.table_family).into(),
        table: r.table.clone(),
        chain: r.chain.clone(),
        description: r.describe(),
        saddr: r.saddr.to_string(),
        oif_neq: r.oif_neq.clone(),
        expressions_hex: hex(&r.expressions),
        userdata_hex: r.userdata.as_deref().map(hex),
        legacy_rule: None,
    }
}

/// Applies changes as one transaction. Equals `nft -f` of the plan's lines, atomically.
pub fn apply(sock: &mut Socket, changes: &[Change], genid: Option<u32>) -> Result<(), NlError> {
    if changes.is_empty() {
        return Ok(());
    }
    sock.commit(transaction(changes, genid))
}

/// A recorded nftables rule checked by [`replayable`].
#[derive(Debug, Clone)]
pub struct Replay {
    /// Its table's family.
    pub family: Family,
    /// Raw NFTA_RULE_EXPRESSIONS payload.
    pub exprs: Vec<u8>,
    /// Raw NFTA_RULE_USERDATA payload.
    pub udata: Option<Vec<u8>>,
}

/// Checks that a record may be replayed: an nftables record of `ip`/`ip6 nat POSTROUTING` whose
/// expressions still decode as the broad default rule ([`match_default_rule`]) for the record's
/// source CIDR and interface. Returns the family and the raw bytes, or why not.
pub fn replayable(rec: &RemovedRule) -> Result<Replay, String> {
    let f = match rec.family.as_str() {
        "ip" => Family::V4,
        "ip6" => Family::V6,
        other => return Err(format!("unknown family {other:?}")),
    };
    if rec.backend != "nft" || rec.table != "nat" || rec.chain != "POSTROUTING" {
        return Err(format!(
            "not a rule of {} nat POSTROUTING ({} {} {})",
            rec.family, rec.backend, rec.table, rec.chain
        ));
    }
    let exprs = unhex(&rec.expressions_hex).ok_or("expressions_hex is not hex")?;
    let udata = match &rec.userdata_hex {
        Some(h) => Some(unhex(h).ok_or("userdata_hex is not hex")?),
        None => None,
    };
    if udata.as_ref().is_some_and(|u| u.len() > 256) {
        return Err("userdata longer than the kernel's 256 bytes".into());
    }
    let saddr: IpNet = rec
        .saddr
        .parse()
        .map_err(|_| format!("saddr {:?} is not a CIDR", rec.saddr))?;
    match match_default_rule(f, &exprs) {
        Some((s, oif)) if s == saddr && oif == rec.oif_neq => Ok(Replay {
            family: f,
            exprs,
            udata,
        }),
        Some((s, oif)) => Err(format!(
            "its expressions are a masquerade rule for {s} (! -o {oif:?}), not for {saddr} \
             (! -o {:?})",
            rec.oif_neq
        )),
        None => Err("its expressions are not a broad masquerade rule".into()),
    }
}

/// Whether a family's `nat` table and its `POSTROUTING` chain exist. Equals
/// `nft list table <family> nat` and `nft list chain <family> nat POSTROUTING` succeeding.
fn nat_postrouting(sock: &mut Socket, f: Family) -> Result<(bool, bool)> {
    let family = nfproto(f);
    let tables = sock.dump(sys::NFT_MSG_GETTABLE, family, "list tables", |_| {})?;
    let name = |m: &netlink::Msg, attr| m.attrs().get(a(attr)).and_then(|x| x.str()) == Some("nat");
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

/// Puts recorded default rules back, in one transaction, creating `table <family> nat` and its
/// chain `POSTROUTING` where missing (as iptables-nft creates them). A record whose rule is
/// present already (Docker re-inserted it) is skipped. Every record is checked with
/// [`replayable`] first. Returns the descriptions of the rules put back. Equals
/// `nft add table ip nat; nft add chain ip nat POSTROUTING { type nat hook postrouting priority
/// srcnat; policy accept; }; nft add rule ip nat POSTROUTING …` per record, atomically.
pub fn restore_rules(sock: &mut Socket, records: &[&RemovedRule]) -> Result<Vec<String>> {
    let genid = genid(sock)?;
    let mut txn = Transaction::new(Some(genid));
    let mut restored = Vec::new();
    for f in Family::ALL {
        let recs: Vec<_> = records.iter().filter(|r| r.family == fam_kw(f)).collect();
        if recs.is_empty() {
            continue;
        }
        let present_now = observe_foreign(sock, f)?;
        let (mut table, mut chain) = nat_postrouting(sock, f)?;
        for rec in recs {
            let Replay { exprs, udata, .. } = replayable(rec)
                .map_err(|why| anyhow::anyhow!("record of {}: {why}", rec.description))?;
            let present = present_now.iter().any(|r| {
                r.table == rec.table
                    && r.chain == rec.chain
                    && r.saddr.to_string() == rec.saddr
                    && r.oif_neq == rec.oif_neq
            });
            if present {
                continue;
            }
            let nat = Table::new(if f == Family::V4 {
                ProtocolFamily::Ipv4
            } else {
                ProtocolFamily::Ipv6
            })
            .with_name("nat");
            if !table {
                txn.add_objects(format!("add table {} nat", fam_kw(f)), |b| {
                    b.add(&nat, MsgType::Add)
                });
                table = true;
            }
            if !chain {
                let what = format!("add chain {} nat POSTROUTING", fam_kw(f));
                txn.add_objects(what, |b| {
                    let c = Chain::new(&nat)
                        .with_name("POSTROUTING")
                        .with_hook(Hook::new(HookClass::PostRouting, 100))
                        .with_policy(ChainPolicy::Accept)
                        .with_type(ChainType::Nat);
                    b.add(&c, MsgType::Add)
                });
                chain = true;
            }
            let what = format!("add rule {}", rec.description);
            txn.message(
                sys::NFT_MSG_NEWRULE,
                NLM_F_CREATE | NLM_F_APPEND,
                nfproto(f),
                what,
                |w| {
                    w.put_str(a(sys::NFTA_RULE_TABLE), &rec.table);
                    w.put_str(a(sys::NFTA_RULE_CHAIN), &rec.chain);
                    let l = w.nest_begin(a(sys::NFTA_RULE_EXPRESSIONS));
                    w.raw(&exprs);
                    w.nest_end(l);
                    if let Some(u) = &udata {
                        w.put(a(sys::NFTA_RULE_USERDATA), u);
                    }
                },
            );
            restored.push(rec.description.clone());
        }
    }
    sock.commit(txn)?;
    Ok(restored)
}

/// Whether masqd's table exists. Equals `nft list table inet masqd` succeeding.
pub fn own_table_exists(sock: &mut Socket) -> Result<bool> {
    Ok(table_exists(sock)?)
}

/// Removes masqd's table, if it exists. Equals `nft delete table inet masqd`.
pub fn delete_own_table(sock: &mut Socket) -> Result<(), NlError> {
    let genid = genid(sock)?;
    let mut txn = Transaction::new(Some(genid));
    if table_exists(sock)? {
        txn.add_objects(format!("delete table inet {TABLE}"), |b| {
            b.add(&inet_table(), MsgType::Del)
        });
    }
    sock.commit(txn)
}

/// Renders the ruleset masqd installs for a policy (its nftables part: [`Policy::nft_part`],
/// the guard only for a family in legacy xtables), as an `nft -f` file. Loaded with `nft -f`
/// it replaces masqd's table atomically (one transaction: `table inet masqd` declares it when
/// missing, `delete table inet masqd` removes it, then it is created anew), so loading it twice
/// leaves one copy, and it loads over a table of an older layout too. A policy with nothing in
/// nftables exports as the deletion of masqd's table, which is what `masqd apply` does then.
///
/// [`Policy::nft_part`]: crate::policy::Policy::nft_part
pub fn export(p: &crate::policy::Policy) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(s, "#!/usr/sbin/nft -f");
    let _ = writeln!(
        s,
        "# masqd export: replaces table inet {TABLE} atomically; load with `nft -f FILE`"
    );
    let _ = writeln!(s, "table inet {TABLE}");
    let _ = writeln!(s, "delete table inet {TABLE}");
    if p.v4.is_none() && p.v6.is_none() {
        return s;
    }
    let _ = writeln!(s, "table inet {TABLE} {{");
    for (name, (f, ranges)) in crate::plan::desired_sets(p) {
        let _ = writeln!(s, "\tset {name} {{");
        let _ = writeln!(s, "\t\ttype {f}_addr");
        let _ = writeln!(s, "\t\tflags interval");
        if !ranges.is_empty() {
            let items: Vec<String> = ranges.iter().map(|r| r.display(f)).collect();
            let _ = writeln!(s, "\t\telements = {{ {} }}", items.join(",\n\t\t\t     "));
        }
        let _ = writeln!(s, "\t}}");
    }
    let _ = writeln!(s, "\tchain {CHAIN} {{");
    let _ = writeln!(
        s,
        "\t\ttype nat hook postrouting priority {}; policy accept;",
        crate::plan::CHAIN_PRIORITY_NFT
    );
    for r in crate::plan::desired_rules(p) {
        let _ = writeln!(s, "\t\t{}", r.nft());
    }
    let _ = writeln!(s, "\t}}");
    let _ = writeln!(s, "}}");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(a: u128, b: u128) -> Range {
        Range { start: a, end: b }
    }

    #[test]
    fn ranges_from_elements() {
        // nft's leading end element at 0, adjacent intervals, an open top interval.
        let e = vec![
            (0, true),
            (10, false),
            (20, true),
            (20, false),
            (30, true),
            (100, false),
        ];
        assert_eq!(
            elements_to_ranges(e, u32::MAX as u128),
            Some(vec![r(10, 19), r(20, 29), r(100, u32::MAX as u128)])
        );
        assert_eq!(elements_to_ranges(vec![(1, false), (2, false)], 7), None);
    }

    #[test]
    fn udata_roundtrip() {
        assert_eq!(
            udata_comment(&udata_with_comment("masqd:guard:4")).as_deref(),
            Some("masqd:guard:4")
        );
    }

    fn iptables_nft_rule(
        f: Family,
        saddr: &[u8],
        plen: u32,
        mask: Option<&[u8]>,
        oif: Option<&[u8]>,
        target: &str,
    ) -> Vec<u8> {
        let mut w = Writer::default();
        if let Some(o) = oif {
            expr_meta(&mut w, sys::NFT_META_OIFNAME);
            put_expr(&mut w, "cmp", |w| {
                w.put_be32(a(sys::NFTA_CMP_SREG), 1);
                w.put_be32(a(sys::NFTA_CMP_OP), sys::NFT_CMP_NEQ);
                put_data_value(w, a(sys::NFTA_CMP_DATA), o);
            });
        }
        let off = if f == Family::V4 { 12 } else { 8 };
        expr_payload_nh(&mut w, off, plen);
        if let Some(m) = mask {
            put_expr(&mut w, "bitwise", |w| {
                put_data_value(w, a(sys::NFTA_BITWISE_MASK), m);
                put_data_value(w, a(sys::NFTA_BITWISE_XOR), &vec![0; m.len()]);
            });
        }
        expr_cmp_eq(&mut w, saddr);
        expr_counter(&mut w);
        if target == "masq" {
            expr_masq(&mut w, false);
        } else {
            put_expr(&mut w, "target", |w| w.put_str(NFTA_TARGET_NAME, target));
        }
        w.into_bytes()
    }

    #[test]
    fn only_default_rules_for_their_record_are_replayable() {
        let exprs = iptables_nft_rule(
            Family::V4,
            &[172, 7, 21],
            3,
            None,
            Some(b"docker0\0"),
            "MASQUERADE",
        );
        let rec = RemovedRule {
            backend: "nft".into(),
            family: "ip".into(),
            table: "nat".into(),
            chain: "POSTROUTING".into(),
            description: "ip nat POSTROUTING x".into(),
            saddr: "172.7.21.0/24".into(),
            oif_neq: Some("docker0".into()),
            expressions_hex: hex(&exprs),
            userdata_hex: None,
            legacy_rule: None,
        };
        let ok = replayable(&rec).unwrap();
        assert_eq!((ok.family, ok.exprs), (Family::V4, exprs.clone()));
        let refused = |f: &dyn Fn(&mut RemovedRule)| {
            let mut r = rec.clone();
            f(&mut r);
            replayable(&r).unwrap_err()
        };
        assert!(refused(&|r| r.saddr = "10.0.0.0/8".into()).contains("not for 10.0.0.0/8"));
        assert!(refused(&|r| r.oif_neq = None).contains("not for"));
        assert!(refused(&|r| r.family = "ip6".into()).contains("not a broad masquerade"));
        refused(&|r| r.table = "filter".into());
        refused(&|r| r.expressions_hex = "zz".into());
        let snat = iptables_nft_rule(Family::V4, &[172, 7, 21], 3, None, None, "SNAT");
        assert!(refused(&|r| r.expressions_hex = hex(&snat)).contains("not a broad"));
    }

    #[test]
    fn default_rule_matcher() {
        let b = iptables_nft_rule(
            Family::V4,
            &[172, 7, 21],
            3,
            None,
            Some(b"docker0\0"),
            "MASQUERADE",
        );
        assert_eq!(
            match_default_rule(Family::V4, &b),
            Some(("172.7.21.0/24".parse().unwrap(), Some("docker0".into())))
        );
        let b = iptables_nft_rule(
            Family::V4,
            &[10, 0, 0, 0],
            4,
            Some(&[255, 255, 240, 0]),
            None,
            "masq",
        );
        assert_eq!(
            match_default_rule(Family::V4, &b),
            Some(("10.0.0.0/20".parse().unwrap(), None))
        );
        // A non-contiguous mask, another target: not the default rule.
        let b = iptables_nft_rule(
            Family::V4,
            &[10, 0, 0, 0],
            4,
            Some(&[255, 0, 255, 0]),
            None,
            "masq",
        );
        assert_eq!(match_default_rule(Family::V4, &b), None);
        let b = iptables_nft_rule(Family::V4, &[10, 0, 0], 3, None, None, "SNAT");
        assert_eq!(match_default_rule(Family::V4, &b), None);
        let b = iptables_nft_rule(
            Family::V6,
            &[0xfd, 0, 0, 7, 0, 0x21, 0, 0],
            8,
            None,
            Some(b"docker"),
            "MASQUERADE",
        );
        assert_eq!(
            match_default_rule(Family::V6, &b),
            Some(("fd00:7:21::/64".parse().unwrap(), Some("docker+".into())))
        );
    }
}
