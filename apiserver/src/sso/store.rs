//! MySQL: users and roles (the seed's tables), OIDC clients, refresh tokens, invitations. Every
//! query names the tenant id; secrets are looked up by their SHA-256 only.

use sqlx::{MySqlPool, Row};

use super::{Role, digest, random_id, secret};

/// A user of one tenant.
#[derive(Debug, Clone)]
pub struct User {
    pub id: i64,
    pub username: String,
    pub email: Option<String>,
    /// argon2id PHC string; `None` until an invitation sets it.
    pub password: Option<String>,
    pub active: bool,
}

fn user_row(r: &sqlx::mysql::MySqlRow) -> Result<User, sqlx::Error> {
    Ok(User {
        id: r.try_get("id")?,
        username: r.try_get("username")?,
        email: r.try_get("email")?,
        password: r.try_get("password")?,
        active: r.try_get::<i8, _>("status")? == 1,
    })
}

/// The user `username` of the tenant (usernames compare case-insensitively, as MySQL's default
/// collation does).
pub async fn user_by_name(
    db: &MySqlPool,
    tenant_id: i64,
    username: &str,
) -> Result<Option<User>, sqlx::Error> {
    sqlx::query("SELECT id, username, email, password, status FROM users WHERE tenant_id = ? AND username = ?")
        .bind(tenant_id)
        .bind(username)
        .fetch_optional(db)
        .await?
        .as_ref()
        .map(user_row)
        .transpose()
}

pub async fn user_by_id(
    db: &MySqlPool,
    tenant_id: i64,
    id: i64,
) -> Result<Option<User>, sqlx::Error> {
    sqlx::query(
        "SELECT id, username, email, password, status FROM users WHERE tenant_id = ? AND id = ?",
    )
    .bind(tenant_id)
    .bind(id)
    .fetch_optional(db)
    .await?
    .as_ref()
    .map(user_row)
    .transpose()
}

/// The user's roles in the tenant, sorted; unknown role names in the table are skipped.
pub async fn roles<'e, E>(db: E, tenant_id: i64, user_id: i64) -> Result<Vec<Role>, sqlx::Error>
where
    E: sqlx::Executor<'e, Database = sqlx::MySql>,
{
    let names: Vec<String> =
        sqlx::query_scalar("SELECT role FROM user_roles WHERE tenant_id = ? AND user_id = ?")
            .bind(tenant_id)
            .bind(user_id)
            .fetch_all(db)
            .await?;
    let mut roles: Vec<Role> = names.iter().filter_map(|n| n.parse().ok()).collect();
    roles.sort();
    Ok(roles)
}

