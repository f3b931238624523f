use std::path::PathBuf;

use super::*;

/// A masqd.toml naming a list file, in a fresh directory.
struct Files {
    dir: PathBuf,
    config: PathBuf,
    list: PathBuf,
}

impl Files {
    fn new(tag: &str) -> Files {
        let dir = std::env::temp_dir().join(format!("masqd-incr-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("masqd.toml");
        let list = dir.join("x.list");
        std::fs::write(
            &config,
            "[node]\npod_cidrs = [\"172.7.21.0/24\", \"fd00:7::/64\"]\n[masquerade]\n\
             cluster_cidrs = [\"10.0.0.0/24\"]\nnonmasquerade_cidrs = [\"10.0.8.0/22\"]\n\
             nonmasquerade_cidrs_file = \"x.list\"\n",
        )
        .unwrap();
        Files { dir, config, list }
    }

    /// Replaces the list (written aside, renamed over it).
    fn write(&self, text: &str) {
        let tmp = self.dir.join("x.list.new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.list).unwrap();
    }

    fn source(&self) -> Source {
        Source::toml(&self.config)
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn lean(mut c: Config) -> Config {
    c.pod_origins = Vec::new();
    c.exception_origins = Vec::new();
    c
}

/// A random list line: mostly CIDRs in a small space (so they overlap, nest, repeat and
/// touch), some comments, blanks, CRLF endings and bad values.
fn random_line(rng: &mut fastrand::Rng) -> String {
    let v4 = format!(
        "10.0.{}.{}/{}",
        rng.u8(0..16),
        rng.u8(0..=255) & 0xf0,
        rng.u8(20..=28)
    );
    match rng.u8(0..20) {
        0 => "# a comment".into(),
        1 => String::new(),
        2 => format!("fd00:{:x}::/{} # six", rng.u8(0..8), rng.u8(30..=48)),
        3 => format!("{v4}\r"),
        4 => format!("  {v4}  # spaced"),
        _ => v4,
    }
}

/// Host bits are an error: normalise a line's CIDR to its network.
fn fix(line: String) -> String {
    let (value, rest) = match line.split_once('#') {
        Some((v, r)) => (v.to_string(), format!("#{r}")),
        None => (line.clone(), String::new()),
    };
    let cr = value.ends_with('\r');
    let t = value.trim();
    if t.is_empty() {
        return line;
    }
    let net: IpNet = t.parse().unwrap();
    format!("{}{rest}{}", net.trunc(), if cr { "\r" } else { "" })
}

/// What one reload gives through the base (None: the base asked for a full read).
fn incremental(
    base: &mut ListBase,
    cfg: &mut Config,
    policy: &mut Policy,
) -> Option<Result<(), ConfigError>> {
    match base.edit()? {
        Err(e) => Some(Err(e)),
        Ok(e) => base.apply(e, cfg, policy).map(|_| Ok(())),
    }
}

#[test]
fn random_edit_sequences_equal_a_full_read() {
    let f = Files::new("random");
    let mut rng = fastrand::Rng::with_seed(42);
    let mut lines: Vec<String> = (0..300).map(|_| fix(random_line(&mut rng))).collect();
    f.write(&(lines.join("\n") + "\n"));
    let first = Loaded::load(&f.source()).unwrap();
    let mut base = first.base.expect("a base");
    let mut cfg = lean(first.cfg);
    let mut policy = Policy::from_config(&cfg);
    let (mut applied, mut errors, mut full) = (0, 0, 0);
    for step in 0..400 {
        let before = lines.clone();
        let bad = rng.u8(0..25) == 0;
        // Edits near one place (one hunk), now and then far apart (a full read).
        let near = rng.usize(0..=lines.len());
        let spread = if rng.u8(0..10) == 0 { lines.len() } else { 4 };
        for _ in 0..rng.usize(1..4) {
            let at = (near + rng.usize(0..=spread)).min(lines.len());
            match rng.u8(0..4) {
                0 | 1 => lines.insert(at, fix(random_line(&mut rng))),
                2 if at < lines.len() => lines[at] = fix(random_line(&mut rng)),
                _ if at < lines.len() => drop(lines.remove(at)),
                _ => {}
            }
        }
        if bad {
            let at = rng.usize(0..=lines.len());
            lines.insert(
                at,
                ["bogus", "10.0.0.1/24", "0.0.0.0/0"][rng.usize(0..3)].into(),
            );
        }
        let text = lines.join("\n") + if rng.bool() { "\n" } else { "" };
        f.write(&text);
        let want = Loaded::load(&f.source());
        match (incremental(&mut base, &mut cfg, &mut policy), want) {
            (Some(Err(e)), Err(w)) => {
                assert_eq!(e, w, "step {step}: the same error");
                errors += 1;
            }
            (Some(Ok(())), Ok(w)) => {
                let w = lean(w.cfg);
                assert_eq!(cfg, w, "step {step}: the same configuration");
                assert_eq!(
                    policy,
                    Policy::from_config(&w),
                    "step {step}: the same policy"
                );
                applied += 1;
            }
            (None, w) => {
                // A full read: what the daemon does then.
                full += 1;
                let w = w.unwrap();
                base = w.base.expect("a base");
                cfg = lean(w.cfg);
                policy = Policy::from_config(&cfg);
            }
            (got, want) => panic!("step {step}: {got:?} but a full read gives {want:?}"),
        }
        if bad {
            // The last good one stays; the file goes back to it.
            lines = before;
            f.write(&(lines.join("\n") + "\n"));
            let w = lean(Loaded::load(&f.source()).unwrap().cfg);
            if incremental(&mut base, &mut cfg, &mut policy) == Some(Ok(())) {
                assert_eq!(cfg, w, "step {step}: back to the last good one");
            } else {
                panic!("step {step}: going back is incremental");
            }
        }
    }
    assert!(
        applied > 250 && errors > 5,
        "{applied} applied, {errors} errors, {full} full"
    );
}

#[test]
fn any_doubt_is_a_full_read() {
    let f = Files::new("doubt");
    let body: String = (0..200).map(|i| format!("10.1.{i}.0/24\n")).collect();
    f.write(&body);
    let base = Loaded::load(&f.source()).unwrap().base.expect("a base");
    // Unchanged: an empty edit.
    let e = base.edit().unwrap().unwrap();
    assert_eq!((e.old.len(), e.new.len()), (0, 0));
    // Replaced wholesale with unrelated content: too many entries.
    let other: String = (0..200).map(|i| format!("10.2.{i}.0/24\n")).collect();
    f.write(&other);
    assert!(base.edit().is_none(), "a wholesale replacement");
    // A byte-order mark in the middle of the file is a bad line for the full read.
    f.write(&format!("{body}\u{feff}10.3.0.0/16\n"));
    assert!(base.edit().is_none(), "a mark past the first line");
    // The configuration file changed (a comment only): full.
    f.write(&body);
    assert!(base.edit().is_some());
    let text = std::fs::read_to_string(&f.config).unwrap();
    std::fs::write(&f.config, format!("{text}# edited\n")).unwrap();
    assert!(base.edit().is_none(), "another file changed");
    // The list file gone: full (whose error names it).
    std::fs::write(&f.config, text).unwrap();
    std::fs::remove_file(&f.list).unwrap();
    assert!(base.edit().is_none(), "no list file");
}

#[test]
fn covering_a_family_is_left_to_the_full_read() {
    let f = Files::new("cover");
    f.write("10.1.0.0/16\n");
    let first = Loaded::load(&f.source()).unwrap();
    let mut base = first.base.unwrap();
    let mut cfg = lean(first.cfg);
    let mut policy = Policy::from_config(&cfg);
    let (c0, p0) = (cfg.clone(), policy.clone());
    f.write("10.1.0.0/16\n0.0.0.0/1\n128.0.0.0/1\n");
    let e = base.edit().unwrap().unwrap();
    assert_eq!(base.apply(e, &mut cfg, &mut policy), None);
    assert_eq!((cfg, policy), (c0, p0), "left alone");
    let err = Loaded::load(&f.source()).unwrap_err();
    assert!(err.to_string().contains("together cover"), "{err}");
}

#[test]
fn line_diff_keeps_whole_lines() {
    assert_eq!(line_diff("a\nb\nc\n", "a\nb\nc\n"), (3, "", ""));
    assert_eq!(line_diff("a\nb\nc\n", "a\nx\nc\n"), (1, "b\n", "x\n"));
    assert_eq!(line_diff("ab\n", "xab\n"), (0, "ab\n", "xab\n"));
    assert_eq!(line_diff("a\nab\n", "a\nb\n"), (1, "ab\n", "b\n"));
    assert_eq!(line_diff("a", "a\nb\n"), (0, "a", "a\nb\n"));
    assert_eq!(line_diff("a\nb", "a\n"), (1, "b", ""));
    assert_eq!(line_diff("a\nb\n", "a\nc\nb\n"), (1, "", "c\n"));
}
