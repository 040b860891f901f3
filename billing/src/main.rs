//! `aigw-billing`: `ingest` (HTTP usage events from the plugin → Kafka `usage.events`) and `worker`
//! (Kafka → pricing → ClickHouse + Redis + MySQL).
//!
//! Today both subcommands connect to their dependencies and serve their ops endpoints; the pipeline
//! arrives with the billing issue (see `docs/architecture.md`).

use std::{sync::Arc, time::Duration};

use aigw_common::{OpsArgs, init_tracing, ops, probe, shutdown::Shutdown};
use clap::{Parser, Subcommand};
use prometheus_client::registry::Registry;
use rdkafka::{
    ClientConfig,
    producer::{FutureProducer, Producer},
};

/// AIGateway usage ingest and billing worker.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    role: Role,
    #[command(flatten)]
    ops: OpsArgs,
    /// Kafka bootstrap servers (`host:port,…`).
    #[arg(long, env = "KAFKA_BROKERS")]
    kafka_brokers: String,
}

#[derive(Debug, Subcommand)]
enum Role {
    /// Accept usage events over HTTP and append them to Kafka.
    Ingest {
        /// Address of the ingest listener.
        #[arg(long, env = "AIGW_LISTEN_ADDR", default_value = "127.0.0.1:8090")]
        listen_addr: std::net::SocketAddr,
    },
    /// Price usage events and write them to ClickHouse, Redis and MySQL.
    Worker {
        /// ClickHouse HTTP URL.
        #[arg(long, env = "CLICKHOUSE_URL")]
        clickhouse_url: String,
        /// ClickHouse database.
        #[arg(long, env = "CLICKHOUSE_DATABASE", default_value = "aigateway")]
        clickhouse_database: String,
        /// Redis URL (`redis://host:port/`).
        #[arg(long, env = "REDIS_URL", hide_env_values = true)]
        redis_url: String,
        /// MySQL URL (`mysql://user:pass@host:port/db`).
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing(cli.ops.log_format, &cli.ops.log)?;

    let shutdown = Shutdown::new();
    shutdown.on_signal();
    let readiness = ops::Readiness::default();
    let registry = Registry::with_prefix("aigw_billing");

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &cli.kafka_brokers)
        .set("enable.idempotence", "true")
        .create()?;
    probe::spawn(&readiness, "kafka", shutdown.clone(), move || {
        let producer = producer.clone();
        async move {
            // librdkafka's metadata call blocks; keep it off the async workers.
            tokio::task::spawn_blocking(move || {
                producer
                    .client()
                    .fetch_metadata(None, Duration::from_secs(3))
                    .map(|m| {
                        format!(
                            "{} broker(s), {} topic(s)",
                            m.brokers().len(),
                            m.topics().len()
                        )
                    })
                    .map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| e.to_string())?
        }
    });

    let mut tasks = Vec::new();
    match cli.role {
        Role::Ingest { listen_addr } => {
            let router = axum::Router::new();
            let (addr, task) = ops::serve(listen_addr, router, shutdown.clone()).await?;
            tracing::info!(ingest = %addr, "ingest listener bound");
            tasks.push(task);
        }
        Role::Worker {
            clickhouse_url,
            clickhouse_database,
            redis_url,
            database_url,
        } => {
            let ch = clickhouse::Client::default()
                .with_url(clickhouse_url)
                .with_database(clickhouse_database)
                // ClickHouse 18.16 (the test server) lacks what validation needs; see docs/testbed.md.
                .with_validation(false);
            probe::spawn(&readiness, "clickhouse", shutdown.clone(), move || {
                let ch = ch.clone();
                async move {
                    ch.query("SELECT version()")
                        .fetch_one::<String>()
                        .await
                        .map(|v| format!("clickhouse {v}"))
                        .map_err(|e| e.to_string())
                }
            });
            let redis = redis::Client::open(redis_url.as_str())?;
            probe::redis(&readiness, shutdown.clone(), redis);
            let pool = sqlx::mysql::MySqlPoolOptions::new()
                .max_connections(4)
                .connect_lazy(&database_url)?;
            probe::mysql(&readiness, shutdown.clone(), pool);
        }
    }

    let (addr, ops_task) = ops::serve_ops(
        cli.ops.ops_addr,
        readiness,
        Arc::new(registry),
        shutdown.clone(),
    )
    .await?;
    tracing::info!(ops = %addr, "aigw-billing started");
    tasks.push(ops_task);

    shutdown.wait().await;
    for task in tasks {
        task.await??;
    }
    tracing::info!("aigw-billing stopped");
    Ok(())
}
