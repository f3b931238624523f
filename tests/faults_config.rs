//! Faults of the configuration's inputs and of start-up, with the real binary in private
//! network namespaces: whole-space covers, the CIDR list as part of the config, signals in the
//! first moments of `masqd run`, flannel's directory removed and recreated, relative paths,
//! files that are not regular files, CR/LF and byte-order marks, and the wording of errors.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

const CFG: &str = NODE_A_TOML;

/// `masqd run` started directly inside the namespace (setns before exec, so the child's PID is
/// masqd's own from the first instruction).
fn start_daemon(ns: &Netns, cfg: &Path, state: &Path) -> Daemon {
    Daemon::spawn(masqd_in(ns, cfg, state, &["--log-level", "info", "run"]))
}

/// A `masqd` command that enters the namespace itself before exec (no `ip netns exec` in
/// between), with the test PATH.
fn masqd_in(ns: &Netns, cfg: &Path, state: &Path, args: &[&str]) -> Command {
    let netns = std::fs::File::open(format!("/run/netns/{}", ns.name)).expect("open netns");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_masqd"));
    cmd.arg("--config")
        .arg(cfg)
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .env("PATH", nft_variant_path().trim_start_matches("PATH="))
        .env_remove("NOTIFY_SOCKET");
    // SAFETY: setns is async-signal-safe; the closure allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            use std::os::fd::AsRawFd;
            if libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// Runs a one-shot masqd command (in `cwd`), killing it after `timeout`: (exit code, stderr).
fn masqd_timed(
    ns: &Netns,
    cfg: &Path,
    state: &Path,
    args: &[&str],
    cwd: &Path,
    timeout: Duration,
) -> (Option<i32>, String) {
    let mut cmd = masqd_in(ns, cfg, state, args);
    cmd.current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn masqd");
    let t = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("masqd {args:?} --config {cfg:?} still running after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut err = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status.code(), err)
}

fn has_table(ns: &Netns) -> bool {
    ns.exec(&["nft", "list", "table", "inet", "masqd"])
        .status
        .success()
}

fn until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    t.elapsed()
}

fn in_sync(ns: &Netns, cfg: &Path, state: &Path) -> bool {
    ns.masqd(cfg, state, &["plan"]).status.code() == Some(0)
}

fn ranges(c: &str) -> Vec<(u128, u128)> {
    let (_, a, b) = cidr_range(c);
    vec![(a, b)]
}

const SECS: Duration = Duration::from_secs(10);

#[test]
fn whole_space_covers_are_refused_in_both_families_and_for_pods() {
    let ns = Netns::new("mqc");
    let dir = TempDir::new();
    let state = dir.path().join("state");
    let pieces: Vec<String> = (0..16u32).map(|i| format!("{}.0.0.0/4", i * 16)).collect();
    dir.write("pieces.list", &pieces.join("\n"));
    let exc = "nothing would ever be masqueraded";
    let pod = "all traffic of the node";
    let cases = [
        (
            CFG.replace("\"172.7.0.0/16\"", "\"0.0.0.0/1\", \"128.0.0.0/1\""),
            exc,
            "masquerade.cluster_cidrs",
        ),
        (
            CFG.replace(
                "bridge_interfaces",
                "nonmasquerade_cidrs = [\"::/1\", \"8000::/1\"]\nbridge_interfaces",
            ),
            exc,
            "masquerade.nonmasquerade_cidrs",
        ),
        (
            CFG.replace(
                "bridge_interfaces",
                "nonmasquerade_cidrs_file = \"pieces.list\"\nbridge_interfaces",
            ),
            exc,
            "masquerade.nonmasquerade_cidrs_file",
        ),
        (
            CFG.replace("\"172.7.21.0/24\"", "\"0.0.0.0/1\", \"128.0.0.0/1\""),
            pod,
            "node.pod_cidrs",
        ),
        (
            CFG.replace("\"fd00:7:21::/64\"", "\"::/1\", \"8000::/1\""),
            pod,
            "node.pod_cidrs",
        ),
    ];
    for (i, (text, want, key)) in cases.iter().enumerate() {
        let cfg = dir.write(&format!("c{i}.toml"), text);
        for cmd in ["apply", "run"] {
            let (code, err) = masqd_timed(&ns, &cfg, &state, &[cmd], dir.path(), SECS);
            let expect = if cmd == "run" { 78 } else { 1 };
            assert_eq!(code, Some(expect), "{cmd} with case {i}: {err}");
            assert!(err.contains(want) && err.contains(key), "case {i}: {err}");
            assert!(err.contains("together"), "names the entries: {err}");
        }
        assert!(!has_table(&ns), "kernel untouched (case {i})");
    }
    assert_eq!(
        ns.ruleset()["nftables"].as_array().map(|a| a.len()),
        Some(1),
        "only the metainfo"
    );
}

#[test]
fn missing_list_file_exits_78_at_start_and_keeps_the_last_good_policy_at_reload() {
    let ns = Netns::new("mql");
    let dir = TempDir::new();
    let state = dir.path().join("state");
    let list = dir.path().join("lists").join("extra.list");
    let cfg = dir.write(
        "masqd.toml",
        &CFG.replace(
            "bridge_interfaces",
            &format!(
                "nonmasquerade_cidrs_file = \"{}\"\nbridge_interfaces",
                list.display()
            ),
        ),
    );
    // At start: exit 78 naming the file and the key, nothing installed, no waiting.
    let (code, err) = masqd_timed(&ns, &cfg, &state, &["run"], Path::new("/"), SECS);
    assert_eq!(code, Some(78), "{err}");
    assert!(
        err.contains(&*list.to_string_lossy())
            && err.contains("masquerade.nonmasquerade_cidrs_file"),
        "{err}"
    );
    assert!(!has_table(&ns));

    // At reload: the last good policy stays, the process lives, STATUS names the error.
    std::fs::create_dir_all(list.parent().unwrap()).unwrap();
    std::fs::write(&list, "10.96.0.0/12\n").unwrap();
    let mut d = start_daemon(&ns, &cfg, &state);
    d.wait_note("READY=1", SECS);
    let want = cidr_range("10.96.0.0/12");
    assert!(set_ranges(&ns.ruleset(), "nomasq4").is_some_and(|r| r.contains(&(want.1, want.2))));
    let before = ns.ruleset_text();
    std::fs::remove_file(&list).unwrap();
    d.wait_note("config error", SECS);
    d.signal(Signal::SIGHUP);
    d.wait_note("RELOADING=1", SECS);
    d.wait_note("READY=1", SECS);
    let st = d
        .notes
        .seen
        .iter()
        .rev()
        .find(|n| n.starts_with("STATUS="))
        .cloned()
        .unwrap_or_default();
    assert!(st.contains("extra.list"), "{st}");
    assert!(d.alive());
    assert_eq!(ns.ruleset_text(), before, "last good policy kept");
    // The list comes back with other contents: followed without a signal.
    std::fs::write(&list, "10.200.0.0/16\n").unwrap();
    let want = cidr_range("10.200.0.0/16");
    until("list followed", SECS, || {
        set_ranges(&ns.ruleset(), "nomasq4").is_some_and(|r| r.contains(&(want.1, want.2)))
    });
    assert!(d.alive());
}

/// A large exception list makes start-up (parse, first reconcile) last long enough for
/// signals to land in each of its phases.
fn slow_start_cfg(dir: &TempDir) -> PathBuf {
    let list: Vec<String> = (0..20_000u32)
        .map(|i| format!("{}/28", std::net::Ipv4Addr::from(0x0b00_0000u32 + i * 32)))
        .collect();
    let big = dir.write("big.list", &list.join("\n"));
    dir.write(
        "masqd.toml",
        &CFG.replace(
            "bridge_interfaces",
            &format!(
                "nonmasquerade_cidrs_file = \"{}\"\nbridge_interfaces",
                big.display()
            ),
        ),
    )
}

/// When the signals of the start-up tests are sent after [`wait_runtime_started`]: from at
/// once to about 9 ms, denser early.
fn signal_delays() -> Vec<Duration> {
    (0..20u64)
        .map(|i| Duration::from_micros(i * i * 25))
        .collect()
}

/// Waits until the program itself runs in `pid`: its heap exists (the Rust runtime's first
/// allocation, before `main`), or it has blocked or caught SIGHUP. Before that the process is
/// still in the kernel's exec or the dynamic loader, where no program controls its signals.
fn wait_runtime_started(pid: u32) {
    let t = Instant::now();
    loop {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
        if maps.contains("[heap]") {
            return;
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let hup = |field: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
                .is_some_and(|m| m & 1 != 0)
        };
        if hup("SigBlk:") || hup("SigCgt:") {
            return;
        }
        assert!(t.elapsed() < SECS, "masqd {pid} never started its runtime");
    }
}

#[test]
fn sighup_in_the_first_milliseconds_never_kills_and_ends_in_sync() {
    let ns = Netns::new("mqh");
    let dir = TempDir::new();
    let state = dir.path().join("state");
    let cfg = slow_start_cfg(&dir);
    let mut outcomes = Vec::new();
    for (i, delay) in signal_delays().into_iter().enumerate() {
        let mut d = start_daemon(&ns, &cfg, &state);
        wait_runtime_started(d.child.id());
        std::thread::sleep(delay);
        d.signal(Signal::SIGHUP);
        if i % 3 == 0 {
            // A second one a little later, while the first reconcile may run.
            std::thread::sleep(Duration::from_millis(3));
            d.signal(Signal::SIGHUP);
        }
        let t = Instant::now();
        while !d.notes.seen.iter().any(|n| n.contains("READY=1")) {
            d.notes.poll(Duration::from_millis(100));
            let st = d.child.try_wait().unwrap();
            assert!(
                st.is_none(),
                "SIGHUP {delay:?} after start killed masqd: {st:?}"
            );
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "no READY=1: {:?}",
                d.notes.seen
            );
        }
        std::thread::sleep(Duration::from_millis(50));
        assert!(d.alive(), "SIGHUP {delay:?} after start killed masqd");
        until("in sync", SECS, || in_sync(&ns, &cfg, &state));
        outcomes.push(delay);
        if i % 4 == 3 {
            // From nothing again, so the signal lands before the first transaction too.
            drop(d);
            ns.ok(&["nft", "delete", "table", "inet", "masqd"]);
        }
    }
    eprintln!("SIGHUP after {outcomes:?}: masqd alive and in sync each time");
}

