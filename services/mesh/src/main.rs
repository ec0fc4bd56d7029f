//! `estate-mesh --data-dir DIR --listen ADDR`: the whole mesh in one process.

use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "estate-mesh",
    version,
    about = "The estate access mesh, all services in one process (embedded default)"
)]
struct Cli {
    /// Directory for the SQLite database, keys and the admin token
    /// [default: ./data, or data_dir from the config / ESTATE__DATA_DIR].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// gRPC listen address [default: 127.0.0.1:50051, or listen from the
    /// config / ESTATE__LISTEN].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// TOML settings file; ESTATE__… variables override it, flags override both.
    #[arg(long, env = "ESTATE_CONFIG")]
    config: Option<PathBuf>,
}

/// mimalloc: with the system allocator, malloc and free took about 12% of
/// the CPU in a profile of the gate benchmark (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut settings = estate_config::Settings::load(cli.config.as_deref())?;
    if let Some(dir) = cli.data_dir {
        settings.data_dir = dir;
    }
    if let Some(addr) = cli.listen {
        settings.listen = addr;
    }
    let _telemetry = estate_telemetry::init(&settings.telemetry, "estate-mesh")?;
    let ip = settings.listen.ip();
    let app = estate_mesh::Application::build(settings).await?;
    println!("estate-mesh listening on {} (all services)", SocketAddr::new(ip, app.port()));
    println!("platform admin token: {}", app.admin_token_path().display());
    tracing::info!(port = app.port(), "estate-mesh started");
    app.run_until_stopped().await?;
    tracing::info!("estate-mesh stopped");
    Ok(())
}
