//! The text of an explanation, for a terminal.

use super::walk::chain_backend;
use super::Explanation;
use crate::backend::query::position;
use crate::backend::Backend;

/// The explanation as text, for a terminal.
pub fn render(e: &Explanation) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} → {} ({}, backend {})",
        e.src, e.dst, e.ip_family, e.backend
    );
    let _ = writeln!(s, "verdict: {}", e.verdict);
    let _ = writeln!(s, "  why:    {}", e.reason);
    if let (Some(rule), Some(chain), Some(h)) = (&e.rule, &e.chain, e.handle) {
        let h = position(chain_backend(chain), h);
        let _ = writeln!(s, "  rule:   {chain} {h}: {rule}");
    }
    if let Some(r) = &e.range {
        let _ = writeln!(s, "  range:  {r}");
    }
    for (i, src) in e.sources.iter().enumerate() {
        let label = if i == 0 { "source:" } else { "also:  " };
        let _ = writeln!(s, "  {label} {} ({} {})", src.source, src.key, src.cidr);
    }
    for n in &e.notes {
        let _ = writeln!(s, "  note:   {n}");
    }
    if e.disagreements.is_empty() {
        let _ = writeln!(s, "configuration and kernel agree");
    } else {
        let _ = writeln!(
            s,
            "configuration and kernel DISAGREE (the verdict uses the kernel):"
        );
        for d in &e.disagreements {
            let _ = writeln!(s, "  {d}");
        }
    }
    if e.other_rules.is_empty() {
        let _ = writeln!(s, "other NAT rules that would match: none");
    } else {
        let _ = writeln!(s, "other NAT rules that would match:");
    }
    for o in &e.other_rules {
        let h = position(Backend::from_name(&o.backend), o.handle);
        let _ = writeln!(
            s,
            "  {} {} {} {h} (priority {}, source matches: {}): {}",
            o.backend, o.table, o.chain, o.priority, o.matches, o.rule
        );
        let _ = writeln!(s, "      {}", o.reason);
    }
    s
}
