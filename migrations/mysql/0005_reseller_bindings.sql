-- The seed's customer ownership (客户归属) one level up: a platform sales person's customers are
-- whole resellers (the seed's Alice: 代理商A, B, C). One sales person per reseller; the platform's
-- owner or operator binds them, or a sales person takes an unbound reseller. The REST API scopes a
-- platform sales person's reseller list and usage to these rows (docs/architecture.md §5f).
CREATE TABLE reseller_bindings (
  reseller_id BIGINT   PRIMARY KEY,
  sales_id    BIGINT   NOT NULL,
  created_at  DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP,
  INDEX idx_sales (sales_id)
);
