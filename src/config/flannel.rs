//! The flannel source: the pure parse of the text of flannel's `subnet.env` (shell
//! assignments) into this node's pod subnets and the cluster networks, each with its line.

use std::path::Path;
use std::sync::Arc;

use ipnet::IpNet;

use super::validate::{exception_cover_message, parse_cidr, pod_cover_message};
use super::{strip_bom, ConfigError, Origin, ReadError};

/// What flannel's `subnet.env` contributes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubnetEnv {
    /// FLANNEL_SUBNET / FLANNEL_IPV6_SUBNET, masked to their networks.
    pub subnets: Vec<IpNet>,
    /// FLANNEL_NETWORK / FLANNEL_IPV6_NETWORK.
    pub networks: Vec<IpNet>,
    /// What is odd but not wrong (a subnet outside its network); logged by
    /// [`load_subnet_env`](super::load_subnet_env).
    pub warnings: Vec<String>,
    pub(super) subnet_origins: Vec<Origin>,
    pub(super) network_origins: Vec<Origin>,
}

/// The error of a subnet.env that could not be read; a missing one is waited for.
pub(super) fn read_error(path: &Path, e: &ReadError) -> ConfigError {
    ConfigError {
        file: path.to_path_buf(),
        line: None,
        key: None,
        message: format!("cannot read flannel's subnet.env: {}", e.message),
        missing_file: e.not_found,
    }
}

/// Parses the text of a `subnet.env` as the shell would source it: `KEY=VALUE` lines, an
/// optional `export` prefix, values bare or quoted (`"…"`, `'…'`), `#` comments, blank lines,
/// CR/LF line endings and a byte-order mark; the last assignment of a variable wins. A
/// FLANNEL_SUBNET outside FLANNEL_NETWORK is a warning, not an error.
pub fn parse_subnet_env(path: &Path, text: &str) -> Result<SubnetEnv, ConfigError> {
    const VARS: [&str; 4] = [
        "FLANNEL_SUBNET",
        "FLANNEL_IPV6_SUBNET",
        "FLANNEL_NETWORK",
        "FLANNEL_IPV6_NETWORK",
    ];
    let mut last: [Option<(String, usize)>; 4] = Default::default();
    for (idx, raw_line) in strip_bom(text).lines().enumerate() {
        let err = |key: Option<&str>, message: String| ConfigError {
            file: path.to_path_buf(),
            line: Some(idx + 1),
            key: key.map(str::to_string),
            message,
            missing_file: false,
        };
        let Some((key, value)) = shell_assignment(raw_line).map_err(|m| err(None, m))? else {
            continue;
        };
        if let Some(i) = VARS.iter().position(|v| *v == key) {
            last[i] = Some((value, idx + 1));
        }
    }
    let mut env = SubnetEnv::default();
    let mut nets: [Option<IpNet>; 4] = [None; 4];
    for (i, key) in VARS.iter().enumerate() {
        let Some((value, line)) = &last[i] else {
            continue;
        };
        let net = subnet_env_value(key, value, i < 2).map_err(|m| ConfigError {
            file: path.to_path_buf(),
            line: Some(*line),
            key: Some(key.to_string()),
            message: m,
            missing_file: false,
        })?;
        nets[i] = Some(net);
        let origin = Origin {
            net,
            file: Arc::from(path),
            line: Some(*line),
            key,
        };
        if i < 2 {
            env.subnets.push(net);
            env.subnet_origins.push(origin);
        } else {
            env.networks.push(net);
            env.network_origins.push(origin);
        }
    }
    for (s, n) in [(0, 2), (1, 3)] {
        if let (Some(sub), Some(net)) = (nets[s], nets[n]) {
            if !net.contains(&sub) {
                env.warnings.push(format!(
                    "{}: {}={sub} is outside {}={net}; using it as this node's pod CIDR anyway",
                    path.display(),
                    VARS[s],
                    VARS[n]
                ));
            }
        }
    }
    if env.subnets.is_empty() {
        return Err(ConfigError {
            file: path.to_path_buf(),
            line: None,
            key: None,
            message: "no FLANNEL_SUBNET or FLANNEL_IPV6_SUBNET in the file".to_string(),
            missing_file: false,
        });
    }
    Ok(env)
}

/// One subnet.env value: a subnet (host address with prefix, masked) or a network.
fn subnet_env_value(key: &str, value: &str, subnet: bool) -> Result<IpNet, String> {
    let net = if subnet {
        let net: IpNet = value.parse().map_err(|_| {
            format!("{value:?} is not an address with a prefix (e.g. 10.244.1.1/24)")
        })?;
        net.trunc()
    } else {
        parse_cidr(value)?
    };
    check_family(key, &net)?;
    if net.prefix_len() == 0 {
        let what = format!("{value:?}");
        return Err(if subnet {
            pod_cover_message(&what)
        } else {
            exception_cover_message(&what)
        });
    }
    Ok(net)
}

