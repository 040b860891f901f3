//! The identity provider of one test: the apiserver's REST router (sign-in included) on a local
//! port with its own signing keys, mail directory and Redis prefix, Tenant CRs with the status the
//! operator would write, and users, roles and clients in the test bed's MySQL. Everything it
//! creates is removed by `cleanup`.

#![allow(dead_code)]

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Mutex,
    time::{Duration, Instant},
};

use aigw_apiserver::{
    api::backend::{self, Backend},
    app,
    authz::index::Index,
    sso::{self, Sso, keys::Keys, mail::Mailer},
};
use aigw_common::shutdown::Shutdown;
use aigw_crds::{Tenant, labels};
use aigw_testkit::{Testbed, unique_name};
use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

pub struct Idp {
    /// The test CA's certificate (PEM), which signed the server's `*.sso.test` certificate.
    pub ca: Vec<u8>,
    pub client: kube::Client,
    pub instance: String,
    pub db: sqlx::MySqlPool,
    pub redis: redis::Client,
    pub prefix: String,
    pub addr: SocketAddr,
    pub sso: Sso,
    pub index: Index,
    pub keys_dir: PathBuf,
    pub mail_dir: PathBuf,
    pub shutdown: Shutdown,
    /// The REST API's stores (a scratch ClickHouse database with the usage table).
    pub backend: Backend,
    pub clickhouse: clickhouse::Client,
    /// The namespace channel key Secrets go to.
    pub credentials_namespace: String,
    tenants: Mutex<Vec<(String, i64)>>,
}

/// One tenant of a test: its CR name, id and the domain it signs in on.
#[derive(Debug, Clone)]
pub struct T {
    pub name: String,
    pub id: i64,
    pub domain: String,
}

