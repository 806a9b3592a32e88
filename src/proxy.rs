//! The tokio shell: listeners, control connections, and carrying out each session's actions in
//! order.
//!
//! This module only moves bytes and calls the pinhole manager; every decision is made by
//! [`crate::session::Session`]. While a pinhole is being installed the session's connections are
//! not read, which keeps the order of lines and pushes back on a peer that floods.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::io::Interest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

use crate::config::{Config, Mode, PolicyConfig};
use crate::origdst::original_destination;
use crate::pinhole::nft::{self, NftBackend};
use crate::pinhole::Pinholes;
use crate::ports::PortPool;
use crate::session::{Action, Session, SessionContext, Side};

const READ_BUFFER: usize = 8192;
/// How long the server may take to answer and close after the client has closed its side.
const HALF_CLOSE_GRACE: Duration = Duration::from_secs(10);

/// Shared by every session of a daemon run.
struct Shared {
    config: Config,
    /// `config.policy`, shared by every session.
    policy: Arc<PolicyConfig>,
    pinholes: Pinholes<NftBackend>,
    next_session: AtomicU64,
    sessions: Mutex<SessionCount>,
}

/// Sessions open now, in all and per client address.
#[derive(Default)]
struct SessionCount {
    total: usize,
    per_client: HashMap<IpAddr, usize>,
}

/// A session's place under the limits; given back when dropped, however the session ends.
struct Admitted {
    shared: Arc<Shared>,
    client: IpAddr,
}

impl Shared {
    /// Take a place for a session from `client`, or say which limit is reached.
    fn admit(self: &Arc<Self>, client: IpAddr) -> Result<Admitted, &'static str> {
        let limits = &self.config.limits;
        let mut count = self.lock_sessions();
        if count.total >= limits.max_sessions {
            return Err("limits.max_sessions");
        }
        let mine = count.per_client.entry(client).or_insert(0);
        if *mine >= limits.max_sessions_per_client {
            return Err("limits.max_sessions_per_client");
        }
        *mine += 1;
        count.total += 1;
        Ok(Admitted {
            shared: self.clone(),
            client,
        })
    }

    fn lock_sessions(&self) -> std::sync::MutexGuard<'_, SessionCount> {
        // Two counters that each update leaves consistent: a poisoned lock is still usable.
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut count = self.shared.lock_sessions();
        count.total = count.total.saturating_sub(1);
        if let Some(mine) = count.per_client.get_mut(&self.client) {
            *mine = mine.saturating_sub(1);
            if *mine == 0 {
                count.per_client.remove(&self.client);
            }
        }
    }
}

/// Run the daemon until SIGTERM or SIGINT: load the table, listen, proxy; on the way out
/// remove every pinhole, keeping the table's chains (see [`nft::flush_pinholes`]).
pub async fn run(config: Config) -> anyhow::Result<()> {
    // Bind first: a second instance started by mistake fails here, before it could replace
    // the running daemon's table and with it every open pinhole.
    let mut listeners = Vec::new();
    for addr in &config.proxy.listen {
        listeners.push(bind(*addr).with_context(|| format!("listening on {addr}"))?);
    }
    let nft_path = config.pinholes.nft.clone();
    let intercept_port = config.proxy.listen.first().map_or(0, |a| a.port());
    nft::load_table(
        &nft_path,
        config.pinholes.ct_mark,
        intercept_port,
        &config.proxy.intercept,
    )
    .await
    .with_context(|| format!("loading the nftables table inet {}", nft::TABLE))?;

    let pinholes = Pinholes::new(
        NftBackend::start(nft_path.clone()),
        PortPool::new(
            config.pinholes.port_min,
            config.pinholes.port_max,
            Duration::from_secs(config.pinholes.reuse_delay_secs),
        ),
        config.pinhole_timeout(),
    );
    let shared = Arc::new(Shared {
        policy: Arc::new(config.policy.clone()),
        config,
        pinholes,
        next_session: AtomicU64::new(1),
        sessions: Mutex::new(SessionCount::default()),
    });
    let mut accepting = Vec::new();
    for listener in listeners {
        let local = listener
            .local_addr()
            .context("reading a listener's address")?;
        tracing::info!(mode = %shared.config.proxy.mode, "listening on {local}");
        accepting.push(tokio::spawn(accept_loop(listener, shared.clone())));
    }

    let mut signals = Signals::new()?;
    signals.next_stop().await;
    // Stop accepting (the listeners close: new clients are refused at once), then give the
    // sessions under way their grace period; a second signal cuts it short.
    for task in &accepting {
        task.abort();
    }
    let grace = Duration::from_secs(shared.config.limits.shutdown_grace_secs);
    let sessions = shared.lock_sessions().total;
    if sessions > 0 {
        tracing::info!(
            sessions,
            "stopping: no new sessions; waiting up to {grace:?} for those open"
        );
        tokio::select! {
            () = sessions_ended(&shared) => {}
            () = tokio::time::sleep(grace) => {
                tracing::info!(sessions = shared.lock_sessions().total, "grace period over");
            }
            () = signals.next_stop() => {}
        }
    }
    tracing::info!(
        open_pinholes = shared.pinholes.open_count(),
        "shutting down: removing every pinhole (the table's chains stay, so that connections \
         under way keep their address translation)"
    );
    nft::flush_pinholes(&nft_path)
        .await
        .context("removing the pinholes")?;
    Ok(())
}

