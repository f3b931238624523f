//! The shipped unit, byte for byte, run by a real systemd (the distribution's, 252 here) as PID
//! 1 of private pid, mount, net and cgroup namespaces (design.md §8): start, a reload with a
//! valid change, a reload with a broken configuration, stop; then the journal is read.
//!
//! Isolation (nothing is left on the host): systemd runs in a cgroup of its own (created here,
//! removed at the end) that it sees as the root of a cgroup2 mounted in its namespace; /run
//! and /tmp are fresh tmpfs; /etc, /var and /usr are overlays whose upper layers live in that
//! /run (the test binary is installed as /usr/sbin/masqd there, so the unit needs no edit);
//! `SYSTEMD_UNIT_PATH` is /run/systemd/system alone, holding the unit, journald's units and
//! empty stand-ins for sysinit.target and basic.target; the journal is volatile. At the end
//! systemd is killed by PID (the namespace's processes die with it) and its cgroups removed.
//! Every step that cannot be done fails the test: nothing is skipped.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const UNIT: &str = include_str!("../systemd/masqd.service");

/// The exception list is reached through a symlinked directory (as a Kubernetes ConfigMap
/// volume does): swapping the link changes the policy without an event masqd's inotify
/// watches see, so only the reload can bring it in.
const CFG: &str = r#"[node]
pod_cidrs = ["10.244.1.0/24"]
[masquerade]
cluster_cidrs = ["10.244.0.0/16"]
nonmasquerade_cidrs_file = "/etc/masqd-lists/current/extra.list"
[backend]
mode = "nft"
"#;

const LISTS: &str = "mkdir -p /etc/masqd-lists/a /etc/masqd-lists/b
echo 192.0.2.0/24 > /etc/masqd-lists/a/extra.list
printf '192.0.2.0/24\\n198.51.100.0/24\\n' > /etc/masqd-lists/b/extra.list
ln -s a /etc/masqd-lists/current";

const SWAP: &str =
    "ln -s b /etc/masqd-lists/.next && mv -T /etc/masqd-lists/.next /etc/masqd-lists/current";

/// Broken on line 4 (a /33 is no IPv4 prefix).
const CFG_BROKEN: &str = r#"[node]
pod_cidrs = ["10.244.1.0/24"]
[masquerade]
cluster_cidrs = ["10.244.0.0/33"]
nonmasquerade_cidrs_file = "/etc/masqd-lists/current/extra.list"
[backend]
mode = "nft"
"#;

/// The script that becomes PID 1's parent inside the namespaces: mounts, files, then systemd.
const INNER: &str = r#"set -eu
D="$1"; BIN="$2"
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t tmpfs -o mode=0755 tmpfs /run
for d in etc var usr; do
    mkdir -p /run/.ovl/$d/up /run/.ovl/$d/work
    mount -t overlay overlay -o lowerdir=/$d,upperdir=/run/.ovl/$d/up,workdir=/run/.ovl/$d/work /$d
