//! The seam between the legacy backend and the iptables-legacy binaries: the [`Runner`] trait
//! (which tables are loaded, one save, one restore), its real implementation over
//! [`crate::exec`] ([`SystemRunner`]: trusted `$PATH` lookup, argument vectors, a timeout on
//! every call, `XTABLES_LOCKFILE` passed through), and [`FakeRunner`], which serves canned save
//! text and records every payload, for tests that run without root.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use crate::exec::{self, ExecError};
use crate::policy::Family;

/// What the legacy backend asks of the binaries of one family.
pub trait Runner {
    /// The legacy tables loaded in this network namespace (empty when the module is not
    /// loaded). Equals reading `/proc/net/ip_tables_names` (`ip6_tables_names`): no side effect.
    fn tables_loaded(&self, f: Family) -> std::io::Result<Vec<String>>;
    /// The nat table with counters. Equals `iptables-legacy-save -c -t nat` (which creates the
    /// table when it is not loaded: ask [`Runner::tables_loaded`] first).
    fn save(&self, f: Family) -> Result<String, ExecError>;
    /// Applies a payload atomically. Equals `iptables-legacy-restore --noflush --wait < payload`.
    fn restore(&self, f: Family, payload: &str) -> Result<(), ExecError>;
}

/// The legacy binaries of one family.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// `iptables-legacy-save` / `ip6tables-legacy-save`.
    pub save: PathBuf,
    /// `iptables-legacy-restore` / `ip6tables-legacy-restore`.
    pub restore: PathBuf,
    /// Bound on every call.
    pub timeout: Duration,
}

impl Binaries {
    /// The nat table with counters. Equals `iptables-legacy-save -c -t nat`.
    pub fn save_nat(&self) -> Result<String, ExecError> {
        let out = exec::run(&self.save, &["-c", "-t", "nat"], None, self.timeout)?;
        Ok(out.stdout)
    }

    /// Applies a payload atomically. Equals `iptables-legacy-restore --noflush --wait <
    /// payload`.
    pub fn restore_noflush(&self, payload: &str) -> Result<(), ExecError> {
        exec::run(
            &self.restore,
            &["--noflush", "--wait"],
            Some(payload.as_bytes()),
            self.timeout,
        )
        .map(|_| ())
    }
}

/// Names of the legacy binaries of a family: (save, restore, plain); see
/// [`Family::ipt_binaries`].
pub fn binary_names(f: Family) -> (&'static str, &'static str, &'static str) {
    f.ipt_binaries()
}

/// The legacy binaries of a family found on `$PATH`, if both save and restore are there.
pub fn binaries(f: Family) -> Option<Binaries> {
    let (save, restore, _) = f.ipt_binaries();
    Some(Binaries {
        save: exec::find_binary(save)?,
        restore: exec::find_binary(restore)?,
        timeout: exec::DEFAULT_TIMEOUT,
    })
}

/// The real binaries, per family: what `/proc` says is loaded, and the binaries found on a
/// trusted `$PATH`.
#[derive(Debug, Clone, Default)]
pub struct SystemRunner {
    v4: Option<Binaries>,
    v6: Option<Binaries>,
}

impl SystemRunner {
    /// The binaries of both families found on `$PATH` ([`binaries`]); a family without them
    /// can still tell which tables are loaded, but every save or restore of it fails.
    pub fn from_path() -> SystemRunner {
        SystemRunner {
            v4: binaries(Family::V4),
            v6: binaries(Family::V6),
        }
    }

    /// The given binaries for family `f`, none for the other.
    pub fn only(f: Family, bins: Binaries) -> SystemRunner {
        let mut r = SystemRunner::default();
        *r.slot(f) = Some(bins);
        r
    }

    fn slot(&mut self, f: Family) -> &mut Option<Binaries> {
        match f {
            Family::V4 => &mut self.v4,
            Family::V6 => &mut self.v6,
        }
    }

