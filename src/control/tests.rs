use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::client::ask_at;
use super::scratch::Scratch;
use super::*;

fn info(netns: u64, state: &Path, config: &Path) -> DaemonInfo {
    DaemonInfo {
        pid: 4242,
        netns,
        state_dir: state.to_path_buf(),
        config: config.to_path_buf(),
        last_reconcile: "13:05:07Z in sync".into(),
        reconcile_pending: false,
        sets_from_mirror: true,
        config_error: None,
    }
}

#[test]
fn the_request_is_one_json_line_of_fixed_shape() {
    let r = Request {
        version: VERSION,
        command: Command::Status,
        json: true,
    };
    let text = serde_json::to_string(&r).expect("serializes");
    assert_eq!(text, r#"{"version":1,"command":"status","json":true}"#);
    let back: Request = serde_json::from_str(r#"{"version":1,"command":"plan"}"#).expect("plan");
    assert_eq!(back.command, Command::Plan);
    assert!(!back.json, "json defaults to false");
    assert!(serde_json::from_str::<Request>(r#"{"version":1,"command":"apply"}"#).is_err());
}

#[test]
fn an_answer_survives_the_wire() {
    let a = Answer {
        daemon: Some(info(7, Path::new("/s"), Path::new("/c"))),
        error: None,
        exit: 3,
        stdout: "in sync:              no\n".into(),
    };
    let line = serde_json::to_string(&a).expect("serializes");
    assert!(!line.contains('\n'), "one line: {line}");
    assert_eq!(serde_json::from_str::<Answer>(&line).expect("parses"), a);
}

#[test]
fn the_socket_is_in_the_runtime_dir_only_for_the_default_state_dir() {
    assert_eq!(runtime_dir(None), PathBuf::from("/run/masqd"));
    assert_eq!(runtime_dir(Some("")), PathBuf::from("/run/masqd"));
    assert_eq!(runtime_dir(Some("/run/a:/run/b")), PathBuf::from("/run/a"));
    let rt = Path::new("/run/masqd");
    assert_eq!(
        socket_path(Path::new("/var/lib/masqd"), rt),
        PathBuf::from("/run/masqd/control.sock")
    );
    assert_eq!(
        socket_path(Path::new("/tmp/t1/state"), rt),
        PathBuf::from("/tmp/t1/state/control.sock")
    );
    assert!(check_path_len(Path::new("/run/masqd/control.sock")).is_ok());
    let long = PathBuf::from(format!("/{}/control.sock", "d".repeat(100)));
    let e = check_path_len(&long).expect_err("too long");
    assert!(e.contains("108") || e.contains("107"), "{e}");
    assert!(
        e.contains(&long.display().to_string()),
        "names the path: {e}"
    );
}

#[test]
fn only_root_is_admitted() {
    assert!(admit(0).is_ok());
    for uid in [1, 65534, 1000] {
        let e = admit(uid).expect_err("refused");
        assert!(e.contains(&format!("uid {uid}")), "{e}");
    }
}

#[test]
fn an_answer_of_another_namespace_state_dir_or_config_is_refused() {
    let s = Scratch::new("mm");
    let cfg = s.0.join("masqd.toml");
    std::fs::write(&cfg, "").expect("config");
    let state = canonical(&s.0);
    let i = info(11, &state, &canonical(&cfg));
    assert_eq!(mismatch(&i, 11, &s.0, &cfg), None);
    let ns = mismatch(&i, 12, &s.0, &cfg).expect("another netns");
    assert!(ns.contains("net:[11]") && ns.contains("net:[12]"), "{ns}");
    let other = s.0.join("other");
    let sd = mismatch(&i, 11, &other, &cfg).expect("another state dir");
    assert!(sd.contains("state directory"), "{sd}");
    let c = mismatch(&i, 11, &s.0, Path::new("/etc/masqd/masqd.toml")).expect("config");
    assert!(c.contains("/etc/masqd/masqd.toml"), "{c}");
}

#[test]
fn the_namespace_inode_is_the_same_for_every_thread_of_a_process() {
    let here = netns_inode().expect("/proc");
    let there = std::thread::spawn(netns_inode)
        .join()
        .expect("thread")
        .expect("/proc");
    assert_eq!(here, there);
    assert_ne!(here, 0);
}

/// A one-shot server at `path`: reads one line, answers `reply` (None: closes silently after
/// `hold`).
fn serve_once(
    path: &Path,
    reply: Option<String>,
    hold: Duration,
) -> std::thread::JoinHandle<String> {
    let l = UnixListener::bind(path).expect("bind");
    std::thread::spawn(move || {
        let (s, _) = l.accept().expect("accept");
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).expect("request");
        std::thread::sleep(hold);
        if let Some(r) = reply {
            (&s).write_all(r.as_bytes()).expect("answer");
        }
        line
    })
}

#[test]
fn a_client_sends_one_line_and_reads_one() {
    let s = Scratch::new("rt");
    let path = s.0.join(SOCKET_NAME);
    let a = Answer {
        daemon: Some(info(1, &s.0, &s.0)),
        error: None,
        exit: 0,
        stdout: "x\n".into(),
    };
    let line = serde_json::to_string(&a).expect("json") + "\n";
    let server = serve_once(&path, Some(line), Duration::ZERO);
    let req = Request {
        version: VERSION,
        command: Command::Plan,
        json: false,
    };
    let got = ask_at(&path, &req, Duration::from_secs(5)).expect("answer");
    assert_eq!(got, a);
    let sent = server.join().expect("server");
    assert_eq!(
        sent,
        "{\"version\":1,\"command\":\"plan\",\"json\":false}\n"
    );
}

#[test]
fn no_socket_a_dead_one_a_silent_one_and_garbage_are_no_answer() {
    let s = Scratch::new("no");
    let req = Request {
        version: VERSION,
        command: Command::Status,
        json: false,
    };
    let path = s.0.join(SOCKET_NAME);
    let e = ask_at(&path, &req, Duration::from_secs(1)).expect_err("none");
    assert!(e.starts_with("no running masqd daemon"), "{e}");
    // A stale socket file: bound, then its listener gone.
    drop(UnixListener::bind(&path).expect("bind"));
    let e = ask_at(&path, &req, Duration::from_secs(1)).expect_err("stale");
    assert!(e.starts_with("no running masqd daemon"), "{e}");
    std::fs::remove_file(&path).expect("rm");
    // A daemon that does not answer in time.
    let server = serve_once(&path, None, Duration::from_millis(600));
    let e = ask_at(&path, &req, Duration::from_millis(200)).expect_err("silent");
    assert!(e.contains("did not answer"), "{e}");
    server.join().expect("server");
    std::fs::remove_file(&path).expect("rm");
    let server = serve_once(&path, Some("not json\n".into()), Duration::ZERO);
    let e = ask_at(&path, &req, Duration::from_secs(2)).expect_err("garbage");
    assert!(e.contains("unreadable answer"), "{e}");
    server.join().expect("server");
}

#[test]
fn the_status_line_names_the_daemon_and_its_last_reconcile() {
    let mut i = info(1, Path::new("/s"), Path::new("/c"));
    assert_eq!(
        answered_by(&i),
        "answered by:          masqd run (pid 4242), last reconcile 13:05:07Z in sync"
    );
    i.reconcile_pending = true;
    i.config_error = Some("masqd.toml:3: bad".into());
    let l = answered_by(&i);
    assert!(l.contains("a reconcile is pending"), "{l}");
    assert!(
        l.ends_with("config error (keeping the last good one): masqd.toml:3: bad"),
        "{l}"
    );
}

#[test]
fn a_client_takes_only_the_answer_of_its_own_daemon() {
    let s = Scratch::new("id");
    let cfg = s.0.join("masqd.toml");
    std::fs::write(&cfg, "").expect("config");
    let path = client::path_for(&s.0);
    assert_eq!(path, s.0.join(SOCKET_NAME));
    let req = Request {
        version: VERSION,
        command: Command::Status,
        json: false,
    };
    let own = netns_inode().expect("/proc");
    for (netns, ok) in [(own, true), (own + 1, false)] {
        let a = Answer {
            daemon: Some(info(netns, &canonical(&s.0), &canonical(&cfg))),
            error: None,
            exit: 0,
            stdout: "yes\n".into(),
        };
        let line = serde_json::to_string(&a).expect("json") + "\n";
        let server = serve_once(&path, Some(line), Duration::ZERO);
        let got = client::ask(&s.0, &cfg, &req);
        server.join().expect("server");
        std::fs::remove_file(&path).expect("rm");
        match got {
            Ok(a) => assert!(ok, "took another namespace's answer: {a:?}"),
            Err(e) => assert!(!ok && e.contains("another network namespace"), "{e}"),
        }
    }
    // A refusal is no answer either.
    let a = Answer::refusal(None, "refused: root only (peer uid 65534)".into());
    let line = serde_json::to_string(&a).expect("json") + "\n";
    let server = serve_once(&path, Some(line), Duration::ZERO);
    let e = client::ask(&s.0, &cfg, &req).expect_err("refused");
    server.join().expect("server");
    assert!(e.contains("peer uid 65534"), "{e}");
}
