//! Source NAT rules in nftables tables masqd does not own, decoded just far enough to say
//! whether they can apply to the node's pod traffic ([`crate::foreign`] decides and explains).
//! Read only: masqd never modifies these tables.

use anyhow::Result;
use ipnet::IpNet;
use rustables::sys;

use super::netlink::{Attr, Attrs, Socket};
use super::{a, addr_field, exprs, family_name, retry, NFPROTO_INET, NFPROTO_IPV4, NFPROTO_IPV6};
use crate::foreign::{NatRule, SourceMatch};
use crate::plan::TABLE;
use crate::policy::Family;

const NFTA_TARGET_NAME: u16 = 1;
const NFT_LOOKUP_F_INV: u32 = 1;

/// Every masquerade / snat rule outside `table inet masqd`, in every family. Equals
/// `nft -a list ruleset` filtered to rules with a `masquerade` or `snat` statement (or the
/// xtables `MASQUERADE` / `SNAT` targets iptables-nft writes).
pub fn nat_rules(sock: &mut Socket) -> Result<Vec<NatRule>> {
    let msgs = retry(|| sock.dump(sys::NFT_MSG_GETRULE, 0, "list ruleset (rules)", |_| {}))?;
    let mut out = Vec::new();
    for m in &msgs {
        let at = m.attrs();
        let table = at.get(a(sys::NFTA_RULE_TABLE)).and_then(|x| x.str());
        let chain = at.get(a(sys::NFTA_RULE_CHAIN)).and_then(|x| x.str());
        let handle = at.get(a(sys::NFTA_RULE_HANDLE)).and_then(|x| x.be64());
        let (Some(table), Some(chain), Some(handle)) = (table, chain, handle) else {
            continue;
        };
        if m.family == NFPROTO_INET && table == TABLE {
            continue;
        }
        let Some(list) = at.get(a(sys::NFTA_RULE_EXPRESSIONS)) else {
            continue;
        };
        if let Some(d) = decode(m.family, list.data) {
            out.push(NatRule {
                backend: "nft",
                family: d.family,
                table_family: family_name(m.family).to_string(),
                table: table.to_string(),
                chain: chain.to_string(),
                handle,
                source: d.source,
                text: d.text.join(" "),
            });
        }
    }
    Ok(out)
}

/// What [`decode`] found in one rule.
#[derive(Debug)]
pub struct Decoded {
    /// The family it applies to.
    pub family: Option<Family>,
    /// Its source match.
    pub source: SourceMatch,
    /// nft-like words.
    pub text: Vec<String>,
}

fn data_value<'a>(at: Attrs<'a>, ty: impl TryInto<u16>) -> Option<&'a [u8]> {
    at.get(a(ty))
        .and_then(|d| d.nested().get(a(sys::NFTA_DATA_VALUE)))
        .map(|v| v.data)
}

