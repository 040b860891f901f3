//! What every reconcile gets: clients, configuration, metrics.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use aigw_crds::Tenant;
use kube::{Client, runtime::reflector::Store};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use rdkafka::producer::FutureProducer;
use sqlx::MySqlPool;

use crate::keys::Sealer;

/// Operator configuration (from flags; see `main.rs`).
#[derive(Debug, Clone)]
pub struct Config {
    /// Namespace the Higress controller reads (`higress-system`).
    pub higress_namespace: String,
    /// Only CRs with label `aigateway.io/instance=<value>` are reconciled when set (sharding, tests).
    pub instance: Option<String>,
    /// `host:port` of the apiserver Service that `/api` and `/oauth` route to.
    pub apiserver_destination: String,
    /// FQDN of the Service of the authz endpoint Higress ext-auth calls (`forward_auth`).
    pub authz_service: String,
    /// Port of the authz endpoint.
    pub authz_port: u16,
    /// Path of the authz endpoint.
    pub authz_path: String,
    /// Envoy cluster of the billing ingest service, for the usage reporter.
    pub ingest_cluster: String,
    /// Shared secret the usage reporter sends to ingest.
    pub ingest_secret: String,
    /// OCI URL of our usage-reporter plugin image.
    pub usage_reporter_image: String,
    /// OCI URL of the Higress ai-proxy plugin image.
    pub ai_proxy_image: String,
    /// OCI URL of the Higress ext-auth plugin image.
    pub ext_auth_image: String,
    /// OCI URL of the Higress model-router plugin image.
    pub model_router_image: String,
    /// The one namespace channel credentials may live in (`aigw-system`). A Channel naming a Secret
    /// elsewhere is refused, so a Channel can never make the operator read a Secret it was not
    /// meant to (the operator's RBAC grants Secret reads only here).
    pub credentials_namespace: String,
    /// How tenant domains get certificates (`crate::tls`).
    pub tls: crate::tls::Settings,
    /// The operator's own rights in each tenant namespace (its key Secrets), granted by a
    /// `RoleBinding` it writes there; `None` when it runs with cluster-wide rights (a developer's
    /// kubeconfig).
    pub tenant_grant: Option<TenantGrant>,
}

/// Who the operator is in the cluster, so it can bind its tenant-namespace role to itself: the
/// chart's `ClusterRole` grants Secrets in no namespace but the credentials one, and lets the
/// operator `bind` only this one role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantGrant {
    /// The `ClusterRole` bound in each tenant namespace (`aigw-operator-tenant`).
    pub cluster_role: String,
    /// The operator's `ServiceAccount`.
    pub service_account: String,
    /// Its namespace.
    pub namespace: String,
}

impl Config {
    /// The operator's default endpoints with placeholder image URLs, for a Higress namespace; tests
    /// and tools start from here and override what they need.
    pub fn with_defaults(higress_namespace: &str) -> Self {
        Self {
            higress_namespace: higress_namespace.to_owned(),
            instance: None,
            apiserver_destination: "aigw-apiserver.aigw-system.svc.cluster.local:8080".into(),
            authz_service: "aigw-apiserver.aigw-system.svc.cluster.local".into(),
            authz_port: 8081,
            authz_path: "/authz".into(),
            ingest_cluster: "outbound|8090||aigw-ingest.aigw-system.svc.cluster.local".into(),
            ingest_secret: String::new(),
            usage_reporter_image: "oci://registry.example/aigw-plugin:0.1.0".into(),
            ai_proxy_image: "oci://registry.example/ai-proxy:2.0.1".into(),
            ext_auth_image: "oci://registry.example/ext-auth:2.0.0".into(),
            model_router_image: "oci://registry.example/model-router:2.0.1".into(),
            credentials_namespace: "aigw-system".into(),
            tls: crate::tls::Settings::default(),
            tenant_grant: None,
        }
    }

    /// Whether `namespace` is one the platform itself uses (Higress's, the credentials'); a Tenant
    /// whose namespace would be one of these is refused.
    pub fn is_platform_namespace(&self, namespace: &str) -> bool {
        namespace == self.higress_namespace
            || namespace == self.credentials_namespace
            || aigw_crds::RESERVED_NAMESPACES.contains(&namespace)
    }

    /// The label selector of the CRs this instance reconciles (`aigw_crds::instance_selector`).
    pub fn selector(&self) -> String {
        aigw_crds::instance_selector(self.instance.as_deref())
    }
}

