//! Netlink under a busy ruleset: dumps raced by another writer's commits (the kernel flags
//! them `NLM_F_DUMP_INTR`, on the final `NLMSG_DONE` too) restart instead of stalling, and the
//! daemon's event socket overflowing (`ENOBUFS`) ends in a full resync, logged.

mod common;

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use masqd::netlink::{Socket, Transaction, NLM_F_CREATE};
use rustables::sys;
use serde_json::Value;

const CFG: &str = r#"[node]
pod_cidrs = ["172.7.21.0/24", "fd00:7:21::/64"]
[masquerade]
cluster_cidrs = ["172.7.0.0/16", "fd00:7::/32"]
nonmasquerade_cidrs = ["169.254.0.0/16", "192.0.2.0/24", "ffff::/16"]
bridge_interfaces = ["docker0"]
"#;

/// Another program committing without pause in the same namespace: it creates and deletes
/// `table ip churn` over its own netlink socket (what a tight `nft add table` /
/// `nft delete table` loop does, only faster), so that every dump of masqd's has a chance of
/// being interrupted.
struct Churn {
    stop: Arc<AtomicBool>,
    commits: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl Churn {
    fn start(ns: &Netns, pause: Duration) -> Churn {
        let path = format!("/run/netns/{}", ns.name);
        let stop = Arc::new(AtomicBool::new(false));
        let commits = Arc::new(AtomicUsize::new(0));
        let (s, c) = (stop.clone(), commits.clone());
        let thread = std::thread::spawn(move || {
            let file = File::open(&path).expect("open netns");
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let mut sock = Socket::open().expect("netlink socket");
            let mut add = true;
            while !s.load(Ordering::Relaxed) {
                let (kind, flags) = if add {
                    (sys::NFT_MSG_NEWTABLE, NLM_F_CREATE)
                } else {
                    (sys::NFT_MSG_DELTABLE, 0)
                };
                let mut t = Transaction::new(None);
                t.message(kind, flags, libc::NFPROTO_IPV4 as u8, "churn", |w| {
                    w.put_str(sys::NFTA_TABLE_NAME, "churn")
                });
                sock.commit(t).expect("churn commit");
                add = !add;
                c.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(pause);
            }
        });
        Churn {
            stop,
            commits,
            thread: Some(thread),
        }
    }

    fn commits(&self) -> usize {
        self.commits.load(Ordering::Relaxed)
    }
}

impl Drop for Churn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs masqd with debug logging; returns (exit code, stdout, stderr, time taken).
fn timed(ns: &Netns, cfg: &Path, state: &Path, args: &[&str]) -> (i32, String, String, Duration) {
    let mut v = vec!["--log-level", "debug"];
    v.extend_from_slice(args);
    let t = Instant::now();
    let o = ns.masqd(cfg, state, &v);
    let took = t.elapsed();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
        took,
    )
}

const RESTARTED: &str = "interrupted by a concurrent change";

#[test]
fn status_and_plan_under_another_writers_commits_restart_and_stay_fast() {
    let ns = Netns::new("mqintr");
    let dir = TempDir::new();
    let cfg = dir.write("masqd.toml", CFG);
    let state = dir.path().join("state");
    ns.masqd_ok(&cfg, &state, &["apply"], 0);
    // A writer committing thousands of times a second, with 200 µs between commits: dumps are
    // interrupted often and must restart. (Against a writer that never pauses at all, a dump
    // can be starved; masqd then gives up after its bounded retries with a clear error.)
    let churn = Churn::start(&ns, Duration::from_micros(200));
    let (mut restarts, mut slowest) = (0, Duration::ZERO);
    let before = churn.commits();
    for run in 0..50 {
        let (code, out, err, took) = timed(&ns, &cfg, &state, &["status", "--json"]);
        assert_eq!(code, 0, "status run {run} ({took:?}):\n{out}\n{err}");
        let st: Value = serde_json::from_str(&out).expect("status --json");
        assert_eq!(st["in_sync"], true, "status run {run}: {out}");
        let (pcode, pout, perr, ptook) = timed(&ns, &cfg, &state, &["plan"]);
        assert_eq!(
            pcode, 0,
            "plan run {run} ({ptook:?}) wants changes:\n{pout}\n{perr}"
        );
        for (what, t) in [("status", took), ("plan", ptook)] {
            assert!(
                t < Duration::from_secs(2),
                "{what} run {run} took {t:?} under churn"
            );
            slowest = slowest.max(t);
        }
        restarts += err.matches(RESTARTED).count() + perr.matches(RESTARTED).count();
    }
    let commits = churn.commits() - before;
    drop(churn);
    eprintln!(
        "100 runs: {restarts} restarted dumps, {commits} foreign commits, slowest {slowest:?}"
    );
    assert!(commits > 500, "the writer hardly ran ({commits} commits)");
    assert!(
        restarts > 0,
        "no dump was ever interrupted: the race was not reached ({commits} commits)"
    );
}

/// `masqd run` with its log in a file (no notify socket: readiness is seen through `plan`).
struct Daemon {
    child: Child,
    log: std::path::PathBuf,
}

