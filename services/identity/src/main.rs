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
    /// Write a platform-admin token (mode 0600) to this file, then exit:
    /// bootstraps a distributed deployment, which has no data directory.
    #[arg(long, value_name = "FILE")]
    write_admin_token: Option<std::path::PathBuf>,
}

/// mimalloc: with the system allocator, malloc and free took about 12% of
/// the CPU in a profile of the gate benchmark (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = estate_config::Settings::load(cli.config.as_deref())?;
    let _telemetry = estate_telemetry::init(&settings.telemetry, "estate-identity")?;
    let runtime = estate_runtime::Runtime::open(settings).await?;
    if let Some(path) = cli.write_admin_token {
        let ttl = runtime.settings.auth.admin_token_ttl_secs;
        let issued = runtime.tokens.issue(estate_auth::Principal::PlatformAdmin, "bootstrap-admin", ttl)?;
        estate_crypto::write_secret_file(&path, format!("{}\n", issued.token).as_bytes())?;
        println!("platform admin token written to {}", path.display());
        return Ok(());
    }
    if cli.migrate_only {
        runtime.db.migrate_outbox().await?;
        estate_identity::migrate(&runtime.db).await?;
        tracing::info!("migrations applied");
        return Ok(());
    }
    let ip = runtime.settings.listen.ip();
    let app = estate_identity::application(runtime).await?;
    println!("estate-identity listening on {}", std::net::SocketAddr::new(ip, app.port()));
    tracing::info!(port = app.port(), "identity service listening");
    app.run_until_stopped().await?;
    Ok(())
}
