//! The daemon's life: start-up (listeners, the nftables table, the control socket, the
//! metrics listener), serving the control API, and shutdown on SIGTERM or SIGINT.
//!
//! The FTP proxying itself is `proxy.rs`; this module wires the services together and answers
//! the operator's requests.

use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::config::{Config, PinholeBackend};
use crate::control::{self, Answer, ErrorKind, Request, Status};
use crate::datarelay::Relay;
use crate::handover;
use crate::logging::LogHandle;
use crate::metrics::{self, Gauges, Metrics};
use crate::notify::{self, Notifier};
use crate::pinhole::{netlink, nft, Pinholes};
use crate::ports::PortPool;
use crate::proxy::{self, Shared};
use crate::registry::Registry;
use crate::reload::{Live, Reloader};
use crate::tls::{Terminator, Upstream};
use crate::upstream;

/// Run the daemon until SIGTERM or SIGINT, or until it has handed its listeners over to a new
/// process and its own sessions have ended: load the table, listen, proxy; on the way out
/// remove its pinholes, keeping the table's chains (see [`nft::flush_pinholes`]). SIGHUP
/// reloads `source`, the file `config` came from (see [`crate::reload`]).
///
/// With `take_over`, the listening sockets come from the daemon already running (see
/// [`handover`]), which then stops accepting and lets its sessions finish.
pub async fn run(
    config: Config,
    take_over: bool,
    source: Option<PathBuf>,
    log: LogHandle,
) -> anyhow::Result<()> {
    let notifier = Arc::new(Notifier::from_env().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "not notifying the service manager");
        Notifier::disabled()
    }));
    config
        .check_host(&upstream::interface_names())
        .map_err(anyhow::Error::msg)?;
    let mut taken = match take_over {
        true => {
            let socket = config.control.socket.clone();
            let taken = tokio::task::spawn_blocking(move || handover::take(&socket))
                .await
                .context("the hand-over task")??;
            tracing::info!(
                from = taken.pid,
                "took over {} listeners from the running daemon",
                taken.listeners.len()
            );
            Some(taken)
        }
        false => None,
    };
    // Bind first: a second instance started by mistake (without --take-over) fails here,
    // before it could touch the running daemon's table and with it every open pinhole.
    // Each with whether it is an implicit FTPS listener (TLS from the first byte).
    let mut listeners = Vec::new();
    let implicit = config.tls.iter().flat_map(|t| &t.implicit_listen);
    let addresses =
        (config.proxy.listen.iter().map(|a| (a, false))).chain(implicit.map(|a| (a, true)));
    for (addr, implicit) in addresses {
        let listener = match taken
            .as_mut()
            .and_then(|t| take_socket(&mut t.listeners, *addr))
        {
            Some(fd) => listener_from(fd),
            None => proxy::bind(*addr),
        };
        listeners.push((
            listener.with_context(|| format!("listening on {addr}"))?,
            implicit,
        ));
    }
    // The guard removes the socket file however start-up or the run ends.
    let control = match config.control.enabled {
        true => {
            let listener = match taken {
                Some(_) => control::bind_replacing(&config.control.socket),
                None => control::bind(&config.control.socket).await,
            }?;
            Some((listener, SocketFile::new(config.control.socket.clone())))
        }
        false => None,
    };
    let metrics_listener = match config.metrics.listen {
        Some(addr) => {
            let received = taken
                .as_mut()
                .and_then(|t| t.metrics.take())
                .filter(|m| m.addr == addr);
            let listener = match received {
                Some(m) => listener_from(m.fd),
                None => tokio::net::TcpListener::bind(addr).await,
            };
            Some(listener.with_context(|| format!("metrics.listen = {addr}"))?)
        }
        None => None,
    };
    let metrics = Arc::new(Metrics::default());
    let (relay, relay_listeners) = match &config.tls {
        Some(tls) => {
            let terminator = Terminator::load(tls)?;
            let upstream = match config.proxy.upstream {
                Some(server) => Upstream::load(tls, server)?,
                None => None,
            };
            let (relay, listeners) =
                Relay::bind(terminator, upstream, tls.relay_buffer, metrics.clone())
                    .context("binding the PROT P data relay listener")?;
            (Some(relay), listeners)
        }
        None => (None, Vec::new()),
    };
    let nft_path = config.pinholes.nft.clone();
    let intercept_port = config.proxy.listen.first().map_or(0, |a| a.port());
    nft::prepare_table(
        &nft_path,
        config.pinholes.mark(),
        intercept_port,
        &config.proxy.intercept,
    )
    .await
    .with_context(|| format!("loading the nftables table inet {}", nft::TABLE))?;

    let backend = match config.pinholes.backend {
        PinholeBackend::Netlink => {
            netlink::backend().context("opening the netlink socket for pinholes")?
        }
        PinholeBackend::Nft => nft::backend(nft_path.clone()),
    };
    let pinholes = Pinholes::new(
        backend,
        PortPool::new(
            config.pinholes.port_min,
            config.pinholes.port_max,
            config.pinhole_timeout(),
            Duration::from_secs(config.pinholes.reuse_delay_secs),
        ),
        config.pinhole_timeout(),
    )
    .with_port_wait(Duration::from_millis(config.pinholes.port_wait_ms));
    let shared = Arc::new(Shared {
        live: Live::new(&config),
        registry: Arc::new(
            Registry::new(
                config.limits.max_sessions,
                // A per-client limit above the total is capped by it.
                config
                    .limits
                    .max_sessions_per_client
                    .min(config.limits.max_sessions),
            )
            .counting_ipv6_per(config.limits.client_prefix_v6),
        ),
        metrics,
        config,
        pinholes,
        relay,
    });
    let started = Instant::now();
    // Copies of the listening sockets, for a hand-over to a successor.
    let mut offered = Vec::new();
    let mut services = Vec::new();
    for (listener, implicit) in listeners {
        let local = listener
            .local_addr()
            .context("reading a listener's address")?;
        match implicit {
            true => {
                tracing::info!(mode = %shared.config.proxy.mode, "listening on {local} (implicit FTPS: TLS first)")
            }
            false => tracing::info!(mode = %shared.config.proxy.mode, "listening on {local}"),
        }
        offered.push((local, dup(&listener)?));
        services.push(tokio::spawn(proxy::accept_loop(
            listener,
            shared.clone(),
            implicit,
        )));
    }
    if let Some(relay) = &shared.relay {
        for listener in relay_listeners {
            tracing::info!(
                "FTPS: TLS ended here; PROT P data relayed through {}",
                listener
                    .local_addr()
                    .context("reading the relay's address")?
            );
            services.push(tokio::spawn(relay.clone().serve(listener)));
        }
    }
    let (hand_over_tx, mut hand_over_rx) = tokio::sync::mpsc::channel(1);
    let control = control.map(|(listener, socket)| {
        tracing::info!("control API on {}", socket.path.display());
        let for_control = shared.clone();
        let task = tokio::spawn(control::serve(
            listener,
            move |request| {
                let shared = for_control.clone();
                async move { answer(&shared, started, request).await }
            },
            hand_over_tx,
        ));
        (task, socket)
    });
    let mut offered_metrics = None;
    if let Some(listener) = metrics_listener {
        let local = listener.local_addr()?;
        tracing::info!("metrics on http://{local}/metrics");
        offered_metrics = Some((local, dup(&listener)?));
        let for_metrics = shared.clone();
        services.push(tokio::spawn(metrics::serve(
            listener,
            shared.metrics.clone(),
            move || gauges(&for_metrics),
        )));
    }
    services.push(tokio::spawn(crate::heal::guard(shared.clone())));
    // Not a service: the sessions that outlive the listeners during a grace period keep
    // their windows, so the renewals stop only once the grace is over.
    let renewals = tokio::spawn(renew_windows(shared.clone()));
    if let Some(taken) = taken {
        // Accepting already: the old process may stop now.
        let from = taken.pid;
        tokio::task::spawn_blocking(move || taken.confirm())
            .await
            .context("the hand-over task")?
            .context("confirming the hand-over")?;
        tracing::info!(
            from,
            "hand-over complete: the previous process accepts no more sessions"
        );
    }

    let mut signals = Signals::new()?;
    // The table is loaded and every listener bound: systemd may start what depends on us.
    // After a take-over this process is the service's main process now (the unit needs
    // NotifyAccess=all for systemd to take that from it).
    let main_pid = match take_over {
        true => format!("MAINPID={}\n", std::process::id()),
        false => String::new(),
    };
    notifier.send(&format!("{main_pid}READY=1\n{}", status_line(&shared)));
    if notifier.enabled() {
        let for_status = shared.clone();
        services.push(tokio::spawn(notify::heartbeat(
            notifier.clone(),
            move || status_line(&for_status),
        )));
    }
    let reloader = Reloader::new(source, &shared.config, log);
    let reload = || {
        notifier.send("RELOADING=1");
        reloader.reload(&shared.live, &shared.registry);
        notifier.send(&format!("READY=1\n{}", status_line(&shared)));
    };
    let handed_over = loop {
        tokio::select! {
            () = signals.next_stop(&reload) => break false,
            Some(stream) = hand_over_rx.recv() => {
                let offer = handover::Offer {
                    pid: std::process::id(),
                    listeners: offered.iter().map(|(addr, _)| *addr).collect(),
                    metrics: offered_metrics.as_ref().map(|(addr, _)| *addr),
                };
                let fds: Vec<_> = offered.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
                let metrics_fd = offered_metrics.as_ref().map(|(_, fd)| fd.as_raw_fd());
                let given = match stream.into_std() {
                    Ok(stream) => tokio::task::spawn_blocking(move || {
                        handover::give(stream, &offer, &fds, metrics_fd)
                    })
                    .await
                    .context("the hand-over task")?,
                    Err(e) => Err(e.into()),
                };
                match given {
                    Ok(()) => break true,
                    Err(e) => tracing::warn!(error = %e, "hand-over failed; serving on"),
                }
            }
        }
    };
    notifier.send("STOPPING=1");
    // Stop accepting (the listeners close here, or live on in the successor), then give the
    // sessions under way their grace period; a second signal cuts it short. The control API
    // stays up meanwhile: the operator can still see, and end, the sessions holding it up.
    for task in &services {
        task.abort();
    }
    drop(offered);
    drop(offered_metrics);
    let limits = &shared.live.get().limits;
    let grace = Duration::from_secs(match handed_over {
        true => limits.handover_grace_secs,
        false => limits.shutdown_grace_secs,
    });
    let sessions = shared.registry.count();
    if sessions > 0 {
        tracing::info!(
            sessions,
            handed_over,
            "stopping: no new sessions; waiting up to {grace:?} for those open"
        );
        tokio::select! {
            () = shared.registry.all_ended() => {}
            () = tokio::time::sleep(grace) => {
                tracing::info!(sessions = shared.registry.count(), "grace period over");
            }
            () = signals.next_stop(|| tracing::warn!("SIGHUP while stopping: not reloaded")) => {}
        }
    }
    renewals.abort();
    if let Some((task, socket)) = control {
        task.abort();
        drop(socket);
    }
    // Sessions left after the grace period may still ask for pinholes; from now on they are
    // refused (425), so that none is installed behind the removal.
    shared.pinholes.refuse_new();
    if handed_over {
        // The table and its other pinholes belong to the successor now: remove only ours.
        let ours = shared.pinholes.open_ids();
        tracing::info!(
            open_pinholes = ours.len(),
            "handed over: removing this process's pinholes"
        );
        shared
            .pinholes
            .close(&ours)
            .await
            .context("removing the pinholes")?;
        return Ok(());
    }
    tracing::info!(
        open_pinholes = shared.pinholes.open_count(),
        "shutting down: removing every pinhole (the table's chains stay, so that connections \
         under way keep their address translation)"
    );
    let table_was_there = nft::flush_pinholes(&nft_path)
        .await
        .context("removing the pinholes")?;
    if !table_was_there {
        tracing::warn!(
            "ftp-alg's table was already gone (was the ruleset flushed?): no pinhole to remove"
        );
    }
    Ok(())
}

