//! What the one-shot commands ask of the backends beyond the [`super::Driver`] interface: the
//! kernel's nft driver over a socket of its own, the reads of `masqd explain` (masqd's chain,
//! single-element set lookups, the legacy nat table, the other NAT rules) as one plain struct,
//! the iptables payload of `masqd export`, the legacy save-format helpers explain's pure walk
//! needs, the names explain shows, and whether a backend's error is a refusal for lack of
//! privilege. The CLI and explain call these and [`crate::engine`], never the nft or legacy
//! modules.

use std::net::IpAddr;

use anyhow::{Context, Result};

use super::legacy;
use super::nft::{self, lookup};
use super::{Backend, Driver, NftDriver};
use crate::explain::ChainRule;
use crate::foreign::NatRule;
use crate::netlink::Socket;
use crate::policy::{Family, FamilyPolicy, Policy};

pub use super::legacy::LegacyObserved;
pub use super::nft::lookup::Lookup;
pub use super::nft::model::{RuleSpec, CHAIN_PRIORITY};
pub use super::nft::plan::desired_rules;
// The backends' error types whose privilege refusals `is_denied` recognises.
pub use crate::exec::ExecError;
pub use crate::netlink::NlError;

/// The legacy chain masqd's policy lives in (`MASQD-POSTROUTING`).
pub const LEGACY_CHAIN: &str = legacy::CHAIN;

/// The rule of the legacy POSTROUTING chain that jumps to [`LEGACY_CHAIN`], as
/// `iptables-legacy-save -t nat` prints it after `-A POSTROUTING`.
pub const LEGACY_JUMP: &str = legacy::JUMP;

/// The entry of a family's status counters that counts the rules of [`LEGACY_CHAIN`] (the
/// other entries are nftables sets).
pub const LEGACY_CHAIN_ENTRY: &str = "legacy-chain";

/// The kernel's nftables driver over a netlink socket of its own, for one command.
pub struct Nftables {
    nft: NftDriver,
}

impl Nftables {
    /// Opens a netfilter netlink socket (`socket(AF_NETLINK, SOCK_RAW, NETLINK_NETFILTER)`);
    /// the error is the socket's own, without context.
    pub fn open() -> Result<Nftables> {
        Ok(Nftables {
            nft: NftDriver::new(Socket::open()?, None),
        })
    }

    /// The driver: for detection, planning and the other NAT rules through the engine.
    pub fn driver(&mut self) -> &mut dyn Driver {
        &mut self.nft
    }

    /// Reads what `masqd explain` needs for `ask`: in nftables (when `ask.nft`) masqd's table,
    /// the rules of its chain, SRC in the pod set and DST in the exception set, the other NAT
    /// rules; in legacy xtables (when `ask.legacy` and the binaries exist) the family's nat
    /// table and its other NAT rules. Equals `nft list table inet masqd` + `nft -a list chain
    /// inet masqd postrouting` + `nft get element inet masqd pod4 { SRC }` + `nft get element
    /// inet masqd nomasq4 { DST }` + `nft -a list ruleset` (filtered to NAT rules) +
    /// `iptables-legacy-save -t nat`.
    pub fn read_for_explain(&mut self, ask: &ExplainAsk) -> Result<ExplainRead> {
        let mut r = ExplainRead {
            table: false,
            chain: Vec::new(),
            pod: Lookup::NoSet,
            nomasq: Lookup::NoSet,
            legacy: None,
            foreign: Vec::new(),
        };
        if ask.nft {
            self.read_nft(ask, &mut r)?;
        }
        if ask.legacy {
            read_legacy(ask.family, &mut r)?;
        }
        Ok(r)
    }

    /// The nftables part of [`Nftables::read_for_explain`].
    fn read_nft(&mut self, ask: &ExplainAsk, r: &mut ExplainRead) -> Result<()> {
        let f = ask.family;
        let sock = self.nft.socket();
        r.table = nft::own_table_exists(sock)?;
        if r.table {
            let [pod, nomasq] = super::set_names(f);
            r.chain = lookup::masqd_chain(sock)?;
            r.pod = lookup::range_of(sock, &pod, f, ask.src)?;
            r.nomasq = lookup::range_of(sock, &nomasq, f, ask.dst)?;
        }
        r.foreign = nft::foreign::nat_rules(sock).context("reading other NAT rules")?;
        Ok(())
    }
}

/// The legacy part of [`Nftables::read_for_explain`]. Equals `iptables-legacy-save -c -t nat`
/// of family `f`, when its binaries exist.
fn read_legacy(f: Family, r: &mut ExplainRead) -> Result<()> {
    if let Some(bins) = legacy::binaries(f) {
        let lo = legacy::observe(f, &bins)
            .with_context(|| format!("reading the legacy {f} nat table"))?;
        r.foreign.extend(legacy::nat_rules(f, &lo));
        r.legacy = Some(lo);
    }
    Ok(())
}

