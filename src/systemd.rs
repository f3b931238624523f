//! The old path of sd_notify(3) and the watchdog helpers, which live in [`crate::daemon::notify`].

pub use crate::daemon::notify::{monotonic_usec, one_line, watchdog_interval, Notifier};
