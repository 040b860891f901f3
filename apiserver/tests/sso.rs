//! The platform's OpenID Connect provider against a client library nobody here wrote
//! (`openidconnect`): discovery, authorization code with PKCE, token, ID-token validation with our
//! JWKS, userinfo, refresh and revocation, on two tenant domains; and every way it must say no.
//! The sign-in form is posted as a browser without JavaScript would (`idp::sign_in`); the real
//! browser is in `sso_browser.rs`.

// Test code: a failed unwrap is a failed test with its message.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines
)]

mod idp;

use std::time::{Duration, Instant};

use aigw_apiserver::sso::{self, Role, jwt::Grant};
use idp::{Idp, T, param, payload, sign_in};
use openidconnect::{
    AccessToken, AuthorizationCode, ClientId, ClientSecret, CsrfToken, IssuerUrl, Nonce,
    OAuth2TokenResponse, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, RevocationUrl, Scope,
    TokenResponse,
    core::{
        CoreAuthenticationFlow, CoreClient, CoreJwsSigningAlgorithm, CoreProviderMetadata,
        CoreRevocableToken, CoreUserInfoClaims,
    },
};
use serde_json::{Value, json};

const REDIRECT: &str = "https://portal.example.com/callback";
const PASSWORD: &str = "correct horse battery staple";

type Client = openidconnect::Client<
    openidconnect::EmptyAdditionalClaims,
    openidconnect::core::CoreAuthDisplay,
    openidconnect::core::CoreGenderClaim,
    openidconnect::core::CoreJweContentEncryptionAlgorithm,
    openidconnect::core::CoreJsonWebKey,
    openidconnect::core::CoreAuthPrompt,
    openidconnect::StandardErrorResponse<openidconnect::core::CoreErrorResponseType>,
    openidconnect::core::CoreTokenResponse,
    openidconnect::core::CoreTokenIntrospectionResponse,
    CoreRevocableToken,
    openidconnect::core::CoreRevocationErrorResponse,
    openidconnect::EndpointSet,
    openidconnect::EndpointNotSet,
    openidconnect::EndpointNotSet,
    openidconnect::EndpointSet,
    openidconnect::EndpointMaybeSet,
    openidconnect::EndpointMaybeSet,
>;

/// Discovery through the library, for `client_id` of `t`.
async fn discover(
    idp: &Idp,
    http: &reqwest::Client,
    t: &T,
    client_id: &str,
    secret: Option<&str>,
) -> Client {
    let issuer = IssuerUrl::new(idp.issuer(t)).unwrap();
    let meta = CoreProviderMetadata::discover_async(issuer, http)
        .await
        .unwrap();
    CoreClient::from_provider_metadata(
        meta,
        ClientId::new(client_id.to_owned()),
        secret.map(|s| ClientSecret::new(s.to_owned())),
    )
    .set_redirect_uri(RedirectUrl::new(REDIRECT.to_owned()).unwrap())
    .set_revocation_url(RevocationUrl::new(format!("{}/revoke", idp.issuer(t))).unwrap())
}

/// The authorize URL with PKCE S256 and a nonce, as the library builds it.
fn authorize(client: &Client) -> (String, CsrfToken, Nonce, PkceCodeVerifier) {
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let (url, state, nonce) = client
        .authorize_url(
            CoreAuthenticationFlow::AuthorizationCode,
            CsrfToken::new_random,
            Nonce::new_random,
        )
        .add_scope(Scope::new("profile".into()))
        .add_scope(Scope::new("email".into()))
        .set_pkce_challenge(challenge)
        .url();
    (url.to_string(), state, nonce, verifier)
}

/// Signs in and returns the code (checking the state came back).
async fn code_for(http: &reqwest::Client, url: &str, state: &CsrfToken, user: &str) -> String {
    let (status, location, body) = sign_in(http, url, user, PASSWORD).await;
    assert_eq!(status, 303, "{body}");
    let location = location.unwrap();
    assert!(location.starts_with(REDIRECT), "{location}");
    assert_eq!(
        param(&location, "state").as_deref(),
        Some(state.secret().as_str())
    );
    param(&location, "code").unwrap()
}

