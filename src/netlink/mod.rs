//! The pure netlink layer (NETLINK_NETFILTER): attributes, message headers, batches, the
//! parser of kernel replies and change notifications; [`socket`] is the only part holding an fd.
//!
//! Written by hand because rustables 0.9 has no element dump, no set-element flags, no way to
//! put a raw (recorded) expression list back, no generation id on a batch and no per-message
//! error context; its object encoders (table, chain, set) are spliced into our batches by
//! [`Transaction::add_objects`]. Layouts follow `linux/netlink.h` and
//! `linux/netfilter/nfnetlink.h`. Everything but [`socket`] works on bytes only, so it is
//! tested (golden bytes, the reply parser, batch chunking) without root.

pub mod attr;
pub mod batch;
pub mod event;
pub mod message;
pub mod reply;
pub mod socket;

use std::io;

pub use attr::{Attr, Attrs, Writer};
pub use batch::{Transaction, MAX_NEST};
pub use event::Event;
pub use message::{split, Msg, RawMsg, NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE};
pub use socket::{
    DumpRestart, Socket, DUMP_ATTEMPTS, DUMP_DEADLINE, DUMP_RESTART, REQUEST_DEADLINE,
};

pub(crate) use event::event_of;
pub(crate) use message::to_msg;
pub(crate) use reply::{parse_error, DumpReader, DumpStep};

/// `ERESTART`: the ruleset generation changed between observe and apply.
pub const ERESTART: i32 = 85;

/// An error talking to the kernel, with the request it concerned.
#[derive(Debug, thiserror::Error)]
pub enum NlError {
    /// A socket call failed.
    #[error("{what}: {source}")]
    Io {
        /// The operation.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The kernel refused a request.
    #[error("kernel refused `{what}`: {}{}", io::Error::from_raw_os_error(*errno), ext.as_ref().map(|m| format!(" ({m})")).unwrap_or_default())]
    Kernel {
        /// The request, in nft syntax.
        what: String,
        /// errno.
        errno: i32,
        /// The kernel's extended-ack message, if any.
        ext: Option<String>,
    },
    /// The kernel's answer could not be parsed.
    #[error("malformed netlink answer: {0}")]
    Malformed(String),
    /// Every run of a dump was interrupted by concurrent ruleset changes (`NLM_F_DUMP_INTR`).
    #[error(
        "`{what}`: the ruleset changed during each of {attempts} attempts to read it \
         (another program is committing nftables changes without pause); giving up"
    )]
    Interrupted {
        /// The dump, in nft syntax.
        what: String,
        /// How many times it was run.
        attempts: u32,
    },
}

impl NlError {
    /// The errno of a kernel refusal.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NlError::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// Runs bytes through every parser of kernel answers (datagram splitting, the dump reader,
/// error replies, change notifications, attributes): the fuzz harness's entry. Never panics.
#[doc(hidden)]
pub fn fuzz_datagram(datagram: &[u8]) {
    let Ok(msgs) = split(datagram) else { return };
    let mut reader = DumpReader::new(msgs.first().map(|m| m.seq).unwrap_or(0), "fuzz");
    for m in msgs {
        let _ = parse_error(&m);
        let _ = event_of(&m);
        if let Ok(msg) = to_msg(m.clone()) {
            walk_attrs(msg.attrs(), 0);
        }
        if !matches!(reader.feed(m), Ok(DumpStep::More)) {
            break;
        }
    }
}

/// Reads every attribute and every nest, as deep as it goes (bounded).
fn walk_attrs(attrs: Attrs<'_>, depth: usize) {
    for a in attrs {
        let _ = (a.be32(), a.be64(), a.str());
        if depth < 16 {
            walk_attrs(a.nested(), depth + 1);
        }
    }
}

#[cfg(test)]
mod tests;
