//! The tokio shell of the FTP proxy: accepting control connections, and carrying out each
//! session's actions in order. The daemon around it (start-up, control API, metrics,
//! shutdown) is `daemon.rs`.
//!
//! This module only moves bytes and calls the pinhole manager; every decision is made by
//! [`crate::session::Session`]. While a pinhole is being installed the session's connections are
//! not read, which keeps the order of lines and pushes back on a peer that floods.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

use crate::accept;
use crate::config::{Config, Mode};
use crate::datarelay::Relay;
use crate::metrics::{Admission, Metrics, PinholeFailure};
use crate::origdst::original_destination;
use crate::pinhole::{Firewall, OpenError, Pinholes};
use crate::registry::{Admitted, Entry, LimitReached, Registry};
use crate::session::{Action, Event, Session, SessionContext, Side, TlsContext};
use crate::tls::{Token, UpstreamSession};
use crate::upstream;
use crate::upstream_tls::{self, Negotiation, Output};

const READ_BUFFER: usize = 8192;
/// Reads per readiness event before the session's actions are carried out: bounds what one
/// fast peer puts in the session's buffers at once.
const READS_PER_WAKEUP: usize = 8;
/// How long a last 421 to the client may take before the session ends anyway.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(1);
/// How long an implicit FTPS client may take over its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the server may take to answer and close after the client has closed its side.
const HALF_CLOSE_GRACE: Duration = Duration::from_secs(10);

/// Shared by every session of a daemon run.
pub(crate) struct Shared {
    pub(crate) config: Config,
    /// `config.policy` and `config.limits` as reloaded: each session takes a snapshot.
    pub(crate) live: crate::reload::Live,
    pub(crate) pinholes: Pinholes<Firewall>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) metrics: Arc<Metrics>,
    /// FTPS termination and the `PROT P` data relay (`[tls]`).
    pub(crate) relay: Option<Arc<Relay>>,
}

/// Bind a listener; IPv6 listeners are IPv6-only so that `0.0.0.0` and `[::]` can share a port.
pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
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

/// Accept sessions on `listener`; `implicit`: an implicit FTPS listener, whose clients start
/// with the TLS handshake.
pub(crate) async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, implicit: bool) {
    loop {
        let (stream, peer) = accept::next("FTP listener", || listener.accept()).await;
        let peer = canonical(peer);
        match shared.registry.admit(peer) {
            Ok(admitted) => {
                let id = admitted.entry().id();
                let span = tracing::info_span!("session", id, client = %peer, server = tracing::field::Empty);
                tokio::spawn(session(stream, shared.clone(), admitted, implicit).instrument(span));
            }
            Err(limit) => {
                shared.metrics.refused_session(Admission::SessionLimit);
                tracing::warn!(client = %peer, reason = "limit_reached", limit = limit.key(), "refused session");
                tokio::spawn(refuse_session(stream, limit));
            }
        }
    }
}