#[test]
fn sigterm_during_start_up_exits_0() {
    let ns = Netns::new("mqt");
    let dir = TempDir::new();
    let state = dir.path().join("state");
    let cfg = slow_start_cfg(&dir);
    for delay in signal_delays().into_iter().step_by(2) {
        let mut d = start_daemon(&ns, &cfg, &state);
        wait_runtime_started(d.child.id());
        std::thread::sleep(delay);
        d.signal(Signal::SIGTERM);
        let st = d.exit(SECS);
        assert_eq!(st.code(), Some(0), "SIGTERM {delay:?} after start: {st:?}");
        // Whatever was installed stays, whole.
        let n = rules(&ns.ruleset(), "inet", "masqd", "postrouting").len();
        assert!(n == 0 || n == 6, "rules left whole: {n}");
    }
    // And a SIGTERM while waiting for flannel's subnet.env.
    let waiting = dir.write(
        "wait.toml",
        &format!(
            "[node]\nflannel_subnet_env = \"{}/absent/subnet.env\"\n",
            dir.path().display()
        ),
    );
    let mut d = start_daemon(&ns, &waiting, &state);
    d.wait_note("waiting", SECS);
    d.signal(Signal::SIGTERM);
    assert_eq!(d.exit(SECS).code(), Some(0));
}

