//! The checks the configuration sources share: CIDRs (host bits, `/0` and whole-space covers),
//! interface names and durations.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use ipnet::IpNet;

use super::{ConfigError, Origin, IFNAME_MAX};
use crate::policy::{covers_family, Family};

/// Whether the CIDRs of `set` together cover a whole family's address space (after
/// aggregation, however it is spelled: `0.0.0.0/1` + `128.0.0.0/1`, or many pieces). Such a
/// set is refused like `/0`: pods (all traffic of the node masqueraded) or exceptions
/// (nothing masqueraded ever).
pub(super) fn check_cover(config: &Path, set: &[Origin], pods: bool) -> Result<(), ConfigError> {
    for family in Family::ALL {
        let nets: Vec<IpNet> = set.iter().map(|o| o.net).collect();
        if !covers_family(&nets, family) {
            continue;
        }
        let mine: Vec<&Origin> = set
            .iter()
            .filter(|o| Family::of(&o.net) == family)
            .collect();
        let shown: Vec<String> = mine
            .iter()
            .take(6)
            .map(|o| match o.line {
                Some(l) => format!("{} ({}:{l})", o.net, o.file.display()),
                None => format!("{} ({})", o.net, o.file.display()),
            })
            .collect();
        let more = match mine.len().saturating_sub(shown.len()) {
            0 => String::new(),
            n => format!(" and {n} more"),
        };
        let what = format!("{}{more} together", shown.join(", "));
        let mut keys: Vec<&str> = Vec::new();
        for o in &mine {
            if !keys.contains(&o.key) {
                keys.push(o.key);
            }
        }
        let first = mine[0];
        let in_config = &*first.file == config;
        return Err(ConfigError {
            file: first.file.to_path_buf(),
            line: if in_config || mine.len() == 1 {
                first.line
            } else {
                None
            },
            key: Some(keys.join(" + ")),
            message: if pods {
                pod_cover_message(&what)
            } else {
                exception_cover_message(&what)
            },
            missing_file: false,
        });
    }
    Ok(())
}

pub(super) fn pod_cover_message(what: &str) -> String {
    let covers = cover_verb(what);
    format!(
        "{what} {covers} every address: all traffic of the node, not only its pods, would be \
         masqueraded; give this node's pod subnet"
    )
}

/// "covers", or "cover" after a list of entries "… together".
fn cover_verb(what: &str) -> &'static str {
    if what.ends_with(" together") {
        "cover"
    } else {
        "covers"
    }
}

pub(super) fn exception_cover_message(what: &str) -> String {
    let covers = cover_verb(what);
    format!(
        "{what} {covers} every destination: nothing would ever be masqueraded, so pods could \
         no longer reach the outside world; list the cluster and private ranges instead, or \
         remove the masquerade rule of this node altogether"
    )
}

/// Shortest and longest `daemon.resync_interval` accepted.
pub const DURATION_BOUNDS: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(86_400));

/// Parses a duration in humantime's grammar (`1500ms`, `60s`, `1m30s`, `2h`; a bare number is
/// seconds), within [`DURATION_BOUNDS`] (1 s to 24 h).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let d = if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        t.parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|e| e.to_string())
    } else {
        humantime::parse_duration(t).map_err(|e| e.to_string())
    }
    .map_err(|e| {
        format!("{s:?} is not a duration ({e}; e.g. \"60s\", \"1500ms\", \"1m30s\", \"2h\")")
    })?;
    let (lo, hi) = DURATION_BOUNDS;
    if d < lo || d > hi {
        return Err(format!("{s:?} is out of range: between 1s and 24h"));
    }
    Ok(d)
}

/// Parses `a.b.c.d/len`, `x::/len` or a bare address (taken as /32 or /128). Host bits are an
/// error that suggests the network.
pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let net = if s.contains('/') {
        s.parse::<IpNet>().map_err(|_| {
            format!("{s:?} is not a CIDR (expected e.g. 10.244.0.0/16 or fd00::/64)")
        })?
    } else {
        let addr = s
            .parse::<IpAddr>()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR"))?;
        IpNet::from(addr)
    };
    if net.trunc() != net {
        return Err(format!(
            "{s:?} has host bits set; did you mean {}?",
            net.trunc()
        ));
    }
    Ok(net)
}

pub(super) fn check_exception(net: &IpNet, raw: &str) -> Result<(), String> {
    if net.prefix_len() == 0 {
        return Err(exception_cover_message(&format!("{raw:?}")));
    }
    Ok(())
}

/// Checks an interface name: 1..=15 bytes of ASCII letters, digits, `-`, `_` and `.`, as the
/// kernel and every shell accept without quoting.
pub fn validate_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is empty".to_string());
    }
    if name == "." || name == ".." {
        return Err("is not a valid interface name".to_string());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        let what = if c == '/' {
            "holds '/'".to_string()
        } else if c.is_whitespace() {
            "holds whitespace".to_string()
        } else {
            format!("holds {c:?}")
        };
        return Err(format!(
            "{what}; only letters, digits, '-', '_' and '.' are allowed"
        ));
    }
    if name.len() > IFNAME_MAX {
        return Err(format!(
            "is {} bytes long; Linux allows at most {IFNAME_MAX}",
            name.len()
        ));
    }
    Ok(())
}
