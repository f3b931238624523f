//! masqd: owns the pod-network masquerade policy of a Linux node.
//!
//! Pipeline: [`config`] → [`policy`] (pure) → [`detect`] chooses the drivers of [`backend`] →
//! each driver observes, plans (pure) and applies its changes as one transaction. [`engine`]
//! strings them together for the one-shot commands ([`cli`]) and the daemon ([`daemon`]);
//! [`netlink`] is the socket-free netlink layer plus the one socket; [`control`] is the
//! daemon's control socket, which `status` and `plan` ask first.
pub mod backend;
pub mod check;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod detect;
pub mod engine;
pub mod exec;
pub mod explain;
pub mod foreign;
pub mod logging;
pub mod metrics;
pub mod netlink;
pub mod policy;
pub mod state;
pub mod systemd;
