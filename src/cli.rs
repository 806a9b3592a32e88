//! The command line: what each subcommand takes (clap derive), how it reports, and its exit
//! status.
//!
//! `status`, `sessions` and `pinholes` talk to the running daemon over its control socket
//! (`control.rs`); `pinholes list` falls back to reading the kernel when the daemon is not
//! running, and says so.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};

use crate::config::{Config, LogFormat, Mode, DEFAULT_CONFIG, DEFAULT_CONTROL_SOCKET};
use crate::control::{self, Answer, ClientError, ErrorKind, Request, Status};
use crate::pinhole::{nft, PinholeEntry, PinholeId, PinholeKind, PinholeState};
use crate::registry::{SessionId, SessionInfo};

/// Exit statuses, stable for scripts.
pub mod exit {
    /// Done.
    pub const OK: u8 = 0;
    /// Failed: bad configuration, the firewall refused, and the like; the message says why.
    pub const FAILURE: u8 = 1;
    /// The command line did not parse (clap's own status).
    pub const USAGE: u8 = 2;
    /// The daemon is not running (no control socket answers).
    pub const NOT_RUNNING: u8 = 3;
    /// No session or pinhole with that id.
    pub const NOT_FOUND: u8 = 4;
    /// `sniff --timeout` ran out before `--count` announcements were seen.
    pub const TIMED_OUT: u8 = 5;
}

const EXIT_STATUSES: &str = "Exit status: 0 done, 1 failed, 2 usage error, \
                             3 the daemon is not running, 4 no such session or pinhole, \
                             5 sniff --timeout ran out before --count announcements.";

