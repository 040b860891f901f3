//! The HTTP side of the identity provider, under `/oauth/*` on every tenant domain:
//!
//! | endpoint | |
//! |---|---|
//! | `GET /oauth/.well-known/openid-configuration` | discovery (OpenID Connect Discovery 1.0) |
//! | `GET /oauth/jwks` | the published signing keys |
//! | `GET, POST /oauth/authorize` | authorization code flow: the tenant's login page, PKCE S256 |
//! | `POST /oauth/token` | `authorization_code` and `refresh_token` grants |
//! | `GET, POST /oauth/userinfo` | the signed-in user |
//! | `POST /oauth/revoke` | RFC 7009 revocation of access and refresh tokens |
//! | `GET, POST /oauth/logout` | RP-initiated logout (end session) |
//! | `GET, POST /oauth/invite` | accepting an invitation: setting a password |
//!
//! and `POST /api/v1/invitations` (a bearer token of the tenant) to invite someone by email.

use std::net::SocketAddr;

use axum::{
    Extension, Form, Json, Router,
    extract::{ConnectInfo, Query, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use minijinja::context;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::{
    AuthError, Role, Site, Sso, digest,
    jwt::{Grant, IdClaims},
    now_secs,
    pages::Brand,
    password, roles, secret, secs,
    store::{self, Client, Rotation},
};

/// Scopes this provider knows.
const SCOPES: [&str; 4] = ["openid", "profile", "email", "offline_access"];
const COOKIE: &str = "aigw_sso";

/// The routes of the identity provider.
pub fn router(sso: Sso) -> Router {
    Router::new()
        .route("/oauth/.well-known/openid-configuration", get(discovery))
        .route("/oauth/jwks", get(jwks))
        .route("/oauth/authorize", get(authorize_get).post(authorize_post))
        .route("/oauth/token", post(token))
        .route("/oauth/userinfo", get(userinfo).post(userinfo))
        .route("/oauth/revoke", post(revoke))
        .route("/oauth/logout", get(logout_get).post(logout_post))
        .route("/oauth/invite", get(invite_get).post(invite_post))
        .route("/api/v1/invitations", post(create_invitation))
        .layer(axum::middleware::map_request(host_from_authority))
        .with_state(sso)
}

/// HTTP/2 carries the host in `:authority`, which hyper leaves in the URI: give it to the
/// handlers as `Host`, which they read.
async fn host_from_authority(mut req: axum::extract::Request) -> axum::extract::Request {
    if !req.headers().contains_key(header::HOST)
        && let Some(value) = req
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        req.headers_mut().insert(header::HOST, value);
    }
    req
}

// ---------------------------------------------------------------------------------------------
// helpers

fn host(headers: &HeaderMap) -> &str {
    headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("")
}

/// An HTML page with the headers every sign-in page carries: no scripts can run, no framing, no
/// caching, no referrer to other sites (the query holds codes and states; `same-origin` keeps the
/// `Origin` of our own form posts, which `no-referrer` would turn into `null`).
fn page(status: StatusCode, html: String) -> Response {
    let mut resp = (status, html).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; img-src https: http: data:; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    resp
}

fn message_page(
    sso: &Sso,
    brand: &Brand,
    status: StatusCode,
    title: &str,
    message: &str,
) -> Response {
    page(
        status,
        sso.pages().message(
            brand,
            title,
            message,
            status.is_client_error() || status.is_server_error(),
        ),
    )
}

fn unknown_site(sso: &Sso) -> Response {
    message_page(
        sso,
        &Brand::neutral(),
        StatusCode::NOT_FOUND,
        "Unknown site",
        "No tenant serves this domain.",
    )
}

fn unavailable(sso: &Sso, brand: &Brand, what: &str, e: &dyn std::fmt::Display) -> Response {
    tracing::error!(error = %e, what, "sign-in store unavailable");
    message_page(
        sso,
        brand,
        StatusCode::SERVICE_UNAVAILABLE,
        "Temporarily unavailable",
        "Sign-in is temporarily unavailable. Please try again in a minute.",
    )
}

/// RFC 9457 problem details.
pub fn problem(status: StatusCode, title: &str, detail: &str) -> Response {
    let mut resp = (
        status,
        Json(json!({"type": "about:blank", "title": title, "status": status.as_u16(), "detail": detail})),
    )
        .into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    resp
}

/// 503 problem details for a store that failed (the cause is logged, not shown).
fn unavailable_problem(e: &dyn std::fmt::Display) -> Response {
    tracing::error!(error = %e, "identity store unavailable");
    problem(
        StatusCode::SERVICE_UNAVAILABLE,
        "Unavailable",
        "the identity store is unavailable; try again",
    )
}

/// An OAuth error of the token, revocation or userinfo endpoints (RFC 6749 §5.2).
fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    let mut resp = (
        status,
        Json(json!({"error": error, "error_description": description})),
    )
        .into_response();
    no_store(resp.headers_mut());
    if status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"oauth\""),
        );
    }
    resp
}

/// A JSON answer that holds tokens or personal data: never cached.
fn json_no_store(body: serde_json::Value) -> Response {
    let mut resp = Json(body).into_response();
    no_store(resp.headers_mut());
    resp
}

fn no_store(h: &mut HeaderMap) {
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
}

fn with_query(uri: &str, params: &[(&str, &str)]) -> String {
    let query = serde_urlencoded::to_string(params).unwrap_or_default();
    let sep = if uri.contains('?') { '&' } else { '?' };
    format!("{uri}{sep}{query}")
}

