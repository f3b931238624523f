//! deploy/: the Kubernetes manifests validated offline against the Kubernetes API schema
//! (PyPI `kubernetes-validate`, pinned by scripts/install-deps.sh in /opt/masqd-venv, which
//! ships the schemas: no network), the DaemonSet's required properties (read with the venv's
//! PyYAML, checked here), and the Containerfile's stages. A missing tool fails the test: nothing
//! is skipped. Each check is also shown to fail on a broken copy (a misspelt field, a dropped
//! capability, …). Needs no root.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::TempDir;
use serde_json::Value;

const VENV: &str = "/opt/masqd-venv";
/// The Kubernetes version the manifests are validated against (schemas shipped offline).
const KUBERNETES: &str = "1.30.0";
const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes");
const CONTAINERFILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/Containerfile");

/// YAML (every document) to JSON, with the venv's PyYAML (kubernetes-validate's own parser).
const YAML_TO_JSON: &str = "import json, sys, yaml
with open(sys.argv[1]) as f:
    print(json.dumps(list(yaml.safe_load_all(f))))";

fn tool(name: &str) -> PathBuf {
    let p = Path::new(VENV).join("bin").join(name);
    assert!(
        p.exists(),
        "{} is missing: run `sudo bash scripts/install-deps.sh` (it installs kubernetes-validate \
         into {VENV})",
        p.display()
    );
    p
}

/// The manifests kubectl applies (kustomization.yaml is kustomize's, not an API object).
fn manifests() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(DIR)
        .unwrap_or_else(|e| panic!("{DIR}: {e}"))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .filter(|p| !p.ends_with("kustomization.yaml"))
        .collect();
    v.sort();
    assert!(v.len() >= 4, "manifests missing in {DIR}: {v:?}");
    v
}

fn validate(files: &[PathBuf]) -> Output {
    Command::new(tool("kubernetes-validate"))
        .args(["--strict", "-k", KUBERNETES])
        .args(files)
        .output()
        .expect("running kubernetes-validate")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Every YAML document of a file, as JSON.
fn documents(path: &Path) -> Vec<Value> {
    let o = Command::new(tool("python"))
        .args(["-c", YAML_TO_JSON])
        .arg(path)
        .output()
        .expect("running the venv's python");
    assert!(o.status.success(), "{}: {}", path.display(), text(&o));
    match serde_json::from_slice(&o.stdout) {
        Ok(Value::Array(v)) => v,
        other => panic!("{}: not a list of documents: {other:?}", path.display()),
    }
}

fn daemonset() -> Value {
    documents(&Path::new(DIR).join("daemonset.yaml")).remove(0)
}

#[test]
fn every_manifest_validates_against_the_api_schema() {
    let files = manifests();
    let o = validate(&files);
    let out = text(&o);
    eprintln!("{out}");
    assert!(o.status.success(), "kubernetes-validate failed:\n{out}");
    let short = KUBERNETES.trim_end_matches(".0");
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy();
        assert!(
            out.lines()
                .any(|l| l.contains(&*name) && l.contains("passed") && l.contains(short)),
            "no pass against {short} for {name}:\n{out}"
        );
    }
    for bad in ["ERROR", "WARN", "Couldn't find schema"] {
        assert!(!out.contains(bad), "{bad} in:\n{out}");
    }
}

#[test]
fn the_validator_refuses_a_misspelt_field_and_a_wrong_type() {
    let good = std::fs::read_to_string(Path::new(DIR).join("daemonset.yaml")).unwrap();
    let dir = TempDir::new();
    for (name, from, to, says) in [
        (
            "misspelt.yaml",
            "readOnlyRootFilesystem: true",
            "readOnlyRootFileSystem: true",
            "readOnlyRootFileSystem",
        ),
        (
            "wrong-type.yaml",
            "hostNetwork: true",
            "hostNetwork: \"yes\"",
            "hostNetwork",
        ),
        (
            "no-selector.yaml",
            "  selector:\n",
            "  selectr:\n",
            "'selector' is a required property",
        ),
    ] {
        assert!(good.contains(from), "daemonset.yaml has no {from:?}");
        let p = dir.write(name, &good.replacen(from, to, 1));
        let o = validate(&[p]);
        let out = text(&o);
        assert!(!o.status.success(), "{name} passed:\n{out}");
        assert!(out.contains(says), "{name}: {says} not named in:\n{out}");
    }
}