    /// The binaries of family `f`, or the error of a call that found none.
    pub fn binaries(&self, f: Family) -> Result<&Binaries, ExecError> {
        let bins = match f {
            Family::V4 => self.v4.as_ref(),
            Family::V6 => self.v6.as_ref(),
        };
        bins.ok_or_else(|| ExecError::Spawn {
            cmd: f.ipt_binaries().0.to_string(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "not found in the trusted directories of PATH",
            ),
        })
    }
}

impl Runner for SystemRunner {
    fn tables_loaded(&self, f: Family) -> std::io::Result<Vec<String>> {
        super::observe::tables_loaded(f)
    }

    fn save(&self, f: Family) -> Result<String, ExecError> {
        self.binaries(f)?.save_nat()
    }

    fn restore(&self, f: Family, payload: &str) -> Result<(), ExecError> {
        self.binaries(f)?.restore_noflush(payload)
    }
}

/// A runner for tests: serves canned `iptables-legacy-save -c -t nat` text per family (a family
/// with text has `nat` loaded, one without has no legacy table), records every restore payload,
/// and fails restores on request the way a refusing `iptables-legacy-restore` does.
#[derive(Debug, Default)]
pub struct FakeRunner {
    saves: BTreeMap<Family, String>,
    fail_restore: Option<String>,
    restores: Mutex<Vec<(Family, String)>>,
    save_calls: Mutex<usize>,
}

impl FakeRunner {
    /// A runner with no legacy table loaded in either family.
    pub fn new() -> FakeRunner {
        FakeRunner::default()
    }

    /// Serves `text` as the save of family `f` (and lists `nat` as loaded there).
    pub fn with_save(mut self, f: Family, text: &str) -> FakeRunner {
        self.saves.insert(f, text.to_string());
        self
    }

    /// Makes every restore exit 1 printing `stderr`.
    pub fn failing_restore(mut self, stderr: &str) -> FakeRunner {
        self.fail_restore = Some(stderr.to_string());
        self
    }

