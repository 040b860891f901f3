//! Every store the REST API reaches, behind accessors that take a [`TenantScope`] (or a
//! [`PlatformScope`]). The clients are private to this module: a handler has no way to run a query
//! or touch a CR except through a scope that [`super::scope::authorize`] made.

use std::sync::Arc;

use aigw_crds::{Channel, Pricing, Tenant, Token};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api,
    runtime::{WatchStreamExt, reflector, watcher},
};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rust_decimal::Decimal;
use sqlx::Row;

use super::{
    ApiError,
    scope::{PlatformScope, TenantScope},
};
use crate::{
    authz::index::{Index, TenantRecord},
    sso::{Sso, roles::Role},
};

/// What the REST API needs; cheap to clone.
#[derive(Debug, Clone)]
pub struct Backend {
    inner: Arc<Inner>,
}

struct Inner {
    sso: Sso,
    index: Index,
    kube: kube::Client,
    clickhouse: Option<clickhouse::Client>,
    events: Option<FutureProducer>,
    credentials_namespace: String,
    instance: Option<String>,
    tokens: reflector::Store<Token>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("credentials_namespace", &self.credentials_namespace)
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

/// Settings of the REST API.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The namespace channel key Secrets are written to (the operator's credentials namespace).
    pub credentials_namespace: String,
    /// `aigateway.io/instance` of the objects this apiserver serves and creates (as `--instance`).
    pub instance: Option<String>,
}

impl Backend {
    /// Starts the Token cache (a watch, as the authz index's) and returns the backend.
    pub fn new(
        sso: Sso,
        index: Index,
        kube: kube::Client,
        clickhouse: Option<clickhouse::Client>,
        events: Option<FutureProducer>,
        settings: Settings,
    ) -> Self {
        let (tokens, writer) = reflector::store();
        let cfg = watcher::Config::default()
            .labels(&aigw_crds::instance_selector(settings.instance.as_deref()));
        let stream = watcher(Api::<Token>::all(kube.clone()), cfg)
            .default_backoff()
            .reflect(writer)
            .applied_objects();
        tokio::spawn(async move {
            futures::pin_mut!(stream);
            while let Some(item) = stream.next().await {
                if let Err(e) = item {
                    tracing::warn!(error = %e, "token cache watch");
                }
            }
        });
        Self {
            inner: Arc::new(Inner {
                sso,
                index,
                kube,
                clickhouse,
                events,
                credentials_namespace: settings.credentials_namespace,
                instance: settings.instance,
                tokens,
            }),
        }
    }

    pub fn sso(&self) -> &Sso {
        &self.inner.sso
    }

    /// The served tenant `name` (for [`PlatformScope::tenant`]).
    pub(super) fn tenant_record(&self, name: &str) -> Option<Arc<TenantRecord>> {
        self.inner.index.tenant(name)
    }

    /// Every served tenant (for [`super::scope::Authorized::bound_resellers`] and the platform's
    /// reseller list).
    pub(super) fn served_tenants(&self) -> Vec<(String, Arc<TenantRecord>)> {
        self.inner.index.tenants()
    }

    /// The `aigateway.io/instance` label objects created through the API carry.
    pub fn instance(&self) -> Option<&str> {
        self.inner.instance.as_deref()
    }

    /// The scope's Token CRs.
    pub fn tokens(&self, scope: &TenantScope) -> Api<Token> {
        Api::namespaced(self.inner.kube.clone(), &scope.namespace())
    }

    /// The scope's Tokens as the cache has them (lists; single reads go to the Kubernetes API).
    pub async fn cached_tokens(&self, scope: &TenantScope) -> Result<Vec<Arc<Token>>, ApiError> {
        let store = &self.inner.tokens;
        if tokio::time::timeout(std::time::Duration::from_secs(10), store.wait_until_ready())
            .await
            .is_err()
        {
            return Err(ApiError::unavailable("the token cache", "not synced"));
        }
        let ns = scope.namespace();
        Ok(store
            .state()
            .into_iter()
            .filter(|t| t.metadata.namespace.as_deref() == Some(ns.as_str()))
            .collect())
    }