/// FTP application layer gateway: rewrites PORT/EPRT/PASV/EPSV on the control channel and opens
/// short-lived nftables pinholes for exactly the announced data connections.
#[derive(Debug, Parser)]
#[command(name = "ftp-alg", version, after_help = EXIT_STATUSES)]
pub struct Cli {
    /// The daemon's control socket (`[control] socket` in its configuration).
    #[arg(long, global = true, env = "FTP_ALG_SOCKET", default_value = DEFAULT_CONTROL_SOCKET)]
    pub socket: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground (logs to the journal under systemd, else to stderr;
    /// `log.level` or RUST_LOG sets the level). SIGHUP reloads the configuration file.
    Run {
        /// Configuration file; without it, /etc/ftp-alg/ftp-alg.toml if that exists, else the
        /// built-in default: gateway mode on port 2121.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Log format, overriding `[log] format`.
        #[arg(long, value_enum)]
        log_format: Option<LogFormat>,
        /// Take the listening sockets over from the daemon running at the control socket
        /// (an upgrade or a restart that refuses no client): it stops accepting and serves its
        /// open sessions to their end (`limits.handover_grace_secs`), then exits.
        #[arg(long)]
        take_over: bool,
    },
    /// Check a configuration file and say what it sets up; exits 1 on the first error.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
    /// The running daemon's mode, listeners, sessions and pinholes.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The running daemon's control sessions.
    Sessions {
        #[command(subcommand)]
        command: SessionsCommand,
    },
    /// Inspect and close pinholes.
    Pinholes {
        #[command(subcommand)]
        command: PinholesCommand,
    },
    /// Print a shell completion script to stdout.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write man pages (ftp-alg.1, one per subcommand, and ftp-alg.toml.5) into a directory.
    Manpages {
        /// Where to write them; created if missing.
        dir: PathBuf,
    },
    /// Watch FTP control traffic on an interface (read-only, no proxying) and say for each
    /// PORT, EPRT, 227 and 229 whether a pinhole lets its data connection through (needs
    /// CAP_NET_RAW and CAP_NET_ADMIN).
    Sniff(crate::sniff::SniffArgs),
    /// Show ftp-alg at work: client, gateway and server in throw-away network namespaces, a
    /// passive and an active transfer through a default-deny firewall (needs root).
    #[cfg(feature = "demo")]
    Demo,
    /// The demo's FTP server (run by `demo`).
    #[cfg(feature = "demo")]
    #[command(hide = true)]
    DemoServer(crate::demo::server::ServerArgs),
    /// The demo's FTP client (run by `demo`).
    #[cfg(feature = "demo")]
    #[command(hide = true)]
    DemoClient(crate::demo::client::ClientArgs),
}

#[derive(Debug, Subcommand)]
pub enum SessionsCommand {
    /// List the control sessions open now.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// End a session: its client gets 421, both connections close, its pinholes are removed.
    Kill {
        /// The session's id (from `sessions list`).
        id: SessionId,
    },
}

#[derive(Debug, Subcommand)]
pub enum PinholesCommand {
    /// List every pinhole in the kernel: waiting for its one connection, or used (its
    /// translation lasts until the transfer ends). Without a running daemon, reads the kernel
    /// directly and says so (ids are then unknown).
    List {
        /// Print JSON (an array of pinholes) instead of a table.
        #[arg(long)]
        json: bool,
        /// Refresh until interrupted (JSON: one array per line).
        #[arg(long)]
        watch: bool,
        /// Seconds between refreshes with --watch (0.1 to 3600).
        #[arg(long, default_value_t = 1.0, requires = "watch", value_parser = parse_interval)]
        interval: f64,
        /// Stop after this many refreshes with --watch.
        #[arg(long, requires = "watch")]
        count: Option<u64>,
        /// The nft executable, when reading the kernel directly.
        #[arg(long, default_value = "nft")]
        nft: PathBuf,
    },
    /// Remove one pinhole now (a connection already under way keeps flowing).
    Close {
        /// The pinhole's id (from `pinholes list`).
        id: PinholeId,
    },
    /// Remove every pinhole the daemon holds now.
    Flush,
}

/// `sniff --timeout` ran out before `--count` announcements.
#[derive(Debug, thiserror::Error)]
#[error("--timeout ran out before --count announcements were seen")]
struct CountNotReached;

/// An error answer from the daemon.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
struct Refused {
    kind: ErrorKind,
    message: String,
}

/// Run the command line and say how it went.
pub async fn main(cli: Cli) -> ExitCode {
    // `run` sets logging up from its configuration.
    if !matches!(cli.command, Command::Run { .. }) {
        crate::logging::init(LogFormat::Human, crate::config::DEFAULT_LOG_LEVEL);
    }
    let result = dispatch(cli.command, &cli.socket).await;
    match result {
        Ok(()) => ExitCode::from(exit::OK),
        Err(e) => {
            eprintln!("ftp-alg: {}", report(&e));
            if matches!(
                e.downcast_ref::<ClientError>(),
                Some(ClientError::NotRunning { .. })
            ) {
                eprintln!(
                    "hint: start it with `ftp-alg run --config FILE` (or `systemctl start ftp-alg`), \
                     or point --socket at its `[control] socket`"
                );
            }
            ExitCode::from(exit_status(&e))
        }
    }
}

/// The error and its causes on one line, each cause once: most error types here already
/// include their source's text in their own message.
fn report(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.is_empty() {
            line = text;
        } else if !line.contains(&text) {
            line = format!("{line}: {text}");
        }
    }
    line
}

fn exit_status(e: &anyhow::Error) -> u8 {
    match (e.downcast_ref::<ClientError>(), e.downcast_ref::<Refused>()) {
        (Some(ClientError::NotRunning { .. }), _) => exit::NOT_RUNNING,
        (
            _,
            Some(Refused {
                kind: ErrorKind::NotFound,
                ..
            }),
        ) => exit::NOT_FOUND,
        _ if e.is::<CountNotReached>() => exit::TIMED_OUT,
        _ => exit::FAILURE,
    }
}

