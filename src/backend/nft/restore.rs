//! Restore and teardown: records of removed default rules (checked before replay), putting
//! them back, and masqd's own table.

use anyhow::Result;
use ipnet::IpNet;
use rustables::sys;
use rustables::{Chain, ChainPolicy, ChainType, Hook, HookClass, MsgType, ProtocolFamily, Table};

use super::a;
use super::decode::match_default_rule;
use super::model::{ForeignRule, TABLE};
use super::observe::{genid, nat_postrouting, observe_foreign, table_exists};
use super::transaction::inet_table;
use crate::netlink::{NlError, Socket, Transaction, NLM_F_APPEND, NLM_F_CREATE};
use crate::policy::Family;
use crate::state::{hex, unhex, RemovedRule};

/// The record that lets teardown put a removed default rule back.
pub fn record_of(r: &ForeignRule) -> RemovedRule {
    RemovedRule {
        backend: "nft".into(),
        family: r.table_family.nft_keyword().into(),
        table: r.table.clone(),
        chain: r.chain.clone(),
        description: r.describe(),
        saddr: r.saddr.to_string(),
        oif_neq: r.oif_neq.clone(),
        expressions_hex: hex(&r.expressions),
        userdata_hex: r.userdata.as_deref().map(hex),
        legacy_rule: None,
    }
}

/// A recorded nftables rule checked by [`replayable`].
#[derive(Debug, Clone)]
pub struct Replay {
    /// Its table's family.
    pub family: Family,
    /// Raw NFTA_RULE_EXPRESSIONS payload.
    pub exprs: Vec<u8>,
    /// Raw NFTA_RULE_USERDATA payload.
    pub udata: Option<Vec<u8>>,
}

/// Checks that a record may be replayed: an nftables record of `ip`/`ip6 nat POSTROUTING` whose
/// expressions still decode as the broad default rule ([`match_default_rule`]) for the record's
/// source CIDR and interface. Returns the family and the raw bytes, or why not.
pub fn replayable(rec: &RemovedRule) -> Result<Replay, String> {
    let f = rec
        .family
        .known()
        .ok_or_else(|| format!("unknown family {:?}", rec.family.as_str()))?;
    if rec.backend.known() != Some(crate::backend::Backend::Nft)
        || rec.table != "nat"
        || rec.chain != "POSTROUTING"
    {
        return Err(format!(
            "not a rule of {} nat POSTROUTING ({} {} {})",
            rec.family, rec.backend, rec.table, rec.chain
        ));
    }
    let exprs = unhex(&rec.expressions_hex).ok_or("expressions_hex is not hex")?;
    let udata = match &rec.userdata_hex {
        Some(h) => Some(unhex(h).ok_or("userdata_hex is not hex")?),
        None => None,
    };
    if udata.as_ref().is_some_and(|u| u.len() > 256) {
        return Err("userdata longer than the kernel's 256 bytes".into());
    }
    let saddr: IpNet = rec
        .saddr
        .parse()
        .map_err(|_| format!("saddr {:?} is not a CIDR", rec.saddr))?;
    match match_default_rule(f, &exprs) {
        Some((s, oif)) if s == saddr && oif == rec.oif_neq => Ok(Replay {
            family: f,
            exprs,
            udata,
        }),
        Some((s, oif)) => Err(format!(
            "its expressions are a masquerade rule for {s} (! -o {oif:?}), not for {saddr} \
             (! -o {:?})",
            rec.oif_neq
        )),
        None => Err("its expressions are not a broad masquerade rule".into()),
    }
}

