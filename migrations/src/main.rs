//! `aigw-migrate`: applies the MySQL and ClickHouse migrations, then exits.

use clap::Parser;

/// Apply AIGateway's database migrations.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// MySQL URL (`mysql://user:pass@host:port/db`).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// ClickHouse HTTP URL.
    #[arg(long, env = "CLICKHOUSE_URL")]
    clickhouse_url: String,
    /// ClickHouse database (created if missing).
    #[arg(long, env = "CLICKHOUSE_DATABASE", default_value = "aigateway")]
    clickhouse_database: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let pool = sqlx::MySqlPool::connect(&cli.database_url).await?;
    aigw_migrations::run_mysql(&pool).await?;
    println!("mysql: migrations applied");

    let server = clickhouse::Client::default()
        .with_url(&cli.clickhouse_url)
        .with_validation(false);
    server
        .query(&format!(
            "CREATE DATABASE IF NOT EXISTS `{}`",
            cli.clickhouse_database
        ))
        .execute()
        .await?;
    let ch = server.with_database(&cli.clickhouse_database);
    let ran = aigw_migrations::run_clickhouse(&ch).await?;
    println!("clickhouse: {ran} migration(s) applied");
    let caps = aigw_migrations::clickhouse_capabilities(&ch).await?;
    for line in caps.degraded() {
        println!("clickhouse: degraded: {line}");
    }
    Ok(())
}
