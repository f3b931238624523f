//! The Debian package: scripts/package-check.sh builds it with cargo-deb (a release build in
//! target/package-check/target), lists it and runs lintian (errors fail it); then the listing
//! is checked here against Cargo.toml's asset list and the paths the issue names, the binary
//! is checked stripped, and the maintainer scripts are run with stand-ins for
//! deb-systemd-helper, deb-systemd-invoke, systemctl and masqd that record their calls: install
//! enables and never starts, removal leaves the rules unless asked. Also here: the unit has no
//! ordering cycle with docker.service and network-pre.target, and scripts/check-msrv.sh holds.
//! Needs no root; a missing tool (cargo-deb, lintian, dpkg-deb) fails the test.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn out() -> PathBuf {
    Path::new(ROOT).join("target/package-check")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs scripts/package-check.sh once for all the tests of this file.
fn built() -> &'static str {
    static RUN: OnceLock<String> = OnceLock::new();
    RUN.get_or_init(|| {
        let o = Command::new("bash")
            .arg(Path::new(ROOT).join("scripts/package-check.sh"))
            .output()
            .expect("running scripts/package-check.sh");
        let t = text(&o);
        assert!(o.status.success(), "scripts/package-check.sh failed:\n{t}");
        t
    })
}

fn read(name: &str) -> String {
    built();
    let p = out().join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The paths in `dpkg-deb -c`, without the leading `.`, with their mode.
fn contents() -> Vec<(String, String)> {
    read("contents.txt")
        .lines()
        .filter_map(|l| {
            let mode = l.split_whitespace().next()?.to_string();
            let path = l
                .split_whitespace()
                .last()?
                .trim_start_matches('.')
                .to_string();
            Some((path, mode))
        })
        .collect()
}

#[test]
fn the_package_holds_every_file_at_its_path() {
    let files = contents();
    let mode = |p: &str| {
        files
            .iter()
            .find(|(f, _)| f == p)
            .map(|(_, m)| m.clone())
            .unwrap_or_else(|| panic!("{p} is not in the package: {files:#?}"))
    };
    assert_eq!(mode("/usr/sbin/masqd"), "-rwxr-xr-x");
    assert_eq!(mode("/lib/systemd/system/masqd.service"), "-rw-r--r--");
    assert_eq!(mode("/etc/masqd/masqd.toml"), "-rw-r--r--");
    mode("/usr/share/doc/masqd/README.md");
    mode("/usr/share/doc/masqd/copyright");
    assert!(
        !files.iter().any(|(f, _)| f == "/usr/bin/masqd"),
        "a /usr/bin/masqd besides /usr/sbin/masqd"
    );
    // The packaged unit and configuration are the repository's, byte for byte.
    let deb = out().join("masqd.deb");
    for (inside, repo) in [
        (
            "./lib/systemd/system/masqd.service",
            "systemd/masqd.service",
        ),
        ("./etc/masqd/masqd.toml", "systemd/masqd.toml"),
    ] {
        let o = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "dpkg-deb --fsys-tarfile '{}' | tar -xO '{inside}'",
                deb.display()
            ))
            .output()
            .unwrap();
        let want = std::fs::read(Path::new(ROOT).join(repo)).unwrap();
        assert!(o.stdout == want, "{inside} differs from {repo}");
    }
}

