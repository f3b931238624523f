//! nftables change notifications (NFNLGRP_NFTABLES), decoded from received messages.

use rustables::sys;

use super::attr::Attrs;
use super::message::{RawMsg, NFGENMSG_LEN};

/// The change notification a message from NFNLGRP_NFTABLES carries, if it is one.
pub(crate) fn event_of(m: &RawMsg) -> Option<Event> {
    if m.kind >> 8 != sys::NFNL_SUBSYS_NFTABLES as u16 || m.body.len() < NFGENMSG_LEN {
        return None;
    }
    let kind = m.kind & 0xff;
    // nfgenmsg.res_id: the low 16 bits of the generation the change belongs to.
    let res_id = u16::from_be_bytes([m.body[2], m.body[3]]);
    let at = Attrs(&m.body[NFGENMSG_LEN..]);
    if u32::from(kind) == sys::NFT_MSG_NEWGEN {
        // The last message of every committed transaction: NFTA_GEN_ID is the new generation.
        let id = at.get(sys::NFTA_GEN_ID).and_then(|a| a.be32())?;
        return Some(Event::Generation { id, pid: m.pid });
    }
    // Attribute 1 is the table name in every table/chain/rule/set/element message.
    let table = at.get(1).and_then(|a| a.str()).map(str::to_string);
    let k = u32::from(kind);
    if k == sys::NFT_MSG_NEWSETELEM || k == sys::NFT_MSG_DELSETELEM {
        return Some(Event::Elements {
            add: k == sys::NFT_MSG_NEWSETELEM,
            family: m.body[0],
            pid: m.pid,
            res_id,
            table,
            set: at
                .get(sys::NFTA_SET_ELEM_LIST_SET)
                .and_then(|a| a.str())
                .map(str::to_string),
            elements: elements_of(at),
        });
    }
    let name = name_attr(u32::from(kind))
        .and_then(|n| at.get(n))
        .and_then(|a| a.str())
        .map(str::to_string);
    Some(Event::Change {
        kind,
        family: m.body[0],
        pid: m.pid,
        res_id,
        table,
        name,
    })
}

/// The elements of a set-element message, in order: the key's bytes and whether the element
/// carries `NFT_SET_ELEM_INTERVAL_END` (the kernel notifies one element per message).
fn elements_of(at: Attrs<'_>) -> Vec<(Vec<u8>, bool)> {
    let Some(list) = at.get(sys::NFTA_SET_ELEM_LIST_ELEMENTS) else {
        return Vec::new();
    };
    list.nested()
        .filter_map(|e| {
            let ea = e.nested();
            let key = ea
                .get(sys::NFTA_SET_ELEM_KEY)?
                .nested()
                .get(sys::NFTA_DATA_VALUE)?
                .data
                .to_vec();
            let flags = ea
                .get(sys::NFTA_SET_ELEM_FLAGS)
                .and_then(|x| x.be32())
                .unwrap_or(0);
            Some((key, flags & libc::NFT_SET_ELEM_INTERVAL_END as u32 != 0))
        })
        .collect()
}

/// The attribute naming the object of a message type: a rule's chain (`NFTA_RULE_CHAIN`), a
/// chain's name (`NFTA_CHAIN_NAME`), a set's name (`NFTA_SET_NAME`, and
/// `NFTA_SET_ELEM_LIST_SET` for elements).
fn name_attr(kind: u32) -> Option<u16> {
    let n = match kind {
        sys::NFT_MSG_NEWRULE | sys::NFT_MSG_DELRULE => sys::NFTA_RULE_CHAIN,
        sys::NFT_MSG_NEWCHAIN | sys::NFT_MSG_DELCHAIN => sys::NFTA_CHAIN_NAME,
        sys::NFT_MSG_NEWSET | sys::NFT_MSG_DELSET => sys::NFTA_SET_NAME,
        _ => return None,
    };
    Some(n)
}

/// An nftables change notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A change: message type (`NFT_MSG_*`), family, sender port id, table and object name.
    Change {
        /// `NFT_MSG_NEWRULE`, `NFT_MSG_DELTABLE`, …
        kind: u16,
        /// nfgen family.
        family: u8,
        /// Port id of the socket that made the change.
        pid: u32,
        /// `nfgenmsg.res_id`: the low 16 bits of the generation the change belongs to (the
        /// id of the `NEWGEN` that ends its transaction).
        res_id: u16,
        /// The table concerned.
        table: Option<String>,
        /// The chain of a rule, the name of a chain or of a set (None for tables).
        name: Option<String>,
    },
    /// `NFT_MSG_NEWSETELEM` / `NFT_MSG_DELSETELEM`: elements added to or deleted from a set.
    Elements {
        /// Added (else deleted).
        add: bool,
        /// nfgen family.
        family: u8,
        /// Port id of the socket that made the change.
        pid: u32,
        /// As [`Event::Change`]'s.
        res_id: u16,
        /// The table concerned.
        table: Option<String>,
        /// The set.
        set: Option<String>,
        /// Each element's key bytes and whether it ends an interval, in message order.
        elements: Vec<(Vec<u8>, bool)>,
    },
    /// `NFT_MSG_NEWGEN`: a transaction was committed; the changes before it (since the last
    /// one) belong to generation `id`.
    Generation {
        /// The ruleset generation after the commit.
        id: u32,
        /// Port id of the committing socket.
        pid: u32,
    },
    /// Notifications were lost (receive buffer overrun): anything may have changed.
    Overrun,
}
