//! Netlink attributes: the reader ([`Attrs`], [`Attr`]) and the message/attribute writer.

use super::message::NLM_F_REQUEST;

const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;

/// Rounds up to the 4-byte netlink alignment (`NLA_ALIGN`, `NLMSG_ALIGN`).
pub fn align4(n: usize) -> usize {
    n.saturating_add(3) & !3
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

/// Writes netlink messages and attributes into a buffer.
#[derive(Debug, Default)]
pub struct Writer {
    pub(crate) buf: Vec<u8>,
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
