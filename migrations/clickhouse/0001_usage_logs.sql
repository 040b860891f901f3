-- usage_logs: the seed's schema plus event_id (the dedupe key: the request id), platform_cost, and
-- cached / reasoning token counts.
-- ReplacingMergeTree with event_id in the sorting key collapses a re-delivered event at merge time;
-- queries that must be exact use FINAL. No TTL clause: the test server (ClickHouse 18.16) predates
-- TTL (19.6), so retention is done by dropping monthly partitions (docs/testbed.md).
-- Money is Decimal(12,6), as in the seed.
CREATE TABLE IF NOT EXISTS usage_logs (
  event_id          String,
  trace_id          String,
  tenant_id         UInt64,
  user_id           UInt64,
  token_id          UInt64,
  channel_id        UInt64,
  model             String,
  prompt_tokens     UInt32,
  completion_tokens UInt32,
  cached_tokens     UInt32,
  reasoning_tokens  UInt32,
  total_tokens      UInt32,
  cost              Decimal(12,6),
  platform_cost     Decimal(12,6),
  upstream_cost     Decimal(12,6),
  latency_ms        UInt32,
  status            String,
  error_msg         String DEFAULT '',
  created_at        DateTime
) ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(created_at)
ORDER BY (tenant_id, created_at, event_id)
