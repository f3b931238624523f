//! The set cache: the sets masqd last committed, valid while the ruleset generation is unchanged.

use super::model::ObservedSet;

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
}