/// Replaces the user's roles (the caller has checked they are available to the tenant, and
/// deny-lists the user's older tokens: `Sso::assign_roles`).
pub(crate) async fn set_roles(
    db: &MySqlPool,
    tenant_id: i64,
    user_id: i64,
    roles: &[Role],
) -> Result<(), sqlx::Error> {
    let mut tx = db.begin().await?;
    sqlx::query("DELETE FROM user_roles WHERE tenant_id = ? AND user_id = ?")
        .bind(tenant_id)
        .bind(user_id)
        .execute(&mut *tx)
        .await?;
    for role in roles {
        sqlx::query("INSERT INTO user_roles (user_id, tenant_id, role) VALUES (?, ?, ?)")
            .bind(user_id)
            .bind(tenant_id)
            .bind(role.as_str())
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await
}

/// A change to a member that must leave the tenant an active owner.
#[derive(Debug, Clone, Copy)]
pub enum OwnerSafe<'a> {
    /// Replace the member's roles.
    Roles(&'a [Role]),
    /// Enable or disable the member.
    Active(bool),
}

/// Applies `change` to member `user_id` unless it would leave the tenant without an active owner
/// (then `Ok(false)`, nothing changed). The tenant's role rows are locked (`FOR UPDATE`) while the
/// owners are counted and the change is written, so two owners demoting or disabling each other
/// at once cannot both succeed.
pub async fn change_keeping_an_owner(
    db: &MySqlPool,
    tenant_id: i64,
    user_id: i64,
    change: OwnerSafe<'_>,
) -> Result<bool, sqlx::Error> {
    let mut tx = db.begin().await?;
    let owners: Vec<(i64, i8)> = sqlx::query_as(
        "SELECT r.user_id, u.status FROM user_roles r JOIN users u ON u.tenant_id = r.tenant_id AND u.id = r.user_id \
         WHERE r.tenant_id = ? AND r.role = 'owner' FOR UPDATE",
    )
    .bind(tenant_id)
    .fetch_all(&mut *tx)
    .await?;
    let target_is_owner = owners
        .iter()
        .any(|(id, status)| *id == user_id && *status == 1);
    let others = owners
        .iter()
        .filter(|(id, status)| *id != user_id && *status == 1)
        .count();
    let loses_owner = match change {
        OwnerSafe::Roles(roles) => !roles.contains(&Role::Owner),
        OwnerSafe::Active(active) => !active,
    };
    if target_is_owner && loses_owner && others == 0 {
        return Ok(false);
    }
    match change {
        OwnerSafe::Roles(roles) => {
            sqlx::query("DELETE FROM user_roles WHERE tenant_id = ? AND user_id = ?")
                .bind(tenant_id)
                .bind(user_id)
                .execute(&mut *tx)
                .await?;
            for role in roles {
                sqlx::query("INSERT INTO user_roles (user_id, tenant_id, role) VALUES (?, ?, ?)")
                    .bind(user_id)
                    .bind(tenant_id)
                    .bind(role.as_str())
                    .execute(&mut *tx)
                    .await?;
            }
        }
        OwnerSafe::Active(active) => {
            sqlx::query("UPDATE users SET status = ? WHERE tenant_id = ? AND id = ?")
                .bind(i8::from(active))
                .bind(tenant_id)
                .bind(user_id)
                .execute(&mut *tx)
                .await?;
        }
    }
    tx.commit().await?;
    Ok(true)
}

/// Enables or disables the user.
pub async fn set_active(
    db: &MySqlPool,
    tenant_id: i64,
    user_id: i64,
    active: bool,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query("UPDATE users SET status = ? WHERE tenant_id = ? AND id = ?")
        .bind(i8::from(active))
        .bind(tenant_id)
        .bind(user_id)
        .execute(db)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// Whether the tenant has an owner.
pub async fn has_owner(db: &MySqlPool, tenant_id: i64) -> Result<bool, sqlx::Error> {
    let n: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM user_roles WHERE tenant_id = ? AND role = 'owner'",
    )
    .bind(tenant_id)
    .fetch_one(db)
    .await?;
    Ok(n > 0)
}

/// The tenant id of the Tenant CR `name` (the operator's mirror).
pub async fn tenant_id(db: &MySqlPool, name: &str) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT id FROM tenants WHERE slug = ?")
        .bind(name)
        .fetch_optional(db)
        .await
}

/// The tenant's first domain in the mirror (links in mails sent from the command line).
pub async fn first_domain(db: &MySqlPool, tenant_id: i64) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT domain FROM tenant_domains WHERE tenant_id = ? AND domain NOT LIKE '*%' ORDER BY domain LIMIT 1")
        .bind(tenant_id)
        .fetch_optional(db)
        .await
}

// ---------------------------------------------------------------------------------------------
// clients

/// An OIDC client of one tenant.
#[derive(Debug, Clone)]
pub struct Client {
    pub client_id: String,
    pub tenant_id: i64,
    pub name: String,
    /// SHA-256 of the secret; `None` for a public client.
    pub secret_hash: Option<String>,
    pub redirect_uris: Vec<String>,
    pub post_logout_redirect_uris: Vec<String>,
}

impl Client {
    pub fn is_public(&self) -> bool {
        self.secret_hash.is_none()
    }

    /// Whether `secret` is this client's secret (constant-time on the digests).
    pub fn secret_matches(&self, secret: &str) -> bool {
        self.secret_hash.as_deref().is_some_and(|h| {
            let given = digest(secret);
            h.len() == given.len()
                && h.bytes()
                    .zip(given.bytes())
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0
        })
    }
}

