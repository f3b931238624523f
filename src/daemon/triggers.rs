//! What asks the daemon for a reconcile, as a typed [`Trigger`] (its `Display` is the reason
//! the logs show), which nftables notifications count as one, and the bookkeeping of lost
//! notifications ([`Overflow`]).

use std::fmt;

use rustables::sys::{
    NFT_MSG_DELCHAIN, NFT_MSG_DELRULE, NFT_MSG_DELTABLE, NFT_MSG_NEWCHAIN, NFT_MSG_NEWRULE,
    NFT_MSG_NEWTABLE,
};
use rustables::ProtocolFamily;

use crate::backend::TABLE;
use crate::detect::HINT_CHAINS;
use crate::netlink::Event;
use crate::policy::Family;

/// The chain of iptables-nft's nat tables where masqd looks for the broad default rule.
const BROAD_RULE_CHAIN: &str = "POSTROUTING";

/// Why a reconcile is wanted. Triggers that arrive while one is pending coalesce into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The daemon started.
    Start,
    /// A reload read a configuration that differs from the running one.
    ConfigChanged,
    /// SIGHUP (a reload also asks for a resync).
    Reload,
    /// An nftables notification that concerns masqd (see [`relevant`]).
    NetlinkEvent,
    /// nftables notifications were lost (ENOBUFS on the event socket, or a read error).
    MonitorOverflow,
    /// The ruleset changed while masqd's notifications were muted around a large commit.
    MissedEvents,
    /// The legacy nat table's info (entry count, size, hook offsets) changed: someone else
    /// committed to legacy xtables.
    LegacyChanged,
    /// masqd committed to legacy xtables: the table is read once more, since a commit by
    /// someone else right after masqd's cannot be told from it by the info alone.
    LegacyVerify,
    /// The resync timer.
    Resync,
    /// The full verification timer (`daemon.full_verify_interval`): everything read back.
    FullVerify,
    /// The reconcile task died; the same work again.
    Retry,
}

impl Trigger {
    /// Whether this reconcile also reads the other NAT rules for the metrics (a dump of every
    /// rule): at start-up, a reload or configuration change and a full verification; a resync
    /// only when rules changed since the last reading (the loop asks [`super::follow::Follow`]).
    pub fn reads_all_rules(self) -> bool {
        matches!(
            self,
            Trigger::Start | Trigger::FullVerify | Trigger::Reload | Trigger::ConfigChanged
        )
    }

    /// Whether this reconcile may decide the backend from the legacy detection facts of the
    /// last one (no `iptables-legacy-save` for detection): only after nftables notifications,
    /// which say nothing about legacy xtables. A legacy change, the resync (the safety net),
    /// start-up, reloads and retries read them again.
    pub fn keeps_legacy_facts(self) -> bool {
        matches!(
            self,
            Trigger::NetlinkEvent | Trigger::MonitorOverflow | Trigger::MissedEvents
        )
    }

    /// The trigger of a drained batch of nftables notifications, if it asks for a reconcile.
    pub fn from_events(events: &[Event], own_pid: u32) -> Option<Trigger> {
        if events.contains(&Event::Overrun) {
            Some(Trigger::MonitorOverflow)
        } else if events.iter().any(|e| relevant(e, own_pid)) {
            Some(Trigger::NetlinkEvent)
        } else {
            None
        }
    }
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Trigger::Start => "start-up",
            Trigger::ConfigChanged => "configuration change",
            Trigger::Reload => "SIGHUP",
            Trigger::NetlinkEvent => "nftables change",
            Trigger::MonitorOverflow => "lost nftables notifications",
            Trigger::MissedEvents => "ruleset changed while masqd was committing",
            Trigger::LegacyChanged => "legacy xtables change",
            Trigger::LegacyVerify => "verifying masqd's legacy commit",
            Trigger::Resync => "resync",
            Trigger::FullVerify => "full verification",
            Trigger::Retry => "retry",
        })
    }
}

