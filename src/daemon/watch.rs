//! The inotify watches on the directories of the files the configuration is read from (the
//! config file, flannel's subnet.env, the CIDR list), kept armed while those directories come
//! and go, and which events mean "read the configuration again".

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent, WatchDescriptor};
use tokio::io::unix::AsyncFd;

use super::signals::Fd;
use super::TARGET;

/// Whether an inotify event in a watched directory concerns one of `files` (by name; names
/// starting with `..` are the atomic symlink swaps of Kubernetes-style config volumes).
fn touches(name: &Option<OsString>, files: &[PathBuf]) -> bool {
    match name {
        None => true,
        Some(n) => {
            n.to_string_lossy().starts_with("..")
                || files.iter().any(|f| f.file_name() == Some(n.as_os_str()))
        }
    }
}

/// One inotify watch: a directory of a watched file, or its nearest existing ancestor while
/// that directory is missing.
struct Watch {
    wd: WatchDescriptor,
    dir: PathBuf,
    /// Device and inode of `dir` when the watch was added: a directory removed and recreated
    /// (flannel's /run/flannel) is a new inode, watched anew.
    id: (u64, u64),
}

/// The directory to watch for `file`: its own directory, or while that does not exist the
/// nearest existing ancestor (whose events say when it comes back).
fn watch_target(file: &Path) -> Option<(PathBuf, (u64, u64))> {
    use std::os::unix::fs::MetadataExt;
    let abs = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
    let mut dir = abs.parent();
    while let Some(d) = dir {
        if let Ok(m) = std::fs::metadata(d) {
            if m.is_dir() {
                return Some((d.to_path_buf(), (m.dev(), m.ino())));
            }
        }
        dir = d.parent();
    }
    None
}

/// Arms the watches for `files` (`inotify_add_watch` on each target of [`watch_target`],
/// `inotify_rm_watch` on those no longer needed). True when a watch was added or moved after
/// the first arming: a directory came back, and the files in it may have changed unseen.
fn watch_dirs(ino: &Inotify, files: &[PathBuf], watched: &mut Vec<Watch>) -> bool {
    let first = watched.is_empty();
    let targets: Vec<(PathBuf, (u64, u64))> =
        files.iter().filter_map(|f| watch_target(f)).collect();
    let mut changed = false;
    watched.retain(|w| {
        let keep = targets.iter().any(|(d, id)| *d == w.dir && *id == w.id);
        if !keep {
            let _ = ino.rm_watch(w.wd);
            changed = true;
        }
        keep
    });
    for (dir, id) in targets {
        if watched.iter().any(|w| w.dir == dir) {
            continue;
        }
        let flags = AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_ATTRIB
            | AddWatchFlags::IN_DELETE_SELF
            | AddWatchFlags::IN_MOVE_SELF
            | AddWatchFlags::IN_ONLYDIR;
        match ino.add_watch(&dir, flags) {
            Ok(wd) => {
                watched.push(Watch { wd, dir, id });
                changed = true;
            }
            Err(e) => tracing::warn!(
                target: TARGET,
                "cannot watch {}: {e}; changes there need SIGHUP",
                dir.display()
            ),
        }
    }
    changed && !first
}

/// `inotify_init1(IN_NONBLOCK | IN_CLOEXEC)`; `what` names it in the error.
pub(super) fn init(what: &str) -> Result<Inotify> {
    Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).with_context(|| what.to_string())
}

/// The inotify instance registered with the runtime (it then only reads when readable).
pub(super) fn register(ino: Inotify) -> Result<AsyncFd<Fd<Inotify>>> {
    // SAFETY: Inotify owns its fd for its whole life and never swaps it.
    unsafe { AsyncFd::register(Fd(ino)) }.map_err(|e| anyhow::anyhow!("registering inotify: {e}"))
}