    /// The scope's Pricing CRs.
    pub fn pricings(&self, scope: &TenantScope) -> Api<Pricing> {
        Api::namespaced(self.inner.kube.clone(), &scope.namespace())
    }

    /// The scope's own Tenant CR.
    pub async fn tenant(&self, scope: &TenantScope) -> Result<Tenant, ApiError> {
        Api::<Tenant>::all(self.inner.kube.clone())
            .get(scope.name())
            .await
            .map_err(|e| super::error::kube_error("tenant", e))
    }

    /// Replaces the scope's own Tenant CR (the `resourceVersion` in `tenant` makes it
    /// conditional).
    pub async fn replace_tenant(
        &self,
        scope: &TenantScope,
        tenant: &Tenant,
    ) -> Result<Tenant, ApiError> {
        Api::<Tenant>::all(self.inner.kube.clone())
            .replace(scope.name(), &kube::api::PostParams::default(), tenant)
            .await
            .map_err(|e| super::error::kube_error("tenant", e))
    }

    /// The platform's Channels.
    pub fn channels(&self, _platform: &PlatformScope) -> Api<Channel> {
        Api::all(self.inner.kube.clone())
    }

    /// Secrets of the credentials namespace (channel keys), and that namespace.
    pub fn credentials(&self, _platform: &PlatformScope) -> (Api<Secret>, &str) {
        (
            Api::namespaced(self.inner.kube.clone(), &self.inner.credentials_namespace),
            &self.inner.credentials_namespace,
        )
    }

    fn clickhouse(&self) -> Result<&clickhouse::Client, ApiError> {
        self.inner
            .clickhouse
            .as_ref()
            .ok_or_else(|| ApiError::unavailable("usage reporting", "no --clickhouse-url"))
    }

    /// Usage totals of `scope` (or of every tenant, for a platform caller passing `all`),
    /// narrowed to `users` when given (the sales and user scopes).
    pub async fn usage(
        &self,
        scope: UsageScope<'_>,
        users: Option<Vec<u64>>,
        from: chrono::NaiveDate,
        to: chrono::NaiveDate,
        by: aigw_billing::reports::GroupBy,
    ) -> Result<Vec<aigw_billing::reports::Line>, ApiError> {
        let tenant = match scope {
            UsageScope::Tenant(s) => Some(u64::try_from(s.id()).unwrap_or(u64::MAX)),
            UsageScope::AllTenants(_) => None,
        };
        let filter = aigw_billing::reports::Filter {
            tenant,
            users,
            from,
            to,
        };
        aigw_billing::reports::totals(self.clickhouse()?, &filter, by)
            .await
            .map_err(|e| ApiError::unavailable("usage reporting", e))
    }

    /// Per-channel requests and failures since `since` (Unix seconds).
    pub async fn channel_health(
        &self,
        _platform: &PlatformScope,
        since: u32,
    ) -> Result<Vec<aigw_billing::reports::ChannelHealth>, ApiError> {
        aigw_billing::reports::channel_health(self.clickhouse()?, since)
            .await
            .map_err(|e| ApiError::unavailable("usage reporting", e))
    }

    /// The settlement records and balance of `scope`.
    pub async fn settlements(
        &self,
        scope: &TenantScope,
    ) -> Result<(Vec<aigw_billing::settlement::Record>, Decimal), ApiError> {
        let id = tenant_u64(scope);
        let db = self.inner.sso.db();
        let records = aigw_billing::settlement::records(db, id)
            .await
            .map_err(settlement_error)?;
        let balance = aigw_billing::settlement::balance(db, id)
            .await
            .map_err(settlement_error)?;
        Ok((records, balance))
    }

