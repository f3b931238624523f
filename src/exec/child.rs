//! Running one child process: an argument vector (never a shell), optional stdin, a clean
//! environment, a deadline that covers the whole process group and its pipes, bounded waiting
//! on every pipe, and a failure test on the exit status and the tool's own error stream.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::lookup::SAFE_PATH;

/// Default bound on every binary call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The only variables of masqd's environment a child sees (besides PATH and LC_ALL): the
/// xtables lock file every iptables user must share (the unit sets it), and where the
/// iptables extensions live when the distribution moved them.
pub const PASSED_ENV: [&str; 2] = ["XTABLES_LOCKFILE", "XTABLES_LIBDIR"];

/// A binary call that failed.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// Could not start the program.
    #[error("{cmd}: cannot run: {source}")]
    Spawn {
        /// Command line, for the message.
        cmd: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Did not finish in time (its process group was killed).
    #[error("{cmd}: no answer within {timeout:?} ({why}); killed")]
    Timeout {
        /// Command line.
        cmd: String,
        /// The bound.
        timeout: Duration,
        /// What was still running or open.
        why: String,
    },
    /// Exited non-zero, or exited 0 while reporting an error on stderr.
    #[error("{cmd}: {why}: {stderr}")]
    Failed {
        /// Command line.
        cmd: String,
        /// Exit status or the reason the output was refused.
        why: String,
        /// What it printed on stderr (trimmed).
        stderr: String,
    },
}

/// What a successful call printed.
#[derive(Debug, Clone, Default)]
pub struct Output {
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}
fn display(prog: &Path, args: &[&str]) -> String {
    let mut s = prog.display().to_string();
    for a in args {
        s.push(' ');
        s.push_str(a);
    }
    s
}

/// Spawns `command`, again (up to 5 times, 10 ms apart) while exec fails with ETXTBSY: the
/// binary is still open for writing somewhere for a moment, as when a package upgrade replaces
/// it, or a file written by one thread is inherited open by a child another thread forks just
/// then.
fn spawn(command: &mut Command) -> std::io::Result<std::process::Child> {
    let mut attempt = 0;
    loop {
        match command.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && attempt < 4 => {
                attempt += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            r => return r,
        }
    }
}

/// Runs `prog args…` in a process group of its own with a clean environment (`PATH=`
/// [`SAFE_PATH`], `LC_ALL=C`, nothing else), feeding `stdin`. When the program exits, whatever
/// it left running in its group is killed; at `timeout` the whole group is killed, even when
/// only a leftover holds the output pipes open. Exit 0 is required, and an error reported on
/// stderr (`incompatible`, `error`, `Fatal`, `can't initialize`…) counts as a failure even with
/// exit 0; what the program printed on stdout (the rules, with their comments) never does.
pub fn run(
    prog: &Path,
    args: &[&str],
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<Output, ExecError> {
    let cmd = display(prog, args);
    let mut command = Command::new(prog);
    // No pre_exec hook: with one, std must fork() the whole daemon (its page tables copied,
    // ~10 ms at 60,000 exceptions) instead of posix_spawn. So a child of `masqd run` starts
    // with SIGHUP/SIGTERM/SIGINT blocked, as the daemon's threads have them
    // (daemon::block_signals); the legacy binaries rely on no signal, and the timeout below
    // kills their process group with SIGKILL, which cannot be blocked.
    command
        .args(args)
        .env_clear()
        .env("PATH", SAFE_PATH)
        .env("LC_ALL", "C")
        .envs(
            PASSED_ENV
                .iter()
                .filter_map(|k| std::env::var_os(k).map(|v| (*k, v))),
        )
        .process_group(0)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = spawn(&mut command).map_err(|source| ExecError::Spawn {
        cmd: cmd.clone(),
        source,
    })?;
    let mut io = Pipes::of(&mut child, stdin.unwrap_or_default());
    let pumped = io.pump(&child, Instant::now() + timeout);
    // The leader was only peeked at (WNOWAIT) so far: its group id stayed valid for killpg.
    let status = child.wait();
    if let Err(why) = pumped {
        return Err(ExecError::Timeout { cmd, timeout, why });
    }
    let status = status.map_err(|source| ExecError::Spawn {
        cmd: cmd.clone(),
        source,
    })?;
    let stdout = String::from_utf8_lossy(&io.out_buf).into_owned();
    let stderr = String::from_utf8_lossy(&io.err_buf).into_owned();
    if !status.success() {
        return Err(ExecError::Failed {
            cmd,
            why: format!("exited with {status}"),
            stderr: stderr.trim().to_string(),
        });
    }
    if let Some(line) = reported_error(&stderr) {
        return Err(ExecError::Failed {
            cmd,
            why: "exited 0 but reported an error".into(),
            stderr: line,
        });
    }
    Ok(Output { stdout, stderr })
}

/// The child's pipes, driven by one poll loop (no thread can be left blocked on them).
struct Pipes<'a> {
    stdin: Option<ChildStdin>,
    input: &'a [u8],
    out: Option<ChildStdout>,
    err: Option<ChildStderr>,
    out_buf: Vec<u8>,
    err_buf: Vec<u8>,
}

