//! The parser of kernel replies: acknowledgements, errors with their errno and extended-ack
//! message, `NLMSG_DONE`, and the dump reader that notices `NLM_F_DUMP_INTR`. No socket.

use rustables::sys;

use super::attr::{align4, Attrs};
use super::message::{
    ne32, to_msg, Msg, RawMsg, NLMSG_DONE, NLMSG_ERROR, NLMSG_HDRLEN, NLMSG_NOOP, NLM_F_ACK_TLVS,
    NLM_F_CAPPED, NLM_F_DUMP_INTR, NLM_F_MULTI,
};
use super::NlError;

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

/// A reader of the answer to one request: fed message by message until it has the result.
pub(crate) trait Answer {
    /// What the answer yields.
    type Out;
    /// Takes the next message; `Some` when the answer is complete.
    fn feed(&mut self, m: RawMsg) -> Result<Option<Self::Out>, NlError>;
}

impl Answer for DumpReader {
    /// The objects, or None when the run was interrupted and must be repeated.
    type Out = Option<Vec<Msg>>;
    fn feed(&mut self, m: RawMsg) -> Result<Option<Self::Out>, NlError> {
        Ok(match DumpReader::feed(self, m)? {
            DumpStep::More => None,
            DumpStep::Done(msgs) => Some(Some(msgs)),
            DumpStep::Interrupted => Some(None),
        })
    }
}

/// The answer to a non-dump request (`NFT_MSG_GETGEN`…): its messages up to the
/// acknowledgement, or the kernel's error.
#[derive(Debug)]
pub(crate) struct RequestReader {
    seq: u32,
    what: String,
    out: Vec<Msg>,
}

impl RequestReader {
    /// The reader of the answer to the request with sequence number `seq`.
    pub fn new(seq: u32, what: &str) -> RequestReader {
        RequestReader {
            seq,
            what: what.to_string(),
            out: Vec::new(),
        }
    }
}

impl Answer for RequestReader {
    type Out = Vec<Msg>;
    fn feed(&mut self, m: RawMsg) -> Result<Option<Vec<Msg>>, NlError> {
        if m.seq != self.seq {
            return Ok(None);
        }
        if m.kind == NLMSG_ERROR {
            let (errno, ext) = parse_error(&m)?;
            if errno != 0 {
                return Err(NlError::Kernel {
                    what: self.what.clone(),
                    errno,
                    ext,
                });
            }
            return Ok(Some(std::mem::take(&mut self.out)));
        }
        if m.kind != NLMSG_NOOP && m.kind != NLMSG_DONE {
            self.out.push(to_msg(m)?);
        }
        Ok(None)
    }
}

/// The kernel's verdicts on a transaction: one acknowledgement or error per message
/// (sequence numbers 1..=n), or a refusal of the batch header itself (sequence 0). The
/// answer is complete when every message was answered; its error names the first refused
/// message.
#[derive(Debug)]
pub(crate) struct BatchAcks {
    what: Vec<String>,
    answered: Vec<bool>,
    remaining: usize,
    first_err: Option<NlError>,
}

impl BatchAcks {
    /// The verdicts awaited for messages described by `what` (indexed by `seq - 1`).
    pub fn new(what: Vec<String>) -> BatchAcks {
        BatchAcks {
            answered: vec![false; what.len()],
            remaining: what.len(),
            what,
            first_err: None,
        }
    }
}

impl Answer for BatchAcks {
    type Out = ();
    fn feed(&mut self, m: RawMsg) -> Result<Option<()>, NlError> {
        if m.kind == NLMSG_ERROR {
            let (errno, ext) = parse_error(&m)?;
            if m.seq == 0 && errno != 0 {
                // The batch header itself was refused (generation mismatch, no memory).
                return Err(NlError::Kernel {
                    what: "transaction".to_string(),
                    errno,
                    ext,
                });
            }
            let idx = (m.seq as usize).wrapping_sub(1);
            if idx < self.what.len() {
                if !self.answered[idx] {
                    self.answered[idx] = true;
                    self.remaining -= 1;
                }
                if errno != 0 && self.first_err.is_none() {
                    self.first_err = Some(NlError::Kernel {
                        what: self.what[idx].clone(),
                        errno,
                        ext,
                    });
                }
            }
        }
        if self.remaining > 0 {
            return Ok(None);
        }
        match self.first_err.take() {
            Some(e) => Err(e),
            None => Ok(Some(())),
        }
    }
}
