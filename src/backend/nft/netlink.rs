//! A small nfnetlink (NETLINK_NETFILTER) layer: socket, message writer, attribute reader,
//! dumps, and one-transaction batches.
//!
//! Written by hand because rustables 0.9 has no element dump, no set-element flags, no way to
//! put a raw (recorded) expression list back, no generation id on a batch and no per-message
//! error context; its object encoders (table, chain, set) are spliced into our batches by
//! [`Transaction::add_objects`]. Layouts follow `linux/netlink.h` and
//! `linux/netfilter/nfnetlink.h`.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::sys::socket::{self, sockopt, MsgFlags, NetlinkAddr};
use rustables::sys;

const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_MULTI: u16 = 2;
/// Ask for an acknowledgement.
pub const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
/// Create the object.
pub const NLM_F_CREATE: u16 = 0x400;
/// Append (rules: at the end of the chain).
pub const NLM_F_APPEND: u16 = 0x800;
const NLM_F_DUMP_INTR: u16 = 16;
const NLM_F_CAPPED: u16 = 0x100;
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFNL_BATCH_GENID: u16 = 1;
/// `ERESTART`: the ruleset generation changed between observe and apply.
pub const ERESTART: i32 = 85;

/// Largest payload we put into one attribute nest (nla_len is 16 bits).
pub const MAX_NEST: usize = 60_000;

/// How long one request (`GETGEN`, a transaction's acknowledgements) may take in all, and
/// the longest a dump may wait for its next datagram. The kernel answers in micro- to
/// milliseconds.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// How long one dump may take in all, every restart included. Large, because a legitimate
/// answer can be slow: the kernel walks a chain from its start for every 32 KiB it sends, so
/// listing a 60,000-rule ruleset takes it 5-15 s (`nft list ruleset` as much).
pub const DUMP_DEADLINE: Duration = Duration::from_secs(120);
/// Runs of one dump before [`Socket::dump`] gives up on a ruleset that keeps changing.
pub const DUMP_ATTEMPTS: u32 = 16;

fn align4(n: usize) -> usize {
    n.saturating_add(3) & !3
}

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

/// One netlink attribute.
#[derive(Debug, Clone, Copy)]
pub struct Attr<'a> {
    /// Type, without the nested/byteorder flags.
    pub ty: u16,
    /// Payload.
    pub data: &'a [u8],
}

impl<'a> Attr<'a> {
    /// Big-endian u32 payload.
    pub fn be32(&self) -> Option<u32> {
        Some(u32::from_be_bytes(self.data.get(..4)?.try_into().ok()?))
    }
    /// Big-endian u64 payload.
    pub fn be64(&self) -> Option<u64> {
        Some(u64::from_be_bytes(self.data.get(..8)?.try_into().ok()?))
    }
    /// NUL-terminated string payload.
    pub fn str(&self) -> Option<&'a str> {
        let end = self
            .data
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.data.len());
        std::str::from_utf8(&self.data[..end]).ok()
    }
    /// Nested attributes.
    pub fn nested(&self) -> Attrs<'a> {
        Attrs(self.data)
    }
}

/// Iterator over a buffer of attributes; stops at the first malformed one.
#[derive(Debug, Clone, Copy)]
pub struct Attrs<'a>(pub &'a [u8]);

impl<'a> Iterator for Attrs<'a> {
    type Item = Attr<'a>;
    fn next(&mut self) -> Option<Attr<'a>> {
        if self.0.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([self.0[0], self.0[1]]) as usize;
        let ty = u16::from_ne_bytes([self.0[2], self.0[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > self.0.len() {
            self.0 = &[];
            return None;
        }
        let data = &self.0[4..len];
        let next = align4(len).min(self.0.len());
        self.0 = &self.0[next..];
        Some(Attr { ty, data })
    }
}

impl<'a> Attrs<'a> {
    /// The first attribute of type `ty`.
    pub fn get(self, ty: u16) -> Option<Attr<'a>> {
        self.into_iter().find(|a| a.ty == ty)
    }
}

/// A received nftables message.
#[derive(Debug, Clone)]
pub struct Msg {
    /// nft message type (`NFT_MSG_NEWRULE`, …), without the subsystem byte.
    pub kind: u16,
    /// nfgen family.
    pub family: u8,
    /// The attributes after the nfgenmsg header.
    pub payload: Vec<u8>,
}

impl Msg {
    /// The attributes of the message.
    pub fn attrs(&self) -> Attrs<'_> {
        Attrs(&self.payload)
    }
}

/// Writes netlink messages and attributes into a buffer.
#[derive(Debug, Default)]
pub struct Writer {
    buf: Vec<u8>,
    msg_start: usize,
}

