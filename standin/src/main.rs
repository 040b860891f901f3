//! `aigw-standin`: the Higress stand-in as a local server, for `make dev` — dev tooling, never
//! the production data plane. It serves the OpenAI-compatible API on a loopback port the way the
//! gateway would: it reads the Higress objects the operator wrote from the kube-apiserver (and
//! reloads them when they change), runs Higress's own plugins and our reporter on them, calls the
//! local authz and ingest, and answers from the provider stand-in (recorded provider responses;
//! real providers are never called).
//!
//! It also serves HTTPS (`AIGW_STANDIN_TLS_ADDR`, default `127.0.0.1:8443`) with the certificate
//! of each tenant domain chosen by SNI from Higress's `higress-https` `ConfigMap` and the Secrets it
//! names, as the operator wrote them (`aigw_standin::tls`).
//!
//! Environment: `KUBECONFIG`; `AIGW_STANDIN_ADDR` (default `127.0.0.1:8000`);
//! `AIGW_HIGRESS_NAMESPACE` (default `higress-system`); `AIGW_STANDIN_SERVICES`, the Kubernetes
//! Service clusters and where they listen here, `cluster=addr` separated by commas (default: the
//! operator's default apiserver REST, authz and ingest clusters → `127.0.0.1:8080`,
//! `127.0.0.1:8081` and `127.0.0.1:8090`, where `make dev` runs them); `AIGW_REPORTER_WASM`, our plugin's module (default: the workspace's
//! `make wasm` output); `AIGW_HIGRESS_PLUGINS`, `AIGW_LLM_RESPONSES` (see the library).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use aigw_standin::{
    gateway::{Gateway, Request},
    host::Error,
    objects::{Objects, read},
    plugins,
    provider::Provider,
};
use axum::{
    Router,
    body::{Body, Bytes},
    extract::State,
    http::{HeaderMap, Method, StatusCode, Uri},
    response::Response,
};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::{Api, Client};
use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

const DEFAULT_SERVICES: &str = "outbound|8080||aigw-apiserver.aigw-system.svc.cluster.local=127.0.0.1:8080,\
     outbound|8081||aigw-apiserver.aigw-system.svc.cluster.local=127.0.0.1:8081,\
     outbound|8090||aigw-ingest.aigw-system.svc.cluster.local=127.0.0.1:8090";

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

fn reporter() -> Result<&'static [u8], Error> {
    let path = match std::env::var("AIGW_REPORTER_WASM") {
        Ok(p) => std::path::PathBuf::from(p),
        Err(_) => plugins::workspace_root()?.join("target/wasm32-wasip1/wasm/aigw_plugin.wasm"),
    };
    std::fs::read(&path)
        .map(|b| &*Box::leak(b.into_boxed_slice()))
        .map_err(|e| Error(format!("{}: {e} (run `make wasm`)", path.display())))
}

fn build(
    objects: &Objects,
    provider: SocketAddr,
    services: &[(String, SocketAddr)],
) -> Result<Gateway, Error> {
    let reporter = reporter()?;
    let modules = move |name: &str| match name {
        "aigw-plugin" => Ok(reporter),
        other => plugins::higress(other),
    };
    let mut gw = Gateway::new(
        &objects.plugins,
        &objects.ingresses,
        &objects.bridge,
        &modules,
        provider,
    )?
    .with_envoy_filters(&objects.envoy_filters)?;
    gw.services.extend(services.iter().cloned());
    Ok(gw)
}

type Shared = Arc<Mutex<Option<Gateway>>>;

/// The certificates currently configured, swapped whole when the `ConfigMap` or Secrets change.
#[derive(Debug, Default)]
struct Certificates(std::sync::RwLock<Option<Arc<aigw_standin::tls::SniResolver>>>);

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name()?;
        self.0.read().ok()?.as_ref()?.lookup(name)
    }
}

/// Reads `higress-https` and the Secrets it names; `None` when there is no such `ConfigMap`.
async fn certificates(
    client: &Client,
    ns: &str,
) -> Result<Option<(String, aigw_standin::tls::SniResolver)>, Box<dyn std::error::Error>> {
    let Some(cm) = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get_opt("higress-https")
        .await?
    else {
        return Ok(None);
    };
    let doc = cm
        .data
        .and_then(|d| d.get("cert").cloned())
        .unwrap_or_default();
    let mut secrets = std::collections::HashMap::new();
    let mut versions = doc.clone();
    for c in aigw_standin::tls::credentials(&doc)? {
        let secret_ns = if c.namespace.is_empty() {
            ns
        } else {
            &c.namespace
        };
        if let Some(s) = Api::<Secret>::namespaced(client.clone(), secret_ns)
            .get_opt(&c.name)
            .await?
        {
            versions.push_str(s.metadata.resource_version.as_deref().unwrap_or_default());
            let data = s.data.unwrap_or_default();
            let get = |k: &str| data.get(k).map(|v| v.0.clone()).unwrap_or_default();
            secrets.insert(
                (c.namespace.clone(), c.name.clone()),
                (get("tls.crt"), get("tls.key")),
            );
        }
    }
    let resolver = aigw_standin::tls::SniResolver::new(&doc, &|n, name| {
        secrets.get(&(n.to_owned(), name.to_owned())).cloned()
    })?;
    Ok(Some((versions, resolver)))
}

