-- Billing state that lives in MySQL (docs/architecture.md §6–§7):
--  * billing_offsets: per Kafka partition, the next offset whose effects the aggregates below have
--    NOT yet absorbed. The worker updates it in the same transaction as the aggregates, so a batch
--    replayed after a crash adds nothing twice.
--  * usage_daily: per tenant, day (UTC) and model, totals of priced events.
--  * tokens.used_quota (0001) is incremented in that same transaction.
--  * settlements: immutable finance records (no UPDATE or DELETE path in the code); a settlement
--    fixes the numbers of one reseller and period, a withdrawal records money paid out.
-- Money columns are DECIMAL, never FLOAT; sums get 20 digits.

CREATE TABLE billing_offsets (
  topic       VARCHAR(249) NOT NULL,
  part        INT          NOT NULL,
  next_offset BIGINT       NOT NULL,
  updated_at  DATETIME     NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP,
  PRIMARY KEY (topic, part)
);

CREATE TABLE usage_daily (
  tenant_id         BIGINT        NOT NULL,
  day               DATE          NOT NULL,
  model             VARCHAR(128)  NOT NULL,
  requests          BIGINT        NOT NULL DEFAULT 0,
  prompt_tokens     BIGINT        NOT NULL DEFAULT 0,
  completion_tokens BIGINT        NOT NULL DEFAULT 0,
  cached_tokens     BIGINT        NOT NULL DEFAULT 0,
  cost              DECIMAL(20,6) NOT NULL DEFAULT 0,
  platform_cost     DECIMAL(20,6) NOT NULL DEFAULT 0,
  upstream_cost     DECIMAL(20,6) NOT NULL DEFAULT 0,
  PRIMARY KEY (tenant_id, day, model)
);

CREATE TABLE settlements (
  id            BIGINT PRIMARY KEY AUTO_INCREMENT,
  tenant_id     BIGINT        NOT NULL,
  kind          VARCHAR(16)   NOT NULL,
  period_start  DATE,
  period_end    DATE,
  revenue       DECIMAL(20,6) NOT NULL DEFAULT 0,
  platform_cost DECIMAL(20,6) NOT NULL DEFAULT 0,
  margin        DECIMAL(20,6) NOT NULL DEFAULT 0,
  amount        DECIMAL(20,6) NOT NULL DEFAULT 0,
  created_by    VARCHAR(128)  NOT NULL,
  note          VARCHAR(512),
  created_at    DATETIME      NOT NULL DEFAULT CURRENT_TIMESTAMP,
  UNIQUE KEY uk_period (tenant_id, kind, period_start, period_end),
  INDEX idx_tenant (tenant_id, created_at)
);
