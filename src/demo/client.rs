//! The FTP client of `ftp-alg demo` (hidden subcommand `demo-client`): logs in, lists, downloads
//! a file, checks its SHA-256 and uploads it back, in passive (PASV) or active (PORT) mode.
//!
//! It is suppaftp, a maintained third-party client, rather than code of ours, so that the demo
//! shows ftp-alg working with a client that was not written to suit it. Every step has a time
//! limit, since behind a default-deny firewall a blocked data connection is silence, not an
//! error: the demo's negative control depends on that limit to finish.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Context};
use suppaftp::tokio::AsyncFtpStream;
use suppaftp::types::FileType;
use suppaftp::{FtpError, FtpResult, Mode};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Printed on stdout once the login is accepted: the control channel works.
pub(crate) const LOGGED_IN: &str = "logged in";

/// How much longer than a data connection's own limit a whole step may take.
const STEP_MARGIN: Duration = Duration::from_secs(5);

/// `demo-client`: one session of transfers.
#[derive(Debug, clap::Args)]
pub struct ClientArgs {
    /// The FTP server.
    #[arg(long)]
    pub server: SocketAddr,
    /// Who opens the data connections.
    #[arg(long, value_enum)]
    pub mode: DataMode,
    /// The file to download.
    #[arg(long)]
    pub file: String,
    /// Its expected SHA-256, in hex.
    #[arg(long)]
    pub expect_sha256: String,
    /// The name to upload it back under.
    #[arg(long)]
    pub upload: String,
    /// Seconds a data connection may take to be established.
    #[arg(long, default_value_t = 10)]
    pub timeout_secs: u64,
}

/// FTP's two ways of opening a data connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DataMode {
    /// PASV: the client connects to the server.
    Passive,
    /// PORT: the server connects to the client.
    Active,
}

impl DataMode {
    /// The `--mode` value.
    pub(crate) fn name(self) -> &'static str {
        match self {
            DataMode::Passive => "passive",
            DataMode::Active => "active",
        }
    }

    /// The command that announces the data endpoint.
    pub(crate) fn verb(self) -> &'static str {
        match self {
            DataMode::Passive => "PASV",
            DataMode::Active => "PORT",
        }
    }
}

/// Run the session; an error says which step failed.
pub async fn run(args: ClientArgs) -> anyhow::Result<()> {
    let data_limit = Duration::from_secs(args.timeout_secs);
    let step_limit = data_limit + STEP_MARGIN;
    let mut ftp = AsyncFtpStream::connect_timeout(args.server, data_limit)
        .await
        .with_context(|| format!("connecting to {}", args.server))?;
    step(step_limit, "login", ftp.login("anonymous", "demo@ftp-alg")).await?;
    println!("{LOGGED_IN} to {}", args.server);
    // suppaftp converts line endings in its default ASCII type; the checksums need binary.
    step(step_limit, "TYPE I", ftp.transfer_type(FileType::Binary)).await?;
    let mut ftp = match args.mode {
        DataMode::Passive => {
            ftp.set_mode(Mode::Passive);
            // A bounded connect, which also names the endpoint when the firewall drops it.
            ftp.passive_stream_builder(move |addr| Box::pin(connect_data(addr, data_limit)))
        }
        // suppaftp sends PORT with the control connection's local address; it accepts the
        // data connection only from the control connection's peer, within the limit.
        DataMode::Active => ftp.active_mode(data_limit),
    };

    let listing = step(step_limit, "LIST", ftp.list(None)).await?;
    println!("LIST:");
    for line in &listing {
        println!("  {line}");
    }

    let mut download = step(step_limit, "RETR", ftp.retr_as_stream(&args.file)).await?;
    let mut bytes = Vec::new();
    tokio::time::timeout(step_limit, download.read_to_end(&mut bytes))
        .await
        .with_context(|| format!("RETR {}: no data within {step_limit:?}", args.file))?
        .with_context(|| format!("RETR {}: reading the data", args.file))?;
    step(step_limit, "RETR (completion)", download.finish()).await?;
    let digest = super::sha256_hex(&bytes);
    ensure!(
        digest == args.expect_sha256,
        "RETR {}: {} bytes with sha256 {digest}, expected {}",
        args.file,
        bytes.len(),
        args.expect_sha256
    );
    println!("RETR {}: {} bytes, sha256 {digest}", args.file, bytes.len());

    let sent = step(
        step_limit,
        "STOR",
        ftp.put_file(&args.upload, &mut bytes.as_slice()),
    )
    .await?;
    ensure!(
        sent == bytes.len() as u64,
        "STOR {}: sent {sent} of {} bytes",
        args.upload,
        bytes.len()
    );
    println!("STOR {}: {sent} bytes", args.upload);
    step(step_limit, "QUIT", ftp.quit()).await
}

/// Run one suppaftp step within `limit`.
async fn step<T>(
    limit: Duration,
    what: &str,
    f: impl std::future::Future<Output = FtpResult<T>>,
) -> anyhow::Result<T> {
    tokio::time::timeout(limit, f)
        .await
        .with_context(|| format!("{what}: no answer within {limit:?}"))?
        .with_context(|| format!("{what} failed"))
}

async fn connect_data(addr: SocketAddr, limit: Duration) -> FtpResult<TcpStream> {
    match tokio::time::timeout(limit, TcpStream::connect(addr)).await {
        Ok(result) => result.map_err(FtpError::ConnectionError),
        Err(_) => Err(FtpError::ConnectionError(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("data connection to {addr}: no answer within {limit:?}"),
        ))),
    }
}
