//! Periodic dependency probes feeding [`Readiness`](crate::ops::Readiness).

use std::{future::Future, time::Duration};

use crate::{ops::Readiness, shutdown::Shutdown};

/// How often a probe re-checks its dependency.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// Registers `name` as not ready and re-runs `check` every [`PROBE_INTERVAL`] until shutdown,
/// logging each change of state once (not every failed attempt).
pub fn spawn<F, Fut>(readiness: &Readiness, name: &'static str, shutdown: Shutdown, mut check: F)
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = Result<String, String>> + Send,
{
    readiness.register(name);
    let readiness = readiness.clone();
    tokio::spawn(async move {
        let mut last: Option<bool> = None;
        loop {
            let result = tokio::time::timeout(PROBE_INTERVAL, check())
                .await
                .unwrap_or_else(|_| Err("timed out".to_owned()));
            let ok = result.is_ok();
            if last != Some(ok) {
                match &result {
                    Ok(detail) => tracing::info!(dependency = name, %detail, "dependency ready"),
                    Err(error) => tracing::warn!(dependency = name, %error, "dependency not ready"),
                }
            }
            last = Some(ok);
            readiness.set(name, ok);
            tokio::select! {
                () = tokio::time::sleep(PROBE_INTERVAL) => {}
                () = shutdown.wait() => break,
            }
        }
    });
}

/// Readiness check: the kube-apiserver answers `/version`.
#[cfg(feature = "kube")]
pub fn kube(readiness: &Readiness, shutdown: Shutdown, client: kube::Client) {
    spawn(readiness, "kube", shutdown, move || {
        let client = client.clone();
        async move {
            client
                .apiserver_version()
                .await
                .map(|v| format!("kube-apiserver {}", v.git_version))
                .map_err(|e| e.to_string())
        }
    });
}

/// Readiness check: MySQL answers a query.
#[cfg(feature = "mysql")]
pub fn mysql(readiness: &Readiness, shutdown: Shutdown, pool: sqlx::MySqlPool) {
    spawn(readiness, "mysql", shutdown, move || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, String>("SELECT VERSION()")
                .fetch_one(&pool)
                .await
                .map(|v| format!("mysql {v}"))
                .map_err(|e| e.to_string())
        }
    });
}

/// Readiness check: Redis answers PING.
#[cfg(feature = "redis")]
pub fn redis(readiness: &Readiness, shutdown: Shutdown, client: redis::Client) {
    spawn(readiness, "redis", shutdown, move || {
        let client = client.clone();
        async move {
            let mut conn = client
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| e.to_string())?;
            redis::cmd("PING")
                .query_async::<String>(&mut conn)
                .await
                .map_err(|e| e.to_string())
        }
    });
}