done
install -m 0755 "$BIN" /usr/sbin/masqd
mkdir -p /run/systemd/system /etc/masqd /etc/systemd/journald.conf.d
cp "$D"/units/* /run/systemd/system/
# Not systemd-journald-dev-log.socket: it links /dev/log, and /dev is the host's.
for u in systemd-journald.service systemd-journald.socket; do
    cp /lib/systemd/system/$u /run/systemd/system/
done
printf '[Journal]\nStorage=volatile\nReadKMsg=no\nRateLimitBurst=0\n' > /etc/systemd/journald.conf.d/test.conf
cp "$D/masqd.toml" /etc/masqd/masqd.toml
mount -t tmpfs tmpfs /tmp
exec env -i container=masqd-test SYSTEMD_UNIT_PATH=/run/systemd/system \
    /lib/systemd/systemd --system --unit=masqd-test.target
"#;

/// A systemd running as PID 1 of its own namespaces; killed and cleaned up on drop.
struct Systemd {
    /// `unshare`, our child (its child is systemd).
    child: Child,
    /// systemd's PID as the host sees it.
    pid: u32,
    /// The cgroup made for it (on the host's cgroup2 hierarchy).
    cgroup: PathBuf,
    dir: TempDir,
}

/// Where the host's cgroup2 hierarchy is mounted, and this process's cgroup in it.
fn cgroup2_home() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let mount = mounts
        .lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split_whitespace().next() == Some("cgroup2"))
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .expect("a cgroup2 hierarchy must be mounted (systemd needs one to track its services)");
    let own = std::fs::read_to_string("/proc/self/cgroup").expect("/proc/self/cgroup");
    let path = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("this process has no cgroup2 path");
    mount.join(path.trim_start_matches('/'))
}

fn tool(path: &str) {
    assert!(
        Path::new(path).exists(),
        "{path} is required for the systemd test (apt-get install systemd util-linux)"
    );
}

impl Systemd {
    fn boot(config: &str) -> Systemd {
        require_root();
        for t in [
            "/lib/systemd/systemd",
            "/lib/systemd/systemd-journald",
            "/usr/bin/unshare",
            "/usr/bin/nsenter",
            "/usr/bin/journalctl",
            "/usr/bin/systemctl",
        ] {
            tool(t);
        }
        let dir = TempDir::new();
        std::fs::create_dir_all(dir.path().join("units")).unwrap();
        dir.write("units/masqd.service", UNIT);
        dir.write("units/sysinit.target", "[Unit]\nDescription=stand-in\n");
        dir.write("units/basic.target", "[Unit]\nDescription=stand-in\n");
        dir.write(
            "units/masqd-test.target",
            "[Unit]\nDescription=masqd test\nWants=systemd-journald.service\n",
        );
        dir.write("masqd.toml", config);
        dir.write("inner.sh", INNER);
        let cgroup = cgroup2_home().join(unique("masqd-systemd-test-"));
        std::fs::create_dir(&cgroup)
            .unwrap_or_else(|e| panic!("creating the cgroup {}: {e}", cgroup.display()));
        let log = std::fs::File::create(dir.path().join("systemd.log")).unwrap();
        // Enter the cgroup first, so that the cgroup namespace's root is that cgroup.
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && exec unshare --pid --fork --mount --net --cgroup --uts --ipc \
                 --mount-proc --propagation private sh {}/inner.sh {} {}",
                cgroup.display(),
                dir.path().display(),
                dir.path().display(),
                env!("CARGO_BIN_EXE_masqd")
            ))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                let _ = std::fs::remove_dir(&cgroup);
                panic!("starting unshare: {e}")
            });
        let mut sd = Systemd {
            pid: 0,
            child,
            cgroup,
            dir,
        };
        sd.pid = sd.wait_for_pid();
        sd.wait_until_up();
        sd
    }

    /// systemd's host PID: the child of `unshare` once it exec'd systemd.
    fn wait_for_pid(&mut self) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(20);
        let parent = self.child.id();
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "the namespace's start-up failed ({st}): {}",
                    self.log_text()
                );
            }
            let kids = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
                .unwrap_or_default();
            for k in kids.split_whitespace() {
                let exe = std::fs::read_link(format!("/proc/{k}/exe")).unwrap_or_default();
                if exe.ends_with("systemd/systemd") {
                    return k.parse().unwrap();
                }
            }
            assert!(
                Instant::now() < deadline,
                "systemd did not start: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("systemd.log")).unwrap_or_default()
    }

    /// Runs a command in all of systemd's namespaces.
    fn exec(&self, args: &[&str]) -> Output {
        self.exec_stdin(args, None)
    }

    fn exec_stdin(&self, args: &[&str], input: Option<&str>) -> Output {
        let pid = self.pid.to_string();
        let mut c = Command::new("nsenter")
            .args(["-t", &pid, "-a", "--"])
            .args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nsenter");
        if let Some(text) = input {
            c.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        }
        c.wait_with_output().expect("nsenter")
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.exec(args);
        assert!(
            o.status.success(),
            "{args:?} failed ({}): {}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn wait_until_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let o = self.exec(&["systemctl", "is-active", "systemd-journald.service"]);
            if String::from_utf8_lossy(&o.stdout).trim() == "active" {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "journald did not come up under the test's systemd: {}{}\n{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr),
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Replaces /etc/masqd/masqd.toml (inside the private /etc), atomically.
    fn write_config(&self, text: &str) {
        let o = self.exec_stdin(
            &[
                "sh",
                "-c",
                "cat > /etc/masqd/.masqd.toml.new && mv /etc/masqd/.masqd.toml.new /etc/masqd/masqd.toml",
            ],
            Some(text),
        );
        assert!(o.status.success(), "writing the config: {o:?}");
    }

    fn ruleset(&self) -> Value {
        serde_json::from_str(&self.ok(&["nft", "-j", "list", "ruleset"])).expect("nft -j")
    }

    fn nomasq4(&self) -> Vec<(u128, u128)> {
        set_ranges(&self.ruleset(), "nomasq4").unwrap_or_default()
    }

    fn main_pid(&self) -> String {
        self.ok(&[
            "systemctl",
            "show",
            "-p",
            "MainPID",
            "--value",
            "masqd.service",
        ])
        .trim()
        .to_string()
    }

    /// The journal's entries of a unit (or all, with `None`), as JSON objects.
    fn journal(&self, extra: &[&str]) -> Vec<Value> {
        let mut args = vec!["journalctl", "--no-pager", "-o", "json"];
        args.extend_from_slice(extra);
        self.ok(&args)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for Systemd {
    fn drop(&mut self) {
        if self.pid != 0 {
            // PID 1 of the namespace: its death kills every process in it.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The cgroups systemd made (init.scope, system.slice/…), deepest first, once empty.
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.cgroup.exists() && Instant::now() < deadline {
            remove_cgroup_tree(&self.cgroup);
            if self.cgroup.exists() {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        if self.cgroup.exists() && !std::thread::panicking() {
            panic!("could not remove the cgroup {}", self.cgroup.display());
        }
    }
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn msg(e: &Value) -> String {
    match &e["MESSAGE"] {
        Value::String(s) => s.clone(),
        // journalctl prints non-UTF-8 or binary messages as byte arrays.
        Value::Array(b) => b
            .iter()
            .filter_map(|x| x.as_u64().map(|c| c as u8 as char))
            .collect(),
        _ => String::new(),
    }
}

/// An ISO-8601 timestamp (`2026-12-01T09:41:02`) anywhere in a line.
fn has_iso_timestamp(s: &str) -> bool {
    let b = s.as_bytes();
    b.windows(19).any(|w| {
        let d = |i: usize| w[i].is_ascii_digit();
        (0..4).all(d)
            && w[4] == b'-'
            && d(5)
            && d(6)
            && w[7] == b'-'
            && d(8)
            && d(9)
            && w[10] == b'T'
            && d(11)
            && d(12)
            && w[13] == b':'
    })
}

/// Host state the test's systemd could change: sysctls, the hostname, /dev/log.
fn sysctls() -> Vec<String> {
    let mut v: Vec<String> = ["fs/nr_open", "fs/file-max", "kernel/core_pattern"]
        .iter()
        .map(|p| std::fs::read_to_string(format!("/proc/sys/{p}")).unwrap_or_default())
        .collect();
    v.push(std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default());
    v.push(format!("{:?}", std::fs::read_link("/dev/log").ok()));
    v
}

#[test]
fn the_shipped_unit_under_a_real_systemd() {
    let before = sysctls();
    let cluster = cidr_range("10.244.0.0/16");
    let a = cidr_range("192.0.2.0/24");
    let b = cidr_range("198.51.100.0/24");
    let v1 = merge(vec![(cluster.1, cluster.2), (a.1, a.2)]);
    let v2 = merge(vec![(cluster.1, cluster.2), (a.1, a.2), (b.1, b.2)]);
    {
        let sd = Systemd::boot(CFG);
        sd.ok(&["sh", "-c", LISTS]);

        // Start: Type=notify, so `systemctl start` returns once masqd sent READY=1.
        let o = sd.exec(&["systemctl", "start", "masqd.service"]);
        assert!(o.status.success(), "start: {}\n{}", text(&o), sd.log_text());
        assert_eq!(
            sd.ok(&["systemctl", "is-active", "masqd.service"]).trim(),
            "active"
        );
        assert_eq!(sd.nomasq4(), v1);
        let pid = sd.main_pid();

        // A valid change only a reload can see (the list's directory swapped behind a
        // symlink): nothing happens by itself, and `systemctl reload` succeeds only once the
        // new policy is in the kernel (read right after it returns, no waiting).
        sd.ok(&["sh", "-c", SWAP]);
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(sd.nomasq4(), v1, "the swap alone must not reach the daemon");
        let o = sd.exec(&["systemctl", "reload", "masqd.service"]);
        assert!(o.status.success(), "valid reload: {}", text(&o));
        assert_eq!(
            sd.nomasq4(),
            v2,
            "the new exception is in the kernel when `systemctl reload` returns"
        );
        assert_eq!(sd.main_pid(), pid, "a reload is no restart");

        // A broken configuration: the reload fails, the daemon lives on with its last good
        // policy.
        sd.write_config(CFG_BROKEN);
        let o = sd.exec(&["systemctl", "reload", "masqd.service"]);
        assert!(
            !o.status.success(),
            "a reload with a broken configuration must fail: {}",
            text(&o)
        );
        eprintln!(
            "systemctl reload with a broken configuration:\n{}",
            text(&o)
        );
        assert_eq!(
            sd.ok(&["systemctl", "is-active", "masqd.service"]).trim(),
            "active"
        );
        assert_eq!(sd.main_pid(), pid, "the daemon was not restarted");
        assert_eq!(sd.nomasq4(), v2, "the last good policy stays in the kernel");

        // Stop: the rules stay in place (restarts never interrupt traffic).
        let o = sd.exec(&["systemctl", "stop", "masqd.service"]);
        assert!(o.status.success(), "stop: {}", text(&o));
        let st = sd.exec(&["systemctl", "is-active", "masqd.service"]);
        assert_eq!(String::from_utf8_lossy(&st.stdout).trim(), "inactive");
        assert_eq!(sd.nomasq4(), v2);

        check_journal(&sd);
    }
    assert_eq!(
        sysctls(),
        before,
        "the test's systemd changed the host (sysctl, hostname or /dev/log)"
    );
}

/// masqd's lines in the journal: errors at priority err (the broken reload's file:line among
/// them), start-up lines with the version and config path, no timestamp of masqd's own.
fn check_journal(sd: &Systemd) {
    let all = sd.journal(&["-u", "masqd.service"]);
    let ours: Vec<&Value> = all
        .iter()
        .filter(|e| e["_COMM"] == "masqd" || e["SYSLOG_IDENTIFIER"] == "masqd")
        .collect();
    let dump = || {
        ours.iter()
            .map(|e| format!("<{}> {}", e["PRIORITY"].as_str().unwrap_or("?"), msg(e)))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(!ours.is_empty(), "no masqd line in the journal: {all:?}");
    eprintln!("masqd's journal:\n{}", dump());
    for e in &ours {
        let m = msg(e);
        assert!(
            !has_iso_timestamp(&m),
            "a doubled timestamp: {m:?}\n{}",
            dump()
        );
        assert!(!m.contains("masqd::"), "a module path: {m:?}");
    }
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        ours.iter().any(|e| {
            let m = msg(e);
            m.contains(version) && m.contains("/etc/masqd/masqd.toml") && e["PRIORITY"] == "6"
        }),
        "no start-up line with the version and config path at priority info:\n{}",
        dump()
    );
    assert!(
        ours.iter()
            .any(|e| msg(e).starts_with("ready: backend") && msg(e).contains("ipv4: nft")),
        "no start-up line with the backend decision:\n{}",
        dump()
    );
    assert!(
        ours.iter()
            .any(|e| msg(e) == "SIGHUP: configuration changed"),
        "the valid change was not brought in by the reload's SIGHUP:\n{}",
        dump()
    );
    // `journalctl -p err` finds the broken reload's error, with the file and line, from
    // masqd (the ExecReload check refused it), at priority 3.
    let errs = sd.journal(&["-u", "masqd.service", "-p", "err"]);
    let found = errs.iter().find(|e| {
        let m = msg(e);
        e["SYSLOG_IDENTIFIER"] == "masqd"
            && m.contains("/etc/masqd/masqd.toml:4")
            && m.contains("10.244.0.0/33")
            && !m.contains("not reloaded")
    });
    let Some(found) = found else {
        panic!(
            "`journalctl -p err` does not hold the refused reload's error; it holds:\n{}\n\
             all of masqd's lines:\n{}",
            errs.iter().map(msg).collect::<Vec<_>>().join("\n"),
            dump()
        );
    };
    assert_eq!(found["PRIORITY"], "3", "{found}");
    eprintln!(
        "journalctl -u masqd.service -p err -o verbose:\n{}",
        sd.ok(&[
            "journalctl",
            "--no-pager",
            "-u",
            "masqd.service",
            "-p",
            "err",
            "-o",
            "verbose",
        ])
    );
    eprintln!(
        "journalctl -u masqd.service:\n{}",
        sd.ok(&["journalctl", "--no-pager", "-u", "masqd.service"])
    );
    // Structured: the native protocol's fields, not a parsed stderr line.
    assert!(
        found.get("CODE_FILE").is_some(),
        "no structured fields: {found}"
    );
    assert!(
        errs.iter()
            .all(|e| e["PRIORITY"].as_str().unwrap_or("9") <= "3"),
        "journalctl -p err returned lower priorities: {errs:?}"
    );
}

/// `masqd run -v --log-format json` outside systemd: the start-up line carries the version and
/// config path as fields, and a configuration change is logged at debug with the CIDRs that
/// were added and removed, then the element changes with their values.
#[test]
fn debug_logs_say_what_changed() {
    use std::io::BufRead;
    let ns = Netns::new("mqlog");
    let dir = TempDir::new();
    let v1 = "[node]\npod_cidrs = [\"10.244.1.0/24\"]\n[masquerade]\n\
              cluster_cidrs = [\"10.244.0.0/16\"]\nnonmasquerade_cidrs = [\"203.0.113.0/24\"]\n\
              [backend]\nmode = \"nft\"\n";
    let cfg = dir.write("masqd.toml", v1);
    let state = dir.path().join("state");
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name, "env", &nft_variant_path()])
        .arg(env!("CARGO_BIN_EXE_masqd"))
        .arg("--config")
        .arg(&cfg)
        .arg("--state-dir")
        .arg(&state)
        .args(["-v", "--log-format", "json", "run"])
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("masqd run");
    let stderr = child.stderr.take().unwrap();
    // Killed even when an assertion fails.
    let _child = KillOnDrop(child);
    let (tx, rx) = std::sync::mpsc::channel::<Value>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let v = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line:?}"));
            if tx.send(v).is_err() {
                break;
            }
        }
    });
    let mut seen: Vec<Value> = Vec::new();
    // The first line after `seen[from..]` that `f` accepts, within 15 s.
    let mut wait_for = |from: usize, what: &str, f: &dyn Fn(&Value) -> bool| -> (usize, Value) {
        let deadline = Instant::now() + Duration::from_secs(15);
        if let Some(i) = (from..seen.len()).find(|i| f(&seen[*i])) {
            return (i, seen[i].clone());
        }
        while let Ok(v) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            seen.push(v.clone());
            if f(&v) {
                return (seen.len() - 1, v);
            }
        }
        panic!("no log line {what}; saw:\n{seen:#?}");
    };
    let m = |v: &Value| v["fields"]["message"].as_str().unwrap_or("").to_string();
    let (_, start) = wait_for(0, "starting", &|v| m(v).contains("starting with"));
    assert_eq!(start["fields"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(start["fields"]["config"], cfg.to_str().unwrap());
    assert_eq!(start["level"], "INFO");
    let (ready, _) = wait_for(0, "ready", &|v| m(v).starts_with("ready: backend nft"));
    // Replace one exception by two others.
    let v2 = v1.replace(
        "[\"203.0.113.0/24\"]",
        "[\"192.0.2.0/24\", \"198.51.100.0/24\"]",
    );
    std::fs::write(dir.path().join(".next"), v2).unwrap();
    std::fs::rename(dir.path().join(".next"), &cfg).unwrap();
    let (at, diff) = wait_for(ready + 1, "with the config diff", &|v| {
        m(v).starts_with("configuration: ipv4 exception CIDRs")
    });
    assert_eq!(diff["level"], "DEBUG");
    assert_eq!(
        m(&diff),
        "configuration: ipv4 exception CIDRs: added 192.0.2.0/24, 198.51.100.0/24; \
         removed 203.0.113.0/24"
    );
    assert_eq!(diff["fields"]["added"], 2);
    assert_eq!(diff["fields"]["removed"], 1);
    let (_, added) = wait_for(at + 1, "with the added elements", &|v| {
        m(v).contains("added to set nomasq4")
    });
    assert_eq!(
        m(&added),
        "2 interval(s) added to set nomasq4: 192.0.2.0/24, 198.51.100.0/24"
    );
    let (_, removed) = wait_for(at + 1, "with the removed element", &|v| {
        m(v).contains("removed from set nomasq4")
    });
    assert_eq!(
        m(&removed),
        "1 interval(s) removed from set nomasq4: 203.0.113.0/24"
    );
}

/// A child process killed and reaped on drop.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `masqd check` as user nobody: exit 0 and the summary for a valid configuration; exit 1 with
/// the same file:line message as `apply` for a broken list file.
#[test]
fn check_validates_without_root() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    require_root();
    let dir = TempDir::new();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir.write("vpc.list", "# peerings\n172.20.0.0/16\n172.21.0.0/16\n");
    let cfg = dir.write(
        "masqd.toml",
        "[node]\npod_cidrs = [\"10.244.1.0/24\"]\n[masquerade]\n\
         cluster_cidrs = [\"10.244.0.0/16\", \"fd00:10::/64\"]\n\
         nonmasquerade_cidrs_file = \"vpc.list\"\n",
    );
    let check = |uid: Option<u32>, args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_masqd"));
        c.arg("--config").arg(&cfg).args(args);
        if let Some(u) = uid {
            c.uid(u).gid(u);
        }
        c.output().expect("masqd")
    };
    let o = check(Some(65534), &["check"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(out.contains(": valid"), "{out}");
    assert!(out.contains("10.244.1.0/24"), "{out}");
    assert!(
        out.lines().any(|l| l.trim().starts_with("2  list file")),
        "{out}"
    );
    assert!(out.contains("but no ipv6 pod CIDR"), "{out}");
    assert!(out.lines().count() <= 25, "not one screen: {out}");

    dir.write("vpc.list", "# peerings\n172.20.0.0/16\n172.23.0.0/15\n");
    let o = check(Some(65534), &["check"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(err.contains("vpc.list:3:"), "{err}");
    // Word for word what `apply` says (run as root in a namespace, refused before the kernel).
    let ns = Netns::new("mqchk");
    let a = ns.masqd(&cfg, &dir.path().join("state"), &["apply"]);
    assert_eq!(a.status.code(), Some(1), "{}", text(&a));
    assert_eq!(String::from_utf8_lossy(&a.stderr), err);
}
