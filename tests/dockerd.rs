//! A real Docker daemon (Debian's `docker.io`, dockerd 20.10) on node A of the two-node cluster
//! of scripts/cluster.sh, restarted three times while `masqd run` runs on node A: every start
//! re-inserts Docker's broad `-s 172.7.21.0/24 ! -o docker0 -j MASQUERADE` at the head of
//! POSTROUTING (design.md §3.1 b). A client in pod A opens a new TCP connection to pod B every
//! ~10 ms throughout; none of them may arrive from node A's address, while pod A → outside is
//! still masqueraded. Two variants: dockerd writing with iptables-nft, and with iptables-legacy.
//!
//! Nothing runs in the host's namespaces and nothing of the host is used: containerd and dockerd
//! run inside node A's network namespace with every root, state, socket and pid file under a
//! scratch directory of this test; dockerd runs in a private mount namespace where a cgroup2
//! hierarchy, and tmpfs over /run/docker, /etc/docker and /run/dbus, hide the host's (so it
//! writes no key.json to /etc/docker and never talks to a firewalld of the host). The test
//! compares the host's Docker paths, mounts and processes before and after, and fails on any
//! leftover. Needs root and `scripts/install-deps.sh` (docker.io, containerd); without them it
//! fails, it never skips. Figures are printed: `cargo test --test dockerd -- --nocapture`.

mod common;

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;

/// The two variants share /run/docker and the machine's two cores: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const POD_A: &str = "172.7.21.2";
const POD_B: &str = "172.7.22.2";
const NODE_A: &str = "10.200.0.1";
const OUTSIDE: &str = "10.200.0.3";
/// Docker's broad rule for `--bip=172.7.21.1/24`, as iptables-save prints it.
const BROAD_RULE: &str = "-A POSTROUTING -s 172.7.21.0/24 ! -o docker0 -j MASQUERADE";
/// Where this test's scratch directories live (short: unix socket paths are at most 107
/// bytes and dockerd puts `<exec-root>/libnetwork/<64 hex>.sock` under its exec root).
const SCRATCH_PREFIX: &str = "/tmp/mqdk";
/// Mount points dockerd uses whatever its flags say; covered by a tmpfs in its private
/// mount namespace. The first two are created (and removed afterwards) when missing.
const COVERED: [&str; 3] = ["/run/docker", "/etc/docker", "/run/dbus"];
const RESTARTS: usize = 3;

#[derive(Clone, Copy, Debug)]
enum Variant {
    Nft,
    Legacy,
}

impl Variant {
    /// The iptables variant dockerd writes with (and cluster.sh's default rule's writer).
    fn xt(self) -> &'static str {
        match self {
            Variant::Nft => "nft",
            Variant::Legacy => "legacy",
        }
    }
}

#[test]
fn dockerd_restarts_keep_pod_sources_iptables_nft() {
    run_variant(Variant::Nft);
}

#[test]
fn dockerd_restarts_keep_pod_sources_iptables_legacy() {
    run_variant(Variant::Legacy);
}

fn run_variant(v: Variant) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    require_root();
    require_docker();
    let before = HostSnapshot::take();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| scenario(v)));
    // Everything of the scenario has been dropped (stopped, unmounted, removed) by now.
    let after = HostSnapshot::take();
    let strays = stray_processes();
    let clean = before == after && strays.is_empty();
    if !clean {
        eprintln!(
            "dockerd[{v:?}]: LEFT ON THE HOST: stray processes {strays:?}\nbefore: {before:#?}\n\
             after: {after:#?}"
        );
    }
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
    assert!(strays.is_empty(), "processes left running: {strays:?}");
    assert_eq!(before, after, "the test left something on the host");
}

/// Fails loudly (never skips) without Debian's docker.io and containerd.
fn require_docker() {
    for (tool, pkg) in [
        ("dockerd", "docker.io"),
        ("containerd", "containerd"),
        ("runc", "runc"),
        ("unshare", "util-linux"),
        ("mountpoint", "util-linux"),
        ("iptables-legacy", "iptables"),
        ("iptables-nft", "iptables"),
    ] {
        let ok = find_tool(tool)
            .and_then(|p| Command::new(p).arg("--version").output().ok())
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(
            ok,
            "{tool} (Debian package {pkg}) is missing: tests/dockerd.rs runs a real dockerd 20.10 \
             (docker.io) with its own containerd; install them with `sudo bash scripts/install-deps.sh`"
        );
    }
}