async fn run(
    config: Option<PathBuf>,
    log_format: Option<LogFormat>,
    take_over: bool,
) -> anyhow::Result<()> {
    let source = config_source(config, Path::new(DEFAULT_CONFIG));
    let config = match &source {
        Some(path) => Config::load(path)?,
        None => Config::builtin_gateway(),
    };
    let log = crate::logging::init(log_format.unwrap_or(config.log.format), &config.log.level);
    match &source {
        Some(path) => tracing::info!("configuration: {}", path.display()),
        None => tracing::info!(
            "configuration: built-in default, gateway mode on port 2121 ({DEFAULT_CONFIG} does not exist)"
        ),
    }
    crate::daemon::run(config, take_over, source, log).await
}

/// The file `run` reads: `--config`, else `default` if it exists, else none (the built-in
/// configuration).
fn config_source(given: Option<PathBuf>, default: &Path) -> Option<PathBuf> {
    given.or_else(|| default.exists().then(|| default.to_owned()))
}

async fn dispatch(command: Command, socket: &Path) -> anyhow::Result<()> {
    match command {
        Command::Run {
            config,
            log_format,
            take_over,
        } => run(config, log_format, take_over).await,
        Command::CheckConfig { file } => check_config(&file),
        Command::Status { json } => {
            let status = match ask(socket, &Request::Status).await? {
                Answer::Status(status) => status,
                other => return Err(unexpected(other)),
            };
            print(json, &status, |out| write_status(out, &status))
        }
        Command::Sessions {
            command: SessionsCommand::List { json },
        } => {
            let sessions = match ask(socket, &Request::Sessions).await? {
                Answer::Sessions { sessions } => sessions,
                other => return Err(unexpected(other)),
            };
            print(json, &sessions, |out| write_sessions(out, &sessions))
        }
        Command::Sessions {
            command: SessionsCommand::Kill { id },
        } => match ask(socket, &Request::KillSession { id }).await? {
            Answer::Killed { id } => {
                println!("session {id} is ending");
                Ok(())
            }
            other => Err(unexpected(other)),
        },
        Command::Pinholes {
            command:
                PinholesCommand::List {
                    json,
                    watch,
                    interval,
                    count,
                    nft,
                },
        } => {
            let refresh = watch.then(|| Watch {
                every: Duration::from_secs_f64(interval),
                count,
            });
            list_pinholes(socket, &nft, json, refresh).await
        }
        Command::Pinholes {
            command: PinholesCommand::Close { id },
        } => closed(ask(socket, &Request::ClosePinhole { id }).await?),
        Command::Pinholes {
            command: PinholesCommand::Flush,
        } => closed(ask(socket, &Request::FlushPinholes).await?),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "ftp-alg",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Manpages { dir } => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(Cli::command(), &dir)
                .with_context(|| format!("writing man pages into {}", dir.display()))?;
            let config_page = dir.join("ftp-alg.toml.5");
            std::fs::write(&config_page, crate::manpage::config_page()?)
                .with_context(|| format!("writing {}", config_page.display()))?;
            println!("man pages written to {}", dir.display());
            Ok(())
        }
        Command::Sniff(args) => match crate::sniff::run(args).await? {
            crate::sniff::Outcome::Done => Ok(()),
            crate::sniff::Outcome::CountNotReached => Err(CountNotReached.into()),
        },
        #[cfg(feature = "demo")]
        Command::Demo => crate::demo::run().await,
        #[cfg(feature = "demo")]
        Command::DemoServer(args) => crate::demo::server::run(args).await,
        #[cfg(feature = "demo")]
        Command::DemoClient(args) => crate::demo::client::run(args).await,
    }
}

/// Ask the daemon; an error answer becomes an error.
async fn ask(socket: &Path, request: &Request) -> anyhow::Result<Answer> {
    match control::call(socket, request).await? {
        Answer::Error { kind, message } => Err(Refused { kind, message }.into()),
        answer => Ok(answer),
    }
}

fn unexpected(answer: Answer) -> anyhow::Error {
    anyhow::anyhow!("unexpected answer from the daemon: {answer:?}")
}

