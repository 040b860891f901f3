-- Identity for the platform's OpenID Connect provider (docs/architecture.md §5e). Users and their
-- roles are the seed's `users` and `user_roles` (0001); `users.password` holds an argon2id PHC
-- string. Added here:
--  * oauth_clients: the OIDC clients of each tenant (a reseller's portal, Grafana, a CLI). A
--    client belongs to one tenant; redirect URIs are matched exactly. `secret_hash` is the
--    SHA-256 of a random 256-bit secret (high entropy needs no slow hash); NULL marks a public
--    client, which must use PKCE (S256).
--  * oauth_refresh_tokens: refresh tokens by SHA-256, rotated on every use. `family` groups the
--    rotations of one authorization; presenting a used one revokes the family. `sid` is the
--    sign-in session the family came from (logout revokes every family of the session).
--  * invitations: single-use, expiring links that let the invited person set a password. Only
--    the SHA-256 of the link's secret is kept.
--  * users.updated_at: when the account last changed.
--  * tokens.owner: the Token CR's `spec.owner` (a username of the token's tenant). The operator
--    writes it with `user_id` (0 while no such user exists); accepting an invitation sets the new
--    user's id on the tenant's tokens that name them, so usage rows carry it from then on.

ALTER TABLE users ADD COLUMN updated_at DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP;
ALTER TABLE tokens ADD COLUMN owner VARCHAR(64) NOT NULL DEFAULT '';
ALTER TABLE tokens ADD INDEX idx_owner (tenant_id, owner);

CREATE TABLE oauth_clients (
  client_id                 VARCHAR(64)  PRIMARY KEY,
  tenant_id                 BIGINT       NOT NULL,
  name                      VARCHAR(128) NOT NULL,
  secret_hash               CHAR(64)     DEFAULT NULL,
  redirect_uris             JSON         NOT NULL,
  post_logout_redirect_uris JSON         NOT NULL,
  created_at                DATETIME     NOT NULL DEFAULT CURRENT_TIMESTAMP,
  INDEX idx_tenant (tenant_id)
);

CREATE TABLE oauth_refresh_tokens (
  token_hash CHAR(64)     PRIMARY KEY,
  family     CHAR(32)     NOT NULL,
  sid        CHAR(32)     NOT NULL,
  tenant_id  BIGINT       NOT NULL,
  user_id    BIGINT       NOT NULL,
  client_id  VARCHAR(64)  NOT NULL,
  scope      VARCHAR(255) NOT NULL,
  auth_time  BIGINT       NOT NULL,
  expires_at DATETIME     NOT NULL,
  used_at    DATETIME     DEFAULT NULL,
  revoked_at DATETIME     DEFAULT NULL,
  created_at DATETIME     NOT NULL DEFAULT CURRENT_TIMESTAMP,
  INDEX idx_family (family),
  INDEX idx_sid (sid),
  INDEX idx_user (tenant_id, user_id)
);

CREATE TABLE invitations (
  token_hash CHAR(64)     PRIMARY KEY,
  tenant_id  BIGINT       NOT NULL,
  email      VARCHAR(255) NOT NULL,
  username   VARCHAR(64)  NOT NULL,
  roles      JSON         NOT NULL,
  invited_by BIGINT       DEFAULT NULL,
  sales_id   BIGINT       DEFAULT NULL,
  expires_at DATETIME     NOT NULL,
  used_at    DATETIME     DEFAULT NULL,
  created_at DATETIME     NOT NULL DEFAULT CURRENT_TIMESTAMP,
  INDEX idx_tenant (tenant_id)
);
