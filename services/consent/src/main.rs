//! `estate-consent`: the consent service as its own process. Settings come
//! from `--config FILE` and `ESTATE__…` variables; the database is the one
//! identity uses.

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "estate-consent", version, about = "Consent service of the estate access mesh")]
struct Cli {
    /// TOML settings file (overridden by ESTATE__… variables).
    #[arg(long, env = "ESTATE_CONFIG")]
    config: Option<std::path::PathBuf>,
    /// Only apply database migrations, then exit.
    #[arg(long)]
    migrate_only: bool,
}

/// mimalloc: with the system allocator, malloc and free took about 12% of
/// the CPU in a profile of the gate benchmark (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = estate_config::Settings::load(cli.config.as_deref())?;
    let _telemetry = estate_telemetry::init(&settings.telemetry, "estate-consent")?;
    let runtime = estate_runtime::Runtime::open(settings).await?;
    if cli.migrate_only {
        runtime.db.migrate_outbox().await?;
        estate_consent::migrate(&runtime.db).await?;
        tracing::info!("migrations applied");
        return Ok(());
    }
    let ip = runtime.settings.listen.ip();
    let app = estate_consent::application(runtime).await?;
    println!("estate-consent listening on {}", std::net::SocketAddr::new(ip, app.port()));
    app.run_until_stopped().await?;
    Ok(())
}
