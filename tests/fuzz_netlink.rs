//! Fuzzing of what masqd reads from the kernel over netlink, on the stable toolchain: a
//! deterministic, time-bounded mutational harness in a plain test. Every file of
//! `fuzz/corpus/netlink/` (real kernel answers, one datagram each, made by
//! `fuzz/make-netlink-corpus.py`, plus hand-made odd cases) is fed as it is, then mutated with a
//! seeded RNG, through the datagram splitter, the dump reader, the error parser, the change
//! notification reader and the attribute iterator, and every rule's expression list found on the
//! way through the foreign NAT decoder and the default-rule matcher. None may panic.
//!
//! `MASQD_FUZZ_SECS` (default 10) bounds the time, `MASQD_FUZZ_SEED` picks another seed; a
//! crash is written to `target/fuzz-crash-netlink-<seed>-<n>.bin` and named in the failure.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use masqd::backend::nft::foreign::decode;
use masqd::backend::nft::match_default_rule;
use masqd::netlink::{fuzz_datagram, split, Attrs};
use masqd::policy::Family;

/// NFTA_RULE_EXPRESSIONS.
const RULE_EXPRESSIONS: u16 = 4;

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/netlink")
}

fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir();
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "bin"))
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p.file_name().unwrap().to_string_lossy().into_owned(), bytes)
        })
        .collect();
    out.sort();
    out
}

/// Everything the parsers do with one datagram, and with the expression lists inside it.
fn one(datagram: &[u8]) {
    fuzz_datagram(datagram);
    for m in split(datagram).unwrap_or_default() {
        let Some(attrs) = m.body.get(4..) else {
            continue;
        };
        if let Some(list) = Attrs(attrs).get(RULE_EXPRESSIONS) {
            exprs(m.body[0], list.data);
        }
    }
}

fn exprs(family: u8, list: &[u8]) {
    let _ = decode(family, list);
    let _ = match_default_rule(Family::V4, list);
    let _ = match_default_rule(Family::V6, list);
}

/// The expression lists of a corpus (mutated as lists of their own: most of the decoders'
/// branches are behind a well-formed datagram).
fn expression_lists(corpus: &[(String, Vec<u8>)]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    for (_, d) in corpus {
        for m in split(d).unwrap_or_default() {
            let Some(attrs) = m.body.get(4..) else {
                continue;
            };
            if let Some(list) = Attrs(attrs).get(RULE_EXPRESSIONS) {
                out.push((m.body[0], list.data.to_vec()));
            }
        }
    }
    out
}

const INTERESTING: [u32; 10] = [
    0,
    1,
    3,
    4,
    16,
    0x7f,
    0xffff,
    0x8000_0000,
    0xffff_ffff,
    0x7fff_ffff,
];

/// One random change to `b` (or, with `other`, a splice of the two).
fn mutate(rng: &mut fastrand::Rng, b: &mut Vec<u8>, other: &[u8]) {
    if b.is_empty() {
        b.extend((0..rng.usize(1..64)).map(|_| rng.u8(..)));
        return;
    }
    let at = rng.usize(..b.len());
    match rng.u8(..8) {
        0 => b[at] ^= 1 << rng.u8(..8),
        1 => b[at] = rng.u8(..),
        2 => {
            // An interesting value over a (length, type, errno, flags) field.
            let v = INTERESTING[rng.usize(..INTERESTING.len())].to_ne_bytes();
            let at = at & !3;
            let n = rng.usize(1..=4).min(b.len() - at);
            b[at..at + n].copy_from_slice(&v[..n]);
        }
        3 => b.truncate(at),
        4 => {
            let n = rng.usize(1..16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.u8(..)).collect();
            b.splice(at..at, bytes);
        }
        5 => {
            let end = (at + rng.usize(1..32)).min(b.len());
            b.drain(at..end);
        }
        6 if !other.is_empty() => {
            let from = rng.usize(..other.len());
            let end = (from + rng.usize(1..256)).min(other.len());
            b.splice(at..at, other[from..end].iter().copied());
        }
        _ => {
            // Repeat a chunk (nests inside nests, messages after messages).
            let end = (at + rng.usize(1..64)).min(b.len());
            let chunk = b[at..end].to_vec();
            b.splice(at..at, chunk);
        }
    }
}

fn crash(seed: u64, n: usize, input: &[u8], what: &str) -> ! {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join(format!("fuzz-crash-netlink-{seed}-{n}.bin"));
    let _ = std::fs::write(&path, input);
    panic!(
        "{what} panicked on input {n} of seed {seed}; saved as {}",
        path.display()
    );
}

#[test]
fn corpus_is_there_and_parses() {
    let c = corpus();
    assert!(c.len() >= 10, "only {} corpus files", c.len());
    for (name, d) in &c {
        if catch_unwind(|| one(d)).is_err() {
            panic!("corpus file {name} panics");
        }
    }
    // The corpus reaches the decoders: rules with NAT statements and default rules.
    let lists = expression_lists(&c);
    assert!(lists.iter().any(|(f, l)| decode(*f, l).is_some()));
    assert!(lists
        .iter()
        .any(|(_, l)| match_default_rule(Family::V4, l).is_some()));
}

#[test]
fn mutated_kernel_answers_never_panic() {
    let secs: u64 = std::env::var("MASQD_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let seed: u64 = std::env::var("MASQD_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6d61_7371);
    let corpus = corpus();
    let lists = expression_lists(&corpus);
    let mut rng = fastrand::Rng::with_seed(seed);
    let end = Instant::now() + Duration::from_secs(secs);
    let mut n = 0usize;
    while Instant::now() < end && n < 2_000_000 {
        n += 1;
        let as_list = n.is_multiple_of(2) && !lists.is_empty();
        let (mut input, other, family) = if as_list {
            let (f, l) = &lists[rng.usize(..lists.len())];
            (l.clone(), lists[rng.usize(..lists.len())].1.as_slice(), *f)
        } else {
            let (_, d) = &corpus[rng.usize(..corpus.len())];
            (d.clone(), corpus[rng.usize(..corpus.len())].1.as_slice(), 0)
        };
        for _ in 0..rng.usize(1..8) {
            mutate(&mut rng, &mut input, other);
        }
        let r = catch_unwind(AssertUnwindSafe(|| {
            if as_list {
                exprs(family, &input)
            } else {
                one(&input)
            }
        }));
        if r.is_err() {
            crash(
                seed,
                n,
                &input,
                if as_list {
                    "an expression list"
                } else {
                    "a datagram"
                },
            );
        }
    }
    eprintln!("{n} mutated inputs in {secs}s (seed {seed})");
    assert!(n > 1_000, "only {n} inputs ran");
}
