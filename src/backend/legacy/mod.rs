//! The legacy xtables backend, through the iptables-legacy binaries (design.md §3.2):
//!
//! ```text
//! *nat
//! :MASQD-POSTROUTING - [0:0]
//! -I POSTROUTING 1 -m comment --comment masqd -j MASQD-POSTROUTING
//! -A MASQD-POSTROUTING -o docker0 -j RETURN
//! -A MASQD-POSTROUTING -s <pod> -d <exception> -j RETURN     (one per exception CIDR)
//! -A MASQD-POSTROUTING -s <pod> -j MASQUERADE
//! COMMIT
//! ```
//!
//! Observed by parsing `iptables-legacy-save -t nat` (only when the nat table is loaded, so
//! observing never creates it), applied atomically with `iptables-legacy-restore --noflush
//! --wait`. Binaries get an argument vector, never a shell, and a timeout.
//!
//! One file per concern: [`save`] (the save parser and iptables' rule notation),
//! [`observe`](mod@observe) (what the nat table holds), [`plan`](mod@plan) (the pure planner),
//! [`restore`] (the restore payloads and applying them), [`export`](mod@export) (`masqd export
//! --format iptables`), [`runner`] (the seam to the binaries, with a fake for tests).
//! Everything is re-exported here under its old path.

pub mod driver;
pub mod export;
pub mod info;
pub mod observe;
pub mod plan;
pub mod restore;
pub mod runner;
pub mod save;

pub use export::export;
pub use observe::{
    nat_rules, observe, observe_with, tables_loaded, tables_names_path, LegacyObserved,
};
pub use plan::{desired_chain, match_default, plan, LegacyPlan};
pub use restore::{
    apply, apply_with, record_of, replayable, restore_payload, teardown_payload, Payload,
};
pub use runner::{binaries, binary_names, Binaries, FakeRunner, Runner, SystemRunner};
pub use save::{
    parse_save, parse_saved_net, quote_rule, restore_word, same_rules, split_saved, SavedTable,
    SavedWord,
};

/// masqd's chain in the nat table.
pub const CHAIN: &str = "MASQD-POSTROUTING";
/// The jump from POSTROUTING, as iptables-save prints it.
pub const JUMP: &str = "-m comment --comment masqd -j MASQD-POSTROUTING";

#[cfg(test)]
mod captured;
#[cfg(test)]
mod tests;
