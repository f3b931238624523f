use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream as StdStream;

use super::*;

use crate::control::scratch::Scratch;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn paths(state: &Path) -> Paths {
    let config = state.join("masqd.toml");
    Paths {
        source: crate::config::Source::Toml {
            path: config.clone(),
            agent: None,
        },
        config,
        state_dir: state.to_path_buf(),
    }
}

#[test]
fn a_request_line_is_checked_and_its_error_quotes_it() {
    let r = parse_request(b"{\"version\":1,\"command\":\"status\",\"json\":true}\n").expect("ok");
    assert_eq!((r.command, r.json), (Command::Status, true));
    let e = parse_request(b"{\"version\":1,\"command\":\"status\"}").expect_err("no newline");
    assert!(e.contains("no newline within 4096 bytes"), "{e}");
    let e = parse_request(b"{\"version\":1,\"command\":\"apply\"}\n").expect_err("unknown");
    assert!(
        e.starts_with("request line 1: unknown variant `apply`"),
        "{e}"
    );
    assert!(
        e.contains("\"{\\\"version\\\":1,\\\"command\\\":\\\"apply\\\"}\""),
        "quoted: {e}"
    );
    let e = parse_request(b"{\"version\":9,\"command\":\"plan\"}\n").expect_err("version");
    assert!(
        e.contains("protocol version 9, this daemon speaks 1"),
        "{e}"
    );
}

#[test]
fn the_socket_is_0600_a_stale_one_replaced_a_live_one_and_a_file_left_alone() {
    let rt = runtime();
    let s = Scratch::new("bind");
    let path = s.0.join("sub").join("control.sock");
    rt.block_on(async {
        let (l, _) = bind(&path).expect("fresh");
        let m = std::fs::metadata(&path).expect("socket");
        assert!(m.file_type().is_socket());
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        let dir = std::fs::metadata(path.parent().expect("dir")).expect("dir");
        assert_eq!(
            dir.permissions().mode() & 0o777,
            0o700,
            "its directory made 0700"
        );
        // A live listener's socket is never taken.
        let e = bind(&path).expect_err("live");
        assert!(
            format!("{e:#}").contains("another process answers"),
            "{e:#}"
        );
        // Its listener gone, the file stays: stale, replaced.
        drop(l);
        assert!(path.exists());
        let (_l2, _) = bind(&path).expect("stale replaced");
        assert!(StdStream::connect(&path).is_ok(), "the new socket answers");
    });
    let file = s.0.join("not-a-socket");
    std::fs::write(&file, "keep me").expect("file");
    let e = rt.block_on(async { bind(&file) }).expect_err("a file");
    assert!(format!("{e:#}").contains("not a socket"), "{e:#}");
    assert_eq!(std::fs::read_to_string(&file).expect("kept"), "keep me");
}

/// Sends `line` to the socket at `path`; the answer line (empty when closed without one).
fn send(path: &Path, line: &[u8]) -> String {
    let mut c = StdStream::connect(path).expect("connect");
    c.write_all(line).expect("write");
    let mut got = String::new();
    let _ = BufReader::new(&c).read_line(&mut got);
    got
}

#[test]
fn questions_reach_the_loop_bad_ones_are_answered_at_once_and_the_socket_goes_at_exit() {
    let rt = runtime();
    let s = Scratch::new("srv");
    let path = s.0.join(control::SOCKET_NAME);
    let p = paths(&s.0);
    rt.block_on(async {
        let mut c = Control::open(&p);
        assert!(path.exists(), "made at start");
        // A bad request is refused without reaching the loop (which keeps accepting).
        let path2 = path.clone();
        let mut bad = tokio::task::spawn_blocking(move || send(&path2, b"{\"nope\":1}\n"));
        let bad = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::select! {
                r = &mut bad => r.expect("client"),
                _ = c.next() => panic!("a bad request reached the loop"),
            }
        })
        .await
        .expect("refused within 10 s");
        let bad: Answer = serde_json::from_str(&bad).expect("answer");
        assert!(
            bad.error
                .as_deref()
                .is_some_and(|e| e.contains("request line 1")),
            "{bad:?}"
        );
        let path3 = path.clone();
        let good =
            std::thread::spawn(move || send(&path3, b"{\"version\":1,\"command\":\"plan\"}\n"));
        let q = tokio::time::timeout(Duration::from_secs(5), c.next())
            .await
            .expect("a question within 5 s");
        assert_eq!(q.req.command, Command::Plan);
        assert!(!c.waiting());
        c.park(q);
        assert!(c.waiting());
        // The loop ends: the waiting client sees the connection close, the socket is gone.
        drop(c);
        assert!(!path.exists(), "removed at exit");
        assert_eq!(good.join().expect("client"), "");
    });
}

#[test]
fn a_socket_that_is_no_longer_ours_stays_at_exit() {
    let rt = runtime();
    let s = Scratch::new("own");
    let path = s.0.join(control::SOCKET_NAME);
    rt.block_on(async {
        let c = Control::open(&paths(&s.0));
        std::fs::remove_file(&path).expect("rm");
        let other = std::os::unix::net::UnixListener::bind(&path).expect("another");
        drop(c);
        assert!(path.exists(), "another daemon's socket is left alone");
        drop(other);
    });
}
