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

fn align4(n: usize) -> usize {
    (n + 3) & !3
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
    /// A dump was interrupted by a concurrent change; retry.
    #[error("dump interrupted by a concurrent ruleset change")]
    Interrupted,
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
        // A bound on every wait for the kernel: it answers in microseconds, never in 30 s.
        let tv = nix::sys::time::TimeVal::new(30, 0);
        socket::setsockopt(&fd, sockopt::ReceiveTimeout, &tv)
            .map_err(|e| io_err("setting SO_RCVTIMEO", e))?;
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

    /// Receives one datagram and splits it into (header fields, body) tuples.
    fn recv(&mut self, what: &str) -> Result<Vec<RawMsg>, NlError> {
        let n = loop {
            match socket::recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::empty()) {
                Ok(n) => break n,
                Err(nix::Error::EINTR) => continue,
                Err(nix::Error::EAGAIN) => {
                    return Err(NlError::Io {
                        what: format!("{what}: waiting for the kernel's answer"),
                        source: io::Error::from(io::ErrorKind::TimedOut),
                    })
                }
                Err(e) => return Err(io_err(&format!("{what}: receiving"), e)),
            }
        };
        let mut out = Vec::new();
        let mut off = 0;
        let b = &self.buf[..n];
        while off + NLMSG_HDRLEN <= n {
            let len = u32::from_ne_bytes(b[off..off + 4].try_into().unwrap_or([0; 4])) as usize;
            if len < NLMSG_HDRLEN || off + len > n {
                return Err(NlError::Malformed(format!(
                    "{what}: bad message length {len}"
                )));
            }
            out.push(RawMsg {
                kind: u16::from_ne_bytes([b[off + 4], b[off + 5]]),
                flags: u16::from_ne_bytes([b[off + 6], b[off + 7]]),
                seq: u32::from_ne_bytes(b[off + 8..off + 12].try_into().unwrap_or([0; 4])),
                body: b[off + NLMSG_HDRLEN..off + len].to_vec(),
            });
            off += align4(len);
        }
        Ok(out)
    }

    /// Dumps all objects of `kind` (`NFT_MSG_GET*`) of `family`, with filter attributes.
    /// Equals the kernel side of `nft list …`.
    pub fn dump(
        &mut self,
        kind: u32,
        family: u8,
        what: &str,
        filter: impl FnOnce(&mut Writer),
    ) -> Result<Vec<Msg>, NlError> {
        self.seq += 1;
        let seq = self.seq;
        let mut w = Writer::default();
        w.begin(nft_type(kind), NLM_F_DUMP | NLM_F_ACK, seq, family, 0);
        filter(&mut w);
        w.end();
        self.send(&w.into_bytes(), what)?;
        let mut out = Vec::new();
        loop {
            for m in self.recv(what)? {
                if m.seq != seq {
                    continue;
                }
                if m.flags & NLM_F_DUMP_INTR != 0 {
                    // Drain the rest of the dump before reporting.
                    self.drain(seq, what)?;
                    return Err(NlError::Interrupted);
                }
                match m.kind {
                    NLMSG_DONE => {
                        let err = m
                            .body
                            .get(..4)
                            .map(|b| i32::from_ne_bytes(b.try_into().unwrap_or([0; 4])))
                            .unwrap_or(0);
                        if err < 0 {
                            return Err(NlError::Kernel {
                                what: what.to_string(),
                                errno: -err,
                                ext: None,
                            });
                        }
                        return Ok(out);
                    }
                    NLMSG_ERROR => {
                        let (errno, ext) = parse_error(&m)?;
                        if errno != 0 {
                            return Err(NlError::Kernel {
                                what: what.to_string(),
                                errno,
                                ext,
                            });
                        }
                        if m.flags & NLM_F_MULTI == 0 {
                            return Ok(out);
                        }
                    }
                    NLMSG_NOOP => {}
                    _ => out.push(to_msg(m)?),
                }
            }
        }
    }

    fn drain(&mut self, seq: u32, what: &str) -> Result<(), NlError> {
        loop {
            for m in self.recv(what)? {
                if m.seq == seq && (m.kind == NLMSG_DONE || m.kind == NLMSG_ERROR) {
                    return Ok(());
                }
            }
        }
    }

    /// Sends a non-dump request (`NFT_MSG_GETGEN`…) and collects the answers up to the ACK.
    /// Equals the query `nft` makes before every command (`nft list ruleset` reads the
    /// generation the same way).
    pub fn request(
        &mut self,
        kind: u32,
        family: u8,
        what: &str,
        attrs: impl FnOnce(&mut Writer),
    ) -> Result<Vec<Msg>, NlError> {
        self.seq += 1;
        let seq = self.seq;
        let mut w = Writer::default();
        w.begin(nft_type(kind), NLM_F_ACK, seq, family, 0);
        attrs(&mut w);
        w.end();
        self.send(&w.into_bytes(), what)?;
        let mut out = Vec::new();
        loop {
            for m in self.recv(what)? {
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

    /// Sends a transaction and waits for the kernel's verdict on every message. On failure
    /// nothing of it was applied; the error names the first refused message. Equals `nft -f`
    /// of a file holding the same commands: one batch, all or nothing.
    pub fn commit(&mut self, txn: Transaction) -> Result<(), NlError> {
        if txn.is_empty() {
            return Ok(());
        }
        let (bytes, what) = txn.finish();
        let last = what.len() as u32;
        // Acknowledgements left over from an earlier transaction that ended early (an error on
        // the batch header, a timeout) carry the same sequence numbers: drop them first.
        while socket::recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::MSG_DONTWAIT).is_ok() {}
        self.send(&bytes, "sending the transaction")?;
        let mut answered = vec![false; what.len()];
        let mut remaining = what.len();
        let mut first_err: Option<NlError> = None;
        while remaining > 0 {
            for m in self.recv("waiting for the transaction's acknowledgements")? {
                if m.kind != NLMSG_ERROR {
                    continue;
                }
                let (errno, ext) = parse_error(&m)?;
                if m.seq == 0 {
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
    /// `nft monitor` prints.
    pub fn drain_events(&mut self) -> Result<Vec<Event>, NlError> {
        let mut out = Vec::new();
        loop {
            let n = match socket::recv(self.fd.as_raw_fd(), &mut self.buf, MsgFlags::MSG_DONTWAIT) {
                Ok(n) => n,
                Err(nix::Error::EAGAIN) => return Ok(out),
                Err(nix::Error::EINTR) => continue,
                Err(nix::Error::ENOBUFS) => {
                    out.push(Event::Overrun);
                    continue;
                }
                Err(e) => return Err(io_err("receiving nftables events", e)),
            };
            let b = &self.buf[..n];
            let mut off = 0;
            while off + NLMSG_HDRLEN <= n {
                let len = u32::from_ne_bytes(b[off..off + 4].try_into().unwrap_or([0; 4])) as usize;
                if len < NLMSG_HDRLEN || off + len > n {
                    break;
                }
                let kind = u16::from_ne_bytes([b[off + 4], b[off + 5]]);
                let pid = u32::from_ne_bytes(b[off + 12..off + 16].try_into().unwrap_or([0; 4]));
                let body = &b[off + NLMSG_HDRLEN..off + len];
                if kind >> 8 == sys::NFNL_SUBSYS_NFTABLES as u16 && body.len() >= NFGENMSG_LEN {
                    // Attribute 1 is the table name in every table/chain/rule/set/element message.
                    let table = Attrs(&body[NFGENMSG_LEN..])
                        .get(1)
                        .and_then(|a| a.str())
                        .map(str::to_string);
                    out.push(Event::Change {
                        kind: kind & 0xff,
                        family: body[0],
                        pid,
                        table,
                    });
                }
                off += align4(len);
            }
        }
    }
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

impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

struct RawMsg {
    kind: u16,
    flags: u16,
    seq: u32,
    body: Vec<u8>,
}

fn to_msg(m: RawMsg) -> Result<Msg, NlError> {
    if m.body.len() < NFGENMSG_LEN {
        return Err(NlError::Malformed("message shorter than nfgenmsg".into()));
    }
    Ok(Msg {
        kind: m.kind & 0xff,
        family: m.body[0],
        payload: m.body[NFGENMSG_LEN..].to_vec(),
    })
}

/// errno (positive) and extended-ack message of an NLMSG_ERROR.
fn parse_error(m: &RawMsg) -> Result<(i32, Option<String>), NlError> {
    let b = &m.body;
    if b.len() < 4 {
        return Err(NlError::Malformed("short NLMSG_ERROR".into()));
    }
    let err = -i32::from_ne_bytes(b[..4].try_into().unwrap_or([0; 4]));
    let mut ext = None;
    if m.flags & NLM_F_ACK_TLVS != 0 && b.len() >= 4 + NLMSG_HDRLEN {
        // With NETLINK_CAP_ACK the original header is echoed without its payload.
        let skip = if m.flags & NLM_F_CAPPED != 0 {
            4 + NLMSG_HDRLEN
        } else {
            let olen = u32::from_ne_bytes(b[4..8].try_into().unwrap_or([0; 4])) as usize;
            4 + align4(olen)
        };
        if let Some(tlvs) = b.get(skip..) {
            ext = Attrs(tlvs)
                .get(sys::NLMSGERR_ATTR_MSG as u16)
                .and_then(|a| a.str())
                .map(str::to_string);
        }
    }
    Ok((err, ext))
}
