//! Config → Policy: aggregated, validated address sets per family. Pure. The incremental
//! edit of the exception set (the daemon's list-file reload) is in [`exceptions`].

mod exceptions;

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::config::{Config, HonorMark};

pub use self::exceptions::{range_cidrs, Exceptions, Window};

/// An address family masqd handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// Both families, IPv4 first.
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// Highest address of the family as an integer.
    pub fn max(self) -> u128 {
        match self {
            Family::V4 => u32::MAX as u128,
            Family::V6 => u128::MAX,
        }
    }

    /// Key length in bytes.
    pub fn addr_len(self) -> usize {
        match self {
            Family::V4 => 4,
            Family::V6 => 16,
        }
    }

    /// Position in [`Family::ALL`] (0 for IPv4, 1 for IPv6), for per-family arrays.
    pub fn index(self) -> usize {
        match self {
            Family::V4 => 0,
            Family::V6 => 1,
        }
    }

    /// Suffix used in set names (`pod4`, `nomasq6`).
    pub fn digit(self) -> char {
        match self {
            Family::V4 => '4',
            Family::V6 => '6',
        }
    }

    /// The family of a network.
    pub fn of(net: &IpNet) -> Family {
        match net {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }

    /// Big-endian key bytes of an address given as an integer.
    pub fn key_bytes(self, addr: u128) -> Vec<u8> {
        match self {
            Family::V4 => (addr as u32).to_be_bytes().to_vec(),
            Family::V6 => addr.to_be_bytes().to_vec(),
        }
    }

    /// The address integer of big-endian key bytes (None when the length is wrong).
    pub fn addr_from_bytes(self, b: &[u8]) -> Option<u128> {
        match self {
            Family::V4 => Some(u32::from_be_bytes(b.try_into().ok()?) as u128),
            Family::V6 => Some(u128::from_be_bytes(b.try_into().ok()?)),
        }
    }

    /// The nftables family keyword of the family's own tables (`ip`, `ip6`), as in
    /// `nft list table ip nat`; also the family name masqd's state file records.
    pub fn nft_keyword(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }

    /// The family of an nftables keyword (`ip`, `ip6`); None for any other.
    pub fn from_nft_keyword(kw: &str) -> Option<Family> {
        match kw {
            "ip" => Some(Family::V4),
            "ip6" => Some(Family::V6),
            _ => None,
        }
    }

    /// The netfilter protocol family number (`NFPROTO_IPV4` = 2, `NFPROTO_IPV6` = 10).
    pub fn nfproto(self) -> u8 {
        match self {
            Family::V4 => 2,
            Family::V6 => 10,
        }
    }

    /// The legacy xtables binaries of the family: (save, restore, the rule command), as in
    /// `iptables-legacy-save`, `iptables-legacy-restore`, `iptables-legacy`.
    pub fn ipt_binaries(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Family::V4 => (
                "iptables-legacy-save",
                "iptables-legacy-restore",
                "iptables-legacy",
            ),
            Family::V6 => (
                "ip6tables-legacy-save",
                "ip6tables-legacy-restore",
                "ip6tables-legacy",
            ),
        }
    }

    /// The legacy xtables rule command of the family (`iptables-legacy`, `ip6tables-legacy`).
    pub fn ipt_binary(self) -> &'static str {
        self.ipt_binaries().2
    }

    /// Formats an address integer of this family.
    pub fn fmt_addr(self, addr: u128) -> String {
        match self {
            Family::V4 => Ipv4Addr::from(addr as u32).to_string(),
            Family::V6 => Ipv6Addr::from(addr).to_string(),
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        })
    }
}

/// An inclusive range of addresses of one family, as integers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Range {
    /// First address.
    pub start: u128,
    /// Last address (inclusive).
    pub end: u128,
}

impl Range {
    /// The range a network covers.
    pub fn of_net(net: &IpNet) -> Range {
        match net {
            IpNet::V4(n) => Range {
                start: u32::from(n.network()) as u128,
                end: u32::from(n.broadcast()) as u128,
            },
            IpNet::V6(n) => Range {
                start: u128::from(n.network()),
                end: u128::from(n.broadcast()),
            },
        }
    }

