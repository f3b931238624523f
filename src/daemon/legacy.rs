//! The legacy xtables change source: inotify on the xtables lock file that every `iptables -w`
//! and `iptables-restore -w` opens (a cheap "something may have changed"), confirmed by the nat
//! table's info ([`crate::backend::legacy::info`]) against the last one seen per family.
//!
//! Legacy changes raise no netlink events. Without this source the daemon would have to run
//! `iptables-legacy-save` on a timer; with it, no binary runs while nothing changed. masqd's
//! own restores open the lock too: the info after each of its reconciles is the new baseline,
//! and a reconcile that committed to legacy xtables is followed by one read of the table (a
//! writer that waited on the lock commits right after masqd and looks the same in the info).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use anyhow::Result;
use nix::sys::inotify::{AddWatchFlags, Inotify, InotifyEvent, WatchDescriptor};
use tokio::io::unix::AsyncFd;

use super::signals::Fd;
use super::triggers::Trigger;
use super::TARGET;
use crate::backend::legacy::info::{nat_info, TableInfo};
use crate::policy::Family;

/// The lock file of iptables when `XTABLES_LOCKFILE` is not set.
pub const DEFAULT_LOCKFILE: &str = "/run/xtables.lock";

/// The lock file iptables uses here: `XTABLES_LOCKFILE`, else [`DEFAULT_LOCKFILE`].
pub fn lockfile() -> PathBuf {
    std::env::var_os("XTABLES_LOCKFILE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_LOCKFILE))
}

/// The nat table's info of both families (None: not loaded, or unreadable).
pub type Infos = [Option<TableInfo>; 2];

/// Reads the nat table's info of both families (never creates a table). Equals
/// `iptables-legacy -t nat -L -n` and `ip6tables-legacy -t nat -L -n` reading each table's info,
/// without listing rules.
pub fn sample() -> Infos {
    Family::ALL.map(|f| match nat_info(f) {
        Ok(i) => i,
        Err(e) => {
            tracing::debug!(target: TARGET, "reading the {f} legacy nat table's info: {e}");
            None
        }
    })
}

/// What is watched: the lock file itself, or its directory while the file does not exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum On {
    File(WatchDescriptor),
    Dir(WatchDescriptor),
}

/// The inotify watch on the lock file and the last nat table info seen.
pub(super) struct LegacyWatch {
    ino: AsyncFd<Fd<Inotify>>,
    lock: PathBuf,
    on: Option<On>,
    /// The info of the last reconcile (or of the last change seen): the baseline.
    last: Infos,
    /// The info when the running reconcile started.
    at_start: Option<Infos>,
}

/// `inotify_add_watch` on the lock file (open and close events), or on its directory (the
/// file's creation) while it does not exist.
fn arm(ino: &Inotify, lock: &Path) -> Option<On> {
    let file = AddWatchFlags::IN_OPEN
        | AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_CLOSE_NOWRITE
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF;
    if let Ok(wd) = ino.add_watch(lock, file) {
        return Some(On::File(wd));
    }
    let dir = lock.parent()?;
    let flags = AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_ONLYDIR;
    match ino.add_watch(dir, flags) {
        Ok(wd) => Some(On::Dir(wd)),
        Err(e) => {
            tracing::warn!(
                target: TARGET,
                "cannot watch {}: {e}; legacy changes are seen by the resync only",
                dir.display()
            );
            None
        }
    }
}

impl LegacyWatch {
    /// `inotify_init1(IN_NONBLOCK | IN_CLOEXEC)`, the watch on `lock`, and the first baseline.
    pub fn new(lock: PathBuf) -> Result<LegacyWatch> {
        let ino = super::watch::init("inotify_init for the xtables lock")?;
        let on = arm(&ino, &lock);
        let ino = super::watch::register(ino)?;
        Ok(LegacyWatch {
            ino,
            lock,
            on,
            last: sample(),
            at_start: None,
        })
    }

    /// The next events on the lock file (cancel-safe, all read at once until EAGAIN).
    pub async fn next(&self) -> Result<Vec<InotifyEvent>> {
        super::watch::read_all(&self.ino).await
    }

    /// Takes events in (re-arming on the file once it exists, or on its directory once it is
    /// gone): whether something may have changed in legacy xtables.
    pub fn take_in(&mut self, evs: &[InotifyEvent]) -> bool {
        let ino = &self.ino.get_ref().0;
        let name = self.lock.file_name();
        let gone =
            AddWatchFlags::IN_IGNORED | AddWatchFlags::IN_DELETE_SELF | AddWatchFlags::IN_MOVE_SELF;
        let mut rearm = false;
        for e in evs {
            match self.on {
                Some(On::File(wd)) if e.wd == wd && e.mask.intersects(gone) => rearm = true,
                Some(On::Dir(wd)) if e.wd == wd => {
                    rearm |= e.name.as_deref() == name.map(OsStr::new) || e.name.is_none();
                }
                _ => {}
            }
        }
        if rearm {
            if let Some(On::File(wd) | On::Dir(wd)) = self.on.take() {
                let _ = ino.rm_watch(wd);
            }
            self.on = arm(ino, &self.lock);
        }
        !evs.is_empty()
    }

