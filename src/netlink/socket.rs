//! The NETLINK_NETFILTER socket: the only holder of a netlink fd. Open, monitor, group
//! membership, requests and transactions up to their acknowledgements, dumps with their
//! restart policy ([`DUMP_RESTART`]), every wait bounded by a poll(2) deadline.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::sys::socket::{self, sockopt, MsgFlags, NetlinkAddr};

use super::attr::Writer;
use super::batch::Transaction;
use super::event::{event_of, Event};
use super::message::{nft_type, split, Msg, RawMsg, NLM_F_ACK, NLM_F_DUMP};
use super::reply::{Answer, BatchAcks, DumpReader, RequestReader};
use super::NlError;

/// How long one request (`GETGEN`, a transaction's acknowledgements) may take in all, and
/// the longest a dump may wait for its next datagram. The kernel answers in micro- to
/// milliseconds.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// How long one dump may take in all, every restart included. Large, because a legitimate
/// answer can be slow: the kernel walks a chain from its start for every 32 KiB it sends, so
/// listing a 60,000-rule ruleset takes it 5-15 s (`nft list ruleset` as much).
pub const DUMP_DEADLINE: Duration = Duration::from_secs(120);
/// Runs of one dump before [`Socket::dump`] gives up on a ruleset that keeps changing.
pub const DUMP_ATTEMPTS: u32 = DUMP_RESTART.attempts;

/// What a dump does when the kernel flags its answer `NLM_F_DUMP_INTR` (the ruleset changed
/// while it was read): run it again, `attempts` runs at most, all within `deadline`, pausing
/// between the later runs so that a burst of commits can pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DumpRestart {
    /// Runs in all, the first included.
    pub attempts: u32,
    /// The time all runs may take together.
    pub deadline: Duration,
}

/// The one restart policy of every dump: 16 runs within [`DUMP_DEADLINE`]; the first three
/// follow each other at once, then 1, 2, 4 … 20 ms pass before each next run.
pub const DUMP_RESTART: DumpRestart = DumpRestart {
    attempts: 16,
    deadline: DUMP_DEADLINE,
};

impl DumpRestart {
    /// The pause after interrupted run `attempt` (1-based) before the next one; None when no
    /// run is left.
    pub fn pause_after(&self, attempt: u32) -> Option<Duration> {
        if attempt >= self.attempts {
            return None;
        }
        if attempt < 3 {
            return Some(Duration::ZERO);
        }
        Some(Duration::from_millis(1 << (attempt - 3).min(5)).min(Duration::from_millis(20)))
    }
}

/// When an exchange with the kernel must be complete.
#[derive(Debug, Clone, Copy)]
enum Deadline {
    /// At this instant, `.1` after the exchange (or the dump it belongs to) began.
    At(Instant, Duration),
    /// This long after the request was sent (a batch: the kernel runs it inside send(2)).
    AfterSend(Duration),
}

/// A NETLINK_NETFILTER socket.
#[derive(Debug)]
pub struct Socket {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
    /// Dump requests sent, by `NFT_MSG_GET*` type (restarts included; filtered ones at
    /// `type + FILTERED`): what reading the ruleset cost this socket.
    dumps: [u64; 2 * FILTERED as usize],
}

