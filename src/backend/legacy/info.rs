//! The legacy nat table's info (`IPT_SO_GET_INFO` / `IP6T_SO_GET_INFO`): its entry count, blob
//! size and hook offsets, read with one getsockopt and no binary, so that the daemon can tell
//! whether anything changed in legacy xtables before it runs `iptables-legacy-save`.
//!
//! Asking for a table that does not exist creates it (the kernel instantiates `iptable_nat` in
//! the namespace on first use), so [`nat_info`] asks only when `/proc/net/ip_tables_names`
//! (`ip6_tables_names`, of the calling thread's namespace) lists `nat`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::policy::Family;

/// `XT_TABLE_MAXNAMELEN` (linux/netfilter/x_tables.h).
const TABLE_NAME_LEN: usize = 32;
/// `NF_INET_NUMHOOKS` (linux/netfilter.h).
const HOOKS: usize = 5;
/// `IPT_SO_GET_INFO` = `IP6T_SO_GET_INFO` = `IPT_BASE_CTL` (64) + 0
/// (linux/netfilter_ipv4/ip_tables.h, linux/netfilter_ipv6/ip6_tables.h).
const SO_GET_INFO: libc::c_int = 64;
/// `sizeof(struct ipt_getinfo)` (= `sizeof(struct ip6t_getinfo)`): the name, `valid_hooks`,
/// `hook_entry[5]`, `underflow[5]`, `num_entries`, `size`, all `unsigned int`.
pub const GETINFO_LEN: usize = TABLE_NAME_LEN + 4 * (1 + HOOKS + HOOKS + 2);

/// What `IPT_SO_GET_INFO` says about a table: enough to notice that its rules changed
/// (a rule added, removed or resized moves the entry count, the size or a hook offset).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TableInfo {
    /// The hooks the table is attached to (bit per `NF_INET_*` hook).
    pub valid_hooks: u32,
    /// Offset of each hook's first rule in the table's blob.
    pub hook_entry: [u32; HOOKS],
    /// Offset of each hook's policy (underflow) rule.
    pub underflow: [u32; HOOKS],
    /// Number of entries (rules, chain heads and ends).
    pub num_entries: u32,
    /// Size of the blob in bytes.
    pub size: u32,
}

/// The request buffer of `IPT_SO_GET_INFO`: the table name, NUL-padded, the rest zero.
pub fn request(table: &str) -> Option<[u8; GETINFO_LEN]> {
    let name = table.as_bytes();
    if name.len() >= TABLE_NAME_LEN || name.contains(&0) {
        return None;
    }
    let mut buf = [0u8; GETINFO_LEN];
    buf[..name.len()].copy_from_slice(name);
    Some(buf)
}

/// The `unsigned int` at word `i` after the name (native byte order, as the kernel writes it).
fn word(buf: &[u8; GETINFO_LEN], i: usize) -> u32 {
    let at = TABLE_NAME_LEN + 4 * i;
    let mut w = [0u8; 4];
    w.copy_from_slice(&buf[at..at + 4]);
    u32::from_ne_bytes(w)
}

/// Decodes the kernel's answer (`struct ipt_getinfo`).
pub fn decode(buf: &[u8; GETINFO_LEN]) -> TableInfo {
    let mut t = TableInfo {
        valid_hooks: word(buf, 0),
        num_entries: word(buf, 1 + 2 * HOOKS),
        size: word(buf, 2 + 2 * HOOKS),
        ..TableInfo::default()
    };
    for h in 0..HOOKS {
        t.hook_entry[h] = word(buf, 1 + h);
        t.underflow[h] = word(buf, 1 + HOOKS + h);
    }
    t
}