/// A binary in PATH or the usual sbin/bin directories.
fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"])
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(name))
        .find(|p| {
            p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        });
    found
}

fn secs(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes; true when it held.
fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if t.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ----------------------------------------------------------------------------------------------
// What the host looks like, before and after.

#[derive(Debug, PartialEq, Eq)]
struct HostSnapshot {
    /// Existence and contents of the host paths a Docker daemon would use.
    paths: Vec<(String, Option<Vec<String>>)>,
    /// Host mounts on any of those paths, on /sys/fs/cgroup or under the scratch prefix.
    mounts: Vec<String>,
    /// dockerd / containerd processes (a host may run its own; it must be the same set).
    daemons: BTreeSet<u32>,
}

impl HostSnapshot {
    fn take() -> HostSnapshot {
        let watched = [
            "/run/docker",
            "/etc/docker",
            "/run/dbus",
            "/run/containerd",
            "/var/lib/docker",
            "/var/lib/containerd",
            "/opt/containerd",
            "/run/docker.sock",
            "/run/docker.pid",
            "/run/mount",
        ];
        let paths = watched
            .iter()
            .map(|p| {
                let list = std::fs::read_dir(p).ok().map(|rd| {
                    let mut v: Vec<String> = rd
                        .filter_map(|e| e.ok())
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect();
                    v.sort();
                    v
                });
                let list = list.or_else(|| Path::new(p).exists().then(Vec::new));
                (p.to_string(), list)
            })
            .collect();
        // This thread never entered another namespace: thread-self is the host's view.
        let mountinfo = std::fs::read_to_string("/proc/thread-self/mountinfo").unwrap_or_default();
        let mounts = mountinfo
            .lines()
            .filter(|l| {
                let mp = l.split(' ').nth(4).unwrap_or("");
                mp.starts_with(SCRATCH_PREFIX)
                    || mp.starts_with("/sys/fs/cgroup")
                    || watched.iter().any(|w| mp.starts_with(w))
            })
            .map(str::to_string)
            .collect();
        let daemons = processes()
            .into_iter()
            .filter(|(_, argv)| {
                let exe = argv.first().map(|a| a.rsplit('/').next().unwrap_or(a));
                matches!(exe, Some("dockerd") | Some("containerd"))
            })
            .map(|(pid, _)| pid)
            .collect();
        HostSnapshot {
            paths,
            mounts,
            daemons,
        }
    }
}

/// Every process with its argv.
fn processes() -> Vec<(u32, Vec<String>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let argv = raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        out.push((pid, argv));
    }
    out
}

/// Processes whose command line names one of this test process's scratch directories (its
/// own and common::TempDir's).
fn stray_processes() -> Vec<(u32, Vec<String>)> {
    let id = std::process::id() % 100_000;
    let mine = [
        format!("{SCRATCH_PREFIX}{id}-"),
        format!("masqd-test-{id}-"),
    ];
    processes()
        .into_iter()
        .filter(|(_, argv)| argv.iter().any(|a| mine.iter().any(|m| a.contains(m))))
        .collect()
}

// ----------------------------------------------------------------------------------------------
// Scratch space and processes, all cleaned up on drop.