impl Writer {
    /// Starts a message; `kind` is the full nlmsg_type.
    pub fn begin(&mut self, kind: u16, flags: u16, seq: u32, family: u8, res_id: u16) {
        self.msg_start = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf
            .extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        self.buf.extend_from_slice(&seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.push(family);
        self.buf.push(0); // NFNETLINK_V0
        self.buf.extend_from_slice(&res_id.to_be_bytes());
    }

    /// Finishes the message started last.
    pub fn end(&mut self) {
        let len = (self.buf.len() - self.msg_start) as u32;
        self.buf[self.msg_start..self.msg_start + 4].copy_from_slice(&len.to_ne_bytes());
    }

    /// Bytes written into the current message so far.
    pub fn msg_len(&self) -> usize {
        self.buf.len() - self.msg_start
    }

    /// Appends one attribute.
    pub fn put(&mut self, ty: u16, data: &[u8]) {
        let len = 4 + data.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.buf.resize(self.buf.len() + (align4(len) - len), 0);
    }

    /// Appends a NUL-terminated string attribute.
    pub fn put_str(&mut self, ty: u16, s: &str) {
        let mut v = Vec::with_capacity(s.len() + 1);
        v.extend_from_slice(s.as_bytes());
        v.push(0);
        self.put(ty, &v);
    }

    /// Appends a big-endian u32 attribute.
    pub fn put_be32(&mut self, ty: u16, v: u32) {
        self.put(ty, &v.to_be_bytes());
    }

    /// Appends a big-endian u64 attribute.
    pub fn put_be64(&mut self, ty: u16, v: u64) {
        self.put(ty, &v.to_be_bytes());
    }

    /// Appends already-encoded attributes verbatim.
    pub fn raw(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        self.buf.resize(align4(self.buf.len()), 0);
    }

    /// Opens a nested attribute; close it with [`Writer::nest_end`].
    pub fn nest_begin(&mut self, ty: u16) -> usize {
        let at = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        at
    }

    /// Closes a nested attribute.
    pub fn nest_end(&mut self, at: usize) {
        let len = (self.buf.len() - at) as u16;
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    /// Size of an open nest so far.
    pub fn nest_len(&self, at: usize) -> usize {
        self.buf.len() - at
    }

    /// The bytes written.
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
}

fn nft_type(kind: u32) -> u16 {
    ((sys::NFNL_SUBSYS_NFTABLES as u16) << 8) | kind as u16
}

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
        let mut off = 0;
        while off + NLMSG_HDRLEN <= bytes.len() {
            let len = u32::from_ne_bytes(bytes[off..off + 4].try_into().unwrap_or([0; 4])) as usize;
            if len < NLMSG_HDRLEN || off + len > bytes.len() {
                break;
            }
            let kind = u16::from_ne_bytes([bytes[off + 4], bytes[off + 5]]);
            if kind != NFNL_MSG_BATCH_BEGIN && kind != NFNL_MSG_BATCH_END {
                let seq = self.next_seq;
                self.next_seq += 1;
                let start = self.w.buf.len();
                self.w.buf.extend_from_slice(&bytes[off..off + len]);
                self.w.buf[start + 8..start + 12].copy_from_slice(&seq.to_ne_bytes());
                self.what.push(what.clone());
            }
            off += align4(len);
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

/// A NETLINK_NETFILTER socket.
#[derive(Debug)]
pub struct Socket {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

fn io_err(what: &str, e: nix::Error) -> NlError {
    NlError::Io {
        what: what.to_string(),
        source: io::Error::from_raw_os_error(e as i32),
    }
}

impl Socket {
    /// Opens and binds a socket in the calling thread's network namespace (what `nft` opens
    /// before any command).
    pub fn open() -> Result<Socket, NlError> {
        // SAFETY: plain socket(2); the fd is owned from here on.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_NETFILTER,
            )
        };
        if raw < 0 {
            return Err(NlError::Io {
                what: "opening a netfilter netlink socket".into(),
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: raw is a fresh, valid fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        socket::bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))
            .map_err(|e| io_err("binding the netlink socket", e))?;
        for opt in [libc::NETLINK_EXT_ACK, libc::NETLINK_CAP_ACK] {
            let one: libc::c_int = 1;
            // SAFETY: setsockopt with a pointer to a c_int of the right size.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_NETLINK,
                    opt,
                    &one as *const libc::c_int as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
        // Every wait for the kernel is a poll(2) bounded by the request's deadline.
        // Large dumps arrive faster than we parse: give the kernel room.
        let _ = socket::setsockopt(&fd, sockopt::RcvBufForce, &(4 << 20));
        Ok(Socket {
            fd,
            seq: 1_000,
            buf: vec![0; 256 * 1024],
        })
    }

    fn send(&self, bytes: &[u8], what: &str) -> Result<(), NlError> {
        let need = bytes.len() + 64 * 1024;
        let have = socket::getsockopt(&self.fd, sockopt::SndBuf).unwrap_or(0);
        if have < need {
            socket::setsockopt(&self.fd, sockopt::SndBufForce, &need)
                .or_else(|_| socket::setsockopt(&self.fd, sockopt::SndBuf, &need))
                .map_err(|e| io_err("growing the netlink send buffer", e))?;
        }
        let sent = socket::send(self.fd.as_raw_fd(), bytes, MsgFlags::empty())
            .map_err(|e| io_err(what, e))?;
        if sent != bytes.len() {
            return Err(NlError::Malformed(format!(
                "{what}: sent {sent} of {} bytes",
                bytes.len()
            )));
        }
        Ok(())
    }

    /// Waits for one datagram, [`REQUEST_DEADLINE`] at most and never past `end` (the
    /// exchange's total deadline, `total` after its start), and splits it into messages.
    fn recv_until(
        &mut self,
        what: &str,
        end: Instant,
        total: Duration,
    ) -> Result<Vec<RawMsg>, NlError> {
        let quiet_end = Instant::now() + REQUEST_DEADLINE;
        loop {
            let now = Instant::now();
            if now >= end || now >= quiet_end {
                let why = if now >= end {
                    format!(
                        "no complete answer from the kernel within {}s",
                        total.as_secs()
                    )
                } else {
                    format!(
                        "nothing from the kernel for {}s",
                        REQUEST_DEADLINE.as_secs()
                    )
                };
                return Err(NlError::Io {
                    what: format!("{what}: {why}"),
                    source: io::Error::from(io::ErrorKind::TimedOut),
                });
            }
            let left = end.min(quiet_end) - now;
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
            // SAFETY: poll(2) on one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, ms) } < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(NlError::Io {
                    what: format!("{what}: waiting for the kernel's answer"),
                    source: e,
                });
            }
            match socket::recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::MSG_DONTWAIT) {
                Ok(n) => {
                    return split(&self.buf[..n])
                        .map_err(|e| NlError::Malformed(format!("{what}: {e}")))
                }
                Err(nix::Error::EINTR | nix::Error::EAGAIN) => continue,
                Err(e) => return Err(io_err(&format!("{what}: receiving"), e)),
            }
        }
    }

