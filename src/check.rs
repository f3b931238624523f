//! `masqd check`: the effective policy of a valid configuration, on one screen, and what looks
//! wrong in it. Pure apart from reading the files the configuration names: no root, no kernel.

use std::collections::BTreeMap;
use std::fmt;

use ipnet::IpNet;

use crate::config::{self, Config};
use crate::policy::{Family, Policy};

/// What `masqd check` prints about one address family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilySummary {
    /// The family.
    pub family: Family,
    /// Pod CIDRs, aggregated (empty: masqd leaves this family alone).
    pub pod_cidrs: Vec<IpNet>,
    /// Exception entries per source (`cluster_cidrs`, `nonmasquerade_cidrs`, the list file,
    /// subnet.env), in a fixed order, with zero counts left out.
    pub exceptions_by_source: Vec<(String, usize)>,
    /// Exceptions after aggregation: the elements of the set `nomasqN`.
    pub exception_ranges: usize,
}

/// The summary of a valid configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The configuration file.
    pub path: String,
    /// Per family.
    pub families: Vec<FamilySummary>,
    /// Output interfaces left untouched.
    pub bridges: Vec<String>,
    /// Marks left to the component that set them.
    pub honor_marks: Vec<String>,
    /// `[backend] mode`.
    pub mode: String,
    /// `random_fully`, `replace_default_rule`, the resync interval.
    pub options: Vec<(String, String)>,
    /// What is valid but probably not what the operator meant.
    pub warnings: Vec<String>,
}

/// The label of an exception's source key.
fn source_label(cfg: &Config, key: &str) -> String {
    match key {
        "masquerade.cluster_cidrs" => "cluster_cidrs".to_string(),
        "masquerade.nonmasquerade_cidrs" => "nonmasquerade_cidrs".to_string(),
        "masquerade.nonmasquerade_cidrs_file" => match &cfg.nonmasquerade_cidrs_file {
            Some(p) => format!("list file {}", p.display()),
            None => "list file".to_string(),
        },
        "FLANNEL_NETWORK" | "FLANNEL_IPV6_NETWORK" => match &cfg.flannel_subnet_env {
            Some(p) => format!("subnet.env {} ({key})", p.display()),
            None => format!("subnet.env ({key})"),
        },
        other => other.to_string(),
    }
}

/// Order of the sources in the summary.
fn source_rank(key: &str) -> u8 {
    match key {
        "masquerade.cluster_cidrs" => 0,
        "masquerade.nonmasquerade_cidrs" => 1,
        "masquerade.nonmasquerade_cidrs_file" => 2,
        _ => 3,
    }
}

