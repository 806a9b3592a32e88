//! The user-space relay of `PROT P` data connections (this kernel has no kTLS, and the data is
//! TLS towards the client, which only ftp-alg can end).
//!
//! The kernel path is kept as far as it goes: a `PROT P` announcement still gets a pinhole,
//! keyed as every pinhole is by the peer that will dial and the public port (DESIGN.md, "Ports"),
//! but its destination translation leads to the relay listener on this host instead of to the
//! other peer. The relay reads the connection's original destination (`SO_ORIGINAL_DST`), finds
//! the session that expects that peer on that port, and takes the expectation away, so one
//! pinhole admits one connection here too. Then it dials the other peer and copies, with
//! ftp-alg as the TLS server on the client's side under `PROT P` (RFC 4217 §9), and as the TLS
//! client on the server's side with a TLS upstream (`tls.upstream = "tls"`; else that side is
//! in clear):
//! - passive: the client dials in (TLS, which must resume its control session, see `tls.rs`),
//!   ftp-alg dials the server's data port from its upstream address (before the client's
//!   handshake: see [`Relay::run`]); only the client's own address reaches the relay, since
//!   the pinhole admits no other source;
//! - active: the server dials in, ftp-alg dials the client's announced port from the
//!   address the client knows, and does the TLS handshake as server on it.
//!
//! Towards a TLS upstream each data connection resumes the TLS session of ftp-alg's own control
//! connection with that server (vsftpd's `require_ssl_reuse=YES` refuses any other): the
//! session's [`UpstreamSession`] holds that session, and only it.
//!
//! Memory per connection is bounded: one buffer of `tls.relay_buffer` bytes per direction,
//! plus rustls's own bounded buffers. Bytes are counted in the metrics as they pass.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rustls::HandshakeKind;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tracing::Instrument;

use crate::metrics::Metrics;
use crate::origdst::original_destination;
use crate::pinhole::PinholeId;
use crate::session::{Expectation, RelayLeg};
use crate::tls::{Terminator, Token, Upstream, UpstreamSession};

/// How long a data connection's TLS handshake, and the relay's connection to the other peer,
/// may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a data connection is still taken after its pinhole was closed. In active mode the
/// server connects, sends a short listing, closes and answers 226 at once; the session can read
/// that 226 (and close the pinhole) before the relay has accepted the connection, which the
/// kernel let through and holds in the listen queue. Such a connection is taken from the queue
/// within milliseconds; nothing new reaches the relay through a closed pinhole.
const LINGER: Duration = Duration::from_secs(5);

/// A data connection a session waits for.
struct Job {
    pinhole: PinholeId,
    leg: RelayLeg,
    /// The client's TLS sessions carry this token (`PROT P`).
    token: Option<Token>,
    /// The session's TLS client towards the server (a TLS upstream).
    upstream: Option<UpstreamSession>,
    /// The session's span: the relay's log lines belong to it.
    span: tracing::Span,
    /// When its pinhole was closed (see [`LINGER`]).
    closed: Option<Instant>,
}

impl Job {
    fn live(&self, now: Instant) -> bool {
        self.closed
            .is_none_or(|closed| now.saturating_duration_since(closed) < LINGER)
    }
}

/// The waiting connections, keyed by (dialling peer, public port) as the pinholes are; for one
/// key, in the order they were announced, which is the order their connections arrive in (a
/// port is announced to a peer again only once the kernel has let its last connection through).
type Waiting = HashMap<(IpAddr, u16), VecDeque<Job>>;

/// The relay listeners' shared state: which session waits for which connection.
pub struct Relay {
    port: u16,
    terminator: Terminator,
    upstream: Option<Upstream>,
    buffer: usize,
    metrics: Arc<Metrics>,
    waiting: Mutex<Waiting>,
}