    pub async fn statement(
        &self,
        scope: &TenantScope,
        from: chrono::NaiveDate,
        to: chrono::NaiveDate,
    ) -> Result<aigw_billing::settlement::Statement, ApiError> {
        aigw_billing::settlement::statement(self.clickhouse()?, tenant_u64(scope), from, to)
            .await
            .map_err(settlement_error)
    }

    pub async fn settle(
        &self,
        scope: &TenantScope,
        from: chrono::NaiveDate,
        to: chrono::NaiveDate,
        by: &str,
    ) -> Result<aigw_billing::settlement::Record, ApiError> {
        aigw_billing::settlement::settle(
            self.inner.sso.db(),
            self.clickhouse()?,
            tenant_u64(scope),
            from,
            to,
            by,
        )
        .await
        .map_err(settlement_error)
    }

    pub async fn withdraw(
        &self,
        scope: &TenantScope,
        amount: Decimal,
        by: &str,
        note: &str,
    ) -> Result<aigw_billing::settlement::Record, ApiError> {
        aigw_billing::settlement::withdraw(self.inner.sso.db(), tenant_u64(scope), amount, by, note)
            .await
            .map_err(settlement_error)
    }

    /// The scope's identity tables.
    pub fn db(&self, scope: &TenantScope) -> Db<'_> {
        Db {
            backend: self,
            tenant_id: scope.id(),
            kind: scope.kind(),
        }
    }

    /// Records a write: a `tenant.events` record (when Kafka is configured) and an audit log
    /// line with actor, tenant, action and object. A Kafka failure is logged, not returned: the
    /// write itself has happened.
    pub async fn audit(&self, scope: &TenantScope, actor: i64, action: &str, object: &str) {
        tracing::info!(
            actor,
            tenant = scope.name(),
            tenant_id = scope.id(),
            action,
            object,
            "audit"
        );
        let Some(producer) = &self.inner.events else {
            return;
        };
        let event = aigw_common::events::TenantEvent {
            event: action.to_owned(),
            tenant: scope.name().to_owned(),
            tenant_id: scope.id(),
            generation: None,
            actor: Some(actor),
            object: Some(object.to_owned()),
        };
        let payload = event.to_json();
        let sent = producer
            .send(
                FutureRecord::to(aigw_common::events::TENANT_EVENTS)
                    .key(scope.name())
                    .payload(&payload),
                std::time::Duration::from_secs(5),
            )
            .await;
        if let Err((e, _)) = sent {
            tracing::error!(error = %e, action, object, "tenant.events record not sent");
        }
    }

    /// Idempotency: the stored answer of an earlier request with this key (same caller, same
    /// route), or `None` after reserving the key for this one. `fingerprint` is a digest of the
    /// request body: the same key with another body is a 422.
    pub async fn idempotent(
        &self,
        scope: &TenantScope,
        caller: i64,
        route: &str,
        key: &str,
        fingerprint: &str,
    ) -> Result<Option<(u16, serde_json::Value)>, ApiError> {
        use redis::AsyncCommands;
        if key.is_empty() || key.len() > 255 {
            return Err(ApiError::BadRequest(
                "Idempotency-Key must have 1 to 255 characters".into(),
            ));
        }
        let rkey = self.idempotency_key(scope, caller, route, key);
        let mut redis = self.inner.sso.redis();
        let pending = serde_json::json!({"fingerprint": fingerprint}).to_string();
        let fresh: bool = redis::cmd("SET")
            .arg(&rkey)
            .arg(&pending)
            .arg("NX")
            .arg("EX")
            .arg(IDEMPOTENCY_TTL_SECS)
            .query_async::<Option<String>>(&mut redis)
            .await
            .map_err(|e| ApiError::unavailable("the idempotency store", e))?
            .is_some();
        if fresh {
            return Ok(None);
        }
        let stored: Option<String> = redis
            .get(&rkey)
            .await
            .map_err(|e| ApiError::unavailable("the idempotency store", e))?;
        let stored: serde_json::Value = stored
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default();
        if stored["fingerprint"] != fingerprint {
            return Err(ApiError::Unprocessable(
                "this Idempotency-Key was used with another request body".into(),
            ));
        }
        match (stored["status"].as_u64(), stored.get("body")) {
            (Some(status), Some(body)) => {
                Ok(Some((u16::try_from(status).unwrap_or(200), body.clone())))
            }
            _ => Err(ApiError::Conflict(
                "a request with this Idempotency-Key is still in progress".into(),
            )),
        }
    }

    /// Stores the answer of a request reserved by [`Backend::idempotent`]; a failed request
    /// releases its key (`status` ≥ 500 or no answer: `None`).
    pub async fn remember(
        &self,
        scope: &TenantScope,
        caller: i64,
        route: &str,
        key: &str,
        fingerprint: &str,
        answer: Option<(u16, &serde_json::Value)>,
    ) {
        use redis::AsyncCommands;
        let rkey = self.idempotency_key(scope, caller, route, key);
        let mut redis = self.inner.sso.redis();
        let done: Result<(), _> = match answer {
            Some((status, body)) if status < 500 => {
                let v =
                    serde_json::json!({"fingerprint": fingerprint, "status": status, "body": body});
                redis
                    .set_ex(&rkey, v.to_string(), IDEMPOTENCY_TTL_SECS)
                    .await
            }
            _ => redis.del(&rkey).await,
        };
        if let Err(e) = done {
            tracing::warn!(error = %e, "idempotency record not stored");
        }
    }

    fn idempotency_key(&self, scope: &TenantScope, caller: i64, route: &str, key: &str) -> String {
        self.inner.sso.key(&format!(
            "idem:{}:{caller}:{route}:{}",
            scope.id(),
            crate::sso::digest(key)
        ))
    }
}

