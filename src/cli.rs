//! The command line: what each subcommand takes (clap derive) and how it reports.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::pinhole::{nft, PinholeEntry, PinholeState};

/// FTP application layer gateway: rewrites PORT/EPRT/PASV/EPSV on the control channel and opens
/// short-lived nftables pinholes for exactly the announced data connections.
#[derive(Debug, Parser)]
#[command(name = "ftp-alg", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon in the foreground (logs on stderr; RUST_LOG sets the level).
    Run {
        /// Configuration file; without it, the built-in default: gateway mode on port 2121.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Check a configuration file and say what it sets up; exits 1 on the first error.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
    /// Inspect the pinholes in the kernel.
    Pinholes {
        #[command(subcommand)]
        command: PinholesCommand,
    },
    /// Show ftp-alg at work: client, gateway and server in throw-away network namespaces, a
    /// passive and an active transfer through a default-deny firewall (needs root).
    Demo,
    /// Watch FTP control traffic on an interface (read-only, no proxying) and say for each
    /// PORT, EPRT, 227 and 229 whether a pinhole lets its data connection through (needs
    /// CAP_NET_RAW and CAP_NET_ADMIN).
    Sniff(crate::sniff::SniffArgs),
    /// The demo's FTP server (run by `demo`).
    #[command(hide = true)]
    DemoServer(crate::demo::server::ServerArgs),
    /// The demo's FTP client (run by `demo`).
    #[command(hide = true)]
    DemoClient(crate::demo::client::ClientArgs),
}

#[derive(Debug, Subcommand)]
pub enum PinholesCommand {
    /// List every pinhole, read from the kernel's nftables table (works without the daemon):
    /// waiting for its one connection, or used (its translation lasts until the transfer ends).
    List {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
        /// The nft executable.
        #[arg(long, default_value = "nft")]
        nft: PathBuf,
    },
}

/// `check-config FILE`.
pub fn check_config(file: &std::path::Path) -> anyhow::Result<()> {
    let config = Config::load(file)?;
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
    let ph = &config.pinholes;
    println!(
        "  pinholes: ports {}-{}, timeout {} s, port reuse after {} s, ct mark {:#010x}",
        ph.port_min, ph.port_max, ph.timeout_secs, ph.reuse_delay_secs, ph.ct_mark
    );
    let l = &config.limits;
    println!(
        "  limits:   {} sessions, {} per client, idle timeout {} s",
        l.max_sessions, l.max_sessions_per_client, l.idle_timeout_secs
    );
    let policy = &config.policy;
    println!(
        "  policy:   data connections before login {}, foreign PORT {:?}, AUTH {:?}{}",
        if policy.data_before_login {
            "allowed"
        } else {
            "refused"
        },
        policy.foreign_port,
        policy.auth,
        if policy.read_only { ", read-only" } else { "" }
    );
    if !policy.deny_commands.is_empty() {
        println!("  denied commands: {}", policy.deny_commands.join(", "));
    }
    Ok(())
}

/// `pinholes list`.
pub async fn list_pinholes(json: bool, nft_path: &std::path::Path) -> anyhow::Result<()> {
    let entries = nft::list(nft_path).await.with_context(|| {
        format!(
            "reading table inet {} (is ftp-alg running in this network namespace?)",
            nft::TABLE
        )
    })?;
    let mut out = std::io::stdout().lock();
    if json {
        serde_json::to_writer_pretty(&mut out, &entries)?;
        writeln!(out)?;
    } else {
        write_table(&mut out, &entries)?;
    }
    Ok(())
}

fn write_table(out: &mut impl Write, entries: &[PinholeEntry]) -> std::io::Result<()> {
    fn or_dash<T: ToString>(v: Option<T>) -> String {
        v.map_or_else(|| "-".to_owned(), |v| v.to_string())
    }
    writeln!(
        out,
        "{:<8} {:<8} {:<26} {:<26} {:<26} {:<32} {:<26} {:>5}",
        "SESSION", "STATE", "CLIENT", "SERVER", "SOURCE", "DIAL", "MAPS TO", "LEFT"
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
        };
        writeln!(
            out,
            "{:<8} {:<8} {:<26} {:<26} {:<26} {:<32} {:<26} {:>4}s",
            or_dash(e.session),
            state,
            or_dash(e.client),
            or_dash(e.server),
            e.source,
            e.dial,
            maps_to,
            e.seconds_left
        )?;
    }
    if entries.is_empty() {
        writeln!(out, "(no open pinholes)")?;
    }
    Ok(())
}
