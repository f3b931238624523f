//! Finding a binary masqd may run as root: only in trusted directories of `$PATH` (absolute,
//! owned by root, not writable by group or others; [`SAFE_PATH`] when `PATH` is unset), and
//! only when every symlink hop to its final target is just as trusted.

use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The search path when `PATH` is unset, and the only `PATH` a child is given.
pub const SAFE_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

/// Finds `name` in the trusted directories of `$PATH` (no `which`, no shell); see
/// [`find_in`].
pub fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| SAFE_PATH.into());
    find_in(&path, name)
}

/// Finds `name` in the entries of the search path `path` that are trusted directories, taking
/// the first candidate that is a trusted binary. Empty and relative entries (the current
/// directory) are never searched; an untrusted directory or binary is skipped with a warning
/// (once per path).
pub fn find_in(path: &OsStr, name: &str) -> Option<PathBuf> {
    if name.is_empty() || name.contains('/') {
        return None;
    }
    for dir in std::env::split_paths(path) {
        let candidate = dir.join(name);
        if std::fs::symlink_metadata(&candidate).is_err() {
            continue;
        }
        match trusted_dir(&dir).and_then(|()| trusted_binary(&candidate)) {
            Ok(()) => return Some(candidate),
            Err(why) => warn_once(&candidate, &why),
        }
    }
    None
}

fn warn_once(p: &Path, why: &str) {
    static SEEN: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if !seen.iter().any(|s| s == p) {
        seen.push(p.to_path_buf());
        tracing::warn!("not running {}: {why}", p.display());
    }
}

/// A directory root alone can change: absolute, a directory (after symlinks), owned by root,
/// not writable by group or others — and so is every directory above it (else its owner
/// could rename it away and put another in its place).
pub fn trusted_dir(d: &Path) -> Result<(), String> {
    if !d.is_absolute() {
        return Err(format!(
            "PATH entry {:?} is not an absolute directory (an empty or relative entry means \
             the current directory)",
            d.display().to_string()
        ));
    }
    let m = std::fs::metadata(d).map_err(|e| format!("{}: {e}", d.display()))?;
    if !m.is_dir() {
        return Err(format!("{} is not a directory", d.display()));
    }
    owned_by_root(d, &m)?;
    let real = std::fs::canonicalize(d).map_err(|e| format!("{}: {e}", d.display()))?;
    for parent in real.ancestors().skip(1) {
        let pm = std::fs::metadata(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        // A sticky root-owned directory (/tmp) lets nobody else rename root's entries.
        let sticky = pm.uid() == 0 && pm.mode() & 0o1000 != 0;
        if !sticky {
            owned_by_root(parent, &pm).map_err(|e| {
                format!("{} lies below a directory others control: {e}", d.display())
            })?;
        }
    }
    Ok(())
}

fn owned_by_root(p: &Path, m: &std::fs::Metadata) -> Result<(), String> {
    if m.uid() != 0 {
        return Err(format!(
            "{} is owned by uid {}, not root",
            p.display(),
            m.uid()
        ));
    }
    if m.mode() & 0o022 != 0 {
        return Err(format!(
            "{} is writable by group or others (mode {:o})",
            p.display(),
            m.mode() & 0o7777
        ));
    }
    Ok(())
}

/// A binary root alone can change: every symlink hop lies in a trusted directory, and the final
/// target is an executable regular file owned by root and not writable by group or others.
pub fn trusted_binary(p: &Path) -> Result<(), String> {
    let mut cur = p.to_path_buf();
    for _ in 0..40 {
        let m = std::fs::symlink_metadata(&cur).map_err(|e| format!("{}: {e}", cur.display()))?;
        if !m.file_type().is_symlink() {
            if !m.is_file() || m.mode() & 0o111 == 0 {
                return Err(format!("{} is not an executable file", cur.display()));
            }
            return owned_by_root(&cur, &m);
        }
        let target = std::fs::read_link(&cur).map_err(|e| format!("{}: {e}", cur.display()))?;
        let next = match cur.parent() {
            Some(dir) => dir.join(target),
            None => target,
        };
        let dir = next.parent().unwrap_or(Path::new("/"));
        trusted_dir(dir).map_err(|e| format!("{} -> {}: {e}", cur.display(), next.display()))?;
        cur = next;
    }
    Err(format!(
        "{}: too many levels of symbolic links",
        p.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_directories_are_trusted_and_the_current_one_never() {
        assert_eq!(trusted_dir(Path::new("/")), Ok(()));
        let e = trusted_dir(Path::new("bin")).unwrap_err();
        assert!(e.contains("not an absolute directory"), "{e}");
        // /tmp is writable by everyone (sticky or not): no binary is taken from there.
        let e = trusted_dir(Path::new("/tmp")).unwrap_err();
        assert!(e.contains("writable by group or others"), "{e}");
        assert!(trusted_dir(Path::new("/nonexistent-masqd-dir")).is_err());
        let sh = find_in(OsStr::new(SAFE_PATH), "sh").expect("a root-owned sh on the safe path");
        assert!(sh.is_absolute() && sh.ends_with("sh"), "{sh:?}");
        for name in ["", "../bin/sh", "/bin/sh"] {
            assert_eq!(find_in(OsStr::new(SAFE_PATH), name), None, "{name:?}");
        }
        assert_eq!(find_in(OsStr::new(":.:bin"), "sh"), None);
    }
}
