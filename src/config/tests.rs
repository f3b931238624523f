//! Unit tests of the configuration: each source parsed from text, and `load` over a temp dir.

use super::*;

fn p(text: &str) -> Result<Config, ConfigError> {
    parse(Path::new("/etc/masqd/masqd.toml"), text)
}

#[test]
fn full_example() {
    let c = p(r#"
[node]
pod_cidrs = ["172.7.21.0/24", "fd00:7:21::/64"]
[masquerade]
cluster_cidrs = ["172.7.0.0/16"]
nonmasquerade_cidrs = ["169.254.0.0/16"]
bridge_interfaces = ["docker0", "cni0"]
random_fully = true
replace_default_rule = false
[backend]
mode = "nft"
"#)
    .unwrap();
    assert_eq!(c.pod_cidrs.len(), 2);
    assert_eq!(c.bridge_interfaces, vec!["docker0", "cni0"]);
    assert!(c.random_fully);
    assert!(!c.replace_default_rule);
    assert_eq!(c.mode, BackendMode::Nft);
}

#[test]
fn shipped_example_is_valid() {
    let c = p(include_str!("../../systemd/masqd.toml")).unwrap();
    assert_eq!(c.pod_cidrs, vec!["172.7.21.0/24".parse::<IpNet>().unwrap()]);
    assert_eq!(c.mode, BackendMode::Auto);
}

#[test]
fn defaults() {
    let c = p("[node]\npod_cidrs = [\"10.1.0.0/24\"]\n").unwrap();
    assert!(c.replace_default_rule);
    assert!(!c.random_fully);
    assert_eq!(c.mode, BackendMode::Auto);
    assert!(c.cluster_cidrs.is_empty());
}

#[test]
fn host_bits_suggest_network() {
    let e = p("[node]\npod_cidrs = [\"10.244.3.1/24\"]\n").unwrap_err();
    let s = e.to_string();
    assert!(s.contains("masqd.toml:2"), "{s}");
    assert!(s.contains("node.pod_cidrs"), "{s}");
    assert!(s.contains("10.244.3.0/24"), "{s}");
}

#[test]
fn unknown_key_names_line() {
    let e =
        p("[node]\npod_cidrs = [\"10.1.0.0/24\"]\n[masquerade]\nclustr_cidrs = []\n").unwrap_err();
    let s = e.to_string();
    assert!(s.contains(":4:"), "{s}");
    assert!(s.contains("clustr_cidrs"), "{s}");
}

#[test]
fn bad_ifnames() {
    for name in [
        "",
        "abcdefghijklmnop",
        "a/b",
        "a b",
        "x;rm",
        "$(id)",
        "a`b`",
    ] {
        let text = format!(
            "[node]\npod_cidrs = [\"10.1.0.0/24\"]\n[masquerade]\nbridge_interfaces = [{name:?}]\n"
        );
        let s = p(&text).unwrap_err().to_string();
        assert!(s.contains("bridge_interfaces"), "{s}");
        assert!(s.contains(":4:"), "{s}");
    }
    assert!(validate_ifname("cni0").is_ok());
    assert!(validate_ifname("br-1a2b.100").is_ok());
}

#[test]
fn everything_exception_refused() {
    for net in ["0.0.0.0/0", "::/0"] {
        let text = format!(
            "[node]\npod_cidrs = [\"10.1.0.0/24\"]\n[masquerade]\nnonmasquerade_cidrs = [\"{net}\"]\n"
        );
        let s = p(&text).unwrap_err().to_string();
        assert!(s.contains("nothing would ever be masqueraded"), "{s}");
    }
}

#[test]
fn pod_cidrs_required() {
    let s = p("[node]\npod_cidrs = []\n").unwrap_err().to_string();
    assert!(s.contains("flannel_subnet_env"), "{s}");
}

#[test]
fn subnet_env() {
    let env = parse_subnet_env(
        Path::new("/run/flannel/subnet.env"),
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\n\
         FLANNEL_IPMASQ=true\nFLANNEL_IPV6_NETWORK=fd00:10::/56\nFLANNEL_IPV6_SUBNET=fd00:10:0:1::1/64\n",
    )
    .unwrap();
    assert_eq!(
        env.subnets,
        vec![
            "10.244.1.0/24".parse::<IpNet>().unwrap(),
            "fd00:10:0:1::/64".parse().unwrap()
        ]
    );
    assert_eq!(env.networks.len(), 2);
    let e = parse_subnet_env(
        Path::new("s.env"),
        "FLANNEL_SUBNET=10.244.1.1/24\ngarbage\n",
    )
    .unwrap_err();
    assert_eq!(e.line, Some(2));
    assert!(e.to_string().contains("garbage"));
    let e = parse_subnet_env(Path::new("s.env"), "FLANNEL_SUBNET=10.244.1.1\n").unwrap_err();
    assert_eq!(e.key.as_deref(), Some("FLANNEL_SUBNET"));
}

#[test]
fn durations() {
    assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
    assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
    assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
    assert!(parse_duration("10ms").is_err());
    assert!(parse_duration("soon").is_err());
    let s = p("[node]\npod_cidrs = [\"10.1.0.0/24\"]\n[daemon]\nresync_interval = \"fast\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        s.contains(":4:") && s.contains("daemon.resync_interval"),
        "{s}"
    );
}

#[test]
fn cidr_list_file() {
    let l = parse_cidr_list(
        Path::new("/etc/masqd/nonmasq.list"),
        "# VPC ranges\n10.0.0.0/8\n\n 192.168.1.1  # a host\nfd00::/8\n",
    )
    .unwrap();
    assert_eq!(l.len(), 3);
    let e = parse_cidr_list(
        Path::new("/etc/masqd/nonmasq.list"),
        "10.0.0.0/8\n10.1.2.3/16\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("nonmasq.list:2:") && e.contains("10.1.0.0/16"),
        "{e}"
    );
    let e = parse_cidr_list(Path::new("x.list"), "0.0.0.0/0\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("x.list:1:") && e.contains("nothing would ever be masqueraded"),
        "{e}"
    );
}

#[test]
fn honor_marks() {
    let base = "[node]\npod_cidrs = [\"10.1.0.0/24\"]\n[masquerade]\n";
    let c = p(base).unwrap();
    assert_eq!(c.honor_marks, vec![DEFAULT_HONOR_MARK]);
    let c = p(&format!("{base}honor_marks = []\n")).unwrap();
    assert!(c.honor_marks.is_empty());
    let c = p(&format!(
        "{base}honor_marks = [\"0x4000/0x4000\", \"16384/16384\", \"1/0xFFFFFFFF\"]\n"
    ))
    .unwrap();
    assert_eq!(
        c.honor_marks,
        vec![
            DEFAULT_HONOR_MARK,
            HonorMark {
                value: 1,
                mask: u32::MAX
            }
        ]
    );
    for (bad, want) in [
        ("0x4000", "VALUE/MASK"),
        ("0x4000/0", "mask is zero"),
        ("0x4000/0x0", "mask is zero"),
        ("0x1ffffffff/0xffffffff", "32 bits"),
        ("4294967296/1", "32 bits"),
        ("0xg/1", "hexadecimal"),
        ("-1/1", "not a number"),
        ("0x8000/0x4000", "outside the mask"),
        ("0x0/0x4000", "switch masqd off"),
        ("/1", "not a number"),
    ] {
        let text = format!("{base}random_fully = false\nhonor_marks = [\n  \"{bad}\",\n]\n");
        let e = p(&text).unwrap_err();
        let s = e.to_string();
        assert_eq!(e.line, Some(6), "{s}");
        assert!(
            s.contains("masquerade.honor_marks") && s.contains(want),
            "{bad}: {s}"
        );
        assert!(s.contains(bad), "names the value: {s}");
    }
    let nine: Vec<String> = (0..9).map(|i| format!("\"{}/0xffff\"", i)).collect();
    let e = p(&format!("{base}honor_marks = [{}]\n", nine.join(", "))).unwrap_err();
    assert!(e.to_string().contains("at most 8"), "{e}");
    assert_eq!(e.line, Some(4));
}

#[test]
fn bad_mode() {
    let s = p("[node]\npod_cidrs = [\"10.1.0.0/24\"]\n[backend]\nmode = \"iptables\"\n")
        .unwrap_err()
        .to_string();
    assert!(s.contains(":4:") && s.contains("\"iptables\""), "{s}");
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("masqd-config-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

const POD: &str = "[node]\npod_cidrs = [\"10.1.0.0/24\"]\n[masquerade]\n";

#[test]
fn whole_space_covers_refused_like_slash_0() {
    for (list, key) in [
        (
            "cluster_cidrs = [\"0.0.0.0/1\", \"128.0.0.0/1\"]\n",
            "masquerade.cluster_cidrs",
        ),
        (
            "nonmasquerade_cidrs = [\"::/1\", \"8000::/1\"]\n",
            "masquerade.nonmasquerade_cidrs",
        ),
        (
            "cluster_cidrs = [\"0.0.0.0/1\"]\nnonmasquerade_cidrs = [\"128.0.0.0/2\", \"192.0.0.0/2\"]\n",
            "masquerade.cluster_cidrs + masquerade.nonmasquerade_cidrs",
        ),
    ] {
        let e = p(&format!("{POD}{list}")).unwrap_err();
        let s = e.to_string();
        assert!(s.contains("nothing would ever be masqueraded"), "{s}");
        assert!(s.contains(key) && s.contains("together"), "{s}");
        assert!(s.contains("masqd.toml:4"), "names the lines: {s}");
    }
    let pieces: Vec<String> = (0..=255).map(|i| format!("\"{i}.0.0.0/8\"")).collect();
    let s = p(&format!(
        "{POD}nonmasquerade_cidrs = [{}]\n",
        pieces.join(",")
    ))
    .unwrap_err()
    .to_string();
    assert!(
        s.contains("and 250 more together cover every destination"),
        "{s}"
    );
    // One piece short of the whole space is fine.
    assert!(p(&format!(
        "{POD}nonmasquerade_cidrs = [{}]\n",
        pieces[1..].join(",")
    ))
    .is_ok());
    for pods in [
        "[\"0.0.0.0/1\", \"128.0.0.0/1\"]",
        "[\"::/1\", \"8000::/1\", \"10.1.0.0/24\"]",
    ] {
        let s = p(&format!("[node]\npod_cidrs = {pods}\n"))
            .unwrap_err()
            .to_string();
        assert!(
            s.contains("node.pod_cidrs") && s.contains("all traffic of the node"),
            "{s}"
        );
    }
}

#[test]
fn unknown_key_and_type_errors_are_called_what_they_are() {
    let s = p(&format!("{POD}clustr_cidrs = []\n"))
        .unwrap_err()
        .to_string();
    assert!(!s.contains("invalid TOML"), "{s}");
    assert!(
        s.contains("unknown key `clustr_cidrs` in [masquerade]"),
        "{s}"
    );
    assert!(
        s.contains("masquerade.clustr_cidrs") && s.contains("`cluster_cidrs`"),
        "{s}"
    );
    let s = p("[nod]\npod_cidrs = []\n").unwrap_err().to_string();
    assert!(
        s.contains("unknown key `nod`") && s.contains("`node`"),
        "{s}"
    );
    let e = p(&format!("{POD}random_fully = \"yes\"\n")).unwrap_err();
    assert_eq!(e.key.as_deref(), Some("masquerade.random_fully"), "{e}");
    assert!(e.to_string().contains("wrong type"), "{e}");
    assert_eq!(e.line, Some(4));
    let e = p("[node]\npod_cidrs = \"10.1.0.0/24\"\n").unwrap_err();
    assert_eq!(e.key.as_deref(), Some("node.pod_cidrs"), "{e}");
    let e = p("[node]\npod_cidrs = [\n  \"10.1.0.0/24\",\n  7,\n]\n").unwrap_err();
    assert_eq!(e.key.as_deref(), Some("node.pod_cidrs"), "{e}");
    assert_eq!(e.line, Some(4), "{e}");
    let s = p("[node\n").unwrap_err().to_string();
    assert!(s.contains("invalid TOML"), "{s}");
}

#[test]
fn humantime_durations_within_bounds() {
    assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
    assert_eq!(parse_duration("1m 30s"), Ok(Duration::from_secs(90)));
    assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
    assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
    assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
    assert!(parse_duration("500ms")
        .unwrap_err()
        .contains("between 1s and 24h"));
    assert!(parse_duration("25h")
        .unwrap_err()
        .contains("between 1s and 24h"));
    assert!(parse_duration("").is_err());
}

#[test]
fn subnet_env_follows_shell_semantics() {
    let env = parse_subnet_env(
        Path::new("s.env"),
        "\u{feff}FLANNEL_NETWORK=10.244.0.0/16\r\nFLANNEL_SUBNET=10.244.1.1/24\r\n\
         export FLANNEL_SUBNET=\"10.244.9.1/24\"  # the new lease\r\n\
         export\tFLANNEL_IPV6_SUBNET='fd00:10:0:1::1/64'\r\nFLANNEL_IPMASQ=true\r\n",
    )
    .unwrap();
    assert_eq!(
        env.subnets,
        vec![
            "10.244.9.0/24".parse::<IpNet>().unwrap(),
            "fd00:10:0:1::/64".parse().unwrap()
        ],
        "the last assignment wins; quotes removed"
    );
    assert!(env.warnings.is_empty(), "{:?}", env.warnings);
    let env = parse_subnet_env(
        Path::new("s.env"),
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.9.1.1/24\n",
    )
    .unwrap();
    assert_eq!(env.subnets, vec!["10.9.1.0/24".parse::<IpNet>().unwrap()]);
    assert!(
        env.warnings[0].contains("outside FLANNEL_NETWORK"),
        "{:?}",
        env.warnings
    );
    for bad in [
        "FLANNEL_SUBNET=\"10.244.1.1/24\n",
        "FLANNEL_SUBNET=10.244.1.1/24 rm -rf\n",
        "FLANNEL_SUBNET = 10.244.1.1/24\n",
        "FLANNEL_SUBNET= 10.244.1.1/24\n",
    ] {
        let e = parse_subnet_env(Path::new("s.env"), bad).unwrap_err();
        assert_eq!(e.line, Some(1), "{e}");
    }
}

#[test]
fn cidr_list_crlf_and_bom() {
    let l = parse_cidr_list(
        Path::new("x.list"),
        "\u{feff}10.0.0.0/8\r\n# c\r\n192.168.0.0/16\r\n",
    )
    .unwrap();
    assert_eq!(l.len(), 2);
}

#[test]
fn relative_paths_resolve_against_the_config_directory() {
    let d = scratch("rel");
    std::fs::create_dir_all(d.join("lists")).unwrap();
    std::fs::write(d.join("lists/extra.list"), "10.96.0.0/12\n").unwrap();
    std::fs::write(d.join("subnet.env"), "FLANNEL_SUBNET=10.244.1.1/24\n").unwrap();
    let cfg = d.join("masqd.toml");
    std::fs::write(
        &cfg,
        "[node]\nflannel_subnet_env = \"subnet.env\"\n[masquerade]\n\
         nonmasquerade_cidrs_file = \"lists/extra.list\"\n",
    )
    .unwrap();
    let c = load(&cfg).unwrap();
    assert_eq!(c.flannel_subnet_env, Some(d.join("subnet.env")));
    assert_eq!(c.nonmasquerade_cidrs_file, Some(d.join("lists/extra.list")));
    assert_eq!(
        c.nonmasquerade_cidrs,
        vec!["10.96.0.0/12".parse::<IpNet>().unwrap()]
    );
    assert_eq!(
        resolve(Path::new("/etc/masqd/masqd.toml"), "/abs"),
        PathBuf::from("/abs")
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn missing_or_bad_list_names_its_key_and_is_not_waited_for() {
    let d = scratch("list");
    let cfg = d.join("masqd.toml");
    std::fs::write(
        &cfg,
        format!("{POD}nonmasquerade_cidrs_file = \"nope.list\"\n"),
    )
    .unwrap();
    let e = load(&cfg).unwrap_err();
    assert!(!e.missing_file, "only flannel's subnet.env is waited for");
    let s = e.to_string();
    assert!(
        s.contains("nope.list") && s.contains("masquerade.nonmasquerade_cidrs_file"),
        "{s}"
    );
    assert!(s.contains("masqd.toml:4"), "{s}");
    std::fs::write(d.join("nope.list"), "10.0.0.0/8\n10.1.2.3/16\n").unwrap();
    let s = load(&cfg).unwrap_err().to_string();
    assert!(
        s.contains("nope.list:2:") && s.contains("masquerade.nonmasquerade_cidrs_file"),
        "{s}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn only_bounded_regular_files_are_read() {
    let d = scratch("bounded");
    let fifo = d.join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let big = d.join("big");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(MAX_FILE_BYTES + 1)
        .unwrap();
    for (path, want) in [
        (d.clone(), "directory"),
        (fifo, "FIFO"),
        (PathBuf::from("/dev/zero"), "character device"),
        (big, "larger than 64 MiB"),
    ] {
        let e = load(&path).unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains(want) && s.contains(&*path.to_string_lossy()),
            "{s}"
        );
    }
    std::fs::write(d.join("bom.toml"), format!("\u{feff}{POD}")).unwrap();
    assert!(load(&d.join("bom.toml")).is_ok());
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn watch_paths_are_the_config_then_each_named_file() {
    let mut c = p(POD).unwrap();
    let cfg = Path::new("/srv/masqd.toml");
    assert_eq!(watch_paths(cfg, &c), vec![PathBuf::from("/srv/masqd.toml")]);
    c.nonmasquerade_cidrs_file = Some("/etc/masqd/extra.list".into());
    c.flannel_subnet_env = Some("/run/flannel/subnet.env".into());
    assert_eq!(
        watch_paths(cfg, &c),
        vec![
            PathBuf::from("/srv/masqd.toml"),
            PathBuf::from("/run/flannel/subnet.env"),
            PathBuf::from("/etc/masqd/extra.list"),
        ]
    );
}

#[test]
fn load_combines_the_sources_in_order() {
    let d = scratch("combine");
    std::fs::write(d.join("extra.list"), "# vpc\n10.0.0.0/8\n").unwrap();
    std::fs::write(
        d.join("subnet.env"),
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\n",
    )
    .unwrap();
    let cfg = d.join("masqd.toml");
    std::fs::write(
        &cfg,
        "[node]\npod_cidrs = [\"172.7.21.0/24\"]\nflannel_subnet_env = \"subnet.env\"\n\
         [masquerade]\ncluster_cidrs = [\"172.7.0.0/16\"]\nnonmasquerade_cidrs = [\"169.254.0.0/16\"]\n\
         nonmasquerade_cidrs_file = \"extra.list\"\n",
    )
    .unwrap();
    let c = load(&cfg).unwrap();
    let nets = |v: &[&str]| -> Vec<IpNet> { v.iter().map(|s| s.parse().unwrap()).collect() };
    assert_eq!(c.pod_cidrs, nets(&["172.7.21.0/24", "10.244.1.0/24"]));
    assert_eq!(c.cluster_cidrs, nets(&["172.7.0.0/16", "10.244.0.0/16"]));
    assert_eq!(
        c.nonmasquerade_cidrs,
        nets(&["169.254.0.0/16", "10.0.0.0/8"])
    );
    let at = |f: &str, l: usize| format!("{}:{l}", d.join(f).display());
    let locations: Vec<String> = c.exception_origins.iter().map(Origin::location).collect();
    assert_eq!(
        locations,
        vec![
            at("masqd.toml", 5),
            at("masqd.toml", 6),
            at("extra.list", 2),
            at("subnet.env", 1)
        ]
    );
    assert_eq!(
        watch_paths(&cfg, &c),
        vec![cfg.clone(), d.join("subnet.env"), d.join("extra.list")]
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn errors_keep_their_order_across_sources() {
    let d = scratch("order");
    let cfg = d.join("masqd.toml");
    let first = |text: &str| {
        std::fs::write(&cfg, text).unwrap();
        load(&cfg).unwrap_err()
    };
    // The CIDR list is read before the subnet.env path and the other keys are checked.
    let e = first(&format!(
        "[node]\nflannel_subnet_env = \"\"\n{}nonmasquerade_cidrs_file = \"nope.list\"\n\
         bridge_interfaces = [\"a b\"]\n",
        &POD[POD.find("[masquerade]").unwrap()..]
    ));
    assert_eq!(
        e.key.as_deref(),
        Some(&*format!(
            "masquerade.nonmasquerade_cidrs_file ({}:4)",
            cfg.display()
        ))
    );
    // A subnet.env that is missing is waited for, before the other keys are checked.
    let e = first("[node]\nflannel_subnet_env = \"subnet.env\"\n[backend]\nmode = \"x\"\n");
    assert!(e.missing_file, "{e}");
    // No pod CIDR, then the covers, then the other keys.
    let e = first("[masquerade]\nbridge_interfaces = [\"a b\"]\n");
    assert_eq!(e.key.as_deref(), Some("node.pod_cidrs"), "{e}");
    let e = first(&format!(
        "{POD}cluster_cidrs = [\"0.0.0.0/1\", \"128.0.0.0/1\"]\nbridge_interfaces = [\"a b\"]\n"
    ));
    assert!(
        e.message.contains("nothing would ever be masqueraded"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&d);
}
