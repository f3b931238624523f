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

use super::triggers::own_table;
use crate::backend::{ElemOp, TxnDelta};
use crate::netlink::Event;

/// Committed transactions kept for the next reconcile at most; past that the driver reads the
/// facts again (one dump) rather than take in a long backlog.
const MAX_READY: usize = 4096;

/// Someone else's element changes in one transaction followed at most; past that (a bulk
/// load into masqd's sets) the sets are read back instead.
const MAX_OPS: usize = 16_384;

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
    /// The generation (low 16 bits, `nfgenmsg.res_id`) of the transaction being read.
    open_res: Option<u16>,
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
        && own_table(*family, table.as_deref())
        && matches!(
            u32::from(*kind),
            sys::NFT_MSG_NEWTABLE
                | sys::NFT_MSG_DELTABLE
                | sys::NFT_MSG_NEWSET
                | sys::NFT_MSG_DELSET
        )
}

impl Follow {
    /// Takes a drained batch of notifications in. True: it closed a transaction in which
    /// someone else changed masqd's set elements — a reconcile is owed now (it was held back
    /// until the transaction's `NEWGEN` was read, so that it starts with the change in hand).
    pub fn take_in(&mut self, events: &[Event], own_pid: u32) -> bool {
        let mut repair = false;
        for e in events {
            match e {
                Event::Overrun => self.lost(),
                Event::Generation { id, .. } => repair |= self.committed(*id),
                Event::Change { res_id, .. } => {
                    self.belongs(*res_id);
                    self.touched |= touches_own_sets(e, own_pid);
                    self.rules_moved |= self.open.take(e);
                }
                Event::Elements { res_id, .. } => {
                    self.belongs(*res_id);
                    self.elements(e, own_pid);
                }
            }
        }
        repair
    }

    /// Whether someone else's element changes wait for their transaction's `NEWGEN` (a
    /// reconcile started now would plan without them).
    pub fn elements_pending(&self) -> bool {
        !self.open.elements.is_empty()
    }

    /// Notifications were lost (or could not be read): nothing followed can be trusted.
    pub fn lost(&mut self) {
        self.open = TxnDelta::default();
        self.open_res = None;
        self.touched = true;
        self.overflowed = true;
        self.rules_moved = true;
    }

    /// A change of the generation whose low 16 bits are `res_id`: one of a transaction whose
    /// `NEWGEN` was never read (lost while muted) cannot be placed.
    fn belongs(&mut self, res_id: u16) {
        match self.open_res {
            Some(r) if r != res_id => self.lost(),
            _ => {}
        }
        self.open_res = Some(res_id);
    }

    /// Someone else's changes to the elements of masqd's sets, kept for the transaction
    /// (masqd's own commits are in the cache it made after them). Past [`MAX_OPS`] in one
    /// transaction the sets are read back instead.
    fn elements(&mut self, e: &Event, own_pid: u32) {
        let Event::Elements {
            add,
            family,
            pid,
            table,
            set,
            elements,
            ..
        } = e
        else {
            return;
        };
        if !own_table(*family, table.as_deref()) || *pid == own_pid {
            return;
        }
        if self.open.elements.len() + elements.len() > MAX_OPS {
            self.touched = true;
            self.open.elements.clear();
            return;
        }
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

    /// A transaction's `NEWGEN`: its changes belong to generation `id`. Whether they include
    /// someone else's element changes (or a change that ends the trust in the set cache).
    fn committed(&mut self, id: u32) -> bool {
        if self.open_res.take().is_some_and(|r| r != id as u16) {
            self.lost();
            return true;
        }
        let mut d = std::mem::take(&mut self.open);
        if d.is_empty() {
            return false;
        }
        d.gen = id;
        let repair = !d.elements.is_empty();
        if self.ready.len() >= MAX_READY {
            // A backlog this long is read again rather than replayed: the counts and the sets.
            self.overflowed = true;
            self.touched = true;
            self.ready.clear();
        }
        if !self.overflowed {
            self.ready.push(d);
        } else if repair {
            self.touched = true;
        }
        repair
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