impl Relay {
    /// Bind the relay listeners: one IPv4 and one IPv6 socket on the same port, chosen by the
    /// kernel; a host without IPv6 gets the IPv4 one only.
    pub fn bind(
        terminator: Terminator,
        upstream: Option<Upstream>,
        buffer: usize,
        metrics: Arc<Metrics>,
    ) -> io::Result<(Arc<Relay>, Vec<TcpListener>)> {
        let v4 = crate::proxy::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0))?;
        let port = v4.local_addr()?.port();
        let mut listeners = vec![v4];
        match crate::proxy::bind(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port)) {
            Ok(v6) => listeners.push(v6),
            Err(e) => tracing::warn!(error = %e, port, "no IPv6 data relay listener"),
        }
        let relay = Relay {
            port,
            terminator,
            upstream,
            buffer,
            metrics,
            waiting: Mutex::new(HashMap::new()),
        };
        Ok((Arc::new(relay), listeners))
    }

    /// The listeners' port, which `PROT P` pinholes translate to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The TLS side of the daemon.
    pub fn terminator(&self) -> &Terminator {
        &self.terminator
    }

    /// ftp-alg as the TLS client of the server (`tls.upstream = "tls"`).
    pub fn upstream(&self) -> Option<&Upstream> {
        self.upstream.as_ref()
    }

    /// A session expects the data connection `expectation` describes; its client's TLS
    /// session carries `token` (under `PROT P`), and `upstream` is its TLS client towards the
    /// server (a TLS upstream).
    pub fn expect(
        &self,
        expectation: Expectation,
        token: Option<Token>,
        upstream: Option<UpstreamSession>,
    ) {
        let key = (expectation.leg.peer.to_canonical(), expectation.port);
        let job = Job {
            pinhole: expectation.pinhole,
            leg: expectation.leg,
            token,
            upstream,
            span: tracing::Span::current(),
            closed: None,
        };
        let mut jobs = self.jobs();
        jobs.entry(key).or_default().push_back(job);
    }

    /// The pinholes `ids` are closed: their connections are no longer expected, but for one
    /// the kernel has already let through (see [`LINGER`]).
    pub fn forget(&self, ids: &[PinholeId]) {
        let now = Instant::now();
        let mut jobs = self.jobs();
        for job in jobs.values_mut().flatten() {
            if ids.contains(&job.pinhole) && job.closed.is_none() {
                job.closed = Some(now);
            }
        }
    }

    /// The waiting connections, those past [`LINGER`] swept away.
    fn jobs(&self) -> std::sync::MutexGuard<'_, Waiting> {
        // A panic while holding the lock cannot leave the map half-changed: every change is
        // one call on it.
        let mut jobs = self
            .waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        jobs.retain(|_, queue| {
            queue.retain(|job| job.live(now));
            !queue.is_empty()
        });
        jobs
    }

    /// Accept data connections on `listener` for as long as the daemon runs.
    pub async fn serve(self: Arc<Relay>, listener: TcpListener) {
        loop {
            let (stream, peer) = crate::accept::next("data relay", || listener.accept()).await;
            let relay = self.clone();
            tokio::spawn(async move { relay.take(stream, peer).await });
        }
    }

    /// A connection arrived: relay it if a session expects it, else close it.
    async fn take(&self, stream: TcpStream, peer: SocketAddr) {
        let peer = peer.ip().to_canonical();
        let dialled = stream
            .local_addr()
            .and_then(|local| Ok((local, original_destination(&stream, local)?)));
        let (local, dialled) = match dialled {
            Ok(addrs) => addrs,
            Err(e) => {
                return tracing::info!(error = %e, %peer, "data relay: no original destination")
            }
        };
        // A connection straight to the relay port went through no pinhole.
        let job = (dialled != local)
            .then(|| self.jobs().get_mut(&(peer, dialled.port()))?.pop_front())
            .flatten();
        let Some(job) = job else {
            return tracing::warn!(%peer, %dialled, "data relay: no session expects this connection; closed");
        };
        let span = job.span.clone();
        self.run(job, stream).instrument(span).await;
    }

    async fn run(&self, job: Job, accepted: TcpStream) {
        let leg = job.leg;
        // Both ways, the server's side is connected first: a server announces the transfer
        // (150) only once its data connection is up, and clients such as lftp start the data
        // connection's TLS handshake only after that reply. A TLS server (vsftpd) starts its
        // handshake right after that 150, so the server's side is secured before the client's.
        let result = async {
            let (server, client) = match leg.passive {
                true => (dial(leg).await?, accepted),
                false => (accepted, dial(leg).await?),
            };
            let server = self.server_side(server, leg, job.upstream.as_ref()).await?;
            match self.client_side(client, leg, job.token.as_ref()).await {
                Some(client) => self.copy(client, server).await,
                None => Ok(()),
            }
        };
        match result.await {
            Ok(()) => tracing::debug!(pinhole = job.pinhole, "relayed data connection done"),
            Err(e) => {
                tracing::info!(pinhole = job.pinhole, error = %e, "relayed data connection ended")
            }
        }
    }

    /// The server's side: in clear, or TLS with ftp-alg as TLS client, resuming the session's
    /// control connection to the server.
    async fn server_side(
        &self,
        stream: TcpStream,
        leg: RelayLeg,
        upstream: Option<&UpstreamSession>,
    ) -> io::Result<Box<dyn Duplex>> {
        if !leg.server_tls {
            return Ok(Box::new(stream));
        }
        let upstream = upstream.ok_or_else(|| {
            io::Error::other("a TLS data connection to the server without the session's TLS client")
        })?;
        let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, upstream.connect(stream))
            .await
            .map_err(|_| {
                io::Error::new(io::ErrorKind::TimedOut, "server's TLS handshake timed out")
            })?
            .map_err(|e| io::Error::new(e.kind(), format!("server's TLS handshake: {e}")))?;
        let resumed = tls.get_ref().1.handshake_kind() == Some(HandshakeKind::Resumed);
        tracing::debug!(
            resumed,
            version = ?tls.get_ref().1.protocol_version(),
            "TLS with the server on a data connection"
        );
        Ok(Box::new(tls))
    }

    /// The client's side: in clear, or the TLS handshake with the client as TLS server; `None`
    /// when the handshake is refused.
    async fn client_side(
        &self,
        stream: TcpStream,
        leg: RelayLeg,
        token: Option<&Token>,
    ) -> Option<Box<dyn Duplex>> {
        if !leg.client_tls {
            return Some(Box::new(stream));
        }
        let accepted = match token {
            Some(token) => tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                self.terminator.accept_data(stream, token),
            )
            .await
            .unwrap_or(Err(crate::tls::DataRefusal::Handshake)),
            None => Err(crate::tls::DataRefusal::Handshake),
        };
        match accepted {
            Ok(tls) => {
                self.metrics.tls_data_connection();
                Some(Box::new(tls))
            }
            Err(why) => {
                tracing::warn!(
                    reason = why.as_str(),
                    "refused PROT P data connection: it must resume this session's TLS session"
                );
                self.metrics.tls_data_refused(why);
                None
            }
        }
    }

    /// Copy both ways until both are done, through `tls.relay_buffer` bytes per direction.
    async fn copy(&self, mut client: Box<dyn Duplex>, server: Box<dyn Duplex>) -> io::Result<()> {
        let mut server = Counted {
            inner: server,
            metrics: &self.metrics,
        };
        tokio::io::copy_bidirectional_with_sizes(&mut client, &mut server, self.buffer, self.buffer)
            .await
            .map(drop)
    }
}

/// Either side of a relayed data connection: TCP, or TLS over it.
trait Duplex: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Duplex for T {}

/// Connect to the other peer from the address it expects data from.
async fn dial(leg: RelayLeg) -> io::Result<TcpStream> {
    let socket = match leg.dial {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(leg.bind, 0))?;
    tokio::time::timeout(HANDSHAKE_TIMEOUT, socket.connect(leg.dial))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "data connect timed out"))?
}

/// The server's side of a relay, counting what passes: what is read from it goes to the
/// client, what is written to it came from the client.
struct Counted<'a> {
    inner: Box<dyn Duplex>,
    metrics: &'a Metrics,
}

impl AsyncRead for Counted<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len().saturating_sub(before);
        self.metrics.relayed(true, read as u64);
        polled
    }
}

impl AsyncWrite for Counted<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(written)) = &polled {
            self.metrics.relayed(false, *written as u64);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
