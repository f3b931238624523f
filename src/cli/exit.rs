//! masqd's exit codes and the classification of a failed command's error (what the message
//! says about it), by the error's type: the binary maps a class to its exit code.

use crate::backend::query;

/// Exit code of success (`plan`: nothing to change; `status`: in sync).
pub const OK: u8 = 0;
/// Exit code of a failed command.
pub const ERROR: u8 = 1;
/// Exit code of `plan` when changes are pending.
pub const CHANGES_PENDING: u8 = 2;
/// Exit code of `status` when the kernel does not match the policy.
pub const OUT_OF_SYNC: u8 = 3;
/// Exit code of a usage error (sysexits.h EX_USAGE), so that `plan`'s 2 means only "changes
/// pending".
pub const EX_USAGE: u8 = 64;

/// What kind of failure an error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitClass {
    /// masqd was refused for lack of privilege.
    Denied,
    /// Any other failure.
    Failed,
}

impl ExitClass {
    /// Classifies `e` by the types in its chain: EPERM/EACCES from a backend (netlink, a
    /// legacy binary that says so) or from the state directory (root's) is [`ExitClass::Denied`].
    /// A configuration file that cannot be read is a `ConfigError`, not one of these.
    pub fn of(e: &anyhow::Error) -> ExitClass {
        // The state directory and its locks belong to root.
        let denied = query::is_denied(e)
            || e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .and_then(std::io::Error::raw_os_error)
                    .is_some_and(is_denied)
            });
        if denied {
            ExitClass::Denied
        } else {
            ExitClass::Failed
        }
    }

    /// The exit code of the class (every failure exits 1).
    pub fn code(self) -> u8 {
        ERROR
    }
}

/// The one-line message of a failed command: the error chain, and for a refusal for lack of
/// privilege what masqd needs.
pub fn message(e: &anyhow::Error) -> String {
    let msg = format!("{e:#}");
    match ExitClass::of(e) {
        ExitClass::Denied => format!(
            "masqd needs root or CAP_NET_ADMIN (and CAP_NET_RAW for legacy iptables): {msg}"
        ),
        ExitClass::Failed => msg,
    }
}

/// EPERM or EACCES.
pub fn is_denied(errno: i32) -> bool {
    query::denied_errno(errno)
}
