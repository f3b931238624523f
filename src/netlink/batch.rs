//! Batch (transaction) framing: BATCH_BEGIN with the generation id, the messages, BATCH_END;
//! rustables' object messages spliced in; large attribute lists chunked over messages.

use rustables::sys;

use super::attr::{align4, Writer};
use super::message::{
    nft_type, split, NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END, NLMSG_HDRLEN, NLM_F_ACK,
};

const NFNL_BATCH_GENID: u16 = 1;

/// Largest payload we put into one attribute nest (nla_len is 16 bits).
pub const MAX_NEST: usize = 60_000;

/// One nftables transaction: BATCH_BEGIN, messages, BATCH_END. The kernel applies all of it or
/// none of it.
#[derive(Debug)]
pub struct Transaction {
    w: Writer,
    next_seq: u32,
    /// What each message does, indexed by `seq - 1`, for error messages.
    what: Vec<String>,
}

impl Transaction {
    /// A new transaction. With `genid`, the kernel refuses it (ERESTART) if the ruleset changed
    /// since that generation was observed.
    pub fn new(genid: Option<u32>) -> Transaction {
        let mut w = Writer::default();
        w.begin(
            NFNL_MSG_BATCH_BEGIN,
            0,
            0,
            libc::AF_UNSPEC as u8,
            sys::NFNL_SUBSYS_NFTABLES as u16,
        );
        if let Some(g) = genid {
            w.put_be32(NFNL_BATCH_GENID, g);
        }
        w.end();
        Transaction {
            w,
            next_seq: 1,
            what: Vec::new(),
        }
    }

    /// Reserves room for `bytes` more bytes (one allocation for a large batch instead of a
    /// dozen doublings and copies).
    pub fn reserve(&mut self, bytes: usize) {
        self.w.buf.reserve(bytes);
    }

    /// Number of messages so far.
    pub fn len(&self) -> usize {
        self.what.len()
    }

    /// Whether no message was added.
    pub fn is_empty(&self) -> bool {
        self.what.is_empty()
    }

    /// Adds one nftables message of type `kind` (`NFT_MSG_*`), with ACK requested.
    pub fn message(
        &mut self,
        kind: u32,
        flags: u16,
        family: u8,
        what: impl Into<String>,
        body: impl FnOnce(&mut Writer),
    ) {
        self.begin_raw(kind, flags, family, what);
        body(&mut self.w);
        self.end_raw();
    }

    /// Starts a message to be written through [`Transaction::writer`] in several parts (the
    /// chunked element lists); finish it with [`Transaction::end_raw`].
    pub fn begin_raw(&mut self, kind: u32, flags: u16, family: u8, what: impl Into<String>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.w
            .begin(nft_type(kind), flags | NLM_F_ACK, seq, family, 0);
        self.what.push(what.into());
    }

    /// The writer of the message begun with [`Transaction::begin_raw`].
    pub fn writer(&mut self) -> &mut Writer {
        &mut self.w
    }

    /// Replaces the description of the last message.
    pub fn set_last_what(&mut self, what: String) {
        if let Some(w) = self.what.last_mut() {
            *w = what;
        }
    }

    /// Finishes a message begun with [`Transaction::begin_raw`].
    pub fn end_raw(&mut self) {
        self.w.end();
    }

    /// Splices the messages that rustables encodes into this transaction (their batch framing
    /// dropped, sequence numbers renumbered).
    pub fn add_objects(
        &mut self,
        what: impl Into<String>,
        build: impl FnOnce(&mut rustables::Batch),
    ) {
        let what = what.into();
        let mut batch = rustables::Batch::new();
        build(&mut batch);
        let bytes = batch.finalize();
        // rustables' own framing is well-formed (one header parser, [`split`], reads it); were
        // it not, nothing of it is added and the batch fails on the missing objects.
        let msgs = split(&bytes).unwrap_or_default();
        for m in msgs {
            if m.kind == NFNL_MSG_BATCH_BEGIN || m.kind == NFNL_MSG_BATCH_END {
                continue;
            }
            let seq = self.next_seq;
            self.next_seq += 1;
            let start = self.w.buf.len();
            let len = (NLMSG_HDRLEN + m.body.len()) as u32;
            self.w.buf.extend_from_slice(&len.to_ne_bytes());
            self.w.buf.extend_from_slice(&m.kind.to_ne_bytes());
            self.w.buf.extend_from_slice(&m.flags.to_ne_bytes());
            self.w.buf.extend_from_slice(&seq.to_ne_bytes());
            self.w.buf.extend_from_slice(&m.pid.to_ne_bytes());
            self.w.buf.extend_from_slice(&m.body);
            self.w.buf.resize(start + align4(len as usize), 0);
            self.what.push(what.clone());
        }
    }

    /// The complete batch bytes (with BATCH_END) and the message descriptions.
    pub fn finish(mut self) -> (Vec<u8>, Vec<String>) {
        let seq = self.next_seq;
        self.w.begin(
            NFNL_MSG_BATCH_END,
            0,
            seq,
            libc::AF_UNSPEC as u8,
            sys::NFNL_SUBSYS_NFTABLES as u16,
        );
        self.w.end();
        (self.w.into_bytes(), self.what)
    }
}

impl Transaction {
    /// Adds messages of type `kind` (`NFT_MSG_*`) carrying `items` in the nested list
    /// attribute `list_ty`, after the attributes `header` writes into each. A message's list is
    /// closed once it holds [`MAX_NEST`] bytes or more (an item is below 4 KiB, so a nest never
    /// reaches the 64 KiB that `nla_len` can express), and the next message takes the rest:
    /// every item lands in exactly one message, in order. `describe` names the items of one
    /// message for its error context.
    pub fn chunked_list<T>(
        &mut self,
        (kind, flags, family): (u32, u16, u8),
        list_ty: u16,
        header: impl Fn(&mut Writer),
        items: &[T],
        encode: impl Fn(&mut Writer, &T),
        describe: impl Fn(&[T]) -> String,
    ) {
        let mut i = 0;
        while i < items.len() {
            let first = i;
            self.begin_raw(kind, flags, family, String::new());
            let w = self.writer();
            header(w);
            let list = w.nest_begin(list_ty);
            while i < items.len() && w.nest_len(list) < MAX_NEST {
                encode(w, &items[i]);
                i += 1;
            }
            w.nest_end(list);
            self.end_raw();
            self.set_last_what(describe(&items[first..i]));
        }
    }
}
