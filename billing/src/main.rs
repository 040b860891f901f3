//! `aigw-billing`: `ingest` (HTTP usage events from the plugin → Kafka `usage.events`), `worker`
//! (Kafka → pricing → ClickHouse + Redis + MySQL) and `topics` (creates and keeps the Kafka topics,
//! the chart's hook Job). See `docs/architecture.md` §6.

use std::{sync::Arc, time::Duration};

use aigw_billing::{ingest, worker};
use aigw_common::{OpsArgs, init_tracing, ops, probe, shutdown::Shutdown};
use clap::{Parser, Subcommand};
use prometheus_client::registry::Registry;
use rdkafka::{
    ClientConfig,
    producer::{FutureProducer, Producer},
};

/// AIGateway usage ingest and billing worker (and `aigw-billing topics --help`: the Kafka topics).
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
    /// Topic of usage events.
    #[arg(long, env = "AIGW_USAGE_TOPIC", default_value = "usage.events")]
    usage_topic: String,
    /// Dead-letter topic for events that cannot be parsed or priced.
    #[arg(long, env = "AIGW_DLQ_TOPIC", default_value = "usage.events.dlq")]
    dlq_topic: String,
}

#[derive(Debug, Subcommand)]
enum Role {
    /// Accept usage events over HTTP and append them to Kafka.
    Ingest {
        /// Address of the ingest listener.
        #[arg(long, env = "AIGW_LISTEN_ADDR", default_value = "127.0.0.1:8090")]
        listen_addr: std::net::SocketAddr,
        /// Shared secret the usage reporter sends in `x-aigw-ingest-secret` (the same Secret the
        /// operator reads).
        #[command(flatten)]
        ingest_secret: aigw_common::secret::IngestSecretArgs,
        /// How long Kafka may take to acknowledge an event before the request gets a 503.
        #[arg(long, env = "AIGW_PRODUCE_TIMEOUT_MS", default_value_t = 5_000)]
        produce_timeout_ms: u64,
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
        /// Kafka consumer group.
        #[arg(long, env = "AIGW_BILLING_GROUP", default_value = "aigw-billing")]
        group: String,
        /// Most events per batch.
        #[arg(long, env = "AIGW_BATCH_SIZE", default_value_t = 5_000)]
        batch_size: usize,
        /// Longest wait (ms) for a batch to fill after its first event.
        #[arg(long, env = "AIGW_BATCH_WAIT_MS", default_value_t = 200)]
        batch_wait_ms: u64,
        /// Lifetime (s) of dedupe keys and settle markers in Redis.
        #[arg(long, env = "AIGW_DEDUPE_TTL_SECS", default_value_t = 7 * 24 * 3600)]
        dedupe_ttl_secs: u64,
        /// Reload period (s) of tenants, tokens, channels and prices from MySQL.
        #[arg(long, env = "AIGW_REFRESH_SECS", default_value_t = 10)]
        refresh_secs: u64,
        /// Kafka static membership id (a `StatefulSet` pod name): a restarted worker gets its
        /// partitions back at once. Unset: dynamic membership.
        #[arg(long, env = "AIGW_CONSUMER_INSTANCE")]
        consumer_instance: Option<String>,
        /// Keep `usage_logs` for this many whole months before the current one (0: keep forever).
        /// TTL on ClickHouse ≥ 19.6, daily partition drops on older servers.
        #[arg(long, env = "AIGW_RETENTION_MONTHS", default_value_t = 0)]
        retention_months: u32,
        /// Least time (s) between two writes of one Token's `status.usedQuota` (immediately when
        /// the quota is used up). 0 disables the writes (no Kubernetes access needed).
        #[arg(long, env = "AIGW_STATUS_SYNC_SECS", default_value_t = 10)]
        status_sync_secs: u64,
        /// Seconds after its reservation expired that an admitted request never reported is billed
        /// at its admission estimate (the pending sweep; 0 disables it).
        #[arg(long, env = "AIGW_PENDING_GRACE_SECS", default_value_t = 60)]
        pending_grace_secs: u64,
        /// Redis key under which authz records admitted requests (the same value as authz's).
        #[arg(long, env = "AIGW_PENDING_KEY", default_value = aigw_common::quota::PENDING)]
        pending_key: String,
        /// Topic of quota and channel alerts.
        #[arg(long, env = "AIGW_ALERT_TOPIC", default_value = aigw_common::events::ALERT_EVENTS)]
        alert_topic: String,
    },
}