fn see_other(location: &str) -> Response {
    let Ok(value) = HeaderValue::from_str(location) else {
        return (StatusCode::BAD_REQUEST, "the redirect URI cannot be used").into_response();
    };
    let mut resp = StatusCode::SEE_OTHER.into_response();
    resp.headers_mut().insert(header::LOCATION, value);
    no_store(resp.headers_mut());
    resp
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Every value of the cookie `name` the request carries.
fn cookies(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .filter(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
        .collect()
}

/// The cookie `name`; none when it is sent twice (a sibling domain may have planted one with a
/// wider `Domain` or narrower `Path` to pin a victim to the attacker's session).
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    let mut all = cookies(headers, name);
    if all.len() == 1 { all.pop() } else { None }
}

fn source_address(headers: &HeaderMap, peer: Option<&ConnectInfo<SocketAddr>>) -> String {
    headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .rfind(|v| !v.is_empty())
        .map(str::to_owned)
        .or_else(|| peer.map(|p| p.0.ip().to_string()))
        .unwrap_or_else(|| "unknown".into())
}

// ---------------------------------------------------------------------------------------------
// discovery and keys

async fn discovery(State(sso): State<Sso>, headers: HeaderMap) -> Response {
    let Some(site) = sso.site(host(&headers)) else {
        return problem(
            StatusCode::NOT_FOUND,
            "Unknown site",
            "No tenant serves this domain.",
        );
    };
    let iss = site.issuer();
    Json(json!({
        "issuer": iss,
        "authorization_endpoint": format!("{iss}/authorize"),
        "token_endpoint": format!("{iss}/token"),
        "userinfo_endpoint": format!("{iss}/userinfo"),
        "jwks_uri": format!("{iss}/jwks"),
        "revocation_endpoint": format!("{iss}/revoke"),
        "end_session_endpoint": format!("{iss}/logout"),
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["EdDSA"],
        "scopes_supported": SCOPES,
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
        "revocation_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
        "code_challenge_methods_supported": ["S256"],
        "claims_supported": ["iss", "sub", "aud", "exp", "iat", "auth_time", "nonce", "sid", "tenant", "roles", "preferred_username", "email"],
        "authorization_response_iss_parameter_supported": true,
    }))
    .into_response()
}

async fn jwks(State(sso): State<Sso>, headers: HeaderMap) -> Response {
    if sso.site(host(&headers)).is_none() {
        return problem(
            StatusCode::NOT_FOUND,
            "Unknown site",
            "No tenant serves this domain.",
        );
    }
    let mut resp = Json(sso.keys().jwks()).into_response();
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    resp
}

// ---------------------------------------------------------------------------------------------
// authorize

#[derive(Debug, Default, Clone, Deserialize)]
struct AuthParams {
    response_type: Option<String>,
    client_id: Option<String>,
    redirect_uri: Option<String>,
    scope: Option<String>,
    state: Option<String>,
    nonce: Option<String>,
    code_challenge: Option<String>,
    code_challenge_method: Option<String>,
    prompt: Option<String>,
    max_age: Option<String>,
}

impl AuthParams {
    /// The parameters the login form carries through its POST.
    fn hidden(&self) -> Vec<serde_json::Value> {
        [
            ("response_type", &self.response_type),
            ("client_id", &self.client_id),
            ("redirect_uri", &self.redirect_uri),
            ("scope", &self.scope),
            ("state", &self.state),
            ("nonce", &self.nonce),
            ("code_challenge", &self.code_challenge),
            ("code_challenge_method", &self.code_challenge_method),
        ]
        .into_iter()
        .filter_map(|(name, v)| v.as_ref().map(|v| json!({"name": name, "value": v})))
        .collect()
    }
}

#[derive(Debug, Deserialize)]
struct LoginForm {
    #[serde(flatten)]
    params: AuthParams,
    /// Absent in an authorization request a client POSTs (OpenID Connect Core 3.1.2.1); present
    /// when the login form is submitted.
    username: Option<String>,
    password: Option<String>,
}

/// A request that is not answered with a code.
enum Reject {
    /// Shown to the user: the client or its redirect URI cannot be trusted with a redirect.
    Page(StatusCode, String),
    /// Sent back to the client's redirect URI (RFC 6749 §4.1.2.1).
    Redirect(String),
    Store(String),
}

/// An authorization request that passed every check.
struct Valid {
    client: Client,
    redirect_uri: String,
    scope: String,
    state: Option<String>,
    nonce: Option<String>,
    challenge: Option<String>,
}

/// What an authorization code stands for, in Redis under its digest until used.
#[derive(Debug, Serialize, Deserialize)]
struct CodeRecord {
    client_id: String,
    redirect_uri: String,
    user_id: i64,
    scope: String,
    nonce: Option<String>,
    challenge: Option<String>,
    auth_time: i64,
    sid: String,
}

/// The sign-in session behind the cookie.
#[derive(Debug, Serialize, Deserialize)]
struct Session {
    tenant_id: i64,
    user_id: i64,
    sid: String,
    auth_time: i64,
}

/// An error sent back to the client's redirect URI, with `state` and `iss` (RFC 9207: in error
/// responses too, since discovery announces it).
fn error_redirect(
    site: &Site,
    redirect_uri: &str,
    error: &str,
    description: &str,
    state: Option<&str>,
) -> String {
    let iss = site.issuer();
    let mut q = vec![
        ("error", error),
        ("error_description", description),
        ("iss", iss.as_str()),
    ];
    if let Some(s) = state {
        q.push(("state", s));
    }
    with_query(redirect_uri, &q)
}

fn is_b64url(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

async fn validate(sso: &Sso, site: &Site, p: &AuthParams) -> Result<Valid, Reject> {
    let Some(client_id) = p.client_id.as_deref() else {
        return Err(Reject::Page(
            StatusCode::BAD_REQUEST,
            "The request names no client (client_id).".into(),
        ));
    };
    let client = store::client(sso.db(), site.tenant.id, client_id)
        .await
        .map_err(|e| Reject::Store(e.to_string()))?
        .ok_or_else(|| {
            Reject::Page(
                StatusCode::BAD_REQUEST,
                "This application is not registered on this site.".into(),
            )
        })?;
    let Some(redirect_uri) = p
        .redirect_uri
        .clone()
        .filter(|u| client.redirect_uris.contains(u))
    else {
        return Err(Reject::Page(
            StatusCode::BAD_REQUEST,
            "The redirect URI is not one registered for this application (it must match exactly)."
                .into(),
        ));
    };
    let state = p.state.clone();
    let fail = |error: &str, description: &str| {
        Reject::Redirect(error_redirect(
            site,
            &redirect_uri,
            error,
            description,
            state.as_deref(),
        ))
    };
    if p.response_type.as_deref() != Some("code") {
        return Err(fail(
            "unsupported_response_type",
            "only response_type=code is supported",
        ));
    }
    let scope = p.scope.clone().unwrap_or_default();
    if let Some(bad) = scope.split_whitespace().find(|s| !SCOPES.contains(s)) {
        return Err(fail("invalid_scope", &format!("unknown scope {bad:?}")));
    }
    let mut scopes: Vec<&str> = scope.split_whitespace().collect();
    scopes.sort_unstable();
    scopes.dedup();
    let scope = scopes.join(" ");
    let challenge = match (
        p.code_challenge.as_deref(),
        p.code_challenge_method.as_deref(),
    ) {
        (Some(c), Some("S256")) if c.len() == 43 && is_b64url(c) => Some(c.to_owned()),
        (Some(_), Some("S256")) => {
            return Err(fail(
                "invalid_request",
                "code_challenge must be the base64url SHA-256 of the verifier (43 characters)",
            ));
        }
        (Some(_), Some(_) | None) => {
            return Err(fail(
                "invalid_request",
                "code_challenge_method must be S256; plain is not accepted",
            ));
        }
        (None, Some(_)) => {
            return Err(fail(
                "invalid_request",
                "code_challenge_method without code_challenge",
            ));
        }
        (None, None) if client.is_public() => {
            return Err(fail(
                "invalid_request",
                "PKCE with S256 is required for public clients",
            ));
        }
        (None, None) => None,
    };
    if p.nonce.as_ref().is_some_and(|n| n.len() > 255)
        || state.as_ref().is_some_and(|s| s.len() > 1024)
    {
        return Err(fail("invalid_request", "nonce or state too long"));
    }
    Ok(Valid {
        client,
        redirect_uri,
        scope,
        state,
        nonce: p.nonce.clone(),
        challenge,
    })
}

fn reject(sso: &Sso, brand: &Brand, r: Reject) -> Response {
    match r {
        Reject::Page(status, message) => {
            message_page(sso, brand, status, "Cannot sign in", &message)
        }
        Reject::Redirect(location) => see_other(&location),
        Reject::Store(e) => unavailable(sso, brand, "authorize", &e),
    }
}

/// Issues a code for `v` and redirects to the client.
async fn issue_code(
    sso: &Sso,
    site: &Site,
    v: &Valid,
    user_id: i64,
    sid: &str,
    auth_time: i64,
) -> Result<Response, redis::RedisError> {
    let code = secret();
    let record = CodeRecord {
        client_id: v.client.client_id.clone(),
        redirect_uri: v.redirect_uri.clone(),
        user_id,
        scope: v.scope.clone(),
        nonce: v.nonce.clone(),
        challenge: v.challenge.clone(),
        auth_time,
        sid: sid.to_owned(),
    };
    let value = serde_json::to_string(&record).unwrap_or_default();
    sso.redis()
        .set_ex::<_, _, ()>(
            sso.key(&format!("code:{}", digest(&code))),
            value,
            sso.settings().code_ttl.as_secs(),
        )
        .await?;
    let iss = site.issuer();
    let mut q = vec![("code", code.as_str()), ("iss", iss.as_str())];
    if let Some(s) = &v.state {
        q.push(("state", s));
    }
    Ok(see_other(&with_query(&v.redirect_uri, &q)))
}

/// The valid session of the cookie on this site, if any.
async fn current_session(sso: &Sso, site: &Site, headers: &HeaderMap) -> Option<Session> {
    let value = cookie(headers, COOKIE)?;
    let raw: Option<String> = sso
        .redis()
        .get(sso.key(&format!("session:{}", digest(&value))))
        .await
        .ok()?;
    let session: Session = serde_json::from_str(&raw?).ok()?;
    if session.tenant_id != site.tenant.id || sso.denied("sid", &session.sid).await.unwrap_or(true)
    {
        return None;
    }
    let user = store::user_by_id(sso.db(), site.tenant.id, session.user_id)
        .await
        .ok()??;
    user.active.then_some(session)
}

fn login_page(
    sso: &Sso,
    brand: &Brand,
    status: StatusCode,
    p: &AuthParams,
    client: &str,
    username: &str,
    error: Option<&str>,
) -> Response {
    page(
        status,
        sso.pages().render(
            "login.html",
            brand,
            context! { hidden => p.hidden(), username, error, client },
        ),
    )
}

async fn authorize_get(
    State(sso): State<Sso>,
    headers: HeaderMap,
    Query(p): Query<AuthParams>,
) -> Response {
    authorize_start(&sso, &headers, &p).await
}

/// An authorization request (a GET, or a POST from the client): a code at once for a live sign-in
/// session that is recent enough (`max_age`) unless `prompt=login`; `login_required` for
/// `prompt=none`; else the login form.
async fn authorize_start(sso: &Sso, headers: &HeaderMap, p: &AuthParams) -> Response {
    let Some(site) = sso.site(host(headers)) else {
        return unknown_site(sso);
    };
    let brand = Brand::of(&site);
    let v = match validate(sso, &site, p).await {
        Ok(v) => v,
        Err(r) => return reject(sso, &brand, r),
    };
    let prompt = p.prompt.as_deref().unwrap_or("");
    let max_age = match p.max_age.as_deref().map(str::parse::<i64>) {
        None => None,
        Some(Ok(n)) if n >= 0 => Some(n),
        Some(_) => {
            return see_other(&error_redirect(
                &site,
                &v.redirect_uri,
                "invalid_request",
                "max_age must be a number of seconds",
                v.state.as_deref(),
            ));
        }
    };
    if !prompt.split(' ').any(|x| x == "login")
        && let Some(s) = current_session(sso, &site, headers).await
        && max_age.is_none_or(|m| now_secs() - s.auth_time <= m)
    {
        return issue_code(sso, &site, &v, s.user_id, &s.sid, s.auth_time)
            .await
            .unwrap_or_else(|e| unavailable(sso, &brand, "code", &e));
    }
    if prompt.split(' ').any(|x| x == "none") {
        return see_other(&error_redirect(
            &site,
            &v.redirect_uri,
            "login_required",
            "no recent sign-in session",
            v.state.as_deref(),
        ));
    }
    login_page(sso, &brand, StatusCode::OK, p, &v.client.name, "", None)
}

/// Refuses a form posted from another site (login CSRF). `Sec-Fetch-Site` decides where the
/// browser sends it (every current browser does); else `Origin` must be this site's.
fn cross_site(headers: &HeaderMap, site: &Site) -> bool {
    let value = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    match value(header::HeaderName::from_static("sec-fetch-site")) {
        Some(fetch) => !matches!(fetch, "same-origin" | "none"),
        None => value(header::ORIGIN)
            .is_some_and(|o| o != format!("{}://{}", site.scheme.as_str(), site.authority)),
    }
}

async fn authorize_post(
    State(sso): State<Sso>,
    headers: HeaderMap,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    Form(form): Form<LoginForm>,
) -> Response {
    let (Some(username), Some(given)) = (form.username.as_deref(), form.password.as_deref()) else {
        return authorize_start(&sso, &headers, &form.params).await;
    };
    let Some(site) = sso.site(host(&headers)) else {
        return unknown_site(&sso);
    };
    let brand = Brand::of(&site);
    if cross_site(&headers, &site) {
        return message_page(
            &sso,
            &brand,
            StatusCode::FORBIDDEN,
            "Cannot sign in",
            "A sign-in form posted from another site is refused.",
        );
    }
    let v = match validate(&sso, &site, &form.params).await {
        Ok(v) => v,
        Err(r) => return reject(&sso, &brand, r),
    };
    let address = source_address(&headers, peer.as_ref().map(|e| &e.0));
    let username = username.trim();
    // Usernames are ASCII (invitations allow nothing else), so what the throttle counts and what
    // MySQL's case- and accent-insensitive comparison finds are the same account.
    let valid = store::check_username(username).is_ok();
    let attempt = sso.attempt(site.tenant.id, valid.then_some(username), &address);
    let fail = |status: StatusCode, text: &str| {
        login_page(
            &sso,
            &brand,
            status,
            &form.params,
            &v.client.name,
            username,
            Some(text),
        )
    };
    match sso.count_attempt(&attempt).await {
        Ok(Some(wait)) => {
            let minutes = (wait + 59) / 60;
            let text = format!(
                "Too many failed sign-in attempts. Try again in {minutes} minute{}.",
                if minutes == 1 { "" } else { "s" }
            );
            let mut resp = fail(StatusCode::TOO_MANY_REQUESTS, &text);
            if let Ok(v) = HeaderValue::from_str(&wait.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
            return resp;
        }
        Ok(None) => {}
        Err(e) => return unavailable(&sso, &brand, "throttle", &e),
    }
    let user = if valid {
        match store::user_by_name(sso.db(), site.tenant.id, username).await {
            Ok(u) => u,
            Err(e) => return unavailable(&sso, &brand, "users", &e),
        }
    } else {
        None
    };
    // The same argon2id work whether or not the user exists, is active, or has a password.
    let usable = user
        .as_ref()
        .filter(|u| u.active)
        .and_then(|u| u.password.clone());
    let phc = usable
        .clone()
        .unwrap_or_else(|| sso.dummy_hash().to_owned());
    let Some(slot) = sso.hashing_slot().await else {
        return unavailable(&sso, &brand, "hashing", &"every hashing slot busy");
    };
    let matches = password::verify_async(given.to_owned(), phc, slot).await;
    let user = match user {
        Some(u) if matches && usable.is_some() => u,
        _ => {
            tracing::info!(tenant = %site.name, address, "sign-in failed");
            return fail(StatusCode::UNAUTHORIZED, "Wrong username or password.");
        }
    };
    if let Err(e) = sso.succeeded(&attempt).await {
        return unavailable(&sso, &brand, "throttle", &e);
    }
    start_session(&sso, &site, &brand, &v, user.id).await
}

/// A new sign-in session for `user_id` (the `aigw_sso` cookie, host-only on this tenant's
/// domain), and the code for the client.
async fn start_session(sso: &Sso, site: &Site, brand: &Brand, v: &Valid, user_id: i64) -> Response {
    let cookie_value = secret();
    let session = Session {
        tenant_id: site.tenant.id,
        user_id,
        sid: super::random_id(),
        auth_time: now_secs(),
    };
    let ttl = sso.settings().session_ttl.as_secs();
    if let Err(e) = sso
        .redis()
        .set_ex::<_, _, ()>(
            sso.key(&format!("session:{}", digest(&cookie_value))),
            serde_json::to_string(&session).unwrap_or_default(),
            ttl,
        )
        .await
    {
        return unavailable(sso, brand, "session", &e);
    }
    tracing::info!(tenant = %site.name, user_id, client = %v.client.client_id, "signed in");
    let mut resp = match issue_code(sso, site, v, user_id, &session.sid, session.auth_time).await {
        Ok(r) => r,
        Err(e) => return unavailable(sso, brand, "code", &e),
    };
    set_session_cookie(&mut resp, site, &cookie_value, ttl);
    resp
}

/// Sets (or, with an empty value and age 0, clears) the host-only sign-in session cookie.
fn set_session_cookie(resp: &mut Response, site: &Site, value: &str, max_age: u64) {
    let secure = if site.scheme == super::Scheme::Https {
        "; Secure"
    } else {
        ""
    };
    if let Ok(c) = HeaderValue::from_str(&format!(
        "{COOKIE}={value}; Path=/oauth; HttpOnly; SameSite=Lax; Max-Age={max_age}{secure}"
    )) {
        resp.headers_mut().insert(header::SET_COOKIE, c);
    }
}

// ---------------------------------------------------------------------------------------------
// token

#[derive(Debug, Default, Deserialize)]
struct TokenForm {
    grant_type: Option<String>,
    code: Option<String>,
    redirect_uri: Option<String>,
    code_verifier: Option<String>,
    refresh_token: Option<String>,
    scope: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    // revocation
    token: Option<String>,
}

fn percent_decode(s: &str) -> String {
    serde_urlencoded::from_str::<Vec<(String, String)>>(&format!("v={s}"))
        .ok()
        .and_then(|v| v.into_iter().next())
        .map_or_else(|| s.to_owned(), |(_, v)| v)
}

/// Authenticates the client (RFC 6749 §2.3: HTTP Basic, or the form; a public client names
/// itself). Another tenant's client is as unknown as a missing one.
async fn authenticate(
    sso: &Sso,
    site: &Site,
    headers: &HeaderMap,
    form: &TokenForm,
) -> Result<Client, Response> {
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(s, _)| s.eq_ignore_ascii_case("basic"))
        .and_then(|(_, b)| STANDARD.decode(b.trim()).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| {
            s.split_once(':')
                .map(|(i, p)| (percent_decode(i), percent_decode(p)))
        });
    let (id, secret) = match basic {
        Some((i, p)) => (Some(i), Some(p)),
        None => (form.client_id.clone(), form.client_secret.clone()),
    };
    let invalid = || {
        oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "client authentication failed",
        )
    };
    let Some(id) = id else { return Err(invalid()) };
    let client = match store::client(sso.db(), site.tenant.id, &id).await {
        Ok(Some(c)) => c,
        Ok(None) => return Err(invalid()),
        Err(e) => {
            tracing::error!(error = %e, "clients unavailable");
            return Err(oauth_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                "try again",
            ));
        }
    };
    if !client.is_public() && !secret.as_deref().is_some_and(|s| client.secret_matches(s)) {
        return Err(invalid());
    }
    Ok(client)
}

