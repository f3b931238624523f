//! Encode: one builder per nft statement or match masqd writes, each with its nft text and the
//! expressions `nft --debug=netlink` prints for it; header fields by name, not by offset.

use rustables::sys;

use super::a;
use super::decode::NFTNL_UDATA_RULE_COMMENT;
use super::model::{nomasq_set, pod_set, RuleSpec};
use crate::netlink::Writer;
use crate::policy::Family;

/// `NF_NAT_RANGE_PROTO_RANDOM_FULLY`: the `fully-random` flag of masquerade.
const NF_NAT_RANGE_PROTO_RANDOM_FULLY: u32 = 0x10;
/// `IFNAMSIZ`: interface names are compared as 16 bytes, NUL-padded.
const IFNAMSIZ: usize = 16;

/// A field of the network header, as a `payload load` expression reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    /// Offset from the start of the network header.
    pub offset: u32,
    /// Length in bytes.
    pub len: u32,
}

/// `ip saddr`.
pub const IPV4_SADDR: Field = Field {
    offset: 12, /* offsetof(struct iphdr, saddr) */
    len: 4,
};
/// `ip daddr`.
pub const IPV4_DADDR: Field = Field {
    offset: 16, /* offsetof(struct iphdr, daddr) */
    len: 4,
};
/// `ip6 saddr`.
pub const IPV6_SADDR: Field = Field {
    offset: 8, /* offsetof(struct ipv6hdr, saddr) */
    len: 16,
};
/// `ip6 daddr`.
pub const IPV6_DADDR: Field = Field {
    offset: 24, /* offsetof(struct ipv6hdr, daddr) */
    len: 16,
};

/// The source (`source`) or destination address field of a family's network header.
pub fn addr_field(f: Family, source: bool) -> Field {
    match (f, source) {
        (Family::V4, true) => IPV4_SADDR,
        (Family::V4, false) => IPV4_DADDR,
        (Family::V6, true) => IPV6_SADDR,
        (Family::V6, false) => IPV6_DADDR,
    }
}

/// libnftnl's rule userdata holding `comment "<c>"`.
pub(crate) fn udata_with_comment(c: &str) -> Vec<u8> {
    let mut v = vec![NFTNL_UDATA_RULE_COMMENT, (c.len() + 1) as u8];
    v.extend_from_slice(c.as_bytes());
    v.push(0);
    v
}

/// One expression: `NFTA_LIST_ELEM { NFTA_EXPR_NAME name, NFTA_EXPR_DATA { body } }`.
pub(crate) fn put_expr(w: &mut Writer, name: &str, body: impl FnOnce(&mut Writer)) {
    let el = w.nest_begin(a(sys::NFTA_LIST_ELEM));
    w.put_str(a(sys::NFTA_EXPR_NAME), name);
    let d = w.nest_begin(a(sys::NFTA_EXPR_DATA));
    body(w);
    w.nest_end(d);
    w.nest_end(el);
}

/// `ty { NFTA_DATA_VALUE value }`.
pub(crate) fn put_data_value(w: &mut Writer, ty: u16, value: &[u8]) {
    let n = w.nest_begin(ty);
    w.put(a(sys::NFTA_DATA_VALUE), value);
    w.nest_end(n);
}

/// `[ meta load <key> => reg 1 ]`
pub(crate) fn expr_meta(w: &mut Writer, key: u32) {
    put_expr(w, "meta", |w| {
        w.put_be32(a(sys::NFTA_META_KEY), key);
        w.put_be32(a(sys::NFTA_META_DREG), sys::NFT_REG_1);
    });
}

/// `[ cmp eq reg 1 <value> ]`
pub(crate) fn expr_cmp_eq(w: &mut Writer, value: &[u8]) {
    put_expr(w, "cmp", |w| {
        w.put_be32(a(sys::NFTA_CMP_SREG), sys::NFT_REG_1);
        w.put_be32(a(sys::NFTA_CMP_OP), sys::NFT_CMP_EQ);
        put_data_value(w, a(sys::NFTA_CMP_DATA), value);
    });
}

/// `[ payload load <len>b @ network header + <offset> => reg 1 ]`
pub(crate) fn expr_payload_nh(w: &mut Writer, field: Field) {
    put_expr(w, "payload", |w| {
        w.put_be32(a(sys::NFTA_PAYLOAD_DREG), sys::NFT_REG_1);
        w.put_be32(a(sys::NFTA_PAYLOAD_BASE), sys::NFT_PAYLOAD_NETWORK_HEADER);
        w.put_be32(a(sys::NFTA_PAYLOAD_OFFSET), field.offset);
        w.put_be32(a(sys::NFTA_PAYLOAD_LEN), field.len);
    });
}

/// `[ lookup reg 1 set <set> ]`
pub(crate) fn expr_lookup(w: &mut Writer, set: &str) {
    put_expr(w, "lookup", |w| {
        w.put_str(a(sys::NFTA_LOOKUP_SET), set);
        w.put_be32(a(sys::NFTA_LOOKUP_SREG), sys::NFT_REG_1);
    });
}