/// What `masqd explain` asks of the kernel about one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExplainAsk {
    /// The connection's address family.
    pub family: Family,
    /// The source address, as a number (looked up in the pod set).
    pub src: u128,
    /// The destination address, as a number (looked up in the exception set).
    pub dst: u128,
    /// Whether nf_tables answers (masqd's table can exist): read the nftables side.
    pub nft: bool,
    /// Whether the family's policy or default rules live in legacy xtables: read its nat table.
    pub legacy: bool,
}

/// What the kernel holds for one `masqd explain` query ([`Nftables::read_for_explain`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExplainRead {
    /// Whether `table inet masqd` exists.
    pub table: bool,
    /// The rules of `inet masqd postrouting`, in order.
    pub chain: Vec<ChainRule>,
    /// The lookup of SRC in the set `pod4`/`pod6`.
    pub pod: Lookup,
    /// The lookup of DST in the set `nomasq4`/`nomasq6`.
    pub nomasq: Lookup,
    /// The legacy nat table of the family, when it was read.
    pub legacy: Option<LegacyObserved>,
    /// The other components' source NAT rules (nftables and legacy xtables).
    pub foreign: Vec<NatRule>,
}

/// The `iptables-legacy-restore --noflush` payload of family `f` (`masqd export --format
/// iptables`), built against the legacy nat table as it is (read with `iptables-legacy-save -c
/// -t nat` when the binaries exist), with `notes` as comments. None when `policy` has no `f`
/// part.
pub fn export_legacy(f: Family, policy: &Policy, notes: &[String]) -> Result<Option<String>> {
    let Some(fp) = policy.family(f) else {
        return Ok(None);
    };
    let lo = match legacy::binaries(f) {
        Some(bins) => legacy::observe(f, &bins)?,
        None => Default::default(),
    };
    let (bridges, random_fully) = (&policy.bridges, policy.random_fully);
    Ok(Some(legacy::export(
        f,
        fp,
        bridges,
        random_fully,
        &lo,
        notes,
    )))
}

/// Whether the legacy POSTROUTING chain jumps to `MASQD-POSTROUTING` (`iptables-legacy-save -t
/// nat` lists `-A POSTROUTING -m comment --comment masqd -j MASQD-POSTROUTING`).
pub fn legacy_jumps(lo: &LegacyObserved) -> bool {
    lo.postrouting.iter().any(|r| r == legacy::JUMP)
}

/// The words of a rule as `iptables-legacy-save` prints it (quotes removed); None when it does
/// not split.
pub fn legacy_rule_words(spec: &str) -> Option<Vec<String>> {
    legacy::split_saved(spec).map(|w| w.into_iter().map(|w| w.text).collect())
}

/// Whether an address of `iptables-legacy-save` (`10.0.0.0/8`, `10.0.0.1`) holds `a`.
pub fn saved_net_holds(s: &str, a: IpAddr) -> bool {
    legacy::parse_saved_net(s).is_some_and(|n| n.contains(&a))
}

/// The rules `masqd apply` puts in `MASQD-POSTROUTING` for `fp` (after `-A MASQD-POSTROUTING`,
/// as `iptables-legacy-save` prints them).
pub fn desired_legacy_chain(fp: &FamilyPolicy, policy: &Policy) -> Vec<String> {
    legacy::desired_chain(fp, &policy.bridges, policy.random_fully)
}

/// When the legacy chain differs from what `fp` wants: its name, how many rules it holds and
/// how many the configuration wants (the rules of `iptables-legacy-save -t nat` compared with
/// the restore payload's).
pub fn legacy_drift(
    lo: &LegacyObserved,
    fp: &FamilyPolicy,
    policy: &Policy,
) -> Option<(&'static str, usize, usize)> {
    let want = desired_legacy_chain(fp, policy);
    (!legacy::same_rules(&lo.chain_rules, &want)).then_some((
        legacy::CHAIN,
        lo.chain_rules.len(),
        want.len(),
    ))
}

/// Where a rule is in its backend, as status and explain print it: `rule N` (its 1-based
/// position in a legacy chain) or `handle N` (an nftables handle; also for a backend this
/// masqd does not know).
pub fn position(backend: Option<Backend>, n: u64) -> String {
    match backend {
        Some(Backend::Legacy) => format!("rule {n}"),
        _ => format!("handle {n}"),
    }
}

/// EPERM or EACCES.
pub fn denied_errno(errno: i32) -> bool {
    errno == libc::EPERM || errno == libc::EACCES
}

/// Whether some error in `e`'s chain is a backend's refusal for lack of privilege: EPERM or
/// EACCES from netlink ([`NlError`]), or a legacy binary that says so ("Permission denied (you
/// must be root)", an [`ExecError`]).
pub fn is_denied(e: &anyhow::Error) -> bool {
    e.chain().any(refused_for_privilege)
}