fn closed(answer: Answer) -> anyhow::Result<()> {
    match answer {
        Answer::Closed { ids } if ids.is_empty() => println!("no pinholes were open"),
        Answer::Closed { ids } => {
            let ids: Vec<String> = ids.iter().map(u64::to_string).collect();
            println!("closed pinholes {}", ids.join(", "));
        }
        other => return Err(unexpected(other)),
    }
    Ok(())
}

/// Print `value` as pretty JSON, or as text with `human`.
fn print<T: serde::Serialize>(
    json: bool,
    value: &T,
    human: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, value)?;
        writeln!(out)?;
    } else {
        human(&mut out)?;
    }
    Ok(())
}

/// `check-config FILE`.
pub fn check_config(file: &Path) -> anyhow::Result<()> {
    let config = Config::load(file)?;
    config
        .check_host(&crate::upstream::interface_names())
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    // The certificate and key are read as `run` reads them, so a bad file fails here too.
    let tls = match &config.tls {
        Some(tls) => Some((tls, crate::tls::Terminator::load(tls)?)),
        None => None,
    };
    // So is the CA file of a TLS upstream.
    let upstream_tls = match (&config.tls, config.proxy.upstream) {
        (Some(tls), Some(server)) => crate::tls::Upstream::load(tls, server)?,
        _ => None,
    };
    let p = &config.proxy;
    println!("{}: ok", file.display());
    println!("  mode:     {}", p.mode);
    for addr in &p.listen {
        println!("  listen:   {addr}");
    }
    if let Some(upstream) = p.upstream {
        println!("  upstream: {upstream}");
    }
    if let Some(announce) = p.announce {
        println!("  announce: {announce}");
    }
    if !p.intercept.is_empty() {
        println!("  intercept tcp/21 on: {}", p.intercept.join(", "));
    }
    for source in &p.upstream_source {
        println!("  upstream source: {source}");
    }
    if p.mode == Mode::Gateway {
        println!(
            "  upstream: socket mark {:#010x}, local destinations {}",
            p.upstream_mark,
            if config.policy.allow_local_servers {
                "allowed"
            } else {
                "refused"
            }
        );
    }
    let ph = &config.pinholes;
    println!(
        "  pinholes: ports {}-{} (shared by every peer), timeout {} s, wait for a port {} ms, \
         a server's port avoided for {} s, ct mark {:#010x} (mask {:#010x}), backend {}",
        ph.port_min,
        ph.port_max,
        ph.timeout_secs,
        ph.port_wait_ms,
        ph.reuse_delay_secs,
        ph.ct_mark,
        ph.ct_mark_mask,
        toml_word(&ph.backend)
    );
    let l = &config.limits;
    println!(
        "  limits:   {} sessions, {} per client (IPv6: per /{}), idle timeout {} s",
        l.max_sessions,
        l.max_sessions_per_client.min(l.max_sessions),
        l.client_prefix_v6,
        l.idle_timeout_secs
    );
    let policy = &config.policy;
    println!(
        "  policy:   data connections before login {}, foreign PORT {}, foreign 227 {}, AUTH {}{}",
        if policy.data_before_login {
            "allowed"
        } else {
            "refused"
        },
        toml_word(&policy.foreign_port),
        toml_word(&policy.foreign_pasv),
        toml_word(&policy.auth),
        if policy.read_only { ", read-only" } else { "" }
    );
    if !policy.deny_commands.is_empty() {
        println!("  denied commands: {}", policy.deny_commands.join(", "));
    }
    match tls {
        Some((tls, terminator)) => println!(
            "  tls:      AUTH TLS ended here with {} ({} certificate(s) in the chain) and {}; \
             implicit FTPS on [{}]; PROT P data relayed, {} bytes buffered per direction; \
             login without TLS {}",
            tls.certificate.display(),
            terminator.summary().chain,
            tls.key.display(),
            tls.implicit_listen
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            tls.relay_buffer,
            if policy.require_tls {
                "refused (530)"
            } else {
                "allowed"
            }
        ),
        None => println!("  tls:      off (AUTH handled as policy.auth says)"),
    }
    if let Some(upstream) = &upstream_tls {
        println!(
            "  upstream: TLS (AUTH TLS, PBSZ 0, PROT P sent by ftp-alg), the server verified as {} \
             by {}; every data connection relayed",
            upstream.name(),
            match upstream.trust() {
                "pin" => "its pinned certificate (tls.upstream_pin)",
                _ => "tls.upstream_ca",
            }
        );
    }
    for (name, networks, empty) in [
        ("allowed clients", &policy.allow_clients, "all"),
        ("denied clients", &policy.deny_clients, "none"),
        ("allowed servers", &policy.allow_servers, "all"),
        ("denied servers", &policy.deny_servers, "none"),
    ] {
        let list: Vec<String> = networks.iter().map(ToString::to_string).collect();
        let list = if list.is_empty() {
            empty.to_owned()
        } else {
            list.join(", ")
        };
        println!("  {name}: {list}");
    }
    match config.control.enabled {
        true => println!("  control:  {}", config.control.socket.display()),
        false => println!("  control:  off"),
    }
    match config.metrics.listen {
        Some(addr) => println!("  metrics:  http://{addr}/metrics"),
        None => println!("  metrics:  off"),
    }
    Ok(())
}

