//! `masqd export --format iptables` for a legacy family: the `iptables-legacy-restore
//! --noflush` text that installs masqd's chain and its jump against the nat table as it is.

use super::observe::LegacyObserved;
use super::plan::{desired_chain, jump_ok, jumps};
use super::restore::Payload;
use crate::policy::{Family, FamilyPolicy};

/// The `iptables-legacy-restore --noflush` payload that installs the legacy policy of one
/// family (`masqd export --format iptables`): chain nat MASQD-POSTROUTING declared (with
/// `--noflush` that creates or flushes it) and refilled, and the jump at the head of
/// POSTROUTING. The jump is written against `o`, the nat table as it is now: inserted only when
/// it is not already there once at the head (extra or misplaced jumps deleted first), so that
/// `masqd export --format iptables | iptables-legacy-restore --noflush` run again leaves one
/// jump. Broad default rules are left alone (removing one is `masqd apply`'s, which records it
/// for teardown). `notes` become comment lines of the header. Equals
/// `iptables-legacy-restore --noflush --wait` of the text.
pub fn export(
    f: Family,
    fp: &FamilyPolicy,
    bridges: &[String],
    random_fully: bool,
    o: &LegacyObserved,
    notes: &[String],
) -> String {
    let restore = f.ipt_binaries().1;
    let mut comments = vec![
        format!(
            "masqd export: the {f} policy in legacy xtables; load with \
             `{restore} --noflush --wait FILE`"
        ),
        "(export again before loading again: the jump is written against the table as it is)"
            .to_string(),
    ];
    comments.extend(notes.iter().cloned());
    let mut p = Payload::with_comments(&comments);
    p.declare_chain();
    if !jump_ok(o) {
        p.delete_jumps(jumps(o));
        p.insert_jump();
    }
    p.fill_chain(&desired_chain(fp, bridges, random_fully));
    p.commit()
}
