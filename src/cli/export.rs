//! `masqd export`: which payload to print (nft script or a legacy family's restore payload),
//! decided from the configuration and detection, and the notes that go with it.

use anyhow::{anyhow, Result};

use super::backend_calls;
use super::exit::OK;
use crate::backend::Backend;
use crate::config::{BackendMode, Config};
use crate::engine::Detection;
use crate::policy::{Family, Policy};

/// What `masqd export` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// An `nft -f` script.
    Nft,
    /// An `iptables-legacy-restore --noflush` payload.
    Iptables,
}

/// The payload chosen for an export, with what it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// The nftables part of the policy: the families in nftables in full, and the guard of the
    /// `guard` families (in legacy xtables, with nf_tables available).
    Nft {
        /// Families whose whole policy is in nftables.
        full: Vec<Family>,
        /// Legacy families whose guard is in nftables.
        guard: Vec<Family>,
    },
    /// The restore payload of one legacy family.
    Iptables {
        /// The family.
        family: Family,
        /// A warning for stderr when the family is not in legacy xtables here.
        warning: Option<String>,
        /// Comments in the payload pointing at the other parts of the policy.
        notes: Vec<String>,
    },
}

/// Decides what to export from the detection `d`: the format asked for, or what the detected
/// backends use (iptables when a family with pod CIDRs is in legacy xtables); for iptables,
/// the family asked for or the first legacy one. Pure.
pub fn choose(
    d: &Detection,
    policy: &Policy,
    format: Option<Format>,
    family: Option<Family>,
) -> Choice {
    let legacy: Vec<Family> = d
        .families(Backend::Legacy)
        .into_iter()
        .filter(|f| policy.family(*f).is_some())
        .collect();
    let format = format.unwrap_or(if legacy.is_empty() {
        Format::Nft
    } else {
        Format::Iptables
    });
    if format == Format::Nft {
        let guard = legacy
            .iter()
            .copied()
            .filter(|f| d.family(*f).has_guard())
            .collect();
        let full = d.families(Backend::Nft);
        return Choice::Nft { full, guard };
    }
    let f = family.unwrap_or_else(|| legacy.first().copied().unwrap_or(Family::V4));
    let fd = d.family(f);
    let warning = (fd.backend != Backend::Legacy).then(|| {
        format!(
            "masqd: warning: {f} is not in legacy xtables on this node (backend {}): this \
             payload is not what masqd installs here",
            fd.backend
        )
    });
    let mut notes: Vec<String> = legacy
        .iter()
        .filter(|o| **o != f)
        .map(|o| format!("the {o} policy: masqd export --format iptables --family {o}"))
        .collect();
    if fd.has_guard() {
        notes.push("the guard in nftables: masqd export --format nft".into());
    }
    Choice::Iptables {
        family: f,
        warning,
        notes,
    }
}

/// `masqd export`: the nftables part of the policy as detection places it (the guard only for
/// a family in legacy xtables), or a legacy family's restore payload.
pub fn export(
    cfg: &Config,
    policy: &Policy,
    format: Option<Format>,
    family: Option<Family>,
) -> Result<u8> {
    if cfg.mode == BackendMode::Nft && format != Some(Format::Iptables) {
        // Every family is in nftables: nothing to detect, the kernel is not asked.
        print!("{}", backend_calls::export_nft(policy));
        return Ok(OK);
    }
    let d = backend_calls::detect(cfg, policy)?;
    match choose(&d, policy, format, family) {
        Choice::Nft { full, guard } => {
            let nft_policy = policy.nft_part(&full, &guard);
            print!("{}", backend_calls::export_nft(&nft_policy));
        }
        Choice::Iptables {
            family: f,
            warning,
            notes,
        } => {
            let no_policy = || {
                anyhow!(
                    "no {f} pod CIDRs in {}: no {f} policy to export",
                    cfg.path.display()
                )
            };
            let text = backend_calls::export_legacy(f, policy, &notes)?.ok_or_else(no_policy)?;
            if let Some(w) = warning {
                eprintln!("{w}");
            }
            print!("{text}");
        }
    }
    Ok(OK)
}
