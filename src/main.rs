//! The `masqd` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use masqd::config::DEFAULT_CONFIG_PATH;
use masqd::engine::{self, Paths};
use masqd::state::DEFAULT_STATE_DIR;

/// masqd keeps the pod-network masquerade policy of this node true: pod traffic leaving the
/// cluster is masqueraded, traffic to the cluster and other exception CIDRs keeps the pod's IP.
#[derive(Parser, Debug)]
#[command(name = "masqd", version, about, long_about = None)]
struct Cli {
    /// Configuration file (TOML).
    #[arg(long, global = true, value_name = "PATH", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Where masqd records the default rules it removed (for teardown).
    #[arg(long, global = true, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, global = true, value_name = "LEVEL")]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Make the kernel match the configuration (idempotent; exit 0 when done or in sync).
    Apply,
    /// Print what `apply` would change, nft-like; exit 0 when nothing, 2 when changes are
    /// pending, 1 on error.
    Plan,
    /// Show the backend, whether the kernel is in sync, set sizes and packet counters.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the ruleset masqd would install, as an `nft -f` file.
    Export,
    /// Remove masqd's table and put back the default rules it removed.
    Teardown,
    /// Run as a daemon (systemd Type=notify): apply, then keep the kernel true — on nftables
    /// change events, config file changes (inotify), SIGHUP and a resync timer. Exits 78 when
    /// the configuration is broken at start-up; leaves the rules in place when it stops.
    Run,
    /// Show which backend (nftables or legacy xtables) each family uses, the facts and why.
    Detect {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn init_tracing(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
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
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run) {
        masqd::daemon::unblock_signals();
    }
    // One-shot commands are quiet by default; the daemon logs its reconciles.
    let default = match cli.command {
        Command::Run => "info",
        _ => "warn",
    };
    init_tracing(cli.log_level.as_deref().unwrap_or(default));
    match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("masqd: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    let paths = Paths {
        config: cli.config.clone(),
        state_dir: cli.state_dir.clone(),
    };
    if let Command::Run = cli.command {
        return Ok(masqd::daemon::run(paths));
    }
    if let Command::Teardown = cli.command {
        let n = engine::teardown(&paths)?;
        println!("removed masqd's rules; restored {n} default rule(s)");
        return Ok(ExitCode::SUCCESS);
    }
    let (cfg, policy) = engine::load(&paths.config)?;
    match &cli.command {
        Command::Apply => {
            let p = engine::apply(&paths, &cfg, &policy)?;
            if p.is_empty() {
                println!("in sync: nothing to change");
            } else {
                print_changes(&p, false);
                tracing::info!(changes = p.len(), "applied");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Plan => {
            let mut sock = masqd::backend::nft::netlink::Socket::open()?;
            let p = engine::make_plan(&cfg, &policy, &mut sock)?;
            if p.is_empty() {
                println!("# in sync: nothing to change");
                return Ok(ExitCode::SUCCESS);
            }
            print_changes(&p, true);
            Ok(ExitCode::from(2))
        }
        Command::Status { json } => {
            let st = engine::status(&cfg, &policy)?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                println!("backend:              {}", st.backend);
                println!(
                    "in sync:              {}",
                    if st.in_sync {
                        "yes".to_string()
                    } else {
                        format!(
                            "no ({} pending changes; see `masqd plan`)",
                            st.pending_changes
                        )
                    }
                );
                for (name, n) in &st.sets {
                    if name.starts_with("legacy-") {
                        println!("chain {name:<15} {n} rule(s)");
                    } else {
                        println!("set {name:<17} {n} interval(s)");
                    }
                }
                println!("masqueraded packets:  {}", st.masqueraded_packets);
                println!("excepted packets:     {}", st.excepted_packets);
                println!("default rules left:   {}", st.default_rules_present);
                print_overridden(&st.overridden);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Detect { json } => {
            let mut sock = masqd::backend::nft::netlink::Socket::open()?;
            let p = engine::make_plan(&cfg, &policy, &mut sock)?;
            let overridden = p.overridden(&policy, &mut sock)?;
            let d = p.detection;
            if *json {
                let mut v = serde_json::to_value(&d)?;
                v["overridden"] = serde_json::to_value(&overridden)?;
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for f in masqd::policy::Family::ALL {
                    let fd = d.family(f);
                    println!("{f}: {} — {}", fd.backend, fd.reason);
                    println!("    guard                      {}", fd.guard);
                    println!(
                        "    system iptables            {}",
                        x_or_none(&fd.facts.system_iptables)
                    );
                    let x = &fd.facts;
                    for (b, p) in &x.binaries {
                        println!("    {b:<26} {}", p.as_deref().unwrap_or("(not found)"));
                    }
                    println!(
                        "    legacy tables loaded       {}",
                        if x.legacy_tables.is_empty() {
                            "(none)".to_string()
                        } else {
                            x.legacy_tables.join(", ")
                        }
                    );
                    println!("    legacy rules               {}", x.legacy_rules);
                    println!("    legacy hint chains         {:?}", x.legacy_hint_chains);
                    println!("    legacy masqd chain         {}", x.legacy_masqd);
                    if let Some(e) = &x.legacy_error {
                        println!("    legacy error               {e}");
                    }
                    println!("    nftables rules             {}", x.nft_rules);
                    println!("    nftables hint chains       {:?}", x.nft_hint_chains);
                    println!("    nftables masqd policy      {}", x.nft_masqd);
                }
                print_overridden(&overridden);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Export => {
            print!("{}", masqd::backend::nft::export(&policy));
            Ok(ExitCode::SUCCESS)
        }
        Command::Teardown | Command::Run => unreachable!("handled above"),
    }
}

fn x_or_none(s: &Option<String>) -> &str {
    s.as_deref().unwrap_or("(not found)")
}

fn print_overridden(list: &[masqd::foreign::Overridden]) {
    if list.is_empty() {
        println!("other NAT rules for the pod CIDRs: none");
        return;
    }
    println!("other NAT rules for the pod CIDRs:");
    for o in list {
        let handle = if o.backend == "legacy" {
            format!("rule {}", o.handle)
        } else {
            format!("handle {}", o.handle)
        };
        println!(
            "  {} {} {} {handle} ({}): {}",
            o.backend, o.table, o.chain, o.ip_family, o.rule
        );
        println!("      {}", o.reason);
    }
}

fn print_changes(p: &engine::Plan, full: bool) {
    for c in &p.nft {
        if full {
            println!("{c}");
        } else {
            println!("{}", c.summary());
        }
    }
    for (f, lp) in &p.legacy {
        let (_, restore, _) = masqd::backend::legacy::binary_names(*f);
        if full {
            println!("# {f}: {restore} --noflush --wait <<EOF");
            print!("{}", lp.payload.as_deref().unwrap_or_default());
            println!("EOF");
        } else {
            for s in &lp.summary {
                println!("{f} legacy: {s}");
            }
        }
    }
}