    /// Throws away whatever an earlier exchange left unread (the rest of a dump abandoned on an
    /// error, acknowledgements of a transaction that failed early). Reading also lets the
    /// kernel finish a dump it still runs for this socket, which would otherwise refuse the
    /// next one with EBUSY.
    fn discard_stale(&mut self) {
        for _ in 0..1_000_000 {
            match socket::recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::MSG_DONTWAIT) {
                Ok(_) | Err(nix::Error::EINTR | nix::Error::ENOBUFS) => {}
                Err(_) => return,
            }
        }
    }

    /// Dumps all objects of `kind` (`NFT_MSG_GET*`) of `family`, with filter attributes.
    /// Equals the kernel side of `nft list …`. A run that the kernel flags `NLM_F_DUMP_INTR`
    /// (on any message, the final `NLMSG_DONE` included) is read to its end, thrown away and
    /// run again, [`DUMP_ATTEMPTS`] times at most, all within [`DUMP_DEADLINE`] (and never
    /// more than [`REQUEST_DEADLINE`] without a datagram).
    pub fn dump(
        &mut self,
        kind: u32,
        family: u8,
        what: &str,
        filter: impl Fn(&mut Writer),
    ) -> Result<Vec<Msg>, NlError> {
        let deadline = Instant::now() + DUMP_DEADLINE;
        for attempt in 1..=DUMP_ATTEMPTS {
            if let Some(msgs) = self.dump_once(kind, family, what, &filter, deadline)? {
                return Ok(msgs);
            }
            tracing::debug!("`{what}` interrupted by a concurrent change (run {attempt}); again");
            if (3..DUMP_ATTEMPTS).contains(&attempt) {
                // A burst of commits: give it a moment (1, 2, 4 … 20 ms) to pass.
                let pause =
                    Duration::from_millis(1 << (attempt - 3).min(5)).min(Duration::from_millis(20));
                let left = deadline.saturating_duration_since(Instant::now());
                std::thread::sleep(pause.min(left));
            }
        }
        Err(NlError::Interrupted {
            what: what.to_string(),
            attempts: DUMP_ATTEMPTS,
        })
    }

    /// One run of a dump; `None` when the kernel flagged it interrupted.
    fn dump_once(
        &mut self,
        kind: u32,
        family: u8,
        what: &str,
        filter: &impl Fn(&mut Writer),
        deadline: Instant,
    ) -> Result<Option<Vec<Msg>>, NlError> {
        self.discard_stale();
        self.seq = self.seq.wrapping_add(1).max(1_000);
        let seq = self.seq;
        let mut w = Writer::default();
        w.begin(nft_type(kind), NLM_F_DUMP | NLM_F_ACK, seq, family, 0);
        filter(&mut w);
        w.end();
        self.send(&w.into_bytes(), what)?;
        let mut reader = DumpReader::new(seq, what);
        loop {
            for m in self.recv_until(what, deadline, DUMP_DEADLINE)? {
                match reader.feed(m)? {
                    DumpStep::More => {}
                    DumpStep::Done(msgs) => return Ok(Some(msgs)),
                    DumpStep::Interrupted => return Ok(None),
                }
            }
        }
    }

    /// Sends a non-dump request (`NFT_MSG_GETGEN`…) and collects the answers up to the ACK,
    /// within [`REQUEST_DEADLINE`]. Equals the query `nft` makes before every command
    /// (`nft list ruleset` reads the generation the same way).
    pub fn request(
        &mut self,
        kind: u32,
        family: u8,
        what: &str,
        attrs: impl FnOnce(&mut Writer),
    ) -> Result<Vec<Msg>, NlError> {
        let deadline = Instant::now() + REQUEST_DEADLINE;
        self.discard_stale();
        self.seq = self.seq.wrapping_add(1).max(1_000);
        let seq = self.seq;
        let mut w = Writer::default();
        w.begin(nft_type(kind), NLM_F_ACK, seq, family, 0);
        attrs(&mut w);
        w.end();
        self.send(&w.into_bytes(), what)?;
        let mut out = Vec::new();
        loop {
            for m in self.recv_until(what, deadline, REQUEST_DEADLINE)? {
                if m.seq != seq {
                    continue;
                }
                if m.kind == NLMSG_ERROR {
                    let (errno, ext) = parse_error(&m)?;
                    if errno != 0 {
                        return Err(NlError::Kernel {
                            what: what.to_string(),
                            errno,
                            ext,
                        });
                    }
                    return Ok(out);
                }
                if m.kind != NLMSG_NOOP && m.kind != NLMSG_DONE {
                    out.push(to_msg(m)?);
                }
            }
        }
    }

    /// Sends a transaction and waits (within [`REQUEST_DEADLINE`] after the kernel took it)
    /// for the kernel's verdict on every message. On failure nothing of it was applied; the
    /// error names the first refused message. Equals `nft -f` of a file holding the same
    /// commands: one batch, all or nothing.
    pub fn commit(&mut self, txn: Transaction) -> Result<(), NlError> {
        if txn.is_empty() {
            return Ok(());
        }
        let (bytes, what) = txn.finish();
        let last = what.len() as u32;
        // Acknowledgements left over from an earlier transaction that ended early (an error on
        // the batch header, a timeout) carry the same sequence numbers: drop them first.
        self.discard_stale();
        // The kernel runs the whole batch inside send(2): the deadline starts after it.
        self.send(&bytes, "sending the transaction")?;
        let deadline = Instant::now() + REQUEST_DEADLINE;
        let mut answered = vec![false; what.len()];
        let mut remaining = what.len();
        let mut first_err: Option<NlError> = None;
        while remaining > 0 {
            let waiting = "waiting for the transaction's acknowledgements";
            for m in self.recv_until(waiting, deadline, REQUEST_DEADLINE)? {
                if m.kind != NLMSG_ERROR {
                    continue;
                }
                let (errno, ext) = parse_error(&m)?;
                if m.seq == 0 && errno != 0 {
                    // The batch header itself was refused (generation mismatch, no memory).
                    return Err(NlError::Kernel {
                        what: "transaction".to_string(),
                        errno,
                        ext,
                    });
                }
                if m.seq < 1 || m.seq > last {
                    continue;
                }
                let idx = (m.seq - 1) as usize;
                if !answered[idx] {
                    answered[idx] = true;
                    remaining -= 1;
                }
                if errno != 0 && first_err.is_none() {
                    first_err = Some(NlError::Kernel {
                        what: what[idx].clone(),
                        errno,
                        ext,
                    });
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
    /// The socket's fd (for polling).
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The port id the kernel gave this socket; nftables change notifications caused by our
    /// own transactions carry it as their `nlmsg_pid`.
    pub fn portid(&self) -> Result<u32, NlError> {
        let addr: NetlinkAddr = socket::getsockname(self.fd.as_raw_fd())
            .map_err(|e| io_err("getsockname on the netlink socket", e))?;
        Ok(addr.pid())
    }

    /// Joins (`on`) or leaves NFNLGRP_NFTABLES on the socket of `fd`. While no socket listens,
    /// the kernel does not build change notifications: a 60,000-interval transaction commits
    /// 2-4× faster.
    pub fn set_membership(fd: std::os::fd::RawFd, on: bool) -> Result<(), NlError> {
        let group: libc::c_int = libc::NFNLGRP_NFTABLES;
        let opt = if on {
            libc::NETLINK_ADD_MEMBERSHIP
        } else {
            libc::NETLINK_DROP_MEMBERSHIP
        };
        // SAFETY: setsockopt with a pointer to a c_int of the right size.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_NETLINK,
                opt,
                &group as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(NlError::Io {
                what: "changing the NFNLGRP_NFTABLES membership".into(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Opens a socket subscribed to NFNLGRP_NFTABLES, non-blocking. Equals `nft monitor`.
    pub fn monitor() -> Result<Socket, NlError> {
        let s = Socket::open()?;
        Socket::set_membership(s.fd.as_raw_fd(), true)?;
        let flags = nix::fcntl::fcntl(&s.fd, nix::fcntl::FcntlArg::F_GETFL)
            .map_err(|e| io_err("fcntl", e))?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&s.fd, nix::fcntl::FcntlArg::F_SETFL(flags))
            .map_err(|e| io_err("fcntl", e))?;
        Ok(s)
    }

    /// Drains the pending change notifications without blocking. Equals reading what
    /// `nft monitor` prints. Lost notifications (`ENOBUFS`: the receive buffer overflowed) and
    /// a datagram that cannot be split are reported as one [`Event::Overrun`] per call.
    pub fn drain_events(&mut self) -> Result<Vec<Event>, NlError> {
        let mut out = Vec::new();
        let mut overrun = false;
        loop {
            let n = match socket::recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::MSG_DONTWAIT) {
                Ok(n) => n,
                Err(nix::Error::EAGAIN) => break,
                Err(nix::Error::EINTR) => continue,
                Err(nix::Error::ENOBUFS) => {
                    overrun = true;
                    continue;
                }
                Err(e) => return Err(io_err("receiving nftables events", e)),
            };
            match split(&self.buf[..n]) {
                Ok(msgs) => out.extend(msgs.iter().filter_map(event_of)),
                Err(_) => overrun = true,
            }
        }
        if overrun {
            out.push(Event::Overrun);
        }
        Ok(out)
    }
}

/// The change notification a message from NFNLGRP_NFTABLES carries, if it is one.
pub(crate) fn event_of(m: &RawMsg) -> Option<Event> {
    if m.kind >> 8 != sys::NFNL_SUBSYS_NFTABLES as u16 || m.body.len() < NFGENMSG_LEN {
        return None;
    }
    // Attribute 1 is the table name in every table/chain/rule/set/element message.
    let table = Attrs(&m.body[NFGENMSG_LEN..])
        .get(1)
        .and_then(|a| a.str())
        .map(str::to_string);
    Some(Event::Change {
        kind: m.kind & 0xff,
        family: m.body[0],
        pid: m.pid,
        table,
    })
}

/// An nftables change notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A change: message type (`NFT_MSG_*`), family, sender port id, table name.
    Change {
        /// `NFT_MSG_NEWRULE`, `NFT_MSG_DELTABLE`, …
        kind: u16,
        /// nfgen family.
        family: u8,
        /// Port id of the socket that made the change.
        pid: u32,
        /// The table concerned (None for generation messages).
        table: Option<String>,
    },
    /// Notifications were lost (receive buffer overrun): anything may have changed.
    Overrun,
}

/// One netlink message as received: the header fields and the body after the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawMsg {
    /// nlmsg_type.
    pub kind: u16,
    /// nlmsg_flags.
    pub flags: u16,
    /// nlmsg_seq.
    pub seq: u32,
    /// nlmsg_pid (the sender's port id in notifications).
    pub pid: u32,
    /// Everything after the 16-byte header.
    pub body: Vec<u8>,
}

fn ne32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|x| x.try_into().ok())
        .map(u32::from_ne_bytes)
        .unwrap_or(0)
}

/// Splits one received datagram into its messages (what libmnl's `mnl_nlmsg_next` walks).
/// A length field that is shorter than a header or runs past the datagram is an error naming
/// it; trailing bytes too short for a header are ignored, as the kernel pads.
pub fn split(datagram: &[u8]) -> Result<Vec<RawMsg>, NlError> {
    let b = datagram;
    let mut out = Vec::new();
    let mut off = 0;
    while b.len() - off >= NLMSG_HDRLEN {
        let len = ne32(b, off) as usize;
        if len < NLMSG_HDRLEN || len > b.len() - off {
            return Err(NlError::Malformed(format!(
                "message length {len} at offset {off} of a {}-byte datagram",
                b.len()
            )));
        }
        out.push(RawMsg {
            kind: u16::from_ne_bytes([b[off + 4], b[off + 5]]),
            flags: u16::from_ne_bytes([b[off + 6], b[off + 7]]),
            seq: ne32(b, off + 8),
            pid: ne32(b, off + 12),
            body: b[off + NLMSG_HDRLEN..off + len].to_vec(),
        });
        off = (off + align4(len)).min(b.len());
    }
    Ok(out)
}

/// Where one dump's answer stands after another message.
#[derive(Debug)]
pub(crate) enum DumpStep {
    /// Not finished.
    More,
    /// Finished, consistent: the objects.
    Done(Vec<Msg>),
    /// Finished, but the kernel flagged a concurrent change (`NLM_F_DUMP_INTR`, on any of
    /// its messages): the answer is thrown away and the dump must run again.
    Interrupted,
}

/// The answer to one dump request, fed message by message: no socket, so that tests and the
/// fuzz harness can drive it with bytes.
#[derive(Debug)]
pub(crate) struct DumpReader {
    seq: u32,
    what: String,
    out: Vec<Msg>,
    interrupted: bool,
}

impl DumpReader {
    /// The reader of the answer to the request with sequence number `seq`, described by
    /// `what` (in nft syntax) in errors.
    pub fn new(seq: u32, what: &str) -> DumpReader {
        DumpReader {
            seq,
            what: what.to_string(),
            out: Vec::new(),
            interrupted: false,
        }
    }

    /// Takes the next message. Messages of other requests are ignored; a kernel error ends
    /// the dump with that error, unless the dump was interrupted (then it is run again).
    pub fn feed(&mut self, m: RawMsg) -> Result<DumpStep, NlError> {
        if m.seq != self.seq {
            return Ok(DumpStep::More);
        }
        self.interrupted |= m.flags & NLM_F_DUMP_INTR != 0;
        let end = match m.kind {
            NLMSG_DONE => Some(done_error(&m)?),
            NLMSG_ERROR => match parse_error(&m)? {
                (0, _) if m.flags & NLM_F_MULTI != 0 => None,
                (0, _) => Some(None),
                (errno, ext) => Some(Some((errno, ext))),
            },
            NLMSG_NOOP => None,
            _ => {
                if !self.interrupted {
                    self.out.push(to_msg(m)?);
                }
                None
            }
        };
        Ok(match end {
            None => DumpStep::More,
            Some(_) if self.interrupted => DumpStep::Interrupted,
            Some(Some((errno, ext))) => {
                return Err(NlError::Kernel {
                    what: self.what.clone(),
                    errno,
                    ext,
                })
            }
            Some(None) => DumpStep::Done(std::mem::take(&mut self.out)),
        })
    }
}

impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

fn to_msg(m: RawMsg) -> Result<Msg, NlError> {
    if m.body.len() < NFGENMSG_LEN {
        return Err(NlError::Malformed(format!(
            "a {}-byte message of type {:#x}, shorter than its nfgenmsg header",
            m.body.len(),
            m.kind
        )));
    }
    Ok(Msg {
        kind: m.kind & 0xff,
        family: m.body[0],
        payload: m.body[NFGENMSG_LEN..].to_vec(),
    })
}

/// The positive errno of the (zero or negative) error field netlink puts first in NLMSG_ERROR
/// and NLMSG_DONE bodies; anything else (a positive value, `i32::MIN`) is malformed.
fn errno_of(field: i32, kind: &str) -> Result<i32, NlError> {
    match field.checked_neg() {
        Some(e) if e >= 0 => Ok(e),
        _ => Err(NlError::Malformed(format!(
            "{kind} with error field {field} (the kernel sends 0 or a negative errno)"
        ))),
    }
}

/// The extended-ack message among the TLVs of an error or DONE body.
fn ext_msg(tlvs: &[u8]) -> Option<String> {
    Attrs(tlvs)
        .get(sys::NLMSGERR_ATTR_MSG as u16)
        .and_then(|a| a.str())
        .map(str::to_string)
}

/// The error that ends a dump, from its NLMSG_DONE: None for success.
fn done_error(m: &RawMsg) -> Result<Option<(i32, Option<String>)>, NlError> {
    let Some(field) = m.body.get(..4) else {
        return Ok(None); // an old kernel's DONE without the error field
    };
    let errno = errno_of(ne32(field, 0) as i32, "NLMSG_DONE")?;
    if errno == 0 {
        return Ok(None);
    }
    let ext = (m.flags & NLM_F_ACK_TLVS != 0)
        .then(|| ext_msg(&m.body[4..]))
        .flatten();
    Ok(Some((errno, ext)))
}

/// errno (positive, 0 for an acknowledgement) and extended-ack message of an NLMSG_ERROR.
pub(crate) fn parse_error(m: &RawMsg) -> Result<(i32, Option<String>), NlError> {
    let b = &m.body;
    if b.len() < 4 {
        return Err(NlError::Malformed(format!(
            "a {}-byte NLMSG_ERROR (at least 4 expected)",
            b.len()
        )));
    }
    let err = errno_of(ne32(b, 0) as i32, "NLMSG_ERROR")?;
    let mut ext = None;
    if m.flags & NLM_F_ACK_TLVS != 0 && b.len() >= 4 + NLMSG_HDRLEN {
        // With NETLINK_CAP_ACK the original header is echoed without its payload.
        let skip = if m.flags & NLM_F_CAPPED != 0 {
            4 + NLMSG_HDRLEN
        } else {
            4usize.saturating_add(align4(ne32(b, 4) as usize))
        };
        if let Some(tlvs) = b.get(skip..) {
            ext = ext_msg(tlvs);
        }
    }
    Ok((err, ext))
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
mod tests {
    use super::*;

    const NEWRULE: u16 = ((sys::NFNL_SUBSYS_NFTABLES as u16) << 8) | sys::NFT_MSG_NEWRULE as u16;

    /// One message's bytes: header, then `body` padded to 4.
    fn msg(kind: u16, flags: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes());
        v.extend_from_slice(&kind.to_ne_bytes());
        v.extend_from_slice(&flags.to_ne_bytes());
        v.extend_from_slice(&seq.to_ne_bytes());
        v.extend_from_slice(&77u32.to_ne_bytes());
        v.extend_from_slice(body);
        v.resize(align4(v.len()), 0);
        v
    }

    /// A NEWRULE body: nfgenmsg (inet) and a table-name attribute.
    fn rule_body(table: &str) -> Vec<u8> {
        let mut w = Writer::default();
        w.put_str(1, table);
        let mut b = vec![1, 0, 0, 0];
        b.extend(w.into_bytes());
        b
    }

    fn done(flags: u16, seq: u32, err: i32) -> Vec<u8> {
        msg(NLMSG_DONE, NLM_F_MULTI | flags, seq, &err.to_ne_bytes())
    }

    /// Feeds datagrams to a reader of sequence 5 until it finishes.
    fn run(datagrams: &[Vec<u8>]) -> Result<DumpStep, NlError> {
        let mut r = DumpReader::new(5, "list ruleset");
        for d in datagrams {
            for m in split(d)? {
                match r.feed(m)? {
                    DumpStep::More => {}
                    end => return Ok(end),
                }
            }
        }
        Ok(DumpStep::More)
    }

    #[test]
    fn clean_dump_collects_its_own_messages() {
        let mut d = msg(NEWRULE, NLM_F_MULTI, 5, &rule_body("a"));
        d.extend(msg(NEWRULE, NLM_F_MULTI, 4, &rule_body("stale")));
        d.extend(msg(NEWRULE, NLM_F_MULTI, 5, &rule_body("b")));
        match run(&[d, done(0, 5, 0)]).unwrap() {
            DumpStep::Done(m) => {
                let names: Vec<_> = m
                    .iter()
                    .map(|m| m.attrs().get(1).and_then(|a| a.str()).unwrap().to_string())
                    .collect();
                assert_eq!(names, ["a", "b"]);
                assert_eq!(m[0].family, 1);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn intr_on_the_final_done_alone_ends_the_run_as_interrupted() {
        // The case that made the reader wait 30 s for a second DONE.
        let d = msg(NEWRULE, NLM_F_MULTI, 5, &rule_body("a"));
        let step = run(&[d, done(NLM_F_DUMP_INTR, 5, 0)]).unwrap();
        assert!(matches!(step, DumpStep::Interrupted), "{step:?}");
    }

    #[test]
    fn intr_on_a_data_message_is_read_to_the_done_then_interrupted() {
        let first = msg(NEWRULE, NLM_F_MULTI | NLM_F_DUMP_INTR, 5, &rule_body("a"));
        let second = msg(NEWRULE, NLM_F_MULTI, 5, &rule_body("b"));
        let mut r = DumpReader::new(5, "x");
        for m in split(&first)
            .unwrap()
            .into_iter()
            .chain(split(&second).unwrap())
        {
            assert!(matches!(r.feed(m).unwrap(), DumpStep::More));
        }
        let m = split(&done(0, 5, 0)).unwrap().remove(0);
        assert!(matches!(r.feed(m).unwrap(), DumpStep::Interrupted));
        // A DONE of another request does not end it.
        let step = run(&[first, done(NLM_F_DUMP_INTR, 6, 0)]).unwrap();
        assert!(matches!(step, DumpStep::More), "{step:?}");
    }

    #[test]
    fn errors_end_a_dump_unless_it_was_interrupted() {
        let e = run(&[done(0, 5, -libc::ENOENT)]).unwrap_err();
        assert_eq!(e.errno(), Some(libc::ENOENT), "{e}");
        assert!(e.to_string().contains("list ruleset"), "{e}");
        let step = run(&[done(NLM_F_DUMP_INTR, 5, -libc::ENOENT)]).unwrap();
        assert!(matches!(step, DumpStep::Interrupted), "{step:?}");
        let err = msg(NLMSG_ERROR, 0, 5, &(-libc::EPERM).to_ne_bytes());
        assert_eq!(run(&[err]).unwrap_err().errno(), Some(libc::EPERM));
        // An acknowledgement ends a dump; inside a multipart answer it does not.
        let ack = msg(NLMSG_ERROR, 0, 5, &0i32.to_ne_bytes());
        assert!(matches!(run(&[ack]).unwrap(), DumpStep::Done(_)));
        let multi_ack = msg(NLMSG_ERROR, NLM_F_MULTI, 5, &0i32.to_ne_bytes());
        assert!(matches!(run(&[multi_ack]).unwrap(), DumpStep::More));
    }

    #[test]
    fn error_fields_that_do_not_negate_are_malformed_not_a_panic() {
        for bad in [i32::MIN, 1, i32::MAX] {
            let m = split(&msg(NLMSG_ERROR, 0, 5, &bad.to_ne_bytes()))
                .unwrap()
                .remove(0);
            let e = parse_error(&m).unwrap_err();
            assert!(matches!(e, NlError::Malformed(_)), "{e}");
            assert!(e.to_string().contains(&bad.to_string()), "{e}");
            let e = run(&[done(0, 5, bad)]).unwrap_err();
            assert!(matches!(e, NlError::Malformed(_)), "{e}");
        }
        let short = split(&msg(NLMSG_ERROR, 0, 5, &[1, 2])).unwrap().remove(0);
        assert!(parse_error(&short).is_err());
    }

    #[test]
    fn extended_ack_message_is_read_from_a_capped_error() {
        let mut body = (-libc::EINVAL).to_ne_bytes().to_vec();
        body.extend(msg(NEWRULE, 0, 5, &[])); // the echoed header, capped
        let mut w = Writer::default();
        w.put_str(sys::NLMSGERR_ATTR_MSG as u16, "bad expression");
        body.extend(w.into_bytes());
        let d = msg(NLMSG_ERROR, NLM_F_CAPPED | NLM_F_ACK_TLVS, 5, &body);
        let m = split(&d).unwrap().remove(0);
        let (errno, ext) = parse_error(&m).unwrap();
        assert_eq!(
            (errno, ext.as_deref()),
            (libc::EINVAL, Some("bad expression"))
        );
        // Not capped, with an echoed length that runs past the body: no message, no panic.
        let mut body = (-libc::EINVAL).to_ne_bytes().to_vec();
        body.extend(msg(NEWRULE, 0, 5, &[]));
        body[4..8].copy_from_slice(&u32::MAX.to_ne_bytes());
        let m = split(&msg(NLMSG_ERROR, NLM_F_ACK_TLVS, 5, &body))
            .unwrap()
            .remove(0);
        assert_eq!(parse_error(&m).unwrap(), (libc::EINVAL, None));
    }

    #[test]
    fn split_refuses_lengths_outside_the_datagram() {
        let good = msg(NEWRULE, 0, 5, &rule_body("a"));
        for bad_len in [0u32, 15, good.len() as u32 + 1, u32::MAX] {
            let mut d = good.clone();
            d[..4].copy_from_slice(&bad_len.to_ne_bytes());
            let e = split(&d).unwrap_err();
            assert!(e.to_string().contains(&bad_len.to_string()), "{e}");
        }
        // An unpadded last message and short trailing bytes are accepted.
        let mut d = good.clone();
        d.extend(msg(NEWRULE, 0, 6, &[1, 0, 0, 0, 9]));
        d.truncate(d.len() - 3);
        d.extend([0; 5]);
        let m = split(&d).unwrap();
        assert_eq!((m.len(), m[1].seq, m[1].pid), (2, 6, 77));
        assert!(split(&[]).unwrap().is_empty());
    }

    #[test]
    fn notifications_name_their_table_and_sender() {
        let m = split(&msg(NEWRULE, 0, 0, &rule_body("nat")))
            .unwrap()
            .remove(0);
        assert_eq!(
            event_of(&m),
            Some(Event::Change {
                kind: sys::NFT_MSG_NEWRULE as u16,
                family: 1,
                pid: 77,
                table: Some("nat".into()),
            })
        );
        let other = split(&msg(NLMSG_DONE, 0, 0, &[0; 4])).unwrap().remove(0);
        assert_eq!(event_of(&other), None);
    }

    #[test]
    fn a_kernel_that_never_answers_ends_the_wait_at_the_deadline() {
        // Nothing is sent: the socket only waits (no ruleset is read or changed).
        let mut s = Socket::open().expect("netlink socket");
        let t = Instant::now();
        let total = Duration::from_millis(300);
        let e = s.recv_until("list rules", t + total, total).unwrap_err();
        assert!(t.elapsed() >= total && t.elapsed() < Duration::from_secs(3));
        assert!(
            e.to_string().contains("list rules: no complete answer"),
            "{e}"
        );
    }

    #[test]
    fn attrs_stop_at_the_first_malformed_attribute() {
        let mut w = Writer::default();
        w.put_be32(3, 7);
        let mut b = w.into_bytes();
        b.extend([200, 0, 4, 0, 1, 2]); // claims 200 bytes
        let got: Vec<_> = Attrs(&b).map(|a| (a.ty, a.be32())).collect();
        assert_eq!(got, [(3, Some(7))]);
        assert_eq!(Attrs(&[2, 0, 1, 0]).count(), 0); // length below the header
    }
}
