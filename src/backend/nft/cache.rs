//! The set cache: the sets masqd last committed, valid while the ruleset generation is
//! unchanged — or, in the daemon, while the change notifications say what else happened to
//! them ([`SetCache::follow`]).

use super::facts::ElemOp;
use super::model::ObservedSet;
use crate::policy::{Family, Range};

/// The sets of masqd's table as masqd itself last committed them, with the ruleset generation
/// right after that commit. While the generation is unchanged nothing in the ruleset changed,
/// so the (expensive) element dump can be skipped: the kernel's rbtree dump restarts its walk
/// for every 32 KiB message, which makes reading 60,000 intervals cost ~100 ms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetCache {
    /// Generation after masqd's commit.
    pub genid: u32,
    /// The sets it left.
    pub sets: std::collections::BTreeMap<String, ObservedSet>,
    /// The daemon vouches that no one else changed masqd's sets since (it follows the
    /// change notifications): valid whatever the generation.
    pub followed: bool,
}

impl SetCache {
    /// The cache describing the sets a plan leaves behind at generation `genid`.
    pub fn after(policy: &crate::policy::Policy, genid: u32) -> SetCache {
        SetCache {
            genid,
            sets: super::plan::desired_sets(policy)
                .into_iter()
                .map(|(name, (f, ranges))| {
                    (
                        name,
                        ObservedSet {
                            family: Some(f),
                            interval: true,
                            ranges: Some(ranges),
                        },
                    )
                })
                .collect(),
            followed: false,
        }
    }

    /// Takes in someone else's element changes of one transaction (notification order), made
    /// after the cache's generation. False: they cannot be followed (an interval that does not
    /// pair up, overlaps, or is not there to delete; a set the cache does not hold as
    /// intervals): read the sets back instead.
    pub fn follow(&mut self, ops: &[ElemOp]) -> bool {
        let Some(intervals) = self.pair(ops) else {
            return false;
        };
        intervals.into_iter().all(|(set, add, r)| {
            match self.sets.get_mut(&set).and_then(|s| s.ranges.as_mut()) {
                Some(ranges) if add => insert(ranges, r),
                Some(ranges) => remove(ranges, r),
                None => false,
            }
        })
    }

    /// Pairs start and end elements into intervals (set, added, range), in order; a start with
    /// no end is an interval reaching the top of the address space.
    fn pair(&self, ops: &[ElemOp]) -> Option<Vec<(String, bool, Range)>> {
        let family = |set: &str| -> Option<Family> { self.sets.get(set)?.family };
        let mut out = Vec::new();
        let mut open: Option<(&ElemOp, Family, u128)> = None;
        for op in ops {
            let f = family(&op.set)?;
            let key = f.addr_from_bytes(&op.key)?;
            match (op.end, open.take()) {
                (false, prev) => {
                    if let Some((p, pf, start)) = prev {
                        out.push((
                            p.set.clone(),
                            p.add,
                            Range {
                                start,
                                end: pf.max(),
                            },
                        ));
                    }
                    open = Some((op, f, key));
                }
                (true, Some((p, _, start)))
                    if p.set == op.set && p.add == op.add && key > start =>
                {
                    out.push((
                        p.set.clone(),
                        p.add,
                        Range {
                            start,
                            end: key - 1,
                        },
                    ));
                }
                (true, _) => return None,
            }
        }
        if let Some((p, pf, start)) = open {
            out.push((
                p.set.clone(),
                p.add,
                Range {
                    start,
                    end: pf.max(),
                },
            ));
        }
        Some(out)
    }
}

/// Inserts `r` into sorted, disjoint `ranges` (false when it overlaps one: the kernel would
/// have refused it, so the cache is wrong).
fn insert(ranges: &mut Vec<Range>, r: Range) -> bool {
    let at = ranges.partition_point(|x| x.start < r.start);
    let clear_before = at == 0 || ranges[at - 1].end < r.start;
    let clear_after = ranges.get(at).is_none_or(|x| x.start > r.end);
    if clear_before && clear_after {
        ranges.insert(at, r);
    }
    clear_before && clear_after
}

/// Removes exactly `r` from sorted `ranges` (false when it is not one of them).
fn remove(ranges: &mut Vec<Range>, r: Range) -> bool {
    match ranges.binary_search_by_key(&r.start, |x| x.start) {
        Ok(i) if ranges[i] == r => {
            ranges.remove(i);
            true
        }
        _ => false,
    }
}
