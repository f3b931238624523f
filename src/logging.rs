//! Logging: where masqd's `tracing` events go and how they look.
//!
//! Under systemd (`$JOURNAL_STREAM` names the device and inode of our stderr) events go to the
//! journal natively, with their real priority (error → err, warn → warning, info → info,
//! debug/trace → debug) and their fields as journal fields (`SET=nomasq4`, `CODE_FILE=…`), and
//! without a timestamp of masqd's own: the journal has one. Elsewhere they are text lines on
//! stderr (with a timestamp), or JSON objects, one a line.

use std::fmt;
use std::io::IsTerminal;
use std::sync::OnceLock;

use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// The levels `--log-level` accepts, least to most verbose.
pub const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// How log lines are written (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// The journal when stderr is systemd's journal stream, text otherwise.
    Auto,
    /// Text lines on stderr, with a timestamp.
    Text,
    /// One JSON object a line on stderr.
    Json,
    /// The journal (native protocol); `<N>`-prefixed lines on stderr when its socket is
    /// unreachable.
    Journal,
}

/// The format in force once [`init`] ran (`Auto` resolved).
static ACTIVE: OnceLock<LogFormat> = OnceLock::new();

/// Whether stderr is the stream systemd connected to the journal: `$JOURNAL_STREAM` is
/// `DEVICE:INODE` of that stream (systemd.exec(5)), compared with fstat(2) of fd 2 — a child
/// whose stderr was redirected inherits the variable but not the stream.
pub fn stderr_is_journal() -> bool {
    let v = std::env::var_os("JOURNAL_STREAM");
    stream_is(v.as_ref().and_then(|v| v.to_str()), std::io::stderr())
}

/// Whether `fd` is the stream a `$JOURNAL_STREAM` value (`DEVICE:INODE`) names.
fn stream_is(var: Option<&str>, fd: impl std::os::fd::AsFd) -> bool {
    let Some((dev, ino)) = var.and_then(|s| s.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    match nix::sys::stat::fstat(fd) {
        Ok(st) => st.st_dev == dev && st.st_ino == ino,
        Err(_) => false,
    }
}

/// The effective level: `base` (from `--log-level` or the command's default) moved one step
/// up per `-v` and one step down per `-q`, within off…trace.
pub fn effective_level(base: &str, verbose: u8, quiet: u8) -> &'static str {
    let i = LEVELS.iter().position(|l| *l == base).unwrap_or(2) as i32;
    let j = (i + verbose as i32 - quiet as i32).clamp(0, LEVELS.len() as i32 - 1);
    LEVELS[j as usize]
}

/// The filter of a level: masqd's own events at `level`, other crates' at most at warn.
fn filter_of(level: &str) -> EnvFilter {
    let i = LEVELS.iter().position(|l| *l == level).unwrap_or(2);
    let spec = if i > 2 {
        format!("warn,masqd={level}")
    } else {
        level.to_string()
    };
    EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new("warn"))
}

/// Sets up logging once, for the whole process. `RUST_LOG`, when set and valid, overrides
/// `level` (an invalid one is reported and ignored).
pub fn init(format: LogFormat, level: &str) {
    let mut bad_env = None;
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.is_empty() => EnvFilter::try_new(&spec).unwrap_or_else(|e| {
            bad_env = Some(format!("RUST_LOG={spec:?} ignored: {e}"));
            filter_of(level)
        }),
        _ => filter_of(level),
    };
    let format = match format {
        LogFormat::Auto if stderr_is_journal() => LogFormat::Journal,
        LogFormat::Auto => LogFormat::Text,
        f => f,
    };
    let registry = tracing_subscriber::registry().with(filter);
    let mut fallback = None;
    let active = match format {
        LogFormat::Journal => match journald_layer() {
            Ok(layer) => {
                registry.with(layer).init();
                LogFormat::Journal
            }
            Err(e) => {
                fallback = Some(format!("the journal's socket is unreachable ({e})"));
                let layer = tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(false)
                    .event_format(PrefixedLine);
                registry.with(layer).init();
                LogFormat::Journal
            }
        },
        LogFormat::Json => {
            let layer = tracing_subscriber::fmt::layer()
                .json()
                .with_writer(std::io::stderr)
                .with_current_span(false)
                .with_span_list(false);
            registry.with(layer).init();
            LogFormat::Json
        }
        LogFormat::Text | LogFormat::Auto => {
            let layer = tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .with_target(false);
            registry.with(layer).init();
            LogFormat::Text
        }
    };
    let _ = ACTIVE.set(active);
    if let Some(why) = fallback {
        tracing::warn!("{why}: logging to stderr with <N> priority prefixes instead");
    }
    if let Some(why) = bad_env {
        tracing::warn!("{why}");
    }
}