/// The token and revocation endpoints' answer on a domain no tenant serves.
fn no_site_oauth() -> Response {
    oauth_error(
        StatusCode::NOT_FOUND,
        "invalid_request",
        "no tenant serves this domain",
    )
}

fn invalid_grant(description: &str) -> Response {
    oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", description)
}

fn store_error(e: &dyn std::fmt::Display) -> Response {
    tracing::error!(error = %e, "token store unavailable");
    oauth_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "temporarily_unavailable",
        "the token store is unavailable; try again",
    )
}

/// The token response for a grant: access token, the refresh token, an ID token when `openid`
/// was granted. The user must still be active; roles are read now, so a refresh carries the
/// roles of this moment.
async fn respond_tokens(
    sso: &Sso,
    site: &Site,
    client: &Client,
    r: &store::Refresh,
    nonce: Option<String>,
    refresh_token: String,
) -> Response {
    let user = match store::user_by_id(sso.db(), site.tenant.id, r.user_id).await {
        Ok(Some(u)) if u.active => u,
        Ok(_) => return invalid_grant("the account is disabled or gone"),
        Err(e) => return store_error(&e),
    };
    let roles = match store::roles(sso.db(), site.tenant.id, user.id).await {
        Ok(r) => r,
        Err(e) => return store_error(&e),
    };
    let grant = Grant {
        user_id: user.id,
        client_id: client.client_id.clone(),
        scope: r.scope.clone(),
        sid: r.sid.clone(),
        family: r.family.clone(),
        roles: roles.clone(),
    };
    let (access, claims) = match sso.mint_access(site, &grant) {
        Ok(t) => t,
        Err(e) => return store_error(&e),
    };
    let mut body = json!({
        "access_token": access,
        "token_type": "Bearer",
        "expires_in": secs(sso.settings().access_ttl),
        "refresh_token": refresh_token,
        "scope": r.scope,
    });
    if claims.has_scope("openid") {
        let id = IdClaims {
            iss: claims.iss.clone(),
            sub: claims.sub.clone(),
            aud: client.client_id.clone(),
            exp: claims.exp,
            iat: claims.iat,
            auth_time: r.auth_time,
            nonce,
            sid: r.sid.clone(),
            tenant: claims.tenant.clone(),
            roles,
            preferred_username: claims.has_scope("profile").then(|| user.username.clone()),
            email: if claims.has_scope("email") {
                user.email.clone()
            } else {
                None
            },
        };
        match sso.mint_id(&id) {
            Ok(t) => body["id_token"] = json!(t),
            Err(e) => return store_error(&e),
        }
    }
    json_no_store(body)
}

