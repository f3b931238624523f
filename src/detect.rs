//! Backend detection per address family (design.md §4): facts, then a decision with a reason.
//!
//! Probing has no side effects: the loaded legacy tables are read from
//! `/proc/net/ip{,6}_tables_names`; a legacy binary runs only when that lists tables, and then
//! `iptables-legacy-save` without `-t` (which would create the table); nftables is read over
//! netlink. Every binary call is bounded, and an exit-0 output that reports an error is a
//! failure, not "zero rules".

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::backend::legacy;
use crate::backend::nft::{self, netlink::Socket};
use crate::config::BackendMode;
use crate::exec;
use crate::policy::Family;

/// Chains whose presence tells which backend the node's Kubernetes components use.
pub const HINT_CHAINS: [&str; 2] = ["KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY"];

/// A backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Native nftables.
    Nft,
    /// Legacy xtables.
    Legacy,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        })
    }
}

/// What was found for one family.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Facts {
    /// Binaries looked up on $PATH → their path (None when absent).
    pub binaries: BTreeMap<String, Option<String>>,
    /// Legacy tables loaded in this network namespace.
    pub legacy_tables: Vec<String>,
    /// Whether the legacy tables were read (a save ran).
    pub legacy_inspected: bool,
    /// Real legacy rules (`-A` lines) over all loaded tables.
    pub legacy_rules: usize,
    /// Hint chains in legacy xtables (`table/chain`).
    pub legacy_hint_chains: Vec<String>,
    /// Whether masqd's own chain exists in legacy xtables.
    pub legacy_masqd: bool,
    /// Why the legacy tables could not be inspected, if they could not.
    pub legacy_error: Option<String>,
    /// nftables rules of this family (ip/ip6 tables, and inet tables other than masqd's).
    pub nft_rules: usize,
    /// Hint chains in nftables (`family table/chain`).
    pub nft_hint_chains: Vec<String>,
    /// Whether masqd's own policy for this family exists in nftables (its masquerade rule;
    /// the guard that legacy mode keeps in nftables does not count).
    pub nft_masqd: bool,
    /// Whether the kernel refuses nf_tables requests (then legacy mode has no guard).
    pub nft_unavailable: bool,
    /// The node's own `iptables` / `ip6tables` on PATH, resolved through its symlinks.
    pub system_iptables: Option<String>,
    /// The variant it runs (`legacy` or `nft`), when it could be told.
    pub system_default: Option<Backend>,
}

impl Facts {
    fn has(&self, name: &str) -> bool {
        self.binaries.get(name).is_some_and(Option::is_some)
    }
}

/// The decision for one family.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// The backend.
    pub backend: Backend,
    /// Why, in words.
    pub reason: String,
}

fn binary_list(f: Family) -> [&'static str; 6] {
    match f {
        Family::V4 => [
            "iptables-legacy",
            "iptables-legacy-save",
            "iptables-legacy-restore",
            "iptables-nft",
            "iptables-nft-save",
            "iptables-nft-restore",
        ],
        Family::V6 => [
            "ip6tables-legacy",
            "ip6tables-legacy-save",
            "ip6tables-legacy-restore",
            "ip6tables-nft",
            "ip6tables-nft-save",
            "ip6tables-nft-restore",
        ],
    }
}