/// Answer a session over a limit with 421 and the limit's reason: clients show the reply's
/// text (when they show anything: curl reports a timeout), and it is the user's only clue.
async fn refuse_session(mut client: TcpStream, limit: LimitReached) {
    let reply: &[u8] = match limit {
        LimitReached::Total => b"421 Too many connections to this server; try again later.\r\n",
        LimitReached::PerClient => {
            b"421 Too many connections from your address; close some and try again.\r\n"
        }
    };
    let _ = client.write_all(reply).await;
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

async fn session(mut client: TcpStream, shared: Arc<Shared>, admitted: Admitted, implicit: bool) {
    let entry = admitted.entry();
    let id = entry.id();
    let shared = &*shared;
    let cfg = &shared.config.proxy;
    // This session's policy and limits, whatever a reload changes while it runs.
    let live = shared.live.get();
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
    let forbidden = match cfg.mode {
        Mode::Gateway if !live.policy.allow_local_servers => {
            upstream::forbidden(server.ip(), &upstream::own_addresses())
        }
        _ => None,
    };
    if let Some(why) = forbidden {
        tracing::warn!(%server, reason = "network_denied", destination = why.as_str(), "refused session: a gateway does not proxy to this destination (policy.allow_local_servers)");
    }
    if forbidden.is_some()
        || !live.policy.client_allowed(peer.ip())
        || !live.policy.server_allowed(server.ip())
    {
        tracing::warn!(%server, reason = "network_denied", "refused session");
        shared.metrics.refused_session(Admission::NetworkDenied);
        let _ = client
            .write_all(b"421 Not allowed by gateway policy.\r\n")
            .await;
        return;
    }
    tracing::Span::current().record("server", tracing::field::display(server));
    entry.set_server(server);
    let timeout = Duration::from_secs(cfg.connect_timeout_secs);
    let mark = match cfg.mode {
        Mode::Gateway => cfg.upstream_mark,
        Mode::Reverse => 0,
    };
    let source = upstream::source_for(server, &cfg.upstream_source);
    let upstream = match upstream::connect(server, source, mark, timeout).await {
        Ok(stream) => stream,
        Err(e) => return refuse_unreachable(shared, client, &e.to_string()).await,
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
    let idle_limit = Duration::from_secs(live.limits.idle_timeout_secs);
    let mut client = ClientIo::Plain(client);
    if implicit {
        match implicit_tls(shared, client, idle_limit).await {
            Ok(tls) => client = tls,
            Err(e) => return tracing::info!(error = %e, "implicit FTPS: no TLS handshake"),
        }
    }
    // With a TLS upstream, the connection to the server is secured before the client hears
    // anything (an implicit FTPS client after its own handshake, so that a refusal reaches it
    // over TLS): the server's greeting comes out of that negotiation.
    let upstream_tls = shared
        .relay
        .as_ref()
        .and_then(|relay| relay.upstream())
        .map(|tls| tls.session());
    let (server_io, greeting) = match &upstream_tls {
        None => (ServerIo::plain(upstream), Vec::new()),
        Some(tls) => match secure_upstream(upstream, tls, cfg.max_line, timeout).await {
            Ok(secured) => secured,
            Err((reply, why)) => {
                tracing::warn!(reason = why.as_str(), error = %why, "cannot secure the connection to the server: session refused");
                shared.metrics.upstream_connect_failed();
                farewell(&mut client, &reply).await;
                return;
            }
        },
    };
    tracing::info!(upstream_tls = upstream_tls.is_some(), "session started");
    let ctx = SessionContext {
        id,
        mode: cfg.mode,
        client: canonical(peer),
        client_local: canonical(local),
        server,
        upstream_local: canonical(upstream_local),
        announce: cfg.announce,
        max_line: cfg.max_line,
        policy: live.policy.clone(),
        max_pinholes: live.limits.max_pinholes_per_session,
        max_windows: live.limits.max_windows_per_client,
        tls: shared.relay.as_ref().map(|relay| TlsContext {
            relay_port: relay.port(),
            implicit,
            upstream: upstream_tls.is_some(),
        }),
    };
    let mut session = Session::new(ctx);
    session.handle_server_data(&greeting);
    let streams = (client, server_io);
    let io = relay(
        &mut session,
        streams,
        shared,
        (entry, upstream_tls.as_ref()),
        idle_limit,
    );
    if let Err(e) = io.await {
        tracing::info!(error = %e, "control connection failed");
    }
    // Whatever ended the session, its pinholes go with it.
    session.handle_eof(Side::Server);
    while let Some(action) = session.poll_action() {
        if let Action::Close(ids) = action {
            close(shared, ids);
        }
    }
    count_events(shared, &mut session);
    tracing::info!("session ended");
}

async fn refuse_unreachable(shared: &Shared, mut client: TcpStream, why: &str) {
    tracing::warn!(error = why, "upstream server unreachable");
    shared.metrics.upstream_connect_failed();
    let _ = client
        .write_all(b"421 Service not available: cannot reach the FTP server.\r\n")
        .await;
}

/// Move bytes between the peers through the session until the server's side closes, or the
/// client's side closes and the server has not finished within [`HALF_CLOSE_GRACE`].
async fn relay(
    session: &mut Session,
    (mut client, mut server): (ClientIo, ServerIo),
    shared: &Shared,
    (entry, upstream_tls): (&Entry, Option<&UpstreamSession>),
    idle_limit: Duration,
) -> std::io::Result<()> {
    let mut client_open = true;
    let grace = tokio::time::sleep(Duration::MAX);
    tokio::pin!(grace);
    let idle = tokio::time::sleep(idle_limit);
    tokio::pin!(idle);
    loop {
        while let Some(action) = session.poll_action() {
            match action {
                Action::ToServer(bytes) => {
                    bounded(entry, idle_limit, server.write_all(&bytes)).await?
                }
                Action::ToServerSynch(line) => {
                    bounded(entry, idle_limit, server.send_synch(&line)).await?
                }
                Action::ToClient(bytes) => {
                    bounded(entry, idle_limit, client.write_all(&bytes)).await?
                }
                Action::StartClientTls => {
                    let relay = shared.relay.as_ref().ok_or_else(|| {
                        std::io::Error::other("AUTH TLS without [tls]: the session core erred")
                    })?;
                    client = bounded(entry, idle_limit, client.start_tls(relay)).await?;
                    tracing::info!(tls = "control", "TLS with the client established");
                }
                Action::Expect(expectation) => match &shared.relay {
                    Some(relay) => {
                        relay.expect(expectation, client.token().cloned(), upstream_tls.cloned())
                    }
                    None => tracing::error!(
                        "relayed data connection without [tls]: the session core erred"
                    ),
                },
                Action::Open(request) => {
                    let started = std::time::Instant::now();
                    let result = shared.pinholes.open(&request).await;
                    match &result {
                        Ok(opened) => {
                            shared.metrics.installed_in(started.elapsed());
                            tracing::debug!(pinhole = opened.id, ?request, "pinhole open")
                        }
                        Err(e) => {
                            shared.metrics.pinhole_failed(match e {
                                OpenError::PortsExhausted => PinholeFailure::PortsExhausted,
                                OpenError::Backend(_)
                                | OpenError::ShuttingDown
                                | OpenError::WindowLimit(_) => PinholeFailure::Firewall,
                            });
                            tracing::error!(error = %e, ?request, "cannot open pinhole")
                        }
                    }
                    session.handle_opened(result.ok());
                }
                Action::OpenWindow(request) => {
                    let result = shared.pinholes.open_window(&request).await;
                    if let Err(e) = &result {
                        tracing::warn!(error = %e, "cannot open the TLS session's window");
                    }
                    session.handle_opened(result.ok());
                }
                Action::Close(ids) => {
                    if let Some(relay) = &shared.relay {
                        relay.forget(&ids);
                    }
                    close(shared, ids)
                }
                Action::EndToServer => {
                    server.shutdown().await?;
                    grace
                        .as_mut()
                        .reset(tokio::time::Instant::now() + HALF_CLOSE_GRACE);
                }
                Action::Shutdown => return Ok(()),
            }
        }
        count_events(shared, session);
        entry.observe(session);
        tokio::select! {
            ready = client.ready(), if client_open && session.wants_client_data() => {
                ready?;
                let read = client.take_available(session)?;
                if read.bytes > 0 {
                    idle.as_mut().reset(tokio::time::Instant::now() + idle_limit);
                    entry.touch();
                }
                if read.eof {
                    client_open = false;
                    session.handle_eof(Side::Client);
                }
            },
            ready = server.ready() => {
                ready?;
                if server.take_available(session)?.eof {
                    session.handle_eof(Side::Server);
                }
            },
            () = &mut grace => return Ok(()),
            () = entry.killed() => {
                tracing::info!(reason = "operator", "session killed by the operator");
                farewell(&mut client, b"421 Session closed by the operator.\r\n").await;
                return Ok(());
            }
            () = &mut idle => {
                // RFC 6384 §12: a control connection is not idle while its transfer runs.
                if session.transfer_in_progress() {
                    idle.as_mut().reset(tokio::time::Instant::now() + idle_limit);
                } else {
                    tracing::info!(reason = "idle_timeout", "closing idle session");
                    farewell(&mut client, b"421 Idle timeout; closing control connection.\r\n")
                        .await;
                    return Ok(());
                }
            }
        }
    }
}

/// The handshake of a client on an implicit FTPS listener, before anything else.
async fn implicit_tls(
    shared: &Shared,
    client: ClientIo,
    limit: Duration,
) -> std::io::Result<ClientIo> {
    let relay = shared
        .relay
        .as_ref()
        .ok_or_else(|| std::io::Error::other("an implicit FTPS listener without [tls]"))?;
    let tls = tokio::time::timeout(limit.min(TLS_HANDSHAKE_TIMEOUT), client.start_tls(relay))
        .await
        .map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")
        })??;
    tracing::info!(
        tls = "control",
        "implicit FTPS: TLS with the client established"
    );
    Ok(tls)
}