/// The client `client_id` of the tenant; another tenant's client is as absent as an unknown one.
pub async fn client(
    db: &MySqlPool,
    tenant_id: i64,
    client_id: &str,
) -> Result<Option<Client>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT client_id, tenant_id, name, secret_hash, CAST(redirect_uris AS CHAR) AS redirect_uris, \
                CAST(post_logout_redirect_uris AS CHAR) AS post_logout_redirect_uris \
         FROM oauth_clients WHERE client_id = ? AND tenant_id = ?",
    )
    .bind(client_id)
    .bind(tenant_id)
    .fetch_optional(db)
    .await?;
    let Some(r) = row else { return Ok(None) };
    let list = |col: &str| -> Result<Vec<String>, sqlx::Error> {
        let v: String = r.try_get(col)?;
        Ok(serde_json::from_str(&v).unwrap_or_default())
    };
    Ok(Some(Client {
        client_id: r.try_get("client_id")?,
        tenant_id: r.try_get("tenant_id")?,
        name: r.try_get("name")?,
        secret_hash: r.try_get("secret_hash")?,
        redirect_uris: list("redirect_uris")?,
        post_logout_redirect_uris: list("post_logout_redirect_uris")?,
    }))
}

/// Checks a redirect URI for registration: absolute `https` (or `http` on a loopback host, for
/// native apps, RFC 8252), no fragment.
pub fn check_redirect_uri(uri: &str) -> Result<(), String> {
    let ok_scheme = uri.starts_with("https://")
        || ["http://127.0.0.1", "http://localhost", "http://[::1]"]
            .iter()
            .any(|p| uri.starts_with(p));
    if !ok_scheme {
        return Err(format!(
            "{uri:?}: a redirect URI is https (or http on a loopback address)"
        ));
    }
    if uri.contains('#') || uri.contains(char::is_whitespace) || uri.len() > 512 {
        return Err(format!(
            "{uri:?}: no fragment, no spaces, at most 512 characters"
        ));
    }
    Ok(())
}

/// Registers a client; returns its id and, for a confidential client, its secret (shown once,
/// never stored).
pub async fn register_client(
    db: &MySqlPool,
    tenant_id: i64,
    name: &str,
    redirect_uris: &[String],
    post_logout_redirect_uris: &[String],
    confidential: bool,
) -> Result<(String, Option<String>), String> {
    if redirect_uris.is_empty() {
        return Err("a client needs at least one redirect URI".into());
    }
    for uri in redirect_uris.iter().chain(post_logout_redirect_uris) {
        check_redirect_uri(uri)?;
    }
    let client_id = format!("c-{}", random_id());
    let secret = confidential.then(secret);
    sqlx::query(
        "INSERT INTO oauth_clients (client_id, tenant_id, name, secret_hash, redirect_uris, post_logout_redirect_uris) \
         VALUES (?, ?, ?, ?, ?, ?)",
    )
    .bind(&client_id)
    .bind(tenant_id)
    .bind(name)
    .bind(secret.as_deref().map(digest))
    .bind(serde_json::json!(redirect_uris).to_string())
    .bind(serde_json::json!(post_logout_redirect_uris).to_string())
    .execute(db)
    .await
    .map_err(|e| e.to_string())?;
    Ok((client_id, secret))
}

// ---------------------------------------------------------------------------------------------
// refresh tokens

/// What a refresh token stands for.
#[derive(Debug, Clone)]
pub struct Refresh {
    pub family: String,
    pub sid: String,
    pub tenant_id: i64,
    pub user_id: i64,
    pub client_id: String,
    pub scope: String,
    pub auth_time: i64,
}

/// Stores a new refresh token of `r`'s family; returns the token.
pub async fn issue_refresh<'e, E>(
    exec: E,
    r: &Refresh,
    ttl_secs: i64,
) -> Result<String, sqlx::Error>
where
    E: sqlx::Executor<'e, Database = sqlx::MySql>,
{
    let token = secret();
    sqlx::query(
        "INSERT INTO oauth_refresh_tokens (token_hash, family, sid, tenant_id, user_id, client_id, scope, auth_time, expires_at) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, NOW() + INTERVAL ? SECOND)",
    )
    .bind(digest(&token))
    .bind(&r.family)
    .bind(&r.sid)
    .bind(r.tenant_id)
    .bind(r.user_id)
    .bind(&r.client_id)
    .bind(&r.scope)
    .bind(r.auth_time)
    .bind(ttl_secs)
    .execute(exec)
    .await?;
    Ok(token)
}

/// The outcome of presenting a refresh token.
#[derive(Debug)]
pub enum Rotation {
    /// Rotated: the old one is used up, here is the new one.
    Rotated { refresh: Refresh, token: String },
    /// Unknown, expired, revoked, or another tenant's or client's.
    Invalid,
    /// Already used: the family is now revoked (`family`).
    Reused { family: String },
}

