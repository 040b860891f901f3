//! `aigw-apiserver`: the identity provider and REST API resellers use (`/oauth/*`, `/api/*`) and
//! the authz listener Higress `ext-auth` calls on every LLM request (see `docs/architecture.md`).
//! Subcommands: `keygen` (an OIDC signing key), `client` (register an OIDC client), `bootstrap-owner`
//! (invite a tenant's first owner).

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use aigw_apiserver::{
    api::backend::{Backend, Settings as BackendSettings},
    app,
    authz::{
        index::Index,
        service::{self, Authz, Settings},
    },
    sso::{self, Sso},
};
use aigw_common::{OpsArgs, init_tracing, ops, probe, shutdown::Shutdown};
use clap::{Parser, ValueEnum};
use prometheus_client::registry::Registry;

#[global_allocator]
static GLOBAL: aigw_apiserver::Allocator = aigw_apiserver::Allocator;

/// AIGateway REST API, identity provider and authorisation endpoint.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "One-shot commands (each with its own --help): keygen, client, bootstrap-owner, openapi."
)]
struct Cli {
    #[command(flatten)]
    ops: OpsArgs,
    /// Address of the REST API listener.
    #[arg(long, env = "AIGW_LISTEN_ADDR", default_value = "127.0.0.1:8080")]
    listen_addr: SocketAddr,
    /// MySQL URL (`mysql://user:pass@host:port/db`); not used (nor needed) by `--role authz`.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
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
    /// Directory of the OIDC signing keys (`<kid>.pem`, Ed25519 PKCS#8; e.g. a mounted Secret),
    /// re-read every minute. Without it `/oauth/*` answers 503.
    #[arg(long, env = "AIGW_OIDC_KEYS_DIR")]
    oidc_keys_dir: Option<PathBuf>,
    #[command(flatten)]
    mail: MailArgs,
    /// Lifetime of access and ID tokens, in seconds.
    #[arg(long, env = "AIGW_ACCESS_TOKEN_TTL", default_value_t = 600)]
    access_token_ttl_secs: u64,
    /// ClickHouse HTTP URL, for usage reports and settlement (without it those answer 503).
    #[arg(long, env = "CLICKHOUSE_URL")]
    clickhouse_url: Option<String>,
    /// ClickHouse database.
    #[arg(long, env = "CLICKHOUSE_DATABASE", default_value = "aigateway")]
    clickhouse_database: String,
    /// Kafka bootstrap servers for `tenant.events` of REST writes; events are off when unset (the
    /// audit log line stays).
    #[arg(long, env = "KAFKA_BROKERS")]
    kafka_brokers: Option<String>,
    /// The namespace channel key Secrets are written to (the operator's
    /// `--credentials-namespace`).
    #[arg(
        long,
        env = "AIGW_CREDENTIALS_NAMESPACE",
        default_value = "aigw-system"
    )]
    credentials_namespace: String,
}

/// Where links point and how mail goes: the server and `bootstrap-owner` take the same.
#[derive(Debug, clap::Args)]
struct MailArgs {
    /// Scheme of the issuer and links (`https` behind Higress with TLS).
    #[arg(long, env = "AIGW_PUBLIC_SCHEME", value_enum, default_value = "https")]
    public_scheme: sso::Scheme,
    /// Where mail goes: `log` (logged), `log:<dir>` (also written as .eml files), or an SMTP URL
    /// (`smtp://relay:587?tls=required`, with `user:pass@` if the relay wants them).
    #[arg(
        long,
        env = "AIGW_MAIL_URL",
        default_value = "log",
        hide_env_values = true
    )]
    mail_url: String,
    /// Sender address of invitation mails.
    #[arg(
        long,
        env = "AIGW_MAIL_FROM",
        default_value = "AIGateway <noreply@aigateway.local>"
    )]
    mail_from: String,
}

impl MailArgs {
    fn mailer(&self) -> anyhow::Result<sso::mail::Mailer> {
        sso::mail::Mailer::from_url(&self.mail_url, &self.mail_from).map_err(anyhow::Error::msg)
    }
}

/// The one-shot commands, parsed on their own (the server's required options do not apply).
#[derive(Debug, Parser)]
#[command(version)]
struct Tool {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Print the REST API's OpenAPI document (committed as apiserver/openapi.json).
    Openapi,
    /// Write a new OIDC signing key `<dir>/<kid>.pem` (Ed25519).
    Keygen {
        /// The keys directory.
        #[arg(long, env = "AIGW_OIDC_KEYS_DIR")]
        dir: PathBuf,
        /// Key id; keys named by date sort in rotation order.
        #[arg(long)]
        kid: Option<String>,
    },
    /// Register an OIDC client of a tenant; prints its id and (confidential clients) its secret.
    Client {
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
        /// The Tenant CR name.
        #[arg(long)]
        tenant: String,
        /// Name shown on the login page ("Sign in to …").
        #[arg(long)]
        name: String,
        /// Exact redirect URI (repeatable).
        #[arg(long = "redirect-uri", required = true)]
        redirect_uris: Vec<String>,
        /// Exact post-logout redirect URI (repeatable).
        #[arg(long = "post-logout-redirect-uri")]
        post_logout_redirect_uris: Vec<String>,
        /// A confidential client (gets a secret); default: public, PKCE required.
        #[arg(long)]
        confidential: bool,
    },
    /// Invite the first owner of a tenant (refused once it has one): prints the invitation link
    /// and mails it. There is no default password anywhere.
    BootstrapOwner {
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
        /// The Tenant CR name (e.g. the platform tenant).
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        username: String,
        #[arg(long)]
        email: String,
        /// The domain in the link (default: the tenant's first domain).
        #[arg(long)]
        domain: Option<String>,
        #[command(flatten)]
        mail: MailArgs,
    },
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
    if matches!(
        std::env::args().nth(1).as_deref(),
        Some("keygen" | "client" | "bootstrap-owner" | "openapi")
    ) {
        let _telemetry = init_tracing(aigw_common::LogFormat::Text, "warn")?;
        return run_command(Tool::parse().command).await;
    }
    let cli = Cli::parse();
    let _telemetry = init_tracing(cli.ops.log_format, &cli.ops.log)?;

