//! `ftp-alg demo`: shows ftp-alg at work on one machine, as root, without touching the host's
//! own network or firewall.
//!
//! It builds three network namespaces, client C, gateway G and server S, each named after this
//! process so that two runs never collide:
//!
//! ```text
//!   C 198.18.0.2/24 ── lan0 198.18.0.1  G  wan0 203.0.113.1 ── 203.0.113.2/24 S
//! ```
//!
//! G forwards between them under `rules/gateway-policy.nft` (default deny) and runs the daemon
//! in gateway mode, intercepting tcp/21 on lan0; S runs the demo's FTP server ([`server`]) and
//! C its client ([`client`]), both hidden subcommands of this same binary. A passive and an
//! active session each download a file, upload it back and are checked by SHA-256; during each
//! download the pinholes are read from G's kernel with `pinholes list`. Last, the negative
//! control: the daemon is stopped, tcp/21 is let through G directly, and the same passive
//! session must fail because its data connection is dropped.
//!
//! Only documentation address ranges are used, and only between the demo's own namespaces.
//! Everything is removed on the way out, whether the demo succeeds, fails or is interrupted
//! (drop guards, and a signal handler that lets them run).

pub mod client;
pub mod server;

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, ensure, Context};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::pinhole::{PinholeEntry, PinholeState};
use client::DataMode;

/// The policy loaded in G: the one shipped for gateways that have no firewall yet.
const GATEWAY_POLICY: &str = include_str!("../rules/gateway-policy.nft");

/// The port the daemon listens on in G; tcp/21 arriving on lan0 is redirected to it.
const DAEMON_PORT: u16 = 2121;

const CLIENT_IP: &str = "198.18.0.2";
const GATEWAY_LAN_IP: &str = "198.18.0.1";
const GATEWAY_WAN_IP: &str = "203.0.113.1";
const SERVER_IP: &str = "203.0.113.2";
const PREFIX_LEN: &str = "24";
const FTP_PORT: u16 = 21;

/// The file served: large enough to be a real transfer, small enough to be instant.
const FILE_NAME: &str = "demo.bin";
const FILE_SIZE: usize = 1 << 20;

/// How long the daemon and the server may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one client session may take in all, as a backstop to its own limits.
const SESSION_TIMEOUT: Duration = Duration::from_secs(60);
/// The negative control's data connection limit: long enough for any SYN retransmission to
/// have got through if it could, short enough to keep the demo brisk.
const BLOCKED_TIMEOUT_SECS: u64 = 4;

/// Run the demo; the error says what did not go as expected.
pub async fn run() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut hangup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    // On a signal the demo's future is dropped, and with it the guards that remove its
    // processes, namespaces and files.
    tokio::select! {
        result = demo() => result,
        _ = interrupt.recv() => Err(anyhow!("interrupted (SIGINT); cleaned up")),
        _ = terminate.recv() => Err(anyhow!("terminated (SIGTERM); cleaned up")),
        _ = hangup.recv() => Err(anyhow!("hung up (SIGHUP); cleaned up")),
    }
}

/// SHA-256 in lower-case hex.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

async fn demo() -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding this program's path")?;
    let work = WorkDir::create()?;
    let result = scenario(&exe, &work).await;
    if result.is_err() {
        work.print_logs();
    }
    result
}

