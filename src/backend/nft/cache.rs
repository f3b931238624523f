//! The set cache: the sets masqd last committed, valid while the ruleset generation is
//! unchanged — or, in the daemon, while the change notifications say what else happened to
//! them ([`SetCache::follow`]).

use super::facts::ElemOp;
use super::model::{nomasq_set, pod_set, ObservedSet};
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
    /// The cache describing the sets a plan leaves behind at generation `genid`. The ranges
    /// are the policy's own (shared, not copied: 32 MB at 1,000,000 exceptions).
    pub fn after(policy: &crate::policy::Policy, genid: u32) -> SetCache {
        let mut sets = std::collections::BTreeMap::new();
        for f in crate::policy::Family::ALL {
            let Some(fp) = policy.family(f) else { continue };
            for (name, ranges) in [(pod_set(f), &fp.pod), (nomasq_set(f), &fp.nomasq)] {
                let set = ObservedSet {
                    family: Some(f),
                    interval: true,
                    ranges: Some(ranges.clone()),
                    unread: false,
                };
                sets.insert(name, set);
            }
        }
        SetCache {
            genid,
            sets,
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
        let mut by_set: std::collections::BTreeMap<String, (Vec<Range>, Vec<Range>)> =
            std::collections::BTreeMap::new();
        for (set, add, r) in intervals {
            let (adds, dels) = by_set.entry(set).or_default();
            if add { adds } else { dels }.push(r);
        }
        by_set.into_iter().all(|(set, (adds, dels))| {
            let Some(ranges) = self.sets.get_mut(&set).and_then(|s| s.ranges.as_mut()) else {
                return false;
            };
            match merge(ranges, adds, dels) {
                Some(merged) => {
                    *ranges = merged.into();
                    true
                }
                None => false,
            }
        })
    }

    /// Pairs start and end elements into intervals (set, added, range), in order; a start with
    /// no end is an interval reaching the top of the address space.
    fn pair(&self, ops: &[ElemOp]) -> Option<Vec<(String, bool, Range)>> {
        let family = |set: &str| -> Option<Family> { self.sets.get(set)?.family };
        // A start without its end: the interval reaches the top of the address space.
        let to_top = |(p, f, start): (&ElemOp, Family, u128)| {
            let end = f.max();
            (p.set.clone(), p.add, Range { start, end })
        };
        let mut out = Vec::new();
        let mut open: Option<(&ElemOp, Family, u128)> = None;
        for op in ops {
            let f = family(&op.set)?;
            let key = f.addr_from_bytes(&op.key)?;
            match (op.end, open.take()) {
                (false, prev) => {
                    out.extend(prev.map(to_top));
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
        out.extend(open.map(to_top));
        Some(out)
    }
}

/// Applies one transaction's added and deleted intervals to sorted, disjoint `ranges` in one
/// pass (O(n + k log k), whatever the set's size). None — the cache is wrong, or the order
/// within the transaction would matter — when a deleted interval is not one of them, an added
/// one overlaps another (the kernel would have refused it), or one interval is both.
fn merge(ranges: &[Range], mut adds: Vec<Range>, mut dels: Vec<Range>) -> Option<Vec<Range>> {
    adds.sort_unstable();
    dels.sort_unstable();
    if adds.iter().any(|r| dels.binary_search(r).is_ok()) {
        return None;
    }
    let mut out: Vec<Range> = Vec::with_capacity(ranges.len() + adds.len());
    let push = |out: &mut Vec<Range>, r: Range| {
        let clear = out.last().is_none_or(|last| last.end < r.start);
        out.push(r);
        clear
    };
    let (mut di, mut ai) = (0, 0);
    for r in ranges.iter() {
        if dels.get(di) == Some(r) {
            di += 1;
            continue;
        }
        while let Some(a) = adds.get(ai).filter(|a| a.start < r.start) {
            if !push(&mut out, *a) {
                return None;
            }
            ai += 1;
        }
        if !push(&mut out, *r) {
            return None;
        }
    }
    if di != dels.len() || !adds[ai..].iter().all(|a| push(&mut out, *a)) {
        return None;
    }
    Some(out)
}
