//! Golden bytes: masqd's encoder against the batches that nft(8) and iptables-nft(8) send for
//! the same statements. The batches were captured by `golden/capture.sh` (see its header: each
//! command in a private network namespace under `strace -e trace=sendmsg -e write=all`, with
//! nftables v1.0.6 and iptables v1.8.9 (nf_tables)); every `golden/*.hex` file names its
//! command in its first line.
//!
//! Where masqd's bytes legitimately differ, the comparison drops exactly that difference (in
//! [`normalize`]), and says why:
//! - attribute order inside a nest: the kernel parses attributes by type (`nla_parse`), so
//!   siblings are compared sorted by type (lists of the same type keep their order);
//! - `NFTA_LOOKUP_SET_ID` / `NFTA_SET_ELEM_LIST_SET_ID`: nft names the set by its batch-local
//!   id as well as by name; the kernel looks the set up by name when it is committed already;
//! - a counter's zero `NFTA_COUNTER_BYTES` / `PACKETS`: absent means zero to the kernel;
//! - a bitwise `NFTA_BITWISE_OP` of 0 (`NFT_BITWISE_BOOL`): absent means the same;
//! - `NLM_F_ACK` on each message: masqd asks for every acknowledgement, nft only for errors;
//! - the NUL after a string attribute that rustables (table, chain, set objects) leaves out:
//!   the kernel's NLA_STRING policy takes either;
//! - masqd's rule comment (`NFTA_RULE_USERDATA`), which the nft commands captured carry none of;
//! - the type of each entry of a set element list (libnftnl counts 1, 2, 3 …, masqd writes
//!   NFTA_LIST_ELEM): the kernel walks the list with `nla_for_each_nested`, ignoring types;
//! - nft's leading interval-end element at address 0 of an interval set (masqd's ranges never
//!   need it: the kernel treats the space below the first start as outside the set).

use rustables::sys;

use super::a;
use super::model::{Change, RuleSpec};
use super::transaction;
use crate::config::HonorMark;
use crate::netlink::{split, RawMsg, NLM_F_ACK};
use crate::policy::{Family, Range};

const NLA_F_NESTED: u16 = 0x8000;

/// The bytes of a `golden/*.hex` file: `#` lines are comments, the rest hex digits.
pub(super) fn golden(text: &str) -> Vec<u8> {
    let hex: String = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .flat_map(|l| l.trim().chars())
        .collect();
    assert!(!hex.is_empty(), "empty hex");
    crate::state::unhex(&hex).expect("an even number of hex digits")
}

/// The messages of a captured batch of type `NFT_MSG_<kind>`.
fn messages(batch: &[u8], kind: u32) -> Vec<RawMsg> {
    let full = ((sys::NFNL_SUBSYS_NFTABLES as u16) << 8) | kind as u16;
    split(batch)
        .expect("a well-formed batch")
        .into_iter()
        .filter(|m| m.kind == full)
        .collect()
}

/// The NFTA_RULE_EXPRESSIONS payload of the one NEWRULE message of a captured batch.
pub(super) fn rule_exprs(text: &str) -> Vec<u8> {
    let rules = messages(&golden(text), sys::NFT_MSG_NEWRULE);
    assert_eq!(rules.len(), 1);
    let attrs = crate::netlink::Attrs(&rules[0].body[4..]);
    attrs
        .get(a(sys::NFTA_RULE_EXPRESSIONS))
        .expect("expressions")
        .data
        .to_vec()
}

/// An attribute tree: type (flags dropped) and either its payload or its children.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Node {
    Leaf(u16, Vec<u8>),
    Nest(u16, Vec<Node>),
}

impl Node {
    fn ty(&self) -> u16 {
        match self {
            Node::Leaf(t, _) | Node::Nest(t, _) => *t,
        }
    }
}