impl Idp {
    pub async fn start(tweak: impl FnOnce(&mut sso::Settings)) -> Self {
        let tb = Testbed::load().unwrap();
        let client = tb.kube_client().await.unwrap();
        aigw_crds::install(&client, "aigw-test").await.unwrap();
        let instance = unique_name("sso");
        let index = Index::default();
        tokio::spawn(index.clone().run(
            client.clone(),
            Some(format!("{}={instance}", labels::INSTANCE)),
        ));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !index.synced() {
            assert!(Instant::now() < deadline, "index did not sync");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let scratch = std::env::temp_dir().join(&instance);
        let (ca, server_config) = tls();
        let keys_dir = scratch.join("keys");
        let mail_dir = scratch.join("mail");
        sso::keys::generate(&keys_dir, "k1").unwrap();
        let keys = Keys::load(&keys_dir).unwrap();
        let mailer = Mailer::from_url(
            &format!("log:{}", mail_dir.display()),
            "AIGateway <noreply@aigateway.local>",
        )
        .unwrap();
        let prefix = format!("test:{instance}:sso:");
        let mut settings = sso::Settings {
            scheme: sso::Scheme::Https,
            redis_prefix: prefix.clone(),
            ..sso::Settings::default()
        };
        tweak(&mut settings);
        let db = tb.mysql().await.unwrap();
        let redis = tb.redis().unwrap();
        let manager = redis::aio::ConnectionManager::new(redis.clone())
            .await
            .unwrap();
        let sso = Sso::new(settings, index.clone(), db.clone(), manager, keys, mailer).unwrap();
        let clickhouse = tb.scratch_clickhouse("api").await.unwrap();
        aigw_migrations::run_clickhouse(&clickhouse).await.unwrap();
        let credentials_namespace = aigw_testkit::scratch_namespace(&client, "cred")
            .await
            .unwrap();
        // REST writes go to the test bed's `tenant.events`, keyed by each test's own tenants.
        let events = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", tb.kafka_brokers().unwrap())
            .set("enable.idempotence", "true")
            .create::<rdkafka::producer::FutureProducer>()
            .unwrap();
        let backend = Backend::new(
            sso.clone(),
            index.clone(),
            client.clone(),
            Some(clickhouse.clone()),
            Some(events),
            backend::Settings {
                credentials_namespace: credentials_namespace.clone(),
                instance: Some(instance.clone()),
            },
        );
        let shutdown = Shutdown::new();
        let addr = serve_tls(
            app::router(Some(backend.clone())),
            server_config,
            shutdown.clone(),
        )
        .await;
        Self {
            ca,
            client,
            instance,
            db,
            redis,
            prefix,
            addr,
            sso,
            index,
            keys_dir,
            mail_dir,
            shutdown,
            backend,
            clickhouse,
            credentials_namespace,
            tenants: Mutex::new(Vec::new()),
        }
    }

    /// A tenant of `kind` (`reseller`/`platform`) on `<name>.sso.test`, with `branding`; the
    /// status is what the operator writes. Waits until the index serves its domain.
    pub async fn tenant(&self, prefix: &str, kind: &str, display: &str, branding: Value) -> T {
        let id = 1_000_000_000 + i64::from(rand_u32() % 1_000_000_000);
        self.tenant_as(&unique_name(prefix), id, kind, display, branding)
            .await
    }

    /// [`Idp::tenant`] with a given name and id.
    pub async fn tenant_as(
        &self,
        name: &str,
        id: i64,
        kind: &str,
        display: &str,
        branding: Value,
    ) -> T {
        let name = name.to_owned();
        let domain = format!("{name}.sso.test");
        self.tenants.lock().unwrap().push((name.clone(), id));
        let api: Api<Tenant> = Api::all(self.client.clone());
        let mut spec = json!({"type": kind, "displayName": display, "domains": [domain]});
        if !branding.is_null() {
            spec["branding"] = branding;
        }
        let t: Tenant = serde_json::from_value(
            json!({"apiVersion": "aigateway.io/v1alpha1", "kind": "Tenant",
            "metadata": {"name": name, "labels": {labels::INSTANCE: self.instance}}, "spec": spec}),
        )
        .unwrap();
        api.create(&PostParams::default(), &t).await.unwrap();
        api.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"tenantId": id, "domains": [domain]}})),
        )
        .await
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.index.tenant_for_host(&domain).is_none() {
            assert!(Instant::now() < deadline, "index did not see tenant {name}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        T { name, id, domain }
    }

    /// A user with a password and roles, written as an accepted invitation leaves it.
    pub async fn user(&self, t: &T, username: &str, password: &str, roles: &[&str]) -> i64 {
        let phc = sso::password::hash(password).unwrap();
        let done = sqlx::query(
            "INSERT INTO users (tenant_id, username, email, password, status) VALUES (?, ?, ?, ?, 1)",
        )
        .bind(t.id)
        .bind(username)
        .bind(format!("{username}@example.com"))
        .bind(phc)
        .execute(&self.db)
        .await
        .unwrap();
        let id = i64::try_from(done.last_insert_id()).unwrap();
        for r in roles {
            sqlx::query("INSERT INTO user_roles (user_id, tenant_id, role) VALUES (?, ?, ?)")
                .bind(id)
                .bind(t.id)
                .bind(r)
                .execute(&self.db)
                .await
                .unwrap();
        }
        id
    }

    /// Registers a client of `t` redirecting to `redirect`; `(client_id, secret)`.
    pub async fn client(
        &self,
        t: &T,
        redirect: &str,
        confidential: bool,
    ) -> (String, Option<String>) {
        sso::store::register_client(
            &self.db,
            t.id,
            "Test portal",
            &[redirect.to_owned()],
            &[format!("{redirect}/signed-out")],
            confidential,
        )
        .await
        .unwrap()
    }

    /// `https://<domain>:<port>/oauth`: the issuer of `t` as a client reaches it.
    pub fn issuer(&self, t: &T) -> String {
        format!("https://{}:{}/oauth", t.domain, self.addr.port())
    }

    /// An HTTP client that resolves the tenants' domains to this server, keeps cookies like a
    /// browser, and never follows redirects (as OIDC clients must not).
    pub fn http(&self, tenants: &[&T]) -> reqwest::Client {
        let mut b = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&self.ca).unwrap())
            .redirect(reqwest::redirect::Policy::none())
            .cookie_store(true);
        for t in tenants {
            b = b.resolve(&t.domain, self.addr);
        }
        b.build().unwrap()
    }

    /// Mail files written so far, oldest first.
    pub fn mails(&self) -> Vec<String> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.mail_dir)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        files.sort();
        files
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect()
    }

    pub async fn cleanup(&self) {
        self.shutdown.trigger();
        let tenants = std::mem::take(&mut *self.tenants.lock().unwrap());
        for (name, id) in tenants {
            let _ = Api::<Tenant>::all(self.client.clone())
                .delete(&name, &DeleteParams::default())
                .await;
            let _ = Api::<Namespace>::all(self.client.clone())
                .delete(&format!("aigw-{name}"), &DeleteParams::default())
                .await;
            for table in [
                "users",
                "user_roles",
                "oauth_clients",
                "oauth_refresh_tokens",
                "invitations",
                "customer_bindings",
                "tokens",
            ] {
                sqlx::query(&format!("DELETE FROM {table} WHERE tenant_id = ?"))
                    .bind(id)
                    .execute(&self.db)
                    .await
                    .unwrap();
            }
        }
        let _ = Api::<Namespace>::all(self.client.clone())
            .delete(&self.credentials_namespace, &DeleteParams::default())
            .await;
        aigw_testkit::delete_redis_prefix(&self.redis, &self.prefix)
            .await
            .unwrap();
        let _ = std::fs::remove_dir_all(self.keys_dir.parent().unwrap());
    }
}