/// Where filtered dumps are counted in [`Socket::dumps`]: above every `NFT_MSG_*` type.
const FILTERED: u32 = 32;

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
            dumps: [0; 2 * FILTERED as usize],
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
    pub(super) fn recv_until(
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
    /// run again as [`DUMP_RESTART`] says (16 runs within [`DUMP_DEADLINE`]) (and never
    /// more than [`REQUEST_DEADLINE`] without a datagram).
    pub fn dump(
        &mut self,
        kind: u32,
        family: u8,
        what: &str,
        filter: impl Fn(&mut Writer),
    ) -> Result<Vec<Msg>, NlError> {
        let policy = DUMP_RESTART;
        let deadline = Instant::now() + policy.deadline;
        for attempt in 1.. {
            if let Some(msgs) = self.dump_once(kind, family, what, &filter, deadline)? {
                return Ok(msgs);
            }
            tracing::debug!("`{what}` interrupted by a concurrent change (run {attempt}); again");
            let Some(pause) = policy.pause_after(attempt) else {
                break;
            };
            if !pause.is_zero() {
                let left = deadline.saturating_duration_since(Instant::now());
                std::thread::sleep(pause.min(left));
            }
        }
        Err(NlError::Interrupted {
            what: what.to_string(),
            attempts: policy.attempts,
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
        let seq = self.next_seq();
        let mut w = Writer::default();
        w.begin(nft_type(kind), NLM_F_DUMP | NLM_F_ACK, seq, family, 0);
        let bare = w.msg_len();
        filter(&mut w);
        let slot = if w.msg_len() == bare {
            kind
        } else {
            kind + FILTERED
        };
        if let Some(n) = self.dumps.get_mut(slot as usize) {
            *n += 1;
        }
        w.end();
        let reader = DumpReader::new(seq, what);
        let deadline = Deadline::At(deadline, DUMP_DEADLINE);
        self.exchange(&w.into_bytes(), what, what, deadline, reader)
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
        let seq = self.next_seq();
        let mut w = Writer::default();
        w.begin(nft_type(kind), NLM_F_ACK, seq, family, 0);
        attrs(&mut w);
        w.end();
        let reader = RequestReader::new(seq, what);
        let deadline = Deadline::At(deadline, REQUEST_DEADLINE);
        self.exchange(&w.into_bytes(), what, what, deadline, reader)
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
        // Acknowledgements left over from an earlier transaction that ended early (an error on
        // the batch header, a timeout) carry the same sequence numbers: `exchange` drops them
        // first. The kernel runs the whole batch inside send(2): the deadline starts after it.
        self.exchange(
            &bytes,
            "sending the transaction",
            "waiting for the transaction's acknowledgements",
            Deadline::AfterSend(REQUEST_DEADLINE),
            BatchAcks::new(what),
        )
    }

    /// The next request sequence number (never below 1,000: the numbers of a transaction's
    /// messages start at 1).
    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1_000);
        self.seq
    }

    /// The one request/answer path: drops stale answers, sends `bytes` and feeds what comes
    /// back to `answer` until it is complete or the deadline passes.
    fn exchange<A: Answer>(
        &mut self,
        bytes: &[u8],
        what_send: &str,
        what_wait: &str,
        deadline: Deadline,
        answer: A,
    ) -> Result<A::Out, NlError> {
        self.discard_stale();
        self.send(bytes, what_send)?;
        let deadline = match deadline {
            Deadline::At(end, total) => (end, total),
            Deadline::AfterSend(total) => (Instant::now() + total, total),
        };
        self.wait(what_wait, deadline, answer)
    }

    /// Feeds received messages to `answer` until it is complete.
    fn wait<A: Answer>(
        &mut self,
        what: &str,
        (end, total): (Instant, Duration),
        mut answer: A,
    ) -> Result<A::Out, NlError> {
        loop {
            for m in self.recv_until(what, end, total)? {
                if let Some(out) = answer.feed(m)? {
                    return Ok(out);
                }
            }
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
    /// 2-4× faster. Equals the subscription `nft monitor` makes (and drops when it exits).
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

    /// Dump requests this socket sent for message type `kind` (`NFT_MSG_GETRULE`, …),
    /// restarted dumps counted again: `(whole, filtered)`, the latter narrowed by attributes
    /// (one table's or one chain's objects, one set's elements).
    pub fn dumps(&self, kind: u32) -> (u64, u64) {
        let at = |k: u32| self.dumps.get(k as usize).copied().unwrap_or(0);
        (at(kind), at(kind + FILTERED))
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

impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}