/// Parses attributes into trees, descending where `NLA_F_NESTED` is set; padding dropped.
fn tree(mut b: &[u8]) -> Vec<Node> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let raw = u16::from_ne_bytes([b[2], b[3]]);
        assert!(len >= 4 && len <= b.len(), "attribute length {len}");
        let data = &b[4..len];
        let ty = raw & 0x3fff;
        out.push(if raw & NLA_F_NESTED != 0 {
            Node::Nest(ty, tree(data))
        } else {
            Node::Leaf(ty, data.to_vec())
        });
        b = &b[((len + 3) & !3).min(b.len())..];
    }
    out
}

/// The expression name of a `NFTA_LIST_ELEM` expression node.
fn expr_name(children: &[Node]) -> Option<&[u8]> {
    children.iter().find_map(|c| match c {
        Node::Leaf(t, v) if *t == a(sys::NFTA_EXPR_NAME) => Some(v.as_slice()),
        _ => None,
    })
}

/// Drops the legitimate differences listed in the module documentation and sorts siblings by
/// type (stable: lists keep their order).
fn normalize(nodes: Vec<Node>, expr: Option<&[u8]>) -> Vec<Node> {
    let drop = |n: &Node| -> bool {
        match (expr, n) {
            (Some(b"lookup\0"), n) => n.ty() == a(sys::NFTA_LOOKUP_SET_ID),
            (Some(b"counter\0"), Node::Leaf(_, v)) => v.iter().all(|&x| x == 0),
            (Some(b"bitwise\0"), Node::Leaf(t, v)) => {
                *t == a(sys::NFTA_BITWISE_OP) && v.iter().all(|&x| x == 0)
            }
            _ => false,
        }
    };
    let mut out: Vec<Node> = nodes
        .into_iter()
        .filter(|n| !drop(n))
        .map(|n| match n {
            Node::Nest(t, c) if t == a(sys::NFTA_LIST_ELEM) => {
                let name = expr_name(&c).map(<[u8]>::to_vec);
                let c = c
                    .into_iter()
                    .map(|x| match x {
                        Node::Nest(dt, dc) if dt == a(sys::NFTA_EXPR_DATA) => {
                            Node::Nest(dt, normalize(dc, name.as_deref()))
                        }
                        other => other,
                    })
                    .collect();
                Node::Nest(t, normalize(c, None))
            }
            Node::Nest(t, c) => Node::Nest(t, normalize(c, None)),
            leaf => leaf,
        })
        .collect();
    out.sort_by_key(Node::ty);
    out
}

/// One message's header fields that must be equal, and its normalized attributes.
fn shape(m: &RawMsg, drop_top: &[u16]) -> (u16, u16, u8, Vec<Node>) {
    let attrs = tree(&m.body[4..])
        .into_iter()
        .filter(|n| !drop_top.contains(&n.ty()))
        .collect();
    (
        m.kind,
        m.flags & !NLM_F_ACK,
        m.body[0],
        normalize(attrs, None),
    )
}

/// masqd's batch for `changes`, finished.
fn masqd_batch(changes: &[Change]) -> Vec<u8> {
    transaction(changes, None).finish().0
}

/// Compares masqd's NEWRULE for `spec` with nft's captured one.
fn assert_rule_like_nft(spec: RuleSpec, golden_text: &str) {
    let theirs = messages(&golden(golden_text), sys::NFT_MSG_NEWRULE);
    let ours = messages(&masqd_batch(&[Change::AddRule(spec)]), sys::NFT_MSG_NEWRULE);
    assert_eq!((theirs.len(), ours.len()), (1, 1));
    let userdata = [a(sys::NFTA_RULE_USERDATA)];
    assert_eq!(shape(&ours[0], &userdata), shape(&theirs[0], &[]));
}

#[test]
fn masquerade_rule_is_what_nft_sends() {
    assert_rule_like_nft(
        RuleSpec::Masquerade {
            family: Family::V4,
            random_fully: false,
        },
        include_str!("golden/masquerade.hex"),
    );
}

