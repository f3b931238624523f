//! The daemon's side of the control socket ([`crate::control`]): the listener (made at start,
//! a dead daemon's stale socket replaced, a live one's never taken, removed at exit), the peer
//! check, the questions read off the loop (bounded in time and size) and parked until no
//! reconcile runs or is due, and the answers computed on a blocking task from a snapshot of
//! what the daemon knows: its policy and the mirror of its sets, so that no set is dumped.
//! The request is read and the answer written with the stream's own `try_read`/`try_write`
//! loops rather than tokio's `io-util` (two loops; no further crate).

use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

use super::TARGET;
use crate::backend::{NftDriver, SetCache, Socket};
use crate::cli::apply::{change_lines, status_text};
use crate::cli::exit::{CHANGES_PENDING, OK, OUT_OF_SYNC};
use crate::config::BackendMode;
use crate::control::{self, Answer, Command, DaemonInfo, Request};
use crate::engine::{self, Paths};
use crate::policy::Policy;

/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// How long writing an answer may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Questions waiting for the loop at most; more are told the daemon is busy.
const MAX_WAITING: usize = 32;
/// How long after the last answer the heap is trimmed.
const TRIM_AFTER: Duration = Duration::from_secs(1);

/// A request read, with the connection to answer on.
pub(super) struct Question {
    stream: UnixStream,
    req: Request,
}

/// What the daemon knows when it answers, handed to the blocking task.
pub(super) struct Snapshot {
    /// The sets masqd committed last (the mirror), when the driver has them; taken by the
    /// answers.
    pub mirror: Option<SetCache>,
    /// No reconcile owed or running, every queued notification taken in: the mirror is the
    /// kernel's sets now.
    pub trusted: bool,
    pub policy: std::sync::Arc<Policy>,
    pub mode: BackendMode,
    pub last_reconcile: String,
    pub config_error: Option<String>,
}

/// The listener and the questions waiting for an answer.
pub(super) struct Control {
    /// The socket, its path, and its (device, inode) to remove only our own at exit.
    listener: Option<(UnixListener, PathBuf, (u64, u64))>,
    tx: mpsc::Sender<Question>,
    rx: mpsc::Receiver<Question>,
    parked: Vec<Question>,
    /// Batches of answers so far (the last one trims the heap).
    served: Arc<AtomicU64>,
    /// Who this daemon is: pid, network namespace, state directory, configuration.
    pid: u32,
    netns: u64,
    state_dir: PathBuf,
    config: PathBuf,
}

impl Control {
    /// Creates the socket of `paths.state_dir` (see [`control::socket_path`]); a failure is
    /// logged and the daemon runs without one (the commands then read the kernel themselves).
    pub fn open(paths: &Paths) -> Control {
        let runtime = control::runtime_dir(std::env::var("RUNTIME_DIRECTORY").ok().as_deref());
        let path = control::socket_path(&paths.state_dir, &runtime);
        let listener = match bind(&path) {
            Ok((l, id)) => {
                tracing::debug!(target: TARGET, "control socket {}", path.display());
                Some((l, path, id))
            }
            Err(e) => {
                tracing::error!(
                    target: TARGET,
                    "control socket {}: {e:#}; `masqd status` and `masqd plan` read the \
                     kernel themselves",
                    path.display()
                );
                None
            }
        };
        let (tx, rx) = mpsc::channel(MAX_WAITING);
        Control {
            listener,
            tx,
            rx,
            parked: Vec::new(),
            served: Arc::new(AtomicU64::new(0)),
            pid: std::process::id(),
            netns: control::netns_inode().unwrap_or(0),
            state_dir: control::canonical(&paths.state_dir),
            config: control::canonical(&paths.config),
        }
    }