/// Whether a notification by someone else asks for a reconcile by itself: a change to masqd's
/// own table; to the chain where a broad default rule lives (`POSTROUTING` of `ip nat` /
/// `ip6 nat`, iptables-nft's tables) or to those tables themselves; a hint chain detection
/// reads; a table deleted anywhere (the rules it held are counted no more). Rule churn in
/// other chains (kube-proxy's) causes no work: the rule counts it moves are followed by
/// [`super::follow::Follow`] and decide a backend only while masqd's own policy is in neither.
/// Lost notifications always count.
pub fn relevant(e: &Event, own_pid: u32) -> bool {
    let (kind, family, pid, table, name) = match e {
        Event::Change {
            kind,
            family,
            pid,
            table,
            name,
            ..
        } => (kind, family, pid, table, name),
        // Elements of masqd's sets changed by someone else: a repair.
        Event::Elements {
            family, pid, table, ..
        } => return *pid != own_pid && own_table(*family, table.as_deref()),
        Event::Overrun => return true,
        Event::Generation { .. } => return false,
    };
    if *pid == own_pid {
        return false;
    }
    let nat_family = *family == Family::V4.nfproto() || *family == Family::V6.nfproto();
    let inet = i32::from(*family) == ProtocolFamily::Inet as i32;
    let kind = u32::from(*kind);
    let chain_or_rule = matches!(
        kind,
        NFT_MSG_NEWCHAIN | NFT_MSG_DELCHAIN | NFT_MSG_NEWRULE | NFT_MSG_DELRULE
    );
    let chain = matches!(kind, NFT_MSG_NEWCHAIN | NFT_MSG_DELCHAIN);
    // A message without the name it should carry is taken as concerning masqd.
    let named = |want: &[&str]| name.as_deref().is_none_or(|n| want.contains(&n));
    match table.as_deref() {
        t if own_table(*family, t) => true,
        _ if kind == NFT_MSG_DELTABLE && (nat_family || inet) => true,
        _ if chain && nat_family && name.is_some() && named(&HINT_CHAINS) => true,
        Some("nat") if nat_family => match kind {
            NFT_MSG_NEWTABLE | NFT_MSG_DELTABLE => true,
            _ => chain_or_rule && named(&[BROAD_RULE_CHAIN]),
        },
        _ => false,
    }
}

/// Whether a notification's family and table are masqd's own: `table inet masqd`.
pub(super) fn own_table(family: u8, table: Option<&str>) -> bool {
    i32::from(family) == ProtocolFamily::Inet as i32 && table == Some(TABLE)
}

/// Lost nftables notifications (`ENOBUFS` on the event socket, or an error reading it): a full
/// reconcile that trusts no set cache follows, and each burst is logged once, with its end.
#[derive(Debug, Default)]
pub struct Overflow {
    /// The current burst was logged.
    warned: bool,
    /// Notifications were lost since the last reconcile started.
    unseen: bool,
    /// The reconcile now running started after lost notifications.
    covered: bool,
}

impl Overflow {
    /// Notifications were lost (`why` is logged once per burst).
    pub fn lost(&mut self, why: &str) {
        if !std::mem::replace(&mut self.warned, true) {
            tracing::warn!("nftables notifications were lost ({why}): resyncing everything");
        }
        self.unseen = true;
    }

    /// A reconcile starts: whether it must read everything (no cache).
    pub fn starting(&mut self) -> bool {
        self.covered = std::mem::take(&mut self.unseen);
        self.covered
    }

