//! `aigw-apiserver`: the REST API resellers use (`/api/*`, `/oauth/*`) and the authz listener Higress
//! `ext-auth` calls on every LLM request.
//!
//! Today it serves a JSON 404 for every API path, its ops endpoints, and probes its dependencies;
//! the API and the authz gate arrive with their issues (see `docs/architecture.md`).

mod app;

use std::{net::SocketAddr, sync::Arc};

use aigw_common::{OpsArgs, init_tracing, ops, probe, shutdown::Shutdown};
use clap::Parser;
use prometheus_client::registry::Registry;

/// AIGateway REST API and authorisation endpoint.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    ops: OpsArgs,
    /// Address of the REST API listener.
    #[arg(long, env = "AIGW_LISTEN_ADDR", default_value = "127.0.0.1:8080")]
    listen_addr: SocketAddr,
    /// MySQL URL (`mysql://user:pass@host:port/db`).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Redis URL (`redis://host:port/`).
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    redis_url: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing(cli.ops.log_format, &cli.ops.log)?;

    let shutdown = Shutdown::new();
    shutdown.on_signal();
    let readiness = ops::Readiness::default();
    let registry = Registry::with_prefix("aigw_apiserver");

    let client = kube::Client::try_default().await?;
    probe::kube(&readiness, shutdown.clone(), client);
    let pool = sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(8)
        .connect_lazy(&cli.database_url)?;
    probe::mysql(&readiness, shutdown.clone(), pool);
    let redis = redis::Client::open(cli.redis_url.as_str())?;
    probe::redis(&readiness, shutdown.clone(), redis);

    let (api_addr, api_task) = ops::serve(cli.listen_addr, app::router(), shutdown.clone()).await?;
    let (ops_addr, ops_task) = ops::serve_ops(
        cli.ops.ops_addr,
        readiness,
        Arc::new(registry),
        shutdown.clone(),
    )
    .await?;
    tracing::info!(api = %api_addr, ops = %ops_addr, "aigw-apiserver started");

    shutdown.wait().await;
    api_task.await??;
    ops_task.await??;
    tracing::info!("aigw-apiserver stopped");
    Ok(())
}
