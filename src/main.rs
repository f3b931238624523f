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
    /// pending, 1 on error.
    Plan,
    /// Show, per family, the backend, the sets and the connections masqueraded and kept; whether
    /// the kernel is in sync (exit 0) or not (exit 3); the default rules masqd removed and will
    /// restore; the other NAT rules for the pod CIDRs.
    Status {
        /// Print JSON (errors too: `{"error": "..."}` on stdout).
        #[arg(long)]
        json: bool,
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

/// Exit code of a usage error (sysexits.h EX_USAGE), so that `plan`'s 2 means only "changes
/// pending".
const EX_USAGE: u8 = 64;

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
    match run(&cli) {
        Ok(code) => code,
        Err(e) => report_error(&cli, &e),
    }
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

/// Prints an error (as `{"error": "..."}` on stdout under `--json`) and returns exit code 1. A
/// refusal for lack of privilege says what masqd needs.
fn report_error(cli: &Cli, e: &anyhow::Error) -> ExitCode {
    let mut msg = format!("{e:#}");
    if lacks_privilege(e) {
        msg = format!(
            "masqd needs root or CAP_NET_ADMIN (and CAP_NET_RAW for legacy iptables): {msg}"
        );
    }
    let json = matches!(
        cli.command,
        Command::Status { json: true }
            | Command::Detect { json: true }
            | Command::Explain { json: true, .. }
    );
    if json {
        println!("{}", serde_json::json!({ "error": msg }));
    } else {
        // At priority err in the journal under systemd, `masqd: error: …` on stderr otherwise.
        masqd::logging::report_error(&msg);
    }
    ExitCode::from(1)
}

/// Whether masqd was refused for lack of privilege: EPERM/EACCES from netlink or from the state
/// directory (root's), or a legacy binary that says so ("Permission denied (you must be
/// root)"). A configuration file that cannot be read is a `ConfigError`, not one of these.
fn lacks_privilege(e: &anyhow::Error) -> bool {
    use masqd::backend::nft::netlink::NlError;
    use masqd::exec::ExecError;
    let denied = |n: i32| n == libc::EPERM || n == libc::EACCES;
    e.chain().any(|c| {
        if let Some(n) = c.downcast_ref::<NlError>() {
            return match n {
                NlError::Kernel { errno, .. } => denied(*errno),
                NlError::Io { source, .. } => source.raw_os_error().is_some_and(denied),
                _ => false,
            };
        }
        if let Some(ExecError::Failed { stderr, .. }) = c.downcast_ref::<ExecError>() {
            return stderr.contains("Permission denied") || stderr.contains("you must be root");
        }
        // The state directory and its locks belong to root.
        c.downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
            .is_some_and(denied)
    })
}

fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    let paths = Paths {
        config: cli.config.clone(),
        state_dir: cli.state_dir.clone(),
    };
    if let Command::Run = cli.command {
        return Ok(masqd::daemon::run(paths));
    }
    if let Command::Check { reload } = cli.command {
        let cfg = masqd::config::load(&paths.config)?;
        let summary = masqd::check::summarize(&cfg);
        if reload.is_none() {
            print!("{summary}");
        } else {
            // A reload's line in the journal; `masqd check` shows the whole screen.
            println!("{}", summary.one_line());
        }
        if let Some(pid) = reload {
            masqd::check::request_reload(pid)?;
            println!("daemon (pid {pid}) is reloading");
        }
        return Ok(ExitCode::SUCCESS);
    }
    if let Command::Teardown = cli.command {
        return teardown(&paths);
    }
    if let Command::Detect { json } = cli.command {
        if config_missing(&paths.config) {
            let note = format!("no config file at {}", paths.config.display());
            return detect_without_config(json, &note);
        }
        // An invalid configuration does not hide the facts: detection without a policy,
        // saying why (the error itself is what `masqd check` is for).
        if let Err(e) = engine::load(&paths.config) {
            return detect_without_config(json, &format!("the configuration is invalid ({e})"));
        }
    }
    if let Command::Explain {
        src,
        dst,
        oif,
        mark,
        json,
    } = &cli.command
    {
        return explain(&paths, src, dst, oif.as_deref(), mark.as_deref(), *json);
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
        Command::Status { json } => status(&paths, &cfg, &policy, *json),
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
                print_detection(&d);
                print_overridden(&overridden);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Export { format, family } => export(&cfg, &policy, *format, *family),
        Command::Teardown | Command::Run | Command::Check { .. } | Command::Explain { .. } => {
            unreachable!("handled above")
        }
    }
}