    /// A reconcile ended: whether its set cache may be kept.
    pub fn ended(&mut self, ok: bool) -> bool {
        let covered = std::mem::take(&mut self.covered);
        if !ok {
            self.unseen |= covered;
        } else if covered && !self.unseen {
            self.warned = false;
            tracing::info!("resynced with the kernel after lost nftables notifications");
        }
        !self.unseen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The numbers of linux/netfilter.h and linux/netfilter/nf_tables.h, written out here as
    // an independent source (NFT_MSG_NEWRULE is 6, NFT_MSG_NEWGEN 15).
    const NFPROTO_INET: u8 = 1;
    const NFPROTO_IPV4: u8 = 2;
    const NFPROTO_IPV6: u8 = 10;

    fn change(family: u8, table: &str, pid: u32) -> Event {
        rule(family, table, "POSTROUTING", pid)
    }

    fn msg(kind: u16, family: u8, table: &str, name: Option<&str>, pid: u32) -> Event {
        Event::Change {
            kind,
            family,
            pid,
            res_id: 0,
            table: Some(table.into()),
            name: name.map(str::to_string),
        }
    }

    fn rule(family: u8, table: &str, chain: &str, pid: u32) -> Event {
        msg(6, family, table, Some(chain), pid)
    }

    #[test]
    fn relevance() {
        assert!(relevant(&change(NFPROTO_INET, "masqd", 99), 7));
        assert!(
            !relevant(&change(NFPROTO_INET, "masqd", 7), 7),
            "own change"
        );
        assert!(relevant(&change(NFPROTO_IPV4, "nat", 99), 7));
        assert!(!relevant(&change(NFPROTO_IPV4, "filter", 99), 7));
        assert!(!relevant(&change(NFPROTO_INET, "other", 99), 7));
        assert!(relevant(&Event::Overrun, 7));
    }

    #[test]
    fn relevance_by_family_and_generation() {
        assert!(relevant(&change(NFPROTO_IPV6, "nat", 99), 7));
        assert!(
            !relevant(&change(NFPROTO_INET, "nat", 99), 7),
            "inet nat is not iptables-nft's"
        );
        assert!(
            !relevant(&change(NFPROTO_IPV4, "masqd", 99), 7),
            "ip masqd is not masqd's table"
        );
        let newgen = Event::Generation { id: 5, pid: 99 };
        assert!(
            !relevant(&newgen, 7),
            "generation messages follow every commit"
        );
    }

    #[test]
    fn churn_in_other_chains_is_no_work() {
        // kube-proxy's chains in ip nat: rules come and go all the time.
        assert!(!relevant(&rule(NFPROTO_IPV4, "nat", "KUBE-SVC-ABC", 99), 7));
        assert!(!relevant(&rule(NFPROTO_IPV6, "nat", "KUBE-SEP-XYZ", 99), 7));
        let del = msg(8, NFPROTO_IPV4, "nat", Some("KUBE-SERVICES"), 99);
        assert!(!relevant(&del, 7));
        assert!(!relevant(
            &msg(3, NFPROTO_IPV4, "nat", Some("KUBE-NEW"), 99),
            7
        ));
        // Where the broad rule lives, and the tables themselves, do count.
        assert!(relevant(
            &msg(8, NFPROTO_IPV4, "nat", Some("POSTROUTING"), 99),
            7
        ));
        assert!(relevant(
            &msg(5, NFPROTO_IPV6, "nat", Some("POSTROUTING"), 99),
            7
        ));
        assert!(relevant(&msg(0, NFPROTO_IPV4, "nat", None, 99), 7));
        assert!(
            relevant(&msg(6, NFPROTO_IPV4, "nat", None, 99), 7),
            "unnamed"
        );
        // A deleted table anywhere: its rules are counted no more.
        assert!(relevant(&msg(2, NFPROTO_IPV4, "filter", None, 99), 7));
        assert!(relevant(&msg(2, NFPROTO_INET, "firewalld", None, 99), 7));
        assert!(!relevant(&msg(0, NFPROTO_INET, "firewalld", None, 99), 7));
        // Hint chains, in any table of the family.
        let hint = msg(3, NFPROTO_IPV4, "mangle", Some("KUBE-IPTABLES-HINT"), 99);
        assert!(relevant(&hint, 7));
        assert!(!relevant(&msg(3, NFPROTO_IPV4, "mangle", Some("X"), 99), 7));
        // Set elements: masqd's, changed by someone else, are a repair; others' are not.
        let elems = |family, table: &str, pid| Event::Elements {
            add: false,
            family,
            pid,
            res_id: 0,
            table: Some(table.into()),
            set: Some("nomasq4".into()),
            elements: vec![(vec![10, 0, 0, 0], false)],
        };
        assert!(relevant(&elems(NFPROTO_INET, "masqd", 99), 7));
        assert!(!relevant(&elems(NFPROTO_INET, "masqd", 7), 7), "own");
        assert!(!relevant(&elems(NFPROTO_IPV4, "nat", 99), 7));
        assert!(!relevant(&elems(NFPROTO_INET, "kube-proxy", 99), 7));
    }

    #[test]
    fn a_batch_of_notifications_is_one_trigger() {
        let foreign = change(NFPROTO_IPV4, "nat", 99);
        let own = change(NFPROTO_INET, "masqd", 7);
        assert_eq!(Trigger::from_events(std::slice::from_ref(&own), 7), None);
        assert_eq!(
            Trigger::from_events(&[own.clone(), foreign.clone()], 7),
            Some(Trigger::NetlinkEvent)
        );
        assert_eq!(
            Trigger::from_events(&[foreign, Event::Overrun], 7),
            Some(Trigger::MonitorOverflow),
            "an overrun wins: the cache cannot be trusted"
        );
    }

    /// Every trigger, with the reason its logs show.
    const REASONS: [(Trigger, &str); 11] = [
        (Trigger::Start, "start-up"),
        (Trigger::ConfigChanged, "configuration change"),
        (Trigger::Reload, "SIGHUP"),
        (Trigger::NetlinkEvent, "nftables change"),
        (Trigger::MonitorOverflow, "lost nftables notifications"),
        (
            Trigger::MissedEvents,
            "ruleset changed while masqd was committing",
        ),
        (Trigger::LegacyChanged, "legacy xtables change"),
        (Trigger::LegacyVerify, "verifying masqd's legacy commit"),
        (Trigger::Resync, "resync"),
        (Trigger::FullVerify, "full verification"),
        (Trigger::Retry, "retry"),
    ];

    #[test]
    fn reasons_read_as_before() {
        for (t, s) in REASONS {
            assert_eq!(t.to_string(), s);
        }
        let full: Vec<Trigger> = REASONS
            .iter()
            .map(|(t, _)| *t)
            .filter(|t| t.reads_all_rules())
            .collect();
        assert_eq!(
            full,
            [
                Trigger::Start,
                Trigger::ConfigChanged,
                Trigger::Reload,
                Trigger::FullVerify
            ]
        );
    }

    #[test]
    fn only_nftables_notifications_keep_the_legacy_facts() {
        use Trigger::*;
        let kept: Vec<Trigger> = REASONS
            .iter()
            .map(|(t, _)| *t)
            .filter(|t| t.keeps_legacy_facts())
            .collect();
        assert_eq!(kept, [NetlinkEvent, MonitorOverflow, MissedEvents]);
    }

    #[test]
    fn lost_notifications_mean_one_full_resync_per_burst() {
        let mut o = Overflow::default();
        assert!(!o.starting(), "no overflow: the cache may be used");
        assert!(o.ended(true));
        o.lost("a");
        o.lost("b");
        assert!(o.warned, "the burst is logged");
        assert!(o.starting(), "the next reconcile reads everything");
        o.lost("c"); // more lost while it runs: its cache is not kept, one more full pass
        assert!(!o.ended(true));
        assert!(o.warned, "still the same burst");
        assert!(o.starting());
        assert!(!o.ended(false), "a failed resync is owed again");
        assert!(o.starting());
        assert!(o.ended(true));
        assert!(!o.warned, "the burst is over: the next one is logged again");
        assert!(!o.starting());
    }
}