async fn scenario(exe: &Path, work: &WorkDir) -> anyhow::Result<()> {
    let net = Topology::create().await?;
    println!(
        "ftp-alg demo: FTP through a default-deny nftables firewall, with ftp-alg on the gateway"
    );
    println!();
    println!("topology (network namespaces, removed on exit):");
    println!(
        "  client  C {}: eth0 {CLIENT_IP}/{PREFIX_LEN}, default via {GATEWAY_LAN_IP}",
        net.client
    );
    println!(
        "  gateway G {}: lan0 {GATEWAY_LAN_IP}/{PREFIX_LEN}, wan0 {GATEWAY_WAN_IP}/{PREFIX_LEN}, forwarding on",
        net.gateway
    );
    println!(
        "  server  S {}: eth0 {SERVER_IP}/{PREFIX_LEN}, default via {GATEWAY_WAN_IP}",
        net.server
    );

    run_ok(
        Command::new("ip").args(["netns", "exec", &net.gateway, "nft", "-f", "-"]),
        Some(GATEWAY_POLICY),
    )
    .await
    .context("loading rules/gateway-policy.nft in G")?;
    println!(
        "  G: rules/gateway-policy.nft loaded (forward policy drop; FTP only through ftp-alg)"
    );

    let payload = random_bytes(FILE_SIZE)?;
    let digest = sha256_hex(&payload);
    let root = work.path("root");
    std::fs::create_dir(&root).with_context(|| format!("creating {}", root.display()))?;
    std::fs::write(root.join(FILE_NAME), &payload).context("writing the demo file")?;

    let mut daemon = Daemon::start(exe, &net, work).await?;
    println!(
        "  G: ftp-alg run (gateway mode, listening on :{DAEMON_PORT}, intercepting tcp/21 on lan0)"
    );
    let mut server = Server::start(exe, &net, work, &root).await?;
    println!("  S: FTP server on {SERVER_IP}:{FTP_PORT} (demo-server), serving {FILE_NAME}");
    println!();

    for mode in [DataMode::Passive, DataMode::Active] {
        transfer(exe, &net, &mut server, mode, &root, &payload, &digest).await?;
    }
    daemon.stop().await?;
    negative_control(exe, &net, &mut server, &digest).await?;
    println!();
    println!("all checks passed");
    Ok(())
}

/// One session through ftp-alg, which must succeed with the pinholes listed mid-download.
async fn transfer(
    exe: &Path,
    net: &Topology,
    server: &mut Server,
    mode: DataMode,
    root: &Path,
    payload: &[u8],
    digest: &str,
) -> anyhow::Result<()> {
    let (name, command) = (mode.name(), mode.verb());
    let upload = format!("upload-{name}.bin");
    let outcome = run_client(exe, net, server, mode, digest, &upload, None).await?;
    if !outcome.status.success() {
        bail!(
            "{name} transfer ({command}) through ftp-alg failed ({}):\n{}{}",
            outcome.status,
            indent(&outcome.stdout),
            indent(&outcome.stderr)
        );
    }
    // The client checked the download; the upload is checked here, where it landed.
    let stored = std::fs::read(root.join(&upload))
        .with_context(|| format!("reading the uploaded {upload}"))?;
    ensure!(
        stored == payload,
        "{name} transfer: the uploaded {upload} differs from {FILE_NAME} ({} bytes, sha256 {})",
        stored.len(),
        sha256_hex(&stored)
    );
    let pinholes = outcome
        .pinholes
        .with_context(|| format!("{name} transfer: the server never reached its RETR"))??;
    ensure!(
        !pinholes.is_empty(),
        "{name} transfer succeeded but no pinhole was listed during it"
    );
    println!(
        "{name} transfer ({command}) through default-deny firewall: OK ({} bytes down and up, sha256 {digest})",
        payload.len()
    );
    print!("{}", indent(&outcome.stdout));
    println!("  pinholes open in G during the download (ftp-alg pinholes list):");
    for pinhole in &pinholes {
        println!("    {}", describe(pinhole));
    }
    println!();
    Ok(())
}