#[test]
fn flannel_directory_removed_and_recreated_is_followed() {
    let ns = Netns::new("mqf");
    let cfg_dir = TempDir::new();
    let run = TempDir::new();
    let flannel = run.path().join("run").join("flannel");
    let env = flannel.join("subnet.env");
    std::fs::create_dir_all(&flannel).unwrap();
    std::fs::write(
        &env,
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\n",
    )
    .unwrap();
    let cfg = cfg_dir.write(
        "masqd.toml",
        &format!(
            "[node]\nflannel_subnet_env = \"{}\"\n[masquerade]\nbridge_interfaces = [\"cni0\"]\n",
            env.display()
        ),
    );
    let state = cfg_dir.path().join("state");
    let mut d = start_daemon(&ns, &cfg, &state);
    d.wait_note("READY=1", SECS);
    assert_eq!(
        set_ranges(&ns.ruleset(), "pod4"),
        Some(ranges("10.244.3.0/24"))
    );
    // Each way a directory goes away and comes back: removed (flannel's restart), renamed
    // away, its parent removed too; the new subnet.env written at once or a little later.
    for (round, subnet) in ["10.244.7", "10.244.8", "10.244.9", "10.244.10"]
        .iter()
        .enumerate()
    {
        match round {
            0 => std::fs::remove_dir_all(&flannel).unwrap(),
            1 => std::fs::rename(&flannel, run.path().join("flannel.old")).unwrap(),
            _ => std::fs::remove_dir_all(run.path().join("run")).unwrap(),
        }
        std::thread::sleep(Duration::from_millis(100));
        std::fs::create_dir_all(&flannel).unwrap();
        if round == 3 {
            std::thread::sleep(Duration::from_millis(300));
        }
        std::fs::write(
            &env,
            format!("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET={subnet}.1/24\n"),
        )
        .unwrap();
        let want = ranges(&format!("{subnet}.0/24"));
        let t = until("new pod CIDR in the kernel", SECS, || {
            set_ranges(&ns.ruleset(), "pod4") == Some(want.clone())
        });
        eprintln!("round {round}: new subnet.env followed after {t:?}");
        let _ = std::fs::remove_dir_all(run.path().join("flannel.old"));
    }
    assert!(d.alive());
}