/// Carry out a write to a peer, unless the operator ends the session first or the peer has
/// accepted nothing for `limit` (it is not reading: a client can pipeline commands and never
/// read their replies). Without this bound such a session could be neither killed nor timed
/// out, and would hold its place under the limits for good.
async fn bounded<T>(
    entry: &Entry,
    limit: Duration,
    write: impl std::future::Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    tokio::select! {
        // The write first: it usually completes at once, and the timer is then never armed.
        biased;
        written = write => written,
        () = entry.killed() => {
            tracing::info!(reason = "operator", "session killed by the operator while a peer was not reading");
            Err(std::io::Error::other("session killed by the operator"))
        }
        () = tokio::time::sleep(limit) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the peer has read nothing for limits.idle_timeout_secs",
        )),
    }
}

/// A last reply to the client before the session ends; not waited for past
/// [`FAREWELL_TIMEOUT`], since a client that does not read must not hold the session.
async fn farewell(client: &mut ClientIo, reply: &[u8]) {
    let _ = tokio::time::timeout(FAREWELL_TIMEOUT, client.write_all(reply)).await;
}

/// A TLS stream of a control connection, read a buffer at a time: TLS hides the socket's
/// readiness, so a read happens before the session is asked to take its bytes.
struct TlsIo<S> {
    stream: Box<S>,
    /// Decrypted bytes read and not yet given to the session, and how many.
    buf: Box<[u8]>,
    filled: Option<usize>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsIo<S> {
    fn new(stream: S) -> TlsIo<S> {
        TlsIo {
            stream: Box::new(stream),
            buf: vec![0; READ_BUFFER].into_boxed_slice(),
            filled: None,
        }
    }

    /// Wait until there is something to take. Cancel-safe: a TLS read keeps nothing until it
    /// completes.
    async fn ready(&mut self) -> std::io::Result<()> {
        if self.filled.is_none() {
            self.filled = Some(self.stream.read(&mut self.buf).await?);
        }
        Ok(())
    }

    /// Feed the session what [`TlsIo::ready`] read from `side`.
    fn take(&mut self, session: &mut Session, side: Side) -> Read {
        match self.filled.take() {
            Some(0) => Read {
                bytes: 0,
                eof: true,
            },
            Some(n) => {
                match side {
                    Side::Client => session.handle_client_data(&self.buf[..n]),
                    Side::Server => session.handle_server_data(&self.buf[..n]),
                }
                Read {
                    bytes: n,
                    eof: false,
                }
            }
            None => Read {
                bytes: 0,
                eof: false,
            },
        }
    }

    async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }
}

