//! Single-element lookups in masqd's interval sets, for `masqd explain`: which range of a set
//! holds one address, asked of the kernel without dumping a set that can hold 60,000 intervals.
//!
//! A `NFT_MSG_GETSETELEM` request without `NLM_F_DUMP` carrying one element key is answered by
//! the set backend's `get` (`nft_get_set_elem` → `nft_setelem_get` → `nft_rbtree_get` for an
//! interval set): for a key inside an interval the kernel returns the interval's start element,
//! for a key outside every interval it answers ENOENT. Asked with the `INTERVAL_END` flag, it
//! returns the end element that closes the interval (one past its last address). Where the
//! kernel refuses single-element gets (EOPNOTSUPP, EINVAL), the set is dumped instead.

use anyhow::{Context, Result};
use rustables::sys;

use super::model::{CHAIN, TABLE};
use super::{a, list_ranges, NFPROTO_INET};
use crate::netlink::{NlError, Socket};
use crate::policy::{contains, Family, Range};

/// What a lookup found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// The address lies in this range of the set.
    In(Range),
    /// The set exists and does not hold the address.
    NotIn,
    /// masqd's table has no such set.
    NoSet,
}

/// Which range of set `set` of `table inet masqd` holds `addr`. Equals
/// `nft get element inet masqd <set> { <addr> }` (which prints the containing interval); where
/// the kernel refuses single-element gets, `nft list set inet masqd <set>` searched here.
pub fn range_of(sock: &mut Socket, set: &str, f: Family, addr: u128) -> Result<Lookup> {
    match range_by_get(sock, set, f, addr)? {
        Some(l) => Ok(l),
        None => by_dump(sock, set, f, addr),
    }
}

/// [`range_of`] by single-element gets only: None when the kernel refuses them. Equals
/// `nft get element inet masqd <set> { <addr> }`.
pub fn range_by_get(sock: &mut Socket, set: &str, f: Family, addr: u128) -> Result<Option<Lookup>> {
    if !set_exists(sock, set)? {
        return Ok(Some(Lookup::NoSet));
    }
    let start = match get_element(sock, set, f, addr, false) {
        Ok(Some((key, false))) if key <= addr => key,
        Ok(_) => return Ok(Some(Lookup::NotIn)),
        Err(e) if refused(&e) => return Ok(None),
        Err(e) => {
            return Err(e).with_context(|| format!("looking up {} in set {set}", f.fmt_addr(addr)))
        }
    };
    // The end element is one past the last address; none when the range reaches the top.
    let end = if addr == f.max() {
        f.max()
    } else {
        match get_element(sock, set, f, addr + 1, true) {
            Ok(Some((key, true))) if key > addr => key - 1,
            Ok(_) => f.max(),
            Err(e) if refused(&e) => return Ok(None),
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("looking up the end of {} in set {set}", f.fmt_addr(addr))
                })
            }
        }
    };
    Ok(Some(Lookup::In(Range { start, end })))
}

/// Whether the kernel refused the single-element get itself (not: the key is absent).
fn refused(e: &NlError) -> bool {
    matches!(e.errno(), Some(libc::EOPNOTSUPP) | Some(libc::EINVAL))
}

/// The fallback: the whole set, searched here. Equals `nft list set inet masqd <set>`.
fn by_dump(sock: &mut Socket, set: &str, f: Family, addr: u128) -> Result<Lookup> {
    tracing::debug!("the kernel refused a single-element get in set {set}; dumping it");
    let ranges = list_ranges(sock, set, f)?
        .with_context(|| format!("the elements of set {set} do not form intervals"))?;
    let idx = ranges.partition_point(|r| r.end < addr);
    Ok(match ranges.get(idx) {
        Some(r) if contains(&ranges, addr) => Lookup::In(*r),
        _ => Lookup::NotIn,
    })
}

/// Whether masqd's table has set `set`. Equals `nft list set inet masqd <set>` succeeding
/// (a GETSET for one set, not a dump).
fn set_exists(sock: &mut Socket, set: &str) -> Result<bool> {
    let what = format!("list set inet {TABLE} {set} (header)");
    match sock.request(sys::NFT_MSG_GETSET, NFPROTO_INET, &what, |w| {
        w.put_str(a(sys::NFTA_SET_TABLE), TABLE);
        w.put_str(a(sys::NFTA_SET_NAME), set);
    }) {
        Ok(_) => Ok(true),
        Err(e) if e.errno() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// One GETSETELEM for one key (`end`: with the INTERVAL_END flag). Returns the element the
/// kernel answered with, as (key, is an end element), or None for ENOENT. Equals the request
/// `nft get element inet masqd <set> { <key> }` sends.
fn get_element(
    sock: &mut Socket,
    set: &str,
    f: Family,
    key: u128,
    end: bool,
) -> Result<Option<(u128, bool)>, NlError> {
    let what = format!("get element inet {TABLE} {set} {{ {} }}", f.fmt_addr(key));
    let msgs = match sock.request(sys::NFT_MSG_GETSETELEM, NFPROTO_INET, &what, |w| {
        w.put_str(a(sys::NFTA_SET_ELEM_LIST_TABLE), TABLE);
        w.put_str(a(sys::NFTA_SET_ELEM_LIST_SET), set);
        let list = w.nest_begin(a(sys::NFTA_SET_ELEM_LIST_ELEMENTS));
        super::encode::element(w, f, key, end);
        w.nest_end(list);
    }) {
        Ok(m) => m,
        Err(e) if e.errno() == Some(libc::ENOENT) => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(first_element(&msgs, f))
}

/// The first element of GETSETELEM answers: (key, has the INTERVAL_END flag).
fn first_element(msgs: &[crate::netlink::Msg], f: Family) -> Option<(u128, bool)> {
    let e = msgs
        .iter()
        .filter_map(|m| m.attrs().get(a(sys::NFTA_SET_ELEM_LIST_ELEMENTS)))
        .find_map(|list| list.nested().into_iter().next())?;
    let ea = e.nested();
    let key = ea
        .get(a(sys::NFTA_SET_ELEM_KEY))
        .and_then(|k| k.nested().get(a(sys::NFTA_DATA_VALUE)))
        .and_then(|v| f.addr_from_bytes(v.data))?;
    let flags = ea
        .get(a(sys::NFTA_SET_ELEM_FLAGS))
        .and_then(|x| x.be32())
        .unwrap_or(0);
    Some((key, flags & libc::NFT_SET_ELEM_INTERVAL_END as u32 != 0))
}

/// The rules of masqd's chain as (handle, comment), in order. Equals
/// `nft -a list chain inet masqd postrouting`.
pub fn masqd_chain(sock: &mut Socket) -> Result<Vec<crate::explain::ChainRule>> {
    Ok(super::list_rules(sock, NFPROTO_INET, TABLE, CHAIN)?
        .into_iter()
        .map(|r| crate::explain::ChainRule {
            handle: r.handle,
            comment: r.comment,
        })
        .collect())
}
