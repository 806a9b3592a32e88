//! The FTP server of `ftp-alg demo` (hidden subcommand `demo-server`): a small anonymous server
//! that serves the files of one directory, with PASV/EPSV and PORT/EPRT, so that the demo needs
//! no FTP package on the machine.
//!
//! It is written here rather than taken from libunftp because libunftp and its file system
//! back-end added about 45 s to a clean release build on 2 cores (rustls with ring, x509-parser,
//! moka, cap-std, ...) for the dozen commands the demo needs. Like vsftpd's defaults it accepts
//! data connections only from the control connection's peer and PORT/EPRT only towards it, so
//! the demo shows that the gateway's pinholes satisfy a server that checks (RFC 2577). It is
//! meant for the demo's own network namespace, not for serving files to anyone.
//!
//! Files are read and written with `std::fs`: the crate's tokio has no `fs` feature, and the
//! demo's one file of 1 MiB on local disk costs a worker thread a millisecond.

use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Mutex};

use crate::ftp::hostport;

/// Printed on stdout, followed by the address, once the server accepts connections.
pub(crate) const READY: &str = "listening on";
/// Printed on stdout, followed by what is held, when `--hold` pauses a transfer.
pub(crate) const HOLD: &str = "hold";

/// Longest command line accepted, CRLF included.
const MAX_LINE: u64 = 1024;
/// Largest upload accepted: the demo uploads 1 MiB.
const MAX_UPLOAD: u64 = 64 << 20;
/// How long a data connection may take to be established, either way.
const DATA_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `--hold` waits for the go-ahead before it carries on by itself.
const HOLD_TIMEOUT: Duration = Duration::from_secs(10);

/// `demo-server`: serve a directory over FTP.
#[derive(Debug, clap::Args)]
pub struct ServerArgs {
    /// Directory whose files are served (no subdirectories) and where uploads are stored.
    #[arg(long)]
    pub root: PathBuf,
    /// Address to listen on.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Once each RETR's data connection is established, print `hold RETR NAME` on stdout and
    /// wait for a line on stdin before sending the data: the transfer is then under way and its
    /// pinhole still open, so the demo can list it.
    #[arg(long)]
    pub hold: bool,
}

struct Shared {
    root: PathBuf,
    /// The go-ahead lines of `--hold`, read from stdin; one receiver for all sessions.
    hold: Option<Mutex<mpsc::Receiver<()>>>,
}

impl Shared {
    async fn hold(&self, what: &str) {
        let Some(go) = &self.hold else { return };
        let mut go = go.lock().await;
        println!("{HOLD} {what}");
        match tokio::time::timeout(HOLD_TIMEOUT, go.recv()).await {
            Ok(Some(())) => {}
            Ok(None) => tracing::warn!("stdin closed: not holding {what}"),
            Err(_) => tracing::warn!("no go-ahead within {HOLD_TIMEOUT:?}: carrying on"),
        }
    }
}

/// Run the server until killed.
pub async fn run(args: ServerArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    println!("{READY} {}", listener.local_addr()?);
    serve(listener, args.root, args.hold.then(go_ahead_lines)).await
}

/// Serve FTP sessions from `listener` until accepting fails; with `hold`, pause each RETR
/// until a message arrives on it.
pub(crate) async fn serve(
    listener: TcpListener,
    root: PathBuf,
    hold: Option<mpsc::Receiver<()>>,
) -> anyhow::Result<()> {
    let shared = Arc::new(Shared {
        root,
        hold: hold.map(Mutex::new),
    });
    loop {
        let (stream, peer) = listener.accept().await.context("accepting")?;
        let shared = shared.clone();
        tokio::spawn(async move {
            match Session::new(stream, shared) {
                Ok(session) => {
                    if let Err(e) = session.serve().await {
                        tracing::warn!(%peer, "session ended: {e:#}");
                    }
                }
                Err(e) => tracing::warn!(%peer, "cannot serve: {e:#}"),
            }
        });
    }
}

/// One message per line of stdin, read on a thread of its own (the crate's tokio has no
/// `io-std`); the channel closes at the end of stdin.
fn go_ahead_lines() -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel(1);
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            if line.is_err() || tx.blocking_send(()).is_err() {
                break;
            }
        }
    });
    rx
}

/// Where the next transfer's data connection comes from.
enum DataSetup {
    /// Nothing announced since the last transfer.
    None,
    /// PASV/EPSV: the client connects to this listener.
    Passive(TcpListener),
    /// PORT/EPRT: we connect to this address.
    Active(SocketAddr),
}

struct Session {
    shared: Arc<Shared>,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    peer: IpAddr,
    local: IpAddr,
    logged_in: bool,
    data: DataSetup,
}

impl Session {
    fn new(stream: TcpStream, shared: Arc<Shared>) -> std::io::Result<Session> {
        let peer = stream.peer_addr()?.ip().to_canonical();
        let local = stream.local_addr()?.ip().to_canonical();
        let (reader, writer) = stream.into_split();
        Ok(Session {
            shared,
            reader: BufReader::new(reader),
            writer,
            peer,
            local,
            logged_in: false,
            data: DataSetup::None,
        })
    }

