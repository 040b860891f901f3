//! `aigw-operator`: reconciles Tenant, Channel, Token and Pricing CRs into Higress objects, tenant
//! namespaces, status and the MySQL mirror.

use std::{sync::Arc, time::Duration};

use aigw_common::{OpsArgs, init_tracing, ops, probe, shutdown::Shutdown};
use aigw_operator::{
    context::{Config, Ctx, Metrics, TenantGrant},
    keys::Sealer,
    leader::{self, Elector, Timing},
};
use clap::Parser;
use prometheus_client::registry::Registry;
use rdkafka::{ClientConfig, producer::FutureProducer};

/// Reconciles AIGateway custom resources into Higress configuration.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    ops: OpsArgs,
    /// MySQL URL of the mirror database (`mysql://user:pass@host:port/db`).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// AES-256 key (64 hex characters) sealing upstream keys in MySQL.
    #[arg(long, env = "AIGW_CHANNEL_KEY", hide_env_values = true)]
    channel_key: String,
    /// Kafka bootstrap servers for `tenant.events`; events are off when unset.
    #[arg(long, env = "KAFKA_BROKERS")]
    kafka_brokers: Option<String>,
    /// Namespace the Higress controller reads.
    #[arg(long, env = "AIGW_HIGRESS_NAMESPACE", default_value = aigw_crds::HIGRESS_NAMESPACE)]
    higress_namespace: String,
    /// Reconcile only CRs labelled `aigateway.io/instance=<value>`.
    #[arg(long, env = "AIGW_INSTANCE")]
    instance: Option<String>,
    /// `host:port` of the apiserver Service for `/api` and `/oauth`.
    #[arg(
        long,
        env = "AIGW_APISERVER_DESTINATION",
        default_value = "aigw-apiserver.aigw-system.svc.cluster.local:8080"
    )]
    apiserver_destination: String,
    /// FQDN of the authz Service Higress ext-auth calls.
    #[arg(
        long,
        env = "AIGW_AUTHZ_SERVICE",
        default_value = "aigw-apiserver.aigw-system.svc.cluster.local"
    )]
    authz_service: String,
    /// Port of the authz listener.
    #[arg(long, env = "AIGW_AUTHZ_PORT", default_value_t = 8081)]
    authz_port: u16,
    /// Path of the authz endpoint.
    #[arg(long, env = "AIGW_AUTHZ_PATH", default_value = "/authz")]
    authz_path: String,
    /// Envoy cluster of the billing ingest Service.
    #[arg(
        long,
        env = "AIGW_INGEST_CLUSTER",
        default_value = "outbound|8090||aigw-ingest.aigw-system.svc.cluster.local"
    )]
    ingest_cluster: String,
    /// Shared secret the usage reporter sends to billing ingest (the same Secret ingest reads);
    /// written into the usage-reporter WasmPlugin config. Required: see `aigw_common::secret`.
    #[command(flatten)]
    ingest_secret: aigw_common::secret::IngestSecretArgs,
    /// Image of our usage-reporter plugin (the Helm chart sets the published one).
    #[arg(
        long,
        env = "AIGW_USAGE_REPORTER_IMAGE",
        default_value = "oci://ghcr.io/aigateway/aigw-plugin:0.1.0"
    )]
    usage_reporter_image: String,
    /// Image of the Higress ai-proxy plugin.
    #[arg(
        long,
        env = "AIGW_AI_PROXY_IMAGE",
        default_value = "oci://higress-registry.cn-hangzhou.cr.aliyuncs.com/plugins/ai-proxy:2.0.1"
    )]
    ai_proxy_image: String,
    /// Elect a leader through a Lease so only one replica reconciles.
    #[arg(long, env = "AIGW_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Namespace of the leader Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "aigw-system")]
    leader_election_namespace: String,
    /// Image of the Higress model-router plugin.
    #[arg(
        long,
        env = "AIGW_MODEL_ROUTER_IMAGE",
        default_value = "oci://higress-registry.cn-hangzhou.cr.aliyuncs.com/plugins/model-router:2.0.1"
    )]
    model_router_image: String,
    /// The only namespace Channel credentials may be read from.
    #[arg(
        long,
        env = "AIGW_CREDENTIALS_NAMESPACE",
        default_value = "aigw-system"
    )]
    credentials_namespace: String,
    /// How tenant domains get TLS certificates through Higress's `higress-https` `ConfigMap`:
    /// `secret` (a Secret `aigw-tls-<domain>` per domain in the tenant's namespace, e.g. from
    /// cert-manager), `acme` (Higress issues them; needs `--acme-email`) or `off`.
    #[arg(long, env = "AIGW_TLS_MODE", value_enum, default_value_t = aigw_operator::tls::Mode::Secret)]
    tls_mode: aigw_operator::tls::Mode,
    /// ACME account email for `--tls-mode acme`.
    #[arg(long, env = "AIGW_ACME_EMAIL", default_value = "")]
    acme_email: String,
    /// Image of the Higress ext-auth plugin.
    #[arg(
        long,
        env = "AIGW_EXT_AUTH_IMAGE",
        default_value = "oci://higress-registry.cn-hangzhou.cr.aliyuncs.com/plugins/ext-auth:2.0.0"
    )]
    ext_auth_image: String,
    /// The operator's `ServiceAccount` (the chart sets it from the pod spec). When set, the
    /// operator binds `--tenant-cluster-role` to it in each tenant namespace it creates: its
    /// only rights on Secrets there.
    #[arg(long, env = "AIGW_SERVICE_ACCOUNT")]
    service_account: Option<String>,
    /// The `ClusterRole` bound to the operator in each tenant namespace.
    #[arg(
        long,
        env = "AIGW_TENANT_CLUSTER_ROLE",
        default_value = "aigw-operator-tenant"
    )]
    tenant_cluster_role: String,
}

