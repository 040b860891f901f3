-- The seed's core tables (docs/architecture.md §7), adapted where the CRs need it:
--  * tenants.slug is the Tenant CR name; a tenant has several domains, so they live in tenant_domains
--    (the UNIQUE key there is what makes a domain belong to one tenant only).
--  * channels.name is the Channel CR name (unique); upstream_cost carries per-model costs.
--  * tokens carry the CR's namespace/name so a mirror row maps back to its CR; only the key hash
--    is stored, never the key.
--  * pricing gains cached_input_price; tenant_id 0 is the platform default, as in the seed.
-- Money columns are DECIMAL, never FLOAT.

CREATE TABLE tenants (
  id          BIGINT PRIMARY KEY AUTO_INCREMENT,
  slug        VARCHAR(64)  NOT NULL UNIQUE,
  name        VARCHAR(128) NOT NULL,
  type        VARCHAR(16)  NOT NULL DEFAULT 'reseller',
  parent_id   BIGINT       DEFAULT NULL,
  logo_url    VARCHAR(512),
  theme_color VARCHAR(7)   DEFAULT '#6c8cff',
  config      JSON,
  status      TINYINT      NOT NULL DEFAULT 1,
  created_at  DATETIME     NOT NULL DEFAULT CURRENT_TIMESTAMP,
  updated_at  DATETIME     NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP,
  INDEX idx_parent (parent_id)
);

CREATE TABLE tenant_domains (
  domain     VARCHAR(255) PRIMARY KEY,
  tenant_id  BIGINT       NOT NULL,
  created_at DATETIME     NOT NULL DEFAULT CURRENT_TIMESTAMP,
  INDEX idx_tenant (tenant_id)
);

CREATE TABLE users (
  id         BIGINT PRIMARY KEY AUTO_INCREMENT,
  tenant_id  BIGINT       NOT NULL,
  username   VARCHAR(64)  NOT NULL,
  email      VARCHAR(255),
  phone      VARCHAR(20),
  password   VARCHAR(255),
  status     TINYINT      NOT NULL DEFAULT 1,
  created_at DATETIME     NOT NULL DEFAULT CURRENT_TIMESTAMP,
  UNIQUE KEY uk_tenant_user (tenant_id, username),
  INDEX idx_tenant (tenant_id)
);

CREATE TABLE user_roles (
  user_id    BIGINT      NOT NULL,
  tenant_id  BIGINT      NOT NULL,
  role       VARCHAR(32) NOT NULL,
  created_at DATETIME    NOT NULL DEFAULT CURRENT_TIMESTAMP,
  PRIMARY KEY (user_id, tenant_id, role),
  INDEX idx_tenant (tenant_id)
);

CREATE TABLE customer_bindings (
  id          BIGINT PRIMARY KEY AUTO_INCREMENT,
  tenant_id   BIGINT   NOT NULL,
  customer_id BIGINT   NOT NULL,
  sales_id    BIGINT   NOT NULL,
  created_at  DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP,
  UNIQUE KEY uk_customer (tenant_id, customer_id),
  INDEX idx_sales (tenant_id, sales_id)
);

-- Channels are platform resources: no tenant_id, as in the seed.
CREATE TABLE channels (
  id            BIGINT PRIMARY KEY AUTO_INCREMENT,
  name          VARCHAR(128)   NOT NULL UNIQUE,
  provider      VARCHAR(32)    NOT NULL,
  api_key_enc   VARBINARY(1024) NOT NULL,
  base_url      VARCHAR(512),
  models        JSON           NOT NULL,
  upstream_cost JSON,
  priority      INT            NOT NULL DEFAULT 0,
  weight        INT            NOT NULL DEFAULT 100,
  status        TINYINT        NOT NULL DEFAULT 1,
  max_retry     INT            NOT NULL DEFAULT 2,
  created_at    DATETIME       NOT NULL DEFAULT CURRENT_TIMESTAMP,
  updated_at    DATETIME       NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP
);

CREATE TABLE tokens (
  id         BIGINT PRIMARY KEY AUTO_INCREMENT,
  tenant_id  BIGINT      NOT NULL,
  user_id    BIGINT      NOT NULL,
  namespace  VARCHAR(63) NOT NULL,
  cr_name    VARCHAR(253) NOT NULL,
  name       VARCHAR(64),
  key_hash   CHAR(64)    NOT NULL UNIQUE,
  key_prefix VARCHAR(12) NOT NULL,
  models     JSON,
  quota      BIGINT      NOT NULL DEFAULT -1,
  used_quota BIGINT      NOT NULL DEFAULT 0,
  rate_limit INT         NOT NULL DEFAULT 60,
  expires_at DATETIME,
  status     TINYINT     NOT NULL DEFAULT 1,
  created_at DATETIME    NOT NULL DEFAULT CURRENT_TIMESTAMP,
  UNIQUE KEY uk_cr (namespace, cr_name),
  INDEX idx_tenant (tenant_id)
);

CREATE TABLE pricing (
  id                 BIGINT PRIMARY KEY AUTO_INCREMENT,
  tenant_id          BIGINT        NOT NULL DEFAULT 0,
  model              VARCHAR(128)  NOT NULL,
  input_price        DECIMAL(12,6) NOT NULL,
  output_price       DECIMAL(12,6) NOT NULL,
  cached_input_price DECIMAL(12,6),
  currency           VARCHAR(3)    NOT NULL DEFAULT 'CNY',
  UNIQUE KEY uk_tenant_model (tenant_id, model)
);