/// The client's side of the control connection: plain TCP, or TLS ended by ftp-alg after
/// `AUTH TLS`.
enum ClientIo {
    Plain(TcpStream),
    Tls {
        io: TlsIo<tokio_rustls::server::TlsStream<TcpStream>>,
        /// The random value this session's TLS sessions carry: a `PROT P` data connection
        /// must resume one of them.
        token: Token,
    },
}

impl ClientIo {
    /// Wait until there is something to take (bytes or the end). Cancel-safe: a plain socket's
    /// readiness is re-armed, and a TLS read keeps nothing until it completes.
    async fn ready(&mut self) -> std::io::Result<()> {
        match self {
            ClientIo::Plain(stream) => stream.readable().await,
            ClientIo::Tls { io, .. } => io.ready().await,
        }
    }

    /// Feed the session what [`ClientIo::ready`] found.
    fn take_available(&mut self, session: &mut Session) -> std::io::Result<Read> {
        match self {
            ClientIo::Plain(stream) => read_available(stream, session, Side::Client),
            ClientIo::Tls { io, .. } => Ok(io.take(session, Side::Client)),
        }
    }

    async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            ClientIo::Plain(stream) => stream.write_all(bytes).await,
            ClientIo::Tls { io, .. } => io.write_all(bytes).await,
        }
    }

    /// The token of this session's TLS sessions, once the client has started TLS.
    fn token(&self) -> Option<&Token> {
        match self {
            ClientIo::Plain(_) => None,
            ClientIo::Tls { token, .. } => Some(token),
        }
    }

    /// The TLS handshake with the client, as TLS server, after the 234 (or at once on an
    /// implicit FTPS listener), under a fresh token.
    async fn start_tls(self, relay: &Relay) -> std::io::Result<ClientIo> {
        match self {
            ClientIo::Plain(stream) => {
                let token = relay
                    .terminator()
                    .new_token()
                    .map_err(std::io::Error::other)?;
                let tls = relay.terminator().accept_control(stream, &token).await?;
                Ok(ClientIo::Tls {
                    io: TlsIo::new(tls),
                    token,
                })
            }
            ClientIo::Tls { .. } => Err(std::io::Error::other("TLS is already on")),
        }
    }
}