/// The DaemonSet's contract (issue 11, item 2), as a list of what is wrong with `ds`.
fn daemonset_problems(ds: &Value) -> Vec<String> {
    let mut bad = Vec::new();
    let mut want = |ok: bool, what: &str| {
        if !ok {
            bad.push(what.to_string());
        }
    };
    let pod = &ds["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    want(ds["kind"] == "DaemonSet", "kind DaemonSet");
    want(pod["hostNetwork"] == true, "hostNetwork: true");
    want(
        pod["containers"].as_array().map(Vec::len) == Some(1),
        "one container",
    );
    want(
        sc["capabilities"]["drop"] == serde_json::json!(["ALL"]),
        "capabilities.drop [ALL]",
    );
    let mut add: Vec<&str> = sc["capabilities"]["add"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    add.sort_unstable();
    want(
        add == ["NET_ADMIN", "NET_RAW"],
        "capabilities.add NET_ADMIN, NET_RAW only",
    );
    want(
        sc["readOnlyRootFilesystem"] == true,
        "readOnlyRootFilesystem",
    );
    want(
        sc["allowPrivilegeEscalation"] == false,
        "allowPrivilegeEscalation: false",
    );
    want(sc["privileged"] != true, "not privileged");
    want(
        pod["tolerations"] == serde_json::json!([{"operator": "Exists"}]),
        "tolerations: operator Exists",
    );
    want(
        pod["priorityClassName"] == "system-node-critical",
        "priorityClassName system-node-critical",
    );
    want(pod["automountServiceAccountToken"] == false, "no token");
    want(
        pod["serviceAccountName"] == "masqd",
        "serviceAccountName masqd",
    );
    bad.extend(volume_problems(pod, c));
    bad.extend(runtime_problems(c));
    bad
}

/// The mounts: each path, its source, its mode.
fn volume_problems(pod: &Value, c: &Value) -> Vec<String> {
    let mut bad = Vec::new();
    let volumes = pod["volumes"].as_array().cloned().unwrap_or_default();
    let mounts = c["volumeMounts"].as_array().cloned().unwrap_or_default();
    let volume = |name: &str| volumes.iter().find(|v| v["name"] == name).cloned();
    let mount_at = |path: &str| mounts.iter().find(|m| m["mountPath"] == path).cloned();
    let source = |path: &str| {
        mount_at(path)
            .and_then(|m| m["name"].as_str().and_then(volume))
            .unwrap_or(Value::Null)
    };
    let mut want = |ok: bool, what: &str| {
        if !ok {
            bad.push(what.to_string());
        }
    };
    let lock = source("/run/xtables.lock");
    want(
        lock["hostPath"]["path"] == "/run/xtables.lock"
            && lock["hostPath"]["type"] == "FileOrCreate",
        "/run/xtables.lock: hostPath FileOrCreate",
    );
    let flannel = source("/run/flannel");
    want(
        flannel["hostPath"]["path"] == "/run/flannel"
            && flannel["hostPath"]["type"] == "DirectoryOrCreate",
        "/run/flannel: hostPath DirectoryOrCreate",
    );
    want(
        mount_at("/run/flannel").is_some_and(|m| m["readOnly"] == true),
        "/run/flannel read-only",
    );
    let cm = source("/etc/config");
    want(
        cm["configMap"]["name"] == "ip-masq-agent" && cm["configMap"]["optional"] == true,
        "/etc/config: ConfigMap ip-masq-agent, optional",
    );
    want(
        cm["configMap"]["items"] == serde_json::json!([{"key": "config", "path": "ip-masq-agent"}]),
        "/etc/config/ip-masq-agent from the key config",
    );
    let state = source("/var/lib/masqd");
    want(
        state["hostPath"]["path"] == "/var/lib/masqd" || state.get("emptyDir").is_some(),
        "/var/lib/masqd: hostPath or emptyDir",
    );
    want(
        source("/run/masqd").get("emptyDir").is_some(),
        "/run/masqd: emptyDir",
    );
    want(
        source("/etc/masqd")["configMap"]["name"] == "masqd",
        "/etc/masqd: ConfigMap masqd",
    );
    bad
}

/// Arguments, probe, resources.
fn runtime_problems(c: &Value) -> Vec<String> {
    let mut bad = Vec::new();
    let mut want = |ok: bool, what: &str| {
        if !ok {
            bad.push(what.to_string());
        }
    };
    let args: Vec<&str> = c["args"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    want(
        args.windows(3)
            .any(|w| w == ["run", "--ip-masq-agent-config", "/etc/config/ip-masq-agent"]),
        "args: run --ip-masq-agent-config /etc/config/ip-masq-agent",
    );
    want(
        args.windows(2)
            .any(|w| w == ["--config", "/etc/masqd/masqd.toml"]),
        "args: --config /etc/masqd/masqd.toml",
    );
    let probe = &c["livenessProbe"]["httpGet"];
    let port = c["ports"]
        .as_array()
        .and_then(|ps| {
            ps.iter()
                .find(|p| p["name"] == probe["port"] || p["containerPort"] == probe["port"])
        })
        .and_then(|p| p["containerPort"].as_u64());
    want(
        probe["path"] == "/healthz",
        "livenessProbe httpGet /healthz",
    );
    want(
        port == Some(METRICS_PORT) && probe["host"] == METRICS_HOST,
        "livenessProbe on the metrics listener",
    );
    let res = &c["resources"];
    want(res["requests"]["memory"] == "32Mi", "requests.memory 32Mi");
    want(res["requests"]["cpu"].is_string(), "requests.cpu");
    want(
        mebibytes(&res["limits"]["memory"]) >= Some(64),
        "limits.memory with headroom (>= 64Mi)",
    );
    want(res["limits"].get("cpu").is_none(), "no CPU limit");
    bad
}

/// `[metrics] listen` of masqd-config.yaml.
const METRICS_HOST: &str = "127.0.0.1";
const METRICS_PORT: u64 = 9816;

fn mebibytes(v: &Value) -> Option<u64> {
    v.as_str()?.strip_suffix("Mi")?.parse().ok()
}

#[test]
fn daemonset_has_the_required_properties() {
    let problems = daemonset_problems(&daemonset());
    assert!(
        problems.is_empty(),
        "deploy/kubernetes/daemonset.yaml: {problems:#?}"
    );
}

/// Each deviation is caught, by name.
#[test]
fn the_property_check_catches_each_deviation() {
    let good = daemonset();
    type Edit = fn(&mut Value);
    let cases: [(&str, Edit); 8] = [
        ("capabilities.add NET_ADMIN", |d| {
            d["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]
                ["add"] = serde_json::json!(["NET_RAW"])
        }),
        ("capabilities.add NET_ADMIN", |d| {
            d["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]
                ["add"] = serde_json::json!(["NET_ADMIN", "NET_RAW", "SYS_ADMIN"])
        }),
        ("readOnlyRootFilesystem", |d| {
            d["spec"]["template"]["spec"]["containers"][0]["securityContext"]
                ["readOnlyRootFilesystem"] = false.into()
        }),
        ("hostNetwork", |d| {
            d["spec"]["template"]["spec"]["hostNetwork"] = false.into()
        }),
        ("tolerations", |d| {
            d["spec"]["template"]["spec"]["tolerations"] = serde_json::json!([{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}])
        }),
        ("/etc/config", |d| {
            for v in d["spec"]["template"]["spec"]["volumes"]
                .as_array_mut()
                .unwrap()
            {
                if v["name"] == "ip-masq-agent" {
                    v["configMap"]["optional"] = false.into();
                }
            }
        }),
        ("livenessProbe httpGet /healthz", |d| {
            d["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["path"] =
                "/metrics".into()
        }),
        ("args: run --ip-masq-agent-config", |d| {
            d["spec"]["template"]["spec"]["containers"][0]["args"] = serde_json::json!(["run"])
        }),
    ];
    for (named, edit) in cases {
        let mut d = good.clone();
        edit(&mut d);
        let problems = daemonset_problems(&d);
        assert!(
            problems.iter().any(|p| p.contains(named)),
            "the edit for {named:?} was not caught: {problems:?}"
        );
    }
}

/// The whole path (YAML text → PyYAML → the check) on a copy without NET_ADMIN.
#[test]
fn a_daemonset_without_net_admin_fails_the_check() {
    let good = std::fs::read_to_string(Path::new(DIR).join("daemonset.yaml")).unwrap();
    let line = "                - NET_ADMIN\n";
    assert!(good.contains(line), "daemonset.yaml has no {line:?}");
    let dir = TempDir::new();
    let p = dir.write("no-net-admin.yaml", &good.replacen(line, "", 1));
    let problems = daemonset_problems(&documents(&p).remove(0));
    assert_eq!(problems, ["capabilities.add NET_ADMIN, NET_RAW only"]);
    // The schema has nothing against it: only the property check catches this one.
    assert!(validate(&[p]).status.success());
}

#[test]
fn the_rest_of_the_manifests_keep_their_contract() {
    let docs: Vec<Value> = manifests().iter().flat_map(|f| documents(f)).collect();
    for d in &docs {
        let kind = d["kind"].as_str().unwrap_or("?");
        assert!(
            !["Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"].contains(&kind),
            "masqd needs no API rights, but the manifests grant {kind}"
        );
    }
    let find = |kind: &str, name: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    };
    assert_eq!(
        find("ServiceAccount", "masqd")["automountServiceAccountToken"],
        false
    );
    // The sample is upstream ip-masq-agent's format: key `config`, YAML with its keys.
    let sample = find("ConfigMap", "ip-masq-agent")["data"]["config"]
        .as_str()
        .expect("data.config")
        .to_string();
    let dir = TempDir::new();
    let p = dir.write("ip-masq-agent", &sample);
    let cfg = documents(&p).remove(0);
    assert!(cfg["nonMasqueradeCIDRs"].is_array(), "{cfg}");
    assert!(cfg["masqLinkLocal"].is_boolean(), "{cfg}");
    assert!(cfg["resyncInterval"].is_string(), "{cfg}");
    // masqd's own settings: the listener the probe asks.
    let toml = find("ConfigMap", "masqd")["data"]["masqd.toml"]
        .as_str()
        .expect("data[masqd.toml]");
    let listen = format!("listen = \"{METRICS_HOST}:{METRICS_PORT}\"");
    assert!(
        toml.lines().any(|l| l.trim() == listen),
        "{listen} not in:\n{toml}"
    );
    // kustomization.yaml lists exactly these files.
    let kz = documents(&Path::new(DIR).join("kustomization.yaml")).remove(0);
    let mut listed: Vec<String> = kz["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|v| v.as_str().unwrap_or_default().to_string())
        .collect();
    listed.sort();
    let files: Vec<String> = manifests()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(listed, files);
}

/// The masqd.toml of the ConfigMap is one `masqd check` accepts (with a subnet.env in place
/// of flannel's).
#[test]
fn the_configmaps_masqd_toml_passes_masqd_check() {
    let docs = documents(&Path::new(DIR).join("masqd-config.yaml"));
    let toml = docs[0]["data"]["masqd.toml"].as_str().expect("masqd.toml");
    let dir = TempDir::new();
    let env = dir.write(
        "subnet.env",
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\n",
    );
    let from = "\"/run/flannel/subnet.env\"";
    assert!(toml.contains(from), "{toml}");
    let cfg = dir.write(
        "masqd.toml",
        &toml.replace(from, &format!("\"{}\"", env.display())),
    );
    let o = Command::new(env!("CARGO_BIN_EXE_masqd"))
        .arg("--config")
        .arg(&cfg)
        .arg("check")
        .output()
        .unwrap();
    assert!(o.status.success(), "masqd check: {}", text(&o));
}

/// Multi-stage: a Rust builder, a Debian runtime with iptables alone, the binary at
/// /usr/sbin/masqd as the entrypoint.
#[test]
fn the_containerfile_has_two_stages_and_only_iptables() {
    let cf = std::fs::read_to_string(CONTAINERFILE).unwrap();
    let froms: Vec<&str> = cf.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "{froms:?}");
    assert!(
        froms[0].contains("rust:1-bookworm") && froms[0].contains(" AS "),
        "{froms:?}"
    );
    assert!(froms[1].contains("debian:bookworm-slim"), "{froms:?}");
    let runtime = &cf[cf.find(froms[1]).unwrap()..];
    let installs: Vec<&str> = runtime
        .split("apt-get install")
        .skip(1)
        .flat_map(|s| s.split("&&").next().unwrap_or_default().split_whitespace())
        .filter(|w| !w.starts_with('-') && *w != "\\")
        .collect();
    assert_eq!(installs, ["iptables"], "the runtime installs {installs:?}");
    assert!(runtime.contains("/usr/sbin/masqd"), "{runtime}");
    assert!(
        runtime
            .lines()
            .any(|l| l.trim() == r#"ENTRYPOINT ["/usr/sbin/masqd"]"#),
        "{runtime}"
    );
    // design.md §4, said where the image is defined.
    assert!(
        cf.contains("the rules") && cf.contains("hostNetwork"),
        "{cf}"
    );
}