/// `masqd explain`: the query is checked before the configuration is read (bad input exits 1
/// without root), then the kernel is asked.
fn explain(
    paths: &Paths,
    src: &str,
    dst: &str,
    oif: Option<&str>,
    mark: Option<&str>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let q = masqd::explain::Query::parse(src, dst, oif, mark).map_err(anyhow::Error::msg)?;
    let (cfg, policy) = engine::load(&paths.config)?;
    let e = masqd::explain::explain(&cfg, &policy, &q)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&e)?);
    } else {
        print!("{}", masqd::explain::render(&e));
    }
    Ok(ExitCode::SUCCESS)
}

/// Exit code of `status` when the kernel does not match the policy.
const OUT_OF_SYNC: u8 = 3;

/// `masqd status`: exit 0 in sync, 3 out of sync.
fn status(
    paths: &Paths,
    cfg: &masqd::config::Config,
    policy: &masqd::policy::Policy,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let st = engine::status(paths, cfg, policy)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&st)?);
    } else {
        print_status(&st);
    }
    Ok(if st.in_sync {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(OUT_OF_SYNC)
    })
}

fn print_status(st: &engine::Status) {
    println!("backend:              {}", st.backend);
    if st.in_sync {
        println!("in sync:              yes");
    } else {
        println!(
            "in sync:              no ({} pending changes; see `masqd plan`)",
            st.pending_changes
        );
    }
    for (f, fs) in [("ipv4", &st.ipv4), ("ipv6", &st.ipv6)] {
        let Some(fs) = fs else { continue };
        println!("{f} ({}):", fs.backend);
        for (name, n) in &fs.sets {
            if name == "legacy-chain" {
                println!("  chain MASQD-POSTROUTING   {n} rule(s)");
            } else {
                println!("  set {name:<21} {n} interval(s)");
            }
        }
        println!("  masqueraded connections   {}", fs.masqueraded_connections);
        println!("  kept connections          {}", fs.kept_connections);
    }
    println!("default rules left:   {}", st.default_rules_present);
    if st.removed_rules.is_empty() {
        println!("removed default rules (restored by teardown): none recorded");
    } else {
        println!("removed default rules (restored by teardown):");
        for r in &st.removed_rules {
            println!("  {r}");
        }
    }
    print_overridden(&st.overridden);
}