/// The server's side of the control connection: plain TCP, or TLS with ftp-alg as TLS client
/// (`tls.upstream = "tls"`).
enum ServerIo {
    Plain {
        rx: OwnedReadHalf,
        tx: OwnedWriteHalf,
    },
    Tls(TlsIo<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl ServerIo {
    fn plain(stream: TcpStream) -> ServerIo {
        let (rx, tx) = stream.into_split();
        ServerIo::Plain { rx, tx }
    }

    /// As [`ClientIo::ready`].
    async fn ready(&mut self) -> std::io::Result<()> {
        match self {
            ServerIo::Plain { rx, .. } => rx.as_ref().readable().await,
            ServerIo::Tls(io) => io.ready().await,
        }
    }

    /// Feed the session what [`ServerIo::ready`] found.
    fn take_available(&mut self, session: &mut Session) -> std::io::Result<Read> {
        match self {
            ServerIo::Plain { rx, .. } => read_available(rx.as_ref(), session, Side::Server),
            ServerIo::Tls(io) => Ok(io.take(session, Side::Server)),
        }
    }

    async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            ServerIo::Plain { tx, .. } => tx.write_all(bytes).await,
            ServerIo::Tls(io) => io.write_all(bytes).await,
        }
    }

    /// An ABOR line: with RFC 959's Synch in clear; over TLS there is no urgent data to mark
    /// (the Telnet bytes would reach the server as part of the line), so the line goes alone,
    /// as FTPS clients send it.
    async fn send_synch(&mut self, line: &[u8]) -> std::io::Result<()> {
        match self {
            ServerIo::Plain { tx, .. } => send_synch(tx, line).await,
            ServerIo::Tls(io) => io.write_all(line).await,
        }
    }

    /// Shut down the write half (over TLS: after a close_notify).
    async fn shutdown(&mut self) -> std::io::Result<()> {
        match self {
            ServerIo::Plain { tx, .. } => tx.shutdown().await,
            ServerIo::Tls(io) => io.stream.shutdown().await,
        }
    }
}