    /// Formats as a CIDR when the range is one, else as `first-last` (nft syntax).
    pub fn display(&self, family: Family) -> String {
        let bits = family.addr_len() as u32 * 8;
        for host in 0..=bits {
            let mask = if host == 128 {
                u128::MAX
            } else {
                (1u128 << host) - 1
            };
            if self.start & mask != 0 {
                break;
            }
            if self.start | mask == self.end {
                return format!("{}/{}", family.fmt_addr(self.start), bits - host);
            }
        }
        format!(
            "{}-{}",
            family.fmt_addr(self.start),
            family.fmt_addr(self.end)
        )
    }
}

/// Sorts and merges overlapping and adjacent ranges into the minimal disjoint list.
pub fn normalize(mut ranges: Vec<Range>) -> Vec<Range> {
    ranges.sort();
    let mut out: Vec<Range> = Vec::with_capacity(ranges.len());
    for r in ranges {
        if let Some(last) = out.last_mut() {
            if last.end == u128::MAX || r.start <= last.end + 1 {
                if r.end > last.end {
                    last.end = r.end;
                }
                continue;
            }
        }
        out.push(r);
    }
    out
}

/// Whether `nets` (of any family) together cover the whole address space of `family`, after
/// aggregation: `0.0.0.0/0`, but as well `0.0.0.0/1` + `128.0.0.0/1` or any set of pieces.
pub fn covers_family(nets: &[IpNet], family: Family) -> bool {
    let ranges = nets
        .iter()
        .filter(|n| Family::of(n) == family)
        .map(Range::of_net)
        .collect();
    normalize(ranges)
        == [Range {
            start: 0,
            end: family.max(),
        }]
}

/// Whether `addr` lies in one of the (normalized) `ranges`.
pub fn contains(ranges: &[Range], addr: u128) -> bool {
    let idx = ranges.partition_point(|r| r.end < addr);
    ranges.get(idx).is_some_and(|r| r.start <= addr)
}

/// The policy for one address family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyPolicy {
    /// This node's pod CIDRs as configured (deduplicated, in order).
    pub configured_pod_cidrs: Vec<IpNet>,
    /// This node's pod CIDRs, aggregated.
    pub pod_cidrs: Vec<IpNet>,
    /// The exception CIDRs (cluster ∪ non-masquerade), aggregated.
    pub exception_cidrs: std::sync::Arc<[IpNet]>,
    /// Pod CIDRs as merged ranges: the contents of set `pod4`/`pod6`.
    pub pod: std::sync::Arc<[Range]>,
    /// Exceptions as merged ranges: the contents of set `nomasq4`/`nomasq6`. Shared (not
    /// copied) by the policy's clones and the nft driver's set cache: 32 bytes a range.
    pub nomasq: std::sync::Arc<[Range]>,
}

/// The whole policy of a node. A family is present when the node has pod CIDRs in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// IPv4 part, when the node has IPv4 pods.
    pub v4: Option<FamilyPolicy>,
    /// IPv6 part, when the node has IPv6 pods.
    pub v6: Option<FamilyPolicy>,
    /// Output interfaces whose traffic is never touched.
    pub bridges: Vec<String>,
    /// Masquerade with fully randomised source ports.
    pub random_fully: bool,
    /// Remove the broad default masquerade rule for the pod CIDRs.
    pub replace_default_rule: bool,
    /// Sources that identify a broad default rule to remove: every pod CIDR, as configured
    /// and aggregated, of both families (kept when the policy is restricted to one backend's
    /// families: the default-rule search covers every backend).
    pub default_rule_cidrs: Vec<IpNet>,
    /// Packet marks left to the component that set them (`meta mark & MASK == VALUE return`).
    pub honor_marks: Vec<HonorMark>,
    /// Families present whose nftables part is only the guard (design.md §3.2): their policy
    /// lives in legacy xtables, and masqd's chain holds only their honoured-mark return and
    /// identity-SNAT rules, no masquerade of its own.
    pub guard_only: Vec<Family>,
}