/// The next events of `ino` (cancel-safe: nothing is read before the fd is readable, and then
/// all is read at once, until EAGAIN, since readiness is edge-triggered).
pub(super) async fn read_all(ino: &AsyncFd<Fd<Inotify>>) -> Result<Vec<InotifyEvent>> {
    let mut guard = ino.readable().await?;
    let mut evs = Vec::new();
    while let Ok(mut batch) = guard.get_inner().0.read_events() {
        if batch.is_empty() {
            break;
        }
        evs.append(&mut batch);
    }
    guard.clear_ready();
    Ok(evs)
}

/// The inotify instance and its watches.
pub(super) struct Watcher {
    ino: AsyncFd<Fd<Inotify>>,
    watched: Vec<Watch>,
}

impl Watcher {
    /// `inotify_init1(IN_NONBLOCK | IN_CLOEXEC)` and the first arming for `files`.
    pub fn new(files: &[PathBuf]) -> Result<Watcher> {
        let ino = init("inotify_init")?;
        let mut watched = Vec::new();
        watch_dirs(&ino, files, &mut watched);
        Ok(Watcher {
            ino: register(ino)?,
            watched,
        })
    }

    /// The next events (cancel-safe: nothing is read before the fd is readable, and then all
    /// is read at once, until EAGAIN, since readiness is edge-triggered).
    pub async fn next(&self) -> Result<Vec<InotifyEvent>> {
        read_all(&self.ino).await
    }

    /// Arms the watches for `files` again (after a reload changed the list).
    pub fn rearm(&mut self, files: &[PathBuf]) {
        watch_dirs(&self.ino.get_ref().0, files, &mut self.watched);
    }

    /// Takes `evs` in: whether the configuration must be read again. A watched directory
    /// removed or moved away loses its watch, and its nearest existing ancestor is watched
    /// until it is back.
    pub fn changed(&mut self, evs: &[InotifyEvent], files: &[PathBuf]) -> bool {
        let ino = &self.ino.get_ref().0;
        let before = self.watched.len();
        let gone =
            AddWatchFlags::IN_IGNORED | AddWatchFlags::IN_DELETE_SELF | AddWatchFlags::IN_MOVE_SELF;
        for e in evs.iter().filter(|e| e.mask.intersects(gone)) {
            if let Some(i) = self.watched.iter().position(|w| w.wd == e.wd) {
                let w = self.watched.swap_remove(i);
                let _ = ino.rm_watch(w.wd);
            }
        }
        let lost = self.watched.len() != before;
        let rearmed = watch_dirs(ino, files, &mut self.watched);
        lost || rearmed || evs.iter().any(|e| touches(&e.name, files))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touched_files() {
        let files = vec![PathBuf::from("/etc/masqd/masqd.toml")];
        assert!(touches(&Some("masqd.toml".into()), &files));
        assert!(touches(&Some("..data".into()), &files));
        assert!(!touches(&Some("other.toml".into()), &files));
    }

    #[test]
    fn watch_targets_walk_up_to_an_existing_directory() {
        let d = std::env::temp_dir().join(format!("masqd-watch-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let file = d.join("a/b/subnet.env");
        assert_eq!(watch_target(&file).unwrap().0, d);
        std::fs::create_dir_all(d.join("a/b")).unwrap();
        assert_eq!(watch_target(&file).unwrap().0, d.join("a/b"));
        let ino = Inotify::init(InitFlags::IN_NONBLOCK).unwrap();
        let mut watched = Vec::new();
        let files = vec![file.clone()];
        assert!(!watch_dirs(&ino, &files, &mut watched), "first arming");
        assert_eq!(watched.len(), 1);
        std::fs::remove_dir_all(d.join("a")).unwrap();
        assert!(watch_dirs(&ino, &files, &mut watched), "moved up");
        assert_eq!(watched[0].dir, d);
        std::fs::create_dir_all(d.join("a/b")).unwrap();
        assert!(watch_dirs(&ino, &files, &mut watched), "back");
        assert_eq!(watched[0].dir, d.join("a/b"));
        assert!(!watch_dirs(&ino, &files, &mut watched), "steady");
        let _ = std::fs::remove_dir_all(&d);
    }
}
