//! Bad input: each case is refused with a message naming the file, the key or line and the
//! value; the exit code is non-zero (never a panic); the kernel is left exactly as it was.

mod common;

use std::path::{Path, PathBuf};

use common::*;

const GOOD: &str = r#"[node]
pod_cidrs = ["172.7.21.0/24"]
[masquerade]
cluster_cidrs = ["172.7.0.0/16"]
bridge_interfaces = ["docker0"]
"#;

/// Applies a good config, then runs `apply` and `plan` with `cfg` and checks the refusal.
fn refused(cfg_path: &Path, expect: &[&str]) {
    let ns = Netns::new("mqbad");
    let dir = TempDir::new();
    let good = dir.write("good.toml", GOOD);
    let state = dir.path().join("state");
    ns.ok_words("iptables-nft -t nat -A POSTROUTING -s 10.9.0.0/24 -j MASQUERADE");
    ns.masqd_ok(&good, &state, &["apply"], 0);
    let before = ns.ruleset_text();
    for cmd in ["apply", "plan", "status", "export"] {
        let o = ns.masqd(cfg_path, &state, &[cmd]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(
            o.status.code(),
            Some(1),
            "{cmd}: exit code; stderr: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{cmd} panicked: {stderr}");
        assert!(
            stderr.contains(&cfg_path.display().to_string())
                || expect.iter().any(|e| e.starts_with('/')),
            "{cmd}: the message names the file: {stderr}"
        );
        for e in expect {
            assert!(stderr.contains(e), "{cmd}: expected {e:?} in: {stderr}");
        }
    }
    assert_eq!(ns.ruleset_text(), before, "kernel unchanged");
}

fn cfg(text: &str) -> (TempDir, PathBuf) {
    let d = TempDir::new();
    let p = d.write("masqd.toml", text);
    (d, p)
}

#[test]
fn malformed_toml() {
    let (_d, p) = cfg("[node]\npod_cidrs = [\"172.7.21.0/24\"\n[masquerade]\n");
    refused(&p, &["invalid TOML", "masqd.toml:"]);
}

#[test]
fn unknown_key() {
    let (_d, p) = cfg(&GOOD.replace("bridge_interfaces", "bridge_interface"));
    refused(&p, &["masqd.toml:5:", "unknown key", "bridge_interface"]);
}

#[test]
fn host_bits_set() {
    let (_d, p) = cfg(&GOOD.replace("172.7.21.0/24", "10.244.3.1/24"));
    refused(
        &p,
        &[
            "masqd.toml:2:",
            "node.pod_cidrs",
            "\"10.244.3.1/24\"",
            "did you mean 10.244.3.0/24",
        ],
    );
}

#[test]
fn unparsable_address() {
    let (_d, p) = cfg(&GOOD.replace("172.7.0.0/16", "172.7.0.300/16"));
    refused(
        &p,
        &[
            "masqd.toml:4:",
            "masquerade.cluster_cidrs",
            "\"172.7.0.300/16\"",
        ],
    );
    let (_d, p) = cfg(&GOOD.replace("172.7.0.0/16", "banana"));
    refused(
        &p,
        &["masqd.toml:4:", "masquerade.cluster_cidrs", "\"banana\""],
    );
}

#[test]
fn bad_interface_names() {
    for (name, why) in [
        ("", "is empty"),
        ("averyveryverylongname", "at most 15"),
        ("br/0", "holds '/'"),
        ("br 0", "holds whitespace"),
        ("br0;touch /tmp/x", "holds"),
        ("$(reboot)", "holds '$'"),
    ] {
        let (_d, p) = cfg(&GOOD.replace("\"docker0\"", &format!("{name:?}")));
        refused(
            &p,
            &[
                "masqd.toml:5:",
                "masquerade.bridge_interfaces",
                &format!("{name:?}"),
                why,
            ],
        );
    }
}

#[test]
fn no_pod_cidrs() {
    let (_d, p) = cfg(&GOOD.replace("[\"172.7.21.0/24\"]", "[]"));
    refused(&p, &["node.pod_cidrs", "flannel_subnet_env"]);
}

#[test]
fn subnet_env_missing_or_malformed() {
    let d = TempDir::new();
    let env = d.path().join("subnet.env");
    let text = format!(
        "[node]\nflannel_subnet_env = \"{}\"\n[masquerade]\nbridge_interfaces = [\"docker0\"]\n",
        env.display()
    );
    let p = d.write("masqd.toml", &text);
    // missing
    refused(
        &p,
        &[
            &env.display().to_string(),
            "cannot read flannel's subnet.env",
        ],
    );
    // a line that is not KEY=VALUE
    std::fs::write(
        &env,
        "FLANNEL_NETWORK=172.7.0.0/16\nFLANNEL_SUBNET=172.7.21.1/24\nthis is not an assignment\n",
    )
    .unwrap();
    refused(
        &p,
        &[
            &format!("{}:3:", env.display()),
            "this is not an assignment",
        ],
    );
    // a bad value
    std::fs::write(
        &env,
        "FLANNEL_NETWORK=172.7.0.0/16\nFLANNEL_SUBNET=172.7.21.1\n",
    )
    .unwrap();
    refused(
        &p,
        &[
            &format!("{}:2:", env.display()),
            "FLANNEL_SUBNET",
            "\"172.7.21.1\"",
        ],
    );
}

#[test]
fn subnet_env_good_is_used() {
    let ns = Netns::new("mqenv");
    let d = TempDir::new();
    let env = d.write("subnet.env", "FLANNEL_NETWORK=172.7.0.0/16\nFLANNEL_SUBNET=172.7.21.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n");
    let p = d.write(
        "masqd.toml",
        &format!("[node]\nflannel_subnet_env = \"{}\"\n", env.display()),
    );
    let state = d.path().join("state");
    ns.masqd_ok(&p, &state, &["apply"], 0);
    let rs = ns.ruleset();
    let r = |c: &str| {
        let (_, a, b) = cidr_range(c);
        vec![(a, b)]
    };
    assert_eq!(set_ranges(&rs, "pod4").unwrap(), r("172.7.21.0/24"));
    assert_eq!(set_ranges(&rs, "nomasq4").unwrap(), r("172.7.0.0/16"));
}

#[test]
fn everything_as_exception() {
    let (_d, p) = cfg(&GOOD.replace(
        "cluster_cidrs = [\"172.7.0.0/16\"]",
        "cluster_cidrs = [\"172.7.0.0/16\"]\nnonmasquerade_cidrs = [\"0.0.0.0/0\"]",
    ));
    refused(
        &p,
        &[
            "masqd.toml:5:",
            "masquerade.nonmasquerade_cidrs",
            "\"0.0.0.0/0\"",
            "nothing would ever be masqueraded",
        ],
    );
    let (_d, p) = cfg(&GOOD.replace("[\"172.7.0.0/16\"]", "[\"172.7.0.0/16\", \"::/0\"]"));
    refused(
        &p,
        &[
            "masqd.toml:4:",
            "masquerade.cluster_cidrs",
            "\"::/0\"",
            "nothing would ever be masqueraded",
        ],
    );
}

#[test]
fn unknown_backend_mode() {
    let (_d, p) = cfg(&format!("{GOOD}[backend]\nmode = \"iptables\"\n"));
    refused(
        &p,
        &[
            "masqd.toml:7:",
            "backend.mode",
            "\"iptables\"",
            "\"auto\", \"nft\" or \"legacy\"",
        ],
    );
}

#[test]
fn missing_or_unreadable_config() {
    let d = TempDir::new();
    let missing = d.path().join("nope.toml");
    refused(
        &missing,
        &["cannot read the configuration file", "No such file"],
    );
    // A directory cannot be read as a file (root reads any file whatever its mode).
    let dir_as_file = d.path().join("dir.toml");
    std::fs::create_dir(&dir_as_file).unwrap();
    refused(&dir_as_file, &["cannot read the configuration file"]);
}

#[test]
fn bad_honor_marks() {
    for (entry, want) in [
        ("\"0x4000\"", "is not VALUE/MASK"),
        ("\"0x4000/0\"", "the mask is zero"),
        ("\"0x1/0x00000000\"", "the mask is zero"),
        ("\"0x100000000/0xffffffff\"", "does not fit in 32 bits"),
        ("\"16384/4294967296\"", "does not fit in 32 bits"),
        ("\"0xz/0x1\"", "not a hexadecimal number"),
        ("\"four/0x1\"", "not a number"),
        ("\"0x8000/0x4000\"", "outside the mask"),
    ] {
        let text = GOOD.replace(
            "bridge_interfaces",
            &format!("honor_marks = [\n    {entry},\n]\nbridge_interfaces"),
        );
        let (_d, p) = cfg(&text);
        let value = entry.trim_matches('"');
        refused(
            &p,
            &["masqd.toml:6:", "masquerade.honor_marks", value, want],
        );
    }
    let nine: Vec<String> = (1..=9).map(|i| format!("\"{i}/0xff\"")).collect();
    let text = GOOD.replace(
        "bridge_interfaces",
        &format!("honor_marks = [{}]\nbridge_interfaces", nine.join(", ")),
    );
    let (_d, p) = cfg(&text);
    refused(
        &p,
        &["masqd.toml:5:", "masquerade.honor_marks", "at most 8"],
    );
}