#[test]
fn relative_paths_resolve_against_the_config_directory() {
    let ns = Netns::new("mqr");
    let dir = TempDir::new();
    std::fs::create_dir_all(dir.path().join("lists")).unwrap();
    std::fs::create_dir_all(dir.path().join("flannel")).unwrap();
    dir.write("lists/extra.list", "10.96.0.0/12\n");
    dir.write(
        "flannel/subnet.env",
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.5.1/24\n",
    );
    let cfg = dir.write(
        "masqd.toml",
        "[node]\nflannel_subnet_env = \"flannel/subnet.env\"\n[masquerade]\n\
         nonmasquerade_cidrs_file = \"lists/extra.list\"\n",
    );
    let state = dir.path().join("state");
    // As under systemd: the working directory is `/`.
    let (code, err) = masqd_timed(&ns, &cfg, &state, &["apply"], Path::new("/"), SECS);
    assert_eq!(code, Some(0), "{err}");
    let rs = ns.ruleset();
    assert_eq!(set_ranges(&rs, "pod4"), Some(ranges("10.244.5.0/24")));
    let nomasq = set_ranges(&rs, "nomasq4").unwrap();
    let want = cidr_range("10.96.0.0/12");
    assert!(nomasq.contains(&(want.1, want.2)), "{nomasq:?}");
}

#[test]
fn files_that_are_not_regular_are_refused_quickly() {
    let ns = Netns::new("mqz");
    let dir = TempDir::new();
    let state = dir.path().join("state");
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let big = dir.path().join("big.toml");
    std::fs::File::create(&big)
        .unwrap()
        .set_len((64 << 20) + 1)
        .unwrap();
    let subdir = dir.path().join("sub");
    std::fs::create_dir_all(&subdir).unwrap();
    let zero = PathBuf::from("/dev/zero");
    let names = |p: &Path, what: &str| {
        let cfg = dir.write(
            "named.toml",
            &CFG.replace(
                "bridge_interfaces",
                &format!("{what} = \"{}\"\nbridge_interfaces", p.display()),
            ),
        );
        cfg
    };
    let mut cases: Vec<(PathBuf, &str)> = vec![
        (zero.clone(), "character device"),
        (subdir.clone(), "directory"),
        (fifo.clone(), "FIFO"),
        (big.clone(), "larger than 64 MiB"),
    ];
    for (path, want) in cases.drain(..) {
        for cmd in ["plan", "run"] {
            let t = Instant::now();
            let (code, err) = masqd_timed(&ns, &path, &state, &[cmd], dir.path(), SECS);
            let expect = if cmd == "run" { 78 } else { 1 };
            assert_eq!(code, Some(expect), "--config {path:?} {cmd}: {err}");
            assert!(
                err.contains(want) && err.contains(&*path.to_string_lossy()),
                "{err}"
            );
            eprintln!("--config {path:?} {cmd}: refused in {:?}", t.elapsed());
        }
    }
    // The same for the files the config names.
    for (path, want) in [
        (&zero, "character device"),
        (&fifo, "FIFO"),
        (&subdir, "directory"),
    ] {
        let cfg = names(path, "nonmasquerade_cidrs_file");
        let (code, err) = masqd_timed(&ns, &cfg, &state, &["run"], dir.path(), SECS);
        assert_eq!(code, Some(78), "{err}");
        assert!(
            err.contains(want) && err.contains("masquerade.nonmasquerade_cidrs_file"),
            "{err}"
        );
        let cfg = dir.write(
            "env.toml",
            &format!("[node]\nflannel_subnet_env = \"{}\"\n", path.display()),
        );
        let (code, err) = masqd_timed(&ns, &cfg, &state, &["apply"], dir.path(), SECS);
        assert_eq!(code, Some(1), "{err}");
        assert!(
            err.contains(want) && err.contains("node.flannel_subnet_env"),
            "{err}"
        );
    }
    assert!(!has_table(&ns));
}