/// `masqd teardown`: names every rule it put back and every object it removed; warns when the
/// state directory holds no record.
fn teardown(paths: &Paths) -> anyhow::Result<ExitCode> {
    let r = engine::teardown(paths)?;
    if r.no_record {
        eprintln!(
            "masqd: warning: the state directory {} holds no record of removed default rules: \
             nothing to restore (if masqd removed one and its record is lost, put it back by hand)",
            paths.state_dir.display()
        );
    }
    for x in &r.restored {
        println!("restored: {x}");
    }
    for x in &r.already_present {
        println!("already present (not added again): {x}");
    }
    for x in &r.removed {
        println!("removed: {x}");
    }
    if r.removed.is_empty() {
        println!("removed: nothing (no masqd rules were installed)");
    }
    println!(
        "teardown: restored {} default rule(s), {} already present; removed {} object(s) of \
         masqd's",
        r.restored.len(),
        r.already_present.len(),
        r.removed.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// Whether the config file does not exist (a file that exists but cannot be read is an error
/// of its own).
fn config_missing(path: &std::path::Path) -> bool {
    matches!(std::fs::symlink_metadata(path), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
}

/// `masqd detect` with no config file: both families' facts and decisions, with no policy.
fn detect_without_config(json: bool, why: &str) -> anyhow::Result<ExitCode> {
    let mut sock = masqd::backend::nft::netlink::Socket::open()?;
    let d = engine::detect_without_policy(&mut sock)?;
    let note = format!(
        "{why}: detection without a policy (backend.mode auto, no pod CIDRs); the overridden \
         rules need the pod CIDRs and are not listed"
    );
    if json {
        let mut v = serde_json::to_value(&d)?;
        v["note"] = serde_json::Value::String(note);
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("# {note}");
        print_detection(&d);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_detection(d: &engine::Detection) {
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
}

/// `masqd export`: the nftables part of the policy as detection places it (the guard only for
/// a family in legacy xtables), or a legacy family's restore payload.
fn export(
    cfg: &masqd::config::Config,
    policy: &masqd::policy::Policy,
    format: Option<ExportFormat>,
    family: Option<FamilyArg>,
) -> anyhow::Result<ExitCode> {
    use masqd::detect::Backend;
    use masqd::policy::Family;
    if cfg.mode == masqd::config::BackendMode::Nft && format != Some(ExportFormat::Iptables) {
        // Every family is in nftables: nothing to detect, the kernel is not asked.
        print!("{}", masqd::backend::nft::export(policy));
        return Ok(ExitCode::SUCCESS);
    }
    let mut sock = masqd::backend::nft::netlink::Socket::open()?;
    let d = engine::detect(cfg, policy, &mut sock)?;
    let legacy: Vec<Family> = d
        .families(Backend::Legacy)
        .into_iter()
        .filter(|f| policy.family(*f).is_some())
        .collect();
    let format = format.unwrap_or(if legacy.is_empty() {
        ExportFormat::Nft
    } else {
        ExportFormat::Iptables
    });
    if format == ExportFormat::Nft {
        let guard: Vec<Family> = legacy
            .iter()
            .copied()
            .filter(|f| d.family(*f).has_guard())
            .collect();
        let nft_policy = policy.nft_part(&d.families(Backend::Nft), &guard);
        print!("{}", masqd::backend::nft::export(&nft_policy));
        return Ok(ExitCode::SUCCESS);
    }
    let f = match family {
        Some(FamilyArg::Ipv4) => Family::V4,
        Some(FamilyArg::Ipv6) => Family::V6,
        None => legacy.first().copied().unwrap_or(Family::V4),
    };
    let fp = policy.family(f).ok_or_else(|| {
        anyhow::anyhow!(
            "no {f} pod CIDRs in {}: no {f} policy to export",
            cfg.path.display()
        )
    })?;
    let lo = match masqd::backend::legacy::binaries(f) {
        Some(bins) => masqd::backend::legacy::observe(f, &bins)?,
        None => Default::default(),
    };
    if d.family(f).backend != Backend::Legacy {
        eprintln!(
            "masqd: warning: {f} is not in legacy xtables on this node (backend {}): this \
             payload is not what masqd installs here",
            d.family(f).backend
        );
    }
    let mut notes: Vec<String> = legacy
        .iter()
        .filter(|o| **o != f)
        .map(|o| format!("the {o} policy: masqd export --format iptables --family {o}"))
        .collect();
    if d.family(f).has_guard() {
        notes.push("the guard in nftables: masqd export --format nft".into());
    }
    let (bridges, random_fully) = (&policy.bridges, policy.random_fully);
    let text = masqd::backend::legacy::export(f, fp, bridges, random_fully, &lo, &notes);
    print!("{text}");
    Ok(ExitCode::SUCCESS)
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
