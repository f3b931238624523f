//! `masqd apply`, `masqd plan` and `masqd status`: the commands that compare the kernel with
//! the configuration, and what they print. `plan` and `status` ask the running daemon first
//! (its control socket, [`crate::control`]), and read the kernel themselves without one.

use anyhow::Result;

use super::backend_calls;
use super::exit::{CHANGES_PENDING, OK, OUT_OF_SYNC};
use crate::backend::query::{self, LEGACY_CHAIN, LEGACY_CHAIN_ENTRY};
use crate::backend::Backend;
use crate::config::Config;
use crate::control::{Command, Request};
use crate::engine::{self, Paths, Plan};
use crate::foreign::Overridden;
use crate::policy::Policy;

/// `masqd apply`: makes the kernel match and prints what changed; exit 0.
pub fn apply(paths: &Paths, cfg: &Config, policy: &Policy) -> Result<u8> {
    let p = engine::apply(paths, cfg, policy)?;
    if p.is_empty() {
        println!("in sync: nothing to change");
    } else {
        print_changes(&p, false);
        tracing::info!(changes = p.len(), "applied");
    }
    Ok(OK)
}

/// `masqd plan` and `masqd status` through the running daemon of `paths.state_dir`: its exit
/// code once its answer is printed; None (after one line on stderr saying why, unless
/// `direct`) when the command must read the kernel itself.
pub fn from_daemon(paths: &Paths, command: Command, json: bool, direct: bool) -> Option<u8> {
    if direct {
        return None;
    }
    let req = Request {
        version: crate::control::VERSION,
        command,
        json,
    };
    match crate::control::client::ask(&paths.state_dir, &paths.config, &req) {
        Ok(a) => {
            print!("{}", a.stdout);
            Some(a.exit)
        }
        Err(why) => {
            eprintln!("masqd: {why}: reading the kernel");
            None
        }
    }
}

/// `masqd plan`: the daemon's answer ([`from_daemon`]), else [`plan`] over the configuration.
pub fn plan_cmd(paths: &Paths, direct: bool) -> Result<u8> {
    if let Some(code) = from_daemon(paths, Command::Plan, false, direct) {
        return Ok(code);
    }
    let (cfg, policy) = engine::load(&paths.source)?;
    plan(&cfg, &policy)
}

/// `masqd status`: the daemon's answer ([`from_daemon`]), else [`status`] over the
/// configuration.
pub fn status_cmd(paths: &Paths, json: bool, direct: bool) -> Result<u8> {
    if let Some(code) = from_daemon(paths, Command::Status, json, direct) {
        return Ok(code);
    }
    let (cfg, policy) = engine::load(&paths.source)?;
    status(paths, &cfg, &policy, json)
}

/// `masqd plan`: prints what `apply` would change; exit 0 when nothing, 2 when changes are
/// pending.
pub fn plan(cfg: &Config, policy: &Policy) -> Result<u8> {
    let p = backend_calls::plan(cfg, policy)?;
    if p.is_empty() {
        println!("# in sync: nothing to change");
        return Ok(OK);
    }
    print_changes(&p, true);
    Ok(CHANGES_PENDING)
}

/// `masqd status`: exit 0 in sync, 3 out of sync.
pub fn status(paths: &Paths, cfg: &Config, policy: &Policy, json: bool) -> Result<u8> {
    let st = engine::status(paths, cfg, policy)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&st)?);
    } else {
        print!("{}", status_text(&st));
    }
    Ok(if st.in_sync { OK } else { OUT_OF_SYNC })
}

/// The text of `masqd status`.
pub fn status_text(st: &engine::Status) -> String {
    let mut out = vec![format!("backend:              {}", st.backend)];
    if st.in_sync {
        out.push("in sync:              yes".into());
    } else {
        out.push(format!(
            "in sync:              no ({} pending changes; see `masqd plan`)",
            st.pending_changes
        ));
    }
    for (f, fs) in [("ipv4", &st.ipv4), ("ipv6", &st.ipv6)] {
        let Some(fs) = fs else { continue };
        out.push(format!("{f} ({}):", fs.backend));
        for (name, n) in &fs.sets {
            out.push(status_set_line(name, *n));
        }
        out.push(format!(
            "  masqueraded connections   {}",
            fs.masqueraded_connections
        ));
        out.push(format!(
            "  kept connections          {}",
            fs.kept_connections
        ));
    }
    out.push(format!(
        "default rules left:   {}",
        st.default_rules_present
    ));
    if st.removed_rules.is_empty() {
        out.push("removed default rules (restored by teardown): none recorded".into());
    } else {
        out.push("removed default rules (restored by teardown):".into());
        out.extend(st.removed_rules.iter().map(|r| format!("  {r}")));
    }
    let mut s = out.join("\n");
    s.push('\n');
    s.push_str(&overridden_text(&st.overridden));
    s
}

/// The other NAT rules for the pod CIDRs, as `status` and `detect` print them.
pub fn overridden_text(list: &[Overridden]) -> String {
    if list.is_empty() {
        return "other NAT rules for the pod CIDRs: none\n".into();
    }
    let mut s = String::from("other NAT rules for the pod CIDRs:\n");
    for o in list {
        let handle = position(o.backend.name(), o.handle);
        s.push_str(&format!(
            "  {} {} {} {handle} ({}): {}\n",
            o.backend, o.table, o.chain, o.ip_family, o.rule
        ));
        s.push_str(&format!("      {}\n", o.reason));
    }
    s
}

/// Prints the changes of `p`: one summary per change, or (`full`) everything.
fn print_changes(p: &Plan, full: bool) {
    for l in change_lines(p, full) {
        println!("{l}");
    }
}

/// The lines `apply` (one summary per change) or `plan` (`full`: the nft text of every change,
/// and each legacy family's `iptables-legacy-restore --noflush --wait` payload) prints.
pub fn change_lines(p: &Plan, full: bool) -> Vec<String> {
    let mut out = Vec::new();
    for c in p.nft_changes() {
        out.push(if full { c.to_string() } else { c.summary() });
    }
    for (f, lp) in p.legacy_plans() {
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

/// The `status` line of one entry of a family's sets: an nftables set's intervals, or the rules
/// of the legacy chain (the entry [`LEGACY_CHAIN_ENTRY`]).
pub fn status_set_line(name: &str, n: usize) -> String {
    if name == LEGACY_CHAIN_ENTRY {
        format!("  chain {LEGACY_CHAIN:<19} {n} rule(s)")
    } else {
        format!("  set {name:<21} {n} interval(s)")
    }
}

/// Where a foreign rule of backend `backend` (its name, as status reports it) is: `rule N`
/// (its position in a legacy chain) or `handle N` (nft).
pub fn position(backend: &str, handle: u64) -> String {
    query::position(Backend::from_name(backend), handle)
}
