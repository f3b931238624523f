//! The kernel reads of the one-shot commands that the engine does not make whole (`plan`,
//! `detect`, `export`): each opens the kernel's nft driver ([`query::Nftables`]) and goes
//! through the engine's driver-based entry points; the iptables payload comes from
//! [`query::export_legacy`]. `apply`, `status` and `teardown` are engine calls of their own.

use anyhow::Result;

use crate::backend::query::{self, Nftables};
use crate::config::Config;
use crate::engine::{self, Detection, Plan};
use crate::foreign::Overridden;
use crate::policy::{Family, Policy};

/// Detection and the plan over the drivers it chooses, through `nft`.
fn plan_over(nft: &mut Nftables, cfg: &Config, policy: &Policy) -> Result<Plan> {
    let detection = engine::detect_with(cfg.mode, policy, nft.driver())?;
    let mut set = engine::drivers(&detection, policy, Box::new(nft.driver()))?;
    engine::plan_with(&mut set, detection)
}

/// What `apply` would change (`masqd plan`): detection and both backends' observations over a
/// socket of its own. Equals `nft -a list ruleset` plus `iptables-legacy-save` where detection
/// puts a family in legacy xtables.
pub fn plan(cfg: &Config, policy: &Policy) -> Result<Plan> {
    plan_over(&mut Nftables::open()?, cfg, policy)
}

/// Detection with the configuration's policy, and the other NAT rules for its pod CIDRs
/// (`masqd detect`). Equals `nft -a list ruleset` plus `iptables-legacy-save -t nat` where the
/// legacy nat table is loaded.
pub fn detect_with_overridden(
    cfg: &Config,
    policy: &Policy,
) -> Result<(Detection, Vec<Overridden>)> {
    let mut nft = Nftables::open()?;
    let p = plan_over(&mut nft, cfg, policy)?;
    let overridden = p.overridden_with(policy, nft.driver())?;
    Ok((p.detection, overridden))
}

/// The policy of no configuration: no family, nothing else (detection then reports a family
/// whose legacy side cannot be inspected instead of failing).
/// Detection without a configuration (`masqd detect` with no or an invalid config file):
/// `backend.mode = "auto"` and no policy. Equals `nft list ruleset` plus `iptables-legacy-save`
/// where legacy tables are loaded.
pub fn detect_without_policy() -> Result<Detection> {
    let mut nft = Nftables::open()?;
    engine::detect_without_policy(nft.driver())
}

/// Detection for `masqd export`. Equals what [`detect_without_policy`] reads, with the
/// configured `backend.mode`.
pub fn detect(cfg: &Config, policy: &Policy) -> Result<Detection> {
    let mut nft = Nftables::open()?;
    engine::detect_with(cfg.mode, policy, nft.driver())
}

/// The `nft -f` script that replaces masqd's table with `policy` atomically (pure).
pub fn export_nft(policy: &Policy) -> String {
    engine::export_nft(None, policy)
}

/// The `iptables-legacy-restore --noflush` payload of family `f`, built against the legacy nat
/// table as it is (read with `iptables-legacy-save -c -t nat` when the binaries exist), with
/// `notes` as comments.
pub fn export_legacy(f: Family, policy: &Policy, notes: &[String]) -> Result<Option<String>> {
    query::export_legacy(f, policy, notes)
}
