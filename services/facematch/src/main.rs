//! `estate-facematch`: one tenant's face matching as its own process. It
//! answers inbound gRPC only; it opens no outbound connection (R9): logs go
//! to stdout, its store is a local SQLite file, consent arrives as signed
//! attestations checked with the key file it was given.

use clap::Parser;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(name = "estate-facematch", version, about = "Per-tenant face matching of the estate access mesh (no egress)")]
struct Cli {
    /// TOML settings file (overridden by ESTATE__… variables).
    #[arg(long, env = "ESTATE_CONFIG")]
    config: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = estate_config::Settings::load(cli.config.as_deref())?;
    let filter = EnvFilter::try_new(&settings.telemetry.log_filter).unwrap_or_else(|_| EnvFilter::new("info"));
    if settings.telemetry.otlp_endpoint.is_some() {
        eprintln!("estate-facematch: telemetry.otlp_endpoint is ignored; facematch exports nothing (no egress)");
    }
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stdout).init();
    estate_facematch::serve(settings, |addr| println!("estate-facematch listening on {addr}"), shutdown_signal())
        .await?;
    Ok(())
}

/// SIGINT or SIGTERM (Kubernetes stops pods with SIGTERM).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
