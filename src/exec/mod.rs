//! Running the legacy iptables binaries safely: [`lookup`] finds a binary only where root alone
//! can change it, [`child`] runs it with an argument vector (never a shell), optional stdin, a
//! clean environment, a deadline that covers the whole process group and its pipes, and a
//! failure test on the exit status and the tool's own error stream.
//!
//! Binaries are looked up only in trusted directories of `$PATH` (absolute, owned by root, not
//! writable by group or others; `/usr/sbin:/usr/bin:/sbin:/bin` when `PATH` is unset), and the
//! binary itself — every symlink hop to its final target — must be just as trusted: masqd runs
//! them as root.

pub mod child;
pub mod lookup;

pub use child::{reported_error, run, ExecError, Output, DEFAULT_TIMEOUT, PASSED_ENV};
pub use lookup::{find_binary, find_in, trusted_binary, trusted_dir, SAFE_PATH};

/// Helpers of the unit tests of both halves: scripts in a directory of their own.
#[cfg(test)]
mod testutil {
    use std::os::unix::fs::PermissionsExt;
    use std::path::{Path, PathBuf};

    /// An executable `#!/bin/sh` script `name` in `dir` running `body`.
    pub fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    /// A fresh directory (mode 0755) for one test.
    pub fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("masqd-exec-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        d
    }
}
