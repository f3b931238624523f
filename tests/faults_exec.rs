//! Talking to the legacy binaries under odd inputs and hostile surroundings (issue 14, points 4
//! and 8), each test in its own network namespace with the real iptables-legacy binaries:
//! foreign rules with quotes and newlines, untrusted PATH entries, a child holding the output
//! pipe, and CIDRs in every notation the tools print, round-tripped. Oracles:
//! `iptables-legacy-save`, marker files, `/proc`.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const CFG: &str = NODE_A_TOML;

const LEGACY: &str = "[backend]\nmode = \"legacy\"\n";

/// How to start masqd: its PATH (None: unset), working directory and time limit.
struct Run<'a> {
    path: Option<&'a str>,
    cwd: &'a Path,
    limit: Duration,
}

/// Runs masqd in `ns` and kills it when it outlives `r.limit` (then the status is None).
fn masqd(ns: &Netns, cfg: &Path, state: &Path, args: &[&str], r: &Run) -> (Output, Duration) {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns.name, "env"]);
    match r.path {
        Some(p) => c.arg(format!("PATH={p}")),
        None => c.args(["-u", "PATH"]),
    };
    c.arg(env!("CARGO_BIN_EXE_masqd"))
        .args(["--config", cfg.to_str().unwrap()])
        .args(["--state-dir", state.to_str().unwrap()])
        .args(args)
        .current_dir(r.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let t = Instant::now();
    let mut child = c.spawn().expect("starting masqd");
    while child.try_wait().unwrap().is_none() && t.elapsed() < r.limit {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    (child.wait_with_output().unwrap(), t.elapsed())
}

/// masqd's stdout when it exits with `code`, else what it said.
fn attempt(
    ns: &Netns,
    cfg: &Path,
    state: &Path,
    args: &[&str],
    r: &Run,
    code: i32,
) -> Result<String, String> {
    let (o, took) = masqd(ns, cfg, state, args, r);
    if o.status.code() != Some(code) {
        return Err(format!(
            "masqd {args:?} (PATH {:?}, {took:?}) exited {:?}: stdout:\n{}\nstderr:\n{}",
            r.path,
            o.status.code(),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn ok(ns: &Netns, cfg: &Path, state: &Path, args: &[&str], r: &Run, code: i32) -> String {
    attempt(ns, cfg, state, args, r, code).unwrap_or_else(|e| panic!("{e}"))
}

const SYSTEM_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

fn run_in(cwd: &Path) -> Run<'_> {
    Run {
        path: Some(SYSTEM_PATH),
        cwd,
        limit: Duration::from_secs(60),
    }
}

fn words(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn iptables(ns: &Netns, v6: bool, rule: &[&str]) {
    let bin = if v6 {
        "ip6tables-legacy"
    } else {
        "iptables-legacy"
    };
    let mut args = vec![bin, "-t", "nat", "-A", "POSTROUTING"];
    args.extend_from_slice(rule);
    ns.ok(&args);
}

/// Docker's broad rule for the pod CIDRs of both families, in legacy xtables.
fn broad_rules(ns: &Netns) {
    for (v6, pod) in [(false, "172.7.21.0/24"), (true, "fd00:7:21::/64")] {
        iptables(
            ns,
            v6,
            &["-s", pod, "!", "-o", "docker0", "-j", "MASQUERADE"],
        );
    }
}

/// The rule lines of a legacy nat dump (a rule whose comment holds a newline spans lines).
fn nat(ns: &Netns, v6: bool) -> String {
    legacy_save(ns, v6, Some("nat"))
}

#[test]
fn foreign_rules_with_quotes_and_newlines_in_legacy_and_auto_mode() {
    for mode in ["legacy", "auto"] {
        for (quote, newline) in [(true, false), (false, true), (true, true)] {
            foreign_rules_case(mode, quote, newline);
        }
    }
}

/// The broad default rule for the pod CIDR with a quote in its interface name (masqd removes
/// it) and a foreign rule with one too; a foreign rule whose comment holds a newline, the word
/// "error" and quotes (masqd leaves both alone and reads past them).
fn foreign_rules_case(mode: &str, quote: bool, newline: bool) {
    let case = format!("{mode} mode, quote {quote}, newline {newline}");
    let ns = Netns::new("mqfq");
    let dir = TempDir::new();
    let cfg = dir.write(
        "masqd.toml",
        &format!("{CFG}[backend]\nmode = \"{mode}\"\n"),
    );
    let state = dir.path().join("state");
    let comment = "x\nerror y \"q\" \\ 's Fatal";
    for (v6, pod, other) in [
        (false, "172.7.21.0/24", "10.9.0.0/24"),
        (true, "fd00:7:21::/64", "fd00:9::/64"),
    ] {
        let oif = if quote { "a\"b" } else { "docker0" };
        iptables(&ns, v6, &["-s", pod, "!", "-o", oif, "-j", "MASQUERADE"]);
        if quote {
            iptables(&ns, v6, &["-s", other, "-o", "c\"d\\e", "-j", "MASQUERADE"]);
        }
        if newline {
            let rule = ["-s", other, "-m", "comment", "--comment", comment];
            iptables(&ns, v6, &[&rule[..], &["-j", "MASQUERADE"]].concat());
        }
    }
    let before = [nat(&ns, false), nat(&ns, true)];
    assert_eq!(
        before[0].contains("! -o a\"b -j MASQUERADE"),
        quote,
        "{}",
        before[0]
    );
    assert_eq!(
        before[0].contains("--comment \"x\nerror y"),
        newline,
        "{}",
        before[0]
    );
    let r = run_in(dir.path());
    let d: Value = serde_json::from_str(&ok(&ns, &cfg, &state, &["detect", "--json"], &r, 0))
        .expect("detect --json");
    assert_eq!(d["ipv4"]["backend"], "legacy", "{case}: {d}");
    assert_eq!(d["ipv6"]["backend"], "legacy", "{case}: {d}");
    for _ in 0..2 {
        ok(&ns, &cfg, &state, &["apply"], &r, 0);
        ok(&ns, &cfg, &state, &["plan"], &r, 0);
    }
    ok(&ns, &cfg, &state, &["status"], &r, 0);
    for (i, v6) in [false, true].into_iter().enumerate() {
        let after = nat(&ns, v6);
        assert!(after.contains(":MASQD-POSTROUTING"), "{case}: {after}");
        assert!(
            !after.contains("! -o a\"b") && !after.contains("! -o docker0 -j MASQUERADE"),
            "{case}: default rule removed: {after}"
        );
        // The foreign rules are untouched, byte for byte.
        let foreign: Vec<&str> = before[i]
            .split("\n-A ")
            .skip(1)
            .map(|r| r.trim_end_matches("\nCOMMIT\n"))
            .filter(|r| !r.contains(" ! -o "))
            .collect();
        assert_eq!(
            foreign.len(),
            quote as usize + newline as usize,
            "{}",
            before[i]
        );
        for rule in foreign {
            assert!(after.contains(rule), "{case}: {rule:?} kept in:\n{after}");
        }
    }
}

/// A directory of fake binaries that leave `marker` when run (and fail).
fn fakes(dir: &Path, marker: &Path, mode: u32) {
    std::fs::create_dir_all(dir).unwrap();
    for name in [
        "iptables-legacy-save",
        "iptables-legacy-restore",
        "ip6tables-legacy-save",
        "ip6tables-legacy-restore",
        "iptables-legacy",
        "ip6tables-legacy",
    ] {
        let p = dir.join(name);
        std::fs::write(
            &p,
            format!("#!/bin/sh\necho ran >> {}\nexit 1\n", marker.display()),
        )
        .unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    // The node's `iptables` as detection's system default would see it.
    for name in ["iptables", "ip6tables"] {
        let _ = std::fs::remove_file(dir.join(name));
        std::os::unix::fs::symlink(format!("/usr/sbin/{name}-nft"), dir.join(name)).unwrap();
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn untrusted_path_entries_are_never_run() {
    let ns = Netns::new("mqfp");
    let dir = TempDir::new();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let cfg = dir.write("masqd.toml", &format!("{CFG}{LEGACY}"));
    let state = dir.path().join("state");
    broad_rules(&ns);
    let marker = dir.path().join("marker");
    let world = dir.path().join("world");
    let group = dir.path().join("group");
    let other = dir.path().join("other");
    let cwd = dir.path().join("cwd");
    fakes(&world, &marker, 0o777);
    fakes(&group, &marker, 0o775);
    fakes(&other, &marker, 0o755);
    nix::unistd::chown(&other, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
    // The current directory holds fakes itself (an empty entry) and in `bin` (a relative one).
    fakes(&cwd.join("bin"), &marker, 0o755);
    fakes(&cwd, &marker, 0o755);
    // A trusted directory whose binaries are writable by others, or link to an untrusted one.
    let loose = dir.path().join("loose");
    fakes(&loose, &marker, 0o755);
    for e in std::fs::read_dir(&loose).unwrap() {
        let p = e.unwrap().path();
        if p.ends_with("iptables-legacy-save") {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o777)).unwrap();
        } else {
            let name = p.file_name().unwrap().to_owned();
            std::fs::remove_file(&p).unwrap();
            std::os::unix::fs::symlink(world.join(name), &p).unwrap();
        }
    }
    let s = |p: &Path| p.display().to_string();
    let entries = [
        s(&world),
        s(&group),
        s(&other),
        String::new(),
        "bin".into(),
        ".".into(),
        s(&loose),
    ];
    // Each entry on its own, every failure collected (so each kind is proven separately).
    let mut failures = Vec::new();
    for entry in entries.iter().map(Some).chain([None]) {
        let path = entry.map(|e| format!("{e}:{SYSTEM_PATH}"));
        let r = Run {
            path: path.as_deref(),
            cwd: &cwd,
            limit: Duration::from_secs(60),
        };
        if let Err(e) = trusted_only(&ns, &cfg, &state, &r, &s(dir.path())) {
            failures.push(format!("PATH entry {entry:?}: {e}"));
        }
        if let Ok(ran) = std::fs::read_to_string(&marker) {
            failures.push(format!(
                "PATH entry {entry:?}: a binary from it ran: {ran:?}"
            ));
            let _ = std::fs::remove_file(&marker);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// detect, apply, plan and teardown work with the real binaries; detection's system
/// `iptables` is not one under `hostile`.
fn trusted_only(
    ns: &Netns,
    cfg: &Path,
    state: &Path,
    r: &Run,
    hostile: &str,
) -> Result<(), String> {
    let d: Value = serde_json::from_str(&attempt(ns, cfg, state, &["detect", "--json"], r, 0)?)
        .map_err(|e| e.to_string())?;
    for f in ["ipv4", "ipv6"] {
        let sys = d[f]["facts"]["system_iptables"].as_str().unwrap_or("");
        if sys.contains(hostile) {
            return Err(format!("{f} system iptables is {sys}"));
        }
    }
    attempt(ns, cfg, state, &["apply"], r, 0)?;
    attempt(ns, cfg, state, &["plan"], r, 0)?;
    for v6 in [false, true] {
        if !nat(ns, v6).contains(":MASQD-POSTROUTING") {
            return Err(format!(
                "no MASQD-POSTROUTING (v6 {v6}): the real restore did not run"
            ));
        }
    }
    attempt(ns, cfg, state, &["teardown"], r, 0)?;
    if nat(ns, false).contains("MASQD") {
        return Err("teardown left MASQD-POSTROUTING".into());
    }
    Ok(())
}

fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

#[test]
fn a_save_whose_child_holds_the_pipe_neither_hangs_nor_leaves_it_running() {
    let ns = Netns::new("mqfh");
    let dir = TempDir::new();
    let cfg = dir.write("masqd.toml", &format!("{CFG}{LEGACY}"));
    let state = dir.path().join("state");
    broad_rules(&ns);
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let pids = dir.path().join("pids");
    for name in ["iptables-legacy-save", "ip6tables-legacy-save"] {
        let p = bin.join(name);
        // A background child that inherits stdout and outlives the save.
        let body = format!(
            "#!/bin/sh\nsleep 60 &\necho $! >> {}\nexec /usr/sbin/{name} \"$@\"\n",
            pids.display()
        );
        std::fs::write(&p, body).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let path = format!("{}:{SYSTEM_PATH}", bin.display());
    // One call's bound is 10 s; a correct run takes well under a second per call.
    let r = Run {
        path: Some(&path),
        cwd: dir.path(),
        limit: Duration::from_secs(30),
    };
    let t = Instant::now();
    ok(&ns, &cfg, &state, &["apply"], &r, 0);
    ok(&ns, &cfg, &state, &["plan"], &r, 0);
    let took = t.elapsed();
    let started: Vec<i32> = std::fs::read_to_string(&pids)
        .expect("the fake save ran")
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(3);
    while started.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left: Vec<i32> = started.iter().copied().filter(|p| alive(*p)).collect();
    for p in &left {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*p),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    assert!(took < Duration::from_secs(10), "apply + plan took {took:?}");
    assert!(left.is_empty(), "left running: {left:?} of {started:?}");
    assert!(nat(&ns, false).contains(":MASQD-POSTROUTING"));
}

/// Random CIDRs of a family in the notations the tools print differently: IPv4-compatible
/// (`::a.b.c.d/96..128`) and IPv4-mapped (`::ffff:a.b.c.d/96..128`) IPv6, hosts (`/32`,
/// `/128`), long zero runs, and edge lengths (`/1`, `/2`, `/31`, `/127`), never `/0`. None
/// contains `hole`, so together they never cover the whole space (refused like `/0`).
fn random_cidrs(rng: &mut fastrand::Rng, v6: bool, hole: u128, n: usize) -> Vec<String> {
    let bits = if v6 { 128u32 } else { 32 };
    let mut out = Vec::new();
    while out.len() < n {
        let kind = rng.u8(0..6);
        let (addr, len): (u128, u32) = match (v6, kind) {
            (true, 0) => (rng.u32(..) as u128, rng.u32(96..=128)),
            (true, 1) => ((0xffffu128 << 32) | rng.u32(..) as u128, rng.u32(96..=128)),
            (true, 2) => {
                // Zero runs: a few random 16-bit groups, the rest zero.
                let mut a = 0u128;
                for _ in 0..rng.u32(1..=3) {
                    a |= (rng.u16(..) as u128) << (16 * rng.u32(0..8));
                }
                (a, rng.u32(1..=128))
            }
            (_, 3) => (rng.u128(..), bits),
            (_, 4) => {
                let edge = [1, 2, bits - 1, bits];
                (rng.u128(..), edge[rng.usize(..edge.len())])
            }
            _ => (rng.u128(..), rng.u32(1..=bits)),
        };
        let addr = if v6 { addr } else { addr & 0xffff_ffff };
        let host = bits - len;
        let mask = if host == 128 {
            u128::MAX
        } else {
            (1u128 << host) - 1
        };
        let base = addr & !mask;
        let hole = if v6 { hole } else { hole & 0xffff_ffff };
        // Wide v6 nets would swallow the embedded-IPv4 ones (`::/1` holds `::/80`).
        // Nor the fixed examples `::a00:0/104` and `::ffff:a00:0/104`.
        let range = base..=base | mask;
        let swallows = v6
            && ((len < 96 && base < 1 << 48)
                || range.contains(&0x0a00_0000)
                || range.contains(&0xffff_0a00_0000));
        if range.contains(&hole) || swallows {
            continue;
        }
        out.push(if v6 {
            format!("{}/{len}", std::net::Ipv6Addr::from(base))
        } else {
            format!("{}/{len}", std::net::Ipv4Addr::from(base as u32))
        });
    }
    out
}

#[test]
fn cidrs_in_every_notation_round_trip_through_the_real_legacy_tools() {
    // Five fixed seeds, and MASQD_TEST_SEED for another sequence.
    let extra = std::env::var("MASQD_TEST_SEED")
        .ok()
        .map(|s| s.parse::<u64>().expect("MASQD_TEST_SEED is a number"));
    for seed in [1u64, 7, 42, 2026, 31337].into_iter().chain(extra) {
        let mut rng = fastrand::Rng::with_seed(seed);
        let ns = Netns::new("mqfr");
        let dir = TempDir::new();
        let hole = rng.u128(..);
        let mut ex = random_cidrs(&mut rng, false, hole, 12);
        ex.extend(random_cidrs(&mut rng, true, hole, 16));
        // The classic examples, always.
        ex.extend(words(&[
            "::a00:0/104",
            "::ffff:a00:0/104",
            "10.1.2.3/32",
            "fd00::5/128",
        ]));
        let list: Vec<String> = ex.iter().map(|c| format!("{c:?}")).collect();
        let cfg = dir.write(
            "masqd.toml",
            &format!(
                "{}nonmasquerade_cidrs = [{}]\n{LEGACY}",
                CFG,
                list.join(", ")
            ),
        );
        let state = dir.path().join("state");
        let r = run_in(dir.path());
        ok(&ns, &cfg, &state, &["apply"], &r, 0);
        ok(&ns, &cfg, &state, &["plan"], &r, 0);
        let saved = [nat(&ns, false), nat(&ns, true)];
        assert!(
            saved[1].contains("::10.") || saved[1].contains("::ffff:"),
            "seed {seed}: the tools print embedded IPv4 here: {}",
            saved[1]
        );
        // The chain holds exactly the configured exceptions (plus the cluster CIDRs), as
        // address ranges read back independently of masqd.
        for (i, v6) in [false, true].into_iter().enumerate() {
            let got: Vec<(u128, u128)> = saved[i]
                .lines()
                .filter(|l| l.starts_with("-A MASQD-POSTROUTING -s ") && l.contains(" -d "))
                .map(|l| {
                    let d = l.split(" -d ").nth(1).unwrap().split(' ').next().unwrap();
                    let d = if d.contains('/') {
                        d.to_string()
                    } else {
                        format!("{d}/{}", if v6 { 128 } else { 32 })
                    };
                    let (_, a, b) = cidr_range(&d);
                    (a, b)
                })
                .collect();
            let mut want: Vec<(u128, u128)> = Vec::new();
            for c in ex.iter().chain(&words(&["172.7.0.0/16", "fd00:7::/32"])) {
                let (is6, a, b) = cidr_range(c);
                if is6 == v6 {
                    want.push((a, b));
                }
            }
            assert_eq!(merge(got), merge(want), "seed {seed} v6={v6}: {}", saved[i]);
        }
        // Applying again changes nothing: the dump is the same, byte for byte.
        ok(&ns, &cfg, &state, &["apply"], &r, 0);
        assert_eq!([nat(&ns, false), nat(&ns, true)], saved, "seed {seed}");
    }
}