async fn serve(
    State(gw): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let authority = headers
        .get("host")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let req = Request {
        method: method.to_string(),
        authority,
        path: uri
            .path_and_query()
            .map_or_else(|| uri.path().to_owned(), ToString::to_string),
        headers: headers
            .iter()
            .filter(|(k, _)| *k != "host")
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: body.to_vec(),
    };
    let answer = tokio::task::spawn_blocking(move || {
        let mut guard = gw
            .lock()
            .map_err(|_| Error("gateway lock poisoned".into()))?;
        let gw = guard
            .as_mut()
            .ok_or_else(|| Error("no gateway configuration yet".into()))?;
        gw.handle(&req)
    })
    .await;
    let result = match answer {
        Ok(r) => r,
        Err(e) => Err(Error(e.to_string())),
    };
    match result {
        Ok(r) => {
            let mut b = Response::builder()
                .status(StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_GATEWAY));
            for (k, v) in &r.headers {
                if k != "content-length" && k != "transfer-encoding" {
                    b = b.header(k, v);
                }
            }
            b.header("x-standin-details", r.details)
                .body(Body::from(r.body))
                .unwrap_or_else(|_| Response::new(Body::empty()))
        }
        Err(e) => {
            eprintln!("standin: {e}");
            Response::builder()
                .status(StatusCode::SERVICE_UNAVAILABLE)
                .body(Body::from(format!("stand-in error: {e}\n")))
                .unwrap_or_else(|_| Response::new(Body::empty()))
        }
    }
}

/// Reloads the certificates every 2 s when the `ConfigMap` or its Secrets changed.
fn spawn_certificate_reload(client: Client, ns: String, certs: Arc<Certificates>) {
    tokio::spawn(async move {
        let mut seen = String::new();
        loop {
            match certificates(&client, &ns).await {
                Ok(Some((versions, resolver))) if versions != seen => {
                    if let Ok(mut slot) = certs.0.write() {
                        *slot = Some(Arc::new(resolver));
                    }
                    eprintln!("standin: certificates loaded from {ns}/higress-https");
                    seen = versions;
                }
                Ok(_) => {}
                Err(e) => eprintln!("standin: certificates not loaded: {e}"),
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    });
}

/// Serves `app` over TLS on `listener` (HTTP/1.1).
fn spawn_https(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    app: Router,
) {
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper_util::service::TowerToHyperService::new(app);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr: SocketAddr = env("AIGW_STANDIN_ADDR", "127.0.0.1:8000").parse()?;
    let ns = env("AIGW_HIGRESS_NAMESPACE", "higress-system");
    let mut services = Vec::new();
    for item in env("AIGW_STANDIN_SERVICES", DEFAULT_SERVICES).split(',') {
        let (cluster, to) = item.trim().rsplit_once('=').ok_or_else(|| {
            Error(format!(
                "AIGW_STANDIN_SERVICES item {item:?} is not cluster=addr"
            ))
        })?;
        services.push((cluster.to_owned(), to.parse::<SocketAddr>()?));
    }
    let tls_addr: SocketAddr = env("AIGW_STANDIN_TLS_ADDR", "127.0.0.1:8443").parse()?;
    let client = Client::try_default().await?;
    let certs = Arc::new(Certificates::default());
    spawn_certificate_reload(client.clone(), ns.clone(), certs.clone());
    let provider = Provider::start().await?.addr;
    let gw: Shared = Arc::new(Mutex::new(None));
    // Reload the gateway whenever the operator's objects change; tick the plugins' timers.
    let (reload, ticker) = (gw.clone(), gw.clone());
    tokio::spawn(async move {
        let mut seen: Vec<String> = Vec::new();
        loop {
            match read(&client, &ns).await {
                Ok(objects) if objects.versions != seen => {
                    let (p, s) = (provider, services.clone());
                    let versions = objects.versions.clone();
                    let built = tokio::task::spawn_blocking(move || build(&objects, p, &s)).await;
                    match built {
                        Ok(Ok(g)) => {
                            let names: Vec<String> = g
                                .filters
                                .iter()
                                .map(|f| {
                                    format!(
                                        "{}{}",
                                        f.name,
                                        if f.host.configured {
                                            ""
                                        } else {
                                            " (refused its configuration)"
                                        }
                                    )
                                })
                                .collect();
                            eprintln!(
                                "standin: configured from {ns}: {} route(s), plugins {}",
                                g.routes.len(),
                                names.join(", ")
                            );
                            if let Ok(mut slot) = reload.lock() {
                                *slot = Some(g);
                            }
                            seen = versions;
                        }
                        Ok(Err(e)) => eprintln!("standin: configuration not loaded: {e}"),
                        Err(e) => eprintln!("standin: configuration not loaded: {e}"),
                    }
                }
                Ok(_) => {}
                Err(e) => eprintln!("standin: reading {ns}: {e}"),
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    });
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let t = ticker.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if let Ok(mut g) = t.lock()
                    && let Some(g) = g.as_mut()
                    && let Err(e) = g.tick(200)
                {
                    eprintln!("standin: tick: {e}");
                }
            })
            .await;
        }
    });
    let app = Router::new().fallback(serve).with_state(gw);
    let acceptor = tokio_rustls::TlsAcceptor::from(aigw_standin::tls::server_config_with(certs)?);
    let tls_listener = tokio::net::TcpListener::bind(tls_addr).await?;
    spawn_https(tls_listener, acceptor, app.clone());
    eprintln!(
        "standin: serving HTTPS on https://{tls_addr} (certificates by SNI from higress-https)"
    );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    eprintln!(
        "standin: serving the gateway on http://{addr} (upstreams: the provider stand-in at {provider})"
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
