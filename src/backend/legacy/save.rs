//! The `iptables-legacy-save` parser and iptables' rule notation: reading a dump into tables,
//! splitting a saved rule into its arguments, writing an argument back in
//! iptables-restore's quoting, and comparing rules with addresses read as CIDRs.

use ipnet::IpNet;

/// One table of an iptables-save dump.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SavedTable {
    /// Table name.
    pub name: String,
    /// Chain names, in order (`:NAME policy [p:b]` lines).
    pub chains: Vec<String>,
    /// Rules: (chain, spec after `-A CHAIN `).
    pub rules: Vec<(String, String)>,
    /// Packet counters of the rules (with `iptables-save -c`), parallel to `rules`.
    pub packets: Vec<Option<u64>>,
}

/// One argument of a rule as iptables-save prints it: a quoted string (`"…"` with `\` escapes,
/// how `xtables_save_string` prints comments and other free text), or a bare word. Interface
/// names (`-i`, `-o`) are printed raw, quotes and backslashes included: the word after them
/// is always bare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedWord {
    /// The argument's value, unescaped.
    pub text: String,
    /// Whether it was printed as a quoted string.
    pub quoted: bool,
}

/// How a rule's text reads in iptables-save's notation.
#[derive(Debug, PartialEq, Eq)]
enum Scan {
    /// Its arguments.
    Words(Vec<SavedWord>),
    /// A quoted string is still open at the end (its value holds a newline).
    Open,
    /// A closing quote not followed by a blank.
    Bad,
}

fn scan(spec: &str) -> Scan {
    let blank = |c: char| c == ' ' || c == '\t' || c == '\n';
    let mut words = Vec::new();
    let mut chars = spec.chars().peekable();
    let mut raw_next = false;
    loop {
        while chars.next_if(|c| blank(*c)).is_some() {}
        let Some(&first) = chars.peek() else {
            return Scan::Words(words);
        };
        let mut text = String::new();
        if first == '"' && !raw_next {
            chars.next();
            loop {
                match chars.next() {
                    None => return Scan::Open,
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some(c) => text.push(c),
                        None => return Scan::Open,
                    },
                    Some(c) => text.push(c),
                }
            }
            if chars.peek().is_some_and(|c| !blank(*c)) {
                return Scan::Bad;
            }
            words.push(SavedWord { text, quoted: true });
            raw_next = false;
            continue;
        }
        while let Some(c) = chars.next_if(|c| !blank(*c)) {
            text.push(c);
        }
        // Options whose value iptables-save prints raw (no quoting, even with quotes in it).
        raw_next = matches!(
            text.as_str(),
            "-i" | "-o"
                | "--in-interface"
                | "--out-interface"
                | "--physdev-in"
                | "--physdev-out"
                | "--match-set"
        );
        words.push(SavedWord {
            text,
            quoted: false,
        });
    }
}

/// The arguments of a rule spec as iptables-save printed it, or None when it does not read
/// (a quote left open, a closing quote followed by more text).
pub fn split_saved(spec: &str) -> Option<Vec<SavedWord>> {
    match scan(spec) {
        Scan::Words(w) => Some(w),
        Scan::Open | Scan::Bad => None,
    }
}

/// One argument in iptables-restore's notation (xtables' `add_param_to_argv`: blanks end an
/// argument, `"` opens a quoted string in which `\` escapes the next character). None for a
/// value restore cannot read back (a newline or NUL: restore reads line by line).
pub fn restore_word(w: &str) -> Option<String> {
    if w.contains(['\n', '\r', '\0']) {
        return None;
    }
    let plain = |c: char| c.is_ascii_graphic() && !matches!(c, '"' | '\\' | '\'' | '#');
    if !w.is_empty() && w.chars().all(plain) {
        return Some(w.to_string());
    }
    let mut s = String::from("\"");
    for c in w.chars() {
        if c == '"' || c == '\\' {
            s.push('\\');
        }
        s.push(c);
    }
    s.push('"');
    Some(s)
}

