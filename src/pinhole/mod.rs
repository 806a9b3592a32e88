//! Pinholes: the firewall side of ftp-alg.
//!
//! A pinhole lets exactly one kind of new connection through the kernel's firewall: from one
//! source address to one destination address and port, optionally translated (DNAT to where
//! the data endpoint really listens, SNAT so the peer sees the address it expects), for a
//! limited time enforced by the kernel. [`Pinholes`] hands out public ports, keeps the registry of
//! what is open and drives a [`Backend`]. The real backend is a [`Firewall`]: it batches requests
//! and applies them as nftables set and map elements, either over a netlink socket
//! ([`netlink`]) or through the nft program ([`nft`], which also loads the table and lists
//! pinholes). Sessions never touch any of this directly: they ask for pinholes through
//! `session::Action::Open`.
//!
//! A window is the wide cousin of a pinhole, for a gateway session that has gone TLS
//! (`policy.tls_window`, asked for with `session::Action::OpenWindow`): every new connection
//! from the session's client to its server's ports [`WINDOW_PORTS`], for as long as the
//! session lives. It is kept in the same registry, listed and closed like a pinhole, but takes
//! no port from the pool; its kernel timeout is renewed by [`Pinholes::refresh_windows`] while
//! the session lives, so that a crashed daemon's windows go within one pinhole timeout.

mod batch;
pub mod netlink;
pub mod nft;

pub use batch::Firewall;

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use tokio::sync::Notify;

use crate::ports::{Dialler, PortPool};

/// Pinholes removed by one backend request at most (the worker retries a refused batch one
/// request at a time, so a request must fit in one transaction on its own).
const REMOVAL_CHUNK: usize = 64;
/// While an announcement waits for a port, how soon it first asks the kernel again whether one
/// of the peer's pinholes has been used; the pause doubles up to [`MAX_PORT_POLL`]. A peer's
/// connection usually follows the announcement within a round trip, so the first look is soon.
const FIRST_PORT_POLL: Duration = Duration::from_millis(1);
/// The longest pause between two looks.
const MAX_PORT_POLL: Duration = Duration::from_millis(16);
/// The server ports a window opens: every unprivileged one, where servers put passive data
/// ports (DESIGN.md: data ports below 1024 are refused).
pub const WINDOW_PORTS: std::ops::RangeInclusive<u16> = 1024..=65535;

/// Identifies an open pinhole within one daemon run.
pub type PinholeId = u64;

/// What the kernel must let through, exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pinhole {
    /// The only address the data connection may come from.
    pub source: IpAddr,
    /// The address and port the data connection is addressed to when it arrives; for a
    /// window, its server and first port.
    pub dial: SocketAddr,
    /// A window's last port (`None`: a pinhole, for `dial`'s port alone).
    pub last_port: Option<u16>,
    /// Where the connection is sent instead of `dial`, if anywhere.
    pub dnat: Option<SocketAddr>,
    /// The source address the connection is given on its way out, if rewritten.
    pub snat: Option<IpAddr>,
    /// Who the pinhole is for; stored with it in the kernel.
    pub label: Label,
    /// Kernel-side lifetime.
    pub timeout: Duration,
}

impl Pinhole {
    /// The tuple a translated connection has after DNAT: what the SNAT map is keyed on.
    pub fn translated(&self) -> SocketAddr {
        self.dnat.unwrap_or(self.dial)
    }
}

/// Who a pinhole belongs to: kept in the kernel element's comment, so that `pinholes list`
/// can say it even when the daemon is not running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Label {
    /// The session that opened it.
    pub session: u64,
    /// The control connection's client.
    pub client: IpAddr,
    /// The control connection's server.
    pub server: IpAddr,
}

impl Label {
    /// The kernel comment form, led by the process id of the daemon that owns the pinhole
    /// (two generations share the table during a hand-over, and a daemon starting up sweeps
    /// only the pinholes of processes that are gone):
    /// `pid=4242 session=7 client=198.18.0.2 server=203.0.113.2`.
    pub fn to_comment(&self, owner: u32) -> String {
        format!(
            "pid={owner} session={} client={} server={}",
            self.session, self.client, self.server
        )
    }

    /// The owner's process id in a comment, if it names one (earlier versions did not).
    pub fn owner_of(comment: &str) -> Option<u32> {
        comment
            .split_whitespace()
            .find_map(|field| field.strip_prefix("pid="))
            .and_then(|pid| pid.parse().ok())
    }