    /// Whether legacy xtables may be in use here (a nat table was loaded at the last look):
    /// only then does the resync tick sample the info.
    pub fn nat_loaded(&self) -> bool {
        self.last.iter().any(Option::is_some)
    }

    /// Samples the info: [`Trigger::LegacyChanged`] when it differs from the baseline (which
    /// it then becomes), nothing otherwise. While a reconcile runs, nothing: its end decides.
    pub fn check(&mut self) -> Option<Trigger> {
        if self.at_start.is_some() {
            return None;
        }
        let now = sample();
        changed(&mut self.last, now)
    }

    /// A reconcile starts: the info it starts from.
    pub fn starting(&mut self) {
        self.at_start = Some(sample());
    }

    /// A reconcile ended; `legacy_applied`: it ran a legacy restore (or failed). The info now is
    /// the new baseline. What follows is [`after_reconcile`]'s answer.
    pub fn ended(&mut self, legacy_applied: bool) -> Option<Trigger> {
        let start = self.at_start.take();
        let now = sample();
        self.last = now;
        after_reconcile(start, &now, legacy_applied)
    }
}

/// What a reconcile that started from the info `start` (None: none was sampled) and ended at
/// `now` owes next:
/// - it ran a legacy restore: one reconcile that reads the table again
///   ([`Trigger::LegacyVerify`]). An `iptables -w` that waited on the lock masqd's restore held
///   commits right after it, and its change cannot be told from masqd's own in the info (nor
///   its lock-file events from those of masqd's restore), so reading the table is the only
///   proof. One read per legacy commit of masqd's; nothing while nothing changes.
/// - it changed nothing in legacy xtables but the info moved since it started: someone else
///   committed meanwhile (perhaps after it read the table): one more reconcile.
/// - otherwise nothing.
fn after_reconcile(start: Option<Infos>, now: &Infos, legacy_applied: bool) -> Option<Trigger> {
    match start {
        Some(_) if legacy_applied => Some(Trigger::LegacyVerify),
        Some(s) if s != *now => Some(Trigger::LegacyChanged),
        _ => None,
    }
}

/// Compares `now` with the baseline `last`, which it becomes: the trigger of a change.
fn changed(last: &mut Infos, now: Infos) -> Option<Trigger> {
    if *last == now {
        return None;
    }
    *last = now;
    Some(Trigger::LegacyChanged)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(entries: u32, size: u32) -> Option<TableInfo> {
        Some(TableInfo {
            valid_hooks: 0x1b,
            num_entries: entries,
            size,
            ..TableInfo::default()
        })
    }

    #[test]
    fn only_a_change_of_the_info_is_a_trigger() {
        let mut last = [info(5, 792), None];
        assert_eq!(changed(&mut last, [info(5, 792), None]), None, "same");
        assert_eq!(
            changed(&mut last, [info(6, 944), None]),
            Some(Trigger::LegacyChanged),
            "a rule added"
        );
        assert_eq!(changed(&mut last, [info(6, 944), None]), None, "baseline");
        assert_eq!(
            changed(&mut last, [info(6, 944), info(5, 1032)]),
            Some(Trigger::LegacyChanged),
            "the ip6 nat table appeared"
        );
        let mut moved = last;
        if let Some(i) = moved[0].as_mut() {
            i.hook_entry[4] = 8;
        }
        assert_eq!(
            changed(&mut last, moved),
            Some(Trigger::LegacyChanged),
            "a rule moved between chains (same count and size)"
        );
    }

    #[test]
    fn a_legacy_commit_of_masqd_is_verified_by_one_more_read() {
        let a = [info(5, 792), None];
        let b = [info(6, 944), None];
        assert_eq!(
            after_reconcile(Some(a), &b, true),
            Some(Trigger::LegacyVerify),
            "masqd's restore moved the info: a commit right after it looks the same"
        );
        assert_eq!(
            after_reconcile(Some(a), &a, true),
            Some(Trigger::LegacyVerify),
            "a restore that left the same info (a rule replaced) is verified too"
        );
        assert_eq!(
            after_reconcile(Some(a), &b, false),
            Some(Trigger::LegacyChanged),
            "someone else committed while masqd read"
        );
        assert_eq!(after_reconcile(Some(a), &a, false), None, "quiet: nothing");
        assert_eq!(
            after_reconcile(None, &b, true),
            None,
            "no reconcile was sampled"
        );
    }

    #[test]
    fn the_lock_file_follows_the_environment_name() {
        // XTABLES_LOCKFILE is what iptables reads (xshared.c); not set here by the tests.
        if std::env::var_os("XTABLES_LOCKFILE").is_none() {
            assert_eq!(lockfile(), PathBuf::from("/run/xtables.lock"));
        }
    }
}
