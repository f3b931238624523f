//! Netlink message headers: the one parser of `struct nlmsghdr` ([`split`]), the received
//! message types and the nftables message type numbering.

use rustables::sys;

use super::attr::{align4, Attrs};
use super::NlError;

/// Length of `struct nlmsghdr`.
pub const NLMSG_HDRLEN: usize = 16;
/// Length of `struct nfgenmsg` (family, version, res_id) after it.
pub const NFGENMSG_LEN: usize = 4;
/// `NLMSG_NOOP`.
pub const NLMSG_NOOP: u16 = 1;
/// `NLMSG_ERROR`: an error or (errno 0) an acknowledgement.
pub const NLMSG_ERROR: u16 = 2;
/// `NLMSG_DONE`: the end of a dump.
pub const NLMSG_DONE: u16 = 3;
/// `NLM_F_REQUEST`.
pub const NLM_F_REQUEST: u16 = 1;
/// `NLM_F_MULTI`: part of a multipart answer.
pub const NLM_F_MULTI: u16 = 2;
/// Ask for an acknowledgement.
pub const NLM_F_ACK: u16 = 4;
/// `NLM_F_DUMP` (`NLM_F_ROOT | NLM_F_MATCH`).
pub const NLM_F_DUMP: u16 = 0x300;
/// Create the object.
pub const NLM_F_CREATE: u16 = 0x400;
/// Append (rules: at the end of the chain).
pub const NLM_F_APPEND: u16 = 0x800;
/// `NLM_F_DUMP_INTR`: the dump was interrupted by a concurrent change.
pub const NLM_F_DUMP_INTR: u16 = 16;
/// `NLM_F_CAPPED`: the echoed request of an error carries no payload.
pub const NLM_F_CAPPED: u16 = 0x100;
/// `NLM_F_ACK_TLVS`: extended-ack attributes follow.
pub const NLM_F_ACK_TLVS: u16 = 0x200;
/// `NFNL_MSG_BATCH_BEGIN`.
pub const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
/// `NFNL_MSG_BATCH_END`.
pub const NFNL_MSG_BATCH_END: u16 = 0x11;

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

/// The full `nlmsg_type` of an nftables message (`NFT_MSG_*` in subsystem NFTABLES).
pub fn nft_type(kind: u32) -> u16 {
    ((sys::NFNL_SUBSYS_NFTABLES as u16) << 8) | kind as u16
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

pub(crate) fn ne32(b: &[u8], at: usize) -> u32 {
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

pub(crate) fn to_msg(m: RawMsg) -> Result<Msg, NlError> {
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
