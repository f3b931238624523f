//! Transaction building: a plan's changes as one nftables batch (each change's message the
//! nft command of its `Display`), and applying it.

use rustables::sys;
use rustables::{
    Chain, ChainPolicy, ChainType, Hook, HookClass, MsgType, ProtocolFamily, Set, Table,
};

use super::encode::{element, encode_rule_exprs, udata_with_comment};
use super::model::{Change, ForeignRule, RuleSpec, CHAIN, CHAIN_PRIORITY, TABLE};
use super::observe::{NFT_TYPE_IP6ADDR, NFT_TYPE_IPADDR};
use super::{a, NFPROTO_INET};
use crate::netlink::{NlError, Socket, Transaction, NLM_F_APPEND, NLM_F_CREATE};
use crate::policy::{Family, Range};

/// nft's set userdata: key byte order (what `nft -f` writes for address sets).
const SET_USERDATA: [u8; 6] = [1, 4, 1, 0, 0, 0];

/// Adds NEWSETELEM/DELSETELEM messages for `ranges`, split so that no attribute nest exceeds
/// 16 bits. Each range is a start element and, unless it ends at the top of the address space,
/// an INTERVAL_END element at one past its last address. Equals
/// `nft add element inet masqd <set> { a-b, … }` (or `delete element`).
pub(crate) fn element_messages(
    txn: &mut Transaction,
    add: bool,
    set: &str,
    f: Family,
    ranges: &[Range],
) {
    let (kind, flags, verb) = if add {
        (sys::NFT_MSG_NEWSETELEM, NLM_F_CREATE, "add")
    } else {
        (sys::NFT_MSG_DELSETELEM, 0, "delete")
    };
    let top = f.max();
    txn.chunked_list(
        (kind, flags, NFPROTO_INET),
        a(sys::NFTA_SET_ELEM_LIST_ELEMENTS),
        |w| {
            w.put_str(a(sys::NFTA_SET_ELEM_LIST_TABLE), TABLE);
            w.put_str(a(sys::NFTA_SET_ELEM_LIST_SET), set);
        },
        ranges,
        |w, r| {
            element(w, f, r.start, false);
            if r.end < top {
                element(w, f, r.end + 1, true);
            }
        },
        |chunk| {
            let desc = match chunk {
                [one] => one.display(f),
                [first, .., last] => format!(
                    "{} … {} ({} intervals)",
                    first.display(f),
                    last.display(f),
                    chunk.len()
                ),
                [] => String::new(),
            };
            format!("{verb} element inet {TABLE} {set} {{ {desc} }}")
        },
    );
}

/// `table inet masqd`, as rustables encodes it.
pub(crate) fn inet_table() -> Table {
    Table::new(ProtocolFamily::Inet).with_name(TABLE)
}

fn set_object(name: &str) -> Set {
    // rustables' Set defaults to family Unspec, which the kernel answers with ENOENT.
    let mut set = Set::default().with_table(TABLE).with_name(name);
    set.family = ProtocolFamily::Inet;
    set
}

/// Bytes a plan's batch will take, roughly: start and end element of each interval, 40 bytes
/// (IPv4) or 64 bytes (IPv6), plus the per-message headers of each 60 kB chunk.
fn estimated_bytes(changes: &[Change]) -> usize {
    changes
        .iter()
        .map(|c| match c {
            Change::AddElements { family, ranges, .. }
            | Change::DeleteElements { family, ranges, .. } => {
                ranges.len() * if *family == Family::V4 { 40 } else { 64 } * 101 / 100 + 128
            }
            _ => 512,
        })
        .sum()
}

/// Builds the transaction for a plan. Every change maps to the nft command in its `Display`.
pub fn transaction(changes: &[Change], genid: Option<u32>) -> Transaction {
    let mut txn = Transaction::new(genid);
    txn.reserve(estimated_bytes(changes));
    let mut set_id = 1u32;
    for c in changes {
        add_change(&mut txn, c, &mut set_id);
    }
    txn
}

