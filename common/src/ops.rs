//! The ops listener: liveness, readiness and Prometheus metrics.
//!
//! `/healthz` answers 200 while the process serves at all. `/readyz` answers 200 only once every
//! registered readiness check passes (each component marks its dependencies ready as it connects),
//! else 503 with the names of the checks that are not ready. `/metrics` is the OpenMetrics text of the
//! process registry.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use prometheus_client::{encoding::text::encode, registry::Registry};
use tokio::net::TcpListener;

use crate::shutdown::Shutdown;

/// Readiness of named dependencies ("kube", "kafka", …). Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    checks: Arc<Mutex<BTreeMap<&'static str, bool>>>,
}

impl Readiness {
    /// Registers a check that starts out not ready.
    pub fn register(&self, name: &'static str) {
        self.lock().entry(name).or_insert(false);
    }

    /// Sets a check's state (registering it if needed).
    pub fn set(&self, name: &'static str, ready: bool) {
        self.lock().insert(name, ready);
    }

    /// Names of the checks that are not ready; empty means ready.
    pub fn pending(&self) -> Vec<&'static str> {
        self.lock()
            .iter()
            .filter(|(_, ready)| !**ready)
            .map(|(name, _)| *name)
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, bool>> {
        // A panic while holding this lock cannot leave the map half-written, so poison is harmless.
        self.checks.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Debug, Clone)]
struct OpsState {
    readiness: Readiness,
    registry: Arc<Registry>,
}

/// The ops router; separate from [`serve`] so tests can call it directly.
pub fn router(readiness: Readiness, registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(OpsState {
            readiness,
            registry,
        })
}

async fn readyz(State(state): State<OpsState>) -> Response {
    let pending = state.readiness.pending();
    if pending.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", pending.join(", ")),
        )
            .into_response()
    }
}

async fn metrics(State(state): State<OpsState>) -> Response {
    let mut body = String::new();
    match encode(&mut body, &state.registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "encoding metrics failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// Binds `addr` and serves `router` until `shutdown` fires; returns the bound address at once
/// through the spawned task's handle so callers can log it (and tests can bind port 0).
pub async fn serve(
    addr: SocketAddr,
    router: Router,
    shutdown: Shutdown,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let handle = tokio::spawn(async move {
        // The peer address is available to handlers (`ConnectInfo`): the sign-in throttle keys on
        // it when no gateway put the client's address in a header.
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move { shutdown.wait().await })
        .await
    });
    Ok((local, handle))
}

/// Binds the ops listener and serves it until `shutdown` fires.
pub async fn serve_ops(
    addr: SocketAddr,
    readiness: Readiness,
    registry: Arc<Registry>,
    shutdown: Shutdown,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    serve(addr, router(readiness, registry), shutdown).await
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use http_body_util::BodyExt;
    use prometheus_client::metrics::counter::Counter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tower::ServiceExt;

    use super::*;

    async fn get_path(app: Router, path: &str) -> (StatusCode, String) {
        let resp = app
            .oneshot(axum::http::Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn readyz_follows_registered_checks() {
        let readiness = Readiness::default();
        readiness.register("kube");
        readiness.register("kafka");
        let app = router(readiness.clone(), Arc::new(Registry::default()));

        let (status, body) = get_path(app.clone(), "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body, "not ready: kafka, kube\n");

        readiness.set("kube", true);
        let (_, body) = get_path(app.clone(), "/readyz").await;
        assert_eq!(body, "not ready: kafka\n");

        readiness.set("kafka", true);
        assert_eq!(get_path(app.clone(), "/readyz").await.0, StatusCode::OK);
        assert_eq!(
            get_path(app, "/healthz").await,
            (StatusCode::OK, "ok\n".to_owned())
        );
    }

    #[tokio::test]
    async fn metrics_exposes_registered_counters() {
        let mut registry = Registry::with_prefix("aigw");
        let counter: Counter = Counter::default();
        registry.register("test_events", "Events seen by the test", counter.clone());
        counter.inc_by(3);
        let app = router(Readiness::default(), Arc::new(registry));
        let (status, body) = get_path(app, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("aigw_test_events_total 3"), "{body}");
        assert!(body.ends_with("# EOF\n"), "{body}");
    }

    #[tokio::test]
    async fn serve_stops_on_shutdown() {
        let shutdown = Shutdown::new();
        let (addr, handle) = serve_ops(
            "127.0.0.1:0".parse().unwrap(),
            Readiness::default(),
            Arc::new(Registry::default()),
            shutdown.clone(),
        )
        .await
        .unwrap();
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut buf = String::new();
        stream.read_to_string(&mut buf).await.unwrap();
        assert!(buf.starts_with("HTTP/1.1 200"), "{buf}");
        shutdown.trigger();
        tokio::time::timeout(std::time::Duration::from_secs(5), handle)
            .await
            .expect("server did not stop")
            .unwrap()
            .unwrap();
    }
}
