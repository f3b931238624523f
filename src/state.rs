//! Records of the default rules masqd removed, kept under the state directory so that
//! `masqd teardown` can put them back (design.md §5), and the locks that serialize masqd's
//! processes on that directory.
//!
//! Two advisory locks (flock) live in the state directory:
//!
//! * `run.lock` — held exclusively by `masqd run` for its whole life (its PID written in it),
//!   and shared by `apply` and `teardown` while they work: a one-shot command beside a running
//!   daemon is refused at once, naming the daemon's PID, and a daemon starting while a one-shot
//!   command works waits for it (up to [`LOCK_WAIT`]);
//! * `lock` — held exclusively by `apply` and `teardown` for their whole observe → record →
//!   apply (their PID written in it): a second one waits up to [`LOCK_WAIT`], then fails naming
//!   the holder's PID.
//!
//! The directory and every file in it must belong to root (or the user masqd runs as) and not
//! be writable by group or others, and none may be a symlink: teardown replays the recorded rule
//! bytes into the kernel. The state file is written through a fresh temporary file created
//! exclusively (`O_EXCL|O_NOFOLLOW`), synced, renamed over the file, and the directory synced.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/masqd";
const FILE: &str = "removed-default-rules.json";
const LOCK: &str = "lock";
const RUN_LOCK: &str = "run.lock";
/// How long a command waits for another one holding the state directory.
pub const LOCK_WAIT: Duration = Duration::from_secs(10);
/// Bound on the size of the state file (a few hundred bytes per record).
const MAX_STATE_BYTES: u64 = 16 << 20;

mod named;
pub use named::{Name, Named, RecordBackend, RecordFamily};

/// One removed rule, enough to put it back verbatim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemovedRule {
    /// Backend it lived in (`"nft"`, `"legacy"` in the file).
    pub backend: RecordBackend,
    /// Table family (`"ip"`, `"ip6"` in the file).
    pub family: RecordFamily,
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

/// Locks on the state directory, released on drop (and by the kernel when the process ends).
#[derive(Debug)]
pub struct StateLock {
    _held: Vec<Flock<File>>,
}

