//! The bodies of masqd's one-shot commands (`apply`, `plan`, `status`, `teardown`, `detect`,
//! `export`, `check`, `explain`): what each prints and the exit code it returns. The binary
//! (`src/main.rs`) parses the command line and dispatches here; [`backend_calls`] holds every
//! call these commands make into the backends.

pub mod apply;
pub mod backend_calls;
pub mod check;
pub mod detect;
pub mod exit;
pub mod export;
pub mod teardown;

#[cfg(test)]
mod tests;

pub use exit::ExitClass;