impl<'a> Pipes<'a> {
    fn of(child: &mut Child, input: &'a [u8]) -> Pipes<'a> {
        let p = Pipes {
            stdin: child.stdin.take(),
            input,
            out: child.stdout.take(),
            err: child.stderr.take(),
            out_buf: Vec::new(),
            err_buf: Vec::new(),
        };
        for fd in [
            p.stdin.as_ref().map(AsRawFd::as_raw_fd),
            p.out.as_ref().map(AsRawFd::as_raw_fd),
            p.err.as_ref().map(AsRawFd::as_raw_fd),
        ]
        .into_iter()
        .flatten()
        {
            set_nonblocking(fd);
        }
        p
    }

    /// Feeds stdin and drains stdout and stderr until the leader has exited and both output
    /// pipes are closed. Kills the group when the leader exits (leftovers) and at `deadline`
    /// (then returns what was still pending).
    fn pump(&mut self, child: &Child, deadline: Instant) -> Result<(), String> {
        let pgid = Pid::from_raw(child.id() as i32);
        let mut exited = false;
        loop {
            if !exited && leader_exited(pgid) {
                exited = true;
                self.stdin = None;
                let _ = killpg(pgid, Signal::SIGKILL);
            }
            if self.input.is_empty() {
                self.stdin = None;
            }
            if exited && self.out.is_none() && self.err.is_none() {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                let _ = killpg(pgid, Signal::SIGKILL);
                return Err(if exited {
                    "it exited, but a process outside its group kept its output open".into()
                } else {
                    "still running".into()
                });
            }
            let wait = (deadline - now).min(Duration::from_millis(if exited { 50 } else { 5 }));
            self.poll_once(wait);
        }
    }

    /// One `poll(2)` over the open pipes, then the reads and writes it allows.
    fn poll_once(&mut self, wait: Duration) {
        let fd = |f: Option<i32>, events| libc::pollfd {
            fd: f.unwrap_or(-1),
            events,
            revents: 0,
        };
        let mut fds = [
            fd(self.stdin.as_ref().map(AsRawFd::as_raw_fd), libc::POLLOUT),
            fd(self.out.as_ref().map(AsRawFd::as_raw_fd), libc::POLLIN),
            fd(self.err.as_ref().map(AsRawFd::as_raw_fd), libc::POLLIN),
        ];
        let ms = wait.as_millis().clamp(1, 1000) as libc::c_int;
        // SAFETY: `fds` is a valid array of 3 pollfd for the duration of the call; negative
        // fds are ignored by poll(2).
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n <= 0 {
            return;
        }
        if fds[0].revents != 0 {
            self.feed();
        }
        if fds[1].revents != 0 && drain(self.out.as_mut(), &mut self.out_buf) {
            self.out = None;
        }
        if fds[2].revents != 0 && drain(self.err.as_mut(), &mut self.err_buf) {
            self.err = None;
        }
    }

    fn feed(&mut self) {
        let Some(pipe) = self.stdin.as_mut() else {
            return;
        };
        match pipe.write(self.input) {
            Ok(n) => self.input = &self.input[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // EPIPE: it stopped reading; what it did is judged by its status.
            Err(_) => self.input = &[],
        }
    }
}

/// Reads what is available; true at end of file (or on an error other than "try again").
fn drain(pipe: Option<&mut impl Read>, buf: &mut Vec<u8>) -> bool {
    let Some(pipe) = pipe else {
        return true;
    };
    let mut chunk = [0u8; 65536];
    loop {
        match pipe.read(&mut chunk) {
            Ok(0) => return true,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
    }
}

fn set_nonblocking(fd: i32) {
    // SAFETY: plain fcntl(2) on a pipe fd this process owns.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
}

/// Whether the group leader has exited, without reaping it (`waitid(P_PID, …, WEXITED |
/// WNOHANG | WNOWAIT)`): while it is an unreaped zombie its PID, the group id, cannot be reused.
fn leader_exited(pid: Pid) -> bool {
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    !matches!(
        waitid(Id::Pid(pid), flags),
        Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::EINTR)
    )
}

/// The first line of stderr that reports an error, if any. Warnings (`# Warning: iptables-legacy
/// tables present`) are not errors. stdout is not read: it holds the rules, and a foreign
/// comment may say anything.
pub fn reported_error(stderr: &str) -> Option<String> {
    const BAD: [&str; 6] = [
        "incompatible",
        "error",
        "fatal",
        "can't initialize",
        "permission denied",
        "not supported",
    ];
    stderr
        .lines()
        .map(str::trim)
        .find(|l| {
            let low = l.to_ascii_lowercase();
            !low.contains("warning:") && BAD.iter().any(|b| low.contains(b))
        })
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::testutil::{script, tmpdir};

    fn alive(pid: i32) -> bool {
        // A leftover reparented to init may stay a zombie for a moment: that is not running.
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => !stat
                .rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z')),
            Err(_) => false,
        }
    }

    fn gone_soon(pid: i32) -> bool {
        let t = Instant::now();
        while alive(pid) {
            if t.elapsed() > Duration::from_secs(3) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    fn pid_in(f: &Path) -> i32 {
        std::fs::read_to_string(f).unwrap().trim().parse().unwrap()
    }

    #[test]
    fn only_error_lines_of_stderr_are_reported() {
        assert_eq!(reported_error(""), None);
        assert_eq!(
            reported_error("# Warning: iptables-legacy tables present, use iptables-legacy\n"),
            None
        );
        assert_eq!(
            reported_error("ok\n  iptables-restore: line 3 failed: Permission denied  \nmore"),
            Some("iptables-restore: line 3 failed: Permission denied".to_string())
        );
        assert_eq!(
            reported_error(
                "iptables-legacy-save v1.8.9: Table does not exist (do you need to insmod?)"
            ),
            None,
            "not one of the error words"
        );
        assert!(reported_error("can't initialize iptables table `nat'").is_some());
        assert!(reported_error("WARNING: error ignored").is_none());
    }

    #[test]
    fn exit_zero_with_an_error_on_stderr_is_a_failure() {
        let d = tmpdir("err");
        let p = script(
            &d,
            "save2",
            "echo 'iptables-legacy-save: error while loading' >&2; exit 0",
        );
        let e = run(&p, &[], None, DEFAULT_TIMEOUT).unwrap_err();
        assert!(matches!(e, ExecError::Failed { .. }), "{e}");
        assert!(e.to_string().contains("error while loading"), "{e}");
        let p = script(
            &d,
            "warn",
            "echo '# Warning: iptables-legacy tables present' >&2",
        );
        assert!(run(&p, &[], None, DEFAULT_TIMEOUT).is_ok());
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn words_in_the_printed_rules_are_not_errors() {
        let d = tmpdir("words");
        // What iptables-legacy-save prints for a comment holding a newline and "error".
        let body = "printf '*nat\\n-A POSTROUTING -m comment --comment \"x\\nerror y Fatal\" \
                    -j MASQUERADE\\n# Table incompatible\\nCOMMIT\\n'";
        let p = script(&d, "save", body);
        let o = run(&p, &[], None, DEFAULT_TIMEOUT).unwrap();
        assert!(o.stdout.contains("error y Fatal"), "{}", o.stdout);
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn hanging_binary_times_out_with_its_whole_group() {
        let d = tmpdir("hang");
        let pidf = d.join("pid");
        let p = script(
            &d,
            "hang",
            &format!("sleep 30 & echo $! > {}; exec sleep 30", pidf.display()),
        );
        let t = Instant::now();
        let e = run(&p, &[], None, Duration::from_millis(300)).unwrap_err();
        assert!(matches!(e, ExecError::Timeout { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert!(gone_soon(pid_in(&pidf)), "the grandchild was killed too");
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn a_leftover_holding_stdout_neither_hangs_the_call_nor_survives() {
        let d = tmpdir("leftover");
        let pidf = d.join("pid");
        let p = script(
            &d,
            "save",
            &format!("sleep 60 & echo $! > {}; echo done", pidf.display()),
        );
        let t = Instant::now();
        let o = run(&p, &[], None, Duration::from_secs(5)).unwrap();
        assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
        assert_eq!(o.stdout, "done\n");
        assert!(gone_soon(pid_in(&pidf)), "the leftover was killed");
        // One that leaves the group (setsid) cannot be killed, but cannot hang the call either.
        let escaped = d.join("escaped");
        let p = script(
            &d,
            "escape",
            &format!(
                "setsid sh -c 'echo $$ > {0}; exec sleep 60' &\n\
                 while [ ! -s {0} ]; do sleep 0.05; done; echo done",
                escaped.display()
            ),
        );
        let t = Instant::now();
        let e = run(&p, &[], None, Duration::from_secs(1)).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
        assert!(e.to_string().contains("kept its output open"), "{e}");
        let _ = nix::sys::signal::kill(Pid::from_raw(pid_in(&escaped)), Signal::SIGKILL);
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn stdin_and_args_are_passed_verbatim_in_a_clean_environment() {
        let d = tmpdir("echo");
        let p = script(&d, "cat", "printf -- '-%s|' \"$@\"; cat");
        let big = vec![b'x'; 1 << 20];
        let o = run(&p, &["a b", "$(id)", ";"], Some(&big), DEFAULT_TIMEOUT).unwrap();
        assert_eq!(o.stdout.len(), "-a b|-$(id)|-;|".len() + big.len());
        assert!(o.stdout.starts_with("-a b|-$(id)|-;|xxx"));
        let e = run(
            &script(&d, "fail", "echo nope >&2; exit 3"),
            &[],
            None,
            DEFAULT_TIMEOUT,
        )
        .unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        let o = run(&script(&d, "env", "env"), &[], None, DEFAULT_TIMEOUT).unwrap();
        let vars: Vec<&str> = o
            .stdout
            .lines()
            .filter_map(|l| l.split_once('=').map(|(k, _)| k))
            .filter(|k| !["PWD", "SHLVL", "_", "OLDPWD"].contains(k))
            .collect();
        assert_eq!(vars.len(), 2, "{}", o.stdout);
        assert!(
            o.stdout.contains(&format!("PATH={SAFE_PATH}\n")),
            "{}",
            o.stdout
        );
        assert!(o.stdout.contains("LC_ALL=C\n"), "{}", o.stdout);
        let _ = std::fs::remove_dir_all(d);
    }
}
