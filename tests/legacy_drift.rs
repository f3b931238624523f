//! `masqd run` in legacy mode, in a network namespace: no binary runs while nothing changes,
//! a re-inserted broad rule is removed on the xtables lock's signal, and a foreign legacy
//! change elsewhere costs one reconcile. The iptables-legacy binaries masqd finds are wrapper
//! scripts that count their runs. Latencies are printed (run with --nocapture), asserted only
//! against a generous bound: the benchmark is the record of speed.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const CFG: &str = r#"[node]
pod_cidrs = ["172.7.21.0/24", "fd00:7:21::/64"]
[masquerade]
cluster_cidrs = ["172.7.0.0/16", "fd00:7::/32"]
bridge_interfaces = ["docker0"]
[backend]
mode = "legacy"
"#;

const BROAD: &str = "-s 172.7.21.0/24 ! -o docker0 -j MASQUERADE";

const WRAPPED: [&str; 6] = [
    "iptables-legacy",
    "iptables-legacy-save",
    "iptables-legacy-restore",
    "ip6tables-legacy",
    "ip6tables-legacy-save",
    "ip6tables-legacy-restore",
];

/// A scratch directory (root-owned, 0755, so that masqd trusts the PATH entry in it) with the
/// config, the state directory, the xtables lock file, the counting wrappers and their log.
struct Setup {
    ns: Netns,
    dir: TempDir,
    cfg: PathBuf,
    state: PathBuf,
    lock: PathBuf,
    runs: PathBuf,
    /// While this file exists, the next restore of masqd's is followed at once by a re-insert
    /// of the broad rule (under the same lock, before the wrapper returns).
    after: PathBuf,
    path: String,
}

fn setup() -> Setup {
    let ns = Netns::new("mqdl");
    let dir = TempDir::new();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let cfg = dir.write("masqd.toml", CFG);
    let state = dir.path().join("state");
    let lock = dir.path().join("xtables.lock");
    let runs = dir.path().join("runs.log");
    std::fs::write(&runs, "").unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let after = dir.path().join("insert-after-restore");
    for name in WRAPPED {
        let mut script = format!("#!/bin/sh\necho \"{name} $*\" >> {}\n", runs.display());
        if name == "iptables-legacy-restore" {
            // A writer that waited on the lock commits right after masqd's restore (when the
            // marker file exists, once).
            script += &format!(
                "/usr/sbin/{name} \"$@\"; rc=$?\nif [ -e {m} ]; then rm -f {m}; \
                 /usr/sbin/iptables-legacy -w -t nat -I POSTROUTING 1 {BROAD}; fi\nexit $rc\n",
                m = after.display()
            );
        } else {
            script += &format!("exec /usr/sbin/{name} \"$@\"\n");
        }
        let p = bin.join(name);
        std::fs::write(&p, script).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let rest = nft_variant_path();
    let path = format!(
        "PATH={}:{}",
        bin.display(),
        rest.trim_start_matches("PATH=")
    );
    Setup {
        ns,
        dir,
        cfg,
        state,
        lock,
        runs,
        after,
        path,
    }
}

impl Setup {
    /// A legacy writer that takes the same lock (`iptables-legacy -w …`), the real binary.
    fn legacy(&self, args: &str) {
        let lock = format!("XTABLES_LOCKFILE={}", self.lock.display());
        let mut v = vec!["env", &lock, "/usr/sbin/iptables-legacy", "-w"];
        v.extend(args.split_whitespace());
        self.ns.ok(&v);
    }

    /// `iptables-legacy-save -t nat`'s POSTROUTING rules (the real binary).
    fn postrouting(&self) -> Vec<String> {
        self.ns
            .ok(&["/usr/sbin/iptables-legacy-save", "-t", "nat"])
            .lines()
            .filter(|l| l.starts_with("-A POSTROUTING"))
            .map(str::to_string)
            .collect()
    }

    /// The binary runs the wrappers logged so far.
    fn runs(&self) -> Vec<String> {
        std::fs::read_to_string(&self.runs)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn start(&self) -> Daemon {
        let notes = Notes::new();
        let lock = format!("XTABLES_LOCKFILE={}", self.lock.display());
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns.name, "env", &self.path, &lock])
            .arg(env!("CARGO_BIN_EXE_masqd"))
            .args(["--config", self.cfg.to_str().unwrap()])
            .args(["--state-dir", self.state.to_str().unwrap()])
            .args(["--log-level", "info", "run"])
            .env("NOTIFY_SOCKET", &notes.path)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start masqd run");
        let mut d = Daemon { child, notes };
        d.notes.wait("READY=1", Duration::from_secs(15));
        d
    }

    fn in_sync(&self) -> bool {
        self.ns
            .masqd(&self.cfg, &self.state, &["plan"])
            .status
            .code()
            == Some(0)
    }
}

