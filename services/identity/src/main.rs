//! `estate-identity`: the identity service as its own process. Settings come
//! from `--config FILE` and `ESTATE__…` variables (see estate-config).

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "estate-identity", version, about = "Identity service of the estate access mesh")]
struct Cli {
    /// TOML settings file (values there are overridden by ESTATE__… variables).
    #[arg(long, env = "ESTATE_CONFIG")]
    config: Option<std::path::PathBuf>,
    /// Only apply database migrations, then exit.
    #[arg(long)]
    migrate_only: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = estate_config::Settings::load(cli.config.as_deref())?;
    let _telemetry = estate_telemetry::init(&settings.telemetry, "estate-identity")?;
    let runtime = estate_runtime::Runtime::open(settings).await?;
    if cli.migrate_only {
        runtime.db.migrate_outbox().await?;
        estate_identity::migrate(&runtime.db).await?;
        tracing::info!("migrations applied");
        return Ok(());
    }
    let app = estate_identity::Application::build(runtime).await?;
    tracing::info!(port = app.port(), "identity service listening");
    app.run_until_stopped().await?;
    Ok(())
}
