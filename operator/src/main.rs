//! `aigw-operator`: reconciles Tenant, Channel, Token and Pricing CRs into Higress objects, tenant
//! namespaces, status and the MySQL mirror.
//!
//! Today it connects to its dependencies and serves its ops endpoints; the controllers arrive with
//! the CRDs (see `docs/architecture.md`).

use std::sync::Arc;

use aigw_common::{OpsArgs, init_tracing, ops, probe, shutdown::Shutdown};
use clap::Parser;
use prometheus_client::registry::Registry;

/// Reconciles AIGateway custom resources into Higress configuration.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    ops: OpsArgs,
    /// MySQL URL of the mirror database (`mysql://user:pass@host:port/db`).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing(cli.ops.log_format, &cli.ops.log)?;

    let shutdown = Shutdown::new();
    shutdown.on_signal();
    let readiness = ops::Readiness::default();
    let registry = Registry::with_prefix("aigw_operator");

    // `Client::try_default` reads KUBECONFIG, or the in-cluster service account.
    let client = kube::Client::try_default().await?;
    probe::kube(&readiness, shutdown.clone(), client);
    let pool = sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(4)
        .connect_lazy(&cli.database_url)?;
    probe::mysql(&readiness, shutdown.clone(), pool);

    let (addr, ops_task) = ops::serve_ops(
        cli.ops.ops_addr,
        readiness,
        Arc::new(registry),
        shutdown.clone(),
    )
    .await?;
    tracing::info!(ops = %addr, "aigw-operator started");

    shutdown.wait().await;
    ops_task.await??;
    tracing::info!("aigw-operator stopped");
    Ok(())
}
