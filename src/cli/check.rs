//! `masqd check` (validate the configuration, print the policy, optionally ask the daemon to
//! reload) and `masqd explain` (one connection's verdict): what they print.

use anyhow::Result;

use super::exit::OK;
use crate::engine::{self, Paths};

/// `masqd check [--reload PID]`: the summary (one line for a reload, for the journal), then the
/// reload request.
pub fn check(source: &crate::config::Source, reload: Option<i32>) -> Result<u8> {
    let cfg = source.load()?;
    let summary = crate::check::summarize(&cfg);
    match reload {
        None => print!("{summary}"),
        Some(pid) => {
            // A reload's line in the journal; `masqd check` shows the whole screen.
            println!("{}", summary.one_line());
            crate::check::request_reload(pid)?;
            println!("daemon (pid {pid}) is reloading");
        }
    }
    Ok(OK)
}

/// The words of `masqd explain`.
#[derive(Debug, Clone, Copy)]
pub struct ExplainArgs<'a> {
    /// SRC.
    pub src: &'a str,
    /// DST.
    pub dst: &'a str,
    /// `--oif`.
    pub oif: Option<&'a str>,
    /// `--mark`.
    pub mark: Option<&'a str>,
    /// `--json`.
    pub json: bool,
}

/// `masqd explain`: the query is checked before the configuration is read (bad input exits 1
/// without root), then the kernel is asked.
pub fn explain(paths: &Paths, a: ExplainArgs<'_>) -> Result<u8> {
    let q =
        crate::explain::Query::parse(a.src, a.dst, a.oif, a.mark).map_err(anyhow::Error::msg)?;
    let (cfg, policy) = engine::load(&paths.source)?;
    let e = crate::explain::explain(&cfg, &policy, &q)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&e)?);
    } else {
        print!("{}", crate::explain::render(&e));
    }
    Ok(OK)
}