/// The test's scratch directory; every path handed to containerd and dockerd lies under it.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        let p = PathBuf::from(unique(SCRATCH_PREFIX));
        assert!(!p.exists(), "{} exists already", p.display());
        std::fs::create_dir(&p).unwrap();
        Scratch(p)
    }

    /// A path under the scratch directory, as a string; refuses anything else.
    fn path(&self, rel: &str) -> String {
        let p = self.0.join(rel);
        assert!(
            p.starts_with(&self.0) && self.0.starts_with("/tmp") && !rel.contains(".."),
            "refusing a path outside the test's scratch directory: {}",
            p.display()
        );
        p.to_str().unwrap().to_string()
    }

    fn write(&self, rel: &str, text: &str, mode: u32) -> String {
        let p = self.path(rel);
        if let Some(dir) = Path::new(&p).parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The mount points of [`COVERED`] that the host lacks: created for the test, removed after.
struct MountPoints(Vec<&'static str>);

impl MountPoints {
    fn ensure() -> MountPoints {
        let mut made = Vec::new();
        for d in &COVERED[..2] {
            if !Path::new(d).exists() {
                std::fs::create_dir(d).unwrap_or_else(|e| panic!("mkdir {d}: {e}"));
                made.push(*d);
            }
        }
        MountPoints(made)
    }
}

impl Drop for MountPoints {
    fn drop(&mut self) {
        for d in &self.0 {
            // Empty on the host: dockerd only ever saw the tmpfs over it.
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// A child process stopped by its PID on drop (SIGTERM, then SIGKILL after a grace period).
struct Proc {
    name: &'static str,
    child: Option<Child>,
}

impl Proc {
    fn spawn(name: &'static str, cmd: &mut Command) -> Proc {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Proc {
            name,
            child: Some(child),
        }
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    fn alive(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().map(|s| s.is_none()).unwrap_or(false),
            None => false,
        }
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL; returns how long it took to exit.
    fn stop(&mut self, grace: Duration) -> Duration {
        let t = Instant::now();
        let Some(mut c) = self.child.take() else {
            return Duration::ZERO;
        };
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        if c.try_wait().ok().flatten().is_none() {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            while c.try_wait().ok().flatten().is_none() {
                if t.elapsed() > grace {
                    eprintln!("{}: no exit {grace:?} after SIGTERM, SIGKILL", self.name);
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        t.elapsed()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(20));
    }
}

/// Sets a flag on drop: the traffic and sampler threads stop even when the test panics.
struct StopFlag(Arc<AtomicBool>);

impl Drop for StopFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Prints the tail of the daemons' logs when the test fails.
struct LogTails(Vec<String>);

impl Drop for LogTails {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for p in &self.0 {
            let text = std::fs::read_to_string(p).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            eprintln!("----- last lines of {p} -----\n{tail}");
        }
    }
}

fn log_file(path: &str) -> (Stdio, Stdio) {
    let f = File::options()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    (f.try_clone().unwrap().into(), f.into())
}

/// A readiness probe: `GET /version` on dockerd's socket; the engine version when it answers.
fn docker_version(sock: &str) -> Option<String> {
    let mut s = UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /version HTTP/1.0\r\nHost: docker\r\n\r\n")
        .ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    if !(resp.starts_with("HTTP/1.0 200") || resp.starts_with("HTTP/1.1 200")) {
        return None;
    }
    let body = resp.split("\r\n\r\n").nth(1)?;
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    Some(v["Version"].as_str().unwrap_or("?").to_string())
}

/// dockerd in node A, started through the wrapper, stopped by its PID.
struct Dockerd {
    ns: String,
    args: Vec<String>,
    env_path: String,
    wrapper: String,
    sock: String,
    pidfile: String,
    log: String,
    host_ns: (String, String),
    proc: Option<Proc>,
}

impl Dockerd {
    /// Starts dockerd and waits until it answers `GET /version`; returns how long that took.
    fn start(&mut self) -> Duration {
        assert!(self.proc.is_none(), "dockerd runs already");
        let t = Instant::now();
        let (out, err) = log_file(&self.log);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, "unshare", "--mount"])
            .args(["--propagation", "private", "/bin/sh", &self.wrapper])
            .args(&self.args)
            .env_clear()
            .env("PATH", &self.env_path)
            .env("HOME", Path::new(&self.sock).parent().unwrap())
            .env("MASQD_TEST_HOST_NETNS", &self.host_ns.0)
            .env("MASQD_TEST_HOST_MNTNS", &self.host_ns.1)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let mut p = Proc::spawn("dockerd", &mut cmd);
        let ready = wait_for(Duration::from_secs(30), || {
            docker_version(&self.sock).is_some() || !p.alive()
        });
        assert!(
            ready && p.alive(),
            "dockerd did not answer GET /version within 30 s (alive: {}); log: {}",
            p.alive(),
            self.log
        );
        // `ip netns exec`, `unshare` (without --fork) and the wrapper all exec: the child we
        // hold is dockerd itself, the process we signal.
        let pid: u32 = std::fs::read_to_string(&self.pidfile)
            .unwrap_or_default()
            .trim()
            .parse()
            .unwrap_or(0);
        assert_eq!(
            Some(pid),
            p.pid(),
            "dockerd's pidfile names another process"
        );
        self.proc = Some(p);
        t.elapsed()
    }

    fn stop(&mut self) -> Duration {
        let mut p = self.proc.take().expect("dockerd is not running");
        let d = p.stop(Duration::from_secs(20));
        assert!(
            !Path::new(&self.pidfile).exists(),
            "dockerd left its pidfile: not a clean shutdown"
        );
        d
    }
}

/// dockerd in a private mount namespace of node A: refuses to run in the host's network or
/// mount namespace, covers what dockerd uses whatever its flags say, then execs it.
const WRAPPER: &str = r#"set -eu
die() { echo "dockerd wrapper: $*" >&2; exit 97; }
[ "$(readlink /proc/self/ns/net)" != "$MASQD_TEST_HOST_NETNS" ] || die "refusing the host's network namespace"
[ "$(readlink /proc/self/ns/mnt)" != "$MASQD_TEST_HOST_MNTNS" ] || die "refusing the host's mount namespace"
# Inside `ip netns exec`, /sys is a fresh sysfs without cgroups.
mount -n -t cgroup2 none /sys/fs/cgroup
for d in /run/docker /etc/docker /run/dbus; do
    if [ -d "$d" ]; then mount -n -t tmpfs -o mode=0700 none "$d"; fi
done
mountpoint -q /run/docker || die "/run/docker is not covered"
mountpoint -q /etc/docker || die "/etc/docker is not covered"
exec dockerd "$@"
"#;

/// A stand-in for one iptables binary in dockerd's PATH: runs the variant's real binary and
/// logs the call with its exit code; after an insert of the broad rule it also records
/// whether `iptables-<variant>-save` shows it.
fn shim(real: &Path, save: &Path, log: &str) -> String {
    format!(
        r#"#!/bin/sh
"{real}" "$@"
rc=$?
seen=-
case " $* " in
*" POSTROUTING "*MASQUERADE*)
    if [ "$rc" = 0 ]; then
        if "{save}" -t nat | grep -qF -- '{BROAD_RULE}'; then seen=1; else seen=0; fi
    fi ;;
esac
printf '%s rc=%s seen=%s %s\n' "$(date +%s.%N)" "$rc" "$seen" "$*" >>"{log}"
exit $rc
"#,
        real = real.display(),
        save = save.display(),
    )
}

// ----------------------------------------------------------------------------------------------
// Traffic.

/// What the server in pod B saw: (seconds since the traffic started, peer address).
type Seen = Arc<Mutex<Vec<(f64, IpAddr)>>>;

fn enter(ns: &str) {
    let file = File::open(format!("/run/netns/{ns}")).expect("open netns");
    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
}

/// Accepts every connection on `port` in `ns`, records the peer, greets and closes.
fn server(ns: &str, port: u16, t0: Instant, stop: Arc<AtomicBool>) -> (Seen, JoinHandle<()>) {
    let seen: Seen = Arc::default();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let ns = ns.to_string();
    let rec = seen.clone();
    let h = std::thread::spawn(move || {
        enter(&ns);
        let l = TcpListener::bind(("0.0.0.0", port)).expect("bind");
        l.set_nonblocking(true).unwrap();
        ready_tx.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
            match l.accept() {
                Ok((mut s, peer)) => {
                    rec.lock()
                        .unwrap()
                        .push((t0.elapsed().as_secs_f64(), peer.ip()));
                    let _ = s.set_nonblocking(false);
                    let _ = s.write_all(b"hi\n");
                }
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    });
    ready_rx.recv().unwrap();
    (seen, h)
}

/// Opens a new connection from `ns` to `to` every ~10 ms until stopped: (ok, failed).
fn client(ns: &str, to: SocketAddr, stop: Arc<AtomicBool>) -> JoinHandle<(usize, usize)> {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        enter(&ns);
        let (mut ok, mut failed) = (0, 0);
        let deadline = Instant::now() + Duration::from_secs(120);
        while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
            let good = TcpStream::connect_timeout(&to, Duration::from_secs(1))
                .and_then(|mut s| {
                    s.set_read_timeout(Some(Duration::from_secs(2)))?;
                    let mut buf = [0u8; 3];
                    s.read_exact(&mut buf)
                })
                .is_ok();
            if good {
                ok += 1;
            } else {
                failed += 1;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        (ok, failed)
    })
}

/// Polls `iptables-<variant>-save -t nat` in node A: (samples, sightings of the broad rule,
/// seconds since t0 of the sightings).
fn sampler(
    ns: &str,
    save: PathBuf,
    t0: Instant,
    stop: Arc<AtomicBool>,
) -> JoinHandle<(usize, Vec<f64>)> {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        let (mut samples, mut seen) = (0, Vec::new());
        let deadline = Instant::now() + Duration::from_secs(120);
        while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
            let o = Command::new("ip")
                .args(["netns", "exec", &ns])
                .arg(&save)
                .args(["-t", "nat"])
                .output();
            if let Ok(o) = o {
                samples += 1;
                if String::from_utf8_lossy(&o.stdout).contains(BROAD_RULE) {
                    seen.push(t0.elapsed().as_secs_f64());
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (samples, seen)
    })
}

/// Compresses sorted instants into "a–b (n)" runs for printing.
fn runs(ts: &[f64]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < ts.len() {
        let mut j = i;
        while j + 1 < ts.len() && ts[j + 1] - ts[j] < 0.3 {
            j += 1;
        }
        out.push(format!("{:.2}–{:.2}s ({})", ts[i], ts[j], j - i + 1));
        i = j + 1;
    }
    if out.is_empty() {
        "none".into()
    } else {
        out.join(", ")
    }
}

// ----------------------------------------------------------------------------------------------

fn scenario(v: Variant) {
    let xt = v.xt();
    let tag = format!("dockerd[{xt}]");
    let t_setup = Instant::now();
    // Node A's default rule written by the same iptables variant dockerd uses.
    let c = Cluster::up(xt);
    let scratch = Scratch::new();
    let _mount_points = MountPoints::ensure();
    let host_ns = (
        std::fs::read_link("/proc/thread-self/ns/net")
            .unwrap()
            .to_string_lossy()
            .into_owned(),
        std::fs::read_link("/proc/thread-self/ns/mnt")
            .unwrap()
            .to_string_lossy()
            .into_owned(),
    );
    let clean_path = "/usr/sbin:/usr/bin:/sbin:/bin";

    // dockerd's iptables: the variant's binaries behind logging shims; no module loading.
    let iptables_log = scratch.path("iptables.log");
    let real_save = find_tool(&format!("iptables-{xt}-save")).expect("iptables-save variant");
    for fam in ["iptables", "ip6tables"] {
        for suffix in ["", "-save", "-restore"] {
            let real = find_tool(&format!("{fam}-{xt}{suffix}"))
                .unwrap_or_else(|| panic!("{fam}-{xt}{suffix} not found"));
            scratch.write(
                &format!("bin/{fam}{suffix}"),
                &shim(&real, &real_save, &iptables_log),
                0o755,
            );
        }
    }
    scratch.write("bin/modprobe", "#!/bin/sh\nexit 0\n", 0o755);
    let docker_path = format!("{}:{clean_path}", scratch.path("bin"));

    // containerd of its own.
    let ctd_sock = scratch.path("ctd/c.sock");
    let ctd_cfg = scratch.write(
        "containerd.toml",
        &format!(
            "version = 2\nroot = \"{}\"\nstate = \"{}\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{ctd_sock}\"\n\
             [ttrpc]\n  address = \"{ctd_sock}.ttrpc\"\n\
             [debug]\n  address = \"\"\n[metrics]\n  address = \"\"\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{}\"\n",
            scratch.path("ctd/root"),
            scratch.path("ctd/state"),
            scratch.path("ctd/opt"),
        ),
        0o644,
    );
    let ctd_log = scratch.path("containerd.log");
    let docker_log = scratch.path("dockerd.log");
    let masqd_log = scratch.path("masqd.log");
    let _tails = LogTails(vec![
        ctd_log.clone(),
        docker_log.clone(),
        masqd_log.clone(),
        iptables_log.clone(),
    ]);
    let (out, err) = log_file(&ctd_log);
    let mut containerd = Proc::spawn(
        "containerd",
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &c.a.name,
                "containerd",
                "--config",
                &ctd_cfg,
            ])
            .env_clear()
            .env("PATH", clean_path)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err),
    );
    assert!(
        wait_for(Duration::from_secs(15), || UnixStream::connect(&ctd_sock)
            .is_ok()
            || !containerd.alive()),
        "containerd did not listen on {ctd_sock}"
    );
    assert!(containerd.alive(), "containerd exited; log: {ctd_log}");

    let exec_root = scratch.path("x");
    assert!(
        exec_root.len() + "/libnetwork/.sock".len() + 64 < 108,
        "exec root {exec_root} too long for dockerd's unix sockets"
    );
    let sock = scratch.path("docker.sock");
    let pidfile = scratch.path("docker.pid");
    let daemon_json = scratch.write("daemon.json", "{}\n", 0o644);
    let wrapper = scratch.write("wrap.sh", WRAPPER, 0o755);
    let mut dockerd = Dockerd {
        ns: c.a.name.clone(),
        args: vec![
            "--containerd".into(),
            ctd_sock.clone(),
            "--data-root".into(),
            scratch.path("data"),
            "--exec-root".into(),
            exec_root,
            "--pidfile".into(),
            pidfile.clone(),
            "-H".into(),
            format!("unix://{sock}"),
            "--config-file".into(),
            daemon_json,
            "--storage-driver".into(),
            "vfs".into(),
            "--bip=172.7.21.1/24".into(),
            "--iptables=true".into(),
            "--ip-masq=true".into(),
        ],
        env_path: docker_path,
        wrapper,
        sock: sock.clone(),
        pidfile,
        log: docker_log.clone(),
        host_ns,
        proc: None,
    };

    // Docker runs on the node before masqd arrives.
    let first_start = dockerd.start();
    let version = docker_version(&sock).unwrap_or_default();
    let docker0 =
        c.a.ok(&["ip", "-4", "-o", "addr", "show", "dev", "docker0"]);
    assert!(
        docker0.contains("172.7.21.1/24"),
        "docker0 lost its address: {docker0}"
    );
    let vpod = c.a.ok(&["ip", "-o", "link", "show", "vpod"]);
    let adopted = vpod.contains("master docker0");
    eprintln!(
        "{tag}: dockerd {version} ready {} after start; adopted cluster.sh's docker0: {adopted}",
        secs(first_start)
    );
    let mut reattached = 0;
    let mut ensure_pod_attached = || {
        let vpod = c.a.ok(&["ip", "-o", "link", "show", "vpod"]);
        if !vpod.contains("master docker0") {
            c.a.ok(&["ip", "link", "set", "vpod", "master", "docker0", "up"]);
            reattached += 1;
        }
    };
    ensure_pod_attached();

    // masqd run on node A.
    let dir = TempDir::new();
    let cfg = dir.write(
        "masqd.toml",
        &format!(
            "[node]\npod_cidrs = [\"172.7.21.0/24\"]\n[masquerade]\n\
             cluster_cidrs = [\"172.7.0.0/16\"]\nbridge_interfaces = [\"docker0\"]\n\
             [backend]\nmode = \"{xt}\"\n"
        ),
    );
    let state = dir.path().join("state");
    let (out, err) = log_file(&masqd_log);
    let t_masqd = Instant::now();
    let mut masqd = Proc::spawn(
        "masqd",
        Command::new("ip")
            .args(["netns", "exec", &c.a.name, env!("CARGO_BIN_EXE_masqd")])
            .args(["--config", cfg.to_str().unwrap()])
            .args(["--state-dir", state.to_str().unwrap()])
            .args(["--log-level", "info", "run"])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err),
    );
    let applied = wait_for(Duration::from_secs(20), || {
        !masqd.alive() || c.a.masqd(&cfg, &state, &["plan"]).status.code() == Some(0)
    });
    assert!(
        applied && masqd.alive(),
        "masqd run did not apply within 20 s (alive: {})",
        masqd.alive()
    );
    eprintln!(
        "{tag}: masqd run in sync {} after start",
        secs(t_masqd.elapsed())
    );
    let out_ip: IpAddr = OUTSIDE.parse().unwrap();
    let node_a: IpAddr = NODE_A.parse().unwrap();
    let pod_a: IpAddr = POD_A.parse().unwrap();
    assert_eq!(
        seen_source(&c.pa, &c.out, out_ip, 8091),
        Some(node_a),
        "pod A → outside must be masqueraded (before the restarts)"
    );

    // Kernel events in node A: Docker's iptables-nft writes show up here.
    let mon_lines: Arc<Mutex<Vec<(f64, String)>>> = Arc::default();
    let mut monitor = Proc::spawn(
        "nft monitor",
        Command::new("ip")
            .args(["netns", "exec", &c.a.name, "nft", "monitor", "rules"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    );
    let t0 = Instant::now();
    let t0_unix = now_unix();
    {
        let stdout = monitor.child.as_mut().unwrap().stdout.take().unwrap();
        let lines = mon_lines.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                lines.lock().unwrap().push((t0.elapsed().as_secs_f64(), l));
            }
        });
    }

    // Traffic, then three restarts.
    let stop = Arc::new(AtomicBool::new(false));
    let stop_guard = StopFlag(stop.clone());
    let (seen, srv) = server(&c.pb.name, 8090, t0, stop.clone());
    let cli = client(
        &c.pa.name,
        SocketAddr::new(POD_B.parse().unwrap(), 8090),
        stop.clone(),
    );
    let smp = sampler(&c.a.name, real_save.clone(), t0, stop.clone());
    std::thread::sleep(Duration::from_secs(1));
    let mut timeline = Vec::new();
    let mut stops = Vec::new();
    let mut starts = Vec::new();
    for i in 1..=RESTARTS {
        let at = t0.elapsed().as_secs_f64();
        let s = dockerd.stop();
        let mid = t0.elapsed().as_secs_f64();
        let r = dockerd.start();
        let end = t0.elapsed().as_secs_f64();
        ensure_pod_attached();
        timeline.push(format!(
            "#{i} stop {at:.2}–{mid:.2}s, start {mid:.2}–{end:.2}s"
        ));
        stops.push(s);
        starts.push(r);
        std::thread::sleep(Duration::from_secs(1));
    }
    std::thread::sleep(Duration::from_secs(1));
    drop(stop_guard);
    let (ok, failed) = cli.join().expect("client thread");
    srv.join().expect("server thread");
    let (samples, sightings) = smp.join().expect("sampler thread");
    let traffic_secs = t0.elapsed().as_secs_f64();
    monitor.stop(Duration::from_secs(5));
    let masqd_alive = masqd.alive();

    // Pod A → outside is still masqueraded, with dockerd up again.
    let outside = seen_source(&c.pa, &c.out, out_ip, 8092);

    // What Docker did: its iptables calls (logged by the shims) and what the kernel showed.
    let log = std::fs::read_to_string(&iptables_log).unwrap_or_default();
    let mut inserts = Vec::new();
    let mut inserts_seen = 0;
    let mut calls = 0;
    for l in log.lines() {
        let mut f = l.splitn(4, ' ');
        let (ts, rc, seen_f, args) = (
            f.next().unwrap_or(""),
            f.next().unwrap_or(""),
            f.next().unwrap_or(""),
            f.next().unwrap_or(""),
        );
        let ts: f64 = ts.parse().unwrap_or(0.0) - t0_unix;
        if ts < 0.0 {
            continue;
        }
        calls += 1;
        let broad_insert = args.contains("-I POSTROUTING")
            && args.contains("-s 172.7.21.0/24")
            && args.contains("! -o docker0")
            && args.contains("MASQUERADE");
        if broad_insert && rc == "rc=0" {
            inserts.push(ts);
            if seen_f == "seen=1" {
                inserts_seen += 1;
            }
        }
    }
    let mon = mon_lines.lock().unwrap().clone();
    let mon_inserts: Vec<f64> = mon
        .iter()
        .filter(|(_, l)| {
            l.starts_with("insert rule ip nat POSTROUTING")
                && l.contains("172.7.21.0/24")
                && l.contains("masquerade")
        })
        .map(|(t, _)| *t)
        .collect();

    let seen = seen.lock().unwrap().clone();
    let wrong: Vec<&(f64, IpAddr)> = seen.iter().filter(|(_, ip)| *ip != pod_a).collect();
    let wrong_t: Vec<f64> = wrong.iter().map(|(t, _)| *t).collect();
    let wrong_peers: BTreeSet<IpAddr> = wrong.iter().map(|(_, ip)| *ip).collect();

    eprintln!(
        "{tag}: restarts (seconds since traffic start): {}",
        timeline.join("; ")
    );
    eprintln!(
        "{tag}: dockerd stop took {}, start→ready took {} (first start {})",
        stops.iter().map(|d| secs(*d)).collect::<Vec<_>>().join(" "),
        starts
            .iter()
            .map(|d| secs(*d))
            .collect::<Vec<_>>()
            .join(" "),
        secs(first_start)
    );
    eprintln!(
        "{tag}: {} connections accepted by pod B in {traffic_secs:.1}s (client: {ok} ok, \
         {failed} failed); WRONG source (not {POD_A}): {} {wrong_peers:?} at {}",
        seen.len(),
        wrong.len(),
        runs(&wrong_t)
    );
    eprintln!(
        "{tag}: dockerd made {calls} iptables-{xt} calls; successful inserts of its broad rule: {} \
         at {}; of them seen by iptables-{xt}-save right after: {inserts_seen}",
        inserts.len(),
        runs(&inserts)
    );
    eprintln!(
        "{tag}: iptables-{xt}-save sampler: broad rule in {} of {samples} samples, at {}; \
         nft monitor: {} inserts of the broad rule at {}",
        sightings.len(),
        runs(&sightings),
        mon_inserts.len(),
        runs(&mon_inserts)
    );
    eprintln!(
        "{tag}: pod veth re-attached to docker0 {reattached} times; pod A → outside seen as \
         {outside:?}; masqd alive: {masqd_alive}; total {}",
        secs(t_setup.elapsed())
    );

    assert!(masqd_alive, "masqd run exited during the restarts");
    assert!(
        inserts.len() >= RESTARTS,
        "dockerd re-inserted its broad rule only {} times in {RESTARTS} restarts: the test \
         proves nothing (iptables log: {iptables_log})",
        inserts.len()
    );
    assert!(
        inserts_seen + sightings.len() + mon_inserts.len() > 0,
        "the kernel never showed Docker's broad rule: the test proves nothing"
    );
    assert!(
        seen.len() > 100,
        "only {} connections reached pod B (client: {ok} ok, {failed} failed)",
        seen.len()
    );
    assert_eq!(
        outside,
        Some(node_a),
        "pod A → outside must still be masqueraded"
    );
    assert!(
        wrong.is_empty(),
        "{} of {} new pod A → pod B connections arrived from {wrong_peers:?} during {RESTARTS} \
         dockerd restarts, at {}",
        wrong.len(),
        seen.len(),
        runs(&wrong_t)
    );
    // In sync at the end: in legacy mode the re-inserted broad rule is removed once the daemon
    // notices the change on the xtables lock file, so allow a few moments.
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.a.masqd(&cfg, &state, &["plan"]).status.code() != Some(0) {
        assert!(
            Instant::now() < deadline,
            "masqd never got back in sync after the restarts"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    drop(dockerd);
    drop(containerd);
}