/// The received socket for `addr`, taken out of `received`.
fn take_socket(received: &mut Vec<handover::Received>, addr: SocketAddr) -> Option<OwnedFd> {
    let at = received.iter().position(|r| r.addr == addr)?;
    Some(received.swap_remove(at).fd)
}

/// A tokio listener on a listening socket received from the previous process.
fn listener_from(fd: OwnedFd) -> std::io::Result<tokio::net::TcpListener> {
    let listener = std::net::TcpListener::from(fd);
    listener.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(listener)
}

/// A second descriptor of a listening socket, to hand over while the first one accepts.
fn dup(listener: &tokio::net::TcpListener) -> anyhow::Result<OwnedFd> {
    listener
        .as_fd()
        .try_clone_to_owned()
        .context("duplicating a listening socket")
}

/// The control socket's file, removed when the daemon stops serving it, unless a successor
/// has put its own socket at the same path since (a hand-over).
struct SocketFile {
    path: PathBuf,
    /// Device and inode of the socket this daemon created.
    identity: Option<(u64, u64)>,
}

impl SocketFile {
    fn new(path: PathBuf) -> SocketFile {
        let identity = identity(&path);
        SocketFile { path, identity }
    }
}

/// A file's device and inode.
fn identity(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if self.identity.is_none() || identity(&self.path) != self.identity {
            return;
        }
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::debug!(error = %e, "cannot remove the control socket");
        }
    }
}

