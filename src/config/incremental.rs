//! Incremental reload of the CIDR list file: what the daemon keeps of the last good load
//! ([`ListBase`]) to apply a line diff of the list file to the configuration and its policy,
//! re-aggregating only around the changed entries ([`crate::policy::Exceptions`]).
//!
//! Any doubt answers "read everything again" (None): another file the configuration was read
//! from reads differently now (or not at all), the list cannot be read, the diff is large, the
//! exceptions would cover a whole family (the full read's error names every entry). So the
//! result is always that of a full [`Source::load`](super::Source::load). A bad line gives the
//! very error a full read gives: every unchanged line was good in the last good load, so the
//! first bad line of the file is among the changed ones.
//!
//! The texts the base is built from are the very texts the full load parsed: [`Loaded::load`]
//! records every [`read_bounded`] of that load ([`record`]), not a second read that could see
//! a newer file.

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use ipnet::IpNet;

use super::{list, read_bounded, toml, Config, ConfigError, Named, ReadError, Source};
use crate::policy::{Exceptions, Family, Policy, Range};

/// Most list entries (removed plus added) an edit applies incrementally; more: a full read.
pub const MAX_EDIT_ENTRIES: usize = 64;

/// Most changed lines (old plus new) of an edit applied incrementally.
const MAX_EDIT_LINES: usize = 4096;

/// What read a file gave.
type Read = (PathBuf, Result<String, ReadError>);

thread_local! {
    /// The reads of the load [`Loaded::load`] runs on this thread, while it runs.
    static READS: RefCell<Option<Vec<Read>>> = const { RefCell::new(None) };
}

/// Notes a read of [`read_bounded`] while [`Loaded::load`] records.
pub(super) fn record(path: &Path, r: &Result<String, ReadError>) {
    READS.with(|reads| {
        if let Some(v) = reads.borrow_mut().as_mut() {
            v.push((path.to_path_buf(), r.clone()));
        }
    });
}

/// A configuration read in full, with what an incremental edit of its list file needs.
#[derive(Debug)]
pub struct Loaded {
    /// The configuration (with its origins).
    pub cfg: Config,
    /// The base for edits of the list file (none without a list file, or in doubt).
    pub base: Option<ListBase>,
}

impl std::ops::Deref for Loaded {
    type Target = Config;
    fn deref(&self) -> &Config {
        &self.cfg
    }
}

impl Loaded {
    /// [`Source::load`], recording the texts it read for [`ListBase`].
    pub fn load(source: &Source) -> Result<Loaded, ConfigError> {
        READS.with(|r| *r.borrow_mut() = Some(Vec::new()));
        let cfg = source.load();
        let reads = READS.with(|r| r.borrow_mut().take()).unwrap_or_default();
        let cfg = cfg?;
        let base = ListBase::new(source, &cfg, reads);
        Ok(Loaded { cfg, base })
    }
}

/// The last good load as far as the list file goes: its text, the line of each entry, where
/// the entries stand in [`Config::nonmasquerade_cidrs`], every exception per family, and what
/// reading each other file gave.
#[derive(Debug)]
pub struct ListBase {
    list: PathBuf,
    /// The key that named the list and where (for errors, as a full read gives them).
    named: Named,
    /// Every other file the load read, with what reading it gave.
    others: Vec<Read>,
    /// The list's text, ending in a newline ([`ended`]).
    text: String,
    /// The 0-based line of each entry of the list, in order.
    lines: Vec<u32>,
    /// Where the list's entries start in `nonmasquerade_cidrs`.
    offset: usize,
    /// Every exception (cluster and non-masquerade), IPv4 then IPv6.
    fams: [Exceptions; 2],
}

/// A change of the list file read and checked, not applied yet.
#[derive(Debug)]
pub struct ListEdit {
    /// The list's new text ([`ended`]).
    text: String,
    /// The first line that changed (0-based).
    line: usize,
    /// The entries replaced (indices into the list's entries).
    old: std::ops::Range<usize>,
    /// The entries in their place, with their lines.
    new: Vec<(IpNet, u32)>,
    /// How many lines the file grew by (negative: shrank).
    delta: i64,
}

