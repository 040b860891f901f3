//! Settlement: per reseller and period, revenue (Σ cost), what is owed to the platform
//! (Σ `platform_cost`) and the margin; finance records a settlement or a withdrawal as an immutable
//! MySQL row. Recording a period twice returns the first record: the numbers of a settled period
//! never change, and recomputing a closed period gives the same numbers because `usage_logs FINAL`
//! holds each event once.

use chrono::NaiveDate;
use rust_decimal::Decimal;
use sqlx::MySqlPool;

use crate::reports::{self, Filter, GroupBy, ReportError};

/// The numbers of one reseller and period (`from` inclusive, `to` exclusive, UTC days).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    pub tenant_id: u64,
    pub from: NaiveDate,
    pub to: NaiveDate,
    pub requests: u64,
    /// Σ cost: what the reseller's customers were charged.
    pub revenue: Decimal,
    /// Σ `platform_cost`: what the reseller owes the platform.
    pub platform_cost: Decimal,
    /// revenue − `platform_cost`.
    pub margin: Decimal,
}

/// A recorded settlement or withdrawal.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Record {
    pub id: i64,
    pub tenant_id: i64,
    pub kind: String,
    pub period_start: Option<NaiveDate>,
    pub period_end: Option<NaiveDate>,
    pub revenue: Decimal,
    pub platform_cost: Decimal,
    pub margin: Decimal,
    pub amount: Decimal,
    pub created_by: String,
    pub note: Option<String>,
}

/// Why a settlement operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SettlementError {
    #[error(transparent)]
    Report(#[from] ReportError),
    #[error("mysql: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("period is empty: {from} is not before {to}")]
    Period { from: NaiveDate, to: NaiveDate },
    #[error("a withdrawal amount must be positive with at most 6 decimals, got {0}")]
    Amount(Decimal),
    #[error("{from} to {to} overlaps the settled period {start} to {end}")]
    Overlap {
        from: NaiveDate,
        to: NaiveDate,
        start: NaiveDate,
        end: NaiveDate,
    },
    #[error("the balance is {balance}; {amount} cannot be withdrawn")]
    Insufficient { balance: Decimal, amount: Decimal },
}

/// Computes a reseller's statement for a period (read-only).
pub async fn statement(
    ch: &clickhouse::Client,
    tenant_id: u64,
    from: NaiveDate,
    to: NaiveDate,
) -> Result<Statement, SettlementError> {
    if from >= to {
        return Err(SettlementError::Period { from, to });
    }
    let filter = Filter {
        tenant: Some(tenant_id),
        users: None,
        from,
        to,
    };
    let lines = reports::totals(ch, &filter, GroupBy::Tenant).await?;
    let (requests, revenue, platform_cost) = lines
        .iter()
        .fold((0, Decimal::ZERO, Decimal::ZERO), |(n, r, p), l| {
            (n + l.requests, r + l.cost, p + l.platform_cost)
        });
    Ok(Statement {
        tenant_id,
        from,
        to,
        requests,
        revenue,
        platform_cost,
        margin: revenue - platform_cost,
    })
}

const SELECT: &str = "SELECT id, tenant_id, kind, period_start, period_end, revenue, platform_cost, \
                      margin, amount, created_by, note FROM settlements";

