//! The facts of backend detection (design.md §4), gathered through the drivers: the legacy
//! side from `/proc/net/ip{,6}_tables_names` and one `iptables-legacy-save` without `-t`, the
//! node's own `iptables` variant, the nftables side over netlink.

use anyhow::Result;

use super::{Backend, Facts, HINT_CHAINS};
use crate::backend::legacy;
use crate::backend::{Driver, LegacyDriver, NftDriver};
use crate::exec;
use crate::netlink::Socket;
use crate::policy::Family;

/// The legacy and nft variants of the family's iptables binaries (`iptables-legacy`,
/// `iptables-legacy-save`, …, `ip6tables-nft-restore`), from [`Family::ipt_binaries`].
pub(super) fn binary_list(f: Family) -> Vec<String> {
    let base = f.ipt_binary().trim_end_matches("-legacy");
    ["legacy", "nft"]
        .iter()
        .flat_map(|v| ["", "-save", "-restore"].map(|s| format!("{base}-{v}{s}")))
        .collect()
}

/// The legacy part of the facts, from the loaded-table list and (when tables are loaded) the
/// output of `iptables-legacy-save` without `-t`.
pub fn legacy_facts(f: Family, facts: &mut Facts) {
    for b in binary_list(f) {
        facts.binaries.insert(
            b.to_string(),
            exec::find_binary(&b).map(|p| p.display().to_string()),
        );
    }
    facts.legacy_tables = match legacy::tables_loaded(f) {
        Ok(t) => t,
        Err(e) => {
            facts.legacy_error = Some(format!("reading {}: {e}", legacy::tables_names_path(f)));
            return;
        }
    };
    if facts.legacy_tables.is_empty() {
        return;
    }
    let (save, _, _) = legacy::binary_names(f);
    let Some(path) = exec::find_binary(save) else {
        facts.legacy_error = Some(format!(
            "legacy tables are loaded ({}) but {save} is not on PATH (in a directory only root \
             can write) to inspect them",
            facts.legacy_tables.join(", ")
        ));
        return;
    };
    match exec::run(&path, &[], None, exec::DEFAULT_TIMEOUT) {
        Ok(out) => {
            facts.legacy_inspected = true;
            apply_legacy_save(&out.stdout, facts);
        }
        Err(e) => facts.legacy_error = Some(e.to_string()),
    }
}

/// Counts rules, hint chains and masqd's chain in iptables-save output.
pub fn apply_legacy_save(text: &str, facts: &mut Facts) {
    for t in legacy::parse_save(text) {
        facts.legacy_rules += t.rules.len();
        for c in &t.chains {
            if HINT_CHAINS.contains(&c.as_str()) {
                facts.legacy_hint_chains.push(format!("{}/{c}", t.name));
            }
            if t.name == "nat" && c == legacy::CHAIN {
                facts.legacy_masqd = true;
            }
        }
    }
}

/// The variant the node's own `iptables` (`ip6tables`) runs: the command on PATH resolved
/// through its symlinks (Debian's alternatives end at `xtables-legacy-multi` or
/// `xtables-nft-multi`, or at `iptables-legacy` / `iptables-nft`); when the name does not tell,
/// its `-V` output (`iptables v1.8.9 (legacy)` / `(nf_tables)`). `-V` touches no table.
pub fn system_default(f: Family, facts: &mut Facts) {
    let name = match f {
        Family::V4 => "iptables",
        Family::V6 => "ip6tables",
    };
    let Some(path) = exec::find_binary(name) else {
        return;
    };
    let resolved = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
    facts.system_iptables = Some(if resolved == path {
        path.display().to_string()
    } else {
        format!("{} -> {}", path.display(), resolved.display())
    });
    let file = resolved
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let script = std::fs::File::open(&resolved)
        .and_then(|mut f| {
            let mut b = [0u8; 2];
            std::io::Read::read_exact(&mut f, &mut b).map(|_| b == *b"#!")
        })
        .unwrap_or(true);
    facts.system_default = variant_of_name(&file).or_else(|| {
        // A script (kubernetes-sigs' iptables-wrapper) picks a mode when run: never run it.
        if script {
            return None;
        }
        exec::run(&path, &["-V"], None, exec::DEFAULT_TIMEOUT)
            .ok()
            .and_then(|o| variant_of_version(&o.stdout))
    });
}

/// `xtables-legacy-multi`, `iptables-legacy` → legacy; `xtables-nft-multi`, `iptables-nft` → nft;
/// `xtables-multi` (iptables before 1.8, which had only the legacy variant) → legacy.
pub(super) fn variant_of_name(file: &str) -> Option<Backend> {
    if file.contains("legacy") || file == "xtables-multi" {
        Some(Backend::Legacy)
    } else if file.contains("-nft") {
        Some(Backend::Nft)
    } else {
        None
    }
}

/// `iptables v1.8.9 (legacy)` → legacy, `iptables v1.8.9 (nf_tables)` → nft; a version before
/// 1.8 without either word (`iptables v1.6.1`) → legacy, the only variant it had.
pub(super) fn variant_of_version(text: &str) -> Option<Backend> {
    if text.contains("(legacy)") {
        Some(Backend::Legacy)
    } else if text.contains("(nf_tables)") {
        Some(Backend::Nft)
    } else {
        let v = text
            .split_whitespace()
            .find_map(|w| w.strip_prefix("v1."))?;
        let minor: u32 = v.split('.').next()?.parse().ok()?;
        (minor < 8).then_some(Backend::Legacy)
    }
}

/// Gathers the facts of one family: the legacy side from `/proc` and the binaries, the
/// nftables side over `sock`.
pub fn gather(f: Family, sock: &mut Socket) -> Result<Facts> {
    let mut nft = NftDriver::new(sock, None);
    let mut legacy = LegacyDriver::default();
    gather_from(f, &mut [&mut legacy, &mut nft])
}

/// Gathers the facts of one family from each driver in turn (legacy first: when the kernel
/// answers no nf_tables requests, the nft driver only says so).
pub fn gather_from(f: Family, sources: &mut [&mut dyn Driver]) -> Result<Facts> {
    let mut facts = Facts::default();
    for d in sources.iter_mut() {
        d.facts(f, &mut facts)?;
    }
    Ok(facts)
}
