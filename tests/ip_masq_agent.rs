//! masqd as a drop-in for ip-masq-agent (issue 11): `--ip-masq-agent-config` with no masqd.toml,
//! in the two-node cluster of scripts/cluster.sh plus an outside host on a non-private address
//! and a metadata server at 169.254.169.254. Oracles: the source address the peers see (real
//! TCP), `nft -j list ruleset`, the daemon's sd_notify messages.
//!
//! With upstream's default list (no file: 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16 and the
//! link-local range) pod A keeps its address towards node B (10.200.0.2) and towards
//! 169.254.169.254, and is masqueraded towards 198.51.100.3.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const OUTSIDE: &str = "198.51.100.3";
const METADATA: &str = "169.254.169.254";

/// The cluster with two more destinations on the outside host, a public-looking address and the
/// metadata address; the outside host routes pod A's subnet back, so a kept source is answered
/// too and the test sees which source arrived.
fn cluster() -> Cluster {
    let c = Cluster::up("nft");
    c.out
        .ip(&["addr", "add", &format!("{OUTSIDE}/32"), "dev", "eth0"]);
    c.out
        .ip(&["addr", "add", &format!("{METADATA}/32"), "dev", "eth0"]);
    c.out
        .ip(&["route", "add", "172.7.21.0/24", "via", "10.200.0.1"]);
    for dst in [OUTSIDE, METADATA] {
        c.a.ip(&["route", "add", &format!("{dst}/32"), "via", "10.200.0.3"]);
    }
    c
}

/// `masqd --ip-masq-agent-config FILE --pod-cidr … --state-dir STATE ARGS` in `ns`.
fn agent_cmd(file: &Path, state: &Path, args: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "env".into(),
        nft_variant_path(),
        env!("CARGO_BIN_EXE_masqd").into(),
        "--ip-masq-agent-config".into(),
        file.display().to_string(),
        "--pod-cidr".into(),
        "172.7.21.0/24".into(),
        "--pod-cidr".into(),
        "fd00:7:21::/64".into(),
        "--state-dir".into(),
        state.display().to_string(),
    ];
    v.extend(args.iter().map(|s| s.to_string()));
    v
}