    async fn reply(&mut self, code: u16, text: &str) -> anyhow::Result<()> {
        self.writer
            .write_all(format!("{code} {text}\r\n").as_bytes())
            .await
            .context("writing a reply")
    }

    async fn read_command(&mut self) -> anyhow::Result<Option<String>> {
        let mut line = Vec::new();
        (&mut self.reader)
            .take(MAX_LINE)
            .read_until(b'\n', &mut line)
            .await
            .context("reading a command")?;
        if line.last() != Some(&b'\n') {
            if line.len() as u64 >= MAX_LINE {
                bail!("command line longer than {MAX_LINE} bytes");
            }
            // End of stream, possibly after a partial line: the client is gone.
            return Ok(None);
        }
        Ok(Some(
            String::from_utf8_lossy(&line)
                .trim_end_matches(['\r', '\n'])
                .to_owned(),
        ))
    }

    async fn serve(mut self) -> anyhow::Result<()> {
        tracing::info!(peer = %self.peer, "control connection");
        self.reply(220, "ftp-alg demo server ready").await?;
        while let Some(line) = self.read_command().await? {
            let (verb, arg) = line.split_once(' ').unwrap_or((&line, ""));
            let verb = verb.to_ascii_uppercase();
            if verb == "PASS" {
                tracing::info!(peer = %self.peer, "PASS ****");
            } else {
                tracing::info!(peer = %self.peer, "{line}");
            }
            if !self.logged_in && !matches!(verb.as_str(), "USER" | "PASS" | "QUIT" | "FEAT") {
                self.reply(530, "Please login with USER and PASS").await?;
                continue;
            }
            match verb.as_str() {
                "USER" => self.reply(331, "Any password will do").await?,
                "PASS" => {
                    self.logged_in = true;
                    self.reply(230, "Logged in").await?;
                }
                "SYST" => self.reply(215, "UNIX Type: L8").await?,
                "FEAT" => {
                    self.writer
                        .write_all(
                            b"211-Features:\r\n EPRT\r\n EPSV\r\n PASV\r\n SIZE\r\n211 End\r\n",
                        )
                        .await
                        .context("writing a reply")?;
                }
                "OPTS" => self.reply(200, "OK").await?,
                "NOOP" => self.reply(200, "OK").await?,
                "PWD" => self.reply(257, "\"/\" is the current directory").await?,
                "CWD" if matches!(arg, "/" | "") => self.reply(250, "OK").await?,
                "CWD" => self.reply(550, "No such directory").await?,
                "CDUP" => self.reply(250, "OK").await?,
                "TYPE"
                    if matches!(arg.to_ascii_uppercase().as_str(), "I" | "A" | "A N" | "L 8") =>
                {
                    // Every transfer is binary: the demo compares checksums.
                    self.reply(200, "OK").await?
                }
                "TYPE" => self.reply(504, "Unsupported type").await?,
                "MODE" | "STRU" => self.reply(200, "OK").await?,
                "PASV" => self.passive(false).await?,
                "EPSV" => self.passive(true).await?,
                "PORT" => {
                    let target = hostport::parse_host_port(arg.trim()).ok();
                    self.active(target.map(SocketAddr::V4)).await?
                }
                "EPRT" => self.active(hostport::parse_eprt(arg.trim()).ok()).await?,
                "SIZE" => match self.file_len(arg) {
                    Some(len) => self.reply(213, &len.to_string()).await?,
                    None => self.reply(550, "No such file").await?,
                },
                "LIST" | "NLST" => self.list(verb == "NLST").await?,
                "RETR" => self.retr(arg).await?,
                "STOR" => self.stor(arg).await?,
                "QUIT" => {
                    self.reply(221, "Goodbye").await?;
                    return Ok(());
                }
                _ => self.reply(502, "Command not implemented").await?,
            }
        }
        Ok(())
    }

    /// PASV (227) or EPSV (229): listen on the control connection's local address.
    async fn passive(&mut self, extended: bool) -> anyhow::Result<()> {
        let listener = match TcpListener::bind(SocketAddr::new(self.local, 0)).await {
            Ok(l) => l,
            Err(e) => return self.reply(425, &format!("Cannot listen: {e}")).await,
        };
        let port = listener
            .local_addr()
            .context("passive listener address")?
            .port();
        let text = match (extended, self.local) {
            (true, _) => format!("Entering Extended Passive Mode (|||{port}|)"),
            (false, IpAddr::V4(ip)) => format!(
                "Entering Passive Mode ({})",
                hostport::encode_host_port(SocketAddrV4::new(ip, port))
            ),
            (false, IpAddr::V6(_)) => return self.reply(522, "Use EPSV").await,
        };
        self.data = DataSetup::Passive(listener);
        self.reply(if extended { 229 } else { 227 }, &text).await
    }

