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
use crate::metrics::{self, Gauges, Metrics};
use crate::pinhole::{netlink, nft, Pinholes};
use crate::ports::PortPool;
use crate::proxy::{self, Shared};
use crate::registry::Registry;

/// Run the daemon until SIGTERM or SIGINT: load the table, listen, proxy; on the way out
/// remove every pinhole, keeping the table's chains (see [`nft::flush_pinholes`]).
pub async fn run(config: Config) -> anyhow::Result<()> {
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
        config.pinholes.ct_mark,
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
        policy: Arc::new(config.policy.clone()),
        registry: Arc::new(Registry::new(
            config.limits.max_sessions,
            // A per-client limit above the total is capped by it.
            config
                .limits
                .max_sessions_per_client
                .min(config.limits.max_sessions),
        )),
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

    let mut signals = Signals::new()?;
    signals.next_stop().await;
    // Stop accepting (the listeners close: new clients are refused at once), then give the
    // sessions under way their grace period; a second signal cuts it short. The control API
    // stays up meanwhile: the operator can still see, and end, the sessions holding it up.
    for task in &services {
        task.abort();
    }
    let grace = Duration::from_secs(shared.config.limits.shutdown_grace_secs);
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
            () = signals.next_stop() => {}
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
    nft::flush_pinholes(&nft_path)
        .await
        .context("removing the pinholes")?;
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

fn gauges(shared: &Shared) -> Gauges {
    Gauges {
        sessions: shared.registry.count(),
        sessions_total: shared.registry.admitted_total(),
        pinholes: shared.pinholes.stats(),
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
                max_sessions: config.limits.max_sessions,
                pinholes_open: stats.open,
                pinholes_opened: stats.opened,
                pinhole_timeout_secs: config.pinholes.timeout_secs,
                ports: (config.pinholes.port_min, config.pinholes.port_max),
                metrics: config.metrics.listen,
            })
        }
        Request::Sessions => {
            let mut sessions = shared.registry.list();
            // A session still counts pinholes the operator closed until their transfer ends.
            for session in &mut sessions {
                session.pinholes.retain(|id| shared.pinholes.is_open(*id));
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