/// One line of a shell-sourced file: None for blank and comment lines, else the variable and
/// its value with the quoting removed (`export` prefix, bare, `"…"` with `\` escapes, `'…'`,
/// a trailing `# comment`).
fn shell_assignment(raw_line: &str) -> Result<Option<(String, String)>, String> {
    let line = raw_line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let line = match line.strip_prefix("export") {
        Some(rest) if rest.starts_with([' ', '\t']) => rest.trim_start(),
        _ => line,
    };
    let Some((key, value)) = line.split_once('=') else {
        return Err(format!("malformed line {raw_line:?}: expected KEY=VALUE"));
    };
    // A shell reads `KEY = VALUE` (or `KEY= VALUE`) as a command, not an assignment.
    if key.ends_with([' ', '\t']) || value.starts_with([' ', '\t']) {
        return Err(format!(
            "malformed line {raw_line:?}: no blank may stand next to '=' (a shell would run \
             it as a command)"
        ));
    }
    let key = key.trim();
    if key.is_empty()
        || key.starts_with(|c: char| c.is_ascii_digit())
        || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(format!(
            "malformed line {raw_line:?}: {key:?} is not a variable name"
        ));
    }
    let mut out = String::new();
    let mut chars = value.trim().chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => loop {
                match chars.next() {
                    Some('\'') => break,
                    Some(c) => out.push(c),
                    None => return Err(format!("{key}: unterminated ' in {raw_line:?}")),
                }
            },
            '"' => loop {
                match chars.next() {
                    Some('"') => break,
                    Some('\\') if chars.peek().is_some_and(|n| "\"\\$`".contains(*n)) => {
                        out.extend(chars.next());
                    }
                    Some(c) => out.push(c),
                    None => return Err(format!("{key}: unterminated \" in {raw_line:?}")),
                }
            },
            '\\' => out.extend(chars.next()),
            c if c.is_whitespace() => {
                let rest: String = chars.collect();
                if rest.trim_start().starts_with('#') || rest.trim().is_empty() {
                    break;
                }
                return Err(format!(
                    "{key}: unexpected text after the value in {raw_line:?} (quote a value \
                     that holds spaces)"
                ));
            }
            c => out.push(c),
        }
    }
    Ok(Some((key.to_string(), out)))
}

fn check_family(key: &str, net: &IpNet) -> Result<(), String> {
    let v6_key = key.contains("IPV6");
    match (v6_key, net) {
        (false, IpNet::V6(_)) => Err(format!("{net} is IPv6; {key} takes an IPv4 CIDR")),
        (true, IpNet::V4(_)) => Err(format!("{net} is IPv4; {key} takes an IPv6 CIDR")),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_name_the_variable_and_its_last_line() {
        let env = parse_subnet_env(
            Path::new("/nonexistent/subnet.env"),
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\n\
             FLANNEL_SUBNET=10.244.2.1/24\n",
        )
        .unwrap();
        let at = |o: &[Origin]| -> Vec<(String, String, &str)> {
            o.iter()
                .map(|o| (o.net().to_string(), o.location(), o.key()))
                .collect()
        };
        assert_eq!(
            at(&env.subnet_origins),
            vec![(
                "10.244.2.0/24".into(),
                "/nonexistent/subnet.env:3".into(),
                "FLANNEL_SUBNET"
            )]
        );
        assert_eq!(
            at(&env.network_origins),
            vec![(
                "10.244.0.0/16".into(),
                "/nonexistent/subnet.env:1".into(),
                "FLANNEL_NETWORK"
            )]
        );
        let e =
            parse_subnet_env(Path::new("s.env"), "FLANNEL_IPV6_SUBNET=10.1.1.1/24\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "s.env:1: FLANNEL_IPV6_SUBNET: 10.1.1.0/24 is IPv4; FLANNEL_IPV6_SUBNET takes an \
             IPv6 CIDR"
        );
    }

    #[test]
    fn only_a_missing_subnet_env_is_waited_for() {
        let read = |not_found| {
            read_error(
                Path::new("/run/flannel/subnet.env"),
                &ReadError {
                    not_found,
                    message: "oops".into(),
                },
            )
        };
        assert!(read(true).missing_file);
        assert!(!read(false).missing_file);
        assert_eq!(
            read(true).to_string(),
            "/run/flannel/subnet.env: cannot read flannel's subnet.env: oops"
        );
    }
}
