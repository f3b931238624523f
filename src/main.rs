//! The `masqd` command line: clap definitions, logging set-up, error → exit code, and the
//! dispatch to the command bodies in `masqd::cli`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use masqd::cli::{self, exit::EX_USAGE, ExitClass};
use masqd::config::DEFAULT_CONFIG_PATH;
use masqd::engine::{self, Paths};
use masqd::policy::Family;
use masqd::state::DEFAULT_STATE_DIR;

/// masqd keeps the pod-network masquerade policy of this node true: pod traffic leaving the
/// cluster is masqueraded, traffic to the cluster and other exception CIDRs keeps the pod's IP.
#[derive(Parser, Debug)]
#[command(name = "masqd", version, about, long_about = None)]
struct Cli {
    /// Configuration file (TOML) [default: /etc/masqd/masqd.toml; not read when
    /// --ip-masq-agent-config is given without --config].
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    /// ip-masq-agent's configuration file (YAML or JSON, e.g. the ConfigMap mounted at
    /// /etc/config/ip-masq-agent; absent: upstream's defaults). Without --config it is the whole
    /// configuration (pod CIDRs from --pod-cidr, else flannel's /run/flannel/subnet.env); with
    /// --config it stands for `[node] ip_masq_agent_config`.
    #[arg(long, global = true, value_name = "PATH")]
    ip_masq_agent_config: Option<PathBuf>,
    /// This node's pod CIDR, with --ip-masq-agent-config and no --config (repeatable; none:
    /// FLANNEL_SUBNET and FLANNEL_IPV6_SUBNET of flannel's subnet.env).
    #[arg(long, global = true, value_name = "CIDR", requires = "ip_masq_agent_config",
          conflicts_with = "config", value_parser = parse_pod_cidr)]
    pod_cidr: Vec<ipnet::IpNet>,
    /// Where masqd records the default rules it removed (for teardown).
    #[arg(long, global = true, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Log level (default: info for `run`, warn for the others); RUST_LOG overrides it.
    #[arg(long, global = true, value_name = "LEVEL", ignore_case = true,
          value_parser = clap::builder::PossibleValuesParser::new(masqd::logging::LEVELS))]
    log_level: Option<String>,
    /// Where and how to log: the journal under systemd (auto), text or JSON lines on stderr.
    #[arg(long, global = true, value_name = "FORMAT", value_enum,
          default_value_t = masqd::logging::LogFormat::Auto)]
    log_format: masqd::logging::LogFormat,
    /// More log detail (-v: one level up, -vv: two).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Less log detail (-q: one level down, -qq: two).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    quiet: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Make the kernel match the configuration (idempotent; exit 0 when done or in sync).
    Apply,
    /// Print what `apply` would change, nft-like; exit 0 when nothing, 2 when changes are
    /// pending, 1 on error. Asks the running daemon (its control socket) first; without one
    /// it reads the kernel and says so on stderr.
    Plan {
        /// Read the kernel, do not ask the running daemon.
        #[arg(long)]
        direct: bool,
    },
    /// Show, per family, the backend, the sets and the connections masqueraded and kept; whether
    /// the kernel is in sync (exit 0) or not (exit 3); the default rules masqd removed and will
    /// restore; the other NAT rules for the pod CIDRs. Asks the running daemon (its control
    /// socket; answered from its mirror of masqd's sets, no dump) first; without one it reads
    /// the kernel and says so on stderr.
    Status {
        /// Print JSON (errors too: `{"error": "..."}` on stdout).
        #[arg(long)]
        json: bool,
        /// Read the kernel, do not ask the running daemon.
        #[arg(long)]
        direct: bool,
    },
    /// Print the policy as masqd installs it: an `nft -f` script that replaces masqd's table
    /// atomically, or the `iptables-legacy-restore --noflush` payload of a legacy family.
    Export {
        /// `nft` or `iptables`; default: what the detected backend uses.
        #[arg(long, value_enum)]
        format: Option<ExportFormat>,
        /// The family of the iptables payload (one restore file holds one family); default:
        /// the first family in legacy xtables.
        #[arg(long, value_enum)]
        family: Option<FamilyArg>,
    },
    /// Remove masqd's table and put back the default rules it removed.
    Teardown,
    /// Run as a daemon (systemd Type=notify): apply, then keep the kernel true — on nftables
    /// change events, config file changes (inotify), SIGHUP and a resync timer. Exits 78 when
    /// the configuration is broken at start-up; leaves the rules in place when it stops.
    Run,
    /// Validate the configuration and every file it names, and print the effective policy;
    /// exit 0 when valid, 1 when not (file:line as `apply` says it). Needs no root and never
    /// touches the kernel: the unit's ExecReload runs it before the SIGHUP.
    Check {
        /// When valid, ask the daemon PID to reload (SIGHUP) and wait until it has begun
        /// (told systemd RELOADING=1), so `systemctl reload` ends only with the new policy in
        /// the kernel: `ExecReload=masqd check --reload $MAINPID`.
        #[arg(long, value_name = "PID")]
        reload: Option<i32>,
    },
    /// Explain what happens to a new connection from SRC to DST on this node, read from the
    /// kernel as it is now: untouched, marked, kept (the exception range, the config line it
    /// came from, the rule) or masqueraded; and the other NAT rules that would have matched.
    /// Always read directly (the connection's addresses are looked up in masqd's sets one
    /// element each, no dump); the daemon is not asked.
    Explain {
        /// Source address.
        src: String,
        /// Destination address (same family as SRC).
        dst: String,
        /// The interface the connection leaves through (a bridge leaves it untouched).
        #[arg(long, value_name = "IFACE")]
        oif: Option<String>,
        /// The packet's mark, hexadecimal (0x…) or decimal.
        #[arg(long, value_name = "VALUE", allow_hyphen_values = true)]
        mark: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show which backend (nftables or legacy xtables) each family uses, the facts and why;
    /// works without a config file (then without the overridden rules).
    Detect {
        /// Print JSON (errors too: `{"error": "..."}` on stdout).
        #[arg(long)]
        json: bool,
    },
    /// Print the shell completion script for SHELL (bash, zsh, fish, elvish, powershell); the
    /// Debian package installs those of bash, zsh and fish.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page masqd(8), roff (how the package builds it).
    #[command(hide = true)]
    Manpage,
}