/// `--interval`: a number of seconds from 0.1 to 3600.
fn parse_interval(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(secs) if (0.1..=3600.0).contains(&secs) => Ok(secs),
        Ok(_) => Err("must be from 0.1 to 3600 seconds".to_owned()),
        Err(e) => Err(e.to_string()),
    }
}

/// A configuration value as the TOML file spells it (`"refuse"`, `"netlink"`), unquoted.
fn toml_word(value: &impl serde::Serialize) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// `pinholes list --watch` settings.
struct Watch {
    every: Duration,
    count: Option<u64>,
}

/// `pinholes list`, once or refreshed.
async fn list_pinholes(
    socket: &Path,
    nft_path: &Path,
    json: bool,
    watch: Option<Watch>,
) -> anyhow::Result<()> {
    let Some(watch) = watch else {
        let (entries, from_kernel) = fetch_pinholes(socket, nft_path).await?;
        let mut out = std::io::stdout().lock();
        if json {
            from_kernel_note(socket, from_kernel, &mut std::io::stderr())?;
            serde_json::to_writer_pretty(&mut out, &entries)?;
            writeln!(out)?;
        } else {
            from_kernel_note(socket, from_kernel, &mut out)?;
            write_pinholes(&mut out, &entries)?;
        }
        return Ok(());
    };
    let mut shown = 0;
    loop {
        let (entries, from_kernel) = fetch_pinholes(socket, nft_path).await?;
        {
            let mut out = std::io::stdout().lock();
            if json {
                serde_json::to_writer(&mut out, &entries)?;
                writeln!(out)?;
            } else {
                // Clear the screen and go home, as watch(1) does.
                write!(out, "\x1b[2J\x1b[H")?;
                writeln!(
                    out,
                    "every {:?}: ftp-alg pinholes list    (unix time {})\n",
                    watch.every,
                    SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs())
                )?;
                from_kernel_note(socket, from_kernel, &mut out)?;
                write_pinholes(&mut out, &entries)?;
            }
            out.flush()?;
        }
        shown += 1;
        if watch.count.is_some_and(|count| shown >= count) {
            return Ok(());
        }
        tokio::time::sleep(watch.every).await;
    }
}

/// The pinholes from the daemon, or from the kernel when the daemon is not running (`true`).
async fn fetch_pinholes(
    socket: &Path,
    nft_path: &Path,
) -> anyhow::Result<(Vec<PinholeEntry>, bool)> {
    match control::call(socket, &Request::Pinholes).await {
        Ok(Answer::Pinholes { pinholes }) => Ok((pinholes, false)),
        Ok(Answer::Error { kind, message }) => Err(Refused { kind, message }.into()),
        Ok(other) => Err(unexpected(other)),
        Err(ClientError::NotRunning { .. }) => {
            let entries = nft::list(nft_path).await.with_context(|| {
                format!(
                    "ftp-alg is not running (nothing answers at {}), and reading table inet {} \
                     from the kernel failed (has ftp-alg run in this network namespace?)",
                    socket.display(),
                    nft::TABLE
                )
            })?;
            Ok((entries, true))
        }
        Err(e) => Err(e.into()),
    }
}