async fn token(
    State(sso): State<Sso>,
    headers: HeaderMap,
    Form(form): Form<TokenForm>,
) -> Response {
    let Some(site) = sso.site(host(&headers)) else {
        return no_site_oauth();
    };
    let client = match authenticate(&sso, &site, &headers, &form).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    match form.grant_type.as_deref() {
        Some("authorization_code") => code_grant(&sso, &site, &client, &form).await,
        Some("refresh_token") => refresh_grant(&sso, &site, &client, &form).await,
        _ => oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "authorization_code or refresh_token",
        ),
    }
}

async fn code_grant(sso: &Sso, site: &Site, client: &Client, form: &TokenForm) -> Response {
    let Some(code) = form.code.as_deref() else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "code is required",
        );
    };
    let code_key = sso.key(&format!("code:{}", digest(code)));
    let used_key = sso.key(&format!("code-used:{}", digest(code)));
    let raw: Option<String> = match redis::cmd("GETDEL")
        .arg(&code_key)
        .query_async(&mut sso.redis())
        .await
    {
        Ok(v) => v,
        Err(e) => return store_error(&e),
    };
    let Some(record) = raw.and_then(|r| serde_json::from_str::<CodeRecord>(&r).ok()) else {
        // A code presented twice: whatever the first exchange issued is revoked (RFC 6749 §4.1.2).
        if let Ok(Some(family)) = sso.redis().get::<_, Option<String>>(&used_key).await {
            tracing::warn!(tenant = %site.name, family, "authorization code reused; its tokens are revoked");
            let _ = sso.deny("fam", &family).await;
            if let Err(e) = store::revoke_family(sso.db(), &family).await {
                tracing::error!(error = %e, family, "reused code: family not revoked in MySQL (the deny-list still refuses it)");
            }
        }
        return invalid_grant("the code is unknown, expired or already used");
    };
    if record.client_id != client.client_id
        || form.redirect_uri.as_deref() != Some(record.redirect_uri.as_str())
    {
        return invalid_grant("the code was issued to another client or redirect URI");
    }
    match (&record.challenge, form.code_verifier.as_deref()) {
        (Some(challenge), Some(verifier)) => {
            let ok_form = (43..=128).contains(&verifier.len())
                && verifier
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'));
            if !ok_form || URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes())) != *challenge
            {
                return invalid_grant("code_verifier does not match the code_challenge");
            }
        }
        (Some(_), None) => return invalid_grant("code_verifier is required"),
        (None, Some(_)) => return invalid_grant("no code_challenge was sent for this code"),
        (None, None) => {}
    }
    let r = store::Refresh {
        family: store::new_family(),
        sid: record.sid.clone(),
        tenant_id: site.tenant.id,
        user_id: record.user_id,
        client_id: client.client_id.clone(),
        scope: record.scope.clone(),
        auth_time: record.auth_time,
    };
    if sso.denied("sid", &r.sid).await.unwrap_or(true) {
        return invalid_grant("the sign-in session has ended");
    }
    let refresh = match store::issue_refresh(sso.db(), &r, secs(sso.settings().refresh_ttl)).await {
        Ok(t) => t,
        Err(e) => return store_error(&e),
    };
    // Only now that the family exists can a reuse of this code revoke it; and a logout that ran
    // between the check above and the insert is caught by the check below.
    if let Err(e) = sso
        .redis()
        .set_ex::<_, _, ()>(&used_key, &r.family, 600)
        .await
    {
        return store_error(&e);
    }
    if sso.denied("sid", &r.sid).await.unwrap_or(true) {
        let _ = store::revoke_session(sso.db(), site.tenant.id, &r.sid).await;
        return invalid_grant("the sign-in session has ended");
    }
    respond_tokens(sso, site, client, &r, record.nonce, refresh).await
}