/// Builds the summary of a configuration `config::load` accepted.
pub fn summarize(cfg: &Config) -> Summary {
    let policy = Policy::from_config(cfg);
    let mut families = Vec::new();
    for f in Family::ALL {
        let mut by: BTreeMap<(u8, &str), usize> = BTreeMap::new();
        for o in cfg
            .exception_origins
            .iter()
            .filter(|o| Family::of(&o.net()) == f)
        {
            *by.entry((source_rank(o.key()), o.key())).or_default() += 1;
        }
        let fp = policy.family(f);
        families.push(FamilySummary {
            family: f,
            pod_cidrs: fp.map(|p| p.pod_cidrs.clone()).unwrap_or_default(),
            exceptions_by_source: by
                .into_iter()
                .map(|((_, k), n)| (source_label(cfg, k), n))
                .collect(),
            exception_ranges: fp.map(|p| p.exception_cidrs.len()).unwrap_or(0),
        });
    }
    let options = vec![
        ("random_fully".to_string(), yes_no(cfg.random_fully)),
        (
            "replace_default_rule".to_string(),
            yes_no(cfg.replace_default_rule),
        ),
        (
            "resync_interval".to_string(),
            match cfg.resync_interval {
                Some(d) => humantime::format_duration(d).to_string(),
                None => "default (60s)".to_string(),
            },
        ),
        (
            "full_verify_interval".to_string(),
            match cfg.full_verify_interval {
                Some(d) => humantime::format_duration(d).to_string(),
                None => "never (default)".to_string(),
            },
        ),
    ];
    Summary {
        path: cfg.path.display().to_string(),
        warnings: warnings(cfg, &policy, &families),
        families,
        bridges: cfg.bridge_interfaces.clone(),
        honor_marks: cfg.honor_marks.iter().map(|m| m.to_string()).collect(),
        mode: cfg.mode.to_string(),
        options,
    }
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

/// What is valid but probably a mistake: exceptions of a family without pods, a family
/// without exceptions, pods outside every exception, subnet.env's own warnings.
fn warnings(cfg: &Config, policy: &Policy, families: &[FamilySummary]) -> Vec<String> {
    let mut w = Vec::new();
    for fs in families {
        let f = fs.family;
        // ip-masq-agent's link-local ranges are implied for both families, never a mistake.
        let written = || {
            fs.exceptions_by_source
                .iter()
                .filter(|(s, _)| s != crate::config::ip_masq_agent::LINK_LOCAL_KEY)
        };
        let n: usize = written().map(|(_, n)| n).sum();
        match policy.family(f) {
            None if n > 0 => w.push(format!(
                "{n} {f} exception(s) ({}) but no {f} pod CIDR: they have no effect",
                written()
                    .map(|(s, _)| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            None => {}
            Some(_) if n == 0 => w.push(format!(
                "no {f} exception: all {f} pod traffic leaving the node is masqueraded, \
                 even to pods on other nodes (set [masquerade] cluster_cidrs)"
            )),
            Some(fp) => {
                for pod in &fp.pod_cidrs {
                    if !fp.exception_cidrs.iter().any(|e| e.contains(pod)) {
                        w.push(format!(
                            "pod CIDR {pod} is not inside an exception: traffic between pods \
                             of this node through it would be masqueraded (add the cluster \
                             CIDR to [masquerade] cluster_cidrs)"
                        ));
                    }
                }
            }
        }
    }
    if let Some(env) = &cfg.flannel_subnet_env {
        if let Ok(text) = config::read_bounded(env) {
            if let Ok(e) = config::parse_subnet_env(env, &text) {
                w.extend(e.warnings);
            }
        }
    }
    w
}

impl Summary {
    /// The summary on one line, for the journal of a reload: per managed family its pod
    /// CIDRs and exception ranges, then the warnings counted.
    pub fn one_line(&self) -> String {
        let fams: Vec<String> = self
            .families
            .iter()
            .filter(|f| !f.pod_cidrs.is_empty())
            .map(|f| {
                let pods: Vec<String> = f.pod_cidrs.iter().map(|p| p.to_string()).collect();
                format!(
                    "{} pods {} with {} exception range(s)",
                    f.family,
                    pods.join(","),
                    f.exception_ranges
                )
            })
            .collect();
        let mut s = format!("{}: valid; {}", self.path, fams.join("; "));
        for w in &self.warnings {
            s.push_str(&format!("; warning: {w}"));
        }
        s
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}: valid", self.path)?;
        writeln!(f, "{:<23}{}", "backend mode:", self.mode)?;
        for fs in &self.families {
            if fs.pod_cidrs.is_empty() {
                writeln!(f, "{}: no pod CIDR, not managed", fs.family)?;
                continue;
            }
            let pods: Vec<String> = fs.pod_cidrs.iter().map(|p| p.to_string()).collect();
            writeln!(f, "{}:", fs.family)?;
            writeln!(f, "{:<23}{}", "  pod CIDRs:", pods.join(", "))?;
            writeln!(
                f,
                "{:<23}{} range(s) after aggregation",
                "  exceptions:", fs.exception_ranges
            )?;
            for (source, n) in &fs.exceptions_by_source {
                writeln!(f, "{n:>30}  {source}")?;
            }
        }
        let list = |v: &[String]| {
            if v.is_empty() {
                "none".to_string()
            } else {
                v.join(", ")
            }
        };
        writeln!(f, "{:<23}{}", "bridges:", list(&self.bridges))?;
        writeln!(f, "{:<23}{}", "honoured marks:", list(&self.honor_marks))?;
        for (k, v) in &self.options {
            writeln!(f, "{:<23}{v}", format!("{k}:"))?;
        }
        if self.warnings.is_empty() {
            writeln!(f, "{:<23}none", "warnings:")?;
        } else {
            writeln!(f, "warnings:")?;
            for w in &self.warnings {
                writeln!(f, "  - {w}")?;
            }
        }
        Ok(())
    }
}

/// The value `masqd check --reload` queues with its SIGHUP (sigqueue(3)), so that the daemon
/// tells it apart from a plain `kill -HUP` and acknowledges it.
pub const RELOAD_MAGIC: usize = 0x6d61_7371; // "masq"

/// The signal the daemon answers a reload request with when the new policy is in the kernel.
pub const RELOAD_ACK: libc::c_int = libc::SIGUSR1;
/// … and when it refused the configuration or could not apply it (it keeps the last good).
pub const RELOAD_NACK: libc::c_int = libc::SIGUSR2;

/// How long `check --reload` waits for the daemon's answer (systemd's default TimeoutSec is
/// 90 s; a reconcile of 1,000,000 exceptions takes a few seconds).
pub const RELOAD_ACK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Whether a signal read from the daemon's signalfd is a reload request of `check --reload`
/// (SIGHUP sent with sigqueue(3) and [`RELOAD_MAGIC`]).
pub fn is_reload_request(info: &libc::signalfd_siginfo) -> bool {
    info.ssi_signo == libc::SIGHUP as u32
        && info.ssi_code == libc::SI_QUEUE
        && info.ssi_ptr as usize == RELOAD_MAGIC
        && info.ssi_pid != 0
}

/// The daemon's answer to a reload request, sent after RELOADING=1 once the reload's reconcile
/// ended (`ok`: the new policy is in the kernel; else refused or failed): `kill -USR1` or
/// `kill -USR2 <requester>`. A requester gone meanwhile is no error.
pub fn acknowledge_reload(requester: Option<i32>, ok: bool) {
    let Some(pid) = requester else { return };
    let sig = if ok { RELOAD_ACK } else { RELOAD_NACK };
    // SAFETY: kill(2) has no memory effects.
    if unsafe { libc::kill(pid, sig) } != 0 {
        tracing::debug!(
            "acknowledging the reload request of pid {pid}: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// `masqd check --reload PID` after a successful check: `kill -HUP PID` (as sigqueue(3) with
/// [`RELOAD_MAGIC`]), then wait for the daemon's answer, which it sends after RELOADING=1 once
/// the reload's reconcile ended: exit 0 only when the new policy is in the kernel. systemd 252 waits for the READY=1 that ends a reload only when
/// RELOADING=1 arrived before ExecReload exited; a bare `kill -HUP` exits at once and races it.
pub fn request_reload(pid: i32) -> anyhow::Result<()> {
    use anyhow::Context;
    use nix::sys::signal::{SigSet, Signal};
    if pid <= 0 {
        anyhow::bail!("--reload {pid}: not a process id");
    }
    let mut ack = SigSet::empty();
    ack.add(Signal::SIGUSR1);
    ack.add(Signal::SIGUSR2);
    // Blocked before the request, so the answer waits for sigtimedwait below.
    ack.thread_block().context("blocking SIGUSR1 and SIGUSR2")?;
    let value = libc::sigval {
        sival_ptr: RELOAD_MAGIC as *mut libc::c_void,
    };
    // SAFETY: sigqueue(3) only sends a signal; `value` is a plain integer in a pointer.
    if unsafe { libc::sigqueue(pid, libc::SIGHUP, value) } != 0 {
        let e = std::io::Error::last_os_error();
        anyhow::bail!("sending SIGHUP to the daemon (pid {pid}): {e}");
    }
    let deadline = std::time::Instant::now() + RELOAD_ACK_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            anyhow::bail!(
                "the daemon (pid {pid}) did not acknowledge the SIGHUP within {}s",
                RELOAD_ACK_TIMEOUT.as_secs()
            );
        }
        let ts = libc::timespec {
            tv_sec: left.as_secs() as libc::time_t,
            tv_nsec: left.subsec_nanos() as libc::c_long,
        };
        // SAFETY: the set and the timespec are valid for the call; no siginfo is asked for.
        let r = unsafe { libc::sigtimedwait(ack.as_ref(), std::ptr::null_mut(), &ts) };
        if r == RELOAD_ACK {
            return Ok(());
        }
        if r == RELOAD_NACK {
            anyhow::bail!(
                "the daemon (pid {pid}) refused the configuration or could not put it into the \
                 kernel; it keeps its last good policy (journalctl -u masqd says why)"
            );
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) | Some(libc::EAGAIN) => continue,
            _ => return Err(e).context("waiting for the daemon's acknowledgement"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn cfg(text: &str) -> Config {
        config::parse(Path::new("/etc/masqd/masqd.toml"), text).unwrap()
    }

    #[test]
    fn counts_exceptions_per_family_and_source() {
        let s = summarize(&cfg(r#"
[node]
pod_cidrs = ["10.244.1.0/24"]
[masquerade]
cluster_cidrs = ["10.244.0.0/16", "10.96.0.0/12"]
nonmasquerade_cidrs = ["192.168.0.0/16", "fd00::/8"]
bridge_interfaces = ["docker0"]
"#));
        let v4 = &s.families[0];
        assert_eq!(
            v4.pod_cidrs,
            vec!["10.244.1.0/24".parse::<IpNet>().unwrap()]
        );
        assert_eq!(
            v4.exceptions_by_source,
            vec![
                ("cluster_cidrs".to_string(), 2),
                ("nonmasquerade_cidrs".to_string(), 1)
            ]
        );
        assert_eq!(v4.exception_ranges, 3);
        let v6 = &s.families[1];
        assert!(v6.pod_cidrs.is_empty());
        assert_eq!(
            v6.exceptions_by_source,
            vec![("nonmasquerade_cidrs".to_string(), 1)]
        );
        assert_eq!(s.bridges, vec!["docker0".to_string()]);
        assert_eq!(s.honor_marks, vec!["0x4000/0x4000".to_string()]);
        assert_eq!(s.warnings.len(), 1, "{:?}", s.warnings);
        assert!(
            s.warnings[0].contains("but no ipv6 pod CIDR"),
            "{:?}",
            s.warnings
        );
        let text = s.to_string();
        assert!(text.lines().count() < 25, "{text}");
        assert!(
            text.lines().any(|l| l.trim() == "2  cluster_cidrs"),
            "{text}"
        );
    }

    #[test]
    fn warns_about_pods_outside_the_exceptions_and_no_exceptions() {
        let s = summarize(&cfg(r#"
[node]
pod_cidrs = ["10.244.1.0/24", "fd10:1::/64"]
[masquerade]
cluster_cidrs = ["10.245.0.0/16"]
"#));
        assert!(s
            .warnings
            .iter()
            .any(|w| w.contains("10.244.1.0/24 is not inside")));
        assert!(
            s.warnings.iter().any(|w| w.starts_with("no ")),
            "{:?}",
            s.warnings
        );
    }
}