#[test]
fn crlf_and_byte_order_marks_are_accepted() {
    let ns = Netns::new("mqb");
    let dir = TempDir::new();
    dir.write(
        "extra.list",
        "\u{feff}# from a Windows editor\r\n10.96.0.0/12\r\n192.168.0.0/16\r\n",
    );
    dir.write(
        "subnet.env",
        "\u{feff}FLANNEL_NETWORK=10.244.0.0/16\r\nFLANNEL_SUBNET=10.244.1.1/24\r\n\
         export FLANNEL_SUBNET=\"10.244.6.1/24\"\r\nFLANNEL_MTU=1450\r\n",
    );
    let cfg = dir.write(
        "masqd.toml",
        "\u{feff}[node]\r\nflannel_subnet_env = \"subnet.env\"\r\n[masquerade]\r\n\
         nonmasquerade_cidrs_file = \"extra.list\"\r\n",
    );
    let state = dir.path().join("state");
    let (code, err) = masqd_timed(&ns, &cfg, &state, &["apply"], dir.path(), SECS);
    assert_eq!(code, Some(0), "{err}");
    let rs = ns.ruleset();
    assert_eq!(
        set_ranges(&rs, "pod4"),
        Some(ranges("10.244.6.0/24")),
        "the last assignment wins"
    );
    assert_eq!(set_ranges(&rs, "nomasq4").map(|r| r.len()), Some(3));
    // A subnet outside its network is a warning, not an error.
    dir.write(
        "subnet.env",
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET='10.9.1.1/24'\n",
    );
    let (code, err) = masqd_timed(&ns, &cfg, &state, &["apply"], dir.path(), SECS);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("outside FLANNEL_NETWORK") && err.contains("WARN"),
        "{err}"
    );
    assert_eq!(
        set_ranges(&ns.ruleset(), "pod4"),
        Some(ranges("10.9.1.0/24"))
    );
}

#[test]
fn errors_say_unknown_key_wrong_type_and_which_key_named_a_list() {
    let ns = Netns::new("mqe");
    let dir = TempDir::new();
    let state = dir.path().join("state");
    let plan = |text: &str| {
        let cfg = dir.write("masqd.toml", text);
        let (code, err) = masqd_timed(&ns, &cfg, &state, &["plan"], dir.path(), SECS);
        assert_eq!(code, Some(1), "{err}");
        err
    };
    let err = plan(&CFG.replace("cluster_cidrs", "clustr_cidrs"));
    assert!(!err.contains("invalid TOML"), "{err}");
    assert!(
        err.contains("masqd.toml:4")
            && err.contains("unknown key `clustr_cidrs` in [masquerade]")
            && err.contains("`cluster_cidrs`")
            && err.contains("`nonmasquerade_cidrs_file`"),
        "{err}"
    );
    let err = plan(&format!("{CFG}random_fully = \"yes\"\n"));
    assert!(
        err.contains("masqd.toml:6")
            && err.contains("masquerade.random_fully")
            && err.contains("wrong type"),
        "{err}"
    );
    let err = plan(&format!("{CFG}[daemon]\nresync_interval = 30\n"));
    assert!(
        err.contains("daemon.resync_interval") && err.contains("wrong type"),
        "{err}"
    );
    dir.write("bad.list", "10.0.0.0/8\n10.1.2.3/16\n");
    let err = plan(&CFG.replace(
        "bridge_interfaces",
        "nonmasquerade_cidrs_file = \"bad.list\"\nbridge_interfaces",
    ));
    assert!(
        err.contains("bad.list:2")
            && err.contains("masquerade.nonmasquerade_cidrs_file")
            && err.contains("masqd.toml:5"),
        "{err}"
    );
    // Durations in humantime's grammar, within 1 s..24 h.
    let cfg = dir.write(
        "masqd.toml",
        &format!("{CFG}[daemon]\nresync_interval = \"1m30s\"\n"),
    );
    let (code, err) = masqd_timed(&ns, &cfg, &state, &["plan"], dir.path(), SECS);
    assert_eq!(code, Some(2), "accepted: {err}");
    let err = plan(&format!("{CFG}[daemon]\nresync_interval = \"500ms\"\n"));
    assert!(err.contains("between 1s and 24h"), "{err}");
}