/// `aigw-billing topics`: parsed on its own (the servers' required options do not apply).
#[derive(Debug, Parser)]
#[command(version, name = "aigw-billing topics")]
struct TopicsCli {
    /// Kafka bootstrap servers (`host:port,…`).
    #[arg(long, env = "KAFKA_BROKERS")]
    kafka_brokers: String,
    /// A topic to create or keep: `name:partitions:replicationFactor:retentionMs` (repeat).
    #[arg(long = "topic", required = true)]
    topics: Vec<aigw_billing::topics::TopicSpec>,
    /// How long Kafka may take for each operation.
    #[arg(long, default_value_t = 30)]
    timeout_secs: u64,
}

/// Creates or updates the topics (the chart's hook Job) and prints one line per topic.
async fn topics() -> anyhow::Result<()> {
    let cli = TopicsCli::parse_from(std::env::args().skip(1));
    let report = aigw_billing::topics::ensure(
        &cli.kafka_brokers,
        &cli.topics,
        Duration::from_secs(cli.timeout_secs),
    )
    .await?;
    for (topic, changes) in report {
        if changes.is_empty() {
            println!("{topic}: as asked");
        }
        for change in changes {
            println!("{topic}: {change}");
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::args().nth(1).as_deref() == Some("topics") {
        return topics().await;
    }
    let cli = Cli::parse();
    let _telemetry = init_tracing(cli.ops.log_format, &cli.ops.log)?;

    let shutdown = Shutdown::new();
    shutdown.on_signal();
    let readiness = ops::Readiness::default();
    let mut registry = Registry::with_prefix("aigw_billing");

    let probe_producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &cli.kafka_brokers)
        .create()?;
    probe::spawn(&readiness, "kafka", shutdown.clone(), move || {
        let producer = probe_producer.clone();
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
        Role::Ingest {
            listen_addr,
            ingest_secret,
            produce_timeout_ms,
        } => {
            let ingest_secret = ingest_secret.load()?;
            let timeout = Duration::from_millis(produce_timeout_ms);
            let settings = ingest::Settings {
                topic: cli.usage_topic,
                dlq_topic: cli.dlq_topic,
                secret: ingest_secret,
                produce_timeout: timeout,
            };
            let metrics = ingest::Metrics::register(&mut registry);
            let producer = ingest::producer(&cli.kafka_brokers, timeout)?;
            let router = ingest::router(settings, producer, metrics);
            let (addr, task) = ops::serve(listen_addr, router, shutdown.clone()).await?;
            tracing::info!(ingest = %addr, "ingest listener bound");
            tasks.push(task);
        }
        role @ Role::Worker { .. } => {
            let settings = WorkerBase {
                brokers: cli.kafka_brokers.clone(),
                topic: cli.usage_topic,
                dlq_topic: cli.dlq_topic,
            };
            let metrics = worker::Metrics::register(&mut registry);
            let pending_metrics = aigw_billing::pending::Metrics::register(&mut registry);
            tasks.push(start_worker(
                role,
                settings,
                metrics,
                pending_metrics,
                &readiness,
                &shutdown,
            )?);
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

/// What the worker takes from the top-level flags.
#[derive(Debug)]
struct WorkerBase {
    brokers: String,
    topic: String,
    dlq_topic: String,
}

type Task = tokio::task::JoinHandle<std::io::Result<()>>;

/// Probes the worker's dependencies and starts it; it keeps retrying to connect until it can.
fn start_worker(
    role: Role,
    base: WorkerBase,
    metrics: worker::Metrics,
    pending_metrics: aigw_billing::pending::Metrics,
    readiness: &ops::Readiness,
    shutdown: &Shutdown,
) -> anyhow::Result<Task> {
    let Role::Worker {
        clickhouse_url,
        clickhouse_database,
        redis_url,
        database_url,
        group,
        batch_size,
        batch_wait_ms,
        dedupe_ttl_secs,
        refresh_secs,
        consumer_instance,
        retention_months,
        status_sync_secs,
        pending_grace_secs,
        pending_key,
        alert_topic,
    } = role
    else {
        anyhow::bail!("not the worker role");
    };
    let ch = clickhouse::Client::default()
        .with_url(clickhouse_url)
        .with_database(clickhouse_database)
        // ClickHouse 18.16 (the test server) lacks what validation needs; see docs/testbed.md.
        .with_validation(false);
    let probe_ch = ch.clone();
    probe::spawn(readiness, "clickhouse", shutdown.clone(), move || {
        let ch = probe_ch.clone();
        async move {
            ch.query("SELECT version()")
                .fetch_one::<String>()
                .await
                .map(|v| format!("clickhouse {v}"))
                .map_err(|e| e.to_string())
        }
    });
    let redis = redis::Client::open(redis_url.as_str())?;
    probe::redis(readiness, shutdown.clone(), redis.clone());
    let pool = sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(4)
        .connect_lazy(&database_url)?;
    probe::mysql(readiness, shutdown.clone(), pool.clone());
    let settings = worker::Settings {
        brokers: base.brokers,
        group,
        topic: base.topic,
        dlq_topic: base.dlq_topic,
        alert_topic,
        batch_size: batch_size.max(1),
        batch_wait: Duration::from_millis(batch_wait_ms),
        dedupe_ttl: Duration::from_secs(dedupe_ttl_secs),
        refresh: Duration::from_secs(refresh_secs),
        instance: consumer_instance,
        pending: aigw_common::quota::PendingKeys::under(&pending_key),
    };
    if retention_months > 0 {
        spawn_retention(ch.clone(), retention_months, shutdown.clone());
    }
    if pending_grace_secs > 0 {
        spawn_sweep(
            redis.clone(),
            &settings,
            Duration::from_secs(pending_grace_secs),
            pending_metrics,
            shutdown.clone(),
        )?;
    }
    let stop = shutdown.clone();
    Ok(tokio::spawn(async move {
        let status = status_writer(status_sync_secs).await;
        // Dependencies may come up after us: keep trying until connected or stopped.
        let mut wait = Duration::from_millis(500);
        let w = loop {
            match worker::Worker::connect(
                settings.clone(),
                ch.clone(),
                redis.clone(),
                pool.clone(),
                metrics.clone(),
                status.clone(),
            )
            .await
            {
                Ok(w) => break w,
                Err(e) => {
                    tracing::warn!(error = format!("{e:#}"), "worker cannot start yet");
                    tokio::select! {
                        () = stop.wait() => return Ok(()),
                        () = tokio::time::sleep(wait) => {}
                    }
                    wait = (wait * 2).min(Duration::from_secs(10));
                }
            }
        };
        tracing::info!("worker consuming");
        w.run(stop)
            .await
            .map_err(|e| std::io::Error::other(format!("{e:#}")))
    }))
}

/// The Token status writer (`aigw_billing::status`), unless turned off or without Kubernetes.
async fn status_writer(every_secs: u64) -> Option<worker::StatusSink> {
    if every_secs == 0 {
        return None;
    }
    match kube::Client::try_default().await {
        Ok(client) => Some(aigw_billing::status::spawn(
            client,
            Duration::from_secs(every_secs),
        )),
        Err(e) => {
            tracing::warn!(error = %e, "no Kubernetes access: Token status.usedQuota is not written");
            None
        }
    }
}

/// Starts the pending sweep (`aigw_billing::pending`) once Redis answers.
fn spawn_sweep(
    redis: redis::Client,
    settings: &worker::Settings,
    grace: Duration,
    metrics: aigw_billing::pending::Metrics,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let producer = aigw_billing::ingest::producer(&settings.brokers, Duration::from_secs(10))?;
    let sweep = aigw_billing::pending::Settings {
        keys: settings.pending.clone(),
        topic: settings.topic.clone(),
        grace,
        every: Duration::from_secs(5),
        batch: 500,
    };
    tokio::spawn(async move {
        let conn = loop {
            match redis::aio::ConnectionManager::new(redis.clone()).await {
                Ok(c) => break c,
                Err(e) => {
                    tracing::warn!(error = %e, "pending sweep waiting for redis");
                    tokio::select! {
                        () = shutdown.wait() => return,
                        () = tokio::time::sleep(Duration::from_secs(2)) => {}
                    }
                }
            }
        };
        aigw_billing::pending::sweep(conn, producer, sweep, metrics, shutdown).await;
    });
    Ok(())
}

/// Applies the retention at start and then daily.
fn spawn_retention(ch: clickhouse::Client, months: u32, shutdown: Shutdown) {
    tokio::spawn(async move {
        loop {
            let today = chrono::Utc::now().date_naive();
            match aigw_billing::retention::apply(&ch, months, today).await {
                Ok(applied) => tracing::info!(?applied, months, "usage_logs retention applied"),
                Err(e) => {
                    tracing::warn!(error = %e, "usage_logs retention failed; retrying tomorrow");
                }
            }
            tokio::select! {
                () = shutdown.wait() => return,
                () = tokio::time::sleep(Duration::from_hours(24)) => {}
            }
        }
    });
}
