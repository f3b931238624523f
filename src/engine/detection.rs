//! Detection for the engine: the facts of both families gathered through the drivers, the
//! decision of each (design.md §4), and where its guard lives.

use anyhow::{anyhow, Context, Result};
use serde::Serialize;

use crate::backend::{Backend, Driver, LegacyDriver};
use crate::backend::{CHAIN, CHAIN_PRIORITY_NFT, TABLE};
use crate::config;
use crate::detect::{self, Decision, Facts};
use crate::policy::{Family, Policy};

/// Facts and decision of each family.
#[derive(Debug, Clone, Serialize)]
pub struct Detection {
    /// IPv4.
    pub ipv4: FamilyDetection,
    /// IPv6.
    pub ipv6: FamilyDetection,
}

/// Facts and decision of one family.
#[derive(Debug, Clone, Serialize)]
pub struct FamilyDetection {
    /// Chosen backend.
    pub backend: Backend,
    /// Why.
    pub reason: String,
    /// Where the guard of this family lives (design.md §3.1, §3.2), or why it has none.
    pub guard: String,
    /// What was found.
    pub facts: Facts,
}

impl FamilyDetection {
    /// Whether masqd keeps the guard of this family in nftables.
    pub fn has_guard(&self) -> bool {
        !self.facts.nft_unavailable
    }
}

pub(super) fn guard_text(backend: Backend, nft_available: bool) -> String {
    match (backend, nft_available) {
        (_, false) => "unavailable: the kernel answers no nf_tables requests, so exceptions are \
                       enforced by RETURN rules only and a masquerade rule that runs first \
                       (another daemon's) wins"
            .to_string(),
        (Backend::Nft, true) => format!(
            "identity SNAT in table inet {} chain {} (priority {})",
            TABLE, CHAIN, CHAIN_PRIORITY_NFT
        ),
        (Backend::Legacy, true) => format!(
            "identity SNAT in table inet {} chain {} (priority {}), in front of the policy in \
             legacy xtables",
            TABLE, CHAIN, CHAIN_PRIORITY_NFT
        ),
    }
}

impl Detection {
    /// The detection of a family.
    pub fn family(&self, f: Family) -> &FamilyDetection {
        match f {
            Family::V4 => &self.ipv4,
            Family::V6 => &self.ipv6,
        }
    }

    /// Families whose backend is `b`.
    pub fn families(&self, b: Backend) -> Vec<Family> {
        Family::ALL
            .into_iter()
            .filter(|f| self.family(*f).backend == b)
            .collect()
    }
}

/// Runs detection for both families, the nftables facts from `nft` (the kernel's driver, or a
/// fake). A family without pod CIDRs whose legacy side cannot be inspected is reported, not
/// fatal; one with pod CIDRs is an error that says how to fix it.
pub fn detect_with(
    mode: config::BackendMode,
    policy: &Policy,
    nft: &mut dyn Driver,
) -> Result<Detection> {
    detect_cached(mode, policy, nft, &mut None)
}

/// The legacy facts of both families (`[ipv4, ipv6]`, only the parts the legacy driver
/// gathers: binaries, loaded tables, the `iptables-legacy-save` counts, the node's own
/// `iptables` variant), kept by the daemon between reconciles while legacy xtables did not
/// change.
pub type LegacyFacts = Option<[Facts; 2]>;

/// [`detect_with`] with the legacy facts from `legacy` when it holds them (then no binary
/// runs), else gathered now and left there for the next call.
pub fn detect_cached(
    mode: config::BackendMode,
    policy: &Policy,
    nft: &mut dyn Driver,
    legacy: &mut LegacyFacts,
) -> Result<Detection> {
    let [l4, l6] = match legacy {
        Some(l) => l.clone(),
        None => {
            let mut drv = LegacyDriver::default();
            let mut gather = |f: Family| detect::gather_from(f, &mut [&mut drv]);
            let v4 = gather(Family::V4).context("detecting the ipv4 backend")?;
            let v6 = gather(Family::V6).context("detecting the ipv6 backend")?;
            legacy.insert([v4, v6]).clone()
        }
    };
    nft.counts_needed(mode == config::BackendMode::Auto);
    let mut with_nft = |f: Family, mut facts: Facts| -> Result<Facts> {
        nft.facts(f, &mut facts)?;
        Ok(facts)
    };
    let v4 = with_nft(Family::V4, l4).context("detecting the ipv4 backend")?;
    let v6 = with_nft(Family::V6, l6).context("detecting the ipv6 backend")?;
    decide_detection(mode, policy, v4, v6)
}

/// The decision of both families from their facts (design.md §4).
fn decide_detection(
    mode: config::BackendMode,
    policy: &Policy,
    v4: Facts,
    v6: Facts,
) -> Result<Detection> {
    let decisions = detect::decide_both(mode, [&v4, &v6]);
    let mut out = Vec::new();
    for ((f, facts), d) in Family::ALL.into_iter().zip([v4, v6]).zip(decisions) {
        let d = match d {
            Ok(d) => d,
            Err(e) if policy.family(f).is_none() => Decision {
                backend: Backend::Nft,
                reason: format!("no {f} pod CIDRs, so nothing to install ({e})"),
            },
            Err(e) => return Err(anyhow!(e)),
        };
        out.push(FamilyDetection {
            backend: d.backend,
            reason: d.reason,
            guard: guard_text(d.backend, !facts.nft_unavailable),
            facts,
        });
    }
    let ipv6 = out
        .pop()
        .ok_or_else(|| anyhow!("internal: no IPv6 detection"))?;
    let ipv4 = out
        .pop()
        .ok_or_else(|| anyhow!("internal: no IPv4 detection"))?;
    Ok(Detection { ipv4, ipv6 })
}

/// Runs detection for both families with no configuration (`masqd detect` without a config
/// file): `backend.mode = "auto"` and no policy, so a family whose legacy side cannot be
/// inspected is reported, not fatal.
pub fn detect_without_policy(nft: &mut dyn Driver) -> Result<Detection> {
    detect_with(config::BackendMode::Auto, &Policy::empty(), nft)
}
