//! The bodies of masqd's one-shot commands (`apply`, `plan`, `status`, `teardown`, `detect`,
//! `export`, `check`, `explain`): what each prints and the exit code it returns. The binary
//! (`src/main.rs`) parses the command line and dispatches here. The commands reach the kernel
//! only through [`crate::engine`] and [`crate::backend::query`]; [`backend_calls`] holds the
//! reads the engine does not make whole (`plan`, `detect`, `export`).

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