    let shutdown = Shutdown::new();
    shutdown.on_signal();
    let readiness = ops::Readiness::default();
    let mut registry = Registry::with_prefix("aigw_apiserver");

    let client = kube::Client::try_default().await?;
    probe::kube(&readiness, shutdown.clone(), client.clone());
    // Authz decides from the index and Redis only: it gets no database credentials, and a MySQL
    // outage does not take it out of service.
    let pool = if cli.role == Role::Authz {
        None
    } else {
        let url = cli.database_url.as_deref().ok_or_else(|| {
            anyhow::anyhow!("--database-url (DATABASE_URL) is required unless --role authz")
        })?;
        let pool = sqlx::mysql::MySqlPoolOptions::new()
            .max_connections(8)
            .connect_lazy(url)?;
        probe::mysql(&readiness, shutdown.clone(), pool.clone());
        Some(pool)
    };
    let redis = redis::Client::open(cli.redis_url.as_str())?;
    probe::redis(&readiness, shutdown.clone(), redis.clone());

    // Tokens and Tenants: authz decides on them; sign-in finds the tenant of a domain in them.
    let index = Index::default();
    let selector = Some(aigw_crds::instance_selector(cli.instance.as_deref()));
    tokio::spawn(index.clone().run(client.clone(), selector));
    mark_ready_when_synced(&readiness, index.clone(), shutdown.clone());
    let manager = redis::aio::ConnectionManager::new_lazy_with_config(
        redis.clone(),
        redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(1))),
    )?;

    let mut tasks = Vec::new();
    if let Some(pool) = pool {
        let sso = if let Some(dir) = &cli.oidc_keys_dir {
            let keys = sso::keys::Keys::load(dir).map_err(anyhow::Error::msg)?;
            keys.spawn_reload(Duration::from_mins(1), shutdown.clone());
            let settings = sso::Settings {
                scheme: cli.mail.public_scheme,
                access_ttl: Duration::from_secs(cli.access_token_ttl_secs),
                ..sso::Settings::default()
            };
            let mailer = cli.mail.mailer()?;
            let sso = Sso::new(
                settings,
                index.clone(),
                pool.clone(),
                manager.clone(),
                keys,
                mailer,
            )
            .map_err(anyhow::Error::msg)?;
            let clickhouse = cli.clickhouse_url.as_ref().map(|url| {
                clickhouse::Client::default()
                    .with_url(url)
                    .with_database(&cli.clickhouse_database)
                    // ClickHouse 18.16 (the test server) lacks what validation needs.
                    .with_validation(false)
            });
            let events = match &cli.kafka_brokers {
                Some(brokers) => Some(
                    rdkafka::ClientConfig::new()
                        .set("bootstrap.servers", brokers)
                        .set("enable.idempotence", "true")
                        .create::<rdkafka::producer::FutureProducer>()?,
                ),
                None => None,
            };
            Some(Backend::new(
                sso,
                index.clone(),
                client.clone(),
                clickhouse,
                events,
                BackendSettings {
                    credentials_namespace: cli.credentials_namespace.clone(),
                    instance: cli.instance.clone(),
                },
            ))
        } else {
            tracing::warn!("no --oidc-keys-dir: sign-in (/oauth/*) answers 503");
            None
        };
        let (addr, task) = ops::serve(cli.listen_addr, app::router(sso), shutdown.clone()).await?;
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

/// The one-shot subcommands.
async fn run_command(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Openapi => println!("{}", aigw_apiserver::api::doc::document()),
        Command::Keygen { dir, kid } => {
            let kid = kid.unwrap_or_else(|| {
                k8s_openapi::jiff::Timestamp::now()
                    .strftime("%Y%m%dT%H%M%SZ")
                    .to_string()
            });
            let path = sso::keys::generate(&dir, &kid).map_err(anyhow::Error::msg)?;
            println!("{}", path.display());
        }
        Command::Client {
            database_url,
            tenant,
            name,
            redirect_uris,
            post_logout_redirect_uris,
            confidential,
        } => {
            let db = sqlx::mysql::MySqlPoolOptions::new()
                .max_connections(1)
                .connect(&database_url)
                .await?;
            let tenant_id = sso::store::tenant_id(&db, &tenant).await?.ok_or_else(|| {
                anyhow::anyhow!("no tenant {tenant:?} in MySQL (is its Tenant CR Ready?)")
            })?;
            let (id, secret) = sso::store::register_client(
                &db,
                tenant_id,
                &name,
                &redirect_uris,
                &post_logout_redirect_uris,
                confidential,
            )
            .await
            .map_err(anyhow::Error::msg)?;
            println!("client_id={id}");
            if let Some(secret) = secret {
                println!("client_secret={secret}");
            }
        }
        Command::BootstrapOwner {
            database_url,
            tenant,
            username,
            email,
            domain,
            mail,
        } => {
            let db = sqlx::mysql::MySqlPoolOptions::new()
                .max_connections(1)
                .connect(&database_url)
                .await?;
            let link = sso::bootstrap_owner(
                &db,
                &tenant,
                &username,
                &email,
                domain.as_deref(),
                mail.public_scheme,
                &mail.mailer()?,
            )
            .await
            .map_err(anyhow::Error::msg)?;
            println!("{link}");
        }
    }
    Ok(())
}