    /// The payloads restored so far, in order (a failed restore is recorded too).
    pub fn restores(&self) -> Vec<(Family, String)> {
        self.restores
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How many saves were run.
    pub fn save_calls(&self) -> usize {
        *self.save_calls.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Runner for FakeRunner {
    fn tables_loaded(&self, f: Family) -> std::io::Result<Vec<String>> {
        Ok(match self.saves.contains_key(&f) {
            true => vec!["nat".to_string()],
            false => Vec::new(),
        })
    }

    fn save(&self, f: Family) -> Result<String, ExecError> {
        *self.save_calls.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        // Like the real save run on a family without the table: it would create an empty one.
        Ok(self.saves.get(&f).cloned().unwrap_or_else(|| {
            "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n\
             :POSTROUTING ACCEPT [0:0]\nCOMMIT\n"
                .to_string()
        }))
    }

    fn restore(&self, f: Family, payload: &str) -> Result<(), ExecError> {
        self.restores
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((f, payload.to_string()));
        match &self.fail_restore {
            None => Ok(()),
            Some(stderr) => Err(ExecError::Failed {
                cmd: format!("{} --noflush --wait", f.ipt_binaries().1),
                why: "exited with exit status: 1".into(),
                stderr: stderr.clone(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::captured::{SAVE_V4, SAVE_V4_COUNTERS, SAVE_V6};
    use super::super::{apply_with, observe_with, plan, LegacyObserved};
    use super::*;
    use crate::policy::FamilyPolicy;

    #[test]
    fn observing_a_family_without_the_nat_table_never_runs_a_save() {
        let r = FakeRunner::new().with_save(Family::V6, SAVE_V6);
        assert_eq!(
            observe_with(&r, Family::V4).unwrap(),
            LegacyObserved::default()
        );
        assert_eq!(r.save_calls(), 0, "a save would create the table");
        let o = observe_with(&r, Family::V6).unwrap();
        assert_eq!(r.save_calls(), 1);
        assert!(o.nat_loaded && !o.has_masqd());
        assert_eq!(o.postrouting.len(), 2);
    }

    #[test]
    fn observing_reads_the_saved_table_with_its_counters() {
        let r = FakeRunner::new().with_save(Family::V4, SAVE_V4_COUNTERS);
        let o = observe_with(&r, Family::V4).unwrap();
        assert_eq!(o, LegacyObserved::from_save(SAVE_V4_COUNTERS));
        assert!(o.chain_exists && o.has_masqd());
        assert_eq!(o.chain_rules.len(), 4);
        assert_eq!(o.chain_packets, [0, 0, 0, 0]);
        assert_eq!(o.postrouting.len(), 4);
        assert_eq!(o.nat_rules.len(), 5, "masqd's own rules are not foreign");
    }

    #[test]
    fn apply_hands_the_runner_exactly_the_planned_payload() {
        let r = FakeRunner::new().with_save(Family::V4, SAVE_V4);
        let o = observe_with(&r, Family::V4).unwrap();
        let fp = FamilyPolicy {
            configured_pod_cidrs: vec!["172.7.21.0/24".parse().unwrap()],
            pod_cidrs: vec!["172.7.21.0/24".parse().unwrap()],
            exception_cidrs: vec!["172.7.0.0/16".parse().unwrap()].into(),
            pod: Vec::new().into(),
            nomasq: Vec::new().into(),
        };
        let bridges = ["docker0".to_string()];
        let lp = plan(Some((&fp, &bridges, false)), &o, &fp.pod_cidrs, true);
        let payload = lp.payload.unwrap();
        apply_with(&r, Family::V4, &payload).unwrap();
        assert_eq!(r.restores(), [(Family::V4, payload.clone())]);
        assert_eq!(
            payload,
            "*nat\n:MASQD-POSTROUTING - [0:0]\n\
             -D POSTROUTING -s 172.7.21.0/24 ! -o docker0 -j MASQUERADE\n\
             -A MASQD-POSTROUTING -o docker0 -j RETURN\n\
             -A MASQD-POSTROUTING -s 172.7.21.0/24 -d 172.7.0.0/16 -j RETURN\n\
             -A MASQD-POSTROUTING -s 172.7.21.0/24 -j MASQUERADE\nCOMMIT\n"
        );
    }

    #[test]
    fn a_refused_restore_is_an_error_naming_the_payload() {
        let r = FakeRunner::new()
            .with_save(Family::V6, SAVE_V6)
            .failing_restore("ip6tables-restore: line 2 failed");
        let payload =
            "*nat\n-I POSTROUTING 1 -m comment --comment masqd -j MASQD-POSTROUTING\nCOMMIT\n";
        let e = apply_with(&r, Family::V6, payload).unwrap_err();
        let text = format!("{e:#}");
        assert!(text.contains(payload), "{text}");
        assert!(
            text.contains("ip6tables-legacy-restore --noflush --wait"),
            "{text}"
        );
        assert!(text.contains("line 2 failed"), "{text}");
        assert!(matches!(
            e.downcast_ref::<ExecError>(),
            Some(ExecError::Failed { .. })
        ));
        assert_eq!(r.restores(), [(Family::V6, payload.to_string())]);
    }

    #[test]
    fn the_system_runner_without_binaries_fails_without_running_anything() {
        let r = SystemRunner::default();
        let e = r.save(Family::V6).unwrap_err();
        assert!(matches!(e, ExecError::Spawn { .. }), "{e}");
        assert!(e.to_string().starts_with("ip6tables-legacy-save: "), "{e}");
        assert!(r.restore(Family::V4, "*nat\nCOMMIT\n").is_err());
        let only = SystemRunner::only(
            Family::V4,
            Binaries {
                save: "/nonexistent/iptables-legacy-save".into(),
                restore: "/nonexistent/iptables-legacy-restore".into(),
                timeout: Duration::from_secs(1),
            },
        );
        assert!(only.binaries(Family::V4).is_ok());
        assert!(only.binaries(Family::V6).is_err());
    }
}
