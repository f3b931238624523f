//! `masqd detect`: which backend each family uses, the facts and why, with or without a
//! configuration.

use std::path::Path;

use anyhow::Result;

use super::apply::overridden_text;
use super::backend_calls;
use super::exit::OK;
use crate::engine::{self, Detection};
use crate::policy::Family;

/// `masqd detect`: with a valid configuration, detection with its policy and the overridden
/// rules; with none, or an invalid one, detection without a policy, saying why (the error
/// itself is what `masqd check` is for).
pub fn detect(source: &crate::config::Source, json: bool) -> Result<u8> {
    let config = source.path();
    if matches!(source, crate::config::Source::Toml { .. }) && config_missing(config) {
        let note = format!("no config file at {}", config.display());
        return detect_without_config(json, &note);
    }
    let (cfg, policy) = match engine::load(source) {
        Ok(x) => x,
        Err(e) => {
            return detect_without_config(json, &format!("the configuration is invalid ({e})"))
        }
    };
    let (d, overridden) = backend_calls::detect_with_overridden(&cfg, &policy)?;
    if json {
        let mut v = serde_json::to_value(&d)?;
        v["overridden"] = serde_json::to_value(&overridden)?;
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", detection_text(&d));
        print!("{}", overridden_text(&overridden));
    }
    Ok(OK)
}

/// Whether the config file does not exist (a file that exists but cannot be read is an error
/// of its own).
pub fn config_missing(path: &Path) -> bool {
    matches!(std::fs::symlink_metadata(path), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
}

/// `masqd detect` with no config file: both families' facts and decisions, with no policy.
fn detect_without_config(json: bool, why: &str) -> Result<u8> {
    let d = backend_calls::detect_without_policy()?;
    let note = format!(
        "{why}: detection without a policy (backend.mode auto, no pod CIDRs); the overridden \
         rules need the pod CIDRs and are not listed"
    );
    if json {
        let mut v = serde_json::to_value(&d)?;
        v["note"] = serde_json::Value::String(note);
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("# {note}");
        print!("{}", detection_text(&d));
    }
    Ok(OK)
}

/// The text of a detection: per family the decision, the guard and the facts.
pub fn detection_text(d: &Detection) -> String {
    let mut out = Vec::new();
    for f in Family::ALL {
        let fd = d.family(f);
        let x = &fd.facts;
        out.push(format!("{f}: {} — {}", fd.backend, fd.reason));
        out.push(format!("    guard                      {}", fd.guard));
        out.push(format!(
            "    system iptables            {}",
            x.system_iptables.as_deref().unwrap_or("(not found)")
        ));
        for (b, p) in &x.binaries {
            out.push(format!(
                "    {b:<26} {}",
                p.as_deref().unwrap_or("(not found)")
            ));
        }
        let tables = if x.legacy_tables.is_empty() {
            "(none)".to_string()
        } else {
            x.legacy_tables.join(", ")
        };
        out.push(format!("    legacy tables loaded       {tables}"));
        out.push(format!("    legacy rules               {}", x.legacy_rules));
        out.push(format!(
            "    legacy hint chains         {:?}",
            x.legacy_hint_chains
        ));
        out.push(format!("    legacy masqd chain         {}", x.legacy_masqd));
        if let Some(e) = &x.legacy_error {
            out.push(format!("    legacy error               {e}"));
        }
        out.push(format!("    nftables rules             {}", x.nft_rules));
        out.push(format!(
            "    nftables hint chains       {:?}",
            x.nft_hint_chains
        ));
        out.push(format!("    nftables masqd policy      {}", x.nft_masqd));
    }
    let mut s = out.join("\n");
    s.push('\n');
    s
}
