//! The trusted PATH lookup of `masqd::exec` against directories and binaries of every owner
//! and mode (root-owned, world- or group-writable, another user's, symlinked): needs root to
//! make them, so it lives here rather than among the root-free unit tests.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use masqd::exec::find_in;

fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("masqd-lookup-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

#[test]
fn only_trusted_directories_and_binaries_are_found() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "run as root: the test makes root-owned directories and hands one to another user"
    );
    let d = tmpdir("lookup");
    let mk = |name: &str, mode: u32| {
        let sub = d.join(name);
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(mode)).unwrap();
        script(&sub, "tool", "true");
        sub
    };
    let good = mk("good", 0o755);
    let world = mk("world", 0o777);
    let group = mk("group", 0o775);
    let other = mk("other", 0o755);
    nix::unistd::chown(&other, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
    let path = |dirs: &[&str]| std::ffi::OsString::from(dirs.join(":"));
    let s = |p: &Path| p.display().to_string();
    let found = |dirs: &[&str]| find_in(&path(dirs), "tool");
    assert_eq!(found(&[&s(&good)]), Some(good.join("tool")));
    for bad in [&world, &group, &other] {
        assert_eq!(
            found(&[&s(bad), &s(&good)]),
            Some(good.join("tool")),
            "{bad:?}"
        );
        assert_eq!(found(&[&s(bad)]), None, "{bad:?}");
    }
    // Empty and relative entries are the current directory: never searched.
    assert_eq!(found(&["", "."]), None);
    assert_eq!(find_in(&path(&["good"]), "tool"), None);
    // The binary itself: writable by others, or a link to one in an untrusted place.
    let linked = mk("linked", 0o755);
    std::fs::set_permissions(linked.join("tool"), std::fs::Permissions::from_mode(0o757)).unwrap();
    assert_eq!(found(&[&s(&linked)]), None);
    std::fs::remove_file(linked.join("tool")).unwrap();
    std::os::unix::fs::symlink(world.join("tool"), linked.join("tool")).unwrap();
    assert_eq!(found(&[&s(&linked)]), None);
    std::fs::remove_file(linked.join("tool")).unwrap();
    std::os::unix::fs::symlink("../good/tool", linked.join("tool")).unwrap();
    assert_eq!(found(&[&s(&linked)]), Some(linked.join("tool")));
    assert_eq!(find_in(&path(&[&s(&good)]), "../good/tool"), None);
    let _ = std::fs::remove_dir_all(d);
}
