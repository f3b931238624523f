//! `masqd explain SRC DST`: what happens to a new connection from SRC to DST on this node, read
//! from the kernel as it is now. [`evaluate`](fn@evaluate) is pure: it walks masqd's rules as
//! the kernel holds them (the chain `inet masqd postrouting`, in legacy mode then
//! `MASQD-POSTROUTING`) with the answers of single-element set lookups, names the configuration
//! entries a matched range came from, reports where configuration and kernel disagree (the
//! kernel decides the verdict), and lists the other components' NAT rules that would have
//! matched. [`read_kernel`] gathers those facts.
//!
//! Verdicts: `untouched` (leaves through a bridge, or not a pod source: masqd binds nothing),
//! `marked` (an honoured mark: left to the component that marked it), `kept` (an exception:
//! the guard's identity source NAT claims the connection) and `masqueraded`.

//!
//! Files: this one holds the query and the answer's types; [`walk`] the pure walks of masqd's
//! chains, [`evaluate`](mod@evaluate) the verdict with its disagreements and the other rules,
//! [`kernel`] every read of the kernel (through [`crate::engine`] and
//! [`crate::backend::query`]), [`render`](mod@render) the text.

use std::fmt;
use std::net::IpAddr;

use serde::Serialize;

use crate::backend::Backend;
use crate::config;
use crate::foreign::NatRule;
use crate::policy::Family;
use kernel::{LegacyObserved, Lookup};

pub mod evaluate;
pub mod kernel;
pub mod render;
pub mod walk;

#[cfg(test)]
mod tests;

pub use evaluate::evaluate;
pub use kernel::{explain, read_kernel};
pub use render::render;

/// What masqd does with a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// masqd binds nothing: a bridge, or not a pod source.
    Untouched,
    /// An honoured mark: left to the component that marked it.
    Marked,
    /// An exception: the source is kept.
    Kept,
    /// Masqueraded.
    Masqueraded,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Untouched => "untouched",
            Verdict::Marked => "marked",
            Verdict::Kept => "kept",
            Verdict::Masqueraded => "masqueraded",
        })
    }
}

/// The connection asked about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Output interface, when given.
    pub oif: Option<String>,
    /// Packet mark, when given (else 0).
    pub mark: Option<u32>,
}

/// Parses a packet mark: a 32-bit number, hexadecimal (`0x…`) or decimal.
pub fn parse_mark(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) if !h.is_empty() && h.bytes().all(|b| b.is_ascii_hexdigit()) => {
            u32::from_str_radix(h, 16)
        }
        None if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) => t.parse(),
        _ => {
            return Err(format!(
                "--mark {s:?} is not a number (hexadecimal 0x… or decimal, 32 bits)"
            ))
        }
    };
    r.map_err(|_| format!("--mark {s:?} does not fit in 32 bits"))
}

impl Query {
    /// Parses the command line's words; the error names the argument and the value.
    pub fn parse(
        src: &str,
        dst: &str,
        oif: Option<&str>,
        mark: Option<&str>,
    ) -> Result<Query, String> {
        let addr = |what: &str, s: &str| -> Result<IpAddr, String> {
            s.trim()
                .parse::<IpAddr>()
                .map_err(|_| format!("{what} {s:?} is not an IPv4 or IPv6 address"))
        };
        let src = addr("SRC", src)?;
        let dst = addr("DST", dst)?;
        if src.is_ipv4() != dst.is_ipv4() {
            return Err(format!(
                "SRC {src} and DST {dst} are of different address families: give two IPv4 or \
                 two IPv6 addresses"
            ));
        }
        if let Some(i) = oif {
            config::validate_ifname(i).map_err(|m| format!("--oif {i:?}: {m}"))?;
        }
        let mark = mark.map(parse_mark).transpose()?;
        Ok(Query {
            src,
            dst,
            oif: oif.map(str::to_string),
            mark,
        })
    }

    /// The address family of both addresses.
    pub fn family(&self) -> Family {
        if self.src.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }
}

fn int(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

/// A rule of masqd's nftables chain as the kernel holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainRule {
    /// Kernel handle.
    pub handle: u64,
    /// Its comment (masqd's tag), when it has one.
    pub comment: Option<String>,
}

/// What the kernel holds for the query's family (read by [`read_kernel`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    /// Where the family's policy lives, as detection decides.
    pub backend: Backend,
    /// Whether nf_tables answers (masqd's guard can exist).
    pub nft: bool,
    /// Whether `table inet masqd` exists.
    pub table: bool,
    /// The rules of `inet masqd postrouting`, in order.
    pub chain: Vec<ChainRule>,
    /// The lookup of SRC in the set `pod4`/`pod6`.
    pub pod: Lookup,
    /// The lookup of DST in the set `nomasq4`/`nomasq6`.
    pub nomasq: Lookup,
    /// The legacy nat table of the family, when it was read (legacy mode).
    pub legacy: Option<LegacyObserved>,
    /// The other components' source NAT rules (nftables and legacy xtables).
    pub foreign: Vec<NatRule>,
}

/// A configuration entry that holds an address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Source {
    /// The CIDR as configured.
    pub cidr: String,
    /// `path:line` it came from.
    pub source: String,
    /// The key that named it.
    pub key: String,
}

/// Another component's NAT rule that would have matched the connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OtherRule {
    /// `nft` or `legacy`.
    pub backend: String,
    /// Table (`ip docker-bridges`; legacy: `nat`).
    pub table: String,
    /// Chain.
    pub chain: String,
    /// nft handle, or the position in the legacy chain.
    pub handle: u64,
    /// Priority of the chain it runs in.
    pub priority: i32,
    /// The rule.
    pub rule: String,
    /// `yes`, or `maybe` for a source match masqd does not decode (only the source is
    /// compared; other matches such as `oifname` are not evaluated).
    pub matches: String,
    /// Whether masqd's chain decides the connection before this rule can.
    pub overridden: bool,
    /// One line: why.
    pub reason: String,
}

/// The answer of `masqd explain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Explanation {
    /// The verdict.
    pub verdict: Verdict,
    /// `nft` or `legacy`: where the family's policy lives.
    pub backend: String,
    /// `ipv4` or `ipv6`.
    pub ip_family: String,
    /// Source address.
    pub src: String,
    /// Destination address.
    pub dst: String,
    /// Output interface, when given.
    pub oif: Option<String>,
    /// Packet mark, when given.
    pub mark: Option<String>,
    /// The deciding rule of masqd (nft text, or the iptables-save line); None when none did.
    pub rule: Option<String>,
    /// Where that rule is (`inet masqd postrouting`, `legacy nat MASQD-POSTROUTING`).
    pub chain: Option<String>,
    /// Its nft handle, or its position in the legacy chain.
    pub handle: Option<u64>,
    /// For `kept`: the exception range of the kernel that matched.
    pub range: Option<String>,
    /// For `kept`: `path:line` of the most specific configuration entry holding DST.
    pub source: Option<String>,
    /// For `kept`: every configuration entry holding DST, most specific first.
    pub sources: Vec<Source>,
    /// One line: why.
    pub reason: String,
    /// Notes on assumptions (no `--oif`, no `--mark`).
    pub notes: Vec<String>,
    /// Where the configuration and the kernel disagree (the verdict follows the kernel).
    pub disagreements: Vec<String>,
    /// What the verdict is based on: always `kernel`.
    pub based_on: String,
    /// Other components' NAT rules that would have matched.
    pub other_rules: Vec<OtherRule>,
}
