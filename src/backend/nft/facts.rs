//! Detection facts of nftables for one family ([`NftFacts`]), read over netlink, and the
//! expensive part of them (rule counts, hint chains) followed from change notifications
//! ([`Counted`], [`TxnDelta`]) so that the daemon never dumps every rule of the ruleset again
//! while the event stream can be trusted.

use anyhow::Result;
use rustables::sys;

use super::model::{CHAIN, TABLE};
use super::observe::{list_rules, table_exists};
use super::{a, family_of_nfproto, NFPROTO_INET};
use crate::detect::HINT_CHAINS;
use crate::netlink::{Event, Socket};
use crate::policy::Family;

/// The counted part of what detection needs to know about nftables for one family (whether
/// masqd's own policy is there is [`own_policy`]).
#[derive(Debug, Clone, Default)]
pub struct NftFacts {
    /// Rules in tables of the family, plus inet tables other than masqd's.
    pub rules: usize,
    /// Chains of the family's tables: (family, table, chain).
    pub chains: Vec<(String, String, String)>,
}

/// The counted detection facts of family `f` (masqd's own policy is [`own_policy`]): rules of the family's tables and of inet tables other than
/// masqd's, and the family's chains. Equals `nft -j list ruleset` counted (every rule dumped).
pub fn counted(sock: &mut Socket, f: Family) -> Result<NftFacts> {
    let mut out = NftFacts::default();
    let fam = f.nfproto();
    for family in [fam, NFPROTO_INET] {
        let rules = sock.dump(sys::NFT_MSG_GETRULE, family, "list rules", |_| {})?;
        out.rules += rules
            .iter()
            .filter(|m| {
                m.attrs().get(a(sys::NFTA_RULE_TABLE)).and_then(|x| x.str()) != Some(TABLE)
                    || family != NFPROTO_INET
            })
            .count();
    }
    let chains = sock.dump(sys::NFT_MSG_GETCHAIN, fam, "list chains", |_| {})?;
    for m in &chains {
        let at = m.attrs();
        let t = at
            .get(a(sys::NFTA_CHAIN_TABLE))
            .and_then(|x| x.str())
            .unwrap_or_default();
        let c = at
            .get(a(sys::NFTA_CHAIN_NAME))
            .and_then(|x| x.str())
            .unwrap_or_default();
        out.chains
            .push((f.nft_keyword().to_string(), t.to_string(), c.to_string()));
    }
    Ok(out)
}

/// Whether masqd's table holds the policy of family `f` (its masquerade rule, not the guard
/// that legacy mode keeps there). Equals `nft -a list chain inet masqd postrouting` searched
/// for the rule tagged `masqd:masquerade:<4|6>`.
pub fn own_policy(sock: &mut Socket, f: Family) -> Result<bool> {
    if !table_exists(sock)? {
        return Ok(false);
    }
    let want = format!("masqd:masquerade:{}", f.digit());
    Ok(list_rules(sock, NFPROTO_INET, TABLE, CHAIN)?
        .iter()
        .any(|r| r.comment.as_deref().is_some_and(|c| c.starts_with(&want))))
}

/// The counted facts of one family as of ruleset generation `gen`, followed from then on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counted {
    /// The generation they are true at.
    pub gen: u32,
    /// As [`NftFacts::rules`].
    pub rules: usize,
    /// The hint chains (`family table/chain`), as detection names them.
    pub hints: Vec<String>,
}

impl Counted {
    /// The counted facts read at generation `gen`.
    pub fn new(gen: u32, f: &NftFacts) -> Counted {
        Counted {
            gen,
            rules: f.rules,
            hints: f
                .chains
                .iter()
                .filter(|(_, _, c)| HINT_CHAINS.contains(&c.as_str()))
                .map(|(fam, t, c)| format!("{fam} {t}/{c}"))
                .collect(),
        }
    }

    /// Takes in the change of family `f` that generation `d.gen` made, unless it is older than
    /// these facts. False: they cannot be followed any more (gather them again).
    pub fn follow(&mut self, f: Family, d: &TxnDelta) -> bool {
        if d.gen <= self.gen {
            return true;
        }
        self.gen = d.gen;
        if d.regather {
            return false;
        }
        let Some(rules) = self.rules.checked_add_signed(d.rules[f.index()] as isize) else {
            return false;
        };
        self.rules = rules;
        for (fam, hint, added) in &d.hints {
            if *fam != f {
                continue;
            }
            self.hints.retain(|h| h != hint);
            if *added {
                self.hints.push(hint.clone());
            }
        }
        true
    }
}

/// What the notifications of one transaction change in what the daemon follows: the counted
/// facts, and someone else's changes to the elements of masqd's sets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TxnDelta {
    /// The generation the transaction made (0 until its `NEWGEN` is read).
    pub gen: u32,
    /// Rules added minus rules deleted, per family (`[ipv4, ipv6]`).
    pub rules: [i64; 2],
    /// Hint chains added (true) or deleted (false).
    pub hints: Vec<(Family, String, bool)>,
    /// A table was deleted (or flushed away): gather the facts again rather than trust that
    /// every one of its rules was notified.
    pub regather: bool,
    /// Elements of masqd's sets someone else added or deleted, in notification order.
    pub elements: Vec<ElemOp>,
}

/// One element of masqd's sets added or deleted by someone else (a notification).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElemOp {
    /// The set.
    pub set: String,
    /// Added (else deleted).
    pub add: bool,
    /// The key's bytes.
    pub key: Vec<u8>,
    /// It ends an interval (`NFT_SET_ELEM_INTERVAL_END`: one past the interval's last address).
    pub end: bool,
}

impl TxnDelta {
    /// Adds what notification `e` changes (whoever made it: masqd's own commits count too).
    /// Whether it changed anything.
    pub fn take(&mut self, e: &Event) -> bool {
        let Event::Change {
            kind,
            family,
            table,
            name,
            ..
        } = e
        else {
            return false;
        };
        let fams: &[Family] = match family_of_nfproto(*family) {
            Some(Family::V4) => &[Family::V4],
            Some(Family::V6) => &[Family::V6],
            None if *family == NFPROTO_INET && table.as_deref() != Some(TABLE) => &Family::ALL,
            None => return false,
        };
        match u32::from(*kind) {
            k @ (sys::NFT_MSG_NEWRULE | sys::NFT_MSG_DELRULE) => {
                let by = if k == sys::NFT_MSG_NEWRULE { 1 } else { -1 };
                for f in fams {
                    self.rules[f.index()] += by;
                }
            }
            k @ (sys::NFT_MSG_NEWCHAIN | sys::NFT_MSG_DELCHAIN) => {
                let (Some(t), Some(c)) = (table, name) else {
                    return false;
                };
                // Chains count for their own family only (as `counted` lists them).
                let Some(f) = family_of_nfproto(*family) else {
                    return false;
                };
                if !HINT_CHAINS.contains(&c.as_str()) {
                    return false;
                }
                let hint = format!("{} {t}/{c}", f.nft_keyword());
                self.hints.push((f, hint, k == sys::NFT_MSG_NEWCHAIN));
            }
            sys::NFT_MSG_DELTABLE => self.regather = true,
            _ => return false,
        }
        true
    }

    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.rules == [0, 0] && self.hints.is_empty() && !self.regather && self.elements.is_empty()
    }
}

#[cfg(test)]
#[path = "tests_facts.rs"]
mod tests;