fn from_kernel_note(socket: &Path, from_kernel: bool, out: &mut dyn Write) -> std::io::Result<()> {
    if from_kernel {
        writeln!(
            out,
            "ftp-alg is not running (nothing answers at {}): pinholes read from the kernel; \
             they expire by their timeout. Ids need the daemon.",
            socket.display()
        )?;
    }
    Ok(())
}

fn or_dash<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

fn write_pinholes(out: &mut dyn Write, entries: &[PinholeEntry]) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<6} {:<8} {:<7} {:<8} {:<26} {:<26} {:<26} {:<38} {:<26} {:>5}",
        "ID", "SESSION", "KIND", "STATE", "CLIENT", "SERVER", "SOURCE", "DIAL", "MAPS TO", "LEFT"
    )?;
    for e in entries {
        let maps_to = match (e.maps_to, e.snat) {
            (Some(to), Some(from)) => format!("{to} (from {from})"),
            (Some(to), None) => to.to_string(),
            (None, Some(from)) => format!("- (from {from})"),
            (None, None) => "-".to_owned(),
        };
        let state = match e.state {
            PinholeState::Waiting => "waiting",
            PinholeState::Used => "used",
            PinholeState::Open => "open",
        };
        let kind = match e.kind {
            PinholeKind::Pinhole => "pinhole",
            PinholeKind::Window => "window",
        };
        // A window's ports as a range: 203.0.113.2:1024-65535.
        let dial = match e.last_port {
            Some(last) => format!("{}-{last}", e.dial),
            None => e.dial.to_string(),
        };
        writeln!(
            out,
            "{:<6} {:<8} {:<7} {:<8} {:<26} {:<26} {:<26} {:<38} {:<26} {:>4}s",
            or_dash(e.id),
            or_dash(e.session),
            kind,
            state,
            or_dash(e.client),
            or_dash(e.server),
            e.source,
            dial,
            maps_to,
            e.seconds_left
        )?;
    }
    if entries.is_empty() {
        writeln!(out, "(no open pinholes)")?;
    }
    Ok(())
}

fn write_sessions(out: &mut dyn Write, sessions: &[SessionInfo]) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<6} {:<30} {:<30} {:<16} {:<6} {:<11} {:<12} {:>8} {:>8}",
        "ID", "CLIENT", "SERVER", "USER", "LOGIN", "TLS", "PINHOLES", "AGE", "IDLE"
    )?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for s in sessions {
        let pinholes: Vec<String> = s.pinholes.iter().map(u64::to_string).collect();
        writeln!(
            out,
            "{:<6} {:<30} {:<30} {:<16} {:<6} {:<11} {:<12} {:>7}s {:>7}s",
            s.id,
            s.client,
            or_dash(s.server),
            s.user.as_deref().unwrap_or("-"),
            if s.logged_in { "yes" } else { "no" },
            match s.upstream_tls {
                true => format!("{}+up", s.tls.as_str()),
                false => s.tls.as_str().to_owned(),
            },
            if pinholes.is_empty() {
                "-".to_owned()
            } else {
                pinholes.join(",")
            },
            now.saturating_sub(s.started_unix),
            s.idle_secs
        )?;
    }
    if sessions.is_empty() {
        writeln!(out, "(no sessions)")?;
    }
    Ok(())
}

