//! What the daemon takes from the nftables event stream besides triggers: the changes of each
//! committed transaction to the counted detection facts and someone else's changes to the
//! elements of masqd's sets (handed to the nft driver, which follows its facts and its set
//! cache with them instead of dumping every rule or the sets again), and whether someone else
//! changed masqd's table or sets themselves (then the set cache is not trusted: read back).
//!
//! No notification here asks for a reconcile by itself: the counts only decide a backend
//! while masqd's own policy is in neither (design.md §4, "staying there"), which only a change
//! to masqd's own objects — a trigger of its own — can bring about.
//!
//! Pure: the loop feeds it drained notifications and asks it at each reconcile's start and end.

use rustables::sys;

use crate::backend::TABLE;
use crate::backend::{ElemOp, TxnDelta};
use crate::netlink::Event;

/// Committed transactions kept for the next reconcile at most; past that the driver reads the
/// facts again (one dump) rather than take in a long backlog.
const MAX_READY: usize = 4096;

/// The followed state between the event socket and the reconciles.
#[derive(Debug, Default)]
pub(super) struct Follow {
    /// The changes of the transaction being read (its `NEWGEN` not read yet).
    open: TxnDelta,
    /// Committed transactions' changes, for the driver at the next reconcile start.
    ready: Vec<TxnDelta>,
    /// More than [`MAX_READY`] were waiting: the driver reads the facts again.
    overflowed: bool,
    /// Someone else changed masqd's sets or table (or notifications were lost) since the
    /// running (or last) reconcile started.
    touched: bool,
    /// Rules or chains changed (anyone's, or notifications were lost) since the other NAT
    /// rules were last read for the metrics.
    rules_moved: bool,
}

/// What a reconcile starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Start {
    /// The set cache may be used whatever the generation.
    pub trust_sets: bool,
    /// The facts changes since the last start, in order (None: read the facts again).
    pub deltas: Option<Vec<TxnDelta>>,
}

/// Whether a change by someone else concerns masqd's sets in a way the cache cannot follow:
/// its table or a set of `table inet masqd` created or deleted (elements are followed).
fn touches_own_sets(e: &Event, own_pid: u32) -> bool {
    let Event::Change {
        kind,
        family,
        pid,
        table,
        ..
    } = e
    else {
        return false;
    };
    *pid != own_pid
        && i32::from(*family) == rustables::ProtocolFamily::Inet as i32
        && table.as_deref() == Some(TABLE)
        && matches!(
            u32::from(*kind),
            sys::NFT_MSG_NEWTABLE
                | sys::NFT_MSG_DELTABLE
                | sys::NFT_MSG_NEWSET
                | sys::NFT_MSG_DELSET
        )
}

impl Follow {
    /// Takes a drained batch of notifications in.
    pub fn take_in(&mut self, events: &[Event], own_pid: u32) {
        for e in events {
            match e {
                Event::Overrun => {
                    // The transaction being read is incomplete; the loop resyncs everything.
                    self.open = TxnDelta::default();
                    self.touched = true;
                    self.overflowed = true;
                    self.rules_moved = true;
                }
                Event::Generation { id, .. } => self.committed(*id),
                Event::Change { .. } => {
                    self.touched |= touches_own_sets(e, own_pid);
                    self.rules_moved |= self.open.take(e);
                }
                Event::Elements {
                    add,
                    family,
                    pid,
                    table,
                    set,
                    elements,
                } => {
                    let own_table = i32::from(*family) == rustables::ProtocolFamily::Inet as i32
                        && table.as_deref() == Some(TABLE);
                    // masqd's own commits are in the cache it made after them.
                    if own_table && *pid != own_pid {
                        let set = set.clone().unwrap_or_default();
                        self.open
                            .elements
                            .extend(elements.iter().map(|(key, end)| ElemOp {
                                set: set.clone(),
                                add: *add,
                                key: key.clone(),
                                end: *end,
                            }));
                    }
                }
            }
        }
    }

    /// A transaction's `NEWGEN`: its changes belong to generation `id`.
    fn committed(&mut self, id: u32) {
        let mut d = std::mem::take(&mut self.open);
        if d.is_empty() {
            return;
        }
        d.gen = id;
        if self.ready.len() >= MAX_READY {
            self.overflowed = true;
            self.ready.clear();
        }
        if !self.overflowed {
            self.ready.push(d);
        }
    }

    /// Whether the other NAT rules read for the metrics may be out of date (rules changed
    /// since the last reading): a resync reads them again then.
    pub fn overridden_stale(&self) -> bool {
        self.rules_moved
    }

    /// The running reconcile reads the other NAT rules for the metrics.
    pub fn overridden_read(&mut self) {
        self.rules_moved = false;
    }

    /// A reconcile starts: what it may trust, and the facts changes to hand to the driver.
    pub fn starting(&mut self) -> Start {
        let trust_sets = !std::mem::take(&mut self.touched);
        let ready = std::mem::take(&mut self.ready);
        let deltas = (!std::mem::take(&mut self.overflowed)).then_some(ready);
        Start { trust_sets, deltas }
    }

    /// A reconcile ended: whether its set cache may be kept (no one else touched masqd's sets
    /// meanwhile).
    pub fn ended(&self) -> bool {
        !self.touched
    }
}

#[cfg(test)]
#[path = "follow_tests.rs"]
mod tests;