fn status_line(shared: &Shared) -> String {
    notify::status_line(shared.registry.count(), shared.pinholes.stats().open)
}

fn gauges(shared: &Shared) -> Gauges {
    Gauges {
        sessions: shared.registry.count(),
        sessions_total: shared.registry.admitted_total(),
        pinholes: shared.pinholes.stats(),
        limits: shared.live.get().limits.clone(),
        pool: (
            shared.config.pinholes.port_min,
            shared.config.pinholes.port_max,
        ),
        ports_in_use: shared.pinholes.ports_in_use(),
    }
}

/// Carry out one control request.
async fn answer(shared: &Shared, started: Instant, request: Request) -> Answer {
    match request {
        Request::Status => {
            let config = &shared.config;
            let stats = shared.pinholes.stats();
            Answer::Status(Status {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                pid: std::process::id(),
                mode: config.proxy.mode,
                listen: config.proxy.listen.clone(),
                upstream: config.proxy.upstream,
                uptime_secs: started.elapsed().as_secs(),
                sessions: shared.registry.count(),
                sessions_total: shared.registry.admitted_total(),
                max_sessions: shared.live.get().limits.max_sessions,
                pinholes_open: stats.open,
                pinholes_opened: stats.opened,
                pinhole_timeout_secs: config.pinholes.timeout_secs,
                ports: (config.pinholes.port_min, config.pinholes.port_max),
                metrics: config.metrics.listen,
            })
        }
        Request::Sessions => {
            let mut sessions = shared.registry.list();
            // A session holds its ids until its transfer's final reply, but the operator may
            // have closed a pinhole since, and the kernel drops one at its timeout even while
            // the transfer runs: list only what `pinholes list` shows too.
            let in_kernel: Option<std::collections::HashSet<u64>> = match nft::list(
                &shared.config.pinholes.nft,
            )
            .await
            {
                Ok(entries) => {
                    let ids = shared.pinholes.ids_by_endpoint();
                    Some(
                        entries
                            .iter()
                            .filter_map(|e| ids.get(&(e.source, e.dial)).copied())
                            .collect(),
                    )
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the kernel's pinholes for sessions list");
                    None
                }
            };
            for session in &mut sessions {
                session.pinholes.retain(|id| {
                    shared.pinholes.is_open(*id)
                        && in_kernel.as_ref().is_none_or(|k| k.contains(id))
                });
            }
            Answer::Sessions { sessions }
        }
        Request::KillSession { id } => match shared.registry.kill(id) {
            true => Answer::Killed { id },
            false => control::error(ErrorKind::NotFound, format!("no session {id}")),
        },
        Request::Pinholes => match nft::list(&shared.config.pinholes.nft).await {
            Ok(mut pinholes) => {
                let ids = shared.pinholes.ids_by_endpoint();
                for entry in &mut pinholes {
                    entry.id = ids.get(&(entry.source, entry.dial)).copied();
                }
                Answer::Pinholes { pinholes }
            }
            Err(e) => control::error(
                ErrorKind::Failed,
                format!("reading the kernel's pinholes: {e}"),
            ),
        },
        Request::ClosePinhole { id } => {
            if !shared.pinholes.is_open(id) {
                return control::error(ErrorKind::NotFound, format!("no open pinhole {id}"));
            }
            // A TLS session without its window could transfer nothing: it ends too.
            let session = shared.pinholes.window_session(id);
            let answer = close(shared, vec![id]).await;
            if let Some(session) = session {
                tracing::info!(
                    session,
                    window = id,
                    "window closed by the operator: ending its session"
                );
                shared.registry.kill(session);
            }
            answer
        }
        Request::FlushPinholes => close(shared, shared.pinholes.open_ids()).await,
        // The control server hands these connections to the daemon's main loop.
        Request::HandOver => control::error(
            ErrorKind::BadRequest,
            "a hand-over is asked by ftp-alg run --take-over",
        ),
    }
}