/// Carry out `upstream_tls.rs`'s negotiation with the server on `upstream` (`AUTH TLS`, the
/// handshake as TLS client, `PBSZ 0`, `PROT P`), within `limit`: the secured connection and the
/// server's greeting for the session, or the reply for the client and why.
async fn secure_upstream(
    upstream: TcpStream,
    tls: &UpstreamSession,
    max_line: usize,
    limit: Duration,
) -> Result<(ServerIo, Vec<u8>), (Vec<u8>, upstream_tls::Refusal)> {
    let negotiate = async {
        let mut negotiation = Negotiation::new(max_line);
        let mut plain = Some(upstream);
        let mut secured: Option<tokio_rustls::client::TlsStream<TcpStream>> = None;
        let mut buf = vec![0u8; READ_BUFFER];
        loop {
            while let Some(output) = negotiation.poll_output() {
                match output {
                    Output::ToServer(bytes) => {
                        let written = match (&mut plain, &mut secured) {
                            (Some(stream), _) => stream.write_all(&bytes).await,
                            (None, Some(stream)) => match stream.write_all(&bytes).await {
                                Ok(()) => stream.flush().await,
                                Err(e) => Err(e),
                            },
                            (None, None) => Err(std::io::ErrorKind::NotConnected.into()),
                        };
                        if let Err(e) = written {
                            tracing::debug!(error = %e, "writing to the server failed");
                            negotiation.handle_eof();
                        }
                    }
                    Output::StartTls => {
                        let result = match plain.take() {
                            Some(stream) => tls.connect(stream).await,
                            None => Err(std::io::ErrorKind::NotConnected.into()),
                        };
                        match result {
                            Ok(stream) => {
                                let conn = stream.get_ref().1;
                                tracing::info!(version = ?conn.protocol_version(), "TLS with the server established");
                                secured = Some(stream);
                                negotiation.handle_tls(Ok(()));
                            }
                            Err(e) => negotiation.handle_tls(Err(crate::tls::describe(&e))),
                        }
                    }
                    Output::Ready(greeting) => {
                        return match secured {
                            Some(stream) => Ok((ServerIo::Tls(TlsIo::new(stream)), greeting)),
                            None => Err((
                                upstream_tls::REFUSED_REPLY.to_vec(),
                                upstream_tls::Refusal::Closed,
                            )),
                        };
                    }
                    Output::Refuse(reply, why) => return Err((reply, why)),
                }
            }
            let read = match (&mut plain, &mut secured) {
                (Some(stream), _) => stream.read(&mut buf).await,
                (None, Some(stream)) => stream.read(&mut buf).await,
                (None, None) => Ok(0),
            };
            match read {
                Ok(0) => negotiation.handle_eof(),
                Ok(n) => negotiation.handle_server_data(&buf[..n]),
                Err(e) => {
                    tracing::debug!(error = %e, "reading from the server failed");
                    negotiation.handle_eof();
                }
            }
        }
    };
    match tokio::time::timeout(limit, negotiate).await {
        Ok(result) => result,
        Err(_) => Err((
            upstream_tls::REFUSED_REPLY.to_vec(),
            upstream_tls::Refusal::Timeout,
        )),
    }
}

/// What [`read_available`] read.
struct Read {
    bytes: usize,
    eof: bool,
}

/// Feed `session` what the kernel holds for `stream` from `side` now, up to
/// [`READS_PER_WAKEUP`] reads. The buffer lives on the stack of this synchronous call, not in
/// the session's future, so an idle session holds no read buffer. It reads on after a short
/// read, since a read stops at TCP's urgent mark even inline and the rest of an ABOR line is
/// right behind it; it stops at `WouldBlock`, which re-arms tokio's readiness, or when the
/// client's backlog is full.
fn read_available(stream: &TcpStream, session: &mut Session, side: Side) -> std::io::Result<Read> {
    let mut buf = [0u8; READ_BUFFER];
    let mut read = Read {
        bytes: 0,
        eof: false,
    };
    for _ in 0..READS_PER_WAKEUP {
        if side == Side::Client && !session.wants_client_data() {
            break;
        }
        match stream.try_read(&mut buf) {
            Ok(0) => {
                read.eof = true;
                break;
            }
            Ok(n) => {
                read.bytes += n;
                match side {
                    Side::Client => session.handle_client_data(&buf[..n]),
                    Side::Server => session.handle_server_data(&buf[..n]),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(read)
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

/// Count what the session core did since the last call.
fn count_events(shared: &Shared, session: &mut Session) {
    while let Some(event) = session.poll_event() {
        match event {
            Event::Rewrote(kind) => shared.metrics.rewrote(kind),
            Event::Refused(reason) => shared.metrics.refused(reason),
        }
    }
}
