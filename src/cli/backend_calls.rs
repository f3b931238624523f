//! Every call the one-shot commands make into the backends (the nftables socket, the nft and
//! legacy exporters, the legacy binaries, the backends' error types and names): the few places
//! that change when the commands go through the driver interface of [`crate::backend`].

use anyhow::Result;

use super::exit;

use crate::backend::legacy;
use crate::backend::nft::{self, netlink::NlError, netlink::Socket};
use crate::config::Config;
use crate::engine::{self, Detection, Plan};
use crate::exec::ExecError;
use crate::foreign::Overridden;
use crate::policy::{Family, Policy};

/// What `apply` would change (`masqd plan`): detection and both backends' observations over a
/// socket of its own. Equals `nft -a list ruleset` plus `iptables-legacy-save` where detection
/// puts a family in legacy xtables.
pub fn plan(cfg: &Config, policy: &Policy) -> Result<Plan> {
    let mut sock = Socket::open()?;
    engine::make_plan(cfg, policy, &mut sock)
}

/// Detection with the configuration's policy, and the other NAT rules for its pod CIDRs
/// (`masqd detect`). Equals `nft -a list ruleset` plus `iptables-legacy-save -t nat` where the
/// legacy nat table is loaded.
pub fn detect_with_overridden(
    cfg: &Config,
    policy: &Policy,
) -> Result<(Detection, Vec<Overridden>)> {
    let mut sock = Socket::open()?;
    let p = engine::make_plan(cfg, policy, &mut sock)?;
    let overridden = p.overridden(policy, &mut sock)?;
    Ok((p.detection, overridden))
}

/// Detection without a configuration (`masqd detect` with no or an invalid config file).
/// Equals `nft list ruleset` plus `iptables-legacy-save` where legacy tables are loaded.
pub fn detect_without_policy() -> Result<Detection> {
    let mut sock = Socket::open()?;
    engine::detect_without_policy(&mut sock)
}

/// Detection for `masqd export`. Equals what [`detect_without_policy`] reads, with the
/// configured `backend.mode`.
pub fn detect(cfg: &Config, policy: &Policy) -> Result<Detection> {
    let mut sock = Socket::open()?;
    engine::detect(cfg, policy, &mut sock)
}

/// The `nft -f` script that replaces masqd's table with `policy` atomically (pure).
pub fn export_nft(policy: &Policy) -> String {
    nft::export(policy)
}

/// The `iptables-legacy-restore --noflush` payload of family `f`, built against the legacy nat
/// table as it is (read with `iptables-legacy-save -c -t nat` when the binaries exist), with
/// `notes` as comments.
pub fn export_legacy(f: Family, policy: &Policy, notes: &[String]) -> Result<Option<String>> {
    let Some(fp) = policy.family(f) else {
        return Ok(None);
    };
    let lo = match legacy::binaries(f) {
        Some(bins) => legacy::observe(f, &bins)?,
        None => Default::default(),
    };
    let (bridges, random_fully) = (&policy.bridges, policy.random_fully);
    Ok(Some(legacy::export(
        f,
        fp,
        bridges,
        random_fully,
        &lo,
        notes,
    )))
}

/// The lines `apply` (one summary per change) or `plan` (`full`: the nft text of every change,
/// and each legacy family's `iptables-legacy-restore --noflush --wait` payload) prints.
pub fn change_lines(p: &Plan, full: bool) -> Vec<String> {
    let mut out = Vec::new();
    for c in &p.nft {
        out.push(if full { c.to_string() } else { c.summary() });
    }
    for (f, lp) in &p.legacy {
        let (_, restore, _) = f.ipt_binaries();
        if full {
            out.push(format!("# {f}: {restore} --noflush --wait <<EOF"));
            // The payload ends in a newline of its own.
            let payload = lp.payload.as_deref().unwrap_or_default();
            out.push(format!("{payload}EOF"));
        } else {
            out.extend(lp.summary.iter().map(|s| format!("{f} legacy: {s}")));
        }
    }
    out
}

/// Whether a backend's error says masqd lacks privilege: EPERM/EACCES from netlink, or a legacy
/// binary that says so ("Permission denied (you must be root)"). None when `e` is not a
/// backend's error.
pub fn backend_denied(e: &(dyn std::error::Error + 'static)) -> Option<bool> {
    if let Some(n) = e.downcast_ref::<NlError>() {
        return Some(match n {
            NlError::Kernel { errno, .. } => exit::is_denied(*errno),
            NlError::Io { source, .. } => source.raw_os_error().is_some_and(exit::is_denied),
            _ => false,
        });
    }
    if let Some(x) = e.downcast_ref::<ExecError>() {
        return Some(match x {
            ExecError::Failed { stderr, .. } => {
                stderr.contains("Permission denied") || stderr.contains("you must be root")
            }
            _ => false,
        });
    }
    None
}

/// The `status` line of one entry of a family's sets: an nftables set's intervals, or the rules
/// of the legacy chain (the entry `legacy-chain`).
pub fn status_set_line(name: &str, n: usize) -> String {
    if name == "legacy-chain" {
        format!("  chain MASQD-POSTROUTING   {n} rule(s)")
    } else {
        format!("  set {name:<21} {n} interval(s)")
    }
}

/// Where a foreign rule is: `rule N` (its position in a legacy chain) or `handle N` (nft).
pub fn position(backend: &str, handle: u64) -> String {
    if backend == "legacy" {
        format!("rule {handle}")
    } else {
        format!("handle {handle}")
    }
}
