//! The control socket of `masqd run`: where it lives, what travels over it, who may ask, and
//! whose answer a client accepts. `status` and `plan` ask it first ([`client`]); the daemon's
//! side is `daemon::control`.
//!
//! A Unix stream socket, mode 0600, root's: in the runtime directory (`$RUNTIME_DIRECTORY`
//! when systemd sets it, else `/run/masqd`) for the default state directory, else inside the
//! state directory given (`DIR/control.sock`), so that daemons of separate state directories
//! (the test suite runs several side by side, each in its own network namespace) never share
//! one. A state directory has one daemon at a time (`DIR/run.lock`), so the socket has one
//! owner. Peers whose `SO_PEERCRED` uid is not 0 are refused. One request and one answer, each
//! one JSON line (serde_json by hand rather than an RPC crate: two questions, one version
//! number). The daemon says which network namespace (the inode of `/proc/thread-self/ns/net`),
//! state directory and configuration file it serves; the client takes an answer only when all
//! three are its own.

pub mod client;
#[cfg(test)]
pub(crate) mod scratch;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The protocol version both sides speak.
pub const VERSION: u32 = 1;
/// The socket's file name.
pub const SOCKET_NAME: &str = "control.sock";
/// The runtime directory without systemd (the unit's `RuntimeDirectory=masqd`).
pub const DEFAULT_RUNTIME_DIR: &str = "/run/masqd";
/// The longest request the daemon reads (a request is a few dozen bytes).
pub const MAX_REQUEST: usize = 4096;
/// Longest path a `sockaddr_un` holds (108 bytes with the NUL).
const MAX_SUN_PATH: usize = 107;

/// What a client asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Command {
    /// `masqd status`.
    Status,
    /// `masqd plan`.
    Plan,
}

/// One request line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// [`VERSION`].
    pub version: u32,
    /// The question.
    pub command: Command,
    /// `status --json`.
    #[serde(default)]
    pub json: bool,
}

/// Who answered, as the daemon describes itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonInfo {
    /// The daemon's process id.
    pub pid: u32,
    /// Its network namespace: the inode of `/proc/thread-self/ns/net`.
    pub netns: u64,
    /// Its state directory (canonical).
    pub state_dir: PathBuf,
    /// Its configuration file (canonical when it exists).
    pub config: PathBuf,
    /// Its last reconcile, as STATUS= shows it (`14:02:07Z in sync`, `… applied 2 change(s)
    /// (nftables change)`, `… failed: …`, `none yet`).
    pub last_reconcile: String,
    /// A reconcile was owed when it answered (backoff after a failure, or the repair rate
    /// limit): the answer then comes from reading the kernel's sets back, not the mirror.
    pub reconcile_pending: bool,
    /// Whether masqd's sets came from the daemon's mirror (no dump of their elements).
    pub sets_from_mirror: bool,
    /// A reload that was refused: the daemon keeps its last good configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_error: Option<String>,
}

/// One answer line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    /// Who answered (absent when refused before anything else).
    #[serde(default)]
    pub daemon: Option<DaemonInfo>,
    /// Why there is no answer (refused, unknown request, a failed read of the kernel).
    #[serde(default)]
    pub error: Option<String>,
    /// The command's exit code.
    #[serde(default)]
    pub exit: u8,
    /// What the command prints on stdout.
    #[serde(default)]
    pub stdout: String,
}

impl Answer {
    /// An answer that only says why not.
    pub fn refusal(daemon: Option<DaemonInfo>, why: String) -> Answer {
        Answer {
            daemon,
            error: Some(why),
            exit: crate::cli::exit::ERROR,
            stdout: String::new(),
        }
    }
}

/// The runtime directory of the daemon: the first entry of `$RUNTIME_DIRECTORY` (systemd's
/// `RuntimeDirectory=`) when `env` has it, else [`DEFAULT_RUNTIME_DIR`].
pub fn runtime_dir(env: Option<&str>) -> PathBuf {
    env.and_then(|v| v.split(':').find(|s| !s.is_empty()))
        .map_or_else(|| PathBuf::from(DEFAULT_RUNTIME_DIR), PathBuf::from)
}

/// Where the control socket of the daemon of `state_dir` is: in `runtime` for the default
/// state directory, else in the state directory itself.
pub fn socket_path(state_dir: &Path, runtime: &Path) -> PathBuf {
    if state_dir == Path::new(crate::state::DEFAULT_STATE_DIR) {
        runtime.join(SOCKET_NAME)
    } else {
        state_dir.join(SOCKET_NAME)
    }
}

/// Whether `path` fits a `sockaddr_un`; the error names it.
pub fn check_path_len(path: &Path) -> Result<(), String> {
    let n = path.as_os_str().len();
    if n > MAX_SUN_PATH {
        return Err(format!(
            "{}: {n} bytes, longer than a unix socket address holds ({MAX_SUN_PATH})",
            path.display()
        ));
    }
    Ok(())
}

/// Whether a peer of uid `uid` may ask: root only (the answers show the node's NAT rules, and
/// a question costs the daemon kernel reads).
pub fn admit(uid: u32) -> Result<(), String> {
    if uid == 0 {
        Ok(())
    } else {
        Err(format!(
            "refused: masqd's control socket answers root only (peer uid {uid})"
        ))
    }
}

/// The network namespace of the calling thread: the inode of `/proc/thread-self/ns/net`
/// (`/proc/self/ns/net` on kernels before 3.17).
pub fn netns_inode() -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/thread-self/ns/net")
        .or_else(|_| std::fs::metadata("/proc/self/ns/net"))
        .map(|m| m.ino())
}

/// A path as both sides compare it: canonical when it exists, else as given.
pub fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Why a client does not take `info`'s answer, if it does not: another network namespace,
/// state directory or configuration file than the client's (`netns`, `state_dir`, `config`).
pub fn mismatch(info: &DaemonInfo, netns: u64, state_dir: &Path, config: &Path) -> Option<String> {
    if info.netns != netns {
        return Some(format!(
            "the daemon (pid {}) serves another network namespace (net:[{}], this one is \
             net:[{netns}])",
            info.pid, info.netns
        ));
    }
    if info.state_dir != canonical(state_dir) {
        return Some(format!(
            "the daemon (pid {}) serves the state directory {}",
            info.pid,
            info.state_dir.display()
        ));
    }
    if info.config != canonical(config) {
        return Some(format!(
            "the daemon (pid {}) runs with the configuration {}, not {}",
            info.pid,
            info.config.display(),
            config.display()
        ));
    }
    None
}

/// The line of `masqd status` (text) naming the daemon that answered.
pub fn answered_by(info: &DaemonInfo) -> String {
    let mut s = format!(
        "answered by:          masqd run (pid {}), last reconcile {}",
        info.pid, info.last_reconcile
    );
    if info.reconcile_pending {
        s.push_str("; a reconcile is pending (sets read back from the kernel)");
    }
    if let Some(e) = &info.config_error {
        s.push_str(&format!("; config error (keeping the last good one): {e}"));
    }
    s
}
