use clap::Parser;
use ftp_alg::cli::{self, Cli, Command, PinholesCommand};
use ftp_alg::config::Config;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let result = match Cli::parse().command {
        Command::Run { config } => {
            match config.map_or_else(|| Ok(Config::builtin_gateway()), |p| Config::load(&p)) {
                Ok(config) => ftp_alg::proxy::run(config).await,
                Err(e) => Err(e.into()),
            }
        }
        Command::CheckConfig { file } => cli::check_config(&file),
        Command::Pinholes {
            command: PinholesCommand::List { json, nft },
        } => cli::list_pinholes(json, &nft).await,
        Command::Sniff(args) => match ftp_alg::sniff::run(args).await {
            Ok(outcome) => return outcome.exit_code(),
            Err(e) => Err(e.into()),
        },
        Command::Demo => ftp_alg::demo::run().await,
        Command::DemoServer(args) => ftp_alg::demo::server::run(args).await,
        Command::DemoClient(args) => ftp_alg::demo::client::run(args).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ftp-alg: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
