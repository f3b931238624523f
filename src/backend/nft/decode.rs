//! Decode: expression lists of rules read from the kernel, libnftnl's userdata comments,
//! interval elements back into ranges, and the matcher of the broad default rule.

use ipnet::IpNet;
use rustables::sys;

use super::a;
use super::encode::addr_field;
use crate::netlink::Attrs;
use crate::policy::{Family, Range};

/// `NFTA_TARGET_NAME` of the xtables `target` expression (iptables-nft's `-j MASQUERADE`).
pub(crate) const NFTA_TARGET_NAME: u16 = 1;
/// libnftnl's `NFTNL_UDATA_RULE_COMMENT` TLV type in rule userdata.
pub(crate) const NFTNL_UDATA_RULE_COMMENT: u8 = 0;

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

/// (name, data) of each expression in an NFTA_RULE_EXPRESSIONS payload.
pub(crate) fn exprs(list: &[u8]) -> Vec<(String, &[u8])> {
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
pub(crate) fn udata_comment(u: &[u8]) -> Option<String> {
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

/// Recognises `[oifname != X] ip saddr <cidr> [counter] masquerade` in any order of matches,
/// with nothing else. Returns the source CIDR and the excluded interface.
pub fn match_default_rule(f: Family, list: &[u8]) -> Option<(IpNet, Option<String>)> {
    let ex = exprs(list);
    let mut saddr: Option<IpNet> = None;
    let mut oif: Option<String> = None;
    let mut masq = false;
    let mut i = 0;
    while i < ex.len() {
        if masq {
            return None; // nothing may follow the verdict
        }
        let data = Attrs(ex[i].1);
        i = match ex[i].0.as_str() {
            "counter" => i + 1,
            // [ masq ]
            "masq" => {
                masq = true;
                i + 1
            }
            // [ target name MASQUERADE rev 0 ] (iptables-nft's xtables target)
            "target" => {
                if data.get(NFTA_TARGET_NAME).and_then(|x| x.str()) != Some("MASQUERADE") {
                    return None;
                }
                masq = true;
                i + 1
            }
            "meta" if oif.is_none() => {
                oif = Some(oifname_neq(data, ex.get(i + 1)?)?);
                i + 2
            }
            "payload" if saddr.is_none() => {
                let (net, next) = saddr_match(f, &ex, i)?;
                saddr = Some(net);
                next
            }
            _ => return None,
        };
    }
    if masq {
        saddr.map(|s| (s, oif))
    } else {
        None
    }
}

/// `[ meta load oifname => reg 1 ] [ cmp neq reg 1 "docker0" ]`: the interface name, with a
/// trailing `+` for a prefix match (no terminating NUL: `! -o docker+`).
fn oifname_neq(meta: Attrs<'_>, (cname, cdata): &(String, &[u8])) -> Option<String> {
    let key = meta.get(a(sys::NFTA_META_KEY)).and_then(|x| x.be32())?;
    if key != sys::NFT_META_OIFNAME || cname != "cmp" {
        return None;
    }
    let c = Attrs(cdata);
    if c.get(a(sys::NFTA_CMP_OP)).and_then(|x| x.be32()) != Some(sys::NFT_CMP_NEQ) {
        return None;
    }
    let val = data_value(c, sys::NFTA_CMP_DATA)?;
    let end = val.iter().position(|&b| b == 0);
    let name = std::str::from_utf8(&val[..end.unwrap_or(val.len())]).ok()?;
    Some(if end.is_some() {
        name.to_string()
    } else {
        format!("{name}+")
    })
}

/// The NFTA_DATA_VALUE inside the nested data attribute `ty` (`NFTA_CMP_DATA`, …).
fn data_value<'a>(at: Attrs<'a>, ty: impl TryInto<u16>) -> Option<&'a [u8]> {
    at.get(a(ty))
        .and_then(|d| d.nested().get(a(sys::NFTA_DATA_VALUE)))
        .map(|v| v.data)
}

/// `ip saddr <cidr>` starting at expression `i`: `[ payload load Nb @ network header + 12 =>
/// reg 1 ] [ bitwise reg 1 = (reg 1 & MASK) ^ 0 ]? [ cmp eq reg 1 PREFIX ]`. Returns the CIDR
/// and the index of the expression after the match.
fn saddr_match(f: Family, ex: &[(String, &[u8])], i: usize) -> Option<(IpNet, usize)> {
    let p = Attrs(ex[i].1);
    let field = addr_field(f, true);
    let base = p.get(a(sys::NFTA_PAYLOAD_BASE)).and_then(|x| x.be32())?;
    let off = p.get(a(sys::NFTA_PAYLOAD_OFFSET)).and_then(|x| x.be32())?;
    let len = p.get(a(sys::NFTA_PAYLOAD_LEN)).and_then(|x| x.be32())? as usize;
    if base != sys::NFT_PAYLOAD_NETWORK_HEADER
        || off != field.offset
        || len == 0
        || len > field.len as usize
    {
        return None;
    }
    let mut j = i + 1;
    let mut mask: Option<&[u8]> = None;
    if ex.get(j).map(|e| e.0.as_str()) == Some("bitwise") {
        let b = Attrs(ex[j].1);
        let m = data_value(b, sys::NFTA_BITWISE_MASK)?;
        let x = data_value(b, sys::NFTA_BITWISE_XOR)?;
        if x.iter().any(|&v| v != 0) || m.len() != len {
            return None;
        }
        mask = Some(m);
        j += 1;
    }
    let (cname, cdata) = ex.get(j)?;
    let c = Attrs(cdata);
    if cname != "cmp" || c.get(a(sys::NFTA_CMP_OP)).and_then(|x| x.be32()) != Some(sys::NFT_CMP_EQ)
    {
        return None;
    }
    let val = data_value(c, sys::NFTA_CMP_DATA)?;
    if val.len() != len {
        return None;
    }
    let prefix = match mask {
        None => len * 8,
        Some(m) => prefix_of_mask(m)?,
    };
    Some((network(f, val, prefix)?, j + 1))
}

/// The prefix length of a mask of contiguous leading ones; None for any other mask.
fn prefix_of_mask(m: &[u8]) -> Option<usize> {
    let ones: u32 = m.iter().map(|b| b.count_ones()).sum();
    let mut expect = vec![0u8; m.len()];
    for (bit, byte) in (0..ones as usize).map(|b| (b, b / 8)) {
        expect[byte] |= 0x80 >> (bit % 8);
    }
    (expect == m).then_some(ones as usize)
}

/// The network `prefix`/`prefix_len` of family `f`; None when host bits are set.
fn network(f: Family, prefix: &[u8], prefix_len: usize) -> Option<IpNet> {
    let mut full = vec![0u8; f.addr_len()];
    full.get_mut(..prefix.len())?.copy_from_slice(prefix);
    let addr = f.addr_from_bytes(&full)?;
    let net = match f {
        Family::V4 => IpNet::V4(ipnet::Ipv4Net::new((addr as u32).into(), prefix_len as u8).ok()?),
        Family::V6 => IpNet::V6(ipnet::Ipv6Net::new(addr.into(), prefix_len as u8).ok()?),
    };
    (net.trunc() == net).then_some(net)
}