async fn userinfo_status(http: &reqwest::Client, idp: &Idp, t: &T, token: &str) -> u16 {
    http.get(format!("{}/userinfo", idp.issuer(t)))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn token_call(
    http: &reqwest::Client,
    idp: &Idp,
    t: &T,
    form: &[(&str, &str)],
) -> (u16, Value) {
    let r = http
        .post(format!("{}/token", idp.issuer(t)))
        .form(form)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_real_oidc_client_signs_in_on_two_tenant_domains() {
    let idp = Idp::start(|_| {}).await;
    let a = idp
        .tenant(
            "sso-a",
            "reseller",
            "Acme AI",
            json!({"themeColor": "#aa3300"}),
        )
        .await;
    let b = idp
        .tenant("sso-b", "platform", "Platform", json!(null))
        .await;
    let alice = idp.user(&a, "alice", PASSWORD, &["owner", "finance"]).await;
    let bob = idp.user(&b, "bob", PASSWORD, &["tech"]).await;
    let (a_client, _) = idp.client(&a, REDIRECT, false).await;
    let (b_client, b_secret) = idp.client(&b, REDIRECT, true).await;
    let http = idp.http(&[&a, &b]);

    for (t, client_id, secret, user, user_id, roles) in [
        (
            &a,
            &a_client,
            None,
            "alice",
            alice,
            json!(["owner", "finance"]),
        ),
        (
            &b,
            &b_client,
            b_secret.as_deref(),
            "bob",
            bob,
            json!(["tech"]),
        ),
    ] {
        let client = discover(&idp, &http, t, client_id, secret).await;
        let (url, state, nonce, verifier) = authorize(&client);
        let code = code_for(&http, &url, &state, user).await;
        let tokens = client
            .exchange_code(AuthorizationCode::new(code))
            .unwrap()
            .set_pkce_verifier(verifier)
            .request_async(&http)
            .await
            .unwrap();
        // The library validates the ID token: signature with our JWKS, issuer, audience, expiry,
        // nonce.
        let id_token = tokens.id_token().unwrap();
        let verifier = client
            .id_token_verifier()
            .set_allowed_algs([CoreJwsSigningAlgorithm::EdDsa]);
        let claims = id_token.claims(&verifier, &nonce).unwrap();
        assert_eq!(claims.subject().as_str(), user_id.to_string());
        assert_eq!(claims.issuer().as_str(), idp.issuer(t));
        assert_eq!(claims.preferred_username().unwrap().as_str(), user);
        let raw = payload(&id_token.to_string());
        assert_eq!(raw["tenant"], json!({"id": t.id, "name": t.name}));
        let mut got: Vec<Value> = raw["roles"].as_array().unwrap().clone();
        got.sort_by_key(ToString::to_string);
        let mut want = roles.as_array().unwrap().clone();
        want.sort_by_key(ToString::to_string);
        assert_eq!(got, want);
        // The access token carries the same tenant and roles, lives 10 minutes.
        let access = payload(tokens.access_token().secret());
        assert_eq!(access["tenant"]["id"], t.id);
        assert_eq!(
            access["exp"].as_i64().unwrap() - access["iat"].as_i64().unwrap(),
            600
        );

        let info: CoreUserInfoClaims = client
            .user_info(tokens.access_token().clone(), None)
            .unwrap()
            .request_async(&http)
            .await
            .unwrap();
        assert_eq!(info.subject().as_str(), user_id.to_string());
        assert_eq!(
            info.email().unwrap().as_str(),
            format!("{user}@example.com")
        );

        // Refresh: new tokens; the old refresh token is used up.
        let first_refresh = tokens.refresh_token().unwrap().clone();
        let refreshed = client
            .exchange_refresh_token(&first_refresh)
            .unwrap()
            .request_async(&http)
            .await
            .unwrap();
        assert_ne!(
            refreshed.access_token().secret(),
            tokens.access_token().secret()
        );
        let second_refresh = refreshed.refresh_token().unwrap().clone();
        assert_ne!(second_refresh.secret(), first_refresh.secret());

        // Revocation of the current refresh token ends the grant: it no longer refreshes, and
        // the access tokens of its family are refused.
        client
            .revoke_token(CoreRevocableToken::from(second_refresh.clone()))
            .unwrap()
            .request_async(&http)
            .await
            .unwrap();
        assert!(
            client
                .exchange_refresh_token(&second_refresh)
                .unwrap()
                .request_async(&http)
                .await
                .is_err()
        );
        assert_eq!(
            userinfo_status(&http, &idp, t, refreshed.access_token().secret()).await,
            401
        );
    }

    // A's token on B's domain, and B's on A's: refused (another issuer).
    let client = discover(&idp, &http, &a, &a_client, None).await;
    let (url, state, _, verifier) = authorize(&client);
    let code = code_for(&http, &url, &state, "alice").await;
    let tokens = client
        .exchange_code(AuthorizationCode::new(code))
        .unwrap()
        .set_pkce_verifier(verifier)
        .request_async(&http)
        .await
        .unwrap();
    let at = tokens.access_token().secret();
    assert_eq!(userinfo_status(&http, &idp, &a, at).await, 200);
    assert_eq!(userinfo_status(&http, &idp, &b, at).await, 401);
    // A's user does not exist on B's domain; A's client is unknown there.
    let b_client_lib = discover(&idp, &http, &b, &b_client, b_secret.as_deref()).await;
    let (url, _, _, _) = authorize(&b_client_lib);
    let (status, _, body) = sign_in(&idp.http(&[&a, &b]), &url, "alice", PASSWORD).await;
    assert_eq!(status, 401, "{body}");
    assert!(!body.contains("Acme AI"), "B's page shows nothing of A");
    let url_a_client_on_b = url.replace(&b_client, &a_client);
    let (status, _, body) = sign_in(&http, &url_a_client_on_b, "bob", PASSWORD).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("not registered on this site"), "{body}");

    // The JWKS is the library's key source; it has our one Ed25519 key.
    let jwks: Value = http
        .get(format!("{}/jwks", idp.issuer(&a)))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(jwks["keys"][0]["kty"], "OKP");
    assert_eq!(jwks["keys"][0]["crv"], "Ed25519");
    // An unknown domain gets no discovery document.
    let stranger = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&idp.ca).unwrap())
        .resolve("nobody.sso.test", idp.addr)
        .build()
        .unwrap();
    let r = stranger
        .get(format!(
            "https://nobody.sso.test:{}/oauth/.well-known/openid-configuration",
            idp.addr.port()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    idp.cleanup().await;
}

#[tokio::test]
async fn requests_that_must_be_refused() {
    let idp = Idp::start(|_| {}).await;
    let a = idp
        .tenant("sso-neg", "reseller", "Acme AI", json!(null))
        .await;
    let b = idp
        .tenant("sso-neg-b", "reseller", "Beta", json!(null))
        .await;
    let carol = idp.user(&a, "carol", PASSWORD, &["owner"]).await;
    let (public, _) = idp.client(&a, REDIRECT, false).await;
    let (confidential, secret) = idp.client(&a, REDIRECT, true).await;
    let http = idp.http(&[&a, &b]);
    let iss = idp.issuer(&a);
    let client = discover(&idp, &http, &a, &public, None).await;

    // Wrong redirect URI: a page, never a redirect to the stranger's URI.
    let (url, _, _, _) = authorize(&client);
    let evil = url.replace(
        &urlencode(REDIRECT),
        &urlencode("https://evil.example.com/callback"),
    );
    assert_ne!(evil, url);
    let r = http.get(&evil).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert!(r.headers().get("location").is_none());
    assert!(r.text().await.unwrap().contains("redirect URI"));
    // A prefix of a registered URI is not it.
    let longer = url.replace(&urlencode(REDIRECT), &urlencode(&format!("{REDIRECT}/x")));
    assert_eq!(
        http.get(&longer).send().await.unwrap().status().as_u16(),
        400
    );

    // Missing PKCE for a public client, and `plain`: errors sent back to the client.
    let no_pkce = format!(
        "{iss}/authorize?response_type=code&client_id={public}&redirect_uri={}&scope=openid&state=s1",
        urlencode(REDIRECT)
    );
    let r = http.get(&no_pkce).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 303);
    let loc = r.headers()["location"].to_str().unwrap().to_owned();
    assert_eq!(param(&loc, "error").as_deref(), Some("invalid_request"));
    assert_eq!(param(&loc, "state").as_deref(), Some("s1"));
    assert_eq!(
        param(&loc, "iss").as_deref(),
        Some(iss.as_str()),
        "RFC 9207: errors carry iss"
    );
    let plain = format!(
        "{no_pkce}&code_challenge={}&code_challenge_method=plain",
        "a".repeat(43)
    );
    let loc = http.get(&plain).send().await.unwrap().headers()["location"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        param(&loc, "error_description").unwrap().contains("plain"),
        "{loc}"
    );
    let implicit = no_pkce.replace("response_type=code", "response_type=token");
    let loc = http.get(&implicit).send().await.unwrap().headers()["location"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        param(&loc, "error").as_deref(),
        Some("unsupported_response_type")
    );

    // An authorization request a client POSTs is an authorization request, not a failed login.
    let (url, _, _, _) = authorize(&client);
    let query = openidconnect::url::Url::parse(&url)
        .unwrap()
        .query()
        .unwrap()
        .to_owned();
    let r = http
        .post(format!("{iss}/authorize"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(query)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.text().await.unwrap().contains("id=\"sign-in\""));
    // A login form posted from another site is refused before any password check.
    let page = http.get(&url).send().await.unwrap().text().await.unwrap();
    let mut form = idp::hidden_fields(&page);
    form.push(("username".into(), "carol".into()));
    form.push(("password".into(), PASSWORD.into()));
    for (name, value) in [
        ("origin", "https://evil.example.com"),
        ("origin", "null"),
        ("sec-fetch-site", "cross-site"),
    ] {
        let r = http
            .post(format!("{iss}/authorize"))
            .header(name, value)
            .form(&form)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 403, "{name}: {value}");
    }
    // From the site itself (`Origin` of our own pages, no `Sec-Fetch-Site`, as browsers on
    // plain http send it) the form signs in; the pages keep that `Origin` by their referrer policy.
    assert_eq!(
        http.get(&url).send().await.unwrap().headers()["referrer-policy"],
        "same-origin"
    );
    let own = format!("https://{}:{}", a.domain, idp.addr.port());
    let r = idp
        .http(&[&a])
        .post(format!("{iss}/authorize"))
        .header("origin", own)
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 303);
    // The Host as clients may send it: any case, a trailing dot, the scheme's default port.
    let odd = format!("{}.:443", a.domain.to_uppercase());
    assert_eq!(
        idp.sso.site(&odd).unwrap().issuer(),
        format!("https://{}/oauth", a.domain)
    );
    assert!(idp.sso.site(&format!("{}:notaport", a.domain)).is_none());

    // Code reuse: the second exchange fails and revokes what the first issued.
    let (url, state, _, verifier) = authorize(&client);
    let code = code_for(&http, &url, &state, "carol").await;
    let verifier = verifier.secret().clone();
    let form = [
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("redirect_uri", REDIRECT),
        ("client_id", public.as_str()),
        ("code_verifier", verifier.as_str()),
    ];
    let (status, first) = token_call(&http, &idp, &a, &form).await;
    assert_eq!(status, 200, "{first}");
    let (status, second) = token_call(&http, &idp, &a, &form).await;
    assert_eq!(
        (status, second["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    assert_eq!(
        userinfo_status(&http, &idp, &a, first["access_token"].as_str().unwrap()).await,
        401
    );
    let (status, _) = token_call(
        &http,
        &idp,
        &a,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", first["refresh_token"].as_str().unwrap()),
            ("client_id", public.as_str()),
        ],
    )
    .await;
    assert_eq!(status, 400, "the first exchange's refresh token is revoked");

    // A wrong verifier, and none.
    let (url, state, _, _) = authorize(&client);
    let code = code_for(&http, &url, &state, "carol").await;
    let wrong = PkceCodeChallenge::new_random_sha256().1;
    let (status, body) = token_call(
        &http,
        &idp,
        &a,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("redirect_uri", REDIRECT),
            ("client_id", &public),
            ("code_verifier", wrong.secret()),
        ],
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );

    // A confidential client with a wrong secret.
    let (status, body) = token_call(
        &http,
        &idp,
        &a,
        &[
            ("grant_type", "authorization_code"),
            ("code", "x"),
            ("redirect_uri", REDIRECT),
            ("client_id", &confidential),
            ("client_secret", "not-the-secret"),
        ],
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_client"))
    );
    assert!(secret.is_some());
    // A's client presented on B's domain is unknown there.
    let (status, body) = token_call(
        &http,
        &idp,
        &b,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", "x"),
            ("client_id", &public),
        ],
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_client"))
    );

    // Refresh reuse: presenting a used refresh token revokes its whole family.
    let (url, state, _, verifier) = authorize(&client);
    let code = code_for(&http, &url, &state, "carol").await;
    let tokens = client
        .exchange_code(AuthorizationCode::new(code))
        .unwrap()
        .set_pkce_verifier(verifier)
        .request_async(&http)
        .await
        .unwrap();
    let r0 = tokens.refresh_token().unwrap().clone();
    let t1 = client
        .exchange_refresh_token(&r0)
        .unwrap()
        .request_async(&http)
        .await
        .unwrap();
    let r1 = t1.refresh_token().unwrap().clone();
    assert_eq!(
        userinfo_status(&http, &idp, &a, t1.access_token().secret()).await,
        200
    );
    assert!(
        client
            .exchange_refresh_token(&r0)
            .unwrap()
            .request_async(&http)
            .await
            .is_err()
    );
    assert!(
        client
            .exchange_refresh_token(&r1)
            .unwrap()
            .request_async(&http)
            .await
            .is_err(),
        "the family is revoked: the newest refresh token too"
    );
    assert_eq!(
        userinfo_status(&http, &idp, &a, t1.access_token().secret()).await,
        401
    );

    // Expired: a token of this signer whose lifetime has passed.
    let site = idp
        .sso
        .site(&format!("{}:{}", a.domain, idp.addr.port()))
        .unwrap();
    let grant = Grant {
        user_id: carol,
        client_id: public.clone(),
        scope: "openid".into(),
        sid: sso::random_id(),
        family: sso::random_id(),
        roles: vec![Role::Owner],
    };
    let (old, _) = idp
        .sso
        .mint_access_at(&site, &grant, sso::now_secs() - 3600)
        .unwrap();
    let (fresh, _) = idp
        .sso
        .mint_access_at(&site, &grant, sso::now_secs())
        .unwrap();
    assert_eq!(
        userinfo_status(&http, &idp, &a, &fresh).await,
        200,
        "the same token, unexpired, passes"
    );
    assert_eq!(userinfo_status(&http, &idp, &a, &old).await, 401);
    // An ID token is not an access token; a token whose signature was changed is nothing.
    assert_eq!(
        userinfo_status(
            &http,
            &idp,
            &a,
            tokens.id_token().unwrap().to_string().as_str()
        )
        .await,
        401
    );
    let mut forged = fresh.clone();
    forged.replace_range(forged.len() - 4.., "AAAA");
    assert_eq!(userinfo_status(&http, &idp, &a, &forged).await, 401);

    // A revoked access token (RFC 7009 at /revoke).
    let r = http
        .post(format!("{iss}/revoke"))
        .form(&[("token", fresh.as_str()), ("client_id", public.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(userinfo_status(&http, &idp, &a, &fresh).await, 401);

    // Logout with the ID token: the session's access tokens are deny-listed, its refresh tokens
    // revoked, and the session cookie no longer signs in.
    let (url, state, _, verifier) = authorize(&client);
    let code = code_for(&http, &url, &state, "carol").await;
    let tokens = client
        .exchange_code(AuthorizationCode::new(code))
        .unwrap()
        .set_pkce_verifier(verifier)
        .request_async(&http)
        .await
        .unwrap();
    let (url2, _, _, _) = authorize(&client);
    let r = http.get(&url2).send().await.unwrap();
    assert_eq!(
        r.status().as_u16(),
        303,
        "the session signs in without the form"
    );
    let r = http
        .get(format!("{iss}/logout"))
        .query(&[
            (
                "id_token_hint",
                tokens.id_token().unwrap().to_string().as_str(),
            ),
            (
                "post_logout_redirect_uri",
                &format!("{REDIRECT}/signed-out"),
            ),
            ("state", "bye"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 303);
    assert_eq!(
        r.headers()["location"].to_str().unwrap(),
        format!("{REDIRECT}/signed-out?state=bye")
    );
    assert_eq!(
        userinfo_status(&http, &idp, &a, tokens.access_token().secret()).await,
        401
    );
    assert!(
        client
            .exchange_refresh_token(tokens.refresh_token().unwrap())
            .unwrap()
            .request_async(&http)
            .await
            .is_err()
    );
    let r = http.get(&url2).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200, "the login form again");
    // A post-logout URI nobody registered gets the page, not a redirect.
    let r = http
        .get(format!("{iss}/logout"))
        .query(&[
            ("client_id", public.as_str()),
            ("post_logout_redirect_uri", "https://evil.example.com/"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    idp.cleanup().await;
}

fn urlencode(s: &str) -> String {
    serde_urlencoded::to_string([("x", s)]).unwrap()[2..].to_owned()
}

#[tokio::test]
async fn roles_changes_and_disabling_end_tokens_before_they_expire() {
    let idp = Idp::start(|_| {}).await;
    let a = idp
        .tenant("sso-roles", "reseller", "Acme AI", json!(null))
        .await;
    let dave = idp.user(&a, "dave", PASSWORD, &["sales"]).await;
    let (public, _) = idp.client(&a, REDIRECT, false).await;
    let http = idp.http(&[&a]);
    let client = discover(&idp, &http, &a, &public, None).await;
    let (url, state, _, verifier) = authorize(&client);
    let code = code_for(&http, &url, &state, "dave").await;
    let tokens = client
        .exchange_code(AuthorizationCode::new(code))
        .unwrap()
        .set_pkce_verifier(verifier)
        .request_async(&http)
        .await
        .unwrap();
    assert_eq!(
        payload(tokens.access_token().secret())["roles"],
        json!(["sales"])
    );
    // A reseller cannot grant `tech`; nothing changes.
    let err = idp
        .sso
        .assign_roles(aigw_crds::TenantType::Reseller, a.id, dave, &[Role::Tech])
        .await
        .unwrap_err();
    assert!(
        err.contains("role tech is not available to a reseller"),
        "{err}"
    );
    assert_eq!(
        userinfo_status(&http, &idp, &a, tokens.access_token().secret()).await,
        200
    );

    idp.sso
        .assign_roles(
            aigw_crds::TenantType::Reseller,
            a.id,
            dave,
            &[Role::Sales, Role::Finance],
        )
        .await
        .unwrap();
    assert_eq!(
        userinfo_status(&http, &idp, &a, tokens.access_token().secret()).await,
        401
    );
    // Tokens issued in the second of the change are refused too; the next second's carry the
    // new roles.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let refreshed = client
        .exchange_refresh_token(tokens.refresh_token().unwrap())
        .unwrap()
        .request_async(&http)
        .await
        .unwrap();
    assert_eq!(
        payload(refreshed.access_token().secret())["roles"],
        json!(["sales", "finance"])
    );
    assert_eq!(
        userinfo_status(&http, &idp, &a, refreshed.access_token().secret()).await,
        200
    );

    assert!(idp.sso.set_active(a.id, dave, false).await.unwrap());
    assert_eq!(
        userinfo_status(&http, &idp, &a, refreshed.access_token().secret()).await,
        401
    );
    assert!(
        client
            .exchange_refresh_token(refreshed.refresh_token().unwrap())
            .unwrap()
            .request_async(&http)
            .await
            .is_err()
    );
    let (url, _, _, _) = authorize(&client);
    let (status, _, body) = sign_in(&idp.http(&[&a]), &url, "dave", PASSWORD).await;
    assert_eq!(status, 401, "a disabled user cannot sign in: {body}");
    idp.cleanup().await;
}

/// The median of `n` sign-in attempts' durations.
fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test]
async fn an_unknown_user_and_a_wrong_password_look_alike_in_answer_and_timing() {
    let idp = Idp::start(|s| {
        s.account_failures = 1000;
        s.address_failures = 1000;
    })
    .await;
    let a = idp
        .tenant("sso-timing", "reseller", "Acme AI", json!(null))
        .await;
    idp.user(&a, "erin", PASSWORD, &["user"]).await;
    let (public, _) = idp.client(&a, REDIRECT, false).await;
    let http = idp.http(&[&a]);
    let client = discover(&idp, &http, &a, &public, None).await;
    let (url, _, _, _) = authorize(&client);

    let (s1, _, known) = sign_in(&http, &url, "erin", "wrong password!").await;
    let (s2, _, unknown) = sign_in(&http, &url, "nobody", "wrong password!").await;
    assert_eq!((s1, s2), (401, 401));
    assert_eq!(
        known.replace("value=\"erin\"", "value=\"X\""),
        unknown.replace("value=\"nobody\"", "value=\"X\""),
        "the same page, apart from the echoed username"
    );
    assert!(known.contains("Wrong username or password."));

    // Interleaved, so machine noise hits both alike.
    let (mut wrong, mut missing) = (Vec::new(), Vec::new());
    for i in 0..15 {
        for (user, out) in [("erin", &mut wrong), (&*format!("ghost{i}"), &mut missing)] {
            let started = Instant::now();
            let (status, _, _) = sign_in(&http, &url, user, "wrong password!").await;
            out.push(started.elapsed());
            assert_eq!(status, 401);
        }
    }
    // The fastest of each: the cost of the work itself, least disturbed by the other tests of
    // this binary hashing passwords at the same time (a median moved by 50 % under that load).
    let (w, m) = (
        wrong.iter().min().copied().unwrap_or_default(),
        missing.iter().min().copied().unwrap_or_default(),
    );
    println!(
        "fastest sign-in: wrong password {w:?}, unknown user {m:?} (medians {:?} / {:?})",
        median(wrong.clone()),
        median(missing.clone())
    );
    // Both ran argon2id (about 20 ms); skipping it for unknown users would leave them at a
    // millisecond or two, many times faster.
    let (lo, hi) = if w < m { (w, m) } else { (m, w) };
    assert!(lo > Duration::from_millis(5), "argon2id ran: {w:?} {m:?}");
    assert!(
        hi.as_secs_f64() / lo.as_secs_f64() < 1.5,
        "timing tells users apart: wrong password {w:?}, unknown user {m:?}"
    );
    idp.cleanup().await;
}

#[tokio::test]
async fn repeated_failures_are_throttled_per_account_and_per_address() {
    let idp = Idp::start(|s| {
        s.account_failures = 3;
        s.address_failures = 8;
    })
    .await;
    let a = idp
        .tenant("sso-throttle", "reseller", "Acme AI", json!(null))
        .await;
    idp.user(&a, "frank", PASSWORD, &["user"]).await;
    idp.user(&a, "grace", PASSWORD, &["user"]).await;
    idp.user(&a, "ivy", PASSWORD, &["user"]).await;
    let (public, _) = idp.client(&a, REDIRECT, false).await;
    let http = idp.http(&[&a]);
    let client = discover(&idp, &http, &a, &public, None).await;
    let (url, _, _, _) = authorize(&client);
    for _ in 0..3 {
        assert_eq!(sign_in(&http, &url, "frank", "guess").await.0, 401);
    }
    // Now even the right password is refused, with a clear message and Retry-After.
    let page = http.get(&url).send().await.unwrap().text().await.unwrap();
    let mut form = idp::hidden_fields(&page);
    form.push(("username".into(), "frank".into()));
    form.push(("password".into(), PASSWORD.into()));
    let r = http
        .post(format!("{}/authorize", idp.issuer(&a)))
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 429);
    let wait: i64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(wait > 0 && wait <= 900, "{wait}");
    let body = r.text().await.unwrap();
    assert!(
        body.contains("Too many failed sign-in attempts. Try again in 15 minutes."),
        "{body}"
    );
    // The same account in other spellings: another case is the same account (throttled); an
    // accented one is not a username at all and never reaches frank's password.
    assert_eq!(
        sign_in(&idp.http(&[&a]), &url, "FRANK", PASSWORD).await.0,
        429
    );
    assert_eq!(
        sign_in(&idp.http(&[&a]), &url, "fránk", PASSWORD).await.0,
        401
    );
    // Another account from the same address still signs in…
    assert_eq!(sign_in(&http, &url, "grace", PASSWORD).await.0, 303);
    // …until the address has made 8 failed attempts in all (frank's 5 and fránk's 1 count; grace's
    // success does not), so 2 more (a client without grace's session cookie).
    for _ in 0..2 {
        assert_eq!(
            sign_in(&idp.http(&[&a]), &url, "grace", "guess").await.0,
            401
        );
    }
    assert_eq!(
        sign_in(&idp.http(&[&a]), &url, "grace", PASSWORD).await.0,
        429
    );
    // Behind the gateway the address is the last X-Forwarded-For entry: another client (as the
    // gateway reports it) is not throttled, whatever it claims in front of it; the throttled one
    // is, whatever it claims.
    let via_gateway = |claimed: &'static str, real: &'static str| {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            format!("{claimed}, {real}").parse().unwrap(),
        );
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&idp.ca).unwrap())
            .resolve(&a.domain, idp.addr)
            .redirect(reqwest::redirect::Policy::none())
            .default_headers(h)
            .build()
            .unwrap()
    };
    for i in 0..8 {
        let who = format!("nobody{i}");
        assert_eq!(
            sign_in(
                &via_gateway("127.0.0.1", "203.0.113.9"),
                &url,
                &who,
                "guess"
            )
            .await
            .0,
            401
        );
    }
    assert_eq!(
        sign_in(
            &via_gateway("198.51.100.1", "203.0.113.9"),
            &url,
            "ivy",
            PASSWORD
        )
        .await
        .0,
        429
    );
    assert_eq!(
        sign_in(
            &via_gateway("203.0.113.9", "198.51.100.7"),
            &url,
            "ivy",
            PASSWORD
        )
        .await
        .0,
        303
    );
    // A burst: 10 parallel attempts at one account are counted before any password is checked,
    // so no more than the limit get a password check.
    let burst = via_gateway("127.0.0.1", "198.51.100.20");
    let attempts = (0..10).map(|_| {
        let (c, u) = (burst.clone(), url.clone());
        async move { sign_in(&c, &u, "frank2", "guess").await.0 }
    });
    let mut codes = futures::future::join_all(attempts).await;
    codes.sort_unstable();
    assert_eq!(codes, [401, 401, 401, 429, 429, 429, 429, 429, 429, 429]);
    idp.cleanup().await;
}

#[tokio::test]
async fn tokens_of_a_retiring_key_verify_until_it_is_removed() {
    let idp = Idp::start(|_| {}).await;
    let a = idp
        .tenant("sso-keys", "reseller", "Acme AI", json!(null))
        .await;
    idp.user(&a, "heidi", PASSWORD, &["owner"]).await;
    let (public, _) = idp.client(&a, REDIRECT, false).await;
    let http = idp.http(&[&a]);
    let get_token = || async {
        let client = discover(&idp, &http, &a, &public, None).await;
        let (url, state, nonce, verifier) = authorize(&client);
        let code = code_for(&idp.http(&[&a]), &url, &state, "heidi").await;
        let tokens = client
            .exchange_code(AuthorizationCode::new(code))
            .unwrap()
            .set_pkce_verifier(verifier)
            .request_async(&http)
            .await
            .unwrap();
        // The library fetched the JWKS at discovery: the ID token verifies against it.
        let v = client
            .id_token_verifier()
            .set_allowed_algs([CoreJwsSigningAlgorithm::EdDsa]);
        tokens.id_token().unwrap().claims(&v, &nonce).unwrap();
        tokens.access_token().clone()
    };
    let kid = |t: &AccessToken| {
        jsonwebtoken::decode_header(t.secret())
            .unwrap()
            .kid
            .unwrap()
    };
    let old = get_token().await;
    assert_eq!(kid(&old), "k1");
    // Rotation: the new key is published and signs; the old one still verifies.
    sso::keys::generate(&idp.keys_dir, "k2").unwrap();
    idp.sso.keys().reload().unwrap();
    let jwks: Value = http
        .get(format!("{}/jwks", idp.issuer(&a)))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 2);
    let new = get_token().await;
    assert_eq!(kid(&new), "k2");
    assert_eq!(userinfo_status(&http, &idp, &a, old.secret()).await, 200);
    assert_eq!(userinfo_status(&http, &idp, &a, new.secret()).await, 200);
    // The old key is removed: its tokens fail, the new key's pass.
    std::fs::remove_file(idp.keys_dir.join("k1.pem")).unwrap();
    idp.sso.keys().reload().unwrap();
    assert_eq!(userinfo_status(&http, &idp, &a, old.secret()).await, 401);
    assert_eq!(userinfo_status(&http, &idp, &a, new.secret()).await, 200);
    idp.cleanup().await;
}