fn write_status(out: &mut dyn Write, s: &Status) -> std::io::Result<()> {
    let listen: Vec<String> = s.listen.iter().map(ToString::to_string).collect();
    writeln!(
        out,
        "ftp-alg {}, pid {}, up {} s",
        s.version, s.pid, s.uptime_secs
    )?;
    write!(
        out,
        "  mode:     {}, listening on {}",
        s.mode,
        listen.join(", ")
    )?;
    match s.upstream {
        Some(upstream) => writeln!(out, ", upstream {upstream}")?,
        None => writeln!(out)?,
    }
    writeln!(
        out,
        "  sessions: {} open (limit {}), {} since start",
        s.sessions, s.max_sessions, s.sessions_total
    )?;
    writeln!(
        out,
        "  pinholes: {} open, {} since start; timeout {} s, ports {}-{}",
        s.pinholes_open, s.pinholes_opened, s.pinhole_timeout_secs, s.ports.0, s.ports.1
    )?;
    match s.metrics {
        Some(addr) => writeln!(out, "  metrics:  http://{addr}/metrics"),
        None => writeln!(out, "  metrics:  off"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_reads_the_default_file_only_when_it_exists() {
        let dir = std::env::temp_dir().join(format!("ftp-alg-default-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let default = dir.join("ftp-alg.toml");
        let given = PathBuf::from("/elsewhere.toml");
        assert_eq!(config_source(None, &default), None, "no file: built-in");
        std::fs::write(&default, "").unwrap();
        assert_eq!(config_source(None, &default), Some(default.clone()));
        assert_eq!(config_source(Some(given.clone()), &default), Some(given));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn an_error_report_names_each_cause_once() {
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let e = anyhow::Error::from(ClientError::NotRunning {
            path: "/run/x.sock".into(),
            source: io,
        })
        .context("asking for the status");
        assert_eq!(
            report(&e),
            "asking for the status: ftp-alg is not running: cannot connect to /run/x.sock: entity not found"
        );
    }

    #[test]
    fn out_of_range_numbers_are_usage_errors_not_panics() {
        for args in [
            &[
                "ftp-alg",
                "pinholes",
                "list",
                "--watch",
                "--interval",
                "inf",
            ][..],
            &[
                "ftp-alg",
                "pinholes",
                "list",
                "--watch",
                "--interval",
                "NaN",
            ],
            &[
                "ftp-alg",
                "pinholes",
                "list",
                "--watch",
                "--interval",
                "1e30",
            ],
            &["ftp-alg", "pinholes", "list", "--watch", "--interval", "0"],
            &[
                "ftp-alg",
                "sniff",
                "-i",
                "lo",
                "--timeout",
                "18446744073709551615",
            ],
            &["ftp-alg", "sniff", "-i", "lo", "--timeout", "0"],
        ] {
            let e = Cli::try_parse_from(args).expect_err("out of range");
            assert_eq!(e.exit_code(), i32::from(exit::USAGE), "{args:?}");
        }
    }

    #[test]
    fn exit_statuses_follow_the_error() {
        let not_running: anyhow::Error = ClientError::NotRunning {
            path: "/x".into(),
            source: std::io::ErrorKind::NotFound.into(),
        }
        .into();
        assert_eq!(exit_status(&not_running), exit::NOT_RUNNING);
        let not_found: anyhow::Error = Refused {
            kind: ErrorKind::NotFound,
            message: "no session 9".into(),
        }
        .into();
        assert_eq!(exit_status(&not_found), exit::NOT_FOUND);
        assert_eq!(exit_status(&anyhow::anyhow!("nft failed")), exit::FAILURE);
    }

    #[test]
    fn completions_and_man_pages_come_from_the_definition() {
        let mut script = Vec::new();
        clap_complete::generate(
            clap_complete::Shell::Bash,
            &mut Cli::command(),
            "ftp-alg",
            &mut script,
        );
        let script = String::from_utf8(script).unwrap();
        for word in ["pinholes", "sessions", "status", "flush"] {
            assert!(script.contains(word), "bash completion lacks {word}");
        }
        let mut page = Vec::new();
        clap_mangen::Man::new(Cli::command())
            .render(&mut page)
            .unwrap();
        let page = String::from_utf8(page).unwrap();
        assert!(page.contains(".TH ftp-alg 1"), "{page}");
        assert!(
            page.contains("Exit status"),
            "the page documents exit statuses"
        );
    }
}