struct Daemon {
    child: Child,
    notes: Notes,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const JUMP: &str = "-A POSTROUTING -m comment --comment masqd -j MASQD-POSTROUTING";

#[test]
fn idle_legacy_mode_runs_no_binary() {
    let s = setup();
    let mut d = s.start();
    assert_eq!(s.postrouting(), vec![JUMP.to_string()]);
    assert!(
        !s.runs().is_empty(),
        "the wrappers are the binaries masqd runs"
    );
    std::thread::sleep(Duration::from_secs(1));
    let before = s.runs().len();
    std::thread::sleep(Duration::from_secs(5));
    let after = s.runs();
    assert_eq!(
        after.len(),
        before,
        "binary runs while idle: {:?}",
        &after[before..]
    );
    assert!(d.child.try_wait().unwrap().is_none(), "still running");
}

#[test]
fn reinserted_broad_rule_is_removed_quickly() {
    let s = setup();
    let _d = s.start();
    assert_eq!(s.postrouting(), vec![JUMP.to_string()]);
    let mut took = Vec::new();
    for _ in 0..10 {
        s.legacy(&format!("-t nat -I POSTROUTING 1 {BROAD}"));
        let t = Instant::now();
        while s.postrouting().len() != 1 {
            assert!(
                t.elapsed() < Duration::from_secs(2),
                "the re-inserted broad rule is still there after 2 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        took.push(t.elapsed());
        assert_eq!(s.postrouting(), vec![JUMP.to_string()]);
    }
    let ms: Vec<String> = took
        .iter()
        .map(|d| format!("{:.1}", d.as_secs_f64() * 1000.0))
        .collect();
    eprintln!(
        "legacy broad rule re-insert → gone (ms, 10 runs, 5 ms polling): {}; worst {:.1}",
        ms.join(" "),
        took.iter().max().unwrap().as_secs_f64() * 1000.0
    );
}

#[test]
fn a_commit_right_after_masqds_own_is_not_taken_for_it() {
    let s = setup();
    let _d = s.start();
    assert_eq!(s.postrouting(), vec![JUMP.to_string()]);
    std::fs::write(&s.after, "").unwrap();
    s.legacy(&format!("-t nat -I POSTROUTING 1 {BROAD}"));
    // masqd removes the rule; the wrapper re-inserts it as its restore returns, which leaves
    // the info exactly as a foreign commit would. The daemon must read the table again, not
    // wait for the resync.
    let t = Instant::now();
    while s.after.exists() || s.postrouting().len() != 1 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the broad rule re-inserted right after masqd's restore is still there: {:?}",
            s.postrouting()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(s.postrouting(), vec![JUMP.to_string()]);
    eprintln!(
        "re-insert after masqd's restore gone after {:?}",
        t.elapsed()
    );
}

#[test]
fn a_foreign_legacy_change_elsewhere_costs_one_reconcile() {
    let s = setup();
    let _d = s.start();
    std::thread::sleep(Duration::from_secs(1));
    let before = s.runs().len();
    // One commit: a chain of someone else's in the nat table, with a rule.
    let lock = format!("XTABLES_LOCKFILE={}", s.lock.display());
    let payload = s.dir.write(
        "foreign.rules",
        "*nat\n:KUBE-TEST - [0:0]\n-A KUBE-TEST -d 10.96.0.1/32 -j RETURN\nCOMMIT\n",
    );
    s.ns.ok(&[
        "env",
        &lock,
        "/usr/sbin/iptables-legacy-restore",
        "-w",
        "--noflush",
        payload.to_str().unwrap(),
    ]);
    std::thread::sleep(Duration::from_millis(1500));
    let runs = s.runs();
    let observed: Vec<&String> = runs[before..]
        .iter()
        .filter(|l| l.starts_with("iptables-legacy-save") && l.contains("-t nat"))
        .collect();
    eprintln!(
        "binary runs after a foreign legacy change: {:?}",
        &runs[before..]
    );
    assert_eq!(
        observed.len(),
        1,
        "one reconcile (one read of the ipv4 nat table): {:?}",
        &runs[before..]
    );
    assert!(
        !runs[before..]
            .iter()
            .any(|l| l.starts_with("iptables-legacy-restore")),
        "nothing of masqd's to change"
    );
    assert!(s.in_sync());
    assert_eq!(s.postrouting(), vec![JUMP.to_string()]);
}

#[test]
fn nat_info_follows_the_table_and_never_creates_it() {
    use masqd::backend::legacy::info::nat_info;
    use masqd::policy::Family;
    let ns = Netns::new("mqdi");
    let names = |ns: &Netns| tables_names(ns);
    // Nothing loaded: not asked, nothing created.
    let none = ns.run(|| (nat_info(Family::V4).unwrap(), nat_info(Family::V6).unwrap()));
    assert_eq!(none, (None, None));
    let (v4, v6) = names(&ns);
    assert!(!v4.contains("nat") && !v6.contains("nat"), "{v4:?} {v6:?}");
    // An empty nat table: PREROUTING, INPUT, OUTPUT and POSTROUTING (hooks 0, 1, 3, 4), one
    // policy entry each and the table's final error entry.
    ns.ok_words("iptables-legacy -w -t nat -N MQD-TEST");
    ns.ok_words("iptables-legacy -w -t nat -X MQD-TEST");
    let empty = ns
        .run(|| nat_info(Family::V4).unwrap())
        .expect("nat is loaded");
    assert_eq!(empty.valid_hooks, 0b11011);
    assert_eq!(empty.num_entries, 5);
    assert_eq!(
        ns.run(|| nat_info(Family::V6).unwrap()),
        None,
        "ip6 nat untouched"
    );
    // One rule more: one entry more, a larger blob, POSTROUTING's policy further down.
    ns.ok_words("iptables-legacy -w -t nat -A POSTROUTING -s 172.7.21.0/24 -j MASQUERADE");
    let one = ns.run(|| nat_info(Family::V4).unwrap()).unwrap();
    assert_eq!(one.num_entries, 6);
    assert!(one.size > empty.size);
    assert!(one.underflow[4] > empty.underflow[4]);
    assert_eq!(
        one.hook_entry[4], empty.hook_entry[4],
        "the rule is POSTROUTING's first"
    );
    // Asked again without a change: the same answer.
    assert_eq!(ns.run(|| nat_info(Family::V4).unwrap()), Some(one));
    // ip6 as well.
    ns.ok_words("ip6tables-legacy -w -t nat -A POSTROUTING -s fd00:7:21::/64 -j MASQUERADE");
    let six = ns.run(|| nat_info(Family::V6).unwrap()).unwrap();
    assert_eq!((six.valid_hooks, six.num_entries), (0b11011, 6));
}
