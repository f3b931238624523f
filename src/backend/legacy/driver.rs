//! The legacy xtables driver: [`super::Driver`] over the `pub` API of [`super::legacy`] (the
//! iptables-legacy binaries), for the families whose policy or default rules live there.

use std::collections::BTreeMap;

use anyhow::{anyhow, Context, Result};

use crate::backend::legacy::{self, Binaries, LegacyObserved};
use crate::backend::{Applied, Backend, Changes, Driver, Mute, Observation, Restored};
use crate::detect::Facts;
use crate::foreign::NatRule;
use crate::policy::{Family, Policy};
use crate::state::RemovedRule;

/// One family the legacy driver looks at.
#[derive(Debug, Clone)]
pub struct LegacyFamily {
    /// The family.
    pub family: Family,
    /// Whether its policy lives here (else only stale objects and default rules are removed).
    pub active: bool,
    /// Its binaries.
    pub bins: Binaries,
}

/// The legacy driver: the families it handles, and (after teardown) the ones to check.
#[derive(Debug, Clone, Default)]
pub struct LegacyDriver {
    families: Vec<LegacyFamily>,
    removed_from: Vec<(Family, Binaries)>,
}

impl LegacyDriver {
    /// A driver for the given families (detection builds it).
    pub fn new(families: Vec<LegacyFamily>) -> LegacyDriver {
        LegacyDriver {
            families,
            removed_from: Vec::new(),
        }
    }

    /// A driver for the families given as (family, whether its policy lives here), each with
    /// the binaries found on PATH; a family without them is left out with a warning (its
    /// default rules cannot be removed).
    pub fn for_families(families: &[(Family, bool)]) -> LegacyDriver {
        let mut out = Vec::new();
        for &(family, active) in families {
            let Some(bins) = legacy::binaries(family) else {
                // Detection already refused a legacy family without binaries; a non-legacy
                // family with legacy nat loaded but no binaries cannot be cleaned: say so.
                tracing::warn!(
                    "{family}: the legacy nat table is loaded but the iptables-legacy binaries \
                     are missing; default rules there cannot be removed"
                );
                continue;
            };
            out.push(LegacyFamily {
                family,
                active,
                bins,
            });
        }
        LegacyDriver::new(out)
    }

    /// Whether the policy of some family lives here.
    pub fn installs(&self) -> bool {
        self.families.iter().any(|f| f.active)
    }

    /// Whether it handles no family at all.
    pub fn is_empty(&self) -> bool {
        self.families.is_empty()
    }

    /// Puts back the records of family `f`: checked, then appended to POSTROUTING with one
    /// `iptables-legacy-restore --noflush`.
    fn restore_family(&self, f: Family, records: &[RemovedRule], out: &mut Restored) {
        let mut good = Vec::new();
        for r in records
            .iter()
            .filter(|r| r.backend.known() == Some(Backend::Legacy) && r.family.known() == Some(f))
        {
            match legacy::replayable(r) {
                Ok(_) => good.push(r),
                Err(why) => out
                    .problems
                    .push((r.clone(), format!("refused to replay it: {why}"))),
            }
        }
        if good.is_empty() {
            return;
        }
        let res = legacy::binaries(f)
            .ok_or_else(|| anyhow!("no iptables-legacy binaries to restore it with"))
            .and_then(|bins| {
                let lo = legacy::observe(f, &bins)?;
                let present: Vec<bool> = good
                    .iter()
                    .map(|r| {
                        let spec = r.legacy_rule.clone().unwrap_or_default();
                        lo.postrouting.iter().any(|o| {
                            legacy::same_rules(std::slice::from_ref(o), std::slice::from_ref(&spec))
                        })
                    })
                    .collect();
                let (payload, _) = legacy::restore_payload(&lo, &good);
                if let Some(p) = payload {
                    legacy::apply(&bins, &p)?;
                }
                Ok(present)
            });
        match res {
            Ok(present) => {
                for (r, there) in good.into_iter().zip(present) {
                    let list = if there {
                        &mut out.already_present
                    } else {
                        &mut out.restored
                    };
                    list.push(r.clone());
                }
            }
            Err(e) => {
                for r in good {
                    out.problems.push((r.clone(), format!("{e:#}")));
                }
            }
        }
    }
}

/// How teardown names the legacy objects it removed.
fn removed_text(f: Family, lo: &LegacyObserved) -> String {
    let jumps = lo.postrouting.iter().filter(|r| *r == legacy::JUMP).count();
    let (_, _, bin) = legacy::binary_names(f);
    let mut parts = Vec::new();
    if lo.chain_exists {
        parts.push(format!(
            "chain nat {} ({} rules)",
            legacy::CHAIN,
            lo.chain_rules.len()
        ));
    }
    if jumps > 0 {
        parts.push(format!("{jumps} jump(s) from POSTROUTING"));
    }
    format!("{bin}: {}", parts.join(" and "))
}

impl Driver for LegacyDriver {
    fn backend(&self) -> Backend {
        Backend::Legacy
    }

    /// Reads `/proc/net/ip{,6}_tables_names`, then (only when it lists tables)
    /// `iptables-legacy-save` without `-t`; resolves the node's `iptables` on PATH.
    fn facts(&mut self, f: Family, facts: &mut Facts) -> Result<()> {
        crate::detect::legacy_facts(f, facts);
        crate::detect::system_default(f, facts);
        Ok(())
    }