    /// The next question read (never returns without a socket; cancel-safe). Connections are
    /// accepted here; each request is read on a task of its own, within [`READ_TIMEOUT`] and
    /// [`control::MAX_REQUEST`] bytes, so a slow client never holds the loop.
    pub async fn next(&mut self) -> Question {
        loop {
            let Some((l, _, _)) = &self.listener else {
                return std::future::pending().await;
            };
            tokio::select! {
                q = self.rx.recv() => {
                    if let Some(q) = q {
                        return q;
                    }
                }
                acc = l.accept() => match acc {
                    Ok((s, _)) => admit(s, self.tx.clone()),
                    Err(e) => {
                        tracing::warn!(target: TARGET, "control socket: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
    }

    /// Keeps `q` until the loop can answer it ([`Control::serve`]).
    pub fn park(&mut self, q: Question) {
        if self.parked.len() >= MAX_WAITING {
            let busy = Answer::refusal(None, "the daemon has too many questions waiting".into());
            tokio::spawn(reply(q.stream, busy));
            return;
        }
        self.parked.push(q);
    }

    /// Whether questions wait.
    pub fn waiting(&self) -> bool {
        !self.parked.is_empty()
    }

    /// Answers every waiting question from `snap`, on a blocking task (kernel reads: masqd's
    /// table and rules, the facts detection needs, the other NAT rules; the sets from the
    /// mirror), then writes the answers, each within [`WRITE_TIMEOUT`].
    pub fn serve(&mut self, snap: Snapshot) {
        let questions = std::mem::take(&mut self.parked);
        let info = DaemonInfo {
            pid: self.pid,
            netns: self.netns,
            state_dir: self.state_dir.clone(),
            config: self.config.clone(),
            last_reconcile: snap.last_reconcile.clone(),
            reconcile_pending: !snap.trusted,
            sets_from_mirror: false,
            config_error: snap.config_error.clone(),
        };
        let state_dir = self.state_dir.clone();
        let served = self.served.clone();
        let batch = served.fetch_add(1, Ordering::Relaxed) + 1;
        tokio::spawn(async move {
            let (streams, reqs): (Vec<_>, Vec<_>) =
                questions.into_iter().map(|q| (q.stream, q.req)).unzip();
            let n = reqs.len();
            let answers = tokio::task::spawn_blocking(move || {
                let mut snap = snap;
                let mut mirror = snap.mirror.take();
                let mut out = Vec::with_capacity(n);
                for (i, r) in reqs.iter().enumerate() {
                    // The last answer takes the mirror itself (one copy less of its sets).
                    let m = if i + 1 == n {
                        mirror.take()
                    } else {
                        mirror.clone()
                    };
                    out.push(answer(r, &snap, m, &state_dir, info.clone()));
                }
                out
            })
            .await
            .unwrap_or_else(|e| vec![Answer::refusal(None, format!("internal: {e}")); n]);
            for (s, a) in streams.into_iter().zip(answers) {
                reply(s, a).await;
            }
            // The copies are freed by now: given back once no question came for a while
            // (trimming after every answer would double the cost of a loop of questions).
            tokio::time::sleep(TRIM_AFTER).await;
            if served.load(Ordering::Relaxed) == batch {
                let _ = tokio::task::spawn_blocking(trim).await;
            }
        });
    }
}

impl Drop for Control {
    /// Removes the socket, when the path is still ours.
    fn drop(&mut self) {
        if let Some((_, path, id)) = &self.listener {
            let ours = std::fs::symlink_metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == *id);
            if ours {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// Makes the socket at `path`, mode 0600: its directory made (0700) when missing; a socket
/// file there that nobody answers on (a dead daemon's) replaced; one a live process answers
/// on, or anything not a socket, left alone (an error).
fn bind(path: &Path) -> Result<(UnixListener, (u64, u64))> {
    control::check_path_len(path).map_err(anyhow::Error::msg)?;
    if let Some(dir) = path.parent().filter(|d| !d.exists()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => bail!("exists and is not a socket; left alone"),
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => bail!("another process answers on it (a masqd daemon running); left alone"),
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                std::fs::remove_file(path).context("removing the stale socket")?;
                tracing::info!(target: TARGET, "replaced the stale control socket {}", path.display());
            }
            Err(e) => return Err(e).context("connecting to the socket already there"),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).context("looking at the path"),
    }
    let l = std::os::unix::net::UnixListener::bind(path).context("binding")?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).context("chmod 0600")?;
    let m = std::fs::symlink_metadata(path).context("looking at the socket")?;
    l.set_nonblocking(true).context("setting O_NONBLOCK")?;
    Ok((UnixListener::from_std(l)?, (m.dev(), m.ino())))
}

/// Checks the peer (root only) and reads its request on a task of its own.
fn admit(stream: UnixStream, tx: mpsc::Sender<Question>) {
    let uid = match stream.peer_cred() {
        Ok(c) => c.uid(),
        Err(e) => {
            tracing::warn!(target: TARGET, "control socket: SO_PEERCRED: {e}");
            return;
        }
    };
    if let Err(why) = control::admit(uid) {
        tracing::debug!(target: TARGET, "control socket: {why}");
        tokio::spawn(reply(stream, Answer::refusal(None, why)));
        return;
    }
    tokio::spawn(async move {
        let mut stream = stream;
        let read = tokio::time::timeout(READ_TIMEOUT, read_request(&mut stream)).await;
        let req = match read {
            Ok(Ok(req)) => req,
            Ok(Err(why)) => return reply(stream, Answer::refusal(None, why)).await,
            Err(_) => return,
        };
        if let Err(mpsc::error::TrySendError::Full(q)) = tx.try_send(Question { stream, req }) {
            let busy = Answer::refusal(None, "the daemon has too many questions waiting".into());
            reply(q.stream, busy).await;
        }
    });
}

/// Reads one request line (at most [`control::MAX_REQUEST`] bytes; what follows the first
/// newline is ignored).
async fn read_request(stream: &mut UnixStream) -> Result<Request, String> {
    let mut buf = vec![0u8; control::MAX_REQUEST];
    let mut len = 0;
    while len < buf.len() && !buf[..len].contains(&b'\n') {
        let err = |e: std::io::Error| format!("reading the request: {e}");
        stream.readable().await.map_err(err)?;
        match stream.try_read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(err(e)),
        }
    }
    let end = buf[..len]
        .iter()
        .position(|b| *b == b'\n')
        .map_or(len, |i| i + 1);
    parse_request(&buf[..end])
}

/// Writes all of `data`.
async fn write_all(stream: &mut UnixStream, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        stream.writable().await?;
        match stream.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One request line decoded; the error quotes what was wrong.
pub(super) fn parse_request(line: &[u8]) -> Result<Request, String> {
    if !line.ends_with(b"\n") {
        return Err(format!(
            "request line 1: no newline within {} bytes",
            control::MAX_REQUEST
        ));
    }
    let req: Request = serde_json::from_slice(line).map_err(|e| {
        let text = String::from_utf8_lossy(line);
        format!("request line 1: {e}: {:?}", text.trim_end())
    })?;
    if req.version != control::VERSION {
        return Err(format!(
            "request line 1: protocol version {}, this daemon speaks {}",
            req.version,
            control::VERSION
        ));
    }
    Ok(req)
}

/// Writes `a` as one line and closes.
async fn reply(mut stream: UnixStream, a: Answer) {
    let mut line = serde_json::to_vec(&a).unwrap_or_else(|_| b"{}".to_vec());
    line.push(b'\n');
    let _ = tokio::time::timeout(WRITE_TIMEOUT, write_all(&mut stream, &line)).await;
    // Dropping the stream closes it.
}

/// The answer to `req` (on the blocking task).
fn answer(
    req: &Request,
    snap: &Snapshot,
    mirror: Option<SetCache>,
    state_dir: &Path,
    mut info: DaemonInfo,
) -> Answer {
    match compute(req, snap, mirror, state_dir, &mut info) {
        Ok((exit, stdout)) => Answer {
            daemon: Some(info),
            error: None,
            exit,
            stdout,
        },
        Err(e) => Answer::refusal(Some(info), format!("{e:#}")),
    }
}

/// The nft driver of an answer: a socket of its own, with `mirror`. A trusted mirror is
/// taken as the kernel's sets whatever the generation (the daemon follows them from the
/// notifications, all taken in and nothing owed); an untrusted one only at its own
/// generation, as a reconcile takes it. Equals `nft list ruleset` (GETGEN). The second value:
/// whether the sets come from the mirror.
fn driver(trusted: bool, mut mirror: Option<SetCache>) -> Result<(NftDriver, bool)> {
    let mut sock = Socket::open().context("opening netlink")?;
    let from_mirror = match &mut mirror {
        Some(m) => {
            let now = crate::backend::genid(&mut sock)
                .context("reading the nftables ruleset generation")?;
            // A trusted mirror is what the daemon follows from the notifications.
            m.followed = trusted;
            trusted || m.genid == now
        }
        None => false,
    };
    Ok((NftDriver::new(sock, mirror), from_mirror))
}

/// The exit code and stdout of `req`. `status` equals [`engine::status`] (`nft list table inet
/// masqd` without its set elements, `iptables-legacy-save -c -t nat` per legacy family, `nft -a
/// list ruleset` filtered, the state file); `plan` equals [`crate::cli::backend_calls::plan`]
/// likewise.
fn compute(
    req: &Request,
    snap: &Snapshot,
    mirror: Option<SetCache>,
    state_dir: &Path,
    info: &mut DaemonInfo,
) -> Result<(u8, String)> {
    let (mut drv, from_mirror) = driver(snap.trusted, mirror)?;
    info.sets_from_mirror = from_mirror;
    match req.command {
        Command::Status => {
            let st = engine::status_with(&mut drv, state_dir, snap.mode, &snap.policy)?;
            let exit = if st.in_sync { OK } else { OUT_OF_SYNC };
            let out = if req.json {
                let v = WithDaemon {
                    status: &st,
                    daemon: info,
                };
                format!("{}\n", serde_json::to_string_pretty(&v)?)
            } else {
                format!("{}{}\n", status_text(&st), control::answered_by(info))
            };
            Ok((exit, out))
        }
        Command::Plan => {
            let detection = engine::detect_with(snap.mode, &snap.policy, &mut drv)?;
            let mut set = engine::drivers(&detection, &snap.policy, Box::new(&mut drv))?;
            let p = engine::plan_with(&mut set, detection)?;
            let mut lines = change_lines(&p, true);
            if lines.is_empty() {
                lines.push("# in sync: nothing to change".into());
            }
            lines.push(format!("# {}", plan_answered_by(info)));
            let exit = if p.is_empty() { OK } else { CHANGES_PENDING };
            Ok((exit, lines.join("\n") + "\n"))
        }
    }
}

/// Gives the copies the answers made (the policy, the mirror and the plan's sets: ~150 MB at
/// 1,000,000 exceptions) back to the kernel, so the idle daemon's resident size stays its
/// state. Equals `malloc_trim(0)`.
fn trim() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free heap memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The last line of `masqd plan` answered by the daemon.
fn plan_answered_by(info: &DaemonInfo) -> String {
    let line = control::answered_by(info);
    let rest = line.trim_start_matches("answered by:").trim_start();
    format!("answered by {rest}")
}

/// `status --json` with the daemon that answered.
#[derive(serde::Serialize)]
struct WithDaemon<'a> {
    #[serde(flatten)]
    status: &'a engine::Status,
    daemon: &'a DaemonInfo,
}

#[cfg(test)]
mod tests;