/// Every session has ended.
async fn sessions_ended(shared: &Shared) {
    while shared.lock_sessions().total > 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The signals the daemon acts on.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            hup: signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
        })
    }

    /// Wait for SIGTERM or SIGINT. SIGHUP, whose default action would kill the daemon and
    /// leave its pinholes to their timeout, is answered with a log line: the listeners, the
    /// table and the port pool belong to one run, so a new configuration needs a restart
    /// (transfers under way survive it, in conntrack).
    async fn next_stop(&mut self) {
        loop {
            tokio::select! {
                _ = self.term.recv() => return,
                _ = self.int.recv() => return,
                _ = self.hup.recv() => tracing::warn!(
                    "SIGHUP: configuration reload is not supported; restart ftp-alg to apply a new configuration"
                ),
            }
        }
    }
}

/// Bind a listener; IPv6 listeners are IPv6-only so that `0.0.0.0` and `[::]` can share a port.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let peer = canonical(peer);
                match shared.admit(peer.ip()) {
                    Ok(admitted) => {
                        let id = shared.next_session.fetch_add(1, Ordering::Relaxed);
                        let span = tracing::info_span!("session", id, client = %peer, server = tracing::field::Empty);
                        tokio::spawn(session(stream, id, admitted).instrument(span));
                    }
                    Err(limit) => {
                        tracing::warn!(client = %peer, reason = "limit_reached", limit, "refused session");
                        tokio::spawn(refuse_session(stream));
                    }
                }
            }
            Err(e) => {
                // Running out of file descriptors is transient: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn refuse_session(mut client: TcpStream) {
    let _ = client
        .write_all(b"421 Too many connections; try again later.\r\n")
        .await;
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

async fn session(mut client: TcpStream, id: u64, admitted: Admitted) {
    let shared = &admitted.shared;
    let cfg = &shared.config.proxy;
    let addresses = client
        .peer_addr()
        .and_then(|p| Ok((p, client.local_addr()?)));
    let (peer, local) = match addresses {
        Ok(addresses) => addresses,
        Err(e) => return tracing::info!(error = %e, "client left before the session started"),
    };
    let server = match cfg.mode {
        Mode::Reverse => cfg.upstream.map(canonical),
        Mode::Gateway => match original_destination(&client, local) {
            Ok(dst) if canonical(dst) != canonical(local) => Some(canonical(dst)),
            Ok(_) => {
                tracing::warn!("connection was not redirected: no server to proxy to");
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the original destination");
                None
            }
        },
    };
    let Some(server) = server else {
        let _ = client
            .write_all(b"421 No FTP server to proxy to (connection was not redirected).\r\n")
            .await;
        return;
    };
    if !shared.policy.client_allowed(peer.ip()) || !shared.policy.server_allowed(server.ip()) {
        tracing::warn!(%server, reason = "network_denied", "refused session");
        let _ = client
            .write_all(b"421 Not allowed by gateway policy.\r\n")
            .await;
        return;
    }
    tracing::Span::current().record("server", tracing::field::display(server));
    let connect = tokio::time::timeout(
        Duration::from_secs(cfg.connect_timeout_secs),
        TcpStream::connect(server),
    );
    let upstream = match connect.await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return refuse_unreachable(client, &e.to_string()).await,
        Err(_) => return refuse_unreachable(client, "connect timed out").await,
    };
    let upstream_local = match upstream.local_addr() {
        Ok(addr) => addr,
        Err(e) => return tracing::info!(error = %e, "server left before the session started"),
    };
    // Control lines are small and each waits for an answer: Nagle would only delay them.
    for stream in [&client, &upstream] {
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    }
    // A client's urgent byte (the end of ftplib's ABOR line, or a Telnet DM) must stay in the
    // stream: out of line, the kernel would hold it apart and the line would never end.
    if let Err(e) = socket2::SockRef::from(&client).set_out_of_band_inline(true) {
        tracing::warn!(error = %e, "cannot set SO_OOBINLINE; urgent data from the client is lost");
    }
    tracing::info!("session started");
    let ctx = SessionContext {
        id,
        mode: cfg.mode,
        client: canonical(peer),
        client_local: canonical(local),
        server,
        upstream_local: canonical(upstream_local),
        announce: cfg.announce,
        max_line: cfg.max_line,
        policy: shared.policy.clone(),
        max_pinholes: shared.config.limits.max_pinholes_per_session,
    };
    let mut session = Session::new(ctx);
    if let Err(e) = relay(&mut session, client, upstream, shared).await {
        tracing::info!(error = %e, "control connection failed");
    }
    // Whatever ended the session, its pinholes go with it.
    session.handle_eof(Side::Server);
    while let Some(action) = session.poll_action() {
        if let Action::Close(ids) = action {
            close(shared, ids);
        }
    }
    tracing::info!("session ended");
}