async fn refresh_grant(sso: &Sso, site: &Site, client: &Client, form: &TokenForm) -> Response {
    let Some(token) = form.refresh_token.as_deref() else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "refresh_token is required",
        );
    };
    let (mut r, new) = match store::rotate_refresh(
        sso.db(),
        token,
        site.tenant.id,
        &client.client_id,
    )
    .await
    {
        Ok(Rotation::Rotated { refresh, token }) => (refresh, token),
        Ok(Rotation::Reused { family }) => {
            tracing::warn!(tenant = %site.name, family, "refresh token reused; its family is revoked");
            if let Err(e) = sso.deny("fam", &family).await {
                return store_error(&e);
            }
            return invalid_grant(
                "the refresh token was already used; every token of its grant is now revoked",
            );
        }
        Ok(Rotation::Invalid) => {
            return invalid_grant("the refresh token is unknown, expired or revoked");
        }
        Err(e) => return store_error(&e),
    };
    if sso.denied("sid", &r.sid).await.unwrap_or(true)
        || sso.denied("fam", &r.family).await.unwrap_or(true)
    {
        return invalid_grant("the sign-in session has ended");
    }
    if let Some(asked) = form.scope.as_deref() {
        let granted: Vec<&str> = r.scope.split(' ').collect();
        if asked.split_whitespace().any(|s| !granted.contains(&s)) {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_scope",
                "a refresh cannot widen the scope",
            );
        }
        r.scope = asked.split_whitespace().collect::<Vec<_>>().join(" ");
    }
    respond_tokens(sso, site, client, &r, None, new).await
}

