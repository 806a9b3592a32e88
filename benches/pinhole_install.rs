//! Pinhole install latency and rate through both real backends: netlink and the nft program.
//!
//! Runs in a private network namespace of its own (unshare(2) before any thread starts), so it
//! needs root and never touches the host's firewall. For each backend, on a freshly loaded
//! table: sequential installs (latency from request to "in the kernel", median and p99), then
//! installs from many concurrent sessions (pinholes per second, batched into shared
//! transactions). Prints one table.
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
    tokio::runtime::Runtime::new()?.block_on(async {
        let netlink = measure(&runs, || Ok(netlink::backend()?)).await?;
        let nft = measure(&runs, || Ok(nft::backend("nft".into()))).await?;
        println!(
            "| backend | sequential installs | median | p99 | concurrent installs ({} sessions x {}) | pinholes in the kernel after |",
            runs.sessions, runs.per_session
        );
        println!("|---|---|---|---|---|---|");
        for (name, r) in [("netlink", netlink), ("nft", nft)] {
            println!(
                "| {name} | {} | {:.0} us | {:.0} us | {:.0}/s | {} |",
                runs.sequential,
                r.median.as_secs_f64() * 1e6,
                r.p99.as_secs_f64() * 1e6,
                r.concurrent_rate,
                r.listed
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

struct Measured {
    median: Duration,
    p99: Duration,
    concurrent_rate: f64,
    listed: usize,
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

    let mut latencies = Vec::with_capacity(runs.sequential);
    for i in 0..runs.sequential {
        let start = Instant::now();
        pinholes.open(&request(i)).await?;
        latencies.push(start.elapsed());
    }
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];

    let start = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..runs.sessions {
        let pinholes = pinholes.clone();
        let first = 100_000 + s * runs.per_session;
        let count = runs.per_session;
        tasks.push(tokio::spawn(async move {
            for k in first..first + count {
                pinholes.open(&request(k)).await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let elapsed = start.elapsed();
    let listed = nft::list(nft_path).await?.len();
    nft::delete_table(nft_path).await?;
    Ok(Measured {
        median: pct(0.5),
        p99: pct(0.99),
        concurrent_rate: (runs.sessions * runs.per_session) as f64 / elapsed.as_secs_f64(),
        listed,
    })
}