impl Policy {
    /// No pod CIDRs, no exceptions, every setting at its default (what detection runs with
    /// when there is no configuration).
    pub fn empty() -> Policy {
        Policy {
            v4: None,
            v6: None,
            bridges: Vec::new(),
            random_fully: false,
            replace_default_rule: true,
            default_rule_cidrs: Vec::new(),
            honor_marks: Vec::new(),
            guard_only: Vec::new(),
        }
    }

    /// Builds the policy of a validated configuration.
    pub fn from_config(cfg: &Config) -> Policy {
        let fam = |family: Family| -> Option<FamilyPolicy> {
            let mut pods: Vec<IpNet> = Vec::new();
            for n in cfg.pod_cidrs.iter().filter(|n| Family::of(n) == family) {
                if !pods.contains(n) {
                    pods.push(*n);
                }
            }
            if pods.is_empty() {
                return None;
            }
            let exceptions: Vec<IpNet> = cfg
                .cluster_cidrs
                .iter()
                .chain(cfg.nonmasquerade_cidrs.iter())
                .filter(|n| Family::of(n) == family)
                .cloned()
                .collect();
            let pod_cidrs = aggregate(&pods);
            let exception_cidrs = aggregate(&exceptions);
            Some(FamilyPolicy {
                pod: normalize(pod_cidrs.iter().map(Range::of_net).collect()).into(),
                nomasq: normalize(exception_cidrs.iter().map(Range::of_net).collect()).into(),
                configured_pod_cidrs: pods,
                pod_cidrs,
                exception_cidrs: exception_cidrs.into(),
            })
        };
        let v4 = fam(Family::V4);
        let v6 = fam(Family::V6);
        let mut default_rule_cidrs: Vec<IpNet> = Vec::new();
        for fp in v4.iter().chain(v6.iter()) {
            for n in fp.configured_pod_cidrs.iter().chain(fp.pod_cidrs.iter()) {
                if !default_rule_cidrs.contains(n) {
                    default_rule_cidrs.push(*n);
                }
            }
        }
        Policy {
            v4,
            v6,
            default_rule_cidrs,
            bridges: cfg.bridge_interfaces.clone(),
            random_fully: cfg.random_fully,
            replace_default_rule: cfg.replace_default_rule,
            honor_marks: cfg.honor_marks.clone(),
            guard_only: Vec::new(),
        }
    }

    /// The part of the policy that lives in nftables: the families in `full` completely, the
    /// families in `guard` as the guard only (design.md §3.2), the others not at all.
    pub fn nft_part(&self, full: &[Family], guard: &[Family]) -> Policy {
        let both: Vec<Family> = full.iter().chain(guard.iter()).copied().collect();
        let mut p = self.restricted_to(&both);
        p.guard_only = Family::ALL
            .into_iter()
            .filter(|f| guard.contains(f) && !full.contains(f) && p.family(*f).is_some())
            .collect();
        p
    }

    /// Whether family `f` is present with its whole policy (not only the guard).
    pub fn is_full(&self, f: Family) -> bool {
        self.family(f).is_some() && !self.guard_only.contains(&f)
    }

    /// The same policy with only the given families present (the others are handled by
    /// another backend).
    pub fn restricted_to(&self, families: &[Family]) -> Policy {
        let mut p = self.clone();
        if !families.contains(&Family::V4) {
            p.v4 = None;
        }
        if !families.contains(&Family::V6) {
            p.v6 = None;
        }
        p
    }

    /// The policy of one family.
    pub fn family(&self, f: Family) -> Option<&FamilyPolicy> {
        match f {
            Family::V4 => self.v4.as_ref(),
            Family::V6 => self.v6.as_ref(),
        }
    }
}