/// The info of `table` in the family's legacy xtables, read with `getsockopt(SOL_IP,
/// IPT_SO_GET_INFO)` (`SOL_IPV6`, `IP6T_SO_GET_INFO`) on a raw socket (needs CAP_NET_RAW).
/// Equals `iptables-legacy -t nat -L -n` reading the table's info, without listing rules.
/// The caller makes sure the table exists (asking creates it).
pub fn table_info(f: Family, table: &str) -> std::io::Result<TableInfo> {
    let mut buf = request(table).ok_or_else(|| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let (domain, level) = match f {
        Family::V4 => (libc::AF_INET, libc::SOL_IP),
        Family::V6 => (libc::AF_INET6, libc::SOL_IPV6),
    };
    // SAFETY: a plain socket(2) call; the fd is owned below.
    let fd = unsafe {
        libc::socket(
            domain,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_RAW,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut len = GETINFO_LEN as libc::socklen_t;
    // SAFETY: buf is GETINFO_LEN bytes long and len says so.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            SO_GET_INFO,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if len as usize != GETINFO_LEN {
        return Err(std::io::Error::from_raw_os_error(libc::EPROTO));
    }
    Ok(decode(&buf))
}

/// Whether the calling thread's network namespace has the family's legacy nat table:
/// `/proc/thread-self/net/ip{,6}_tables_names` (the namespace of this thread, which may have
/// entered another one; `/proc/net` is the main thread's), `/proc/net/…` on kernels without
/// `thread-self`. Reading it has no side effect. Equals `cat /proc/net/ip_tables_names`.
pub fn nat_loaded(f: Family) -> std::io::Result<bool> {
    let name = match f {
        Family::V4 => "ip_tables_names",
        Family::V6 => "ip6_tables_names",
    };
    let read = |dir: &str| std::fs::read_to_string(format!("{dir}/{name}"));
    let text = match read("/proc/thread-self/net") {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => read("/proc/net"),
        r => r,
    };
    match text {
        Ok(t) => Ok(t.split_whitespace().any(|t| t == "nat")),
        // No legacy module loaded: no table.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// The info of the family's legacy nat table, or None when `ip{,6}_tables_names` ([`nat_loaded`])
/// does not list `nat` (then it is not asked for, which would create it). Equals
/// `iptables-legacy -t nat -L -n` reading the table's info, without listing rules.
pub fn nat_info(f: Family) -> std::io::Result<Option<TableInfo>> {
    if !nat_loaded(f)? {
        return Ok(None);
    }
    match table_info(f, "nat") {
        Ok(i) => Ok(Some(i)),
        // Unloaded between the two reads.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_struct_is_84_bytes_as_in_ip_tables_h() {
        // char name[32]; unsigned int valid_hooks, hook_entry[5], underflow[5], num_entries,
        // size: 32 + 13 * 4.
        assert_eq!(GETINFO_LEN, 84);
        #[repr(C)]
        struct IptGetinfo {
            name: [u8; 32],
            valid_hooks: u32,
            hook_entry: [u32; 5],
            underflow: [u32; 5],
            num_entries: u32,
            size: u32,
        }
        assert_eq!(std::mem::size_of::<IptGetinfo>(), GETINFO_LEN);
        assert_eq!(std::mem::offset_of!(IptGetinfo, valid_hooks), 32);
        assert_eq!(std::mem::offset_of!(IptGetinfo, hook_entry), 36);
        assert_eq!(std::mem::offset_of!(IptGetinfo, underflow), 56);
        assert_eq!(std::mem::offset_of!(IptGetinfo, num_entries), 76);
        assert_eq!(std::mem::offset_of!(IptGetinfo, size), 80);
    }

    #[test]
    fn the_request_names_the_table() {
        let r = request("nat").unwrap();
        assert_eq!(&r[..4], b"nat\0");
        assert!(r[3..].iter().all(|b| *b == 0));
        assert!(request(&"x".repeat(32)).is_none(), "no room for the NUL");
        assert!(request("n\0t").is_none());
    }

    #[test]
    fn decoding_reads_each_field_at_its_offset() {
        // A nat table as the kernel answers for an empty one on x86-64 (hooks PREROUTING,
        // INPUT, OUTPUT, POSTROUTING = 0b11011; 5 entries of 152/184 bytes), written byte by
        // byte at the offsets of struct ipt_getinfo.
        let mut b = [0u8; GETINFO_LEN];
        b[..3].copy_from_slice(b"nat");
        let put = |b: &mut [u8; GETINFO_LEN], at: usize, v: u32| {
            b[at..at + 4].copy_from_slice(&v.to_ne_bytes())
        };
        put(&mut b, 32, 0x1b);
        for (i, v) in [0u32, 152, 0, 304, 456].into_iter().enumerate() {
            put(&mut b, 36 + 4 * i, v);
            put(&mut b, 56 + 4 * i, v + 1);
        }
        put(&mut b, 76, 5);
        put(&mut b, 80, 792);
        let t = decode(&b);
        assert_eq!(t.valid_hooks, 0x1b);
        assert_eq!(t.hook_entry, [0, 152, 0, 304, 456]);
        assert_eq!(t.underflow, [1, 153, 1, 305, 457]);
        assert_eq!(t.num_entries, 5);
        assert_eq!(t.size, 792);
    }
}
