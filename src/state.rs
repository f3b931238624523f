//! Records of the default rules masqd removed, kept under the state directory so that
//! `masqd teardown` can put them back (design.md §5).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/masqd";
const FILE: &str = "removed-default-rules.json";

/// One removed rule, enough to put it back verbatim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemovedRule {
    /// Backend it lived in (`nft`).
    pub backend: String,
    /// Table family (`ip`, `ip6`).
    pub family: String,
    /// Table.
    pub table: String,
    /// Chain.
    pub chain: String,
    /// Human-readable rule.
    pub description: String,
    /// Its source CIDR.
    pub saddr: String,
    /// Its `! -o` interface, if any.
    pub oif_neq: Option<String>,
    /// Hex of the raw NFTA_RULE_EXPRESSIONS payload (nft only).
    #[serde(default)]
    pub expressions_hex: String,
    /// Hex of the raw NFTA_RULE_USERDATA payload, if any.
    #[serde(default)]
    pub userdata_hex: Option<String>,
    /// The rule spec as iptables-legacy-save prints it after `-A POSTROUTING` (legacy only).
    #[serde(default)]
    pub legacy_rule: Option<String>,
}

impl RemovedRule {
    /// Two records of the same rule (Docker re-inserts it with fresh counters).
    pub fn same_rule(&self, other: &RemovedRule) -> bool {
        self.backend == other.backend
            && self.family == other.family
            && self.table == other.table
            && self.chain == other.chain
            && self.saddr == other.saddr
            && self.oif_neq == other.oif_neq
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    version: u32,
    removed_default_rules: Vec<RemovedRule>,
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct State {
    dir: PathBuf,
}

impl State {
    /// State kept in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> State {
        State { dir: dir.into() }
    }

    fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    /// The recorded rules (empty when there is no file).
    pub fn load(&self) -> Result<Vec<RemovedRule>> {
        let path = self.path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let f: StateFile =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        Ok(f.removed_default_rules)
    }

    /// Adds records (deduplicated) and writes the file atomically (temp file, fsync, rename).
    pub fn record(&self, rules: &[RemovedRule]) -> Result<()> {
        let mut all = self.load()?;
        let before = all.len();
        for r in rules {
            if !all.iter().any(|a| a.same_rule(r)) {
                all.push(r.clone());
            }
        }
        if all.len() == before && self.path().exists() {
            return Ok(());
        }
        self.store(&all)
    }

    /// Replaces the records; removes the file when none are left.
    pub fn store(&self, rules: &[RemovedRule]) -> Result<()> {
        let path = self.path();
        if rules.is_empty() {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
            }
            return Ok(());
        }
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating the state directory {}", self.dir.display()))?;
        let text = serde_json::to_string_pretty(&StateFile {
            version: 1,
            removed_default_rules: rules.to_vec(),
        })?;
        write_atomic(&path, text.as_bytes())
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    {
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)
            .and_then(|_| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Parses lower- or upper-case hex.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_roundtrip() {
        assert_eq!(
            unhex(&hex(&[0, 1, 0xab, 0xff])),
            Some(vec![0, 1, 0xab, 0xff])
        );
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
    }

    #[test]
    fn record_dedups_and_removes() {
        let dir = std::env::temp_dir().join(format!("masqd-state-test-{}", std::process::id()));
        let st = State::new(&dir);
        let r = RemovedRule {
            backend: "nft".into(),
            family: "ip".into(),
            table: "nat".into(),
            chain: "POSTROUTING".into(),
            description: "x".into(),
            saddr: "10.0.0.0/24".into(),
            oif_neq: Some("docker0".into()),
            expressions_hex: "00".into(),
            userdata_hex: None,
            legacy_rule: None,
        };
        st.record(std::slice::from_ref(&r)).unwrap();
        let mut r2 = r.clone();
        r2.expressions_hex = "01".into();
        st.record(&[r2]).unwrap();
        assert_eq!(st.load().unwrap(), vec![r]);
        st.store(&[]).unwrap();
        assert!(st.load().unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
