//! The test bed's MariaDB is real: our migrations apply, constraints hold, DECIMAL money round-trips.

// Test code: a failed unwrap is a failed test with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::str::FromStr;

use aigw_testkit::Testbed;
use rust_decimal::Decimal;

#[tokio::test]
async fn migrations_create_the_seed_tables_and_are_idempotent() {
    let tb = Testbed::load().unwrap();
    let (db, pool) = tb.scratch_mysql("migrations").await.unwrap();
    aigw_migrations::run_mysql(&pool).await.unwrap();
    aigw_migrations::run_mysql(&pool).await.unwrap();

    let mut tables: Vec<String> = sqlx::query_scalar(
        "SELECT CAST(table_name AS CHAR) FROM information_schema.tables \
         WHERE table_schema = ? AND table_name <> '_sqlx_migrations'",
    )
    .bind(&db)
    .fetch_all(&pool)
    .await
    .unwrap();
    tables.sort();
    assert_eq!(
        tables,
        [
            "billing_offsets",
            "channels",
            "customer_bindings",
            "invitations",
            "locks",
            "oauth_clients",
            "oauth_refresh_tokens",
            "pricing",
            "reseller_bindings",
            "settlements",
            "tenant_domains",
            "tenants",
            "tokens",
            "usage_daily",
            "user_roles",
            "users"
        ]
    );
}

#[tokio::test]
async fn a_domain_belongs_to_one_tenant_and_prices_are_exact_decimals() {
    let tb = Testbed::load().unwrap();
    let (_db, pool) = tb.scratch_mysql("constraints").await.unwrap();
    aigw_migrations::run_mysql(&pool).await.unwrap();

    for slug in ["acme", "globex"] {
        sqlx::query("INSERT INTO tenants (slug, name) VALUES (?, ?)")
            .bind(slug)
            .bind(slug)
            .execute(&pool)
            .await
            .unwrap();
    }
    sqlx::query("INSERT INTO tenant_domains (domain, tenant_id) VALUES ('api.acme.example', 1)")
        .execute(&pool)
        .await
        .unwrap();
    let clash = sqlx::query(
        "INSERT INTO tenant_domains (domain, tenant_id) VALUES ('api.acme.example', 2)",
    )
    .execute(&pool)
    .await
    .unwrap_err();
    assert!(clash.to_string().contains("Duplicate entry"), "{clash}");

    // 0.1 + 0.2 is exactly 0.3 in DECIMAL, unlike binary floating point.
    let price = Decimal::from_str("2.500001").unwrap();
    sqlx::query("INSERT INTO pricing (tenant_id, model, input_price, output_price) VALUES (0, 'gpt-4o', ?, ?)")
        .bind(price)
        .bind(Decimal::from_str("0.1").unwrap())
        .execute(&pool)
        .await
        .unwrap();
    let (input, sum): (Decimal, Decimal) = sqlx::query_as(
        "SELECT input_price, output_price + CAST('0.2' AS DECIMAL(12,6)) FROM pricing WHERE model = 'gpt-4o'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(input, price);
    assert_eq!(sum, Decimal::from_str("0.3").unwrap());
}