/// The `tenant.events` producer, when Kafka is configured.
fn tenant_events(brokers: Option<&str>) -> anyhow::Result<Option<FutureProducer>> {
    Ok(match brokers {
        Some(brokers) => Some(
            ClientConfig::new()
                .set("bootstrap.servers", brokers)
                .set("enable.idempotence", "true")
                .create::<FutureProducer>()?,
        ),
        None => None,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _telemetry = init_tracing(cli.ops.log_format, &cli.ops.log)?;
    // Before anything else: without the secret every usage report would be refused.
    let ingest_secret = cli.ingest_secret.load()?;
    // The reporter's ingest cluster must be one Envoy (and its internal route) can name.
    aigw_operator::higress::cluster_destination(&cli.ingest_cluster)?;

    let shutdown = Shutdown::new();
    shutdown.on_signal();
    let readiness = ops::Readiness::default();
    let mut registry = Registry::with_prefix("aigw_operator");
    let metrics = Metrics::register(&mut registry);

    // `Client::try_default` reads KUBECONFIG, or the in-cluster service account.
    let client = kube::Client::try_default().await?;
    probe::kube(&readiness, shutdown.clone(), client.clone());
    let pool = sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy(&cli.database_url)?;
    probe::mysql(&readiness, shutdown.clone(), pool.clone());
    let events = tenant_events(cli.kafka_brokers.as_deref())?;
    let config = Config {
        higress_namespace: cli.higress_namespace,
        instance: cli.instance,
        apiserver_destination: cli.apiserver_destination,
        authz_service: cli.authz_service,
        authz_port: cli.authz_port,
        authz_path: cli.authz_path,
        ingest_cluster: cli.ingest_cluster,
        ingest_secret,
        usage_reporter_image: cli.usage_reporter_image,
        ai_proxy_image: cli.ai_proxy_image,
        ext_auth_image: cli.ext_auth_image,
        model_router_image: cli.model_router_image,
        credentials_namespace: cli.credentials_namespace,
        tenant_grant: cli.service_account.map(|sa| TenantGrant {
            cluster_role: cli.tenant_cluster_role,
            service_account: sa,
            namespace: cli.leader_election_namespace.clone(),
        }),
        tls: aigw_operator::tls::Settings {
            mode: cli.tls_mode,
            acme_email: cli.acme_email,
        },
    };
    let ctx = Arc::new(Ctx::new(
        client,
        pool,
        config,
        metrics,
        Sealer::from_hex(&cli.channel_key)?,
        events,
    ));

    let (addr, ops_task) = ops::serve_ops(
        cli.ops.ops_addr,
        readiness,
        Arc::new(registry),
        shutdown.clone(),
    )
    .await?;
    tracing::info!(ops = %addr, "aigw-operator started");

    if aigw_operator::wait_for_crds(&ctx.client, &shutdown).await {
        if cli.leader_election {
            let identity = format!(
                "{}-{}",
                std::env::var("HOSTNAME").unwrap_or_else(|_| "aigw-operator".into()),
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            );
            let timing = Timing::DEFAULT;
            let elector = Elector::new(
                ctx.client.clone(),
                &cli.leader_election_namespace,
                "aigw-operator",
                &identity,
                timing.lease,
            );
            let term = ctx.term.clone();
            if leader::acquire(&elector, timing, &term, &shutdown).await {
                tracing::info!(identity = elector.identity(), "became leader");
                let renewer = tokio::spawn(leader::hold(
                    elector.clone(),
                    timing,
                    term,
                    shutdown.clone(),
                ));
                aigw_operator::run(ctx, shutdown.clone()).await;
                renewer.abort();
                elector.release().await?;
            }
        } else {
            aigw_operator::run(ctx, shutdown.clone()).await;
        }
    }
    shutdown.trigger();
    ops_task.await??;
    tracing::info!("aigw-operator stopped");
    Ok(())
}
