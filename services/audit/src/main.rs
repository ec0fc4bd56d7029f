//! `estate-audit`: the audit service as its own process. Settings come from
//! `--config FILE` and `ESTATE__…` variables; it relays the outbox of the
//! database the other services share.

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "estate-audit", version, about = "Audit service of the estate access mesh")]
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
    let _telemetry = estate_telemetry::init(&settings.telemetry, "estate-audit")?;
    let runtime = estate_runtime::Runtime::open(settings).await?;
    if cli.migrate_only {
        runtime.db.migrate_outbox().await?;
        estate_audit::migrate(&runtime.db).await?;
        tracing::info!("migrations applied");
        return Ok(());
    }
    let ip = runtime.settings.listen.ip();
    let app = estate_audit::application(runtime).await?;
    println!("estate-audit listening on {}", std::net::SocketAddr::new(ip, app.port()));
    app.run_until_stopped().await?;
    Ok(())
}