/// Every destination of Cargo.toml's `assets` is in the package (a man page compressed by
/// cargo-deb as `.gz`), among them the man page and the bash, zsh and fish completions.
#[test]
fn the_package_holds_every_asset_of_cargo_toml() {
    let manifest: toml::Table = std::fs::read_to_string(Path::new(ROOT).join("Cargo.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let assets = manifest["package"]["metadata"]["deb"]["assets"]
        .as_array()
        .expect("[package.metadata.deb] assets");
    let files = contents();
    assert!(assets.len() >= 4, "{assets:?}");
    for a in assets {
        let dest = a[1].as_str().expect("an asset's destination");
        let path = format!("/{}", dest.trim_start_matches('/'));
        let gz = format!("{path}.gz");
        assert!(
            files
                .iter()
                .any(|(f, _)| *f == path || (path.contains("/man/") && *f == gz)),
            "asset {path} is not in the package"
        );
    }
    for generated in [
        "/usr/share/man/man8/masqd.8",
        "/usr/share/bash-completion/completions/masqd",
        "/usr/share/zsh/vendor-completions/_masqd",
        "/usr/share/fish/vendor_completions.d/masqd.fish",
    ] {
        assert!(
            assets
                .iter()
                .any(|a| a[1].as_str().map(|d| format!("/{d}")) == Some(generated.into())),
            "{generated} is not among the assets"
        );
    }
}

#[test]
fn the_configuration_is_a_conffile_and_the_control_fields_are_set() {
    let conffiles = read("control/conffiles");
    assert_eq!(conffiles.trim(), "/etc/masqd/masqd.toml");
    let control = read("control.txt");
    for field in [
        "Package: masqd",
        "Section: net",
        "Priority: optional",
        "Architecture: amd64",
    ] {
        assert!(
            control.lines().any(|l| l == field),
            "{field} not in:\n{control}"
        );
    }
    assert!(
        control
            .lines()
            .any(|l| l.starts_with("Depends:") && l.contains("libc6")),
        "no Depends on libc6:\n{control}"
    );
    // The packaged maintainer scripts are debian/'s.
    for s in ["postinst", "prerm", "postrm"] {
        assert_eq!(
            read(&format!("control/{s}")),
            std::fs::read_to_string(Path::new(ROOT).join("debian").join(s)).unwrap(),
            "{s}"
        );
    }
}

#[test]
fn lintian_reports_no_error() {
    let l = read("lintian.txt");
    eprintln!("{l}");
    assert!(!l.lines().any(|t| t.starts_with("E: ")), "{l}");
}

#[test]
fn the_packaged_binary_is_stripped() {
    built();
    let o = Command::new("readelf")
        .arg("-S")
        .arg(out().join("masqd"))
        .output()
        .expect("readelf (binutils)");
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains(".text"), "{t}");
    assert!(
        !t.contains(".symtab"),
        "the packaged masqd keeps its symbol table"
    );
    assert!(
        !t.contains(".debug_info"),
        "the packaged masqd keeps debug info"
    );
}

/// A directory of stand-ins that append their name and arguments to `calls`.
struct Stubs(PathBuf);

impl Stubs {
    fn new(tag: &str) -> Stubs {
        let d = std::env::temp_dir().join(format!("masqd-pkg-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("bin")).unwrap();
        std::fs::create_dir_all(d.join("root")).unwrap();
        for name in [
            "deb-systemd-helper",
            "deb-systemd-invoke",
            "systemctl",
            "masqd",
        ] {
            let p = d.join("bin").join(name);
            std::fs::write(
                &p,
                format!(
                    "#!/bin/sh\necho \"{name} $*\" >> '{}'\n",
                    d.join("calls").display()
                ),
            )
            .unwrap();
            Command::new("chmod").arg("755").arg(&p).status().unwrap();
        }
        Stubs(d)
    }

    /// The DPKG_ROOT the scripts run with: their files are never the host's.
    fn root(&self) -> PathBuf {
        self.0.join("root")
    }

    /// Runs debian/SCRIPT with ARGS (in DPKG_ROOT=root()); returns its calls.
    fn run(&self, script: &str, args: &[&str], env: &[(&str, &str)]) -> Vec<String> {
        let _ = std::fs::remove_file(self.0.join("calls"));
        let path = format!(
            "{}:/usr/sbin:/usr/bin:/sbin:/bin",
            self.0.join("bin").display()
        );
        let o = Command::new("sh")
            .arg(Path::new(ROOT).join("debian").join(script))
            .args(args)
            .env_clear()
            .env("PATH", path)
            .env("DPKG_ROOT", self.root())
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(o.status.success(), "{script} {args:?}: {}", text(&o));
        std::fs::read_to_string(self.0.join("calls"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Stubs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn install_enables_the_unit_and_starts_nothing() {
    let s = Stubs::new("install");
    let calls = s.run("postinst", &["configure", ""], &[]);
    assert!(
        calls.contains(&"deb-systemd-helper enable masqd.service".to_string()),
        "{calls:?}"
    );
    for c in &calls {
        assert!(
            !c.contains(" start") && !c.contains("restart") && !c.starts_with("masqd"),
            "a first install ran {c:?}"
        );
    }
    // An upgrade restarts only a running daemon (try-restart), when systemd runs.
    let calls = s.run("postinst", &["configure", "0.0.9-1"], &[]);
    for c in &calls {
        assert!(!c.contains(" start "), "an upgrade ran {c:?}");
    }
}

#[test]
fn removal_leaves_the_rules_unless_asked() {
    let s = Stubs::new("remove");
    for (script, args) in [
        ("prerm", &["remove"][..]),
        ("postrm", &["remove"][..]),
        ("prerm", &["upgrade", "0.1.1-1"][..]),
        ("postrm", &["purge"][..]),
    ] {
        let calls = s.run(script, args, &[]);
        assert!(
            !calls.iter().any(|c| c.starts_with("masqd")),
            "{script} {args:?} ran {calls:?}"
        );
    }
    let calls = s.run("prerm", &["remove"], &[("MASQD_TEARDOWN", "1")]);
    assert!(calls.contains(&"masqd teardown".to_string()), "{calls:?}");
    // An upgrade never tears down, even when asked for removals.
    let calls = s.run("prerm", &["upgrade", "0.1.1-1"], &[("MASQD_TEARDOWN", "1")]);
    assert!(calls.is_empty(), "{calls:?}");
    // The marker file asks too.
    let etc = s.root().join("etc/masqd");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(etc.join("teardown-on-remove"), "").unwrap();
    let calls = s.run("prerm", &["remove"], &[]);
    assert!(calls.contains(&"masqd teardown".to_string()), "{calls:?}");
}

#[test]
fn purge_keeps_the_records_teardown_needs() {
    let s = Stubs::new("purge");
    let state = s.root().join("var/lib/masqd");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("removed-default-rules.json"), "[]").unwrap();
    let etc = s.root().join("etc/masqd");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::write(etc.join("teardown-on-remove"), "").unwrap();
    s.run("postrm", &["purge"], &[]);
    assert!(state.join("removed-default-rules.json").exists());
    assert!(
        !etc.exists(),
        "the marker and /etc/masqd outlived the purge"
    );
    std::fs::remove_file(state.join("removed-default-rules.json")).unwrap();
    std::fs::write(state.join("lock"), "").unwrap();
    s.run("postrm", &["purge"], &[]);
    assert!(
        !state.exists(),
        "an empty state directory outlived the purge"
    );
}

/// Stand-ins with the real ordering of Debian's docker.io and systemd's network targets.
const ORDERING: [(&str, &str); 5] = [
    (
        "docker.service",
        "[Unit]\nAfter=network-online.target\nWants=network-online.target\n[Service]\nExecStart=/bin/true\n",
    ),
    (
        "flanneld.service",
        "[Unit]\nAfter=network-online.target\n[Service]\nExecStart=/bin/true\n",
    ),
    ("network-online.target", "[Unit]\nAfter=network.target\n"),
    ("network.target", "[Unit]\nAfter=network-pre.target\n"),
    (
        "boot.target",
        "[Unit]\nWants=masqd.service docker.service flanneld.service network.target\n",
    ),
];

fn ordering_cycles(unit: &str) -> String {
    let d = std::env::temp_dir().join(format!("masqd-pkg-order-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("masqd.service"), unit).unwrap();
    for (name, body) in ORDERING {
        std::fs::write(d.join(name), body).unwrap();
    }
    let o = Command::new("systemd-analyze")
        .arg("verify")
        .arg(d.join("masqd.service"))
        .arg(d.join("boot.target"))
        .env("SYSTEMD_UNIT_PATH", format!("{}:", d.display()))
        .output()
        .expect("systemd-analyze (apt-get install systemd)");
    let _ = std::fs::remove_dir_all(&d);
    text(&o)
        .lines()
        .filter(|l| l.contains("cycle"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_unit_closes_no_ordering_cycle() {
    let unit = std::fs::read_to_string(Path::new(ROOT).join("systemd/masqd.service")).unwrap();
    let cycles = ordering_cycles(&unit);
    assert!(cycles.is_empty(), "{cycles}");
    assert!(unit.contains("\nWants=network-pre.target\n"), "{unit}");
    assert!(
        unit.contains("\nBefore=network-pre.target kubelet.service\n"),
        "{unit}"
    );
    // The check sees one: the same unit also ordered after Docker (which is after
    // network-online.target, after network-pre.target).
    let after_docker = unit.replacen(
        "Wants=network-pre.target",
        "Wants=network-pre.target\nAfter=docker.service",
        1,
    );
    assert!(!ordering_cycles(&after_docker).is_empty());
}

#[test]
fn the_locked_tree_fits_the_stated_rust_version() {
    let script = Path::new(ROOT).join("scripts/check-msrv.sh");
    let o = Command::new("bash").arg(&script).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    // One minor below what the lock needs: refused, naming a package.
    let o = Command::new("bash")
        .arg(&script)
        .arg("1.88")
        .output()
        .unwrap();
    let t = text(&o);
    assert!(!o.status.success(), "1.88 accepted: {t}");
    assert!(
        t.contains("serde-saphyr") && t.contains("needs Rust 1.89"),
        "{t}"
    );
}
