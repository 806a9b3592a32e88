//! Pinhole install and removal latency and rate through both real backends: netlink and the
//! nft program.
//!
//! Runs in a private network namespace of its own (unshare(2) before any thread starts), so it
//! needs root and never touches the host's firewall. It runs on the daemon's own runtime, a
//! current-thread one (src/main.rs), so that the batching worker shares its thread with the
//! requesters as it does in the daemon. For each backend, on a freshly loaded table:
//! sequential installs, then the same pinholes removed one by one (latency from request to
//! "done in the kernel", median and p99 of each); then installs from many concurrent sessions,
//! and their removal, also concurrent (pinholes per second, batched into shared transactions).
//! The kernel's element count is read after the installs and after the removals. Prints one
//! table.
//!
//! `cargo bench --bench pinhole_install [-- SEQUENTIAL CONCURRENT_SESSIONS PER_SESSION]`
//! (defaults: 10000 100 20)

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ftp_alg::pinhole::{netlink, nft, Firewall, Label, PinholeRequest, Pinholes};
use ftp_alg::ports::PortPool;

fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let runs = Runs {
        sequential: args.first().copied().unwrap_or(10_000).max(1),
        sessions: args.get(1).copied().unwrap_or(100),
        per_session: args.get(2).copied().unwrap_or(20),
    };
    // SAFETY: called before any other thread exists; only changes this process's namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        anyhow::bail!(
            "unshare(CLONE_NEWNET) failed (run as root): {}",
            std::io::Error::last_os_error()
        );
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let netlink = measure(&runs, || Ok(netlink::backend()?)).await?;
        let nft = measure(&runs, || Ok(nft::backend("nft".into()))).await?;
        println!(
            "| backend | sequential, each | install median | install p99 | removal median | removal p99 | concurrent ({} sessions x {}): installs | removals | pinholes in the kernel after installs / removals |",
            runs.sessions, runs.per_session
        );
        println!("|---|---|---|---|---|---|---|---|---|");
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        for (name, r) in [("netlink", netlink), ("nft", nft)] {
            println!(
                "| {name} | {} | {:.0} us | {:.0} us | {:.0} us | {:.0} us | {:.0}/s | {:.0}/s | {} / {} |",
                runs.sequential,
                us(r.install.median),
                us(r.install.p99),
                us(r.removal.median),
                us(r.removal.p99),
                r.install.rate,
                r.removal.rate,
                r.listed_installed,
                r.listed_removed,
            );
        }
        anyhow::Ok(())
    })
}

struct Runs {
    sequential: usize,
    sessions: usize,
    per_session: usize,
}

/// One operation (install or removal) of one backend.
struct Timings {
    /// Of the sequential ones.
    median: Duration,
    p99: Duration,
    /// Of the concurrent ones, per second.
    rate: f64,
}

struct Measured {
    install: Timings,
    removal: Timings,
    /// Pinholes the kernel lists after all installs, and after all removals.
    listed_installed: usize,
    listed_removed: usize,
}

/// Median and p99 of `latencies`.
fn percentiles(mut latencies: Vec<Duration>) -> (Duration, Duration) {
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
    (pct(0.5), pct(0.99))
}

fn request(i: usize) -> PinholeRequest {
    let client: IpAddr = [198, 18, (i / 250 % 250) as u8, (i % 250 + 2) as u8].into();
    PinholeRequest {
        source: "203.0.113.2".parse().expect("literal"),
        dial_ip: "203.0.113.1".parse().expect("literal"),
        dial_port: None,
        dnat: Some((client, 40000).into()),
        snat: None,
        label: Label {
            session: i as u64,
            client,
            server: "203.0.113.2".parse().expect("literal"),
        },
    }
}

/// Both runs of one backend, on a table of their own.
async fn measure(
    runs: &Runs,
    backend: impl FnOnce() -> anyhow::Result<Firewall>,
) -> anyhow::Result<Measured> {
    let nft_path = Path::new("nft");
    nft::load_table(nft_path, 0xf7a0.into(), 2121, &[]).await?;
    let pinholes = Arc::new(Pinholes::new(
        backend()?,
        PortPool::new(1024, 65535, Duration::from_secs(30), Duration::ZERO),
        Duration::from_secs(600),
    ));

    let mut ids = Vec::with_capacity(runs.sequential);
    let mut installs = Vec::with_capacity(runs.sequential);
    for i in 0..runs.sequential {
        let start = Instant::now();
        ids.push(pinholes.open(&request(i)).await?.id);
        installs.push(start.elapsed());
    }

    let start = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..runs.sessions {
        let pinholes = pinholes.clone();
        let first = 100_000 + s * runs.per_session;
        let count = runs.per_session;
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::with_capacity(count);
            for k in first..first + count {
                ids.push(pinholes.open(&request(k)).await?.id);
            }
            anyhow::Ok(ids)
        }));
    }
    let mut concurrent = Vec::new();
    for task in tasks {
        concurrent.push(task.await??);
    }
    let installed = start.elapsed();
    let listed_installed = nft::list(nft_path).await?.len();

    let mut removals = Vec::with_capacity(ids.len());
    for id in ids {
        let start = Instant::now();
        pinholes.close(&[id]).await?;
        removals.push(start.elapsed());
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for ids in concurrent {
        let pinholes = pinholes.clone();
        tasks.push(tokio::spawn(async move {
            for id in ids {
                pinholes.close(&[id]).await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let removed = start.elapsed();
    let listed_removed = nft::list(nft_path).await?.len();
    nft::delete_table(nft_path).await?;

    let concurrent_count = (runs.sessions * runs.per_session) as f64;
    let (median, p99) = percentiles(installs);
    let install = Timings {
        median,
        p99,
        rate: concurrent_count / installed.as_secs_f64(),
    };
    let (median, p99) = percentiles(removals);
    let removal = Timings {
        median,
        p99,
        rate: concurrent_count / removed.as_secs_f64(),
    };
    Ok(Measured {
        install,
        removal,
        listed_installed,
        listed_removed,
    })
}