#[test]
fn fully_random_masquerade_is_what_nft_sends() {
    assert_rule_like_nft(
        RuleSpec::Masquerade {
            family: Family::V4,
            random_fully: true,
        },
        include_str!("golden/masquerade-fully-random.hex"),
    );
}

#[test]
fn identity_snat_guard_is_what_nft_sends() {
    assert_rule_like_nft(
        RuleSpec::Guard(Family::V4),
        include_str!("golden/guard.hex"),
    );
}

#[test]
fn mark_return_is_what_nft_sends() {
    let m = HonorMark {
        value: 0x4000,
        mask: 0x4000,
    };
    assert_rule_like_nft(RuleSpec::MarkReturn(m), include_str!("golden/mark.hex"));
}

#[test]
fn bridge_return_is_what_nft_sends() {
    assert_rule_like_nft(
        RuleSpec::BridgeReturn("docker0".into()),
        include_str!("golden/bridge.hex"),
    );
}

#[test]
fn interval_elements_are_what_nft_sends() {
    let theirs = messages(
        &golden(include_str!("golden/elements.hex")),
        sys::NFT_MSG_NEWSETELEM,
    );
    // nft: add element inet masqd nomasq4 { 10.96.0.0/12, 172.7.0.0/16 }
    let ranges = vec![
        Range::of_net(&"10.96.0.0/12".parse().unwrap()),
        Range::of_net(&"172.7.0.0/16".parse().unwrap()),
    ];
    let ours = messages(
        &masqd_batch(&[Change::AddElements {
            set: "nomasq4".into(),
            family: Family::V4,
            ranges,
        }]),
        sys::NFT_MSG_NEWSETELEM,
    );
    assert_eq!((theirs.len(), ours.len()), (1, 1));
    let set_id = [a(sys::NFTA_SET_ELEM_LIST_SET_ID)];
    let (k, f, fam, mut nft_attrs) = shape(&theirs[0], &set_id);
    // nft's leading interval end at 0.0.0.0 (see the module documentation).
    let list = nft_attrs
        .iter_mut()
        .find(|n| n.ty() == a(sys::NFTA_SET_ELEM_LIST_ELEMENTS));
    let Some(Node::Nest(_, elems)) = list else {
        panic!("no element list in {nft_attrs:?}")
    };
    // libnftnl numbers the entries of the element list 1, 2, 3 …, masqd writes each as
    // NFTA_LIST_ELEM (1); the kernel walks the list with nla_for_each_nested and never reads
    // an entry's type, so both mean the same.
    for e in elems.iter_mut() {
        if let Node::Nest(t, _) = e {
            *t = a(sys::NFTA_LIST_ELEM);
        }
    }
    let first = elems.remove(0);
    assert_eq!(
        first,
        Node::Nest(
            a(sys::NFTA_LIST_ELEM),
            normalize(
                vec![
                    Node::Leaf(a(sys::NFTA_SET_ELEM_FLAGS), 1u32.to_be_bytes().to_vec()),
                    Node::Nest(
                        a(sys::NFTA_SET_ELEM_KEY),
                        vec![Node::Leaf(a(sys::NFTA_DATA_VALUE), vec![0; 4])]
                    ),
                ],
                None
            )
        )
    );
    assert_eq!(shape(&ours[0], &[]), (k, f, fam, nft_attrs));
}

#[test]
fn batch_framing_is_what_nft_sends() {
    // BATCH_BEGIN (seq 0, res_id NFNL_SUBSYS_NFTABLES), the message (seq 1), BATCH_END (seq 2):
    // byte for byte the same framing, the generation id left out as nft 1.0.6 does.
    let theirs = split(&golden(include_str!("golden/masquerade.hex"))).unwrap();
    let ours = split(&masqd_batch(&[Change::AddRule(RuleSpec::Masquerade {
        family: Family::V4,
        random_fully: false,
    })]))
    .unwrap();
    assert_eq!(theirs.len(), 3);
    assert_eq!(ours.len(), 3);
    for i in [0, 2] {
        assert_eq!(ours[i], theirs[i], "message {i}");
    }
    assert_eq!(ours[1].seq, theirs[1].seq);
}

