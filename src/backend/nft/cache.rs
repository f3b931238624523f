//! The set cache: the sets masqd last committed, valid while the ruleset generation is unchanged.

use super::model::{nomasq_set, pod_set, ObservedSet};

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
        SetCache { genid, sets }
    }
}
