//! Schema migrations for MySQL (the CR mirror and non-CR data) and ClickHouse (usage logs).
//!
//! MySQL uses sqlx's migrator over `migrations/mysql/`. ClickHouse has no transactional DDL and
//! the test server (18.16) is old, so its migrations are plain statement files applied in order and
//! recorded in `schema_migrations`; every statement is idempotent (`IF NOT EXISTS`), so a crash
//! between applying and recording is harmless.

use serde::Deserialize;

/// The MySQL migrations, embedded at build time.
pub static MYSQL: sqlx::migrate::Migrator = sqlx::migrate!("./mysql");

/// One ClickHouse migration file.
#[derive(Debug, Clone, Copy)]
pub struct ClickHouseMigration {
    pub version: u32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// The ClickHouse migrations in order. A test checks this list against `migrations/clickhouse/`.
pub const CLICKHOUSE: &[ClickHouseMigration] = &[
    ClickHouseMigration {
        version: 1,
        name: "0001_usage_logs.sql",
        sql: include_str!("../clickhouse/0001_usage_logs.sql"),
    },
    ClickHouseMigration {
        version: 2,
        name: "0002_currency.sql",
        sql: include_str!("../clickhouse/0002_currency.sql"),
    },
];

/// Errors from running migrations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("mysql migration failed: {0}")]
    MySql(#[from] sqlx::migrate::MigrateError),
    #[error("clickhouse migration {name} failed: {source}")]
    ClickHouse {
        name: &'static str,
        source: clickhouse::error::Error,
    },
}

/// Applies the pending MySQL migrations.
pub async fn run_mysql(pool: &sqlx::MySqlPool) -> Result<(), Error> {
    MYSQL.run(pool).await?;
    Ok(())
}

#[derive(Debug, Deserialize, clickhouse::Row)]
struct Applied {
    version: u32,
}

/// Applies the pending ClickHouse migrations to the client's database; returns how many ran.
pub async fn run_clickhouse(client: &clickhouse::Client) -> Result<usize, Error> {
    let bookkeeping = ClickHouseMigration {
        version: 0,
        name: "schema_migrations",
        sql: "",
    };
    let fail = |m: &ClickHouseMigration| {
        let name = m.name;
        move |source| Error::ClickHouse { name, source }
    };
    client
        .query(
            "CREATE TABLE IF NOT EXISTS schema_migrations \
             (version UInt32, name String, applied_at DateTime DEFAULT now()) ENGINE = TinyLog",
        )
        .execute()
        .await
        .map_err(fail(&bookkeeping))?;
    let applied: Vec<u32> = client
        .query("SELECT version FROM schema_migrations")
        .fetch_all::<Applied>()
        .await
        .map_err(fail(&bookkeeping))?
        .into_iter()
        .map(|a| a.version)
        .collect();
    let mut ran = 0;
    for m in CLICKHOUSE.iter().filter(|m| !applied.contains(&m.version)) {
        for statement in statements(m.sql) {
            client.query(&statement).execute().await.map_err(fail(m))?;
        }
        client
            .query("INSERT INTO schema_migrations (version, name) VALUES (?, ?)")
            .bind(m.version)
            .bind(m.name)
            .execute()
            .await
            .map_err(fail(m))?;
        ran += 1;
    }
    Ok(ran)
}

/// What the ClickHouse server supports that our schema would like to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClickHouseCapabilities {
    /// `SELECT version()`.
    pub version: String,
    /// Table TTL (`ALTER TABLE … MODIFY TTL`), available from 19.6.
    pub ttl: bool,
}

impl ClickHouseCapabilities {
    /// Reads the version string (`major.minor.patch…`).
    pub fn from_version(version: &str) -> Self {
        let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        let major = parts.next().unwrap_or(0);
        let minor = parts.next().unwrap_or(0);
        Self {
            version: version.to_owned(),
            ttl: (major, minor) >= (19, 6),
        }
    }

    /// What is degraded on this server, in words, for logs; empty when nothing is.
    pub fn degraded(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.ttl {
            out.push(format!(
                "ClickHouse {} has no table TTL (needs 19.6): usage_logs retention drops monthly partitions instead",
                self.version
            ));
        }
        out
    }
}

/// Asks the server what it supports.
pub async fn clickhouse_capabilities(
    client: &clickhouse::Client,
) -> Result<ClickHouseCapabilities, clickhouse::error::Error> {
    let v: String = client.query("SELECT version()").fetch_one().await?;
    Ok(ClickHouseCapabilities::from_version(&v))
}

/// Splits a migration file into statements: `;` at a line end separates them, `--` lines are
/// comments. (Our files keep string literals free of `;` line ends.)
fn statements(sql: &str) -> Vec<String> {
    let body = sql
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n")
        + "\n";
    body.split(";\n")
        .map(str::trim)
        .map(|s| s.trim_end_matches(';').trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clickhouse_list_matches_directory() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/clickhouse");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| {
                std::path::Path::new(n)
                    .extension()
                    .is_some_and(|e| e == "sql")
            })
            .collect();
        files.sort();
        let listed: Vec<&str> = CLICKHOUSE.iter().map(|m| m.name).collect();
        assert_eq!(
            files, listed,
            "add new files in migrations/clickhouse to CLICKHOUSE"
        );
        for (i, m) in CLICKHOUSE.iter().enumerate() {
            assert_eq!(m.version as usize, i + 1);
            assert!(m.name.starts_with(&format!("{:04}_", m.version)));
        }
    }

    #[test]
    fn capabilities_follow_the_version() {
        let old = ClickHouseCapabilities::from_version("18.16.1");
        assert!(!old.ttl);
        assert_eq!(old.degraded().len(), 1);
        assert!(ClickHouseCapabilities::from_version("19.6.2.11").ttl);
        assert!(ClickHouseCapabilities::from_version("24.8.1").ttl);
        assert!(!ClickHouseCapabilities::from_version("19.5").ttl);
        assert!(
            ClickHouseCapabilities::from_version("24.8.1")
                .degraded()
                .is_empty()
        );
    }

    #[test]
    fn splits_statements_and_drops_comments() {
        let sql = "-- a comment; with a semicolon\nCREATE TABLE a (x UInt8) ENGINE = TinyLog;\n\nCREATE TABLE b (y UInt8)\nENGINE = TinyLog\n";
        assert_eq!(
            statements(sql),
            vec![
                "CREATE TABLE a (x UInt8) ENGINE = TinyLog".to_owned(),
                "CREATE TABLE b (y UInt8)\nENGINE = TinyLog".to_owned()
            ]
        );
    }
}
