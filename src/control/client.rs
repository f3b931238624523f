//! The client of the control socket (`masqd status`, `masqd plan`): one request line, one
//! answer line, bounded in time and size; an answer is taken only from the daemon of this
//! network namespace, state directory and configuration file.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{mismatch, netns_inode, socket_path, Answer, Request};

/// How long a client waits for the answer: the daemon answers once no reconcile runs (an
/// apply of 1,000,000 exceptions from empty takes ~2.5 s on an idle node, far longer on a
/// loaded one, and giving up means a dump of a minute or more instead).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest answer read (a `plan` of 1,000,000 elements is some 40 MB of text).
const MAX_ANSWER: u64 = 512 << 20;

/// Where the commands look for the daemon of `state_dir`: [`socket_path`] with
/// [`super::DEFAULT_RUNTIME_DIR`] (the unit's `RuntimeDirectory=masqd`).
pub fn path_for(state_dir: &Path) -> PathBuf {
    socket_path(state_dir, &super::runtime_dir(None))
}

/// Sends `req` on the socket at `path` and reads the answer (within `timeout`). The error says
/// why there is no usable answer, for the one line the command prints before reading the
/// kernel itself.
pub fn ask_at(path: &Path, req: &Request, timeout: Duration) -> Result<Answer, String> {
    let mut s = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e) => {
            return Err(match e.raw_os_error() {
                Some(libc::ENOENT | libc::ECONNREFUSED) => {
                    "no running masqd daemon for this state directory".to_string()
                }
                _ => format!("the control socket {}: {e}", path.display()),
            })
        }
    };
    let io = |e: std::io::Error| format!("the control socket {}: {e}", path.display());
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_string(req).map_err(|e| e.to_string())?;
    line.push('\n');
    // A refusal may come (and the socket close) before the request is written: read it.
    let written = s.write_all(line.as_bytes());
    let mut buf = Vec::new();
    let read = BufReader::new(s.take(MAX_ANSWER)).read_until(b'\n', &mut buf);
    if buf.is_empty() {
        written.map_err(io)?;
    }
    read.map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => format!(
            "the running daemon did not answer within {} s",
            timeout.as_secs()
        ),
        _ => io(e),
    })?;
    if buf.is_empty() {
        return Err(format!(
            "the control socket {} closed without an answer",
            path.display()
        ));
    }
    serde_json::from_slice(&buf)
        .map_err(|e| format!("an unreadable answer on {}: {e}", path.display()))
}

/// Asks the daemon of `state_dir` (running with `config`) and checks who answered: the answer
/// of another network namespace, state directory or configuration is refused, and so is an
/// answer that is an error.
pub fn ask(state_dir: &Path, config: &Path, req: &Request) -> Result<Answer, String> {
    let path = path_for(state_dir);
    let a = ask_at(&path, req, ANSWER_TIMEOUT)?;
    let own_ns = netns_inode().map_err(|e| format!("reading /proc/thread-self/ns/net: {e}"))?;
    if let Some(info) = &a.daemon {
        if let Some(why) = mismatch(info, own_ns, state_dir, config) {
            return Err(why);
        }
    }
    if let Some(e) = &a.error {
        return Err(format!("the running daemon did not answer: {e}"));
    }
    if a.daemon.is_none() {
        return Err("an answer without the daemon's identity".into());
    }
    Ok(a)
}
