//! Shared helpers of the integration tests: private network namespaces (removed on drop, even
//! when a test fails), running masqd inside one, and reading the kernel back through the
//! independent oracle `nft -j`.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Fails loudly when the tests cannot run: they need root for network namespaces.
pub fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "the integration tests create network namespaces and must run as root \
         (CI runs them as root; locally: sudo -E cargo test)"
    );
    for (tool, flag) in [
        ("ip", "-V"),
        ("nft", "--version"),
        ("iptables-nft", "--version"),
    ] {
        let ok = Command::new(tool)
            .arg(flag)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(
            ok,
            "{tool} is required (apt-get install iproute2 nftables iptables)"
        );
    }
}

/// A unique short id for names in this test process.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}-{}",
        std::process::id() % 100_000,
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Netns {
        require_root();
        let name = unique(prefix);
        sh(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// Runs a command inside the namespace; returns its output whatever the status.
    pub fn exec(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .expect("running ip netns exec")
    }

    /// Runs a command inside the namespace and asserts success.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.exec(args);
        assert!(
            o.status.success(),
            "{args:?} in {} failed: {}{}",
            self.name,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Runs a command given as whitespace-separated words (no quoting, no shell) inside the
    /// namespace and asserts success: `ns.ok_words("iptables-nft -t nat -F POSTROUTING")`.
    pub fn ok_words(&self, cmd: &str) -> String {
        self.ok(&cmd.split_whitespace().collect::<Vec<_>>())
    }

    /// `ip -n <ns> …`, asserting success.
    pub fn ip(&self, args: &[&str]) {
        let mut v = vec!["ip", "-n", &self.name];
        v.extend_from_slice(args);
        sh(&v);
    }

    /// `nft -j list ruleset` parsed.
    pub fn ruleset(&self) -> Value {
        serde_json::from_str(&self.ok(&["nft", "-j", "list", "ruleset"])).expect("nft -j output")
    }

    /// `nft -j list ruleset` as text (for byte-for-byte comparisons).
    pub fn ruleset_text(&self) -> String {
        self.ok(&["nft", "-j", "list", "ruleset"])
    }

    /// Runs masqd in the namespace with a config file and a state dir. PATH is pinned to one
    /// whose `iptables`/`ip6tables` are the nft variant, so detection's system default is the
    /// same whatever the host's alternatives say.
    pub fn masqd(&self, cfg: &Path, state: &Path, args: &[&str]) -> Output {
        self.masqd_with(&[], &nft_variant_path(), cfg, state, args)
    }

    /// Runs `prefix… env PATH=… masqd --config cfg --state-dir state args…` in the namespace
    /// (`path` is the whole `PATH=…` assignment; `prefix` e.g. a `setpriv` to drop privileges).
    pub fn masqd_with(
        &self,
        prefix: &[&str],
        path: &str,
        cfg: &Path,
        state: &Path,
        args: &[&str],
    ) -> Output {
        let bin = env!("CARGO_BIN_EXE_masqd");
        let (cfg, state) = (cfg.to_str().unwrap(), state.to_str().unwrap());
        let mut v = prefix.to_vec();
        v.extend(["env", path, bin, "--config", cfg, "--state-dir", state]);
        v.extend_from_slice(args);
        self.exec(&v)
    }

    /// Runs masqd and asserts the exit code.
    pub fn masqd_ok(&self, cfg: &Path, state: &Path, args: &[&str], code: i32) -> String {
        let o = self.masqd(cfg, state, args);
        assert_eq!(
            o.status.code(),
            Some(code),
            "masqd {args:?}: stdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Runs `f` in a thread that has entered this namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = File::open(&path).expect("open netns");
            nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("netns thread")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// `PATH=<dir>:/usr/sbin:/usr/bin:/sbin:/bin` where `<dir>` holds `iptables` and `ip6tables`
/// linked to their nft variants (made once per test process).
pub fn nft_variant_path() -> String {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("masqd-test-path-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        for cmd in ["iptables", "ip6tables"] {
            let _ = std::fs::remove_file(d.join(cmd));
            std::os::unix::fs::symlink(format!("/usr/sbin/{cmd}-nft"), d.join(cmd)).unwrap();
        }
        d
    });
    format!("PATH={}:/usr/sbin:/usr/bin:/sbin:/bin", dir.display())
}

/// Runs a host command (only `ip` with `-n`/`netns`, never touching the host's firewall).
pub fn sh(args: &[&str]) {
    let o = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        o.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A scratch directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        let p = std::env::temp_dir().join(unique("masqd-test-"));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The objects of a kind (`table`, `set`, `chain`, `rule`) in an `nft -j` document.
pub fn objects<'a>(rs: &'a Value, kind: &str) -> Vec<&'a Value> {
    rs["nftables"]
        .as_array()
        .map(|a| a.iter().filter_map(|o| o.get(kind)).collect())
        .unwrap_or_default()
}

/// The rules of a chain, rendered compactly (`ip.saddr == @pod4 counter masquerade`).
pub fn rules(rs: &Value, family: &str, table: &str, chain: &str) -> Vec<(u64, String)> {
    objects(rs, "rule")
        .into_iter()
        .filter(|r| r["family"] == family && r["table"] == table && r["chain"] == chain)
        .map(|r| {
            let parts: Vec<String> = r["expr"]
                .as_array()
                .unwrap()
                .iter()
                .map(render_expr)
                .collect();
            (r["handle"].as_u64().unwrap(), parts.join(" "))
        })
        .collect()
}

fn render_operand(v: &Value) -> String {
    if let Some(m) = v.get("meta") {
        return format!("meta.{}", m["key"].as_str().unwrap_or("?"));
    }
    if let Some(p) = v.get("payload") {
        return format!(
            "{}.{}",
            p["protocol"].as_str().unwrap_or("?"),
            p["field"].as_str().unwrap_or("?")
        );
    }
    if let Some(pair) = v.get("&").and_then(Value::as_array) {
        return format!(
            "{} & {}",
            render_operand(&pair[0]),
            render_operand(&pair[1])
        );
    }
    if let Some(p) = v.get("prefix") {
        return format!("{}/{}", p["addr"].as_str().unwrap_or("?"), p["len"]);
    }
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn render_expr(e: &Value) -> String {
    if let Some(m) = e.get("match") {
        return format!(
            "{} {} {}",
            render_operand(&m["left"]),
            m["op"].as_str().unwrap_or("?"),
            render_operand(&m["right"])
        );
    }
    if e.get("counter").is_some() {
        return "counter".into();
    }
    if e.get("return").is_some() {
        return "return".into();
    }
    if let Some(m) = e.get("masquerade") {
        return match m.get("flags") {
            Some(f) => format!("masquerade({})", render_operand(f)),
            None => "masquerade".into(),
        };
    }
    if let Some(n) = e.get("snat") {
        return format!(
            "snat({} to {})",
            n["family"].as_str().unwrap_or("?"),
            render_operand(&n["addr"])
        );
    }
    if let Some(x) = e.get("xt") {
        return format!("xt:{}", x["name"].as_str().unwrap_or("?"));
    }
    e.to_string()
}

/// Parses an nft JSON address string of a family into an integer.
pub fn addr(s: &str) -> (bool, u128) {
    match s
        .parse::<IpAddr>()
        .unwrap_or_else(|_| panic!("address {s}"))
    {
        IpAddr::V4(a) => (false, u32::from(a) as u128),
        IpAddr::V6(a) => (true, u128::from(a)),
    }
}

/// The inclusive address ranges covered by a set, as `nft -j` shows its elements.
pub fn set_ranges(rs: &Value, name: &str) -> Option<Vec<(u128, u128)>> {
    let set = objects(rs, "set").into_iter().find(|s| s["name"] == name)?;
    let mut out = Vec::new();
    for e in set["elem"].as_array().cloned().unwrap_or_default() {
        let e = e.get("elem").map(|x| x["val"].clone()).unwrap_or(e);
        if let Some(s) = e.as_str() {
            let (_, a) = addr(s);
            out.push((a, a));
        } else if let Some(p) = e.get("prefix") {
            let (v6, a) = addr(p["addr"].as_str().unwrap());
            let bits = if v6 { 128 } else { 32 };
            let len = p["len"].as_u64().unwrap() as u32;
            let host = bits - len;
            let mask = if host == 128 {
                u128::MAX
            } else {
                (1u128 << host) - 1
            };
            out.push((a, a | mask));
        } else if let Some(r) = e.get("range") {
            let (_, a) = addr(r[0].as_str().unwrap());
            let (_, b) = addr(r[1].as_str().unwrap());
            out.push((a, b));
        } else {
            panic!("unexpected element {e}");
        }
    }
    Some(merge(out))
}

/// Sorts and merges overlapping or adjacent ranges.
pub fn merge(mut v: Vec<(u128, u128)>) -> Vec<(u128, u128)> {
    v.sort();
    let mut out: Vec<(u128, u128)> = Vec::new();
    for (a, b) in v {
        if let Some(last) = out.last_mut() {
            if last.1 == u128::MAX || a <= last.1 + 1 {
                last.1 = last.1.max(b);
                continue;
            }
        }
        out.push((a, b));
    }
    out
}

/// The inclusive range of a CIDR written as text, computed independently of masqd.
pub fn cidr_range(s: &str) -> (bool, u128, u128) {
    let (a, l) = s.split_once('/').unwrap();
    let (v6, a) = addr(a);
    let bits = if v6 { 128 } else { 32 };
    let host = bits - l.parse::<u32>().unwrap();
    let mask = if host == 128 {
        u128::MAX
    } else {
        (1u128 << host) - 1
    };
    (v6, a & !mask, (a & !mask) | mask)
}

/// Serves one TCP connection in the namespace and reports the peer's IP; returns the address
/// to dial and a handle yielding the peer.
pub fn serve_once(ns: &Netns, bind: SocketAddr) -> std::sync::mpsc::Receiver<Option<IpAddr>> {
    let (tx_ready, rx_ready) = std::sync::mpsc::channel();
    let (tx, rx) = std::sync::mpsc::channel();
    let path = format!("/run/netns/{}", ns.name);
    std::thread::spawn(move || {
        let file = File::open(&path).expect("open netns");
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let l = TcpListener::bind(bind).expect("bind");
        l.set_nonblocking(true).unwrap();
        tx_ready.send(()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match l.accept() {
                Ok((mut s, peer)) => {
                    let _ = s.write_all(b"hi\n");
                    let _ = tx.send(Some(peer.ip()));
                    return;
                }
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(_) => {
                    let _ = tx.send(None);
                    return;
                }
            }
        }
    });
    rx_ready.recv().unwrap();
    rx
}

/// Connects from inside `ns` to `to` and reads the greeting; true on success.
pub fn connect_from(ns: &Netns, to: SocketAddr) -> bool {
    ns.run(move || {
        let Ok(mut s) = TcpStream::connect_timeout(&to, Duration::from_secs(5)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let mut buf = [0u8; 3];
        s.read_exact(&mut buf).is_ok()
    })
}

/// The source IP the server in `server_ns` saw for a connection from `client_ns`.
pub fn seen_source(
    client_ns: &Netns,
    server_ns: &Netns,
    server_ip: IpAddr,
    port: u16,
) -> Option<IpAddr> {
    let bind = match server_ip {
        IpAddr::V4(_) => SocketAddr::new("0.0.0.0".parse().unwrap(), port),
        IpAddr::V6(_) => SocketAddr::new("::".parse().unwrap(), port),
    };
    let rx = serve_once(server_ns, bind);
    let ok = connect_from(client_ns, SocketAddr::new(server_ip, port));
    let seen = rx.recv_timeout(Duration::from_secs(15)).ok().flatten();
    if ok {
        seen
    } else {
        None
    }
}

/// An address written as text (tests only).
pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Node A's configuration (scripts/cluster.sh) in five lines, `[node]` on line 1: what the
/// tests that check line numbers in messages, or append sections, start from.
pub const NODE_A_TOML: &str = r#"[node]
pod_cidrs = ["172.7.21.0/24", "fd00:7:21::/64"]
[masquerade]
cluster_cidrs = ["172.7.0.0/16", "fd00:7::/32"]
bridge_interfaces = ["docker0"]
"#;

/// Node A's configuration in the cluster of scripts/cluster.sh: its pod subnets, the cluster
/// network as the exception, docker0 as the bridge.
pub const NODE_A_CONFIG: &str = r#"
[node]
pod_cidrs = ["172.7.21.0/24", "fd00:7:21::/64"]
[masquerade]
cluster_cidrs = ["172.7.0.0/16", "fd00:7::/32"]
nonmasquerade_cidrs = []
bridge_interfaces = ["docker0"]
"#;

/// The two-node cluster of scripts/cluster.sh; `writer` (`nft` or `legacy`) says which
/// iptables wrote the broad default rule on node A. Removed on drop.
pub struct Cluster {
    pub prefix: String,
    pub a: Netns,
    pub b: Netns,
    pub pa: Netns,
    pub pb: Netns,
    pub out: Netns,
}

impl Cluster {
    pub fn up(writer: &str) -> Cluster {
        require_root();
        let prefix = unique("mqc");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cluster.sh");
        let o = Command::new("bash")
            .args([script, "up", &prefix, writer])
            .output()
            .unwrap();
        // Wrap the namespaces first so they are removed even if the set-up failed half-way.
        let ns = |s: &str| Netns {
            name: format!("{prefix}-{s}"),
        };
        let c = Cluster {
            a: ns("a"),
            b: ns("b"),
            pa: ns("pa"),
            pb: ns("pb"),
            out: ns("out"),
            prefix: prefix.clone(),
        };
        assert!(
            o.status.success(),
            "cluster.sh up: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        c
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cluster.sh");
        let _ = Command::new("bash")
            .args([script, "down", &self.prefix])
            .output();
    }
}

/// `iptables-legacy-save` (or ip6) of a namespace without the timestamp comments.
pub fn legacy_save(ns: &Netns, v6: bool, table: Option<&str>) -> String {
    let bin = if v6 {
        "ip6tables-legacy-save"
    } else {
        "iptables-legacy-save"
    };
    let mut args = vec![bin];
    if let Some(t) = table {
        args.extend(["-t", t]);
    }
    ns.ok(&args)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// The loaded legacy tables of a namespace, byte for byte.
pub fn tables_names(ns: &Netns) -> (String, String) {
    let r = |f: &'static str| {
        ns.run(move || std::fs::read_to_string(f).unwrap_or_else(|_| "<absent>".into()))
    };
    (
        r("/proc/thread-self/net/ip_tables_names"),
        r("/proc/thread-self/net/ip6_tables_names"),
    )
}

/// A fake NOTIFY_SOCKET for `masqd run`: a datagram socket in a scratch directory, and every
/// notification received so far (`seen`).
pub struct Notes {
    /// The socket's path, for `NOTIFY_SOCKET`.
    pub path: PathBuf,
    /// Notifications received, in order.
    pub seen: Vec<String>,
    rx: std::sync::mpsc::Receiver<String>,
    _dir: TempDir,
}

impl Notes {
    pub fn new() -> Notes {
        let dir = TempDir::new();
        let path = dir.path().join("notify.sock");
        let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf) {
                if tx
                    .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                    .is_err()
                {
                    break;
                }
            }
        });
        Notes {
            path,
            seen: Vec::new(),
            rx,
            _dir: dir,
        }
    }

    /// Takes the next notification into `seen` if one arrives within `timeout`.
    pub fn poll(&mut self, timeout: Duration) -> Option<&str> {
        let n = self.rx.recv_timeout(timeout).ok()?;
        self.seen.push(n);
        self.seen.last().map(String::as_str)
    }

    /// Waits for a notification containing `what`; returns it.
    pub fn wait(&mut self, what: &str, timeout: Duration) -> String {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.poll(left) {
                Some(n) if n.contains(what) => return n.to_string(),
                Some(_) => {}
                None => panic!(
                    "no {what:?} notification within {timeout:?}; got {:?}",
                    self.seen
                ),
            }
        }
    }
}

/// `masqd run` as a child with a fake NOTIFY_SOCKET: `cmd` is the whole command line (how the
/// test enters the namespace is its own); killed on drop.
pub struct Daemon {
    pub child: std::process::Child,
    pub notes: Notes,
}

impl Daemon {
    /// Spawns `cmd` with `NOTIFY_SOCKET` set, stdout discarded, stderr inherited.
    pub fn spawn(mut cmd: Command) -> Daemon {
        let notes = Notes::new();
        cmd.env("NOTIFY_SOCKET", &notes.path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit());
        let child = cmd.spawn().expect("start masqd run");
        Daemon { child, notes }
    }

    /// Waits for a notification containing `what`; returns it.
    pub fn wait_note(&mut self, what: &str, timeout: Duration) -> String {
        self.notes.wait(what, timeout)
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits for the exit (at most `timeout`), returning the status.
    pub fn exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let t = std::time::Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                t.elapsed() < timeout,
                "masqd still running after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET path` on `addr` from inside `ns`: (status code, body), or None when nobody answers.
pub fn http_get(ns: &Netns, addr: &str, path: &str) -> Option<(u16, String)> {
    let addr: SocketAddr = addr.parse().unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    ns.run(move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        s.write_all(req.as_bytes()).ok()?;
        let mut resp = String::new();
        s.read_to_string(&mut resp).ok()?;
        parse_response(&resp)
    })
}

pub fn parse_response(resp: &str) -> Option<(u16, String)> {
    let (head, body) = resp.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

/// Every sample of an exposition: `name{labels}` (labels sorted) → value.
pub fn samples(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for l in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = l.rsplit_once(' ').expect("sample line");
        let key = match series.split_once('{') {
            None => series.to_string(),
            Some((name, labels)) => {
                let mut ls: Vec<&str> = labels.trim_end_matches('}').split(',').collect();
                ls.sort();
                format!("{name}{{{}}}", ls.join(","))
            }
        };
        out.insert(key, value.parse().expect("sample value"));
    }
    out
}

/// `GET path` over the Unix socket `sock` (`[metrics] listen = "/path"`): (status code, body).
pub fn unix_get(sock: &Path, path: &str) -> Option<(u16, String)> {
    let mut s = std::os::unix::net::UnixStream::connect(sock).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    parse_response(&resp)
}

/// Runs masqd as user nobody (uid 65534, no capabilities, no groups) in `ns`.
pub fn as_nobody(ns: &Netns, cfg: &Path, state: &Path, args: &[&str]) -> Output {
    let nobody = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
    ];
    ns.masqd_with(&nobody, &nft_variant_path(), cfg, state, args)
}