/// What `masqd export` prints.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum ExportFormat {
    /// An `nft -f` script.
    Nft,
    /// An `iptables-legacy-restore --noflush` payload.
    Iptables,
}

/// An address family on the command line.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum FamilyArg {
    /// IPv4.
    Ipv4,
    /// IPv6.
    Ipv6,
}

/// Blocks SIGHUP/SIGTERM/SIGINT before the Rust runtime starts (an ELF constructor), so that a
/// signal in the first moments of `masqd run` waits for the daemon's loop instead of killing
/// the process; `main` unblocks them for the one-shot commands.
#[used]
#[link_section = ".init_array"]
static BLOCK_SIGNALS_EARLY: extern "C" fn() = {
    extern "C" fn block() {
        masqd::daemon::block_signals();
    }
    block
};

fn main() -> ExitCode {
    // First of all (again, should the constructor not have run): SIGHUP/SIGTERM/SIGINT wait
    // for the daemon's loop; one-shot commands undo it.
    masqd::daemon::block_signals();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    if !matches!(cli.command, Command::Run) {
        masqd::daemon::unblock_signals();
    }
    // One-shot commands are quiet by default; the daemon logs its reconciles.
    let default = match cli.command {
        Command::Run => "info",
        _ => "warn",
    };
    let given = cli.log_level.as_deref().map(str::to_ascii_lowercase);
    let level = masqd::logging::effective_level(
        given.as_deref().unwrap_or(default),
        cli.verbose,
        cli.quiet,
    );
    masqd::logging::init(cli.log_format, level);
    let source = config_source(&cli);
    let paths = Paths {
        config: source.path().to_path_buf(),
        source,
        state_dir: cli.state_dir.clone(),
    };
    if let Command::Run = cli.command {
        return masqd::daemon::run(paths);
    }
    if let Some(code) = print_docs(&cli.command) {
        return code;
    }
    match dispatch(&cli.command, &paths) {
        Ok(code) => ExitCode::from(code),
        Err(e) => report_error(&cli.command, &e),
    }
}

/// `--pod-cidr`: a CIDR as masqd.toml's `[node] pod_cidrs` takes it.
fn parse_pod_cidr(s: &str) -> Result<ipnet::IpNet, String> {
    masqd::config::parse_cidr(s)
}