    /// Parse [`Label::to_comment`]'s output (with or without the owner); `None` for anything
    /// else.
    pub fn from_comment(comment: &str) -> Option<Label> {
        let mut session = None;
        let mut client = None;
        let mut server = None;
        for field in comment.split_whitespace() {
            match field.split_once('=')? {
                ("pid", _) => {}
                ("session", v) => session = v.parse().ok(),
                ("client", v) => client = v.parse().ok(),
                ("server", v) => server = v.parse().ok(),
                _ => return None,
            }
        }
        Some(Label {
            session: session?,
            client: client?,
            server: server?,
        })
    }
}

/// A session's request for a pinhole; the manager picks the public port when asked to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinholeRequest {
    /// The only address the data connection may come from.
    pub source: IpAddr,
    /// The address the data connection will be addressed to.
    pub dial_ip: IpAddr,
    /// The port it will be addressed to; `None`: allocate one from the pool.
    pub dial_port: Option<u16>,
    /// Where to send it instead.
    pub dnat: Option<SocketAddr>,
    /// Source address to give it.
    pub snat: Option<IpAddr>,
    /// Who it is for.
    pub label: Label,
}

impl PinholeRequest {
    /// Who will dial the pinhole's port: the session's server (active mode: it may dial from a
    /// fixed port, so TIME_WAIT can bite) or its client.
    pub fn dialler(&self) -> Dialler {
        if self.source == self.label.server {
            Dialler::Server
        } else {
            Dialler::Client
        }
    }
}

/// A session's request for a window (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowRequest {
    /// The session: its client may connect to its server's ports [`WINDOW_PORTS`].
    pub label: Label,
    /// The source address the connections are given: this host's address on the session's
    /// upstream connection, which servers expect data connections from.
    pub snat: IpAddr,
    /// Windows the client may hold at once (`limits.max_windows_per_client`).
    pub max_per_client: usize,
}

/// Whether a pinhole's connection has arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PinholeState {
    /// It admits one connection, which has not arrived yet.
    Waiting,
    /// Its connection has arrived (and is tracked by conntrack); its address translation stays
    /// until the transfer ends. It admits no further connection.
    Used,
    /// A window: it admits every new connection it matches until it is removed.
    Open,
}

/// What an entry of `pinholes list` is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PinholeKind {
    /// One data connection to one port.
    #[default]
    Pinhole,
    /// A TLS session's window: any new connection from its client to a range of its server's
    /// ports.
    Window,
}

/// A pinhole as the kernel holds it: what `pinholes list --json` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinholeEntry {
    /// The daemon's id for it (what `pinholes close` takes); `None` when read from the kernel
    /// without the daemon, or for a pinhole the daemon no longer tracks.
    #[serde(default)]
    pub id: Option<PinholeId>,
    /// A pinhole or a window.
    #[serde(default)]
    pub kind: PinholeKind,
    /// Waiting for its connection, used, or (a window) open.
    pub state: PinholeState,
    /// Session id, or `None` when the element has no ftp-alg label.
    pub session: Option<u64>,
    /// The control connection's client.
    pub client: Option<IpAddr>,
    /// The control connection's server.
    pub server: Option<IpAddr>,
    /// The only source allowed.
    pub source: IpAddr,
    /// What the data connection dials (a window: its server and first port).
    pub dial: SocketAddr,
    /// A window's last port.
    #[serde(default)]
    pub last_port: Option<u16>,
    /// Where it is sent instead.
    pub maps_to: Option<SocketAddr>,
    /// The source address it is given.
    pub snat: Option<IpAddr>,
    /// Seconds until the kernel drops the pinhole.
    pub seconds_left: u64,
}

/// Errors of a firewall backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The nft program could not be started or talked to.
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    /// nft ran and refused the change.
    #[error("{program} failed ({status}): {stderr}")]
    Refused {
        program: String,
        status: String,
        stderr: String,
    },
    /// nft's output could not be understood.
    #[error("unexpected output from {program}: {message}")]
    Output { program: String, message: String },
    /// The kernel refused a netlink request, or the netlink socket failed; `action` says what
    /// was being done (which element, in which set), `errno` why.
    #[error("netlink: {action}: {}", std::io::Error::from_raw_os_error(*errno))]
    Netlink { action: String, errno: i32 },
    /// The request cannot be expressed as set elements (such as a pinhole from an IPv4 source
    /// to an IPv6 address).
    #[error("{0}")]
    Invalid(String),
    /// The batching worker is gone (the daemon is shutting down).
    #[error("the firewall worker has stopped")]
    WorkerGone,
}