/// Renew the kernel timeout of every open window three times per timeout, for as long as the
/// daemon runs: a window lives as long as its session, and goes within one timeout of a
/// crashed daemon. A renewal also puts back a window that the kernel lost (a table reloaded
/// under ftp-alg, see `heal`).
async fn renew_windows(shared: Arc<Shared>) {
    let mut every = tokio::time::interval(shared.config.pinhole_timeout() / 3);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        // A session that ended without closing its window (its task panicked) must not keep
        // it alive: only a live session's window is renewed.
        let orphans: Vec<u64> = shared
            .pinholes
            .windows()
            .into_iter()
            .filter(|&(_, session)| !shared.registry.is_live(session))
            .map(|(id, _)| id)
            .collect();
        if !orphans.is_empty() {
            tracing::warn!(windows = ?orphans, "closing windows whose session is gone");
            if let Err(e) = shared.pinholes.close(&orphans).await {
                tracing::warn!(error = %e, "cannot close the windows of ended sessions");
            }
        }
        if let Err(e) = shared.pinholes.refresh_windows().await {
            tracing::warn!(error = %e, "cannot renew the windows' kernel timeout");
        }
    }
}

/// Remove pinholes on the operator's request. Their sessions still hold the ids and close
/// them again at their transfer's end, which is harmless: unknown ids are ignored.
async fn close(shared: &Shared, ids: Vec<u64>) -> Answer {
    match shared.pinholes.close(&ids).await {
        Ok(()) => {
            tracing::info!(?ids, "pinholes closed by the operator");
            Answer::Closed { ids }
        }
        Err(e) => control::error(ErrorKind::Failed, format!("removing pinholes {ids:?}: {e}")),
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

    /// Wait for SIGTERM or SIGINT, calling `on_hup` at each SIGHUP (whose default action
    /// would kill the daemon and leave its pinholes to their timeout).
    async fn next_stop(&mut self, mut on_hup: impl FnMut()) {
        loop {
            tokio::select! {
                _ = self.term.recv() => return,
                _ = self.int.recv() => return,
                _ = self.hup.recv() => on_hup(),
            }
        }
    }
}