/// Adds the message(s) of one change; `set_id` numbers the sets added in this batch.
fn add_change(txn: &mut Transaction, c: &Change, set_id: &mut u32) {
    let what = c.to_string();
    match c {
        // add table inet masqd / delete table inet masqd
        Change::AddTable => txn.add_objects(what, |b| b.add(&inet_table(), MsgType::Add)),
        Change::DeleteTable => txn.add_objects(what, |b| b.add(&inet_table(), MsgType::Del)),
        // add chain inet masqd postrouting { type nat hook postrouting priority srcnat - 1; … }
        Change::AddChain => txn.add_objects(what, |b| {
            let chain = Chain::new(&inet_table())
                .with_name(CHAIN)
                .with_hook(Hook::new(HookClass::PostRouting, CHAIN_PRIORITY))
                .with_policy(ChainPolicy::Accept)
                .with_type(ChainType::Nat);
            b.add(&chain, MsgType::Add)
        }),
        // delete chain inet masqd <name>
        Change::DeleteChain(name) => txn.add_objects(what, |b| {
            b.add(
                &Chain::new(&inet_table()).with_name(name.as_str()),
                MsgType::Del,
            )
        }),
        // flush chain inet masqd <name>
        Change::FlushChain(name) => txn.message(sys::NFT_MSG_DELRULE, 0, NFPROTO_INET, what, |w| {
            w.put_str(a(sys::NFTA_RULE_TABLE), TABLE);
            w.put_str(a(sys::NFTA_RULE_CHAIN), name);
        }),
        // delete rule inet masqd postrouting handle N
        Change::DeleteRule { handle, .. } => {
            txn.message(sys::NFT_MSG_DELRULE, 0, NFPROTO_INET, what, |w| {
                w.put_str(a(sys::NFTA_RULE_TABLE), TABLE);
                w.put_str(a(sys::NFTA_RULE_CHAIN), CHAIN);
                w.put_be64(a(sys::NFTA_RULE_HANDLE), *handle);
            })
        }
        // delete set inet masqd <name>
        Change::DeleteSet(name) => {
            txn.add_objects(what, |b| b.add(&set_object(name), MsgType::Del))
        }
        // flush set inet masqd <name>: DELSETELEM naming the set, with no element list
        Change::FlushSet(name) => {
            txn.message(sys::NFT_MSG_DELSETELEM, 0, NFPROTO_INET, what, |w| {
                w.put_str(a(sys::NFTA_SET_ELEM_LIST_TABLE), TABLE);
                w.put_str(a(sys::NFTA_SET_ELEM_LIST_SET), name);
            })
        }
        Change::AddSet { name, family } => {
            add_set(txn, what, name, *family, *set_id);
            *set_id += 1;
        }
        Change::DeleteElements {
            set,
            family,
            ranges,
        } => element_messages(txn, false, set, *family, ranges),
        Change::AddElements {
            set,
            family,
            ranges,
        } => element_messages(txn, true, set, *family, ranges),
        Change::AddRule(r) => add_rule(txn, what, r),
        Change::RemoveDefaultRule(r) => remove_default_rule(txn, what, r),
    }
}

/// `add set inet masqd <name> { type ipv4_addr; flags interval; }` (or `ipv6_addr`).
fn add_set(txn: &mut Transaction, what: String, name: &str, family: Family, id: u32) {
    let (ty, len) = match family {
        Family::V4 => (NFT_TYPE_IPADDR, 4u32),
        Family::V6 => (NFT_TYPE_IP6ADDR, 16u32),
    };
    let set = set_object(name)
        .with_flags(libc::NFT_SET_INTERVAL as u32)
        .with_key_type(ty)
        .with_key_len(len)
        .with_id(id)
        .with_userdata(SET_USERDATA.to_vec());
    txn.add_objects(what, |b| b.add(&set, MsgType::Add))
}

/// `add rule inet masqd postrouting <rule> comment "<tag>"`.
fn add_rule(txn: &mut Transaction, what: String, r: &RuleSpec) {
    txn.message(
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
    )
}

/// `delete rule ip nat POSTROUTING handle N` (the broad default rule).
fn remove_default_rule(txn: &mut Transaction, what: String, r: &ForeignRule) {
    txn.message(
        sys::NFT_MSG_DELRULE,
        0,
        r.table_family.nfproto(),
        what,
        |w| {
            w.put_str(a(sys::NFTA_RULE_TABLE), &r.table);
            w.put_str(a(sys::NFTA_RULE_CHAIN), &r.chain);
            w.put_be64(a(sys::NFTA_RULE_HANDLE), r.handle);
        },
    )
}
/// Applies changes as one transaction. Equals `nft -f` of the plan's lines, atomically.
pub fn apply(sock: &mut Socket, changes: &[Change], genid: Option<u32>) -> Result<(), NlError> {
    if changes.is_empty() {
        return Ok(());
    }
    sock.commit(transaction(changes, genid))
}
