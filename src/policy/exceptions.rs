//! The exception set kept for incremental edits: every exception entry of one family in
//! address order ([`Exceptions`]), its merged ranges, and the re-aggregation of only the
//! merged ranges an edit touches ([`Window`]), applied in place to a [`FamilyPolicy`]. The
//! result is always what [`Policy::from_config`](super::Policy::from_config) gives for the
//! edited configuration (tests: random edit sequences against a full rebuild).

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::{normalize, Family, FamilyPolicy, Range};

/// The fewest CIDRs that exactly cover `r`, in address order (what ipnet's aggregate gives
/// for a merged range).
pub fn range_cidrs(r: Range, family: Family) -> Vec<IpNet> {
    let bits = family.addr_len() as u32 * 8;
    let mut out = Vec::new();
    let mut start = r.start;
    loop {
        let align = if start == 0 {
            bits
        } else {
            start.trailing_zeros().min(bits)
        };
        let span = r.end - start;
        // The largest h with 2^h - 1 <= span.
        let fit = if span == u128::MAX {
            128
        } else {
            127 - (span + 1).leading_zeros()
        };
        let host = align.min(fit);
        let prefix = (bits - host) as u8;
        let net = match family {
            Family::V4 => Ipv4Net::new(Ipv4Addr::from(start as u32), prefix).map(IpNet::V4),
            Family::V6 => Ipv6Net::new(Ipv6Addr::from(start), prefix).map(IpNet::V6),
        };
        if let Ok(n) = net {
            out.push(n);
        }
        let last = if host >= 128 {
            u128::MAX
        } else {
            start + ((1u128 << host) - 1)
        };
        if last >= r.end {
            return out;
        }
        start = last + 1;
    }
}

/// A stretch of addresses an edit re-aggregated: every merged range inside `span` is replaced
/// by `merged`; nothing outside it changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// The addresses re-aggregated (a union of old merged ranges and changed entries).
    pub span: Range,
    /// The merged ranges inside `span` after the edit.
    pub merged: Vec<Range>,
}

/// Every exception entry of one family (duplicates kept), sorted, and their merged ranges.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Exceptions {
    entries: Vec<Range>,
    merged: Vec<Range>,
}

impl Exceptions {
    /// The exceptions of `family` among `nets`.
    pub fn new<'a>(nets: impl Iterator<Item = &'a IpNet>, family: Family) -> Exceptions {
        let mut entries: Vec<Range> = nets
            .filter(|n| Family::of(n) == family)
            .map(Range::of_net)
            .collect();
        entries.sort_unstable();
        let merged = normalize(entries.clone());
        Exceptions { entries, merged }
    }

    /// The merged ranges (the contents of `nomasq4`/`nomasq6` when the family has pods).
    pub fn merged(&self) -> &[Range] {
        &self.merged
    }

    /// The old merged ranges that `c` overlaps or touches, joined with `c`.
    fn hull(&self, c: Range) -> Range {
        let m = &self.merged;
        let i = m.partition_point(|r| r.end.saturating_add(1) < c.start);
        let j = m.partition_point(|r| r.start <= c.end.saturating_add(1));
        if i >= j {
            return c;
        }
        Range {
            start: c.start.min(m[i].start),
            end: c.end.max(m[j - 1].end),
        }
    }

    /// Removes the entries `gone` and adds `new`; the windows re-aggregated, in address order.
    /// None (and nothing changed) when an entry of `gone` is not there: the caller's view of
    /// the configuration is not this one.
    pub fn edit(&mut self, gone: &[Range], new: &[Range]) -> Option<Vec<Window>> {
        let mut g = gone.to_vec();
        g.sort_unstable();
        for run in g.chunk_by(|a, b| a == b) {
            let at = self.entries.partition_point(|e| e < &run[0]);
            if self.entries.get(at + run.len() - 1) != Some(&run[0]) {
                return None;
            }
        }
        let spans = normalize(g.iter().chain(new).map(|c| self.hull(*c)).collect());
        for r in &g {
            let at = self.entries.partition_point(|e| e < r);
            self.entries.remove(at);
        }
        for r in new {
            let at = self.entries.partition_point(|e| e < r);
            self.entries.insert(at, *r);
        }
        let windows: Vec<Window> = spans
            .into_iter()
            .map(|span| {
                let a = self.entries.partition_point(|e| e.start < span.start);
                let b = self.entries.partition_point(|e| e.start <= span.end);
                Window {
                    span,
                    merged: normalize(self.entries[a..b].to_vec()),
                }
            })
            .collect();
        splice_windows(
            &mut self.merged,
            &windows,
            |r| r.start,
            |w| w.merged.clone(),
        );
        Some(windows)
    }
}

