//! Pinhole install latency and rate through the real nftables backend.
//!
//! Runs in a private network namespace of its own (unshare(2) before any thread starts), so it
//! needs root and never touches the host's firewall. Prints one table:
//! sequential installs (latency from request to "in the kernel", median and p99) and installs
//! from many concurrent sessions (pinholes per second, batched into shared transactions).
//!
//! `cargo bench --bench pinhole_install [-- SEQUENTIAL CONCURRENT_SESSIONS PER_SESSION]`

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ftp_alg::pinhole::nft;
use ftp_alg::pinhole::{Label, PinholeRequest, Pinholes};
use ftp_alg::ports::PortPool;

fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sequential = args.first().copied().unwrap_or(1000);
    let sessions = args.get(1).copied().unwrap_or(100);
    let per_session = args.get(2).copied().unwrap_or(20);
    // SAFETY: called before any other thread exists; only changes this process's namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        anyhow::bail!(
            "unshare(CLONE_NEWNET) failed (run as root): {}",
            std::io::Error::last_os_error()
        );
    }
    tokio::runtime::Runtime::new()?.block_on(bench(sequential, sessions, per_session))
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

async fn bench(sequential: usize, sessions: usize, per_session: usize) -> anyhow::Result<()> {
    let nft_path = std::path::PathBuf::from("nft");
    nft::load_table(&nft_path, 0xf7a0, 2121, &[]).await?;
    let pinholes = Arc::new(Pinholes::new(
        nft::backend(nft_path.clone()),
        PortPool::new(1024, 65535, Duration::ZERO),
        Duration::from_secs(600),
    ));

    let mut latencies = Vec::with_capacity(sequential);
    for i in 0..sequential {
        let start = Instant::now();
        pinholes.open(&request(i)).await?;
        latencies.push(start.elapsed());
    }
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];

    let total = sessions * per_session;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..sessions {
        let pinholes = pinholes.clone();
        tasks.push(tokio::spawn(async move {
            for k in 0..per_session {
                pinholes
                    .open(&request(100_000 + s * per_session + k))
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let elapsed = start.elapsed();
    let listed = nft::list(&nft_path).await?.len();
    nft::delete_table(&nft_path).await?;

    println!("| measurement | n | median | p99 | rate |");
    println!("|---|---|---|---|---|");
    println!(
        "| sequential install (request -> in kernel) | {sequential} | {:.0} us | {:.0} us | {:.0}/s |",
        pct(0.5).as_secs_f64() * 1e6,
        pct(0.99).as_secs_f64() * 1e6,
        sequential as f64 / latencies.iter().sum::<Duration>().as_secs_f64()
    );
    println!(
        "| {sessions} concurrent sessions x {per_session} installs | {total} | - | - | {:.0}/s |",
        total as f64 / elapsed.as_secs_f64()
    );
    println!("(pinholes found in the kernel afterwards: {listed})");
    Ok(())
}
