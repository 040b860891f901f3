-- Isolation between tenants (docs/architecture.md §4, "Isolation"):
--  * locks: one row per claim space, locked FOR UPDATE by the transaction that claims in it, so two
--    operator replicas (or a leader and a stale one) can never both decide that overlapping claims
--    are free. Row locks end with the transaction, whatever happens to the connection.
CREATE TABLE locks (
  name VARCHAR(64) PRIMARY KEY
);
INSERT INTO locks (name) VALUES ('tenant_domains');