impl BackendError {
    /// The kernel answered EBUSY: a set's hash chain is full of dead copies of one key. The
    /// packet path only marks a used pin element dead, and the set's garbage collection
    /// removes it later; a port handed to the same peer for transfer after transfer, a few
    /// hundred times faster than that, meets this (`netlink_reuses_one_key_quickly` in
    /// tests/pinhole_backends.rs, with no port wait). It passes once the collection has run.
    pub fn is_busy(&self) -> bool {
        match self {
            BackendError::Netlink { errno, .. } => *errno == libc::EBUSY,
            BackendError::Refused { stderr, .. } => stderr.contains("Device or resource busy"),
            _ => false,
        }
    }
}

/// One batch's result goes to every request in it, so errors are cloned; an I/O error is not
/// `Clone`, so its copy keeps its kind and message.
impl Clone for BackendError {
    fn clone(&self) -> Self {
        match self {
            BackendError::Spawn { program, source } => BackendError::Spawn {
                program: program.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            BackendError::Refused {
                program,
                status,
                stderr,
            } => BackendError::Refused {
                program: program.clone(),
                status: status.clone(),
                stderr: stderr.clone(),
            },
            BackendError::Output { program, message } => BackendError::Output {
                program: program.clone(),
                message: message.clone(),
            },
            BackendError::Netlink { action, errno } => BackendError::Netlink {
                action: action.clone(),
                errno: *errno,
            },
            BackendError::Invalid(message) => BackendError::Invalid(message.clone()),
            BackendError::WorkerGone => BackendError::WorkerGone,
        }
    }
}

/// Why a pinhole could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Every port in the configured range already waits for a connection from this peer, and
    /// none was used within `pinholes.port_wait_ms`.
    #[error("every data port already waits for a connection from this peer")]
    PortsExhausted,
    /// The client holds `limits.max_windows_per_client` windows already.
    #[error("the client holds {0} windows already (limits.max_windows_per_client)")]
    WindowLimit(usize),
    /// The firewall refused or failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The daemon is shutting down and removing every pinhole.
    #[error("the daemon is shutting down")]
    ShuttingDown,
}

/// The firewall operations ftp-alg needs; [`Firewall`] is the real one.
///
/// Both calls queue their request before they return, so requests are applied in call order
/// even when the returned futures are awaited later, elsewhere, or not at all.
pub trait Backend: Send + Sync + 'static {
    /// Install pinholes, all or none.
    fn install(
        &self,
        pinholes: Vec<Pinhole>,
    ) -> impl Future<Output = Result<(), BackendError>> + Send + use<Self>;
    /// Remove pinholes; one that has already expired is not an error.
    fn remove(
        &self,
        pinholes: Vec<Pinhole>,
    ) -> impl Future<Output = Result<(), BackendError>> + Send + use<Self>;
    /// Write pinholes again with a fresh kernel timeout (windows, while their session lives);
    /// one no longer open is left alone.
    fn refresh(
        &self,
        pinholes: Vec<Pinhole>,
    ) -> impl Future<Output = Result<(), BackendError>> + Send + use<Self>;
    /// Whether each pinhole still waits for its connection: the kernel deletes a pinhole's
    /// set element when the connection arrives (or when it times out), and tells nobody.
    fn waiting(
        &self,
        pinholes: Vec<Pinhole>,
    ) -> impl Future<Output = Result<Vec<bool>, BackendError>> + Send + use<Self>;
}

/// A pinhole opened by this daemon run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    /// Handle for closing it.
    pub id: PinholeId,
    /// The port the data connection dials (allocated or as requested).
    pub dial_port: u16,
}

/// Counts of one daemon run's pinholes, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PinholeStats {
    /// Open now (as far as the daemon knows: some may have run out in the kernel).
    pub open: u64,
    /// Installed since start.
    pub opened: u64,
    /// Removed by the daemon before their kernel timeout.
    pub closed: u64,
    /// Removed by the daemon after their kernel timeout had already run out.
    pub expired: u64,
    /// Announcements that found every port already waiting for the same peer and waited for
    /// one (whether they got it or not): how often a load asks for more ports.
    pub waited: u64,
    /// Windows open now (not counted in `open`).
    pub windows_open: u64,
    /// Windows installed since start.
    pub windows_opened: u64,
    /// Windows refused since start: over the client's limit, or the firewall failed.
    pub windows_refused: u64,
}

/// One open pinhole in the registry.
struct OpenPinhole {
    pinhole: Pinhole,
    /// Who dials it, when its port came from the pool (and goes back to it).
    pooled: Option<Dialler>,
    opened_at: Instant,
}

struct Registry {
    ports: PortPool,
    open: HashMap<PinholeId, OpenPinhole>,
    next_id: PinholeId,
    stats: PinholeStats,
    /// Set by [`Pinholes::refuse_new`].
    refusing: bool,
}