fn agent(ns: &Netns, file: &Path, state: &Path, args: &[&str], code: i32) -> String {
    let v = agent_cmd(file, state, args);
    let refs: Vec<&str> = v.iter().map(String::as_str).collect();
    let o = ns.exec(&refs);
    assert_eq!(
        o.status.code(),
        Some(code),
        "masqd {args:?}:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn nomasq4(ns: &Netns) -> Vec<(u128, u128)> {
    merge(set_ranges(&ns.ruleset(), "nomasq4").unwrap_or_default())
}

fn range(cidr: &str) -> (u128, u128) {
    let (_, a, b) = cidr_range(cidr);
    (a, b)
}

#[test]
fn upstream_default_file_keeps_private_and_link_local_destinations() {
    let c = cluster();
    let dir = TempDir::new();
    let absent = dir.path().join("config/ip-masq-agent");
    let state = dir.path().join("state");
    agent(&c.a, &absent, &state, &["apply"], 0);
    assert_eq!(
        nomasq4(&c.a),
        merge(vec![
            range("10.0.0.0/8"),
            range("169.254.0.0/16"),
            range("172.16.0.0/12"),
            range("192.168.0.0/16")
        ])
    );
    let node_b = ip("10.200.0.2");
    assert_eq!(
        seen_source(&c.pa, &c.b, node_b, 8181),
        Some(ip("172.7.21.2"))
    );
    assert_eq!(
        seen_source(&c.pa, &c.out, ip(METADATA), 8182),
        Some(ip("172.7.21.2"))
    );
    assert_eq!(
        seen_source(&c.pa, &c.out, ip(OUTSIDE), 8183),
        Some(ip("10.200.0.1"))
    );
    // In sync: status exits 0 and names the file it read.
    agent(&c.a, &absent, &state, &["status"], 0);

    // masqLinkLocal: true → the metadata server sees node A (and answers, being on-link).
    std::fs::create_dir_all(absent.parent().unwrap()).unwrap();
    std::fs::write(&absent, "masqLinkLocal: true\n").unwrap();
    agent(&c.a, &absent, &state, &["apply"], 0);
    assert_eq!(
        seen_source(&c.pa, &c.out, ip(METADATA), 8184),
        Some(ip("10.200.0.1"))
    );
    assert_eq!(
        seen_source(&c.pa, &c.b, node_b, 8185),
        Some(ip("172.7.21.2"))
    );
}

#[test]
fn bad_files_are_refused_naming_file_and_key() {
    let c = cluster();
    let dir = TempDir::new();
    let state = dir.path().join("state");
    let cases = [
        (
            "nonMasqueradeCIDRs: 10.0.0.0/8\n",
            "nonMasqueradeCIDRs: must be a list",
        ),
        (
            "resyncInterval: 5 fortnights\n",
            "resyncInterval: time: unknown unit",
        ),
        (
            "nonMasqueradeCIDRs: [10.0.0.1/8]\n",
            "is not aligned to a CIDR block",
        ),
        (
            "cidrLimit: 1\nnonMasqueradeCIDRs: [10.0.0.0/8, 10.1.0.0/16]\n",
            "more than cidrLimit",
        ),
        ("\x7b*", "not valid JSON"), // an opening curly brace, then `*`
        (": : :\n", "not valid YAML or JSON"),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let file = dir.write(&format!("agent-{i}"), text);
        let v = agent_cmd(&file, &state, &["apply"]);
        let refs: Vec<&str> = v.iter().map(String::as_str).collect();
        let o = c.a.exec(&refs);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{text:?}: {err}");
        assert!(err.contains(&file.display().to_string()), "{text:?}: {err}");
        assert!(err.contains(want), "{text:?}: want {want:?} in {err}");
        // `run` refuses it at start with EX_CONFIG.
        let v = agent_cmd(&file, &state, &["run"]);
        let refs: Vec<&str> = v.iter().map(String::as_str).collect();
        assert_eq!(c.a.exec(&refs).status.code(), Some(78), "{text:?}");
    }
    // Nothing was installed by any of them.
    assert!(set_ranges(&c.a.ruleset(), "nomasq4").is_none());
}

/// A ConfigMap volume as the kubelet writes it: `..TIMESTAMP/ip-masq-agent`, `..data` →
/// `..TIMESTAMP`, `ip-masq-agent` → `..data/ip-masq-agent`; an update writes a new timestamped
/// directory and renames a new `..data` symlink over the old one.
struct ConfigMapDir {
    dir: PathBuf,
    generation: u32,
}

impl ConfigMapDir {
    fn new(dir: PathBuf, text: &str) -> ConfigMapDir {
        std::fs::create_dir_all(&dir).unwrap();
        let mut c = ConfigMapDir { dir, generation: 0 };
        c.update(text);
        std::os::unix::fs::symlink("..data/ip-masq-agent", c.dir.join("ip-masq-agent")).unwrap();
        c
    }

    fn update(&mut self, text: &str) {
        self.generation += 1;
        let ts = format!("..2026_12_01_00_00_0{}.000", self.generation);
        std::fs::create_dir(self.dir.join(&ts)).unwrap();
        std::fs::write(self.dir.join(&ts).join("ip-masq-agent"), text).unwrap();
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&ts, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }

    fn file(&self) -> PathBuf {
        self.dir.join("ip-masq-agent")
    }
}

fn spawn_run(ns: &Netns, file: &Path, state: &Path, notes: &Notes) -> Child {
    let mut v = vec![
        "ip".to_string(),
        "netns".into(),
        "exec".into(),
        ns.name.clone(),
    ];
    v.extend(agent_cmd(file, state, &["run"]));
    v.insert(4, "env".into());
    v.insert(5, format!("NOTIFY_SOCKET={}", notes.path.display()));
    Command::new(&v[0])
        .args(&v[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_configmap_update_reaches_the_kernel_within_a_second_without_a_signal() {
    let c = cluster();
    let dir = TempDir::new();
    let state = dir.path().join("state");
    let mut cm = ConfigMapDir::new(
        dir.path().join("config"),
        "nonMasqueradeCIDRs:\n  - 10.0.0.0/8\nresyncInterval: 10m\n",
    );
    let mut notes = Notes::new();
    let _daemon = Killed(spawn_run(&c.a, &cm.file(), &state, &notes));
    notes.wait("READY=1", Duration::from_secs(20));
    let before = nomasq4(&c.a);
    assert!(before.contains(&range("10.0.0.0/8")), "{before:?}");
    assert_eq!(
        seen_source(&c.pa, &c.out, ip(OUTSIDE), 8191),
        Some(ip("10.200.0.1"))
    );

    cm.update("nonMasqueradeCIDRs:\n  - 10.0.0.0/8\n  - 198.51.100.0/24\nresyncInterval: 10m\n");
    let t0 = Instant::now();
    let want = range("198.51.100.0/24");
    while !nomasq4(&c.a).contains(&want) {
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "the ConfigMap update did not reach the kernel within 1 s: {:?}",
            nomasq4(&c.a)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Now an exception: the outside host sees pod A.
    assert_eq!(
        seen_source(&c.pa, &c.out, ip(OUTSIDE), 8192),
        Some(ip("172.7.21.2"))
    );

    // A broken update keeps the last good policy, says so in STATUS=.
    cm.update("nonMasqueradeCIDRs: [not-a-cidr]\n");
    let status = notes.wait("config error", Duration::from_secs(5));
    assert!(status.contains("ip-masq-agent"), "{status}");
    assert!(status.contains("not-a-cidr"), "{status}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(nomasq4(&c.a).contains(&want));
}

/// The venv's PyYAML (scripts/install-deps.sh): the manifests' YAML as JSON.
fn manifest(name: &str) -> serde_json::Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes/").to_string() + name;
    let py = "/opt/masqd-venv/bin/python";
    assert!(
        Path::new(py).exists(),
        "{py} is missing: run `sudo bash scripts/install-deps.sh`"
    );
    let o = Command::new(py)
        .args([
            "-c",
            "import json,sys,yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
        ])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{path}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

/// The DaemonSet's container, run as the kubelet runs it: its args, its env, the ConfigMaps'
/// files at their mount paths (a private mount namespace: /etc and /var/lib are overlays on
/// scratch directories, /run a fresh tmpfs, so nothing of the host's file system changes), in
/// node A's network namespace with flannel's subnet.env as flannel writes it. The policy of the
/// sample ConfigMap reaches the kernel and /healthz answers on the probe's port.
#[test]
fn the_daemonsets_entrypoint_runs_as_the_kubelet_would_run_it() {
    let c = cluster();
    let ds = manifest("daemonset.yaml");
    let container = &ds["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<String> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    let env: Vec<String> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{}={}",
                e["name"].as_str().unwrap(),
                e["value"].as_str().unwrap()
            )
        })
        .collect();
    let agent = manifest("configmap.yaml")["data"]["config"]
        .as_str()
        .unwrap()
        .to_string();
    let toml = manifest("masqd-config.yaml")["data"]["masqd.toml"]
        .as_str()
        .unwrap()
        .to_string();
    let dir = TempDir::new();
    dir.write("ip-masq-agent", &agent);
    dir.write("masqd.toml", &toml);
    dir.write(
        "subnet.env",
        "FLANNEL_NETWORK=172.7.0.0/16\nFLANNEL_SUBNET=172.7.21.1/24\nFLANNEL_MTU=1450\n",
    );
    let t = dir.path().display().to_string();
    let script = format!(
        r#"set -e
for d in etc var/lib; do
    mkdir -p {t}/up/$d {t}/work/$d
    mount -t overlay overlay -o lowerdir=/$d,upperdir={t}/up/$d,workdir={t}/work/$d /$d
done
mount -t tmpfs tmpfs /run
mkdir -p /etc/config /etc/masqd /run/flannel /var/lib/masqd /run/masqd
cp {t}/ip-masq-agent /etc/config/ip-masq-agent
cp {t}/masqd.toml /etc/masqd/masqd.toml
cp {t}/subnet.env /run/flannel/subnet.env
touch /run/xtables.lock
exec env -i {path} {env} {bin} "$@""#,
        path = nft_variant_path(),
        env = env.join(" "),
        bin = env!("CARGO_BIN_EXE_masqd"),
    );
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        &c.a.name,
        "unshare",
        "--mount",
        "--propagation",
        "private",
    ])
    .args(["sh", "-c", &script, "entrypoint"])
    .args(&args)
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let _daemon = Killed(cmd.spawn().unwrap());
    let t0 = Instant::now();
    let want = [
        range("10.0.0.0/8"),
        range("169.254.0.0/16"),
        range("172.7.0.0/16"),
    ];
    while !want
        .iter()
        .all(|r| nomasq4(&c.a).iter().any(|(a, b)| a <= &r.0 && b >= &r.1))
    {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the entrypoint never installed the policy: {:?}",
            nomasq4(&c.a)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let pods = merge(set_ranges(&c.a.ruleset(), "pod4").unwrap_or_default());
    assert_eq!(pods, vec![range("172.7.21.0/24")]);
    // The liveness probe: GET /healthz on the metrics port of masqd-config.yaml.
    let port = container["ports"][0]["containerPort"].as_u64().unwrap();
    let get = |path: &'static str| {
        c.a.run(move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port as u16)).unwrap();
            write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            out
        })
    };
    let health = get("/healthz");
    assert!(health.starts_with("HTTP/1.1 200"), "{health:?}");
    let metrics = get("/metrics");
    assert!(
        metrics.contains("\nmasqd_config_last_reload_successful 1\n"),
        "{metrics}"
    );
    assert_eq!(
        seen_source(&c.pa, &c.out, ip(OUTSIDE), 8195),
        Some(ip("10.200.0.1"))
    );
    assert_eq!(
        seen_source(&c.pa, &c.b, ip("10.200.0.2"), 8196),
        Some(ip("172.7.21.2"))
    );
}
