use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    ftp_alg::cli::main(ftp_alg::cli::Cli::parse()).await
}