/// [`is_denied`] for one error of a chain.
fn refused_for_privilege(e: &(dyn std::error::Error + 'static)) -> bool {
    if let Some(n) = e.downcast_ref::<NlError>() {
        return match n {
            NlError::Kernel { errno, .. } => denied_errno(*errno),
            NlError::Io { source, .. } => source.raw_os_error().is_some_and(denied_errno),
            _ => false,
        };
    }
    match e.downcast_ref::<ExecError>() {
        Some(ExecError::Failed { stderr, .. }) => {
            stderr.contains("Permission denied") || stderr.contains("you must be root")
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(errno: i32) -> anyhow::Error {
        anyhow::Error::new(NlError::Kernel {
            errno,
            what: "get gen".into(),
            ext: None,
        })
    }

    fn io(errno: i32) -> anyhow::Error {
        anyhow::Error::new(NlError::Io {
            what: "opening a netfilter netlink socket".into(),
            source: std::io::Error::from_raw_os_error(errno),
        })
    }

    #[test]
    fn privilege_refusals_of_netlink_are_eperm_and_eacces_only() {
        assert!(is_denied(&kernel(libc::EPERM).context("opening netlink")));
        assert!(is_denied(&kernel(libc::EACCES)));
        assert!(is_denied(&io(libc::EPERM)));
        for errno in [libc::ENOENT, libc::EOPNOTSUPP, libc::EBUSY] {
            assert!(!is_denied(&kernel(errno)), "{errno}");
            assert!(!is_denied(&io(errno)), "{errno}");
        }
        assert!(!is_denied(&anyhow::Error::new(NlError::Malformed(
            "short header".into()
        ))));
        // A plain I/O error is not a backend's: the CLI classifies the state directory's.
        let plain = anyhow::Error::new(std::io::Error::from_raw_os_error(libc::EACCES));
        assert!(!is_denied(&plain));
        assert!(!is_denied(&anyhow::anyhow!("Permission denied")));
    }

    #[test]
    fn a_legacy_binary_refuses_in_words() {
        let failed = |stderr: &str| {
            anyhow::Error::new(ExecError::Failed {
                cmd: "iptables-legacy-save".into(),
                why: "exit status 4".into(),
                stderr: stderr.into(),
            })
        };
        assert!(is_denied(&failed(
            "iptables-legacy-save v1.8.9 (legacy): Permission denied (you must be root)"
        )));
        assert!(is_denied(&failed("can't initialize: you must be root")));
        assert!(!is_denied(&failed("iptables-legacy-save: unknown option")));
        let timeout = anyhow::Error::new(ExecError::Timeout {
            cmd: "iptables-legacy-save".into(),
            timeout: std::time::Duration::from_secs(5),
            why: "Permission denied".into(),
        });
        assert!(!is_denied(&timeout));
    }

    #[test]
    fn positions_are_rules_in_legacy_and_handles_in_nftables() {
        assert_eq!(position(Some(Backend::Legacy), 2), "rule 2");
        assert_eq!(position(Some(Backend::Nft), 7), "handle 7");
        assert_eq!(position(None, 7), "handle 7");
    }

    #[test]
    fn legacy_save_helpers_read_iptables_save_text() {
        let lo = LegacyObserved::from_save(
            "*nat\n:POSTROUTING ACCEPT [0:0]\n:MASQD-POSTROUTING - [0:0]\n\
             -A POSTROUTING -m comment --comment masqd -j MASQD-POSTROUTING\n\
             -A MASQD-POSTROUTING -s 172.7.21.0/24 -d 172.7.0.0/16 -j RETURN\n\
             COMMIT\n",
        );
        assert!(legacy_jumps(&lo));
        assert!(!legacy_jumps(&LegacyObserved::default()));
        assert_eq!(
            legacy_rule_words("-s 172.7.21.0/24 -m comment --comment \"a b\" -j RETURN"),
            Some(
                [
                    "-s",
                    "172.7.21.0/24",
                    "-m",
                    "comment",
                    "--comment",
                    "a b",
                    "-j",
                    "RETURN"
                ]
                .map(String::from)
                .to_vec()
            )
        );
        assert_eq!(legacy_rule_words("-j \"open"), None);
        let a = |s: &str| s.parse::<IpAddr>().expect("an address");
        assert!(saved_net_holds("10.0.0.0/8", a("10.200.0.1")));
        assert!(saved_net_holds("10.0.0.1", a("10.0.0.1")));
        assert!(!saved_net_holds("10.0.0.1", a("10.0.0.2")));
        assert!(!saved_net_holds("not-a-net", a("10.0.0.2")));
        assert_eq!(
            (LEGACY_CHAIN, LEGACY_CHAIN_ENTRY),
            ("MASQD-POSTROUTING", "legacy-chain")
        );
    }
}
