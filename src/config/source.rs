//! Where the configuration comes from: masqd.toml ([`Source::Toml`]) or, with no masqd.toml,
//! ip-masq-agent's file alone ([`Source::Agent`], [`load_agent_mode`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ipnet::IpNet;

use super::{
    combine, load_agent_file, load_subnet_env, load_toml, Config, ConfigError, Named, Origin,
    Sources,
};

/// Where the configuration comes from (the command line decides).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// masqd.toml at `path`; `agent` (`--ip-masq-agent-config` with `--config`) stands for its
    /// `[node] ip_masq_agent_config`.
    Toml {
        /// The TOML file.
        path: PathBuf,
        /// ip-masq-agent's file given on the command line.
        agent: Option<PathBuf>,
    },
    /// No masqd.toml: ip-masq-agent's file ([`load_agent_mode`]).
    Agent {
        /// ip-masq-agent's file (absent: upstream's defaults).
        file: PathBuf,
        /// `--pod-cidr`; none: flannel's subnet.env.
        pod_cidrs: Vec<IpNet>,
        /// flannel's subnet.env, read when there is no `--pod-cidr`.
        flannel_subnet_env: PathBuf,
    },
}

impl Source {
    /// masqd.toml at `path`.
    pub fn toml(path: &Path) -> Source {
        Source::Toml {
            path: path.to_path_buf(),
            agent: None,
        }
    }

    /// The file messages name first and a daemon watches first: masqd.toml, or in agent mode
    /// ip-masq-agent's file.
    pub fn path(&self) -> &Path {
        match self {
            Source::Toml { path, .. } => path,
            Source::Agent { file, .. } => file,
        }
    }

    /// Reads and validates the configuration (and every file it names).
    pub fn load(&self) -> Result<Config, ConfigError> {
        match self {
            Source::Toml { path, agent } => load_toml(path, agent.as_deref()),
            Source::Agent {
                file,
                pod_cidrs,
                flannel_subnet_env,
            } => load_agent_mode(file, pod_cidrs, flannel_subnet_env),
        }
    }
}

/// Where `masqd run --ip-masq-agent-config` takes this node's pod CIDRs from when no
/// `--pod-cidr` is given.
pub const DEFAULT_FLANNEL_SUBNET_ENV: &str = "/run/flannel/subnet.env";

/// The configuration without a masqd.toml: the exceptions and the resync interval from
/// ip-masq-agent's file at `agent` (absent: upstream's defaults), the pod CIDRs from `pods`
/// (`--pod-cidr`) or, when there are none, from flannel's subnet.env at `flannel` (its
/// FLANNEL_NETWORK an exception too, as with `[node] flannel_subnet_env`); every other setting
/// at its masqd.toml default. Errors name the agent file (or subnet.env) and the key.
pub fn load_agent_mode(
    agent: &Path,
    pods: &[IpNet],
    flannel: &Path,
) -> Result<Config, ConfigError> {
    let mut toml = super::toml::parse(agent, "")?;
    let cli: Arc<Path> = Path::new("command line").into();
    toml.pods = pods
        .iter()
        .map(|net| Origin {
            net: *net,
            file: cli.clone(),
            line: None,
            key: "--pod-cidr",
        })
        .collect();
    let mut sources = Sources::default();
    let named = |path: &Path, key| Named {
        path: path.to_path_buf(),
        key,
        at: "command line".to_string(),
    };
    if pods.is_empty() {
        let n = named(flannel, "flannel's subnet.env");
        let env = load_subnet_env(&n.path).map_err(|mut e| {
            e.message.push_str(
                " (with --ip-masq-agent-config and no --pod-cidr, this node's pod CIDRs come \
                 from flannel's subnet.env)",
            );
            e
        })?;
        sources.flannel = Some((n, env));
    }
    let n = named(agent, "--ip-masq-agent-config");
    let a = load_agent_file(&n.path)?;
    sources.agent = Some((n, a));
    combine(&mut toml, sources)
}