async fn refuse_unreachable(mut client: TcpStream, why: &str) {
    tracing::warn!(error = why, "upstream server unreachable");
    let _ = client
        .write_all(b"421 Service not available: cannot reach the FTP server.\r\n")
        .await;
}

/// Move bytes between the peers through the session until the server's side closes, or the
/// client's side closes and the server has not finished within [`HALF_CLOSE_GRACE`].
async fn relay(
    session: &mut Session,
    client: TcpStream,
    server: TcpStream,
    shared: &Shared,
) -> std::io::Result<()> {
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut server_rx, mut server_tx) = server.into_split();
    let mut client_buf = vec![0u8; READ_BUFFER];
    let mut server_buf = vec![0u8; READ_BUFFER];
    let mut client_open = true;
    let grace = tokio::time::sleep(Duration::MAX);
    tokio::pin!(grace);
    let idle_limit = Duration::from_secs(shared.config.limits.idle_timeout_secs);
    let idle = tokio::time::sleep(idle_limit);
    tokio::pin!(idle);
    loop {
        while let Some(action) = session.poll_action() {
            match action {
                Action::ToServer(bytes) => server_tx.write_all(&bytes).await?,
                Action::ToServerSynch(line) => send_synch(&mut server_tx, &line).await?,
                Action::ToClient(bytes) => client_tx.write_all(&bytes).await?,
                Action::Open(request) => {
                    let result = shared.pinholes.open(&request).await;
                    match &result {
                        Ok(opened) => {
                            tracing::debug!(pinhole = opened.id, ?request, "pinhole open")
                        }
                        Err(e) => tracing::error!(error = %e, ?request, "cannot open pinhole"),
                    }
                    session.handle_opened(result.ok());
                }
                Action::Close(ids) => close(shared, ids),
                Action::EndToServer => {
                    server_tx.shutdown().await?;
                    grace
                        .as_mut()
                        .reset(tokio::time::Instant::now() + HALF_CLOSE_GRACE);
                }
                Action::Shutdown => return Ok(()),
            }
        }
        tokio::select! {
            read = client_rx.read(&mut client_buf), if client_open && session.wants_client_data() => match read? {
                0 => {
                    client_open = false;
                    session.handle_eof(Side::Client);
                }
                n => {
                    idle.as_mut().reset(tokio::time::Instant::now() + idle_limit);
                    session.handle_client_data(&client_buf[..n]);
                    // A read stops at TCP's urgent mark, even inline, and tokio takes a short
                    // read to mean the socket is drained (and stops polling it): read on
                    // directly until it really is, or the rest of an ABOR line would wait for
                    // the client's next packet.
                    while session.wants_client_data() {
                        match read_now(client_rx.as_ref(), &mut client_buf) {
                            Ok(0) => {
                                client_open = false;
                                session.handle_eof(Side::Client);
                                break;
                            }
                            Ok(n) => session.handle_client_data(&client_buf[..n]),
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                            Err(e) => return Err(e),
                        }
                    }
                }
            },
            read = server_rx.read(&mut server_buf) => match read? {
                0 => session.handle_eof(Side::Server),
                n => session.handle_server_data(&server_buf[..n]),
            },
            () = &mut grace => return Ok(()),
            () = &mut idle => {
                // RFC 6384 §12: a control connection is not idle while its transfer runs.
                if session.transfer_in_progress() {
                    idle.as_mut().reset(tokio::time::Instant::now() + idle_limit);
                } else {
                    tracing::info!(reason = "idle_timeout", "closing idle session");
                    client_tx
                        .write_all(b"421 Idle timeout; closing control connection.\r\n")
                        .await?;
                    return Ok(());
                }
            }
        }
    }
}

/// Read what the kernel holds for `stream` now, past tokio's readiness tracking.
fn read_now(stream: &TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::io::Read;
    (&*socket2::SockRef::from(stream)).read(buf)
}

/// Telnet IAC, IP (interrupt process) and DM (data mark), RFC 854.
const IAC: u8 = 255;
const IP: u8 = 244;
const DM: u8 = 242;

/// RFC 959's way to interrupt a transfer: IAC IP, then IAC DM with the DM as TCP urgent data
/// (the Synch), then the command line.
async fn send_synch(tx: &mut OwnedWriteHalf, line: &[u8]) -> std::io::Result<()> {
    tx.write_all(&[IAC, IP, IAC]).await?;
    let stream: &TcpStream = tx.as_ref();
    loop {
        stream.writable().await?;
        let sent = stream.try_io(Interest::WRITABLE, || {
            socket2::SockRef::from(stream).send_out_of_band(&[DM])
        });
        match sent {
            Ok(_) => break,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    tx.write_all(line).await
}

/// Closing is not ordered with the control channel (the kernel timeout is the backstop), so
/// it does not hold up the reply that triggered it.
fn close(shared: &Shared, ids: Vec<u64>) {
    // The removal is queued here, before any later open of this session.
    let removal = shared.pinholes.close(&ids);
    tokio::spawn(async move {
        if let Err(e) = removal.await {
            tracing::warn!(error = %e, ?ids, "cannot remove pinholes; they expire by timeout");
        }
    });
}
