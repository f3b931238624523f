//! Running the legacy iptables binaries: an argument vector (never a shell), optional stdin,
//! a timeout on every call, and output checks that treat "exit 0 but an error printed" as the
//! failure it is.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Default bound on every binary call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// Did not finish in time (it was killed).
    #[error("{cmd}: no answer within {timeout:?}; killed")]
    Timeout {
        /// Command line.
        cmd: String,
        /// The bound.
        timeout: Duration,
    },
    /// Exited non-zero, or exited 0 while reporting an error.
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

/// Finds `name` in the directories of `$PATH` (no `which`, no shell).
pub fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn display(prog: &Path, args: &[&str]) -> String {
    let mut s = prog.display().to_string();
    for a in args {
        s.push(' ');
        s.push_str(a);
    }
    s
}

/// Runs `prog args…`, feeding `stdin`, killing it after `timeout`. Exit 0 is required, and an
/// output that reports an error (`incompatible`, `error`, `Fatal`, `can't initialize`…) counts as
/// a failure even with exit 0.
pub fn run(
    prog: &Path,
    args: &[&str],
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<Output, ExecError> {
    let cmd = display(prog, args);
    let mut child = Command::new(prog)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("LC_ALL", "C")
        .spawn()
        .map_err(|source| ExecError::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
    let writer = match (stdin, child.stdin.take()) {
        (Some(data), Some(mut pipe)) => {
            let data = data.to_vec();
            Some(std::thread::spawn(move || {
                let _ = pipe.write_all(&data);
            }))
        }
        _ => None,
    };
    let mut out_pipe = child.stdout.take();
    let mut err_pipe = child.stderr.take();
    let out_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(p) = out_pipe.as_mut() {
            let _ = p.read_to_end(&mut s);
        }
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(p) = err_pipe.as_mut() {
            let _ = p.read_to_end(&mut s);
        }
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            Ok(None) | Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(ExecError::Timeout { cmd, timeout });
            }
        }
    };
    if let Some(w) = writer {
        let _ = w.join();
    }
    let stdout = String::from_utf8_lossy(&out_reader.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned();
    if !status.success() {
        return Err(ExecError::Failed {
            cmd,
            why: format!("exited with {status}"),
            stderr: stderr.trim().to_string(),
        });
    }
    if let Some(line) = reported_error(&stdout, &stderr) {
        return Err(ExecError::Failed {
            cmd,
            why: "exited 0 but reported an error".into(),
            stderr: line,
        });
    }
    Ok(Output { stdout, stderr })
}

/// The first line of output that reports an error, if any. On stdout only `#` comment lines
/// (where iptables-save reports `Table … is incompatible`) and lines that are not save syntax
/// count; on stderr any line with an error word. Warnings about *other* backends' tables being
/// present (`# Warning: iptables-legacy tables present`) are not errors.
pub fn reported_error(stdout: &str, stderr: &str) -> Option<String> {
    const BAD: [&str; 6] = [
        "incompatible",
        "error",
        "fatal",
        "can't initialize",
        "permission denied",
        "not supported",
    ];
    let bad = |l: &str| {
        let low = l.to_ascii_lowercase();
        !low.contains("warning:") && BAD.iter().any(|b| low.contains(b))
    };
    let out = stdout.lines().map(str::trim).find(|l| {
        if l.is_empty() {
            return false;
        }
        if l.starts_with('#') {
            return bad(l);
        }
        !(l.starts_with('*')
            || l.starts_with(':')
            || l.starts_with('-')
            || l.starts_with('[')
            || *l == "COMMIT")
    });
    out.or_else(|| stderr.lines().map(str::trim).find(|l| bad(l)))
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("masqd-exec-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn exit_zero_with_error_output_is_a_failure() {
        let d = tmpdir("err");
        let p = script(
            &d,
            "save",
            "echo '# Table `nat'\"'\"' is incompatible, use '\"'\"'nft'\"'\"' tool.'; exit 0",
        );
        let e = run(&p, &[], None, DEFAULT_TIMEOUT).unwrap_err();
        assert!(e.to_string().contains("incompatible"), "{e}");
        let p = script(
            &d,
            "save2",
            "echo 'iptables-legacy-save: error while loading' >&2; exit 0",
        );
        assert!(matches!(
            run(&p, &[], None, DEFAULT_TIMEOUT),
            Err(ExecError::Failed { .. })
        ));
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn hanging_binary_times_out() {
        let d = tmpdir("hang");
        let p = script(&d, "hang", "exec sleep 30");
        let t = Instant::now();
        let e = run(&p, &[], None, Duration::from_millis(300)).unwrap_err();
        assert!(matches!(e, ExecError::Timeout { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(10));
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn stdin_and_args_are_passed_verbatim() {
        let d = tmpdir("echo");
        let p = script(&d, "cat", "printf -- '-%s|' \"$@\"; cat");
        let o = run(
            &p,
            &["a b", "$(id)", ";"],
            Some(b"payload"),
            DEFAULT_TIMEOUT,
        )
        .unwrap();
        assert_eq!(o.stdout, "-a b|-$(id)|-;|payload");
        let e = run(
            &script(&d, "fail", "echo nope >&2; exit 3"),
            &[],
            None,
            DEFAULT_TIMEOUT,
        )
        .unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        let _ = std::fs::remove_dir_all(d);
    }
}