/// A rule spec read in iptables-save's notation, written back in iptables-restore's: each
/// argument through [`restore_word`]. This is how foreign rule text goes into a restore
/// payload — never pasted.
pub fn quote_rule(spec: &str) -> Option<String> {
    let words = split_saved(spec)?;
    let quoted: Option<Vec<String>> = words.iter().map(|w| restore_word(&w.text)).collect();
    Some(quoted?.join(" "))
}

/// One argument of a rule for comparison: the address of `-s`/`-d` as a CIDR (whatever notation
/// the tool printed it in), everything else as printed.
#[derive(Debug, PartialEq, Eq)]
enum RuleArg {
    Net(IpNet),
    Word(SavedWord),
}

fn rule_key(spec: &str) -> Option<Vec<RuleArg>> {
    let mut addr_next = false;
    let mut key = Vec::new();
    for w in split_saved(spec)? {
        let is_addr_opt = !w.quoted
            && matches!(
                w.text.as_str(),
                "-s" | "-d" | "--source" | "--destination" | "--src" | "--dst"
            );
        key.push(if addr_next && !w.quoted {
            RuleArg::Net(parse_saved_net(&w.text)?)
        } else {
            RuleArg::Word(w)
        });
        addr_next = is_addr_opt;
    }
    Some(key)
}

/// Whether two lists of rule specs say the same, comparing addresses as CIDRs: `::10.0.0.0/104`
/// and `::a00:0/104`, `10.0.0.1` and `10.0.0.1/32` are the same match.
pub fn same_rules(observed: &[String], desired: &[String]) -> bool {
    observed.len() == desired.len()
        && observed
            .iter()
            .zip(desired)
            .all(|(o, d)| match rule_key(o) {
                Some(k) => rule_key(d).is_some_and(|dk| dk == k),
                None => false,
            })
}

/// The lines of an iptables-save dump, a rule whose quoted string holds newlines (a comment
/// `"x\nerror y"`) joined back into one line. A quote still open at the end of the dump is not
/// joined (the line stands alone).
fn saved_lines(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::with_capacity(lines.len());
    let mut i = 0;
    while i < lines.len() {
        let mut line = lines[i].to_string();
        let mut j = i;
        let rule = line.starts_with("-A ") || line.starts_with('[');
        while rule && scan(&line) == Scan::Open && j + 1 < lines.len() {
            j += 1;
            line.push('\n');
            line.push_str(lines[j]);
        }
        if scan(&line) == Scan::Open {
            line = lines[i].to_string();
            j = i;
        }
        out.push(line.trim_end().to_string());
        i = j + 1;
    }
    out
}

/// Parses iptables-save output into its tables.
pub fn parse_save(text: &str) -> Vec<SavedTable> {
    let mut out: Vec<SavedTable> = Vec::new();
    for line in saved_lines(text) {
        let line = line.as_str();
        if let Some(name) = line.strip_prefix('*') {
            out.push(SavedTable {
                name: name.trim().to_string(),
                ..Default::default()
            });
        } else if let Some(rest) = line.strip_prefix(':') {
            if let (Some(t), Some(name)) = (out.last_mut(), rest.split_whitespace().next()) {
                t.chains.push(name.to_string());
            }
        } else {
            // `[packets:bytes] -A …` with -c
            let (packets, line) = match line.strip_prefix('[').and_then(|l| l.split_once("] ")) {
                Some((c, rest)) => (c.split(':').next().and_then(|p| p.parse().ok()), rest),
                None => (None, line),
            };
            if let Some(rest) = line.strip_prefix("-A ") {
                if let Some(t) = out.last_mut() {
                    let (chain, spec) = rest.split_once(' ').unwrap_or((rest, ""));
                    t.rules.push((chain.to_string(), spec.trim().to_string()));
                    t.packets.push(packets);
                }
            }
        }
    }
    out
}

/// A CIDR in any notation iptables-save prints: `addr/len`, a bare host (`/32` and `/128`
/// omitted by some versions), a contiguous mask (`10.0.0.0/255.0.0.0`), IPv6 compressed or
/// with an embedded IPv4 part (`::10.0.0.0/104` is `::a00:0/104`, `::ffff:10.0.0.0/104`).
pub fn parse_saved_net(s: &str) -> Option<IpNet> {
    use std::net::IpAddr;
    let net = match s.split_once('/') {
        None => IpNet::from(s.parse::<IpAddr>().ok()?),
        Some((addr, len)) if len.bytes().all(|b| b.is_ascii_digit()) => {
            IpNet::new(addr.parse().ok()?, len.parse().ok()?).ok()?
        }
        Some((addr, mask)) => IpNet::with_netmask(addr.parse().ok()?, mask.parse().ok()?).ok()?,
    };
    Some(net.trunc())
}