/// The registry of open pinholes, the port pool, and the backend that makes them real.
pub struct Pinholes<B> {
    backend: B,
    timeout: Duration,
    /// How long an announcement may wait for a port (see [`Pinholes::open`]).
    port_wait: Duration,
    registry: Mutex<Registry>,
    /// Woken when pinholes are closed: a waiting announcement may find its port free.
    released: Notify,
}

impl<B: Backend> Pinholes<B> {
    /// `timeout` is the kernel-side lifetime of each pinhole.
    pub fn new(backend: B, ports: PortPool, timeout: Duration) -> Self {
        Pinholes {
            backend,
            timeout,
            port_wait: Duration::ZERO,
            released: Notify::new(),
            registry: Mutex::new(Registry {
                ports,
                open: HashMap::new(),
                next_id: 1,
                stats: PinholeStats::default(),
                refusing: false,
            }),
        }
    }

    /// How long [`Pinholes::open`] may wait for a port when every port already waits for the
    /// same peer (`pinholes.port_wait_ms`); zero (the default) does not wait.
    pub fn with_port_wait(mut self, port_wait: Duration) -> Self {
        self.port_wait = port_wait;
        self
    }

    /// Reserve a port if asked to, install the pinhole, and return once the kernel has it.
    ///
    /// When every port already waits for a connection from the same peer, the kernel is asked
    /// which of those pinholes have been used since (their set element is gone), and those
    /// ports are free again; if none is, the announcement waits for one, looking again after
    /// a short pause or when a pinhole is closed, for up to the port wait. Then
    /// [`OpenError::PortsExhausted`].
    pub async fn open(&self, request: &PinholeRequest) -> Result<Opened, OpenError> {
        let deadline = Instant::now() + self.port_wait;
        let mut pause = FIRST_PORT_POLL;
        let mut counted = false;
        loop {
            // Armed before looking, so that a close in between is not missed.
            let released = self.released.notified();
            let Some((id, pinhole, pooled)) = self.reserve(request)? else {
                if self.reclaim_used(request.source).await? > 0 {
                    continue;
                }
                if !counted {
                    counted = true;
                    self.lock().stats.waited += 1;
                }
                let now = Instant::now();
                if now >= deadline {
                    tracing::debug!(source = %request.source, "no port free for this peer");
                    return Err(OpenError::PortsExhausted);
                }
                let _ = tokio::time::timeout(pause.min(deadline - now), released).await;
                pause = (pause * 2).min(MAX_PORT_POLL);
                continue;
            };
            let error = match self.backend.install(vec![pinhole.clone()]).await {
                Ok(()) => {
                    let port = pinhole.dial.port();
                    let mut reg = self.lock();
                    reg.stats.opened += 1;
                    let opened_at = Instant::now();
                    reg.open.insert(
                        id,
                        OpenPinhole {
                            pinhole,
                            pooled,
                            opened_at,
                        },
                    );
                    return Ok(Opened {
                        id,
                        dial_port: port,
                    });
                }
                Err(e) => e,
            };
            if let Some(dialler) = pooled {
                self.lock().ports.release(
                    pinhole.source,
                    pinhole.dial.port(),
                    id,
                    dialler,
                    Instant::now(),
                );
                self.released.notify_waiters();
            }
            let now = Instant::now();
            if !error.is_busy() || now >= deadline {
                return Err(error.into());
            }
            tracing::debug!(%error, "the kernel is still collecting this key's used copies; retrying");
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(MAX_PORT_POLL);
        }
    }

    /// An id and the pinhole for `request`, with its port reserved if it comes from the pool;
    /// `None` when every port of the pool waits for this request's source already.
    fn reserve(
        &self,
        request: &PinholeRequest,
    ) -> Result<Option<(PinholeId, Pinhole, Option<Dialler>)>, OpenError> {
        let mut reg = self.lock();
        if reg.refusing {
            return Err(OpenError::ShuttingDown);
        }
        let id = reg.next_id;
        let (port, pooled) = match request.dial_port {
            Some(port) => (port, None),
            None => match reg.ports.reserve(request.source, id, Instant::now()) {
                Some(port) => (port, Some(request.dialler())),
                None => return Ok(None),
            },
        };
        reg.next_id += 1;
        let pinhole = Pinhole {
            source: request.source,
            dial: SocketAddr::new(request.dial_ip, port),
            last_port: None,
            dnat: request.dnat,
            snat: request.snat,
            label: request.label,
            timeout: self.timeout,
        };
        Ok(Some((id, pinhole, pooled)))
    }

