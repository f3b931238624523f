//! Fuzzing of the text masqd reads — the TOML configuration, flannel's subnet.env, CIDR list
//! files and iptables-save output — on the stable toolchain: a deterministic, time-bounded
//! mutational harness in a plain test, like `tests/fuzz_netlink.rs`. Each file of
//! `fuzz/corpus/<parser>/` is fed as it is, then mutated (bytes, lines, and tokens the parsers
//! care about) with a seeded RNG. None of the parsers may panic, and whatever they accept must
//! go through the next pure stage (policy, planner) without panicking either.
//!
//! `MASQD_FUZZ_SECS` (default 8, shared by the four parsers) bounds the time,
//! `MASQD_FUZZ_SEED` picks another seed; a crash is written to
//! `target/fuzz-crash-<parser>-<seed>-<n>.txt` and named in the failure.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use masqd::backend::legacy::{self, LegacyObserved};
use masqd::backend::nft::plan::{self, Observed};
use masqd::config;
use masqd::policy::{Family, Policy};

fn corpus(parser: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(parser);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .collect();
    files.sort();
    let out: Vec<Vec<u8>> = files
        .iter()
        .map(|p| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .collect();
    assert!(!out.is_empty(), "no corpus in {}", dir.display());
    out
}

/// Tokens worth inserting: the syntax of each format and the edges of the values.
const TOKENS: &[&str] = &[
    "\n",
    "\r\n",
    "\"",
    "'",
    "\\",
    "#",
    "=",
    "[",
    "]",
    "{",
    "}",
    ",",
    "/",
    "/0",
    "/32",
    "/128",
    "/33",
    "/129",
    "::",
    "::ffff:",
    "0.0.0.0",
    "255.255.255.255",
    "ffff::",
    "-A ",
    "-s ",
    "! ",
    "-o ",
    "-j MASQUERADE",
    "-j SNAT",
    "COMMIT\n",
    "*nat\n",
    ":X - [0:0]\n",
    "--comment ",
    "export ",
    "FLANNEL_SUBNET=",
    "FLANNEL_NETWORK=",
    "pod_cidrs",
    "honor_marks",
    "0x",
    "4294967296",
    "\u{feff}",
    "\u{0}",
    "é",
    "[node]\n",
    "[masquerade]\n",
    "= [\"",
    "\"]\n",
];

fn mutate(rng: &mut fastrand::Rng, b: &mut Vec<u8>, other: &[u8]) {
    if b.is_empty() {
        b.extend_from_slice(TOKENS[rng.usize(..TOKENS.len())].as_bytes());
        return;
    }
    let at = rng.usize(..=b.len());
    match rng.u8(..7) {
        0 if at < b.len() => b[at] ^= 1 << rng.u8(..7),
        1 => {
            let t = TOKENS[rng.usize(..TOKENS.len())].as_bytes();
            b.splice(at..at, t.iter().copied());
        }
        2 => b.truncate(at),
        3 => {
            let end = (at + rng.usize(1..16)).min(b.len());
            b.drain(at..end);
        }
        4 if !other.is_empty() => {
            // A line of another file of the corpus.
            let from = rng.usize(..other.len());
            let end = other[from..]
                .iter()
                .position(|&c| c == b'\n')
                .map_or(other.len(), |i| from + i + 1);
            b.splice(at..at, other[from..end].iter().copied());
        }
        5 => {
            // Repeat a chunk (duplicate lines, keys, tables).
            let end = (at + rng.usize(1..80)).min(b.len());
            let chunk = b[at..end].to_vec();
            b.splice(at..at, chunk);
        }
        _ if at < b.len() => b[at] = rng.u8(b' '..=b'~'),
        _ => {}
    }
}

fn seed() -> u64 {
    std::env::var("MASQD_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x7465_7874)
}

fn budget() -> Duration {
    let secs: u64 = std::env::var("MASQD_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    Duration::from_millis(secs * 1000 / 4)
}

/// Feeds the corpus of `parser`, then mutations of it, to `f` for the time budget.
fn fuzz(parser: &str, f: impl Fn(&[u8])) -> usize {
    let corpus = corpus(parser);
    for (i, c) in corpus.iter().enumerate() {
        if catch_unwind(AssertUnwindSafe(|| f(c))).is_err() {
            panic!("{parser}: corpus file {i} panics");
        }
    }
    let seed = seed();
    let mut rng = fastrand::Rng::with_seed(seed);
    let end = Instant::now() + budget();
    let mut n = 0;
    while Instant::now() < end {
        n += 1;
        let mut input = corpus[rng.usize(..corpus.len())].clone();
        let other = &corpus[rng.usize(..corpus.len())];
        for _ in 0..rng.usize(1..6) {
            mutate(&mut rng, &mut input, other);
        }
        if catch_unwind(AssertUnwindSafe(|| f(&input))).is_err() {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("target")
                .join(format!("fuzz-crash-{parser}-{seed}-{n}.txt"));
            let _ = std::fs::write(&path, &input);
            panic!(
                "{parser} panicked on input {n} of seed {seed}; saved as {}",
                path.display()
            );
        }
    }
    eprintln!("{parser}: {n} mutated inputs");
    n
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// An accepted configuration goes on through the policy and the planner.
fn downstream(cfg: &config::Config) {
    let p = Policy::from_config(cfg);
    let _ = plan::plan(&p, &Observed::default());
    let _ = masqd::backend::nft::export(&p);
    for f in Family::ALL {
        if let Some(fp) = p.family(f) {
            let _ = legacy::desired_chain(fp, &p.bridges, p.random_fully);
        }
    }
}

#[test]
fn configuration_files() {
    // Paths inside a mutated config are resolved next to it: in a scratch directory, so a
    // named subnet.env or list file is simply missing.
    let dir = std::env::temp_dir().join(format!("masqd-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("masqd.toml");
    let n = fuzz("config", |b| {
        if let Ok(cfg) = config::parse(&path, &text(b)) {
            downstream(&cfg);
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
    assert!(n > 100, "the harness ran ({n})");
}

#[test]
fn subnet_env_files() {
    let n = fuzz("subnet-env", |b| {
        let _ = config::parse_subnet_env(Path::new("subnet.env"), &text(b));
    });
    assert!(n > 100);
}

#[test]
fn cidr_list_files() {
    let n = fuzz("cidr-list", |b| {
        if let Ok(nets) = config::parse_cidr_list(Path::new("x.list"), &text(b)) {
            let _ = masqd::policy::aggregate(&nets);
        }
    });
    assert!(n > 100);
}

#[test]
fn iptables_save_output() {
    let n = fuzz("iptables-save", |b| {
        let t = text(b);
        let tables = legacy::parse_save(&t);
        let o = LegacyObserved::from_save(&t);
        for f in Family::ALL {
            let _ = legacy::nat_rules(f, &o);
        }
        for tbl in &tables {
            for (_, spec) in &tbl.rules {
                let _ = legacy::match_default(spec);
                let _ = legacy::split_saved(spec);
            }
        }
        for w in t.split_whitespace() {
            let _ = legacy::parse_saved_net(w);
        }
        let pods: Vec<ipnet::IpNet> = vec!["172.7.21.0/24".parse().unwrap()];
        let _ = legacy::plan(None, &o, &pods, true);
    });
    assert!(n > 100);
}