// ---------------------------------------------------------------------------------------------
// userinfo, revocation, logout

fn bearer_error(status: StatusCode, error: &str, description: &str) -> Response {
    let mut resp = (
        status,
        Json(json!({"error": error, "error_description": description})),
    )
        .into_response();
    let value = format!(
        "Bearer error=\"{error}\", error_description=\"{}\"",
        description.replace('"', "'")
    );
    if let Ok(v) = HeaderValue::from_str(&value) {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    resp
}

fn auth_failure(e: &AuthError) -> Response {
    match e {
        AuthError::Unavailable => bearer_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            &e.to_string(),
        ),
        _ => bearer_error(StatusCode::UNAUTHORIZED, "invalid_token", &e.to_string()),
    }
}

async fn userinfo(State(sso): State<Sso>, headers: HeaderMap) -> Response {
    let Some(site) = sso.site(host(&headers)) else {
        return bearer_error(
            StatusCode::NOT_FOUND,
            "invalid_request",
            "no tenant serves this domain",
        );
    };
    let Some(token) = bearer(&headers) else {
        return auth_failure(&AuthError::Missing);
    };
    let claims = match sso.verify_access(&site, token).await {
        Ok(c) => c,
        Err(e) => return auth_failure(&e),
    };
    if !claims.has_scope("openid") {
        return bearer_error(
            StatusCode::FORBIDDEN,
            "insufficient_scope",
            "userinfo needs the openid scope",
        );
    }
    let user =
        match store::user_by_id(sso.db(), site.tenant.id, claims.user_id().unwrap_or(0)).await {
            Ok(Some(u)) if u.active => u,
            Ok(_) => return auth_failure(&AuthError::Revoked),
            Err(e) => return store_error(&e),
        };
    let mut body = json!({"sub": claims.sub, "tenant": claims.tenant, "roles": claims.roles});
    if claims.has_scope("profile") {
        body["preferred_username"] = json!(user.username);
    }
    if claims.has_scope("email")
        && let Some(email) = &user.email
    {
        body["email"] = json!(email);
    }
    json_no_store(body)
}

async fn revoke(
    State(sso): State<Sso>,
    headers: HeaderMap,
    Form(form): Form<TokenForm>,
) -> Response {
    let Some(site) = sso.site(host(&headers)) else {
        return no_site_oauth();
    };
    let client = match authenticate(&sso, &site, &headers, &form).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let Some(token) = form.token.as_deref() else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "token is required",
        );
    };
    // RFC 7009: an invalid or unknown token is not an error; only the client's own tokens go.
    if token.matches('.').count() == 2 {
        if let Ok(claims) = sso.decode_access_ignoring_expiry(&site, token)
            && claims.client_id == client.client_id
            && let Err(e) = sso.deny("jti", &claims.jti).await
        {
            return store_error(&e);
        }
    } else {
        match store::revoke_refresh(sso.db(), token, site.tenant.id, &client.client_id).await {
            Ok(Some(family)) => {
                if let Err(e) = sso.deny("fam", &family).await {
                    return store_error(&e);
                }
            }
            Ok(None) => {}
            Err(e) => return store_error(&e),
        }
    }
    let mut resp = StatusCode::OK.into_response();
    no_store(resp.headers_mut());
    resp
}

#[derive(Debug, Default, Deserialize)]
struct LogoutParams {
    id_token_hint: Option<String>,
    post_logout_redirect_uri: Option<String>,
    state: Option<String>,
    client_id: Option<String>,
}

