use clap::Parser;

// One thread: the daemon spends its time waiting on sockets (the data runs in the kernel), and
// a line that crosses the proxy, or a pinhole request that crosses to the firewall worker, is
// then never handed to another thread. scripts/bench measured PASV-to-227 at 150 µs instead of
// 208 µs with the multi-threaded runtime, at under 1% of one core for 500 transfers.
#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    ftp_alg::cli::main(ftp_alg::cli::Cli::parse()).await
}