/// Signs `user` in on `t` and returns an access token.
async fn access_token(idp: &Idp, t: &T, client_id: &str, user: &str) -> String {
    let http = idp.http(&[t]);
    let client = discover(idp, &http, t, client_id, None).await;
    let (url, state, _, verifier) = authorize(&client);
    let code = code_for(&http, &url, &state, user).await;
    client
        .exchange_code(AuthorizationCode::new(code))
        .unwrap()
        .set_pkce_verifier(verifier)
        .request_async(&http)
        .await
        .unwrap()
        .access_token()
        .secret()
        .clone()
}

async fn invite(idp: &Idp, t: &T, token: &str, body: Value) -> (u16, Value) {
    let r = idp
        .http(&[t])
        .post(format!(
            "https://{}:{}/api/v1/invitations",
            t.domain,
            idp.addr.port()
        ))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Posts the invitation form of `link` (its page's form): the link's secret, a password and its
/// confirmation. Returns the status and the page.
async fn set_password(
    http: &reqwest::Client,
    link: &str,
    password: &str,
    confirm: &str,
) -> (u16, String) {
    let url = link.split('?').next().unwrap();
    let token = param(link, "token").unwrap();
    let r = http
        .post(url)
        .form(&[
            ("token", token.as_str()),
            ("password", password),
            ("confirm", confirm),
        ])
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// The invitation link in the newest mail to `to`.
fn link_for(idp: &Idp, to: &str) -> String {
    let mail = idp
        .mails()
        .into_iter()
        .rev()
        .find(|m| m.contains(&format!("To: {to}")))
        .unwrap_or_else(|| panic!("no mail to {to}"));
    let unfolded = mail.replace("=\r\n", "").replace("=3D", "=");
    let start = unfolded.find("https://").unwrap();
    unfolded[start..]
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn invitations_set_a_password_once_and_follow_the_role_matrix() {
    let idp = Idp::start(|_| {}).await;
    let a = idp
        .tenant("sso-inv", "reseller", "Acme AI", json!(null))
        .await;
    let b = idp
        .tenant("sso-inv-b", "reseller", "Beta", json!(null))
        .await;
    idp.user(&a, "ivan", PASSWORD, &["owner"]).await;
    let sales = idp.user(&a, "judy", PASSWORD, &["sales"]).await;
    idp.user(&a, "ken", PASSWORD, &["finance"]).await;
    let (public, _) = idp.client(&a, REDIRECT, false).await;
    let owner = access_token(&idp, &a, &public, "ivan").await;
    let judy = access_token(&idp, &a, &public, "judy").await;
    let ken = access_token(&idp, &a, &public, "ken").await;

    // The owner invites a finance person; the mail holds a single-use link.
    let (status, body) = invite(
        &idp,
        &a,
        &owner,
        json!({"username": "liz", "email": "liz@example.com", "roles": ["finance", "owner"]}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let link = link_for(&idp, "liz@example.com");
    assert!(link.starts_with(&idp.issuer(&a)), "{link}");
    let http = idp.http(&[&a, &b]);
    let form = http.get(&link).send().await.unwrap();
    assert_eq!(form.status().as_u16(), 200);
    assert!(form.text().await.unwrap().contains("Welcome, liz"));
    // On another tenant's domain the link is nothing.
    let elsewhere = link.replace(&a.domain, &b.domain);
    assert_eq!(
        http.get(&elsewhere).send().await.unwrap().status().as_u16(),
        410
    );
    let post = |password: &'static str, confirm: &'static str| {
        set_password(&http, &link, password, confirm)
    };
    let (status, body) = post("short", "short").await;
    assert_eq!(status, 400);
    assert!(body.contains("at least 12 characters"), "{body}");
    let (status, _) = post(PASSWORD, "something else entirely").await;
    assert_eq!(status, 400);
    let (status, body) = post(PASSWORD, PASSWORD).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("Your account liz is ready"));
    let (status, _) = post("another password!!", "another password!!").await;
    assert_eq!(status, 410, "single use");
    let liz = access_token(&idp, &a, &public, "liz").await;
    assert_eq!(payload(&liz)["roles"], json!(["owner", "finance"]));

    // The matrix: finance may not invite; sales invite customers (users), bound to them; nobody
    // grants a role the tenant type lacks; a token of another domain invites nothing here.
    let (status, _) = invite(
        &idp,
        &a,
        &ken,
        json!({"username": "x1", "email": "x1@example.com", "roles": ["user"]}),
    )
    .await;
    assert_eq!(status, 403);
    let (status, _) = invite(
        &idp,
        &a,
        &judy,
        json!({"username": "x2", "email": "x2@example.com", "roles": ["sales"]}),
    )
    .await;
    assert_eq!(status, 403);
    let (status, body) = invite(
        &idp,
        &a,
        &owner,
        json!({"username": "x3", "email": "x3@example.com", "roles": ["tech"]}),
    )
    .await;
    assert_eq!(status, 422);
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("role tech is not available to a reseller")
    );
    let (status, _) = invite(
        &idp,
        &b,
        &owner,
        json!({"username": "x4", "email": "x4@example.com", "roles": ["user"]}),
    )
    .await;
    assert_eq!(status, 401);
    let (status, _) = invite(
        &idp,
        &a,
        &owner,
        json!({"username": "ivan", "email": "i@example.com", "roles": ["user"]}),
    )
    .await;
    assert_eq!(status, 409, "usernames are unique per tenant");
    let (status, body) = invite(
        &idp,
        &a,
        &owner,
        json!({"username": "bad name", "email": "x", "roles": ["user"]}),
    )
    .await;
    assert_eq!(status, 400, "{body}");

    let (status, body) = invite(
        &idp,
        &a,
        &judy,
        json!({"username": "mallory", "email": "mallory@example.com", "roles": ["user"]}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let link = link_for(&idp, "mallory@example.com");
    assert_eq!(set_password(&http, &link, PASSWORD, PASSWORD).await.0, 200);
    let bound: i64 = sqlx::query_scalar(
        "SELECT b.sales_id FROM customer_bindings b JOIN users u ON u.id = b.customer_id \
         WHERE b.tenant_id = ? AND u.tenant_id = ? AND u.username = 'mallory'",
    )
    .bind(a.id)
    .bind(a.id)
    .fetch_one(&idp.db)
    .await
    .unwrap();
    assert_eq!(bound, sales);

    let accept = |to: &'static str| {
        let link = link_for(&idp, to);
        let http = http.clone();
        async move { set_password(&http, &link, PASSWORD, PASSWORD).await }
    };
    // Repeated roles are one role.
    let (status, body) = invite(
        &idp,
        &a,
        &owner,
        json!({"username": "sam", "email": "sam@example.com", "roles": ["user", "user"]}),
    )
    .await;
    assert_eq!((status, body["roles"].clone()), (201, json!(["user"])));
    assert_eq!(accept("sam@example.com").await.0, 200);
    // One pending invitation per username: a second could be accepted first by someone else.
    let (status, _) = invite(
        &idp,
        &a,
        &owner,
        json!({"username": "quinn", "email": "q1@example.com", "roles": ["user"]}),
    )
    .await;
    assert_eq!(status, 201);
    let (status, body) = invite(
        &idp,
        &a,
        &owner,
        json!({"username": "quinn", "email": "q2@example.com", "roles": ["user"]}),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    // A name a token of the tenant names as owner: not for a sales person to claim as their
    // customer (with that token's usage); an owner may invite it.
    sqlx::query(
        "INSERT INTO tokens (tenant_id, user_id, namespace, cr_name, key_hash, key_prefix, owner) \
         VALUES (?, 0, ?, 'ritas', ?, 'sk-rita', 'rita')",
    )
    .bind(a.id)
    .bind(format!("aigw-{}", a.name))
    .bind(format!("{:064x}", a.id))
    .execute(&idp.db)
    .await
    .unwrap();
    let (status, body) = invite(
        &idp,
        &a,
        &judy,
        json!({"username": "rita", "email": "judy+rita@example.com", "roles": ["user"]}),
    )
    .await;
    assert_eq!(status, 409, "{body}");
    let (status, _) = invite(
        &idp,
        &a,
        &owner,
        json!({"username": "rita", "email": "rita@example.com", "roles": ["user"]}),
    )
    .await;
    assert_eq!(status, 201);
    assert_eq!(accept("rita@example.com").await.0, 200);
    let (user_id, rita): (i64, i64) = sqlx::query_as(
        "SELECT t.user_id, u.id FROM tokens t JOIN users u ON u.tenant_id = t.tenant_id AND u.username = 'rita' \
         WHERE t.tenant_id = ? AND t.cr_name = 'ritas'",
    )
    .bind(a.id)
    .fetch_one(&idp.db)
    .await
    .unwrap();
    assert_eq!(user_id, rita, "the token now bills to rita");
    // A sales invitation pending when a token comes to name its username cannot take the token.
    let (status, _) = invite(
        &idp,
        &a,
        &judy,
        json!({"username": "tess", "email": "judy+tess@example.com", "roles": ["user"]}),
    )
    .await;
    assert_eq!(status, 201);
    sqlx::query(
        "INSERT INTO tokens (tenant_id, user_id, namespace, cr_name, key_hash, key_prefix, owner) \
         VALUES (?, 0, ?, 'tess', ?, 'sk-tess', 'tess')",
    )
    .bind(a.id)
    .bind(format!("aigw-{}", a.name))
    .bind(format!("{:064x}", a.id + 1))
    .execute(&idp.db)
    .await
    .unwrap();
    let (status, body) = accept("judy+tess@example.com").await;
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("now name"), "{body}");
    // An invitation dies with its sender's right to send it.
    let (status, _) = invite(
        &idp,
        &a,
        &owner,
        json!({"username": "pat", "email": "pat@example.com", "roles": ["finance"]}),
    )
    .await;
    assert_eq!(status, 201);
    let ivan: i64 =
        sqlx::query_scalar("SELECT id FROM users WHERE tenant_id = ? AND username = 'ivan'")
            .bind(a.id)
            .fetch_one(&idp.db)
            .await
            .unwrap();
    idp.sso
        .assign_roles(
            aigw_crds::TenantType::Reseller,
            a.id,
            ivan,
            &[Role::Finance],
        )
        .await
        .unwrap();
    let (status, body) = accept("pat@example.com").await;
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("withdrawn"), "{body}");
    idp.cleanup().await;
}

#[tokio::test]
async fn the_first_owner_comes_from_a_one_time_command() {
    let idp = Idp::start(|_| {}).await;
    // The operator's mirror row the command reads (MySQL gives the id, as for the operator).
    let name = aigw_testkit::unique_name("sso-boot");
    let id = i64::try_from(
        sqlx::query("INSERT INTO tenants (slug, name, type) VALUES (?, 'Platform', 'platform')")
            .bind(&name)
            .execute(&idp.db)
            .await
            .unwrap()
            .last_insert_id(),
    )
    .unwrap();
    let t = idp
        .tenant_as(&name, id, "platform", "Platform", json!(null))
        .await;
    let run = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_aigw-apiserver"))
            .args([
                "bootstrap-owner",
                "--tenant",
                &t.name,
                "--username",
                "root",
                "--email",
                "root@example.com",
                "--domain",
                &format!("{}:{}", t.domain, idp.addr.port()),
                "--public-scheme",
                "https",
                "--mail-url",
                &format!("log:{}", idp.mail_dir.display()),
            ])
            .env(
                "DATABASE_URL",
                aigw_testkit::Testbed::load()
                    .unwrap()
                    .var("DATABASE_URL")
                    .unwrap(),
            )
            .output()
            .unwrap()
    };
    let out = run();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let link = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(
        link.starts_with(&format!("{}/invite?token=", idp.issuer(&t))),
        "{link}"
    );
    assert_eq!(link, link_for(&idp, "root@example.com"), "mailed too");
    assert_eq!(
        set_password(&idp.http(&[&t]), &link, PASSWORD, PASSWORD)
            .await
            .0,
        200
    );
    let (public, _) = idp.client(&t, REDIRECT, false).await;
    let root = access_token(&idp, &t, &public, "root").await;
    assert_eq!(payload(&root)["roles"], json!(["owner"]));
    // Once the tenant has an owner the command refuses.
    let out = run();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("has an owner already"));
    sqlx::query("DELETE FROM tenants WHERE id = ?")
        .bind(t.id)
        .execute(&idp.db)
        .await
        .unwrap();
    idp.cleanup().await;
}
