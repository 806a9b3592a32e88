//! The daemon's life: start-up (listeners, the nftables table, the control socket, the
//! metrics listener), serving the control API, and shutdown on SIGTERM or SIGINT.
//!
//! The FTP proxying itself is `proxy.rs`; this module wires the services together and answers
//! the operator's requests.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::config::{Config, PinholeBackend};
use crate::control::{self, Answer, ErrorKind, Request, Status};
use crate::logging::LogHandle;
use crate::metrics::{self, Gauges, Metrics};
use crate::notify::{self, Notifier};
use crate::pinhole::{netlink, nft, Pinholes};
use crate::ports::PortPool;
use crate::proxy::{self, Shared};
use crate::registry::Registry;
use crate::reload::{Live, Reloader};
use crate::upstream;

/// Run the daemon until SIGTERM or SIGINT: load the table, listen, proxy; on the way out
/// remove every pinhole, keeping the table's chains (see [`nft::flush_pinholes`]). SIGHUP
/// reloads `source`, the file `config` came from (see [`crate::reload`]).
pub async fn run(config: Config, source: Option<PathBuf>, log: LogHandle) -> anyhow::Result<()> {
    let notifier = Arc::new(Notifier::from_env().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "not notifying the service manager");
        Notifier::disabled()
    }));
    config
        .check_host(&upstream::interface_names())
        .map_err(anyhow::Error::msg)?;
    // Bind first: a second instance started by mistake fails here, before it could replace
    // the running daemon's table and with it every open pinhole.
    let mut listeners = Vec::new();
    for addr in &config.proxy.listen {
        listeners.push(proxy::bind(*addr).with_context(|| format!("listening on {addr}"))?);
    }
    // The guard removes the socket file however start-up or the run ends.
    let control = match config.control.enabled {
        true => {
            let listener = control::bind(&config.control.socket).await?;
            Some((listener, SocketFile(config.control.socket.clone())))
        }
        false => None,
    };
    let metrics_listener = match config.metrics.listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("metrics.listen = {addr}"))?,
        ),
        None => None,
    };
    let nft_path = config.pinholes.nft.clone();
    let intercept_port = config.proxy.listen.first().map_or(0, |a| a.port());
    nft::load_table(
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
            Duration::from_secs(config.pinholes.reuse_delay_secs),
        ),
        config.pinhole_timeout(),
    );
    let shared = Arc::new(Shared {
        live: Live::new(&config),
        registry: Arc::new(
            Registry::new(
                config.limits.max_sessions,
                config.limits.max_sessions_per_client,
            )
            .counting_ipv6_per(config.limits.client_prefix_v6),
        ),
        metrics: Arc::new(Metrics::default()),
        config,
        pinholes,
    });
    let started = Instant::now();
    let mut services = Vec::new();
    for listener in listeners {
        let local = listener
            .local_addr()
            .context("reading a listener's address")?;
        tracing::info!(mode = %shared.config.proxy.mode, "listening on {local}");
        services.push(tokio::spawn(proxy::accept_loop(listener, shared.clone())));
    }
    let control = control.map(|(listener, socket)| {
        tracing::info!("control API on {}", socket.0.display());
        let for_control = shared.clone();
        let task = tokio::spawn(control::serve(listener, move |request| {
            let shared = for_control.clone();
            async move { answer(&shared, started, request).await }
        }));
        (task, socket)
    });
    if let Some(listener) = metrics_listener {
        tracing::info!("metrics on http://{}/metrics", listener.local_addr()?);
        let for_metrics = shared.clone();
        services.push(tokio::spawn(metrics::serve(
            listener,
            shared.metrics.clone(),
            move || gauges(&for_metrics),
        )));
    }
    services.push(tokio::spawn(crate::heal::guard(shared.clone())));

    let mut signals = Signals::new()?;
    // The table is loaded and every listener bound: systemd may start what depends on us.
    notifier.send(&format!("READY=1\n{}", status_line(&shared)));
    if notifier.enabled() {
        let for_status = shared.clone();
        services.push(tokio::spawn(notify::heartbeat(
            notifier.clone(),
            move || status_line(&for_status),
        )));
    }
    let reloader = Reloader::new(source, &shared.config, log);
    signals
        .next_stop(|| {
            notifier.send("RELOADING=1");
            reloader.reload(&shared.live, &shared.registry);
            notifier.send(&format!("READY=1\n{}", status_line(&shared)));
        })
        .await;
    notifier.send("STOPPING=1");
    // Stop accepting (the listeners close: new clients are refused at once), then give the
    // sessions under way their grace period; a second signal cuts it short. The control API
    // stays up meanwhile: the operator can still see, and end, the sessions holding it up.
    for task in &services {
        task.abort();
    }
    let grace = Duration::from_secs(shared.live.get().limits.shutdown_grace_secs);
    let sessions = shared.registry.count();
    if sessions > 0 {
        tracing::info!(
            sessions,
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
    if let Some((task, socket)) = control {
        task.abort();
        drop(socket);
    }
    // Sessions left after the grace period may still ask for pinholes; from now on they are
    // refused (425), so that none is installed behind the flush.
    shared.pinholes.refuse_new();
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

/// The control socket's file, removed when the daemon stops serving it.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
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
            close(shared, vec![id]).await
        }
        Request::FlushPinholes => close(shared, shared.pinholes.open_ids()).await,
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