/// `text` with a final newline (the same lines: a last line parses alike with or without
/// one), so that adding one, or a line after an unterminated last one, is a one-line change.
fn ended(mut text: String) -> String {
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text
}

/// How many bytes `a` and `b` have in common at one end: `at(t, i, len)` is the `len` bytes
/// of `t` at distance `i` from that end. Compared a block at a time (a `memcmp`: a list of a
/// million lines is 15 MB), then byte by byte.
fn common(a: &[u8], b: &[u8], at: impl Fn(&[u8], usize, usize) -> &[u8]) -> usize {
    const BLOCK: usize = 512;
    let len = a.len().min(b.len());
    let mut i = 0;
    while i + BLOCK <= len && at(a, i, BLOCK) == at(b, i, BLOCK) {
        i += BLOCK;
    }
    while i < len && at(a, i, 1) == at(b, i, 1) {
        i += 1;
    }
    i
}

/// The lines that differ between `old` and `new`: the first one's index and the text of the
/// changed whole lines on each side (the common prefix and suffix are whole lines).
fn line_diff<'a>(old: &'a str, new: &'a str) -> (usize, &'a str, &'a str) {
    let (o, n) = (old.as_bytes(), new.as_bytes());
    let p = common(o, n, |t, i, len| &t[i..i + len]);
    let ps = o[..p]
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |i| i + 1);
    let (ot, nt) = (&o[ps..], &n[ps..]);
    let s = common(ot, nt, |t, i, len| &t[t.len() - i - len..t.len() - i]);
    let (mut oe, mut ne) = (o.len() - s, n.len() - s);
    let at_start = |t: &[u8], e: usize| e == ps || t[e - 1] == b'\n';
    if !at_start(o, oe) || !at_start(n, ne) {
        match o[oe..].iter().position(|b| *b == b'\n') {
            Some(i) => {
                oe += i + 1;
                ne += i + 1;
            }
            None => {
                oe = o.len();
                ne = n.len();
            }
        }
    }
    let line = o[..ps].iter().filter(|b| **b == b'\n').count();
    (line, &old[ps..oe], &new[ps..ne])
}

impl ListBase {
    /// The base of a full load of `source` that gave `cfg` after the reads `reads`; None
    /// without a list file or when the reads do not make one (a file read twice, the entries
    /// not where they are expected).
    fn new(source: &Source, cfg: &Config, reads: Vec<Read>) -> Option<ListBase> {
        let Source::Toml { path, .. } = source else {
            return None;
        };
        let list = cfg.nonmasquerade_cidrs_file.clone()?;
        let read_of = |p: &Path| reads.iter().filter(|(q, _)| q == p).collect::<Vec<_>>();
        let ([(_, Ok(config_text))], [(_, Ok(text))]) = (&read_of(path)[..], &read_of(&list)[..])
        else {
            return None;
        };
        let named = toml::parse(path, config_text)
            .ok()?
            .cidr_list_file()
            .ok()??;
        if named.path != list {
            return None;
        }
        let mut others: Vec<Read> = Vec::new();
        for (p, r) in reads.iter().filter(|(p, _)| *p != list) {
            match others.iter().find(|(q, _)| q == p) {
                Some((_, was)) if was != r => return None,
                Some(_) => {}
                None => others.push((p.clone(), r.clone())),
            }
        }
        let origins = &cfg.exception_origins;
        let mut lines = Vec::new();
        let mut nets = Vec::new();
        for o in origins.iter().filter(|o| o.key == toml::LIST_KEY) {
            lines.push(u32::try_from(o.line?.checked_sub(1)?).ok()?);
            nets.push(o.net);
        }
        let offset = origins
            .iter()
            .filter(|o| o.key == "masquerade.nonmasquerade_cidrs")
            .count();
        if cfg.nonmasquerade_cidrs.get(offset..offset + nets.len()) != Some(&nets[..]) {
            return None;
        }
        let all = || cfg.cluster_cidrs.iter().chain(&cfg.nonmasquerade_cidrs);
        Some(ListBase {
            fams: [
                Exceptions::new(all(), Family::V4),
                Exceptions::new(all(), Family::V6),
            ],
            list,
            named,
            others,
            text: ended(text.clone()),
            lines,
            offset,
        })
    }