/// Rotates a refresh token in one transaction (the row is locked, so two concurrent uses of one
/// token cannot both succeed: the second sees it used and revokes the family). The new token
/// expires when the old one would have: a family lives at most the refresh lifetime from its
/// authorization, however often it rotates.
pub async fn rotate_refresh(
    db: &MySqlPool,
    token: &str,
    tenant_id: i64,
    client_id: &str,
) -> Result<Rotation, sqlx::Error> {
    let hash = digest(token);
    let mut tx = db.begin().await?;
    let row = sqlx::query(
        "SELECT family, sid, tenant_id, user_id, client_id, scope, auth_time, \
                expires_at < NOW() AS expired, used_at IS NOT NULL AS used, revoked_at IS NOT NULL AS revoked \
         FROM oauth_refresh_tokens WHERE token_hash = ? FOR UPDATE",
    )
    .bind(&hash)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        return Ok(Rotation::Invalid);
    };
    let r = Refresh {
        family: row.try_get("family")?,
        sid: row.try_get("sid")?,
        tenant_id: row.try_get("tenant_id")?,
        user_id: row.try_get("user_id")?,
        client_id: row.try_get("client_id")?,
        scope: row.try_get("scope")?,
        auth_time: row.try_get("auth_time")?,
    };
    if r.tenant_id != tenant_id || r.client_id != client_id {
        return Ok(Rotation::Invalid);
    }
    let flag = |c: &str| row.try_get::<i64, _>(c).map(|v| v != 0);
    if flag("revoked")? {
        return Ok(Rotation::Invalid);
    }
    if flag("used")? {
        revoke_family_in(&mut tx, &r.family).await?;
        tx.commit().await?;
        return Ok(Rotation::Reused { family: r.family });
    }
    if flag("expired")? {
        return Ok(Rotation::Invalid);
    }
    sqlx::query("UPDATE oauth_refresh_tokens SET used_at = NOW() WHERE token_hash = ?")
        .bind(&hash)
        .execute(&mut *tx)
        .await?;
    // The successor is a copy of the row with a new secret: same family, session, user, client,
    // scope and, above all, the same `expires_at`.
    let token = secret();
    sqlx::query(
        "INSERT INTO oauth_refresh_tokens (token_hash, family, sid, tenant_id, user_id, client_id, scope, auth_time, expires_at) \
         SELECT ?, family, sid, tenant_id, user_id, client_id, scope, auth_time, expires_at \
         FROM oauth_refresh_tokens WHERE token_hash = ?",
    )
    .bind(digest(&token))
    .bind(&hash)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Rotation::Rotated { refresh: r, token })
}

async fn revoke_family_in(tx: &mut sqlx::MySqlConnection, family: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE oauth_refresh_tokens SET revoked_at = NOW() WHERE family = ? AND revoked_at IS NULL")
        .bind(family)
        .execute(tx)
        .await?;
    Ok(())
}

/// Revokes a refresh family.
pub async fn revoke_family(db: &MySqlPool, family: &str) -> Result<(), sqlx::Error> {
    let mut conn = db.acquire().await?;
    revoke_family_in(&mut conn, family).await
}

/// Revokes the refresh family of `token` if it is the client's (RFC 7009); returns the family.
pub async fn revoke_refresh(
    db: &MySqlPool,
    token: &str,
    tenant_id: i64,
    client_id: &str,
) -> Result<Option<String>, sqlx::Error> {
    let family: Option<String> = sqlx::query_scalar(
        "SELECT family FROM oauth_refresh_tokens WHERE token_hash = ? AND tenant_id = ? AND client_id = ?",
    )
    .bind(digest(token))
    .bind(tenant_id)
    .bind(client_id)
    .fetch_optional(db)
    .await?;
    if let Some(f) = &family {
        let mut conn = db.acquire().await?;
        revoke_family_in(&mut conn, f).await?;
    }
    Ok(family)
}

/// Revokes every refresh family of a sign-in session (logout).
pub async fn revoke_session(db: &MySqlPool, tenant_id: i64, sid: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE oauth_refresh_tokens SET revoked_at = NOW() WHERE sid = ? AND tenant_id = ? AND revoked_at IS NULL")
        .bind(sid)
        .bind(tenant_id)
        .execute(db)
        .await?;
    Ok(())
}

/// A new family id.
pub fn new_family() -> String {
    random_id()
}

// ---------------------------------------------------------------------------------------------
// invitations