/// How long an idempotency key is remembered (24 h).
const IDEMPOTENCY_TTL_SECS: u64 = 86_400;

fn tenant_u64(scope: &TenantScope) -> u64 {
    u64::try_from(scope.id()).unwrap_or(u64::MAX)
}

fn settlement_error(e: aigw_billing::settlement::SettlementError) -> ApiError {
    use aigw_billing::settlement::SettlementError as E;
    match e {
        E::Period { .. } | E::Amount(_) | E::Insufficient { .. } | E::Overlap { .. } => {
            ApiError::Unprocessable(e.to_string())
        }
        E::Report(r) => ApiError::unavailable("usage reporting", r),
        E::Sql(s) => ApiError::from(s),
    }
}

/// Whose usage a report covers.
#[derive(Debug, Clone, Copy)]
pub enum UsageScope<'a> {
    Tenant(&'a TenantScope),
    /// Every tenant: platform staff only.
    AllTenants(&'a PlatformScope),
}

/// A member of a tenant.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Member {
    pub id: i64,
    pub username: String,
    pub email: Option<String>,
    pub active: bool,
    /// Sorted role names.
    pub roles: Vec<String>,
    /// The sales person a customer is bound to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sales_id: Option<i64>,
}

/// The identity tables of one tenant. Every query binds the scope's tenant id.
#[derive(Debug)]
pub struct Db<'a> {
    backend: &'a Backend,
    tenant_id: i64,
    kind: aigw_crds::TenantType,
}

/// Which members a listing returns.
#[derive(Debug, Clone, Copy)]
pub enum Who {
    /// Every member.
    Everyone,
    /// Customers (holders of the `user` role), optionally only those bound to a sales person.
    Customers { sales: Option<i64> },
}

