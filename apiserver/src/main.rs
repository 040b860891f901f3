//! `aigw-apiserver`: the REST API resellers use (`/api/*`, `/oauth/*`) and the authz listener Higress
//! `ext-auth` calls on every LLM request (see `docs/architecture.md`). The REST API is a JSON 404 for
//! every path until its issue lands.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use aigw_apiserver::{
    app,
    authz::{
        index::Index,
        service::{self, Authz, Settings},
    },
};
use aigw_common::{OpsArgs, init_tracing, ops, probe, shutdown::Shutdown};
use clap::{Parser, ValueEnum};
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
    /// Which listeners to run.
    #[arg(long, env = "AIGW_ROLE", value_enum, default_value = "all")]
    role: Role,
    /// Address of the authz listener Higress ext-auth calls.
    #[arg(long, env = "AIGW_AUTHZ_ADDR", default_value = "127.0.0.1:8081")]
    authz_addr: SocketAddr,
    /// Output tokens reserved for a request that sets no output limit (`max_tokens`, …); the
    /// prompt part of a reservation is estimated from the request body.
    #[arg(long, env = "AIGW_RESERVE_ESTIMATE", default_value_t = 4096)]
    reserve_estimate: i64,
    /// Redis key under which admitted requests are recorded until billed (billing's
    /// `AIGW_PENDING_KEY` must be the same).
    #[arg(long, env = "AIGW_PENDING_KEY", default_value = aigw_common::quota::PENDING)]
    pending_key: String,
    /// The most requests one quota-limited token may have in flight at once (0: no cap).
    #[arg(long, env = "AIGW_MAX_IN_FLIGHT", default_value_t = 64)]
    max_in_flight: i64,
    /// Seconds an unsettled reservation holds quota.
    #[arg(long, env = "AIGW_RESERVATION_TTL", default_value_t = 600)]
    reservation_ttl_secs: i64,
    /// Admit requests when Redis is unreachable (default: refuse with 503).
    #[arg(long, env = "AIGW_AUTHZ_FAIL_OPEN", default_value_t = false, action = clap::ArgAction::Set)]
    authz_fail_open: bool,
    /// Index only Tokens and Tenants labelled `aigateway.io/instance=<value>` (as the operator's
    /// `--instance`).
    #[arg(long, env = "AIGW_INSTANCE")]
    instance: Option<String>,
}

/// Listeners a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Role {
    /// REST API and authz.
    All,
    /// Only the REST API.
    Api,
    /// Only the authz endpoint.
    Authz,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing(cli.ops.log_format, &cli.ops.log)?;

    let shutdown = Shutdown::new();
    shutdown.on_signal();
    let readiness = ops::Readiness::default();
    let mut registry = Registry::with_prefix("aigw_apiserver");

    let client = kube::Client::try_default().await?;
    probe::kube(&readiness, shutdown.clone(), client.clone());
    let pool = sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(8)
        .connect_lazy(&cli.database_url)?;
    probe::mysql(&readiness, shutdown.clone(), pool);
    let redis = redis::Client::open(cli.redis_url.as_str())?;
    probe::redis(&readiness, shutdown.clone(), redis.clone());

    let mut tasks = Vec::new();
    if cli.role != Role::Authz {
        let (addr, task) = ops::serve(cli.listen_addr, app::router(), shutdown.clone()).await?;
        tracing::info!(api = %addr, "REST API listening");
        tasks.push(task);
    }
    if cli.role != Role::Api {
        // Quota counters must not be evictable: refuse to start on such a Redis (if it answers
        // now; otherwise readiness waits for it and billing's worker checks too).
        if let Ok(Ok(mut conn)) = tokio::time::timeout(
            Duration::from_secs(2),
            redis.get_multiplexed_async_connection(),
        )
        .await
        {
            aigw_common::quota::check_redis(&mut conn)
                .await
                .map_err(anyhow::Error::msg)?;
        }
        let index = Index::default();
        let selector = Some(aigw_crds::instance_selector(cli.instance.as_deref()));
        tokio::spawn(index.clone().run(client.clone(), selector));
        mark_ready_when_synced(&readiness, index.clone(), shutdown.clone());
        let manager = redis::aio::ConnectionManager::new_lazy_with_config(
            redis,
            redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(1)))
                .set_response_timeout(Some(Duration::from_secs(1))),
        )?;
        let settings = Settings {
            reserve_estimate: cli.reserve_estimate,
            max_in_flight: cli.max_in_flight,
            pending: aigw_common::quota::PendingKeys::under(&cli.pending_key),
            reservation_ttl_ms: cli.reservation_ttl_secs * 1000,
            fail_open: cli.authz_fail_open,
        };
        let metrics = service::Metrics::register(&mut registry);
        let authz = Authz::new(index, manager, settings, metrics);
        service::spawn_index_gauge(&authz);
        let (addr, task) =
            ops::serve(cli.authz_addr, service::router(authz), shutdown.clone()).await?;
        tracing::info!(authz = %addr, "authz listening");
        tasks.push(task);
    }
    let (ops_addr, ops_task) = ops::serve_ops(
        cli.ops.ops_addr,
        readiness,
        Arc::new(registry),
        shutdown.clone(),
    )
    .await?;
    tracing::info!(ops = %ops_addr, "aigw-apiserver started");
    tasks.push(ops_task);

    shutdown.wait().await;
    for task in tasks {
        task.await??;
    }
    tracing::info!("aigw-apiserver stopped");
    Ok(())
}

/// `/readyz` reports `authz-index` not ready until the Token and Tenant watches have listed.
fn mark_ready_when_synced(readiness: &ops::Readiness, index: Index, shutdown: Shutdown) {
    readiness.register("authz-index");
    let readiness = readiness.clone();
    tokio::spawn(async move {
        while !index.synced() {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
                () = shutdown.wait() => return,
            }
        }
        tracing::info!(tokens = index.len(), "authz index synced");
        readiness.set("authz-index", true);
    });
}