#[test]
fn golden_files_are_the_captured_commands() {
    // Each file holds what its header says: a rule for the rule files, elements for the set.
    for (text, kind) in [
        (include_str!("golden/masquerade.hex"), sys::NFT_MSG_NEWRULE),
        (include_str!("golden/guard.hex"), sys::NFT_MSG_NEWRULE),
        (include_str!("golden/mark.hex"), sys::NFT_MSG_NEWRULE),
        (include_str!("golden/elements.hex"), sys::NFT_MSG_NEWSETELEM),
        (
            include_str!("golden/iptables-nft-masquerade.hex"),
            sys::NFT_MSG_NEWRULE,
        ),
    ] {
        assert!(text.starts_with("# "), "{text}");
        assert!(text.contains("unshare -n"), "{text}");
        assert_eq!(messages(&golden(text), kind).len(), 1, "{text}");
    }
}

#[test]
fn base_chain_spliced_from_rustables_is_what_nft_sends() {
    // The rustables encoder behind Transaction::add_objects, renumbered into masqd's batch.
    let theirs = messages(
        &golden(include_str!("golden/add-chain.hex")),
        sys::NFT_MSG_NEWCHAIN,
    );
    let batch = masqd_batch(&[Change::AddChain]);
    let ours = messages(&batch, sys::NFT_MSG_NEWCHAIN);
    assert_eq!((theirs.len(), ours.len()), (1, 1));
    assert_eq!(ours[0].seq, 1);
    // rustables writes the string attributes (table, chain name, type) without libmnl's
    // terminating NUL; the kernel's NLA_STRING policy takes either (nla_strcmp stops at the
    // attribute's end), so the strings are compared without it.
    let strings = [
        a(sys::NFTA_CHAIN_TABLE),
        a(sys::NFTA_CHAIN_NAME),
        a(sys::NFTA_CHAIN_TYPE),
    ];
    let unterminated = |(k, f, fam, attrs): (u16, u16, u8, Vec<Node>)| {
        let attrs = attrs
            .into_iter()
            .map(|n| match n {
                Node::Leaf(t, mut v) if strings.contains(&t) => {
                    if v.last() == Some(&0) {
                        v.pop();
                    }
                    Node::Leaf(t, v)
                }
                other => other,
            })
            .collect::<Vec<_>>();
        (k, f, fam, attrs)
    };
    assert_eq!(
        unterminated(shape(&ours[0], &[])),
        unterminated(shape(&theirs[0], &[]))
    );
    // The spliced message is padded and followed by a well-formed BATCH_END.
    let all = split(&batch).unwrap();
    assert_eq!((all.len(), all[2].kind, all[2].seq), (3, 0x11, 2));
}

#[test]
fn flush_set_is_what_nft_sends() {
    // nft flush set inet masqd nomasq4: DELSETELEM with the table and set, no element list.
    let theirs = messages(
        &golden(include_str!("golden/flush-set.hex")),
        sys::NFT_MSG_DELSETELEM,
    );
    let ours = messages(
        &masqd_batch(&[Change::FlushSet("nomasq4".into())]),
        sys::NFT_MSG_DELSETELEM,
    );
    assert_eq!((theirs.len(), ours.len()), (1, 1));
    let (_, _, _, attrs) = shape(&theirs[0], &[]);
    assert!(
        !attrs
            .iter()
            .any(|n| n.ty() == a(sys::NFTA_SET_ELEM_LIST_ELEMENTS)),
        "the capture flushes: no element list"
    );
    assert_eq!(shape(&ours[0], &[]), shape(&theirs[0], &[]));
}
