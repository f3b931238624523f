//! Detection facts of nftables for one family ([`NftFacts`]), read over netlink.

use anyhow::Result;
use rustables::sys;

use super::model::{CHAIN, TABLE};
use super::observe::{list_rules, table_exists};
use super::{a, NFPROTO_INET};
use crate::netlink::Socket;
use crate::policy::Family;

/// What detection needs to know about nftables for one family.
#[derive(Debug, Clone, Default)]
pub struct NftFacts {
    /// Rules in tables of the family, plus inet tables other than masqd's.
    pub rules: usize,
    /// Chains of the family's tables: (family, table, chain).
    pub chains: Vec<(String, String, String)>,
    /// Whether masqd's table holds the policy of this family (its masquerade rule; the
    /// guard alone, kept for a legacy family, does not count).
    pub masqd: bool,
}

/// Detection facts. Equals `nft -j list ruleset` counted, read over netlink.
pub fn facts(sock: &mut Socket, f: Family) -> Result<NftFacts> {
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
    if table_exists(sock)? {
        // masqd's policy, not the guard that legacy mode keeps here: its masquerade rule.
        let want = format!("masqd:masquerade:{}", f.digit());
        out.masqd = list_rules(sock, NFPROTO_INET, TABLE, CHAIN)?
            .iter()
            .any(|r| r.comment.as_deref().is_some_and(|c| c.starts_with(&want)));
    }
    Ok(out)
}
