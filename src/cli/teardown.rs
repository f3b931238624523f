//! `masqd teardown`: what it prints about the rules it put back and the objects it removed.

use anyhow::Result;

use super::exit::OK;
use crate::engine::{self, Paths, TeardownReport};

/// `masqd teardown`: names every rule it put back and every object it removed; warns when the
/// state directory holds no record.
pub fn teardown(paths: &Paths) -> Result<u8> {
    let r = engine::teardown(paths)?;
    if r.no_record {
        eprintln!(
            "masqd: warning: the state directory {} holds no record of removed default rules: \
             nothing to restore (if masqd removed one and its record is lost, put it back by hand)",
            paths.state_dir.display()
        );
    }
    print!("{}", report_text(&r));
    Ok(OK)
}

/// The lines on stdout of a teardown.
pub fn report_text(r: &TeardownReport) -> String {
    let mut out = Vec::new();
    out.extend(r.restored.iter().map(|x| format!("restored: {x}")));
    out.extend(
        r.already_present
            .iter()
            .map(|x| format!("already present (not added again): {x}")),
    );
    out.extend(r.removed.iter().map(|x| format!("removed: {x}")));
    if r.removed.is_empty() {
        out.push("removed: nothing (no masqd rules were installed)".into());
    }
    out.push(format!(
        "teardown: restored {} default rule(s), {} already present; removed {} object(s) of \
         masqd's",
        r.restored.len(),
        r.already_present.len(),
        r.removed.len()
    ));
    let mut s = out.join("\n");
    s.push('\n');
    s
}
