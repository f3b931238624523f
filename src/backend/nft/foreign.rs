//! Source NAT rules in nftables tables masqd does not own, decoded just far enough to say
//! whether they can apply to the node's pod traffic ([`crate::foreign`] decides and explains).
//! Read only: masqd never modifies these tables.

use anyhow::Result;
use ipnet::IpNet;
use rustables::sys;

use super::decode::exprs;
use super::encode::addr_field;
use super::model::TABLE;
use super::{a, family_name, family_of_nfproto, NFPROTO_INET};
use crate::foreign::{NatRule, SourceMatch};
use crate::netlink::{Attr, Attrs, Socket};
use crate::policy::Family;

const NFTA_TARGET_NAME: u16 = 1;
const NFT_LOOKUP_F_INV: u32 = 1;

/// Every masquerade / snat rule outside `table inet masqd`, in every family. Equals
/// `nft -a list ruleset` filtered to rules with a `masquerade` or `snat` statement (or the
/// xtables `MASQUERADE` / `SNAT` targets iptables-nft writes).
pub fn nat_rules(sock: &mut Socket) -> Result<Vec<NatRule>> {
    let prio = postrouting_priorities(sock)?;
    let msgs = sock.dump(sys::NFT_MSG_GETRULE, 0, "list ruleset (rules)", |_| {})?;
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
        let key = (m.family, table.to_string());
        let priority = match prio.get(&(key.clone(), chain.to_string())) {
            Some(Some(p)) => *p,
            Some(None) => continue, // a base chain at another hook: not pod traffic leaving
            None => match prio.get(&(key, String::new())) {
                Some(Some(p)) => *p,
                _ => continue, // no postrouting chain in its table can reach it
            },
        };
        if let Some(d) = decode(m.family, list.data) {
            out.push(NatRule {
                priority,
                backend: crate::backend::Backend::Nft,
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

/// Base chains of every table: ((family, table), chain) → Some(priority) for a postrouting
/// chain, None for a base chain at another hook; ((family, table), "") → the earliest
/// postrouting priority of the table (what its regular chains, reached by jumps, run at).
/// Equals `nft list chains`.
type Priorities = std::collections::HashMap<((u8, String), String), Option<i32>>;

fn postrouting_priorities(sock: &mut Socket) -> Result<Priorities> {
    let msgs = sock.dump(sys::NFT_MSG_GETCHAIN, 0, "list chains", |_| {})?;
    let mut out = Priorities::new();
    for m in &msgs {
        let at = m.attrs();
        let table = at.get(a(sys::NFTA_CHAIN_TABLE)).and_then(|x| x.str());
        let chain = at.get(a(sys::NFTA_CHAIN_NAME)).and_then(|x| x.str());
        let (Some(table), Some(chain)) = (table, chain) else {
            continue;
        };
        let Some(hook) = at.get(a(sys::NFTA_CHAIN_HOOK)) else {
            continue; // a regular chain
        };
        let num = be32(hook.nested(), sys::NFTA_HOOK_HOOKNUM);
        let p = be32(hook.nested(), sys::NFTA_HOOK_PRIORITY).map(|p| p as i32);
        let key = (m.family, table.to_string());
        let post = (num == Some(libc::NF_INET_POST_ROUTING as u32))
            .then_some(p)
            .flatten();
        out.insert((key.clone(), chain.to_string()), post);
        if let Some(p) = post {
            let e = out.entry((key, String::new())).or_insert(Some(p));
            *e = Some(e.map_or(p, |q| q.min(p)));
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
    let mut d = Decoder {
        out: Decoded {
            family: family_of_nfproto(table_family),
            source: SourceMatch::Any,
            text: Vec::new(),
        },
        nat: false,
        loaded: None,
        mask: None,
    };
    for (name, data) in &exprs(list) {
        d.step(name, Attrs(data))?;
    }
    d.nat.then_some(d.out)
}

/// The state of [`decode`] between expressions.
struct Decoder {
    out: Decoded,
    /// Whether a source NAT statement was seen.
    nat: bool,
    /// What the last load put into register 1, for the cmp / lookup that reads it.
    loaded: Option<String>,
    /// The mask a bitwise applied to that register.
    mask: Option<Vec<u8>>,
}

impl Decoder {
    /// One expression; None when the rule is a destination NAT (not ours to list).
    fn step(&mut self, name: &str, at: Attrs<'_>) -> Option<()> {
        match name {
            "meta" => self.meta(be32(at, sys::NFTA_META_KEY)?),
            "payload" => self.payload(at)?,
            "bitwise" => self.mask = data_value(at, sys::NFTA_BITWISE_MASK).map(<[u8]>::to_vec),
            "cmp" => self.cmp(at),
            "lookup" => self.lookup(at),
            "counter" => self.out.text.push("counter".into()),
            "masq" => {
                self.nat = true;
                self.out.text.push("masquerade".into());
            }
            "nat" => {
                if be32(at, sys::NFTA_NAT_TYPE) != Some(sys::NFT_NAT_SNAT) {
                    return None;
                }
                self.nat = true;
                self.out.text.push("snat".into());
            }
            "target" => {
                let t = at
                    .get(NFTA_TARGET_NAME)
                    .and_then(|x| x.str())
                    .unwrap_or("?");
                self.nat |= t == "MASQUERADE" || t == "SNAT";
                self.out.text.push(format!("xt target {t}"));
            }
            "immediate" => self.out.text.push("(verdict)".into()),
            other => self.out.text.push(format!("({other})")),
        }
        Some(())
    }

    /// `[ meta load <key> => reg 1 ]`
    fn meta(&mut self, key: u32) {
        self.loaded = Some(
            match key {
                sys::NFT_META_NFPROTO => "meta nfproto",
                sys::NFT_META_OIFNAME => "oifname",
                sys::NFT_META_IIFNAME => "iifname",
                sys::NFT_META_MARK => "meta mark",
                _ => "meta",
            }
            .into(),
        );
        self.mask = None;
    }

    /// `[ payload load <len>b @ network header + <off> => reg 1 ]`
    fn payload(&mut self, at: Attrs<'_>) -> Option<()> {
        let off = be32(at, sys::NFTA_PAYLOAD_OFFSET)?;
        let len = be32(at, sys::NFTA_PAYLOAD_LEN)?;
        let base = be32(at, sys::NFTA_PAYLOAD_BASE)?;
        let f = self
            .out
            .family
            .unwrap_or(if len > 4 { Family::V6 } else { Family::V4 });
        let kw = f.nft_keyword();
        self.loaded = Some(if base != sys::NFT_PAYLOAD_NETWORK_HEADER {
            "payload".into()
        } else if off == addr_field(f, true).offset {
            format!("{kw} saddr")
        } else if off == addr_field(f, false).offset {
            format!("{kw} daddr")
        } else {
            format!("{kw} @{off},{len}")
        });
        self.mask = None;
        Some(())
    }

    /// `[ cmp eq|neq reg 1 <value> ]`
    fn cmp(&mut self, at: Attrs<'_>) {
        let what = self.loaded.take().unwrap_or_else(|| "?".into());
        let op = be32(at, sys::NFTA_CMP_OP);
        let neq = op == Some(sys::NFT_CMP_NEQ);
        let exact = neq || op == Some(sys::NFT_CMP_EQ);
        let val = data_value(at, sys::NFTA_CMP_DATA).unwrap_or(&[]);
        if what == "meta nfproto" {
            if let Some(f) = val.first().and_then(|&p| family_of_nfproto(p)) {
                self.out.family = Some(f);
            }
            return;
        }
        let (shown, net) = show_value(&what, val, self.mask.as_deref(), self.out.family);
        if what.ends_with(" saddr") {
            self.out.source = match net {
                _ if !exact => SourceMatch::Unknown,
                Some(n) if neq => SourceMatch::NotNet(n),
                Some(n) => SourceMatch::Net(n),
                None => SourceMatch::Unknown,
            };
        }
        let op = match op {
            Some(o) if o == sys::NFT_CMP_EQ => "",
            Some(o) if o == sys::NFT_CMP_NEQ => "!= ",
            Some(o) if o == sys::NFT_CMP_LT => "< ",
            Some(o) if o == sys::NFT_CMP_LTE => "<= ",
            Some(o) if o == sys::NFT_CMP_GT => "> ",
            Some(o) if o == sys::NFT_CMP_GTE => ">= ",
            _ => "? ",
        };
        self.out.text.push(format!("{what} {op}{shown}"));
    }

    /// `[ lookup reg 1 set <name> [0x1 = inverted] ]`
    fn lookup(&mut self, at: Attrs<'_>) {
        let what = self.loaded.take().unwrap_or_else(|| "?".into());
        let set = at
            .get(a(sys::NFTA_LOOKUP_SET))
            .and_then(|x| x.str())
            .unwrap_or("?");
        let inv = be32(at, sys::NFTA_LOOKUP_FLAGS).unwrap_or(0) & NFT_LOOKUP_F_INV != 0;
        if what.ends_with(" saddr") {
            self.out.source = SourceMatch::Unknown;
        }
        let op = if inv { "!= " } else { "" };
        self.out.text.push(format!("{what} {op}@{set}"));
    }
}

/// The text of a compared value, and the network when it is an address (with its mask).
fn show_value(
    what: &str,
    val: &[u8],
    mask: Option<&[u8]>,
    family: Option<Family>,
) -> (String, Option<IpNet>) {
    if what == "meta mark" {
        // The mark is a host-order u32 in the register, and so are the constants.
        let word = |b: &[u8]| b.try_into().ok().map(u32::from_ne_bytes);
        return match (word(val), mask.map(word)) {
            (Some(v), None) => (format!("{v:#010x}"), None),
            (Some(v), Some(Some(m))) => (format!("& {m:#010x} == {v:#010x}"), None),
            _ => (hex(val), None),
        };
    }
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
                Some(m) if contiguous(m) => m.iter().map(|b| b.count_ones()).sum::<u32>() as u8,
                Some(_) => return (format!("{} (masked)", hex(val)), None),
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
    (hex(val), None)
}

fn hex(val: &[u8]) -> String {
    let h: String = val.iter().map(|b| format!("{b:02x}")).collect();
    format!("0x{h}")
}

/// Whether a mask is leading ones then zeros (a prefix).
fn contiguous(m: &[u8]) -> bool {
    let bits = m
        .iter()
        .flat_map(|b| (0..8).rev().map(move |i| b >> i & 1 == 1));
    let mut seen_zero = false;
    for one in bits {
        if one && seen_zero {
            return false;
        }
        seen_zero |= !one;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::super::encode::{
        expr_cmp_eq, expr_counter, expr_masq, expr_meta, expr_payload_nh, put_data_value, put_expr,
        Field, IPV4_SADDR, IPV6_SADDR,
    };
    use super::*;
    use crate::netlink::Writer;

    const NFPROTO_IPV4: u8 = 2; // Family::V4.nfproto(), as the kernel sends it
    const NFPROTO_IPV6: u8 = 10; // Family::V6.nfproto()

    fn saddr_cmp(w: &mut Writer, prefix: &[u8], neq: bool) {
        expr_payload_nh(
            w,
            Field {
                len: prefix.len() as u32,
                ..IPV4_SADDR
            },
        );
        put_expr(w, "cmp", |w| {
            w.put_be32(a(sys::NFTA_CMP_SREG), sys::NFT_REG_1);
            let op = if neq {
                sys::NFT_CMP_NEQ
            } else {
                sys::NFT_CMP_EQ
            };
            w.put_be32(a(sys::NFTA_CMP_OP), op);
            put_data_value(w, a(sys::NFTA_CMP_DATA), prefix);
        });
    }

    #[test]
    fn docker_and_kube_proxy_rules() {
        // oifname != "docker0" ip saddr 172.7.21.0/24 counter masquerade (Docker 29)
        let mut w = Writer::default();
        expr_meta(&mut w, sys::NFT_META_OIFNAME);
        put_expr(&mut w, "cmp", |w| {
            w.put_be32(a(sys::NFTA_CMP_SREG), sys::NFT_REG_1);
            w.put_be32(a(sys::NFTA_CMP_OP), sys::NFT_CMP_NEQ);
            put_data_value(w, a(sys::NFTA_CMP_DATA), b"docker0\0");
        });
        saddr_cmp(&mut w, &[172, 7, 21], false);
        expr_counter(&mut w);
        expr_masq(&mut w, false);
        let d = decode(NFPROTO_IPV4, &w.into_bytes()).unwrap();
        assert_eq!(d.source, SourceMatch::Net("172.7.21.0/24".parse().unwrap()));
        assert_eq!(
            d.text.join(" "),
            "oifname != \"docker0\" ip saddr 172.7.21.0/24 counter masquerade"
        );
        // masquerade fully-random alone (kube-proxy's masquerading chain): any source.
        let mut w = Writer::default();
        expr_masq(&mut w, true);
        let d = decode(NFPROTO_IPV4, &w.into_bytes()).unwrap();
        assert_eq!(d.source, SourceMatch::Any);
        // ip saddr != 172.7.0.0/16 masquerade
        let mut w = Writer::default();
        saddr_cmp(&mut w, &[172, 7], true);
        expr_masq(&mut w, false);
        let d = decode(NFPROTO_IPV4, &w.into_bytes()).unwrap();
        assert_eq!(
            d.source,
            SourceMatch::NotNet("172.7.0.0/16".parse().unwrap())
        );
    }

    #[test]
    fn ranges_and_odd_masks_are_unknown() {
        // ip saddr >= 172.7.0.0 ip saddr <= 172.7.255.255 masquerade (a range)
        let mut w = Writer::default();
        for (op, v) in [
            (sys::NFT_CMP_GTE, [172, 7, 0, 0]),
            (sys::NFT_CMP_LTE, [172, 7, 255, 255]),
        ] {
            expr_payload_nh(&mut w, IPV4_SADDR);
            put_expr(&mut w, "cmp", |w| {
                w.put_be32(a(sys::NFTA_CMP_SREG), sys::NFT_REG_1);
                w.put_be32(a(sys::NFTA_CMP_OP), op);
                put_data_value(w, a(sys::NFTA_CMP_DATA), &v);
            });
        }
        expr_masq(&mut w, false);
        let d = decode(NFPROTO_IPV4, &w.into_bytes()).unwrap();
        assert_eq!(d.source, SourceMatch::Unknown, "{:?}", d.text);
        assert!(d.text.join(" ").contains(">= 172.7.0.0/32"), "{:?}", d.text);
        // ip saddr & 0.0.0.255 == 0.0.0.5 masquerade (not a prefix)
        let mut w = Writer::default();
        expr_payload_nh(&mut w, IPV4_SADDR);
        put_expr(&mut w, "bitwise", |w| {
            put_data_value(w, a(sys::NFTA_BITWISE_MASK), &[0, 0, 0, 255]);
            put_data_value(w, a(sys::NFTA_BITWISE_XOR), &[0, 0, 0, 0]);
        });
        expr_cmp_eq(&mut w, &[0, 0, 0, 5]);
        expr_masq(&mut w, false);
        let d = decode(NFPROTO_IPV4, &w.into_bytes()).unwrap();
        assert_eq!(d.source, SourceMatch::Unknown, "{:?}", d.text);
        // A contiguous mask is a prefix: ip saddr & 255.255.240.0 == 10.0.16.0
        let mut w = Writer::default();
        expr_payload_nh(&mut w, IPV4_SADDR);
        put_expr(&mut w, "bitwise", |w| {
            put_data_value(w, a(sys::NFTA_BITWISE_MASK), &[255, 255, 240, 0]);
            put_data_value(w, a(sys::NFTA_BITWISE_XOR), &[0, 0, 0, 0]);
        });
        expr_cmp_eq(&mut w, &[10, 0, 16, 0]);
        expr_masq(&mut w, false);
        let d = decode(NFPROTO_IPV4, &w.into_bytes()).unwrap();
        assert_eq!(d.source, SourceMatch::Net("10.0.16.0/20".parse().unwrap()));
    }

    #[test]
    fn marks_show_in_host_order_with_their_mask() {
        // meta mark & 0x4000 == 0x4000 masquerade (kube-proxy's marked packets)
        let mut w = Writer::default();
        expr_meta(&mut w, sys::NFT_META_MARK);
        put_expr(&mut w, "bitwise", |w| {
            put_data_value(w, a(sys::NFTA_BITWISE_MASK), &0x4000u32.to_ne_bytes());
            put_data_value(w, a(sys::NFTA_BITWISE_XOR), &0u32.to_ne_bytes());
        });
        expr_cmp_eq(&mut w, &0x4000u32.to_ne_bytes());
        expr_masq(&mut w, true);
        let d = decode(NFPROTO_IPV4, &w.into_bytes()).unwrap();
        assert_eq!(
            d.text.join(" "),
            "meta mark & 0x00004000 == 0x00004000 masquerade"
        );
    }

    #[test]
    fn no_source_nat_no_rule() {
        // A filter rule, and a destination NAT, are not listed.
        let mut w = Writer::default();
        saddr_cmp(&mut w, &[10, 0, 0, 1], false);
        expr_counter(&mut w);
        assert!(decode(NFPROTO_IPV4, &w.into_bytes()).is_none());
        let mut w = Writer::default();
        put_expr(&mut w, "nat", |w| {
            w.put_be32(a(sys::NFTA_NAT_TYPE), sys::NFT_NAT_DNAT);
        });
        assert!(decode(NFPROTO_IPV4, &w.into_bytes()).is_none());
        // Garbage never panics.
        assert!(decode(NFPROTO_INET, &[0xff; 37]).is_none());
    }

    #[test]
    fn inet_family_from_nfproto() {
        // meta nfproto ipv6 ip6 saddr @pods masquerade (a set: source unknown)
        let mut w = Writer::default();
        expr_meta(&mut w, sys::NFT_META_NFPROTO);
        expr_cmp_eq(&mut w, &[NFPROTO_IPV6]);
        expr_payload_nh(&mut w, IPV6_SADDR);
        put_expr(&mut w, "lookup", |w| {
            w.put_str(a(sys::NFTA_LOOKUP_SET), "pods");
            w.put_be32(a(sys::NFTA_LOOKUP_SREG), sys::NFT_REG_1);
        });
        expr_masq(&mut w, false);
        let d = decode(NFPROTO_INET, &w.into_bytes()).unwrap();
        assert_eq!(d.family, Some(Family::V6));
        assert_eq!(d.source, SourceMatch::Unknown);
        assert_eq!(d.text.join(" "), "ip6 saddr @pods masquerade");
    }
}