async fn logout_get(
    State(sso): State<Sso>,
    headers: HeaderMap,
    Query(p): Query<LogoutParams>,
) -> Response {
    logout(sso, headers, p).await
}

async fn logout_post(
    State(sso): State<Sso>,
    headers: HeaderMap,
    Form(p): Form<LogoutParams>,
) -> Response {
    logout(sso, headers, p).await
}

/// Ends the sign-in session of the cookie and of the `id_token_hint`: every token of the
/// session is deny-listed and its refresh families revoked.
async fn logout(sso: Sso, headers: HeaderMap, p: LogoutParams) -> Response {
    let Some(site) = sso.site(host(&headers)) else {
        return unknown_site(&sso);
    };
    let brand = Brand::of(&site);
    let mut sids = Vec::new();
    // Every session cookie sent ends (one planted beside the real one must not shield it).
    for value in cookies(&headers, COOKIE) {
        let key = sso.key(&format!("session:{}", digest(&value)));
        let raw: Option<String> = redis::cmd("GETDEL")
            .arg(&key)
            .query_async(&mut sso.redis())
            .await
            .unwrap_or(None);
        if let Some(s) = raw.and_then(|r| serde_json::from_str::<Session>(&r).ok())
            && s.tenant_id == site.tenant.id
        {
            sids.push(s.sid);
        }
    }
    let hint = p
        .id_token_hint
        .as_deref()
        .and_then(|t| sso.verify_id_hint(&site, t).ok());
    if let Some(h) = &hint {
        sids.push(h.sid.clone());
    }
    for sid in &sids {
        if let Err(e) = sso.deny("sid", sid).await {
            return unavailable(&sso, &brand, "logout", &e);
        }
        if let Err(e) = store::revoke_session(sso.db(), site.tenant.id, sid).await {
            return unavailable(&sso, &brand, "logout", &e);
        }
    }
    tracing::info!(tenant = %site.name, sessions = sids.len(), "signed out");
    let client_id = hint.as_ref().map(|h| h.aud.clone()).or(p.client_id.clone());
    let mut resp = None;
    if let (Some(uri), Some(id)) = (p.post_logout_redirect_uri.as_deref(), client_id.as_deref())
        && let Ok(Some(client)) = store::client(sso.db(), site.tenant.id, id).await
        && client.post_logout_redirect_uris.iter().any(|u| u == uri)
    {
        let q: Vec<(&str, &str)> = p
            .state
            .as_deref()
            .map(|s| ("state", s))
            .into_iter()
            .collect();
        resp = Some(see_other(&if q.is_empty() {
            uri.to_owned()
        } else {
            with_query(uri, &q)
        }));
    }
    let mut resp = resp.unwrap_or_else(|| {
        message_page(
            &sso,
            &brand,
            StatusCode::OK,
            "Signed out",
            "You are signed out.",
        )
    });
    set_session_cookie(&mut resp, &site, "", 0);
    resp
}

// ---------------------------------------------------------------------------------------------
// invitations

#[derive(Debug, Deserialize)]
struct InviteQuery {
    #[serde(default)]
    token: String,
}

#[derive(Debug, Deserialize)]
struct InviteForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    confirm: String,
}

fn gone(sso: &Sso, brand: &Brand) -> Response {
    message_page(
        sso,
        brand,
        StatusCode::GONE,
        "Invitation not valid",
        &store::AcceptError::Gone.to_string(),
    )
}

async fn invite_get(
    State(sso): State<Sso>,
    headers: HeaderMap,
    Query(q): Query<InviteQuery>,
) -> Response {
    let Some(site) = sso.site(host(&headers)) else {
        return unknown_site(&sso);
    };
    let brand = Brand::of(&site);
    match store::invitation(sso.db(), site.tenant.id, &q.token).await {
        Ok(Some(inv)) => page(
            StatusCode::OK,
            sso.pages().render(
                "invite.html",
                &brand,
                context! { username => inv.username, token => q.token, min_len => password::MIN_LEN },
            ),
        ),
        Ok(None) => gone(&sso, &brand),
        Err(e) => unavailable(&sso, &brand, "invitations", &e),
    }
}

async fn invite_post(
    State(sso): State<Sso>,
    headers: HeaderMap,
    Form(f): Form<InviteForm>,
) -> Response {
    let Some(site) = sso.site(host(&headers)) else {
        return unknown_site(&sso);
    };
    let brand = Brand::of(&site);
    if cross_site(&headers, &site) {
        return message_page(
            &sso,
            &brand,
            StatusCode::FORBIDDEN,
            "Invitation not accepted",
            "A form posted from another site is refused.",
        );
    }
    let inv = match store::invitation(sso.db(), site.tenant.id, &f.token).await {
        Ok(Some(inv)) => inv,
        Ok(None) => return gone(&sso, &brand),
        Err(e) => return unavailable(&sso, &brand, "invitations", &e),
    };
    let problem = if f.password == f.confirm {
        password::check_policy(&f.password).err()
    } else {
        Some("The two passwords differ.".to_owned())
    };
    if let Some(error) = problem {
        return page(
            StatusCode::BAD_REQUEST,
            sso.pages().render(
                "invite.html",
                &brand,
                context! { username => inv.username, token => f.token, min_len => password::MIN_LEN, error },
            ),
        );
    }
    let Some(slot) = sso.hashing_slot().await else {
        return unavailable(&sso, &brand, "hashing", &"every hashing slot busy");
    };
    let phc = match password::hash_async(f.password, slot).await {
        Ok(h) => h,
        Err(e) => return unavailable(&sso, &brand, "hash", &e),
    };
    match store::accept_invitation(sso.db(), site.tenant.id, &f.token, &phc).await {
        Ok((user_id, inv)) => {
            tracing::info!(tenant = %site.name, user_id, username = %inv.username, roles = ?inv.roles, "invitation accepted");
            message_page(
                &sso,
                &brand,
                StatusCode::OK,
                "Account ready",
                &format!(
                    "Your account {} is ready. You can now sign in.",
                    inv.username
                ),
            )
        }
        Err(store::AcceptError::Db(e)) => unavailable(&sso, &brand, "accept", &e),
        Err(e) => message_page(
            &sso,
            &brand,
            StatusCode::CONFLICT,
            "Invitation not accepted",
            &e.to_string(),
        ),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewInvitation {
    username: String,
    email: String,
    roles: Vec<String>,
}

/// The invitation in `body`, checked against the tenant type and the inviter's roles.
fn check_invitation(
    site: &Site,
    claims: &super::AccessClaims,
    body: &[u8],
) -> Result<(NewInvitation, Vec<Role>), Box<Response>> {
    let req: NewInvitation = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return Err(Box::new(problem(
                StatusCode::BAD_REQUEST,
                "Invalid body",
                &format!("expected {{\"username\", \"email\", \"roles\"}}: {e}"),
            )));
        }
    };
    let granted: Result<Vec<Role>, String> = req.roles.iter().map(|r| r.parse()).collect();
    let granted = granted.map(|mut g| {
        g.sort();
        g.dedup();
        g
    });
    let granted = match granted {
        Ok(g) if !g.is_empty() => g,
        Ok(_) => {
            return Err(Box::new(problem(
                StatusCode::BAD_REQUEST,
                "Invalid roles",
                "at least one role",
            )));
        }
        Err(e) => {
            return Err(Box::new(problem(
                StatusCode::BAD_REQUEST,
                "Invalid roles",
                &e,
            )));
        }
    };
    if let Err(e) =
        store::check_username(&req.username).and_then(|()| store::check_email(&req.email))
    {
        return Err(Box::new(problem(
            StatusCode::BAD_REQUEST,
            "Invalid invitation",
            &e,
        )));
    }
    if let Err(e) = roles::check_available(site.kind(), &granted) {
        return Err(Box::new(problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Role not available",
            &e,
        )));
    }
    if let Some(r) = granted
        .iter()
        .find(|g| !claims.roles.iter().any(|mine| mine.may_invite(**g)))
    {
        return Err(Box::new(problem(
            StatusCode::FORBIDDEN,
            "Forbidden",
            &format!("your roles may not invite someone as {r}"),
        )));
    }
    Ok((req, granted))
}