#[cfg(test)]
mod tests {
    use super::super::captured::{SAVE_V4, SAVE_V4_COUNTERS, SAVE_V6};
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn a_captured_nat_save_reads_into_its_chains_and_rules() {
        let t = parse_save(SAVE_V4);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].name, "nat");
        assert_eq!(
            t[0].chains,
            [
                "PREROUTING",
                "INPUT",
                "OUTPUT",
                "POSTROUTING",
                "FLANNEL-POSTRTG",
                "MASQD-POSTROUTING"
            ]
        );
        let rules: Vec<(&str, &str)> = t[0]
            .rules
            .iter()
            .map(|(c, s)| (c.as_str(), s.as_str()))
            .collect();
        assert_eq!(
            rules,
            [
                (
                    "POSTROUTING",
                    "-m comment --comment masqd -j MASQD-POSTROUTING"
                ),
                ("POSTROUTING", "-s 172.7.21.0/24 ! -o docker0 -j MASQUERADE"),
                (
                    "POSTROUTING",
                    r#"-m comment --comment "kube \"say\" hi" -j RETURN"#
                ),
                ("POSTROUTING", "-j FLANNEL-POSTRTG"),
                (
                    "FLANNEL-POSTRTG",
                    "-s 10.9.0.5/32 -j SNAT --to-source 1.2.3.4"
                ),
                ("MASQD-POSTROUTING", "-o docker0 -j RETURN"),
                (
                    "MASQD-POSTROUTING",
                    "-s 172.7.21.0/24 -d 172.7.0.0/16 -j RETURN"
                ),
                (
                    "MASQD-POSTROUTING",
                    "-s 172.7.21.0/24 -d 10.0.0.1/32 -j RETURN"
                ),
                (
                    "MASQD-POSTROUTING",
                    "-s 172.7.21.0/24 -j MASQUERADE --random-fully"
                ),
            ]
        );
        assert_eq!(t[0].packets, vec![None; 9], "no counters without -c");
    }

    #[test]
    fn a_captured_save_with_counters_reads_the_same_rules() {
        let plain = parse_save(SAVE_V4);
        let counted = parse_save(SAVE_V4_COUNTERS);
        assert_eq!(counted[0].rules, plain[0].rules);
        assert_eq!(counted[0].chains, plain[0].chains);
        assert_eq!(counted[0].packets, vec![Some(0); 9]);
    }

    #[test]
    fn a_captured_comment_with_quotes_splits_into_one_unescaped_word() {
        let t = parse_save(SAVE_V4);
        let words = split_saved(&t[0].rules[2].1).unwrap();
        let comment = &words[3];
        assert_eq!(comment.text, r#"kube "say" hi"#);
        assert!(comment.quoted);
        assert_eq!(words.len(), 6);
        // Written back for restore, it reads as iptables-save printed it.
        assert_eq!(
            quote_rule(&t[0].rules[2].1).unwrap(),
            r#"-m comment --comment "kube \"say\" hi" -j RETURN"#
        );
    }

    #[test]
    fn a_captured_v6_save_compares_its_embedded_v4_notation_as_cidrs() {
        let t = parse_save(SAVE_V6);
        assert_eq!(t[0].rules.len(), 2);
        let saved = vec![t[0].rules[1].1.clone()];
        assert_eq!(saved[0], "-s fd00:7:21::/64 -d ::10.0.0.0/104 -j RETURN");
        let want = vec![format!(
            "-s {} -d {} -j RETURN",
            net("fd00:7:21::/64"),
            net("::a00:0/104")
        )];
        assert!(same_rules(&saved, &want));
        assert!(!same_rules(
            &saved,
            &["-s fd00:7:21::/64 -d ::a00:0/105 -j RETURN".to_string()]
        ));
    }
}