/// The native journal layer, priorities as syslog(3) names them.
fn journald_layer() -> std::io::Result<tracing_journald::Layer> {
    use tracing_journald::{Priority, PriorityMappings};
    Ok(tracing_journald::layer()?
        .with_field_prefix(None)
        .with_syslog_identifier("masqd".to_string())
        .with_priority_mappings(PriorityMappings {
            error: Priority::Error,
            warn: Priority::Warning,
            info: Priority::Informational,
            debug: Priority::Debug,
            trace: Priority::Debug,
        }))
}

/// sd-daemon(3) priority prefix of a level (`<3>` for errors).
fn priority(level: &tracing::Level) -> u8 {
    match *level {
        tracing::Level::ERROR => 3,
        tracing::Level::WARN => 4,
        tracing::Level::INFO => 6,
        _ => 7,
    }
}

/// A line for systemd's stream parser: `<N>message key=value`, no timestamp, no level word.
struct PrefixedLine;

impl<S, N> FormatEvent<S, N> for PrefixedLine
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        write!(writer, "<{}>", priority(event.metadata().level()))?;
        ctx.format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// Reports the error that ends a command: at priority err in the journal (through `tracing`)
/// when logging goes there, else as `masqd: error: …` on stderr (also when logging is off:
/// the reason a command failed is never hidden).
pub fn report_error(msg: &dyn fmt::Display) {
    // Journal and JSON logs stay one format: the error goes through tracing there.
    if matches!(
        ACTIVE.get(),
        Some(LogFormat::Journal) | Some(LogFormat::Json)
    ) && tracing::enabled!(target: "masqd", tracing::Level::ERROR)
    {
        tracing::error!("{msg}");
    } else {
        eprintln!("masqd: error: {msg}");
    }
}

/// Up to `bound` items joined with ", ", then "and N more" for the rest: a debug line that
/// says what changed without listing a 60,000-entry set.
pub fn bounded_list<T: fmt::Display>(items: &[T], bound: usize) -> String {
    let mut s: Vec<String> = items.iter().take(bound).map(|i| i.to_string()).collect();
    if items.len() > bound {
        s.push(format!("and {} more", items.len() - bound));
    }
    if s.is_empty() {
        return "none".to_string();
    }
    s.join(", ")
}

/// How many items [`bounded_list`] shows in a debug line.
pub const LIST_BOUND: usize = 8;

/// Items of `new` not in `old` and of `old` not in `new` (both in their order). Hash sets:
/// linear in the list sizes (a 60,000-entry list changes by one line).
pub fn diff<'a, T: Eq + std::hash::Hash>(old: &'a [T], new: &'a [T]) -> (Vec<&'a T>, Vec<&'a T>) {
    use std::collections::HashSet;
    let o: HashSet<&T> = old.iter().collect();
    let n: HashSet<&T> = new.iter().collect();
    let added = new.iter().filter(|x| !o.contains(x)).collect();
    let removed = old.iter().filter(|x| !n.contains(x)).collect();
    (added, removed)
}