/// Labels of the reconcile metrics.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: &'static str,
}

/// Labels of the error metric.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub controller: &'static str,
    pub category: &'static str,
}

/// Prometheus metrics of the operator.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub reconciles: Family<ControllerLabels, Counter>,
    pub errors: Family<ErrorLabels, Counter>,
    pub duration: Family<ControllerLabels, Histogram>,
    pub writes: Counter,
    /// Served domains without an entry in the full `higress-https` `ConfigMap`.
    pub tls_left_out: Gauge,
}

impl Metrics {
    /// Creates the metrics and registers them.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            reconciles: Family::default(),
            errors: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new([0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0])
            }),
            writes: Counter::default(),
            tls_left_out: Gauge::default(),
        };
        registry.register(
            "reconciles",
            "Reconciles run, by controller",
            m.reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Failed reconciles, by controller and category",
            m.errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Reconcile duration",
            m.duration.clone(),
        );
        registry.register("writes", "Writes to the kube-apiserver", m.writes.clone());
        registry.register(
            "tls_domains_left_out",
            "Served domains left out of the full higress-https ConfigMap (no certificate entry)",
            m.tls_left_out.clone(),
        );
        m
    }
}

/// Shared state of all controllers.
#[derive(Clone)]
pub struct Ctx {
    pub client: Client,
    pub db: MySqlPool,
    pub config: Arc<Config>,
    pub metrics: Metrics,
    pub sealer: Sealer,
    /// Producer for `tenant.events`; none disables the events (tests of other parts).
    pub events: Option<FutureProducer>,
    writes: Arc<AtomicU64>,
    /// Until when this replica may act (leader election); always valid without an election.
    pub term: crate::leader::Term,
    /// The Tenant controller's store, once `run` has started it (token and pricing look up their
    /// tenant here instead of asking the apiserver).
    tenants: Arc<std::sync::OnceLock<Store<Tenant>>>,
    /// Wakes the Higress sync: the Tenant and Channel controllers' watches notify it once their
    /// stores hold an event, so a pass never reads a store older than what woke it.
    pub sync_wake: Arc<tokio::sync::Notify>,
    /// What the last TLS step found or wrote, so a pass whose tenants and `ConfigMap` are unchanged
    /// skips rebuilding a document of up to 1 MiB (`sync::sync_tls`).
    pub tls_last: Arc<std::sync::Mutex<Option<TlsLast>>>,
}

/// The TLS step's inputs and result, by SHA-256: the served domains, the `ConfigMap` text after
/// the step, and the domains left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsLast {
    pub served: [u8; 32],
    pub text: [u8; 32],
    pub left_out: Vec<String>,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("config", &self.config)
            .field("events", &self.events.is_some())
            .field("writes", &self.writes())
            .finish_non_exhaustive()
    }
}

impl Ctx {
    pub fn new(
        client: Client,
        db: MySqlPool,
        config: Config,
        metrics: Metrics,
        sealer: Sealer,
        events: Option<FutureProducer>,
    ) -> Self {
        Self {
            client,
            db,
            config: Arc::new(config),
            metrics,
            sealer,
            events,
            writes: Arc::default(),
            term: crate::leader::Term::default(),
            tenants: Arc::default(),
            sync_wake: Arc::default(),
            tls_last: Arc::default(),
        }
    }

    /// Records one write to the kube-apiserver.
    pub fn count_write(&self) {
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.metrics.writes.inc();
    }

    /// Registers the Tenant store (first call wins).
    pub fn set_tenants(&self, store: Store<Tenant>) {
        let _ = self.tenants.set(store);
    }

    /// The Tenant named `name`, from the store when it is ready.
    pub fn cached_tenant(&self, name: &str) -> Option<Option<Arc<Tenant>>> {
        let store = self.tenants.get()?;
        Some(store.get(&kube::runtime::reflector::ObjectRef::new(name)))
    }

    /// The Tenant store if its first list is complete; `None` before that, or when no Tenant
    /// controller runs here (tests of other parts). Never waits: a Tenant watch that cannot list
    /// must not stall the caller (the Higress sync then lists tenants itself).
    pub fn tenant_store(&self) -> Option<Store<Tenant>> {
        let store = self.tenants.get()?.clone();
        futures::FutureExt::now_or_never(store.wait_until_ready())?.ok()?;
        Some(store)
    }

    /// Writes made so far by this process (tests assert that a steady state writes nothing).
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }
}