/// Puts recorded default rules back, in one transaction, creating `table <family> nat` and its
/// chain `POSTROUTING` where missing (as iptables-nft creates them). A record whose rule is
/// present already (Docker re-inserted it) is skipped. Every record is checked with
/// [`replayable`] first. Returns the descriptions of the rules put back. Equals
/// `nft add table ip nat; nft add chain ip nat POSTROUTING { type nat hook postrouting priority
/// srcnat; policy accept; }; nft add rule ip nat POSTROUTING …` per record, atomically.
pub fn restore_rules(sock: &mut Socket, records: &[&RemovedRule]) -> Result<Vec<String>> {
    let genid = genid(sock)?;
    let mut txn = Transaction::new(Some(genid));
    let mut restored = Vec::new();
    for f in Family::ALL {
        let recs: Vec<_> = records
            .iter()
            .filter(|r| r.family.known() == Some(f))
            .collect();
        if recs.is_empty() {
            continue;
        }
        let present_now = observe_foreign(sock, f)?;
        let (mut table, mut chain) = nat_postrouting(sock, f)?;
        for rec in recs {
            let Replay { exprs, udata, .. } = replayable(rec)
                .map_err(|why| anyhow::anyhow!("record of {}: {why}", rec.description))?;
            let present = present_now.iter().any(|r| {
                r.table == rec.table
                    && r.chain == rec.chain
                    && r.saddr.to_string() == rec.saddr
                    && r.oif_neq == rec.oif_neq
            });
            if present {
                continue;
            }
            if !table {
                add_nat_table(&mut txn, f);
                table = true;
            }
            if !chain {
                add_nat_postrouting(&mut txn, f);
                chain = true;
            }
            add_recorded_rule(&mut txn, f, rec, &exprs, udata.as_deref());
            restored.push(rec.description.clone());
        }
    }
    sock.commit(txn)?;
    Ok(restored)
}

/// `table ip nat` / `table ip6 nat`, as rustables encodes it.
fn nat_table(f: Family) -> Table {
    let family = match f {
        Family::V4 => ProtocolFamily::Ipv4,
        Family::V6 => ProtocolFamily::Ipv6,
    };
    Table::new(family).with_name("nat")
}

/// `nft add table ip nat` (or `ip6`).
fn add_nat_table(txn: &mut Transaction, f: Family) {
    txn.add_objects(format!("add table {} nat", f.nft_keyword()), |b| {
        b.add(&nat_table(f), MsgType::Add)
    });
}

/// `nft add chain ip nat POSTROUTING { type nat hook postrouting priority srcnat; policy
/// accept; }` (or `ip6`), as iptables-nft creates it.
fn add_nat_postrouting(txn: &mut Transaction, f: Family) {
    let what = format!("add chain {} nat POSTROUTING", f.nft_keyword());
    txn.add_objects(what, |b| {
        let c = Chain::new(&nat_table(f))
            .with_name("POSTROUTING")
            .with_hook(Hook::new(HookClass::PostRouting, 100))
            .with_policy(ChainPolicy::Accept)
            .with_type(ChainType::Nat);
        b.add(&c, MsgType::Add)
    });
}

/// `nft add rule ip nat POSTROUTING …`: a recorded rule put back verbatim (its raw
/// expressions and userdata), at the end of the chain.
fn add_recorded_rule(
    txn: &mut Transaction,
    f: Family,
    rec: &RemovedRule,
    exprs: &[u8],
    udata: Option<&[u8]>,
) {
    let what = format!("add rule {}", rec.description);
    txn.message(
        sys::NFT_MSG_NEWRULE,
        NLM_F_CREATE | NLM_F_APPEND,
        f.nfproto(),
        what,
        |w| {
            w.put_str(a(sys::NFTA_RULE_TABLE), &rec.table);
            w.put_str(a(sys::NFTA_RULE_CHAIN), &rec.chain);
            let l = w.nest_begin(a(sys::NFTA_RULE_EXPRESSIONS));
            w.raw(exprs);
            w.nest_end(l);
            if let Some(u) = udata {
                w.put(a(sys::NFTA_RULE_USERDATA), u);
            }
        },
    );
}

/// Whether masqd's table exists. Equals `nft list table inet masqd` succeeding.
pub fn own_table_exists(sock: &mut Socket) -> Result<bool> {
    Ok(table_exists(sock)?)
}

/// Removes masqd's table, if it exists. Equals `nft delete table inet masqd`.
pub fn delete_own_table(sock: &mut Socket) -> Result<(), NlError> {
    let genid = genid(sock)?;
    let mut txn = Transaction::new(Some(genid));
    if table_exists(sock)? {
        txn.add_objects(format!("delete table inet {TABLE}"), |b| {
            b.add(&inet_table(), MsgType::Del)
        });
    }
    sock.commit(txn)
}