/// Where the configuration comes from: masqd.toml (with ip-masq-agent's file standing for its
/// `[node] ip_masq_agent_config` when both are given), or ip-masq-agent's file alone.
fn config_source(cli: &Cli) -> masqd::config::Source {
    use masqd::config::Source;
    match (&cli.config, &cli.ip_masq_agent_config) {
        (None, Some(file)) => Source::Agent {
            file: file.clone(),
            pod_cidrs: cli.pod_cidr.clone(),
            flannel_subnet_env: PathBuf::from(masqd::config::DEFAULT_FLANNEL_SUBNET_ENV),
        },
        (path, agent) => Source::Toml {
            path: path
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH)),
            agent: agent.clone(),
        },
    }
}

/// `completions` and `manpage`: generated from these clap definitions (clap_complete,
/// clap_mangen), so they never disagree with `--help`.
fn print_docs(command: &Command) -> Option<ExitCode> {
    use clap::CommandFactory;
    use std::io::Write;
    let mut cmd = Cli::command();
    // Into a buffer first: clap_complete panics on a failed write (a closed pipe).
    let mut buf = Vec::new();
    let rendered = match command {
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut cmd, "masqd", &mut buf);
            Ok(())
        }
        Command::Manpage => clap_mangen::Man::new(cmd).section("8").render(&mut buf),
        _ => return None,
    };
    let written = rendered.and_then(|()| std::io::stdout().lock().write_all(&buf));
    Some(match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            masqd::logging::report_error(&format!("writing to stdout: {e}"));
            ExitCode::from(1)
        }
    })
}

/// `--help` and `--version` print and exit 0; any other parse error exits 64 (EX_USAGE).
fn usage_error(e: clap::Error) -> ExitCode {
    let _ = e.print();
    if e.use_stderr() {
        ExitCode::from(EX_USAGE)
    } else {
        ExitCode::SUCCESS
    }
}

/// Prints an error (as `{"error": "..."}` on stdout under `--json`) and returns its exit code
/// (1). A refusal for lack of privilege says what masqd needs.
fn report_error(command: &Command, e: &anyhow::Error) -> ExitCode {
    let msg = cli::exit::message(e);
    let json = matches!(
        command,
        Command::Status { json: true, .. }
            | Command::Detect { json: true }
            | Command::Explain { json: true, .. }
    );
    if json {
        println!("{}", serde_json::json!({ "error": msg }));
    } else {
        // At priority err in the journal under systemd, `masqd: error: …` on stderr otherwise.
        masqd::logging::report_error(&msg);
    }
    ExitCode::from(ExitClass::of(e).code())
}

/// Runs a one-shot command; its exit code.
fn dispatch(command: &Command, paths: &Paths) -> anyhow::Result<u8> {
    match command {
        Command::Run | Command::Completions { .. } | Command::Manpage => {
            unreachable!("handled in main")
        }
        Command::Check { reload } => cli::check::check(&paths.source, *reload),
        Command::Teardown => cli::teardown::teardown(paths),
        Command::Detect { json } => cli::detect::detect(&paths.source, *json),
        Command::Explain {
            src,
            dst,
            oif,
            mark,
            json,
        } => cli::check::explain(
            paths,
            cli::check::ExplainArgs {
                src,
                dst,
                oif: oif.as_deref(),
                mark: mark.as_deref(),
                json: *json,
            },
        ),
        Command::Apply => {
            let (cfg, policy) = engine::load(&paths.source)?;
            cli::apply::apply(paths, &cfg, &policy)
        }
        Command::Plan { direct } => cli::apply::plan_cmd(paths, *direct),
        Command::Status { json, direct } => cli::apply::status_cmd(paths, *json, *direct),
        Command::Export { format, family } => {
            let (cfg, policy) = engine::load(&paths.source)?;
            let format = format.map(|f| match f {
                ExportFormat::Nft => cli::export::Format::Nft,
                ExportFormat::Iptables => cli::export::Format::Iptables,
            });
            let family = family.map(|f| match f {
                FamilyArg::Ipv4 => Family::V4,
                FamilyArg::Ipv6 => Family::V6,
            });
            cli::export::export(&cfg, &policy, format, family)
        }
    }
}