impl Daemon {
    fn start(ns: &Netns, cfg: &Path, state: &Path, log: &Path) -> Daemon {
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, env!("CARGO_BIN_EXE_masqd")])
            .args(["--config", cfg.to_str().unwrap()])
            .args(["--state-dir", state.to_str().unwrap()])
            .args(["--log-level", "info", "run"])
            .stdout(Stdio::null())
            .stderr(File::create(log).expect("log file"))
            .spawn()
            .expect("start masqd run");
        Daemon {
            child,
            log: log.to_path_buf(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `plan` reports nothing to do (exit 0).
    fn wait_in_sync(&mut self, ns: &Netns, cfg: &Path, state: &Path, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            assert!(
                self.child.try_wait().unwrap().is_none(),
                "the daemon exited:\n{}",
                self.log()
            );
            let o = ns.masqd(cfg, state, &["plan"]);
            if o.status.code() == Some(0) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not in sync within {within:?}:\n{}\nlog:\n{}",
                String::from_utf8_lossy(&o.stdout),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The handle of the masquerade rule of masqd's postrouting chain.
fn masq_rule_handle(ns: &Netns) -> u64 {
    rules(&ns.ruleset(), "inet", "masqd", "postrouting")
        .into_iter()
        .find(|(_, text)| text.contains("masquerade"))
        .map(|(h, _)| h)
        .expect("masqd's masquerade rule")
}

#[test]
fn daemon_repairs_its_table_while_another_writer_commits() {
    let ns = Netns::new("mqdintr");
    let dir = TempDir::new();
    let cfg = dir.write("masqd.toml", CFG);
    let state = dir.path().join("state");
    let mut d = Daemon::start(&ns, &cfg, &state, &dir.path().join("masqd.log"));
    d.wait_in_sync(&ns, &cfg, &state, Duration::from_secs(10));
    // A writer with a short pause between commits (a busy kube-proxy): the repair's reads are
    // interrupted now and then and its generation-checked commit sometimes refused.
    let churn = Churn::start(&ns, Duration::from_millis(2));
    for round in 0..10 {
        let h = masq_rule_handle(&ns);
        ns.ok(&[
            "nft",
            "delete",
            "rule",
            "inet",
            "masqd",
            "postrouting",
            "handle",
            &h.to_string(),
        ]);
        let t = Instant::now();
        d.wait_in_sync(&ns, &cfg, &state, Duration::from_secs(10));
        let took = t.elapsed();
        eprintln!("round {round}: repaired within {took:?}");
        assert!(
            took < Duration::from_secs(3),
            "round {round}: repaired after {took:?}"
        );
    }
    assert!(churn.commits() > 100, "the writer hardly ran");
    drop(churn);
    let log = d.log();
    assert!(!log.contains("waiting for the kernel"), "{log}");
}

/// One `nft -f` file adding `n` rules (each with a few matches and a long comment) to `table
/// ip <table>`, then `extra`: megabytes of change notifications in one commit.
fn flood_file(dir: &TempDir, table: &str, n: usize, extra: &str) -> std::path::PathBuf {
    let mut s = format!("add table ip {table}\nadd chain ip {table} c\n");
    let pad = "x".repeat(120);
    for i in 0..n {
        s.push_str(&format!(
            "add rule ip {table} c ip saddr 192.0.2.1 ip daddr 198.51.100.2 tcp sport 1 \
             tcp dport 2 meta mark 3 counter comment \"{i}-{pad}\"\n"
        ));
    }
    s.push_str(extra);
    dir.write(&format!("{table}.nft"), &s)
}

/// Stops the daemon (a node too busy to schedule it), commits `file`, lets it go on: the
/// notifications of that commit overflow its event socket.
fn burst_while_stopped(ns: &Netns, d: &Daemon, file: &Path) {
    let pid = nix::unistd::Pid::from_raw(d.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let o = ns.exec(&["nft", "-f", file.to_str().unwrap()]);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Waits until the daemon's log holds `what` `n` times.
fn wait_log(d: &Daemon, what: &str, n: usize, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let log = d.log();
        if log.matches(what).count() >= n || Instant::now() >= deadline {
            return log;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

const LOST: &str = "nftables notifications were lost";
const RESYNCED: &str = "resynced with the kernel after lost nftables notifications";

#[test]
fn event_overflow_ends_in_a_full_resync_logged_once() {
    let ns = Netns::new("mqnobufs");
    let dir = TempDir::new();
    let cfg = dir.write("masqd.toml", CFG);
    let state = dir.path().join("state");
    let mut d = Daemon::start(&ns, &cfg, &state, &dir.path().join("masqd.log"));
    d.wait_in_sync(&ns, &cfg, &state, Duration::from_secs(10));
    // masqd's rule goes last in the same commit as the flood, among the lost notifications.
    let h = masq_rule_handle(&ns);
    let del = format!("delete rule inet masqd postrouting handle {h}\n");
    let flood = flood_file(&dir, "flood", 25_000, &del);
    burst_while_stopped(&ns, &d, &flood);
    let log = wait_log(&d, RESYNCED, 1, Duration::from_secs(30));
    assert!(log.contains(RESYNCED), "{log}");
    assert_eq!(
        log.matches(LOST).count(),
        1,
        "one overflow, one warning:\n{log}"
    );
    d.wait_in_sync(&ns, &cfg, &state, Duration::from_secs(10));
    assert!(masq_rule_handle(&ns) != h, "the rule was put back");
    // A second burst is a second overflow, logged again, and resynced again.
    let flood = flood_file(&dir, "flood2", 25_000, "flush set inet masqd pod4\n");
    burst_while_stopped(&ns, &d, &flood);
    let log = wait_log(&d, RESYNCED, 2, Duration::from_secs(30));
    assert_eq!(log.matches(LOST).count(), 2, "{log}");
    assert_eq!(log.matches(RESYNCED).count(), 2, "{log}");
    d.wait_in_sync(&ns, &cfg, &state, Duration::from_secs(10));
}