/// With the daemon stopped and tcp/21 let through G directly, the same passive session must
/// log in but have its data connection dropped: the pinholes were what let data through.
async fn negative_control(
    exe: &Path,
    net: &Topology,
    server: &mut Server,
    digest: &str,
) -> anyhow::Result<()> {
    // A stopped daemon leaves its table's chains (and its tcp/21 redirect) in place so that
    // connections under way keep their translation; the control without ftp-alg removes them.
    run_ok(
        Command::new("ip").args(["netns", "exec", &net.gateway, "nft", "-f", "-"]),
        Some(
            "delete table inet ftp_alg\n\
             add rule inet gateway forward tcp dport 21 accept\n",
        ),
    )
    .await
    .context("removing ftp-alg's table and letting tcp/21 through G directly")?;
    println!(
        "negative control: ftp-alg stopped (SIGTERM) and its table removed, G forwards tcp/21 \
         directly, same passive session"
    );
    let outcome = run_client(
        exe,
        net,
        server,
        DataMode::Passive,
        digest,
        "upload-blocked.bin",
        Some(BLOCKED_TIMEOUT_SECS),
    )
    .await?;
    if outcome.status.success() {
        bail!("without ftp-alg the passive transfer still went through: G is not default-deny");
    }
    let logged_in = outcome
        .stdout
        .lines()
        .any(|l| l.starts_with(client::LOGGED_IN));
    if !logged_in {
        bail!(
            "negative control: the control connection itself failed, so it proves nothing:\n{}",
            indent(&outcome.stderr)
        );
    }
    println!("  control connection: OK (login through G)");
    println!(
        "  data connection: dropped by G, as expected: {}",
        outcome
            .stderr
            .lines()
            .last()
            .map_or("(no message)", |l| l.trim().trim_start_matches("ftp-alg: "))
    );
    Ok(())
}

/// What one run of `demo-client` did.
struct ClientOutcome {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    /// The pinholes listed while the server held the download, if it got that far.
    pinholes: Option<anyhow::Result<Vec<PinholeEntry>>>,
}

/// Run `demo-client` in C; whenever the server holds a download, list the pinholes in G and let
/// it go on.
async fn run_client(
    exe: &Path,
    net: &Topology,
    server: &mut Server,
    mode: DataMode,
    digest: &str,
    upload: &str,
    timeout_secs: Option<u64>,
) -> anyhow::Result<ClientOutcome> {
    let mut command = Command::new("ip");
    command
        .args(["netns", "exec", &net.client])
        .arg(exe)
        .args([
            "demo-client",
            "--server",
            &format!("{SERVER_IP}:{FTP_PORT}"),
        ])
        .args(["--mode", mode.name(), "--file", FILE_NAME])
        .args(["--expect-sha256", digest, "--upload", upload])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("NO_COLOR", "1")
        .kill_on_drop(true);
    if let Some(secs) = timeout_secs {
        command.args(["--timeout-secs", &secs.to_string()]);
    }
    let child = command.spawn().context("starting demo-client in C")?;
    let output = child.wait_with_output();
    tokio::pin!(output);
    let deadline = tokio::time::sleep(SESSION_TIMEOUT);
    tokio::pin!(deadline);
    let mut pinholes = None;
    loop {
        tokio::select! {
            output = &mut output => {
                let output = output.context("waiting for demo-client")?;
                return Ok(ClientOutcome {
                    status: output.status,
                    stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
                    stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
                    pinholes,
                });
            }
            held = server.next_hold() => {
                held?;
                pinholes = Some(list_pinholes(exe, net).await);
                server.release().await?;
            }
            () = &mut deadline => bail!("demo-client did not finish within {SESSION_TIMEOUT:?}"),
        }
    }
}

/// One line of the report for a pinhole that `pinholes list --json` printed.
fn describe(p: &PinholeEntry) -> String {
    let mut line = String::new();
    if let Some(session) = p.session {
        line.push_str(&format!("session {session}: "));
    }
    line.push_str(&format!("{} -> {}", p.source, p.dial));
    if let Some(to) = p.maps_to {
        line.push_str(&format!(", sent on to {to}"));
    }
    if let Some(from) = p.snat {
        line.push_str(&format!(", source rewritten to {from}"));
    }
    let state = match p.state {
        PinholeState::Waiting => "waiting for its connection",
        PinholeState::Used => "connection arrived",
        PinholeState::Open => "a window, open while its session lives",
    };
    line.push_str(&format!(" ({state}, {} s left)", p.seconds_left));
    line
}