/// Debug lines for a configuration change: per family, the pod CIDRs and exception CIDRs
/// added and removed (at most [`LIST_BOUND`] of each shown, then a count).
pub fn log_config_diff(old: &crate::config::Config, new: &crate::config::Config) {
    use crate::policy::Family;
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    for f in Family::ALL {
        let of = |v: &[ipnet::IpNet]| -> Vec<ipnet::IpNet> {
            v.iter().filter(|n| Family::of(n) == f).copied().collect()
        };
        let exc = |c: &crate::config::Config| {
            of(&[c.cluster_cidrs.as_slice(), c.nonmasquerade_cidrs.as_slice()].concat())
        };
        for (what, o, n) in [
            ("pod CIDRs", of(&old.pod_cidrs), of(&new.pod_cidrs)),
            ("exception CIDRs", exc(old), exc(new)),
        ] {
            let (added, removed) = diff(&o, &n);
            if added.is_empty() && removed.is_empty() {
                continue;
            }
            tracing::debug!(
                family = %f,
                added = added.len(),
                removed = removed.len(),
                "configuration: {f} {what}: added {}; removed {}",
                bounded_list(&added, LIST_BOUND),
                bounded_list(&removed, LIST_BOUND)
            );
        }
    }
}

/// Debug lines for an applied plan: each element change with its values (at most
/// [`LIST_BOUND`], then a count) — the info line only counts them.
pub fn log_plan_details(plan: &crate::engine::Plan) {
    use crate::backend::Change;
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    for c in plan.nft_changes() {
        let (verb, set, family, ranges) = match c {
            Change::AddElements {
                set,
                family,
                ranges,
            } => ("added to", set, family, ranges),
            Change::DeleteElements {
                set,
                family,
                ranges,
            } => ("removed from", set, family, ranges),
            other => {
                tracing::debug!("applied: {other}");
                continue;
            }
        };
        let shown: Vec<String> = ranges.iter().map(|r| r.display(*family)).collect();
        tracing::debug!(
            set = %set,
            count = ranges.len(),
            "{} interval(s) {verb} set {set}: {}",
            ranges.len(),
            bounded_list(&shown, LIST_BOUND)
        );
    }
    for (f, lp) in plan.legacy_plans() {
        for s in &lp.summary {
            tracing::debug!(family = %f, "applied in legacy xtables: {s}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_move_with_v_and_q() {
        assert_eq!(effective_level("warn", 0, 0), "warn");
        assert_eq!(effective_level("warn", 1, 0), "info");
        assert_eq!(effective_level("warn", 2, 0), "debug");
        assert_eq!(effective_level("info", 9, 0), "trace");
        assert_eq!(effective_level("info", 0, 1), "warn");
        assert_eq!(effective_level("warn", 0, 9), "off");
        assert_eq!(effective_level("info", 1, 1), "info");
    }

    #[test]
    fn bounded_lists_count_the_rest() {
        let v: Vec<u32> = (1..=10).collect();
        assert_eq!(bounded_list(&v, 3), "1, 2, 3, and 7 more");
        assert_eq!(bounded_list(&v[..2], 3), "1, 2");
        assert_eq!(bounded_list::<u32>(&[], 3), "none");
    }

    #[test]
    fn diff_says_what_was_added_and_removed() {
        let (a, r) = diff(&[1, 2, 3], &[2, 3, 4]);
        assert_eq!(a, vec![&4]);
        assert_eq!(r, vec![&1]);
    }

    #[test]
    fn journal_stream_must_match_the_fd() {
        use std::os::unix::fs::MetadataExt;
        let f = std::fs::File::open("/proc/self/exe").unwrap();
        let m = f.metadata().unwrap();
        let same = format!("{}:{}", m.dev(), m.ino());
        assert!(stream_is(Some(&same), &f));
        let other = format!("{}:{}", m.dev(), m.ino() + 1);
        assert!(!stream_is(Some(&other), &f));
        assert!(!stream_is(Some("garbage"), &f));
        assert!(!stream_is(None, &f));
    }
}
