//! Root-free tests of the netlink layer.

use std::time::{Duration, Instant};

use rustables::sys;

use super::attr::align4;
use super::event::event_of;
use super::message::{
    NLMSG_DONE, NLMSG_ERROR, NLMSG_HDRLEN, NLM_F_ACK_TLVS, NLM_F_CAPPED, NLM_F_DUMP_INTR,
    NLM_F_MULTI,
};
use super::reply::{parse_error, Answer, BatchAcks, DumpReader, DumpStep, RequestReader};
use super::*;

const NEWRULE: u16 = ((sys::NFNL_SUBSYS_NFTABLES as u16) << 8) | sys::NFT_MSG_NEWRULE as u16;

/// One message's bytes: header, then `body` padded to 4.
fn msg(kind: u16, flags: u16, seq: u32, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes());
    v.extend_from_slice(&kind.to_ne_bytes());
    v.extend_from_slice(&flags.to_ne_bytes());
    v.extend_from_slice(&seq.to_ne_bytes());
    v.extend_from_slice(&77u32.to_ne_bytes());
    v.extend_from_slice(body);
    v.resize(align4(v.len()), 0);
    v
}

/// A NEWRULE body: nfgenmsg (inet) and a table-name attribute.
fn rule_body(table: &str) -> Vec<u8> {
    let mut w = Writer::default();
    w.put_str(1, table);
    let mut b = vec![1, 0, 0, 0];
    b.extend(w.into_bytes());
    b
}

fn done(flags: u16, seq: u32, err: i32) -> Vec<u8> {
    msg(NLMSG_DONE, NLM_F_MULTI | flags, seq, &err.to_ne_bytes())
}

/// Feeds datagrams to a reader of sequence 5 until it finishes.
fn run(datagrams: &[Vec<u8>]) -> Result<DumpStep, NlError> {
    let mut r = DumpReader::new(5, "list ruleset");
    for d in datagrams {
        for m in split(d)? {
            match r.feed(m)? {
                DumpStep::More => {}
                end => return Ok(end),
            }
        }
    }
    Ok(DumpStep::More)
}