    /// PORT/EPRT: like vsftpd's default, only towards the control connection's peer and not to
    /// a privileged port.
    async fn active(&mut self, target: Option<SocketAddr>) -> anyhow::Result<()> {
        match target {
            None => self.reply(501, "Syntax error in address").await,
            Some(t) if t.ip().to_canonical() != self.peer => {
                let text = format!("Illegal PORT command: {} is not {}", t.ip(), self.peer);
                self.reply(500, &text).await
            }
            Some(t) if t.port() < 1024 => {
                self.reply(500, "Illegal PORT command: privileged port")
                    .await
            }
            Some(t) => {
                self.data = DataSetup::Active(t);
                self.reply(200, "PORT command successful").await
            }
        }
    }

    /// The data connection announced by the last PASV/EPSV/PORT/EPRT; each serves one transfer.
    async fn open_data(&mut self) -> Result<TcpStream, String> {
        match std::mem::replace(&mut self.data, DataSetup::None) {
            DataSetup::None => Err("Use PORT or PASV first".to_owned()),
            DataSetup::Passive(listener) => {
                let (stream, from) = tokio::time::timeout(DATA_TIMEOUT, listener.accept())
                    .await
                    .map_err(|_| "No data connection".to_owned())?
                    .map_err(|e| format!("Accepting the data connection: {e}"))?;
                if from.ip().to_canonical() != self.peer {
                    return Err(format!(
                        "Security: data connection from {from}, not {}",
                        self.peer
                    ));
                }
                Ok(stream)
            }
            DataSetup::Active(target) => {
                tokio::time::timeout(DATA_TIMEOUT, TcpStream::connect(target))
                    .await
                    .map_err(|_| format!("No answer from {target}"))?
                    .map_err(|e| format!("Connecting to {target}: {e}"))
            }
        }
    }

    /// The path of a file directly in the root; `None` for anything else (subdirectories,
    /// `..`, empty names).
    fn path(&self, name: &str) -> Option<PathBuf> {
        let name = name.strip_prefix('/').unwrap_or(name);
        let plain = !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0']);
        plain.then(|| self.shared.root.join(name))
    }

    fn file_len(&self, name: &str) -> Option<u64> {
        let meta = std::fs::metadata(self.path(name)?).ok()?;
        meta.is_file().then_some(meta.len())
    }

    async fn list(&mut self, names_only: bool) -> anyhow::Result<()> {
        let mut entries = Vec::new();
        let dir = std::fs::read_dir(&self.shared.root)
            .with_context(|| format!("reading {}", self.shared.root.display()))?;
        for entry in dir {
            let entry = entry.context("reading the root")?;
            let meta = entry.metadata().context("reading the root")?;
            if meta.is_file() {
                entries.push((entry.file_name().to_string_lossy().into_owned(), meta.len()));
            }
        }
        entries.sort();
        let listing: String = entries
            .iter()
            .map(|(name, len)| {
                if names_only {
                    format!("{name}\r\n")
                } else {
                    format!("-rw-r--r-- 1 ftp ftp {len:>12} Jan 01 00:00 {name}\r\n")
                }
            })
            .collect();
        self.send("directory listing", listing.as_bytes(), None)
            .await
    }

    async fn retr(&mut self, name: &str) -> anyhow::Result<()> {
        let Some(path) = self.path(name) else {
            return self.reply(550, "No such file").await;
        };
        match std::fs::read(&path) {
            Ok(bytes) => self.send(name, &bytes, Some(&format!("RETR {name}"))).await,
            Err(e) => self.reply(550, &format!("{name}: {e}")).await,
        }
    }

    /// One download: 150, data connection, optional hold, data, 226.
    async fn send(&mut self, what: &str, bytes: &[u8], hold: Option<&str>) -> anyhow::Result<()> {
        self.reply(
            150,
            &format!(
                "Opening BINARY mode data connection for {what} ({} bytes)",
                bytes.len()
            ),
        )
        .await?;
        let mut data = match self.open_data().await {
            Ok(data) => data,
            Err(e) => return self.reply(425, &e).await,
        };
        if let Some(hold) = hold {
            self.shared.hold(hold).await;
        }
        let sent = async {
            data.write_all(bytes).await?;
            data.shutdown().await
        };
        match sent.await {
            Ok(()) => self.reply(226, "Transfer complete").await,
            Err(e) => self.reply(426, &format!("Transfer aborted: {e}")).await,
        }
    }

    async fn stor(&mut self, name: &str) -> anyhow::Result<()> {
        let Some(path) = self.path(name) else {
            return self.reply(553, "File name not allowed").await;
        };
        self.reply(
            150,
            &format!("Opening BINARY mode data connection for {name}"),
        )
        .await?;
        let data = match self.open_data().await {
            Ok(data) => data,
            Err(e) => return self.reply(425, &e).await,
        };
        let mut bytes = Vec::new();
        if let Err(e) = data.take(MAX_UPLOAD + 1).read_to_end(&mut bytes).await {
            return self.reply(426, &format!("Transfer aborted: {e}")).await;
        }
        if bytes.len() as u64 > MAX_UPLOAD {
            return self.reply(552, "Upload too large").await;
        }
        match std::fs::write(&path, &bytes) {
            Ok(()) => {
                let text = format!("Transfer complete ({} bytes)", bytes.len());
                self.reply(226, &text).await
            }
            Err(e) => self.reply(451, &format!("{name}: {e}")).await,
        }
    }
}