/// A pending invitation.
#[derive(Debug, Clone)]
pub struct Invitation {
    pub tenant_id: i64,
    pub email: String,
    pub username: String,
    pub roles: Vec<Role>,
    pub sales_id: Option<i64>,
}

/// Checks a username: 1–64 of letters, digits, `.`, `_`, `-`, `@`.
pub fn check_username(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@'))
    {
        return Err("a username has 1–64 characters of letters, digits, . _ - @".into());
    }
    Ok(())
}

/// Checks an email address: one `@` with something either side, no spaces, at most 255.
pub fn check_email(email: &str) -> Result<(), String> {
    match email.split_once('@') {
        Some((local, domain))
            if !local.is_empty()
                && domain.contains('.')
                && !domain.contains('@')
                && email.len() <= 255
                && !email.contains(|c: char| {
                    c.is_whitespace() || c.is_control() || c == '<' || c == '>'
                }) =>
        {
            Ok(())
        }
        _ => Err(format!("{email:?} is not an email address")),
    }
}

/// Whether the tenant has an unused, unexpired invitation for `username` (a second one could be
/// accepted first by someone else).
pub async fn username_pending(
    db: &MySqlPool,
    tenant_id: i64,
    username: &str,
) -> Result<bool, sqlx::Error> {
    let n: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM invitations WHERE tenant_id = ? AND username = ? AND used_at IS NULL AND expires_at > NOW()",
    )
    .bind(tenant_id)
    .bind(username)
    .fetch_one(db)
    .await?;
    Ok(n > 0)
}

/// How many of the tenant's tokens name `username` as their owner.
pub async fn tokens_owned_by<'e, E>(
    db: E,
    tenant_id: i64,
    username: &str,
) -> Result<i64, sqlx::Error>
where
    E: sqlx::Executor<'e, Database = sqlx::MySql>,
{
    sqlx::query_scalar("SELECT COUNT(*) FROM tokens WHERE tenant_id = ? AND owner = ?")
        .bind(tenant_id)
        .bind(username)
        .fetch_one(db)
        .await
}

/// Stores an invitation; returns the secret of its link.
pub async fn create_invitation(
    db: &MySqlPool,
    inv: &Invitation,
    invited_by: Option<i64>,
    ttl_secs: i64,
) -> Result<String, sqlx::Error> {
    let token = secret();
    let roles: Vec<&str> = inv.roles.iter().map(|r| r.as_str()).collect();
    sqlx::query(
        "INSERT INTO invitations (token_hash, tenant_id, email, username, roles, invited_by, sales_id, expires_at) \
         VALUES (?, ?, ?, ?, ?, ?, ?, NOW() + INTERVAL ? SECOND)",
    )
    .bind(digest(&token))
    .bind(inv.tenant_id)
    .bind(&inv.email)
    .bind(&inv.username)
    .bind(serde_json::json!(roles).to_string())
    .bind(invited_by)
    .bind(inv.sales_id)
    .bind(ttl_secs)
    .execute(db)
    .await?;
    Ok(token)
}

/// The columns an [`Invitation`] is read from (and `invited_by`).
const INVITATION_COLUMNS: &str =
    "email, username, CAST(roles AS CHAR) AS roles, sales_id, invited_by";

/// An invitation of `tenant_id` from a row of [`INVITATION_COLUMNS`], and who sent it.
fn invitation_row(
    r: &sqlx::mysql::MySqlRow,
    tenant_id: i64,
) -> Result<(Invitation, Option<i64>), sqlx::Error> {
    let roles: String = r.try_get("roles")?;
    let names: Vec<String> = serde_json::from_str(&roles).unwrap_or_default();
    Ok((
        Invitation {
            tenant_id,
            email: r.try_get("email")?,
            username: r.try_get("username")?,
            roles: names.iter().filter_map(|n| n.parse().ok()).collect(),
            sales_id: r.try_get("sales_id")?,
        },
        r.try_get("invited_by")?,
    ))
}

/// The unused, unexpired invitation of the tenant with this link secret.
pub async fn invitation(
    db: &MySqlPool,
    tenant_id: i64,
    token: &str,
) -> Result<Option<Invitation>, sqlx::Error> {
    let row = sqlx::query(&format!(
        "SELECT {INVITATION_COLUMNS} FROM invitations \
         WHERE token_hash = ? AND tenant_id = ? AND used_at IS NULL AND expires_at > NOW()"
    ))
    .bind(digest(token))
    .bind(tenant_id)
    .fetch_optional(db)
    .await?;
    row.map(|r| invitation_row(&r, tenant_id).map(|(inv, _)| inv))
        .transpose()
}