/// `counter`: `[ counter pkts 0 bytes 0 ]`
pub(crate) fn expr_counter(w: &mut Writer) {
    put_expr(w, "counter", |w| {
        w.put_be64(a(sys::NFTA_COUNTER_BYTES), 0);
        w.put_be64(a(sys::NFTA_COUNTER_PACKETS), 0);
    });
}

/// `return`: `[ immediate reg 0 return ]`
pub(crate) fn expr_return(w: &mut Writer) {
    put_expr(w, "immediate", |w| {
        w.put_be32(a(sys::NFTA_IMMEDIATE_DREG), sys::NFT_REG_VERDICT);
        let d = w.nest_begin(a(sys::NFTA_IMMEDIATE_DATA));
        let v = w.nest_begin(a(sys::NFTA_DATA_VERDICT));
        w.put_be32(a(sys::NFTA_VERDICT_CODE), libc::NFT_RETURN as u32);
        w.nest_end(v);
        w.nest_end(d);
    });
}

/// `masquerade [fully-random]`: `[ masq ]` (`[ masq flags 0x10 ]`)
pub(crate) fn expr_masq(w: &mut Writer, random_fully: bool) {
    put_expr(w, "masq", |w| {
        if random_fully {
            w.put_be32(a(sys::NFTA_MASQ_FLAGS), NF_NAT_RANGE_PROTO_RANDOM_FULLY);
        }
    });
}

/// `ip saddr @set` / `ip6 daddr @set` in an inet table: `meta nfproto` check, payload, lookup.
///
/// ```text
/// [ meta load nfproto => reg 1 ] [ cmp eq reg 1 0x02 ]          (with_proto)
/// [ payload load 4b @ network header + 12 => reg 1 ] [ lookup reg 1 set pod4 ]
/// ```
pub(crate) fn match_addr_set(w: &mut Writer, f: Family, source: bool, set: &str, with_proto: bool) {
    if with_proto {
        expr_meta(w, sys::NFT_META_NFPROTO);
        expr_cmp_eq(w, &[f.nfproto()]);
    }
    expr_payload_nh(w, addr_field(f, source));
    expr_lookup(w, set);
}

/// `oifname "<name>"`: the name NUL-padded to IFNAMSIZ (cut at 15 bytes).
///
/// ```text
/// [ meta load oifname => reg 1 ] [ cmp eq reg 1 0x6b636f64 0x00307265 0x00000000 0x00000000 ]
/// ```
pub(crate) fn match_oifname(w: &mut Writer, ifname: &str) {
    expr_meta(w, sys::NFT_META_OIFNAME);
    let mut name = [0u8; IFNAMSIZ];
    let n = ifname.len().min(IFNAMSIZ - 1);
    name[..n].copy_from_slice(&ifname.as_bytes()[..n]);
    expr_cmp_eq(w, &name);
}

/// `meta mark & MASK == VALUE` (`meta mark VALUE` when the mask is all ones). The mark is a
/// host-order u32 in the register, so the constants are too:
///
/// ```text
/// [ meta load mark => reg 1 ]
/// [ bitwise reg 1 = ( reg 1 & 0x00004000 ) ^ 0x00000000 ]    (mask not all ones)
/// [ cmp eq reg 1 0x00004000 ]
/// ```
pub(crate) fn match_mark(w: &mut Writer, value: u32, mask: u32) {
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
pub(crate) fn stmt_identity_snat(w: &mut Writer, f: Family) {
    expr_payload_nh(w, addr_field(f, true));
    put_expr(w, "nat", |w| {
        w.put_be32(a(sys::NFTA_NAT_TYPE), sys::NFT_NAT_SNAT);
        w.put_be32(a(sys::NFTA_NAT_FAMILY), f.nfproto() as u32);
        w.put_be32(a(sys::NFTA_NAT_REG_ADDR_MIN), sys::NFT_REG_1);
    });
}

/// Encodes the expressions of one of masqd's rules (each statement's nft text in
/// [`RuleSpec::nft`]).
pub fn encode_rule_exprs(w: &mut Writer, r: &RuleSpec) {
    match r {
        // oifname "docker0" return
        RuleSpec::BridgeReturn(b) => {
            match_oifname(w, b);
            expr_return(w);
        }
        // meta mark & 0x00004000 == 0x00004000 return
        RuleSpec::MarkReturn(m) => {
            match_mark(w, m.value, m.mask);
            expr_return(w);
        }
        // ip saddr @pod4 ip daddr @nomasq4 counter snat ip to ip saddr
        RuleSpec::Guard(f) => {
            match_addr_set(w, *f, true, &pod_set(*f), true);
            match_addr_set(w, *f, false, &nomasq_set(*f), false);
            expr_counter(w);
            stmt_identity_snat(w, *f);
        }
        // ip saddr @pod4 counter masquerade [fully-random]
        RuleSpec::Masquerade {
            family,
            random_fully,
        } => {
            match_addr_set(w, *family, true, &pod_set(*family), true);
            expr_counter(w);
            expr_masq(w, *random_fully);
        }
    }
}

/// One interval set element: `NFTA_LIST_ELEM { NFTA_SET_ELEM_KEY { value }, [flags
/// INTERVAL_END] }` — the start of an interval, or (`end`) one past its last address.
pub(crate) fn element(w: &mut Writer, f: Family, key: u128, end: bool) {
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