fn be32(at: Attrs<'_>, ty: impl TryInto<u16>) -> Option<u32> {
    at.get(a(ty)).and_then(|x: Attr<'_>| x.be32())
}

/// Decodes a rule's expressions when it holds a source NAT statement; None otherwise.
pub fn decode(table_family: u8, list: &[u8]) -> Option<Decoded> {
    let ex = exprs(list);
    let mut family = match table_family {
        NFPROTO_IPV4 => Some(Family::V4),
        NFPROTO_IPV6 => Some(Family::V6),
        _ => None,
    };
    let mut source = SourceMatch::Any;
    let mut text = Vec::new();
    let mut nat = false;
    // The register-1 load of the previous expression, for the cmp/lookup that reads it.
    let mut loaded: Option<String> = None;
    let mut mask: Option<Vec<u8>> = None;
    for (name, data) in &ex {
        let at = Attrs(data);
        match name.as_str() {
            "meta" => {
                let key = be32(at, sys::NFTA_META_KEY)?;
                loaded = Some(match key {
                    sys::NFT_META_NFPROTO => "meta nfproto".into(),
                    sys::NFT_META_OIFNAME => "oifname".into(),
                    sys::NFT_META_IIFNAME => "iifname".into(),
                    sys::NFT_META_MARK => "meta mark".into(),
                    _ => "meta".into(),
                });
                mask = None;
            }
            "payload" => {
                let off = be32(at, sys::NFTA_PAYLOAD_OFFSET)?;
                let len = be32(at, sys::NFTA_PAYLOAD_LEN)?;
                let base = be32(at, sys::NFTA_PAYLOAD_BASE)?;
                let f = family.unwrap_or(if len > 4 { Family::V6 } else { Family::V4 });
                let kw = if f == Family::V4 { "ip" } else { "ip6" };
                loaded = Some(if base != sys::NFT_PAYLOAD_NETWORK_HEADER {
                    "payload".into()
                } else if off == addr_field(f, true).0 {
                    format!("{kw} saddr")
                } else if off == addr_field(f, false).0 {
                    format!("{kw} daddr")
                } else {
                    format!("{kw} @{off},{len}")
                });
                mask = None;
            }
            "bitwise" => mask = data_value(at, sys::NFTA_BITWISE_MASK).map(<[u8]>::to_vec),
            "cmp" => {
                let what = loaded.take().unwrap_or_else(|| "?".into());
                let neq = be32(at, sys::NFTA_CMP_OP) == Some(sys::NFT_CMP_NEQ);
                let val = data_value(at, sys::NFTA_CMP_DATA).unwrap_or(&[]);
                if what == "meta nfproto" {
                    family = match val.first() {
                        Some(&p) if p == NFPROTO_IPV4 => Some(Family::V4),
                        Some(&p) if p == NFPROTO_IPV6 => Some(Family::V6),
                        _ => family,
                    };
                    continue;
                }
                let shown = show_value(&what, val, mask.as_deref(), family);
                if what.ends_with(" saddr") {
                    source = match shown.1 {
                        Some(n) if neq => SourceMatch::NotNet(n),
                        Some(n) => SourceMatch::Net(n),
                        None => SourceMatch::Unknown,
                    };
                }
                text.push(format!(
                    "{what} {}{}",
                    if neq { "!= " } else { "" },
                    shown.0
                ));
            }
            "lookup" => {
                let what = loaded.take().unwrap_or_else(|| "?".into());
                let set = at
                    .get(a(sys::NFTA_LOOKUP_SET))
                    .and_then(|x| x.str())
                    .unwrap_or("?");
                let inv = be32(at, sys::NFTA_LOOKUP_FLAGS).unwrap_or(0) & NFT_LOOKUP_F_INV != 0;
                if what.ends_with(" saddr") {
                    source = SourceMatch::Unknown;
                }
                text.push(format!("{what} {}@{set}", if inv { "!= " } else { "" }));
            }
            "counter" => text.push("counter".into()),
            "masq" => {
                nat = true;
                text.push("masquerade".into());
            }
            "nat" => {
                if be32(at, sys::NFTA_NAT_TYPE) != Some(sys::NFT_NAT_SNAT) {
                    return None;
                }
                nat = true;
                text.push("snat".into());
            }
            "target" => {
                let t = at
                    .get(NFTA_TARGET_NAME)
                    .and_then(|x| x.str())
                    .unwrap_or("?");
                if t == "MASQUERADE" || t == "SNAT" {
                    nat = true;
                }
                text.push(format!("xt target {t}"));
            }
            "immediate" => text.push("(verdict)".into()),
            other => text.push(format!("({other})")),
        }
    }
    nat.then_some(Decoded {
        family,
        source,
        text,
    })
}

/// The text of a compared value, and the network when it is an address (with its mask).
fn show_value(
    what: &str,
    val: &[u8],
    mask: Option<&[u8]>,
    family: Option<Family>,
) -> (String, Option<IpNet>) {
    if what == "oifname" || what == "iifname" {
        let end = val.iter().position(|&b| b == 0);
        let s = String::from_utf8_lossy(&val[..end.unwrap_or(val.len())]).into_owned();
        return (
            format!("\"{s}{}\"", if end.is_none() { "*" } else { "" }),
            None,
        );
    }
    if what.ends_with("saddr") || what.ends_with("daddr") {
        let f = family.unwrap_or(if what.starts_with("ip6") {
            Family::V6
        } else {
            Family::V4
        });
        let alen = f.addr_len();
        if val.len() <= alen {
            let mut full = vec![0u8; alen];
            full[..val.len()].copy_from_slice(val);
            let prefix = match mask {
                Some(m) => m.iter().map(|b| b.count_ones()).sum::<u32>() as u8,
                None => (val.len() * 8) as u8,
            };
            if let Some(addr) = f.addr_from_bytes(&full) {
                let net = match f {
                    Family::V4 => ipnet::Ipv4Net::new((addr as u32).into(), prefix)
                        .ok()
                        .map(IpNet::V4),
                    Family::V6 => ipnet::Ipv6Net::new(addr.into(), prefix).ok().map(IpNet::V6),
                };
                if let Some(n) = net {
                    return (n.trunc().to_string(), Some(n.trunc()));
                }
            }
        }
    }
    let hex: String = val.iter().map(|b| format!("{b:02x}")).collect();
    (format!("0x{hex}"), None)
}