/// Why an invitation could not be accepted.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error(
        "this invitation link is not valid: it was used already, has expired, or belongs to another site"
    )]
    Gone,
    #[error(
        "the username {0:?} is taken in this tenant; ask for a new invitation with another name"
    )]
    Taken(String),
    #[error(
        "this invitation was withdrawn: the person who sent it may no longer invite for these roles"
    )]
    Withdrawn,
    #[error(
        "tokens of this tenant now name {0:?} as their owner; an owner or operator must invite them"
    )]
    OwnsTokens(String),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// Accepts an invitation in one transaction: marks it used (only one acceptance can win),
/// creates the user with the password hash, their roles, and the sales binding. Returns the
/// new user's id.
pub async fn accept_invitation(
    db: &MySqlPool,
    tenant_id: i64,
    token: &str,
    password_hash: &str,
) -> Result<(i64, Invitation), AcceptError> {
    let mut tx = db.begin().await?;
    let used = sqlx::query(
        "UPDATE invitations SET used_at = NOW() WHERE token_hash = ? AND tenant_id = ? AND used_at IS NULL AND expires_at > NOW()",
    )
    .bind(digest(token))
    .bind(tenant_id)
    .execute(&mut *tx)
    .await?;
    if used.rows_affected() != 1 {
        return Err(AcceptError::Gone);
    }
    let row = sqlx::query(&format!(
        "SELECT {INVITATION_COLUMNS} FROM invitations WHERE token_hash = ?"
    ))
    .bind(digest(token))
    .fetch_one(&mut *tx)
    .await?;
    let (inv, invited_by) = invitation_row(&row, tenant_id)?;
    // The inviter must still be active and still hold a role that may invite every role of the
    // invitation (a demoted operator's or a disabled sales person's links die with their rights).
    if let Some(inviter) = invited_by {
        let active: Option<i8> =
            sqlx::query_scalar("SELECT status FROM users WHERE id = ? AND tenant_id = ?")
                .bind(inviter)
                .bind(tenant_id)
                .fetch_optional(&mut *tx)
                .await?;
        let theirs = roles(&mut *tx, tenant_id, inviter).await?;
        let allowed = active == Some(1)
            && inv
                .roles
                .iter()
                .all(|granted| theirs.iter().any(|r| r.may_invite(*granted)));
        if !allowed {
            return Err(AcceptError::Withdrawn);
        }
    }
    // A sales person's invitee must not take over tokens that came to name them while the
    // invitation was pending (the check at invitation time could not see those).
    if inv.sales_id.is_some() && tokens_owned_by(&mut *tx, tenant_id, &inv.username).await? > 0 {
        return Err(AcceptError::OwnsTokens(inv.username));
    }
    let inserted = sqlx::query(
        "INSERT INTO users (tenant_id, username, email, password, status) VALUES (?, ?, ?, ?, 1)",
    )
    .bind(tenant_id)
    .bind(&inv.username)
    .bind(&inv.email)
    .bind(password_hash)
    .execute(&mut *tx)
    .await;
    let user_id = match inserted {
        Ok(done) => i64::try_from(done.last_insert_id()).unwrap_or(0),
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
            return Err(AcceptError::Taken(inv.username));
        }
        Err(e) => return Err(e.into()),
    };
    for role in &inv.roles {
        sqlx::query("INSERT INTO user_roles (user_id, tenant_id, role) VALUES (?, ?, ?)")
            .bind(user_id)
            .bind(tenant_id)
            .bind(role.as_str())
            .execute(&mut *tx)
            .await?;
    }
    // The tenant's tokens whose `spec.owner` names the new user bill to them from now on. (A
    // sales person may not invite a name a token already names: `tokens_owned_by`.)
    sqlx::query("UPDATE tokens SET user_id = ? WHERE tenant_id = ? AND owner = ? AND user_id = 0")
        .bind(user_id)
        .bind(tenant_id)
        .bind(&inv.username)
        .execute(&mut *tx)
        .await?;
    if let Some(sales) = inv.sales_id {
        sqlx::query(
            "INSERT INTO customer_bindings (tenant_id, customer_id, sales_id) VALUES (?, ?, ?)",
        )
        .bind(tenant_id)
        .bind(user_id)
        .bind(sales)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok((user_id, inv))
}