/// A test CA and a certificate it signed for `*.sso.test` (`aigw_testkit::tls`); the CA's PEM and
/// a rustls server configuration.
fn tls() -> (Vec<u8>, std::sync::Arc<rustls::ServerConfig>) {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let (ca, issued) = aigw_testkit::tls::certificates(&["*.sso.test"]).unwrap();
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&issued[0].cert_pem)
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_slice(&issued[0].key_pem).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    (ca, std::sync::Arc::new(config))
}

/// Serves `router` over TLS on a local port until `shutdown`, with the peer address in each
/// request's extensions as `axum::serve` puts it.
async fn serve_tls(
    router: axum::Router,
    config: std::sync::Arc<rustls::ServerConfig>,
    shutdown: Shutdown,
) -> SocketAddr {
    use tower::Service;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
                () = shutdown.wait() => return,
            };
            let acceptor = acceptor.clone();
            let router = router.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(
                    move |mut req: hyper::Request<hyper::body::Incoming>| {
                        req.extensions_mut()
                            .insert(axum::extract::ConnectInfo(peer));
                        let mut router = router.clone();
                        async move { router.call(req.map(axum::body::Body::new)).await }
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                .await;
            });
        }
    });
    addr
}

pub fn rand_u32() -> u32 {
    u32::from_le_bytes(uuid::Uuid::new_v4().as_bytes()[..4].try_into().unwrap())
}

/// Reverses minijinja's HTML escaping of attribute values.
pub fn unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&#x27;", "'")
        .replace("&#x2f;", "/")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let start = tag.find(&format!("{name}=\""))? + name.len() + 2;
    let len = tag[start..].find('"')?;
    Some(&tag[start..start + len])
}

/// The hidden fields of the login form.
pub fn hidden_fields(html: &str) -> Vec<(String, String)> {
    html.split("<input type=\"hidden\" ")
        .skip(1)
        .filter_map(|rest| {
            let tag = &rest[..rest.find('>')?];
            Some((unescape(attr(tag, "name")?), unescape(attr(tag, "value")?)))
        })
        .collect()
}

/// What a browser without JavaScript does on the login page: load it, post the form. Returns
/// the status, the `Location` (a redirect) and the body.
pub async fn sign_in(
    http: &reqwest::Client,
    authorize_url: &str,
    username: &str,
    password: &str,
) -> (u16, Option<String>, String) {
    let page = http.get(authorize_url).send().await.unwrap();
    let status = page.status().as_u16();
    if status != 200 {
        let loc = page
            .headers()
            .get("location")
            .map(|v| v.to_str().unwrap().to_owned());
        return (status, loc, page.text().await.unwrap());
    }
    let base = page.url().clone();
    let html = page.text().await.unwrap();
    let mut form = hidden_fields(&html);
    form.push(("username".into(), username.into()));
    form.push(("password".into(), password.into()));
    let post = base.join("/oauth/authorize").unwrap();
    let resp = http.post(post).form(&form).send().await.unwrap();
    let status = resp.status().as_u16();
    let loc = resp
        .headers()
        .get("location")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, loc, resp.text().await.unwrap())
}

/// The query parameter `name` of `url`.
pub fn param(url: &str, name: &str) -> Option<String> {
    let u = openidconnect::url::Url::parse(url).unwrap();
    u.query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// The (already verified) payload of a JWT, for claims the client library does not model.
pub fn payload(jwt: &str) -> Value {
    use base64::Engine;
    let part = jwt.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .unwrap(),
    )
    .unwrap()
}