async fn list_pinholes(exe: &Path, net: &Topology) -> anyhow::Result<Vec<PinholeEntry>> {
    let json = run_ok(
        Command::new("ip")
            .args(["netns", "exec", &net.gateway])
            .arg(exe)
            .args(["pinholes", "list", "--json"]),
        None,
    )
    .await
    .context("ftp-alg pinholes list --json in G")?;
    serde_json::from_str(&json).context("reading the output of pinholes list --json")
}

/// The three namespaces; dropping it deletes them, which also removes their links and
/// nftables tables.
struct Topology {
    client: String,
    gateway: String,
    server: String,
}

impl Topology {
    async fn create() -> anyhow::Result<Topology> {
        let prefix = format!("ftpalg-demo-{}", std::process::id());
        // The guard exists before the first namespace does, so a failure half way through
        // still removes what was made.
        let net = Topology {
            client: format!("{prefix}-c"),
            gateway: format!("{prefix}-g"),
            server: format!("{prefix}-s"),
        };
        for ns in [&net.client, &net.gateway, &net.server] {
            ip(&["netns", "add", ns])
                .await
                .context("creating a network namespace (the demo must run as root)")?;
        }
        let (c, g, s) = (&net.client, &net.gateway, &net.server);
        // The veth pairs are created inside G with their peers placed straight into C and S,
        // so no link ever appears in the host's namespace.
        ip(&[
            "-n", g, "link", "add", "lan0", "type", "veth", "peer", "name", "eth0", "netns", c,
        ])
        .await?;
        ip(&[
            "-n", g, "link", "add", "wan0", "type", "veth", "peer", "name", "eth0", "netns", s,
        ])
        .await?;
        let client_cidr = format!("{CLIENT_IP}/{PREFIX_LEN}");
        let lan_cidr = format!("{GATEWAY_LAN_IP}/{PREFIX_LEN}");
        let wan_cidr = format!("{GATEWAY_WAN_IP}/{PREFIX_LEN}");
        let server_cidr = format!("{SERVER_IP}/{PREFIX_LEN}");
        for (ns, dev, cidr) in [
            (c, "eth0", &client_cidr),
            (g, "lan0", &lan_cidr),
            (g, "wan0", &wan_cidr),
            (s, "eth0", &server_cidr),
        ] {
            ip(&["-n", ns, "addr", "add", cidr, "dev", dev]).await?;
            ip(&["-n", ns, "link", "set", dev, "up"]).await?;
        }
        for ns in [c, g, s] {
            ip(&["-n", ns, "link", "set", "lo", "up"]).await?;
        }
        ip(&["-n", c, "route", "add", "default", "via", GATEWAY_LAN_IP]).await?;
        ip(&["-n", s, "route", "add", "default", "via", GATEWAY_WAN_IP]).await?;
        // /proc/sys/net belongs to the namespace of whoever opens it: this is G's setting.
        run_ok(
            Command::new("ip").args([
                "netns",
                "exec",
                g,
                "sh",
                "-c",
                "echo 1 > /proc/sys/net/ipv4/ip_forward",
            ]),
            None,
        )
        .await
        .context("turning on forwarding in G")?;
        Ok(net)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in [&self.client, &self.gateway, &self.server] {
            // A namespace that was never made is fine to miss; anything else is worth a word.
            match std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::piped())
                .output()
            {
                Ok(out) if out.status.success() => {}
                Ok(out) => {
                    let err = String::from_utf8_lossy(&out.stderr);
                    if !err.contains("No such file") {
                        eprintln!("ftp-alg demo: removing namespace {ns}: {}", err.trim());
                    }
                }
                Err(e) => eprintln!("ftp-alg demo: removing namespace {ns}: {e}"),
            }
        }
    }
}