    /// Equals `iptables-legacy-save -c -t nat` per family handled.
    fn observe(&mut self) -> Result<Observation> {
        let mut out = BTreeMap::new();
        for lf in &self.families {
            let f = lf.family;
            let lo = legacy::observe(f, &lf.bins)
                .with_context(|| format!("reading the legacy {f} nat table"))?;
            out.insert(f, lo);
        }
        Ok(Observation::Legacy(out))
    }

    fn plan(&self, policy: &Policy, observed: &Observation) -> Changes {
        let Observation::Legacy(map) = observed else {
            return Changes::Legacy(Vec::new());
        };
        let mut plans = Vec::new();
        for lf in &self.families {
            let Some(lo) = map.get(&lf.family) else {
                continue;
            };
            let active = policy
                .family(lf.family)
                .filter(|_| lf.active)
                .map(|fp| (fp, policy.bridges.as_slice(), policy.random_fully));
            let lp = legacy::plan(
                active,
                lo,
                &policy.default_rule_cidrs,
                policy.replace_default_rule,
            );
            if lp.payload.is_some() {
                plans.push((lf.family, lp));
            }
        }
        Changes::Legacy(plans)
    }

    /// Equals `iptables-legacy-restore --noflush --wait` of each family's payload.
    fn apply(
        &mut self,
        _policy: &Policy,
        _observed: &Observation,
        changes: &Changes,
        _mute: Option<Mute<'_>>,
    ) -> Result<Applied> {
        let Changes::Legacy(plans) = changes else {
            return Err(anyhow!(
                "internal: the legacy driver was given another driver's plan"
            ));
        };
        for (f, lp) in plans {
            let Some(payload) = &lp.payload else { continue };
            let bins = legacy::binaries(*f).ok_or_else(|| {
                anyhow!("{f}: the iptables-legacy binaries disappeared from PATH")
            })?;
            legacy::apply(&bins, payload)
                .with_context(|| format!("applying the legacy {f} changes:\n{payload}"))?;
        }
        Ok(Applied::default())
    }

    fn records(&self, changes: &Changes) -> Vec<RemovedRule> {
        let Changes::Legacy(plans) = changes else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (f, lp) in plans {
            for (spec, saddr, oif) in &lp.removed_defaults {
                out.push(legacy::record_of(*f, spec, saddr, oif));
            }
        }
        out
    }

    fn restore(&mut self, records: &[RemovedRule]) -> Restored {
        let mut out = Restored::default();
        for f in Family::ALL {
            self.restore_family(f, records, &mut out);
        }
        // A legacy record of a family this masqd does not know is kept, and said so.
        for r in records
            .iter()
            .filter(|r| r.backend.known() == Some(Backend::Legacy) && r.family.known().is_none())
        {
            let why = format!("unknown family {:?}", r.family.as_str());
            out.problems
                .push((r.clone(), format!("refused to replay it: {why}")));
        }
        out
    }

    /// Equals `iptables-legacy-restore --noflush` of [`legacy::teardown_payload`] per family
    /// whose legacy nat table is loaded.
    fn remove_own(&mut self) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        for f in Family::ALL {
            if !legacy::tables_loaded(f)
                .unwrap_or_default()
                .iter()
                .any(|t| t == "nat")
            {
                continue;
            }
            let Some(bins) = legacy::binaries(f) else {
                tracing::warn!(
                    "{f}: the legacy nat table is loaded but the iptables-legacy binaries are \
                     missing: masqd's legacy chain, if any, cannot be removed"
                );
                continue;
            };
            let lo = legacy::observe(f, &bins)
                .with_context(|| format!("reading the legacy {f} nat table"))?;
            if let Some(payload) = legacy::teardown_payload(&lo) {
                legacy::apply(&bins, &payload).with_context(|| {
                    format!(
                        "removing masqd's legacy {f} chain (the recorded rules are back; \
                         masqd's table stays until teardown runs again):\n{payload}"
                    )
                })?;
                removed.push(removed_text(f, &lo));
            }
            self.removed_from.push((f, bins));
        }
        Ok(removed)
    }

    /// Equals `iptables-legacy-save -t nat` showing no masqd chain or jump.
    fn check_removed(&mut self) -> Result<()> {
        for (f, bins) in &self.removed_from {
            if legacy::observe(*f, bins)?.has_masqd() {
                return Err(anyhow!("masqd's legacy {f} chain or jump is still there"));
            }
        }
        Ok(())
    }

    fn nat_rules(&mut self, observed: &Observation) -> Result<Vec<NatRule>> {
        let mut out = Vec::new();
        if let Observation::Legacy(map) = observed {
            for (f, lo) in map {
                out.extend(legacy::nat_rules(*f, lo));
            }
        }
        Ok(out)
    }

    /// `iptables-legacy-restore --noflush` input for every family whose policy lives here.
    fn export(&self, policy: &Policy, observed: Option<&Observation>) -> String {
        let mut s = String::new();
        for lf in self.families.iter().filter(|f| f.active) {
            let Some(fp) = policy.family(lf.family) else {
                continue;
            };
            let lo = match observed {
                Some(Observation::Legacy(m)) => m.get(&lf.family).cloned(),
                _ => None,
            }
            .unwrap_or_default();
            s.push_str(&legacy::export(
                lf.family,
                fp,
                &policy.bridges,
                policy.random_fully,
                &lo,
                &[],
            ));
        }
        s
    }
}