    /// The list file's change since the base, read now: None when a full read is needed
    /// (see the module doc), else the edit or the error of its first bad line.
    pub fn edit(&self) -> Option<Result<ListEdit, ConfigError>> {
        for (p, was) in &self.others {
            if read_bounded(p) != *was {
                return None;
            }
        }
        let text = ended(read_bounded(&self.list).ok()?);
        let (line, old_mid, new_mid) = line_diff(&self.text, &text);
        // A byte-order mark is dropped at the start of the file only.
        if new_mid.starts_with('\u{feff}') && line > 0 {
            return None;
        }
        let old_lines = old_mid.lines().count();
        let new_lines = new_mid.lines().count();
        if old_lines + new_lines > MAX_EDIT_LINES {
            return None;
        }
        let mut new = Vec::new();
        let parsed = list::for_each_cidr_line(&self.list, new_mid, |net, _, l| {
            new.push((net, (line + l - 1) as u32));
        });
        if let Err(mut e) = parsed {
            e.line = e.line.map(|l| l + line);
            return Some(Err(self.named.blame(e)));
        }
        let first = self.lines.partition_point(|l| (*l as usize) < line);
        let end = self
            .lines
            .partition_point(|l| (*l as usize) < line + old_lines);
        if end - first + new.len() > MAX_EDIT_ENTRIES {
            return None;
        }
        Some(Ok(ListEdit {
            text,
            line,
            old: first..end,
            new,
            delta: new_lines as i64 - old_lines as i64,
        }))
    }

    /// Applies `e` to the base, to `cfg` (the configuration the base is of, lean or not) and to
    /// its `policy`: whether the configuration changed. None when it cannot be applied (the
    /// exceptions would cover a family, or `cfg` is not the base's): then the base is spent
    /// and a full read is needed; `cfg` and `policy` are left alone.
    pub fn apply(&mut self, e: ListEdit, cfg: &mut Config, policy: &mut Policy) -> Option<bool> {
        let at = self.offset + e.old.start..self.offset + e.old.end;
        let gone: Vec<IpNet> = cfg.nonmasquerade_cidrs.get(at.clone())?.to_vec();
        let new: Vec<IpNet> = e.new.iter().map(|(n, _)| *n).collect();
        let changed = gone != new;
        if changed {
            let mut windows = Vec::new();
            for (i, f) in Family::ALL.into_iter().enumerate() {
                let of = |v: &[IpNet]| -> Vec<Range> {
                    v.iter()
                        .filter(|n| Family::of(n) == f)
                        .map(Range::of_net)
                        .collect()
                };
                windows.push(self.fams[i].edit(&of(&gone), &of(&new))?);
                let whole = Range {
                    start: 0,
                    end: f.max(),
                };
                if self.fams[i].merged() == [whole] {
                    return None;
                }
            }
            for (f, w) in Family::ALL.into_iter().zip(&windows) {
                if let Some(fp) = policy_family(policy, f) {
                    fp.apply_windows(f, w);
                }
            }
            cfg.nonmasquerade_cidrs.splice(at, new);
        }
        let n = e.new.len();
        self.lines
            .splice(e.old.clone(), e.new.into_iter().map(|(_, l)| l));
        if e.delta != 0 {
            for l in &mut self.lines[e.old.start + n..] {
                *l = (*l as i64 + e.delta) as u32;
            }
        }
        self.text = e.text;
        tracing::debug!(
            "{}: {} entr(ies) from line {} replaced by {} (incremental)",
            self.list.display(),
            e.old.len(),
            e.line + 1,
            n
        );
        Some(changed)
    }
}

/// The policy of family `f`, to change.
fn policy_family(p: &mut Policy, f: Family) -> Option<&mut crate::policy::FamilyPolicy> {
    match f {
        Family::V4 => p.v4.as_mut(),
        Family::V6 => p.v6.as_mut(),
    }
}

#[cfg(test)]
mod tests;