/// Replaces, in `v` (sorted by `start`), the items that start inside each window's span by
/// `new(window)`; `windows` in address order and disjoint. From the back, so each splice
/// leaves the positions of the windows before it alone.
fn splice_windows<T>(
    v: &mut Vec<T>,
    windows: &[Window],
    start: impl Fn(&T) -> u128,
    new: impl Fn(&Window) -> Vec<T>,
) {
    for w in windows.iter().rev() {
        let a = v.partition_point(|x| start(x) < w.span.start);
        let b = v.partition_point(|x| start(x) <= w.span.end);
        v.splice(a..b, new(w));
    }
}

impl FamilyPolicy {
    /// Takes the windows of an edit of the family's exceptions in: `nomasq` and
    /// `exception_cidrs` change inside them only.
    pub fn apply_windows(&mut self, family: Family, windows: &[Window]) {
        let mut nomasq = self.nomasq.to_vec();
        splice_windows(&mut nomasq, windows, |r| r.start, |w| w.merged.clone());
        self.nomasq = nomasq.into();
        let mut cidrs = self.exception_cidrs.to_vec();
        splice_windows(
            &mut cidrs,
            windows,
            |n| Range::of_net(n).start,
            |w| {
                w.merged
                    .iter()
                    .flat_map(|r| range_cidrs(*r, family))
                    .collect()
            },
        );
        self.exception_cidrs = cidrs.into();
    }
}

#[cfg(test)]
mod tests {
    use super::super::aggregate;
    use super::*;

    /// A random CIDR of `family` in a small address space, so that entries overlap, nest,
    /// touch and repeat.
    fn random_net(rng: &mut fastrand::Rng, family: Family) -> IpNet {
        let prefix = rng.u8(24..=32);
        let a = (rng.u32(0..1024) << 2) | 0x0a00_0000;
        match family {
            Family::V4 => IpNet::V4(Ipv4Net::new(Ipv4Addr::from(a), prefix).unwrap().trunc()),
            Family::V6 => {
                let addr = Ipv6Addr::from(((a as u128) << 96) | 0xfd00 << 112);
                IpNet::V6(Ipv6Net::new(addr, prefix + 96).unwrap().trunc())
            }
        }
    }

    #[test]
    fn range_cidrs_is_ipnet_aggregate() {
        let mut rng = fastrand::Rng::with_seed(7);
        for family in Family::ALL {
            for _ in 0..300 {
                let nets: Vec<IpNet> = (0..rng.usize(1..20))
                    .map(|_| random_net(&mut rng, family))
                    .collect();
                let ranges = normalize(nets.iter().map(Range::of_net).collect());
                let ours: Vec<IpNet> = ranges
                    .iter()
                    .flat_map(|r| range_cidrs(*r, family))
                    .collect();
                assert_eq!(ours, aggregate(&nets), "{nets:?}");
            }
        }
        let whole = Range {
            start: 0,
            end: u128::MAX,
        };
        assert_eq!(
            range_cidrs(whole, Family::V6),
            vec!["::/0".parse::<IpNet>().unwrap()]
        );
        let v4 = Range {
            start: 0,
            end: u32::MAX as u128,
        };
        assert_eq!(
            range_cidrs(v4, Family::V4),
            vec!["0.0.0.0/0".parse::<IpNet>().unwrap()]
        );
    }

    #[test]
    fn random_edits_equal_a_full_rebuild() {
        let mut rng = fastrand::Rng::with_seed(13);
        for family in Family::ALL {
            let mut nets: Vec<IpNet> = (0..200).map(|_| random_net(&mut rng, family)).collect();
            let mut ex = Exceptions::new(nets.iter(), family);
            let mut fp = family_policy(&nets, family);
            for _ in 0..500 {
                let mut gone = Vec::new();
                for _ in 0..rng.usize(0..4) {
                    if !nets.is_empty() {
                        gone.push(nets.swap_remove(rng.usize(0..nets.len())));
                    }
                }
                let new: Vec<IpNet> = (0..rng.usize(0..4))
                    .map(|_| random_net(&mut rng, family))
                    .collect();
                nets.extend(new.iter().copied());
                let r = |v: &[IpNet]| v.iter().map(Range::of_net).collect::<Vec<_>>();
                let windows = ex.edit(&r(&gone), &r(&new)).expect("consistent");
                fp.apply_windows(family, &windows);
                assert_eq!(ex, Exceptions::new(nets.iter(), family));
                assert_eq!(fp, family_policy(&nets, family));
            }
            let absent = Range { start: 1, end: 1 };
            let before = ex.clone();
            assert_eq!(ex.edit(&[absent], &[]), None, "an entry that is not there");
            assert_eq!(ex, before, "left alone");
        }
    }

    fn family_policy(nets: &[IpNet], family: Family) -> FamilyPolicy {
        let exception_cidrs = aggregate(nets);
        FamilyPolicy {
            configured_pod_cidrs: Vec::new(),
            pod_cidrs: Vec::new(),
            pod: Vec::new().into(),
            nomasq: normalize(exception_cidrs.iter().map(Range::of_net).collect()).into(),
            exception_cidrs: exception_cidrs
                .into_iter()
                .filter(|n| Family::of(n) == family)
                .collect(),
        }
    }
}