/// The legacy part of the facts, from the loaded-table list and (when tables are loaded) the
/// output of `iptables-legacy-save` without `-t`.
pub fn legacy_facts(f: Family, facts: &mut Facts) {
    for b in binary_list(f) {
        facts.binaries.insert(
            b.to_string(),
            exec::find_binary(b).map(|p| p.display().to_string()),
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
fn variant_of_name(file: &str) -> Option<Backend> {
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
fn variant_of_version(text: &str) -> Option<Backend> {
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

/// Gathers the facts of one family.
pub fn gather(f: Family, sock: &mut Socket) -> Result<Facts> {
    let mut facts = Facts::default();
    legacy_facts(f, &mut facts);
    system_default(f, &mut facts);
    match nft::genid(sock) {
        Ok(_) => {}
        Err(e)
            if matches!(
                e.errno(),
                Some(libc::EOPNOTSUPP) | Some(libc::EPROTONOSUPPORT)
            ) =>
        {
            facts.nft_unavailable = true;
            return Ok(facts);
        }
        Err(e) => return Err(e).context("asking nf_tables for the ruleset generation"),
    }
    let n = nft::facts(sock, f)?;
    facts.nft_rules = n.rules;
    facts.nft_hint_chains = n
        .chains
        .into_iter()
        .filter(|(_, _, c)| HINT_CHAINS.contains(&c.as_str()))
        .map(|(fam, t, c)| format!("{fam} {t}/{c}"))
        .collect();
    facts.nft_masqd = n.masqd;
    Ok(facts)
}

/// Decides the backend of both families (design.md §4), or says why one cannot be decided.
/// `facts[0]` is IPv4's, `facts[1]` IPv6's. A family without evidence of its own follows the
/// other family's evidence (kubernetes-sigs/iptables-wrappers decides once for both); with no
/// evidence anywhere, the variant the node's own `iptables` runs decides, nftables when there
/// is none.
pub fn decide_both(mode: BackendMode, facts: [&Facts; 2]) -> [Result<Decision, String>; 2] {
    let own = [
        evidence(mode, Family::V4, facts[0]),
        evidence(mode, Family::V6, facts[1]),
    ];
    let pick = |i: usize| -> Result<Decision, String> {
        let f = Family::ALL[i];
        let (other_f, other) = (Family::ALL[1 - i], &own[1 - i]);
        match &own[i] {
            Err(e) => Err(e.clone()),
            Ok(Some(d)) => Ok(d.clone()),
            Ok(None) => {
                let (b, why) = default_of(f, facts[i]);
                let own_default = usable(f, facts[i], b, why);
                match other {
                    Ok(Some(d)) => usable(
                        f,
                        facts[i],
                        d.backend,
                        format!("no evidence for {f}; follows {other_f}: {}", d.reason),
                    )
                    .or_else(|e| {
                        // It cannot follow (no legacy binaries for this family): its own default.
                        own_default.map(|mut o| {
                            o.reason = format!("{}; not following {other_f} ({e})", o.reason);
                            o
                        })
                    }),
                    _ => own_default,
                }
            }
        }
    };
    [pick(0), pick(1)]
}

/// Decides one family as if the other had no evidence (tests, and callers with one family).
pub fn decide(mode: BackendMode, f: Family, facts: &Facts) -> Result<Decision, String> {
    let none = Facts::default();
    let both = match f {
        Family::V4 => [facts, &none],
        Family::V6 => [&none, facts],
    };
    let [v4, v6] = decide_both(mode, both);
    match f {
        Family::V4 => v4,
        Family::V6 => v6,
    }
}

/// Step 6: the system default, with its reason.
fn default_of(f: Family, facts: &Facts) -> (Backend, String) {
    let none = if facts.legacy_tables.is_empty() {
        "no rules anywhere".to_string()
    } else {
        format!(
            "legacy tables loaded ({}) but hold no rules, nor does nftables",
            facts.legacy_tables.join(", ")
        )
    };
    let cmd = match f {
        Family::V4 => "iptables",
        Family::V6 => "ip6tables",
    };
    match (&facts.system_iptables, facts.system_default) {
        (Some(p), Some(b)) => (
            b,
            format!("{none}: the system default, {cmd} on PATH is the {b} variant ({p})"),
        ),
        (Some(p), None) => (
            Backend::Nft,
            format!("{none}: {cmd} on PATH ({p}) is neither variant; nftables"),
        ),
        (None, _) => (
            Backend::Nft,
            format!("{none}: no {cmd} on PATH; nftables, the default"),
        ),
    }
}

/// A decision for `backend`, or an error when it is legacy and the binaries are missing.
fn usable(f: Family, facts: &Facts, backend: Backend, reason: String) -> Result<Decision, String> {
    let (save, restore, _) = legacy::binary_names(f);
    if backend == Backend::Legacy && !(facts.has(save) && facts.has(restore)) {
        return Err(format!(
            "{f}: {reason}, but {restore} is not on PATH to write there; install the \
             iptables package or set backend.mode = \"nft\""
        ));
    }
    Ok(Decision { backend, reason })
}

/// Steps 1-4 for one family: Some(decision) when the configuration or the family's own
/// facts decide, None when there is no evidence.
fn evidence(mode: BackendMode, f: Family, facts: &Facts) -> Result<Option<Decision>, String> {
    let (save, restore, _) = legacy::binary_names(f);
    let some = |backend, reason: String| Ok(Some(Decision { backend, reason }));
    match mode {
        BackendMode::Nft => {
            return some(
                Backend::Nft,
                "backend.mode = \"nft\" in the configuration".into(),
            )
        }
        BackendMode::Legacy => {
            if !(facts.has(save) && facts.has(restore)) {
                return Err(format!(
                    "backend.mode = \"legacy\" but {} not found on PATH; install the iptables \
                     package (it provides the legacy binaries) or set backend.mode = \"nft\"",
                    [save, restore]
                        .iter()
                        .filter(|b| !facts.has(b))
                        .copied()
                        .collect::<Vec<_>>()
                        .join(" and ")
                ));
            }
            return some(
                Backend::Legacy,
                "backend.mode = \"legacy\" in the configuration".into(),
            );
        }
        BackendMode::Auto => {}
    }
    if let Some(e) = &facts.legacy_error {
        return Err(format!(
            "{f}: {e}; masqd cannot tell whether this node's rules live in legacy xtables: \
             install the iptables package (it provides {save}), or set backend.mode = \"nft\" \
             or \"legacy\" in the configuration"
        ));
    }
    let legacy = |reason: String| usable(f, facts, Backend::Legacy, reason).map(Some);
    if facts.nft_unavailable {
        return legacy("the kernel answers no nf_tables requests".into());
    }
    match (facts.nft_masqd, facts.legacy_masqd) {
        (true, false) => {
            return some(
                Backend::Nft,
                "masqd's own policy is in nftables (table inet masqd): staying there".into(),
            )
        }
        (false, true) => {
            return legacy(format!(
                "masqd's own policy is in legacy xtables (chain nat {}): staying there",
                legacy::CHAIN
            ))
        }
        _ => {}
    }
    match (
        facts.nft_hint_chains.is_empty(),
        facts.legacy_hint_chains.is_empty(),
    ) {
        (true, false) => {
            return legacy(format!(
                "hint chain {} exists in legacy xtables only",
                facts.legacy_hint_chains.join(", ")
            ))
        }
        (false, true) => {
            return some(
                Backend::Nft,
                format!(
                    "hint chain {} exists in nftables only",
                    facts.nft_hint_chains.join(", ")
                ),
            )
        }
        _ => {}
    }
    match (facts.nft_rules, facts.legacy_rules) {
        (0, 0) => Ok(None),
        (0, l) => legacy(format!("{l} legacy xtables rule(s) and none in nftables")),
        (n, 0) => some(
            Backend::Nft,
            format!("{n} nftables rule(s), no legacy rules"),
        ),
        (n, l) => some(
            Backend::Nft,
            format!("rules in both ({n} nftables, {l} legacy) and no hint chain: nftables"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(bins: bool) -> Facts {
        let mut f = Facts::default();
        for b in binary_list(Family::V4) {
            f.binaries
                .insert(b.into(), bins.then(|| format!("/usr/sbin/{b}")));
        }
        f
    }

    fn auto(f: &Facts) -> Backend {
        decide(BackendMode::Auto, Family::V4, f).unwrap().backend
    }

    #[test]
    fn nothing_anywhere_is_nft() {
        assert_eq!(auto(&facts(true)), Backend::Nft);
        assert_eq!(auto(&facts(false)), Backend::Nft);
    }

    #[test]
    fn nft_rules_only_is_nft() {
        let mut f = facts(true);
        f.nft_rules = 12;
        assert_eq!(auto(&f), Backend::Nft);
    }

    #[test]
    fn real_legacy_rules_only_is_legacy() {
        let mut f = facts(true);
        f.legacy_tables = vec!["nat".into()];
        apply_legacy_save("*nat\n:POSTROUTING ACCEPT [0:0]\n-A POSTROUTING -s 10.0.0.0/24 -j MASQUERADE\nCOMMIT\n", &mut f);
        assert_eq!(f.legacy_rules, 1);
        let d = decide(BackendMode::Auto, Family::V4, &f).unwrap();
        assert_eq!(d.backend, Backend::Legacy);
        assert!(d.reason.contains("1 legacy"), "{}", d.reason);
    }

    #[test]
    fn empty_legacy_tables_are_not_rules() {
        let mut f = facts(true);
        f.legacy_tables = vec!["nat".into(), "filter".into()];
        apply_legacy_save(
            "*nat\n:PREROUTING ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n",
            &mut f,
        );
        assert_eq!(f.legacy_rules, 0);
        assert_eq!(auto(&f), Backend::Nft);
    }

    #[test]
    fn hint_chain_wins_over_rule_counts() {
        let mut f = facts(true);
        f.legacy_tables = vec!["mangle".into()];
        apply_legacy_save("*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n", &mut f);
        f.nft_rules = 500;
        assert_eq!(auto(&f), Backend::Legacy);
        // The mirror case.
        let mut g = facts(true);
        g.legacy_rules = 40;
        g.legacy_tables = vec!["filter".into()];
        g.nft_hint_chains = vec!["ip mangle/KUBE-IPTABLES-HINT".into()];
        assert_eq!(auto(&g), Backend::Nft);
    }

    #[test]
    fn hint_name_must_be_the_whole_chain_name() {
        let mut f = facts(true);
        f.legacy_tables = vec!["mangle".into()];
        apply_legacy_save(
            "*mangle\n:KUBE-IPTABLES-HINT-OLD - [0:0]\n:X - [0:0]\n-A X -m comment --comment KUBE-IPTABLES-HINT -j RETURN\nCOMMIT\n",
            &mut f,
        );
        assert!(f.legacy_hint_chains.is_empty());
        f.nft_rules = 3;
        assert_eq!(auto(&f), Backend::Nft);
    }

    #[test]
    fn own_objects_keep_their_backend() {
        let mut f = facts(true);
        f.legacy_tables = vec!["nat".into()];
        apply_legacy_save(
            &format!("*nat\n:{} - [0:0]\nCOMMIT\n", legacy::CHAIN),
            &mut f,
        );
        f.nft_rules = 10;
        assert_eq!(auto(&f), Backend::Legacy);
        let mut g = facts(true);
        g.nft_masqd = true;
        g.legacy_rules = 10;
        assert_eq!(auto(&g), Backend::Nft);
    }

    #[test]
    fn uninspectable_legacy_is_an_error() {
        let mut f = facts(false);
        f.legacy_tables = vec!["nat".into()];
        f.legacy_error =
            Some("legacy tables are loaded (nat) but iptables-legacy-save is not on PATH".into());
        let e = decide(BackendMode::Auto, Family::V4, &f).unwrap_err();
        assert!(
            e.contains("install the iptables package") && e.contains("backend.mode"),
            "{e}"
        );
        // A forced nft mode does not need to look.
        assert_eq!(
            decide(BackendMode::Nft, Family::V4, &f).unwrap().backend,
            Backend::Nft
        );
    }

    #[test]
    fn families_decide_independently() {
        let mut v4 = facts(true);
        v4.legacy_rules = 3;
        let v6 = facts(true);
        assert_eq!(auto(&v4), Backend::Legacy);
        assert_eq!(
            decide(BackendMode::Auto, Family::V6, &v6).unwrap().backend,
            Backend::Nft
        );
    }

    #[test]
    fn no_evidence_anywhere_follows_the_system_iptables() {
        let mut v4 = facts(true);
        let mut v6 = facts(true);
        for b in binary_list(Family::V6) {
            v6.binaries.insert(b.into(), Some(format!("/usr/sbin/{b}")));
        }
        for (variant, want) in [
            ("/usr/sbin/xtables-legacy-multi", Backend::Legacy),
            ("/usr/sbin/xtables-nft-multi", Backend::Nft),
        ] {
            for f in [&mut v4, &mut v6] {
                f.system_iptables = Some(format!("/usr/sbin/iptables -> {variant}"));
                f.system_default = variant_of_name(variant.rsplit('/').next().unwrap());
            }
            let [a, b] = decide_both(BackendMode::Auto, [&v4, &v6]);
            let (a, b) = (a.unwrap(), b.unwrap());
            assert_eq!((a.backend, b.backend), (want, want), "{variant}");
            assert!(a.reason.contains("system default"), "{}", a.reason);
            assert!(a.reason.contains(variant), "{}", a.reason);
        }
        // No iptables at all: nftables.
        let none = facts(false);
        let [a, _] = decide_both(BackendMode::Auto, [&none, &none]);
        assert_eq!(a.unwrap().backend, Backend::Nft);
    }

    #[test]
    fn variant_names_and_versions() {
        assert_eq!(
            variant_of_name("xtables-legacy-multi"),
            Some(Backend::Legacy)
        );
        assert_eq!(variant_of_name("iptables-legacy"), Some(Backend::Legacy));
        assert_eq!(variant_of_name("xtables-nft-multi"), Some(Backend::Nft));
        assert_eq!(variant_of_name("iptables"), None);
        assert_eq!(
            variant_of_version("iptables v1.8.9 (legacy)\n"),
            Some(Backend::Legacy)
        );
        assert_eq!(
            variant_of_version("iptables v1.8.9 (nf_tables)\n"),
            Some(Backend::Nft)
        );
        assert_eq!(
            variant_of_version("iptables v1.4.21\n"),
            Some(Backend::Legacy)
        );
        assert_eq!(variant_of_version("iptables v1.8.9\n"), None);
        assert_eq!(variant_of_name("xtables-multi"), Some(Backend::Legacy));
    }

    #[test]
    fn a_family_without_evidence_follows_the_other() {
        let mut v4 = facts(true);
        v4.legacy_tables = vec!["nat".into()];
        v4.legacy_rules = 2;
        let mut v6 = facts(true);
        for b in binary_list(Family::V6) {
            v6.binaries.insert(b.into(), Some(format!("/usr/sbin/{b}")));
        }
        // The system default says nft, but IPv4's evidence decides for IPv6 too.
        v6.system_iptables = Some("/usr/sbin/ip6tables -> /usr/sbin/xtables-nft-multi".into());
        v6.system_default = Some(Backend::Nft);
        let [a, b] = decide_both(BackendMode::Auto, [&v4, &v6]);
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!((a.backend, b.backend), (Backend::Legacy, Backend::Legacy));
        assert!(b.reason.contains("follows ipv4"), "{}", b.reason);
        // Evidence of its own wins over the other family's.
        v6.nft_rules = 3;
        let [_, b] = decide_both(BackendMode::Auto, [&v4, &v6]);
        assert_eq!(b.unwrap().backend, Backend::Nft);
        // It cannot follow into legacy without the binaries: its own default, saying why.
        let mut v6 = facts(false);
        v6.system_default = None;
        let [_, b] = decide_both(BackendMode::Auto, [&v4, &v6]);
        let b = b.unwrap();
        assert_eq!(b.backend, Backend::Nft);
        assert!(b.reason.contains("not following ipv4"), "{}", b.reason);
    }

    #[test]
    fn the_guard_is_not_masqd_policy() {
        // Legacy mode keeps the guard in nftables: nft_masqd stays false (the masquerade rule
        // is what counts), so the legacy chain keeps the family in legacy.
        let mut f = facts(true);
        f.legacy_masqd = true;
        f.nft_masqd = false;
        f.nft_rules = 0;
        assert_eq!(auto(&f), Backend::Legacy);
    }

    #[test]
    fn forced_modes() {
        assert_eq!(
            decide(BackendMode::Legacy, Family::V4, &facts(true))
                .unwrap()
                .backend,
            Backend::Legacy
        );
        let e = decide(BackendMode::Legacy, Family::V4, &facts(false)).unwrap_err();
        assert!(
            e.contains("iptables-legacy-save and iptables-legacy-restore not found"),
            "{e}"
        );
        assert_eq!(
            decide(BackendMode::Nft, Family::V4, &facts(false))
                .unwrap()
                .backend,
            Backend::Nft
        );
    }
}
