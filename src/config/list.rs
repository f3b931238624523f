//! The CIDR list source (the file `[masquerade] nonmasquerade_cidrs_file` names): the pure
//! parse of its text into CIDRs, each with its line.
//!
//! One CIDR (or bare address) per line; `#` starts a comment; blank lines are ignored; CR/LF
//! line endings and a byte-order mark are accepted. Meant for long exception lists (tens of
//! thousands of entries), which it parses an order of magnitude faster than a TOML array. The
//! list is part of the configuration: a missing file is an error like any other (never waited
//! for).

use std::path::Path;
use std::sync::Arc;

use ipnet::IpNet;

use super::validate::{check_exception, parse_cidr};
use super::{strip_bom, ConfigError, Named, Origin, ReadError};

/// Parses the text of a CIDR list file (the format `[masquerade] nonmasquerade_cidrs_file` names).
pub fn parse_cidr_list(path: &Path, text: &str) -> Result<Vec<IpNet>, ConfigError> {
    let mut out = Vec::new();
    for_each_cidr_line(path, text, |net, _, _| out.push(net))?;
    Ok(out)
}

/// Parses the text of the list `named` names: each entry comes with its line and the key that
/// named the list; an error names that key and where it stands.
pub(super) fn parse(named: &Named, text: &str) -> Result<Vec<Origin>, ConfigError> {
    let mut out = Vec::new();
    let file: Arc<Path> = Arc::from(named.path.as_path());
    for_each_cidr_line(&named.path, text, |net, _, line| {
        out.push(Origin {
            net,
            file: file.clone(),
            line: Some(line),
            key: named.key,
        })
    })
    .map_err(|e| named.blame(e))?;
    Ok(out)
}

/// The error of a list file that could not be read (not waited for, even when missing).
pub(super) fn read_error(named: &Named, e: &ReadError) -> ConfigError {
    named.blame(ConfigError {
        file: named.path.clone(),
        line: None,
        key: None,
        message: format!("cannot read the CIDR list: {}", e.message),
        missing_file: false,
    })
}

/// Calls `f` with each entry of the list text: the CIDR, the text as written and its line.
pub(super) fn for_each_cidr_line(
    path: &Path,
    text: &str,
    mut f: impl FnMut(IpNet, &str, usize),
) -> Result<(), ConfigError> {
    for (idx, raw) in strip_bom(text).lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let err = |message: String| ConfigError {
            file: path.to_path_buf(),
            line: Some(idx + 1),
            key: None,
            message,
            missing_file: false,
        };
        let net = parse_cidr(line).map_err(err)?;
        check_exception(&net, line).map_err(err)?;
        f(net, line, idx + 1);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named() -> Named {
        Named {
            path: "/nonexistent/x.list".into(),
            key: "masquerade.nonmasquerade_cidrs_file",
            at: "/etc/masqd/masqd.toml:4".into(),
        }
    }

    #[test]
    fn entries_carry_their_line_and_the_naming_key() {
        let o = parse(&named(), "# head\n10.0.0.0/8\n\n192.168.1.1 # host\n").unwrap();
        let got: Vec<(String, String, &str)> = o
            .iter()
            .map(|o| (o.net().to_string(), o.location(), o.key()))
            .collect();
        let key = "masquerade.nonmasquerade_cidrs_file";
        assert_eq!(
            got,
            vec![
                ("10.0.0.0/8".into(), "/nonexistent/x.list:2".into(), key),
                ("192.168.1.1/32".into(), "/nonexistent/x.list:4".into(), key),
            ]
        );
        let e = parse(&named(), "10.0.0.0/8\nbogus\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "/nonexistent/x.list:2: masquerade.nonmasquerade_cidrs_file \
             (/etc/masqd/masqd.toml:4): \"bogus\" is not an IP address or CIDR"
        );
    }

    #[test]
    fn an_unreadable_list_is_an_error_never_waited_for() {
        let e = read_error(
            &named(),
            &ReadError {
                not_found: true,
                message: "No such file or directory (os error 2)".into(),
            },
        );
        assert!(!e.missing_file);
        assert_eq!(
            e.to_string(),
            "/nonexistent/x.list: masquerade.nonmasquerade_cidrs_file \
             (/etc/masqd/masqd.toml:4): cannot read the CIDR list: No such file or directory \
             (os error 2)"
        );
    }
}