    /// Ask the kernel which of the pinholes that hold a port for `source` have been used (or
    /// have timed out), and free their ports for `source`; how many were freed.
    async fn reclaim_used(&self, source: IpAddr) -> Result<usize, OpenError> {
        let held: Vec<(PinholeId, Pinhole, Dialler)> = {
            let reg = self.lock();
            reg.ports
                .reservations(source, Instant::now())
                .into_iter()
                // A reservation whose pinhole is still being installed is not in `open` yet,
                // and certainly not used.
                .filter_map(|(_, id)| {
                    let open = reg.open.get(&id)?;
                    Some((id, open.pinhole.clone(), open.pooled?))
                })
                .collect()
        };
        if held.is_empty() {
            return Ok(0);
        }
        let waiting = self
            .backend
            .waiting(held.iter().map(|(_, p, _)| p.clone()).collect())
            .await?;
        let mut reg = self.lock();
        let now = Instant::now();
        let mut freed = 0;
        for ((id, pinhole, dialler), waiting) in held.iter().zip(waiting) {
            if !waiting {
                reg.ports
                    .consumed(source, pinhole.dial.port(), *id, *dialler, now);
                freed += 1;
            }
        }
        Ok(freed)
    }

    /// Remove pinholes from the kernel and release their ports. Unknown ids are ignored. The
    /// removal is queued before this returns (see [`Backend`]); the future reports its result.
    pub fn close(
        &self,
        ids: &[PinholeId],
    ) -> impl Future<Output = Result<(), BackendError>> + Send + 'static {
        let removed: Vec<Pinhole> = {
            let mut reg = self.lock();
            let now = Instant::now();
            let mut removed = Vec::new();
            for id in ids {
                if let Some(open) = reg.open.remove(id) {
                    let pinhole = open.pinhole;
                    if let Some(dialler) = open.pooled {
                        reg.ports
                            .release(pinhole.source, pinhole.dial.port(), *id, dialler, now);
                    }
                    if pinhole.last_port.is_some() {
                        // A window's timeout is renewed while it is open: it never runs out.
                    } else if now.duration_since(open.opened_at) >= pinhole.timeout {
                        reg.stats.expired += 1;
                    } else {
                        reg.stats.closed += 1;
                    }
                    removed.push(pinhole);
                }
            }
            removed
        };
        if !removed.is_empty() {
            self.released.notify_waiters();
        }
        let sent = removed.chunks(REMOVAL_CHUNK);
        all_chunks(sent.map(|c| self.backend.remove(c.to_vec())).collect())
    }

    /// Install a window for a session, unless its client holds its limit of windows already
    /// ([`OpenError::WindowLimit`]); return once the kernel has it. Two sessions of one client
    /// to one server share the kernel element (the backend counts its owners).
    pub async fn open_window(&self, request: &WindowRequest) -> Result<Opened, OpenError> {
        let first = *WINDOW_PORTS.start();
        let window = Pinhole {
            source: request.label.client,
            dial: SocketAddr::new(request.label.server, first),
            last_port: Some(*WINDOW_PORTS.end()),
            dnat: None,
            snat: Some(request.snat),
            label: request.label,
            timeout: self.timeout,
        };
        let id = {
            let mut reg = self.lock();
            if reg.refusing {
                return Err(OpenError::ShuttingDown);
            }
            let held = reg
                .open
                .values()
                .filter(|o| o.pinhole.last_port.is_some() && o.pinhole.source == window.source)
                .count();
            if held >= request.max_per_client {
                reg.stats.windows_refused += 1;
                return Err(OpenError::WindowLimit(held));
            }
            let id = reg.next_id;
            reg.next_id += 1;
            // In the registry before the kernel has it, so that a second session of the same
            // client, opening at the same time, counts it against the limit.
            reg.open.insert(
                id,
                OpenPinhole {
                    pinhole: window.clone(),
                    pooled: None,
                    opened_at: Instant::now(),
                },
            );
            id
        };
        let installed = self.backend.install(vec![window]).await;
        let mut reg = self.lock();
        match installed {
            Ok(()) => {
                reg.stats.windows_opened += 1;
                Ok(Opened {
                    id,
                    dial_port: first,
                })
            }
            Err(e) => {
                reg.open.remove(&id);
                reg.stats.windows_refused += 1;
                Err(e.into())
            }
        }
    }

    /// Renew the kernel timeout of every open window; the daemon calls it well within one
    /// timeout, for as long as it runs.
    pub fn refresh_windows(
        &self,
    ) -> impl Future<Output = Result<(), BackendError>> + Send + 'static {
        let windows: Vec<Pinhole> = self
            .lock()
            .open
            .values()
            .filter(|o| o.pinhole.last_port.is_some())
            .map(|o| o.pinhole.clone())
            .collect();
        let sent = windows.chunks(REMOVAL_CHUNK);
        all_chunks(sent.map(|c| self.backend.refresh(c.to_vec())).collect())
    }

    /// Every open window's id and session.
    pub fn windows(&self) -> Vec<(PinholeId, u64)> {
        self.lock()
            .open
            .iter()
            .filter(|(_, o)| o.pinhole.last_port.is_some())
            .map(|(id, o)| (*id, o.pinhole.label.session))
            .collect()
    }

    /// The session whose window `id` is; `None` when `id` is not an open window.
    pub fn window_session(&self, id: PinholeId) -> Option<u64> {
        self.lock()
            .open
            .get(&id)
            .filter(|o| o.pinhole.last_port.is_some())
            .map(|o| o.pinhole.label.session)
    }

    /// Refuse every later [`Pinholes::open`]: the daemon is about to remove every pinhole.
    pub fn refuse_new(&self) {
        self.lock().refusing = true;
    }

    /// Number of pinholes this run has open.
    pub fn open_count(&self) -> usize {
        self.lock().open.len()
    }

    /// Whether `id` is open.
    pub fn is_open(&self, id: PinholeId) -> bool {
        self.lock().open.contains_key(&id)
    }

    /// The ids of every open pinhole.
    pub fn open_ids(&self) -> Vec<PinholeId> {
        self.lock().open.keys().copied().collect()
    }

    /// Every open pinhole's id, by the source and endpoint it admits: how a kernel listing
    /// (which has no ids) is matched to the daemon's pinholes.
    pub fn ids_by_endpoint(&self) -> HashMap<(IpAddr, SocketAddr), PinholeId> {
        self.lock()
            .open
            .iter()
            .map(|(id, o)| ((o.pinhole.source, o.pinhole.dial), *id))
            .collect()
    }

    /// Data ports on which some peer's pinhole waits now. A port is shared by peers, so the
    /// others are free for everyone and these for every peer but the ones waiting.
    pub fn ports_in_use(&self) -> usize {
        self.lock().ports.ports_waiting(Instant::now())
    }

    /// The run's counts so far.
    pub fn stats(&self) -> PinholeStats {
        let reg = self.lock();
        let windows = reg
            .open
            .values()
            .filter(|o| o.pinhole.last_port.is_some())
            .count() as u64;
        PinholeStats {
            open: reg.open.len() as u64 - windows,
            windows_open: windows,
            ..reg.stats
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        // The registry holds no invariant that a panicking holder could break half-way, so a
        // poisoned lock is still safe to use.
        self.registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Wait for every chunk's transaction; the last error, if any. Removals and renewals go in
/// chunks of [`REMOVAL_CHUNK`]: one transaction for thousands of pinholes (a flush) could
/// outgrow what the kernel takes in one message, and would fail whole.
async fn all_chunks<F>(sent: Vec<F>) -> Result<(), BackendError>
where
    F: Future<Output = Result<(), BackendError>>,
{
    let mut result = Ok(());
    for chunk in sent {
        if let Err(e) = chunk.await {
            result = Err(e);
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn label_round_trips_through_the_kernel_comment() {
        let label = Label {
            session: 42,
            client: "2001:db8:a::2".parse().unwrap(),
            server: "203.0.113.2".parse().unwrap(),
        };
        assert_eq!(Label::from_comment(&label.to_comment(4242)), Some(label));
        assert_eq!(Label::owner_of(&label.to_comment(4242)), Some(4242));
        assert_eq!(
            Label::from_comment("session=42 client=2001:db8:a::2 server=203.0.113.2"),
            Some(label),
            "comments without an owner, as earlier versions wrote them"
        );
        assert_eq!(Label::owner_of("session=42 client=x server=y"), None);
        assert_eq!(Label::from_comment("hand-made element"), None);
        assert_eq!(Label::from_comment("session=1 client=x server=y"), None);
    }

    /// Records calls; fails installs when told to; says a pinhole was used once its
    /// dial port is in `used`.
    #[derive(Default)]
    struct Recorder {
        fail: bool,
        installed: Mutex<Vec<Pinhole>>,
        removed: Mutex<Vec<Pinhole>>,
        refreshed: Mutex<Vec<Pinhole>>,
        used: Mutex<Vec<u16>>,
        asked: Mutex<usize>,
    }

    impl Backend for Arc<Recorder> {
        fn install(
            &self,
            p: Vec<Pinhole>,
        ) -> impl Future<Output = Result<(), BackendError>> + Send + use<> {
            let result = if self.fail {
                Err(BackendError::WorkerGone)
            } else {
                self.installed.lock().unwrap().extend(p);
                Ok(())
            };
            std::future::ready(result)
        }
        fn remove(
            &self,
            p: Vec<Pinhole>,
        ) -> impl Future<Output = Result<(), BackendError>> + Send + use<> {
            self.removed.lock().unwrap().extend(p);
            std::future::ready(Ok(()))
        }
        fn refresh(
            &self,
            p: Vec<Pinhole>,
        ) -> impl Future<Output = Result<(), BackendError>> + Send + use<> {
            self.refreshed.lock().unwrap().extend(p);
            std::future::ready(Ok(()))
        }
        fn waiting(
            &self,
            p: Vec<Pinhole>,
        ) -> impl Future<Output = Result<Vec<bool>, BackendError>> + Send + use<> {
            *self.asked.lock().unwrap() += 1;
            let used = self.used.lock().unwrap();
            std::future::ready(Ok(p
                .iter()
                .map(|p| !used.contains(&p.dial.port()))
                .collect()))
        }
    }

    const HOLD: Duration = Duration::from_secs(30);

    fn one_port(rec: &Arc<Recorder>, wait: Duration) -> Pinholes<Arc<Recorder>> {
        Pinholes::new(
            rec.clone(),
            PortPool::new(61000, 61000, HOLD, Duration::ZERO),
            HOLD,
        )
        .with_port_wait(wait)
    }

    /// A passive request (the client dials) from `client`.
    fn passive_from(client: &str) -> PinholeRequest {
        let client: IpAddr = client.parse().unwrap();
        PinholeRequest {
            source: client,
            dial_ip: "198.18.0.1".parse().unwrap(),
            dial_port: None,
            dnat: Some("203.0.113.2:40000".parse().unwrap()),
            snat: Some("203.0.113.1".parse().unwrap()),
            label: Label {
                session: 1,
                client,
                server: "203.0.113.2".parse().unwrap(),
            },
        }
    }

    #[test]
    fn one_port_serves_many_clients_at_once() {
        let rec = Arc::new(Recorder::default());
        let pinholes = one_port(&rec, Duration::ZERO);
        for n in 2..50 {
            let opened = block_on(pinholes.open(&passive_from(&format!("198.18.1.{n}")))).unwrap();
            assert_eq!(opened.dial_port, 61000);
        }
        assert_eq!(*rec.asked.lock().unwrap(), 0, "no kernel query needed");
    }

    #[test]
    fn the_same_client_gets_the_port_again_once_its_connection_arrived() {
        let rec = Arc::new(Recorder::default());
        let pinholes = one_port(&rec, Duration::from_millis(500));
        let first = block_on(pinholes.open(&passive_from("198.18.0.2"))).unwrap();
        // The first pinhole's connection arrives a little later.
        let used = {
            let rec = rec.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(30));
                rec.used.lock().unwrap().push(61000);
            })
        };
        let started = Instant::now();
        let second = block_on(pinholes.open(&passive_from("198.18.0.2"))).unwrap();
        used.join().unwrap();
        assert_eq!(second.dial_port, 61000);
        assert!(started.elapsed() >= Duration::from_millis(30));
        assert!(
            pinholes.is_open(first.id),
            "the used pinhole stays until its transfer ends"
        );
    }

    #[test]
    fn an_unused_port_answers_exhausted_after_the_wait() {
        let rec = Arc::new(Recorder::default());
        let pinholes = one_port(&rec, Duration::from_millis(100));
        block_on(pinholes.open(&passive_from("198.18.0.2"))).unwrap();
        let started = Instant::now();
        let refused = block_on(pinholes.open(&passive_from("198.18.0.2")));
        assert!(
            matches!(refused, Err(OpenError::PortsExhausted)),
            "{refused:?}"
        );
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(100) && waited < Duration::from_secs(2),
            "{waited:?}"
        );
        assert!(
            *rec.asked.lock().unwrap() > 1,
            "the kernel was asked again while waiting"
        );
        assert_eq!(pinholes.stats().waited, 1, "one announcement waited");
    }

    #[test]
    fn closing_a_waiting_pinhole_frees_its_port_for_a_waiting_announcement() {
        let rec = Arc::new(Recorder::default());
        let pinholes = Arc::new(one_port(&rec, Duration::from_secs(5)));
        let first = block_on(pinholes.open(&passive_from("198.18.0.2"))).unwrap();
        let closer = {
            let pinholes = pinholes.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(30));
                block_on(pinholes.close(&[first.id])).unwrap();
            })
        };
        let started = Instant::now();
        let second = block_on(pinholes.open(&passive_from("198.18.0.2"))).unwrap();
        closer.join().unwrap();
        assert_eq!(second.dial_port, 61000);
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    fn request(port: Option<u16>) -> PinholeRequest {
        PinholeRequest {
            source: "203.0.113.2".parse().unwrap(),
            dial_ip: "203.0.113.1".parse().unwrap(),
            dial_port: port,
            dnat: Some("198.18.0.2:40000".parse().unwrap()),
            snat: None,
            label: Label {
                session: 1,
                client: "198.18.0.2".parse().unwrap(),
                server: "203.0.113.2".parse().unwrap(),
            },
        }
    }

    fn block_on<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn open_allocates_installs_and_close_releases() {
        let rec = Arc::new(Recorder::default());
        let pinholes = Pinholes::new(
            rec.clone(),
            PortPool::new(61000, 61001, HOLD, Duration::ZERO),
            Duration::from_secs(30),
        );
        let opened = block_on(pinholes.open(&request(None))).unwrap();
        assert_eq!(opened.dial_port, 61000);
        assert_eq!(
            rec.installed.lock().unwrap()[0].dial,
            "203.0.113.1:61000".parse().unwrap()
        );
        block_on(pinholes.close(&[opened.id, 999])).unwrap();
        assert_eq!(rec.removed.lock().unwrap().len(), 1);
        assert_eq!(pinholes.open_count(), 0);
    }

    #[test]
    fn failed_install_gives_the_port_back() {
        let rec = Arc::new(Recorder {
            fail: true,
            ..Default::default()
        });
        let pinholes = Pinholes::new(
            rec,
            PortPool::new(61000, 61000, HOLD, Duration::ZERO),
            Duration::from_secs(30),
        );
        assert!(block_on(pinholes.open(&request(None))).is_err());
        assert!(block_on(pinholes.open(&request(None))).is_err());
        assert_eq!(pinholes.lock().ports.reserved(), 0);
    }

    fn window_for(client: &str, session: u64) -> WindowRequest {
        WindowRequest {
            label: Label {
                session,
                client: client.parse().unwrap(),
                server: "203.0.113.2".parse().unwrap(),
            },
            snat: "203.0.113.1".parse().unwrap(),
            max_per_client: 2,
        }
    }

    #[test]
    fn windows_are_limited_per_client_refreshed_and_closed() {
        let rec = Arc::new(Recorder::default());
        let pinholes = one_port(&rec, Duration::ZERO);
        let a = block_on(pinholes.open_window(&window_for("198.18.0.2", 1))).unwrap();
        let b = block_on(pinholes.open_window(&window_for("198.18.0.2", 2))).unwrap();
        let refused = block_on(pinholes.open_window(&window_for("198.18.0.2", 3)));
        assert!(
            matches!(refused, Err(OpenError::WindowLimit(2))),
            "{refused:?}"
        );
        // Another client has a limit of its own.
        block_on(pinholes.open_window(&window_for("198.18.0.3", 4))).unwrap();
        let installed = rec.installed.lock().unwrap().clone();
        assert_eq!(installed.len(), 3);
        assert_eq!(installed[0].dial, "203.0.113.2:1024".parse().unwrap());
        assert_eq!(installed[0].last_port, Some(65535));
        assert_eq!(installed[0].snat, Some("203.0.113.1".parse().unwrap()));
        assert_eq!(pinholes.window_session(b.id), Some(2));
        let stats = pinholes.stats();
        assert_eq!(
            (
                stats.open,
                stats.windows_open,
                stats.windows_opened,
                stats.windows_refused
            ),
            (0, 3, 3, 1)
        );
        block_on(pinholes.refresh_windows()).unwrap();
        assert_eq!(rec.refreshed.lock().unwrap().len(), 3);
        block_on(pinholes.close(&[a.id])).unwrap();
        assert_eq!(pinholes.window_session(a.id), None);
        block_on(pinholes.open_window(&window_for("198.18.0.2", 5))).unwrap();
        assert_eq!(
            pinholes.stats().closed,
            0,
            "windows are not counted as pinholes"
        );
    }

    #[test]
    fn fixed_port_is_not_taken_from_the_pool() {
        let rec = Arc::new(Recorder::default());
        let pinholes = Pinholes::new(
            rec,
            PortPool::new(61000, 61000, HOLD, Duration::ZERO),
            Duration::from_secs(30),
        );
        let opened = block_on(pinholes.open(&request(Some(40001)))).unwrap();
        assert_eq!(opened.dial_port, 40001);
        assert_eq!(pinholes.lock().ports.reserved(), 0);
    }
}
