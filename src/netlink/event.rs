//! nftables change notifications (NFNLGRP_NFTABLES), decoded from received messages.

use rustables::sys;

use super::attr::Attrs;
use super::message::{RawMsg, NFGENMSG_LEN};

/// The change notification a message from NFNLGRP_NFTABLES carries, if it is one.
pub(crate) fn event_of(m: &RawMsg) -> Option<Event> {
    if m.kind >> 8 != sys::NFNL_SUBSYS_NFTABLES as u16 || m.body.len() < NFGENMSG_LEN {
        return None;
    }
    // Attribute 1 is the table name in every table/chain/rule/set/element message.
    let table = Attrs(&m.body[NFGENMSG_LEN..])
        .get(1)
        .and_then(|a| a.str())
        .map(str::to_string);
    Some(Event::Change {
        kind: m.kind & 0xff,
        family: m.body[0],
        pid: m.pid,
        table,
    })
}

/// An nftables change notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A change: message type (`NFT_MSG_*`), family, sender port id, table name.
    Change {
        /// `NFT_MSG_NEWRULE`, `NFT_MSG_DELTABLE`, …
        kind: u16,
        /// nfgen family.
        family: u8,
        /// Port id of the socket that made the change.
        pid: u32,
        /// The table concerned (None for generation messages).
        table: Option<String>,
    },
    /// Notifications were lost (receive buffer overrun): anything may have changed.
    Overrun,
}