/// Records the settlement of a period; if it was recorded before, returns that record unchanged.
/// A period that overlaps another settled one is refused, so no usage is settled (and its margin
/// counted in the balance) twice. The tenant's settlement rows are locked while it is checked and
/// written.
pub async fn settle(
    db: &MySqlPool,
    ch: &clickhouse::Client,
    tenant_id: u64,
    from: NaiveDate,
    to: NaiveDate,
    by: &str,
) -> Result<Record, SettlementError> {
    let select_period = format!(
        "{SELECT} WHERE tenant_id = ? AND kind = 'settlement' AND period_start = ? AND period_end = ?"
    );
    let s = statement(ch, tenant_id, from, to).await?;
    let mut tx = db.begin().await?;
    lock_tenant(&mut tx, tenant_id).await?;
    if let Some(first) = sqlx::query_as::<_, Record>(&select_period)
        .bind(tenant_id)
        .bind(from)
        .bind(to)
        .fetch_optional(&mut *tx)
        .await?
    {
        return Ok(first);
    }
    let overlap: Option<(NaiveDate, NaiveDate)> = sqlx::query_as(
        "SELECT period_start, period_end FROM settlements WHERE tenant_id = ? AND kind = 'settlement' \
         AND period_start < ? AND period_end > ? LIMIT 1",
    )
    .bind(tenant_id)
    .bind(to)
    .bind(from)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some((start, end)) = overlap {
        return Err(SettlementError::Overlap {
            from,
            to,
            start,
            end,
        });
    }
    sqlx::query(
        "INSERT INTO settlements (tenant_id, kind, period_start, period_end, revenue, \
         platform_cost, margin, amount, created_by) VALUES (?, 'settlement', ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(tenant_id)
    .bind(from)
    .bind(to)
    .bind(s.revenue)
    .bind(s.platform_cost)
    .bind(s.margin)
    .bind(s.platform_cost)
    .bind(by)
    .execute(&mut *tx)
    .await?;
    let record = sqlx::query_as::<_, Record>(&select_period)
        .bind(tenant_id)
        .bind(from)
        .bind(to)
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(record)
}

/// Serialises a tenant's settlement writes: its `tenants` row (a tenant with no settlement rows
/// yet has only a gap to lock, and two gap locks do not exclude each other), then its settlement
/// rows.
async fn lock_tenant(
    tx: &mut sqlx::Transaction<'_, sqlx::MySql>,
    tenant_id: u64,
) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT id FROM tenants WHERE id = ? FOR UPDATE")
        .bind(tenant_id)
        .fetch_all(&mut **tx)
        .await?;
    sqlx::query("SELECT id FROM settlements WHERE tenant_id = ? FOR UPDATE")
        .bind(tenant_id)
        .fetch_all(&mut **tx)
        .await?;
    Ok(())
}

/// What a tenant may still withdraw: the margin of its settled periods less what was withdrawn.
pub async fn balance<'e, E>(db: E, tenant_id: u64) -> Result<Decimal, SettlementError>
where
    E: sqlx::Executor<'e, Database = sqlx::MySql>,
{
    let (settled, withdrawn): (Option<Decimal>, Option<Decimal>) = sqlx::query_as(
        "SELECT SUM(CASE WHEN kind = 'settlement' THEN margin ELSE 0 END), \
         SUM(CASE WHEN kind = 'withdrawal' THEN amount ELSE 0 END) FROM settlements WHERE tenant_id = ?",
    )
    .bind(tenant_id)
    .fetch_one(db)
    .await?;
    Ok(settled.unwrap_or_default() - withdrawn.unwrap_or_default())
}

/// Records money paid out to a reseller: at most its [`balance`]. The balance is read with the
/// tenant's settlement rows locked (`FOR UPDATE` takes the index range of the tenant), so two
/// withdrawals at once cannot both spend the same balance.
pub async fn withdraw(
    db: &MySqlPool,
    tenant_id: u64,
    amount: Decimal,
    by: &str,
    note: &str,
) -> Result<Record, SettlementError> {
    if amount <= Decimal::ZERO || amount.scale() > 6 {
        return Err(SettlementError::Amount(amount));
    }
    let mut tx = db.begin().await?;
    lock_tenant(&mut tx, tenant_id).await?;
    let balance = balance(&mut *tx, tenant_id).await?;
    if amount > balance {
        return Err(SettlementError::Insufficient { balance, amount });
    }
    let id = sqlx::query(
        "INSERT INTO settlements (tenant_id, kind, amount, created_by, note) VALUES (?, 'withdrawal', ?, ?, ?)",
    )
    .bind(tenant_id)
    .bind(amount)
    .bind(by)
    .bind(note)
    .execute(&mut *tx)
    .await?
    .last_insert_id();
    let record = sqlx::query_as::<_, Record>(&format!("{SELECT} WHERE id = ?"))
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(record)
}

/// A tenant's records, oldest first.
pub async fn records(db: &MySqlPool, tenant_id: u64) -> Result<Vec<Record>, SettlementError> {
    Ok(
        sqlx::query_as::<_, Record>(&format!("{SELECT} WHERE tenant_id = ? ORDER BY id"))
            .bind(tenant_id)
            .fetch_all(db)
            .await?,
    )
}