/// The daemon in G.
struct Daemon {
    child: Child,
}

impl Daemon {
    async fn start(exe: &Path, net: &Topology, work: &WorkDir) -> anyhow::Result<Daemon> {
        let config = work.path("ftp-alg.toml");
        // The demo's own control socket: a daemon of the host may be serving the default one.
        let text = format!(
            "[proxy]\nmode = \"gateway\"\nlisten = [\"0.0.0.0:{DAEMON_PORT}\"]\nintercept = [\"lan0\"]\n\
             [control]\nsocket = {:?}\n",
            work.path("control.sock")
        );
        std::fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
        let log_path = work.path(WorkDir::DAEMON_LOG);
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &net.gateway])
            .arg(exe)
            .arg("run")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .env("NO_COLOR", "1")
            .kill_on_drop(true)
            .spawn()
            .context("starting ftp-alg run in G")?;
        // Ready means a socket listening in G, asked of the kernel with ss (iproute2) rather
        // than read from the log, whose level and wording are the user's and the daemon's.
        let filter = format!("sport = :{DAEMON_PORT}");
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            let listening = run_ok(
                Command::new("ip").args(["netns", "exec", &net.gateway, "ss", "-Hltn", &filter]),
                None,
            )
            .await
            .context("asking ss in G for the daemon's socket")?;
            if !listening.trim().is_empty() {
                return Ok(Daemon { child });
            }
            if let Some(status) = child.try_wait().context("checking on ftp-alg run")? {
                bail!("ftp-alg run exited during start-up ({status})");
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("ftp-alg run did not start listening within {START_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, the daemon's orderly shutdown: it removes its table, and with it every pinhole.
    async fn stop(&mut self) -> anyhow::Result<()> {
        let pid = self.child.id().context("ftp-alg run has already exited")?;
        let pid = libc::pid_t::try_from(pid).context("process id out of range")?;
        // SAFETY: kill(2) takes plain integers; the pid is our own child's, not yet reaped.
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            return Err(std::io::Error::last_os_error()).context("sending SIGTERM to ftp-alg run");
        }
        let status = tokio::time::timeout(START_TIMEOUT, self.child.wait())
            .await
            .context("ftp-alg run did not exit after SIGTERM")?
            .context("waiting for ftp-alg run")?;
        ensure!(
            status.success(),
            "ftp-alg run exited with {status} after SIGTERM"
        );
        Ok(())
    }
}

/// The demo's FTP server in S, with its `--hold` handshake on stdin/stdout.
struct Server {
    // Kept for kill_on_drop.
    _child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl Server {
    async fn start(
        exe: &Path,
        net: &Topology,
        work: &WorkDir,
        root: &Path,
    ) -> anyhow::Result<Server> {
        let log_path = work.path(WorkDir::SERVER_LOG);
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &net.server])
            .arg(exe)
            .arg("demo-server")
            .arg("--root")
            .arg(root)
            .args(["--listen", &format!("{SERVER_IP}:{FTP_PORT}"), "--hold"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log)
            .env("NO_COLOR", "1")
            .kill_on_drop(true)
            .spawn()
            .context("starting demo-server in S")?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            bail!("demo-server's stdin or stdout was not piped");
        };
        let mut stdout = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(START_TIMEOUT, stdout.next_line())
            .await
            .with_context(|| format!("demo-server did not start within {START_TIMEOUT:?}"))?
            .context("reading demo-server's output")?
            .context("demo-server exited during start-up")?;
        ensure!(
            first.starts_with(server::READY),
            "demo-server said {first:?} instead of {:?}",
            server::READY
        );
        Ok(Server {
            _child: child,
            stdin,
            stdout,
        })
    }

    /// Wait until the server holds a transfer. Cancel-safe (`Lines::next_line` is).
    async fn next_hold(&mut self) -> anyhow::Result<()> {
        loop {
            let line = self
                .stdout
                .next_line()
                .await
                .context("reading demo-server's output")?
                .context("demo-server exited")?;
            if line.starts_with(server::HOLD) {
                return Ok(());
            }
        }
    }

    /// Let the held transfer go on.
    async fn release(&mut self) -> anyhow::Result<()> {
        self.stdin
            .write_all(b"go\n")
            .await
            .context("writing to demo-server")
    }
}