/// ipnet's aggregate, per family, IPv4 first.
pub fn aggregate(nets: &[IpNet]) -> Vec<IpNet> {
    let v4: Vec<Ipv4Net> = nets
        .iter()
        .filter_map(|n| match n {
            IpNet::V4(n) => Some(*n),
            IpNet::V6(_) => None,
        })
        .collect();
    let v6: Vec<Ipv6Net> = nets
        .iter()
        .filter_map(|n| match n {
            IpNet::V6(n) => Some(*n),
            IpNet::V4(_) => None,
        })
        .collect();
    Ipv4Net::aggregate(&v4)
        .into_iter()
        .map(IpNet::V4)
        .chain(Ipv6Net::aggregate(&v6).into_iter().map(IpNet::V6))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn r(a: u128, b: u128) -> Range {
        Range { start: a, end: b }
    }

    #[test]
    fn normalize_merges_overlap_and_adjacency() {
        assert_eq!(
            normalize(vec![r(10, 20), r(0, 4), r(5, 9), r(15, 30), r(40, 40)]),
            vec![r(0, 30), r(40, 40)]
        );
        assert_eq!(
            normalize(vec![r(0, u128::MAX), r(5, 6)]),
            vec![r(0, u128::MAX)]
        );
    }

    #[test]
    fn whole_space_covers() {
        let nets = |v: &[&str]| -> Vec<IpNet> { v.iter().map(|s| s.parse().unwrap()).collect() };
        for (set, v4, v6) in [
            (nets(&["0.0.0.0/0"]), true, false),
            (nets(&["0.0.0.0/1", "128.0.0.0/1"]), true, false),
            (
                nets(&[
                    "128.0.0.0/2",
                    "0.0.0.0/1",
                    "192.0.0.0/2",
                    "::/1",
                    "8000::/1",
                ]),
                true,
                true,
            ),
            (nets(&["0.0.0.0/1", "128.0.0.0/2"]), false, false),
            (nets(&["::/1", "8000::/2", "c000::/2"]), false, true),
            (nets(&["0.0.0.0/1", "128.0.0.0/1", "::/1"]), true, false),
            (nets(&["0.0.0.1/32"]), false, false),
        ] {
            assert_eq!(covers_family(&set, Family::V4), v4, "{set:?}");
            assert_eq!(covers_family(&set, Family::V6), v6, "{set:?}");
        }
        // Many pieces: 256 /8s.
        let pieces: Vec<IpNet> = (0..=255u32)
            .map(|i| IpNet::V4(Ipv4Net::new(Ipv4Addr::from(i << 24), 8).unwrap()))
            .collect();
        assert!(covers_family(&pieces, Family::V4));
        assert!(!covers_family(&pieces[1..], Family::V4));
    }

    #[test]
    fn contains_works() {
        let rs = vec![r(0, 4), r(10, 20)];
        assert!(contains(&rs, 0) && contains(&rs, 4) && contains(&rs, 15));
        assert!(!contains(&rs, 5) && !contains(&rs, 21));
    }

    #[test]
    fn display_ranges() {
        let n: IpNet = "10.0.0.0/8".parse().unwrap();
        assert_eq!(Range::of_net(&n).display(Family::V4), "10.0.0.0/8");
        assert_eq!(r(1, 2).display(Family::V4), "0.0.0.1-0.0.0.2");
        let top: IpNet = "ffff::/16".parse().unwrap();
        assert_eq!(Range::of_net(&top).display(Family::V6), "ffff::/16");
        assert_eq!(r(5, 5).display(Family::V4), "0.0.0.5/32");
    }

    #[test]
    fn policy_from_config() {
        let cfg = crate::config::parse(
            Path::new("t.toml"),
            r#"
[node]
pod_cidrs = ["172.7.21.0/24"]
[masquerade]
cluster_cidrs = ["172.7.0.0/16", "10.0.0.0/25"]
nonmasquerade_cidrs = ["10.0.0.128/25", "172.7.3.0/24", "fd00::/8"]
"#,
        )
        .unwrap();
        let p = Policy::from_config(&cfg);
        let v4 = p.v4.unwrap();
        assert_eq!(
            v4.exception_cidrs.to_vec(),
            vec![
                "10.0.0.0/24".parse::<IpNet>().unwrap(),
                "172.7.0.0/16".parse().unwrap()
            ]
        );
        assert_eq!(v4.nomasq.len(), 2);
        assert!(p.v6.is_none(), "no IPv6 pods → no IPv6 policy");
    }
}
