//! Export: the ruleset masqd installs for a policy, as an `nft -f` file.

use super::model::{CHAIN, CHAIN_PRIORITY_NFT, TABLE};
use super::plan::{desired_rules, desired_sets};

/// Renders the ruleset masqd installs for a policy (its nftables part: [`Policy::nft_part`],
/// the guard only for a family in legacy xtables), as an `nft -f` file. Loaded with `nft -f`
/// it replaces masqd's table atomically (one transaction: `table inet masqd` declares it when
/// missing, `delete table inet masqd` removes it, then it is created anew), so loading it twice
/// leaves one copy, and it loads over a table of an older layout too. A policy with nothing in
/// nftables exports as the deletion of masqd's table, which is what `masqd apply` does then.
///
/// [`Policy::nft_part`]: crate::policy::Policy::nft_part
pub fn export(p: &crate::policy::Policy) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(s, "#!/usr/sbin/nft -f");
    let _ = writeln!(
        s,
        "# masqd export: replaces table inet {TABLE} atomically; load with `nft -f FILE`"
    );
    let _ = writeln!(s, "table inet {TABLE}");
    let _ = writeln!(s, "delete table inet {TABLE}");
    if p.v4.is_none() && p.v6.is_none() {
        return s;
    }
    let _ = writeln!(s, "table inet {TABLE} {{");
    for (name, (f, ranges)) in desired_sets(p) {
        let _ = writeln!(s, "\tset {name} {{");
        let _ = writeln!(s, "\t\ttype {f}_addr");
        let _ = writeln!(s, "\t\tflags interval");
        if !ranges.is_empty() {
            let items: Vec<String> = ranges.iter().map(|r| r.display(f)).collect();
            let _ = writeln!(s, "\t\telements = {{ {} }}", items.join(",\n\t\t\t     "));
        }
        let _ = writeln!(s, "\t}}");
    }
    let _ = writeln!(s, "\tchain {CHAIN} {{");
    let _ = writeln!(
        s,
        "\t\ttype nat hook postrouting priority {}; policy accept;",
        CHAIN_PRIORITY_NFT
    );
    for r in desired_rules(p) {
        let _ = writeln!(s, "\t\t{}", r.nft());
    }
    let _ = writeln!(s, "\t}}");
    let _ = writeln!(s, "}}");
    s
}