/// Whether `username` may be invited in the site's tenant: no user and no pending invitation
/// of that name, and — for a sales person's invitation — no token naming it as owner.
async fn check_name_free(
    sso: &Sso,
    site: &Site,
    username: &str,
    by_sales: bool,
) -> Result<(), Box<Response>> {
    // A sales person's invitee becomes their customer, with the usage of every token naming that
    // username as owner: such a name is for an owner or operator to invite.
    if by_sales {
        match store::tokens_owned_by(sso.db(), site.tenant.id, username).await {
            Ok(0) => {}
            Ok(_) => {
                return Err(Box::new(problem(
                    StatusCode::CONFLICT,
                    "Username owns tokens",
                    &format!(
                        "tokens of this tenant name {username:?} as their owner; an owner or operator must invite them"
                    ),
                )));
            }
            Err(e) => return Err(Box::new(unavailable_problem(&e))),
        }
    }
    match store::username_pending(sso.db(), site.tenant.id, username).await {
        Ok(true) => {
            return Err(Box::new(problem(
                StatusCode::CONFLICT,
                "Invitation pending",
                &format!("{username:?} has a pending invitation in this tenant"),
            )));
        }
        Ok(false) => {}
        Err(e) => return Err(Box::new(unavailable_problem(&e))),
    }
    match store::user_by_name(sso.db(), site.tenant.id, username).await {
        Ok(Some(_)) => {
            return Err(Box::new(problem(
                StatusCode::CONFLICT,
                "Username taken",
                &format!("{username:?} already exists in this tenant"),
            )));
        }
        Ok(None) => {}
        Err(e) => return Err(Box::new(unavailable_problem(&e))),
    }
    Ok(())
}

async fn create_invitation(
    State(sso): State<Sso>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let Some(site) = sso.site(host(&headers)) else {
        return problem(
            StatusCode::NOT_FOUND,
            "Unknown site",
            "No tenant serves this domain.",
        );
    };
    let Some(token) = bearer(&headers) else {
        return problem(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "a bearer token of this site is required",
        );
    };
    let claims = match sso.verify_access(&site, token).await {
        Ok(c) => c,
        Err(AuthError::Unavailable) => {
            return problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "Unavailable",
                "the token store is unavailable",
            );
        }
        Err(e) => return problem(StatusCode::UNAUTHORIZED, "Unauthorized", &e.to_string()),
    };
    let (req, granted) = match check_invitation(&site, &claims, &body) {
        Ok(x) => x,
        Err(resp) => return *resp,
    };
    let Some(me) = claims.user_id() else {
        return problem(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "the token names no user",
        );
    };
    // A sales person's invitee is their customer, unless an owner or operator invites.
    let sales_id = (!claims
        .roles
        .iter()
        .any(|r| matches!(r, Role::Owner | Role::Operator)))
    .then_some(me);
    if let Err(resp) = check_name_free(&sso, &site, &req.username, sales_id.is_some()).await {
        return *resp;
    }
    let inv = store::Invitation {
        tenant_id: site.tenant.id,
        email: req.email.clone(),
        username: req.username.clone(),
        roles: granted,
        sales_id,
    };
    let secret =
        match store::create_invitation(sso.db(), &inv, Some(me), secs(sso.settings().invite_ttl))
            .await
        {
            Ok(s) => s,
            Err(e) => return unavailable_problem(&e),
        };
    tracing::info!(actor = me, tenant = %site.name, action = "invite", object = %inv.username, roles = ?inv.roles, "audit");
    if let Err(e) = super::mail::send_invitation(
        sso.mailer(),
        &site.issuer(),
        &site.tenant.display_name,
        &inv,
        &secret,
        sso.settings().invite_ttl,
    )
    .await
    {
        tracing::error!(error = %e, "invitation mail not sent");
        return problem(
            StatusCode::BAD_GATEWAY,
            "Mail not sent",
            "the invitation was created but its mail could not be sent; invite again later",
        );
    }
    let roles: Vec<&str> = inv.roles.iter().map(|r| r.as_str()).collect();
    (
        StatusCode::CREATED,
        Json(json!({"username": inv.username, "email": inv.email, "roles": roles, "expiresInSeconds": secs(sso.settings().invite_ttl)})),
    )
        .into_response()
}