impl State {
    /// State kept in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> State {
        State { dir: dir.into() }
    }

    /// The state file.
    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Checks the directory: a real directory (not a symlink) owned by root or by us and not
    /// writable by group or others. Ok(false) when it does not exist.
    fn check_dir(&self) -> Result<bool> {
        let md = match std::fs::symlink_metadata(&self.dir) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("the state directory {}", self.dir.display()))
            }
        };
        if md.file_type().is_symlink() {
            bail!(
                "the state directory {} is a symlink; refused (use the real path)",
                self.dir.display()
            );
        }
        if !md.is_dir() {
            bail!(
                "the state directory {} is not a directory",
                self.dir.display()
            );
        }
        check_owner_mode(&self.dir, &md, "the state directory")?;
        Ok(true)
    }

    /// Creates the directory (mode 0700) when missing, then checks it.
    fn ensure_dir(&self) -> Result<()> {
        if !self.check_dir()? {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.dir)
                .with_context(|| format!("creating the state directory {}", self.dir.display()))?;
            self.check_dir()?;
        }
        Ok(())
    }

    /// The recorded rules (empty when there is no file). A file that is a symlink, not a
    /// regular file, not owned by root, writable by group or others, too large, or not the
    /// JSON masqd writes is an error naming it.
    pub fn load(&self) -> Result<Vec<RemovedRule>> {
        if !self.check_dir()? {
            return Ok(Vec::new());
        }
        let path = self.path();
        let mut f = match open_nofollow(&path, OpenOptions::new().read(true)) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(e).with_context(|| format!("opening the state file {}", path.display()))
            }
        };
        let md = f
            .metadata()
            .with_context(|| format!("reading {}", path.display()))?;
        check_regular(&path, &md, "the state file")?;
        if md.len() > MAX_STATE_BYTES {
            bail!(
                "the state file {} is {} bytes, more than {MAX_STATE_BYTES}; refused",
                path.display(),
                md.len()
            );
        }
        let mut text = String::new();
        (&mut f)
            .take(MAX_STATE_BYTES + 1)
            .read_to_string(&mut text)
            .with_context(|| format!("reading the state file {}", path.display()))?;
        let sf: StateFile = serde_json::from_str(&text).map_err(|e| {
            anyhow!(
                "the state file {} is corrupt or truncated ({e}); it lists the default rules \
                 masqd removed, which teardown puts back: repair it (or move it away, losing \
                 those records) and try again",
                path.display()
            )
        })?;
        if sf.version != 1 {
            bail!(
                "the state file {} has version {}, this masqd reads version 1",
                path.display(),
                sf.version
            );
        }
        Ok(sf.removed_default_rules)
    }

    /// Adds records (each rule once: a record of the same rule is kept, not duplicated) and
    /// writes the file atomically. The caller holds the state lock.
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

    /// Replaces the records; removes the file when none are left. The caller holds the lock.
    pub fn store(&self, rules: &[RemovedRule]) -> Result<()> {
        let path = self.path();
        if rules.is_empty() {
            if !self.check_dir()? {
                return Ok(());
            }
            match std::fs::remove_file(&path) {
                Ok(()) => return sync_dir(&self.dir),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
            }
        }
        self.ensure_dir()?;
        let text = serde_json::to_string_pretty(&StateFile {
            version: 1,
            removed_default_rules: rules.to_vec(),
        })?;
        write_atomic(&self.dir, FILE, text.as_bytes())
    }

    /// The lock of a one-shot command (`apply`, `teardown`): refused at once while a
    /// `masqd run` holds the directory (naming its PID); waits up to [`LOCK_WAIT`] for
    /// another one-shot command, then fails naming its PID. Equals `flock -s run.lock` plus
    /// `flock -w 10 lock`.
    pub fn lock_command(&self, command: &str) -> Result<StateLock> {
        self.lock_command_within(command, LOCK_WAIT)
    }

    fn lock_command_within(&self, command: &str, wait: Duration) -> Result<StateLock> {
        self.ensure_dir()?;
        let run_path = self.dir.join(RUN_LOCK);
        let run = match Flock::lock(open_lock(&run_path)?, FlockArg::LockSharedNonblock) {
            Ok(l) => l,
            Err((f, nix::errno::Errno::EWOULDBLOCK)) => bail!(
                "masqd run (PID {}) holds the state directory {}: `masqd {command}` is refused \
                 while the daemon runs (it would undo the command); stop it first (systemctl \
                 stop masqd)",
                holder(&f),
                self.dir.display()
            ),
            Err((_, e)) => return Err(anyhow!("flock {}: {e}", run_path.display())),
        };
        let path = self.dir.join(LOCK);
        let lock = wait_lock(&path, FlockArg::LockExclusiveNonblock, wait, |f| {
            format!(
                "another masqd command (PID {}) has held {} for more than {wait:?}; try again \
                 when it has finished",
                holder(f),
                path.display()
            )
        })?;
        write_holder(&lock, &path, command)?;
        Ok(StateLock {
            _held: vec![run, lock],
        })
    }

    /// The lock `masqd run` holds for its whole life: waits up to [`LOCK_WAIT`] for one-shot
    /// commands or another daemon, then fails naming the holder. Equals `flock -w 10 run.lock`.
    pub fn lock_daemon(&self) -> Result<StateLock> {
        self.ensure_dir()?;
        let path = self.dir.join(RUN_LOCK);
        let cmd_lock = self.dir.join(LOCK);
        let lock = wait_lock(&path, FlockArg::LockExclusiveNonblock, LOCK_WAIT, |f| {
            // Shared holders are one-shot commands (their PID is in `lock`); an exclusive one
            // is another daemon (its PID is in run.lock).
            let shared = open_lock(&path)
                .ok()
                .and_then(|g| Flock::lock(g, FlockArg::LockSharedNonblock).ok())
                .is_some();
            let who = if shared {
                let pid = open_lock(&cmd_lock).map(|g| holder(&g)).unwrap_or_default();
                format!("a masqd command (PID {pid})")
            } else {
                format!("another masqd run (PID {})", holder(f))
            };
            format!(
                "{who} has held the state directory {} for more than {LOCK_WAIT:?}",
                self.dir.display()
            )
        })?;
        write_holder(&lock, &path, "run")?;
        Ok(StateLock { _held: vec![lock] })
    }
}

