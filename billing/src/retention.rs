//! Retention of `usage_logs`. With table TTL (ClickHouse ≥ 19.6) the table gets a TTL clause; on
//! older servers (the test bed's 18.16) whole monthly partitions older than the retention are
//! dropped — the degradation `aigw-migrate` reports. Retention is off unless configured: these rows
//! are money records, so keep them at least as long as finance needs them (settle periods first).

use chrono::{Datelike, Months, NaiveDate};

/// What one retention run did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The table TTL was set (or re-set) to this many months.
    Ttl(u32),
    /// These monthly partitions (`YYYYMM`) were dropped.
    Dropped(Vec<String>),
}

/// The oldest month (`YYYYMM`) kept when `today` keeps `months` whole months before the current one.
pub fn cutoff(today: NaiveDate, months: u32) -> u32 {
    let first = today.with_day(1).unwrap_or(today);
    let oldest = first
        .checked_sub_months(Months::new(months))
        .unwrap_or(first);
    u32::try_from(oldest.year()).unwrap_or(0) * 100 + oldest.month()
}

#[derive(Debug, serde::Deserialize, clickhouse::Row)]
struct Part {
    partition: String,
}

/// Applies a retention of `months` whole months before the current one.
pub async fn apply(
    ch: &clickhouse::Client,
    months: u32,
    today: NaiveDate,
) -> Result<Applied, clickhouse::error::Error> {
    let caps = aigw_migrations::clickhouse_capabilities(ch).await?;
    if caps.ttl {
        ch.query(&format!(
            "ALTER TABLE usage_logs MODIFY TTL created_at + INTERVAL {} MONTH",
            months + 1
        ))
        .execute()
        .await?;
        return Ok(Applied::Ttl(months));
    }
    let keep_from = cutoff(today, months);
    let parts = ch
        .query(
            "SELECT DISTINCT partition FROM system.parts \
             WHERE database = currentDatabase() AND table = 'usage_logs' AND active",
        )
        .fetch_all::<Part>()
        .await?;
    let mut dropped = Vec::new();
    for p in parts {
        // Partition ids of toYYYYMM are plain numbers; anything else is not ours to drop.
        let Ok(month) = p.partition.parse::<u32>() else {
            continue;
        };
        if month < keep_from {
            ch.query(&format!("ALTER TABLE usage_logs DROP PARTITION {month}"))
                .execute()
                .await?;
            dropped.push(month.to_string());
        }
    }
    dropped.sort();
    Ok(Applied::Dropped(dropped))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cutoff_counts_whole_months() {
        let d = NaiveDate::from_ymd_opt(2026, 11, 27).unwrap();
        assert_eq!(cutoff(d, 0), 202_611);
        assert_eq!(cutoff(d, 1), 202_610);
        assert_eq!(cutoff(d, 13), 202_510);
        let jan = NaiveDate::from_ymd_opt(2026, 1, 31).unwrap();
        assert_eq!(cutoff(jan, 1), 202_512);
    }
}