#[test]
fn clean_dump_collects_its_own_messages() {
    let mut d = msg(NEWRULE, NLM_F_MULTI, 5, &rule_body("a"));
    d.extend(msg(NEWRULE, NLM_F_MULTI, 4, &rule_body("stale")));
    d.extend(msg(NEWRULE, NLM_F_MULTI, 5, &rule_body("b")));
    match run(&[d, done(0, 5, 0)]).unwrap() {
        DumpStep::Done(m) => {
            let names: Vec<_> = m
                .iter()
                .map(|m| m.attrs().get(1).and_then(|a| a.str()).unwrap().to_string())
                .collect();
            assert_eq!(names, ["a", "b"]);
            assert_eq!(m[0].family, 1);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn intr_on_the_final_done_alone_ends_the_run_as_interrupted() {
    // The case that made the reader wait 30 s for a second DONE.
    let d = msg(NEWRULE, NLM_F_MULTI, 5, &rule_body("a"));
    let step = run(&[d, done(NLM_F_DUMP_INTR, 5, 0)]).unwrap();
    assert!(matches!(step, DumpStep::Interrupted), "{step:?}");
}

#[test]
fn intr_on_a_data_message_is_read_to_the_done_then_interrupted() {
    let first = msg(NEWRULE, NLM_F_MULTI | NLM_F_DUMP_INTR, 5, &rule_body("a"));
    let second = msg(NEWRULE, NLM_F_MULTI, 5, &rule_body("b"));
    let mut r = DumpReader::new(5, "x");
    for m in split(&first)
        .unwrap()
        .into_iter()
        .chain(split(&second).unwrap())
    {
        assert!(matches!(r.feed(m).unwrap(), DumpStep::More));
    }
    let m = split(&done(0, 5, 0)).unwrap().remove(0);
    assert!(matches!(r.feed(m).unwrap(), DumpStep::Interrupted));
    // A DONE of another request does not end it.
    let step = run(&[first, done(NLM_F_DUMP_INTR, 6, 0)]).unwrap();
    assert!(matches!(step, DumpStep::More), "{step:?}");
}

#[test]
fn errors_end_a_dump_unless_it_was_interrupted() {
    let e = run(&[done(0, 5, -libc::ENOENT)]).unwrap_err();
    assert_eq!(e.errno(), Some(libc::ENOENT), "{e}");
    assert!(e.to_string().contains("list ruleset"), "{e}");
    let step = run(&[done(NLM_F_DUMP_INTR, 5, -libc::ENOENT)]).unwrap();
    assert!(matches!(step, DumpStep::Interrupted), "{step:?}");
    let err = msg(NLMSG_ERROR, 0, 5, &(-libc::EPERM).to_ne_bytes());
    assert_eq!(run(&[err]).unwrap_err().errno(), Some(libc::EPERM));
    // An acknowledgement ends a dump; inside a multipart answer it does not.
    let ack = msg(NLMSG_ERROR, 0, 5, &0i32.to_ne_bytes());
    assert!(matches!(run(&[ack]).unwrap(), DumpStep::Done(_)));
    let multi_ack = msg(NLMSG_ERROR, NLM_F_MULTI, 5, &0i32.to_ne_bytes());
    assert!(matches!(run(&[multi_ack]).unwrap(), DumpStep::More));
}

#[test]
fn error_fields_that_do_not_negate_are_malformed_not_a_panic() {
    for bad in [i32::MIN, 1, i32::MAX] {
        let m = split(&msg(NLMSG_ERROR, 0, 5, &bad.to_ne_bytes()))
            .unwrap()
            .remove(0);
        let e = parse_error(&m).unwrap_err();
        assert!(matches!(e, NlError::Malformed(_)), "{e}");
        assert!(e.to_string().contains(&bad.to_string()), "{e}");
        let e = run(&[done(0, 5, bad)]).unwrap_err();
        assert!(matches!(e, NlError::Malformed(_)), "{e}");
    }
    let short = split(&msg(NLMSG_ERROR, 0, 5, &[1, 2])).unwrap().remove(0);
    assert!(parse_error(&short).is_err());
}

#[test]
fn extended_ack_message_is_read_from_a_capped_error() {
    let mut body = (-libc::EINVAL).to_ne_bytes().to_vec();
    body.extend(msg(NEWRULE, 0, 5, &[])); // the echoed header, capped
    let mut w = Writer::default();
    w.put_str(sys::NLMSGERR_ATTR_MSG as u16, "bad expression");
    body.extend(w.into_bytes());
    let d = msg(NLMSG_ERROR, NLM_F_CAPPED | NLM_F_ACK_TLVS, 5, &body);
    let m = split(&d).unwrap().remove(0);
    let (errno, ext) = parse_error(&m).unwrap();
    assert_eq!(
        (errno, ext.as_deref()),
        (libc::EINVAL, Some("bad expression"))
    );
    // Not capped, with an echoed length that runs past the body: no message, no panic.
    let mut body = (-libc::EINVAL).to_ne_bytes().to_vec();
    body.extend(msg(NEWRULE, 0, 5, &[]));
    body[4..8].copy_from_slice(&u32::MAX.to_ne_bytes());
    let m = split(&msg(NLMSG_ERROR, NLM_F_ACK_TLVS, 5, &body))
        .unwrap()
        .remove(0);
    assert_eq!(parse_error(&m).unwrap(), (libc::EINVAL, None));
}

#[test]
fn split_refuses_lengths_outside_the_datagram() {
    let good = msg(NEWRULE, 0, 5, &rule_body("a"));
    for bad_len in [0u32, 15, good.len() as u32 + 1, u32::MAX] {
        let mut d = good.clone();
        d[..4].copy_from_slice(&bad_len.to_ne_bytes());
        let e = split(&d).unwrap_err();
        assert!(e.to_string().contains(&bad_len.to_string()), "{e}");
    }
    // An unpadded last message and short trailing bytes are accepted.
    let mut d = good.clone();
    d.extend(msg(NEWRULE, 0, 6, &[1, 0, 0, 0, 9]));
    d.truncate(d.len() - 3);
    d.extend([0; 5]);
    let m = split(&d).unwrap();
    assert_eq!((m.len(), m[1].seq, m[1].pid), (2, 6, 77));
    assert!(split(&[]).unwrap().is_empty());
}

#[test]
fn notifications_name_their_table_and_sender() {
    let m = split(&msg(NEWRULE, 0, 0, &rule_body("nat")))
        .unwrap()
        .remove(0);
    assert_eq!(
        event_of(&m),
        Some(Event::Change {
            kind: sys::NFT_MSG_NEWRULE as u16,
            family: 1,
            pid: 77,
            res_id: 0,
            table: Some("nat".into()),
            name: None,
        })
    );
    // A rule names its chain; the generation message ends a transaction.
    let mut w = Writer::default();
    w.put_str(1, "nat");
    w.put_str(2, "POSTROUTING");
    let mut b = vec![2, 0, 0, 0];
    b.extend(w.into_bytes());
    let m = split(&msg(NEWRULE, 0, 0, &b)).unwrap().remove(0);
    assert!(matches!(
        event_of(&m),
        Some(Event::Change { family: 2, name: Some(n), .. }) if n == "POSTROUTING"
    ));
    let mut w = Writer::default();
    w.put(1, &41u32.to_be_bytes());
    let mut b = vec![0, 0, 0, 0];
    b.extend(w.into_bytes());
    // NFT_MSG_NEWGEN is 15 (linux/netfilter/nf_tables.h), in subsystem 10 (NFNL_SUBSYS_NFTABLES).
    let m = split(&msg((10 << 8) | 15, 0, 0, &b)).unwrap().remove(0);
    assert_eq!(event_of(&m), Some(Event::Generation { id: 41, pid: 77 }));
    let other = split(&msg(NLMSG_DONE, 0, 0, &[0; 4])).unwrap().remove(0);
    assert_eq!(event_of(&other), None);
}

#[test]
fn a_kernel_that_never_answers_ends_the_wait_at_the_deadline() {
    // Nothing is sent: the socket only waits (no ruleset is read or changed).
    let mut s = Socket::open().expect("netlink socket");
    let t = Instant::now();
    let total = Duration::from_millis(300);
    let e = s.recv_until("list rules", t + total, total).unwrap_err();
    assert!(t.elapsed() >= total && t.elapsed() < Duration::from_secs(3));
    assert!(
        e.to_string().contains("list rules: no complete answer"),
        "{e}"
    );
}

#[test]
fn attrs_stop_at_the_first_malformed_attribute() {
    let mut w = Writer::default();
    w.put_be32(3, 7);
    let mut b = w.into_bytes();
    b.extend([200, 0, 4, 0, 1, 2]); // claims 200 bytes
    let got: Vec<_> = Attrs(&b).map(|a| (a.ty, a.be32())).collect();
    assert_eq!(got, [(3, Some(7))]);
    assert_eq!(Attrs(&[2, 0, 1, 0]).count(), 0); // length below the header
}

fn one(d: &[u8]) -> RawMsg {
    split(d).unwrap().remove(0)
}

fn err(seq: u32, errno: i32) -> RawMsg {
    one(&msg(NLMSG_ERROR, 0, seq, &(-errno).to_ne_bytes()))
}

#[test]
fn a_request_collects_its_answers_up_to_the_ack() {
    let mut r = RequestReader::new(9, "get ruleset generation");
    let answer = one(&msg(NEWRULE, 0, 9, &rule_body("gen")));
    assert!(r.feed(answer).unwrap().is_none());
    assert!(r
        .feed(one(&msg(NEWRULE, 0, 8, &rule_body("other"))))
        .unwrap()
        .is_none());
    let got = r.feed(err(9, 0)).unwrap().expect("complete at the ack");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].attrs().get(1).and_then(|a| a.str()), Some("gen"));
}

#[test]
fn a_refused_request_names_itself_and_its_errno() {
    let mut r = RequestReader::new(9, "get element inet masqd pod4");
    let e = r.feed(err(9, libc::ENOENT)).unwrap_err();
    assert_eq!(e.errno(), Some(libc::ENOENT));
    assert!(e.to_string().contains("get element inet masqd pod4"), "{e}");
    // Another request's error is not ours.
    let mut r = RequestReader::new(9, "x");
    assert!(r.feed(err(3, libc::EPERM)).unwrap().is_none());
}

#[test]
fn a_batch_is_complete_when_every_message_is_answered() {
    let what: Vec<String> = ["add table inet masqd", "add rule", "add element"]
        .map(String::from)
        .to_vec();
    let mut acks = BatchAcks::new(what.clone());
    assert!(acks.feed(err(1, 0)).unwrap().is_none());
    assert!(
        acks.feed(err(1, 0)).unwrap().is_none(),
        "a repeated ack counts once"
    );
    assert!(
        acks.feed(err(7, 0)).unwrap().is_none(),
        "out of range: ignored"
    );
    assert!(acks.feed(err(3, 0)).unwrap().is_none());
    assert_eq!(acks.feed(err(2, 0)).unwrap(), Some(()));
    // The first refused message is named, once all are answered.
    let mut acks = BatchAcks::new(what.clone());
    assert!(acks.feed(err(2, libc::EINVAL)).unwrap().is_none());
    assert!(acks.feed(err(3, libc::ENOENT)).unwrap().is_none());
    let e = acks.feed(err(1, 0)).unwrap_err();
    assert_eq!(e.errno(), Some(libc::EINVAL));
    assert!(e.to_string().contains("add rule"), "{e}");
    // A refused batch header (a generation mismatch) ends it at once.
    let mut acks = BatchAcks::new(what);
    let e = acks.feed(err(0, 85)).unwrap_err();
    assert_eq!(e.errno(), Some(ERESTART));
    assert!(e.to_string().contains("`transaction`"), "{e}");
}

#[test]
fn garbage_and_truncated_answers_are_errors_not_panics() {
    let good = msg(NEWRULE, NLM_F_MULTI, 5, &rule_body("a"));
    for cut in 1..good.len() {
        let r = split(&good[..cut]);
        if cut < NLMSG_HDRLEN {
            assert!(r.unwrap().is_empty(), "cut {cut}");
        } else {
            assert!(r.is_err(), "cut {cut}");
        }
    }
    let mut rng = fastrand::Rng::with_seed(7);
    for _ in 0..5_000 {
        let n = rng.usize(0..96);
        let mut d: Vec<u8> = (0..n).map(|_| rng.u8(..)).collect();
        if n >= 4 && rng.bool() {
            d[..4].copy_from_slice(&(n as u32).to_ne_bytes()); // a plausible length
        }
        fuzz_datagram(&d);
        if let Ok(msgs) = split(&d) {
            let mut r = DumpReader::new(msgs.first().map_or(0, |m| m.seq), "x");
            for m in msgs {
                let _ = parse_error(&m);
                let _ = r.feed(m);
            }
        }
    }
    // A message shorter than its nfgenmsg header is malformed.
    let short = split(&msg(NEWRULE, NLM_F_MULTI, 5, &[1, 0])).unwrap();
    let mut r = DumpReader::new(5, "x");
    assert!(matches!(
        r.feed(short[0].clone()),
        Err(NlError::Malformed(_))
    ));
}

#[test]
fn done_without_an_error_field_ends_a_dump_cleanly() {
    // Old kernels send NLMSG_DONE with an empty body.
    let d = msg(NEWRULE, NLM_F_MULTI, 5, &rule_body("a"));
    let bare_done = msg(NLMSG_DONE, NLM_F_MULTI, 5, &[]);
    assert!(matches!(run(&[d, bare_done]).unwrap(), DumpStep::Done(m) if m.len() == 1));
}

#[test]
fn the_dump_restart_policy_is_sixteen_runs_with_a_capped_backoff() {
    let p = DUMP_RESTART;
    assert_eq!((p.attempts, DUMP_ATTEMPTS), (16, 16));
    assert_eq!(p.deadline, DUMP_DEADLINE);
    let pauses: Vec<u64> = (1..16)
        .map(|n| p.pause_after(n).unwrap().as_millis() as u64)
        .collect();
    assert_eq!(
        pauses,
        [0, 0, 1, 2, 4, 8, 16, 20, 20, 20, 20, 20, 20, 20, 20]
    );
    assert_eq!(p.pause_after(16), None);
}

#[test]
fn chunked_lists_keep_every_item_once_in_order() {
    let items: Vec<u32> = (0..50_000).collect();
    let mut txn = Transaction::new(None);
    txn.chunked_list(
        (sys::NFT_MSG_NEWSETELEM, NLM_F_CREATE, 1),
        3,
        |w| w.put_str(1, "t"),
        &items,
        |w, i| w.put_be32(1, *i),
        |chunk| format!("{} items", chunk.len()),
    );
    let (bytes, what) = txn.finish();
    let msgs = split(&bytes).unwrap();
    assert_eq!(msgs.len(), what.len() + 2, "BATCH_BEGIN, chunks, BATCH_END");
    let mut seen = Vec::new();
    for (m, w) in msgs[1..msgs.len() - 1].iter().zip(&what) {
        assert_eq!(m.flags, NLM_F_CREATE | NLM_F_ACK | 1);
        let list = Attrs(&m.body[4..]).get(3).expect("list");
        assert!(list.data.len() < MAX_NEST + 8);
        let n = seen.len();
        seen.extend(list.nested().map(|a| a.be32().unwrap()));
        assert_eq!(w, &format!("{} items", seen.len() - n));
    }
    assert_eq!(seen, items);
    assert!(what.len() > 1);
}

#[test]
fn writer_nests_and_pads_like_libmnl() {
    let mut w = Writer::default();
    w.begin(NEWRULE, NLM_F_CREATE, 3, 1, 0);
    let n = w.nest_begin(4);
    w.put_str(1, "abc"); // 4 + 4 bytes, no padding
    w.put(2, &[9]); // 4 + 1, padded to 8
    w.nest_end(n);
    w.end();
    let b = w.into_bytes();
    let want_attrs: [u8; 20] = [
        20, 0, 4, 0x80, // nest: len 20, type 4 | NLA_F_NESTED
        8, 0, 1, 0, b'a', b'b', b'c', 0, // "abc\0"
        5, 0, 2, 0, 9, 0, 0, 0, // one byte, padded
    ];
    assert_eq!(b.len(), 16 + 4 + 20);
    assert_eq!(&b[..4], &40u32.to_ne_bytes());
    assert_eq!(&b[6..8], &(NLM_F_CREATE | 1).to_ne_bytes());
    assert_eq!(&b[16..20], &[1, 0, 0, 0]);
    assert_eq!(&b[20..], &want_attrs);
}