fn check_owner_mode(path: &Path, md: &std::fs::Metadata, what: &str) -> Result<()> {
    let me = nix::unistd::Uid::effective().as_raw();
    if md.uid() != 0 && md.uid() != me {
        bail!(
            "{what} {} is owned by uid {}, not by root; refused",
            path.display(),
            md.uid()
        );
    }
    if md.permissions().mode() & 0o022 != 0 {
        bail!(
            "{what} {} is writable by group or others (mode {:o}); refused (chmod go-w)",
            path.display(),
            md.permissions().mode() & 0o7777
        );
    }
    Ok(())
}

fn check_regular(path: &Path, md: &std::fs::Metadata, what: &str) -> Result<()> {
    if !md.is_file() {
        bail!("{what} {} is not a regular file; refused", path.display());
    }
    check_owner_mode(path, md, what)
}

/// Opens without following a symlink in the last component (ELOOP is reported as such) and
/// without blocking on a FIFO.
fn open_nofollow(path: &Path, opts: &mut OpenOptions) -> std::io::Result<File> {
    opts.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                std::io::Error::other(format!("{} is a symlink; refused", path.display()))
            } else {
                e
            }
        })
}

fn open_lock(path: &Path) -> Result<File> {
    let f = open_nofollow(
        path,
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600),
    )
    .with_context(|| format!("opening the lock file {}", path.display()))?;
    let md = f
        .metadata()
        .with_context(|| format!("reading {}", path.display()))?;
    check_regular(path, &md, "the lock file")?;
    Ok(f)
}

/// Takes a lock, polling every 20 ms for up to `wait`.
fn wait_lock(
    path: &Path,
    arg: FlockArg,
    wait: Duration,
    timeout_msg: impl Fn(&File) -> String,
) -> Result<Flock<File>> {
    let deadline = Instant::now() + wait;
    let mut f = open_lock(path)?;
    loop {
        match Flock::lock(f, arg) {
            Ok(l) => return Ok(l),
            Err((back, nix::errno::Errno::EWOULDBLOCK)) => {
                if stop_pending() {
                    bail!("{STOPPED_WAITING}");
                }
                if Instant::now() >= deadline {
                    bail!("{}", timeout_msg(&back));
                }
                f = back;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err((_, e)) => bail!("flock {}: {e}", path.display()),
        }
    }
}

/// The error of a lock wait ended by SIGTERM or SIGINT (the daemon blocks them and reads them
/// later: while it waits for the lock, the wait itself must notice them).
pub const STOPPED_WAITING: &str = "stopped by a signal while waiting for the state lock";

/// Whether SIGTERM or SIGINT is pending (blocked and not yet read).
fn stop_pending() -> bool {
    // SAFETY: sigpending fills the set we own; sigismember reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigpending(&mut set) == 0
            && (libc::sigismember(&set, libc::SIGTERM) == 1
                || libc::sigismember(&set, libc::SIGINT) == 1)
    }
}

/// Writes `PID command` into a lock file we hold.
fn write_holder(lock: &Flock<File>, path: &Path, command: &str) -> Result<()> {
    let mut f: &File = lock;
    f.set_len(0)
        .and_then(|_| f.rewind())
        .and_then(|_| writeln!(f, "{} {command}", std::process::id()))
        .with_context(|| format!("writing {}", path.display()))
}

/// The PID written in a lock file, or `unknown`.
fn holder(f: &File) -> String {
    let mut s = String::new();
    let mut r = f;
    let _ = r.rewind();
    let _ = r.take(64).read_to_string(&mut s);
    match s.split_whitespace().next() {
        Some(p) if p.parse::<u32>().is_ok() => p.to_string(),
        _ => "unknown".to_string(),
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing the directory {}", dir.display()))
}

/// Writes `dir/name` atomically: a fresh temporary file created exclusively and never through
/// a symlink (`O_CREAT|O_EXCL|O_NOFOLLOW`, a unique name), fsync, rename, fsync of `dir`.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let path = dir.join(name);
    let mut attempt = 0;
    let (tmp, mut f) = loop {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!(
            ".{name}.{}.{seq}.{nanos:08x}.tmp",
            std::process::id()
        ));
        let r = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp);
        match r {
            Ok(f) => break (tmp, f),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 16 => attempt += 1,
            Err(e) => return Err(e).with_context(|| format!("creating {}", tmp.display())),
        }
    };
    let written = f
        .write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))
        .and_then(|_| {
            std::fs::rename(&tmp, &path)
                .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
        });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    sync_dir(dir)
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Parses lower- or upper-case hex.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests;
