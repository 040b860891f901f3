//! Test support for integration tests against the local test bed.
//!
//! `scripts/testbed up` starts real servers and writes an env file; [`Testbed::load`] reads that
//! file, never the process environment, so a developer's own `KUBECONFIG` or `DATABASE_URL` can never
//! point a test at a real cluster or database. The file is `$AIGW_TESTBED_ENV` if set, else
//! `$AIGW_TESTBED_DIR/env`, else `~/.local/state/aigateway/testbed/env`.
//!
//! A test bed that is not up is an error (a failing test), never a silent skip.

pub mod process;
pub mod tls;

use std::{collections::HashMap, path::PathBuf};

/// Errors finding or reaching the test bed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "test bed env file {path} not readable ({source}); start the test bed: scripts/testbed up"
    )]
    EnvFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("test bed env file has no {0}; restart the test bed: scripts/testbed up")]
    Missing(&'static str),
    #[error("kubeconfig: {0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    #[error("kube client: {0}")]
    Kube(#[from] kube::Error),
    #[error("mysql: {0}")]
    MySql(#[from] sqlx::Error),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
}

/// The test bed's endpoints, as written by `scripts/testbed up`.
#[derive(Debug, Clone)]
pub struct Testbed {
    vars: HashMap<String, String>,
}

impl Testbed {
    /// Reads the test bed env file.
    pub fn load() -> Result<Self, Error> {
        let path = env_file_path();
        let text = std::fs::read_to_string(&path).map_err(|source| Error::EnvFile {
            path: path.clone(),
            source,
        })?;
        Ok(Self::parse(&text))
    }

    fn parse(text: &str) -> Self {
        let vars = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        Self { vars }
    }

    /// A variable of the env file.
    pub fn var(&self, key: &'static str) -> Result<&str, Error> {
        self.vars
            .get(key)
            .map(String::as_str)
            .ok_or(Error::Missing(key))
    }

    /// A client for the test bed's kube-apiserver, as cluster admin.
    pub async fn kube_client(&self) -> Result<kube::Client, Error> {
        Ok(kube::Client::try_from(self.kube_config().await?)?)
    }

    /// The test bed's client configuration (cluster admin).
    pub async fn kube_config(&self) -> Result<kube::Config, Error> {
        let kubeconfig = kube::config::Kubeconfig::read_from(self.var("KUBECONFIG")?)?;
        Ok(kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await?)
    }

    /// A client acting as `user` (impersonation, as `kubectl --as`): it has only the rights RBAC
    /// grants that user, so hostile-tenant tests run with a tenant admin's real permissions.
    pub async fn kube_client_as(&self, user: &str) -> Result<kube::Client, Error> {
        let mut config = self.kube_config().await?;
        config.auth_info.impersonate = Some(user.to_owned());
        Ok(kube::Client::try_from(config)?)
    }

    /// The env file's variables, for handing to a child process.
    pub fn vars(&self) -> Vec<(&str, &str)> {
        self.vars
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    /// `host:port` list of the Kafka broker.
    pub fn kafka_brokers(&self) -> Result<&str, Error> {
        self.var("KAFKA_BROKERS")
    }

    /// A pool on the shared `aigateway` database.
    pub async fn mysql(&self) -> Result<sqlx::MySqlPool, Error> {
        Ok(sqlx::MySqlPool::connect(self.var("DATABASE_URL")?).await?)
    }

    /// A fresh, empty MySQL database for one test, and a pool on it.
    pub async fn scratch_mysql(&self, purpose: &str) -> Result<(String, sqlx::MySqlPool), Error> {
        let name = unique_ident(purpose);
        let url = self.var("DATABASE_URL")?;
        let admin = sqlx::MySqlPool::connect(url).await?;
        sqlx::query(&format!("CREATE DATABASE `{name}`"))
            .execute(&admin)
            .await?;
        admin.close().await;
        let base = url.rsplit_once('/').map_or(url, |(base, _)| base);
        let pool = sqlx::MySqlPool::connect(&format!("{base}/{name}")).await?;
        Ok((name, pool))
    }

    /// A client for the test bed's Redis.
    pub fn redis(&self) -> Result<redis::Client, Error> {
        Ok(redis::Client::open(self.var("REDIS_URL")?)?)
    }

    /// A ClickHouse client on a fresh, empty database for one test.
    pub async fn scratch_clickhouse(&self, purpose: &str) -> Result<clickhouse::Client, Error> {
        let name = unique_ident(purpose);
        let server = clickhouse::Client::default()
            .with_url(self.var("CLICKHOUSE_URL")?)
            // ClickHouse 18.16 lacks what the crate's validation needs (docs/testbed.md); tests check
            // the struct ↔ schema mapping themselves.
            .with_validation(false);
        server
            .query(&format!("CREATE DATABASE `{name}`"))
            .execute()
            .await?;
        Ok(server.with_database(name))
    }
}

/// Deletes every Redis key under `prefix` (what one test wrote under its own prefix).
///
/// `SCAN`, not `KEYS`: the shared test bed's Redis holds every earlier test's keys, and one
/// `KEYS` over millions of them outlasts the client's timeout.
pub async fn delete_redis_prefix(client: &redis::Client, prefix: &str) -> Result<(), Error> {
    let mut conn = client.get_multiplexed_async_connection().await?;
    let pattern = format!("{prefix}*");
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(10_000)
            .query_async(&mut conn)
            .await?;
        if !keys.is_empty() {
            redis::cmd("UNLINK")
                .arg(&keys)
                .query_async::<()>(&mut conn)
                .await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// Creates a fresh namespace `<purpose>-<8 hex>` and returns its name.
pub async fn scratch_namespace(client: &kube::Client, purpose: &str) -> Result<String, Error> {
    let name = unique_name(purpose);
    let ns = k8s_openapi::api::core::v1::Namespace {
        metadata: kube::api::ObjectMeta {
            name: Some(name.clone()),
            ..kube::api::ObjectMeta::default()
        },
        ..Default::default()
    };
    kube::Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
        .create(&kube::api::PostParams::default(), &ns)
        .await?;
    Ok(name)
}

fn env_file_path() -> PathBuf {
    if let Some(p) = std::env::var_os("AIGW_TESTBED_ENV") {
        return PathBuf::from(p);
    }
    if let Some(dir) = std::env::var_os("AIGW_TESTBED_DIR") {
        return PathBuf::from(dir).join("env");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".local/state/aigateway/testbed/env")
}

/// A name unique to this call: `<purpose>_<12 hex>`, safe as a SQL identifier.
pub fn unique_ident(purpose: &str) -> String {
    let clean: String = purpose
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("t_{clean}_{}", &id[..12])
}

/// A name unique to this call, valid as a Kubernetes object name: `<purpose>-<8 hex>`.
pub fn unique_name(purpose: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{purpose}-{}", &id[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_env_file_ignoring_comments() {
        let tb =
            Testbed::parse("# comment\nKAFKA_BROKERS=127.0.0.1:19092\n\nREDIS_URL = redis://x/\n");
        assert_eq!(tb.kafka_brokers().unwrap(), "127.0.0.1:19092");
        assert_eq!(tb.var("REDIS_URL").unwrap(), "redis://x/");
        assert!(matches!(
            tb.var("KUBECONFIG"),
            Err(Error::Missing("KUBECONFIG"))
        ));
    }

    #[test]
    fn unique_names_differ_and_are_safe() {
        let a = unique_ident("Usage-Logs");
        assert!(a.starts_with("t_usage_logs_"), "{a}");
        assert_ne!(a, unique_ident("Usage-Logs"));
        assert!(unique_name("ns").starts_with("ns-"));
    }
}