impl Db<'_> {
    fn pool(&self) -> &sqlx::MySqlPool {
        self.backend.inner.sso.db()
    }

    /// Members with id greater than `after`, by id, at most `limit`.
    pub async fn members(&self, who: Who, after: i64, limit: u32) -> Result<Vec<Member>, ApiError> {
        let mut sql = String::from(
            "SELECT u.id, u.username, u.email, u.status, \
             (SELECT GROUP_CONCAT(r.role ORDER BY r.role) FROM user_roles r WHERE r.tenant_id = u.tenant_id AND r.user_id = u.id) AS roles, \
             b.sales_id FROM users u \
             LEFT JOIN customer_bindings b ON b.tenant_id = u.tenant_id AND b.customer_id = u.id \
             WHERE u.tenant_id = ? AND u.id > ?",
        );
        match who {
            Who::Everyone => {}
            Who::Customers { sales } => {
                // A customer holds the `user` role and no other: staff are never managed as
                // customers (a sales person cannot disable an owner who also calls the API).
                sql.push_str(
                    " AND EXISTS (SELECT 1 FROM user_roles c WHERE c.tenant_id = u.tenant_id AND c.user_id = u.id AND c.role = 'user') \
                     AND NOT EXISTS (SELECT 1 FROM user_roles c WHERE c.tenant_id = u.tenant_id AND c.user_id = u.id AND c.role <> 'user')",
                );
                if sales.is_some() {
                    sql.push_str(" AND b.sales_id = ?");
                }
            }
        }
        sql.push_str(" ORDER BY u.id LIMIT ?");
        let mut q = sqlx::query(&sql).bind(self.tenant_id).bind(after);
        if let Who::Customers { sales: Some(s) } = who {
            q = q.bind(s);
        }
        let rows = q.bind(limit).fetch_all(self.pool()).await?;
        rows.iter()
            .map(|r| {
                let roles: Option<String> = r.try_get("roles")?;
                Ok(Member {
                    id: r.try_get("id")?,
                    username: r.try_get("username")?,
                    email: r.try_get("email")?,
                    active: r.try_get::<i8, _>("status")? == 1,
                    roles: roles
                        .map(|s| s.split(',').map(str::to_owned).collect())
                        .unwrap_or_default(),
                    sales_id: r.try_get("sales_id")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(ApiError::from)
    }

    /// The member `id`, if they are in this tenant.
    pub async fn member(&self, id: i64) -> Result<Option<Member>, ApiError> {
        if id <= 0 {
            return Ok(None);
        }
        Ok(self
            .members(Who::Everyone, id - 1, 1)
            .await?
            .into_iter()
            .find(|m| m.id == id))
    }

    /// The customer `id` (see [`Who::Customers`]), if they are one of this tenant.
    pub async fn customer(&self, id: i64) -> Result<Option<Member>, ApiError> {
        if id <= 0 {
            return Ok(None);
        }
        Ok(self
            .members(Who::Customers { sales: None }, id - 1, 1)
            .await?
            .into_iter()
            .find(|m| m.id == id))
    }

    /// Ids and usernames of the customers bound to the sales person `sales` (customers only: a
    /// bound customer later made staff is out of the sales person's reach).
    pub async fn bound_customers(&self, sales: i64) -> Result<Vec<(i64, String)>, ApiError> {
        Ok(sqlx::query_as(
            "SELECT u.id, u.username FROM customer_bindings b JOIN users u \
             ON u.tenant_id = b.tenant_id AND u.id = b.customer_id \
             WHERE b.tenant_id = ? AND b.sales_id = ? \
             AND NOT EXISTS (SELECT 1 FROM user_roles c WHERE c.tenant_id = u.tenant_id AND c.user_id = u.id AND c.role <> 'user') \
             ORDER BY u.id",
        )
        .bind(self.tenant_id)
        .bind(sales)
        .fetch_all(self.pool())
        .await?)
    }

    /// Enables or disables a member (disabling ends their tokens at once); never the tenant's
    /// last active owner (409).
    pub async fn set_active(&self, id: i64, active: bool) -> Result<(), ApiError> {
        self.owner_safe(id, crate::sso::store::OwnerSafe::Active(active))
            .await
    }

    /// Replaces a member's roles (their older tokens end); the last active owner keeps `owner`
    /// (409).
    pub async fn set_roles(&self, id: i64, roles: &[Role]) -> Result<(), ApiError> {
        crate::sso::roles::check_available(self.kind, roles).map_err(ApiError::Unprocessable)?;
        self.owner_safe(id, crate::sso::store::OwnerSafe::Roles(roles))
            .await
    }

    async fn owner_safe(
        &self,
        id: i64,
        change: crate::sso::store::OwnerSafe<'_>,
    ) -> Result<(), ApiError> {
        let done =
            crate::sso::store::change_keeping_an_owner(self.pool(), self.tenant_id, id, change)
                .await?;
        if !done {
            return Err(ApiError::Conflict(
                "this is the tenant's last active owner; make someone else owner first".into(),
            ));
        }
        if matches!(change, crate::sso::store::OwnerSafe::Active(true)) {
            return Ok(());
        }
        // Roles changed or account disabled: the member's older tokens end now.
        self.backend
            .inner
            .sso
            .not_before_now(self.tenant_id, id)
            .await
            .map_err(|e| ApiError::unavailable("the token store", e))
    }

    /// Ids of the resellers bound to the platform sales person `sales` (none outside the
    /// platform tenant).
    pub async fn resellers_of(&self, sales: i64) -> Result<Vec<i64>, ApiError> {
        if self.kind != aigw_crds::TenantType::Platform {
            return Ok(Vec::new());
        }
        Ok(
            sqlx::query_scalar("SELECT reseller_id FROM reseller_bindings WHERE sales_id = ?")
                .bind(sales)
                .fetch_all(self.pool())
                .await?,
        )
    }

    /// Reseller id → the platform sales person bound to it (none outside the platform tenant).
    pub async fn reseller_sales(&self) -> Result<std::collections::HashMap<i64, i64>, ApiError> {
        if self.kind != aigw_crds::TenantType::Platform {
            return Ok(std::collections::HashMap::new());
        }
        let rows: Vec<(i64, i64)> =
            sqlx::query_as("SELECT reseller_id, sales_id FROM reseller_bindings")
                .fetch_all(self.pool())
                .await?;
        Ok(rows.into_iter().collect())
    }

    /// Binds reseller `reseller` to the platform sales person `sales` (an active platform member
    /// holding the `sales` role, else 422), in one transaction with that check.
    pub async fn bind_reseller(&self, reseller: i64, sales: i64) -> Result<(), ApiError> {
        if self.kind != aigw_crds::TenantType::Platform {
            return Err(ApiError::NotFound("reseller".into()));
        }
        let mut tx = self.pool().begin().await?;
        let is_sales: Option<i64> = sqlx::query_scalar(
            "SELECT u.id FROM users u JOIN user_roles r ON r.tenant_id = u.tenant_id AND r.user_id = u.id \
             WHERE u.tenant_id = ? AND u.id = ? AND u.status = 1 AND r.role = 'sales' FOR UPDATE",
        )
        .bind(self.tenant_id)
        .bind(sales)
        .fetch_optional(&mut *tx)
        .await?;
        if is_sales.is_none() {
            return Err(ApiError::Unprocessable(format!(
                "member {sales} is not an active sales person of the platform"
            )));
        }
        sqlx::query(
            "INSERT INTO reseller_bindings (reseller_id, sales_id) VALUES (?, ?) \
             ON DUPLICATE KEY UPDATE sales_id = VALUES(sales_id)",
        )
        .bind(reseller)
        .bind(sales)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Whether the user `username` exists in the tenant; their id.
    pub async fn user_id(&self, username: &str) -> Result<Option<i64>, ApiError> {
        Ok(
            crate::sso::store::user_by_name(self.pool(), self.tenant_id, username)
                .await?
                .map(|u| u.id),
        )
    }
}
