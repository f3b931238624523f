//! `masqd run` following edits of a large CIDR list file (the incremental reload): after each
//! edit the kernel's `nomasq4` holds exactly the merged ranges of the file's entries, computed
//! here independently of masqd; a bad line keeps the last good set and names file and line.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// `/28`s 32 addresses apart from 11.0.0.0: `n` intervals that neither touch nor overlap.
fn entries(n: u32, base: u32) -> Vec<String> {
    (0..n)
        .map(|i| {
            let a = base + i * 32;
            format!("{}/28", std::net::Ipv4Addr::from(a))
        })
        .collect()
}

/// The ranges `nomasq4` must hold for these list lines (and the cluster CIDR).
fn expected(lines: &[String]) -> Vec<(u128, u128)> {
    let mut v: Vec<(u128, u128)> = lines
        .iter()
        .filter_map(|l| {
            let l = l.split('#').next().unwrap().trim();
            (!l.is_empty()).then(|| cidr_range(l))
        })
        .map(|(_, a, b)| (a, b))
        .collect();
    v.push((0xac07_0000, 0xac07_ffff));
    merge(v)
}

fn nomasq4(ns: &Netns) -> Option<Vec<(u128, u128)>> {
    let out = ns.exec(&["nft", "-j", "list", "set", "inet", "masqd", "nomasq4"]);
    let rs: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    set_ranges(&rs, "nomasq4")
}

/// Writes the list aside and renames it over the live one (as config management does).
fn swap(list: &Path, lines: &[String]) {
    let tmp = list.with_extension("new");
    std::fs::write(&tmp, lines.join("\n") + "\n").unwrap();
    std::fs::rename(&tmp, list).unwrap();
}

fn until_set(ns: &Netns, want: &[(u128, u128)], what: &str) {
    let t = Instant::now();
    loop {
        if nomasq4(ns).as_deref() == Some(want) {
            eprintln!(
                "{what}: in the kernel after {:?} (polled with nft)",
                t.elapsed()
            );
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{what}: set not as expected"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn edits_of_a_large_list_file_reach_the_kernel_exactly() {
    require_root();
    let ns = Netns::new("mqli");
    let dir = TempDir::new();
    let list = dir.path().join("nonmasq.list");
    let mut lines = entries(20_000, 0x0b00_0000);
    swap(&list, &lines);
    let cfg = dir.write(
        "masqd.toml",
        &format!(
            "[node]\npod_cidrs = [\"172.7.21.0/24\"]\n[masquerade]\n\
             cluster_cidrs = [\"172.7.0.0/16\"]\nnonmasquerade_cidrs_file = \"{}\"\n",
            list.display()
        ),
    );
    let state = dir.path().join("state");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name, env!("CARGO_BIN_EXE_masqd")])
        .args(["--config", cfg.to_str().unwrap()])
        .args([
            "--state-dir",
            state.to_str().unwrap(),
            "--log-level",
            "info",
            "run",
        ]);
    let mut d = Daemon::spawn(cmd);
    d.wait_note("READY=1", Duration::from_secs(30));
    until_set(&ns, &expected(&lines), "start");

    // One added, at the end and in the middle.
    lines.push("12.0.0.0/28".into());
    swap(&list, &lines);
    until_set(&ns, &expected(&lines), "one added at the end");
    lines.insert(7_000, "13.0.0.0/24 # mid".into());
    swap(&list, &lines);
    until_set(&ns, &expected(&lines), "one added in the middle");
    // One removed.
    lines.remove(5_000);
    swap(&list, &lines);
    until_set(&ns, &expected(&lines), "one removed");
    // One changed so that it touches its neighbour (two intervals merge into one).
    lines[100] = "11.0.12.16/28".into();
    swap(&list, &lines);
    until_set(&ns, &expected(&lines), "one changed, merging");
    // One covering eight entries, then gone again (they come back as eight).
    lines.insert(10, "11.0.1.0/24".into());
    swap(&list, &lines);
    until_set(&ns, &expected(&lines), "a covering entry");
    lines.remove(10);
    swap(&list, &lines);
    until_set(&ns, &expected(&lines), "the covering entry removed");

    // A bad line: refused with file and line, the last good set stays.
    let good = expected(&lines);
    let mut bad = lines.clone();
    bad.insert(12_344, "11.0.0.1/28".into());
    swap(&list, &bad);
    let note = d.wait_note("config error", Duration::from_secs(20));
    assert!(
        note.contains(&format!("{}:12345", list.display())) && note.contains("11.0.0.1/28"),
        "{note}"
    );
    assert_eq!(
        nomasq4(&ns).as_deref(),
        Some(&good[..]),
        "the last good set stays"
    );
    lines.push("12.0.1.0/28".into());
    swap(&list, &lines);
    until_set(&ns, &expected(&lines), "fixed");

    // Replaced wholesale by unrelated content.
    lines = entries(500, 0x0e00_0000);
    swap(&list, &lines);
    until_set(&ns, &expected(&lines), "replaced wholesale");
    lines.remove(0);
    swap(&list, &lines);
    until_set(&ns, &expected(&lines), "one removed after the replacement");
    assert!(d.alive());
}