/// The demo's temporary directory (config, logs, the served files); removed on drop.
struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    const DAEMON_LOG: &'static str = "ftp-alg.log";
    const SERVER_LOG: &'static str = "demo-server.log";

    fn create() -> anyhow::Result<WorkDir> {
        use std::os::unix::fs::DirBuilderExt;
        let path = std::env::temp_dir().join(format!("ftpalg-demo-{}", std::process::id()));
        // Not recursive, so an existing directory (someone else's) is an error, not reused.
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        Ok(WorkDir { path })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    fn print_logs(&self) {
        for name in [Self::DAEMON_LOG, Self::SERVER_LOG] {
            if let Ok(log) = std::fs::read_to_string(self.path(name)) {
                eprintln!("--- {name} ---\n{}", log.trim_end());
            }
        }
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            eprintln!("ftp-alg demo: removing {}: {e}", self.path.display());
        }
    }
}

/// `ip ARGS`, which must succeed.
async fn ip(args: &[&str]) -> anyhow::Result<()> {
    run_ok(Command::new("ip").args(args), None)
        .await
        .with_context(|| format!("ip {}", args.join(" ")))?;
    Ok(())
}

/// Run a command to completion, feeding it `input`; its stdout, or an error with its stderr.
async fn run_ok(command: &mut Command, input: Option<&str>) -> anyhow::Result<String> {
    if input.is_some() {
        command.stdin(Stdio::piped());
    }
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {:?}", command.as_std().get_program()))?;
    if let Some(input) = input {
        let mut stdin = child.stdin.take().context("stdin was not piped")?;
        stdin
            .write_all(input.as_bytes())
            .await
            .context("writing to the command's stdin")?;
        // Dropping stdin closes it: the command sees the end of its input.
    }
    let output = child
        .wait_with_output()
        .await
        .context("waiting for the command")?;
    if !output.status.success() {
        bail!(
            "{}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn random_bytes(len: usize) -> anyhow::Result<Vec<u8>> {
    let mut bytes = vec![0; len];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom")?;
    Ok(bytes)
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The demo's client and server against each other on loopback, in both modes: no root,
    /// no namespaces, no ftp-alg; what `demo` adds on top is the gateway.
    #[tokio::test]
    async fn client_and_server_transfer_on_loopback() {
        let root = std::env::temp_dir().join(format!("ftpalg-demo-test-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        let payload = random_bytes(100_000).unwrap();
        std::fs::write(root.join(FILE_NAME), &payload).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(server::serve(listener, root.clone(), None));

        for mode in [DataMode::Passive, DataMode::Active] {
            let upload = format!("upload-{}.bin", mode.name());
            client::run(client::ClientArgs {
                server: addr,
                mode,
                file: FILE_NAME.to_owned(),
                expect_sha256: sha256_hex(&payload),
                upload: upload.clone(),
                timeout_secs: 5,
            })
            .await
            .unwrap();
            assert_eq!(std::fs::read(root.join(upload)).unwrap(), payload);
        }
        let wrong = client::run(client::ClientArgs {
            server: addr,
            mode: DataMode::Passive,
            file: FILE_NAME.to_owned(),
            expect_sha256: sha256_hex(b"something else"),
            upload: "unused.bin".to_owned(),
            timeout_secs: 5,
        })
        .await;
        assert!(wrong.unwrap_err().to_string().contains("expected"));

        server.abort();
        std::fs::remove_dir_all(&root).unwrap();
    }
}
